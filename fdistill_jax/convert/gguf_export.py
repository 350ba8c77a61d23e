"""Project LLaMA-family models -> GGUF files (the inverse of `load_gguf`).

Tensors come from the Hugging Face export (`hf_export.hf_tensors`, one
table of names per family), are renamed to llama.cpp's names and get
llama.cpp's q/k row permutation (`permute_rope_rows`, the inverse of
`gguf.unpermute_rope_rows`), so that llama.cpp's adjacent-pair RoPE computes
what the project's rotate-half RoPE does.

Tensor types, as llama.cpp's converter chooses them:

  f32   every tensor float32 (reloads bit for bit);
  f16   2-D weights float16, norms and biases float32;
  q8_0  2-D weights whose rows are whole 32-value blocks in Q8_0 (per block
        d = max|w| / 127, int8 values round(w / d), the scale stored as
        float16(d); a weight moves by at most d / 2 + 127 |float16(d) - d|,
        under 0.57 d), other 2-D weights f16, 1-D float32.

The tokenizer (`tokenizer_export.export_tokenizer`) is written as llama.cpp's
`tokenizer.*` metadata; without one the file holds weights and special ids
only (the library's loader reads it, llama.cpp cannot run it).

  export_gguf(student, "/tmp/student.gguf", tokenizer=config.task.tokenizer, dtype="q8_0")
"""

from __future__ import annotations

import os

import numpy as np

from fdistill_jax.convert import gguf as gguf_import
from fdistill_jax.convert.hf_export import hf_tensors
from fdistill_jax.convert.params import ConversionError
from fdistill_jax.convert.tokenizer_export import export_tokenizer

DTYPES = ("f32", "f16", "q8_0")
_Q8_BLOCK = 32

# Hugging Face name -> llama.cpp name: the inverse of the import tables.
_GLOBAL = {hf: g for g, hf in gguf_import._GLOBAL_NAMES.items()}
_LAYER = {hf: g for g, hf in gguf_import._LAYER_NAMES.items()}


def gguf_name(hf_name: str) -> str:
  """The llama.cpp name of a Hugging Face LLaMA tensor; unknown names raise."""
  if hf_name in _GLOBAL:
    return _GLOBAL[hf_name]
  parts = hf_name.split(".", 3)
  if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER:
    return f"blk.{parts[2]}.{_LAYER[parts[3]]}"
  raise ConversionError(f"export_gguf: tensor {hf_name!r} has no llama.cpp name.")


def permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's q/k row order from HF's: w [heads * head_dim, ...] -> same shape.

  Within each head, HF rows (0..hd/2-1 | hd/2..hd-1) become interleaved
  (0, hd/2, 1, hd/2 + 1, ...); `gguf.unpermute_rope_rows` undoes it.
  """
  rows = w.shape[0]
  if rows % (2 * heads):
    raise ConversionError(f"Cannot permute {rows} rows into {heads} heads of even size.")
  half = rows // heads // 2
  return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _metadata(writer, cfg):
  """llama.cpp's `llama.*` architecture keys for `cfg` (what `gguf_hf_config` reads)."""
  writer.add_block_count(cfg.num_layers)
  writer.add_context_length(cfg.max_positions)
  writer.add_embedding_length(cfg.d_model)
  writer.add_feed_forward_length(cfg.d_ff)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.kv_heads)
  writer.add_key_length(cfg.dim_per_head)
  writer.add_value_length(cfg.dim_per_head)
  writer.add_rope_dimension_count(cfg.dim_per_head)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_vocab_size(cfg.vocab_size)


def _check_exportable(cfg):
  if cfg.family != "llama":
    raise ConversionError(
      f"export_gguf: only LLaMA-family models have a GGUF form here; this is a {cfg.family} "
      "model (use export_hf)."
    )
  if cfg.activation != "swiglu":
    raise ConversionError(
      f"export_gguf: LLaMA GGUF files use swiglu; this model uses {cfg.activation!r}."
    )


def _typed(name: str, w: np.ndarray, dtype: str):
  """(array to write, raw GGML type or None) for one float32 tensor [rows, cols] or [n]."""
  import gguf

  if w.ndim == 1 or dtype == "f32":
    return w, None
  if dtype == "q8_0" and w.shape[-1] % _Q8_BLOCK == 0:
    q8 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(w, q8), q8
  return w.astype(np.float16), None


def export_gguf(model, path: str, *, tokenizer=None, dtype: str = "f32", name: str = "") -> str:
  """Writes a LLaMA-family `model` as a GGUF file at `path` (atomically); returns the path.

  Args:
    tokenizer: a `load_tokenizer` spec (kind gguf or hf byte-level BPE), or
      None for a weights-only file.
    dtype: one of `DTYPES` (see the module docstring).
    name: `general.name` (default: the file's base name).
  """
  import gguf

  if dtype not in DTYPES:
    raise ConversionError(f"export_gguf: dtype={dtype!r} is not one of {DTYPES}.")
  cfg = model.config
  _check_exportable(cfg)
  fields = {}
  if tokenizer is not None:
    exported = export_tokenizer(tokenizer)
    if exported.gguf_fields is None:
      raise ConversionError(exported.gguf_refusal)
    if exported.tokenizer.vocab_size > cfg.vocab_size:
      raise ConversionError(
        f"export_gguf: the tokenizer has {exported.tokenizer.vocab_size} ids, the model's "
        f"embedding only {cfg.vocab_size} rows."
      )
    fields = dict(exported.gguf_fields)
  V = gguf.GGUFValueType
  # The model's own special ids win: they are what it was trained to emit.
  fields["tokenizer.ggml.eos_token_id"] = (int(cfg.eos_id), V.UINT32, None)
  fields["tokenizer.ggml.padding_token_id"] = (int(cfg.pad_id), V.UINT32, None)

  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = path + ".tmp"
  writer = gguf.GGUFWriter(tmp, "llama")
  writer.add_name(name or os.path.splitext(os.path.basename(path))[0])
  writer.add_file_type(
    {
      "f32": gguf.LlamaFileType.ALL_F32,
      "f16": gguf.LlamaFileType.MOSTLY_F16,
      "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]
  )
  if dtype == "q8_0":
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  _metadata(writer, cfg)
  for key, (value, vtype, sub) in sorted(fields.items()):
    writer.add_key_value(key, value, vtype, sub_type=sub)
  for hf, w in hf_tensors(model, "float32").items():
    if "q_proj" in hf:
      w = permute_rope_rows(w, cfg.num_heads)
    elif "k_proj" in hf:
      w = permute_rope_rows(w, cfg.kv_heads)
    data, raw = _typed(hf, np.ascontiguousarray(w, np.float32), dtype)
    writer.add_tensor(gguf_name(hf), data, raw_dtype=raw)
  try:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
  finally:
    writer.close()
  os.replace(tmp, path)
  return path

"""GGUF files of LLaMA-family models (llama.cpp's format) -> project models.

Reads with the `gguf` package, dequantises every tensor to float32 with
`gguf.quants.dequantize` (F32/F16/BF16 and all the block formats: Q4_0,
Q4_1, Q8_0, K-quants, ...), renames llama.cpp's tensors to the Hugging Face
LLaMA names and reuses the HF converter, so both paths share one mapping and
one set of checks.

llama.cpp's converter permutes the rows of the query and key projections so
that RoPE rotates adjacent pairs (GPT-J style); the project's models, like
Hugging Face, rotate the two halves of each head (`rotate_half`). The
permutation is undone here: llama.cpp's rows, viewed as
`[heads, head_dim // 2, 2, ...]`, are HF's rows viewed as
`[heads, 2, head_dim // 2, ...]` with the middle axes swapped.

The config comes from the header alone (`read_gguf_config`, via
`fdistill_jax.data.gguf_header`: no tensor data is read); the tensors from
`gguf.GGUFReader`. The tokenizer embedded in the same file is read by
`fdistill_jax.data.gguf_tokenizer.GGUFTokenizer`.

  model, config = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from __future__ import annotations

import os
import re

import numpy as np

from fdistill_jax.convert.hf import convert_tensors, hf_model_config
from fdistill_jax.convert.params import ConversionError, TensorSource, assemble
from fdistill_jax.data.gguf_header import read_header
from fdistill_jax.data.gguf_tokenizer import gguf_reader

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor name -> Hugging Face LLaMA name ("{i}" is the layer).
_GLOBAL_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
  "attn_norm.weight": "input_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_output.weight": "self_attn.o_proj.weight",
  "attn_q.bias": "self_attn.q_proj.bias",
  "attn_k.bias": "self_attn.k_proj.bias",
  "attn_v.bias": "self_attn.v_proj.bias",
  "attn_output.bias": "self_attn.o_proj.bias",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str:
  """The Hugging Face name of a llama.cpp tensor; unknown names are kept as they are."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _LAYER.fullmatch(gguf_name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
  return gguf_name


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation: w [heads * head_dim, ...] -> same shape.

  llama.cpp stores, within each head, the rows (0, hd/2, 1, hd/2 + 1, ...)
  so that rotated pairs are adjacent; this returns rows in HF order.
  """
  rows = w.shape[0]
  if rows % (2 * heads):
    raise ConversionError(f"Cannot unpermute {rows} rows into {heads} heads of even size.")
  half = rows // heads // 2
  return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(fields, key, default=None):
  value = fields.get(key)
  return default if value is None else value


def gguf_hf_config(fields, tensor_names, where: str, embedding_rows: int | None = None) -> dict:
  """A Hugging Face-style LLaMA config dict from GGUF metadata (`GGUFHeader.fields`)."""
  arch = _field(fields, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ConversionError(
      f"{where}: unknown architecture general.architecture={arch!r}; supported: "
      f"{list(SUPPORTED_ARCHITECTURES)} (LLaMA-family files, e.g. LLaMA, Mistral, SmolLM)."
    )

  def meta(key, default=None, required=True):
    value = _field(fields, f"{arch}.{key}", default)
    if value is None and required:
      raise ConversionError(f"{where}: metadata {arch}.{key} is missing.")
    return value

  scaling = meta("rope.scaling.type", "none", required=False)
  if scaling not in ("none", None):
    raise ConversionError(
      f"{where}: {arch}.rope.scaling.type={scaling!r} is not supported (only plain RoPE)."
    )
  if meta("expert_count", 0, required=False):
    raise ConversionError(
      f"{where}: mixture-of-experts files ({arch}.expert_count) are not supported."
    )
  heads = meta("attention.head_count")
  kv_heads = meta("attention.head_count_kv", heads, required=False)
  if isinstance(heads, list) or isinstance(kv_heads, list):
    raise ConversionError(f"{where}: per-layer head counts are not supported.")
  d = meta("embedding_length")
  head_dim = meta("attention.key_length", d // heads, required=False)
  rope_dim = meta("rope.dimension_count", head_dim, required=False)
  if rope_dim != head_dim:
    raise ConversionError(
      f"{where}: partial RoPE ({arch}.rope.dimension_count={rope_dim} < head_dim={head_dim}) "
      "is not supported."
    )
  # The vocabulary size is metadata in newer files; older ones only imply it
  # by the token list (or the embedding's rows, passed in by the caller).
  tokens = _field(fields, "tokenizer.ggml.tokens")
  vocab = meta("vocab_size", len(tokens) if tokens is not None else embedding_rows)
  eos = _field(fields, "tokenizer.ggml.eos_token_id", 2)
  return {
    "model_type": "llama",
    "architectures": [f"gguf:{arch}"],
    "vocab_size": int(vocab),
    "hidden_size": int(d),
    "intermediate_size": int(meta("feed_forward_length")),
    "num_hidden_layers": int(meta("block_count")),
    "num_attention_heads": int(heads),
    "num_key_value_heads": int(kv_heads),
    "head_dim": int(head_dim),
    "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5, required=False)),
    "rope_theta": float(meta("rope.freq_base", 10000.0, required=False)),
    "max_position_embeddings": int(meta("context_length", 2048, required=False)),
    "tie_word_embeddings": "output.weight" not in tensor_names,
    "attention_bias": "blk.0.attn_q.bias" in tensor_names,
    "bos_token_id": _field(fields, "tokenizer.ggml.bos_token_id"),
    "eos_token_id": eos,
    "pad_token_id": _field(fields, "tokenizer.ggml.padding_token_id", eos),
  }


def _tensor_source(reader, hf: dict, path: str) -> TensorSource:
  """Lazily dequantised tensors under HF names, q/k rows already un-permuted."""
  import gguf

  loaders = {}
  for t in reader.tensors:
    name = hf_name(t.name)
    # GGUF lists dimensions fastest-first; numpy (and HF) order is the reverse.
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    heads = None
    if name.endswith(("q_proj.weight", "q_proj.bias")):
      heads = hf["num_attention_heads"]
    elif name.endswith(("k_proj.weight", "k_proj.bias")):
      heads = hf["num_key_value_heads"]

    def read(t=t, shape=shape, heads=heads):
      try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
      except NotImplementedError as e:
        raise ConversionError(
          f"Tensor {t.name!r} in {path!r}: cannot dequantise type {t.tensor_type.name} ({e})."
        ) from e
      w = np.asarray(w, np.float32).reshape(shape)
      return w if heads is None else unpermute_rope_rows(w, heads)

    loaders[name] = (path, shape, read)
  return TensorSource(loaders)


def read_gguf_config(path: str) -> dict:
  """The HF-style config dict of a GGUF file, from its header alone (no tensor data read)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f"Expected a GGUF file at {path!r}; found nothing there.")
  try:
    header = read_header(path)
  except (ValueError, OSError) as e:
    raise ConversionError(f"{path!r} is not a readable GGUF file: {e}") from e
  embedding = header.tensors.get("token_embd.weight")
  rows = embedding.shape[0] if embedding is not None else None
  return gguf_hf_config(header.fields, set(header.tensors), path, rows)


def read_gguf(path: str):
  """(HF-style config dict, TensorSource under HF names) of a GGUF file."""
  hf = read_gguf_config(path)
  try:
    reader = gguf_reader(path)
  except (ValueError, OSError) as e:
    raise ConversionError(f"{path!r} is not a readable GGUF file: {e}") from e
  return hf, _tensor_source(reader, hf, os.fspath(path))


def load_gguf(path: str, *, mesh=None, rules=None, **overrides):
  """(model, ModelConfig) from a LLaMA-family GGUF file.

  `overrides` set ModelConfig fields; with a `mesh` the parameters are placed
  sharded (see `params.assemble`).
  """
  hf, src = read_gguf(path)
  config = hf_model_config(hf, os.fspath(path), **overrides)
  flat = convert_tensors(src, hf, config)
  return assemble(config, flat, os.fspath(path), mesh, rules), config

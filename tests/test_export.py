"""Export round trips: project model -> GGUF (f32/f16/q8_0) and -> complete HF folder -> back.

References are independent of the exporters: float16 rounding by numpy, a
float64 numpy Q8_0 quantiser written here from the format's definition, and
the `gguf` package's own reader for what the file holds.
"""

import importlib.util
import io
import json
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from fdistill_jax import convert, models
from fdistill_jax.convert import ConversionError, load_gguf, load_hf
from fdistill_jax.convert.gguf import unpermute_rope_rows
from fdistill_jax.convert.gguf_export import export_gguf, permute_rope_rows
from fdistill_jax.convert.hf import convert_tensors, hf_model_config
from fdistill_jax.convert.hf_export import export_hf, hf_config_dict, hf_tensors
from fdistill_jax.convert.params import TensorSource, assemble
from fdistill_jax.data.tokenizers import HFTokenizer, load_tokenizer
from tests import _tiny_chat as chat

rng = np.random.default_rng(0)
INPUTS = rng.integers(3, 200, (2, 5)).astype(np.int32)
TARGETS = rng.integers(3, 200, (2, 6)).astype(np.int32)


@pytest.fixture(scope="module")
def tok_spec(tmp_path_factory):
  return chat.write_chat_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tok_spec):
  return chat.tiny_llama(load_tokenizer(tok_spec).vocab_size)


def _logits(m):
  mask = np.ones_like(INPUTS, np.float32)
  return np.asarray(
    models.forward(m, INPUTS, mask, TARGETS, np.ones_like(TARGETS, np.float32)).logits
  )


def _model_from_hf_arrays(model, arrays):
  """The project model built from HF-named arrays (the HF import path, not the GGUF one)."""
  hf = hf_config_dict(model.config)
  config = hf_model_config(hf, "reference", **_keep(model.config))
  flat = convert_tensors(TensorSource.from_arrays(arrays, "reference"), hf, config)
  return assemble(config, flat, "reference")


def _arch(cfg):
  names = "family vocab_size d_model num_heads kv_heads dim_per_head d_ff num_layers pad_id"
  names += " eos_id norm_eps tie_embeddings rope_theta attention_bias activation"
  out = {n: getattr(cfg, n) for n in names.split()}
  out["norm_eps"] = np.float32(out["norm_eps"])  # GGUF stores float32
  return out


def _keep(cfg):
  return dict(max_positions=cfg.max_positions)


def _q8_0_reference(w):
  """Q8_0 as llama.cpp's reference quantiser defines it, in float64.

  Blocks of 32 along rows; d = max|w| / 127; q = round(w / d) with that d;
  the stored scale is float16(d). Returns (dequantised w, d, float16(d)).
  """
  blocks = w.astype(np.float64).reshape(*w.shape[:-1], -1, 32)
  d = np.abs(blocks).max(-1, keepdims=True) / 127
  q = np.round(np.divide(blocks, d, out=np.zeros_like(blocks), where=d > 0))
  d16 = d.astype(np.float16).astype(np.float64)
  full = lambda x: np.broadcast_to(x, blocks.shape).reshape(w.shape)  # noqa: E731
  return (q * d16).reshape(w.shape), full(d), full(d16)


def test_permute_is_the_inverse_of_the_import_unpermute():
  w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
  np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(w, 3), 3), w)
  # Head 0 in llama.cpp order: rows 0, 4, 1, 5, ... of HF's.
  np.testing.assert_array_equal(permute_rope_rows(w, 3)[:4, 0], w[[0, 4, 1, 5], 0])


def test_f32_gguf_reloads_identical_logits_and_tokenizer(tmp_path, model, tok_spec):
  path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok_spec, dtype="f32")
  back, cfg = load_gguf(path)
  assert _arch(cfg) == _arch(model.config)
  np.testing.assert_array_equal(_logits(back), _logits(model))
  # The gguf package's reader sees llama.cpp's layout and metadata.
  reader = gguf.GGUFReader(path)
  field = lambda k: reader.fields[k].contents()  # noqa: E731
  assert field("general.architecture") == "llama"
  assert field("llama.block_count") == 2 and field("llama.attention.head_count_kv") == 2
  assert field("tokenizer.ggml.pre") == "smollm" and field("tokenizer.ggml.eos_token_id") == 2
  assert "<|im_start|>" in field("tokenizer.chat_template")
  types = {t.name: t.tensor_type for t in reader.tensors}
  assert set(types.values()) == {gguf.GGMLQuantizationType.F32}
  assert "output.weight" in types  # untied head
  # The library's GGUF tokenizer reads back the same tokenization.
  hf_tok, gguf_tok = load_tokenizer(tok_spec), load_tokenizer({"kind": "gguf", "path": path})
  for text in chat.CHAT_TEXTS:
    assert gguf_tok.encode(text) == hf_tok.encode(text)
  assert (gguf_tok.eos_id, gguf_tok.pad_id, gguf_tok.bos_id) == (chat.EOS, chat.PAD, chat.BOS)


def test_gguf_tokenizer_metadata_is_copied_from_a_gguf_source(tmp_path, model, tok_spec):
  first = export_gguf(model, tmp_path / "a.gguf", tokenizer=tok_spec)
  second = export_gguf(model, tmp_path / "b.gguf", tokenizer={"kind": "gguf", "path": first})
  a, b = gguf.GGUFReader(first).fields, gguf.GGUFReader(second).fields
  keys = sorted(k for k in a if k.startswith("tokenizer."))
  assert keys == sorted(k for k in b if k.startswith("tokenizer."))
  for k in keys:
    assert a[k].contents() == b[k].contents(), k


def test_f16_gguf_matches_the_f16_rounded_model(tmp_path, model, tok_spec):
  path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok_spec, dtype="f16")
  types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
  assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
  assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
  arrays = {
    k: v.astype(np.float16).astype(np.float32) if v.ndim == 2 else v
    for k, v in hf_tensors(model, "float32").items()
  }
  back, _ = load_gguf(path)
  np.testing.assert_allclose(
    _logits(back), _logits(_model_from_hf_arrays(model, arrays)), atol=1e-6
  )
  assert np.abs(_logits(back) - _logits(model)).max() > 0  # the rounding is really there


def test_q8_0_gguf_is_within_its_quantisation_error(tmp_path, model, tok_spec):
  path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok_spec, dtype="q8_0")
  reader = gguf.GGUFReader(path)
  types = {t.name: t.tensor_type for t in reader.tensors}
  assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
  assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
  assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
  original = hf_tensors(model, "float32")
  back, _ = load_gguf(path)
  back_tensors = hf_tensors(back, "float32")
  reference = {}
  for name, w in original.items():
    if w.ndim == 2:
      rounded, d, d16 = _q8_0_reference(w)
      # |q * d16 - w| <= |q * d - w| + |q| |d16 - d| <= d / 2 + 127 |d16 - d|
      # (|q| <= 127 since |w| <= max|w|); float32 arithmetic adds ulps.
      bound = d / 2 + 127 * np.abs(d16 - d) + 1e-6 * np.abs(w)
      err = np.abs(back_tensors[name].astype(np.float64) - w)
      assert np.all(err <= bound), name
      # That bound is at most (1/2 + 127 * 2^-11) d: half a step and 6 %.
      assert np.all(bound <= (0.5 + 127 * 2.0**-11) * d + 1e-6 * np.abs(w) + 1e-12)
      reference[name] = rounded.astype(np.float32)
    else:
      reference[name] = w
  np.testing.assert_allclose(
    _logits(back), _logits(_model_from_hf_arrays(model, reference)), atol=1e-5
  )
  assert np.abs(_logits(back) - _logits(model)).max() > 0


def test_hf_export_is_a_complete_folder(tmp_path, model, tok_spec):
  folder = export_hf(model, tmp_path / "hf", tokenizer=tok_spec)
  names = set(os.listdir(folder))
  assert {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
  } <= names
  config = json.load(open(os.path.join(folder, "config.json")))
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
  generation = json.load(open(os.path.join(folder, "generation_config.json")))
  assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
  tok_cfg = json.load(open(os.path.join(folder, "tokenizer_config.json")))
  assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
  )
  assert tok_cfg["chat_template"].startswith("{% for message in messages %}")
  back, _ = load_hf(folder)
  np.testing.assert_array_equal(_logits(back), _logits(model))
  # The folder's tokenizer, with nothing but its own files, reads the same ids.
  reread, source = HFTokenizer(folder), load_tokenizer(tok_spec)
  assert (reread.eos_id, reread.pad_id, reread.bos_id) == (2, 0, 1)
  for text in chat.CHAT_TEXTS:
    assert reread.encode(text) == source.encode(text)


def test_hf_export_bfloat16(tmp_path, model, tok_spec):
  folder = export_hf(model, tmp_path / "hf", dtype="bfloat16", tokenizer=tok_spec)
  assert json.load(open(os.path.join(folder, "config.json")))["torch_dtype"] == "bfloat16"
  back, _ = load_hf(folder)
  arrays = {
    k: np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32))
    for k, v in hf_tensors(model, "float32").items()
  }
  np.testing.assert_allclose(
    _logits(back), _logits(_model_from_hf_arrays(model, arrays)), atol=1e-6
  )


def test_exports_refuse_what_they_cannot_write(tmp_path, model, tok_spec):
  gpt2 = models.build_model(models.get_preset("gpt2-tiny"), rngs=0)
  with pytest.raises(ConversionError, match="only LLaMA-family.*gpt2"):
    export_gguf(gpt2, tmp_path / "g.gguf")
  with pytest.raises(ConversionError, match=r"dtype='q4_0' is not one of"):
    export_gguf(model, tmp_path / "m.gguf", dtype="q4_0")
  with pytest.raises(ConversionError, match="word vocabulary"):
    export_hf(model, tmp_path / "w", tokenizer={"kind": "word"})
  small = chat.tiny_llama(64)
  with pytest.raises(ConversionError, match="tokenizer has .* ids, the model's embedding only 64"):
    export_gguf(small, tmp_path / "s.gguf", tokenizer=tok_spec)
  # A pre-tokenizer llama.cpp has no name for is refused, naming it.
  odd = chat.write_chat_tokenizer(tmp_path / "odd", digits=False)
  spec = json.load(open(os.path.join(odd["path"], "tokenizer.json")))
  spec["pre_tokenizer"] = {"type": "Whitespace"}
  json.dump(spec, open(os.path.join(odd["path"], "tokenizer.json"), "w"))
  with pytest.raises(ConversionError, match="Whitespace"):
    export_gguf(model, tmp_path / "o.gguf", tokenizer=odd)
  assert not os.path.exists(tmp_path / "o.gguf")


@pytest.mark.skipif(
  importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None,
  reason="dev-only: needs transformers and torch (pip install -r requirements-dev.txt); "
  "checks that transformers loads the HF export and computes the same logits",
)
def test_transformers_loads_the_export(tmp_path, model, tok_spec):
  import torch
  import transformers

  folder = export_hf(model, tmp_path / "hf", tokenizer=tok_spec)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
  ids = np.concatenate([INPUTS, TARGETS], axis=1)
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  # logits[:, t] of the project's forward predicts targets[:, t]: HF's position S - 1 + t.
  np.testing.assert_allclose(_logits(model), ref[:, INPUTS.shape[1] - 1 : -1], atol=1e-4)
  text = chat.CHAT_TEXTS[0]
  assert hf_tok(text, add_special_tokens=False)["input_ids"] == load_tokenizer(tok_spec).encode(
    text
  )
  rendered = hf_tok.apply_chat_template(
    [{"role": "user", "content": "hello there"}], tokenize=False, add_generation_prompt=True
  )
  assert rendered == text
  out = hf_model.generate(torch.tensor(ids[:1]), max_new_tokens=3, do_sample=False)
  assert out.shape[1] <= ids.shape[1] + 3


def test_hf_export_of_a_sentencepiece_tokenizer(tmp_path):
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(chat.CORPUS),
    model_writer=buf,
    vocab_size=40,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
  )
  (tmp_path / "sp.model").write_bytes(buf.getvalue())
  spec = {"kind": "sentencepiece", "path": str(tmp_path / "sp.model")}
  tok = load_tokenizer(spec)
  for family, name in (("t5-tiny", "spiece.model"), ("llama-tiny", "tokenizer.model")):
    m = models.build_model(models.get_preset(family, vocab_size=tok.vocab_size, eos_id=1), rngs=0)
    folder = export_hf(m, tmp_path / family, tokenizer=spec)
    assert (tmp_path / family / name).read_bytes() == buf.getvalue()
    tok_cfg = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    assert (tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("</s>", "<pad>")
  # The library finds the LLaMA-style file again.
  reread = load_tokenizer(convert.tokenizer_spec({"path": str(tmp_path / "llama-tiny")}))
  assert reread.encode("hello there") == tok.encode("hello there")
  with pytest.raises(ConversionError, match="SentencePiece tokenizers are not written to GGUF"):
    export_gguf(m, tmp_path / "sp.gguf", tokenizer=spec)

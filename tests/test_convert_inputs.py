"""Damaged or unusual model files: errors name the file; asymmetric BART stacks load exactly."""

import json
import math
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fdistill_jax.convert import ConversionError, load_hf
from fdistill_jax.models import forward

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


def _copy(name, tmp_path):
  folder = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), folder)
  return folder


def _edit_config(folder, fn):
  path = folder / "config.json"
  config = json.loads(path.read_text())
  fn(config)
  path.write_text(json.dumps(config))


# ---------------------------------------------------------------------------
# Errors that name the file.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_safetensors_is_named(tmp_path, damage):
  folder = _copy("gpt2", tmp_path)
  path = folder / "model.safetensors"
  data = path.read_bytes()
  rng = np.random.default_rng(0)
  path.write_bytes(data[: len(data) // 2] if damage == "truncated" else rng.bytes(4096))
  with pytest.raises(ConversionError) as e:
    load_hf(folder)
  message = str(e.value)
  assert message.startswith(f"{path}: not a readable safetensors file")
  assert "SafetensorError" in message


def test_config_missing_a_key_is_named(tmp_path):
  folder = _copy("llama", tmp_path)
  _edit_config(folder, lambda c: c.pop("hidden_size"))
  with pytest.raises(ConversionError) as e:
    load_hf(folder)
  assert str(e.value).startswith(f"{folder / 'config.json'}: key 'hidden_size' is missing")


def test_malformed_config_json_is_named(tmp_path):
  folder = _copy("t5", tmp_path)
  (folder / "config.json").write_text('{"model_type": "t5",\n  "d_model": }')
  with pytest.raises(ConversionError) as e:
    load_hf(folder)
  assert str(e.value).startswith(f"{folder / 'config.json'}: not valid JSON")
  assert "line 2" in str(e.value)


@pytest.mark.parametrize("eos", [96, 50256, -1])
def test_eos_outside_the_vocabulary_is_refused(tmp_path, eos):
  folder = _copy("gpt2", tmp_path)  # vocab_size 96
  _edit_config(folder, lambda c: c.update(eos_token_id=eos))
  with pytest.raises(ConversionError) as e:
    load_hf(folder)
  assert str(e.value).startswith(
    f"{folder / 'config.json'}: eos_token_id {eos} is outside the vocabulary [0, vocab_size=96)"
  )


# ---------------------------------------------------------------------------
# Asymmetric BART: checked against an independent float64 numpy BART.
# ---------------------------------------------------------------------------


def _layer_norm(x, t, name):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * t[f"{name}.weight"] + t[f"{name}.bias"]


def _linear(x, t, name):
  return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]


def _attention(x, kv, t, name, heads, mask):
  """HF BartAttention: x [B, Tq, D], kv [B, Tk, D], mask [B, Tq, Tk] (1 = attend)."""
  b, tq, d = x.shape
  dh = d // heads

  def split(y):
    return y.reshape(b, -1, heads, dh).transpose(0, 2, 1, 3)

  q = split(_linear(x, t, f"{name}.q_proj")) * dh**-0.5
  k, v = split(_linear(kv, t, f"{name}.k_proj")), split(_linear(kv, t, f"{name}.v_proj"))
  scores = q @ k.transpose(0, 1, 3, 2) + np.where(mask[:, None] > 0, 0.0, -1e9)
  scores = np.exp(scores - scores.max(-1, keepdims=True))
  out = (scores / scores.sum(-1, keepdims=True)) @ v
  return _linear(out.transpose(0, 2, 1, 3).reshape(b, tq, d), t, f"{name}.out_proj")


def _gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _ffn(x, t, name):
  return _linear(_gelu(_linear(x, t, f"{name}.fc1")), t, f"{name}.fc2")


def bart_logits(t, hf, inputs, input_mask, targets):
  """float64 BartForConditionalGeneration logits from HF tensor names (post-norm, tied head)."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  emb = t["model.shared.weight"]

  def embed(stack, ids):
    x = emb[ids] + t[f"model.{stack}.embed_positions.weight"][np.arange(ids.shape[1]) + 2]
    return _layer_norm(x, t, f"model.{stack}.layernorm_embedding")

  x = embed("encoder", inputs)
  enc_mask = input_mask[:, None, :] * np.ones((1, inputs.shape[1], 1))
  for i in range(hf["encoder_layers"]):
    p = f"model.encoder.layers.{i}"
    x = x + _attention(x, x, t, f"{p}.self_attn", hf["encoder_attention_heads"], enc_mask)
    x = _layer_norm(x, t, f"{p}.self_attn_layer_norm")
    x = _layer_norm(x + _ffn(x, t, p), t, f"{p}.final_layer_norm")
  start = np.full((targets.shape[0], 1), hf["decoder_start_token_id"])
  y = embed("decoder", np.concatenate([start, targets[:, :-1]], 1))
  n = targets.shape[1]
  causal = np.broadcast_to(np.tril(np.ones((n, n))), (targets.shape[0], n, n))
  cross = input_mask[:, None, :] * np.ones((1, n, 1))
  heads = hf["decoder_attention_heads"]
  for i in range(hf["decoder_layers"]):
    p = f"model.decoder.layers.{i}"
    y = _layer_norm(
      y + _attention(y, y, t, f"{p}.self_attn", heads, causal), t, f"{p}.self_attn_layer_norm"
    )
    y = y + _attention(y, x, t, f"{p}.encoder_attn", heads, cross)
    y = _layer_norm(y, t, f"{p}.encoder_attn_layer_norm")
    y = _layer_norm(y + _ffn(y, t, p), t, f"{p}.final_layer_norm")
  return y @ emb.T + t["final_logits_bias"][0]


def test_numpy_bart_reproduces_the_pytorch_reference():
  """The reference below is right: on the symmetric fixture it matches transformers' logits."""
  folder = os.path.join(FIXTURES, "bart")
  ref = dict(np.load(os.path.join(folder, "reference.npz")))
  hf = json.load(open(os.path.join(folder, "config.json")))
  tensors = load_file(os.path.join(folder, "model.safetensors"))
  got = bart_logits(tensors, hf, ref["inputs"], ref["input_mask"], ref["targets"])
  diff = np.abs(got - ref["logits"]) * ref["target_mask"][..., None]
  assert diff.max() < 1e-4


def _asymmetric_bart(tmp_path):
  """The BART fixture with 2 encoder heads (head width 16) and a 48-wide encoder FFN."""
  folder = _copy("bart", tmp_path)
  tensors = load_file(str(folder / "model.safetensors"))
  rng = np.random.default_rng(3)
  for name in list(tensors):
    if ".encoder.layers." in name and (".fc1." in name or ".fc2." in name):
      shape = tensors[name].shape
      new = tuple(48 if s == 64 else s for s in shape)
      tensors[name] = (rng.normal(size=new) * 0.1).astype(np.float32)
  save_file(tensors, str(folder / "model.safetensors"))
  _edit_config(folder, lambda c: c.update(encoder_attention_heads=2, encoder_ffn_dim=48))
  return folder


def test_bart_with_asymmetric_stacks_loads_and_matches_float64(tmp_path):
  folder = _asymmetric_bart(tmp_path)
  model, config = load_hf(folder)
  assert (config.num_heads, config.d_ff) == (4, 64)
  assert (config.encoder_num_heads, config.encoder_d_ff) == (2, 48)
  ref = dict(np.load(os.path.join(FIXTURES, "bart", "reference.npz")))
  hf = json.loads((folder / "config.json").read_text())
  tensors = load_file(str(folder / "model.safetensors"))
  want = bart_logits(tensors, hf, ref["inputs"], ref["input_mask"], ref["targets"])
  got = forward(model, ref["inputs"], ref["input_mask"], ref["targets"], ref["target_mask"]).logits
  diff = np.abs(np.asarray(got, np.float64) - want) * ref["target_mask"][..., None]
  assert diff.max() < 1e-4
  # Two heads of 16, not four of 8: the same tensors read with symmetric heads differ.
  hf_sym = {**hf, "encoder_attention_heads": 4}
  other = bart_logits(tensors, hf_sym, ref["inputs"], ref["input_mask"], ref["targets"])
  assert (np.abs(other - want) * ref["target_mask"][..., None]).max() > 1e-3


def test_asymmetric_bart_exports_and_reloads(tmp_path):
  from fdistill_jax.convert import export_hf

  model, _ = load_hf(_asymmetric_bart(tmp_path))
  out = tmp_path / "exported"
  export_hf(model, str(out))
  hf = json.loads((out / "config.json").read_text())
  assert (hf["encoder_attention_heads"], hf["decoder_attention_heads"]) == (2, 4)
  assert (hf["encoder_ffn_dim"], hf["decoder_ffn_dim"]) == (48, 64)
  reloaded, _ = load_hf(out)
  ref = dict(np.load(os.path.join(FIXTURES, "bart", "reference.npz")))
  args = (ref["inputs"], ref["input_mask"], ref["targets"], ref["target_mask"])
  np.testing.assert_array_equal(forward(reloaded, *args).logits, forward(model, *args).logits)

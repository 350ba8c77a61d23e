"""Builds the Hugging Face parity fixtures in tests/fixtures/hf/ (development only).

Each fixture is a tiny randomly initialised Hugging Face model saved the way
`save_pretrained` saves real checkpoints (`config.json` + `model.safetensors`),
plus `reference.npz`: a fixed batch and the float32 logits that PyTorch
computes for it. `tests/test_convert.py` loads the folders without torch and
checks that the project's models reproduce those logits.

Needs torch and transformers, which the library never imports; run it in the
development venv:

  python3 -m venv .venv-dev && . .venv-dev/bin/activate \
    && pip install -r requirements-dev.txt \
    && python tests/make_fixtures.py

`python tests/make_fixtures.py --check-export DIR/t5 DIR/llama ...` instead
loads folders that `fdistill_jax.convert.export_hf` wrote from the fixtures
and checks that transformers computes the reference logits from them.

reference.npz holds, in the batch layout of docs/internals.md:
  inputs [B, S] int32, input_mask [B, S] float32 (source, or decoder-only prompt)
  targets [B, T] int32, target_mask [B, T] float32
  logits [B, T, V] float32: logits[:, t] predicts targets[:, t]
Rows of a decoder-only batch are computed one by one without padding, so a
right-padded prompt is checked against what the unpadded model says.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import safetensors.torch
import torch
import transformers as tf

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures", "hf")

VOCAB = 96
D = 32
HEADS = 4
FF = 64
LAYERS = 2
B, S, T = 2, 7, 6


def _perturb(model: torch.nn.Module, seed: int):
  """Random values everywhere, so a swapped or missed tensor changes the logits.

  Default initialisation leaves norms at 1 and biases at 0, which would hide
  a converter that drops them. BART's `final_logits_bias` buffer stays zero,
  as in published checkpoints (the converter refuses a nonzero one).
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1 and ("norm" in name or "ln_" in name):
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim == 1:
        p.copy_(0.2 * noise)
      elif "relative_attention_bias" in name:
        p.copy_(0.5 * noise)
      else:
        p.copy_(0.25 * noise)


def _batch(rng, pad_id, eos_id, lo, prompt_lengths=(S, S - 2), target_lengths=(T, T - 2)):
  """Fixed source/target ids; row 1 is shorter and right-padded."""
  inputs = np.full((B, S), pad_id, np.int32)
  targets = np.full((B, T), pad_id, np.int32)
  input_mask = np.zeros((B, S), np.float32)
  target_mask = np.zeros((B, T), np.float32)
  for b in range(B):
    s, t = prompt_lengths[b], target_lengths[b]
    inputs[b, :s] = rng.integers(lo, VOCAB, s)
    targets[b, : t - 1] = rng.integers(lo, VOCAB, t - 1)
    targets[b, t - 1] = eos_id
    input_mask[b, :s] = 1
    target_mask[b, :t] = 1
  return inputs, input_mask, targets, target_mask


def _save(name, model, inputs, input_mask, targets, target_mask, logits, *, untie_lm_head=False):
  path = os.path.join(OUT, name)
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path)
  if untie_lm_head:
    # transformers 5 always ties T5's head, but published T5 v1.1 checkpoints
    # carry a separate `lm_head.weight` and `tie_word_embeddings: false`;
    # write that layout by hand.
    aliases = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in aliases}
    safetensors.torch.save_file(state, os.path.join(path, "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["tie_word_embeddings"] = False
    cfg.pop("scale_decoder_outputs", None)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(cfg, f, indent=2, sort_keys=True)
  else:
    model.save_pretrained(path)
  for extra in os.listdir(path):
    if extra not in ("config.json", "model.safetensors"):
      os.remove(os.path.join(path, extra))
  np.savez(
    os.path.join(path, "reference.npz"),
    inputs=inputs,
    input_mask=input_mask,
    targets=targets,
    target_mask=target_mask,
    logits=logits.astype(np.float32),
  )
  size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
  print(f"{name}: {size / 1024:.0f} KiB, logits {logits.shape}")


def _seq2seq_logits(model, inputs, input_mask, targets, start_id):
  """Teacher-forced logits [B, T, V]: decoder input is `targets` shifted right."""
  dec_in = np.concatenate([np.full((B, 1), start_id, np.int32), targets[:, :-1]], axis=1)
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(inputs).long(),
      attention_mask=torch.from_numpy(input_mask).long(),
      decoder_input_ids=torch.from_numpy(dec_in).long(),
    )
  return out.logits.numpy()


def _decoder_only_logits(model, inputs, input_mask, targets, target_mask):
  """Logits [B, T, V] for prompt + targets, each row run alone without padding."""
  logits = np.zeros((B, T, VOCAB), np.float32)
  for b in range(B):
    s, t = int(input_mask[b].sum()), int(target_mask[b].sum())
    ids = np.concatenate([inputs[b, :s], targets[b, :t]])[None]
    with torch.no_grad():
      out = model(input_ids=torch.from_numpy(ids).long()).logits.numpy()[0]
    logits[b, :t] = out[s - 1 : s - 1 + t]
  return logits


def make_t5(name, seed, untie=False, **kw):
  cfg = tf.T5Config(
    vocab_size=VOCAB,
    d_model=D,
    d_kv=D // HEADS,
    d_ff=FF,
    num_layers=LAYERS,
    num_decoder_layers=LAYERS,
    num_heads=HEADS,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    **kw,
  )
  torch.manual_seed(seed)
  model = tf.T5ForConditionalGeneration(cfg).eval()
  if untie:
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    model.config.scale_decoder_outputs = False
  _perturb(model, seed)
  batch = _batch(np.random.default_rng(seed), 0, 1, lo=2)
  logits = _seq2seq_logits(model, batch[0], batch[1], batch[2], start_id=0)
  _save(name, model, *batch, logits, untie_lm_head=untie)


def make_bart(name, seed, config_cls, model_cls, **kw):
  cfg = config_cls(
    vocab_size=VOCAB,
    d_model=D,
    encoder_layers=LAYERS,
    decoder_layers=LAYERS,
    encoder_attention_heads=HEADS,
    decoder_attention_heads=HEADS,
    encoder_ffn_dim=FF,
    decoder_ffn_dim=FF,
    max_position_embeddings=32,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    **kw,
  )
  torch.manual_seed(seed)
  model = model_cls(cfg).eval()
  _perturb(model, seed)
  batch = _batch(np.random.default_rng(seed), 1, 2, lo=3)
  logits = _seq2seq_logits(model, batch[0], batch[1], batch[2], start_id=2)
  _save(name, model, *batch, logits)


def make_llama(name, seed, **kw):
  cfg = tf.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=D,
    intermediate_size=FF,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    **kw,
  )
  torch.manual_seed(seed)
  model = tf.LlamaForCausalLM(cfg).eval()
  _perturb(model, seed)
  batch = _batch(np.random.default_rng(seed), 2, 2, lo=3)
  logits = _decoder_only_logits(model, *batch)
  _save(name, model, *batch, logits)


def make_gpt2(name, seed):
  cfg = tf.GPT2Config(
    vocab_size=VOCAB,
    n_positions=32,
    n_embd=D,
    n_layer=LAYERS,
    n_head=HEADS,
    n_inner=FF,
    bos_token_id=VOCAB - 1,
    eos_token_id=VOCAB - 1,
  )
  torch.manual_seed(seed)
  model = tf.GPT2LMHeadModel(cfg).eval()
  _perturb(model, seed)
  batch = _batch(np.random.default_rng(seed), VOCAB - 1, VOCAB - 1, lo=0)
  logits = _decoder_only_logits(model, *batch)
  _save(name, model, *batch, logits)


def check_export(folders):
  """Loads folders written by `fdistill_jax.convert.export_hf` from the fixtures
  (`export_hf(load_hf(tests/fixtures/hf/NAME)[0], DIR/NAME)`) with transformers
  and prints the largest logit difference to the fixture's reference."""
  for folder in folders:
    name = os.path.basename(os.path.normpath(folder))
    ref = np.load(os.path.join(OUT, name, "reference.npz"))
    model = tf.AutoModelForCausalLM if name.startswith(("llama", "gpt2")) else None
    if model is None:
      model = tf.AutoModelForSeq2SeqLM
    model = model.from_pretrained(folder).eval()
    batch = (ref["inputs"], ref["input_mask"], ref["targets"], ref["target_mask"])
    if model.config.is_encoder_decoder:
      logits = _seq2seq_logits(model, *batch[:3], model.config.decoder_start_token_id)
    else:
      logits = _decoder_only_logits(model, *batch)
    err = np.abs(logits - ref["logits"]) * ref["target_mask"][..., None]
    print(f"{name}: max |logits - reference| = {err.max():.3g}")


def main():
  if sys.argv[1:2] == ["--check-export"]:
    check_export(sys.argv[2:])
    return
  torch.set_default_dtype(torch.float32)
  os.makedirs(OUT, exist_ok=True)
  make_t5("t5", 1, feed_forward_proj="relu")
  make_t5("t5_v1_1", 2, untie=True, feed_forward_proj="gated-gelu")
  # As transformers 5 saves v1.1: tied, with `scale_decoder_outputs: false`.
  make_t5("t5_v1_1_tf5", 8, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  make_bart("bart", 3, tf.BartConfig, tf.BartForConditionalGeneration)
  make_bart("mbart", 4, tf.MBartConfig, tf.MBartForConditionalGeneration, scale_embedding=True)
  make_llama("llama", 5, tie_word_embeddings=False, rope_theta=500.0)
  make_llama("llama_tied", 6, tie_word_embeddings=True)
  make_gpt2("gpt2", 7)


if __name__ == "__main__":
  main()

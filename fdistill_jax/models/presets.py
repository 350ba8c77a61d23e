"""Named model configurations: tiny ones for tests, and real checkpoint sizes.

`get_preset(name, **overrides)` returns an `ml_collections.ConfigDict` that
`ModelConfig.from_config` (or `build_model`) accepts, so experiment configs
can start from a preset and override fields (`--config.model.d_model=...`).
The real sizes match the Hugging Face configs of the checkpoints they name.
"""

from __future__ import annotations

import ml_collections

_TINY = dict(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=2, max_positions=128)
# What the checkpoints of one family share (vocabulary, positions, special ids).
_T5 = dict(family="t5", vocab_size=32128)
_BART = dict(family="bart", vocab_size=50265, max_positions=1024, pad_id=1, eos_id=2)
_GPT2 = dict(family="gpt2", vocab_size=50257, max_positions=1024, eos_id=50256, pad_id=50256)

PRESETS: dict[str, dict] = {
  # Tiny test models (every family and variant).
  "t5-tiny": dict(
    _TINY, family="t5", relative_attention_num_buckets=8, relative_attention_max_distance=16
  ),
  "t5v1.1-tiny": dict(
    _TINY,
    family="t5",
    mlp_activation="gated-gelu",
    tie_embeddings=False,
    head_dim=16,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
  ),
  "bart-tiny": dict(_TINY, family="bart", pad_id=1, eos_id=2),
  "mbart-tiny": dict(
    _TINY, family="bart", pad_id=1, eos_id=2, normalize_before=True, scale_embedding=True
  ),
  "llama-tiny": dict(_TINY, family="llama", num_kv_heads=2, tie_embeddings=False, eos_id=2),
  "gpt2-tiny": dict(_TINY, family="gpt2", eos_id=63, pad_id=63),
  # Benchmark sizes (bench/decoding.py).
  "t5-bench": dict(_T5, d_model=256, num_heads=4, d_ff=1024, num_layers=4),
  "llama-bench": dict(
    family="llama",
    vocab_size=32128,
    d_model=256,
    num_heads=4,
    num_kv_heads=2,
    d_ff=768,
    num_layers=8,
    tie_embeddings=False,
    eos_id=2,
  ),
  # Real checkpoint sizes.
  "t5-small": dict(_T5, d_model=512, num_heads=8, head_dim=64, d_ff=2048, num_layers=6),
  "t5-base": dict(_T5, d_model=768, num_heads=12, head_dim=64, d_ff=3072, num_layers=12),
  "t5v1.1-small": dict(
    _T5,
    d_model=512,
    num_heads=6,
    head_dim=64,
    d_ff=1024,
    num_layers=8,
    mlp_activation="gated-gelu",
    tie_embeddings=False,
  ),
  "bart-base": dict(_BART, d_model=768, num_heads=12, d_ff=3072, num_layers=6),
  "bart-large": dict(_BART, d_model=1024, num_heads=16, d_ff=4096, num_layers=12),
  "mbart-large": dict(
    _BART,
    vocab_size=250027,
    d_model=1024,
    num_heads=16,
    d_ff=4096,
    num_layers=12,
    normalize_before=True,
    scale_embedding=True,
  ),
  "gpt2": dict(_GPT2, d_model=768, num_heads=12, d_ff=3072, num_layers=12),
  "gpt2-medium": dict(_GPT2, d_model=1024, num_heads=16, d_ff=4096, num_layers=24),
  # TinyLlama-1.1B shape (LLaMA-2 architecture, grouped-query attention).
  "llama-1b": dict(
    family="llama",
    vocab_size=32000,
    d_model=2048,
    num_heads=32,
    num_kv_heads=4,
    d_ff=5632,
    num_layers=22,
    tie_embeddings=False,
    layer_norm_eps=1e-5,
    pad_id=0,
    eos_id=2,
  ),
}


def get_preset(name: str, **overrides) -> ml_collections.ConfigDict:
  """The preset `name` as a ConfigDict, with `overrides` applied."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
  values = dict(PRESETS[name])
  values.update(overrides)
  return ml_collections.ConfigDict(values)

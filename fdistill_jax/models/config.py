"""`ModelConfig`: the frozen description of one transformer, built from a ConfigDict.

One dataclass covers the four families; each family reads the fields it needs
and ignores the rest (e.g. `rope_theta` only matters for LLaMA). The defaults
are those of the reference implementations (Hugging Face configs), so a
config only lists what differs from its family's usual values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

ENCODER_DECODER = ("t5", "bart")
DECODER_ONLY = ("llama", "gpt2")
FAMILIES = ENCODER_DECODER + DECODER_ONLY


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes, special ids and per-family switches of one model."""

  family: str  # one of FAMILIES
  vocab_size: int  # rows of the token embedding
  d_model: int = 64  # residual stream width D
  num_heads: int = 4  # query heads
  num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: num_heads
  head_dim: int | None = None  # per-head width; None: d_model // num_heads
  d_ff: int = 128  # MLP hidden width
  num_layers: int = 2  # decoder layers (decoder-only: all layers)
  num_encoder_layers: int | None = None  # encoder layers; None: num_layers
  encoder_num_heads: int | None = None  # encoder attention heads; None: num_heads (BART may differ)
  encoder_d_ff: int | None = None  # encoder MLP width; None: d_ff (BART may differ)
  pad_id: int = 0  # padding token
  eos_id: int = 1  # end-of-sequence token
  decoder_start_id: int | None = None  # enc-dec decoder start; None: pad (T5) / eos (BART)
  max_positions: int = 1024  # learned position table size (BART, GPT-2); RoPE/T5 ignore it
  dtype: str = "float32"  # activation dtype (e.g. "bfloat16"); logits are always float32
  param_dtype: str = "float32"  # parameter dtype
  layer_norm_eps: float | None = None  # None: 1e-6 (T5, LLaMA) / 1e-5 (BART, GPT-2)
  tie_embeddings: bool = True  # output head reuses the token embedding
  dropout_rate: float = 0.0  # residual/embedding dropout, only where forward gets a dropout_rng
  remat: bool = False  # recompute each layer's activations in the backward pass (saves memory)
  # T5
  mlp_activation: str | None = (
    None  # "relu", "gated-gelu", "swiglu", "gelu", "gelu_new"; None: family default
  )
  relative_attention_num_buckets: int = 32  # T5 relative position buckets
  relative_attention_max_distance: int = 128  # T5 bucket saturation distance
  # BART / mBART
  scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model)
  normalize_before: bool = False  # mBART: pre-norm layers plus final layer norms
  # LLaMA
  rope_theta: float = 10000.0  # RoPE base
  attention_bias: bool = False  # q/k/v/o biases (LLaMA-style models that have them)

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"ModelConfig.family: expected one of {FAMILIES}, found {self.family!r}")
    if self.num_heads % self.kv_heads:
      raise ValueError(
        f"ModelConfig: num_heads ({self.num_heads}) must be a multiple of "
        f"num_kv_heads ({self.kv_heads})"
      )
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
        f"ModelConfig: d_model ({self.d_model}) is not divisible by num_heads "
        f"({self.num_heads}); set head_dim explicitly"
      )
    if self.activation not in ("relu", "gated-gelu", "swiglu", "gelu", "gelu_new"):
      raise ValueError(f"ModelConfig.mlp_activation: unknown {self.mlp_activation!r}")
    if not self.is_encoder_decoder and (self.encoder_num_heads or self.encoder_d_ff):
      raise ValueError(
        f"ModelConfig: encoder_num_heads / encoder_d_ff are for encoder-decoder families, "
        f"found them set for {self.family!r}"
      )
    if self.encoder_num_heads and self.head_dim is None and self.d_model % self.encoder_num_heads:
      raise ValueError(
        f"ModelConfig: d_model ({self.d_model}) is not divisible by encoder_num_heads "
        f"({self.encoder_num_heads}); set head_dim explicitly"
      )
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"ModelConfig.{name}: not a dtype: {getattr(self, name)!r}") from e

  @classmethod
  def from_config(cls, cfg: Any) -> ModelConfig:
    """Builds from an `ml_collections.ConfigDict` (or a mapping); unknown keys raise."""
    if isinstance(cfg, ModelConfig):
      return cfg
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(
        f"model config: unknown keys {unknown}; expected a subset of {sorted(known)}"
      )
    return cls(**values)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  @property
  def is_encoder_decoder(self) -> bool:
    return self.family in ENCODER_DECODER

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def encoder_layers(self) -> int:
    return self.num_layers if self.num_encoder_layers is None else self.num_encoder_layers

  @property
  def encoder_config(self) -> ModelConfig:
    """This config as the encoder's layers see it: its heads and MLP width."""
    if self.encoder_num_heads is None and self.encoder_d_ff is None:
      return self
    return self.replace(
      num_heads=self.encoder_num_heads or self.num_heads,
      d_ff=self.encoder_d_ff or self.d_ff,
      encoder_num_heads=None,
      encoder_d_ff=None,
    )

  @property
  def activation(self) -> str:
    default = {"t5": "relu", "bart": "gelu", "llama": "swiglu", "gpt2": "gelu_new"}
    return self.mlp_activation or default[self.family]

  @property
  def norm_eps(self) -> float:
    if self.layer_norm_eps is not None:
      return self.layer_norm_eps
    return 1e-6 if self.family in ("t5", "llama") else 1e-5

  @property
  def start_id(self) -> int:
    if self.decoder_start_id is not None:
      return self.decoder_start_id
    return self.eos_id if self.family == "bart" else self.pad_id

  @property
  def act_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

"""Layers shared by the encoder-decoder and decoder-only transformers.

Parameters are `nnx.Param`s whose `out_sharding` metadata holds logical axis
names (`embed`, `mlp`, `heads`, `kv`, `vocab`, or None); `fdistill_jax.sharding`
maps them to mesh axes. Eager sharding is off, so building a model needs no
mesh. Kernels are stored `[in..., out...]` (the transpose of a PyTorch Linear
weight), attention kernels split their head axis out: query/key/value
`[embed, heads, head_dim]`, out `[heads, head_dim, embed]`.

Activations run in `config.dtype`; norms, softmax and logits in float32.
Masks are multiplicative float weights; attention turns them into an additive
bias once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fdistill_jax.models.config import ModelConfig

NEG_INF = -1e9  # finite, so rows with no visible key stay finite (uniform) instead of NaN


class ModelOutput(NamedTuple):
  logits: jax.Array  # [B, T, V] float32
  hidden: jax.Array  # [B, T, D] final normed decoder states read by the output head
  layer_hidden: tuple[jax.Array, ...]  # num_layers x [B, T, D], each block's output


class Dropout:
  """Functional dropout for one forward pass: each call draws from its own folded key.

  `Dropout(None, rate)` (or rate 0) is the identity, the default everywhere:
  teachers and scoring are deterministic. Calls happen in a fixed order at
  trace time, so the same `rng` gives the same masks.
  """

  def __init__(self, rng, rate: float):
    self.rng = rng if rate > 0 else None
    self.rate = rate
    self.calls = 0

  def __call__(self, x):
    if self.rng is None:
      return x
    self.calls += 1
    keep = jax.random.bernoulli(jax.random.fold_in(self.rng, self.calls), 1.0 - self.rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))


NO_DROPOUT = Dropout(None, 0.0)


def param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
  """An `nnx.Param` annotated with logical axis names (one per dimension)."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(
    init(rngs.params(), shape, dtype), out_sharding=tuple(axes), eager_sharding=False
  )


def normal(stddev):
  return jax.nn.initializers.normal(stddev)


class Dense(nnx.Module):
  """`y = x @ kernel + bias` contracting the last `len(in_shape)` axes of x."""

  def __init__(self, in_shape, out_shape, axes, cfg: ModelConfig, rngs: nnx.Rngs, use_bias=False):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    fan_in = math.prod(in_shape)
    init = jax.nn.initializers.normal(fan_in**-0.5)
    self.kernel = param(rngs, init, in_shape + out_shape, axes, cfg.weight_dtype)
    self.bias = (
      param(rngs, jax.nn.initializers.zeros, out_shape, axes[len(in_shape) :], cfg.weight_dtype)
      if use_bias
      else None
    )
    self.n_in = len(in_shape)
    self.dtype = cfg.act_dtype

  def __call__(self, x):
    y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), axes=self.n_in)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Lookup table `embedding [num, features]` (token or learned-position embedding)."""

  def __init__(self, num, features, axes, cfg: ModelConfig, rngs: nnx.Rngs, stddev=0.02):
    self.embedding = param(rngs, normal(stddev), (num, features), axes, cfg.weight_dtype)
    self.dtype = cfg.act_dtype

  def __call__(self, ids):
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class Norm(nnx.Module):
  """RMSNorm (`scale` only: T5, LLaMA) or LayerNorm (`scale`, `bias`: BART, GPT-2)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rms: bool):
    d = cfg.d_model
    self.scale = param(rngs, jax.nn.initializers.ones, (d,), ("embed",), cfg.weight_dtype)
    self.bias = (
      None if rms else param(rngs, jax.nn.initializers.zeros, (d,), ("embed",), cfg.weight_dtype)
    )
    self.eps = cfg.norm_eps
    self.dtype = cfg.act_dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    if self.bias is None:
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
      y = y * self.scale[...].astype(jnp.float32)
    else:
      mean = jnp.mean(x32, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
      y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
      y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


_ACTIVATIONS = {
  "relu": jax.nn.relu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gated-gelu": lambda x: jax.nn.gelu(x, approximate=True),
  "swiglu": jax.nn.silu,
}


class MLP(nnx.Module):
  """`wo(act(wi x))`, or gated `wo(act(wi_0 x) * wi_1 x)` for gated-gelu / swiglu."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, use_bias: bool):
    d, f = cfg.d_model, cfg.d_ff
    self.gated = cfg.activation in ("gated-gelu", "swiglu")
    if self.gated:
      self.wi_0 = Dense((d,), (f,), ("embed", "mlp"), cfg, rngs, use_bias)
      self.wi_1 = Dense((d,), (f,), ("embed", "mlp"), cfg, rngs, use_bias)
    else:
      self.wi = Dense((d,), (f,), ("embed", "mlp"), cfg, rngs, use_bias)
    self.wo = Dense((f,), (d,), ("mlp", "embed"), cfg, rngs, use_bias)
    self.act = _ACTIVATIONS[cfg.activation]

  def __call__(self, x):
    h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
    return self.wo(h)


class Attention(nnx.Module):
  """Multi-head attention with grouped-query heads; projections only, no mask logic."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, use_bias: bool, scale_queries: bool):
    d, h, kvh, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    self.query = Dense((d,), (h, dh), ("embed", "heads", "kv"), cfg, rngs, use_bias)
    self.key = Dense((d,), (kvh, dh), ("embed", "heads", "kv"), cfg, rngs, use_bias)
    self.value = Dense((d,), (kvh, dh), ("embed", "heads", "kv"), cfg, rngs, use_bias)
    self.out = Dense((h, dh), (d,), ("heads", "kv", "embed"), cfg, rngs, use_bias)
    # T5 folds 1/sqrt(head_dim) into its initialisation, so its logits are unscaled.
    self.scale = dh**-0.5 if scale_queries else 1.0
    self.groups = h // kvh
    self.dtype = cfg.act_dtype

  def attend(self, q, k, v, bias, heads_major=False):
    """q [B, Lq, H, Dh], k/v [B, Lk, KVH, Dh] (or [B, KVH, Lk, Dh] when `heads_major`,
    the cache layout), bias [B|1, H|1, Lq, Lk] -> [B, Lq, D]."""
    b, lq, h, dh = q.shape
    kvh = k.shape[1 if heads_major else 2]
    kv = "bktd" if heads_major else "btkd"
    q = q.reshape(b, lq, kvh, self.groups, dh) * jnp.asarray(self.scale, q.dtype)
    logits = jnp.einsum(f"bqkgd,{kv}->bkgqt", q, k, preferred_element_type=jnp.float32)
    if bias.shape[1] == 1:
      bias = bias[:, :, None]
    else:
      bias = bias.reshape(bias.shape[0], kvh, self.groups, *bias.shape[2:])
    probs = jax.nn.softmax(logits + bias, axis=-1).astype(self.dtype)
    out = jnp.einsum(f"bkgqt,{kv}->bqkgd", probs, v).reshape(b, lq, h, dh)
    return self.out(out)


def mask_bias(key_mask):
  """[B, Lk] multiplicative key mask -> [B, 1, 1, Lk] additive float32 bias."""
  return ((1.0 - key_mask.astype(jnp.float32)) * NEG_INF)[:, None, None, :]


def causal_bias(q_slots, k_slots, key_mask):
  """Bias letting query slot i see key slots j <= i that are in `key_mask`.

  q_slots [Lq] int, k_slots [Lk] int, key_mask [B, Lk] -> [B, 1, Lq, Lk] float32.
  """
  visible = (k_slots[None, :] <= q_slots[:, None]).astype(jnp.float32)
  visible = visible[None] * key_mask.astype(jnp.float32)[:, None, :]
  return ((1.0 - visible) * NEG_INF)[:, None]


def cache_bias(index, length: int, kv_mask):
  """Bias for `length` queries at cache slots index + [0, length) over a cache.

  Query i sees the written slots (`kv_mask`) up to its own slot. index [B] int,
  kv_mask [B, Lc] -> [B, 1, length, Lc] float32.
  """
  q_slots = index[:, None] + jnp.arange(length, dtype=jnp.int32)[None]  # [B, L]
  k_slots = jnp.arange(kv_mask.shape[1], dtype=jnp.int32)
  visible = (k_slots[None, None, :] <= q_slots[:, :, None]).astype(jnp.float32)
  visible = visible * kv_mask.astype(jnp.float32)[:, None, :]
  return ((1.0 - visible) * NEG_INF)[:, None]


def written_mask(kv_mask, index, length: int):
  """kv_mask [B, Lc] with slots index + [0, length) marked written."""
  slots = jnp.arange(kv_mask.shape[1], dtype=jnp.int32)[None]
  new = (slots >= index[:, None]) & (slots < index[:, None] + length)
  return jnp.maximum(kv_mask, new.astype(jnp.float32))


def forget_after(kv_mask, index):
  """kv_mask [B, Lc] with every slot >= index [B] unmarked (a rewound cache)."""
  slots = jnp.arange(kv_mask.shape[1], dtype=jnp.int32)[None]
  return kv_mask * (slots < index[:, None]).astype(kv_mask.dtype)


def rope(x, positions, theta):
  """Rotary embedding, Hugging Face "rotate_half" layout: x [B, L, H, Dh], positions [B, L]."""
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : dh // 2], x32[..., dh // 2 :]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class RelativeBias(nnx.Module):
  """T5 bucketed relative position bias, `embedding [num_buckets, heads]`."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, bidirectional: bool):
    self.num_buckets = cfg.relative_attention_num_buckets
    self.max_distance = cfg.relative_attention_max_distance
    self.bidirectional = bidirectional
    self.embedding = param(
      rngs, normal(1.0), (self.num_buckets, cfg.num_heads), (None, "heads"), cfg.weight_dtype
    )

  def bucket(self, relative):
    """relative = key_pos - query_pos (int) -> bucket ids, as in Mesh TensorFlow / HF T5."""
    n = self.num_buckets
    buckets = jnp.zeros_like(relative)
    if self.bidirectional:
      n //= 2
      buckets = buckets + (relative > 0).astype(relative.dtype) * n
      distance = jnp.abs(relative)
    else:
      distance = -jnp.minimum(relative, 0)
    max_exact = n // 2
    # log of 0 is avoided: those distances take the exact branch anyway.
    large = max_exact + (
      jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
      / math.log(self.max_distance / max_exact)
      * (n - max_exact)
    ).astype(relative.dtype)
    large = jnp.minimum(large, n - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)

  def __call__(self, q_pos, k_pos):
    """q_pos [B, Lq], k_pos [B, Lk] -> [B, H, Lq, Lk] float32."""
    ids = self.bucket(k_pos[:, None, :] - q_pos[:, :, None])
    values = jnp.take(self.embedding[...].astype(jnp.float32), ids, axis=0)  # [B, Lq, Lk, H]
    return jnp.transpose(values, (0, 3, 1, 2))


def check_positions(cfg: ModelConfig, needed: int, where: str):
  """Learned position tables (BART, GPT-2) cannot index past `max_positions`: fail early."""
  if cfg.family in ("bart", "gpt2") and needed > cfg.max_positions:
    raise ValueError(
      f"{where}: up to {needed} positions needed but {cfg.family} has max_positions="
      f"{cfg.max_positions}; shorten the sequences"
    )


def run_layer(layer: nnx.Module, x, remat: bool, *args):
  """`layer(x, *args)`, rematerialised in the backward pass when `remat` (training only).

  The other arguments are closed over, so they may be any Python objects.
  """
  if not remat:
    return layer(x, *args)
  return nnx.remat(lambda mod, h: mod(h, *args))(layer, x)


def write_cache(cache, new, index):
  """Writes new [B, L, KVH, Dh] into cache [B, KVH, Lc, Dh] at per-row slot index [B]."""

  def one(c, n, i):
    return jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), i, axis=1)

  return jax.vmap(one)(cache, jnp.swapaxes(new, 1, 2), index)


def self_attention(attn: Attention, x, bias, cache=None, index=None, positions=None, theta=None):
  """Self-attention over x [B, L, D], optionally through a KV cache.

  Without a cache the keys are x itself; with one, x's keys/values are written
  at slot `index` [B] of `cache = {"k", "v"}` ([B, KVH, Lc, Dh]) and the
  queries attend over all Lc slots (bias [B, 1|H, L, Lc] hides unwritten ones).
  RoPE is applied to queries and keys at `positions` [B, L] when `theta` is set.
  Returns (out [B, L, D], new cache or None).
  """
  q, k, v = attn.query(x), attn.key(x), attn.value(x)
  if theta is not None:
    q, k = rope(q, positions, theta), rope(k, positions, theta)
  if cache is None:
    return attn.attend(q, k, v, bias), None
  cache = {"k": write_cache(cache["k"], k, index), "v": write_cache(cache["v"], v, index)}
  return attn.attend(q, cache["k"], cache["v"], bias, heads_major=True), cache


def empty_cache(cfg: ModelConfig, batch: int, length: int):
  """Zeroed {"k", "v"} [B, KVH, length, Dh] in the activation dtype.

  Heads before slots: attention reads each head's keys and values as one
  contiguous [length, Dh] block, so no step transposes the cache."""
  shape = (batch, cfg.kv_heads, length, cfg.dim_per_head)
  return {"k": jnp.zeros(shape, cfg.act_dtype), "v": jnp.zeros(shape, cfg.act_dtype)}


def logits_from_hidden(hidden, kernel, scale):
  """hidden [..., D] @ kernel [D, V] * scale -> float32 logits [..., V]."""
  h = hidden * jnp.asarray(scale, hidden.dtype) if scale != 1.0 else hidden
  return jnp.einsum(
    "...d,dv->...v", h, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32
  )

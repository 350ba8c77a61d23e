"""Encoder-decoder transformer: T5 / T5 v1.1 and BART / mBART as configurations.

Parameter tree (`nnx.state(model, nnx.Param)`; kernels `[in..., out...]`,
see `layers.py`; `L` runs over layers):

  embed.embedding                        [V, D]   shared token embedding
  lm_head.kernel                         [D, V]   only when tie_embeddings=False
  {encoder,decoder}.layers.L.self_attn.{query,key,value}.kernel  [D, H, Dh]
  {encoder,decoder}.layers.L.self_attn.out.kernel                [H, Dh, D]
  decoder.layers.L.cross_attn.{query,key,value,out}.kernel       (as self_attn)
  {encoder,decoder}.layers.L.mlp.{wi | wi_0, wi_1}.kernel        [D, F]
  {encoder,decoder}.layers.L.mlp.wo.kernel                       [F, D]
  (the encoder's H and F are `encoder_num_heads` / `encoder_d_ff` when set:
  BART checkpoints may give the two stacks different heads and MLP widths)
  {encoder,decoder}.layers.L.{attn_norm, cross_norm, mlp_norm}.scale (+ .bias) [D]
  {encoder,decoder}.final_norm.scale (+ .bias)   T5, mBART (normalize_before)
  T5:   {encoder,decoder}.rel_bias.embedding    [num_buckets, H]
        (HF: block.0.layer.0.SelfAttention.relative_attention_bias, shared by all layers)
  BART: {encoder,decoder}.positions.embedding  [max_positions + 2, D]
        (HF table as is, offset rows included), {encoder,decoder}.embed_norm.{scale,bias}
        (layernorm_embedding); biases `.bias` on every Dense (attention bias [H, Dh]).

HF mapping notes: T5 `layer[0].layer_norm` -> attn_norm, decoder `layer[1]` ->
cross_norm, last `layer_norm` -> mlp_norm; BART `self_attn_layer_norm` ->
attn_norm, `encoder_attn_layer_norm` -> cross_norm, `final_layer_norm` ->
mlp_norm, `encoder.layer_norm` -> final_norm. BART's `final_logits_bias` has
no slot: it is a zero buffer in HF checkpoints (a converter should check).

T5 is pre-norm with RMSNorm, no biases, unscaled attention logits, relative
position buckets, and (tied head) decoder output scaled by d_model**-0.5 before
the head. BART is post-norm (mBART pre-norm with final norms) with LayerNorm,
learned positions offset by 2, and optional sqrt(d_model) embedding scale.
The decoder starts from `config.start_id` (T5: pad, BART: eos).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from fdistill_jax.models import layers as L
from fdistill_jax.models.config import ModelConfig

BART_POSITION_OFFSET = 2  # HF BartLearnedPositionalEmbedding reserves two rows


def _residual(x, fn, norm, pre_norm, drop):
  return x + drop(fn(norm(x))) if pre_norm else norm(x + drop(fn(x)))


class EncoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    t5 = cfg.family == "t5"
    self.pre_norm = t5 or cfg.normalize_before
    self.self_attn = L.Attention(cfg, rngs, use_bias=not t5, scale_queries=not t5)
    self.attn_norm = L.Norm(cfg, rngs, rms=t5)
    self.mlp = L.MLP(cfg, rngs, use_bias=not t5)
    self.mlp_norm = L.Norm(cfg, rngs, rms=t5)

  def __call__(self, x, bias, drop=L.NO_DROPOUT):
    x = _residual(
      x,
      lambda h: L.self_attention(self.self_attn, h, bias)[0],
      self.attn_norm,
      self.pre_norm,
      drop,
    )
    return _residual(x, self.mlp, self.mlp_norm, self.pre_norm, drop)


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    t5 = cfg.family == "t5"
    self.pre_norm = t5 or cfg.normalize_before
    self.self_attn = L.Attention(cfg, rngs, use_bias=not t5, scale_queries=not t5)
    self.attn_norm = L.Norm(cfg, rngs, rms=t5)
    self.cross_attn = L.Attention(cfg, rngs, use_bias=not t5, scale_queries=not t5)
    self.cross_norm = L.Norm(cfg, rngs, rms=t5)
    self.mlp = L.MLP(cfg, rngs, use_bias=not t5)
    self.mlp_norm = L.Norm(cfg, rngs, rms=t5)

  def __call__(self, x, self_bias, cross_kv, cross_bias, cache=None, index=None, drop=L.NO_DROPOUT):
    new_cache = None

    def self_attn(h):
      nonlocal new_cache
      out, new_cache = L.self_attention(self.self_attn, h, self_bias, cache, index)
      return out

    def cross_attn(h):
      return self.cross_attn.attend(
        self.cross_attn.query(h), cross_kv["k"], cross_kv["v"], cross_bias
      )

    x = _residual(x, self_attn, self.attn_norm, self.pre_norm, drop)
    x = _residual(x, cross_attn, self.cross_norm, self.pre_norm, drop)
    return _residual(x, self.mlp, self.mlp_norm, self.pre_norm, drop), new_cache


class Stack(nnx.Module):
  """The encoder or the decoder: position handling, layers and final norm."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, decoder: bool):
    t5 = cfg.family == "t5"
    n = cfg.num_layers if decoder else cfg.encoder_layers
    layer = DecoderLayer if decoder else EncoderLayer
    self.layers = nnx.List([layer(cfg, rngs) for _ in range(n)])
    if t5:
      self.rel_bias = L.RelativeBias(cfg, rngs, bidirectional=not decoder)
    else:
      self.positions = L.Embed(
        cfg.max_positions + BART_POSITION_OFFSET, cfg.d_model, (None, "embed"), cfg, rngs
      )
      self.embed_norm = L.Norm(cfg, rngs, rms=False)
    self.final_norm = L.Norm(cfg, rngs, rms=t5) if t5 or cfg.normalize_before else None


class EncoderDecoder(nnx.Module):
  """T5 / BART encoder-decoder. Use through the functions in `models.api`."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.config = cfg
    self.t5 = cfg.family == "t5"
    stddev = 1.0 if self.t5 else 0.02
    self.embed = L.Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), cfg, rngs, stddev)
    self.encoder = Stack(cfg.encoder_config, rngs, decoder=False)
    self.decoder = Stack(cfg, rngs, decoder=True)
    self.lm_head = (
      None
      if cfg.tie_embeddings
      else L.Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), cfg, rngs)
    )

  # -- pieces --------------------------------------------------------------

  def _embed(self, stack: Stack, ids, positions, drop=L.NO_DROPOUT):
    """ids, positions [B, L] -> [B, L, D]."""
    x = self.embed(ids)
    if self.config.scale_embedding:
      x = x * jnp.asarray(self.config.d_model**0.5, x.dtype)
    if not self.t5:
      x = stack.embed_norm(x + stack.positions(positions + BART_POSITION_OFFSET))
    return drop(x)

  def encode(self, inputs, input_mask, drop=L.NO_DROPOUT):
    """inputs [B, S] int, input_mask [B, S] -> encoder states [B, S, D]."""
    b, s = inputs.shape
    L.check_positions(self.config, s, "encoder inputs")
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x = self._embed(self.encoder, inputs, pos, drop)
    bias = L.mask_bias(input_mask)
    if self.t5:
      bias = bias + self.encoder.rel_bias(pos[:1], pos[:1])
    for layer in self.encoder.layers:
      x = L.run_layer(layer, x, self.config.remat, bias, drop)
    x = self.encoder.final_norm(x) if self.encoder.final_norm is not None else x
    return drop(x) if self.t5 else x

  def cross_kv(self, encoded):
    """Per decoder layer {"k", "v"} [B, S, KVH, Dh] of the encoder states."""
    return tuple(
      {"k": layer.cross_attn.key(encoded), "v": layer.cross_attn.value(encoded)}
      for layer in self.decoder.layers
    )

  def _decode(
    self, ids, positions, self_bias, cross, cross_bias, caches=None, index=None, drop=L.NO_DROPOUT
  ):
    """Decoder over ids [B, L]: -> (hidden [B, L, D], layer outputs, new caches)."""
    x = self._embed(self.decoder, ids, positions, drop)
    outs, new_caches = [], []
    for i, layer in enumerate(self.decoder.layers):
      cache = None if caches is None else caches[i]
      remat = self.config.remat and cache is None
      x, cache = L.run_layer(layer, x, remat, self_bias, cross[i], cross_bias, cache, index, drop)
      outs.append(x)
      new_caches.append(cache)
    hidden = self.decoder.final_norm(x) if self.decoder.final_norm is not None else x
    hidden = drop(hidden) if self.t5 else hidden
    return hidden, tuple(outs), tuple(new_caches)

  def decode_teacher_forced(self, targets, cross, cross_bias, drop=L.NO_DROPOUT):
    """The decoder half of `forward`, the encoder already run: targets [B, T],
    cross = `cross_kv(encoded)`, cross_bias = `mask_bias(input_mask)` ->
    (hidden [B, T, D] where hidden[:, t] predicts targets[:, t], layer outputs)."""
    b, t = targets.shape
    start = jnp.full((b, 1), self.config.start_id, targets.dtype)
    ids = jnp.concatenate([start, targets[:, :-1]], axis=1)
    slots = jnp.arange(t, dtype=jnp.int32)
    pos = jnp.broadcast_to(slots, (b, t))
    bias = L.causal_bias(slots, slots, jnp.ones((1, t), jnp.float32))
    if self.t5:
      bias = bias + self.decoder.rel_bias(pos[:1], pos[:1])
    hidden, layer_hidden, _ = self._decode(ids, pos, bias, cross, cross_bias, drop=drop)
    return hidden, layer_hidden

  def head(self):
    """(kernel [D, V], scale): logits = scale * hidden @ kernel."""
    if self.lm_head is not None:
      return self.lm_head.kernel[...], 1.0
    scale = self.config.d_model**-0.5 if self.t5 else 1.0
    return self.embed.embedding[...].T, scale

  # -- the functional API ---------------------------------------------------

  def forward(
    self, inputs, input_mask, targets, target_mask=None, dropout_rng=None, with_logits=True
  ):
    """Teacher-forced pass; see `models.api.forward`."""
    del target_mask  # causal masking already hides everything after a position
    t = targets.shape[1]
    L.check_positions(self.config, t, "decoder targets")
    drop = L.Dropout(dropout_rng, self.config.dropout_rate)
    encoded = self.encode(inputs, input_mask, drop)
    hidden, layer_hidden = self.decode_teacher_forced(
      targets, self.cross_kv(encoded), L.mask_bias(input_mask), drop
    )
    logits = L.logits_from_hidden(hidden, *self.head()) if with_logits else None
    return L.ModelOutput(logits, hidden, layer_hidden)

  def init_decode_state(self, inputs, input_mask, max_len: int):
    """Encodes the source and allocates a `max_len`-slot self-attention cache."""
    b = inputs.shape[0]
    L.check_positions(self.config, max_len, "decoding max_len")
    encoded = self.encode(inputs, input_mask)
    return {
      "cache": tuple(L.empty_cache(self.config, b, max_len) for _ in self.decoder.layers),
      "cross": self.cross_kv(encoded),  # encoder output projected once per layer
      "cross_mask": input_mask.astype(jnp.float32),  # [B, S]
      "kv_mask": jnp.zeros((b, max_len), jnp.float32),  # 1 on written cache slots
      "index": jnp.zeros((b,), jnp.int32),  # next cache slot = decoder position
    }

  def decode_step(self, state, tokens):
    """tokens [B] -> (logits [B, V] float32, new state)."""
    logits, state = self.extend(state, tokens[:, None])
    return logits[:, 0], state

  def extend(self, state, tokens):
    """tokens [B, L] fed at once -> (logits [B, L, V] float32, new state), as L decode_steps."""
    index = state["index"]
    n = tokens.shape[1]
    lc = state["kv_mask"].shape[1]
    kv_mask = L.written_mask(state["kv_mask"], index, n)
    pos = index[:, None] + jnp.arange(n, dtype=jnp.int32)[None]  # [B, L]
    bias = L.cache_bias(index, n, kv_mask)
    if self.t5:
      bias = bias + self.decoder.rel_bias(pos, jnp.arange(lc, dtype=jnp.int32)[None])
    hidden, _, caches = self._decode(
      tokens,
      pos,
      bias,
      state["cross"],
      L.mask_bias(state["cross_mask"]),
      state["cache"],
      index,
    )
    logits = L.logits_from_hidden(hidden, *self.head())
    return logits, dict(state, cache=caches, kv_mask=kv_mask, index=index + n)

  def rewind(self, state, num):
    """Forgets the last num [B] tokens fed to each row."""
    index = state["index"] - num
    return dict(state, kv_mask=L.forget_after(state["kv_mask"], index), index=index)

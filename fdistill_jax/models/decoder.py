"""Decoder-only transformer: LLaMA and GPT-2 as configurations.

Parameter tree (`nnx.state(model, nnx.Param)`; kernels `[in..., out...]`,
see `layers.py`; `L` runs over layers):

  embed.embedding                              [V, D]   (HF wte / embed_tokens)
  positions.embedding                          [max_positions, D]   GPT-2 only (wpe)
  layers.L.attn_norm.scale (+ .bias)           [D]      (input_layernorm / ln_1)
  layers.L.self_attn.{query,key,value}.kernel  [D, H|KVH, Dh]  (GPT-2: split c_attn)
  layers.L.self_attn.out.kernel                [H, Dh, D]      (o_proj / attn.c_proj)
  layers.L.mlp_norm.scale (+ .bias)            [D]      (post_attention_layernorm / ln_2)
  layers.L.mlp.{wi_0, wi_1}.kernel             [D, F]   LLaMA gate_proj, up_proj
  layers.L.mlp.wi.kernel                       [D, F]   GPT-2 c_fc
  layers.L.mlp.wo.kernel                       [F, D]   (down_proj / mlp.c_proj)
  final_norm.scale (+ .bias)                   [D]      (norm / ln_f)
  lm_head.kernel                               [D, V]   only when tie_embeddings=False

GPT-2 has biases on every Dense (attention biases [H, Dh]); LLaMA only with
`attention_bias` (q/k/v/o). GPT-2's Conv1D weights are already [in, out].
RoPE uses HF's rotate-half layout, so HF q/k weights need no permutation.

Prompts: `inputs` may be padded on either side (`input_mask` marks the real
tokens, which must be contiguous and at least one per row). Positions count
real tokens only (cumsum of the mask), so padding never shifts a row. The
last real prompt token is held back from the prefill: it is what the first
`decode_step` is fed (see `start_tokens`), which makes the cached path and the
teacher-forced `forward` run the very same computation. The cache holds
S + max_len slots; padded prompt slots stay masked.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from fdistill_jax.models import layers as L
from fdistill_jax.models.config import ModelConfig


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    llama = cfg.family == "llama"
    bias = cfg.attention_bias if llama else True
    self.attn_norm = L.Norm(cfg, rngs, rms=llama)
    self.self_attn = L.Attention(cfg, rngs, use_bias=bias, scale_queries=True)
    self.mlp_norm = L.Norm(cfg, rngs, rms=llama)
    self.mlp = L.MLP(cfg, rngs, use_bias=not llama)
    self.theta = cfg.rope_theta if llama else None

  def __call__(self, x, bias, positions, cache=None, index=None, drop=L.NO_DROPOUT):
    h, cache = L.self_attention(
      self.self_attn, self.attn_norm(x), bias, cache, index, positions, self.theta
    )
    x = x + drop(h)
    return x + drop(self.mlp(self.mlp_norm(x))), cache


def split_prompt(inputs, input_mask):
  """Separates each prompt's last real token from its context.

  inputs, input_mask [B, S] -> (context_mask [B, S] float32, last token [B],
  its position [B]), whatever side the padding is on.
  """
  mask = input_mask.astype(jnp.float32)
  slots = jnp.arange(inputs.shape[1], dtype=jnp.int32)
  last_slot = jnp.max(jnp.where(mask > 0, slots, -1), axis=1)  # -1 only for an empty prompt
  last_slot = jnp.maximum(last_slot, 0)
  last_token = jnp.take_along_axis(inputs, last_slot[:, None], axis=1)[:, 0]
  context_mask = mask * (slots[None, :] != last_slot[:, None])
  last_pos = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
  return context_mask, last_token, last_pos


class DecoderOnly(nnx.Module):
  """LLaMA / GPT-2 decoder. Use through the functions in `models.api`."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.config = cfg
    llama = cfg.family == "llama"
    self.embed = L.Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), cfg, rngs)
    self.positions = (
      None if llama else L.Embed(cfg.max_positions, cfg.d_model, (None, "embed"), cfg, rngs)
    )
    self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = L.Norm(cfg, rngs, rms=llama)
    self.lm_head = (
      None
      if cfg.tie_embeddings
      else L.Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), cfg, rngs)
    )

  def _run(self, ids, positions, bias, caches=None, index=None, drop=L.NO_DROPOUT):
    """ids, positions [B, L] -> (hidden [B, L, D], layer outputs, new caches)."""
    x = self.embed(ids)
    if self.positions is not None:
      x = x + self.positions(positions)
    x = drop(x)
    outs, new_caches = [], []
    for i, layer in enumerate(self.layers):
      cache = None if caches is None else caches[i]
      remat = self.config.remat and cache is None
      x, cache = L.run_layer(layer, x, remat, bias, positions, cache, index, drop)
      outs.append(x)
      new_caches.append(cache)
    return self.final_norm(x), tuple(outs), tuple(new_caches)

  def head(self):
    """(kernel [D, V], scale): logits = scale * hidden @ kernel."""
    if self.lm_head is not None:
      return self.lm_head.kernel[...], 1.0
    return self.embed.embedding[...].T, 1.0

  def start_tokens(self, inputs, input_mask):
    """The token the first `decode_step` is fed: each prompt's last real token [B]."""
    return split_prompt(inputs, input_mask)[1]

  @staticmethod
  def _context_positions(context_mask):
    return jnp.maximum(jnp.cumsum(context_mask, axis=1).astype(jnp.int32) - 1, 0)

  def forward(
    self, inputs, input_mask, targets, target_mask=None, dropout_rng=None, with_logits=True
  ):
    """Teacher-forced pass over [context | last prompt token, targets[:-1]]."""
    del target_mask  # causal masking already hides everything after a position
    s, t = inputs.shape[1], targets.shape[1]
    L.check_positions(self.config, s + t - 1, "prompt + targets")
    context_mask, last_token, last_pos = split_prompt(inputs, input_mask)
    ids = jnp.concatenate([inputs, last_token[:, None], targets[:, :-1]], axis=1)
    positions = jnp.concatenate(
      [
        self._context_positions(context_mask),
        last_pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None],
      ],
      axis=1,
    )
    key_mask = jnp.concatenate([context_mask, jnp.ones_like(targets, jnp.float32)], axis=1)
    slots = jnp.arange(s + t, dtype=jnp.int32)
    drop = L.Dropout(dropout_rng, self.config.dropout_rate)
    hidden, layer_hidden, _ = self._run(
      ids, positions, L.causal_bias(slots, slots, key_mask), drop=drop
    )
    hidden = hidden[:, s:]
    layer_hidden = tuple(h[:, s:] for h in layer_hidden)
    logits = L.logits_from_hidden(hidden, *self.head()) if with_logits else None
    return L.ModelOutput(logits, hidden, layer_hidden)

  def init_decode_state(self, inputs, input_mask, max_len: int):
    """Prefills the prompt context into a cache of S + max_len slots."""
    b, s = inputs.shape
    L.check_positions(self.config, s + max_len - 1, "prompt + decoding max_len")
    context_mask, _, last_pos = split_prompt(inputs, input_mask)
    kv_mask = jnp.concatenate([context_mask, jnp.zeros((b, max_len), jnp.float32)], axis=1)
    caches = tuple(L.empty_cache(self.config, b, s + max_len) for _ in self.layers)
    bias = L.causal_bias(
      jnp.arange(s, dtype=jnp.int32), jnp.arange(s + max_len, dtype=jnp.int32), kv_mask
    )
    zeros = jnp.zeros((b,), jnp.int32)
    _, _, caches = self._run(inputs, self._context_positions(context_mask), bias, caches, zeros)
    return {
      "cache": caches,
      "kv_mask": kv_mask,  # [B, S + max_len], 1 on real, written slots
      "index": jnp.full((b,), s, jnp.int32),  # next cache slot
      "pos": last_pos,  # [B] position id of the next fed token
    }

  def decode_step(self, state, tokens):
    """tokens [B] -> (logits [B, V] float32, new state)."""
    logits, state = self.extend(state, tokens[:, None])
    return logits[:, 0], state

  def extend(self, state, tokens):
    """tokens [B, L] fed at once -> (logits [B, L, V] float32, new state), as L decode_steps."""
    index, pos = state["index"], state["pos"]
    n = tokens.shape[1]
    kv_mask = L.written_mask(state["kv_mask"], index, n)
    positions = pos[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
    hidden, _, caches = self._run(
      tokens, positions, L.cache_bias(index, n, kv_mask), state["cache"], index
    )
    logits = L.logits_from_hidden(hidden, *self.head())
    return logits, dict(state, cache=caches, kv_mask=kv_mask, index=index + n, pos=pos + n)

  def rewind(self, state, num):
    """Forgets the last num [B] tokens fed to each row."""
    index = state["index"] - num
    kv_mask = L.forget_after(state["kv_mask"], index)
    return dict(state, kv_mask=kv_mask, index=index, pos=state["pos"] - num)

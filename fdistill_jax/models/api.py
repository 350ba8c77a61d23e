"""The functional model API every other module uses (see docs/internals.md "Models").

All functions take the `nnx.Module` from `build_model`; inside `jax.jit` pass
`(graphdef, state)` from `nnx.split(model)` and `nnx.merge` them first.
Nothing here mutates the model, so merged copies are safe to discard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fdistill_jax import sharding
from fdistill_jax.models.config import ModelConfig
from fdistill_jax.models.decoder import DecoderOnly
from fdistill_jax.models.encdec import EncoderDecoder
from fdistill_jax.models.layers import ModelOutput

Model = EncoderDecoder | DecoderOnly


def build_model(config, rngs: nnx.Rngs | int = 0) -> Model:
  """A randomly initialised model for `config` (a `ModelConfig` or a ConfigDict)."""
  cfg = ModelConfig.from_config(config)
  if isinstance(rngs, int):
    rngs = nnx.Rngs(params=rngs)
  return EncoderDecoder(cfg, rngs) if cfg.is_encoder_decoder else DecoderOnly(cfg, rngs)


def forward(
  model: Model,
  inputs,
  input_mask,
  targets,
  target_mask=None,
  *,
  dropout_rng=None,
  with_logits: bool = True,
) -> ModelOutput:
  """Teacher-forced pass.

  inputs [B, S] int, input_mask [B, S], targets [B, T] int (no start token),
  target_mask [B, T] (unused by the model; causal masking suffices) ->
  ModelOutput(logits [B, T, V] float32 where logits[:, t] predicts
  targets[:, t], hidden [B, T, D], layer_hidden num_layers x [B, T, D]).
  dropout_rng: a PRNG key turns on dropout at `config.dropout_rate` (training
  only; None, the default, is deterministic). with_logits=False skips the
  output head (logits None), for losses that fuse the head (`output_head`).
  """
  return model.forward(
    inputs, input_mask, targets, target_mask, dropout_rng=dropout_rng, with_logits=with_logits
  )


def output_head(model: Model):
  """(W [D, V], scale) with logits = scale * hidden @ W (float32 accumulation)."""
  return model.head()


def output_head_as_stored(model: Model):
  """(W, scale, layout): the output head as its parameter is stored, for a loss
  that differentiates it (`fused_head`'s head_layout): "dv" with W [D, V] (an
  untied lm_head), "vd" with W [V, D] (the tied embedding, = `output_head`'s
  W transposed), so its gradient needs no transpose of a [V, D] array."""
  w, scale = model.head()
  if model.lm_head is None:
    return model.embed.embedding[...], scale, "vd"
  return w, scale, "dv"


def score(model: Model, inputs, input_mask, targets, target_mask):
  """Per-token log-probs [B, T] float32 of `targets` (0 where target_mask is 0)."""
  logits = forward(model, inputs, input_mask, targets, target_mask).logits
  logp = jax.nn.log_softmax(logits, axis=-1)
  token_logp = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return token_logp * target_mask.astype(jnp.float32)


def start_tokens(model: Model, inputs, input_mask):
  """[B] int32 tokens for the first `decode_step`: decoder start id, or last prompt token."""
  if isinstance(model, DecoderOnly):
    return model.start_tokens(inputs, input_mask).astype(jnp.int32)
  return jnp.full((inputs.shape[0],), model.config.start_id, jnp.int32)


def init_decode_state(model: Model, inputs, input_mask, max_len: int):
  """Encodes the source (or prefills the prompt) and allocates a cache for `max_len` steps.

  The state is a dict pytree whose every leaf has the batch on axis 0, so it
  can be repeated or reordered with `jnp.take(leaf, idx, axis=0)`. Enc-dec:
  {cache, cross, cross_mask, kv_mask, index}; decoder-only: {cache, kv_mask,
  index, pos}. `cache` is a tuple over layers of {"k", "v"} [B, slots, KVH, Dh].
  Decoding more than `max_len` steps is not supported (writes would be dropped).
  """
  return model.init_decode_state(inputs, input_mask, max_len)


def decode_step(model: Model, state, tokens):
  """Feeds tokens [B] int32 -> (logits [B, V] float32 for the next token, new state)."""
  return model.decode_step(state, tokens.astype(jnp.int32))


def extend(model: Model, state, tokens):
  """Feeds tokens [B, L] int32 in one cached forward -> (logits [B, L, V] float32, new state).

  Equal to L `decode_step`s (logits[:, i] predicts the token after tokens[:, i])
  but one call, as a speculative verifier needs. The cache must have room:
  `init_decode_state` with a `max_len` covering every slot ever written.
  """
  return model.extend(state, tokens.astype(jnp.int32))


def rewind(model: Model, state, num):
  """Forgets the last num [B] int32 tokens fed to each row (0 <= num <= tokens fed).

  Their cache slots are unmarked and overwritten by the next feeds, so rows
  can be rolled back by different amounts without changing any shape.
  """
  return model.rewind(state, num.astype(jnp.int32))


class SplitModel:
  """A model split for jit: static `graphdef` + `template`, and `params` (pure dict).

  The student (trained) and the teacher (frozen) are both held this way.
  """

  def __init__(self, model: nnx.Module):
    self.graphdef, state = nnx.split(model, nnx.Param)
    self.template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    self.params = nnx.to_pure_dict(state)
    self.config = model.config

  def merge(self, params) -> nnx.Module:
    """The model with `params` (works on tracers inside jit)."""
    state = jax.tree.map(lambda x: x, self.template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def shardings(self, mesh, rules=sharding.DEFAULT_RULES):
    return nnx.to_pure_dict(sharding.named_shardings(self.template, mesh, rules))

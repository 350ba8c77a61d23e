"""What the teacher pass stores for one batch: sample, score, keep top-k and tail.

`teacher_outputs` runs inside the teacher pass's jitted step
(`teacher_pass._step`). Greedy and ancestral sampling score while they
decode: `decoding.sample`'s `per_step` hands each step's temperature-1
log-probs to `topk_and_tail`, so the sampled sequences are not read a second
time. Beam methods, full log-probs and tail samples need the whole sequence
first and read it again teacher-forced (`_rescore`), one sample per input at
a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from fdistill_jax import decoding, divergences, models, sampled_divergences

if TYPE_CHECKING:  # teacher_pass imports this module
  from fdistill_jax.teacher_pass import PassConfig

# (model, inputs [B, S], input_mask [B, S], keys [B] PRNG keys) -> a
# decoding.DecodeResult (tokens [B, N, T], lengths [B, N] are used); runs
# inside jit and is a static argument there, so it must hash by value
# (decoding.ModelSampler does).
Sampler = Callable


def topk_and_tail(logp: jax.Array, k: int):
  """logp [..., V] normalised log-probs -> top-k values, ids [..., K] and tail [...].

  The tail is `divergences.logsumexp_outside` the top-k; -inf when k == V,
  0 (the whole vocabulary) when k == 0.
  """
  if k == 0:
    empty = jnp.zeros((*logp.shape[:-1], 0))
    return empty, empty.astype(jnp.int32), jnp.zeros(logp.shape[:-1])
  values, ids = jax.lax.top_k(logp, k)
  tail = divergences.logsumexp_outside(logp, ids, fill=-jnp.inf)
  return values, ids.astype(jnp.int32), tail


def teacher_outputs(model, pc: PassConfig, sampler: Sampler, inputs, input_mask, indices, key):
  """One batch: inputs [B, S], input_mask [B, S], indices [B] -> record arrays.

  Returns tokens, token_logprobs, tail [B, N, T]; topk_logprobs, topk_ids
  [B, N, T, K]; lengths [B, N]; optionally full_logprobs [B, N, T, V] and
  sample_ids, sample_logprobs (proposal_logprobs) [B, N, T, S].
  Positions past a sequence's length are zero (tokens: pad_id).
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
  if scores_while_decoding(pc, sampler):
    result, (values, ids, tail) = sampler(  # [B, N, T, K] x 2, [B, N, T]
      model, inputs, input_mask, keys, per_step=lambda logp: topk_and_tail(logp, pc.top_k)
    )
    valid = jnp.arange(result.tokens.shape[-1]) < result.lengths[..., None]  # [B, N, T]
    out = dict(
      teacher_token_logprobs=jnp.where(valid, result.token_logprobs, 0.0),
      teacher_topk_logprobs=jnp.where(valid[..., None], values, 0.0),
      teacher_topk_ids=jnp.where(valid[..., None], ids, 0),
      teacher_tail_logmass=jnp.where(valid, tail, 0.0),
    )
  else:
    result = sampler(model, inputs, input_mask, keys)
    valid = jnp.arange(result.tokens.shape[-1]) < result.lengths[..., None]  # [B, N, T]
    out = _rescore(model, pc, inputs, input_mask, result.tokens, valid, indices, key)
  out["teacher_tokens"] = jnp.where(valid, result.tokens, model.config.pad_id).astype(jnp.int32)
  out["teacher_lengths"] = result.lengths.astype(jnp.int32)
  return out


def scores_while_decoding(pc: PassConfig, sampler: Sampler) -> bool:
  """Whether the sampler's own per-step log-probs give every record field: greedy or
  ancestral sampling, top-k form, no full log-probs. The loop's logits are the ones
  a teacher-forced forward computes (the prompt's last token is fed by the first
  step, see models/decoder.py), so the second pass would only repeat them."""
  return (
    isinstance(sampler, decoding.ModelSampler)
    and sampler.method in ("greedy", "sample")
    and not pc.store_full_logprobs
    and not pc.num_tail_samples
  )


def _rescore(model, pc: PassConfig, inputs, input_mask, tokens, valid, indices, key):
  """The record fields of sampled tokens [B, N, T] (`valid` [B, N, T]) from a
  teacher-forced forward, one sample per input at a time."""
  n = tokens.shape[1]
  # Tail draws of (example i, sequence j) use fold_in(fold_in(tail_root, i), j):
  # a stream apart from the sampler's fold_in(key, i), and per-example, so
  # records do not depend on the batch an example lands in.
  tail_root = jax.random.split(key)[1]
  tail_keys = jax.vmap(
    lambda i: jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(tail_root, i), j))(
      jnp.arange(n)
    )
  )(indices)  # [B, N]

  def score_one(args):
    # One sample per input at a time: the [B, T, V] log-probs, not [B, N, T, V].
    toks, mask, sample_keys = args  # [B, T], [B, T], [B]
    logits = models.forward(model, inputs, input_mask, toks, mask.astype(jnp.float32)).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_lp = jnp.take_along_axis(logp, toks[..., None], axis=-1)[..., 0]
    values, ids, tail = topk_and_tail(logp, pc.top_k)
    out = dict(
      teacher_token_logprobs=jnp.where(mask, token_lp, 0.0),
      teacher_topk_logprobs=jnp.where(mask[..., None], values, 0.0),
      teacher_topk_ids=jnp.where(mask[..., None], ids, 0),
      teacher_tail_logmass=jnp.where(mask, tail, 0.0),
    )
    if pc.store_full_logprobs:
      out["teacher_full_logprobs"] = jnp.where(mask[..., None], logp, 0.0)
    if pc.num_tail_samples:
      draw = functools.partial(
        sampled_divergences.draw_tail_samples,
        num_samples=pc.num_tail_samples,
        temperature=pc.proposal_temperature,
      )
      s_ids, s_lp, r_lp = jax.vmap(draw)(logp, ids, sample_keys)
      out["teacher_sample_ids"] = jnp.where(mask[..., None], s_ids, 0)
      out["teacher_sample_logprobs"] = jnp.where(mask[..., None], s_lp, 0.0)
      if pc.proposal_temperature != 1.0:
        out["teacher_proposal_logprobs"] = jnp.where(mask[..., None], r_lp, 0.0)
    return out

  per_sample = jax.lax.map(
    score_one, (tokens.swapaxes(0, 1), valid.swapaxes(0, 1), tail_keys.swapaxes(0, 1))
  )
  return {name: value.swapaxes(0, 1) for name, value in per_sample.items()}

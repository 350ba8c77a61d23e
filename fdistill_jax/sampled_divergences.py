"""Unbiased per-token f-divergences from a sampled teacher cache.

A teacher cache stores, per position, the teacher's top-k log-probs (exact),
S tokens drawn from a proposal r over the rest of the vocabulary (the tail,
everything outside the top-k; with K = 0 the whole vocabulary), and the tail
mass. The student is computed exactly over the full vocabulary. Since

  D_f(p || q) = sum_v g(p_v, q_v),   g(p, q) = q f(p / q),

splitting the sum into the top-k set H and the tail T gives

  D = sum_{v in H} g(p_v, q_v) + c Q_T + E_{v ~ r}[(g(p_v, q_v) - c q_v) / r_v]

with Q_T = sum_{v in T} q_v (exact: the student is known) and any constant c;
here c = f(0) when it is finite and 0 otherwise. The c-terms are a control
variate: g(p, q) - c q is 0 wherever the teacher puts no mass, so the sampled
part only has to cover the teacher's support, and for divergences with a
finite f(0) (JS, TVD, Hellinger, Pearson, alpha in (0, 1], skews) the
importance-weighted terms stay bounded even where the student is much larger
than the teacher. The estimator is

  D_hat = sum_{v in H} g(p_v, q_v) + c Q_T + 1/S sum_s w_s (g(p_s, q_s) - c q_s),
  w_s = 1 / r(v_s),

unbiased for D for i.i.d. draws v_s ~ r whenever r > 0 on the teacher's tail
support. Its gradient in the student is unbiased as well, since the draws do
not depend on the student. The default proposal is the teacher restricted to
the tail, r_v = p_v / P_T (then w_s = P_T / p_s); a tempered proposal is
given by its stored log-probs (normalised over the tail). With S = 0 the
tail falls back to its single bucket g(P_T, Q_T): exactly
`divergences.topk_divergence`, the lower bound. docs/teacher-cache.md has the
derivation and when to pick which form.

Numerics as in `divergences.py`: float32 accumulation, masked (-inf) logits
are finite, importance weights are capped at exp(80) and each weighted term
at 1e34, so values and gradients stay finite with extreme logits.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax import divergences

Array = jax.Array
NEG_INF = divergences.NEG_INF
# Caps that keep a weighted term finite in float32 (see the module docstring).
_LOG_WEIGHT_CAP = 80.0
_TERM_CAP = 1e34


@functools.cache
def _zero_limit_cached(name: str, params: tuple) -> float:
  entry = divergences.get(name)
  with np.errstate(all="ignore"):
    value = float(entry.f(np.asarray(0.0), **{**entry.defaults, **dict(params)}))
  return value if math.isfinite(value) else 0.0


def zero_limit(name: str, **params) -> float:
  """The control-variate constant c: f(0) of the divergence, or 0 when f(0) is infinite."""
  return _zero_limit_cached(name, tuple(sorted(params.items())))


def teacher_side(
  topk_logprobs: Array,
  tail_logmass: Array | None,
  sample_logprobs: Array,
  proposal_logprobs: Array | None = None,
) -> tuple[Array, Array, Array, Array]:
  """The teacher's terms of the estimator, float32, without gradient.

  Args:
    topk_logprobs: `[..., K]` (K may be 0) stored top-k log-probs.
    tail_logmass: `[...]` log tail mass, or None (derived from the top-k).
    sample_logprobs: `[..., S]` teacher log-probs of the drawn tail tokens.
    proposal_logprobs: `[..., S]` log r of each draw, r normalised over the
      tail; None: the teacher restricted to the tail.

  Returns:
    (lp_k [..., K], lp_tail [...], lp_s [..., S], log_w [..., S]): the K + 1
    buckets renormalised as in `divergences.topk_log_probs` (the samples'
    log-probs shifted by the same constant) and the log importance weights.
  """
  lp_k = jnp.maximum(divergences._at_least_f32(topk_logprobs), NEG_INF)
  if tail_logmass is None:
    head = jnp.sum(jnp.exp(lp_k), axis=-1)
    has_tail = head < 1.0 - divergences._MIN_DERIVED_TAIL
    tail_logmass = jnp.where(has_tail, jnp.log1p(-jnp.where(has_tail, head, 0.0)), NEG_INF)
  lp_tail = jnp.maximum(divergences._at_least_f32(tail_logmass), NEG_INF)
  buckets = jnp.concatenate([lp_k, lp_tail[..., None]], axis=-1)
  shift = jax.nn.logsumexp(buckets, axis=-1, keepdims=True)
  lp_k = jnp.maximum(lp_k - shift, NEG_INF)
  lp_tail = jnp.maximum(lp_tail - shift[..., 0], NEG_INF)
  lp_s = jnp.maximum(divergences._at_least_f32(sample_logprobs) - shift, NEG_INF)
  if proposal_logprobs is None:
    log_w = lp_tail[..., None] - lp_s
  else:
    log_w = -jnp.maximum(divergences._at_least_f32(proposal_logprobs), NEG_INF)
  return tuple(jax.lax.stop_gradient(x) for x in (lp_k, lp_tail, lp_s, log_w))


def estimate(
  name: str,
  teacher: tuple[Array, Array, Array, Array],
  student_lp_k: Array,
  student_lp_tail: Array,
  student_lp_s: Array,
  **params,
) -> Array:
  """Per-token D_hat `[...]` from `teacher_side(...)` and the student's log-probs.

  Args:
    teacher: (lp_k [..., K], lp_tail [...], lp_s [..., S], log_w [..., S]).
    student_lp_k: `[..., K]` student log-probs at the top-k ids.
    student_lp_tail: `[...]` log of the student's mass outside the top-k.
    student_lp_s: `[..., S]` student log-probs at the drawn ids.
  """
  lp_k, lp_tail, lp_s, log_w = teacher
  term = functools.partial(divergences.get(name).term, **params)
  num_samples = lp_s.shape[-1]
  if num_samples == 0:
    return jnp.sum(
      term(
        jnp.concatenate([lp_k, lp_tail[..., None]], axis=-1),
        jnp.concatenate([student_lp_k, student_lp_tail[..., None]], axis=-1),
      ),
      axis=-1,
    )
  c = zero_limit(name, **params)
  exact = jnp.sum(term(lp_k, student_lp_k), axis=-1) + c * jnp.exp(student_lp_tail)
  centred = term(lp_s, student_lp_s) - c * jnp.exp(student_lp_s)
  weighted = jnp.exp(jnp.minimum(log_w, _LOG_WEIGHT_CAP)) * centred
  weighted = jnp.clip(weighted, -_TERM_CAP, _TERM_CAP) / num_samples
  # An empty teacher tail (K = V, or all mass in the top-k) has nothing to sample.
  has_tail = (lp_tail > 0.5 * NEG_INF).astype(jnp.float32)
  return exact + has_tail * jnp.sum(weighted, axis=-1)


def sampled_divergence(
  name: str,
  teacher_topk_logprobs: Array,
  teacher_topk_ids: Array,
  student_logits: Array,
  *,
  sample_ids: Array,
  sample_logprobs: Array,
  proposal_logprobs: Array | None = None,
  teacher_tail_logmass: Array | None = None,
  temperature: float = 1.0,
  **params,
) -> Array:
  """Per-token unbiased estimate of D(p || q) `[...]` from a sampled teacher cache.

  Args:
    teacher_topk_logprobs / teacher_topk_ids: `[..., K]` (K = 0 for the
      purely sampled form), as in `divergences.topk_divergence`.
    student_logits: `[..., V]`, softened by `temperature`.
    sample_ids: `[..., S]` int tail tokens drawn i.i.d. from the proposal.
    sample_logprobs: `[..., S]` the teacher's log-probs of those tokens.
    proposal_logprobs: `[..., S]` log-probs of the draws under the proposal
      (normalised over the tail); None: the proposal is the teacher.
    teacher_tail_logmass: `[...]` log tail mass (None: derived). With K = 0 it
      is 0 (the whole vocabulary is the tail).

  Unbiased for the full-vocabulary value; with S = 0 equal to
  `topk_divergence` (a lower bound).
  """
  teacher = teacher_side(
    teacher_topk_logprobs, teacher_tail_logmass, sample_logprobs, proposal_logprobs
  )
  lq = divergences.log_probs(student_logits, temperature)
  ids = jnp.asarray(teacher_topk_ids).astype(jnp.int32)
  lq_k = jnp.take_along_axis(lq, ids, axis=-1)
  lq_tail = divergences.floor_neg_inf(divergences.logsumexp_outside(lq, ids))
  lq_s = jnp.take_along_axis(lq, jnp.asarray(sample_ids).astype(jnp.int32), axis=-1)
  return estimate(name, teacher, lq_k, lq_tail, lq_s, **params)


def vocab_parallel_sampled_divergence(
  name: str,
  teacher_topk_logprobs: Array,
  teacher_topk_ids: Array,
  student_logits: Array,
  *,
  axis_name: str,
  sample_ids: Array,
  sample_logprobs: Array,
  proposal_logprobs: Array | None = None,
  teacher_tail_logmass: Array | None = None,
  temperature: float = 1.0,
  **params,
) -> Array:
  """`sampled_divergence` with the student's vocabulary split over `axis_name`.

  Call inside `jax.shard_map`: each device holds `student_logits [..., V / n]`
  (the n shards in order along the axis) and the whole teacher cache (ids are
  global). The student's normaliser, its log-probs at the K + S stored ids
  and its tail mass are completed with `pmax`/`psum`; no device gathers the
  vocabulary. Returns the per-token values `[...]`, equal on every device.
  """
  teacher = teacher_side(
    teacher_topk_logprobs, teacher_tail_logmass, sample_logprobs, proposal_logprobs
  )
  x = divergences._scaled(student_logits, temperature)
  local_vocab = x.shape[-1]
  peak = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)), axis_name)
  total = jax.lax.psum(jnp.sum(jnp.exp(x - peak), axis=-1, keepdims=True), axis_name)
  lq = divergences.floor_neg_inf(x - peak - jnp.log(total))  # [..., V / n], this shard
  offset = jax.lax.axis_index(axis_name) * local_vocab

  def gather(global_ids):
    local = jnp.asarray(global_ids).astype(jnp.int32) - offset
    here = (local >= 0) & (local < local_vocab)
    values = jnp.take_along_axis(lq, jnp.where(here, local, 0), axis=-1)
    return jax.lax.psum(jnp.where(here, values, 0.0), axis_name)

  ids = jnp.asarray(teacher_topk_ids).astype(jnp.int32)
  lead = lq.shape[:-1]
  flat = lq.reshape(-1, local_vocab)
  local = (ids - offset).reshape(flat.shape[0], -1)
  # Ids on other shards point past the end and are dropped.
  local = jnp.where((local >= 0) & (local < local_vocab), local, local_vocab)
  rows = jnp.arange(flat.shape[0])[:, None]
  in_topk = jnp.zeros(flat.shape, bool).at[rows, local].set(True, mode="drop")
  tail_local = jax.nn.logsumexp(jnp.where(in_topk, NEG_INF, flat), axis=-1).reshape(lead)
  tail_peak = jax.lax.pmax(jax.lax.stop_gradient(tail_local), axis_name)
  lq_tail = tail_peak + jnp.log(jax.lax.psum(jnp.exp(tail_local - tail_peak), axis_name))
  lq_tail = divergences.floor_neg_inf(lq_tail)
  return estimate(name, teacher, gather(ids), lq_tail, gather(sample_ids), **params)


# ---------------------------------------------------------------------------
# Drawing the cache (the teacher pass).
# ---------------------------------------------------------------------------


def draw_tail_samples(
  logp: jax.Array, topk_ids: jax.Array, key: jax.Array, num_samples: int, temperature: float = 1.0
):
  """S i.i.d. draws per position from the teacher's distribution outside its top-k.

  Args:
    logp: `[..., V]` normalised teacher log-probs.
    topk_ids: `[..., K]` the stored top-k ids (K may be 0: the whole vocabulary).
    key: one PRNG key for all positions.
    num_samples: S.
    temperature: the proposal is r ∝ p^(1/temperature) on the tail, renormalised
      (1: the teacher restricted to the tail).

  Returns:
    ids `[..., S]` int32, the teacher's log-probs of them `[..., S]` and their
    proposal log-probs log r `[..., S]` (the importance weights are 1/r). A
    position whose tail is empty gets uniform draws, which the estimator
    ignores (`sampled_divergences.estimate`).
  """
  logp = jnp.maximum(logp.astype(jnp.float32), divergences.NEG_INF)
  in_topk = jnp.put_along_axis(
    jnp.zeros(logp.shape, bool), topk_ids.astype(jnp.int32), True, axis=-1, inplace=False
  )
  logits_r = jnp.where(in_topk, divergences.NEG_INF, logp / temperature)
  log_r = jax.nn.log_softmax(logits_r, axis=-1)
  draws = jax.random.categorical(key, logits_r, axis=-1, shape=(num_samples, *logp.shape[:-1]))
  ids = jnp.moveaxis(draws, 0, -1).astype(jnp.int32)
  return (
    ids,
    jnp.take_along_axis(logp, ids, axis=-1),
    jnp.maximum(jnp.take_along_axis(log_r, ids, axis=-1), divergences.NEG_INF),
  )

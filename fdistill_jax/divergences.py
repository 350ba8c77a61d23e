"""Per-token f-divergences between a teacher p and a student q.

Both distributions arrive as logits `[..., vocab]` (any float dtype); every
divergence returns per-token values `[...]` in float32. The caller weights
and reduces them (`weighted_sum` returns `(sum, weight_sum)`, t5x style).

Conventions
-----------
* D_f(p || q) = sum_v q_v f(p_v / q_v) with f convex and f(1) = 0, as in
  the paper's Table 1: f(t) = t log t gives KL(p || q) (teacher first).
* `js(beta)` = beta * KL(q || m) + (1 - beta) * KL(p || m) with the mixture
  m = (1 - beta) p + beta q. beta = 1/2 is the standard Jensen-Shannon
  divergence (bounded by log 2; Table 1's f for JS is twice this). The
  original f-DISTILL scripts used this skewed form with beta = 0.85 (DART,
  XSum, dialogue) and 0.25 (EN-RO). As beta -> 1, js / (1 - beta) -> KL(p||q);
  as beta -> 0, js / beta -> KL(q||p).
* `skew_kl(alpha)` = KL(p || alpha p + (1 - alpha) q) and `skew_rkl(alpha)` =
  KL(q || (1 - alpha) p + alpha q), DistiLLM's skew divergences.
* `alpha_div(alpha)` is Amari's alpha-divergence, f(t) = (t^a - a t - (1-a))
  / (a (a - 1)); it tends to KL(p||q) as a -> 1 and KL(q||p) as a -> 0.

Numerics
--------
Masked logits (`-inf`) are replaced by a large finite negative number before
the log-softmax, so a masked entry has probability exactly 0, contributes
exactly 0 (0 log 0 = 0) and passes a zero gradient, never NaN. Everything is
computed in float32 whatever the input dtype. Divergences that are unbounded
(Pearson chi^2, alpha > 1, Jeffreys) saturate at about 1e34 per entry rather
than overflow, so gradients stay finite with logits of +-1e4.

Parameters (`beta`, `alpha`, `temperature`) are Python floats, static under
`jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# A finite stand-in for -inf logits/log-probs: exp() of it is exactly 0 in
# float32 and differences of such values stay finite.
NEG_INF = -1e30
# exp(80) ~ 5.5e34 < float32 max: the cap for unbounded ratios.
_EXP_CAP = 80.0
# A tail mass derived from 1 - sum(top-k probs) below this is rounding error.
_MIN_DERIVED_TAIL = 1e-6


def log_probs(logits: Array, temperature: float = 1.0) -> Array:
  """Log-softmax of `logits [..., V]` at `temperature`, in float32 (float64 stays
  float64), with -inf made finite."""
  return floor_neg_inf(jax.nn.log_softmax(_scaled(logits, temperature), axis=-1))


def floor_neg_inf(x: Array) -> Array:
  """`x` raised to at least NEG_INF, passing the whole gradient where x == NEG_INF.

  A masked logit's log-prob is exactly NEG_INF (the normaliser vanishes next
  to 1e30), and `jnp.maximum` splits the gradient of a tie in half: the KL
  gradient through a token the student masks and the teacher supports would
  be halved.
  """
  return jnp.where(x >= NEG_INF, x, NEG_INF)


def _scaled(logits: Array, temperature: float) -> Array:
  """Logits at `temperature`, at least float32, with -inf made finite."""
  x = _at_least_f32(logits)
  if temperature != 1.0:
    x = x / temperature
  return jnp.where(x == -jnp.inf, NEG_INF, x)


def _at_least_f32(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _plog(lx: Array, ly: Array) -> Array:
  """Elementwise x * (log x - log y) from log-values; 0 where x == 0."""
  return jnp.exp(lx) * (lx - ly)


def _log_mix(w_p: float, lp: Array, lq: Array) -> Array:
  """log(w_p p + (1 - w_p) q) for a static 0 <= w_p <= 1."""
  if w_p == 0.0:
    return lq
  if w_p == 1.0:
    return lp
  return jnp.logaddexp(math.log(w_p) + lp, math.log1p(-w_p) + lq)


# Elementwise terms g(log p, log q) with sum_v g = D(p || q).


def _kl(lp, lq):
  return _plog(lp, lq)


def _rkl(lp, lq):
  return _plog(lq, lp)


def _js(lp, lq, beta=0.5):
  lm = _log_mix(1.0 - beta, lp, lq)
  return beta * _plog(lq, lm) + (1.0 - beta) * _plog(lp, lm)


def _tvd(lp, lq):
  return 0.5 * jnp.abs(jnp.exp(lp) - jnp.exp(lq))


def _jeffreys(lp, lq):
  return (jnp.exp(lp) - jnp.exp(lq)) * (lp - lq)


def _hellinger(lp, lq):
  return jnp.square(jnp.exp(0.5 * lp) - jnp.exp(0.5 * lq))


def _pearson(lp, lq):
  # (p - q)^2 / q = p^2/q - 2p + q, with p^2/q capped instead of overflowing.
  return jnp.exp(jnp.minimum(2.0 * lp - lq, _EXP_CAP)) - 2.0 * jnp.exp(lp) + jnp.exp(lq)


def _alpha(lp, lq, alpha=0.5):
  mixed = jnp.exp(jnp.minimum(alpha * lp + (1.0 - alpha) * lq, _EXP_CAP))
  return (mixed - alpha * jnp.exp(lp) - (1.0 - alpha) * jnp.exp(lq)) / (alpha * (alpha - 1.0))


def _skew_kl(lp, lq, alpha=0.1):
  return _plog(lp, _log_mix(alpha, lp, lq))


def _skew_rkl(lp, lq, alpha=0.1):
  return _plog(lq, _log_mix(1.0 - alpha, lp, lq))


def _xlogx(t):
  return np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0)


@dataclasses.dataclass(frozen=True)
class Divergence:
  """One registry entry.

  Attributes:
    name: registry key.
    f: the generator f(t, **params), numpy-compatible, convex with f(1) = 0.
      It defines the divergence; `pointwise` must agree with it.
    pointwise: a numerically stable elementwise term g(log p, log q, **params)
      with sum_v g = D_f(p || q). Derived from `f` when not given.
    defaults: default parameter values.
    symmetric: D(p||q) == D(q||p) for all p, q.
    check_params: raises ValueError for invalid parameters.
  """

  name: str
  f: Callable[..., np.ndarray]
  pointwise: Callable[..., Array] | None = None
  defaults: dict = dataclasses.field(default_factory=dict)
  symmetric: bool = False
  check_params: Callable[..., None] | None = None

  def term(self, lp: Array, lq: Array, **params) -> Array:
    """Elementwise contributions `[..., V]` from log-probs `[..., V]`."""
    params = {**self.defaults, **params}
    unknown = set(params) - set(self.defaults)
    if unknown:
      raise ValueError(
        f"divergence {self.name!r} takes parameters {sorted(self.defaults)}, got {sorted(unknown)}"
      )
    if self.check_params is not None:
      self.check_params(**params)
    fn = self.pointwise or _pointwise_from_f(self.f)
    return fn(lp, lq, **params)


def _pointwise_from_f(f):
  """The generic term q f(p/q) for a user-supplied f (must accept jnp arrays)."""

  def term(lp, lq, **params):
    ratio = jnp.exp(jnp.minimum(lp - lq, _EXP_CAP))
    return jnp.exp(lq) * f(ratio, **params)

  return term


def _open_unit(name):
  def check(**params):
    value = params[name]
    if not 0.0 < value < 1.0:
      raise ValueError(f"{name} must be in (0, 1), got {value}")

  return check


def _half_open_unit(**params):
  if not 0.0 <= params["alpha"] < 1.0:
    raise ValueError(f"alpha must be in [0, 1), got {params['alpha']}")


def _alpha_not_0_1(**params):
  if params["alpha"] in (0.0, 1.0):
    raise ValueError("alpha-divergence needs alpha not in {0, 1}; use 'kl' or 'rkl' there")


REGISTRY: dict[str, Divergence] = {}


def register(divergence: Divergence) -> Divergence:
  """Adds a divergence to the registry; a new f-divergence is one call."""
  if divergence.name in REGISTRY:
    raise ValueError(f"divergence {divergence.name!r} is already registered")
  REGISTRY[divergence.name] = divergence
  return divergence


def _f_js(t, beta=0.5):
  mix = (1.0 - beta) * t + beta
  return (1.0 - beta) * _xlogx(t) - mix * np.log(mix)


for _entry in (
  Divergence("kl", lambda t: _xlogx(t), _kl),
  Divergence("rkl", lambda t: -np.log(t), _rkl),
  Divergence("js", _f_js, _js, {"beta": 0.5}, check_params=_open_unit("beta")),
  Divergence("tvd", lambda t: 0.5 * np.abs(t - 1.0), _tvd, symmetric=True),
  Divergence("jeffreys", lambda t: (t - 1.0) * np.log(t), _jeffreys, symmetric=True),
  Divergence("hellinger", lambda t: np.square(np.sqrt(t) - 1.0), _hellinger, symmetric=True),
  Divergence("pearson", lambda t: np.square(t - 1.0), _pearson),
  Divergence(
    "alpha",
    lambda t, alpha=0.5: (t**alpha - alpha * t - (1.0 - alpha)) / (alpha * (alpha - 1.0)),
    _alpha,
    {"alpha": 0.5},
    check_params=_alpha_not_0_1,
  ),
  Divergence(
    "skew_kl",
    lambda t, alpha=0.1: _xlogx(t) - t * np.log(alpha * t + 1.0 - alpha),
    _skew_kl,
    {"alpha": 0.1},
    check_params=_half_open_unit,
  ),
  Divergence(
    "skew_rkl",
    lambda t, alpha=0.1: -np.log((1.0 - alpha) * t + alpha),
    _skew_rkl,
    {"alpha": 0.1},
    check_params=_half_open_unit,
  ),
):
  register(_entry)


def get(name: str) -> Divergence:
  try:
    return REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown divergence {name!r}; registered: {sorted(REGISTRY)}") from None


# Public per-token API.


def divergence_from_log_probs(name: str, teacher_lp: Array, student_lp: Array, **params) -> Array:
  """D(p || q) `[...]` from float32 log-probs `[..., V]`."""
  return jnp.sum(get(name).term(teacher_lp, student_lp, **params), axis=-1)


def divergence(
  name: str, teacher_logits: Array, student_logits: Array, *, temperature: float = 1.0, **params
) -> Array:
  """Per-token D(p || q) `[...]` from teacher and student logits `[..., V]`.

  Both sides are softened by `temperature`. No T^2 factor is applied (the
  original f-DISTILL runs all use T = 1); multiply by it if you want one.
  """
  return divergence_from_log_probs(
    name, log_probs(teacher_logits, temperature), log_probs(student_logits, temperature), **params
  )


def kl(teacher_logits, student_logits, *, temperature=1.0):
  """KL(p || q) `[...]`."""
  return divergence("kl", teacher_logits, student_logits, temperature=temperature)


def rkl(teacher_logits, student_logits, *, temperature=1.0):
  """KL(q || p) `[...]`."""
  return divergence("rkl", teacher_logits, student_logits, temperature=temperature)


def js(teacher_logits, student_logits, *, beta=0.5, temperature=1.0):
  """beta KL(q || m) + (1 - beta) KL(p || m), m = (1 - beta) p + beta q. `[...]`."""
  return divergence("js", teacher_logits, student_logits, temperature=temperature, beta=beta)


def tvd(teacher_logits, student_logits, *, temperature=1.0):
  """1/2 sum |p - q| `[...]`."""
  return divergence("tvd", teacher_logits, student_logits, temperature=temperature)


class TeacherTopK(NamedTuple):
  """The teacher cache at each token, as the records store it.

  logprobs `[..., K]`, ids `[..., K]`, tail_logmass `[...]` (log of the mass
  outside the top-k; None: derived from the top-k), and optionally S tail
  tokens drawn from a proposal (`sampled_divergences`): sample_ids `[..., S]`,
  their teacher log-probs `[..., S]` and proposal log-probs `[..., S]` (None:
  the proposal is the teacher). Without samples it is the top-k + tail form.
  Read by `topk_log_probs`, `topk_divergence`, `sampled_divergences` and
  `fused_head.fused_divergence_loss`.
  """

  logprobs: Array
  ids: Array
  tail_logmass: Array | None = None
  sample_ids: Array | None = None
  sample_logprobs: Array | None = None
  proposal_logprobs: Array | None = None


def logsumexp_outside(log_probs: Array, ids: Array, fill: float = NEG_INF) -> Array:
  """log sum_{v not in ids} exp(log_probs[..., v]) `[...]`: the mass outside a top-k.

  A log-sum-exp over the other entries, not log(1 - sum top-k), which loses
  every digit once the top-k holds almost all the mass. `ids [..., K]` are
  distinct within a row; the excluded entries count as `fill` (NEG_INF keeps
  gradients finite; -inf gives an exact -inf tail when K == V).
  """
  excluded = jnp.put_along_axis(
    jnp.zeros(log_probs.shape, dtype=bool), ids, True, axis=-1, inplace=False
  )
  return jax.nn.logsumexp(jnp.where(excluded, fill, log_probs), axis=-1)


def topk_log_probs(
  teacher_topk_logprobs: Array,
  teacher_topk_ids: Array,
  student_logits: Array,
  *,
  teacher_tail_logmass: Array | None = None,
  temperature: float = 1.0,
) -> tuple[Array, Array]:
  """Both distributions coarsened to K + 1 buckets: the teacher's top-k ids and the rest.

  Args:
    teacher_topk_logprobs: `[..., K]` teacher log-probs of its top-k ids.
    teacher_topk_ids: `[..., K]` int ids (distinct within a row).
    student_logits: `[..., V]`.
    teacher_tail_logmass: `[...]` log of the teacher mass outside the top-k
      (the teacher pass stores it, computed in float32). When not given it is
      derived as log(1 - sum exp(top-k)), and a derived tail below 1e-6 is
      taken as empty: that is float32 rounding of the head's sum, not mass.
      The teacher's K + 1 buckets are renormalised, which absorbs the rounding
      of top-k log-probs stored in bf16/f16.
    temperature: applied to the student only; the teacher's stored log-probs
      are taken as they are.

  Returns:
    (teacher, student) log-probs `[..., K + 1]`, the last bucket the tail.
  """
  lp_k = jnp.maximum(_at_least_f32(teacher_topk_logprobs), NEG_INF)
  if teacher_tail_logmass is None:
    head = jnp.sum(jnp.exp(lp_k), axis=-1)
    has_tail = head < 1.0 - _MIN_DERIVED_TAIL
    teacher_tail_logmass = jnp.where(has_tail, jnp.log1p(-jnp.where(has_tail, head, 0.0)), NEG_INF)
  lp_tail = jnp.maximum(_at_least_f32(teacher_tail_logmass), NEG_INF)
  lq = log_probs(student_logits, temperature)
  ids = jnp.asarray(teacher_topk_ids).astype(jnp.int32)
  lq_k = jnp.take_along_axis(lq, ids, axis=-1)
  lq_tail = floor_neg_inf(logsumexp_outside(lq, ids))
  teacher = jnp.concatenate([lp_k, lp_tail[..., None]], axis=-1)
  teacher = jnp.maximum(teacher - jax.nn.logsumexp(teacher, axis=-1, keepdims=True), NEG_INF)
  student = jnp.concatenate([lq_k, lq_tail[..., None]], axis=-1)
  return jax.lax.stop_gradient(teacher), student


def topk_divergence(
  name: str,
  teacher_topk_logprobs: Array,
  teacher_topk_ids: Array,
  student_logits: Array,
  *,
  teacher_tail_logmass: Array | None = None,
  temperature: float = 1.0,
  **params,
) -> Array:
  """Per-token D(p || q) `[...]` on the K + 1 bucket coarsening (see `topk_log_probs`).

  By the data-processing inequality this is <= the full-vocabulary value, and
  equal to it when K = V.
  """
  lp, lq = topk_log_probs(
    teacher_topk_logprobs,
    teacher_topk_ids,
    student_logits,
    teacher_tail_logmass=teacher_tail_logmass,
    temperature=temperature,
  )
  return divergence_from_log_probs(name, lp, lq, **params)


def weighted_sum(values: Array, weights: Array) -> tuple[Array, Array]:
  """(sum values * weights, sum weights) in float32 or wider; the caller normalises."""
  values = _at_least_f32(values)
  weights = jnp.asarray(weights).astype(values.dtype)
  return jnp.sum(values * weights), jnp.sum(weights)


def vocab_parallel_divergence(
  name: str,
  teacher_logits: Array,
  student_logits: Array,
  *,
  axis_name: str,
  temperature: float = 1.0,
  **params,
) -> Array:
  """`divergence` for logits whose vocabulary axis is split over `axis_name`.

  Call inside `jax.shard_map` with each device holding `[..., V / n]`: the
  log-softmax normaliser and the sum over the vocabulary are completed with
  `pmax`/`psum` across the axis, so no device gathers the full vocabulary.
  """

  def sharded_log_probs(logits):
    x = _scaled(logits, temperature)
    peak = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)), axis_name)
    total = jax.lax.psum(jnp.sum(jnp.exp(x - peak), axis=-1, keepdims=True), axis_name)
    return floor_neg_inf(x - peak - jnp.log(total))

  local = jnp.sum(
    get(name).term(sharded_log_probs(teacher_logits), sharded_log_probs(student_logits), **params),
    axis=-1,
  )
  return jax.lax.psum(local, axis_name)

"""Per-token loss terms on one source: the math each objective term runs unfused.

Every function takes a `Source` (the student's logits on one set of
sequences and the teacher's side there) and returns per-token values
`[B, T]`, 0 where masked; `objectives._term_sum` reduces them to
`(sum, count)`. `cfg` is the objective's parameters
(`objectives.ObjectiveConfig`: temperature, beta, exact_js).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from fdistill_jax import divergences, sampled_divergences, stepwise
from fdistill_jax.divergences import TeacherTopK

if TYPE_CHECKING:  # objectives imports this module
  from fdistill_jax.objectives import ObjectiveConfig

Array = jax.Array


class Source(NamedTuple):
  """The student (and teacher) run on one set of sequences.

  tokens: `[B, T]` int; mask: `[B, T]` float, 1 on real tokens (EOS included);
  student_logits: `[B, T, V]` (position t predicts tokens[:, t]);
  teacher_logits: `[B, T, V]` or None; teacher_topk: top-k `[B, T, K]` or None;
  teacher_token_logprobs: `[B, T]` the teacher's log-prob of each token
  (exact JS from top-k); student_hidden / teacher_hidden: per-layer `[B, T, D]`.
  """

  tokens: Array
  mask: Array
  student_logits: Array
  teacher_logits: Array | None = None
  teacher_topk: TeacherTopK | None = None
  teacher_token_logprobs: Array | None = None
  student_hidden: tuple | None = None
  teacher_hidden: tuple | None = None


# ---------------------------------------------------------------------------
# Per-token terms on one source.
# ---------------------------------------------------------------------------


def _teacher_form(src: Source, where: str) -> str:
  if src.teacher_logits is not None:
    return "logits"
  if src.teacher_topk is not None:
    return "topk"
  raise ValueError(f"source {where!r} needs the teacher's distribution: no logits, no top-k")


def divergence_terms(cfg: ObjectiveConfig, name: str, src: Source, where: str, **params) -> Array:
  """Per-token D(p || q) `[B, T]` on `src` (0 where masked)."""
  mask = src.mask.astype(jnp.float32)
  if _teacher_form(src, where) == "logits":
    # The registry divergence itself, for "js" too (fdiv's full JS), not
    # `stepwise_terms`, whose "js" is one side of the js objective.
    teacher = jax.lax.stop_gradient(src.teacher_logits)
    values = divergences.divergence(
      name, teacher, src.student_logits, temperature=cfg.temperature, **params
    )
    return values * mask
  topk = src.teacher_topk
  if topk.sample_ids is not None:
    values = sampled_divergences.sampled_divergence(
      name,
      topk.logprobs,
      topk.ids,
      src.student_logits,
      sample_ids=topk.sample_ids,
      sample_logprobs=topk.sample_logprobs,
      proposal_logprobs=topk.proposal_logprobs,
      teacher_tail_logmass=topk.tail_logmass,
      temperature=cfg.temperature,
      **params,
    )
    return values * mask
  values = divergences.topk_divergence(
    name,
    topk.logprobs,
    topk.ids,
    src.student_logits,
    teacher_tail_logmass=topk.tail_logmass,
    temperature=cfg.temperature,
    **params,
  )
  return values * mask


def js_side_terms(cfg: ObjectiveConfig, src: Source, side: str, where: str) -> Array:
  """KL(own || m) `[B, T]` for JS on `src`, drawn by `side` ("teacher" or "student")."""
  mask = src.mask.astype(jnp.float32)
  if _teacher_form(src, where) == "logits":
    return stepwise.stepwise_terms(
      "js",
      jax.lax.stop_gradient(src.teacher_logits),
      src.student_logits,
      src.tokens,
      mask,
      side=side,
      beta=cfg.beta,
      exact_js=cfg.exact_js,
      temperature=cfg.temperature,
    )
  # Top-k teacher: the mixture is linear, so it coarsens to the K + 1 buckets
  # exactly; the bucketed KL(p || m) is a lower bound of the full one.
  topk = src.teacher_topk
  if topk.sample_ids is not None:
    raise ValueError(
      f"source {where!r}: the unfused js objective has no sampled-cache form; use "
      "train.fused_head=True, objective fdiv with divergence js, or cache_form 'topk'"
    )
  lp, lq = divergences.topk_log_probs(
    topk.logprobs,
    topk.ids,
    src.student_logits,
    teacher_tail_logmass=topk.tail_logmass,
    temperature=cfg.temperature,
  )
  if cfg.exact_js:
    if src.teacher_token_logprobs is None:
      raise ValueError(f"source {where!r}: exact JS from top-k needs teacher_token_logprobs")
    lq_full = divergences.log_probs(src.student_logits, cfg.temperature)
    prefix_p = stepwise.prefix_log_probs(
      jax.lax.stop_gradient(src.teacher_token_logprobs.astype(jnp.float32)), mask
    )
    prefix_q = stepwise.prefix_log_probs(stepwise.token_log_probs(lq_full, src.tokens), mask)
    weighted_p = math.log1p(-cfg.beta) + prefix_p
    weighted_q = math.log(cfg.beta) + prefix_q
    norm = jnp.logaddexp(weighted_p, weighted_q)
    log_w, log_1mw = (weighted_p - norm)[..., None], (weighted_q - norm)[..., None]
  else:
    log_w, log_1mw = math.log1p(-cfg.beta), math.log(cfg.beta)
  lm = jnp.logaddexp(log_w + lp, log_1mw + lq)
  own = lp if side == "teacher" else lq
  return divergences.divergence_from_log_probs("kl", own, lm) * mask


def nll_terms(src: Source, temperature: float = 1.0) -> Array:
  """-log q(y_t) `[B, T]` of the source's own tokens (0 where masked)."""
  lq = divergences.log_probs(src.student_logits, temperature)
  return -stepwise.token_log_probs(lq, src.tokens) * src.mask.astype(jnp.float32)


def engine_terms(cfg: ObjectiveConfig, src: Source, where: str) -> Array:
  """-sum_v q log p `[B, T]`: the student's cross-entropy against the teacher."""
  if src.teacher_logits is None:
    raise ValueError(f"source {where!r}: ENGINE needs full teacher logits")
  lp = divergences.log_probs(jax.lax.stop_gradient(src.teacher_logits), cfg.temperature)
  lq = divergences.log_probs(src.student_logits, cfg.temperature)
  return -jnp.sum(jnp.exp(lq) * lp, axis=-1) * src.mask.astype(jnp.float32)


def default_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
  """Teacher layer matched to each student layer: spread evenly, last to last.

  E.g. 3 of 12 -> (0, 6, 11), the layers HF copies for a 3-layer student.
  """
  if student_layers == 1:
    return (teacher_layers - 1,)
  step = (teacher_layers - 1) / (student_layers - 1)
  return tuple(round(i * step) for i in range(student_layers))


def _layer_norm(x: Array) -> Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5)


def hidden_mse(
  student_hidden, teacher_hidden, mask: Array, layer_map, normalize: bool = False
) -> tuple[Array, Array]:
  """Sum over matched layers of the masked mean squared error, and its token count.

  student_hidden / teacher_hidden: sequences of `[B, T, D]`; mask `[B, T]`;
  layer_map[i] is the teacher layer for student layer i. Each layer's MSE is
  averaged over real tokens and the width D (as HF's `calc_hidden_loss`).
  Returns (sum over layers of per-token-and-dim sums / D, token count).
  """
  if len(layer_map) != len(student_hidden):
    raise ValueError(
      f"objective.layer_map: {len(layer_map)} entries for {len(student_hidden)} student layers"
    )
  mask = mask.astype(jnp.float32)
  total = jnp.zeros((), jnp.float32)
  for i, j in enumerate(layer_map):
    if not 0 <= j < len(teacher_hidden):
      raise ValueError(f"objective.layer_map[{i}] = {j}: teacher has {len(teacher_hidden)} layers")
    s = student_hidden[i].astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_hidden[j]).astype(jnp.float32)
    if s.shape != t.shape:
      raise ValueError(
        f"hidden-state MSE: student layer {i} is {s.shape}, teacher layer {j} is {t.shape}; "
        "the widths must match"
      )
    if normalize:
      s, t = _layer_norm(s), _layer_norm(t)
    sq = jnp.mean(jnp.square(s - t), axis=-1)
    total = total + jnp.sum(sq * mask)
  return total, jnp.sum(mask)

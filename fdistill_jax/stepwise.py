"""The paper's step-wise decomposition of sequence-level divergences.

For a sequence y drawn from one model, the sequence-level divergence is the
expectation of a sum of per-step terms, each a word-level divergence between
the teacher's and the student's next-token distributions at the prefix
y_<t (Wen et al. 2023, Theorem 1):

* KL(P || Q)  = E_{y~P} sum_t KL(p_t || q_t)
* KL(Q || P)  = E_{y~Q} sum_t KL(q_t || p_t)
* JS_beta(P, Q) = (1 - beta) E_{y~P} sum_t KL(p_t || m_t)
                 + beta E_{y~Q} sum_t KL(q_t || m_t)
  with m_t the next-token distribution of the sequence-level mixture
  M = (1 - beta) P + beta Q, i.e. m_t = w_t p_t + (1 - w_t) q_t with the
  prefix weight w_t = (1 - beta) P(y_<t) / ((1 - beta) P(y_<t) + beta Q(y_<t))
  (`exact_js=True`, the correction in the paper's ACL'23 notes). The
  original code uses the fixed mixture w_t = 1 - beta (`exact_js=False`),
  which is only an approximation.
* TVD(P, Q) <= E_{y~P} sum_t TVD(p_t, q_t), and the same with y ~ Q; the
  paper averages the two bounds.

Shapes: `[batch, length, vocab]` logits, `[batch, length]` tokens and masks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fdistill_jax import divergences

Array = jax.Array


def token_log_probs(log_probs: Array, tokens: Array) -> Array:
  """log-prob of each token `[B, T]` from log-probs `[B, T, V]`."""
  return jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def prefix_log_probs(token_lp: Array, mask: Array) -> Array:
  """log P(y_<t) `[B, T]`: the exclusive cumulative sum of masked token log-probs."""
  masked = token_lp * mask
  return jnp.cumsum(masked, axis=-1) - masked


def stepwise_terms(
  name: str,
  teacher_logits: Array,
  student_logits: Array,
  tokens: Array,
  mask: Array,
  *,
  side: str = "teacher",
  beta: float = 0.5,
  exact_js: bool = False,
  temperature: float = 1.0,
  **params,
) -> Array:
  """Per-step terms `[B, T]` (0 where `mask` is 0) along the sequences `tokens`.

  Args:
    name: a registry divergence. For every name but "js" the term is
      D(p_t || q_t) whichever model drew the sequence.
    teacher_logits, student_logits: `[B, T, V]`; position t predicts tokens[:, t].
    tokens: `[B, T]` the sequence the logits were computed along.
    mask: `[B, T]` 1 on real tokens (EOS included).
    side: for "js", which model drew `tokens`: "teacher" gives KL(p_t || m_t),
      "student" gives KL(q_t || m_t).
    beta: the JS mixture weight of the student (m = (1 - beta) p + beta q).
    exact_js: use the prefix-weighted mixture instead of the fixed one.
    temperature: softens both distributions.
  """
  lp = divergences.log_probs(teacher_logits, temperature)
  lq = divergences.log_probs(student_logits, temperature)
  mask = jnp.asarray(mask).astype(jnp.float32)
  if name != "js":
    return divergences.divergence_from_log_probs(name, lp, lq, **params) * mask
  if side not in ("teacher", "student"):
    raise ValueError(f"side must be 'teacher' or 'student', got {side!r}")
  if not 0.0 < beta < 1.0:
    raise ValueError(f"beta must be in (0, 1), got {beta}")
  if exact_js:
    prefix_p = prefix_log_probs(token_log_probs(lp, tokens), mask)
    prefix_q = prefix_log_probs(token_log_probs(lq, tokens), mask)
    weighted_p = math.log1p(-beta) + prefix_p
    weighted_q = math.log(beta) + prefix_q
    norm = jnp.logaddexp(weighted_p, weighted_q)
    log_w = (weighted_p - norm)[..., None]
    log_1mw = (weighted_q - norm)[..., None]
  else:
    log_w, log_1mw = math.log1p(-beta), math.log(beta)
  lm = jnp.logaddexp(log_w + lp, log_1mw + lq)
  own = lp if side == "teacher" else lq
  return jnp.sum(divergences.REGISTRY["kl"].term(own, lm), axis=-1) * mask

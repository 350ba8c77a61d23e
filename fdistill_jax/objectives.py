"""Every f-DISTILL training objective as a pure function of logits and masks.

An objective reads up to three *sources*, each a set of sequences the student
was run on with teacher forcing:

* `teacher`: teacher sequences (the offline records' samples, or online
  teacher samples). The teacher's distribution on them comes from the stored
  top-k (`Source.teacher_topk`, so the teacher model need not be loaded) or
  from full teacher logits.
* `student`: student samples drawn inside the training step (stop-gradient).
* `ground_truth`: the dataset's targets.

`compute_loss(cfg, sources)` returns `(loss, metrics)` where `metrics` maps a
name to a `(sum, count)` pair (t5x style), so accumulation over micro-batches,
steps and hosts is a sum and the mean is taken once at the end.

The formulas are those of the original scripts (reference §2 and §9): every
source contributes a per-token mean over its own mask, and the sources are
combined with fixed weights:

  kl      mean_teacher KL(p || q)
  rkl     mean_student KL(q || p)
  js      beta mean_student KL(q || m) + (1 - beta) mean_teacher KL(p || m),
          m = (1 - beta) p + beta q (or the exact prefix-weighted mixture)
  tvd     1/2 mean_student TVD + 1/2 mean_teacher TVD
  fdiv    w_s mean_student D(p || q) + w_t mean_teacher D(p || q), any registry D
  seqkd   mean_teacher -log q(y_t)            (hard teacher tokens)
  engine  mean_student -sum_v q log p         (greedy student outputs)
  mle     mean_ground_truth -log q(y_t)
  kd      mean_ground_truth KL(p || q)        (word-level KD)
  predistill  alpha_kd kd + alpha_mle mle + alpha_hid hidden-state MSE

Gradients flow through the student's logits only; the teacher's are wrapped
in `stop_gradient` here as well, so a caller cannot leak a teacher gradient.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fdistill_jax import divergences, sampled_divergences, stepwise
from fdistill_jax.fused_head import TeacherTopK

Array = jax.Array
Metrics = dict[str, tuple[Array, Array]]

SOURCES = ("teacher", "student", "ground_truth")


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """What an objective needs, so the trainer computes nothing else.

  Attributes:
    sources: the sources the loss reads (see the module docstring).
    teacher_dist: sources on which the teacher's next-token distribution is
      needed. On `teacher` it can come from the records' top-k.
    decoding: how student samples are drawn: "sampler" (the configured
      sampler) or "greedy"; None when `student` is not a source.
    hidden: needs per-layer hidden states of both models (pre-distillation).
    description: one line for logs and docs.
  """

  sources: tuple[str, ...]
  teacher_dist: tuple[str, ...] = ()
  decoding: str | None = None
  hidden: bool = False
  description: str = ""

  def needs_teacher_model(self, teacher_topk: bool) -> bool:
    """Whether the teacher must run at train time, given stored top-k or not."""
    on = set(self.teacher_dist)
    if teacher_topk:
      on.discard("teacher")
    return bool(on) or self.hidden


OBJECTIVES: dict[str, ObjectiveSpec] = {
  "kl": ObjectiveSpec(("teacher",), ("teacher",), None, False, "KL(p||q) on teacher sequences"),
  "rkl": ObjectiveSpec(("student",), ("student",), "sampler", False, "KL(q||p) on student samples"),
  "js": ObjectiveSpec(
    ("teacher", "student"), ("teacher", "student"), "sampler", False, "skew JS(beta), both sides"
  ),
  "tvd": ObjectiveSpec(
    ("teacher", "student"), ("teacher", "student"), "sampler", False, "TVD bound, both sides"
  ),
  "fdiv": ObjectiveSpec(
    ("teacher", "student"), ("teacher", "student"), "sampler", False, "any D(p||q), both sides"
  ),
  "seqkd": ObjectiveSpec(("teacher",), (), None, False, "cross-entropy on hard teacher tokens"),
  "engine": ObjectiveSpec(
    ("student",), ("student",), "greedy", False, "-sum q log p on greedy student outputs"
  ),
  "mle": ObjectiveSpec(("ground_truth",), (), None, False, "cross-entropy on the ground truth"),
  "kd": ObjectiveSpec(
    ("ground_truth",), ("ground_truth",), None, False, "word-level KL(p||q) on the ground truth"
  ),
  "predistill": ObjectiveSpec(
    ("ground_truth",), ("ground_truth",), None, True, "word-level KD + MLE + hidden-state MSE"
  ),
}


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """`config.objective`, typed. Unknown keys raise in `from_config`."""

  name: str = "kl"
  beta: float = 0.5  # JS: the student's weight in m and on its side
  exact_js: bool = False  # JS: prefix-weighted mixture (the paper's ACL'23 correction)
  divergence: str = "js"  # fdiv: the registry divergence
  divergence_params: tuple = ()  # fdiv: sorted (name, value) pairs, e.g. (("alpha", 0.5),)
  student_weight: float = 0.5  # fdiv/tvd: weight of the student-sample term
  temperature: float = 1.0  # softens both distributions (stored top-k: the student only)
  use_teacher_topk: bool = True  # teacher side from the records' top-k when they have it
  alpha_kd: float = 0.8  # predistill: word-level KL weight (the original alpha_ce)
  alpha_mle: float = 0.2  # predistill: MLE weight (the original alpha_mlm)
  alpha_hid: float = 3.0  # predistill: hidden-state MSE weight
  normalize_hidden: bool = False  # predistill: layer-normalise hidden states before the MSE
  layer_map: tuple = ()  # predistill: teacher layer for each student layer; () = spread evenly

  def __post_init__(self):
    if self.name not in OBJECTIVES:
      raise ValueError(f"objective.name: expected one of {sorted(OBJECTIVES)}, found {self.name!r}")
    if self.name == "js" and not 0.0 < self.beta < 1.0:
      raise ValueError(f"objective.beta: expected a value in (0, 1), found {self.beta}")
    if self.name == "fdiv":
      # Raises for an unknown divergence or bad parameters, before anything compiles.
      divergences.get(self.divergence).term(jnp.zeros(1), jnp.zeros(1), **self.params)
    if not 0.0 <= self.student_weight <= 1.0:
      raise ValueError(f"objective.student_weight: expected [0, 1], found {self.student_weight}")
    if self.temperature <= 0:
      raise ValueError(f"objective.temperature: expected > 0, found {self.temperature}")

  @classmethod
  def from_config(cls, cfg: Any) -> ObjectiveConfig:
    if isinstance(cfg, ObjectiveConfig):
      return cfg
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"objective config: unknown keys {unknown}; expected {sorted(known)}")
    params = values.get("divergence_params", ())
    if hasattr(params, "items"):
      values["divergence_params"] = tuple(sorted(dict(params).items()))
    values["layer_map"] = tuple(int(i) for i in values.get("layer_map", ()) or ())
    return cls(**values)

  @property
  def spec(self) -> ObjectiveSpec:
    return OBJECTIVES[self.name]

  @property
  def params(self) -> dict:
    return dict(self.divergence_params)


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


def _mean(terms: Array, mask: Array) -> tuple[Array, Array, Array]:
  """(mean, sum, count) of masked per-token `terms [B, T]`; mean 0 for an empty mask."""
  total, count = divergences.weighted_sum(terms, mask)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0), total, count


def _teacher_form(src: Source, where: str) -> str:
  if src.teacher_logits is not None:
    return "logits"
  if src.teacher_topk is not None:
    return "topk"
  raise ValueError(f"source {where!r} needs the teacher's distribution: no logits, no top-k")


def _divergence_terms(cfg: ObjectiveConfig, name: str, src: Source, where: str, **params) -> Array:
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


def _js_side_terms(cfg: ObjectiveConfig, src: Source, side: str, where: str) -> Array:
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


def _cross_entropy_terms(src: Source, temperature: float = 1.0) -> Array:
  """-log q(y_t) `[B, T]` of the source's own tokens (0 where masked)."""
  lq = divergences.log_probs(src.student_logits, temperature)
  return -stepwise.token_log_probs(lq, src.tokens) * src.mask.astype(jnp.float32)


def _engine_terms(cfg: ObjectiveConfig, src: Source, where: str) -> Array:
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


# ---------------------------------------------------------------------------
# The objectives.
# ---------------------------------------------------------------------------


def _need(sources: Mapping[str, Source], name: str, objective: str) -> Source:
  if name not in sources or sources[name] is None:
    raise ValueError(f"objective {objective!r} needs the {name!r} source; got {sorted(sources)}")
  return sources[name]


def compute_loss(cfg: ObjectiveConfig, sources: Mapping[str, Source]) -> tuple[Array, Metrics]:
  """The objective `cfg.name` on `sources` -> (scalar loss, metrics of (sum, count))."""
  cfg = ObjectiveConfig.from_config(cfg)
  name = cfg.name
  srcs = {k: _need(sources, k, name) for k in cfg.spec.sources}
  metrics: Metrics = {}
  parts = []  # (weight, mean)

  def term(key: str, source: str, values: Array, weight: float):
    mean, total, count = _mean(values, srcs[source].mask)
    metrics[f"{source}/{key}"] = (total, count)
    parts.append((weight, mean))

  if name == "kl":
    term("kl", "teacher", _divergence_terms(cfg, "kl", srcs["teacher"], "teacher"), 1.0)
  elif name == "rkl":
    term("rkl", "student", _divergence_terms(cfg, "rkl", srcs["student"], "student"), 1.0)
  elif name == "js":
    term("js", "student", _js_side_terms(cfg, srcs["student"], "student", "student"), cfg.beta)
    term("js", "teacher", _js_side_terms(cfg, srcs["teacher"], "teacher", "teacher"), 1 - cfg.beta)
  elif name in ("tvd", "fdiv"):
    div, params = ("tvd", {}) if name == "tvd" else (cfg.divergence, cfg.params)
    w = 0.5 if name == "tvd" else cfg.student_weight
    for source, weight in (("student", w), ("teacher", 1.0 - w)):
      values = _divergence_terms(cfg, div, srcs[source], source, **params)
      term(div, source, values, weight)
  elif name == "seqkd":
    term("nll", "teacher", _cross_entropy_terms(srcs["teacher"]), 1.0)
  elif name == "engine":
    term("engine", "student", _engine_terms(cfg, srcs["student"], "student"), 1.0)
  elif name == "mle":
    term("nll", "ground_truth", _cross_entropy_terms(srcs["ground_truth"]), 1.0)
  elif name == "kd":
    gt = srcs["ground_truth"]
    term("kl", "ground_truth", _divergence_terms(cfg, "kl", gt, "ground_truth"), 1.0)
  elif name == "predistill":
    gt = srcs["ground_truth"]
    term("kl", "ground_truth", _divergence_terms(cfg, "kl", gt, "ground_truth"), cfg.alpha_kd)
    term("nll", "ground_truth", _cross_entropy_terms(gt), cfg.alpha_mle)
    if gt.student_hidden is None or gt.teacher_hidden is None:
      raise ValueError("objective 'predistill' needs student_hidden and teacher_hidden")
    layer_map = cfg.layer_map or default_layer_map(len(gt.student_hidden), len(gt.teacher_hidden))
    total, count = hidden_mse(
      gt.student_hidden, gt.teacher_hidden, gt.mask, layer_map, cfg.normalize_hidden
    )
    metrics["ground_truth/hidden_mse"] = (total, count)
    parts.append((cfg.alpha_hid, jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)))
  else:  # pragma: no cover - OBJECTIVES and this dispatch are kept in step
    raise AssertionError(name)

  loss = sum(w * m for w, m in parts)
  metrics["loss"] = (loss, jnp.ones((), jnp.float32))
  for source in srcs:
    metrics[f"{source}/tokens"] = (jnp.sum(srcs[source].mask.astype(jnp.float32)), jnp.ones(()))
  return loss, metrics


class FusedTerm(NamedTuple):
  """One weighted per-source registry divergence of an objective (see `fused_terms`)."""

  divergence: str  # registry name
  source: str  # "teacher", "student" or "ground_truth"
  weight: float
  params: dict  # the divergence's parameters
  metric: str  # metric key under the source, as `compute_loss` names it


def fused_terms(cfg: ObjectiveConfig) -> list[FusedTerm] | None:
  """The objective as weighted per-source registry divergences, for the fused head.

  The loss is sum weight * mean_source D(p || q), exactly `compute_loss`'s
  loss and metrics for these objectives. JS's one-sided terms are skew KLs
  of the same mixture m = (1 - beta) p + beta q: KL(q || m) on student samples
  is `skew_rkl(alpha=beta)`, KL(p || m) on teacher sequences is
  `skew_kl(alpha=1 - beta)`. None where the loss has no such form (exact JS's
  prefix-weighted mixture, cross-entropies, ENGINE, pre-distillation), which
  then runs unfused.
  """
  cfg = ObjectiveConfig.from_config(cfg)
  if cfg.name == "kl":
    return [FusedTerm("kl", "teacher", 1.0, {}, "kl")]
  if cfg.name == "rkl":
    return [FusedTerm("rkl", "student", 1.0, {}, "rkl")]
  if cfg.name == "kd":
    return [FusedTerm("kl", "ground_truth", 1.0, {}, "kl")]
  if cfg.name == "js" and not cfg.exact_js:
    b = cfg.beta
    return [
      FusedTerm("skew_rkl", "student", b, {"alpha": b}, "js"),
      FusedTerm("skew_kl", "teacher", 1 - b, {"alpha": 1 - b}, "js"),
    ]
  if cfg.name == "tvd":
    return [FusedTerm("tvd", side, 0.5, {}, "tvd") for side in ("student", "teacher")]
  if cfg.name == "fdiv":
    w, div = cfg.student_weight, cfg.divergence
    return [
      FusedTerm(div, "student", w, cfg.params, div),
      FusedTerm(div, "teacher", 1 - w, cfg.params, div),
    ]
  return None


def metric_means(metrics: Mapping[str, tuple]) -> dict[str, float]:
  """{name: sum / count} as Python floats (count 0 -> nan)."""
  out = {}
  for key, (total, count) in metrics.items():
    total, count = float(total), float(count)
    out[key] = total / count if count else float("nan")
  return out


def add_metrics(a: Mapping[str, tuple] | None, b: Mapping[str, tuple]) -> dict[str, tuple]:
  """Elementwise sum of two metric dicts of (sum, count) pairs."""
  if not a:
    return dict(b)
  return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in b}

"""Every f-DISTILL training objective, declared once as data, and its loss.

An objective reads up to three *sources*, each a set of sequences the student
is run on with teacher forcing:

* `teacher`: teacher sequences (the offline records' samples, or online
  teacher samples). The teacher's distribution on them comes from the stored
  top-k (so the teacher model need not be loaded) or from its logits.
* `student`: student samples drawn inside the training step (stop-gradient).
* `ground_truth`: the dataset's targets.

`OBJECTIVES` declares each objective as a list of weighted terms on sources
(reference §2 and §9: each term is a per-token mean over its source's mask,
and the loss is the weighted sum):

  kl      mean_teacher KL(p || q)
  rkl     mean_student KL(q || p)
  js      beta mean_student KL(q || m) + (1 - beta) mean_teacher KL(p || m),
          m = (1 - beta) p + beta q (or the exact prefix-weighted mixture)
  tvd     1/2 mean_student TVD + 1/2 mean_teacher TVD
  fdiv    w_s mean_student D(p || q) + (1 - w_s) mean_teacher D(p || q), any registry D
  seqkd   mean_teacher -log q(y_t)            (hard teacher tokens)
  engine  mean_student -sum_v q log p         (greedy student outputs)
  mle     mean_ground_truth -log q(y_t)
  kd      mean_ground_truth KL(p || q)        (word-level KD)
  predistill  alpha_kd kd + alpha_mle mle + alpha_hid hidden-state MSE

`ObjectiveConfig` (`config.objective`, validated once) resolves the table
into a frozen `StepPlan`: every decision the loop and the step need (sources,
teacher rows, teacher model, batch keys, top-k, decoding, fused or not) and
the concrete terms. Two loss forms iterate over `plan.terms`: `compute_loss`
on logits, `fused_loss` on hidden states with the output head fused in
(`fused_head.py`); both hand `(sum, count)` per term to `assemble`, which
returns `(loss, metrics)` with metrics as `(sum, count)` pairs (t5x style).
No other module compares objective names.

Gradients flow through the student's logits only; the teacher's are wrapped
in `stop_gradient` here as well, so a caller cannot leak a teacher gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fdistill_jax import divergences, records, terms
from fdistill_jax.divergences import TeacherTopK
from fdistill_jax.fused_head import fused_divergence_loss

Array = jax.Array
Metrics = dict[str, tuple[Array, Array]]

SOURCES = ("teacher", "student", "ground_truth")

# Term kinds besides the registry divergences (`divergences.REGISTRY`).
CONFIGURED = "divergence"  # the configured `objective.divergence`
JS_SIDE = "js_side"  # one side of JS(beta): KL(own || m) on the source
NLL = "nll"  # -log q(y_t) of the source's own tokens
ENGINE = "engine"  # -sum_v q log p
HIDDEN_MSE = "hidden_mse"  # hidden-state MSE over matched layers
# Kinds whose teacher side the records' top-k can serve on teacher sequences.
_TOPK_KINDS = (CONFIGURED, JS_SIDE)

# ---------------------------------------------------------------------------
# The objectives, as data.
# ---------------------------------------------------------------------------


class TermDef(NamedTuple):
  """One weighted term of an objective as declared.

  source: a name of `SOURCES`; kind: a registry divergence or one of the
  kinds above; weight: a number, or an `ObjectiveConfig` field name ("beta")
  or its complement ("1-beta").
  """

  source: str
  kind: str
  weight: float | str = 1.0


class ObjectiveDef(NamedTuple):
  """An objective: its terms, and how its student samples are drawn."""

  description: str  # one line for logs and docs
  terms: tuple[TermDef, ...]
  decoding: str = "sampler"  # student samples: the configured sampler, or "greedy"

  @property
  def sources(self) -> tuple[str, ...]:
    return tuple(s for s in SOURCES if any(t.source == s for t in self.terms))


OBJECTIVES: dict[str, ObjectiveDef] = {
  "kl": ObjectiveDef("KL(p||q) on teacher sequences", (TermDef("teacher", "kl"),)),
  "rkl": ObjectiveDef("KL(q||p) on student samples", (TermDef("student", "rkl"),)),
  "js": ObjectiveDef(
    "skew JS(beta), both sides",
    (TermDef("student", JS_SIDE, "beta"), TermDef("teacher", JS_SIDE, "1-beta")),
  ),
  "tvd": ObjectiveDef(
    "TVD bound, both sides", (TermDef("student", "tvd", 0.5), TermDef("teacher", "tvd", 0.5))
  ),
  "fdiv": ObjectiveDef(
    "any D(p||q), both sides",
    (
      TermDef("student", CONFIGURED, "student_weight"),
      TermDef("teacher", CONFIGURED, "1-student_weight"),
    ),
  ),
  "seqkd": ObjectiveDef("cross-entropy on hard teacher tokens", (TermDef("teacher", NLL),)),
  "engine": ObjectiveDef(
    "-sum q log p on greedy student outputs", (TermDef("student", ENGINE),), decoding="greedy"
  ),
  "mle": ObjectiveDef("cross-entropy on the ground truth", (TermDef("ground_truth", NLL),)),
  "kd": ObjectiveDef("word-level KL(p||q) on the ground truth", (TermDef("ground_truth", "kl"),)),
  "predistill": ObjectiveDef(
    "word-level KD + MLE + hidden-state MSE",
    (
      TermDef("ground_truth", "kl", "alpha_kd"),
      TermDef("ground_truth", NLL, "alpha_mle"),
      TermDef("ground_truth", HIDDEN_MSE, "alpha_hid"),
    ),
  ),
}


@dataclasses.dataclass(frozen=True)
class Term:
  """One resolved term of a plan: `weight * mean_source value`.

  kind: "divergence" (the registry `divergence` with `params`), "js_side",
  "nll", "engine" or "hidden_mse". fused: the registry divergence and
  parameters that compute this term from hidden states with the output head
  fused in (`fused_loss`); None where the term has no such form.
  """

  source: str
  kind: str
  weight: float
  metric: str  # metric key under the source
  divergence: str = ""
  params: tuple = ()  # sorted (name, value) pairs
  fused: tuple[str, tuple] | None = None

  @property
  def needs_teacher(self) -> bool:
    """Whether the term reads the teacher's distribution (or hidden states)."""
    return self.kind != NLL


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """Everything the loop and the step derive from the objective, decided once.

  Attributes:
    config: the validated objective config (term parameters: temperature,
      beta, exact_js, layer_map, normalize_hidden).
    sources: the sources the loss reads, in `SOURCES` order.
    terms: the weighted terms, in declaration order.
    online_teacher: teacher sequences are sampled in the step, not read.
    use_topk: the teacher's distribution on teacher sequences comes from the
      records' top-k (no teacher forward there).
    teacher_rows: sources the teacher model runs on at train time.
    teacher_model: whether the teacher model is needed at train time.
    batch_keys: the teacher-record keys every batch must carry.
    decoding: how student samples are drawn ("sampler" or "greedy"); None
      when no student samples are read.
    hidden: per-layer hidden states of both models are needed.
    fused: the loss runs on hidden states with the output head fused in.
  """

  config: ObjectiveConfig
  sources: tuple[str, ...]
  terms: tuple[Term, ...]
  online_teacher: bool
  use_topk: bool
  teacher_rows: tuple[str, ...]
  teacher_model: bool
  batch_keys: tuple[str, ...]
  decoding: str | None
  hidden: bool
  fused: bool

  @property
  def name(self) -> str:
    return self.config.name

  @property
  def ground_truth_only(self) -> bool:
    """Plain MLE: ground truth only and no teacher (what `train_teacher` trains)."""
    return self.sources == ("ground_truth",) and not self.teacher_model


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """`config.objective`, typed; defaults are those of `configs/distill.py`.

  Unknown keys raise in `from_config`.
  """

  name: str = "js"  # the objective (`OBJECTIVES`)
  beta: float = 0.85  # JS: the student's weight in m and on its side
  exact_js: bool = False  # JS: prefix-weighted mixture (the paper's ACL'23 correction)
  divergence: str = "js"  # fdiv: the registry divergence
  divergence_params: tuple = ()  # fdiv: sorted (name, value) pairs, e.g. (("alpha", 0.5),)
  student_weight: float = 0.5  # fdiv: weight of the student-sample term
  temperature: float = 1.0  # softens both distributions (stored top-k: the student only)
  use_teacher_topk: bool = True  # teacher side from the records' top-k when they have it
  alpha_kd: float = 0.8  # predistill: word-level KL weight (the original alpha_ce)
  alpha_mle: float = 0.2  # predistill: MLE weight (the original alpha_mlm)
  alpha_hid: float = 3.0  # predistill: hidden-state MSE weight
  normalize_hidden: bool = False  # predistill: layer-normalise hidden states before the MSE
  layer_map: tuple = ()  # predistill: teacher layer for each student layer; () = spread evenly
  schedule: str = ""  # phases such as "kl:0.5,tvd" (`objective_schedule`); "" = `name` throughout

  def __post_init__(self):
    if not isinstance(self.schedule, str):
      raise ValueError(
        f"objective.schedule: expected a string like 'kl:0.5,tvd', found {self.schedule!r}"
      )
    if self.name not in OBJECTIVES:
      raise ValueError(f"objective.name: expected one of {sorted(OBJECTIVES)}, found {self.name!r}")
    kinds = {t.kind for t in OBJECTIVES[self.name].terms}
    if JS_SIDE in kinds and not 0.0 < self.beta < 1.0:
      raise ValueError(f"objective.beta: expected a value in (0, 1), found {self.beta}")
    if CONFIGURED in kinds:
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
  def params(self) -> dict:
    return dict(self.divergence_params)

  def _weight(self, weight: float | str) -> float:
    if isinstance(weight, str):
      field = weight.removeprefix("1-")
      value = float(getattr(self, field))
      return 1.0 - value if field != weight else value
    return float(weight)

  def _term(self, d: TermDef) -> Term:
    weight = self._weight(d.weight)
    if d.kind == JS_SIDE:
      # JS's sides are skew KLs of the same mixture m = (1 - beta) p + beta q:
      # KL(q || m) is skew_rkl(alpha=beta), KL(p || m) is skew_kl(alpha=1 - beta).
      b = self.beta
      skew = ("skew_rkl", b) if d.source == "student" else ("skew_kl", 1 - b)
      fused = None if self.exact_js else (skew[0], (("alpha", skew[1]),))
      return Term(d.source, JS_SIDE, weight, "js", fused=fused)
    if d.kind in (NLL, ENGINE, HIDDEN_MSE):
      return Term(d.source, d.kind, weight, d.kind)
    name, params = (
      (self.divergence, self.divergence_params) if d.kind == CONFIGURED else (d.kind, ())
    )
    return Term(d.source, CONFIGURED, weight, name, name, params, fused=(name, params))

  def plan(self, *, online_teacher: bool = False, fused_head: bool = False) -> StepPlan:
    """The frozen plan of this objective.

    online_teacher: sample the teacher sequences in the step (config
    `train.online_teacher`); fused_head: fused loss where every term has a
    fused form (config `train.fused_head`).
    """
    spec = OBJECTIVES[self.name]
    resolved = tuple(self._term(d) for d in spec.terms)
    sources = spec.sources
    online = online_teacher and "teacher" in sources
    # The records' top-k serve the teacher side on teacher sequences when every
    # term there reads only the teacher's distribution.
    on_teacher = [t for t in resolved if t.source == "teacher" and t.needs_teacher]
    use_topk = (
      self.use_teacher_topk
      and not online
      and bool(on_teacher)
      and all(t.kind in _TOPK_KINDS for t in on_teacher)
    )
    rows = {t.source for t in resolved if t.needs_teacher} - ({"teacher"} if use_topk else set())
    teacher_rows = tuple(s for s in SOURCES if s in rows)
    batch_keys = ()
    if "teacher" in sources and not online:
      batch_keys = records.SEQUENCE_KEYS
      if use_topk:
        batch_keys += (records.TOKEN_LOGPROBS, *records.TOPK_KEYS)
    return StepPlan(
      config=self,
      sources=sources,
      terms=resolved,
      online_teacher=online,
      use_topk=use_topk,
      teacher_rows=teacher_rows,
      teacher_model=bool(teacher_rows) or online,
      batch_keys=batch_keys,
      decoding=spec.decoding if "student" in sources else None,
      hidden=any(t.kind == HIDDEN_MSE for t in resolved),
      fused=fused_head and all(t.fused is not None for t in resolved),
    )


def plan_from_config(config) -> StepPlan:
  """The plan of a distill/train_teacher config (`objective` and `train`)."""
  return ObjectiveConfig.from_config(config.objective).plan(
    online_teacher=bool(config.train.online_teacher), fused_head=bool(config.train.fused_head)
  )


# ---------------------------------------------------------------------------
# The loss: per-term (sum, count), then one assembly.
# ---------------------------------------------------------------------------


def _term_sum(cfg: ObjectiveConfig, term: Term, src: terms.Source) -> tuple[Array, Array]:
  """(sum, count) of one term's per-token values on `src` (unfused)."""
  where = term.source
  if term.kind == HIDDEN_MSE:
    if src.student_hidden is None or src.teacher_hidden is None:
      raise ValueError(f"source {where!r}: the hidden-state MSE needs student and teacher hidden")
    layer_map = cfg.layer_map or terms.default_layer_map(
      len(src.student_hidden), len(src.teacher_hidden)
    )
    return terms.hidden_mse(
      src.student_hidden, src.teacher_hidden, src.mask, layer_map, cfg.normalize_hidden
    )
  if term.kind == NLL:
    values = terms.nll_terms(src)
  elif term.kind == ENGINE:
    values = terms.engine_terms(cfg, src, where)
  elif term.kind == JS_SIDE:
    values = terms.js_side_terms(cfg, src, term.source, where)
  else:
    values = terms.divergence_terms(cfg, term.divergence, src, where, **dict(term.params))
  return divergences.weighted_sum(values, src.mask)


def assemble(
  plan: StepPlan, sums: Sequence[tuple[Array, Array]], masks: Mapping[str, Array]
) -> tuple[Array, Metrics]:
  """`(loss, metrics)` from each term's `(sum, count)`, in `plan.terms` order.

  loss = sum_terms weight * sum / count (a term over an empty mask adds 0);
  metrics: `source/metric` per term, `source/tokens` per source (`masks`:
  source -> `[R, T]`), and `loss`, all as (sum, count) pairs.
  """
  one = jnp.ones((), jnp.float32)
  metrics: Metrics = {}
  loss = jnp.zeros((), jnp.float32)
  for term, (total, count) in zip(plan.terms, sums, strict=True):
    metrics[f"{term.source}/{term.metric}"] = (total, count)
    loss = loss + term.weight * jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)
  metrics["loss"] = (loss, one)
  for source in plan.sources:
    metrics[f"{source}/tokens"] = (jnp.sum(masks[source].astype(jnp.float32)), one)
  return loss, metrics


def compute_loss(plan: StepPlan, sources: Mapping[str, terms.Source]) -> tuple[Array, Metrics]:
  """The plan's loss on logits: `sources` maps a source name to its `Source`."""
  for name in plan.sources:
    if sources.get(name) is None:
      raise ValueError(f"objective {plan.name!r} needs the {name!r} source; got {sorted(sources)}")
  sums = [_term_sum(plan.config, t, sources[t.source]) for t in plan.terms]
  return assemble(plan, sums, {s: sources[s].mask for s in plan.sources})


class FusedSource(NamedTuple):
  """One source for `fused_loss`: the student's final hidden states and the teacher's side.

  hidden: `[R, T, D]`; mask: `[R, T]`; teacher: exactly one of `topk` (stored
  top-k `[R, T, K]`) or `hidden` `[R, T, Dt]` with `head` (W_t `[Dt, V]`, scale).
  """

  hidden: Array
  mask: Array
  teacher_topk: TeacherTopK | None = None
  teacher_hidden: Array | None = None
  teacher_head: tuple | None = None


def fused_loss(
  plan: StepPlan,
  sources: Mapping[str, FusedSource],
  head: tuple[Array, Any],
  chunk_size: int,
  head_layout: str = "dv",
) -> tuple[Array, Metrics]:
  """The plan's loss from hidden states, with the student's output `head` (W, scale) fused in.

  No `[R, T, V]` logits exist (`fused_head.fused_divergence_loss`, `chunk_size`
  tokens at a time); equal to `compute_loss` on the same rows. head_layout:
  W's layout, "dv" ([D, V]) or "vd" ([V, D], `models.output_head_as_stored`).
  """
  if not plan.fused:
    raise ValueError(f"objective {plan.name!r}: some term has no fused form")
  w, scale = head
  sums = []
  for term in plan.terms:
    src = sources[term.source]
    name, params = term.fused
    teacher = (
      {"teacher_topk": src.teacher_topk}
      if src.teacher_topk is not None
      else {"teacher_hidden": src.teacher_hidden, "teacher_head": src.teacher_head}
    )
    sums.append(
      fused_divergence_loss(
        name,
        src.hidden,
        w,
        scale,
        src.mask,
        temperature=plan.config.temperature,
        chunk_size=chunk_size,
        head_layout=head_layout,
        **teacher,
        **dict(params),
      )
    )
  return assemble(plan, sums, {s: sources[s].mask for s in plan.sources})

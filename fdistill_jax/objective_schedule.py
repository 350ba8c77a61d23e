"""Objective schedules: one objective for the first part of training, then another.

`config.objective.schedule = "kl:0.5,tvd"` trains with KL for the first half
of `train.num_train_steps`, then with TVD from the state KL left (parameters,
optimizer moments, learning-rate schedule and data position all carry over).
The form is comma-separated phases `objective:until`, where `until` is the
fraction of `train.num_train_steps` at which the phase ends; the last phase
has no fraction and runs to the end. Fractions (not step counts) keep a
schedule meaningful when the run's length changes, as the learning-rate
schedule does. "kl:0.3,js:0.6,tvd" has three phases. Motivation: pure TVD
maximises the speculative-decoding acceptance 1 - TVD but trains poorly from
scratch; KL first, then TVD, works best ("LK losses", arXiv 2602.23881).

Every phase is `config.objective` with `name` replaced (beta, temperature,
... are shared), resolved once into its own frozen `objectives.StepPlan`;
`config.objective.name` must be the first phase's objective, so a config
reads the same with or without a schedule. An empty schedule is one phase of
`objective.name` over the whole run. The loop (`train.train_loop`) builds
and compiles one step per distinct plan and switches by the state's step
counter, so a resumed run lands in the phase of its checkpoint's step.
"""

from __future__ import annotations

import dataclasses

from fdistill_jax import objectives

WHERE = "config.objective.schedule"


class ScheduleError(ValueError):
  """A schedule that cannot be run (the message names `WHERE`)."""


@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase: its plan and the updates it takes (step counter in [start_step, end_step))."""

  plan: objectives.StepPlan
  start_step: int
  end_step: int


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The phases of a run, in order, covering [0, num_train_steps) without gaps."""

  text: str  # the schedule as configured ("" for a single objective)
  phases: tuple[Phase, ...]

  @property
  def name(self) -> str:
    """The schedule, or the single objective's name (logs, progress bar)."""
    return self.text or self.phases[0].plan.name

  @property
  def plans(self) -> tuple[objectives.StepPlan, ...]:
    """Distinct plans in order of first use (one compiled step each)."""
    return tuple(dict.fromkeys(p.plan for p in self.phases))

  def index_at(self, step: int) -> int:
    """The phase of the update taken when the state's step counter is `step`."""
    for i, phase in enumerate(self.phases):
      if step < phase.end_step:
        return i
    return len(self.phases) - 1

  # What the data and the models must offer: the union over the phases.
  @property
  def teacher_model(self) -> bool:
    return any(p.teacher_model for p in self.plans)

  @property
  def online_teacher(self) -> bool:
    return any(p.online_teacher for p in self.plans)

  @property
  def use_topk(self) -> bool:
    return any(p.use_topk for p in self.plans)

  @property
  def reads_teacher_records(self) -> bool:
    return any("teacher" in p.sources and not p.online_teacher for p in self.plans)

  @property
  def batch_keys(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(k for p in self.plans for k in p.batch_keys))


def split_spec(spec: str) -> tuple[str, str]:
  """An objective or a schedule -> (`objective.name`, `objective.schedule`).

  `"tvd"` -> ("tvd", ""); `"kl:0.5,tvd"` -> ("kl", "kl:0.5,tvd").
  """
  name = spec.split(",")[0].partition(":")[0].strip()
  return name, ("" if spec.strip() == name else spec)


def parse(text: str, num_train_steps: int, where: str = WHERE) -> tuple[tuple[str, int], ...]:
  """`"kl:0.5,tvd"` -> `(("kl", end_step), ("tvd", num_train_steps))`.

  Raises `ScheduleError` naming `where` for an unknown objective, a missing,
  malformed or non-increasing fraction, a fraction on the last phase, or a
  phase that would get no update (boundary = round(fraction * num_train_steps)).
  """
  parts = [p.strip() for p in text.split(",")]
  known = sorted(objectives.OBJECTIVES)
  out, previous = [], 0
  for i, part in enumerate(parts):
    last = i == len(parts) - 1
    name, sep, until = (s.strip() for s in part.partition(":"))
    if name not in objectives.OBJECTIVES:
      raise ScheduleError(
        f"{where}: phase {i + 1} of {text!r}: expected an objective of {known}, found {name!r}"
      )
    if last:
      if sep:
        raise ScheduleError(
          f"{where}: the last phase of {text!r} runs to the end of training: expected "
          f"{name!r} without ':fraction', found {part!r}"
        )
      end = num_train_steps
    else:
      try:
        fraction = float(until)
      except ValueError:
        fraction = None
      if not sep or fraction is None or not 0.0 < fraction < 1.0:
        raise ScheduleError(
          f"{where}: phase {i + 1} of {text!r}: expected 'objective:fraction' with the "
          f"fraction of train.num_train_steps at which it ends in (0, 1), found {part!r}"
        )
      end = round(fraction * num_train_steps)
    if end <= previous:
      raise ScheduleError(
        f"{where}: phase {i + 1} of {text!r} ({name!r}) would train steps [{previous}, {end}) "
        f"of train.num_train_steps {num_train_steps}: expected at least one step per phase "
        "(increasing fractions, or more steps)"
      )
    out.append((name, end))
    previous = end
  return tuple(out)


def from_config(config) -> Schedule:
  """The schedule of a distill/train_teacher config (`objective`, `train`); validates it."""
  base = objectives.ObjectiveConfig.from_config(config.objective)
  options = dict(
    online_teacher=bool(config.train.online_teacher), fused_head=bool(config.train.fused_head)
  )
  num_steps = int(config.train.num_train_steps)
  if not base.schedule:
    return Schedule("", (Phase(base.plan(**options), 0, num_steps),))
  bounds = parse(base.schedule, num_steps)
  if bounds[0][0] != base.name:
    raise ScheduleError(
      f"config.objective.name: expected the first objective of {WHERE} "
      f"{base.schedule!r}, {bounds[0][0]!r}; found {base.name!r}"
    )
  phases, start = [], 0
  for name, end in bounds:
    # Each phase's own checks (beta, divergence parameters) run here, before compiling.
    cfg = dataclasses.replace(base, name=name, schedule="")
    phases.append(Phase(cfg.plan(**options), start, end))
    start = end
  return Schedule(base.schedule, tuple(phases))

"""Objective schedules (KL, then TVD): parsing, the loop against single-objective steps, resume."""

import os
import signal

import jax
import numpy as np
import pytest

from configs import default, distill
from fdistill_jax import (
  main,
  metrics,
  models,
  objective_schedule,
  objectives,
  optimizer,
  pipeline,
  runguard,
  sharding,
  train,
  train_step,
)
from tests import _train_helpers as h

STEPS = 6
SCHEDULE = "kl:0.5,tvd"  # kl for updates 0-2, tvd for 3-5
BOUNDARY = 3


def _config(**train_overrides):
  c = h.config("kl", **{"num_train_steps": STEPS, "checkpoint_every_steps": 100, **train_overrides})
  c.objective.schedule = SCHEDULE
  return c


# ---------------------------------------------------------------------------
# Parsing and validation.
# ---------------------------------------------------------------------------


def test_parse_gives_each_phase_its_end_step():
  assert objective_schedule.parse("kl:0.5,tvd", 6) == (("kl", 3), ("tvd", 6))
  assert objective_schedule.parse("kl:0.25, js:0.5, tvd", 8) == (("kl", 2), ("js", 4), ("tvd", 8))
  assert objective_schedule.parse("tvd", 5) == (("tvd", 5),)
  assert objective_schedule.split_spec("kl:0.5,tvd") == ("kl", "kl:0.5,tvd")
  assert objective_schedule.split_spec("tvd") == ("tvd", "")


@pytest.mark.parametrize(
  "text, message",
  [
    ("kl:0.5,nope", r"phase 2 of 'kl:0.5,nope': expected an objective of \[.*'tvd'.*found 'nope'"),
    ("kl,tvd", r"phase 1 of 'kl,tvd': expected 'objective:fraction'.*found 'kl'"),
    ("kl:half,tvd", r"expected 'objective:fraction'.*found 'kl:half'"),
    ("kl:1.5,tvd", r"in \(0, 1\), found 'kl:1.5'"),
    ("kl:0.5,tvd:0.9", r"the last phase of 'kl:0.5,tvd:0.9' runs to the end"),
    ("kl:0.6,js:0.4,tvd", r"phase 2 .* \('js'\) would train steps \[4, 2\)"),
    ("kl:0.01,tvd", r"phase 1 .* would train steps \[0, 0\) of train.num_train_steps 6"),
  ],
)
def test_bad_schedules_raise_naming_the_key(text, message):
  with pytest.raises(objective_schedule.ScheduleError, match=message) as err:
    objective_schedule.parse(text, STEPS)
  assert str(err.value).startswith("config.objective.schedule: ")


def test_the_config_checks_refuse_a_bad_schedule_before_compiling(tmp_path):
  student = models.ModelConfig.from_config(h.model_config())
  c = _config()
  c.objective.schedule = "kl:0.5,tvd:0.9"
  with pytest.raises(ValueError, match="config.objective.schedule: the last phase"):
    main.check_config(c, student, student)
  c = _config()
  c.objective.name = "js"  # not the schedule's first objective
  with pytest.raises(ValueError, match="config.objective.name: expected the first objective"):
    main.check_config(c, student, student)
  c = _config()
  c.objective.beta = 1.5  # a phase's own checks run too
  c.objective.schedule = "kl:0.5,js"
  with pytest.raises(ValueError, match="objective.beta"):
    main.check_config(c, student, student)
  # The main job checks every method before its teacher trains.
  c = default.get_config()
  c.pipeline.methods = ("kl", "kl:0.5,tvd:1")
  with pytest.raises(ValueError, match="config.pipeline.methods: the last phase"):
    pipeline.run(c, str(tmp_path))
  assert os.listdir(tmp_path) == [runguard.LOCK_NAME]


def test_a_schedule_reads_what_any_phase_needs():
  schedule = objective_schedule.from_config(_config())
  assert [p.plan.name for p in schedule.phases] == ["kl", "tvd"]
  assert [(p.start_step, p.end_step) for p in schedule.phases] == [(0, 3), (3, 6)]
  assert schedule.index_at(2) == 0 and schedule.index_at(3) == 1
  assert not schedule.plans[0].teacher_model and schedule.teacher_model  # tvd runs the teacher
  assert schedule.use_topk and schedule.reads_teacher_records
  # Each phase is config.objective with only the name replaced.
  kl = objectives.ObjectiveConfig.from_config(dict(h.config("kl").objective, schedule=""))
  assert schedule.phases[0].plan == kl.plan(fused_head=True)
  # The command-line form: configs/distill.py:kl:0.5,tvd.
  c = distill.get_config("kl:0.5,tvd")
  assert (c.objective.name, c.objective.schedule) == ("kl", "kl:0.5,tvd")


def test_the_run_identity_holds_the_schedule_only_when_set():
  c = _config()
  assert runguard.train_identity(c, None)["objective"]["schedule"] == SCHEDULE
  plain = h.config("kl")
  old = h.config("kl")
  del old.objective["schedule"]  # a config from before schedules existed
  assert runguard.train_identity(plain, None) == runguard.train_identity(old, None)


# ---------------------------------------------------------------------------
# The loop: per-step losses equal kl's step then tvd's step from that state.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_():
  return models.build_model(h.model_config(), rngs=0), models.build_model(h.model_config(), rngs=1)


@pytest.fixture(scope="module")
def uninterrupted(models_, tmp_path_factory):
  student, teacher = models_
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  out = train.train_loop(
    _config(), workdir, student=student, teacher=teacher, data_fn=h.data_fn(teacher)
  )
  return out, metrics.read_metrics(workdir), workdir


def _reference(student, teacher):
  """Per-step losses and final params: kl's own step for 3 updates, then tvd's from that state."""
  c = h.config("kl", num_train_steps=STEPS)
  fs, ft = models.SplitModel(student), models.SplitModel(teacher)
  tx = optimizer.make_optimizer(c.train)
  mesh = sharding.mesh_from_config(c.mesh)
  state, shardings = train_step.init_state(fs, tx, c.train.seed, mesh)
  losses = []
  for name, steps in (("kl", range(BOUNDARY)), ("tvd", range(BOUNDARY, STEPS))):
    plan = objectives.ObjectiveConfig(name=name).plan(fused_head=True)
    step_fn = train_step.make_train_step(
      plan,
      fs,
      tx,
      teacher=ft if plan.teacher_model else None,
      sampler=h.sampler_for(name),
      num_teacher_samples=h.N,
      max_target_len=h.T,
    )
    jitted = train_step.jit_step(step_fn, shardings, mesh)
    for i in steps:
      batch = train_step.put_batch(h.make_batch(i, teacher), mesh)
      state, m = jitted(state, batch, ft.params if plan.teacher_model else None)
      losses.append(float(m["loss"][0]))
  return losses, jax.device_get(state["params"])


def test_the_loop_equals_kl_steps_then_tvd_steps_from_that_state(models_, uninterrupted):
  student, teacher = models_
  out, rows, _ = uninterrupted
  want_losses, want_params = _reference(student, teacher)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["train/loss"] for r in rows], want_losses, rtol=1e-5, atol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out["params"], want_params
  )
  # The rows say which objective is active, and carry only its terms.
  for r in rows:
    active = "kl" if r["step"] <= BOUNDARY else "tvd"
    assert r["train/phase"] == (0.0 if active == "kl" else 1.0)
    assert r[f"train/objective/{active}"] == 1.0
    assert ("train/teacher/kl" in r) == (active == "kl")
    assert ("train/student/tvd" in r) == (active == "tvd")


def test_a_log_interval_across_the_boundary_is_cut_there(models_, tmp_path):
  student, teacher = models_
  c = _config(log_every_steps=2, num_train_steps=4)
  c.objective.schedule = "kl:0.25,seqkd"  # kl for update 0 only; neither samples
  train.train_loop(c, str(tmp_path), student=student, teacher=teacher, data_fn=h.data_fn(teacher))
  rows = metrics.read_metrics(str(tmp_path))
  assert [(r["step"], r["train/phase"]) for r in rows] == [(1, 0), (2, 1), (4, 1)]


# ---------------------------------------------------------------------------
# Resume across the boundary.
# ---------------------------------------------------------------------------


def test_resume_across_the_boundary_equals_the_uninterrupted_run(models_, uninterrupted, tmp_path):
  student, teacher = models_
  workdir = str(tmp_path)

  def run(stop_at=None):
    def preempt(step, state):
      if step == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)

    return train.train_loop(
      _config(),
      workdir,
      student=student,
      teacher=teacher,
      data_fn=h.data_fn(teacher),
      step_callback=preempt,
    )

  # Stopped inside kl, resumed across the boundary; stopped on it, resumed in tvd.
  for stop_at in (2, BOUNDARY):
    stopped = run(stop_at)
    assert stopped["preempted"] and stopped["step"] == stop_at
  out = run()
  want, want_rows, _ = uninterrupted
  rows = metrics.read_metrics(workdir)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  np.testing.assert_allclose(
    [r["train/loss"] for r in rows], [r["train/loss"] for r in want_rows], rtol=1e-6, atol=1e-6
  )
  assert [r["train/phase"] for r in rows] == [r["train/phase"] for r in want_rows]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
    out["params"],
    want["params"],
  )


def test_resuming_under_another_schedule_is_refused(models_, uninterrupted):
  student, teacher = models_
  _, _, workdir = uninterrupted
  other = _config()
  other.objective.schedule = "kl:0.5,js"
  with pytest.raises(runguard.IdentityMismatch, match="objective.schedule: workdir has 'kl:0.5"):
    train.train_loop(other, workdir, student=student, teacher=teacher, data_fn=h.data_fn(teacher))

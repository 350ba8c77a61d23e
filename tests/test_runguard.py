"""Runs own their workdir: preemption stops the job, divergence stops training,
another run identity or a second process is refused, resumes write no duplicates."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fdistill_jax import checkpoints, metrics, models, pipeline, runguard, train
from fdistill_jax import records as rec
from tests import _train_helpers as h

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  return env


def _saved_params(ckpt_dir: str) -> dict[int, list[np.ndarray]]:
  """step -> parameter leaves of every finished checkpoint in `ckpt_dir`."""
  ckpt = checkpoints.Checkpointer(ckpt_dir)
  out = {}
  for step in ckpt.all_steps():
    saved = ckpt.manager.item_metadata(step).state
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), saved)
    state, _ = ckpt.restore(target, step)
    out[step] = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
  ckpt.close()
  return out


def _mle(**train_overrides):
  return h.config("mle", **train_overrides)


def _student():
  return models.build_model(h.model_config(), rngs=0)


# ---------------------------------------------------------------------------
# Point 1: the main job stops when a stage is preempted.
# ---------------------------------------------------------------------------


def test_sigterm_in_the_teachers_training_stops_the_main_job(tmp_path, monkeypatch):
  from configs import default

  config = default.get_config()
  config.pipeline.update(dict(teacher_steps=40, teacher_batch_size=8))
  config.teacher.model.update(dict(d_model=16, d_ff=32))
  config.train.update(dict(checkpoint_every_steps=1000, progress_bar=False, tensorboard=False))
  config.task.max_examples = 16
  loop = train.train_loop

  def preempt_at_step_3(*args, **kwargs):
    def callback(step, state):
      if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)  # the real signal, caught by the job's guard

    return loop(*args, step_callback=callback, **kwargs)

  monkeypatch.setattr(train, "train_loop", preempt_at_step_3)
  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(runguard.Preempted, match="step 3"):
    pipeline.run(config, str(tmp_path))
  assert signal.getsignal(signal.SIGTERM) is previous
  ckpt = checkpoints.Checkpointer(str(tmp_path / "teacher" / "checkpoints"))
  assert ckpt.all_steps() == [3]
  ckpt.close()
  # Nothing after the teacher ran: no records, students, evaluations or report.
  assert sorted(os.listdir(tmp_path)) == [runguard.LOCK_NAME, "teacher"]


def test_sigterm_stops_the_teacher_pass_at_a_shard_boundary(tmp_path, monkeypatch):
  from tests.test_teacher_pass import run_pass, shard_bytes

  boundaries = []

  def sigterm_before_the_second_shard():
    boundaries.append(1)
    return len(boundaries) >= 2

  monkeypatch.setattr(runguard, "preemption_requested", sigterm_before_the_second_shard)
  with pytest.raises(runguard.Preempted, match="finished shards are kept"):
    run_pass(tmp_path / "a")
  assert len(shard_bytes(tmp_path / "a")) == 1  # shard 0, computed before the signal, is written
  assert rec.read_manifest(str(tmp_path / "a"))["status"] == "incomplete"
  monkeypatch.undo()
  run_pass(tmp_path / "a")
  run_pass(tmp_path / "b")
  assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_stored_evaluations_are_keyed_by_the_checkpoints_behind_them(tmp_path):
  from configs import default

  config = default.get_config()
  run_dir, teacher_dir = str(tmp_path / "student"), str(tmp_path / "teacher")
  c = _mle(num_train_steps=2)
  train.train_loop(c, run_dir, student=_student(), data_fn=h.data_fn())
  key = pipeline.eval_key(config, run_dir, teacher_dir)
  assert key["model"]["step"] == 2 and key["model"]["identity"]
  assert key["teacher"] == {"identity": None, "step": None}  # no teacher trained here
  path = str(tmp_path / "student.json")
  with open(path, "w") as f:
    json.dump({"key": key, "metrics": {"bleu": 1.0}}, f)
  assert pipeline.read_eval(path, pipeline.eval_key(config, run_dir, teacher_dir)) == {"bleu": 1.0}
  # The student trains on: the stored metrics describe a model that is gone.
  c.train.num_train_steps = 3
  train.train_loop(c, run_dir, student=_student(), data_fn=h.data_fn())
  assert pipeline.read_eval(path, pipeline.eval_key(config, run_dir, teacher_dir)) is None
  # Other evaluation settings also invalidate them.
  with open(path, "w") as f:
    json.dump({"key": pipeline.eval_key(config, run_dir, teacher_dir), "metrics": {}}, f)
  config.pipeline.eval_samples += 1
  assert pipeline.read_eval(path, pipeline.eval_key(config, run_dir, teacher_dir)) is None
  # A file in the old format (metrics only, no key) is evaluated again.
  with open(path, "w") as f:
    json.dump({"bleu": 1.0}, f)
  assert pipeline.read_eval(path, pipeline.eval_key(config, run_dir, teacher_dir)) is None


# ---------------------------------------------------------------------------
# Point 2: non-finite training stops, and is never saved.
# ---------------------------------------------------------------------------


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_keeps_good_checkpoints(
  tmp_path, capsys
):
  # Warmup from 0 (the defaults): the first steps are finite, then the parameters blow up.
  c = _mle(learning_rate=1e30, warmup_steps=10, num_train_steps=12, checkpoint_every_steps=1)

  def mode(config, workdir):  # a command-line mode, as main runs it
    train.train_loop(config, workdir, student=_student(), data_fn=h.data_fn())

  assert runguard.run_mode(mode, c, str(tmp_path)) == runguard.EXIT_DIVERGED == 3
  message = capsys.readouterr().out
  match = re.search(r"non-finite training at step (\d+) \(loss=\S+, grad_norm=\S+, param", message)
  assert match, message
  bad = int(match.group(1))
  assert 1 < bad < 12
  saved = _saved_params(str(tmp_path / "checkpoints"))
  assert sorted(saved) == list(range(max(1, bad - 3), bad))
  for step, leaves in saved.items():
    assert all(np.isfinite(x).all() for x in leaves), step
  assert f"last good checkpoint: step {bad - 1}" in message
  rows = metrics.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == list(range(1, bad))
  assert all(np.isfinite(r["train/loss"]) for r in rows)


def _poisoned(from_batch: int):
  """h.data_fn's stream with a NaN target mask from batch `from_batch` (1-based) on."""
  data = h.data_fn()

  def data_fn(position):
    start = int((position or {}).get("batches", 0))
    for i, batch in enumerate(data(position), start + 1):
      yield dict(batch, target_mask=batch["target_mask"] * (np.nan if i >= from_batch else 1.0))

  return data_fn


def test_rotation_never_deletes_the_last_good_checkpoints(tmp_path):
  c = _mle(num_train_steps=12, checkpoint_every_steps=1, keep_checkpoints=3)
  with pytest.raises(runguard.Diverged, match="at step 7 .*last good checkpoint: step 6"):
    train.train_loop(c, str(tmp_path), student=_student(), data_fn=_poisoned(7))
  saved = _saved_params(str(tmp_path / "checkpoints"))
  assert sorted(saved) == [4, 5, 6]
  assert all(np.isfinite(x).all() for leaves in saved.values() for x in leaves)


def test_patience_skips_non_finite_updates_then_stops(tmp_path):
  """Non-finite gradients (a NaN target mask) are skipped: parameters stay as they were."""
  c = _mle(num_train_steps=6, checkpoint_every_steps=1, nonfinite_patience=2)
  with pytest.raises(runguard.Diverged, match="at step 5 .* 3 such step") as err:
    train.train_loop(c, str(tmp_path), student=_student(), data_fn=_poisoned(3))
  assert "nonfinite_patience=2" in str(err.value)
  saved = _saved_params(str(tmp_path / "checkpoints"))
  assert sorted(saved) == [2, 3, 4]  # 3 and 4 are the skipped steps: still step 2's parameters
  for step in (3, 4):
    for a, b in zip(saved[2], saved[step], strict=True):
      np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Point 3: a workdir belongs to one run identity.
# ---------------------------------------------------------------------------


def test_a_workdir_refuses_another_run_identity_naming_the_fields(tmp_path):
  workdir = str(tmp_path)
  c = h.config("kl", num_train_steps=2)
  train.train_loop(c, workdir, student=_student(), data_fn=h.data_fn())
  teacher = models.build_model(h.model_config(), rngs=1)

  other = h.config("js", num_train_steps=4)
  with pytest.raises(runguard.IdentityMismatch, match="objective.name: workdir has 'kl', this run"):
    train.train_loop(other, workdir, student=_student(), teacher=teacher, data_fn=h.data_fn())
  for change, field in (
    (dict(learning_rate=1e-3), "train.learning_rate: workdir has 0.03, this run has 0.001"),
    (dict(batch_size=8), "train.batch_size: workdir has 4, this run has 8"),
  ):
    with pytest.raises(runguard.IdentityMismatch, match=field.replace(".", r"\.")) as err:
      train.train_loop(
        h.config("kl", num_train_steps=4, **change), workdir, student=_student(),
        data_fn=h.data_fn(),
      )  # fmt: skip
    assert "override_run_identity" in str(err.value)
  # Another architecture: this message, not orbax's tree mismatch; no override.
  wide = models.build_model(models.get_preset("t5-tiny", vocab_size=h.V, d_model=24, d_ff=32,
                                              num_heads=2, num_layers=1), rngs=0)  # fmt: skip
  c_wide = h.config("kl", num_train_steps=4, override_run_identity=True)
  with pytest.raises(runguard.IdentityMismatch, match="model.d_model: workdir has 16, this run"):
    train.train_loop(c_wide, workdir, student=wide, data_fn=h.data_fn())
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [2]  # nothing written by the refused runs
  ckpt.close()
  # An explicit override continues the checkpoints under the new settings.
  c_lr = h.config("kl", num_train_steps=3, learning_rate=1e-3, override_run_identity=True)
  out = train.train_loop(c_lr, workdir, student=_student(), data_fn=h.data_fn())
  assert out["step"] == 3
  with open(os.path.join(workdir, runguard.IDENTITY_NAME)) as f:
    assert json.load(f)["train"]["learning_rate"] == 1e-3


def test_identity_diff_names_nested_leaves():
  old = {"a": {"b": 1, "c": [1, 2]}, "d": None}
  new = {"a": {"b": 2, "c": [1, 2]}, "e": 1}
  assert runguard.identity_diff(old, new) == [
    ("a.b", 1, 2),
    ("d", None, "<absent>"),
    ("e", "<absent>", 1),
  ]


# ---------------------------------------------------------------------------
# Point 4: one process per workdir.
# ---------------------------------------------------------------------------

HOLD_LOCK = os.path.join(REPO, "tests", "hold_workdir_lock.py")  # holds a workdir lock


def test_a_second_process_is_refused_and_a_killed_ones_lock_is_recovered(tmp_path):
  workdir = str(tmp_path)
  # A save in progress of the first process (orbax's temporary folder).
  in_progress = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000"
  in_progress.mkdir(parents=True)
  holder = subprocess.Popen(
    [sys.executable, HOLD_LOCK, workdir], env=_child_env(), stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    c = _mle(num_train_steps=2)
    with pytest.raises(runguard.WorkdirLocked, match=f"in use by pid {holder.pid} on host"):
      train.train_loop(c, workdir, student=_student(), data_fn=h.data_fn())
    assert in_progress.is_dir()  # the refused start cleaned nothing up
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / runguard.IDENTITY_NAME).exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  # The killed holder's lock file is still there; the next start takes it over.
  assert (tmp_path / runguard.LOCK_NAME).exists()
  with runguard.workdir_lock(workdir):
    with open(tmp_path / runguard.LOCK_NAME) as f:
      assert json.load(f)["pid"] == os.getpid()
    with runguard.workdir_lock(workdir):  # nested owners in one process share it
      pass


# ---------------------------------------------------------------------------
# Point 9: the preemption exit code; no duplicate metrics after a resume.
# ---------------------------------------------------------------------------


def test_sigterm_on_the_command_line_exits_75_after_saving(tmp_path):
  workdir = tmp_path / "teacher"
  flags = dict(
    num_train_steps=100000, batch_size=4, max_input_len=32, max_target_len=12,
    log_every_steps=1, eval_every_steps=0, checkpoint_every_steps=100000,
    progress_bar=False, tensorboard=False,
  )  # fmt: skip
  args = [f"--config.train.{k}={v}" for k, v in flags.items()]
  args += [f"--config.model.{k}={v}" for k, v in dict(d_model=16, d_ff=32, num_layers=1).items()]
  child = subprocess.Popen(
    [sys.executable, "-m", "fdistill_jax.main", "--mode=train_teacher",
     "--config=configs/train_teacher.py", f"--workdir={workdir}", "--config.mesh.data=1", *args],
    cwd=REPO, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
  )  # fmt: skip
  deadline = time.time() + 240
  while not metrics.read_metrics(str(workdir)) and child.poll() is None and time.time() < deadline:
    time.sleep(0.5)
  child.send_signal(signal.SIGTERM)
  out, _ = child.communicate(timeout=240)
  assert child.returncode == runguard.EXIT_PREEMPTED == 75, out[-3000:]
  assert "preempted (SIGTERM) at step" in out
  ckpt = checkpoints.Checkpointer(str(workdir / "checkpoints"))
  (step,) = ckpt.all_steps()
  ckpt.close()
  assert 1 <= step < 100000 and f"at step {step}" in out


def test_a_resume_leaves_no_duplicate_metric_rows(tmp_path):
  workdir = str(tmp_path)
  c = _mle(num_train_steps=4, checkpoint_every_steps=2)
  evals = []

  def eval_fn(model, step):
    evals.append(step)
    return {"nll": float(step)}

  train.train_loop(c, workdir, student=_student(), data_fn=h.data_fn(), eval_fn=eval_fn)
  # As if killed after logging steps 3 and 4 but before step 4's checkpoint.
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [2, 4]
  ckpt.manager.delete(4)
  ckpt.close()
  train.train_loop(c, workdir, student=_student(), data_fn=h.data_fn(), eval_fn=eval_fn)
  # A finished run started again trains nothing and evaluates nothing again.
  out = train.train_loop(c, workdir, student=_student(), data_fn=h.data_fn(), eval_fn=eval_fn)
  assert out["eval"] == {"nll": 4.0} and evals == [4, 4]
  rows = metrics.read_metrics(workdir)
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in rows if "eval/nll" in r] == [4]

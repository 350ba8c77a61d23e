"""The distillation trainer: learning, resume after SIGKILL, 1 vs 8 devices, SIGTERM, configs."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fdistill_jax import (
  checkpoints,
  decoding,
  main,
  metrics,
  models,
  objectives,
  optimizer,
  sharding,
  train,
  train_step,
)
from tests import _train_helpers as h

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
  student = models.build_model(h.model_config(), rngs=0)
  teacher = models.build_model(h.model_config(), rngs=1)
  return student, teacher


def _step_setup(objective, student, teacher, mesh_shape, online=False, **train_overrides):
  c = h.config(objective, online_teacher=online, **train_overrides)
  plan = objectives.plan_from_config(c)
  fs = models.SplitModel(student)
  ft = models.SplitModel(teacher) if plan.teacher_model else None
  tx = optimizer.make_optimizer(c.train)
  step_fn = train_step.make_train_step(
    plan,
    fs,
    tx,
    teacher=ft,
    sampler=h.sampler_for(objective),
    teacher_sampler=decoding.default_sampler("sampler", c.sampler, h.T) if online else None,
    grad_accum_steps=c.train.grad_accum_steps,
    num_teacher_samples=c.train.num_teacher_samples,
    max_target_len=h.T,
    fused_chunk_size=7,  # does not divide the token count: exercises the padded chunk
  )
  mesh = sharding.mesh_from_config(mesh_shape)
  state, shardings = train_step.init_state(fs, tx, 0, mesh)
  tparams = jax.device_put(ft.params, ft.shardings(mesh)) if ft else None
  return train_step.jit_step(step_fn, shardings, mesh), state, tparams, mesh


@pytest.mark.parametrize("objective", sorted(objectives.OBJECTIVES))
def test_a_few_steps_reduce_the_loss(tiny, objective):
  student, teacher = tiny
  step, state, tparams, mesh = _step_setup(objective, student, teacher, {"data": 1})
  batch = train_step.put_batch(h.make_batch(0, teacher), mesh)
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch, tparams)
    losses.append(float(metrics["loss"][0]))
  assert np.all(np.isfinite(losses)), losses
  # Student samples change every step, so compare averages, not single steps.
  assert np.mean(losses[-3:]) < np.mean(losses[:2]), losses
  assert int(state["step"]) == 8


def test_online_teacher_sequences_are_drawn_in_the_step(tiny):
  student, teacher = tiny
  step, state, tparams, mesh = _step_setup("kl", student, teacher, {"data": 1}, online=True)
  batch = h.make_batch(0, teacher)
  # The records' teacher arrays are not read: garbage there changes nothing.
  poisoned = dict(batch, teacher_tokens=batch["teacher_tokens"] * 0 + 7)
  poisoned["teacher_mask"] = np.ones_like(batch["teacher_mask"])
  _, m1 = step(state, train_step.put_batch(batch, mesh), tparams)
  step, state, tparams, mesh = _step_setup("kl", student, teacher, {"data": 1}, online=True)
  _, m2 = step(state, train_step.put_batch(poisoned, mesh), tparams)
  assert float(m1["loss"][0]) == float(m2["loss"][0]) > 0
  # One sample per input (config.sampler.num_samples), not the records' N.
  assert 0 < float(m1["teacher/tokens"][0]) <= h.B * h.T


@pytest.mark.parametrize("objective", ["kl", "js", "tvd"])
def test_fused_head_step_equals_the_unfused_step(tiny, objective):
  # kl reads the records' top-k; tvd runs the teacher (hidden + head) on both
  # sides; js maps its one-sided terms to skew_kl (top-k) and skew_rkl (hidden).
  # The metrics include the loss, each term and the gradient norm.
  student, teacher = tiny
  results = []
  for fused in (False, True):
    step, state, tparams, mesh = _step_setup(
      objective, student, teacher, {"data": 1}, fused_head=fused, learning_rate=1e-3
    )
    state, metrics = step(state, train_step.put_batch(h.make_batch(0, teacher), mesh), tparams)
    results.append((jax.device_get(metrics), jax.device_get(state["params"])))
  (m0, p0), (m1, p1) = results
  assert sorted(m0) == sorted(m1)
  for key in m0:
    np.testing.assert_allclose(m0[key][0], m1[key][0], rtol=1e-5, atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), p0, p1)


def test_one_and_eight_devices_give_the_same_step(tiny):
  student, teacher = tiny
  results = []
  for shape in ({"data": 1}, {"data": 2, "fsdp": 2, "model": 2}):
    step, state, tparams, mesh = _step_setup("js", student, teacher, shape, learning_rate=1e-3)
    batch = train_step.put_batch(h.make_batch(0, teacher), mesh)
    losses = []
    for _ in range(2):
      state, metrics = step(state, batch, tparams)
      losses.append(float(metrics["loss"][0]))
    results.append((losses, float(metrics["grad_norm"][0]), jax.device_get(state["params"])))
  (loss1, g1, p1), (loss8, g8, p8) = results
  # Same student samples (keys follow example indices, not devices), same loss.
  np.testing.assert_allclose(loss1, loss8, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g1, g8, rtol=1e-4)
  # Adam divides by sqrt(v): float32 reduction-order noise on near-zero
  # gradients moves a parameter by up to ~lr, hence the looser atol here.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), p1, p8)


def test_gradient_accumulation_matches_the_full_batch(tiny):
  student, teacher = tiny
  full = h.make_batch(0)
  for key in ("target_mask",):  # equal token counts per micro-batch: equal means
    full[key] = np.ones_like(full[key])
  params = []
  for accum in (1, 2):
    step, state, tparams, mesh = _step_setup(
      "mle", student, teacher, {"data": 1}, grad_accum_steps=accum
    )
    state, _ = step(state, train_step.put_batch(full, mesh), tparams)
    params.append(jax.device_get(state["params"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *params)


def test_frozen_embeddings_do_not_move(tiny, tmp_path):
  student, teacher = tiny
  c = h.config("mle", freeze_embeddings=True, num_train_steps=3)
  out = train.train_loop(c, str(tmp_path), student=student, data_fn=h.data_fn())
  before = models.SplitModel(student).params
  np.testing.assert_array_equal(out["params"]["embed"]["embedding"], before["embed"]["embedding"])
  moved = out["params"]["decoder"]["final_norm"]["scale"] - before["decoder"]["final_norm"]["scale"]
  assert np.abs(moved).max() > 0
  rows = metrics.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["train/loss"]) for r in rows)


def test_sigterm_saves_a_checkpoint_and_returns(tiny, tmp_path):
  student, teacher = tiny
  c = h.config("kl", num_train_steps=50, checkpoint_every_steps=1000)

  def callback(step, state):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  previous = signal.getsignal(signal.SIGTERM)
  out = train.train_loop(
    c, str(tmp_path), student=student, data_fn=h.data_fn(), step_callback=callback
  )
  assert out["preempted"] and out["step"] == 3
  assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.latest_step() == 3
  ckpt.close()
  # A restart picks up at step 3 with the data position after 3 batches.
  c.train.num_train_steps = 5
  seen = []
  data = h.data_fn()

  def data_fn(position):
    seen.append(position)
    return data(position)

  out = train.train_loop(c, str(tmp_path), student=student, data_fn=data_fn)
  assert seen == [{"batches": 3}] and out["step"] == 5


_CHILD = textwrap.dedent(
  """
  import os, signal, sys
  import numpy as np
  sys.path.insert(0, {repo!r})
  from fdistill_jax import models, train
  from tests import _train_helpers as h
  # Pairs of (workdir, kill_at, out), run one after the other in this process.
  runs = [sys.argv[i : i + 3] for i in range(1, len(sys.argv), 3)]
  for workdir, kill_at, out in runs:
    kill_at = int(kill_at)
    c = h.config("js", num_train_steps=8, checkpoint_every_steps=2)
    student = models.build_model(h.model_config(), rngs=0)
    teacher = models.build_model(h.model_config(), rngs=1)
    def callback(step, state):
      if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    res = train.train_loop(c, workdir, student=student, teacher=teacher,
                           data_fn=h.data_fn(teacher), sampler=h.sampler_for("js"),
                           step_callback=callback)
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(res["params"])]
    np.savez(out, *leaves)
  """
)


def _run_child(script, cache, *runs):
  """Runs (workdir, kill_at, out) triples in one child process, in order."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return subprocess.run(
    [sys.executable, str(script), *(str(arg) for run in runs for arg in run)],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_same_parameters(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(_CHILD.format(repo=REPO))
  cache = str(tmp_path / "jax_cache")
  # One process runs straight through (b), then is killed at step 5 of a
  # second run (a: after the async save of step 4 started); a fresh process
  # resumes a. The straight run goes first so that the kill loses nothing.
  killed = _run_child(script, cache, (tmp_path / "b", -1, tmp_path / "b.npz"),
                      (tmp_path / "a", 5, tmp_path / "a.npz"))  # fmt: skip
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert (tmp_path / "b.npz").exists() and not (tmp_path / "a.npz").exists()
  resumed = _run_child(script, cache, (tmp_path / "a", -1, tmp_path / "a.npz"))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
  assert len(a.files) == len(b.files) > 0
  for key in a.files:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda c: c.train.update(dict(batch_size=5, grad_accum_steps=2)), "not divisible"),
    (lambda c: c.teacher.model.update(dict(vocab_size=64)), "vocab_size"),
    (lambda c: c.objective.update(dict(name="nope")), "objective.name"),
    (lambda c: c.objective.update(dict(beta=1.5)), "objective.beta"),
    (lambda c: c.sampler.update(dict(name="beam_sample", top_p=0.9)), "takes"),
    (lambda c: c.sampler.update(dict(name="nucleus")), "unknown decoding method"),
  ],
)
def test_bad_configs_raise_before_compiling(change, message):
  c = h.config("js")
  change(c)
  with pytest.raises(ValueError, match=message):
    main.check_config(
      c,
      models.ModelConfig.from_config(c.student.model),
      models.ModelConfig.from_config(c.teacher.model),
    )


def test_max_target_len_over_the_position_table_raises():
  c = h.config("mle", max_target_len=4096)
  c.student.model = models.get_preset("bart-tiny")
  with pytest.raises(ValueError, match="max_positions"):
    main.check_config(c, models.ModelConfig.from_config(c.student.model))


def test_decoder_only_lengths_count_prompt_and_continuation():
  c = h.config("mle", max_input_len=100, max_target_len=40)
  c.student.model = models.get_preset("gpt2-tiny")  # max_positions 128
  with pytest.raises(ValueError, match="max_input_len 100 exceeds"):
    main.check_config(c, models.ModelConfig.from_config(c.student.model))


def test_paper_settings_pass_the_config_checks():
  from configs import distill_paper

  for setting in distill_paper.SETTINGS:
    for objective in objectives.OBJECTIVES:
      c = distill_paper.get_config(f"{setting}:{objective}")
      main.check_config(
        c,
        models.ModelConfig.from_config(c.student.model),
        models.ModelConfig.from_config(c.teacher.model),
      )
  c = distill_paper.get_config("wmt16_en_ro:js")
  assert (c.objective.beta, c.train.optimizer, c.sampler.top_k) == (0.25, "adafactor", 40)
  c = distill_paper.get_config("commonsense_dialogue:engine")
  assert (c.sampler.name, c.sampler.top_p, c.train.grad_accum_steps) == ("sample", 0.9, 2)


def test_locked_config_rejects_unknown_keys():
  c = h.config("js")
  c.lock()
  with pytest.raises(AttributeError, match="bogus"):
    c.train.bogus = 1


def test_learning_rate_schedule_warms_up_then_decays_to_zero():
  c = h.config("mle", warmup_steps=10, num_train_steps=30, learning_rate=1.0)
  lr = optimizer.learning_rate_schedule(c.train)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(20)) == pytest.approx(0.5)
  assert float(lr(30)) == pytest.approx(0.0)


def test_command_line_modes_train_a_teacher_then_distill_from_its_checkpoint(tmp_path):
  from configs import distill, train_teacher

  small = dict(
    num_train_steps=2,
    batch_size=4,
    max_input_len=32,
    max_target_len=12,
    log_every_steps=1,
    eval_every_steps=2,
    eval_batches=1,
    progress_bar=False,
  )
  tc = train_teacher.get_config()
  tc.model.update(dict(d_model=16, d_ff=32, num_heads=2, num_layers=1))
  tc.train.update(small)
  tc.mesh.data = 1
  out = main.run_teacher(tc, str(tmp_path / "teacher"))
  assert out["step"] == 2 and np.isfinite(out["eval"]["nll"])
  assert os.path.isdir(tmp_path / "teacher" / "tensorboard")

  dc = distill.get_config("rkl")
  dc.teacher.model = tc.model
  dc.teacher.checkpoint = str(tmp_path / "teacher" / "checkpoints")
  dc.student.model.update(dict(d_model=16, d_ff=32, num_heads=2))
  dc.train.update(small)
  dc.mesh.data = 1
  out = main.run_distill(dc, str(tmp_path / "rkl"))
  assert out["step"] == 2
  rows = metrics.read_metrics(str(tmp_path / "rkl"))
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2]
  assert all(r["train/student/tokens"] > 0 for r in train_rows)
  teacher_rows = metrics.read_metrics(str(tmp_path / "teacher"))
  assert [r["step"] for r in teacher_rows if "eval/nll" in r] == [2]


def test_distills_from_teacher_pass_records(tmp_path):
  """The records reader feeds the trainer: top-k teacher side, reader position checkpointed."""
  from fdistill_jax import teacher_pass as tp
  from fdistill_jax.data import reader, tasks

  c = h.config("js", num_train_steps=2, max_input_len=32, max_target_len=10, batch_size=4)
  c.task.max_examples = 8
  c.student.model = models.get_preset("t5-tiny", vocab_size=128, d_model=16, d_ff=32, num_heads=2)
  c.teacher.model = c.student.model
  c.teacher_pass.out_dir = str(tmp_path / "records")
  task = tasks.get_task(c.task)
  teacher = models.build_model(c.teacher.model, rngs=1)
  pc = tp.PassConfig(
    num_samples=2,
    sampler="sample",
    top_k=8,
    records_per_shard=4,
    batch_size=4,
    max_input_len=32,
    max_target_len=10,
    max_examples=8,
  )
  tp.teacher_pass(
    teacher, task, c.teacher_pass.out_dir, pc, progress=False, devices=jax.devices()[:1]
  )
  data_fn = reader.records_data_fn(c, str(tmp_path), True, 128)
  student = models.build_model(c.student.model, rngs=0)
  out = train.train_loop(
    c, str(tmp_path / "run"), student=student, teacher=teacher, data_fn=data_fn
  )
  assert out["step"] == 2 and np.isfinite(out["metrics"]["loss"])
  assert out["metrics"]["teacher/tokens"] > 0
  ckpt = checkpoints.Checkpointer(str(tmp_path / "run" / "checkpoints"))
  assert ckpt.read_meta() == {"data": {"epoch": 0, "batches": 2}, "objective": "js"}
  ckpt.close()

"""The training loop: f-DISTILL distillation and MLE training (`train_loop`).

`train_loop` drives the jitted step of `fdistill_jax.train_step` (sources,
teacher, sampler, optimizer and sharding are described there) for the plan
of `config.objective`, one step per phase of `config.objective.schedule`
(`objective_schedule.from_config`, switched by the step counter): it restores the latest
checkpoint (state and data position), feeds batches, writes (sum, count)
metrics as means to `metrics.jsonl` and TensorBoard, evaluates periodically,
checkpoints asynchronously, and on SIGTERM saves at the next step boundary
and returns. The command-line modes that build models, data and evaluation
from a config are in `fdistill_jax.main`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from fdistill_jax import (
  checkpoints,
  distributed,
  metrics,
  models,
  objective_schedule,
  runguard,
  sharding,
  teacher_pass,
  train_step,
)
from fdistill_jax.data import reader
from fdistill_jax.decoding import default_sampler
from fdistill_jax.optimizer import learning_rate_schedule, make_optimizer


def _host(x):
  """A replicated array's value on this host (works when other hosts hold devices too)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(jax.device_get(x))


def _host_params(params):
  """Parameters on the host, or the device arrays when they span several hosts."""
  if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
    return jax.device_get(params)
  return params


class _Counted:
  """Wraps an iterator without a `position`: counts consumed batches."""

  def __init__(self, it: Iterator, start: int):
    self.it, self.batches = iter(it), start

  @property
  def position(self):
    return {"batches": self.batches}

  def __next__(self):
    batch = next(self.it)
    self.batches += 1
    return batch


def _open_data(data_fn, position):
  it = data_fn(position)
  if not hasattr(it, "position"):
    it = _Counted(it, int((position or {}).get("batches", 0)))
  return it


def _restore(ckpt: checkpoints.Checkpointer, state):
  """(state, data position) from the latest checkpoint, or (state, None) without one."""
  restored = ckpt.restore(jax.tree.map(checkpoints.abstract_like, state))
  if restored is None:
    return state, None
  state, meta = restored
  position = meta.get("data")
  by_process = meta.get("data_by_process")
  if by_process and len(by_process) == jax.process_count():
    position = by_process[jax.process_index()]
  elif jax.process_count() > 1:
    logging.warning(
      "checkpoint holds the data positions of %d process(es), this run has %d: "
      "every process resumes at process 0's",
      len(by_process or [None]),
      jax.process_count(),
    )
  logging.info("resuming at step %d, data position %s", int(_host(state["step"])), position)
  return state, position


@runguard.run_owner("workdir")
def train_loop(
  config,
  workdir: str,
  *,
  student: nnx.Module,
  data_fn: Callable[[dict | None], Iterator[dict]],
  teacher: nnx.Module | None = None,
  sampler: Callable | None = None,
  eval_fn: Callable | None = None,
  step_callback: Callable | None = None,
  guard: checkpoints.PreemptionGuard | None = None,
) -> dict:
  """Trains `student` on `config.objective` for `config.train.num_train_steps` updates.

  With `config.objective.schedule`, each phase's updates use its own
  objective (one compiled step per objective); a log row is written at every
  phase's end, and its rows carry `phase` (0-based) and `objective/<name>`.

  Args:
    config: the distill/train_teacher ConfigDict (`objective`, `train`,
      `sampler`, `mesh`).
    workdir: checkpoints in `workdir/checkpoints`, metrics in
      `workdir/metrics.jsonl` and `workdir/tensorboard`.
    student: the initial student (ignored parameters when a checkpoint
      exists: the run resumes from it).
    data_fn: position (None: start) -> iterator of batch dicts; an iterator
      with a `position` attribute reports its own, otherwise batches are
      counted and `{"batches": n}` is passed back on resume.
    teacher: the frozen teacher, when the objective needs it at train time.
    sampler: overrides the configured student sampler (tests).
    eval_fn: (student model, step) -> {name: float}; every
      `eval_every_steps` and at the end.
    step_callback: (step, state) after every update (hooks, tests).
    guard: a `PreemptionGuard` (default: the active one of `runguard`, else
      one installed for SIGTERM).

  Raises `runguard.IdentityMismatch` when `workdir` holds checkpoints of
  another run, `runguard.WorkdirLocked` when another process owns it, and
  `runguard.Diverged` at the first non-finite step past
  `train.nonfinite_patience` (nothing non-finite is saved).

  Returns:
    {"step", "params" (pure dict, host), "metrics" (last logged means),
     "eval" (last evaluation), "preempted"}.
  """
  # ---------------------------------------------------------------------------
  # The plans, the models and one step per plan.
  # ---------------------------------------------------------------------------
  tc = config.train
  schedule = objective_schedule.from_config(config)
  mesh = sharding.mesh_from_config(config.mesh)
  split_student = models.SplitModel(student)
  tx = runguard.skip_nonfinite_updates(make_optimizer(tc), tc.nonfinite_patience)
  if schedule.teacher_model and teacher is None:
    raise ValueError(f"objective {schedule.name!r} needs config.teacher (a trained checkpoint)")
  split_teacher = models.SplitModel(teacher) if schedule.teacher_model else None
  if split_teacher is not None and split_teacher.config.vocab_size != student.config.vocab_size:
    raise ValueError(
      f"teacher vocab_size {split_teacher.config.vocab_size} != student vocab_size "
      f"{student.config.vocab_size}"
    )
  teacher_sampler = None
  if schedule.online_teacher:
    teacher_sampler = default_sampler("sampler", config.sampler, tc.max_target_len)
  step_fns = {}
  for plan in schedule.plans:
    student_sampler = sampler
    if student_sampler is None and plan.decoding is not None:
      student_sampler = default_sampler(plan.decoding, config.sampler, tc.max_target_len)
    step_fns[plan] = train_step.make_train_step(
      plan,
      split_student,
      tx,
      teacher=split_teacher,
      sampler=student_sampler,
      teacher_sampler=teacher_sampler,
      grad_accum_steps=tc.grad_accum_steps,
      num_teacher_samples=tc.num_teacher_samples,
      max_target_len=tc.max_target_len,
      dropout=tc.dropout,
      fused_chunk_size=tc.fused_chunk_size,
    )

  # ---------------------------------------------------------------------------
  # State, checkpoint restore, data.
  # ---------------------------------------------------------------------------
  state, state_shardings = train_step.init_state(split_student, tx, tc.seed, mesh)
  teacher_params = None
  if split_teacher is not None:
    teacher_params = jax.device_put(split_teacher.params, split_teacher.shardings(mesh))
  ckpt = checkpoints.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=tc.keep_checkpoints,
    save_interval_steps=tc.checkpoint_every_steps,
    async_save=tc.async_checkpointing,
  )
  teacher_id = None
  if split_teacher is not None:
    sha = teacher_pass.params_fingerprint(teacher)
    teacher_id = {"model": teacher.config, "params_sha256": sha}
  identity = runguard.train_identity(
    config, student.config, teacher=teacher_id, data=getattr(data_fn, "identity", None)
  )
  resuming = ckpt.latest_step() is not None
  runguard.check_identity(workdir, identity, resuming=resuming, override=tc.override_run_identity)
  state, position = _restore(ckpt, state)
  start = int(_host(state["step"]))
  recorded_eval = runguard.resume_metrics(os.path.join(workdir, "metrics.jsonl"), start)
  nonfinite = runguard.NonFiniteStop(tc.nonfinite_patience, workdir)
  data = _open_data(data_fn, position)
  jitted = {p: train_step.jit_step(f, state_shardings, mesh) for p, f in step_fns.items()}
  writer = metrics.MetricWriter(workdir, tensorboard=tc.tensorboard)
  guard = guard or runguard.active_guard()
  own_guard = guard is None
  guard = guard or checkpoints.PreemptionGuard()
  progress = None
  if tc.progress_bar and jax.process_index() == 0:
    progress = tqdm(total=tc.num_train_steps, initial=start, desc=schedule.name, leave=False)
  acc, last_means, last_eval, preempted = None, {}, {}, False
  step = logged = start
  index = schedule.index_at(start)
  t0 = time.time()

  def meta():
    m = {"data": data.position, "objective": schedule.phases[index].plan.name}
    if jax.process_count() > 1:
      # Every process reads its own stream, and process 0 alone writes this
      # JSON item: it keeps every process's position (a collective).
      m["data_by_process"] = distributed.process_values(data.position)
    return m

  def evaluate(step):
    nonlocal last_eval
    last_eval = eval_fn(split_student.merge(state["params"]), step)
    writer.write(step, last_eval, prefix="eval")

  # ---------------------------------------------------------------------------
  # The loop.
  # ---------------------------------------------------------------------------
  if own_guard:
    guard.__enter__()
  try:
    while step < tc.num_train_steps:
      if checkpoints.preemption_requested(guard):
        ckpt.save(step, state, meta())
        ckpt.wait_until_finished()
        preempted = True
        logging.warning("preempted: saved step %d, exiting", step)
        break
      try:
        batch = next(data)
      except StopIteration:
        logging.info("data exhausted at step %d", step)
        break
      index = schedule.index_at(step)
      phase = schedule.phases[index]
      if step in (start, phase.start_step):  # before the phase's step compiles
        where = getattr(data, "directory", None) or "the batches of data_fn"
        reader.check_batch_keys(batch, phase.plan.batch_keys, where)
        if len(schedule.phases) > 1:
          logging.info(
            "step %d: objective %r (phase %d of %r)",
            step,
            phase.plan.name,
            index + 1,
            schedule.text,
          )
      state, step_metrics = jitted[phase.plan](
        state, train_step.put_batch(batch, mesh), teacher_params
      )
      step += 1
      nonfinite.check(step, step_metrics, ckpt)  # raises before a non-finite state is saved
      acc = metrics.add_metrics(acc, step_metrics)

      # -------------------------------------------------------------------------
      # Metrics, checkpoints, evaluation.
      # -------------------------------------------------------------------------
      # A phase's last step is logged too: no logged mean mixes two objectives.
      if step % tc.log_every_steps == 0 or step in (tc.num_train_steps, phase.end_step):
        last_means = metrics.metric_means(jax.tree.map(_host, acc))
        last_means["learning_rate"] = float(learning_rate_schedule(tc)(step - 1))
        last_means["steps_per_second"] = (step - logged) / max(time.time() - t0, 1e-9)
        if len(schedule.phases) > 1:  # which objective these means are of
          last_means["phase"] = float(index)
          last_means[f"objective/{phase.plan.name}"] = 1.0
        writer.write(step, last_means)
        if progress is not None:
          progress.set_postfix(loss=f"{last_means['loss']:.4f}")
        acc, t0, logged = None, time.time(), step
      ckpt.maybe_save(step, state, meta)  # meta() (a collective) only when saving
      if eval_fn is not None and tc.eval_every_steps and step % tc.eval_every_steps == 0:
        evaluate(step)
      if progress is not None:
        progress.update(1)
      if step_callback is not None:
        step_callback(step, state)

    # ---------------------------------------------------------------------------
    # The end: last checkpoint and evaluation.
    # ---------------------------------------------------------------------------
    if not preempted:
      ckpt.save(step, state, meta())
      if step == start and recorded_eval:
        last_eval = recorded_eval  # a finished run, started again: already evaluated
      elif eval_fn is not None and (not tc.eval_every_steps or step % tc.eval_every_steps):
        evaluate(step)
  finally:
    if own_guard:
      guard.__exit__(None, None, None)
    ckpt.close()
    writer.close()
    if progress is not None:
      progress.close()
  return {
    "step": step,
    "params": _host_params(state["params"]),
    "metrics": last_means,
    "eval": last_eval,
    "preempted": preempted,
  }

"""Training loops: f-DISTILL distillation (`run`) and MLE training (`run_teacher`).

`train_loop` drives the jitted step of `fdistill_jax.train_step` (sources,
teacher, sampler, optimizer and sharding are described there): it restores
the latest checkpoint (state and data position), feeds batches, writes
(sum, count) metrics as means to `metrics.jsonl` and TensorBoard, evaluates
periodically, checkpoints asynchronously, and on SIGTERM saves at the next
step boundary and returns. `run` and `run_teacher` are the command-line
modes: they build models, data and evaluation from the config.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from fdistill_jax import (
  checkpoints,
  config_checks,
  distributed,
  models,
  objectives,
  record_checks,
  records,
  runguard,
  teacher_pass,
)
from fdistill_jax.data.reader import TOPK_KEYS
from fdistill_jax.train_step import (  # noqa: F401 - re-exported: the trainer's API
  Frozen,
  default_sampler,
  init_state,
  jit_step,
  learning_rate_schedule,
  make_mesh,
  make_optimizer,
  make_train_step,
  put_batch,
  sampler_params,
)

# ---------------------------------------------------------------------------
# Metric writing.
# ---------------------------------------------------------------------------


class MetricWriter:
  """Scalars to `workdir/metrics.jsonl` and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        import tensorflow as tf

        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict, prefix: str = "train"):
    if not self.enabled:
      return
    # Keys as the TensorBoard tags ("train/loss", "eval/nll"): one row per write.
    row = {"step": int(step)}
    row.update({f"{prefix}/{k}": float(v) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      import tensorflow as tf
      from tensorflow.core.framework import summary_pb2

      # tf.summary.scalar needs the tensorboard package; the raw write with
      # the scalars plugin's metadata makes the same event without it.
      meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
      ).SerializeToString()
      with self._tb.as_default(step=int(step)):
        for k, v in scalars.items():
          tf.summary.write(f"{prefix}/{k}", tf.constant(float(v), tf.float32), metadata=meta)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows `MetricWriter` wrote: {"step", "train/<name>" or "eval/<name>": float}."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


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


def _topk_fix(found: str, *, readable: bool = True) -> str:
  """The top-k error's text: what is expected, what was `found`, how to fix it.

  `readable`: whether the data could train without top-k (a records spec
  without top-k is not readable at all, so the second fix does not apply).
  """
  fix = "rerun the teacher pass with teacher_pass.top_k > 0"
  if readable:
    fix += ", or set objective.use_teacher_topk=False (the teacher model then runs at train time)"
  return (
    f"objective.use_teacher_topk=True reads the teacher's distribution from the records' "
    f"top-k (batch keys {', '.join(TOPK_KEYS)}), but {found}; {fix}"
  )


def _needs_topk(obj_cfg) -> bool:
  """Whether a records-fed step reads the top-k (`make_train_step`'s condition, offline)."""
  return obj_cfg.use_teacher_topk and "teacher" in obj_cfg.spec.teacher_dist


def _teacher_batch_keys(obj_cfg, online: bool) -> tuple[str, ...]:
  """The teacher-record keys the step reads from each batch (docs/internals.md)."""
  if online or "teacher" not in obj_cfg.spec.sources:
    return ()
  keys = ("teacher_tokens", "teacher_mask")
  if _needs_topk(obj_cfg):
    keys += ("teacher_token_logprobs", *TOPK_KEYS)
  return keys


def _check_batch_keys(batch: dict, keys: tuple[str, ...], data):
  """A clear ValueError, instead of a KeyError while tracing, for a batch without `keys`."""
  missing = [k for k in keys if k not in batch]
  if not missing:
    return
  where = getattr(data, "directory", None) or "the batches of data_fn"
  found = f"the first batch from {where} has keys {sorted(batch)}"
  if set(missing) & set(TOPK_KEYS):
    raise ValueError(_topk_fix(found))
  raise ValueError(
    f"the objective reads teacher sequences (batch keys {list(keys)}), but {found}; "
    "train on teacher-pass records (see docs/internals.md)"
  )


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
  tc = config.train
  obj_cfg = objectives.ObjectiveConfig.from_config(config.objective)
  spec = obj_cfg.spec
  mesh = make_mesh(config.mesh)
  frozen_student = Frozen(student)
  tx = runguard.skip_nonfinite_updates(make_optimizer(tc), tc.nonfinite_patience)
  online = bool(tc.online_teacher) and "teacher" in spec.sources
  use_topk = obj_cfg.use_teacher_topk and not online
  teacher_needed = spec.needs_teacher_model(use_topk) or online
  frozen_teacher = Frozen(teacher) if (teacher is not None and teacher_needed) else None
  if teacher_needed and frozen_teacher is None:
    raise ValueError(f"objective {obj_cfg.name!r} needs config.teacher (a trained checkpoint)")
  if frozen_teacher is not None and frozen_teacher.config.vocab_size != student.config.vocab_size:
    raise ValueError(
      f"teacher vocab_size {frozen_teacher.config.vocab_size} != student vocab_size "
      f"{student.config.vocab_size}"
    )
  if sampler is None and spec.decoding is not None:
    sampler = default_sampler(spec.decoding, config.sampler, tc.max_target_len)
  batch_keys = _teacher_batch_keys(obj_cfg, online)
  step_fn = make_train_step(
    obj_cfg,
    frozen_student,
    tx,
    teacher=frozen_teacher,
    sampler=sampler,
    grad_accum_steps=tc.grad_accum_steps,
    num_teacher_samples=tc.num_teacher_samples,
    max_target_len=tc.max_target_len,
    use_topk=use_topk,
    dropout=tc.dropout,
    fused_head=tc.fused_head,
    fused_chunk_size=tc.fused_chunk_size,
    teacher_sampler=default_sampler("sampler", config.sampler, tc.max_target_len)
    if online
    else None,
  )
  state, state_shardings = init_state(frozen_student, tx, tc.seed, mesh)
  teacher_params = None
  if frozen_teacher is not None:
    teacher_params = jax.device_put(frozen_teacher.params, frozen_teacher.shardings(mesh))
  ckpt = checkpoints.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=tc.keep_checkpoints,
    save_interval_steps=tc.checkpoint_every_steps,
    async_save=tc.async_checkpointing,
  )
  teacher_id = None
  if frozen_teacher is not None:
    sha = teacher_pass.params_fingerprint(teacher)
    teacher_id = {"model": teacher.config, "params_sha256": sha}
  identity = runguard.train_identity(
    config, student.config, teacher=teacher_id, data=getattr(data_fn, "identity", None)
  )
  resuming = ckpt.latest_step() is not None
  runguard.check_identity(workdir, identity, resuming=resuming, override=tc.override_run_identity)
  position = None
  restored = ckpt.restore(jax.tree.map(checkpoints.abstract_like, state))
  if restored is not None:
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
  start = int(_host(state["step"]))
  recorded_eval = runguard.resume_metrics(os.path.join(workdir, "metrics.jsonl"), start)
  nonfinite = runguard.NonFiniteStop(tc.nonfinite_patience, workdir)
  data = _open_data(data_fn, position)
  jitted = jit_step(step_fn, state_shardings, mesh)
  writer = MetricWriter(workdir, tensorboard=tc.tensorboard)
  guard = guard or runguard.active_guard()
  own_guard = guard is None
  guard = guard or checkpoints.PreemptionGuard()
  progress = None
  if tc.progress_bar and jax.process_index() == 0:
    from tqdm import tqdm

    progress = tqdm(total=tc.num_train_steps, initial=start, desc=obj_cfg.name, leave=False)
  acc, last_means, last_eval, preempted = None, {}, {}, False
  step = start
  t0 = time.time()

  def meta():
    m = {"data": data.position, "objective": obj_cfg.name}
    if jax.process_count() > 1:
      # Every process reads its own stream, and process 0 alone writes this
      # JSON item: it keeps every process's position (a collective).
      m["data_by_process"] = distributed.process_values(data.position)
    return m

  def evaluate(step):
    nonlocal last_eval
    last_eval = eval_fn(frozen_student.merge(state["params"]), step)
    writer.write(step, last_eval, prefix="eval")

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
      if step == start:
        _check_batch_keys(batch, batch_keys, data)  # before the step compiles
      state, metrics = jitted(state, put_batch(batch, mesh), teacher_params)
      step += 1
      nonfinite.check(step, metrics, ckpt)  # raises before a non-finite state is saved
      acc = objectives.add_metrics(acc, metrics)
      if step % tc.log_every_steps == 0 or step == tc.num_train_steps:
        last_means = objectives.metric_means(jax.tree.map(_host, acc))
        last_means["learning_rate"] = float(learning_rate_schedule(tc)(step - 1))
        last_means["steps_per_second"] = tc.log_every_steps / max(time.time() - t0, 1e-9)
        writer.write(step, last_means)
        if progress is not None:
          progress.set_postfix(loss=f"{last_means['loss']:.4f}")
        acc, t0 = None, time.time()
      ckpt.maybe_save(step, state, meta)  # meta() (a collective) only when saving
      if eval_fn is not None and tc.eval_every_steps and step % tc.eval_every_steps == 0:
        evaluate(step)
      if progress is not None:
        progress.update(1)
      if step_callback is not None:
        step_callback(step, state)
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


# ---------------------------------------------------------------------------
# Command-line modes.
# ---------------------------------------------------------------------------


def load_model(model_config, checkpoint: str = "", pretrained=None) -> nnx.Module:
  """A model from a training checkpoint folder (`train_loop`'s), pretrained weights, or random.

  Uses `teacher_pass.load_teacher`, so teachers and students load the same way.
  """
  if not checkpoint and not pretrained:
    return models.build_model(model_config, rngs=0)
  from fdistill_jax import teacher_pass

  spec = ml_collections.ConfigDict()
  spec.model = model_config
  spec.checkpoint = checkpoint
  spec.pretrained = pretrained
  model, _ = teacher_pass.load_teacher(spec)
  return model


def _ground_truth_data(config, task, split: str):
  from fdistill_jax.data import pipeline

  tc = config.train

  def data_fn(position):
    return pipeline.batches(
      task,
      split,
      tc.batch_size,
      tc.max_input_len,
      tc.max_target_len,
      shuffle_seed=tc.seed,
      repeat=True,
      start_batch=int((position or {}).get("batches", 0)),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )

  data_fn.identity = {"task": config.task, "split": split}  # part of the run identity
  return data_fn


def check_records(
  directory: str,
  obj_cfg,
  vocab_size: int,
  tokenizer_fingerprint: str | None,
  expected_cache_form: str | None = None,
):
  """Raises a clear error for records the run cannot use; reads only the manifest.

  Checks the pass finished, the vocabulary size, the tokenizer fingerprint
  and, when the objective reads the teacher's top-k, that the records hold it
  (a top-k or a sampled teacher cache, of `expected_cache_form` when given).
  """
  from fdistill_jax import records
  from fdistill_jax.data import reader

  manifest = records.read_manifest(directory)
  if _needs_topk(obj_cfg):
    # Before `open_manifest`: a spec without top-k fails there with a less
    # helpful message.
    top_k = (manifest.get("spec") or {}).get("top_k", 0)
    if not top_k and not (manifest.get("spec") or {}).get("num_tail_samples", 0):
      where = os.path.join(directory, records.MANIFEST_NAME)
      found = f"these records were written with top_k={top_k}"
      raise ValueError(f"{where}: " + _topk_fix(found, readable=False))
  reader.open_manifest(
    directory,
    expected_vocab_size=vocab_size,
    expected_fingerprint=tokenizer_fingerprint,
    expected_cache_form=expected_cache_form,
  )


def _records_data(config, workdir: str, vocab_size: int, tokenizer_fingerprint: str | None = None):
  """position -> `RecordReader` over the teacher-pass records; checks them now.

  `tokenizer_fingerprint` is the task tokenizer's: records made with another
  tokenizer raise (None skips the check).
  """
  from fdistill_jax import records
  from fdistill_jax.data.reader import RecordReader

  tc = config.train
  directory = records.records_dir(config, workdir)
  obj_cfg = objectives.ObjectiveConfig.from_config(config.objective)
  cache_form = (config.get("teacher_pass") or {}).get("cache_form")  # the form the run expects
  check_records(directory, obj_cfg, vocab_size, tokenizer_fingerprint, cache_form)

  def data_fn(position):
    return RecordReader(
      directory,
      batch_size=tc.batch_size // jax.process_count(),
      max_input_len=tc.max_input_len,
      max_target_len=tc.max_target_len,
      expected_vocab_size=vocab_size,
      expected_fingerprint=tokenizer_fingerprint,
      seed=tc.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      position=position,
      skip_corrupt=config.teacher_pass.skip_corrupt,
    )

  data_fn.identity = runguard.records_identity(records.read_manifest(directory))
  return data_fn


def nll_eval_fn(config, task, split: str = "validation"):
  """(model, step) -> {"nll": per-token NLL of the ground truth on `split`}."""
  from fdistill_jax.data import pipeline

  tc = config.train
  mesh = make_mesh(config.mesh)

  @functools.partial(jax.jit, static_argnums=0)
  def score(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    logp = models.score(
      model, batch["inputs"], batch["input_mask"], batch["targets"], batch["target_mask"]
    )
    return -jnp.sum(logp), jnp.sum(batch["target_mask"])

  def eval_fn(model, step):
    del step
    graphdef, state = nnx.split(model)
    total = count = 0.0
    for i, batch in enumerate(
      pipeline.batches(task, split, tc.batch_size, tc.max_input_len, tc.max_target_len)
    ):
      if tc.eval_batches and i >= tc.eval_batches:
        break
      s, c = score(graphdef, state, put_batch(batch, mesh))
      total, count = total + float(s), count + float(c)
    return {"nll": total / max(count, 1.0)}

  return eval_fn


def _default_eval(config, task):
  """Validation NLL every `eval_every_steps`, when the task has a validation split."""
  if not config.train.eval_every_steps:
    return None
  if "validation" not in tuple(task.splits):
    logging.warning("task %r has no validation split: no periodic evaluation", task.name)
    return None
  return nll_eval_fn(config, task)


def check_config(config, student_cfg, teacher_cfg=None):
  """Raises a clear ValueError for settings that cannot work, before anything compiles."""
  config_checks.check(config, "distill")
  obj_cfg = objectives.ObjectiveConfig.from_config(config.objective)
  tc = config.train
  if tc.batch_size % tc.grad_accum_steps:
    raise ValueError(
      f"train.batch_size {tc.batch_size} is not divisible by train.grad_accum_steps "
      f"{tc.grad_accum_steps}"
    )
  for name, cfg in (("student", student_cfg), ("teacher", teacher_cfg)):
    if cfg is None:
      continue
    # Decoder-only models hold prompt and continuation in one position table.
    needed = tc.max_target_len + (0 if cfg.is_encoder_decoder else tc.max_input_len)
    if cfg.family in ("bart", "gpt2") and needed > cfg.max_positions:
      raise ValueError(
        f"train.max_target_len {tc.max_target_len}"
        + ("" if cfg.is_encoder_decoder else f" + max_input_len {tc.max_input_len}")
        + f" exceeds the {name}'s max_positions {cfg.max_positions}"
      )
    if cfg.family == "bart" and tc.max_input_len > cfg.max_positions:
      raise ValueError(
        f"train.max_input_len {tc.max_input_len} exceeds the {name}'s max_positions "
        f"{cfg.max_positions}"
      )
  if teacher_cfg is not None and teacher_cfg.vocab_size != student_cfg.vocab_size:
    raise ValueError(
      f"teacher vocab_size {teacher_cfg.vocab_size} != student vocab_size "
      f"{student_cfg.vocab_size}: distillation needs one vocabulary"
    )
  if obj_cfg.spec.decoding == "sampler":
    if config.sampler.num_samples < 1:
      raise ValueError(f"sampler.num_samples must be >= 1, found {config.sampler.num_samples}")
    default_sampler("sampler", config.sampler, tc.max_target_len)  # raises for bad settings
  return obj_cfg


def run(config, workdir: str):
  """`--mode=distill`: trains the student of `config` with `config.objective`.

  Raises `runguard.Preempted` when SIGTERM stopped it (the checkpoint is saved).
  """
  from fdistill_jax.data import tasks

  student_cfg = models.ModelConfig.from_config(config.student.model)
  obj_cfg = objectives.ObjectiveConfig.from_config(config.objective)
  spec = obj_cfg.spec
  online = bool(config.train.online_teacher) and "teacher" in spec.sources
  task = tasks.get_task(config.task)
  # The records are checked here, before any model is loaded or compiled.
  if "teacher" in spec.sources and not online:
    data_fn = _records_data(config, workdir, student_cfg.vocab_size, task.tokenizer.fingerprint())
  else:
    data_fn = _ground_truth_data(config, task, "train")
  teacher = None
  if spec.needs_teacher_model(obj_cfg.use_teacher_topk and not online) or online:
    teacher_cfg = models.ModelConfig.from_config(config.teacher.model)
    check_config(config, student_cfg, teacher_cfg)
    teacher = load_model(
      config.teacher.model, config.teacher.checkpoint, config.teacher.get("pretrained")
    )
    if "teacher" in spec.sources and not online:  # the records' teacher is the one loaded
      fingerprint = teacher_pass.params_fingerprint(teacher)
      record_checks.check_teacher(records.records_dir(config, workdir), fingerprint)
  else:
    check_config(config, student_cfg)
  if config.student.init_checkpoint:
    student = load_model(config.student.model, config.student.init_checkpoint)
  elif config.student.get("init"):
    # Copy chosen teacher layers (the original: BART [0, 6, 11] / [0]).
    from fdistill_jax import convert

    source = teacher or load_model(
      config.teacher.model, config.teacher.checkpoint, config.teacher.get("pretrained")
    )
    student, _ = convert.student_from_teacher(source, config.student.init)
  else:
    student = models.build_model(student_cfg, rngs=config.train.seed)
  result = train_loop(
    config,
    workdir,
    student=student,
    data_fn=data_fn,
    teacher=teacher,
    eval_fn=_default_eval(config, task),
  )
  runguard.raise_if_preempted(result, workdir)
  return result


def run_teacher(config, workdir: str):
  """`--mode=train_teacher`: MLE training of `config.model` on the task's ground truth.

  Also trains non-distilled students. Checkpoints (the last one at the final
  step) go to `workdir/checkpoints`: the folder `config.teacher.checkpoint`
  names later. Raises `runguard.Preempted` when SIGTERM stopped it.
  """
  from fdistill_jax.data import tasks

  model_cfg = models.ModelConfig.from_config(config.model)
  if config.objective.name != "mle":
    raise ValueError(f"train_teacher trains with objective 'mle', found {config.objective.name!r}")
  check_config(config, model_cfg)
  model = models.build_model(model_cfg, rngs=config.train.seed)
  task = tasks.get_task(config.task)
  result = train_loop(
    config,
    workdir,
    student=model,
    data_fn=_ground_truth_data(config, task, "train"),
    eval_fn=_default_eval(config, task),
  )
  runguard.raise_if_preempted(result, workdir)
  return result


def steps_for_epochs(num_examples: int, batch_size: int, epochs: float) -> int:
  """Optimizer steps in `epochs` passes over `num_examples` (the original's epoch counts)."""
  return max(1, math.ceil(num_examples / batch_size * epochs))

"""Command line: `python -m fdistill_jax.main --config=... --workdir=... --mode=...`.

Each mode is a `(config, workdir)` function. `distill` and `train_teacher`
live here: they build models, data and evaluation from the config and call
`train.train_loop`. The other modes' modules are imported only when chosen,
so that a mode's heavy dependencies load only when needed.

From `config.objective` to the loss: `run_distill` -> `train.train_loop`
(`objective_schedule.from_config`: one plan per phase) -> `train_step.make_train_step(plan)` ->
`objectives.compute_loss` / `objectives.fused_loss` (docs/internals.md).

Library logs stay at WARNING unless `--verbose`; every mode ends with a
short summary (`fdistill_jax.run_summary`).

Exit codes (docs/failure-modes.md): 0 done, 1 error, 3 diverged (non-finite
training), 4 workdir of another run identity, 5 workdir in use by another
process, 75 preempted (SIGTERM; state saved, rerun the same command).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

# TensorFlow logs C++ INFO lines (oneDNN) as it loads, which the imports
# below do before any flag is parsed: off on the command line unless
# --verbose; a TF_CPP_MIN_LOG_LEVEL the user set is kept.
if __name__ == "__main__" and not {"--verbose", "--verbose=true", "--verbose=1"} & {
  a.lower() for a in sys.argv[1:]
}:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from fdistill_jax import (
  checkpoints,
  config_checks,
  convert,
  distributed,
  models,
  objective_schedule,
  record_checks,
  records,
  run_summary,
  runguard,
  sharding,
  teacher_pass,
  train,
  train_step,
)
from fdistill_jax.data import pipeline, reader, tasks
from fdistill_jax.decoding import default_sampler

MODES = {
  # mode: "module:function" taking (config, workdir)
  "pipeline": "fdistill_jax.pipeline:run",
  "train_teacher": "fdistill_jax.main:run_teacher",
  "teacher_pass": "fdistill_jax.teacher_pass:run",
  "distill": "fdistill_jax.main:run_distill",
  "evaluate": "fdistill_jax.evaluate:run",
  "inspect": "fdistill_jax.record_checks:inspect_main",
  "generate": "fdistill_jax.generate:run",
  "export": "fdistill_jax.export:run",
}


# ---------------------------------------------------------------------------
# Config checks and evaluation.
# ---------------------------------------------------------------------------


def check_config(config, student_cfg, teacher_cfg=None) -> objective_schedule.Schedule:
  """The schedule (plan per phase) of `config`; raises a clear ValueError for settings
  that cannot work.

  Runs before anything compiles.
  """
  config_checks.check(config, "distill")
  schedule = objective_schedule.from_config(config)
  tc = config.train
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
  if any(plan.decoding == "sampler" for plan in schedule.plans):
    if config.sampler.num_samples < 1:
      raise ValueError(f"sampler.num_samples must be >= 1, found {config.sampler.num_samples}")
    default_sampler("sampler", config.sampler, tc.max_target_len)  # raises for bad settings
  return schedule


def nll_eval_fn(config, task, split: str = "validation"):
  """(model, step) -> {"nll": per-token NLL of the ground truth on `split`}."""
  tc = config.train
  mesh = sharding.mesh_from_config(config.mesh)

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
      s, c = score(graphdef, state, train_step.put_batch(batch, mesh))
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


# ---------------------------------------------------------------------------
# Modes.
# ---------------------------------------------------------------------------


def _load(section, checkpoint: str):
  model, _ = checkpoints.load_model(section.model, checkpoint, section.get("pretrained"))
  return model


def run_distill(config, workdir: str):
  """`--mode=distill`: trains the student of `config` with `config.objective`.

  Raises `runguard.Preempted` when SIGTERM stopped it (the checkpoint is saved).
  """
  student_cfg = models.ModelConfig.from_config(config.student.model)
  # Every phase of a schedule reads the same stream: what any of them needs.
  needs = objective_schedule.from_config(config)
  task = tasks.get_task(config.task)
  # The records are checked here, before any model is loaded or compiled.
  if needs.batch_keys:
    data_fn = reader.records_data_fn(
      config, workdir, needs.use_topk, student_cfg.vocab_size, task.tokenizer.fingerprint()
    )
  else:
    data_fn = pipeline.ground_truth_data_fn(config, task, "train")
  teacher = None
  if needs.teacher_model:
    check_config(config, student_cfg, models.ModelConfig.from_config(config.teacher.model))
    teacher = _load(config.teacher, config.teacher.checkpoint)
    if needs.reads_teacher_records:
      # The records' teacher must be the one loaded.
      fingerprint = teacher_pass.params_fingerprint(teacher)
      record_checks.check_teacher(records.records_dir(config, workdir), fingerprint)
  else:
    check_config(config, student_cfg)
  if config.student.init_checkpoint:
    student, _ = checkpoints.load_model(
      config.student.model, config.student.init_checkpoint, where="config.student"
    )
  elif config.student.get("init"):
    # Copy chosen teacher layers (the original: BART [0, 6, 11] / [0]).
    source = teacher or _load(config.teacher, config.teacher.checkpoint)
    student, _ = convert.student_from_teacher(source, config.student.init)
  else:
    student = models.build_model(student_cfg, rngs=config.train.seed)
  result = train.train_loop(
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
  model_cfg = models.ModelConfig.from_config(config.model)
  schedule = check_config(config, model_cfg)
  if not all(plan.ground_truth_only for plan in schedule.plans):
    raise ValueError(
      f"train_teacher trains by MLE on the ground truth (objective 'mle'), found {schedule.name!r}"
    )
  model = models.build_model(model_cfg, rngs=config.train.seed)
  task = tasks.get_task(config.task)
  result = train.train_loop(
    config,
    workdir,
    student=model,
    data_fn=pipeline.ground_truth_data_fn(config, task, "train"),
    eval_fn=_default_eval(config, task),
  )
  runguard.raise_if_preempted(result, workdir)
  return result


# ---------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------


def _resolve(mode: str):
  module_name, fn_name = MODES[mode].split(":")
  return getattr(importlib.import_module(module_name), fn_name)


def _parse_flags(argv):
  """absl's parse, with ml_collections' bare AttributeError for an unknown key explained."""
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:
    message = config_checks.explain_unknown_override(argv)
    if message is None:
      raise
    # Outside `main`, where absl would print a traceback for a UsageError.
    raise SystemExit(f"FATAL Flags parsing error: {message}") from e


def _define_flags() -> dict:
  """The command line's flags, defined only when this module runs as the program.

  Other modules import this one for its modes (the pipeline runs them); a
  second definition of the same flags would raise.
  """
  return dict(
    config=config_flags.DEFINE_config_file(
      "config", None, "Path to an ml_collections config file (get_config(arg)).", lock_config=True
    ),
    workdir=flags.DEFINE_string("workdir", None, "Directory for checkpoints, records and results."),
    mode=flags.DEFINE_enum("mode", "pipeline", list(MODES), "What to run."),
    verbose=flags.DEFINE_bool(
      "verbose", False, "Show the libraries' INFO logs (absl, Orbax, JAX, TensorFlow)."
    ),
  )


def main(argv, flag_values: dict):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if flag_values["workdir"].value is None:
    raise app.UsageError("--workdir is required")
  run_summary.quiet_library_logs(flag_values["verbose"].value)  # before TensorFlow logs
  config = flag_values["config"].value
  if config is None:
    from configs import default  # the configs/ folder is not part of the installed library

    config = default.get_config()
  # Before anything touches a device: multi-process runs join their peers here.
  distributed.initialize(config)
  config_checks.check(config, flag_values["mode"].value)  # counts devices: after initialize
  config_checks.check_inputs(config, flag_values["mode"].value)  # before any model loads
  distributed.install_log_filter()
  mode, workdir = flag_values["mode"].value, flag_values["workdir"].value
  # Every mode ends with the same summary: what it wrote where, final metrics, wall time.
  sys.exit(runguard.run_mode(run_summary.reported(mode, _resolve(mode)), config, workdir))


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(functools.partial(main, flag_values=_flags), flags_parser=_parse_flags)

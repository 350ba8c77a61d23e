"""Config values checked at the door: ranges, the batch split, unknown command-line keys.

`check(config, mode)` runs once per command (`fdistill_jax.main`) and in
`main.check_config` (library callers), before any data is read or anything
compiles. Each error names the config key, what was expected and what was
found. A run with nothing to train (`train.num_train_steps = 0`, or a
pipeline stage of 0 steps) is refused: it would save its initialisation as
a final checkpoint that later stages take for a trained model.

`check_inputs(config, mode)` (the command line, after `check`) refuses a
teacher-pass sampler or a task that cannot work before any model loads.

`explain_unknown_override(argv)` turns ml_collections' bare
`AttributeError: 'nope'` for `--config.train.nope=1` into the key's full
name and the keys its section does have.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

import jax

from fdistill_jax import teacher_pass
from fdistill_jax.data import tasks


class ConfigError(ValueError):
  """A config value a run cannot use."""


def _int(lo):
  def ok(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo

  return ok, f"an integer >= {lo}"


def _positive():
  return (lambda v: isinstance(v, int | float) and math.isfinite(v) and v > 0), "a number > 0"


def _non_negative():
  return (lambda v: isinstance(v, int | float) and math.isfinite(v) and v >= 0), "a number >= 0"


def _unit():
  return (lambda v: isinstance(v, int | float) and 0 < v <= 1), "a number in (0, 1]"


# section -> field -> (predicate, what is expected); fields a config lacks are skipped.
RULES = {
  "train": {
    "batch_size": _int(1),
    "grad_accum_steps": _int(1),
    "num_train_steps": _int(1),
    "warmup_steps": _int(0),
    "learning_rate": _non_negative(),
    "max_grad_norm": _non_negative(),
    "max_input_len": _int(1),
    "max_target_len": _int(1),
    "num_teacher_samples": _int(1),
    "fused_chunk_size": _int(1),
    "log_every_steps": _int(1),
    "eval_every_steps": _int(0),
    "eval_batches": _int(0),
    "checkpoint_every_steps": _int(1),
    "keep_checkpoints": _int(1),
  },
  "objective": {"temperature": _positive()},
  "sampler": {
    "num_samples": _int(1),
    "temperature": _positive(),
    "top_k": _int(0),
    "top_p": _unit(),
    "num_beams": _int(0),
  },
  "teacher_pass": {
    "batch_size": _int(1),
    "num_samples": _int(1),
    "top_k": _int(1),
    "records_per_shard": _int(1),
    "max_input_len": _int(1),
    "max_target_len": _int(1),
    "max_examples": _int(0),
  },
  "pipeline": {
    "teacher_steps": _int(1),
    "teacher_batch_size": _int(1),
    "teacher_learning_rate": _non_negative(),
    "init_steps": _int(1),
    "distill_steps": _int(1),
    "learning_rate": _non_negative(),
    "eval_samples": _int(1),
    "eval_batch_size": _int(1),
  },
}

# Sections each mode reads (others may be present and are not its business).
MODE_SECTIONS = {
  "pipeline": ("train", "objective", "sampler", "teacher_pass", "pipeline"),
  "train_teacher": ("train", "objective", "sampler"),
  "distill": ("train", "objective", "sampler"),
  "teacher_pass": ("teacher_pass",),
  "evaluate": (),
  "inspect": (),
}


def check_ranges(config, sections) -> None:
  """Raises `ConfigError` for the first field of `sections` outside its range."""
  for section in sections:
    if section not in config:
      continue
    values = config[section]
    for field, (ok, expected) in RULES[section].items():
      if field in values and not ok(values[field]):
        raise ConfigError(f"config.{section}.{field}: expected {expected}, found {values[field]!r}")


def data_replicas(mesh_config, device_count: int) -> int:
  """How many ways `config.mesh` splits the batch (data x fsdp) on `device_count` devices."""
  shape = {k: int(v) for k, v in dict(mesh_config).items()}
  if -1 in shape.values():
    known = math.prod(v for v in shape.values() if v != -1)
    shape = {k: (device_count // max(known, 1) if v == -1 else v) for k, v in shape.items()}
  return shape.get("data", 1) * shape.get("fsdp", 1)


def check_batch_split(config) -> None:
  """The global batch must split evenly over the data-parallel devices, never be replicated."""
  if "train" not in config or "mesh" not in config:
    return
  tc = config.train
  replicas = data_replicas(config.mesh, jax.device_count())
  if tc.batch_size % replicas:
    raise ConfigError(
      f"config.train.batch_size: expected a multiple of the {replicas} data-parallel "
      f"devices (config.mesh data x fsdp), found {tc.batch_size}"
    )
  if tc.batch_size % jax.process_count():
    raise ConfigError(
      f"config.train.batch_size: expected a multiple of the {jax.process_count()} "
      f"processes, found {tc.batch_size}"
    )
  if tc.batch_size % tc.grad_accum_steps:
    raise ConfigError(
      f"config.train.batch_size: {tc.batch_size} is not divisible by "
      f"train.grad_accum_steps {tc.grad_accum_steps}; expected a multiple of it"
    )


# Modes that run the teacher pass: its sampler is checked before anything else runs.
TEACHER_PASS_MODES = ("teacher_pass", "pipeline")


def check(config, mode: str) -> None:
  """Every value check of `mode`'s sections; raises `ConfigError` naming the key."""
  sections = MODE_SECTIONS.get(mode, tuple(RULES))
  check_ranges(config, sections)
  if "train" in sections:
    check_batch_split(config)


def check_inputs(config, mode: str) -> None:
  """What a command will run with: the teacher pass's sampler, the task's files.

  The sampler's method and parameters (and the cache form) of modes that
  run the teacher pass, and the task's kind, split files and tokenizer
  (ValueError / FileNotFoundError naming the key): the command line checks
  them first, so that they fail before any model loads or trains. Library
  configs may leave files to be set later; `check` does not need them.
  """
  if mode in TEACHER_PASS_MODES and "teacher_pass" in config:
    teacher_pass.PassConfig.from_config(config.teacher_pass)
  if "task" in config:
    tasks.check_config(config.task)


# ---------------------------------------------------------------------------
# Unknown keys given on the command line.
# ---------------------------------------------------------------------------

_OVERRIDE = re.compile(r"^--?config\.([A-Za-z0-9_.]+)(=|$)")


def _load_config_file(value: str):
  """`get_config(arg)` of a `--config=path[:arg]` value, as config_flags loads it."""
  path, _, arg = value.partition(":")
  spec = importlib.util.spec_from_file_location("_config_under_check", os.path.abspath(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def unknown_key(config, dotted: str) -> str | None:
  """A message for the first part of `dotted` that `config` lacks (None: all exist)."""
  node, seen = config, []
  for part in dotted.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = "config" + "".join(f".{s}" for s in seen)
      return (
        f"--config.{dotted}: unknown config key {'.'.join([*seen, part])!r}; "
        f"{where} has the keys {sorted(keys)}"
      )
    node, seen = node[part], [*seen, part]
  return None


def explain_unknown_override(argv) -> str | None:
  """The message for the first `--config.a.b=...` in `argv` naming a key the config lacks."""
  files = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  if not files:
    return None
  config = _load_config_file(files[-1])
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match:
      message = unknown_key(config, match.group(1))
      if message:
        return message
  return None

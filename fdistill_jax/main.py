"""Command line: `python -m fdistill_jax.main --config=... --workdir=... --mode=...`.

Each mode is a `run(config, workdir)` function in its own module, imported
only when chosen so that a mode's heavy dependencies load only when needed.

Exit codes (docs/failure-modes.md): 0 done, 1 error, 3 diverged (non-finite
training), 4 workdir of another run identity, 5 workdir in use by another
process, 75 preempted (SIGTERM; state saved, rerun the same command).
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags
from ml_collections import config_flags

from fdistill_jax import config_checks, distributed, runguard

MODES = {
  # mode: "module:function" taking (config, workdir)
  "pipeline": "fdistill_jax.pipeline:run",
  "train_teacher": "fdistill_jax.train:run_teacher",
  "teacher_pass": "fdistill_jax.teacher_pass:run",
  "distill": "fdistill_jax.train:run",
  "evaluate": "fdistill_jax.evaluate:run",
  "inspect": "fdistill_jax.record_checks:inspect_main",
  "generate": "fdistill_jax.generate:run",
  "export": "fdistill_jax.export:run",
}

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to an ml_collections config file (get_config(arg)).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, records and results.")
_MODE = flags.DEFINE_enum("mode", "pipeline", list(MODES), "What to run.")


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  config = _CONFIG.value
  if config is None:
    from configs import default

    config = default.get_config()
  # Before anything touches a device: multi-process runs join their peers here.
  distributed.initialize(config)
  config_checks.check(config, _MODE.value)  # counts devices: after initialize
  distributed.install_log_filter()
  sys.exit(runguard.run_mode(_resolve(_MODE.value), config, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

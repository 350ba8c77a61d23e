"""What a command prints: quiet library logs, then one short summary at its end.

`quiet_library_logs(verbose)` keeps absl, Orbax, JAX and TensorFlow's
Python logs at WARNING unless `--verbose` (every checkpoint save and tf.data pipeline logs
a long INFO line otherwise). `reported(mode, fn)` wraps a mode so that it
ends with `summary_text`: what it wrote where, its final metrics and its
wall time. `fdistill_jax.main` applies both to every mode.

A mode's return value is read by `summarize`: a dict with `written`
({what: path}) and `metrics` ({name: value}) is printed as it is (the form
for new modes); the existing modes' own return values (train-loop results,
record manifests, generation and export summaries, metric dicts, the
pipeline's table rows) are read by the entries of `_EXTRACTORS`.
"""

from __future__ import annotations

import functools
import logging as py_logging
import numbers
import os
import time

import jax
from absl import logging

from fdistill_jax import records

# Loggers of libraries that log every checkpoint, pipeline or compile at INFO.
_LIBRARY_LOGGERS = ("absl", "jax", "orbax", "tensorflow")


def quiet_library_logs(verbose: bool) -> None:
  """Library logs at WARNING, unless `verbose`; an explicit absl --verbosity > 0 is kept.

  TensorFlow's C++ lines print as it loads, before this can run:
  `fdistill_jax.main` sets TF_CPP_MIN_LOG_LEVEL before its imports.
  """
  if verbose:
    return
  if logging.get_verbosity() <= logging.INFO:
    logging.set_verbosity(logging.WARNING)
  for name in _LIBRARY_LOGGERS:
    py_logging.getLogger(name).setLevel(py_logging.WARNING)


def _training(config, workdir, result) -> tuple[dict, dict]:
  written = {
    "checkpoints": os.path.join(workdir, "checkpoints"),
    "metrics log": os.path.join(workdir, "metrics.jsonl"),
  }
  metrics = {"step": result.get("step"), **(result.get("metrics") or {})}
  metrics.update({f"eval/{k}": v for k, v in (result.get("eval") or {}).items()})
  return written, metrics


def _teacher_pass(config, workdir, result) -> tuple[dict, dict]:
  written = {"records": records.records_dir(config, workdir)}
  if not result:  # processes other than 0 have no manifest to report
    return written, {}
  return written, {"records": result["num_examples"], "shards": result["num_shards"]}


def _generate(config, workdir, result) -> tuple[dict, dict]:
  keys = ("prompts", "completions", "mean_length", "eos_rate", "mean_logprob")
  return {"generations": result["output"]}, {k: result[k] for k in keys}


def _export(config, workdir, result) -> tuple[dict, dict]:
  what = f"export ({result['format']}, {result['dtype']})"
  return {what: result["output"]}, {"MB": result["bytes"] / 1e6}


def _pipeline(config, workdir, result) -> tuple[dict, dict]:
  written = {name: os.path.join(workdir, name) for name in ("results.md", "results.json")}
  return written, {"models": len(result or {})}


def _evaluate(config, workdir, result) -> tuple[dict, dict]:
  # model_eval.run names its files in `outputs`; a predictions file's
  # evaluation writes WORKDIR/metrics_SPLIT.json.
  if isinstance(result, dict) and "outputs" in result:
    return dict(result["outputs"]), {k: v for k, v in result.items() if k != "outputs"}
  split = (config.get("evaluate", None) or {}).get("split", None) or "test"
  return {"metrics": os.path.join(workdir, f"metrics_{split}.json")}, dict(result or {})


def _metrics_only(config, workdir, result) -> tuple[dict, dict]:
  return {}, dict(result or {})


_EXTRACTORS = {
  # mode: (config, workdir, result) -> (written, metrics)
  "train_teacher": _training,
  "distill": _training,
  "teacher_pass": _teacher_pass,
  "generate": _generate,
  "export": _export,
  "pipeline": _pipeline,
  "evaluate": _evaluate,
  "inspect": _metrics_only,
}


def summarize(mode: str, config, workdir: str, result) -> tuple[dict, dict]:
  """(written {what: path}, metrics {name: value}) of a finished mode."""
  if isinstance(result, dict) and "written" in result:
    return dict(result["written"]), dict(result.get("metrics") or {})
  return _EXTRACTORS.get(mode, _metrics_only)(config, workdir, result)


def _value(v) -> str:
  return str(v) if isinstance(v, numbers.Integral) else f"{float(v):.4g}"


def summary_text(mode: str, written: dict, metrics: dict, wall_s: float) -> str:
  """The end-of-run lines: mode and wall time, one line per output, the numeric metrics."""
  lines = [f"{mode}: done in {wall_s:.1f} s"]
  lines += [f"  wrote {what}: {path}" for what, path in written.items()]
  # Numbers only: strings (sacrebleu signatures), lists and tables stay in the files.
  scalars = {k: v for k, v in metrics.items() if isinstance(v, numbers.Real)}
  if scalars:
    lines.append("  final: " + ", ".join(f"{k}={_value(v)}" for k, v in scalars.items()))
  return "\n".join(lines)


def reported(mode: str, fn):
  """`fn(config, workdir)` that prints its summary when it returns (process 0 only)."""

  @functools.wraps(fn)
  def run(config, workdir: str):
    start = time.time()
    result = fn(config, workdir)
    if jax.process_index() == 0:
      written, metrics = summarize(mode, config, workdir, result)
      print(summary_text(mode, written, metrics, time.time() - start), flush=True)
    return result

  return run

"""Shared benchmark machinery: machine description, timing, compiled memory, result files.

Every benchmark writes `bench/results/<name>.json` (format: shared
bench-format.md) and rewrites only its own block of `bench/RESULTS.md`,
delimited by `<!-- bench:<name> begin -->` / `<!-- bench:<name> end -->`.

Timing: `time_fn` returns the median wall time of `repeats` calls after
`warmup` calls, each call blocked until its outputs are ready. `time_ab` times
two functions (`time_rotating`: any number) in the same run, rotating which
goes first in each round (A B, B A, A B, ...), so slow drift of a shared machine affects both sides
alike; ratios are taken of the medians.

Memory: `compiled_memory` reads XLA's buffer assignment of the compiled
function (`jit(f).lower(...).compile().memory_analysis()`) and reports
peak = arguments + outputs + temporaries - aliased bytes. That is the
device memory the executable needs while it runs, independent of timing
noise and of other processes, and it is computed without running anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence

BENCH_DIR = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"

_MD_HEADER = """# Benchmark results

Written by `python -m bench.run` (or one benchmark's own command); each
benchmark rewrites only its block. Figure names and the JSON format:
bench-format.md in the shared docs. Ratios are medians of alternated runs
in one process; memory is XLA's compiled buffer assignment (see
`bench/common.py`).
"""


def setup_env() -> None:
  """Quiet TensorFlow, before any import of it; call before importing jax users."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def parse_args(
  description: str,
  presets: Sequence[str] = ("cpu", "full"),
  add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
  """The common flags (+ a benchmark's own through `add_arguments`).
  `--preset auto` picks `cpu` on a CPU backend, else `full`."""
  parser = argparse.ArgumentParser(
    description=description, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  if add_arguments is not None:
    add_arguments(parser)
  parser.add_argument(
    "--preset",
    default="auto",
    choices=("auto", *presets),
    help="problem sizes: 'cpu' scaled down for a small CPU, 'full' the issue's sizes "
    "(the default on a GPU/TPU)",
  )
  parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
  parser.add_argument(
    "--no-write", action="store_true", help="print the figures without writing result files"
  )
  args = parser.parse_args()
  if args.preset == "auto":
    import jax

    args.preset = "cpu" if jax.default_backend() == "cpu" else "full"
  return args


def command_line() -> str:
  """The command that reproduces this run."""
  module = sys.modules["__main__"].__spec__
  head = f"python -m {module.name}" if module is not None else f"python {sys.argv[0]}"
  return " ".join([head, *sys.argv[1:]])


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _memory_gib() -> int | None:
  try:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemTotal:"):
        return round(int(line.split()[1]) / 2**20)
  except OSError:
    pass
  return None


def machine_description() -> str:
  """E.g. "2-core AMD EPYC, 24 GiB, CPU (jax 0.10.2)" or "..., NVIDIA H100 (jax ...)"."""
  import jax

  cores = os.cpu_count()
  mem = _memory_gib()
  device = jax.devices()[0]
  kind = "CPU" if device.platform == "cpu" else f"{len(jax.devices())}x {device.device_kind}"
  mem_text = f", {mem} GiB" if mem is not None else ""
  return f"{cores}-core {_cpu_model()}{mem_text}, {kind} (jax {jax.__version__})"


def _block(out):
  import jax

  jax.block_until_ready(out)
  return out


def time_fn(fn: Callable, *args, warmup: int = 1, repeats: int = 5) -> float:
  """Median wall seconds of `fn(*args)` over `repeats` calls after `warmup` calls."""
  for _ in range(warmup):
    _block(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    _block(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_rotating(fns: dict[str, Callable], *, warmup: int = 1, repeats: int = 5) -> dict:
  """Median seconds of each zero-argument callable, timed in one run with the
  order rotated every round (A B C, B C A, C A B, ...), after `warmup` rounds."""
  names = list(fns)
  for _ in range(warmup):
    for name in names:
      _block(fns[name]())
  times = {name: [] for name in names}
  for i in range(repeats):
    shift = i % len(names)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      _block(fns[name]())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def time_ab(
  fn_a: Callable, fn_b: Callable, args_a=(), args_b=(), *, warmup: int = 1, repeats: int = 5
) -> tuple[float, float]:
  """Median seconds of A and of B, timed in alternating order in one run."""
  out = time_rotating(
    {"a": lambda: fn_a(*args_a), "b": lambda: fn_b(*args_b)}, warmup=warmup, repeats=repeats
  )
  return out["a"], out["b"]


def fastest_worker(make: Callable, options: Sequence, *, warmup: int = 1):
  """Starts `make(option)` for each option (one at a time), times one `run()` of each
  after `warmup` runs, keeps the fastest and `close()`s the others.

  For out-of-process baselines whose best setting depends on the machine's
  load (PyTorch's OpenMP threads collapse when a shared machine is
  oversubscribed): each baseline gets its best setting, so ratios are not
  flattered by a handicapped baseline. Returns (option, worker, {option: s}).
  """
  best, probe = None, {}
  for option in options:
    worker = make(option)
    for _ in range(warmup):
      worker.run()
    start = time.perf_counter()
    worker.run()
    probe[option] = time.perf_counter() - start
    if best is None or probe[option] < probe[best[0]]:
      if best is not None:
        best[1].close()
      best = (option, worker)
    else:
      worker.close()
  return best[0], best[1], probe


def compiled_memory(fn: Callable, *args) -> dict:
  """XLA's compiled memory figures (bytes) of `jax.jit(fn)(*args)`; args may be
  `jax.ShapeDtypeStruct`s. `peak` = argument + output + temp - alias."""
  import jax

  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  if stats is None:
    raise RuntimeError(f"this backend ({jax.default_backend()}) gives no memory analysis")
  out = {
    "argument": int(stats.argument_size_in_bytes),
    "output": int(stats.output_size_in_bytes),
    "temp": int(stats.temp_size_in_bytes),
    "alias": int(stats.alias_size_in_bytes),
  }
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def figure(
  value: float,
  unit: str,
  *,
  target: float | None = None,
  better: str | None = None,
  note: str | None = None,
) -> dict:
  """One figure; `met` is filled in wherever a target is given. `note` goes to
  RESULTS.md only (the JSON keeps the shared format)."""
  out = {"value": float(value), "unit": unit}
  if target is not None:
    if better not in ("higher", "lower"):
      raise ValueError(f"a target needs better='higher' or 'lower', got {better!r}")
    out.update(target=float(target), better=better)
    out["met"] = bool(value >= target if better == "higher" else value <= target)
  if note:
    out["note"] = note
  return out


def _format_value(value: float) -> str:
  if value == 0 or 1e-3 <= abs(value) < 1e6:
    return f"{value:.4g}"
  return f"{value:.3e}"


def _target_text(fig: dict) -> str:
  if "target" not in fig:
    return ""
  sign = ">=" if fig["better"] == "higher" else "<="
  return f"{sign} {_format_value(fig['target'])}"


def markdown_block(name: str, result: dict, notes: Sequence[str] = ()) -> str:
  lines = [
    f"## {name}",
    "",
    f"Command: `{result['command']}`  ",
    f"Machine: {result['machine']}  ",
    f"Date: {result['date']}",
    "",
  ]
  if result["figures"]:
    lines += ["| figure | value | unit | target | met | note |", "|---|---|---|---|---|---|"]
    for key, fig in result["figures"].items():
      met = "" if "met" not in fig else ("yes" if fig["met"] else "**no**")
      lines.append(
        f"| `{key}` | {_format_value(fig['value'])} | {fig['unit']} | {_target_text(fig)} "
        f"| {met} | {fig.get('note', '')} |"
      )
    lines.append("")
  lines += [f"{note}" for note in notes]
  return "\n".join(lines).rstrip() + "\n"


def replace_block(name: str, body: str, path: pathlib.Path = RESULTS_MD) -> None:
  """Replaces (or appends) the block of benchmark `name` in RESULTS.md."""
  begin, end = f"<!-- bench:{name} begin -->", f"<!-- bench:{name} end -->"
  text = path.read_text() if path.exists() else _MD_HEADER
  block = f"{begin}\n{body}{end}"
  pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: block, text)
  else:
    text = text.rstrip() + "\n\n" + block + "\n"
  path.write_text(text)


def write_results(
  name: str,
  figures: dict,
  *,
  notes: Sequence[str] = (),
  command: str | None = None,
  write: bool = True,
) -> dict:
  """Writes `bench/results/<name>.json` and the RESULTS.md block; returns the result."""
  result = {
    "benchmark": name,
    "command": command or command_line(),
    "machine": machine_description(),
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    "figures": figures,
  }
  block = markdown_block(name, result, notes)
  print(block)
  if write:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_figures = {k: {f: v for f, v in fig.items() if f != "note"} for k, fig in figures.items()}
    with open(RESULTS_DIR / f"{name}.json", "w") as f:
      json.dump({**result, "figures": json_figures}, f, indent=2)
      f.write("\n")
    replace_block(name, block)
  return result


def not_measured(name: str, reason: str, *, command: str | None = None, write: bool = True):
  """Records that a benchmark could not run yet, with why; writes no figures."""
  return write_results(
    name, {}, notes=[f"Not yet measured: {reason}"], command=command, write=write
  )

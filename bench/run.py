"""Runs every benchmark and rewrites bench/RESULTS.md and bench/results/*.json.

  python -m bench.run [--preset auto|cpu|full] [--only NAME ...]

Each benchmark runs in its own process (`python -m bench.<name> --preset P`),
so one's memory and compiled code do not colour the next one's figures.
A benchmark whose module or whose library dependency is not there yet gets
a "not yet measured" block naming what it waits for, never a made-up
figure. On a GPU the same command picks the `full` sizes and records the
device name (see `bench/common.py`).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

from bench import common

# (benchmark, library modules it needs, what it measures) in run order.
BENCHMARKS = (
  ("divergences", ("fdistill_jax.divergences",), "divergence loss + gradient"),
  ("loss_kernel", ("fdistill_jax.fused_head",), "fused vs unfused vs PyTorch loss head"),
  ("decoding", ("fdistill_jax.decoding",), "KV-cache decoding speedup"),
  ("sampler_vs_hf", ("fdistill_jax.decoding",), "sampler tokens/s vs HF generate"),
  ("records", ("fdistill_jax.data.reader",), "reader records/s vs step consumption"),
  ("train", ("fdistill_jax.train", "fdistill_jax.objectives"), "distill-step tokens/s"),
  ("mfu", ("fdistill_jax.train",), "student train-step model FLOP utilisation"),
  ("speculative", ("fdistill_jax.speculative",), "distilled students as speculative drafts"),
  ("real_model", ("fdistill_jax.teacher_scoring",), "SmolLM2-135M vs HF / PyTorch and the roof"),
)


def _missing(modules) -> list[str]:
  return [m for m in modules if importlib.util.find_spec(m) is None]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--preset", default="auto", choices=("auto", "cpu", "full"))
  parser.add_argument("--only", nargs="*", help="benchmark names to run (default: all)")
  parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
  args = parser.parse_args()
  common.setup_env()
  names = [b[0] for b in BENCHMARKS]
  unknown = set(args.only or ()) - set(names)
  if unknown:
    parser.error(f"unknown benchmarks {sorted(unknown)}; known: {names}")
  failures = []
  for name, modules, what in BENCHMARKS:
    if args.only and name not in args.only:
      continue
    command = f"python -m bench.{name} --preset {args.preset}"
    missing = _missing(modules)
    if importlib.util.find_spec(f"bench.{name}") is None:
      missing.insert(0, f"bench/{name}.py")
    if missing:
      reason = f"{what}; depends on {', '.join(missing)}, not in the repository yet."
      print(f"[bench.run] {name}: not measured ({reason})", flush=True)
      common.not_measured(name, reason, command=command)
      continue
    print(f"[bench.run] {command}", flush=True)
    start = time.perf_counter()
    try:
      proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--preset", args.preset],
        timeout=args.timeout,
        capture_output=True,
        text=True,
      )
      failed = proc.returncode != 0
      detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] if failed else []
    except subprocess.TimeoutExpired:
      failed, detail = True, [f"timed out after {args.timeout:.0f} s"]
    print(
      f"[bench.run] {name}: {'FAILED' if failed else 'ok'} in {time.perf_counter() - start:.0f} s"
    )
    if failed:
      failures.append(name)
      reason = f"{what}; the run failed: {' '.join(detail) or 'no output'}"
      common.not_measured(name, reason, command=command)
  if failures:
    print(f"[bench.run] failed: {failures}", file=sys.stderr)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())

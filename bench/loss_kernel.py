"""Loss + gradient of the output head and divergence: fused vs unfused JAX vs PyTorch.

The issue's problem: 8 x 1024 tokens, d = 512, vocabulary 32128, float32.
Inputs are student hidden states `[8, T, 512]` with its head `[512, 32128]`
and the teacher's hidden states with its own head (the online form: the
teacher's logits are computed in the same step under stop-gradient on every
side). One step = the token-mean divergence and its gradient with respect
to the student hidden states and head. Sequences have 8 lengths from T down
to 9T/16 (right padding, weight 0).

* unfused: `logits = hidden @ W` for the whole batch, then
  `divergences.divergence` (the reference the fused head is tested against);
* fused: `fused_head.fused_divergence_loss` (token chunks of `--chunk`);
* torch: `bench/torch_fdistill.py`, the original f-DISTILL formulas on
  PyTorch CPU in its own process (kl, rkl, js, tvd: the ones the original
  code has), driven over a pipe so that its runs alternate with JAX's.

Peak memory of the JAX sides is XLA's compiled buffer assignment at the
issue's full size (compiled, not run, so it is exact on any machine). Times
are medians at the preset's size (`cpu`: 8 x 128 tokens, because the full
problem needs ~7-11 GiB per unfused step on a shared 24 GiB machine).
`--time-full kl js` also times the named divergences at the full 8 x 1024
(fused vs unfused JAX, one divergence at a time so only one unfused step's
buffers are alive), as extra figures `time_s/full/<side>/<name>` and
`fused_time_ratio_full/<name>`; with `--preset full` every divergence is
already timed at that size and the flag adds nothing.

  python -m bench.loss_kernel [--preset cpu|full] [--repeats N] [--chunk 512]
                              [--time-full NAME ...] [--full-repeats N]
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile

from bench import common

common.setup_env()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fdistill_jax import divergences, fused_head  # noqa: E402

BATCH, D_MODEL, VOCAB = 8, 512, 32128
LENGTHS = {"cpu": 128, "full": 1024}
FULL_LENGTH = 1024
TORCH_DIVERGENCES = ("kl", "rkl", "js", "tvd")
REPO = pathlib.Path(__file__).resolve().parents[1]


def make_inputs(length: int, seed: int = 0) -> dict:
  """numpy inputs shared by all three sides; teacher logits ~3x sharper than the student's."""
  rng = np.random.default_rng(seed)
  lengths = length - np.arange(BATCH) * (length // 16)
  out = {
    "hidden": rng.standard_normal((BATCH, length, D_MODEL), np.float32),
    "head_w": (rng.standard_normal((D_MODEL, VOCAB), np.float32) / np.sqrt(D_MODEL)),
    "teacher_hidden": rng.standard_normal((BATCH, length, D_MODEL), np.float32),
    "teacher_head_w": (3.0 * rng.standard_normal((D_MODEL, VOCAB), np.float32) / np.sqrt(D_MODEL)),
    "weights": (np.arange(length)[None, :] < lengths[:, None]),
  }
  return {k: v.astype(np.float32) for k, v in out.items()}


def unfused_step(name: str):
  def loss(hidden, head_w, teacher_hidden, teacher_head_w, weights):
    teacher = jax.lax.stop_gradient(teacher_hidden @ teacher_head_w)
    values = divergences.divergence(name, teacher, hidden @ head_w)
    total, weight = divergences.weighted_sum(values, weights)
    return total / weight

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def fused_step(name: str, chunk: int):
  def loss(hidden, head_w, teacher_hidden, teacher_head_w, weights):
    total, weight = fused_head.fused_divergence_loss(
      name,
      hidden,
      head_w,
      1.0,
      weights,
      teacher_hidden=teacher_hidden,
      teacher_head=(teacher_head_w, 1.0),
      chunk_size=chunk,
    )
    return total / weight

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def torch_python() -> str | None:
  for venv in (".venv-dev", ".venv-bench"):
    path = REPO / venv / "bin" / "python"
    if path.exists():
      return str(path)
  return None


class TorchWorker:
  """bench/torch_fdistill.py in its own process; `run()` is one timed step there."""

  def __init__(self, python: str, inputs_path: str, name: str, threads: int):
    self.proc = subprocess.Popen(
      [
        python,
        str(REPO / "bench" / "torch_fdistill.py"),
        "--inputs",
        inputs_path,
        "--divergence",
        name,
        "--threads",
        str(threads),
      ],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    self.losses = []

  def _ask(self, command: str) -> dict:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"torch worker exited with {self.proc.wait()}")
    return json.loads(line)

  def run(self):
    self.losses.append(self._ask("run")["loss"])

  def close(self) -> dict:
    out = self._ask("quit")
    self.proc.wait()
    return out


def time_full(names, chunk: int, repeats: int) -> tuple[dict, list[str]]:
  """Fused vs unfused times at the full size for `names`: (figures, misses).

  Both steps are compiled ahead (`lower().compile()`), so no warm-up call is
  spent on compilation; a full-size step runs for minutes on a small CPU, so
  the first call's allocation effects are noise next to it."""
  data = make_inputs(FULL_LENGTH, seed=1)
  inputs = tuple(
    jnp.asarray(data[k])
    for k in ("hidden", "head_w", "teacher_hidden", "teacher_head_w", "weights")
  )
  figures, misses = {}, []
  for name in names:
    unfused = unfused_step(name).lower(*inputs).compile()
    fused = fused_step(name, chunk).lower(*inputs).compile()
    times = common.time_rotating(
      {"unfused": lambda f=unfused: f(*inputs), "fused": lambda f=fused: f(*inputs)},
      warmup=0,
      repeats=repeats,
    )
    ratio = times["fused"] / times["unfused"]
    figures[f"fused_time_ratio_full/{name}"] = common.figure(
      ratio, "x", target=1.0, better="lower", note=f"{BATCH}x{FULL_LENGTH} tokens"
    )
    figures[f"time_s/full/unfused/{name}"] = common.figure(times["unfused"], "s")
    figures[f"time_s/full/fused/{name}"] = common.figure(times["fused"], "s")
    if ratio > 1.0:
      misses.append(name)
    print(
      f"{name:10s} full size: unfused {times['unfused']:.2f}s fused {times['fused']:.2f}s "
      f"ratio {ratio:.3f}",
      flush=True,
    )
    del unfused, fused
  return figures, misses


def run(args) -> dict:
  repeats = args.repeats or (3 if args.preset == "cpu" else 10)
  length = LENGTHS[args.preset]
  chunk = args.chunk
  data = make_inputs(length)
  inputs = tuple(
    jnp.asarray(data[k])
    for k in ("hidden", "head_w", "teacher_hidden", "teacher_head_w", "weights")
  )
  full_shapes = tuple(
    jax.ShapeDtypeStruct(
      (BATCH, FULL_LENGTH, *x.shape[2:]) if x.shape[0] == BATCH else x.shape, x.dtype
    )
    for x in inputs
  )
  python = None if args.no_torch else torch_python()
  figures, notes, misses = {}, [], []
  threads, probe = None, {}
  with tempfile.TemporaryDirectory() as tmp:
    inputs_path = os.path.join(tmp, "inputs.npz")
    np.savez(inputs_path, **data)
    for name in sorted(divergences.REGISTRY):
      unfused, fused = unfused_step(name), fused_step(name, chunk)
      mem_u = common.compiled_memory(unfused, *full_shapes)["peak"]
      mem_f = common.compiled_memory(fused, *full_shapes)["peak"]
      sides = {"unfused": lambda f=unfused: f(*inputs), "fused": lambda f=fused: f(*inputs)}
      worker = None
      if python is not None and name in TORCH_DIVERGENCES:
        if threads is None:
          # PyTorch's best thread count on this (shared) machine, probed once.
          threads, worker, probe = common.fastest_worker(
            lambda n, name=name: TorchWorker(python, inputs_path, name, n), (1, os.cpu_count())
          )
        else:
          worker = TorchWorker(python, inputs_path, name, threads)
        sides["torch"] = worker.run
      times = common.time_rotating(sides, warmup=args.warmup, repeats=repeats)
      (loss_u, _), (loss_f, _) = sides["unfused"](), sides["fused"]()
      mem_ratio, time_ratio = mem_f / mem_u, times["fused"] / times["unfused"]
      figures[f"fused_peak_mem_ratio/{name}"] = common.figure(
        mem_ratio, "x", target=0.25, better="lower"
      )
      figures[f"fused_time_ratio/{name}"] = common.figure(
        time_ratio, "x", target=1.0, better="lower"
      )
      if time_ratio > 1.0:
        misses.append(name)
      figures[f"peak_mem_bytes/unfused/{name}"] = common.figure(mem_u, "bytes")
      figures[f"peak_mem_bytes/fused/{name}"] = common.figure(mem_f, "bytes")
      figures[f"time_s/unfused/{name}"] = common.figure(times["unfused"], "s")
      figures[f"time_s/fused/{name}"] = common.figure(times["fused"], "s")
      rel = abs(float(loss_f) - float(loss_u)) / abs(float(loss_u))
      assert rel < 1e-4, f"fused and unfused losses differ for {name}: {loss_f} vs {loss_u}"
      line = f"{name:10s} unfused {times['unfused']:.3f}s fused {times['fused']:.3f}s"
      if worker is not None:
        info = worker.close()
        torch_loss = float(np.median(worker.losses))
        torch_rel = abs(torch_loss - float(loss_u)) / abs(float(loss_u))
        figures[f"torch_time_ratio/{name}"] = common.figure(
          times["fused"] / times["torch"], "x", target=1.0, better="lower"
        )
        figures[f"time_s/torch/{name}"] = common.figure(times["torch"], "s")
        figures[f"torch_peak_rss_bytes/{name}"] = common.figure(
          info["peak_rss_bytes"], "bytes", note=f"RSS growth at {BATCH}x{length} tokens"
        )
        figures[f"torch_loss_rel_diff/{name}"] = common.figure(
          torch_rel, "relative", note="|torch - JAX| / |JAX| loss, same inputs"
        )
        line += (
          f" torch {times['torch']:.3f}s ({info['threads']} threads, loss rel diff {torch_rel:.1e})"
        )
      print(line + f"  mem ratio {mem_ratio:.3f}", flush=True)
  full_names = [n for n in args.time_full or () if args.preset != "full"]
  if full_names:
    full_repeats = args.full_repeats or repeats
    full_figures, full_misses = time_full(full_names, chunk, full_repeats)
    figures.update(full_figures)
    misses += [f"{n} (full size)" for n in full_misses]
  notes.append(
    f"Peak memory ratios at the full size ({BATCH}x{FULL_LENGTH} tokens, d={D_MODEL}, "
    f"V={VOCAB}, float32), from XLA's compiled buffer assignment (arguments + outputs + "
    f"temporaries) without running. Times: {BATCH}x{length} tokens "
    f"(preset `{args.preset}`), median of {repeats} rotated runs after {args.warmup} warm-up; "
    f"fused chunk = {chunk} tokens (custom VJP: gradient computed in the forward pass)."
  )
  if args.preset != "full":
    notes.append(
      "`time_s/<side>/<name>`, `fused_time_ratio/<name>` and `torch_*` are at 8x128 tokens, "
      "not the issue's 8x1024: the unfused step needs 7-11 GiB at full size on a shared "
      "24 GiB, 2-core machine (`--preset full` runs the full size)."
    )
  if full_names:
    notes.append(
      f"`time_s/full/*` and `fused_time_ratio_full/*`: {', '.join(full_names)} timed at the "
      f"issue's full size ({BATCH}x{FULL_LENGTH} tokens), fused vs unfused JAX only, median of "
      f"{full_repeats} rotated runs of steps compiled ahead (no warm-up call). PyTorch is not "
      "timed at this size: its step grows ~8x from the 8x128 resident-set figures above "
      "(~13 GiB), which does not fit next to the unfused JAX step (7-12 GiB) on this shared "
      "24 GiB machine."
    )
  if python is None:
    notes.append("PyTorch figures not measured: no .venv-dev or .venv-bench with torch found.")
  else:
    notes.append(
      "PyTorch: original f-DISTILL formulas (`calc_ce_loss`, `calc_js_loss` with beta = 0.5, "
      "`calc_tvd_loss`, masked_select of non-pad rows), CPU float32, its own process; "
      "`torch_time_ratio` = fused JAX time / PyTorch time; torch memory is the process's "
      "resident-set growth (not comparable to XLA's figure). The other divergences have no "
      "original formula. PyTorch ran with its faster thread count on this machine, "
      f"{threads} (probe: "
      + ", ".join(f"{k} threads {v:.2f} s" for k, v in probe.items())
      + "): its OpenMP threads collapse when the shared machine is oversubscribed."
    )
  if misses:
    notes.append(
      "Missed `fused_time_ratio` (fused slower than unfused) for: " + ", ".join(misses) + "."
    )
  return common.write_results("loss_kernel", figures, notes=notes, write=not args.no_write)


def _add_arguments(parser):
  parser.add_argument("--chunk", type=int, default=512, help="fused head: tokens per chunk")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
  parser.add_argument(
    "--time-full",
    nargs="+",
    metavar="NAME",
    choices=sorted(divergences.REGISTRY),
    help=f"also time these divergences at the full {BATCH}x{FULL_LENGTH} tokens (fused vs "
    "unfused; for presets that time a smaller size)",
  )
  parser.add_argument(
    "--full-repeats", type=int, default=None, help="timed repeats at the full size (--repeats)"
  )


if __name__ == "__main__":
  run(common.parse_args(__doc__, add_arguments=_add_arguments))

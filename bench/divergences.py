"""Time and compiled peak memory of loss + gradient for every registered divergence.

The loss is the token-mean divergence between teacher and student logits
`[8, 128, 32128]` (the issue's size; the same on every preset), its gradient
taken with respect to the student logits. float32 and bfloat16 inputs (the
divergences compute in float32 either way).

  python -m bench.divergences [--preset cpu|full] [--repeats N]
"""

from __future__ import annotations

from bench import common

common.setup_env()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fdistill_jax import divergences  # noqa: E402

SHAPE = (8, 128, 32128)
DTYPES = {"float32": jnp.float32, "bf16": jnp.bfloat16}


def loss_and_grad(name: str):
  def loss(teacher_logits, student_logits, weights):
    values = divergences.divergence(name, teacher_logits, student_logits)
    total, weight = divergences.weighted_sum(values, weights)
    return total / weight

  return jax.jit(jax.value_and_grad(loss, argnums=1))


def run(args) -> dict:
  repeats = args.repeats or (3 if args.preset == "cpu" else 10)
  key_t, key_s = jax.random.split(jax.random.key(0))
  weights = jnp.ones(SHAPE[:-1], jnp.float32).at[:, 100:].set(0.0)
  figures = {}
  for dtype_name, dtype in DTYPES.items():
    teacher = (2.0 * jax.random.normal(key_t, SHAPE)).astype(dtype)
    student = (2.0 * jax.random.normal(key_s, SHAPE)).astype(dtype)
    for name in sorted(divergences.REGISTRY):
      fn = loss_and_grad(name)
      mem = common.compiled_memory(fn, teacher, student, weights)
      seconds = common.time_fn(fn, teacher, student, weights, warmup=args.warmup, repeats=repeats)
      figures[f"peak_mem_bytes/{name}/{dtype_name}"] = common.figure(mem["peak"], "bytes")
      figures[f"time_s/{name}/{dtype_name}"] = common.figure(seconds, "s")
      print(
        f"{name:10s} {dtype_name:8s} {seconds:8.3f} s  {mem['peak'] / 2**20:9.1f} MiB", flush=True
      )
    del teacher, student
  notes = [
    f"Loss = token-mean divergence(teacher, student) over logits {list(SHAPE)} with 100 of "
    "128 positions weighted 1; gradient w.r.t. the student logits; `jit(value_and_grad)`. "
    f"Time: median of {repeats} runs after {args.warmup} warm-up. Peak memory: XLA compiled "
    "buffer assignment, arguments (teacher, student, weights) + outputs (loss, gradient) + "
    "temporaries. Reference figures, no targets.",
  ]
  return common.write_results("divergences", figures, notes=notes, write=not args.no_write)


if __name__ == "__main__":
  run(common.parse_args(__doc__))

"""Model FLOP utilisation of the student's distillation train step.

  mfu/student_train_step = (step FLOPs / step seconds) / measured matmul FLOP/s

The step is the trainer's own (`train_step.make_train_step`, jitted with
`train_step.jit_step`): forward KL on teacher sequences with the records' top-k
(`objective.name = "kl"`, offline, so no teacher model and no sampling), AdamW,
one device. Step FLOPs are XLA's count for the compiled step
(`compiled.cost_analysis()["flops"]`: every floating-point op the executable
performs, forward, backward and optimizer). The matmul rate is a jitted
float32 `[n, n] @ [n, n]` on the same device, 2 n^3 FLOPs per call, timed in
the same run (rotated with the step).

  python -m bench.mfu [--preset cpu|full] [--repeats N]
"""

from __future__ import annotations

from bench import common

common.setup_env()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fdistill_jax import models, objectives, sharding, train_step  # noqa: E402

PRESETS = {
  # student preset, batch, source length, target length, top-k, matmul n
  "cpu": dict(model="t5-bench", batch=8, src_len=128, tgt_len=128, top_k=16, matmul=2048),
  "full": dict(model="t5-small", batch=64, src_len=256, tgt_len=256, top_k=64, matmul=8192),
}


def make_batch(cfg: dict, vocab: int, seed: int = 0) -> dict:
  """A records-style batch (docs/internals.md) with one teacher sequence per input."""
  rng = np.random.default_rng(seed)
  b, s, t, k = cfg["batch"], cfg["src_len"], cfg["tgt_len"], cfg["top_k"]
  lengths = rng.integers(t // 2, t + 1, size=(b, 1))
  mask = (np.arange(t)[None, None, :] < lengths[:, :, None]).astype(np.float32)
  topk = -np.sort(rng.random((b, 1, t, k), np.float32) * 5.0, axis=-1)
  return {
    "inputs": rng.integers(2, vocab, (b, s), dtype=np.int32),
    "input_mask": np.ones((b, s), np.float32),
    "targets": rng.integers(2, vocab, (b, t), dtype=np.int32),
    "target_mask": mask[:, 0],
    "teacher_tokens": rng.integers(2, vocab, (b, 1, t), dtype=np.int32),
    "teacher_mask": mask,
    "teacher_token_logprobs": topk[..., 0],
    "teacher_topk_logprobs": topk - 0.5,
    "teacher_topk_ids": np.stack([rng.choice(vocab, k, replace=False) for _ in range(b * t)])
    .reshape(b, 1, t, k)
    .astype(np.int32),
    "teacher_tail_logmass": np.full((b, 1, t), -1.0, np.float32),
    "example_index": np.arange(b, dtype=np.int32),
  }


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0]
  return float(analysis["flops"])


def run(args) -> dict:
  cfg = PRESETS[args.preset]
  repeats = args.repeats or (3 if args.preset == "cpu" else 10)
  model_cfg = models.get_preset(cfg["model"])
  student = models.SplitModel(models.build_model(model_cfg, rngs=0))
  plan = objectives.ObjectiveConfig(name="kl", use_teacher_topk=True).plan(fused_head=True)
  tx = optax.adamw(1e-4)
  step_fn = train_step.make_train_step(plan, student, tx, max_target_len=cfg["tgt_len"])
  mesh = sharding.mesh_from_config({"data": 1})
  state, shardings = train_step.init_state(student, tx, 0, mesh)
  step = train_step.jit_step(step_fn, shardings, mesh)
  batch = train_step.put_batch(make_batch(cfg, model_cfg.vocab_size), mesh)
  step_flops = _flops(step.lower(state, batch, None).compile())

  n = cfg["matmul"]
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step(holder["state"], batch, None)
    return metrics

  times = common.time_rotating(
    {"step": one_step, "matmul": lambda: matmul(a, b)}, warmup=args.warmup, repeats=repeats
  )
  matmul_rate = 2.0 * n**3 / times["matmul"]
  achieved = step_flops / times["step"]
  tokens = cfg["batch"] * cfg["tgt_len"]
  figures = {
    "mfu/student_train_step": common.figure(achieved / matmul_rate, "fraction"),
    "flops_per_s/student_train_step": common.figure(achieved, "FLOP/s"),
    "flops_per_s/matmul_f32": common.figure(matmul_rate, "FLOP/s"),
    "flops/student_train_step": common.figure(step_flops, "FLOP"),
    "time_s/student_train_step": common.figure(times["step"], "s"),
    "tokens_per_s/student_train_step": common.figure(tokens / times["step"], "tokens/s"),
  }
  notes = [
    f"Student `{cfg['model']}` (T5, d_model {model_cfg.d_model}, {model_cfg.num_layers}+"
    f"{model_cfg.num_layers} layers, vocab {model_cfg.vocab_size}); batch {cfg['batch']}, "
    f"source {cfg['src_len']}, target {cfg['tgt_len']} tokens, top-k {cfg['top_k']}; objective "
    "`kl` on stored top-k, AdamW, `train_step.make_train_step` + `train_step.jit_step` on one "
    "device. "
    "FLOPs: XLA's cost analysis of the compiled step. Matmul reference: jitted float32 "
    f"{n}x{n} matmul, 2n^3 FLOPs. Median of {repeats} rotated runs after {args.warmup} warm-up. "
    "Reference figure, no target.",
  ]
  return common.write_results("mfu", figures, notes=notes, write=not args.no_write)


if __name__ == "__main__":
  run(common.parse_args(__doc__))

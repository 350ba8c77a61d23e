"""The machine's roof and where a decode step's time goes, for bench.real_model.

* `machine_rates`: this device's float32 matmul rate (jitted `[n, n] @ [n, n]`)
  and read bandwidth (jitted sum of a 256 MiB float32 array), measured.
* `matmul_params` / `train_flops`: model FLOPs of a training step (6 N per
  trained token, 2 N per forward-only token, N the matmul parameters
  including the output head), the same formula for both sides of a ratio.
* `step_parts`: jitted pieces of one decoder-only decode step, on the
  model's own weights, to split the measured step into its matmuls and the
  rest: `matmuls` runs only the step's weight matmuls at M = batch rows (per
  layer query, key, value, out, gate, up, down, then the output head and
  the argmax), in the step's order, each fed by the one before, with an RMS
  rescale in between so values stay finite; `matmuls_bf16` is the same with
  the weights stored in bfloat16 (float32 accumulation), what bfloat16
  weights would give the step; `head` is the output head and argmax alone.
  What the full step takes beyond `matmuls` is everything else: attention
  over the cache, the cache writes, RoPE, norms, the per-op overhead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bench import common
from fdistill_jax import models

MATMUL_N = 2048
BANDWIDTH_BYTES = 256 * 2**20


def machine_rates(repeats: int) -> dict:
  """Measured float32 matmul FLOP/s and read bandwidth (bytes/s) of this device."""
  a = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (MATMUL_N, MATMUL_N), jnp.float32)
  big = jnp.ones((BANDWIDTH_BYTES // 4,), jnp.float32)
  matmul, total = jax.jit(jnp.matmul), jax.jit(jnp.sum)
  times = common.time_rotating(
    {"matmul": lambda: matmul(a, b), "sum": lambda: total(big)}, repeats=max(repeats, 5)
  )
  return {"flops": 2.0 * MATMUL_N**3 / times["matmul"], "bandwidth": BANDWIDTH_BYTES / times["sum"]}


def matmul_params(cfg) -> int:
  """Parameters that take part in a matmul per token (layers + output head, not the lookup)."""
  d, f, h, kvh, dh = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
  per_layer = d * h * dh * 2 + d * kvh * dh * 2 + 3 * d * f
  return cfg.num_layers * per_layer + d * cfg.vocab_size


def train_flops(name: str, student_cfg, teacher_cfg, rows: int, seq: int) -> float:
  """Model FLOPs of one distillation step of objective `name` ("kl" or "js")
  at `rows` sequences of `seq` tokens (prompt + target)."""
  n_s, n_t = matmul_params(student_cfg), matmul_params(teacher_cfg)
  if name == "kl":
    return 6 * n_s * rows * seq  # student forward + backward on the teacher sequences y
  return (
    6 * n_s * 2 * rows * seq  # student forward + backward on y and y'
    + 2 * n_t * rows * seq  # teacher forward on y'
    + 2 * n_s * rows * seq  # the student's sampling (prefill + steps)
  )


def _layer_weights(model, dtype):
  """Per layer the 2-D kernels [in, out] of a decoder-only model, in the step's order."""
  out = []
  for layer in model.layers:
    attn, mlp = layer.self_attn, layer.mlp
    d = attn.out.kernel.shape[-1]
    qkv = [m.kernel[...].reshape(d, -1) for m in (attn.query, attn.key, attn.value)]
    rest = [attn.out.kernel[...].reshape(-1, d)] + [
      m.kernel[...] for m in (mlp.wi_0, mlp.wi_1, mlp.wo)
    ]
    out.append(tuple(k.astype(dtype) for k in qkv + rest))
  return out


def _rms(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _dot(x, w):
  return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _matmuls(layers, head, x):
  """x [B, D] through every layer's weight matmuls and the head -> argmax [B]."""
  for wq, wk, wv, wo, wg, wu, wd in layers:
    q, k, v = _dot(x, wq), _dot(x, wk), _dot(x, wv)
    kv = jnp.sum(k, axis=-1, keepdims=True) + jnp.sum(v, axis=-1, keepdims=True)
    x = _rms(x + _dot(q + kv, wo))
    x = _rms(x + _dot(jax.nn.silu(_dot(x, wg)) * _dot(x, wu), wd))
  return _head(head, x)


def _head(head, x):
  """head [V, D] (as the tied embedding is stored), x [B, D] -> argmax [B] of x @ head.T."""
  logits = jnp.einsum("bd,vd->bv", x.astype(head.dtype), head, preferred_element_type=jnp.float32)
  return jnp.argmax(logits, axis=-1)


def step_parts(model, batch: int) -> dict:
  """Zero-argument callables {"matmuls", "matmuls_bf16", "head"} (see the module
  docstring) for a decoder-only `model`, at `batch` rows."""
  x = jax.random.normal(jax.random.key(0), (batch, model.config.d_model), jnp.float32)
  kernel, _ = models.output_head(model)
  head32 = model.embed.embedding[...] if model.lm_head is None else kernel.T  # [V, D]
  w32, w16 = _layer_weights(model, jnp.float32), _layer_weights(model, jnp.bfloat16)
  head16 = head32.astype(jnp.bfloat16)
  matmuls, head = jax.jit(_matmuls), jax.jit(_head)
  return {
    "matmuls": lambda: matmuls(w32, head32, x),
    "matmuls_bf16": lambda: matmuls(w16, head16, x),
    "head": lambda: head(head32, x),
  }

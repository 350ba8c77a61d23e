"""The machine's roof and where a decode or training step's time goes, for bench.real_model.

* `machine_rates`: this device's float32 matmul rate (jitted `[n, n] @ [n, n]`)
  and read bandwidth (jitted sum of a 256 MiB float32 array), measured.
* `layer_params` / `train_flops`: model FLOPs of a training step, the same
  formula for both sides of a ratio: 6 N per trained token and 2 N per
  forward-only token, where N is the layers' matmul parameters at every
  position (prompt and target) and the output head's [D, V] only at the
  target positions, the only ones whose logits the loss reads.
* `train_parts`: jitted pieces that run only a distillation step's weight
  matmuls, forward and backward, at the step's row counts (see the
  function), to split a measured step into its matmuls and the rest.
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


def layer_params(cfg) -> int:
  """Parameters of the layers' matmuls per token (not the head, not the lookup)."""
  d, f, h, kvh, dh = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
  return cfg.num_layers * (d * h * dh * 2 + d * kvh * dh * 2 + 3 * d * f)


def _pass_flops(cfg, rows: int, prompt: int, target: int, per_param: int) -> float:
  """per_param (2 forward, 6 forward + backward) x params x tokens of one pass over
  `rows` sequences: the layers at prompt + target positions, the head at the targets."""
  head = cfg.d_model * cfg.vocab_size
  return per_param * rows * (layer_params(cfg) * (prompt + target) + head * target)


def train_flops(name: str, student_cfg, teacher_cfg, rows: int, prompt: int, target: int) -> float:
  """Model FLOPs of one distillation step of objective `name` ("kl" or "js")
  at `rows` sequences of `prompt` + `target` tokens."""
  if name == "kl":  # student forward + backward on the teacher sequences y
    return _pass_flops(student_cfg, rows, prompt, target, 6)
  return (
    _pass_flops(student_cfg, 2 * rows, prompt, target, 6)  # student on y and y'
    + _pass_flops(teacher_cfg, rows, prompt, target, 2)  # teacher forward on y'
    + _pass_flops(student_cfg, rows, prompt, target, 2)  # the student's sampling of y'
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


def _layer_chain(layers, x):
  """x [M, D] through every layer's weight matmuls, each fed by the one before."""
  for wq, wk, wv, wo, wg, wu, wd in layers:
    q, k, v = _dot(x, wq), _dot(x, wk), _dot(x, wv)
    kv = jnp.sum(k, axis=-1, keepdims=True) + jnp.sum(v, axis=-1, keepdims=True)
    x = _rms(x + _dot(q + kv, wo))
    x = _rms(x + _dot(jax.nn.silu(_dot(x, wg)) * _dot(x, wu), wd))
  return x


def _matmuls(layers, head, x):
  """x [B, D] through every layer's weight matmuls and the head -> argmax [B]."""
  return _head(head, _layer_chain(layers, x))


def _logits(layers, head, x, head_rows):
  """The layers on x [M, D] -> (their output [M, D], the head [V, D] on its first
  head_rows rows [head_rows, V]); every row is returned, as a real step's
  attention makes every position's output matter, so XLA cannot drop rows."""
  h = _layer_chain(layers, x)
  return h, _head_logits(head, h[:head_rows])


def _train_matmuls(layers, head, x, cotangents):
  """Forward and backward of `_logits` -> (logits, (d layers, d head, d x)) for
  given random cotangents (of [M, D], of [head_rows, V]), so XLA cannot reduce
  the backward's matmuls to sums; the logits are returned, as a loss reads
  them, so their forward matmul is not dropped."""
  rows = cotangents[1].shape[0]
  (_, logits), vjp = jax.vjp(lambda ls, hd, x: _logits(ls, hd, x, rows), layers, head, x)
  return logits, vjp(cotangents)


def _sampling_matmuls(layers, head, prefill, x, steps):
  """A sampler's weight matmuls: the prefill [B * S, D] through the layers, then
  `steps` decode steps at x [B, D] through the layers and the head, each fed by
  the one before."""
  x = x + jnp.mean(_layer_chain(layers, prefill))

  def step(x, _):
    _, logits = _logits(layers, head, x, x.shape[0])
    return _rms(x + jnp.max(logits, axis=-1, keepdims=True)), None

  return jax.lax.scan(step, x, None, length=steps)[0]


def _head_logits(head, x):
  """head [V, D] (as the tied embedding is stored), x [B, D] -> x @ head.T [B, V] float32."""
  return jnp.einsum("bd,vd->bv", x.astype(head.dtype), head, preferred_element_type=jnp.float32)


def _head(head, x):
  """The argmax [B] of x @ head.T: the output head and the greedy choice."""
  return jnp.argmax(_head_logits(head, x), axis=-1)


def _weights(model, dtype=jnp.float32):
  """(per-layer kernels, head [V, D] as the tied embedding is stored) in `dtype`."""
  w, _, layout = models.output_head_as_stored(model)
  head = w if layout == "vd" else w.T
  return _layer_weights(model, dtype), head.astype(dtype)


def step_parts(model, batch: int) -> dict:
  """Zero-argument callables {"matmuls", "matmuls_bf16", "head"} (see the module
  docstring) for a decoder-only `model`, at `batch` rows."""
  x = jax.random.normal(jax.random.key(0), (batch, model.config.d_model), jnp.float32)
  (w32, head32), (w16, head16) = _weights(model), _weights(model, jnp.bfloat16)
  matmuls, head = jax.jit(_matmuls), jax.jit(_head)
  return {
    "matmuls": lambda: matmuls(w32, head32, x),
    "matmuls_bf16": lambda: matmuls(w16, head16, x),
    "head": lambda: head(head32, x),
  }


def train_parts(name: str, student, teacher, rows: int, prompt: int, target: int) -> dict:
  """Zero-argument callables whose times add up to the weight matmuls of one
  distillation step of `name` ("kl" or "js"; decoder-only models), the rows and
  positions `train_flops` counts:

  * "student_train": the student's matmuls forward and backward on `rows`
    sequences (kl: y) or 2 x `rows` (js: y and y'), the layers at every
    position, the head at the target positions;
  * js also "teacher_forward" (the teacher's matmuls forward on y') and
    "student_sampling" (the student's prefill of the prompts, then `target`
    decode steps at `rows` rows).

  Only the matmuls (and an RMS rescale between them): what the step takes
  beyond their sum is attention, norms, the loss, the optimizer and overhead.
  """

  def tokens(model, n):
    return jax.random.normal(jax.random.key(n), (n, model.config.d_model), jnp.float32)

  trained = rows if name == "kl" else 2 * rows
  w, head = _weights(student)
  x = tokens(student, trained * (prompt + target))
  cotangents = (
    1e-3 * jax.random.normal(jax.random.key(1), x.shape),
    1e-3 * jax.random.normal(jax.random.key(2), (trained * target, head.shape[0])),
  )
  train = jax.jit(_train_matmuls)
  parts = {"student_train": lambda: train(w, head, x, cotangents)}
  if name == "js":
    tw, thead = _weights(teacher)
    tx = tokens(teacher, rows * (prompt + target))
    forward = jax.jit(_logits, static_argnums=3)
    sample = jax.jit(_sampling_matmuls, static_argnums=4)
    prefill, first = tokens(student, rows * prompt), tokens(student, rows)
    parts["teacher_forward"] = lambda: forward(tw, thead, tx, rows * target)
    parts["student_sampling"] = lambda: sample(w, head, prefill, first, target)
  return parts

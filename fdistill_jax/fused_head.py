"""Fused output head + divergence: the distillation loss without `[tokens, vocab]` logits.

The unfused loss computes `logits = scale * hidden @ W` for the whole batch,
then the divergence, and autodiff keeps several float32 `[tokens, vocab]`
arrays alive for the backward pass (logits, log-probs, probabilities, the
terms). At 8k tokens and a 32k vocabulary that is ~1 GiB per copy; at 128k+
vocabularies it is what runs out of memory first.

Here the tokens are processed in chunks of `chunk_size`: only one chunk's
`[chunk, vocab]` logits exist at a time. Two ways to get the gradient:

* `impl="custom_vjp"` (default): the forward pass computes each chunk's
  gradient with respect to the hidden states, the head and its scale as it
  goes (the loss is a scalar sum, so its cotangent is a scalar and the
  backward pass only rescales). Costs one forward + one backward per chunk,
  like the unfused path, and keeps `d hidden [tokens, D]` and `d W [D, V]`
  as residuals, which the gradient needs anyway.
* `impl="checkpoint"`: `lax.scan` over chunks with `jax.checkpoint` on the
  chunk, ordinary autodiff. The chunk's logits are recomputed in the backward
  pass (one extra forward), which is the textbook form and a cross-check.

With `vocab_chunk_size` the vocabulary is also processed in blocks, with an
online logsumexp, so not even one chunk's full `[chunk, vocab]` row exists;
for very large vocabularies. The per-chunk math then runs under
`jax.checkpoint`, so blocks are recomputed in the backward pass.

Teacher forms (exactly one):
  * `teacher_topk=divergences.TeacherTopK(logprobs [..., K], ids [..., K], tail_logmass
    [...] | None)`: the offline records' top-k (see `divergences.topk_divergence`);
    with `sample_ids`, `sample_logprobs` (and `proposal_logprobs`) `[..., S]`
    the unbiased sampled estimator (`sampled_divergences.sampled_divergence`).
  * `teacher_logits=[..., V]`: full teacher logits (any float dtype).
  * `teacher_hidden=[..., Dt]` with `teacher_head=(W_t [Dt, V], scale_t)`:
    the teacher's logits are computed chunk by chunk as well.
The teacher never receives a gradient.

Values agree with the unfused reference (`divergences.divergence` /
`topk_divergence` on `scale * hidden @ W` in float32) to float32 rounding.
The head matmul always accumulates and returns float32, also for bf16
hidden states.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fdistill_jax import divergences
from fdistill_jax import sampled_divergences as sampled

Array = jax.Array
NEG_INF = divergences.NEG_INF


def fused_divergence_loss(
  name: str,
  hidden: Array,
  head_w: Array,
  head_scale: float | Array = 1.0,
  weights: Array | None = None,
  *,
  teacher_topk: divergences.TeacherTopK | tuple | None = None,
  teacher_logits: Array | None = None,
  teacher_hidden: Array | None = None,
  teacher_head: tuple[Array, float | Array] | None = None,
  temperature: float = 1.0,
  chunk_size: int = 512,
  vocab_chunk_size: int | None = None,
  impl: str = "custom_vjp",
  head_layout: str = "dv",
  **params,
) -> tuple[Array, Array]:
  """Weighted sum of per-token D(teacher || student) with the head fused in.

  Equivalent to `divergences.weighted_sum(divergences.divergence(name,
  teacher_logits, scale * hidden @ W, ...), weights)` (or `topk_divergence`),
  differentiable with respect to `hidden`, `head_w` and `head_scale`.

  Args:
    name: registered divergence name (`kl`, `rkl`, `js`, `tvd`, ...).
    hidden: `[..., D]` student hidden states that the output head reads.
    head_w: `[D, V]` output embedding (`[V, D]` with head_layout="vd").
    head_scale: scalar multiplying the logits (`models.output_head`'s scale).
    weights: `[...]` float token weights (1 on real tokens); default all 1.
    teacher_topk / teacher_logits / teacher_hidden + teacher_head: the
      teacher, exactly one form (see the module docstring).
    temperature: softens the student (and full teacher logits; the stored
      top-k log-probs are taken as they are, as in `topk_divergence`).
    chunk_size: tokens per chunk. Chunks cut the last leading axis (positions)
      and hold every row, `max(1, chunk_size // rows)` positions each, so a
      sharded batch axis stays sharded; lengths need not divide.
    vocab_chunk_size: if set, vocabulary block size for the online logsumexp.
    impl: "custom_vjp" or "checkpoint" (see the module docstring).
    head_layout: "dv" (head_w `[D, V]`) or "vd" (head_w `[V, D]`, as a tied
      embedding is stored, `models.output_head_as_stored`): the same values
      and gradients (the head is used transposed inside each chunk), but the
      gradient of a `[V, D]` parameter is accumulated in its own layout, with
      no `[V, D]` transpose per step.
    **params: the divergence's parameters (`beta`, `alpha`).

  Returns:
    (sum of weighted per-token values, sum of weights), float32 scalars.
  """
  if impl not in ("custom_vjp", "checkpoint"):
    raise ValueError(f"impl must be 'custom_vjp' or 'checkpoint', got {impl!r}")
  if head_layout not in ("dv", "vd"):
    raise ValueError(f"head_layout must be 'dv' or 'vd', got {head_layout!r}")
  if chunk_size < 1 or (vocab_chunk_size is not None and vocab_chunk_size < 1):
    raise ValueError(f"chunk sizes must be >= 1, got {chunk_size=}, {vocab_chunk_size=}")
  divergences.get(name).term(jnp.zeros(1), jnp.zeros(1), **params)  # validates params early
  lead, d_model = hidden.shape[:-1], hidden.shape[-1]
  axis = 0 if head_layout == "dv" else 1  # head_w's D axis
  if head_w.ndim != 2 or head_w.shape[axis] != d_model:
    expected = f"[D={d_model}, V]" if head_layout == "dv" else f"[V, D={d_model}]"
    raise ValueError(f"head_w must be {expected} (head_layout={head_layout!r}), got {head_w.shape}")
  vocab = head_w.shape[1 - axis]
  if weights is None:
    weights = jnp.ones(lead, jnp.float32)
  if weights.shape != lead:
    raise ValueError(f"weights must have hidden's leading shape {lead}, got {weights.shape}")

  kind, teacher = _teacher_arrays(
    lead, vocab, teacher_topk, teacher_logits, teacher_hidden, teacher_head
  )
  # Chunks run along the last leading axis (positions) and keep every row:
  # a chunk is `[rows, positions]`, so a batch axis sharded over devices stays
  # sharded inside the scan instead of being gathered chunk by chunk.
  rows = math.prod(lead[:-1]) if len(lead) > 1 else 1
  length = lead[-1] if lead else 1
  per_row = max(1, min(length, chunk_size // rows))
  n_chunks = -(-length // per_row)
  pad = n_chunks * per_row - length

  def to_chunks(x):
    """`[*lead, ...]` -> `[n_chunks, rows, per_row, ...]` (positions zero-padded)."""
    x = x.reshape((rows, length) + x.shape[len(lead) :])
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((rows, n_chunks, per_row) + x.shape[2:]), 1, 0)

  teacher_chunks = {}
  for key, value in teacher.items():
    if key in ("w", "scale"):
      teacher_chunks[key] = value
    elif key == "ids":
      # Padded positions get distinct ids so the top-k bookkeeping stays well defined.
      k = value.shape[-1]
      position = (
        jnp.arange(n_chunks)[:, None, None, None] * per_row
        + jnp.arange(per_row)[None, None, :, None]
      )
      ids = to_chunks(value.astype(jnp.int32))
      teacher_chunks[key] = jnp.where(position < length, ids, jnp.arange(k, dtype=jnp.int32))
    else:
      teacher_chunks[key] = to_chunks(value)
  teacher_chunks = jax.lax.stop_gradient(teacher_chunks)
  weights_f32 = weights.astype(jnp.float32)
  w_chunks = to_chunks(weights_f32)

  chunk_loss = functools.partial(
    _chunk_loss,
    name=name,
    kind=kind,
    temperature=temperature,
    vocab_chunk_size=vocab_chunk_size,
    params=params,
  )
  if head_layout == "vd":
    dv_chunk_loss = chunk_loss

    def chunk_loss(h, w, *rest):
      return dv_chunk_loss(h, w.T, *rest)

  scale = jnp.asarray(head_scale, jnp.float32)
  if impl == "checkpoint":
    total = _scan_checkpoint(chunk_loss, to_chunks(hidden), head_w, scale, teacher_chunks, w_chunks)
  else:
    total = _make_custom_vjp(chunk_loss)(to_chunks(hidden), head_w, scale, teacher_chunks, w_chunks)
  return total, jnp.sum(weights_f32)


def _teacher_arrays(lead, vocab, topk, logits, hidden, head):
  given = [x is not None for x in (topk, logits, hidden)]
  if sum(given) != 1:
    raise ValueError(
      "give exactly one teacher: teacher_topk, teacher_logits or teacher_hidden + teacher_head"
    )
  if topk is not None:
    topk = divergences.TeacherTopK(*topk)
    if topk.logprobs.shape[:-1] != lead or topk.ids.shape != topk.logprobs.shape:
      raise ValueError(
        f"teacher_topk logprobs and ids must be [{lead}, K], got "
        f"{topk.logprobs.shape} and {topk.ids.shape}"
      )
    out = {"lp_k": topk.logprobs, "ids": topk.ids}
    if topk.tail_logmass is not None:
      out["tail"] = topk.tail_logmass
    if topk.sample_ids is not None:
      samples = {"sample_ids": topk.sample_ids, "sample_lp": topk.sample_logprobs}
      if topk.proposal_logprobs is not None:
        samples["proposal_lp"] = topk.proposal_logprobs
      for key, value in samples.items():
        if value is None or value.shape[:-1] != lead or value.shape != topk.sample_ids.shape:
          raise ValueError(
            f"teacher_topk sample_ids, sample_logprobs and proposal_logprobs must be "
            f"[{lead}, S]; sample_ids is {topk.sample_ids.shape}, {key} is "
            f"{None if value is None else value.shape}"
          )
      out.update(samples)
    return "topk", out
  if logits is not None:
    if logits.shape != (*lead, vocab):
      raise ValueError(f"teacher_logits must be {(*lead, vocab)}, got {logits.shape}")
    return "logits", {"logits": logits}
  if head is None:
    raise ValueError("teacher_hidden needs teacher_head=(W_t [Dt, V], scale_t)")
  w_t, scale_t = head
  if hidden.shape[:-1] != lead or w_t.shape != (hidden.shape[-1], vocab):
    raise ValueError(
      f"teacher_hidden must be [{lead}, Dt] and W_t [Dt, {vocab}], got "
      f"{hidden.shape} and {w_t.shape}"
    )
  return "hidden", {"hidden": hidden, "w": w_t, "scale": jnp.asarray(scale_t, jnp.float32)}


def _head(h, w, scale):
  """`scale * h @ w` `[C, Vb]` in float32 from h `[C, D]`, w `[D, Vb]`."""
  return scale * jnp.einsum("cd,dv->cv", h, w, preferred_element_type=jnp.float32)


def _chunk_loss(
  h, w, scale, teacher, weights, *, name, kind, temperature, vocab_chunk_size, params
):
  """sum_c weights[c] * D(teacher_c || softmax(scale h_c W)) for one chunk `[R, P, ...]`."""
  # Row-major flattening of [rows, positions] keeps the rows' sharding on axis 0.
  tokens = weights.size
  h = h.reshape(tokens, h.shape[-1])
  weights = weights.reshape(tokens)
  teacher = {
    k: v if k in ("w", "scale") else v.reshape((tokens,) + v.shape[2:]) for k, v in teacher.items()
  }
  if vocab_chunk_size is not None and vocab_chunk_size < w.shape[1]:
    values = _blocked_values(
      h, w, scale, teacher, name, kind, temperature, vocab_chunk_size, params
    )
  else:
    student = _head(h, w, scale)
    if kind == "topk" and "sample_ids" in teacher:
      values = sampled.sampled_divergence(
        name,
        teacher["lp_k"],
        teacher["ids"],
        student,
        sample_ids=teacher["sample_ids"],
        sample_logprobs=teacher["sample_lp"],
        proposal_logprobs=teacher.get("proposal_lp"),
        teacher_tail_logmass=teacher.get("tail"),
        temperature=temperature,
        **params,
      )
    elif kind == "topk":
      values = divergences.topk_divergence(
        name,
        teacher["lp_k"],
        teacher["ids"],
        student,
        teacher_tail_logmass=teacher.get("tail"),
        temperature=temperature,
        **params,
      )
    else:
      t_logits = teacher["logits"] if kind == "logits" else _teacher_head(teacher)
      values = divergences.divergence(name, t_logits, student, temperature=temperature, **params)
  return jnp.sum(values * weights)


def _teacher_head(teacher, start=None, size=None):
  w = teacher["w"]
  if start is not None:
    w = jax.lax.dynamic_slice_in_dim(w, start, size, axis=1)
  return jax.lax.stop_gradient(_head(teacher["hidden"], w, teacher["scale"]))


def _scan_checkpoint(chunk_loss, h_chunks, w, scale, teacher_chunks, w_chunks):
  """Autodiff through `lax.scan`; each chunk is recomputed in the backward pass."""
  body_loss = jax.checkpoint(chunk_loss)

  def body(total, xs):
    h, t, wt = xs
    t = {**t, **{k: teacher_chunks[k] for k in ("w", "scale") if k in teacher_chunks}}
    return total + body_loss(h, w, scale, t, wt), None

  per_chunk = {k: v for k, v in teacher_chunks.items() if k not in ("w", "scale")}
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_chunks, per_chunk, w_chunks))
  return total


def _make_custom_vjp(chunk_loss):
  """The loss whose forward pass also computes d/dh, d/dW and d/dscale chunk by chunk."""

  def split(teacher_chunks):
    shared = {k: teacher_chunks[k] for k in ("w", "scale") if k in teacher_chunks}
    return {k: v for k, v in teacher_chunks.items() if k not in shared}, shared

  def value(h_chunks, w, scale, teacher_chunks, w_chunks):
    per_chunk, shared = split(teacher_chunks)

    def body(total, xs):
      h, t, wt = xs
      return total + chunk_loss(h, w, scale, {**t, **shared}, wt), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_chunks, per_chunk, w_chunks))
    return total

  def fwd(h_chunks, w, scale, teacher_chunks, w_chunks):
    per_chunk, shared = split(teacher_chunks)
    grad_fn = jax.value_and_grad(chunk_loss, argnums=(0, 1, 2))

    def body(carry, xs):
      total, dw, dscale = carry
      h, t, wt = xs
      loss, (dh, dw_c, dscale_c) = grad_fn(h, w, scale, {**t, **shared}, wt)
      return (total + loss, dw + dw_c.astype(jnp.float32), dscale + dscale_c), dh

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32), jnp.zeros((), jnp.float32))
    (total, dw, dscale), dh = jax.lax.scan(body, init, (h_chunks, per_chunk, w_chunks))
    return total, (dh, dw.astype(w.dtype), dscale)

  def bwd(residuals, g):
    dh, dw, dscale = residuals
    return (
      (g * dh).astype(dh.dtype),
      (g * dw).astype(dw.dtype),
      g * dscale,
      None,
      None,
    )

  loss = jax.custom_vjp(value)
  loss.defvjp(fwd, bwd)
  return loss


def _blocked_values(h, w, scale, teacher, name, kind, temperature, block, params):
  """Per-token values `[C]` with the vocabulary in blocks of `block` (online logsumexp)."""
  vocab = w.shape[1]
  n_blocks = -(-vocab // block)
  w = jnp.pad(w, [(0, 0), (0, n_blocks * block - vocab)])
  if kind == "hidden":
    teacher = {**teacher, "w": jnp.pad(teacher["w"], [(0, 0), (0, n_blocks * block - vocab)])}
  if kind == "logits":
    t_logits = jnp.pad(
      teacher["logits"], [(0, 0), (0, n_blocks * block - vocab)], constant_values=-jnp.inf
    )
  starts = jnp.arange(n_blocks) * block

  def student_block(start):
    z = _head(h, jax.lax.dynamic_slice_in_dim(w, start, block, axis=1), scale) / temperature
    valid = start + jnp.arange(block) < vocab
    return jnp.where(valid, z, NEG_INF)

  def teacher_block(start):
    if kind == "logits":
      z = jax.lax.dynamic_slice_in_dim(t_logits, start, block, axis=1).astype(jnp.float32)
      z = jnp.where(z == -jnp.inf, NEG_INF, z)
    else:
      z = _teacher_head(teacher, start, block)
      z = jnp.where(start + jnp.arange(block) < vocab, z, NEG_INF)
    return z / temperature

  def running_lse(block_fn):
    @jax.checkpoint
    def body(lse, start):
      return jnp.logaddexp(lse, jax.nn.logsumexp(block_fn(start), axis=-1)), None

    lse, _ = jax.lax.scan(body, jnp.full(h.shape[:1], -jnp.inf, jnp.float32), starts)
    return lse

  lse_q = running_lse(student_block)
  if kind == "topk":
    return _blocked_topk(
      h, w, scale, teacher, name, temperature, student_block, starts, lse_q, params
    )

  lse_p = jax.lax.stop_gradient(running_lse(teacher_block))
  term = divergences.get(name).term

  @jax.checkpoint
  def body(acc, start):
    lq = divergences.floor_neg_inf(student_block(start) - lse_q[:, None])
    lp = jnp.maximum(teacher_block(start) - lse_p[:, None], NEG_INF)
    return acc + jnp.sum(term(lp, lq, **params), axis=-1), None

  values, _ = jax.lax.scan(body, jnp.zeros(h.shape[:1], jnp.float32), starts)
  return values


def _blocked_topk(h, w, scale, teacher, name, temperature, student_block, starts, lse_q, params):
  """Top-k + tail buckets (and tail samples) with the student's tail mass summed block by block."""
  ids = teacher["ids"].astype(jnp.int32)
  block = student_block(starts[0]).shape[-1]

  def student_at(columns):
    """Student log-probs `[C, n]` at ids `[C, n]`, from the gathered head columns."""
    z = scale * jnp.einsum(
      "cd,ckd->ck", h, jnp.take(w.T, columns, axis=0), preferred_element_type=jnp.float32
    )
    return divergences.floor_neg_inf(z / temperature - lse_q[:, None])

  rows = jnp.arange(ids.shape[0])[:, None]

  @jax.checkpoint
  def body(lse, start):
    z = student_block(start)
    local = ids - start
    in_block = (local >= 0) & (local < block)
    in_topk = jnp.zeros(z.shape, bool).at[rows, jnp.where(in_block, local, 0)].max(in_block)
    return jnp.logaddexp(lse, jax.nn.logsumexp(jnp.where(in_topk, NEG_INF, z), axis=-1)), None

  lse_tail, _ = jax.lax.scan(body, jnp.full(ids.shape[:1], -jnp.inf, jnp.float32), starts)
  lq_tail = divergences.floor_neg_inf(lse_tail - lse_q)
  sample_ids = teacher.get("sample_ids", jnp.zeros((ids.shape[0], 0), jnp.int32)).astype(jnp.int32)
  teacher_terms = sampled.teacher_side(
    teacher["lp_k"],
    teacher.get("tail"),
    teacher.get("sample_lp", jnp.zeros(sample_ids.shape, jnp.float32)),
    teacher.get("proposal_lp"),
  )
  return sampled.estimate(
    name, teacher_terms, student_at(ids), lq_tail, student_at(sample_ids), **params
  )

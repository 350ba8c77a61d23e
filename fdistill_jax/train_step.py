"""The training step: one optimizer update as a jitted function of a plain-pytree state.

`make_train_step(plan, ...)` builds it from the objective's `StepPlan`
(`objectives.py`), which has decided everything below. Per micro-batch:

1. `source_rows`: each source's `Rows` (records' teacher sequences
   `[B, N, T]` as `[B * N, T]` with the stored top-k the plan reads, or
   online teacher samples; student samples drawn in the step under
   `stop_gradient`; the ground truth).
2. `teacher_outputs`: the frozen teacher (not donated, never checkpointed)
   on `plan.teacher_rows` only.
3. `student_loss`: the student once on all rows, concatenated along the
   batch axis; `objectives.compute_loss`, or `objectives.fused_loss` on
   hidden states when `plan.fused`.
4. `step`: gradients summed over `grad_accum_steps` micro-batches (a scan),
   then the optimizer update (`optimizer.py`).

The state `{"params", "opt_state", "step", "rng"}` is donated; its shardings
follow the parameters' logical axes (`sharding.py`). PRNG keys derive from
(seed, step, example_index): samples do not depend on the device count, the
micro-batch split or a restart. Metrics are (sum, count) pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fdistill_jax import distributed, models, objectives, records, sharding
from fdistill_jax.divergences import TeacherTopK
from fdistill_jax.metrics import add_metrics

Array = jax.Array

# ---------------------------------------------------------------------------
# 1. Sources: rows of each source.
# ---------------------------------------------------------------------------


class RecordTeacher(NamedTuple):
  """The records' teacher side of teacher rows: top-k `[R, T, K]`, token log-probs `[R, T]`."""

  topk: TeacherTopK
  token_logprobs: Array


class Rows(NamedTuple):
  """One source's rows, all `R` long: inputs / input_mask `[R, S]`, tokens / mask `[R, T]`.

  teacher: the stored teacher side (teacher rows read with top-k), else None.
  """

  inputs: Array
  input_mask: Array
  tokens: Array
  mask: Array
  teacher: RecordTeacher | None = None


@dataclasses.dataclass(frozen=True)
class StepParts:
  """The static pieces of a step (closed over by jit, never traced)."""

  plan: objectives.StepPlan
  student: models.SplitModel
  teacher: models.SplitModel | None
  sampler: Callable | None
  teacher_sampler: Callable | None
  length: int  # T of every source
  num_teacher_samples: int  # of the records' N per input
  dropout: bool
  fused_chunk_size: int

  @property
  def pad_id(self) -> int:
    return self.student.config.pad_id


def _fit_length(x: Array, length: int, fill) -> Array:
  """Pads or cuts axis 1 of `x [R, T, ...]` to `length`."""
  t = x.shape[1]
  if t == length:
    return x
  if t > length:
    return x[:, :length]
  pad = [(0, 0), (0, length - t)] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x, pad, constant_values=fill)


def _flatten_samples(x: Array, n: int) -> Array:
  """`[B, N, ...]` -> the first n samples as `[B * n, ...]`."""
  x = x[:, :n]
  # An explicit row count: -1 cannot be inferred when a trailing axis is 0 (K = 0).
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _drawn_rows(parts: StepParts, sampler, model, inputs, input_mask, keys) -> Rows:
  """Samples of `model` (stop-gradient) as rows `[B * n, ...]`."""
  result = sampler(model, inputs, input_mask, keys)
  tokens = jax.lax.stop_gradient(result.tokens)
  n = tokens.shape[1]
  mask = (jnp.arange(tokens.shape[-1]) < result.lengths[..., None]).astype(jnp.float32)
  tokens = jnp.where(mask > 0, tokens, parts.pad_id)
  return Rows(
    jnp.repeat(inputs, n, axis=0),
    jnp.repeat(input_mask, n, axis=0),
    _fit_length(tokens.reshape(-1, tokens.shape[-1]), parts.length, parts.pad_id).astype(jnp.int32),
    _fit_length(mask.reshape(-1, mask.shape[-1]), parts.length, 0.0),
  )


def _record_rows(parts: StepParts, batch) -> Rows:
  """The records' teacher sequences (and stored top-k, when the plan reads it)."""
  n, length = parts.num_teacher_samples, parts.length

  def rows(key, fill):
    return _fit_length(_flatten_samples(batch[key], n), length, fill)

  teacher = None
  if parts.plan.use_topk:
    topk = TeacherTopK(
      rows(records.TOPK_LOGPROBS, 0.0),
      rows(records.TOPK_IDS, 0),
      rows(records.TAIL_LOGMASS, 0.0),
      **{field: rows(key, 0) for key, field in records.SAMPLE_KEYS.items() if key in batch},
    )
    teacher = RecordTeacher(topk, rows(records.TOKEN_LOGPROBS, 0.0))
  return Rows(
    jnp.repeat(batch["inputs"], n, axis=0),
    jnp.repeat(batch["input_mask"], n, axis=0),
    rows(records.TEACHER_TOKENS, parts.pad_id),
    rows(records.TEACHER_MASK, 0.0),
    teacher,
  )


def source_rows(parts: StepParts, params, batch, key, teacher_params) -> dict[str, Rows]:
  """source -> `Rows` for every source of the plan, in `objectives.SOURCES` order."""
  plan, out = parts.plan, {}
  inputs, input_mask = batch["inputs"], batch["input_mask"]
  index = batch["example_index"].astype(jnp.int32)
  if plan.online_teacher:
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, 1), i))(index)
    model = parts.teacher.merge(jax.lax.stop_gradient(teacher_params))
    out["teacher"] = _drawn_rows(parts, parts.teacher_sampler, model, inputs, input_mask, keys)
  elif "teacher" in plan.sources:
    out["teacher"] = _record_rows(parts, batch)
  if "student" in plan.sources:
    model = parts.student.merge(jax.lax.stop_gradient(params))
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
    out["student"] = _drawn_rows(parts, parts.sampler, model, inputs, input_mask, keys)
  if "ground_truth" in plan.sources:
    out["ground_truth"] = Rows(
      inputs,
      input_mask,
      _fit_length(batch["targets"], parts.length, parts.pad_id),
      _fit_length(batch["target_mask"].astype(jnp.float32), parts.length, 0.0),
    )
  return out


def _concat(rows: list[Rows]) -> tuple[Array, Array, Array, Array]:
  """(inputs, input_mask, tokens, mask) of `rows` stacked along the batch axis."""
  return tuple(jnp.concatenate([r[i] for r in rows], axis=0) for i in range(4))


def _split(x: Array, sizes: list[int]) -> list[Array]:
  return jnp.split(x, np.cumsum(sizes)[:-1])


# ---------------------------------------------------------------------------
# 2. Teacher forward, on the plan's teacher rows.
# ---------------------------------------------------------------------------


class TeacherOut(NamedTuple):
  """The teacher on one source: logits `[R, T, V]` (unfused) or final hidden
  `[R, T, Dt]` (fused), per-layer hidden states, and its head (fused only)."""

  logits_or_hidden: Array
  layer_hidden: tuple
  head: tuple | None


def teacher_outputs(parts: StepParts, rows: dict[str, Rows], teacher_params) -> dict:
  """source -> `TeacherOut` for each of `plan.teacher_rows` (all stop-gradient)."""
  names = [n for n in rows if n in parts.plan.teacher_rows]
  if not names:
    return {}
  fused = parts.plan.fused
  model = parts.teacher.merge(teacher_params)
  out = models.forward(model, *_concat([rows[n] for n in names]), with_logits=not fused)
  sizes = [rows[n].tokens.shape[0] for n in names]
  main = _split(jax.lax.stop_gradient(out.hidden if fused else out.logits), sizes)
  layers = [_split(jax.lax.stop_gradient(h), sizes) for h in out.layer_hidden]
  head = jax.lax.stop_gradient(models.output_head(model)) if fused else None
  return {n: TeacherOut(main[i], tuple(h[i] for h in layers), head) for i, n in enumerate(names)}


# ---------------------------------------------------------------------------
# 3. Loss: the student on all rows at once.
# ---------------------------------------------------------------------------


def student_loss(parts: StepParts, params, rows: dict[str, Rows], teacher: dict, key):
  """(loss, metrics) of the plan on `rows`, differentiable in the student's `params`."""
  plan = parts.plan
  model = parts.student.merge(params)
  dropout_rng = jax.random.fold_in(key, 1) if parts.dropout else None
  out = models.forward(
    model, *_concat(list(rows.values())), dropout_rng=dropout_rng, with_logits=not plan.fused
  )
  sizes = [r.tokens.shape[0] for r in rows.values()]
  if plan.fused:
    hidden = dict(zip(rows, _split(out.hidden, sizes), strict=True))
    fused = {}
    for n, r in rows.items():
      t = teacher.get(n)
      fused[n] = objectives.FusedSource(
        hidden[n],
        r.mask,
        teacher_topk=r.teacher.topk if r.teacher is not None else None,
        teacher_hidden=t.logits_or_hidden if t is not None else None,
        teacher_head=t.head if t is not None else None,
      )
    w, scale, layout = models.output_head_as_stored(model)
    return objectives.fused_loss(plan, fused, (w, scale), parts.fused_chunk_size, layout)
  logits = _split(out.logits, sizes)
  layers = [_split(h, sizes) for h in out.layer_hidden] if plan.hidden else None
  sources = {}
  for i, (n, r) in enumerate(rows.items()):
    t = teacher.get(n)
    sources[n] = objectives.terms.Source(
      tokens=r.tokens,
      mask=r.mask,
      student_logits=logits[i],
      teacher_logits=t.logits_or_hidden if t is not None else None,
      teacher_topk=r.teacher.topk if r.teacher is not None else None,
      teacher_token_logprobs=r.teacher.token_logprobs if r.teacher is not None else None,
      student_hidden=tuple(h[i] for h in layers) if layers else None,
      teacher_hidden=t.layer_hidden if (plan.hidden and t is not None) else None,
    )
  return objectives.compute_loss(plan, sources)


def micro_grads(parts: StepParts, params, batch, teacher_params, key):
  """(grads, metrics) of one micro-batch."""
  rows = source_rows(parts, params, batch, jax.random.fold_in(key, 0), teacher_params)
  teacher = teacher_outputs(parts, rows, teacher_params)
  grad_fn = jax.value_and_grad(lambda p: student_loss(parts, p, rows, teacher, key), has_aux=True)
  (_, metrics), grads = grad_fn(params)
  return grads, metrics


# ---------------------------------------------------------------------------
# 4. The step: accumulate, update.
# ---------------------------------------------------------------------------


def make_train_step(
  plan: objectives.StepPlan,
  student: models.SplitModel,
  tx: optax.GradientTransformation,
  *,
  teacher: models.SplitModel | None = None,
  sampler: Callable | None = None,
  teacher_sampler: Callable | None = None,
  grad_accum_steps: int = 1,
  num_teacher_samples: int = 1,
  max_target_len: int,
  dropout: bool = False,
  fused_chunk_size: int = 512,
):
  """`step(state, batch, teacher_params) -> (state, metrics)`, not yet jitted.

  Args:
    plan: the objective's plan (`objectives.plan_from_config`).
    student / teacher: the split models (teacher None when the plan does not
      need it).
    sampler: student sampler (see `default_sampler`), when the plan reads
      student samples; teacher_sampler: the online teacher's sampler, when
      `plan.online_teacher`.
    num_teacher_samples: how many of the records' N teacher sequences per
      input are used (each a separate row, weighted per token).
    max_target_len: T of every source (teacher rows, samples, ground truth).
    dropout: student dropout (the model's `dropout_rate`) in the loss pass.
    fused_chunk_size: tokens per chunk of the fused loss (`plan.fused`).
  """
  if plan.teacher_model and teacher is None:
    raise ValueError(f"objective {plan.name!r} needs the teacher model at train time")
  if "student" in plan.sources and sampler is None:
    raise ValueError(f"objective {plan.name!r} samples the student: a sampler is needed")
  if plan.online_teacher and teacher_sampler is None:
    raise ValueError("online teacher sampling needs a teacher sampler")
  parts = StepParts(
    plan, student, teacher, sampler, teacher_sampler, max_target_len, num_teacher_samples,
    dropout, fused_chunk_size,
  )  # fmt: skip

  def accumulated(params, batch, teacher_params, key):
    if grad_accum_steps == 1:
      return micro_grads(parts, params, batch, teacher_params, key)

    # Micro-batch i takes rows i, i + A, i + 2A, ...: the leading (sharded)
    # axis stays the batch axis, so no resharding is needed.
    def split(x):
      b = x.shape[0]
      if b % grad_accum_steps:
        raise ValueError(f"batch {b} not divisible by grad_accum_steps {grad_accum_steps}")
      return x.reshape((b // grad_accum_steps, grad_accum_steps) + x.shape[1:]).swapaxes(0, 1)

    micro = jax.tree.map(split, batch)

    def body(carry, xs):
      i, mb = xs
      g, m = micro_grads(parts, params, mb, teacher_params, jax.random.fold_in(key, i))
      acc_g, acc_m = carry
      return (jax.tree.map(jnp.add, acc_g, g), add_metrics(acc_m, m)), None

    first = jax.tree.map(lambda x: x[0], micro)
    rest = jax.tree.map(lambda x: x[1:], micro)
    init = micro_grads(parts, params, first, teacher_params, jax.random.fold_in(key, 0))
    (grads, metrics), _ = jax.lax.scan(body, init, (jnp.arange(1, grad_accum_steps), rest))
    return jax.tree.map(lambda g: g / grad_accum_steps, grads), metrics

  def step(state, batch, teacher_params):
    params = state["params"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grads, metrics = accumulated(params, batch, teacher_params, key)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    one = jnp.ones((), jnp.float32)
    metrics = dict(metrics)
    metrics["grad_norm"] = (optax.tree.norm(grads), one)
    metrics["param_norm"] = (optax.tree.norm(new_params), one)
    new_state = dict(
      params=new_params, opt_state=opt_state, step=state["step"] + 1, rng=state["rng"]
    )
    return new_state, metrics

  return step


# ---------------------------------------------------------------------------
# State creation, sharding, jit.
# ---------------------------------------------------------------------------


def init_state(student: models.SplitModel, tx, seed: int, mesh, rules=sharding.DEFAULT_RULES):
  """(state, state_shardings): parameters placed by their logical axes, optimizer state alike."""
  param_shardings = student.shardings(mesh, rules)
  # may_alias=False: the state is donated to the step, which must not delete
  # the caller's model arrays when they already live where the state goes.
  params = jax.device_put(student.params, param_shardings, may_alias=False)
  opt_state = jax.jit(tx.init)(params)
  replicated = NamedSharding(mesh, P())
  state = dict(
    params=params,
    opt_state=opt_state,
    step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
    rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated),
  )
  # Optimizer leaves that follow no parameter (step counts) come out of jit on
  # one device: replicate them over the mesh.
  shardings = jax.tree.map(
    lambda x: (
      x.sharding
      if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
      else replicated
    ),
    state,
  )
  return jax.device_put(state, shardings), shardings


def jit_step(step_fn, state_shardings, mesh):
  """The step jitted over `mesh` with the state donated and its shardings pinned."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_shardings, replicated))


def put_batch(batch: dict, mesh, rules=sharding.DEFAULT_RULES) -> dict:
  """Numpy batch -> device arrays with the batch axis over (data, fsdp)."""
  batch = {k: np.asarray(v) for k, v in batch.items() if not isinstance(v, str)}
  if "example_index" in batch:
    batch["example_index"] = batch["example_index"].astype(np.int32)
  if jax.process_count() > 1:
    return distributed.make_global_batch(batch, mesh)
  return sharding.shard_batch(batch, mesh, rules)

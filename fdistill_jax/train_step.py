"""The training step: one optimizer update as a jitted function of a plain-pytree state.

One optimizer update is one jitted call of the step built by `make_train_step`:

1. The batch (global, sharded over the mesh's data and fsdp axes) is split
   into `grad_accum_steps` micro-batches, scanned over.
2. Per micro-batch, the sources the objective reads are assembled
   (`objectives.OBJECTIVES[name].sources`): teacher sequences from the
   records (`[B, N, T]` flattened to `[B * N, T]`), student samples drawn
   *inside* the step with the configured sampler (greedy for ENGINE) under
   `stop_gradient`, and the ground truth.
3. The teacher (frozen; a non-donated argument, never checkpointed) runs
   only on the rows whose objective needs its distribution and that the
   records' top-k cannot serve.
4. The student runs once on all its rows, concatenated along the batch
   axis, and the loss of `objectives.compute_loss` is differentiated.
5. Clipped, scheduled AdamW or Adafactor update; embeddings optionally frozen.

The train state is a plain pytree `{"params", "opt_state", "step", "rng"}`
donated to the step; its shardings come from the parameters' logical axes
(`sharding.py`). PRNG keys for sampling derive from (seed, step,
example_index), so the samples do not depend on the device count, the
micro-batch split or a restart. Metrics are (sum, count) pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fdistill_jax import models, objectives, sharding
from fdistill_jax.data.reader import SAMPLE_KEYS
from fdistill_jax.fused_head import TeacherTopK, fused_divergence_loss

Array = jax.Array

# ---------------------------------------------------------------------------
# Models as (graphdef, template, params) so jitted code takes plain pytrees.
# ---------------------------------------------------------------------------


class Frozen:
  """A model split for jit: static `graphdef` + `template`, and `params` (pure dict)."""

  def __init__(self, model: nnx.Module):
    self.graphdef, state = nnx.split(model, nnx.Param)
    self.template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    self.params = nnx.to_pure_dict(state)
    self.config = model.config

  def merge(self, params) -> nnx.Module:
    """The model with `params` (works on tracers inside jit)."""
    state = jax.tree.map(lambda x: x, self.template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def shardings(self, mesh, rules=sharding.DEFAULT_RULES):
    return nnx.to_pure_dict(sharding.named_shardings(self.template, mesh, rules))


# ---------------------------------------------------------------------------
# Optimizer.
# ---------------------------------------------------------------------------


def learning_rate_schedule(tc) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then linear decay to 0."""
  warmup = max(int(tc.warmup_steps), 0)
  total = max(int(tc.num_train_steps), warmup + 1)
  up = optax.linear_schedule(0.0, tc.learning_rate, max(warmup, 1))
  down = optax.linear_schedule(tc.learning_rate, 0.0, total - warmup)
  if warmup == 0:
    return down
  return optax.join_schedules([up, down], [warmup])


def _is_embedding(path) -> bool:
  keys = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
  return bool(keys & {"embed", "positions"})


def make_optimizer(tc) -> optax.GradientTransformation:
  """Clip-by-global-norm + AdamW or Adafactor (`tc.optimizer`), embeddings optionally frozen."""
  schedule = learning_rate_schedule(tc)
  if tc.optimizer == "adamw":
    opt = optax.adamw(
      schedule, b1=tc.adam_b1, b2=tc.adam_b2, eps=tc.adam_eps, weight_decay=tc.weight_decay
    )
  elif tc.optimizer == "adafactor":
    # The original EN-RO runs: Adafactor(scale_parameter=False, relative_step=False).
    opt = optax.adafactor(
      learning_rate=schedule, multiply_by_parameter_scale=False, weight_decay_rate=None
    )
  else:
    raise ValueError(f"train.optimizer: expected 'adamw' or 'adafactor', found {tc.optimizer!r}")
  tx = optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), opt)
  if tc.freeze_embeddings:

    def labels(params):
      return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _is_embedding(path) else "train", params
      )

    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


# ---------------------------------------------------------------------------
# The jitted step.
# ---------------------------------------------------------------------------


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
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])  # not -1: K = 0 has no elements


def _sample_result(result):
  """Sampler output -> (tokens [B, n, T], lengths [B, n])."""
  if hasattr(result, "tokens"):
    return result.tokens, result.lengths
  return result[0], result[-1]


_NEUTRAL_SAMPLER_PARAMS = {
  "temperature": 1.0,
  "top_k": 0,
  "top_p": 1.0,
  "num_beams": 0,
  "length_penalty": 1.0,
}


def sampler_params(sampler_cfg) -> dict:
  """The `config.sampler` parameters that differ from their neutral value."""
  return {
    k: sampler_cfg[k]
    for k, neutral in _NEUTRAL_SAMPLER_PARAMS.items()
    if k in sampler_cfg and sampler_cfg[k] != neutral
  }


def default_sampler(decoding: str, sampler_cfg, max_len: int):
  """The trainer's student sampler: (model, inputs, input_mask, keys) -> DecodeResult.

  `decoding` is the objective's (`ObjectiveSpec.decoding`): "greedy" ignores
  `config.sampler`; "sampler" uses it.
  """
  from fdistill_jax import decoding as dec

  if decoding == "greedy":
    return dec.make_model_sampler("greedy", num_samples=1, max_len=max_len)
  return dec.make_model_sampler(
    sampler_cfg.name,
    num_samples=sampler_cfg.num_samples,
    max_len=max_len,
    **sampler_params(sampler_cfg),
  )


def make_train_step(
  obj_cfg: objectives.ObjectiveConfig,
  student: Frozen,
  tx: optax.GradientTransformation,
  *,
  teacher: Frozen | None = None,
  sampler: Callable | None = None,
  grad_accum_steps: int = 1,
  num_teacher_samples: int = 1,
  max_target_len: int,
  use_topk: bool = True,
  dropout: bool = False,
  teacher_sampler: Callable | None = None,
  fused_head: bool = True,
  fused_chunk_size: int = 512,
):
  """`step(state, batch, teacher_params) -> (state, metrics)`, not yet jitted.

  Args:
    obj_cfg: the objective.
    student / teacher: the split models (teacher None when not needed).
    sampler: student sampler (see `default_sampler`); needed when the
      objective reads student samples.
    num_teacher_samples: how many of the records' N teacher sequences per
      input are used (each a separate row, weighted per token).
    max_target_len: T of every source (teacher rows, samples, ground truth).
    use_topk: take the teacher's distribution on teacher sequences from the
      batch's stored top-k (no teacher forward there).
    dropout: student dropout (the model's `dropout_rate`) in the loss pass.
    teacher_sampler: draw the teacher sequences in the step with this sampler
      (online, the original's kl_sample/js_sample) instead of reading them
      from the batch; the teacher's distribution then comes from its logits.
    fused_head: compute the loss from hidden states with the output head
      fused in (`fused_head.fused_divergence_loss`, `fused_chunk_size` tokens
      at a time), so no `[rows, T, V]` logits exist, for the teacher either;
      objectives without a fused form (`objectives.fused_terms`) run unfused.
  """
  spec = obj_cfg.spec
  length = max_target_len
  pad_id = student.config.pad_id
  online = teacher_sampler is not None and "teacher" in spec.sources
  needs_topk = use_topk and not online and "teacher" in spec.teacher_dist
  teacher_on = set(spec.teacher_dist) - ({"teacher"} if needs_topk else set())
  if spec.hidden:
    teacher_on |= set(spec.sources)
  if teacher_on and teacher is None:
    raise ValueError(f"objective {obj_cfg.name!r} needs the teacher model at train time")
  if "student" in spec.sources and sampler is None:
    raise ValueError(f"objective {obj_cfg.name!r} samples the student: a sampler is needed")

  if online and teacher is None:
    raise ValueError("online teacher sampling needs the teacher model")
  fused = objectives.fused_terms(obj_cfg) if fused_head else None

  def draw(sampler_fn, model, inputs, input_mask, keys):
    """Samples as rows: (inputs, input_mask, tokens, mask) `[B * n, ...]`."""
    tokens, lengths = _sample_result(sampler_fn(model, inputs, input_mask, keys))
    tokens = jax.lax.stop_gradient(tokens)
    n = tokens.shape[1]
    mask = (jnp.arange(tokens.shape[-1]) < lengths[..., None]).astype(jnp.float32)
    tokens = jnp.where(mask > 0, tokens, pad_id)
    return (
      jnp.repeat(inputs, n, axis=0),
      jnp.repeat(input_mask, n, axis=0),
      _fit_length(tokens.reshape(-1, tokens.shape[-1]), length, pad_id).astype(jnp.int32),
      _fit_length(mask.reshape(-1, mask.shape[-1]), length, 0.0),
      {},
    )

  def sources_for(params, batch, key, teacher_params):
    """Row blocks: name -> (inputs, input_mask, tokens, mask, extras)."""
    blocks = {}
    inputs, input_mask = batch["inputs"], batch["input_mask"]
    index = batch["example_index"].astype(jnp.int32)
    if online:
      keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, 1), i))(index)
      t_model = teacher.merge(jax.lax.stop_gradient(teacher_params))
      blocks["teacher"] = draw(teacher_sampler, t_model, inputs, input_mask, keys)
    elif "teacher" in spec.sources:
      n = num_teacher_samples
      extras = {}
      if needs_topk:
        extras["topk"] = TeacherTopK(
          _fit_length(_flatten_samples(batch["teacher_topk_logprobs"], n), length, 0.0),
          _fit_length(_flatten_samples(batch["teacher_topk_ids"], n), length, 0),
          _fit_length(_flatten_samples(batch["teacher_tail_logmass"], n), length, 0.0),
          **{
            field: _fit_length(_flatten_samples(batch[key], n), length, 0)
            for key, field in SAMPLE_KEYS.items()
            if key in batch
          },
        )
        extras["token_logprobs"] = _fit_length(
          _flatten_samples(batch["teacher_token_logprobs"], n), length, 0.0
        )
      blocks["teacher"] = (
        jnp.repeat(inputs, n, axis=0),
        jnp.repeat(input_mask, n, axis=0),
        _fit_length(_flatten_samples(batch["teacher_tokens"], n), length, pad_id),
        _fit_length(_flatten_samples(batch["teacher_mask"], n), length, 0.0),
        extras,
      )
    if "student" in spec.sources:
      model = student.merge(jax.lax.stop_gradient(params))
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
      blocks["student"] = draw(sampler, model, inputs, input_mask, keys)
    if "ground_truth" in spec.sources:
      blocks["ground_truth"] = (
        inputs,
        input_mask,
        _fit_length(batch["targets"], length, pad_id),
        _fit_length(batch["target_mask"].astype(jnp.float32), length, 0.0),
        {},
      )
    return blocks

  def concat(blocks, names, index):
    return jnp.concatenate([blocks[n][index] for n in names], axis=0)

  def micro_loss(params, batch, teacher_params, key):
    blocks = sources_for(params, batch, jax.random.fold_in(key, 0), teacher_params)
    names = list(blocks)
    sizes = [blocks[n][0].shape[0] for n in names]
    splits = np.cumsum(sizes)[:-1]
    teacher_out, t_head = {}, None
    t_names = [n for n in names if n in teacher_on]
    if t_names:
      t_model = teacher.merge(teacher_params)
      out = models.forward(
        t_model,
        concat(blocks, t_names, 0),
        concat(blocks, t_names, 1),
        concat(blocks, t_names, 2),
        concat(blocks, t_names, 3),
        with_logits=fused is None,
      )
      cut = np.cumsum([blocks[n][0].shape[0] for n in t_names])[:-1]
      if fused is None:
        logits = jnp.split(jax.lax.stop_gradient(out.logits), cut)
      else:  # the fused loss computes teacher logits chunk by chunk from these
        logits = jnp.split(jax.lax.stop_gradient(out.hidden), cut)
        t_head = jax.lax.stop_gradient(models.output_head(t_model))
      hidden = [jnp.split(jax.lax.stop_gradient(h), cut) for h in out.layer_hidden]
      for i, n in enumerate(t_names):
        teacher_out[n] = (logits[i], tuple(h[i] for h in hidden))

    def loss_fn(p):
      s_model = student.merge(p)
      dropout_rng = jax.random.fold_in(key, 1) if dropout else None
      out = models.forward(
        s_model,
        concat(blocks, names, 0),
        concat(blocks, names, 1),
        concat(blocks, names, 2),
        concat(blocks, names, 3),
        dropout_rng=dropout_rng,
        with_logits=fused is None,
      )
      if fused is not None:
        return fused_loss(s_model, jnp.split(out.hidden, splits))
      logits = jnp.split(out.logits, splits)
      hidden = [jnp.split(h, splits) for h in out.layer_hidden] if spec.hidden else None
      srcs = {}
      for i, n in enumerate(names):
        _, _, tokens, mask, extras = blocks[n]
        t_logits, t_hidden = teacher_out.get(n, (None, None))
        srcs[n] = objectives.Source(
          tokens=tokens,
          mask=mask,
          student_logits=logits[i],
          teacher_logits=t_logits,
          teacher_topk=extras.get("topk"),
          teacher_token_logprobs=extras.get("token_logprobs"),
          student_hidden=tuple(h[i] for h in hidden) if hidden else None,
          teacher_hidden=t_hidden if spec.hidden else None,
        )
      return objectives.compute_loss(obj_cfg, srcs)

    def fused_loss(s_model, hidden):
      """sum weight * mean D(p || q) per source, from hidden states (see `fused_terms`)."""
      w, scale = models.output_head(s_model)
      where = {n: i for i, n in enumerate(names)}
      metrics, loss = {}, jnp.zeros((), jnp.float32)
      for term in fused:
        _, _, _, mask, extras = blocks[term.source]
        teacher_args = (
          {"teacher_topk": extras["topk"]}
          if "topk" in extras
          else {"teacher_hidden": teacher_out[term.source][0], "teacher_head": t_head}
        )
        total, count = fused_divergence_loss(
          term.divergence,
          hidden[where[term.source]],
          w,
          scale,
          mask,
          temperature=obj_cfg.temperature,
          chunk_size=fused_chunk_size,
          **teacher_args,
          **term.params,
        )
        metrics[f"{term.source}/{term.metric}"] = (total, count)
        mean = jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)
        loss = loss + term.weight * mean
        metrics[f"{term.source}/tokens"] = (count, jnp.ones((), jnp.float32))
      metrics["loss"] = (loss, jnp.ones((), jnp.float32))
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    del loss
    return grads, metrics

  def step(state, batch, teacher_params):
    params = state["params"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    if grad_accum_steps == 1:
      grads, metrics = micro_loss(params, batch, teacher_params, key)
    else:
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
        g, m = micro_loss(params, mb, teacher_params, jax.random.fold_in(key, i))
        acc_g, acc_m = carry
        return (jax.tree.map(jnp.add, acc_g, g), objectives.add_metrics(acc_m, m)), None

      first = jax.tree.map(lambda x: x[0], micro)
      rest = jax.tree.map(lambda x: x[1:], micro)
      init = micro_loss(params, first, teacher_params, jax.random.fold_in(key, 0))
      (grads, metrics), _ = jax.lax.scan(body, init, (jnp.arange(1, grad_accum_steps), rest))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
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


def make_mesh(mesh_cfg):
  """The (data, fsdp, model) mesh of `config.mesh`; a -1 axis takes the remaining devices.

  Without a -1 the mesh uses the first prod(sizes) devices, so a test or a
  small run can use fewer devices than the host has.
  """
  shape = {k: int(v) for k, v in dict(mesh_cfg).items()}
  devices = jax.devices()
  if -1 not in shape.values():
    devices = devices[: math.prod(shape.values())]
  return sharding.make_mesh(shape, devices=devices)


def init_state(student: Frozen, tx, seed: int, mesh, rules=sharding.DEFAULT_RULES):
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
    from fdistill_jax import distributed

    return distributed.make_global_batch(batch, mesh)
  return sharding.shard_batch(batch, mesh, rules)

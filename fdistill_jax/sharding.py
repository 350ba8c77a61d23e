"""Device mesh and logical-axis sharding rules.

Model parameters carry logical axis names in their `out_sharding` metadata
(`embed`, `mlp`, `heads`, `kv`, `vocab`, or None; see models/layers.py);
batches use `batch` and `length`. Rules map each logical name to zero or more
mesh axes of a `Mesh` with axes (data, fsdp, model):

  batch -> (data, fsdp)   data parallelism over both data and fsdp axes
  embed -> fsdp           ZeRO-3 style: parameters split over the fsdp axis
  mlp, heads, vocab -> model   tensor parallelism
  kv, length -> replicated

A rule is dropped for one dimension when the mesh lacks the axis, when the
axis has size 1, when an earlier dimension of the same array already uses it,
or when the dimension is not divisible by the axes' total size (then the
dimension falls back to fewer axes, down to replicated). So any rules work on
any mesh, and a 1-device mesh replicates everything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("mlp", "model"),
  ("heads", "model"),
  ("kv", None),
  ("vocab", "model"),
)


def make_mesh(shape: Mapping[str, int] | Sequence[tuple[str, int]] | None = None, devices=None):
  """A `Mesh` with Auto axis types (GSPMD propagates what is not pinned).

  shape: {axis: size} or [(axis, size)], one size may be -1 (the remaining
  devices); default: all devices on `data`. jax.make_mesh is not used because it
  now defaults to Explicit axis types.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = {"data": -1} if shape is None else shape
  shape = shape.to_dict() if hasattr(shape, "to_dict") else shape
  items = list(shape.items() if isinstance(shape, Mapping) else shape)
  names = tuple(name for name, _ in items)
  sizes = [int(size) for _, size in items]
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {items}: at most one axis may be -1")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh shape {items}: {len(devices)} devices not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh shape {dict(zip(names, sizes, strict=True))} needs {math.prod(sizes)} devices, "
      f"found {len(devices)}"
    )
  try:
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # noqa: BLE001 - topology-aware layout is an optimisation only
    grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def mesh_from_config(mesh_cfg):
  """The (data, fsdp, model) mesh of `config.mesh`; a -1 axis takes the remaining devices.

  Without a -1 the mesh uses the first prod(sizes) devices, so a test or a
  small run can use fewer devices than the host has.
  """
  shape = {k: int(v) for k, v in dict(mesh_cfg).items()}
  devices = jax.devices()
  if -1 not in shape.values():
    devices = devices[: math.prod(shape.values())]
  return make_mesh(shape, devices=devices)


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
  """Rules from a config: a mapping {logical: axes} or a sequence of (logical, axes) pairs."""
  if rules is None:
    return DEFAULT_RULES
  if hasattr(rules, "to_dict"):
    rules = rules.to_dict()
  items = rules.items() if isinstance(rules, Mapping) else rules
  out = []
  for item in items:
    if len(item) != 2:
      raise ValueError(f"sharding rule {item!r}: expected a (logical_name, mesh_axes) pair")
    name, axes = item
    out.append(
      (str(name), None if axes is None else axes if isinstance(axes, str) else tuple(axes))
    )
  return tuple(out)


def logical_to_spec(names, rules=DEFAULT_RULES, mesh: Mesh | None = None, shape=None):
  """Logical names (one per dimension) -> `PartitionSpec` of mesh axes (see module doc)."""
  table = dict(rules)
  used: set[str] = set()
  entries = []
  for i, name in enumerate(names):
    axes = table.get(name) if name is not None else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if mesh is not None:
      axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    axes = tuple(a for a in axes if a not in used)
    if shape is not None and mesh is not None:
      while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    used.update(axes)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*entries)


def _is_variable(x):
  return isinstance(x, nnx.Variable)


def _state(model_or_state):
  return model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)


def partition_specs(model_or_state, mesh: Mesh | None = None, rules=DEFAULT_RULES):
  """The model state with every Variable's value replaced by its `PartitionSpec`."""

  def spec(v):
    names = v.get_metadata().get("out_sharding") or (None,) * v.get_value().ndim
    return v.replace(logical_to_spec(names, rules, mesh, v.get_value().shape))

  return jax.tree.map(spec, _state(model_or_state), is_leaf=_is_variable)


def named_shardings(model_or_state, mesh: Mesh, rules=DEFAULT_RULES):
  """Like `partition_specs`, with `NamedSharding`s on `mesh` (for jit in/out_shardings)."""
  specs = partition_specs(model_or_state, mesh, rules)
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Moves `model`'s state onto `mesh` following the rules (in place); returns the model."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, named_shardings(state, mesh, rules)))
  return model


def create_sharded_model(build_fn, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Calls `build_fn()` under jit so parameters are created sharded, never whole on one device."""
  graphdef, abstract = nnx.split(nnx.eval_shape(build_fn))
  shardings = named_shardings(abstract, mesh, rules)
  state = jax.jit(lambda: nnx.split(build_fn())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def batch_spec(ndim: int, mesh: Mesh | None = None, rules=DEFAULT_RULES, batch_size=None):
  """`PartitionSpec` for an array with the batch on axis 0 (e.g. a batch entry or decode state)."""
  shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
  return logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh, shape)


def shard_batch(tree, mesh: Mesh, rules=DEFAULT_RULES):
  """Puts every array leaf of `tree` (batch on axis 0) onto `mesh`, split over the batch rule."""

  def put(x):
    spec = batch_spec(np.ndim(x), mesh, rules, np.shape(x)[0] if np.ndim(x) else None)
    return jax.device_put(x, NamedSharding(mesh, spec if np.ndim(x) else PartitionSpec()))

  return jax.tree.map(put, tree)


def decode_state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a model decode state: batch split, KV caches also split over heads.

  Self-attention caches (under "cache") are [B, heads, slots, head_dim], the
  encoder-decoder's cross-attention keys/values (under "cross") [B, slots,
  heads, head_dim]; every other leaf only has the batch (axis 0) split.
  """

  def one(path, x):
    top = path[0].key if path and isinstance(path[0], jax.tree_util.DictKey) else None
    if np.ndim(x) == 4 and top == "cache":
      names = ("batch", "heads", None, "kv")
    elif np.ndim(x) == 4:
      names = ("batch", None, "heads", "kv")
    else:
      names = ("batch",) + (None,) * (np.ndim(x) - 1)
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, np.shape(x)))

  return jax.tree_util.tree_map_with_path(one, state)


def shard_decode_state(state, mesh: Mesh, rules=DEFAULT_RULES):
  """Puts a decode state onto `mesh` with `decode_state_shardings`."""
  return jax.device_put(state, decode_state_shardings(state, mesh, rules))

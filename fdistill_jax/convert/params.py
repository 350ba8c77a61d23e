"""Checked reading of checkpoint tensors and checked assembly of a project model.

Converters read every tensor through a `TensorSource`, which names the file
and the expected shape in any error, and remembers what was read so that
tensors nobody asked for are reported instead of silently dropped. They
return a flat `{"dotted.param.path": array}` in the project's layout, which
`assemble` checks against the parameter tree of `build_model(config)`
(missing, unexpected, wrongly shaped) before merging it into a model.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from fdistill_jax import sharding
from fdistill_jax.models import ModelConfig, build_model


class ConversionError(ValueError):
  """A checkpoint does not match what the converter expects; the message says where."""


# ------------------------------------------------------------------------------
# Reading tensors.
# ------------------------------------------------------------------------------


def _safetensors_bf16(path: str, name: str) -> np.ndarray:
  """Reads one BF16 tensor, which `safetensors.numpy` cannot represent."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  info = header[name]
  start, end = info["data_offsets"]
  raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n + start, shape=(end - start,))
  return np.frombuffer(raw.tobytes(), dtype=ml_dtypes.bfloat16).reshape(info["shape"])


def _open_safetensors(path: str):
  """`safe_open(path)`, with a damaged file's error naming the file."""
  from safetensors import safe_open

  try:
    return safe_open(path, framework="numpy")
  except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
    size = os.path.getsize(path) if os.path.exists(path) else None
    raise ConversionError(
      f"{path}: not a readable safetensors file ({size} bytes; {type(e).__name__}: {e}); "
      "expected an 8-byte header length, a JSON header and the tensor data it lists: "
      "the file is truncated or not safetensors, copy or download it again"
    ) from e


class TensorSource:
  """Named tensors from one or more files, read on demand and checked.

  `loaders` maps a tensor name to `(file, shape, read)` where `read()` returns
  the array. Every `take` is recorded; `unused()` lists what was never taken.
  """

  def __init__(self, loaders: dict[str, tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]):
    self._loaders = loaders
    self._taken: set[str] = set()
    self.where = ", ".join(sorted({os.path.basename(f) for f, _, _ in loaders.values()}))
    files = sorted({f for f, _, _ in loaders.values()})
    self.folder = os.path.dirname(files[0]) if files else ""

  @classmethod
  def from_safetensors(cls, paths: Iterable[str]) -> TensorSource:
    loaders = {}
    for path in paths:
      with _open_safetensors(path) as f:
        for name in f.keys():
          sl = f.get_slice(name)
          shape, dtype = tuple(sl.get_shape()), sl.get_dtype()

          def read(path=path, name=name, dtype=dtype):
            if dtype == "BF16":
              return _safetensors_bf16(path, name)
            with _open_safetensors(path) as g:
              try:
                return g.get_tensor(name)
              except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ConversionError(f"{path}: cannot read tensor {name!r} ({e})") from e

          if name in loaders:
            raise ConversionError(
              f"Tensor {name!r} appears in both {loaders[name][0]!r} and {path!r}."
            )
          loaders[name] = (path, shape, read)
    return cls(loaders)

  @classmethod
  def from_arrays(cls, arrays: dict[str, np.ndarray], where: str) -> TensorSource:
    return cls({k: (where, tuple(v.shape), lambda v=v: v) for k, v in arrays.items()})

  def names(self) -> list[str]:
    return sorted(self._loaders)

  def __contains__(self, name: str) -> bool:
    return name in self._loaders

  def shape(self, name: str) -> tuple[int, ...]:
    return self._loaders[name][1]

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor `name` as float32, which must have `shape`."""
    if name not in self._loaders:
      near = [n for n in self._loaders if n.rsplit(".", 1)[0] == name.rsplit(".", 1)[0]]
      hint = f" Tensors with the same prefix: {near}." if near else ""
      raise ConversionError(
        f"Missing tensor {name!r} (expected shape {tuple(shape)}) in {self.where} "
        f"({self.folder}).{hint}"
      )
    path, found, read = self._loaders[name]
    if tuple(found) != tuple(shape):
      raise ConversionError(
        f"Tensor {name!r} in {path!r}: expected shape {tuple(shape)} from the config, "
        f"found {tuple(found)}."
      )
    self._taken.add(name)
    return np.asarray(read(), dtype=np.float32)

  def unused(self) -> list[str]:
    return sorted(set(self._loaders) - self._taken)

  def check_all_used(self, ignore: Iterable[str] = ()):
    """Raises if a tensor was neither taken nor matched by an `ignore` regex."""
    patterns = [re.compile(p) for p in ignore]
    left = [n for n in self.unused() if not any(p.fullmatch(n) for p in patterns)]
    if left:
      shown = ", ".join(f"{n} {self.shape(n)}" for n in left[:10])
      more = f" and {len(left) - 10} more" if len(left) > 10 else ""
      raise ConversionError(
        f"Unexpected tensors in {self.where} ({self.folder}) that the converter does not map: "
        f"{shown}{more}. The checkpoint holds parts this architecture does not have; check "
        "config.json's architecture and sizes."
      )


# ------------------------------------------------------------------------------
# Assembling a model.
# ------------------------------------------------------------------------------


def _flat(state) -> list[tuple[str, nnx.Variable]]:
  return [(".".join(map(str, path)), var) for path, var in nnx.to_flat_state(state)]


def param_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
  """{dotted path: (shape, dtype)} of `build_model(config)`'s parameters, without allocating."""
  abstract = nnx.eval_shape(lambda: build_model(config, 0))
  return {
    name: (tuple(var.get_value().shape), var.get_value().dtype)
    for name, var in _flat(nnx.state(abstract, nnx.Param))
  }


def assemble(config: ModelConfig, flat: dict[str, np.ndarray], where: str, mesh=None, rules=None):
  """A model for `config` holding exactly the arrays in `flat` (cast to param_dtype).

  The model is built abstractly (`nnx.eval_shape`), so no random weights are
  allocated that would be overwritten at once. With a `mesh`, each parameter
  goes straight to its sharding under `rules` (default
  `fdistill_jax.sharding.DEFAULT_RULES`), never whole onto one device.
  """
  rules = sharding.DEFAULT_RULES if rules is None else sharding.rules_from_config(rules)
  abstract = nnx.eval_shape(lambda: build_model(config, 0))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if _flat(rest):
    raise ConversionError(f"Model {config.family} holds non-parameter state; cannot assemble it.")
  variables = dict(_flat(params))
  missing = sorted(set(variables) - set(flat))
  extra = sorted(set(flat) - set(variables))
  if missing or extra:
    raise ConversionError(
      f"Converted parameters from {where} do not match the {config.family} model: "
      f"missing {missing[:10]}, unexpected {extra[:10]}."
    )
  for name, var in variables.items():
    want = var.get_value()
    if tuple(flat[name].shape) != tuple(want.shape):
      raise ConversionError(
        f"Converted parameter {name} from {where}: the model expects shape "
        f"{tuple(want.shape)}, the conversion produced {tuple(flat[name].shape)}."
      )
    value = np.asarray(flat[name]).astype(want.dtype)
    if mesh is None:
      var.set_value(jnp.asarray(value))
    else:
      names = var.get_metadata().get("out_sharding") or (None,) * value.ndim
      spec = sharding.logical_to_spec(names, rules, mesh, value.shape)
      var.set_value(jax.device_put(value, NamedSharding(mesh, spec)))
  return nnx.merge(graphdef, params, rest)


def model_params(model) -> dict[str, np.ndarray]:
  """{dotted path: array} of a model's parameters (the inverse view of `assemble`)."""
  return {name: np.asarray(var.get_value()) for name, var in _flat(nnx.state(model, nnx.Param))}

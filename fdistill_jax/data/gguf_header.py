"""The metadata of a GGUF file, read without touching its tensor data.

`read_header(path)` parses llama.cpp's header (format versions 2 and 3,
little-endian; llama.cpp's docs/gguf.md): the key-value metadata as Python
values and the tensor table (name, shape, type, offset). It reads through a
memory map and stops where the tensor data begins, so building a config
from a 100 MB model touches only the header's pages (a few MB: the
vocabulary and merges), and a file cut right after its header still reads.
Value type codes are the `gguf` package's `GGUFValueType`.

`gguf.GGUFReader` (the tensors' loader) builds a numpy view per field and
per vocabulary entry; for SmolLM2's 49k tokens that takes seconds, this a
fraction of one.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import struct

import gguf
import numpy as np

_SCALARS = {  # GGUFValueType -> struct format (little-endian)
  gguf.GGUFValueType.UINT8: "<B",
  gguf.GGUFValueType.INT8: "<b",
  gguf.GGUFValueType.UINT16: "<H",
  gguf.GGUFValueType.INT16: "<h",
  gguf.GGUFValueType.UINT32: "<I",
  gguf.GGUFValueType.INT32: "<i",
  gguf.GGUFValueType.FLOAT32: "<f",
  gguf.GGUFValueType.BOOL: "<?",
  gguf.GGUFValueType.UINT64: "<Q",
  gguf.GGUFValueType.INT64: "<q",
  gguf.GGUFValueType.FLOAT64: "<d",
}


class GGUFHeaderError(ValueError):
  """A file that is not a GGUF file this reader can parse; the message names it."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  shape: tuple[int, ...]  # numpy order (slowest axis first); GGUF lists dims fastest-first
  type: int  # gguf.GGMLQuantizationType
  offset: int  # bytes from the start of the tensor data


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
  path: str
  version: int
  fields: dict  # key -> int, float, bool, str, or a list of them
  types: dict  # key -> (GGUFValueType, the element type for arrays else None)
  tensors: dict  # name -> TensorInfo, in the file's order
  data_offset: int  # where the tensor data begins (aligned)

  def get(self, key: str, default=None):
    value = self.fields.get(key)
    return default if value is None else value


class _Cursor:
  """Reads little-endian values from a buffer; every read past its end names the file."""

  def __init__(self, buf, path: str):
    self.buf, self.pos, self.path = buf, 0, path

  def _need(self, n: int):
    if self.pos + n > len(self.buf):
      raise GGUFHeaderError(
        f"{self.path!r}: the GGUF header ends early (byte {self.pos} of {len(self.buf)}, "
        f"{n} more needed): a truncated or corrupt file."
      )

  def scalar(self, fmt: str):
    size = struct.calcsize(fmt)
    self._need(size)
    (value,) = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += size
    return value

  def string(self) -> str:
    n = self.scalar("<Q")
    self._need(n)
    raw = bytes(self.buf[self.pos : self.pos + n])
    self.pos += n
    return raw.decode("utf-8", errors="replace")

  def value(self, kind: int):
    if kind == gguf.GGUFValueType.STRING:
      return self.string()
    if kind not in _SCALARS:
      raise GGUFHeaderError(f"{self.path!r}: unknown GGUF value type {kind} at byte {self.pos}.")
    return self.scalar(_SCALARS[kind])

  def array(self):
    """(values, element type) of an array value."""
    kind, n = self.scalar("<I"), self.scalar("<Q")
    if kind in _SCALARS:  # numeric arrays in one numpy read
      dtype = np.dtype(_SCALARS[kind])
      self._need(n * dtype.itemsize)
      values = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
      self.pos += n * dtype.itemsize
      return values, kind
    if kind == gguf.GGUFValueType.ARRAY:
      return [self.array()[0] for _ in range(n)], kind
    return [self.value(kind) for _ in range(n)], kind


def _parse(buf, path: str) -> GGUFHeader:
  c = _Cursor(buf, path)
  if len(buf) < 4 or c.scalar("<I") != gguf.GGUF_MAGIC:
    raise GGUFHeaderError(f"{path!r}: expected a GGUF file (magic 'GGUF'); found other bytes.")
  version = c.scalar("<I")
  if version not in (2, 3):
    raise GGUFHeaderError(
      f"{path!r}: GGUF version {version}; this reader parses versions 2 and 3 (little-endian)."
    )
  num_tensors, num_fields = c.scalar("<Q"), c.scalar("<Q")
  fields, types = {}, {}
  for _ in range(num_fields):
    key, kind = c.string(), c.scalar("<I")
    if kind == gguf.GGUFValueType.ARRAY:
      fields[key], sub = c.array()
      types[key] = (gguf.GGUFValueType(kind), gguf.GGUFValueType(sub))
    else:
      fields[key] = c.value(kind)
      types[key] = (gguf.GGUFValueType(kind), None)
  tensors = {}
  for _ in range(num_tensors):
    name = c.string()
    dims = [c.scalar("<Q") for _ in range(c.scalar("<I"))]
    kind, offset = c.scalar("<I"), c.scalar("<Q")
    tensors[name] = TensorInfo(name, tuple(reversed(dims)), kind, offset)
  alignment = int(fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
  data_offset = -(-c.pos // alignment) * alignment
  return GGUFHeader(path, version, fields, types, tensors, data_offset)


@functools.lru_cache(maxsize=4)
def _cached(path: str, mtime_ns: int, size: int) -> GGUFHeader:
  del mtime_ns, size  # part of the cache key only
  with open(path, "rb") as f:
    if os.fstat(f.fileno()).st_size == 0:
      raise GGUFHeaderError(f"{path!r}: an empty file, expected a GGUF file.")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
      return _parse(buf, path)


def read_header(path: str) -> GGUFHeader:
  """The header of the GGUF file at `path`, cached while the file is unchanged."""
  path = os.path.realpath(os.fspath(path))
  st = os.stat(path)
  return _cached(path, st.st_mtime_ns, st.st_size)

"""Files on local disks or object stores, and atomic writes.

Paths with a scheme (gs://, s3://, ram://) go through `tf.io.gfile`, so a
TPU job can write records straight to a bucket; local paths use `os`, which
can fsync. `atomic_write_bytes` and `fs_commit` write under a temporary name and
rename: readers never see half a file (on object stores a rename is a copy
then delete, still never a partly visible file under the final name).
"""

from __future__ import annotations

import hashlib
import os
import uuid


def _remote(path: str) -> bool:
  return "://" in path


def _gfile():
  # TensorFlow only for remote paths: local record tools must not pay its start-up.
  import tensorflow as tf

  return tf.io.gfile


def fs_open(path: str, mode: str):
  return _gfile().GFile(path, mode) if _remote(path) else open(path, mode)


def fs_exists(path: str) -> bool:
  return _gfile().exists(path) if _remote(path) else os.path.exists(path)


def fs_size(path: str) -> int:
  return _gfile().stat(path).length if _remote(path) else os.path.getsize(path)


def fs_listdir(path: str) -> list[str]:
  return [p.rstrip("/") for p in _gfile().listdir(path)] if _remote(path) else os.listdir(path)


def fs_makedirs(path: str):
  _gfile().makedirs(path) if _remote(path) else os.makedirs(path, exist_ok=True)


def fs_remove(path: str):
  _gfile().remove(path) if _remote(path) else os.remove(path)


def fs_commit(tmp: str, path: str):
  """Renames a finished temporary file into place (durably, on local disks)."""
  if _remote(path):
    _gfile().rename(tmp, path, overwrite=True)
    return
  with open(tmp, "rb") as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    os.fsync(fd)  # the rename itself
  finally:
    os.close(fd)


def tmp_name(path: str) -> str:
  return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write_bytes(path: str, data: bytes):
  """Writes `data` to `path` so that readers see all of it or nothing."""
  tmp = tmp_name(path)
  with fs_open(tmp, "wb") as f:
    f.write(data)
  fs_commit(tmp, path)


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with fs_open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()

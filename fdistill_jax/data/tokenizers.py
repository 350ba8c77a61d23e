"""One small tokenizer interface for every tokenizer the library reads.

Implementations: SentencePiece models (T5 style), Hugging Face
`tokenizer.json` files, the byte-level BPE embedded in GGUF files, and the
word-level vocabulary of the built-in synthetic task.
"""

from __future__ import annotations

import abc
import hashlib


class Tokenizer(abc.ABC):
  """Text <-> token ids, with the special ids the models and samplers need."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids the model's embedding must hold."""

  @property
  @abc.abstractmethod
  def pad_id(self) -> int: ...

  @property
  @abc.abstractmethod
  def eos_id(self) -> int: ...

  @property
  def bos_id(self) -> int | None:
    return None

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without BOS/EOS (callers add those)."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """Text of `ids`; stops at the first EOS and skips padding."""

  @abc.abstractmethod
  def _fingerprint_bytes(self) -> bytes:
    """Bytes that identify the vocabulary (model file, vocab table)."""

  def fingerprint(self) -> str:
    """A short stable hash of the vocabulary, stored in record manifests."""
    return hashlib.sha256(self._fingerprint_bytes()).hexdigest()[:16]

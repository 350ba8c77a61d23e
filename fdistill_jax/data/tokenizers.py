"""One small tokenizer interface for every tokenizer the library reads.

Implementations: SentencePiece models (T5 style), Hugging Face
`tokenizer.json` files, the tokenizers embedded in GGUF files (byte-level
BPE, or SentencePiece rebuilt from its pieces: `data.gguf_tokenizer`), and the word-level
vocabulary of the built-in synthetic task. `load_tokenizer(spec)` builds one
from a config.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os


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
    """Text of generated `ids`: stops at the first EOS, skips padding and a leading BOS."""

  def decode_all(self, ids) -> str:
    """A whole sequence as written (a chat prompt, say): padding at either end is
    removed, every other id is shown, special markers (BOS, EOS, ChatML's
    `<|im_start|>`) included. Where padding is EOS (GPT-2, SmolLM2), a
    trailing EOS counts as padding."""
    return self._decode_all(_strip_padding(ids, self.pad_id))

  def _decode_all(self, ids: list[int]) -> str:
    """Text of every id in `ids`, special tokens written out."""
    raise NotImplementedError(f"{type(self).__name__} cannot write out its special tokens.")

  @abc.abstractmethod
  def _fingerprint_bytes(self) -> bytes:
    """Bytes that identify the vocabulary (model file, vocab table)."""

  def fingerprint(self) -> str:
    """A short stable hash of the vocabulary, stored in record manifests."""
    return hashlib.sha256(self._fingerprint_bytes()).hexdigest()[:16]


def _stop_at_eos(ids, eos_id: int, pad_id: int) -> list[int]:
  """`ids` cut before the first EOS, with padding removed."""
  out = []
  for i in ids:
    i = int(i)
    if i == eos_id:
      break
    if i != pad_id:
      out.append(i)
  return out


def _strip_padding(ids, pad_id: int) -> list[int]:
  """`ids` without the runs of padding at either end (padding never sits inside)."""
  ids = [int(i) for i in ids]
  start, end = 0, len(ids)
  while start < end and ids[start] == pad_id:
    start += 1
  while end > start and ids[end - 1] == pad_id:
    end -= 1
  return ids[start:end]


def _check_file(path: str, what: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: expected a file at {path!r}, found nothing there.")
  return path


# ------------------------------------------------------------------------------
# SentencePiece (T5 style).
# ------------------------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file, T5 style.

  T5 reserves `extra_ids` sentinel ids (`<extra_id_0>` is the highest id)
  above the SentencePiece vocabulary, so the model's embedding holds
  `sp_vocab + extra_ids` rows. Special ids come from the model file; a model
  trained without a pad piece (SentencePiece's default) pads with EOS unless
  `pad_id` says otherwise.
  """

  def __init__(
    self,
    path: str,
    *,
    extra_ids: int = 0,
    pad_id: int | None = None,
    eos_id: int | None = None,
    bos_id: int | None = None,
    vocab_size: int | None = None,
    model_proto: bytes | None = None,
  ):
    """`model_proto`, when given, is the serialized model and `path` only names it."""
    import sentencepiece as spm

    if model_proto is None:
      self._path = _check_file(path, "SentencePiece tokenizer")
      with open(self._path, "rb") as f:
        model_proto = f.read()
    else:
      self._path = os.fspath(path)
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self._extra_ids = int(extra_ids)
    n = self._sp.get_piece_size() + self._extra_ids
    self._vocab_size = n if vocab_size is None else int(vocab_size)
    if self._vocab_size < n:
      raise ValueError(
        f"Tokenizer {self._path!r}: vocab_size={self._vocab_size} is smaller than the "
        f"{n} ids the tokenizer can produce."
      )
    sp_eos = self._sp.eos_id()
    self._eos = int(eos_id) if eos_id is not None else sp_eos
    if self._eos < 0:
      raise ValueError(
        f"SentencePiece model {self._path!r} has no EOS piece; pass eos_id in the tokenizer config."
      )
    sp_pad = self._sp.pad_id()
    self._pad = int(pad_id) if pad_id is not None else (sp_pad if sp_pad >= 0 else self._eos)
    sp_bos = self._sp.bos_id()
    self._bos = int(bos_id) if bos_id is not None else (sp_bos if sp_bos >= 0 else None)

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def bos_id(self) -> int | None:
    return self._bos

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids) -> str:
    n = self._sp.get_piece_size()
    # Sentinel ids have no piece; they are dropped as T5's vocabulary does.
    kept = [i for i in _stop_at_eos(ids, self._eos, self._pad) if i < n]
    return self._sp.decode(kept)

  def _decode_all(self, ids: list[int]) -> str:
    n = self._sp.get_piece_size()
    out, run = [], []

    def flush():
      text = self._sp.decode(run)
      # SentencePiece drops the space of a word-initial piece at the start of
      # its input; after a special token it is text.
      if out and run and self._sp.id_to_piece(run[0]).startswith("\u2581"):
        text = " " + text
      out.append(text)
      run.clear()

    for i in ids:
      if i < n and not (self._sp.is_control(i) or self._sp.is_unknown(i)):
        run.append(i)
        continue
      flush()
      # T5's sentinels count down from the top id: <extra_id_0> is the highest.
      out.append(self._sp.id_to_piece(i) if i < n else f"<extra_id_{n + self._extra_ids - 1 - i}>")
    flush()
    return "".join(out)

  @property
  def model_proto(self) -> bytes:
    """The serialized SentencePiece model (what exporters write as `tokenizer.model`)."""
    return self._proto

  def piece(self, i: int) -> str:
    """The piece of id `i`."""
    return self._sp.id_to_piece(int(i))

  def _fingerprint_bytes(self) -> bytes:
    return self._proto + f"extra_ids={self._extra_ids}".encode()


# ------------------------------------------------------------------------------
# Hugging Face tokenizer.json and GGUF byte-level BPE (both via `tokenizers`).
# ------------------------------------------------------------------------------

# Tokens tried, in order, when neither the config nor tokenizer_config.json
# names a special token.
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|im_end|>", "<eos>", "<|end_of_text|>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")


class _HFBackedTokenizer(Tokenizer):
  """Shared behaviour of tokenizers run by the `tokenizers` package."""

  def __init__(self, tok, *, eos_id, pad_id, bos_id, vocab_size, where: str):
    self._tok = tok
    self._where = where
    n = tok.get_vocab_size(with_added_tokens=True)
    self._vocab_size = int(vocab_size) if vocab_size is not None else n
    if self._vocab_size < n:
      raise ValueError(
        f"Tokenizer {where}: vocab_size={self._vocab_size} is smaller than the "
        f"{n} ids the tokenizer can produce."
      )
    if eos_id is None:
      raise ValueError(
        f"Tokenizer {where}: cannot tell the EOS token (tried {', '.join(_EOS_CANDIDATES)}); "
        "pass eos_id in the tokenizer config."
      )
    self._eos = int(eos_id)
    self._pad = int(pad_id) if pad_id is not None else self._eos
    self._bos = None if bos_id is None else int(bos_id)

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def bos_id(self) -> int | None:
    return self._bos

  @property
  def backend(self):
    """The `tokenizers.Tokenizer` doing the work (exporters save it as tokenizer.json)."""
    return self._tok

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids) -> str:
    # BART-style models emit BOS as their first token (forced_bos_token_id);
    # it is markup, not text. Elsewhere it is text as written (ChatML's BOS
    # is its turn marker), as are the other special tokens.
    kept = _stop_at_eos(ids, self._eos, self._pad)
    if kept and kept[0] == self._bos:
      kept = kept[1:]
    return self._tok.decode(kept, skip_special_tokens=False)

  def _decode_all(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=False)

  def _fingerprint_bytes(self) -> bytes:
    return self._tok.to_str().encode()


def _token_id(tok, name) -> int | None:
  if name is None:
    return None
  if isinstance(name, dict):  # tokenizer_config.json's AddedToken form
    name = name.get("content")
  return tok.token_to_id(name)


def _first_present(tok, candidates) -> int | None:
  for name in candidates:
    i = tok.token_to_id(name)
    if i is not None:
      return i
  return None


class HFTokenizer(_HFBackedTokenizer):
  """A Hugging Face tokenizer folder or file.

  `path` is a `tokenizer.json`, or a folder holding one, or a folder with the
  older GPT-2/BART byte-level BPE pair `vocab.json` + `merges.txt` (the same
  format as GPT-2's `encoder.json` + `vocab.bpe`).

  Special ids, in order of precedence: the explicit arguments, the
  `eos_token`/`pad_token`/`bos_token` of a `tokenizer_config.json` beside the
  file, then well-known token strings.
  """

  def __init__(self, path: str, *, eos_id=None, pad_id=None, bos_id=None, vocab_size=None):
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    tok, path = _read_hf_tokenizer(path)
    cfg = {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
      with open(cfg_path) as f:
        cfg = json.load(f)

    def pick(explicit, key, candidates):
      if explicit is not None:
        return explicit
      i = _token_id(tok, cfg.get(key))
      return i if i is not None else _first_present(tok, candidates)

    super().__init__(
      tok,
      eos_id=pick(eos_id, "eos_token", _EOS_CANDIDATES),
      pad_id=pick(pad_id, "pad_token", _PAD_CANDIDATES),
      bos_id=pick(bos_id, "bos_token", _BOS_CANDIDATES),
      vocab_size=vocab_size,
      where=repr(path),
    )


def _read_hf_tokenizer(path: str):
  """(tokenizers.Tokenizer, the file it came from) for HFTokenizer's accepted paths."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers

  if os.path.isdir(path):
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")) and os.path.isfile(vocab):
      tok = tokenizers.Tokenizer(models.BPE.from_file(vocab, _check_file(merges, "BPE merges")))
      tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
      tok.decoder = decoders.ByteLevel()
      # Without tokenizer.json nothing marks the special tokens; the usual ones
      # must still encode to their single ids when they appear in text.
      known = _EOS_CANDIDATES + _PAD_CANDIDATES + _BOS_CANDIDATES + ("<unk>", "<mask>")
      tok.add_special_tokens([t for t in known if tok.token_to_id(t) is not None])
      return tok, vocab
    path = os.path.join(path, "tokenizer.json")
  path = _check_file(path, "Hugging Face tokenizer")
  return tokenizers.Tokenizer.from_file(path), path


# ------------------------------------------------------------------------------
# Factory.
# ------------------------------------------------------------------------------

_KINDS = {
  "sentencepiece": SentencePieceTokenizer,
  "hf": HFTokenizer,
  "gguf": lambda path, **kw: _gguf_module().gguf_tokenizer(path, **kw),
}


def _gguf_module():
  """`data.gguf_tokenizer`, imported on first use: it builds on this module's classes."""
  from fdistill_jax.data import gguf_tokenizer

  return gguf_tokenizer


_OPTIONAL_KEYS = ("eos_id", "pad_id", "bos_id", "vocab_size", "extra_ids")


def load_tokenizer(spec) -> Tokenizer:
  """A tokenizer from a config (`ml_collections.ConfigDict` or dict).

  `spec.kind` is one of `sentencepiece`, `hf`, `gguf`; `spec.path` the file
  (or, for `hf`, a folder with `tokenizer.json`). Optional `eos_id`, `pad_id`,
  `bos_id`, `vocab_size` override what the file says; `extra_ids` adds T5's
  sentinel ids to a SentencePiece vocabulary.
  """
  get = spec.get if hasattr(spec, "get") else lambda k, d=None: getattr(spec, k, d)
  kind = get("kind")
  if kind not in _KINDS:
    raise ValueError(
      f"Tokenizer config: kind={kind!r} is not one of {sorted(_KINDS)} (config: {spec})."
    )
  path = get("path")
  if not path:
    raise ValueError(f"Tokenizer config: kind={kind!r} needs a path (config: {spec}).")
  kwargs = {k: get(k) for k in _OPTIONAL_KEYS if get(k) is not None}
  if "extra_ids" in kwargs and kind != "sentencepiece":
    raise ValueError(f"Tokenizer config: extra_ids applies to kind='sentencepiece', not {kind!r}.")
  return _KINDS[kind](path, **kwargs)

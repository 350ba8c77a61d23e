"""The tokenizers embedded in GGUF files (llama.cpp's format).

Byte-level BPE vocabularies become a Hugging Face `tokenizers` model with the
pre-tokenizer `tokenizer.ggml.pre` names; SentencePiece vocabularies are
rebuilt from their pieces. `gguf_reader` caches one open reader per file, for
the model loader (`convert/gguf.py`) and the tokenizer alike.
"""

from __future__ import annotations

import functools
import os

from fdistill_jax.data.gguf_header import read_header
from fdistill_jax.data.tokenizers import (
  SentencePieceTokenizer,
  Tokenizer,
  _check_file,
  _HFBackedTokenizer,
)

# llama.cpp's names for the pre-tokenizer regexes (`tokenizer.ggml.pre`) that
# this module reproduces. GPT-2's own split is ByteLevel's built-in regex.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gguf_pre_tokenizer(pre: str, where: str):
  from tokenizers import Regex, pre_tokenizers

  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("gpt2", "default", ""):
    return byte_level
  if pre == "smollm":
    # SmolLM's tokenizer.json splits every digit before the GPT-2 regex.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in ("llama-bpe", "llama3"):
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  raise ValueError(
    f"GGUF tokenizer {where}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
    "(supported: gpt2, smollm, llama-bpe). Export the model's tokenizer.json and use kind='hf'."
  )


class GGUFTokenizer(_HFBackedTokenizer):
  """The byte-level BPE (`tokenizer.ggml.model == "gpt2"`) embedded in a GGUF file.

  Rebuilt as a `tokenizers` BPE from `tokenizer.ggml.tokens` and `.merges`;
  control tokens (token type 3, e.g. ChatML's `<|im_start|>`) are special
  tokens, so chat markup in the text encodes to their single ids.
  """

  def __init__(
    self, path: str, *, eos_id=None, pad_id=None, bos_id=None, vocab_size=None, fields=None
  ):
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models

    path = _check_file(path, "GGUF tokenizer")
    where = repr(path)
    field = _gguf_fields(path) if fields is None else fields
    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
      raise ValueError(
        f"GGUF tokenizer {where}: tokenizer.ggml.model={kind!r}; this class reads byte-level "
        "BPE ('gpt2'); use gguf_tokenizer(), which also reads SentencePiece ('llama')."
      )
    tokens = field("tokenizer.ggml.tokens")
    merges = field("tokenizer.ggml.merges")
    types = field("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = _Tok(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _gguf_pre_tokenizer(field("tokenizer.ggml.pre", "gpt2"), where)
    tok.decoder = decoders.ByteLevel()
    # 3 = CONTROL, 4 = USER_DEFINED in llama.cpp's token types.
    specials = [t for t, ty in zip(tokens, types, strict=True) if ty in (3, 4)]
    tok.add_special_tokens(specials)

    def special(explicit, key):
      return explicit if explicit is not None else field(key)

    super().__init__(
      tok,
      eos_id=special(eos_id, "tokenizer.ggml.eos_token_id"),
      pad_id=special(pad_id, "tokenizer.ggml.padding_token_id"),
      bos_id=special(bos_id, "tokenizer.ggml.bos_token_id"),
      vocab_size=vocab_size,
      where=where,
    )


@functools.lru_cache(maxsize=2)
def _cached_gguf_reader(path: str, mtime_ns: int, size: int):
  del mtime_ns, size  # part of the cache key only
  import gguf

  return gguf.GGUFReader(path)


def gguf_reader(path: str):
  """A `gguf.GGUFReader`, shared while the file is unchanged.

  Parsing the metadata of a 49k-token vocabulary takes seconds, and a teacher
  and its tokenizer read the same file.
  """
  path = os.path.realpath(path)
  st = os.stat(path)
  return _cached_gguf_reader(path, st.st_mtime_ns, st.st_size)


def _gguf_fields(path: str):
  """`field(key, default)` over a GGUF file's metadata (its header alone)."""
  return read_header(path).get


def _spm_proto_from_gguf(field, where: str) -> bytes:
  """A SentencePiece model rebuilt from llama.cpp's `llama` tokenizer metadata.

  GGUF keeps SentencePiece's pieces, scores and piece types (the type codes
  are SentencePiece's own); the normaliser is llama's: no NFKC, a dummy
  prefix space unless `tokenizer.ggml.add_space_prefix` is false, spaces as
  U+2581.
  """
  from sentencepiece import sentencepiece_model_pb2 as pb

  tokens = field("tokenizer.ggml.tokens")
  scores = field("tokenizer.ggml.scores")
  types = field("tokenizer.ggml.token_type")
  if tokens is None or scores is None or types is None:
    raise ValueError(
      f"GGUF tokenizer {where}: a 'llama' (SentencePiece) tokenizer needs tokenizer.ggml.tokens, "
      ".scores and .token_type; some are missing."
    )
  proto = pb.ModelProto()
  for piece, score, kind in zip(tokens, scores, types, strict=True):
    proto.pieces.add(piece=piece, score=float(score), type=int(kind))
  spec = proto.trainer_spec
  spec.model_type = pb.TrainerSpec.BPE
  spec.byte_fallback = any(int(k) == pb.ModelProto.SentencePiece.BYTE for k in types)
  for name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
    value = field(f"tokenizer.ggml.{key}_token_id")
    setattr(spec, f"{name}_id", -1 if value is None else int(value))
  norm = proto.normalizer_spec
  norm.name = "identity"
  norm.add_dummy_prefix = bool(field("tokenizer.ggml.add_space_prefix", True))
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True
  return proto.SerializeToString()


def gguf_tokenizer(path: str, **overrides) -> Tokenizer:
  """The tokenizer embedded in a GGUF file: byte-level BPE (`gpt2`) or SentencePiece (`llama`)."""
  path = _check_file(path, "GGUF tokenizer")
  field = _gguf_fields(path)
  kind = field("tokenizer.ggml.model")
  if kind == "llama":
    return SentencePieceTokenizer(
      path, model_proto=_spm_proto_from_gguf(field, repr(path)), **overrides
    )
  if kind == "gpt2":
    return GGUFTokenizer(path, fields=field, **overrides)
  raise ValueError(
    f"GGUF tokenizer {path!r}: tokenizer.ggml.model={kind!r} is not supported (supported: "
    "'gpt2' byte-level BPE, 'llama' SentencePiece). Export the model's tokenizer.json and use "
    "kind='hf'."
  )

"""A model's tokenizer, in the forms the exporters write: HF tokenizer files and GGUF metadata.

`export_tokenizer(spec)` reads a `load_tokenizer` spec (kind `gguf`, `hf` or
`sentencepiece` + path) once and returns an `ExportedTokenizer`:

* `hf_files`: {file name: bytes} for a Hugging Face folder (`tokenizer.json`
  or a SentencePiece model, plus `tokenizer_config.json` with the special
  tokens and the chat template, and `special_tokens_map.json`);
* `gguf_fields`: {key: (value, GGUFValueType, element type or None)}, the
  `tokenizer.*` metadata llama.cpp reads. Copied verbatim from a GGUF
  source; built from a byte-level BPE `tokenizer.json` otherwise.

What a format cannot hold is refused with a `ConversionError` naming the
tokenizer and what it is (e.g. a SentencePiece model as GGUF, or the word
vocabulary of the synthetic task anywhere).
"""

from __future__ import annotations

import dataclasses
import json
import os

from fdistill_jax.convert.params import ConversionError
from fdistill_jax.data import gguf_tokenizer
from fdistill_jax.data import tokenizers as toks

# The ChatML template (SmolLM2, Qwen, ...) in the Jinja form transformers and
# llama.cpp render; written when the source has none but the vocabulary
# holds ChatML's markers.
CHATML_TEMPLATE = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# llama.cpp's token types (`tokenizer.ggml.token_type`).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


@dataclasses.dataclass
class ExportedTokenizer:
  tokenizer: toks.Tokenizer  # the loaded tokenizer (special ids, vocabulary)
  hf_files: dict  # file name -> bytes, for a Hugging Face folder
  gguf_fields: dict | None  # key -> (value, GGUFValueType, sub type); None: not expressible
  gguf_refusal: str  # why `gguf_fields` is None ("" otherwise)
  chat_template: str | None  # Jinja chat template, when the source has one (or uses ChatML)
  bos_id: int | None
  eos_id: int
  pad_id: int


def _id_to_token(tok: toks.Tokenizer):
  """id -> token string for the `tokenizers`-backed tokenizers."""
  backend = tok.backend
  return lambda i: backend.id_to_token(int(i))


def _default_template(tok: toks.Tokenizer) -> str | None:
  backend = getattr(tok, "backend", None)
  if backend is not None and backend.token_to_id("<|im_start|>") is not None:
    if backend.token_to_id("<|im_end|>") is not None:
      return CHATML_TEMPLATE
  return None


def _tokenizer_config(tok, name_of, chat_template, tokenizer_class) -> dict:
  cfg = {
    "tokenizer_class": tokenizer_class,
    "eos_token": name_of(tok.eos_id),
    "pad_token": name_of(tok.pad_id),
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
  }
  if tok.bos_id is not None:
    cfg["bos_token"] = name_of(tok.bos_id)
  if chat_template:
    cfg["chat_template"] = chat_template
  return cfg


def _json_bytes(value) -> bytes:
  return json.dumps(value, indent=2, ensure_ascii=False).encode()


def _specials_map(cfg: dict) -> dict:
  return {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token") if k in cfg}


def _gguf_source_fields(path: str) -> dict:
  """Every `tokenizer.*` key of a GGUF file, with its value types."""
  import gguf

  fields = {}
  for key, field in gguf_tokenizer.gguf_reader(path).fields.items():
    if not key.startswith("tokenizer."):
      continue
    main = field.types[0]
    sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
    fields[key] = (field.contents(), main, sub)
  return fields


def _pre_name(pre_tokenizer: dict | None, where: str) -> str:
  """llama.cpp's `tokenizer.ggml.pre` for the pre-tokenizers `GGUFTokenizer` reproduces."""
  if pre_tokenizer is None:
    raise ConversionError(f"{where}: a GGUF tokenizer needs a pre-tokenizer; this has none.")
  kind = pre_tokenizer.get("type")
  if kind == "ByteLevel" and pre_tokenizer.get("use_regex", True):
    return "gpt2"
  if kind == "Sequence":
    parts = pre_tokenizer.get("pretokenizers", [])
    types = [p.get("type") for p in parts]
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
      return "smollm"
  raise ConversionError(
    f"{where}: pre-tokenizer {json.dumps(pre_tokenizer)[:200]} has no llama.cpp name this "
    "exporter knows (it writes gpt2 and smollm byte-level BPE)."
  )


def _gguf_fields_from_json(tok, text: str, chat_template, where: str) -> dict:
  """GGUF `tokenizer.*` metadata of a byte-level BPE `tokenizer.json`."""
  import gguf

  spec = json.loads(text)
  model = spec.get("model", {})
  if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
    raise ConversionError(
      f"{where}: GGUF export writes byte-level BPE tokenizers; this tokenizer.json has model "
      f"{model.get('type')!r} and decoder {(spec.get('decoder') or {}).get('type')!r}."
    )
  pre = _pre_name(spec.get("pre_tokenizer"), where)
  n = tok.backend.get_vocab_size(with_added_tokens=True)
  tokens = [tok.backend.id_to_token(i) for i in range(n)]
  if any(t is None for t in tokens):
    raise ConversionError(f"{where}: token ids are not contiguous; GGUF needs one token per id.")
  types = [_NORMAL] * n
  for added in spec.get("added_tokens", []):
    types[int(added["id"])] = _CONTROL if added.get("special") else _USER_DEFINED
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  V = gguf.GGUFValueType
  fields = {
    "tokenizer.ggml.model": ("gpt2", V.STRING, None),
    "tokenizer.ggml.pre": (pre, V.STRING, None),
    "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
    "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
    "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING),
  }
  if chat_template:
    fields["tokenizer.chat_template"] = (chat_template, V.STRING, None)
  return fields


def _special_id_fields(tok) -> dict:
  import gguf

  ids = {
    "tokenizer.ggml.eos_token_id": tok.eos_id,
    "tokenizer.ggml.padding_token_id": tok.pad_id,
    "tokenizer.ggml.bos_token_id": tok.bos_id,
  }
  return {k: (int(v), gguf.GGUFValueType.UINT32, None) for k, v in ids.items() if v is not None}


def export_tokenizer(spec) -> ExportedTokenizer:
  """The tokenizer of `spec` (a `load_tokenizer` config) in both export forms."""
  get = spec.get if hasattr(spec, "get") else lambda k, d=None: getattr(spec, k, d)
  kind, path = get("kind"), get("path")
  where = f"tokenizer {kind}:{path!r}"
  if kind not in ("gguf", "hf", "sentencepiece"):
    raise ConversionError(
      f"{where}: only gguf, hf and sentencepiece tokenizers can be exported (the word "
      "vocabulary of a synthetic or word-level task has no Hugging Face or GGUF form)."
    )
  tok = toks.load_tokenizer(spec)
  if isinstance(tok, toks.SentencePieceTokenizer):
    # Hugging Face reads the model file itself; GGUF would need llama.cpp's
    # SentencePiece metadata, which this exporter does not write.
    chat_template = None
    if kind == "gguf":
      chat_template = _gguf_source_fields(path).get("tokenizer.chat_template", (None,))[0]
    cfg = _tokenizer_config(tok, tok.piece, chat_template, "PreTrainedTokenizer")
    cfg.pop("tokenizer_class")
    files = {
      "tokenizer.model": tok.model_proto,
      "tokenizer_config.json": _json_bytes(cfg),
      "special_tokens_map.json": _json_bytes(_specials_map(cfg)),
    }
    return ExportedTokenizer(
      tok,
      files,
      None,
      f"{where}: SentencePiece tokenizers are not written to GGUF by this exporter",
      chat_template,
      tok.bos_id,
      tok.eos_id,
      tok.pad_id,
    )
  text = tok.backend.to_str()
  gguf_fields, refusal = None, ""
  if kind == "gguf":
    gguf_fields = _gguf_source_fields(path)
    chat_template = gguf_fields.get("tokenizer.chat_template", (None,))[0]
  else:
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    chat_template = None
    source_cfg = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(source_cfg):
      with open(source_cfg, encoding="utf-8") as f:
        chat_template = json.load(f).get("chat_template")
  chat_template = chat_template or _default_template(tok)
  if gguf_fields is None:
    try:
      gguf_fields = _gguf_fields_from_json(tok, text, chat_template, where)
    except ConversionError as e:
      refusal = str(e)
  if gguf_fields is not None:
    gguf_fields.update(_special_id_fields(tok))
  cfg = _tokenizer_config(tok, _id_to_token(tok), chat_template, "PreTrainedTokenizerFast")
  files = {
    "tokenizer.json": text.encode(),
    "tokenizer_config.json": _json_bytes(cfg),
    "special_tokens_map.json": _json_bytes(_specials_map(cfg)),
  }
  return ExportedTokenizer(
    tok, files, gguf_fields, refusal, chat_template, tok.bos_id, tok.eos_id, tok.pad_id
  )

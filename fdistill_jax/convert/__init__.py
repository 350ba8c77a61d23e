"""Loading real pretrained teachers from local files: Hugging Face folders and GGUF files.

`load_pretrained(spec)` is the one entry point configs use; `spec` is a
ConfigDict or dict:

  kind: "hf" (a folder with config.json + *.safetensors) or "gguf" (a file);
        "auto" (default) tells them apart by the path.
  path: the folder or file.
  any ModelConfig field (dtype, param_dtype, ...) overrides what the
  checkpoint says.

`export_hf(model, folder, tokenizer=spec)` writes a model (e.g. a distilled
student) back as a Hugging Face folder with its tokenizer files;
`export_gguf(model, path, tokenizer=spec, dtype="q8_0")` as a GGUF file.
`tokenizer_spec(spec)` gives the matching `load_tokenizer` config: the
GGUF's embedded BPE, or the folder's tokenizer.json / spiece.model.
See docs/loading.md.
"""

from __future__ import annotations

import os

from fdistill_jax.convert.gguf import load_gguf, read_gguf_config
from fdistill_jax.convert.gguf_export import export_gguf
from fdistill_jax.convert.hf import hf_model_config, load_hf, read_hf_config
from fdistill_jax.convert.hf_export import export_hf
from fdistill_jax.convert.params import ConversionError
from fdistill_jax.convert.student_init import copy_layers, spread_layers, student_from_teacher

__all__ = [
  "ConversionError",
  "copy_layers",
  "detect_kind",
  "export_gguf",
  "export_hf",
  "load_gguf",
  "load_hf",
  "load_pretrained",
  "pretrained_config",
  "spread_layers",
  "student_from_teacher",
  "tokenizer_spec",
]


def _as_dict(spec) -> dict:
  return spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)


def detect_kind(path: str) -> str:
  """Says "gguf" for a .gguf file, "hf" for a folder with config.json; else raises."""
  path = os.fspath(path)
  if os.path.isfile(path) and path.endswith(".gguf"):
    return "gguf"
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  if os.path.isdir(path):
    found = "a folder without config.json"
  elif os.path.isfile(path):
    found = "a file that is not .gguf"
  else:
    found = "nothing"
  raise ConversionError(
    f"Pretrained path {path!r}: expected a .gguf file or a Hugging Face folder with "
    f"config.json; found {found}."
  )


def load_pretrained(spec, *, mesh=None, rules=None):
  """(model, ModelConfig) from a pretrained-teacher spec (see the module docstring).

  With a `mesh`, parameters are placed sharded by `rules` as they are read.
  """
  values = _as_dict(spec)
  path = values.pop("path", None)
  if not path:
    raise ConversionError(f"Pretrained spec needs a path; got {values}.")
  kind = values.pop("kind", "auto") or "auto"
  if kind == "auto":
    kind = detect_kind(path)
  if kind == "hf":
    return load_hf(path, mesh=mesh, rules=rules, **values)
  if kind == "gguf":
    return load_gguf(path, mesh=mesh, rules=rules, **values)
  raise ConversionError(f"Pretrained spec: kind={kind!r} is not one of 'hf', 'gguf', 'auto'.")


def pretrained_config(spec):
  """The `ModelConfig` that `load_pretrained(spec)` would build, from metadata only.

  Cheap enough for config files: reads config.json or the GGUF header
  (`data.gguf_header`: no tensor data, well under a second for SmolLM2).
  Experiment configs use it to set `teacher.model` and to derive the
  student's architecture from the teacher's.
  """
  values = _as_dict(spec)
  path = values.pop("path", None)
  if not path:
    raise ConversionError(f"Pretrained spec needs a path; got {values}.")
  kind = values.pop("kind", "auto") or "auto"
  if kind == "auto":
    kind = detect_kind(path)
  if kind == "hf":
    where = os.path.join(os.fspath(path), "config.json")
    return hf_model_config(read_hf_config(path), where, **values)
  if kind == "gguf":
    return hf_model_config(read_gguf_config(path), os.fspath(path), **values)
  raise ConversionError(f"Pretrained spec: kind={kind!r} is not one of 'hf', 'gguf', 'auto'.")


def tokenizer_spec(spec, missing_ok: bool = False) -> dict | None:
  """The `load_tokenizer` config that goes with a pretrained spec.

  A folder without tokenizer files raises, or gives None with `missing_ok`.
  """
  values = _as_dict(spec)
  path = os.fspath(values["path"])
  kind = values.get("kind", "auto") or "auto"
  if kind == "auto":
    kind = detect_kind(path)
  if kind == "gguf":
    return {"kind": "gguf", "path": path}
  if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
    return {"kind": "hf", "path": path}
  spiece = os.path.join(path, "spiece.model")
  if os.path.isfile(spiece):
    # T5 checkpoints size the embedding for 100 sentinel ids beyond the model file.
    return {"kind": "sentencepiece", "path": spiece, "extra_ids": 100}
  if os.path.isfile(os.path.join(path, "tokenizer.model")):  # LLaMA-style SentencePiece
    return {"kind": "sentencepiece", "path": os.path.join(path, "tokenizer.model")}
  if missing_ok:
    return None
  raise ConversionError(
    f"No tokenizer.json, vocab.json or spiece.model in {path!r} (nor a tokenizer.model); set "
    "the task's tokenizer explicitly."
  )

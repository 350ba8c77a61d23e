"""`--mode=export`: the model `config.generate` names, as a Hugging Face folder or a GGUF file.

`config.export` (configs/generate.py): `format` "hf" or "gguf", `dtype`
(hf: float32 / bfloat16 / float16; gguf: f32 / f16 / q8_0), `output`, and
`tokenizer` (write the model's tokenizer, with its chat template). The
writers are `convert.export_hf` and `convert.export_gguf`; settings they
cannot honour fail before the model is loaded.
"""

from __future__ import annotations

import os
import time

from fdistill_jax import convert
from fdistill_jax.convert import gguf_export, hf_export
from fdistill_jax.generate import check_template, load_usable_model

FORMATS = {"hf": hf_export.DTYPES, "gguf": gguf_export.DTYPES}


def _check(e):
  if e.format not in FORMATS:
    raise ValueError(f"export.format={e.format!r}: expected one of {sorted(FORMATS)}.")
  if e.dtype and e.dtype not in FORMATS[e.format]:
    raise ValueError(
      f"export.dtype={e.dtype!r}: format {e.format!r} takes one of {FORMATS[e.format]}."
    )


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def run(config, workdir: str):
  """`--mode=export`; returns {"output": path, "format", "dtype", "bytes", "wall_s"}."""
  start = time.time()
  e = config.export
  _check(e)
  check_template(config.generate, config.generate.model != "pretrained")
  if e.tokenizer and config.generate.model != "pretrained":
    spec = config.task.get("tokenizer")
    kind = (spec.get("kind") if spec else None) or None  # "": no tokenizer set
    if kind not in ("gguf", "hf", "sentencepiece"):
      raise ValueError(
        f"export.tokenizer=True, but task.tokenizer is {kind!r}: only gguf, hf and "
        "sentencepiece tokenizers have files to export; set --config.export.tokenizer=False "
        "for weights and configs only."
      )
  usable = load_usable_model(config)
  tokenizer = usable.tokenizer_spec if e.tokenizer else None
  if e.format == "hf":
    output = e.output or os.path.join(workdir, "export-hf")
    convert.export_hf(usable.model, output, dtype=e.dtype or None, tokenizer=tokenizer)
  else:
    dtype = e.dtype or "f32"
    output = e.output or os.path.join(workdir, f"model-{dtype}.gguf")
    convert.export_gguf(usable.model, output, tokenizer=tokenizer, dtype=dtype)
  summary = {
    "output": output,
    "format": e.format,
    "dtype": e.dtype or ("f32" if e.format == "gguf" else usable.model.config.param_dtype),
    "bytes": _size(output),
    "wall_s": time.time() - start,
  }
  return summary

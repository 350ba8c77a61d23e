"""Configs composed from the command line: every task kind with every teacher kind.

Overrides go through ml_collections' `config_flags` exactly as
`python -m fdistill_jax.main --config=... --config.a.b=v` applies them
(own FlagValues, in process). The teachers are a tiny LLaMA exported to a
GGUF file and to a Hugging Face folder with its byte-level BPE tokenizer.
"""

import json
import os

import pytest
from absl import flags
from ml_collections import config_flags

from configs import distill
from configs import teacher_pass as teacher_pass_configs
from fdistill_jax import checkpoints, convert, main
from fdistill_jax import teacher_pass as tp
from fdistill_jax.data import tasks
from fdistill_jax.data.tokenizers import load_tokenizer
from tests import _tiny_chat as chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = [("hello there", "i am fine thanks"), ("what is the capital of france", "paris")]


def parse(config_arg: str, *overrides: str):
  """The config that `--config=CONFIG_ARG OVERRIDES...` gives the command line."""
  argv = ["fdistill_jax.main", f"--config={config_arg}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  """{"gguf": file, "hf": folder} of one tiny chat teacher, and the data files."""
  base = tmp_path_factory.mktemp("teachers")
  spec = chat.write_chat_tokenizer(base / "tok")
  model = chat.tiny_llama(load_tokenizer(spec).vocab_size)
  paths = {
    "gguf": convert.export_gguf(model, str(base / "tiny.gguf"), tokenizer=spec),
    "hf": convert.export_hf(model, str(base / "tiny-hf"), tokenizer=spec),
  }
  (base / "train.jsonl").write_text(
    "".join(json.dumps({"prompt": s, "reply": t}) + "\n" for s, t in PAIRS)
  )
  (base / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS))
  paths["jsonl"], paths["tsv"] = str(base / "train.jsonl"), str(base / "train.tsv")
  paths["tokenizer"] = spec
  return paths


def _task_overrides(kind: str, path: str) -> list[str]:
  args = [f"--config.task.kind={kind}", f"--config.task.files.train={path}"]
  if kind == "jsonl":
    args += ["--config.task.source_key=prompt", "--config.task.target_key=reply"]
  return args


@pytest.mark.parametrize("kind", ["jsonl", "tsv"])
@pytest.mark.parametrize("teacher", ["gguf", "hf"])
def test_own_files_compose_with_pretrained_teachers(teachers, teacher, kind):
  # The GGUF config starts from the chitchat task, the HF one from jsonl: the
  # shape of config.task is the same, so either turns into the other kind.
  config = parse(
    f"{ROOT}/configs/teacher_{teacher}.py:{teachers[teacher]}",
    *_task_overrides(kind, teachers[kind]),
  )
  task = tasks.get_task(config.task)
  assert task.splits == ("train",)
  examples = list(task.examples("train"))
  sources = [task.unwrap_source(e["source_text"]) for e in examples]
  assert sources == [s for s, _ in PAIRS]
  assert [e["target_text"] for e in examples] == [t for _, t in PAIRS]
  # The teacher's own tokenizer, whichever file it came from.
  tok = load_tokenizer(teachers["tokenizer"])
  assert list(examples[1]["targets"]) == tok.encode("paris") + [chat.EOS]
  if teacher == "gguf":  # the experiment's chat template is kept under the new kind
    assert examples[0]["source_text"].startswith("<|im_start|>user\n")


def test_checkpoint_teacher_config_takes_any_task_and_tokenizer(teachers):
  config = parse(
    f"{ROOT}/configs/distill.py:kl",
    *_task_overrides("tsv", teachers["tsv"]),
    "--config.task.tokenizer.kind=word",
    "--config.teacher.checkpoint=/somewhere/teacher",
  )
  task = tasks.get_task(config.task)
  assert [e["target_text"] for e in task.examples("train")] == [t for _, t in PAIRS]
  assert task.tokenizer.decode(task.tokenizer.encode("hello there")) == "hello there"


def test_every_preset_has_one_shape():
  from configs import tasks as task_configs

  shapes = {
    name: sorted(task_configs.task_config(name).to_dict(), key=str)
    for name in task_configs._PRESETS
  }
  assert len({tuple(s) for s in shapes.values()}) == 1, shapes
  with pytest.raises(ValueError, match=r"unknown fields \['filez'\]"):
    task_configs.task_config("jsonl", filez={})


def test_switching_the_teacher_pass_sampler_drops_the_old_methods_parameters():
  config = parse(
    f"{ROOT}/configs/teacher_pass.py",
    "--config.teacher_pass.sampler=sample",
    "--config.teacher_pass.sampler_params.sample.top_p=0.9",
  )
  pc = tp.PassConfig.from_config(config.teacher_pass)
  assert pc.sampler == "sample" and pc.sampler_params == (("top_p", 0.9),)
  # The default: beam search with its 4 beams; length_penalty 1 is the neutral value.
  pc = tp.PassConfig.from_config(parse(f"{ROOT}/configs/teacher_pass.py").teacher_pass)
  assert (pc.sampler, pc.sampler_params) == ("beam_search", (("num_beams", 4),))
  pc = tp.PassConfig.from_config(
    parse(
      f"{ROOT}/configs/teacher_pass.py",
      "--config.teacher_pass.sampler=beam_sample",
      "--config.teacher_pass.sampler_params.beam_sample.top_k=30",
    ).teacher_pass
  )
  assert pc.sampler_params == (("num_beams", 4), ("top_k", 30))


def test_flat_sampler_params_are_refused_with_the_block_form_named():
  c = teacher_pass_configs.teacher_pass_config()
  c.sampler_params = {"num_beams": 4}
  with pytest.raises(ValueError, match=r"sampler_params\.beam_search\.PARAM.*\['num_beams'\]"):
    tp.PassConfig.from_config(c)


@pytest.fixture
def no_model_loads(monkeypatch):
  """Every model loader of the library fails the test if called."""

  def refuse(*args, **kwargs):
    raise AssertionError("a model was loaded before the config error was raised")

  monkeypatch.setattr(checkpoints, "load_model", refuse)
  monkeypatch.setattr(convert, "load_pretrained", refuse)


def _run_main(config, mode, workdir):
  values = {
    "config": type("F", (), {"value": config}),
    "workdir": type("F", (), {"value": str(workdir)}),
    "mode": type("F", (), {"value": mode}),
    "verbose": type("F", (), {"value": False}),
  }
  main.main(["fdistill_jax.main"], values)


@pytest.mark.parametrize("mode", ["teacher_pass", "pipeline"])
def test_sampler_errors_come_before_any_model_loads(tmp_path, no_model_loads, mode):
  config = f"{ROOT}/configs/{'teacher_pass' if mode == 'teacher_pass' else 'default'}.py"
  bad = parse(config, "--config.teacher_pass.sampler=sample").unlock()
  bad.teacher_pass.sampler_params.sample.num_beams = 4  # a parameter sample does not take
  with pytest.raises(ValueError, match=r"'sample' takes .*found \['num_beams'\]"):
    _run_main(bad, mode, tmp_path)
  bad = parse(config, "--config.teacher_pass.sampler=nucleus")
  with pytest.raises(ValueError, match=r"unknown decoding method 'nucleus'"):
    _run_main(bad, mode, tmp_path)
  assert not os.path.exists(tmp_path / "teacher")  # the pipeline trained nothing


@pytest.mark.parametrize("mode", ["teacher_pass", "distill", "train_teacher", "pipeline"])
def test_task_errors_come_before_any_model_loads(tmp_path, no_model_loads, mode):
  config = {
    "teacher_pass": "teacher_pass.py",
    "distill": "distill.py:kl",
    "train_teacher": "train_teacher.py",
    "pipeline": "default.py",
  }[mode]
  missing = str(tmp_path / "nothing.jsonl")
  bad = parse(f"{ROOT}/configs/{config}", *_task_overrides("jsonl", missing))
  with pytest.raises(FileNotFoundError, match=r"split 'train' expected a file at .*nothing"):
    _run_main(bad, mode, tmp_path)
  bad = parse(f"{ROOT}/configs/{config}", "--config.task.kind=jsonl")
  with pytest.raises(ValueError, match=r"needs task.files"):
    _run_main(bad, mode, tmp_path)


def test_library_teacher_pass_checks_its_sampler_before_loading(tmp_path, no_model_loads):
  config = distill.get_config("kl")
  config.teacher_pass.sampler = "greedy"
  config.teacher_pass.sampler_params.greedy = {"temperature": 0.5}
  with pytest.raises(ValueError, match=r"'greedy' takes \[\], found \['temperature'\]"):
    tp.run(config, str(tmp_path))

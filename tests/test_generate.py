"""`--mode=generate` and `--mode=export` end to end, on tiny models.

References: a greedy continuation computed here by re-running the full
forward pass at every step (no KV cache, no sampler), and `models.score` of
the generated tokens for their log-probs.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import generate as generate_configs
from fdistill_jax import checkpoints, export, generate, models
from fdistill_jax.convert import ConversionError, export_gguf, load_hf
from fdistill_jax.data import tasks
from fdistill_jax.data.tokenizers import load_tokenizer
from tests import _tiny_chat as chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["hello there", "what is the capital of france", "i like music", "do you"]


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
  """(path of a tiny chat GGUF, the model written into it)."""
  folder = tmp_path_factory.mktemp("gguf")
  spec = chat.write_chat_tokenizer(folder / "tok")
  model = chat.tiny_llama(load_tokenizer(spec).vocab_size, seed=1)
  return export_gguf(model, folder / "tiny.gguf", tokenizer=spec), model


def _config(model_arg, **generate):
  config = generate_configs.get_config(model_arg)
  for key, value in generate.items():
    config.generate[key] = value
  return config


def _prompts_file(tmp_path, prompts=PROMPTS, jsonl=False):
  path = tmp_path / ("p.jsonl" if jsonl else "p.txt")
  with open(path, "w") as f:
    for p in prompts:
      f.write((json.dumps({"text": p}) if jsonl else p) + "\n")
  return str(path)


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _naive_greedy(model, prompt_ids, steps, eos_id):
  """Greedy decoding by a full forward pass per step (the sampler's independent reference).

  Targets are padded to `steps`: logits[:, t] depends on targets[:, :t] only
  (causal), so one compiled shape serves every step.
  """
  inputs = np.asarray([prompt_ids], np.int32)
  mask = np.ones_like(inputs, np.float32)
  graphdef, state = nnx.split(model)
  forward = jax.jit(
    lambda state, targets: (
      models.forward(
        nnx.merge(graphdef, state), inputs, mask, targets, np.ones(targets.shape, np.float32)
      ).logits
    )
  )
  out = []
  for t in range(steps):
    targets = np.zeros((1, steps), np.int32)
    targets[0, :t] = out
    out.append(int(np.argmax(np.asarray(forward(state, targets))[0, t])))
    if out[-1] == eos_id:
      break
  return out


def _score(model, prompt_ids, tokens):
  inputs = np.asarray([prompt_ids], np.int32)
  targets = np.asarray([tokens], np.int32)
  logp = jax.jit(models.score)(  # one program per shape, not one per operation and shape
    model, inputs, np.ones_like(inputs, np.float32), targets, np.ones_like(targets, np.float32)
  )
  return float(np.asarray(logp).sum())


def test_greedy_from_a_gguf_matches_step_by_step_decoding(tmp_path, gguf_model):
  path, model = gguf_model
  config = _config(path, prompts=_prompts_file(tmp_path), method="greedy", max_len=4, batch_size=3)
  summary = generate.run(config, str(tmp_path / "out"))
  rows = _rows(tmp_path / "out" / "generations.jsonl")
  assert [r["prompt"] for r in rows] == PROMPTS and summary["completions"] == 4
  tok = load_tokenizer({"kind": "gguf", "path": path})
  for r in rows:
    # The tokenizer has ChatML markers: the chat template wraps the prompt.
    assert r["input"] == generate.CHATML_USER.format(source=r["prompt"])
    ids = tok.encode(r["input"])
    if r["index"] < 2:  # the reference compiles once per prompt length
      assert r["tokens"] == _naive_greedy(model, ids, 4, chat.EOS)
    assert r["length"] == len(r["tokens"]) and r["eos"] == (r["tokens"][-1] == chat.EOS)
    assert r["completion"] == tok.decode(r["tokens"])
    np.testing.assert_allclose(r["logprob"], _score(model, ids, r["tokens"]), rtol=1e-5, atol=1e-4)
  assert summary["mean_length"] == np.mean([r["length"] for r in rows])


def test_samples_do_not_depend_on_the_batch_size(tmp_path, gguf_model):
  path, model = gguf_model
  prompts = _prompts_file(tmp_path, jsonl=True)
  runs = []
  for b in (1, 3):
    config = _config(
      path,
      prompts=prompts,
      prompt_key="text",
      top_p=0.9,
      temperature=0.8,
      num_samples=2,
      max_len=5,
      batch_size=b,
      system_prompt="be brief",
      output=str(tmp_path / f"b{b}.jsonl"),
    )
    generate.run(config, str(tmp_path))
    runs.append(_rows(tmp_path / f"b{b}.jsonl"))
  assert len(runs[0]) == len(runs[1]) == 8
  for a, b in zip(*runs, strict=True):
    # Batch shapes differ, so only the log-prob's last float bits may.
    np.testing.assert_allclose(a.pop("logprob"), b.pop("logprob"), rtol=1e-5)
    assert a == b
  assert runs[0][0]["input"].startswith("<|im_start|>system\nbe brief<|im_end|>\n")
  assert len({tuple(r["tokens"]) for r in runs[0]}) > 1  # really sampled


def test_errors_come_before_the_model_loads(tmp_path, gguf_model):
  absent = str(tmp_path / "absent.gguf")
  with pytest.raises(ConversionError, match="absent.gguf.*found nothing"):
    generate_configs.get_config(absent)
  with pytest.raises(ValueError, match="needs the experiment that made it"):
    generate_configs.get_config(str(tmp_path))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
  config = _config(gguf_model[0], prompts=str(bad), method="greedy", top_p=0.9)
  # The model path is never read: a sampler or prompts error comes first.
  config.generate.pretrained.path = absent
  with pytest.raises(ValueError, match=r"generate.*greedy.*top_p"):
    generate.run(config, str(tmp_path))
  config.generate.top_p = None
  config.generate.template = "<|im_start|>user\n"
  with pytest.raises(ValueError, match=r"generate.template=.*a template containing \{source\}"):
    generate.run(config, str(tmp_path))
  config.generate.template = "auto"
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected an object with a string field"):
    generate.run(config, str(tmp_path))
  experiment = _config("default", system_prompt="be kind", prompts=_prompts_file(tmp_path))
  with pytest.raises(ValueError, match="set task.system_prompt"):
    generate.run(experiment, str(tmp_path))
  # An experiment whose teacher has no weights is refused, not sampled at random.
  teacher = _config("default", model="teacher", prompts=_prompts_file(tmp_path))
  with pytest.raises(ValueError, match="names no teacher weights"):
    generate.run(teacher, str(tmp_path))
  config.export.format = "gguf"
  config.export.dtype = "bfloat16"
  with pytest.raises(ValueError, match=r"export.dtype='bfloat16'.*\('f32', 'f16', 'q8_0'\)"):
    export.run(config, str(tmp_path))


def test_main_reads_prompts_from_stdin(tmp_path, gguf_model):
  path, _ = gguf_model
  out = tmp_path / "gen.jsonl"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "fdistill_jax.main",
      "--mode=generate",
      f"--config={ROOT}/configs/generate.py:{path}",
      f"--workdir={tmp_path}",
      "--config.generate.method=beam_search",
      "--config.generate.num_beams=2",
      "--config.generate.max_len=4",
      f"--config.generate.output={out}",
    ],
    input="hello there\n\ndo you\n",
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"  wrote generations: {out}\n  final: prompts=2, completions=2," in proc.stdout
  assert [r["prompt"] for r in _rows(out)] == ["hello there", "do you"]


@pytest.fixture(scope="module")
def trained_student(tmp_path_factory):
  """(checkpoints folder, student model) for the default experiment's student architecture."""
  config = generate_configs.get_config("default")
  student = models.build_model(config.student.model, rngs=7)
  folder = str(tmp_path_factory.mktemp("run") / "checkpoints")
  saver = checkpoints.Checkpointer(folder, async_save=False)
  saver.save(5, {"params": nnx.to_pure_dict(nnx.state(student, nnx.Param)), "step": 5})
  saver.close()
  return folder, student


def test_student_checkpoint_of_an_experiment(tmp_path, trained_student):
  folder, student = trained_student
  config = _config("default", checkpoint=folder, method="sample", max_len=6, num_samples=2)
  config.generate.prompts = _prompts_file(tmp_path, ["alpha beta", "gamma"])
  generate.run(config, str(tmp_path))
  rows = _rows(tmp_path / "generations.jsonl")
  assert len(rows) == 4
  task = tasks.get_task(config.task)
  for r in rows:
    # The experiment's task wraps and ends the source (T5: EOS after it).
    assert r["input"] == task.wrap_source(r["prompt"])
    ids = task.tokenizer.encode(r["input"]) + [task.tokenizer.eos_id]
    np.testing.assert_allclose(
      r["logprob"], _score(student, ids, r["tokens"]), rtol=1e-5, atol=1e-4
    )


def test_export_mode_writes_both_formats(tmp_path, trained_student, gguf_model):
  folder, student = trained_student
  config = _config("default", checkpoint=folder)
  with pytest.raises(ValueError, match="task.tokenizer is None.*export.tokenizer=False"):
    export.run(config, str(tmp_path))
  config.export.tokenizer = False
  summary = export.run(config, str(tmp_path))
  assert summary["output"] == str(tmp_path / "export-hf") and summary["bytes"] > 0
  back, _ = load_hf(summary["output"])
  inputs = np.asarray([[5, 6, 7, 1]], np.int32)
  targets = np.asarray([[8, 9, 1]], np.int32)
  ones = lambda a: np.ones_like(a, np.float32)  # noqa: E731
  forward = jax.jit(models.forward)  # one program for both (one architecture)
  np.testing.assert_array_equal(
    np.asarray(forward(back, inputs, ones(inputs), targets, ones(targets)).logits),
    np.asarray(forward(student, inputs, ones(inputs), targets, ones(targets)).logits),
  )
  # A GGUF re-exported as q8_0 with its tokenizer, through the command line.
  path, _ = gguf_model
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "fdistill_jax.main",
      "--mode=export",
      f"--config={ROOT}/configs/generate.py:{path}",
      f"--workdir={tmp_path}",
      "--config.export.format=gguf",
      "--config.export.dtype=q8_0",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "model-q8_0.gguf"
  assert f"  wrote export (gguf, q8_0): {out}\n" in proc.stdout
  tok, source = (
    load_tokenizer({"kind": "gguf", "path": str(out)}),
    load_tokenizer({"kind": "gguf", "path": path}),
  )
  assert tok.encode(chat.CHAT_TEXTS[0]) == source.encode(chat.CHAT_TEXTS[0])


def test_interactive_session_appends_each_reply(tmp_path, gguf_model, monkeypatch, capsys):
  path, _ = gguf_model
  typed = iter(["hello there", "", "do you"])

  def fake_input(prompt):
    assert prompt == "> "
    try:
      return next(typed)
    except StopIteration:
      raise EOFError from None

  monkeypatch.setattr("builtins.input", fake_input)
  monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
  out = tmp_path / "chat.jsonl"
  summary = generate.run(
    _config(path, method="greedy", max_len=3, batch_size=1, output=str(out)), str(tmp_path)
  )
  rows = _rows(out)
  assert [r["prompt"] for r in rows] == ["hello there", "do you"] and summary["prompts"] == 2
  printed = capsys.readouterr().out
  assert all(r["completion"] in printed for r in rows)

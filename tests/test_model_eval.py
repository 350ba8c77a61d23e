"""`--mode=evaluate` on models, end to end on tiny models, and its reply metrics.

References: NLLs from an unjitted, unbatched forward pass per reply with a
float64 numpy log-softmax; repetition rates counted by hand; ROUGE and BLEU
from rouge-score and sacrebleu directly; EOS rate and lengths from the
reply tokens.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import sacrebleu
from flax import nnx
from rouge_score import rouge_scorer

from configs import generate as generate_configs
from fdistill_jax import (
  checkpoints,
  evaluate,
  generate,
  metrics,
  model_eval,
  models,
  records,
  teacher_pass,
)
from fdistill_jax.convert import export_gguf
from fdistill_jax.data import tasks
from fdistill_jax.data.tokenizers import load_tokenizer
from tests import _tiny_chat as chat

PROMPTS = ["hello there", "what is the capital of france", "i like music"]
REFERENCES = ["hi how are you", "paris", "i like films"]


def test_repetition_rate_by_hand():
  assert metrics.repetition_rate(["a a a"], 1) == pytest.approx(200 / 3)  # 2 of 3 repeat
  assert metrics.repetition_rate(["a b a b"], 2) == pytest.approx(100 / 3)  # ab ba ab
  assert metrics.repetition_rate(["I like it I like it"], 2) == pytest.approx(40.0)  # docs/using.md
  assert metrics.repetition_rate(["a b c", "x x"], 1) == pytest.approx(25.0)  # (0 + 1/2) / 2
  # A reply with no n-gram is not counted; none at all gives nan.
  assert metrics.repetition_rate(["a", "b c"], 2) == 0.0
  assert math.isnan(metrics.repetition_rate(["a", ""], 2))
  assert metrics.repetition_rate([[7, 7, 7, 7]], 2) == pytest.approx(200 / 3)


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _nll_reference(model, prompt_ids, tokens):
  """-sum log p(tokens | prompt), from one unpadded forward pass and a float64 log-softmax."""
  inputs = np.asarray([prompt_ids], np.int32)
  targets = np.asarray([tokens], np.int32)
  ones = lambda a: np.ones(a.shape, np.float32)  # noqa: E731
  logits = models.forward(model, inputs, ones(inputs), targets, ones(targets)).logits
  logp = _log_softmax64(logits)[0]
  return -float(logp[np.arange(len(tokens)), tokens].sum())


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
  """(student GGUF path, student, teacher GGUF path, teacher): one tokenizer, two random models."""
  folder = tmp_path_factory.mktemp("models")
  spec = chat.write_chat_tokenizer(folder / "tok")
  vocab = load_tokenizer(spec).vocab_size
  student, teacher = chat.tiny_llama(vocab, seed=1), chat.tiny_llama(vocab, seed=2)
  s_path = export_gguf(student, folder / "student.gguf", tokenizer=spec)
  t_path = export_gguf(teacher, folder / "teacher.gguf", tokenizer=spec)
  return s_path, student, t_path, teacher


def _prompts_file(path, prompts=PROMPTS, references=REFERENCES):
  with open(path, "w") as f:
    for p, r in zip(prompts, references, strict=True):
      f.write(json.dumps({"prompt": p, "reference": r}) + "\n")
  return str(path)


def _config(model_arg, evaluate_fields=(), **generate):
  config = generate_configs.get_config(model_arg)
  for key, value in generate.items():
    config.generate[key] = value
  for key, value in dict(evaluate_fields).items():
    config.evaluate[key] = value
  return config


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_evaluate_a_gguf_student_against_a_gguf_teacher(tmp_path, chat_models, monkeypatch):
  s_path, student, t_path, teacher = chat_models
  prompts = _prompts_file(tmp_path / "p.jsonl")
  # max_input_len 12: longer prompts are cut to their last 12 tokens.
  sampling = dict(
    method="sample", top_p=0.9, num_samples=2, max_len=5, batch_size=4, max_input_len=12
  )
  config = _config(s_path, {"teacher": t_path}, prompts=prompts, **sampling)
  result = evaluate.run(config, str(tmp_path / "a"))

  saved = json.loads((tmp_path / "a" / "metrics_prompts.json").read_text())
  assert set(saved) == set(result) and saved["teacher_nll_token"] == result["teacher_nll_token"]
  rows = _rows(tmp_path / "a" / "examples_prompts.jsonl")
  teacher_rows = _rows(tmp_path / "a" / "teacher_samples_prompts.jsonl")
  assert len(rows) == len(teacher_rows) == 6 == result["num_replies"]
  tok = load_tokenizer({"kind": "gguf", "path": s_path})
  full = {p: tok.encode(generate.CHATML_USER.format(source=p)) for p in PROMPTS}
  ids = {p: full[p][-12:] for p in PROMPTS}
  assert result["num_cut_prompts"] == sum(len(f) > 12 for f in full.values()) > 0

  # Lengths and EOS from the tokens themselves: EOS only last, before the cap.
  for r in rows:
    assert chat.EOS not in r["tokens"][:-1] and len(r["tokens"]) <= 5
  ended = [r["tokens"][-1] == chat.EOS for r in rows]
  assert result["eos_rate"] == pytest.approx(100 * np.mean(ended))
  assert result["mean_length"] == pytest.approx(np.mean([len(r["tokens"]) for r in rows]))

  # Teacher NLL of the student's replies, and student NLL of the teacher's.
  t_nll = [_nll_reference(teacher, ids[r["prompt"]], r["tokens"]) for r in rows]
  s_nll = [_nll_reference(student, ids[r["prompt"]], r["tokens"]) for r in teacher_rows]

  def per_token(nll, rs):
    return np.mean([n / len(r["tokens"]) for n, r in zip(nll, rs, strict=True)])

  assert result["teacher_nll_token"] == pytest.approx(per_token(t_nll, rows), rel=1e-5)
  assert result["teacher_nll_seq"] == pytest.approx(np.mean(t_nll), rel=1e-5)
  assert result["student_nll_teacher_token"] == pytest.approx(per_token(s_nll, teacher_rows), 1e-5)
  assert result["student_nll_teacher_seq"] == pytest.approx(np.mean(s_nll), rel=1e-5)
  for r, n in zip(rows, t_nll, strict=True):
    assert r["teacher_nll"] == pytest.approx(n / len(r["tokens"]), rel=1e-5)
  # The teacher's replies are the teacher's samples: their log-prob is the teacher's.
  for r in teacher_rows[:2]:
    assert r["logprob"] == pytest.approx(-_nll_reference(teacher, ids[r["prompt"]], r["tokens"]))

  # Reference metrics on each prompt's first reply, diversity over all replies.
  first = [next(r["completion"] for r in rows if r["index"] == i) for i in range(3)]
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  rouge_l = np.mean(
    [scorer.score(ref, h)["rougeL"].fmeasure for ref, h in zip(REFERENCES, first, strict=True)]
  )
  assert result["rougeL"] == pytest.approx(100 * rouge_l)
  assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(first, [REFERENCES]).score)
  texts = [r["completion"] for r in rows]
  assert result["distinct2"] == pytest.approx(metrics.distinct_n(texts, 2))
  assert result["repetition2"] == pytest.approx(metrics.repetition_rate(texts, 2), nan_ok=True)
  # Token repetition by hand: per reply, 1 - unique / all 2-grams of its ids, EOS left out.
  per_reply = []
  for r in rows:
    toks = r["tokens"][:-1] if r["eos"] else r["tokens"]
    grams = list(zip(toks[:-1], toks[1:], strict=True))
    if grams:
      per_reply.append(1 - len(set(grams)) / len(grams))
  assert result["token_repetition2"] == pytest.approx(100 * np.mean(per_reply), nan_ok=True)
  assert [r["references"] for r in rows] == [[REFERENCES[r["index"]]] for r in rows]

  # The teacher's replies, given back, score a student without sampling the teacher;
  # the student as its own teacher is loaded once.
  loads = []
  real_load = model_eval.load_usable_model
  monkeypatch.setattr(model_eval, "load_usable_model", lambda c: loads.append(1) or real_load(c))
  again = _config(
    s_path,
    {
      "teacher": s_path,
      "teacher_samples": str(tmp_path / "a" / "teacher_samples_prompts.jsonl"),
      "output_dir": str(tmp_path / "b"),
    },
    prompts=prompts,
    **sampling,
  )
  second = evaluate.run(again, str(tmp_path / "unused"))
  assert loads == [1]
  assert second["student_nll_teacher_token"] == pytest.approx(result["student_nll_teacher_token"])
  rows_b = _rows(tmp_path / "b" / "examples_prompts.jsonl")
  own = [_nll_reference(student, ids[r["prompt"]], r["tokens"]) for r in rows_b]
  assert second["teacher_nll_token"] == pytest.approx(per_token(own, rows_b), rel=1e-5)
  # Teacher replies for other prompts are refused, naming the file and line.
  bad = tmp_path / "bad.jsonl"
  bad.write_text("".join(json.dumps({**r, "prompt": "x"}) + "\n" for r in teacher_rows))
  again.evaluate.teacher_samples = str(bad)
  with pytest.raises(ValueError, match=r"bad\.jsonl:1: prompt 0 is 'x'"):
    evaluate.run(again, str(tmp_path / "c"))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  """(config of the default experiment, student, teacher, checkpoints of each, record folder).

  The record folder is a teacher pass over the first 3 validation examples.
  """
  config = generate_configs.get_config("default")
  root = tmp_path_factory.mktemp("run")
  saved = {}
  for name, seed in (("student", 7), ("teacher", 8)):
    model = models.build_model(config[name].model, rngs=seed)
    folder = str(root / name)
    saver = checkpoints.Checkpointer(folder, async_save=False)
    saver.save(1, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)), "step": 1})
    saver.close()
    saved[name] = (model, folder)
  pc = teacher_pass.PassConfig(
    num_samples=2,
    sampler="sample",
    top_k=4,
    records_per_shard=2,
    batch_size=8,
    max_input_len=32,
    max_target_len=8,
    split="validation",
    max_examples=3,
  )
  task = tasks.get_task(config.task)
  records_dir = str(root / "records")
  teacher_pass.teacher_pass(saved["teacher"][0], task, records_dir, pc, progress=False)
  return config, saved, records_dir


def _read_records(directory):
  """{example_index: [teacher token lists]}, read with TensorFlow and the schema's decoder."""
  import tensorflow as tf

  manifest = records.read_manifest(directory)
  spec = records.spec_from_manifest(manifest)
  out = {}
  for shard in manifest["shards"]:
    for raw in tf.data.TFRecordDataset(f"{directory}/{shard['file']}"):
      r = records.decode_example(spec, raw.numpy())
      out[int(r["example_index"])] = [
        r["teacher_tokens"][j, :n].tolist() for j, n in enumerate(r["teacher_lengths"])
      ]
  return out


def _greedy_on_validation(t_folder, records_dir, **generate):
  """Greedy replies (8 tokens) to 3 validation prompts, scored by the experiment's teacher."""
  return _config(
    "default",
    {
      "split": "validation",
      "max_examples": 3,
      "teacher": "experiment",
      "teacher_checkpoint": t_folder,
      "teacher_samples": records_dir,
    },
    method="greedy",
    max_len=8,
    **generate,
  )


def test_evaluate_an_experiment_checkpoint_on_its_task_split(tmp_path, experiment):
  config, saved, records_dir = experiment
  (student, s_folder), (teacher, t_folder) = saved["student"], saved["teacher"]
  config = _greedy_on_validation(t_folder, records_dir, checkpoint=s_folder)
  result = evaluate.run(config, str(tmp_path))
  assert result["num_prompts"] == result["num_replies"] == 3
  task = tasks.get_task(config.task)
  examples = list(task.examples("validation"))[:3]
  rows = _rows(tmp_path / "examples_validation.jsonl")
  teacher_rows = _rows(tmp_path / "teacher_samples_validation.jsonl")
  # The teacher replies are the record folder's, sample by sample.
  stored = _read_records(records_dir)
  assert [r["tokens"] for r in teacher_rows] == [t for i in range(3) for t in stored[i]]

  ids = [e["inputs"].tolist() for e in examples]
  t_nll = [_nll_reference(teacher, ids[r["index"]], r["tokens"]) / len(r["tokens"]) for r in rows]
  s_nll = [
    _nll_reference(student, ids[r["index"]], r["tokens"]) / len(r["tokens"]) for r in teacher_rows
  ]
  assert result["teacher_nll_token"] == pytest.approx(np.mean(t_nll), rel=1e-5)
  assert result["student_nll_teacher_token"] == pytest.approx(np.mean(s_nll), rel=1e-5)
  # The task's references, and its true modes (the synthetic task).
  hyps = [r["completion"] for r in rows]
  refs = [[e["target_text"] for e in examples]]
  assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, refs).score)
  valid = [h in task.modes(e["source_text"]) for h, e in zip(hyps, examples, strict=True)]
  assert result["precision"] == pytest.approx(100 * np.mean(valid))
  assert [r["prompt"] for r in rows] == [task.unwrap_source(e["source_text"]) for e in examples]


def test_errors_come_before_any_model_loads(tmp_path, chat_models, monkeypatch):
  def no_loading(config):
    raise AssertionError("a model was loaded before the error")

  monkeypatch.setattr(model_eval, "load_usable_model", no_loading)
  s_path = chat_models[0]
  prompts = _prompts_file(tmp_path / "p.jsonl")
  cases = [
    (dict(prompts=prompts, method="greedy", top_p=0.9), {}, r"generate.*greedy.*top_p"),
    ({}, {}, "pretrained model needs prompts"),
    (dict(prompts=prompts), {"teacher": str(tmp_path / "none.gguf")}, "none.gguf.*found none"),
    (dict(prompts=prompts), {"teacher_checkpoint": "x"}, "needs evaluate.teacher='experiment'"),
    (dict(prompts=prompts), {"teacher": "experiment"}, "has no experiment"),
    (dict(prompts=prompts), {"max_examples": -1}, r"evaluate.max_examples: expected an int >= 0"),
    (dict(prompts=prompts), {"repetition_n": (2, 0)}, r"repetition_n: expected a tuple of ints"),
  ]
  for generate_fields, evaluate_fields, message in cases:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      evaluate.run(_config(s_path, evaluate_fields, **generate_fields), str(tmp_path))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "c", "reference": 3}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected field 'reference'"):
    evaluate.run(_config(s_path, prompts=str(bad)), str(tmp_path))
  with pytest.raises(ValueError, match=r"evaluate.split='dev'.*has the splits"):
    evaluate.run(_config("default", {"split": "dev"}), str(tmp_path))


def test_chat_template_is_found_when_pad_is_eos(tmp_path):
  # SmolLM2's GGUF pads with <|im_end|>, its EOS: the prompt must still be ChatML.
  spec = chat.write_chat_tokenizer(tmp_path / "tok")
  tok = load_tokenizer({**spec, "pad_id": chat.EOS})
  assert tok.pad_id == tok.eos_id == chat.EOS
  assert generate._has_chatml(tok)


def test_cutting_generator_cuts_like_training(chat_models):
  student = chat_models[1]
  tok = load_tokenizer({"kind": "gguf", "path": chat_models[0]})
  text = "what is the capital of france"
  usable = generate.UsableModel(student, tok, None, generate.CHATML_USER, False, False, "x")
  sampler = generate.make_sampler(generate_configs.generate_section("pretrained", None))
  full, short = usable.prompt_ids(text), usable.prompt_ids("hi")
  n = len(short)
  assert len(full) > n
  cut = model_eval.CuttingGenerator(usable, sampler, batch_size=1, max_input_len=n, seed=0)
  # A chat prompt keeps its end (the assistant marker decoding starts from).
  assert cut.encode([text, "hi"], 0) == [full[-n:], short]
  with_eos = dataclasses.replace(usable, input_eos=True)
  cut = model_eval.CuttingGenerator(with_eos, sampler, batch_size=1, max_input_len=n, seed=0)
  # An encoder source keeps its start and EOS.
  assert cut.encode([text], 0) == [full[: n - 1] + [chat.EOS]]


def test_the_teacher_against_itself_loads_once(tmp_path, experiment, monkeypatch):
  _, saved, records_dir = experiment
  t_folder = saved["teacher"][1]
  loads = []
  real_load = model_eval.load_usable_model
  monkeypatch.setattr(model_eval, "load_usable_model", lambda c: loads.append(1) or real_load(c))
  config = _greedy_on_validation(t_folder, records_dir, model="teacher", checkpoint=t_folder)
  result = evaluate.run(config, str(tmp_path))
  assert len(loads) == 1
  # Greedy log-probs are the model's own: the teacher's NLL of its replies is minus them.
  rows = _rows(tmp_path / "examples_validation.jsonl")
  own = np.mean([-r["logprob"] / r["length"] for r in rows])
  assert result["teacher_nll_token"] == pytest.approx(own, rel=1e-5)


def test_a_predictions_file_is_still_scored_without_a_model(tmp_path, monkeypatch):
  monkeypatch.setattr(model_eval, "load_usable_model", lambda c: pytest.fail("a model loaded"))
  config = _config("default", {"split": "validation"})
  task = tasks.get_task(config.task)
  path = tmp_path / "preds.jsonl"
  path.write_text(
    "".join(json.dumps({"output": e["target_text"]}) + "\n" for e in task.examples("validation"))
  )
  config.evaluate.predictions = str(path)
  result = evaluate.run(config, str(tmp_path))
  assert result["bleu"] == pytest.approx(100.0) and result["precision"] == pytest.approx(100.0)
  assert json.loads((tmp_path / "metrics_validation.json").read_text())["bleu"] == result["bleu"]


def test_jsonl_rows_write_undefined_rates_as_null(tmp_path):
  # A one-word reply has no 2-gram: its repetition2 is NaN, which strict JSON
  # readers (jq, JavaScript) reject; the row must carry null instead.
  path = str(tmp_path / "rows.jsonl")
  rate = metrics.repetition_rate(["hi"], 2)
  model_eval._write_jsonl(path, [{"completion": "hi", "repetition2": rate, "nll": 1.5}])
  text = open(path, encoding="utf-8").read()
  assert "NaN" not in text
  row = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  assert row == {"completion": "hi", "repetition2": None, "nll": 1.5}

"""`--mode=evaluate` on a model: sample replies to a task split or a prompts file, score them.

The model is whatever `--mode=generate` loads (`config.generate`: a GGUF
file, a Hugging Face folder, or an experiment's student / teacher from a
checkpoint), sampled with the generate sampler. `config.evaluate`
(configs/generate.py) chooses the prompts, the teacher and the outputs.

Prompts: `generate.prompts` (a text or .jsonl file; a .jsonl row may carry
its reference reply(s) under `evaluate.reference_key`), else the split
`evaluate.split` of the experiment's task, whose references are the task's.
The first `evaluate.max_examples` only, when set. Prompts longer than
`generate.max_input_len` are cut as in training (`CuttingGenerator`) and
counted (`num_cut_prompts`).

Metrics (`metrics.py` for the scales; every reply = every sample of every
prompt):

  always        mean_length (tokens, EOS counted), eos_rate (% of replies
                that end in EOS within `generate.max_len` tokens),
                distinct1/2 (% corpus-level unique word n-grams),
                repetition<n> for n in `evaluate.repetition_n` (% of a
                reply's word n-grams that repeat an earlier one of the same
                reply, averaged over replies with an n-gram: seq-rep-n)
                and token_repetition<n> (the same over the reply's token
                ids, EOS left out: it sees sub-word garbage that repeats
                no word)
  references    bleu, bleu1/2, chrf, ter (sacrebleu) and rouge1/2/L of each
                prompt's first reply
  synthetic     precision (% of replies that are valid outputs)
  teacher       teacher_nll_token / _seq: the teacher's NLL of the student's
                replies, per token and per reply (the likelihood risk);
                student_nll_teacher_token / _seq: the student's NLL of the
                teacher's replies (the coverage risk). A low teacher NLL
                alone rewards short, repetitive replies: read it with the
                repetition rate, EOS rate and the coverage risk.

Both models see the same prompt tokens (the student's template; the
tokenizers must be the same). Teacher replies are sampled from the teacher
with the student's sampler (seed `generate.seed + 1`), or read from
`evaluate.teacher_samples`:
a generate JSONL (matched by prompt number and text) or a teacher-pass
record folder of the same task split (matched by example index).

Written to `evaluate.output_dir` (default the workdir), with <tag> the split
name or "prompts": `metrics_<tag>.json`, `examples_<tag>.jsonl` (the
generate rows + `references`, `teacher_nll`, `repetition<n>`) and, with a
teacher, `teacher_samples_<tag>.jsonl` (generate rows + `student_nll`; give
it back as `evaluate.teacher_samples` to score other students against the
same teacher replies without sampling the teacher again).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import time

import jax
import numpy as np
from flax import nnx

from fdistill_jax import metrics, models, records
from fdistill_jax.data import tasks
from fdistill_jax.generate import (
  Generator,
  UsableModel,
  check_template,
  load_usable_model,
  make_sampler,
  read_prompts,
)
from fdistill_jax.record_checks import scan_shard


@dataclasses.dataclass
class Prompts:
  """What to evaluate on."""

  texts: list[str]  # raw prompts (the model's template is applied by `UsableModel`)
  references: list[list[str]] | None  # per prompt, its reference replies (None: no references)
  tag: str  # the split name or "prompts": names the output files
  split: str | None  # the task split (None: a prompts file)
  task: object | None  # the experiment's task (None: a prompts file)


def _read_references(path: str, key: str, count: int) -> list[list[str]] | None:
  """The `key` field of every row of a .jsonl prompts file (None when no row has one)."""
  if not path.endswith(".jsonl"):
    return None
  refs, lines = [], []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        refs.append(json.loads(line).get(key))
        lines.append(n)
  if all(r is None for r in refs):
    return None
  for r, n in zip(refs, lines, strict=True):
    ok = isinstance(r, str) or (isinstance(r, list) and r and all(isinstance(x, str) for x in r))
    if not ok:
      raise ValueError(
        f"{path}:{n}: expected field {key!r} (evaluate.reference_key) to be a string or a list "
        f"of strings, as on other rows; found {r!r}."
      )
  assert len(refs) == count
  return [[r] if isinstance(r, str) else list(r) for r in refs]


def read_eval_prompts(config) -> Prompts:
  """The prompts (and references) `config` names; raises before any model loads."""
  g, e = config.generate, config.evaluate
  cap = e.max_examples or None
  if g.prompts not in ("", "-"):
    texts = read_prompts(g.prompts, g.prompt_key)
    refs = _read_references(g.prompts, e.reference_key, len(texts))
    return Prompts(texts[:cap], refs and refs[:cap], "prompts", None, None)
  if g.model == "pretrained":
    raise ValueError(
      "--mode=evaluate of a pretrained model needs prompts: set generate.prompts to a text or "
      ".jsonl file, or use an experiment config (configs/generate.py:EXPERIMENT) for its task's "
      "evaluate.split."
    )
  task = tasks.get_task(config.task)
  if e.split not in task.splits:
    raise ValueError(
      f"evaluate.split={e.split!r}: task {task.name!r} has the splits {task.splits}."
    )
  pairs = task.pairs(e.split)[:cap]
  texts = [task.unwrap_source(p.source) for p in pairs]
  refs = [list(p.references) or [p.target] for p in pairs]
  return Prompts(texts, refs, e.split, e.split, task)


def _teacher_generate_config(config):
  """A copy of `config` whose `generate` section names the evaluation's teacher."""
  e = config.evaluate
  out = copy.deepcopy(config)
  out.unlock()
  if e.teacher == "experiment":
    out.generate.model, out.generate.checkpoint = "teacher", e.teacher_checkpoint
  else:
    out.generate.model = "pretrained"
    out.generate.pretrained = {"kind": "auto", "path": e.teacher}
    out.generate.system_prompt = ""
  return out


def check_evaluate(config):
  """Errors of `config.evaluate` that need no model."""
  e = config.evaluate
  if not (isinstance(e.max_examples, int) and e.max_examples >= 0):
    raise ValueError(f"evaluate.max_examples: expected an int >= 0, found {e.max_examples!r}.")
  orders = tuple(e.repetition_n) if isinstance(e.repetition_n, (tuple, list)) else None
  if not orders or not all(isinstance(n, int) and n >= 1 for n in orders):
    raise ValueError(
      f"evaluate.repetition_n: expected a tuple of ints >= 1, e.g. (1, 2, 4); found "
      f"{e.repetition_n!r}."
    )
  if e.teacher == "experiment" and "teacher" not in config:
    raise ValueError(
      "evaluate.teacher='experiment', but the config has no experiment (no teacher section); "
      "give the teacher's .gguf file or Hugging Face folder."
    )
  for key in ("teacher", "teacher_samples"):
    path = e[key]
    if path and path != "experiment" and not os.path.exists(path):
      raise FileNotFoundError(f"evaluate.{key}: expected a file or folder at {path!r}; found none.")
  if e.teacher_checkpoint and e.teacher != "experiment":
    raise ValueError(
      f"evaluate.teacher_checkpoint is set, but evaluate.teacher={e.teacher!r}: a checkpoint "
      "needs evaluate.teacher='experiment'."
    )


def _teacher_is_the_model(config) -> bool:
  g, e = config.generate, config.evaluate
  if e.teacher == "experiment":
    return g.model == "teacher" and g.checkpoint == e.teacher_checkpoint
  return g.model == "pretrained" and os.path.abspath(e.teacher) == os.path.abspath(
    g.pretrained.path
  )


def _same_vocabulary(student: UsableModel, teacher: UsableModel):
  if student.tokenizer.fingerprint() != teacher.tokenizer.fingerprint():
    raise ValueError(
      f"evaluate.teacher: the teacher ({teacher.source}) and the student ({student.source}) "
      "have different tokenizers; NLLs of one's replies under the other need the same one."
    )
  if teacher.model.config.vocab_size != student.model.config.vocab_size:
    raise ValueError(
      f"evaluate.teacher: vocab_size {teacher.model.config.vocab_size} ({teacher.source}) != "
      f"{student.model.config.vocab_size} ({student.source})."
    )


class CuttingGenerator(Generator):
  """A `Generator` that cuts over-long prompts as training does, instead of refusing them.

  As `data.pipeline` pads a split: a prompt that ends in EOS (an encoder
  source) keeps its first `max_input_len - 1` tokens and EOS; a decoder-only
  prompt keeps its last `max_input_len` (the recent context and the
  template's final marker, which decoding starts from).
  """

  def encode(self, prompts: list[str], first_index: int) -> list[list[int]]:
    del first_index
    out, n, eos = [], self.max_input_len, self.usable.tokenizer.eos_id
    for text in prompts:
      ids = self.usable.prompt_ids(text)
      if len(ids) > n:
        ids = ids[: n - 1] + [eos] if self.usable.input_eos else ids[len(ids) - n :]
      out.append(ids)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, state, inputs, input_mask, targets, target_mask):
  return models.score(nnx.merge(graphdef, state), inputs, input_mask, targets, target_mask)


def score_rows(model, prompt_ids, rows, *, batch_size: int, max_input_len: int, pad_id: int):
  """`[len(rows)]` float64 sums of the log-probs of each row's `tokens` given its prompt.

  `prompt_ids[row["index"]]` holds the prompt tokens. Batches have one shape
  (rows padded to `batch_size`, tokens to the longest row), so each model
  compiles once.
  """
  graphdef, state = nnx.split(model)
  t = max(max((len(r["tokens"]) for r in rows), default=1), 1)
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start : start + batch_size]
    inputs = np.full((batch_size, max_input_len), pad_id, np.int32)
    input_mask = np.zeros((batch_size, max_input_len), np.float32)
    targets = np.full((batch_size, t), pad_id, np.int32)
    target_mask = np.zeros((batch_size, t), np.float32)
    for i in range(batch_size):
      row = chunk[i] if i < len(chunk) else chunk[0]  # filler rows need a real prompt
      ids = prompt_ids[row["index"]]
      inputs[i, : len(ids)], input_mask[i, : len(ids)] = ids, 1.0
      n = len(row["tokens"])
      targets[i, :n], target_mask[i, :n] = row["tokens"], 1.0
    lp = np.asarray(_score(graphdef, state, inputs, input_mask, targets, target_mask), np.float64)
    out += list(lp[: len(chunk)].sum(-1))
  return np.asarray(out, np.float64)


def _rows_from_jsonl(path: str, prompts: Prompts) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = json.loads(line)
      i = row.get("index")
      if not isinstance(i, int) or not isinstance(row.get("tokens"), list):
        raise ValueError(
          f"{path}:{n}: expected a --mode=generate row with 'index' and 'tokens'; found keys "
          f"{sorted(row)}."
        )
      if i >= len(prompts.texts):
        continue  # evaluate.max_examples evaluates the first prompts only
      if row.get("prompt") != prompts.texts[i]:
        raise ValueError(
          f"{path}:{n}: prompt {i} is {row.get('prompt')!r}; the evaluation's prompt {i} is "
          f"{prompts.texts[i]!r} (evaluate.teacher_samples must come from the same prompts)."
        )
      rows.append(row)
  missing = sorted(set(range(len(prompts.texts))) - {r["index"] for r in rows})
  if missing:
    raise ValueError(
      f"{path}: no teacher reply for prompts {missing[:10]} (evaluate.teacher_samples)."
    )
  return rows


def _rows_from_records(directory: str, prompts: Prompts, tokenizer) -> list[dict]:
  manifest = records.read_manifest(directory)
  split = manifest.get("task", {}).get("split")
  if prompts.split is None or split != prompts.split:
    raise ValueError(
      f"evaluate.teacher_samples={directory!r} holds the teacher pass of split {split!r}; the "
      f'evaluation runs on {prompts.tag!r} (use a record folder of the same split, or "").'
    )
  if manifest.get("status") != "complete":
    raise records.RecordError(
      f"{directory}: the teacher pass is {manifest.get('status')!r}, expected 'complete' "
      "(finish it with --mode=teacher_pass)."
    )
  spec = records.spec_from_manifest(manifest)
  by_index = {}
  for shard in manifest["shards"]:
    scan = scan_shard(os.path.join(directory, shard["file"]), spec, keep_records=True)
    if scan.bad:
      raise records.RecordError(scan.describe())
    for serialized in scan.records:
      r = records.decode_example(spec, serialized)
      by_index[int(r["example_index"])] = r
  rows = []
  for i, text in enumerate(prompts.texts):
    if i not in by_index:
      raise ValueError(f"{directory}: no record for example {i} of split {split!r}.")
    r = by_index[i]
    for j, n in enumerate(r["teacher_lengths"]):
      toks = [int(x) for x in r["teacher_tokens"][j, : int(n)]]
      rows.append(
        {
          "index": i,
          "sample": j,
          "prompt": text,
          "completion": tokenizer.decode(toks),
          "tokens": toks,
          "length": len(toks),
          "eos": bool(toks) and toks[-1] == tokenizer.eos_id,
        }
      )
  return rows


def _teacher_rows(e, prompts, teacher, tokenizer, sampler, g) -> list[dict]:
  """The teacher replies the student is scored on (generate rows)."""
  if e.teacher_samples and os.path.isdir(e.teacher_samples):
    return _rows_from_records(e.teacher_samples, prompts, tokenizer)
  if e.teacher_samples:
    return _rows_from_jsonl(e.teacher_samples, prompts)
  # Seed + 1: the teacher's draws are not the student's random numbers.
  generator = CuttingGenerator(
    teacher, sampler, batch_size=g.batch_size, max_input_len=g.max_input_len, seed=g.seed + 1
  )
  return generator(prompts.texts)


def _nll(sums, rows) -> dict:
  """{"token": mean per-token NLL, "seq": mean per-reply NLL} over replies with a token."""
  lengths = np.asarray([len(r["tokens"]) for r in rows], np.float64)
  keep = lengths > 0
  if not keep.any():
    return {"token": float("nan"), "seq": float("nan")}
  return {
    "token": float(np.mean(-sums[keep] / lengths[keep])),
    "seq": float(np.mean(-sums[keep])),
  }


def _reply_tokens(row) -> list:
  """A reply's token ids without its closing EOS: what token_repetition<n> counts.

  Word repetition cannot see sub-word garbage ("SovSovSov" is one word, and
  strings of unrelated sub-words repeat no word); token ids can.
  """
  toks = list(row["tokens"])
  return toks[:-1] if row["eos"] and toks else toks


def reply_metrics(rows, prompts: Prompts, repetition_n) -> dict:
  """The metrics of generate `rows` that need no model (see the module docstring)."""
  texts = [r["completion"] for r in rows]
  out = {
    "num_prompts": len(prompts.texts),
    "num_replies": len(rows),
    "mean_length": float(np.mean([r["length"] for r in rows])),
    "eos_rate": 100.0 * float(np.mean([r["eos"] for r in rows])),
    "distinct1": metrics.distinct_n(texts, 1),
    "distinct2": metrics.distinct_n(texts, 2),
  }
  token_lists = [_reply_tokens(r) for r in rows]
  for n in repetition_n:
    out[f"repetition{n}"] = metrics.repetition_rate(texts, int(n))
    out[f"token_repetition{n}"] = metrics.repetition_rate(token_lists, int(n))
  first = {}
  for r in rows:
    first.setdefault(r["index"], r["completion"])
  hyps = [first[i] for i in range(len(prompts.texts))]
  if prompts.references is not None:
    out.update(metrics.sacrebleu_scores(hyps, prompts.references))
    out.update(metrics.rouge_scores(hyps, prompts.references))
  if prompts.task is not None and hasattr(prompts.task, "modes"):
    modes = [prompts.task.modes(prompts.task.wrap_source(t)) for t in prompts.texts]
    per_prompt = [[r["completion"] for r in rows if r["index"] == i] for i in range(len(hyps))]
    out["precision"] = metrics.precision(per_prompt, modes)
  return out


def _write_jsonl(path: str, rows: list[dict]):
  """Rows as JSON Lines; a row's float that is undefined for it (NaN, e.g. the
  repetition rate of a reply shorter than n) is written as null, not as `NaN`."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      row = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()
      }
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def run(config, workdir: str) -> dict:
  """`--mode=evaluate` of the model `config.generate` names; returns the metrics dict."""
  start = time.time()
  g, e = config.generate, config.evaluate
  sampler = make_sampler(g)
  check_template(g, g.model != "pretrained")
  check_evaluate(config)
  prompts = read_eval_prompts(config)
  out_dir = e.output_dir or workdir
  os.makedirs(out_dir, exist_ok=True)

  student = load_usable_model(config)
  generator = CuttingGenerator(
    student, sampler, batch_size=g.batch_size, max_input_len=g.max_input_len, seed=g.seed
  )
  prompt_ids = generator.encode(prompts.texts, 0)
  cut = sum(len(student.prompt_ids(t)) > g.max_input_len for t in prompts.texts)
  rows = generator(prompts.texts)
  score = functools.partial(
    score_rows,
    prompt_ids=prompt_ids,
    batch_size=g.batch_size,
    max_input_len=g.max_input_len,
    pad_id=student.tokenizer.pad_id,
  )
  result = reply_metrics(rows, prompts, e.repetition_n)
  result["num_cut_prompts"] = int(cut)
  for r in rows:
    if prompts.references is not None:
      r["references"] = prompts.references[r["index"]]
    for n in e.repetition_n:
      r[f"repetition{n}"] = metrics.repetition_rate([r["completion"]], int(n))
      r[f"token_repetition{n}"] = metrics.repetition_rate([_reply_tokens(r)], int(n))

  teacher, teacher_rows = None, None
  if e.teacher:
    if _teacher_is_the_model(config):
      teacher = student  # a model evaluated against itself is loaded once
    else:
      teacher = load_usable_model(_teacher_generate_config(config))
    _same_vocabulary(student, teacher)
    # Both models see the student's prompt tokens.
    teacher = dataclasses.replace(
      teacher, template=student.template, input_eos=student.input_eos, bos=student.bos
    )
    sums = score(teacher.model, rows=rows)
    for r, s in zip(rows, sums, strict=True):
      r["teacher_nll"] = -float(s) / max(len(r["tokens"]), 1)
    nll = _nll(sums, rows)
    result["teacher_nll_token"], result["teacher_nll_seq"] = nll["token"], nll["seq"]
  if teacher is not None or e.teacher_samples:
    teacher_rows = _teacher_rows(e, prompts, teacher, student.tokenizer, sampler, g)
    sums = score(student.model, rows=teacher_rows)
    for r, s in zip(teacher_rows, sums, strict=True):
      r["student_nll"] = -float(s) / max(len(r["tokens"]), 1)
    nll = _nll(sums, teacher_rows)
    result["student_nll_teacher_token"] = nll["token"]
    result["student_nll_teacher_seq"] = nll["seq"]

  paths = {"metrics": os.path.join(out_dir, f"metrics_{prompts.tag}.json")}
  paths["examples"] = os.path.join(out_dir, f"examples_{prompts.tag}.jsonl")
  _write_jsonl(paths["examples"], rows)
  if teacher_rows is not None:
    paths["teacher_samples"] = os.path.join(out_dir, f"teacher_samples_{prompts.tag}.jsonl")
    _write_jsonl(paths["teacher_samples"], teacher_rows)
  result["model"] = student.source
  result["teacher"] = teacher.source if teacher is not None else (e.teacher_samples or None)
  result["wall_s"] = time.time() - start
  result["outputs"] = paths  # read by run_summary for the end-of-run summary
  with open(paths["metrics"] + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
  os.replace(paths["metrics"] + ".tmp", paths["metrics"])
  return result

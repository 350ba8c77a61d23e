"""The main job: teacher -> teacher pass -> students for every method -> evaluation -> report.

`run(config, workdir)` with `configs/default.py` shows the paper's central
finding on the built-in synthetic task, whose true output distribution is
known: forward KL spreads mass over the modes (coverage), reverse KL and
ENGINE collapse onto few (precision), JS and TVD sit between.

Layout of the workdir:

  teacher/                 teacher training (checkpoints, metrics.jsonl)
  teacher_records/train/   the teacher pass's TFRecord shards + manifest.json
  students/<name>/         one training run per method (and `init`)
  eval/<name>.json         metrics of every model on the test split
  results.md, results.json, quality_vs_coverage.png, training_curves.png

Every stage is restartable: a finished training run resumes at its last
step and does nothing, a finished teacher pass skips its shards, and stored
evaluations are reused while the checkpoints behind them are unchanged; run
the same command again after a crash. SIGTERM stops the job at the next step
or stage boundary with `runguard.Preempted` (exit code 75).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from fdistill_jax import (
  checkpoints,
  decoding,
  divergences,
  main,
  models,
  objective_schedule,
  records,
  runguard,
  teacher_pass,
)
from fdistill_jax.data import tasks
from fdistill_jax.metrics import read_metrics

# Columns of the results table: (key in the metrics, header, format).
COLUMNS = (
  ("bleu", "BLEU", "{:.1f}"),
  ("precision", "precision %", "{:.1f}"),
  ("coverage_weighted", "coverage % (w)", "{:.1f}"),
  ("coverage_unweighted", "coverage % (u)", "{:.1f}"),
  ("kl", "KL(p*||q)", "{:.3f}"),
  ("rkl", "RKL(q||p*)", "{:.3f}"),
  ("likelihood_risk_token", "R_llh", "{:.3f}"),
  ("coverage_risk_token", "R_cvg", "{:.3f}"),
  ("distinct2", "distinct-2 %", "{:.1f}"),
  ("acceptance_teacher", "draft accept", "{:.3f}"),
)


def _sub(config, **sections) -> ml_collections.ConfigDict:
  """A deep, unlocked copy of `config` with `sections` replaced."""
  out = copy.deepcopy(config)
  out.unlock()
  for key, value in sections.items():
    out[key] = value
  return out


def teacher_config(config) -> ml_collections.ConfigDict:
  p = config.pipeline
  cfg = ml_collections.ConfigDict()
  cfg.task = config.task
  cfg.model = config.teacher.model
  cfg.objective = copy.deepcopy(config.objective)
  cfg.objective.name = "mle"
  cfg.objective.schedule = ""
  cfg.train = copy.deepcopy(config.train)
  cfg.train.num_train_steps = p.teacher_steps
  cfg.train.batch_size = p.teacher_batch_size
  cfg.train.learning_rate = p.teacher_learning_rate
  cfg.sampler = config.sampler
  cfg.mesh = config.mesh
  return copy.deepcopy(cfg)


def student_config(config, workdir: str, objective: str, init_checkpoint: str, steps: int):
  """The distill config of one method; `objective` may be a schedule ("kl:0.5,tvd")."""
  p = config.pipeline
  cfg = _sub(config)
  cfg.objective.name, cfg.objective.schedule = objective_schedule.split_spec(objective)
  cfg.train.num_train_steps = steps
  cfg.train.learning_rate = p.learning_rate
  cfg.student.init_checkpoint = init_checkpoint
  cfg.teacher.checkpoint = os.path.join(workdir, "teacher", "checkpoints")
  cfg.teacher_pass.out_dir = records.records_dir(config, workdir)
  return cfg


# ---------------------------------------------------------------------------
# Evaluation of one model.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, state, inputs, input_mask, tokens, mask):
  return models.score(nnx.merge(graphdef, state), inputs, input_mask, tokens, mask)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode(graphdef, sampler: decoding.ModelSampler, seed: int, state, inputs, input_mask, index):
  keys = decoding.example_keys(jax.random.key(seed), index)
  return sampler(nnx.merge(graphdef, state), inputs, input_mask, keys)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _acceptance(
  teacher_def, student_def, teacher_state, student_state, inputs, input_mask, tokens, mask
):
  """[B, T] 1 - TVD(p_teacher, q_student) at each position of tokens [B, T] (0 where mask is 0)."""
  p = models.forward(nnx.merge(teacher_def, teacher_state), inputs, input_mask, tokens).logits
  q = models.forward(nnx.merge(student_def, student_state), inputs, input_mask, tokens).logits
  return (1.0 - divergences.tvd(p, q)) * mask


# Module-level jits with the graph definition static: every student shares one
# architecture, so each function compiles once for the whole evaluation.


def _scorer(model):
  graphdef, state = nnx.split(model)

  def score_fn(batch, tokens, mask):
    return _score(graphdef, state, batch["inputs"], batch["input_mask"], tokens, mask)

  return score_fn


def _acceptor(teacher, student):
  """acceptance_fn(batch, tokens, mask) for `evaluate.evaluate_model`."""
  teacher_def, teacher_state = nnx.split(teacher)
  student_def, student_state = nnx.split(student)

  def acceptance_fn(batch, tokens, mask):
    return _acceptance(
      teacher_def,
      student_def,
      teacher_state,
      student_state,
      batch["inputs"],
      batch["input_mask"],
      tokens,
      mask,
    )

  return acceptance_fn


def _decoder(model, sampler: decoding.ModelSampler, seed: int, cache: dict | None = None):
  """decode_fn(batch) -> numpy DecodeResult; with `cache`, each batch is decoded once."""
  graphdef, state = nnx.split(model)

  def decode_fn(batch):
    index = np.maximum(batch["example_index"], 0)
    key = tuple(index.tolist())
    if cache is not None and key in cache:
      return cache[key]
    out = _decode(graphdef, sampler, seed, state, batch["inputs"], batch["input_mask"], index)
    out = jax.tree.map(np.asarray, out)
    if cache is not None:
      cache[key] = out
    return out

  return decode_fn


def evaluate(config, task, model, teacher, teacher_cache: dict | None = None) -> dict:
  """Distribution metrics from ancestral samples, quality metrics from greedy outputs.

  A student is also rated as a speculative draft for the teacher (acceptance
  1 - TVD and expected tokens per step at `pipeline.draft_lengths`).
  `teacher_cache` keeps the teacher's samples (the same for every student:
  same keys) across calls.
  """
  from fdistill_jax import evaluate as ev

  p = config.pipeline
  max_len = config.train.max_target_len
  common = dict(
    batch_size=p.eval_batch_size,
    max_input_len=config.train.max_input_len,
    max_target_len=max_len,
  )
  samples = decoding.make_model_sampler("sample", num_samples=p.eval_samples, max_len=max_len)
  teacher_samples = decoding.make_model_sampler("sample", num_samples=5, max_len=max_len)
  out = ev.evaluate_model(
    task,
    p.eval_split,
    _decoder(model, samples, p.eval_seed),
    teacher_score_fn=_scorer(teacher),
    student_score_fn=_scorer(model),
    teacher_decode_fn=_decoder(teacher, teacher_samples, p.eval_seed + 1, teacher_cache),
    acceptance_fn=None if model is teacher else _acceptor(teacher, model),
    draft_lengths=tuple(p.draft_lengths),
    **common,
  )
  greedy = decoding.make_model_sampler("greedy", max_len=max_len)
  quality = ev.evaluate_model(task, p.eval_split, _decoder(model, greedy, 0), **common)
  for key in ("bleu", "bleu_signature", "chrf", "ter", "rouge1", "rouge2", "rougeL"):
    if key in quality:
      out[key] = quality[key]
  return out


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def results_table(rows: dict[str, dict]) -> str:
  header = "| model | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
  lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
  for name, m in rows.items():
    cells = [fmt.format(m[key]) if key in m else "-" for key, _, fmt in COLUMNS]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _plots(workdir: str, rows: dict[str, dict], runs: dict[str, str]) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  for name, m in rows.items():
    for ax, (x, y) in zip(
      axes, (("coverage_weighted", "bleu"), ("coverage_weighted", "precision")), strict=True
    ):
      if x in m and y in m:
        ax.scatter(m[x], m[y], s=40)
        ax.annotate(name, (m[x], m[y]), textcoords="offset points", xytext=(4, 4), fontsize=9)
  axes[0].set(
    xlabel="mode coverage (weighted)", ylabel="BLEU (greedy)", title="quality vs coverage"
  )
  axes[1].set(xlabel="mode coverage (weighted)", ylabel="precision", title="precision vs coverage")
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, "quality_vs_coverage.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  written.append(path)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, run_dir in runs.items():
    rows_m = [r for r in read_metrics(run_dir) if "train/loss" in r]
    if rows_m:
      ax.plot([r["step"] for r in rows_m], [r["train/loss"] for r in rows_m], label=name)
  ax.set(xlabel="step", ylabel="training loss", title="training curves", yscale="log")
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(workdir, "training_curves.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  written.append(path)
  return written


def _write_report(workdir: str, config, rows: dict, timings: dict, runs: dict):
  table = results_table(rows)
  text = [
    "# f-DISTILL on the built-in synthetic task",
    "",
    f"Test split: {next(iter(rows.values())).get('num_examples', '?')} inputs; "
    f"{config.pipeline.eval_samples} ancestral samples per input for precision, "
    "mode coverage and the KL/RKL estimates against the true distribution p*; "
    "BLEU from greedy outputs against all valid outputs as references. "
    "R_llh: per-token NLL of student samples under the teacher; R_cvg: per-token "
    "NLL of teacher samples under the student. RKL(q||p*) is a Monte Carlo "
    "estimate in which invalid samples get log p* = log 1e-6: the true RKL is "
    "infinite whenever precision < 100%, so this is only a floor-regularised "
    "figure, and it can be negative for models that rarely produce valid outputs. "
    "draft accept: the student as a speculative-decoding draft for the teacher, "
    "mean per-token acceptance 1 - TVD(p_teacher, q_student) over the positions "
    "of teacher samples (results.json also has it over student samples, "
    "acceptance_student, and the expected tokens per verification step "
    "tokens_per_step_gamma<g>).",
    "",
    table,
    "",
    "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    "",
  ]
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(text))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"models": rows, "timings_s": timings, "runs": runs}, f, indent=2, default=float)
  if config.pipeline.plots:
    _plots(workdir, rows, runs)
  return table


# ---------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------


def _timed(timings: dict, name: str, fn, *args, **kwargs):
  start = time.time()
  out = fn(*args, **kwargs)
  timings[name] = timings.get(name, 0.0) + time.time() - start
  return out


def _stage(msg: str, *args):
  runguard.stop_if_preempted(f"stage {msg % args!r}")
  print(msg % args, flush=True)


def eval_key(config, model_dir: str, teacher_dir: str) -> dict:
  """What a stored evaluation was computed from: the model's and the teacher's
  checkpoints (`runguard.checkpoint_identity`) and the evaluation settings."""
  p = config.pipeline
  settings = {k: p[k] for k in ("eval_split", "eval_samples", "eval_batch_size", "eval_seed")}
  settings.update(max_input_len=config.train.max_input_len)
  settings.update(max_target_len=config.train.max_target_len)
  return json.loads(json.dumps({
    "model": runguard.checkpoint_identity(model_dir),
    "teacher": runguard.checkpoint_identity(teacher_dir),
    "settings": settings,
  }))  # fmt: skip


def read_eval(path: str, key: dict) -> dict | None:
  """The metrics stored at `path` if they were computed for `key`, else None."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stored = json.load(f)
  if stored.get("key") != key:
    logging.warning("%s: computed from other checkpoints or settings: evaluating again", path)
    return None
  return stored["metrics"]


@runguard.run_owner("workdir")
def run(config, workdir: str):
  """Runs every stage (skipping finished ones) and writes the report into `workdir`."""
  p = config.pipeline
  # Objectives or schedules of them ("kl:0.5,tvd"), checked before the teacher trains.
  objective_schedule.parse(p.init_objective, p.init_steps, where="config.pipeline.init_objective")
  for method in p.methods:
    objective_schedule.parse(method, p.distill_steps, where="config.pipeline.methods")
  os.makedirs(workdir, exist_ok=True)
  timings: dict[str, float] = {}
  _stage("[1/5] teacher: %d MLE steps", p.teacher_steps)
  teacher_dir = os.path.join(workdir, "teacher")
  _timed(timings, "teacher", main.run_teacher, teacher_config(config), teacher_dir)

  _stage("[2/5] teacher pass over the %s split", config.teacher_pass.split)
  pass_cfg = student_config(config, workdir, "kl", "", 0)
  _timed(timings, "teacher_pass", teacher_pass.run, pass_cfg, workdir)

  runs = {}
  _stage("[3/5] shared student initialisation: %s, %d steps", p.init_objective, p.init_steps)
  init_dir = os.path.join(workdir, "students", "init")
  _timed(
    timings,
    "init",
    main.run_distill,
    student_config(config, workdir, p.init_objective, "", p.init_steps),
    init_dir,
  )
  runs["init"] = init_dir
  init_ckpt = os.path.join(init_dir, "checkpoints")

  _stage("[4/5] distillation: %s, %d steps each", ", ".join(p.methods), p.distill_steps)
  for method in p.methods:
    run_dir = os.path.join(workdir, "students", method)
    cfg = student_config(config, workdir, method, init_ckpt, p.distill_steps)
    _timed(timings, f"distill/{method}", main.run_distill, cfg, run_dir)
    runs[method] = run_dir

  _stage("[5/5] evaluation on the %s split", p.eval_split)
  task = tasks.get_task(config.task)
  teacher, _ = checkpoints.load_model(
    config.teacher.model, os.path.join(teacher_dir, "checkpoints")
  )
  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  rows, teacher_cache = {}, {}
  for name in ["teacher", *runs]:
    runguard.stop_if_preempted(f"the evaluation of {name}")
    path = os.path.join(eval_dir, f"{name}.json")
    key = eval_key(config, runs.get(name, teacher_dir), teacher_dir)
    stored = read_eval(path, key)
    if stored is not None:
      rows[name] = stored
      continue
    if name == "teacher":
      model = teacher
    else:
      model, _ = checkpoints.load_model(
        config.student.model, os.path.join(runs[name], "checkpoints"), where="config.student"
      )
    metrics = _timed(timings, "evaluate", evaluate, config, task, model, teacher, teacher_cache)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"key": key, "metrics": metrics}, f, indent=2, default=float)
    os.replace(tmp, path)
    rows[name] = metrics
  runguard.stop_if_preempted("the report")
  table = _write_report(workdir, config, rows, timings, runs)
  print(table)
  print(f"\nReport: {os.path.join(workdir, 'results.md')}")
  return rows

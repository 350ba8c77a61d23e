"""The main job: teacher, teacher pass, every method and seed, evaluation, report.

`run(config, workdir)` with `configs/default.py` tests the paper's claims on
the built-in synthetic task, whose true output distribution p* is known:
every method is distilled once per seed in `pipeline.seeds` from a teacher,
teacher records and initial student that all seeds share, every model is
evaluated once per seed, and `report` turns the per-seed metrics into
95% intervals and the claims table (`evidence`).

Layout of the workdir:

  teacher/                 teacher training (checkpoints, metrics.jsonl)
  teacher_records/train/   the teacher pass's TFRecord shards + manifest.json
  students/init/           the shared initial student
  students/ceiling/        the student trained like the teacher (pipeline.ceiling_steps > 0)
  students/<name>/seed<k>/ one training run per method and seed
  eval/<name>/seed<k>.json metrics of every model on the test split, per seed
  results.md, results.json, frontier.png, training_curves.png

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
  evidence,
  main,
  models,
  objective_schedule,
  records,
  report,
  runguard,
  teacher_pass,
)
from fdistill_jax.data import tasks

# Persistent XLA cache of the main job (outside the workdir: it is no result),
# unless JAX_COMPILATION_CACHE_DIR (or jax_compilation_cache_dir) names another.
COMPILATION_CACHE = os.path.expanduser("~/.cache/fdistill_jax/jax_cache")


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


def ceiling_config(config) -> ml_collections.ConfigDict:
  """The student ceiling: the student architecture trained like the teacher (MLE on
  the ground truth from scratch, teacher batch and learning rate) for `pipeline.ceiling_steps`."""
  cfg = teacher_config(config)
  cfg.model = copy.deepcopy(config.student.model)
  cfg.train.num_train_steps = config.pipeline.ceiling_steps
  return cfg


def variants(p) -> dict[str, tuple[str, dict]]:
  """Every distilled student: name -> (objective, `{"section.field": value}` overrides).

  `pipeline.methods` under their own names, `pipeline.online_methods` again
  with teacher sequences sampled in the step (`<name>-online`), and JS at
  each `pipeline.js_betas` (`js-b<beta>`).
  """
  out = {m: (m, {}) for m in p.methods}
  out.update({f"{m}-online": (m, {"train.online_teacher": True}) for m in p.online_methods})
  out.update({f"js-b{b:g}": ("js", {"objective.beta": float(b)}) for b in p.js_betas})
  return out


def student_config(
  config,
  workdir: str,
  objective: str,
  init_checkpoint: str,
  steps: int,
  seed: int = 0,
  overrides: dict | None = None,
):
  """The distill config of one student; `objective` may be a schedule ("kl:0.5,tvd").

  `overrides`: `{"section.field": value}` set after the objective (see `variants`).
  """
  p = config.pipeline
  cfg = _sub(config)
  cfg.objective.name, cfg.objective.schedule = objective_schedule.split_spec(objective)
  cfg.train.seed = seed
  for key, value in (overrides or {}).items():
    section, field = key.split(".")
    cfg[section][field] = value
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


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode(graphdef, sampler: decoding.ModelSampler, seed, state, inputs, input_mask, index):
  """`seed` is traced (int32 []), so each seed's evaluation reuses one compiled sampler."""
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
    out = _decode(
      graphdef, sampler, np.int32(seed), state, batch["inputs"], batch["input_mask"], index
    )
    out = jax.tree.map(np.asarray, out)
    if cache is not None:
      cache[key] = out
    return out

  return decode_fn


def evaluate(
  config, task, model, teacher, eval_seed: int, teacher_cache: dict | None = None
) -> dict:
  """Distribution metrics from ancestral samples, quality metrics from greedy outputs.

  `bleu_sampled` is the BLEU of one ancestral sample per input (greedy BLEU
  saturated on the five-template task); sampling keys derive from `eval_seed`.

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
    _decoder(model, samples, eval_seed),
    teacher_score_fn=_scorer(teacher),
    student_score_fn=_scorer(model),
    teacher_decode_fn=_decoder(teacher, teacher_samples, eval_seed + 1, teacher_cache),
    acceptance_fn=None if model is teacher else _acceptor(teacher, model),
    draft_lengths=tuple(p.draft_lengths),
    **common,
  )
  out["bleu_sampled"] = out["bleu"]
  greedy = decoding.make_model_sampler("greedy", max_len=max_len)
  quality = ev.evaluate_model(task, p.eval_split, _decoder(model, greedy, 0), **common)
  for key in ("bleu", "bleu_signature", "chrf", "ter", "rouge1", "rouge2", "rougeL"):
    if key in quality:
      out[key] = quality[key]
  return out


# ---------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------


def _timed(timings: dict, name: str, fn, *args, **kwargs):
  """Runs fn, appending its wall time to `timings[name]` (one entry per call)."""
  start = time.time()
  out = fn(*args, **kwargs)
  timings.setdefault(name, []).append(time.time() - start)
  return out


def _num_params(model) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _student_params(config, init_dir: str) -> int:
  model, _ = checkpoints.load_model(
    config.student.model, os.path.join(init_dir, "checkpoints"), where="config.student"
  )
  return _num_params(model)


def _stage(msg: str, *args):
  runguard.stop_if_preempted(f"stage {msg % args!r}")
  print(msg % args, flush=True)


def eval_key(config, model_dir: str, teacher_dir: str, eval_seed: int | None = None) -> dict:
  """What a stored evaluation was computed from: the model's and the teacher's
  checkpoints (`runguard.checkpoint_identity`) and the evaluation settings
  (`eval_seed`: the evaluation's sampling seed, default `pipeline.eval_seed`)."""
  p = config.pipeline
  settings = {k: p[k] for k in ("eval_split", "eval_samples", "eval_batch_size")}
  settings.update(eval_seed=p.eval_seed if eval_seed is None else eval_seed)
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


def write_eval(path: str, key: dict, metrics: dict):
  """Stores `metrics` with the `key` they were computed for (read back by `read_eval`)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"key": key, "metrics": metrics}, f, indent=2, default=float)
  os.replace(tmp, path)


@runguard.run_owner("workdir")
def run(config, workdir: str):
  """Runs every stage (skipping finished ones) and writes the report into `workdir`."""
  p = config.pipeline
  # Objectives or schedules of them ("kl:0.5,tvd"), checked before the teacher trains.
  objective_schedule.parse(p.init_objective, p.init_steps, where="config.pipeline.init_objective")
  for field in ("methods", "online_methods"):
    for method in p[field]:
      objective_schedule.parse(method, p.distill_steps, where=f"config.pipeline.{field}")
  if not p.seeds or len(set(p.seeds)) != len(p.seeds):
    raise ValueError(f"config.pipeline.seeds: expected distinct seeds, found {tuple(p.seeds)}")
  os.makedirs(workdir, exist_ok=True)
  if p.compilation_cache:
    # Seeds of one method compile the same step: compile it once.
    if not jax.config.jax_compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  timings: dict[str, float] = {}
  _stage("[1/5] teacher: %d MLE steps", p.teacher_steps)
  teacher_dir = os.path.join(workdir, "teacher")
  _timed(timings, "teacher", main.run_teacher, teacher_config(config), teacher_dir)

  _stage("[2/5] teacher pass over the %s split", config.teacher_pass.split)
  pass_cfg = student_config(config, workdir, "kl", "", 0)
  _timed(timings, "teacher_pass", teacher_pass.run, pass_cfg, workdir)

  runs: dict[str, str] = {}
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
  shared_dirs = {"teacher": teacher_dir, "init": init_dir}
  if p.ceiling_steps:
    _stage("[3/5] student ceiling: the student trained like the teacher, %d steps", p.ceiling_steps)
    shared_dirs["ceiling"] = os.path.join(workdir, "students", "ceiling")
    _timed(timings, "ceiling", main.run_teacher, ceiling_config(config), shared_dirs["ceiling"])
    runs["ceiling"] = shared_dirs["ceiling"]

  students = variants(p)
  _stage(
    "[4/5] distillation: %s, %d steps each, seeds %s",
    ", ".join(students),
    p.distill_steps,
    list(p.seeds),
  )
  for seed in p.seeds:
    for name, (objective, overrides) in students.items():
      run_dir = os.path.join(workdir, "students", name, f"seed{seed}")
      cfg = student_config(config, workdir, objective, init_ckpt, p.distill_steps, seed, overrides)
      _timed(timings, f"distill/{name}", main.run_distill, cfg, run_dir)
      runs[f"{name}/seed{seed}"] = run_dir

  _stage("[5/5] evaluation on the %s split, eval seeds %s", p.eval_split, list(p.seeds))
  task = tasks.get_task(config.task)
  teacher, _ = checkpoints.load_model(
    config.teacher.model, os.path.join(teacher_dir, "checkpoints")
  )
  # The teacher and the shared students (init, ceiling) are evaluated once
  # per seed too (with that seed's sampling keys), so every row has an interval.
  per_seed: dict[str, dict[str, dict]] = {}
  for seed in p.seeds:
    teacher_cache: dict = {}
    models_dirs = dict(shared_dirs)
    models_dirs.update({n: runs[f"{n}/seed{seed}"] for n in students})
    for name, model_dir in models_dirs.items():
      runguard.stop_if_preempted(f"the evaluation of {name}, seed {seed}")
      eval_seed = p.eval_seed + 1000 * seed
      path = os.path.join(workdir, "eval", name, f"seed{seed}.json")
      key = eval_key(config, model_dir, teacher_dir, eval_seed)
      metrics = read_eval(path, key)
      if metrics is None:
        if name == "teacher":
          model = teacher
        else:
          model, _ = checkpoints.load_model(
            config.student.model, os.path.join(model_dir, "checkpoints"), where="config.student"
          )
        metrics = _timed(
          timings, "evaluate", evaluate, config, task, model, teacher, eval_seed, teacher_cache
        )
        write_eval(path, key, metrics)
      per_seed.setdefault(name, {})[str(seed)] = metrics
  runguard.stop_if_preempted("the report")
  results = {
    "seeds": list(p.seeds),
    "shared": "teacher, teacher records and initial student shared by all seeds; "
    "per seed: the methods' training keys and data order, and the evaluation keys",
    "eval_samples": p.eval_samples,
    "sizes": {"teacher": _num_params(teacher), "student": _student_params(config, init_dir)},
    "steps": {"teacher": p.teacher_steps, "ceiling": p.ceiling_steps},
    "per_seed": per_seed,
    "timings_s": timings,
  }
  text = report.write(workdir, results, runs, bool(p.plots))
  print(text)
  print(f"\nReport: {os.path.join(workdir, 'results.md')}")
  return report.means(evidence.summarize(per_seed))

"""The capacity scan of docs/capacity.md: the teacher against student ceilings of other sizes.

  python docs/capacity_scan.py OUT --task num_templates=32,template_decay=0.9 \
    --student num_heads=2,head_dim=8,d_ff=32 --steps 1200 6000

Builds the main job's config (configs/default.py) with the `--task` and
`--student` overrides (JSON values), trains the teacher exactly as the main
job does (`pipeline.teacher_config`; reused from OUT when finished) and the
student architecture like the teacher for each of `--steps`
(`pipeline.ceiling_config`, one folder per budget), and evaluates each with
`pipeline.evaluate` at evaluation seed 0, the main job's seed-0 keys. Prints
one JSON line per model with the exact distances to p* and the sample-based
precision and coverage.
"""

import argparse
import json
import os

from configs import default
from fdistill_jax import checkpoints, main, pipeline
from fdistill_jax.data import tasks

METRICS = ("kl", "tvd_exact", "coverage_weighted", "precision", "invalid_mass")


def _overrides(text: str) -> dict:
  pairs = (kv.split("=", 1) for kv in text.split(",") if kv)
  return {k: json.loads(v) for k, v in pairs}


def _tag(values: dict) -> str:
  return "_".join(f"{k}{v}" for k, v in sorted(values.items())) or "default"


def _evaluate(config, task, model_cfg, model_dir, teacher_dir, teacher) -> dict:
  """The METRICS of one model at eval seed 0, stored like the main job's evaluations."""
  path = os.path.join(model_dir, "scan_eval.json")
  key = pipeline.eval_key(config, model_dir, teacher_dir, eval_seed=0)
  metrics = pipeline.read_eval(path, key)
  if metrics is None:
    model = teacher
    if model_cfg is not None:
      model, _ = checkpoints.load_model(model_cfg, os.path.join(model_dir, "checkpoints"))
    metrics = pipeline.evaluate(config, task, model, teacher, 0, {})
    pipeline.write_eval(path, key, metrics)
  return {k: float(metrics[k]) for k in METRICS}


def scan(out: str, task_kv: dict, student_kv: dict, steps: list[int]) -> list[dict]:
  config = default.get_config()
  for key, value in task_kv.items():
    config.task[key] = value
  for key, value in student_kv.items():
    config.student.model[key] = value
  task_dir = os.path.join(out, _tag(task_kv))
  teacher_dir = os.path.join(task_dir, "teacher")
  main.run_teacher(pipeline.teacher_config(config), teacher_dir)
  task = tasks.get_task(config.task)
  teacher, _ = checkpoints.load_model(
    config.teacher.model, os.path.join(teacher_dir, "checkpoints")
  )
  rows = [dict(model="teacher", steps=config.pipeline.teacher_steps, task=task_kv)]
  rows[0].update(_evaluate(config, task, None, teacher_dir, teacher_dir, teacher))
  for n in steps:
    config.pipeline.ceiling_steps = n
    run_dir = os.path.join(task_dir, f"{_tag(student_kv)}_steps{n}")
    main.run_teacher(pipeline.ceiling_config(config), run_dir)
    row = dict(model="ceiling", steps=n, task=task_kv, student=student_kv)
    row.update(_evaluate(config, task, config.student.model, run_dir, teacher_dir, teacher))
    rows.append(row)
  for row in rows:
    print(json.dumps(row))
  return rows


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out", help="folder for the teacher, the ceilings and their evaluations")
  parser.add_argument("--task", default="", help="config.task overrides: key=json,...")
  parser.add_argument("--student", default="", help="config.student.model overrides")
  parser.add_argument("--steps", type=int, nargs="+", default=[1200], help="ceiling budgets")
  args = parser.parse_args()
  scan(args.out, _overrides(args.task), _overrides(args.student), args.steps)

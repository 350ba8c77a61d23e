"""Records the trainer's golden run into tests/fixtures/golden_train.json.

A few steps of `train.train_loop` for every objective, fused and unfused
where both exist, plus the variants that take other paths through the step
(exact JS, the teacher model on teacher sequences instead of the stored
top-k, online teacher samples, gradient accumulation). Tiny models and the
deterministic batches of `tests/_train_helpers.py`, on one CPU device.

Per case it stores every logged train metric of every step and, per
parameter leaf, float64 summaries of the final values: mean, root mean
square and two fixed random projections of unit expected norm, so that
`tests/test_golden.py` can check the final parameters to 1e-5 without
storing them.

The fixture pins the trainer's behaviour across refactors: regenerate it
only for an intended change of the numbers, and say why in the commit.

  PYTHONPATH=$PWD python tests/make_golden.py

`python -m tests.make_golden --serve` runs cases on request instead: one
case name per line on stdin, one JSON line of `run_case`'s result (or
{"error": traceback}) per case on stdout. tests/test_golden.py runs its
cases there, in a process with XLA's default flags, as the fixture was
recorded.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402 - after the JAX environment variables
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fdistill_jax import models, train  # noqa: E402
from tests import _train_helpers as h  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "golden_train.json")
NUM_STEPS = 3
# Metrics that measure the machine, not the computation.
UNTRACKED = ("train/steps_per_second",)

_UNFUSED = ("kl", "rkl", "js", "tvd", "fdiv", "seqkd", "engine", "mle", "kd", "predistill")
_FUSED = ("kl", "rkl", "js", "tvd", "fdiv", "kd")

# name -> (objective, objective overrides, train overrides)
CASES: dict[str, tuple[str, dict, dict]] = {
  **{f"{o}/unfused": (o, {}, {"fused_head": False}) for o in _UNFUSED},
  **{f"{o}/fused": (o, {}, {"fused_head": True}) for o in _FUSED},
  "fdiv_alpha/fused": (
    "fdiv",
    {"divergence": "alpha", "divergence_params": {"alpha": 0.7}, "student_weight": 0.3},
    {},
  ),
  "js_exact/unfused": ("js", {"exact_js": True}, {"fused_head": False}),
  "js_exact_logits/unfused": (
    "js",
    {"exact_js": True, "use_teacher_topk": False},
    {"fused_head": False},
  ),
  "kl_logits/unfused": ("kl", {"use_teacher_topk": False}, {"fused_head": False}),
  "kl_logits/fused": ("kl", {"use_teacher_topk": False}, {"fused_head": True}),
  "kl_online/fused": ("kl", {}, {"online_teacher": True}),
  "js_accum/fused": ("js", {"temperature": 2.0}, {"grad_accum_steps": 2}),
}


def case_config(name: str):
  objective, obj_overrides, train_overrides = CASES[name]
  c = h.config(
    objective,
    num_train_steps=NUM_STEPS,
    checkpoint_every_steps=1000,
    async_checkpointing=False,
    fused_chunk_size=7,  # does not divide the token count: the padded chunk runs
    **train_overrides,
  )
  c.objective.update(obj_overrides)
  return c


def leaf_summary(x) -> dict:
  """float64 mean, rms and two unit-norm random projections of one array."""
  v = np.asarray(x, np.float64).ravel()
  r = np.random.default_rng(v.size).standard_normal((2, v.size)) / np.sqrt(v.size)
  return {"mean": float(v.mean()), "rms": float(np.sqrt(np.mean(v * v))), "proj": (r @ v).tolist()}


def params_summary(params) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(path): leaf_summary(x) for path, x in flat}


def _read_train_rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  out = []
  for row in rows:
    kept = {k: v for k, v in row.items() if k.startswith("train/") and k not in UNTRACKED}
    if kept:
      out.append({"step": row["step"], **kept})
  return out


def run_case(name: str, workdir: str, tiny=None) -> dict:
  """{"metrics": per-step train metrics, "params": `params_summary` of the final params}."""
  student, teacher = tiny or tiny_models()
  c = case_config(name)
  out = train.train_loop(c, workdir, student=student, teacher=teacher, data_fn=h.data_fn(teacher))
  return {"metrics": _read_train_rows(workdir), "params": params_summary(out["params"])}


def tiny_models():
  return models.build_model(h.model_config(), rngs=0), models.build_model(h.model_config(), rngs=1)


def main():
  tiny = tiny_models()
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for i, name in enumerate(CASES):
      print(f"[{i + 1}/{len(CASES)}] {name}", file=sys.stderr)
      results[name] = run_case(name, os.path.join(tmp, str(i)), tiny)
  os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
  with open(FIXTURE, "w") as f:
    json.dump({"num_steps": NUM_STEPS, "cases": results}, f, indent=1, sort_keys=True)
    f.write("\n")
  print(f"wrote {FIXTURE}: {len(results)} cases", file=sys.stderr)


def serve():
  """Answers case names read from stdin, one JSON line each on stdout (see the docstring)."""
  replies = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # whatever else prints (the trainer's logs, XLA) goes to stderr
  tiny = tiny_models()
  with tempfile.TemporaryDirectory() as tmp:
    for i, line in enumerate(sys.stdin):
      name = line.strip()
      try:
        reply = run_case(name, os.path.join(tmp, str(i)), tiny)
      except Exception:  # noqa: BLE001 - the test reports it, with the traceback
        reply = {"error": traceback.format_exc()}
      print(json.dumps(reply), file=replies, flush=True)


if __name__ == "__main__":
  serve() if sys.argv[1:] == ["--serve"] else main()

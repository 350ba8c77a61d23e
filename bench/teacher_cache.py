"""Teacher caches at equal storage: top-k vs stratified vs sampled vs the full vocabulary.

On the built-in synthetic task (the main job's models and sizes,
configs/default.py), one teacher is trained and its pass is written once per
cache form (docs/teacher-cache.md):

  topk           K = 8                  (the project's form so far)
  topk+sampled   K = 4, S = 4 tail draws from the teacher
  sampled        S = 8 draws from the teacher
  full           the teacher's whole distribution (teacher run in the step)

A shared student initialisation (`pipeline.init_objective`) is distilled with
forward KL from each, for the same steps, and evaluated as the main job does:
`quality/<form>/kl` is the exact KL(p*||q) against the task's true
distribution, `quality/<form>/precision` and `quality/<form>/coverage` the
precision and weighted mode coverage of ancestral samples.

`loss_bias/<form>/<divergence>`: on one batch of the records (the teacher's
sequences; the teacher's full distribution recomputed there) and the shared
initial student, (mean over R cache redraws of the per-token mean estimate -
the full-vocabulary per-token mean `loss_full/<divergence>`) / the full
value; `loss_bias_stderr` is its standard error over the redraws,
`loss_bias_z` = |bias| / stderr (target
<= 3 for the unbiased forms; the top-k form is deterministic and its bias is
the lower-bound gap). Redraws use `sampled.draw_tail_samples`, the
function the pass writes records with. `bytes_per_position/<form>` counts
the teacher-cache features of one position (records.py storage dtypes);
`bytes_per_record/<form>` is the measured shard size per record.

  python -m bench.teacher_cache [--workdir DIR] [--redraws R]

Stages are restartable (the main job's): a rerun with the same --workdir
reuses the trained teacher, records and students.
"""

from __future__ import annotations

from bench import common

common.setup_env()

import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from configs import default  # noqa: E402
from fdistill_jax import (  # noqa: E402
  checkpoints,
  divergences,
  models,
  pipeline,
  teacher_pass,
)
from fdistill_jax import main as modes  # noqa: E402
from fdistill_jax import records as rec  # noqa: E402
from fdistill_jax import sampled_divergences as sampled  # noqa: E402
from fdistill_jax.data import tasks  # noqa: E402
from fdistill_jax.data.reader import RecordReader  # noqa: E402

# form -> (cache_form, K, S); "full" trains on the teacher's whole distribution.
FORMS = {
  "topk": ("topk", 8, 0),
  "topk+sampled": ("topk+sampled", 4, 4),
  "sampled": ("sampled", 0, 8),
  "full": ("topk", 8, 0),
}
DIVERGENCES = ("kl", "js", "rkl", "tvd")
PRESETS = {
  "cpu": dict(teacher_steps=1200, init_steps=500, distill_steps=300),
  "full": dict(teacher_steps=1200, init_steps=500, distill_steps=300),
}


def _add_arguments(parser):
  parser.add_argument("--workdir", default="", help="stage folder (default: a temporary one)")
  parser.add_argument("--redraws", type=int, default=200, help="cache redraws for the bias")


def base_config(preset: dict):
  config = default.get_config()
  config.pipeline.update(preset)
  config.pipeline.plots = False
  config.objective.name = "kl"
  return config


def form_config(config, workdir: str, form: str, init_ckpt: str, steps: int):
  cache_form, k, s = FORMS[form]
  cfg = pipeline.student_config(config, workdir, "kl", init_ckpt, steps)
  cfg.teacher_pass.out_dir = os.path.join(workdir, "records", cache_form)
  cfg.teacher_pass.update(cache_form=cache_form, top_k=k, num_tail_samples=s)
  cfg.objective.use_teacher_topk = form != "full"
  return cfg


def bytes_per_position(spec: rec.RecordSpec) -> int:
  """Bytes of the teacher-cache features at one position (top-k, tail, samples)."""
  cache = ("teacher_topk", "teacher_tail", "teacher_sample", "teacher_proposal")
  return sum(
    dtype.itemsize * (shape[2] if len(shape) == 3 else 1)
    for name, (shape, dtype) in rec._fixed_arrays(spec).items()
    if name.startswith(cache)
  )


def record_bytes(directory: str) -> float:
  manifest = rec.read_manifest(directory)
  size = sum(os.path.getsize(os.path.join(directory, s["file"])) for s in manifest["shards"])
  return size / manifest["num_examples"]


def loss_bias(config, workdir: str, teacher, student, redraws: int) -> dict:
  """Relative bias and its standard error of each form's per-token mean, per divergence."""
  directory = os.path.join(workdir, "records", "topk")
  reader = RecordReader(directory, batch_size=64, shuffle=False, num_epochs=1)
  batch = next(iter(reader))
  b, n, t = batch["teacher_tokens"].shape
  inputs = np.repeat(batch["inputs"], n, 0)
  input_mask = np.repeat(batch["input_mask"], n, 0)
  tokens = batch["teacher_tokens"].reshape(b * n, t)
  mask = jnp.asarray(batch["teacher_mask"].reshape(b * n, t))
  t_logits = models.forward(teacher, inputs, input_mask, tokens, mask).logits
  s_logits = models.forward(student, inputs, input_mask, tokens, mask).logits
  logp = divergences.log_probs(t_logits)

  def token_mean(values):
    return jnp.sum(values * mask) / jnp.sum(mask)

  out = {}
  for form, (_, k, s) in FORMS.items():
    if form == "full":
      continue
    lp_k, ids, tail = teacher_pass.topk_and_tail(logp, k)

    def estimates(key, name, lp_k=lp_k, ids=ids, tail=tail, s=s):
      if s == 0:
        return token_mean(
          divergences.topk_divergence(name, lp_k, ids, s_logits, teacher_tail_logmass=tail)
        )[None]

      def one(r):
        s_ids, s_lp, _ = sampled.draw_tail_samples(logp, ids, jax.random.fold_in(key, r), s)
        values = sampled.sampled_divergence(
          name, lp_k, ids, s_logits, sample_ids=s_ids, sample_logprobs=s_lp,
          teacher_tail_logmass=tail,
        )  # fmt: skip
        return token_mean(values)

      return jax.lax.map(one, jnp.arange(redraws))

    for name in DIVERGENCES:
      full = float(token_mean(divergences.divergence(name, t_logits, s_logits)))
      draws = np.asarray(jax.jit(estimates, static_argnums=1)(jax.random.key(0), name), np.float64)
      bias = (draws.mean() - full) / full
      stderr = draws.std(ddof=1) / np.sqrt(draws.size) / full if draws.size > 1 else 0.0
      out[form, name] = (bias, stderr, full)
  return out


def main():
  args = common.parse_args(__doc__.split("\n")[0], add_arguments=_add_arguments)
  logging.set_verbosity(logging.WARNING)
  workdir = args.workdir or tempfile.mkdtemp(prefix="teacher_cache_")
  config = base_config(PRESETS[args.preset])
  p = config.pipeline
  print(f"[1/5] teacher ({p.teacher_steps} steps) in {workdir}", flush=True)
  modes.run_teacher(pipeline.teacher_config(config), os.path.join(workdir, "teacher"))
  print("[2/5] teacher passes, one per cache form", flush=True)
  specs = {}
  for form in FORMS:
    cfg = form_config(config, workdir, form, "", 0)
    teacher_pass.run(cfg, workdir)
    specs[form] = rec.spec_from_manifest(rec.read_manifest(cfg.teacher_pass.out_dir))
  print(f"[3/5] shared student initialisation ({p.init_steps} steps)", flush=True)
  init_dir = os.path.join(workdir, "students", "init")
  init_cfg = form_config(config, workdir, "topk", "", p.init_steps)
  init_cfg.objective.name = p.init_objective
  modes.run_distill(init_cfg, init_dir)
  init_ckpt = os.path.join(init_dir, "checkpoints")
  print(f"[4/5] forward-KL students, {p.distill_steps} steps per form", flush=True)
  for form in FORMS:
    cfg = form_config(config, workdir, form, init_ckpt, p.distill_steps)
    modes.run_distill(cfg, os.path.join(workdir, "students", form))
  print("[5/5] evaluation and loss bias", flush=True)
  task = tasks.get_task(config.task)
  teacher = checkpoints.load_model(
    config.teacher.model, os.path.join(workdir, "teacher", "checkpoints")
  )[0]
  init_student = checkpoints.load_model(config.student.model, init_ckpt)[0]
  figures = {}
  teacher_samples = {}
  for form in FORMS:
    path = os.path.join(workdir, "eval", f"{form}.json")
    if os.path.exists(path):
      metrics = json.load(open(path))
    else:
      ckpt = os.path.join(workdir, "students", form, "checkpoints")
      student = checkpoints.load_model(config.student.model, ckpt)[0]
      metrics = pipeline.evaluate(config, task, student, teacher, teacher_samples)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        json.dump(metrics, f, default=float)
    figures[f"quality/{form}/kl"] = common.figure(metrics["kl"], "nats")
    figures[f"quality/{form}/precision"] = common.figure(metrics["precision"], "%")
    figures[f"quality/{form}/coverage"] = common.figure(metrics["coverage_weighted"], "%")
    figures[f"quality/{form}/bleu"] = common.figure(metrics["bleu"], "BLEU")
  for form, spec in specs.items():
    if form == "full":
      # What storing the whole distribution would take (bf16 log-probs).
      per_position = spec.vocab_size * spec.np_logprob_dtype.itemsize
      figures[f"bytes_per_position/{form}"] = common.figure(
        per_position, "bytes", note="bf16 [V] log-probs if stored; the run recomputes them"
      )
      continue
    figures[f"bytes_per_position/{form}"] = common.figure(bytes_per_position(spec), "bytes")
    directory = form_config(config, workdir, form, "", 0).teacher_pass.out_dir
    figures[f"bytes_per_record/{form}"] = common.figure(record_bytes(directory), "bytes")
  for (form, name), (bias, stderr, full) in loss_bias(
    config, workdir, teacher, init_student, args.redraws
  ).items():
    figures[f"loss_full/{name}"] = common.figure(full, "nats/token")
    figures[f"loss_bias/{form}/{name}"] = common.figure(bias, "relative")
    figures[f"loss_bias_stderr/{form}/{name}"] = common.figure(stderr, "relative")
    if form != "topk":
      z = abs(bias) / stderr
      figures[f"loss_bias_z/{form}/{name}"] = common.figure(z, "SE", target=3.0, better="lower")
  kl = {form: figures[f"quality/{form}/kl"]["value"] for form in FORMS}
  best = min(kl, key=kl.get)
  common.write_results(
    "teacher_cache",
    figures,
    notes=[
      f"Synthetic task, configs/default.py models; teacher {p.teacher_steps} MLE steps, "
      f"shared {p.init_objective} initialisation {p.init_steps} steps, then "
      f"{p.distill_steps} forward-KL steps per form (one seed). Loss bias on one 64-input "
      f"batch of teacher sequences, the initial student, {args.redraws} cache redraws. "
      "See docs/teacher-cache.md.",
      "",
      "This run: student KL(p*||q) by form: "
      + ", ".join(f"{form} {value:.3f}" for form, value in kl.items())
      + f" (lowest: {best}). The top-k form under-states the per-token KL by "
      f"{-100 * figures['loss_bias/topk/kl']['value']:.1f}% and the reverse KL by "
      f"{-100 * figures['loss_bias/topk/rkl']['value']:.1f}%; the sampled forms' KL, JS "
      "and TVD biases are within their standard errors. Reverse KL from teacher draws is "
      "heavy-tailed (weights q/p on tokens the teacher rarely emits): its standard error "
      "from the redraws is itself unreliable, which is why `loss_bias_z/sampled/rkl` can "
      "miss its target; the stratified form's draws cover only the tail, where the weights "
      "are smaller.",
      "",
      "Why the sampled forms need not win here: the teacher on this task is peaked enough "
      "that the top-k form's per-token KL bias is small (above), and then at equal bytes "
      "the tail draws' variance costs more than the bias they remove. This is one seed; "
      "run-to-run noise is not measured, so small gaps between forms are not significant. "
      "The sampled cache is expected to pay off for flat teachers and large vocabularies, "
      "where a small K leaves real mass in the tail (Anshumann et al., 2025).",
    ],
    write=not args.no_write,
  )


if __name__ == "__main__":
  main()

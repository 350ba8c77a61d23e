"""The main job's report: results.md (tables with intervals, claims), results.json, plots.

Every figure is computed from the per-seed metrics that `pipeline.run`
collects (`per_seed[model][seed] -> metrics`); `write` stores those values in
results.json next to their summaries, so the report can be rebuilt from the
JSON alone (`from_json`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from fdistill_jax import evidence
from fdistill_jax.metrics import read_metrics

# Columns of the results table: (key in the metrics, header, format).
COLUMNS = (
  ("bleu_sampled", "BLEU (sampled)", "{:.1f}"),
  ("bleu", "BLEU (greedy)", "{:.1f}"),
  ("precision", "precision %", "{:.1f}"),
  ("coverage_weighted", "coverage % (w)", "{:.1f}"),
  ("kl", "KL(p*‖q)", "{:.3f}"),
  ("tvd_exact", "TVD(p*,q)", "{:.3f}"),
  ("rkl_valid", "RKL(q_v‖p*)", "{:.3f}"),
  ("invalid_mass", "q(invalid) %", "{:.1f}"),
  ("likelihood_risk_token", "R_llh", "{:.3f}"),
  ("coverage_risk_token", "R_cvg", "{:.3f}"),
  ("distinct2", "distinct-2 %", "{:.1f}"),
  ("acceptance_teacher", "draft accept", "{:.3f}"),
)

NOTES = (
  "Each cell: mean over seeds ± half-width of the 95% Student-t interval (n = number of "
  "seeds; '-' where the model has fewer than 2 evaluations). "
  "BLEU (sampled): one ancestral sample per input against all valid outputs; BLEU (greedy): "
  "the greedy output against the same. Precision: share of sampled outputs that are valid; "
  "coverage (w): "
  "p* mass of the distinct modes among the samples. KL(p*‖q), TVD(p*,q), RKL(q_v‖p*) and "
  "q(invalid) are exact (p*'s modes are enumerated and scored under q). "
  "RKL(q_v‖p*): the reverse KL of q renormalised on p*'s support (never negative); "
  "the reverse KL of q itself is infinite whenever q(invalid) > 0, so the two are shown "
  "together. R_llh / R_cvg: per-token NLL of student samples under the teacher / of "
  "teacher samples under the student. draft accept: mean per-token acceptance "
  "1 - TVD(p_teacher, q_student) of the student as a speculative draft."
)


def _cell(iv: evidence.Interval | None, fmt: str) -> str:
  if iv is None:
    return "-"
  if iv.n < 2:
    return fmt.format(iv.mean)
  return f"{fmt.format(iv.mean)} ± {fmt.format(iv.half)}"


def results_table(summary: dict[str, dict[str, evidence.Interval]]) -> str:
  header = "| model | n | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
  lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
  for name, m in summary.items():
    n = max((iv.n for iv in m.values()), default=0)
    cells = [_cell(m.get(key), fmt) for key, _, fmt in COLUMNS]
    lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# The capacity table's rows: (metric, header, format, higher is better).
CAPACITY = (
  ("kl", "KL(p*‖·)", "{:.3f}", False),
  ("tvd_exact", "TVD(p*,·)", "{:.3f}", False),
  ("coverage_weighted", "coverage % (w)", "{:.1f}", True),
  ("precision", "precision %", "{:.1f}", True),
)
SHARED = ("teacher", "init", "ceiling")  # models every seed shares (not distilled per seed)


def capacity_table(
  per_seed, summary, sizes: dict[str, int], steps: dict[str, int] | None = None
) -> list[str]:
  """The teacher against the student ceiling and the best distilled student per metric.

  `steps`: training steps of "teacher" and "ceiling" (results.json's "steps"),
  named under the table.

  The last column is the per-seed paired difference teacher - best student
  (signed so that > 0 means the teacher is better), with its 95% t-interval.
  """
  students = [n for n in summary if n not in SHARED]
  if "teacher" not in summary or not students:
    return []
  ceiling = "ceiling" in summary
  lines = [
    f"## Capacity gap (teacher {sizes.get('teacher', 0):,} parameters, student "
    f"{sizes.get('student', 0):,})",
    "",
    "| metric | teacher |" + (" student ceiling |" if ceiling else "")
    + " best student (method) | teacher better by (95% t-interval) |",
    "|---|---|" + ("---|" if ceiling else "") + "---|---|",
  ]  # fmt: skip
  for key, header, fmt, higher in CAPACITY:
    have = [n for n in students if key in summary[n]]
    if key not in summary["teacher"] or not have:
      continue
    pick = max if higher else min
    best = pick(have, key=lambda n: summary[n][key].mean)
    sign = 1.0 if higher else -1.0
    seeds = sorted(set(per_seed["teacher"]) & set(per_seed[best]))
    gap = evidence.t_interval(
      [sign * (per_seed["teacher"][s][key] - per_seed[best][s][key]) for s in seeds]
    )
    cells = [_cell(summary["teacher"][key], fmt)]
    if ceiling:
      cells.append(_cell(summary["ceiling"].get(key), fmt))
    cells.append(f"{_cell(summary[best][key], fmt)} ({best})")
    low = "-" if gap.n < 2 else f"[{fmt.format(gap.low)}, {fmt.format(gap.high)}]"
    cells.append(f"{fmt.format(gap.mean)} {low}")
    lines.append(f"| {header} | " + " | ".join(cells) + " |")
  lines.append("")
  if ceiling:
    steps = steps or {}
    budget = (
      f"{steps['ceiling']} steps against the teacher's {steps['teacher']}"
      if "ceiling" in steps and "teacher" in steps
      else "steps as in pipeline.ceiling_steps"
    )
    lines += [
      "Student ceiling: the student architecture trained like the teacher "
      f"(MLE on the ground truth from scratch, the teacher's batch and learning rate, {budget}).",
      "",
    ]
  return lines


def _error_plot(ax, summary, x, y, colors):
  """Every model but init at (mean x, mean y) with 95% intervals; a distinct marker and
  colour each (the teacher and the student ceiling as reference points)."""
  markers = "osD^v<>pPX*hH8d"
  sweep = sorted((n for n in summary if n.startswith("js-b")), key=lambda n: float(n[4:]))
  if all(x in summary[n] and y in summary[n] for n in sweep) and len(sweep) > 1:
    ax.plot([summary[n][x].mean for n in sweep], [summary[n][y].mean for n in sweep], "k-", lw=0.8)
  shown = [n for n, m in summary.items() if n != "init" and x in m and y in m]
  for i, name in enumerate(shown):
    m = summary[name]
    xe = 0 if m[x].n < 2 else m[x].half
    ye = 0 if m[y].n < 2 else m[y].half
    ax.errorbar(
      m[x].mean,
      m[y].mean,
      xerr=xe,
      yerr=ye,
      fmt=markers[i % len(markers)],
      color=colors(i % 20),
      capsize=3,
      label=name,
    )


def plots(workdir: str, summary: dict, runs: dict[str, str]) -> list[str]:
  """frontier.png (precision and exact TVD vs coverage, 95% intervals), training_curves.png."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
  colors = matplotlib.colormaps["tab20"]
  _error_plot(axes[0], summary, "coverage_weighted", "precision", colors)
  _error_plot(axes[1], summary, "coverage_weighted", "tvd_exact", colors)
  axes[0].set(
    xlabel="mode coverage % (weighted)", ylabel="precision %", title="precision vs coverage"
  )
  axes[1].set(
    xlabel="mode coverage % (weighted)",
    ylabel="exact TVD(p*, q) (lower is better)",
    title="distance to p* vs coverage",
  )
  for ax in axes:
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    # One legend outside the axes: labels can never overlap the points or each other.
    fig.legend(handles, labels, loc="center right", fontsize=8, title="student (js-bβ: JS(β))")
  fig.tight_layout(rect=(0, 0, 0.84, 1))
  path = os.path.join(workdir, "frontier.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  written.append(path)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, run_dir in runs.items():
    rows_m = [r for r in read_metrics(run_dir) if "train/loss" in r]
    if rows_m:
      ax.plot([r["step"] for r in rows_m], [r["train/loss"] for r in rows_m], label=name)
  ax.set(xlabel="step", ylabel="training loss", title="training curves (seed 0)", yscale="log")
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  path = os.path.join(workdir, "training_curves.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  written.append(path)
  return written


def means(summary) -> dict[str, dict[str, float]]:
  return {name: {k: iv.mean for k, iv in m.items()} for name, m in summary.items()}


def render(results: dict) -> str:
  """results.md from the content of results.json."""
  per_seed = results["per_seed"]
  summary = evidence.summarize(per_seed)
  claim_rows = evidence.claims(per_seed)
  speedups = evidence.offline_speedups(results["timings_s"])
  first = next(iter(per_seed.values()))
  n_examples = next(iter(first.values())).get("num_examples", "?")
  stage = {k: float(np.sum(v)) for k, v in results["timings_s"].items()}
  text = [
    "# f-DISTILL on the built-in synthetic task",
    "",
    f"Seeds {results['seeds']} ({results['shared']}). Test split: {n_examples} inputs, "
    f"{results['eval_samples']} ancestral samples per input.",
    "",
    results_table(summary),
    "",
    NOTES,
    "",
    *capacity_table(per_seed, summary, results.get("sizes", {}), results.get("steps")),
    "## The paper's claims",
    "",
    "Verdicts are computed from the 95% t-interval of the per-seed paired difference "
    "(`fdistill_jax/evidence.py`): supported when it excludes 0 on the claimed side, "
    "contradicted when it excludes 0 on the other, not distinguishable otherwise.",
    "",
    evidence.claims_table(claim_rows, speedups),
    "",
    "Stage times (s, all seeds): " + ", ".join(f"{k} {v:.0f}" for k, v in stage.items()),
    "",
  ]
  return "\n".join(text)


def write(workdir: str, results: dict, runs: dict[str, str], make_plots: bool) -> str:
  """Writes results.json (per-seed values, summaries, claims) and results.md; returns the md."""
  summary = evidence.summarize(results["per_seed"])
  results = dict(results)
  results["models"] = means(summary)
  results["intervals"] = {
    name: {k: dataclasses.asdict(iv) for k, iv in m.items()} for name, m in summary.items()
  }
  results["claims"] = evidence.claims(results["per_seed"])
  results["runs"] = runs
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2, default=float)
  text = render(results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text)
  if make_plots:
    seed0 = {n.split("/")[0]: d for n, d in runs.items() if n.endswith("/seed0") or n == "init"}
    plots(workdir, summary, seed0)
  return text


def from_json(path: str) -> str:
  """results.md's text rebuilt from a results.json."""
  with open(path) as f:
    return render(json.load(f))

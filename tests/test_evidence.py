"""Intervals over seeds against float64 references; the claims table follows results.json."""

import json
import math
import os

import numpy as np
import pytest

from fdistill_jax import evidence, report

MODELS = ("teacher", "init", "kl", "rkl", "js", "tvd", "seqkd", "engine", "js-online", "tvd-online")


def _reference_interval(values, quantile):
  """float64 mean +- quantile * s / sqrt(n), summed with math.fsum."""
  x = [float(v) for v in values]
  n = len(x)
  mean = math.fsum(x) / n
  s = math.sqrt(math.fsum((v - mean) ** 2 for v in x) / (n - 1))
  return mean - quantile * s / math.sqrt(n), mean + quantile * s / math.sqrt(n)


def test_t_interval_matches_closed_form_quantiles():
  p = 0.975
  # Student-t quantiles in closed form: df=1 is Cauchy, df=2 has t = (2p-1)/sqrt(2p(1-p)).
  closed = {2: math.tan(math.pi * (p - 0.5)), 3: (2 * p - 1) / math.sqrt(2 * p * (1 - p))}
  rng = np.random.default_rng(0)
  for n, q in closed.items():
    values = rng.normal(70.0, 3.0, size=n).astype(np.float32)
    iv = evidence.t_interval(values)
    low, high = _reference_interval(values, q)
    assert iv.n == n
    assert iv.low == pytest.approx(low, rel=1e-12) and iv.high == pytest.approx(high, rel=1e-12)
    assert iv.mean == pytest.approx(math.fsum(map(float, values)) / n, rel=1e-12)
  one = evidence.t_interval([1.5])
  assert one.mean == 1.5 and math.isnan(one.low) and evidence.verdict(one) == evidence.UNCLEAR


def test_t_interval_covers_the_mean_95_percent_of_the_time():
  rng = np.random.default_rng(1)
  draws = rng.normal(0.3, 2.0, size=(4000, 3))
  hits = 0
  for row in draws:
    iv = evidence.t_interval(row)
    hits += iv.low <= 0.3 <= iv.high
  # Binomial(4000, 0.95): standard deviation 0.0034; 4 of them either side.
  assert abs(hits / 4000 - 0.95) < 0.014


def _per_seed(rng, shift):
  """Per-seed metrics in which KL covers more than RKL by `shift` points (noise sd 0.5)."""
  out = {}
  for name in MODELS:
    out[name] = {}
    for seed in range(3):
      out[name][str(seed)] = {
        "num_examples": 10,
        "coverage_weighted": 60.0 + rng.normal(0, 0.5),
        "precision": 80.0 + rng.normal(0, 0.5),
        "kl": 1.0 + rng.normal(0, 0.01),
        "tvd_exact": 0.3 + rng.normal(0, 0.01),
      }
  out["kl"] = {
    s: dict(m, coverage_weighted=m["coverage_weighted"] + shift) for s, m in out["kl"].items()
  }
  return out


def _verdict(md: str, claim_start: str) -> str:
  for line in md.splitlines():
    cells = [c.strip() for c in line.split("|")]
    if len(cells) > 2 and cells[1].startswith(claim_start):
      return cells[2].strip("*")
  raise AssertionError(f"no row for {claim_start!r} in\n{md}")


def test_claims_table_is_computed_from_results_json(tmp_path):
  rng = np.random.default_rng(2)
  results = {
    "seeds": [0, 1, 2],
    "shared": "test",
    "eval_samples": 2,
    "per_seed": _per_seed(rng, shift=10.0),
    "timings_s": {"distill/js": [10.0, 11.0, 9.0], "distill/js-online": [30.0, 31.0, 29.0]},
  }
  md = report.write(str(tmp_path), results, runs={}, make_plots=False)
  claim = "KL averages modes"
  # Coverage is 10 points higher, but KL(p*||q) is not lower: one comparison undecided.
  assert _verdict(md, claim) == evidence.UNCLEAR
  assert "offline speedup, js" in md and "3.0" in md
  path = os.path.join(tmp_path, "results.json")
  saved = json.load(open(path))
  assert saved["per_seed"]["kl"]["1"]["coverage_weighted"] > 65
  assert saved["claims"][0]["comparisons"][0]["verdict"] == evidence.SUPPORTED

  # Make KL's exact KL(p*||q) clearly lower too: the claim becomes supported.
  for m in saved["per_seed"]["kl"].values():
    m["kl"] -= 0.5
  json.dump(saved, open(path, "w"))
  assert _verdict(report.from_json(path), claim) == evidence.SUPPORTED
  # Reverse the coverage gap: contradicted.
  for m in saved["per_seed"]["kl"].values():
    m["coverage_weighted"] -= 20.0
  json.dump(saved, open(path, "w"))
  assert _verdict(report.from_json(path), claim) == evidence.CONTRADICTED
  # A method that was not run makes its claim undecided and says so.
  del saved["per_seed"]["tvd-online"]
  json.dump(saved, open(path, "w"))
  md = report.from_json(path)
  assert _verdict(md, "Offline teacher sampling") == evidence.UNCLEAR and "not measured" in md


def test_closer_and_margin_comparisons():
  seeds = {str(s): None for s in range(3)}
  per_seed = {
    "seqkd": {s: {"m": 10.0 + i * 0.1} for i, s in enumerate(seeds)},
    "kl": {s: {"m": 11.0 + i * 0.1} for i, s in enumerate(seeds)},
    "rkl": {s: {"m": 20.0 - i * 0.2} for i, s in enumerate(seeds)},
  }
  closer = evidence.Comparison("closer", "m", "seqkd", "kl", "rkl")
  np.testing.assert_allclose(closer.differences(per_seed), [9.0, 8.7, 8.4])
  assert evidence.verdict(evidence.t_interval(closer.differences(per_seed))) == evidence.SUPPORTED
  no_worse = evidence.Comparison("no_worse", "m", "kl", "seqkd")  # kl is 1.0 worse: > margin
  assert evidence.verdict(evidence.t_interval(no_worse.differences(per_seed))) == (
    evidence.CONTRADICTED
  )


def test_capacity_table_picks_the_best_student_and_pairs_its_gap():
  teacher = {"kl": [0.10, 0.12, 0.11], "precision": [90.0, 91.0, 92.0]}
  students = {
    "kl": {"kl": [0.40, 0.45, 0.50], "precision": [70.0, 71.0, 72.0]},
    "rkl": {"kl": [1.40, 1.50, 1.30], "precision": [80.0, 79.0, 82.0]},
  }
  per_seed = {
    name: {str(s): {k: v[s] for k, v in metrics.items()} for s in range(3)}
    for name, metrics in {"teacher": teacher, "ceiling": teacher, **students}.items()
  }
  summary = evidence.summarize(per_seed)
  lines = report.capacity_table(per_seed, summary, {"teacher": 10, "student": 5})
  rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
  # KL: lower is better, so kl is the best student; precision: rkl.
  assert "(kl)" in rows["KL(p*‖·)"] and "(rkl)" in rows["precision %"]
  gap = [b - a for a, b in zip(teacher["kl"], students["kl"]["kl"], strict=True)]
  q = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)  # t quantile, df = 2
  low, high = _reference_interval(gap, q)
  mean = math.fsum(gap) / 3
  assert rows["KL(p*‖·)"].rstrip(" |").endswith(f"{mean:.3f} [{low:.3f}, {high:.3f}]")
  assert "student ceiling" in rows["metric"]

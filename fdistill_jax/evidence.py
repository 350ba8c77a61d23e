"""Seeds as evidence: t-intervals over seeds and the paper's claims tested with them.

The main job trains every method once per seed (`pipeline.seeds`) from a
teacher, teacher records and initial student shared by all seeds, and
evaluates each model with a seed-specific sampling key. `summarize` turns the
per-seed metrics into a mean and a 95% Student-t interval per metric;
`claims` compares methods by *paired* differences over seeds (seed k of every
method shares its evaluation key, so pairing removes that noise) and derives
each verdict from the interval of the difference alone:

  supported             the whole interval is on the claimed side of 0
  contradicted          the whole interval is on the other side
  not distinguishable   the interval contains 0 (or fewer than 2 seeds)

A claim with several comparisons is supported when all are, contradicted
when any is, and not distinguishable otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats

CONFIDENCE = 0.95
SUPPORTED, CONTRADICTED, UNCLEAR = "supported", "contradicted", "not distinguishable"
# "Offline sampling costs no quality": offline may be at most this much worse
# in exact TVD(p*, q) (a probability mass) for the claim to hold.
OFFLINE_TVD_MARGIN = 0.02


@dataclasses.dataclass(frozen=True)
class Interval:
  """Mean of `n` values and the two-sided `CONFIDENCE` t-interval around it (nan if n < 2)."""

  mean: float
  low: float
  high: float
  n: int

  @property
  def half(self) -> float:
    return (self.high - self.low) / 2


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
  """mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n), in float64 whatever `values`' dtype."""
  x = np.asarray(values, np.float64).reshape(-1)
  n = int(x.size)
  if n == 0:
    return Interval(math.nan, math.nan, math.nan, 0)
  mean = float(x.mean())
  if n < 2:
    return Interval(mean, math.nan, math.nan, n)
  half = float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
  return Interval(mean, mean - half, mean + half, n)


def _numeric(value) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool)


def summarize(per_seed: Mapping[str, Mapping[str, Mapping]]) -> dict[str, dict[str, Interval]]:
  """`{model: {seed: metrics}}` -> `{model: {metric: Interval over seeds}}` (numeric metrics)."""
  out = {}
  for name, seeds in per_seed.items():
    runs = list(seeds.values())
    keys = [k for k, v in runs[0].items() if _numeric(v) and all(k in r for r in runs)]
    out[name] = {k: t_interval([r[k] for r in runs]) for k in keys}
  return out


def verdict(iv: Interval) -> str:
  """The verdict on "the difference is > 0" from its interval."""
  if not iv.low == iv.low:  # nan: fewer than 2 seeds
    return UNCLEAR
  if iv.low > 0:
    return SUPPORTED
  if iv.high < 0:
    return CONTRADICTED
  return UNCLEAR


def combine(verdicts: Sequence[str]) -> str:
  if verdicts and all(v == SUPPORTED for v in verdicts):
    return SUPPORTED
  return CONTRADICTED if CONTRADICTED in verdicts else UNCLEAR


# ---------------------------------------------------------------------------
# The claims: each comparison is a per-seed difference that the claim says is > 0.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Comparison:
  """`kind`: "greater" (a > b on metric), "less" (a < b), "closer" (a nearer b than c),
  or "no_worse" (a, lower-is-better, at most `OFFLINE_TVD_MARGIN` above b)."""

  kind: str
  metric: str
  a: str
  b: str
  c: str = ""

  def text(self) -> str:
    if self.kind == "closer":
      return f"{self.metric}: {self.a} nearer {self.b} than {self.c}"
    if self.kind == "no_worse":
      return f"{self.metric}: {self.a} <= {self.b} + {OFFLINE_TVD_MARGIN}"
    return f"{self.metric}: {self.a} {'>' if self.kind == 'greater' else '<'} {self.b}"

  def models(self) -> tuple[str, ...]:
    return tuple(m for m in (self.a, self.b, self.c) if m)

  def differences(self, per_seed: Mapping[str, Mapping[str, Mapping]]) -> list[float]:
    """Per-seed values that the claim says are > 0 (seeds every model has)."""
    seeds = sorted(set.intersection(*(set(per_seed[m]) for m in self.models())))
    out = []
    for s in seeds:
      v = {m: float(per_seed[m][s][self.metric]) for m in self.models()}
      if self.kind == "greater":
        out.append(v[self.a] - v[self.b])
      elif self.kind == "less":
        out.append(v[self.b] - v[self.a])
      elif self.kind == "closer":
        out.append(abs(v[self.a] - v[self.c]) - abs(v[self.a] - v[self.b]))
      elif self.kind == "no_worse":
        out.append(v[self.b] + OFFLINE_TVD_MARGIN - v[self.a])
      else:
        raise ValueError(f"Comparison.kind: unknown {self.kind!r}")
    return out


def _g(metric, a, b):
  return Comparison("greater", metric, a, b)


def _l(metric, a, b):
  return Comparison("less", metric, a, b)


def _closer(metric, a, b, c):
  return Comparison("closer", metric, a, b, c)


COV, PREC, KL, TVD = "coverage_weighted", "precision", "kl", "tvd_exact"
CLAIMS = (
  ("KL averages modes: it covers more of p* than RKL", (_g(COV, "kl", "rkl"), _l(KL, "kl", "rkl"))),
  ("RKL collapses onto modes: it is more precise than KL", (_g(PREC, "rkl", "kl"),)),
  (
    "JS and TVD balance the two: more precise than KL, more coverage than RKL",
    (
      _g(PREC, "js", "kl"),
      _g(COV, "js", "rkl"),
      _g(PREC, "tvd", "kl"),
      _g(COV, "tvd", "rkl"),
    ),
  ),
  (
    "JS and TVD give the best students: lower exact TVD(p*, q) than KL, RKL, SeqKD, ENGINE",
    tuple(_l(TVD, s, o) for s in ("js", "tvd") for o in ("kl", "rkl", "seqkd", "engine")),
  ),
  (
    "SeqKD approximates KL: nearer KL than RKL",
    (_closer(COV, "seqkd", "kl", "rkl"), _closer(PREC, "seqkd", "kl", "rkl")),
  ),
  (
    "ENGINE approximates RKL: nearer RKL than KL",
    (_closer(COV, "engine", "rkl", "kl"), _closer(PREC, "engine", "rkl", "kl")),
  ),
  (
    "Offline teacher sampling costs no quality (JS, TVD)",
    (
      Comparison("no_worse", TVD, "js", "js-online"),
      Comparison("no_worse", TVD, "tvd", "tvd-online"),
    ),
  ),
)


def claims(per_seed: Mapping[str, Mapping[str, Mapping]]) -> list[dict]:
  """One dict per claim: `claim`, `verdict` and its `comparisons` (text, interval, verdict).

  A comparison whose models were not all run (or lack the metric) is "not measured"
  and makes its claim not distinguishable.
  """
  out = []
  for text, comparisons in CLAIMS:
    rows = []
    for c in comparisons:
      have = all(m in per_seed and per_seed[m] for m in c.models()) and all(
        c.metric in r for m in c.models() for r in per_seed[m].values()
      )
      if not have:
        rows.append({"comparison": c.text(), "verdict": "not measured"})
        continue
      iv = t_interval(c.differences(per_seed))
      rows.append(
        {"comparison": c.text(), "interval": dataclasses.asdict(iv), "verdict": verdict(iv)}
      )
    out.append({
      "claim": text,
      "verdict": combine([r["verdict"] for r in rows]),
      "comparisons": rows,
    })  # fmt: skip
  return out


def offline_speedups(timings: Mapping[str, Sequence[float]], methods=("js", "tvd")) -> dict:
  """`{method: Interval}` of per-seed online / offline distillation wall time."""
  out = {}
  for m in methods:
    off, on = timings.get(f"distill/{m}"), timings.get(f"distill/{m}-online")
    if off and on and len(off) == len(on):
      out[m] = t_interval([b / a for a, b in zip(off, on, strict=True)])
  return out


def claims_table(claim_rows: list[dict], speedups: Mapping[str, Interval]) -> str:
  """Markdown: one row per comparison, the claim's verdict on its first row."""
  lines = ["| claim | verdict | measured (per-seed difference, 95% t-interval) | verdict |"]
  lines.append("|---|---|---|---|")
  for claim in claim_rows:
    for i, r in enumerate(claim["comparisons"]):
      iv = r.get("interval")
      cell = r["comparison"]
      if iv is not None:
        cell += f": {iv['mean']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]"
      head = (f"{claim['claim']}", f"**{claim['verdict']}**") if i == 0 else ("", "")
      lines.append(f"| {head[0]} | {head[1]} | {cell} | {r['verdict']} |")
  for m, iv in speedups.items():
    lines.append(
      f"| offline speedup, {m} (online ÷ offline wall time) | measured | "
      f"{iv.mean:.2f}x [{iv.low:.2f}, {iv.high:.2f}] | - |"
    )
  return "\n".join(lines)

"""Evaluation metrics on decoded texts, token lists and score arrays.

Quality: BLEU (and BLEU-1/2), chrF, TER with sacrebleu (corpus level, 13a,
signatures recorded), ROUGE-1/2/L with rouge-score (stemming, mean F1).
Diversity: distinct-n, TeacherDist (paper §3.2) and the repetition rate
within a reply (seq-rep-n). Risks (paper §3.2):
likelihood risk (student samples scored by the teacher) and coverage risk
(teacher samples scored by the student), per token and per sequence. On the
synthetic task, whose true distribution p* is known: precision, mode coverage
and sequence-level KL(p*||q) / RKL(q||p*).

Drafts: a student used as the draft of speculative sampling has, at each
position, acceptance probability 1 - TVD(p_teacher, q_student) (Leviathan et
al. 2023), and the expected tokens per verification step follow from it.

Scales: BLEU/chrF/TER/ROUGE, distinct-n, repetition, TeacherDist, precision
and coverage are percentages (0-100); NLLs, KL and RKL are in nats; acceptance rates are
fractions (0-1).

Training metrics are `(sum, count)` pairs (t5x style: accumulation over
micro-batches, steps and hosts is a sum, the mean is taken once):
`add_metrics`, `metric_means`, and `MetricWriter` / `read_metrics` for
`workdir/metrics.jsonl` and TensorBoard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np

# ------------------------------------------------------------------------------
# Reference-based quality.
# ------------------------------------------------------------------------------


def _ref_streams(refs) -> tuple[list, int]:
  """Per-hypothesis references -> sacrebleu's reference streams.

  `refs[i]` is a string or a list of strings (any number per hypothesis);
  missing ones become None, which sacrebleu skips.
  """
  refs = [[r] if isinstance(r, str) else list(r) for r in refs]
  if any(not r for r in refs):
    raise ValueError("every hypothesis needs at least one reference; found an empty list.")
  n = max(len(r) for r in refs)
  return [[r[k] if k < len(r) else None for r in refs] for k in range(n)], n


def sacrebleu_scores(hyps: Sequence[str], refs) -> dict:
  """Corpus BLEU, BLEU-1, BLEU-2, chrF and TER, with their sacrebleu signatures."""
  from sacrebleu.metrics import BLEU, CHRF, TER

  if len(hyps) != len(refs):
    raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference entries.")
  streams, _ = _ref_streams(refs)
  out = {}
  for key, metric in (
    ("bleu", BLEU()),
    ("bleu1", BLEU(max_ngram_order=1)),
    ("bleu2", BLEU(max_ngram_order=2)),
    ("chrf", CHRF()),
    ("ter", TER()),
  ):
    out[key] = float(metric.corpus_score(list(hyps), streams).score)
    out[f"{key}_signature"] = str(metric.get_signature())
  return out


def rouge_scores(hyps: Sequence[str], refs) -> dict:
  """Mean ROUGE-1/2/L F1 x 100 (rouge-score, Porter stemming; best reference per line).

  The original code reports the bootstrap median, which equals the mean up to
  resampling noise; the mean is deterministic.
  """
  from rouge_score import rouge_scorer

  keys = ("rouge1", "rouge2", "rougeL")
  scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
  totals = dict.fromkeys(keys, 0.0)
  for h, r in zip(hyps, refs, strict=True):
    r = [r] if isinstance(r, str) else list(r)
    s = scorer.score_multi(r, h) if len(r) > 1 else scorer.score(r[0], h)
    for k in keys:
      totals[k] += s[k].fmeasure
  n = max(len(hyps), 1)
  return {k: 100.0 * v / n for k, v in totals.items()}


# ------------------------------------------------------------------------------
# Diversity.
# ------------------------------------------------------------------------------


def _ngrams(seq, n: int):
  seq = list(seq)
  return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs, n: int) -> float:
  """Corpus distinct-n x 100: unique n-grams / all n-grams over `seqs`.

  `seqs` are token lists (words or ids); strings are split on whitespace.
  Returns 0 when there is no n-gram at all.
  """
  grams = []
  for s in seqs:
    grams += _ngrams(s.split() if isinstance(s, str) else s, n)
  return 100.0 * len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(seqs, n: int) -> float:
  """Repetition rate x 100: the share of a reply's n-grams that repeat an earlier one of it.

  Per sequence, 1 - unique n-grams / n-grams (Welleck et al. 2020's seq-rep-n),
  then the mean over the sequences that have at least one n-gram. "a a a"
  has 1-grams (a, a, a): 2 of 3 repeat, 66.7; "a b a b" has 2-grams (ab, ba,
  ab): 33.3. `seqs` are token lists or strings (split on whitespace). Returns
  nan when no sequence has an n-gram (all shorter than n).
  """
  rates = []
  for s in seqs:
    grams = _ngrams(s.split() if isinstance(s, str) else s, n)
    if grams:
      rates.append(1.0 - len(set(grams)) / len(grams))
  return 100.0 * float(np.mean(rates)) if rates else float("nan")


def teacher_dist(samples_per_input, n: int = 2) -> float:
  """TeacherDist: distinct-n x 100 within each input's samples, averaged over inputs.

  `samples_per_input[i]` is the list of (five, in the paper) teacher samples
  of input i, each a token list or a string. Inputs whose samples have no
  n-gram are skipped.
  """
  vals = []
  for samples in samples_per_input:
    grams = []
    for s in samples:
      grams += _ngrams(s.split() if isinstance(s, str) else s, n)
    if grams:
      vals.append(len(set(grams)) / len(grams))
  return 100.0 * float(np.mean(vals)) if vals else 0.0


# ------------------------------------------------------------------------------
# Risks from score arrays.
# ------------------------------------------------------------------------------


def nll_risk(token_logprobs, mask) -> dict:
  """Mean NLL of scored sequences: per token (the paper's code) and per sequence.

  Args:
    token_logprobs: `[N, T]` log-probs of each sequence's tokens under the scorer.
    mask: `[N, T]` 1 on real tokens (EOS included).

  Returns `{"per_token": mean_i(-sum_t lp / len_i), "per_sequence": mean_i(-sum_t lp)}`
  over sequences with at least one token.
  """
  lp = np.asarray(token_logprobs, np.float64)
  m = np.asarray(mask, np.float64)
  if lp.shape != m.shape:
    raise ValueError(f"token_logprobs {lp.shape} and mask {m.shape} must have one shape.")
  lengths = m.sum(-1)
  keep = lengths > 0
  seq_nll = -(lp * m).sum(-1)[keep]
  if not keep.any():
    return {"per_token": float("nan"), "per_sequence": float("nan")}
  return {
    "per_token": float(np.mean(seq_nll / lengths[keep])),
    "per_sequence": float(np.mean(seq_nll)),
  }


# ------------------------------------------------------------------------------
# Synthetic task: known true distribution p*.
# ------------------------------------------------------------------------------


def precision(outputs_per_input, modes_per_input) -> float:
  """Share (x 100) of all outputs that are valid (have p* > 0).

  `outputs_per_input[i]` is a list of output strings for input i (or one
  string); `modes_per_input[i]` maps each valid output to p*(y|x_i).
  """
  total = valid = 0
  for outs, modes in zip(outputs_per_input, modes_per_input, strict=True):
    outs = [outs] if isinstance(outs, str) else outs
    total += len(outs)
    valid += sum(o in modes for o in outs)
  return 100.0 * valid / total if total else 0.0


def mode_coverage(outputs_per_input, modes_per_input) -> dict:
  """Share of true modes produced among each input's outputs, averaged over inputs.

  `unweighted`: distinct valid modes produced / number of modes (x 100);
  `weighted`: total p* mass of the distinct modes produced (x 100).
  """
  weighted, unweighted = [], []
  for outs, modes in zip(outputs_per_input, modes_per_input, strict=True):
    outs = [outs] if isinstance(outs, str) else outs
    hit = {o for o in outs if o in modes}
    unweighted.append(len(hit) / len(modes))
    weighted.append(sum(modes[o] for o in hit))
  if not weighted:
    return {"weighted": 0.0, "unweighted": 0.0}
  return {
    "weighted": 100.0 * float(np.mean(weighted)),
    "unweighted": 100.0 * float(np.mean(unweighted)),
  }


def log_true_prob(outputs_per_input, modes_per_input, log_floor: float | None = None):
  """Per input, an `[n_i]` float64 array of log p*(y|x) of its outputs.

  Invalid outputs get `log_floor` (default -inf: the true value).
  """
  floor = -np.inf if log_floor is None else float(log_floor)
  out = []
  for outs, modes in zip(outputs_per_input, modes_per_input, strict=True):
    outs = [outs] if isinstance(outs, str) else outs
    out.append(np.asarray([np.log(modes[o]) if o in modes else floor for o in outs], np.float64))
  return out


def mc_kl(logp_at_p_samples, logq_at_p_samples) -> dict:
  """Monte Carlo KL(p||q) = E_{y~p}[log p(y) - log q(y)] from samples of p.

  Args:
    logp_at_p_samples, logq_at_p_samples: `[N]` or `[N, n]` sequence
      log-probs under p and q of samples drawn from p (for RKL(q||p*), pass
      the student's samples: `mc_kl(logq, logp_star)`).

  Returns `{"estimate", "stderr"}`: the mean of the per-sample log ratios and
  its standard error. Per-input estimates are averaged over inputs by the
  plain mean over all samples (same number of samples per input).
  """
  d = np.asarray(logp_at_p_samples, np.float64) - np.asarray(logq_at_p_samples, np.float64)
  d = d.reshape(-1)
  if d.size == 0:
    return {"estimate": float("nan"), "stderr": float("nan")}
  if not np.all(np.isfinite(d)):
    return {"estimate": float(np.inf if np.any(d == np.inf) else np.nan), "stderr": float("nan")}
  stderr = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
  return {"estimate": float(d.mean()), "stderr": stderr}


def exact_kl_from_modes(mode_probs, mode_logq) -> float:
  """KL(p*||q) averaged over inputs, exact because p* has a few known modes.

  Args:
    mode_probs: `[N, M]` p*(y_m|x_i) (rows sum to 1; 0 pads rows with fewer modes).
    mode_logq: `[N, M]` log q(y_m|x_i), the student's sequence log-prob of each mode.
  """
  p = np.asarray(mode_probs, np.float64)
  lq = np.asarray(mode_logq, np.float64)
  terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - lq), 0.0)
  return float(terms.sum(-1).mean())


def exact_mode_measures(mode_probs, mode_logq) -> dict:
  """Bounded or support-safe distances between p* and q, exact from q's log-probs of p*'s modes.

  Args:
    mode_probs: `[N, M]` p*(y_m|x_i) (rows sum to 1; 0 pads rows with fewer modes).
    mode_logq: `[N, M]` log q(y_m|x_i); entries where p* is 0 are ignored.

  Returns per-input means of
    `invalid_mass`: 100 (1 - Q), Q = sum_m q(y_m), the mass q puts off p*'s support;
    `tvd`: TVD(p*, q) = (sum_m |p*(y_m) - q(y_m)| + 1 - Q) / 2, in [0, 1];
    `rkl_valid`: KL(q_v || p*) with q_v = q / Q renormalised on p*'s support
      (>= 0; RKL(q || p*) itself is infinite whenever Q < 1).
  """
  p = np.asarray(mode_probs, np.float64)
  valid = p > 0
  lq = np.where(valid, np.asarray(mode_logq, np.float64), -np.inf)
  q = np.exp(lq)
  mass = q.sum(-1)  # [N]
  off = np.clip(1.0 - mass, 0.0, 1.0)
  tvd = 0.5 * (np.abs(np.where(valid, p - q, 0.0)).sum(-1) + off)
  qv = q / np.maximum(mass, 1e-300)[:, None]
  log_ratio = np.log(np.where(qv > 0, qv, 1.0)) - np.log(np.where(valid, p, 1.0))
  rkl_valid = np.where(qv > 0, qv * log_ratio, 0.0).sum(-1)
  return {
    "invalid_mass": 100.0 * float(off.mean()),
    "tvd": float(tvd.mean()),
    "rkl_valid": float(np.maximum(rkl_valid, 0.0).mean()),
  }


# ------------------------------------------------------------------------------
# Drafts for speculative decoding.
# ------------------------------------------------------------------------------


def acceptance_rate(acceptance, mask) -> float:
  """Mean per-token acceptance over the masked positions.

  acceptance [..., T]: 1 - TVD(p, q) at each position (in [0, 1]), mask
  [..., T] (1 on real tokens, EOS included). Every position weighs the same.
  """
  acceptance = np.asarray(acceptance, np.float64)
  mask = np.asarray(mask, np.float64)
  total = mask.sum()
  if total == 0:
    raise ValueError("acceptance_rate: the mask selects no position")
  return float((acceptance * mask).sum() / total)


def expected_tokens_per_step(alpha, gamma: int):
  """Expected tokens emitted per verification step with `gamma` drafts (Leviathan et al.).

  (1 - alpha^(gamma + 1)) / (1 - alpha) for a per-token acceptance `alpha`
  (scalar or array) taken as the same at every position: the accepted drafts
  plus the target's own token. alpha = 1 gives gamma + 1, alpha = 0 gives 1.
  """
  alpha = np.asarray(alpha, np.float64)
  below = alpha < 1.0
  safe = np.where(below, alpha, 0.0)
  return np.where(below, (1.0 - safe ** (gamma + 1)) / (1.0 - safe), gamma + 1.0)


# Training metrics: (sum, count) pairs, written as means.
# ------------------------------------------------------------------------------


def metric_means(metrics: Mapping[str, tuple]) -> dict[str, float]:
  """{name: sum / count} as Python floats (count 0 -> nan)."""
  out = {}
  for key, (total, count) in metrics.items():
    total, count = float(total), float(count)
    out[key] = total / count if count else float("nan")
  return out


def add_metrics(a: Mapping[str, tuple] | None, b: Mapping[str, tuple]) -> dict[str, tuple]:
  """Elementwise sum of two metric dicts of (sum, count) pairs."""
  if not a:
    return dict(b)
  return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in b}


class MetricWriter:
  """Scalars to `workdir/metrics.jsonl` and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        # TensorFlow only when TensorBoard is on: its start-up costs seconds.
        import tensorflow as tf

        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict, prefix: str = "train"):
    if not self.enabled:
      return
    # Keys as the TensorBoard tags ("train/loss", "eval/nll"): one row per write.
    row = {"step": int(step)}
    row.update({f"{prefix}/{k}": float(v) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      import tensorflow as tf  # loaded already by __init__
      from tensorflow.core.framework import summary_pb2

      # tf.summary.scalar needs the tensorboard package; the raw write with
      # the scalars plugin's metadata makes the same event without it.
      meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
      ).SerializeToString()
      with self._tb.as_default(step=int(step)):
        for k, v in scalars.items():
          tf.summary.write(f"{prefix}/{k}", tf.constant(float(v), tf.float32), metadata=meta)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows `MetricWriter` wrote: {"step", "train/<name>" or "eval/<name>": float}."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]

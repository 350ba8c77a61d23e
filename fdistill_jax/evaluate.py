"""Evaluate a decoder on a task split: quality, diversity, risks, and (synthetic) p* metrics.

The model side is injected as callables so this module does not depend on
how models, checkpoints and samplers are wired:

* `decode_fn(batch) -> DecodeResult-like`: `.tokens [B, n, T]` (or `[B, T]`,
  or a bare array), optional `.token_logprobs [B, n, T]` and
  `.lengths [B, n]`. Sample 0 of each input is the output scored against
  the references; all n samples count for precision / mode coverage.
* `score_fn(batch, targets [B, T] int32, target_mask [B, T] f32) -> [B, T]`
  per-token log-probs of `targets` given `batch["inputs"]` (e.g.
  `lambda b, t, m: models.score(model, b["inputs"], b["input_mask"], t, m)`).
  `teacher_score_fn` gives the likelihood risk, `student_score_fn` the
  coverage risk and, on the synthetic task, the exact KL(p*||q).
* `teacher_decode_fn(batch)`: n (the paper: 5) teacher samples per input,
  for TeacherDist and the coverage risk.
* `acceptance_fn(batch, tokens [B, T] int32, mask [B, T] f32) -> [B, T]`:
  1 - TVD(p_teacher, q_student) at each position of `tokens` (the
  probability that speculative sampling accepts the student's draft there),
  averaged over the positions of the teacher's and of the student's samples.

`evaluate_model(...)` returns a flat dict of floats (see metrics.py for
scales) plus sacrebleu signatures (model decoding is wired by the pipeline).
`run(config, workdir)`, the `--mode=evaluate` entry point, evaluates a
predictions file, or a model through `model_eval`.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from fdistill_jax import metrics, model_eval
from fdistill_jax.data import pipeline, tasks

log = logging.getLogger(__name__)


def _tokens_of(result) -> np.ndarray:
  """`[B, n, T]` int32 tokens from a DecodeResult-like or an array."""
  tokens = np.asarray(getattr(result, "tokens", result))
  if tokens.ndim == 2:
    tokens = tokens[:, None, :]
  if tokens.ndim != 3:
    raise ValueError(f"decoded tokens must be [B, T] or [B, n, T]; found shape {tokens.shape}.")
  return tokens


def sequence_mask(tokens, eos_id: int, lengths=None) -> np.ndarray:
  """`[..., T]` float32 mask: 1 up to and including the first EOS.

  Uses `lengths [...]` when given (needed when pad == EOS, as in GPT-2);
  a sequence with no EOS is masked over its whole length.
  """
  tokens = np.asarray(tokens)
  t = tokens.shape[-1]
  if lengths is not None:
    return (np.arange(t) < np.asarray(lengths)[..., None]).astype(np.float32)
  is_eos = tokens == eos_id
  first = np.where(is_eos.any(-1), is_eos.argmax(-1), t - 1)
  return (np.arange(t) <= first[..., None]).astype(np.float32)


_SOURCE_KEYS = ("inputs", "input_mask", "example_index")


def _score_flat(score_fn, batch, tokens, mask):
  """Scores `[B, n, T]` sequences with inputs repeated n times; returns `[B, n, T]`."""
  b, n, t = tokens.shape
  # Only the source side is repeated: scorers condition on it, and teacher
  # record arrays ([B, N, T, K]) would be costly to copy.
  rep = {k: np.repeat(batch[k], n, axis=0) for k in _SOURCE_KEYS if k in batch}
  lp = np.asarray(score_fn(rep, tokens.reshape(b * n, t), mask.reshape(b * n, t)), np.float64)
  return lp.reshape(b, n, t) * mask


def evaluate_model(
  task,
  split: str,
  decode_fn,
  *,
  batch_size: int,
  max_input_len: int,
  max_target_len: int,
  max_batches: int | None = None,
  teacher_score_fn=None,
  student_score_fn=None,
  teacher_decode_fn=None,
  acceptance_fn=None,
  draft_lengths=(),
  log_floor: float = float(np.log(1e-6)),
  return_outputs: bool = False,
) -> dict:
  """Decodes `split` batch by batch and returns the metrics dict.

  Keys: `num_examples`, `bleu`, `bleu1`, `bleu2`, `chrf`, `ter` (+ `_signature`),
  `rouge1/2/L`, `distinct1/2`; with `teacher_score_fn`
  `likelihood_risk_token/_seq`; with `teacher_decode_fn` `teacher_dist`, and
  with `student_score_fn` too `coverage_risk_token/_seq`. On a task with
  `modes` (the synthetic task): `precision`, `coverage_weighted`,
  `coverage_unweighted`, `kl` (exact KL(p*||q), needs `student_score_fn`; so do
  the exact `tvd_exact` TVD(p*, q), `rkl_valid` KL(q_v||p*) of q renormalised on
  p*'s support and `invalid_mass`, see `metrics.exact_mode_measures`) and
  `rkl` / `rkl_stderr` (Monte Carlo RKL(q||p*) from the student samples'
  `token_logprobs`; valid for pure ancestral sampling; invalid outputs get
  log p* = `log_floor`, since the true RKL is infinite once q puts mass
  outside p*'s support; `precision` says how often that happened).
  With `acceptance_fn`: `acceptance_student` (over the student samples'
  positions) and, with `teacher_decode_fn`, `acceptance_teacher` (over the
  teacher samples', the prefixes speculative sampling actually visits) and
  `tokens_per_step_gamma<g>` for each g in `draft_lengths` (Leviathan et al.'s
  expected tokens per verification step at alpha = `acceptance_teacher`).
  With `return_outputs`, `outputs` lists per-example dicts.
  """
  tok = task.tokenizer
  has_modes = hasattr(task, "modes")
  examples = {e["example_index"]: e for e in task.examples(split)}
  hyps, refs, samples_text, first_tokens = [], [], [], []
  modes_list, logq_samples = [], []
  llh, cvg = [], []
  kl_probs, kl_logq = [], []
  teacher_token_samples = []
  accept = {"student": [], "teacher": []}  # (acceptance [N, T], mask [N, T]) per batch
  outputs = []

  for bi, batch in enumerate(
    pipeline.batches(task, split, batch_size, max_input_len, max_target_len)
  ):
    if max_batches is not None and bi >= max_batches:
      break
    keep = batch["example_index"] >= 0
    result = decode_fn(batch)
    tokens = _tokens_of(result)
    lengths = getattr(result, "lengths", None)
    smask = sequence_mask(tokens, tok.eos_id, lengths)
    for i in np.nonzero(keep)[0]:
      ex = examples[int(batch["example_index"][i])]
      texts = [tok.decode(s) for s in tokens[i]]
      hyps.append(texts[0])
      refs.append(ex["references"])
      samples_text.append(texts)
      first_tokens.append([int(x) for x, m in zip(tokens[i, 0], smask[i, 0], strict=True) if m])
      if has_modes:
        modes_list.append(task.modes(ex["source_text"]))
      if return_outputs:
        outputs.append(
          {
            "example_index": int(ex["example_index"]),
            "source": ex["source_text"],
            "references": ex["references"],
            "outputs": texts,
          }
        )
    tlp = getattr(result, "token_logprobs", None)
    if tlp is not None:
      lq = (np.asarray(tlp, np.float64) * smask).sum(-1)  # [B, n]
      logq_samples += list(lq[keep])

    if acceptance_fn is not None:
      a = _score_flat(acceptance_fn, batch, tokens, smask)
      accept["student"].append((a[keep], smask[keep]))

    if teacher_score_fn is not None:
      first = tokens[:, :1]
      lp = _score_flat(teacher_score_fn, batch, first, smask[:, :1])
      llh.append((lp[keep, 0], smask[keep, 0]))

    if teacher_decode_fn is not None:
      t_res = teacher_decode_fn(batch)
      t_tok = _tokens_of(t_res)
      t_mask = sequence_mask(t_tok, tok.eos_id, getattr(t_res, "lengths", None))
      for i in np.nonzero(keep)[0]:
        teacher_token_samples.append(
          [
            [int(x) for x, m in zip(s, sm, strict=True) if m]
            for s, sm in zip(t_tok[i], t_mask[i], strict=True)
          ]
        )
      if acceptance_fn is not None:
        a = _score_flat(acceptance_fn, batch, t_tok, t_mask)
        accept["teacher"].append((a[keep], t_mask[keep]))
      if student_score_fn is not None:
        lp = _score_flat(student_score_fn, batch, t_tok, t_mask)
        cvg.append((lp[keep].reshape(-1, lp.shape[-1]), t_mask[keep].reshape(-1, lp.shape[-1])))

    if has_modes and student_score_fn is not None:
      batch_modes = [
        task.modes(examples[int(j)]["source_text"]) if j >= 0 else None
        for j in batch["example_index"]
      ]
      m = max(len(md) for md in batch_modes if md is not None)
      mode_tok = np.full((len(batch_modes), m, max_target_len), tok.pad_id, np.int32)
      mode_p = np.zeros((len(batch_modes), m))
      for i, md in enumerate(batch_modes):
        for k, (text, p) in enumerate((md or {}).items()):
          ids = tok.encode(text)[: max_target_len - 1] + [tok.eos_id]
          mode_tok[i, k, : len(ids)] = ids
          mode_p[i, k] = p
      mode_mask = sequence_mask(mode_tok, tok.eos_id)
      lp = _score_flat(student_score_fn, batch, mode_tok, mode_mask).sum(-1)  # [B, M]
      kl_probs.append(mode_p[keep])
      kl_logq.append(lp[keep])

  out = {"num_examples": len(hyps)}
  if not hyps:
    return out
  out.update(metrics.sacrebleu_scores(hyps, refs))
  out.update(metrics.rouge_scores(hyps, refs))
  out["distinct1"] = metrics.distinct_n(hyps, 1)
  out["distinct2"] = metrics.distinct_n(hyps, 2)
  out["mean_length"] = float(np.mean([len(t) for t in first_tokens]))
  if llh:
    r = metrics.nll_risk(np.concatenate([a for a, _ in llh]), np.concatenate([m for _, m in llh]))
    out["likelihood_risk_token"], out["likelihood_risk_seq"] = r["per_token"], r["per_sequence"]
  if teacher_token_samples:
    out["teacher_dist"] = metrics.teacher_dist(teacher_token_samples)
  if cvg:
    r = metrics.nll_risk(np.concatenate([a for a, _ in cvg]), np.concatenate([m for _, m in cvg]))
    out["coverage_risk_token"], out["coverage_risk_seq"] = r["per_token"], r["per_sequence"]
  for side, parts in accept.items():
    if parts:
      out[f"acceptance_{side}"] = metrics.acceptance_rate(
        np.concatenate([a.reshape(-1, a.shape[-1]) for a, _ in parts]),
        np.concatenate([m.reshape(-1, m.shape[-1]) for _, m in parts]),
      )
  if "acceptance_teacher" in out:
    for g in draft_lengths:
      out[f"tokens_per_step_gamma{g}"] = float(
        metrics.expected_tokens_per_step(out["acceptance_teacher"], g)
      )
  if has_modes:
    out["precision"] = metrics.precision(samples_text, modes_list)
    cov = metrics.mode_coverage(samples_text, modes_list)
    out["coverage_weighted"], out["coverage_unweighted"] = cov["weighted"], cov["unweighted"]
    if kl_probs:
      probs, logq = np.concatenate(kl_probs), np.concatenate(kl_logq)
      out["kl"] = metrics.exact_kl_from_modes(probs, logq)
      exact = metrics.exact_mode_measures(probs, logq)
      out["tvd_exact"], out["rkl_valid"] = exact["tvd"], exact["rkl_valid"]
      out["invalid_mass"] = exact["invalid_mass"]
    if logq_samples:
      logp = metrics.log_true_prob(samples_text, modes_list, log_floor)
      r = metrics.mc_kl(np.concatenate(logq_samples), np.concatenate(logp))
      out["rkl"], out["rkl_stderr"] = r["estimate"], r["stderr"]
  if return_outputs:
    out["outputs"] = outputs
  return out


def evaluate_texts(task, split: str, predictions) -> dict:
  """Metrics of given output texts (one string, or a list of samples, per example in order)."""
  examples = list(task.examples(split))
  if len(predictions) != len(examples):
    raise ValueError(
      f"Task {task.name!r} split {split!r} has {len(examples)} examples; found "
      f"{len(predictions)} predictions."
    )
  samples = [[p] if isinstance(p, str) else list(p) for p in predictions]
  hyps = [s[0] for s in samples]
  refs = [e["references"] for e in examples]
  out = {"num_examples": len(hyps)}
  out.update(metrics.sacrebleu_scores(hyps, refs))
  out.update(metrics.rouge_scores(hyps, refs))
  out["distinct1"] = metrics.distinct_n(hyps, 1)
  out["distinct2"] = metrics.distinct_n(hyps, 2)
  if hasattr(task, "modes"):
    modes = [task.modes(e["source_text"]) for e in examples]
    out["precision"] = metrics.precision(samples, modes)
    cov = metrics.mode_coverage(samples, modes)
    out["coverage_weighted"], out["coverage_unweighted"] = cov["weighted"], cov["unweighted"]
  return out


def run(config, workdir: str):
  """`--mode=evaluate`: metrics of a model (`model_eval.run`) or of a predictions file.

  A config with a `generate` section (configs/generate.py) evaluates its
  model, unless `config.evaluate.predictions` names a file. A predictions
  file (a JSONL file of `{"outputs": [str, ...]}` or `{"output": str}` per
  example, in the split's order; default `<workdir>/predictions_<split>.jsonl`)
  is scored on `config.evaluate.split` (default `test`) of `config.task`, and
  `metrics_<split>.json` is written to the workdir.
  """
  ev = config.get("evaluate", None) or {}
  if "generate" in config and not ev.get("predictions", None):
    return model_eval.run(config, workdir)
  split = ev.get("split", "test") or "test"
  path = ev.get("predictions", None) or os.path.join(workdir, f"predictions_{split}.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"--mode=evaluate: expected a predictions file at {path!r}; found nothing there."
    )
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  preds = [r["outputs"] if "outputs" in r else r["output"] for r in rows]
  result = evaluate_texts(tasks.get_task(config.task), split, preds)
  os.makedirs(workdir, exist_ok=True)
  out_path = os.path.join(workdir, f"metrics_{split}.json")
  with open(out_path, "w") as f:
    json.dump(result, f, indent=2)
  log.info("Wrote %s: %s", out_path, result)
  return result

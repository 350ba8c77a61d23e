"""Metrics against hand-computed values and the reference libraries; evaluate_model end to end."""

import itertools
import json
import math
import types

import ml_collections
import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from fdistill_jax import evaluate, metrics
from fdistill_jax.data import tasks

HYPS = ["the cat sat on the mat .", "a dog ran fast", "hello world"]
REFS = ["the cat sat on a mat .", "the dog ran very fast", "hello there world"]


def test_sacrebleu_matches_library_and_hand_values():
  got = metrics.sacrebleu_scores(HYPS, REFS)
  assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
  assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
  assert got["ter"] == pytest.approx(sacrebleu.corpus_ter(HYPS, [REFS]).score)
  assert "tok:13a" in got["bleu_signature"] and "version:" in got["bleu_signature"]
  # BLEU-1 by hand: hyp "a b c d" vs ref "a b x y": clipped unigram precision 2/4,
  # equal lengths so no brevity penalty.
  assert metrics.sacrebleu_scores(["a b c d"], ["a b x y"])["bleu1"] == pytest.approx(50.0)
  # BLEU-2 by hand: p1 = 3/4, p2 = 1/3 ("a b" of "a b","b c","c d") -> sqrt(1/4).
  assert metrics.sacrebleu_scores(["a b c d"], ["a b x d"])["bleu2"] == pytest.approx(50.0)
  assert metrics.sacrebleu_scores(HYPS, REFS)["ter"] > 0
  assert metrics.sacrebleu_scores(REFS, REFS)["bleu"] == pytest.approx(100.0)


def test_variable_multi_reference():
  refs = [["the cat sat on a mat .", "the cat sat on the mat ."], ["the dog ran very fast"]]
  got = metrics.sacrebleu_scores(HYPS[:2], refs)
  want = sacrebleu.corpus_bleu(HYPS[:2], [[r[0] for r in refs], [refs[0][1], None]]).score
  assert got["bleu"] == pytest.approx(want)
  single = metrics.sacrebleu_scores(HYPS[:2], [r[0] for r in refs])["bleu"]
  assert got["bleu"] > single  # the second reference matches the first hypothesis exactly


def test_rouge_matches_library_and_hand_values():
  got = metrics.rouge_scores(HYPS, REFS)
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  for k in ("rouge1", "rouge2", "rougeL"):
    want = np.mean([scorer.score(r, h)[k].fmeasure for h, r in zip(HYPS, REFS, strict=True)])
    assert got[k] == pytest.approx(100 * want)
  # By hand: hyp "the cat" vs ref "the cat sat": P = 1, R = 2/3, F1 = 0.8;
  # stemming makes "cats" match "cat".
  assert metrics.rouge_scores(["the cats"], ["the cat sat"])["rouge1"] == pytest.approx(80.0)
  assert metrics.rouge_scores(["the cat"], [["x y", "the cat"]])["rouge1"] == pytest.approx(100.0)


def test_distinct_and_teacher_dist_by_hand():
  assert metrics.distinct_n(["a b a b"], 1) == pytest.approx(50.0)
  assert metrics.distinct_n(["a b a b"], 2) == pytest.approx(200 / 3)
  assert metrics.distinct_n([[1, 2], [1, 2]], 2) == pytest.approx(50.0)
  assert metrics.distinct_n(["a"], 2) == 0.0
  # input 1: bigrams ab, bc, ab, bd -> 3/4; input 2: xy, xy -> 1/2; mean 62.5.
  samples = [["a b c", "a b d"], [[7, 8], [7, 8]]]
  assert metrics.teacher_dist(samples) == pytest.approx(62.5)


def test_nll_risk_by_hand():
  lp = np.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0], [0.0, 0.0, 0.0]])
  mask = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], np.float32)
  r = metrics.nll_risk(lp, mask)
  assert r["per_token"] == pytest.approx((6 / 3 + 1 / 2) / 2)
  assert r["per_sequence"] == pytest.approx((6 + 1) / 2)


def test_precision_and_mode_coverage_by_hand():
  modes = [{"a": 0.6, "b": 0.3, "c": 0.1}, {"x": 0.9, "y": 0.1}]
  outs = [["a", "a", "c", "junk"], ["y"]]
  assert metrics.precision(outs, modes) == pytest.approx(100 * 4 / 5)
  cov = metrics.mode_coverage(outs, modes)
  assert cov["unweighted"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
  assert cov["weighted"] == pytest.approx(100 * (0.7 + 0.1) / 2)
  lp = metrics.log_true_prob(outs, modes, log_floor=-20.0)
  np.testing.assert_allclose(lp[0], np.log([0.6, 0.6, 0.1]).tolist() + [-20.0])
  np.testing.assert_allclose(lp[1], np.log([0.1]))


def _enumerable(seed):
  """Two distributions over all sequences of length 1-3 on a 3-symbol alphabet."""
  seqs = [s for n in (1, 2, 3) for s in itertools.product(range(3), repeat=n)]
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.ones(len(seqs)) * 0.7)
  q = rng.dirichlet(np.ones(len(seqs)) * 0.7)
  return seqs, p, q


def test_monte_carlo_kl_converges_to_exact():
  _, p, q = _enumerable(0)
  exact_kl = float(np.sum(p * (np.log(p) - np.log(q))))
  exact_rkl = float(np.sum(q * (np.log(q) - np.log(p))))
  rng = np.random.default_rng(1)
  for exact, a, b in ((exact_kl, p, q), (exact_rkl, q, p)):
    ests = []
    for n in (1_000, 200_000):
      idx = rng.choice(len(a), size=n, p=a)
      r = metrics.mc_kl(np.log(a[idx]), np.log(b[idx]))
      assert abs(r["estimate"] - exact) < 5 * r["stderr"]
      ests.append(abs(r["estimate"] - exact))
    assert ests[1] < 0.02 * max(exact, 1.0)
  # exact_kl_from_modes is the same sum.
  got = metrics.exact_kl_from_modes(p[None], np.log(q)[None])
  assert got == pytest.approx(exact_kl)
  # An output outside p's support makes the true RKL infinite.
  assert metrics.mc_kl([0.0], [-np.inf])["estimate"] == math.inf


def test_exact_mode_measures_match_enumeration_with_invalid_outcomes():
  # Two inputs over a 6-outcome space; p* puts mass on the first 3 (input 0)
  # or 2 (input 1) outcomes, q on all 6: the rest is invalid mass.
  rng = np.random.default_rng(3)
  p_full = np.zeros((2, 6))
  p_full[0, :3] = rng.dirichlet(np.ones(3))
  p_full[1, :2] = rng.dirichlet(np.ones(2))
  q_full = rng.dirichlet(np.ones(6), size=2)
  ref_tvd, ref_off, ref_rkl = [], [], []
  for i in range(2):
    ref_tvd.append(0.5 * sum(abs(p_full[i, k] - q_full[i, k]) for k in range(6)))
    support = [k for k in range(6) if p_full[i, k] > 0]
    mass = sum(q_full[i, k] for k in support)
    ref_off.append(1.0 - mass)
    ref_rkl.append(
      sum(q_full[i, k] / mass * math.log(q_full[i, k] / mass / p_full[i, k]) for k in support)
    )
  # The metric sees only the modes (3 columns, zero-padded), as the evaluator does.
  modes_p = p_full[:, :3]
  modes_logq = np.log(q_full[:, :3]).astype(np.float32)
  modes_logq[1, 2] = 0.0  # a padded entry's score must be ignored
  got = metrics.exact_mode_measures(modes_p, modes_logq)
  assert got["tvd"] == pytest.approx(np.mean(ref_tvd), rel=1e-6)
  assert got["invalid_mass"] == pytest.approx(100 * np.mean(ref_off), rel=1e-6)
  assert got["rkl_valid"] == pytest.approx(np.mean(ref_rkl), rel=1e-5)
  same = metrics.exact_mode_measures(p_full[:1, :3], np.log(p_full[:1, :3]))
  assert same["tvd"] == pytest.approx(0.0, abs=1e-12) and same["rkl_valid"] == pytest.approx(0.0)


# ------------------------------------------------------------------------------
# evaluate_model on the synthetic task with scripted decoders and scorers.
# ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
  cfg = ml_collections.ConfigDict(
    dict(
      name="syn",
      kind="synthetic",
      data_dir=str(tmp_path_factory.mktemp("tfds")),
      num_names=4,
      num_foods=3,
      num_areas=2,
      num_prices=2,
      num_templates=3,
    )
  )
  return cfg, tasks.get_task(cfg)


def _mode_texts(task, batch):
  tok = task.tokenizer
  return [list(task.modes(tok.decode(row))) for row in batch["inputs"]]


def _encode_rows(task, texts, length):
  tok = task.tokenizer
  out = np.zeros((len(texts), length), np.int32)
  for i, t in enumerate(texts):
    ids = tok.encode(t) + [tok.eos_id]
    out[i, : len(ids)] = ids
  return out


def test_evaluate_model_synthetic(syn):
  _, task = syn
  tok = task.tokenizer
  T = 24
  p0 = float(task.spec.probs[0])

  def decode_fn(batch):  # always the most likely mode, claimed log q = log 0.5
    toks = _encode_rows(task, [m[0] for m in _mode_texts(task, batch)], T)
    mask = evaluate.sequence_mask(toks, tok.eos_id)
    lp = mask * (math.log(0.5) / mask.sum(-1, keepdims=True))
    return types.SimpleNamespace(tokens=toks[:, None], token_logprobs=lp[:, None])

  def teacher_decode_fn(batch):  # every mode once
    return np.stack([_encode_rows(task, m, T) for m in _mode_texts(task, batch)])

  def minus_one_per_token(batch, targets, mask):
    assert targets.shape[0] == batch["inputs"].shape[0]
    return -np.asarray(mask, np.float64)

  res = evaluate.evaluate_model(
    task,
    "test",
    decode_fn,
    batch_size=5,
    max_input_len=20,
    max_target_len=T,
    teacher_score_fn=minus_one_per_token,
    student_score_fn=minus_one_per_token,
    teacher_decode_fn=teacher_decode_fn,
    return_outputs=True,
  )
  exs = list(task.examples("test"))
  assert res["num_examples"] == len(exs)
  assert res["precision"] == pytest.approx(100.0)
  assert res["coverage_unweighted"] == pytest.approx(100 / 3)
  assert res["coverage_weighted"] == pytest.approx(100 * p0)
  assert res["rkl"] == pytest.approx(math.log(0.5 / p0))
  assert res["likelihood_risk_token"] == pytest.approx(1.0)
  modes = [task.modes(e["source_text"]) for e in exs]
  lens0 = [len(tok.encode(next(iter(m)))) + 1 for m in modes]
  assert res["likelihood_risk_seq"] == pytest.approx(np.mean(lens0))
  # KL(p*||q) with log q(y) = -len(y): sum_y p (log p + len y), averaged.
  want_kl = np.mean(
    [sum(p * (math.log(p) + len(tok.encode(y)) + 1) for y, p in m.items()) for m in modes]
  )
  assert res["kl"] == pytest.approx(want_kl)
  all_lens = [len(tok.encode(y)) + 1 for m in modes for y in m]
  assert res["coverage_risk_seq"] == pytest.approx(np.mean(all_lens))
  assert res["coverage_risk_token"] == pytest.approx(1.0)
  # TeacherDist over token ids of each input's three modes.
  want_td = metrics.teacher_dist([[tok.encode(y) + [tok.eos_id] for y in m] for m in modes])
  assert res["teacher_dist"] == pytest.approx(want_td)
  hyps = [o["outputs"][0] for o in res["outputs"]]
  want_bleu = sacrebleu.corpus_bleu(hyps, [[e["target_text"] for e in exs]]).score
  assert res["bleu"] == pytest.approx(want_bleu)


def test_evaluate_texts_and_run(syn, tmp_path):
  cfg, task = syn
  exs = list(task.examples("validation"))
  preds = [[e["target_text"], "not valid"] for e in exs]
  res = evaluate.evaluate_texts(task, "validation", preds)
  assert res["bleu"] == pytest.approx(100.0)
  assert res["precision"] == pytest.approx(50.0)
  path = tmp_path / "preds.jsonl"
  path.write_text("\n".join(json.dumps({"outputs": p}) for p in preds) + "\n")
  config = ml_collections.ConfigDict(
    {"task": cfg.to_dict(), "evaluate": {"split": "validation", "predictions": str(path)}}
  )
  out = evaluate.run(config, str(tmp_path / "work"))
  saved = json.loads((tmp_path / "work" / "metrics_validation.json").read_text())
  assert saved["precision"] == out["precision"] == pytest.approx(50.0)
  with pytest.raises(ValueError, match="found 1 predictions"):
    evaluate.evaluate_texts(task, "validation", ["x"])


def test_sequence_mask_uses_lengths_when_pad_is_eos():
  toks = np.array([[5, 6, 0, 0], [5, 0, 0, 0]])
  np.testing.assert_array_equal(
    evaluate.sequence_mask(toks, eos_id=0, lengths=np.array([3, 1])),
    [[1, 1, 1, 0], [1, 0, 0, 0]],
  )
  np.testing.assert_array_equal(
    evaluate.sequence_mask(np.array([[4, 1, 0], [4, 4, 4]]), eos_id=1), [[1, 1, 0], [1, 1, 1]]
  )

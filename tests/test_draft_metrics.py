"""A student rated as a speculative draft: acceptance 1 - TVD and tokens per step."""

import math

import ml_collections
import numpy as np
import pytest

from fdistill_jax import evaluate, evidence, metrics, models, pipeline, report
from fdistill_jax.data import tasks


def test_acceptance_rate_and_tokens_per_step_by_hand():
  acceptance = np.array([[0.5, 0.25, 0.9], [1.0, 0.0, 0.3]])
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  assert metrics.acceptance_rate(acceptance, mask) == pytest.approx((0.5 + 0.25 + 1.0) / 3)
  with pytest.raises(ValueError, match="selects no position"):
    metrics.acceptance_rate(acceptance, np.zeros_like(mask))
  # Expected tokens per step = sum_{k=0}^{gamma} alpha^k (draft k+1 is reached w.p. alpha^k).
  for alpha in (0.0, 0.3, 0.8, 0.999, 1.0):
    for gamma in (1, 2, 4, 8):
      want = sum(alpha**k for k in range(gamma + 1))
      assert metrics.expected_tokens_per_step(alpha, gamma) == pytest.approx(want, rel=1e-9)


def test_acceptor_is_one_minus_tvd_of_the_two_models():
  """pipeline's jitted acceptance against a float64 numpy sum_v min(p_v, q_v)."""
  teacher = models.build_model(models.get_preset("t5-tiny"), 0)
  student = models.build_model(models.get_preset("t5-tiny", num_layers=1), 1)
  rng = np.random.default_rng(0)
  batch = {
    "inputs": rng.integers(2, 64, (3, 5)).astype(np.int32),
    "input_mask": np.ones((3, 5), np.float32),
  }
  tokens = rng.integers(2, 64, (3, 4)).astype(np.int32)
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], np.float32)
  got = np.asarray(pipeline._acceptor(teacher, student)(batch, tokens, mask))

  def probs(model):
    logits = models.forward(model, batch["inputs"], batch["input_mask"], tokens).logits
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  want = np.minimum(probs(teacher), probs(student)).sum(-1) * mask
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.all(want[mask > 0] < 0.999)  # different models: some mass is rejected


@pytest.fixture(scope="module")
def task(tmp_path_factory):
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
      max_examples=12,
    )
  )
  return tasks.get_task(cfg)


def test_evaluate_model_averages_acceptance_over_both_sides(task):
  """A scripted acceptance (token id mod 4 / 4) averaged over the right positions."""
  t_len, eos = 10, task.tokenizer.eos_id
  rng = np.random.default_rng(1)
  seen = {"student": [], "teacher": []}

  def rows(batch, n, side):
    toks = rng.integers(eos + 1, task.tokenizer.vocab_size, (len(batch["inputs"]), n, t_len))
    cut = rng.integers(1, t_len, toks.shape[:2])  # EOS at a random position of each row
    toks[np.arange(t_len) > cut[..., None]] = task.tokenizer.pad_id
    np.put_along_axis(toks, cut[..., None], eos, axis=-1)
    keep = batch["example_index"] >= 0
    seen[side].append((toks[keep], evaluate.sequence_mask(toks[keep], eos)))
    return toks.astype(np.int32)

  def acceptance_fn(batch, tokens, mask):
    assert tokens.shape[0] == batch["inputs"].shape[0]
    return (tokens % 4) / 4.0 * mask

  res = evaluate.evaluate_model(
    task,
    "test",
    lambda b: rows(b, 2, "student"),
    batch_size=5,
    max_input_len=20,
    max_target_len=t_len,
    teacher_decode_fn=lambda b: rows(b, 3, "teacher"),
    acceptance_fn=acceptance_fn,
    draft_lengths=(2, 4),
  )
  for side in ("student", "teacher"):
    toks = np.concatenate([t.reshape(-1, t_len) for t, _ in seen[side]])
    mask = np.concatenate([m.reshape(-1, t_len) for _, m in seen[side]])
    want = ((toks % 4) / 4.0 * mask).sum() / mask.sum()
    assert res[f"acceptance_{side}"] == pytest.approx(want), side
  alpha = res["acceptance_teacher"]
  assert res["tokens_per_step_gamma2"] == pytest.approx(1 + alpha + alpha**2)
  assert res["tokens_per_step_gamma4"] == pytest.approx(sum(alpha**k for k in range(5)))
  # Without an acceptance_fn (the teacher itself) nothing is reported.
  plain = evaluate.evaluate_model(
    task,
    "test",
    lambda b: rows(b, 1, "student"),
    batch_size=5,
    max_input_len=20,
    max_target_len=t_len,
  )
  assert not any(k.startswith(("acceptance", "tokens_per_step")) for k in plain)


def test_results_table_has_the_acceptance_column():
  def one(v):  # a single evaluation: the table shows the mean alone
    return evidence.Interval(v, math.nan, math.nan, 1)

  table = report.results_table(
    {"teacher": {"bleu": one(1.0)}, "tvd": {"acceptance_teacher": one(0.8126)}}
  )
  header, _, teacher_row, tvd_row = table.splitlines()
  assert "draft accept" in header
  assert tvd_row.split("|")[-2].strip() == "0.813"
  assert teacher_row.split("|")[-2].strip() == "-"

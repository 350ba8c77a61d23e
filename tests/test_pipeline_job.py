"""The main job end to end, at toy size: every stage runs and the report is written."""

import json
import os

import jax
import numpy as np
import pytest

from configs import default
from fdistill_jax import decoding, models, pipeline
from tests import _train_helpers as h


@pytest.mark.slow
def test_main_job_writes_table_json_and_plots(tmp_path):
  config = default.get_config()
  # What is checked (every stage runs, the report is written, a rerun reuses
  # it) does not depend on how well the models learn: a few steps of 16-wide
  # models on 16-row batches, not the job's 64-wide ones on 32 rows. Nor on
  # the teacher being the larger model: teacher and student are both the
  # job's 1+1-layer student, so that each evaluation program (sampling,
  # scoring, greedy decoding) and the MLE step of teacher and ceiling compile
  # once for both. The student still starts from a copy of a teacher layer.
  for model in (config.teacher.model, config.student.model):
    model.update(d_model=16, d_ff=32, num_heads=2, num_layers=1, num_encoder_layers=1)
  config.student.init.update(encoder_layers=(0,), decoder_layers=(0,))
  config.objective.layer_map = (0,)
  p = config.pipeline
  p.teacher_steps, p.init_steps, p.distill_steps = 4, 4, 4
  p.teacher_batch_size = config.train.batch_size = 16
  # seqkd (no online sampling) keeps the test cheap; the ceiling is 4 MLE steps.
  p.methods, p.ceiling_steps = ("kl", "seqkd"), 4
  p.seeds, p.online_methods = (0, 1), ()
  p.eval_samples = 2
  config.train.checkpoint_every_steps = 1000
  # The session's XLA cache (tests/conftest.py) keeps every program; the job's
  # own cache settings would stop caching those under 0.5 s, and the second
  # seed would compile again all that the first one did.
  p.compilation_cache = False
  config.train.progress_bar = False
  config.task.max_examples = 64  # every split cut to 64 examples
  workdir = str(tmp_path)
  rows = pipeline.run(config, workdir)
  assert set(rows) == {"teacher", "init", "ceiling", "kl", "seqkd"}
  for name, m in rows.items():
    assert m["num_examples"] > 0, name
    for key in ("bleu", "precision", "coverage_weighted", "kl", "likelihood_risk_token"):
      assert key in m, (name, key)
    assert 0.0 <= m["precision"] <= 100.0
    # Students are rated as speculative drafts for the teacher; the teacher is not.
    assert ("acceptance_teacher" in m) == (name != "teacher"), name
    if name != "teacher":
      assert 0.0 < m["acceptance_teacher"] <= 1.0 and 0.0 < m["acceptance_student"] <= 1.0
      assert 1.0 <= m["tokens_per_step_gamma4"] <= 5.0
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert set(saved["models"]) == set(rows)
  # Per-seed values are kept and the means are theirs.
  assert set(saved["per_seed"]["kl"]) == {"0", "1"}
  seeds_kl = [saved["per_seed"]["kl"][s]["precision"] for s in ("0", "1")]
  assert rows["kl"]["precision"] == np.mean(seeds_kl)
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| seqkd |" in table and "coverage" in table and "draft accept" in table
  assert "## Capacity gap" in table and "student ceiling" in table
  assert "The paper's claims" in table and "KL averages modes" in table
  for png in ("frontier.png", "training_curves.png"):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000
  # A second run finds every stage finished and reuses the stored evaluations.
  again = pipeline.run(config, workdir)
  assert again == json.loads(json.dumps(rows))


def test_evaluation_seeds_share_one_compiled_sampler():
  """Each evaluation seed samples its own keys, from one compiled sampler (the seed is traced)."""
  model = models.build_model(h.model_config(), rngs=0)
  sampler = decoding.make_model_sampler("sample", max_len=5)
  rng = np.random.default_rng(0)
  batch = {
    "inputs": rng.integers(3, h.V, (4, 6)).astype(np.int32),
    "input_mask": np.ones((4, 6), np.float32),
    "example_index": np.array([0, 1, 2, -1], np.int32),  # -1: a padding row
  }
  before = pipeline._decode._cache_size()
  out = {seed: pipeline._decoder(model, sampler, seed)(batch) for seed in (3, 1003)}
  assert pipeline._decode._cache_size() == before + 1
  for seed, got in out.items():  # the keys a static seed gives, row by row
    keys = decoding.example_keys(jax.random.key(seed), np.maximum(batch["example_index"], 0))
    want = sampler(model, batch["inputs"], batch["input_mask"], keys)
    np.testing.assert_array_equal(got.tokens, np.asarray(want.tokens))
  assert not np.array_equal(out[3].tokens, out[1003].tokens)

"""Sampled teacher caches: tail draws, records, manifests, old records, form checks."""

import dataclasses
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill_jax import models, objectives, optimizer, sharding, train_step
from fdistill_jax import records as rec
from fdistill_jax import sampled_divergences as SD
from fdistill_jax.data import reader as reader_lib
from tests import _train_helpers as h
from tests.test_teacher_pass import PASS, run_pass, tiny_teacher

STRATIFIED = dataclasses.replace(
  PASS, cache_form="topk+sampled", num_tail_samples=3, proposal_temperature=2.0
)


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("k,temperature", [(0, 1.0), (3, 1.0), (3, 2.0)])
def test_tail_draws_follow_the_proposal(k, temperature):
  rng = np.random.default_rng(0)
  logp = _log_softmax64(rng.normal(size=(2, 10)) * 1.5)
  ids = np.argsort(-logp, -1)[:, :k]
  draws = 20000
  got_ids, got_lp, got_log_r = SD.draw_tail_samples(
    jnp.asarray(logp, jnp.float32), jnp.asarray(ids, jnp.int32), jax.random.key(1), draws,
    temperature,
  )  # fmt: skip
  got_ids = np.asarray(got_ids)
  assert got_ids.shape == (2, draws)
  # The proposal, independently in float64: p^(1/T) outside the top-k, renormalised.
  in_tail = np.ones(logp.shape, bool)
  np.put_along_axis(in_tail, ids, False, -1)
  r = np.where(in_tail, np.exp(logp / temperature), 0.0)
  r /= r.sum(-1, keepdims=True)
  counts = np.stack([np.bincount(row, minlength=10) for row in got_ids]) / draws
  assert np.all(counts[~in_tail] == 0)  # never a top-k id
  z = statistics.NormalDist().inv_cdf(1 - 1e-3 / (2 * r.size))
  se = np.sqrt(r * (1 - r) / draws)
  assert np.all(np.abs(counts - r) <= z * se + 1e-12)
  rows = np.arange(2)[:, None]
  np.testing.assert_allclose(got_lp, logp[rows, got_ids], atol=1e-6)
  np.testing.assert_allclose(got_log_r, np.log(r[rows, got_ids]), atol=1e-5)


def _read_all(directory, **kwargs):
  reader = reader_lib.RecordReader(
    str(directory), batch_size=10, shuffle=False, num_epochs=1, **kwargs
  )
  (batch,) = list(reader)
  order = np.argsort(batch["example_index"])
  return {key: value[order] for key, value in batch.items()}


@pytest.fixture(scope="module")
def stratified(tmp_path_factory):
  out = tmp_path_factory.mktemp("stratified")
  return out, run_pass(out, pc=STRATIFIED)


def test_stratified_records_hold_the_teacher_tail_draws(stratified):
  out, manifest = stratified
  spec = manifest["spec"]
  assert (spec["cache_form"], spec["top_k"], spec["num_tail_samples"]) == ("topk+sampled", 5, 3)
  assert spec["proposal_temperature"] == 2.0
  batch = _read_all(out)
  b, n, t, s = batch["teacher_sample_ids"].shape
  assert (b, n, t, s) == (10, 2, 6, 3)
  # Re-score the stored teacher sequences independently (float64 log-softmax).
  rep = lambda x: np.repeat(x, n, axis=0)  # noqa: E731
  tokens = batch["teacher_tokens"].reshape(b * n, t)
  mask = batch["teacher_mask"].reshape(b * n, t)
  logits = h.forward(
    tiny_teacher(), rep(batch["inputs"]), rep(batch["input_mask"]), tokens, mask
  ).logits
  logp = _log_softmax64(logits)
  valid = mask.astype(bool)
  ids = batch["teacher_sample_ids"].reshape(b * n, t, s)
  topk = batch["teacher_topk_ids"].reshape(b * n, t, -1)
  assert not np.any((ids[..., :, None] == topk[..., None, :])[valid])  # draws are tail tokens
  np.testing.assert_allclose(
    batch["teacher_sample_logprobs"].reshape(b * n, t, s)[valid],
    np.take_along_axis(logp, ids, -1)[valid],
    atol=1e-5,
  )
  in_tail = np.ones(logp.shape, bool)
  np.put_along_axis(in_tail, topk, False, -1)
  log_r = _log_softmax64(np.where(in_tail, logp / 2.0, -np.inf))
  np.testing.assert_allclose(
    batch["teacher_proposal_logprobs"].reshape(b * n, t, s)[valid],
    np.take_along_axis(log_r, ids, -1)[valid],
    atol=1e-5,
  )
  for key in ("teacher_sample_ids", "teacher_sample_logprobs", "teacher_proposal_logprobs"):
    assert np.all(batch[key].reshape(b * n, t, s)[~valid] == 0), key
  # Different positions and sequences draw differently (per-example keys, not one shared draw).
  assert len({tuple(row) for row in ids[valid]}) > valid.sum() // 2


def test_draws_do_not_depend_on_the_batch_an_example_is_in(stratified, tmp_path):
  out, _ = stratified
  one_at_a_time = dataclasses.replace(STRATIFIED, batch_size=1)
  run_pass(tmp_path, pc=one_at_a_time, devices=jax.local_devices()[:1])
  want, got = _read_all(out), _read_all(tmp_path)
  for key in ("teacher_sample_ids", "teacher_sample_logprobs", "teacher_proposal_logprobs"):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_sampled_form_records_feed_the_estimator(tmp_path):
  pc = dataclasses.replace(PASS, cache_form="sampled", top_k=0, num_tail_samples=4)
  manifest = run_pass(tmp_path, pc=pc)
  batch = _read_all(tmp_path, expected_cache_form="sampled")
  assert batch["teacher_topk_ids"].shape == (10, 2, 6, 0)
  assert "teacher_proposal_logprobs" not in batch  # the teacher itself is the proposal
  np.testing.assert_array_equal(batch["teacher_tail_logmass"], 0.0)  # the tail is everything
  student = jnp.zeros((10, 2, 6, manifest["spec"]["vocab_size"]), jnp.float32)
  values = SD.sampled_divergence(
    "kl",
    batch["teacher_topk_logprobs"],
    batch["teacher_topk_ids"],
    student,
    sample_ids=batch["teacher_sample_ids"],
    sample_logprobs=batch["teacher_sample_logprobs"],
    teacher_tail_logmass=batch["teacher_tail_logmass"],
  )
  assert values.shape == (10, 2, 6) and np.all(np.isfinite(values))


def test_encode_decode_round_trips_the_sample_features():
  spec = rec.RecordSpec(
    num_samples=1, max_input_len=4, max_target_len=3, top_k=2, vocab_size=20,
    cache_form="topk+sampled", num_tail_samples=2, proposal_temperature=1.5,
  )  # fmt: skip
  rng = np.random.default_rng(0)
  shape = (1, 3, 2)
  arrays = dict(
    teacher_tokens=np.ones((1, 3), np.int32),
    teacher_lengths=np.array([3]),
    teacher_token_logprobs=-rng.random((1, 3)).astype(np.float32),
    teacher_topk_logprobs=-rng.random(shape).astype(np.float32),
    teacher_topk_ids=rng.integers(0, 20, shape).astype(np.int32),
    teacher_tail_logmass=-rng.random((1, 3)).astype(np.float32),
    teacher_sample_ids=rng.integers(0, 20, shape).astype(np.int32),
    teacher_sample_logprobs=-rng.random(shape).astype(np.float32) * 9,
    teacher_proposal_logprobs=-rng.random(shape).astype(np.float32) * 3,
  )
  raw = rec.encode_example(
    spec, example_index=7, inputs=np.array([3, 1]), targets=np.array([4, 1]), **arrays
  )
  back = rec.decode_example(spec, raw)
  for key in ("teacher_sample_ids", "teacher_sample_logprobs", "teacher_proposal_logprobs"):
    np.testing.assert_array_equal(back[key], arrays[key], err_msg=key)  # float32: bit-exact
  missing = {k: v for k, v in arrays.items() if k != "teacher_proposal_logprobs"}
  with pytest.raises(rec.RecordError, match="example 7.*teacher_proposal_logprobs"):
    rec.encode_example(spec, example_index=7, inputs=[1], targets=[1], **missing)


def test_old_records_without_a_form_load_as_topk(tmp_path):
  run_pass(tmp_path)
  path = os.path.join(tmp_path, rec.MANIFEST_NAME)
  manifest = json.load(open(path))
  for key in ("cache_form", "num_tail_samples", "proposal_temperature"):
    del manifest["spec"][key]  # a manifest written before sampled caches existed
  rec.write_manifest(str(tmp_path), manifest)
  _, spec = reader_lib.open_manifest(str(tmp_path), expected_cache_form="topk")
  assert (spec.cache_form, spec.num_tail_samples) == ("topk", 0)
  batch = _read_all(tmp_path)
  assert batch["teacher_topk_ids"].shape == (10, 2, 6, 5)
  assert not [key for key in batch if key.startswith("teacher_sample")]


def test_a_form_mismatch_names_the_manifest_and_both_forms(stratified):
  out, _ = stratified
  where = os.path.join(out, rec.MANIFEST_NAME)
  with pytest.raises(rec.RecordError) as error:
    reader_lib.open_manifest(str(out), expected_cache_form="topk")
  message = str(error.value)
  assert where in message and "'topk+sampled'" in message and "'topk'" in message
  with pytest.raises(rec.RecordError, match="expects 'sampled'"):
    reader_lib.RecordReader(str(out), batch_size=2, expected_cache_form="sampled")


@pytest.mark.parametrize(
  "changes,message",
  [
    ({"cache_form": "topk", "num_tail_samples": 3}, "use 'topk\\+sampled'"),
    ({"cache_form": "sampled", "num_tail_samples": 3}, "top_k must be 0, found 5"),
    ({"cache_form": "topk+sampled"}, "num_tail_samples must be >= 1, found 0"),
    ({"cache_form": "tail"}, "cache_form must be one of"),
    ({"cache_form": "topk+sampled", "num_tail_samples": 2, "proposal_temperature": 0.0}, "> 0"),
  ],
)
def test_inconsistent_cache_configs_raise_naming_the_config(changes, message):
  with pytest.raises(ValueError, match=message) as error:
    dataclasses.replace(PASS, **changes)
  assert "config.teacher_pass" in str(error.value)


# ---------------------------------------------------------------------------
# The trainer reads sampled caches.
# ---------------------------------------------------------------------------


def _stratified_batch(teacher, num_samples=3, top_k=h.K):
  """`_train_helpers.make_batch(0, teacher)` plus tail draws from the same teacher
  (top_k=0: the purely sampled form, draws from the whole vocabulary)."""
  batch = h.make_batch(0, teacher)
  batch["teacher_topk_logprobs"] = batch["teacher_topk_logprobs"][..., :top_k]
  batch["teacher_topk_ids"] = batch["teacher_topk_ids"][..., :top_k]
  if top_k == 0:
    batch["teacher_tail_logmass"] = np.zeros_like(batch["teacher_tail_logmass"])
  b, n, t = batch["teacher_tokens"].shape
  logits = h.forward(  # the program of make_batch's top-k: the same shapes
    teacher,
    np.repeat(batch["inputs"], n, 0),
    np.ones((b * n, h.S), np.float32),
    batch["teacher_tokens"].reshape(b * n, t),
    batch["teacher_mask"].reshape(b * n, t),
  ).logits
  logp = jax.nn.log_softmax(logits, -1).reshape(b, n, t, -1)
  ids, lp, _ = SD.draw_tail_samples(
    logp, jnp.asarray(batch["teacher_topk_ids"]), jax.random.key(0), num_samples
  )
  mask = batch["teacher_mask"][..., None]
  batch["teacher_sample_ids"] = (np.asarray(ids) * mask).astype(np.int32)
  batch["teacher_sample_logprobs"] = (np.asarray(lp) * mask).astype(np.float32)
  return batch


@pytest.fixture(scope="module")
def tiny_models():
  return models.build_model(h.model_config(), rngs=0), models.build_model(h.model_config(), rngs=1)


def _one_step(objective, student, teacher, batch, fused):
  c = h.config(objective, fused_head=fused, learning_rate=1e-3)
  plan = objectives.plan_from_config(c)
  fs, ft = models.SplitModel(student), models.SplitModel(teacher)
  tx = optimizer.make_optimizer(c.train)
  step_fn = train_step.make_train_step(
    plan, fs, tx, teacher=ft, sampler=h.sampler_for(objective),
    num_teacher_samples=c.train.num_teacher_samples, max_target_len=h.T,
  )  # fmt: skip
  mesh = sharding.mesh_from_config({"data": 1})
  state, shardings = train_step.init_state(fs, tx, 0, mesh)
  tparams = jax.device_put(ft.params, ft.shardings(mesh))
  step = train_step.jit_step(step_fn, shardings, mesh)
  _, metrics = step(state, train_step.put_batch(batch, mesh), tparams)
  return jax.device_get(metrics)


def test_the_kl_step_uses_the_tail_draws_fused_and_unfused(tiny_models):
  student, teacher = tiny_models
  batch = _stratified_batch(teacher)
  unfused = _one_step("kl", student, teacher, batch, fused=False)
  fused = _one_step("kl", student, teacher, batch, fused=True)
  for key in unfused:
    np.testing.assert_allclose(fused[key][0], unfused[key][0], rtol=1e-5, atol=1e-6, err_msg=key)
  plain = {k: v for k, v in batch.items() if not k.startswith("teacher_sample")}
  topk = _one_step("kl", student, teacher, plain, fused=False)
  # The top-k form is a lower bound; the stratified estimate of this batch is not that.
  assert float(unfused["loss"][0]) != float(topk["loss"][0])


def test_the_kl_step_reads_the_purely_sampled_form(tiny_models):
  student, teacher = tiny_models
  batch = _stratified_batch(teacher, num_samples=4, top_k=0)
  unfused = _one_step("kl", student, teacher, batch, fused=False)
  fused = _one_step("kl", student, teacher, batch, fused=True)
  assert np.isfinite(unfused["loss"][0]) and unfused["loss"][0] != 0
  for key in unfused:
    np.testing.assert_allclose(fused[key][0], unfused[key][0], rtol=1e-5, atol=1e-6, err_msg=key)


def test_the_unfused_js_objective_refuses_a_sampled_cache(tiny_models):
  student, teacher = tiny_models
  with pytest.raises(ValueError, match="no sampled-cache form"):
    _one_step("js", student, teacher, _stratified_batch(teacher), fused=False)


def test_check_records_names_the_expected_form(stratified):
  out, manifest = stratified
  vocab, fingerprint = manifest["spec"]["vocab_size"], manifest["tokenizer_fingerprint"]
  reader_lib.check_records(str(out), True, vocab, fingerprint, "topk+sampled")
  with pytest.raises(rec.RecordError, match="run expects 'topk'"):
    reader_lib.check_records(str(out), True, vocab, fingerprint, "topk")

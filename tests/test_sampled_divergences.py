"""The sampled teacher-cache estimator against float64 full-vocabulary references.

Unbiasedness is checked the way a Monte Carlo claim can be checked: over
many independent draws of the cache (numpy, float64 proposal), the mean of
the estimator and of its student gradient must lie within a confidence
interval of the exact float64 value computed from the draws themselves
(z * standard error, z from a family-wise error rate of 1e-3 over every
compared number), plus the float32 rounding of one evaluation.
"""

import functools
import statistics

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from fdistill_jax import divergences, fused_head
from fdistill_jax import sampled_divergences as SD
from tests.test_divergences import CASE_IDS, CASES, reference, softmax64

POSITIONS, V, K, S = 3, 16, 3, 4
DRAWS = 4000
FAMILY_ERROR = 1e-3
# float32 evaluation of one estimate: a relative rounding allowance.
F32_REL = 2e-5


def _z(num_compared):
  """Two-sided Bonferroni z for `num_compared` simultaneous checks."""
  return statistics.NormalDist().inv_cdf(1.0 - FAMILY_ERROR / (2 * num_compared))


@functools.cache
def _pair(seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(POSITIONS, V)) * 1.5, rng.normal(size=(POSITIONS, V)) * 1.5


def _cache(form, seed=1, draws=DRAWS, num_samples=S, temperature=2.0, store_proposal=True):
  """Top-k and `draws` independent tail samples `[draws, P, S]`, drawn in float64 numpy.

  form: "sampled" (K = 0, proposal the teacher), "topk+sampled" (K = 3,
  proposal the teacher outside the top-k), "tempered" (K = 3, proposal
  p^(1/temperature) outside the top-k; its log-probs stored unless
  `store_proposal=False`).
  """
  t, _ = _pair()
  p = softmax64(t)
  k = 0 if form == "sampled" else K
  order = np.argsort(-p, axis=-1)
  ids = order[:, :k]
  in_tail = np.ones_like(p, bool)
  np.put_along_axis(in_tail, ids, False, axis=-1)
  power = 1.0 / temperature if form == "tempered" else 1.0
  r = np.where(in_tail, p**power, 0.0)
  r = r / r.sum(-1, keepdims=True)
  rng = np.random.default_rng(seed)
  sample_ids = np.stack(
    [rng.choice(V, size=(draws, num_samples), p=r[i]) for i in range(POSITIONS)], axis=1
  )
  lp = np.log(p)
  cache = dict(
    teacher_topk_logprobs=np.take_along_axis(lp, ids, -1).astype(np.float32),
    teacher_topk_ids=ids.astype(np.int32),
    teacher_tail_logmass=np.log(np.sum(np.where(in_tail, p, 0.0), -1)).astype(np.float32),
    sample_ids=sample_ids.astype(np.int32),
    sample_logprobs=lp[np.arange(POSITIONS)[:, None], sample_ids].astype(np.float32),
  )
  if form == "tempered" and store_proposal:
    log_r = np.log(r[np.arange(POSITIONS)[:, None], sample_ids])
    cache["proposal_logprobs"] = log_r.astype(np.float32)
  return cache


def _broadcast(cache, draws):
  out = {}
  for key, value in cache.items():
    if key.startswith("teacher_"):
      value = np.broadcast_to(value, (draws,) + value.shape)
    out[key] = jnp.asarray(value)
  return out


def _values_and_grads(name, params, student, cache):
  """Per-draw estimates `[draws, P]` and student gradients `[draws, P, V]`.

  Run eagerly: the cases share array shapes, so after the first case almost
  every operation is already compiled, where a jitted function per case and
  divergence compiled a program each (22 against 13 CPU-s for these cases).
  """
  args = {k: v for k, v in cache.items() if not k.startswith("teacher_topk")}

  def estimate(z):
    return SD.sampled_divergence(
      name,
      cache["teacher_topk_logprobs"],
      cache["teacher_topk_ids"],
      z,
      **args,
      **dict(params),
    )

  values = estimate(student)
  return values, jax.grad(lambda z: estimate(z).sum())(student)


def _truth(name, params):
  """float64 D(p || softmax(s)) `[P]` and its gradient in s `[P, V]` (central differences)."""
  t, s = _pair()
  p = softmax64(t)
  value = reference(name, p, softmax64(s), **params)
  step = 1e-6
  grad = np.zeros_like(s)
  for v in range(V):
    hi, lo = s.copy(), s.copy()
    hi[:, v] += step
    lo[:, v] -= step
    grad[:, v] = (
      reference(name, p, softmax64(hi), **params) - reference(name, p, softmax64(lo), **params)
    ) / (2 * step)
  return value, grad


def _monte_carlo(name, params, cache):
  _, s = _pair()
  draws = cache["sample_ids"].shape[0]
  student = jnp.broadcast_to(jnp.asarray(s, jnp.float32), (draws, POSITIONS, V))
  values, grads = _values_and_grads(
    name, tuple(sorted(params.items())), student, _broadcast(cache, draws)
  )
  return np.asarray(values, np.float64), np.asarray(grads, np.float64)


def _within_interval(draws, truth, num_compared):
  """|mean - truth| / allowed `[...]` (<= 1 passes), allowed = z * SE + float32 rounding."""
  mean = draws.mean(0)
  se = draws.std(0, ddof=1) / np.sqrt(draws.shape[0])
  allowed = _z(num_compared) * se + F32_REL * (1.0 + np.abs(truth))
  return np.abs(mean - truth) / allowed


# Every registered divergence in the sampled and the stratified form; the
# tempered proposal (stored weights) on a spread of them.
MONTE_CARLO_CASES = [
  (form, name, params) for form in ("sampled", "topk+sampled") for name, params in CASES
]
MONTE_CARLO_CASES += [
  ("tempered", name, params) for name, params in CASES
  if name in ("kl", "rkl", "tvd", "pearson") or params.get("beta") == 0.85
]  # fmt: skip


@pytest.mark.parametrize(
  "form,name,params", MONTE_CARLO_CASES, ids=[f"{f}-{n}-{p}" for f, n, p in MONTE_CARLO_CASES]
)
def test_mean_estimate_and_gradient_match_full_vocabulary(form, name, params):
  values, grads = _monte_carlo(name, params, _cache(form))
  truth, truth_grad = _truth(name, params)
  compared = POSITIONS * (1 + V)
  ratio = _within_interval(values, truth, compared)
  assert np.all(ratio <= 1.0), (values.mean(0), truth, ratio)
  grad_ratio = _within_interval(grads, truth_grad, compared)
  assert np.all(grad_ratio <= 1.0), (grads.mean(0), truth_grad, grad_ratio)


@pytest.mark.parametrize("name", ["kl", "js", "tvd"])
def test_the_interval_check_rejects_biased_estimators(name):
  """The check above can fail: the top-k bucket form and a mis-weighted proposal are caught."""
  truth, _ = _truth(name, {})
  cache = _cache("topk+sampled")
  zero = {**cache, "sample_ids": cache["sample_ids"][..., :0]}
  zero["sample_logprobs"] = cache["sample_logprobs"][..., :0]
  topk_values, _ = _monte_carlo(name, {}, zero)
  assert np.all(_within_interval(topk_values, truth, POSITIONS) > 1.0)
  # Drawn from the tempered proposal, weighted as if drawn from the teacher.
  wrong_values, _ = _monte_carlo(name, {}, _cache("tempered", store_proposal=False))
  assert np.any(_within_interval(wrong_values, truth, POSITIONS) > 1.0)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_zero_samples_is_exactly_the_topk_form(name, params):
  cache = _cache("topk+sampled", draws=1, num_samples=0)
  _, s = _pair()
  student = jnp.asarray(s, jnp.float32)
  got = SD.sampled_divergence(
    name,
    cache["teacher_topk_logprobs"],
    cache["teacher_topk_ids"],
    student,
    teacher_tail_logmass=cache["teacher_tail_logmass"],
    sample_ids=cache["sample_ids"][0],
    sample_logprobs=cache["sample_logprobs"][0],
    **params,
  )
  want = divergences.topk_divergence(
    name,
    cache["teacher_topk_logprobs"],
    cache["teacher_topk_ids"],
    student,
    teacher_tail_logmass=cache["teacher_tail_logmass"],
    **params,
  )
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_zero_limit_is_f_at_zero_or_zero_when_infinite():
  assert SD.zero_limit("kl") == 0.0
  assert SD.zero_limit("rkl") == 0.0  # -log 0 = inf: no control variate
  assert SD.zero_limit("tvd") == 0.5
  assert SD.zero_limit("hellinger") == 1.0
  np.testing.assert_allclose(SD.zero_limit("js", beta=0.85), -0.85 * np.log(0.85))
  np.testing.assert_allclose(SD.zero_limit("alpha", alpha=2.0), 0.5)


def _small_cache(seed=3, lead=(3, 7), vocab=50, k=5, num_samples=6, masked_vocab=False):
  """One draw per token of a tempered stratified cache, for the equality tests."""
  rng = np.random.default_rng(seed)
  t = rng.normal(size=(*lead, vocab)) * 2.0
  if masked_vocab:
    t[..., :4] = -np.inf
  lp = np.asarray(divergences.log_probs(jnp.asarray(t, jnp.float32)), np.float64)
  ids = np.argsort(-lp, axis=-1)[..., :k]
  in_tail = np.ones(lp.shape, bool)
  np.put_along_axis(in_tail, ids, False, axis=-1)
  logits_r = np.where(in_tail, 0.5 * lp, -np.inf)
  log_r = logits_r - np.log(np.sum(np.exp(logits_r), -1, keepdims=True))
  flat_r = np.exp(log_r).reshape(-1, vocab)
  draws = np.stack([rng.choice(vocab, size=num_samples, p=r / r.sum()) for r in flat_r])
  draws = draws.reshape(*lead, num_samples)
  tail = np.log(np.sum(np.where(in_tail, np.exp(lp), 0.0), -1))
  return divergences.TeacherTopK(
    logprobs=jnp.asarray(np.take_along_axis(lp, ids, -1), jnp.float32),
    ids=jnp.asarray(ids, jnp.int32),
    tail_logmass=jnp.asarray(tail, jnp.float32),
    sample_ids=jnp.asarray(draws, jnp.int32),
    sample_logprobs=jnp.asarray(np.take_along_axis(lp, draws, -1), jnp.float32),
    proposal_logprobs=jnp.asarray(np.take_along_axis(log_r, draws, -1), jnp.float32),
  )


def _plain(name, cache, logits, **params):
  return SD.sampled_divergence(
    name,
    cache.logprobs,
    cache.ids,
    logits,
    sample_ids=cache.sample_ids,
    sample_logprobs=cache.sample_logprobs,
    proposal_logprobs=cache.proposal_logprobs,
    teacher_tail_logmass=cache.tail_logmass,
    **params,
  )


@pytest.mark.parametrize(
  "name,params,vocab_chunk_size,impl,k",
  [
    ("kl", {}, None, "custom_vjp", 5),
    ("js", {"beta": 0.85}, None, "checkpoint", 5),
    ("tvd", {}, 16, "custom_vjp", 5),
    ("rkl", {}, 16, "checkpoint", 5),
    ("alpha", {"alpha": 0.5}, 16, "custom_vjp", 5),
    ("kl", {}, None, "custom_vjp", 0),  # the sampled form: no top-k
    ("js", {}, 16, "checkpoint", 0),
  ],
)
def test_fused_head_equals_unfused(name, params, vocab_chunk_size, impl, k):
  rng = np.random.default_rng(4)
  lead, d, vocab = (3, 7), 16, 50
  hidden = jnp.asarray(rng.normal(size=(*lead, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, vocab)) / np.sqrt(d), jnp.float32)
  weights = np.ones(lead, np.float32)
  weights[0, 4:] = 0.0
  weights = jnp.asarray(weights)
  cache = _small_cache(lead=lead, vocab=vocab, k=k)

  def fused(h, w):
    return fused_head.fused_divergence_loss(
      name, h, w, 1.3, weights, teacher_topk=cache, chunk_size=4,
      vocab_chunk_size=vocab_chunk_size, impl=impl, **params,
    )[0]  # fmt: skip

  def unfused(h, w):
    return divergences.weighted_sum(_plain(name, cache, 1.3 * h @ w, **params), weights)[0]

  np.testing.assert_allclose(fused(hidden, w), unfused(hidden, w), rtol=1e-5)
  got = jax.grad(fused, argnums=(0, 1))(hidden, w)
  want = jax.grad(unfused, argnums=(0, 1))(hidden, w)
  for g, ref in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-4, atol=1e-6)


def test_fused_head_rejects_mismatched_sample_shapes():
  cache = _small_cache()
  bad = cache._replace(sample_logprobs=cache.sample_logprobs[..., :2])
  with pytest.raises(ValueError, match="sample_logprobs"):
    fused_head.fused_divergence_loss(
      "kl", jnp.zeros((3, 7, 16)), jnp.zeros((16, 50)), teacher_topk=bad
    )


@pytest.mark.parametrize("name,params", [("kl", {}), ("js", {"beta": 0.25}), ("pearson", {})])
def test_vocab_parallel_equals_plain(name, params):
  cache = _small_cache(lead=(4, 3), vocab=64, masked_vocab=True)
  rng = np.random.default_rng(5)
  student = jnp.asarray(rng.normal(size=(4, 3, 64)) * 2.0, jnp.float32)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  split, rows = PartitionSpec("data", None, "model"), PartitionSpec("data", None, None)

  @jax.jit
  def sharded(logits):
    def local(z, lp_k, ids, tail, s_ids, s_lp, r_lp):
      return SD.vocab_parallel_sampled_divergence(
        name, lp_k, ids, z, axis_name="model", sample_ids=s_ids, sample_logprobs=s_lp,
        proposal_logprobs=r_lp, teacher_tail_logmass=tail, **params,
      )  # fmt: skip

    return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(split, rows, rows, PartitionSpec("data", None), rows, rows, rows),
      out_specs=PartitionSpec("data", None),
    )(logits, *cache)

  np.testing.assert_allclose(
    np.asarray(sharded(student)), np.asarray(_plain(name, cache, student, **params)), rtol=1e-5
  )
  got = jax.grad(lambda z: sharded(z).sum())(student)
  want = jax.grad(lambda z: _plain(name, cache, z, **params).sum())(student)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_finite_under_masks_and_extreme_logits(name, params):
  cache = _small_cache(masked_vocab=True)
  # A proposal draw on a token the teacher masked: log p = -inf there.
  cache = cache._replace(
    sample_ids=cache.sample_ids.at[0, 0, 0].set(1),
    sample_logprobs=cache.sample_logprobs.at[0, 0, 0].set(-jnp.inf),
  )
  rng = np.random.default_rng(6)
  student = rng.normal(size=(3, 7, 50)) * 1e4
  student[..., 10:13] = -np.inf
  student = jnp.asarray(student, jnp.float32)
  values = _plain(name, cache, student, **params)
  grad = jax.grad(lambda z: _plain(name, cache, z, **params).sum())(student)
  chex.assert_tree_all_finite((values, grad))
  bf16 = _plain(name, cache, student.astype(jnp.bfloat16), **params)
  assert bf16.dtype == jnp.float32
  chex.assert_tree_all_finite(bf16)


def test_every_registered_divergence_is_checked():
  assert {name for name, _ in CASES} == set(divergences.REGISTRY)

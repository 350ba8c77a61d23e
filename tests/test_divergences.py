"""Numerics of fdistill_jax.divergences against independent float64 references."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fdistill_jax import divergences as D

# Independent generators, written from the literature (not imported from the
# library): D_f(p || q) = sum_v q_v f(p_v / q_v).
REFERENCE_F = {
  "kl": lambda t: t * np.log(t),
  "rkl": lambda t: -np.log(t),
  "tvd": lambda t: 0.5 * np.abs(t - 1),
  "jeffreys": lambda t: (t - 1) * np.log(t),
  "hellinger": lambda t: (np.sqrt(t) - 1) ** 2,
  "pearson": lambda t: (t - 1) ** 2,
}


def reference(name, p, q, **params):
  """float64 D(p || q) over the last axis, by definition (no zeros in p, q)."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  if name == "js":
    b = params.get("beta", 0.5)
    m = (1 - b) * p + b * q
    return b * np.sum(q * np.log(q / m), -1) + (1 - b) * np.sum(p * np.log(p / m), -1)
  if name == "alpha":
    a = params.get("alpha", 0.5)
    return (np.sum(p**a * q ** (1 - a), -1) - 1) / (a * (a - 1))
  if name == "skew_kl":
    a = params.get("alpha", 0.1)
    return np.sum(p * np.log(p / (a * p + (1 - a) * q)), -1)
  if name == "skew_rkl":
    a = params.get("alpha", 0.1)
    return np.sum(q * np.log(q / ((1 - a) * p + a * q)), -1)
  return np.sum(q * REFERENCE_F[name](p / q), -1)


def softmax64(logits, temperature=1.0):
  x = np.asarray(logits, np.float64) / temperature
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


CASES = [
  ("kl", {}),
  ("rkl", {}),
  ("js", {}),
  ("js", {"beta": 0.85}),
  ("js", {"beta": 0.25}),
  ("tvd", {}),
  ("jeffreys", {}),
  ("hellinger", {}),
  ("pearson", {}),
  ("alpha", {"alpha": 0.5}),
  ("alpha", {"alpha": 2.0}),
  ("alpha", {"alpha": -0.5}),
  ("skew_kl", {"alpha": 0.1}),
  ("skew_kl", {"alpha": 0.0}),
  ("skew_rkl", {"alpha": 0.1}),
]
CASE_IDS = [f"{n}-{p}" for n, p in CASES]


def random_logits(seed, shape=(3, 5, 17), scale=2.0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * scale).astype(np.float32), (
    rng.normal(size=shape) * scale
  ).astype(np.float32)


def test_registry_has_the_required_divergences():
  required = {
    "kl",
    "rkl",
    "js",
    "tvd",
    "jeffreys",
    "hellinger",
    "pearson",
    "alpha",
    "skew_kl",
    "skew_rkl",
  }
  assert required <= set(D.REGISTRY)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_matches_float64_reference(name, params, jit):
  t, s = random_logits(0)
  fn = functools.partial(D.divergence, name, **params)
  if jit:
    fn = jax.jit(fn)
  got = fn(t, s)
  chex.assert_shape(got, t.shape[:-1])
  chex.assert_type(got, jnp.float32)
  want = reference(name, softmax64(t), softmax64(s), **params)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_pointwise_agrees_with_generator_f(name, params):
  """Each entry's stable elementwise form equals q f(p/q) of its own f."""
  t, s = random_logits(1)
  p, q = softmax64(t), softmax64(s)
  entry = D.get(name)
  want = np.sum(q * entry.f(p / q, **params), -1)
  got = D.divergence(name, t, s, **params)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_nonnegative_and_zero_on_equal_inputs(name, params):
  t, s = random_logits(2)
  assert np.all(np.asarray(D.divergence(name, t, s, **params)) >= -1e-6)
  same = D.divergence(name, t, t + 3.0, **params)  # a shift leaves the softmax unchanged
  np.testing.assert_allclose(np.asarray(same), 0.0, atol=2e-6)


@pytest.mark.parametrize("name", ["tvd", "jeffreys", "hellinger", "js"])
def test_symmetric_divergences(name):
  t, s = random_logits(3)
  np.testing.assert_allclose(
    np.asarray(D.divergence(name, t, s)), np.asarray(D.divergence(name, s, t)), rtol=1e-5, atol=1e-7
  )


def test_js_skew_swaps_with_beta():
  t, s = random_logits(4)
  np.testing.assert_allclose(
    np.asarray(D.js(t, s, beta=0.85)), np.asarray(D.js(s, t, beta=0.15)), rtol=1e-5, atol=1e-7
  )


def test_bounds():
  t, s = random_logits(5, scale=6.0)
  assert np.all(np.asarray(D.js(t, s)) <= math.log(2) + 1e-6)
  assert np.all(np.asarray(D.tvd(t, s)) <= 1.0 + 1e-6)


def test_closed_form_cases():
  disjoint_p = jnp.array([0.0, -jnp.inf])
  disjoint_q = jnp.array([-jnp.inf, 0.0])
  np.testing.assert_allclose(D.tvd(disjoint_p, disjoint_q), 1.0, atol=1e-7)
  np.testing.assert_allclose(D.js(disjoint_p, disjoint_q), math.log(2), rtol=1e-6)
  np.testing.assert_allclose(D.divergence("hellinger", disjoint_p, disjoint_q), 2.0, rtol=1e-6)
  # p = (1/2, 1/2), q = (1/4, 3/4)
  p_logits = jnp.log(jnp.array([0.5, 0.5]))
  q_logits = jnp.log(jnp.array([0.25, 0.75]))
  kl = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
  rkl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
  np.testing.assert_allclose(D.kl(p_logits, q_logits), kl, rtol=1e-6)
  np.testing.assert_allclose(D.rkl(p_logits, q_logits), rkl, rtol=1e-6)
  np.testing.assert_allclose(D.tvd(p_logits, q_logits), 0.25, rtol=1e-6)
  np.testing.assert_allclose(D.divergence("jeffreys", p_logits, q_logits), kl + rkl, rtol=1e-6)
  np.testing.assert_allclose(
    D.divergence("pearson", p_logits, q_logits), 0.0625 / 0.25 + 0.0625 / 0.75, rtol=1e-6
  )


def test_js_ends_tend_to_kl_and_rkl():
  """js / (1 - beta) -> KL(p||q) as beta -> 1 and js / beta -> KL(q||p) as beta -> 0."""
  t, s = random_logits(6)
  with jax.enable_x64(True):
    t64, s64 = jnp.asarray(t, jnp.float64), jnp.asarray(s, jnp.float64)
    eps = 1e-7
    near_one = (
      np.asarray(
        D.divergence_from_log_probs(
          "js", jax.nn.log_softmax(t64), jax.nn.log_softmax(s64), beta=1 - eps
        )
      )
      / eps
    )
    near_zero = (
      np.asarray(
        D.divergence_from_log_probs(
          "js", jax.nn.log_softmax(t64), jax.nn.log_softmax(s64), beta=eps
        )
      )
      / eps
    )
  p, q = softmax64(t), softmax64(s)
  np.testing.assert_allclose(near_one, reference("kl", p, q), rtol=1e-4)
  np.testing.assert_allclose(near_zero, reference("rkl", p, q), rtol=1e-4)


def test_alpha_divergence_tends_to_kl_and_rkl():
  t, s = random_logits(7)
  p, q = softmax64(t), softmax64(s)
  np.testing.assert_allclose(
    reference("alpha", p, q, alpha=1 - 1e-6), reference("kl", p, q), rtol=1e-4
  )
  with pytest.raises(ValueError, match="alpha"):
    D.divergence("alpha", t, s, alpha=1.0)


def test_temperature_divides_both_sides():
  t, s = random_logits(8)
  np.testing.assert_allclose(
    np.asarray(D.js(t, s, temperature=2.0)), np.asarray(D.js(t / 2, s / 2)), rtol=1e-6
  )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", ["kl", "rkl", "js", "tvd"])
def test_low_precision_inputs_accumulate_in_float32(name, dtype):
  t, s = random_logits(9, shape=(4, 3000))
  t_low, s_low = jnp.asarray(t, dtype), jnp.asarray(s, dtype)
  got = D.divergence(name, t_low, s_low)
  chex.assert_type(got, jnp.float32)
  # Exact float64 value of the rounded inputs: only the inputs were rounded.
  want = reference(name, softmax64(np.asarray(t_low, np.float64)), softmax64(np.asarray(s_low)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_masked_logits_give_finite_values_and_gradients(name, params):
  t, s = random_logits(10, shape=(2, 4, 9))
  mask = np.zeros(9, bool)
  mask[[1, 4, 5]] = True  # masked in both: excluded from the support
  t_m = jnp.where(mask, -jnp.inf, t)
  s_m = jnp.where(mask, -jnp.inf, s)
  value, grads = jax.value_and_grad(lambda a, b: D.divergence(name, a, b, **params).sum(), (0, 1))(
    t_m, s_m
  )
  assert np.isfinite(value)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(g)[..., mask], 0.0)
  # Same value as on the vocabulary without the masked entries.
  want = reference(name, softmax64(t[..., ~mask]), softmax64(s[..., ~mask]), **params).sum()
  np.testing.assert_allclose(value, want, rtol=1e-5)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_extreme_logits_give_finite_values_and_gradients(name, params):
  rng = np.random.default_rng(11)
  t = (rng.choice([-1e4, 1e4], size=(3, 6)) + rng.normal(size=(3, 6))).astype(np.float32)
  s = (rng.choice([-1e4, 1e4], size=(3, 6)) + rng.normal(size=(3, 6))).astype(np.float32)
  value, grads = jax.value_and_grad(lambda a, b: D.divergence(name, a, b, **params).sum(), (0, 1))(
    t, s
  )
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_gradients_match_finite_differences(name, params):
  if name == "tvd":
    pytest.skip("TVD is not differentiable where p_v = q_v; its subgradient is tested below")
  t, s = random_logits(12, shape=(2, 5))
  with jax.enable_x64(True):
    fn = lambda a, b: D.divergence(name, a, b, **params)
    jax.test_util.check_grads(
      fn, (jnp.asarray(t, jnp.float64), jnp.asarray(s, jnp.float64)), order=1, modes=["rev"]
    )


def test_tvd_gradient_is_the_sign_subgradient():
  t, s = random_logits(13, shape=(7,))
  p, q = softmax64(t), softmax64(s)
  grad = np.asarray(jax.grad(lambda b: D.tvd(t, b))(s))
  # d/ds_j 1/2 sum_v |q_v - p_v| = 1/2 sum_v sign(q_v - p_v) q_v (delta_vj - q_j)
  sign = np.sign(q - p)
  want = 0.5 * (sign * q - q * np.sum(sign * q))
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_topk_is_below_full_and_equal_at_full_k(name, params):
  t, s = random_logits(14, shape=(3, 4, 12))
  lp = np.asarray(jax.nn.log_softmax(jnp.asarray(t)))
  full = np.asarray(D.divergence(name, t, s, **params))
  for k in (1, 3, 6):
    top_lp, top_ids = jax.lax.top_k(jnp.asarray(lp), k)
    # The teacher pass stores the tail mass computed at full precision.
    tail = np.log1p(-np.exp(np.asarray(top_lp, np.float64)).sum(-1))
    coarse = np.asarray(
      D.topk_divergence(name, top_lp, top_ids, s, teacher_tail_logmass=tail, **params)
    )
    assert np.all(coarse <= full + 1e-5), (k, coarse - full)
    # Independent float64 check of the bucketed value.
    p, q = softmax64(t), softmax64(s)
    ids = np.asarray(top_ids)
    p_k = np.take_along_axis(p, ids, -1)
    q_k = np.take_along_axis(q, ids, -1)
    p_b = np.concatenate([p_k, 1 - p_k.sum(-1, keepdims=True)], -1)
    q_b = np.concatenate([q_k, 1 - q_k.sum(-1, keepdims=True)], -1)
    np.testing.assert_allclose(coarse, reference(name, p_b, q_b, **params), rtol=2e-4, atol=1e-6)
  top_lp, top_ids = jax.lax.top_k(jnp.asarray(lp), 12)
  for tail in (jnp.full(t.shape[:-1], -jnp.inf), None):
    at_v = D.topk_divergence(name, top_lp, top_ids, s, teacher_tail_logmass=tail, **params)
    np.testing.assert_allclose(np.asarray(at_v), full, rtol=1e-5, atol=1e-6)


def test_topk_gradient_flows_to_student_only_and_is_finite():
  t, s = random_logits(15, shape=(2, 3, 10))
  top_lp, top_ids = jax.lax.top_k(jax.nn.log_softmax(jnp.asarray(t)), 4)
  top_lp = top_lp.astype(jnp.bfloat16)  # as stored in the records
  g_teacher, g_student = jax.grad(
    lambda a, b: D.topk_divergence("js", a, top_ids, b).sum(), (0, 1)
  )(top_lp.astype(jnp.float32), s)
  np.testing.assert_array_equal(np.asarray(g_teacher), 0.0)
  assert np.all(np.isfinite(np.asarray(g_student))) and np.any(np.asarray(g_student) != 0)


def _kl_grad_where_student_masks(t, s, masked):
  """float64 d KL(p || q) / d student logits with `masked` student entries at -inf.

  For an unmasked u, d/ds_u sum_v p_v (log p_v - log q_v) = q_u sum_v p_v - p_u
  = q_u - p_u (q renormalised over the unmasked entries); a masked entry's
  logit is a constant, so its gradient is 0.
  """
  p = softmax64(t)
  q = np.zeros_like(p)
  q[..., ~masked] = softmax64(s[..., ~masked])
  return np.where(masked, 0.0, q - p)


def test_kl_gradient_where_the_student_masks_a_supported_token_is_whole():
  # The teacher gives the masked tokens real mass: the KL is huge but its
  # gradient on the other logits is q - p, not halved by a tie at NEG_INF.
  t, s = random_logits(16, shape=(3, 8))
  masked = np.zeros(8, bool)
  masked[[2, 5]] = True
  s_m = np.where(masked, -np.inf, s).astype(np.float32)
  grad = np.asarray(jax.grad(lambda b: D.kl(t, b).sum())(s_m))
  np.testing.assert_allclose(grad, _kl_grad_where_student_masks(t, s, masked), atol=1e-6)


def test_topk_kl_gradient_where_the_student_masks_a_topk_token_is_whole():
  t, s = random_logits(17, shape=(3, 8))
  lp = np.log(softmax64(t))
  ids = np.argsort(-lp, axis=-1)[:, :3]  # the teacher's top-3
  masked = np.zeros((3, 8), bool)
  masked[np.arange(3), ids[:, 0]] = True  # the student masks the teacher's top token
  s_m = np.where(masked, -np.inf, s).astype(np.float32)
  top_lp = np.take_along_axis(lp, ids, -1)
  in_k = np.zeros((3, 8), bool)
  np.put_along_axis(in_k, ids, True, -1)
  tail = np.log1p(-np.sum(np.where(in_k, np.exp(lp), 0.0), -1))
  grad = np.asarray(
    jax.grad(
      lambda b: D.topk_divergence(
        "kl", top_lp.astype(np.float32), ids, b, teacher_tail_logmass=tail.astype(np.float32)
      ).sum()
    )(s_m)
  )
  # float64 reference on the K + 1 buckets: d/ds_u = q_u - P_u, where P_u is
  # the teacher's bucket mass p_k for a top-k id, p_tail * q_u / Q_tail outside.
  q = np.where(masked, 0.0, np.exp(s - s.max(-1, keepdims=True)))
  q = q / q.sum(-1, keepdims=True)
  p = np.exp(lp)
  q_tail = np.sum(np.where(in_k, 0.0, q), -1, keepdims=True)
  p_tail = np.exp(tail)[..., None]
  want = np.where(in_k, q - p, q - p_tail * q / q_tail)
  want = np.where(masked, 0.0, want)
  np.testing.assert_allclose(grad, want, atol=1e-6)


def test_weighted_sum_returns_sum_and_weight():
  values = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], jnp.bfloat16)
  weights = jnp.array([[1, 1, 0], [1, 0, 0]])
  total, weight = D.weighted_sum(values, weights)
  chex.assert_type([total, weight], jnp.float32)
  np.testing.assert_allclose([total, weight], [7.0, 3.0])


def test_registering_a_new_divergence_is_one_entry():
  name = "neyman_test"
  D.register(D.Divergence(name, lambda t: (1.0 - t) ** 2 / t))
  try:
    t, s = random_logits(16)
    p, q = softmax64(t), softmax64(s)
    np.testing.assert_allclose(
      np.asarray(D.divergence(name, t, s)), np.sum((p - q) ** 2 / p, -1), rtol=1e-5
    )
    with pytest.raises(ValueError, match="already registered"):
      D.register(D.Divergence(name, lambda t: t))
  finally:
    del D.REGISTRY[name]


def test_bad_names_and_parameters_are_reported():
  t, s = random_logits(17)
  with pytest.raises(ValueError, match="unknown divergence 'klx'"):
    D.divergence("klx", t, s)
  with pytest.raises(ValueError, match="takes parameters"):
    D.divergence("kl", t, s, beta=0.3)
  with pytest.raises(ValueError, match="beta must be in"):
    D.js(t, s, beta=1.0)


def _mesh(shape, names):
  devices = np.asarray(jax.devices()[: int(np.prod(shape))]).reshape(shape)
  return Mesh(devices, names)


@pytest.mark.parametrize("name", ["kl", "js", "tvd", "alpha"])
def test_batch_sharded_equals_single_device(name):
  assert jax.device_count() == 8, "tests/conftest.py must give 8 fake CPU devices"
  t, s = random_logits(18, shape=(8, 6, 32))
  single = D.divergence(name, t, s)
  mesh = _mesh((8,), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  loss = jax.jit(lambda a, b: D.weighted_sum(D.divergence(name, a, b), jnp.ones(a.shape[:-1])))
  total, _ = loss(jax.device_put(t, sharding), jax.device_put(s, sharding))
  np.testing.assert_allclose(total, np.asarray(single).sum(), rtol=1e-5)
  grads = jax.jit(jax.grad(lambda b: D.divergence(name, t, b).sum()))(jax.device_put(s, sharding))
  np.testing.assert_allclose(
    np.asarray(grads), np.asarray(jax.grad(lambda b: D.divergence(name, t, b).sum())(s)), atol=1e-6
  )


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_vocab_sharded_shard_map_equals_single_device(name, params):
  t, s = random_logits(19, shape=(4, 3, 64))
  t[..., 5] = -np.inf  # a masked entry on one shard
  s[..., 5] = -np.inf
  mesh = _mesh((2, 4), ("data", "model"))
  spec = PartitionSpec("data", None, "model")

  @jax.jit
  def sharded(a, b):
    return jax.shard_map(
      lambda x, y: D.vocab_parallel_divergence(name, x, y, axis_name="model", **params),
      mesh=mesh,
      in_specs=(spec, spec),
      out_specs=PartitionSpec("data", None),
    )(a, b)

  got = sharded(t, s)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(D.divergence(name, t, s, **params)), rtol=1e-5, atol=1e-6
  )
  grad = jax.grad(lambda b: sharded(t, b).sum())(s)
  want = jax.grad(lambda b: D.divergence(name, t, b, **params).sum())(s)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-4, atol=1e-6)

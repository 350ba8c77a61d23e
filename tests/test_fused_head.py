"""The fused head + divergence against the unfused reference (values and gradients)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill_jax import divergences, fused_head

# 3 x 7 = 21 tokens: not a multiple of the chunk sizes used below.
LEAD = (3, 7)
D, DT, V, K = 16, 12, 50, 5
TOL = 1e-5


@functools.cache  # the arrays are immutable: every case shares them
def _inputs(seed=0, hidden_dtype=jnp.float32, masked_vocab=False):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(*LEAD, D)).astype(np.float32)
  w = (rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
  scale = jnp.asarray(1.3, jnp.float32)
  weights = np.ones(LEAD, np.float32)
  weights[0, 4:] = 0.0  # right padding
  weights[2, 6:] = 0.0
  weights[1, 3] = 0.5  # a fractional weight, as a per-token loss weight
  t_logits = (2.0 * rng.normal(size=(*LEAD, V))).astype(np.float32)
  if masked_vocab:
    t_logits[1, :, :7] = -np.inf
  t_lp = jax.nn.log_softmax(jnp.asarray(t_logits), axis=-1)
  topk_lp, topk_ids = jax.lax.top_k(t_lp, K)
  tail = jnp.log1p(-jnp.sum(jnp.exp(topk_lp), axis=-1))
  t_hidden = rng.normal(size=(*LEAD, DT)).astype(np.float32)
  t_w = (rng.normal(size=(DT, V)) / np.sqrt(DT)).astype(np.float32)
  return {
    "hidden": jnp.asarray(hidden, hidden_dtype),
    "w": jnp.asarray(w),
    "scale": scale,
    "weights": jnp.asarray(weights),
    "t_logits": jnp.asarray(t_logits),
    "topk": divergences.TeacherTopK(topk_lp, topk_ids, tail),
    "t_hidden": jnp.asarray(t_hidden),
    "t_w": jnp.asarray(t_w),
    "t_scale": 0.7,
  }


def _teacher_kwargs(x, form):
  if form == "topk":
    return {"teacher_topk": x["topk"]}
  if form == "topk_derived_tail":
    return {"teacher_topk": x["topk"]._replace(tail_logmass=None)}
  if form == "logits":
    return {"teacher_logits": x["t_logits"]}
  return {"teacher_hidden": x["t_hidden"], "teacher_head": (x["t_w"], x["t_scale"])}


def _reference(name, x, form, hidden, w, scale, **params):
  student = scale * (hidden.astype(jnp.float32) @ w)
  if form.startswith("topk"):
    topk = x["topk"]
    tail = topk.tail_logmass if form == "topk" else None
    values = divergences.topk_divergence(
      name, topk.logprobs, topk.ids, student, teacher_tail_logmass=tail, **params
    )
  else:
    t_logits = x["t_logits"] if form == "logits" else x["t_scale"] * (x["t_hidden"] @ x["t_w"])
    values = divergences.divergence(name, t_logits, student, **params)
  return divergences.weighted_sum(values, x["weights"])


def _check(
  name,
  form,
  chunk_size=4,
  vocab_chunk_size=None,
  impl="custom_vjp",
  masked_vocab=False,
  head_layout="dv",
  **params,
):
  x = _inputs(masked_vocab=masked_vocab)
  teacher = _teacher_kwargs(x, form)

  def fused(hidden, w, scale):
    return fused_head.fused_divergence_loss(
      name,
      hidden,
      w.T if head_layout == "vd" else w,  # "vd": the head as a tied embedding is stored
      scale,
      x["weights"],
      chunk_size=chunk_size,
      vocab_chunk_size=vocab_chunk_size,
      impl=impl,
      head_layout=head_layout,
      **teacher,
      **params,
    )

  def reference(hidden, w, scale):
    return _reference(name, x, form, hidden, w, scale, **params)

  args = (x["hidden"], x["w"], x["scale"])
  grad = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
  (got_sum, got_weight), got_grads = jax.jit(grad(fused))(*args)
  (want_sum, want_weight), want_grads = grad(reference)(*args)
  chex.assert_trees_all_close(got_sum, want_sum, rtol=TOL, atol=TOL)
  chex.assert_trees_all_close(got_weight, want_weight)
  chex.assert_trees_all_close(got_grads, want_grads, rtol=TOL, atol=TOL)
  chex.assert_tree_all_finite(got_grads)
  # Padded tokens receive no gradient.
  np.testing.assert_array_equal(np.asarray(got_grads[0][0, 4:]), 0.0)


# Every divergence on one teacher form, every form on three divergences: the
# divergence enters the chunked loss only through the `divergences` call it
# shares with the reference, and the form only through the teacher chunks, so
# the full cross product repeats the same code paths at 3x the compilations.
@pytest.mark.parametrize("name", sorted(divergences.REGISTRY))
def test_matches_unfused_every_divergence(name):
  _check(name, "topk")


@pytest.mark.parametrize("form", ["logits", "hidden"])
@pytest.mark.parametrize("name", ["kl", "js", "tvd"])
def test_matches_unfused_every_teacher_form(name, form):
  _check(name, form)


@pytest.mark.parametrize(
  "name,form", [("kl", "topk"), ("rkl", "logits"), ("js", "hidden"), ("tvd", "topk_derived_tail")]
)
def test_checkpoint_impl_matches_unfused(name, form):
  _check(name, form, chunk_size=8, impl="checkpoint")


@pytest.mark.parametrize(
  "name,form,impl",
  [
    ("kl", "topk", "custom_vjp"),
    ("js", "logits", "custom_vjp"),
    ("tvd", "hidden", "custom_vjp"),
    ("pearson", "topk_derived_tail", "custom_vjp"),
    ("rkl", "hidden", "checkpoint"),
    ("skew_kl", "topk", "checkpoint"),
  ],
)
def test_vocab_blocks_match_unfused(name, form, impl):
  # 16 does not divide V = 50: the last block is padded.
  _check(name, form, chunk_size=8, vocab_chunk_size=16, impl=impl)


@pytest.mark.parametrize(
  "name,form,impl,vocab_chunk_size",
  [
    ("kl", "topk", "custom_vjp", None),
    ("js", "hidden", "custom_vjp", None),
    ("js", "hidden", "checkpoint", None),
    ("kl", "topk", "custom_vjp", 16),
  ],
)
def test_head_stored_vocabulary_first_matches_unfused(name, form, impl, vocab_chunk_size):
  # head_layout="vd": W [V, D], as the tied embedding is stored (the trainer's form).
  _check(name, form, chunk_size=8, vocab_chunk_size=vocab_chunk_size, impl=impl, head_layout="vd")


@pytest.mark.parametrize("name,params", [("js", {"beta": 0.85}), ("alpha", {"alpha": 0.3})])
def test_divergence_parameters_pass_through(name, params):
  _check(name, "logits", **params)


@pytest.mark.parametrize(
  "name,vocab_chunk_size", [("kl", None), ("js", 16), ("tvd", None), ("hellinger", 16)]
)
def test_masked_teacher_vocabulary(name, vocab_chunk_size):
  # -inf teacher logits: divergences finite under teacher zeros (RKL-like ones
  # saturate at ~1e34 by design and are not compared to 1e-5 there).
  _check(name, "logits", vocab_chunk_size=vocab_chunk_size, masked_vocab=True)


def test_one_chunk_larger_than_the_batch():
  _check("kl", "topk", chunk_size=1000)


def test_kl_value_against_float64_numpy():
  x = _inputs()
  got, _ = fused_head.fused_divergence_loss(
    "kl", x["hidden"], x["w"], x["scale"], x["weights"], teacher_logits=x["t_logits"], chunk_size=5
  )
  s = np.float64(x["scale"]) * (
    np.asarray(x["hidden"], np.float64) @ np.asarray(x["w"], np.float64)
  )
  t = np.asarray(x["t_logits"], np.float64)
  lq = (
    s
    - np.log(np.sum(np.exp(s - s.max(-1, keepdims=True)), -1, keepdims=True))
    - s.max(-1, keepdims=True)
  )
  t_max = t.max(-1, keepdims=True)
  lp = t - t_max - np.log(np.sum(np.exp(t - t_max), -1, keepdims=True))
  p = np.exp(lp)
  per_token = np.sum(np.where(p > 0, p * (lp - lq), 0.0), -1)
  want = np.sum(per_token * np.asarray(x["weights"], np.float64))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_bf16_hidden_gets_bf16_gradient():
  x = _inputs(hidden_dtype=jnp.bfloat16)

  def loss(hidden, w):
    return fused_head.fused_divergence_loss(
      "js", hidden, w, x["scale"], x["weights"], teacher_topk=x["topk"], chunk_size=4
    )[0]

  dh, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x["hidden"], x["w"])
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  want = jax.grad(lambda h, w: _reference("js", x, "topk", h, w, x["scale"])[0], argnums=(0, 1))(
    x["hidden"], x["w"]
  )
  chex.assert_trees_all_close(dw, want[1], rtol=TOL, atol=TOL)
  chex.assert_trees_all_close(dh.astype(jnp.float32), want[0], rtol=1e-2, atol=1e-3)


def test_peak_memory_below_one_full_logits_copy():
  """Compiled temporaries stay under a single float32 [tokens, vocab] array."""
  tokens, d, vocab = 2048, 32, 2048
  h = jax.ShapeDtypeStruct((tokens, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, vocab), jnp.float32)
  t = jax.ShapeDtypeStruct((tokens, d), jnp.float32)

  def loss(h, w, t):
    return fused_head.fused_divergence_loss(
      "js", h, w, 1.0, None, teacher_hidden=t, teacher_head=(w, 1.0), chunk_size=128
    )[0]

  stats = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, t).compile().memory_analysis()
  assert stats.temp_size_in_bytes < tokens * vocab * 4, stats


def test_rejects_bad_inputs():
  x = _inputs()
  with pytest.raises(ValueError, match="exactly one teacher"):
    fused_head.fused_divergence_loss("kl", x["hidden"], x["w"])
  with pytest.raises(ValueError, match="head_w must be"):
    fused_head.fused_divergence_loss("kl", x["hidden"], x["w"].T, teacher_topk=x["topk"])
  with pytest.raises(ValueError, match=r"head_w must be \[V, D=.*head_layout='vd'"):
    fused_head.fused_divergence_loss(
      "kl", x["hidden"], x["w"], teacher_topk=x["topk"], head_layout="vd"
    )
  with pytest.raises(ValueError, match="head_layout must be"):
    fused_head.fused_divergence_loss(
      "kl", x["hidden"], x["w"], teacher_topk=x["topk"], head_layout="VD"
    )
  with pytest.raises(ValueError, match="unknown divergence"):
    fused_head.fused_divergence_loss("nope", x["hidden"], x["w"], teacher_topk=x["topk"])
  with pytest.raises(ValueError, match="beta"):
    fused_head.fused_divergence_loss("js", x["hidden"], x["w"], teacher_topk=x["topk"], beta=1.5)


def test_batch_sharded_over_devices_matches_single_device():
  """Chunks keep every row, so a batch sharded over 8 devices gives the same loss and grads."""
  devices = np.array(jax.devices()[:8])
  if devices.size < 8:
    pytest.skip("needs the 8 fake CPU devices of conftest.py")
  mesh = jax.sharding.Mesh(devices, ("data",))
  rng = np.random.default_rng(3)
  hidden = jnp.asarray(rng.normal(size=(8, 5, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D), jnp.float32)
  t_logits = jnp.asarray(2.0 * rng.normal(size=(8, 5, V)), jnp.float32)
  weights = jnp.asarray(rng.random((8, 5)) > 0.3, jnp.float32)

  def loss(hidden, w, t_logits, weights):
    total, _ = fused_head.fused_divergence_loss(
      "js", hidden, w, 1.0, weights, teacher_logits=t_logits, chunk_size=16
    )
    return total

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  want = grad(hidden, w, t_logits, weights)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = [jax.device_put(x, batch) for x in (hidden, t_logits, weights)]
  got = grad(sharded[0], w, sharded[1], sharded[2])
  chex.assert_trees_all_close(got, want, rtol=TOL, atol=TOL)
  ref = jax.value_and_grad(
    lambda h, w: divergences.weighted_sum(divergences.js(t_logits, h @ w), weights)[0],
    argnums=(0, 1),
  )(hidden, w)
  chex.assert_trees_all_close(got, ref, rtol=TOL, atol=TOL)

"""Model tests: cached decoding == teacher forcing, padding invariance, head, config, traces."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fdistill_jax import models as M

TINY = ["t5-tiny", "t5v1.1-tiny", "bart-tiny", "mbart-tiny", "llama-tiny", "gpt2-tiny"]
B, S, T = 3, 6, 5

# The model API jitted: one compiled program per function, model and shapes.
# Called eagerly, JAX compiles every operation of a model for every new shape,
# 2-4x the CPU time of compiling the jitted function once (measured on the
# tiny presets), and these tests are compile-bound. The computation checked is
# the same: the functions trace the model code the library runs under jit.
forward = nnx.jit(M.forward, static_argnames="with_logits")
score = nnx.jit(M.score)
start_tokens = nnx.jit(M.start_tokens)
init_decode_state = nnx.jit(M.init_decode_state, static_argnums=3)
decode_step = nnx.jit(M.decode_step)
extend = nnx.jit(M.extend)
rewind = nnx.jit(M.rewind)


@pytest.fixture(scope="module", params=TINY)
def model(request):
  return M.build_model(M.get_preset(request.param), 0)


def _batch(cfg, seed=0, lengths=(6, 4, 1)):
  """Random tokens (never pad/eos), right-padded sources of the given lengths."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(3, cfg.vocab_size - 2, (B, S)).astype(np.int32)
  input_mask = (np.arange(S)[None] < np.asarray(lengths)[:, None]).astype(np.float32)
  inputs = np.where(input_mask > 0, inputs, cfg.pad_id).astype(np.int32)
  targets = rng.integers(3, cfg.vocab_size - 2, (B, T)).astype(np.int32)
  target_mask = np.ones((B, T), np.float32)
  target_mask[1, 3:] = 0  # a shorter target; positions after it are ignored
  return inputs, input_mask, targets, target_mask


def _cached_logprobs(model, inputs, input_mask, targets, target_mask):
  """Feeds the targets one by one through decode_step -> [B, T] log-probs of them."""
  state = init_decode_state(model, inputs, input_mask, targets.shape[1])
  tokens = start_tokens(model, inputs, input_mask)
  out = []
  for t in range(targets.shape[1]):
    logits, state = decode_step(model, state, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (B, model.config.vocab_size)
    logp = jax.nn.log_softmax(logits, axis=-1)
    out.append(jnp.take_along_axis(logp, targets[:, t : t + 1], axis=1)[:, 0])
    tokens = jnp.asarray(targets[:, t])
  return jnp.stack(out, axis=1) * target_mask


def test_cached_decoding_matches_teacher_forcing(model):
  batch = _batch(model.config)
  scored = score(model, *batch)
  cached = _cached_logprobs(model, *batch)
  chex.assert_shape(scored, (B, T))
  chex.assert_trees_all_close(cached, scored, atol=1e-5, rtol=0)
  # The scores are real log-probs: masked positions 0, real ones negative.
  assert np.all(np.asarray(scored)[batch[3] == 0] == 0)
  assert np.all(np.asarray(scored)[batch[3] > 0] < 0)


def test_score_is_log_softmax_of_forward_logits(model):
  inputs, input_mask, targets, target_mask = _batch(model.config, seed=1)
  out = forward(model, inputs, input_mask, targets, target_mask)
  logits = np.asarray(out.logits, np.float64)
  logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  expected = (np.take_along_axis(logits, targets[..., None], -1)[..., 0] - logz) * target_mask
  chex.assert_trees_all_close(
    score(model, inputs, input_mask, targets, target_mask), expected, atol=1e-5
  )


def test_output_head_reproduces_logits(model):
  out = forward(model, *_batch(model.config))
  w, scale = M.output_head(model)
  cfg = model.config
  chex.assert_shape(w, (cfg.d_model, cfg.vocab_size))
  chex.assert_shape(out.hidden, (B, T, cfg.d_model))
  assert len(out.layer_hidden) == cfg.num_layers
  chex.assert_shape(out.layer_hidden, [(B, T, cfg.d_model)] * cfg.num_layers)
  expected = scale * np.asarray(out.hidden, np.float64) @ np.asarray(w, np.float64)
  chex.assert_trees_all_close(out.logits, expected, atol=1e-4)
  assert out.logits.dtype == jnp.float32


def test_source_padding_does_not_change_outputs(model):
  inputs, input_mask, targets, target_mask = _batch(model.config, seed=2)
  base = score(model, inputs, input_mask, targets, target_mask)
  extra = 3
  pad = np.full((B, extra), model.config.pad_id, np.int32)
  padded = score(
    model,
    np.concatenate([inputs, pad], 1),
    np.concatenate([input_mask, np.zeros((B, extra), np.float32)], 1),
    targets,
    target_mask,
  )
  chex.assert_trees_all_close(padded, base, atol=1e-5, rtol=0)
  # Garbage under the mask changes nothing either.
  noisy = np.where(input_mask > 0, inputs, 7).astype(np.int32)
  chex.assert_trees_all_close(
    score(model, noisy, input_mask, targets, target_mask), base, atol=1e-5, rtol=0
  )


def test_each_row_independent_of_the_others(model):
  """A row's scores equal those computed for it alone at its own unpadded length."""
  inputs, input_mask, targets, target_mask = _batch(model.config, seed=3)
  batched = score(model, inputs, input_mask, targets, target_mask)
  for i in range(B):
    n = int(input_mask[i].sum())
    alone = score(
      model,
      inputs[i : i + 1, :n],
      input_mask[i : i + 1, :n],
      targets[i : i + 1],
      target_mask[i : i + 1],
    )
    chex.assert_trees_all_close(alone[0], batched[i], atol=1e-5, rtol=0)


def test_logits_do_not_see_the_future(model):
  inputs, input_mask, targets, target_mask = _batch(model.config, seed=4)
  base = forward(model, inputs, input_mask, targets, target_mask).logits
  changed = targets.copy()
  changed[:, 2:] = 5
  other = forward(model, inputs, input_mask, changed, target_mask).logits
  chex.assert_trees_all_close(other[:, :3], base[:, :3], atol=1e-6)
  assert np.abs(np.asarray(other[:, 3:] - base[:, 3:])).max() > 1e-4


def test_left_and_right_padded_prompts_agree():
  model = M.build_model(M.get_preset("llama-tiny"), 0)
  inputs, input_mask, targets, target_mask = _batch(model.config, seed=5)
  right = score(model, inputs, input_mask, targets, target_mask)
  lengths = input_mask.sum(1).astype(int)
  left_inputs = np.stack([np.roll(r, S - n) for r, n in zip(inputs, lengths, strict=True)])
  left_mask = np.stack([np.roll(r, S - n) for r, n in zip(input_mask, lengths, strict=True)])
  assert left_mask[2, -1] == 1 and left_mask[2, 0] == 0
  left = score(model, left_inputs, left_mask, targets, target_mask)
  chex.assert_trees_all_close(left, right, atol=1e-5, rtol=0)
  cached = _cached_logprobs(model, left_inputs, left_mask, targets, target_mask)
  chex.assert_trees_all_close(cached, right, atol=1e-5, rtol=0)


def test_decode_state_reorders_along_batch(model):
  """Every state leaf has batch on axis 0: permuting it equals decoding permuted inputs."""
  inputs, input_mask, targets, _ = _batch(model.config, seed=6)
  perm = np.array([2, 0, 1])
  # A cache of T slots (two are used), as in the tests above: the same compiled programs.
  state = init_decode_state(model, inputs, input_mask, T)
  assert all(leaf.shape[0] == B for leaf in jax.tree.leaves(state))
  tokens = start_tokens(model, inputs, input_mask)
  _, state = decode_step(model, state, tokens)
  state = jax.tree.map(lambda x: jnp.take(x, perm, axis=0), state)
  logits, _ = decode_step(model, state, jnp.asarray(targets[perm, 0]))

  ref_state = init_decode_state(model, inputs[perm], input_mask[perm], T)
  _, ref_state = decode_step(model, ref_state, tokens[perm])
  ref_logits, _ = decode_step(model, ref_state, jnp.asarray(targets[perm, 0]))
  chex.assert_trees_all_close(logits, ref_logits, atol=1e-5)


@pytest.mark.parametrize("name", ["t5-tiny", "llama-tiny"])
def test_jitted_decode_step_traces_once(name):
  model = M.build_model(M.get_preset(name), 0)
  inputs, input_mask, targets, target_mask = _batch(model.config, seed=7)
  graphdef, params = nnx.split(model)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, tokens):
    return M.decode_step(nnx.merge(graphdef, params), state, tokens)

  init = jax.jit(lambda p, x, m: M.init_decode_state(nnx.merge(graphdef, p), x, m, T))
  state = init(params, inputs, input_mask)
  tokens = start_tokens(model, inputs, input_mask)
  out = []
  for t in range(T):
    logits, state = step(params, state, tokens)
    out.append(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, t : t + 1], 1)[:, 0])
    tokens = jnp.asarray(targets[:, t])
  chex.clear_trace_counter()
  expected = score(model, inputs, input_mask, targets, target_mask)
  chex.assert_trees_all_close(jnp.stack(out, 1) * target_mask, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["t5v1.1-tiny", "bart-tiny", "llama-tiny", "gpt2-tiny"])
def test_bfloat16_activations(name):
  f32 = M.build_model(M.get_preset(name), 0)
  bf16 = M.build_model(M.get_preset(name, dtype="bfloat16"), 0)
  assert bf16.embed.embedding[...].dtype == jnp.float32  # params stay float32
  batch = _batch(f32.config, seed=8)
  out = forward(bf16, *batch)
  assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16
  ref = score(f32, *batch)
  got = score(bf16, *batch)
  assert np.abs(np.asarray(got - ref)).max() < 0.1
  chex.assert_trees_all_close(_cached_logprobs(bf16, *batch), got, atol=0.05)


def test_t5_relative_buckets_match_reference():
  """Bucket ids against a direct float64 transcription of the Mesh TensorFlow formula."""
  model = M.build_model(
    M.get_preset("t5-tiny", relative_attention_num_buckets=32, relative_attention_max_distance=128),
    0,
  )

  def ref(rel, bidirectional, n=32, max_distance=128):
    bucket = 0
    if bidirectional:
      n //= 2
      bucket += n if rel > 0 else 0
      rel = abs(rel)
    else:
      rel = -min(rel, 0)
    max_exact = n // 2
    if rel < max_exact:
      return bucket + rel
    large = max_exact + int(
      np.log(rel / max_exact) / np.log(max_distance / max_exact) * (n - max_exact)
    )
    return bucket + min(large, n - 1)

  rel = np.arange(-300, 300)
  for stack, bidirectional in ((model.encoder, True), (model.decoder, False)):
    got = np.asarray(stack.rel_bias.bucket(jnp.asarray(rel)))
    np.testing.assert_array_equal(got, [ref(int(r), bidirectional) for r in rel])


def test_rope_matches_complex_rotation():
  """RoPE (rotate-half layout) equals multiplying (x_i, x_{i+d/2}) by e^{i pos theta_i}."""
  from fdistill_jax.models.layers import rope

  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8))
  pos = rng.integers(0, 50, (2, 5))
  got = np.asarray(rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), 10000.0))
  freq = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos[..., None, None] * freq)
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), atol=1e-5)


def test_config_rejects_unknown_keys_and_bad_values():
  cfg = M.get_preset("t5-tiny")
  cfg.d_modle = 3
  with pytest.raises(ValueError, match="unknown keys \\['d_modle'\\]"):
    M.ModelConfig.from_config(cfg)
  with pytest.raises(ValueError, match="family"):
    M.ModelConfig.from_config(ml_collections.ConfigDict({"family": "gpt5", "vocab_size": 8}))
  with pytest.raises(ValueError, match="num_kv_heads"):
    M.ModelConfig(family="llama", vocab_size=8, num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="unknown model preset"):
    M.get_preset("t6")
  cfg = M.ModelConfig.from_config(M.get_preset("bart-tiny"))
  assert cfg.start_id == cfg.eos_id and M.ModelConfig(family="t5", vocab_size=8).start_id == 0


# The larger real sizes only differ in numbers and take seconds each to trace.
_LARGE = {"bart-large", "mbart-large", "gpt2-medium", "t5-base"}


@pytest.mark.parametrize("name", sorted(set(M.PRESETS) - _LARGE))
def test_presets_build_abstractly(name):
  """Presets are valid configs; shapes only (no memory for the real sizes)."""
  cfg = M.ModelConfig.from_config(M.get_preset(name))
  abstract = nnx.eval_shape(lambda: M.build_model(cfg, 0))
  assert abstract.embed.embedding.get_value().shape == (cfg.vocab_size, cfg.d_model)
  layers = abstract.layers if not cfg.is_encoder_decoder else abstract.decoder.layers
  assert len(layers) == cfg.num_layers
  assert layers[0].self_attn.key.kernel.get_value().shape == (
    cfg.d_model,
    cfg.kv_heads,
    cfg.dim_per_head,
  )


@pytest.mark.parametrize("name", ["t5-tiny", "gpt2-tiny"])
def test_dropout_only_with_an_rng(name):
  batch = _batch(M.ModelConfig.from_config(M.get_preset(name)), seed=9)
  plain = M.build_model(M.get_preset(name), 0)
  noisy = M.build_model(M.get_preset(name, dropout_rate=0.3), 0)
  key = jax.random.key(0)
  base = forward(plain, *batch).logits
  # Default (no rng) is deterministic even with a dropout rate; rate 0 ignores the rng.
  chex.assert_trees_all_close(forward(noisy, *batch).logits, base, atol=1e-6)
  chex.assert_trees_all_close(forward(plain, *batch, dropout_rng=key).logits, base, atol=1e-6)
  a = forward(noisy, *batch, dropout_rng=key).logits
  b = forward(noisy, *batch, dropout_rng=key).logits
  c = forward(noisy, *batch, dropout_rng=jax.random.key(1)).logits
  chex.assert_trees_all_close(a, b, atol=0)
  assert np.abs(np.asarray(a - base)).max() > 1e-3 and np.abs(np.asarray(a - c)).max() > 1e-3


def test_without_logits_and_finite_gradients_under_padding():
  model = M.build_model(M.get_preset("bart-tiny"), 0)
  inputs, input_mask, targets, target_mask = _batch(model.config, seed=10)
  input_mask[2] = 0  # a source that is all padding must not produce NaNs
  out = forward(model, inputs, input_mask, targets, target_mask, with_logits=False)
  assert out.logits is None
  full = forward(model, inputs, input_mask, targets, target_mask)
  chex.assert_trees_all_close(out.hidden, full.hidden)
  graphdef, params = nnx.split(model)

  def loss(p):
    logp = M.score(nnx.merge(graphdef, p), inputs, input_mask, targets, target_mask)
    return -jnp.sum(logp)

  grads = jax.jit(jax.grad(loss))(params)
  chex.assert_tree_all_finite(grads)
  assert np.abs(np.asarray(grads["embed"]["embedding"].get_value())).max() > 0


@pytest.mark.parametrize("name", ["t5-tiny", "llama-tiny"])
def test_remat_gives_the_same_gradients(name):
  cfg = M.ModelConfig.from_config(M.get_preset(name, dropout_rate=0.1))
  inputs, input_mask, targets, target_mask = _batch(cfg, seed=11)
  grads = []
  for remat in (False, True):
    graphdef, params = nnx.split(M.build_model(cfg.replace(remat=remat), 0))

    def loss(p, graphdef=graphdef):
      model = nnx.merge(graphdef, p)
      key = jax.random.key(0)  # same dropout masks with and without remat
      out = M.forward(model, inputs, input_mask, targets, target_mask, dropout_rng=key)
      return jnp.sum(jax.nn.log_softmax(out.logits)[..., 3] * target_mask)

    grads.append(jax.jit(jax.grad(loss))(params))
  chex.assert_trees_all_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)


def test_learned_positions_past_the_table_raise():
  model = M.build_model(M.get_preset("gpt2-tiny", max_positions=8), 0)
  inputs, input_mask, targets, target_mask = _batch(model.config)
  with pytest.raises(ValueError, match="10 positions needed but gpt2 has max_positions=8"):
    forward(model, inputs, input_mask, targets, target_mask)
  with pytest.raises(ValueError, match="max_positions=8"):
    init_decode_state(model, inputs, input_mask, 4)


@pytest.mark.parametrize("name", ["t5-tiny", "bart-tiny", "llama-tiny", "gpt2-tiny"])
def test_extend_and_rewind_match_teacher_forcing(name):
  """Multi-token `extend`s with per-row `rewind`s in between give the teacher-forced logits."""
  model = M.build_model(M.get_preset(name), 0)
  inputs, input_mask, targets, _ = _batch(model.config, seed=8)
  every_target = np.ones((B, T), np.float32)  # the forward of the tests above (with a mask)
  full = forward(model, inputs, input_mask, targets, every_target).logits  # [B, T, V]
  state = init_decode_state(model, inputs, input_mask, T + 2)
  start = start_tokens(model, inputs, input_mask)
  fed = jnp.concatenate([start[:, None], jnp.asarray(targets[:, :-1])], axis=1)  # [B, T]
  logits, state = extend(model, state, fed[:, :2])
  chex.assert_shape(logits, (B, 2, model.config.vocab_size))
  chex.assert_trees_all_close(logits, full[:, :2], atol=1e-4, rtol=0)
  # fed[:, 2] and two junk tokens; rows 0 and 2 keep fed[:, 2], row 1 forgets it too.
  junk = jnp.full((B, 2), 5, jnp.int32)
  logits, state = extend(model, state, jnp.concatenate([fed[:, 2:3], junk], axis=1))
  chex.assert_trees_all_close(logits[:, 0], full[:, 2], atol=1e-4, rtol=0)
  state = rewind(model, state, jnp.array([2, 3, 2]))
  # Equal-length blocks: rows 0 and 2 need fed[:, 3:] (one junk token after), row 1 fed[:, 2:].
  block = jnp.where(
    jnp.array([0, 1, 0])[:, None] > 0, fed[:, 2:], jnp.concatenate([fed[:, 3:], junk[:, :1]], 1)
  )
  logits, _ = extend(model, state, block)
  chex.assert_trees_all_close(logits[1], full[1, 2:], atol=1e-4, rtol=0)
  chex.assert_trees_all_close(logits[::2, :-1], full[::2, 3:], atol=1e-4, rtol=0)

"""Samplers against a fake tokens->logits with exactly known behaviour."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill_jax import decoding, models
from fdistill_jax.models import presets

EOS, PAD = 0, 0
V, T = 4, 4


def _table(seed, scale=2.0):
  """log-probs `[T, V, V]`: step t, previous token -> next-token distribution."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(T, V, V)) * scale
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _fake(table):
  """tokens_to_logits over a state {"t": [B]} that counts steps."""
  table = jnp.asarray(table, jnp.float32)

  def tokens_to_logits(state, tokens):
    return table[state["t"], tokens], {"t": state["t"] + 1}

  return tokens_to_logits


def _init(batch):
  return {"t": jnp.zeros((batch,), jnp.int32)}


def _seq_logprob(table, start, seq):
  prev, total = start, 0.0
  for t, tok in enumerate(seq):
    total += table[t, prev, tok]
    prev = tok
  return total


def _all_hypotheses(table, start):
  """Every finished sequence (ends in EOS) or max-length sequence, with its log-prob."""
  out = []
  for n in range(1, T + 1):
    for seq in itertools.product(range(V), repeat=n):
      if EOS in seq[:-1]:
        continue
      if n < T and seq[-1] != EOS:
        continue
      out.append((seq, _seq_logprob(table, start, seq)))
  return out


def _strip(tokens, length):
  return tuple(int(x) for x in np.asarray(tokens)[: int(length)])


def test_greedy_follows_the_argmax_chain():
  table = _table(0)
  starts = np.array([1, 2, 3])
  result = jax.jit(
    lambda s, st: decoding.decode(
      _fake(table), s, st, None, method="greedy", max_len=T, eos_id=EOS, pad_id=PAD
    )
  )(_init(3), jnp.asarray(starts))
  chex.assert_shape(result.tokens, (3, 1, T))
  for b, start in enumerate(starts):
    expected, prev = [], start
    for t in range(T):
      tok = int(np.argmax(table[t, prev]))
      expected.append(tok)
      prev = tok
      if tok == EOS:
        break
    assert _strip(result.tokens[b, 0], result.lengths[b, 0]) == tuple(expected)
    assert np.all(np.asarray(result.tokens[b, 0, len(expected) :]) == PAD)
    np.testing.assert_allclose(
      float(result.token_logprobs[b, 0].sum()), _seq_logprob(table, start, expected), rtol=1e-5
    )


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_search_equals_exhaustive_search(length_penalty):
  table = _table(1)
  starts = np.array([1, 3])
  result = decoding.decode(
    _fake(table),
    _init(2),
    jnp.asarray(starts),
    None,
    method="beam_search",
    max_len=T,
    eos_id=EOS,
    pad_id=PAD,
    num_beams=32,  # > every alive prefix: the search is exhaustive
    num_samples=3,
    length_penalty=length_penalty,
  )
  for b, start in enumerate(starts):
    ranked = sorted(
      _all_hypotheses(table, start), key=lambda h: -h[1] / len(h[0]) ** length_penalty
    )
    for j in range(3):
      assert _strip(result.tokens[b, j], result.lengths[b, j]) == ranked[j][0]
      np.testing.assert_allclose(float(result.token_logprobs[b, j].sum()), ranked[j][1], rtol=1e-5)


def test_narrow_beam_beats_greedy_where_greedy_is_myopic():
  # Step 0: token 1 (p=.6) leads to a flat distribution; token 2 (p=.4) to a sure EOS.
  logp = np.full((T, V, V), np.log(1e-9))
  logp[0, 3] = np.log([1e-9, 0.6, 0.4, 1e-9])
  logp[1, 1] = np.log([0.25, 0.25, 0.25, 0.25])
  logp[1, 2] = np.log([1.0 - 3e-9, 1e-9, 1e-9, 1e-9])
  logp[2:, :, EOS] = 0.0
  common = dict(max_len=T, eos_id=EOS, pad_id=PAD)
  greedy = decoding.decode(_fake(logp), _init(1), jnp.array([3]), None, method="greedy", **common)
  beam = decoding.decode(
    _fake(logp),
    _init(1),
    jnp.array([3]),
    None,
    method="beam_search",
    num_beams=2,
    length_penalty=0.0,
    **common,
  )
  assert _strip(greedy.tokens[0, 0], greedy.lengths[0, 0]) == (1, 0)
  assert _strip(beam.tokens[0, 0], beam.lengths[0, 0]) == (2, 0)


def _one_step_samples(logits, n, **params):
  table = np.tile(np.asarray(logits, np.float32), (T, V, 1))
  keys = decoding.example_keys(jax.random.key(0), jnp.arange(n))
  result = decoding.decode(
    _fake(table),
    _init(n),
    jnp.full((n,), 1),
    keys,
    method="sample",
    max_len=1,
    eos_id=99,
    pad_id=PAD,
    **params,
  )
  return np.asarray(result.tokens[:, 0, 0]), result


def _assert_frequencies(tokens, probs):
  n = len(tokens)
  freq = np.bincount(tokens, minlength=len(probs)) / n
  # 5 standard deviations of a binomial proportion: fails by chance ~1e-6.
  tol = 5 * np.sqrt(probs * (1 - probs) / n) + 1e-12
  assert np.all(np.abs(freq - probs) <= tol), (freq, probs)


def _softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


def test_sampling_frequencies_match_the_distribution():
  logits = np.array([0.5, -1.0, 1.5, 0.0])
  tokens, _ = _one_step_samples(logits, 4000)
  _assert_frequencies(tokens, _softmax(logits))
  tokens, result = _one_step_samples(logits, 4000, temperature=2.0)
  _assert_frequencies(tokens, _softmax(logits / 2))
  # Reported log-probs are the model's own, at temperature 1.
  np.testing.assert_allclose(
    np.asarray(result.token_logprobs[:, 0, 0]), np.log(_softmax(logits))[tokens], rtol=1e-5
  )


def test_top_k_and_top_p_never_emit_excluded_tokens():
  logits = np.array([0.5, -1.0, 1.5, 0.0])
  probs = _softmax(logits)
  tokens, _ = _one_step_samples(logits, 3000, top_k=2)
  assert set(np.unique(tokens)) <= {0, 2}
  kept = np.where(np.isin(np.arange(4), [0, 2]), probs, 0)
  _assert_frequencies(tokens, kept / kept.sum())
  # Sorted probs: .547 (2), .201 (0), .122 (3), .045 (1): top_p=0.7 keeps {2, 0}.
  tokens, _ = _one_step_samples(logits, 3000, top_p=0.7)
  assert set(np.unique(tokens)) <= {0, 2}
  _assert_frequencies(tokens, kept / kept.sum())
  tokens, _ = _one_step_samples(logits, 500, top_p=0.5)
  assert set(np.unique(tokens)) == {2}


def test_filter_logits_top_p_keeps_the_smallest_covering_set():
  logits = jnp.log(jnp.array([0.1, 0.4, 0.3, 0.2]))
  kept = np.isfinite(np.asarray(decoding.filter_logits(logits, top_p=0.65)))
  np.testing.assert_array_equal(kept, [False, True, True, False])
  kept = np.isfinite(np.asarray(decoding.filter_logits(logits, top_p=0.75)))
  np.testing.assert_array_equal(kept, [False, True, True, True])


def test_per_row_eos_and_lengths():
  table = _table(2)
  n = 64
  keys = decoding.example_keys(jax.random.key(1), jnp.arange(n))
  result = decoding.decode(
    _fake(table),
    _init(n),
    jnp.full((n,), 2),
    keys,
    method="sample",
    max_len=T,
    eos_id=EOS,
    pad_id=PAD,
  )
  tokens, lps, lengths = (np.asarray(x)[:, 0] for x in result)
  assert len(set(lengths.tolist())) > 1  # rows really finish at different steps
  for row, length, lp in zip(tokens, lengths, lps, strict=True):
    body = row[:length]
    assert EOS not in body[:-1]
    assert length == T or body[-1] == EOS
    assert np.all(row[length:] == PAD) and np.all(lp[length:] == 0.0)
    np.testing.assert_allclose(lp[:length].sum(), _seq_logprob(table, 2, body), rtol=1e-5)


@pytest.mark.parametrize("method", ["greedy", "sample"])
def test_per_step_outputs_are_each_steps_logprobs_until_eos(method):
  table = _table(2)
  n, starts = 32, np.arange(32) % V
  keys = decoding.example_keys(jax.random.key(1), jnp.arange(n))
  result, (logp, top) = decoding.decode(
    _fake(table),
    _init(n),
    jnp.asarray(starts),
    keys,
    method=method,
    max_len=T,
    eos_id=EOS,
    pad_id=PAD,
    num_samples=2,
    per_step=lambda lp: (lp, jnp.argmax(lp, axis=-1)),
  )
  assert logp.shape == (n, 2, T, V) and top.shape == (n, 2, T)
  tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
  for b, j in itertools.product(range(n), range(2)):
    prev = starts[b]
    for t in range(T):
      if t < lengths[b, j]:  # the float64 table row the step was fed from
        np.testing.assert_allclose(logp[b, j, t], table[t, prev], rtol=1e-5, atol=1e-6)
        assert top[b, j, t] == np.argmax(table[t, prev])
        prev = tokens[b, j, t]
      else:
        assert np.all(np.asarray(logp[b, j, t]) == 0.0) and top[b, j, t] == 0
  with pytest.raises(ValueError, match="per_step"):
    decoding.decode(
      _fake(table),
      _init(n),
      jnp.asarray(starts),
      keys,
      method="beam_search",
      max_len=T,
      eos_id=EOS,
      pad_id=PAD,
      per_step=lambda lp: lp,
    )


def test_samples_do_not_depend_on_batch_composition():
  table = _table(3)
  rng = jax.random.key(7)

  def run(indices, starts):
    keys = decoding.example_keys(rng, jnp.asarray(indices))
    return decoding.decode(
      _fake(table),
      _init(len(indices)),
      jnp.asarray(starts),
      keys,
      method="sample",
      max_len=T,
      eos_id=EOS,
      pad_id=PAD,
      num_samples=3,
    )

  a = run([5, 7, 9], [1, 2, 3])
  b = run([9, 11, 5], [3, 1, 1])
  np.testing.assert_array_equal(np.asarray(a.tokens[0]), np.asarray(b.tokens[2]))
  np.testing.assert_array_equal(np.asarray(a.tokens[2]), np.asarray(b.tokens[0]))
  # Different examples and different samples of one example differ somewhere.
  assert not np.array_equal(np.asarray(a.tokens[0]), np.asarray(a.tokens[1]))
  assert len({tuple(np.asarray(a.tokens[0, j])) for j in range(3)}) > 1


def test_beam_sample_is_stochastic_and_cold_beam_sample_is_beam_search():
  table = _table(4, scale=0.5)
  starts = jnp.array([1, 2, 3, 1])
  common = dict(max_len=T, eos_id=EOS, pad_id=PAD, num_beams=3)
  beam = decoding.decode(_fake(table), _init(4), starts, None, method="beam_search", **common)
  keys = decoding.example_keys(jax.random.key(3), jnp.arange(4))
  cold = decoding.decode(
    _fake(table), _init(4), starts, keys, method="beam_sample", temperature=1e-4, **common
  )
  np.testing.assert_array_equal(np.asarray(cold.tokens), np.asarray(beam.tokens))
  draws = set()
  for seed in range(12):
    keys = decoding.example_keys(jax.random.key(seed), jnp.zeros(1, jnp.int32))
    out = decoding.decode(
      _fake(table), _init(1), starts[:1], keys, method="beam_sample", top_k=3, **common
    )
    draws.add(_strip(out.tokens[0, 0], out.lengths[0, 0]))
  assert len(draws) > 1


def test_sampler_traces_once_per_shape():
  table = _table(5)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(state, starts, keys):
    return decoding.decode(
      _fake(table),
      state,
      starts,
      keys,
      method="sample",
      max_len=T,
      eos_id=EOS,
      pad_id=PAD,
      top_k=3,
    )

  for seed in range(3):
    keys = decoding.example_keys(jax.random.key(seed), jnp.arange(2))
    run(_init(2), jnp.array([seed % V, 1]), keys)


def test_bad_method_and_parameters_are_reported():
  with pytest.raises(ValueError, match="unknown decoding method 'nucleus'"):
    decoding.make_model_sampler("nucleus", max_len=4)
  with pytest.raises(ValueError, match="takes"):
    decoding.make_model_sampler("greedy", max_len=4, top_k=3)
  assert decoding.make_model_sampler("sample", max_len=4, top_p=0.9) == (
    decoding.make_model_sampler("sample", max_len=4, top_p=0.9)
  )


@pytest.mark.parametrize("preset", ["t5-tiny", "llama-tiny"])
def test_model_sampler_logprobs_equal_teacher_forced_scores(preset):
  model = models.build_model(presets.get_preset(preset), rngs=0)
  rng = np.random.default_rng(0)
  inputs = rng.integers(3, 60, size=(3, 6)).astype(np.int32)
  input_mask = np.ones((3, 6), np.float32)
  input_mask[1, 4:] = 0
  # Jitted: eagerly, every operation of the model compiles for each of the two shapes.
  score = jax.jit(models.score)
  for method, params in (("greedy", {}), ("sample", {"num_samples": 2})):
    sampler = decoding.make_model_sampler(method, max_len=8, **params)
    keys = decoding.example_keys(jax.random.key(0), jnp.arange(3))
    result = jax.jit(lambda m, i, im, k, s=sampler: s(m, i, im, k))(model, inputs, input_mask, keys)
    n = result.tokens.shape[1]
    tokens = np.asarray(result.tokens).reshape(3 * n, -1)
    mask = (np.arange(8)[None] < np.asarray(result.lengths).reshape(-1, 1)).astype(np.float32)
    scores = score(model, np.repeat(inputs, n, 0), np.repeat(input_mask, n, 0), tokens, mask)
    np.testing.assert_allclose(
      np.asarray(result.token_logprobs).reshape(3 * n, -1), np.asarray(scores), atol=1e-5
    )

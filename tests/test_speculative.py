"""Speculative decoding is exact: greedy output, sequence distribution, acceptance rate.

Statistical tests use fixed seeds and a false-failure rate of 1e-4 each (a
correct sampler fails one in 10,000 seeds); references are float64 numpy
enumerations, independent of the code under test.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from fdistill_jax import decoding, metrics, models, speculative

FALSE_FAILURE = 1e-4
EOS, PAD = 0, 0
V, T = 4, 3


# -- fakes: Markov "models" with exactly known distributions -------------------


def _table(seed, scale=1.5, steps=T):
  """logits [steps, V, V]: position t, previous token -> next-token logits."""
  return np.random.default_rng(seed).normal(size=(steps, V, V)) * scale


def _fake(table):
  """`Cached` over state {"t": [R]}: logits of the token after tokens[:, i] = table[t + i, tok]."""
  tab = jnp.asarray(table, jnp.float32)
  last = tab.shape[0] - 1

  def extend(state, tokens):
    t = state["t"][:, None] + jnp.arange(tokens.shape[1])[None]
    return tab[jnp.minimum(t, last), tokens], {"t": state["t"] + tokens.shape[1]}

  def rewind(state, num):
    return {"t": state["t"] - num}

  return speculative.Cached(extend, rewind)


def _state(rows):
  return {"t": jnp.zeros((rows,), jnp.int32)}


def _np_filter(logits, temperature=1.0, top_k=0, top_p=1.0):
  """float64 sampling distribution [V] after temperature, top-k, then top-p (mass before < p)."""
  x = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-x, kind="stable")
  keep = np.ones(x.shape, bool)
  if top_k:
    keep[order[top_k:]] = False
  probs = np.where(keep, np.exp(x - x.max()), 0.0)
  probs /= probs.sum()
  if top_p < 1.0:
    sorted_p = probs[order]
    before = np.cumsum(sorted_p) - sorted_p
    keep_sorted = before < top_p
    probs = np.zeros_like(probs)
    probs[order[keep_sorted]] = sorted_p[keep_sorted]
    probs /= probs.sum()
  return probs


def _outcomes(vocab, length, eos):
  """Every sequence a sampler can return: ends in its first EOS, or has `length` tokens."""
  out = []
  for n in range(1, length + 1):
    for seq in itertools.product(range(vocab), repeat=n):
      if eos in seq[:-1] or (n < length and seq[-1] != eos):
        continue
      out.append(seq)
  return out


def _as_keys(tokens, lengths):
  """Sampled rows [N, T] -> tuples without padding."""
  return [tuple(int(x) for x in row[:n]) for row, n in zip(tokens, lengths, strict=True)]


def _chi_square_p(observed_seqs, expected_probs):
  """p-value of a chi-square goodness-of-fit test; bins expecting < 5 draws are pooled."""
  n = len(observed_seqs)
  total = sum(expected_probs.values())  # 1 up to float32 rounding of the model's logits
  counts = {}
  for s in observed_seqs:
    counts[s] = counts.get(s, 0) + 1
  assert set(counts) <= set(expected_probs), set(counts) - set(expected_probs)
  obs, exp, pool_obs, pool_exp = [], [], 0, 0.0
  for seq, p in expected_probs.items():
    if n * p / total >= 5:
      obs.append(counts.get(seq, 0))
      exp.append(n * p / total)
    else:
      pool_obs += counts.get(seq, 0)
      pool_exp += n * p / total
  if pool_exp > 0:
    obs.append(pool_obs)
    exp.append(pool_exp)
  return stats.chisquare(obs, exp).pvalue


def _markov_distribution(table, start, **params):
  """Exact probability of every outcome under the filtered Markov target."""
  out = {}
  for seq in _outcomes(V, T, EOS):
    prob, prev = 1.0, start
    for t, tok in enumerate(seq):
      prob *= _np_filter(table[t, prev], **params)[tok]
      prev = tok
    out[seq] = prob
  return {s: p for s, p in out.items() if p > 0}


def _run_fake(target_table, draft_table, starts, keys, **kw):
  rows = starts.shape[0]
  fn = jax.jit(
    lambda s, k: speculative.speculative_sample(
      _fake(target_table),
      _fake(draft_table),
      _state(rows),
      _state(rows),
      s,
      k,
      eos_id=EOS,
      pad_id=PAD,
      **kw,
    )
  )
  return jax.device_get(fn(starts, keys))


# -- greedy --------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1, 5])
def test_greedy_is_the_target_greedy_output(gamma):
  target, draft = _table(0), _table(1)
  draft[:, 1:3] = target[:, 1:3]  # the draft agrees after tokens 1, 2: some drafts accepted
  starts = jnp.arange(V, dtype=jnp.int32)
  keys = decoding.example_keys(jax.random.key(0), jnp.arange(V))
  got = _run_fake(target, draft, starts, keys, gamma=gamma, max_len=T, greedy=True)
  extend = _fake(target).extend

  def tokens_to_logits(state, tokens):
    logits, state = extend(state, tokens[:, None])
    return logits[:, 0], state

  want = decoding.sample(
    tokens_to_logits,
    _state(V),
    starts,
    keys,
    max_len=T,
    eos_id=EOS,
    pad_id=PAD,
    greedy=True,
  )
  np.testing.assert_array_equal(got.decode.tokens, want.tokens)
  np.testing.assert_array_equal(got.decode.lengths, want.lengths)
  chex.assert_trees_all_close(got.decode.token_logprobs, want.token_logprobs, atol=1e-6)
  assert np.all(got.drafted == gamma * got.steps)
  assert got.accepted.sum() > 0 and got.rejected.sum() > 0


# -- the sequence distribution ----------------------------------------------------


@pytest.mark.parametrize(
  "params",
  [{}, {"temperature": 0.7, "top_k": 3, "top_p": 0.9}],
  ids=["plain", "temperature_top_k_top_p"],
)
def test_sampled_sequences_follow_the_target_distribution(params):
  target, draft = _table(2), _table(3)
  n, start = 20000, 2
  starts = jnp.full((n,), start, jnp.int32)
  keys = decoding.example_keys(jax.random.key(1), jnp.arange(n))
  got = _run_fake(target, draft, starts, keys, gamma=2, max_len=T, **params)
  seqs = _as_keys(got.decode.tokens[:, 0], got.decode.lengths[:, 0])
  p_value = _chi_square_p(seqs, _markov_distribution(target, start, **params))
  assert p_value > FALSE_FAILURE, p_value
  # The draft differs from the target: both outcomes of the acceptance test occurred.
  assert got.rejected.sum() > n // 10 and got.accepted.sum() > n // 10


def test_draft_distribution_is_rejected_by_the_same_test():
  """The chi-square test has power here: the draft's own distribution fails it."""
  target, draft = _table(2), _table(3)
  n, start = 20000, 2
  starts = jnp.full((n,), start, jnp.int32)
  keys = decoding.example_keys(jax.random.key(1), jnp.arange(n))
  got = _run_fake(draft, draft, starts, keys, gamma=2, max_len=T)
  seqs = _as_keys(got.decode.tokens[:, 0], got.decode.lengths[:, 0])
  assert _chi_square_p(seqs, _markov_distribution(target, start)) < FALSE_FAILURE


# -- acceptance rate ----------------------------------------------------------------


def test_drafts_after_an_accepted_eos_are_not_counted():
  """Draft == target except after EOS: every counted test accepts."""
  target, draft = _table(5, steps=8), _table(5, steps=8)
  draft[:, EOS] = _table(6, steps=8)[:, EOS]  # only contexts no output reaches differ
  n = 2000
  keys = decoding.example_keys(jax.random.key(4), jnp.arange(n))
  got = _run_fake(target, draft, jnp.full((n,), 2, jnp.int32), keys, gamma=4, max_len=T)
  assert np.any(got.decode.lengths < T)  # EOS was drafted and accepted mid-block
  assert got.rejected.sum() == 0 and got.accepted.sum() > 0


def test_acceptance_rate_is_one_minus_tvd():
  """Position-independent p, q: every accept test is Bernoulli(sum min(p, q)).

  p and q are the distributions after temperature and top-k, as sampled.
  """
  params = {"temperature": 0.8, "top_k": 3}
  rng = np.random.default_rng(4)
  p_logits, q_logits = rng.normal(size=V) * 1.5, rng.normal(size=V) * 1.5
  p_logits[EOS] = q_logits[EOS] = -1e9  # no EOS: every row runs max_len tokens
  gamma, max_len, rows = 4, 16, 2000
  shape = (max_len + gamma + 1, V, V)
  p, q = _np_filter(p_logits, **params), _np_filter(q_logits, **params)
  alpha = np.minimum(p, q).sum()  # 1 - TVD(p, q)
  starts = jnp.ones((rows,), jnp.int32)
  keys = decoding.example_keys(jax.random.key(2), jnp.arange(rows))
  got = _run_fake(
    np.broadcast_to(p_logits, shape),
    np.broadcast_to(q_logits, shape),
    starts,
    keys,
    gamma=gamma,
    max_len=max_len,
    **params,
  )
  z = stats.norm.isf(FALSE_FAILURE / 2)
  tests = got.accepted.sum() + got.rejected.sum()
  assert abs(got.accepted.sum() - alpha * tests) <= z * np.sqrt(tests * alpha * (1 - alpha))
  measured = float(speculative.acceptance_rate(got))
  np.testing.assert_allclose(measured, got.accepted.sum() / tests, rtol=1e-6)
  # Tokens per verification step: 1 + a truncated geometric number of accepts.
  k = np.arange(gamma + 1)
  pk = np.where(k < gamma, alpha**k * (1 - alpha), alpha**gamma)
  mean, var = (pk * (k + 1)).sum(), (pk * (k + 1) ** 2).sum() - (pk * (k + 1)).sum() ** 2
  np.testing.assert_allclose(metrics.expected_tokens_per_step(alpha, gamma), mean, rtol=1e-12)
  steps = got.steps.sum()
  per_step = (got.accepted.sum() + steps) / steps
  assert abs(per_step - mean) <= z * np.sqrt(var / steps), (per_step, mean)
  np.testing.assert_array_equal(got.decode.lengths, max_len)


# -- the library's models, both kinds ----------------------------------------------


def _pair(name, vocab=None, noise=0.0):
  """(target, draft): the draft is the target with its parameters perturbed."""
  overrides = {"num_layers": 1} if vocab is None else {"num_layers": 1, "vocab_size": vocab}
  target = models.build_model(models.get_preset(name, **overrides), 0)
  graphdef, params = nnx.split(target)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))

  @jax.jit  # one program, not one per parameter shape
  def perturb(leaves, keys):
    return [
      x + noise * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]

  return target, nnx.merge(graphdef, jax.tree.unflatten(treedef, perturb(leaves, keys)))


def _prompt(cfg, batch, length=4, seed=0):
  rng = np.random.default_rng(seed)
  low = max(cfg.eos_id, cfg.pad_id) + 1
  inputs = rng.integers(low, cfg.vocab_size, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.float32)
  mask[1:, length - 1] = 0  # rows of different lengths
  return jnp.asarray(np.where(mask > 0, inputs, cfg.pad_id)), jnp.asarray(mask)


@pytest.mark.parametrize("name", ["t5v1.1-tiny", "llama-tiny"])
def test_greedy_on_models_is_the_target_greedy_output(name):
  target, draft = _pair(name, noise=0.05)
  inputs, mask = _prompt(target.config, batch=4)
  keys = decoding.example_keys(jax.random.key(0), jnp.arange(4))
  sampler = speculative.SpeculativeSampler(gamma=3, max_len=10, method="greedy")
  got = jax.jit(sampler)(target, draft, inputs, mask, keys)
  want = jax.jit(decoding.make_model_sampler("greedy", max_len=10))(target, inputs, mask, keys)
  np.testing.assert_array_equal(got.decode.tokens, want.tokens)
  np.testing.assert_array_equal(got.decode.lengths, want.lengths)
  chex.assert_trees_all_close(got.decode.token_logprobs, want.token_logprobs, atol=1e-4)
  # A partly faithful draft: rows accept different numbers of drafts.
  assert 0 < got.accepted.sum() < got.drafted.sum()
  assert len(set(np.asarray(got.steps).ravel().tolist())) > 1


@pytest.mark.parametrize("name", ["t5v1.1-tiny", "llama-tiny"])
def test_model_samples_follow_the_target_sequence_distribution(name):
  vocab, max_len, n = 6, 3, 20000
  target, draft = _pair(name, vocab=vocab, noise=0.5)
  cfg = target.config
  inputs, mask = _prompt(cfg, batch=1)
  sampler = speculative.SpeculativeSampler(gamma=2, max_len=max_len, num_samples=n)
  got = jax.device_get(
    jax.jit(sampler)(target, draft, inputs, mask, decoding.example_keys(jax.random.key(3), [0]))
  )
  seqs = _as_keys(got.decode.tokens[0], got.decode.lengths[0])
  # Reference: teacher-forced `forward` on every outcome, float64 products.
  outcomes = _outcomes(vocab, max_len, cfg.eos_id)
  padded = np.array([list(s) + [cfg.pad_id] * (max_len - len(s)) for s in outcomes], np.int32)
  rep = len(outcomes)
  logits = jax.jit(models.forward)(
    target, jnp.repeat(inputs, rep, 0), jnp.repeat(mask, rep, 0), jnp.asarray(padded)
  ).logits
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)), np.float64)
  probs = {
    s: float(np.exp(sum(logp[i, t, tok] for t, tok in enumerate(s))))
    for i, s in enumerate(outcomes)
  }
  np.testing.assert_allclose(sum(probs.values()), 1.0, rtol=1e-6)
  assert _chi_square_p(seqs, probs) > FALSE_FAILURE
  assert got.rejected.sum() > n // 20 and got.accepted.sum() > n // 20


def test_mismatched_draft_and_bad_settings_are_reported():
  target = models.build_model(models.get_preset("llama-tiny"), 0)
  draft = models.build_model(models.get_preset("llama-tiny", vocab_size=32), 0)
  inputs, mask = _prompt(target.config, batch=2)
  keys = decoding.example_keys(jax.random.key(0), jnp.arange(2))
  sampler = speculative.SpeculativeSampler(gamma=2, max_len=4)
  with pytest.raises(ValueError, match="vocab_size: target 64, draft 32"):
    sampler(target, draft, inputs, mask, keys)
  with pytest.raises(ValueError, match="gamma must be >= 1, found 0"):
    speculative.SpeculativeSampler(gamma=0, max_len=4)
  with pytest.raises(ValueError, match="'greedy' or 'sample', found 'beam_search'"):
    speculative.SpeculativeSampler(gamma=2, max_len=4, method="beam_search")

"""Exhaustive checks of the step-wise decomposition on tiny autoregressive models.

Two random autoregressive models over a vocabulary of 3 tokens (token 0 is
EOS) and sequences of at most 4 tokens: every sequence is enumerated, so the
sequence-level divergences are computed exactly (float64) and compared with
the expectations of the step-wise terms.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill_jax import stepwise

VOCAB, LENGTH, EOS = 3, 4, 0


def _random_model(seed):
  """A table of next-token logits for every prefix (a tuple of tokens)."""
  rng = np.random.default_rng(seed)
  prefixes = [()]
  for n in range(1, LENGTH):
    prefixes += list(itertools.product(range(VOCAB), repeat=n))
  return {prefix: rng.normal(size=VOCAB) * 1.5 for prefix in prefixes}


def _sequences():
  """Every distinct sequence: ends at its first EOS, or after LENGTH tokens."""
  seen = set()
  for full in itertools.product(range(VOCAB), repeat=LENGTH):
    cut = full.index(EOS) + 1 if EOS in full else LENGTH
    seen.add(full[:cut])
  return sorted(seen)


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def _seq_logprob(model, seq):
  return sum(_log_softmax(model[seq[:t]])[tok] for t, tok in enumerate(seq))


def _batch(models, seqs):
  """Padded tokens, masks and per-model logits `[num_seqs, LENGTH, VOCAB]`."""
  tokens = np.zeros((len(seqs), LENGTH), np.int64)
  mask = np.zeros((len(seqs), LENGTH))
  logits = [np.zeros((len(seqs), LENGTH, VOCAB)) for _ in models]
  for i, seq in enumerate(seqs):
    tokens[i, : len(seq)] = seq
    mask[i, : len(seq)] = 1
    for t in range(LENGTH):
      prefix = seq[:t] if t < len(seq) else ()  # past the end: masked, any logits do
      for table, out in zip(models, logits, strict=True):
        out[i, t] = table[prefix]
  return tokens, mask, logits


@pytest.fixture(scope="module")
def setting():
  p_model, q_model = _random_model(0), _random_model(1)
  seqs = _sequences()
  seq_p = np.exp([_seq_logprob(p_model, s) for s in seqs])
  seq_q = np.exp([_seq_logprob(q_model, s) for s in seqs])
  assert abs(seq_p.sum() - 1) < 1e-12 and abs(seq_q.sum() - 1) < 1e-12
  tokens, mask, (p_logits, q_logits) = _batch([p_model, q_model], seqs)
  return dict(P=seq_p, Q=seq_q, tokens=tokens, mask=mask, p=p_logits, q=q_logits)


def _expected(s, name, weights, **kwargs):
  with jax.enable_x64(True):
    terms = stepwise.stepwise_terms(
      name,
      jnp.asarray(s["p"]),
      jnp.asarray(s["q"]),
      jnp.asarray(s["tokens"]),
      jnp.asarray(s["mask"]),
      **kwargs,
    )
    assert terms.dtype == jnp.float64
    return float(np.sum(weights * np.asarray(terms).sum(-1)))


def _kl(a, b):
  return float(np.sum(a * np.log(a / b)))


def test_stepwise_kl_is_exact(setting):
  s = setting
  np.testing.assert_allclose(_expected(s, "kl", s["P"]), _kl(s["P"], s["Q"]), atol=1e-6)


def test_stepwise_rkl_is_exact(setting):
  s = setting
  np.testing.assert_allclose(_expected(s, "rkl", s["Q"]), _kl(s["Q"], s["P"]), atol=1e-6)


@pytest.mark.parametrize("beta", [0.5, 0.85, 0.25])
def test_exact_js_is_exact_and_fixed_mixture_is_not(setting, beta):
  s = setting
  m = (1 - beta) * s["P"] + beta * s["Q"]
  exact = beta * _kl(s["Q"], m) + (1 - beta) * _kl(s["P"], m)
  if beta == 0.5:
    assert exact <= math.log(2)

  def estimate(exact_js):
    return (1 - beta) * _expected(
      s, "js", s["P"], side="teacher", beta=beta, exact_js=exact_js
    ) + beta * _expected(s, "js", s["Q"], side="student", beta=beta, exact_js=exact_js)

  np.testing.assert_allclose(estimate(True), exact, atol=1e-6)
  assert abs(estimate(False) - exact) > 1e-4


def test_stepwise_tvd_bounds_the_exact_tvd(setting):
  s = setting
  exact = 0.5 * float(np.abs(s["P"] - s["Q"]).sum())
  on_teacher = _expected(s, "tvd", s["P"])
  on_student = _expected(s, "tvd", s["Q"])
  assert on_teacher >= exact - 1e-12
  assert on_student >= exact - 1e-12
  assert 0.5 * (on_teacher + on_student) >= exact - 1e-12
  assert on_teacher > exact + 1e-3  # a real bound here, not an identity


def test_mask_zeroes_padding_terms(setting):
  s = setting
  with jax.enable_x64(True):
    terms = stepwise.stepwise_terms("kl", s["p"], s["q"], s["tokens"], s["mask"])
  assert np.all(np.asarray(terms)[s["mask"] == 0] == 0)
  assert np.all(np.asarray(terms)[s["mask"] == 1] > 0)


def test_bad_js_arguments():
  z = jnp.zeros((1, 2, 3))
  tok = jnp.zeros((1, 2), jnp.int32)
  with pytest.raises(ValueError, match="side"):
    stepwise.stepwise_terms("js", z, z, tok, jnp.ones((1, 2)), side="both")
  with pytest.raises(ValueError, match="beta"):
    stepwise.stepwise_terms("js", z, z, tok, jnp.ones((1, 2)), beta=0.0)

"""Jitted samplers over a tokens -> logits function with an explicit state.

Every sampler is model-agnostic. It drives

    tokens_to_logits(state, tokens [B]) -> (logits [B, V] float32, state)

from an initial `state` (a pytree whose leaves all have the batch on axis 0:
the models' KV cache, see docs/internals.md) and the first tokens to feed
(`start_tokens [B]`), inside one `lax.while_loop` with a static `max_len`.

Randomness is per example: `keys [B]` holds one PRNG key per input, derived
by the caller from a global example index (`example_keys`). Sample j of an
input uses `fold_in(key, j)` and step t folds in t again, so a sample never
depends on which other inputs share its batch or on the device count.

Every sampler returns `DecodeResult(tokens [B, n, T], token_logprobs
[B, n, T], lengths [B, n])`. Tokens after EOS are `pad_id`; EOS is kept and
counted in the length. `token_logprobs` are log-probs under the model's own
distribution at temperature 1 (before temperature, top-k or top-p), which is
what scoring and Monte Carlo divergence estimates need.

Greedy and ancestral sampling also take `per_step(logp [R, V]) -> pytree of
[R, ...]`, a function of each step's temperature-1 log-probs; with it they
return `(DecodeResult, outputs)`, the outputs stacked to `[B, n, T, ...]`
(zero after a row's EOS): what the teacher pass stores at every position (top-k, tail
mass) comes out of the decode loop's own logits, so the sampled sequences
need not be read again teacher-forced.

Methods: "greedy"; "sample" (ancestral, with temperature, top_k, top_p);
"beam_search" (length penalty as Hugging Face: sum log-prob / length**alpha);
"beam_sample" (stochastic beam search as Hugging Face's beam_sample, which
the original f-DISTILL scripts used for student samples: at each step 2K
candidates are drawn without replacement, by Gumbel-top-k, from the
temperature-scaled, per-beam top-k-filtered cumulative scores).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

METHODS = ("greedy", "sample", "beam_search", "beam_sample")
_ALLOWED = {  # parameters each method takes
  "greedy": set(),
  "sample": {"temperature", "top_k", "top_p"},
  "beam_search": {"num_beams", "length_penalty"},
  "beam_sample": {"num_beams", "length_penalty", "temperature", "top_k"},
}
_NEG = -1e30  # finite -inf: keeps arithmetic on dead beams NaN-free


class DecodeResult(NamedTuple):
  tokens: Array  # [B, n, T] int32
  token_logprobs: Array  # [B, n, T] float32
  lengths: Array  # [B, n] int32


def example_keys(rng: Array, example_index: Array) -> Array:
  """One key per input `[B]` from a base key and global example indices `[B]`."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(example_index))


def _repeat(tree, n: int):
  return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)


def _take(tree, index: Array):
  return jax.tree.map(lambda x: jnp.take(x, index, axis=0), tree)


def filter_logits(logits: Array, *, temperature=1.0, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Temperature, then top-k, then top-p (nucleus) filtering of `[..., V]` logits.

  Excluded tokens get -inf. Shapes stay static: thresholds come from a sort.
  """
  x = logits.astype(jnp.float32) / temperature
  if top_k and top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if top_p < 1.0:
    sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_x, axis=-1)
    # Keep a token while the mass before it is < top_p (the first is always kept).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < threshold, -jnp.inf, x)
  return x


class _SampleLoop(NamedTuple):
  step: Array
  state: object
  last: Array  # [R] token fed next
  done: Array  # [R] bool
  tokens: Array  # [R, T]
  logprobs: Array  # [R, T]
  lengths: Array  # [R]
  per_step: object  # leaves [R, T, ...]; None without a per_step function


def sample(
  tokens_to_logits: Callable,
  state,
  start_tokens: Array,
  keys: Array,
  *,
  max_len: int,
  eos_id: int,
  pad_id: int,
  num_samples: int = 1,
  greedy: bool = False,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  per_step: Callable | None = None,
):
  """Greedy (`greedy=True`) or ancestral sampling; `num_samples` per input.
  Returns a DecodeResult, or `(DecodeResult, outputs)` with `per_step` (see the
  module docstring)."""
  batch = start_tokens.shape[0]
  n = num_samples
  rows = batch * n
  state = _repeat(state, n)
  # Row r = b * n + j: key of sample j of input b.
  row_keys = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n)))(keys)
  row_keys = row_keys.reshape((rows,) + row_keys.shape[2:])
  extras = None
  if per_step is not None:
    first = jnp.repeat(start_tokens.astype(jnp.int32), n)
    logits_shape, _ = jax.eval_shape(tokens_to_logits, state, first)
    logp_shape = jax.ShapeDtypeStruct((rows, logits_shape.shape[-1]), jnp.float32)
    extras = jax.tree.map(
      lambda x: jnp.zeros((rows, max_len, *x.shape[1:]), x.dtype),
      jax.eval_shape(per_step, logp_shape),
    )
  init = _SampleLoop(
    step=jnp.array(0, jnp.int32),
    state=state,
    last=jnp.repeat(start_tokens.astype(jnp.int32), n),
    done=jnp.zeros((rows,), bool),
    tokens=jnp.full((rows, max_len), pad_id, jnp.int32),
    logprobs=jnp.zeros((rows, max_len), jnp.float32),
    lengths=jnp.zeros((rows,), jnp.int32),
    per_step=extras,
  )

  def cond(c):
    return (c.step < max_len) & ~jnp.all(c.done)

  def record(c, logp):
    if per_step is None:
      return None

    def put(buffer, value):
      done = c.done.reshape((rows,) + (1,) * (value.ndim - 1))
      return buffer.at[:, c.step].set(jnp.where(done, jnp.zeros_like(value), value))

    return jax.tree.map(put, c.per_step, per_step(logp))

  def body(c):
    logits, new_state = tokens_to_logits(c.state, c.last)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if greedy:
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
      step_keys = jax.vmap(lambda k: jax.random.fold_in(k, c.step))(row_keys)
      token = jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)
    token_lp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    token = jnp.where(c.done, pad_id, token)
    token_lp = jnp.where(c.done, 0.0, token_lp)
    return _SampleLoop(
      step=c.step + 1,
      state=new_state,
      last=token,
      done=c.done | (token == eos_id),
      tokens=c.tokens.at[:, c.step].set(token),
      logprobs=c.logprobs.at[:, c.step].set(token_lp),
      lengths=c.lengths + (~c.done).astype(jnp.int32),
      per_step=record(c, logp),
    )

  out = jax.lax.while_loop(cond, body, init)
  result = DecodeResult(
    out.tokens.reshape(batch, n, max_len),
    out.logprobs.reshape(batch, n, max_len),
    out.lengths.reshape(batch, n),
  )
  if per_step is None:
    return result
  return result, jax.tree.map(lambda x: x.reshape(batch, n, *x.shape[1:]), out.per_step)


class _BeamLoop(NamedTuple):
  step: Array
  state: object
  alive_tokens: Array  # [B, K, T]
  alive_tlp: Array  # [B, K, T] per-token log-probs
  alive_lp: Array  # [B, K] cumulative log-prob
  fin_tokens: Array  # [B, K, T]
  fin_tlp: Array  # [B, K, T]
  fin_score: Array  # [B, K] length-penalised score
  fin_len: Array  # [B, K]


def beam_search(
  tokens_to_logits: Callable,
  state,
  start_tokens: Array,
  keys: Array | None = None,
  *,
  max_len: int,
  eos_id: int,
  pad_id: int,
  num_beams: int = 4,
  num_samples: int = 1,
  length_penalty: float = 1.0,
  stochastic: bool = False,
  temperature: float = 1.0,
  top_k: int = 0,
) -> DecodeResult:
  """Beam search (or, with `stochastic=True`, beam-sample); returns the best `num_samples`.

  A hypothesis ending in EOS at length L (EOS counted) scores
  sum_log_prob / L**length_penalty; beams still alive at `max_len` are scored
  the same way at L = max_len.
  """
  if num_samples > num_beams:
    raise ValueError(f"num_samples {num_samples} > num_beams {num_beams}")
  if stochastic and keys is None:
    raise ValueError("beam_sample needs per-example keys")
  b, k, t_max = start_tokens.shape[0], num_beams, max_len
  flat_state = _repeat(state, k)
  init = _BeamLoop(
    step=jnp.array(0, jnp.int32),
    state=(flat_state, jnp.repeat(start_tokens.astype(jnp.int32), k)),
    alive_tokens=jnp.full((b, k, t_max), pad_id, jnp.int32),
    alive_tlp=jnp.zeros((b, k, t_max), jnp.float32),
    alive_lp=jnp.tile(jnp.array([0.0] + [_NEG] * (k - 1), jnp.float32), (b, 1)),
    fin_tokens=jnp.full((b, k, t_max), pad_id, jnp.int32),
    fin_tlp=jnp.zeros((b, k, t_max), jnp.float32),
    fin_score=jnp.full((b, k), _NEG, jnp.float32),
    fin_len=jnp.zeros((b, k), jnp.int32),
  )

  def penalised(lp, length):
    return lp / jnp.power(length.astype(jnp.float32), length_penalty)

  def cond(c):
    if length_penalty != 0.0:
      return c.step < t_max
    # Without a length penalty scores only fall: stop once no alive beam can win.
    best_alive = jnp.max(c.alive_lp, axis=-1)
    worst_fin = jnp.min(c.fin_score, axis=-1)
    return (c.step < t_max) & jnp.any(best_alive > worst_fin)

  def body(c):
    flat_state, last = c.state
    logits, new_state = tokens_to_logits(flat_state, last)
    vocab = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
    cand_lp = c.alive_lp[..., None] + logp  # [B, K, V]
    if stochastic:
      x = cand_lp / temperature
      if top_k and top_k < vocab:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x < kth, _NEG, x)
      step_keys = jax.vmap(lambda key: jax.random.fold_in(key, c.step))(keys)
      gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (k * vocab,)))(step_keys)
      _, idx = jax.lax.top_k(x.reshape(b, k * vocab) + gumbel, 2 * k)
      top_lp = jnp.take_along_axis(cand_lp.reshape(b, k * vocab), idx, axis=-1)
      order = jnp.argsort(-top_lp, axis=-1)  # rank the drawn candidates by score
      idx, top_lp = (jnp.take_along_axis(a, order, axis=-1) for a in (idx, top_lp))
    else:
      top_lp, idx = jax.lax.top_k(cand_lp.reshape(b, k * vocab), 2 * k)
    beam, token = idx // vocab, (idx % vocab).astype(jnp.int32)  # [B, 2K]
    token_lp = jnp.take_along_axis(logp.reshape(b, k * vocab), idx, axis=-1)
    seqs = jnp.take_along_axis(c.alive_tokens, beam[..., None], axis=1).at[:, :, c.step].set(token)
    tlps = jnp.take_along_axis(c.alive_tlp, beam[..., None], axis=1).at[:, :, c.step].set(token_lp)
    is_eos = token == eos_id
    length = c.step + 1
    # Finished: the old ones plus candidates that emit EOS now.
    new_fin = jnp.where(is_eos & (top_lp > _NEG / 2), penalised(top_lp, length), _NEG)
    all_score = jnp.concatenate([c.fin_score, new_fin], axis=1)
    keep_score, keep = jax.lax.top_k(all_score, k)
    all_tokens = jnp.concatenate([c.fin_tokens, seqs], axis=1)
    all_tlp = jnp.concatenate([c.fin_tlp, tlps], axis=1)
    all_len = jnp.concatenate([c.fin_len, jnp.full_like(token, length)], axis=1)
    # Alive: the best K candidates that did not end.
    alive_score = jnp.where(is_eos, _NEG, top_lp)
    alive_lp, pick = jax.lax.top_k(alive_score, k)
    src_beam = jnp.take_along_axis(beam, pick, axis=-1)  # [B, K]
    flat_index = (jnp.arange(b)[:, None] * k + src_beam).reshape(-1)
    return _BeamLoop(
      step=length,
      state=(_take(new_state, flat_index), jnp.take_along_axis(token, pick, axis=-1).reshape(-1)),
      alive_tokens=jnp.take_along_axis(seqs, pick[..., None], axis=1),
      alive_tlp=jnp.take_along_axis(tlps, pick[..., None], axis=1),
      alive_lp=alive_lp,
      fin_tokens=jnp.take_along_axis(all_tokens, keep[..., None], axis=1),
      fin_tlp=jnp.take_along_axis(all_tlp, keep[..., None], axis=1),
      fin_score=keep_score,
      fin_len=jnp.take_along_axis(all_len, keep, axis=-1),
    )

  out = jax.lax.while_loop(cond, body, init)
  # Beams alive at the end compete at their current length.
  alive_len = jnp.full((b, k), out.step, jnp.int32)
  alive_score = jnp.where(out.alive_lp > _NEG / 2, penalised(out.alive_lp, alive_len), _NEG)
  scores = jnp.concatenate([out.fin_score, alive_score], axis=1)
  _, best = jax.lax.top_k(scores, num_samples)
  tokens = jnp.concatenate([out.fin_tokens, out.alive_tokens], axis=1)
  tlp = jnp.concatenate([out.fin_tlp, out.alive_tlp], axis=1)
  lengths = jnp.concatenate([out.fin_len, alive_len], axis=1)
  return DecodeResult(
    jnp.take_along_axis(tokens, best[..., None], axis=1),
    jnp.take_along_axis(tlp, best[..., None], axis=1),
    jnp.take_along_axis(lengths, best, axis=-1),
  )


def decode(
  tokens_to_logits: Callable,
  state,
  start_tokens: Array,
  keys: Array | None,
  *,
  method: str,
  max_len: int,
  eos_id: int,
  pad_id: int,
  num_samples: int = 1,
  per_step: Callable | None = None,
  **params,
):
  """One front door for every method (params: temperature, top_k, top_p, num_beams,
  length_penalty, as each method takes them; `per_step`: greedy and sample only)."""
  common = dict(max_len=max_len, eos_id=eos_id, pad_id=pad_id, num_samples=num_samples)
  if method not in _ALLOWED:
    raise ValueError(f"unknown decoding method {method!r}; expected one of {METHODS}")
  unknown = set(params) - _ALLOWED[method]
  if unknown:
    raise ValueError(
      f"decoding method {method!r} takes {sorted(_ALLOWED[method])}, found {sorted(unknown)}"
    )
  if method in ("greedy", "sample"):
    if keys is None:
      keys = jnp.zeros((start_tokens.shape[0], 2), jnp.uint32)
    greedy = method == "greedy"
    return sample(
      tokens_to_logits,
      state,
      start_tokens,
      keys,
      greedy=greedy,
      per_step=per_step,
      **common,
      **params,
    )
  if per_step is not None:
    raise ValueError(f"per_step outputs are for greedy and sample, not {method!r}")
  if method == "beam_sample":
    params.setdefault("num_beams", 4)
    return beam_search(
      tokens_to_logits, state, start_tokens, keys, stochastic=True, **common, **params
    )
  return beam_search(tokens_to_logits, state, start_tokens, keys, **common, **params)


@dataclasses.dataclass(frozen=True)
class ModelSampler:
  """A sampler over a `fdistill_jax.models` model, in the form the trainer and teacher pass use:

      sampler(model, inputs [B, S], input_mask [B, S], keys [B]) -> DecodeResult
      sampler(..., per_step=f) -> (DecodeResult, f's outputs [B, n, T, ...])  (greedy, sample)

  Traceable (call it inside `jax.jit`). Frozen and compared by value, so it is
  a stable static argument: equal settings reuse a compiled step.
  """

  method: str
  num_samples: int
  max_len: int
  settings: tuple = ()  # sorted (name, value) pairs passed to `decode`

  def __call__(self, model, inputs, input_mask, keys, per_step=None):
    from fdistill_jax import models

    state = models.init_decode_state(model, inputs, input_mask, self.max_len)
    start = models.start_tokens(model, inputs, input_mask)
    return decode(
      lambda s, tok: models.decode_step(model, s, tok),
      state,
      start,
      keys,
      method=self.method,
      max_len=self.max_len,
      eos_id=model.config.eos_id,
      pad_id=model.config.pad_id,
      num_samples=self.num_samples,
      per_step=per_step,
      **dict(self.settings),
    )


def make_model_sampler(method: str, *, num_samples: int = 1, max_len: int, **params):
  """A `ModelSampler`; unknown methods or parameters fail here, before tracing."""
  if method not in METHODS:
    raise ValueError(f"unknown decoding method {method!r}; expected one of {METHODS}")
  unknown = set(params) - _ALLOWED[method]
  if unknown:
    raise ValueError(
      f"decoding method {method!r} takes {sorted(_ALLOWED[method])}, found {sorted(unknown)}"
    )
  return ModelSampler(method, num_samples, max_len, tuple(sorted(params.items())))


# ---------------------------------------------------------------------------
# Samplers.
# ---------------------------------------------------------------------------

# Values that mean "off" or "the method's default": never passed to a method.
NEUTRAL_SAMPLER_PARAMS = {
  "temperature": 1.0,
  "top_k": 0,
  "top_p": 1.0,
  "num_beams": 0,
  "length_penalty": 1.0,
}


def sampler_params(sampler_cfg) -> dict:
  """The `config.sampler` parameters that differ from their neutral value."""
  return {
    k: sampler_cfg[k]
    for k, neutral in NEUTRAL_SAMPLER_PARAMS.items()
    if k in sampler_cfg and sampler_cfg[k] != neutral
  }


def method_params(method: str, blocks, where: str) -> tuple:
  """The sorted `(name, value)` pairs of `method`'s block in `blocks` (method -> {param: value}).

  Only the chosen method's block is read, so switching methods drops the
  others' parameters; values at their neutral setting are left out, as
  `sampler_params` does, so the method's defaults hold. Names a method
  does not take are kept, for `make_model_sampler` to refuse.
  """
  blocks = blocks.to_dict() if hasattr(blocks, "to_dict") else dict(blocks or {})
  flat = sorted(k for k in blocks if k not in METHODS)
  if flat:
    raise ValueError(
      f"{where}: expected one block per decoding method {list(METHODS)} "
      f"(e.g. {where}.{method}.PARAM), found the keys {flat}"
    )
  block = dict(blocks.get(method) or {})
  neutral = NEUTRAL_SAMPLER_PARAMS
  return tuple(sorted((k, v) for k, v in block.items() if k not in neutral or v != neutral[k]))


def default_sampler(mode: str, sampler_cfg, max_len: int):
  """The trainer's sampler (`config.sampler`): (model, inputs, input_mask, keys) -> DecodeResult.

  `mode` is the plan's `decoding`: "greedy" ignores `config.sampler`;
  "sampler" uses it (also for online teacher samples).
  """
  if mode == "greedy":
    return make_model_sampler("greedy", num_samples=1, max_len=max_len)
  return make_model_sampler(
    sampler_cfg.name,
    num_samples=sampler_cfg.num_samples,
    max_len=max_len,
    **sampler_params(sampler_cfg),
  )

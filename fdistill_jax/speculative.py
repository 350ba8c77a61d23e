"""Speculative sampling: a small draft model proposes, the target model verifies.

Leviathan et al. (2023) and Chen et al. (2023). Each verification step, per row:

  1. the draft decodes gamma tokens d_1..d_gamma from its distributions q_i,
     one cached step each, in a scan of gamma + 1 steps whose last one only
     feeds d_gamma (so the draft cache is complete when all are accepted);
  2. the target scores [last, d_1..d_gamma] in one cached forward (`extend`),
     giving p_1..p_{gamma+1};
  3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), left to
     right until the first rejection; n = number accepted;
  4. one more token is drawn: from the residual norm(max(0, p_{n+1} - q_{n+1}))
     after a rejection, from p_{gamma+1} when all gamma were accepted;
  5. both caches are rewound past the rejected drafts (`rewind`).

The emitted tokens are distributed exactly as the target's own sampler with
the same settings (`decoding.sample`): p and q are the distributions after
the same temperature / top-k / top-p processing (`decoding.filter_logits`).
Greedy decoding is the same algorithm with one-hot p and q (accept iff the
target's argmax equals the draft, then emit the target's argmax), so it
returns exactly the target's greedy output.

Rows advance by different amounts: every row keeps its own cache index, the
caches are allocated for `max_len + gamma` slots, and rows that finished
(EOS or `max_len`) keep computing with masked updates, so shapes are static.

Randomness is per row as in `decoding`: sample j of input b uses
`fold_in(keys[b], j)`, and verification step s folds in s again; the draws
of one step are split from that key. Outputs never depend on which other
inputs share the batch.

The models are driven through `Cached(extend, rewind)`:

    extend(state, tokens [R, L]) -> (logits [R, L, V] float32, state)
    rewind(state, num [R]) -> state   (forget the last num[r] tokens fed)

`models.extend` / `models.rewind` provide them for the library's models
(`SpeculativeSampler`); tests pass fakes with exactly known distributions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fdistill_jax import models
from fdistill_jax.decoding import DecodeResult, filter_logits

Array = jax.Array


class Cached(NamedTuple):
  """A model behind an explicit KV cache, as the speculative sampler drives it."""

  extend: Callable  # (state, tokens [R, L]) -> (logits [R, L, V] float32, state)
  rewind: Callable  # (state, num [R]) -> state


class SpeculativeResult(NamedTuple):
  decode: DecodeResult  # tokens, target log-probs (temperature 1), lengths: as `decoding`
  steps: Array  # [B, n] int32 verification steps (target calls) per row
  drafted: Array  # [B, n] int32 draft tokens proposed (gamma per step)
  accepted: Array  # [B, n] int32 draft tokens the target accepted (up to EOS)
  rejected: Array  # [B, n] int32 steps that ended in a rejection (before EOS)


def acceptance_rate(result: SpeculativeResult) -> Array:
  """Measured per-token acceptance: accepted / (accepted + rejected), over all rows.

  Every accept/reject test is counted once (drafts after a rejection are
  never tested), so this estimates the mean of 1 - TVD(p, q) over the tested
  positions; accepted / drafted is the fraction of drafting work kept.
  `metrics.expected_tokens_per_step` turns a rate into tokens per step.
  """
  accepted = jnp.sum(result.accepted).astype(jnp.float32)
  return accepted / jnp.maximum(accepted + jnp.sum(result.rejected), 1.0)


class _Loop(NamedTuple):
  step: Array
  target_state: object
  draft_state: object
  last: Array  # [R] last emitted token, not yet fed to either model
  done: Array  # [R] bool
  tokens: Array  # [R, max_len + gamma + 1] (room for a whole block past max_len)
  logprobs: Array  # [R, max_len + gamma + 1]
  lengths: Array  # [R]
  accepted: Array  # [R]
  rejected: Array  # [R]
  steps: Array  # [R]


def _write(buffer, block, index):
  """buffer [R, W] with block [R, L] written at per-row column index [R]."""
  return jax.vmap(lambda b, x, i: jax.lax.dynamic_update_slice_in_dim(b, x, i, 0))(
    buffer, block, index
  )


def _draw(keys, probs):
  """One token per row from probs [R, V] (zeros excluded); keys [R]."""
  return jax.vmap(jax.random.categorical)(keys, jnp.log(probs)).astype(jnp.int32)


def speculative_sample(
  target: Cached,
  draft: Cached,
  target_state,
  draft_state,
  start_tokens: Array,
  keys: Array,
  *,
  gamma: int,
  max_len: int,
  eos_id: int,
  pad_id: int,
  num_samples: int = 1,
  greedy: bool = False,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> SpeculativeResult:
  """Speculative greedy decoding or sampling of `num_samples` sequences per input.

  target_state, draft_state: the models' decode states for the batch (leaves
  [B, ...]) with caches of at least `max_len + gamma` slots past the prompt;
  start_tokens [B] int, keys [B] PRNG keys. Returns the target's
  distribution's sequences [B, n, max_len] and per-row acceptance counts.
  """
  if gamma < 1:
    raise ValueError(f"speculative decoding: gamma (draft length) must be >= 1, found {gamma}")
  batch, n, g = start_tokens.shape[0], num_samples, gamma
  rows, width = batch * n, max_len + g + 1

  def repeat(tree):
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)

  def probs(logits):
    """[..., V] logits -> the sampling distribution after greedy / temperature / top-k / top-p."""
    if greedy:
      return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(
      filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p), axis=-1
    )

  def pick(step_keys, p):
    return jnp.argmax(p, axis=-1).astype(jnp.int32) if greedy else _draw(step_keys, p)

  # Row r = b * n + j: key of sample j of input b.
  row_keys = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n)))(keys)
  row_keys = row_keys.reshape((rows,) + row_keys.shape[2:])
  zeros = jnp.zeros((rows,), jnp.int32)
  init = _Loop(
    step=jnp.array(0, jnp.int32),
    target_state=repeat(target_state),
    draft_state=repeat(draft_state),
    last=jnp.repeat(start_tokens.astype(jnp.int32), n),
    done=jnp.zeros((rows,), bool),
    tokens=jnp.full((rows, width), pad_id, jnp.int32),
    logprobs=jnp.zeros((rows, width), jnp.float32),
    lengths=zeros,
    accepted=zeros,
    rejected=zeros,
    steps=zeros,
  )
  slots = jnp.arange(g + 1, dtype=jnp.int32)

  def cond(c):
    return (c.step < max_len) & ~jnp.all(c.done)

  def body(c):
    step_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, c.step), 2 * g + 1))(
      row_keys
    )  # [R, 2g + 1]: g draft draws, g acceptance uniforms, 1 final draw

    # -- draft: gamma cached steps, and one more that only feeds d_gamma -------
    def draft_one(carry, i):
      state, token = carry
      logits, state = draft.extend(state, token[:, None])
      q = probs(logits[:, 0])  # [R, V]
      token = pick(step_keys[:, jnp.minimum(i, g - 1)], q)  # step g: drawn, never used
      return (state, token), (token, q)

    (draft_state, _), (drafts, qs) = jax.lax.scan(
      draft_one, (c.draft_state, c.last), jnp.arange(g + 1)
    )
    drafts, qs = drafts[:g].T, jnp.swapaxes(qs[:g], 0, 1)  # [R, g], [R, g, V]

    # -- verify: one target forward over [last, d_1..d_gamma] -----------------
    block = jnp.concatenate([c.last[:, None], drafts], axis=1)  # [R, g + 1]
    target_logits, target_state = target.extend(c.target_state, block)  # [R, g + 1, V]
    ps = probs(target_logits)
    p_d = jnp.take_along_axis(ps[:, :g], drafts[..., None], axis=-1)[..., 0]  # [R, g]
    q_d = jnp.take_along_axis(qs, drafts[..., None], axis=-1)[..., 0]
    uniform = jax.vmap(jax.vmap(lambda k: jax.random.uniform(k)))(step_keys[:, g : 2 * g])
    ok = uniform * q_d < p_d  # u < p/q without dividing; greedy: p_d in {0, 1}, q_d = 1
    num_ok = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [R] in [0, g]

    # -- the next token: residual after a rejection, p_{g+1} after none -------
    qs_pad = jnp.concatenate([qs, jnp.zeros_like(qs[:, :1])], axis=1)  # q_{g+1} := 0
    p_n = jnp.take_along_axis(ps, num_ok[:, None, None], axis=1)[:, 0]  # [R, V]
    q_n = jnp.take_along_axis(qs_pad, num_ok[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_n - q_n, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    # mass 0 only where p_n == q_n to rounding, which rejects with probability ~0.
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_n)
    final = pick(step_keys[:, 2 * g], residual)

    # -- emit d_1..d_n, final; stop at EOS and max_len --------------------------
    emitted = jnp.concatenate([drafts, final[:, None]], axis=1)
    emitted = jnp.where(slots[None] < num_ok[:, None], emitted, final[:, None])
    in_block = slots[None] <= num_ok[:, None]
    is_eos = (emitted == eos_id) & in_block
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), g + 1)
    count = jnp.minimum(num_ok + 1, first_eos + 1)  # [R] tokens emitted this step
    valid = slots[None] < count[:, None]
    emitted = jnp.where(valid, emitted, pad_id)
    logp = jax.nn.log_softmax(target_logits, axis=-1)
    emitted_lp = jnp.take_along_axis(logp, emitted[..., None], axis=-1)[..., 0] * valid
    # Tests of drafts after an emitted EOS judge contexts no output has: not counted.
    tested = jnp.minimum(num_ok + (num_ok < g), count)
    accepted = jnp.minimum(num_ok, count)
    active = ~c.done
    act = active.astype(jnp.int32)
    lengths = c.lengths + count * act
    done = c.done | jnp.any(is_eos & valid, axis=1) | (lengths >= max_len)
    # [last, d_1..d_n] stay in both caches; a finished row keeps its cache index
    # where the next (ignored) blocks still fit in the cache.
    keep_fed = jnp.where(done, 0, num_ok + 1)

    def rewind(cached, state):
      return cached.rewind(state, (g + 1) - keep_fed)

    return _Loop(
      step=c.step + 1,
      target_state=rewind(target, target_state),
      draft_state=rewind(draft, draft_state),
      last=jnp.where(active, final, c.last),
      done=done,
      tokens=jnp.where(active[:, None], _write(c.tokens, emitted, c.lengths), c.tokens),
      logprobs=jnp.where(active[:, None], _write(c.logprobs, emitted_lp, c.lengths), c.logprobs),
      lengths=lengths,
      accepted=c.accepted + accepted * act,
      rejected=c.rejected + (tested - accepted) * act,
      steps=c.steps + act,
    )

  out = jax.lax.while_loop(cond, body, init)
  lengths = jnp.minimum(out.lengths, max_len)
  keep = jnp.arange(max_len)[None] < lengths[:, None]
  tokens = jnp.where(keep, out.tokens[:, :max_len], pad_id)
  logprobs = jnp.where(keep, out.logprobs[:, :max_len], 0.0)

  def per_input(x):
    return x.reshape((batch, n) + x.shape[1:])

  return SpeculativeResult(
    decode=DecodeResult(per_input(tokens), per_input(logprobs), per_input(lengths)),
    steps=per_input(out.steps),
    drafted=per_input(out.steps * g),
    accepted=per_input(out.accepted),
    rejected=per_input(out.rejected),
  )


def model_cached(model) -> Cached:
  """`Cached` over a `fdistill_jax.models` model (`models.extend`, `models.rewind`)."""
  return Cached(
    lambda state, tokens: models.extend(model, state, tokens),
    lambda state, num: models.rewind(model, state, num),
  )


def check_pair(target_config, draft_config):
  """A draft must share the target's vocabulary, special ids and model kind: raise if not."""
  fields = ["vocab_size", "eos_id", "pad_id", "is_encoder_decoder"]
  if target_config.is_encoder_decoder:
    fields.append("start_id")
  bad = [
    f"{f}: target {getattr(target_config, f)!r}, draft {getattr(draft_config, f)!r}"
    for f in fields
    if getattr(target_config, f) != getattr(draft_config, f)
  ]
  if bad:
    raise ValueError(
      "speculative decoding: the draft model must match the target on "
      f"{', '.join(fields)}; found " + "; ".join(bad)
    )


@dataclasses.dataclass(frozen=True)
class SpeculativeSampler:
  """Speculative decoding over two `fdistill_jax.models` models:

      sampler(target, draft, inputs [B, S], input_mask [B, S], keys [B]) -> SpeculativeResult

  Traceable (call it inside `jax.jit`); frozen and compared by value, so it
  is a stable static argument. `method` is "greedy" or "sample".
  """

  gamma: int  # draft tokens per verification step
  max_len: int  # new tokens per sequence
  method: str = "sample"  # "greedy" or "sample"
  num_samples: int = 1  # sequences per input
  temperature: float = 1.0  # sampling only
  top_k: int = 0  # sampling only; 0 keeps every token
  top_p: float = 1.0  # sampling only; 1 keeps every token

  def __post_init__(self):
    if self.method not in ("greedy", "sample"):
      raise ValueError(
        f"speculative decoding: method must be 'greedy' or 'sample', found {self.method!r}"
      )
    if self.gamma < 1:
      raise ValueError(f"speculative decoding: gamma must be >= 1, found {self.gamma}")

  def __call__(self, target, draft, inputs, input_mask, keys) -> SpeculativeResult:
    check_pair(target.config, draft.config)
    # Verification writes up to gamma slots past the last emitted token.
    room = self.max_len + self.gamma
    return speculative_sample(
      model_cached(target),
      model_cached(draft),
      models.init_decode_state(target, inputs, input_mask, room),
      models.init_decode_state(draft, inputs, input_mask, room),
      models.start_tokens(target, inputs, input_mask),
      keys,
      gamma=self.gamma,
      max_len=self.max_len,
      eos_id=target.config.eos_id,
      pad_id=target.config.pad_id,
      num_samples=self.num_samples,
      greedy=self.method == "greedy",
      temperature=self.temperature,
      top_k=self.top_k,
      top_p=self.top_p,
    )

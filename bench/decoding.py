"""KV-cache decoding speedup: the library's cached greedy decoder vs re-running the model.

For a T5 and a LLaMA model (the `t5-bench` / `llama-bench` presets: vocab
32128, d_model 256; random weights, float32), a batch of full-length,
unpadded sources/prompts is decoded greedily for exactly `new_tokens` tokens
per row (EOS masked on both sides, so no row stops early) by two jitted
programs that start from the same token ids:

* cache: the library's path, `models.init_decode_state` (encode the source or
  prefill the prompt, allocate the KV cache) and `decoding.decode(method=
  "greedy")` over `models.decode_step`, as `decoding.make_model_sampler`
  runs it for the trainer and the teacher pass;
* nocache: the naive baseline (HF `generate` with `use_cache=False`): one
  `lax.fori_loop` whose every step re-runs the model over the whole
  fixed-length token buffer (`models.forward`, teacher-forced on the tokens
  generated so far, padded) and reads the output head at the current
  position only. T5's encoder runs once, before the loop, as `generate`
  does; the decoder (T5) or the prompt plus the continuation (LLaMA) is
  recomputed every step.

`cache_speedup/<model>` = nocache time / cache time (target >= 5).
`token_agreement/<model>` is the fraction of generated tokens the two paths
agree on (both are exact greedy decoders, so 1.0 unless float rounding breaks
a near-tie). Runs of the two sides alternate; figures are medians after
warm-up.

  python -m bench.decoding [--preset cpu|full] [--repeats N]
"""

from __future__ import annotations

from bench import common

common.setup_env()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from fdistill_jax import decoding, models  # noqa: E402
from fdistill_jax.models import layers  # noqa: E402
from fdistill_jax.models.encdec import EncoderDecoder  # noqa: E402

PRESETS = {
  "cpu": dict(batch=8, src_len=64, new_tokens=128),
  "full": dict(batch=8, src_len=64, new_tokens=512),
  # A seconds-long check that the script runs (with --no-write).
  "tiny": dict(batch=2, src_len=8, new_tokens=8),
}
MODELS = {"t5": "t5-bench", "llama": "llama-bench"}
TARGET = 5.0


def cached_greedy(model, new_tokens: int):
  """jit(state, inputs [B, S], input_mask [B, S]) -> tokens [B, new_tokens]: the library path."""
  eos = model.config.eos_id

  def run(graph_state, inputs, input_mask):
    m = nnx.merge(graphdef, graph_state)
    state = models.init_decode_state(m, inputs, input_mask, new_tokens)

    def tokens_to_logits(s, tok):
      logits, s = models.decode_step(m, s, tok)
      return logits.at[:, eos].set(-jnp.inf), s  # every row decodes all new_tokens

    out = decoding.decode(
      tokens_to_logits,
      state,
      models.start_tokens(m, inputs, input_mask),
      None,
      method="greedy",
      max_len=new_tokens,
      eos_id=eos,
      pad_id=m.config.pad_id,
    )
    return out.tokens[:, 0]

  graphdef, _ = nnx.split(model)
  return jax.jit(run)


def uncached_greedy(model, new_tokens: int):
  """jit(state, inputs, input_mask) -> tokens [B, new_tokens]: every step re-runs the
  model over the whole [B, new_tokens] buffer (no KV cache)."""
  eos = model.config.eos_id

  def run(graph_state, inputs, input_mask):
    m = nnx.merge(graphdef, graph_state)
    head_w, head_scale = models.output_head(m)
    buffer = jnp.full((inputs.shape[0], new_tokens), m.config.pad_id, jnp.int32)
    if isinstance(m, EncoderDecoder):
      cross = m.cross_kv(m.encode(inputs, input_mask))
      cross_bias = layers.mask_bias(input_mask)

      def hidden_of(buf):
        return m.decode_teacher_forced(buf, cross, cross_bias)[0]

    else:

      def hidden_of(buf):
        return models.forward(m, inputs, input_mask, buf, with_logits=False).hidden

    def step(t, buf):
      hidden = jax.lax.dynamic_index_in_dim(hidden_of(buf), t, axis=1, keepdims=False)
      logits = layers.logits_from_hidden(hidden, head_w, head_scale)  # [B, V]
      token = jnp.argmax(logits.at[:, eos].set(-jnp.inf), axis=-1).astype(jnp.int32)
      return jax.lax.dynamic_update_index_in_dim(buf, token, t, axis=1)

    return jax.lax.fori_loop(0, new_tokens, step, buffer)

  graphdef, _ = nnx.split(model)
  return jax.jit(run)


def measure(preset: str, cfg: dict, *, warmup: int, repeats: int, seed: int = 0) -> dict:
  """Times both paths on one model; returns {"cache": s, "nocache": s, "agreement": f}."""
  model_cfg = models.get_preset(preset)
  model = models.build_model(model_cfg, rngs=seed)
  rng = np.random.default_rng(seed)
  inputs = jnp.asarray(
    rng.integers(3, model_cfg.vocab_size, (cfg["batch"], cfg["src_len"]), dtype=np.int32)
  )
  mask = jnp.ones(inputs.shape, jnp.float32)
  params = nnx.split(model)[1]
  cached, uncached = (
    cached_greedy(model, cfg["new_tokens"]),
    uncached_greedy(model, cfg["new_tokens"]),
  )
  out = {}

  def side(name, fn):
    def call():
      out[name] = fn(params, inputs, mask)
      return out[name]

    return call

  times = common.time_rotating(
    {"cache": side("cache", cached), "nocache": side("nocache", uncached)},
    warmup=warmup,
    repeats=repeats,
  )
  tokens = {k: np.asarray(v) for k, v in out.items()}
  agree = tokens["cache"] == tokens["nocache"]
  first_miss = np.where(~agree.all(axis=0))[0]
  return {
    **times,
    "agreement": float(np.mean(agree)),
    "first_disagreement": int(first_miss[0]) if first_miss.size else None,
    "eos_generated": bool(np.any(tokens["cache"] == model.config.eos_id)),
  }


def run(args) -> dict:
  cfg = PRESETS[args.preset]
  repeats = args.repeats or (3 if args.preset != "full" else 10)
  n_tokens = cfg["batch"] * cfg["new_tokens"]
  figures, notes = {}, []
  for key, preset in MODELS.items():
    r = measure(preset, cfg, warmup=args.warmup, repeats=repeats)
    assert not r["eos_generated"], f"{key}: EOS was generated although masked"
    speedup = r["nocache"] / r["cache"]
    note = ""
    if speedup < TARGET:
      note = (
        f"misses {TARGET:g}x by {TARGET / speedup:.2f}x: caching removes only the re-run of "
        "the prefix; the per-step output head [B, D] x [D, V] and loop overheads stay, and "
        f"weigh more at {cfg['new_tokens']} new tokens"
      )
    figures[f"cache_speedup/{key}"] = common.figure(
      speedup, "x", target=TARGET, better="higher", note=note
    )
    figures[f"tokens_per_s/{key}/cache"] = common.figure(n_tokens / r["cache"], "tokens/s")
    figures[f"tokens_per_s/{key}/nocache"] = common.figure(n_tokens / r["nocache"], "tokens/s")
    agreement_note = (
      "identical greedy tokens"
      if r["first_disagreement"] is None
      else f"rows first differ at step {r['first_disagreement']} (float near-tie), then diverge"
    )
    figures[f"token_agreement/{key}"] = common.figure(
      r["agreement"], "fraction", note=agreement_note
    )
    print(
      f"{key}: cache {r['cache']:.3f}s nocache {r['nocache']:.3f}s speedup {speedup:.2f}x "
      f"agreement {r['agreement']:.3f}",
      flush=True,
    )
  notes.append(
    f"Greedy decoding, batch {cfg['batch']}, {cfg['src_len']}-token unpadded source/prompt, "
    f"{cfg['new_tokens']} new tokens per row (EOS masked on both sides), float32, random "
    "`t5-bench` (4+4 layers) / `llama-bench` (8 layers) weights, vocab 32128, d_model 256; "
    "each side one jitted call from token ids to generated tokens. cache = the library's "
    "decoder: `models.init_decode_state` (encode / prefill, KV cache) + "
    "`decoding.decode(method='greedy')` over `models.decode_step`, as "
    "`decoding.make_model_sampler` runs it. nocache = a `lax.fori_loop` whose every step "
    "re-runs the model over the whole fixed-length padded buffer (T5: the decoder of "
    "`models.forward` over the new_tokens-slot target buffer, the encoder run once before the "
    "loop; LLaMA: `models.forward` over prompt + target buffer) and applies the output head at "
    "the current position only, like HF `generate(use_cache=False)`. "
    f"`cache_speedup` = nocache time / cache time; median of {repeats} alternated runs after "
    f"{args.warmup} warm-up (times include the encoder / prefill on both sides)."
  )
  return common.write_results("decoding", figures, notes=notes, write=not args.no_write)


if __name__ == "__main__":
  run(common.parse_args(__doc__, presets=("cpu", "full", "tiny")))

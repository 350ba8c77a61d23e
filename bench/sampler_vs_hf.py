"""Sampler tokens/s against Hugging Face `generate` on the same weights (CPU).

For a T5 and a LLaMA model (the `t5-bench` / `llama-bench` presets: vocab
32128, d_model 256; random weights), the JAX model is exported with
`convert.export_hf`, so `transformers` loads the identical weights in its own
process (`bench/hf_generate.py`, dev venv, PyTorch CPU). Both sides decode
greedily, with their KV caches, exactly `new_tokens` tokens per row (EOS is
masked on both sides so no row stops early), from the same full-length,
unpadded batch. The JAX side is `decoding.decode` over
`models.decode_step`, jitted as one call. Runs of the two sides alternate;
figures are medians after warm-up. `hf_speedup/<model>` = JAX tokens/s ÷ HF
tokens/s (target >= 3). `hf_token_agreement/<model>` is the fraction of
generated tokens that agree (a check that both sides do the same work).

  python -m bench.sampler_vs_hf [--preset cpu|full] [--repeats N]
"""

from __future__ import annotations

from bench import common

common.setup_env()

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.decoding import cached_greedy  # noqa: E402
from bench.loss_kernel import REPO, torch_python  # noqa: E402
from fdistill_jax import models  # noqa: E402
from fdistill_jax.convert import export_hf  # noqa: E402

PRESETS = {
  "cpu": dict(batch=8, src_len=64, new_tokens=64),
  "full": dict(batch=64, src_len=128, new_tokens=128),
}
MODELS = {"t5": ("t5-bench", "seq2seq"), "llama": ("llama-bench", "causal")}


class HFWorker:
  def __init__(self, python, folder, kind, inputs_path, new_tokens, threads):
    self.proc = subprocess.Popen(
      [
        python,
        str(REPO / "bench" / "hf_generate.py"),
        "--model",
        folder,
        "--kind",
        kind,
        "--inputs",
        inputs_path,
        "--new-tokens",
        str(new_tokens),
        "--threads",
        str(threads),
      ],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    self.tokens = None

  def run(self):
    self.proc.stdin.write("run\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"hf_generate.py exited with {self.proc.wait()}")
    self.tokens = np.asarray(json.loads(line)["tokens"])

  def close(self):
    self.proc.stdin.write("quit\n")
    self.proc.stdin.flush()
    self.proc.wait()


def jax_greedy(model, new_tokens: int):
  """jit(inputs, input_mask) -> tokens [B, new_tokens], EOS masked as on the HF side
  (the decoding benchmark's library path)."""
  run = cached_greedy(model, new_tokens)
  state = nnx.split(model)[1]
  return lambda inputs, mask: run(state, inputs, mask)


def run(args) -> dict:
  cfg = PRESETS[args.preset]
  repeats = args.repeats or (3 if args.preset == "cpu" else 10)
  python = torch_python()
  if python is None:
    return common.not_measured(
      "sampler_vs_hf",
      "no .venv-dev / .venv-bench with torch + transformers",
      write=not args.no_write,
    )
  rng = np.random.default_rng(0)
  figures, notes, probes = {}, [], {}
  with tempfile.TemporaryDirectory() as tmp:
    for key, (preset, kind) in MODELS.items():
      model_cfg = models.get_preset(preset)
      model = models.build_model(model_cfg, rngs=0)
      folder = export_hf(model, os.path.join(tmp, key))
      inputs = rng.integers(3, model_cfg.vocab_size, (cfg["batch"], cfg["src_len"]), dtype=np.int32)
      mask = np.ones_like(inputs, np.float32)
      inputs_path = os.path.join(tmp, f"{key}.npz")
      np.savez(inputs_path, inputs=inputs, input_mask=mask)
      threads, worker, probe = common.fastest_worker(
        lambda n, f=folder, k=kind, p=inputs_path: HFWorker(python, f, k, p, cfg["new_tokens"], n),
        (1, os.cpu_count()),
      )
      probes[key] = (threads, probe)
      generate = jax_greedy(model, cfg["new_tokens"])
      j_inputs, j_mask = jnp.asarray(inputs), jnp.asarray(mask)
      jax_out = {}

      def jax_side(generate=generate, j_inputs=j_inputs, j_mask=j_mask, jax_out=jax_out):
        jax_out["tokens"] = generate(j_inputs, j_mask)
        return jax_out["tokens"]

      try:
        times = common.time_rotating(
          {"jax": jax_side, "hf": worker.run}, warmup=args.warmup, repeats=repeats
        )
      finally:
        worker.close()
      n_tokens = cfg["batch"] * cfg["new_tokens"]
      agreement = float(np.mean(np.asarray(jax_out["tokens"]) == worker.tokens))
      speedup = times["hf"] / times["jax"]
      figures[f"hf_speedup/{key}"] = common.figure(speedup, "x", target=3.0, better="higher")
      figures[f"tokens_per_s/{key}/jax"] = common.figure(n_tokens / times["jax"], "tokens/s")
      figures[f"tokens_per_s/{key}/hf"] = common.figure(n_tokens / times["hf"], "tokens/s")
      figures[f"hf_token_agreement/{key}"] = common.figure(agreement, "fraction")
      print(f"{key}: jax {times['jax']:.3f}s hf {times['hf']:.3f}s agreement {agreement:.3f}")
      if speedup < 3.0:
        notes.append(f"`hf_speedup/{key}` misses the target of 3 (see the figures above).")
  notes.insert(
    0,
    f"Greedy decoding, batch {cfg['batch']}, {cfg['src_len']}-token unpadded source/prompt, "
    f"{cfg['new_tokens']} new tokens per row (EOS masked on both sides), KV cache on both "
    f"sides, float32, identical weights (random `t5-bench` / `llama-bench`, vocab 32128, "
    f"d_model 256). HF: transformers `generate` on PyTorch CPU in its own process. Median of "
    f"{repeats} alternated runs after {args.warmup} warm-up (the JAX time includes the "
    "encoder / prompt prefill, as `generate`'s does).",
  )
  notes.append(
    "HF ran with its faster torch thread count on this machine, chosen by one timed probe "
    "run each (PyTorch's OpenMP threads collapse when a shared machine is oversubscribed): "
    + "; ".join(
      f"{k}: {t} (" + ", ".join(f"{n} threads {s:.2f} s" for n, s in p.items()) + ")"
      for k, (t, p) in probes.items()
    )
    + "."
  )
  return common.write_results("sampler_vs_hf", figures, notes=notes, write=not args.no_write)


if __name__ == "__main__":
  run(common.parse_args(__doc__))

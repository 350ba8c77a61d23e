"""Teacher-record reader throughput against what a distillation step consumes.

Records: batch 64, teacher length 128, top-k 64, one teacher sequence, source
length 128, vocabulary 32128 (the issue's sizes), written once to a temporary
folder. The reader figure is records/s of `RecordReader` over whole epochs
(shuffle, parse after batching, padding), after a warm-up batch.

The step is a forward-KL distillation step on the stored top-k: a T5 student
of the decoding benchmark's size (d_model 256, 4+4 layers, vocab 32128),
`divergences.topk_divergence("kl", ...)` on the teacher sequences, gradient
and an Adam update, jitted, at the same batch. Its consumption is
batch / step time. `reader_over_step` is the ratio (target >= 10): the reader
must never be what a training run waits for.

  python -m bench.records [--preset cpu|full] [--repeats N]
"""

from __future__ import annotations

from bench import common

common.setup_env()

import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fdistill_jax import divergences, models  # noqa: E402
from fdistill_jax import records as rec  # noqa: E402
from fdistill_jax.data.reader import RecordReader  # noqa: E402

BATCH, LENGTH, TOP_K, VOCAB = 64, 128, 64, 32128


def write_folder(directory: str, num_records: int, per_shard: int) -> rec.RecordSpec:
  spec = rec.RecordSpec(
    num_samples=1, max_input_len=LENGTH, max_target_len=LENGTH, top_k=TOP_K, vocab_size=VOCAB
  )
  rng = np.random.default_rng(0)
  num_shards = -(-num_records // per_shard)
  rec.open_folder(
    directory,
    {
      "schema_version": rec.SCHEMA_VERSION,
      "spec": vars(spec),
      "teacher": {"name": "bench"},
      "tokenizer_fingerprint": "bench",
      "sampler": {},
      "seed": 0,
      "records_per_shard": per_shard,
      "num_examples": num_records,
      "num_shards": num_shards,
      "task": {},
    },
  )
  for s in range(num_shards):
    rows = []
    for i in range(s * per_shard, min((s + 1) * per_shard, num_records)):
      length = int(rng.integers(LENGTH // 2, LENGTH + 1))
      rows.append(
        rec.encode_example(
          spec,
          example_index=i,
          inputs=rng.integers(2, VOCAB, int(rng.integers(LENGTH // 2, LENGTH + 1))),
          targets=rng.integers(2, VOCAB, length),
          teacher_tokens=rng.integers(2, VOCAB, (1, LENGTH), dtype=np.int32),
          teacher_lengths=[length],
          teacher_token_logprobs=-rng.random((1, LENGTH), np.float32),
          teacher_topk_logprobs=-np.sort(rng.random((1, LENGTH, TOP_K), np.float32), -1),
          teacher_topk_ids=rng.integers(0, VOCAB, (1, LENGTH, TOP_K), dtype=np.int32),
          teacher_tail_logmass=-rng.random((1, LENGTH), np.float32),
        )
      )
    rec.write_shard(directory, s, num_shards, rows)
  rec.finalize_manifest(directory)
  return spec


def reader_records_per_s(directory: str, epochs: int) -> tuple[float, float]:
  """(records/s over `epochs` epochs after one warm-up batch, open+verify seconds)."""
  start = time.perf_counter()
  reader = RecordReader(directory, batch_size=BATCH, seed=0, shuffle_buffer=4 * BATCH)
  opened = time.perf_counter() - start
  next(reader)
  batches = epochs * (reader.num_records // BATCH) - 1
  start = time.perf_counter()
  for _ in range(batches):
    next(reader)
  return batches * BATCH / (time.perf_counter() - start), opened


def distill_step_records_per_s(repeats: int) -> float:
  cfg = models.get_preset("t5-bench")
  student = models.build_model(cfg, 0)
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)
  optimizer = optax.adam(1e-4)
  opt_state = optimizer.init(params)

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params, rest)
    tokens, mask = batch["teacher_tokens"][:, 0], batch["teacher_mask"][:, 0]
    logits = models.forward(model, batch["inputs"], batch["input_mask"], tokens, mask).logits
    values = divergences.topk_divergence(
      "kl",
      batch["teacher_topk_logprobs"][:, 0],
      batch["teacher_topk_ids"][:, 0],
      logits,
      teacher_tail_logmass=batch["teacher_tail_logmass"][:, 0],
    )
    total, weight = divergences.weighted_sum(values, mask)
    return total / weight

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(1)
  batch = {
    "inputs": jnp.asarray(rng.integers(2, VOCAB, (BATCH, LENGTH)), jnp.int32),
    "input_mask": jnp.ones((BATCH, LENGTH), jnp.float32),
    "teacher_tokens": jnp.asarray(rng.integers(2, VOCAB, (BATCH, 1, LENGTH)), jnp.int32),
    "teacher_mask": jnp.ones((BATCH, 1, LENGTH), jnp.float32),
    "teacher_topk_logprobs": -jnp.sort(jnp.asarray(rng.random((BATCH, 1, LENGTH, TOP_K))), -1),
    "teacher_topk_ids": jnp.asarray(rng.integers(0, VOCAB, (BATCH, 1, LENGTH, TOP_K)), jnp.int32),
    "teacher_tail_logmass": -jnp.asarray(rng.random((BATCH, 1, LENGTH)), jnp.float32),
  }
  seconds = common.time_fn(step, params, opt_state, batch, warmup=1, repeats=repeats)
  return BATCH / seconds


def run(args) -> dict:
  repeats = args.repeats or (2 if args.preset == "cpu" else 10)
  num_records = 1024 if args.preset == "cpu" else 8192
  with tempfile.TemporaryDirectory() as directory:
    write_folder(directory, num_records, per_shard=128)
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    reader_rate, opened = reader_records_per_s(directory, epochs=3)
  step_rate = distill_step_records_per_s(repeats)
  figures = {
    "reader_over_step": common.figure(reader_rate / step_rate, "x", target=10.0, better="higher"),
    "reader_records_per_s": common.figure(reader_rate, "records/s"),
    "step_records_per_s": common.figure(step_rate, "records/s"),
    "bytes_per_record": common.figure(size / num_records, "bytes"),
    "open_verify_s": common.figure(opened, "s", note=f"sha256 of {size / 2**20:.0f} MiB"),
  }
  notes = [
    f"batch {BATCH}, length {LENGTH}, top-k {TOP_K}, vocab {VOCAB}, {num_records} records "
    "in shards of 128; step: t5-bench student, top-k KL, Adam",
  ]
  return common.write_results("records", figures, notes=notes, write=not args.no_write)


if __name__ == "__main__":
  run(common.parse_args(__doc__))

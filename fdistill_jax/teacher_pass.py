"""The teacher pass: sample N sequences per input, score them, write record shards.

For every input of a task split, one jitted step (data-parallel over this
process's devices) draws N teacher sequences with the sampler of
`fdistill_jax.decoding`, scores them, and keeps at every
position the log-prob of the sampled token, the top-k log-probs and ids, and
the log-mass outside the top-k, and for a sampled teacher cache
(`cache_form` `sampled` or `topk+sampled`, docs/teacher-cache.md) S tail
tokens drawn from the teacher outside the top-k. Greedy and ancestral
sampling score while they decode (the loop's own log-probs, through
`decoding.sample`'s `per_step`); beam methods, full log-probs and tail
samples read the sequences again teacher-forced. A writer thread encodes and writes finished
shards (`fdistill_jax.records`) while the devices work on the next batch.

Restarts: shard `i` always holds the examples at positions
`[i * records_per_shard, (i + 1) * records_per_shard)` of the split, and the
sampling key of an example is `fold_in(seed, example_index)`; so a pass that
is killed and started again skips the shards that have a `.COMPLETED` marker
and writes exactly the records an uninterrupted pass would have written.
SIGTERM stops the pass at the next shard boundary, after writing the shards
already computed, with `runguard.Preempted`; two processes never write one
folder at once (`runguard.run_owner`).

Multi-host: process `p` of `P` computes shards `p, p + P, ...` on its own
devices; process 0 writes the manifest once every shard is in.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import queue
import threading
from collections.abc import Callable, Iterator

import jax
import numpy as np
from absl import logging
from flax import nnx

from fdistill_jax import checkpoints, decoding, runguard, sharding
from fdistill_jax import records as rec
from fdistill_jax.decoding import method_params
from fdistill_jax.teacher_scoring import Sampler, teacher_outputs
from fdistill_jax.teacher_scoring import topk_and_tail as topk_and_tail  # re-exported


@dataclasses.dataclass(frozen=True)
class PassConfig:
  """`config.teacher_pass`, typed; configs/teacher_pass.py documents every field.

  The sampling fields have no default: `teacher_pass_config()` is their one
  source. The other defaults are that config's.
  """

  num_samples: int  # N teacher sequences per input
  sampler: str  # decoding method (fdistill_jax.decoding)
  sampler_params: tuple = ()  # sorted (name, value) pairs, e.g. num_beams, temperature
  top_k: int = 64
  cache_form: str = "topk"  # "topk", "sampled" (top_k = 0) or "topk+sampled"
  num_tail_samples: int = 0  # S tail tokens drawn per position (forms with samples)
  proposal_temperature: float = 1.0  # tail proposal p^(1/temperature) outside the top-k
  logprob_dtype: str = "bfloat16"
  store_full_logprobs: bool = False
  records_per_shard: int = 1024
  batch_size: int = 32
  seed: int = 0
  max_input_len: int = 128
  max_target_len: int = 128
  split: str = "train"
  max_examples: int = 0  # 0: the whole split
  skip_corrupt: bool = False  # read by distillation's reader (damaged shards); the pass ignores it
  mesh: tuple = ()  # (axis, size) pairs for sharding.make_mesh; (): data-parallel only
  out_dir: str = ""  # "": WORKDIR/teacher_records/SPLIT (`records.records_dir`)

  @classmethod
  def from_config(cls, cfg) -> PassConfig:
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"teacher_pass config: unknown keys {unknown}; expected {sorted(known)}")
    params = values.get("sampler_params", ())
    if not isinstance(params, tuple):  # configs/teacher_pass.py: one block per method
      where = "config.teacher_pass.sampler_params"
      params = method_params(values.get("sampler"), params, where)
    values["sampler_params"] = params
    mesh = values.get("mesh", ())
    values["mesh"] = tuple(dict(mesh).items()) if hasattr(mesh, "items") else tuple(mesh)
    return cls(**values)

  def __post_init__(self):
    try:
      rec.check_cache_form(self.cache_form, self.top_k, self.num_tail_samples, None)
    except rec.RecordError as e:
      raise ValueError(f"config.teacher_pass: {e}") from None
    try:
      make_sampler(self)  # an unknown method or parameter fails here, before any model loads
    except ValueError as e:
      raise ValueError(
        f"config.teacher_pass.sampler={self.sampler!r} with sampler_params "
        f"{dict(self.sampler_params)}: {e}"
      ) from None
    if not self.proposal_temperature > 0:
      raise ValueError(
        f"config.teacher_pass.proposal_temperature must be > 0, found {self.proposal_temperature}"
      )


# ---------------------------------------------------------------------------
# The jitted step.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _step(graphdef, pc: PassConfig, sampler: Sampler, state, inputs, input_mask, indices, key):
  # Module-level with static (graphdef, config, sampler): a restarted or
  # repeated pass in one process reuses the compiled step.
  model = nnx.merge(graphdef, state)
  return teacher_outputs(model, pc, sampler, inputs, input_mask, indices, key)


def make_sampler(pc: PassConfig) -> Sampler:
  """The configured sampler of `fdistill_jax.decoding`, in the teacher pass's form."""
  return decoding.make_model_sampler(
    pc.sampler, num_samples=pc.num_samples, max_len=pc.max_target_len, **dict(pc.sampler_params)
  )


# ---------------------------------------------------------------------------
# Host side: examples in, shards out.
# ---------------------------------------------------------------------------


def _fit(ids, length: int, eos_id: int | None) -> np.ndarray:
  """Cuts a source to `length` tokens as data/pipeline.py does.

  With `eos_id` the first tokens are kept and the source stays
  EOS-terminated; without (chat-template prompts, `task.input_eos = False`)
  the last tokens are kept, since the prompt's end is what the model continues.
  """
  ids = np.asarray(ids, np.int32)
  if ids.size <= length:
    return ids
  if eos_id is None:
    return ids[-length:]
  return np.concatenate([ids[: length - 1], [eos_id]]).astype(np.int32)


def _shards(examples: Iterator[dict], per_shard: int, limit: int):
  """Yields (shard index, examples) in order; shard i is positions [i*R, (i+1)*R)."""
  shard, index = [], 0
  for position, example in enumerate(examples):
    if limit and position >= limit:
      break
    shard.append(example)
    if len(shard) == per_shard:
      yield index, shard
      shard, index = [], index + 1
  if shard:
    yield index, shard


def params_fingerprint(model) -> str:
  """sha256 of the teacher's parameters: a restart must use the same teacher."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(nnx.state(model)), key=str):
    h.update(str(path).encode())
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:32]


class _ShardWriterThread:
  """Encodes and writes finished shards off the main thread."""

  def __init__(self, directory, spec, num_shards, on_shard_written=None):
    self.directory, self.spec, self.num_shards = directory, spec, num_shards
    self.on_shard_written = on_shard_written
    self.error = None
    self.queue = queue.Queue(maxsize=2)
    self.thread = threading.Thread(target=self._loop, daemon=True)
    self.thread.start()

  def _loop(self):
    while (item := self.queue.get()) is not None:
      if self.error is not None:
        continue  # drain, so the main thread never blocks on a dead writer
      try:
        index, rows = item
        encoded = [rec.encode_example(self.spec, **row) for row in rows]
        rec.write_shard(self.directory, index, self.num_shards, encoded)
        if self.on_shard_written is not None:
          self.on_shard_written(index)
      except BaseException as e:  # noqa: BLE001  (re-raised on the main thread)
        self.error = e

  def put(self, index, rows):
    self._check()
    self.queue.put((index, rows))

  def close(self):
    self.queue.put(None)
    self.thread.join()
    self._check()

  def _check(self):
    if self.error is not None:
      raise self.error


def _barrier(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


@runguard.run_owner("out_dir")
def teacher_pass(
  model,
  task,
  out_dir: str,
  pass_config: PassConfig,
  *,
  sampler: Sampler | None = None,
  teacher_identity: dict | None = None,
  devices=None,
  process_index: int | None = None,
  process_count: int | None = None,
  on_shard_written: Callable[[int], None] | None = None,
  progress: bool = True,
) -> dict | None:
  """Runs (or finishes) the pass of `model` over `task`; returns the manifest.

  Args:
    model: the teacher (`nnx.Module` of `fdistill_jax.models`).
    task: a Task (docs/internals.md); `pass_config.split` is read.
    sampler: defaults to `make_sampler(pass_config)`.
    devices: this process's devices (default: all local ones), laid out as
      `pass_config.mesh`; `batch_size` must split over the data axes.
    on_shard_written: called with each shard index once it is on disk (tests
      use it to stop a pass part-way).
  Returns the manifest on process 0, None elsewhere.
  """
  pc = pass_config
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  devices = list(devices if devices is not None else jax.local_devices())
  # Each process computes its own shards, so its mesh holds only its devices.
  mesh = sharding.make_mesh(dict(pc.mesh) or None, devices)
  replicas = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
  if pc.batch_size % replicas:
    raise ValueError(f"batch_size {pc.batch_size} is not a multiple of {replicas} data replicas")
  sampler = sampler or make_sampler(pc)
  tokenizer, cfg = task.tokenizer, model.config
  eos = tokenizer.eos_id if getattr(task, "input_eos", True) else None  # how sources are cut
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(
      f"task tokenizer has {tokenizer.vocab_size} ids, the teacher's vocabulary {cfg.vocab_size}"
    )
  spec = rec.RecordSpec(
    num_samples=pc.num_samples,
    max_input_len=pc.max_input_len,
    max_target_len=pc.max_target_len,
    top_k=pc.top_k,
    vocab_size=cfg.vocab_size,
    logprob_dtype=pc.logprob_dtype,
    store_full_logprobs=pc.store_full_logprobs,
    pad_id=cfg.pad_id,
    cache_form=pc.cache_form,
    num_tail_samples=pc.num_tail_samples,
    proposal_temperature=pc.proposal_temperature,
  )
  num_examples = sum(1 for _ in _shards_flat(task, pc))
  if num_examples == 0:
    raise ValueError(f"task {getattr(task, 'name', task)!r} split {pc.split!r} has no examples")
  num_shards = -(-num_examples // pc.records_per_shard)
  header = {
    "schema_version": rec.SCHEMA_VERSION,
    "spec": dataclasses.asdict(spec),
    "teacher": {**(teacher_identity or {}), "params_sha256": params_fingerprint(model)},
    "tokenizer_fingerprint": tokenizer.fingerprint(),
    "sampler": {"method": pc.sampler, **dict(pc.sampler_params)},
    "seed": pc.seed,
    "records_per_shard": pc.records_per_shard,
    "num_examples": num_examples,
    "num_shards": num_shards,
    "task": {"name": getattr(task, "name", type(task).__name__), "split": pc.split},
  }
  if process_index == 0:
    rec.open_folder(out_dir, header)
  _barrier("teacher_pass_open")
  if process_index != 0:
    rec.open_folder(out_dir, header)

  if pc.records_per_shard % pc.batch_size:
    logging.warning(
      "records_per_shard %d is not a multiple of batch_size %d: every shard ends in a "
      "partly empty batch", pc.records_per_shard, pc.batch_size,
    )  # fmt: skip
  mine = [i for i in range(num_shards) if i % process_count == process_index]
  todo = {i for i in mine if rec.read_marker(out_dir, i, num_shards) is None}
  rec.remove_stale_temporaries(out_dir, [rec.shard_name(i, num_shards) for i in todo])
  logging.info("teacher pass: %d of this process's %d shards to write", len(todo), len(mine))

  # Parameters follow the models' logical-axis rules: replicated on a
  # data-only mesh, split over `model`/`fsdp` axes for teachers too big for one device.
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.named_shardings(state, mesh))

  key = jax.random.key(pc.seed)
  writer = _ShardWriterThread(out_dir, spec, num_shards, on_shard_written)
  bar = None
  if progress:
    from tqdm import tqdm

    per = pc.records_per_shard
    total = sum(min(per, num_examples - i * per) for i in todo)
    bar = tqdm(total=total, unit="ex", desc="teacher pass", smoothing=0.1)
  in_flight = []  # (shard index, examples, is the shard's last batch, device outputs)
  preempted = False
  shard_rows: dict[int, list] = {}

  def collect(item):
    index, batch, last, out = item
    out = jax.device_get(out)
    rows = shard_rows.setdefault(index, [])
    for row, ex in enumerate(batch):
      rows.append(dict(
        example_index=int(ex["example_index"]),
        inputs=_fit(ex["inputs"], pc.max_input_len, eos),
        targets=np.asarray(ex["targets"], np.int32),
        **{name: value[row] for name, value in out.items()},
      ))  # fmt: skip
      if "teacher_full_logprobs" not in out:
        rows[-1]["teacher_full_logprobs"] = None
    if bar is not None:
      bar.update(len(batch))
    if last:
      writer.put(index, shard_rows.pop(index))

  try:
    for index, examples in _shards(task.examples(pc.split), pc.records_per_shard, pc.max_examples):
      if runguard.preemption_requested():  # every process, every shard: one collective each
        preempted = True
        break
      if index not in todo:
        continue
      for start in range(0, len(examples), pc.batch_size):
        batch = examples[start : start + pc.batch_size]
        arrays = _batch_arrays(batch, pc, cfg.pad_id, eos)
        arrays = sharding.shard_batch(arrays, mesh)
        # Dispatched asynchronously: the devices run while the host goes on.
        out = _step(graphdef, pc, sampler, state, *arrays, key)
        in_flight.append((index, batch, start + pc.batch_size >= len(examples), out))
        if len(in_flight) > 1:
          collect(in_flight.pop(0))
    while in_flight:
      collect(in_flight.pop(0))
  finally:
    if bar is not None:
      bar.close()
    writer.close()
  if preempted:
    raise runguard.Preempted(
      f"teacher pass into {out_dir}: preempted (SIGTERM); the finished shards are kept: "
      "rerun the same command to write the rest"
    )
  _barrier("teacher_pass_done")
  manifest = rec.finalize_manifest(out_dir) if process_index == 0 else None
  # Every process returns once the manifest says "complete": a run that goes
  # on to read the records (the pipeline, a test) must not find it unfinished.
  _barrier("teacher_pass_manifest")
  return manifest


def _shards_flat(task, pc: PassConfig):
  for _, examples in _shards(task.examples(pc.split), pc.records_per_shard, pc.max_examples):
    yield from examples


def _batch_arrays(batch: list[dict], pc: PassConfig, pad_id: int, eos_id: int | None):
  """Pads a list of examples to inputs, input_mask [B, S] and indices [B].

  Rows past the end of a short final batch have an all-zero mask; their
  outputs are never read.
  """
  b, s = pc.batch_size, pc.max_input_len
  inputs = np.full((b, s), pad_id, np.int32)
  mask = np.zeros((b, s), np.float32)
  indices = np.full((b,), -1, np.int32)
  for row, ex in enumerate(batch):
    ids = _fit(ex["inputs"], s, eos_id)
    inputs[row, : ids.size] = ids
    mask[row, : ids.size] = 1.0
    indices[row] = ex["example_index"]
  # A row with no real token would make a decoder-only prompt empty; give
  # padding rows one token so every row is well defined.
  mask[len(batch) :, 0] = 1.0
  return inputs, mask, indices


# ---------------------------------------------------------------------------
# Command line: --mode=teacher_pass.
# ---------------------------------------------------------------------------


def run(config, workdir: str):
  """`--mode=teacher_pass`: writes records_dir(config, workdir); returns the manifest (or None)."""
  from fdistill_jax.data import tasks

  pc = PassConfig.from_config(config.teacher_pass)
  task = tasks.get_task(config.task)
  t = config.teacher
  model, identity = checkpoints.load_model(
    t.model, t.get("checkpoint", ""), t.get("pretrained"), trained=True
  )
  out_dir = rec.records_dir(config, workdir)
  manifest = teacher_pass(model, task, out_dir, pc, teacher_identity=identity)
  if manifest is not None:
    logging.info("teacher pass complete: %d records in %s", manifest["num_examples"], out_dir)
  return manifest

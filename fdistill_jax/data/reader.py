"""Streams teacher records as static-shape numpy batches for the trainer.

Pipeline per epoch: this process's shards (in a seeded per-epoch order) ->
interleave -> seeded record shuffle -> batch the serialised records ->
`tf.io.parse_example` on the whole batch -> pad or cut to static shapes ->
prefetch. The batch keys and shapes are those of docs/internals.md.

Position and resumption: the reader's position is `{"epoch", "batches"}`
(batches consumed in the current epoch). Every epoch's order is a pure
function of (seed, epoch, process_index), so restoring a position rebuilds
that epoch's dataset and `skip`s the consumed batches before parsing: the
stream continues exactly where it stopped. Store `reader.position` in the
training checkpoint and pass it back as `position=`. A resume re-reads (but
does not parse) the consumed part of the epoch: a few seconds per GB. This
was chosen over tf.data iterator checkpoints, whose files hold the whole
shuffle buffer and are tied to the pipeline's exact graph.

Order: shards are interleaved `cycle_length` at a time even with
`shuffle=False`, so batches are not in example-index order.

Multi-host: process `p` of `P` reads shards `p, p + P, ...`; each process
gets its own stream (with uneven shard counts epochs end at different steps,
so train with `num_epochs=None`).

Checks, all before the first batch: schema version, vocabulary size and
tokenizer fingerprint against the caller's, lengths, and (unless
`verify_checksums=False`) every shard's sha256. A damaged shard raises
`RecordError` naming the file and the first bad record; with
`skip_corrupt=True` its readable records are kept, the rest are counted in
`reader.skipped` and logged.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np
from absl import logging

from fdistill_jax import record_checks, runguard
from fdistill_jax import records as rec


def open_manifest(
  directory: str,
  *,
  expected_vocab_size: int | None = None,
  expected_fingerprint: str | None = None,
  expected_cache_form: str | None = None,
) -> tuple[dict, rec.RecordSpec]:
  """Reads `directory`'s manifest and checks it against the caller's vocabulary.

  Cheap (the manifest and each shard's first record): the trainer calls it
  before building models, so a wrong record folder stops a run before
  anything compiles. Raises `RecordError` naming the manifest for an
  unfinished pass, a bad spec or one the shards do not have, a vocabulary
  size or tokenizer fingerprint other than the expected one, or a teacher
  cache form (`topk`, `sampled`, `topk+sampled`; manifests without one are
  `topk`) other than `expected_cache_form`.
  """
  manifest = rec.read_manifest(directory)
  where = os.path.join(directory, rec.MANIFEST_NAME)
  if manifest.get("status") != "complete":
    raise rec.RecordError(
      f"{where}: the teacher pass has not finished (status "
      f"{manifest.get('status')!r}); rerun it to complete"
    )
  try:
    spec = rec.spec_from_manifest(manifest)
  except (KeyError, TypeError, rec.RecordError) as e:
    raise rec.RecordError(f"{where}: unusable spec {manifest.get('spec')!r} ({e})") from e
  # Checksums pass after an edit of the manifest alone: measure the shards.
  record_checks.check_spec_against_shards(directory, manifest, spec)
  if expected_vocab_size is not None and expected_vocab_size != spec.vocab_size:
    raise rec.RecordError(
      f"{where}: records have vocab_size {spec.vocab_size}, the student expects "
      f"{expected_vocab_size}"
    )
  found = manifest.get("tokenizer_fingerprint")
  if expected_fingerprint is not None and expected_fingerprint != found:
    # Same vocabulary size, other tokenizer: the token ids would mean other
    # words, and training would run without complaint on nonsense.
    raise rec.RecordError(
      f"{where}: records were made with tokenizer {found}, the task's tokenizer is "
      f"{expected_fingerprint}; rerun the teacher pass with this task, or point "
      "teacher_pass.out_dir at records made with its tokenizer"
    )
  if expected_cache_form is not None and expected_cache_form != spec.cache_form:
    raise rec.RecordError(
      f"{where}: records hold the teacher cache form {spec.cache_form!r} (top_k="
      f"{spec.top_k}, num_tail_samples={spec.num_tail_samples}), the run expects "
      f"{expected_cache_form!r}; rerun the teacher pass with teacher_pass.cache_form="
      f"{expected_cache_form!r} or train with the records' form"
    )
  return manifest, spec


class RecordReader:
  """An iterator of batch dicts over one teacher-record folder."""

  def __init__(
    self,
    directory: str,
    *,
    batch_size: int,
    max_input_len: int | None = None,
    max_target_len: int | None = None,
    expected_vocab_size: int | None = None,
    expected_fingerprint: str | None = None,
    expected_cache_form: str | None = None,
    seed: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int = 1024,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    position: dict | None = None,
    verify_checksums: bool = True,
    skip_corrupt: bool = False,
    cycle_length: int = 4,
    prefetch: int = 2,
  ):
    """Opens and checks `directory`.

    Args:
      max_input_len / max_target_len: static S and T of the batches (default:
        the records'). S may not be below the records' longest input; T below
        the stored teacher length cuts the teacher sequences (masks follow),
        T above it pads.
      expected_vocab_size / expected_fingerprint: the student's vocabulary;
        a mismatch raises.
      expected_cache_form: the teacher cache form the run reads (None: any).
      drop_remainder: if False, the last batch of an epoch is padded to
        `batch_size` with all-zero masks and `example_index` -1.
    """
    self.directory = directory
    self.manifest, self.spec = open_manifest(
      directory,
      expected_vocab_size=expected_vocab_size,
      expected_fingerprint=expected_fingerprint,
      expected_cache_form=expected_cache_form,
    )
    where = os.path.join(directory, rec.MANIFEST_NAME)
    self.max_input_len = max_input_len or self.spec.max_input_len
    self.max_target_len = max_target_len or self.spec.max_target_len
    if self.max_input_len < self.spec.max_input_len:
      raise rec.RecordError(
        f"{where}: inputs are up to {self.spec.max_input_len} tokens, max_input_len="
        f"{self.max_input_len} would cut what the teacher saw"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    shards = self.manifest["shards"][process_index::process_count]
    if not shards:
      raise rec.RecordError(
        f"{where}: {len(self.manifest['shards'])} shards cannot feed {process_count} processes"
      )
    self.batch_size = batch_size
    self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
    self.num_epochs, self.drop_remainder = num_epochs, drop_remainder
    self.process_index = process_index
    self.cycle_length, self.prefetch = cycle_length, prefetch
    self.skipped: dict[str, int] = {}
    self._tmpdir = None
    self._files = [self._checked_file(s, verify_checksums, skip_corrupt) for s in shards]
    self._num_records = sum(s["records"] for s in shards) - sum(self.skipped.values())
    position = position or {"epoch": 0, "batches": 0}
    self._epoch, self._batches = int(position["epoch"]), int(position["batches"])
    self._iterator = None

  # -------------------------------------------------------------------------
  # Checks.
  # -------------------------------------------------------------------------

  def _checked_file(self, shard: dict, verify: bool, skip_corrupt: bool) -> str:
    path = os.path.join(self.directory, shard["file"])
    if not (verify or skip_corrupt):
      if not rec.fs_exists(path):
        raise rec.RecordError(f"{path}: shard listed in the manifest is missing")
      return path
    try:
      record_checks.check_shard(path, self.spec, shard["records"], shard["sha256"])
      return path
    except rec.RecordError:
      if not skip_corrupt or not rec.fs_exists(path):
        raise
    scan = record_checks.scan_shard(path, self.spec, keep_records=True)
    self.skipped[path] = shard["records"] - scan.good
    logging.warning(
      "Skipping %d of %d records of damaged shard (%s)",
      self.skipped[path],
      shard["records"],
      scan.describe() if scan.bad else path,
    )
    if self._tmpdir is None:
      self._tmpdir = tempfile.mkdtemp(prefix="fdistill_repaired_")
    import tensorflow as tf

    repaired = os.path.join(self._tmpdir, shard["file"])
    with tf.io.TFRecordWriter(repaired) as writer:
      for r in scan.records:
        writer.write(r)
    return repaired

  def _raise_located(self, error: Exception):
    """Turns a TensorFlow read error into one that names the file and record."""
    for shard in self.manifest["shards"]:
      path = os.path.join(self.directory, shard["file"])
      if path in self._files:
        record_checks.check_shard(path, self.spec, shard["records"], None)
    raise rec.RecordError(f"{self.directory}: reading failed ({error})") from error

  # -------------------------------------------------------------------------
  # The tf.data pipeline.
  # -------------------------------------------------------------------------

  def _parse(self, serialized):
    """[B] serialised records -> the batch dict of docs/internals.md."""
    import tensorflow as tf

    spec, s, t = self.spec, self.max_input_len, self.max_target_len
    fixed = rec._fixed_arrays(spec)
    features = {
      "example_index": tf.io.FixedLenFeature([1], tf.int64),
      "inputs": tf.io.RaggedFeature(tf.int64),
      "targets": tf.io.RaggedFeature(tf.int64),
      "teacher_lengths": tf.io.FixedLenFeature([spec.num_samples], tf.int64),
    }
    features.update({name: tf.io.FixedLenFeature([], tf.string) for name in fixed})
    p = tf.io.parse_example(serialized, features)
    out = {"example_index": p["example_index"][:, 0]}
    for name, length in (("inputs", s), ("targets", t)):
      ragged = p[name]
      dense = ragged.to_tensor(default_value=spec.pad_id, shape=[None, length])
      out[name] = tf.cast(dense, tf.int32)
      mask_key = name.removesuffix("s") + "_mask"
      out[mask_key] = tf.sequence_mask(ragged.row_lengths(), length, tf.float32)
    for name, (shape, dtype) in fixed.items():
      array = tf.io.decode_raw(p[name], tf.as_dtype(dtype), little_endian=True)
      # The batch size spelled out: -1 cannot be inferred for K = 0 (sampled form).
      array = tf.reshape(array, [tf.shape(p[name])[0], *shape])
      stored_t = shape[1]
      if t < stored_t:
        array = array[:, :, :t]
      elif t > stored_t:
        pad = [[0, 0], [0, 0], [0, t - stored_t]] + [[0, 0]] * (len(shape) - 2)
        value = spec.pad_id if name == rec.TEACHER_TOKENS else 0
        array = tf.pad(array, pad, constant_values=tf.cast(value, array.dtype))
      out[name] = array if dtype.kind == "i" else tf.cast(array, tf.float32)
    out[rec.TEACHER_MASK] = tf.sequence_mask(p["teacher_lengths"], t, tf.float32)
    return out

  def _epoch_dataset(self, epoch: int, skip_batches: int):
    import tensorflow as tf

    files = list(self._files)
    rng = np.random.default_rng([self.seed, epoch, self.process_index])
    if self.shuffle:
      files = [files[i] for i in rng.permutation(len(files))]
    ds = tf.data.Dataset.from_tensor_slices(files)
    ds = ds.interleave(
      tf.data.TFRecordDataset,
      cycle_length=min(self.cycle_length, len(files)),
      block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    if self.shuffle:
      seed = int(rng.integers(2**31 - 1))
      ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    ds = ds.batch(self.batch_size, drop_remainder=self.drop_remainder)
    # Skipping before parsing makes a resume cost only the reads.
    ds = ds.skip(skip_batches)
    ds = ds.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(self.prefetch)

  # -------------------------------------------------------------------------
  # Iteration and position.
  # -------------------------------------------------------------------------

  @property
  def position(self) -> dict:
    """Where the next batch comes from; pass to `position=` to resume there."""
    return {"epoch": self._epoch, "batches": self._batches}

  @property
  def num_records(self) -> int:
    """Records this process reads per epoch."""
    return self._num_records

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    import tensorflow as tf

    while True:
      if self.num_epochs is not None and self._epoch >= self.num_epochs:
        raise StopIteration
      if self._iterator is None:
        ds = self._epoch_dataset(self._epoch, self._batches)
        self._iterator = ds.as_numpy_iterator()
      try:
        batch = next(self._iterator)
      except StopIteration:
        if self._batches == 0:
          raise rec.RecordError(
            f"{self.directory}: {self._num_records} records make no batch of {self.batch_size}"
          ) from None
        self._epoch, self._batches, self._iterator = self._epoch + 1, 0, None
        continue
      except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        self._raise_located(e)
      self._batches += 1
      return self._pad_batch(batch)

  def _pad_batch(self, batch: dict) -> dict:
    size = batch["example_index"].shape[0]
    if size == self.batch_size:
      return batch
    out = {}
    for key, value in batch.items():
      pad = np.zeros((self.batch_size - size, *value.shape[1:]), value.dtype)
      if key == "example_index":
        pad -= 1
      elif key in ("inputs", "targets", rec.TEACHER_TOKENS):
        pad += self.spec.pad_id
      out[key] = np.concatenate([value, pad])
    return out

  def close(self):
    self._iterator = None
    if self._tmpdir is not None:
      shutil.rmtree(self._tmpdir, ignore_errors=True)
      self._tmpdir = None

  def __del__(self):
    if hasattr(self, "_tmpdir"):
      self.close()


# ---------------------------------------------------------------------------
# The trainer's checks and data function.
# ---------------------------------------------------------------------------


def _topk_fix(found: str, *, readable: bool = True) -> str:
  """The top-k error's text: what is expected, what was `found`, how to fix it.

  `readable`: whether the data could train without top-k (a records spec
  without top-k is not readable at all, so the second fix does not apply).
  """
  fix = "rerun the teacher pass with teacher_pass.top_k > 0"
  if readable:
    fix += ", or set objective.use_teacher_topk=False (the teacher model then runs at train time)"
  return (
    f"objective.use_teacher_topk=True reads the teacher's distribution from the records' "
    f"top-k (batch keys {', '.join(rec.TOPK_KEYS)}), but {found}; {fix}"
  )


def check_batch_keys(batch: dict, keys: tuple[str, ...], where: str):
  """A clear ValueError, instead of a KeyError while tracing, for a batch without `keys`.

  keys: the plan's `batch_keys`; where: the data's origin, for the message.
  """
  missing = [k for k in keys if k not in batch]
  if not missing:
    return
  found = f"the first batch from {where} has keys {sorted(batch)}"
  if set(missing) & set(rec.TOPK_KEYS):
    raise ValueError(_topk_fix(found))
  raise ValueError(
    f"the objective reads teacher sequences (batch keys {list(keys)}), but {found}; "
    "train on teacher-pass records (see docs/internals.md)"
  )


def check_records(
  directory: str,
  use_topk: bool,
  vocab_size: int,
  tokenizer_fingerprint: str | None,
  expected_cache_form: str | None = None,
) -> dict:
  """The manifest of records the run can use; raises a clear error otherwise.

  Checks the pass finished, the vocabulary size, the tokenizer fingerprint
  and, when the plan reads the teacher's top-k (`use_topk`), that the records
  hold it (a top-k or a sampled teacher cache, of `expected_cache_form` when
  given). Reads the manifest and each shard's first record.
  """
  manifest = rec.read_manifest(directory)
  if use_topk:
    # Before `open_manifest`: a spec without top-k fails there with a less
    # helpful message.
    spec = manifest.get("spec") or {}
    top_k = spec.get("top_k", 0)
    if not top_k and not spec.get("num_tail_samples", 0):
      where = os.path.join(directory, rec.MANIFEST_NAME)
      found = f"these records were written with top_k={top_k}"
      raise ValueError(f"{where}: " + _topk_fix(found, readable=False))
  open_manifest(
    directory,
    expected_vocab_size=vocab_size,
    expected_fingerprint=tokenizer_fingerprint,
    expected_cache_form=expected_cache_form,
  )
  return manifest


def records_data_fn(
  config, workdir: str, use_topk: bool, vocab_size: int, tokenizer_fingerprint: str | None = None
):
  """position -> `RecordReader` over the teacher-pass records; checks them now.

  `tokenizer_fingerprint` is the task tokenizer's: records made with another
  tokenizer raise (None skips the check). The function's `identity` (the
  records' spec, tokenizer, sampler and teacher digest) is part of the run
  identity (`runguard.records_identity`).
  """
  tc = config.train
  tp = config.get("teacher_pass") or {}
  directory = rec.records_dir(config, workdir)
  manifest = check_records(
    directory, use_topk, vocab_size, tokenizer_fingerprint, tp.get("cache_form")
  )

  def data_fn(position):
    return RecordReader(
      directory,
      batch_size=tc.batch_size // jax.process_count(),
      max_input_len=tc.max_input_len,
      max_target_len=tc.max_target_len,
      expected_vocab_size=vocab_size,
      expected_fingerprint=tokenizer_fingerprint,
      seed=tc.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      position=position,
      skip_corrupt=tp.get("skip_corrupt", False),
    )

  data_fn.identity = runguard.records_identity(manifest)
  return data_fn

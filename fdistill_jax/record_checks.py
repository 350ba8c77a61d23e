"""Teacher-record folders checked against their manifest, record by record.

Two depths:

* `check_spec_against_shards` (every open, cheap): the first record of each
  shard is measured and compared with the manifest's spec, so a manifest
  edited after the pass (its checksums still match the shards) stops the run
  with the file, the manifest's value and the shard's, before anything
  compiles. `check_teacher` compares the teacher a run loads with the one
  that made the records (`params_sha256`, never its path).
* `verify_folder` (`--mode=inspect`): every shard listed is present, reads
  record by record (framing, CRCs, schema), holds the listed record count
  and sha256, and every record's values fit the spec: example indices in
  order, lengths within T, token ids within the vocabulary. Each problem
  names the file, the record and its byte offset.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import tempfile

import numpy as np

from fdistill_jax import files
from fdistill_jax import records as rec
from fdistill_jax.data import tasks

# Spec fields that the sizes of one record determine.
_MEASURED = ("num_samples", "max_target_len", "top_k", "store_full_logprobs")


# ---------------------------------------------------------------------------
# Damage: find the bad record, or recover the good ones.
# ---------------------------------------------------------------------------


def _crc_table():
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc_table()


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked crc32c (pure Python: used on 8-byte headers only)."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@dataclasses.dataclass
class ShardScan:
  """What a record-by-record read of one shard found."""

  path: str
  good: int = 0  # records that read and decode
  bad: list = dataclasses.field(default_factory=list)  # (record index, byte offset, reason)
  records: list | None = None  # the good records, when asked for
  unreadable_tail: bool = False  # framing broke: records after `bad[-1]` are lost

  def describe(self) -> str:
    index, offset, reason = self.bad[0]
    return f"{self.path}: record {index} (byte offset {offset}): {reason}"


def _tf_read(path: str):
  """All records TensorFlow can read from `path`, and whether it stopped on damage."""
  import tensorflow as tf

  records = []
  try:
    for r in tf.data.TFRecordDataset(path):
      records.append(r.numpy())
  except tf.errors.DataLossError:
    return records, True
  return records, False


def scan_shard(path: str, spec: rec.RecordSpec, keep_records: bool = False) -> ShardScan:
  """Reads a shard record by record, checking framing, CRCs and the schema.

  TensorFlow checks each frame's CRCs; after a bad data CRC whose length
  header is intact, reading resumes at the next frame (from a temporary copy
  of the rest of the file), so one flipped byte costs one record.
  """
  scan = ShardScan(path, records=[] if keep_records else None)
  size = files.fs_size(path)
  index = offset = 0
  source = path
  with tempfile.TemporaryDirectory() as tmpdir:
    while True:
      records, damaged = _tf_read(source)
      for r in records:
        try:
          rec.decode_example(spec, r)
        except rec.RecordError as e:
          scan.bad.append((index, offset, f"record does not match the schema: {e}"))
        else:
          scan.good += 1
          if keep_records:
            scan.records.append(r)
        index += 1
        offset += len(r) + 16
      if not damaged:
        return scan
      with files.fs_open(path, "rb") as f:
        f.seek(offset)
        header = f.read(12)
        if len(header) < 12:
          reason = f"truncated: file ends inside a record header ({size} bytes)"
          scan.bad.append((index, offset, reason))
          scan.unreadable_tail = True
          return scan
        (length,) = struct.unpack("<Q", header[:8])
        if masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
          reason = "corrupt length header; the rest of the shard is unreadable"
          scan.bad.append((index, offset, reason))
          scan.unreadable_tail = True
          return scan
        end = offset + 16 + length
        if end > size:
          scan.bad.append((index, offset, f"truncated: record needs {end} bytes, file has {size}"))
          scan.unreadable_tail = True
          return scan
        scan.bad.append((index, offset, "data checksum (crc32c) mismatch"))
        index += 1
        offset = end
        f.seek(offset)
        source = os.path.join(tmpdir, f"rest-{offset}.tfrecord")
        with open(source, "wb") as rest:
          rest.write(f.read())


def check_shard(
  path: str, spec: rec.RecordSpec, expected_records: int, expected_sha256: str | None
):
  """Raises `rec.RecordError` naming the file (and the record, when one is bad)."""
  if not files.fs_exists(path):
    raise rec.RecordError(f"{path}: shard listed in the manifest is missing")
  if expected_sha256 is not None and files.file_sha256(path) == expected_sha256:
    return
  scan = scan_shard(path, spec)
  if scan.bad:
    raise rec.RecordError(scan.describe())
  if scan.good != expected_records:
    raise rec.RecordError(
      f"{path}: holds {scan.good} records, the manifest lists {expected_records} "
      f"(record {min(scan.good, expected_records)} is the first missing or extra one)"
    )
  if expected_sha256 is None:
    return
  raise rec.RecordError(
    f"{path}: sha256 differs from the manifest's {expected_sha256} although every record "
    "reads: the file was rewritten after the pass"
  )


def read_first_record(path: str) -> bytes | None:
  """The first record of a TFRecord file by its framing (no CRC check), or None."""
  with files.fs_open(path, "rb") as f:
    header = f.read(12)
    if len(header) < 12:
      return None
    (length,) = struct.unpack("<Q", header[:8])
    if length > files.fs_size(path):
      return None
    data = f.read(length)
  return data if len(data) == length else None


def measure_record(serialized: bytes) -> dict | None:
  """The spec fields `_MEASURED` one serialised record implies, or None if it is no record."""
  example_pb2, _ = rec._tf_train()
  try:
    features = example_pb2.Example.FromString(serialized).features.feature
  except Exception:  # noqa: BLE001 - protobuf's DecodeError; damage is reported elsewhere
    return None
  if "teacher_lengths" not in features or "teacher_topk_ids" not in features:
    return None
  n = len(features["teacher_lengths"].int64_list.value)

  def size(name):
    values = features[name].bytes_list.value if name in features else []
    return len(values[0]) if len(values) == 1 else 0

  t = size("teacher_tokens") // 4 // max(n, 1)
  k = size("teacher_topk_ids") // 4 // max(n * t, 1)
  return {
    "num_samples": n,
    "max_target_len": t,
    "top_k": k,
    "store_full_logprobs": "teacher_full_logprobs" in features,
  }


def check_spec_against_shards(directory: str, manifest: dict, spec: rec.RecordSpec):
  """Raises `RecordError` when a shard's first record does not have the manifest's shape.

  Missing or unreadable shards are left to the checksum and scan checks,
  which locate the damage.
  """
  where = os.path.join(directory, rec.MANIFEST_NAME)
  for shard in manifest.get("shards", []):
    path = os.path.join(directory, shard["file"])
    if not files.fs_exists(path):
      continue
    first = read_first_record(path)
    found = measure_record(first) if first is not None else None
    if found is None:
      continue
    differ = [k for k in _MEASURED if found[k] != getattr(spec, k)]
    if differ:
      says = ", ".join(f"{k}={getattr(spec, k)}" for k in differ)
      holds = ", ".join(f"{k}={found[k]}" for k in differ)
      raise rec.RecordError(
        f"{where}: the manifest's spec says {says}, but {path} record 0 holds {holds}; "
        "the manifest was edited after the pass or belongs to other shards: rerun the "
        "teacher pass into an empty folder"
      )


def check_teacher(directory: str, params_sha256: str):
  """Raises `RecordError` when the records were made by another teacher than the loaded one.

  `params_sha256`: `teacher_pass.params_fingerprint` of the loaded teacher.
  """
  recorded = (rec.read_manifest(directory).get("teacher") or {}).get("params_sha256")
  if recorded is not None and recorded != params_sha256:
    where = os.path.join(directory, rec.MANIFEST_NAME)
    raise rec.RecordError(
      f"{where}: records were made by the teacher with params_sha256 {recorded}, the "
      f"teacher loaded from config.teacher has {params_sha256}; point config.teacher at "
      "the teacher of the pass, or rerun the teacher pass with this teacher"
    )


# ---------------------------------------------------------------------------
# Full verification (--mode=inspect).
# ---------------------------------------------------------------------------


def record_value_problems(spec: rec.RecordSpec, record: dict, expected_index: int) -> list[str]:
  """What is wrong with one decoded record's values (empty when nothing is)."""
  problems = []
  v, t = spec.vocab_size, spec.max_target_len
  if int(record["example_index"]) != expected_index:
    problems.append(f"example_index {int(record['example_index'])}, expected {expected_index}")
  if record["inputs"].size > spec.max_input_len:
    problems.append(f"{record['inputs'].size} input tokens, max_input_len {spec.max_input_len}")
  lengths = record["teacher_lengths"]
  if np.any((lengths < 0) | (lengths > t)):
    problems.append(f"teacher_lengths {lengths.tolist()} outside [0, max_target_len={t}]")
  for name in ("inputs", "targets", "teacher_tokens", "teacher_topk_ids"):
    ids = np.asarray(record[name])
    if ids.size and (ids.min() < 0 or ids.max() >= v):
      problems.append(
        f"{name} holds id {int(ids.max() if ids.max() >= v else ids.min())} outside the "
        f"vocabulary [0, vocab_size={v})"
      )
  return problems


def verify_shard(directory: str, spec: rec.RecordSpec, shard: dict) -> list[str]:
  """Every problem of one listed shard, each naming the file (and record, byte offset)."""
  path = os.path.join(directory, shard["file"])
  if not files.fs_exists(path):
    return [f"{path}: shard listed in the manifest is missing"]
  scan = scan_shard(path, spec, keep_records=True)
  problems = [f"{path}: record {i} (byte offset {o}): {why}" for i, o, why in scan.bad]
  if scan.bad:
    return problems
  offset = 0
  for i, raw in enumerate(scan.records):
    decoded = rec.decode_example(spec, raw)
    for why in record_value_problems(spec, decoded, shard["first_example"] + i):
      problems.append(f"{path}: record {i} (byte offset {offset}): {why}")
    offset += len(raw) + 16
  if scan.good != shard["records"]:
    problems.append(f"{path}: holds {scan.good} records, the manifest lists {shard['records']}")
  digest = files.file_sha256(path)
  if digest != shard["sha256"]:
    problems.append(f"{path}: sha256 {digest}, the manifest lists {shard['sha256']}")
  return problems


def verify_folder(
  directory: str, *, tokenizer_vocab_size: int | None = None, tokenizer_fingerprint=None
) -> list[str]:
  """Every problem of a record folder (empty: healthy), reading every shard in full.

  `tokenizer_*`: the task's tokenizer, when known; records made with another
  one, or with a smaller vocabulary, are problems too.
  """
  where = os.path.join(directory, rec.MANIFEST_NAME)
  manifest = rec.read_manifest(directory)
  try:
    spec = rec.spec_from_manifest(manifest)
  except (KeyError, TypeError, rec.RecordError) as e:
    return [f"{where}: unusable spec {manifest.get('spec')!r} ({e})"]
  problems = []
  try:
    check_spec_against_shards(directory, manifest, spec)
  except rec.RecordError as e:
    problems.append(str(e))
  if manifest.get("status") != "complete":
    problems.append(f"{where}: status {manifest.get('status')!r}: the pass has not finished")
  listed = [s["file"] for s in manifest.get("shards", [])]
  expected = [rec.shard_name(i, manifest["num_shards"]) for i in range(manifest["num_shards"])]
  if manifest.get("status") == "complete" and listed != expected:
    problems.append(f"{where}: lists shards {listed}, expected {expected}")
  if tokenizer_fingerprint is not None and tokenizer_fingerprint != manifest.get(
    "tokenizer_fingerprint"
  ):
    problems.append(
      f"{where}: records were made with tokenizer {manifest.get('tokenizer_fingerprint')}, "
      f"the task's tokenizer is {tokenizer_fingerprint}"
    )
  if tokenizer_vocab_size is not None and tokenizer_vocab_size > spec.vocab_size:
    problems.append(
      f"{where}: vocab_size {spec.vocab_size}, the task's tokenizer has {tokenizer_vocab_size} ids"
    )
  total = 0
  for shard in manifest.get("shards", []):
    problems += verify_shard(directory, spec, shard)
    total += shard["records"]
  num_examples = manifest["num_examples"]
  if manifest.get("status") == "complete" and total != num_examples:
    problems.append(f"{where}: shards list {total} records, num_examples is {num_examples}")
  return problems


def inspect_main(config, workdir: str, num_records: int = 3):
  """`--mode=inspect`: verifies a record folder in full, summarises it, prints a few records.

  Exits non-zero (SystemExit with the first problem) when anything is damaged
  or mismatched; every problem is printed first.
  """
  import tensorflow as tf

  directory = rec.records_dir(config, workdir)
  manifest = rec.read_manifest(directory)
  print(f"records: {directory}")
  for key in ("status", "teacher", "task", "tokenizer_fingerprint", "sampler", "seed"):
    print(f"  {key}: {manifest.get(key)}")
  tokenizer = tasks.get_task(config.task).tokenizer if "task" in config else None
  problems = verify_folder(
    directory,
    tokenizer_vocab_size=tokenizer.vocab_size if tokenizer else None,
    tokenizer_fingerprint=tokenizer.fingerprint() if tokenizer else None,
  )
  total = sum(s["records"] for s in manifest["shards"])
  if problems:
    print(f"  DAMAGED: {len(problems)} problem(s) in {directory}:")
    for problem in problems:
      print(f"    {problem}")
    raise SystemExit(f"inspect: {directory} is damaged or mismatched: {problems[0]}")
  spec = rec.spec_from_manifest(manifest)
  print(f"  spec: {dataclasses.asdict(spec)}")
  shards = len(manifest["shards"])
  print(f"  verified: {shards} of {manifest['num_shards']} shards, {total} records, all readable")
  text = (lambda ids: tokenizer.decode(list(ids))) if tokenizer else (lambda ids: list(ids))
  # A prompt is shown as written (chat markers included), not cut at its first EOS.
  prompt = (lambda ids: tokenizer.decode_all(list(ids))) if tokenizer else (lambda ids: list(ids))
  if not manifest["shards"]:
    return
  first = os.path.join(directory, manifest["shards"][0]["file"])
  for raw in tf.data.TFRecordDataset(first).take(num_records):
    r = rec.decode_example(spec, raw.numpy())
    print(f"\nexample {r['example_index']}")
    print(f"  input:  {prompt(r['inputs'])}")
    print(f"  target: {text(r['targets'])}")
    for n in range(spec.num_samples):
      length = r["teacher_lengths"][n]
      logprob = float(r["teacher_token_logprobs"][n, :length].sum())
      print(f"  teacher[{n}] (log p {logprob:.2f}): {text(r['teacher_tokens'][n, :length])}")

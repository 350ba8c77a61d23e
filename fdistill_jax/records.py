"""Teacher records: the TFRecord schema, atomic shard writes, manifests, checks.

One `tf.train.Example` per input (schema version `SCHEMA_VERSION`):

| feature | kind | content |
|---|---|---|
| `example_index` | int64 [1] | global example index |
| `inputs` | int64 [S_i] | source tokens as the teacher saw them (unpadded) |
| `targets` | int64 [T_i] | ground-truth targets, cut to `max_target_len` |
| `teacher_lengths` | int64 [N] | length of each teacher sequence (EOS counted) |
| `teacher_tokens` | bytes, int32 LE [N, T] | teacher sequences, `pad_id` after EOS |
| `teacher_token_logprobs` | bytes, float32 LE [N, T] | teacher log-prob of each token |
| `teacher_topk_logprobs` | bytes, bf16/f16 [N, T, K] | top-k log-probs, descending |
| `teacher_topk_ids` | bytes, int32 LE [N, T, K] | their ids |
| `teacher_tail_logmass` | bytes, float32 LE [N, T] | log of the mass outside the top-k |
| `teacher_full_logprobs` | bytes, bf16/f16 [N, T, V] | optional (small vocabularies) |
| `teacher_sample_ids` | bytes, int32 LE [N, T, S] | tail tokens drawn from the proposal (S > 0) |
| `teacher_sample_logprobs` | bytes, float32 LE [N, T, S] | their teacher log-probs (S > 0) |
| `teacher_proposal_logprobs` | bytes, float32 LE [N, T, S] | their proposal log-probs (tempered) |

The cache form (`RecordSpec.cache_form`, docs/teacher-cache.md) says which
teacher features hold data: `topk` (K > 0, S = 0), `sampled` (K = 0: the top-k
arrays are empty and the tail is the whole vocabulary) or `topk+sampled`.
Manifests written before the form existed load as `topk`.

Fixed-size arrays are raw little-endian bytes because parsing a batch of byte
strings is several times faster than parsing long int64/float lists; positions
past a sequence's length hold zeros (pad ids), never leftovers.

A record folder holds `shard-XXXXX-of-YYYYY.tfrecord` files, one
`<shard>.COMPLETED` marker per finished shard (JSON: records, sha256), and
`manifest.json`. Every file is written under a temporary name, fsynced and
renamed, so a reader or a restarted pass never sees half a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import ml_dtypes
import numpy as np

from fdistill_jax.files import (
  atomic_write_bytes,
  file_sha256,
  fs_commit,
  fs_exists,
  fs_listdir,
  fs_makedirs,
  fs_open,
  fs_remove,
  tmp_name,
)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MARKER_SUFFIX = ".COMPLETED"
LOGPROB_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
CACHE_FORMS = ("topk", "sampled", "topk+sampled")


# The teacher features' names, shared by the writer, the reader's batches and
# the trainer's batch-key check. `teacher_mask` exists only in batches (the
# reader derives it from `teacher_lengths`).
TEACHER_TOKENS = "teacher_tokens"
TEACHER_MASK = "teacher_mask"
TOKEN_LOGPROBS = "teacher_token_logprobs"
TOPK_LOGPROBS = "teacher_topk_logprobs"
TOPK_IDS = "teacher_topk_ids"
TAIL_LOGMASS = "teacher_tail_logmass"
FULL_LOGPROBS = "teacher_full_logprobs"
SEQUENCE_KEYS = (TEACHER_TOKENS, TEACHER_MASK)
TOPK_KEYS = (TOPK_LOGPROBS, TOPK_IDS, TAIL_LOGMASS)
SAMPLE_IDS = "teacher_sample_ids"
SAMPLE_LOGPROBS = "teacher_sample_logprobs"
PROPOSAL_LOGPROBS = "teacher_proposal_logprobs"
# Batch keys of a sampled teacher cache -> the `divergences.TeacherTopK` fields they fill.
SAMPLE_KEYS = {
  SAMPLE_IDS: "sample_ids",
  SAMPLE_LOGPROBS: "sample_logprobs",
  PROPOSAL_LOGPROBS: "proposal_logprobs",
}


class RecordError(ValueError):
  """Records that do not match what the caller expects, or that are damaged."""


@dataclasses.dataclass(frozen=True)
class RecordSpec:
  """The static shape of every record in one folder (stored in the manifest)."""

  num_samples: int  # N teacher sequences per input
  max_input_len: int  # S: the longest stored input
  max_target_len: int  # T: teacher sequences are stored at exactly this length
  top_k: int  # K
  vocab_size: int  # V
  logprob_dtype: str = "bfloat16"  # storage dtype of top-k (and full) log-probs
  store_full_logprobs: bool = False  # also store [N, T, V] log-probs
  pad_id: int = 0
  cache_form: str = "topk"  # which teacher cache the records hold: one of CACHE_FORMS
  num_tail_samples: int = 0  # S tail tokens drawn per position (0 for "topk")
  proposal_temperature: float = 1.0  # tail proposal p^(1/temperature); != 1 stores its log-probs

  def __post_init__(self):
    if self.logprob_dtype not in LOGPROB_DTYPES:
      raise RecordError(
        f"logprob_dtype must be one of {sorted(LOGPROB_DTYPES)}, found {self.logprob_dtype!r}"
      )
    check_cache_form(self.cache_form, self.top_k, self.num_tail_samples, self.vocab_size)
    if not self.proposal_temperature > 0:
      raise RecordError(f"proposal_temperature must be > 0, found {self.proposal_temperature}")

  @property
  def np_logprob_dtype(self):
    return np.dtype(LOGPROB_DTYPES[self.logprob_dtype])


def check_cache_form(form: str, top_k: int, num_tail_samples: int, vocab_size: int | None):
  """Raises `RecordError` unless (form, K, S) is a consistent teacher cache."""
  if form not in CACHE_FORMS:
    raise RecordError(f"cache_form must be one of {list(CACHE_FORMS)}, found {form!r}")
  want_k, want_s = form != "sampled", form != "topk"
  if want_k and not 0 < top_k <= (vocab_size or top_k):
    raise RecordError(
      f"cache_form {form!r}: top_k must be in [1, vocab_size={vocab_size}], found {top_k}"
    )
  if not want_k and top_k != 0:
    raise RecordError(f"cache_form 'sampled' stores no top-k: top_k must be 0, found {top_k}")
  if want_s and num_tail_samples < 1:
    raise RecordError(
      f"cache_form {form!r}: num_tail_samples must be >= 1, found {num_tail_samples}"
    )
  if not want_s and num_tail_samples != 0:
    raise RecordError(
      f"cache_form 'topk' draws no tail samples: num_tail_samples must be 0, found "
      f"{num_tail_samples} (use 'topk+sampled')"
    )


# ---------------------------------------------------------------------------
# Encoding and decoding one record.
# ---------------------------------------------------------------------------


def _tf_train():
  # Imported lazily: writers in the teacher pass and the manifest tools must
  # not pay TensorFlow's start-up for a protobuf class.
  from tensorflow.core.example import example_pb2, feature_pb2

  return example_pb2, feature_pb2


def _fixed_arrays(spec: RecordSpec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Name -> (shape, storage dtype) of the fixed-size byte features."""
  n, t, k, v = spec.num_samples, spec.max_target_len, spec.top_k, spec.vocab_size
  lp = spec.np_logprob_dtype
  arrays = {
    TEACHER_TOKENS: ((n, t), np.dtype("<i4")),
    TOKEN_LOGPROBS: ((n, t), np.dtype("<f4")),
    TOPK_LOGPROBS: ((n, t, k), lp),
    TOPK_IDS: ((n, t, k), np.dtype("<i4")),
    TAIL_LOGMASS: ((n, t), np.dtype("<f4")),
  }
  if spec.store_full_logprobs:
    arrays[FULL_LOGPROBS] = ((n, t, v), lp)
  s = spec.num_tail_samples
  if s:
    arrays[SAMPLE_IDS] = ((n, t, s), np.dtype("<i4"))
    arrays[SAMPLE_LOGPROBS] = ((n, t, s), np.dtype("<f4"))
    if spec.proposal_temperature != 1.0:
      arrays[PROPOSAL_LOGPROBS] = ((n, t, s), np.dtype("<f4"))
  return arrays


def encode_example(
  spec: RecordSpec,
  *,
  example_index: int,
  inputs: np.ndarray,
  targets: np.ndarray,
  teacher_tokens: np.ndarray,
  teacher_lengths: np.ndarray,
  teacher_token_logprobs: np.ndarray,
  teacher_topk_logprobs: np.ndarray,
  teacher_topk_ids: np.ndarray,
  teacher_tail_logmass: np.ndarray,
  teacher_full_logprobs: np.ndarray | None = None,
  teacher_sample_ids: np.ndarray | None = None,
  teacher_sample_logprobs: np.ndarray | None = None,
  teacher_proposal_logprobs: np.ndarray | None = None,
) -> bytes:
  """Serialises one input's teacher outputs; shapes as in the module table."""
  example_pb2, feature_pb2 = _tf_train()
  inputs = np.asarray(inputs).reshape(-1)
  targets = np.asarray(targets).reshape(-1)[: spec.max_target_len]
  if inputs.size > spec.max_input_len:
    raise RecordError(
      f"example {example_index}: {inputs.size} input tokens, spec allows {spec.max_input_len}"
    )
  lengths = np.asarray(teacher_lengths, np.int64).reshape(-1)
  if lengths.shape != (spec.num_samples,):
    raise RecordError(f"teacher_lengths: expected [{spec.num_samples}], found {lengths.shape}")
  values = {
    TEACHER_TOKENS: teacher_tokens,
    TOKEN_LOGPROBS: teacher_token_logprobs,
    TOPK_LOGPROBS: teacher_topk_logprobs,
    TOPK_IDS: teacher_topk_ids,
    TAIL_LOGMASS: teacher_tail_logmass,
  }
  if spec.store_full_logprobs:
    if teacher_full_logprobs is None:
      raise RecordError("spec.store_full_logprobs is set but no full log-probs were given")
    values[FULL_LOGPROBS] = teacher_full_logprobs
  samples = {
    SAMPLE_IDS: teacher_sample_ids,
    SAMPLE_LOGPROBS: teacher_sample_logprobs,
    PROPOSAL_LOGPROBS: teacher_proposal_logprobs,
  }
  for name in _fixed_arrays(spec).keys() & samples.keys():
    if samples[name] is None:
      raise RecordError(f"example {example_index}: cache_form {spec.cache_form!r} needs {name}")
    values[name] = samples[name]

  def ints(v):
    return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=np.asarray(v).tolist()))

  feature = {
    "example_index": ints([example_index]),
    "inputs": ints(inputs),
    "targets": ints(targets),
    "teacher_lengths": ints(lengths),
  }
  for name, (shape, dtype) in _fixed_arrays(spec).items():
    array = np.asarray(values[name])
    if array.shape != shape:
      raise RecordError(f"example {example_index}: {name} expected {shape}, found {array.shape}")
    raw = array.astype(dtype).tobytes()
    feature[name] = feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[raw]))
  example = example_pb2.Example(features=feature_pb2.Features(feature=feature))
  # Deterministic: map entries sorted, so equal records are equal bytes in every process.
  return example.SerializeToString(deterministic=True)


def decode_example(spec: RecordSpec, serialized: bytes) -> dict[str, np.ndarray]:
  """Inverse of `encode_example` in numpy; raises `RecordError` on any mismatch.

  Log-probs come back in their storage dtype (bf16/f16), ids as int32.
  """
  example_pb2, _ = _tf_train()
  try:
    features = example_pb2.Example.FromString(serialized).features.feature
  except Exception as e:  # protobuf raises its own DecodeError type
    raise RecordError(f"not a tf.train.Example ({e})") from e
  out = {}
  for name in ("example_index", "inputs", "targets", "teacher_lengths"):
    if name not in features:
      raise RecordError(f"feature {name!r} missing")
    out[name] = np.asarray(features[name].int64_list.value, np.int64)
  if out["example_index"].shape != (1,):
    raise RecordError(f"example_index: expected 1 value, found {out['example_index'].size}")
  out["example_index"] = out["example_index"][0]
  if out["teacher_lengths"].shape != (spec.num_samples,):
    raise RecordError(
      f"teacher_lengths: expected {spec.num_samples} values, found {out['teacher_lengths'].size}"
    )
  for name, (shape, dtype) in _fixed_arrays(spec).items():
    values = features[name].bytes_list.value if name in features else []
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(values) != 1 or len(values[0]) != expected:
      found = [len(v) for v in values]
      raise RecordError(f"feature {name!r}: expected one {expected}-byte value, found {found}")
    out[name] = np.frombuffer(values[0], dtype).reshape(shape)
  return out


# ---------------------------------------------------------------------------
# Files: names, atomic writes, markers, manifest.
# ---------------------------------------------------------------------------


def shard_name(index: int, num_shards: int) -> str:
  return f"shard-{index:05d}-of-{num_shards:05d}.tfrecord"


def write_shard(directory: str, index: int, num_shards: int, records: Sequence[bytes]) -> dict:
  """Writes one shard atomically, then its `.COMPLETED` marker; returns the marker."""
  import tensorflow as tf

  path = os.path.join(directory, shard_name(index, num_shards))
  tmp = tmp_name(path)
  with tf.io.TFRecordWriter(tmp) as writer:
    for r in records:
      writer.write(r)
  digest = file_sha256(tmp)
  fs_commit(tmp, path)
  marker = {"file": os.path.basename(path), "records": len(records), "sha256": digest}
  atomic_write_bytes(path + MARKER_SUFFIX, json.dumps(marker).encode())
  return marker


def read_marker(directory: str, index: int, num_shards: int) -> dict | None:
  """The marker of a finished shard, or None if the shard is not (fully) written."""
  path = os.path.join(directory, shard_name(index, num_shards))
  if not (fs_exists(path + MARKER_SUFFIX) and fs_exists(path)):
    return None
  with fs_open(path + MARKER_SUFFIX, "r") as f:
    return json.load(f)


def remove_stale_temporaries(directory: str, names: Iterable[str]):
  """Deletes temporary files a killed writer left behind for the given shards."""
  names = set(names)
  for entry in fs_listdir(directory):
    base = entry.split(".tmp-")[0]
    if ".tmp-" in entry and (base in names or base.removesuffix(MARKER_SUFFIX) in names):
      fs_remove(os.path.join(directory, entry))


def write_manifest(directory: str, manifest: dict):
  atomic_write_bytes(
    os.path.join(directory, MANIFEST_NAME), json.dumps(manifest, indent=2).encode()
  )


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST_NAME)
  if not fs_exists(path):
    raise RecordError(f"no {MANIFEST_NAME} in {directory}: not a teacher-record folder")
  with fs_open(path, "r") as f:
    manifest = json.load(f)
  version = manifest.get("schema_version")
  if version != SCHEMA_VERSION:
    raise RecordError(
      f"{path}: schema_version {version}, this code reads version {SCHEMA_VERSION}; "
      "rerun the teacher pass with this version"
    )
  return manifest


def spec_from_manifest(manifest: dict) -> RecordSpec:
  return RecordSpec(**manifest["spec"])


# ---------------------------------------------------------------------------
# Folder life cycle: open (or reopen) for a pass, finalise when all shards are in.
# ---------------------------------------------------------------------------

# Manifest fields that make up a pass's identity: a restart must match them all.
_STATUS_FIELDS = ("status", "shards")


def _pass_identity(header: dict) -> dict:
  """The fields of `header` a restart must repeat: the teacher by its parameters only.

  Where the teacher was loaded from (`checkpoint`, `pretrained` path) is kept
  in the manifest for people, but the same weights moved elsewhere are the
  same teacher.
  """
  teacher = header.get("teacher") or {}
  if "params_sha256" in teacher:
    header = {**header, "teacher": {"params_sha256": teacher["params_sha256"]}}
  return {k: v for k, v in header.items() if k not in _STATUS_FIELDS}


def open_folder(directory: str, header: dict):
  """Starts a pass in `directory`, or checks that a restart repeats the same pass.

  `header` holds everything but the shard list: schema_version, spec, teacher,
  tokenizer_fingerprint, sampler, seed, records_per_shard, num_examples,
  num_shards, task. Mixing records of two different passes would be silent
  garbage, so any difference from an existing manifest raises. A manifest
  temporary that a killed writer left behind is deleted.
  """
  fs_makedirs(directory)
  remove_stale_temporaries(directory, [MANIFEST_NAME])
  path = os.path.join(directory, MANIFEST_NAME)
  header = json.loads(json.dumps(header))  # normalise tuples etc. as JSON would
  if fs_exists(path):
    with fs_open(path, "r") as f:
      existing = json.load(f)
    old, new = _pass_identity(existing), _pass_identity(header)
    if old != new:
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise RecordError(
        f"{path} belongs to a different teacher pass (fields differ: {diff}); "
        "use another output folder or delete this one"
      )
    return
  write_manifest(directory, {**header, "status": "incomplete", "shards": []})


def finalize_manifest(directory: str) -> dict:
  """Lists every shard's marker in the manifest and marks the folder complete."""
  path = os.path.join(directory, MANIFEST_NAME)
  with fs_open(path, "r") as f:
    manifest = json.load(f)
  num_shards, per_shard = manifest["num_shards"], manifest["records_per_shard"]
  shards, missing = [], []
  for i in range(num_shards):
    marker = read_marker(directory, i, num_shards)
    if marker is None:
      missing.append(shard_name(i, num_shards))
      continue
    shards.append({**marker, "first_example": i * per_shard})
  if missing:
    raise RecordError(f"{directory}: shards not written yet: {missing}")
  total = sum(s["records"] for s in shards)
  if total != manifest["num_examples"]:
    raise RecordError(
      f"{directory}: shards hold {total} records, the pass expected {manifest['num_examples']}"
    )
  if manifest.get("status") == "complete" and manifest.get("shards") == shards:
    return manifest  # already final: never rewritten (the folder may be read-only)
  manifest.update(status="complete", shards=shards)
  write_manifest(directory, manifest)
  return manifest


def records_dir(config, workdir: str) -> str:
  """Where the teacher pass of `config` writes (and the trainer reads) records."""
  tp = config.get("teacher_pass") or {}
  return tp.get("out_dir") or os.path.join(workdir, "teacher_records", tp.get("split", "train"))

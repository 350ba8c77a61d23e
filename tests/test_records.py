"""Records: schema round trip, manifest checks, damaged shards, the streaming reader."""

import json
import os

import chex
import ml_dtypes
import numpy as np
import pytest

from fdistill_jax import records as rec
from fdistill_jax.data.reader import RecordReader, records_data_fn

SPEC = rec.RecordSpec(
  num_samples=2, max_input_len=7, max_target_len=6, top_k=4, vocab_size=32, pad_id=0
)
FINGERPRINT = "f00dfeedf00dfeed"


def random_example(spec: rec.RecordSpec, index: int) -> dict:
  rng = np.random.default_rng(index)
  n, t, k, v = spec.num_samples, spec.max_target_len, spec.top_k, spec.vocab_size
  lengths = rng.integers(1, t + 1, n)
  position = np.arange(t)[None, :]
  tokens = np.where(position < lengths[:, None], rng.integers(1, v, (n, t)), spec.pad_id)
  ex = dict(
    example_index=index,
    inputs=rng.integers(1, v, rng.integers(1, spec.max_input_len + 1)),
    targets=rng.integers(1, v, rng.integers(1, t + 1)),
    teacher_tokens=tokens.astype(np.int32),
    teacher_lengths=lengths,
    teacher_token_logprobs=-rng.exponential(size=(n, t)).astype(np.float32),
    teacher_topk_logprobs=-np.sort(rng.exponential(size=(n, t, k)), -1).astype(np.float32),
    teacher_topk_ids=rng.integers(0, v, (n, t, k)).astype(np.int32),
    teacher_tail_logmass=-rng.exponential(size=(n, t)).astype(np.float32),
  )
  if spec.store_full_logprobs:
    ex["teacher_full_logprobs"] = -rng.exponential(size=(n, t, v)).astype(np.float32)
  return ex


def header(spec, num_examples, per_shard):
  return {
    "schema_version": rec.SCHEMA_VERSION,
    "spec": {**vars(spec)},
    "teacher": {"name": "test"},
    "tokenizer_fingerprint": FINGERPRINT,
    "sampler": {"method": "test"},
    "seed": 0,
    "records_per_shard": per_shard,
    "num_examples": num_examples,
    "num_shards": -(-num_examples // per_shard),
    "task": {"name": "fake", "split": "train"},
  }


def make_folder(directory, num_examples=20, per_shard=6, spec=SPEC):
  """Writes a complete record folder of random examples; returns them by index."""
  h = header(spec, num_examples, per_shard)
  rec.open_folder(str(directory), h)
  examples = {i: random_example(spec, i) for i in range(num_examples)}
  for s in range(h["num_shards"]):
    ids = range(s * per_shard, min((s + 1) * per_shard, num_examples))
    rec.write_shard(
      str(directory), s, h["num_shards"], [rec.encode_example(spec, **examples[i]) for i in ids]
    )
  rec.finalize_manifest(str(directory))
  return examples


def expected_batch_row(ex, spec, s, t):
  """The padded arrays the reader must produce for one example, from numpy."""

  def fit(a, value=0):
    a = a[:, :t]
    pad = [(0, 0), (0, t - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad, constant_values=value)

  def pad1(a, length):
    a = np.asarray(a)[:length]
    return np.pad(a, (0, length - a.size), constant_values=spec.pad_id)

  bf16 = ml_dtypes.bfloat16
  return {
    "example_index": ex["example_index"],
    "inputs": pad1(ex["inputs"], s),
    "input_mask": (np.arange(s) < len(ex["inputs"])).astype(np.float32),
    "targets": pad1(ex["targets"], t),
    "target_mask": (np.arange(t) < min(len(ex["targets"]), spec.max_target_len)).astype(np.float32),
    "teacher_tokens": fit(ex["teacher_tokens"], spec.pad_id),
    "teacher_mask": (np.arange(t)[None] < ex["teacher_lengths"][:, None]).astype(np.float32),
    "teacher_token_logprobs": fit(ex["teacher_token_logprobs"]),
    "teacher_topk_logprobs": fit(ex["teacher_topk_logprobs"].astype(bf16).astype(np.float32)),
    "teacher_topk_ids": fit(ex["teacher_topk_ids"]),
    "teacher_tail_logmass": fit(ex["teacher_tail_logmass"]),
  }


def read_all(reader, num_batches):
  return [next(reader) for _ in range(num_batches)]


# ---------------------------------------------------------------------------
# Schema and folder.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_encode_decode_round_trip(dtype):
  spec = rec.RecordSpec(**{**vars(SPEC), "logprob_dtype": dtype, "store_full_logprobs": True})
  ex = random_example(spec, 3)
  got = rec.decode_example(spec, rec.encode_example(spec, **ex))
  assert got["example_index"] == 3
  for key in ("inputs", "targets", "teacher_lengths", "teacher_tokens", "teacher_topk_ids"):
    np.testing.assert_array_equal(got[key], ex[key])
  for key in ("teacher_token_logprobs", "teacher_tail_logmass"):  # float32: bit-exact
    np.testing.assert_array_equal(got[key], ex[key])
  # Quantised log-probs: exactly the rounded values, and within half an ulp
  # (bf16: 2^-8 relative, f16: 2^-11 relative) of the originals.
  store = rec.LOGPROB_DTYPES[dtype]
  rel = 2.0**-8 if dtype == "bfloat16" else 2.0**-11
  for key in ("teacher_topk_logprobs", "teacher_full_logprobs"):
    assert got[key].dtype == np.dtype(store)
    np.testing.assert_array_equal(got[key], ex[key].astype(store))
    np.testing.assert_allclose(got[key].astype(np.float64), ex[key], rtol=rel, atol=0)


def test_encode_rejects_wrong_shapes():
  ex = random_example(SPEC, 0)
  ex["teacher_topk_ids"] = ex["teacher_topk_ids"][..., :2]
  with pytest.raises(rec.RecordError, match="teacher_topk_ids expected"):
    rec.encode_example(SPEC, **ex)


def test_folder_manifest_and_markers(tmp_path):
  make_folder(tmp_path, num_examples=20, per_shard=6)
  manifest = rec.read_manifest(str(tmp_path))
  assert manifest["status"] == "complete"
  assert [s["records"] for s in manifest["shards"]] == [6, 6, 6, 2]
  assert [s["first_example"] for s in manifest["shards"]] == [0, 6, 12, 18]
  for s in manifest["shards"]:
    path = tmp_path / s["file"]
    assert rec.file_sha256(str(path)) == s["sha256"]
    assert os.path.exists(str(path) + rec.MARKER_SUFFIX)
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_reopen_with_other_settings_raises(tmp_path):
  make_folder(tmp_path, num_examples=4, per_shard=2)
  h = header(SPEC, 4, 2)
  rec.open_folder(str(tmp_path), h)  # the same pass again: fine
  with pytest.raises(rec.RecordError, match=r"different teacher pass.*seed"):
    rec.open_folder(str(tmp_path), {**h, "seed": 1})


def test_finalize_names_missing_shards(tmp_path):
  h = header(SPEC, 4, 2)
  rec.open_folder(str(tmp_path), h)
  rec.write_shard(str(tmp_path), 0, 2, [rec.encode_example(SPEC, **random_example(SPEC, 0))] * 2)
  with pytest.raises(rec.RecordError, match="shard-00001-of-00002"):
    rec.finalize_manifest(str(tmp_path))


def test_stale_temporaries_are_removed(tmp_path):
  name = rec.shard_name(0, 2)
  for leftover in (f"{name}.tmp-1-abc", f"{name}{rec.MARKER_SUFFIX}.tmp-1-abc"):
    (tmp_path / leftover).write_bytes(b"half")
  (tmp_path / f"{rec.shard_name(1, 2)}.tmp-1-abc").write_bytes(b"other shard's")
  rec.remove_stale_temporaries(str(tmp_path), [name])
  assert os.listdir(tmp_path) == [f"{rec.shard_name(1, 2)}.tmp-1-abc"]


def test_folder_on_a_filesystem_url():
  """Paths with a scheme (gs://, s3://) go through tf.io.gfile; ram:// stands in here."""
  directory = f"ram://records-{os.getpid()}"
  examples = make_folder(directory, num_examples=8, per_shard=4)
  manifest = rec.read_manifest(directory)
  assert manifest["status"] == "complete"
  assert not [p for p in rec.fs_listdir(directory) if ".tmp-" in p]
  reader = RecordReader(directory, batch_size=4, num_epochs=1, shuffle=False)
  seen = []
  for batch in reader:
    for row, index in enumerate(batch["example_index"].tolist()):
      seen.append(index)
      want = expected_batch_row(examples[index], SPEC, SPEC.max_input_len, SPEC.max_target_len)
      for key, value in want.items():
        np.testing.assert_array_equal(batch[key][row], value, err_msg=key)
  assert sorted(seen) == list(range(8))


# ---------------------------------------------------------------------------
# Reader: values, order, resume, sharding.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("s,t", [(7, 6), (9, 8), (7, 4)])
def test_reader_round_trip(tmp_path, s, t):
  examples = make_folder(tmp_path, num_examples=20, per_shard=6)
  reader = RecordReader(
    str(tmp_path), batch_size=5, max_input_len=s, max_target_len=t, shuffle=False, num_epochs=1
  )
  batches = list(reader)
  assert len(batches) == 4
  seen = []
  for batch in batches:
    chex.assert_shape(batch["teacher_topk_ids"], (5, 2, t, 4))
    chex.assert_shape(batch["inputs"], (5, s))
    assert batch["example_index"].dtype == np.int64
    assert batch["teacher_tokens"].dtype == np.int32 and batch["inputs"].dtype == np.int32
    assert batch["teacher_topk_logprobs"].dtype == np.float32
    for row, index in enumerate(batch["example_index"]):
      seen.append(int(index))
      want = expected_batch_row(examples[int(index)], SPEC, s, t)
      for key, value in want.items():
        np.testing.assert_array_equal(batch[key][row], value, err_msg=key)
  assert sorted(seen) == list(range(20))


def test_shuffle_is_deterministic_and_covers_each_record_once(tmp_path):
  make_folder(tmp_path, num_examples=20, per_shard=6)

  def order(seed):
    reader = RecordReader(str(tmp_path), batch_size=4, seed=seed, num_epochs=2, shuffle_buffer=8)
    return [b["example_index"].tolist() for b in reader]

  a, b, c = order(1), order(1), order(2)
  assert a == b
  assert a != c
  first_epoch, second_epoch = sum(a[:5], []), sum(a[5:], [])
  assert sorted(first_epoch) == sorted(second_epoch) == list(range(20))
  assert first_epoch != second_epoch  # each epoch is reshuffled


@pytest.mark.parametrize("consumed", [0, 3, 5, 7])
def test_resume_gives_the_exact_remaining_stream(tmp_path, consumed):
  make_folder(tmp_path, num_examples=20, per_shard=6)
  kwargs = dict(batch_size=4, seed=7, shuffle_buffer=8, num_epochs=3)
  reference = [b["example_index"].tolist() for b in RecordReader(str(tmp_path), **kwargs)]
  reader = RecordReader(str(tmp_path), **kwargs)
  read_all(reader, consumed)
  position = json.loads(json.dumps(reader.position))  # as a checkpoint would store it
  resumed = RecordReader(str(tmp_path), position=position, **kwargs)
  rest = list(resumed)
  assert [b["example_index"].tolist() for b in rest] == reference[consumed:]
  # The resumed batches are whole batches, not just the same indices.
  again = RecordReader(str(tmp_path), **kwargs)
  read_all(again, consumed)
  if rest:
    chex.assert_trees_all_equal(next(again), rest[0])


def test_process_shards_are_disjoint_and_complete(tmp_path):
  make_folder(tmp_path, num_examples=24, per_shard=3)
  seen = []
  for p in range(3):
    reader = RecordReader(
      str(tmp_path), batch_size=3, num_epochs=1, process_index=p, process_count=3
    )
    seen.append(sorted(sum((b["example_index"].tolist() for b in reader), [])))
    assert reader.num_records == (9 if p < 2 else 6)
  assert sorted(sum(seen, [])) == list(range(24))
  assert seen[0] == [0, 1, 2, 9, 10, 11, 18, 19, 20]


def test_last_batch_padded_when_kept(tmp_path):
  make_folder(tmp_path, num_examples=7, per_shard=7)
  reader = RecordReader(str(tmp_path), batch_size=4, shuffle=False, num_epochs=1,
                        drop_remainder=False)  # fmt: skip
  first, last = list(reader)
  np.testing.assert_array_equal(last["example_index"], [4, 5, 6, -1])
  assert last["input_mask"][3].sum() == last["teacher_mask"][3].sum() == 0
  assert last["target_mask"][:3].sum() > 0
  chex.assert_trees_all_equal_shapes(first, last)


# ---------------------------------------------------------------------------
# Reader: what it refuses.
# ---------------------------------------------------------------------------


def test_vocab_and_fingerprint_mismatch(tmp_path):
  make_folder(tmp_path, num_examples=4, per_shard=2)
  with pytest.raises(rec.RecordError, match="vocab_size 32, the student expects 50"):
    RecordReader(str(tmp_path), batch_size=2, expected_vocab_size=50)
  with pytest.raises(rec.RecordError, match=f"tokenizer {FINGERPRINT}.*abc"):
    RecordReader(str(tmp_path), batch_size=2, expected_fingerprint="abc")
  ok = RecordReader(
    str(tmp_path), batch_size=2, expected_vocab_size=32, expected_fingerprint=FINGERPRINT
  )
  assert next(ok)["teacher_topk_ids"].shape == (2, 2, 6, 4)


def test_schema_version_status_and_length_checks(tmp_path):
  make_folder(tmp_path, num_examples=4, per_shard=2)
  path = tmp_path / rec.MANIFEST_NAME
  manifest = json.loads(path.read_text())
  with pytest.raises(rec.RecordError, match="max_input_len=5 would cut"):
    RecordReader(str(tmp_path), batch_size=2, max_input_len=5)
  path.write_text(json.dumps({**manifest, "status": "incomplete"}))
  with pytest.raises(rec.RecordError, match="has not finished"):
    RecordReader(str(tmp_path), batch_size=2)
  path.write_text(json.dumps({**manifest, "schema_version": 99}))
  with pytest.raises(rec.RecordError, match="schema_version 99, this code reads version 1"):
    RecordReader(str(tmp_path), batch_size=2)


def _shard_offsets(path):
  """Byte offset of every record in a TFRecord file, from its framing."""
  data, offsets, offset = open(path, "rb").read(), [], 0
  while offset < len(data):
    offsets.append(offset)
    offset += 16 + int.from_bytes(data[offset : offset + 8], "little")
  return offsets


def damage(tmp_path, kind, record=3):
  """Damages shard 1 (records 6..11) at `record`; returns its path."""
  manifest = rec.read_manifest(str(tmp_path))
  path = str(tmp_path / manifest["shards"][1]["file"])
  data = bytearray(open(path, "rb").read())
  offset = _shard_offsets(path)[record]
  if kind == "flip":
    data[offset + 12 + 40] ^= 0x01
  elif kind == "truncate":
    data = data[: offset + 30]
  elif kind == "length":
    data[offset + 1] ^= 0x10
  open(path, "wb").write(bytes(data))
  return path


@pytest.mark.parametrize(
  "kind,reason",
  [("flip", "data checksum"), ("truncate", "truncated"), ("length", "corrupt length")],
)
def test_damaged_shard_error_names_file_and_record(tmp_path, kind, reason):
  make_folder(tmp_path, num_examples=20, per_shard=6)
  path = damage(tmp_path, kind, record=3)
  with pytest.raises(rec.RecordError, match=f"{path}: record 3 .*{reason}"):
    RecordReader(str(tmp_path), batch_size=4)


def test_damage_found_while_streaming_without_checksums(tmp_path):
  make_folder(tmp_path, num_examples=20, per_shard=6)
  path = damage(tmp_path, "flip", record=2)
  reader = RecordReader(str(tmp_path), batch_size=4, verify_checksums=False, num_epochs=1)
  with pytest.raises(rec.RecordError, match=f"{path}: record 2 .*data checksum"):
    list(reader)


def test_rewritten_shard_fails_checksum(tmp_path):
  make_folder(tmp_path, num_examples=12, per_shard=6)
  manifest = rec.read_manifest(str(tmp_path))
  a, b = (str(tmp_path / s["file"]) for s in manifest["shards"])
  os.replace(b, a)  # a valid shard, but not the one the manifest lists
  with pytest.raises(rec.RecordError, match=f"{a}: sha256 differs"):
    RecordReader(str(tmp_path), batch_size=2)


@pytest.mark.parametrize("kind,lost", [("flip", 1), ("truncate", 3)])
def test_skip_corrupt_counts_and_keeps_good_records(tmp_path, kind, lost):
  examples = make_folder(tmp_path, num_examples=20, per_shard=6)
  path = damage(tmp_path, kind, record=3)  # example 9 (and, truncated, 10 and 11)
  reader = RecordReader(str(tmp_path), batch_size=1, skip_corrupt=True, shuffle=False, num_epochs=1)
  assert reader.skipped == {path: lost}
  got = {int(b["example_index"][0]): b for b in reader}
  assert sorted(got) == sorted(set(range(20)) - set(range(9, 9 + lost)))
  for i, batch in got.items():
    want = expected_batch_row(examples[i], SPEC, SPEC.max_input_len, SPEC.max_target_len)
    np.testing.assert_array_equal(batch["teacher_topk_ids"][0], want["teacher_topk_ids"])
  reader.close()


# ---------------------------------------------------------------------------
# The trainer's checks of its records, before anything trains.
# ---------------------------------------------------------------------------


def _no_training(*args, **kwargs):
  raise AssertionError("the run got past the records checks")


def _distill_on_records(tmp_path, monkeypatch, objective="kl"):
  """A distill config reading `make_folder` records; models and the loop must not start."""
  from fdistill_jax import checkpoints, main
  from tests import _train_helpers as h

  directory = tmp_path / "records"
  make_folder(directory, num_examples=4, per_shard=2)
  c = h.config(objective, max_input_len=SPEC.max_input_len)
  c.teacher_pass.out_dir = str(directory)
  monkeypatch.setattr(main.train, "train_loop", _no_training)
  monkeypatch.setattr(checkpoints, "load_model", _no_training)
  monkeypatch.setattr(main.models, "build_model", _no_training)
  return main, c, directory


def test_trainer_refuses_records_of_another_tokenizer(tmp_path, monkeypatch):
  from fdistill_jax.data import tasks

  main, c, directory = _distill_on_records(tmp_path, monkeypatch)
  task_fingerprint = tasks.get_task(c.task).tokenizer.fingerprint()
  assert task_fingerprint != FINGERPRINT
  with pytest.raises(rec.RecordError) as e:
    main.run_distill(c, str(tmp_path / "work"))
  message = str(e.value)
  assert str(directory / rec.MANIFEST_NAME) in message
  assert f"made with tokenizer {FINGERPRINT}" in message
  assert f"the task's tokenizer is {task_fingerprint}" in message


def test_trainer_reader_checks_the_fingerprint_on_every_open(tmp_path, monkeypatch):
  """The reader the loop opens (also on resume) gets the fingerprint, not only the first check."""
  _, c, directory = _distill_on_records(tmp_path, monkeypatch)
  data_fn = records_data_fn(c, str(tmp_path), True, 32, FINGERPRINT)
  assert next(data_fn(None))["teacher_tokens"].shape[-1] == 6
  path = directory / rec.MANIFEST_NAME
  path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_fingerprint": "0ther"}))
  with pytest.raises(
    rec.RecordError, match=f"tokenizer 0ther, the task's tokenizer is {FINGERPRINT}"
  ):
    data_fn({"epoch": 0, "batches": 1})


def test_trainer_refuses_records_without_topk(tmp_path, monkeypatch):
  _, c, directory = _distill_on_records(tmp_path, monkeypatch)
  path = directory / rec.MANIFEST_NAME
  manifest = json.loads(path.read_text())
  for spec in (
    {**manifest["spec"], "top_k": 0},
    {k: v for k, v in manifest["spec"].items() if k != "top_k"},
  ):
    path.write_text(json.dumps({**manifest, "spec": spec}))
    with pytest.raises(ValueError) as e:
      records_data_fn(c, str(tmp_path), True, 32)
    message = str(e.value)
    assert not isinstance(e.value, KeyError)
    assert message.startswith(f"{path}: objective.use_teacher_topk=True")
    assert "teacher_topk_logprobs, teacher_topk_ids, teacher_tail_logmass" in message
    assert "written with top_k=0" in message
    assert "rerun the teacher pass with teacher_pass.top_k > 0" in message


def test_trainer_refuses_batches_without_topk_before_compiling(tmp_path, monkeypatch):
  """Batches without the top-k keys: a ValueError saying what to change, not a KeyError."""
  from fdistill_jax import models, train, train_step
  from tests import _train_helpers as h

  def no_compile(*args, **kwargs):
    raise AssertionError("the step was jitted before the batch was checked")

  c = h.config("kl")
  batch = {k: v for k, v in h.make_batch(0).items() if not k.startswith("teacher_topk")}
  student = models.build_model(c.student.model, rngs=0)
  monkeypatch.setattr(train_step, "jit_step", lambda *a, **k: no_compile)
  with pytest.raises(ValueError) as e:
    train.train_loop(c, str(tmp_path), student=student, data_fn=lambda p: iter([batch]))
  message = str(e.value)
  assert "objective.use_teacher_topk=True" in message
  assert "teacher_topk_logprobs, teacher_topk_ids, teacher_tail_logmass" in message
  assert f"has keys {sorted(batch)}" in message
  assert "objective.use_teacher_topk=False" in message

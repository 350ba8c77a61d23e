"""Record folders checked at the door: inspect, manifest vs shards, teacher identity, life cycle."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags

from fdistill_jax import record_checks
from fdistill_jax import records as rec
from fdistill_jax.data.reader import RecordReader, records_data_fn
from tests.test_records import SPEC, damage, header, make_folder, random_example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inspect(directory, capsys, task=None):
  """Runs `--mode=inspect`'s function; returns (SystemExit or None, printed text)."""
  config = ConfigDict({"teacher_pass": {"out_dir": str(directory)}})
  if task is not None:
    config.task = task
  try:
    record_checks.inspect_main(config, "/unused", num_records=1)
    exit_error = None
  except SystemExit as e:
    exit_error = e
  return exit_error, capsys.readouterr().out


# ---------------------------------------------------------------------------
# --mode=inspect verifies every shard.
# ---------------------------------------------------------------------------


def test_inspect_passes_a_healthy_folder(tmp_path, capsys):
  make_folder(tmp_path, num_examples=20, per_shard=6)
  error, out = inspect(tmp_path, capsys)
  assert error is None
  assert "verified: 4 of 4 shards, 20 records" in out and "DAMAGED" not in out


@pytest.mark.parametrize(
  "kind,reason",
  [("flip", "data checksum"), ("truncate", "truncated"), ("length", "corrupt length")],
)
def test_inspect_fails_on_a_damaged_shard_naming_file_record_and_offset(
  tmp_path, capsys, kind, reason
):
  make_folder(tmp_path, num_examples=20, per_shard=6)
  path = damage(tmp_path, kind, record=3)
  error, out = inspect(tmp_path, capsys)
  assert error is not None and error.code != 0
  assert f"{path}: record 3 (byte offset" in str(error.code) and reason in str(error.code)
  assert "DAMAGED" in out and "verified" not in out


def test_inspect_fails_on_a_deleted_shard(tmp_path, capsys):
  make_folder(tmp_path, num_examples=20, per_shard=6)
  manifest = rec.read_manifest(str(tmp_path))
  gone = tmp_path / manifest["shards"][2]["file"]
  os.remove(gone)
  error, _ = inspect(tmp_path, capsys)
  assert error is not None and f"{gone}: shard listed in the manifest is missing" in str(error.code)


def test_inspect_fails_on_a_wrong_vocabulary(tmp_path, capsys):
  make_folder(tmp_path, num_examples=8, per_shard=4)
  path = tmp_path / rec.MANIFEST_NAME
  manifest = json.loads(path.read_text())
  # A manifest that claims a smaller vocabulary than the ids in the shards.
  path.write_text(json.dumps({**manifest, "spec": {**manifest["spec"], "vocab_size": 8}}))
  error, out = inspect(tmp_path, capsys)
  assert error is not None
  shard = tmp_path / manifest["shards"][0]["file"]
  assert f"{shard}: record 0 (byte offset 0): " in out
  assert "outside the vocabulary [0, vocab_size=8)" in out


def test_inspect_fails_on_records_of_another_tokenizer(tmp_path, capsys):
  make_folder(tmp_path, num_examples=4, per_shard=2)
  from configs import tasks

  error, _ = inspect(tmp_path, capsys, task=tasks.task_config("synthetic"))
  assert error is not None
  assert "made with tokenizer f00dfeedf00dfeed, the task's tokenizer is" in str(error.code)


def test_inspect_command_exits_non_zero_on_damage(tmp_path):
  make_folder(tmp_path, num_examples=8, per_shard=4)
  path = damage(tmp_path, "flip", record=1)
  command = [
    sys.executable,
    "-m",
    "fdistill_jax.main",
    "--config=configs/teacher_pass.py",
    f"--config.teacher_pass.out_dir={tmp_path}",
    "--config.task.name=synthetic",
    f"--workdir={tmp_path / 'work'}",
    "--mode=inspect",
  ]
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode != 0
  assert f"{path}: record 1 (byte offset" in done.stdout + done.stderr


# ---------------------------------------------------------------------------
# The manifest's spec against the shards, at every open.
# ---------------------------------------------------------------------------


def test_edited_topk_in_the_manifest_is_refused_on_open(tmp_path):
  make_folder(tmp_path, num_examples=8, per_shard=4)
  path = tmp_path / rec.MANIFEST_NAME
  manifest = json.loads(path.read_text())
  path.write_text(json.dumps({**manifest, "spec": {**manifest["spec"], "top_k": 3}}))
  shard = tmp_path / manifest["shards"][0]["file"]
  with pytest.raises(rec.RecordError) as e:
    RecordReader(str(tmp_path), batch_size=2, verify_checksums=True)
  message = str(e.value)
  assert message.startswith(f"{path}: the manifest's spec says top_k=3")
  assert f"{shard} record 0 holds top_k={SPEC.top_k}" in message


def test_trainer_refuses_an_edited_manifest_before_building_models(tmp_path, monkeypatch):
  from tests.test_records import _distill_on_records

  _, c, directory = _distill_on_records(tmp_path, monkeypatch)
  path = directory / rec.MANIFEST_NAME
  manifest = json.loads(path.read_text())
  spec = {**manifest["spec"], "num_samples": 3, "max_target_len": 5}
  path.write_text(json.dumps({**manifest, "spec": spec}))
  with pytest.raises(rec.RecordError, match=r"says num_samples=3, max_target_len=5, .* holds "):
    records_data_fn(c, str(tmp_path), True, SPEC.vocab_size)


# ---------------------------------------------------------------------------
# The teacher: compared by its parameters at distill time, never by its path.
# ---------------------------------------------------------------------------


def _records_of(directory, teacher: dict, fingerprint: str):
  h = {**header(SPEC, 4, 2), "teacher": teacher, "tokenizer_fingerprint": fingerprint}
  rec.open_folder(str(directory), h)
  for s in range(2):
    rows = [rec.encode_example(SPEC, **random_example(SPEC, i)) for i in (2 * s, 2 * s + 1)]
    rec.write_shard(str(directory), s, 2, rows)
  rec.finalize_manifest(str(directory))
  return h


@pytest.mark.parametrize("same_teacher", [True, False])
def test_distill_compares_the_records_teacher_with_the_loaded_one(
  tmp_path, monkeypatch, same_teacher
):
  from fdistill_jax import checkpoints, main, models, teacher_pass, train
  from fdistill_jax.data import tasks
  from tests import _train_helpers as h

  c = h.config("js", max_input_len=SPEC.max_input_len)
  teacher = models.build_model(c.teacher.model, rngs=1)
  other = models.build_model(c.teacher.model, rngs=2)  # same shape, other weights
  made_by = teacher_pass.params_fingerprint(teacher if same_teacher else other)
  directory = tmp_path / "records"
  fingerprint = tasks.get_task(c.task).tokenizer.fingerprint()
  _records_of(directory, {"checkpoint": "/elsewhere", "params_sha256": made_by}, fingerprint)
  c.teacher_pass.out_dir = str(directory)
  c.teacher.checkpoint = "/the/teacher"
  monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: (teacher, {}))
  monkeypatch.setattr(train, "train_loop", lambda *a, **k: {"preempted": False})
  if same_teacher:
    assert main.run_distill(c, str(tmp_path / "work")) == {"preempted": False}
    return
  with pytest.raises(rec.RecordError) as e:
    main.run_distill(c, str(tmp_path / "work"))
  message = str(e.value)
  assert str(directory / rec.MANIFEST_NAME) in message
  assert f"params_sha256 {made_by}" in message
  assert teacher_pass.params_fingerprint(teacher) in message


def test_teacher_pass_reopens_with_the_same_weights_moved_elsewhere(tmp_path):
  h = _records_of(tmp_path, {"checkpoint": "/old/place", "step": 3, "params_sha256": "abc"}, "f")
  moved = {**h, "teacher": {"checkpoint": "/new/place", "step": 3, "params_sha256": "abc"}}
  rec.open_folder(str(tmp_path), moved)  # the same teacher: no error
  other = {**h, "teacher": {"checkpoint": "/old/place", "step": 3, "params_sha256": "abd"}}
  with pytest.raises(rec.RecordError, match=r"different teacher pass .*'teacher'"):
    rec.open_folder(str(tmp_path), other)


# ---------------------------------------------------------------------------
# Folder life cycle: no stale manifest temporaries, no rewrite of a final manifest.
# ---------------------------------------------------------------------------

_KILLED_WRITER = """
import os, signal, sys
from fdistill_jax import files
from fdistill_jax import records as rec
from tests.test_records import SPEC, header
directory = sys.argv[1]
rec.open_folder(directory, header(SPEC, 4, 2))
def killed(tmp, path):
  os.kill(os.getpid(), signal.SIGKILL)  # after writing the temporary, before the rename
files.fs_commit = killed  # atomic_write_bytes renames through it
rec.finalize_manifest(directory)
"""


def test_manifest_temporary_of_a_killed_writer_does_not_survive(tmp_path):
  for s in range(2):
    rows = [rec.encode_example(SPEC, **random_example(SPEC, i)) for i in (2 * s, 2 * s + 1)]
    rec.write_shard(str(tmp_path), s, 2, rows)
  env = {**os.environ, "PYTHONPATH": ROOT}
  done = subprocess.run(
    [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], cwd=ROOT, env=env, timeout=120
  )
  assert done.returncode == -9
  assert [p for p in os.listdir(tmp_path) if p.startswith(f"{rec.MANIFEST_NAME}.tmp-")]
  rec.open_folder(str(tmp_path), header(SPEC, 4, 2))  # the restarted pass
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
  assert rec.finalize_manifest(str(tmp_path))["status"] == "complete"


def test_finalising_a_finished_folder_writes_nothing(tmp_path, monkeypatch):
  make_folder(tmp_path, num_examples=8, per_shard=4)
  path = tmp_path / rec.MANIFEST_NAME
  before = (path.read_bytes(), os.stat(path).st_ino)

  def read_only(*args, **kwargs):
    raise PermissionError("read-only storage")

  monkeypatch.setattr(rec, "atomic_write_bytes", read_only)
  rec.open_folder(str(tmp_path), header(SPEC, 8, 4))
  assert rec.finalize_manifest(str(tmp_path))["status"] == "complete"
  assert (path.read_bytes(), os.stat(path).st_ino) == before


# ---------------------------------------------------------------------------
# skip_corrupt from the config (and so the command line).
# ---------------------------------------------------------------------------


def test_skip_corrupt_is_a_config_key_the_trainer_reads(tmp_path, monkeypatch):
  from tests.test_records import _distill_on_records

  _, c, _ = _distill_on_records(tmp_path, monkeypatch)
  directory = tmp_path / "damaged"
  make_folder(directory, num_examples=8, per_shard=4)
  path = damage(directory, "flip", record=1)
  c.teacher_pass.out_dir = str(directory)
  data_fn = records_data_fn(c, str(tmp_path), True, SPEC.vocab_size, None)
  with pytest.raises(rec.RecordError, match=f"{path}: record 1"):
    data_fn(None)
  # As `--config.teacher_pass.skip_corrupt=true` sets it:
  config_file = os.path.join(ROOT, "configs", "distill.py")
  argv = ["prog", f"--config={config_file}:kl", "--config.teacher_pass.skip_corrupt=true"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  assert values.config.teacher_pass.skip_corrupt is True
  c.teacher_pass.skip_corrupt = values.config.teacher_pass.skip_corrupt
  reader = records_data_fn(c, str(tmp_path), True, SPEC.vocab_size, None)(None)
  assert reader.skipped == {path: 1}
  reader.close()


def test_the_teacher_fingerprint_is_the_same_through_every_loader_and_place(tmp_path):
  """What the pass records (load_teacher) is what distill computes (load_model), moved or not."""
  from flax import nnx

  from fdistill_jax import checkpoints, models, teacher_pass

  cfg = models.get_preset("t5-tiny")
  teacher = models.build_model(cfg, 7)
  saver = checkpoints.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  saver.save(3, {"params": nnx.to_pure_dict(nnx.state(teacher, nnx.Param)), "step": 3})
  saver.close()
  shutil.copytree(tmp_path / "ckpt", tmp_path / "moved")
  model, identity = checkpoints.load_model(cfg, str(tmp_path / "ckpt"), trained=True)
  recorded = teacher_pass.params_fingerprint(model)
  for folder in ("ckpt", "moved"):
    loaded, _ = checkpoints.load_model(cfg, str(tmp_path / folder))
    assert teacher_pass.params_fingerprint(loaded) == recorded
  assert identity["checkpoint"] == str(tmp_path / "ckpt")
  assert teacher_pass.params_fingerprint(models.build_model(cfg, 8)) != recorded

"""The teacher pass: record contents against the model, restarts, device counts.

Run as a script (`python -m tests.test_teacher_pass OUT_DIR KILL_AT_SHARD`),
this module is the child process of the SIGKILL test.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill_jax import models
from fdistill_jax import records as rec
from fdistill_jax import teacher_pass as tp
from fdistill_jax.data.reader import RecordReader
from fdistill_jax.data.tokenizers import Tokenizer

VOCAB, PAD, EOS = 64, 0, 1


class FakeTokenizer(Tokenizer):
  vocab_size, pad_id, eos_id = VOCAB, PAD, EOS

  def encode(self, text):
    return [2 + ord(c) % (VOCAB - 2) for c in text]

  def decode(self, ids):
    ids = list(ids)
    ids = ids[: ids.index(EOS)] if EOS in ids else ids
    return "".join(chr(ord("a") + (i - 2) % 26) for i in ids if i != PAD)

  def _decode_all(self, ids):
    return "".join("|" if i == EOS else chr(ord("a") + (i - 2) % 26) for i in ids)

  def _fingerprint_bytes(self):
    return b"fake-tokenizer-64"


class FakeTask:
  """Stands in for data/tasks.py: a fixed list of random examples."""

  name = "fake"
  splits = ("train",)

  def __init__(self, num_examples=10):
    self.tokenizer = FakeTokenizer()
    self.num_examples = num_examples

  def examples(self, split):
    for i in range(self.num_examples):
      rng = np.random.default_rng(100 + i)
      inputs = np.append(rng.integers(2, VOCAB, rng.integers(1, 9)), EOS).astype(np.int32)
      targets = np.append(rng.integers(2, VOCAB, rng.integers(1, 6)), EOS).astype(np.int32)
      yield dict(example_index=i, inputs=inputs, targets=targets, source_text="", target_text="")


PASS = tp.PassConfig(
  num_samples=2,
  sampler="sample",
  top_k=5,
  records_per_shard=4,
  batch_size=8,
  max_input_len=10,
  max_target_len=6,
  seed=3,
)


def tiny_teacher():
  return models.build_model(models.get_preset("t5-tiny"), 0)


def run_pass(out_dir, pc=PASS, num_examples=10, **kwargs):
  return tp.teacher_pass(
    tiny_teacher(), FakeTask(num_examples), str(out_dir), pc, progress=False, **kwargs
  )


def shard_bytes(directory):
  names = sorted(p for p in os.listdir(directory) if p.endswith(".tfrecord"))
  return {name: open(os.path.join(directory, name), "rb").read() for name in names}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted pass on all 8 devices."""
  out = tmp_path_factory.mktemp("reference")
  manifest = run_pass(out)
  return out, manifest


# ---------------------------------------------------------------------------
# Numerics.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 7, 50])
def test_topk_and_tail_match_float64(k):
  logits = np.random.default_rng(0).normal(size=(3, 4, 50)) * 4
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  values, ids, tail = tp.topk_and_tail(jnp.asarray(logp, jnp.float32), k)
  order = np.argsort(-logp, -1)[..., :k]
  np.testing.assert_array_equal(ids, order)
  np.testing.assert_allclose(values, np.take_along_axis(logp, order, -1), atol=1e-6)
  rest = logp.copy()
  np.put_along_axis(rest, order, -np.inf, -1)
  with np.errstate(divide="ignore"):
    want = np.log(np.exp(rest).sum(-1))
  np.testing.assert_allclose(tail, want, rtol=1e-5)  # -inf == -inf when k == V


def test_records_agree_with_the_teacher(reference):
  out, manifest = reference
  assert manifest["status"] == "complete" and manifest["num_shards"] == 3
  task, model = FakeTask(), tiny_teacher()
  examples = {e["example_index"]: e for e in task.examples("train")}
  reader = RecordReader(
    str(out), batch_size=10, shuffle=False, num_epochs=1, expected_vocab_size=VOCAB,
    expected_fingerprint=task.tokenizer.fingerprint(),
  )  # fmt: skip
  (batch,) = list(reader)
  order = np.argsort(batch["example_index"])  # shards are interleaved
  batch = {key: value[order] for key, value in batch.items()}
  assert batch["example_index"].tolist() == list(range(10))
  for row in range(10):
    ex = examples[row]
    np.testing.assert_array_equal(batch["inputs"][row, : ex["inputs"].size], ex["inputs"])
    np.testing.assert_array_equal(batch["targets"][row, : ex["targets"].size], ex["targets"])
  # Re-score the stored teacher sequences independently: float64 log-softmax.
  b, n, t, k = batch["teacher_topk_ids"].shape
  rep = lambda x: np.repeat(x, n, axis=0)  # noqa: E731
  tokens = batch["teacher_tokens"].reshape(b * n, t)
  mask = batch["teacher_mask"].reshape(b * n, t)
  logits = jax.jit(models.forward)(
    model, rep(batch["inputs"]), rep(batch["input_mask"]), tokens, mask
  ).logits
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = mask.astype(bool)
  token_lp = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  got = {
    key: batch[key].reshape(b * n, t, -1) for key in ("teacher_topk_logprobs", "teacher_topk_ids")
  }
  np.testing.assert_allclose(
    batch["teacher_token_logprobs"].reshape(b * n, t)[valid], token_lp[valid], atol=1e-5
  )
  top = np.take_along_axis(logp, got["teacher_topk_ids"], -1)
  np.testing.assert_allclose(got["teacher_topk_logprobs"][valid], top[valid], atol=1e-2)
  assert (np.diff(top[valid], axis=-1) <= 1e-6).all()  # ids in descending order
  assert (top[valid][:, -1] >= np.sort(logp[valid], -1)[:, -k] - 1e-6).all()  # truly the top k
  # Stored top-k (bf16) + tail mass make up the whole distribution. Rounding a
  # log-prob l to bf16 moves p = e^l by at most p |l| 2^-9 <= 2^-9 / e = 7.2e-4,
  # so every stored probability is within 1e-3, and the mass within k times that.
  full_p = np.exp(np.take_along_axis(logp, got["teacher_topk_ids"], -1))[valid]
  stored_p = np.exp(got["teacher_topk_logprobs"].astype(np.float64))[valid]
  np.testing.assert_allclose(stored_p, full_p, atol=1e-3)
  tail = batch["teacher_tail_logmass"].reshape(b * n, t)[valid]
  np.testing.assert_allclose(np.exp(tail), 1 - full_p.sum(-1), atol=1e-6)  # float32 tail
  np.testing.assert_allclose(stored_p.sum(-1) + np.exp(tail), 1.0, atol=k * 2**-9 / np.e)
  # Nothing but zeros/pad past each sequence's end.
  assert (tokens[~valid] == PAD).all() and (got["teacher_topk_logprobs"][~valid] == 0).all()
  # A sequence ends at its first EOS, which is counted in its length.
  lengths = mask.sum(-1).astype(int)
  for row in range(b * n):
    seq = tokens[row, : lengths[row]]
    assert EOS not in seq[:-1]
    assert seq[-1] == EOS or lengths[row] == t


# ---------------------------------------------------------------------------
# Restarts and device counts.
# ---------------------------------------------------------------------------


class Stop(Exception):
  pass


def test_interrupted_pass_resumes_to_identical_records(reference, tmp_path):
  ref_dir, ref_manifest = reference

  def stop_after_first(index):
    raise Stop(f"simulated crash after shard {index}")

  with pytest.raises(Stop):
    run_pass(tmp_path, on_shard_written=stop_after_first)
  assert len(shard_bytes(tmp_path)) == 1
  assert rec.read_manifest(str(tmp_path))["status"] == "incomplete"
  written = []
  manifest = run_pass(tmp_path, on_shard_written=written.append)
  assert sorted(written) == [1, 2]  # shard 0 was not recomputed
  assert shard_bytes(tmp_path) == shard_bytes(ref_dir)
  assert manifest == ref_manifest


def test_sigkill_mid_write_then_restart(reference, tmp_path):
  ref_dir, ref_manifest = reference
  child = subprocess.run(
    [sys.executable, "-m", "tests.test_teacher_pass", str(tmp_path), "1"],
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    capture_output=True,
    timeout=300,
  )
  assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
  leftovers = [p for p in os.listdir(tmp_path) if ".tmp-" in p]
  assert leftovers and all(p.startswith(rec.shard_name(1, 3)) for p in leftovers)
  manifest = run_pass(tmp_path)
  assert shard_bytes(tmp_path) == shard_bytes(ref_dir)
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
  assert manifest == ref_manifest


def _records(directory, manifest):
  import tensorflow as tf

  spec = rec.spec_from_manifest(manifest)
  return [
    rec.decode_example(spec, raw.numpy())
    for shard in manifest["shards"]
    for raw in tf.data.TFRecordDataset(os.path.join(directory, shard["file"]))
  ]


def test_one_device_gives_the_same_records(reference, tmp_path):
  """Same sequences and top-k on 1 device as on 8; float32 log-probs to rounding.

  XLA's CPU matmuls tile by the per-device batch, and on some CPUs (seen on
  an AVX-512 Xeon, not on an AMD EPYC) 8 rows and 64 rows round a float32
  dot product differently in its last bit, so bytes are not always equal.
  Every token, length, top-k id and stored (bfloat16) top-k log-prob is.
  """
  ref_dir, ref_manifest = reference
  assert jax.local_device_count() == 8
  manifest = run_pass(tmp_path, devices=jax.local_devices()[:1])
  strip = lambda shards: [{k: v for k, v in s.items() if k != "sha256"} for s in shards]  # noqa: E731
  assert strip(manifest["shards"]) == strip(ref_manifest["shards"])
  ours, ref = _records(tmp_path, manifest), _records(ref_dir, ref_manifest)
  assert len(ours) == len(ref) == manifest["num_examples"]
  for a, b in zip(ours, ref, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      x, y = np.asarray(a[key]), np.asarray(b[key])
      if x.dtype == np.float32:
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=4e-6, err_msg=key)
      else:
        np.testing.assert_array_equal(x, y, err_msg=key)


def test_model_parallel_teacher_gives_the_same_records(reference, tmp_path):
  ref_dir, _ = reference
  pc = tp.PassConfig(**{**vars(PASS), "mesh": (("data", 4), ("model", 2))})
  run_pass(tmp_path, pc=pc)
  # Split matmuls sum in another order: the same sequences, log-probs to float32 rounding.
  ref = RecordReader(str(ref_dir), batch_size=10, shuffle=False, num_epochs=1)
  got = RecordReader(str(tmp_path), batch_size=10, shuffle=False, num_epochs=1)
  (want,), (have,) = list(ref), list(got)
  for key in ("example_index", "teacher_tokens", "teacher_mask", "teacher_topk_ids"):
    np.testing.assert_array_equal(have[key], want[key], err_msg=key)
  for key in ("teacher_token_logprobs", "teacher_tail_logmass"):
    np.testing.assert_allclose(have[key], want[key], atol=1e-5, err_msg=key)
  # bf16 storage: a 1e-7 difference may round to the neighbouring value (one ulp, 2^-7 relative).
  np.testing.assert_allclose(
    have["teacher_topk_logprobs"], want["teacher_topk_logprobs"], rtol=2**-7
  )


def test_multi_process_slices_make_the_same_records(reference, tmp_path):
  ref_dir, _ = reference
  # Process 1 of 2 first (it writes shard 1), then process 0 (shards 0, 2 and the manifest).
  assert run_pass(tmp_path, process_index=1, process_count=2) is None
  assert list(shard_bytes(tmp_path)) == [rec.shard_name(1, 3)]
  manifest = run_pass(tmp_path, process_index=0, process_count=2)
  assert shard_bytes(tmp_path) == shard_bytes(ref_dir)
  assert manifest["status"] == "complete"


def test_restart_with_other_settings_is_refused(reference, tmp_path):
  run_pass(tmp_path, num_examples=4)
  with pytest.raises(rec.RecordError, match="different teacher pass"):
    run_pass(tmp_path, pc=tp.PassConfig(**{**vars(PASS), "seed": 4}), num_examples=4)


# ---------------------------------------------------------------------------
# Command-line plumbing.
# ---------------------------------------------------------------------------


def test_load_model_from_a_trainer_checkpoint(tmp_path):
  from flax import nnx
  from ml_collections import ConfigDict

  from fdistill_jax import checkpoints

  teacher = models.build_model(models.get_preset("t5-tiny"), 7)
  saver = checkpoints.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  saver.save(3, {"params": nnx.to_pure_dict(nnx.state(teacher, nnx.Param)), "step": 3})
  saver.close()
  config = ConfigDict({"model": models.get_preset("t5-tiny"), "checkpoint": str(tmp_path / "ckpt")})
  model, identity = checkpoints.load_model(config.model, config.checkpoint, trained=True)
  assert identity["step"] == 3
  chex.assert_trees_all_equal(nnx.state(model), nnx.state(teacher))
  config.model.d_ff = 32
  with pytest.raises(ValueError, match="params do not fit config.teacher.model.*expected"):
    checkpoints.load_model(config.model, config.checkpoint, trained=True)
  with pytest.raises(ValueError, match="set `checkpoint`"):
    checkpoints.load_model(models.get_preset("t5-tiny"), "", trained=True)


def test_inspect_prints_manifest_and_decoded_records(reference, monkeypatch, capsys):
  from ml_collections import ConfigDict

  from fdistill_jax import record_checks
  from fdistill_jax.data import tasks

  ref_dir, _ = reference
  monkeypatch.setattr(tasks, "get_task", lambda config: FakeTask())
  config = ConfigDict({"task": {"name": "fake"}, "teacher_pass": {"out_dir": str(ref_dir)}})
  record_checks.inspect_main(config, "/unused", num_records=2)
  out = capsys.readouterr().out
  assert "status: complete" in out and "3 of 3 shards, 10 records" in out
  first = next(FakeTask().examples("train"))
  # Prompts are shown whole, EOS included (here written as "|").
  assert f"input:  {FakeTokenizer().decode(first['inputs'])}|" in out
  assert out.count("teacher[1] (log p") == 2


def write_data_and_teacher(tmp_path):
  """A 6-line jsonl task file and a trainer checkpoint of the tiny teacher."""
  from flax import nnx

  from fdistill_jax import checkpoints

  lines = [
    {"source": f"name {w} food {v}", "target": f"{w} serves {v}"} for w in "abc" for v in "xy"
  ]
  (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  teacher = tiny_teacher()
  saver = checkpoints.Checkpointer(str(tmp_path / "teacher"), async_save=False)
  saver.save(1, {"params": nnx.to_pure_dict(nnx.state(teacher, nnx.Param))})
  saver.close()
  return str(tmp_path / "train.jsonl"), str(tmp_path / "teacher")


def test_run_from_a_config(tmp_path):
  """configs/teacher_pass.py + a jsonl task + a trainer checkpoint -> readable records."""
  from configs import tasks as task_configs
  from configs import teacher_pass as pass_configs
  from fdistill_jax.data import tasks

  data, checkpoint = write_data_and_teacher(tmp_path)
  config = pass_configs.get_config()
  config.task = task_configs.task_config("jsonl", files={"train": data}, tokenizer={"kind": "word"})
  config.teacher.model = models.get_preset("t5-tiny")
  config.teacher.checkpoint = checkpoint
  config.teacher_pass.update(
    num_samples=2,
    batch_size=8,
    records_per_shard=4,
    max_input_len=8,
    max_target_len=5,
    store_full_logprobs=True,
  )
  tp.run(config, str(tmp_path / "work"))

  directory = rec.records_dir(config, str(tmp_path / "work"))
  assert directory == str(tmp_path / "work" / "teacher_records" / "train")
  task = tasks.get_task(config.task)
  reader = RecordReader(
    directory, batch_size=6, num_epochs=1, expected_vocab_size=VOCAB,
    expected_fingerprint=task.tokenizer.fingerprint(),
  )  # fmt: skip
  (batch,) = list(reader)
  assert sorted(batch["example_index"].tolist()) == list(range(6))
  # Full-vocabulary log-probs: normalised, and the top-k are their largest entries.
  full = batch["teacher_full_logprobs"]
  chex.assert_shape(full, (6, 2, 5, VOCAB))
  valid = batch["teacher_mask"].astype(bool)
  mass = np.exp(full.astype(np.float64)).sum(-1)
  np.testing.assert_allclose(mass[valid], 1.0, atol=VOCAB * 2**-9 / np.e)
  top = np.take_along_axis(full, batch["teacher_topk_ids"], -1)
  np.testing.assert_array_equal(top[valid], batch["teacher_topk_logprobs"][valid])
  manifest = rec.read_manifest(directory)
  assert manifest["teacher"]["step"] == 1 and manifest["sampler"]["method"] == "beam_search"


CONFIG_FILE = """
from configs import tasks, teacher_pass
from fdistill_jax.models import presets


def get_config(arg=None):
  config = teacher_pass.get_config()
  files, tokenizer = {{"train": "{data}"}}, {{"kind": "word"}}
  config.task = tasks.task_config("jsonl", files=files, tokenizer=tokenizer)
  config.teacher.model = presets.get_preset("t5-tiny")
  config.teacher.checkpoint = "{checkpoint}"
  config.teacher_pass.update(batch_size=8, records_per_shard=4, max_input_len=8, max_target_len=5)
  return config
"""


def test_command_line_teacher_pass_then_inspect(tmp_path):
  data, checkpoint = write_data_and_teacher(tmp_path)
  (tmp_path / "config.py").write_text(CONFIG_FILE.format(data=data, checkpoint=checkpoint))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def main(mode):
    args = [
      f"--config={tmp_path / 'config.py'}",
      f"--workdir={tmp_path / 'work'}",
      f"--mode={mode}",
    ]
    done = subprocess.run(
      [sys.executable, "-m", "fdistill_jax.main", *args], cwd=repo, capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done.stdout.decode()

  main("teacher_pass")
  manifest = rec.read_manifest(str(tmp_path / "work" / "teacher_records" / "train"))
  assert manifest["status"] == "complete" and manifest["num_examples"] == 6
  out = main("inspect")
  assert "2 of 2 shards, 6 records" in out
  assert "input:  name a food x" in out and "target: a serves x" in out


def _child(out_dir: str, kill_at_shard: int):
  """Runs the pass and SIGKILLs itself between writing a shard and renaming it."""
  replace = os.replace

  def dying_replace(src, dst):
    if dst.endswith(rec.shard_name(kill_at_shard, 3)):
      os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)

  os.replace = dying_replace
  run_pass(out_dir)


if __name__ == "__main__":
  _child(sys.argv[1], int(sys.argv[2]))


def test_pass_config_rejects_unknown_keys_and_its_defaults_are_the_configs():
  from configs import teacher_pass as teacher_pass_configs

  c = teacher_pass_configs.teacher_pass_config()
  pc = tp.PassConfig.from_config(c)
  assert pc.sampler_params == (("num_beams", 4),) and pc.mesh == (("data", -1),)
  for field in dataclasses.fields(tp.PassConfig):
    if field.default is not dataclasses.MISSING and field.name not in ("sampler_params", "mesh"):
      assert getattr(pc, field.name) == field.default, field.name
  c.unlock()
  c.num_sample = 2  # a typo
  with pytest.raises(ValueError, match=r"unknown keys \['num_sample'\]"):
    tp.PassConfig.from_config(c)

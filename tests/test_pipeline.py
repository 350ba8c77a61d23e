"""Static-shape batches: padding, truncation, shuffling, resumption, process shards."""

import itertools
import logging

import chex
import ml_collections
import numpy as np
import pytest

from fdistill_jax.data import pipeline, tasks


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  d = tmp_path_factory.mktemp("pipe")
  rng = np.random.default_rng(0)
  words = [f"w{i}" for i in range(20)]
  lines = []
  for i in range(23):
    src = " ".join(rng.choice(words, size=1 + i % 7))
    tgt = " ".join(rng.choice(words, size=1 + (i * 3) % 9))
    lines.append(f"{src}\t{tgt}")
  (d / "train.tsv").write_text("\n".join(lines) + "\n")
  cfg = ml_collections.ConfigDict(
    dict(name="toy", kind="tsv", files={"train": str(d / "train.tsv")}, tokenizer={"kind": "word"})
  )
  return tasks.get_task(cfg)


def _collect(it, n=None):
  return list(itertools.islice(it, n))


def test_shapes_masks_and_full_coverage(task):
  bs, s, t = 4, 8, 10
  out = _collect(pipeline.batches(task, "train", bs, s, t))
  assert len(out) == pipeline.num_batches(task, "train", bs) == 6  # 23 examples
  exs = {e["example_index"]: e for e in task.examples("train")}
  seen = []
  for b in out:
    chex.assert_shape([b["inputs"], b["input_mask"]], (bs, s))
    chex.assert_shape([b["targets"], b["target_mask"]], (bs, t))
    assert b["inputs"].dtype == np.int32 and b["input_mask"].dtype == np.float32
    assert b["example_index"].dtype == np.int64
    for i, j in enumerate(b["example_index"]):
      if j < 0:
        assert b["target_mask"][i].sum() == 0
        assert b["input_mask"][i].sum() > 0  # filler rows still hold a valid prompt
        continue
      seen.append(int(j))
      e = exs[int(j)]
      n_in, n_tgt = len(e["inputs"]), len(e["targets"])
      np.testing.assert_array_equal(b["inputs"][i, :n_in], e["inputs"])
      np.testing.assert_array_equal(b["input_mask"][i], np.arange(s) < n_in)
      np.testing.assert_array_equal(b["targets"][i, :n_tgt], e["targets"])
      np.testing.assert_array_equal(b["target_mask"][i], np.arange(t) < n_tgt)
      assert np.all(b["targets"][i, n_tgt:] == task.tokenizer.pad_id)
  assert seen == list(range(23))  # task order kept without shuffling
  assert (out[-1]["example_index"] == -1).sum() == 1


def test_truncation_keeps_eos_and_warns_once(task, caplog):
  with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
    b = next(pipeline.batches(task, "train", 23, 3, 4))
    next(pipeline.batches(task, "train", 23, 3, 4))
  warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
  assert len(warnings) == 1
  exs = list(task.examples("train"))
  n_in = sum(len(e["inputs"]) > 3 for e in exs)
  n_tgt = sum(len(e["targets"]) > 4 for e in exs)
  padded = pipeline.padded_split(task, "train", 3, 4)
  assert (padded.num_truncated_inputs, padded.num_truncated_targets) == (n_in, n_tgt)
  assert n_in > 0 and n_tgt > 0
  eos = task.tokenizer.eos_id
  for i, e in enumerate(exs):
    if len(e["inputs"]) > 3:
      np.testing.assert_array_equal(b["inputs"][i], [*e["inputs"][:2], eos])
      assert b["input_mask"][i].sum() == 3
    last = int(b["target_mask"][i].sum()) - 1
    assert b["targets"][i, last] == eos


def test_shuffle_is_seeded_and_changes_per_epoch(task):
  def order(seed, n):
    return np.concatenate(
      [
        b["example_index"]
        for b in _collect(
          pipeline.batches(task, "train", 5, 8, 10, shuffle_seed=seed, repeat=True), n
        )
      ]
    )

  a, b = order(1, 8), order(1, 8)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, order(2, 8))
  # repeat drops the remainder: 4 batches (20 of 23 examples) per epoch.
  e0, e1 = a[:20], a[20:40]
  assert len(set(e0)) == 20 and len(set(e1)) == 20
  assert not np.array_equal(e0, e1)
  assert -1 not in a


def test_start_batch_resumes_the_same_stream(task):
  def stream(start, n):
    return _collect(
      pipeline.batches(task, "train", 5, 8, 10, shuffle_seed=7, repeat=True, start_batch=start), n
    )

  full = stream(0, 11)
  for k in (1, 4, 6, 9):
    for x, y in zip(full[k:], stream(k, 11 - k), strict=True):
      chex.assert_trees_all_equal(x, y)


def test_process_shards_make_the_global_batch(task):
  kw = dict(shuffle_seed=3, repeat=True, start_batch=2)
  glob = _collect(pipeline.batches(task, "train", 6, 8, 10, **kw), 5)
  parts = [
    _collect(pipeline.batches(task, "train", 6, 8, 10, process_index=p, process_count=3, **kw), 5)
    for p in range(3)
  ]
  for g, *ps in zip(glob, *parts, strict=True):
    for p in ps:
      chex.assert_shape(p["inputs"], (2, 8))
    for key in g:
      np.testing.assert_array_equal(g[key], np.concatenate([p[key] for p in ps]))
  with pytest.raises(ValueError, match="divisible by process_count"):
    next(pipeline.batches(task, "train", 5, 8, 10, process_count=2))


def test_eval_batches_with_process_shards_cover_everything(task):
  seen = []
  for p in range(2):
    for b in pipeline.batches(task, "train", 8, 8, 10, process_index=p, process_count=2):
      chex.assert_shape(b["inputs"], (4, 8))
      seen += [int(j) for j in b["example_index"] if j >= 0]
  assert sorted(seen) == list(range(23))


def test_prompts_without_eos_keep_their_end(tmp_path):
  (tmp_path / "p.tsv").write_text("a b c d e f\tx\n")
  cfg = ml_collections.ConfigDict(
    dict(
      name="p",
      kind="tsv",
      files={"train": str(tmp_path / "p.tsv")},
      input_eos=False,
      source_template="{source} go",
      tokenizer={"kind": "word"},
    )
  )
  task = tasks.get_task(cfg)
  (ex,) = list(task.examples("train"))
  assert task.tokenizer.decode(ex["inputs"]) == "a b c d e f go"  # no EOS appended
  assert ex["targets"][-1] == task.tokenizer.eos_id
  b = next(pipeline.batches(task, "train", 1, 3, 4))
  assert task.tokenizer.decode(b["inputs"][0]) == "e f go"
  assert b["input_mask"][0].tolist() == [1, 1, 1]

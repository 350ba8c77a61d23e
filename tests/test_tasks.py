"""get_task: every task kind, on small local files or mocked tfds data."""

import json

import ml_collections
import numpy as np
import pytest

from fdistill_jax.data import synthetic, tasks


def _cfg(**kw):
  return ml_collections.ConfigDict(kw)


WORD = {"kind": "word"}


def _check_examples(task, split):
  exs = list(task.examples(split))
  assert exs, split
  for i, e in enumerate(exs):
    assert e["example_index"] == i
    for k in ("inputs", "targets"):
      assert e[k].dtype == np.int32 and e[k][-1] == task.tokenizer.eos_id
      assert task.tokenizer.eos_id not in e[k][:-1]
    assert e["target_text"] in e["references"]
  return exs


def test_synthetic_task(tmp_path):
  task = tasks.get_task(
    _cfg(
      name="syn",
      kind="synthetic",
      data_dir=str(tmp_path),
      num_names=3,
      num_foods=3,
      num_areas=2,
      num_prices=2,
      num_templates=3,
    )
  )
  assert task.splits == ("train", "validation", "test")
  assert task.tokenizer.vocab_size == synthetic.synthetic_tokenizer().vocab_size
  for split in task.splits:
    exs = _check_examples(task, split)
    for e in exs:
      modes = task.modes(e["source_text"])
      assert e["target_text"] in modes
      np.testing.assert_allclose(sum(modes.values()), 1.0)
      assert task.tokenizer.decode(e["targets"]) == e["target_text"]
  # Fixed order: a second pass gives the same examples.
  assert [e["target_text"] for e in task.examples("train")] == [
    e["target_text"] for e in tasks.get_task(task_cfg_copy(task, tmp_path)).examples("train")
  ]


def task_cfg_copy(task, tmp_path):
  s = task.spec
  return _cfg(
    kind="synthetic",
    data_dir=str(tmp_path),
    num_names=s.num_names,
    num_foods=s.num_foods,
    num_areas=s.num_areas,
    num_prices=s.num_prices,
    num_templates=s.num_templates,
  )


def test_unknown_kind_and_split():
  with pytest.raises(ValueError, match="kind='nope' is not one of"):
    tasks.get_task(_cfg(name="x", kind="nope"))


def test_tfds_unprepared_says_so(tmp_path):
  # The word tokenizer reads the data, so construction itself must fail clearly.
  with pytest.raises(
    FileNotFoundError, match=r"'xsum'.*not prepared under data_dir=.*never downloads"
  ):
    tasks.get_task(
      _cfg(name="xsum", kind="tfds", tfds_name="xsum", data_dir=str(tmp_path), tokenizer=WORD)
    )


@pytest.mark.parametrize(
  "name,src_field,tgt_field",
  [("xsum", "document", "summary"), ("wmt16_translate/ro-en", "en", "ro")],
)
def test_tfds_mock_loading(tmp_path, name, src_field, tgt_field):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=4):
    task = tasks.get_task(
      _cfg(
        name=name,
        kind="tfds",
        tfds_name=name,
        data_dir=str(tmp_path),
        tokenizer=WORD,
        source_prefix="p: ",
      )
    )
    exs = _check_examples(task, "validation")
    ds = tfds.load(name, split="validation", data_dir=str(tmp_path), shuffle_files=False)
    raw = list(tfds.as_numpy(ds))
  assert len(exs) == 4
  for e, r in zip(exs, raw, strict=True):
    assert e["source_text"] == "p: " + r[src_field].decode()
    assert e["target_text"] == r[tgt_field].decode()


DART = [
  {
    "tripleset": [["Aromi", "eatType", "coffee shop"], ["Aromi", "area", "city centre"]],
    "annotations": [
      {"source": "e2e", "text": "Aromi is a coffee shop in the city centre."},
      {"source": "e2e", "text": "In the city centre is Aromi, a coffee shop."},
    ],
  },
  {"tripleset": [["Mars", "orbits", "Sun"]], "annotations": [{"text": "Mars orbits the Sun."}]},
]


def test_dart(tmp_path):
  for split in ("train", "test"):
    (tmp_path / f"{split}.json").write_text(json.dumps(DART))
  files = {s: str(tmp_path / f"{s}.json") for s in ("train", "test")}
  task = tasks.get_task(_cfg(name="dart", kind="dart", files=files, tokenizer=WORD))
  assert task.splits == ("train", "test")
  train = _check_examples(task, "train")
  assert [e["target_text"] for e in train] == [
    "Aromi is a coffee shop in the city centre.",
    "In the city centre is Aromi, a coffee shop.",
    "Mars orbits the Sun.",
  ]
  assert train[0]["source_text"] == "Aromi : eatType : coffee shop | Aromi : area : city centre"
  test = _check_examples(task, "test")
  assert len(test) == 2 and len(test[0]["references"]) == 2
  assert test[0]["target_text"] == test[0]["references"][0]


def test_missing_file_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="split 'train' expected a file at"):
    tasks.get_task(
      _cfg(name="d", kind="dart", files={"train": str(tmp_path / "x.json")}, tokenizer=WORD)
    )


def test_commonsense_dialogue(tmp_path):
  data = {
    "1": {
      "context": "Sam lost his keys.",
      "speaker": "Sam",
      "turns": ["I lost my keys.", "Where did you see them last?", "In the car."],
    },
  }
  (tmp_path / "valid.json").write_text(json.dumps(data))
  task = tasks.get_task(
    _cfg(
      name="cd",
      kind="commonsense_dialogue",
      tokenizer=WORD,
      files={"train": str(tmp_path / "valid.json")},
    )
  )
  exs = _check_examples(task, "train")
  assert [(e["source_text"], e["target_text"]) for e in exs] == [
    ("Sam lost his keys. I lost my keys.", "Where did you see them last?"),
    ("Sam lost his keys. I lost my keys. Where did you see them last?", "In the car."),
  ]


def test_tsv_and_jsonl(tmp_path):
  (tmp_path / "a.tsv").write_text("a b\tc d\n\ne f\tg\th\n")
  task = tasks.get_task(
    _cfg(name="t", kind="tsv", files={"train": str(tmp_path / "a.tsv")}, tokenizer=WORD)
  )
  exs = _check_examples(task, "train")
  assert [(e["source_text"], e["target_text"], e["references"]) for e in exs] == [
    ("a b", "c d", ["c d"]),
    ("e f", "g", ["g", "h"]),
  ]
  assert task.tokenizer.decode(exs[1]["inputs"]) == "e f"
  (tmp_path / "b.jsonl").write_text(
    json.dumps({"src": "x y", "tgt": "z"})
    + "\n"
    + json.dumps({"src": "y", "tgt": ["z x", "x"]})
    + "\n"
  )
  task = tasks.get_task(
    _cfg(
      name="j",
      kind="jsonl",
      files={"test": str(tmp_path / "b.jsonl")},
      source_key="src",
      target_key="tgt",
      tokenizer={"kind": "word", "split": "test"},
    )
  )
  exs = _check_examples(task, "test")
  assert exs[1]["references"] == ["z x", "x"] and exs[1]["target_text"] == "z x"
  (tmp_path / "bad.tsv").write_text("only one column\n")
  with pytest.raises(ValueError, match=r"bad.tsv:1: expected 'source<TAB>target"):
    tasks.get_task(
      _cfg(
        name="t",
        kind="tsv",
        files={"test": str(tmp_path / "bad.tsv")},
        tokenizer={"kind": "word", "split": "test"},
      )
    )


def test_tokenizer_spec_goes_through_load_tokenizer(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "b": 4, "c": 5}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "d.tsv").write_text("a b\tc\n")
  task = tasks.get_task(
    _cfg(
      name="t",
      kind="tsv",
      files={"train": str(tmp_path / "d.tsv")},
      tokenizer={"kind": "hf", "path": str(tmp_path)},
    )
  )
  (ex,) = list(task.examples("train"))
  np.testing.assert_array_equal(ex["inputs"], [3, 4, 1])
  np.testing.assert_array_equal(ex["targets"], [5, 1])
  with pytest.raises(ValueError, match="needs task.tokenizer"):
    tasks.get_task(_cfg(name="t", kind="tsv", files={"train": str(tmp_path / "d.tsv")}))


def test_chitchat_real_corpus():
  pytest.importorskip("chitchat_dataset", reason="chitchat-dataset is not installed")
  cfg = _cfg(
    name="chat", kind="chitchat", tokenizer={"kind": "word", "max_words": 500}, max_examples=50
  )
  task = tasks.get_task(cfg)
  for split in task.splits:
    exs = _check_examples(task, split)
    assert len(exs) == 50
    assert all(e["source_text"] and e["target_text"] for e in exs)
  # Split by conversation: no (context, response) pair is shared across splits.
  pairs = {s: {(p.source, p.target) for p in task.pairs(s)} for s in task.splits}
  assert not pairs["train"] & pairs["test"]
  # Consecutive pairs chain: a response is the next example's context (context_turns=1).
  train = task.pairs("train")
  assert any(train[i].target == train[i + 1].source for i in range(len(train) - 1))


def test_source_template_prefix_and_caps(tmp_path):
  task = tasks.get_task(
    _cfg(
      kind="synthetic",
      data_dir=str(tmp_path),
      num_names=3,
      num_foods=3,
      num_areas=2,
      num_prices=2,
      num_templates=2,
      source_prefix="describe : ",
      source_template="user {source} assistant",
      max_examples={"train": 5},
    )
  )
  assert task.num_examples("train") == 5
  assert task.num_examples("test") > 0  # no cap for the other splits
  for e in task.examples("test"):
    assert e["source_text"].startswith("user describe : name :")
    assert e["source_text"].endswith(" assistant")
    assert e["target_text"] in task.modes(e["source_text"])
  with pytest.raises(ValueError, match="must contain"):
    tasks.get_task(_cfg(kind="synthetic", data_dir=str(tmp_path), source_template="x"))


def test_config_presets(tmp_path):
  from configs import tasks as presets

  cfg = presets.task_config("synthetic", data_dir=str(tmp_path), num_names=2, num_foods=2)
  task = tasks.get_task(cfg)
  assert task.spec.num_names == 2 and task.spec.num_templates == 5
  assert presets.get_config("wmt16_en_ro").task.tfds_name == "wmt16_translate/ro-en"
  with pytest.raises(ValueError, match="is not one of"):
    presets.task_config("nope")

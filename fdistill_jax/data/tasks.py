"""Tasks: where the (source, target) text pairs come from, and their tokenizer.

`get_task(config.task) -> Task`. Kinds (`config.task.kind`):

* `synthetic`: the built-in data-to-text task with a known p*(y|x)
  (`fdistill_jax.data.synthetic`); its word tokenizer is built in.
* `tfds`: a tfds catalogue dataset (`tfds_name`, e.g. `xsum`,
  `wmt16_translate/ro-en`) read with `download=False` from `data_dir`.
* `dart`: DART JSON files (a list of `{tripleset, annotations: [{text}]}`),
  sources linearised as `subj : rel : obj | ...`; training has one example
  per annotation, evaluation splits one per entry with every annotation kept
  as a reference.
* `commonsense_dialogue`: Commonsense-Dialogues JSON files (`{id: {context,
  speaker, turns: [str]}}`), one example per response turn.
* `tsv` / `jsonl`: any (source, target) file per split (`source_key`,
  `target_key` name the JSONL fields).
* `chitchat`: the real dialogue corpus bundled in the PyPI package
  `chitchat-dataset` (read from the installed file, no network), split by
  conversation.

File-backed kinds take `files` (split -> path; a split set to "" is absent).
Every kind except `synthetic` needs `tokenizer`: a spec for
`tokenizers.load_tokenizer`, or `{kind: "word"}` for a whitespace vocabulary
built from the training split (tests, demos).
Optional: `source_prefix` (prepended to every source, e.g. T5's task
prefix), `source_template` (a format string with `{source}`, e.g. a chat
template for a decoder-only prompt; applied after the prefix),
`system_prompt` with `system_template` (a format string with `{system}`:
the system turn that opens every prompt, e.g. ChatML's; nothing when the
prompt is empty), `max_examples` (a cap for every split, or `{split: cap}`),
`input_eos` (default True; False for prompts that end in a chat template); the word
tokenizer takes `split`, `min_count` and `max_words`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from fdistill_jax.data import synthetic
from fdistill_jax.data.tokenizers import Tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class TextPair:
  source: str
  target: str
  references: tuple[str, ...] = ()  # all references when there are several


class Task:
  """A named set of splits of text pairs, with their tokenizer.

  `examples(split)` yields, in a fixed order, `{"example_index", "inputs",
  "targets", "source_text", "target_text", "references"}` where `inputs`
  and `targets` are int32 arrays ending in EOS (inputs only when
  `input_eos`) and `references` is the list
  of reference texts (just `[target_text]` for single-reference tasks).
  Text pairs are loaded once per split and cached.
  """

  def __init__(
    self,
    name: str,
    splits: Iterable[str],
    load_split: Callable[[str], Iterable[TextPair]],
    tokenizer: Tokenizer | None = None,
    *,
    source_prefix: str = "",
    source_template: str = "{source}",
    max_examples: int | dict | None = None,
    input_eos: bool = True,
    system_prompt: str = "",
    system_template: str = "",
  ):
    self.name = name
    self.splits = tuple(splits)
    self._load_split = load_split
    if "{source}" not in source_template:
      raise ValueError(
        f"Task {name!r}: source_template={source_template!r} must contain '{{source}}'."
      )
    # Prefix, system turn and template as one wrapper around the raw source.
    self._wrap = _system_turn(name, system_prompt, system_template) + source_template.replace(
      "{source}", source_prefix + "{source}", 1
    )
    self._max_examples = max_examples
    # Encoder sources end in EOS; a decoder-only prompt that ends in its own
    # turn marker (a chat template) must not (`input_eos: False`).
    self.input_eos = bool(input_eos)
    self._pairs: dict[str, list[TextPair]] = {}
    self._tokenized: dict[str, list[dict]] = {}
    self.tokenizer = tokenizer

  def _check_split(self, split: str):
    if split not in self.splits:
      raise ValueError(f"Task {self.name!r}: split {split!r} is not one of {self.splits}.")

  def pairs(self, split: str) -> list[TextPair]:
    """The split's text pairs (source prefix applied), cached."""
    self._check_split(split)
    if split not in self._pairs:
      pairs = []
      for p in self._load_split(split):
        cap = self._max_examples
        if isinstance(cap, dict) or hasattr(cap, "get"):
          cap = cap.get(split)
        if cap is not None and len(pairs) >= cap:
          break
        pairs.append(dataclasses.replace(p, source=self.wrap_source(p.source)))
      self._pairs[split] = pairs
    return self._pairs[split]

  def wrap_source(self, raw: str) -> str:
    """The model-facing source of a raw source (prefix and template applied)."""
    return self._wrap.replace("{source}", raw, 1)

  def unwrap_source(self, source_text: str) -> str:
    """Inverse of `wrap_source`."""
    head, _, tail = self._wrap.partition("{source}")
    if not (source_text.startswith(head) and source_text.endswith(tail)):
      raise ValueError(f"Task {self.name!r}: {source_text!r} is not of the form {self._wrap!r}.")
    return source_text[len(head) : len(source_text) - len(tail)]

  def num_examples(self, split: str) -> int:
    return len(self.pairs(split))

  def _encode(self, text: str, eos: bool = True) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text) + [self.tokenizer.eos_id] * eos, np.int32)

  def examples(self, split: str) -> Iterator[dict]:
    if self.tokenizer is None:
      raise ValueError(f"Task {self.name!r} has no tokenizer; set task.tokenizer in the config.")
    if split not in self._tokenized:
      self._tokenized[split] = [
        {
          "example_index": i,
          "inputs": self._encode(p.source, self.input_eos),
          "targets": self._encode(p.target),
          "source_text": p.source,
          "target_text": p.target,
          "references": list(p.references) or [p.target],
        }
        for i, p in enumerate(self.pairs(split))
      ]
    yield from self._tokenized[split]


class SyntheticTask(Task):
  """The built-in task; adds the true output distribution for evaluation."""

  def __init__(self, name: str, spec: synthetic.SyntheticSpec, data_dir: str | None, **kwargs):
    self.spec = spec

    def load(split):
      for ex in synthetic.read_split(spec, split, data_dir):
        yield TextPair(ex["source"], ex["target"])

    super().__init__(name, synthetic.SPLITS, load, synthetic.synthetic_tokenizer(), **kwargs)

  def modes(self, source_text: str) -> dict[str, float]:
    """Every valid output of `source_text` -> p*(y|x) (sums to 1)."""
    return self.spec.modes(self.unwrap_source(source_text))


# ------------------------------------------------------------------------------
# Loaders: split name -> iterable of TextPair.
# ------------------------------------------------------------------------------


def _system_turn(name: str, system_prompt: str, system_template: str) -> str:
  """The system turn that opens every prompt ("" without a system prompt)."""
  if not system_prompt:
    return ""
  if "{system}" not in system_template:
    raise ValueError(
      f"Task {name!r}: system_prompt is set, so system_template must say where it goes "
      f"(a template with {{system}}); found system_template={system_template!r}."
    )
  if "{source}" in system_prompt:
    raise ValueError(f"Task {name!r}: system_prompt must not contain '{{source}}'.")
  return system_template.replace("{system}", system_prompt)


def _get(config, key, default=None):
  if hasattr(config, "get"):
    v = config.get(key, default)
  else:
    v = getattr(config, key, default)
  return default if v is None else v


def _files(config) -> dict[str, str]:
  """The task's split -> path; splits set to "" are absent."""
  files = {split: path for split, path in dict(_get(config, "files", {})).items() if path}
  if not files:
    raise ValueError(
      f"Task {_get(config, 'name')!r} (kind={_get(config, 'kind')!r}) needs "
      "task.files = {split: path} (e.g. --config.task.files.train=PATH); found none."
    )
  for split, path in files.items():
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"Task {_get(config, 'name')!r}: split {split!r} expected a file at {path!r}; "
        "found nothing there."
      )
  return files


def _tfds_loader(config):
  import tensorflow_datasets as tfds

  name = _get(config, "tfds_name")
  if not name:
    raise ValueError("Task kind 'tfds' needs task.tfds_name (e.g. 'xsum').")
  data_dir = _get(config, "data_dir")
  default_keys = _TFDS_KEYS.get(name, ("source", "target"))
  src_key = _get(config, "source_key") or default_keys[0]
  tgt_key = _get(config, "target_key") or default_keys[1]

  def load(split):
    try:
      ds = tfds.load(name, split=split, data_dir=data_dir, download=False, shuffle_files=False)
    except AssertionError as e:  # tfds' "could not find data" for unprepared datasets
      raise FileNotFoundError(
        f"tfds dataset {name!r} (split {split!r}) is not prepared under data_dir="
        f"{data_dir or '~/tensorflow_datasets'}; this library never downloads. Prepare it "
        f"on a machine with network access (`tfds build {name} --data_dir=DIR`) and point "
        f"task.data_dir at DIR. (tfds said: {e})"
      ) from e
    for ex in tfds.as_numpy(ds):
      yield TextPair(_text(ex, src_key, name), _text(ex, tgt_key, name))

  return load


# Source/target feature names of the catalogue datasets the paper uses
# (tfds flattens a Translation feature into one key per language).
_TFDS_KEYS = {
  "xsum": ("document", "summary"),
  "wmt16_translate/ro-en": ("en", "ro"),
}


def _text(example, key: str, where: str) -> str:
  v = example
  for part in key.split("/"):
    if part not in v:
      raise KeyError(f"{where}: expected feature {key!r}; the example has {sorted(example)}.")
    v = v[part]
  return v.decode() if isinstance(v, bytes) else str(v)


def _read_json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def linearize_triples(tripleset) -> str:
  """DART triples `[[s, r, o], ...]` -> `s : r : o | ...`."""
  return " | ".join(" : ".join(str(x).strip() for x in t) for t in tripleset)


def _dart_loader(config):
  files = _files(config)

  def load(split):
    for entry in _read_json(files[split]):
      source = linearize_triples(entry["tripleset"])
      texts = tuple(a["text"].strip() for a in entry.get("annotations", []) if a.get("text"))
      if not texts:
        continue
      if split == "train":
        for t in texts:
          yield TextPair(source, t)
      else:
        yield TextPair(source, texts[0], texts)

  return load


def _commonsense_dialogue_loader(config):
  files = _files(config)
  sep = _get(config, "turn_separator", " ")
  context_turns = int(_get(config, "context_turns", 0))  # 0: every previous turn

  def load(split):
    data = _read_json(files[split])
    dialogues = data.values() if isinstance(data, dict) else data
    for d in dialogues:
      turns = [t if isinstance(t, str) else t["text"] for t in d["turns"]]
      for i in range(1, len(turns)):
        history = turns[:i] if context_turns <= 0 else turns[max(0, i - context_turns) : i]
        parts = ([d["context"]] if d.get("context") else []) + history
        yield TextPair(sep.join(parts), turns[i])

  return load


def _tsv_loader(config):
  files = _files(config)

  def load(split):
    with open(files[split], encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        line = line.rstrip("\n")
        if not line:
          continue
        cols = line.split("\t")
        if len(cols) < 2:
          raise ValueError(
            f"{files[split]}:{lineno}: expected 'source<TAB>target[<TAB>more refs]', "
            f"found {len(cols)} column(s)."
          )
        yield TextPair(cols[0], cols[1], tuple(cols[1:]) if len(cols) > 2 else ())

  return load


def _jsonl_loader(config):
  files = _files(config)
  src_key = _get(config, "source_key") or "source"
  tgt_key = _get(config, "target_key") or "target"

  def load(split):
    with open(files[split], encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        row = json.loads(line)
        if src_key not in row or tgt_key not in row:
          raise KeyError(
            f"{files[split]}:{lineno}: expected keys {src_key!r} and {tgt_key!r}, "
            f"found {sorted(row)}."
          )
        tgt = row[tgt_key]
        refs = tuple(tgt) if isinstance(tgt, list) else ()
        yield TextPair(row[src_key], refs[0] if refs else tgt, refs)

  return load


CHITCHAT_SPLITS = ("train", "validation", "test")


def chitchat_path() -> str:
  """The `dataset.json` installed with the `chitchat-dataset` package (not imported)."""
  import importlib.util

  spec = importlib.util.find_spec("chitchat_dataset")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "Task kind 'chitchat' needs the PyPI package chitchat-dataset (pip install "
      "chitchat-dataset==0.9.0); it is not installed."
    )
  return os.path.join(spec.submodule_search_locations[0], "dataset.json")


def _chitchat_loader(config):
  sep = _get(config, "turn_separator", "\n")
  context_turns = int(_get(config, "context_turns", 1))
  fractions = {
    "validation": float(_get(config, "validation_fraction", 0.05)),
    "test": float(_get(config, "test_fraction", 0.05)),
  }
  seed = int(_get(config, "seed", 0))
  path = _get(config, "path") or chitchat_path()
  cache = {}

  def split_ids():
    if not cache:
      data = _read_json(path)
      ids = sorted(data)
      order = np.random.default_rng(seed).permutation(len(ids))
      n_test = int(round(fractions["test"] * len(ids)))
      n_val = int(round(fractions["validation"] * len(ids)))
      cache["data"] = data
      cache["test"] = [ids[i] for i in order[:n_test]]
      cache["validation"] = [ids[i] for i in order[n_test : n_test + n_val]]
      cache["train"] = [ids[i] for i in order[n_test + n_val :]]
    return cache

  def load(split):
    c = split_ids()
    for cid in c[split]:
      # A turn is one sender's run of consecutive messages.
      turns = [" ".join(m["text"].strip() for m in turn) for turn in c["data"][cid]["messages"]]
      turns = [t for t in turns if t]
      for i in range(1, len(turns)):
        start = 0 if context_turns <= 0 else max(0, i - context_turns)
        yield TextPair(sep.join(turns[start:i]), turns[i])

  return load


_LOADERS = {
  "tfds": _tfds_loader,
  "dart": _dart_loader,
  "commonsense_dialogue": _commonsense_dialogue_loader,
  "tsv": _tsv_loader,
  "jsonl": _jsonl_loader,
  "chitchat": _chitchat_loader,
}
KINDS = ("synthetic", *_LOADERS)


def _splits(config, kind) -> tuple[str, ...]:
  if kind in ("dart", "commonsense_dialogue", "tsv", "jsonl"):
    # ConfigDict sorts keys; list the usual splits in their usual order.
    names = list(_files(config))
    usual = [s for s in ("train", "validation", "test") if s in names]
    return tuple(usual + sorted(s for s in names if s not in usual))
  if kind == "chitchat":
    return CHITCHAT_SPLITS
  return tuple(_get(config, "splits", ("train", "validation", "test")))


def _tokenizer(config, task: Task) -> Tokenizer:
  spec = _get(config, "tokenizer")
  if not spec or not _get(spec, "kind"):
    raise ValueError(
      f"Task {task.name!r} (kind={_get(config, 'kind')!r}) needs task.tokenizer: a spec for "
      "tokenizers.load_tokenizer (kind sentencepiece/hf/gguf + path) or {kind: 'word'}."
    )
  if _get(spec, "kind") == "word":
    split = _get(spec, "split", "train")
    texts = []
    for p in task.pairs(split):
      texts += [p.source, p.target]
    return synthetic.WordTokenizer.from_texts(
      texts, min_count=int(_get(spec, "min_count", 1)), max_words=_get(spec, "max_words")
    )
  return load_tokenizer(spec)


def check_config(config) -> None:
  """Raises what `get_task(config)` would about the config itself, reading no data.

  The kind, the split files and the tokenizer's kind and path: a run checks
  them before it loads or trains any model.
  """
  kind = _get(config, "kind")
  if kind not in KINDS:
    raise ValueError(f"Task {_get(config, 'name', kind)!r}: kind={kind!r} is not one of {KINDS}.")
  if kind in ("dart", "commonsense_dialogue", "tsv", "jsonl"):
    _files(config)
  spec = _get(config, "tokenizer")
  if kind == "synthetic" or _get(spec or {}, "kind") == "word":
    return
  if not spec or not _get(spec, "kind"):
    raise ValueError(
      f"Task {_get(config, 'name', kind)!r} (kind={kind!r}) needs task.tokenizer.kind and "
      "task.tokenizer.path (sentencepiece/hf/gguf), or task.tokenizer.kind='word'."
    )
  path = _get(spec, "path")
  if not path or not os.path.exists(path):
    raise FileNotFoundError(
      f"config.task.tokenizer.path: expected the {_get(spec, 'kind')} tokenizer's file; "
      f"found {'nothing at ' + repr(path) if path else 'no path'}."
    )


def get_task(config) -> Task:
  """The task described by `config` (the `task` ConfigDict: `name`, `kind`, ...)."""
  kind = _get(config, "kind")
  name = _get(config, "name", kind)
  common = dict(
    source_prefix=_get(config, "source_prefix", ""),
    source_template=_get(config, "source_template", "{source}"),
    max_examples=_get(config, "max_examples"),
    input_eos=_get(config, "input_eos", True),
    system_prompt=_get(config, "system_prompt", ""),
    system_template=_get(config, "system_template", ""),
  )
  if kind == "synthetic":
    return SyntheticTask(
      name, synthetic.SyntheticSpec.from_config(config), _get(config, "data_dir"), **common
    )
  if kind not in _LOADERS:
    raise ValueError(f"Task {name!r}: kind={kind!r} is not one of {KINDS}.")
  task = Task(name, _splits(config, kind), _LOADERS[kind](config), **common)
  task.tokenizer = _tokenizer(config, task)
  return task

"""Ready task configs (`config.task` sections) for `fdistill_jax.data.tasks.get_task`.

  from configs import tasks
  config.task = tasks.task_config("synthetic", num_templates=6)
  config.task = tasks.task_config("dart", files={"train": ".../train.json", ...},
                                  tokenizer={"kind": "hf", "path": ".../tokenizer.json"})

or, as a whole config file, `--config=configs/tasks.py:xsum` (only the task).
Real tasks need a tokenizer spec (see `fdistill_jax.data.tokenizers.load_tokenizer`);
`{"kind": "word"}` builds a whitespace vocabulary from the training split.
"""

import ml_collections
from ml_collections import config_dict

# Each preset's values; every other field keeps its `_fields()` default.
_PRESETS = {
  # Built-in, offline, known p*(y|x): the default demo task.
  "synthetic": dict(kind="synthetic"),
  # tfds catalogue datasets: prepared beforehand (`tfds build xsum --data_dir=DIR`).
  "xsum": dict(kind="tfds", tfds_name="xsum"),
  "wmt16_en_ro": dict(
    kind="tfds",
    tfds_name="wmt16_translate/ro-en",
    source_key="en",
    target_key="ro",
    source_prefix="translate English to Romanian: ",  # T5's task prefix
  ),
  # Local files of the original releases.
  "dart": dict(kind="dart"),
  "commonsense_dialogue": dict(kind="commonsense_dialogue", context_turns=0, turn_separator=" "),
  # Real dialogue shipped in PyPI chitchat-dataset (installed with requirements.txt).
  "chitchat": dict(kind="chitchat", validation_fraction=0.05, test_fraction=0.05),
  # The same as a ChatML prompt for chat-tuned decoder-only teachers (SmolLM2):
  # the prompt ends in the assistant marker, so no EOS after it; the
  # response ends in the tokenizer's EOS (<|im_end|> for SmolLM2).
  "chitchat_chatml": dict(
    kind="chitchat",
    validation_fraction=0.05,
    test_fraction=0.05,
    source_template="<|im_start|>user\n{source}<|im_end|>\n<|im_start|>assistant\n",
    # ChatML's system turn, used when system_prompt is set (e.g. to make the
    # teacher chat rather than assist).
    system_template="<|im_start|>system\n{system}<|im_end|>\n",
    input_eos=False,
  ),
  "tsv": dict(kind="tsv"),
  "jsonl": dict(kind="jsonl"),
}


def tokenizer_config(**overrides) -> ml_collections.ConfigDict:
  """`config.task.tokenizer`: every field of every tokenizer kind, so any kind can be set later."""
  t = ml_collections.ConfigDict()
  # "sentencepiece", "hf", "gguf" (tokenizers.load_tokenizer), "word" (a whitespace
  # vocabulary of one split: tests, demos); "": none (the synthetic task has its own).
  t.kind = ""
  t.path = ""  # the tokenizer's file (hf: a file or a folder with tokenizer.json)
  t.eos_id = config_dict.placeholder(int)  # None: the file's
  t.pad_id = config_dict.placeholder(int)  # None: the file's
  t.bos_id = config_dict.placeholder(int)  # None: the file's
  t.vocab_size = config_dict.placeholder(int)  # None: the file's
  t.extra_ids = config_dict.placeholder(int)  # sentencepiece: T5's sentinel ids (100)
  t.split = "train"  # word: the split the vocabulary is built from
  t.min_count = 1  # word: rarer words are out of vocabulary
  t.max_words = config_dict.placeholder(int)  # word: vocabulary cap (None: none)
  t.update(overrides or {})
  return t


def _fields() -> dict:
  """Every task kind's fields with their defaults: a preset changes values, never the shape.

  One shape lets the command line switch kinds (`--config.task.kind=jsonl
  --config.task.files.train=...`) whatever preset the experiment started from.
  """
  return dict(
    name="synthetic",  # shown in messages and manifests (task_config: the preset's name)
    kind="synthetic",  # fdistill_jax.data.tasks.KINDS
    max_examples=config_dict.placeholder(object),  # a cap for every split, or {split: cap}
    source_prefix="",  # prepended to every source (e.g. T5's task prefix)
    source_template="{source}",  # the model-facing prompt around the source
    system_prompt="",  # the system turn opening every prompt ("": none)
    system_template="",  # where system_prompt goes, a format string with {system}
    input_eos=True,  # sources end in EOS (False for prompts that end in a chat template)
    tokenizer=None,  # filled by tokenizer_config()
    # Local files (dart, commonsense_dialogue, tsv, jsonl): split -> path, "" for none.
    files=dict(train="", validation="", test=""),
    source_key="",  # jsonl, tfds: the source's field ("": "source"; tfds: the dataset's)
    target_key="",  # jsonl, tfds: the target's field ("": "target"; jsonl lists: references)
    tfds_name="",  # tfds: the catalogue name, e.g. "xsum"
    data_dir=config_dict.placeholder(str),  # tfds, synthetic: None for the default folder
    context_turns=1,  # dialogue kinds: previous turns in the source (0: all)
    turn_separator="\n",  # dialogue kinds: between context turns
    path="",  # chitchat: the dataset.json ("": the installed chitchat-dataset's)
    validation_fraction=0.1,  # synthetic, chitchat: share of the data held out
    test_fraction=0.1,  # synthetic, chitchat: share of the data held out
    seed=0,  # synthetic, chitchat: data generation / split seed
    num_names=16,  # synthetic: slot vocabulary sizes
    num_foods=8,  # synthetic
    num_areas=4,  # synthetic
    num_prices=3,  # synthetic
    num_templates=5,  # synthetic: output templates, the modes of p*(y|x) (1-64; 9+ generated)
    template_probs=config_dict.placeholder(tuple),  # synthetic; None: template_decay ** k
    template_decay=0.55,  # synthetic
    train_samples_per_record=2,  # synthetic
  )


def task_config(name: str = "synthetic", **overrides) -> ml_collections.ConfigDict:
  """The preset `name` with `overrides` applied (unknown preset names raise ValueError).

  Every preset has every kind's fields (`_fields`), so overrides and the
  command line can turn one kind into another; fields of other kinds are
  ignored by `get_task`.
  """
  if name not in _PRESETS:
    raise ValueError(f"Task preset {name!r} is not one of {sorted(_PRESETS)}.")
  values = {**_PRESETS[name], "name": name, **overrides}
  defaults = _fields()
  unknown = sorted(set(values) - set(defaults))
  if unknown:
    raise ValueError(
      f"task_config({name!r}): unknown fields {unknown}; expected {sorted(defaults)}"
    )
  files = _plain(values.pop("files", None))
  tokenizer = _plain(values.pop("tokenizer", None))
  cfg = ml_collections.ConfigDict(defaults)  # typed fields (placeholders) first
  cfg.files = ml_collections.ConfigDict({**defaults["files"], **files})
  cfg.tokenizer = tokenizer_config(**tokenizer)
  for key, value in values.items():
    cfg[key] = value
  return cfg


def _plain(section) -> dict:
  """A ConfigDict, dict or None as a dict."""
  return section.to_dict() if hasattr(section, "to_dict") else dict(section or {})


def get_config(arg: str | None = None):
  config = ml_collections.ConfigDict()
  config.task = task_config(arg or "synthetic")
  return config

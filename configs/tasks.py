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

_PRESETS = {
  # Built-in, offline, known p*(y|x): the default demo task.
  "synthetic": dict(
    kind="synthetic",
    data_dir=None,  # None: ~/.cache/fdistill_jax/tfds
    num_names=16,
    num_foods=8,
    num_areas=4,
    num_prices=3,
    num_templates=5,
    template_probs=None,  # None: geometric decay `template_decay ** k`
    template_decay=0.55,
    validation_fraction=0.1,
    test_fraction=0.1,
    train_samples_per_record=2,
    seed=0,
  ),
  # tfds catalogue datasets: prepared beforehand (`tfds build xsum --data_dir=DIR`).
  "xsum": dict(kind="tfds", tfds_name="xsum", data_dir=None, tokenizer=None),
  "wmt16_en_ro": dict(
    kind="tfds",
    tfds_name="wmt16_translate/ro-en",
    source_key="en",
    target_key="ro",
    source_prefix="translate English to Romanian: ",  # T5's task prefix
    data_dir=None,
    tokenizer=None,
  ),
  # Local files of the original releases.
  "dart": dict(kind="dart", files=None, tokenizer=None),
  "commonsense_dialogue": dict(
    kind="commonsense_dialogue", files=None, context_turns=0, turn_separator=" ", tokenizer=None
  ),
  # Real dialogue shipped in PyPI chitchat-dataset (installed with requirements.txt).
  "chitchat": dict(
    kind="chitchat",
    context_turns=1,
    turn_separator="\n",
    validation_fraction=0.05,
    test_fraction=0.05,
    seed=0,
    tokenizer=None,
  ),
  # The same as a ChatML prompt for chat-tuned decoder-only teachers (SmolLM2):
  # the prompt ends in the assistant marker, so no EOS after it; the
  # response ends in the tokenizer's EOS (<|im_end|> for SmolLM2).
  "chitchat_chatml": dict(
    kind="chitchat",
    context_turns=1,
    turn_separator="\n",
    validation_fraction=0.05,
    test_fraction=0.05,
    seed=0,
    source_template="<|im_start|>user\n{source}<|im_end|>\n<|im_start|>assistant\n",
    # ChatML's system turn, used when system_prompt is set (e.g. to make the
    # teacher chat rather than assist).
    system_template="<|im_start|>system\n{system}<|im_end|>\n",
    input_eos=False,
    tokenizer=None,
  ),
  "tsv": dict(kind="tsv", files=None, tokenizer=None),
  "jsonl": dict(kind="jsonl", files=None, source_key="source", target_key="target", tokenizer=None),
}


def task_config(name: str = "synthetic", **overrides) -> ml_collections.ConfigDict:
  """The preset `name` with `overrides` applied (unknown preset names raise ValueError)."""
  if name not in _PRESETS:
    raise ValueError(f"Task preset {name!r} is not one of {sorted(_PRESETS)}.")
  # Defaults first, so that a preset's own values (wmt16's T5 prefix) win.
  values = dict(
    name=name,
    max_examples=None,
    source_prefix="",
    source_template="{source}",
    system_prompt="",
    system_template="",
  )
  values.update(_PRESETS[name])
  values.update(overrides)
  # Fields that may be set later but start as None need a declared type.
  cfg = ml_collections.ConfigDict()
  for k, v in values.items():
    if v is None:
      cfg[k] = ml_collections.config_dict.placeholder(object)
    else:
      cfg[k] = v
  return cfg


def get_config(arg: str | None = None):
  config = ml_collections.ConfigDict()
  config.task = task_config(arg or "synthetic")
  return config

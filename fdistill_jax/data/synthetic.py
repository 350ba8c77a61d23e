"""The built-in synthetic data-to-text task, whose true output distribution is known.

Records are small attribute-value tables (name / food / area / price, as in
E2E). Each record is rendered into a sentence by one of several templates
drawn with known, unequal probabilities (the last ones rare), so the true
conditional distribution p*(y|x) is an explicit mixture of a few modes:
`SyntheticSpec.modes(source_text)` lists every valid output with its
probability. That is what lets evaluation measure precision, mode coverage
and sequence-level KL/RKL exactly, and what makes the mode-averaging (KL)
versus mode-collapsing (RKL) behaviour of distillation visible.

The data is built locally as a tfds dataset (`SyntheticDataToText`, a
`GeneratorBasedBuilder` that downloads nothing) under a config-specific
folder, so changing the size or the templates never reuses stale data.

Splits are disjoint by record: the product of the value lists is shuffled
with the seed and cut into train / validation / test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os

import numpy as np

from fdistill_jax.data.tokenizers import Tokenizer

ATTRIBUTES = ("name", "food", "area", "price")

# Value pools; a config takes the first `num_<attribute>s` of each. Every value
# is one lowercase word that appears in no template, so a rendered sentence can
# never be read as a different record.
_VALUES = {
  "name": (
    "aromi bibimbap cotto zizzi alimentum browns clowns cocum fitzbillies giraffe loch "
    "midsummer strada wildwood wrestlers eagle mill phoenix plough punter waterman olive "
    "vaults saffron marigold juniper bramble hazel willow rowan thistle clover poppy "
    "heron kestrel lark magpie otter badger falcon"
  ).split(),
  "food": (
    "italian french chinese indian japanese english mexican thai greek spanish turkish korean"
  ).split(),
  "area": "riverside centre harbour market station park campus suburbs".split(),
  "price": "cheap moderate expensive affordable pricey".split(),
}

# Template pool; a config uses the first `num_templates`. Tokens are separated
# by single spaces so that the word tokenizer round-trips them exactly.
TEMPLATES = (
  "{name} serves {food} food in the {area} area at {price} prices .",
  "{name} is a {price} {food} restaurant in the {area} .",
  "in the {area} , {name} offers {price} {food} food .",
  "there is a {food} place called {name} in the {area} with {price} prices .",
  "{name} , located in the {area} , is a {food} restaurant with {price} prices .",
  "for {price} {food} food in the {area} , try {name} .",
  "if you want {food} food , {name} in the {area} is {price} .",
  "{name} has {food} dishes and {price} prices near the {area} .",
)

# Beyond the handwritten templates, `num_templates` up to MAX_TEMPLATES takes
# generated ones: the four slots in some order, each wrapped in one of these
# phrases, joined by one of the joiners, ending in " .". They reuse the
# handwritten templates' words only, so every config keeps one vocabulary;
# a fixed seed makes them the same on every machine. More templates means
# more modes for a model to learn: a capacity knob of the task.
_PHRASES = {
  "name": ("{name}", "try {name}", "a place called {name}", "{name} is a restaurant"),
  "food": ("{food} food", "{food} dishes", "serves {food} food", "has {food} dishes"),
  "area": ("in the {area}", "in the {area} area", "near the {area}", "located in the {area}"),
  "price": ("at {price} prices", "with {price} prices", "{price} prices", "is {price}"),
}
_JOINERS = (" ", " , ", " and ")
MAX_TEMPLATES = 64


def _generated_templates(count: int) -> tuple[str, ...]:
  """`count` distinct templates, none equal to a handwritten one, in a fixed order."""
  rng = np.random.default_rng(20230709)
  out, seen = [], set(TEMPLATES)
  while len(out) < count:
    attrs = [ATTRIBUTES[i] for i in rng.permutation(len(ATTRIBUTES))]
    phrases = [_PHRASES[a][rng.integers(len(_PHRASES[a]))] for a in attrs]
    text = phrases[0]
    for phrase in phrases[1:]:
      text += _JOINERS[rng.integers(len(_JOINERS))] + phrase
    text += " ."
    if text not in seen:
      seen.add(text)
      out.append(text)
  return tuple(out)


ALL_TEMPLATES = TEMPLATES + _generated_templates(MAX_TEMPLATES - len(TEMPLATES))

SPECIAL_TOKENS = ("<pad>", "</s>", "<s>", "<unk>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Size and multimodality of the synthetic task (all from the task config).

  `template_probs` empty means a geometric decay: probability of template k
  proportional to `template_decay ** k`, so later templates are rare modes.
  """

  num_names: int = 16
  num_foods: int = 8
  num_areas: int = 4
  num_prices: int = 3
  num_templates: int = 5
  template_probs: tuple[float, ...] = ()
  template_decay: float = 0.55
  validation_fraction: float = 0.1
  test_fraction: float = 0.1
  train_samples_per_record: int = 2
  seed: int = 0

  def __post_init__(self):
    for attr in ATTRIBUTES:
      n, pool = getattr(self, f"num_{attr}s"), _VALUES[attr]
      if not 1 <= n <= len(pool):
        raise ValueError(f"Synthetic task: num_{attr}s={n}; expected 1..{len(pool)}.")
    if not 1 <= self.num_templates <= MAX_TEMPLATES:
      raise ValueError(
        f"Synthetic task: num_templates={self.num_templates}; expected 1..{MAX_TEMPLATES} "
        f"(the first {len(TEMPLATES)} handwritten, the rest generated)."
      )
    if self.template_probs:
      p = np.asarray(self.template_probs, np.float64)
      if len(p) != self.num_templates or np.any(p <= 0) or abs(p.sum() - 1) > 1e-6:
        raise ValueError(
          f"Synthetic task: template_probs={self.template_probs}; expected "
          f"{self.num_templates} positive probabilities summing to 1."
        )
    if not (0 < self.validation_fraction and 0 < self.test_fraction) or (
      self.validation_fraction + self.test_fraction >= 1
    ):
      raise ValueError(
        "Synthetic task: validation_fraction and test_fraction must be positive with sum < 1; "
        f"found {self.validation_fraction} and {self.test_fraction}."
      )

  @classmethod
  def from_config(cls, config) -> SyntheticSpec:
    """A spec from a task ConfigDict/dict; keys other than the fields are ignored."""
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    kwargs = {}
    for f in dataclasses.fields(cls):
      v = get(f.name, None)
      if v is not None:
        kwargs[f.name] = tuple(float(x) for x in v) if f.name == "template_probs" else v
    return cls(**kwargs)

  @property
  def probs(self) -> np.ndarray:
    """`[num_templates]` float64 template probabilities (sum to 1)."""
    if self.template_probs:
      p = np.asarray(self.template_probs, np.float64)
    else:
      p = self.template_decay ** np.arange(self.num_templates, dtype=np.float64)
    return p / p.sum()

  def values(self, attr: str) -> list[str]:
    return list(_VALUES[attr][: getattr(self, f"num_{attr}s")])

  def config_name(self) -> str:
    """A tfds config name that changes whenever the generated data would."""
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
    return "d2t_" + hashlib.sha256(blob).hexdigest()[:12]

  # -- Records and their rendering ------------------------------------------

  def split_records(self) -> dict[str, list[dict[str, str]]]:
    """Every record, shuffled by the seed and cut into disjoint splits."""
    records = [
      dict(zip(ATTRIBUTES, vals, strict=True))
      for vals in itertools.product(*(self.values(a) for a in ATTRIBUTES))
    ]
    order = np.random.default_rng(self.seed).permutation(len(records))
    n_val = max(1, int(round(self.validation_fraction * len(records))))
    n_test = max(1, int(round(self.test_fraction * len(records))))
    shuffled = [records[i] for i in order]
    return {
      "test": shuffled[:n_test],
      "validation": shuffled[n_test : n_test + n_val],
      "train": shuffled[n_test + n_val :],
    }

  def generate(self, split: str):
    """Yields `(key, {"record_id", "source", "target", "template_id"})` in a fixed order.

    Train has `train_samples_per_record` targets per record, each template
    drawn from the true probabilities; validation/test have one reference
    each, drawn the same way.
    """
    if split not in SPLITS:
      raise ValueError(f"Synthetic task: split {split!r} is not one of {SPLITS}.")
    records = self.split_records()[split]
    reps = self.train_samples_per_record if split == "train" else 1
    # Split-specific stream so each split is reproducible on its own.
    rng = np.random.default_rng([self.seed, SPLITS.index(split)])
    probs = self.probs
    key = 0
    for rid, record in enumerate(records):
      for k in rng.choice(len(probs), size=reps, p=probs):
        yield (
          key,
          {
            "record_id": rid,
            "source": linearize(record),
            "target": render(record, int(k)),
            "template_id": int(k),
          },
        )
        key += 1

  def modes(self, source_text: str) -> dict[str, float]:
    """Every valid output for `source_text` -> its true probability p*(y|x)."""
    record = parse_source(source_text)
    return {render(record, k): float(p) for k, p in enumerate(self.probs)}

  def vocabulary(self) -> list[str]:
    return vocabulary()


def linearize(record: dict[str, str]) -> str:
  """`name : aromi | food : thai | ...` (the source sentence of a record)."""
  return " | ".join(f"{a} : {record[a]}" for a in ATTRIBUTES)


def parse_source(source_text: str) -> dict[str, str]:
  """Inverse of `linearize`."""
  record = {}
  for part in source_text.split("|"):
    attr, sep, value = part.partition(":")
    if not sep:
      raise ValueError(f"Synthetic source {source_text!r}: expected 'attr : value | ...'.")
    record[attr.strip()] = value.strip()
  missing = [a for a in ATTRIBUTES if a not in record]
  if missing:
    raise ValueError(f"Synthetic source {source_text!r}: missing attributes {missing}.")
  return record


def render(record: dict[str, str], template_id: int) -> str:
  """The output of template `template_id` (of ALL_TEMPLATES) for `record`."""
  return ALL_TEMPLATES[template_id].format(**record)


def vocabulary() -> list[str]:
  """All words of every value pool and template, sorted (specials excluded).

  Built from the full pools, not the configured subset, so every synthetic
  config shares one vocabulary (and one tokenizer fingerprint).
  """
  words = set(ATTRIBUTES) | {":", "|"}
  for pool in _VALUES.values():
    words.update(pool)
  for t in TEMPLATES:
    words.update(w for w in t.split() if not w.startswith("{"))
  return sorted(words)


class WordTokenizer(Tokenizer):
  """Whitespace word tokenizer over a fixed word list.

  Ids: `<pad>`=0, `</s>`=1, `<s>`=2, `<unk>`=3, then the words in the given
  order. Unknown words encode to `<unk>`; decoding joins words with spaces.
  """

  def __init__(self, words):
    words = [w for w in words if w not in SPECIAL_TOKENS]
    if len(set(words)) != len(words):
      raise ValueError("WordTokenizer: the word list has duplicates.")
    self._itos = list(SPECIAL_TOKENS) + list(words)
    self._stoi = {w: i for i, w in enumerate(self._itos)}

  @property
  def vocab_size(self) -> int:
    return len(self._itos)

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def bos_id(self) -> int:
    return BOS_ID

  @property
  def words(self) -> list[str]:
    return list(self._itos)

  def encode(self, text: str) -> list[int]:
    return [self._stoi.get(w, UNK_ID) for w in text.split()]

  def decode(self, ids) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i in (PAD_ID, BOS_ID):
        continue
      out.append(self._itos[i] if 0 <= i < len(self._itos) else "<unk>")
    return " ".join(out)

  def _decode_all(self, ids: list[int]) -> str:
    return " ".join(self._itos[i] if 0 <= i < len(self._itos) else "<unk>" for i in ids)

  def _fingerprint_bytes(self) -> bytes:
    return "\n".join(self._itos).encode()

  @classmethod
  def from_texts(cls, texts, *, min_count: int = 1, max_words: int | None = None):
    """A tokenizer over the words of `texts`, most frequent first (ties alphabetical)."""
    counts: dict[str, int] = {}
    for t in texts:
      for w in t.split():
        counts[w] = counts.get(w, 0) + 1
    ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return cls(ranked[:max_words] if max_words else ranked)


def synthetic_tokenizer() -> WordTokenizer:
  return WordTokenizer(vocabulary())


# ------------------------------------------------------------------------------
# tfds builder.
# ------------------------------------------------------------------------------


def _builder_class():
  """Defines the builder lazily so importing this module does not import tfds."""
  global _BUILDER
  if _BUILDER is not None:
    return _BUILDER
  import tensorflow_datasets as tfds

  class SyntheticDataToText(tfds.core.GeneratorBasedBuilder):
    """Synthetic attribute-value records -> template sentences (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def __init__(self, *, spec: SyntheticSpec, **kwargs):
      self._spec = spec
      config = tfds.core.BuilderConfig(
        name=spec.config_name(), description=json.dumps(dataclasses.asdict(spec))
      )
      super().__init__(config=config, **kwargs)

    def _info(self):
      return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
          {
            "record_id": np.int64,
            "source": tfds.features.Text(),
            "target": tfds.features.Text(),
            "template_id": np.int32,
          }
        ),
        supervised_keys=("source", "target"),
        # Keep generation order on disk: examples() promises a fixed order.
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download.
      return {s: self._generate_examples(s) for s in SPLITS}

    def _generate_examples(self, split):
      yield from self._spec.generate(split)

  _BUILDER = SyntheticDataToText
  return _BUILDER


_BUILDER = None


def default_data_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "fdistill_jax", "tfds")


def build(spec: SyntheticSpec, data_dir: str | None = None):
  """The prepared tfds builder of `spec` under `data_dir` (prepared if needed)."""
  data_dir = data_dir or default_data_dir()
  builder = _builder_class()(spec=spec, data_dir=data_dir)
  if not builder.is_prepared():
    from tensorflow_datasets.core.utils import tqdm_utils

    # A few thousand tiny examples: progress bars would only add noise.
    shown = tqdm_utils._active
    tqdm_utils.display_progress_bar(False)
    try:
      builder.download_and_prepare()
    finally:
      tqdm_utils.display_progress_bar(shown)
  return builder


def read_split(spec: SyntheticSpec, split: str, data_dir: str | None = None):
  """Yields `{"record_id", "source", "target", "template_id"}` (python types) in order."""
  import tensorflow_datasets as tfds

  builder = build(spec, data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  for ex in tfds.as_numpy(ds):
    yield {
      "record_id": int(ex["record_id"]),
      "source": ex["source"].decode(),
      "target": ex["target"].decode(),
      "template_id": int(ex["template_id"]),
    }

"""The built-in synthetic task: true distribution, splits, tfds build, tokenizer."""

import collections

import numpy as np
import pytest

from fdistill_jax.data import synthetic
from fdistill_jax.data.tokenizers import Tokenizer

SMALL = synthetic.SyntheticSpec(
  num_names=6, num_foods=4, num_areas=3, num_prices=2, num_templates=4, seed=3
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_probabilities_sum_to_one_and_are_unequal():
  for spec in (SMALL, synthetic.SyntheticSpec(), synthetic.SyntheticSpec(num_templates=8)):
    p = spec.probs
    np.testing.assert_allclose(p.sum(), 1.0, atol=1e-12)
    assert np.all(np.diff(p) < 0), "later templates must be rarer"
  spec = synthetic.SyntheticSpec(num_templates=3, template_probs=(0.7, 0.2, 0.1))
  np.testing.assert_allclose(spec.probs, [0.7, 0.2, 0.1])


def test_modes_are_distinct_valid_and_sum_to_one():
  rec = {"name": "aromi", "food": "thai", "area": "park", "price": "cheap"}
  modes = SMALL.modes(synthetic.linearize(rec))
  assert len(modes) == SMALL.num_templates  # distinct renderings, one per template
  np.testing.assert_allclose(sum(modes.values()), 1.0, atol=1e-12)
  for text in modes:
    for v in rec.values():
      assert v in text.split()
  assert synthetic.parse_source(synthetic.linearize(rec)) == rec


def test_bad_config_errors_say_what_was_expected():
  with pytest.raises(ValueError, match="num_names=99; expected 1..40"):
    synthetic.SyntheticSpec(num_names=99)
  with pytest.raises(ValueError, match="summing to 1"):
    synthetic.SyntheticSpec(num_templates=2, template_probs=(0.5, 0.6))


def test_splits_disjoint_by_record_and_cover_all():
  splits = SMALL.split_records()
  keys = {s: {synthetic.linearize(r) for r in recs} for s, recs in splits.items()}
  assert not keys["train"] & keys["validation"]
  assert not keys["train"] & keys["test"]
  assert not keys["validation"] & keys["test"]
  assert sum(len(k) for k in keys.values()) == 6 * 4 * 3 * 2


def test_determinism_by_seed():
  a = list(SMALL.generate("train"))
  b = list(SMALL.generate("train"))
  assert a == b
  other = synthetic.SyntheticSpec(**{**SMALL.__dict__, "seed": 4})
  assert [e for _, e in other.generate("train")] != [e for _, e in a]
  assert SMALL.config_name() != other.config_name()


def test_template_frequencies_follow_probs():
  spec = synthetic.SyntheticSpec(train_samples_per_record=20, num_templates=4)
  counts = collections.Counter(e["template_id"] for _, e in spec.generate("train"))
  n = sum(counts.values())
  freq = np.array([counts[k] / n for k in range(4)])
  # n ~ 24k samples: 5 standard errors of a proportion are < 0.02.
  np.testing.assert_allclose(freq, spec.probs, atol=0.02)


def test_default_size_fits_the_brief():
  spec = synthetic.SyntheticSpec()
  tok = synthetic.synthetic_tokenizer()
  assert tok.vocab_size < 200
  for _, e in spec.generate("train"):
    assert len(tok.encode(e["source"])) + 1 <= 24
    assert len(tok.encode(e["target"])) + 1 <= 32
  for k in range(len(synthetic.TEMPLATES)):
    rec = dict.fromkeys(synthetic.ATTRIBUTES, "x")
    assert len(synthetic.render(rec, k).split()) + 1 <= 32


def test_tokenizer_round_trip_and_specials():
  tok = synthetic.synthetic_tokenizer()
  assert isinstance(tok, Tokenizer)
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  for _, e in SMALL.generate("validation"):
    for text in (e["source"], e["target"]):
      ids = tok.encode(text)
      assert synthetic.UNK_ID not in ids
      assert tok.decode(ids) == text
      assert tok.decode(ids + [tok.eos_id, 7, 8]) == text  # stops at EOS
      assert tok.decode([tok.pad_id] + ids) == text
  assert tok.fingerprint() == synthetic.synthetic_tokenizer().fingerprint()
  assert tok.encode("zzz_not_a_word") == [synthetic.UNK_ID]


def test_tfds_build_matches_generator(data_dir):
  for split in synthetic.SPLITS:
    got = list(synthetic.read_split(SMALL, split, data_dir))
    want = [e for _, e in SMALL.generate(split)]
    assert got == want, split
  # Second build reuses the prepared data (no regeneration needed).
  builder = synthetic.build(SMALL, data_dir)
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == len(list(SMALL.generate("train")))

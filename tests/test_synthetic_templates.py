"""The synthetic task's generated templates (num_templates above the handwritten ones)."""

import re

import numpy as np
import pytest

from fdistill_jax.data import synthetic

SLOT = re.compile(r"\{(\w+)\}")


def test_generated_templates_are_distinct_and_extend_the_handwritten_ones():
  templates = synthetic.ALL_TEMPLATES
  assert len(templates) == synthetic.MAX_TEMPLATES
  assert templates[: len(synthetic.TEMPLATES)] == synthetic.TEMPLATES
  assert len(set(templates)) == len(templates)
  # Asking for fewer generated templates gives the first ones of the same list,
  # so raising num_templates only adds modes.
  n = len(synthetic.TEMPLATES)
  assert synthetic._generated_templates(5) == templates[n : n + 5]


def test_every_template_has_each_slot_once_and_known_words_only():
  handwritten_words = {w for t in synthetic.TEMPLATES for w in t.split() if not SLOT.search(w)}
  for template in synthetic.ALL_TEMPLATES:
    assert sorted(SLOT.findall(template)) == sorted(synthetic.ATTRIBUTES), template
    words = {w for w in template.split() if not SLOT.search(w)}
    assert words <= handwritten_words, (template, words - handwritten_words)
    assert template.endswith(" .") and "  " not in template, template


def test_many_template_modes_are_distinct_fit_the_lengths_and_parse_back():
  spec = synthetic.SyntheticSpec(num_templates=32, template_decay=0.9)
  tok = synthetic.synthetic_tokenizer()
  _, example = next(spec.generate("test"))
  modes = spec.modes(example["source"])
  assert len(modes) == 32  # distinct outputs: one per template
  np.testing.assert_allclose(sum(modes.values()), 1.0, rtol=1e-12)
  np.testing.assert_allclose(sorted(modes.values(), reverse=True), spec.probs, rtol=1e-12)
  record = synthetic.parse_source(example["source"])
  for text in modes:
    ids = tok.encode(text)
    assert synthetic.UNK_ID not in ids, text
    assert len(ids) + 1 <= 24, text  # the main job's max_target_len, EOS included
    # Values occur in no template, so the output names exactly the record's values.
    values = {w for w in text.split() for a in synthetic.ATTRIBUTES if w in spec.values(a)}
    assert values == set(record.values()), text


def test_too_many_templates_is_refused_with_the_range():
  with pytest.raises(ValueError, match=r"num_templates=65; expected 1\.\.64"):
    synthetic.SyntheticSpec(num_templates=65)

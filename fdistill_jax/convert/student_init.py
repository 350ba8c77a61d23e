"""A student initialised from chosen teacher layers ("shrink and fine-tune").

The original f-DISTILL code built its students this way: DistilBART-style
students copied BART's encoder layers [0, 6, 11] and decoder layer [0], and
the dialogue student copied DialoGPT's layers [0, 8, 16, 23]. Everything
outside the layer stacks (embeddings, position tables, final norms, T5's
relative-position tables, the output head) is copied as it is, so the
student must have the teacher's width, heads and vocabulary; only the
number of layers changes.

  student = copy_layers(teacher, student_config, encoder_layers=[0, 6, 11], decoder_layers=[0])
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from fdistill_jax.convert.params import ConversionError, assemble, model_params, param_shapes
from fdistill_jax.models import ModelConfig

_LAYER = re.compile(r"(?:(encoder|decoder)\.)?layers\.(\d+)\.(.+)")


def spread_layers(teacher_layers: int, student_layers: int) -> list[int]:
  """Evenly spaced teacher layers, first and last included (12 -> 3: [0, 6, 11])."""
  if not 0 < student_layers <= teacher_layers:
    raise ValueError(
      f"spread_layers: cannot pick {student_layers} of {teacher_layers} teacher layers."
    )
  if student_layers == 1:
    return [0]
  picks = np.linspace(0, teacher_layers - 1, student_layers)
  return [int(x) for x in np.floor(picks + 0.5)]


def _check_choice(name, chosen, teacher_n, student_n):
  if len(chosen) != student_n:
    raise ConversionError(
      f"copy_layers: {name}={list(chosen)} picks {len(chosen)} layers, but the student "
      f"config has {student_n}."
    )
  bad = [i for i in chosen if not 0 <= i < teacher_n]
  if bad:
    raise ConversionError(
      f"copy_layers: {name} {bad} out of range; the teacher has {teacher_n} layers "
      f"(0..{teacher_n - 1})."
    )


def copy_layers(
  teacher_params,
  student_config,
  encoder_layers: Sequence[int] | None = None,
  decoder_layers: Sequence[int] | None = None,
  teacher_config: ModelConfig | None = None,
):
  """A student model whose layer j is the teacher's layer `decoder_layers[j]`.

  teacher_params: the teacher model (an `nnx.Module` from `build_model`,
    `load_hf` or `load_gguf`) or its flat `{dotted path: array}`.
  student_config: the student's `ModelConfig` (or ConfigDict); same family,
    width and vocabulary as the teacher, `num_layers == len(decoder_layers)`
    and, for encoder-decoders, `num_encoder_layers == len(encoder_layers)`.
  encoder_layers / decoder_layers: teacher layer indices (decoder-only models
    use `decoder_layers` for their one stack). None spreads the student's
    layers evenly over the teacher's (`spread_layers`).
  teacher_config: needed only when `teacher_params` is a flat dict (for the
    layer counts); taken from the model otherwise.
  """
  student = ModelConfig.from_config(student_config)
  if isinstance(teacher_params, dict):
    flat = teacher_params
  else:
    teacher_config = teacher_config or teacher_params.config
    flat = model_params(teacher_params)
  counts = {}
  for name in flat:
    m = _LAYER.fullmatch(name)
    if m:
      stack = m.group(1) or "decoder"
      counts[stack] = max(counts.get(stack, 0), int(m.group(2)) + 1)
  if teacher_config is not None and teacher_config.family != student.family:
    raise ConversionError(
      f"copy_layers: teacher family {teacher_config.family!r} != student family {student.family!r}."
    )
  choice = {}
  if student.is_encoder_decoder:
    if encoder_layers is None:
      encoder_layers = spread_layers(counts.get("encoder", 0), student.encoder_layers)
    _check_choice(
      "encoder_layers", encoder_layers, counts.get("encoder", 0), student.encoder_layers
    )
    choice["encoder"] = list(encoder_layers)
  elif encoder_layers:
    raise ConversionError(
      f"copy_layers: encoder_layers={list(encoder_layers)} given for a decoder-only "
      f"{student.family} model; use decoder_layers."
    )
  if decoder_layers is None:
    decoder_layers = spread_layers(counts.get("decoder", 0), student.num_layers)
  _check_choice("decoder_layers", decoder_layers, counts.get("decoder", 0), student.num_layers)
  choice["decoder"] = list(decoder_layers)

  out = {}
  for name in param_shapes(student):
    m = _LAYER.fullmatch(name)
    if m is None:
      source = name
    else:
      stack, j, rest = m.group(1), int(m.group(2)), m.group(3)
      i = choice[stack or "decoder"][j]
      source = f"{stack}.layers.{i}.{rest}" if stack else f"layers.{i}.{rest}"
    if source not in flat:
      raise ConversionError(
        f"copy_layers: the student needs {name} (from teacher {source}), which the teacher "
        "lacks; student and teacher must share family and architecture options."
      )
    out[name] = np.asarray(flat[source])
  return assemble(student, out, "the teacher (copy_layers)")


def student_from_teacher(teacher, init, **overrides):
  """(student model, its ModelConfig) from a teacher model and a config's `student.init`.

  `init` (ConfigDict or dict) holds `encoder_layers` (encoder-decoders) and
  `decoder_layers`: the teacher layers to copy. The student's config is the
  teacher's with those layer counts; `overrides` change other fields that do
  not touch parameter shapes (e.g. `dtype`).
  """
  values = init.to_dict() if hasattr(init, "to_dict") else dict(init)
  enc, dec = values.get("encoder_layers"), values.get("decoder_layers")
  if dec is None:
    raise ConversionError(f"student init {values}: decoder_layers is required.")
  changes = dict(num_layers=len(dec), **overrides)
  if teacher.config.is_encoder_decoder:
    if enc is None:
      raise ConversionError(
        f"student init {values}: encoder_layers is required for a seq2seq teacher."
      )
    changes["num_encoder_layers"] = len(enc)
  config = teacher.config.replace(**changes)
  return copy_layers(teacher, config, encoder_layers=enc, decoder_layers=dec), config

"""Flax NNX transformers with an explicit KV cache: T5/BART (enc-dec), LLaMA/GPT-2."""

from fdistill_jax.models.api import (
  Model,
  SplitModel,
  build_model,
  decode_step,
  extend,
  forward,
  init_decode_state,
  output_head,
  output_head_as_stored,
  rewind,
  score,
  start_tokens,
)
from fdistill_jax.models.config import DECODER_ONLY, ENCODER_DECODER, FAMILIES, ModelConfig
from fdistill_jax.models.decoder import DecoderOnly
from fdistill_jax.models.encdec import EncoderDecoder
from fdistill_jax.models.layers import ModelOutput
from fdistill_jax.models.presets import PRESETS, get_preset

__all__ = [
  "DECODER_ONLY",
  "ENCODER_DECODER",
  "FAMILIES",
  "PRESETS",
  "DecoderOnly",
  "EncoderDecoder",
  "Model",
  "ModelConfig",
  "ModelOutput",
  "SplitModel",
  "build_model",
  "decode_step",
  "extend",
  "forward",
  "get_preset",
  "init_decode_state",
  "output_head",
  "output_head_as_stored",
  "rewind",
  "score",
  "start_tokens",
]

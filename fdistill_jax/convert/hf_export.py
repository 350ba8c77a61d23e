"""Project models -> Hugging Face checkpoint folders (the inverse of `load_hf`).

A distilled student (or any project model) is written as `config.json` +
`model.safetensors` (+ `generation_config.json`, and with a tokenizer its
files: `tokenizer.json` or `tokenizer.model`, `tokenizer_config.json` with
the special tokens and chat template, `special_tokens_map.json`) in the
layout transformers' `from_pretrained` reads
(T5ForConditionalGeneration, BartForConditionalGeneration /
MBartForConditionalGeneration, LlamaForCausalLM, GPT2LMHeadModel). The
tensor names come from the same tables `load_hf` reads through
(`hf_layout.py`). A config the Hugging Face class cannot express (e.g. a
GPT-2 with an untied head) is refused with a `ConversionError`.

  export_hf(student, "/tmp/student-hf", tokenizer=config.task.tokenizer, dtype="bfloat16")
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import safetensors.numpy

from fdistill_jax.convert import hf_layout as layout
from fdistill_jax.convert.params import ConversionError, model_params
from fdistill_jax.convert.tokenizer_export import export_tokenizer
from fdistill_jax.models import ModelConfig

_T5_PROJ = {"relu": "relu", "gated-gelu": "gated-gelu", "swiglu": "gated-silu", "gelu": "gelu"}
_ACT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new"}


def _refuse(cfg: ModelConfig, what: str):
  raise ConversionError(
    f"export_hf: {cfg.family} model with {what} has no Hugging Face equivalent."
  )


def _need(cfg, table, kind):
  if cfg.activation not in table:
    _refuse(cfg, f"{kind} {cfg.activation!r}")
  return table[cfg.activation]


def _standard_head_dim(cfg: ModelConfig):
  if cfg.dim_per_head * cfg.num_heads != cfg.d_model:
    _refuse(cfg, f"head_dim {cfg.dim_per_head} * num_heads {cfg.num_heads} != d_model")


def hf_config_dict(cfg: ModelConfig) -> dict:
  """The config.json that makes transformers build the same model as `cfg`."""
  common = dict(vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id)
  if cfg.family == "t5":
    if cfg.encoder_config is not cfg:
      _refuse(cfg, "encoder heads or MLP width other than the decoder's")
    return dict(
      common,
      architectures=["T5ForConditionalGeneration"],
      model_type="t5",
      d_model=cfg.d_model,
      d_kv=cfg.dim_per_head,
      d_ff=cfg.d_ff,
      num_layers=cfg.encoder_layers,
      num_decoder_layers=cfg.num_layers,
      num_heads=cfg.num_heads,
      relative_attention_num_buckets=cfg.relative_attention_num_buckets,
      relative_attention_max_distance=cfg.relative_attention_max_distance,
      layer_norm_epsilon=cfg.norm_eps,
      feed_forward_proj=_need(cfg, _T5_PROJ, "feed-forward"),
      decoder_start_token_id=cfg.start_id,
      is_encoder_decoder=True,
      # False is T5 v1.1's layout: a separate, unscaled lm_head.
      tie_word_embeddings=cfg.tie_embeddings,
    )
  if cfg.family == "bart":
    _standard_head_dim(cfg)
    _standard_head_dim(cfg.encoder_config)
    if cfg.norm_eps != 1e-5:
      _refuse(cfg, f"layer_norm_eps {cfg.norm_eps} (BART's is fixed at 1e-5)")
    mbart = cfg.normalize_before
    return dict(
      common,
      architectures=["MBartForConditionalGeneration" if mbart else "BartForConditionalGeneration"],
      model_type="mbart" if mbart else "bart",
      d_model=cfg.d_model,
      encoder_layers=cfg.encoder_layers,
      decoder_layers=cfg.num_layers,
      encoder_attention_heads=cfg.encoder_config.num_heads,
      decoder_attention_heads=cfg.num_heads,
      encoder_ffn_dim=cfg.encoder_config.d_ff,
      decoder_ffn_dim=cfg.d_ff,
      max_position_embeddings=cfg.max_positions,
      activation_function=_need(cfg, _ACT, "activation"),
      scale_embedding=cfg.scale_embedding,
      decoder_start_token_id=cfg.start_id,
      forced_eos_token_id=cfg.eos_id,
      is_encoder_decoder=True,
      tie_word_embeddings=cfg.tie_embeddings,
    )
  if cfg.family == "llama":
    if cfg.activation != "swiglu":
      _refuse(cfg, f"activation {cfg.activation!r} (LLaMA uses swiglu)")
    return dict(
      common,
      architectures=["LlamaForCausalLM"],
      model_type="llama",
      hidden_size=cfg.d_model,
      intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.kv_heads,
      head_dim=cfg.dim_per_head,
      hidden_act="silu",
      rms_norm_eps=cfg.norm_eps,
      max_position_embeddings=cfg.max_positions,
      # transformers 5 reads rope_parameters; 4.x reads rope_theta.
      rope_theta=cfg.rope_theta,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      attention_bias=cfg.attention_bias,
      mlp_bias=False,
      tie_word_embeddings=cfg.tie_embeddings,
    )
  if cfg.family == "gpt2":
    _standard_head_dim(cfg)
    if not cfg.tie_embeddings:
      _refuse(cfg, "an untied output head")
    return dict(
      common,
      architectures=["GPT2LMHeadModel"],
      model_type="gpt2",
      n_embd=cfg.d_model,
      n_head=cfg.num_heads,
      n_layer=cfg.num_layers,
      n_inner=cfg.d_ff,
      n_positions=cfg.max_positions,
      layer_norm_epsilon=cfg.norm_eps,
      activation_function=_need(cfg, _ACT, "activation"),
      bos_token_id=cfg.eos_id,
      tie_word_embeddings=True,
    )
  raise ConversionError(f"export_hf: unknown family {cfg.family!r}.")


def _entries(cfg: ModelConfig):
  return {
    "t5": layout.t5_layout,
    "bart": layout.bart_layout,
    "llama": layout.llama_layout,
    "gpt2": layout.gpt2_layout,
  }[cfg.family](cfg)


def hf_tensors(model, dtype: str | None = None) -> dict[str, np.ndarray]:
  """{HF tensor name: array} of a model, in `dtype` (default: the parameters' dtype)."""
  cfg = model.config
  tensors = layout.write(_entries(cfg), model_params(model))
  if cfg.family == "bart":
    # transformers keeps this buffer in BART checkpoints; zero, as load_hf requires.
    tensors["final_logits_bias"] = np.zeros((1, cfg.vocab_size), np.float32)
  if dtype is not None:
    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    tensors = {k: v.astype(target) for k, v in tensors.items()}
  return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


DTYPES = ("float32", "bfloat16", "float16")


def generation_config_dict(cfg: ModelConfig, bos_id: int | None) -> dict:
  """generation_config.json: the special ids `generate` needs (it stops at `eos_token_id`)."""
  out = {"eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id}
  if bos_id is not None:
    out["bos_token_id"] = bos_id
  if cfg.is_encoder_decoder:
    out["decoder_start_token_id"] = cfg.start_id
  return out


def export_hf(model, folder: str, dtype: str | None = None, tokenizer=None) -> str:
  """Writes `model` as a Hugging Face folder; returns it.

  Args:
    dtype: tensor dtype, one of `DTYPES` (None: the parameters' dtype).
    tokenizer: a `load_tokenizer` spec whose files go with the model (None:
      weights and configs only). Its vocabulary must fit the embedding.
  """
  if dtype is not None and dtype not in DTYPES:
    raise ConversionError(f"export_hf: dtype={dtype!r} is not one of {DTYPES}.")
  cfg = model.config
  config = hf_config_dict(cfg)
  exported = None
  if tokenizer is not None:
    exported = export_tokenizer(tokenizer)
    if exported.tokenizer.vocab_size > cfg.vocab_size:
      raise ConversionError(
        f"export_hf: the tokenizer has {exported.tokenizer.vocab_size} ids, the model's "
        f"embedding only {cfg.vocab_size} rows."
      )
    if exported.bos_id is not None:
      config["bos_token_id"] = exported.bos_id
  tensors = hf_tensors(model, dtype)
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  if dtype is not None:
    config["torch_dtype"] = dtype
  if exported is not None:
    for name, data in exported.hf_files.items():
      if name == "tokenizer.model" and cfg.family == "t5":
        name = "spiece.model"  # T5Tokenizer's file name (LlamaTokenizer reads tokenizer.model)
      with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
  generation = generation_config_dict(cfg, config.get("bos_token_id"))
  with open(os.path.join(folder, "generation_config.json"), "w") as f:
    json.dump(generation, f, indent=2, sort_keys=True)
  # transformers refuses safetensors files without this format tag.
  safetensors.numpy.save_file(
    tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"}
  )
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return folder

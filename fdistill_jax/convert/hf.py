"""Hugging Face checkpoint folders (`config.json` + `*.safetensors`) -> project models.

Reads with `safetensors`' numpy API; torch is never imported. Supported
architectures: T5 / T5 v1.1 / mT5, BART / mBART, LLaMA (and Mistral without
a sliding window), GPT-2. A missing, unexpected or wrongly shaped tensor,
an unknown architecture, or a config feature the project's models lack
raises `ConversionError` naming it and the file.

Layout rules (see the parameter trees in `fdistill_jax/models/encdec.py` and
`decoder.py`): a PyTorch Linear weight `[out, in]` becomes a kernel
`[in, out]`; attention projections split their head axis out (query/key/value
`[D, H, Dh]`, out `[H, Dh, D]`); GPT-2's Conv1D weights are already `[in, out]`.

  model, config = load_hf("/path/to/t5-small")
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from fdistill_jax.convert import hf_layout as layout
from fdistill_jax.convert.params import ConversionError, TensorSource, assemble
from fdistill_jax.models import ModelConfig

# ------------------------------------------------------------------------------
# config.json -> ModelConfig.
# ------------------------------------------------------------------------------

_MODEL_TYPES = {
  "t5": "t5",
  "mt5": "t5",
  "bart": "bart",
  "mbart": "bart",
  "llama": "llama",
  "mistral": "llama",
  "gpt2": "gpt2",
}
_ACTIVATIONS = {
  "relu": "relu",
  "gelu": "gelu",
  "gelu_new": "gelu_new",
  "gelu_pytorch_tanh": "gelu_new",
  "gelu_fast": "gelu_new",
}


def _first_id(value):
  """HF allows a list of EOS ids; the project's models stop on one."""
  if isinstance(value, list):
    return value[0] if value else None
  return value


def _unsupported(where, what):
  raise ConversionError(f"{where}: {what} is not supported by the project's models.")


def _activation(name, where, key):
  if name not in _ACTIVATIONS:
    _unsupported(where, f"{key}={name!r} (supported: {sorted(_ACTIVATIONS)})")
  return _ACTIVATIONS[name]


def _t5_config(hf, where):
  proj = hf.get("feed_forward_proj", "relu")
  act = {"relu": "relu", "gated-gelu": "gated-gelu", "gated-silu": "swiglu", "gelu": "gelu"}
  if proj not in act:
    _unsupported(where, f"feed_forward_proj={proj!r} (supported: {sorted(act)})")
  layers = hf.get("num_layers", 6)
  # See `_t5_plan`: only a tied and scaled head is the project's tied T5 head.
  untied = hf.get("tie_word_embeddings", True) is False
  scaled = hf.get("scale_decoder_outputs", not untied)
  return dict(
    tie_embeddings=not untied and scaled,
    vocab_size=hf["vocab_size"],
    d_model=hf["d_model"],
    num_heads=hf["num_heads"],
    head_dim=hf.get("d_kv", 64),
    d_ff=hf["d_ff"],
    num_encoder_layers=layers,
    num_layers=hf.get("num_decoder_layers") or layers,
    pad_id=hf.get("pad_token_id", 0),
    eos_id=_first_id(hf.get("eos_token_id", 1)),
    decoder_start_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
    layer_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
    mlp_activation=act[proj],
    relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
    relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
  )


def _if_differs(encoder, decoder):
  return None if encoder == decoder else encoder


def _bart_config(hf, where):
  mbart = hf["model_type"] == "mbart"
  # Older BART/mBART configs carry fairseq keys (normalize_before,
  # add_final_layer_norm, add_bias_logits) that transformers' classes ignore:
  # the class alone decides (BART post-norm, mBART pre-norm with final norms).
  return dict(
    vocab_size=hf["vocab_size"],
    d_model=hf["d_model"],
    num_heads=hf["decoder_attention_heads"],
    d_ff=hf["decoder_ffn_dim"],
    # Set only where the stacks differ, so symmetric checkpoints keep the plain config.
    encoder_num_heads=_if_differs(hf["encoder_attention_heads"], hf["decoder_attention_heads"]),
    encoder_d_ff=_if_differs(hf["encoder_ffn_dim"], hf["decoder_ffn_dim"]),
    num_encoder_layers=hf["encoder_layers"],
    num_layers=hf["decoder_layers"],
    pad_id=hf.get("pad_token_id", 1),
    eos_id=_first_id(hf.get("eos_token_id", 2)),
    decoder_start_id=hf.get("decoder_start_token_id", _first_id(hf.get("eos_token_id", 2))),
    max_positions=hf["max_position_embeddings"],
    layer_norm_eps=1e-5,
    mlp_activation=_activation(hf.get("activation_function", "gelu"), where, "activation_function"),
    scale_embedding=bool(hf.get("scale_embedding", False)),
    tie_embeddings=hf.get("tie_word_embeddings", True) is not False,
    normalize_before=mbart,
  )


def _rope_theta(hf, where):
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    _unsupported(where, f"RoPE scaling rope_type={kind!r} (only plain RoPE)")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_config(hf, where):
  if hf.get("mlp_bias"):
    _unsupported(where, "mlp_bias=true")
  if hf.get("sliding_window") is not None:
    _unsupported(where, f"sliding_window={hf['sliding_window']} (only full attention)")
  if hf.get("hidden_act", "silu") != "silu":
    _unsupported(where, f"hidden_act={hf['hidden_act']!r} (LLaMA uses silu)")
  heads = hf["num_attention_heads"]
  eos = _first_id(hf.get("eos_token_id", 2))
  pad = hf.get("pad_token_id")
  return dict(
    vocab_size=hf["vocab_size"],
    d_model=hf["hidden_size"],
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    d_ff=hf["intermediate_size"],
    num_layers=hf["num_hidden_layers"],
    pad_id=eos if pad is None else pad,
    eos_id=eos,
    max_positions=hf.get("max_position_embeddings", 2048),
    layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    rope_theta=_rope_theta(hf, where),
    attention_bias=bool(hf.get("attention_bias", False)),
  )


def _gpt2_config(hf, where):
  for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
    if hf.get(key):
      _unsupported(where, f"{key}=true")
  if hf.get("scale_attn_weights") is False:
    _unsupported(where, "scale_attn_weights=false")
  if hf.get("tie_word_embeddings") is False:
    _unsupported(where, "tie_word_embeddings=false for GPT-2")
  d = hf["n_embd"]
  eos = _first_id(hf.get("eos_token_id", 50256))
  pad = hf.get("pad_token_id")
  return dict(
    vocab_size=hf["vocab_size"],
    d_model=d,
    num_heads=hf["n_head"],
    d_ff=hf.get("n_inner") or 4 * d,
    num_layers=hf["n_layer"],
    pad_id=eos if pad is None else pad,
    eos_id=eos,
    max_positions=hf["n_positions"],
    layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    mlp_activation=_activation(
      hf.get("activation_function", "gelu_new"), where, "activation_function"
    ),
  )


_CONFIGS = {"t5": _t5_config, "bart": _bart_config, "llama": _llama_config, "gpt2": _gpt2_config}


def hf_family(hf: dict, where: str = "config.json") -> str:
  """The project family of a Hugging Face config, or a ConversionError naming it."""
  model_type = hf.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise ConversionError(
      f"{where}: unknown architecture model_type={model_type!r} "
      f"(architectures={hf.get('architectures')}); supported model_types: "
      f"{sorted(_MODEL_TYPES)}."
    )
  return _MODEL_TYPES[model_type]


def hf_model_config(hf: dict, where: str = "config.json", **overrides) -> ModelConfig:
  """A `ModelConfig` from a parsed config.json; `overrides` set any field (e.g. dtype)."""
  family = hf_family(hf, where)
  try:
    values = dict(family=family, **_CONFIGS[family](hf, where))
  except KeyError as e:
    raise ConversionError(
      f"{where}: key {e.args[0]!r} is missing; a model_type={hf['model_type']!r} config "
      f"needs it (found keys {sorted(hf)})"
    ) from e
  values.update(overrides)
  try:
    config = ModelConfig.from_config(values)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{where}: cannot build a ModelConfig: {e}") from e
  _check_special_ids(config, where)
  return config


def _check_special_ids(config: ModelConfig, where: str):
  """Special ids must be rows of the vocabulary: an EOS outside it never ends a generation."""
  ids = {"eos_token_id": config.eos_id, "pad_token_id": config.pad_id}
  if config.is_encoder_decoder:
    ids["decoder_start_token_id"] = config.start_id
  for key, value in ids.items():
    if not isinstance(value, int) or not 0 <= value < config.vocab_size:
      raise ConversionError(
        f"{where}: {key} {value!r} is outside the vocabulary [0, vocab_size="
        f"{config.vocab_size}); expected a token id the model can produce"
      )


# ------------------------------------------------------------------------------
# Tensor mapping, one function per family.
# ------------------------------------------------------------------------------


def _tied_head(src: TensorSource, cfg: ModelConfig, embedding: str):
  """Accounts for a `lm_head.weight` saved beside a tied embedding.

  Some checkpoints store the tied head anyway; that copy is dropped. A head
  that differs from the embedding is a separate head that config.json calls
  tied (transformers 5 then leaves it untied), so the load stops instead of
  silently using the embedding.
  """
  if "lm_head.weight" not in src:
    return
  shape = (cfg.vocab_size, cfg.d_model)
  if not np.array_equal(src.take("lm_head.weight", shape), src.take(embedding, shape)):
    raise ConversionError(
      f"lm_head.weight in {src.where} ({src.folder}) differs from {embedding}, but "
      "config.json says the head is tied; load with tie_embeddings=False to use the separate head."
    )


def _t5_plan(src: TensorSource, cfg: ModelConfig, hf: dict):
  # T5 scales the decoder output by d_model**-0.5 before a tied head; T5 v1.1
  # checkpoints carry a separate `lm_head` and no scaling. transformers 5
  # saves v1.1 as tied with `scale_decoder_outputs: false`: an unscaled copy
  # of the embedding, which the project's models express as an untied head.
  if cfg.tie_embeddings:
    _tied_head(src, cfg, "shared.weight")
  entries = layout.t5_layout(cfg, head_from_embedding="lm_head.weight" not in src)
  aliases = [r"(encoder|decoder)\.embed_tokens\.weight"]
  return entries, aliases + [r".*EncDecAttention\.relative_attention_bias\.weight"]


def _bart_plan(src: TensorSource, cfg: ModelConfig, hf: dict):
  p = "model." if "model.shared.weight" in src else ""
  if cfg.tie_embeddings:
    _tied_head(src, cfg, f"{p}shared.weight")
  if "final_logits_bias" in src:
    bias = src.take("final_logits_bias", (1, cfg.vocab_size))
    if np.any(bias != 0):
      raise ConversionError(
        f"final_logits_bias in {src.where} ({src.folder}) is nonzero (max |b| = "
        f"{np.abs(bias).max():.3g}); the project's BART has no logits bias, so the "
        "converted model would differ."
      )
  return layout.bart_layout(cfg, prefix=p), [rf"{p}(encoder|decoder)\.embed_tokens\.weight"]


def _llama_plan(src: TensorSource, cfg: ModelConfig, hf: dict):
  if cfg.tie_embeddings:
    _tied_head(src, cfg, "model.embed_tokens.weight")
  return layout.llama_layout(cfg), [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]


def _gpt2_plan(src: TensorSource, cfg: ModelConfig, hf: dict):
  p = "transformer." if "transformer.wte.weight" in src else ""
  _tied_head(src, cfg, f"{p}wte.weight")  # GPT-2's head is always the token embedding
  return layout.gpt2_layout(cfg, prefix=p), [rf"{p}h\.\d+\.attn\.(masked_)?bias"]


_PLANS = {"t5": _t5_plan, "bart": _bart_plan, "llama": _llama_plan, "gpt2": _gpt2_plan}


def convert_tensors(src: TensorSource, hf: dict, config: ModelConfig) -> dict[str, np.ndarray]:
  """Maps checkpoint tensors to {dotted param path: float32 array}; checks all are used."""
  entries, ignore = _PLANS[config.family](src, config, hf)
  flat = layout.read(entries, src.take)
  src.check_all_used(ignore)
  return flat


# ------------------------------------------------------------------------------
# Folders.
# ------------------------------------------------------------------------------


def read_hf_config(folder: str) -> dict:
  path = os.path.join(os.fspath(folder), "config.json")
  if not os.path.isfile(path):
    raise ConversionError(
      f"Expected a Hugging Face checkpoint folder with config.json at {folder!r}; "
      "found no config.json."
    )
  return _read_json(path)


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(
      f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
    ) from e


def safetensors_files(folder: str) -> list[str]:
  """The checkpoint's safetensors files (all shards of an index if there is one)."""
  folder = os.fspath(folder)
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ConversionError(f"{index}: expected a 'weight_map' object, found {weight_map!r}")
    shards = sorted(set(weight_map.values()))
    paths = [os.path.join(folder, s) for s in shards]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise ConversionError(f"{index} lists shards that are not there: {missing}.")
    return paths
  paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not paths:
    others = [
      n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".ckpt", ".h5", ".msgpack"))
    ]
    hint = (
      f" Found {others}: re-save them as safetensors (e.g. `model.save_pretrained(dir)` "
      "with transformers, in an environment that has torch)."
      if others
      else ""
    )
    raise ConversionError(f"No *.safetensors file in {folder!r}.{hint}")
  return paths


def load_hf(folder: str, *, mesh=None, rules=None, **overrides):
  """(model, ModelConfig) from a Hugging Face checkpoint folder.

  `overrides` set ModelConfig fields, typically `dtype` / `param_dtype`;
  with a `mesh` the parameters are placed sharded (see `params.assemble`).
  """
  folder = os.fspath(folder)
  hf = read_hf_config(folder)
  where = os.path.join(folder, "config.json")
  config = hf_model_config(hf, where, **overrides)
  src = TensorSource.from_safetensors(safetensors_files(folder))
  flat = convert_tensors(src, hf, config)
  return assemble(config, flat, folder, mesh, rules), config

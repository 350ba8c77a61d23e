"""Sharding tests on 8 fake CPU devices: mesh, rules, and sharded == single-device numerics."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from fdistill_jax import models as M
from fdistill_jax import sharding as sh

pytestmark = pytest.mark.skipif(
  jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets 8 fake CPU devices)"
)


@pytest.fixture(scope="module")
def mesh():
  return sh.make_mesh({"data": 2, "fsdp": 2, "model": 2})


def test_make_mesh_shapes_and_errors():
  m = sh.make_mesh([("data", -1), ("model", 2)])
  assert dict(m.shape) == {"data": 4, "model": 2}
  assert all(t == AxisType.Auto for t in m.axis_types)
  assert dict(sh.make_mesh().shape) == {"data": 8}
  with pytest.raises(ValueError, match="needs 12 devices, found 8"):
    sh.make_mesh({"data": 3, "model": 4})
  with pytest.raises(ValueError, match="at most one axis"):
    sh.make_mesh({"data": -1, "model": -1})


def test_logical_to_spec(mesh):
  rules = sh.DEFAULT_RULES
  assert sh.logical_to_spec(("embed", "mlp"), rules, mesh, (32, 64)) == PartitionSpec(
    "fsdp", "model"
  )
  assert sh.logical_to_spec(("batch", None), rules, mesh, (8, 3)) == PartitionSpec(
    ("data", "fsdp"), None
  )
  # Not divisible by data*fsdp=4, but by data=2: falls back to fewer axes.
  assert sh.logical_to_spec(("batch",), rules, mesh, (6,)) == PartitionSpec("data")
  assert sh.logical_to_spec(("batch",), rules, mesh, (3,)) == PartitionSpec(None)
  # One mesh axis is used once per array; unknown and None names replicate.
  assert sh.logical_to_spec(("mlp", "heads"), rules, mesh, (4, 4)) == PartitionSpec("model", None)
  assert sh.logical_to_spec(("kv", "nope", None), rules, mesh, (4, 4, 4)) == PartitionSpec(
    None, None, None
  )
  # Axes missing from the mesh or of size 1 are dropped.
  small = sh.make_mesh({"data": 8, "model": 1})
  assert sh.logical_to_spec(("batch", "embed", "vocab"), rules, small, (8, 8, 8)) == PartitionSpec(
    "data", None, None
  )


def test_rules_from_config():
  cfg = ml_collections.ConfigDict({"batch": ("data",), "embed": None, "mlp": "model"})
  assert sh.rules_from_config(cfg) == (("batch", ("data",)), ("embed", None), ("mlp", "model"))
  assert sh.rules_from_config([("vocab", ["model"])]) == (("vocab", ("model",)),)
  assert sh.rules_from_config(None) == sh.DEFAULT_RULES
  with pytest.raises(ValueError, match="pair"):
    sh.rules_from_config([("vocab", "model", "extra")])


def _batch(cfg, b=4, s=6, t=5, seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([6, 3, 1, 5])[:b]
  input_mask = (np.arange(s)[None] < lengths[:, None]).astype(np.float32)
  inputs = np.where(input_mask > 0, rng.integers(3, cfg.vocab_size - 2, (b, s)), cfg.pad_id)
  targets = rng.integers(3, cfg.vocab_size - 2, (b, t)).astype(np.int32)
  return {
    "inputs": inputs.astype(np.int32),
    "input_mask": input_mask,
    "targets": targets,
    "target_mask": np.ones((b, t), np.float32),
  }


@pytest.mark.parametrize("name", ["t5v1.1-tiny", "bart-tiny", "llama-tiny", "gpt2-tiny"])
def test_sharded_forward_and_decode_match_single_device(name, mesh):
  cfg = M.get_preset(name, num_layers=1)  # one layer shows every sharded op; compiles faster
  batch = _batch(M.ModelConfig.from_config(cfg))
  reference = M.build_model(cfg, 0)
  ref_out = M.forward(reference, **batch)

  model = sh.shard_model(M.build_model(cfg, 0), mesh)
  graphdef, params = nnx.split(model)
  # Parameters really are split: an MLP input kernel [D, F] over fsdp x model.
  layers = model.decoder.layers if model.config.is_encoder_decoder else model.layers
  mlp = layers[0].mlp
  kernel = (mlp.wi_0 if mlp.gated else mlp.wi).kernel[...]
  assert kernel.sharding.spec == PartitionSpec("fsdp", "model")
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)

  sharded_batch = sh.shard_batch(batch, mesh)
  assert sharded_batch["inputs"].sharding.spec == PartitionSpec(("data", "fsdp"), None)
  out = jax.jit(lambda p, b: M.forward(nnx.merge(graphdef, p), **b))(params, sharded_batch)
  chex.assert_trees_all_close(out.logits, ref_out.logits, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(out.hidden, ref_out.hidden, atol=1e-5, rtol=0)

  # Cached decoding with a sharded state.
  init = jax.jit(lambda p, x, m: M.init_decode_state(nnx.merge(graphdef, p), x, m, 2))
  step = jax.jit(lambda p, s, t: M.decode_step(nnx.merge(graphdef, p), s, t))
  state = sh.shard_decode_state(
    init(params, sharded_batch["inputs"], sharded_batch["input_mask"]), mesh
  )
  cache_k = state["cache"][0]["k"]
  kv_heads = model.config.kv_heads
  assert cache_k.sharding.spec == PartitionSpec(("data", "fsdp"), "model", None, None)
  assert cache_k.addressable_shards[0].data.shape[1] == kv_heads // 2
  tokens = M.start_tokens(reference, batch["inputs"], batch["input_mask"])
  logits, state = step(params, state, tokens)
  logits, state = step(params, state, jnp.asarray(batch["targets"][:, 0]))
  chex.assert_trees_all_close(logits, ref_out.logits[:, 1], atol=1e-5, rtol=0)


def test_create_sharded_model(mesh):
  cfg = M.get_preset("llama-tiny")
  model = sh.create_sharded_model(lambda: M.build_model(cfg, 0), mesh)
  reference = M.build_model(cfg, 0)
  assert model.embed.embedding[...].sharding.spec == PartitionSpec("model", "fsdp")
  # Same initial values as an unsharded build (up to rounding of the sharded RNG maths).
  chex.assert_trees_all_close(
    nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param), atol=1e-6, rtol=0
  )


def test_partition_specs_cover_every_parameter(mesh):
  model = M.build_model(M.get_preset("t5v1.1-tiny"), 0)
  specs = sh.partition_specs(model, mesh)
  flat = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  params = jax.tree.leaves(nnx.state(model))
  assert len(flat) == len(params)
  for spec, p in zip(flat, params, strict=True):
    assert len(spec) == p.ndim
  # The tensor-parallel axes show up on heads and vocab.
  assert specs["embed"]["embedding"].get_value() == PartitionSpec("model", "fsdp")
  q = specs["encoder"]["layers"][0]["self_attn"]["query"]["kernel"].get_value()
  assert q == PartitionSpec("fsdp", "model", None)

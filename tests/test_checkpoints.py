"""Checkpointer round trips, retention, sharded restore, and the preemption guard."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fdistill_jax import checkpoints, sharding


def _state(seed, mesh=None):
  r = np.random.default_rng(seed)
  state = {
    "params": {"w": r.normal(size=(8, 4)).astype(np.float32), "b": np.zeros(4, np.float32)},
    "opt_state": ({"mu": r.normal(size=(8, 4)).astype(np.float32)}, np.int32(seed)),
    "step": np.int32(seed),
    "rng": np.asarray(jax.random.key_data(jax.random.key(seed))),
  }
  state = jax.tree.map(jnp.asarray, state)
  if mesh is not None:
    w = NamedSharding(mesh, P("data", None))
    rep = NamedSharding(mesh, P())
    state = jax.tree.map(lambda x: jax.device_put(x, w if x.shape == (8, 4) else rep), state)
  return state


def test_round_trip_with_metadata_and_retention(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), max_to_keep=2, save_interval_steps=2)
  for step in range(1, 7):
    ckpt.maybe_save(step, _state(step), {"data": {"epoch": 0, "batches": step}})
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [4, 6]
  abstract = jax.tree.map(checkpoints.abstract_like, _state(0))
  state, meta = ckpt.restore(abstract)
  expected = _state(6)
  jax.tree.map(np.testing.assert_array_equal, state, expected)
  assert meta["data"] == {"epoch": 0, "batches": 6}
  assert ckpt.read_meta(4) == {"data": {"epoch": 0, "batches": 4}}
  state4, _ = ckpt.restore(abstract, step=4)
  np.testing.assert_array_equal(state4["params"]["w"], _state(4)["params"]["w"])
  ckpt.close()


def test_meta_function_is_called_only_when_saving(tmp_path):
  # The trainer passes a function: in a multi-process run it is a collective.
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_interval_steps=3)
  calls = []

  def meta():
    calls.append(step)
    return {"data": step}

  for step in range(1, 7):
    ckpt.maybe_save(step, _state(step), meta)
  ckpt.wait_until_finished()
  assert calls == [3, 6]
  assert ckpt.read_meta(6) == {"data": 6}
  ckpt.close()


def test_empty_directory_restores_none(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() is None
  assert ckpt.restore(jax.tree.map(checkpoints.abstract_like, _state(0))) is None
  ckpt.close()


def test_restore_lands_on_the_requested_shardings(tmp_path):
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  ckpt.save(3, _state(3))  # saved unsharded
  ckpt.wait_until_finished()
  target = jax.tree.map(checkpoints.abstract_like, _state(0, mesh))
  state, _ = ckpt.restore(target)
  assert state["params"]["w"].sharding == NamedSharding(mesh, P("data", None))
  assert len(state["params"]["w"].addressable_shards) == 8
  np.testing.assert_array_equal(state["params"]["w"], _state(3)["params"]["w"])
  ckpt.close()


def test_saving_the_same_step_twice_is_a_no_op(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  assert ckpt.save(1, _state(1))
  ckpt.wait_until_finished()
  assert not ckpt.save(1, _state(2))
  ckpt.close()


def test_unfinished_temporary_folders_are_ignored(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  ckpt.save(2, _state(2))
  ckpt.close()
  # What a SIGKILL in the middle of writing step 4 leaves behind.
  os.makedirs(tmp_path / "4.orbax-checkpoint-tmp-123" / "state")
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 2
  state, _ = ckpt.restore(jax.tree.map(checkpoints.abstract_like, _state(0)))
  np.testing.assert_array_equal(state["params"]["w"], _state(2)["params"]["w"])
  ckpt.close()


def test_preemption_guard_turns_sigterm_into_a_flag():
  previous = signal.getsignal(signal.SIGTERM)
  with checkpoints.PreemptionGuard() as guard:
    assert not checkpoints.preemption_requested(guard)
    os.kill(os.getpid(), signal.SIGTERM)  # would kill pytest without the guard
    assert checkpoints.preemption_requested(guard)
  assert signal.getsignal(signal.SIGTERM) is previous

"""Training checkpoints (orbax) and preemption handling.

A checkpoint holds two items:

* `state`: the train state pytree (params, optimizer state, step, PRNG key
  as raw uint32 key data), written asynchronously by orbax while training
  continues, and restored directly onto the shardings the caller asks for
  (so a restored run never materialises whole parameters on one device).
* `meta`: a small JSON dict (the data position, the config's objective) so
  the input stream resumes exactly where it stopped.

orbax writes each step into a temporary folder and renames it when complete,
so a process killed mid-save (SIGKILL) leaves the previous checkpoints
usable and `latest_step()` never sees the partial one.

Preemption: `PreemptionGuard` installs a SIGTERM handler that only sets a
flag; the training loop checks `guard.requested` at each step boundary,
saves, waits for the write and exits cleanly. Doing the save in the loop
(not in the handler) keeps it off the signal path, where JAX calls are not
safe.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from fdistill_jax import models


class Checkpointer:
  """A `CheckpointManager` with the train-state and metadata items."""

  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1000,
    async_save: bool = True,
  ):
    """Checkpoints in `directory` (created if needed).

    Args:
      max_to_keep: newest checkpoints kept (None: all).
      save_interval_steps: `maybe_save` saves when step % interval == 0.
      async_save: write in a background thread (`wait_until_finished` blocks).
    """
    self.directory = os.path.abspath(directory)
    self.save_interval_steps = save_interval_steps
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      save_interval_steps=1,  # the interval is applied in `maybe_save`
      enable_async_checkpointing=async_save,
      create=True,
      cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "meta")
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict | None = None, *, force: bool = True) -> bool:
    """Starts writing `state` and `meta` as `step` (async); True if a save started."""
    if step in self.manager.all_steps():
      return False
    # The caller donates `state` to its next step right after this returns.
    # orbax schedules the device-to-host copy before returning, but on the CPU
    # backend a "host copy" can alias the very buffer the next step reuses;
    # an explicit device copy makes the saved values immune to that.
    if any(d.platform == "cpu" for d in _devices(state)):
      state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    saved = self.manager.save(
      int(step),
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_jsonable(meta or {}))
      ),
      force=force,
    )
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def maybe_save(self, step: int, state, meta: dict | Callable[[], dict] | None = None) -> bool:
    """Saves at every `save_interval_steps`-th step. `meta` may be a function,
    called only when saving (a multi-process run gathers it collectively)."""
    if self.save_interval_steps and step % self.save_interval_steps == 0:
      return self.save(step, state, meta() if callable(meta) else meta)
    return False

  def restore(self, abstract_state, step: int | None = None):
    """(state, meta) of `step` (default: the latest), or None when there is none.

    `abstract_state`: a pytree of `jax.ShapeDtypeStruct` with `sharding` set
    (e.g. `jax.tree.map(abstract_like, state)`): arrays are read straight
    onto those shardings.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    restored = self.manager.restore(
      int(step),
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
      ),
    )
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored["state"], dict(restored["meta"] or {})

  def read_meta(self, step: int | None = None) -> dict | None:
    """The JSON `meta` item of `step` (default: the latest), without the state."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    restored = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"] or {})

  def wait_until_finished(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _devices(tree):
  """The devices holding the arrays of `tree` (at most the first array's)."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      return list(leaf.devices())
  return []


def abstract_like(x):
  """`ShapeDtypeStruct` of an array, keeping its sharding (a restore target)."""
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _jsonable(value):
  """Numpy scalars and tuples -> plain JSON types."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


class PreemptionGuard:
  """Context manager: SIGTERM (and optionally SIGINT) sets `requested` instead of killing.

  Only the main thread can install signal handlers; elsewhere the guard is
  inert (it never reports a request), which is what a test harness running
  the loop in a thread wants.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self.signals = tuple(signals)
    self._event = threading.Event()
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def request(self):
    """Marks a preemption (as the signal would); the loop saves and stops."""
    self._event.set()

  def _handler(self, signum, frame):
    del frame
    logging.warning("signal %d: will checkpoint at the next step boundary and exit", signum)
    self._event.set()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()
    return False


def preemption_requested(guard: PreemptionGuard) -> bool:
  """The guard's flag, agreed across processes: any host's SIGTERM stops all of them.

  With several processes every host must take the same branch (the save is
  a collective), so the flags are OR-ed with a tiny all-reduce.
  """
  local = guard.requested
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.asarray([local], np.int32))
  return bool(np.any(flags))


def load_model(
  model_config, checkpoint: str = "", pretrained=None, *, where="config.teacher", trained=False
) -> tuple[nnx.Module, dict]:
  """(model, identity): from pretrained weights, a trainer checkpoint, or random.

  Teachers and students load the same way. `pretrained` (dict(kind, path))
  goes through `fdistill_jax.convert`; otherwise `checkpoint` is a folder of
  this module's `Checkpointer` whose latest `state` item holds `params`, the
  pure dict of the model's `nnx.Param` state, for the architecture
  `model_config`. Neither: a random model (seed 0), unless `trained`.
  `where` names the config section in error messages.
  """
  if pretrained:
    # The converters (safetensors, GGUF readers) load only for pretrained weights.
    from fdistill_jax import convert

    model, _ = convert.load_pretrained(pretrained)
    return model, {"pretrained": dict(pretrained)}
  path = checkpoint
  if not path:
    if trained:
      raise ValueError(
        f"{where}: set `checkpoint` (a trained model) or `pretrained`; found neither, "
        "and this needs trained weights"
      )
    return models.build_model(model_config, rngs=0), {"random_init": 0}
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{where}.checkpoint: {path} is not a folder")
  manager = ocp.CheckpointManager(
    os.path.abspath(path),
    item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
  )
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{where}.checkpoint: no checkpoint in {path}")
  # Restored into host arrays on every process: orbax refuses the saved
  # shardings on another topology (a teacher trained on one host, used by a
  # run of several), and the caller places the params on its own mesh anyway.
  saved = manager.item_metadata(step).state
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), saved)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  tree = restored.state
  if "params" not in tree:
    raise ValueError(f"{path} step {step}: state has {sorted(tree)}, expected a 'params' entry")
  model = models.build_model(model_config, rngs=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def shapes(tree):  # orbax turns integer keys (layer numbers) into strings
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)  # noqa: E731
    return {name(path): np.shape(v) for path, v in leaves}

  want, found = shapes(nnx.to_pure_dict(params)), shapes(tree["params"])
  bad = sorted(k for k in want.keys() | found.keys() if want.get(k) != found.get(k))
  if bad:
    detail = ", ".join(f"{k}: expected {want.get(k)}, found {found.get(k)}" for k in bad[:4])
    raise ValueError(f"{path} step {step}: params do not fit {where}.model ({detail})")
  nnx.replace_by_pure_dict(params, tree["params"])
  identity = {"checkpoint": os.path.abspath(path), "step": int(step)}
  return nnx.merge(graphdef, params, rest), identity

"""Runs own their workdir: one lock, one run identity, preemption and divergence stops.

Every mode that writes (train_teacher, distill, teacher_pass, pipeline) goes
through the same four guards (docs/failure-modes.md):

* **Lock.** `run_owner` holds an exclusive `flock` on `DIR/.fdistill.lock`
  for the call; a second process on the same folder is refused with the
  holder's pid, host and start time. The kernel drops the lock when its
  process dies, so a lock left by a killed run is recovered by the next
  start without any clean-up. Nested owners of one folder in one process
  (the pipeline and its stages) share the lock. Only process 0 of a
  multi-process run locks (the workdir is shared, the job is one owner) and
  tells the others whether it could, so every process stops together.
* **Identity.** `check_identity` keeps `WORKDIR/run_identity.json`: the
  objective, model, data/records and the training fields that change the
  math. A run resuming checkpoints under another identity is refused with
  the differing fields named, unless `train.override_run_identity` is set;
  a different architecture is refused always (its checkpoints cannot load).
* **Preemption.** `run_owner` also installs one process-wide SIGTERM guard
  (`checkpoints.PreemptionGuard`); loops poll it at their boundaries, and a
  stopped stage raises `Preempted`, which the command line turns into
  `EXIT_PREEMPTED`.
* **Divergence.** `NonFiniteStop` watches every step's loss, gradient norm
  and parameter norm; past `train.nonfinite_patience` consecutive
  non-finite steps (their updates skipped by `skip_nonfinite_updates`) it
  raises `Diverged` before anything non-finite is saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import inspect
import json
import os
import socket
import time

import jax
import numpy as np
import optax
from absl import logging

from fdistill_jax import checkpoints, records

# Exit codes of `python -m fdistill_jax.main` (docs/failure-modes.md); any
# other error exits 1 with its message.
EXIT_OK = 0
EXIT_DIVERGED = 3  # a non-finite loss or gradient stopped training; checkpoints are good
EXIT_IDENTITY = 4  # the workdir belongs to another run identity
EXIT_LOCKED = 5  # another live process owns the workdir
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM, state saved; rerun the same command

LOCK_NAME = ".fdistill.lock"
IDENTITY_NAME = "run_identity.json"

# `config.train` fields that do not change what a step computes: a run may
# resume with other values (num_train_steps extends or shortens the run and
# its schedule; grad_accum_steps and the fused head change memory use, not
# the gradient).
OPERATIONAL_TRAIN_FIELDS = frozenset({
  "num_train_steps",
  "grad_accum_steps",
  "fused_head",
  "fused_chunk_size",
  "log_every_steps",
  "eval_every_steps",
  "eval_batches",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "async_checkpointing",
  "tensorboard",
  "progress_bar",
  "override_run_identity",
})  # fmt: skip


class RunStopped(Exception):
  """A run that stopped on purpose; `exit_code` is what the command line returns."""

  exit_code = 1


class Preempted(RunStopped):
  exit_code = EXIT_PREEMPTED


class Diverged(RunStopped):
  exit_code = EXIT_DIVERGED


class IdentityMismatch(RunStopped):
  exit_code = EXIT_IDENTITY


class WorkdirLocked(RunStopped):
  exit_code = EXIT_LOCKED


# ---------------------------------------------------------------------------
# The workdir lock and the process-wide preemption guard.
# ---------------------------------------------------------------------------

_HELD: dict[str, list] = {}  # real path -> [open file, nesting depth]
_GUARD: list = []  # the active PreemptionGuard, if one is installed


def _lock_info(directory: str) -> str:
  try:
    with open(os.path.join(directory, LOCK_NAME)) as f:
      info = json.load(f)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["started"]))
    return f"pid {info['pid']} on host {info['host']}, started {started}"
  except (OSError, ValueError, KeyError):
    return "another process"


# What process 0 of a multi-process run tells the others about the lock.
_LOCK_TAKEN, _LOCK_REFUSED, _LOCK_FAILED = 0, 1, 2


@contextlib.contextmanager
def workdir_lock(directory: str):
  """Holds the exclusive lock of `directory` (created if needed) for the block.

  Raises `WorkdirLocked` naming the holder when another live process has it.
  A remote folder (`gs://...`) or a read-only one cannot hold a lock file:
  it is used unlocked, with a warning. With several processes, process 0
  takes the lock and every process learns the outcome (a tiny all-gather):
  all of them raise together, instead of the others going on into the run's
  first collective and waiting there for a process 0 that has stopped.
  """
  if "://" in directory:
    yield
    return
  if jax.process_count() == 1:
    with _process_lock(directory):
      yield
    return
  with contextlib.ExitStack() as stack:
    outcome, error = _LOCK_TAKEN, None
    if jax.process_index() == 0:
      try:
        stack.enter_context(_process_lock(directory))
      except Exception as e:  # every process must reach the all-gather below
        outcome, error = (_LOCK_REFUSED if isinstance(e, WorkdirLocked) else _LOCK_FAILED), e
    outcome = _outcome_of_process_0(outcome)
    if error is not None:
      raise error
    if outcome == _LOCK_REFUSED:
      raise WorkdirLocked(
        f"{directory} is in use: process 0 of this run found it locked (its log names the "
        "holder); wait for it to finish or stop it, or use another --workdir"
      )
    if outcome == _LOCK_FAILED:
      raise RuntimeError(f"process 0 of this run could not lock {directory}; its log says why")
    yield


def _outcome_of_process_0(outcome: int) -> int:
  """Process 0's `outcome`, on every process (a collective: all processes call it)."""
  from jax.experimental import multihost_utils

  outcomes = multihost_utils.process_allgather(np.asarray([outcome], np.int32))
  return int(np.asarray(outcomes).reshape(-1)[0])


@contextlib.contextmanager
def _process_lock(directory: str):
  """`workdir_lock` for this process alone (see there)."""
  real = os.path.realpath(directory)
  if real in _HELD:
    _HELD[real][1] += 1
    try:
      yield
    finally:
      _HELD[real][1] -= 1
    return
  try:
    os.makedirs(real, exist_ok=True)
    f = open(os.path.join(real, LOCK_NAME), "a+")  # noqa: SIM115 (held past this block)
  except OSError as e:
    if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
      raise
    logging.warning("%s: cannot write a lock file (%s); running unlocked", directory, e)
    yield
    return
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.close()
    raise WorkdirLocked(
      f"{directory} is in use by {_lock_info(real)} (lock file {LOCK_NAME}); "
      "wait for it to finish or stop it, or use another --workdir"
    ) from None
  f.seek(0)
  f.truncate()
  json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
  f.flush()
  _HELD[real] = [f, 1]
  try:
    yield
  finally:
    del _HELD[real]
    f.close()  # releases the flock


def active_guard() -> checkpoints.PreemptionGuard | None:
  """The SIGTERM guard `run_owner` or `preemption_scope` installed, if any."""
  return _GUARD[-1] if _GUARD else None


@contextlib.contextmanager
def preemption_scope():
  """Installs one SIGTERM guard for the block (reused when one is active)."""
  if _GUARD:
    yield _GUARD[-1]
    return
  with checkpoints.PreemptionGuard() as guard:
    _GUARD.append(guard)
    try:
      yield guard
    finally:
      _GUARD.pop()


def preemption_requested() -> bool:
  """Whether SIGTERM reached any process of the run (a collective when multi-process)."""
  guard = active_guard()
  return guard is not None and checkpoints.preemption_requested(guard)


def stop_if_preempted(where: str):
  """Raises `Preempted` (finished stages kept) when SIGTERM has arrived."""
  if preemption_requested():
    raise Preempted(f"preempted (SIGTERM) before {where}; finished work is kept: rerun to go on")


def raise_if_preempted(result: dict, workdir: str):
  """Turns `train_loop`'s `preempted` result into `Preempted` for the command line."""
  if result["preempted"]:
    raise Preempted(
      f"{workdir}: preempted (SIGTERM) at step {result['step']}; the checkpoint of that "
      "step is saved: rerun the same command to resume"
    )


def run_owner(directory_arg: str):
  """Decorator: the call owns the folder named by its argument `directory_arg`.

  Holds `workdir_lock` on it and a `preemption_scope` for the call's duration.
  """

  def wrap(fn):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def owned(*args, **kwargs):
      directory = signature.bind(*args, **kwargs).arguments[directory_arg]
      with workdir_lock(directory), preemption_scope():
        return fn(*args, **kwargs)

    return owned

  return wrap


def run_mode(fn, config, workdir: str) -> int:
  """Runs a command-line mode; a `RunStopped` becomes its exit code, logged."""
  with preemption_scope():
    try:
      fn(config, workdir)
    except RunStopped as e:
      logging.error("%s", e)
      print(f"stopped: {e}", flush=True)
      return e.exit_code
  return EXIT_OK


# ---------------------------------------------------------------------------
# Run identity.
# ---------------------------------------------------------------------------


def _plain(value):
  """JSON-normal form: ConfigDicts and dataclasses -> dicts, tuples -> lists."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = dataclasses.asdict(value)
  elif hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, str | int | float | bool):
    return value
  return str(value)


def train_identity(config, model_config, *, teacher: dict | None = None, data=None) -> dict:
  """What a training run in a workdir is: resuming under another one mixes two runs.

  Args:
    config: the run's ConfigDict (`objective`, `train`, `sampler`).
    model_config: the trained model's `ModelConfig`.
    teacher: the train-time teacher's identity (architecture, params digest).
    data: the data source's identity (`records_identity`, or the task).
  """
  train = {k: v for k, v in config.train.items() if k not in OPERATIONAL_TRAIN_FIELDS}
  # An empty objective schedule is left out: workdirs from before it existed still resume.
  objective = {k: v for k, v in config.objective.items() if k != "schedule" or v}
  return _plain({
    "objective": objective,
    "model": model_config,
    "train": train,
    "sampler": config.sampler,
    "teacher": teacher,
    "data": data,
  })  # fmt: skip


def records_identity(manifest: dict) -> dict:
  """The identity of teacher-pass records: what they hold, not where they lie."""
  keep = ("spec", "tokenizer_fingerprint", "sampler", "seed", "num_examples", "task")
  out = {k: manifest.get(k) for k in keep}
  out["teacher_params_sha256"] = (manifest.get("teacher") or {}).get("params_sha256")
  return out


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out or {prefix[:-1]: {}}
  return {prefix[:-1]: tree}


def identity_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
  """(dotted key, value in `old`, value in `new`) for every leaf that differs."""
  a, b = _flat(old), _flat(new)
  missing = "<absent>"
  return [
    (k, a.get(k, missing), b.get(k, missing))
    for k in sorted(a.keys() | b.keys())
    if a.get(k, missing) != b.get(k, missing)
  ]


def _write_json(path: str, value):
  records.atomic_write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode())


def check_identity(workdir: str, identity: dict, *, resuming: bool, override: bool = False):
  """Claims `workdir` for `identity`, or refuses a resume under another one.

  `resuming`: the workdir holds checkpoints this run would continue. A fresh
  workdir (or one with none) takes the new identity. Raises `IdentityMismatch`
  naming each differing field (the workdir's value, this run's value);
  `override` accepts the new identity except for the model architecture.
  """
  path = os.path.join(workdir, IDENTITY_NAME)
  identity = _plain(identity)
  write = jax.process_index() == 0
  if not resuming or not records.fs_exists(path):
    if resuming:
      logging.warning("%s: checkpoints without %s: adopting this run's identity", workdir, path)
    if write:
      records.fs_makedirs(workdir)
      _write_json(path, identity)
    return
  with records.fs_open(path, "r") as f:
    stored = json.load(f)
  diff = identity_diff(stored, identity)
  if not diff:
    return
  lines = "; ".join(f"{k}: workdir has {a!r}, this run has {b!r}" for k, a, b in diff[:12])
  more = f" (and {len(diff) - 12} more)" if len(diff) > 12 else ""
  model = [k for k, _, _ in diff if k.startswith("model.")]
  if model:
    raise IdentityMismatch(
      f"{path}: this run's model differs from the one whose checkpoints are in {workdir} "
      f"({lines}{more}); another architecture cannot resume them: use a new --workdir"
    )
  if not override:
    raise IdentityMismatch(
      f"{path}: {workdir} holds checkpoints of another run ({lines}{more}); use a new "
      "--workdir, or set --config.train.override_run_identity=True to continue these "
      "checkpoints under this run's settings"
    )
  logging.warning("%s: override_run_identity: continuing under new settings (%s)", path, lines)
  if write:
    _write_json(path, identity)


def checkpoint_identity(workdir: str) -> dict:
  """{"identity": digest of run_identity.json, "step": latest finished checkpoint}.

  Changes whenever the model in `workdir/checkpoints` does: results computed
  from it are stale when this differs.
  """
  digest = None
  path = os.path.join(workdir, IDENTITY_NAME)
  if records.fs_exists(path):
    with records.fs_open(path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()[:16]
  ckpt_dir = os.path.join(workdir, "checkpoints")
  names = records.fs_listdir(ckpt_dir) if records.fs_exists(ckpt_dir) else []
  steps = [int(n) for n in names if n.isdigit()]  # orbax temporaries have a suffix
  return {"identity": digest, "step": max(steps, default=None)}


# ---------------------------------------------------------------------------
# Resume hygiene: metrics rows past the restored step.
# ---------------------------------------------------------------------------


def resume_metrics(path: str, step: int) -> dict:
  """Drops the rows of `path` (metrics.jsonl) after `step`; returns the eval scalars at `step`.

  A run killed after its last checkpoint logged steps it will redo; keeping
  them would duplicate rows. Process 0 alone rewrites the file.
  """
  if jax.process_index() != 0 or not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  kept = [r for r in rows if r["step"] <= step]
  if len(kept) != len(rows):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
  evals = {}
  for r in kept:
    if r["step"] == step:
      evals.update({k[len("eval/") :]: v for k, v in r.items() if k.startswith("eval/")})
  return evals


# ---------------------------------------------------------------------------
# Divergence.
# ---------------------------------------------------------------------------

# Per-step scalars whose non-finite value means the update cannot be trusted.
WATCHED = ("loss", "grad_norm", "param_norm")


def skip_nonfinite_updates(tx: optax.GradientTransformation, patience: int):
  """`tx`, skipping updates with non-finite gradients up to `patience` in a row (0: as is)."""
  if patience < 0:
    raise ValueError(f"train.nonfinite_patience must be >= 0, found {patience}")
  return optax.apply_if_finite(tx, max_consecutive_errors=patience) if patience else tx


def _scalar(x) -> float:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return float(np.asarray(x))


class NonFiniteStop:
  """Stops training past `patience` consecutive steps with a non-finite watched metric."""

  def __init__(self, patience: int, workdir: str):
    self.patience, self.workdir, self.bad = patience, workdir, 0

  def check(self, step: int, metrics: dict, ckpt: checkpoints.Checkpointer):
    """`metrics`: the step's {name: (sum, count)}; raises `Diverged` naming `step`.

    Waits for the checkpoints in flight first, so the message names the
    steps that are on disk (all finite: a non-finite step is never saved).
    """
    values = {k: _scalar(metrics[k][0]) / _scalar(metrics[k][1]) for k in WATCHED if k in metrics}
    if all(np.isfinite(v) for v in values.values()):
      self.bad = 0
      return
    self.bad += 1
    if self.bad <= self.patience:
      logging.warning("step %d: non-finite %s, update skipped (%d of %d)", step, values,
                      self.bad, self.patience)  # fmt: skip
      return
    ckpt.wait_until_finished()
    saved = ckpt.all_steps()
    kept = f"last good checkpoint: step {max(saved)}" if saved else "no checkpoint was saved"
    found = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    raise Diverged(
      f"{self.workdir}: non-finite training at step {step} ({found}) after "
      f"{self.bad} such step(s) in a row (train.nonfinite_patience={self.patience}); "
      f"stopped without saving it, {kept} in {ckpt.directory}; lower train.learning_rate "
      "or check the data, then rerun (it resumes from that checkpoint)"
    )

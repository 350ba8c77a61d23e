"""Multi-process JAX: start `jax.distributed` from the environment, and helpers.

Call `initialize(config)` once, first thing in `main`, before anything touches
a JAX device. It picks one way to start, in this order:

1. `off`: `distributed.mode = "off"` (or `FDISTILL_DISTRIBUTED=off`): nothing.
2. explicit: a coordinator address, process count and process id from the
   config block `distributed` (keys below) or, for each key left `None`, from
   `FDISTILL_COORDINATOR`, `FDISTILL_NUM_PROCESSES`, `FDISTILL_PROCESS_ID`
   (and optionally `FDISTILL_LOCAL_DEVICE_IDS`, e.g. "0" or "0,1"). Config wins
   over environment so a config file can pin a cluster; the launchers in
   `launch/` set the environment.
3. SLURM: inside an `srun` step of more than one task (`SLURM_STEP_NUM_TASKS`,
   else `SLURM_NTASKS`; the batch script itself is a one-task step): process id
   `SLURM_PROCID`, coordinator = first host of `SLURM_STEP_NODELIST` (or
   `SLURM_JOB_NODELIST`) on a port derived from the job id.
4. TPU: on a Cloud TPU VM, `jax.distributed.initialize()` with no arguments
   (JAX reads the slice topology from the TPU metadata), unless the
   environment says the slice has a single host.
5. Otherwise a single process: nothing to do.

Cross-process collectives on CPU go through gloo
(`jax_cpu_collectives_implementation`), so the same code runs a "cluster" of
processes on one machine for tests (`launch/local.sh`).

Config block (all optional; see `default_config()`):

  distributed.mode               "auto" | "off" | "explicit" | "slurm" | "tpu"
  distributed.coordinator_address "host:port"
  distributed.num_processes      int
  distributed.process_id         int
  distributed.local_device_ids   "0,1" (str) or list of ints
  distributed.coordinator_port   port used with SLURM (default: from job id)
  distributed.initialization_timeout  seconds
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

ENV_MODE = "FDISTILL_DISTRIBUTED"
ENV_COORDINATOR = "FDISTILL_COORDINATOR"
ENV_NUM_PROCESSES = "FDISTILL_NUM_PROCESSES"
ENV_PROCESS_ID = "FDISTILL_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "FDISTILL_LOCAL_DEVICE_IDS"
ENV_COORDINATOR_PORT = "FDISTILL_COORDINATOR_PORT"

MODES = ("auto", "off", "explicit", "slurm", "tpu")
_KEYS = (
  "mode",
  "coordinator_address",
  "num_processes",
  "process_id",
  "local_device_ids",
  "coordinator_port",
  "initialization_timeout",
)


def default_config():
  """The `config.distributed` block with every key at its default."""
  import ml_collections

  return ml_collections.ConfigDict(
    {
      "mode": "auto",
      "coordinator_address": ml_collections.FieldReference(None, field_type=str),
      "num_processes": ml_collections.FieldReference(None, field_type=int),
      "process_id": ml_collections.FieldReference(None, field_type=int),
      "local_device_ids": ml_collections.FieldReference(None, field_type=str),
      "coordinator_port": ml_collections.FieldReference(None, field_type=int),
      "initialization_timeout": 300,
    }
  )


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins (or does not join) a multi-process run."""

  method: str  # "single", "explicit", "slurm" or "tpu"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  initialization_timeout: int = 300


# ---------------------------------------------------------------------------
# SLURM node lists.
# ---------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
  """Splits on commas that are not inside brackets: "a[1,2],b" -> [a[1,2], b]."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch == "[":
      depth += 1
    elif ch == "]":
      depth -= 1
      if depth < 0:
        raise ValueError(f"SLURM node list {text!r}: unmatched ']' at position {i}")
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  if depth != 0:
    raise ValueError(f"SLURM node list {text!r}: unclosed '['")
  parts.append(text[start:])
  return [p for p in parts if p]


def _expand_ranges(body: str, where: str) -> list[str]:
  """ "01-03,07" -> ["01", "02", "03", "07"], keeping zero padding."""
  out = []
  for item in body.split(","):
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
    if not m:
      raise ValueError(f"SLURM node list {where!r}: expected N or N-M inside [], found {item!r}")
    lo, hi = m.group(1), m.group(2) or m.group(1)
    if int(hi) < int(lo):
      raise ValueError(f"SLURM node list {where!r}: range {item!r} runs backwards")
    width = len(lo)
    out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
  return out


def parse_slurm_nodelist(nodelist: str) -> list[str]:
  """Expands a SLURM host list, as `scontrol show hostnames` does.

  Handles "node[01-03,07]", "a1,b2", "gpu[1-2]-ib,login" and several bracket
  groups in one name ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2).
  """
  nodelist = nodelist.strip()
  if not nodelist:
    raise ValueError("SLURM node list is empty")
  hosts: list[str] = []
  for part in _split_top_level(nodelist):
    names = [""]
    for literal, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
      expanded = _expand_ranges(body, nodelist) if body else [""]
      names = [n + literal + e for n in names for e in expanded]
    hosts.extend(names)
  return hosts


def _slurm_port(env: Mapping[str, str]) -> int:
  # Same rule as JAX's own SLURM support: an ephemeral port fixed by the job id,
  # so every task computes the same one without talking to the others.
  return int(env.get("SLURM_JOB_ID", "0")) % 2**12 + (65535 - 2**12 + 1)


def _first_int(text: str) -> int:
  # SLURM_STEP_TASKS_PER_NODE looks like "4(x2)" or "4,3".
  m = re.match(r"\d+", text)
  return int(m.group(0)) if m else 1


# ---------------------------------------------------------------------------
# Working out the plan (pure: reads only the config and `env`).
# ---------------------------------------------------------------------------


def _get(src: Any, key: str) -> Any:
  if isinstance(src, Mapping):
    return src.get(key)
  try:
    return getattr(src, key)  # ConfigDict, absl FLAGS, argparse namespaces
  except AttributeError:
    return None


def _settings(config_or_flags: Any) -> dict[str, Any]:
  """The distributed keys set in a config (its `distributed` block), dict or flags."""
  if config_or_flags is None:
    return {}
  block = _get(config_or_flags, "distributed")
  src = config_or_flags if block is None else block
  return {k: v for k in _KEYS if (v := _get(src, k)) is not None}


def _device_ids(value: Any, where: str) -> tuple[int, ...] | None:
  if value is None or value == "":
    return None
  if isinstance(value, int):
    return (value,)
  if isinstance(value, str):
    try:
      return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
      raise ValueError(
        f"{where}: expected comma-separated device ids like '0,1', found {value!r}"
      ) from None
  return tuple(int(v) for v in value)


def _int(value: Any, where: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: expected an integer, found {value!r}") from None


def _on_tpu_vm(env: Mapping[str, str]) -> bool:
  if env.get("JAX_PLATFORMS", "").split(",")[0] in ("cpu", "cuda", "gpu", "rocm"):
    return False
  if any(k in env for k in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID")):
    return True
  # TPU chips show up as /dev/accel* (v4 and older) or /dev/vfio/* (v5e and newer);
  # other accelerators can too, so also ask for the TPU runtime library.
  has_chips = os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
  return has_chips and importlib.util.find_spec("libtpu") is not None


def plan(config_or_flags: Any = None, env: Mapping[str, str] | None = None) -> Plan:
  """Decides how to start, without starting anything (see the module doc)."""
  env = os.environ if env is None else env
  cfg = _settings(config_or_flags)
  mode = cfg.get("mode") or env.get(ENV_MODE) or "auto"
  if mode not in MODES:
    raise ValueError(f"distributed.mode / {ENV_MODE}: expected one of {MODES}, found {mode!r}")
  timeout = _int(cfg.get("initialization_timeout", 300), "distributed.initialization_timeout")
  if mode == "off":
    return Plan("single", initialization_timeout=timeout)

  def pick(key, env_key):
    # Config first, then environment: a config file is the more specific choice.
    if cfg.get(key) is not None:
      return cfg[key], f"distributed.{key}"
    if env.get(env_key, "") != "":
      return env[env_key], f"${env_key}"
    return None, None

  coord, _ = pick("coordinator_address", ENV_COORDINATOR)
  nproc, nproc_src = pick("num_processes", ENV_NUM_PROCESSES)
  pid, pid_src = pick("process_id", ENV_PROCESS_ID)
  ldev, ldev_src = pick("local_device_ids", ENV_LOCAL_DEVICE_IDS)
  local_ids = _device_ids(ldev, ldev_src)
  explicit = {"coordinator_address": coord, "num_processes": nproc, "process_id": pid}

  if mode == "explicit" or (mode == "auto" and any(v is not None for v in explicit.values())):
    if nproc is not None and _int(nproc, nproc_src) == 1 and coord is None:
      return Plan("single", initialization_timeout=timeout)
    missing = [k for k, v in explicit.items() if v is None]
    if missing:
      raise ValueError(
        "distributed: an explicit cluster needs coordinator_address, num_processes and "
        f"process_id (config keys distributed.* or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, "
        f"${ENV_PROCESS_ID}); missing {missing}, found {explicit}"
      )
    n, p = _int(nproc, nproc_src), _int(pid, pid_src)
    if not 0 <= p < n:
      raise ValueError(f"distributed: process_id must be in [0, {n}), found {p} ({pid_src})")
    if ":" not in str(coord):
      raise ValueError(f"distributed: coordinator_address must be 'host:port', found {coord!r}")
    return Plan("explicit", str(coord), n, p, local_ids, timeout)

  slurm_ok = "SLURM_PROCID" in env and "SLURM_NTASKS" in env
  # The step's own task count: in the batch script SLURM_NTASKS is the whole
  # allocation's, but only one process runs there.
  slurm_tasks = _int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1"), "SLURM tasks")
  if mode == "slurm" or (mode == "auto" and slurm_ok and slurm_tasks > 1):
    if not slurm_ok:
      raise ValueError(
        "distributed.mode=slurm but SLURM_PROCID / SLURM_NTASKS are not set: run under srun"
      )
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
      raise ValueError(
        "SLURM run without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: run under srun"
      )
    port = cfg.get("coordinator_port") or env.get(ENV_COORDINATOR_PORT) or _slurm_port(env)
    head = parse_slurm_nodelist(nodelist)[0]
    if local_ids is None:
      # One process per GPU (several tasks on a node): each takes the GPU with its
      # local rank, as JAX does, unless SLURM already narrowed CUDA_VISIBLE_DEVICES.
      tasks_here = _first_int(
        env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", "1"))
      )
      visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
      platform = env.get("JAX_PLATFORMS", "")
      if tasks_here > 1 and len(visible) != 1 and "cpu" not in platform and "SLURM_LOCALID" in env:
        local_ids = (int(env["SLURM_LOCALID"]),)
    n, p = slurm_tasks, int(env["SLURM_PROCID"])
    if n == 1:
      return Plan("single", initialization_timeout=timeout)
    return Plan("slurm", f"{head}:{port}", n, p, local_ids, timeout)

  if mode == "tpu" or (mode == "auto" and _on_tpu_vm(env)):
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if mode == "auto" and len(hosts) == 1:
      return Plan("single", initialization_timeout=timeout)
    return Plan("tpu", initialization_timeout=timeout)

  return Plan("single", initialization_timeout=timeout)


# ---------------------------------------------------------------------------
# Starting.
# ---------------------------------------------------------------------------


def initialize(config_or_flags: Any = None, env: Mapping[str, str] | None = None) -> Plan:
  """Starts `jax.distributed` as `plan()` decides; a no-op for one process.

  Must run before any JAX computation. Calling it again after a successful
  start does nothing.
  """
  p = plan(config_or_flags, env)
  if p.method == "single" or jax.distributed.is_initialized():
    return p
  # gloo is JAX 0.10's default; set it anyway so CPU clusters do not depend on it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if p.method == "tpu":
    try:
      jax.distributed.initialize(initialization_timeout=p.initialization_timeout)
    except (ValueError, RuntimeError) as e:
      raise RuntimeError(
        f"jax.distributed.initialize() failed on what looks like a Cloud TPU VM ({e}); "
        f"for a single-host run without the TPU metadata server set {ENV_MODE}=off"
      ) from e
  else:
    # Everything is resolved here; "deactivate" keeps JAX from re-detecting
    # SLURM/MPI and overriding what the user asked for.
    jax.distributed.initialize(
      coordinator_address=p.coordinator_address,
      num_processes=p.num_processes,
      process_id=p.process_id,
      local_device_ids=list(p.local_device_ids) if p.local_device_ids else None,
      cluster_detection_method="deactivate",
      initialization_timeout=p.initialization_timeout,
    )
  logging.info(
    "jax.distributed (%s): process %d of %d, %d local / %d global devices",
    p.method,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return p


# ---------------------------------------------------------------------------
# Helpers for code that runs on every process.
# ---------------------------------------------------------------------------


def is_main_process() -> bool:
  """True on process 0, the one that logs, writes manifests and summaries."""
  return jax.process_index() == 0


class MainProcessFilter(logging.Filter):
  """Passes every record on process 0; elsewhere only warnings and worse.

  The process index is read once, when the filter is made: asking JAX from
  inside a log call would deadlock while JAX itself logs during backend start.
  """

  def __init__(self, process_index: int | None = None):
    super().__init__()
    self.main = (jax.process_index() if process_index is None else process_index) == 0

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or self.main


def install_log_filter(logger: logging.Logger | None = None) -> MainProcessFilter:
  """Quietens INFO logs on processes other than 0 (root logger and its handlers).

  Call after `initialize`: it starts the JAX backend to learn the process index.
  """
  logger = logging.getLogger() if logger is None else logger
  f = MainProcessFilter()
  logger.addFilter(f)
  for handler in logger.handlers:  # absl logs through a handler on the root logger
    handler.addFilter(f)
  return f


def log_on_main(msg: str, *args: Any, level: int = logging.INFO) -> None:
  """`logging.log` on process 0 only."""
  if is_main_process():
    logging.log(level, msg, *args)


def local_shard_range(
  num_shards: int, process_index: int | None = None, process_count: int | None = None
) -> range:
  """The shards this process reads or writes: `p, p + P, p + 2P, ...`.

  Round-robin, the same rule as the teacher pass, so a process's record
  shards are the ones it wrote. Several shards per process keep the work
  even; with fewer shards than processes some processes get none and must
  still run every collective step (pad with masked batches).
  """
  if num_shards <= 0:
    raise ValueError(f"local_shard_range: num_shards must be positive, found {num_shards}")
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not 0 <= pi < pc:
    raise ValueError(f"local_shard_range: process_index {pi} not in [0, {pc})")
  return range(pi, num_shards, pc)


def make_global_batch(local_batch: Any, mesh: jax.sharding.Mesh, partition_spec: Any = None):
  """Host-local numpy batch -> global `jax.Array`s laid out by `partition_spec`.

  Every process passes its own rows (`[B_local, ...]` on axis 0); the global
  batch is their concatenation in process order, `[B_local * P, ...]` when
  the batch axis spans all processes.

  Args:
    local_batch: a pytree (usually the batch dict) of numpy arrays.
    mesh: the global mesh.
    partition_spec: one `PartitionSpec` for every leaf (entries past a leaf's
      rank are dropped), a pytree of specs matching `local_batch`, or None for
      the batch axis over the mesh's ("data", "fsdp") axes present.
  """
  P = jax.sharding.PartitionSpec
  if partition_spec is None:
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names) or mesh.axis_names[:1]
    partition_spec = P(axes if len(axes) > 1 else axes[0])

  def put(x, spec):
    x = np.asarray(x)
    spec = P(*tuple(spec)[: x.ndim])
    return jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, spec), x)

  if isinstance(partition_spec, P):
    return jax.tree.map(lambda x: put(x, partition_spec), local_batch)
  return jax.tree.map(put, local_batch, partition_spec, is_leaf=lambda s: isinstance(s, P))


def process_slice(
  global_size: int, process_index: int | None = None, process_count: int | None = None
) -> slice:
  """Rows `[start, stop)` of a global batch that this process supplies."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if global_size % pc:
    raise ValueError(f"global batch {global_size} does not split over {pc} processes")
  per = global_size // pc
  return slice(pi * per, (pi + 1) * per)


def process_values(value: Any) -> list:
  """`value` (anything JSON can hold) of every process, in process order.

  A collective: every process must call it. The trainer keeps each
  process's reader position in the checkpoint this way, since a JSON item
  is written by process 0 alone. One process: `[value]`.
  """
  if jax.process_count() == 1:
    return [value]
  import json

  from jax.experimental import multihost_utils

  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int32)).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes, strict=True)]

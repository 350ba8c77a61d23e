"""fdistill_jax.distributed: start-up plans, helpers, and a real two-process run.

The two-process test starts this file as a worker (`python
tests/test_distributed.py --worker OUT_DIR`) in two subprocesses with 4 fake
CPU devices each, joined by `jax.distributed` over localhost with gloo
collectives, and checks that they compute what one 8-device process and a
float64 numpy reference compute.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Inputs of the worker computation, shared with the numpy reference.
GLOBAL_ROWS, FEATURES, OUT = 8, 6, 4


def _inputs():
  x = (np.arange(GLOBAL_ROWS * FEATURES, dtype=np.float64).reshape(GLOBAL_ROWS, FEATURES) - 20) / 17
  w = np.cos(np.arange(FEATURES * OUT, dtype=np.float64)).reshape(FEATURES, OUT)
  return x, w


def _reference():
  """float64 numpy values of everything the worker computes."""
  x, w = _inputs()
  y = np.tanh(x @ w)  # [rows, out]
  # loss = mean((x @ w)^2); d/dw = 2 x^T (x w) / (rows * out)
  grad = 2 * x.T @ (x @ w) / (GLOBAL_ROWS * OUT)
  return {
    "psum": np.float64(sum(range(8))),
    "total": x.sum(),
    "colsum": y.sum(axis=0),
    "grad": grad,
  }


def _worker(out_dir: str) -> None:
  """One process of the multi-process run (also the single-process baseline)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from fdistill_jax import distributed

  plan = distributed.initialize()
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  replicated = NamedSharding(mesh, P())
  x, w = _inputs()
  x, w = x.astype(np.float32), w.astype(np.float32)

  # Each process supplies only its own rows; the global array is [8, 6].
  rows = distributed.process_slice(GLOBAL_ROWS)
  batch = distributed.make_global_batch({"x": x[rows]}, mesh, P("data"))
  xg = batch["x"]
  wg = jax.make_array_from_callback(w.shape, NamedSharding(mesh, P(None, "model")), lambda i: w[i])
  ids = np.arange(8, dtype=np.float32)
  idg = jax.make_array_from_callback(
    (8,), NamedSharding(mesh, P(("data", "model"))), lambda i: ids[i]
  )

  psum = jax.jit(
    jax.shard_map(
      lambda a: jax.lax.psum(a, ("data", "model")),
      mesh=mesh,
      in_specs=P(("data", "model")),
      out_specs=P(),
    ),
    out_shardings=replicated,
  )(idg)
  total = jax.jit(jnp.sum, out_shardings=replicated)(xg)
  colsum = jax.jit(lambda a, b: jnp.tanh(a @ b).sum(axis=0), out_shardings=replicated)(xg, wg)
  grad = jax.jit(jax.grad(lambda b, a: jnp.mean((a @ b) ** 2)), out_shardings=replicated)(wg, xg)

  np.savez(
    os.path.join(out_dir, f"out_{jax.process_index()}.npz"),
    method=plan.method,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    device_count=jax.device_count(),
    local_device_count=jax.local_device_count(),
    global_shape=np.array(xg.shape),
    psum=np.asarray(psum)[0],
    total=np.asarray(total),
    colsum=np.asarray(colsum),
    grad=np.asarray(grad),
    shards=np.array(list(distributed.local_shard_range(5))),
    # Values of different JSON lengths per process.
    values=json.dumps(
      distributed.process_values({"p": jax.process_index(), "s": "ab"[: jax.process_index() + 1]})
    ),
  )
  if jax.process_count() > 1:
    jax.distributed.shutdown()


# The two-process pipeline: a teacher pass, then a few js distillation steps.
# Its files live next to the run folder: the task's TSV and the teacher's
# checkpoint, both written by the test (`_write_inputs`).
DISTILL_STEPS = 4
PREEMPT_AT = 3  # the two-process run stops here and resumes
# Teacher and student: one-layer, 16-wide T5s. What the test compares (two
# processes against one) does not depend on size, and each of the three
# processes compiles every program itself: fewer layers, less to compile.
SMALL_T5 = dict(num_layers=1, d_model=16, d_ff=32, num_heads=2)
_SOURCES = [
  "red fox runs far", "blue cat sits", "old dog eats bread", "tall tree grows",
  "the sun is warm", "cold rain falls down", "small bird sings", "green hill rises high",
  "fast car drives", "quiet lake sleeps",
]  # fmt: skip


def pipeline_config(run_dir: str):
  """configs/distill.py:js sized for the test, with its teacher-pass section.

  A TSV task with a word tokenizer; teacher and student `SMALL_T5`s (their
  own initialisations); the mesh data=4 x model=2 over all 8 devices, so
  the batch is split between the processes and heads, MLP and vocabulary
  between device pairs. One config for both modes, as `--mode=teacher_pass`
  then `--mode=distill` would use it.
  """
  from configs import distill
  from configs import tasks as task_configs
  from fdistill_jax.models import presets

  base = os.path.dirname(run_dir)
  config = distill.get_config("js")  # teacher top-k and online student samples
  config.task = task_configs.task_config(
    "tsv", files={"train": os.path.join(base, "train.tsv")}, tokenizer={"kind": "word"}
  )
  config.teacher.model = presets.get_preset("t5-tiny", **SMALL_T5)
  config.teacher.checkpoint = os.path.join(base, "teacher")
  config.student.model = presets.get_preset("t5-tiny", **SMALL_T5)
  config.teacher_pass.update(
    num_samples=2,
    sampler="sample",
    top_k=5,
    records_per_shard=4,  # 3 shards: process 0 writes and reads 0 and 2, process 1 shard 1
    batch_size=8,  # over all 8 devices of the one-process run (partly empty: a warning)
    seed=3,
    max_input_len=10,
    max_target_len=6,
    out_dir=os.path.join(run_dir, "records"),
  )
  config.teacher_pass.sampler_params = {}  # `update` would merge into the beam defaults
  config.train.update(
    batch_size=4,  # 2 rows a process: 3 batches an epoch on process 0, 2 on process 1
    num_train_steps=DISTILL_STEPS,
    warmup_steps=0,
    learning_rate=1e-2,
    max_input_len=10,
    max_target_len=6,
    num_teacher_samples=2,
    log_every_steps=1,
    eval_every_steps=0,
    checkpoint_every_steps=1000,  # the last step's save only (always made)
    tensorboard=False,
    progress_bar=False,
  )
  config.mesh.update(data=4, fsdp=1, model=2)
  return config


def _pipeline_worker(run_dir: str) -> None:
  """`--mode=teacher_pass` then `--mode=distill` of `pipeline_config`, as main runs them.

  Each process writes its record shards on its own devices, then reads them
  back for training; the global batch is assembled from the processes' rows
  and the checkpoints are written collectively.
  """
  import jax

  from fdistill_jax import distributed

  config = pipeline_config(run_dir)
  distributed.initialize(config)
  distributed.install_log_filter()
  from fdistill_jax import checkpoints, main, runguard, teacher_pass, train

  teacher_pass.run(config, run_dir)
  if jax.process_count() > 1:
    # Process 1 alone is told to stop (SIGTERM's flag) after step
    # `PREEMPT_AT`: every process saves and returns, and the rerun resumes
    # each process's own record stream.
    guard = checkpoints.PreemptionGuard()
    stop = lambda step, state: step == PREEMPT_AT and jax.process_index() == 1 and guard.request()  # noqa: E731
    loop = train.train_loop
    train.train_loop = functools.partial(loop, guard=guard, step_callback=stop)
    try:
      main.run_distill(config, run_dir)
      raise AssertionError("the preempted run returned instead of raising runguard.Preempted")
    except runguard.Preempted:
      pass  # every process saved at the same step and stopped
    train.train_loop = loop
  result = main.run_distill(config, run_dir)
  assert result["step"] == DISTILL_STEPS and not result["preempted"]
  with open(os.path.join(run_dir, f"distill_metrics_{jax.process_index()}.json"), "w") as f:
    json.dump(result["metrics"], f)
  if jax.process_count() > 1:
    jax.distributed.shutdown()


def _pipeline_reference_worker(run_dir: str) -> None:
  """The pipeline in one process, its training fed what the two processes read.

  Also saves the student's initial parameters (`init.npz`), to show that
  training moved them.
  """
  from fdistill_jax import models
  from fdistill_jax.data import reader

  def both_streams(config, workdir, use_topk, vocab_size, fingerprint=None):
    del use_topk  # the records hold top-k
    from fdistill_jax import records

    directory = records.records_dir(config, workdir)
    return lambda position: _BothProcessStreams(config, directory, vocab_size, fingerprint)

  reader.records_data_fn = both_streams
  _pipeline_worker(run_dir)
  config = pipeline_config(run_dir)
  init = models.SplitModel(models.build_model(config.student.model, rngs=config.train.seed)).params
  np.savez(os.path.join(run_dir, "init.npz"), **_flat(init))


class _BothProcessStreams:
  """The rows two processes read, in one process: process 0's rows, then process 1's.

  That is the global batch `make_global_batch` assembles in the two-process
  run (process 0 holds the first half of the `data` axis), so a one-process
  run fed by this sees exactly the two-process run's batches.
  """

  def __init__(self, config, directory: str, vocab_size: int, fingerprint: str | None):
    from fdistill_jax.data.reader import RecordReader

    tc = config.train
    self.readers = [
      RecordReader(
        directory,
        batch_size=tc.batch_size // 2,
        max_input_len=tc.max_input_len,
        max_target_len=tc.max_target_len,
        expected_vocab_size=vocab_size,
        expected_fingerprint=fingerprint,
        seed=tc.seed,
        process_index=p,
        process_count=2,
      )
      for p in range(2)
    ]

  @property
  def position(self):
    return {"processes": [r.position for r in self.readers]}

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(r) for r in self.readers]
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def _flat(tree) -> dict:
  """{"a/b/0": numpy array}; orbax restores integer keys (layer numbers) as strings."""
  import jax

  leaves = jax.tree_util.tree_leaves_with_path(tree)
  name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)  # noqa: E731
  return {name(path): np.asarray(x) for path, x in leaves}


def _checkpoint_params(directory) -> tuple[int, dict]:
  """(latest step, flat parameters) of a trainer checkpoint folder, as numpy arrays.

  Read into host arrays: orbax cannot place a two-process run's saved
  shardings on this process's devices.
  """
  import jax
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(
    os.path.abspath(directory), item_handlers={"state": ocp.StandardCheckpointHandler()}
  )
  step = manager.latest_step()
  saved = manager.item_metadata(step).state
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), saved)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  manager.close()
  return step, _flat(restored.state["params"])


def _lock_worker(out_dir: str) -> None:
  """Each process takes the workdir lock of OUT_DIR/held (another process holds it),
  then of OUT_DIR/free, and writes what happened to OUT_DIR/lock_<process>.json."""
  import jax

  from fdistill_jax import distributed, runguard

  distributed.initialize()
  result = {}
  for name in ("held", "free"):
    try:
      with runguard.workdir_lock(os.path.join(out_dir, name)):
        result[name] = "entered"
    except runguard.WorkdirLocked as e:
      result[name] = f"refused: {e}"
  with open(os.path.join(out_dir, f"lock_{jax.process_index()}.json"), "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


# Workers a test can start in several processes: `python tests/test_distributed.py
# --worker NAME OUT_DIR` (NAME defaults to "collectives").
WORKERS = {
  "collectives": _worker,
  "pipeline": _pipeline_worker,
  "pipeline_reference": _pipeline_reference_worker,
  "lock": _lock_worker,
}

if __name__ == "__main__" and len(sys.argv) in (3, 4) and sys.argv[1] == "--worker":
  sys.path.insert(0, REPO)
  name = sys.argv[2] if len(sys.argv) == 4 else "collectives"
  WORKERS[name](sys.argv[-1])
  sys.exit(0)


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------

import jax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, PartitionSpec  # noqa: E402

from fdistill_jax import distributed  # noqa: E402


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _clean_env(devices: int) -> dict[str, str]:
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("FDISTILL_", "SLURM_", "TPU_", "JAX_COORDINATOR", "XLA_FLAGS"))
  }
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    TF_CPP_MIN_LOG_LEVEL="3",
  )
  return env


def start_workers(out_dir, num_processes: int, devices: int, worker="collectives"):
  """Starts WORKERS[worker] in `num_processes` processes with `devices` CPU devices each.

  With more than one process they form one jax.distributed system over
  localhost (FDISTILL_* variables, gloo collectives). Returns the processes
  for `wait_workers`.
  """
  os.makedirs(out_dir, exist_ok=True)
  port = _free_port()
  procs = []
  for pid in range(num_processes):
    env = _clean_env(devices)
    if num_processes > 1:
      env.update(
        FDISTILL_COORDINATOR=f"localhost:{port}",
        FDISTILL_NUM_PROCESSES=str(num_processes),
        FDISTILL_PROCESS_ID=str(pid),
      )
    procs.append(
      subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", worker, str(out_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  return procs


def wait_workers(procs, timeout=240):
  """The workers' outputs; fails the test if any fails or the wait exceeds `timeout`."""
  deadline = time.monotonic() + timeout
  logs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail(f"worker timed out after {timeout}s")
    logs.append(out)
  for proc, log in zip(procs, logs, strict=True):
    assert proc.returncode == 0, f"worker failed (rc {proc.returncode}):\n{log[-4000:]}"
  return logs


def spawn_workers(out_dir, num_processes: int, devices: int, worker="collectives", timeout=240):
  """`start_workers` and `wait_workers`: runs WORKERS[worker] to completion."""
  return wait_workers(start_workers(out_dir, num_processes, devices, worker), timeout)


def _run_workers(out_dir, num_processes: int, devices: int):
  spawn_workers(out_dir, num_processes, devices)
  return [dict(np.load(os.path.join(out_dir, f"out_{i}.npz"))) for i in range(num_processes)]


def test_two_processes_match_one_process_and_numpy(tmp_path):
  multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
  multi = _run_workers(multi_dir, num_processes=2, devices=4)
  (single,) = _run_workers(single_dir, num_processes=1, devices=8)
  ref = _reference()

  assert str(single["method"]) == "single" and int(single["process_count"]) == 1
  for i, out in enumerate(multi):
    # It really was two processes of 4 devices forming one 8-device system.
    assert str(out["method"]) == "explicit"
    assert (int(out["process_index"]), int(out["process_count"])) == (i, 2)
    assert (int(out["local_device_count"]), int(out["device_count"])) == (4, 8)
    np.testing.assert_array_equal(out["global_shape"], [GLOBAL_ROWS, FEATURES])
    np.testing.assert_array_equal(out["shards"], [0, 2, 4] if i == 0 else [1, 3])
    assert json.loads(str(out["values"])) == [{"p": 0, "s": "a"}, {"p": 1, "s": "ab"}]
  assert json.loads(str(single["values"])) == [{"p": 0, "s": "a"}]
  for key in ("psum", "total", "colsum", "grad"):
    np.testing.assert_allclose(single[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for out in multi:
      np.testing.assert_allclose(out[key], single[key], rtol=1e-6, atol=1e-6, err_msg=key)


HOLD_LOCK = os.path.join(REPO, "tests", "hold_workdir_lock.py")  # holds a workdir lock


def test_every_process_stops_when_process_0_finds_the_workdir_locked(tmp_path):
  """Process 0 alone locks; the others must learn it was refused and stop too,
  not go on into a collective that process 0 never reaches."""
  (tmp_path / "held").mkdir()
  holder = subprocess.Popen(
    [sys.executable, HOLD_LOCK, str(tmp_path / "held")],
    env=_clean_env(1),
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    spawn_workers(tmp_path, num_processes=2, devices=1, worker="lock", timeout=120)
  finally:
    holder.kill()
    holder.wait(timeout=60)
  results = [json.loads((tmp_path / f"lock_{i}.json").read_text()) for i in range(2)]
  held_by = f"refused: {tmp_path / 'held'} is in use by pid {holder.pid}"
  assert results[0]["held"].startswith(held_by)
  assert results[1]["held"].startswith(f"refused: {tmp_path / 'held'} is in use: process 0")
  assert [r["free"] for r in results] == ["entered", "entered"]
  with open(tmp_path / "free" / ".fdistill.lock") as f:
    assert json.load(f)["pid"] != holder.pid  # process 0 wrote its own pid there


def _write_inputs(base):
  """The pipeline's task file and its teacher: a trainer checkpoint, params over 8 devices."""
  from fdistill_jax import checkpoints, models, sharding

  (base / "train.tsv").write_text("".join(f"{s}\t{s.split()[-1]} {s}\n" for s in _SOURCES))
  teacher = models.SplitModel(models.build_model(models.get_preset("t5-tiny", **SMALL_T5), rngs=0))
  mesh = sharding.mesh_from_config({"data": 4, "model": 2})
  ckpt = checkpoints.Checkpointer(str(base / "teacher"), async_save=False)
  ckpt.save(1, {"params": jax.device_put(teacher.params, teacher.shardings(mesh))})
  ckpt.close()


@pytest.mark.slow
def test_two_process_pipeline_matches_one_process(tmp_path):
  """Two processes x 4 devices, teacher pass then distillation: one 8-device process's results."""
  from tests.test_teacher_pass import shard_bytes

  _write_inputs(tmp_path)
  multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
  # The one-process reference runs beside the two processes (8 devices).
  procs = start_workers(multi_dir, 2, 4, worker="pipeline")
  procs += start_workers(single_dir, 1, 8, worker="pipeline_reference")
  wait_workers(procs, timeout=900)

  multi, single = shard_bytes(multi_dir / "records"), shard_bytes(single_dir / "records")
  # Process 0 wrote shards 0 and 2, process 1 shard 1: byte-identical to one process.
  assert len(single) == 3
  assert multi == single
  manifests = [
    json.loads((d / "records" / "manifest.json").read_text()) for d in (multi_dir, single_dir)
  ]
  assert manifests[0]["status"] == "complete"
  assert manifests[0]["shards"] == manifests[1]["shards"]

  # The run stopped at PREEMPT_AT with its processes at different places in
  # their streams (3 and 2 batches an epoch); each resumed at its own.
  from fdistill_jax import checkpoints

  meta = checkpoints.Checkpointer(str(multi_dir / "checkpoints")).read_meta(PREEMPT_AT)
  assert meta["data_by_process"] == [{"epoch": 0, "batches": 3}, {"epoch": 1, "batches": 1}]

  # Both processes read the same replicated metrics, and so did the one process.
  per_process = [
    json.loads((multi_dir / f"distill_metrics_{i}.json").read_text()) for i in range(2)
  ]
  for m in per_process:
    m.pop("steps_per_second")  # wall-clock
  assert per_process[0] == per_process[1]
  rows = {d: [r for r in train_metrics(d) if "train/loss" in r] for d in (multi_dir, single_dir)}
  assert [r["step"] for r in rows[multi_dir]] == list(range(1, DISTILL_STEPS + 1))
  for key in ("train/loss", "train/student/tokens", "train/teacher/tokens"):
    values = [r[key] for r in rows[multi_dir]]
    assert np.all(np.isfinite(values)), key
    np.testing.assert_allclose(
      values, [r[key] for r in rows[single_dir]], rtol=1e-5, atol=1e-6, err_msg=key
    )

  # The collectively written checkpoint holds the one-process run's parameters.
  # The all-reduces add in another order over gloo than in one process (~1e-7
  # relative); Adam's m / sqrt(v) keeps that relative size in each update.
  step_m, params_m = _checkpoint_params(multi_dir / "checkpoints")
  step_s, params_s = _checkpoint_params(single_dir / "checkpoints")
  assert step_m == step_s == DISTILL_STEPS
  assert params_m.keys() == params_s.keys()
  for key in params_s:
    np.testing.assert_allclose(params_m[key], params_s[key], rtol=1e-5, atol=1e-5, err_msg=key)
  # ... and training moved them (lr 1e-2 Adam steps: about 1e-2 per weight per step).
  init = dict(np.load(single_dir / "init.npz"))
  assert init.keys() == params_s.keys()
  assert max(np.abs(params_s[k] - init[k]).max() for k in init) > 1e-3


def train_metrics(run_dir) -> list[dict]:
  with open(run_dir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f if line.strip()]


# --- SLURM node lists -------------------------------------------------------


@pytest.mark.parametrize(
  "nodelist, hosts",
  [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a1,b2", ["a1", "b2"]),
    ("single", ["single"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("n[001-002],login,x[5]", ["n001", "n002", "login", "x5"]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
    ("r[1-2]n[3,5]", ["r1n3", "r1n5", "r2n3", "r2n5"]),
  ],
)
def test_parse_slurm_nodelist(nodelist, hosts):
  assert distributed.parse_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "node[01-03", "node]1[", "node[a-b]", "node[5-3]"])
def test_parse_slurm_nodelist_rejects_malformed(bad):
  with pytest.raises(ValueError, match="SLURM node list"):
    distributed.parse_slurm_nodelist(bad)


# --- Plans -----------------------------------------------------------------

_EXPLICIT_ENV = {
  "FDISTILL_COORDINATOR": "10.0.0.1:1234",
  "FDISTILL_NUM_PROCESSES": "4",
  "FDISTILL_PROCESS_ID": "2",
}


def test_plan_single_process_by_default():
  assert distributed.plan(None, env={}).method == "single"
  assert distributed.plan(None, env={"JAX_PLATFORMS": "cpu"}).method == "single"


def test_plan_explicit_from_env():
  p = distributed.plan(None, env=dict(_EXPLICIT_ENV, FDISTILL_LOCAL_DEVICE_IDS="0,1"))
  assert p == distributed.Plan("explicit", "10.0.0.1:1234", 4, 2, (0, 1))


def test_config_wins_over_env():
  cfg = distributed.default_config()
  cfg.coordinator_address = "head:999"
  cfg.process_id = 3
  p = distributed.plan({"distributed": cfg}, env=_EXPLICIT_ENV)
  # Keys set in the config win; the rest still come from the environment.
  assert (p.coordinator_address, p.num_processes, p.process_id) == ("head:999", 4, 3)


def test_config_block_or_flags_object():
  import ml_collections

  root = ml_collections.ConfigDict({"distributed": distributed.default_config()})
  root.distributed.coordinator_address = "h:1"
  root.distributed.num_processes = 2
  root.distributed.process_id = 1
  assert distributed.plan(root, env={}).method == "explicit"

  class Flags:  # absl-style attribute access, no `distributed` block
    coordinator_address = "h:2"
    num_processes = 2
    process_id = 0

  assert distributed.plan(Flags(), env={}).coordinator_address == "h:2"


def test_explicit_beats_slurm_and_off_beats_everything():
  slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_STEP_NODELIST": "n[1-2]"}
  assert distributed.plan(None, env={**slurm, **_EXPLICIT_ENV}).method == "explicit"
  assert distributed.plan({"mode": "off"}, env={**slurm, **_EXPLICIT_ENV}).method == "single"
  assert distributed.plan(None, env={**slurm, "FDISTILL_DISTRIBUTED": "off"}).method == "single"


def test_partial_explicit_settings_name_what_is_missing():
  with pytest.raises(ValueError, match=r"missing \['process_id'\]"):
    distributed.plan(None, env={"FDISTILL_COORDINATOR": "h:1", "FDISTILL_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
    distributed.plan(None, env={**_EXPLICIT_ENV, "FDISTILL_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="host:port"):
    distributed.plan(None, env={**_EXPLICIT_ENV, "FDISTILL_COORDINATOR": "nohost"})
  with pytest.raises(ValueError, match="expected an integer"):
    distributed.plan(None, env={**_EXPLICIT_ENV, "FDISTILL_PROCESS_ID": "two"})
  with pytest.raises(ValueError, match="expected one of"):
    distributed.plan({"mode": "mpi"}, env={})


def test_plan_slurm():
  env = {
    "SLURM_JOB_ID": "4096",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
  }
  p = distributed.plan(None, env=env)
  # Port as JAX computes it: 65535 - 4096 + 1 + job_id % 4096.
  assert p == distributed.Plan("slurm", "gpu07:61440", 16, 9, (1,))
  # One task per node: the process keeps all its GPUs.
  p1 = distributed.plan(None, env={**env, "SLURM_STEP_TASKS_PER_NODE": "1(x2)"})
  assert p1.local_device_ids is None
  # SLURM already gave this task one GPU: do not narrow again.
  assert distributed.plan(None, env={**env, "CUDA_VISIBLE_DEVICES": "3"}).local_device_ids is None
  # Explicit port, and a single-task allocation is no cluster.
  port_cfg = {"coordinator_port": 5555}
  assert distributed.plan(port_cfg, env=env).coordinator_address == "gpu07:5555"
  assert distributed.plan(None, env={**env, "SLURM_NTASKS": "1"}).method == "single"
  # The batch script (a one-task step of a 16-task allocation) is no cluster either.
  assert distributed.plan(None, env={**env, "SLURM_STEP_NUM_TASKS": "1"}).method == "single"
  assert distributed.plan(None, env={**env, "SLURM_STEP_NUM_TASKS": "16"}).num_processes == 16
  with pytest.raises(ValueError, match="srun"):
    distributed.plan({"mode": "slurm"}, env={})


def test_plan_tpu():
  assert distributed.plan({"mode": "tpu"}, env={}).method == "tpu"
  pod = {"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2", "TPU_WORKER_ID": "1"}
  assert distributed.plan(None, env=pod).method == "tpu"
  assert distributed.plan(None, env={"TPU_WORKER_HOSTNAMES": "10.0.0.1"}).method == "single"
  # An explicit CPU platform is never a TPU pod.
  assert distributed.plan(None, env={**pod, "JAX_PLATFORMS": "cpu"}).method == "single"


def test_initialize_is_a_noop_for_one_process():
  p = distributed.initialize(None, env={"JAX_PLATFORMS": "cpu"})
  assert p.method == "single"
  assert not jax.distributed.is_initialized()
  assert distributed.is_main_process()


# --- Helpers ---------------------------------------------------------------


def test_local_shard_range_covers_every_shard_once():
  for count in (1, 2, 3, 8):
    seen = sorted(s for p in range(count) for s in distributed.local_shard_range(10, p, count))
    assert seen == list(range(10))
  assert list(distributed.local_shard_range(10, 1, 4)) == [1, 5, 9]
  assert list(distributed.local_shard_range(3)) == [0, 1, 2]  # this (single) process
  with pytest.raises(ValueError):
    distributed.local_shard_range(0)
  with pytest.raises(ValueError):
    distributed.local_shard_range(4, 4, 4)


def test_make_global_batch_single_process():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  batch = {
    "inputs": np.arange(8 * 3, dtype=np.int32).reshape(8, 3),
    "target_mask": np.ones((8, 5), np.float32),
    "example_index": np.arange(8, dtype=np.int64),
  }
  out = distributed.make_global_batch(batch, mesh)
  for key, value in batch.items():
    np.testing.assert_array_equal(np.asarray(out[key]), value)
    assert out[key].sharding.spec[0] == "data"  # default: batch over "data"
  assert out["inputs"].addressable_shards[0].data.shape == (2, 3)
  specs = {k: PartitionSpec() for k in batch}
  rep = distributed.make_global_batch(batch, mesh, specs)
  assert rep["inputs"].sharding.is_fully_replicated


def test_log_filter_passes_everything_on_main(caplog):
  import logging

  f = distributed.MainProcessFilter()
  record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
  assert f.filter(record)  # process 0 keeps INFO
  with caplog.at_level(logging.INFO):
    distributed.log_on_main("step %d", 3)
  assert "step 3" in caplog.text


def test_log_filter_drops_info_on_other_processes(monkeypatch):
  import logging

  monkeypatch.setattr(jax, "process_index", lambda: 1)
  f = distributed.MainProcessFilter()
  info = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
  warn = logging.LogRecord("x", logging.WARNING, __file__, 1, "careful", None, None)
  assert not f.filter(info)
  assert f.filter(warn)
  assert not distributed.is_main_process()


def test_command_line_starts_with_the_log_filter_installed(tmp_path):
  """main.py installs the filter before JAX starts; JAX logs while starting its
  backend, and a filter that asked JAX for the process index deadlocked there."""
  import subprocess
  import sys

  out = subprocess.run(
    [sys.executable, "-m", "fdistill_jax.main", "--mode=inspect", f"--workdir={tmp_path}"],
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert out.returncode != 0
  assert "no manifest.json in" in out.stderr

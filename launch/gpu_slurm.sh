#!/usr/bin/env bash
# Submit fdistill_jax to a SLURM GPU cluster: writes an sbatch script and
# submits it. Inside the job, `srun` starts one process per GPU (default) or
# one per node; every process gets
#   FDISTILL_COORDINATOR    first node of the allocation (`scontrol show hostnames`), port from the job id
#   FDISTILL_NUM_PROCESSES  $SLURM_NTASKS
#   FDISTILL_PROCESS_ID     $SLURM_PROCID
#   FDISTILL_LOCAL_DEVICE_IDS  $SLURM_LOCALID (per-GPU mode: process i on a node drives GPU i)
# which fdistill_jax.distributed.initialize() reads to start jax.distributed.
#
# Usage:
#   launch/gpu_slurm.sh --workdir=DIR [flags] [-- MAIN_ARGS...]
#
# Flags (--flag=value or --flag value):
#   --nodes N               nodes to allocate (default 1)
#   --gpus_per_node G       GPUs per node (default 8)
#   --per gpu|node          one process per GPU (default) or one per node driving all its GPUs
#   --partition NAME        SLURM partition (default: the cluster's default)
#   --account NAME          SLURM account to charge (default: yours)
#   --time HH:MM:SS         wall-clock limit (default 04:00:00)
#   --cpus_per_task N       CPUs per process (default: SLURM's default)
#   --job_name NAME         job name (default fdistill)
#   --sbatch_option OPT     extra `#SBATCH OPT` line, repeatable (e.g. --sbatch_option=--constraint=a100)
#   --config PATH[:ARG]     config file, relative to the repository root (default configs/default.py)
#   --workdir DIR           workdir on a file system every node sees (required)
#   --mode MODE             fdistill_jax.main --mode (default pipeline)
#   --venv DIR              virtualenv to activate on the nodes (default: <repo>/.venv if present)
#   --port P                coordinator port (default: 20000 + job id % 20000)
#   --log_dir DIR           where the sbatch script and the job's output go (default <repo>/slurm_logs)
#   --dry-run               print the sbatch script and the sbatch command; submit nothing
#   -h, --help              this text
# Arguments after `--` go to fdistill_jax.main, e.g. `-- --config.train.steps=1000`.
#
# Example (2 nodes x 8 GPUs = 16 processes):
#   launch/gpu_slurm.sh --nodes=2 --gpus_per_node=8 --partition=gpu --time=12:00:00 \
#     --config=configs/default.py --workdir=/shared/fd/run1 --mode=distill
#
# Needs: sbatch/srun/scontrol, the repository and its venv (jax[cuda12] of the
# pinned jax version instead of the CPU jax) on a file system all nodes see.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NODES=1
GPUS_PER_NODE=8
PER=gpu
PARTITION=""
ACCOUNT=""
TIME=04:00:00
CPUS_PER_TASK=""
JOB_NAME=fdistill
SBATCH_OPTIONS=()
CONFIG=configs/default.py
WORKDIR=""
MODE=pipeline
VENV=""
PORT=""
LOG_DIR="$REPO_ROOT/slurm_logs"
DRY_RUN=0
MAIN_ARGS=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() {
  echo "gpu_slurm.sh: $*" >&2
  exit 2
}

while (($# > 0)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --)
      shift
      MAIN_ARGS=("$@")
      break
      ;;
    --*)
      if [[ "$1" == *=* ]]; then
        key="${1%%=*}"
        val="${1#*=}"
      else
        (($# >= 2)) || die "$1 needs a value (see --help)"
        key="$1"
        val="$2"
        shift
      fi
      case "$key" in
        --nodes) NODES="$val" ;;
        --gpus_per_node) GPUS_PER_NODE="$val" ;;
        --per) PER="$val" ;;
        --partition) PARTITION="$val" ;;
        --account) ACCOUNT="$val" ;;
        --time) TIME="$val" ;;
        --cpus_per_task) CPUS_PER_TASK="$val" ;;
        --job_name) JOB_NAME="$val" ;;
        --sbatch_option) SBATCH_OPTIONS+=("$val") ;;
        --config) CONFIG="$val" ;;
        --workdir) WORKDIR="$val" ;;
        --mode) MODE="$val" ;;
        --venv) VENV="$val" ;;
        --port) PORT="$val" ;;
        --log_dir) LOG_DIR="$val" ;;
        *) die "unknown flag '$key' (see --help)" ;;
      esac
      ;;
    *) die "unexpected argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -n "$WORKDIR" ]] || die "--workdir is required (a directory every node can write)"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes: expected a positive integer, found '$NODES'"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node: expected a positive integer, found '$GPUS_PER_NODE'"
[[ "$PER" == gpu || "$PER" == node ]] || die "--per: expected gpu or node, found '$PER'"
[[ -z "$PORT" || "$PORT" =~ ^[0-9]+$ ]] || die "--port: expected a port number, found '$PORT'"
[[ -z "$CPUS_PER_TASK" || "$CPUS_PER_TASK" =~ ^[1-9][0-9]*$ ]] || die "--cpus_per_task: expected a positive integer, found '$CPUS_PER_TASK'"
if [[ -z "$VENV" && -d "$REPO_ROOT/.venv" ]]; then VENV="$REPO_ROOT/.venv"; fi

if [[ "$PER" == gpu ]]; then TASKS_PER_NODE="$GPUS_PER_NODE"; else TASKS_PER_NODE=1; fi

# The sbatch script, with every user value shell-quoted.
make_script() {
  local q_main
  q_main="$(printf '%q ' python -m fdistill_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" \
    "--mode=$MODE" "${MAIN_ARGS[@]}")"
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
  echo "#SBATCH --gres=gpu:$GPUS_PER_NODE"
  echo "#SBATCH --time=$TIME"
  echo "#SBATCH --output=$LOG_DIR/%x-%j.out"
  [[ -n "$PARTITION" ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n "$ACCOUNT" ]] && echo "#SBATCH --account=$ACCOUNT"
  [[ -n "$CPUS_PER_TASK" ]] && echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
  for opt in "${SBATCH_OPTIONS[@]}"; do echo "#SBATCH $opt"; done
  cat <<EOF
# Written by launch/gpu_slurm.sh; the job runs $((NODES * TASKS_PER_NODE)) processes ($PER mode).
set -euo pipefail
cd $(printf '%q' "$REPO_ROOT")
EOF
  [[ -n "$VENV" ]] && echo "source $(printf '%q' "$VENV")/bin/activate"
  cat <<EOF
export PYTHONPATH=$(printf '%q' "$REPO_ROOT")\${PYTHONPATH:+:\$PYTHONPATH}
# Process 0 runs on the first node of the allocation and hosts the coordinator.
# (awk reads every line: with \`head -n 1\` scontrol could die of SIGPIPE under pipefail.)
head_node=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | awk 'NR == 1')
export FDISTILL_COORDINATOR="\$head_node:${PORT:-\$((20000 + SLURM_JOB_ID % 20000))}"
echo "fdistill: coordinator \$FDISTILL_COORDINATOR, \$SLURM_JOB_NUM_NODES nodes"
main=($q_main)
srun --kill-on-bad-exit=1 bash -c '
  export FDISTILL_NUM_PROCESSES=\$SLURM_NTASKS FDISTILL_PROCESS_ID=\$SLURM_PROCID
EOF
  if [[ "$PER" == gpu ]]; then
    echo "  export FDISTILL_LOCAL_DEVICE_IDS=\$SLURM_LOCALID"
  fi
  cat <<EOF
  exec "\$@"' fdistill "\${main[@]}"
EOF
}

if ((DRY_RUN)); then
  make_script
  echo "sbatch $LOG_DIR/$JOB_NAME.sbatch"
  exit 0
fi

command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"
mkdir -p "$LOG_DIR"
SCRIPT="$LOG_DIR/$JOB_NAME.sbatch"
make_script >"$SCRIPT"
echo "gpu_slurm.sh: wrote $SCRIPT" >&2
sbatch "$SCRIPT"
echo "gpu_slurm.sh: output goes to $LOG_DIR/$JOB_NAME-<jobid>.out (squeue -u \$USER to follow)" >&2

#!/usr/bin/env bash
# Run N cooperating JAX processes on this machine, joined by jax.distributed
# over localhost: the multi-process path of a TPU pod or GPU cluster, on one
# box, for testing.
#
# Usage:
#   launch/local.sh [flags] [-- COMMAND ARGS...]
#
# Flags (--flag=value or --flag value):
#   --num_processes N        processes to start (default 2)
#   --platform cpu|gpu       cpu: fake CPU devices, gloo collectives (default);
#                            gpu: one local GPU per process (process i gets GPU i)
#   --devices_per_process D  fake CPU devices per process with --platform=cpu (default 4)
#   --port P                 coordinator port on 127.0.0.1 (default: 20000 + PID % 20000)
#   --config PATH[:ARG]      config file for fdistill_jax.main (default configs/default.py)
#   --workdir DIR            workdir for fdistill_jax.main (needed unless COMMAND is given)
#   --mode MODE              fdistill_jax.main --mode (default pipeline)
#   --log_dir DIR            per-process logs process_<i>.log (default ./local_logs)
#   --python BIN             Python interpreter (default: $PYTHON or python3)
#   --quiet                  do not stream process 0's log to the terminal
#   --dry-run                print what would run, start nothing
#   -h, --help               this text
#
# Without COMMAND every process runs
#   $PYTHON -m fdistill_jax.main --config=CONFIG --workdir=WORKDIR --mode=MODE
# With `-- COMMAND ARGS...` every process runs that instead. Each process gets
# FDISTILL_COORDINATOR, FDISTILL_NUM_PROCESSES and FDISTILL_PROCESS_ID, which
# fdistill_jax.distributed.initialize() reads.
#
# Examples:
#   launch/local.sh --num_processes=2 --devices_per_process=4 --workdir=/tmp/fd \
#     --config=configs/default.py --mode=distill
#   launch/local.sh --platform=gpu --num_processes=2 --workdir=/tmp/fd
#
# Exit status: 0 when every process exits 0; otherwise the status of the
# first process that failed (e.g. 75 for a preempted run that saved its
# state, which a scheduler can requeue), and the tail of each failed
# process's log is printed.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NUM_PROCESSES=2
PLATFORM=cpu
DEVICES_PER_PROCESS=4
PORT=$((20000 + $$ % 20000))
CONFIG=configs/default.py
WORKDIR=""
MODE=pipeline
LOG_DIR=./local_logs
PYTHON_BIN="${PYTHON:-python3}"
QUIET=0
DRY_RUN=0
COMMAND=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() {
  echo "local.sh: $*" >&2
  exit 2
}

while (($# > 0)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run)
      DRY_RUN=1
      shift
      continue
      ;;
    --quiet)
      QUIET=1
      shift
      continue
      ;;
    --)
      shift
      COMMAND=("$@")
      break
      ;;
    --*=*)
      key="${1%%=*}"
      val="${1#*=}"
      shift
      ;;
    --*)
      (($# >= 2)) || die "$1 needs a value (see --help)"
      key="$1"
      val="$2"
      shift 2
      ;;
    *) die "unexpected argument '$1' (see --help)" ;;
  esac
  case "$key" in
    --num_processes) NUM_PROCESSES="$val" ;;
    --platform) PLATFORM="$val" ;;
    --devices_per_process) DEVICES_PER_PROCESS="$val" ;;
    --port) PORT="$val" ;;
    --config) CONFIG="$val" ;;
    --workdir) WORKDIR="$val" ;;
    --mode) MODE="$val" ;;
    --log_dir) LOG_DIR="$val" ;;
    --python) PYTHON_BIN="$val" ;;
    *) die "unknown flag '$key' (see --help)" ;;
  esac
done

[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "--num_processes: expected a positive integer, found '$NUM_PROCESSES'"
[[ "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process: expected a positive integer, found '$DEVICES_PER_PROCESS'"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port: expected a port number, found '$PORT'"
[[ "$PLATFORM" == cpu || "$PLATFORM" == gpu ]] || die "--platform: expected cpu or gpu, found '$PLATFORM'"
if ((${#COMMAND[@]} == 0)); then
  [[ -n "$WORKDIR" ]] || die "--workdir is required when no '-- COMMAND' is given"
  COMMAND=("$PYTHON_BIN" -m fdistill_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "--mode=$MODE")
fi

# XLA_FLAGS without any device-count flag the caller had: ours must be the only one.
BASE_XLA_FLAGS="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"

# The environment of process $1, as NAME=VALUE words for `env`.
process_env() {
  local i="$1"
  local -a vars=(
    "FDISTILL_COORDINATOR=127.0.0.1:$PORT"
    "FDISTILL_NUM_PROCESSES=$NUM_PROCESSES"
    "FDISTILL_PROCESS_ID=$i"
    "PYTHONPATH=$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  )
  if [[ "$PLATFORM" == cpu ]]; then
    vars+=("JAX_PLATFORMS=cpu" "XLA_FLAGS=${BASE_XLA_FLAGS:+$BASE_XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
  else
    vars+=("FDISTILL_LOCAL_DEVICE_IDS=$i")
  fi
  printf '%s\n' "${vars[@]}"
}

if ((DRY_RUN)); then
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    mapfile -t envs < <(process_env "$i")
    printf 'env'
    printf ' %q' "${envs[@]}" "${COMMAND[@]}"
    printf ' > %q 2>&1 &\n' "$LOG_DIR/process_$i.log"
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
PIDS=()
TAIL_PID=""
cleanup() {
  # Only the processes this script started, by id.
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [[ -n "$TAIL_PID" ]] && kill "$TAIL_PID" 2>/dev/null || true
}
trap 'cleanup; exit 130' INT TERM

cd "$REPO_ROOT"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  mapfile -t envs < <(process_env "$i")
  env "${envs[@]}" "${COMMAND[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  PIDS+=("$!")
done
echo "local.sh: started $NUM_PROCESSES processes (pids ${PIDS[*]}), coordinator 127.0.0.1:$PORT, logs in $LOG_DIR" >&2

if ((!QUIET)); then
  tail -n +1 -f "$LOG_DIR/process_0.log" &
  TAIL_PID=$!
fi

# Poll rather than wait in order: when one process dies the others would block
# in a collective until JAX's heartbeat timeout, so stop them at once.
FAILED=()
FIRST_RC=0
declare -A EXIT_CODES=()
while ((${#EXIT_CODES[@]} < NUM_PROCESSES)); do
  for i in "${!PIDS[@]}"; do
    [[ -n "${EXIT_CODES[$i]:-}" ]] && continue
    kill -0 "${PIDS[$i]}" 2>/dev/null && continue
    rc=0
    wait "${PIDS[$i]}" || rc=$?
    EXIT_CODES[$i]=$rc
    if ((rc != 0)); then
      FAILED+=("$i")
      ((FIRST_RC == 0)) && FIRST_RC=$rc # the others are stopped below: theirs is not the cause
      cleanup
    fi
  done
  ((${#EXIT_CODES[@]} < NUM_PROCESSES)) && sleep 0.5
done
if [[ -n "$TAIL_PID" ]]; then
  kill "$TAIL_PID" 2>/dev/null || true
  wait "$TAIL_PID" 2>/dev/null || true
fi
trap - INT TERM

if ((${#FAILED[@]} > 0)); then
  for i in "${FAILED[@]}"; do
    echo "local.sh: process $i failed; last lines of $LOG_DIR/process_$i.log:" >&2
    tail -n 30 "$LOG_DIR/process_$i.log" >&2
  done
  exit "$FIRST_RC"
fi
echo "local.sh: all $NUM_PROCESSES processes finished" >&2

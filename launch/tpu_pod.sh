#!/usr/bin/env bash
# Run fdistill_jax on a Cloud TPU VM slice (one host or a multi-host pod).
#
# Steps, each safe to repeat (the script is idempotent):
#   1. create the TPU VM slice, or reuse it if it exists (describe first);
#   2. copy the committed code (`git archive HEAD`) to every worker;
#   3. on every worker: a Python venv with the pinned requirements.txt plus
#      jax[tpu] of the pinned jax version (skipped when requirements.txt is
#      unchanged since the last install);
#   4. start the same `python -m fdistill_jax.main` command on every worker in
#      the background (nohup; it survives a dropped ssh session), unless it is
#      already running there;
#   5. stream worker 0's log (Ctrl-C stops streaming, not the job).
# JAX finds the other hosts itself: the job runs with FDISTILL_DISTRIBUTED=tpu,
# so fdistill_jax.distributed calls jax.distributed.initialize() on each worker.
#
# Usage:
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --workdir=gs://BUCKET/DIR [flags] [-- MAIN_ARGS...]
#
# Flags (--flag=value or --flag value):
#   --name NAME               TPU VM name (default: fdistill-$USER)
#   --project PROJECT         Google Cloud project (default: gcloud's configured project)
#   --zone ZONE               zone with TPU quota, e.g. us-central2-b (required)
#   --accelerator_type TYPE   slice type, e.g. v4-8, v4-32, v5litepod-16 (default v4-8)
#   --runtime_version VER     TPU VM software version (default tpu-ubuntu2204-base)
#   --spot                    create a Spot (preemptible) slice
#   --config PATH[:ARG]       config file, relative to the repository root (default configs/default.py)
#   --workdir gs://...        workdir on GCS, shared by all workers (required to run)
#   --mode MODE               fdistill_jax.main --mode (default pipeline)
#   --python_version VER      Python for the worker venv, installed with uv (default 3.11)
#   --remote_dir DIR          code directory on each worker (default fdistill_jax, under $HOME)
#   --log_worker N            whose log to stream (default 0)
#   --setup_only              steps 1-3 only
#   --logs                    only stream the log of a running job (step 5)
#   --stop                    stop the job on every worker (the slice stays)
#   --delete                  delete the slice and exit (asks gcloud for no confirmation)
#   --no_stream               start the job and return without streaming its log
#   --dry-run                 print the commands instead of running them
#   -h, --help                this text
# Arguments after `--` go to fdistill_jax.main, e.g. `-- --config.train.steps=1000`.
#
# Examples:
#   launch/tpu_pod.sh --project=my-proj --zone=us-central2-b --accelerator_type=v4-32 \
#     --name=fd-v4-32 --config=configs/default.py --workdir=gs://my-bucket/fd/run1 --mode=distill
#   launch/tpu_pod.sh --zone=us-central2-b --name=fd-v4-32 --logs
#   launch/tpu_pod.sh --zone=us-central2-b --name=fd-v4-32 --delete
#
# Needs: gcloud (authenticated: `gcloud auth login`), git, and a TPU quota in
# the zone. The workers write to the GCS workdir with the slice's service
# account, which needs write access to the bucket.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NAME="fdistill-${USER:-user}"
PROJECT=""
ZONE=""
ACCELERATOR_TYPE=v4-8
RUNTIME_VERSION=tpu-ubuntu2204-base
SPOT=0
CONFIG=configs/default.py
WORKDIR=""
MODE=pipeline
PYTHON_VERSION=3.11
REMOTE_DIR=fdistill_jax
LOG_WORKER=0
ACTION=run
STREAM=1
DRY_RUN=0
MAIN_ARGS=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}
say() { echo "tpu_pod.sh: $*" >&2; }

while (($# > 0)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --setup_only) ACTION=setup ;;
    --logs) ACTION=logs ;;
    --stop) ACTION=stop ;;
    --delete) ACTION=delete ;;
    --no_stream) STREAM=0 ;;
    --)
      shift
      MAIN_ARGS=("$@")
      break
      ;;
    --*=* | --*)
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
        --name) NAME="$val" ;;
        --project) PROJECT="$val" ;;
        --zone) ZONE="$val" ;;
        --accelerator_type) ACCELERATOR_TYPE="$val" ;;
        --runtime_version) RUNTIME_VERSION="$val" ;;
        --config) CONFIG="$val" ;;
        --workdir) WORKDIR="$val" ;;
        --mode) MODE="$val" ;;
        --python_version) PYTHON_VERSION="$val" ;;
        --remote_dir) REMOTE_DIR="$val" ;;
        --log_worker) LOG_WORKER="$val" ;;
        *) die "unknown flag '$key' (see --help)" ;;
      esac
      ;;
    *) die "unexpected argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -n "$ZONE" ]] || die "--zone is required (a zone with TPU quota, e.g. us-central2-b)"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name: expected lowercase letters, digits and '-', found '$NAME'"
[[ "$LOG_WORKER" =~ ^[0-9]+$ ]] || die "--log_worker: expected a worker number, found '$LOG_WORKER'"
if [[ "$ACTION" == run ]]; then
  [[ -n "$WORKDIR" ]] || die "--workdir is required to run (a gs:// path every worker can write)"
  [[ "$WORKDIR" == gs://* ]] || say "warning: --workdir '$WORKDIR' is not on GCS; each worker will write its own local copy"
  if [[ ! -f "$REPO_ROOT/${CONFIG%%:*}" ]]; then
    ((DRY_RUN)) || die "--config: ${CONFIG%%:*} not found under $REPO_ROOT"
    say "warning: --config ${CONFIG%%:*} not found under $REPO_ROOT"
  fi
fi

GCLOUD_LOCATION=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_LOCATION+=("--project=$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

# Runs a command, or prints it (shell-quoted) with --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

# Runs a bash script on every worker (or worker $2) of the slice.
on_workers() {
  local script="$1" worker="${2:-all}"
  run "${TPU[@]}" ssh "$NAME" "${GCLOUD_LOCATION[@]}" "--worker=$worker" --command="$script"
}

# Remote paths: relative to $HOME on the workers.
LOG_DIR=fdistill_logs
VENV=fdistill_venv

ensure_tpu() {
  if ((DRY_RUN)); then
    run "${TPU[@]}" describe "$NAME" "${GCLOUD_LOCATION[@]}" --format='value(state)'
    say "(dry run: assuming the slice does not exist yet)"
  else
    local state
    state="$("${TPU[@]}" describe "$NAME" "${GCLOUD_LOCATION[@]}" --format='value(state)' 2>/dev/null || true)"
    if [[ -n "$state" ]]; then
      say "reusing TPU VM $NAME (state $state)"
      [[ "$state" == READY ]] || die "TPU VM $NAME is $state, not READY: wait, or --delete it and run again"
      return
    fi
  fi
  local -a create=("${TPU[@]}" create "$NAME" "${GCLOUD_LOCATION[@]}"
    "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
  ((SPOT)) && create+=(--spot)
  say "creating TPU VM $NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION)"
  run "${create[@]}"
}

push_code() {
  local archive="${TMPDIR:-/tmp}/fdistill_code_${NAME}.tar.gz"
  if ((!DRY_RUN)) && [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
    say "warning: uncommitted changes are not copied (the workers get HEAD: $(git -C "$REPO_ROOT" rev-parse --short HEAD))"
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$archive" HEAD
  run "${TPU[@]}" scp "$archive" "$NAME:fdistill_code.tar.gz" "${GCLOUD_LOCATION[@]}" --worker=all
  # Unpack into a fresh directory and swap, so no stale files survive an update.
  # A running job keeps its code: --stop it first to update.
  on_workers "set -e; if [[ -f $LOG_DIR/main.pid ]] && kill -0 \$(cat $LOG_DIR/main.pid) 2>/dev/null; then echo \"\$(hostname): job running, code left as is\"; exit 0; fi; rm -rf $REMOTE_DIR.new && mkdir -p $REMOTE_DIR.new && tar -xzf fdistill_code.tar.gz -C $REMOTE_DIR.new && rm -rf $REMOTE_DIR && mv $REMOTE_DIR.new $REMOTE_DIR"
}

setup_workers() {
  # uv brings its own Python (the TPU images ship 3.10; the pins need >= 3.11).
  # The stamp holds requirements.txt's hash: an unchanged file skips the install.
  local script
  script="set -euo pipefail
cd $REMOTE_DIR
export PATH=\$HOME/.local/bin:\$PATH
command -v uv >/dev/null || python3 -m pip install --user --quiet uv \
  || curl -LsSf https://astral.sh/uv/install.sh | sh
want=\$(sha256sum requirements.txt | cut -d' ' -f1)
have=\$(cat \$HOME/$VENV/.fdistill_requirements 2>/dev/null || true)
if [[ \"\$want\" != \"\$have\" ]]; then
  uv venv --quiet --allow-existing --python $PYTHON_VERSION \$HOME/$VENV
  jax_version=\$(sed -n 's/^jax==//p' requirements.txt)
  uv pip install --quiet --python \$HOME/$VENV/bin/python -r requirements.txt \"jax[tpu]==\$jax_version\"
  echo \"\$want\" > \$HOME/$VENV/.fdistill_requirements
fi
# Only the version: touching the TPU here would wait for every host of a pod.
\$HOME/$VENV/bin/python -c 'import jax, fdistill_jax; print(\"\$(hostname): jax\", jax.__version__)'"
  on_workers "$script"
}

start_job() {
  local cmd
  # $HOME expands on the worker; everything the user typed is quoted.
  cmd="\$HOME/$VENV/bin/python -m fdistill_jax.main $(printf '%q ' "--config=$CONFIG" \
    "--workdir=$WORKDIR" "--mode=$MODE" "${MAIN_ARGS[@]}")"
  local script
  script="set -euo pipefail
mkdir -p $LOG_DIR
if [[ -f $LOG_DIR/main.pid ]] && kill -0 \$(cat $LOG_DIR/main.pid) 2>/dev/null; then
  echo \"\$(hostname): already running (pid \$(cat $LOG_DIR/main.pid)); use --stop first\"
  exit 0
fi
cd $REMOTE_DIR
FDISTILL_DISTRIBUTED=tpu nohup $cmd > \$HOME/$LOG_DIR/main.log 2>&1 < /dev/null &
echo \$! > \$HOME/$LOG_DIR/main.pid
echo \"\$(hostname): started pid \$!\""
  on_workers "$script"
}

stream_logs() {
  say "streaming worker $LOG_WORKER's log; Ctrl-C stops streaming, the job keeps running"
  on_workers "tail -n +1 -F $LOG_DIR/main.log" "$LOG_WORKER"
}

stop_job() {
  on_workers "if [[ -f $LOG_DIR/main.pid ]] && kill \$(cat $LOG_DIR/main.pid) 2>/dev/null; then echo \"\$(hostname): stopped\"; else echo \"\$(hostname): not running\"; fi; rm -f $LOG_DIR/main.pid"
}

case "$ACTION" in
  delete)
    run "${TPU[@]}" delete "$NAME" "${GCLOUD_LOCATION[@]}" --quiet
    ;;
  stop) stop_job ;;
  logs) stream_logs ;;
  setup)
    ensure_tpu
    push_code
    setup_workers
    ;;
  run)
    ensure_tpu
    push_code
    setup_workers
    start_job
    if ((STREAM)); then stream_logs; fi
    ;;
esac
exit 0

#!/usr/bin/env bash
# The SmolLM2-135M chit-chat recipe (configs/smollm2_chitchat.py), every stage:
# the teacher pass, --mode=evaluate of the layer-copy init and of the teacher,
# then each student trained and evaluated at once, all on the same test
# prompts against the same teacher replies: kl and mle (on the ground truth)
# from the layer-copy init; then, warm-started from the kl student as the
# paper warm-starts every student from a pre-distilled one, js and, for the
# same number of steps, more kl (kl_cont: the equal-budget comparison).
#
# Usage (from the repository root, the venv of the README active):
#   launch/smollm2_chitchat.sh [ROOT] [PRESET]     # defaults: runs/smollm2_chitchat cpu
#
# Writes ROOT/teacher (teacher records), ROOT/<student>/checkpoints,
# ROOT/eval/<model>/metrics_test.json + examples_test.jsonl, ROOT/results.md
# (the table of docs/recipe-smollm2.md) and ROOT/stages.tsv (wall seconds and load
# average per stage). Every stage is restartable: a finished teacher pass or
# distillation is skipped when the command is run again.
set -euo pipefail

ROOT="${1:-runs/smollm2_chitchat}"
PRESET="${2:-cpu}"
PYTHON_BIN="${PYTHON:-python3}"
CONFIG=configs/smollm2_chitchat.py
case "$PRESET" in
  cpu) EVAL_EXAMPLES=16 MAX_LEN=32 WARM_STEPS=20 ;;
  full) EVAL_EXAMPLES=500 MAX_LEN=64 WARM_STEPS=1000 ;;
  *)
    echo "smollm2_chitchat.sh: PRESET must be cpu or full, found '$PRESET'" >&2
    exit 2
    ;;
esac
mkdir -p "$ROOT/eval"
RECORDS="$ROOT/teacher/teacher_records/train"

stage() { # stage NAME COMMAND...: runs it, appends "NAME seconds load" to stages.tsv
  local name=$1 start
  shift
  start=$(date +%s)
  echo "== $name ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))"
  "$@"
  printf '%s\t%s\t%s\n' "$name" "$(($(date +%s) - start))" "$(cut -d' ' -f1-3 /proc/loadavg)" |
    tee -a "$ROOT/stages.tsv"
}

main() { "$PYTHON_BIN" -m fdistill_jax.main "$@"; }

stage teacher_pass main --config="$CONFIG:$PRESET,kl" --workdir="$ROOT/teacher" --mode=teacher_pass

evaluate() { # evaluate NAME [FLAGS...]: --mode=evaluate on the first EVAL_EXAMPLES test prompts
  local name=$1
  shift
  stage "evaluate_$name" main --mode=evaluate --workdir="$ROOT/eval/$name" \
    --config="configs/generate.py:smollm2_chitchat:$PRESET,kl" \
    --config.evaluate.split=test --config.evaluate.max_examples="$EVAL_EXAMPLES" \
    --config.evaluate.teacher=experiment --config.generate.top_p=0.9 \
    --config.generate.max_len="$MAX_LEN" --config.generate.max_input_len=256 "$@"
}
# The layer-copy init first: it also samples the teacher's replies, which
# every later evaluation reuses. Each student is evaluated as soon as it is
# trained, so a run cut short still has the models before it measured.
TEACHER_SAMPLES="$ROOT/eval/init/teacher_samples_test.jsonl"
evaluate init
evaluate teacher --config.generate.model=teacher --config.evaluate.teacher_samples="$TEACHER_SAMPLES"
student() { # student NAME OBJECTIVE [FLAGS...]: distil, then evaluate
  local name=$1 objective=$2
  shift 2
  stage "distill_$name" main --config="$CONFIG:$PRESET,$objective" --workdir="$ROOT/$name" \
    --mode=distill --config.teacher_pass.out_dir="$RECORDS" "$@"
  evaluate "$name" --config.generate.checkpoint="$ROOT/$name/checkpoints" \
    --config.evaluate.teacher_samples="$TEACHER_SAMPLES"
}
student kl kl
student mle mle
# Warm-started from the kl student (the layer-copy init is sub-word garbage:
# JS's gradient on a teacher token vanishes where the student gives it
# almost no mass, so js from the init never learned to stop, EOS 0 %).
WARM=(--config.student.init_checkpoint="$ROOT/kl/checkpoints"
  --config.train.num_train_steps="$WARM_STEPS" --config.train.checkpoint_every_steps="$WARM_STEPS")
student kl_cont kl "${WARM[@]}"
student js_from_kl js "${WARM[@]}" # last: a js step costs about three kl steps

# The table of docs/recipe-smollm2.md, from the metrics files.
"$PYTHON_BIN" - "$ROOT" <<'EOF' | tee "$ROOT/results.md"
import json, os, sys
root = sys.argv[1]
cols = [("repetition2", "rep-2 %"), ("repetition4", "rep-4 %"),
        ("token_repetition2", "token rep-2 %"), ("eos_rate", "EOS %"),
        ("mean_length", "length"), ("distinct2", "distinct-2 %"),
        ("teacher_nll_token", "teacher NLL"), ("student_nll_teacher_token", "NLL of teacher replies"),
        ("rougeL", "ROUGE-L")]
print("| model | " + " | ".join(c for _, c in cols) + " |")
print("|---" * (len(cols) + 1) + "|")
for name in ("teacher", "init", "mle", "kl", "kl_cont", "js_from_kl"):
  if not os.path.exists(f"{root}/eval/{name}/metrics_test.json"):
    continue
  m = json.load(open(f"{root}/eval/{name}/metrics_test.json"))
  print(f"| {name} | " + " | ".join(format(m[k], ".2f") if k in m else "-" for k, _ in cols) + " |")
EOF

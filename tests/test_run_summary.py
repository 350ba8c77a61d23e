"""Every command is quiet by default (--verbose restores the logs) and ends with its summary."""

import json
import os
import re
import subprocess
import sys

from fdistill_jax import main, run_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_INFO = re.compile(r"^I\d{4} ", re.M)  # absl's INFO prefix: I<month><day> <time> ...


def test_every_mode_has_a_summary():
  assert set(main.MODES) <= set(run_summary._EXTRACTORS)


def test_summary_names_outputs_final_metrics_and_wall_time(tmp_path):
  result = {"step": 40, "metrics": {"loss": 1.23456, "tokens": 96}, "eval": {"nll": 2.5}}
  written, metrics = run_summary.summarize("distill", None, str(tmp_path), result)
  assert written["checkpoints"] == os.path.join(str(tmp_path), "checkpoints")
  text = run_summary.summary_text("distill", written, metrics, 12.34)
  lines = text.splitlines()
  assert lines[0] == "distill: done in 12.3 s"
  assert f"  wrote checkpoints: {tmp_path / 'checkpoints'}" in lines
  assert lines[-1] == "  final: step=40, loss=1.235, tokens=96, eval/nll=2.5"
  # A mode may say itself what it wrote; strings, arrays and nested values are not printed.
  own = {
    "written": {"report": "/r.md"},
    "metrics": {"bleu": 3.0, "bleu_signature": "nrefs:1|case:mixed", "per_example": [1, 2]},
  }
  written, metrics = run_summary.summarize("anything", None, "/w", own)
  text = run_summary.summary_text("anything", written, metrics, 1.0)
  assert text.splitlines()[1:] == ["  wrote report: /r.md", "  final: bleu=3"]


def _evaluate(workdir, *flags):
  """`--mode=evaluate` of a predictions file on a TSV task, composed on the command line."""
  data = workdir / "test.tsv"
  data.write_text("a b c\tthe cat sat\nd e\tthe dog ran\n")
  (workdir / "predictions_test.jsonl").write_text(
    "".join(json.dumps({"output": o}) + "\n" for o in ("the cat sat", "a dog ran"))
  )
  args = [
    "--config=configs/tasks.py:tsv",
    f"--config.task.files.test={data}",
    "--config.task.tokenizer.kind=word",
    "--config.task.tokenizer.split=test",
    f"--workdir={workdir}",
    "--mode=evaluate",
    *flags,
  ]
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  command = [sys.executable, "-m", "fdistill_jax.main", *args]
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def test_command_line_is_quiet_and_ends_with_its_summary(tmp_path):
  quiet = tmp_path / "quiet"
  quiet.mkdir()
  done = _evaluate(quiet)
  assert not ABSL_INFO.search(done.stderr), done.stderr[-3000:]
  assert "oneDNN" not in done.stderr  # TensorFlow's C++ INFO line as it loads
  lines = done.stdout.strip().splitlines()
  summary = lines[lines.index(next(x for x in lines if x.startswith("evaluate: done in"))) :]
  assert summary[1] == f"  wrote metrics: {quiet / 'metrics_test.json'}"
  stored = json.loads((quiet / "metrics_test.json").read_text())
  assert f"bleu={stored['bleu']:.4g}" in summary[2]
  loud = tmp_path / "loud"
  loud.mkdir()
  done = _evaluate(loud, "--verbose")
  assert ABSL_INFO.search(done.stderr)  # the library's own INFO lines are back

"""PyTorch reference for bench.loss_kernel: the original f-DISTILL loss formulas on CPU.

Development-only: runs under the dev venv (torch), never imported by the
package or by JAX code. Written from the formulas in the shared reference
original-fdistill.md §2 (`calc_ce_loss`, `calc_js_loss`, `calc_tvd_loss`):
full-vocabulary float32 logits, `masked_select` of the non-pad rows,
`KLDivLoss(reduction="batchmean")`, the mixture `m + 1e-10` inside the log.

The student logits come from the output head as in the original models
(`lm_logits = hidden @ W`), the teacher's under `torch.no_grad()`, and one
"run" is the forward + backward to the student hidden states and head.

Protocol (driven by bench.loss_kernel so that JAX and PyTorch runs can be
alternated): argv `--inputs file.npz --divergence kl [--threads n]`; then one command per
stdin line: `run` answers `{"seconds": s, "loss": x}`, `quit` answers
`{"peak_rss_bytes": n, "threads": t}` (peak resident memory of this process
above its level before the inputs were loaded) and exits.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

DIVERGENCES = ("kl", "rkl", "js", "tvd")


def _select(mask, s_logits, t_logits):
  """The original's `masked_select` of non-pad positions -> `[N, V]` each."""
  vocab = s_logits.size(-1)
  sel_mask = mask[:, :, None].expand_as(s_logits)
  s = torch.masked_select(s_logits, sel_mask).view(-1, vocab)
  t = torch.masked_select(t_logits, sel_mask).view(-1, vocab)
  return s, t


def calc_ce_loss(mask, s_logits, t_logits, temperature=1.0):
  """(1/N) sum KL(softmax(t) || softmax(s)) (`dart/kd.py:128-145`)."""
  s, t = _select(mask, s_logits, t_logits)
  loss_fct = torch.nn.KLDivLoss(reduction="batchmean")
  return loss_fct(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1))


def calc_js_loss(mask, s_logits, t_logits, s_wght, t_wght, temperature=1.0):
  """(1/N) sum KL(softmax(s) || t_wght softmax(t) + s_wght softmax(s)) (`dart/kd.py:147-166`)."""
  s, t = _select(mask, s_logits, t_logits)
  s_prob = F.softmax(s / temperature, -1)
  m = t_wght * F.softmax(t / temperature, -1) + s_wght * s_prob
  loss_fct = torch.nn.KLDivLoss(reduction="batchmean")
  return loss_fct(torch.log(m + 1e-10), s_prob)


def calc_tvd_loss(mask, s_logits, t_logits):
  """mean_n 1/2 sum_v |P - Q| (`dart/kd.py:168-183`)."""
  s, t = _select(mask, s_logits, t_logits)
  return (0.5 * (F.softmax(s, -1) - F.softmax(t, -1)).abs().sum(-1)).mean()


def loss_fn(name, mask, student, teacher, beta=0.5):
  """The per-token-mean loss of each method, both terms on the same tokens."""
  if name == "kl":  # kl_sample: calc_ce_loss(s=student, t=teacher)
    return calc_ce_loss(mask, student, teacher)
  if name == "rkl":  # arguments swapped: the student is the KLDiv target
    return calc_ce_loss(mask, teacher, student)
  if name == "js":  # _js_step = beta * student term + (1 - beta) * teacher term
    student_term = calc_js_loss(mask, student, teacher, s_wght=beta, t_wght=1.0 - beta)
    teacher_term = calc_js_loss(mask, teacher, student, s_wght=1.0 - beta, t_wght=beta)
    return beta * student_term + (1.0 - beta) * teacher_term
  if name == "tvd":
    return calc_tvd_loss(mask, student, teacher)
  raise ValueError(f"no original formula for {name!r}; have {DIVERGENCES}")


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--inputs", required=True)
  parser.add_argument("--divergence", required=True, choices=DIVERGENCES)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.set_grad_enabled(True)
  base_rss = _rss_bytes()
  data = np.load(args.inputs)
  hidden = torch.from_numpy(data["hidden"]).requires_grad_(True)  # [B, T, D]
  head = torch.from_numpy(data["head_w"]).requires_grad_(True)  # [D, V]
  t_hidden = torch.from_numpy(data["teacher_hidden"])
  t_head = torch.from_numpy(data["teacher_head_w"])
  mask = torch.from_numpy(data["weights"]) > 0  # [B, T]

  def step():
    hidden.grad = None
    head.grad = None
    with torch.no_grad():
      teacher = t_hidden @ t_head
    student = hidden @ head
    loss = loss_fn(args.divergence, mask, student, teacher)
    loss.backward()
    return float(loss.detach())

  for line in sys.stdin:
    command = line.strip()
    if command == "run":
      start = time.perf_counter()
      value = step()
      seconds = time.perf_counter() - start
      print(json.dumps({"seconds": seconds, "loss": value}), flush=True)
    elif command == "quit":
      peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
      print(
        json.dumps({"peak_rss_bytes": peak - base_rss, "threads": torch.get_num_threads()}),
        flush=True,
      )
      return
    else:
      raise SystemExit(f"unknown command {command!r}; expected 'run' or 'quit'")


if __name__ == "__main__":
  main()

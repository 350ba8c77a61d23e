"""PyTorch side of bench.real_model (dev venv only: torch + transformers, CPU).

Loads the Hugging Face folders that `fdistill_jax.convert.export_hf` wrote
from the very weights the JAX side runs, and does one task per process:

* `greedy`: `generate` greedy, exactly `--new-tokens` tokens a row
  (`min_new_tokens`, so EOS never ends a row early), KV cache on; answers the
  new tokens `[B, T]`.
* `teacher_pass`: `generate` with ancestral sampling (temperature 1, no
  top-k / top-p filter) and `output_logits=True`, then what a teacher record
  stores: the sampled tokens' log-probs, the top-k log-probs and ids and the
  tail mass at every position (`[B, T]`, `[B, T, K]`, `[B, T]`).
* `step_kl`: one distillation step of forward KL on the records' teacher
  sequences: student forward on prompt + teacher tokens, the K + 1 bucket KL
  (top-k + tail, as `divergences.topk_divergence`), backward, AdamW.
* `step_js`: one step of the skew-JS objective (beta = 1/2): the student
  samples its own sequences y' (`generate`, no grad), the teacher runs
  forward on y' (no grad), the student runs forward on the teacher sequences
  y and on y' in one batch; the student-side term KL(q || m) on y' over the
  full vocabulary and the teacher-side term KL(p || m) on y over the K + 1
  buckets, m = (p + q) / 2, each written as in TRL's `generalized_jsd_loss`
  (mixture by logsumexp of the log-probs plus log-weights, `F.kl_div` with
  `log_target=True`); backward, AdamW. TRL itself is not installed (its
  trainer needs datasets / accelerate and a network); this is plain PyTorch
  + transformers in its formulation.

Protocol (driven by bench.real_model, so runs alternate with JAX's): argv
`--task T --inputs file.npz --teacher DIR [--student DIR] [--threads n] ...`;
one command per stdin line: `run` answers a JSON line, `quit` answers
`{"peak_rss_bytes": n}` (the process's peak resident memory, weights
included) and exits.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import numpy as np
import torch
import torch.nn.functional as F
import transformers

TASKS = ("greedy", "teacher_pass", "step_kl", "step_js")
# Ancestral sampling from the full distribution, as the JAX side's sampler.
ANCESTRAL = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)


def _load(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def topk_record(logits, k):
  """logits [B, T, V] -> (logp [B, T, V], top-k values, ids [B, T, K], tail [B, T])."""
  logp = F.log_softmax(logits.float(), dim=-1)
  values, ids = torch.topk(logp, k, dim=-1)
  tail = torch.log1p(-values.exp().sum(-1).clamp(max=1.0 - 1e-6))
  return logp, values, ids, tail


def bucket_logprobs(logp, ids, tail=None):
  """The K + 1 bucket coarsening: logp [..., V] at ids [..., K] plus the rest's mass."""
  head = torch.gather(logp, -1, ids)
  if tail is None:
    tail = torch.log1p(-head.exp().sum(-1).clamp(max=1.0 - 1e-6))
  return torch.cat([head, tail[..., None]], dim=-1)


def jsd_sides(student_logp, teacher_logp, beta=0.5):
  """TRL's generalized_jsd_loss, per token and per side: (KL(q || m), KL(p || m)) `[...]`,
  m = beta p + (1 - beta) q as the logsumexp of the log-probs plus log-weights."""
  mix = torch.logsumexp(
    torch.stack([student_logp + np.log(1.0 - beta), teacher_logp + np.log(beta)]), dim=0
  )
  kl_student = F.kl_div(mix, student_logp, reduction="none", log_target=True).sum(-1)
  kl_teacher = F.kl_div(mix, teacher_logp, reduction="none", log_target=True).sum(-1)
  return kl_student, kl_teacher


def causal_forward(model, prompt, targets):
  """Logits of targets [B, T] teacher-forced after prompt [B, S] -> [B, T, V]."""
  ids = torch.cat([prompt, targets], dim=1)
  s = prompt.shape[1]
  return model(input_ids=ids, use_cache=False).logits[:, s - 1 : -1]


def masked_mean(values, mask):
  return (values * mask).sum() / mask.sum().clamp(min=1.0)


class Runner:
  def __init__(self, args):
    self.args = args
    data = np.load(args.inputs)
    self.data = {k: torch.from_numpy(data[k]) for k in data.files}
    self.prompt = self.data["inputs"].long()
    self.teacher = _load(args.teacher).eval()
    self.student = None
    if args.task.startswith("step_"):
      self.student = _load(args.student).train()
      self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-4, weight_decay=1e-4)
    self.eos = self.teacher.config.eos_token_id

  def _generate(self, model, **kwargs):
    """`model.generate` on the benchmark's prompts, cached, for `--new-tokens` tokens."""
    return model.generate(
      input_ids=self.prompt,
      attention_mask=torch.ones_like(self.prompt),
      max_new_tokens=self.args.new_tokens,
      use_cache=True,
      **kwargs,
    )

  @torch.inference_mode()
  def greedy(self):
    out = self._generate(
      self.teacher, do_sample=False, num_beams=1, min_new_tokens=self.args.new_tokens
    )
    return {"tokens": out[:, self.prompt.shape[1] :].tolist()}

  @torch.inference_mode()
  def teacher_pass(self):
    out = self._generate(
      self.teacher, **ANCESTRAL, output_logits=True, return_dict_in_generate=True
    )
    tokens = out.sequences[:, self.prompt.shape[1] :]  # [B, T']
    logits = torch.stack(out.logits, dim=1)  # [B, T', V]
    logp, values, ids, tail = topk_record(logits, self.args.top_k)
    token_lp = torch.gather(logp, -1, tokens[..., None])[..., 0]
    ended = torch.cumsum((tokens == self.eos).long(), dim=1) - (tokens == self.eos).long()
    mask = (ended == 0).float()
    record = (token_lp * mask, values * mask[..., None], ids * mask[..., None].long(), tail * mask)
    return {
      "length": float(mask.sum(1).mean()),
      "record_sum": float(sum(r.float().sum() for r in record)),
    }

  def _student_samples(self):
    self.student.eval()
    with torch.no_grad():
      out = self._generate(self.student, **ANCESTRAL, min_new_tokens=self.args.new_tokens)
    self.student.train()
    return out[:, self.prompt.shape[1] :]

  def _teacher_side(self, student_logits):
    """KL(p || m) on the records' teacher sequences over the K + 1 buckets."""
    d = self.data
    mask = d["teacher_mask"][:, 0]
    lq = bucket_logprobs(
      F.log_softmax(student_logits.float(), -1), d["teacher_topk_ids"][:, 0].long()
    )
    lp = torch.cat([d["teacher_topk_logprobs"][:, 0], d["teacher_tail_logmass"][:, 0, :, None]], -1)
    return lq, lp, mask

  def step_kl(self):
    y = self.data["teacher_tokens"][:, 0].long()
    logits = causal_forward(self.student, self.prompt, y)
    lq, lp, mask = self._teacher_side(logits)
    kl = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)  # KL(p || q)
    loss = masked_mean(kl, mask)
    self.opt.zero_grad()
    loss.backward()
    self.opt.step()
    return {"loss": float(loss)}

  def step_js(self):
    y = self.data["teacher_tokens"][:, 0].long()
    y_s = self._student_samples()  # [B, T]
    with torch.no_grad():
      teacher_on_s = F.log_softmax(causal_forward(self.teacher, self.prompt, y_s).float(), -1)
    b = y.shape[0]
    both = causal_forward(self.student, torch.cat([self.prompt] * 2), torch.cat([y, y_s]))
    lq_s = F.log_softmax(both[b:].float(), -1)
    kl_q_m, _ = jsd_sides(lq_s, teacher_on_s)
    lq, lp, mask = self._teacher_side(both[:b])
    _, kl_p_m = jsd_sides(lq, lp)
    loss = 0.5 * kl_q_m.mean() + 0.5 * masked_mean(kl_p_m, mask)
    self.opt.zero_grad()
    loss.backward()
    self.opt.step()
    return {"loss": float(loss)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--task", required=True, choices=TASKS)
  parser.add_argument("--inputs", required=True)
  parser.add_argument("--teacher", required=True)
  parser.add_argument("--student", default=None)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--top-k", type=int, default=64)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  runner = Runner(args)
  task = getattr(runner, args.task)
  for line in sys.stdin:
    command = line.strip()
    if command == "run":
      print(json.dumps(task()), flush=True)
    elif command == "quit":
      peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
      print(json.dumps({"peak_rss_bytes": peak}), flush=True)
      return
    else:
      raise SystemExit(f"unknown command {command!r}; expected 'run' or 'quit'")


if __name__ == "__main__":
  main()

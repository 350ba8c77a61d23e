"""Hugging Face `generate` side of bench.sampler_vs_hf (PyTorch CPU, dev venv only).

Loads a folder written by `fdistill_jax.convert.export_hf` (the very weights
the JAX side decodes with) and runs greedy `generate` on the given batch,
exactly `--new-tokens` new tokens per row (`min_new_tokens = max_new_tokens`,
so EOS never ends a row early on either side), with the KV cache on.

Protocol (driven by bench.sampler_vs_hf so runs alternate with JAX's): argv
`--model DIR --kind seq2seq|causal --inputs file.npz --new-tokens T [--threads n]`; one
command per stdin line: `run` answers `{"tokens": [[...]...]}` (the new tokens,
`[B, T]`), `quit` exits.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import transformers


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True)
  parser.add_argument("--kind", required=True, choices=("seq2seq", "causal"))
  parser.add_argument("--inputs", required=True)
  parser.add_argument("--new-tokens", type=int, required=True)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  auto = (
    transformers.AutoModelForSeq2SeqLM
    if args.kind == "seq2seq"
    else transformers.AutoModelForCausalLM
  )
  model = auto.from_pretrained(args.model, dtype=torch.float32).eval()
  data = np.load(args.inputs)
  input_ids = torch.from_numpy(data["inputs"].astype(np.int64))
  attention_mask = torch.from_numpy(data["input_mask"].astype(np.int64))

  @torch.inference_mode()
  def generate():
    out = model.generate(
      input_ids=input_ids,
      attention_mask=attention_mask,
      do_sample=False,
      num_beams=1,
      max_new_tokens=args.new_tokens,
      min_new_tokens=args.new_tokens,
      use_cache=True,
    )
    # seq2seq output starts with the decoder start token; causal with the prompt.
    start = 1 if args.kind == "seq2seq" else input_ids.shape[1]
    return out[:, start:].tolist()

  for line in sys.stdin:
    command = line.strip()
    if command == "run":
      print(json.dumps({"tokens": generate()}), flush=True)
    elif command == "quit":
      return
    else:
      raise SystemExit(f"unknown command {command!r}; expected 'run' or 'quit'")


if __name__ == "__main__":
  main()

"""`--mode=generate`: completions of any loadable model for one's own prompts.

The model is a pretrained file (GGUF, Hugging Face folder) or the student /
teacher of an experiment config from a training checkpoint
(`configs/generate.py` documents every field of `config.generate`). Prompts
are wrapped in the model's prompt template (the experiment task's, or ChatML
when the vocabulary has its markers), sampled with any
`fdistill_jax.decoding` method in jitted batches of fixed shape, and written
as JSONL, one line per completion:

  {"index": prompt number, "sample": j, "prompt": as given, "input": the
   templated text, "completion": text up to EOS, "tokens": its ids,
   "logprob": sum of the sampled tokens' log-probs, "length": tokens (EOS
   included), "eos": bool}

Prompt i is always sampled with key fold_in(seed, i), so outputs do not
depend on the batch size. From a terminal (prompts "-") it is interactive.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from fdistill_jax import checkpoints, convert, decoding
from fdistill_jax.data import tasks
from fdistill_jax.data.tokenizers import Tokenizer, load_tokenizer

CHATML_USER = "<|im_start|>user\n{source}<|im_end|>\n<|im_start|>assistant\n"
CHATML_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
_SAMPLER_FIELDS = ("temperature", "top_k", "top_p", "num_beams", "length_penalty")


@dataclasses.dataclass
class UsableModel:
  """A model with what it takes to prompt it."""

  model: object  # a fdistill_jax.models model
  tokenizer: Tokenizer
  tokenizer_spec: dict | None  # its load_tokenizer spec (None: built from a task, e.g. word-level)
  template: str  # prompt template with {source} (system prompt already filled in)
  input_eos: bool  # prompts end in EOS (encoder sources; not chat prompts)
  bos: bool  # prepend BOS (raw decoder-only prompts)
  source: str  # what was loaded, for messages and the summary

  def prompt_ids(self, text: str) -> list[int]:
    tok = self.tokenizer
    ids = tok.encode(self.template.replace("{source}", text, 1))
    if self.bos and tok.bos_id is not None:
      ids = [tok.bos_id] + ids
    return ids + [tok.eos_id] * self.input_eos


def _has_chatml(tok: Tokenizer) -> bool:
  """Whether ChatML's markers are single tokens of the vocabulary."""
  for marker in ("<|im_start|>", "<|im_end|>"):
    ids = tok.encode(marker)
    # Text around the marker: decode_all strips pad at either end, and pad is EOS in SmolLM2.
    if len(ids) != 1 or tok.decode_all(tok.encode(f"a{marker}a")) != f"a{marker}a":
      return False
  return True


def check_template(g, from_experiment: bool):
  """Raises for template settings that cannot work, before anything loads."""
  if g.template not in ("auto", "none") and "{source}" not in g.template:
    raise ValueError(
      f"generate.template={g.template!r}: expected 'auto', 'none' or a template containing "
      "{source}."
    )
  if g.system_prompt and from_experiment and g.template == "auto":
    raise ValueError(
      "generate.system_prompt: an experiment's prompts use its task's system turn; set "
      "task.system_prompt (or a generate.template with {system})."
    )
  if g.system_prompt and g.template == "none":
    raise ValueError(
      "generate.system_prompt is set, but generate.template='none' has no place for it."
    )


def _template(g, tok: Tokenizer, task, decoder_only: bool):
  """(template, input_eos, bos) from `generate.template` (see configs/generate.py)."""
  name = g.template
  if name == "auto" and task is not None:
    return task.wrap_source("{source}"), task.input_eos, False
  if name == "auto":
    name = (CHATML_SYSTEM * bool(g.system_prompt) + CHATML_USER) if _has_chatml(tok) else "none"
  if name == "none":
    return "{source}", not decoder_only, decoder_only
  return name.replace("{system}", g.system_prompt), not decoder_only, False


def make_sampler(g) -> decoding.ModelSampler:
  """The sampler of `config.generate`; a parameter its method does not take raises here."""
  params = {k: g[k] for k in _SAMPLER_FIELDS if g[k] is not None}
  try:
    return decoding.make_model_sampler(
      g.method, num_samples=g.num_samples, max_len=g.max_len, **params
    )
  except ValueError as e:
    raise ValueError(f"config.generate (method={g.method!r}, set {sorted(params)}): {e}") from e


def load_usable_model(config) -> UsableModel:
  """The model `config.generate` names, with its tokenizer and prompt template."""
  g = config.generate
  if g.model == "pretrained":
    spec = g.pretrained.to_dict()
    tok_spec = convert.tokenizer_spec(spec)
    tok = load_tokenizer(tok_spec)
    model, _ = convert.load_pretrained(spec)
    task = None
    source = spec["path"]
  elif g.model in ("student", "teacher"):
    task = tasks.get_task(config.task)
    tok = task.tokenizer
    tok_spec = config.task.get("tokenizer")
    tok_spec = tok_spec.to_dict() if hasattr(tok_spec, "to_dict") else tok_spec
    model, source = _experiment_model(config, g)
  else:
    raise ValueError(f"generate.model={g.model!r}: expected 'pretrained', 'student' or 'teacher'.")
  decoder_only = not model.config.is_encoder_decoder
  template, input_eos, bos = _template(g, tok, task, decoder_only)
  return UsableModel(model, tok, tok_spec, template, input_eos, bos, source)


def _experiment_model(config, g):
  """(model, description) of the experiment's student or teacher."""
  if g.model == "teacher":
    if g.checkpoint:
      return checkpoints.load_model(config.teacher.model, g.checkpoint)[0], g.checkpoint
    pretrained = config.teacher.get("pretrained")
    if not pretrained and not config.teacher.checkpoint:
      raise ValueError(
        "generate.model='teacher': the experiment names no teacher weights (teacher.pretrained "
        "or teacher.checkpoint); set generate.checkpoint."
      )
    where = pretrained.path if pretrained else config.teacher.checkpoint
    return checkpoints.load_model(config.teacher.model, config.teacher.checkpoint, pretrained)[
      0
    ], where
  if g.checkpoint:
    return checkpoints.load_model(config.student.model, g.checkpoint)[0], g.checkpoint
  if config.student.get("init"):
    # No checkpoint: the layer-copy initialisation the distillation starts from.
    teacher, _ = checkpoints.load_model(
      config.teacher.model, config.teacher.checkpoint, config.teacher.get("pretrained")
    )
    student, _ = convert.student_from_teacher(teacher, config.student.init)
    return student, "student init (teacher layers)"
  raise ValueError(
    "generate.model='student' needs generate.checkpoint (a training checkpoints folder) "
    "or an experiment with student.init."
  )


def read_prompts(path: str, key: str) -> list[str]:
  """Prompts of a text file (one a line; blank lines skipped) or a .jsonl file (field `key`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"generate.prompts: expected a file at {path!r}; found nothing there.")
  prompts = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      if not path.endswith(".jsonl"):
        prompts.append(line.rstrip("\n"))
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e}).") from e
      if not isinstance(row, dict) or not isinstance(row.get(key), str):
        raise ValueError(
          f"{path}:{n}: expected an object with a string field {key!r} (generate.prompt_key); "
          f"found {line.strip()[:120]!r}."
        )
      prompts.append(row[key])
  if not prompts:
    raise ValueError(f"generate.prompts: {path!r} holds no prompts.")
  return prompts


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample(graphdef, sampler, seed, state, inputs, input_mask, index):
  keys = decoding.example_keys(jax.random.key(seed), index)
  return sampler(nnx.merge(graphdef, state), inputs, input_mask, keys)


class Generator:
  """Completions of a `UsableModel` for batches of prompt texts (one compiled shape)."""

  def __init__(self, usable: UsableModel, sampler, *, batch_size: int, max_input_len: int, seed):
    self.usable, self.sampler = usable, sampler
    self.batch_size, self.max_input_len, self.seed = batch_size, max_input_len, int(seed)
    self._graphdef, self._state = nnx.split(usable.model)

  def encode(self, prompts: list[str], first_index: int) -> list[list[int]]:
    out = []
    for i, text in enumerate(prompts):
      ids = self.usable.prompt_ids(text)
      if len(ids) > self.max_input_len:
        raise ValueError(
          f"prompt {first_index + i} has {len(ids)} tokens; generate.max_input_len is "
          f"{self.max_input_len} (raise it, or shorten the prompt)."
        )
      out.append(ids)
    return out

  def __call__(self, prompts: list[str], first_index: int = 0) -> list[dict]:
    """One JSONL row per (prompt, sample), prompts numbered from `first_index`."""
    tok = self.usable.tokenizer
    ids = self.encode(prompts, first_index)
    rows = []
    for start in range(0, len(ids), self.batch_size):
      chunk = ids[start : start + self.batch_size]
      b, s = self.batch_size, self.max_input_len
      inputs = np.full((b, s), tok.pad_id, np.int32)
      mask = np.zeros((b, s), np.float32)
      # Unused rows repeat the first prompt: decoder-only rows need a real token.
      for r in range(b):
        row = chunk[r] if r < len(chunk) else chunk[0]
        inputs[r, : len(row)] = row
        mask[r, : len(row)] = 1.0
      index = np.arange(first_index + start, first_index + start + b)
      out = _sample(self._graphdef, self.sampler, self.seed, self._state, inputs, mask, index)
      out = jax.tree.map(np.asarray, out)
      for r in range(len(chunk)):
        p = start + r
        for j in range(out.tokens.shape[1]):
          n = int(out.lengths[r, j])
          toks = out.tokens[r, j, :n]
          rows.append(
            {
              "index": first_index + p,
              "sample": j,
              "prompt": prompts[p],
              "input": self.usable.template.replace("{source}", prompts[p], 1),
              "completion": tok.decode(toks.tolist()),
              "tokens": toks.tolist(),
              "logprob": float(out.token_logprobs[r, j, :n].sum()),
              "length": n,
              "eos": bool(n and int(toks[-1]) == tok.eos_id),
            }
          )
    return rows


def _summary(rows: list[dict], output: str, seconds: float, source: str) -> dict:
  n = max(len(rows), 1)
  summary = {
    "model": source,
    "prompts": len({r["index"] for r in rows}),
    "completions": len(rows),
    "mean_length": sum(r["length"] for r in rows) / n,
    "eos_rate": 100.0 * sum(r["eos"] for r in rows) / n,
    "mean_logprob": sum(r["logprob"] for r in rows) / n,
    "output": output,
    "wall_s": seconds,
  }
  return summary


def _interactive(generator: Generator, output: str):
  rows, index = [], 0
  print("Type a prompt and press Enter (Ctrl-D to end).", flush=True)
  with open(output, "a", encoding="utf-8") as f:
    while True:
      try:
        text = input("> ")
      except EOFError:
        print()
        return rows
      if not text.strip():
        continue
      try:
        new = generator([text], index)
      except ValueError as e:
        print(f"error: {e}", flush=True)
        continue
      for row in new:
        print(row["completion"], flush=True)
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
      f.flush()
      rows += new
      index += 1


def run(config, workdir: str):
  """`--mode=generate` (see the module docstring); returns the summary dict."""
  start = time.time()
  g = config.generate
  sampler = make_sampler(g)
  check_template(g, g.model != "pretrained")
  interactive = g.prompts in ("", "-") and sys.stdin.isatty()
  prompts = None
  if g.prompts not in ("", "-"):
    prompts = read_prompts(g.prompts, g.prompt_key)
  os.makedirs(workdir, exist_ok=True)
  output = g.output or os.path.join(workdir, "generations.jsonl")
  usable = load_usable_model(config)
  generator = Generator(
    usable, sampler, batch_size=g.batch_size, max_input_len=g.max_input_len, seed=g.seed
  )
  if interactive:
    rows = _interactive(generator, output)
  else:
    if prompts is None:
      prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    rows = generator(prompts)
    # Written whole, then renamed: an earlier file is only replaced by a complete one.
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, output)
  return _summary(rows, output, time.time() - start, usable.source)

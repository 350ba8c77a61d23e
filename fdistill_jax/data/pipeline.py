"""Static-shape numpy batches from a task split.

A split is tokenized once, then padded into `[N, S]` / `[N, T]` arrays
(`padded_split`); batches are slices of those arrays in a per-epoch order,
so the position in the stream is a plain integer (`start_batch`) and resuming
needs no iterator state.

Batches follow docs/internals.md: `inputs [B, S]`, `input_mask [B, S]`,
`targets [B, T]`, `target_mask [B, T]`, `example_index [B]`. With several
processes, `batch_size` is the global batch and each process gets its
`batch_size // process_count` rows of every global batch, so all processes
walk the same global order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import jax
import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PaddedSplit:
  """A whole split as padded arrays; rows in the task's example order."""

  inputs: np.ndarray  # [N, S] int32
  input_mask: np.ndarray  # [N, S] float32
  targets: np.ndarray  # [N, T] int32
  target_mask: np.ndarray  # [N, T] float32
  example_index: np.ndarray  # [N] int64
  num_truncated_inputs: int
  num_truncated_targets: int

  def __len__(self) -> int:
    return len(self.example_index)


def _pad_rows(seqs, max_len: int, pad_id: int, eos_id: int, *, keep_end: bool = False):
  """Right-pads `seqs` to `[N, max_len]`, truncating over-long ones.

  Default: keep the first `max_len - 1` tokens and EOS. `keep_end`: keep the
  last `max_len` tokens (decoder-only prompts: the most recent context and
  the template's final marker, which decoding starts from).
  """
  if max_len < 1:
    raise ValueError(f"max length must be >= 1; found {max_len}.")
  out = np.full((len(seqs), max_len), pad_id, np.int32)
  mask = np.zeros((len(seqs), max_len), np.float32)
  truncated = 0
  for i, s in enumerate(seqs):
    s = np.asarray(s, np.int32)
    if len(s) > max_len:
      truncated += 1
      if keep_end:
        s = s[len(s) - max_len :]
      else:
        # Keep EOS so the model still learns (and samplers still see) an ending.
        s = np.concatenate([s[: max_len - 1], np.asarray([eos_id], np.int32)])
    out[i, : len(s)] = s
    mask[i, : len(s)] = 1.0
  return out, mask, truncated


_WARNED: set = set()


def padded_split(task, split: str, max_input_len: int, max_target_len: int) -> PaddedSplit:
  """Pads every example of `split`; cached on the task per (split, lengths)."""
  cache = task.__dict__.setdefault("_padded_cache", {})
  key = (split, max_input_len, max_target_len)
  if key in cache:
    return cache[key]
  examples = list(task.examples(split))
  tok = task.tokenizer
  inputs, input_mask, n_in = _pad_rows(
    [e["inputs"] for e in examples],
    max_input_len,
    tok.pad_id,
    tok.eos_id,
    keep_end=not getattr(task, "input_eos", True),
  )
  targets, target_mask, n_tgt = _pad_rows(
    [e["targets"] for e in examples], max_target_len, tok.pad_id, tok.eos_id
  )
  index = np.asarray([e["example_index"] for e in examples], np.int64)
  padded = PaddedSplit(inputs, input_mask, targets, target_mask, index, n_in, n_tgt)
  if (n_in or n_tgt) and (task.name, key) not in _WARNED:
    _WARNED.add((task.name, key))
    log.warning(
      "Task %r split %r: truncated %d of %d inputs to %d tokens and %d targets to %d "
      "tokens (EOS kept; prompts without EOS keep their end).",
      task.name,
      split,
      n_in,
      len(index),
      max_input_len,
      n_tgt,
      max_target_len,
    )
  cache[key] = padded
  return padded


def _epoch_order(n: int, epoch: int, shuffle_seed: int | None) -> np.ndarray:
  if shuffle_seed is None:
    return np.arange(n)
  return np.random.default_rng([shuffle_seed, epoch]).permutation(n)


def num_batches(
  task, split: str, batch_size: int, *, repeat: bool = False, drop_remainder: bool | None = None
) -> int:
  """Batches in one epoch of `split` (as `batches` counts them)."""
  n = task.num_examples(split)
  drop = repeat if drop_remainder is None else drop_remainder
  return n // batch_size if drop else -(-n // batch_size)


def batches(
  task,
  split: str,
  batch_size: int,
  max_input_len: int,
  max_target_len: int,
  *,
  shuffle_seed: int | None = None,
  repeat: bool = False,
  drop_remainder: bool | None = None,
  start_batch: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields batch dicts of static shape `[batch_size // process_count, ...]`.

  Args:
    shuffle_seed: None keeps the task's order; an int reshuffles every epoch
      (epoch e uses the seed `[shuffle_seed, e]`).
    repeat: loop over epochs forever (training).
    drop_remainder: drop a last partial batch; defaults to `repeat`. When kept,
      the last batch is filled with rows of `example_index = -1` and zero
      masks, so every batch has the same shape.
    start_batch: global batch counter to resume from (the number of batches
      already consumed); batch k of the stream is the same whatever the start.
    process_index, process_count: this process's share of each global batch.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be divisible by process_count={process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  data = padded_split(task, split, max_input_len, max_target_len)
  n = len(data)
  drop = repeat if drop_remainder is None else drop_remainder
  per_epoch = n // batch_size if drop else -(-n // batch_size)
  if per_epoch == 0:
    raise ValueError(
      f"Task {task.name!r} split {split!r} has {n} examples, fewer than batch_size="
      f"{batch_size} with drop_remainder; use a smaller batch."
    )
  local = batch_size // process_count
  lo = process_index * local
  epoch, k = divmod(start_batch, per_epoch)
  while repeat or epoch == 0:
    order = _epoch_order(n, epoch, shuffle_seed)
    for b in range(k, per_epoch):
      rows = order[b * batch_size : (b + 1) * batch_size][lo : lo + local]
      yield _take(data, rows, local, task.tokenizer.pad_id)
    k = 0
    epoch += 1


def _take(data: PaddedSplit, rows: np.ndarray, size: int, pad_id: int) -> dict[str, np.ndarray]:
  fill = size - len(rows)
  batch = {
    "inputs": data.inputs[rows],
    "input_mask": data.input_mask[rows],
    "targets": data.targets[rows],
    "target_mask": data.target_mask[rows],
    "example_index": data.example_index[rows],
  }
  if fill:
    # Filler rows repeat the first row's source (so every model, decoder-only
    # included, sees a valid prompt) with zero target mask and index -1, so
    # losses and metrics ignore them.
    def pad(x, value):
      return np.concatenate([x, np.full((fill, *x.shape[1:]), value, x.dtype)])

    first = rows[:1] if len(rows) else np.zeros(1, np.int64)

    def repeat_first(x, full):
      return np.concatenate([x, np.repeat(full[first], fill, axis=0)])

    batch = {
      "inputs": repeat_first(batch["inputs"], data.inputs),
      "input_mask": repeat_first(batch["input_mask"], data.input_mask),
      "targets": pad(batch["targets"], pad_id),
      "target_mask": pad(batch["target_mask"], 0),
      "example_index": pad(batch["example_index"], -1),
    }
  return batch


def ground_truth_data_fn(config, task, split: str):
  """position -> this process's repeating, shuffled batches of `split` (`train_loop`'s `data_fn`).

  Batch size, lengths and seed from `config.train`; the position is
  `{"batches": n}`.
  """
  tc = config.train

  def data_fn(position):
    return batches(
      task,
      split,
      tc.batch_size,
      tc.max_input_len,
      tc.max_target_len,
      shuffle_seed=tc.seed,
      repeat=True,
      start_batch=int((position or {}).get("batches", 0)),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )

  data_fn.identity = {"task": config.task, "split": split}  # part of the run identity
  return data_fn

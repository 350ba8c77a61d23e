"""The optimizer: clipped AdamW or Adafactor on a warmup-then-linear-decay schedule.

`make_optimizer(config.train)`; embeddings optionally frozen
(`train.freeze_embeddings`).
"""

from __future__ import annotations

import math

import jax
import optax


def learning_rate_schedule(tc) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then linear decay to 0."""
  warmup = max(int(tc.warmup_steps), 0)
  total = max(int(tc.num_train_steps), warmup + 1)
  up = optax.linear_schedule(0.0, tc.learning_rate, max(warmup, 1))
  down = optax.linear_schedule(tc.learning_rate, 0.0, total - warmup)
  if warmup == 0:
    return down
  return optax.join_schedules([up, down], [warmup])


def _is_embedding(path) -> bool:
  keys = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
  return bool(keys & {"embed", "positions"})


def make_optimizer(tc) -> optax.GradientTransformation:
  """Clip-by-global-norm + AdamW or Adafactor (`tc.optimizer`), embeddings optionally frozen."""
  schedule = learning_rate_schedule(tc)
  if tc.optimizer == "adamw":
    opt = optax.adamw(
      schedule, b1=tc.adam_b1, b2=tc.adam_b2, eps=tc.adam_eps, weight_decay=tc.weight_decay
    )
  elif tc.optimizer == "adafactor":
    # The original EN-RO runs: Adafactor(scale_parameter=False, relative_step=False).
    opt = optax.adafactor(
      learning_rate=schedule, multiply_by_parameter_scale=False, weight_decay_rate=None
    )
  else:
    raise ValueError(f"train.optimizer: expected 'adamw' or 'adafactor', found {tc.optimizer!r}")
  tx = optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), opt)
  if tc.freeze_embeddings:

    def labels(params):
      return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _is_embedding(path) else "train", params
      )

    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


def steps_for_epochs(num_examples: int, batch_size: int, epochs: float) -> int:
  """Optimizer steps in `epochs` passes over `num_examples` (the original's epoch counts)."""
  return max(1, math.ceil(num_examples / batch_size * epochs))

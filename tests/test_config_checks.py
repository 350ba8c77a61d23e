"""Config values checked at the door, each error naming its key."""

import os
import subprocess
import sys

import pytest

from fdistill_jax import config_checks, main, models
from tests import _train_helpers as h

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "section,field,value,expected",
  [
    ("train", "grad_accum_steps", 0, "an integer >= 1"),
    ("train", "batch_size", 0, "an integer >= 1"),
    ("train", "batch_size", -4, "an integer >= 1"),
    ("train", "num_train_steps", -5, "an integer >= 1"),
    ("train", "num_train_steps", 0, "an integer >= 1"),
    ("train", "warmup_steps", -1, "an integer >= 0"),
    ("train", "log_every_steps", 0, "an integer >= 1"),
    ("objective", "temperature", -1.0, "a number > 0"),
    ("objective", "temperature", 0.0, "a number > 0"),
    ("sampler", "temperature", -0.5, "a number > 0"),
    ("sampler", "top_p", 1.5, "a number in (0, 1]"),
  ],
)
def test_out_of_range_values_name_the_key(section, field, value, expected):
  c = h.config("js")
  c[section][field] = value
  want = f"config.{section}.{field}: expected {expected}, found {value!r}"
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.check(c, "distill")
  assert str(e.value) == want
  # The trainer's own entry point runs the same checks, before anything compiles.
  with pytest.raises(config_checks.ConfigError, match=f"config.{section}.{field}"):
    main.check_config(c, models.ModelConfig.from_config(c.student.model))


def test_zero_steps_are_refused_in_the_pipeline_and_the_teacher_pass():
  from configs import default

  c = default.get_config()
  c.pipeline.distill_steps = 0
  with pytest.raises(config_checks.ConfigError, match="config.pipeline.distill_steps"):
    config_checks.check(c, "pipeline")
  c = default.get_config()
  c.teacher_pass.batch_size = -1
  with pytest.raises(config_checks.ConfigError, match="config.teacher_pass.batch_size"):
    config_checks.check(c, "teacher_pass")


def test_the_shipped_configs_pass():
  from configs import default, distill, teacher_pass, train_teacher

  config_checks.check(default.get_config(), "pipeline")
  config_checks.check(distill.get_config("kl"), "distill")
  config_checks.check(train_teacher.get_config(), "train_teacher")
  config_checks.check(teacher_pass.get_config(), "teacher_pass")


@pytest.mark.parametrize(
  "data,fsdp,batch,ok", [(8, 1, 4, False), (4, 2, 12, False), (4, 2, 16, True)]
)
def test_global_batch_must_split_over_the_data_parallel_devices(data, fsdp, batch, ok):
  # conftest gives 8 fake CPU devices; the mesh's -1 takes what the others leave.
  c = h.config("js", batch_size=batch)
  c.mesh.update(dict(data=-1, fsdp=fsdp, model=8 // (data * fsdp)))
  if ok:
    config_checks.check(c, "distill")
    return
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.check(c, "distill")
  assert str(e.value) == (
    f"config.train.batch_size: expected a multiple of the {data * fsdp} data-parallel "
    f"devices (config.mesh data x fsdp), found {batch}"
  )


def test_unknown_override_names_the_key_and_the_known_ones():
  argv = ["prog", "--config=configs/distill.py:kl", "--config.train.nope=3", "--mode=distill"]
  message = config_checks.explain_unknown_override(argv)
  assert message.startswith("--config.train.nope: unknown config key 'train.nope'; config.train")
  assert "'batch_size'" in message and "'grad_accum_steps'" in message
  argv = ["prog", "--config=configs/distill.py:kl", "--config.trian.batch_size=3"]
  message = config_checks.explain_unknown_override(argv)
  assert "unknown config key 'trian'; config has the keys [" in message and "'train'" in message
  assert config_checks.explain_unknown_override(["prog", "--config=configs/distill.py"]) is None


def _main(*args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-m", "fdistill_jax.main", *args]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_command_line_refuses_unknown_keys_and_bad_values(tmp_path):
  done = _main("--config=configs/distill.py:kl", "--config.train.nope=1", f"--workdir={tmp_path}")
  assert done.returncode != 0
  assert "unknown config key 'train.nope'; config.train has the keys [" in done.stderr
  done = _main(
    "--config=configs/distill.py:kl",
    "--config.train.grad_accum_steps=0",
    f"--workdir={tmp_path}",
    "--mode=distill",
  )
  assert done.returncode != 0
  assert "config.train.grad_accum_steps: expected an integer >= 1, found 0" in done.stderr
  assert not os.path.exists(tmp_path / "checkpoints")

"""config.student.init: distil mode builds the student from chosen teacher layers."""

import ml_collections
import numpy as np
from flax import nnx

from configs import distill
from fdistill_jax import checkpoints, main, models, train
from fdistill_jax.models import presets


def test_student_init_copies_teacher_layers(tmp_path, monkeypatch):
  teacher = models.build_model(presets.get_preset("t5-tiny", vocab_size=128), rngs=1)
  captured = {}
  monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: (teacher, {}))

  def no_training(config, workdir, *, student, **kw):
    captured["s"] = student
    return {"step": 0, "preempted": False}

  monkeypatch.setattr(train, "train_loop", no_training)
  config = distill.get_config("mle")
  config.unlock()
  config.student.model = presets.get_preset(
    "t5-tiny", vocab_size=128, num_layers=1, num_encoder_layers=1
  )
  config.student.init = ml_collections.ConfigDict(dict(encoder_layers=[1], decoder_layers=[0]))
  config.train.eval_every_steps = 0
  main.run_distill(config, str(tmp_path))
  student = captured["s"]
  assert student.config.num_layers == 1
  s_state = nnx.state(student, nnx.Param).flat_state()
  t_state = dict(nnx.state(teacher, nnx.Param).flat_state())
  shared = [k for k, _ in s_state if k in t_state and "layers" not in "/".join(map(str, k))]
  assert shared  # embeddings copied
  for k, v in s_state:
    if k in t_state and "layers" not in "/".join(map(str, k)):
      np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(t_state[k].get_value()))

"""The main job plus a JS(beta) sweep: the precision-coverage frontier.

  python -m fdistill_jax.main --config=configs/frontier.py --workdir=workdir

Run after (or instead of) the main job in the same workdir: the teacher,
teacher records, initial student and every method of `configs/default.py`
are reused, and JS is distilled at each beta below for every seed (beta is
the student's weight in m = (1 - beta) p + beta q: small beta is RKL-like,
large beta KL-like), and the student ceiling is trained (the student
architecture trained exactly like the teacher: MLE on the ground truth from
scratch, the teacher's batch and learning rate, for 2.5x `teacher_steps` so
that a gap to the teacher is one of capacity, not of budget) and evaluated
per seed. results.md/json and
frontier.png then hold all of them. Hardware and time: a 2-core CPU; 15 more
students and the ceiling (CPU seconds of the measured run in README).
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config(arg)
  config.pipeline.js_betas = (0.1, 0.3, 0.5, 0.7, 0.9)  # js-b<beta> students, every seed
  # The student ceiling: the student architecture trained exactly like the teacher.
  config.pipeline.ceiling_steps = int(2.5 * config.pipeline.teacher_steps)
  return config

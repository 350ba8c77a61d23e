"""Objectives against an independent float64 numpy transcription of the reference §9 formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill_jax import divergences, metrics, objectives, terms
from fdistill_jax.divergences import TeacherTopK

B, T, V = 3, 5, 7


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_mean(rows, mask):
  return (rows * mask).sum() / mask.sum()


def _np_rows(kind, s, t, tokens=None, beta=0.5):
  """Per-position §9 quantities `[B, T]` from student/teacher logits (float64)."""
  lq, lp = _np_log_softmax(s), _np_log_softmax(t)
  q, p = np.exp(lq), np.exp(lp)
  m = beta * q + (1 - beta) * p
  if kind == "kl":
    return (p * (lp - lq)).sum(-1)
  if kind == "rkl":
    return (q * (lq - lp)).sum(-1)
  if kind == "js_s":
    return (q * (lq - np.log(m))).sum(-1)
  if kind == "js_t":
    return (p * (lp - np.log(m))).sum(-1)
  if kind == "tvd":
    return 0.5 * np.abs(q - p).sum(-1)
  if kind == "eng":
    return -(q * lp).sum(-1)
  if kind == "nll":
    return -np.take_along_axis(lq, tokens[..., None], -1)[..., 0]
  if kind == "hellinger":
    return ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(-1)
  raise ValueError(kind)


def _source(seed, hidden=False):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(B, T, V)) * 2
  t = rng.normal(size=(B, T, V)) * 2
  tokens = rng.integers(0, V, size=(B, T))
  lengths = rng.integers(1, T + 1, size=B)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
  out = dict(s=s, t=t, tokens=tokens, mask=mask)
  if hidden:
    out["sh"] = [rng.normal(size=(B, T, 4)) for _ in range(2)]
    out["th"] = [rng.normal(size=(B, T, 4)) for _ in range(3)]
  return out


def _jax_source(d, teacher=True):
  return terms.Source(
    tokens=jnp.asarray(d["tokens"]),
    mask=jnp.asarray(d["mask"], jnp.float32),
    student_logits=jnp.asarray(d["s"], jnp.float32),
    teacher_logits=jnp.asarray(d["t"], jnp.float32) if teacher else None,
    student_hidden=tuple(jnp.asarray(h, jnp.float32) for h in d["sh"]) if "sh" in d else None,
    teacher_hidden=tuple(jnp.asarray(h, jnp.float32) for h in d["th"]) if "th" in d else None,
  )


def _expected(name, srcs, beta=0.85, alpha=(0.8, 0.2, 3.0), layer_map=(0, 2)):
  te, st, gt = srcs.get("teacher"), srcs.get("student"), srcs.get("ground_truth")
  if name == "kl":
    return _np_mean(_np_rows("kl", te["s"], te["t"]), te["mask"])
  if name == "rkl":
    return _np_mean(_np_rows("rkl", st["s"], st["t"]), st["mask"])
  if name == "js":
    s_part = _np_mean(_np_rows("js_s", st["s"], st["t"], beta=beta), st["mask"])
    t_part = _np_mean(_np_rows("js_t", te["s"], te["t"], beta=beta), te["mask"])
    return beta * s_part + (1 - beta) * t_part
  if name == "tvd":
    return 0.5 * _np_mean(_np_rows("tvd", st["s"], st["t"]), st["mask"]) + 0.5 * _np_mean(
      _np_rows("tvd", te["s"], te["t"]), te["mask"]
    )
  if name == "fdiv":  # hellinger, student weight 0.3
    return 0.3 * _np_mean(_np_rows("hellinger", st["s"], st["t"]), st["mask"]) + 0.7 * _np_mean(
      _np_rows("hellinger", te["s"], te["t"]), te["mask"]
    )
  if name == "seqkd":
    return _np_mean(_np_rows("nll", te["s"], te["t"], te["tokens"]), te["mask"])
  if name == "engine":
    return _np_mean(_np_rows("eng", st["s"], st["t"]), st["mask"])
  if name == "mle":
    return _np_mean(_np_rows("nll", gt["s"], gt["t"], gt["tokens"]), gt["mask"])
  if name == "kd":
    return _np_mean(_np_rows("kl", gt["s"], gt["t"]), gt["mask"])
  if name == "predistill":
    kd = _np_mean(_np_rows("kl", gt["s"], gt["t"]), gt["mask"])
    nll = _np_mean(_np_rows("nll", gt["s"], gt["t"], gt["tokens"]), gt["mask"])
    mse = sum(
      _np_mean(((gt["sh"][i] - gt["th"][j]) ** 2).mean(-1), gt["mask"])
      for i, j in enumerate(layer_map)
    )
    return alpha[0] * kd + alpha[1] * nll + alpha[2] * mse
  raise ValueError(name)


CONFIGS = {
  "kl": dict(name="kl"),
  "rkl": dict(name="rkl"),
  "js": dict(name="js", beta=0.85),
  "tvd": dict(name="tvd"),
  "fdiv": dict(name="fdiv", divergence="hellinger", student_weight=0.3),
  "seqkd": dict(name="seqkd"),
  "engine": dict(name="engine"),
  "mle": dict(name="mle"),
  "kd": dict(name="kd"),
  "predistill": dict(name="predistill", layer_map=(0, 2)),
}


def _all_sources():
  return {
    "teacher": _source(1),
    "student": _source(2),
    "ground_truth": _source(3, hidden=True),
  }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_objective_matches_float64_reference(name):
  srcs = _all_sources()
  cfg = objectives.ObjectiveConfig.from_config(CONFIGS[name])
  loss, metrics_ = objectives.compute_loss(cfg.plan(), {k: _jax_source(v) for k, v in srcs.items()})
  np.testing.assert_allclose(float(loss), _expected(name, srcs), rtol=2e-5, atol=1e-6)
  means = metrics.metric_means(metrics_)
  assert means["loss"] == pytest.approx(float(loss))
  for source in cfg.plan().sources:
    assert means[f"{source}/tokens"] == srcs[source]["mask"].sum()


@pytest.mark.parametrize("name", ["kl", "js", "tvd"])
def test_topk_with_k_equal_v_matches_full_teacher_logits(name):
  srcs = _all_sources()
  te = srcs["teacher"]
  lp = _np_log_softmax(te["t"])
  ids = np.argsort(-lp, axis=-1)
  topk = TeacherTopK(
    jnp.asarray(np.take_along_axis(lp, ids, -1), jnp.float32), jnp.asarray(ids, jnp.int32), None
  )
  jsrcs = {k: _jax_source(v) for k, v in srcs.items()}
  jsrcs["teacher"] = _jax_source(te, teacher=False)._replace(teacher_topk=topk)
  cfg = objectives.ObjectiveConfig.from_config(CONFIGS[name])
  loss, _ = objectives.compute_loss(cfg.plan(), jsrcs)
  np.testing.assert_allclose(float(loss), _expected(name, srcs), rtol=2e-5, atol=1e-6)


def _np_exact_js_side(s, t, tokens, mask, beta, side):
  """KL(own || m_t) with m_t = w_t p_t + (1 - w_t) q_t, w_t from the prefix probabilities."""
  lq, lp = _np_log_softmax(s), _np_log_softmax(t)
  tok_q = np.take_along_axis(lq, tokens[..., None], -1)[..., 0] * mask
  tok_p = np.take_along_axis(lp, tokens[..., None], -1)[..., 0] * mask
  pre_q = np.cumsum(tok_q, -1) - tok_q
  pre_p = np.cumsum(tok_p, -1) - tok_p
  a, b = (1 - beta) * np.exp(pre_p), beta * np.exp(pre_q)
  w = (a / (a + b))[..., None]
  m = w * np.exp(lp) + (1 - w) * np.exp(lq)
  own = lp if side == "teacher" else lq
  return (np.exp(own) * (own - np.log(m))).sum(-1)


@pytest.mark.parametrize("with_topk", [False, True])
def test_exact_js_matches_prefix_weighted_reference(with_topk):
  beta = 0.25
  srcs = _all_sources()
  te, st = srcs["teacher"], srcs["student"]
  expected = beta * _np_mean(
    _np_exact_js_side(st["s"], st["t"], st["tokens"], st["mask"], beta, "student"), st["mask"]
  ) + (1 - beta) * _np_mean(
    _np_exact_js_side(te["s"], te["t"], te["tokens"], te["mask"], beta, "teacher"), te["mask"]
  )
  jsrcs = {k: _jax_source(v) for k, v in srcs.items()}
  if with_topk:
    lp = _np_log_softmax(te["t"])
    ids = np.argsort(-lp, axis=-1)
    tok_lp = np.take_along_axis(lp, te["tokens"][..., None], -1)[..., 0]
    jsrcs["teacher"] = _jax_source(te, teacher=False)._replace(
      teacher_topk=TeacherTopK(
        jnp.asarray(np.take_along_axis(lp, ids, -1), jnp.float32), jnp.asarray(ids), None
      ),
      teacher_token_logprobs=jnp.asarray(tok_lp, jnp.float32),
    )
  cfg = objectives.ObjectiveConfig(name="js", beta=beta, exact_js=True)
  loss, _ = objectives.compute_loss(cfg.plan(), jsrcs)
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5, atol=1e-6)


def _pad(d, extra_t, extra_b, seed):
  """The same source with `extra_t` masked positions and `extra_b` masked rows of noise."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, value in d.items():
    if key in ("sh", "th"):
      out[key] = [_pad_array(h, extra_t, extra_b, rng) for h in value]
    else:
      out[key] = _pad_array(value, extra_t, extra_b, rng, zero=key == "mask")
  return out


def _pad_array(x, extra_t, extra_b, rng, zero=False):
  def noise(shape):
    if zero:
      return np.zeros(shape)
    if x.dtype.kind == "i":
      return rng.integers(0, V, size=shape)
    return rng.normal(size=shape) * 5

  x = np.concatenate([x, noise((x.shape[0], extra_t) + x.shape[2:])], axis=1)
  return np.concatenate([x, noise((extra_b,) + x.shape[1:])], axis=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padding_and_masked_rows_do_not_change_the_loss(name):
  srcs = _all_sources()
  padded = {k: _pad(v, 3, 2, seed=i) for i, (k, v) in enumerate(srcs.items())}
  cfg = objectives.ObjectiveConfig.from_config(CONFIGS[name])
  a, _ = objectives.compute_loss(cfg.plan(), {k: _jax_source(v) for k, v in srcs.items()})
  b, _ = objectives.compute_loss(cfg.plan(), {k: _jax_source(v) for k, v in padded.items()})
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_are_finite_and_never_reach_the_teacher(name):
  srcs = {k: _jax_source(v) for k, v in _all_sources().items()}
  # Extreme logits: saturated softmaxes must not produce NaN/Inf gradients.
  srcs = {
    k: s._replace(student_logits=s.student_logits * 300.0, teacher_logits=s.teacher_logits * 300.0)
    for k, s in srcs.items()
  }
  cfg = objectives.ObjectiveConfig.from_config(CONFIGS[name])

  def loss_fn(student, teacher):
    mixed = {
      k: s._replace(student_logits=student[k], teacher_logits=teacher[k]) for k, s in srcs.items()
    }
    return objectives.compute_loss(cfg.plan(), mixed)[0]

  student = {k: s.student_logits for k, s in srcs.items()}
  teacher = {k: s.teacher_logits for k, s in srcs.items()}
  g_student, g_teacher = jax.grad(loss_fn, argnums=(0, 1))(student, teacher)
  chex.assert_tree_all_finite(g_student)
  for g in jax.tree.leaves(g_teacher):
    assert float(jnp.abs(g).max()) == 0.0
  used = cfg.plan().sources
  assert any(float(jnp.abs(g_student[k]).max()) > 0 for k in used)


def test_jit_gives_the_same_value():
  srcs = {k: _jax_source(v) for k, v in _all_sources().items()}
  cfg = objectives.ObjectiveConfig(name="js", beta=0.85)
  eager, _ = objectives.compute_loss(cfg.plan(), srcs)
  jitted, _ = jax.jit(lambda s: objectives.compute_loss(cfg.plan(), s))(srcs)
  np.testing.assert_allclose(float(eager), float(jitted), rtol=1e-6)


def test_plan_says_when_the_teacher_model_is_needed():
  def plan(name, **kw):
    return objectives.ObjectiveConfig(name=name, **kw).plan()

  assert not plan("kl").teacher_model
  assert plan("kl", use_teacher_topk=False).teacher_model
  assert not plan("seqkd", use_teacher_topk=False).teacher_model
  assert not plan("mle", use_teacher_topk=False).teacher_model
  for name in ("rkl", "js", "tvd", "fdiv", "engine", "kd", "predistill"):
    assert plan(name).teacher_model, name
  assert plan("engine").decoding == "greedy"
  assert plan("js").decoding == "sampler"
  assert plan("kl").decoding is None


@pytest.mark.parametrize(
  "cfg, message",
  [
    (dict(name="nope"), "objective.name"),
    (dict(name="js", beta=1.0), "objective.beta"),
    (dict(name="fdiv", divergence="nope"), "unknown divergence"),
    (dict(name="kl", bogus=1), "unknown keys"),
  ],
)
def test_bad_configs_raise_clear_messages(cfg, message):
  with pytest.raises(ValueError, match=message):
    objectives.ObjectiveConfig.from_config(cfg)


def test_missing_source_raises():
  with pytest.raises(ValueError, match="needs the 'student' source"):
    objectives.compute_loss(
      objectives.ObjectiveConfig(name="rkl").plan(), {"teacher": _jax_source(_source(0))}
    )


def test_default_layer_map_spreads_evenly():
  assert terms.default_layer_map(3, 12) == (0, 6, 11)  # HF's LAYERS_TO_COPY[12][3]
  assert terms.default_layer_map(1, 12) == (11,)
  assert terms.default_layer_map(4, 4) == (0, 1, 2, 3)


@pytest.mark.parametrize("name", sorted(CONFIGS) + ["fdiv_js"])
def test_fused_forms_describe_the_same_loss(name):
  config = dict(name="fdiv", divergence="js") if name == "fdiv_js" else CONFIGS[name]
  plan = objectives.ObjectiveConfig.from_config(config).plan(fused_head=True)
  if not plan.fused:
    assert name in ("seqkd", "engine", "mle", "predistill")
    return
  srcs = {k: _jax_source(v) for k, v in _all_sources().items()}
  expected, expected_metrics = objectives.compute_loss(plan, srcs)
  total = 0.0
  for term in plan.terms:
    s = srcs[term.source]
    divergence, params = term.fused
    values = divergences.divergence(divergence, s.teacher_logits, s.student_logits, **dict(params))
    num, den = divergences.weighted_sum(values, s.mask)
    # The same metric key and value as the unfused objective reports.
    np.testing.assert_allclose(
      float(num), float(expected_metrics[f"{term.source}/{term.metric}"][0]), rtol=1e-5
    )
    total += term.weight * float(num) / float(den)
  np.testing.assert_allclose(total, float(expected), rtol=1e-5)


def test_exact_js_has_no_fused_form():
  cfg = objectives.ObjectiveConfig.from_config(dict(name="js", exact_js=True))
  assert not cfg.plan(fused_head=True).fused


def test_fdiv_js_is_the_full_js_divergence_on_both_sources():
  # fdiv with divergence "js" is the registry's two-sided JS(beta) on every
  # source, not the js objective's one-sided terms.
  srcs = _all_sources()
  cfg = objectives.ObjectiveConfig.from_config(
    dict(name="fdiv", divergence="js", divergence_params={"beta": 0.3}, student_weight=0.4)
  )
  loss, _ = objectives.compute_loss(cfg.plan(), {k: _jax_source(v) for k, v in srcs.items()})
  parts = []
  for side in ("student", "teacher"):
    d = srcs[side]
    js = 0.3 * _np_rows("js_s", d["s"], d["t"], beta=0.3) + 0.7 * _np_rows(
      "js_t", d["s"], d["t"], beta=0.3
    )
    parts.append(_np_mean(js, d["mask"]))
  np.testing.assert_allclose(float(loss), 0.4 * parts[0] + 0.6 * parts[1], rtol=2e-5)


def test_every_declared_objective_has_a_reference_config():
  assert sorted(CONFIGS) == sorted(objectives.OBJECTIVES)


@pytest.mark.parametrize("name", sorted(objectives.OBJECTIVES))
def test_every_objective_runs_unfused_and_fused_or_is_declared_unfusable(name):
  """Both loss forms come from the plan's terms: equal on the same rows."""
  plan = objectives.ObjectiveConfig.from_config(CONFIGS[name]).plan(fused_head=True)
  unfusable = [t for t in plan.terms if t.fused is None]
  assert plan.fused == (not unfusable)
  # A term is unfusable only for what the fused head cannot compute.
  assert all(
    t.kind in (objectives.NLL, objectives.ENGINE, objectives.HIDDEN_MSE)
    or (t.kind == objectives.JS_SIDE and plan.config.exact_js)
    for t in unfusable
  )
  if not plan.fused:
    with pytest.raises(ValueError, match="no fused form"):
      objectives.fused_loss(plan, {}, (None, 1.0), 4)
    return
  rng = np.random.default_rng(5)
  d, dt = 4, 3
  w, wt = rng.normal(size=(d, V)), rng.normal(size=(dt, V))
  logit_srcs, fused_srcs = {}, {}
  for i, source in enumerate(plan.sources):
    src = _source(10 + i)
    h, ht = rng.normal(size=(B, T, d)), rng.normal(size=(B, T, dt))
    src["s"], src["t"] = h @ w * 0.5, ht @ wt
    logit_srcs[source] = _jax_source(src)
    fused_srcs[source] = objectives.FusedSource(
      jnp.asarray(h, jnp.float32),
      jnp.asarray(src["mask"], jnp.float32),
      teacher_hidden=jnp.asarray(ht, jnp.float32),
      teacher_head=(jnp.asarray(wt, jnp.float32), 1.0),
    )
  expected, expected_metrics = objectives.compute_loss(plan, logit_srcs)
  loss, found = objectives.fused_loss(plan, fused_srcs, (jnp.asarray(w, jnp.float32), 0.5), 4)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5, atol=1e-6)
  assert sorted(found) == sorted(expected_metrics)
  for key, (total, count) in expected_metrics.items():
    np.testing.assert_allclose(float(found[key][0]), float(total), rtol=1e-5, atol=1e-6)
    assert float(found[key][1]) == float(count)


def test_objective_defaults_are_the_configs():
  from configs import distill

  found = objectives.ObjectiveConfig.from_config(distill.objective_config())
  assert found == objectives.ObjectiveConfig()

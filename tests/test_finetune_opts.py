"""Fine-tuning options: hidden-state distillation and the learning-rate schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softlm_jax as sl
from softlm_jax import losses, models, optim, run, train
from softlm_jax.tasks import lm_loss
from tests.conftest import VOCAB


def test_hidden_distillation_loss_against_numpy_and_stops_the_teacher_gradient():
  rng = np.random.default_rng(0)
  shape = (2, 5, 7)
  t = [rng.standard_normal(shape).astype(np.float32) * s for s in (1.0, 30.0, 0.1)]
  t[1][:, 0] *= 100.0  # a sink-like token: the per-token measure is blind to its scale
  s = [x + rng.standard_normal(shape).astype(np.float32) * 0.3 for x in t]
  want = np.mean([np.mean(np.sum((a - b) ** 2, -1) / np.sum(b ** 2, -1)) for a, b in zip(s, t)])
  got = losses.hidden_distillation_loss(tuple(map(jnp.asarray, s)), tuple(map(jnp.asarray, t)))
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  assert float(losses.hidden_distillation_loss(tuple(map(jnp.asarray, t)), tuple(map(jnp.asarray, t)))) == 0.0
  # the gradient flows into the student only, and matches central differences along a direction
  ts, ss = tuple(map(jnp.asarray, t)), tuple(map(jnp.asarray, s))
  g_t = jax.grad(lambda tt: losses.hidden_distillation_loss(ss, tt))(ts)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in g_t)
  g_s = jax.grad(lambda st: losses.hidden_distillation_loss(st, ts))(ss)
  d = tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in ss)
  eps = 1e-3
  f = lambda z: float(losses.hidden_distillation_loss(tuple(a + z * b for a, b in zip(ss, d)), ts))
  fd = (f(eps) - f(-eps)) / (2 * eps)
  assert sum(float(jnp.sum(a * b)) for a, b in zip(g_s, d)) == pytest.approx(fd, rel=1e-3)
  with pytest.raises(ValueError, match="as many"):
    losses.hidden_distillation_loss(ss[:2], ts)
  with pytest.raises(ValueError, match=r"\(2, 5, 7\) against teacher \(2, 5, 3\)"):
    losses.hidden_distillation_loss(ss[:1], (ts[0][..., :3],))


def test_hidden_fn_is_the_models_forward_and_distill_task_adds_it():
  model = models.load("tiny-llama", "causal_lm")
  ids = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, (2, 12)), jnp.int32)
  logits, hidden = model.hidden_fn()(model.params, ids)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model.logits(model.params, ids)), atol=1e-5)
  n_layers = model.module.config.num_hidden_layers
  assert len(hidden) == n_layers + 1 and all(h.shape == (2, 12, model.module.config.hidden_size) for h in hidden)
  teacher = model.params
  student = jax.tree.map(lambda x: x * 0.9, teacher)
  base = lambda lg, b: lm_loss(lg, b["inputs"])
  task = train.distill_task(model.logits_fn(), base_loss=base, weight=0.5, temperature=2.0,
                            hidden_fn=model.hidden_fn(), hidden_weight=3.0)
  batch = {"inputs": ids, "teacher": teacher}
  s_logits, s_hidden = model.hidden_fn()(student, ids)
  t_logits, t_hidden = model.hidden_fn()(teacher, ids)
  want = (float(base(s_logits, batch)) + 0.5 * float(sl.distillation_loss(s_logits, t_logits, temperature=2.0))
          + 3.0 * float(losses.hidden_distillation_loss(s_hidden, t_hidden)))
  assert float(task(student, batch, None)) == pytest.approx(want, rel=1e-5)
  assert float(losses.hidden_distillation_loss(s_hidden, t_hidden)) > 1e-4  # the term is really there
  assert float(task(teacher, batch, None)) == pytest.approx(float(base(t_logits, batch)), rel=1e-5)
  with pytest.raises(ValueError, match="needs hidden_fn"):
    train.distill_task(model.logits_fn(), hidden_weight=1.0)
  with pytest.raises(ValueError, match="not implemented for the Mamba"):
    m = models.load("tiny-mamba", "causal_lm")
    m.hidden_fn()(m.params, ids)


def test_hidden_distillation_pulls_the_student_states_toward_the_teachers():
  """A few Adam steps on ``hidden_weight * hidden loss`` alone lower it on held-out inputs."""
  model = models.load("tiny-llama", "causal_lm")
  rng = np.random.RandomState(1)
  teacher = model.params
  noise = lambda x: x * (1 + 0.2 * jnp.asarray(rng.standard_normal(np.shape(x)), x.dtype))
  # the blocks' weights perturbed (as a compression would), the embeddings kept
  student = jax.tree_util.tree_map_with_path(lambda p, x: noise(x) if "layers" in jax.tree_util.keystr(p) else x,
                                             teacher)
  task = train.distill_task(model.logits_fn(), weight=0.0, hidden_fn=model.hidden_fn(), hidden_weight=1.0)
  held = jnp.asarray(rng.randint(0, VOCAB, (2, 16)), jnp.int32)
  hidden_err = lambda p: float(losses.hidden_distillation_loss(model.hidden_fn()(p, held)[1],
                                                               model.hidden_fn()(teacher, held)[1]))
  tx = optax.adam(2e-4)
  state = train.init_state(student, tx)
  step = train.make_train_step(task, tx)
  before = hidden_err(student)
  for _ in range(12):
    state, _ = step(state, {"inputs": jnp.asarray(rng.randint(0, VOCAB, (4, 16)), jnp.int32), "teacher": teacher})
  after = hidden_err(state.params)
  assert after < 0.9 * before, (before, after)


def test_lr_schedule_values_against_the_formula():
  lr, steps = 2e-4, 20
  f = optim.lr_schedule(lr, steps, "cosine")
  for k in (0, 1, 7, 19):
    assert float(f(k)) == pytest.approx(lr * 0.5 * (1 + np.cos(np.pi * k / steps)), rel=1e-5)
  assert float(f(steps)) == pytest.approx(0.0, abs=1e-12)
  g = optim.lr_schedule(lr, steps, "cosine", warmup_steps=4)
  assert [float(g(k)) for k in range(4)] == pytest.approx([lr * k / 4 for k in range(4)], rel=1e-5)
  for k in (4, 10, 19):
    assert float(g(k)) == pytest.approx(lr * 0.5 * (1 + np.cos(np.pi * (k - 4) / 16)), rel=1e-5)
  c = optim.lr_schedule(lr, steps, "constant", warmup_steps=5)
  assert float(c(0)) == 0.0 and float(c(5)) == pytest.approx(lr) and float(c(19)) == pytest.approx(lr)
  with pytest.raises(ValueError, match="must be one of"):
    optim.lr_schedule(lr, steps, "linear")
  with pytest.raises(ValueError, match="warmup_steps < steps"):
    optim.lr_schedule(lr, steps, "cosine", warmup_steps=20)


def test_train_config_refuses_bad_fine_tuning_options():
  with pytest.raises(ValueError, match="TrainConfig.lr_schedule"):
    run.TrainConfig(lr_schedule="step")
  with pytest.raises(ValueError, match="TrainConfig.warmup_steps"):
    run.TrainConfig(warmup_steps=-1)
  with pytest.raises(ValueError, match="TrainConfig.distill_hidden"):
    run.TrainConfig(distill_hidden=-0.5)
  with pytest.raises(ValueError, match="needs the teacher"):
    run.TrainConfig(distill_hidden=1.0, distill=(0.0, 1.0))
  assert run.TrainConfig(distill_hidden=1.0, distill=(1.0, 2.0)).distill_hidden == 1.0

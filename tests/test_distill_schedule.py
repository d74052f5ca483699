"""Knowledge distillation during fine-tuning, and the compression ramp (compress_steps)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softlm_jax as sl
from softlm_jax import train
from tests.conftest import VOCAB, build


def test_kd_loss_zero_at_teacher_and_analytic_gradient():
  rng = np.random.default_rng(0)
  t = jnp.asarray(rng.standard_normal((3, 5, 11)) * 3, jnp.float32)
  for temp in (1.0, 2.0, 4.0):
    assert float(sl.distillation_loss(t, t, temperature=temp)) == pytest.approx(0.0, abs=1e-6)
  s = jnp.asarray(rng.standard_normal((3, 5, 11)) * 3, jnp.float32)
  temp = 2.0
  g = jax.jit(jax.grad(lambda z: sl.distillation_loss(z, t, temperature=temp)))(s)
  # d/ds T^2 KL(p_t || q_s) with q = softmax(s / T): T (q - p), averaged over the 15 positions
  q, p = jax.nn.softmax(s / temp), jax.nn.softmax(t / temp)
  np.testing.assert_allclose(g, temp * (q - p) / 15, atol=1e-6)
  # and central finite differences along a random direction
  d = jnp.asarray(rng.standard_normal(s.shape), jnp.float32)
  eps = 1e-2
  f = lambda z: float(sl.distillation_loss(z, t, temperature=temp))
  fd = (f(s + eps * d) - f(s - eps * d)) / (2 * eps)
  assert float(jnp.sum(g * d)) == pytest.approx(fd, rel=2e-3)


def test_distill_task_adds_weighted_kd_to_the_base_loss():
  model = build("llama")
  logits_fn = lambda p, ids: model(ids, params=p).logits
  ids = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, (2, 10)), jnp.int32)
  teacher = model.params
  student = jax.tree.map(lambda x: x * 0.9, teacher)
  base = lambda logits, b: optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], b["inputs"][:, 1:]).mean()
  task = train.distill_task(logits_fn, base_loss=base, weight=0.7, temperature=2.0)
  batch = {"inputs": ids, "teacher": teacher}
  got = float(task(student, batch, None))
  s_logits, t_logits = logits_fn(student, ids), logits_fn(teacher, ids)
  want = float(base(s_logits, batch)) + 0.7 * float(sl.distillation_loss(s_logits, t_logits, temperature=2.0))
  assert got == pytest.approx(want, rel=1e-5)
  # at the teacher only the base loss is left; the KD term carries no gradient into the teacher
  assert float(task(teacher, batch, None)) == pytest.approx(float(base(t_logits, batch)), rel=1e-5)
  gt = jax.grad(lambda tp: task(student, {"inputs": ids, "teacher": tp}, None))(teacher)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(gt))
  with pytest.raises(ValueError, match="temperature > 0"):
    train.distill_task(logits_fn, temperature=0.0)


def test_ramp_target_endpoints():
  assert int(sl.ramp_target(1000, 400, 0, 10)) == 940
  assert int(sl.ramp_target(1000, 400, 9, 10)) == 400
  assert int(sl.ramp_target(1000, 400, 50, 10)) == 400
  assert int(sl.ramp_target(1000, 400, 3, 0)) == 400


def run_thresholds(compress_steps, steps=60):
  """Thresholds-only SoftLM (weights frozen, distillation to the dense model) on a tiny Llama: the count
  before every update, whether the budget froze, the alphas after each update."""
  model = build("llama")
  logits_fn = lambda p, ids: model(ids, params=p).logits
  cfg = sl.CompressionConfig(target_ratio=0.5, alpha_lr=0.05, gamma=1.0, compress_steps=compress_steps,
                             normalize="uniform_rank")
  cp = sl.compress_params(model.params, cfg)
  tx = sl.make_optimizer(cfg, optax.set_to_zero())
  step_fn = train.make_train_step(train.distill_task(logits_fn), tx, cfg)
  state = train.init_state(cp, tx)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, (2, 10)), jnp.int32)
  dense = sl.dense_params(cp)
  target = sl.target_params(cp, cfg)
  counts, frozen, alphas = [], [], []
  for _ in range(steps):
    counts.append(int(sl.count_params(state.params)))
    state, m = step_fn(state, {"inputs": ids, "teacher": model.params})
    frozen.append(bool(m["frozen"]))
    alphas.append(np.asarray(sl.builtin_rules.alphas(state.params)))
  counts.append(int(sl.count_params(state.params)))
  return counts, frozen, alphas, dense, target


def test_ramp_holds_the_count_and_the_freeze_is_exact():
  n = 30
  counts, frozen, alphas, dense, target = run_thresholds(n)
  assert frozen[-1], "the budget must still be met at the end of the ramp"
  for t in range(len(frozen)):
    if frozen[t]:
      break
    ramp = int(sl.ramp_target(dense, target, t, n))
    if counts[t] <= ramp:  # held: no threshold moved, weights are frozen, so the count is unchanged
      assert counts[t + 1] == counts[t], t
      assert np.array_equal(alphas[t], alphas[t - 1]) if t > 0 else True
    # the count falls only on updates that start above the ramp: below it by at most that one update
    if counts[t + 1] < counts[t]:
      assert counts[t] > ramp, t
  first = frozen.index(True)
  assert counts[first] <= target < counts[first - 1]  # freezes on the first update at/under the target
  assert all(frozen[first:])
  for t in range(first + 1, len(alphas)):
    np.testing.assert_array_equal(alphas[t], alphas[first])
    assert counts[t + 1] <= target
  assert first >= n - 3  # the ramp reaches the target at update n - 1
  # without the ramp the same thresholds meet the budget much earlier
  counts0, frozen0, *_ = run_thresholds(0, steps=n)
  assert True in frozen0 and frozen0.index(True) < first - 5

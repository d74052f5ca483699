"""The budget rule: thresholds stop exactly when the count reaches the target, and never move again."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

import softlm_jax as sl


def toy_tree(seed=0):
  rng = np.random.RandomState(seed)
  tree = {}
  for i, (rows, cols) in enumerate([(16, 16), (16, 48), (48, 16)]):
    k = min(rows, cols)
    tree[f"layers/{i}"] = {"mlp": {
        "left": jnp.asarray(rng.normal(size=(rows, k)), jnp.float32),
        "s": jnp.asarray(np.sort(rng.uniform(0.0, 1.0, k))[::-1], jnp.float32),
        "right": jnp.asarray(rng.normal(size=(k, cols)), jnp.float32),
        "alpha": jnp.zeros((), jnp.float32), "bias": jnp.zeros(cols)}}
  return tree


def run(cfg, steps, task_weight=1.0):
  params = toy_tree()
  tx = sl.make_optimizer(cfg, optax.sgd(2e-3))
  state = tx.init(params)
  target = sl.target_params(params, cfg)

  def loss(p):
    # task term pushes every singular value up (also the pruned ones): the freeze must hold them
    task = -task_weight * sum(jnp.sum(layer["s"]) for _, layer in sl.tree.factored_layers(p))
    return task + sl.compression_loss(p, cfg)

  @jax.jit
  def step(p, st):
    g = jax.grad(loss)(p)
    u, st = tx.update(g, st, p)
    return optax.apply_updates(p, u), st

  trace = []
  for _ in range(steps):
    count_before = int(sl.count_params(params))
    alphas_before = np.asarray(sl.builtin_rules.alphas(params))
    params, state = step(params, state)
    trace.append((count_before, alphas_before, np.asarray(sl.builtin_rules.alphas(params)),
                  bool(sl.budget_state(state).frozen), int(sl.count_params(params))))
  return trace, target, state


def test_freeze_exactly_at_budget_and_sticky():
  cfg = sl.CompressionConfig(target_ratio=0.5, alpha_lr=0.05, gamma=1.0)
  trace, target, state = run(cfg, 120)
  first = next(i for i, t in enumerate(trace) if t[0] <= target)
  for i, (count_before, a_before, a_after, frozen, count_after) in enumerate(trace):
    if i < first:
      assert count_before > target and not frozen
      assert np.all(a_after > a_before), "thresholds move while over budget"
    else:
      assert frozen, "frozen from the first update whose params are within budget"
      np.testing.assert_array_equal(a_after, a_before)
      assert count_after <= target, "budget stays met while fine-tuning pushes the pruned values up"
  assert int(sl.budget_state(state).freeze_step) == first
  assert 0 < first < 100


def test_linear_loss_and_no_freeze_when_target_unreached():
  cfg = sl.CompressionConfig(target_ratio=0.99, alpha_lr=1e-3, loss="linear")
  trace, target, state = run(cfg, 5)
  assert not any(t[3] for t in trace)
  assert np.all(trace[-1][2] > trace[0][1])


def test_alpha_has_its_own_learning_rate():
  params = toy_tree()
  cfg = sl.CompressionConfig(alpha_lr=0.123, target_ratio=0.01)
  tx = sl.make_optimizer(cfg, optax.sgd(0.0))
  g = jax.tree.map(jnp.ones_like, params)
  u, _ = tx.update(g, tx.init(params), params)
  for _, layer in sl.tree.factored_layers(u):
    np.testing.assert_allclose(layer["alpha"], -0.123, rtol=1e-5)  # adam's first step = -lr * sign
    assert float(jnp.abs(layer["s"]).max()) == 0.0

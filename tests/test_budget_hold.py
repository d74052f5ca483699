"""The budget hold: one shift of every layer's margins keeps the longest run of triplets (largest margins
over all layers) whose count fits the target, at every update, for LLRC's logits and SoftLM's thresholds;
and the allocation's ranks are the hold's starting point."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softlm_jax as sl
from softlm_jax import allocate, budget, optim

SHAPES = [(16, 16), (16, 48), (48, 16), (8, 40)]  # break-even ranks 8, 12, 12, 6


def brute_fill(margins, shapes, target, min_rank):
  """The reference: every layer's ``min_rank`` largest margins first, then every other triplet in
  decreasing margin, one at a time, stopping at the first whose added cost (recounted from scratch)
  would pass the target."""
  ranks = [min(min_rank, len(m)) for m in margins]
  items = sorted(((float(v), li) for li, m in enumerate(margins) for v in np.sort(m)[::-1][ranks[li]:]),
                 key=lambda t: -t[0])

  def total(rs):
    return sum(int(budget.layer_cost(r, *s)) for r, s in zip(rs, shapes))
  kept = 0
  for _, li in items:
    trial = list(ranks)
    trial[li] += 1
    if total(trial) > target:
      break
    ranks, kept = trial, kept + 1
  return ranks, total(ranks)


@pytest.mark.parametrize("seed,frac,min_rank",
                         list(itertools.product(range(2), (0.0, 0.3, 0.6, 1.0), (0, 1, 3))))
def test_fill_shift_keeps_what_the_one_at_a_time_fill_keeps(seed, frac, min_rank):
  rng = np.random.RandomState(seed)
  margins = [rng.normal(size=min(r, c)).astype(np.float32) for r, c in SHAPES]
  margins[1] -= 3.0  # one layer far below the others: it lives on its floor at small budgets
  dense = sum(r * c for r, c in SHAPES)
  target = int(frac * dense)
  taus = np.asarray(budget.fill_shift([jnp.asarray(m) for m in margins], SHAPES, target, min_rank=min_rank))
  assert taus.shape == (len(SHAPES),)
  ranks = [int(np.sum(m - t > 0)) for m, t in zip(margins, taus)]
  want, want_count = brute_fill(margins, SHAPES, target, min_rank)
  assert ranks == want
  count = sum(int(budget.layer_cost(r, *s)) for r, s in zip(ranks, SHAPES))
  assert count == want_count
  floor = sum(int(budget.layer_cost(min_rank, *s)) for s in SHAPES)
  assert count <= max(target, floor)
  assert min(ranks) >= min_rank
  if frac == 1.0:
    assert ranks == [min(s) for s in SHAPES]  # everything fits
  if frac == 0.0:
    assert ranks == [min_rank] * len(SHAPES)


def test_fill_shift_is_jittable_and_names_bad_input():
  m = [jnp.linspace(1.0, -1.0, 16), jnp.linspace(0.5, -0.5, 16)]
  tau = jax.jit(lambda a, b: budget.fill_shift([a, b], [(16, 16), (16, 48)], 300))(*m)
  assert np.all(np.isfinite(np.asarray(tau))) and tau.shape == (2,)
  with pytest.raises(ValueError, match="one margin vector per shape"):
    budget.fill_shift(m, [(16, 16)], 10)


def training_tree(method, seed=0):
  """A training-form tree of SHAPES for ``method`` (llrc / softlm), starting at the allocation-like ranks."""
  rng = np.random.RandomState(seed)
  dense = {f"layers/{i}": {"mlp": {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)}}
           for i, s in enumerate(SHAPES)}
  dense = {"layers": {str(i): dense[f"layers/{i}"] for i in range(len(SHAPES))}}
  cfg = sl.CompressionConfig(target_ratio=0.5, method=method, mask_lr=0.05, alpha_lr=0.05)
  cparams = sl.compress_params(dense, cfg)
  ranks = {p: 3 + i for i, (p, _) in enumerate(sl.tree.factored_layers(cparams))}
  return allocate.selection_for_ranks(cparams, ranks, spacing=0.05), cfg, ranks


@pytest.mark.parametrize("method", ["llrc", "softlm"])
def test_selection_for_ranks_keeps_exactly_the_ranks(method):
  params, cfg, ranks = training_tree(method)
  got = {p: int(r) for p, r in budget.layer_ranks(params).items()}
  assert got == ranks
  for p, lay in sl.tree.factored_layers(params):  # the kept triplets are the largest values
    kept = np.asarray(budget.kept(lay))
    s = np.asarray(lay["s"])
    assert kept.sum() == 0 or s[kept].min() > s[~kept].max(initial=-np.inf)


@pytest.mark.parametrize("method", ["llrc", "softlm"])
def test_hold_keeps_the_count_at_the_target_every_update(method):
  params, cfg, _ = training_tree(method)
  target = budget.target_params(params, cfg)
  weights = None if method == "llrc" else optax.set_to_zero()
  tx = sl.make_optimizer(cfg, weights, hold=True)
  state = tx.init(params)
  rng = np.random.RandomState(1)
  # a task whose gradient favours random triplets in every layer: the cut must move, the count must not
  pulls = {p: jnp.asarray(rng.normal(size=np.shape(lay["s"])), jnp.float32) for p, lay in
           sl.tree.factored_layers(params)}

  def loss(p):
    total = 0.0
    for path, lay in sl.tree.factored_layers(p):
      total = total - jnp.sum(pulls[path] * sl.rules.rule_of(lay).scale(lay, cfg))
    return total

  @jax.jit
  def step(p, st):
    u, st = tx.update(jax.grad(loss)(p), st, p)
    return optax.apply_updates(p, u), st

  step_cost = 2 * max(r + c for r, c in SHAPES)  # one triplet; under 2 (rows + cols) at the jump to dense
  start = {p: int(r) for p, r in budget.layer_ranks(params).items()}
  changed = False
  for _ in range(40):
    params, state = step(params, state)
    count = int(budget.count_params(params))
    assert target - step_cost < count <= target
    assert int(optim.budget_state(state).count) == count
    changed |= {p: int(r) for p, r in budget.layer_ranks(params).items()} != start
  assert changed  # the ranks moved (trades at the budget), the count stayed
  bs = optim.budget_state(state)
  assert bool(bs.frozen) and int(bs.freeze_step) == 0  # fit then runs its finetune_steps


def test_hold_refuses_a_rule_without_a_margin_and_a_tree_without_a_selection():
  with pytest.raises(ValueError, match="margin and shift go together"):
    sl.rules.Rule(name="x", keys=("xk",), init=None, scale=None, kept=None, loss=None, optimizer=None,
                  margin=lambda lay: lay["xk"])
  tx = optim.budget_hold(optax.sgd(0.1), target=10)
  with pytest.raises(ValueError, match="training-form tree"):
    tx.init({"layer": {"kernel": jnp.ones((4, 4))}})


def test_global_rms_keeps_the_gradients_relative_sizes():
  g = {"a": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray([[4.0, 0.0]])}
  tx = optim.scale_by_global_rms(decay=0.5)
  u, st = tx.update(g, tx.init(g))
  rms = np.sqrt(np.mean(np.square([1.0, -2.0, 0.5, 4.0, 0.0])))
  np.testing.assert_allclose(u["a"], np.asarray(g["a"]) / rms, rtol=1e-5)  # the first step: bias-corrected
  np.testing.assert_allclose(u["b"], np.asarray(g["b"]) / rms, rtol=1e-5)
  u2, _ = tx.update(jax.tree.map(lambda x: 3 * x, g), st)
  ms = (0.25 * rms**2 + 0.5 * 9 * rms**2) / 0.75  # moving mean of squares over two steps, bias-corrected
  np.testing.assert_allclose(u2["a"], 3 * np.asarray(g["a"]) / np.sqrt(ms), rtol=1e-5)


def test_cost_scaling_moves_a_costly_layers_logits_less():
  """budget_hold(cost_scaled=True): equal gradients move each layer's logits in inverse proportion to
  its rows + cols (before the shared shift), so the fill trades evidence per counted parameter."""
  params, cfg, _ = training_tree("llrc")
  target = budget.target_params(params, cfg)
  layers = sl.tree.factored_layers(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  grads = sl.tree.map_modules(grads, lambda p, n: {**n, "mask_logits": -jnp.ones_like(n["mask_logits"])}
                              if "mask_logits" in n else n)
  moves = {}
  for scaled in (False, True):
    tx = optim.budget_hold(optax.sgd(1.0), target=target + 10**6, cost_scaled=scaled)  # everything fits
    u, _ = tx.update(grads, tx.init(params), params)
    moves[scaled] = {p: np.asarray(n["mask_logits"]) for p, n in sl.tree.factored_layers(u)}
  costs = {p: sum(budget.layer_shape(lay)) for p, lay in layers}
  mean = np.mean(list(costs.values()))
  base = layers[0][0]
  for p in costs:  # the shift is shared, so compare each layer's move with the first layer's
    unscaled = moves[False][p] - moves[False][base][0]
    scaled = moves[True][p] - moves[True][base][0]
    np.testing.assert_allclose(unscaled, 0, atol=1e-5)  # sgd(1) of equal gradients: equal moves
    np.testing.assert_allclose(scaled, mean / costs[p] - mean / costs[base], rtol=1e-4, atol=1e-5)

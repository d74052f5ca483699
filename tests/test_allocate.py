"""The loss-aware rank allocation (softlm_jax.allocate): gradients and scores against finite differences,
the exact budget fill, thresholds at the allocated ranks, and SVD-LLM V2's heuristic."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softlm_jax as sl
from softlm_jax import allocate as al
from softlm_jax import budget, svd
from softlm_jax.tasks import lm_loss
from tests.conftest import VOCAB, build


class MLP(nn.Module):
  """A small nn.Dense stack (tanh between layers); float64 parameters under ``jax.enable_x64``."""
  widths: tuple = (12, 10, 6)
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      x = nn.Dense(w, name=f"dense_{i}", param_dtype=self.param_dtype)(x)
      if i < len(self.widths) - 1:
        x = jnp.tanh(x)
    return x


MLP_CFG = sl.CompressionConfig(target_ratio=0.5, include=r"^dense_\d+/")


def mlp_setup(n_batches=3, batch=16, widths=(12, 10, 6), width_in=8):
  """(model, full-rank training-form tree, batches, loss_fn), float64: call inside jax.enable_x64."""
  model = MLP(widths=widths, param_dtype=jnp.float64)
  rng = np.random.RandomState(0)
  dense = model.init(jax.random.PRNGKey(0), jnp.zeros((1, width_in), jnp.float64))["params"]
  dense = jax.tree.map(lambda a: a * 1.5, dense)
  cp = al.full_rank(sl.compress_params(dense, MLP_CFG), MLP_CFG)
  batches = [{"x": jnp.asarray(rng.randn(batch, width_in)), "y": jnp.asarray(rng.randint(0, widths[-1], batch))}
             for _ in range(n_batches)]

  def loss_fn(p, b):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, b["x"]), b["y"]).mean()
  return model, cp, batches, loss_fn


def test_gradient_matches_central_differences_float64():
  with jax.enable_x64(True):
    _, cp, batches, loss_fn = mlp_setup()
    step = al.singular_value_grad(loss_fn, MLP_CFG)
    sv = al.singular_values(cp)
    assert all(v.dtype == jnp.float64 for v in sv.values())
    loss = jax.jit(lambda v: step(v, cp, batches[0])[0])
    _, g = step(sv, cp, batches[0])
    eps = 1e-5
    for p, s in sv.items():
      fd = np.array([(float(loss({**sv, p: s.at[i].add(eps)})) - float(loss({**sv, p: s.at[i].add(-eps)})))
                     / (2 * eps) for i in range(s.size)])
      np.testing.assert_allclose(np.asarray(g[p]), fd, rtol=1e-6, atol=1e-9 * np.max(np.abs(fd)))
      assert np.max(np.abs(fd)) > 1e-4  # the check is not vacuous


def test_single_triplet_drops_match_the_taylor_prediction():
  """Dropping triplet i (s_i -> 0) changes the loss by -g_i s_i + 0.5 H_ii s_i^2 + O(s_i^3): the true
  change (the loss evaluated with s_i = 0) against the first- and second-order predictions, for the
  triplets small enough for a Taylor expansion to hold (s_i < 0.5 of the layer's top value)."""
  with jax.enable_x64(True):
    _, cp, batches, loss_fn = mlp_setup(batch=64, widths=(48, 48, 6), width_in=48)
    step = al.singular_value_grad(loss_fn, MLP_CFG)
    sv = al.singular_values(cp)
    b = batches[0]
    loss = jax.jit(lambda v: step(v, cp, b)[0])
    hvp = jax.jit(lambda v, t: jax.jvp(lambda x: step(x, cp, b)[1], (v,), (t,))[1])
    l0, g = step(sv, cp, b)
    first_err, second_err, sizes = [], [], []
    for p, s in sv.items():
      for i in np.flatnonzero(np.asarray(s) < 0.5):
        true = float(loss({**sv, p: s.at[i].set(0.0)})) - float(l0)
        tangent = {q: jnp.zeros_like(v) if q != p else jnp.zeros_like(v).at[i].set(1.0) for q, v in sv.items()}
        h = float(hvp(sv, tangent)[p][i])
        first = -float(g[p][i] * s[i])
        second = first + 0.5 * h * float(s[i]) ** 2
        first_err.append(abs(true - first))
        second_err.append(abs(true - second))
        sizes.append(abs(true))
    first_err, second_err, sizes = map(np.asarray, (first_err, second_err, sizes))
    assert len(sizes) >= 20 and np.min(sizes) > 0
    assert np.sum(first_err) < 0.5 * np.sum(sizes)  # first order gives the size of the change
    assert np.sum(second_err) < 0.35 * np.sum(first_err)  # second order takes away most of what is left
    assert np.sum(second_err) < 0.1 * np.sum(sizes)
    assert np.mean(second_err < first_err) > 0.75


def test_stats_equal_an_independent_computation_from_finite_differences():
  """fisher, tail_fisher, grad and tail_first against per-batch central-difference gradients (numpy)."""
  with jax.enable_x64(True):
    _, cp, batches, loss_fn = mlp_setup()
    stats = al.triplet_stats(cp, MLP_CFG, loss_fn, batches, progress=False)
    sv = {p: np.asarray(v) for p, v in al.singular_values(cp).items()}
    step = al.singular_value_grad(loss_fn, MLP_CFG)
    eps = 1e-5
    per_batch = {p: [] for p in sv}
    for b in batches:
      loss = jax.jit(lambda v, b=b: step(v, cp, b)[0])
      base = {p: jnp.asarray(v) for p, v in sv.items()}
      for p, s in sv.items():
        per_batch[p].append(np.array([
            (float(loss({**base, p: jnp.asarray(s).at[i].add(eps)}))
             - float(loss({**base, p: jnp.asarray(s).at[i].add(-eps)}))) / (2 * eps) for i in range(s.size)]))
    assert stats["batches"] == len(batches)
    for p, s in sv.items():
      gb = np.stack(per_batch[p])  # (B, k)
      d = gb * s
      tails = np.stack([[d[j, r:].sum() for r in range(s.size + 1)] for j in range(len(batches))])
      st = stats["layers"][p]
      np.testing.assert_allclose(st["grad"], gb.mean(0), rtol=1e-6, atol=1e-10)
      np.testing.assert_allclose(st["fisher"], (d ** 2).mean(0), rtol=1e-5, atol=1e-14)
      np.testing.assert_allclose(st["tail_fisher"], (tails ** 2).mean(0), rtol=1e-5, atol=1e-14)
      np.testing.assert_allclose(st["tail_first"], tails.mean(0), rtol=1e-5, atol=1e-12)
      drops = {score: al.drop_losses(stats, score)[p] for score in al.SCORES}
      np.testing.assert_allclose(drops["fisher"][: s.size], 0.5 * np.cumsum(((d ** 2).mean(0))[::-1])[::-1],
                                 rtol=1e-5)
      for score, dr in drops.items():
        assert dr.shape == (s.size + 1,) and dr[-1] == 0.0 and np.all(np.diff(dr) <= 0), score


def test_llama_gradient_matches_central_differences_float32():
  """A tiny Llama with initializer_range 0.2 (logits of order one, so that float32 central differences
  resolve the gradient), next-token CE."""
  from transformers import FlaxLlamaForCausalLM, LlamaConfig
  model = FlaxLlamaForCausalLM(LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      intermediate_size=48, max_position_embeddings=64, initializer_range=0.2), seed=0)
  cfg = sl.CompressionConfig(target_ratio=0.5)
  cp = al.full_rank(sl.compress_params(model.params, cfg), cfg)
  ids = jnp.asarray(np.random.RandomState(1).randint(0, VOCAB, (2, 12)), jnp.int32)
  step = al.singular_value_grad(lambda p, b: lm_loss(model(b, params=p).logits, b), cfg)
  sv = al.singular_values(cp)
  loss = jax.jit(lambda v: step(v, cp, ids)[0])
  _, g = step(sv, cp, ids)
  eps = 1e-2
  for p in ["model/layers/0/self_attn/q_proj", "model/layers/1/self_attn/v_proj", "model/layers/1/mlp/down_proj"]:
    s = sv[p]
    idx = [0, 1, s.size // 2, s.size - 1]
    fd = np.array([(float(loss({**sv, p: s.at[i].add(eps)})) - float(loss({**sv, p: s.at[i].add(-eps)})))
                   / (2 * eps) for i in idx])
    assert np.max(np.abs(fd)) > 1e-2
    np.testing.assert_allclose(np.asarray(g[p])[idx], fd, atol=2e-3 * np.max(np.abs(fd)) + 2e-4)


def test_full_rank_is_the_dense_model():
  model = build("llama")
  cfg = sl.CompressionConfig(target_ratio=0.5)
  cp = al.full_rank(sl.compress_params(model.params, cfg), cfg)
  ids = jnp.asarray(np.random.RandomState(2).randint(0, VOCAB, (2, 12)), jnp.int32)
  with sl.intercept(cfg):
    got = model(ids, params=cp).logits
    scale = {p: sl.singular_scale(lay, cfg) for p, lay in sl.tree.factored_layers(cp)}
  for p, lay in sl.tree.factored_layers(cp):
    np.testing.assert_array_equal(np.asarray(scale[p]), np.asarray(lay["s"]))  # Th(s) == s exactly
  np.testing.assert_allclose(np.asarray(got), np.asarray(model(ids, params=model.params).logits), atol=2e-5)


# ---------------------------------------------------------------------------------------------------------
# the budget fill


@pytest.fixture(scope="module")
def llama_stats():
  model = build("llama")
  cfg = sl.CompressionConfig(target_ratio=0.5)
  factors = svd.decompose(model.params, cfg)
  cp = sl.compress_params(model.params, cfg, factors=factors)
  rng = np.random.RandomState(0)
  batches = [jnp.asarray(rng.randint(0, VOCAB, (2, 12)), jnp.int32) for _ in range(3)]
  stats = al.triplet_stats(cp, cfg, lambda p, b: lm_loss(model(b, params=p).logits, b), batches, progress=False)
  return model, factors, stats


@pytest.mark.parametrize("cr", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("min_rank", [0, 1])
def test_allocation_meets_the_budget_exactly(llama_stats, cr, min_rank):
  model, factors, stats = llama_stats
  cfg = sl.CompressionConfig(target_ratio=cr)
  cp = sl.compress_params(model.params, cfg, factors=factors)
  target = budget.target_params(cp, cfg)
  shapes = al.layer_shapes(cp)
  for score in al.SCORES:
    ranks = al.allocate_ranks(cp, cfg, al.drop_losses(stats, score), min_rank=min_rank)
    trained = al.alpha_for_ranks(cp, ranks)
    count = int(budget.count_params(trained))
    assert count <= target, (score, count, target)
    # no layer's next option (one more triplet, or the jump to dense) fits the rest of the budget
    nxt = al.next_step_costs(shapes, ranks, min_rank=min_rank)
    assert all(c > target - count for c in nxt.values()), (score, target - count, min(nxt.values()))
    for p, r in ranks.items():
      rows, cols, k = shapes[p]
      assert min(min_rank, k) <= r <= k
      assert r < budget.break_even_rank(rows, cols) or r == k  # dominated ranks never chosen
    exported = sl.export_params(trained, cfg)
    assert int(budget.count_params(exported, cfg)) == count
    assert int(budget.count_params(al.allocated_static(model.params, cfg, factors, ranks), cfg)) == count


def test_the_layer_that_matters_100x_gets_its_ranks():
  """y = 10 A(x) + B(x), A and B the same kernel ``K = U diag(s) V^T`` with a flat spectrum, whitened
  inputs (``X^T X = N I``) and a target leaving the residual ``c X K``: every triplet's gradient is
  ``prop. s_i`` and A's are exactly 10x B's, so A's Fisher scores are 100x B's. At CR 0.5 (target 256 of
  512; break-even rank 8) A gets every factored rank the budget allows, and with ``min_rank=0`` its
  full rank (kept dense by export); uniform would give 4 and 4."""

  class Two(nn.Module):
    scale_a: float = 10.0

    @nn.compact
    def __call__(self, x):
      return self.scale_a * nn.Dense(16, name="a")(x) + nn.Dense(16, name="b")(x)

  cfg = sl.CompressionConfig(target_ratio=0.5, include=r"^(a|b)/")
  rng = np.random.RandomState(0)
  n = 64
  x = np.sqrt(n) * np.linalg.qr(rng.randn(n, 16))[0]
  u, _ = np.linalg.qr(rng.randn(16, 16))
  v, _ = np.linalg.qr(rng.randn(16, 16))
  kernel = (u * np.linspace(1.0, 0.8, 16)) @ v.T
  for scaled, other in (("a", "b"), ("b", "a")):
    model = Two(scale_a=10.0 if scaled == "a" else 0.1)
    dense = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16)))["params"]
    dense = {name: {"kernel": jnp.asarray(kernel, jnp.float32), "bias": dense[name]["bias"]} for name in dense}
    y = model.apply({"params": dense}, jnp.asarray(x, jnp.float32))
    batch = {"x": jnp.asarray(x, jnp.float32), "t": y - 0.5 * jnp.asarray(x @ kernel, jnp.float32)}
    cp = sl.compress_params(dense, cfg)

    def loss_fn(p, b):
      return jnp.mean((model.apply({"params": p}, b["x"]) - b["t"]) ** 2)
    stats = al.triplet_stats(cp, cfg, loss_fn, [batch], progress=False)
    fa, fb = stats["layers"][scaled]["fisher"], stats["layers"][other]["fisher"]
    np.testing.assert_allclose(fa, 100 * fb, rtol=1e-3)
    for score in al.SCORES:
      ranks = al.allocate_ranks(cp, cfg, al.drop_losses(stats, score))
      assert ranks == {scaled: 7, other: 1}, (score, ranks)
      assert budget.count_params(al.alpha_for_ranks(cp, ranks)) == 256
    ranks = al.allocate_ranks(cp, cfg, al.drop_losses(stats), min_rank=0)
    assert ranks == {scaled: 16, other: 0}
    assert budget.count_params(sl.export_params(al.alpha_for_ranks(cp, ranks), cfg), cfg) == 256
  assert sl.static_ranks(dense, cfg) == {"a": 4, "b": 4}


def test_fill_is_optimal_for_convex_drops_and_equal_costs():
  """Concave gains and one cost per triplet: the best allocation takes the largest gains; the fill must
  find the brute-force optimum."""
  rng = np.random.RandomState(0)
  for trial in range(20):
    k = 5
    shapes = {f"l{i}": (40, 40, k) for i in range(3)}  # break-even 20 > k: every rank costs 80 r
    drops = {}
    for p in shapes:
      gains = np.sort(rng.exponential(1.0, k))[::-1] * rng.uniform(0.1, 10)  # decreasing gains: convex drops
      drops[p] = np.concatenate([np.cumsum(gains[::-1])[::-1], [0.0]])
    target = int(rng.randint(3, 15) * 80 + rng.randint(0, 80))
    got = al.fill_budget(shapes, drops, target, min_rank=1)
    best = min((sum(drops[p][r] for p, r in zip(shapes, rs)), rs)
               for rs in itertools.product(range(1, k + 1), repeat=3) if sum(rs) * 80 <= target)
    assert sum(got.values()) * 80 <= target
    np.testing.assert_allclose(sum(drops[p][r] for p, r in got.items()), best[0], rtol=1e-12)


def test_fill_errors_name_the_problem(llama_stats):
  model, factors, stats = llama_stats
  cfg = sl.CompressionConfig(target_ratio=0.97)
  cp = sl.compress_params(model.params, cfg, factors=factors)
  with pytest.raises(ValueError, match=r"min_rank=4\).* over the target"):
    al.allocate_ranks(cp, cfg, al.drop_losses(stats), min_rank=4)
  drops = al.drop_losses(stats)
  drops.pop("model/layers/1/mlp/up_proj")
  with pytest.raises(ValueError, match="no drop losses.*layers/1/mlp/up_proj"):
    al.allocate_ranks(cp, cfg, drops)
  bad = dict(al.drop_losses(stats))
  bad["model/layers/0/mlp/up_proj"] = bad["model/layers/0/mlp/up_proj"][:-1]
  with pytest.raises(ValueError, match="layer 'model/layers/0/mlp/up_proj': drop losses have shape"):
    al.allocate_ranks(cp, cfg, bad)
  llrc = sl.compress_params(model.params, cfg.replace(method="llrc"), factors=factors)
  with pytest.raises(ValueError, match="layer 'model/layers/0/self_attn/q_proj'.*method='softlm'"):
    al.triplet_stats(llrc, cfg, lambda p, b: 0.0, [0], progress=False)
  with pytest.raises(ValueError, match="no calibration batches"):
    al.triplet_stats(cp, cfg, lambda p, b: 0.0, [], progress=False)
  with pytest.raises(ValueError, match="unknown score"):
    al.drop_losses(stats, "energy")


# ---------------------------------------------------------------------------------------------------------
# thresholds at the ranks, the static-like method


@pytest.mark.parametrize("where", [0.0, 0.5, 0.9])
def test_alpha_for_ranks_gives_exactly_the_ranks(where):
  model = build("llama")
  cfg = sl.CompressionConfig(target_ratio=0.5, normalize="uniform_rank")
  cp = sl.compress_params(model.params, cfg)
  rng = np.random.RandomState(3)
  shapes = al.layer_shapes(cp)
  ranks = {p: int(rng.randint(0, k + 1)) for p, (_, _, k) in shapes.items()}
  first = next(iter(ranks))
  ranks[first], ranks["model/layers/1/mlp/up_proj"] = 0, shapes["model/layers/1/mlp/up_proj"][2]
  out = al.alpha_for_ranks(cp, ranks, where=where)
  assert {p: int(r) for p, r in budget.layer_ranks(out).items()} == ranks
  exported = sl.export_params(out, cfg)
  assert int(budget.count_params(exported, cfg)) == int(budget.count_params(out))
  for p, lay in sl.tree.factored_layers(out):  # kept = the r largest: a prefix of the spectrum
    kept = np.asarray(budget.kept(lay))
    assert not kept[ranks[p]:].any() and kept[:ranks[p]].all()
  if where == 0.0:  # at the first dropped value: the uniform allocation is alpha = 1 everywhere
    uni = al.alpha_for_ranks(cp, sl.static_ranks(model.params, cfg), where=0.0)
    np.testing.assert_allclose([float(lay["alpha"]) for _, lay in sl.tree.factored_layers(uni)], 1.0, rtol=1e-6)


def test_alpha_for_ranks_errors():
  model = build("llama")
  cfg = sl.CompressionConfig(target_ratio=0.5)
  cp = sl.compress_params(model.params, cfg)
  p = "model/layers/0/self_attn/q_proj"
  with pytest.raises(ValueError, match=f"layer '{p}': rank 33 outside"):
    al.alpha_for_ranks(cp, {p: 33})
  tied = sl.tree.map_modules(cp, lambda path, n: {**n, "s": jnp.ones_like(n["s"])} if path == p else n)
  with pytest.raises(ValueError, match=f"layer '{p}': no threshold keeps exactly 3"):
    al.alpha_for_ranks(tied, {p: 3})
  with pytest.raises(ValueError, match="not SoftLM training-form layers"):
    al.alpha_for_ranks(cp, {"model/nope": 3})


def test_allocated_static_is_the_hard_thresholded_export(llama_stats):
  model, factors, stats = llama_stats
  cfg = sl.CompressionConfig(target_ratio=0.5)
  cp = sl.compress_params(model.params, cfg, factors=factors)
  ranks = al.allocate_ranks(cp, cfg, al.drop_losses(stats))
  static = al.allocated_static(model.params, cfg, factors, ranks)
  hard = cfg.replace(sharpness=1e9)  # Th(s) = s for every kept value
  via_alpha = sl.export_params(al.alpha_for_ranks(cp, ranks), hard)
  ids = jnp.asarray(np.random.RandomState(4).randint(0, VOCAB, (2, 12)), jnp.int32)
  with sl.intercept(cfg):
    a = np.asarray(model(ids, params=static).logits)
    b = np.asarray(model(ids, params=via_alpha).logits)
    soft = np.asarray(model(ids, params=al.allocated_softlm(model.params, cfg, factors, ranks)).logits)
    trained_hard = al.alpha_for_ranks(cp, ranks)
  np.testing.assert_allclose(a, b, atol=1e-5)
  assert soft.shape == a.shape
  assert {p: int(r) for p, r in budget.layer_ranks(trained_hard).items()} == ranks


# ---------------------------------------------------------------------------------------------------------
# SVD-LLM V2


@pytest.mark.parametrize("cr", [0.3, 0.5])
def test_svdllm_v2_meets_the_budget(llama_stats, cr):
  model, factors, _ = llama_stats
  cfg = sl.CompressionConfig(target_ratio=cr)
  ranks = al.svdllm_v2_ranks(factors, cfg)
  cp = sl.compress_params(model.params, cfg, factors=factors)
  count = int(budget.count_params(al.alpha_for_ranks(cp, ranks)))
  target = budget.target_params(cp, cfg)
  assert count <= target
  assert all(c > target - count for c in al.next_step_costs(al.layer_shapes(cp), ranks).values())
  assert int(budget.count_params(al.allocated_static(model.params, cfg, factors, ranks), cfg)) == count


def test_svdllm_v2_keeps_more_where_truncation_loses_more():
  """Two layers of one matrix type, one with 10x the spectrum (100x the truncation loss): it gets the
  lower compression ratio; with equal spectra both get the same rank."""
  rng = np.random.RandomState(0)
  u, _ = np.linalg.qr(rng.randn(64, 64))
  v, _ = np.linalg.qr(rng.randn(64, 64))
  s = np.linspace(10.0, 1.0, 64)
  cfg = sl.CompressionConfig(target_ratio=0.5)
  a, b = "model/layers/0/mlp/up_proj", "model/layers/1/mlp/up_proj"
  assert al.matrix_type(a) == al.matrix_type(b) == "model/layers/mlp/up_proj"
  even = al.svdllm_v2_ranks({a: (u, s, v, np.float32), b: (u, s, v, np.float32)}, cfg)
  assert abs(even[a] - even[b]) <= 1 and sum(even.values()) == 2 * budget.uniform_rank(64, 64, 0.5)
  uneven = al.svdllm_v2_ranks({a: (u, s, v, np.float32), b: (u, 10 * s, v, np.float32)}, cfg)
  assert uneven[b] > uneven[a] + 2
  assert sum(uneven.values()) * 128 <= int(0.5 * 2 * 64 * 64)


def test_per_example_stats_equal_batches_of_one(llama_stats):
  """``unit="example"`` (one vmapped backward pass a batch) gives the statistics of the same examples
  fed as batches of one, and the mean gradient of batches of two; its Fisher is larger than the
  batch-mean one (the per-example gradients are not all aligned)."""
  model, factors, _ = llama_stats
  cfg = sl.CompressionConfig(target_ratio=0.5)
  cp = sl.compress_params(model.params, cfg, factors=factors)
  rng = np.random.RandomState(1)
  batches = [jnp.asarray(rng.randint(0, VOCAB, (2, 12)), jnp.int32) for _ in range(2)]
  loss_fn = lambda p, b: lm_loss(model(b, params=p).logits, b)
  per_ex = al.triplet_stats(cp, cfg, loss_fn, batches, progress=False, unit="example")
  ones = al.triplet_stats(cp, cfg, loss_fn, [b[i:i + 1] for b in batches for i in range(2)], progress=False)
  whole = al.triplet_stats(cp, cfg, loss_fn, batches, progress=False)
  assert per_ex["batches"] == ones["batches"] == 4 and whole["batches"] == 2
  np.testing.assert_allclose(per_ex["loss"], ones["loss"], rtol=1e-5)
  for p, st in per_ex["layers"].items():
    for k in ("grad", "fisher", "tail_fisher", "tail_first"):
      np.testing.assert_allclose(st[k], ones["layers"][p][k], rtol=2e-3, atol=1e-6 * np.max(np.abs(st[k])),
                                 err_msg=f"{p} {k}")
    np.testing.assert_allclose(st["grad"], whole["layers"][p]["grad"], rtol=2e-3,
                               atol=1e-6 * np.max(np.abs(st["grad"])))
  assert sum(st["fisher"].sum() for st in per_ex["layers"].values()) > \
      sum(st["fisher"].sum() for st in whole["layers"].values())
  with pytest.raises(ValueError, match="score unit"):
    al.triplet_stats(cp, cfg, loss_fn, batches, progress=False, unit="token")

"""The selection-rule registry: every rule's kept set, count and export agree; a third rule registered here
alone (no library file knows it) trains, freezes at the budget and exports through the unchanged code."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import softlm_jax as sl
from softlm_jax import rules, shard, train
from tests.conftest import VOCAB, build, rel_err

# --- a toy third rule: keep the top ceil-ish fraction sigmoid(z) of each layer's triplets ------------------
# One learnable logit ``z`` per layer; triplet i is kept iff i + 0.5 < sigmoid(z) * k (a hard top-k whose k
# is learned), with a straight-through gradient from a sigmoid ramp over the index.

TOPK_SHARPNESS = 4.0


def _frac_mask(layer):
  k = layer["s"].shape[0]
  edge = jax.nn.sigmoid(layer["keep_logit"]) * k - (jnp.arange(k, dtype=jnp.float32) + 0.5)
  soft = jax.nn.sigmoid(TOPK_SHARPNESS * edge)
  hard = (edge > 0).astype(jnp.float32)
  return hard + (soft - jax.lax.stop_gradient(soft)), edge > 0


def _topk_loss(params, cfg, step=None):
  zs = [layer["keep_logit"] for _, layer in rules.layers_of(params, "topk")]
  return cfg.gamma * sum(jax.nn.sigmoid(z) for z in zs) if zs else jnp.zeros(())


TOPK = rules.Rule(
    name="topk", keys=("keep_logit",),
    init=lambda k, cfg: {"keep_logit": jnp.asarray(3.0, jnp.float32)},
    scale=lambda layer, cfg: layer["s"] * _frac_mask(layer)[0].astype(layer["s"].dtype),
    kept=lambda layer: _frac_mask(layer)[1],
    loss=_topk_loss,
    optimizer=lambda cfg: optax.adam(cfg.alpha_lr),
    trains_weights=True)


@pytest.fixture
def topk():
  rules.register(TOPK)
  try:
    yield TOPK
  finally:
    rules.unregister("topk")


def randomize(params, name, seed=0):
  """Random selection parameters for rule ``name`` (about half the triplets dropped, not a prefix for
  llrc)."""
  rng = np.random.RandomState(seed)

  def visit(path, node):
    if not sl.tree.is_factored(node) or "s" not in node:
      return node
    s = np.asarray(node["s"])
    if name == "softlm":
      return {**node, "alpha": jnp.asarray(rng.uniform(0.2, 0.8) * s[0], jnp.float32)}
    if name == "llrc":
      return {**node, "mask_logits": jnp.asarray(rng.normal(size=s.shape), jnp.float32)}
    return {**node, "keep_logit": jnp.asarray(rng.uniform(-2.0, 2.0), jnp.float32)}
  return sl.tree.map_modules(params, visit)


def reference_kept(layer, name):
  """Independent numpy reading of each rule's kept set."""
  s = np.asarray(layer["s"], np.float64)
  if name == "softlm":
    return s > float(layer["alpha"])
  if name == "llrc":
    return np.asarray(layer["mask_logits"]) > 0
  frac = 1.0 / (1.0 + np.exp(-float(layer["keep_logit"])))
  return np.arange(len(s)) + 0.5 < frac * len(s)


@pytest.mark.parametrize("name", ["softlm", "llrc", "topk"])
@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_kept_count_and_export_agree(name, model_name, topk, ids):
  model = build(model_name)
  cfg = sl.CompressionConfig(method=name, target_ratio=0.5, sharpness=1e4)
  for seed in range(2):
    cp = randomize(sl.compress_params(model.params, cfg), name, seed)
    ex = sl.export_params(cp, cfg)
    exported = dict(sl.tree.factored_layers(ex))
    expect_total = 0
    for path, layer in sl.tree.factored_layers(cp):
      assert rules.rule_of(layer) is rules.get(name)
      kept = np.asarray(sl.kept(layer))
      np.testing.assert_array_equal(kept, reference_kept(layer, name))
      # the forward scale is zero exactly where kept is False (the contract export relies on)
      scale = np.asarray(sl.singular_scale(layer, cfg))
      assert np.all(scale[~kept] == 0), path
      rows, cols = sl.budget.layer_shape(layer)
      r = int(kept.sum())
      be = rows * cols // (rows + cols)
      expect_total += rows * cols if r >= be else r * (rows + cols)
      assert int(sl.effective_rank(layer)) == r
      if r < be:  # exported factored: exactly the kept columns, scaled
        np.testing.assert_allclose(exported[path]["left"], np.asarray(layer["left"])[:, kept] * scale[kept],
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(exported[path]["right"], np.asarray(layer["right"])[kept])
        assert set(exported[path]) <= {"left", "right", "bias"}
      else:
        assert path not in exported  # dense kernel again
    assert int(sl.count_params(cp)) == expect_total == int(sl.count_params(ex, cfg))
    rep = sl.report.budget_summary(ex, cfg)
    assert rep["budget"]["counted_params"] == expect_total
    with sl.intercept(cfg):
      train_form = model(ids, params=cp).logits
      exp_form = model(ids, params=ex).logits
    assert rel_err(exp_form, train_form) < 1e-5


def test_registry_lookups_and_errors(topk):
  assert rules.names() == ("softlm", "llrc", "topk") == sl.config.METHODS
  assert sl.CompressionConfig(method="topk").method == "topk"
  assert rules.rule_of({"left": 1, "right": 1, "s": 1, "keep_logit": 0.0}) is topk
  assert rules.rule_of({"left": 1, "right": 1}) is None
  assert rules.get("softlm").trains_weights and not rules.get("llrc").trains_weights
  assert rules.get("llrc").refill is sl.refill_to_target and rules.get("softlm").refill is None
  with pytest.raises(ValueError, match="holds the keys of several rules"):
    rules.rule_of({"left": 1, "right": 1, "alpha": 0.0, "keep_logit": 0.0})
  with pytest.raises(ValueError, match="registered already"):
    rules.register(TOPK)
  with pytest.raises(ValueError, match=r"keys \['alpha'\] belong to rule 'softlm'"):
    rules.register(rules.Rule(name="other", keys=("alpha",), init=None, scale=None, kept=None, loss=None,
                              optimizer=None))
  with pytest.raises(ValueError, match="factor or module names"):
    rules.Rule(name="bad", keys=("s",), init=None, scale=None, kept=None, loss=None, optimizer=None)
  with pytest.raises(ValueError, match=r"unknown method 'nope'.*'softlm', 'llrc', 'topk'"):
    sl.CompressionConfig(method="nope")
  # the toy rule's leaf is replicated under FSDP and has its own optimizer partition
  assert shard.fsdp_spec("layers/0/q/keep_logit", (8,), 4) == P()
  labels = sl.optim.param_labels({"q": {"keep_logit": 0.0, "alpha": 0.0, "mask_logits": 0.0, "left": 0.0}})
  assert labels == {"q": {"keep_logit": "topk", "alpha": "alpha", "mask_logits": "mask", "left": "weights"}}


def test_unregistered_rule_is_unknown():
  with pytest.raises(ValueError, match="unknown method 'topk'"):
    sl.CompressionConfig(method="topk")
  assert "keep_logit" not in rules.selection_keys()


def test_third_rule_trains_freezes_and_exports(topk):
  model = build("llama")
  dense = model.params
  cfg = sl.CompressionConfig(method="topk", target_ratio=0.4, alpha_lr=0.1, gamma=0.05)
  cp = sl.compress_params(dense, cfg)
  target = sl.target_params(cp, cfg)
  assert int(sl.count_params(cp)) > target
  tx = sl.make_optimizer(cfg, optax.adam(1e-3))
  data = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, (64, 12)), jnp.int32)

  def task_loss(p, batch, _rng):
    student = model(batch["ids"], params=p).logits
    teacher = model(batch["ids"], params=batch["teacher"]).logits
    return sl.distillation_loss(student, teacher)

  step = train.make_train_step(task_loss, tx, cfg)
  batch_fn = lambda i: {"ids": data[(i * 8) % 64:(i * 8) % 64 + 8], "teacher": dense}
  state, hist = train.fit(train.init_state(cp, tx), step, batch_fn, max_compress_steps=200, finetune_steps=5,
                          progress=False, log_every=1)
  bs = sl.budget_state(state.opt_state)
  assert bool(bs.frozen), f"budget not met in 200 steps: {hist[-1]}"
  assert int(state.step) == int(bs.freeze_step) + 5
  assert int(sl.count_params(state.params)) <= target
  # the selection stopped at the freeze while the weights went on training
  after = [h for h in hist if h["step"] > int(bs.freeze_step)]
  assert after and len({h["params"] for h in after}) == 1
  z_trained = np.asarray([lay["keep_logit"] for _, lay in sl.tree.factored_layers(state.params)])
  z_start = np.asarray([lay["keep_logit"] for _, lay in sl.tree.factored_layers(cp)])
  assert np.all(z_trained < z_start)
  moved = [not np.array_equal(np.asarray(a["left"]), np.asarray(b["left"]))
           for (_, a), (_, b) in zip(sl.tree.factored_layers(cp), sl.tree.factored_layers(state.params))]
  assert all(moved), "trains_weights=True: the factors train with weights_tx"
  ex = sl.export_params(state.params, cfg)
  assert int(sl.count_params(ex, cfg)) == int(sl.count_params(state.params))
  assert not any(rules.rule_of(lay) for _, lay in sl.tree.factored_layers(ex))
  ids = jnp.asarray(np.random.RandomState(5).randint(0, VOCAB, (2, 12)), jnp.int32)
  with sl.intercept(cfg):
    train_form = model(ids, params=state.params).logits
  with sl.intercept():
    exported = model(ids, params=ex).logits
  assert float(jnp.max(jnp.abs(exported - train_form))) < 1e-4


def test_third_rule_frozen_weights_variant(topk):
  """A rule with trains_weights=False gets the same treatment as LLRC: weights_tx refused, weights fixed."""
  frozen = rules.register(rules.Rule(**{**TOPK.__dict__, "trains_weights": False}), replace=True)
  cfg = sl.CompressionConfig(method="topk")
  with pytest.raises(ValueError, match="keeps the weights frozen"):
    sl.make_optimizer(cfg, optax.adam(1e-3))
  params = sl.compress_params(build("llama").params, cfg)
  tx = sl.make_optimizer(cfg)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for kp, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    name = sl.optim._path(kp)[-1]
    assert (name == "keep_logit") == bool(jnp.any(u != 0)), kp
  assert frozen.trains_weights is False


def test_budget_results_is_summary_plus_plot(tmp_path):
  model = build("llama")
  cfg = sl.CompressionConfig(target_ratio=0.5)
  ex = sl.static_svd(model.params, cfg)
  summary = sl.report.budget_summary(ex, cfg)
  rep = sl.budget_report(ex, cfg)
  assert summary["ranks"] == {p: v["rank"] for p, v in rep["layers"].items()}
  assert summary["budget"]["counted_params"] == rep["counted_params"] and summary["budget"]["budget_met"]
  assert not (tmp_path / "ranks.png").exists()
  res = sl.report.budget_results(ex, cfg, str(tmp_path), "t")
  assert res == {"budget": summary["budget"], "ranks": summary["ranks"]}
  assert (tmp_path / "ranks.png").stat().st_size > 0

"""Block refit: lower held-out block errors, identical parameters after an interrupted and resumed run,
unchanged ranks, and the errors."""
import jax
import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import losses, refit, run
from tests.conftest import VOCAB
from tests.test_propagate import apply_fn, correlated_batches

CFG = sl.CompressionConfig(target_ratio=0.5, decomposition="whitened")


@pytest.fixture(scope="module")
def setup():
  from transformers import FlaxLlamaForCausalLM, LlamaConfig
  model = FlaxLlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                           max_position_embeddings=64), seed=2)
  fn = apply_fn(model)
  calib = correlated_batches(6, seed=0)
  grams = sl.collect_grams(fn, model.params, calib, CFG, progress=False)
  static = sl.static_svd(model.params, CFG, grams=grams)
  return model, fn, calib, static


def leaves(tree_):
  return {sl.tree.join(p): n for p, n in sl.tree.iter_modules(tree_)}


@pytest.mark.parametrize("inputs,loss", [("compressed", "token"), ("dense", "token"), ("compressed", "total")])
def test_refit_lowers_every_block_error_on_held_out_tokens(setup, inputs, loss):
  model, fn, calib, static = setup
  held = correlated_batches(4, seed=123)
  cfg = refit.RefitConfig(steps=30, lr=3e-3, inputs=inputs, loss=loss)
  out = refit.refit_blocks(model.params, static, (fn, calib, None), cfg, progress=False)
  before = refit.block_errors(model.params, static, (fn, held, None), inputs=inputs, loss=loss)
  after = refit.block_errors(model.params, out, (fn, held, None), inputs=inputs, loss=loss)
  assert set(before) == {f"model/layers/{i}" for i in range(3)}
  for blk in before:
    assert after[blk] < 0.9 * before[blk], (blk, before, after)


def test_block_loss_against_numpy():
  rng = np.random.default_rng(0)
  y, t = rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 5, 8))
  w = rng.uniform(size=(2, 5))
  t[0, 0] *= 1e3  # a massive activation (the attention sink)
  y[0, 0] = t[0, 0] * 1.01  # whose error is small relative to its own norm
  d = ((y - t) ** 2).sum(-1)
  n = (t ** 2).sum(-1)
  np.testing.assert_allclose(losses.block_loss(y, t, w, "token"), (w * d / n).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(losses.block_loss(y, t, None, "token"), (d / n).mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.block_loss(y, t, w, "total"), (w * d).sum() / (w * n).sum(), rtol=1e-5)
  # "total" is the massive token's error (1e-4) and blind to the others; "token" sees every token
  assert float(losses.block_loss(y, t, None, "total")) < 2e-4 < 0.5 < float(losses.block_loss(y, t, None, "token"))
  # "token" is invariant to a token's scale (as the next block's RMSNorm is)
  s = np.ones((2, 5, 1))
  s[1, 3] = 50.0
  np.testing.assert_allclose(losses.block_loss(y * s, t * s, w, "token"), losses.block_loss(y, t, w, "token"),
                             rtol=1e-5)


def test_ranks_and_shapes_unchanged(setup):
  model, fn, calib, static = setup
  out = refit.refit_blocks(model.params, static, (fn, calib, None), refit.RefitConfig(steps=3, lr=1e-3), progress=False)
  a, b = leaves(static), leaves(out)
  assert set(a) == set(b)
  for path in a:
    assert set(a[path]) == set(b[path]), path
    for k in a[path]:
      assert np.shape(a[path][k]) == np.shape(b[path][k]) and a[path][k].dtype == b[path][k].dtype, (path, k)
  assert sl.layer_ranks(out) == sl.layer_ranks(static)
  assert int(sl.count_params(out, CFG)) == int(sl.count_params(static, CFG))
  # only factored layers' factors and biases move; norms and embeddings are the dense ones
  np.testing.assert_array_equal(b["model/layers/1/input_layernorm"]["weight"],
                                a["model/layers/1/input_layernorm"]["weight"])
  assert not np.array_equal(np.asarray(b["model/layers/1/mlp/up_proj"]["right"]),
                            np.asarray(a["model/layers/1/mlp/up_proj"]["right"]))


def test_resume_after_interruption_is_identical(setup, tmp_path):
  model, fn, calib, static = setup
  cfg = refit.RefitConfig(steps=5, lr=1e-3)
  first = []
  full = refit.refit_blocks(model.params, static, (fn, calib, None), cfg, ckpt_dir=str(tmp_path / "a"),
                            progress=False, on_block=lambda i, blk, info: first.append(info))

  class Stop(Exception):
    pass

  def interrupt(i, blk, info):
    if i == 1:
      raise Stop

  with pytest.raises(Stop):
    refit.refit_blocks(model.params, static, (fn, calib, None), cfg, ckpt_dir=str(tmp_path / "b"), progress=False,
                       on_block=interrupt)
  assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["block_000.npz", "block_001.npz"]
  seen = []
  resumed = refit.refit_blocks(model.params, static, (fn, calib, None), cfg, ckpt_dir=str(tmp_path / "b"),
                               progress=False, on_block=lambda i, blk, info: seen.append(info))
  assert seen == first and "loss_last" in seen[2]  # blocks 0, 1 loaded (reporting as they ran), block 2 trained
  for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="was written for"):
    refit.refit_blocks(model.params, static, (fn, calib, None), refit.RefitConfig(steps=6, lr=1e-3),
                       ckpt_dir=str(tmp_path / "b"), progress=False)
  # other calibration data (the same shapes) refuses the files too
  other = correlated_batches(6, seed=9)
  with pytest.raises(ValueError, match="was written for"):
    refit.refit_blocks(model.params, static, (fn, other, None), cfg, ckpt_dir=str(tmp_path / "b"), progress=False)


def kernels(tree_):
  """``{layer: left @ right}`` of an exported tree's factored layers."""
  return {p: np.asarray(n["left"], np.float64) @ np.asarray(n["right"], np.float64)
          for p, n in leaves(tree_).items() if sl.tree.is_factored(n)}


def test_holdout_guard_keeps_a_block_only_if_its_held_out_error_falls(setup):
  """A sane refit lowers every block's error on the held-out batches and is kept; one that diverges (lr
  1.0) raises it, and every block then keeps its starting kernels (up to the balancing's float error)."""
  model, fn, calib, static = setup
  held = calib[-2:]
  seen = []
  good = refit.refit_blocks(model.params, static, (fn, calib, None), refit.RefitConfig(steps=30, lr=3e-3, holdout=2),
                            progress=False, on_block=lambda i, blk, info: seen.append(info))
  assert [x["kept"] for x in seen] == [True] * 3
  for x in seen:
    assert x["heldout_after"] < x["heldout_before"]
  # the guard's held-out errors are block_errors' on the held-out batches, block by block
  ref = refit.block_errors(model.params, static, (fn, held, None))
  np.testing.assert_allclose(seen[0]["heldout_before"], ref["model/layers/0"], rtol=1e-4)
  assert kernels(good).keys() == kernels(static).keys()
  assert any(not np.allclose(kernels(good)[p], kernels(static)[p], atol=1e-4) for p in kernels(static))
  # the trained steps never saw the held-out batches: the same refit on the first 4 batches alone
  alone = refit.refit_blocks(model.params, static, (fn, calib[:4], None), refit.RefitConfig(steps=30, lr=3e-3),
                             progress=False)
  for x, y in zip(jax.tree.leaves(good), jax.tree.leaves(alone)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  seen.clear()
  bad = refit.refit_blocks(model.params, static, (fn, calib, None), refit.RefitConfig(steps=30, lr=1.0, holdout=2),
                           progress=False, on_block=lambda i, blk, info: seen.append(info))
  assert [x["kept"] for x in seen] == [False] * 3
  for x in seen:
    assert x["heldout_after"] > x["heldout_before"]
  for p, k in kernels(static).items():
    np.testing.assert_allclose(kernels(bad)[p], k, rtol=1e-4, atol=1e-5 * np.abs(k).max())


def test_errors(setup):
  model, fn, calib, static = setup
  for bad in (dict(steps=-1), dict(steps=1.5), dict(lr=0.0), dict(inputs="both"), dict(b1=1.0),
              dict(loss="mean"), dict(holdout=-1), dict(holdout=True)):
    with pytest.raises(ValueError, match="RefitConfig"):
      refit.RefitConfig(**bad)
  training_form = sl.compress_params(model.params, CFG, grams=sl.collect_grams(fn, model.params, calib, CFG,
                                                                               progress=False))
  with pytest.raises(ValueError, match=r"layer 'model/layers/0/[a-z_/]+': a training-form layer"):
    refit.refit_blocks(model.params, training_form, (fn, calib, None), refit.RefitConfig(steps=1), progress=False)
  with pytest.raises(ValueError, match="holds out every one of the 6 calibration batches"):
    refit.refit_blocks(model.params, static, (fn, calib, None), refit.RefitConfig(steps=1, holdout=6), progress=False)
  with pytest.raises(ValueError, match="TrainConfig.refit_holdout"):
    run.TrainConfig(refit_holdout=-1)
  with pytest.raises(ValueError, match="inputs must be one of"):
    refit.block_errors(model.params, static, (fn, calib, None), inputs="both")
  with pytest.raises(ValueError, match="loss must be one of"):
    refit.block_errors(model.params, static, (fn, calib, None), loss="mean")
  with pytest.raises(ValueError, match="TrainConfig.refit_loss"):
    run.TrainConfig(refit_loss="mean")

"""Rank and parameter counting: one function, checked against independent arithmetic."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softlm_jax as sl
from tests.conftest import build


def layer(rows, cols, s, alpha):
  k = len(s)
  return {"left": jnp.zeros((rows, k)), "right": jnp.zeros((k, cols)), "s": jnp.asarray(s, jnp.float32),
          "alpha": jnp.asarray(alpha, jnp.float32), "bias": jnp.zeros(cols)}


def test_break_even_and_layer_cost():
  assert sl.break_even_rank(384, 384) == 192
  assert sl.break_even_rank(384, 1536) == 384 * 1536 // 1920 == 307
  assert int(sl.layer_cost(10, 384, 1536)) == 10 * 1920
  assert int(sl.layer_cost(306, 384, 1536)) == 306 * 1920
  assert int(sl.layer_cost(307, 384, 1536)) == 384 * 1536  # at break-even: kept dense
  assert int(sl.layer_cost(0, 5, 7)) == 0


def test_count_params_matches_independent_count():
  rng = np.random.RandomState(0)
  tree, expect = {}, 0
  for i, (rows, cols) in enumerate([(8, 8), (8, 32), (32, 8), (6, 10)]):
    s = np.sort(rng.uniform(0, 1, min(rows, cols)))[::-1]
    alpha = rng.uniform(0, 1)
    r = int(np.sum(s > alpha))
    expect += rows * cols if r >= rows * cols // (rows + cols) else r * (rows + cols)
    tree[f"block/{i}"] = {"dense": layer(rows, cols, s, alpha)}
  assert int(sl.count_params(tree)) == expect
  assert int(jax.jit(sl.count_params)(tree)) == expect
  assert sl.dense_params(tree) == 64 + 256 + 256 + 60
  assert sl.target_params(tree, sl.CompressionConfig(target_ratio=0.25)) == int(np.floor(0.75 * 636))


def test_ranks_and_counts_on_model_trees():
  model = build("bert")
  cfg = sl.CompressionConfig()
  dense_count = int(sl.count_params(model.params, cfg))
  # selection: 6 linears per block x 2 blocks, sizes from the config (32 hidden, 48 FFN)
  assert dense_count == 2 * (4 * 32 * 32 + 2 * 32 * 48)
  cp = sl.compress_params(model.params, cfg)
  assert int(sl.count_params(cp)) == dense_count == sl.dense_params(cp)
  ranks = sl.layer_ranks(cp)
  assert len(ranks) == 12 and all(int(r) == 32 for r in ranks.values())
  st = sl.static_svd(model.params, cfg)
  rep = sl.budget_report(st, cfg)
  assert rep["budget_met"] and rep["dense_params"] == dense_count
  for path, info in rep["layers"].items():
    rows, cols = info["shape"]
    assert info["rank"] == int(np.floor(0.5 * rows * cols / (rows + cols)))


@pytest.mark.parametrize("init_rank,expect", [("full", 32), ("break_even", 16), (5, 5), (1000, 32)])
def test_init_rank(init_rank, expect):
  cp = sl.compress_params(build("bert").params, sl.CompressionConfig(init_rank=init_rank))
  assert int(sl.layer_ranks(cp)["bert/encoder/layer/0/attention/self/query"]) == expect


def test_public_api_names_resolve():
  missing = [n for n in sl.__all__ if not hasattr(sl, n)]
  assert not missing, missing
  assert callable(sl.train.fit) and callable(sl.models.weights.minilm_dir)

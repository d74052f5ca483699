"""Tiny random HF Flax BERT, GPT-2 (FlaxConv1D) and Llama (grouped KV): the compressed model equals
the dense one at full rank, the export equals the training form, gradients flow under jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softlm_jax as sl
from tests.conftest import rel_err


def logits(model, params, ids, cfg=None):
  with sl.intercept(cfg):
    return model(ids, params=params).logits


def set_alphas(params, frac):
  """Sets each layer's alpha to the `frac` quantile of its singular values (so ranks are cut)."""
  out = jax.tree.map(lambda x: x, params)

  def visit(node):
    for k, v in node.items():
      if isinstance(v, dict) and "alpha" in v:
        v["alpha"] = jnp.quantile(v["s"], frac)
      elif isinstance(v, dict):
        visit(v)
  visit(out)
  return out


def test_full_rank_equals_dense(tiny, ids):
  name, model = tiny
  cfg = sl.CompressionConfig(sharpness=1e6)
  cp = sl.compress_params(model.params, cfg)
  dense = logits(model, model.params, ids)
  out = jax.jit(lambda p: logits(model, p, ids, cfg))(cp)
  assert rel_err(out, dense) < 1e-5
  # every block linear was replaced (GPT-2's FlaxConv1D: c_attn, c_proj, c_fc, mlp c_proj)
  expect = {"bert": 12, "gpt2": 8, "llama": 14}[name]
  assert len(sl.layer_ranks(cp)) == expect


def test_default_sharpness_starts_near_dense(tiny, ids):
  """Documented choice: spectra are normalised per layer, so the default k = 1000 leaves the model
  where the dense one is (only values below ~0.3% of a layer's top singular value are shrunk)."""
  _, model = tiny
  cfg = sl.CompressionConfig()
  out = logits(model, sl.compress_params(model.params, cfg), ids, cfg)
  assert rel_err(out, logits(model, model.params, ids)) < 2e-3
  raw = sl.CompressionConfig(normalize=False)  # raw values as in the paper: same kernel, other units
  cp_raw = sl.compress_params(model.params, raw)
  assert rel_err(logits(model, cp_raw, ids, raw.replace(sharpness=1e6)),
                 logits(model, model.params, ids)) < 1e-5


@pytest.mark.parametrize("frac", [0.3, 0.7, 0.95])
def test_export_equals_training_form(tiny, ids, frac):
  name, model = tiny
  cfg = sl.CompressionConfig(sharpness=50.0)
  cp = set_alphas(sl.compress_params(model.params, cfg), frac)
  ex = sl.export_params(cp, cfg)
  assert rel_err(logits(model, ex, ids, cfg), logits(model, cp, ids, cfg)) < 1e-5
  # exported shapes: cut to the counted rank, or dense at/above break-even
  layers = sl.budget_report(cp, cfg)["layers"]
  exported = sl.layer_ranks(ex, cfg)
  kept_dense = 0
  for path, info in layers.items():
    rows, cols = info["shape"]
    dense = info["rank"] >= rows * cols // (rows + cols)
    kept_dense += dense
    assert int(exported[path]) == (min(rows, cols) if dense else info["rank"]), path
  if frac == 0.95:
    assert kept_dense == 0
  assert int(sl.count_params(ex, cfg)) == int(sl.count_params(cp))
  # exported runs without the config (no thresholds left)
  assert rel_err(logits(model, ex, ids), logits(model, cp, ids, cfg)) < 1e-5


def test_gradients_flow_to_alpha_and_factors(tiny, ids):
  name, model = tiny
  cfg = sl.CompressionConfig(sharpness=20.0)
  cp = set_alphas(sl.compress_params(model.params, cfg), 0.5)

  @jax.jit
  def loss(p):
    return jnp.mean(logits(model, p, ids, cfg) ** 2)

  g = jax.grad(loss)(cp)
  from softlm_jax import tree
  for path, gl in tree.factored_layers(g):
    for key in ("left", "right", "s", "alpha"):
      assert np.all(np.isfinite(gl[key])), (path, key)
    assert float(jnp.abs(gl["left"]).sum()) > 0 and float(jnp.abs(gl["right"]).sum()) > 0, path
  assert sum(float(jnp.abs(gl["alpha"])) > 0 for _, gl in tree.factored_layers(g)) >= len(
      tree.factored_layers(g)) // 2
  # alpha's gradient through the whole model against a central finite difference
  path0 = tree.factored_layers(cp)[0][0]
  keys = path0.split("/")

  def with_alpha(a):
    p = jax.tree.map(lambda x: x, cp)
    node = p
    for k in keys:
      node = node[k]
    node["alpha"] = a
    return loss(p)

  a0 = float(tree.factored_layers(cp)[0][1]["alpha"])
  eps = 1e-3
  fd = (with_alpha(jnp.float32(a0 + eps)) - with_alpha(jnp.float32(a0 - eps))) / (2 * eps)
  ga = float(dict(tree.factored_layers(g))[path0]["alpha"])
  np.testing.assert_allclose(ga, float(fd), rtol=5e-2, atol=1e-4)

"""Activation-aware (whitened) decomposition and calibration Grams: exactness at full rank on real model
classes, optimality of the truncation against the closed form, robustness, and the errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softlm_jax as sl
from tests.conftest import VOCAB, build, rel_err


def calib_batches(n=3, b=2, t=12, seed=1):
  rng = np.random.RandomState(seed)
  return [{"input_ids": jnp.asarray(rng.randint(0, VOCAB, (b, t)), jnp.int32)} for _ in range(n)]


def apply_fn(model):
  return lambda p, batch: model(batch["input_ids"], params=p).logits


def eager_grams(model, params, batches, cfg):
  """Independent reference: capture each selected layer's input eagerly (no jit), then X^T X in float64."""
  acts: dict = {}

  def rec(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == "__call__" and mod.scope is not None and mod.has_variable("params", "kernel"):
      path = "/".join(mod.scope.path)
      if cfg.matches(path) and mod.get_variable("params", "kernel").ndim == 2:
        x = np.asarray(args[0] if args else kwargs["inputs"], np.float64)
        acts.setdefault(path, []).append(x.reshape(-1, x.shape[-1]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(rec):
    for b in batches:
      model(b["input_ids"], params=params)
  return {p: np.concatenate(xs).T @ np.concatenate(xs) for p, xs in acts.items()}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_collect_grams_equals_eager_activations(name):
  model = build(name)
  cfg = sl.CompressionConfig()
  batches = calib_batches()
  grams = sl.collect_grams(apply_fn(model), model.params, batches, cfg, progress=False)
  ref = eager_grams(model, model.params, batches, cfg)
  kernels = dict(sl.tree.selected_kernels(model.params, cfg))
  assert set(grams) == set(ref) == set(kernels)
  assert grams.tokens == 3 * 2 * 12
  for path, g in grams.items():
    assert g.dtype == np.float32
    assert rel_err(g, ref[path]) < 1e-5, path
    rows, cols = np.shape(kernels[path])
    # GPT-2's FlaxConv1D stores out x in: the Gram is (cols, cols); nn.Dense in x out: (rows, rows)
    want = cols if name == "gpt2" else rows
    assert g.shape == (want, want), (path, g.shape)
    assert grams.layouts[path] == ("out_in" if name == "gpt2" else "in_out")


def test_collect_grams_mask_drops_padding():
  model = build("llama")
  cfg = sl.CompressionConfig()
  batches = calib_batches(n=1)
  mask = np.ones((2, 12), np.float32)
  mask[:, 8:] = 0.0
  grams = sl.collect_grams(apply_fn(model), model.params, batches, cfg, progress=False,
                           mask_fn=lambda b: jnp.asarray(mask))
  assert grams.tokens == 16
  # the first layer's input for the kept positions, eagerly: causal attention, so positions < 8 do not
  # depend on the dropped ones
  short = [{"input_ids": batches[0]["input_ids"][:, :8]}]
  ref = eager_grams(model, model.params, short, cfg)
  for path in ref:
    assert rel_err(grams[path], ref[path]) < 1e-4, path


def test_collect_grams_mamba_port():
  from softlm_jax.models import mamba
  mcfg = mamba.MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2)
  model = mamba.MambaLM(mcfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  cfg = sl.CompressionConfig(include=r"layers/\d+/mixer/(in_proj|out_proj)", sharpness=1e6,
                             decomposition="whitened")
  batches = calib_batches(n=2)
  grams = sl.collect_grams(lambda p, b: model.apply({"params": p}, b["input_ids"]), params, batches, cfg,
                           progress=False)
  assert len(grams) == 4
  cp = sl.compress_params(params, cfg, grams=grams)
  ids = batches[0]["input_ids"]
  with sl.intercept(cfg):
    out = model.apply({"params": cp}, ids)
  assert rel_err(out, model.apply({"params": params}, ids)) < 1e-4


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_whitened_full_rank_equals_dense(name):
  model = build(name)
  cfg = sl.CompressionConfig(sharpness=1e6, decomposition="whitened")
  grams = sl.collect_grams(apply_fn(model), model.params, calib_batches(), cfg, progress=False)
  cp = sl.compress_params(model.params, cfg, grams=grams)
  ids = calib_batches(n=1, seed=7)[0]["input_ids"]
  dense = model(ids, params=model.params).logits
  with sl.intercept(cfg):
    out = jax.jit(lambda p: model(ids, params=p).logits)(cp)
  assert rel_err(out, dense) < 1e-4
  # the factors are balanced (||left[:, j]|| == ||right[j]||), not S^{-T} U's tiny columns against a huge right
  for _, layer in sl.tree.factored_layers(cp):
    np.testing.assert_allclose(np.linalg.norm(layer["left"], axis=0), np.linalg.norm(layer["right"], axis=1),
                               rtol=1e-4)
  # and the spectra differ from plain SVD (the decomposition really is another one)
  plain = sl.compress_params(model.params, cfg.replace(decomposition="svd"))
  lay = dict(sl.tree.factored_layers(cp))
  lay_plain = dict(sl.tree.factored_layers(plain))
  path = next(iter(lay))
  assert not np.allclose(lay[path]["s"], lay_plain[path]["s"], rtol=1e-2)


def correlated(n, d, seed=0):
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((d, d)) * np.geomspace(10.0, 0.1, d)  # strongly correlated, anisotropic
  return rng.standard_normal((n, d)) @ mix


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_whitened_truncation_is_the_closed_form_optimum(layout):
  """min over rank-r W' of ||X (W - W')||_F is the tail of XW's spectrum (X full column rank);
  whitened truncation attains it, plain truncation does not."""
  x = correlated(400, 24)
  w = np.random.default_rng(1).standard_normal((24, 16))
  gram = x.T @ x
  k = w if layout == "in_out" else w.T
  left, s, right = sl.whitened_factors(k[None], gram[None], layout=layout)
  ul, sp, vp = np.linalg.svd(w, full_matrices=False)
  sv_xw = np.linalg.svd(x @ w, compute_uv=False)
  np.testing.assert_allclose(s[0], sv_xw, rtol=1e-4, atol=1e-5 * sv_xw[0])
  for r in (2, 5, 10):
    k_r = (left[0][:, :r] * s[0][:r]) @ right[0][:r]
    w_r = k_r if layout == "in_out" else k_r.T
    err = np.linalg.norm(x @ (w - w_r))
    optimum = np.sqrt(np.sum(sv_xw[r:] ** 2))
    plain = np.linalg.norm(x @ (w - (ul[:, :r] * sp[:r]) @ vp[:r]))
    assert err == pytest.approx(optimum, rel=1e-3)
    assert err < 0.9 * plain


def test_rank_deficient_gram_still_decomposes():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 12))          # fewer tokens than features
  x = np.concatenate([x, x[:, :4]], axis=1)  # and duplicated features: rank 5 of 16
  w = rng.standard_normal((16, 8))
  for g in (x.T @ x, np.zeros((16, 16))):
    left, s, right = sl.whitened_factors(w[None], g[None])
    assert np.all(np.isfinite(left)) and np.all(np.isfinite(s)) and np.all(np.isfinite(right))
    np.testing.assert_allclose((left[0] * s[0]) @ right[0], w, atol=5e-3 * np.abs(w).max())
  # the zero Gram whitens isotropically: plain SVD's spectrum
  _, s0, _ = sl.whitened_factors(w[None], np.zeros((1, 16, 16)))
  np.testing.assert_allclose(s0[0], np.linalg.svd(w, compute_uv=False), rtol=1e-4)


def test_whitened_errors_name_the_layer():
  model = build("llama")
  cfg = sl.CompressionConfig(decomposition="whitened")
  grams = sl.collect_grams(apply_fn(model), model.params, calib_batches(n=1), cfg, progress=False)
  path = sorted(grams)[0]
  with pytest.raises(ValueError, match="needs calibration Grams"):
    sl.compress_params(model.params, cfg)
  with pytest.raises(ValueError, match="decomposition is 'svd'"):
    sl.compress_params(model.params, cfg.replace(decomposition="svd"), grams=grams)
  missing = sl.Grams({p: g for p, g in grams.items() if p != path}, grams.layouts)
  with pytest.raises(ValueError, match=f"layer '{path}': no calibration Gram"):
    sl.compress_params(model.params, cfg, grams=missing)
  bad = sl.Grams({**grams, path: np.eye(5, dtype=np.float32)}, grams.layouts)
  with pytest.raises(ValueError, match=f"layer '{path}': Gram has shape \\(5, 5\\)"):
    sl.compress_params(model.params, cfg, grams=bad)
  nan = np.array(grams[path])
  nan[0, 0] = np.nan
  with pytest.raises(ValueError, match=f"layer '{path}': Gram .* NaN/Inf"):
    sl.compress_params(model.params, cfg, grams=sl.Grams({**grams, path: nan}, grams.layouts))
  square = [p for p, k in sl.tree.selected_kernels(model.params, cfg) if np.shape(k)[0] == np.shape(k)[1]][0]
  with pytest.raises(ValueError, match=f"layer '{square}': the kernel is square"):
    sl.compress_params(model.params, cfg, grams=dict(grams))  # a plain dict has no layouts


def test_static_whitened_beats_plain_on_calibration_outputs():
  """SVD-LLM's claim on a tiny Llama, per layer: at the uniform ranks, whitened truncation has a lower
  calibration output error ||X (W - W_r)|| than plain truncation in every layer."""
  model = build("llama")
  cfg = sl.CompressionConfig(target_ratio=0.5, decomposition="whitened")
  grams = sl.collect_grams(apply_fn(model), model.params, calib_batches(n=4), cfg, progress=False)
  white = sl.static_svd(model.params, cfg, grams=grams)
  plain = sl.static_svd(model.params, cfg.replace(decomposition="svd"))
  kernels = dict(sl.tree.selected_kernels(model.params, cfg))
  lw, lp = dict(sl.tree.factored_layers(white)), dict(sl.tree.factored_layers(plain))
  for path, k in kernels.items():
    g = np.asarray(grams[path], np.float64)
    def err(layer):
      d = np.asarray(k, np.float64) - np.asarray(layer["left"], np.float64) @ np.asarray(layer["right"], np.float64)
      return np.sqrt(np.trace(d.T @ g @ d))
    assert err(lw[path]) < err(lp[path]), path

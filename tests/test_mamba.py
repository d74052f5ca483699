"""Flax Mamba (v1): against a pure-numpy reference and HF PyTorch, compression through the library,
recurrent decoding, the weight loader's errors, and the Mamba-130m shape."""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import tree
from softlm_jax.models import mamba
from softlm_jax.models.mamba import MambaConfig, MambaLM
from tests.conftest import rel_err
from tests.test_models import set_alphas

TINY = dict(vocab_size=97, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4)
INOUT = r"layers/\d+/mixer/(in_proj|out_proj)"


def tiny_config(**kw):
  return MambaConfig(**{**TINY, **kw})


@pytest.fixture
def mids():
  return jnp.asarray(np.random.RandomState(1).randint(0, TINY["vocab_size"], (2, 10)), jnp.int32)


def random_hf_state_dict(c: MambaConfig, seed=0):
  """Random numpy tensors under HF names and torch layouts (Linear (out, in), conv (inter, 1, K))."""
  rng = np.random.RandomState(seed)
  sd = {}
  for name, shape in mamba.expected_hf_shapes(c).items():
    if name.endswith("A_log"):
      v = np.log(np.arange(1, shape[1] + 1))[None, :] + 0.3 * rng.randn(*shape)
    elif name.endswith("dt_proj.bias"):
      v = rng.uniform(-4.0, -1.0, shape)  # softplus(-4..-1): dt ~ 0.02..0.3
    elif name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
      v = 1.0 + 0.3 * rng.randn(*shape)
    elif name.endswith("weight") and len(shape) >= 2:
      v = rng.randn(*shape) / np.sqrt(shape[-1])
    else:
      v = 0.1 * rng.randn(*shape)
    sd[name] = v.astype(np.float32)
  return sd


# ----------------------------------------------------------------------------- numpy reference


def np_selective_scan(u, delta, A, B, C, D, h=None):
  """Explicit loop over time, float64. u, delta (b, L, c); A (c, n); B, C (b, L, n); D (c,)."""
  u, delta, A, B, C, D = (np.asarray(x, np.float64) for x in (u, delta, A, B, C, D))
  b, L, c = u.shape
  h = np.zeros((b, c, A.shape[1])) if h is None else np.array(h, np.float64)
  ys = []
  for t in range(L):
    h = np.exp(delta[:, t, :, None] * A[None]) * h + delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
    ys.append(np.einsum("bcn,bn->bc", h, C[:, t]) + D * u[:, t])
  return np.stack(ys, 1), h


def np_mamba_logits(sd, c: MambaConfig, ids):
  """HF MambaForCausalLM.slow_forward in float64 numpy, from an HF-named state dict."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  silu = lambda x: x / (1 + np.exp(-x))  # noqa: E731
  softplus = lambda x: np.log1p(np.exp(x))  # noqa: E731

  def norm(x, w):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.layer_norm_epsilon)

  ids = np.asarray(ids)
  x = sd["backbone.embeddings.weight"][ids]
  b, L, _ = x.shape
  inter, n, r, K = c.intermediate_size, c.state_size, c.dt_rank, c.conv_kernel
  for i in range(c.num_hidden_layers):
    p = f"backbone.layers.{i}.mixer."
    xz = norm(x, sd[f"backbone.layers.{i}.norm.weight"]) @ sd[p + "in_proj.weight"].T
    if c.use_bias:
      xz = xz + sd[p + "in_proj.bias"]
    u, z = xz[..., :inter], xz[..., inter:]
    w = sd[p + "conv1d.weight"][:, 0, :]  # (inter, K)
    conv = np.zeros_like(u)
    for t in range(L):
      for k in range(K):
        s = t - (K - 1) + k
        if s >= 0:
          conv[:, t] += w[:, k] * u[:, s]
    if c.use_conv_bias:
      conv = conv + sd[p + "conv1d.bias"]
    u = silu(conv)
    proj = u @ sd[p + "x_proj.weight"].T
    dt, B, C = proj[..., :r], proj[..., r:r + n], proj[..., r + n:]
    delta = softplus(dt @ sd[p + "dt_proj.weight"].T + sd[p + "dt_proj.bias"])
    y, _ = np_selective_scan(u, delta, -np.exp(sd[p + "A_log"]), B, C, sd[p + "D"])
    y = (y * silu(z)) @ sd[p + "out_proj.weight"].T
    if c.use_bias:
      y = y + sd[p + "out_proj.bias"]
    x = x + y
  x = norm(x, sd["backbone.norm_f.weight"])
  head = sd["backbone.embeddings.weight"] if c.tie_word_embeddings else sd["lm_head.weight"]
  return x @ head.T


# ----------------------------------------------------------------------------- 1. numpy reference


def test_selective_scan_matches_numpy_loop():
  rng = np.random.RandomState(0)
  b, L, ch, n = 2, 11, 6, 3
  u = rng.randn(b, L, ch)
  delta = np.log1p(np.exp(rng.randn(b, L, ch)))
  A = -np.exp(rng.randn(ch, n) * 0.5)
  B, C, D = rng.randn(b, L, n), rng.randn(b, L, n), rng.randn(ch)
  h0 = rng.randn(b, ch, n)
  f32 = lambda *xs: [jnp.asarray(x, jnp.float32) for x in xs]  # noqa: E731
  y, h = jax.jit(lambda *a: mamba.selective_scan(*a, return_state=True))(*f32(u, delta, A, B, C, D))
  ref_y, ref_h = np_selective_scan(u, delta, A, B, C, D)
  assert y.shape == (b, L, ch) and y.dtype == jnp.float32 and h.shape == (b, ch, n)
  assert rel_err(y, ref_y) < 1e-5 and rel_err(h, ref_h) < 1e-5
  # continuing from a state; splitting the sequence in two gives the same result
  y2 = mamba.selective_scan(*f32(u, delta, A, B, C, D), initial_state=jnp.asarray(h0, jnp.float32))
  assert rel_err(y2, np_selective_scan(u, delta, A, B, C, D, h0)[0]) < 1e-5
  ya, ha = mamba.selective_scan(*f32(u[:, :4], delta[:, :4], A, B[:, :4], C[:, :4], D), return_state=True)
  yb = mamba.selective_scan(*f32(u[:, 4:], delta[:, 4:], A, B[:, 4:], C[:, 4:], D), initial_state=ha)
  assert rel_err(jnp.concatenate([ya, yb], 1), ref_y) < 1e-5


def test_causal_conv_matches_torch_layout():
  rng = np.random.RandomState(0)
  u, w, bias = rng.randn(2, 7, 5), rng.randn(5, 1, 3), rng.randn(5)  # torch weight (ch, 1, K)
  ref = np.zeros_like(u)
  for t in range(7):
    for k in range(3):
      if t - 2 + k >= 0:
        ref[:, t] += w[:, 0, k] * u[:, t - 2 + k]
  y = mamba.causal_depthwise_conv1d(jnp.asarray(u), jnp.asarray(w.transpose(2, 1, 0)), jnp.asarray(bias))
  assert rel_err(y, ref + bias) < 1e-6


@pytest.mark.parametrize("variant", [{}, dict(use_bias=True, use_conv_bias=False, time_step_rank=3,
                                              tie_word_embeddings=False, residual_in_fp32=False)])
def test_forward_matches_numpy_reference(variant, mids):
  c = tiny_config(**variant)
  sd = random_hf_state_dict(c)
  params = mamba.mamba_params_from_torch_state_dict(sd, c)
  model = MambaLM(c)
  init_shapes = jax.tree.map(jnp.shape, jax.eval_shape(model.init, jax.random.PRNGKey(0), mids)["params"])
  assert jax.tree.map(jnp.shape, params) == init_shapes  # loader tree == the module's own tree
  out = jax.jit(model.forward)(params, mids)
  err = rel_err(out, np_mamba_logits(sd, c, mids))
  assert out.shape == (2, 10, c.vocab_size) and out.dtype == jnp.float32
  assert err < 1e-5, err


def test_config_from_hf_and_dict():
  from transformers import MambaConfig as HFMambaConfig
  hf = HFMambaConfig(vocab_size=97, hidden_size=40, state_size=4, num_hidden_layers=3, conv_kernel=3,
                     use_bias=True)
  c = MambaConfig.from_any(hf)
  assert (c.hidden_size, c.dt_rank, c.intermediate_size, c.conv_kernel, c.use_bias, c.num_hidden_layers) == (
      40, 3, 80, 3, True, 3)
  assert MambaConfig(hidden_size=40).dt_rank == 3  # "auto" = ceil(40 / 16)
  orig = MambaConfig.from_any({"d_model": 32, "n_layer": 2, "vocab_size": 50277, "pad_vocab_size_multiple": 8})
  assert (orig.hidden_size, orig.num_hidden_layers, orig.vocab_size) == (32, 2, 50280)
  assert MambaLM(hf).init_cache(2).ssm_state.shape == (3, 2, 80, 4)
  with pytest.raises(ValueError, match="hidden_act"):
    MambaConfig(hidden_act="gelu")
  with pytest.raises(ValueError, match="state_size"):
    MambaConfig(state_size=0)


# ----------------------------------------------------------------------------- 2. HF PyTorch


@pytest.mark.parametrize("variant", [{}, dict(use_bias=True, time_step_rank=3, tie_word_embeddings=False)])
def test_matches_hf_pytorch(variant, mids):
  torch = pytest.importorskip("torch")
  from transformers import MambaConfig as HFMambaConfig
  from transformers import MambaForCausalLM
  hf_cfg = HFMambaConfig(**{**TINY, **variant})
  torch.manual_seed(0)
  hf = MambaForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # move every weight off its special init (D = 1, A_log = log n, ...)
    for name, p in hf.named_parameters():
      p.add_(0.1 * torch.randn_like(p))
  with torch.no_grad():
    ref = hf(torch.tensor(np.array(mids))).logits.numpy()
  model = MambaLM(hf_cfg)
  params = mamba.mamba_params_from_torch_state_dict(hf.state_dict(), hf_cfg)
  out = model.forward(params, mids)
  err = rel_err(out, ref)
  assert err < 1e-4, err
  # greedy generation with HF's own cache path gives the same tokens
  prompt = mids[:, :4]
  with torch.no_grad():
    tp = torch.tensor(np.array(prompt))
    hf_tokens = hf.generate(tp, attention_mask=torch.ones_like(tp), max_new_tokens=6, do_sample=False,
                            min_new_tokens=6, pad_token_id=0).numpy()
  np.testing.assert_array_equal(np.asarray(model.generate(params, prompt, 6)), hf_tokens)


# ----------------------------------------------------------------------------- 3. compression


@pytest.fixture(scope="module")
def tiny_lm():
  c = tiny_config()
  model = MambaLM(c)
  params = mamba.mamba_params_from_torch_state_dict(random_hf_state_dict(c, seed=3), c)
  return model, params


def run(model, params, ids, cfg=None):
  with sl.intercept(cfg):
    return model.forward(params, ids)


def test_compress_full_rank_equals_dense(tiny_lm, mids):
  model, params = tiny_lm
  cfg = sl.CompressionConfig(include=INOUT, sharpness=1e6)
  cp = sl.compress_params(params, cfg)
  assert sorted(sl.layer_ranks(cp)) == [f"layers/{i}/mixer/{n}" for i in range(2) for n in ("in_proj", "out_proj")]
  assert "kernel" in cp["layers"]["0"]["mixer"]["x_proj"]  # not selected: untouched
  dense = model.forward(params, mids)
  out = jax.jit(lambda p: run(model, p, mids, cfg))(cp)
  assert rel_err(out, dense) < 1e-5, rel_err(out, dense)
  ex = sl.export_params(cp, cfg)  # full rank: kept dense (above break-even)
  assert rel_err(run(model, ex, mids), dense) < 1e-5


def test_default_selection_takes_linears_skips_conv(tiny_lm):
  _, params = tiny_lm
  paths = [p for p, _ in tree.selected_kernels(params, sl.CompressionConfig())]
  assert paths == [f"layers/{i}/mixer/{n}" for i in range(2) for n in ("dt_proj", "in_proj", "out_proj", "x_proj")]


@pytest.mark.parametrize("frac", [0.5, 0.9])
def test_export_equals_training_form(tiny_lm, mids, frac):
  model, params = tiny_lm
  cfg = sl.CompressionConfig(include=INOUT, sharpness=50.0)
  cp = set_alphas(sl.compress_params(params, cfg), frac)
  ex = sl.export_params(cp, cfg)
  ranks = sl.layer_ranks(ex, cfg)
  assert all(0 < int(r) < 16 for r in ranks.values()), ranks
  assert "left" in ex["layers"]["1"]["mixer"]["in_proj"]  # really factored (below break-even)
  train = run(model, cp, mids, cfg)
  assert rel_err(run(model, ex, mids), train) < 1e-5
  assert rel_err(train, model.forward(params, mids)) > 1e-3  # the cut changed the model


def test_gradients_flow_through_compressed_mamba(tiny_lm, mids):
  model, params = tiny_lm
  cfg = sl.CompressionConfig(include=INOUT, sharpness=20.0)
  cp = set_alphas(sl.compress_params(params, cfg), 0.5)
  g = jax.jit(jax.grad(lambda p: jnp.mean(run(model, p, mids, cfg) ** 2)))(cp)
  for path, gl in tree.factored_layers(g):
    for key in ("left", "right", "s", "alpha"):
      assert np.all(np.isfinite(gl[key])), (path, key)
    assert float(jnp.abs(gl["right"]).sum()) > 0, path
  assert float(jnp.abs(g["layers"]["0"]["mixer"]["A_log"]).sum()) > 0


# ----------------------------------------------------------------------------- 4. recurrent decoding


def stepwise_logits(model, params, ids, cfg=None):
  with sl.intercept(cfg):
    step = jax.jit(model.decode_step)
    cache = model.init_cache(ids.shape[0])
    out = []
    for t in range(ids.shape[1]):
      lg, cache = step(params, ids[:, t], cache)
      out.append(lg)
  return jnp.stack(out, 1), cache


def test_decode_matches_parallel_forward(tiny_lm, mids):
  model, params = tiny_lm
  cfg = sl.CompressionConfig(include=INOUT, sharpness=50.0)
  ex = sl.export_params(set_alphas(sl.compress_params(params, cfg), 0.7), cfg)
  for p in (params, ex):
    with sl.intercept(cfg):
      prefill = jax.jit(model.prefill)
      full, full_cache = prefill(p, mids)
    steps, cache = stepwise_logits(model, p, mids, cfg)
    assert rel_err(steps, full) < 1e-5, rel_err(steps, full)
    assert rel_err(cache.ssm_state, full_cache.ssm_state) < 1e-5
    np.testing.assert_allclose(cache.conv_state, full_cache.conv_state, rtol=1e-6, atol=1e-6)
  # prefill a prefix in parallel, then continue with the rest as one chunk
  _, c4 = model.prefill(params, mids[:, :4])
  rest, _ = model.prefill(params, mids[:, 4:], c4)
  assert rel_err(rest, model.forward(params, mids)[:, 4:]) < 1e-5
  c = model.cfg()
  assert cache.conv_state.shape == (2, 2, c.intermediate_size, c.conv_kernel)
  assert cache.ssm_state.shape == (2, 2, c.intermediate_size, c.state_size)


def test_generate_is_greedy_argmax_of_full_forward(tiny_lm, mids):
  model, params = tiny_lm
  cfg = sl.CompressionConfig(include=INOUT, sharpness=1e6)
  cp = sl.compress_params(params, cfg)
  prompt, n_new = mids[:, :3], 7
  for p in (params, cp):
    with sl.intercept(cfg):
      got = jax.jit(model.generate, static_argnums=2)(p, prompt, n_new)
      # repeated full forwards; one fixed length (the model is causal: later positions don't matter)
      fwd = jax.jit(model.forward)
      seq = jnp.zeros((2, 3 + n_new), jnp.int32).at[:, :3].set(prompt)
      for t in range(3, 3 + n_new):
        seq = seq.at[:, t].set(jnp.argmax(fwd(p, seq)[:, t - 1], -1).astype(jnp.int32))
    assert got.shape == (2, 3 + n_new)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(seq))
  np.testing.assert_array_equal(np.asarray(model.generate(params, prompt, 0)), np.asarray(prompt))


# ----------------------------------------------------------------------------- 5. loader


def test_loader_errors_name_the_tensor():
  c = tiny_config()
  sd = random_hf_state_dict(c)
  missing = {k: v for k, v in sd.items() if k != "backbone.layers.1.mixer.x_proj.weight"}
  with pytest.raises(ValueError, match=r"missing tensor 'backbone\.layers\.1\.mixer\.x_proj\.weight'.*\(9, 32\)"):
    mamba.mamba_params_from_torch_state_dict(missing, c)
  bad = dict(sd, **{"backbone.layers.0.mixer.in_proj.weight": np.zeros((64, 15), np.float32)})
  with pytest.raises(ValueError, match=r"'backbone\.layers\.0\.mixer\.in_proj\.weight' has shape \(64, 15\), "
                                       r"expected \(64, 16\)"):
    mamba.mamba_params_from_torch_state_dict(bad, c)
  with pytest.raises(ValueError, match=r"'backbone\.layers\.0\.mixer\.conv1d\.weight' has shape \(32, 1, 3\)"):
    mamba.mamba_params_from_torch_state_dict(
        dict(sd, **{"backbone.layers.0.mixer.conv1d.weight": np.zeros((32, 1, 3), np.float32)}), c)
  extra = dict(sd, **{"backbone.layers.2.norm.weight": np.ones(16, np.float32)})
  with pytest.raises(ValueError, match=r"backbone\.layers\.2\.norm\.weight"):
    mamba.mamba_params_from_torch_state_dict(extra, c)
  mamba.mamba_params_from_torch_state_dict(extra, c, strict=False)
  # a bare MambaModel's names and the original checkpoints' "embedding." are accepted
  bare = {k.replace("backbone.", "").replace("embeddings.", "embedding."): v for k, v in sd.items()}
  a = mamba.mamba_params_from_torch_state_dict(bare, c)
  b = mamba.mamba_params_from_torch_state_dict(sd, c)
  assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a, b)))


def test_load_safetensors_folder(tmp_path, mids):
  from safetensors.numpy import save_file
  c = tiny_config()
  sd = random_hf_state_dict(c, seed=5)
  save_file(sd, str(tmp_path / "model.safetensors"))
  hf_json = {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 16,
             "num_hidden_layers": 2, "state_size": 4, "expand": 2, "conv_kernel": 4, "vocab_size": 97,
             "time_step_rank": 1, "intermediate_size": 32, "use_bias": False, "use_conv_bias": True,
             "layer_norm_epsilon": 1e-5, "residual_in_fp32": True, "pad_vocab_size_multiple": 8}
  (tmp_path / "config.json").write_text(json.dumps(hf_json))
  model, params = mamba.load_mamba_safetensors(str(tmp_path))
  assert model.cfg() == c.__class__(**{**TINY, "time_step_rank": 1})
  assert rel_err(model.forward(params, mids), np_mamba_logits(sd, c, mids)) < 1e-5
  with pytest.raises(FileNotFoundError, match="config.json"):
    mamba.load_mamba_safetensors(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- 6. Mamba-130m shape


MAMBA_130M = dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24, expand=2,
                  conv_kernel=4)


@pytest.mark.slow
def test_mamba_130m_shape_runs_and_compresses():
  c = MambaConfig(**MAMBA_130M)
  model = MambaLM(c)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, c.vocab_size, (1, 8)), jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids)["params"]
  n = sum(x.size for x in jax.tree.leaves(params))
  assert 125e6 < n < 135e6, n  # mamba-130m: 129.1M with tied embeddings
  fwd = jax.jit(model.forward)
  t0 = time.perf_counter()
  out = fwd(params, ids).block_until_ready()
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  fwd(params, ids).block_until_ready()
  print(f"\nmamba-130m (1, 8) forward: first call (compile + run) {first:.1f}s, "
        f"then {time.perf_counter() - t0:.3f}s")
  assert out.shape == (1, 8, c.vocab_size) and bool(jnp.all(jnp.isfinite(out)))
  # both in/out_proj shapes, in the first and last block (the SVDs of all 48 take minutes on 2 cores)
  cfg = sl.CompressionConfig(include=r"layers/(0|23)/mixer/(in_proj|out_proj)", sharpness=1e6)
  cp = sl.compress_params(params, cfg)
  assert len(sl.layer_ranks(cp)) == 4
  assert cp["layers"]["23"]["mixer"]["in_proj"]["left"].shape == (768, 768)
  assert cp["layers"]["0"]["mixer"]["out_proj"]["right"].shape == (768, 768)
  with sl.intercept(cfg):
    out_c = jax.jit(model.forward)(cp, ids)
  err = rel_err(out_c, out)
  print(f"mamba-130m compressed (full rank) vs dense: max rel err {err:.2e}")
  assert err < 1e-4

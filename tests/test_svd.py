"""The decomposition registry and Calibration: a decomposition registered here alone is handed the
Calibration and goes through compress_params, static_svd and export; Grams are collected once per run;
a partly compressed tree's Grams come through its compressed layers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import calib, svd
from tests.conftest import VOCAB, build, rel_err
from tests.test_whiten import eager_grams


def calib_batches(n=3, b=2, t=12, seed=1):
  rng = np.random.RandomState(seed)
  return [{"input_ids": jnp.asarray(rng.randint(0, VOCAB, (b, t)), jnp.int32)} for _ in range(n)]


def counting_apply(model, calls):
  def apply_fn(p, batch):
    calls.append(1)
    return model(batch["input_ids"], params=p).logits
  return apply_fn


def leaves_equal(a, b):
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  return [k for k, _ in la] == [k for k, _ in lb] and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb))


@pytest.fixture
def recorded():
  """A toy decomposition that needs the Calibration: it records what it was handed and returns plain
  SVD factors."""
  seen = []

  def factors(params, cfg, calibration):
    seen.append(calibration)
    return svd.plain_factors(params, cfg)
  svd.register(svd.Decomposition("recorded", needs="calibration", factors=factors))
  try:
    yield seen
  finally:
    svd.unregister("recorded")


def test_registered_decomposition_gets_the_calibration_and_exports(recorded):
  model = build("llama")
  assert sl.config.DECOMPOSITIONS == ("svd", "whitened", "propagated", "recorded")
  cfg = sl.CompressionConfig(decomposition="recorded", target_ratio=0.5)
  cal = sl.Calibration(counting_apply(model, []), calib_batches(), progress=False)
  cp = sl.compress_params(model.params, cfg, calibration=cal)
  assert len(recorded) == 1 and recorded[0] is cal
  assert leaves_equal(cp, sl.compress_params(model.params, cfg.replace(decomposition="svd")))
  static = sl.static_svd(model.params, cfg, calibration=cal)
  assert len(recorded) == 2 and recorded[1] is cal
  assert leaves_equal(static, sl.static_svd(model.params, cfg.replace(decomposition="svd")))
  assert cal.collections == 0, "the toy draws nothing"
  # export equals the training form
  layers = dict(sl.tree.factored_layers(cp))
  cp = sl.tree.map_modules(cp, lambda p, n: {**n, "alpha": 0.4 * n["s"][0]} if p in layers else n)
  ex = sl.export_params(cp, cfg)
  ids = calib_batches(n=1, seed=7)[0]["input_ids"]
  with sl.intercept(cfg):
    train_form = model(ids, params=cp).logits
    exported = model(ids, params=ex).logits
  assert rel_err(exported, train_form) < 1e-5
  assert int(sl.count_params(ex, cfg)) == int(sl.count_params(cp))
  with pytest.raises(ValueError, match="'recorded' draws its statistics while compressing and needs a Calibration"):
    sl.compress_params(model.params, cfg)


def test_decomposition_registry_errors():
  with pytest.raises(ValueError, match=r"unknown decomposition 'nope'; expected one of \('svd', 'whitened', "
                     r"'propagated'\)"):
    sl.CompressionConfig(decomposition="nope")
  with pytest.raises(ValueError, match="registered already"):
    svd.register(svd.Decomposition("svd", needs="nothing", factors=svd.plain_factors))
  with pytest.raises(ValueError, match="needs must be one of"):
    svd.Decomposition("x", needs="everything", factors=svd.plain_factors)
  model = build("llama")

  mode = {}

  def short(params, cfg, stats):  # drops a layer, or cuts a layer's right factor
    out = svd.plain_factors(params, cfg)
    if mode["drop"]:
      del out[mode["path"]]
    else:
      u, s, vt, dt = out[mode["path"]]
      out[mode["path"]] = (u, s, vt[:, :3], dt)
    return out
  svd.register(svd.Decomposition("short", needs="nothing", factors=short))
  try:
    cfg = sl.CompressionConfig(decomposition="short")
    path, kernel = sl.tree.selected_kernels(model.params, cfg)[1]
    mode.update(drop=True, path=path)
    with pytest.raises(ValueError, match=f"'short' returned no factors for layer '{path}'"):
      sl.compress_params(model.params, cfg)
    mode.update(drop=False)
    rows, cols = np.shape(kernel)
    with pytest.raises(ValueError, match=rf"layer '{path}': decomposition 'short' returned left \({rows}, \d+\), "
                                         rf"s \(\d+,\), right \(\d+, 3\); expected \({rows}, q\), \(q,\), "
                                         rf"\(q, {cols}\)"):
      sl.static_svd(model.params, cfg)
  finally:
    svd.unregister("short")


def test_grams_collected_once_per_run(monkeypatch):
  """One Calibration shared by whitened softlm, llrc and static at two CRs: Grams are collected once, and
  every result equals the one from explicit grams=."""
  model = build("llama")
  collects = []
  real = calib.collect_grams
  monkeypatch.setattr(calib, "collect_grams", lambda *a, **k: collects.append(1) or real(*a, **k))
  calls = []
  cal = sl.Calibration(counting_apply(model, calls), calib_batches(), progress=False)
  base = sl.CompressionConfig(decomposition="whitened", normalize="uniform_rank")
  grams = None
  for cr in (0.3, 0.5):
    cfg = base.replace(target_ratio=cr)
    cp = sl.compress_params(model.params, cfg, calibration=cal)
    if grams is None:
      grams, traced = cal.grams(model.params, cfg), len(calls)
      assert traced > 0
    lm = sl.compress_params(model.params, cfg.replace(method="llrc"), calibration=cal)
    static = sl.static_svd(model.params, cfg, calibration=cal)
    assert leaves_equal(cp, sl.compress_params(model.params, cfg, grams=grams))
    assert leaves_equal(lm, sl.compress_params(model.params, cfg.replace(method="llrc"), grams=grams))
    assert leaves_equal(static, sl.static_svd(model.params, cfg, grams=grams))
  assert len(collects) == 1 and cal.collections == 1
  assert len(calls) == traced, "apply_fn never ran again after the one collection"
  # the cached Grams are the collect_grams ones
  direct = real(lambda p, b: model(b["input_ids"], params=p).logits, model.params, calib_batches(), base,
                progress=False)
  assert set(direct) == set(grams) and all(np.array_equal(direct[p], grams[p]) for p in grams)
  # a plain-SVD config ignores the Calibration; explicit grams= with it is still an error
  plain = sl.compress_params(model.params, base.replace(decomposition="svd"), calibration=cal)
  assert leaves_equal(plain, sl.compress_params(model.params, base.replace(decomposition="svd")))
  with pytest.raises(ValueError, match="decomposition is 'svd'"):
    sl.compress_params(model.params, base.replace(decomposition="svd"), grams=grams)
  # another selection, or other weights (e.g. a fine-tuned teacher), is another collection
  cal.grams(model.params, base.replace(include=r"layers/0/"))
  assert cal.collections == 2
  other = build("llama", seed=1).params
  g_other = cal.grams(other, base)
  assert cal.collections == 3 and not np.array_equal(g_other[next(iter(grams))], grams[next(iter(grams))])
  assert cal.grams(model.params, base) is grams and cal.grams(other, base) is g_other and cal.collections == 3


def test_partly_compressed_grams_come_through_the_compressed_layers():
  """Calibration.collect on a tree whose block 0 is already factored (rank 2): block 1's Grams are those of
  the inputs the compressed block produces (reference: the same truncation as dense kernels, eagerly)."""
  model = build("llama")
  first = sl.CompressionConfig(include=r"layers/0/", init_rank=2, sharpness=1e6)
  second = first.replace(include=r"layers/1/")
  partial = sl.compress_params(model.params, first)
  batches = calib_batches()
  cal = sl.Calibration(lambda p, b: model(b["input_ids"], params=p).logits, batches, progress=False)
  got = cal.grams(partial, second)
  assert cal.collections == 1
  cal.grams(partial, second)
  assert cal.collections == 2, "a partly compressed tree is never served from the cache"

  # the reference: block 0's kernels replaced by their rank-2 products, block 1 read eagerly
  def truncate(path, node):
    if not sl.tree.is_factored(node):
      return node
    th = np.asarray(sl.singular_scale(node, first))
    kernel = (np.asarray(node["left"]) * th) @ np.asarray(node["right"])
    return {**{k: v for k, v in node.items() if k not in ("left", "s", "right", "alpha")},
            "kernel": jnp.asarray(kernel)}
  dense_trunc = sl.tree.map_modules(partial, truncate)
  ref = eager_grams(model, dense_trunc, batches, second)
  assert set(got) == set(ref) and ref
  dense_grams = sl.collect_grams(lambda p, b: model(b["input_ids"], params=p).logits, model.params, batches, second,
                                 progress=False)
  for path in ref:
    assert rel_err(got[path], ref[path]) < 1e-4, path
  assert max(rel_err(got[p], dense_grams[p]) for p in ref) > 1e-2, "the truncation changed block 1's inputs"


def test_calibration_batches_from_a_callable():
  model = build("gpt2")
  made = []

  def batches():
    made.append(1)
    return iter(calib_batches(n=2))
  cal = sl.Calibration(lambda p, b: model(b["input_ids"], params=p).logits, batches, progress=False)
  cfg = sl.CompressionConfig(decomposition="whitened")
  g1 = cal.collect(model.params, cfg)
  g2 = cal.collect(model.params, cfg)
  assert made == [1, 1] and g1.tokens == g2.tokens == 2 * 2 * 12
  assert all(np.array_equal(g1[p], g2[p]) for p in g1)


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_cpu_lapack_whitening_equals_the_xla_path(damp):
  """On the CPU the whitened decomposition runs through LAPACK (syevd + the thin SVD of the smaller
  side's Gram); it gives XLA's factors up to the SVD's sign freedom: equal values, equal products."""
  rng = np.random.RandomState(0)
  x = rng.randn(300, 24).astype(np.float32) @ rng.randn(24, 24).astype(np.float32)  # correlated inputs
  kernels = rng.randn(2, 24, 16).astype(np.float32)
  grams = np.stack([x.T @ x, (x[:200].T @ x[:200])]).astype(np.float32)
  from softlm_jax.svd import _whiten, _whiten_lapack
  l1, s1, r1 = _whiten_lapack(kernels, grams, 1e-6, damp)
  l2, s2, r2 = (np.asarray(a) for a in _whiten(jnp.asarray(kernels), jnp.asarray(grams), 1e-6, damp))
  np.testing.assert_allclose(s1, s2, rtol=2e-4)
  for r in (4, 16):
    p1 = np.einsum("bik,bk,bkj->bij", l1[..., :r], s1[:, :r], r1[:, :r])
    p2 = np.einsum("bik,bk,bkj->bij", l2[..., :r], s2[:, :r], r2[:, :r])
    np.testing.assert_allclose(p1, p2, rtol=1e-3, atol=1e-4 * np.abs(p2).max())
  np.testing.assert_allclose(np.einsum("bik,bk,bkj->bij", l1, s1, r1), kernels, atol=1e-4)

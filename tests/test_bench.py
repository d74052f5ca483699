"""The benchmark runs end to end on tiny models in seconds and writes the promised JSON fields (no
timing thresholds here: timings live in BENCHMARKS.md). Also: the merged / factored ways of applying
a factored layer give the same outputs and gradients, and rank rounding."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import bench
from softlm_jax.export import rounded_rank
from softlm_jax.intercept import apply_costs, apply_mode, factored_apply
from tests.conftest import build, rel_err

CASE_FIELDS = {"mode", "batch", "seq", "case", "median_s", "p25_s", "p75_s", "spread", "n", "times_s",
               "compile_s", "memory", "tokens"}
COMPRESSED_FIELDS = {"flop_ratio", "ideal_linear_speedup", "amdahl_bound", "speedup", "speedup_p25",
                     "speedup_p75", "weight_bytes", "weight_saving", "outside_share", "power"}


@pytest.mark.slow  # the whole benchmark end to end: scripts/test.sh --all
def test_cli_tiny_bert_json_fields(tmp_path):
  out = tmp_path / "bench"
  summary = bench.main(["--model", "tiny-bert", "--batch", "2", "--seq", "8", "--crs", "0.5",
                        "--rank-multiple", "1", "4", "--reps", "2", "--warmup", "1", "--train",
                        "--train-batch", "2", "--train-seq", "8", "--train-init-ranks", "break_even",
                        "--train-modes", "auto", "--train-reps", "2", "--compress", "--out", str(out)])
  res = json.loads((out / "tiny-bert.json").read_text())
  assert {"device", "versions", "config", "cases", "variants", "loadavg", "power", "timing"} <= set(res)
  assert res["device"]["platform"] == jax.devices()[0].platform and res["versions"]["jax"] == jax.__version__
  assert res["config"]["model"] == "tiny-bert" and res["config"]["batches"] == [2]
  names = {c["case"] for c in res["cases"]}
  assert names == {"dense", "static_cr0.5", "static_cr0.5_m4", "outside"}
  for c in res["cases"]:
    assert CASE_FIELDS <= set(c), c["case"]
    assert c["n"] == 2 and c["median_s"] > 0 and c["compile_s"] > 0
    assert c["memory"]["peak_bytes"] > 0
    if c["case"] != "outside":
      assert COMPRESSED_FIELDS <= set(c), c["case"]
  by = {c["case"]: c for c in res["cases"]}
  assert by["dense"]["flop_ratio"] == 1.0 and by["dense"]["weight_saving"] == 0.0
  half = by["static_cr0.5"]
  assert 0.45 < half["flop_ratio"] <= 0.5 and half["ideal_linear_speedup"] == pytest.approx(1 / half["flop_ratio"])
  assert half["weight_bytes"] < by["dense"]["weight_bytes"]
  assert all(r % 4 == 0 for r in res["variants"]["static_cr0.5_m4"]["ranks"])
  if jax.devices()[0].platform != "gpu":
    assert "skipped" in res["power"] and "no NVIDIA GPU" in half["power"]["skipped"]
  train = json.loads((out / "train_tiny-bert.json").read_text())[0]
  assert set(train["steps"]) == {"dense", "softlm_break_even"}
  for name, row in train["steps"].items():
    assert row["median_s"] > 0 and row["memory"]["peak_bytes"] > 0
    if name != "dense":
      assert row["step_vs_dense"] > 0 and row["peak_memory_vs_dense"] > 0
  comp = json.loads((out / "compress_tiny-bert.json").read_text())
  assert comp["compress_vs_numpy_svd"] > 0 and comp["matrices"] == {"32x32": 8, "32x48": 2, "48x32": 2}
  assert os.path.exists(summary["plot"]) and (out / "tiny-bert.md").read_text().startswith("| mode")


def test_decoder_decode_with_cache():
  res = bench.run_benchmark("tiny-llama", batches=[2], seqs=[8], crs=[0.5], reps=2, warmup=1,
                            log=lambda *_: None)
  modes = {(c["mode"], c["case"]) for c in res["cases"]}
  assert ("decode", "static_cr0.5") in modes and ("forward", "dense") in modes
  dec = [c for c in res["cases"] if c["mode"] == "decode"]
  assert all(c["tokens"] == 2 for c in dec) and res["config"]["donate_cache"]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decode_step_matches_forward(name):
  """The decode path the benchmark times computes the model: cached steps reproduce the forward."""
  model = build(name)
  bm = bench.BenchModel(name, name, model, model.params, {"vocab_size": 97})
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 6)), jnp.int32)
  full = bm.forward(model.params, ids)
  cache = bm.init_cache(2, 6)
  step = jax.jit(bm.decode)
  for t in range(6):
    logits, cache = step(model.params, cache, ids[:, t:t + 1], jnp.full((2, 1), t, jnp.int32))
    assert rel_err(logits[:, 0], full[:, t]) < 1e-4, t


def test_skip_linears_keeps_shapes():
  model = build("bert")
  ids = jnp.zeros((2, 5), jnp.int32)
  with bench.skip_linears():
    out = model(ids, params=model.params).logits
  assert out.shape == model(ids, params=model.params).logits.shape


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("scaled", [True, False])
def test_merged_equals_factored_with_gradients(layout, scaled):
  rng = np.random.RandomState(0)
  rows, k, cols = 12, 7, 9
  x = jnp.asarray(rng.randn(3, 5, rows if layout == "in_out" else cols), jnp.float32)
  left, right = jnp.asarray(rng.randn(rows, k), jnp.float32), jnp.asarray(rng.randn(k, cols), jnp.float32)
  scale = jnp.asarray(rng.rand(k), jnp.float32) if scaled else None
  bias = jnp.asarray(rng.randn(cols if layout == "in_out" else rows), jnp.float32)

  def f(mode):
    def loss(x, left, right, scale, bias):
      return jnp.sum(jnp.sin(factored_apply(x, left, right, scale, bias, layout=layout, mode=mode)))
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4) if scaled else (0, 1, 2, 4))(x, left, right, scale, bias)

  (va, ga), (vb, gb) = f("factored"), f("merged")
  assert abs(float(va - vb)) < 1e-4 * abs(float(va))
  for a, b in zip(ga, gb):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  dense = (left * (1 if scale is None else scale)) @ right
  w = dense if layout == "in_out" else dense.T
  np.testing.assert_allclose(factored_apply(x, left, right, scale, bias, layout=layout), x @ w + bias,
                             rtol=1e-4, atol=1e-4)


def test_auto_mode_picks_fewer_flops():
  assert apply_costs(4096, 384, 384, 384)["merged"] < apply_costs(4096, 384, 384, 384)["factored"]
  assert apply_costs(4096, 384, 96, 384)["merged"] > apply_costs(4096, 384, 96, 384)["factored"]
  assert apply_costs(1, 384, 384, 384)["merged"] > apply_costs(1, 384, 384, 384)["factored"]
  with pytest.raises(ValueError, match="mode"):
    factored_apply(jnp.ones((1, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), None, None, mode="fast")


def test_whole_model_gradients_same_in_every_mode():
  model = build("gpt2")
  cfg = sl.CompressionConfig(sharpness=20.0)
  cp = sl.compress_params(model.params, cfg)
  ids = jnp.asarray(np.random.RandomState(1).randint(0, 97, (4, 40)), jnp.int32)

  def loss(p):
    with sl.intercept(cfg):
      return jnp.mean(model(ids, params=p).logits ** 2)
  out = {}
  for mode in ("factored", "merged"):
    with apply_mode(mode):
      out[mode] = jax.jit(jax.value_and_grad(loss))(cp)
  assert rel_err(out["merged"][0], out["factored"][0]) < 1e-5
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(out["factored"][1]))
  for a, b in zip(jax.tree.leaves(out["merged"][1]), jax.tree.leaves(out["factored"][1])):
    assert float(jnp.max(jnp.abs(a - b))) < 1e-4 * scale


def test_rank_rounding():
  assert rounded_rank(307, 16) == 304 and rounded_rank(307, 16, "up") == 320
  assert rounded_rank(5, 16) == 5 and rounded_rank(192, 64) == 192 and rounded_rank(7, 1) == 7
  with pytest.raises(ValueError):
    rounded_rank(7, 0)
  model = build("bert")
  cfg = sl.CompressionConfig(target_ratio=0.5)
  ex = sl.static_svd(model.params, cfg, rank_multiple=4)
  assert all(int(r) % 4 == 0 for r in sl.layer_ranks(ex).values())
  assert int(sl.count_params(ex, cfg)) <= sl.target_params(model.params, cfg)
  # rounding up the export of a trained tree pads zero triplets: the same function
  cp = sl.compress_params(model.params, cfg)
  cp = jax.tree.map(lambda x: x, cp)
  for _, layer in sl.tree.factored_layers(cp):
    layer["alpha"] = jnp.quantile(layer["s"], 0.55)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 7)), jnp.int32)
  with sl.intercept(cfg):
    ref = model(ids, params=sl.export_params(cp, cfg)).logits
    up = sl.export_params(cp, cfg, rank_multiple=8, rank_rounding="up")
    assert rel_err(model(ids, params=up).logits, ref) < 1e-5
  assert all(int(r) % 8 == 0 or int(r) == min(np.shape(layer["left"])[0], np.shape(layer["right"])[1])
             for (_, layer), r in zip(sl.tree.factored_layers(up), sl.layer_ranks(up).values()))

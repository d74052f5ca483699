"""Flax NNX models through the same pipeline.

The reference for every NNX result is the same model in Hugging Face's Flax Llama (Linen) on the same
weights: the NNX Llama's logits, each decomposition's singular values, the allocation's ranks and the
compressed logits must agree. Beside that: einsum kernels as matrices against ``jnp.einsum``, full rank
against dense, export against the training form, the budget fill, bit-equal compact round trips, and a
reloaded compact module trained further with ``flax.nnx.LoRA``.
"""
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import softlm_jax as sl
from softlm_jax import allocate as al
from softlm_jax import budget, propagate, svd, tree
from softlm_jax.models import nnx_llama
from softlm_jax.nnx_bridge import LinearMap, NNXModel, adapt, map_spec
from softlm_jax.tasks import lm_loss
from tests.conftest import VOCAB, build, rel_err

# --- einsum kernels as matrices --------------------------------------------------------------------------

EQUATIONS = [  # (equation, x shape, kernel shape)
    ("BTD,DNH->BTNH", (2, 3, 8), (8, 4, 5)),
    ("BSD,DKH->BSKH", (2, 3, 8), (8, 2, 5)),
    ("BTNH,NHD->BTD", (2, 3, 4, 5), (4, 5, 8)),
    ("btd,dnh->bnth", (2, 3, 8), (8, 4, 5)),  # output axes in another order
    ("...NH,NHD->...D", (2, 3, 4, 5), (4, 5, 6)),
    ("BTD,DV->BTV", (2, 3, 8), (8, 7)),
]


@pytest.mark.parametrize("eq,xs,ws", EQUATIONS)
def test_an_einsum_kernel_is_the_matrix_of_its_contraction(eq, xs, ws):
  rng = np.random.RandomState(0)
  x, w = jnp.asarray(rng.normal(size=xs), jnp.float32), jnp.asarray(rng.normal(size=ws), jnp.float32)
  spec = map_spec(eq, ws)
  contracted = [ws[eq.split(",")[1].split("-")[0].index(c)] for c in spec.contracted]
  assert (spec.rows, spec.cols) == (int(np.prod(contracted)), int(np.prod(ws)) // int(np.prod(contracted)))
  got = LinearMap(spec, {"kernel": spec.matrix(w)}, path=("m",))(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.einsum(eq, x, w)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eq,why", [
    ("BTNH,NHD->BTND", "batched contraction"),
    ("BTD,DD->BTD", "repeats"),
    ("BTD,DNH->BTN", "summed inside one operand"),
    ("BTD,DNH,HK->BTK", "two operands"),
])
def test_an_einsum_that_is_not_one_matrix_product_is_refused(eq, why):
  with pytest.raises(ValueError, match=why):
    map_spec(eq, (4, 5, 6) if eq.count(",") == 1 and "DD" not in eq else (4, 4))


class _PerHead(nnx.Module):
  """A per-head projection (``N`` in the kernel, the input and the output): not one matrix product."""

  def __init__(self):
    self.einsum_str = "BTNH,NHD->BTND"
    self.w = nnx.Param(jnp.ones((2, 3, 4)))

  def __call__(self, x):
    return jnp.einsum(self.einsum_str, x, self.w[...])


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.Einsum("btd,dnh->btnh", (8, 2, 3), (2, 3), rngs=rngs)
    self.heads = _PerHead()

  def __call__(self, x):
    return self.heads(self.proj(x)).sum(-1)


class _Stack(nnx.Module):
  def __init__(self):
    self.layers = nnx.List([_Block(nnx.Rngs(0))])

  def __call__(self, x):
    return self.layers[0](x)


def test_adapt_keeps_the_function_and_reports_what_it_leaves():
  """``nnx.Einsum`` with a bias becomes a :class:`LinearMap` (same output); the per-head einsum is left
  as it is and reported by path with the reason; the user's module is not changed."""
  model = _Stack()
  x = jnp.asarray(np.random.RandomState(1).normal(size=(2, 3, 8)), jnp.float32)
  canonical, skipped = adapt(model)
  assert isinstance(canonical.layers[0].proj, LinearMap) and isinstance(model.layers[0].proj, nnx.Einsum)
  assert type(canonical.layers[0].heads) is _PerHead
  assert list(skipped) == ["layers/0/heads"] and "batched contraction" in skipped["layers/0/heads"]
  np.testing.assert_allclose(np.asarray(canonical(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6)


# --- the NNX Llama against HF's Flax Llama -----------------------------------------------------------------


@pytest.fixture(scope="module")
def twin():
  """``(hf model, nnx handle, nnx module)``: the tiny HF Flax Llama (GQA 4/2, untied head) and the NNX
  Llama holding the same weights."""
  hf = build("llama")
  c = hf.config
  config = nnx_llama.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                 intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                 num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                                 rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
                                 tie_word_embeddings=c.tie_word_embeddings)
  module = nnx_llama.build(config, nnx_llama.params_from_hf_flax(hf.params, config))
  return hf, NNXModel(module), module


def hf_path(path: str) -> str:
  """``layers/0/attn/q_proj`` -> ``model/layers/0/self_attn/q_proj`` (the HF Flax Llama's path)."""
  return "model/" + path.replace("/attn/", "/self_attn/")


@pytest.fixture(scope="module")
def batches():
  rng = np.random.RandomState(3)
  return [jnp.asarray(rng.randint(0, VOCAB, (2, 12)), jnp.int32) for _ in range(3)]


def hf_logits(hf, params, ids, cfg=None):
  with sl.intercept(cfg):
    return hf(ids, params=params).logits


def nnx_logits(handle, params, ids, cfg=None):
  with sl.intercept(cfg):
    return handle.apply(params, ids)


def test_the_nnx_llama_computes_hf_flax_llama(twin, batches):
  hf, handle, module = twin
  ids = batches[0]
  ref = hf_logits(hf, hf.params, ids)
  assert rel_err(module(ids), ref) < 1e-5
  assert rel_err(nnx_logits(handle, handle.params, ids), ref) < 1e-5
  # the canonical tree holds the HF kernels (3-D einsum kernels as their matrices)
  flat, hflat = tree.flatten(handle.params), tree.flatten(hf.params)
  for p, _ in tree.selected_kernels(handle.params, sl.CompressionConfig()):
    np.testing.assert_array_equal(np.asarray(flat[p + "/kernel"]), np.asarray(hflat[hf_path(p) + "/kernel"]))


RULES = {"softlm": sl.CompressionConfig(method="softlm", target_ratio=0.5, sharpness=1e6),
         "llrc": sl.CompressionConfig(method="llrc", target_ratio=0.5)}


def _hard_cut(cp, cfg, ranks):
  """The training form cut at ``ranks`` (SoftLM: thresholds between the values; LLRC: mask logits +-3
  keeping the first ``r``)."""
  if cfg.method == "softlm":
    return al.alpha_for_ranks(cp, ranks)

  def visit(path, node):
    if "mask_logits" not in node:
      return node
    k = node["mask_logits"].shape[0]
    return {**node, "mask_logits": jnp.where(jnp.arange(k) < ranks[path], 3.0, -3.0)}
  return tree.map_modules(cp, visit)


def _full_rank(cp, cfg):
  return al.full_rank(cp, cfg) if cfg.method == "softlm" else cp


FAST_CASES = {("softlm", "whitened"), ("llrc", "propagated")}  # the other four: scripts/test.sh --all


@pytest.mark.parametrize("rule,decomposition", [
    pytest.param(r, d, marks=() if (r, d) in FAST_CASES else pytest.mark.slow)
    for r in RULES for d in ("svd", "whitened", "propagated")])
def test_every_rule_and_decomposition_gives_the_linen_result(twin, batches, rule, decomposition, tmp_path):
  hf, handle, module = twin
  cfg = RULES[rule].replace(decomposition=decomposition)
  ids = batches[0]
  cal_nnx = sl.Calibration(handle.apply, batches, progress=False)
  cal_hf = sl.Calibration(lambda p, b: hf(b, params=p).logits, batches, progress=False)
  f_nnx = svd.decompose(handle.params, cfg, None, cal_nnx)
  f_hf = svd.decompose(hf.params, cfg, None, cal_hf)
  assert sorted(hf_path(p) for p in f_nnx) == sorted(f_hf)
  # float32 rounding differs between the two attention implementations; the whitened decompositions
  # amplify it in the weakest directions of ill-conditioned Grams (o_proj's input under GQA), the
  # propagated one also passes it on from the layers above
  tol = {"svd": 1e-6, "whitened": 1e-4, "propagated": 1e-3}[decomposition]
  for p, (u, s, vt, _) in f_nnx.items():
    np.testing.assert_allclose(s, f_hf[hf_path(p)][1], rtol=2e-4, atol=tol * float(s[0]), err_msg=p)

  # full rank equals dense, on both paths alike
  cp = sl.compress_params(handle.params, cfg, factors=f_nnx)
  cp_hf = sl.compress_params(hf.params, cfg, factors=f_hf)
  dense = nnx_logits(handle, handle.params, ids)
  f_full, tol_full = f_nnx, 1e-5
  if decomposition == "propagated":  # its factors are fitted at the allocated ranks: refit at full rank
    full = {p: min(np.shape(k)) for p, k in tree.selected_kernels(handle.params, cfg)}
    f_full = propagate.propagated_factors(handle.params, cfg, (handle.apply, batches, None), ranks=full, progress=False)
    tol_full = 1e-3  # a least-squares refit of each layer on float32 Grams, as the Linen path's test
  cp_full = sl.compress_params(handle.params, cfg, factors=f_full)
  assert rel_err(nnx_logits(handle, _full_rank(cp_full, cfg), ids, cfg), dense) < tol_full

  # the same allocation from the same Fisher scores; the budget filled exactly
  score_cfg = cfg.replace(method="softlm", sharpness=1e6)
  stats = al.triplet_stats(sl.compress_params(handle.params, score_cfg, factors=f_nnx), score_cfg,
                           lambda p, b: lm_loss(handle.apply(p, b), b), batches, progress=False)
  ranks = al.allocate_ranks(cp, cfg, al.drop_losses(stats))
  stats_hf = al.triplet_stats(sl.compress_params(hf.params, score_cfg, factors=f_hf), score_cfg,
                              lambda p, b: lm_loss(hf(b, params=p).logits, b), batches, progress=False)
  assert {hf_path(p): r for p, r in ranks.items()} == al.allocate_ranks(cp_hf, cfg, al.drop_losses(stats_hf))
  cut = _hard_cut(cp, cfg, ranks)
  target, count = budget.target_params(cp, cfg), int(sl.count_params(cut, cfg))
  assert count <= target
  nxt = al.next_step_costs(al.layer_shapes(cp), ranks)
  assert all(c > target - count for c in nxt.values())
  # from the same factors, the two paths compute the same compressed model
  cut_hf = _hard_cut(cp_hf, cfg, {hf_path(p): r for p, r in ranks.items()})
  same = _hard_cut(sl.compress_params(handle.params, cfg, factors={p: f_hf[hf_path(p)] for p in f_nnx}), cfg, ranks)
  assert rel_err(nnx_logits(handle, same, ids, cfg), hf_logits(hf, cut_hf, ids, cfg)) < 1e-5

  # static (the same keep-ratio in every layer) and allocated (static SVD at the allocated ranks): exported
  # trees, the same ranks and the same model as the Linen path's from the same factors, within the budget
  same_f = {p: f_hf[hf_path(p)] for p in f_nnx}
  assert {hf_path(p): r for p, r in sl.static_ranks(handle.params, cfg).items()} == sl.static_ranks(hf.params, cfg)
  for name, tree_nnx, tree_hf in (
      ("static", sl.static_svd(handle.params, cfg, factors=same_f), sl.static_svd(hf.params, cfg, factors=f_hf)),
      ("allocated", al.allocated_static(handle.params, cfg, same_f, ranks),
       al.allocated_static(hf.params, cfg, f_hf, {hf_path(p): r for p, r in ranks.items()}))):
    assert int(sl.count_params(tree_nnx, cfg)) == int(sl.count_params(tree_hf, cfg)) <= target, name
    assert rel_err(nnx_logits(handle, tree_nnx, ids), hf_logits(hf, tree_hf, ids)) < 1e-5, name

  # export equals the training form; the exported module counts what the tree counts
  ex = sl.export_params(cut, cfg)
  assert rel_err(nnx_logits(handle, ex, ids), nnx_logits(handle, cut, ids, cfg)) < 1e-5
  trained = handle.module_for(cut, cfg)  # the user's view: an nnx.Module in training form
  compact = sl.export_params(trained, cfg)
  assert rel_err(compact(ids), trained(ids)) < 1e-5
  assert int(sl.count_params(compact, cfg)) == int(sl.count_params(ex, cfg)) == int(sl.count_params(trained, cfg))

  # compact round trip: bit-equal arrays, the same module
  path = tmp_path / "compact.safetensors"
  sl.save_module(path, compact, cfg=cfg, family="tiny-llama-nnx")
  back = sl.load_module(path)
  a, b = tree.flatten(NNXModel(compact).params), tree.flatten(NNXModel(back).params)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(compact(ids)))
  # a model of one's own: the file plus the dense model's abstract twin
  sl.save_module(tmp_path / "own.safetensors", compact, cfg=cfg)
  twin_shapes = nnx.eval_shape(lambda: nnx_llama.LlamaForCausalLM(module.config, rngs=nnx.Rngs(0)))
  np.testing.assert_array_equal(np.asarray(sl.load_module(tmp_path / "own.safetensors", twin_shapes)(ids)),
                                np.asarray(compact(ids)))


def test_compress_params_takes_and_returns_an_nnx_module(twin, batches):
  """The public names on a module: a new module in training form (the user's module unchanged) that
  computes what the tree computes under ``intercept``, standalone and inside ``intercept(cfg)``."""
  hf, handle, module = twin
  cfg = sl.CompressionConfig(method="softlm", target_ratio=0.5, decomposition="whitened")
  out = sl.compress_params(module, cfg, calibration=batches)
  assert isinstance(out, nnx.Module) and isinstance(out.layers[0].attn.q_proj, LinearMap)
  assert not isinstance(module.layers[0].attn.q_proj, LinearMap)
  assert set(out.layers[0].attn.q_proj.names) == {"left", "s", "right", "alpha"}
  tree_form = sl.compress_params(handle.params, cfg, calibration=sl.Calibration(handle.apply, batches, progress=False))
  ids = batches[1]
  ref = nnx_logits(handle, tree_form, ids, cfg)
  assert rel_err(out(ids), ref) < 1e-6
  with sl.intercept(cfg):
    assert rel_err(out(ids), ref) < 1e-6
  assert int(sl.count_params(out, cfg)) == int(sl.count_params(tree_form, cfg))


def test_a_reloaded_compact_module_trains_on_with_nnx_lora(twin, batches, tmp_path):
  """Hand the model back: a compact file reloads as an NNX module; ``nnx.LoRA`` wraps one of its
  factored projections and an ``nnx.Optimizer`` over ``nnx.LoRAParam`` lowers the loss while the
  factors stay as they were."""
  hf, handle, module = twin
  cfg = sl.CompressionConfig(target_ratio=0.5, sharpness=1e6)
  cp = sl.compress_params(handle.params, cfg)
  cut = _hard_cut(cp, cfg, {p: 8 for p, _ in tree.factored_layers(cp)})
  compact = sl.export_params(handle.module_for(cut, cfg), cfg)
  sl.save_module(tmp_path / "c.safetensors", compact, cfg=cfg, family="tiny-llama-nnx")
  model = sl.load_module(tmp_path / "c.safetensors")
  base = model.layers[0].mlp.up_proj
  assert isinstance(base, LinearMap) and "left" in base.names
  left = np.asarray(base.left.get_value())
  model.layers[0].mlp.up_proj = nnx.LoRA(32, 4, 48, base_module=base, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, opt, ids):
    loss, grads = nnx.value_and_grad(lambda m: lm_loss(m(ids), ids), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, batches[0])) for _ in range(8)]
  assert losses[-1] < losses[0] - 1e-3
  np.testing.assert_array_equal(np.asarray(model.layers[0].mlp.up_proj.base_module.left.get_value()), left)


def test_importing_the_library_does_not_import_transformers():
  code = "import softlm_jax, sys; assert 'transformers' not in sys.modules, 'transformers imported'"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_the_hf_flax_deprecation_is_said_once_per_machine(tmp_path):
  """transformers' own deprecation line (logged by every HF Flax model it builds) is dropped; the
  library's one-line notice is printed the first time only."""
  import os
  code = ("from softlm_jax.models import family; import transformers as tf; family.flax_deprecation_notice(); "
          "tf.FlaxLlamaForCausalLM(tf.LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, "
          "num_attention_heads=2, intermediate_size=8))")
  env = {**os.environ, "SOFTLM_CACHE_DIR": str(tmp_path)}
  first, second = (subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
                   for _ in range(2))
  assert "(shown once)" in first.stderr and "TensorFlow and JAX classes are deprecated" not in first.stderr
  assert "(shown once)" not in second.stderr and "deprecated" not in second.stderr


@pytest.mark.slow
def test_smollm2_in_the_nnx_llama_computes_the_hf_flax_llama():
  """SmolLM2-135M's real weights (the GGUF file) in the NNX Llama against the HF Flax Llama (rope base
  1e5, 9 query and 3 key/value heads, tied embeddings)."""
  from softlm_jax import models
  from softlm_jax.models import gguf_llama
  try:
    gguf_llama.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  linen, nnx_model = (models.load(name, "causal_lm", max_len=64) for name in ("smollm2", "smollm2-nnx"))
  c = nnx_model.module.config
  assert (c.num_attention_heads, c.num_key_value_heads, c.rope_theta, c.tie_word_embeddings) == (9, 3, 1e5, True)
  text = "Robert Boulter is an English film , television and theatre actor . He had a guest-starring role"
  ids = jnp.asarray(linen.tokenizer(text).input_ids[:24])[None]
  err = rel_err(nnx_model.logits(nnx_model.params, ids), linen.logits(linen.params, ids))
  print(f"SmolLM2 NNX vs HF Flax Llama: max abs diff / max abs = {err:.2e}")
  assert err < 1e-4


@pytest.mark.slow  # whole softlm runs on WikiText-2: scripts/test.sh --all
def test_every_softlm_command_runs_on_an_nnx_model(tmp_path):
  """``compress`` (the lm preset: allocation, propagated factors), ``train`` (SoftLM's learned thresholds
  and the allocated recipe with refit and fine-tuning), ``eval``, ``generate`` and ``bench`` on
  ``tiny-llama-nnx``; each compact file reloads as an NNX module computing the perplexity it reports."""
  from softlm_jax import cli, data
  if data.find_data_dir() is None:
    pytest.skip("needs ../shared/data (WikiText-2)")
  lm = ["--task", "wikitext", "--model", "tiny-llama-nnx", "--seq-len", "32", "--calib-len", "32", "--eval-len",
        "32", "--eval-windows", "2", "--calib-grams", "8", "--calib", "8", "--batch-size", "4", "--no-progress"]
  cli.run(["compress", *lm, "--cr", "0.5", "--out", str(tmp_path / "c")])
  res = cli.run(["train", *lm, "--cr", "0.5", "--methods", "softlm,allocated", "--compress-steps", "3",
                 "--max-compress-steps", "6",
                 "--finetune-steps", "2", "--steps", "3", "--refit-steps", "1", "--allow-budget-miss",
                 "--out", str(tmp_path / "t")])
  for path in (tmp_path / "c" / "allocated", tmp_path / "t" / "softlm", tmp_path / "t" / "allocated"):
    f = path / "compact.safetensors"
    module = sl.load_module(f)
    assert any(isinstance(m, LinearMap) and "left" in m.names for _, m in nnx.iter_modules(module))
    if path.parent.name == "t":  # softlm eval on the file gives the run's own figure
      ev = cli.run(["eval", str(f), "--task", "wikitext", "--eval-len", "32", "--eval-windows", "2"])
      np.testing.assert_allclose(ev["metrics"]["test"]["ppl"], res[path.name]["metrics"]["test"]["ppl"], rtol=1e-5)
  # softlm generate is the greedy continuation of the reloaded module
  f = tmp_path / "c" / "allocated" / "compact.safetensors"
  out = cli.run(["generate", str(f), "--ids", "1,2,3", "--max-new-tokens", "4"])
  module, seq = sl.load_module(f), jnp.asarray([[1, 2, 3]], jnp.int32)
  for _ in range(4):
    seq = jnp.concatenate([seq, jnp.argmax(module(seq)[:, -1], -1)[:, None].astype(jnp.int32)], axis=1)
  assert out["sequences"] == np.asarray(seq).tolist()

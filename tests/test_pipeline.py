"""The run pipeline (softlm_jax.run) and its entry points: configs to disk and back, one preset for
every entry point, Grams collected once per run, a model family registered here alone running through
run_comparison and `softlm train`, and the budget policy."""
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import calib, data, models, presets, run, serial, tasks
from softlm_jax.cli import options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_wikitext = pytest.mark.skipif(data.find_data_dir() is None, reason="needs ../shared/data (WikiText-2)")

# ---------------------------------------------------------------------------------------------------
# configs


def test_configs_round_trip_through_dicts():
  c = sl.CompressionConfig(target_ratio=0.3, decomposition="whitened", normalize="uniform_rank", method="llrc",
                           mask_init=(2.5, 0.5), init_rank=7, include=r"layers/\d+/mlp")
  t = run.TrainConfig(steps=12, distill=(1.0, 2.0), mesh="data=2,fsdp=1", allow_budget_miss=True)
  d = tasks.DataConfig(task="sst2", text_cols=("a", "b"), label_col="y", train_file="x.csv", eval_limit=5)
  for cfg in (c, t, d):
    back = serial.from_dict(type(cfg), json.loads(json.dumps(serial.to_dict(cfg))))
    assert back == cfg and type(back) is type(cfg)
  assert run.TrainConfig.from_dict(t.to_dict()) == t and tasks.DataConfig.from_dict(d.to_dict()) == d


def test_train_config_refuses_bad_values():
  with pytest.raises(ValueError, match="distill"):
    run.TrainConfig(distill=(-1.0, 1.0))
  with pytest.raises(ValueError, match="batch_size"):
    run.TrainConfig(batch_size=0)
  with pytest.raises(ValueError, match=r"ramp \(compress_steps = 80\).*max_compress_steps = 50"):
    run.check_configs(sl.CompressionConfig(compress_steps=80), run.TrainConfig(max_compress_steps=50))


def _lm_script():
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import lm
  return lm


@pytest.mark.parametrize("argv", [
    ["--cr", "0.5"], ["--cr", "0.3", "--alpha-lr", "0.01", "--distill", "0"],
    ["--cr", "0.5", "--decomposition", "svd", "--compress-steps", "0", "--batch-size", "8"]])
def test_softlm_train_and_experiments_lm_build_equal_configs(argv):
  from softlm_jax import cli
  a = options.parse(cli.build_parser(), ["train", "--task", "wikitext", "--out", "x", *argv]).options
  b = _lm_script().parse(["--out", "x", *argv]).options
  assert (a.compression, a.train, a.data) == (b.compression, b.train, b.data)
  if argv == ["--cr", "0.5"]:  # the lm preset's recipe (allocated + propagated), from the one preset
    assert a.compression.decomposition == "propagated" and a.compression.normalize == "uniform_rank"
    assert a.train.calib_grams == 128 and a.train.refit_steps == 32 and a.train.steps is None
    assert a.train.refit_lr == 1e-3  # the preset's refit rate, not the library default 3e-4
    assert a.train.distill == (1.0, 2.0) and a.train.batch_size == 4 and a.train.lr == 2e-4
    assert (a.data.seq_len, a.data.lm_calib_len, a.data.eval_len) == (512, 128, 512)  # train/eval 512, calib 128
    assert a.model == "smollm2" and a.preset == "lm" and a.methods == b.methods == ("allocated", "static", "dense")


def test_lm_softlm_preset_is_softlm_on_whitened_factors_with_the_ramp():
  """``--preset lm-softlm``: SoftLM's learned thresholds on the whitened spectrum, a 60-step ramp,
  distillation; no block refit."""
  from softlm_jax import cli
  a = options.parse(cli.build_parser(), ["train", "--task", "wikitext", "--out", "x", "--preset", "lm-softlm"]).options
  assert a.compression.decomposition == "whitened" and a.compression.normalize == "uniform_rank"
  assert a.compression.alpha_lr == 3e-2 and a.compression.compress_steps == 60
  assert a.train.distill == (1.0, 2.0) and a.train.batch_size == 4 and a.train.finetune_steps == 40
  assert a.train.calib_grams == 128 and a.train.refit_steps == 0 and a.methods == ("softlm", "static", "dense")


def test_glue_preset_compresses_the_teacher_and_glue_softlm_is_plain_softlm():
  """glue: the dense teacher (1,000 steps), every compressed method compressing it on the whitened
  spectrum, allocated first, distillation (BENCHMARKS.md#glue); glue-softlm: plain SVD, SoftLM."""
  from softlm_jax import cli
  a = options.parse(cli.build_parser(), ["train", "--task", "sst2", "--out", "x"]).options
  assert a.preset == "glue" and a.methods == ("allocated", "static", "dense")
  assert a.train.compress_from == "teacher" and a.train.teacher_steps == 1000 and a.train.distill == (1.0, 2.0)
  assert a.compression.decomposition == "whitened" and a.train.calib_grams == 256
  b = options.parse(cli.build_parser(), ["train", "--task", "sst2", "--out", "x", "--preset", "glue-softlm"]).options
  assert b.methods == ("softlm", "static", "dense") and b.compression.decomposition == "svd"
  assert b.train.compress_from == "dense" and b.train.distill == (0.0, 1.0)


def test_decomposition_without_normalize_gets_its_units():
  c, _, _ = presets.build("glue", compression={"decomposition": "whitened"})
  assert c.normalize == "uniform_rank"
  c, _, _ = presets.build("lm", compression={"decomposition": "svd"})
  assert c.normalize == "top"
  c, _, _ = presets.build("lm-softlm", compression={"decomposition": "propagated"})
  assert c.normalize == "uniform_rank"


def test_method_names_follow_the_rules():
  names = run.method_names()
  for rule in ("softlm", "llrc"):
    assert {rule, f"{rule}-noft", f"{rule}-ft"} <= set(names)
  assert run.parse_method("llrc-ft").frozen and run.parse_method("softlm").joint
  assert run.parse_method("llrc").frozen and not run.parse_method("static").frozen
  m = run.parse_method("llrc-alloc-ft")
  assert m.frozen and m.selects_ranks and m.tunes_export and not run.parse_method("llrc-alloc").tunes_export
  with pytest.raises(ValueError, match="unknown method 'lora'"):
    run.parse_method("lora")


# ---------------------------------------------------------------------------------------------------
# a toy family, registered here alone: a 2-block MLP language model over bytes


class _ByteTokenizer:
  """Bytes mod 64 as token ids (the tiny vocabulary keeps the toy model small)."""

  def __call__(self, text, **kw):
    return {"input_ids": [b % 64 for b in text.encode("utf-8")]}

  def __len__(self):
    return 64


class _ToyLM(nn.Module):
  vocab: int = 64
  width: int = 32

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(self.vocab, self.width, name="embed")(ids)
    for i in range(2):
      x = nn.gelu(nn.Dense(2 * self.width, name=f"fc1_{i}")(h))
      h = h + nn.Dense(self.width, name=f"fc2_{i}")(x)
    return nn.Dense(self.vocab, name="lm_head")(h)


class ToyFamily(models.Family):
  name, kind = "toy-mlp", "causal_lm"
  include = r"fc[12]_\d"

  def load(self, spec, *, max_len=512, seed=0, num_labels=None):
    module = _ToyLM()
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    return models.Model(self, spec, module, params, _ByteTokenizer(), "toy-mlp")

  def logits(self, module, params, inputs, *, train=False, rng=None):
    return module.apply({"params": params}, inputs)

  def tokenizer(self):
    return _ByteTokenizer()

  def model_config(self, module):
    return {"model_type": "toy-mlp", "vocab": module.vocab, "width": module.width}

  def from_manifest(self, info, *, seed=0, init=False, dtype=None):
    conf = info["model_config"]
    return _ToyLM(conf["vocab"], conf["width"])


@pytest.fixture
def toy_family():
  fam = models.register(ToyFamily())
  yield fam
  models.family.unregister(fam.name)


TOY = ["--task", "wikitext", "--model", "toy-mlp", "--preset", "lm-softlm", "--seq-len", "16", "--eval-len", "32",
       "--eval-windows", "2",
       "--batch-size", "4", "--calib-grams", "8", "--finetune-steps", "2", "--alpha-lr", "0.1", "--lr", "1e-3",
       "--compress-steps", "0", "--no-progress"]


@pytest.mark.slow  # softlm train, two methods at two CRs, and eval: scripts/test.sh --all
@needs_wikitext
def test_toy_family_runs_through_run_comparison_and_softlm_train(toy_family, tmp_path, monkeypatch):
  from softlm_jax import cli
  calls = []
  real = calib.collect_grams
  monkeypatch.setattr(calib, "collect_grams", lambda *a, **k: calls.append(1) or real(*a, **k))
  out = tmp_path / "run"
  res = cli.run(["train", *TOY, "--methods", "softlm,static", "--cr", "0.4,0.6", "--out", str(out),
                 "--max-compress-steps", "120"])
  assert len(calls) == 1  # whitened (the lm-softlm preset): one Gram pass shared by both methods and both CRs
  assert set(res) == {"softlm_cr0.4", "static_cr0.4", "softlm_cr0.6", "static_cr0.6"}
  for name, r in res.items():
    b = r["budget"]
    assert b["budget_met"] and b["verdict"]["met"] and b["counted_params"] <= b["target_params"], name
  for cr in (0.4, 0.6):
    soft = res[f"softlm_cr{cr}"]
    assert soft["train_steps"] == soft["freeze_step"] + 2
    assert res[f"static_cr{cr}"]["train_steps"] == soft["train_steps"]  # equal steps at the same CR
    assert soft["export_max_abs_logit_diff"] < 1e-4
  # the compact file is rebuilt by the family that wrote it, and `softlm eval` gives the run's perplexity
  path = out / "softlm_cr0.4" / "compact.safetensors"
  params, info = sl.load_compact(path)
  assert info["metadata"]["family"] == "toy-mlp" and info["metadata"]["budget_met"] is True
  ev = cli.run(["eval", str(path), "--task", "wikitext", "--eval-len", "32", "--eval-windows", "2"])
  assert ev["metrics"]["test"]["ppl"] == pytest.approx(res["softlm_cr0.4"]["metrics"]["test"]["ppl"], rel=1e-5)
  # the run folder's configs come back from run.json as the configs it ran with
  conf = run.load_run(str(out / "softlm_cr0.4"))
  assert conf["compression"].target_ratio == 0.4 and conf["compression"].include == ToyFamily.include
  assert conf["train"] == run.TrainConfig.from_dict(res["softlm_cr0.4"]["config"]["train"])


@pytest.mark.slow  # two softlm train runs: scripts/test.sh --all
@needs_wikitext
def test_budget_miss_fails_the_run_unless_allowed(toy_family, tmp_path):
  from softlm_jax import cli
  argv = ["train", *TOY, "--methods", "softlm", "--cr", "0.5", "--max-compress-steps", "2", "--alpha-lr", "1e-4",
          "--decomposition", "svd"]
  with pytest.raises(SystemExit) as e:
    cli.run([*argv, "--out", str(tmp_path / "strict")])
  msg = str(e.value)
  assert "budget not met" in msg and "max_compress_steps = 2" in msg and "--allow-budget-miss" in msg
  res = json.loads((tmp_path / "strict" / "softlm" / "results.json").read_text())
  assert res["budget"]["verdict"]["met"] is False  # written before failing
  assert "NOT MET" in (tmp_path / "strict" / "summary.md").read_text()
  res = cli.run([*argv, "--out", str(tmp_path / "lenient"), "--allow-budget-miss"])["softlm"]
  v = res["budget"]["verdict"]
  assert not v["met"] and "budget not met" in v["why"]
  assert res["budget"]["counted_params"] > res["budget"]["target_params"]
  man = sl.checkpoint.read_manifest(tmp_path / "lenient" / "softlm" / "compact.safetensors")
  assert man["target_ratio"] == 0.5 and man["achieved_ratio"] < 0.5 and man["metadata"]["budget_met"] is False


def test_registry_resolves_models():
  assert models.resolve("tiny-llama", "causal_lm").name == "tiny-llama"
  assert models.resolve("minilm", "classifier").name == "hf-classifier"
  assert models.resolve("/some/hf/folder", "causal_lm").name == "hf-causal-lm"
  with pytest.raises(ValueError, match="is a causal_lm, but this task needs a classifier"):
    models.resolve("tiny-mamba", "classifier")
  assert models.get("tiny-mamba").include == r"layers/\d+/mixer/(in_proj|out_proj)"


def test_tiny_mamba_manifest_rebuilds_the_module():
  fam = models.get("tiny-mamba")
  from softlm_jax.models import mamba
  module = mamba.MambaLM(mamba.MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2))
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  info = {"model_config": fam.model_config(module), "metadata": {"family": "tiny-mamba"}}
  back = models.from_manifest(json.loads(json.dumps(info)))
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 6)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(back.apply({"params": params}, ids)),
                                np.asarray(module.apply({"params": params}, ids)))
  out = fam.generate(back, params, ids[:, :3], max_new_tokens=3)
  assert out.shape == (2, 6) and np.array_equal(np.asarray(out[:, :3]), np.asarray(ids[:, :3]))


@needs_wikitext
def test_third_rule_registered_in_tests_runs_through_the_pipeline(toy_family, tmp_path):
  """test_rules' toy rule (a learnable keep fraction per layer), registered here, trains, freezes and
  exports through softlm train; R-noft and R-ft come for free."""
  from softlm_jax import cli, rules
  from tests.test_rules import TOPK
  rules.register(TOPK)
  try:
    assert {"topk", "topk-noft", "topk-ft"} <= set(run.method_names())
    res = cli.run(["train", *TOY, "--methods", "topk,topk-ft", "--cr", "0.4", "--decomposition", "svd",
                   "--alpha-lr", "0.2", "--gamma", "1", "--max-compress-steps", "150", "--ft-steps", "2",
                   "--calib", "16", "--out", str(tmp_path / "run")])
  finally:
    rules.unregister("topk")
  soft, ft = res["topk"], res["topk-ft"]
  for r in (soft, ft):
    assert r["budget"]["budget_met"] and r["freeze_step"] >= 0
  assert soft["export_max_abs_logit_diff"] < 1e-4  # (topk-ft's final tree is fine-tuned after the export)
  assert soft["train_steps"] == soft["freeze_step"] + 2  # --finetune-steps 2 after the freeze
  assert ft["selection_steps"] >= ft["freeze_step"]  # the frozen-weight selection ran until its budget was met
  assert ft["train_steps"] == ft["selection_steps"] + 2  # then --ft-steps 2 of fine-tuning


@needs_wikitext
def test_stop_after_saves_and_the_rerun_resumes(toy_family, tmp_path):
  from softlm_jax import cli
  out = tmp_path / "run"
  argv = ["train", *TOY, "--methods", "static", "--cr", "0.5", "--steps", "6", "--decomposition", "svd",
          "--keep-ckpt", "--out", str(out)]
  for _ in range(2):  # the second time it stops at the same step again, without an error
    assert "stopped after 3 steps" in cli.run([*argv, "--stop-after", "3"])["stopped"]
    assert (out / "static" / "ckpt" / "3").is_dir() and not (out / "static" / "results.json").exists()
  res = cli.run(argv)["static"]  # resumes at step 3
  assert res["train_steps"] == 6 and res["budget"]["budget_met"]
  steps = [h["step"] for h in res["history"]]
  assert steps == sorted(set(steps)) and steps[-1] == 6


def test_each_method_gets_its_own_recipe_and_explicit_misfits_are_refused_at_parse_time(capsys):
  """Under the lm preset (propagated factors, fit at fixed ranks; a cosine schedule) a learned rule
  named without a decomposition runs with its own recipe (whitened factors, whose full rank is the
  dense model; a constant rate), while allocated keeps the preset's. A decomposition or schedule the
  user sets holds for every method, and one a learned rule cannot use is refused, naming the fix."""
  from softlm_jax import cli
  o = options.parse(cli.build_parser(), ["train", "--task", "wikitext", "--model", "tiny-llama", "--out", "x",
                                         "--methods", "allocated,softlm,llrc"]).options
  assert o.compression.decomposition == "propagated" and o.train.lr_schedule == "cosine"
  assert set(o.recipes) == {"softlm", "llrc"}
  for m in ("softlm", "llrc"):
    c, t = run.method_configs(o.compression, o.train, o.recipes, m)
    assert c.decomposition == "whitened" and t.lr_schedule == "constant" and t.warmup_steps == 0
    assert c.replace(decomposition="propagated") == o.compression and t.replace(lr_schedule="cosine",
                                                                                warmup_steps=5) == o.train
  assert run.method_configs(o.compression, o.train, o.recipes, "allocated") == (o.compression, o.train)
  with pytest.raises(SystemExit):  # an explicit rank-dependent decomposition for a learned rule
    options.parse(cli.build_parser(), ["train", "--task", "wikitext", "--model", "tiny-llama", "--out", "x",
                                       "--methods", "allocated,softlm", "--decomposition", "propagated"])
  err = capsys.readouterr().err
  assert "softlm learns its own ranks" in err and "propagated" in err and "--preset lm-softlm" in err
  with pytest.raises(SystemExit):  # an explicit schedule of unknown length for a joint learned rule
    options.parse(cli.build_parser(), ["train", "--task", "wikitext", "--model", "tiny-llama", "--out", "x",
                                       "--methods", "softlm", "--lr-schedule", "cosine"])
  assert "--lr-schedule constant" in capsys.readouterr().err
  a = options.parse(cli.build_parser(), ["train", "--task", "wikitext", "--model", "tiny-llama", "--out", "x",
                                         "--methods", "softlm", "--decomposition", "whitened"]).options
  c, t = run.method_configs(a.compression, a.train, a.recipes, "softlm")
  assert c.decomposition == "whitened" and t.lr_schedule == "constant"
  for preset in presets.names():  # the other presets' learned rules run with the preset's configs
    if preset != "lm":
      assert presets.recipes(preset, run.method_names()) == {}

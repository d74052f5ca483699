"""Every method runs under every preset; a method's result does not depend on which methods ran before
it; cached factors are keyed by the fields their decomposition declares."""
import json
import types

import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import cli, data, presets, run, svd, tree
from softlm_jax.cli import options
from tests.glue_fixtures import write_task

needs_wikitext = pytest.mark.skipif(data.find_data_dir() is None, reason="needs ../shared/data (WikiText-2)")

LM = ["--task", "wikitext", "--model", "tiny-llama", "--seq-len", "32", "--calib-len", "32", "--eval-len", "32",
      "--eval-windows", "2", "--calib-grams", "8", "--calib", "8", "--batch-size", "4", "--no-progress"]


def _compact(path):
  params, man = sl.load_compact(path)
  return {k: np.asarray(v) for k, v in tree.flatten(params).items()}, {p: v["rank"] for p, v in man["layers"].items()}


@pytest.mark.slow  # two whole lm-preset runs: scripts/test.sh --all
@needs_wikitext
def test_results_do_not_depend_on_the_order_of_methods(tmp_path):
  """``--methods static,allocated`` and ``--methods allocated,static`` (the lm preset: propagated
  factors, the block refit under its guard, fine-tuning) give each method the same arrays, ranks,
  metrics and steps."""
  small = [*LM, "--cr", "0.5", "--refit-steps", "2", "--steps", "3"]
  for name, methods in (("a", "static,allocated"), ("b", "allocated,static")):
    cli.run(["train", *small, "--methods", methods, "--out", str(tmp_path / name)])
  for m in ("static", "allocated"):
    ra, rb = (json.loads((tmp_path / n / m / "results.json").read_text()) for n in "ab")
    for k in ("metrics", "train_steps", "recipe", "guard"):
      assert ra[k] == rb[k], (m, k)
    (aa, rka), (ab, rkb) = (_compact(tmp_path / n / m / "compact.safetensors") for n in "ab")
    assert rka == rkb and aa.keys() == ab.keys()
    for k in aa:
      np.testing.assert_array_equal(aa[k], ab[k], err_msg=f"{m}: {k}")


def test_cached_factors_are_keyed_by_the_fields_the_decomposition_reads(monkeypatch):
  """The factor cache's key comes from :attr:`Decomposition.reads`: a field it reads gives new factors,
  one it does not read serves the cached ones."""
  calls = []

  def factors(params, cfg, stats):
    calls.append(cfg.gram_damp)
    return svd.plain_factors(params, cfg)
  svd.register(svd.Decomposition("counting", needs="nothing", factors=factors, reads=("gram_damp",)))
  try:
    class Comp(run.Comparison):
      def __init__(self):  # only the cache and the calibration handle the factors need
        self._factors, self.calibration, self.log = {}, types.SimpleNamespace(collections=0), lambda s: None
    comp = Comp()
    params = {"encoder": {"layer": {"0": {"query": {"kernel": np.ones((4, 6), np.float32)}}}}}
    cfg = sl.CompressionConfig(decomposition="counting")
    comp.factors("dense", params, cfg)
    comp.factors("dense", params, cfg.replace(alpha_lr=0.5))  # not read: cached
    assert calls == [cfg.gram_damp]
    comp.factors("dense", params, cfg.replace(gram_damp=0.25))  # read: computed again
    assert calls == [cfg.gram_damp, 0.25]
    assert svd.get("counting").key(cfg) != svd.get("counting").key(cfg.replace(gram_damp=0.25))
  finally:
    svd.unregister("counting")


# --- every registered method under every preset's defaults (full suite) ----------------------------

#: step counts cut for time; every other option is the preset's own
FAST = ["--max-compress-steps", "4", "--finetune-steps", "1", "--steps", "2", "--teacher-steps", "2",
        "--ft-steps", "1", "--compress-steps", "2", "--refit-steps", "1", "--allow-budget-miss"]


@pytest.mark.slow
@needs_wikitext
@pytest.mark.parametrize("preset", presets.names())
def test_every_method_runs_under_every_preset(tmp_path, preset):
  """Each registered method (static, allocated and each rule, in every variant) runs under each
  preset's defaults on a tiny model of the preset's kind, exports within its budget's bookkeeping and
  records the recipe it ran."""
  methods = run.method_names()
  _, _, dcfg = presets.build(preset)
  if dcfg.model_kind == "causal_lm":
    argv = [*LM, "--preset", preset]
  else:
    write_task(tmp_path / "glue", "sst2", n=24)
    from tests.conftest import tiny_folder
    argv = ["--task", "sst2", "--model", tiny_folder(tmp_path / "clf"), "--data-dir", str(tmp_path / "glue"),
            "--max-len", "12", "--batch-size", "4", "--calib", "8", "--calib-grams", "8", "--no-progress",
            "--preset", preset]
  o = options.parse(cli.build_parser(), ["train", *argv, *FAST, "--methods", ",".join(methods), "--cr", "0.5",
                                         "--out", str(tmp_path / "run")]).options
  results = cli.run(["train", *argv, *FAST, "--methods", ",".join(methods), "--cr", "0.5",
                     "--out", str(tmp_path / "run")])
  for m in methods:
    res = results[m]
    assert res["method"] == m and res["metrics"]
    if run.parse_method(m).compressed:
      c, _ = run.method_configs(o.compression, o.train, o.recipes, m)
      assert res["config"]["compression"]["decomposition"] == c.decomposition
      assert res["recipe"].split(": ")[-1].startswith(c.decomposition)
      assert (tmp_path / "run" / m / "compact.safetensors").exists()

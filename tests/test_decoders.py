"""Decoders after compression: KV-cache generation of exported GPT-2 / Llama, and experiments/lm.py
end to end on a tiny random Llama with real local WikiText-2 text."""
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import data
from tests.conftest import VOCAB, build
from tests.test_models import set_alphas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def greedy_without_cache(model, params, prompt, new_tokens):
  """Reference: each new token is the argmax of a full forward over everything so far (no cache)."""
  ids = prompt
  for _ in range(new_tokens):
    with sl.intercept():
      logits = model(ids, params=params).logits
    ids = jnp.concatenate([ids, jnp.argmax(logits[:, -1], -1)[:, None].astype(ids.dtype)], axis=1)
  return np.asarray(ids)


# HF generate under intercept against a cache-free greedy loop, on an all-factored tree (47 s for gpt2: the
# eager loop): scripts/test.sh --all; the default suite runs the same path on a loaded compact tree
# (test_checkpoint.py::test_generate_from_loaded_compact_model)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_with_kv_cache_on_exported_model(name):
  """HF ``generate`` (KV cache, greedy) runs the exported low-rank tree under ``intercept`` and
  produces exactly the tokens of a cache-free greedy loop over the same tree."""
  model = build(name)
  cfg = sl.CompressionConfig()
  trained = set_alphas(sl.compress_params(model.params, cfg), 0.7)
  exported = sl.export_params(trained, cfg)
  layers = sl.budget_report(exported, cfg)["layers"]
  assert layers and all(v["rank"] < v["break_even"] for v in layers.values())  # all factored
  assert sl.count_params(exported, cfg) < sl.count_params(sl.compress_params(model.params, cfg), cfg)
  prompt = jnp.asarray(np.random.RandomState(1).randint(1, VOCAB, (2, 5)), jnp.int32)
  with sl.intercept():
    out = model.generate(prompt, params=exported, max_length=5 + 7, do_sample=False, pad_token_id=0).sequences
  np.testing.assert_array_equal(np.asarray(out), greedy_without_cache(model, exported, prompt, 7))


@pytest.mark.slow  # experiments/lm.py end to end: scripts/test.sh --all
@pytest.mark.skipif(data.find_data_dir() is None, reason="needs ../shared/data (WikiText-2)")
def test_lm_script_end_to_end(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import lm
  out = tmp_path / "run"
  lm.main(["--model", "tiny-llama", "--preset", "lm-softlm", "--methods", "dense,softlm,static,llrc", "--crs", "0.5",
           "--seq-len", "32", "--batch-size", "4", "--finetune-steps", "3", "--max-compress-steps", "150",
           "--alpha-lr", "0.05", "--lr", "1e-3", "--calib", "16", "--eval-windows", "2", "--eval-len", "64",
           "--refill", "--out", str(out), "--no-progress", "--compress-steps", "0", "--distill", "0",
           "--calib-grams", "16"])
  res = {m: json.load(open(out / m / "results.json")) for m in ("dense", "softlm_cr0.5", "static_cr0.5",
                                                                  "llrc_cr0.5")}
  for m in ("softlm_cr0.5", "llrc_cr0.5"):
    b = res[m]["budget"]
    assert b["budget_met"] and b["counted_params"] <= b["target_params"], m
    assert res[m]["export_max_abs_logit_diff"] < 1e-3, m
    assert res[m]["metrics"]["test"]["ppl"] == pytest.approx(res[m]["training_form_metrics"]["ppl"], rel=1e-3), m
    assert (out / m / "ranks.png").stat().st_size > 1000
  llrc = res["llrc_cr0.5"]  # --refill: the count only grows back towards the target
  assert llrc["counted_before_refill"] <= llrc["budget"]["counted_params"] <= llrc["budget"]["target_params"]
  soft = res["softlm_cr0.5"]
  assert soft["train_steps"] == soft["freeze_step"] + 3
  assert res["static_cr0.5"]["train_steps"] == soft["train_steps"]
  assert res["static_cr0.5"]["budget"]["counted_params"] <= res["static_cr0.5"]["budget"]["target_params"]
  # the loss falls while SoftLM trains (random tiny model, real text)
  task = [h["task_loss"] for h in soft["history"]]
  assert task[-1] < task[0] - 0.5, task
  assert "test" in res["dense"]["eval_split"] and "valid" in res["dense"]["train_split"]
  summary = (out / "summary.md").read_text()
  assert "llrc" in summary and "static" in summary and "raw test" in summary


def test_lm_loss_matches_numpy():
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import lm
  rng = np.random.RandomState(0)
  logits, ids = rng.randn(2, 5, 7).astype(np.float32), rng.randint(0, 7, (2, 5))
  z = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, ids[:, 1:, None], -1).mean()
  assert float(lm.lm_loss(jnp.asarray(logits), jnp.asarray(ids))) == pytest.approx(want, rel=1e-5)


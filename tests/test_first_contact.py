"""What a first-time user meets: `softlm generate` refuses a classifier at once, a nearly
numeric label column is an error in auto mode, Ctrl-C stops training within seconds and resumes."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import checkpoint, cli, data
from tests.conftest import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = sl.CompressionConfig(target_ratio=0.5)


# --- softlm generate on a classifier ---------------------------------------------------------------

def _save(path, name, metadata):
  model = build(name)
  sl.save_compact(path, sl.static_svd(model.params, CFG), cfg=CFG, model_config=model.config, metadata=metadata)
  return path


def test_model_kind_from_the_manifest(tmp_path):
  clf = checkpoint.read_manifest(_save(tmp_path / "c.safetensors", "bert", {
      "model_class": "transformers.models.bert.modeling_flax_bert.FlaxBertForSequenceClassification",
      "task": "sst2", "num_labels": 2}))
  assert checkpoint.model_kind(clf) == "classifier"
  assert checkpoint.model_kind({"metadata": {"num_labels": 1}}) == "classifier"  # a regressor, no class name
  assert checkpoint.model_kind({"metadata": {}, "model_config": {"architectures": ["BertForSequenceClassification"]}}) \
      == "classifier"
  lm_man = checkpoint.read_manifest(_save(tmp_path / "g.safetensors", "gpt2", {
      "model_class": "transformers.models.gpt2.modeling_flax_gpt2.FlaxGPT2LMHeadModel", "task": "wikitext"}))
  assert checkpoint.model_kind(lm_man) == "generative"
  checkpoint.require_generative(lm_man)  # passes
  assert checkpoint.model_kind({"metadata": {}}) == "unknown"
  checkpoint.require_generative({"metadata": {}})  # an unknown kind is not refused
  with pytest.raises(ValueError, match=r"c\.safetensors is a classifier \(FlaxBertForSequenceClassification, task "
                     r"'sst2', 2 label\(s\)\), not a causal language model"):
    checkpoint.require_generative(clf, tmp_path / "c.safetensors")


def test_generate_refuses_a_classifier_before_loading(tmp_path, monkeypatch, capsys):
  path = _save(tmp_path / "c.safetensors", "bert", {
      "model_class": "transformers.models.bert.modeling_flax_bert.FlaxBertForSequenceClassification",
      "task": "sst2", "num_labels": 2})

  def no_load(*a, **k):
    raise AssertionError("generate loaded the arrays / built the model before refusing")
  from softlm_jax.cli import common
  monkeypatch.setattr(common, "load_compact_model", no_load)
  monkeypatch.delenv("SOFTLM_DEBUG", raising=False)
  with pytest.raises(SystemExit) as e:
    cli.run(["generate", str(path), "--ids", "1,2,3"])
  msg = str(e.value)
  assert msg.startswith("softlm generate: error: ") and "\n" not in msg
  assert "is a classifier" in msg and "softlm eval" in msg


# --- a numeric label column with one bad value ------------------------------------------------------

def _scores_csv(path, labels):
  rows = ["text,score"] + [f"sentence {i},{v}" for i, v in enumerate(labels)]
  path.write_text("\n".join(rows) + "\n")
  return str(path)


@pytest.mark.parametrize("scores", ["float", "int"])
def test_nearly_numeric_labels_are_an_error_in_auto_mode(tmp_path, scores):
  rng = np.random.RandomState(0)
  vals = [f"{x:.2f}" for x in rng.uniform(0, 5, 160)] if scores == "float" else [str(x) for x in range(160)]
  vals[37] = "n/a"
  path = _scores_csv(tmp_path / "s.csv", vals)
  want = r"s\.csv: column 'score': regression labels must be numbers: row 38 has 'n/a'"
  with pytest.raises(ValueError, match=want + r" \(1 of 160 rows are not numbers, the other 159"):
    data.load_table(path, ["text"], "score")  # auto
  with pytest.raises(ValueError, match=want):
    data.load_table(path, ["text"], "score", task_type="regression")
  # the user can still say each value is a class
  d = data.load_table(path, ["text"], "score", task_type="classification")
  assert d.num_labels == len(set(vals))
  vals[37] = "2"
  assert data.load_table(_scores_csv(tmp_path / "t.csv", vals), ["text"], "score").regression is (scores == "float")


def test_few_integer_classes_and_a_word_stay_classification(tmp_path):
  vals = [str(i % 3) for i in range(50)] + ["unknown"] * 2  # 96% numbers, but 3 distinct ids: class labels
  d = data.load_table(_scores_csv(tmp_path / "c.csv", vals), ["text"], "score")
  assert not d.regression and d.label_names == ["0", "1", "2", "unknown"]
  assert data.infer_task_type(["pos", "neg", "1.5"]) == "classification"  # mostly words: classes


# --- Ctrl-C during training --------------------------------------------------------------------------

FIT = textwrap.dedent("""
  import sys, time
  import jax.numpy as jnp, optax
  import softlm_jax as sl
  from softlm_jax import train
  from tests.conftest import build
  ckpt, stop_after = sys.argv[1], (int(sys.argv[2]) if len(sys.argv) > 2 else None)
  model = build("bert")
  cfg = sl.CompressionConfig(target_ratio=0.5)
  tx = sl.make_optimizer(cfg, optax.adam(1e-3))
  state = train.init_state(sl.compress_params(model.params, cfg), tx)
  restored = train.restore_checkpoint(ckpt, state)
  print("START", 0 if restored is None else int(restored.step), flush=True)
  ids = jnp.ones((2, 8), jnp.int32)
  def batch_fn(step):
    time.sleep(0.02)
    return ids
  loss = lambda p, b, rng: jnp.mean(model(b, params=p).logits ** 2)
  try:  # as the softlm command does (cli.main)
    state, _ = train.fit(state, train.make_train_step(loss, tx, cfg), batch_fn, finetune_steps=10**6,
                         max_compress_steps=10**6, ckpt_dir=ckpt, save_every=7, log_every=1, progress=False,
                         stop_after=stop_after)
  except KeyboardInterrupt:
    from softlm_jax.interrupt import exit_interrupted
    exit_interrupted(130)
  print("END", int(state.step), flush=True)
""")


def _fit_process(ckpt, *extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  # SIGINT back to its default in the child: a suite started in the background (`cmd &` in a script,
  # nohup) inherits an ignored SIGINT, which Python (and StopRequest) then leave ignored
  return subprocess.Popen([sys.executable, "-c", FIT, str(ckpt), *map(str, extra)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.serial  # a latency bound: run alone (scripts/test.sh), not beside another worker
def test_ctrl_c_stops_within_seconds_and_the_rerun_resumes(tmp_path):
  ckpt = tmp_path / "ckpt"
  p = _fit_process(ckpt)
  deadline = time.time() + 240
  while time.time() < deadline:  # until it has trained past its first checkpoint
    hist = ckpt / "history.jsonl"
    if hist.exists() and len(hist.read_text().splitlines()) >= 10:
      break
    assert p.poll() is None, p.communicate()[0]
    time.sleep(0.1)
  else:
    p.kill()
    pytest.fail("the tiny fit did not reach step 10 in 240 s")
  t = time.time()
  p.send_signal(signal.SIGINT)
  try:
    out, _ = p.communicate(timeout=30)
  except subprocess.TimeoutExpired:
    p.kill()
    pytest.fail(f"still running 30 s after SIGINT:\n{p.communicate()[0][-2000:]}")
  took = time.time() - t
  assert took < 15, f"{took:.1f} s from SIGINT to exit"
  assert p.returncode == 130 and "END" not in out
  import re
  m = re.search(r"\[interrupt\] interrupted at step (\d+); checkpoint in .*ckpt: rerun the same command to resume "
                r"from step (\d+)", out)
  assert m and m.group(1) == m.group(2), out[-2000:]
  stopped = int(m.group(1))
  assert stopped >= 10 and str(stopped) in os.listdir(ckpt)  # saved where it stopped
  p = _fit_process(ckpt, stopped + 3)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out[-2000:]
  assert f"START {stopped}" in out and f"END {stopped + 3}" in out
  steps = [json.loads(x)["step"] for x in (ckpt / "history.jsonl").read_text().splitlines()]
  assert steps == list(range(1, stopped + 4)), steps  # no step lost or repeated across the interruption

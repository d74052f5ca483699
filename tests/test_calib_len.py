"""The causal LM's calibration window apart from its fine-tuning window (``DataConfig.calib_len``,
``--calib-len``): the ``lm`` preset fine-tunes on 512-token windows (the perplexity's) and calibrates on
128-token ones, so ``softlm compress`` keeps its calibration while ``softlm train`` trains on whole
evaluation-length windows (BENCHMARKS.md#ablations)."""
import numpy as np
import pytest

from softlm_jax import data, presets, run, tasks

needs_wikitext = pytest.mark.skipif(data.find_data_dir() is None, reason="needs ../shared/data (WikiText-2)")


def char_tokenizer(text):
  """An independent toy tokenizer: one id per character."""
  return {"input_ids": [ord(c) % 211 for c in text]}


def test_data_config_calib_len_defaults_to_the_training_window_and_refuses_bad_values():
  d = tasks.DataConfig(task="wikitext", seq_len=64)
  assert d.calib_len is None and d.lm_calib_len == 64 and d.max_positions == 512
  d = tasks.DataConfig(task="wikitext", seq_len=1024, calib_len=128, eval_len=256)
  assert d.lm_calib_len == 128 and d.max_positions == 1024
  assert tasks.DataConfig(task="wikitext", seq_len=32, calib_len=2048).max_positions == 2048
  for bad in (0, -4, 1.5, True, "128"):
    with pytest.raises((ValueError, TypeError), match="calib_len"):
      tasks.DataConfig(task="wikitext", calib_len=bad)
  # round trip through run.json (an old run.json without the field reads back as None)
  d = tasks.DataConfig(task="wikitext", seq_len=512, calib_len=128)
  assert tasks.DataConfig.from_dict(d.to_dict()) == d
  old = {k: v for k, v in d.to_dict().items() if k != "calib_len"}
  assert tasks.DataConfig.from_dict(old).calib_len is None


def test_lm_preset_fine_tunes_on_evaluation_windows_and_calibrates_on_short_ones():
  from softlm_jax import cli
  from softlm_jax.cli import options
  _, _, d = presets.build("lm", data={"task": "wikitext"})
  assert (d.seq_len, d.lm_calib_len, d.eval_len) == (512, 128, 512)
  _, _, d = presets.build("lm-softlm", data={"task": "wikitext"})  # one 128-token window for both
  assert (d.seq_len, d.calib_len) == (128, None)
  o = options.parse(cli.build_parser(), ["train", "--task", "wikitext", "--model", "tiny-llama", "--out", "x",
                                         "--calib-len", "64", "--seq-len", "256"]).options
  assert (o.data.seq_len, o.data.lm_calib_len) == (256, 64)
  with pytest.raises(SystemExit):  # argparse refuses a non-positive window
    options.parse(cli.build_parser(), ["train", "--task", "wikitext", "--out", "x", "--calib-len", "0"])


@needs_wikitext
def test_wikitext_calibration_windows_cut_the_same_tokens():
  ids = np.asarray(char_tokenizer(data.load_wikitext("valid"))["input_ids"], np.int32)
  w = tasks.wikitext_windows(char_tokenizer, seq_len=96, eval_len=64, eval_windows=2, calib_len=40)
  n, m = len(ids) // 96, len(ids) // 40
  assert w["train"].shape == (n, 96) and w["calib"].shape == (m, 40)
  np.testing.assert_array_equal(w["train"].ravel(), ids[:n * 96])
  np.testing.assert_array_equal(w["calib"].ravel(), ids[:m * 40])
  assert "calib" not in tasks.wikitext_windows(char_tokenizer, seq_len=96, eval_len=64, eval_windows=2)


def test_lm_task_draws_every_calibration_set_from_the_calibration_windows():
  rng = np.random.RandomState(0)
  train = rng.randint(0, 50, (20, 16)).astype(np.int32)
  calib = rng.randint(50, 100, (30, 8)).astype(np.int32)  # disjoint values: no row can come from the other
  test = rng.randint(0, 100, (2, 16)).astype(np.int32)
  task = tasks.LMTask({"train": train, "calib": calib, "test": test})
  assert task.n_calib() == 30 and task.n_train() == 20
  got = task.calib_batches(10, 4)
  assert [b.shape for b in got] == [(4, 8), (4, 8), (2, 8)]
  np.testing.assert_array_equal(np.concatenate([np.asarray(b) for b in got]), calib[:10])
  scored = task.score_batches(10, 4)
  for a, b in zip(scored, got):
    np.testing.assert_array_equal(np.asarray(a["inputs"]), np.asarray(b))
  for step in range(5):  # the frozen-weight methods' batches: the first n calibration windows
    rows = np.asarray(task.calib_batch(step, 12, 4, seed=0)["inputs"])
    assert rows.shape == (4, 8)
    assert all(any((r == c).all() for c in calib[:12]) for r in rows)
    tb = np.asarray(task.train_batch(step, 4, seed=0)["inputs"])
    assert tb.shape == (4, 16) and all(any((r == t).all() for t in train) for r in tb)
  # without calibration windows every calibration set is cut from the training windows, as before
  plain = tasks.LMTask({"train": train, "test": test})
  assert plain.n_calib() == 20
  np.testing.assert_array_equal(np.concatenate([np.asarray(b) for b in plain.calib_batches(6, 4)]), train[:6])
  assert task.describe()["calib_windows"] == [30, 8] and "calib_windows" not in plain.describe()


@pytest.mark.slow  # the run loaded through the command line: scripts/test.sh --all
@needs_wikitext
def test_pipeline_calibrates_and_fine_tunes_on_their_own_windows(tmp_path):
  """Through the command line: the run's calibration set (Grams, scores, propagated fit, refit) has
  ``--calib-len`` windows, its fine-tuning batches ``--seq-len`` ones, and the model runs both."""
  from softlm_jax import cli
  from softlm_jax.cli import options
  o = options.parse(cli.build_parser(), [
      "train", "--task", "wikitext", "--model", "tiny-llama", "--seq-len", "48", "--calib-len", "16",
      "--eval-len", "32", "--eval-windows", "2", "--calib-grams", "8", "--batch-size", "4", "--no-progress",
      "--out", str(tmp_path)]).options
  model, task = run.load(o.model, o.data)
  comp = run.Comparison(model, task, o.compression, o.train, str(tmp_path))
  cal = list(comp.calibration.iter_batches())
  assert len(cal) == 2 and all(np.shape(b) == (4, 16) for b in cal)
  ids = np.asarray(task.windows["train"]).ravel()
  np.testing.assert_array_equal(np.concatenate([np.asarray(b) for b in cal]).ravel(), ids[:8 * 16])
  assert np.shape(comp._task_batches(False)(0)["inputs"]) == (4, 48)
  assert [np.shape(b["inputs"]) for b in task.score_batches(8, 4)] == [(4, 16)] * 2


@needs_wikitext
def test_heldout_test_windows_come_after_the_scored_text():
  """``heldout=True`` (``softlm eval --heldout``): windows of the raw test split after the scored first
  EVAL_CHARS characters, so no text of theirs is in the scored windows."""
  text = data.load_wikitext("test_raw")
  scored = tasks.wikitext_windows(char_tokenizer, seq_len=8, eval_len=64, eval_windows=4, train=False)["test"]
  held = tasks.wikitext_windows(char_tokenizer, seq_len=8, eval_len=64, eval_windows=4, train=False,
                                heldout=True)["test"]
  rest = np.asarray(char_tokenizer(text[tasks.EVAL_CHARS:])["input_ids"], np.int32)
  first = np.asarray(char_tokenizer(text[:tasks.EVAL_CHARS])["input_ids"], np.int32)
  np.testing.assert_array_equal(held.ravel(), rest[:4 * 64])
  np.testing.assert_array_equal(scored.ravel(), first[:4 * 64])
  assert "held out" in tasks.eval_split_name(held, True) and "held out" not in tasks.eval_split_name(scored)

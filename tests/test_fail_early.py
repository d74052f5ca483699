"""A run fails before its work, not after it: output paths and --model are checked when the options
are parsed, and token ids are checked against the model's vocabulary wherever they enter."""
import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import cli, data, files, models, run, tasks
from tests.conftest import VOCAB, build

CFG = sl.CompressionConfig(target_ratio=0.5)


@pytest.fixture
def no_load(monkeypatch):
  """Any model or data load fails the test: the error must come before the work."""
  def fail(*a, **k):
    raise AssertionError("the run loaded the model or the data before refusing its options")
  monkeypatch.setattr(run, "load", fail)
  monkeypatch.setattr(models.family, "load", fail)
  monkeypatch.delenv("SOFTLM_DEBUG", raising=False)


def _refused(argv):
  with pytest.raises(SystemExit) as e:
    cli.run(argv)
  return str(e.value)


def test_out_that_is_a_file_is_refused_at_parse_time(tmp_path, no_load, capsys):
  f = tmp_path / "F"
  f.write_text("not a folder")
  _refused(["compress", "--task", "wikitext", "--model", "tiny-llama", "--cr", "0.5", "--out", str(f)])
  err = capsys.readouterr().err
  assert f"{f} is a file, but the run writes a folder there" in err


def test_method_folder_or_compact_path_in_the_way_is_refused(tmp_path, no_load, capsys):
  out = tmp_path / "run"
  out.mkdir()
  (out / "allocated").write_text("x")
  _refused(["compress", "--task", "wikitext", "--model", "tiny-llama", "--out", str(out)])
  assert f"{out / 'allocated'} is a file" in capsys.readouterr().err
  (out / "allocated").unlink()
  (out / "allocated" / "compact.safetensors").mkdir(parents=True)
  _refused(["compress", "--task", "wikitext", "--model", "tiny-llama", "--out", str(out)])
  assert "compact.safetensors is a folder, but the run writes a file there" in capsys.readouterr().err
  # several CRs: the folders are <method>_cr<CR>
  (tmp_path / "two").mkdir()
  (tmp_path / "two" / "static_cr0.3").write_text("x")
  _refused(["train", "--task", "wikitext", "--model", "tiny-llama", "--methods", "static", "--cr", "0.3,0.5",
            "--out", str(tmp_path / "two")])
  assert "static_cr0.3 is a file" in capsys.readouterr().err


def test_out_under_a_file_is_refused(tmp_path, no_load, capsys):
  f = tmp_path / "F"
  f.write_text("x")
  _refused(["train", "--task", "wikitext", "--model", "tiny-llama", "--out", str(f / "sub" / "run")])
  assert f"{f} is a file, not a folder" in capsys.readouterr().err


def test_a_misspelt_model_names_the_known_ones(tmp_path, no_load, monkeypatch, capsys):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the same answer with or without a network
  _refused(["compress", "--task", "wikitext", "--model", "no-such-model", "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "--model 'no-such-model': no such local folder" in err
  for name in ("tiny-llama", "smollm2", "tiny-mamba"):
    assert name in err
  _refused(["train", "--task", "sst2", "--model", str(tmp_path), "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert "has no config.json" in err and "known classifier models: minilm" in err


def test_check_spec_accepts_registered_names_and_model_folders(tmp_path):
  assert models.check_spec("tiny-llama", "causal_lm").name == "tiny-llama"
  assert models.check_spec("minilm", "classifier").generic
  build("llama").save_pretrained(tmp_path / "m")
  assert models.check_spec(str(tmp_path / "m"), "causal_lm").generic


def test_token_ids_outside_the_vocabulary_are_an_error():
  data.check_token_ids(np.arange(VOCAB), VOCAB, "ok")
  with pytest.raises(ValueError, match=r"x: token id 97 at position \(1, 2\) is outside the model's vocabulary of 97 "
                     r"\(ids 0\.\.96\); 2 id\(s\) out of range"):
    data.check_token_ids(np.array([[0, 1, 2], [3, 4, 97], [-1, 0, 0]]), VOCAB, "x")


def test_generate_refuses_out_of_range_ids(tmp_path, monkeypatch):
  model = build("gpt2")
  path = tmp_path / "g.safetensors"
  sl.save_compact(path, sl.static_svd(model.params, CFG), cfg=CFG, model_config=model.config, metadata={
      "model_class": "transformers.models.gpt2.modeling_flax_gpt2.FlaxGPT2LMHeadModel", "task": "wikitext"})
  monkeypatch.delenv("SOFTLM_DEBUG", raising=False)
  msg = _refused(["generate", str(path), "--ids", "5,999999", "--max-new-tokens", "2"])
  assert "--ids: token id 999999 at position (0, 1) is outside the model's vocabulary of 97" in msg
  with pytest.raises(SystemExit):  # negative ids: refused by the parser
    cli.run(["generate", str(path), "--ids", "5,-1"])


def test_task_windows_from_another_tokenizer_are_refused():
  """Windows whose ids come from a larger vocabulary than the model's (another tokenizer) are refused
  with the split named, before any compression."""
  model = models.Model(models.get("tiny-llama"), "tiny", build("llama"), None, None, "minilm")
  ok = np.random.RandomState(0).randint(0, VOCAB, (4, 16))
  run.check_task_ids(model, tasks.LMTask({"train": ok, "test": ok}))
  bad = ok.copy()
  bad[2, 5] = 30000
  with pytest.raises(ValueError, match=r"tiny on wikitext, test split \(tokenized with 'minilm'\): token id 30000 at "
                     r"position \(2, 5\)"):
    run.check_task_ids(model, tasks.LMTask({"train": ok, "test": bad}))


@pytest.mark.skipif(data.find_data_dir() is None, reason="needs ../shared/data (WikiText-2)")
@pytest.mark.slow  # two whole training runs: scripts/test.sh --all
def test_a_late_write_failure_keeps_the_state_and_says_how_to_resume(tmp_path, monkeypatch):
  """A disk that fills after the training: the error says what is saved and how to resume, and the same
  command resumes from the saved state once the space is back."""
  argv = ["train", "--task", "wikitext", "--model", "tiny-llama", "--seq-len", "32", "--calib-len", "32",
          "--eval-len", "32", "--eval-windows", "2", "--calib-grams", "8", "--batch-size", "4", "--no-progress",
          "--methods", "static", "--cr", "0.5", "--refit-steps", "0", "--steps", "2", "--out", str(tmp_path)]
  real = files.atomic_write

  def disk_full(path, data_):
    if str(path).endswith("compact.safetensors"):
      raise OSError(28, "No space left on device")
    real(path, data_)
  monkeypatch.setattr(files, "atomic_write", disk_full)
  monkeypatch.delenv("SOFTLM_DEBUG", raising=False)
  msg = _refused(argv)
  assert "[static] could not write its results" in msg and "No space left on device" in msg
  assert f"its trained state is saved in {tmp_path / 'static' / 'ckpt'}" in msg and "rerun the same command" in msg
  assert (tmp_path / "static" / "ckpt").is_dir() and not (tmp_path / "static" / "results.json").exists()
  monkeypatch.setattr(files, "atomic_write", real)
  res = cli.run(argv)["static"]
  assert res["train_steps"] == 2 and (tmp_path / "static" / "compact.safetensors").exists()
  history = [h["step"] for h in res["history"]]
  assert history == sorted(set(history))  # resumed at the saved step: no step trained twice

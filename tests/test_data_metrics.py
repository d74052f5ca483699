"""GLUE metrics against hand-computed values; local data loading and batching."""
import numpy as np
import pytest

from softlm_jax import data, metrics


def test_metrics_against_hand_computed():
  pred = np.array([1, 1, 0, 0, 1, 0, 1, 1])
  label = np.array([1, 0, 0, 1, 1, 0, 1, 0])
  tp, fp, fn, tn = 3, 2, 1, 2
  assert metrics.accuracy(pred, label) == 5 / 8
  p, r = tp / (tp + fp), tp / (tp + fn)
  assert metrics.f1(pred, label) == pytest.approx(2 * p * r / (p + r))
  mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  assert metrics.matthews(pred, label) == pytest.approx(mcc)
  assert metrics.matthews(np.ones(4), np.array([1, 0, 1, 0])) == 0.0  # undefined -> 0
  assert metrics.matthews(label, label) == pytest.approx(1.0)


def test_batch_indices_cover_each_epoch_once_and_are_reproducible():
  n, bs = 50, 8
  per_epoch = n // bs
  epoch0 = np.concatenate([data.batch_indices(n, bs, s, seed=3) for s in range(per_epoch)])
  assert len(set(epoch0.tolist())) == per_epoch * bs
  assert np.array_equal(data.batch_indices(n, bs, 9, seed=3), data.batch_indices(n, bs, 9, seed=3))
  assert not np.array_equal(data.batch_indices(n, bs, 0, seed=3), data.batch_indices(n, bs, per_epoch, seed=3))
  with pytest.raises(ValueError, match="larger than the data set"):
    data.batch_indices(4, 8, 0, seed=0)


def test_eval_batches_pad_and_mask():
  seen = [idx[valid] for idx, valid in data.eval_batches(10, 4)]
  assert np.array_equal(np.concatenate(seen), np.arange(10))
  assert all(len(idx) == 4 for idx, _ in data.eval_batches(10, 4))


needs_data = pytest.mark.skipif(data.find_data_dir() is None, reason="../shared/data not present")


@needs_data
@pytest.mark.parametrize("task,split,rows", [("mrpc", "train", 3668), ("mrpc", "dev", 408),
                                             ("cola", "train", 8551), ("cola", "dev", 1043),
                                             ("sst2", "dev", 872), ("qnli", "dev", 5463)])
def test_local_glue_row_counts(task, split, rows):
  texts, labels = data.load_glue(task, split)
  assert len(texts) == len(labels) == rows  # counts from ../shared/data/README.md
  assert set(np.unique(labels).tolist()) == {0, 1}
  assert all(isinstance(t, str) and t for t in texts[0])
  assert len(texts[0]) == (2 if task in ("mrpc", "qnli") else 1)


@needs_data
def test_qnli_train_is_reported_missing():
  with pytest.raises(FileNotFoundError, match=r"QNLI/train.tsv does not exist.*GLUE qnli.*has only \['dev'\]"):
    data.load_glue("qnli", "train")


@pytest.mark.skipif(data.find_data_dir() is None, reason="needs ../shared/data")
def test_wikitext_local_splits_are_the_files():
  root = data.find_data_dir()
  raw = data.load_wikitext("test_raw")
  with open(root / data.WIKITEXT_FILES["test_raw"]) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  assert raw == "\n".join(lines)
  with open(root / data.WIKITEXT_FILES["valid"]) as f:
    paragraphs = [line for line in f if line.strip()]  # the file's 3,760 lines minus whitespace-only ones
  assert data.load_wikitext("valid").count("\n") + 1 == len(paragraphs) > 2000
  with pytest.raises(FileNotFoundError, match="offline splits"):
    data.load_wikitext("train_raw")
  with pytest.raises(ValueError, match="unknown WikiText-2 split"):
    data.load_wikitext("train")


def test_lm_windows():
  ids = np.arange(23)
  w = data.lm_windows(ids, 5)
  assert w.shape == (4, 5) and w.dtype == np.int32 and np.array_equal(w.reshape(-1), ids[:20])
  assert data.lm_windows(ids, 5, 2).shape == (2, 5)
  with pytest.raises(ValueError, match="only 4 windows"):
    data.lm_windows(ids, 5, 5)

"""Data through the `datasets` library: local copies (../shared/data layout) or the hub when online.

``data_dir`` comes from the argument, else the ``SOFTLM_DATA_DIR`` environment variable, else a
``../shared/data`` next to the working directory; when none of these holds the files, the hub names
(``glue/<task>``, ``wikitext/wikitext-2-raw-v1``) are used.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

import numpy as np

#: task -> (local folder, text columns, label column, label mapping or None, has header, column names)
GLUE_TASKS = {
    "mrpc": ("MRPC", ("#1 String", "#2 String"), "Quality", None, True, None),
    "cola": ("CoLA", ("sentence",), "label", None, False, ["source", "label", "original_label", "sentence"]),
    "sst2": ("SST-2", ("sentence",), "label", None, True, None),
    "qnli": ("QNLI", ("question", "sentence"), "label", {"entailment": 0, "not_entailment": 1}, True, None),
}
HUB_COLUMNS = {"mrpc": ("sentence1", "sentence2"), "cola": ("sentence",), "sst2": ("sentence",),
               "qnli": ("question", "sentence")}


def find_data_dir(data_dir: Optional[str] = None) -> Optional[Path]:
  for cand in (data_dir, os.environ.get("SOFTLM_DATA_DIR"), "../shared/data",
               Path(__file__).resolve().parents[2] / "shared" / "data"):
    if cand and Path(cand).is_dir():
      return Path(cand)
  return None


def load_glue(task: str, split: str, data_dir: Optional[str] = None) -> tuple[list, np.ndarray]:
  """Returns ``(texts, labels)``: texts is a list of 1- or 2-tuples of strings, labels ``(N,)`` int.

  ``split`` is ``"train"`` or ``"dev"`` (``"validation"`` on the hub). QNLI has only dev locally.
  """
  import datasets
  task = task.lower()
  if task not in GLUE_TASKS:
    raise ValueError(f"unknown GLUE task {task!r}; expected one of {sorted(GLUE_TASKS)}")
  folder, cols, label_col, mapping, header, names = GLUE_TASKS[task]
  root = find_data_dir(data_dir)
  path = root / "glue" / folder / f"{split}.tsv" if root else None
  if path is not None and path.exists():
    kw = dict(delimiter="\t", quoting=csv.QUOTE_NONE)
    if not header:
      kw.update(column_names=names, header=None)
    ds = datasets.load_dataset("csv", data_files={split: str(path)}, split=split, **kw)
    texts = list(zip(*[[str(x) for x in ds[c]] for c in cols]))
    raw = ds[label_col]
    labels = np.asarray([mapping[x] if mapping else int(x) for x in raw], np.int32)
    return texts, labels
  if root is not None and path is not None and task == "qnli" and split == "train":
    raise FileNotFoundError(f"{path} does not exist: only QNLI dev is available offline")
  ds = datasets.load_dataset("glue", task, split="validation" if split == "dev" else split)
  texts = list(zip(*[ds[c] for c in HUB_COLUMNS[task]]))
  return texts, np.asarray(ds["label"], np.int32)


def tokenize(tokenizer, texts: list, max_len: int) -> dict[str, np.ndarray]:
  """Fixed-length (static-shape) encoding: ``input_ids``, ``attention_mask``, ``token_type_ids``,
  each ``(N, max_len)`` int32."""
  cols = list(zip(*texts))
  enc = tokenizer(*cols, max_length=max_len, truncation=True, padding="max_length", return_tensors="np")
  return {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")
          if k in enc}


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of training batch ``step``: a fresh permutation each epoch, a pure function of
  ``(step, seed)`` so a resumed run sees exactly the batches it would have seen. Shape
  ``(batch_size,)``; the tail of each epoch that does not fill a batch is dropped."""
  per_epoch = n // batch_size
  if per_epoch == 0:
    raise ValueError(f"batch size {batch_size} is larger than the data set ({n} examples)")
  epoch, i = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[i * batch_size:(i + 1) * batch_size]


def eval_batches(n: int, batch_size: int):
  """Yields ``(indices, valid)`` covering ``range(n)`` in order, padded to full batches (static
  shapes); ``valid`` is a bool mask of the real rows."""
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    yield np.minimum(idx, n - 1), valid


#: split -> local file under the data root. Only valid (tokenized, ``<unk>`` kept) and the raw test
#: split exist offline; the WikiText-2 train split does not (train language models on valid here).
WIKITEXT_FILES = {"valid": "wikitext-2/valid.txt", "test": "wikitext-2/test.txt",
                  "test_raw": "wikitext-2-raw/wiki.test.raw"}
WIKITEXT_HUB = {"valid": ("wikitext-2-v1", "validation"), "test": ("wikitext-2-v1", "test"),
                "test_raw": ("wikitext-2-raw-v1", "test"), "train_raw": ("wikitext-2-raw-v1", "train"),
                "valid_raw": ("wikitext-2-raw-v1", "validation")}


def load_wikitext(split: str, data_dir: Optional[str] = None) -> str:
  """WikiText-2 split as one string (paragraphs joined by newlines).

  ``split``: ``"valid"``, ``"test"`` (tokenized release) or ``"test_raw"`` (raw; for GPT-2 / Llama
  tokenizers); hub-only: ``"train_raw"``, ``"valid_raw"``. Local files come through ``datasets``'
  text loader; without them the hub's ``wikitext/wikitext-2(-raw)-v1``.
  """
  import datasets
  if split not in WIKITEXT_HUB:
    raise ValueError(f"unknown WikiText-2 split {split!r}; expected one of {sorted(WIKITEXT_HUB)}")
  root = find_data_dir(data_dir)
  if root is not None and split in WIKITEXT_FILES and (root / WIKITEXT_FILES[split]).exists():
    ds = datasets.load_dataset("text", data_files={"x": str(root / WIKITEXT_FILES[split])}, split="x")
  elif root is not None and split not in WIKITEXT_FILES:
    raise FileNotFoundError(f"WikiText-2 {split!r} is not in {root}; offline splits: {sorted(WIKITEXT_FILES)}")
  else:
    name, hub_split = WIKITEXT_HUB[split]
    ds = datasets.load_dataset("wikitext", name, split=hub_split)
  return "\n".join(t for t in ds["text"] if t.strip())


def lm_windows(ids: np.ndarray, length: int, count: Optional[int] = None) -> np.ndarray:
  """Non-overlapping windows of a token stream, from the start: ``(N, length)`` int32.

  ``N = len(ids) // length`` (the tail is dropped), or ``count`` if given (error when there are
  fewer tokens than ``count * length``).
  """
  ids = np.asarray(ids, np.int32).reshape(-1)
  n = len(ids) // length
  if count is not None:
    if count > n:
      raise ValueError(f"{len(ids)} tokens give only {n} windows of {length}, {count} requested")
    n = count
  return ids[:n * length].reshape(n, length)

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

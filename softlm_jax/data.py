"""Data: the nine GLUE tasks, a user's own CSV/TSV/JSONL file, WikiText-2, batching.

Where the data comes from: a folder the user names (``data_dir`` argument, else the
``SOFTLM_DATA_DIR`` environment variable) is used and nothing else: if it does not exist, or lacks
the file asked for, that is an error naming the path. Without one, a ``../shared/data`` next to the
working directory (or the repository) is used when it holds the file, else the Hugging Face hub
(``glue/<task>``, ``wikitext/wikitext-2-raw-v1``; online only).

GLUE files are read in the standard layout of the GLUE download script, either under
``<root>/glue/<Folder>/`` or directly under ``<root>/<Folder>/``: ``CoLA``, ``SST-2``, ``MRPC``,
``QQP``, ``STS-B``, ``MNLI``, ``QNLI``, ``RTE``, ``WNLI``, with ``train.tsv`` and ``dev.tsv`` (MNLI:
``dev_matched.tsv`` and ``dev_mismatched.tsv``). Labels map as on the hub (e.g. MNLI entailment 0,
neutral 1, contradiction 2); STS-B is regression (float scores 0-5).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

csv.field_size_limit(2**31 - 1)


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """One GLUE task: where its files are and how to read them.

  ``text_cols``: 1 or 2 column names in the local TSV; ``label_col``: the label column; ``labels``:
  label string -> id (None: the column already holds ids, or floats for regression); ``header``:
  False when the TSV has no header row (CoLA), then ``columns`` names the fields; ``splits``: local
  split -> file stem; ``hub_text_cols``: the hub's column names; ``hub_splits``: split -> hub split.
  """
  name: str
  folder: str
  text_cols: tuple
  label_col: str
  num_labels: int
  metric: str
  labels: Optional[dict] = None
  header: bool = True
  columns: Optional[tuple] = None
  splits: tuple = ("train", "dev")
  hub_text_cols: tuple = ("sentence1", "sentence2")
  hub_splits: Optional[dict] = None

  @property
  def regression(self) -> bool:
    return self.num_labels == 1

  @property
  def eval_splits(self) -> tuple:
    """The labelled evaluation splits (GLUE test labels are hidden): ``("dev",)``, MNLI both devs."""
    return tuple(s for s in self.splits if s != "train")


_NLI2 = {"entailment": 0, "not_entailment": 1}
GLUE = {t.name: t for t in [
    GlueTask("cola", "CoLA", ("sentence",), "label", 2, "mcc", header=False,
             columns=("source", "label", "original_label", "sentence"), hub_text_cols=("sentence",)),
    GlueTask("sst2", "SST-2", ("sentence",), "label", 2, "accuracy", hub_text_cols=("sentence",)),
    GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", 2, "f1"),
    GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", 2, "f1",
             hub_text_cols=("question1", "question2")),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", 1, "pearson"),
    GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", 3, "accuracy",
             labels={"entailment": 0, "neutral": 1, "contradiction": 2},
             splits=("train", "dev_matched", "dev_mismatched"), hub_text_cols=("premise", "hypothesis"),
             hub_splits={"dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}),
    GlueTask("qnli", "QNLI", ("question", "sentence"), "label", 2, "accuracy", labels=_NLI2,
             hub_text_cols=("question", "sentence")),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", 2, "accuracy", labels=_NLI2),
    GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), "label", 2, "accuracy"),
]}
#: accepted spellings -> task name
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli"}


def glue_task(name: str) -> GlueTask:
  """The :class:`GlueTask` called ``name`` (case-insensitive; ``SST-2``, ``STS-B`` also accepted)."""
  key = ALIASES.get(str(name).lower(), str(name).lower())
  if key not in GLUE:
    raise ValueError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(GLUE)} "
                     "(or your own file: --train-file/--eval-file with --text-cols and --label-col)")
  return GLUE[key]


def user_data_dir(data_dir: Optional[str] = None) -> Optional[tuple[Path, str]]:
  """The folder the user named, as ``(path, where it was named)``, or None. A named folder that does
  not exist is an error naming it."""
  for value, source in ((data_dir, "--data-dir"), (os.environ.get("SOFTLM_DATA_DIR"), "$SOFTLM_DATA_DIR")):
    if value:
      path = Path(value).expanduser()
      if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} (from {source}) does not exist")
      return path, source
  return None


def default_data_dirs() -> list[Path]:
  """Candidate shared data folders when the user names none."""
  return [Path("../shared/data"), Path(__file__).resolve().parents[2] / "shared" / "data"]


def find_data_dir(data_dir: Optional[str] = None) -> Optional[Path]:
  """The data root: the user's folder (``data_dir`` / ``$SOFTLM_DATA_DIR``; error if missing), else
  the first existing default (``../shared/data``), else None (the hub)."""
  named = user_data_dir(data_dir)
  if named is not None:
    return named[0]
  return next((p for p in default_data_dirs() if p.is_dir()), None)


def glue_file(task: GlueTask, split: str, root: Path) -> Path:
  """``root/glue/<Folder>/<split>.tsv`` or ``root/<Folder>/<split>.tsv`` (whichever exists; the first
  when neither does)."""
  cands = [root / "glue" / task.folder / f"{split}.tsv", root / task.folder / f"{split}.tsv"]
  return next((c for c in cands if c.exists()), cands[0])


def read_tsv(path: Path, *, header: bool = True, columns: Optional[Sequence[str]] = None) -> tuple[list, list]:
  """``(column names, rows)`` of a GLUE TSV (no quoting, as the GLUE files are written). A row with
  more fields than the header (a few STS-B / MNLI lines) keeps its last field as the last column."""
  with open(path, encoding="utf-8-sig", newline="") as f:  # the MRPC files start with a BOM
    rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
  if not rows:
    raise ValueError(f"{path} is empty")
  names = list(rows.pop(0)) if header else list(columns)
  if not rows:
    raise ValueError(f"{path} is empty: no data rows after the header {names}")
  fixed = []
  for i, r in enumerate(rows):
    if len(r) > len(names):
      r = r[:len(names) - 1] + [r[-1]]
    elif len(r) < len(names):
      raise ValueError(f"{path}, data line {i + 1}: {len(r)} fields, the header has {len(names)} ({names})")
    fixed.append(r)
  return names, fixed


@dataclasses.dataclass
class TextData:
  """Texts and labels of one split.

  ``texts``: list of 1- or 2-tuples of strings; ``labels``: ``(N,)`` int32 class ids, or float32
  scores when ``num_labels == 1`` (regression); ``label_names``: id -> original label (classification).
  """
  texts: list
  labels: np.ndarray
  num_labels: int
  label_names: Optional[list] = None
  source: str = ""

  @property
  def regression(self) -> bool:
    return self.num_labels == 1

  def __len__(self) -> int:
    return len(self.labels)

  def head(self, n: Optional[int]) -> "TextData":
    return self if not n else dataclasses.replace(self, texts=self.texts[:n], labels=self.labels[:n])


def _labels(raw: Sequence, task: GlueTask, path) -> np.ndarray:
  if task.regression:
    return np.asarray([float(x) for x in raw], np.float32)
  if task.labels is not None:
    bad = sorted({x for x in raw if x not in task.labels})
    if bad:
      raise ValueError(f"{path}: labels {bad[:5]} are not {task.name} labels; expected {sorted(task.labels)}")
    return np.asarray([task.labels[x] for x in raw], np.int32)
  out = np.asarray([int(x) for x in raw], np.int32)
  if out.size and (out.min() < 0 or out.max() >= task.num_labels):
    raise ValueError(f"{path}: label ids outside 0..{task.num_labels - 1}")
  return out


def load_glue_split(task: str, split: str, data_dir: Optional[str] = None) -> TextData:
  """One split of a GLUE task as :class:`TextData`.

  ``split``: ``"train"`` or ``"dev"`` (MNLI: ``"dev_matched"``, ``"dev_mismatched"``). Reads the
  local TSV (see the module docstring for where); without a local copy, the hub's ``glue/<task>``.
  """
  t = glue_task(task)
  if split not in t.splits:
    raise ValueError(f"GLUE {t.name} has no split {split!r}; valid splits: {list(t.splits)}")
  named = user_data_dir(data_dir)
  roots = [named[0]] if named else [p for p in default_data_dirs() if p.is_dir()]
  for root in roots:
    path = glue_file(t, split, root)
    if path.exists():
      names, rows = read_tsv(path, header=t.header, columns=t.columns)
      missing = [c for c in t.text_cols + (t.label_col,) if c not in names]
      if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} for GLUE {t.name}; the file has {names}")
      idx = [names.index(c) for c in t.text_cols]
      texts = [tuple(r[i] for i in idx) for r in rows]
      labels = _labels([r[names.index(t.label_col)] for r in rows], t, path)
      return TextData(texts, labels, t.num_labels, None if t.regression else _label_names(t), str(path))
    if path.parent.is_dir():  # a local copy of the task without this split: say so, do not go online
      have = sorted(f.stem for f in path.parent.glob("*.tsv"))
      raise FileNotFoundError(f"{path} does not exist: the local copy of GLUE {t.name} in {path.parent} has only "
                              f"{have}; pass --data-dir with the full GLUE files")
    if named:
      raise FileNotFoundError(f"GLUE {t.name} {split} not found in {root} (from {named[1]}): looked for "
                              f"{root / 'glue' / t.folder / (split + '.tsv')} and {root / t.folder / (split + '.tsv')}")
  import datasets  # heavy: imported on use
  hub_split = (t.hub_splits or {}).get(split, "validation" if split == "dev" else split)
  try:
    ds = datasets.load_dataset("glue", t.name, split=hub_split)
  except Exception as e:  # noqa: BLE001 - offline: say where the files were looked for
    where = ", ".join(str(glue_file(t, split, r)) for r in roots) or "no local data folder"
    raise FileNotFoundError(f"GLUE {t.name} {split}: no local file ({where}) and the hub failed "
                            f"({type(e).__name__}: {str(e)[:200]}); pass --data-dir with the GLUE files") from None
  texts = list(zip(*[ds[c] for c in t.hub_text_cols]))
  dtype = np.float32 if t.regression else np.int32
  return TextData(texts, np.asarray(ds["label"], dtype), t.num_labels,
                  None if t.regression else _label_names(t), f"hub glue/{t.name} {hub_split}")


def _label_names(t: GlueTask) -> list:
  if t.labels is None:
    return [str(i) for i in range(t.num_labels)]
  return [k for k, _ in sorted(t.labels.items(), key=lambda kv: kv[1])]


def load_glue(task: str, split: str, data_dir: Optional[str] = None) -> tuple[list, np.ndarray]:
  """``(texts, labels)`` of :func:`load_glue_split` (texts: 1- or 2-tuples; labels ``(N,)``)."""
  d = load_glue_split(task, split, data_dir)
  return d.texts, d.labels


# ---------------------------------------------------------------------------------------------------
# the user's own file

TABLE_FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".json": None}
TASK_TYPES = ("auto", "classification", "regression")


def read_table(path: str) -> tuple[list, list[dict]]:
  """``(column names, rows as dicts)`` of a CSV / TSV (header row) or JSONL (one object a line) file."""
  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"data file {p} does not exist")
  ext = p.suffix.lower()
  if ext not in TABLE_FORMATS:
    raise ValueError(f"{p}: unknown file type {ext!r}; valid: {sorted(TABLE_FORMATS)}")
  if ext in (".jsonl", ".json"):
    rows = []
    with open(p, encoding="utf-8-sig") as f:
      for i, line in enumerate(f):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{p}, line {i + 1}: not a JSON object ({e})") from None
    names = list(dict.fromkeys(k for r in rows for k in r))
  else:
    with open(p, encoding="utf-8-sig", newline="") as f:
      reader = csv.DictReader(f, delimiter=TABLE_FORMATS[ext])
      rows = list(reader)
      names = list(reader.fieldnames or [])
  if not rows:
    raise ValueError(f"{p} is empty: no data rows (expected a header line and one example a line)")
  return names, rows


#: auto mode: a label column at least this fraction numbers ...
NEAR_NUMERIC_FRACTION = 0.9
#: ... with more distinct numbers than this (or any non-integer) is a regression column with bad rows
MAX_AUTO_CLASSES = 20


def _number(v) -> Optional[float]:
  try:
    x = float(v)
  except (TypeError, ValueError):
    return None
  return x if np.isfinite(x) else None


def infer_task_type(values: Sequence) -> str:
  """``"regression"`` when every label is a number and some are not integers, else ``"classification"``.

  Raises ValueError (naming the first row, 1-based, and its value) for a column that is almost all
  numbers (:data:`NEAR_NUMERIC_FRACTION`) that look like a regression target (a non-integer, or more
  than :data:`MAX_AUTO_CLASSES` distinct values) but has a few that are not: one ``n/a`` in a column
  of scores would otherwise make a classifier with one class per distinct score. A few integer ids
  plus a word (``0, 1, 2, unknown``) stay classification.
  """
  nums = [_number(v) for v in values]
  good = [x for x in nums if x is not None]
  if len(good) == len(nums):
    return "classification" if all(float(x).is_integer() for x in good) else "regression"
  looks_continuous = any(not x.is_integer() for x in good) or len(set(good)) > MAX_AUTO_CLASSES
  if good and len(good) >= NEAR_NUMERIC_FRACTION * len(nums) and looks_continuous:
    bad = [i for i, x in enumerate(nums) if x is None]
    raise ValueError(f"regression labels must be numbers: row {bad[0] + 1} has {values[bad[0]]!r} "
                     f"({len(bad)} of {len(nums)} rows are not numbers, the other {len(good)} are, with "
                     f"{len(set(good))} distinct values); fix or drop those rows, or pass --task-type "
                     "classification if each value is a class")
  return "classification"


def load_table(path: str, text_cols: Sequence[str], label_col: str, *, task_type: str = "auto",
               label_names: Optional[Sequence[str]] = None) -> TextData:
  """A user's CSV / TSV / JSONL file as :class:`TextData`.

  Args:
    path: the file (``.csv``, ``.tsv`` with a header row; ``.jsonl``).
    text_cols: one or two text column names (a sentence, or a pair).
    label_col: the label column.
    task_type: ``"classification"``, ``"regression"`` or ``"auto"`` (:func:`infer_task_type`).
    label_names: the class names in id order (e.g. those of the training file, for an eval file);
      default: sorted distinct labels (integer labels in numeric order).
  """
  if task_type not in TASK_TYPES:
    raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
  text_cols = list(text_cols)
  if not 1 <= len(text_cols) <= 2:
    raise ValueError(f"give one or two text columns, got {text_cols}")
  names, rows = read_table(path)
  for c in text_cols + [label_col]:
    if c not in names:
      raise ValueError(f"{path}: no column {c!r}; the columns are {names}")
  raw = [r.get(label_col) for r in rows]
  empty = [i for i, v in enumerate(raw) if v is None or str(v).strip() == ""]
  if empty:
    raise ValueError(f"{path}: row {empty[0] + 1} has no {label_col!r} label ({len(empty)} rows without one)")
  texts = [tuple("" if r.get(c) is None else str(r[c]) for c in text_cols) for r in rows]
  try:
    kind = infer_task_type(raw) if task_type == "auto" else task_type
  except ValueError as e:
    raise ValueError(f"{path}: column {label_col!r}: {e}") from None
  if kind == "regression":
    nums = [_number(v) for v in raw]
    bad = [i for i, x in enumerate(nums) if x is None]
    if bad:
      raise ValueError(f"{path}: column {label_col!r}: regression labels must be numbers: row {bad[0] + 1} has "
                       f"{raw[bad[0]]!r} ({len(bad)} of {len(raw)} rows are not numbers)")
    labels = np.asarray(nums, np.float32)
    return TextData(texts, labels, 1, None, str(path))
  keys = [str(v) for v in raw]
  if label_names is None:
    distinct = set(keys)
    numeric = all(k.lstrip("-").isdigit() for k in distinct)
    label_names = sorted(distinct, key=int) if numeric else sorted(distinct)
  label_names = [str(n) for n in label_names]
  unknown = sorted(set(keys) - set(label_names))
  if unknown:
    raise ValueError(f"{path}: labels {unknown[:5]} are not among the classes {label_names}")
  ids = {n: i for i, n in enumerate(label_names)}
  if len(label_names) < 2:
    raise ValueError(f"{path}: classification needs at least 2 classes, found only {label_names}")
  return TextData(texts, np.asarray([ids[k] for k in keys], np.int32), len(label_names), label_names, str(path))


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
  import datasets  # heavy: imported on use
  if split not in WIKITEXT_HUB:
    raise ValueError(f"unknown WikiText-2 split {split!r}; expected one of {sorted(WIKITEXT_HUB)}")
  named = user_data_dir(data_dir)
  root = find_data_dir(data_dir)
  if named is not None and split in WIKITEXT_FILES and not (root / WIKITEXT_FILES[split]).exists():
    raise FileNotFoundError(f"WikiText-2 {split!r} not found: {root / WIKITEXT_FILES[split]} does not exist "
                            f"(data folder from {named[1]})")
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


def check_token_ids(ids, vocab_size: Optional[int], what: str) -> None:
  """Refuses token ids outside ``[0, vocab_size)`` (ValueError naming ``what``, the first such id, its
  position and the vocabulary size). A model's embedding lookup would otherwise clamp them silently
  (XLA's gather clamps out-of-range indices). ``ids``: an int array of any shape; ``vocab_size`` None:
  unknown, nothing checked."""
  if vocab_size is None:
    return
  a = np.asarray(ids)
  if a.size == 0:
    return
  bad = np.argwhere((a < 0) | (a >= vocab_size))
  if len(bad):
    pos = tuple(int(i) for i in bad[0])
    where = pos[0] if len(pos) == 1 else pos
    raise ValueError(f"{what}: token id {int(a[pos])} at position {where} is outside the model's vocabulary of "
                     f"{vocab_size} (ids 0..{vocab_size - 1}); {len(bad)} id(s) out of range in all. Use the "
                     "model's own tokenizer, or ids below its vocabulary size")

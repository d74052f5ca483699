"""GLUE metrics in numpy: accuracy, F1 (MRPC, QQP), Matthews correlation (CoLA), Pearson and Spearman
(STS-B and any regression); :func:`task_metrics` for a user's own data."""
from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
  """pred, label: ``(N,)`` ints."""
  return float(np.mean(np.asarray(pred) == np.asarray(label)))


def f1(pred: np.ndarray, label: np.ndarray, positive: int = 1) -> float:
  """F1 of class ``positive``; 0 when there are no true positives."""
  pred, label = np.asarray(pred) == positive, np.asarray(label) == positive
  tp = np.sum(pred & label)
  if tp == 0:
    return 0.0
  precision, recall = tp / np.sum(pred), tp / np.sum(label)
  return float(2 * precision * recall / (precision + recall))


def matthews(pred: np.ndarray, label: np.ndarray) -> float:
  """Matthews correlation of binary predictions; 0 when undefined."""
  pred, label = np.asarray(pred).astype(bool), np.asarray(label).astype(bool)
  tp, tn = float(np.sum(pred & label)), float(np.sum(~pred & ~label))
  fp, fn = float(np.sum(pred & ~label)), float(np.sum(~pred & label))
  denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  return float((tp * tn - fp * fn) / denom) if denom > 0 else 0.0


def pearson(pred: np.ndarray, label: np.ndarray) -> float:
  """Pearson correlation of two ``(N,)`` float arrays; 0 when either is constant."""
  x, y = np.asarray(pred, np.float64), np.asarray(label, np.float64)
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denom) if denom > 0 else 0.0


def rankdata(x: np.ndarray) -> np.ndarray:
  """Ranks 1..N, ties given their average rank (as ``scipy.stats.rankdata``)."""
  x = np.asarray(x)
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(1, len(x) + 1)
  _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inv, weights=ranks)
  return sums[inv] / counts[inv]


def spearman(pred: np.ndarray, label: np.ndarray) -> float:
  """Spearman rank correlation: Pearson of the (tie-averaged) ranks."""
  return pearson(rankdata(pred), rankdata(label))


def mse(pred: np.ndarray, label: np.ndarray) -> float:
  return float(np.mean((np.asarray(pred, np.float64) - np.asarray(label, np.float64)) ** 2))


#: task -> (main metric name, {metric name: fn}); the GLUE benchmark's metrics per task
GLUE_METRICS = {
    "cola": ("mcc", {"mcc": matthews, "accuracy": accuracy}),
    "sst2": ("accuracy", {"accuracy": accuracy}),
    "mrpc": ("f1", {"f1": f1, "accuracy": accuracy}),
    "qqp": ("f1", {"f1": f1, "accuracy": accuracy}),
    "stsb": ("pearson", {"pearson": pearson, "spearman": spearman}),
    "mnli": ("accuracy", {"accuracy": accuracy}),
    "qnli": ("accuracy", {"accuracy": accuracy}),
    "rte": ("accuracy", {"accuracy": accuracy}),
    "wnli": ("accuracy", {"accuracy": accuracy}),
}


def glue_metrics(task: str, pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
  """pred: ``(N,)`` class ids, or float scores for STS-B; label: ``(N,)`` the same kind."""
  return {name: fn(pred, label) for name, fn in GLUE_METRICS[task][1].items()}


def task_metrics(task: str, pred: np.ndarray, label: np.ndarray, num_labels: int) -> tuple[str, dict[str, float]]:
  """``(main metric name, {name: value})`` for a GLUE task, or for a user's data set (``task`` not a
  GLUE name): regression (``num_labels == 1``) Pearson / Spearman / MSE; classification accuracy,
  plus F1 of class 1 when binary."""
  if task in GLUE_METRICS:
    return GLUE_METRICS[task][0], glue_metrics(task, pred, label)
  if num_labels == 1:
    return "pearson", {"pearson": pearson(pred, label), "spearman": spearman(pred, label), "mse": mse(pred, label)}
  out = {"accuracy": accuracy(pred, label)}
  if num_labels == 2:
    out["f1"] = f1(pred, label)
  return "accuracy", out

"""GLUE metrics in numpy (MRPC F1 + accuracy, CoLA Matthews correlation, SST-2 / QNLI accuracy)."""
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


#: task -> (main metric name, {metric name: fn})
GLUE_METRICS = {
    "mrpc": ("f1", {"f1": f1, "accuracy": accuracy}),
    "cola": ("mcc", {"mcc": matthews, "accuracy": accuracy}),
    "sst2": ("accuracy", {"accuracy": accuracy}),
    "qnli": ("accuracy", {"accuracy": accuracy}),
}


def glue_metrics(task: str, pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
  return {name: fn(pred, label) for name, fn in GLUE_METRICS[task][1].items()}

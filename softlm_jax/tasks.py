"""Tasks for the run pipeline: what a method trains on, calibrates on and is scored by.

A :class:`Task` hides the task kind from :mod:`softlm_jax.run`: sequence classification or regression
(GLUE, or the user's CSV/TSV/JSONL) and causal language modelling (WikiText-2 perplexity). Which data
is a :class:`DataConfig` (frozen, to and from a dict), never parsed options.

WikiText-2 protocol (../shared/data/README.md): train on the **valid** split (there is no local train
split); perplexity on the first :data:`EVAL_CHARS` characters of the **raw test** split, in
``eval_windows`` non-overlapping windows of ``eval_len`` tokens from the start, ``exp(mean next-token
loss)``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import types
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from softlm_jax import data, losses, metrics, serial
from softlm_jax.intercept import intercept
from softlm_jax.train import distill_task

LM_TASK = "wikitext"
EVAL_CHARS = 200_000
#: max sequence length per GLUE task (tokens); user data: max_len, default 128
MAX_LEN = {"mrpc": 128, "cola": 64, "sst2": 64, "qnli": 128, "qqp": 128, "stsb": 128, "mnli": 128, "rte": 128,
           "wnli": 128}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which data a run uses.

  Attributes:
    task: a GLUE task (``sst2``, ...), ``"wikitext"`` (causal LM), or, with ``train_file``, a name for
      the user's data (its file stem by default).
    data_dir: local data root (default ``$SOFTLM_DATA_DIR``, else ../shared/data, else the hub).
    train_file, eval_file, text_cols, label_col, task_type: the user's own table
      (:func:`softlm_jax.data.load_table`); without ``eval_file`` the last 10% of ``train_file`` is held out.
    eval_limit: evaluate on the first N examples only.
    max_len: classifier tokens per example (default per GLUE task, else 128).
    seq_len: causal LM training window (tokens); also the calibration window unless ``calib_len`` is set.
    calib_len: causal LM calibration window (tokens) of the Grams, the allocation's scores, the
      propagated fit and the block refit; None: ``seq_len``. The ``lm`` preset fine-tunes on windows of
      the perplexity's length (512) and calibrates on 128-token ones (BENCHMARKS.md#ablations).
    eval_len, eval_windows: perplexity windows (tokens, count).
    curve_windows: causal LM: test windows of the during-training perplexity curve.
  """
  task: str = "sst2"
  data_dir: Optional[str] = None
  train_file: Optional[str] = None
  eval_file: Optional[str] = None
  text_cols: Optional[tuple] = None
  label_col: Optional[str] = None
  task_type: str = "auto"
  eval_limit: Optional[int] = None
  max_len: Optional[int] = None
  seq_len: int = 128
  calib_len: Optional[int] = None
  eval_len: int = 512
  eval_windows: int = 16
  curve_windows: int = 4

  def __post_init__(self):
    if self.train_file is None and self.task != LM_TASK:
      data.glue_task(self.task)  # a clear error for an unknown task
    if self.train_file is not None and (not self.text_cols or not self.label_col):
      raise ValueError("train_file needs text_cols (a[,b]) and label_col")
    for name in ("seq_len", "eval_len", "eval_windows", "curve_windows"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)!r}")
    if self.calib_len is not None and (isinstance(self.calib_len, bool) or int(self.calib_len) != self.calib_len
                                       or int(self.calib_len) < 1):
      raise ValueError(f"DataConfig.calib_len must be an int >= 1 or None (the training window), got "
                       f"{self.calib_len!r}")

  @property
  def lm_calib_len(self) -> int:
    """The causal LM calibration window: ``calib_len``, else ``seq_len``."""
    return int(self.seq_len if self.calib_len is None else self.calib_len)

  @property
  def max_positions(self) -> int:
    """The longest causal LM window the model runs (training, calibration or perplexity)."""
    return max(int(self.seq_len), self.lm_calib_len, int(self.eval_len))

  @property
  def model_kind(self) -> str:
    return "causal_lm" if self.task == LM_TASK and self.train_file is None else "classifier"

  def to_dict(self) -> dict:
    return serial.to_dict(self)

  @classmethod
  def from_dict(cls, d) -> "DataConfig":
    return serial.from_dict(cls, d)


# ---------------------------------------------------------------------------------------------------
# causal LM helpers (one loss, one perplexity protocol)


def lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy; logits ``(B, T, V)``, ids ``(B, T)`` int32 -> scalar float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


def _logits_fn(model) -> Callable:
  """``(params, ids) -> logits`` of a :class:`softlm_jax.models.Model`, a HF Flax model or a function."""
  if hasattr(model, "logits_fn"):
    return model.logits_fn()
  if isinstance(model, (types.FunctionType, functools.partial)) or not hasattr(model, "config"):
    return model
  return lambda p, ids: model(ids, params=p).logits


def perplexity(model, params, cfg, windows: np.ndarray, batch: int = 4, progress: bool = False) -> float:
  """``exp(mean next-token loss)`` over ``windows`` ``(N, T)`` int32 (``T - 1`` predictions a window),
  the model (a :class:`~softlm_jax.models.Model`, a HF Flax causal LM or ``logits_fn(params, ids)``)
  run under :func:`softlm_jax.intercept` (dense, training-form or exported ``params``)."""
  fn = _logits_fn(model)

  @jax.jit
  def nll(p, ids):
    with intercept(cfg):
      return lm_loss(fn(p, ids), ids)
  starts = range(0, len(windows), batch)
  if progress:
    starts = tqdm(starts, desc="perplexity", dynamic_ncols=True)
  losses_ = [float(nll(params, jnp.asarray(windows[i:i + batch]))) for i in starts]
  sizes = [len(windows[i:i + batch]) for i in range(0, len(windows), batch)]
  return float(np.exp(np.average(losses_, weights=sizes)))


def wikitext_windows(tok, *, seq_len: int, eval_len: int, eval_windows: int, data_dir: Optional[str] = None,
                     train: bool = True, calib_len: Optional[int] = None, heldout: bool = False) -> dict:
  """``{"train": (N, seq_len), "test": (eval_windows, eval_len)}`` int32 token windows (train: WikiText-2
  valid; test: the raw test split's first :data:`EVAL_CHARS` characters, or with ``heldout`` the rest
  of it: text no run scores, so no choice is tuned on it). ``train=False`` skips train.
  With ``calib_len`` (and train) also ``"calib": (M, calib_len)``: the same valid tokens in windows of
  that length (the calibration set's)."""
  out = {}
  if train:
    ids = tok(data.load_wikitext("valid", data_dir))["input_ids"]
    out["train"] = data.lm_windows(ids, seq_len)
    if calib_len is not None:
      out["calib"] = data.lm_windows(ids, calib_len)
  text = data.load_wikitext("test_raw", data_dir)
  test_ids = tok(text[EVAL_CHARS:] if heldout else text[:EVAL_CHARS])["input_ids"]
  n = min(eval_windows, len(test_ids) // eval_len)
  out["test"] = data.lm_windows(test_ids, eval_len, n)
  return out


def eval_split_name(windows: np.ndarray, heldout: bool = False) -> str:
  where = f"after the first {EVAL_CHARS} chars (held out)" if heldout else f"first {EVAL_CHARS} chars"
  return f"wikitext-2 raw test, {where}, {windows.shape[0]}x{windows.shape[1]} tokens"


# ---------------------------------------------------------------------------------------------------
# classifier helpers


def predict_fn(model, cfg) -> Callable:
  """Jitted ``(params, inputs) -> logits (B, num_labels)``, dropout off, under :func:`intercept`.
  ``model``: a :class:`~softlm_jax.models.Model` or a HF Flax classifier."""
  fn = model.logits_fn() if hasattr(model, "logits_fn") else (lambda p, x: model(**x, params=p, train=False).logits)

  @jax.jit
  def predict(params, inputs):
    with intercept(cfg):
      return fn(params, inputs)
  return predict


def predict_all(predict: Callable, params, enc: dict, batch_size: int = 64) -> np.ndarray:
  """Logits of every row of ``enc`` (``{name: (N, L)}``), in order, padded to full batches: ``(N, C)``."""
  n = len(next(iter(enc.values())))
  out = []
  for idx, valid in data.eval_batches(n, batch_size):
    out.append(np.asarray(predict(params, {k: jnp.asarray(v[idx]) for k, v in enc.items()}))[valid])
  return np.concatenate(out)


def score(task: str, logits: np.ndarray, d: data.TextData) -> tuple[str, dict]:
  """``(main metric, metrics)`` of ``logits (N, C)`` against ``d``'s labels."""
  pred = logits[:, 0] if d.regression else logits.argmax(-1)
  return metrics.task_metrics(task, pred, d.labels, d.num_labels)


# ---------------------------------------------------------------------------------------------------
# tasks


class Task:
  """What :func:`softlm_jax.run.run_method` needs of a task (see the two implementations)."""

  name: str
  model_kind: str
  #: whether the ``dense`` method trains (a classifier's head is new) or is evaluated as loaded (an LM)
  dense_trains: bool
  train_split: str
  mask_fn: Optional[Callable] = None

  def n_train(self) -> int:
    raise NotImplementedError

  def inputs(self, idx: np.ndarray) -> Any:
    """The model inputs of training examples ``idx`` (jnp arrays)."""
    raise NotImplementedError

  def train_batch(self, step: int, batch_size: int, seed: int) -> dict:
    """``{"inputs", ["labels"]}`` of training step ``step`` (a pure function of the step: resume
    reproduces the batches)."""
    raise NotImplementedError

  def n_calib(self) -> int:
    """Calibration examples available (the training examples, unless the task cuts its own)."""
    return self.n_train()

  def calib_inputs(self, idx: np.ndarray) -> Any:
    """The model inputs of calibration examples ``idx`` (the training examples', unless the task cuts
    its own: an LM's ``calib_len`` windows)."""
    return self.inputs(idx)

  def calib_batch(self, step: int, n: int, batch_size: int, seed: int) -> dict:
    """``{"inputs"}`` from the first ``n`` calibration examples (frozen-weight methods' calibration set)."""
    idx = data.batch_indices(min(n, self.n_calib()), batch_size, step, seed)
    return {"inputs": self.calib_inputs(idx)}

  def _first(self, n: int, batch_size: int, start: int = 0) -> list:
    """Index arrays of calibration examples ``start .. start + n - 1`` (as many as exist) in batches of
    ``batch_size``."""
    end = min(start + n, self.n_calib())
    return [np.arange(i, min(i + batch_size, end)) for i in range(start, end, batch_size)]

  def calib_batches(self, n: int, batch_size: int) -> list:
    """The first ``n`` calibration examples' inputs in batches (for Grams)."""
    return [self.calib_inputs(idx) for idx in self._first(n, batch_size)]

  def score_batches(self, n: int, batch_size: int) -> list:
    """The first ``n`` calibration examples in batches, as :meth:`score_loss` takes them (the calibration
    set of a loss-aware allocation: the same examples as :meth:`calib_batches`)."""
    return [self.calib_example(idx) for idx in self._first(n, batch_size)]

  def heldout_batches(self, start: int, n: int, batch_size: int) -> list:
    """Calibration examples ``start .. start + n - 1`` (as many as exist) in batches, as
    :meth:`score_loss` takes them: the guard's held-out set when ``start`` is past the examples the
    Grams, scores and refit use."""
    return [self.calib_example(idx) for idx in self._first(n, batch_size, start)]

  def calib_example(self, idx: np.ndarray) -> dict:
    """``{"inputs", ["labels"]}`` of calibration examples ``idx`` (:meth:`example_batch` of the training
    examples, unless the task cuts its own calibration set)."""
    return self.example_batch(idx)

  def example_batch(self, idx: np.ndarray) -> dict:
    """``{"inputs", ["labels"]}`` of training examples ``idx``."""
    return {"inputs": self.inputs(idx)}

  def score_loss(self, model) -> Callable:
    """``(params, batch) -> scalar``: the task loss in eval mode (no dropout, no distillation), on
    :meth:`score_batches`: what :func:`softlm_jax.allocate.triplet_stats` differentiates."""
    raise NotImplementedError

  def train_loss(self, model, distill: tuple = (0.0, 1.0), hidden: float = 0.0) -> Callable:
    """``(params, batch, rng) -> scalar``: the task loss, plus ``weight * T^2 * KL(teacher || student)``
    when ``distill = (weight, T)`` has ``weight > 0`` (the teacher tree in ``batch["teacher"]``), plus
    ``hidden`` times the hidden-state distillation (:func:`softlm_jax.losses.hidden_distillation_loss`;
    causal LMs) when ``hidden > 0``."""
    raise NotImplementedError

  def evaluate(self, model, params, cfg) -> tuple[str, dict, np.ndarray]:
    """``(main metric name, {split: {metric: value}}, probe)``: the probe is an output array whose
    difference between two trees measures how far apart they are (the export check)."""
    raise NotImplementedError

  def curve_fn(self, model, cfg) -> Optional[Callable]:
    """``params -> {name: float}`` for the during-training curve, or None."""
    return None

  def describe(self) -> dict:
    """Facts for results.json and the manifest (``task``, splits, ...)."""
    raise NotImplementedError

  def token_ids(self) -> dict:
    """``{split: int array}`` of every token id the task feeds the model (to check against its
    vocabulary before any work)."""
    raise NotImplementedError


class ClassificationTask(Task):
  """Sequence classification / regression on tokenised text (GLUE or the user's file)."""

  model_kind = "classifier"
  dense_trains = True

  def __init__(self, name: str, train: data.TextData, evals: dict, max_len: int, tokenizer):
    self.name, self.train, self.evals, self.max_len = name, train, evals, max_len
    self.train_split = train.source
    self.encoded = {"train": data.tokenize(tokenizer, train.texts, max_len)}
    self.encoded.update({s: data.tokenize(tokenizer, d.texts, max_len) for s, d in evals.items()})
    self.mask_fn = lambda b: b["attention_mask"]

  @property
  def num_labels(self) -> int:
    return self.train.num_labels

  @property
  def regression(self) -> bool:
    return self.train.regression

  def n_train(self) -> int:
    return len(self.train.labels)

  def inputs(self, idx):
    return {k: jnp.asarray(v[idx]) for k, v in self.encoded["train"].items()}

  def train_batch(self, step, batch_size, seed):
    return self.example_batch(data.batch_indices(self.n_train(), batch_size, step, seed))

  def example_batch(self, idx):
    return {"inputs": self.inputs(idx), "labels": jnp.asarray(self.train.labels[idx])}

  def score_loss(self, model):
    regression = self.regression

    def loss(p, batch):
      logits = model.logits(p, batch["inputs"])
      if regression:
        return jnp.mean((logits[:, 0].astype(jnp.float32) - batch["labels"]) ** 2)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss

  def train_loss(self, model, distill=(0.0, 1.0), hidden=0.0):
    if hidden > 0:
      raise ValueError(f"hidden-state distillation (distill_hidden={hidden}) is implemented for causal LMs, "
                       f"not for the classifier task {self.name}")
    weight, temperature = distill
    regression = self.regression

    def loss(p, batch, rng):
      logits = model.logits(p, batch["inputs"], train=True, rng=rng)
      if regression:
        task = jnp.mean((logits[:, 0].astype(jnp.float32) - batch["labels"]) ** 2)
      else:
        task = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
      if weight > 0:
        teacher = jax.lax.stop_gradient(model.logits(batch["teacher"], batch["inputs"]))
        if regression:
          task = task + weight * jnp.mean((logits[:, 0] - teacher[:, 0]).astype(jnp.float32) ** 2)
        else:
          task = task + weight * losses.distillation_loss(logits, teacher, temperature=temperature)
      return task
    return loss

  def evaluate(self, model, params, cfg):
    predict = predict_fn(model, cfg)
    out, probe, main = {}, None, None
    for split, d in self.evals.items():
      logits = predict_all(predict, params, self.encoded[split])
      main, out[split] = score(self.name, logits, d)
      probe = logits if probe is None else probe
    return main, out, probe

  def token_ids(self):
    return {split: enc["input_ids"] for split, enc in self.encoded.items()}

  def describe(self):
    return {"task": self.name, "num_labels": self.num_labels, "label_names": self.train.label_names,
            "max_len": self.max_len, "train_split": self.train_split, "train_examples": len(self.train),
            "eval_splits": {s: d.source for s, d in self.evals.items()}}


class LMTask(Task):
  """Causal language modelling on WikiText-2 (train: valid windows; perplexity: raw test)."""

  name = LM_TASK
  model_kind = "causal_lm"
  dense_trains = False
  train_split = "wikitext-2 valid"

  def __init__(self, windows: dict, curve_windows: int = 4):
    self.windows = windows
    self.calib = windows.get("calib", windows["train"])  # its own windows, or the training ones
    self.curve = windows["test"][:curve_windows]

  def n_train(self):
    return len(self.windows["train"])

  def inputs(self, idx):
    return jnp.asarray(self.windows["train"][idx])

  def n_calib(self):
    return len(self.calib)

  def calib_inputs(self, idx):
    return jnp.asarray(self.calib[idx])

  def calib_example(self, idx):
    return {"inputs": self.calib_inputs(idx)}

  def train_batch(self, step, batch_size, seed):
    return {"inputs": self.inputs(data.batch_indices(self.n_train(), batch_size, step, seed))}

  def score_loss(self, model):
    fn = model.logits_fn()
    return lambda p, batch: lm_loss(fn(p, batch["inputs"]), batch["inputs"])

  def train_loss(self, model, distill=(0.0, 1.0), hidden=0.0):
    weight, temperature = distill
    fn = model.logits_fn()
    if hidden > 0 and weight <= 0:
      raise ValueError(f"hidden-state distillation (distill_hidden={hidden}) needs the teacher: set a "
                       "distillation weight > 0 (distill=(weight, T))")
    if weight > 0:
      return distill_task(fn, base_loss=lambda logits, b: lm_loss(logits, b["inputs"]), weight=weight,
                          temperature=temperature, hidden_fn=model.hidden_fn() if hidden > 0 else None,
                          hidden_weight=hidden)
    return lambda p, batch, rng: lm_loss(fn(p, batch["inputs"]), batch["inputs"])

  def evaluate(self, model, params, cfg):
    ppl = perplexity(model, params, cfg, self.windows["test"])
    probe_ids = jnp.asarray(self.windows["test"][:1, :128])
    with intercept(cfg):
      probe = np.asarray(jax.jit(model.logits_fn())(params, probe_ids))
    return "ppl", {"test": {"ppl": ppl}}, probe

  def curve_fn(self, model, cfg):
    return lambda p: {"curve_ppl": perplexity(model, p, cfg, self.curve)}

  def token_ids(self):
    return dict(self.windows)

  def describe(self):
    out = {"task": LM_TASK, "train_split": self.train_split, "eval_split": eval_split_name(self.windows["test"])}
    for split in ("train", "calib"):
      if split in self.windows:
        out[f"{split}_windows"] = list(np.shape(self.windows[split]))
    return out


def load_table_data(dcfg: DataConfig) -> tuple[str, data.TextData, dict, int]:
  """``(name, train, {split: eval data}, max_len)`` of a classifier :class:`DataConfig`."""
  if dcfg.train_file:
    tr = data.load_table(dcfg.train_file, list(dcfg.text_cols), dcfg.label_col, task_type=dcfg.task_type)
    kind = "regression" if tr.regression else "classification"
    if dcfg.eval_file:
      ev = data.load_table(dcfg.eval_file, list(dcfg.text_cols), dcfg.label_col, task_type=kind,
                           label_names=tr.label_names)
      split = "eval"
    else:
      n_eval = max(1, len(tr) // 10)
      ev = dataclasses.replace(tr, texts=tr.texts[-n_eval:], labels=tr.labels[-n_eval:],
                               source=f"{tr.source} (last {n_eval} rows, held out)")
      tr = dataclasses.replace(tr, texts=tr.texts[:-n_eval], labels=tr.labels[:-n_eval])
      split = "heldout"
    name = os.path.splitext(os.path.basename(dcfg.train_file))[0]
    return name, tr, {split: ev.head(dcfg.eval_limit)}, dcfg.max_len or 128
  t = data.glue_task(dcfg.task)
  tr = data.load_glue_split(t.name, "train", dcfg.data_dir)
  evals = {s: data.load_glue_split(t.name, s, dcfg.data_dir).head(dcfg.eval_limit) for s in t.eval_splits}
  return t.name, tr, evals, dcfg.max_len or MAX_LEN[t.name]


def load_task(dcfg: DataConfig, tokenizer) -> Task:
  """The :class:`Task` of ``dcfg``, tokenised with ``tokenizer``."""
  if dcfg.model_kind == "causal_lm":
    calib_len = None if dcfg.lm_calib_len == dcfg.seq_len else dcfg.lm_calib_len
    return LMTask(wikitext_windows(tokenizer, seq_len=dcfg.seq_len, eval_len=dcfg.eval_len,
                                   eval_windows=dcfg.eval_windows, data_dir=dcfg.data_dir, calib_len=calib_len),
                  curve_windows=dcfg.curve_windows)
  name, tr, evals, max_len = load_table_data(dcfg)
  return ClassificationTask(name, tr, evals, max_len, tokenizer)

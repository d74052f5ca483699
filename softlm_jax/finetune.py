"""Fine-tuning a sequence classifier / regressor with dense, static-SVD or SoftLM compression: the
logic that ``experiments/glue.py`` and the ``softlm`` command share.

A run folder holds one subfolder per method (``<out>/<method>/``) with ``run.json`` (the settings),
``ckpt/`` (orbax training state while it runs; removed at the end unless ``keep_ckpt``),
``results.json``, ``table.md``, ``ranks.png`` (compressed methods) and ``compact.safetensors`` (the
exported model, :func:`softlm_jax.save_compact`); ``<out>/summary.md``, ``summary.json`` and
``comparison.png`` compare the methods.

Command-line options are defined once here (:func:`add_data_args`, :func:`add_compression_args`,
:func:`add_train_args`) and checked when parsed (a CR of 1.5 is refused by argparse, before any model
loads). :func:`compression_config` is the one place a :class:`CompressionConfig` is built from them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softlm_jax import budget, calib, checkpoint, data, losses, metrics, report, shard, train
from softlm_jax.compress import compress_params
from softlm_jax.config import DECOMPOSITIONS, LOSSES, NORMALIZATIONS, CompressionConfig
from softlm_jax.export import export_params, static_svd
from softlm_jax.intercept import intercept
from softlm_jax.optim import budget_state, make_optimizer

METHODS = ("dense", "static", "softlm")
#: max sequence length per GLUE task (tokens); user data: --max-len, default 128
MAX_LEN = {"mrpc": 128, "cola": 64, "sst2": 64, "qnli": 128, "qqp": 128, "stsb": 128, "mnli": 128, "rte": 128,
           "wnli": 128}

# ---------------------------------------------------------------------------------------------------
# argument types: refused at parse time


def fraction(text: str) -> float:
  """A float in (0, 1) (a compression ratio: the fraction of parameters removed)."""
  try:
    v = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not 0.0 < v < 1.0:
    raise argparse.ArgumentTypeError(f"{text} is not in (0, 1): the compression ratio is the fraction of the "
                                     "selected layers' parameters to remove, e.g. 0.5")
  return v


def fractions(text: str) -> list[float]:
  """Comma-separated :func:`fraction` values, e.g. ``0.25,0.5``."""
  return [fraction(t) for t in text.split(",") if t.strip()]


def distill_arg(text: str) -> tuple[float, float]:
  """``WEIGHT[,T]`` -> ``(weight >= 0, temperature > 0)`` (distillation; T defaults to 1)."""
  try:
    parts = [float(v) for v in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not WEIGHT[,T]") from None
  if len(parts) not in (1, 2) or parts[0] < 0 or (len(parts) == 2 and parts[1] <= 0):
    raise argparse.ArgumentTypeError(f"--distill takes WEIGHT[,T] with WEIGHT >= 0 and T > 0, got {text!r}")
  return parts[0], (parts[1] if len(parts) == 2 else 1.0)


def _int_at_least(text: str, low: int) -> int:
  try:
    v = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if v < low:
    raise argparse.ArgumentTypeError(f"{text} must be >= {low}")
  return v


def positive_int(text: str) -> int:
  return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
  return _int_at_least(text, 0)


def positive_float(text: str) -> float:
  try:
    v = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not v > 0:
    raise argparse.ArgumentTypeError(f"{text} must be > 0")
  return v


def nonnegative_float(text: str) -> float:
  v = float(text) if _is_float(text) else None
  if v is None or v < 0:
    raise argparse.ArgumentTypeError(f"{text!r} must be a number >= 0")
  return v


def _is_float(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def init_rank_arg(text: str):
  if text in ("full", "break_even"):
    return text
  if text.isdigit() and int(text) > 0:
    return int(text)
  raise argparse.ArgumentTypeError(f"{text!r}: init rank must be 'full', 'break_even' or a positive int")


def methods_arg(text: str) -> list[str]:
  out = [m.strip() for m in text.split(",") if m.strip()]
  bad = [m for m in out if m not in METHODS]
  if bad or not out:
    raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; valid: {', '.join(METHODS)}")
  return out


def task_arg(text: str) -> str:
  try:
    return data.glue_task(text).name
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def text_cols_arg(text: str) -> list[str]:
  cols = [c.strip() for c in text.split(",") if c.strip()]
  if not 1 <= len(cols) <= 2:
    raise argparse.ArgumentTypeError(f"--text-cols takes one or two column names (a,b), got {text!r}")
  return cols


# ---------------------------------------------------------------------------------------------------
# options, defined once


def add_data_args(ap: argparse.ArgumentParser, *, default_task: Optional[str] = "sst2") -> None:
  g = ap.add_argument_group("data (a GLUE task, or your own file)")
  g.add_argument("--task", type=task_arg, default=default_task,
                 help=f"GLUE task: {', '.join(data.GLUE)} (ignored with --train-file)")
  g.add_argument("--data-dir", default=None, help="local data root with GLUE in the standard layout "
                 "(default $SOFTLM_DATA_DIR, else ../shared/data, else the hub); a named folder must exist")
  g.add_argument("--train-file", default=None, help="your own .csv / .tsv / .jsonl training file")
  g.add_argument("--eval-file", default=None, help="your own evaluation file (default: the last 10%% of "
                 "--train-file, held out)")
  g.add_argument("--text-cols", type=text_cols_arg, default=None, help="with --train-file: text column(s), a[,b]")
  g.add_argument("--label-col", default=None, help="with --train-file: the label column")
  g.add_argument("--task-type", choices=data.TASK_TYPES, default="auto",
                 help="with --train-file: classification or regression (auto: from the labels)")
  g.add_argument("--eval-limit", type=positive_int, default=None, help="evaluate on the first N examples only")
  g.add_argument("--max-len", type=positive_int, default=None, help="tokens per example (default per task)")


def add_compression_args(ap: argparse.ArgumentParser) -> None:
  g = ap.add_argument_group("compression")
  g.add_argument("--cr", type=fraction, default=0.5, help="compression ratio: fraction of the block linears' "
                 "parameters to remove, in (0, 1)")
  g.add_argument("--sharpness", type=positive_float, default=1000.0)
  g.add_argument("--gamma", type=nonnegative_float, default=1.0)
  g.add_argument("--alpha-lr", type=positive_float, default=5e-3)
  g.add_argument("--loss", default="adaptive", choices=LOSSES)
  g.add_argument("--init-rank", type=init_rank_arg, default="full", help="full, break_even or an int")
  g.add_argument("--decomposition", choices=DECOMPOSITIONS, default="svd",
                 help="svd: plain SVD; whitened: activation-aware SVD from calibration Grams (--calib-grams)")
  g.add_argument("--calib-grams", type=positive_int, default=256,
                 help="whitened: training examples whose (unpadded) token inputs make the Grams")
  g.add_argument("--normalize", choices=NORMALIZATIONS, default=None,
                 help="threshold units (default: uniform_rank when whitened, top otherwise)")
  g.add_argument("--compress-steps", type=nonnegative_int, default=0,
                 help="SoftLM: counted params fall no faster than a ramp to the target over N steps (0: off)")
  g.add_argument("--distill", type=distill_arg, default=(0.0, 1.0),
                 help="WEIGHT[,T]: add WEIGHT * T^2 * KL(teacher || student) to the task loss of the compressed "
                 "methods, the teacher being the dense method's fine-tuned model (dense then runs first); 0: off")


def add_train_args(ap: argparse.ArgumentParser) -> None:
  g = ap.add_argument_group("training")
  g.add_argument("--finetune-steps", type=nonnegative_int, default=150, help="SoftLM: steps after the budget is met")
  g.add_argument("--max-compress-steps", type=positive_int, default=300)
  g.add_argument("--steps", type=positive_int, default=None,
                 help="steps for dense/static (default: the SoftLM run's total, else 240)")
  g.add_argument("--batch-size", type=positive_int, default=16)
  g.add_argument("--lr", type=positive_float, default=1e-4)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--keep-ckpt", action="store_true", help="keep the orbax training checkpoints of finished runs")
  g.add_argument("--no-progress", action="store_true")
  add_mesh_arg(g)


def add_mesh_arg(ap) -> None:
  """``--mesh data=D,fsdp=F`` (parsed by :func:`softlm_jax.shard.parse_mesh`; default one device)."""
  ap.add_argument("--mesh", default=None,
                  help="data=D,fsdp=F: train on a D x F device mesh, batches split D ways, params and Adam state "
                  "F ways (softlm_jax.make_mesh; default: one device)")


def compression_config(args, **overrides) -> CompressionConfig:
  """The :class:`CompressionConfig` of parsed options (the one place it is built from them)."""
  decomposition = getattr(args, "decomposition", "svd")
  normalize = getattr(args, "normalize", None) or ("uniform_rank" if decomposition == "whitened" else "top")
  return CompressionConfig(target_ratio=args.cr, sharpness=args.sharpness, gamma=args.gamma,
                           alpha_lr=args.alpha_lr, loss=args.loss, init_rank=args.init_rank,
                           decomposition=decomposition, normalize=normalize,
                           compress_steps=getattr(args, "compress_steps", 0), **overrides)


# ---------------------------------------------------------------------------------------------------
# data


@dataclasses.dataclass
class TaskData:
  """``name``: GLUE task or the user's file stem; ``train``, ``evals`` ({split: data}) :class:`data.TextData`."""
  name: str
  train: data.TextData
  evals: dict
  max_len: int

  @property
  def num_labels(self) -> int:
    return self.train.num_labels


def load_task_data(args) -> TaskData:
  """The train and evaluation splits the options name (GLUE task or ``--train-file``)."""
  if args.train_file:
    if not args.text_cols or not args.label_col:
      raise ValueError("--train-file needs --text-cols a[,b] and --label-col y")
    tr = data.load_table(args.train_file, args.text_cols, args.label_col, task_type=args.task_type)
    kind = "regression" if tr.regression else "classification"
    if args.eval_file:
      ev = data.load_table(args.eval_file, args.text_cols, args.label_col, task_type=kind,
                           label_names=tr.label_names)
      name = "eval"
    else:
      n_eval = max(1, len(tr) // 10)
      ev = dataclasses.replace(tr, texts=tr.texts[-n_eval:], labels=tr.labels[-n_eval:],
                               source=f"{tr.source} (last {n_eval} rows, held out)")
      tr = dataclasses.replace(tr, texts=tr.texts[:-n_eval], labels=tr.labels[:-n_eval])
      name = "heldout"
    task = os.path.splitext(os.path.basename(args.train_file))[0]
    return TaskData(task, tr, {name: ev.head(args.eval_limit)}, args.max_len or 128)
  t = data.glue_task(args.task)
  tr = data.load_glue_split(t.name, "train", args.data_dir)
  evals = {s: data.load_glue_split(t.name, s, args.data_dir).head(args.eval_limit) for s in t.eval_splits}
  return TaskData(t.name, tr, evals, args.max_len or MAX_LEN[t.name])


# ---------------------------------------------------------------------------------------------------
# model functions


def task_loss_fn(model, regression: bool, distill: tuple[float, float] = (0.0, 1.0)) -> Callable:
  """``(params, batch, rng) -> scalar``: cross-entropy on ``batch["labels"]`` ``(B,)`` int32, or for
  regression the mean squared error of ``logits[:, 0]`` against float32 labels.

  ``distill = (weight, T)`` with ``weight > 0`` adds ``weight * T^2 * KL(teacher_T || student_T)``
  (regression: ``weight *`` the squared error to the teacher's output), the teacher's dense tree
  travelling in ``batch["teacher"]`` and run without dropout; its output carries no gradient."""
  weight, temperature = distill

  def loss(p, batch, rng):
    logits = model(**batch["inputs"], params=p, dropout_rng=rng, train=True).logits
    if regression:
      task = jnp.mean((logits[:, 0].astype(jnp.float32) - batch["labels"]) ** 2)
    else:
      task = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    if weight > 0:
      teacher = jax.lax.stop_gradient(model(**batch["inputs"], params=batch["teacher"], train=False).logits)
      if regression:
        task = task + weight * jnp.mean((logits[:, 0] - teacher[:, 0]).astype(jnp.float32) ** 2)
      else:
        task = task + weight * losses.distillation_loss(logits, teacher, temperature=temperature)
    return task
  return loss


def task_grams(model, params, encoded: dict, cfg: CompressionConfig, n: int, batch_size: int,
               progress: bool = True) -> calib.Grams:
  """Calibration Grams of ``cfg``'s layers over the first ``n`` training examples, padding masked out."""
  total = len(next(iter(encoded.values())))
  n = min(n, total)
  batches = [{k: jnp.asarray(v[i:min(i + batch_size, n)]) for k, v in encoded.items()}
             for i in range(0, n, batch_size)]
  return calib.collect_grams(lambda p, b: model(**b, params=p, train=False).logits, params, batches, cfg,
                             mask_fn=lambda b: b["attention_mask"], progress=progress)


def predict_fn(model, cfg: Optional[CompressionConfig]) -> Callable:
  """Jitted ``(params, inputs) -> logits (B, num_labels)``, dropout off, under :func:`intercept`."""
  @jax.jit
  def predict(params, inputs):
    with intercept(cfg):
      return model(**inputs, params=params, train=False).logits
  return predict


def predict_all(predict: Callable, params, enc: dict, batch_size: int = 64) -> np.ndarray:
  """Logits of every row of ``enc`` (``{name: (N, L)}``), in order, padded to full batches: ``(N, C)``."""
  n = len(next(iter(enc.values())))
  out = []
  for idx, valid in data.eval_batches(n, batch_size):
    out.append(np.asarray(predict(params, {k: jnp.asarray(v[idx]) for k, v in enc.items()}))[valid])
  return np.concatenate(out)


def evaluate(predict: Callable, params, enc: dict, labels: np.ndarray, task: str,
             batch_size: int = 64) -> tuple[dict, np.ndarray]:
  """``(metrics, logits)`` of a classifier on ``enc`` against ``labels`` ``(N,)`` (GLUE ``task``)."""
  logits = predict_all(predict, params, enc, batch_size)
  return metrics.glue_metrics(task, logits.argmax(-1), labels), logits


def score(task: str, logits: np.ndarray, d: data.TextData) -> tuple[str, dict]:
  """``(main metric, metrics)`` of ``logits (N, C)`` against ``d``'s labels."""
  pred = logits[:, 0] if d.regression else logits.argmax(-1)
  return metrics.task_metrics(task, pred, d.labels, d.num_labels)


# ---------------------------------------------------------------------------------------------------
# one method


def _run_dir(out: str, method: str) -> str:
  return os.path.join(out, method)


def initial_params(method: str, params, cfg: CompressionConfig, grams=None):
  """The tree a method starts training from, and its optimizer and step config. ``grams``: the
  calibration Grams of a whitened ``cfg``."""
  if method == "softlm":
    return compress_params(params, cfg, grams), cfg
  if method == "static":
    return static_svd(params, cfg, grams=grams), cfg
  if method == "dense":
    return params, None
  raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def optimizer(method: str, cfg: CompressionConfig, lr: float) -> optax.GradientTransformation:
  return make_optimizer(cfg, optax.adam(lr)) if method == "softlm" else optax.adam(lr)


def run_method(method: str, args, cfg: CompressionConfig, model, task: TaskData, encoded: dict, steps: int,
               *, source_model: str = "", log: Callable[[str], None] = print, grams=None, teacher=None) -> dict:
  """Trains one method (resuming from ``<out>/<method>/ckpt``), evaluates the exported model on every
  evaluation split, saves ``compact.safetensors`` (compressed methods) and writes the reports.

  ``encoded``: ``{"train": {name: (N, L) int32}, <split>: {...}}`` from :func:`softlm_jax.data.tokenize`.
  A finished run (``results.json`` present) is read back, not rerun. ``grams``: calibration Grams
  (whitened ``cfg``); ``teacher``: the dense fine-tuned tree to distil from (``args.distill``).
  Returns the results dict.
  """
  out = _run_dir(args.out, method)
  if os.path.exists(os.path.join(out, "results.json")):
    with open(os.path.join(out, "results.json")) as f:
      log(f"[{method}] finished earlier: {out}/results.json")
      return json.load(f)
  os.makedirs(out, exist_ok=True)
  t0 = time.time()
  params, step_cfg = initial_params(method, model.params, cfg, grams)
  distill = getattr(args, "distill", (0.0, 1.0)) if (teacher is not None and method != "dense") else (0.0, 1.0)
  tx = optimizer(method, cfg, args.lr)
  regression = task.train.regression
  labels = task.train.labels
  n = len(labels)
  train_enc = encoded["train"]

  def batch_fn(step):
    idx = data.batch_indices(n, args.batch_size, step, args.seed)
    batch = {"inputs": {k: jnp.asarray(v[idx]) for k, v in train_enc.items()}, "labels": jnp.asarray(labels[idx])}
    return {**batch, "teacher": teacher} if distill[0] > 0 else batch

  mesh = shard.parse_mesh(getattr(args, "mesh", None))
  state = train.init_state(params, tx, seed=args.seed, mesh=mesh)
  step_fn = train.make_train_step(task_loss_fn(model, regression, distill), tx, step_cfg, mesh=mesh)
  plan = f"until the budget is met, then {args.finetune_steps} steps" if method == "softlm" else f"{steps} steps"
  log(f"[{method}] training {plan}; checkpoints in {out}/ckpt")
  state, history = train.fit(state, step_fn, batch_fn, steps=steps, finetune_steps=args.finetune_steps,
                             max_compress_steps=args.max_compress_steps, ckpt_dir=os.path.join(out, "ckpt"),
                             save_every=50, progress=not args.no_progress,
                             target=budget.target_params(params, cfg) if method == "softlm" else None,
                             mesh=mesh)
  train_time = time.time() - t0
  predict = predict_fn(model, step_cfg)
  res = {"method": method, "task": task.name, "model": source_model, "num_labels": task.num_labels,
         "eval_splits": {s: d.source for s, d in task.evals.items()}, "train_examples": len(task.train),
         "train_steps": int(state.step), "train_wall_s": train_time, "history": history,
         "config": {k: v for k, v in vars(args).items() if k != "func"}}
  final = state.params
  if method == "softlm":
    res["freeze_step"] = int(budget_state(state.opt_state).freeze_step)
    first = next(iter(task.evals))
    train_logits = predict_all(predict, final, encoded[first])
    res["training_form_metrics"] = score(task.name, train_logits, task.evals[first])[1]
    final = export_params(final, cfg)
  res["metrics"] = {}
  for split, d in task.evals.items():
    logits = predict_all(predict, final, encoded[split])
    res["main_metric"], res["metrics"][split] = score(task.name, logits, d)
    if method == "softlm" and split == next(iter(task.evals)):
      res["export_max_abs_logit_diff"] = float(np.max(np.abs(logits - train_logits)))
  if method == "dense" and getattr(args, "distill", (0.0,))[0] > 0:  # the teacher of the compressed methods
    checkpoint.save_compact(os.path.join(out, "teacher.safetensors"), final,
                            metadata={"method": "dense", "source_model": source_model, "task": task.name})
  if method != "dense":
    res.update(report.budget_results(final, cfg, out,
                                     f"{method} {source_model} {task.name} CR={cfg.target_ratio}: rank per layer"))
    meta = {"method": "static_svd" if method == "static" else method, "source_model": source_model,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}", "task": task.name,
            "num_labels": task.num_labels, "label_names": task.train.label_names, "max_len": task.max_len,
            "tokenizer": tokenizer_source(source_model), "train_steps": int(state.step)}
    path = os.path.join(out, "compact.safetensors")
    checkpoint.save_compact(path, final, cfg=cfg, model_config=model.config, metadata=meta)
    res["compact_checkpoint"] = {"path": path, **checkpoint.file_report(path)}
    log(f"[{method}] compact checkpoint: {path} ({res['compact_checkpoint']['file_bytes'] / 2**20:.1f} MiB)")
  res["wall_s"] = time.time() - t0
  report.write_json(res, os.path.join(out, "results.json"))
  row = summary_row(res)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(report.markdown_table([row], list(row)))
  if not args.keep_ckpt:
    shutil.rmtree(os.path.join(out, "ckpt"), ignore_errors=True)
  return res


def tokenizer_source(model_name: str) -> str:
  """Where ``softlm eval`` finds the tokenizer again: the model folder (``minilm`` -> its folder)."""
  from softlm_jax.models import hf
  return hf.resolve_model(model_name) if model_name else ""


def summary_row(res: dict) -> dict:
  """One table row: method, task, budget columns, every split's metrics, steps, wall time."""
  cells = {}
  by_split = res["metrics"]
  if by_split and not isinstance(next(iter(by_split.values())), dict):  # results.json of before issue 13
    by_split = {"dev": by_split}
  for split, ms in by_split.items():
    prefix = "" if len(by_split) == 1 else f"{split} "
    cells.update({f"{prefix}{k}": round(v, 4) for k, v in ms.items()})
  return report.summary_row(res, {"method": res["method"], "task": res["task"]}, cells)


# ---------------------------------------------------------------------------------------------------
# the comparison


def run_comparison(args, *, log: Callable[[str], None] = print) -> dict:
  """Every method of ``args.methods`` on one task with the same step budget; writes the run folder's
  summary (``summary.md``, ``summary.json``, ``comparison.png``). Returns ``{method: results}``."""
  from softlm_jax.models import hf
  t0 = time.time()
  cfg = compression_config(args)
  task = load_task_data(args)
  log(f"{task.name}: train {len(task.train)} ({task.train.source}), eval " +
      ", ".join(f"{s} {len(d)}" for s, d in task.evals.items()) +
      f"; {'regression' if task.train.regression else f'{task.num_labels} classes'}, max_len {task.max_len}")
  model, tok = hf.load_classifier(args.model, task.num_labels, seed=args.seed)
  encoded = {"train": data.tokenize(tok, task.train.texts, task.max_len)}
  encoded.update({s: data.tokenize(tok, d.texts, task.max_len) for s, d in task.evals.items()})
  os.makedirs(args.out, exist_ok=True)
  results = {}
  grams = None
  if cfg.decomposition == "whitened" and set(args.methods) - {"dense"}:
    t1 = time.time()
    grams = task_grams(model, model.params, encoded["train"], cfg, args.calib_grams, args.batch_size,
                       progress=not args.no_progress)
    log(f"calibration Grams: {len(grams)} layers over {grams.tokens} tokens ({time.time() - t1:.0f}s)")
  distill = getattr(args, "distill", (0.0, 1.0))[0] > 0
  if distill and "dense" not in args.methods:
    raise ValueError("--distill needs the dense method (its fine-tuned model is the teacher): add dense to --methods")
  # SoftLM first: it sets the step budget; with distillation the dense teacher comes before everything
  order = sorted(args.methods, key=lambda m: (not (distill and m == "dense"), m != "softlm"))
  teacher = None
  for method in order:
    steps = args.steps or (results["softlm"]["train_steps"] if "softlm" in results else 240)
    results[method] = run_method(method, args, cfg, model, task, encoded, steps, source_model=args.model, log=log,
                                 grams=grams, teacher=teacher)
    if method == "dense" and distill:
      teacher = jax.tree.map(jnp.asarray, checkpoint.load_compact(
          os.path.join(_run_dir(args.out, "dense"), "teacher.safetensors"))[0])
    log(json.dumps({k: results[method][k] for k in ("method", "metrics", "train_steps", "wall_s")}))
  write_summary(args.out, results, title=f"{args.model} on {task.name} "
                f"({', '.join(task.evals)}), CR {cfg.target_ratio}", wall_s=time.time() - t0)
  return results


def write_summary(out: str, results: dict, *, title: str, wall_s: float) -> str:
  order = [m for m in METHODS if m in results] + [m for m in results if m not in METHODS]
  rows = [summary_row(results[m]) for m in order]
  cols = list(dict.fromkeys(c for r in rows for c in r))
  table = report.markdown_table(rows, cols)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(f"# {title}\n\nwall time (all methods, incl. loading and tokenizing): {wall_s:.0f} s\n\n{table}")
  report.write_json({"title": title, "wall_s": wall_s, "rows": rows}, os.path.join(out, "summary.json"))
  report.comparison_plot({m: results[m] for m in order}, os.path.join(out, "comparison.png"), title=title)
  return table

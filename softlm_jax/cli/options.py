"""Command-line options: the one place that reads arguments and turns them into configs.

Every option is defined once here with a type that refuses bad values at parse time (a CR of 1.5 is
refused by argparse, before any model loads), and a default of ``None`` ("not given"): the values come
from a named preset (:mod:`softlm_jax.presets`) unless the option is given, so ``softlm train --task
wikitext`` and ``python experiments/lm.py`` build the same configs for the same options
(:func:`configs`). Contradictory options are refused when parsed (:func:`parse`), naming both.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional

from softlm_jax import allocate, data, models, presets, run, svd, tasks
from softlm_jax.config import LOSSES, NORMALIZATIONS

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
  out = [fraction(t) for t in text.split(",") if t.strip()]
  if not out:
    raise argparse.ArgumentTypeError(f"{text!r}: give at least one compression ratio")
  return out


def distill_arg(text: str) -> tuple[float, float]:
  """``WEIGHT[,T]`` -> ``(weight >= 0, temperature > 0)`` (distillation; T defaults to 1)."""
  try:
    parts = [float(v) for v in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not WEIGHT[,T]") from None
  if len(parts) not in (1, 2) or parts[0] < 0 or (len(parts) == 2 and parts[1] <= 0):
    raise argparse.ArgumentTypeError(f"--distill takes WEIGHT[,T] with WEIGHT >= 0 and T > 0, got {text!r}")
  return parts[0], (parts[1] if len(parts) == 2 else 1.0)


def int_at_least(text: str, low: int) -> int:
  try:
    v = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if v < low:
    raise argparse.ArgumentTypeError(f"{text} must be >= {low}")
  return v


def positive_int(text: str) -> int:
  return int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
  return int_at_least(text, 0)


def positive_float(text: str) -> float:
  try:
    v = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not v > 0:
    raise argparse.ArgumentTypeError(f"{text} must be > 0")
  return v


def nonnegative_float(text: str) -> float:
  try:
    v = float(text)
  except ValueError:
    v = None
  if v is None or v < 0:
    raise argparse.ArgumentTypeError(f"{text!r} must be a number >= 0")
  return v


def init_rank_arg(text: str):
  if text in ("full", "break_even"):
    return text
  if text.isdigit() and int(text) > 0:
    return int(text)
  raise argparse.ArgumentTypeError(f"{text!r}: init rank must be 'full', 'break_even' or a positive int")


def pair_arg(text: str) -> tuple[float, float]:
  try:
    a, b = (float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not FIRST,LAST") from None
  return a, b


def methods_arg(text: str) -> list[str]:
  valid = run.method_names()
  out = [m.strip() for m in text.split(",") if m.strip()]
  bad = [m for m in out if m not in valid]
  if bad or not out:
    raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; valid: {', '.join(valid)}")
  return out


def method_arg(text: str) -> str:
  if "," in text:
    raise argparse.ArgumentTypeError(f"--method takes one method, got {text!r} (softlm train takes --methods a,b)")
  return methods_arg(text)[0]


def task_arg(text: str) -> str:
  if text == tasks.LM_TASK:
    return text
  try:
    return data.glue_task(text).name
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"{e}; or '{tasks.LM_TASK}' (causal LM, perplexity)") from None


def text_cols_arg(text: str) -> list[str]:
  cols = [c.strip() for c in text.split(",") if c.strip()]
  if not 1 <= len(cols) <= 2:
    raise argparse.ArgumentTypeError(f"--text-cols takes one or two column names (a,b), got {text!r}")
  return cols


def decomposition_choices() -> tuple:
  return tuple(svd.names())


# ---------------------------------------------------------------------------------------------------
# options, defined once (defaults None: the preset decides)


def add_model_arg(ap) -> None:
  ap.add_argument("--model", default=None,
                  help=f"classifier: 'minilm' (default, embedded all-MiniLM-L6-v2) or a HF folder/name; causal LM "
                  f"(--task wikitext): {', '.join(n for n in models.names('causal_lm') if not models.get(n).generic)} "
                  "or a HF folder (default smollm2)")


def add_data_args(ap, *, default_task: Optional[str] = None) -> None:
  g = ap.add_argument_group("data (a GLUE task, WikiText-2, or your own file)")
  g.add_argument("--task", type=task_arg, default=default_task,
                 help=f"GLUE task ({', '.join(data.GLUE)}) or '{tasks.LM_TASK}' (causal LM: perplexity on "
                 "WikiText-2); default sst2 (ignored with --train-file)")
  g.add_argument("--data-dir", default=None, help="local data root with GLUE in the standard layout "
                 "(default $SOFTLM_DATA_DIR, else ../shared/data, else the hub); a named folder must exist")
  g.add_argument("--train-file", default=None, help="your own .csv / .tsv / .jsonl training file")
  g.add_argument("--eval-file", default=None, help="your own evaluation file (default: the last 10%% of "
                 "--train-file, held out)")
  g.add_argument("--text-cols", type=text_cols_arg, default=None, help="with --train-file: text column(s), a[,b]")
  g.add_argument("--label-col", default=None, help="with --train-file: the label column")
  g.add_argument("--task-type", choices=data.TASK_TYPES, default=None,
                 help="with --train-file: classification or regression (auto: from the labels)")
  g.add_argument("--eval-limit", type=positive_int, default=None, help="evaluate on the first N examples only")
  g.add_argument("--max-len", type=positive_int, default=None, help="tokens per example (default per task)")
  g = ap.add_argument_group("language model (--task wikitext)")
  g.add_argument("--seq-len", type=positive_int, default=None,
                 help="fine-tuning window (tokens; lm preset 512, the perplexity's; lm-softlm and paper 128)")
  g.add_argument("--calib-len", type=positive_int, default=None,
                 help="calibration window (tokens) of the Grams, scores, propagated fit and block refit "
                 "(lm preset 128; default: --seq-len); --calib-grams counts these windows")
  g.add_argument("--eval-len", type=positive_int, default=None, help="perplexity window (tokens; preset 512)")
  g.add_argument("--eval-windows", type=positive_int, default=None, help="perplexity windows (preset 16)")
  g.add_argument("--curve-windows", type=positive_int, default=None,
                 help="test windows of the --eval-every perplexity curve (default 4)")


def add_compression_args(ap, *, crs: bool = True, cr_flags: tuple = ("--cr",)) -> None:
  g = ap.add_argument_group("compression")
  if crs:
    g.add_argument(*cr_flags, dest="cr", type=fractions, default=None,
                   help="compression ratio(s): fraction of the block linears' parameters to remove, in (0, 1); "
                   "a comma list runs each (default 0.5)")
  else:
    g.add_argument("--cr", type=fraction, default=None, help="compression ratio in (0, 1) (default 0.5)")
  g.add_argument("--sharpness", type=positive_float, default=None)
  g.add_argument("--gamma", type=nonnegative_float, default=None)
  g.add_argument("--alpha-lr", type=positive_float, default=None, help="thresholds' learning rate")
  g.add_argument("--loss", default=None, choices=LOSSES)
  g.add_argument("--init-rank", type=init_rank_arg, default=None, help="full, break_even or an int")
  g.add_argument("--decomposition", choices=decomposition_choices(), default=None,
                 help="svd: plain SVD; whitened: activation-aware SVD from calibration Grams (--calib-grams)")
  g.add_argument("--normalize", choices=NORMALIZATIONS, default=None,
                 help="threshold units (default: uniform_rank when whitened, top otherwise)")
  g.add_argument("--compress-steps", type=nonnegative_int, default=None,
                 help="learned rules: counted params fall no faster than a ramp to the target over N steps (0: off)")
  g.add_argument("--mask-lr", type=positive_float, default=None, help="LLRC: mask logits' learning rate")
  g.add_argument("--tv-weight", type=nonnegative_float, default=None, help="LLRC: total-variation weight")
  g.add_argument("--budget-growth", type=positive_float, default=None,
                 help="LLRC: the budget weight is gamma * growth**step until the budget is met (1 = constant)")
  g.add_argument("--mask-init", type=pair_arg, default=None, help="LLRC: FIRST,LAST initial mask logits (> 0)")
  g.add_argument("--include", default=None, help="regex of the kernels to compress (default: the family's)")
  g.add_argument("--exclude", default=None, help="regex of kernels never compressed")


def add_train_args(ap) -> None:
  g = ap.add_argument_group("training")
  g.add_argument("--preset", choices=presets.names(), default=None,
                 help="named defaults (default: lm for --task wikitext, glue otherwise; lm-softlm / glue-softlm: "
                 "the SoftLM recipes)")
  g.add_argument("--finetune-steps", type=nonnegative_int, default=None, help="learned rules: steps after the "
                 "budget is met")
  g.add_argument("--max-compress-steps", type=positive_int, default=None)
  g.add_argument("--steps", type=positive_int, default=None,
                 help="steps for dense/static (default: the SoftLM run's total at the same CR)")
  g.add_argument("--teacher-steps", type=positive_int, default=None,
                 help="classifiers: steps of the dense teacher (default --steps)")
  g.add_argument("--batch-size", type=positive_int, default=None)
  g.add_argument("--lr", type=positive_float, default=None)
  g.add_argument("--seed", type=int, default=None)
  g.add_argument("--distill", type=distill_arg, default=None,
                 help="WEIGHT[,T]: add WEIGHT * T^2 * KL(teacher || student) to the task loss of the trained "
                 "compressed methods (teacher: the dense model, fine-tuned first for classifiers); 0: off")
  g.add_argument("--calib", type=positive_int, default=None,
                 help="calibration examples (frozen-weight methods: R-noft, llrc)")
  g.add_argument("--calib-grams", type=positive_int, default=None,
                 help="whitened: training examples whose (unpadded) token inputs make the Grams")
  g.add_argument("--calib-scores", type=positive_int, default=None,
                 help="allocated: the first N of the --calib-grams examples make the Fisher scores (default: all; "
                 "the scores' gradient pass costs several times the Grams' per token)")
  g.add_argument("--score-unit", choices=allocate.SCORE_UNITS, default=None,
                 help="allocated: one sample of the Fisher scores is a batch's mean gradient or each example's "
                 "own (the same backward pass)")
  g.add_argument("--ft-steps", "--llrc-ft-steps", dest="ft_steps", type=nonnegative_int, default=None,
                 help="R-ft: fine-tuning steps of the exported model after the frozen-weight run")
  g.add_argument("--refill", action="store_true", default=None,
                 help="LLRC: after the budget is met, re-enable dropped values up to the target")
  g.add_argument("--alpha-opt", choices=("adam", "sgd"), default=None, help="the thresholds' optimizer")
  g.add_argument("--eval-every", type=nonnegative_int, default=None,
                 help="log the task's curve (LM: perplexity on --curve-windows test windows) every N steps")
  g.add_argument("--save-every", type=positive_int, default=None, metavar="N",
                 help="save the training checkpoint every N steps (and at the end; default 50): a killed run "
                 "resumes from the last one")
  g.add_argument("--keep-ckpt", action="store_true", default=None,
                 help="keep the orbax training checkpoints of finished runs")
  g.add_argument("--no-progress", action="store_true", default=None)
  g.add_argument("--allow-budget-miss", action="store_true", default=None,
                 help="a model that misses its budget is recorded as 'not met' instead of failing the run")
  g.add_argument("--refit-steps", type=nonnegative_int, default=None,
                 help="static/allocated and their -refit variants: Adam steps per block of the calibration-only "
                 "block refit before any fine-tuning (softlm train only; 0: off)")
  g.add_argument("--refit-lr", type=positive_float, default=None, help="the block refit's learning rate")
  g.add_argument("--refit-loss", choices=("total", "token"), default=None,
                 help="the block refit's error: the sums' ratio (total) or each token's relative to its own norm")
  g.add_argument("--refit-holdout", type=nonnegative_int, default=None, metavar="N",
                 help="the block refit holds out the last N calibration batches (instead of the guard's batches) and "
                 "keeps a block's refit only if it lowers that block's error on them (0: the guard's batches)")
  g.add_argument("--guard-batches", type=nonnegative_int, default=None, metavar="N",
                 help="the guard: N batches of calibration examples past --calib-grams, never trained on; a "
                 "block's refit and each post-decomposition step (refit, fine-tuning) of static/allocated is kept "
                 "only if it does not make the model worse on them (default 4; 0: off)")
  g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                 help="the weights' learning rate over a fine-tuning run of known length (dense-ft, static, "
                 "allocated, R-ft): constant, or cosine decay to 0 at the last step")
  g.add_argument("--warmup-steps", type=nonnegative_int, default=None,
                 help="a linear warmup of the weights' learning rate over the first N steps (0: none)")
  g.add_argument("--distill-hidden", type=nonnegative_float, default=None, metavar="W",
                 help="causal LMs: add W x the hidden-state distillation (every block's output matched to the "
                 "teacher's, token by token) to the distilled runs' loss (needs --distill weight > 0)")
  g.add_argument("--compress-from", choices=("dense", "teacher"), default=None,
                 help="the tree the compressed methods start from: dense (as loaded; a classifier's head learns "
                 "with the compression) or teacher (a classifier's fine-tuned dense run, which then runs first)")
  g.add_argument("--start-file", default=None,
                 help="static/allocated: start from this compact checkpoint (softlm compress's compact.safetensors, "
                 "same method, model and CR) instead of decomposing; the refit and fine-tuning run on it")
  g.add_argument("--teacher-file", default=None,
                 help="distil from this checkpoint (a dense-ft run's teacher.safetensors: the dense model fine-tuned "
                 "on the task) instead of the dense model as loaded")
  g.add_argument("--start-allocation", type=fraction, default=None, metavar="CR",
                 help="softlm: thresholds start at the global Fisher allocation of this CR (below --cr), not at "
                 "full rank")
  g.add_argument("--select-steps", type=nonnegative_int, default=None,
                 help="R-alloc methods: updates of the learned selection (distillation on the calibration set, "
                 "weights frozen, the count held at the target; default 100)")
  g.add_argument("--select-from", choices=("allocation", "uniform"), default=None,
                 help="R-alloc methods: start the selection at the Fisher allocation (default) or at the uniform "
                 "ranks of the target CR")
  g.add_argument("--select-opt", choices=("trade", "adam"), default=None,
                 help="R-alloc methods: the selection's optimizer: trade (momentum SGD on globally normalised "
                 "gradients per counted parameter; default) or adam (the rule's own)")
  g.add_argument("--stop-after", type=positive_int, default=None,
                 help="stop each training loop after N steps, checkpoint saved (rerun without it to resume)")
  g.add_argument("--mesh", default=None,
                 help="data=D,fsdp=F: train on a D x F device mesh, batches split D ways, params and Adam state "
                 "F ways (softlm_jax.make_mesh; default: one device)")


def add_run_args(ap, *, methods: bool = True, default_methods: Optional[str] = None,
                 out_required: bool = True, default_out: Optional[str] = None, cr_flags: tuple = ("--cr",)) -> None:
  """Everything ``softlm train`` (``methods=True``) / ``softlm compress`` takes."""
  add_model_arg(ap)
  if methods:
    ap.add_argument("--methods", type=methods_arg, default=default_methods,
                    help="comma list of methods (softlm_jax.run.method_names(): dense, dense-ft; static and "
                    "allocated, each also as -noft (training-free) and -refit (block refit only); for each selection "
                    "rule R: R, R-noft, R-ft, and R-alloc: its selection learned at the budget from the allocation, "
                    "then the decomposition fit at the learned ranks, and R-alloc-ft: R-alloc, then fine-tuned as "
                    "allocated is); "
                    "default: the preset's (lm, glue: allocated,static,dense; lm-softlm, glue-softlm, paper: "
                    "softlm,static,dense)")
  else:
    ap.add_argument("--method", type=method_arg, default=default_methods,
                    help="one method (default: the preset's first: allocated for lm and glue, softlm for the "
                    "-softlm presets and paper)")
  ap.add_argument("--out", required=out_required and default_out is None, default=default_out,
                  help="run folder (one subfolder per method)")
  add_data_args(ap)
  add_compression_args(ap, crs=methods, cr_flags=cr_flags)
  add_train_args(ap)
  add_process_args(ap)


def add_process_args(ap) -> None:
  """Several processes (``jax.distributed.initialize``'s arguments; none under SLURM or Open MPI, which
  announce them). ``--mesh`` then spans every process's devices."""
  g = ap.add_argument_group("several processes (hosts)")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="process 0's address for jax.distributed (with --num-processes and --process-id)")
  g.add_argument("--num-processes", type=positive_int, default=None)
  g.add_argument("--process-id", type=nonnegative_int, default=None)
  g.add_argument("--process-timeout", type=positive_float, default=600.0, metavar="S",
                 help="seconds a process waits for the others (joining, at the end) before it fails (default 600)")


# ---------------------------------------------------------------------------------------------------
# arguments -> configs

_COMPRESSION = ("sharpness", "gamma", "alpha_lr", "loss", "init_rank", "decomposition", "normalize",
                "compress_steps", "mask_lr", "tv_weight", "budget_growth", "mask_init", "include", "exclude")
_TRAIN = ("finetune_steps", "max_compress_steps", "steps", "teacher_steps", "batch_size", "lr", "seed", "distill",
          "calib", "calib_grams", "calib_scores", "score_unit", "ft_steps", "refill", "alpha_opt", "eval_every",
          "save_every", "keep_ckpt", "allow_budget_miss",
          "mesh", "stop_after", "refit_steps", "refit_lr", "refit_loss", "refit_holdout", "guard_batches",
          "lr_schedule",
          "warmup_steps",
          "distill_hidden", "compress_from", "start_file", "teacher_file", "start_allocation", "select_steps",
          "select_from", "select_opt")
_DATA = ("task", "data_dir", "train_file", "eval_file", "text_cols", "label_col", "task_type", "eval_limit",
         "max_len", "seq_len", "calib_len", "eval_len", "eval_windows", "curve_windows")


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """What a ``train`` / ``compress`` command line asks for, as configs."""
  compression: object
  train: object
  data: object
  crs: tuple
  methods: tuple
  model: str
  out: Optional[str]
  preset: str
  #: ``{method: softlm_jax.run.Recipe}``: the methods that run with their own defaults (presets.recipes)
  recipes: dict = dataclasses.field(default_factory=dict)


def configs(args) -> RunOptions:
  """The configs of parsed ``args``: the preset's values, overridden by every option given.

  Raises:
    ValueError: contradictory values (e.g. a ramp longer than the compression-step cap), naming both.
  """
  get = lambda name: getattr(args, name, None)  # noqa: E731
  d = {k: get(k) for k in _DATA}
  if d["text_cols"] is not None:
    d["text_cols"] = tuple(d["text_cols"])
  crs = get("cr")
  crs = [0.5] if crs is None else (list(crs) if isinstance(crs, (list, tuple)) else [crs])
  c = {k: get(k) for k in _COMPRESSION}
  c["target_ratio"] = crs[0]
  t = {k: get(k) for k in _TRAIN}
  if get("no_progress"):
    t["progress"] = False
  preset = get("preset") or presets.default_preset(d["task"], d["train_file"])
  ccfg, tcfg, dcfg = presets.build(preset, compression=c, train=t, data=d)
  run.check_configs(ccfg, tcfg)
  methods = get("methods") or ([get("method")] if get("method") else list(presets.methods(preset)))
  given = {"compression": {k for k, v in c.items() if v is not None and k != "target_ratio"},
           "train": {k for k, v in t.items() if v is not None}}
  recipes = presets.recipes(preset, methods, given=given)
  run.check_recipes(ccfg, tcfg, methods, crs, recipes)
  model = get("model") or presets.DEFAULT_MODEL[dcfg.model_kind]
  models.check_spec(model, dcfg.model_kind)
  if get("out"):
    check_run_paths(get("out"), methods, crs, cr_folders=len(crs) > 1)
  return RunOptions(ccfg, tcfg, dcfg, tuple(crs), tuple(methods), model, get("out"), preset, recipes)


def check_writable(path: str, *, folder: bool) -> None:
  """Refuses (ValueError naming the path) a ``path`` the run could not write: a folder
  (``folder=True``) must be a folder or creatable; a file must not be a folder; in both cases the
  nearest existing ancestor must be a writable folder."""
  if os.path.exists(path):
    if folder and not os.path.isdir(path):
      raise ValueError(f"{path} is a file, but the run writes a folder there: pass another --out or move the file")
    if not folder and os.path.isdir(path):
      raise ValueError(f"{path} is a folder, but the run writes a file there: move the folder")
    if not os.access(path if folder else os.path.dirname(os.path.abspath(path)), os.W_OK):
      raise ValueError(f"{path} is not writable")
    return
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"cannot create {path}: {parent} is a file, not a folder")
  if not os.access(parent, os.W_OK):
    raise ValueError(f"cannot create {path}: {parent} is not writable")


def check_run_paths(out: str, methods, crs, *, cr_folders: bool) -> None:
  """Every path a run writes, checked before any work (:func:`check_writable`): ``out``, each
  method's folder (:func:`softlm_jax.run.method_folder`) and the files it receives
  (:data:`softlm_jax.run.METHOD_FILES`)."""
  check_writable(out, folder=True)
  for name in methods:
    for cr in crs:
      folder = os.path.join(out, run.method_folder(name, cr, cr_folders))
      check_writable(folder, folder=True)
      for f in run.METHOD_FILES:
        check_writable(os.path.join(folder, f), folder=False)


def parse(ap: argparse.ArgumentParser, argv=None):
  """``ap.parse_args(argv)``, then the configs it builds (:func:`configs`): contradictory options are
  refused here, with argparse's usage error naming both, before anything loads."""
  args = ap.parse_args(argv)
  if getattr(args, "configs_needed", False):
    try:
      args.options = configs(args)
    except (ValueError, FileNotFoundError) as e:  # contradictory options; a --start-file that is not there
      ap.error(str(e))
  return args

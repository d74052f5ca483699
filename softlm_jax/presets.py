"""Named presets: the recommended settings, in one place.

A preset gives the fields of the three run configs (:class:`softlm_jax.CompressionConfig`,
:class:`softlm_jax.run.TrainConfig`, :class:`softlm_jax.tasks.DataConfig`) and the default methods;
:func:`build` applies a user's overrides on top. The ``softlm`` command and the experiment scripts take
their defaults from here, so the same options give the same run through every entry point.

* ``lm``: causal-LM compression, the ``allocated`` method. Fisher scores of the whitened triplets from one
  gradient pass over 128 windows of 128 tokens of WikiText-2 valid, the exact budget fill
  (:mod:`softlm_jax.allocate`), the propagated error-aware decomposition (mix 0.5,
  :mod:`softlm_jax.propagate`) fit at those ranks; ``softlm compress`` stops there. ``softlm train`` adds
  the block refit (32 Adam steps per block at ``refit_lr`` 1e-3, :mod:`softlm_jax.refit`) and fine-tunes
  on 512-token windows (the perplexity's) with distillation from the dense model (weight 1, T = 2),
  batch 4, lr 2e-4, cosine schedule after 5 warmup steps. ``static`` gets the same decomposition, refit
  and fine-tuning at the uniform keep-ratio. A learned rule asked for here (``softlm``, ``llrc``)
  runs with its own recipe (:func:`recipes`): whitened factors, a constant rate. Chosen in
  BENCHMARKS.md#training-free-language-model and BENCHMARKS.md#language-model-after-fine-tuning; the
  calibration windows, refit rate, schedule and hidden-state distillation (off) in
  BENCHMARKS.md#ablations.
* ``lm-softlm``: the SoftLM recipe on a causal LM: whitened decomposition from 128 x 128 calibration
  tokens, thresholds in ``uniform_rank`` units at lr 3e-2 following a 60-step ramp, 40 fine-tuning steps
  after the freeze, the same distillation (BENCHMARKS.md#language-model-after-fine-tuning).
* ``glue``: classifier fine-tuning on GLUE / the user's data. The dense model is fine-tuned first (1,000
  steps: the teacher); every compressed method compresses that teacher (``compress_from="teacher"``) on
  its whitened spectrum (Grams of 256 training examples); ``allocated`` takes the ranks of the global
  Fisher allocation scored on the teacher, then fine-tunes 200 steps with distillation from it (weight
  1, T = 2), batch 16, lr 1e-4; ``static`` runs beside it. A learned rule asked for here runs on the same
  whitened factors (thresholds in ``uniform_rank`` units, lr 2e-2, a 60-step ramp, 150 steps after the
  freeze). Chosen in BENCHMARKS.md#glue; why a learned rule is not the default:
  BENCHMARKS.md#negative-results.
* ``glue-softlm``: SoftLM on a classifier: plain SVD, thresholds learned from the pretrained encoder with
  a new head at lr 5e-3, 150 steps after the freeze, no distillation (BENCHMARKS.md#glue).
* ``paper``: the SoftLM paper's plain recipe for a causal LM: plain SVD, no ramp, no distillation
  (BENCHMARKS.md#the-softlm-papers-setting).
"""
from __future__ import annotations

import copy
from typing import Optional

from softlm_jax import run, tasks
from softlm_jax.config import CompressionConfig
from softlm_jax.run import TrainConfig

_LM_DATA = {"task": tasks.LM_TASK, "seq_len": 128, "eval_len": 512, "eval_windows": 16}
_LM_SOFTLM = {"decomposition": "whitened", "normalize": "uniform_rank", "alpha_lr": 3e-2, "compress_steps": 60,
              "sharpness": 1000.0, "gamma": 1.0}
_LM_TRAIN = {"finetune_steps": 40, "max_compress_steps": 150, "batch_size": 4, "lr": 5e-5, "distill": (1.0, 2.0),
             "calib": 256, "calib_grams": 128, "ft_steps": 50}

PRESETS: dict[str, dict] = {
    "lm": {
        "compression": {**_LM_SOFTLM, "decomposition": "propagated"},
        "train": {**_LM_TRAIN, "calib_grams": 128, "refit_steps": 32, "refit_lr": 1e-3, "lr": 2e-4,
                  "lr_schedule": "cosine", "warmup_steps": 5},
        # fine-tuning on windows of the perplexity's length, calibration on 128-token ones (BENCHMARKS.md#ablations)
        "data": {**_LM_DATA, "seq_len": 512, "calib_len": 128},
        "methods": ("allocated", "static", "dense"),
        # a learned rule chooses its own ranks: the SoftLM / LLRC recipe's whitened factors (whose full
        # rank is the dense model) and a constant rate (its length is known only once the budget is met)
        "learned": {"name": "learned ranks on whitened factors",
                    "compression": {"decomposition": "whitened"},
                    "train": {"lr_schedule": "constant", "warmup_steps": 0}},
    },
    "lm-softlm": {
        "compression": dict(_LM_SOFTLM),
        "train": dict(_LM_TRAIN),
        "data": dict(_LM_DATA),
        "methods": ("softlm", "static", "dense"),
    },
    "glue": {
        "compression": {"decomposition": "whitened", "normalize": "uniform_rank", "alpha_lr": 2e-2,
                        "compress_steps": 60},
        # static / allocated: max_compress_steps // 2 + finetune_steps = 200 steps (a learned rule's total
        # when one runs: equal steps)
        "train": {"finetune_steps": 150, "max_compress_steps": 100, "batch_size": 16, "lr": 1e-4,
                  "distill": (1.0, 2.0), "calib": 256, "calib_grams": 256, "ft_steps": 50,
                  "teacher_steps": 1000, "compress_from": "teacher"},
        "data": {"task": "sst2"},
        "methods": ("allocated", "static", "dense"),
    },
    "glue-softlm": {
        "compression": {"decomposition": "svd", "normalize": "top", "alpha_lr": 5e-3, "compress_steps": 0},
        "train": {"finetune_steps": 150, "max_compress_steps": 300, "batch_size": 16, "lr": 1e-4,
                  "distill": (0.0, 1.0), "calib": 256, "calib_grams": 256, "ft_steps": 50},
        "data": {"task": "sst2"},
        "methods": ("softlm", "static", "dense"),
    },
    "paper": {
        "compression": {"decomposition": "svd", "normalize": "top", "alpha_lr": 5e-3, "compress_steps": 0},
        "train": {**_LM_TRAIN, "distill": (0.0, 1.0)},
        "data": dict(_LM_DATA),
        "methods": ("softlm", "static", "dense"),
    },
}

#: the default model of each model kind
DEFAULT_MODEL = {"causal_lm": "smollm2", "classifier": "minilm"}


def names() -> list[str]:
  return list(PRESETS)


def default_preset(task: Optional[str], train_file: Optional[str] = None) -> str:
  """``"lm"`` for the causal-LM task, ``"glue"`` otherwise."""
  return "lm" if task == tasks.LM_TASK and not train_file else "glue"


def methods(name: str) -> tuple:
  """The methods a preset runs by default (``softlm train`` without ``--methods``)."""
  return tuple(get(name)["methods"])


def get(name: str) -> dict:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
  return copy.deepcopy(PRESETS[name])


def recipes(name: str, methods, *, given: Optional[dict] = None) -> dict:
  """``{method: Recipe}``: each learned rule's own defaults in preset ``name`` (its ``"learned"``
  entry), without the fields in ``given`` (``{"compression": keys, "train": keys}`` the user set:
  those hold for every method). Methods whose preset has no such entry, and the allocated / static /
  dense methods, and the ``R-alloc`` methods, run with the preset's configs as they are."""
  entry = get(name).get("learned")
  if not entry:
    return {}
  given = given or {}
  comp = tuple((k, v) for k, v in entry.get("compression", {}).items() if k not in given.get("compression", ()))
  train = tuple((k, v) for k, v in entry.get("train", {}).items() if k not in given.get("train", ()))
  if not comp and not train:
    return {}
  rec = run.Recipe(entry["name"], comp, train)
  # an R-alloc method runs on the allocated method's configs (its decomposition is fit at the learned ranks)
  return {m: rec for m in methods if run.parse_method(m).rule is not None and not run.parse_method(m).selects_ranks}


def build(preset: Optional[str] = None, *, compression: Optional[dict] = None, train: Optional[dict] = None,
          data: Optional[dict] = None):
  """``(CompressionConfig, TrainConfig, DataConfig)`` of a preset with overrides (None values are
  ignored: "not given"). Without ``preset`` it follows the task (:func:`default_preset`).

  The one rule between options lives here: a decomposition given without ``normalize`` gets its own
  units (``top`` for plain SVD; ``uniform_rank`` for the activation-aware spectra, whitened and
  propagated, whose top values activation outliers inflate).
  """
  compression = {k: v for k, v in (compression or {}).items() if v is not None}
  train = {k: v for k, v in (train or {}).items() if v is not None}
  data = {k: v for k, v in (data or {}).items() if v is not None}
  p = get(preset or default_preset(data.get("task"), data.get("train_file")))
  if "decomposition" in compression and "normalize" not in compression:
    compression["normalize"] = "top" if compression["decomposition"] == "svd" else "uniform_rank"
  p.pop("methods", None)
  p.pop("learned", None)
  ccfg = CompressionConfig(**{**p["compression"], **compression})
  tcfg = TrainConfig(**{**p["train"], **train})
  dcfg = tasks.DataConfig(**{**p["data"], **data})
  return ccfg, tcfg, dcfg

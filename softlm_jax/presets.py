"""Named presets: the recommended settings, in one place.

A preset gives the fields of the three run configs (:class:`softlm_jax.CompressionConfig`,
:class:`softlm_jax.run.TrainConfig`, :class:`softlm_jax.tasks.DataConfig`) and the default methods;
:func:`build` applies a user's overrides on top. The ``softlm`` command and the experiment scripts take
their defaults from here, so the same options give the same run through every entry point.

* ``lm``: causal-LM compression, the measured best recipe of BENCHMARKS.md (issue 17, SmolLM2-135M):
  the ``allocated`` method: Fisher scores of the whitened triplets from one gradient pass, the exact
  budget fill, the propagated error-aware decomposition fit at those ranks (mix 0.5), all from the first
  128 x 128 calibration tokens of WikiText-2 valid (CR 0.2: ppl 60.7 with no weight trained, against
  78.2 from 32 x 128 tokens and 215 for whitened uniform; CR 0.5: 219.8, against 314.9 and 1,092).
  ``softlm compress`` stops there; ``softlm train`` adds the block refit (32 Adam steps per block: on
  SmolLM2 at CR 0.5, 128 bought no larger gain, BENCHMARKS.md) and fine-tunes with distillation from
  the dense model (weight 1, T = 2), batch 4, lr 2e-4 (CR 0.5: 204.8 after the refit, 109.5 after 100
  steps at a constant rate, against 115.2 at lr 5e-5 and 129.3 at 5e-4), since session 6 on a cosine
  schedule to 0 after 5 warmup steps (from the 512-window file: 93.2 against 97.3 constant; the
  hidden-state KD, ``distill_hidden``, measured no gain at weight 1 and a loss at 10, so it is off). A
  joint learned rule asked for here needs ``lr_schedule="constant"`` (its length is not known).
  Its baseline ``static`` gets the same decomposition, refit and fine-tuning at the uniform keep-ratio.
  ``calib_grams=512`` (65,536 tokens) is better still at 2.5x the compression time: CR 0.5 168.1
  training-free, 97.3 after 100 steps at the constant rate (its refit raises the start to 172.5 but
  helps the fine-tuning: 104.9 without it). Since session 9 the fine-tuning runs on windows of 512
  tokens (``seq_len``, the perplexity's window; 4x the tokens and about 4x the time of a 128-token
  step), while calibration keeps 128-token windows (``calib_len``: ``softlm compress`` is unchanged):
  from the 512-window file, with its refit on 128 x 512 tokens (``calib_len=512, calib_grams=128``),
  78.8 after 100 steps against 93.2 on 128-token windows (BENCHMARKS.md, rows 5''' / 6'''); this
  preset's own default (128-window start, its refit 204.8, 100 steps on 512-token windows): 89.1, against
  109.5 on 128-token windows at a constant rate. Calibration on 512-token windows is better at equal
  tokens (session 10, CR 0.5 training-free: 200.5 from 32 x 512 against 219.8 from 128 x 128, for 1.4x the
  time and 11 GB; 150.0 from 256 x 512, and 145.7 after a refit at ``refit_lr`` 1e-3). Session 11 measured
  it at the other CRs and kept 128 x 128: 32 x 512 gives 61.1 against 60.7 at CR 0.2 and 95.1 against 92.6
  at CR 0.3 (88.8 against 87.3 after a refit at 1e-3). Since session 11 the refit runs at ``refit_lr``
  1e-3, which beat 3e-4 in every pair measured: on this preset's files 58.8 against 59.4 (CR 0.2), 87.3
  against 89.1 (CR 0.3) and 200.1 against 204.8 (CR 0.5); on 512-token windows 181.7 against 195.7
  (32 x 512, CR 0.5). After the 100 steps the difference is gone (session 12, the ``softlm train``
  default at CR 0.5: 89.2 at 1e-3, 89.1 at 3e-4; 87.0 from the 32 x 512 file with the refit at 1e-3).
* ``lm-softlm``: the SoftLM recipe of issue 11 (CR 0.5, ppl 139.6 after 100 steps): whitened
  decomposition from 128 x 128 calibration tokens, thresholds in ``uniform_rank`` units at lr 3e-2
  following a 60-step ramp, 40 fine-tuning steps after the freeze, the same distillation.
* ``glue``: classifier fine-tuning on GLUE / the user's data, the measured best recipe of BENCHMARKS.md
  (issue 17, MiniLM at CR 0.5): the dense model is fine-tuned first (1,000 steps: the teacher); every
  compressed method compresses that teacher (``compress_from="teacher"``) on its whitened spectrum
  (Grams of 256 training examples); ``allocated`` takes the ranks of the global Fisher allocation
  scored on the teacher, then fine-tunes 200 steps with distillation from it (weight 1, T = 2), batch
  16, lr 1e-4 (SST-2: 0.875 against the teacher's 0.877 and whitened static's 0.857; MRPC F1: 0.859
  against the teacher's 0.847 and static's 0.847; ``static`` always runs beside it). The teacher trains
  1,000 steps since session 12: at 500 it had barely learned MRPC (F1 0.827, the majority answer 0.812;
  then static 0.852, allocated 0.824, SoftLM 0.776) and SST-2 less well (0.856; allocated 0.866, static
  0.841, SoftLM 0.831). A learned rule asked for here runs on the same whitened factors (thresholds in
  ``uniform_rank`` units, lr 2e-2, a 60-step ramp, 150 steps after the freeze); started at the Fisher
  allocation of CR 0.4 (``start_allocation``) SoftLM gave MRPC F1 0.847 but SST-2 0.803, so it is not
  the default.
* ``glue-softlm``: the classifier recipe before issue 17 (plain SVD, SoftLM from the pretrained
  encoder with a new head, thresholds at lr 5e-3, 150 steps after the freeze, no distillation).
* ``paper``: the SoftLM paper's plain recipe for a causal LM (plain SVD, no ramp, no distillation).
"""
from __future__ import annotations

import copy
from typing import Optional

from softlm_jax import tasks
from softlm_jax.config import CompressionConfig

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
        # fine-tuning on windows of the perplexity's length, calibration on 128-token ones (session 9)
        "data": {**_LM_DATA, "seq_len": 512, "calib_len": 128},
        "methods": ("allocated", "static", "dense"),
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


def build(preset: Optional[str] = None, *, compression: Optional[dict] = None, train: Optional[dict] = None,
          data: Optional[dict] = None):
  """``(CompressionConfig, TrainConfig, DataConfig)`` of a preset with overrides (None values are
  ignored: "not given"). Without ``preset`` it follows the task (:func:`default_preset`).

  The one rule between options lives here: a decomposition given without ``normalize`` gets its own
  units (``top`` for plain SVD; ``uniform_rank`` for the activation-aware spectra, whitened and
  propagated, whose top values activation outliers inflate).
  """
  from softlm_jax.run import TrainConfig
  compression = {k: v for k, v in (compression or {}).items() if v is not None}
  train = {k: v for k, v in (train or {}).items() if v is not None}
  data = {k: v for k, v in (data or {}).items() if v is not None}
  p = get(preset or default_preset(data.get("task"), data.get("train_file")))
  if "decomposition" in compression and "normalize" not in compression:
    compression["normalize"] = "top" if compression["decomposition"] == "svd" else "uniform_rank"
  p.pop("methods", None)
  ccfg = CompressionConfig(**{**p["compression"], **compression})
  tcfg = TrainConfig(**{**p["train"], **train})
  dcfg = tasks.DataConfig(**{**p["data"], **data})
  return ccfg, tcfg, dcfg

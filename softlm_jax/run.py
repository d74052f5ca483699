"""One run pipeline for every method, model family and task kind.

:func:`run_comparison` runs a list of methods at one or more compression ratios on one model and task
and writes a run folder; :meth:`Comparison.run_method` runs one. Both are driven by three frozen configs
(:class:`softlm_jax.CompressionConfig`, :class:`TrainConfig`, :class:`softlm_jax.tasks.DataConfig`),
never by parsed options; the ``softlm`` command, ``experiments/lm.py``, ``experiments/glue.py`` and
``experiments/glue_llrc.py`` are thin layers over it.

Methods (:func:`method_names`): ``dense`` (a classifier is fine-tuned: its head is new; an LM is
evaluated as loaded), ``dense-ft`` (dense fine-tuning), ``static`` (static SVD, the same keep-ratio in
every layer) and ``allocated`` (static SVD at the ranks of a global loss-aware allocation,
:mod:`softlm_jax.allocate`; with a rank-dependent decomposition the factors are fit at those ranks),
each in three variants named by what runs after the decomposition: ``-noft`` nothing (no weight
trained by gradient), ``-refit`` the calibration-only block refit (:mod:`softlm_jax.refit`), none
(``static``, ``allocated``) the refit when ``TrainConfig.refit_steps`` > 0, then fine-tuning; and for
every registered selection rule ``R``
(``softlm``, ``llrc``): ``R`` (the rule's own recipe: SoftLM trains thresholds and weights until the
budget is met, then fine-tunes; LLRC learns masks with the weights frozen), ``R-noft`` (the selection
learned by distillation with the weights frozen, on the calibration set), ``R-ft`` (``R-noft``, then
fine-tuning of the exported model), ``R-alloc`` (the selection started at the ``allocated`` ranks, or
the uniform ones, and learned by distillation on the calibration set with the weights frozen and the
count held at the target after every update, :func:`softlm_jax.optim.budget_hold`; then the method's
own decomposition fit at the learned ranks, as ``allocated`` is at its own: zero updates give the
``allocated-noft`` file) and ``R-alloc-ft`` (``R-alloc``, then the fine-tuning ``allocated`` gets, guarded
the same way).

Policies, in one place:

* The frozen-weight methods compress the *teacher*: the dense model as loaded (LM) or the ``dense``
  method's fine-tuned classifier (which then runs first). Training methods start from the dense model
  and, with ``TrainConfig.distill``, distil from the teacher.
* Calibration Grams (whitened decomposition) are collected once per base tree and shared by every
  method and CR; so is each decomposition.
* ``TrainConfig.refit_steps`` > 0: ``static`` / ``allocated`` and their ``-refit`` variants get a
  calibration-only block refit (:mod:`softlm_jax.refit`) before any fine-tuning; ``-noft`` never
  does, nor does ``softlm compress``.
* The guard (``TrainConfig.guard_batches``): no post-decomposition step (refit, fine-tuning) of a static
  method is kept if it raised the model's task loss on held-out calibration batches.
* Steps: a learned rule stops ``finetune_steps`` after its budget is met; ``dense-ft`` and ``static``
  get ``TrainConfig.steps`` or the learned rule's total at the same CR (equal steps).
* Budget: an exported model that misses its target (counted parameters above the target) is an error
  (:class:`BudgetMissError`, after results.json says by how much and why) unless
  ``TrainConfig.allow_budget_miss``.

Run folder: ``<out>/<method>/`` (``<method>_cr<CR>`` with ``cr_folders``) holding ``run.json`` (the
configs, :meth:`to_dict`), ``ckpt/`` (orbax state while it trains), ``results.json``, ``table.md``,
``ranks.png`` and ``compact.safetensors``; ``<out>/summary.{md,json}`` and ``comparison.png``.
"""
from __future__ import annotations

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

from softlm_jax import (allocate, budget, calib, checkpoint, files, models, optim, refit, report, rules, serial, shard,
                        svd, tasks, train, tree)
from softlm_jax.compress import compress_params
from softlm_jax.config import CompressionConfig
from softlm_jax.export import export_params, static_ranks, static_svd
from softlm_jax.intercept import intercept
from softlm_jax.optim import budget_state, make_optimizer
from softlm_jax.svd import decompose

ALPHA_OPTS = ("adam", "sgd")
COMPRESS_FROM = ("dense", "teacher")
#: where a ``<rule>-alloc`` method's learned selection starts (``TrainConfig.select_from``)
SELECT_FROM = ("allocation", "uniform")
#: a ``<rule>-alloc`` selection's optimizer (``TrainConfig.select_opt``)
SELECT_OPTS = ("trade", "adam")
#: the methods without a learned selection (``-noft``: not fine-tuned)
STATIC_BASES = ("static", "allocated")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How a run trains (the compression itself is :class:`softlm_jax.CompressionConfig`).

  Attributes:
    steps: steps of ``dense-ft``, ``static`` and a classifier's ``dense`` (None: the learned rule's
      total at the same CR, else ``max_compress_steps // 2 + finetune_steps``).
    teacher_steps: steps of a classifier's ``dense`` teacher when set (default ``steps``).
    finetune_steps: a learned rule's steps after its budget is met.
    max_compress_steps: a learned rule's cap on the steps before the budget is met.
    batch_size, lr, seed: the weights' Adam and the batches (a pure function of the step and seed).
    distill: ``(weight, T)``: add ``weight * T^2 * KL(teacher_T || student_T)`` to the task loss of
      every trained compressed method (0: off).
    calib: calibration examples (the first N training ones) of the frozen-weight methods.
    calib_grams: calibration examples of the Grams (whitened decomposition).
    calib_scores: calibration examples of the Fisher scores of ``allocated`` (the first N of the
      ``calib_grams``; None: all of them). The scores' gradient pass costs several times the Grams'
      per token (BENCHMARKS.md#compression-cost).
    score_unit: a sample of the Fisher statistics (:data:`softlm_jax.allocate.SCORE_UNITS`): a batch's
      mean gradient or each example's own (the same backward pass; ``batch_size`` times the samples).
    ft_steps: fine-tuning steps of ``R-ft`` after the frozen-weight run.
    refill: rules with a refill (LLRC): after the budget is met, re-enable dropped values up to the target.
    alpha_opt: the thresholds' optimizer, ``"adam"`` (lr ``CompressionConfig.alpha_lr``) or ``"sgd"``.
    eval_every: log the task's curve metric every N steps (0: off).
    save_every: orbax checkpoint every N steps (and at the end).
    mesh: ``"data=D,fsdp=F"`` device mesh (None: one device).
    keep_ckpt: keep the orbax checkpoints of finished runs.
    progress: tqdm bars.
    allow_budget_miss: record a missed budget in the results instead of failing.
    stop_after: stop every training loop after this many steps, saving its checkpoint (a time-boxed
      run: :class:`RunStopped` is raised; the same run without it resumes there).
    refit_steps: ``static`` / ``allocated``'s block refit (:mod:`softlm_jax.refit`) before any fine-tuning: Adam
      steps per block matching the dense block's outputs on the calibration set (0: off).
    refit_lr: its learning rate.
    lr_schedule: the weights' learning rate over a fine-tuning run of known length (``dense-ft``,
      ``static`` / ``allocated``, ``R-ft``'s fine-tuning, a classifier's ``dense``):
      :data:`softlm_jax.optim.LR_SCHEDULES`, ``"constant"`` or ``"cosine"`` (to 0 at the last step);
      a joint learned rule (``softlm``), whose length depends on when its budget is met, refuses
      ``"cosine"``.
    warmup_steps: a linear warmup from 0 of that learning rate (0: none; at most a run's steps - 1, so a
      short run keeps one step at the full rate).
    distill_hidden: causal LMs: with ``distill``'s weight > 0, add this weight times the hidden-state
      distillation (:func:`softlm_jax.losses.hidden_distillation_loss`: every block's output matched
      to the teacher's, token by token) to every distilled run's loss (0: off).
    refit_loss: its error measure (:data:`softlm_jax.refit.LOSSES`): ``"total"`` (the sums' ratio) or
      ``"token"`` (each token relative to its own norm).
    refit_holdout: calibration batches the refit holds out of its steps, instead of the guard's batches
      (:class:`softlm_jax.refit.RefitConfig`; 0: the guard's own batches, below).
    guard_batches: the guard: this many batches of calibration examples after the first ``calib_grams``
      (never trained on, never in the Grams or the scores). The block refit keeps a block's new weights
      only if they lower that block's error on them; after each post-decomposition step of ``static`` /
      ``allocated`` (the refit, the fine-tuning) the model's task loss on them is compared with the loss
      before the step, and a step that raised it is reverted (results.json ``guard``; the summary's
      recipe says so). 0: no guard.
    compress_from: the tree every compressed method starts from: ``"dense"`` (the trained methods
      start from the model as loaded: a classifier's head is new and learns with the compression) or
      ``"teacher"`` (every compressed method compresses the teacher: a classifier's fine-tuned
      ``dense`` run, which then runs first; for an LM the two are the same tree).
    teacher_file: the distillation teacher from this checkpoint (a ``dense-ft`` run's
      ``teacher.safetensors``: the dense model fine-tuned on the task) instead of the dense model as
      loaded (LM) or the run's fine-tuned ``dense`` (classifier, which then does not run first); it must
      have the dense model's leaves and shapes (:func:`load_teacher`). What the compressed methods
      compress follows ``compress_from`` as before.
    start_file: a compact checkpoint (``softlm compress``'s ``compact.safetensors``) that ``static`` /
      ``allocated`` start from instead of decomposing: it must hold the same method, source model and
      CR (:func:`check_start_file`); the block refit and the fine-tuning then run on it (None: decompose).
    start_allocation: SoftLM's thresholds start at the ranks of the global Fisher allocation at this CR
      (:meth:`Comparison.allocation`, :func:`softlm_jax.allocate.alpha_for_ranks`), below the target CR,
      instead of at ``alpha = 0`` (full rank); the rule then learns its way to the target from there (a
      ramp, ``compress_steps``, still falls from the dense count, so the thresholds hold until the ramp
      reaches the start's count). None: the full-rank start.
    select_steps: updates of a ``<rule>-alloc`` method's learned selection (distillation on the
      calibration set, weights frozen, the count held at the target by
      :func:`softlm_jax.optim.budget_hold` after every update).
    select_from: where a ``<rule>-alloc`` selection starts: ``"allocation"`` (the Fisher allocation at
      the target CR) or ``"uniform"`` (the uniform ranks at the target CR).
    select_opt: a ``<rule>-alloc`` selection's optimizer: ``"trade"``
      (:func:`softlm_jax.optim.trade_optimizer`: momentum SGD on globally normalised gradients, each
      layer's per counted parameter) or ``"adam"`` (the rule's own: every logit moves by about its rate).
  """
  steps: Optional[int] = None
  teacher_steps: Optional[int] = None
  finetune_steps: int = 40
  max_compress_steps: int = 150
  batch_size: int = 4
  lr: float = 5e-5
  seed: int = 0
  distill: tuple = (0.0, 1.0)
  calib: int = 256
  calib_grams: int = 128
  calib_scores: Optional[int] = None
  score_unit: str = "batch"
  ft_steps: int = 50
  refill: bool = False
  alpha_opt: str = "adam"
  eval_every: int = 0
  save_every: int = 50
  mesh: Optional[str] = None
  keep_ckpt: bool = False
  progress: bool = True
  allow_budget_miss: bool = False
  stop_after: Optional[int] = None
  refit_steps: int = 0
  refit_lr: float = 3e-4
  refit_loss: str = "total"
  refit_holdout: int = 0
  guard_batches: int = 4
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  distill_hidden: float = 0.0
  compress_from: str = "dense"
  start_file: Optional[str] = None
  teacher_file: Optional[str] = None
  start_allocation: Optional[float] = None
  select_steps: int = 100
  select_from: str = "allocation"
  select_opt: str = "trade"

  def __post_init__(self):
    for name in ("steps", "teacher_steps", "stop_after"):
      v = getattr(self, name)
      if v is not None and (isinstance(v, bool) or int(v) < 1):
        raise ValueError(f"TrainConfig.{name} must be None or >= 1, got {v!r}")
    for name in ("finetune_steps", "eval_every", "ft_steps", "refit_steps", "warmup_steps", "refit_holdout",
                 "select_steps", "guard_batches"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
    if self.calib_scores is not None and not 1 <= int(self.calib_scores) <= int(self.calib_grams):
      raise ValueError(f"TrainConfig.calib_scores must be None or in [1, calib_grams={self.calib_grams}], got "
                       f"{self.calib_scores!r}")
    for name in ("max_compress_steps", "batch_size", "calib", "calib_grams", "save_every"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
    if self.score_unit not in allocate.SCORE_UNITS:
      raise ValueError(f"TrainConfig.score_unit must be one of {allocate.SCORE_UNITS}, got {self.score_unit!r}")
    for name in ("lr", "refit_lr"):
      if not getattr(self, name) > 0:
        raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
    if self.refit_loss not in refit.LOSSES:
      raise ValueError(f"TrainConfig.refit_loss must be one of {refit.LOSSES}, got {self.refit_loss!r}")
    if self.lr_schedule not in optim.LR_SCHEDULES:
      raise ValueError(f"TrainConfig.lr_schedule must be one of {optim.LR_SCHEDULES}, got {self.lr_schedule!r}")
    if not float(self.distill_hidden) >= 0:
      raise ValueError(f"TrainConfig.distill_hidden must be >= 0, got {self.distill_hidden!r}")
    d = tuple(self.distill)
    if self.distill_hidden > 0 and d and d[0] <= 0:
      raise ValueError(f"TrainConfig.distill_hidden={self.distill_hidden} needs the teacher: set distill's "
                       f"weight > 0, got distill={self.distill!r}")
    if len(d) != 2 or d[0] < 0 or d[1] <= 0:
      raise ValueError(f"TrainConfig.distill must be (weight >= 0, T > 0), got {self.distill!r}")
    object.__setattr__(self, "distill", (float(d[0]), float(d[1])))
    if self.compress_from not in COMPRESS_FROM:
      raise ValueError(f"TrainConfig.compress_from must be one of {COMPRESS_FROM}, got {self.compress_from!r}")
    if self.start_allocation is not None and not 0.0 < float(self.start_allocation) < 1.0:
      raise ValueError(f"TrainConfig.start_allocation must be a CR in (0, 1), got {self.start_allocation!r}")
    if self.select_opt not in SELECT_OPTS:
      raise ValueError(f"TrainConfig.select_opt must be one of {SELECT_OPTS}, got {self.select_opt!r}")
    if self.select_from not in SELECT_FROM:
      raise ValueError(f"TrainConfig.select_from must be one of {SELECT_FROM}, got {self.select_from!r}")
    if self.alpha_opt not in ALPHA_OPTS:
      raise ValueError(f"TrainConfig.alpha_opt must be one of {ALPHA_OPTS}, got {self.alpha_opt!r}")

  def to_dict(self) -> dict:
    return serial.to_dict(self)

  @classmethod
  def from_dict(cls, d) -> "TrainConfig":
    return serial.from_dict(cls, d)

  def replace(self, **changes) -> "TrainConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A method's own defaults inside a run: ``compression`` and ``train`` field overrides (each a tuple
  of ``(field, value)`` pairs) applied on top of the run's configs for that method only, and a
  ``name`` for the summary. Built by :func:`softlm_jax.presets.recipes`; fields the user set are never
  overridden."""
  name: str
  compression: tuple = ()
  train: tuple = ()

  def apply(self, ccfg: CompressionConfig, tcfg: TrainConfig) -> tuple[CompressionConfig, TrainConfig]:
    return ccfg.replace(**dict(self.compression)), tcfg.replace(**dict(self.train))


def method_configs(ccfg: CompressionConfig, tcfg: TrainConfig, recipes: Optional[dict], name: str
                   ) -> tuple[CompressionConfig, TrainConfig]:
  """The configs method ``name`` runs with: the run's, with its :class:`Recipe` (if any) applied."""
  recipe = (recipes or {}).get(name)
  return recipe.apply(ccfg, tcfg) if recipe is not None else (ccfg, tcfg)


def check_recipes(ccfg: CompressionConfig, tcfg: TrainConfig, methods, crs, recipes: Optional[dict] = None,
                  source_model: Optional[str] = None) -> None:
  """:func:`check_methods` and :func:`check_starts` of every method under its own configs (its
  :class:`Recipe` applied), before anything loads or trains."""
  for name in methods:
    c, t = method_configs(ccfg, tcfg, recipes, name)
    check_methods(c, [name])
    check_starts(t, [name], crs, source_model)


def check_methods(ccfg: CompressionConfig, methods) -> None:
  """Refuses a learned rule on a decomposition whose factors are fit at fixed ranks (propagated): its
  full-rank form is not the dense model, so a rule that starts at full rank and chooses its own ranks
  would start elsewhere (ValueError naming both and the fix)."""
  if not svd.get(ccfg.decomposition).takes_ranks:
    return
  rules_ = [m for m in methods if parse_method(m).rule is not None and not parse_method(m).selects_ranks]
  if rules_:
    raise ValueError(f"{', '.join(rules_)} learns its own ranks, but decomposition={ccfg.decomposition!r} fits each "
                     "layer at fixed ranks (its full-rank form is not the dense model): use --preset lm-softlm (the "
                     "SoftLM recipe), or --decomposition whitened --lr-schedule constant for the learned rules, or "
                     "the allocated / static methods with this decomposition")


def check_configs(ccfg: CompressionConfig, tcfg: TrainConfig) -> None:
  """Refuses contradictory settings across the two configs, naming both (ValueError)."""
  if ccfg.compress_steps > tcfg.max_compress_steps:
    raise ValueError(f"the ramp (compress_steps = {ccfg.compress_steps}) is longer than the cap on compression "
                     f"steps (max_compress_steps = {tcfg.max_compress_steps}): the budget could not be met; "
                     "shorten the ramp or raise the cap")


# ---------------------------------------------------------------------------------------------------
# methods


def rule_trains_weights(rule: str) -> bool:
  """Whether a selection rule's own recipe trains the weights with the selection (SoftLM) or keeps
  them frozen (LLRC)."""
  return bool(rules.get(rule).trains_weights)


@dataclasses.dataclass(frozen=True)
class Method:
  """A parsed method name: ``base`` (``"dense"``, one of :data:`STATIC_BASES` or a rule) and ``variant`` (``""``,
  ``"noft"``, ``"ft"``, ``"alloc"``, ``"alloc-ft"``)."""
  name: str
  base: str
  variant: str = ""

  @property
  def compressed(self) -> bool:
    return self.base != "dense"

  @property
  def rule(self) -> Optional[str]:
    return None if self.base == "dense" or self.base in STATIC_BASES else self.base

  @property
  def frozen(self) -> bool:
    """The selection is learned (or cut) on frozen weights of the teacher."""
    if self.base == "dense":
      return False
    if self.base in STATIC_BASES:
      return self.variant in ("noft", "refit")
    return self.variant in ("noft", "ft", "alloc", "alloc-ft") or not rule_trains_weights(self.base)

  @property
  def selects_ranks(self) -> bool:
    """A ``<rule>-alloc`` (or ``-alloc-ft``) method: the rule learns ranks at the budget (held at every
    update) on frozen factors of the method's own decomposition, from the allocation; the decomposition
    is then fit at the learned ranks."""
    return self.rule is not None and self.variant in ("alloc", "alloc-ft")

  @property
  def tunes_export(self) -> bool:
    """A frozen-weight rule's exported model is fine-tuned after (``R-ft``, ``R-alloc-ft``): the run
    reuses the frozen-weight run (``R-noft``, ``R-alloc``) of the same rule and CR in this process."""
    return self.rule is not None and self.variant in ("ft", "alloc-ft")

  @property
  def joint(self) -> bool:
    """A rule trained together with the weights (SoftLM's recipe)."""
    return self.rule is not None and not self.frozen


def method_names() -> list[str]:
  """Every method :func:`parse_method` accepts, for the registered rules."""
  out = ["dense", "dense-ft", "static", "static-noft", "static-refit", "allocated", "allocated-noft",
         "allocated-refit"]
  for r in rules.names():
    out += [r, f"{r}-noft", f"{r}-ft"]
    if rules.get(r).margin is not None:
      out += [f"{r}-alloc", f"{r}-alloc-ft"]
  return out


def parse_method(name: str) -> Method:
  valid = method_names()
  if name not in valid:
    raise ValueError(f"unknown method {name!r}; valid: {', '.join(valid)}")
  base, _, variant = name.partition("-")
  return Method(name, base, variant)


def method_folder(name: str, cr: float, cr_folders: bool) -> str:
  """The run folder's subfolder of method ``name`` at ``cr``: the name, or ``<name>_cr<CR>`` for a
  compressed method when a run holds several CRs (``cr_folders``)."""
  return f"{name}_cr{cr}" if cr_folders and parse_method(name).compressed else name


#: the files a method folder receives (the compact checkpoint, the results)
METHOD_FILES = ("compact.safetensors", "results.json", "run.json", "table.md", "ranks.png")


class BudgetMissError(RuntimeError):
  """A compressed model that misses its target; the results on disk say by how much and why."""


class RunWriteError(OSError):
  """A run's results could not be written after its work; the message says what is saved and how to
  resume."""


class RunStopped(RuntimeError):
  """A training loop stopped at ``TrainConfig.stop_after`` with its checkpoint saved (resumable)."""


# ---------------------------------------------------------------------------------------------------
# the shared state of one run folder


class Comparison:
  """Methods on one model and task, sharing the loaded model, the calibration statistics, the
  decompositions and the teacher. ``run_info``: extra JSON-able facts for each ``run.json`` (the
  data config, the command)."""

  def __init__(self, model, task: tasks.Task, ccfg: CompressionConfig, tcfg: TrainConfig, out: str, *,
               cr_folders: bool = False, run_info: Optional[dict] = None, log: Callable[[str], None] = print,
               recipes: Optional[dict] = None):
    check_configs(ccfg, tcfg)
    self.recipes = dict(recipes or {})
    if ccfg.include is None and model.family.include is not None:  # the family's own selection (Mamba)
      ccfg = ccfg.replace(include=model.family.include)
    self.model, self.task, self.ccfg, self.tcfg, self.out = model, task, ccfg, tcfg, out
    self.cr_folders, self.run_info, self.log = cr_folders, dict(run_info or {}), log
    self.mesh = shard.parse_mesh(tcfg.mesh)
    dense = jax.tree.map(jnp.asarray, model.params)
    self.dense = shard.shard_tree(dense, self.mesh) if self.mesh is not None else dense
    self.teacher = None if task.dense_trains else self.dense
    if tcfg.teacher_file:
      self.teacher = load_teacher(tcfg.teacher_file, self.dense)
      if self.mesh is not None:
        self.teacher = shard.shard_tree(self.teacher, self.mesh)
      self.log(f"distillation teacher: {tcfg.teacher_file}")
    # one calibration set for every method, CR and base tree (its Grams are cached per selection and weights)
    self.calibration = calib.Calibration(model.logits_fn(), lambda: task.calib_batches(tcfg.calib_grams,
                                                                                        tcfg.batch_size),
                                         mask_fn=task.mask_fn, progress=tcfg.progress, mesh=self.mesh)
    self._factors: dict = {}
    self._allocations: dict = {}
    self._scores: dict = {}
    self._frozen: dict = {}  # (rule, cr) -> (exported tree, results) of an R-noft / frozen R run
    self._guard: Optional[list] = None
    self._guard_fn = None
    self.learned_steps: dict = {}  # cr -> a learned rule's total steps

  # -- names and folders

  def config(self, method: Method, cr: float) -> CompressionConfig:
    """The compression config of ``method`` at ``cr`` (its :class:`Recipe` applied)."""
    ccfg = method_configs(self.ccfg, self.tcfg, self.recipes, method.name)[0]
    return ccfg.replace(target_ratio=cr, method=method.rule or ccfg.method)

  def train_config(self, method: Method) -> TrainConfig:
    """The train config of ``method`` (its :class:`Recipe` applied)."""
    return method_configs(self.ccfg, self.tcfg, self.recipes, method.name)[1]

  def folder(self, method: Method, cr: float) -> str:
    return os.path.join(self.out, method_folder(method.name, cr, self.cr_folders))

  # -- shared statistics

  def base(self, method: Method):
    """``(key, tree)`` a method compresses: the teacher when :func:`compresses_teacher`, else the dense one."""
    if compresses_teacher(method, self.tcfg):
      if self.teacher is None:
        raise ValueError(f"{method.name} compresses the fine-tuned dense teacher: run 'dense' first")
      return ("teacher" if self.task.dense_trains else "dense"), self.teacher
    return "dense", self.dense

  @property
  def grams_collected(self) -> int:
    """Statistics passes over the calibration set so far (one per base tree and selection)."""
    return self.calibration.collections

  def factors(self, key: str, params, cfg: CompressionConfig, ranks: Optional[dict] = None) -> dict:
    """The decomposition of ``params`` (:func:`softlm_jax.svd.decompose` with this run's
    :class:`~softlm_jax.Calibration`), computed once per tree and decomposition and shared by every
    method and CR. ``ranks``: the ranks the layers will run at, for a decomposition whose factors
    depend on them (propagated; default its uniform ranks at the CR)."""
    d = svd.get(cfg.decomposition)
    rkey = tuple(sorted(ranks.items())) if (ranks is not None and d.takes_ranks) else None
    fkey = (key, d.key(cfg), rkey)
    if fkey not in self._factors:
      t = time.time()
      self._factors[fkey] = decompose(params, cfg, calibration=self.calibration,
                                      ranks=ranks if d.takes_ranks else None)
      self.log(f"{cfg.decomposition} decomposition of {len(self._factors[fkey])} layers ({key}"
               f"{', at the given ranks' if rkey else ''}): {time.time() - t:.1f}s (calibration passes so "
               f"far: {self.grams_collected})")
    return self._factors[fkey]

  def allocation(self, key: str, params, cfg: CompressionConfig) -> dict:
    """``{path: rank}``: the global loss-aware allocation at ``cfg.target_ratio``
    (:mod:`softlm_jax.allocate`): Fisher scores of every triplet from one gradient pass of the task's
    loss over the first ``calib_scores`` of the ``calib_grams`` calibration examples, then the exact
    budget fill of :func:`softlm_jax.allocate.allocate_ranks`. No weight is trained.

    The triplets scored are those of a decomposition whose full rank is the dense model: ``cfg``'s
    own, or ``whitened`` when ``cfg``'s factors depend on the ranks (propagated: its full-rank map is
    a least-squares fit to inputs from a model cut at other ranks, so scores taken there measured a
    different model: ppl 3.0e6 on SmolLM2 at CR 0.5, BENCHMARKS.md). The scores serve every CR (they
    do not depend on it); the fill runs per CR.
    """
    score_cfg = cfg.replace(decomposition="whitened") if svd.get(cfg.decomposition).takes_ranks else cfg
    score_cfg = score_cfg.replace(method="softlm")  # the full-rank model: every threshold below every value
    skey = (key, svd.get(score_cfg.decomposition).key(score_cfg))
    if skey not in self._scores:
      t = time.time()
      cparams = allocate.full_rank(compress_params(params, score_cfg,
                                                   factors=self.factors(key, params, score_cfg)), score_cfg)
      batches = self.task.score_batches(self.tcfg.calib_scores or self.tcfg.calib_grams, self.tcfg.batch_size)
      stats = allocate.triplet_stats(cparams, score_cfg, self.task.score_loss(self.model), batches,
                                     progress=self.tcfg.progress, mesh=self.mesh, unit=self.tcfg.score_unit)
      # shapes only: the fill needs the layers' shapes and the dense count, not the full-rank values
      # (0.85 GB for SmolLM2)
      skeleton = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), cparams)
      self._scores[skey] = (skeleton, allocate.drop_losses(stats))
      del cparams
      self.log(f"Fisher scores of the {score_cfg.decomposition} triplets ({key}): {len(batches)} batches, "
               f"{stats['batches']} samples, "
               f"{time.time() - t:.1f}s")
    akey = skey + (cfg.target_ratio,)
    if akey not in self._allocations:
      skeleton, drops = self._scores[skey]
      self._allocations[akey] = allocate.allocate_ranks(skeleton, cfg, drops)
    return self._allocations[akey]

  def static_tree(self, key: str, params, cfg: CompressionConfig, allocated: bool = False) -> dict:
    """The exported static SVD of ``params`` at ``cfg.target_ratio``: the uniform keep-ratio, or the
    ranks of :meth:`allocation` (``allocated``), from factors fit at those ranks when the
    decomposition depends on them (propagated)."""
    ranks = self.allocation(key, params, cfg) if allocated else None
    return static_svd(params, cfg, ranks, factors=self.factors(key, params, cfg, ranks))

  def initial(self, method: Method, cr: float):
    """``(params, cfg)``: the tree ``method`` starts from at ``cr`` (training form for a rule, the
    exported static SVD for ``static``, the dense tree for ``dense``). No weight is trained here."""
    cfg = self.config(method, cr)
    if not method.compressed:
      return self.dense, cfg
    key, base = self.base(method)
    if method.base in STATIC_BASES:
      if self.tcfg.start_file:
        check_start_file(self.tcfg.start_file, method.name, cr, self.model.manifest()[0].get("source_model"))
        self.log(f"[{method.name}] starts from {self.tcfg.start_file} (no decomposition)")
        return jax.tree.map(jnp.asarray, checkpoint.load_compact(self.tcfg.start_file)[0]), cfg
      return self.static_tree(key, base, cfg, allocated=method.base == "allocated"), cfg
    check_methods(cfg, [method.name])
    if method.selects_ranks:
      return self.selection_start(key, base, cfg)
    params = compress_params(base, cfg, factors=self.factors(key, base, cfg))
    start = self.tcfg.start_allocation
    if start is not None:
      check_start_allocation(method.name, start, cr)
      ranks = self.allocation(key, base, cfg.replace(target_ratio=start))
      params = allocate.alpha_for_ranks(params, ranks)
      self.log(f"[{method.name}] thresholds start at the allocation of CR {start} "
               f"({budget.count_params(params):,} counted params; target {budget.target_params(params, cfg):,})")
    return params, cfg

  def selection_start(self, key: str, base, cfg: CompressionConfig) -> tuple[dict, CompressionConfig]:
    """``(params, cfg)`` (``cfg`` as given): a ``<rule>-alloc`` method's training-form tree at the start of its learned
    selection: ``cfg``'s own decomposition at the ranks of ``TrainConfig.select_from`` (the Fisher
    allocation of :meth:`allocation`, or the uniform ranks) at ``cfg.target_ratio``, every triplet of
    those factors a candidate, the rule's selection set to keep exactly those ranks
    (:func:`softlm_jax.allocate.selection_for_ranks`; LLRC's logits spaced by ``mask_lr``, about one
    update's reach). For a decomposition fit at fixed ranks (propagated) these are the factors the
    ``allocated`` (or ``static``) method cuts, so the selection starts at that method's model exactly."""
    if self.tcfg.select_from == "allocation":
      ranks = self.allocation(key, base, cfg)
    else:
      ranks = {p: int(r) for p, r in static_ranks(base, cfg).items()}
    d = svd.get(cfg.decomposition)
    params = compress_params(base, cfg, factors=self.factors(key, base, cfg, ranks if d.takes_ranks else None))
    params = allocate.selection_for_ranks(params, ranks, spacing=cfg.mask_lr)
    self.log(f"[{cfg.method}-alloc] the selection starts at the {self.tcfg.select_from} of CR {cfg.target_ratio} "
             f"({budget.count_params(params):,} counted params; target {budget.target_params(params, cfg):,})")
    return params, cfg

  def at_learned_ranks(self, method: Method, cfg: CompressionConfig, start, trained) -> tuple[dict, dict]:
    """``(exported tree, info)`` of a ``<rule>-alloc`` method: the ranks its selection learned
    (``trained``, from ``start``); the learned model itself (:func:`softlm_jax.export_params`: the kept
    triplets of the factors it learned on) and ``cfg``'s decomposition fit again at the learned ranks
    (:meth:`static_tree`'s path), the second kept only if it does not raise the loss on the guard's
    held-out calibration batches (:meth:`guarded`). When no triplet moved, the learned model is the
    start's and the fit is returned as it is (zero updates give the ``allocated`` file bit for bit)."""
    key, base = self.base(method)
    ranks0 = {p: int(r) for p, r in budget.layer_ranks(start).items()}
    ranks = {p: int(r) for p, r in budget.layer_ranks(trained).items()}
    moved = sum(abs(ranks[p] - ranks0[p]) for p in ranks)
    info = {"start": self.tcfg.select_from, "steps": self.tcfg.select_steps,
            "layers_changed": sum(ranks[p] != ranks0[p] for p in ranks), "triplets_moved": moved,
            "start_ranks": ranks0, "ranks": ranks}
    self.log(f"[{method.name}] learned ranks: {info['layers_changed']} of {len(ranks)} layers changed, "
             f"{moved} triplets moved; fitting {cfg.decomposition} at them")
    refit_tree = static_svd(base, cfg, ranks, factors=self.factors(key, base, cfg, ranks))
    kept0 = {p: np.asarray(budget.kept(lay)) for p, lay in tree.factored_layers(start)}
    if all(np.array_equal(np.asarray(budget.kept(lay)), kept0[p]) for p, lay in tree.factored_layers(trained)):
      info.update(guard=[], refit_kept=True)  # nothing moved: the learned model is the start's, fit as it is
      return refit_tree, info
    learned = export_params(trained, cfg)
    guard: list = []
    final = self.guarded(method, f"{cfg.decomposition} fit at the learned ranks", learned, refit_tree, cfg, guard)
    info.update(guard=guard, refit_kept=final is refit_tree)
    return final, info

  def refit(self, method: Method, params, out: str) -> tuple[dict, dict]:
    """``(params, info)``: the block refit of an exported tree (``TrainConfig.refit_steps``), resumable
    from ``<out>/ckpt_refit``, guarded block by block by :meth:`guard_batches` (or the last
    ``refit_holdout`` calibration batches); ``params`` unchanged when it is off."""
    t = self.tcfg
    if t.refit_steps == 0:
      return params, {}
    t0, c0 = time.time(), time.process_time()
    blocks: list = []
    rcfg = refit.RefitConfig(steps=t.refit_steps, lr=t.refit_lr, loss=t.refit_loss, holdout=t.refit_holdout)
    heldout = None if t.refit_holdout else [b["inputs"] for b in self.guard_batches()]
    params = refit.refit_blocks(self.base(method)[1], params, self.calibration, rcfg, heldout=heldout,
                                ckpt_dir=os.path.join(out, "ckpt_refit"), progress=t.progress,
                                on_block=lambda i, blk, info: blocks.append({"block": blk, **info}))
    kept = sum(1 for b in blocks if b.get("kept", True))
    info = {"steps_per_block": t.refit_steps, "lr": t.refit_lr, "loss": t.refit_loss,
            "holdout": t.refit_holdout, "guard_batches": len(heldout or []), "blocks": blocks,
            "blocks_kept": kept, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
    self.log(f"[{method.name}] block refit: {len(blocks)} blocks x {t.refit_steps} steps, {kept} kept, "
             f"{info['wall_s']:.0f}s")
    return params, info

  def guard_batches(self) -> list:
    """The guard's batches (``TrainConfig.guard_batches`` of ``batch_size`` calibration examples after
    the first ``calib_grams``, as :meth:`softlm_jax.tasks.Task.score_batches` gives them; fewer when
    the calibration set ends sooner, none when it has no example past ``calib_grams``)."""
    if self._guard is None:
      t = self.tcfg
      start = min(t.calib_grams, self.task.n_calib())
      self._guard = self.task.heldout_batches(start, t.guard_batches * t.batch_size, t.batch_size)
      if t.guard_batches and not self._guard:
        self.log(f"no guard: the calibration set has no example past the first {t.calib_grams} (calib_grams)")
    return self._guard

  def guard_loss(self, params, cfg: CompressionConfig) -> Optional[float]:
    """The task loss (:meth:`softlm_jax.tasks.Task.score_loss`) of ``params`` averaged over
    :meth:`guard_batches` (None without them)."""
    batches = self.guard_batches()
    if not batches:
      return None
    if self._guard_fn is None:
      score = self.task.score_loss(self.model)

      def loss(p, b, c):
        with intercept(c):
          return score(p, b)
      self._guard_fn = jax.jit(loss, static_argnums=2)
    return float(np.mean([float(self._guard_fn(params, b, cfg)) for b in batches]))

  def guarded(self, method: Method, step: str, before, after, cfg: CompressionConfig, record: list):
    """``after`` if the step ``step`` did not raise :meth:`guard_loss` above ``before``'s, else
    ``before`` (the step reverted); appends ``{"step", "loss_before", "loss_after", "kept"}`` to
    ``record``. ``before``'s loss is the previous record's kept loss when there is one (not computed
    again)."""
    lb = (record[-1]["loss_after"] if record[-1]["kept"] else record[-1]["loss_before"]) if record else \
        self.guard_loss(before, cfg)
    if lb is None:
      return after
    la = self.guard_loss(after, cfg)
    kept = bool(la <= lb)
    record.append({"step": step, "loss_before": lb, "loss_after": la, "kept": kept})
    if not kept:
      self.log(f"[{method.name}] the {step} raised the held-out calibration loss {lb:.4f} -> {la:.4f}: reverted")
    return after if kept else before

  def weights_tx(self, steps: int, t: TrainConfig) -> optax.GradientTransformation:
    """The weights' Adam for a fine-tuning run of ``steps`` updates (``t.lr_schedule``)."""
    if t.lr_schedule == "constant" and t.warmup_steps == 0:  # a float lr: the Adam state has no schedule
      return optax.adam(t.lr)                                # count, so older checkpoints still restore
    return optax.adam(optim.lr_schedule(t.lr, steps, t.lr_schedule, min(t.warmup_steps, steps - 1)))

  def optimizer(self, method: Method, cfg: CompressionConfig) -> optax.GradientTransformation:
    adam = optax.adam(self.tcfg.lr)
    check_schedule(method.name, self.train_config(method))
    if method.rule is None:
      return adam
    alpha_tx = optax.sgd(cfg.alpha_lr) if self.tcfg.alpha_opt == "sgd" else None
    hold = method.selects_ranks  # the count held at the target after every update, not frozen
    if hold and self.tcfg.select_opt == "trade":
      rule = rules.get(method.rule)
      alpha_tx = optim.trade_optimizer(cfg.alpha_lr if rule.trains_weights else cfg.mask_lr)
    if method.joint:
      return make_optimizer(cfg, adam, alpha_tx)
    if rule_trains_weights(method.rule):
      return make_optimizer(cfg, optax.set_to_zero(), alpha_tx, hold=hold)
    return make_optimizer(cfg, hold=hold)

  def steps_for(self, cr: float) -> int:
    """Steps of a fine-tuned method at ``cr``: ``TrainConfig.steps``, else the total of the joint
    learned rule of this run at the same CR (it runs first: :func:`order_methods`), else
    ``max_compress_steps // 2 + finetune_steps``. Never another CR's count, and never a count that
    depends on which methods happened to run before in this process."""
    t = self.tcfg
    return t.steps or self.learned_steps.get(cr) or t.max_compress_steps // 2 + t.finetune_steps

  # -- training

  def _tune(self, params, steps: int, distill, ckpt: str):
    """``(state, history)``: ``steps`` updates of every weight of ``params`` (an exported or dense tree)
    on the task loss with ``distill``'s distillation (:meth:`_distill`), checkpointed in ``ckpt``: the
    teacher's training and every method's fine-tuning."""
    return self._fit(params, self.weights_tx(steps, self.tcfg), None,
                     self.task.train_loss(self.model, distill, self._hidden(distill)),
                     self._task_batches(distill[0] > 0), ckpt, steps=steps)

  def _fit(self, params, tx, cfg, loss, batch_fn, ckpt, **kw):
    t = self.tcfg
    state = train.init_state(params, tx, seed=t.seed, mesh=self.mesh)
    step_fn = train.make_train_step(loss, tx, cfg, mesh=self.mesh)
    eval_fn = self.task.curve_fn(self.model, cfg) if t.eval_every > 0 else None
    state, hist = train.fit(state, step_fn, batch_fn, max_compress_steps=t.max_compress_steps, ckpt_dir=ckpt,
                            save_every=t.save_every, progress=t.progress, eval_fn=eval_fn, eval_every=t.eval_every,
                            mesh=self.mesh, stop_after=t.stop_after, **kw)
    if t.stop_after is not None and int(state.step) == t.stop_after:
      if not os.path.isdir(os.path.join(ckpt, str(t.stop_after))):  # a rerun that stops there again has it
        train.save_checkpoint(ckpt, state)
      raise RunStopped(f"stopped after {t.stop_after} steps (stop_after); checkpoint {ckpt}: the same run "
                       "without it resumes there")
    return state, hist

  def _task_batches(self, distill: bool) -> Callable:
    t, teacher = self.tcfg, self.teacher

    def batch_fn(step):
      b = self.task.train_batch(step, t.batch_size, t.seed)
      return {**b, "teacher": teacher} if distill else b
    return batch_fn

  def _calib_batches(self, teacher, examples: Optional[int] = None) -> Callable:
    """Distillation batches from the first ``examples`` calibration examples (default ``calib``)."""
    t = self.tcfg
    n = examples or t.calib
    return lambda step: {**self.task.calib_batch(step, n, t.batch_size, t.seed), "teacher": teacher}

  def _distill(self, method: Method) -> tuple:
    """The distillation of a trained method: on for compressed methods and ``dense-ft`` when a
    teacher exists, never for the classifier's ``dense`` (it is the teacher)."""
    if self.teacher is None or (method.name == "dense" and self.task.dense_trains):
      return (0.0, 1.0)
    return self.tcfg.distill

  def _hidden(self, distill: tuple) -> float:
    """The hidden-state distillation weight of a run distilled with ``distill`` (0 without a teacher)."""
    return self.tcfg.distill_hidden if distill[0] > 0 else 0.0

  # -- one method

  def run_method(self, name: str, cr: float, *, enforce: bool = True) -> dict:
    """Runs (or reads back, when its results.json exists) one method at ``cr``; returns its results.

    Raises:
      BudgetMissError: the exported model misses its target (unless ``allow_budget_miss``, or
        ``enforce=False``: then the caller checks :meth:`budget_miss`).
    """
    method = parse_method(name)
    out = self.folder(method, cr)
    done = os.path.join(out, "results.json")
    if os.path.exists(done):
      with open(done) as f:
        res = json.load(f)
      self.log(f"[{method.name}] finished earlier: {done}")
      self._remove_checkpoints(out)  # a run killed between its results and this cleanup
      self._after(method, cr, res, None)
      if enforce:
        self._enforce(res)
      return res
    os.makedirs(out, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    cfg = self.config(method, cr)
    self.write_run_json(out, method, cfg)
    t = self.train_config(method)
    res = {"method": method.name, "cr": cr if method.compressed else 0.0, "model": self.model.name,
           **self.task.describe(), "config": {"compression": serial.to_dict(cfg), "train": t.to_dict()}}
    ckpt = os.path.join(out, "ckpt")
    distill = self._distill(method)
    step_cfg, probe_t = (cfg if method.compressed else None), None
    final = None
    if not method.compressed:
      trains = method.variant == "ft" or self.task.dense_trains
      steps = (t.teacher_steps or self.steps_for(cr)) if (method.name == "dense" and trains) else self.steps_for(cr)
      if trains:
        state, res["history"] = self._tune(self.dense, steps, distill, ckpt)
        final, res["train_steps"] = state.params, int(state.step)
      else:
        final, res["train_steps"] = self.dense, 0
    elif method.base in STATIC_BASES:
      final, _ = self.initial(method, cr)
      guard: list = []
      res["train_steps"] = 0
      if method.variant != "noft":
        refit_params, refit_info = self.refit(method, final, out)
        if refit_info:
          res["refit"] = refit_info
          final = self.guarded(method, "refit", final, refit_params, cfg, guard)
      if not method.frozen:
        if res.get("refit"):  # what the refit alone gave, before the fine-tuning
          _, res["refit"]["metrics"], _ = self.task.evaluate(self.model, final, None)
        steps = self.steps_for(cr)
        state, res["history"] = self._tune(final, steps, distill, ckpt)
        res["train_steps"] = int(state.step)
        final = self.guarded(method, "fine-tuning", final, state.params, cfg, guard)
      if guard:
        res["guard"] = {"batches": len(self.guard_batches()), "steps": guard}
    else:
      reuse = self._frozen.get((method.rule, cr, method.selects_ranks)) if method.tunes_export else None
      if reuse is not None:
        final, prev = reuse
        res.update({k: prev[k] for k in ("train_steps", "history", "freeze_step", "training_form_metrics",
                                         "export_max_abs_logit_diff", "counted_before_refill", "selection")
                    if k in prev})
        res["reused"] = "the frozen-weight run of the same rule and CR earlier in this process"
      else:
        params, _ = self.initial(method, cr)
        tx = self.optimizer(method, cfg)
        if method.joint:
          loss = self.task.train_loss(self.model, distill, self._hidden(distill))
          batches, ft = self._task_batches(distill[0] > 0), t.finetune_steps
        else:
          # R-alloc: the allocation's own calibration examples (the guard's stay held out)
          loss = train.distill_task(self.model.logits_fn())
          batches = self._calib_batches(self.base(method)[1], t.calib_grams if method.selects_ranks else None)
          ft = t.select_steps if method.selects_ranks else 0  # the hold reads as frozen from update 0
        state, hist = self._fit(params, tx, cfg, loss, batches, ckpt, finetune_steps=ft,
                                target=budget.target_params(params, cfg))
        bs = budget_state(state.opt_state)
        res.update(train_steps=int(state.step), history=hist, freeze_step=int(bs.freeze_step))
        trained = state.params
        refill = rules.get(method.rule).refill
        if t.refill and refill is not None and bool(bs.frozen):
          res["counted_before_refill"] = int(budget.count_params(trained))
          trained = refill(trained, cfg)
        _, tf_metrics, probe_t = self.task.evaluate(self.model, trained, cfg)
        res["training_form_metrics"] = next(iter(tf_metrics.values()))
        if method.selects_ranks:  # the learned model, or the decomposition fit again at its ranks
          final, res["selection"] = self.at_learned_ranks(method, cfg, params, trained)
          probe_t = None
        else:
          final = export_params(trained, cfg)
      if method.tunes_export:  # R-ft: ft_steps; R-alloc-ft: allocated's fine-tuning and guard
        steps0, ft_steps = res["train_steps"], (self.steps_for(cr) if method.selects_ranks else t.ft_steps)
        ft_state, res["finetune_history"] = self._tune(final, ft_steps, distill, os.path.join(out, "ckpt_ft"))
        res["train_steps"], res["selection_steps"] = steps0 + ft_steps, steps0
        if method.selects_ranks:
          guard: list = []
          final = self.guarded(method, "fine-tuning", final, ft_state.params, cfg, guard)
          res["guard"] = {"batches": len(self.guard_batches()), "steps": guard}
        else:
          final = ft_state.params
        probe_t = None
    if method.compressed:
      res["recipe"] = recipe(method, cfg, res, self.recipes.get(method.name))
    res["main_metric"], res["metrics"], probe = self.task.evaluate(self.model, final, step_cfg)
    if probe_t is not None:
      res["export_max_abs_logit_diff"] = float(np.max(np.abs(np.asarray(probe) - np.asarray(probe_t))))
    try:
      if method.compressed:
        title = f"{method.name} {self.model.name} {self.task.name} CR={cr}: rank per layer"
        res.update(report.budget_results(final, cfg, out, title))
        res["budget"]["verdict"] = budget_verdict(res["budget"], method, res.get("freeze_step"), cfg, t)
        verdict = res["budget"]["verdict"]
        res["compact_checkpoint"] = self.save_compact(method, out, final, cfg, res.get("train_steps", 0),
                                                      verdict["met"])
        self.log(f"[{method.name}] compact checkpoint: {res['compact_checkpoint']['path']} "
                 f"({res['compact_checkpoint']['file_bytes'] / 2**20:.1f} MiB)")
      elif self.task.dense_trains or method.name == "dense-ft":  # a teacher (distillation, frozen weights)
        path = os.path.join(out, "teacher.safetensors")
        checkpoint.save_compact(path, final, metadata={"method": "dense", "source_model": self.model.name,
                                                       "task": self.task.name})
      res["wall_s"], res["cpu_s"] = time.time() - t0, time.process_time() - c0  # cpu: every thread, this process
      files.write_json(res, done)
    except OSError as e:  # a disk that fills, a folder that vanished: late, after the work
      saved = [d for d in ("ckpt", "ckpt_ft", "ckpt_refit") if os.path.isdir(os.path.join(out, d))]
      raise RunWriteError(f"[{method.name}] could not write its results in {out} ({type(e).__name__}: {e}); "
                          + (f"its trained state is saved in {', '.join(os.path.join(out, d) for d in saved)}: "
                             if saved else "nothing it trained is lost (it trains no weight by gradient): ")
                          + "free the space and rerun the same command to resume") from e
    files.fault_point("method_done")
    row = summary_row(res)
    files.write_text(report.markdown_table([row], list(row)), os.path.join(out, "table.md"))
    self._remove_checkpoints(out)
    self._after(method, cr, res, final)
    if enforce:
      self._enforce(res)
    return res

  def _remove_checkpoints(self, out: str) -> None:
    """Deletes a finished method's training checkpoints (unless ``keep_ckpt``)."""
    if not self.tcfg.keep_ckpt:
      for d in ("ckpt", "ckpt_ft", "ckpt_refit"):
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)

  def _after(self, method: Method, cr: float, res: dict, final) -> None:
    """Bookkeeping after a method: the learned step budget, the teacher, frozen runs for ``R-ft`` and
    ``R-alloc-ft``."""
    if method.joint:
      self.learned_steps[cr] = res["train_steps"]
    if method.name == "dense" and self.task.dense_trains and not self.tcfg.teacher_file:
      path = os.path.join(self.folder(method, cr), "teacher.safetensors")
      if final is not None:
        self.teacher = final
      elif os.path.exists(path):
        self.teacher = jax.tree.map(jnp.asarray, checkpoint.load_compact(path)[0])
    if method.rule is not None and method.frozen and not method.tunes_export and final is not None:
      self._frozen[(method.rule, cr, method.selects_ranks)] = (final, res)

  def budget_miss(self, res: dict) -> Optional[str]:
    """The message of a missed budget that is an error under this config, else None."""
    verdict = (res.get("budget") or {}).get("verdict") or {}
    if verdict and not verdict["met"] and not self.tcfg.allow_budget_miss:
      return (f"{res['method']} at CR {res['cr']}: {verdict['why']} (results: "
              f"{self.folder(parse_method(res['method']), res['cr'])}/results.json; "
              "allow_budget_miss / --allow-budget-miss records it instead)")
    return None

  def _enforce(self, res: dict) -> None:
    miss = self.budget_miss(res)
    if miss:
      raise BudgetMissError(miss)

  # -- files

  def write_run_json(self, out: str, method: Method, cfg: CompressionConfig) -> None:
    """``run.json``: everything :func:`load_run` needs to rebuild the method's configs."""
    files.write_json({"method": method.name, "model": self.model.name, "family": self.model.family.name,
                       "task": self.task.describe(), "compression": serial.to_dict(cfg),
                       "train": self.train_config(method).to_dict(), **self.run_info}, os.path.join(out, "run.json"))

  def save_compact(self, method: Method, folder: str, params, cfg: CompressionConfig, train_steps: int,
                   budget_met: Optional[bool]) -> dict:
    """Writes ``<folder>/compact.safetensors`` of an exported tree with this run's model facts
    (:func:`compact_metadata`); returns ``{"path", **checkpoint.file_report}``."""
    path = os.path.join(folder, "compact.safetensors")
    checkpoint.save_compact(path, params, cfg=cfg, model_config=self.model.manifest()[1],
                            metadata=compact_metadata(self.model, self.task.describe(), method.name, train_steps,
                                                      budget_met))
    return {"path": path, **checkpoint.file_report(path)}

def recipe(method: Method, cfg: CompressionConfig, res: dict, own: Optional[Recipe] = None) -> str:
  """What ran to make a compressed method's model, for the summary: the method's own :class:`Recipe`
  (if it has one), the decomposition, then each step, with what the guard kept, e.g.
  ``"propagated; refit 32/block (28/30 blocks kept); fine-tuning 100 steps (reverted)"`` or
  ``"learned ranks on whitened factors: whitened; softlm selection, 190 steps"``; a rank-selecting
  method's starts with the decomposition at its start ranks."""
  parts = [cfg.decomposition]
  kept = {g["step"]: g["kept"] for g in (res.get("guard") or {}).get("steps", [])}
  if method.selects_ranks:
    sel = res.get("selection", {})
    parts = [f"{cfg.decomposition} at the {sel.get('start', 'allocation')} ranks",
             f"{method.rule} selection at the budget, weights frozen, "
             f"{res.get('selection_steps', res['train_steps'])} steps "
             f"({sel.get('layers_changed', 0)} layers' ranks changed)",
             f"{cfg.decomposition} fit at the learned ranks" + ("" if sel.get("refit_kept", True) else
                                                                " (reverted by the guard)")]
    if method.tunes_export:
      parts.append(f"fine-tuning {res['train_steps'] - res['selection_steps']} steps"
                   + ("" if kept.get("fine-tuning", True) else " (reverted)"))
  elif method.rule is not None:
    what = "selection with the weights" if method.joint else "selection, weights frozen"
    parts.append(f"{method.rule} {what}, {res.get('selection_steps', res['train_steps'])} steps")
    if method.variant == "ft":
      parts.append(f"fine-tuning {res['train_steps'] - res['selection_steps']} steps")
  else:
    r = res.get("refit")
    if r:
      parts.append(f"refit {r['steps_per_block']}/block ({r['blocks_kept']}/{len(r['blocks'])} blocks kept)"
                   + ("" if kept.get("refit", True) else " (reverted)"))
    if not method.frozen:
      parts.append(f"fine-tuning {res['train_steps']} steps" + ("" if kept.get("fine-tuning", True) else
                                                                 " (reverted)"))
  return (f"{own.name}: " if own is not None else "") + "; ".join(parts)


def compact_metadata(model, task_info: dict, method: str, train_steps: int, budget_met: Optional[bool]) -> dict:
  """A compact file's metadata: the method, the model family's manifest fields (family, class,
  source model, tokenizer), the task's facts, the steps and whether the budget was met."""
  meta = {"method": method, **model.manifest()[0], **task_info, "train_steps": int(train_steps)}
  if budget_met is not None:
    meta["budget_met"] = bool(budget_met)
  return meta


def load(model_spec: str, dcfg: tasks.DataConfig, *, seed: int = 0, log: Callable[[str], None] = print):
  """``(model, task)``: the model ``model_spec`` names (:func:`softlm_jax.models.load`, the kind the
  data needs) and the :class:`~softlm_jax.tasks.Task` of ``dcfg`` tokenised with its tokenizer."""
  t = time.time()
  if dcfg.model_kind == "causal_lm":
    model = models.load(model_spec, "causal_lm", max_len=dcfg.max_positions, seed=seed)
    task = tasks.load_task(dcfg, model.tokenizer)
    check_task_ids(model, task)
    log(f"loaded {model_spec} ({model.family.name}) in {time.time() - t:.0f}s; train (wikitext-2 valid) "
        f"{task.windows['train'].shape}" + (f", calibration {task.windows['calib'].shape}" if "calib" in task.windows
                                             else "") + f"; test {tasks.eval_split_name(task.windows['test'])}")
    return model, task
  name, tr, evals, max_len = tasks.load_table_data(dcfg)
  model = models.load(model_spec, "classifier", seed=seed, num_labels=tr.num_labels)
  task = tasks.ClassificationTask(name, tr, evals, max_len, model.tokenizer)
  check_task_ids(model, task)
  log(f"{name}: train {len(tr)} ({tr.source}), eval " + ", ".join(f"{s} {len(d)}" for s, d in evals.items()) +
      f"; {'regression' if tr.regression else f'{tr.num_labels} classes'}, max_len {max_len}; "
      f"loaded {model_spec} in {time.time() - t:.0f}s")
  return model, task


def check_task_ids(model, task: tasks.Task) -> None:
  """Refuses a task whose token ids (its tokenizer's) fall outside the model's vocabulary, naming the
  split, the id and its position (:meth:`softlm_jax.models.Model.check_ids`)."""
  for split, ids in task.token_ids().items():
    model.check_ids(ids, f"{model.name} on {task.name}, {split} split (tokenized with {model.tokenizer_source!r})")


def budget_verdict(b: dict, method: Method, freeze_step: Optional[int], cfg: CompressionConfig,
                   tcfg: TrainConfig) -> dict:
  """``{"met", "why", "overshoot_params"}`` of an exported model's budget (``b``: its
  :func:`softlm_jax.budget_report` totals): met when the counted parameters are at most the target;
  ``overshoot_params`` is how far below the target the count went (the last step's overshoot)."""
  counted, target = b["counted_params"], b["target_params"]
  out = {"met": counted <= target, "why": None, "overshoot_params": int(target - counted)}
  if counted > target:
    why = (f"budget not met: {counted:,} counted params > target {target:,} (removed {b['achieved_ratio']:.3f} of "
           f"the selected linears, asked {cfg.target_ratio})")
    if method.rule is not None and (freeze_step is None or freeze_step < 0):
      why += f"; the selection never reached the target within max_compress_steps = {tcfg.max_compress_steps}"
      if cfg.compress_steps > tcfg.max_compress_steps:
        why += f" (ramp {cfg.compress_steps} > max compress steps {tcfg.max_compress_steps})"
    out["why"] = why
  return out


def load_run(folder: str) -> dict:
  """A method folder's ``run.json`` with its configs rebuilt: ``{"compression": CompressionConfig,
  "train": TrainConfig, "data": DataConfig or None, ...}`` (the rest as written)."""
  path = os.path.join(folder, "run.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist (a method folder made by softlm compress/train holds one)")
  with open(path) as f:
    conf = json.load(f)
  conf["compression"] = serial.from_dict(CompressionConfig, conf["compression"])
  conf["train"] = TrainConfig.from_dict(conf["train"])
  conf["data"] = tasks.DataConfig.from_dict(conf["data"]) if conf.get("data") else None
  return conf


# ---------------------------------------------------------------------------------------------------
# comparisons and summaries


def check_start_allocation(method: str, start: float, cr: float) -> None:
  """``TrainConfig.start_allocation`` must start a SoftLM-type rule (per-layer thresholds) below its target
  CR: at or above it the budget is met at step 0 and the thresholds never move (ValueError)."""
  m = parse_method(method)
  if m.rule is None or "alpha" not in rules.get(m.rule).keys:
    raise ValueError(f"start_allocation={start} sets per-layer thresholds (alpha): {method} has none; it applies to "
                     "softlm-type rules")
  if not start < cr:
    raise ValueError(f"start_allocation={start} must be below the target CR {cr} of {method}: at or above it the "
                     "budget is met at step 0 and the thresholds never move")


def check_starts(tcfg: TrainConfig, methods, crs, source_model: Optional[str] = None) -> None:
  """Checks ``tcfg``'s start options against every method and CR of a run before anything trains:
  :func:`check_start_allocation` for each learned rule, :func:`check_start_file` for each compressed
  method, and refuses a learned-length schedule for a joint learned rule (the parser's check and
  :func:`run_comparison`'s); a ``teacher_file`` must exist and hold a readable manifest."""
  if tcfg.teacher_file:
    checkpoint.read_manifest(tcfg.teacher_file)  # FileNotFoundError / CheckpointError naming the file
  for name in methods:
    m = parse_method(name)
    check_schedule(name, tcfg)
    if m.variant == "refit" and tcfg.refit_steps == 0:
      raise ValueError(f"{name} is the decomposition followed by the block refit, but refit_steps is 0: set "
                       "--refit-steps (the lm preset's 32), or use the training-free "
                       f"{m.base}-noft")
    for cr in crs:
      if tcfg.start_allocation is not None and m.rule is not None:
        check_start_allocation(name, tcfg.start_allocation, cr)
      if tcfg.start_file and m.compressed:
        check_start_file(tcfg.start_file, name, cr, source_model)


def check_schedule(method: str, tcfg: TrainConfig) -> None:
  """Refuses ``tcfg.lr_schedule`` other than constant for a joint learned rule, whose length depends on
  when its budget is met (ValueError naming the method and the fix)."""
  if parse_method(method).joint and tcfg.lr_schedule != "constant":
    raise ValueError(f"{method}: lr_schedule={tcfg.lr_schedule!r} needs a run of known length, but a joint learned "
                     "rule ends finetune_steps after its budget is met: use --lr-schedule constant (the lm-softlm "
                     "and glue presets' schedule) for it")


def check_start_file(path: str, method: str, cr: float, source_model: Optional[str] = None) -> dict:
  """The manifest of ``TrainConfig.start_file`` after checking that ``method`` at ``cr`` may start from it:
  a ``static`` / ``allocated`` method of the same base, target CR and source model (ValueError naming
  what differs and the file; FileNotFoundError / CheckpointError for a missing or bad file)."""
  m = parse_method(method)
  if m.base not in STATIC_BASES:
    raise ValueError(f"{method}: only {' / '.join(STATIC_BASES)} start from a compact file (start_file={path!r}); "
                     "a learned rule starts from the decomposition")
  man = checkpoint.read_manifest(path)
  meta = man.get("metadata") or {}
  was_method = str(meta.get("method") or man.get("method") or "").partition("-")[0]
  was_cr, was_source = man.get("target_ratio"), meta.get("source_model") or man.get("source_model")
  differs = None
  if was_method != m.base:
    differs = ("method", was_method, m.base)
  elif was_cr is None or abs(float(was_cr) - float(cr)) >= 1e-9:
    differs = ("CR", was_cr, cr)
  elif was_source is not None and source_model is not None and was_source != source_model:  # unknown: not checked
    differs = ("source model", was_source, source_model)
  if differs:
    what, had, want = differs
    raise ValueError(f"start_file {path} holds {what} {had!r}, this run's {method} has {want!r}: pass a file "
                     f"made by the same method, model and CR (softlm compress --method {m.base} --cr {cr})")
  return man


def compresses_teacher(method: Method, tcfg: TrainConfig) -> bool:
  """Whether ``method`` compresses the teacher (a classifier's fine-tuned ``dense`` run; an LM's dense
  model): a frozen-weight method, or any compressed method under ``compress_from="teacher"``."""
  return method.frozen or (method.compressed and tcfg.compress_from == "teacher")


def load_teacher(path: str, dense) -> dict:
  """The params of a teacher checkpoint (``TrainConfig.teacher_file``), checked against the dense tree:
  ValueError naming the first leaf missing, extra or of another shape."""
  got = checkpoint.load_compact(path)[0]
  want, have = tree.flatten(dense), tree.flatten(got)
  for k in sorted(set(want) | set(have)):
    if k not in have or k not in want or np.shape(have[k]) != np.shape(want[k]):
      what = ("is missing" if k not in have else "is not in the dense model" if k not in want else
              f"has shape {np.shape(have[k])}, the dense model's {np.shape(want[k])}")
      raise ValueError(f"teacher_file {path}: leaf '{k}' {what}; pass a checkpoint of the same model (a dense-ft "
                       "run's teacher.safetensors)")
  return jax.tree.map(jnp.asarray, got)


def needs_teacher(task: tasks.Task, tcfg: TrainConfig, methods) -> bool:
  """Whether a run needs a classifier's fine-tuned dense teacher: distillation, or a method that
  :func:`compresses_teacher`; never with ``teacher_file``."""
  if tcfg.teacher_file:
    return False
  return task.dense_trains and (tcfg.distill[0] > 0 or any(compresses_teacher(parse_method(n), tcfg)
                                                           for n in methods))


def order_methods(names: list[str], task: tasks.Task, teacher_first: bool) -> list[str]:
  """Run order: a classifier's dense teacher first (``teacher_first``: :func:`needs_teacher`), then
  the learned rules trained with the weights (they set the step budget), the rest, ``R-ft`` and
  ``R-alloc-ft`` last."""
  methods = [parse_method(n) for n in dict.fromkeys(names)]

  def key(m: Method):
    return (not (teacher_first and m.name == "dense"), not m.joint, m.tunes_export)
  return [m.name for m in sorted(methods, key=key)]


def run_comparison(model, task: tasks.Task, ccfg: CompressionConfig, tcfg: TrainConfig, methods: list[str],
                   crs: list[float], out: str, *, cr_folders: Optional[bool] = None, run_info: Optional[dict] = None,
                   title: Optional[str] = None, log: Callable[[str], None] = print,
                   recipes: Optional[dict] = None) -> dict:
  """Every method at every CR (dense-type methods once), in :func:`order_methods` order; writes the
  run folder's summary. Returns ``{folder name: results}``. A classifier task that needs a teacher
  (distillation, frozen-weight methods) and has no ``dense`` method gets one."""
  t0 = time.time()
  os.makedirs(out, exist_ok=True)
  crs = list(crs)
  cr_folders = len(crs) > 1 if cr_folders is None else cr_folders
  names = list(methods)
  check_recipes(ccfg, tcfg, names, crs, recipes, model.manifest()[0].get("source_model"))
  teacher_first = needs_teacher(task, tcfg, names)
  if teacher_first and "dense" not in names:
    log("[dense] added: the compressed methods need the fine-tuned dense teacher")
    names = ["dense"] + names
  comp = Comparison(model, task, ccfg, tcfg, out, cr_folders=cr_folders, run_info=run_info, log=log,
                    recipes=recipes)
  results, misses = {}, []
  for i, cr in enumerate(crs):
    for name in order_methods(names, task, teacher_first):
      m = parse_method(name)
      if not m.compressed and i > 0:
        continue
      res = comp.run_method(name, cr, enforce=False)
      results[os.path.basename(comp.folder(m, cr))] = res
      miss = comp.budget_miss(res)
      if miss:
        misses.append(miss)
        log(f"[{name}] {miss}")
      log(json.dumps({k: res.get(k) for k in ("method", "cr", "metrics", "train_steps", "wall_s")}))
      write_summary(out, results, title=title or default_title(model, task, crs), wall_s=time.time() - t0)
  if misses:
    raise BudgetMissError("; ".join(misses))
  return results


def default_title(model, task: tasks.Task, crs: list) -> str:
  d = task.describe()
  split = d.get("eval_split") or ", ".join(d.get("eval_splits", {}))
  return f"{model.name} on {task.name} ({split}), CR {', '.join(str(c) for c in crs)}"


def summary_row(res: dict) -> dict:
  """One table row: method, CR, budget columns, every split's metrics, steps, wall time."""
  cells = {}
  by_split = res["metrics"]
  if by_split and not isinstance(next(iter(by_split.values())), dict):  # flat metrics: an older results.json
    by_split = {"dev": by_split}
  for split, ms in by_split.items():
    prefix = "" if len(by_split) == 1 else f"{split} "
    cells.update({f"{prefix}{k}": round(v, 4) for k, v in ms.items()})
  head = {"method": res["method"], "CR": res.get("cr", 0.0)}
  if res.get("recipe"):
    head["recipe"] = res["recipe"]
  row = report.summary_row(res, head, cells)
  verdict = (res.get("budget") or {}).get("verdict")
  if verdict and not verdict["met"]:
    row["budget"] = "NOT MET"
  return row


def write_summary(out: str, results: dict, *, title: str, wall_s: float) -> str:
  """``summary.md``, ``summary.json`` and ``comparison.png`` of ``{folder: results}``; returns the table."""
  rows = [summary_row(r) for r in results.values()]
  cols = list(dict.fromkeys(c for r in rows for c in r))
  table = report.markdown_table(rows, cols)
  misses = [r["budget"]["verdict"]["why"] for r in results.values()
            if (r.get("budget") or {}).get("verdict") and not r["budget"]["verdict"]["met"]]
  notes = "".join(f"\n**{m}**\n" for m in misses)
  files.write_text(f"# {title}\n\nwall time (all methods, incl. loading and tokenizing): {wall_s:.0f} s\n\n"
                   f"{table}{notes}", os.path.join(out, "summary.md"))
  files.write_json({"title": title, "wall_s": wall_s, "rows": rows}, os.path.join(out, "summary.json"))
  report.comparison_plot(results, os.path.join(out, "comparison.png"), title=title)
  return table

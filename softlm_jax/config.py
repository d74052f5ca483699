"""Compression configuration and layer selection.

Names follow the SoftLM paper (arXiv 2411.10543): ``alpha`` is the per-layer learnable threshold on
singular values, ``sharpness`` is the paper's ``s`` (called ``k`` in this project's docs) in
``Th(x) = x * tanh(k (x - alpha))``, ``gamma`` weighs the compression loss, ``target_ratio`` is the
compression ratio CR (the fraction of the selected layers' dense kernel parameters to remove).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Union

from softlm_jax import registry

#: Default selection: every kernel inside a numbered block of a transformer / SSM stack.
#: Matches HF BERT ``encoder/layer/3/...``, GPT-2 ``h/3/...``, Llama/Mamba ``layers/3/...``.
DEFAULT_INCLUDE = r"(^|/)(layer|layers|h|blocks?)/\d+/"
#: Never compressed by default: embeddings, LM heads, poolers and classifier heads.
DEFAULT_EXCLUDE = r"(embed|wte|wpe|lm_head|pooler|classifier|score|qa_outputs)"

LOSSES = ("adaptive", "linear")
#: What each layer's spectrum is divided by before thresholding (so ``alpha`` and ``sharpness`` are
#: unitless): ``"top"`` its largest value, ``"energy"`` ``sqrt(sum s^2)``, ``"uniform_rank"`` the
#: first value the uniform keep-ratio at ``target_ratio`` drops (so ``alpha = 1`` in every layer is
#: exactly the static-SVD allocation), ``"none"`` raw values (the paper).
NORMALIZATIONS = ("top", "energy", "uniform_rank", "none")


def __getattr__(name):
  """``METHODS`` / ``DECOMPOSITIONS``: the names registered now (:data:`softlm_jax.registry.METHODS`,
  filled by :mod:`softlm_jax.rules`: "softlm", "llrc", ...; :data:`softlm_jax.registry.DECOMPOSITIONS`,
  filled by :mod:`softlm_jax.svd`: "svd", "whitened", ...); the registries are the one source, these are
  read from them on each access."""
  if name == "METHODS":
    return registry.METHODS.names()
  if name == "DECOMPOSITIONS":
    return registry.DECOMPOSITIONS.names()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
  """What to compress and how.

  Attributes:
    target_ratio: CR in (0, 1): fraction of the selected layers' dense kernel parameters to remove.
      The parameter target is ``floor((1 - CR) * sum_l m_l * n_l)``.
    sharpness: ``k`` in ``Th(s) = s * tanh(k (s - alpha))``. With ``normalize=True`` (default) it acts
      on singular values divided by the layer's largest one at decomposition time, so ``k`` is unitless
      and one value fits every layer and model.
    normalize: what each layer's spectrum is divided by (the scale is folded into the right factor, so
      the represented kernel is unchanged); one of :data:`NORMALIZATIONS`. ``"top"`` (``True``, the
      default): its largest value, so alpha reads as "fraction of the layer's top singular value".
      ``"uniform_rank"``: the first singular value the uniform keep-ratio drops, so ``alpha = 1``
      everywhere is the static baseline's allocation and alphas rising together stay near it (the
      choice for whitened spectra, whose top values activation outliers inflate). ``"energy"``:
      ``sqrt(sum s^2)``. ``"none"`` (``False``): raw singular values as in the paper.
    decomposition: a name registered in :mod:`softlm_jax.svd`: ``"svd"`` (plain SVD of the kernel) or
      ``"whitened"`` (SVD of ``S^T W`` with ``S S^T`` the calibration Gram, see
      :func:`softlm_jax.svd.whitened_factors`; pass ``grams=`` from :func:`softlm_jax.collect_grams`
      or ``calibration=`` a :class:`softlm_jax.calib.Calibration`). The selection rules, counting and
      export only see ``left, s, right`` and are the same for all.
    gram_floor: whitened: eigenvalues of each Gram are clipped at ``gram_floor * max eigenvalue``
      (directions the calibration never excited get a small, finite weight; rank-deficient Grams
      decompose).
    gram_damp: whitened: ``gram_damp * mean(diag(G))`` is added to the Gram's diagonal before the
      factorisation (GPTQ-style damping: a blend towards plain SVD, for small calibration sets).
    floor: the paper's constant ``c`` used below the threshold (0 in the paper).
    gamma: weight of the compression loss: ``L = L_task + gamma * L_cmp`` (LLRC: of the budget term).
    alpha_lr: learning rate of the thresholds (their own optax partition).
    loss: ``"adaptive"`` (``sum exp(-alpha)``, paper eq. 9) or ``"linear"`` (``-sum alpha``, eq. 8).
    init_rank: ``"full"`` (min(m, n)), ``"break_even"`` (floor(mn/(m+n)): factors cost no more than
      the dense kernel) or an int (clipped to min(m, n)).
    method: the selection rule, a name registered in :mod:`softlm_jax.rules`: ``"softlm"`` (a learned
      threshold per layer, weights fine-tuned; arXiv 2411.10543) or ``"llrc"`` (a learned mask per
      singular value, weights frozen; Sundrani, Tudisco, Minervini). All share decomposition,
      interception, counting and export; they differ in what a layer learns (``alpha`` vs
      ``mask_logits``), the compression loss (:func:`softlm_jax.compression_loss`) and what trains.
    mask_lr: LLRC: learning rate of the mask logits (the only trained parameters).
    mask_temperature: LLRC: ``T`` in the relaxed mask ``sigmoid(logit / T)``; the forward pass uses
      the hard mask ``logit > 0`` with the relaxed one's gradient (straight-through).
    mask_init: LLRC: ``(first, last)`` initial logits, linear in the singular-value index, both > 0
      so the model starts exactly dense and the tail is the first to be dropped.
    tv_weight: LLRC: weight of the total-variation term (kept values form a prefix).
    budget_growth: LLRC: the budget term's weight at update ``t`` is
      ``gamma * min(budget_growth**t, 1e6)`` while the hard count is over the target: a price that
      rises until the budget is met (like dual ascent on the constraint), so a fixed ``gamma`` need
      not be tuned against the distillation loss's scale. 1.0 keeps ``gamma`` constant.
    compress_steps: a gentler schedule (0: off). The counted parameters may fall no faster than a
      ramp from the dense count to the target over ``compress_steps`` updates: at update ``t`` the
      selection (``alpha`` / ``mask_logits``) is held whenever the count is already at or under
      ``dense - (dense - target) * min(1, (t + 1) / compress_steps)``, so the weights have time to
      follow the cut. The freeze at the final target is exactly as without it.
    include: regex searched in each kernel's '/'-joined path; ``None`` = ``DEFAULT_INCLUDE``
      restricted to 2-D kernels. An explicit pattern that selects a non-2-D kernel is an error.
    exclude: regex; matching paths are never selected. ``None`` = ``DEFAULT_EXCLUDE``.
  """

  target_ratio: float = 0.5
  sharpness: float = 1000.0
  normalize: Union[bool, str] = "top"
  decomposition: str = "svd"
  gram_floor: float = 1e-6
  gram_damp: float = 0.0
  floor: float = 0.0
  gamma: float = 1.0
  alpha_lr: float = 5e-3
  loss: str = "adaptive"
  init_rank: Union[str, int] = "full"
  method: str = "softlm"
  mask_lr: float = 5e-2
  mask_temperature: float = 1.0
  mask_init: tuple = (3.0, 1.0)
  tv_weight: float = 1e-3
  budget_growth: float = 1.0
  compress_steps: int = 0
  include: Optional[str] = None
  exclude: Optional[str] = None

  def __post_init__(self):
    if not (isinstance(self.target_ratio, (int, float)) and 0.0 < self.target_ratio < 1.0):
      raise ValueError(f"target_ratio must be in (0, 1) (fraction of parameters to remove), "
                       f"got {self.target_ratio!r}")
    if isinstance(self.normalize, bool):
      object.__setattr__(self, "normalize", "top" if self.normalize else "none")
    if self.normalize not in NORMALIZATIONS:
      raise ValueError(f"unknown normalize {self.normalize!r}; expected one of {NORMALIZATIONS} (or a bool)")
    registry.DECOMPOSITIONS.get(self.decomposition)  # raises "unknown decomposition ..., expected one of ..."
    if not (0.0 <= self.gram_floor < 1.0 and self.gram_damp >= 0.0):
      raise ValueError(f"need 0 <= gram_floor < 1 and gram_damp >= 0, got {self.gram_floor!r}, {self.gram_damp!r}")
    if not self.sharpness > 0:
      raise ValueError(f"sharpness must be > 0, got {self.sharpness!r}")
    if self.gamma < 0:
      raise ValueError(f"gamma must be >= 0, got {self.gamma!r}")
    if not self.alpha_lr > 0:
      raise ValueError(f"alpha_lr must be > 0, got {self.alpha_lr!r}")
    if self.loss not in LOSSES:
      raise ValueError(f"unknown loss {self.loss!r}; expected one of {LOSSES}")
    if isinstance(self.init_rank, bool) or not (
        self.init_rank in ("full", "break_even") or (isinstance(self.init_rank, int) and self.init_rank > 0)):
      raise ValueError(f"init_rank must be 'full', 'break_even' or a positive int, got {self.init_rank!r}")
    registry.METHODS.get(self.method)  # raises "unknown method ..., expected one of ..."
    if not (self.mask_lr > 0 and self.mask_temperature > 0 and self.tv_weight >= 0):
      raise ValueError(f"need mask_lr > 0, mask_temperature > 0, tv_weight >= 0; got {self.mask_lr!r}, "
                       f"{self.mask_temperature!r}, {self.tv_weight!r}")
    if not self.budget_growth >= 1.0:
      raise ValueError(f"budget_growth must be >= 1 (1 keeps gamma constant), got {self.budget_growth!r}")
    if isinstance(self.compress_steps, bool) or not (isinstance(self.compress_steps, int) and self.compress_steps >= 0):
      raise ValueError(f"compress_steps must be an int >= 0 (0: no ramp), got {self.compress_steps!r}")
    if len(tuple(self.mask_init)) != 2 or min(self.mask_init) <= 0:
      raise ValueError(f"mask_init must be (first, last) logits, both > 0 (the mask starts all ones), "
                       f"got {self.mask_init!r}")
    for name in ("include", "exclude"):
      pattern = getattr(self, name)
      if pattern is not None:
        try:
          re.compile(pattern)
        except re.error as e:
          raise ValueError(f"{name} is not a valid regex: {pattern!r} ({e})") from None

  @property
  def include_re(self) -> re.Pattern:
    return re.compile(self.include if self.include is not None else DEFAULT_INCLUDE)

  @property
  def exclude_re(self) -> re.Pattern:
    return re.compile(self.exclude if self.exclude is not None else DEFAULT_EXCLUDE)

  def matches(self, path: str) -> bool:
    """Whether the module at ``path`` ('/'-joined, without the leaf name) is selected by the regexes."""
    return bool(self.include_re.search(path + "/")) and not self.exclude_re.search(path)

  def replace(self, **changes) -> "CompressionConfig":
    return dataclasses.replace(self, **changes)

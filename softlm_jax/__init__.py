"""softlm-jax: learned per-layer low-rank SVD compression for Flax models (Linen, HF Flax and NNX).

Selection rules (:mod:`softlm_jax.rules`; built in, :mod:`softlm_jax.builtin_rules`: SoftLM's learned
thresholds, arXiv 2411.10543, and LLRC's learned singular-value masks with frozen weights) on one
decomposition (:mod:`softlm_jax.svd`), interception, counting and export core.
"""
from softlm_jax._version import __version__ as __version__
from softlm_jax.builtin_rules import llrc_loss, refill_to_target
from softlm_jax.api import compress_params, count_params, export_params, load_module, save_module
from softlm_jax.budget import (break_even_rank, budget_report, dense_params,
                               effective_rank, kept, layer_cost, layer_ranks, relaxed_count,
                               target_params, uniform_rank)
from softlm_jax.calib import Calibration, Grams, collect_grams
from softlm_jax.checkpoint import CheckpointError, load_compact, save_compact
from softlm_jax.compress import init_rank
from softlm_jax.config import CompressionConfig
from softlm_jax.export import static_ranks, static_svd
from softlm_jax.intercept import factored_apply, intercept, register_layout
from softlm_jax.nnx_bridge import LinearMap, NNXModel
from softlm_jax.losses import adaptive_loss, compression_loss, distillation_loss, linear_loss, total_variation
from softlm_jax.optim import BudgetState, budget_freeze, budget_state, make_optimizer, ramp_target
from softlm_jax.rules import Rule, singular_scale
from softlm_jax.shard import make_mesh
from softlm_jax.stream import stream_layers
from softlm_jax.svd import Decomposition, decompose, whitened_factors
from softlm_jax.threshold import hard_threshold, relaxed_mask, soft_threshold, straight_through_mask

__all__ = [
    "BudgetState", "Calibration", "CheckpointError", "CompressionConfig", "Decomposition", "Grams", "LinearMap",
    "NNXModel", "Rule", "load_module", "save_module",
    "collect_grams", "decompose", "ramp_target", "uniform_rank",
    "whitened_factors", "adaptive_loss", "break_even_rank", "budget_freeze", "budget_report", "budget_state",
    "compress_params", "compression_loss", "count_params",
    "dense_params", "distillation_loss", "effective_rank", "export_params", "factored_apply",
    "hard_threshold", "init_rank", "intercept", "kept", "layer_cost", "layer_ranks", "linear_loss",
    "llrc_loss", "load_compact", "make_mesh", "make_optimizer", "refill_to_target", "register_layout",
    "relaxed_count", "relaxed_mask", "save_compact", "singular_scale", "soft_threshold", "static_ranks", "static_svd",
    "stream_layers", "straight_through_mask", "target_params", "total_variation",
]

from softlm_jax import (calib, checkpoint, data, metrics, models, report, rules, shard, stream, svd,  # noqa: E402,F401
                        train, tree)
from softlm_jax import propagate  # noqa: E402,F401  (registers decomposition="propagated")

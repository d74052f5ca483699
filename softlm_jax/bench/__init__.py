"""Inference latency, memory, power and training cost of compressed models, next to the ideal bound.

Every ratio is measured in one process, with the cases interleaved (one repetition of each case in
turn, the order rotated every repetition) so that load on a shared machine hits all of them alike.
Each case is compiled ahead of time (``jax.jit(f).lower(...).compile()``: compile time kept apart,
peak memory from XLA's ``memory_analysis``), warmed up, then timed with ``block_until_ready``.

Beside each measured speed-up it reports two bounds:

* ``flop_ratio``: multiply-adds of the compressed linears over the dense ones (every linear sees the
  same tokens, so this is also their parameter ratio); ``1 / flop_ratio`` is the linears' ideal
  speed-up.
* ``amdahl_bound``: ``1 / (o + (1 - o) * flop_ratio)`` with ``o`` the measured share of the dense
  model's time spent outside the compressed linears. ``o`` comes from the "outside" case: the dense
  model with each compressed linear's matmul replaced by a copy of its input widened to the output
  size (bias kept), so everything else (attention, norms, activations, embeddings, LM head, cache
  updates) runs as before.

API: :func:`run_benchmark` (inference grid of one model), :func:`train_cost` (SoftLM train step vs
dense fine-tuning: time and peak memory), :func:`compress_cost` (``compress_params`` vs numpy's
LAPACK SVD of the same matrices), :func:`power_probe`. CLI::

  python -m softlm_jax.bench --model bert-base --batch 8 --seq 128 --out runs/bench/bert-base
  python -m softlm_jax.bench --model gpt2-medium --grid full --out runs/bench/gpt2-medium
  python -m softlm_jax.bench --help

Modules, one measurement each: :mod:`.latency` (inference time, the outside share, the Amdahl bound),
:mod:`.memory` (XLA peak bytes, weight bytes), :mod:`.power` (NVIDIA power and energy), :mod:`.step_cost`
(training step and ``compress_params`` cost); shared: :mod:`.timing` (interleaved rounds, paired
speed-ups), :mod:`.models`, :mod:`.variants`, :mod:`.machine`, :mod:`.report`, :mod:`.cli`.
"""
from softlm_jax.bench.cli import main, parse, set_xla_flags
from softlm_jax.bench.latency import run_benchmark, skip_linears
from softlm_jax.bench.machine import device_info, loadavg, versions
from softlm_jax.bench.memory import linear_bytes, memory_stats, tree_bytes
from softlm_jax.bench.models import DECODERS, MODELS, BenchModel, build_model, mamba_available
from softlm_jax.bench.power import measure_power, power_probe
from softlm_jax.bench.report import collect, markdown_table, plot_speedup, summary_table, write_json
from softlm_jax.bench.step_cost import compress_cost, train_cost
from softlm_jax.bench.timing import Case, paired_speedup, summarize, time_interleaved
from softlm_jax.bench.variants import flop_ratio, linear_shapes, load_softlm_params, make_variants, random_factors

__all__ = [
    "DECODERS", "MODELS", "BenchModel", "Case", "build_model", "collect", "compress_cost", "device_info",
    "flop_ratio", "linear_bytes", "linear_shapes", "load_softlm_params", "loadavg", "main", "make_variants",
    "mamba_available", "markdown_table", "measure_power", "memory_stats", "paired_speedup", "parse",
    "plot_speedup", "power_probe", "random_factors", "run_benchmark", "set_xla_flags", "skip_linears",
    "summarize", "summary_table", "time_interleaved", "train_cost", "tree_bytes", "versions", "write_json",
]

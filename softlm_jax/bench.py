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
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from softlm_jax import budget, tree
from softlm_jax.compress import compress_params, decompose
from softlm_jax.config import CompressionConfig
from softlm_jax.export import _emit, export_params, static_ranks, static_svd
from softlm_jax.intercept import _layout, apply_mode, intercept

# --------------------------------------------------------------------------------------------------
# Machine and versions
# --------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_info() -> dict:
  """The accelerator jax runs on and the host CPU."""
  d = jax.devices()[0]
  try:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    mem = None
  return {"platform": d.platform, "device_kind": getattr(d, "device_kind", ""), "device": str(d),
          "num_devices": jax.device_count(), "cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
          "host_memory_bytes": mem, "hostname": platform.node(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def versions() -> dict:
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "transformers", "numpy", "softlm_jax"):
    try:
      out[name] = importlib.import_module(name).__version__
    except Exception:  # noqa: BLE001 (a missing optional package is reported, not fatal)
      out[name] = None
  return out


def loadavg() -> Optional[list[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


# --------------------------------------------------------------------------------------------------
# Model shapes (random weights: timings depend on shapes only)
# --------------------------------------------------------------------------------------------------

#: name -> family and config. "minilm" is the real all-MiniLM-L6-v2 (the checkpoint of a SoftLM run
#: fits its tree); "tiny-*" are for tests.
MODELS: dict[str, dict] = {
    "bert-base": {"family": "bert", "config": dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512)},
    "gpt2-medium": {"family": "gpt2", "config": dict(
        vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024)},
    "tinyllama-1.1b": {"family": "llama", "config": dict(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048)},
    "mamba-130m": {"family": "mamba", "config": dict(
        vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2)},
    "minilm": {"family": "bert", "real": True},
    "tiny-bert": {"family": "bert", "config": dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64)},
    "tiny-gpt2": {"family": "gpt2", "config": dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)},
    "tiny-llama": {"family": "llama", "config": dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)},
    "tiny-mamba": {"family": "mamba", "config": dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2)},
}

DECODERS = ("gpt2", "llama", "mamba")


def _hf_classes(family: str):
  import transformers as tf
  return {"bert": (tf.BertConfig, tf.FlaxBertForSequenceClassification),
          "gpt2": (tf.GPT2Config, tf.FlaxGPT2LMHeadModel),
          "llama": (tf.LlamaConfig, tf.FlaxLlamaForCausalLM)}[family]


def _cast(params, dtype):
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


@dataclasses.dataclass
class BenchModel:
  """One model: its forward (logits), decode step and training logits as functions of ``params``."""
  name: str
  family: str
  module: Any
  params: Any
  config: dict
  dtype: str = "float32"

  @property
  def decoder(self) -> bool:
    return self.family in DECODERS

  @property
  def vocab(self) -> int:
    return int(self.config.get("vocab_size", 97))

  def forward(self, params, ids):
    if self.family == "mamba":
      return self.module.apply({"params": params}, ids)
    return self.module(ids, params=params, train=False).logits

  def train_logits(self, params, ids, rng):
    if self.family == "mamba":
      return self.module.apply({"params": params}, ids)
    return self.module(ids, params=params, dropout_rng=rng, train=True).logits

  def init_cache(self, batch: int, length: int):
    """Zero decode state for ``batch`` sequences and a KV cache of ``length`` positions."""
    if self.family == "mamba":
      return self.module.init_cache(batch)
    shapes = jax.eval_shape(lambda: self.module.init_cache(batch, length))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def decode(self, params, cache, ids, pos):
    """One token per sequence: ``ids (batch, 1)``, ``pos (batch, 1)`` -> ``(logits, cache)``."""
    if self.family == "mamba":
      return self.module.decode_step(params, ids[:, 0], cache)
    length = next(x for x in jax.tree.leaves(cache) if np.ndim(x) == 4).shape[1]  # (batch, len, heads, dim)
    mask = jnp.ones((ids.shape[0], length), jnp.int32)
    out = self.module(ids, attention_mask=mask, position_ids=pos, params=params, past_key_values=cache,
                      train=False)
    return out.logits, out.past_key_values


def mamba_available() -> bool:
  try:
    importlib.import_module("softlm_jax.models.mamba")
    return True
  except ImportError:
    return False


def build_model(name: str, dtype: str = "float32", seed: int = 0) -> BenchModel:
  """A :data:`MODELS` entry with random weights (``minilm``: the real ones), params in ``dtype``."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
  spec = MODELS[name]
  family, jdt = spec["family"], jnp.dtype(dtype)
  if spec.get("real"):
    from softlm_jax.models import hf
    module, _ = hf.load_classifier("minilm", 2, seed=seed)
    params = module.params
    config = {k: v for k, v in module.config.to_dict().items() if isinstance(v, (int, float, str, bool))}
    if jdt != jnp.float32:
      module = type(module)(module.config, dtype=jdt, _do_init=False)
    return BenchModel(name, family, module, _cast(params, jdt), config, str(jdt))
  config = dict(spec["config"])
  if family == "mamba":
    from softlm_jax.models.mamba import MambaConfig, MambaLM
    module = MambaLM(MambaConfig(**config), dtype=jdt)
    params = jax.jit(module.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  else:
    cfg_cls, model_cls = _hf_classes(family)
    module = model_cls(cfg_cls(**config), seed=seed, dtype=jdt, _do_init=False)
    params = jax.jit(lambda r: module.init_weights(r, (1, 8)))(jax.random.PRNGKey(seed))
  params = jax.tree.map(jnp.asarray, dict(params))
  return BenchModel(name, family, module, _cast(params, jdt), config, str(jdt))


# --------------------------------------------------------------------------------------------------
# Compressed variants
# --------------------------------------------------------------------------------------------------


def random_factors(params: Mapping, cfg: CompressionConfig, ranks: Mapping[str, int], seed: int = 0) -> dict:
  """``decompose``-like factors cut at ``ranks`` without an SVD (timing-equivalent: the exported
  tree has exactly the shapes and dtypes the real SVD gives). For the big shapes, where the SVD of
  every kernel would take minutes and twice the model's memory."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, k in tree.selected_kernels(params, cfg):
    rows, cols = np.shape(k)
    r = max(1, min(int(ranks[path]), rows, cols))
    u = rng.standard_normal((rows, r), np.float32) / np.sqrt(rows)
    vt = rng.standard_normal((r, cols), np.float32) / np.sqrt(cols)
    out[path] = (u, np.linspace(1.0, 0.01, r, dtype=np.float32), vt, np.asarray(k).dtype)
  return out


def _export_random(params, cfg, ranks, rank_multiple):
  factors = random_factors(params, cfg, ranks)

  def convert(path, node):
    if path not in factors or "kernel" not in node:
      return node
    u, s, vt, dtype = factors[path]
    return _emit(node, u * s, vt, dtype, rank_multiple)
  return tree.map_modules(params, convert)


def load_softlm_params(run_dir: str) -> tuple[dict, CompressionConfig]:
  """Training-form params and config of a SoftLM run of ``experiments/glue.py`` (its orbax checkpoint
  in ``<run_dir>/ckpt`` and ``results.json``)."""
  import orbax.checkpoint as ocp
  with open(os.path.join(run_dir, "results.json")) as f:
    conf = json.load(f)["config"]
  cfg = CompressionConfig(target_ratio=conf["cr"], sharpness=conf["sharpness"], gamma=conf["gamma"],
                          alpha_lr=conf["alpha_lr"], loss=conf["loss"])
  mgr = ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "ckpt")))
  step = mgr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {run_dir}/ckpt")
  state = mgr.restore(step, args=ocp.args.StandardRestore())
  return state["params"], cfg


def linear_shapes(params: Mapping, cfg: CompressionConfig) -> dict[str, tuple[int, int]]:
  """(rows, cols) of every selected linear of a dense tree."""
  return {p: tuple(int(d) for d in np.shape(k)) for p, k in tree.selected_kernels(params, cfg)}


def flop_ratio(variant: Mapping, cfg: CompressionConfig) -> float:
  """Multiply-adds per token of the compressed linears over the dense ones. A linear's
  multiply-adds per token equal its counted params (``r (m + n)`` factored, ``m n`` kept dense), so
  this is :func:`softlm_jax.count_params` over :func:`softlm_jax.dense_params`."""
  return int(budget.count_params(variant, cfg)) / budget.dense_params(variant, cfg)


def linear_bytes(variant: Mapping, shapes: Mapping[str, tuple[int, int]]) -> int:
  total = 0
  for path, node in tree.iter_modules(variant):
    if tree.join(path) in shapes:
      total += sum(int(np.asarray(node[k]).nbytes) for k in ("kernel", "left", "right") if k in node)
  return total


def tree_bytes(params) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))


def _suffix(m: int) -> str:
  return "" if m == 1 else f"_m{m}"


def make_variants(bm: BenchModel, crs: Sequence[float], *, softlm_run: Optional[str] = None,
                  rank_multiples: Sequence[int] = (1,), factors: str = "svd",
                  cfg: Optional[CompressionConfig] = None) -> tuple[dict[str, dict], dict]:
  """``{case: {"params", "kind", "cr", ...}}``: dense, ``static_cr<CR>`` for each CR and, with
  ``softlm_run``, the exported SoftLM run (its learned non-uniform ranks); each compressed case once
  per rank multiple (suffix ``_m<multiple>``, ranks rounded down). Returns also timings of the
  preparation (SVD, exports)."""
  cfg = cfg or CompressionConfig()
  prep: dict[str, Any] = {"factors": factors}
  out = {"dense": {"params": bm.params, "kind": "dense", "cr": 0.0, "rank_multiple": 1}}
  t = time.perf_counter()
  fac = decompose(bm.params, cfg) if (crs and factors == "svd") else None
  prep["svd_s"] = time.perf_counter() - t if fac is not None else None
  for cr in crs:
    c = cfg.replace(target_ratio=float(cr))
    for m in rank_multiples:
      t = time.perf_counter()
      if factors == "svd":
        p = static_svd(bm.params, c, factors=fac, rank_multiple=m)
      elif factors == "random":
        p = _export_random(bm.params, c, static_ranks(bm.params, c), m)
      else:
        raise ValueError(f"factors must be 'svd' or 'random', got {factors!r}")
      prep[f"export_cr{cr:g}{_suffix(m)}_s"] = time.perf_counter() - t
      out[f"static_cr{cr:g}{_suffix(m)}"] = {"params": p, "kind": "static_svd", "cr": float(cr),
                                            "rank_multiple": m}
  del fac
  if softlm_run:
    trained, scfg = load_softlm_params(softlm_run)
    shapes = linear_shapes(bm.params, cfg)
    for path, layer in tree.factored_layers(trained):
      if shapes.get(path) != tuple(int(d) for d in budget.layer_shape(layer)):
        raise ValueError(f"the SoftLM run in {softlm_run} does not fit model {bm.name!r}: layer {path} "
                         f"is {budget.layer_shape(layer)} there, {shapes.get(path)} here")
    for m in rank_multiples:
      ex = export_params(trained, scfg, rank_multiple=m)
      out[f"softlm{_suffix(m)}"] = {"params": _cast(ex, jnp.dtype(bm.dtype)), "kind": "softlm",
                                    "cr": scfg.target_ratio, "run": softlm_run, "rank_multiple": m}
  return out, prep


# --------------------------------------------------------------------------------------------------
# The "outside" model: compressed linears skipped
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Skip:
  cfg: CompressionConfig

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or module.scope is None
        or not module.has_variable("params", "kernel")):
      return next_fun(*args, **kwargs)
    layout = _layout(module)
    kernel = module.get_variable("params", "kernel")
    if layout is None or np.ndim(kernel) != 2 or not self.cfg.matches("/".join(module.scope.path)):
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    out = kernel.shape[1] if layout == "in_out" else kernel.shape[0]
    reps = -(-out // x.shape[-1])
    y = jnp.tile(x, (1,) * (x.ndim - 1) + (reps,))[..., :out]
    if module.has_variable("params", "bias"):
      y = y + module.get_variable("params", "bias")
    return y.astype(getattr(module, "dtype", None) or y.dtype)


def skip_linears(cfg: Optional[CompressionConfig] = None):
  """Context: every linear ``cfg`` selects returns its input copied to its output width (+ bias)
  instead of multiplying. Time outside the compressed linears = time of the dense model under it."""
  return nn.intercept_methods(_Skip(cfg or CompressionConfig()))


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def summarize(times: Sequence[float]) -> dict:
  t = np.asarray(times, np.float64)
  med = float(np.median(t))
  p25, p75 = (float(v) for v in np.percentile(t, [25, 75]))
  return {"median_s": med, "p25_s": p25, "p75_s": p75, "min_s": float(t.min()), "max_s": float(t.max()),
          "mean_s": float(t.mean()), "n": int(t.size), "spread": (p75 - p25) / med if med else 0.0}


def memory_stats(compiled) -> dict:
  """XLA's own account of a compiled function's memory (bytes); ``peak_bytes`` = arguments +
  outputs + temporaries - aliased (donated) buffers."""
  try:
    m = compiled.memory_analysis()
  except Exception as e:  # noqa: BLE001 (not every backend implements it)
    return {"error": f"{type(e).__name__}: {e}"}
  if m is None:
    return {"error": "memory_analysis() returned None"}
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
          "generated_code_size_in_bytes")
  out = {k.replace("_size_in_bytes", "_bytes"): int(getattr(m, k, 0) or 0) for k in keys}
  out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
  return out


@dataclasses.dataclass
class Case:
  """A compiled function and the state to call it with. ``call()`` runs once and returns something
  to block on; a case with donated state (decode cache, train state) threads it through."""
  name: str
  fn: Callable
  args: tuple
  donate: tuple = ()
  ctx: Callable = intercept
  compiled: Any = None
  compile_s: float = 0.0
  lower_s: float = 0.0
  memory: dict = dataclasses.field(default_factory=dict)
  carry: Optional[Callable] = None  # (args, out) -> next args

  def compile(self):
    with self.ctx():
      t = time.perf_counter()
      lowered = jax.jit(self.fn, donate_argnums=self.donate).lower(*self.args)
      self.lower_s = time.perf_counter() - t
    t = time.perf_counter()
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t
    self.memory = memory_stats(self.compiled)
    return self

  def call(self):
    out = self.compiled(*self.args)
    if self.carry is not None:
      self.args = self.carry(self.args, out)
    return out


def time_interleaved(cases: Sequence[Case], reps: int, warmup: int = 1) -> dict[str, list[float]]:
  """``reps`` rounds; in each round every case runs once (order rotated each round), timed to
  ``block_until_ready``. Returns the per-round times of each case (paired by index)."""
  for c in cases:
    for _ in range(warmup):
      jax.block_until_ready(c.call())
  times: dict[str, list[float]] = {c.name: [] for c in cases}
  n = len(cases)
  for r in range(reps):
    for i in range(n):
      c = cases[(i + r) % n]
      t = time.perf_counter()
      jax.block_until_ready(c.call())
      times[c.name].append(time.perf_counter() - t)
  return times


def paired_speedup(base: Sequence[float], other: Sequence[float]) -> dict:
  """Per-round ratios ``base / other`` (rounds are interleaved, so load drift cancels)."""
  r = np.asarray(base, np.float64) / np.asarray(other, np.float64)
  return {"median": float(np.median(r)), "p25": float(np.percentile(r, 25)),
          "p75": float(np.percentile(r, 75)), "of_medians": float(np.median(base) / np.median(other))}


# --------------------------------------------------------------------------------------------------
# Power (NVIDIA only)
# --------------------------------------------------------------------------------------------------


def power_probe() -> dict:
  """``{"available": True, "handle": ...}`` when jax runs on an NVIDIA GPU and pynvml answers, else
  ``{"available": False, "skipped": <why>}``."""
  platform_ = jax.devices()[0].platform
  if platform_ != "gpu":
    return {"available": False, "skipped": f"power/energy skipped: no NVIDIA GPU (jax platform "
                                           f"{platform_!r}); they need pynvml on an NVIDIA device"}
  try:
    import pynvml
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(int(getattr(jax.devices()[0], "local_hardware_id", 0) or 0))
    name = pynvml.nvmlDeviceGetName(handle)
  except Exception as e:  # noqa: BLE001
    return {"available": False, "skipped": f"power/energy skipped: pynvml failed ({type(e).__name__}: {e})"}
  return {"available": True, "handle": handle, "gpu": name if isinstance(name, str) else name.decode()}


def measure_power(probe: dict, case: Case, tokens: int, min_seconds: float = 2.0) -> dict:
  """Mean board power (W, sampled every 10 ms) and energy per token (J) while ``case`` runs back to
  back for at least ``min_seconds``; also the idle power just before."""
  import pynvml
  handle = probe["handle"]
  samples: list[float] = []
  stop = threading.Event()

  def sample():
    while not stop.is_set():
      samples.append(pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
      time.sleep(0.01)

  time.sleep(0.5)
  idle = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
  try:
    e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # mJ, Volta and newer
  except Exception:  # noqa: BLE001
    e0 = None
  th = threading.Thread(target=sample, daemon=True)
  th.start()
  calls, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < min_seconds:
    jax.block_until_ready(case.call())
    calls += 1
  wall = time.perf_counter() - t0
  stop.set()
  th.join()
  out = {"idle_power_w": idle, "mean_power_w": float(np.mean(samples)) if samples else None,
         "seconds": wall, "calls": calls, "samples": len(samples)}
  if e0 is not None:
    joules = (pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) - e0) / 1000.0
    out["energy_j"] = joules
  else:
    joules = (out["mean_power_w"] or 0.0) * wall
    out["energy_j_from_samples"] = joules
  out["energy_per_token_j"] = joules / (calls * tokens)
  return out


# --------------------------------------------------------------------------------------------------
# Inference benchmark
# --------------------------------------------------------------------------------------------------


def _forward_fn(bm: BenchModel):
  def f(params, ids):
    return bm.forward(params, ids)
  return f


def _decode_fn(bm: BenchModel):
  def f(params, cache, ids, pos):
    return bm.decode(params, cache, ids, pos)
  return f


def _cases_for(bm: BenchModel, variants: Mapping[str, dict], mode: str, batch: int, seq: int,
               cfg: CompressionConfig, donate: bool) -> list[Case]:
  rng = np.random.RandomState(batch * 1000 + seq)
  ids = jnp.asarray(rng.randint(0, bm.vocab, (batch, seq if mode == "forward" else 1)), jnp.int32)
  out = []
  names = list(variants) + ["outside"]
  for name in names:
    params = variants["dense" if name == "outside" else name]["params"]
    ctx = (lambda: skip_linears(cfg)) if name == "outside" else intercept
    if mode == "forward":
      out.append(Case(name, _forward_fn(bm), (params, ids), ctx=ctx))
    else:
      cache = bm.init_cache(batch, seq)
      pos = jnp.full((batch, 1), seq // 2, jnp.int32)
      out.append(Case(name, _decode_fn(bm), (params, cache, ids, pos), donate=(1,) if donate else (),
                      ctx=ctx, carry=lambda a, o: (a[0], o[1], a[2], a[3])))
  return out


def run_benchmark(model: str = "bert-base", *, batches: Sequence[int] = (8,), seqs: Sequence[int] = (128,),
                  crs: Sequence[float] = (0.25, 0.5, 0.75), decode: Optional[bool] = None,
                  forward: bool = True, reps: int = 7, warmup: int = 2, dtype: str = "float32",
                  rank_multiples: Sequence[int] = (1,), factors: str = "svd", softlm_run: Optional[str] = None,
                  donate: bool = True, power: bool = True, bm: Optional[BenchModel] = None,
                  log: Callable[[str], None] = print) -> dict:
  """Times the dense model against its compressed exports for every (mode, batch, seq).

  ``mode`` is ``"forward"`` (whole sequence: encoder, or decoder prefill) and, for decoders with
  ``decode`` (default: on for decoders), ``"decode"`` (one token per sequence with a KV cache of
  ``seq`` positions, the cache donated when ``donate``). Returns the JSON-able result (see
  BENCHMARKS.md "Performance" for the fields).
  """
  t_start = time.perf_counter()
  load0 = loadavg()
  cfg = CompressionConfig()
  t = time.perf_counter()
  bm = bm or build_model(model, dtype)
  build_s = time.perf_counter() - t
  variants, prep = make_variants(bm, crs, softlm_run=softlm_run, rank_multiples=rank_multiples,
                                 factors=factors, cfg=cfg)
  shapes = linear_shapes(bm.params, cfg)
  probe = power_probe() if power else {"available": False, "skipped": "power/energy not requested"}
  dense_bytes, dense_lin = tree_bytes(bm.params), linear_bytes(bm.params, shapes)
  meta = {}
  for name, v in variants.items():
    p = v["params"]
    fr = flop_ratio(p, cfg)
    ranks = {path: int(np.shape(layer["left"])[1]) for path, layer in tree.factored_layers(p)}
    meta[name] = {"kind": v["kind"], "cr": v["cr"], "rank_multiple": v["rank_multiple"], "flop_ratio": fr,
                  "ideal_linear_speedup": 1.0 / fr,
                  "weight_bytes": tree_bytes(p), "linear_weight_bytes": linear_bytes(p, shapes),
                  "weight_saving": 1.0 - tree_bytes(p) / dense_bytes,
                  "linear_weight_saving": 1.0 - linear_bytes(p, shapes) / dense_lin,
                  "factored_layers": len(ranks), "dense_layers": len(shapes) - len(ranks),
                  "ranks": sorted(set(ranks.values()))}
    if "run" in v:
      meta[name]["run"] = v["run"]
  modes = (["forward"] if forward else []) + (["decode"] if (bm.decoder if decode is None else decode) else [])
  results = []
  for mode in modes:
    for batch in batches:
      for seq in seqs:
        label = f"{mode} b{batch} s{seq}"
        t = time.perf_counter()
        cases = [c.compile() for c in _cases_for(bm, variants, mode, batch, seq, cfg, donate)]
        log(f"[bench] {bm.name} {label}: compiled {len(cases)} cases in {time.perf_counter() - t:.1f}s "
            f"(load {loadavg()})")
        load_before = loadavg()
        t = time.perf_counter()
        times = time_interleaved(cases, reps, warmup)
        timed_s = time.perf_counter() - t
        tokens = batch * (seq if mode == "forward" else 1)
        dense_t, outside_t = times["dense"], times["outside"]
        o = float(np.median(outside_t) / np.median(dense_t))
        for c in cases:
          row = {"mode": mode, "batch": batch, "seq": seq, "case": c.name, "tokens": tokens,
                 **summarize(times[c.name]), "times_s": times[c.name], "compile_s": c.compile_s,
                 "lower_s": c.lower_s, "memory": c.memory, "us_per_token": 1e6 * np.median(times[c.name]) / tokens}
          if c.name == "outside":
            row.update(kind="outside", outside_share=o)
          else:
            m = meta[c.name]
            sp = paired_speedup(dense_t, times[c.name])
            oc = min(max(o, 0.0), 1.0)  # a share outside [0, 1] is timing noise (tiny models)
            bound = 1.0 / (oc + (1.0 - oc) * m["flop_ratio"])
            lin_dense = np.median(dense_t) - np.median(outside_t)
            lin_case = np.median(times[c.name]) - np.median(outside_t)
            row.update({k: m[k] for k in ("kind", "cr", "rank_multiple", "flop_ratio", "ideal_linear_speedup",
                                          "weight_bytes", "weight_saving", "linear_weight_bytes",
                                          "linear_weight_saving")},
                       speedup=sp["median"], speedup_p25=sp["p25"], speedup_p75=sp["p75"],
                       speedup_of_medians=sp["of_medians"], amdahl_bound=bound,
                       outside_share=o, of_bound=sp["median"] / bound,
                       linear_speedup_measured=float(lin_dense / lin_case) if lin_case > 0 else None)
          if probe["available"] and c.name != "outside":
            row["power"] = measure_power(probe, c, tokens)
          elif c.name != "outside":
            row["power"] = {"skipped": probe["skipped"]}
          results.append(row)
        if probe["available"]:
          dense_e = next(r for r in results[-len(cases):] if r["case"] == "dense")["power"]["energy_per_token_j"]
          for r in results[-len(cases):]:
            if "energy_per_token_j" in r.get("power", {}):
              r["power"]["energy_saving"] = 1.0 - r["power"]["energy_per_token_j"] / dense_e
        log(f"[bench] {bm.name} {label}: timed {reps} rounds in {timed_s:.1f}s; " + ", ".join(
            f"{r['case']} {1e3 * r['median_s']:.2f}ms" + (f" x{r['speedup']:.2f} (bound {r['amdahl_bound']:.2f})"
                                                          if "speedup" in r else "")
            for r in results[-len(cases):]))
        for c in cases:  # free donated caches before the next grid point
          c.args = c.compiled = None
        results[-1]["load_before"] = load_before
  power_note = {k: v for k, v in probe.items() if k != "handle"}
  return {
      "kind": "inference", "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "device": device_info(), "versions": versions(),
      "config": {"model": bm.name, "family": bm.family, "model_config": bm.config, "dtype": bm.dtype,
                 "batches": list(batches), "seqs": list(seqs), "crs": [float(c) for c in crs],
                 "modes": modes, "reps": reps, "warmup": warmup, "rank_multiples": list(rank_multiples),
                 "factors": factors, "softlm_run": softlm_run, "donate_cache": donate,
                 "selected_linears": len(shapes), "dense_linear_params": sum(m * n for m, n in shapes.values()),
                 "compression": dataclasses.asdict(cfg)},
      "variants": meta, "power": power_note, "cases": results,
      "loadavg": {"start": load0, "end": loadavg()},
      "timing": {"build_s": build_s, **prep, "total_s": time.perf_counter() - t_start},
  }


# --------------------------------------------------------------------------------------------------
# Training cost and compress_params cost
# --------------------------------------------------------------------------------------------------


def _task_loss(bm: BenchModel):
  def loss(p, batch, rng):
    logits = bm.train_logits(p, batch["ids"], rng)
    if bm.decoder:  # next-token cross-entropy
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["ids"][:, 1:]).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
  return loss


def train_cost(model: str = "minilm", *, batch: int = 32, seq: int = 128, reps: int = 5, warmup: int = 1,
               init_ranks: Sequence[str] = ("full", "break_even"), apply_modes: Sequence[str] = ("auto", "factored"),
               lr: float = 1e-4, bm: Optional[BenchModel] = None, log: Callable[[str], None] = print) -> dict:
  """Time per step and peak memory of the trainer's own jitted step (``train.make_train_step``,
  Adam, dropout on, state donated): dense fine-tuning vs SoftLM per ``init_rank`` and per
  :func:`softlm_jax.intercept.apply_mode` (``"auto"``: the default; ``"factored"``: before the merged
  high-rank path existed). Random token ids stand in for data."""
  from softlm_jax import train
  from softlm_jax.optim import make_optimizer
  bm = bm or build_model(model)
  cfg = CompressionConfig()
  rng = np.random.RandomState(0)
  data = {"ids": jnp.asarray(rng.randint(0, bm.vocab, (batch, seq)), jnp.int32),
          "labels": jnp.zeros((batch,), jnp.int32)}
  loss = _task_loss(bm)
  load0 = loadavg()
  cases = []
  specs = [("dense", bm.params, None, "auto")]
  for ir in init_ranks:
    cp = compress_params(bm.params, cfg.replace(init_rank=ir))
    for m in apply_modes:
      specs.append((f"softlm_{ir}" + ("" if m == "auto" else f"_{m}"), cp, cfg, m))
  for name, params, c, m in specs:
    tx = make_optimizer(cfg, optax.adam(lr)) if c is not None else optax.adam(lr)
    step = train.make_train_step(loss, tx, c)
    cases.append(Case(name, step, (train.init_state(params, tx), data), donate=(0,),
                      ctx=lambda m=m: apply_mode(m), carry=lambda a, o: (o[0], a[1])).compile())
  log(f"[train] {bm.name} {batch}x{seq}: compiled {len(cases)} steps (load {loadavg()})")
  times = time_interleaved(cases, reps, warmup)
  rows = {}
  for c in cases:
    rows[c.name] = {**summarize(times[c.name]), "times_s": times[c.name], "compile_s": c.compile_s,
                    "lower_s": c.lower_s, "memory": c.memory}
    if c.name != "dense":
      sp = paired_speedup(times[c.name], times["dense"])  # step time ratio case / dense
      rows[c.name].update(step_vs_dense=sp["median"], step_vs_dense_p25=sp["p25"],
                          step_vs_dense_p75=sp["p75"])
      peak, dense_peak = c.memory.get("peak_bytes"), cases[0].memory.get("peak_bytes")
      if peak is not None and dense_peak:
        rows[c.name]["peak_memory_vs_dense"] = peak / dense_peak
  for c in cases:
    c.args = c.compiled = None
  return {"kind": "train", "model": bm.name, "batch": batch, "seq": seq, "reps": reps,
          "optimizer": f"adam({lr})", "steps": rows, "loadavg": {"start": load0, "end": loadavg()}}


def compress_cost(model: str = "bert-base", *, reps: int = 3, bm: Optional[BenchModel] = None,
                  log: Callable[[str], None] = print) -> dict:
  """``compress_params`` (end to end: SVD batched per shape, factors into a new tree) against
  ``np.linalg.svd(..., full_matrices=False)`` of the same matrices stacked per shape, interleaved.
  The first ``compress_params`` call (which compiles the batched SVD) is reported apart."""
  bm = bm or build_model(model)
  cfg = CompressionConfig()
  kernels = [np.asarray(k, np.float32) for _, k in tree.selected_kernels(bm.params, cfg)]
  groups: dict[tuple, list] = {}
  for k in kernels:
    groups.setdefault(k.shape, []).append(k)
  stacks = [np.stack(g) for g in groups.values()]
  t = time.perf_counter()
  jax.block_until_ready(compress_params(bm.params, cfg))
  first = time.perf_counter() - t
  times: dict[str, list[float]] = {"compress_params": [], "numpy_svd": []}
  load0 = loadavg()
  for r in range(reps):
    for name in (("compress_params", "numpy_svd") if r % 2 == 0 else ("numpy_svd", "compress_params")):
      t = time.perf_counter()
      if name == "compress_params":
        jax.block_until_ready(compress_params(bm.params, cfg))
      else:
        for s in stacks:
          np.linalg.svd(s, full_matrices=False)
      times[name].append(time.perf_counter() - t)
  sp = paired_speedup(times["compress_params"], times["numpy_svd"])
  log(f"[compress] {bm.name}: compress_params {np.median(times['compress_params']):.2f}s, numpy SVD "
      f"{np.median(times['numpy_svd']):.2f}s (x{sp['median']:.2f})")
  return {"kind": "compress", "model": bm.name, "matrices": {f"{a}x{b}": len(g) for (a, b), g in groups.items()},
          "first_call_s": first, "compress_params": summarize(times["compress_params"]),
          "numpy_svd": summarize(times["numpy_svd"]), "compress_vs_numpy_svd": sp["median"],
          "times_s": times, "reps": reps, "loadavg": {"start": load0, "end": loadavg()}}


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def markdown_table(result: dict) -> str:
  """One row per (mode, batch x seq, case) of an inference result."""
  head = ("| mode | batch x seq | case | removed | median ms | spread | speed-up [p25, p75] | FLOP ideal | "
          "Amdahl bound | of bound | linears alone | weights MB (saving) | peak MB | compile s |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in result["cases"]:
    mb = r.get("weight_bytes")
    peak = r["memory"].get("peak_bytes")
    shape = f"{r['batch']} x {r['seq']}" + (" (1 token)" if r["mode"] == "decode" else "")
    if r["case"] == "outside":
      lines.append(f"| {r['mode']} | {shape} | outside linears | | {1e3 * r['median_s']:.2f} | "
                   f"{r['spread']:.2f} | share {r['outside_share']:.2f} | | | | | | "
                   f"{'' if peak is None else f'{peak / 2**20:.0f}'} | {r['compile_s']:.1f} |")
      continue
    lin = r.get("linear_speedup_measured")
    sp = f"{r['speedup']:.2f} [{r['speedup_p25']:.2f}, {r['speedup_p75']:.2f}]"
    lines.append(
        f"| {r['mode']} | {shape} | {r['case']} | {1 - r['flop_ratio']:.3f} | {1e3 * r['median_s']:.2f} | "
        f"{r['spread']:.2f} | {sp} | {r['ideal_linear_speedup']:.2f} | {r['amdahl_bound']:.2f} | "
        f"{r['of_bound']:.2f} | {'' if lin is None else f'{lin:.2f}'} | "
        f"{mb / 2**20:.1f} ({r['weight_saving']:.2f}) | {'' if peak is None else f'{peak / 2**20:.0f}'} | "
        f"{r['compile_s']:.1f} |")
  return "\n".join(lines) + "\n"


def plot_speedup(results: Sequence[dict], path: str) -> Optional[str]:
  """Speed-up vs CR (fraction of the compressed linears' FLOPs removed), one panel per model:
  measured points (median of paired rounds, bars p25-p75), the linears' ideal ``1 / (1 - CR)``
  (dashed) and each setting's Amdahl bound (dotted, from its measured outside share). Hollow
  markers: SoftLM's learned ranks; crosses: ranks rounded to a multiple."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = list(dict.fromkeys(r["config"]["model"] for r in results))
  fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.4), squeeze=False)
  cr = np.linspace(0.0, 0.8, 81)
  for ax, model in zip(axes[0], models):
    ax.plot(cr, 1 / (1 - cr), "k--", lw=1, label="ideal (linears only)")
    markers = iter("osD^v<>ph*" * 3)
    for res in (r for r in results if r["config"]["model"] == model):
      groups: dict[tuple, list] = {}
      for r in res["cases"]:
        if "speedup" in r:
          groups.setdefault((r["mode"], r["batch"], r["seq"]), []).append(r)
      for (mode, b, s_), rows in groups.items():
        o = min(max(rows[0]["outside_share"], 0.0), 1.0)
        flags = res.get("device", {}).get("xla_flags") or ""
        label = f"{mode} {b}x{s_}" + (" (1 token)" if mode == "decode" else "") + \
            (f"\n  XLA_FLAGS={flags}" if flags else "")
        line = ax.plot(cr, 1 / (o + (1 - o) * (1 - cr)), ":", lw=1)[0]
        m = next(markers)
        for r in rows:
          x = 1 - r["flop_ratio"]
          fmt = "x" if r.get("rank_multiple", 1) != 1 else m
          ax.errorbar([x], [r["speedup"]], yerr=[[max(r["speedup"] - r["speedup_p25"], 0)],
                                                  [max(r["speedup_p75"] - r["speedup"], 0)]],
                      fmt=fmt, color=line.get_color(), mfc="white" if r["kind"] == "softlm" else line.get_color(),
                      label=label if r is rows[0] else None)
    ax.set_title(f"{model}", fontsize=10)
    ax.set_xlabel("FLOPs removed from the compressed linears (CR)")
    ax.set_ylabel("speed-up vs dense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  dev = results[0]["device"]
  fig.suptitle(f"measured (points, bars p25-p75), Amdahl bound (dotted), ideal (dashed)\n"
               f"{dev['platform']} {dev['cpu']}, {dev['cpu_cores']} cores", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def summary_table(results: Sequence[dict], cases: Optional[Sequence[str]] = None) -> str:
  """Compact markdown over several inference results (e.g. BENCHMARKS.md): one row per model,
  mode, shape and compressed case (``cases`` filters by case name)."""
  head = ("| model | mode | batch x seq | case | removed | dense ms | case ms | speed-up [p25, p75] | "
          "FLOP ideal | Amdahl bound | of bound | linears alone | weight saving | peak-mem saving | load | XLA_FLAGS |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for res in results:
    rows = res["cases"]
    for r in rows:
      if "speedup" not in r or r["case"] == "dense" or (cases and r["case"] not in cases):
        continue
      d = next(x for x in rows if x["case"] == "dense" and (x["mode"], x["batch"], x["seq"]) ==
               (r["mode"], r["batch"], r["seq"]))
      load = next((x.get("load_before") for x in rows if (x["mode"], x["batch"], x["seq"]) ==
                   (r["mode"], r["batch"], r["seq"]) and x.get("load_before")), None)
      pk, dpk = r["memory"].get("peak_bytes"), d["memory"].get("peak_bytes")
      lin = r.get("linear_speedup_measured")
      lines.append(
          f"| {res['config']['model']} | {r['mode']} | {r['batch']} x {r['seq']} | {r['case']} | "
          f"{1 - r['flop_ratio']:.3f} | {1e3 * d['median_s']:.1f} | {1e3 * r['median_s']:.1f} | "
          f"**{r['speedup']:.2f}** [{r['speedup_p25']:.2f}, {r['speedup_p75']:.2f}] | "
          f"{r['ideal_linear_speedup']:.2f} | {r['amdahl_bound']:.2f} | {r['of_bound']:.2f} | "
          f"{'' if lin is None else f'{lin:.2f}'} | {r['weight_saving']:.2f} | "
          f"{'' if not (pk and dpk) else f'{1 - pk / dpk:.2f}'} | {'' if load is None else load[0]} | "
          f"{res.get('device', {}).get('xla_flags') or 'default'} |")
  return "\n".join(lines) + "\n"


def collect(paths: Sequence[str], out: str, cases: Optional[Sequence[str]] = None) -> dict:
  """Summary table and plot from saved inference JSONs (no re-timing)."""
  results = []
  for p in paths:
    with open(p) as f:
      res = json.load(f)
    if res.get("kind") == "inference":
      results.append(res)
  table = summary_table(results, cases)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(table)
  png = plot_speedup(results, os.path.join(out, "speedup.png")) if results else None
  return {"table": table, "plot": png, "results": len(results)}


def write_json(obj, path: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

  def default(o):
    if isinstance(o, (np.integer,)):
      return int(o)
    if isinstance(o, (np.floating,)):
      return float(o)
    if isinstance(o, np.ndarray):
      return o.tolist()
    return str(o)
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, default=default)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def set_xla_flags(flags: str) -> None:
  """Appends ``flags`` to ``$XLA_FLAGS``; only possible before jax has started its backends."""
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("XLA flags must be set before jax starts (set XLA_FLAGS in the environment)")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def parse(argv=None):
  ap = argparse.ArgumentParser(prog="python -m softlm_jax.bench", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", nargs="+", default=["bert-base"], help=f"any of {sorted(MODELS)}")
  ap.add_argument("--batch", type=int, nargs="+", default=[8])
  ap.add_argument("--seq", type=int, nargs="+", default=[128])
  ap.add_argument("--grid", choices=["default", "full"], default="default",
                  help="full: batch 1 8, seq 128 512, and per-token decode for decoders")
  ap.add_argument("--crs", type=float, nargs="*", default=[0.25, 0.5, 0.75])
  ap.add_argument("--decode", choices=["auto", "on", "off"], default="auto",
                  help="per-token decode with the KV cache (auto: decoders)")
  ap.add_argument("--no-forward", action="store_true", help="decode only")
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--rank-multiple", type=int, nargs="+", default=[1],
                  help="round exported ranks down to a multiple; several: one case each (suffix _m<k>)")
  ap.add_argument("--factors", choices=["svd", "random"], default="svd",
                  help="random: factors of the same shapes without the SVD (big models; same timings)")
  ap.add_argument("--softlm-run", default=None, help="a SoftLM run folder of experiments/glue.py "
                  "(model minilm), e.g. runs/glue/sst2/softlm: its exported learned ranks")
  ap.add_argument("--no-donate", action="store_true", help="do not donate the decode cache")
  ap.add_argument("--train", action="store_true", help="also the training-step cost (--train-model)")
  ap.add_argument("--train-model", default=None, help="default: the first --model")
  ap.add_argument("--train-batch", type=int, default=32)
  ap.add_argument("--train-seq", type=int, nargs="+", default=[128])
  ap.add_argument("--train-init-ranks", nargs="+", default=["full", "break_even"])
  ap.add_argument("--train-modes", nargs="+", default=["auto", "factored"],
                  help="apply modes of the factored layers (auto: merged where cheaper; factored: never)")
  ap.add_argument("--train-reps", type=int, default=5)
  ap.add_argument("--compress", action="store_true", help="also compress_params vs numpy SVD")
  ap.add_argument("--xla-flags", default=None,
                  help="appended to $XLA_FLAGS before jax starts, e.g. '--xla_cpu_experimental_ynn_fusion_type=' "
                       "(CPU: XLA's Eigen dots instead of YNNPACK; see BENCHMARKS.md)")
  ap.add_argument("--out", default="runs/bench")
  ap.add_argument("--no-plot", action="store_true")
  ap.add_argument("--collect", nargs="+", default=None, metavar="JSON",
                  help="no timing: summary.md and speedup.png in --out from saved inference JSONs")
  ap.add_argument("--cases", nargs="+", default=None, help="with --collect: only these case names")
  return ap.parse_args(argv)


def main(argv=None) -> dict:
  args = parse(argv)
  if args.collect:
    res = collect(args.collect, args.out, args.cases)
    print(res["table"])
    print(f"[bench] {res['results']} results -> {args.out}/summary.md, {res['plot']}")
    return res
  if args.xla_flags:
    set_xla_flags(args.xla_flags)
  if args.grid == "full":
    args.batch, args.seq = [1, 8], [128, 512]
  os.makedirs(args.out, exist_ok=True)
  decode = {"auto": None, "on": True, "off": False}[args.decode]
  results = []
  for name in args.model:
    if MODELS.get(name, {}).get("family") == "mamba" and not mamba_available():
      print(f"[bench] {name}: skipped (softlm_jax.models.mamba is not available)")
      continue
    res = run_benchmark(name, batches=args.batch, seqs=args.seq, crs=args.crs, decode=decode,
                        forward=not args.no_forward, reps=args.reps, warmup=args.warmup, dtype=args.dtype,
                        rank_multiples=args.rank_multiple, factors=args.factors,
                        softlm_run=args.softlm_run, donate=not args.no_donate)
    res["command"] = "python -m softlm_jax.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(res, os.path.join(args.out, f"{name}.json"))
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
      f.write(markdown_table(res))
    print(markdown_table(res))
    results.append(res)
  summary = {"inference": [os.path.join(args.out, f"{r['config']['model']}.json") for r in results]}
  if args.train:
    tm = args.train_model or args.model[0]
    tbm = build_model(tm)
    summary["train"] = [train_cost(tm, batch=args.train_batch, seq=s, reps=args.train_reps, bm=tbm,
                                   init_ranks=args.train_init_ranks, apply_modes=args.train_modes)
                        for s in args.train_seq]
    for tr in summary["train"]:
      tr.update(device=device_info(), versions=versions())
    write_json(summary["train"], os.path.join(args.out, f"train_{tm}.json"))
  if args.compress:
    cm = compress_cost(args.train_model or args.model[0])
    cm.update(device=device_info(), versions=versions())
    summary["compress"] = cm
    write_json(cm, os.path.join(args.out, f"compress_{cm['model']}.json"))
  if results and not args.no_plot:
    summary["plot"] = plot_speedup(results, os.path.join(args.out, "speedup.png"))
    print(f"[bench] plot: {summary['plot']}")
  return summary


if __name__ == "__main__":
  main()

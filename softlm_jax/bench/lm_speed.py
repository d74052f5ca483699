"""Language-model speed: prefill and decode tokens per second, dense against compact, beside the bounds.

What a causal-LM user waits for, measured the way generation runs (HF Flax ``init_cache`` /
``past_key_values``):

* **prefill**: one jitted call ``(params, ids (B, P), cache) -> (next token (B,), cache)`` that runs
  the prompt through the model and writes the KV cache; tokens/s = ``B * P / time``.
* **decode**: a Python loop of ``new_tokens`` calls of one jitted one-token step ``(params, cache,
  token (B, 1), pos (B, 1)) -> (next token, cache)`` (greedy argmax inside the step, the cache
  donated), after a prefill of ``P`` tokens; tokens/s = ``B * new_tokens / time of the loop``.

Each variant's calls run interleaved with the others' (one round of every variant in turn, the order
rotated each round) so load on a shared machine hits them alike; the median round is reported.

Beside each speed-up, two bounds computed from the two trees (dense over compact):

* ``flops_bound``: XLA's FLOP count of the lowered call (``cost_analysis()``), dense over compact:
  the speed-up of a compute-bound call (prefill) can not exceed it.
* ``bytes_bound``: bytes a call must read, dense over compact: every weight once plus the KV cache
  (the same in both). A memory-bound call (decode at small batch) can not beat it.

API: :func:`lm_fns` (the jitted calls), :func:`lm_speed` (the grid), :func:`markdown`, :func:`write`.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softlm_jax.bench.machine import device_info, loadavg
from softlm_jax.bench.memory import tree_bytes
from softlm_jax.bench.models import BenchModel
from softlm_jax.config import CompressionConfig
from softlm_jax.intercept import intercept


def lm_fns(bm: BenchModel, cfg: Optional[CompressionConfig] = None) -> tuple[Callable, Callable]:
  """``(prefill, step)``, both jitted and run under :func:`softlm_jax.intercept` (exported trees work).

  * ``prefill(params, ids (B, P) int32, cache) -> (token (B,) int32, cache)``: the prompt into an empty
    cache of ``L >= P`` positions (``bm.init_cache(B, L)``), the greedy next token.
  * ``step(params, cache, token (B, 1) int32, pos (B, 1) int32) -> (token (B,) int32, cache)``: one
    token per sequence at position ``pos``; the cache is donated (argument 1).
  """
  def prefill(params, ids, cache):
    length = _cache_len(cache)
    batch, prompt = ids.shape
    mask = jnp.ones((batch, length), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(prompt, dtype=jnp.int32), (batch, prompt))
    with intercept(cfg):
      out = bm.module(ids, attention_mask=mask, position_ids=pos, params=params, past_key_values=cache,
                      train=False)
    return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32), out.past_key_values

  def step(params, cache, token, pos):
    with intercept(cfg):
      logits, cache = bm.decode(params, cache, token, pos)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

  return jax.jit(prefill), jax.jit(step, donate_argnums=(1,))


def _cache_len(cache) -> int:
  return next(x for x in jax.tree.leaves(cache) if np.ndim(x) == 4).shape[1]  # (batch, len, heads, dim)


def decode_loop(step: Callable, params, cache, token, start: int, new_tokens: int):
  """``new_tokens`` greedy steps from position ``start``: ``(last token (B,), cache)``; blocks at the end."""
  batch = token.shape[0]
  tok = token
  for i in range(new_tokens):
    pos = jnp.full((batch, 1), start + i, jnp.int32)
    tok, cache = step(params, cache, tok.reshape(batch, 1), pos)
  return jax.block_until_ready(tok), cache


def _flops(lowered) -> Optional[float]:
  """XLA's FLOP count of a lowered (or compiled) call, None where the backend does not say."""
  try:
    cost = lowered.cost_analysis()
  except Exception:  # noqa: BLE001 (not every backend implements it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and cost.get("flops") else None


def lm_speed(bm: BenchModel, variants: Mapping[str, object], *, batches: Sequence[int] = (1, 8),
             prompts: Sequence[int] = (128,), new_tokens: int = 16, reps: int = 3, warmup: int = 1,
             cfg: Optional[CompressionConfig] = None, log: Callable[[str], None] = print) -> dict:
  """Prefill and decode tokens/s of every variant (``{name: params}``, the first the reference, e.g.
  ``{"dense": ..., "compact": ...}``) for each batch and prompt length; JSON-able.

  Each row: ``mode`` ("prefill" / "decode"), ``batch``, ``prompt``, ``case``, ``tokens`` (per call or
  loop), ``median_s``, ``times_s``, ``tokens_per_s``; for non-reference cases ``speedup`` (reference
  median over this one), ``flops_bound`` and ``bytes_bound`` (module docstring), ``flops`` and
  ``bytes_read`` of both.
  """
  if not bm.decoder or bm.family == "mamba":
    raise ValueError(f"lm_speed needs a causal LM with a KV cache (gpt2 / llama), got family {bm.family!r}")
  names = list(variants)
  ref = names[0]
  prefill, step = lm_fns(bm, cfg)
  weights = {n: tree_bytes(variants[n]) for n in names}
  rows = []
  t_all = time.perf_counter()
  load0 = loadavg()
  for prompt in prompts:
    for batch in batches:
      length = prompt + new_tokens
      ids = jnp.asarray(np.random.RandomState(batch * 7 + prompt).randint(0, bm.vocab, (batch, prompt)), jnp.int32)
      cache0 = bm.init_cache(batch, length)
      kv = tree_bytes(cache0)
      flops = {"prefill": {}, "decode": {}}
      t = time.perf_counter()
      one = jnp.zeros((batch, 1), jnp.int32)
      for n in names:  # count (lowered, not compiled: the jitted functions themselves are timed, fast path)
        flops["prefill"][n] = _flops(prefill.lower(variants[n], ids, cache0))
        flops["decode"][n] = _flops(step.lower(variants[n], cache0, one, one))
      for n in names:  # compile outside the timing
        tok, cache = jax.block_until_ready(prefill(variants[n], ids, cache0))
        decode_loop(step, variants[n], cache, tok, prompt, 1)
      log(f"[lm speed] b{batch} p{prompt}: compiled {2 * len(names)} calls in {time.perf_counter() - t:.1f}s")
      times = {(m, n): [] for m in ("prefill", "decode") for n in names}
      for r in range(warmup + reps):
        for i in range(len(names)):
          n = names[(i + r) % len(names)]
          t = time.perf_counter()
          tok, cache = jax.block_until_ready(prefill(variants[n], ids, cache0))
          t_pre = time.perf_counter() - t
          t = time.perf_counter()
          decode_loop(step, variants[n], cache, tok, prompt, new_tokens)
          t_dec = time.perf_counter() - t
          if r >= warmup:
            times[("prefill", n)].append(t_pre)
            times[("decode", n)].append(t_dec)
      for mode, tokens in (("prefill", batch * prompt), ("decode", batch * new_tokens)):
        base = float(np.median(times[(mode, ref)]))
        for n in names:
          med = float(np.median(times[(mode, n)]))
          row = {"mode": mode, "batch": batch, "prompt": prompt, "new_tokens": new_tokens if mode == "decode" else 0,
                 "case": n, "tokens": tokens, "median_s": med, "times_s": times[(mode, n)],
                 "tokens_per_s": tokens / med, "flops": flops[mode][n],
                 "bytes_read": weights[n] + kv, "weight_bytes": weights[n], "kv_cache_bytes": kv}
          if n != ref:
            fd, fc = flops[mode][ref], flops[mode][n]
            row.update(speedup=base / med, flops_bound=(fd / fc) if fd and fc else None,
                       bytes_bound=(weights[ref] + kv) / (weights[n] + kv))
          rows.append(row)
        log(f"[lm speed] {mode} b{batch} p{prompt}: " + ", ".join(
            f"{r['case']} {r['tokens_per_s']:.1f} tok/s" + (
                f" (x{r['speedup']:.2f}; bounds: FLOPs x{r['flops_bound'] or float('nan'):.2f}, bytes "
                f"x{r['bytes_bound']:.2f})" if "speedup" in r else "")
            for r in rows[-len(names):]) + f" (load {loadavg()})")
  return {"kind": "lm_speed", "model": bm.name, "reference": ref, "cases": names, "batches": list(batches),
          "prompts": list(prompts), "new_tokens": new_tokens, "reps": reps, "warmup": warmup,
          "rows": rows, "device": device_info(), "loadavg": {"start": load0, "end": loadavg()},
          "total_s": time.perf_counter() - t_all}


def markdown(res: Mapping) -> str:
  """The rows of :func:`lm_speed` as a Markdown table."""
  head = ("| mode | batch | prompt | case | tokens/s | median (ms) | speed-up | FLOPs bound | bytes bound |\n"
          "|---|---|---|---|---|---|---|---|---|\n")

  def fmt(v, spec):
    return "" if v is None else format(v, spec)
  return head + "".join(
      f"| {r['mode']} | {r['batch']} | {r['prompt']} | {r['case']} | {r['tokens_per_s']:.1f} "
      f"| {1e3 * r['median_s']:.1f}"
      f" | {fmt(r.get('speedup'), '.2f')} | {fmt(r.get('flops_bound'), '.2f')} | {fmt(r.get('bytes_bound'), '.2f')} |\n"
      for r in res["rows"])


def write(res: Mapping, path: str) -> str:
  """Writes :func:`markdown` of ``res`` to ``path`` (its folder created), prints it; returns the table."""
  table = markdown(res)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(f"# {res['model']}: prefill and decode tokens/s (load {res['loadavg']})\n\n{table}")
  print(table)
  return table

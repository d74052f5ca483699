"""Pieces the subcommands share: the closing banner, loading a compact checkpoint with its model."""
from __future__ import annotations

import os
import time

from softlm_jax import checkpoint, models, run


def banner(title: str, lines: list[str]) -> None:
  width = max([len(title)] + [len(x) for x in lines]) + 2
  print("\n" + "=" * width + f"\n {title}\n" + "-" * width)
  for x in lines:
    print(" " + x)
  print("=" * width, flush=True)


def load_compact_model(path: str, *, tokenizer: bool = True):
  """``(params, info, model, cfg, load_s)`` of a compact checkpoint: the exported tree, its manifest,
  a :class:`softlm_jax.models.Model` rebuilt by the family that wrote it (no dense weights), the
  :class:`~softlm_jax.CompressionConfig` and the load time."""
  t = time.time()
  params, info = checkpoint.load_compact(path)
  load_s = time.time() - t
  fam = models.family.family_of_manifest(info)
  module = fam.from_manifest(info)
  meta = info["metadata"]
  tok_src = meta.get("tokenizer") or info.get("source_model") or ""
  tok = models.load_tokenizer(tok_src) if (tokenizer and tok_src) else None
  model = models.Model(fam, info.get("source_model") or "", module, None, tok, tok_src, meta.get("num_labels"))
  print(f"loaded {path} ({meta.get('method')}, {info.get('source_model')}, removed {info['achieved_ratio']:.3f}) "
        f"in {load_s:.2f}s")
  return params, info, model, checkpoint.config_from_manifest(info), load_s


def run_options(o, *, cr_folders=None, title=None) -> dict:
  """The experiment scripts' body: load ``o.model`` / ``o.data`` (a parsed
  :class:`softlm_jax.cli.options.RunOptions`), :func:`softlm_jax.run.run_comparison` every method at every
  CR into ``o.out``, print the summary. ``title``: ``(model, task) -> str`` (None: the default).
  Returns ``{folder: results}``, or ``{}`` after ``--stop-after`` (the checkpoint saved: a rerun resumes)."""
  model, task = run.load(o.model, o.data, seed=o.train.seed)
  try:
    results = run.run_comparison(model, task, o.compression, o.train, list(o.methods), list(o.crs), o.out,
                                 cr_folders=cr_folders, title=None if title is None else title(model, task),
                                 run_info={"data": o.data.to_dict(), "preset": o.preset}, recipes=o.recipes)
  except run.RunStopped as e:
    print(e)
    return {}
  with open(os.path.join(o.out, "summary.md")) as f:
    print(f.read())
  return results

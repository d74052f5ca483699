"""``softlm export``: a method folder's training checkpoint -> a compact checkpoint."""
from __future__ import annotations

import os
import time

import softlm_jax as sl
from softlm_jax import checkpoint, models, run as pipeline
from softlm_jax.cli import common

COMMAND, ORDER = "export", 2


def add_parser(sub):
  p = sub.add_parser(COMMAND, help="a training checkpoint (<out>/<method>) -> compact checkpoint")
  p.add_argument("run", help="a method folder holding run.json and ckpt/ (e.g. runs/sst2/softlm)")
  p.add_argument("--output", default=None, help="default: <run>/compact.safetensors")
  return p


def restore_params(folder: str):
  """Training-form params of the latest orbax checkpoint in ``<folder>/ckpt`` (no model needed)."""
  import orbax.checkpoint as ocp  # heavy: imported on use
  mgr = ocp.CheckpointManager(os.path.abspath(os.path.join(folder, "ckpt")))
  step = mgr.latest_step()
  if step is None:
    raise SystemExit(f"softlm: no training checkpoint in {folder}/ckpt (finished runs delete theirs unless "
                     "--keep-ckpt; their compact.safetensors is already exported)")
  state = mgr.restore(step, args=ocp.args.StandardRestore())
  return state["params"], int(state["step"])


def run(args) -> dict:
  conf = pipeline.load_run(args.run)
  cfg = conf["compression"]
  params, step = restore_params(args.run)
  t = time.time()
  compact = sl.export_params(params, cfg)
  info = conf["task"]
  kind = models.get(conf["family"]).kind
  model = models.load(conf["model"], kind, num_labels=info.get("num_labels"),
                      max_len=conf["data"].max_positions if conf["data"] else 512)
  met = bool(sl.budget_report(compact, cfg)["budget_met"])
  meta = pipeline.compact_metadata(model, info, conf["method"], step, met)
  out = args.output or os.path.join(args.run, "compact.safetensors")
  checkpoint.save_compact(out, compact, cfg=cfg, model_config=model.manifest()[1], metadata=meta)
  rep = checkpoint.file_report(out)
  man = checkpoint.read_manifest(out)
  common.banner("softlm export", [f"{args.run}/ckpt step {step} -> {out} in {time.time() - t:.1f}s",
                                  f"removed {man['achieved_ratio']:.3f} of the selected linears (target "
                                  f"{man['target_ratio']}); counted {man['counted_params']:,} params",
                                  f"file {rep['file_bytes'] / 2**20:.2f} MiB = arrays "
                                  f"{rep['array_bytes'] / 2**20:.2f} MiB + header "
                                  f"{rep['header_bytes'] / 1024:.1f} KiB"])
  return {"path": out, **rep}

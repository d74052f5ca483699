"""GLUE (or your own data) fine-tuning: dense, SoftLM and the static-SVD baseline on one task, with the
same steps. The logic lives in :mod:`softlm_jax.finetune` (the ``softlm train`` command runs the same).

Default (the README's first run): real all-MiniLM-L6-v2 on SST-2 from ../shared/data, all three methods
at CR 0.5. Each method writes ``<out>/<method>/results.json`` (metrics, counts, ranks, history, wall
time), ``table.md``, and, for compressed models, ``ranks.png`` and ``compact.safetensors``;
``<out>/summary.md`` and ``comparison.png`` compare them. Interrupted runs resume from their orbax
checkpoints, which a finished run deletes unless ``--keep-ckpt``.

  python experiments/glue.py --task sst2 --out runs/glue/sst2
  python experiments/glue.py --task mrpc --out runs/glue/mrpc
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from softlm_jax import finetune  # noqa: E402


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="minilm", help="'minilm' (embedded) or a HF name/folder")
  ap.add_argument("--methods", type=finetune.methods_arg, default="softlm,static,dense")
  ap.add_argument("--out", default="runs/glue/sst2")
  finetune.add_data_args(ap)
  finetune.add_compression_args(ap)
  finetune.add_train_args(ap)
  return ap.parse_args(argv)


def summary_row(res) -> dict:
  return finetune.summary_row(res)


def main(argv=None):
  args = parse(argv)
  results = finetune.run_comparison(args)
  print(open(os.path.join(args.out, "summary.md")).read())
  return results


if __name__ == "__main__":
  main()

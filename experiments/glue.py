"""GLUE (or your own data) fine-tuning: the dense teacher, the allocated recipe and the static-SVD
baseline on one task (``--preset glue-softlm``: dense, SoftLM on plain SVD and static):
:func:`softlm_jax.run.run_comparison` with the options of ``softlm train`` (the ``glue`` preset of
:mod:`softlm_jax.presets`). Regenerates BENCHMARKS.md#glue (one run per task, then
``experiments/collect_glue.py``).

Default: real all-MiniLM-L6-v2 on SST-2 from ../shared/data, the preset's methods at CR 0.5. Each method
writes ``<out>/<method>/results.json`` (metrics, counts, ranks, history, wall time), ``table.md``, and,
for compressed models, ``ranks.png`` and ``compact.safetensors``; ``<out>/summary.md`` and
``comparison.png`` compare them. Interrupted runs resume from their orbax checkpoints, which a finished
run deletes unless ``--keep-ckpt``.

  python experiments/glue.py --task sst2 --out runs/glue/sst2
  python experiments/glue.py --task mrpc --out runs/glue/mrpc
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from softlm_jax.cli import common, options  # noqa: E402


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  options.add_run_args(ap, methods=True, default_methods=None, default_out="runs/glue/sst2")
  ap.set_defaults(configs_needed=True)
  return options.parse(ap, argv)


def main(argv=None):
  return common.run_options(parse(argv).options)


if __name__ == "__main__":
  main()

"""LLRC on real all-MiniLM-L6-v2 (GLUE): fine-tuning-free compression of a fine-tuned classifier.
Regenerates the MiniLM table of BENCHMARKS.md#llrc.

1. Teacher: the dense model fine-tuned on the task's train split (``--teacher-steps``; its run folder
   ``<out>/dense`` is reused by later runs).
2. For each CR, with the teacher's weights frozen and ``--calib`` train sentences (labels unused):
     static-noft   static SVD (same keep-ratio per layer), no training;
     softlm-noft   SoftLM thresholds learned by distillation to the teacher, weights frozen;
     llrc          LLRC masks learned by distillation to the teacher, weights frozen;
     llrc-ft       the llrc export, then ``--ft-steps`` of task fine-tuning (labels).
   All are exported and scored on the dev split (GLUE test labels are hidden).
The pipeline is :func:`softlm_jax.run.run_comparison` (the ``glue-softlm`` preset, plain SVD, as measured
in BENCHMARKS.md; the teacher trained ``--teacher-steps``); writes ``<out>/<method>_cr<CR>/results.json``
(+ ``ranks.png``) and ``<out>/summary.md``.

  python experiments/glue_llrc.py --task sst2 --out runs/glue_llrc/sst2
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from softlm_jax.cli import common, options  # noqa: E402

METHODS = "static-noft,softlm-noft,llrc,llrc-ft"


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  options.add_run_args(ap, methods=True, default_methods=METHODS, cr_flags=("--crs", "--cr"),
                       default_out="runs/glue_llrc/sst2")
  ap.set_defaults(cr=[0.2, 0.3, 0.5], teacher_steps=215, preset="glue-softlm", configs_needed=True)
  return options.parse(ap, argv)


def main(argv=None):
  o = parse(argv).options
  return common.run_options(o, cr_folders=True, title=lambda model, task: (
      f"{o.model} {task.name}: fine-tuning-free compression of a fine-tuned dense teacher "
      f"({', '.join(task.evals)} split; calibration: {o.train.calib} train sentences)"))


if __name__ == "__main__":
  main()

"""Causal-LM compression on WikiText-2: dense vs SoftLM vs static SVD (and LLRC) at several CRs.

The pipeline is :func:`softlm_jax.run.run_comparison` with the options of the ``softlm`` command
(:mod:`softlm_jax.cli.options`) and its ``lm`` preset (:mod:`softlm_jax.presets`): this script is
``softlm train --task wikitext`` with three CRs by default and one folder per method and CR. Offline the
models train on WikiText-2 **valid** (``../shared/data/wikitext-2/valid.txt``; there is no local train
split) and perplexity is measured on the **raw test** split with the protocol of ../shared/data/README.md:
the first 200,000 characters of ``wiki.test.raw``, ``--eval-windows`` non-overlapping windows of
``--eval-len`` tokens from the start, ``exp(mean next-token loss)``.

Methods (``--methods``; :func:`softlm_jax.run.method_names`):
  dense          the model as loaded, no training (its perplexity is the reference);
  dense-ft       dense fine-tuning with the same steps as SoftLM at the first CR;
  softlm         SoftLM: thresholds + weights until the budget is met, then ``--finetune-steps``;
  static         static SVD (same keep-ratio in every layer), fine-tuned with SoftLM's step count;
  static-noft    static SVD, no training;
  allocated      static SVD at the ranks of a global loss-aware allocation (softlm_jax.allocate), the
                 decomposition fit at those ranks, block refit (--refit-steps), then fine-tuned;
  allocated-refit the same with the block refit and no fine-tuning;
  allocated-noft the allocation and the decomposition alone: no weight trained by gradient;
  softlm-noft    SoftLM thresholds with frozen weights on the calibration set (distillation), no fine-tuning;
  llrc           LLRC masks with frozen weights on the calibration set (distillation), no fine-tuning;
  llrc-ft        LLRC, then ``--ft-steps`` of LM fine-tuning of the exported model.
Each run writes ``<out>/<method>_cr<CR>/{results.json, table.md, ranks.png, compact.safetensors}``; a
finished run (results.json present) is skipped, an interrupted one resumes from its orbax checkpoint;
``<out>/summary.md`` gathers all rows.

  python experiments/lm.py --model smollm2 --preset lm-softlm --methods dense,softlm,static --crs 0.5 \
      --out runs/lm/smollm2

The defaults are the ``lm`` preset, the recommended settings (``allocated`` on the propagated
decomposition, block refit, distillation; methods allocated,static,dense). ``--preset lm-softlm`` is the
SoftLM recipe (learned thresholds on whitened factors, ramp), ``--preset paper`` the plain SoftLM of the
paper. Regenerates BENCHMARKS.md#language-model-after-fine-tuning and, with ``--preset paper``,
BENCHMARKS.md#the-softlm-papers-setting.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from softlm_jax import tasks  # noqa: E402
from softlm_jax.cli import common, options  # noqa: E402
from softlm_jax.tasks import EVAL_CHARS, lm_loss  # noqa: E402,F401  (one loss, one protocol)


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  options.add_run_args(ap, methods=True, default_methods=None, cr_flags=("--crs", "--cr"),
                       default_out="runs/lm/smollm2")
  ap.set_defaults(task=tasks.LM_TASK, cr=[0.25, 0.5, 0.75], configs_needed=True)
  return ap


def parse(argv=None):
  return options.parse(parser(), argv)


def main(argv=None):
  o = parse(argv).options

  def title(model, task):
    t = task.windows["test"]
    return (f"{o.model}: WikiText-2 (train: valid; ppl: raw test, first {EVAL_CHARS} chars, "
            f"{t.shape[0]}x{t.shape[1]} tokens)")
  return common.run_options(o, cr_folders=True, title=title)


if __name__ == "__main__":
  main()

#!/bin/bash
# Session 9 (BENCHMARKS.md, rows 5''' / 6'''): the refit and the fine-tuning on windows of the evaluation's length.
# The perplexity is measured on 512-token windows, but rows 5-6'' refit and fine-tune on 128-token ones: positions
# 128-511 are never trained. Here both use 512-token windows with the same calibration tokens as the 512-window file
# (128 x 512 = 65,536) and 4x the fine-tuning tokens (100 steps of 4 x 512), against the dense model fine-tuned the
# same way (the fair baseline).
#  s512:       softlm train from the 512-window CR 0.5 file (row 3''), 512-token windows for the refit and the
#              fine-tuning (run at 79fedb3 as --seq-len 512, before --calib-len existed)
#  dense_s512: the dense model fine-tuned the same way
#  preset:     the lm preset's own default since session 9 (128 x 128-token calibration, its refit, 100 steps on
#              512-token windows)
cd "$(dirname "$0")/.." && . .venv/bin/activate
START=runs/compress_cr0.5_c512/allocated/compact.safetensors
while [ ! -f $START ]; do sleep 30; done
ROOT=runs/r9
COMMON="--task wikitext --model smollm2 --cr 0.5 --steps 100 --seq-len 512 --no-progress"
. experiments/lib.sh
go s512 --methods allocated --start-file $START --calib-len 512 --calib-grams 128 --refit-holdout 8 --keep-ckpt
go dense_s512 --methods dense-ft
go preset --methods allocated

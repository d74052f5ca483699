#!/bin/bash
# Session 7 (BENCHMARKS.md, rows 3''' / 5''' / 6'''): softlm train from the 1,024-window CR 0.5 file
# (softlm compress --task wikitext --model smollm2 --cr 0.5 --calib-grams 1024 --out runs/compress_cr0.5_c1024):
#  c1024:  the lm preset (refit 32 steps with an 8-batch held-out guard, 100 KD steps, cosine);
#  dense:  the dense model fine-tuned the same way (the fair baseline; its teacher.safetensors is the next teacher);
#  c1024_tft: c1024's refit (its per-block checkpoints, copied), then the same 100 steps distilled from that
#          fine-tuned dense model (--teacher-file) instead of the dense model as loaded.
cd "$(dirname "$0")/.." && . .venv/bin/activate
START=runs/compress_cr0.5_c1024/allocated/compact.safetensors
while [ ! -f $START ]; do sleep 30; done
ROOT=runs/r7
COMMON="--task wikitext --model smollm2 --cr 0.5 --steps 100 --seq-len 128 --no-progress"  # the preset's window then
. experiments/lib.sh
ALLOC="--methods allocated --start-file $START --calib-grams 1024 --refit-holdout 8"
go c1024 $ALLOC --keep-ckpt
go dense --methods dense-ft
mkdir -p runs/r7/c1024_tft/allocated
[ -d runs/r7/c1024_tft/allocated/ckpt_refit ] || cp -r runs/r7/c1024/allocated/ckpt_refit runs/r7/c1024_tft/allocated/
go c1024_tft $ALLOC --teacher-file runs/r7/dense/dense-ft/teacher.safetensors

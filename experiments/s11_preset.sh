#!/bin/bash
# Session 11 (BENCHMARKS.md, "The lm preset on 512-token calibration windows"): does the lm preset move to
# 32 x 512-token calibration windows (the same 16,384 tokens as its 128 x 128; CR 0.5: 200.55 against 219.82)?
#  compress_cr0.2_l512_32: CR 0.2 that way (against row 3', 60.74)
#  refit_{3e-4,1e-3}:      the preset's refit (32 steps / block, no hold-out) of the CR 0.5 32 x 512 file
#                          (runs/s10/compress_l512_32) on its own windows, at the preset's lr and at 1e-3
#  frontier_cr0.3:         row 2 at CR 0.3 (propagated, uniform ranks, 32 x 128 tokens, as at CR 0.2 / 0.5)
cd "$(dirname "$0")/.." && . .venv/bin/activate
ROOT=runs/s11
. experiments/lib.sh
cmp compress_cr0.2_l512_32 --cr 0.2 --calib-len 512 --calib-grams 32
ev compress_cr0.2_l512_32
COMMON="--task wikitext --model smollm2 --cr 0.5 --no-progress --methods allocated-noft --calib-len 512 --calib-grams 32"
START=runs/s10/compress_l512_32/allocated/compact.safetensors
go refit_1e-3 --start-file $START --refit-lr 1e-3
go refit_3e-4 --start-file $START --refit-lr 3e-4
[ -f $ROOT/frontier_cr0.3/done ] || { /usr/bin/time -v python experiments/frontier.py --rows propagated --crs 0.3 \
  --calib 32 --out $ROOT/frontier_cr0.3 > $ROOT/frontier_cr0.3.log 2>&1 && touch $ROOT/frontier_cr0.3/done; }
echo "== frontier_cr0.3 $(date +%T)"; tail -3 $ROOT/frontier_cr0.3.log

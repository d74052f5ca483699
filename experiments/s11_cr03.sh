#!/bin/bash
# Session 11, after the CR 0.5 row 6 of experiments/s11_rows.sh (pass the pid to wait on): at CR 0.3 the
# 32 x 512 windows lost training-free (95.07 against 92.57 for the preset's 128 x 128), so the refit decides:
#  refit_cr0.3_c128_1e-3: the refit at lr 1e-3 of the preset's CR 0.3 file (runs/s10/compress_cr0.3) on its
#                         own 128 x 128 windows (at 3e-4, row 5': 89.05)
#  refit_cr0.3_l512_1e-3: the refit at lr 1e-3 of the 32 x 512 file on its own windows
# (a row 6 at CR 0.3 was planned here; the 100 steps take ~50 min and did not fit the session)
cd "$(dirname "$0")/.." && . .venv/bin/activate
ROOT=runs/s11
C128=runs/s10/compress_cr0.3/allocated/compact.safetensors
L512=$ROOT/compress_cr0.3_l512_32/allocated/compact.safetensors
. experiments/lib.sh
wait_pid $1
COMMON="--task wikitext --model smollm2 --cr 0.3 --no-progress --methods allocated-noft"
go refit_cr0.3_c128_1e-3 --start-file $C128 --refit-lr 1e-3
go refit_cr0.3_l512_1e-3 --start-file $L512 --refit-lr 1e-3 --calib-len 512 --calib-grams 32

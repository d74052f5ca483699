#!/bin/bash
# Session 10 (BENCHMARKS.md, "Row 3'''' at CR 0.5: calibration on windows of the perplexity's length"): row 3''
# calibrates (Grams, Fisher scores, propagated fit) on 512 windows of 128 tokens, so positions 128-511 of the
# evaluation's 512-token windows are never in the statistics. Here the calibration tokens come as 512-token windows:
#  compress_l512:    the same 65,536 tokens of WikiText-2 valid as 128 x 512 (against row 3'', 512 x 128)
#  compress_l512_32: the preset's 16,384 tokens as 32 x 512 (against row 3', 128 x 128)
#  refit / refit_lr1e-3: the block refit of compress_l512 on its own windows (32 steps / block, 8 held-out
#                    batches; lr 3e-4 as row 5''' / 1e-3), no fine-tuning (allocated-noft)
#  compress_l512_256: 256 x 512 = 131,072 tokens; refit_256: its refit as refit_lr1e-3
# then the MRPC run of experiments/mrpc_teacher.sh (one heavy job at a time).
cd "$(dirname "$0")/.." && . .venv/bin/activate
ROOT=runs/s10
. experiments/lib.sh
cmp compress_l512 --cr 0.5 --calib-len 512 --calib-grams 128
ev compress_l512
cmp compress_l512_32 --cr 0.5 --calib-len 512 --calib-grams 32
ev compress_l512_32
COMMON="--task wikitext --model smollm2 --cr 0.5 --no-progress --methods allocated-noft --calib-len 512 --calib-grams 128 --refit-holdout 8 --keep-ckpt"
START=$ROOT/compress_l512/allocated/compact.safetensors
go refit --start-file $START
go refit_lr1e-3 --start-file $START --refit-lr 1e-3
cmp compress_l512_256 --cr 0.5 --calib-len 512 --calib-grams 256
ev compress_l512_256
go refit_256 --start-file $ROOT/compress_l512_256/allocated/compact.safetensors --refit-lr 1e-3
bash experiments/mrpc_teacher.sh

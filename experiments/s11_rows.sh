#!/bin/bash
# Session 11, after experiments/s11_preset.sh (pass its pid to wait on it): the candidate lm preset
# (calibration and refit on 32 x 512-token windows, refit lr: the better of s11_preset.sh's two) measured as
#  compress_cr0.3_l512_32: training-free at CR 0.3 (against row 3', 92.57)
#  row6_cr0.5: softlm train's default at CR 0.5, 100 steps (against the preset's 89.10), from the CR 0.5
#              32 x 512 file (runs/s10/compress_l512_32: the same model the command would compress itself)
# (a CR 0.3 row 6 was dropped: the windows lost at CR 0.3, experiments/s11_cr03.sh)
cd "$(dirname "$0")/.." && . .venv/bin/activate
ROOT=runs/s11
. experiments/lib.sh
wait_pid $1
ppl() { grep -ho '"ppl": [0-9.]*' $ROOT/$1/*/results.json | tail -1 | cut -d' ' -f2; }
LR=1e-3; python -c "import sys; sys.exit(not float('$(ppl refit_3e-4)') < float('$(ppl refit_1e-3)'))" && LR=3e-4
echo "== refit lr $LR (1e-3: $(ppl refit_1e-3), 3e-4: $(ppl refit_3e-4))"
cmp compress_cr0.3_l512_32 --cr 0.3 --calib-len 512 --calib-grams 32
ev compress_cr0.3_l512_32
COMMON="--task wikitext --model smollm2 --no-progress --methods allocated --steps 100 --calib-len 512 --calib-grams 32 --refit-lr $LR"
go row6_cr0.5 --cr 0.5 --start-file runs/s10/compress_l512_32/allocated/compact.safetensors

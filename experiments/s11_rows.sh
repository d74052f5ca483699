#!/bin/bash
# Session 11, after experiments/s11_preset.sh (pass its pid to wait on it): the candidate lm preset
# (calibration and refit on 32 x 512-token windows, refit lr: the better of s11_preset.sh's two) measured as
#  compress_cr0.3_l512_32: training-free at CR 0.3 (against row 3', 92.57)
#  row6_cr0.5: softlm train's default at CR 0.5, 100 steps (against the preset's 89.10), from the CR 0.5
#              32 x 512 file (runs/s10/compress_l512_32: the same model the command would compress itself)
# (a CR 0.3 row 6 was dropped: the windows lost at CR 0.3, experiments/s11_cr03.sh)
cd "$(dirname "$0")/.." && . .venv/bin/activate
[ -n "$1" ] && while kill -0 $1 2>/dev/null; do sleep 20; done
ROOT=runs/s11
ppl() { grep -ho '"ppl": [0-9.]*' $ROOT/$1/*/results.json | tail -1 | cut -d' ' -f2; }
LR=1e-3; python -c "import sys; sys.exit(not float('$(ppl refit_3e-4)') < float('$(ppl refit_1e-3)'))" && LR=3e-4
echo "== refit lr $LR (1e-3: $(ppl refit_1e-3), 3e-4: $(ppl refit_3e-4))"
[ -f $ROOT/compress_cr0.3_l512_32/allocated/compact.safetensors ] || /usr/bin/time -v softlm compress --task wikitext \
  --model smollm2 --cr 0.3 --no-progress --calib-len 512 --calib-grams 32 --out $ROOT/compress_cr0.3_l512_32 \
  > $ROOT/compress_cr0.3_l512_32.log 2>&1
[ -s $ROOT/compress_cr0.3_l512_32.eval ] || softlm eval $ROOT/compress_cr0.3_l512_32/allocated/compact.safetensors \
  --task wikitext 2>&1 | tr '\r' '\n' | grep 'test: ppl' > $ROOT/compress_cr0.3_l512_32.eval
echo "== compress_cr0.3_l512_32 $(cat $ROOT/compress_cr0.3_l512_32.eval) $(date +%T)"
COMMON="--task wikitext --model smollm2 --no-progress --methods allocated --steps 100 --calib-len 512 --calib-grams 32 --refit-lr $LR"
. experiments/lib.sh
go row6_cr0.5 --cr 0.5 --start-file runs/s10/compress_l512_32/allocated/compact.safetensors

#!/bin/bash
# Session 11 (BENCHMARKS.md, "The lm preset on 512-token calibration windows"): does the lm preset move to
# 32 x 512-token calibration windows (the same 16,384 tokens as its 128 x 128; CR 0.5: 200.55 against 219.82)?
#  compress_cr0.2_l512_32: CR 0.2 that way (against row 3', 60.74)
#  refit_{3e-4,1e-3}:      the preset's refit (32 steps / block, no hold-out) of the CR 0.5 32 x 512 file
#                          (runs/s10/compress_l512_32) on its own windows, at the preset's lr and at 1e-3
#  frontier_cr0.3:         row 2 at CR 0.3 (propagated, uniform ranks, 32 x 128 tokens, as at CR 0.2 / 0.5)
cd "$(dirname "$0")/.." && . .venv/bin/activate
ROOT=runs/s11
ev() {  # ev NAME: softlm eval of NAME's compact file, once
  [ -s $ROOT/$1.eval ] || softlm eval $ROOT/$1/allocated/compact.safetensors --task wikitext 2>&1 | tr '\r' '\n' \
    | grep 'test: ppl' > $ROOT/$1.eval
  echo "== $1 $(cat $ROOT/$1.eval) $(date +%T)"
}
cmp() {  # cmp NAME CR ARGS: softlm compress --out $ROOT/NAME ARGS, once
  local out=$ROOT/$1 cr=$2; shift 2
  [ -f $out/allocated/compact.safetensors ] || /usr/bin/time -v softlm compress --task wikitext --model smollm2 \
    --cr $cr --no-progress --out $out "$@" > $out.log 2>&1
}
cmp compress_cr0.2_l512_32 0.2 --calib-len 512 --calib-grams 32
ev compress_cr0.2_l512_32
COMMON="--task wikitext --model smollm2 --cr 0.5 --no-progress --methods allocated-noft --calib-len 512 --calib-grams 32"
. experiments/lib.sh
START=runs/s10/compress_l512_32/allocated/compact.safetensors
go refit_1e-3 --start-file $START --refit-lr 1e-3
go refit_3e-4 --start-file $START --refit-lr 3e-4
[ -f $ROOT/frontier_cr0.3/done ] || { /usr/bin/time -v python experiments/frontier.py --rows propagated --crs 0.3 \
  --calib 32 --out $ROOT/frontier_cr0.3 > $ROOT/frontier_cr0.3.log 2>&1 && touch $ROOT/frontier_cr0.3/done; }
echo "== frontier_cr0.3 $(date +%T)"; tail -3 $ROOT/frontier_cr0.3.log

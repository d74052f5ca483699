#!/bin/bash
# Session 9 (BENCHMARKS.md, "Row 6 at 512-token windows"): the fine-tuning and the refit on windows of the
# evaluation's length. The perplexity is measured on 512-token windows, but rows 5-6'' refit and fine-tune on
# 128-token ones: positions 128-511 are never trained. Here both use 512-token windows (--seq-len 512) with
# the same calibration tokens as the 512-window file (128 x 512 = 65,536) and 4x the fine-tuning tokens
# (100 steps of 4 x 512), against the dense model fine-tuned the same way (the fair baseline).
#  s512:       softlm train from the 512-window CR 0.5 file (row 3''), the lm preset, --seq-len 512
#  dense_s512: the dense model fine-tuned the same way
cd "$(dirname "$0")/.." && . .venv/bin/activate
START=runs/compress_cr0.5_c512/allocated/compact.safetensors
while [ ! -f $START ]; do sleep 30; done
COMMON="--task wikitext --model smollm2 --cr 0.5 --steps 100 --seq-len 512 --no-progress"
go() {  # name, args
  local out=runs/r9/$1; shift
  if [ -f $out/done ]; then echo "$out done"; return; fi
  mkdir -p $out; echo "== $out $* $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  /usr/bin/time -v softlm train $COMMON --out $out "$@" > $out.log 2>&1 && touch $out/done
  echo "== $out rc=$? $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; grep -ho '"ppl": [0-9.]*' $out/*/results.json | tail -2
}
go s512 --methods allocated --start-file $START --calib-grams 128 --refit-holdout 8 --keep-ckpt
go dense_s512 --methods dense-ft

#!/bin/bash
# Session 7 (BENCHMARKS.md, rows 3''' / 5''' / 6'''): softlm train from the 1,024-window CR 0.5 file
# (softlm compress --task wikitext --model smollm2 --cr 0.5 --calib-grams 1024 --out runs/compress_cr0.5_c1024),
# the lm preset with the refit's held-out guard (8 batches); then the same fine-tuning on 512-token windows
# (batch 1: the same 51,200 tokens), and the dense model fine-tuned that way (the fair baseline).
cd "$(dirname "$0")/.." && . .venv/bin/activate
START=runs/compress_cr0.5_c1024/allocated/compact.safetensors
while [ ! -f $START ]; do sleep 30; done
COMMON="--task wikitext --model smollm2 --cr 0.5 --steps 100 --no-progress"
go() {  # name, args
  local out=runs/r7/$1; shift
  if [ -f $out/done ]; then echo "$out done"; return; fi
  mkdir -p $out; echo "== $out $* $(date +%T)"
  /usr/bin/time -v softlm train $COMMON --out $out "$@" > $out.log 2>&1 && touch $out/done
  echo "== $out rc=$? $(date +%T)"; grep -ho '"ppl": [0-9.]*' $out/*/results.json | tail -2
}
go c1024 --methods allocated --start-file $START --calib-grams 1024 --refit-holdout 8 --keep-ckpt
go c1024_s512 --methods allocated --start-file $START --seq-len 512 --batch-size 1 --calib-grams 256 --refit-holdout 8
go dense_s512 --methods dense-ft --seq-len 512 --batch-size 1

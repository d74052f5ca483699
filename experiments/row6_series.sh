#!/bin/bash
# Row 6'' variants (BENCHMARKS.md, session 6): softlm train from the 512-window CR 0.5 file, one run per
# quoted spec, in order: experiments/row6_series.sh "hid1 --distill-hidden 1 --keep-ckpt" "cos --lr-schedule cosine"
# The block refit (32 steps) is computed once: the run named REFIT_FROM (default hid1) keeps its per-block
# checkpoints (--keep-ckpt) and the later runs copy them, so they resume to the same refit model.
cd "$(dirname "$0")/.." && . .venv/bin/activate
START=runs/compress_cr0.5_c512/allocated/compact.safetensors
COMMON="--task wikitext --model smollm2 --methods allocated --cr 0.5 --steps 100 --start-file $START --calib-grams 512 --seq-len 128 --no-progress"  # the preset's window then
one() {  # name, extra args
  local out=runs/r6/$1; shift
  if [ -f $out/allocated/results.json ]; then echo "$out done"; return; fi
  mkdir -p $out/allocated
  if [ -d runs/r6/${REFIT_FROM:-hid1}/allocated/ckpt_refit ] && [ ! -d $out/allocated/ckpt_refit ]; then
    cp -r runs/r6/${REFIT_FROM:-hid1}/allocated/ckpt_refit $out/allocated/; fi
  echo "== $out $* $(date +%T)"
  /usr/bin/time -v softlm train $COMMON --out $out "$@" > $out.log 2>&1
  echo "== $out rc=$? $(date +%T)"; grep -o '"ppl": [0-9.]*' $out/allocated/results.json | tail -1
}
for spec in "$@"; do eval one $spec; done

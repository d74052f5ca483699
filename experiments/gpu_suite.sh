#!/usr/bin/env bash
# The prepared GPU run: installs the wheels carried in .whl/ (experiments/gpu_prepare.sh made
# them here; the GPU machine has no internet and jax with CUDA already), then runs experiments/gpu_suite.py.
#   bash experiments/gpu_suite.sh --out "$OUT/gpu_suite"      # on the GPU machine
#   bash experiments/gpu_suite.sh --dry-run --out /tmp/dry    # tiny shapes, CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # only what is missing: never replace the machine's jax/jaxlib (CUDA build)
  missing=$("$PY" - <<'PY'
import importlib.util, glob, os, re
have = lambda m: importlib.util.find_spec(m) is not None
mods = {"transformers": "transformers", "flax": "flax", "optax": "optax", "orbax_checkpoint": "orbax.checkpoint",
        "safetensors": "safetensors", "tokenizers": "tokenizers", "huggingface_hub": "huggingface_hub",
        "pynvml": "pynvml", "nvidia_ml_py": "pynvml", "tqdm": "tqdm", "chex": "chex", "msgpack": "msgpack",
        "tensorstore": "tensorstore", "regex": "regex", "filelock": "filelock", "pyyaml": "yaml"}
out = []
for w in glob.glob(".whl/*.whl"):
  dist = re.sub(r"-.*", "", os.path.basename(w)).lower()
  mod = mods.get(dist)
  if mod is not None and not have(mod.split(".")[0] if mod != "orbax.checkpoint" else "orbax"):
    out.append(w)
print(" ".join(out))
PY
)
  if [ -n "$missing" ]; then
    echo "[gpu suite] installing from .whl/: $missing"
    "$PY" -m pip install --no-index --no-deps --quiet $missing
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" experiments/gpu_suite.py "$@"

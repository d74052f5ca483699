#!/usr/bin/env bash
# The test command (README and CI): the default suite, CPU, tiny models, under 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -d .venv ]; then . .venv/bin/activate; fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
python -m pytest -q -p no:cacheprovider "$@"

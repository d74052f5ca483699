#!/usr/bin/env bash
# The test command (README and CI): the default suite, CPU, tiny models (~20 min in one process on the
# 2-core machine, over the 10-minute target).
# SOFTLM_TEST_WORKERS=2: two pytest-xdist workers (in `.[dev]`; 13:18 against ~20 min in one process on
# the 2-core machine), off by default: the timing tests (Ctrl-C latency, tokens/s) share the cores then.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -d .venv ]; then . .venv/bin/activate; fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
workers="${SOFTLM_TEST_WORKERS:-0}"
par=()
if [ "$workers" != "0" ] && python -c "import xdist" 2>/dev/null; then par=(-n "$workers" --dist loadfile); fi
python -m pytest -q -p no:cacheprovider "${par[@]}" "$@"

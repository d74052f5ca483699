#!/usr/bin/env bash
# The test command (README and CI): the default suite, CPU, tiny models.
# Two pytest-xdist workers by default (SOFTLM_TEST_WORKERS=N to change, 0: one process), then the
# timing-sensitive tests (marked `serial`: Ctrl-C latency, tokens/s against a direct timing) alone, so
# no other worker shares the cores with them. Arguments go to both phases (e.g. test files, -k).
# A fresh clone's `.ci/run` on the 2-core machine: 6:50 + 0:29 of tests (22:28 in one process without the
# per-session XLA cache of tests/conftest.py), 8:01 with the install.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -d .venv ]; then . .venv/bin/activate; fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
cores="$(nproc 2>/dev/null || echo 1)"
workers="${SOFTLM_TEST_WORKERS:-$(( cores < 2 ? 0 : 2 ))}"
if [ "$workers" = "0" ] || ! python -c "import xdist" 2>/dev/null; then
  exec python -m pytest -q -p no:cacheprovider "$@"
fi
rc=0
python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile -m "not slow and not serial" "$@" || rc=$?
rc2=0
python -m pytest -q -p no:cacheprovider -m "serial and not slow" "$@" || rc2=$?
# 5: no test collected (arguments that select no serial test, or only serial ones)
for r in "$rc" "$rc2"; do
  if [ "$r" != "0" ] && [ "$r" != "5" ]; then exit "$r"; fi
done
if [ "$rc" = "5" ] && [ "$rc2" = "5" ]; then exit 5; fi
exit 0

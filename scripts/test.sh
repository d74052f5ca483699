#!/usr/bin/env bash
# The test command (README): the fast suite, CPU, tiny models. `--all`: every test, the heavy end-to-end
# ones marked `slow` too (subprocess CLI runs, 8-device meshes, kill -9, real weights): CI's `.ci/run`.
# Two pytest-xdist workers by default (SOFTLM_TEST_WORKERS=N to change, 0: one process), then the
# timing-sensitive tests (marked `serial`: Ctrl-C latency, tokens/s against a direct timing) alone, so
# no other worker shares the cores with them. Other arguments go to both phases (e.g. test files, -k).
# Times on the 2-core machine: BENCHMARKS.md#test-suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -d .venv ]; then . .venv/bin/activate; fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
all=0
args=()
for a in "$@"; do
  if [ "$a" = "--all" ]; then all=1; else args+=("$a"); fi
done
set -- ${args[@]+"${args[@]}"}
if [ "$all" = "1" ]; then
  one="slow or not slow"; parallel="not serial"; serial="serial"
else
  one="not slow"; parallel="not slow and not serial"; serial="serial and not slow"
fi
cores="$(nproc 2>/dev/null || echo 1)"
workers="${SOFTLM_TEST_WORKERS:-$(( cores < 2 ? 0 : 2 ))}"
if [ "$workers" = "0" ] || ! python -c "import xdist" 2>/dev/null; then
  exec python -m pytest -q -p no:cacheprovider --durations=25 -m "$one" "$@"
fi
rc=0
python -m pytest -q -p no:cacheprovider --durations=25 -n "$workers" --dist loadfile -m "$parallel" "$@" || rc=$?
rc2=0
python -m pytest -q -p no:cacheprovider --durations=25 -m "$serial" "$@" || rc2=$?
# 5: no test collected (arguments that select no serial test, or only serial ones)
for r in "$rc" "$rc2"; do
  if [ "$r" != "0" ] && [ "$r" != "5" ]; then exit "$r"; fi
done
if [ "$rc" = "5" ] && [ "$rc2" = "5" ]; then exit 5; fi
exit 0

#!/usr/bin/env bash
# One command for a GPU machine (torch and triton preinstalled, no network): build, GPU tests, bench.
#
#   benchmarks/gpu_suite.sh OUT_DIR
#
# Steps, each under `timeout` and logged, the whole within PYATTN_SUITE_SECONDS (default 540 s):
#   nvidia-smi → build (pip install -e . --no-build-isolation --no-deps) → build_info →
#   GPU tests (pytest -m "requires_cuda or requires_sm90", junit XML) → pyattn-bench --shapes default.
# A failing step does not stop the next; the exit status is 1 if any step failed.
# OUT_DIR keeps few files (a GPU lease returns at most 8):
#   summary.txt          each step's exit status and time, the device, the test and bench tallies, and
#                        the drop-in summary (pyattn:auto / the PyTorch call it replaces, per case)
#   bench/results.json   every figure (docs/benchmarking.md describes the keys)
#   bench/table.txt      the printed table
#   plots.tar.gz         the bench's PNG plots
#   logs.tar.gz          one log per step, junit.xml
# Environment: PYTHON (default python3), PYATTN_CUDA_ARCH (default: this GPU's, e.g. 90a),
# MAX_JOBS (default: the core count), PYATTN_SUITE_SECONDS, per-step limits BUILD_SECONDS (240) and
# TEST_SECONDS (180) (the bench gets the rest), BENCH_ARGS (default "--shapes default").
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
SUITE_SECONDS=${PYATTN_SUITE_SECONDS:-540}
PACKING_SECONDS=15  # kept back for the tarballs and the summary
KILL_GRACE=10       # a step that ignores SIGTERM at its limit is killed this much later
LOGS=$(mktemp -d)
SUMMARY="$OUT/summary.txt"
deadline=$((SECONDS + SUITE_SECONDS - PACKING_SECONDS))
failed=()

cd "$ROOT" || exit 2
mkdir -p "$OUT/bench"
: > "$SUMMARY"
echo "pyattn GPU suite: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >> "$SUMMARY"

# step NAME LIMIT_SECONDS COMMAND...: run with a limit cut to the time left; log to $LOGS/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS - KILL_GRACE))
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then
        echo "$name: not run (the suite's ${SUITE_SECONDS} s were spent)" | tee -a "$SUMMARY"
        failed+=("$name")
        return
    fi
    local start=$SECONDS
    timeout --kill-after="$KILL_GRACE" "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local status=$?
    local verdict="ok"
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then verdict="TIMED OUT"; elif [ "$status" -ne 0 ]; then verdict="FAILED"; fi
    echo "$name: $verdict (exit $status, $((SECONDS - start)) s of ${limit} s)" | tee -a "$SUMMARY"
    if [ "$status" -ne 0 ]; then failed+=("$name"); fi
}

step nvidia-smi 30 bash -c 'nvidia-smi && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm --format=csv'
grep -m1 -E "NVIDIA|Tesla" "$LOGS/nvidia-smi.log" >> "$SUMMARY" 2>/dev/null

# Build for this GPU only (half the compile time of the default "80;90a").
if [ -z "${PYATTN_CUDA_ARCH:-}" ]; then
    capability=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
    case "$capability" in
        90) export PYATTN_CUDA_ARCH=90a ;;
        [0-9][0-9]) export PYATTN_CUDA_ARCH=$capability ;;
    esac
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
step build "${BUILD_SECONDS:-240}" "$PYTHON" -m pip install -e . --no-build-isolation --no-deps -v
step build-info 30 "$PYTHON" -m pyattn.build_info
# Only the GPU-marked tests: the rest ran in CI, and the AOT compile test needs no GPU. No -x:
# one failing case must not hide the others.
step tests "${TEST_SECONDS:-180}" "$PYTHON" -m pytest tests -m "requires_cuda or requires_sm90" -q -p no:cacheprovider \
    --ignore=tests/test_triton_compile.py --junitxml="$LOGS/junit.xml"
tail -n 3 "$LOGS/tests.log" 2>/dev/null | sed 's/^/  tests: /' >> "$SUMMARY"

# The bench stops starting cases 45 s before its limit, so it ends itself with its files written.
bench_limit=$((deadline - SECONDS - KILL_GRACE))
# shellcheck disable=SC2086  (BENCH_ARGS is a list of flags)
step bench "$bench_limit" "$PYTHON" -m pyattn.bench ${BENCH_ARGS:---shapes default} --out "$OUT/bench" \
    --time-budget $((bench_limit > 90 ? bench_limit - 45 : 45))
grep -E "^[0-9]+ runs in|^roofline|pyattn runs failed" "$LOGS/bench.log" 2>/dev/null | sed 's/^/  bench: /' >> "$SUMMARY"
# The drop-in summary: pyattn:auto against the PyTorch call each drop-in replaces, case by case.
awk '/^pyattn drop-ins against/ { on = 1 } on && /^$/ { exit } on' "$OUT/bench/table.txt" 2>/dev/null \
    | sed 's/^/  bench: /' >> "$SUMMARY"

shopt -s nullglob
plots=("$OUT"/bench/*.png)
if [ ${#plots[@]} -gt 0 ]; then
    tar -czf "$OUT/plots.tar.gz" -C "$OUT/bench" "${plots[@]##*/}" && rm -f "${plots[@]}"
fi
rm -f "$OUT"/bench/*.tmp
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
rm -rf "$LOGS"

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED steps: ${failed[*]}" | tee -a "$SUMMARY"
    exit 1
fi
echo "all steps passed" | tee -a "$SUMMARY"

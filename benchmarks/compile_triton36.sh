#!/usr/bin/env bash
# The compile report and the compile tests under Triton 3.6 (the GPU machine's version: torch 2.11 + Triton 3.6),
# beside the repository's own Triton (.venv, 3.8), on a machine without a GPU:
#
#     benchmarks/compile_triton36.sh            # both reports, their comparison, the compile tests under 3.6
#     REPORT_ONLY=1 benchmarks/compile_triton36.sh
#
# It makes a virtualenv outside the repository (VENV36, default /tmp/venv36) holding only Triton 3.6
# (`pip install --no-deps triton==3.6.0`); torch, numpy, pytest and the editable pyattn come from the repository's
# .venv through .pth files, which is read, never changed. Compiles are cached per Triton version under
# TRITON36_CACHE_DIR (default ~/.triton/cache-triton36): a cold run compiles ~1300 (spec, arch) pairs, about an
# hour on 2 cores. Outputs (OUT, default bench-out/triton36): report-triton36.json, report-triton38.json,
# compare.txt (benchmarks/compare_compile_reports.py: failures, spills, register and shared-memory differences).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV36=${VENV36:-/tmp/venv36}
TRITON36=${TRITON36:-triton==3.6.0}
CACHE36=${TRITON36_CACHE_DIR:-$HOME/.triton/cache-triton36}
OUT=${OUT:-$ROOT/bench-out/triton36}
PY38=$ROOT/.venv/bin/python
[ -x "$PY38" ] || { echo "no $PY38: run 'make venv build' first" >&2; exit 1; }

if [ ! -x "$VENV36/bin/python" ]; then
    python3 -m venv "$VENV36"
fi
if ! "$VENV36/bin/python" -c "import triton, sys; sys.exit(triton.__version__[:3] != '3.6')" 2>/dev/null; then
    "$VENV36/bin/pip" install --quiet --no-deps "$TRITON36"
fi
SITE36=$("$VENV36/bin/python" -c "import site; print(site.getsitepackages()[0])")
SITE38=$("$PY38" -c "import site; print(site.getsitepackages()[0])")
# After Triton 3.6's own site-packages, so its triton wins; the editable finder maps pyattn.kernels to kernels/.
echo "$SITE38" > "$SITE36/zz_repository_venv.pth"
cat "$SITE38"/__editable__*pyattn*.pth > "$SITE36/zzz_pyattn_editable.pth"
"$VENV36/bin/python" -c "import triton, torch, pyattn.kernels; print('triton', triton.__version__, 'torch', torch.__version__)"

mkdir -p "$OUT"
cd "$ROOT"
export PYATTN_SKIP_CUDA_BUILD=1
TRITON_CACHE_DIR=$CACHE36 "$VENV36/bin/python" -m pyattn.kernels.report --json > "$OUT/report-triton36.json" || true
"$PY38" -m pyattn.kernels.report --json > "$OUT/report-triton38.json" || true
"$PY38" benchmarks/compare_compile_reports.py "$OUT/report-triton38.json" "$OUT/report-triton36.json" \
    | tee "$OUT/compare.txt" | tail -n 3
[ -n "${REPORT_ONLY:-}" ] && exit 0
TRITON_CACHE_DIR=$CACHE36 TRITON_INTERPRET=0 "$VENV36/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_triton_compile.py tests/test_decode_compile.py

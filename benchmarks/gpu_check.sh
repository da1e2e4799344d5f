#!/usr/bin/env bash
# One command for a machine with a CUDA GPU and no network: build the extension in place, print
# `python3 -m fastattn.info`, run the whole test suite on the GPU (GPU-only tests included), then
# the benchmark of fastattn's Triton and CUDA kernels against every SDPA backend, and against
# FlexAttention for a sliding window. Writes into OUT_DIR (default $OUT):
#   gpu_check.log          everything printed, step by step, with the summary last
#   bench/                 bench.csv, bench.json, summary.md, time_vs_n.png, tflops_vs_n.png
#   flex/                  the same for the FlexAttention comparison
# Every step has a time budget so that the whole run ends within 10 minutes on one H100; a failing
# step does not stop the others, but the exit status is non-zero if any step failed.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#   GPU_CHECK_STEPS="build tests" bash benchmarks/gpu_check.sh OUT_DIR    # a subset of: build tests bench flex
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${1:-${OUT:-}}"
if [ -z "$OUT_DIR" ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR   (or set OUT)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
STEPS="${GPU_CHECK_STEPS:-build tests bench flex}"
TOTAL_BUDGET="${GPU_CHECK_BUDGET_S:-570}"   # seconds for everything; the device tool allows 600
START=$(date +%s)
SUMMARY=()
FAILED=0

log() { echo "$@" | tee -a "$LOG"; }
wanted() { [[ " $STEPS " == *" $1 "* ]]; }

# run_step NAME BUDGET_S COMMAND...: runs COMMAND with at most BUDGET_S seconds (less if the total
# budget is nearly spent), appends its output to the log, records the outcome.
run_step() {
    local name="$1" budget="$2"; shift 2
    local left=$(( TOTAL_BUDGET - ($(date +%s) - START) - 10 ))
    (( budget > left )) && budget=$left
    if (( budget < 10 )); then
        SUMMARY+=("$(printf '%-12s SKIPPED (time budget spent)' "$name")"); FAILED=1; return
    fi
    log ""
    log "===== $name (budget ${budget} s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$budget" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - t0 ))
    local outcome="ok"
    if (( rc == 124 || rc == 137 )); then outcome="TIMED OUT"; elif (( rc != 0 )); then outcome="FAILED (rc $rc)"; fi
    [ "$outcome" = "ok" ] || FAILED=1
    SUMMARY+=("$(printf '%-12s %-16s %4d s' "$name" "$outcome" "$took")")
}

run_step machine 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; \
    $PY -c 'import sys, torch, triton; print(sys.version.split()[0], \"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.version.cuda)'; nproc"
# Built with torch's own compiler, the g++ on PATH: the image of the GPU machines we are lent sets
# CC/CXX to a wrapper (/opt/gcc/bin/g++) whose extension crashed the process (SIGSEGV) whenever a
# C++ error (TORCH_CHECK) crossed into libtorch; plain g++ 13.3, the same version, does not.
if command -v g++ > /dev/null && command -v gcc > /dev/null; then export CC=gcc CXX=g++; fi
wanted build && run_step build 90 "$PY" setup.py build_ext --inplace
run_step info 30 "$PY" -m fastattn.info

# The whole test suite in one run: autotuning off (each launch takes its bucket's first config; the
# benchmark autotunes); pytest-xdist, when present, spreads the tests (and triton's compilations)
# over every core, each worker with two OpenMP threads for the CPU kernels' tests. The slowest
# tests are listed, so that the budgets can be kept.
PYTEST=("$PY" -m pytest -q -ra -p no:cacheprovider --durations=15)
if "$PY" -c "import xdist" 2>/dev/null; then PYTEST+=(-n "$(nproc)"); fi
wanted tests && run_step tests 330 env FASTATTN_TRITON_AUTOTUNE=0 OMP_NUM_THREADS=2 "${PYTEST[@]}" tests

# The issue's shapes: bf16, D = 128, H = 16 (H * D = 2048), B * N = 16k tokens.
SHAPE=(--device cuda --dtype bf16 --heads 16 --head-dim 128 --tokens 16384)
wanted bench && run_step bench 120 "$PY" -m fastattn.bench "${SHAPE[@]}" \
    --seqlen 1024 2048 4096 8192 16384 --cases full causal window:256,256 window:512,0 --modes fwd fwd_bwd \
    --backends triton cpp --peers sdpa-flash sdpa-efficient sdpa-cudnn sdpa-math --quiet --out "$OUT_DIR/bench"

# FlexAttention compiles each setting afresh, with inductor's caches off (its compile time is
# reported apart): it gets one sliding-window setting, last (47 s on an H100).
wanted flex && run_step flex 60 "$PY" -m fastattn.bench "${SHAPE[@]}" \
    --seqlen 8192 --cases window:256,256 --modes fwd fwd_bwd \
    --backends triton cpp --peers flex sdpa-cudnn --out "$OUT_DIR/flex"

run_step summary 20 "$PY" - "$OUT_DIR/bench/bench.csv" "$OUT_DIR/flex/bench.csv" <<'EOF'
"""Per setting of the benchmark CSVs: fastattn's Triton and CUDA kernels against the fastest SDPA
backend and FlexAttention (ms and TFLOP/s by DESIGN section 6; ratio = peer ms / fastattn ms)."""
import csv, os, sys

rows = [row for path in sys.argv[1:] if os.path.exists(path) for row in csv.DictReader(open(path))]
groups = {}
for row in rows:
    groups.setdefault((row["case"], int(row["seqlen"]), row["mode"]), {})[row["contestant"]] = row

def ok(row):
    return row is not None and row["status"] == "ok"

def cell(row):
    if row is None:
        return f"{'-':>16}"
    if not ok(row):
        return f"{row['status']:>16}"
    return f"{float(row['ms']):8.3f} {float(row['tflops']):7.1f}"

print(f"{'case':>16} {'N':>6} {'mode':>8} | {'triton ms  TF/s':>16} | {'cpp ms  TF/s':>16} | "
      f"{'best SDPA':>16} {'ms  TF/s':>16} | {'flex ms  TF/s':>16} | triton/SDPA cpp/SDPA")
for (case, seqlen, mode), block in sorted(groups.items()):
    sdpa = [(name, row) for name, row in block.items() if name.startswith("sdpa") and ok(row)]
    best_name, best = min(sdpa, key=lambda item: float(item[1]["ms"])) if sdpa else ("-", None)
    ours = {name: block.get(f"fastattn[{name}]") for name in ("triton", "cpp")}
    speedups = [f"{float(best['ms']) / float(row['ms']):10.2f}" if ok(row) and best else f"{'-':>10}"
                for row in ours.values()]
    print(f"{case:>16} {seqlen:>6} {mode:>8} | {cell(ours['triton'])} | {cell(ours['cpp'])} | "
          f"{best_name:>16} {cell(best)} | {cell(block.get('flex'))} | {' '.join(speedups)}")
EOF

log ""
log "===== gpu_check summary ($(( $(date +%s) - START )) s; logs, CSV, JSON and PNGs in $OUT_DIR)"
for line in "${SUMMARY[@]}"; do log "$line"; done
if (( FAILED )); then log "RESULT: FAILED"; exit 1; fi
log "RESULT: all steps passed"

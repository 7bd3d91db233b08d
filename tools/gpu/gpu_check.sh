#!/usr/bin/env bash
# Everything a GPU machine should check, in one command of at most ~10 minutes (see
# tools/gpu/README.md): build with the CUDA kernels, run the GPU tests, run the GPU benchmark.
#
#   bash tools/gpu/gpu_check.sh
#
# Stages, each printed with its wall time and capped with `timeout`:
#   gpu      nvidia-smi summary, nvcc version                                     (30 s)
#   wheels   optional: pip install --no-index --no-deps $GPU_CHECK_WHEELS/*.whl  (120 s)
#            (e.g. a liger-kernel wheel on a machine without network)
#   build    FASTDISTILL_CUDA=1 pip install --no-build-isolation --no-deps -e . -v; prints the
#            ptxas registers/stack/spills of every CUDA kernel and fails on any spill or when
#            the core has no CUDA kernels; if the CUDA build fails, a CPU-only build follows so
#            that the Triton tests and the benchmark still run                       (240 s)
#   env      python -m fastdistill env                                            (45 s)
#   tests    FASTDISTILL_GPU_STRICT=1 TRITON_INTERPRET=0 pytest -q -m gpu tests/test_gpu.py tests/test_gpu_linear.py
#            (<= 240 s, less if the deadline needs it)
#   bench    python -m bench.gpu_bench --require-backends, with the time that is left
#            (it starts no new row once its budget is spent)
# Every stage runs even when an earlier one failed; the exit status is 1 if any failed.
#
# Environment:
#   PYTHON                  interpreter (default: python3, else python)
#   GPU_CHECK_DEADLINE_S    total budget in seconds (default 570)
#   FASTDISTILL_CUDA_ARCHS  CUDA architectures to build (default: this GPU's, e.g. "90")
#   GPU_CHECK_WHEELS        folder of extra wheels to install first (optional)
#   GPU_CHECK_BENCH_ARGS    extra arguments for bench.gpu_bench, e.g. "--quick"
#   OUT                     results (gpu_results.md/.json) and logs go here; without it the
#                           results go to bench/results/ and the logs to a fresh /tmp folder
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # the repository root (this file is tools/gpu/)
T0=$SECONDS
DEADLINE=${GPU_CHECK_DEADLINE_S:-570}
FAILED=0
SUMMARY=()

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if command -v python3 >/dev/null 2>&1; then PY=python3; else PY=python; fi
fi
if [ -n "${OUT:-}" ]; then
  LOG_DIR=$OUT
else
  LOG_DIR=$(mktemp -d /tmp/fastdistill-gpu-check.XXXXXX)
fi
mkdir -p "$LOG_DIR"

# Compiled Triton kernels, not the interpreter that tests/conftest.py turns on for the CPU suite
# (Triton decides once per process, when a kernel module is imported); and no forced backend:
# each test and benchmark row selects its own.
export TRITON_INTERPRET=0
unset FASTDISTILL_BACKEND

elapsed() { echo $((SECONDS - T0)); }
remaining() { echo $((DEADLINE - (SECONDS - T0))); }

# cap LIMIT [RESERVE]: LIMIT, or less so that RESERVE seconds of the deadline stay for later
# stages (never below 10 s).
cap() {
  local limit=$1 reserve=${2:-0} left
  left=$(($(remaining) - reserve))
  [ "$left" -lt "$limit" ] && limit=$left
  [ "$limit" -lt 10 ] && limit=10
  echo "$limit"
}

STAGE_NAME=""
STAGE_T0=0
stage_begin() { # NAME LIMIT DESCRIPTION
  STAGE_NAME=$1
  STAGE_T0=$SECONDS
  echo
  echo "=== [$1] $(date +%H:%M:%S), ${2}s at most, $(elapsed)s into the check: $3"
}
stage_end() { # RC [NOTE]
  local rc=$1 note=${2:-} dt status
  dt=$((SECONDS - STAGE_T0))
  if [ "$rc" -eq 0 ]; then
    status="ok"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="TIMEOUT"
    FAILED=1
  else
    status="FAILED (exit $rc)"
    FAILED=1
  fi
  [ -n "$note" ] && status="$status; $note"
  SUMMARY+=("$(printf '%-7s %5ss  %s' "$STAGE_NAME" "$dt" "$status")")
  echo "=== [$STAGE_NAME] $status, ${dt}s"
}
# run LIMIT CMD...: the command under `timeout` (TERM at LIMIT, KILL 15 s later); returns its
# status (124 or 137 when it ran out of time).
run() {
  local limit=$1 rc=0
  shift
  timeout --kill-after=15 "$limit" "$@" || rc=$?
  return "$rc"
}

echo "fastdistill GPU check: $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
  "$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo '(uncommitted changes)')," \
  "python $PY ($(command -v "$PY")), deadline ${DEADLINE}s, logs in $LOG_DIR"

# ---- gpu ---------------------------------------------------------------------------------------
stage_begin gpu 30 "nvidia-smi, nvcc"
rc=0
run 30 nvidia-smi --query-gpu=index,name,driver_version,compute_cap,memory.total,memory.used,utilization.gpu,temperature.gpu,clocks.sm,clocks.max.sm,power.limit --format=csv || rc=$?
if ! command -v nvcc >/dev/null 2>&1; then
  for dir in /usr/local/cuda/bin /usr/local/cuda-*/bin /opt/cuda/bin; do
    if [ -x "$dir/nvcc" ]; then
      export PATH="$dir:$PATH"
      break
    fi
  done
fi
if command -v nvcc >/dev/null 2>&1; then
  export CUDACXX=${CUDACXX:-$(command -v nvcc)}
  echo "nvcc: $(command -v nvcc): $(nvcc --version | grep -i release || true)"
else
  echo "nvcc: not found (on PATH, /usr/local/cuda*/bin, /opt/cuda/bin): the CUDA build will fail"
  rc=1
fi
if [ -z "${FASTDISTILL_CUDA_ARCHS:-}" ]; then
  cap_str=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .' || true)
  if [[ "$cap_str" =~ ^[0-9]+$ ]]; then
    export FASTDISTILL_CUDA_ARCHS=$cap_str
  fi
fi
echo "FASTDISTILL_CUDA_ARCHS=${FASTDISTILL_CUDA_ARCHS:-(unset, so the build default)}"
stage_end "$rc"

# ---- wheels (optional) -------------------------------------------------------------------------
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
  stage_begin wheels 120 "pip install --no-index --no-deps $GPU_CHECK_WHEELS/*.whl"
  rc=0
  shopt -s nullglob
  wheels=("$GPU_CHECK_WHEELS"/*.whl)
  shopt -u nullglob
  if [ "${#wheels[@]}" -eq 0 ]; then
    echo "no wheels in $GPU_CHECK_WHEELS"
    rc=1
  else
    run 120 "$PY" -m pip install --no-index --no-deps "${wheels[@]}" || rc=$?
  fi
  stage_end "$rc"
fi

# ---- build -------------------------------------------------------------------------------------
limit=$(cap 240 200)
stage_begin build "$limit" "FASTDISTILL_CUDA=1 pip install --no-build-isolation --no-deps -e . -v"
BUILD_LOG=$LOG_DIR/build.log
rc=0
# -Xptxas=-v makes ptxas report registers, stack and spills per kernel (harmless if the CMake
# flags pass it too); build.verbose shows the full compiler commands in the log.
FASTDISTILL_CUDA=1 CUDAFLAGS="${CUDAFLAGS:-} -Xptxas=-v" \
  run "$limit" "$PY" -m pip install --no-build-isolation --no-deps -v -e . \
  -C build.verbose=true >"$BUILD_LOG" 2>&1 || rc=$?
note=""
cuda_build_rc=$rc
echo "--- ptxas report (arch, registers, stack frame bytes, spill store/load bytes, kernel):"
awk '
  /Compiling entry function/ {
    fn = $0; sub(/.*function \047/, "", fn); sub(/\047.*/, "", fn)
    arch = $0; sub(/.* for \047/, "", arch); sub(/\047.*/, "", arch)
  }
  /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
  /Used [0-9]+ registers/ {
    regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
    printf "  %-7s %4s regs  %6s B stack  %s/%s B spills  %s\n", arch, regs, stack, st, ld, fn
    n++
  }
  END { if (n == 0) print "  (no ptxas lines in the build log)" }
' "$BUILD_LOG" | if command -v c++filt >/dev/null 2>&1; then c++filt; else cat; fi
if grep -Eq '[1-9][0-9]* bytes spill (stores|loads)' "$BUILD_LOG"; then
  echo "--- register spills:"
  grep -E -B3 '[1-9][0-9]* bytes spill (stores|loads)' "$BUILD_LOG" | grep -E 'entry function|spill' || true
  rc=1
  note="register spills"
fi
if [ "$cuda_build_rc" -ne 0 ]; then
  echo "--- the CUDA build failed (exit $cuda_build_rc); its errors, then the end of $BUILD_LOG:"
  grep -E '(error|Error|ERROR)[: ]' "$BUILD_LOG" | grep -v -- '-Werror' | head -n 40 || true
  echo "..."
  tail -n 20 "$BUILD_LOG"
  note="${note:+$note; }build failed"
elif ! "$PY" -c "import sys, fastdistill._C as c; sys.exit(0 if c.built_with_cuda() else 1)"; then
  echo "--- the installed core has no CUDA kernels (fastdistill._C.built_with_cuda() is False)"
  rc=1
  note="${note:+$note; }no CUDA kernels in the core"
fi
stage_end "$rc" "$note"
if [ "$cuda_build_rc" -ne 0 ]; then
  # Keep going: a CPU-only core still lets the Triton tests and the benchmark run.
  limit=$(cap 180 160)
  stage_begin build0 "$limit" "fallback: FASTDISTILL_CUDA=0 pip install --no-build-isolation --no-deps -e ."
  rc=0
  FASTDISTILL_CUDA=0 run "$limit" "$PY" -m pip install --no-build-isolation --no-deps -v -e . \
    >"$LOG_DIR/build-cpu.log" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] || tail -n 30 "$LOG_DIR/build-cpu.log"
  stage_end "$rc" "CPU-only fallback"
fi

# ---- env ---------------------------------------------------------------------------------------
stage_begin env 45 "python -m fastdistill env"
rc=0
run 45 "$PY" -m fastdistill env 2>&1 | tee "$LOG_DIR/env.log" || rc=$?
stage_end "$rc"

# ---- tests -------------------------------------------------------------------------------------
limit=$(cap 240 120)
stage_begin tests "$limit" "FASTDISTILL_GPU_STRICT=1 TRITON_INTERPRET=0 pytest -q -m gpu tests/test_gpu.py tests/test_gpu_linear.py"
rc=0
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "torch sees no CUDA device (torch.cuda.is_available() is False): the GPU tests cannot run"
  rc=1
else
  FASTDISTILL_GPU_STRICT=1 PYTHONUNBUFFERED=1 run "$limit" "$PY" -m pytest -q -m gpu -rsfE \
    -p no:cacheprovider tests/test_gpu.py tests/test_gpu_linear.py 2>&1 | tee "$LOG_DIR/tests.log" || rc=$?
fi
stage_end "$rc"

# ---- bench -------------------------------------------------------------------------------------
left=$(remaining)
bench_args=()
if [ -n "${GPU_CHECK_BENCH_ARGS:-}" ]; then
  read -r -a bench_args <<<"$GPU_CHECK_BENCH_ARGS"
fi
if [ "$left" -lt 60 ]; then
  stage_begin bench 0 "python -m bench.gpu_bench"
  echo "only ${left}s of the ${DEADLINE}s deadline left: the benchmark did not run"
  stage_end 1 "no time left"
else
  limit=$((left - 10))
  budget=$((limit - 70)) # a row in progress (torch.compile of a big graph) may take ~60 s more
  [ "$budget" -lt 20 ] && budget=20
  stage_begin bench "$limit" "python -m bench.gpu_bench --require-backends --budget-s $budget ${bench_args[*]+${bench_args[*]}}"
  rc=0
  PYTHONUNBUFFERED=1 run "$limit" "$PY" -m bench.gpu_bench --require-backends \
    --budget-s "$budget" ${bench_args[@]+"${bench_args[@]}"} 2>&1 | tee "$LOG_DIR/bench.log" || rc=$?
  stage_end "$rc"
fi

# ---- summary -----------------------------------------------------------------------------------
echo
echo "=== summary ($(elapsed)s in all; logs in $LOG_DIR)"
for line in "${SUMMARY[@]}"; do
  echo "  $line"
done
if [ -n "${OUT:-}" ]; then
  echo "  results: $OUT/gpu_results.md"
else
  echo "  results: the newest bench/results/gpu-*.md"
fi
if [ "$FAILED" -ne 0 ]; then
  echo "GPU check FAILED"
  exit 1
fi
echo "GPU check passed"

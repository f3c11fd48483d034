#!/usr/bin/env bash
# One-shot GPU check of the cuda and triton backends (docs/backends.md, "CUDA and Triton: status").
#
# Run from the repository root on a machine with an NVIDIA GPU, nvcc and a CUDA build of torch:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Stages, each under `timeout`, each run whatever the previous ones did, all within GPU_CHECK_BUDGET_S
# seconds (default 460, i.e. under 8 minutes):
#   1. env      versions (nvidia-smi, python3, torch, triton, nvcc, ninja, pytest-timeout)   -> $OUT/env.log
#   2. build    MASKED_OPTIM_BUILD_CUDA=1 python3 setup.py build_ext --inplace (one .so holding the
#               CPU and the CUDA kernels; no pip, no network)                                  -> $OUT/build.log
#   3. test_gpu tests/test_gpu.py on CUDA tensors, TRITON_INTERPRET=0,
#               MASKED_OPTIM_REQUIRE_GPU_BACKENDS=1 (a backend that cannot run fails)          -> $OUT/test_gpu.log
#   4. bench    benchmarks/bench_step.py --device cuda                    -> $OUT/bench_gpu.log, bench_gpu.json
# then one summary line per stage (also in $OUT/summary.txt). Exit status 0 when every stage passed.
#
# Knobs: PYTEST_STOP (default -x: test_gpu stops at its first failure; e.g. PYTEST_STOP=--maxfail=20
# to see more; the stop is dropped anyway when the build failed, so that the triton checks still
# report); GPU_CHECK_WORKERS (default 8: pytest-xdist workers for the test_gpu stage when xdist
# is importable, 0 for one process; test_gpu.py compiles some 300 Triton specialisations, about
# 0.1-0.4 s each on one core); GPU_CHECK_BUDGET_S (default 460).
set -u

OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
ROOT="$PWD"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-460}))
PYTEST_STOP="${PYTEST_STOP--x}"
export PYTHONUNBUFFERED=1
SUMMARY=""
FAILED_ANY=0
export ROOT OUT

remaining() { echo $((DEADLINE - $(date +%s))); }

# limit WANTED RESERVE FLOOR: WANTED seconds, or fewer so that RESERVE seconds stay for the later
# stages, but not under FLOOR seconds while the budget has them (the essential stages come first).
limit() {
  local rem r
  rem=$(($(remaining) - 5))
  r=$((rem - $2))
  [ "$r" -lt "$3" ] && r=$3
  [ "$r" -gt "$rem" ] && r=$rem
  [ "$r" -gt "$1" ] && r=$1
  echo "$r"
}

# stage NAME LIMIT LOG CMD...: runs CMD under `timeout LIMIT`, output shown and tee'd to LOG; sets RC.
stage() {
  local name=$1 lim=$2 log=$3 t0 secs status
  shift 3
  echo
  echo "=================== $name (limit ${lim}s, $(remaining)s left in the budget) ==================="
  if [ "$lim" -lt 20 ]; then
    RC=125
    FAILED_ANY=1
    echo "skipped: only ${lim}s left" | tee "$log"
    SUMMARY="${SUMMARY}$(printf '%-9s SKIPPED   (no time left)' "$name")"$'\n'
    return
  fi
  t0=$(date +%s)
  { echo "+ $*"; timeout -k 10 "$lim" "$@" 2>&1; } | tee "$log"
  RC=${PIPESTATUS[0]}
  secs=$(($(date +%s) - t0))
  case "$RC" in
    0) status="OK" ;;
    124 | 137) status="TIMEOUT (after ${lim}s; partial log)" ;;
    *) status="FAILED (exit $RC)" ;;
  esac
  [ "$RC" -ne 0 ] && FAILED_ANY=1
  echo "--- $name: $status in ${secs}s"
  SUMMARY="${SUMMARY}$(printf '%-9s %-40s %4ss  %s' "$name" "$status" "$secs" "${log#"$OUT"/}")"$'\n'
}

# ------------------------------------------------------------------------------------------ 1. env
env_info() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   repo: $ROOT   commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "--- nvidia-smi -L"
  timeout 15 nvidia-smi -L || echo "nvidia-smi -L failed"
  timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
  echo "--- python3: $(command -v python3)  $(python3 --version 2>&1)"
  timeout 45 python3 - <<'EOF' || echo "python3: importing torch / triton failed"
import importlib, os, torch
print("torch", torch.__version__, "| torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device 0:", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
from torch.utils.cpp_extension import CUDA_HOME
print("torch's CUDA_HOME:", CUDA_HOME)
hdr = os.path.join(os.path.dirname(torch.__file__), "include", "torch", "headeronly", "version.h")
print("torch/headeronly/version.h (csrc/module.cpp includes it):", "present" if os.path.isfile(hdr) else "MISSING")
for name in ("triton", "setuptools", "ninja", "pytest", "pytest_timeout", "numpy"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'importable')}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
EOF
  echo "--- nvcc: $(command -v nvcc || echo 'not on PATH')"
  timeout 30 nvcc --version 2>&1 | tail -n 2
  echo "--- ninja: $(command -v ninja || echo 'not on PATH (the build then compiles one file at a time)')"
  echo "--- gcc: $(gcc --version 2>&1 | head -n 1)"
  echo "--- cores: $(nproc)"
}
export -f env_info
stage env "$(limit 60 0 0)" "$OUT/env.log" bash -c env_info

# ---------------------------------------------------------------------------------------- 2. build
# CUDA_HOME: $CUDA_HOME, else the folder above `which nvcc`'s, else /usr/local/cuda, else the TOP that
# nvcc itself reports (a /usr/local/bin/nvcc wrapper script sits above no toolkit); the first that
# holds bin/nvcc and include/cuda_runtime.h.
nvcc_top() { timeout 30 nvcc -dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1; }
CUDA_HOME_FOUND=""
for cand in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")")" \
  /usr/local/cuda "$(nvcc_top)"; do
  if [ -n "$cand" ] && [ -x "$cand/bin/nvcc" ] && [ -f "$cand/include/cuda_runtime.h" ]; then
    CUDA_HOME_FOUND=$(cd "$cand" && pwd -P)
    break
  fi
done
if [ -n "$CUDA_HOME_FOUND" ]; then
  export CUDA_HOME="$CUDA_HOME_FOUND"
  export PATH="$CUDA_HOME/bin:$PATH"
  echo "CUDA_HOME=$CUDA_HOME"
else
  echo "CUDA_HOME: no toolkit found (\$CUDA_HOME, \`which nvcc\`/.., /usr/local/cuda, nvcc's TOP); the CUDA build will fail"
fi
build() {
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  MASKED_OPTIM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=16 python3 setup.py build_ext --inplace || return $?
  ls -l masked_optim/_C*.so || return 1
  # What the package sees: versions, build info and each backend usable or why not; then the
  # build must have loaded with its CUDA kernels (build_info cuda=yes).
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 python3 -m masked_optim env
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" python3 -c "
from masked_optim.backends import _cpp_lib
info = _cpp_lib.build_info()
assert _cpp_lib.available() and info.get('cuda') == 'yes', f'extension not loaded with CUDA: {_cpp_lib.unavailable_reason()} {info}'
print('extension loaded with its CUDA kernels:', info)"
}
export -f build
stage build "$(limit 300 200 120)" "$OUT/build.log" bash -c build
BUILD_RC=$RC
if [ "$BUILD_RC" -ne 0 ]; then
  echo "!!! build failed (exit $BUILD_RC); the end of $OUT/build.log:"
  grep -n -i -E "error|fatal|failed" "$OUT/build.log" | head -n 30
  tail -n 40 "$OUT/build.log"
fi

# ------------------------------------------------------------------------------------- 3. test_gpu
TEST_ENV=(env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 MASKED_OPTIM_REQUIRE_GPU_BACKENDS=1)
PYTEST_ARGS=()  # the plugins that this python3 has (an unknown option would stop pytest before any test)
if "${TEST_ENV[@]}" python3 -c "import pytest_timeout" >/dev/null 2>&1; then
  PYTEST_ARGS=(--timeout=120)
fi
WORKERS="${GPU_CHECK_WORKERS:-8}"
if [ "$WORKERS" -gt 0 ] && "${TEST_ENV[@]}" python3 -c "import xdist" >/dev/null 2>&1; then
  PYTEST_ARGS+=(-n "$WORKERS")
fi
STOP_ARGS=()
if [ "$BUILD_RC" -eq 0 ] && [ -n "$PYTEST_STOP" ]; then
  STOP_ARGS=("$PYTEST_STOP")
fi

stage test_gpu "$(limit 240 150 90)" "$OUT/test_gpu.log" \
  "${TEST_ENV[@]}" python3 -m pytest tests/test_gpu.py -q -rfEs --durations=8 -p no:cacheprovider -p no:benchmark \
  ${STOP_ARGS[@]+"${STOP_ARGS[@]}"} ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"}


# ----------------------------------------------------------------------------------------- 4. bench
stage bench "$(limit 200 0 0)" "$OUT/bench_gpu.log" \
  "${TEST_ENV[@]}" python3 benchmarks/bench_step.py --device cuda --sizes 1,10,100 --repeats 15 --out "$OUT/bench_gpu.json"

# --------------------------------------------------------------------------------------- summary
{
  echo "gpu_check summary ($(($(date +%s) - START))s in all; logs under \$OUT):"
  printf '%s' "$SUMMARY"
  for t in test_gpu; do
    if [ -f "$OUT/$t.log" ]; then
      line=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)|no tests ran|Interrupted' "$OUT/$t.log" | tail -n 1)
      echo "$t: ${line:-(no pytest summary line)}"
    fi
  done
} | tee "$OUT/summary.txt"

exit "$FAILED_ANY"

#!/usr/bin/env bash
# The GPU run of the benchmarks, at one commit, in at most ~9 minutes on one H100/H200:
#   1. the equal-work provider comparison at the issue's shapes (python -m benchmarks.compare --quick:
#      Llama-3-8B / Qwen2.5-7B / Gemma-2-2B heads at 8k, Llama at 32k and 2k, Gemma soft-capped, bf16, every
#      position a target, then the same masked, then fp16 and fp32 on the Llama head at 8k);
#   2. the stage breakdown of the op (python -m benchmarks.breakdown) on the Llama and Gemma heads;
#   3. the package's tests on the GPU (python -m pytest -q tests -x).
#
#   OUT=/some/dir MPPO_GIT_COMMIT=<40-hex sha> MPPO_GIT_DIRTY=false bash benchmarks/gpu_suite.sh
#
# Everything lands in $OUT/benchmarks/results/<device>/ (the repository's own layout, so the folder can be
# copied over as it is): results.{json,jsonl,md}, fwd_bwd_{time,memory}.png, breakdown.json, gpu_tests.txt,
# nvidia-smi.txt, suite.log and status.txt (one line per part: ok, failed with its exit code, or timed out).
# Fail-soft: every part runs under its own time limit (and within what is left of SUITE_LIMIT_S); a part
# that fails or runs out of time keeps what it wrote (compare.py rewrites results.json after every provider)
# and the next part still runs. Baseline wheels (liger-kernel, cut-cross-entropy) found in $WHEELS
# (default ./.whl) are installed first with --no-deps, so torch is never replaced.
#
# SUITE_DEVICE=cpu runs the same steps with tiny CPU shapes (a check of this script, not a measurement).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the folder that receives the results}
PY=${PYTHON:-python}
SUITE_LIMIT_S=${SUITE_LIMIT_S:-540}
WHEELS=${WHEELS:-.whl}
DEVICE=${SUITE_DEVICE:-cuda}
export CCE_AUTOTUNE=${CCE_AUTOTUNE:-1}   # CCE tuned as its users would; read when CCE is imported
export PYTHONUNBUFFERED=1
START=$(date +%s)

if [ "$DEVICE" = cuda ]; then
  COMPARE_ARGS=(--quick --no-losses --modes fwd_bwd fwd_nograd
                --providers naive naive_compacted liger_flce liger_flce_compacted cce_exact cce_filtered ours ours_budget)
  BREAKDOWN_ARGS=(--heads llama3-8b gemma2-2b --N 8192 --dtype bf16)
  TEST_ARGS=(tests -x)
else
  COMPARE_ARGS=(--device cpu --heads llama3-8b/16 --tokens 64 --K 2 --no-losses --no-cpu-targets --samples 2
                --min-time-ms 0 --modes fwd_bwd fwd_nograd)
  BREAKDOWN_ARGS=(--device cpu --heads llama3-8b/16 --N 64 --samples 2)
  TEST_ARGS=(tests --collect-only)
fi

# Preflight: the stamp must be writable (MPPO_GIT_* well formed, or git here) and the device present.
SLUG=$("$PY" - "$DEVICE" <<'EOF'
import sys, torch
from benchmarks.stamp import device_slug, run_stamp
dev = sys.argv[1]
if dev == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_suite: no CUDA device (SUITE_DEVICE=cpu checks the script on CPU)")
s = run_stamp(dev)
print(f"stamp: {s['device']}, torch {s['torch']}, triton {s['triton']}, commit {s['git_commit']} "
      f"(dirty: {s['git_dirty']}, from {s['git_source']})", file=sys.stderr)
print(device_slug(dev) if dev == "cuda" else "cpu-suite-check")
EOF
) || { echo "gpu_suite: preflight failed, nothing run" >&2; exit 2; }
RES="$OUT/benchmarks/results/$SLUG"
mkdir -p "$RES"
LOG="$RES/suite.log"
: > "$RES/status.txt"
exec > >(tee -a "$LOG") 2>&1
echo "gpu_suite: writing $RES (limit ${SUITE_LIMIT_S} s)"

left() { echo $(( SUITE_LIMIT_S - ($(date +%s) - START) )); }

# part NAME CAP_S COMMAND...: run COMMAND under min(CAP_S, time left - 10 s); record the outcome.
part() {
  local name=$1 cap=$2; shift 2
  local limit; limit=$(( $(left) - 10 )); [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 15 ]; then
    echo "$name: skipped (suite time limit reached)" | tee -a "$RES/status.txt"; return
  fi
  echo "== $name (limit ${limit} s): $*"
  local t0=$(date +%s) rc=0
  timeout --kill-after=15 "$limit" "$@" || rc=$?
  local took=$(( $(date +%s) - t0 )) outcome
  case $rc in
    0) outcome=ok ;;
    124|137) outcome="timed out after ${limit} s (partial results kept)" ;;
    *) outcome="failed (exit $rc)" ;;
  esac
  echo "$name: $outcome, ${took} s" | tee -a "$RES/status.txt"
}

if [ "$DEVICE" = cuda ]; then
  nvidia-smi > "$RES/nvidia-smi.txt" 2>&1 || echo "nvidia-smi unavailable" > "$RES/nvidia-smi.txt"
fi
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  part wheels 60 "$PY" -m pip install -q --no-deps --no-index "$WHEELS"/*.whl
else
  echo "wheels: none in $WHEELS (baselines not installed are 'missing' rows)" | tee -a "$RES/status.txt"
fi
# compare.py starts no measurement after --budget-s; 40 s of margin let the one under way finish.
BUDGET=$(( $(left) - 50 )); [ "$BUDGET" -gt 260 ] && BUDGET=260; [ "$BUDGET" -lt 20 ] && BUDGET=20
part compare 300 "$PY" -m benchmarks.compare "${COMPARE_ARGS[@]}" --budget-s "$BUDGET" --out "$RES"
# The table and plots again from whatever results.json holds (compare writes the plots only at its end).
[ -f "$RES/results.json" ] && part report 30 "$PY" -m benchmarks.report "$RES/results.json"
part breakdown 75 "$PY" -m benchmarks.breakdown "${BREAKDOWN_ARGS[@]}" --json "$RES/breakdown.json"
part tests 200 bash -c "$PY -m pytest -q -p no:cacheprovider ${TEST_ARGS[*]} > '$RES/gpu_tests.txt' 2>&1; rc=\$?; tail -3 '$RES/gpu_tests.txt'; exit \$rc"
echo "gpu_suite: done in $(( $(date +%s) - START )) s"
cat "$RES/status.txt"

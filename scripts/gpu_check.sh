#!/usr/bin/env bash
# One prepared GPU check (H200 image: torch 2.11+cu130, triton 3.6, nvcc 13.0, Python 3.12), run from the
# repository root:  scripts/gpu_check.sh
#   DDPM_CHECK_BUDGET   total seconds (default 350)
#   DDPM_CHECK_STAGES   the stages after the build (default "gpu-tests op-tests warm op-bench sampling-bench
#                       profile dram-bytes sanitize"), e.g. DDPM_CHECK_BUDGET=300 DDPM_CHECK_STAGES="sampling-bench
#                       profile" for a second call (the build is incremental then) that runs what the first had
#                       no time for, within the 15 device minutes (a machine's start takes one or two of them)
#   DDPM_CHECK_WORKERS  processes that compile side by side (pytest-xdist workers, warm shards; default 8)
#
#   1. build the extension for sm_90 only (editable, --no-build-isolation, build/gpu), print build_info
#   2. pytest -m gpu (tests/test_cuda.py and the other GPU tests), then the op tests on cuda and triton, in
#      DDPM_CHECK_WORKERS processes when pytest-xdist is there (the H200 image has it): Triton compiles each
#      kernel specialization on first use, one at a time per process, and the op tests need 200+ of them
#   3. warm: the op benchmarks' kernels and torch.compile baselines compiled by DDPM_CHECK_WORKERS processes
#      side by side into the on-disk caches (table.py --warm-only), then benchmarks/table.py --device cuda
#      --record alone on the GPU (targets first; stops starting cases at its budget)
#   4. benchmarks/bench_sampling.py --device cuda --quick --record, when that file exists and time is left;
#      benchmarks/profile_sampling.py --record: where the time of those workloads goes, by kernel kind
#   5. benchmarks/dram_bytes.py: DRAM bytes per target op from ncu (does x reach DRAM once?)
#   6. compute-sanitizer memcheck over the GPU GroupNorm tests, racecheck over a few (shared-memory reductions)
#   7. copy the JSON records (and the logs) to $OUT when it is set; print a short table last
#
# Every stage runs under `timeout` with what is left of the budget, so the whole script ends within
# ~6 minutes whatever hangs; a stage that fails or times out is reported and the next one still runs.
# The sampling benchmark (~2.5 min by itself) starts only when 140 s are left; otherwise the summary says
# so and a second call with DDPM_CHECK_STAGES=sampling-bench runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${DDPM_CHECK_BUDGET:-350}
STAGES=" ${DDPM_CHECK_STAGES:-gpu-tests op-tests warm op-bench sampling-bench profile dram-bytes sanitize} "
WORKERS=${DDPM_CHECK_WORKERS:-8}
START=$(date +%s)
LOGS=$(mktemp -d)
touch "$LOGS/.start"  # records older than this are an earlier run's: never reported as this one's
export DDPM_CHECK_START=$START
declare -a SUMMARY=()

left() { echo $((BUDGET - ($(date +%s) - START))); }
# this_runs KIND: the newest benchmarks/results/KIND-cuda-*.json written by this run ("" if none)
this_runs() {
  find benchmarks/results -name "$1-cuda-*.json" -newer "$LOGS/.start" -printf '%T@ %p\n' 2>/dev/null |
    sort -n | tail -1 | cut -d' ' -f2-
}

# stage NAME MIN MAX COMMAND...: run under timeout min(MAX, time left), if at least MIN seconds are left;
# log to $LOGS/NAME.log.
stage() {
  local name=$1 min=$2 max=$3
  shift 3
  if [ "$name" != build ] && [[ $STAGES != *" $name "* ]]; then
    return 0
  fi
  local budget
  budget=$(left)
  ((budget > max)) && budget=$max
  if ((budget < min)); then
    SUMMARY+=("$name: skipped, $(left) s left < $min s (rerun: DDPM_CHECK_STAGES=$name $0)")
    echo "=== $name: skipped, $(left) s of the budget left"
    return 1
  fi
  echo "=== $name (timeout ${budget} s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - t0))
  case $rc in
    0) SUMMARY+=("$name: ok (${took} s)") ;;
    124 | 137) SUMMARY+=("$name: TIMED OUT after ${took} s") ;;
    *) SUMMARY+=("$name: FAILED rc=$rc (${took} s)") ;;
  esac
  return "$rc"
}

echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo '?')"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

# Wheels the image lacks (diffusers + importlib_metadata, zipp for the baselines): downloaded into .whl/
# (ignored by git) as the device README says, and carried with the call (carry: [".whl"]).
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/ddpm-site .whl/*.whl &&
    export PYTHONPATH=/tmp/ddpm-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  echo "WARNING: diffusers does not import (carry .whl/ with its wheel): its baselines and tests are left out"
  SUMMARY+=("WARNING: no diffusers: its baselines, the fidelity tests and 3 test files not collected")
fi

# The kernels run natively here: no host emulator of them (an editable build would add it, csrc/cuda_emulator).
export DDPM_FAST_CUDA=ON DDPM_FAST_CUDA_ARCHS=90-real DDPM_FAST_CUDA_EMULATOR=OFF CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
if ! stage build 60 200 "$PY" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -q -e . \
  --config-settings=build-dir=build/gpu; then
  echo "build failed: nothing else can run"
  printf '%s\n' "${SUMMARY[@]}"
  exit 1
fi
"$PY" -c "import json, ddpm_fast; print(json.dumps(ddpm_fast.build_info(), indent=1))"

# Tests check results, not speed: one Triton configuration per kernel instead of tuning every test shape,
# and 8 random cases per op test (tests/_fuzz.py; each may be a new Triton specialization to compile).
# -v: one line per test as it ends, so a stage killed at its timeout still names what failed; a module that
# cannot be collected (diffusers missing) costs its own tests only. Inductor: one compile worker per process
# (DDPM_CHECK_WORKERS processes already compile side by side; 16 workers each would be ~128 processes).
TESTS_ENV=(env DDPM_FAST_TRITON_AUTOTUNE=0 DDPM_FAST_FUZZ_CASES=8 TORCHINDUCTOR_COMPILE_THREADS=1)
PYTEST=(-m pytest -v --no-header -p no:cacheprovider --continue-on-collection-errors)
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n "$WORKERS")
stage gpu-tests 20 80 "${TESTS_ENV[@]}" "$PY" "${PYTEST[@]}" -m gpu tests "${PARALLEL[@]}"
stage op-tests 20 90 "${TESTS_ENV[@]}" "$PY" "${PYTEST[@]}" tests/test_q_sample.py tests/test_step.py \
  tests/test_group_norm.py tests/test_ops.py tests/test_triton.py -k "cuda or triton" "${PARALLEL[@]}"
# (timeout runs commands, not functions: hence bash -c; wait returns when every shard has ended)
stage warm 20 60 bash -c "for k in \$(seq 0 $((WORKERS - 1))); do
  TORCHINDUCTOR_COMPILE_THREADS=1 $PY benchmarks/table.py --device cuda --warm-only --shard \$k/$WORKERS \
    > $LOGS/warm-\$k.out 2>&1 & done; wait
  cat $LOGS/warm-*.out | grep -v ': ok (' | tail -20; echo \$(cat $LOGS/warm-*.out | grep -c ': ok (') calls ran"
# It stops starting cases 20 s before its stage's timeout, and its record is rewritten after every case.
OPS_MAX=$(($(left) < 110 ? $(left) : 110))
stage op-bench 30 110 "$PY" benchmarks/table.py --device cuda --record --max-seconds $((OPS_MAX - 20))
if [ -f benchmarks/bench_sampling.py ]; then
  # It stops starting measurements 30 s before its stage's timeout; its record is rewritten after every row.
  SAMPLING_MAX=$(($(left) < 200 ? $(left) : 200))
  stage sampling-bench 140 200 "$PY" benchmarks/bench_sampling.py --device cuda --quick --record \
    --max-seconds $((SAMPLING_MAX - 30))
fi
# Each workload takes a few seconds; it stops starting them 25 s before the stage's timeout.
PROFILE_MAX=$(($(left) < 90 ? $(left) : 90))
stage profile 40 90 "$PY" benchmarks/profile_sampling.py --device cuda --record --max-seconds $((PROFILE_MAX - 25))
stage dram-bytes 40 90 "$PY" benchmarks/dram_bytes.py --backend cuda
if command -v compute-sanitizer >/dev/null; then
  # memcheck: out-of-bounds / misaligned accesses of every GroupNorm path, the noise kernels and the
  # thresholded step; racecheck: the shared-memory reductions, GroupNorm's and the thresholded step's cluster
  # radix select (timeout runs commands, not functions: hence bash -c).
  # The GroupNorm strategies, thresholding and noisy-row tests run on every backend in test_group_norm.py and
  # test_step.py: their cuda cases.
  SANITIZE_TESTS="env DDPM_FAST_TRITON_AUTOTUNE=0 $PY -m pytest tests/test_cuda.py tests/test_step.py \
    tests/test_group_norm.py -x -v --no-header -p no:cacheprovider"
  STEP_CUDA="(test_step.py and cuda and (threshold_quantile or threshold_next or noisy_row))"
  GN_CUDA="(test_group_norm.py and cuda and (strategies or misaligned_upstream or without_activation or outliers))"
  stage sanitize 60 150 bash -c "compute-sanitizer --tool memcheck --error-exitcode 9 $SANITIZE_TESTS \
    -k '(test_cuda.py and (group_norm or noise or timestep or threshold)) or $STEP_CUDA or $GN_CUDA' && \
    compute-sanitizer --tool racecheck --error-exitcode 9 $SANITIZE_TESTS \
    -k '(test_group_norm.py and cuda and kernel_strategies and float32) or $STEP_CUDA'"
fi

if [ -n "${OUT:-}" ]; then
  # The newest record of each kind (at most 8 files come back), then the logs in one file.
  for kind in ops sampling profile; do
    newest=$(this_runs "$kind")
    [ -n "$newest" ] && cp "$newest" "$OUT/"
  done
  tail -n +1 "$LOGS"/*.log >"$OUT/gpu_check.log" 2>/dev/null
fi

echo
echo "=== summary ($(($(date +%s) - START)) s)"
printf '%s\n' "${SUMMARY[@]}"
for name in gpu-tests op-tests; do
  [ -f "$LOGS/$name.log" ] && echo "$name: $(grep -E '(passed|failed|error)' "$LOGS/$name.log" | tail -1)"
done
"$PY" - <<'EOF'
# The issue's targets (H200) against the newest op record: median us of each backend, % of copy bandwidth.
import glob, json, os
TARGETS = {  # (op prefix, shape, dtype, layout): target in us
    ("q_sample", (128, 3, 256, 256), "float32", "NCHW"): 85, ("q_sample", (256, 3, 32, 32), "float32", "NCHW"): 8,
    ("DDPM step", (128, 3, 256, 256), "float32", "NCHW"): 85, ("DDPM step", (256, 3, 32, 32), "float32", "NCHW"): 8,
    ("group_norm_silu fwd (", (128, 128, 32, 32), "float32", "NCHW"): 39,
    ("group_norm_silu fwd (", (128, 128, 32, 32), "bfloat16", "channels_last"): 20,
    ("group_norm_silu fwd (", (8, 320, 64, 64), "float32", "NCHW"): 25,
    ("group_norm_silu fwd+bwd", (128, 128, 32, 32), "float32", "NCHW"): 110,
}
def newest(kind):  # this run's newest record of the kind (an older one is an earlier run's)
    records = sorted((p for p in glob.glob(f"benchmarks/results/{kind}-cuda-*.json")
                      if os.path.getmtime(p) >= float(os.environ["DDPM_CHECK_START"])), key=os.path.getmtime)
    return (records[-1], json.load(open(records[-1]))) if records else (None, None)


path, data = newest("ops")
print(f"\n{path}: copy {data['copy_gbs']:.0f} GB/s, {data.get('cases_not_run', 0)} cases not run" if data else
      "\nno op record")
if data:  # ok: within the target and 1.3x faster than torch.compile; triton also within 1.15x of cuda
    print(f"{'op':28} {'shape':18} {'dtype':8} {'layout':13} {'cuda us':>8} {'%copy':>6} {'triton us':>9} "
          f"{'compile us':>10} {'target':>6}  ok cuda / triton")
for row in data["rows"] if data else ():
    shape = tuple(row["shape"])
    dtype = row["dtype"].replace("torch.", "")
    target = next((v for (op, s, d, l), v in TARGETS.items()
                   if row["op"].startswith(op) and s == shape and d == dtype and l == row["layout"]), None)
    us = lambda k: row[f"{k}_ms"]["median"] * 1e3 if f"{k}_ms" in row else float("nan")  # noqa: E731
    meets = lambda k: us(k) <= target and us(k) * 1.3 <= us("compile")  # noqa: E731 - NaN (not run): NO
    ok = "" if target is None else (f"{'yes' if meets('cuda') else 'NO'} / "
                                    f"{'yes' if meets('triton') and us('triton') <= 1.15 * us('cuda') else 'NO'}")
    print(f"{row['op'][:28]:28} {str(shape):18} {dtype:8} {row['layout']:13} {us('cuda'):8.1f} "
          f"{row.get('cuda_pct_copy', float('nan')):5.0f}% {us('triton'):9.1f} {us('compile'):10.1f} "
          f"{target if target else '':>6}  {ok}")

# The sampling issue's targets (ms, bf16): the best of our variants (eager, graph, channels_last).
SAMPLING = {("sampling", 256): 13.0, ("sampling", 1): 1.4, ("training", 128): 35.0}
path, data = newest("sampling")
print(f"\n{path}" if data else "\nno sampling record")
for (kind, batch), target in SAMPLING.items() if data else ():
    timed = [r for r in data["rows"] if r["kind"] == kind and r["batch"] == batch and "ms_per_step" in r
             and r["precision"].startswith("bf16")]
    best = {side: min((r for r in timed if r["variant"].startswith(side)),
                      key=lambda r: r["ms_per_step"]["median"], default=None) for side in ("ours", "diffusers")}
    ms = {side: r["ms_per_step"]["median"] if r else float("nan") for side, r in best.items()}
    name = {side: r["variant"] if r else "not run" for side, r in best.items()}
    print(f"{kind:8} batch {batch:3}: ours {ms['ours']:7.2f} ms ({name['ours']}), best diffusers "
          f"{ms['diffusers']:7.2f} ms ({name['diffusers']}), target {target}  {'yes' if ms['ours'] <= target else 'NO'}")

# Where the time goes (kernel time per step under the profiler; span - busy: the GPU waiting for the host).
path, data = newest("profile")
print(f"\n{path}" if data else "\nno profile record")
for row in data["rows"] if data else ():
    p = row.get("profile")
    head = f"{row['kind']:8} batch {row['batch']:3} {row['variant'][:26]:26}"
    if not p:
        print(f"{head} {row.get('error') or row.get('skipped')}")
        continue
    kinds = ", ".join(f"{k} {e['pct']:.0f}%" for k, e in list(p["kinds"].items())[:4])
    print(f"{head} busy {p['busy_ms']:7.2f} of {p['span_ms']:7.2f} ms, {p['launches']:4.0f} kernels: {kinds}")
EOF
# The per-op backend order the op record supports (paste into ddpm_fast/ops/backend.py), and Triton's
# worst case against the CUDA kernel (the Triton issue's 1.15x).
OPS_RECORD=$(this_runs ops)
if [ -n "$OPS_RECORD" ]; then "$PY" benchmarks/preference.py "$OPS_RECORD" || true; fi

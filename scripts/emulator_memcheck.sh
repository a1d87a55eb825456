#!/usr/bin/env bash
# The cuda backend's tests on the CUDA kernels' emulator built with AddressSanitizer: a kernel that reads or
# writes outside its tensors ends the run with a report naming the kernel's source line (the host's
# analog of compute-sanitizer's memcheck), with threads and blocks in a random order between barriers (a
# missing barrier shows up in some orders); the emulator's own checks of barriers and alignment run too.
#   scripts/emulator_memcheck.sh [pytest args]    (default: every cuda-backend test)
# Needs the package installed in the venv (scripts/run builds it) and g++'s AddressSanitizer runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DDPM_FAST_VENV:-.venv}
py="$venv/bin/python"
build=build/emulator-asan
# Only the emulator's target, in a build folder of its own (the installed package stays as it is).
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDDPM_FAST_CUDA=OFF -DDDPM_FAST_CUDA_EMULATOR=ON \
  -DDDPM_FAST_CUDA_EMULATOR_SANITIZE=address -DPython_EXECUTABLE="$py" \
  -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$build" --target _cuda_emulator
module=$(ls "$build"/_cuda_emulator*.so)
# The runtime comes first; libstdc++ with it, or ASan cannot find the real __cxa_throw (python does not
# link libstdc++). Leaks are torch's and Python's, not the kernels'.
preload="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so.6)"
if [ $# -eq 0 ]; then
  set -- tests/test_q_sample.py tests/test_step.py tests/test_group_norm.py tests/test_ops.py \
    tests/test_bad_input.py tests/test_fast_path.py tests/test_cuda.py tests/test_cuda_emulator.py -k "(cuda or emulator) and not y_grid"
fi  # (y_grid: 65536 blocks of one grid-stride loop, ~20 s on the plain emulator, minutes under ASan)
# Threads and blocks run in a random order (tests/conftest.py), where the plain test run keeps the forward
# one; the seed is printed, so that a failure can be rerun with DDPM_FAST_EMULATOR_SCHEDULE set to it.
export DDPM_FAST_EMULATOR_SCHEDULE=${DDPM_FAST_EMULATOR_SCHEDULE:-random:$RANDOM}
echo "emulator thread order: DDPM_FAST_EMULATOR_SCHEDULE=$DDPM_FAST_EMULATOR_SCHEDULE"
ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$preload" DDPM_FAST_CUDA_EMULATOR_MODULE="$module" \
  "$py" -m pytest -q -p no:cacheprovider --capture=sys "$@"  # sys: a report written at abort reaches the log

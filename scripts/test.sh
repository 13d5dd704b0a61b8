#!/usr/bin/env bash
# The test command: install, build, run every test suite. Fails on any failure.
#   1. the normal build (build/) against PyPI's torch 2.11.0 (CUDA 13.0 build;
#      scripts/setup.sh), shown to be the CUDA build (scripts/check-cuda-build.sh),
#      then every suite (unit, element, crosscheck, pipeline) on the CPU;
#   2. the GPU check in CPU mode over that build (docs/gpu.md): the bundle made
#      by scripts/gpu-bundle.sh (apt-get download, no install) and unpacked into a
#      prefix, a LibTorch-free target built against it, a pipeline through its
#      gst-launch-1.0, reduced engine tests and cross-check, the bench and the
#      lever sweep (GPU_CHECK_REUSE_BUILD=build; out in build-gpucheck/ci/);
#   3. the C++ test executables again under ASan + UBSan (build-asan/,
#      scripts/test-sanitizers.sh);
#   4. 60 seconds of fuzzing the checkpoint loader and the latent file reader
#      (build-fuzz/, scripts/fuzz.sh).
# Arguments go to `meson setup` of both builds (e.g. -Dlibtorch_root=/opt/libtorch).
# For quicker local runs: GSTVAE_TEST_GPU_CHECK=0 skips step 2,
# GSTVAE_TEST_SANITIZERS=0 step 3, FUZZ_SECONDS=0 step 4 (FUZZ_SECONDS=600
# fuzzes longer). CI runs all four.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
bash scripts/build.sh "$@"
bash scripts/check-cuda-build.sh build  # the CUDA build: libtorch_cuda linked, CUDA-only code in
bash scripts/setup.sh slurm ray  # tests/python/test_slurm.py and test_ray.py: real Slurm and Ray
meson test -C build --print-errorlogs --num-processes 1
t1=$SECONDS
if [ "${GSTVAE_TEST_GPU_CHECK:-1}" != 0 ]; then
  bash scripts/gpu-bundle.sh
  GPU_CHECK_MODE=cpu GPU_CHECK_REUSE_BUILD=build GPU_CHECK_BUDGET=300 bash scripts/gpu-check.sh build-gpucheck/ci
fi
t2=$SECONDS
if [ "${GSTVAE_TEST_SANITIZERS:-1}" != 0 ]; then
  bash scripts/test-sanitizers.sh "$@"
fi
t3=$SECONDS
if [ "${FUZZ_SECONDS:-60}" != 0 ]; then
  bash scripts/fuzz.sh "${FUZZ_SECONDS:-60}"
fi
t4=$SECONDS
echo "test: all passed; build+tests $((t1 - t0)) s, gpu-check (CPU mode) $((t2 - t1)) s, sanitizers $((t3 - t2)) s," \
  "fuzzing $((t4 - t3)) s" >&2

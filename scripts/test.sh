#!/usr/bin/env bash
# The test command: install, build, run every test suite. Fails on any failure.
#   1. the normal build (build/): every suite (unit, element, crosscheck, pipeline);
#   2. the C++ test executables again under ASan + UBSan (build-asan/,
#      scripts/test-sanitizers.sh);
#   3. 60 seconds of fuzzing the checkpoint loader and the latent file reader
#      (build-fuzz/, scripts/fuzz.sh).
# Arguments go to `meson setup` of both builds (e.g. -Dlibtorch_root=/opt/libtorch).
# For quicker local runs: GSTVAE_TEST_SANITIZERS=0 skips step 2, FUZZ_SECONDS=0
# skips step 3 (FUZZ_SECONDS=600 fuzzes longer). CI runs all three.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
bash scripts/build.sh "$@"
bash scripts/setup.sh slurm  # tests/python/test_slurm.py runs a real single-node Slurm
meson test -C build --print-errorlogs --num-processes 1
t1=$SECONDS
if [ "${GSTVAE_TEST_SANITIZERS:-1}" != 0 ]; then
  bash scripts/test-sanitizers.sh "$@"
fi
t2=$SECONDS
if [ "${FUZZ_SECONDS:-60}" != 0 ]; then
  bash scripts/fuzz.sh "${FUZZ_SECONDS:-60}"
fi
t3=$SECONDS
echo "test: all passed; build+tests $((t1 - t0)) s, sanitizers $((t2 - t1)) s, fuzzing $((t3 - t2)) s" >&2

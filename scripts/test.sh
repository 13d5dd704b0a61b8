#!/usr/bin/env bash
# The test command: install, build, run every test suite. Fails on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh "$@"
meson test -C build --print-errorlogs --num-processes 1

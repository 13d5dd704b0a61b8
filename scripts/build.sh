#!/usr/bin/env bash
# Installs what is missing, configures build/ once, then compiles.
# Extra arguments go to `meson setup` (e.g. -Dlibtorch_root=/opt/libtorch).
# The LibTorch is the project's virtual environment's torch (scripts/venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/venv.sh
if [ ! -f build/build.ninja ]; then
  meson setup build -Dtorch_python="$GSTVAE_PYTHON" "$@"
elif [ $# -gt 0 ]; then
  meson setup --reconfigure build "$@"
fi
ninja -C build -j "$(nproc)"

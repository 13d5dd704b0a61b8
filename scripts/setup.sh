#!/usr/bin/env bash
# Installs what gst-vae needs to build, test and run: Debian's packages, then the
# project's virtual environment (scripts/venv.sh) with PyPI's torch (the LibTorch
# the plugin links), pinned in scripts/requirements.txt. Idempotent:
# when everything is present it only checks and returns in about a second.
# Arguments name optional package groups (see below).
set -euo pipefail

packages=(
  g++ meson ninja-build pkg-config
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev libgstreamer-plugins-bad1.0-dev
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  nlohmann-json3-dev libgtest-dev
  python3 python3-venv python3-dev python3-numpy python3-gi
  gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0
)

# Optional groups, installed only when named: `bash scripts/setup.sh fuzz`.
#   fuzz:     Debian's clang with libFuzzer and its ASan/UBSan runtimes (scripts/fuzz.sh);
#   coverage: llvm-profdata/llvm-cov (FUZZ_COVERAGE=1 bash scripts/fuzz.sh);
#   slurm:    a single-node Slurm (slurmctld, slurmd, munge) for scripts/slurm-local.sh
#             and tests/python/test_slurm.py;
#   ray:      not a Debian package: Ray, pinned in scripts/requirements-ray.txt, into the
#             project's venv, for examples/python/ray_encode.py and tests/python/test_ray.py.
# The sanitizer test build (scripts/test-sanitizers.sh) uses g++, whose ASan/UBSan
# runtimes (libasan8, libubsan1) come with it.
with_ray=0
for group in "$@"; do
  case "$group" in
    fuzz) packages+=(clang-14 libclang-rt-14-dev) ;;
    coverage) packages+=(llvm-14) ;;
    slurm) packages+=(slurm-wlm munge) ;;
    ray) with_ray=1 ;;
    *) echo "setup: unknown package group '$group' (known: fuzz, coverage, slurm, ray)" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The virtual environment: Debian's python3 (its python3-gi and python3-numpy
# are visible through --system-site-packages), with the pinned requirements
# installed over it. A
# stamp holding the requirements file's contents makes the check a file compare.
source "$(dirname "$0")/venv.sh"
requirements="$(dirname "$0")/requirements.txt"
stamp="$GSTVAE_VENV/.gst-vae-requirements"
if ! cmp -s "$requirements" "$stamp" 2>/dev/null; then
  echo "setup: installing $(grep -v '^#' "$requirements" | xargs) into $GSTVAE_VENV" \
    "(about 2.7 GB downloaded, 4.6 GB installed)" >&2
  mkdir -p "$(dirname "$GSTVAE_VENV")"
  [ -x "$GSTVAE_PYTHON" ] || /usr/bin/python3 -m venv --system-site-packages "$GSTVAE_VENV"
  "$GSTVAE_PYTHON" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$stamp"
fi

# Ray: a second requirements file with its own stamp, so that it neither changes
# the torch pin (nor the venv's name, which comes from it) nor reinstalls torch.
if [ "$with_ray" = 1 ]; then
  ray_requirements="$(dirname "$0")/requirements-ray.txt"
  ray_stamp="$GSTVAE_VENV/.gst-vae-requirements-ray"
  if ! cmp -s "$ray_requirements" "$ray_stamp" 2>/dev/null; then
    echo "setup: installing $(grep -v '^#' "$ray_requirements" | xargs) into $GSTVAE_VENV" \
      "(about 80 MB downloaded, 270 MB installed)" >&2
    "$GSTVAE_PYTHON" -m pip install --quiet --disable-pip-version-check -r "$ray_requirements"
    cp "$ray_requirements" "$ray_stamp"
  fi
fi

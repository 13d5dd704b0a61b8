#!/usr/bin/env bash
# Installs the Debian packages gst-vae needs to build, test and run. Idempotent:
# when everything is present it only checks and returns in about a second.
# Arguments name optional package groups (see below).
set -euo pipefail

packages=(
  g++ meson ninja-build pkg-config
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  libtorch-dev nlohmann-json3-dev libgtest-dev
  python3 python3-torch python3-numpy python3-gi
  gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0
)

# Optional groups, installed only when named: `bash scripts/setup.sh fuzz`.
#   fuzz:     Debian's clang with libFuzzer and its ASan/UBSan runtimes (scripts/fuzz.sh);
#   coverage: llvm-profdata/llvm-cov (FUZZ_COVERAGE=1 bash scripts/fuzz.sh);
#   slurm:    a single-node Slurm (slurmctld, slurmd, munge) for scripts/slurm-local.sh
#             and tests/python/test_slurm.py.
# The sanitizer test build (scripts/test-sanitizers.sh) uses g++, whose ASan/UBSan
# runtimes (libasan8, libubsan1) come with it.
for group in "$@"; do
  case "$group" in
    fuzz) packages+=(clang-14 libclang-rt-14-dev) ;;
    coverage) packages+=(llvm-14) ;;
    slurm) packages+=(slurm-wlm munge) ;;
    *) echo "setup: unknown package group '$group' (known: fuzz, coverage, slurm)" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "setup: installing ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

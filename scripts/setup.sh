#!/usr/bin/env bash
# Installs the Debian packages gst-vae needs to build, test and run. Idempotent:
# when everything is present it only checks and returns in about a second.
set -euo pipefail

packages=(
  g++ meson ninja-build pkg-config
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  libtorch-dev nlohmann-json3-dev libgtest-dev
  python3 python3-torch python3-numpy python3-gi
  gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0
)

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

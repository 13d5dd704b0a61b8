#!/usr/bin/env bash
# Gathers, on this Debian 12 machine, the .deb files that an offline CUDA machine
# with only PyTorch (no GStreamer, no apt, no network) lacks to build the whole
# plugin and its tests. Nothing is installed: `apt-get download` only, into the
# ignored folder gpu-bundle/ (or $GPU_BUNDLE_DIR). scripts/gpu-check.sh unpacks it
# there with `dpkg -x` into a prefix of its own. Idempotent: packages already
# downloaded are kept, so a second run only checks and prints.
#
# Chosen and measured (docs/gpu.md): GStreamer core/base runtime and -dev, the
# base plugins (videotestsrc, videoconvert, ...) and gst-launch/gst-inspect, GLib
# runtime and -dev, the GStreamer core's runtime libraries (libdw, libelf,
# libunwind, libcap, orc), nlohmann-json, GoogleTest (built libs and sources), and
# pkgconf in case the machine has no pkg-config. Left out on purpose: the -dev
# packages only named in Requires.private (gpu-check.sh drops those lines, which a
# shared build does not need), GL/X11/Wayland -dev, iso-codes, gir, and the
# optional libraries of some base plugins (ogg, vorbis, theora, opus, ...): those
# plugins just fail to load, which GStreamer tolerates.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${GPU_BUNDLE_DIR:-gpu-bundle}

packages=(
  libgstreamer1.0-0 libgstreamer1.0-dev
  libgstreamer-plugins-base1.0-0 libgstreamer-plugins-base1.0-dev
  gstreamer1.0-plugins-base gstreamer1.0-tools
  libglib2.0-0 libglib2.0-dev
  libdw1 libelf1 libunwind8 libcap2 liborc-0.4-0 liborc-0.4-dev
  nlohmann-json3-dev libgtest-dev googletest
  pkgconf-bin libpkgconf3
  # Frames in CUDA memory (docs/gpu.md, "Frames in CUDA memory"): libgstcuda's
  # headers to build the plugin's CUDA memory code (and GL/gl.h, which CUDA's
  # cudaGL.h includes from them); libgstcuda itself and the nvcodec plugin
  # (cudaupload, cudaconvert, nvh264dec...) with the GL, X11 and Wayland
  # libraries they link, for the CUDA-memory pipeline. The rest of
  # gst-plugins-bad's plugins lack their libraries there and fail to load.
  libgstreamer-plugins-bad1.0-dev libgl-dev
  libgstreamer-plugins-bad1.0-0 gstreamer1.0-plugins-bad libgstreamer-gl1.0-0
  libgl1 libglx0 libglvnd0 libegl1 libgles2 libgbm1 libdrm2 libgudev-1.0-0
  libx11-6 libx11-xcb1 libxcb1 libxau6 libxdmcp6 libbsd0 libmd0
  libwayland-client0 libwayland-cursor0 libwayland-egl1 libwayland-server0
)

mkdir -p "$dir"
# One apt-cache call for all candidates (one per package takes ~2 s each here).
declare -A cand
while read -r name ver; do cand[$name]=$ver; done < <(apt-cache policy "${packages[@]}" |
  awk '/^[^ ].*:$/ {sub(":$", ""); name=$0} /Candidate:/ {print name, $2}')
missing=()
for p in "${packages[@]}"; do
  ver=${cand[$p]:-}
  if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
    echo "gpu-bundle: no candidate for $p (apt-get update?)" >&2; exit 1
  fi
  # .deb names encode the epoch's ':' as %3a
  if ! ls "$dir/${p}_${ver/:/%3a}_"*.deb >/dev/null 2>&1; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "gpu-bundle: downloading ${missing[*]}" >&2
  # apt-get download as root warns that it cannot drop privileges; harmless.
  (cd "$dir" && apt-get download -q "${missing[@]}" 2>&1 | grep -v -E '^(Get:|Fetched|W: Download is performed unsandboxed)' >&2 || true)
  for p in "${missing[@]}"; do
    ls "$dir/${p}_"*.deb >/dev/null 2>&1 || { echo "gpu-bundle: $p did not download" >&2; exit 1; }
  done
fi
# Older versions of the same package (after a Debian point release) would be
# unpacked twice: keep only the candidate.
for p in "${packages[@]}"; do
  ver=${cand[$p]}
  for f in "$dir/${p}_"*.deb; do
    case "$f" in "$dir/${p}_${ver/:/%3a}_"*) ;; *) echo "gpu-bundle: removing stale $f" >&2; rm -f "$f" ;; esac
  done
done

size=$(du -sk "$dir" | awk '{print $1}')
echo "gpu-bundle: $dir holds $(ls "$dir"/*.deb | wc -l) packages, $((size / 1024)) MiB ($size KiB)"
echo "gpu-bundle: carry list for the device tool: [\"$dir\"]"

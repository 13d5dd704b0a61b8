#!/usr/bin/env bash
# Shows that a build (default build/) is the CUDA build and that its CUDA-only
# code is in the plugin and the tools, on a machine that may have no GPU:
#   - the plugin and gst-vae-encode-file need libtorch_cuda and libc10_cuda,
#     and the dynamic loader resolves both (ldd: nothing "not found");
#   - the CUDA graph runner (src/cuda_graphs.cpp, compiled only against a
#     LibTorch with CUDA) is in the plugin, calling LibTorch's CUDAGraph
#     capture and replay, and the download events' c10::Event code is there;
#   - the plugin links neither libcuda nor libgstcuda (both are loaded at run
#     time, so that it loads where they are missing), and its CUDA memory code
#     (gst/cuda_glue.cpp) is in it when the build found libgstcuda's headers;
#   - the plugin loads (gst-inspect-1.0) where no GPU or driver is.
# scripts/test.sh runs it after the build. Exit 1 on the first check that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
plugin=$build/gst/libgstvae.so
tool=$build/tools/gst-vae-encode-file
fail() { echo "check-cuda-build: FAILED: $*" >&2; exit 1; }
for f in "$plugin" "$tool"; do
  [ -f "$f" ] || fail "$f is not built"
  needed=$(readelf -d "$f" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')
  for lib in libtorch_cuda.so libc10_cuda.so; do
    grep -qx "$lib" <<<"$needed" || fail "$f does not link $lib (needed: $(echo $needed))"
  done
  if ldd "$f" | grep -q "not found"; then fail "$f: $(ldd "$f" | grep 'not found' | head -3)"; fi
  echo "check-cuda-build: $f links $(ldd "$f" | awk '/libtorch_cuda.so/ {print $3}')" >&2
done
symbols=$(nm -C "$plugin")
for sym in 'CudaGraphedForward::capture' 'CudaGraphedForward::replay' 'U at::cuda::CUDAGraph::capture_begin' \
           'U at::cuda::CUDAGraph::replay' 'gstvae::finish_download'; do
  grep -qF -- "$sym" <<<"$symbols" || fail "$plugin has no '$sym': the CUDA-only code is not compiled in"
done
echo "check-cuda-build: the CUDA graph runner and the download events are in $plugin" >&2
needed=$(readelf -d "$plugin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')
if grep -qE '^lib(cuda|gstcuda-1\.0)\.so' <<<"$needed"; then
  fail "$plugin links $(grep -E '^lib(cuda|gstcuda-1\.0)\.so' <<<"$needed" | tr '\n' ' ')at load time: it must load them at run time"
fi
if pkg-config --exists gstreamer-cuda-1.0; then
  grep -qF 'gstvae_cuda::SharedContext::propose_pool' <<<"$symbols" && grep -qF 'gst_cuda_load_library' "$plugin" ||
    fail "libgstcuda's headers are here but $plugin has no CUDA memory code"
  echo "check-cuda-build: frames in CUDA memory are built in; libcuda and libgstcuda are loaded at run time" >&2
fi
GST_PLUGIN_PATH=$build/gst GST_REGISTRY=$build/check-cuda-registry.bin gst-inspect-1.0 vaeencode >/dev/null ||
  fail "the plugin does not load"
echo "check-cuda-build: the plugin loads here ($(nvidia-smi -L 2>/dev/null | head -1 || true)$(command -v nvidia-smi >/dev/null || echo 'no GPU driver on this machine'))" >&2

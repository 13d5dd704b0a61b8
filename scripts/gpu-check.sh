#!/usr/bin/env bash
# One prepared check of the whole plugin on a machine with PyTorch but maybe no
# GStreamer, no apt and no network (docs/gpu.md): usage
#   bash scripts/gpu-check.sh OUTDIR
# 1. unpacks gpu-bundle/*.deb (scripts/gpu-bundle.sh) with `dpkg -x` into
#    OUTDIR/prefix (never into /), points pkg-config, the loader and GStreamer at it;
# 2. builds the whole plugin and its tests with meson (build-gpucheck/build) against
#    the machine's LibTorch: the pip torch's when there is no Debian libtorch-dev.
#    If the GStreamer part cannot be configured or built, builds -Dgstreamer=disabled
#    (build-gpucheck/build-nogst) and the summary says so;
# 3. runs, each under `timeout`: the engine tests, a vaeencode pipeline through
#    gst-launch-1.0 whose latent file is read back, the Python cross-check against
#    the float64 reference, and bench/bench_engine.py.
# Mode: GPU when nvidia-smi is there and the torch of python3 sees CUDA (everything
# with --device cuda, all cross-check cases, fp32/bf16/fp16, 512² bench); else CPU
# with tiny sizes (what CI runs). GPU_CHECK_MODE=cpu|gpu forces one.
# The whole run stays within GPU_CHECK_BUDGET seconds (default 470 in GPU mode:
# ≤ 8 minutes on the GPU machine, summary included; 900 in CPU mode); a step that would start later is NOT RUN.
# Writes OUTDIR/summary.md (also printed) and OUTDIR/logs/*.log. Exit 0 when
# every step passed; 1 otherwise. The GPU mode is unverified on a GPU so far.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
root=$PWD
[ $# -eq 1 ] || { echo "usage: bash scripts/gpu-check.sh OUTDIR" >&2; exit 2; }
mkdir -p "$1/logs" && out=$(cd "$1" && pwd) || exit 2
logs=$out/logs
bundle=${GPU_BUNDLE_DIR:-$root/gpu-bundle}
prefix=${GPU_CHECK_PREFIX:-$out/prefix}
t_start=$SECONDS

# The Python that holds torch: the GPU image's python3, else Debian's.
py=""
for cand in python3 /usr/bin/python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import torch, numpy' 2>/dev/null; then py=$(command -v "$cand"); break; fi
done
[ -n "$py" ] || { echo "gpu-check: no python3 with torch and numpy" >&2; exit 2; }

mode=${GPU_CHECK_MODE:-}
if [ -z "$mode" ]; then
  mode=cpu
  if command -v nvidia-smi >/dev/null && "$py" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    mode=gpu
  fi
fi
if [ "$mode" = gpu ]; then dev=cuda; jobs=${GPU_CHECK_JOBS:-$(nproc)}; budget=${GPU_CHECK_BUDGET:-470}
else dev=cpu; jobs=${GPU_CHECK_JOBS:-2}; budget=${GPU_CHECK_BUDGET:-900}; fi

rows=()
failed=0
notes=()
# step NAME LIMIT_S CMD...: runs CMD under timeout, logs to logs/NAME.log, adds a row.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc left=$((budget - (SECONDS - t_start)))
  # The whole check stays inside GPU_CHECK_BUDGET seconds, so the summary is
  # always written: a step gets at most what is left, none when under 15 s.
  if [ $left -lt 15 ]; then
    failed=1; rows+=("| $name | NOT RUN | 0 | the check's budget of $budget s was spent |"); return 1
  fi
  [ $left -lt $limit ] && limit=$left
  echo "gpu-check: [$name] $*" >&2
  # Shell functions run in a child bash (exported with export -f): timeout runs programs only.
  if declare -F "$1" >/dev/null; then set -- bash -c '"$@"' "$1" "$@"; fi
  timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
  rc=$?
  local res=PASS
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then res="TIMEOUT (${limit} s)"; elif [ $rc -ne 0 ]; then res="FAIL (rc $rc)"; fi
  [ $rc -eq 0 ] || failed=1
  rows+=("| $name | $res | $((SECONDS - t0)) | $(tail -n 1 "$logs/$name.log" | tr '|' '/' | cut -c1-160) |")
  return $rc
}
skip() { rows+=("| $1 | SKIPPED | 0 | $2 |"); }

# --- 1. unpack the bundle ----------------------------------------------------
unpack() {
  ls "$bundle"/*.deb >/dev/null 2>&1 || { echo "no .deb in $bundle: run scripts/gpu-bundle.sh here and carry it"; return 1; }
  rm -rf "$prefix" && mkdir -p "$prefix"
  for f in "$bundle"/*.deb; do dpkg -x "$f" "$prefix" || return 1; done
  # The .pc files say prefix=/usr: point them at the prefix. Requires.private
  # only matters for static linking and names -dev packages left out of the bundle.
  find "$prefix" -name '*.pc' -print0 | xargs -0 sed -i -E "s#^([A-Za-z_]+)=/usr#\1=$prefix/usr#; /^Requires.private:/d"
  echo "unpacked $(ls "$bundle"/*.deb | wc -l) packages into $prefix ($(du -sh "$prefix" | cut -f1))"
}
export bundle prefix
export -f unpack
if step unpack 120 unpack; then
  ma=x86_64-linux-gnu
  export PKG_CONFIG="$prefix/usr/bin/pkgconf"
  export PKG_CONFIG_PATH="$prefix/usr/lib/$ma/pkgconfig:$prefix/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  export LD_LIBRARY_PATH="$prefix/usr/lib/$ma:$prefix/lib/$ma${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export GST_PLUGIN_SYSTEM_PATH="$prefix/usr/lib/$ma/gstreamer-1.0"
  export GST_PLUGIN_SCANNER="$prefix/usr/lib/$ma/gstreamer1.0/gstreamer-1.0/gst-plugin-scanner"
  export GST_REGISTRY="$out/gst-registry.bin"
  export PATH="$prefix/usr/bin:$PATH"
fi

# --- 2. configure and build --------------------------------------------------
setup_args=(-Dbuildtype=release)
if [ ! -f /usr/include/torch/csrc/api/include/torch/torch.h ] || [ "$mode" = gpu ]; then
  torch_root=$("$py" -c 'import torch,os;print(os.path.dirname(torch.__file__))')
  setup_args+=("-Dlibtorch_root=$torch_root")
fi
ninja_run() {
  if command -v flock >/dev/null; then flock /tmp/ninja-gpu.lock ninja -C "$1" -j "$jobs"; else ninja -C "$1" -j "$jobs"; fi
}
configure_build() {  # BUILDDIR MESON_ARGS...
  local b=$1; shift
  if [ -f "$b/build.ninja" ]; then meson setup --reconfigure "$b" "$@" || return 1
  else meson setup "$b" "$@" || return 1; fi
  ninja_run "$b"
}
export jobs
export -f ninja_run configure_build
gst_built=yes
build=$root/build-gpucheck/build
if ! step build-full 420 configure_build "$build" "${setup_args[@]}"; then
  gst_built=no
  notes+=("The full build (GStreamer plugin and its tests) failed (logs/build-full.log); the engine-only build (-Dgstreamer=disabled) ran instead.")
  build=$root/build-gpucheck/build-nogst
  step build-engine-only 420 configure_build "$build" "${setup_args[@]}" -Dgstreamer=disabled || {
    notes+=("The engine-only build failed too: nothing else ran.")
  }
fi

# --- 3. checks -----------------------------------------------------------------
if [ -x "$build/tests/engine-tests" ]; then
  filter="*"
  shared=${GSTVAE_SHARED_DIR:-$root/../shared}
  if [ -d "$shared/models" ]; then export GSTVAE_SHARED_DIR=$shared
  else filter="-TaesdRealFiles.*"; notes+=("No shared/models beside the repository: TaesdRealFiles.* left out of the engine tests."); fi
  step engine-tests 300 "$build/tests/engine-tests" --gtest_brief=1 "--gtest_filter=$filter"
else
  skip engine-tests "not built"
fi

model=$out/model.safetensors
step make-model 120 "$py" -c "
import sys; sys.path.insert(0, '$root/tests/python')
import vae_reference as V
V.make_checkpoint('$model', layout='ldm', ch=32, mult=(1, 2), blocks=2, z=4, quant_conv=True, dtype='F32', seed=0)
print('small random SD-layout VAE: $model')"

if [ "$gst_built" = yes ] && [ -f "$model" ]; then
  pipeline() {  # PRECISION SIZE
    local f=$out/pipeline-$1.latent
    rm -f "$f"
    GST_PLUGIN_PATH="$build/gst" gst-launch-1.0 -q videotestsrc num-buffers=8 \
      ! "video/x-raw,width=$2,height=$2" ! videoconvert \
      ! vaeencode model="$model" device="$dev" precision="$1" ! latentfilesink location="$f" || return 1
    "$build/tools/gst-vae-latent-info" "$f"
  }
  export -f pipeline
  export out model dev build
  if [ "$mode" = gpu ]; then
    step pipeline-fp32 120 pipeline fp32 512
    step pipeline-bf16 120 pipeline bf16 512
  else
    step pipeline-fp32 120 pipeline fp32 64
  fi
elif [ "$gst_built" = yes ]; then
  skip pipeline "no model (make-model did not pass)"
else
  skip pipeline "no GStreamer plugin built"
fi

if [ -x "$build/tools/gst-vae-encode-file" ]; then
  if [ "$mode" = gpu ]; then
    # Every case, the tool on CUDA (fp32 within 1e-4 of float64, TF32 off in the
    # engine; fp16/bf16 cases within the script's bounds), the reference on the CPU.
    step crosscheck 240 "$py" tests/python/crosscheck.py "$build/tools/gst-vae-encode-file" \
      --tool-arg=--device --tool-arg=cuda
  else
    step crosscheck 240 "$py" tests/python/crosscheck.py "$build/tools/gst-vae-encode-file" \
      --only ldm,precision_bf16,precision_fp16,sample
  fi
else
  skip crosscheck "gst-vae-encode-file not built"
fi

if [ -x "$build/bench/gst-vae-engine-bench" ]; then
  if [ "$mode" = gpu ]; then
    step bench-512 240 "$py" bench/bench_engine.py --device cuda --size 512 --batches 1,4,16 \
      --precisions fp32,bf16,fp16 --iters 3 --tool "$build/bench/gst-vae-engine-bench"
  else
    step bench-64 180 "$py" bench/bench_engine.py --device cpu --size 64 --batches 1 \
      --precisions fp32 --iters 1 --threads 2 --tool "$build/bench/gst-vae-engine-bench"
  fi
else
  skip bench "gst-vae-engine-bench not built"
fi

# --- summary ---------------------------------------------------------------------
{
  echo "# gst-vae gpu-check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- mode: **$mode** (device $dev)$([ "$mode" = gpu ] && echo ', unverified on a GPU until a run fills docs/gpu.md')"
  echo "- machine: $(uname -m), $(nproc) cores; $(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || echo 'no nvidia-smi')"
  echo "- torch: $("$py" -c 'import torch;print(torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())' 2>/dev/null) ($py)"
  echo "- LibTorch: ${torch_root:-system (/usr)}; GStreamer plugin built: **$gst_built**"
  echo "- total: $((SECONDS - t_start)) s of a budget of $budget s"
  for n in "${notes[@]}"; do echo "- $n"; done
  echo
  echo "| step | result | seconds | last line of its log |"
  echo "| --- | --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
  if [ -f "$logs/bench-512.log" ] || [ -f "$logs/bench-64.log" ]; then
    echo; echo '```'; cat "$logs"/bench-*.log; echo '```'
  fi
} >"$out/summary.md"
cat "$out/summary.md"
exit $failed

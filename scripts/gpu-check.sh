#!/usr/bin/env bash
# One prepared check of the whole plugin on a machine with PyTorch but maybe no
# GStreamer, no apt and no network (docs/gpu.md): usage
#   bash scripts/gpu-check.sh OUTDIR
# 1. unpacks gpu-bundle/*.deb (scripts/gpu-bundle.sh) with `dpkg -x` into
#    OUTDIR/prefix (never into /), points pkg-config, the loader and GStreamer at it;
# 2. builds the whole plugin and its tests with meson (build-gpucheck/build) against
#    the machine's LibTorch: the torch of the Python found below (-Dtorch_python).
#    If the GStreamer part cannot be configured or built, builds -Dgstreamer=disabled
#    (build-gpucheck/build-nogst) and the summary says so;
# 3. runs, each under `timeout`: the engine tests, a vaeencode pipeline through
#    gst-launch-1.0 whose latent file is read back, the Python cross-check against
#    the float64 reference, and bench/bench_engine.py.
# Mode: GPU when nvidia-smi is there and the torch of python3 sees CUDA (everything
# with --device cuda, all cross-check cases, fp32/bf16/fp16, 512² bench, a sweep of
# the CUDA speed levers); else CPU with tiny sizes. GPU_CHECK_MODE=cpu|gpu forces one.
# GPU_CHECK_REUSE_BUILD=DIR (CPU mode only; what CI runs, scripts/test.sh): instead
# of the whole build against the bundle (~220 s here), DIR, a built meson folder of
# this tree (CI's build/), is checked up to date and used; the bundle is still
# unpacked in full, and a fresh meson folder configured against it compiles, links
# and runs the one LibTorch-free target (tests/worker-tests: GStreamer, gstcheck and
# GoogleTest from the prefix); the later steps run as usual, with the prefix's
# gst-launch-1.0 and base plugins, on reduced sets (engine tests Levers.* and
# Devices.*, cross-check case ldm). GPU_CHECK_ENGINE_FILTER and
# GPU_CHECK_CROSSCHECK_CASES override those sets in any mode.
# The CUDA speed levers (GSTVAE_* variables, docs/gpu.md) are taken from the
# environment like any other run's; the summary lists which settings ran.
# The whole run stays within GPU_CHECK_BUDGET seconds (default 470 in GPU mode:
# ≤ 8 minutes on the GPU machine, summary included; 900 in CPU mode); a step that would start later is NOT RUN.
# Writes OUTDIR/summary.md (also printed) and OUTDIR/logs/*.log. Exit 0 when
# every step passed; 1 otherwise (2: bad usage). The GPU mode is unverified on a
# GPU so far.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
root=$PWD
[ $# -eq 1 ] || { echo "usage: bash scripts/gpu-check.sh OUTDIR" >&2; exit 2; }
mkdir -p "$1/logs" && out=$(cd "$1" && pwd) || exit 2
logs=$out/logs
bundle=${GPU_BUNDLE_DIR:-$root/gpu-bundle}
prefix=${GPU_CHECK_PREFIX:-$out/prefix}
t_start=$SECONDS

# The Python that holds torch: the project's virtual environment where
# scripts/setup.sh made one (here), else the GPU image's python3.
source "$root/scripts/venv.sh"
py=""
for cand in "$GSTVAE_PYTHON" python3; do
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
reuse=${GPU_CHECK_REUSE_BUILD:-}
if [ -n "$reuse" ]; then
  [ "$mode" = cpu ] || { echo "gpu-check: GPU_CHECK_REUSE_BUILD is for the CPU mode (a GPU run builds against its CUDA LibTorch)" >&2; exit 2; }
  reuse=$(cd "$reuse" 2>/dev/null && pwd) || { echo "gpu-check: GPU_CHECK_REUSE_BUILD=$GPU_CHECK_REUSE_BUILD is not a folder" >&2; exit 2; }
fi

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
  # libgstcuda's .pc requires GL's prototypes (gl.pc, glesv2.pc: -dev packages
  # left out); the plugin uses only its headers, which need GL/gl.h alone (libgl-dev).
  local cudapc
  for cudapc in "$prefix"/usr/lib/*/pkgconfig/gstreamer-cuda-1.0.pc; do
    # ...and GL/gl.h lies in the prefix's include folder, not under gstreamer-1.0/.
    if [ -f "$cudapc" ]; then
      sed -i -E 's/, *gstreamer-gl-prototypes-1.0[^,]*//; s#^Cflags: (.*)$#Cflags: \1 -I${includedir}#' "$cudapc"
    fi
  done
  # The bundled pkgconf must find the bundled GStreamer, not a system one.
  local ma=x86_64-linux-gnu got
  got=$(LD_LIBRARY_PATH="$prefix/usr/lib/$ma${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        PKG_CONFIG_PATH="$prefix/usr/lib/$ma/pkgconfig:$prefix/usr/share/pkgconfig" \
        "$prefix/usr/bin/pkgconf" --variable=libdir gstreamer-1.0) || { echo "the bundled pkgconf does not find gstreamer-1.0"; return 1; }
  [ "$got" = "$prefix/usr/lib/$ma" ] || { echo "gstreamer-1.0.pc points at $got, not into $prefix"; return 1; }
  echo "unpacked $(ls "$bundle"/*.deb | wc -l) packages into $prefix ($(du -sh "$prefix" | cut -f1)); pkgconf finds gstreamer-1.0 there"
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
setup_args=(-Dbuildtype=release "-Dtorch_python=$py")
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
if [ -n "$reuse" ]; then
  # The reused folder must be a meson build of this very tree, brought up to
  # date here (a no-op when it is).
  reuse_build() {
    local src
    src=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["directories"]["source"])' "$reuse/meson-info/meson-info.json") || { echo "$reuse is not a configured meson build"; return 1; }
    [ "$src" = "$root" ] || { echo "$reuse builds $src, not $root"; return 1; }
    ninja_run "$reuse" && echo "reused $reuse: up to date"
  }
  # What the bundle must give a build, without LibTorch: a fresh folder
  # configured against the prefix, then the LibTorch-free worker-tests
  # compiled, linked and run against the prefix's GStreamer and GoogleTest.
  prefix_build() {
    local b=$1; shift
    rm -rf "$b" && meson setup "$b" "$@" || return 1
    if command -v flock >/dev/null; then flock /tmp/ninja-gpu.lock ninja -C "$b" -j "$jobs" tests/worker-tests || return 1
    else ninja -C "$b" -j "$jobs" tests/worker-tests || return 1; fi
    local lib
    lib=$(ldd "$b/tests/worker-tests" | awk '/libgstreamer-1.0/ {print $3}')
    case "$lib" in "$prefix"/*) ;; *) echo "worker-tests loads libgstreamer-1.0 from '$lib', not from $prefix"; return 1 ;; esac
    "$b/tests/worker-tests" --gtest_brief=1 || return 1
    echo "worker-tests built and run against the bundle ($lib)"
  }
  export py root reuse
  export -f reuse_build prefix_build
  # The bundle's build takes the LibTorch the reused build was configured with.
  reuse_torch=$("$py" -c 'import json,sys; print(next((o["value"] for o in json.load(open(sys.argv[1])) if o["name"] == "libtorch_root"), ""))' "$reuse/meson-info/intro-buildoptions.json" 2>/dev/null)
  setup_args=(-Dbuildtype=release "-Dtorch_python=$py")
  [ -n "$reuse_torch" ] && setup_args+=("-Dlibtorch_root=$reuse_torch")
  build=$reuse
  step build-reuse 300 reuse_build || notes+=("The reused build $reuse is not this tree's or does not build (logs/build-reuse.log).")
  step build-bundle 300 prefix_build "$root/build-gpucheck/bundle" "${setup_args[@]}"
  [ -f "$build/gst/libgstvae.so" ] || gst_built=no
  notes+=("CI mode: reused the build $reuse (no build against the bundle but tests/worker-tests); reduced engine-test and cross-check sets.")
elif ! step build-full 420 configure_build "$build" "${setup_args[@]}"; then
  gst_built=no
  notes+=("The full build (GStreamer plugin and its tests) failed (logs/build-full.log); the engine-only build (-Dgstreamer=disabled) ran instead.")
  build=$root/build-gpucheck/build-nogst
  step build-engine-only 420 configure_build "$build" "${setup_args[@]}" -Dgstreamer=disabled || {
    notes+=("The engine-only build failed too: nothing else ran.")
  }
fi

# --- 3. checks -----------------------------------------------------------------
export dev build
if [ -x "$build/tests/engine-tests" ]; then
  filter="*"
  [ -n "$reuse" ] && filter="Levers.*:Devices.*"
  shared=${GSTVAE_SHARED_DIR:-$root/../shared}
  if [ -d "$shared/models" ]; then export GSTVAE_SHARED_DIR=$shared
  elif [ -z "$reuse" ]; then filter="-TaesdRealFiles.*"; notes+=("No shared/models beside the repository: TaesdRealFiles.* left out of the engine tests."); fi
  filter=${GPU_CHECK_ENGINE_FILTER:-$filter}
  step engine-tests 300 "$build/tests/engine-tests" --gtest_brief=1 "--gtest_filter=$filter"
else
  skip engine-tests "not built"
fi

model=$out/model.safetensors
# The lever sweep's model: the full SD VAE encoder (random weights) on a GPU,
# the small one in CPU mode.
sweep_model=$model
[ "$mode" = gpu ] && sweep_model=$out/sd-vae-encoder.safetensors
step make-model 120 "$py" -c "
import sys; sys.path.insert(0, '$root/tests/python')
import vae_reference as V
V.make_checkpoint('$model', layout='ldm', ch=32, mult=(1, 2), blocks=2, z=4, quant_conv=True, dtype='F32', seed=0)
print('small random SD-layout VAE: $model')
if '$sweep_model' != '$model':
    V.make_checkpoint('$sweep_model', layout='ldm', ch=128, mult=(1, 2, 4, 4), blocks=2, z=4, seed=0, include_decoder=False)
    print('random SD VAE encoder for the lever sweep: $sweep_model')"

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

# Frames in CUDA memory (issue 20 part 3): the same frames uploaded by
# cudaupload and passed through cudaconvert in video/x-raw(memory:CUDAMemory)
# give the system-memory pipeline's latents (fp32: within 1e-5), and both
# pipelines' frames/s at 512² bf16 (wall clock over the whole run, model load
# included, and the element's average-fps over its encode time).
cuda_memory() {  # PRECISION SIZE FRAMES
  local tag=$1-$2 sys cud
  gst-inspect-1.0 cudaupload >/dev/null 2>&1 || { echo "no cudaupload: the bundle's nvcodec plugin did not load (logs: GST_DEBUG=2 gst-inspect-1.0 nvcodec)"; return 1; }
  gst-inspect-1.0 vaeencode | grep -q 'memory:CUDAMemory' || { echo "vaeencode was built without CUDA memory (no libgstcuda headers?)"; return 1; }
  for memory in system cuda; do
    local f=$out/cudamem-$memory-$tag.npy
    local chain="! video/x-raw,format=RGBA,width=$2,height=$2"
    [ $memory = cuda ] && chain="$chain ! cudaupload ! cudaconvert ! video/x-raw(memory:CUDAMemory),format=RGBA"
    rm -f "$f"
    local t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    GST_PLUGIN_PATH="$build/gst" gst-launch-1.0 -m videotestsrc num-buffers=$3 $chain \
      ! vaeencode model="$model" device=cuda precision="$1" per-batch=16 ! latentfilesink location="$f" \
      >"$out/cudamem-$memory-$tag.txt" 2>&1 || { tail -5 "$out/cudamem-$memory-$tag.txt"; return 1; }
    local t1=$(date +%s.%N)
    local avg=$(grep -o 'average-fps=(double)[0-9.e+]*' "$out/cudamem-$memory-$tag.txt" | tail -1 | cut -d')' -f2)
    echo "$memory memory, $1, $2²: $(python3 -c "print(f'{$3 / ($t1 - $t0):.1f}')") frames/s wall clock ($3 frames), element average-fps $avg"
  done
  "$py" - "$out/cudamem-system-$tag.npy" "$out/cudamem-cuda-$tag.npy" "$1" <<'PY'
import sys, numpy as np
a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
assert a.shape == b.shape, (a.shape, b.shape)
d = float(np.abs(a.astype(np.float64) - b).max())
tol = 1e-5 if sys.argv[3] == 'fp32' else 1e-1
print(f'{a.shape[0]} latents {a.shape[1:]}: max |system - cuda| = {d:.3g} (allowed {tol:g})')
sys.exit(0 if d <= tol else 1)
PY
}
export -f cuda_memory
if [ "$mode" = gpu ] && [ "$gst_built" = yes ] && [ -f "$model" ]; then
  step cuda-memory-fp32 120 cuda_memory fp32 512 32
  step cuda-memory-bf16 150 cuda_memory bf16 512 128
elif [ "$mode" = gpu ]; then
  skip cuda-memory "no GStreamer plugin or model"
else
  skip cuda-memory "CPU mode: no CUDA memory without a GPU (the element tests VaeEncodeCuda.* cover the caps)"
fi

if [ -x "$build/tools/gst-vae-encode-file" ]; then
  if [ "$mode" = gpu ]; then
    # Every case, the tool on CUDA (fp32 within 1e-4 of float64, TF32 off in the
    # engine; fp16/bf16 cases within the script's bounds), the reference on the CPU.
    step crosscheck 240 "$py" tests/python/crosscheck.py "$build/tools/gst-vae-encode-file" \
      --tool-arg=--device --tool-arg=cuda
  else
    cases=ldm,precision_bf16,precision_fp16,sample
    [ -n "$reuse" ] && cases=ldm
    step crosscheck 240 "$py" tests/python/crosscheck.py "$build/tools/gst-vae-encode-file" \
      --only "${GPU_CHECK_CROSSCHECK_CASES:-$cases}"
  fi
else
  skip crosscheck "gst-vae-encode-file not built"
fi

# bench_engine.py prints "engine: -" (and exits 0) when the engine gave no
# number for a configuration (a load or an encode that failed): a failure here.
bench() {
  local o rc
  o=$("$py" bench/bench_engine.py "$@"); rc=$?
  printf '%s\n' "$o"
  [ $rc -eq 0 ] || return $rc
  if grep -qE 'engine: -|skipped|failed' <<<"$o"; then echo "the engine gave no number for some configuration"; return 1; fi
}
export -f bench
if [ -x "$build/bench/gst-vae-engine-bench" ]; then
  if [ "$mode" = gpu ]; then
    step bench-512 240 bench --device cuda --size 512 --batches 1,4,16 \
      --precisions fp32,bf16,fp16 --iters 3 --tool "$build/bench/gst-vae-engine-bench"
  elif [ -n "$reuse" ] && [ -f "$model" ]; then
    # CI: the small model at 32², one thread (6 s here, against 30 s for the SD VAE at 64²).
    step bench-32 180 bench --device cpu --size 32 --batches 1 \
      --precisions fp32 --iters 1 --threads 1 --model "$model" --tool "$build/bench/gst-vae-engine-bench"
  else
    step bench-64 180 bench --device cpu --size 64 --batches 1 \
      --precisions fp32 --iters 1 --threads 2 --tool "$build/bench/gst-vae-engine-bench"
  fi
else
  skip bench "gst-vae-engine-bench not built"
fi

# The CUDA speed levers (docs/gpu.md): the engine alone, once with the
# environment's settings, then with one lever (or two) set on top of them, each
# away from its default. On a
# GPU: the SD VAE encoder, 512², batch 16, bf16 (channels-last only takes effect
# in bf16/fp16); on the CPU, where no lever takes effect, only the mechanics.
lever_variants=("" GSTVAE_CUDNN_BENCHMARK=0 GSTVAE_PINNED_STAGING=0 GSTVAE_UPLOAD_OVERLAP=0
  GSTVAE_CHANNELS_LAST=1 GSTVAE_SDPA=1 "GSTVAE_CHANNELS_LAST=1 GSTVAE_SDPA=1" GSTVAE_CUDA_GRAPHS=1
  GSTVAE_DOWNLOAD_OVERLAP=1 "GSTVAE_CUDA_GRAPHS=1 GSTVAE_CHANNELS_LAST=1 GSTVAE_SDPA=1")
# Every variant runs; one without a measurement (the tool prints "skipped" or
# "failed" rows and exits 0) fails the step at the end.
lever_sweep() {  # SIZE BATCH PRECISION ITERS THREADS
  local v o bad=()
  for v in "${lever_variants[@]}"; do
    echo "== ${v:-as set (defaults unless the environment says otherwise)}"
    # shellcheck disable=SC2086  # a variant is zero or more NAME=VALUE words
    o=$(env $v "$build/bench/gst-vae-engine-bench" "$sweep_model" --device "$dev" --size "$1" --batches "$2" \
      --precisions "$3" --iters "$4" --threads "$5" 2>&1)
    local rc=$?
    printf '%s\n' "$o"
    if [ $rc -ne 0 ] || ! grep -qE '^[0-9]+ +[a-z0-9]+ +[0-9]+ +[0-9.]+ ' <<<"$o"; then bad+=("${v:-as set}"); fi
  done
  if [ ${#bad[@]} -gt 0 ]; then echo "no measurement for: $(IFS=,; echo "${bad[*]}")"; return 1; fi
  echo "every variant measured"
}
if [ -x "$build/bench/gst-vae-engine-bench" ] && [ -f "$sweep_model" ]; then
  export sweep_model
  lever_variants_list=$(printf '%s\n' "${lever_variants[@]}")
  export lever_variants_list
  # Arrays do not cross into the child bash: rebuilt there from the list.
  sweep() { mapfile -t lever_variants <<<"$lever_variants_list"; lever_sweep "$@"; }
  export -f sweep lever_sweep
  if [ "$mode" = gpu ]; then step levers 150 sweep 512 16 bf16 5 "$jobs"
  else step levers 120 sweep 32 1 fp32 1 1; fi
else
  skip levers "gst-vae-engine-bench or the model missing"
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
  echo
  echo "CUDA speed levers in this run (docs/gpu.md; the steps above ran with these settings):"
  echo
  echo "| variable | this run | default |"
  echo "| --- | --- | --- |"
  for kv in GSTVAE_CUDNN_BENCHMARK=1 GSTVAE_PINNED_STAGING=1 GSTVAE_UPLOAD_OVERLAP=1 GSTVAE_CHANNELS_LAST=0 GSTVAE_SDPA=0 \
            GSTVAE_CUDA_GRAPHS=0 GSTVAE_DOWNLOAD_OVERLAP=0; do
    name=${kv%%=*}
    echo "| $name | ${!name:-${kv#*=} (default)} | ${kv#*=} |"
  done
  engine_levers=$(grep -h -m1 '^levers:' "$logs"/levers.log 2>/dev/null)
  [ -n "$engine_levers" ] && { echo; echo "The engine said: \`$engine_levers\`"; }
  if ls "$logs"/bench-*.log >/dev/null 2>&1; then
    echo; echo '```'; cat "$logs"/bench-*.log; echo '```'
  fi
  if [ -f "$logs/levers.log" ]; then
    echo; echo "Lever sweep (the settings above, then one or two levers set on top of them):"
    echo; echo '```'; cat "$logs/levers.log"; echo '```'
  fi
} >"$out/summary.md"
cat "$out/summary.md"
exit $failed

#!/usr/bin/env bash
# The C++ test suites under AddressSanitizer + UndefinedBehaviorSanitizer.
#   bash scripts/test-sanitizers.sh          # configures build-asan/ once, builds, runs
# Extra arguments go to `meson setup` (e.g. -Dlibtorch_root=/opt/libtorch).
#
# Builds the engine, the GStreamer plugin and the GoogleTest executables with
# -fsanitize=address,undefined (g++, debug, UB is fatal) in build-asan/, then
# runs every test whose program we compile: the GoogleTest executables
# (engine-tests, element-tests, reliability-tests...). Any ASan, UBSan or
# LeakSanitizer report fails the run.
#
# Not run here: the Python-driven suites (crosscheck, pipeline, latentfilesink).
# They run the uninstrumented python3 / gst-launch-1.0, into which the ASan
# runtime cannot be loaded late; scripts/test.sh runs them in the normal build.
#
# element-tests dlopen()s build-asan/gst/libgstvae.so: the test executable is
# instrumented, so the ASan runtime is already loaded when the plugin comes.
# GStreamer normally loads plugins in gst-plugin-scanner, a separate,
# uninstrumented process; GST_REGISTRY_FORK=no makes it scan in-process.
#
# Suppression files (the rules and reasons are in them): scripts/lsan.supp for
# leaks inside LibTorch/GLib/GStreamer, scripts/ubsan.supp for UB reports inside
# their code. Both are empty today: no report needed one. Never our code.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bash scripts/setup.sh

source scripts/venv.sh
dir=build-asan
if [ ! -f $dir/build.ninja ]; then
  meson setup $dir -Dtorch_python="$GSTVAE_PYTHON" -Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debug \
    -Dcpp_args=-fno-sanitize-recover=undefined -Dc_args=-fno-sanitize-recover=undefined "$@"
elif [ $# -gt 0 ]; then
  meson setup --reconfigure $dir "$@"
fi
# The tests whose program is one we compile (GoogleTest executables: engine-tests,
# element-tests, ...), found by introspection so new ones join automatically;
# only they and what they depend on are built.
selection=$(meson introspect $dir --tests --targets | /usr/bin/python3 -c '
import json, os, sys
info = json.load(sys.stdin)
build = os.path.realpath(sys.argv[1])
files = {t["id"]: t["filename"] for t in info["targets"]}
run, skip, outputs, env = [], [], set(), {}
for t in info["tests"]:
    prog = os.path.realpath(t["cmd"][0])
    if prog.startswith(build + os.sep):
        run.append(t["name"])
        for dep in t["depends"]:
            outputs.update(os.path.relpath(f, build) for f in files.get(dep, []))
        for k in ("GST_REGISTRY", "GST_PLUGIN_PATH"):
            if t["env"].get(k):
                env.setdefault(k, t["env"][k])
    else:
        skip.append(t["name"])
print(" ".join(run)); print(" ".join(skip)); print(" ".join(sorted(outputs)))
print(env.get("GST_REGISTRY", "")); print(env.get("GST_PLUGIN_PATH", ""))
' "$dir")
tests=$(sed -n 1p <<<"$selection")
skipped=$(sed -n 2p <<<"$selection")
outputs=$(sed -n 3p <<<"$selection")
registry=$(sed -n 4p <<<"$selection")     # the tests' GST_REGISTRY (tests/meson.build)
plugin_path=$(sed -n 5p <<<"$selection")  # and GST_PLUGIN_PATH
[ -n "$tests" ] || { echo "test-sanitizers: no compiled tests found in $dir" >&2; exit 1; }
echo "test-sanitizers: running under ASan+UBSan: $tests" >&2
echo "test-sanitizers: not run here (uninstrumented python3 drives them; scripts/test.sh runs them): $skipped" >&2
# shellcheck disable=SC2086
ninja -C $dir -j "$(nproc)" $outputs

# quarantine_size_mb=16 (default 256): freed blocks wait in a quarantine to catch
# use-after-free; a 256 MB one keeps RSS climbing long after warm-up, which breaks
# the flat-RSS soak and state-cycle checks of tests/test_reliability.cpp.
# 16 MB still catches any use of a block within the last 16 MB of frees.
export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:quarantine_size_mb=16:print_summary=1"
export LSAN_OPTIONS="suppressions=$root/scripts/lsan.supp:print_suppressions=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:print_summary=1:suppressions=$root/scripts/ubsan.supp"
export GST_REGISTRY_FORK=no
# GLib's slice allocator hides allocations from ASan; plain malloc instead.
export G_SLICE=always-malloc
export G_DEBUG=gc-friendly

# A fresh plugin registry, made before the tests: when GStreamer scans every
# installed plugin in one process, GLib's quark table outgrows its first block,
# which GLib drops on purpose (lock-free readers may still hold it): a 16 KB
# "leak" allocated in libglib's own constructor. Scanning here, in
# gst-inspect-1.0 with the ASan runtime preloaded (so our instrumented plugin
# loads) and leak checks off, keeps that GLib-internal artefact out of the
# tests without a suppression; the tests then load the plugin from the registry
# and run its plugin_init with leak checks on.
if [ -n "$registry" ]; then
  rm -f "$registry"
  if ! LD_PRELOAD="$(g++ -print-file-name=libasan.so)" ASAN_OPTIONS="$ASAN_OPTIONS:detect_leaks=0" \
      GST_REGISTRY="$registry" GST_PLUGIN_PATH="$plugin_path" gst-inspect-1.0 vaeencode >/dev/null; then
    echo "test-sanitizers: the instrumented plugin in $plugin_path does not load" >&2
    exit 1
  fi
fi

meson test -C $dir --no-rebuild --print-errorlogs --num-processes 1 --timeout-multiplier 3 \
  $tests

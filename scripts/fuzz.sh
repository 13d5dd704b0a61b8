#!/usr/bin/env bash
# Fuzzes the checkpoint loader (safetensors header parser + VAE key
# normalisation) and the latent file reader (latentfilesrc, read_latent_file)
# with libFuzzer, ASan and UBSan for SECONDS seconds in all (default 60): two
# thirds for the checkpoint loader, one third for the latent reader.
#   bash scripts/fuzz.sh            # 60 s, as CI runs it
#   bash scripts/fuzz.sh 600        # 10 minutes
#   FUZZ_COVERAGE=1 bash scripts/fuzz.sh 60   # also a line-coverage report of the two parser files
# Builds build-fuzz/fuzz_checkpoint and build-fuzz/fuzz_latent_file with Debian's
# clang (no LibTorch: the parser files are compiled in directly), copies the
# seed corpora fuzz/corpus/ and fuzz/corpus-latent/ to build-fuzz/ and fuzzes
# those copies, so the committed seeds never change.
# Exits non-zero on any crash, sanitizer report, leak, timeout or out-of-memory;
# the offending input is then in build-fuzz/artifacts/. To reproduce one:
#   build-fuzz/fuzz_checkpoint build-fuzz/artifacts/crash-<sha1>
#   build-fuzz/fuzz_latent_file build-fuzz/artifacts-latent/crash-<sha1>
# Fixed findings go into fuzz/corpus/ (named regression-*) so every later run
# replays them first.
# Options (environment): FUZZ_MAX_LEN (largest input, default 16384 bytes),
# FUZZ_JOBS (parallel fuzzing processes, default 1).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
case "$seconds" in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
max_len=${FUZZ_MAX_LEN:-16384}
jobs=${FUZZ_JOBS:-1}

if [ "${FUZZ_COVERAGE:-0}" = 1 ]; then bash scripts/setup.sh fuzz coverage; else bash scripts/setup.sh fuzz; fi
cxx=$(command -v clang++-14 || command -v clang++ || true)
[ -n "$cxx" ] || { echo "fuzz: clang++ not found" >&2; exit 1; }
json_cflags=$(pkg-config --cflags nlohmann_json 2>/dev/null || true)

out=build-fuzz
mkdir -p "$out/obj"
checkpoint_sources=(fuzz/fuzz_checkpoint.cpp src/safetensors.cpp src/checkpoint_keys.cpp)
latent_sources=(fuzz/fuzz_latent_file.cpp src/latent_file.cpp src/safetensors.cpp)
sources=("${checkpoint_sources[@]}")  # what build() compiles
headers=(src/safetensors.h src/checkpoint_keys.h src/errors.h src/latent_file.h)
common=(-std=c++17 -g -O1 -fno-omit-frame-pointer -Isrc $json_cflags -D_GLIBCXX_ASSERTIONS
        -Wall -Wextra)

# build TARGET FLAGS...: compiles the sources (in parallel) and links TARGET,
# unless TARGET is newer than every source, header and this script.
build() {
  local target=$1; shift
  local stale=0
  if [ ! -x "$target" ]; then stale=1; else
    for f in "${sources[@]}" "${headers[@]}" scripts/fuzz.sh; do
      [ "$f" -nt "$target" ] && stale=1
    done
  fi
  [ $stale -eq 1 ] || return 0
  echo "fuzz: building $target with $cxx" >&2
  local objs=() pids=() tag
  tag=$(basename "$target")
  for src in "${sources[@]}"; do
    local obj="$out/obj/$tag-$(basename "${src%.cpp}").o"
    objs+=("$obj")
    "$cxx" "${common[@]}" "$@" -c "$src" -o "$obj" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  "$cxx" "${common[@]}" "$@" "${objs[@]}" -o "$target"
}

sanitize=(-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined)
sources=("${checkpoint_sources[@]}")
build "$out/fuzz_checkpoint" "${sanitize[@]}"
sources=("${latent_sources[@]}")
build "$out/fuzz_latent_file" "${sanitize[@]}"
sources=("${checkpoint_sources[@]}")

# The time budget: a third for the latent reader (a smaller parser), the rest
# for the checkpoint loader; the total stays SECONDS.
latent_seconds=$(( seconds / 3 ))
checkpoint_seconds=$(( seconds - latent_seconds ))
if [ "$seconds" -ge 2 ] && [ "$latent_seconds" -lt 1 ]; then latent_seconds=1; checkpoint_seconds=$(( seconds - 1 )); fi

rm -rf "$out/corpus" "$out/artifacts" "$out/large" "$out/corpus-latent" "$out/artifacts-latent"
mkdir -p "$out/corpus" "$out/artifacts" "$out/corpus-latent" "$out/artifacts-latent"
cp fuzz/corpus/* "$out/corpus/"
cp fuzz/corpus-latent/* "$out/corpus-latent/"
# Large regression inputs (MBs: too big to commit or mutate), run once each.
/usr/bin/python3 fuzz/make_corpus.py --large "$out/large"

# halt on the first report; leaks are errors (libFuzzer checks after each input
# that allocated more than it freed). Nothing is suppressed: only our code and
# the C++ standard library run here.
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

echo "fuzz: replaying $(ls "$out/large" | wc -l) large regression inputs" >&2
if ! "$out/fuzz_checkpoint" -rss_limit_mb=4096 -timeout=120 -artifact_prefix="$out/artifacts/" \
    "$out"/large/* >"$out/large.log" 2>&1; then
  tail -n 40 "$out/large.log" >&2
  echo "fuzz: FAILED on a large regression input (see $out/large.log)" >&2
  exit 1
fi

# fuzz NAME TARGET CORPUS ARTIFACTS DICT SECONDS LOG: one libFuzzer run; fails
# the script on any finding.
fuzz() {
  local name=$1 target=$2 corpus=$3 artifacts=$4 dict=$5 secs=$6 log=$7
  [ "$secs" -gt 0 ] || return 0
  echo "fuzz: fuzzing the $name for ${secs}s ($(ls "$corpus" | wc -l) seed inputs, max_len $max_len, $jobs job(s))" >&2
  local start elapsed status=0
  start=$(date +%s)
  local args=(-max_total_time="$secs" -print_final_stats=1 -dict="$dict" -max_len="$max_len"
              -timeout=25 -rss_limit_mb=2048 -artifact_prefix="$artifacts/")
  if [ "$jobs" -gt 1 ]; then
    "$target" "${args[@]}" -fork="$jobs" "$corpus" >"$log" 2>&1 || status=$?
  else
    "$target" "${args[@]}" "$corpus" >"$log" 2>&1 || status=$?
  fi
  elapsed=$(( $(date +%s) - start ))
  grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::|^Done [0-9]+ runs' "$log" >&2 || true
  echo "fuzz: corpus now $(ls "$corpus" | wc -l) inputs ($(du -sb "$corpus" | cut -f1) bytes) in $corpus; log in $log; ${elapsed}s" >&2
  if [ $status -ne 0 ] || [ -n "$(ls -A "$artifacts")" ]; then
    tail -n 60 "$log" >&2
    echo "fuzz: FAILED (exit $status); inputs: $(ls "$artifacts"/* 2>/dev/null | tr '\n' ' ')" >&2
    echo "fuzz: reproduce with: $target <input>" >&2
    exit 1
  fi
}

fuzz "checkpoint loader" "$out/fuzz_checkpoint" "$out/corpus" "$out/artifacts" fuzz/dict "$checkpoint_seconds" \
  "$out/fuzz.log"
fuzz "latent file reader" "$out/fuzz_latent_file" "$out/corpus-latent" "$out/artifacts-latent" fuzz/dict-latent \
  "$latent_seconds" "$out/fuzz-latent.log"

if [ "${FUZZ_COVERAGE:-0}" = 1 ]; then
  # Line/region coverage of the corpus (seeds + what this run found), without
  # sanitizers: every input is run once.
  build "$out/fuzz_checkpoint_cov" -fsanitize=fuzzer -fprofile-instr-generate -fcoverage-mapping
  rm -f "$out"/cov-*.profraw
  LLVM_PROFILE_FILE="$out/cov-%p.profraw" "$out/fuzz_checkpoint_cov" -runs=0 "$out/corpus" >"$out/cov.log" 2>&1
  llvm-profdata-14 merge -sparse "$out"/cov-*.profraw -o "$out/cov.profdata"
  llvm-cov-14 report "$out/fuzz_checkpoint_cov" -instr-profile="$out/cov.profdata" \
    src/safetensors.cpp src/checkpoint_keys.cpp fuzz/fuzz_checkpoint.cpp | tee "$out/coverage.txt" >&2
  llvm-cov-14 show "$out/fuzz_checkpoint_cov" -instr-profile="$out/cov.profdata" \
    src/safetensors.cpp src/checkpoint_keys.cpp >"$out/coverage-lines.txt"
  echo "fuzz: line-by-line coverage in $out/coverage-lines.txt" >&2
fi
echo "fuzz: OK, no findings in ${seconds}s" >&2

#!/usr/bin/env bash
# Fuzzes the checkpoint loader (safetensors header parser + VAE key
# normalisation) with libFuzzer, ASan and UBSan for SECONDS seconds (default 60).
#   bash scripts/fuzz.sh            # 60 s, as CI runs it
#   bash scripts/fuzz.sh 600        # 10 minutes
#   FUZZ_COVERAGE=1 bash scripts/fuzz.sh 60   # also a line-coverage report of the two parser files
# Builds build-fuzz/fuzz_checkpoint with Debian's clang (no LibTorch: the parser
# files are compiled in directly), copies the seed corpus fuzz/corpus/ to
# build-fuzz/corpus/ and fuzzes that copy, so the committed seeds never change.
# Exits non-zero on any crash, sanitizer report, leak, timeout or out-of-memory;
# the offending input is then in build-fuzz/artifacts/. To reproduce one:
#   build-fuzz/fuzz_checkpoint build-fuzz/artifacts/crash-<sha1>
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
sources=(fuzz/fuzz_checkpoint.cpp src/safetensors.cpp src/checkpoint_keys.cpp)
headers=(src/safetensors.h src/checkpoint_keys.h src/errors.h)
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
build "$out/fuzz_checkpoint" "${sanitize[@]}"

rm -rf "$out/corpus" "$out/artifacts" "$out/large"
mkdir -p "$out/corpus" "$out/artifacts"
cp fuzz/corpus/* "$out/corpus/"
seeds=$(ls "$out/corpus" | wc -l)
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

echo "fuzz: fuzzing the checkpoint loader for ${seconds}s ($seeds seed inputs, max_len $max_len, $jobs job(s))" >&2
start=$(date +%s)
args=(-max_total_time="$seconds" -print_final_stats=1 -dict=fuzz/dict -max_len="$max_len"
      -timeout=25 -rss_limit_mb=2048 -artifact_prefix="$out/artifacts/")
status=0
if [ "$jobs" -gt 1 ]; then
  "$out/fuzz_checkpoint" "${args[@]}" -fork="$jobs" "$out/corpus" >"$out/fuzz.log" 2>&1 || status=$?
else
  "$out/fuzz_checkpoint" "${args[@]}" "$out/corpus" >"$out/fuzz.log" 2>&1 || status=$?
fi
elapsed=$(( $(date +%s) - start ))

grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::|^Done [0-9]+ runs' "$out/fuzz.log" >&2 || true
echo "fuzz: corpus now $(ls "$out/corpus" | wc -l) inputs ($(du -sb "$out/corpus" | cut -f1) bytes) in $out/corpus; log in $out/fuzz.log; ${elapsed}s" >&2
if [ $status -ne 0 ] || [ -n "$(ls -A "$out/artifacts")" ]; then
  tail -n 60 "$out/fuzz.log" >&2
  echo "fuzz: FAILED (exit $status); inputs: $(ls "$out"/artifacts/* 2>/dev/null | tr '\n' ' ')" >&2
  echo "fuzz: reproduce with: $out/fuzz_checkpoint <input>" >&2
  exit 1
fi

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

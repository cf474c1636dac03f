#!/usr/bin/env bash
# Smoke-runs every cargo-fuzz target in fuzz/ for a bounded time (FUZZ_SECONDS each,
# default 15) and fails on a crash. Needs a nightly toolchain (libFuzzer's coverage
# flags); without one it says so and exits 0. No sanitizer: the broker has no unsafe
# code, and an instrumented std costs a long cold build; panics and failed checks still
# crash. cargo-fuzz is installed into $HOME/.cargo/bin when missing.
# Build outputs go to $HOME/.cache/eventtermq/fuzz-target, the growing corpora to
# $HOME/.cache/eventtermq/fuzz-corpus (fuzz/seeds/ holds the committed seeds).
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-15}"
export CARGO_TERM_COLOR=never
export CARGO_INCREMENTAL=0
# The main workspace's target dir does not apply: the fuzz crate has its own flags.
unset CARGO_TARGET_DIR
FUZZ_TARGET_DIR="$HOME/.cache/eventtermq/fuzz-target"
CORPUS_ROOT="$HOME/.cache/eventtermq/fuzz-corpus"

if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
# Only query rustup (never let it install a toolchain implicitly).
if ! command -v rustup >/dev/null 2>&1 || ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "skipping fuzz: no nightly toolchain"
  exit 0
fi
echo "== fuzz toolchain: $(rustup run nightly rustc --version)"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
cargo fuzz --version

cd fuzz
mkdir -p "$FUZZ_TARGET_DIR" "$CORPUS_ROOT"
echo "== building fuzz targets"
cargo +nightly fuzz build --sanitizer none --target-dir "$FUZZ_TARGET_DIR"

# run_target TARGET LOG: one smoke run. -rss_limit_mb: the targets keep small inputs; a
# blow-up is a bug worth failing on. libFuzzer prints a line per new coverage point:
# it goes to LOG, whose tail is shown (everything when the target failed).
run_target() {
  local target=$1 log=$2 corpus="$CORPUS_ROOT/$1" seeds=()
  mkdir -p "$corpus"
  [ -d "seeds/$target" ] && seeds=("seeds/$target")
  cargo +nightly fuzz run --sanitizer none --target-dir "$FUZZ_TARGET_DIR" "$target" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
}

# A libFuzzer run uses one core: FUZZ_JOBS targets at once (default: one per CPU), so the
# step takes FUZZ_SECONDS per FUZZ_JOBS targets.
FUZZ_JOBS="${FUZZ_JOBS:-$(nproc)}"
mapfile -t targets < <(cargo +nightly fuzz list)
failed=()
for ((i = 0; i < ${#targets[@]}; i += FUZZ_JOBS)); do
  batch=("${targets[@]:i:FUZZ_JOBS}")
  pids=() logs=()
  for target in "${batch[@]}"; do
    logs+=("$(mktemp)")
    run_target "$target" "${logs[-1]}" &
    pids+=("$!")
  done
  for j in "${!batch[@]}"; do
    echo "== fuzz ${batch[$j]} (${FUZZ_SECONDS}s)"
    if wait "${pids[$j]}"; then
      tail -n 4 "${logs[$j]}"
    else
      cat "${logs[$j]}"
      failed+=("${batch[$j]}")
    fi
    rm -f "${logs[$j]}"
  done
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]} (inputs under fuzz/artifacts/<target>/; reproduce with"
  echo "  cd fuzz && cargo +nightly fuzz run <target> artifacts/<target>/<file>)"
  exit 1
fi
echo "fuzz: all targets ran ${FUZZ_SECONDS}s without a crash"

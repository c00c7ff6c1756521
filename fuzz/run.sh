#!/usr/bin/env bash
# Builds and runs one fuzz target on the stable toolchain (what `cargo fuzz` does with
# nightly): libFuzzer with sanitizer coverage, no sanitizer. Crashes land in fuzz/.
#
#   bash fuzz/run.sh dns_query 300      # target, seconds
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: fuzz/run.sh TARGET [SECONDS]}
secs=${2:-60}
export CARGO_TARGET_DIR=../target/fuzz-build
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing" \
  cargo build --release --bin "$target" --target x86_64-unknown-linux-gnu
mkdir -p "corpus/$target"
"$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/$target" -max_total_time="$secs" "corpus/$target"

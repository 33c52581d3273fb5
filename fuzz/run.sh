#!/usr/bin/env bash
# Runs each fuzz target for a bounded time, starting from the committed
# corpus (fuzz/corpus/<target>; what the run finds goes to a scratch
# directory, not into the repository). A crash fails the run and prints
# the minimised input.
#
#   fuzz/run.sh                  every target, FUZZ_SECONDS (default 60) each
#   FUZZ_SECONDS=600 fuzz/run.sh codec link    longer, chosen targets
#
# Needs a nightly toolchain (`cargo +nightly`) and cargo-fuzz.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-60}
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
# -O: optimised, as the gateway ships (without debug assertions or
# overflow checks: cargo-fuzz adds them only with -a; with
# AddressSanitizer, cargo-fuzz's defaults).
cargo +nightly fuzz build -O
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "$scratch/$t"
  log="$scratch/$t.log"
  echo "fuzz: $t for ${seconds}s"
  if cargo +nightly fuzz run -O "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -max_len=4096 -timeout=20 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
    grep -E 'cov: [0-9]+' "$log" | tail -1 || true
    continue
  fi
  echo "fuzz: target $t FAILED" >&2
  grep -vE '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse|INITED)' "$log" | tail -60 >&2
  crash=$(ls -t "artifacts/$t"/* 2>/dev/null | head -1 || true)
  if [ -n "$crash" ]; then
    cargo +nightly fuzz tmin -O -r 2000 "$t" "$crash" >"$scratch/tmin.log" 2>&1 || true
    small=$(ls -t "artifacts/$t"/minimized-from-* 2>/dev/null | head -1 || true)
    small=${small:-$crash}
    echo "fuzz: minimised input ($small), reproduce with:" >&2
    echo "  cargo +nightly fuzz run -O $t fuzz/$small" >&2
    od -A d -t x1 "$small" >&2
    cargo +nightly fuzz fmt -O "$t" "$small" >&2 2>&1 || true
  fi
  exit 1
done

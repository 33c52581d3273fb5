#!/usr/bin/env bash
# RFC 6455 conformance through the whole relay path: Autobahn|TestSuite
# cases 1-7, 9 and 10 (no compression), run by kosoku against the gateway
# (plain ws) in front of the reference echo backend.
#
# The limits are raised to 16 MiB for this run because group 9 sends
# messages of up to 16 MiB; with the default 1 MiB limit those cases end in
# the documented 1009 close instead.
#
# Usage: tests/autobahn.sh [OUTDIR]   (default target/autobahn)
# Needs: the release binaries and .venv (tests/run.sh prepares both).
# Exits non-zero if any case FAILED, if fewer than all 301 cases ran, if
# NON-STRICT rose above the baseline recorded in tests/AUTOBAHN.md, or if a
# process panicked or the backend saw a protocol violation.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/autobahn}
mkdir -p "$out"
bin=target/release
max_message=$((16 << 20))
max_frame=$((max_message + 4096))

wait_listening() { # file, pattern -> prints address
  for _ in $(seq 1 200); do
    if grep -q "$2" "$1" 2>/dev/null; then
      grep -m1 "$2" "$1" | awk '{print $NF}'
      return 0
    fi
    sleep 0.05
  done
  echo "timed out waiting for '$2' in $1" >&2
  return 1
}

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

"$bin/loadtest" backend --listen 127.0.0.1:0 --max-frame "$max_frame" >"$out/backend.out" 2>"$out/backend.err" &
pids+=($!)
backend=$(wait_listening "$out/backend.out" '^listening ')

"$bin/gateway" --listen 127.0.0.1:0 --backend "$backend" --links 2 \
  --set "session.max_message_size=$max_message" \
  --set "backend.max_frame_size=$max_frame" \
  --set 'backend.link_queue_bytes="64MiB"' \
  --set 'session.client_queue_bytes="64MiB"' \
  >"$out/gateway.out" 2>"$out/gateway.err" &
pids+=($!)
gw=$(wait_listening "$out/gateway.out" '^listening ws ')

# Not `status=$?` after the command: under `set -e` a failing command would
# end the script there and skip the diagnostics below.
status=0
.venv/bin/python tests/interop/autobahn.py --url "ws://$gw/ws" --out "$out" --fail-on-failed \
  | tee "$out/summary.txt" || status=$?
if grep -q "PROTOCOL VIOLATION" "$out/backend.err"; then
  echo "the reference backend saw protocol violations:" >&2
  cat "$out/backend.err" >&2
  status=1
fi
if grep -q "panicked at" "$out/gateway.err" "$out/backend.err"; then
  echo "a process panicked during the Autobahn run:" >&2
  cat "$out/gateway.err" "$out/backend.err" >&2
  status=1
fi

# Every case must have run, and NON-STRICT may not rise above the baseline
# recorded in tests/AUTOBAHN.md (it flips between 8 and 12 from run to run,
# see there); FAILED must be 0 (checked by --fail-on-failed above).
expected_cases=301
non_strict_baseline=12
line=$(grep '^AUTOBAHN ' "$out/summary.txt" | tail -n1 || true)
if [ -z "$line" ]; then
  echo "autobahn.sh: no AUTOBAHN summary line; see $out" >&2
  status=1
else
  count() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<" $line"; }
  total=0
  for v in OK NON-STRICT INFORMATIONAL UNIMPLEMENTED FAILED; do
    total=$((total + $(count "$v")))
  done
  if [ "$total" -ne "$expected_cases" ]; then
    echo "autobahn.sh: $total cases ran, expected $expected_cases: $line" >&2
    status=1
  fi
  if [ "$(count NON-STRICT)" -gt "$non_strict_baseline" ]; then
    echo "autobahn.sh: NON-STRICT=$(count NON-STRICT) is above the recorded baseline of $non_strict_baseline (tests/AUTOBAHN.md)" >&2
    status=1
  fi
fi
if [ "$status" -ne 0 ]; then
  echo "autobahn.sh: FAILED (status $status); gateway log: $out/gateway.err" >&2
fi
exit "$status"

#!/usr/bin/env bash
# The benchmark command: the gateway side by side with websocat and
# websockify, in one run. Builds the release binaries, installs the peers
# from their registries by name into target/bench-tools (never into the
# repository), then runs loadtest/bench/bench.py, which prints the report
# (also written to target/bench/results.md).
#
#   loadtest/bench/run.sh            # full run, about 10 minutes
#   loadtest/bench/run.sh --quick    # smoke test, under a minute
set -euo pipefail
cd "$(dirname "$0")/../.."
tools=target/bench-tools

cargo build --release --bins

if [ ! -x "$tools/bin/websocat" ]; then
  # Plain ws only (the bridge's TLS is not used), so build without OpenSSL.
  cargo install websocat --version 1.14.1 --locked --no-default-features \
    --features signal_handler,tokio-process,unix_stdio --root "$tools"
fi
if [ ! -x "$tools/venv/bin/websockify" ]; then
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check websockify==0.13.0
fi

exec python3 loadtest/bench/bench.py "$@"

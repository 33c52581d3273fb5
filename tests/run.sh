#!/usr/bin/env bash
# The project's test command (the README's): builds everything, prepares the
# Python tools the interoperability tests use, and runs every test:
#   1. unit tests and end-to-end tests (cargo test, real processes, sockets, TLS)
#   2. the independent Python backend's own self-test
#   3. Autobahn|TestSuite conformance through the whole relay path
# Works from a fresh clone; needs cargo and python3 (with venv) on the PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

# Python tools, pinned in tests/requirements.txt, in a local virtualenv.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt

# The end-to-end tests run the real binaries, so build them first.
cargo build --release --workspace --bins
cargo test --release --workspace

.venv/bin/python tests/interop/backend.py --self-test
tests/autobahn.sh target/autobahn

#!/usr/bin/env bash
# The project's test command (the README's): builds everything, prepares the
# Python tools the interoperability tests use, and runs every test:
#   1. unit tests and end-to-end tests (cargo test, real processes, sockets, TLS)
#      (the Kotlin client's tests among them, compiled first with kotlinc)
#   2. the independent Python backend's own self-test
#   3. Autobahn|TestSuite conformance through the whole relay path
# Works from a fresh clone. Needs: Linux (the tests read /proc), cargo,
# python3 >= 3.11 with venv (the pinned websockets needs it), Debian's
# kotlin, libokhttp-java, libokio-java and a JDK, redis-server, haproxy,
# prometheus and systemd-analyze (.ci/run installs them), and an
# open-file limit of at least 16384 (the 10,000-session test holds that many
# sockets); this script raises the soft limit to the hard limit itself.
#
# TEST_TIMEOUT (default 45m) bounds the cargo test run, so a hang fails fast
# instead of using up a CI job's budget.
set -euo pipefail
cd "$(dirname "$0")/.."

need_files=16384
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$need_files" ]; then
  echo "tests/run.sh: the hard open-file limit is $hard; the tests need $need_files." >&2
  echo "  Raise it (as root: 'ulimit -Hn $need_files' in this shell, or 'nofile' in" >&2
  echo "  /etc/security/limits.conf, or LimitNOFILE= for a service) and run again." >&2
  exit 2
fi
ulimit -Sn "$hard"

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "tests/run.sh: python3 >= 3.11 is needed (for the pinned websockets); found $(python3 --version)" >&2
  exit 2
fi

# The Kotlin client (protocol/clients/kotlin) is compiled with Debian's
# Kotlin and OkHttp 3.13, and tested against the gateway by
# tests/tests/kotlin_client.rs. Compiled here first (into the target
# directory), so a missing package or a broken README example fails at once.
if ! command -v kotlinc >/dev/null || ! command -v javac >/dev/null ||
  [ ! -f /usr/share/java/okhttp.jar ] || [ ! -f /usr/share/java/okio.jar ]; then
  echo "tests/run.sh: the Kotlin client's tests need Debian's kotlin, OkHttp 3 and a JDK:" >&2
  echo "  apt-get install -y kotlin libokhttp-java libokio-java default-jdk-headless" >&2
  exit 2
fi
# The fleet's tests (tests/tests/fleet.rs) run Debian's redis-server and
# haproxy as child processes.
if ! command -v redis-server >/dev/null || ! command -v haproxy >/dev/null; then
  echo "tests/run.sh: the fleet's tests need redis-server and haproxy:" >&2
  echo "  apt-get install -y redis-server haproxy" >&2
  exit 2
fi
# The metrics tests run Debian's prometheus as a child process (its own
# configuration, storage and port; the package's service is not used).
if ! command -v prometheus >/dev/null; then
  echo "tests/run.sh: the metrics tests need Debian's prometheus:" >&2
  echo "  apt-get install -y --no-install-recommends prometheus" >&2
  exit 2
fi
# tests/tests/packaging.rs checks the systemd unit with systemd-analyze.
if ! command -v systemd-analyze >/dev/null; then
  echo "tests/run.sh: the packaging tests need systemd-analyze:" >&2
  echo "  apt-get install -y systemd" >&2
  exit 2
fi
protocol/clients/kotlin/build.sh "${CARGO_TARGET_DIR:-target}/kotlin" >/dev/null

# Python tools, pinned in tests/requirements.txt, in a local virtualenv.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt

# The end-to-end tests run the real binaries, so build them first (the tests
# also refuse to run binaries older than their sources).
cargo build --release --workspace --bins
timeout --kill-after=30s "${TEST_TIMEOUT:-45m}" cargo test --release --workspace

.venv/bin/python tests/interop/backend.py --self-test
timeout --kill-after=30s 15m tests/autobahn.sh target/autobahn

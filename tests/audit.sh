#!/usr/bin/env bash
# Dependency audit: `cargo audit` (RustSec) over Cargo.lock, against the
# advisory database snapshot kept in tests/audit/ (CI machines reach
# crates.io but not GitHub, where the database lives). Fails on any
# vulnerability advisory for a crate in Cargo.lock; "unmaintained" and
# other informational advisories are printed, not fatal.
#
#   tests/audit.sh            run the audit (installs cargo-audit if needed)
#   tests/audit.sh --refresh  replace the snapshot with the database's
#                             current state (needs github.com), then commit
#                             tests/audit/ and run the audit
#
# The snapshot's date is in tests/audit/SNAPSHOT: refresh it before a
# release, and whenever it is more than a month old.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_AUDIT_VERSION=0.22.2
SNAPSHOT=tests/audit/advisory-db.tar.xz

if [ "${1:-}" = --refresh ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  git clone --quiet --depth 1 https://github.com/rustsec/advisory-db "$tmp/db"
  git -C "$tmp/db" archive --format=tar HEAD | xz -9 > "$SNAPSHOT"
  { git -C "$tmp/db" log -1 --format=%cs; git -C "$tmp/db" log -1 --format=%H; } > tests/audit/SNAPSHOT
  echo "audit: snapshot of $(head -1 tests/audit/SNAPSHOT) written to $SNAPSHOT"
fi

if ! cargo audit --version 2>/dev/null | grep -q "$CARGO_AUDIT_VERSION"; then
  echo "audit: installing cargo-audit $CARGO_AUDIT_VERSION (a few minutes on 2 cores)"
  cargo install --quiet --locked cargo-audit --version "$CARGO_AUDIT_VERSION"
fi

# cargo audit opens its database as a git repository.
db=target/advisory-db
rm -rf "$db"
mkdir -p "$db"
tar -xJf "$SNAPSHOT" -C "$db"
git -C "$db" init --quiet
git -C "$db" add -A
git -C "$db" -c user.name=audit -c user.email=audit@localhost commit --quiet -m snapshot

# The patched copies in patches/ are path dependencies, which cargo audit
# does not match against advisories. Audit a copy of Cargo.lock that names
# them as the crates.io releases they were copied from, so that an advisory
# against one of those releases fails the audit too.
lock=target/audit-Cargo.lock
python3 - Cargo.lock "$lock" patches/*/ <<'PY'
import os, sys
patched = {os.path.basename(d.rstrip("/")) for d in sys.argv[3:]}
source = 'source = "registry+https://github.com/rust-lang/crates.io-index"'
out, block = [], []
def flush():
    if block and not any(l.startswith("source = ") for l in block):
        name = next((l for l in block if l.startswith("name = ")), "")
        if name[8:-1] in patched:
            print(f"audit: the patched copy {name[7:]} is audited as its crates.io release")
            at = next(i for i, l in enumerate(block) if l.startswith("version = "))
            block.insert(at + 1, source)
    out.extend(block)
for line in open(sys.argv[1]).read().splitlines():
    if line == "[[package]]":
        flush()
        block = []
    (block if block or line == "[[package]]" else out).append(line)
flush()
open(sys.argv[2], "w").write("\n".join(out) + "\n")
PY

echo "audit: advisory database of $(head -1 tests/audit/SNAPSHOT)"
cargo audit --db "$db" --no-fetch --stale --file "$lock"

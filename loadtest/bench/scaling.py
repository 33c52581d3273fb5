#!/usr/bin/env python3
"""What idle wss sessions cost as their number grows, and what that projects.

One gateway (2 links) in front of the reference echo backend. An
independent client (Python `websockets`, not our loadtest) opens sessions
one after another up to each step (default 1,000, 5,000, 10,000, 18,000);
every session sends one empty message and waits for its echo, then idles.
The client's sockets are spread over 127.0.0.2-127.0.0.9 (like loadtest's
`--sources`). At each step, after `--settle` seconds:

- the gateway's RSS growth per session (over its RSS before the first);
- the kernel's slab memory growth per session (`Slab` in /proc/meminfo,
  machine-wide: the client's socket and the gateway's, both on loopback,
  so half of it is the gateway's share);
- the gateway's CPU while the sessions idle for `--idle` seconds (its
  pings every `session.ping_interval` and their pongs), per session per
  minute;
- the gateway's CPU to open each session (TLS handshake, upgrade, one
  round trip), from the step's opening.

Then every session must still answer. The table ends with a projection
for 1 million sessions on one host from the largest step.

  .venv/bin/python loadtest/bench/scaling.py                 # 1k, 5k, 10k, 18k wss
  .venv/bin/python loadtest/bench/scaling.py --steps 1000,5000 --transport ws

Needs `cargo build --release --bins` first, the tests' venv
(`tests/requirements.txt`), and `ulimit -n` above the largest step plus a
few hundred (the client holds one descriptor per session).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import ssl
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, Proc  # noqa: E402

from websockets.asyncio.client import connect  # noqa: E402

SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]


def slab_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1])
    raise SystemExit("no Slab in /proc/meminfo")


async def grow(conns: list, url: str, to: int, ctx, host: str) -> None:
    while len(conns) < to:
        src = SOURCES[len(conns) % len(SOURCES)]
        ws = await connect(url, ssl=ctx, server_hostname=host if ctx else None, max_size=None,
                           ping_interval=None, compression=None, open_timeout=30,
                           local_addr=(src, 0))
        await ws.send(b"")
        if await asyncio.wait_for(ws.recv(), 30) != b"":
            raise SystemExit("echo differs")
        conns.append(ws)


async def run(a, gw: Proc, url: str, ctx) -> list[dict]:
    rows = []
    conns: list = []
    rss0, slab0 = gw.rss_kib(), slab_kib()
    try:
        for step in a.steps:
            cpu_before_open = gw.cpu_s()
            t0 = time.time()
            opened_from = len(conns)
            await grow(conns, url, step, ctx, "localhost")
            open_s = time.time() - t0
            open_cpu = gw.cpu_s() - cpu_before_open
            await asyncio.sleep(a.settle)
            rss, slab = gw.rss_kib(), slab_kib()
            cpu0 = gw.cpu_s()
            await asyncio.sleep(a.idle)
            idle_cpu = gw.cpu_s() - cpu0
            row = {
                "sessions": step,
                "rss_kib": rss,
                "rss_kib_per_session": round((rss - rss0) / step, 2),
                "slab_kib_per_session": round((slab - slab0) / step, 2),
                "idle_cpu_ms_per_session_min": round(idle_cpu * 1000 / step * 60 / a.idle, 4),
                "open_cpu_us_per_session": round(open_cpu * 1e6 / (step - opened_from), 1),
                "open_s": round(open_s, 1),
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        # Every session still answers: what was measured were live sessions.
        for ws in conns:
            await ws.send(b"still-here")
        for ws in conns:
            if await asyncio.wait_for(ws.recv(), 60) != b"still-here":
                raise SystemExit("a session did not answer after idling")
    finally:
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="1000,5000,10000,18000", help="session counts, increasing")
    ap.add_argument("--transport", default="wss", choices=["ws", "wss"])
    ap.add_argument("--settle", type=float, default=3.0, help="seconds idle before RSS and slab are read")
    ap.add_argument("--idle", type=float, default=60.0,
                    help="seconds over which idle CPU is measured (a multiple of the gateway's 20 s ping interval, "
                         "so every session is pinged the same number of times)")
    ap.add_argument("--gateway", default=str(BIN / "gateway"))
    ap.add_argument("--out", default="target/bench/scaling")
    a = ap.parse_args()
    a.steps = [int(s) for s in a.steps.split(",")]
    need = max(a.steps) + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    certs = out / "certs"
    subprocess.run([str(BIN / "loadtest"), "devcert", "--out", str(certs)], check=True, capture_output=True)
    procs = []
    try:
        backend = Proc([str(BIN / "loadtest"), "backend", "--listen", "127.0.0.1:0"], 1, "backend", out)
        procs.append(backend)
        listen = ["--listen-tls", "127.0.0.1:0", "--tls-cert", str(certs / "cert.pem"),
                  "--tls-key", str(certs / "key.pem")] if a.transport == "wss" else ["--listen", "127.0.0.1:0"]
        gw = Proc([a.gateway, *listen, "--backend", backend.addrs[0], "--links", "2",
                   "--set", f"listen.max_sessions={max(a.steps) + 100}"], 1, "gateway", out)
        procs.append(gw)
        time.sleep(1)
        port = gw.addrs[0].split(":")[1]
        url = f"{a.transport}://localhost:{port}/ws"
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem")) if a.transport == "wss" else None
        rows = asyncio.run(run(a, gw, url, ctx))
    finally:
        for p in reversed(procs):
            p.stop()
    (out / "scaling.json").write_text(json.dumps(rows, indent=2))
    print(f"\nIdle {a.transport} sessions, one gateway (2 links); idle CPU over {a.idle:g} s:\n")
    print("| sessions | gateway RSS | RSS KiB/session | slab KiB/session (both ends) "
          "| idle CPU ms/session/min | CPU µs to open one |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sessions']:,} | {r['rss_kib'] / 1024:.0f} MiB | {r['rss_kib_per_session']} "
              f"| {r['slab_kib_per_session']} | {r['idle_cpu_ms_per_session_min']} "
              f"| {r['open_cpu_us_per_session']} |")
    last = rows[-1]
    per = last["rss_kib_per_session"] + last["slab_kib_per_session"] / 2
    print(f"\nProjection for 1,000,000 sessions from {last['sessions']:,}: "
          f"{last['rss_kib_per_session']} KiB RSS + {last['slab_kib_per_session'] / 2:.2f} KiB kernel "
          f"(half the slab) = {per:.1f} KiB each, {per * 1e6 / 1024 / 1024:.1f} GiB; idle CPU "
          f"{last['idle_cpu_ms_per_session_min'] * 1e6 / 60 / 1000:.2f} cores.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

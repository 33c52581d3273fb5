#!/usr/bin/env python3
"""What an idle session costs after it once sent a large message.

For each transport (ws, wss) and message size, a fresh gateway in front of
the reference echo backend; an independent client (Python `websockets`, not
our loadtest) opens N sessions one after another, each sends ONE message of
the given size and waits for its echo (so only one large message is in
flight at a time), and then every session stays open and idle. The gateway's
RSS growth over its RSS before the first session, divided by N, is the cost
of one idle session. Measured `--settle` after the last session's echo.

  .venv/bin/python loadtest/bench/memory.py                     # 1,000 sessions, 0 / 64 KiB / 512 KiB, ws and wss
  .venv/bin/python loadtest/bench/memory.py --ab OLD_GATEWAY    # the same with an old binary, interleaved
  .venv/bin/python loadtest/bench/memory.py --resume --sizes 0  # resumable sessions (`X-Wsgw-Resume: new`)

Needs `cargo build --release --bins` first and the tests' venv
(`tests/requirements.txt`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, Proc  # noqa: E402

import websockets  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402


async def hold(url: str, n: int, size: int, ca: str | None, settle: float, rss, resume: bool) -> dict:
    ctx = None
    if ca:
        ctx = ssl.create_default_context(cafile=ca)
    conns = []
    payload = bytes(i % 251 for i in range(size))
    t0 = time.time()
    try:
        for _ in range(n):
            headers = {"X-Wsgw-Resume": "new"} if resume else None
            ws = await connect(url, ssl=ctx, max_size=None, ping_interval=None, compression=None,
                               open_timeout=30, additional_headers=headers)
            if resume and not ws.response.headers.get("X-Wsgw-Resume"):
                raise SystemExit("asked for a resumable session and got no token")
            await ws.send(payload)
            echo = await asyncio.wait_for(ws.recv(), 30)
            if echo != payload:
                raise SystemExit(f"echo differs: {len(echo)} bytes back for {size}")
            conns.append(ws)
        opened = time.time() - t0
        await asyncio.sleep(settle)
        after = rss()
        # Every session still answers: the memory measured was of live
        # sessions.
        for ws in conns:
            await ws.send(b"still-here")
        for ws in conns:
            if await asyncio.wait_for(ws.recv(), 30) != b"still-here":
                raise SystemExit("a session did not answer after idling")
        return {"rss_after_kib": after, "open_s": round(opened, 1)}
    finally:
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)


def one(gateway: Path, transport: str, n: int, size: int, settle: float, out: Path, certs: Path,
        backend_args: list[str], resume: bool) -> dict:
    procs = []
    try:
        backend = Proc([str(BIN / "loadtest"), "backend", "--listen", "127.0.0.1:0", *backend_args], 1,
                       "backend", out)
        procs.append(backend)
        listen = ["--listen-tls", "127.0.0.1:0", "--tls-cert", str(certs / "cert.pem"),
                  "--tls-key", str(certs / "key.pem")] if transport == "wss" else ["--listen", "127.0.0.1:0"]
        gw = Proc([str(gateway), *listen, "--backend", backend.addrs[0], "--links", "2",
                   "--set", f"listen.max_sessions={n + 100}"], 1, "gateway", out)
        procs.append(gw)
        time.sleep(1)
        rss0 = gw.rss_kib()
        port = gw.addrs[0].split(":")[1]
        url = f"{transport}://localhost:{port}/ws"
        ca = str(certs / "ca.pem") if transport == "wss" else None
        r = asyncio.run(hold(url, n, size, ca, settle, gw.rss_kib, resume))
        r["rss_before_kib"] = rss0
        r["kib_per_session"] = round((r["rss_after_kib"] - rss0) / n, 1)
        return r
    finally:
        for p in reversed(procs):
            p.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1000, help="sessions")
    ap.add_argument("--sizes", default="0,65536,524288", help="message sizes in bytes, comma-separated")
    ap.add_argument("--transports", default="ws,wss")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds idle before RSS is read")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--ab", help="an old gateway binary to run interleaved with the new one")
    ap.add_argument("--backend-args", default="", help="extra arguments for `loadtest backend`")
    ap.add_argument("--resume", action="store_true", help="clients ask for resumable sessions")
    ap.add_argument("--out", default="target/bench/memory")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    certs = out / "certs"
    subprocess.run([str(BIN / "loadtest"), "devcert", "--out", str(certs)], check=True, capture_output=True)
    bins = {"new": BIN / "gateway"}
    if a.ab:
        bins = {"old": Path(a.ab).resolve(), "new": BIN / "gateway"}
    sizes = [int(s) for s in a.sizes.split(",")]
    results: dict = {}
    for _ in range(a.rounds):
        for t in a.transports.split(","):
            for size in sizes:
                for name, gateway in bins.items():
                    r = one(gateway, t, a.n, size, a.settle, out, certs, a.backend_args.split(), a.resume)
                    results.setdefault(f"{name} {t} {size}", []).append(r)
                    print(f"{name} {t} {size:>7} B: {r['kib_per_session']:.1f} KiB per idle session "
                          f"(RSS {r['rss_before_kib']} -> {r['rss_after_kib']} KiB)", file=sys.stderr)
    (out / "memory.json").write_text(json.dumps(results, indent=2))
    kind = "resumable sessions" if a.resume else "sessions"
    print(f"\n{a.n:,} {kind}, each sent one message then idled {a.settle:g} s; "
          f"gateway RSS growth per session, median of {a.rounds}:\n")
    cols = list(bins)
    print("| transport | message | " + " | ".join(f"{c} KiB/session" for c in cols) +
          " | × the empty message's |")
    print("|---|---|" + "---|" * len(cols) + "---|")
    for t in a.transports.split(","):
        base = statistics.median(r["kib_per_session"] for r in results[f"new {t} {sizes[0]}"])
        for size in sizes:
            meds = [statistics.median(r["kib_per_session"] for r in results[f"{c} {t} {size}"]) for c in cols]
            ratio = meds[-1] / base if base > 0 else float("nan")
            print(f"| {t} | {size:,} B | " + " | ".join(f"{m:.1f}" for m in meds) + f" | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

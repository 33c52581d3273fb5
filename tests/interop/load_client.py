#!/usr/bin/env python3
"""An independent open-loop load client (Python `websockets`), to check that
`loadtest run` counts what another implementation counts on the same target.

    python3 load_client.py URL --connections 10 --rate 500 --duration 3

Each connection sends binary messages on a fixed schedule (total --rate per
second, spread evenly), each carrying its intended send time; the echo's
latency is measured from that time. Every echo must match what was sent, in
order. Prints one JSON line: {"messages", "msgs_per_s", "p50_us", "p99_us",
"errors"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import struct
import time

from websockets.asyncio.client import connect


async def conn(url, i, interval, start, duration, size, ssl_ctx, lat, errors):
    async with connect(url, ssl=ssl_ctx, max_size=None, compression=None, proxy=None) as ws:
        sent = 0
        expected = 0

        async def reader():
            nonlocal expected
            async for msg in ws:
                now = time.perf_counter()
                ci, seq, t = struct.unpack(">IQd", msg[:20])
                if ci != i or seq != expected or len(msg) != size:
                    errors.append(f"conn {i}: bad echo")
                    return
                expected += 1
                lat.append(now - t)
                if stop_at is not None and expected >= sent_final:
                    return

        stop_at = None
        sent_final = 0
        r = asyncio.create_task(reader())
        t0 = start + interval * (i / 10.0)
        while True:
            due = t0 + sent * interval
            if due >= start + duration:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = struct.pack(">IQd", i, sent, due)
            await ws.send(body + bytes(size - len(body)))
            sent += 1
        stop_at, sent_final = time.perf_counter(), sent
        if expected < sent:
            try:
                await asyncio.wait_for(r, 5)
            except asyncio.TimeoutError:
                errors.append(f"conn {i}: {sent - expected} echoes missing")
        r.cancel()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ca")
    a = ap.parse_args()
    ssl_ctx = ssl.create_default_context(cafile=a.ca) if a.url.startswith("wss") else None
    interval = a.connections / a.rate
    lat, errors = [], []
    start = time.perf_counter() + 0.5
    await asyncio.gather(*(conn(a.url, i, interval, start, a.duration, a.size, ssl_ctx, lat, errors)
                           for i in range(a.connections)))
    lat.sort()
    q = lambda p: int(lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6) if lat else 0
    print(json.dumps({"messages": len(lat), "msgs_per_s": len(lat) / a.duration,
                      "p50_us": q(0.5), "p99_us": q(0.99), "errors": errors}))


asyncio.run(main())

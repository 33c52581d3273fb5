#!/usr/bin/env python3
"""What telemetry costs: the same gateway binary with telemetry off, with
metrics pushed over OTLP, and with session traces sampled at 1% and 100%,
side by side in one run (and, with --old, a binary from before the
histograms were added, to show what recording them costs).

Each variant is its own gateway process in front of its own reference echo
backend; all export to one OTLP receiver (tests/interop/otlp_receiver.py,
gRPC). Rounds are interleaved (the order rotates) so the machine's noise
hits every variant alike; medians are reported.

Per round and variant:
  relay      1,000 wss connections, 64-byte messages, one in flight each:
             round trips per second and gateway CPU µs per round trip.
  sessions   new wss sessions (connect, TLS, upgrade, one round trip,
             close), 32 at a time: sessions per second and gateway CPU µs
             per session. This is where a span per session shows.

Metrics are pushed every second (far more often than the 60 s default)
and the receiver stays up, so the export cost is on the high side.

Usage (after `cargo build --release --workspace --bins` and tests/run.sh
has made .venv):
  python3 loadtest/bench/telemetry.py [--rounds 3] [--duration 10s] [--old PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, ROOT, Proc, fmt, loadtest, machine, med  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "target" / "bench-telemetry"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--old", help="a gateway binary from before issue 11, run with no telemetry settings")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    certs = out / "certs"
    import subprocess
    subprocess.run([str(BIN / "loadtest"), "devcert", "--out", str(certs)], check=True, capture_output=True)
    ca = ["--ca", str(certs / "ca.pem")]
    tls = ["--tls-cert", str(certs / "cert.pem"), "--tls-key", str(certs / "key.pem")]
    procs: list = []
    runs: dict[str, dict[str, list]] = {}
    try:
        rx_out = tempfile.NamedTemporaryFile(prefix="otlp-", suffix=".jsonl", delete=False)
        receiver = Proc([str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "tests" / "interop" / "otlp_receiver.py"),
                         "--out", rx_out.name], 2, "otlp-receiver", out)
        procs.append(receiver)
        grpc = next(x for x in receiver.addrs if x)  # first line is grpc
        endpoint = f"http://{grpc}"
        otlp = ["--set", f'telemetry.otlp_endpoint="{endpoint}"', "--set", 'telemetry.metrics_interval="1s"']
        variants: dict[str, tuple[Path, list[str]]] = {
            "off": (BIN / "gateway", []),
            "metrics": (BIN / "gateway", [*otlp, "--set", "telemetry.traces_sample_ratio=0.0",
                                           "--set", "telemetry.traces_follow_client=false"]),
            "traces 1%": (BIN / "gateway", [*otlp, "--set", "telemetry.traces_sample_ratio=0.01"]),
            "traces 100%": (BIN / "gateway", [*otlp, "--set", "telemetry.traces_sample_ratio=1.0"]),
        }
        if a.old:
            variants = {"before issue 11": (Path(a.old).resolve(), []), **variants}
        gws = {}
        for k, (b, extra) in variants.items():
            slug = k.replace(" ", "-").replace("%", "pc")
            backend = Proc([str(BIN / "loadtest"), "backend", "--listen", "127.0.0.1:0"], 1, f"backend-{slug}", out)
            procs.append(backend)
            gws[k] = Proc([str(b), "--listen-tls", "127.0.0.1:0", *tls, "--backend", backend.addrs[0],
                           "--links", "2", *extra], 1, f"gateway-{slug}", out)
            procs.append(gws[k])
            runs[k] = {"relay": [], "sessions": []}
        names = list(variants)
        for rnd in range(a.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for k in order:
                gw = gws[k]
                url = ["--url", f"wss://localhost:{gw.addrs[0].split(':')[1]}/ws", *ca]
                c0 = gw.cpu_s()
                r = loadtest([*url, "-c", str(a.connections), "--size", "64", "-d", a.duration, "--in-flight", "1"])
                r["gateway_cpu_us_per_op"] = (gw.cpu_s() - c0) * 1e6 / max(r.get("messages", 0), 1)
                runs[k]["relay"].append(r)
                c0 = gw.cpu_s()
                h = loadtest([*url, "--scenario", "handshake", "-c", "32", "-d", a.duration])
                h["gateway_cpu_us_per_op"] = (gw.cpu_s() - c0) * 1e6 / max(h.get("connections_ok", 0), 1)
                runs[k]["sessions"].append(h)
                print(f"round {rnd + 1} {k}: {r.get('msgs_per_s', r.get('error'))} rt/s, "
                      f"{h.get('connections_ok', h.get('error'))} sessions", file=sys.stderr)
    finally:
        for p in procs:
            p.stop()
    spans = sum(1 for line in Path(rx_out.name).read_text().splitlines() if '"signal": "traces"' in line)
    (out / "telemetry.json").write_text(__import__("json").dumps(runs, indent=2))
    m = machine()
    base = "off"
    rows = []
    for k in runs:
        rt = med([x.get("msgs_per_s") for x in runs[k]["relay"]])
        rt_cpu = med([x.get("gateway_cpu_us_per_op") for x in runs[k]["relay"]])
        p99 = med([x.get("p99_us") for x in runs[k]["relay"]])
        dur = max(1.0, float(a.duration.rstrip("s")))
        ss = med([(x.get("connections_ok") or 0) / dur for x in runs[k]["sessions"]])
        ss_cpu = med([x.get("gateway_cpu_us_per_op") for x in runs[k]["sessions"]])
        rows.append((k, rt, rt_cpu, p99, ss, ss_cpu))
    b = next(r for r in rows if r[0] == base)
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; {m['date']}.",
             f"Medians of {a.rounds} interleaved rounds of {a.duration}; relay: {a.connections} wss connections, "
             f"64 B, one in flight; sessions: new wss sessions, 32 at a time. Metrics pushed every 1 s over OTLP/gRPC "
             f"to tests/interop/otlp_receiver.py ({spans} trace export requests received in all).", "",
             "| telemetry | round trips/s | CPU µs per round trip | vs off | p99 µs | sessions/s | "
             "CPU µs per session | vs off |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, rt, rt_cpu, p99, ss, ss_cpu in rows:
        r1 = fmt(rt_cpu / b[2], 2) if rt_cpu and b[2] else "–"
        r2 = fmt(ss_cpu / b[5], 2) if ss_cpu and b[5] else "–"
        lines.append(f"| {k} | {fmt(rt)} | {fmt(rt_cpu, 2)} | {r1} | {fmt(p99)} | {fmt(ss)} | {fmt(ss_cpu)} | {r2} |")
    report = "\n".join(lines)
    (out / "telemetry.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Reconnect storms, side by side in one run: `loadtest storm` against the
gateway with and without the TLS handshake cap, with and without client TLS
session resumption (TLS 1.3, and TLS 1.2 with the cap), interleaved
round-robin over --rounds, medians reported.

Each storm: --clients wss clients connect (2,000/s), 100 probe sessions do a
round trip every 50 ms, then every client drops and reconnects at once.
Needs the release binaries (cargo build --release --bins).

    python3 loadtest/bench/storm.py                 # 10,000 clients, 3 rounds
    python3 loadtest/bench/storm.py --clients 2000 --rounds 1   # smoke run

Output: a Markdown table on stdout and in OUT/storm.md, raw JSON in
OUT/storm.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, ROOT, Proc, fmt, machine, med  # noqa: E402

# The cap off: more slots than there can be connections.
NO_CAP = 1_000_000


def storm(url: str, ca: list, gw: Proc, clients: int, extra: list) -> dict:
    args = ["--url", url, *ca, "-c", str(clients), "--sources", "8", "--gateway-pid", str(gw.p.pid), *extra]
    cmd = [str(BIN / "loadtest"), "storm", "--json", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-500:], "cmd": " ".join(cmd)}
    d = json.loads(r.stdout.strip().splitlines()[-1])
    d["cmd"] = "loadtest storm --json " + " ".join(a for a in args if a != str(gw.p.pid)).replace(
        "--gateway-pid", "--gateway-pid PID")
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "target" / "bench"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--cap", type=int, default=256, help="listen.max_handshakes of the capped gateway")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    certs = out / "certs"
    subprocess.run([str(BIN / "loadtest"), "devcert", "--out", str(certs)], check=True, capture_output=True)
    ca = ["--ca", str(certs / "ca.pem")]
    tls = ["--tls-cert", str(certs / "cert.pem"), "--tls-key", str(certs / "key.pem")]
    procs: list = []
    results: dict = {"machine": machine(), "settings": vars(a), "runs": {}}
    try:
        backend = Proc([str(BIN / "loadtest"), "backend", "--listen", "127.0.0.1:0"], 1, "storm-backend", out)
        procs.append(backend)
        gws = {}
        for name, cap in (("cap", a.cap), ("nocap", NO_CAP)):
            gw = Proc([str(BIN / "gateway"), "--listen-tls", "127.0.0.1:0", *tls, "--admin", "127.0.0.1:0",
                       "--backend", backend.addrs[0], "--set", f"listen.max_handshakes={cap}"],
                      2, f"storm-gateway-{name}", out)
            procs.append(gw)
            gws[name] = gw
        time.sleep(1)
        variants = {
            f"TLS 1.3, cap {a.cap}, resumption": ("cap", []),
            f"TLS 1.3, cap {a.cap}, no resumption": ("cap", ["--no-resumption"]),
            "TLS 1.3, no cap, resumption": ("nocap", []),
            "TLS 1.3, no cap, no resumption": ("nocap", ["--no-resumption"]),
            f"TLS 1.2, cap {a.cap}, resumption": ("cap", ["--tls12"]),
            f"TLS 1.2, cap {a.cap}, no resumption": ("cap", ["--tls12", "--no-resumption"]),
        }
        runs: dict[str, list] = {k: [] for k in variants}
        for rnd in range(a.rounds):
            # Interleaved, and the order reversed every other round.
            order = list(variants.items()) if rnd % 2 == 0 else list(reversed(variants.items()))
            for name, (g, extra) in order:
                gw = gws[g]
                url = f"wss://localhost:{gw.addrs[0].split(':')[1]}/ws"
                r = storm(url, ca, gw, a.clients, extra)
                r["round"] = rnd
                runs[name].append(r)
                print(f"round {rnd + 1} {name}: {json.dumps(r)}", file=sys.stderr)
                # Let the client sockets' TIME_WAIT and the gateway settle.
                time.sleep(5)
        results["runs"] = runs
    finally:
        for p in procs:
            p.stop()
    (out / "storm.json").write_text(json.dumps(results, indent=1))
    report = render(results)
    (out / "storm.md").write_text(report)
    print(report)
    return 0


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; {m['date']}. "
             f"Medians of {r['settings']['rounds']} interleaved rounds, {r['settings']['clients']:,} clients.", "",
             "| variant | all back s | handshakes/s | resumed | never back | failed attempts | "
             "gateway CPU µs per reconnect | probe p50 / p99 µs calm | probe p50 / p99 / max µs storm |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, xs in r["runs"].items():
        ok = [x for x in xs if "error" not in x]
        errs = len(xs) - len(ok)

        def g(k, i=None):
            return med([(x[k][i] if i is not None else x[k]) for x in ok if x.get(k) is not None])
        lines.append(
            f"| {name}{f' ({errs} runs failed)' if errs else ''} | {fmt(g('all_back_s'), 2)} | "
            f"{fmt(g('handshakes_per_s'))} | {fmt(g('resumed'))} | {fmt(g('not_back'))} | "
            f"{fmt(med([sum(x['attempt_failures'].values()) for x in ok]))} | {fmt(g('storm_cpu_us'))} | "
            f"{fmt(g('calm_us', 0))} / {fmt(g('calm_us', 1))} | "
            f"{fmt(g('storm_us', 0))} / {fmt(g('storm_us', 1))} / {fmt(g('storm_us', 2))} |")
    lines += ["", "Per round (all back s; handshakes/s; gateway CPU µs per reconnect; probe p99 µs in the storm):", "",
              "| variant | " + " | ".join(f"round {i + 1}" for i in range(r['settings']['rounds'])) + " |",
              "|---|" + "---:|" * r['settings']['rounds']]
    for name, xs in r["runs"].items():
        cells = []
        for x in xs:
            if "error" in x:
                cells.append("failed")
            else:
                cells.append(f"{x['all_back_s']:.2f}; {x['handshakes_per_s']:.0f}; "
                             f"{fmt(x.get('storm_cpu_us'))}; {x['storm_us'][1]:,}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "First connects (all full handshakes, 2,000/s), gateway CPU µs each, median over every run: "
              f"{fmt(med([x.get('connect_cpu_us') for xs in r['runs'].values() for x in xs if 'error' not in x]))}.",
              "", "Commands (as run):", "", "```"]
    lines += sorted({x["cmd"] for xs in r["runs"].values() for x in xs})
    lines += ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

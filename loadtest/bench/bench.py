#!/usr/bin/env python3
"""The benchmark: the gateway side by side with websocat and websockify, in one
run, on this machine. Run it through loadtest/bench/run.sh, which builds the
binaries and installs the peers first.

Every load comes from the same `loadtest run` binary with the same settings.
Each comparison is repeated (--rounds, interleaved round-robin so that the
machine's noise hits every target alike) and the median is reported, with
ratios against the peers.

What runs:
  throughput  1,000 connections, 64-byte binary messages, one in flight each:
              gateway (wss, ws) in front of the reference echo backend;
              websocat 1.14 and websockify 0.13 bridging ws to a raw TCP echo.
              Gateway CPU per round trip from /proc/PID/stat; frames per
              backend write from the gateway's own metrics.
  latency     open loop, 10,000 msg/s over 1,000 wss sessions (intended-time
              latency: stalls are not hidden).
  large       16 KiB messages pushed one way (backend -> clients) over wss.
  handshake   new wss sessions per second (connect, TLS, upgrade, one round
              trip, close), 32 at a time.
  idle        as many idle wss sessions as fit (18,000), 4 links, held 60 s
              while the gateway pings them, then every one must answer;
              gateway RSS per session.

Output: a Markdown report on stdout and in OUT/results.md, raw JSON in
OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release"
TOOLS = ROOT / "target" / "bench-tools"
TICK = os.sysconf("SC_CLK_TCK")


class Proc:
    """A child process that prints `listening ... ADDR` lines."""

    def __init__(self, args: list[str], expect: int, name: str, out: Path):
        self.name = name
        self.log = open(out / f"{name}.log", "w")
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.addrs: list[str] = []
        deadline = time.time() + 30
        while len(self.addrs) < expect:
            line = self.p.stdout.readline()
            if not line:
                if time.time() > deadline or self.p.poll() is not None:
                    raise SystemExit(f"{name} did not start; see {out / (name + '.log')}")
                continue
            if line.startswith("listening"):
                self.addrs.append(line.split()[-1])

    def cpu_s(self) -> float:
        f = Path(f"/proc/{self.p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / TICK

    def cpu_with_children_s(self) -> float:
        """Its CPU and that of its children that have ended and been
        waited for (websockify forks a process per connection)."""
        f = Path(f"/proc/{self.p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in f[11:15]) / TICK

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


class Bridge(Proc):
    """A peer that prints nothing useful on stdout: wait for its port."""

    def __init__(self, args: list[str], port: int, name: str, out: Path):
        import socket
        self.name = name
        self.log = open(out / f"{name}.log", "w")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit(f"{name} did not start; see {out / (name + '.log')}")
                time.sleep(0.1)


def free_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def metrics(admin: str) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{")[0].split(" ")[0]
        out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def loadtest(args: list[str]) -> dict:
    cmd = [str(BIN / "loadtest"), "run", "--json", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-500:], "cmd": " ".join(cmd)}
    d = json.loads(r.stdout.strip().splitlines()[-1])
    d["cmd"] = "loadtest run --json " + " ".join(args)
    return d


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=0):
    if x is None:
        return "–"
    return f"{x:,.{digits}f}"


class Done(Exception):
    """The measurements asked for are taken."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "target" / "bench"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--idle", type=int, default=18000, help="idle sessions (0 skips)")
    ap.add_argument("--idle-hold", default="60s")
    ap.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    ap.add_argument("--ab", metavar="OLD_GATEWAY", help="compare this gateway binary with target/release/gateway "
                    "(throughput, CPU per round trip, latency, idle memory) instead of the full report")
    ap.add_argument("--ab-only", default="wss,ws,latency,handshake", metavar="LIST",
                    help="with --ab: which measures to take, e.g. \"latency\" for more rounds of that alone")
    ap.add_argument("--ab-backend", default="", metavar="ARGS",
                    help="with --ab: arguments for both reference backends, e.g. \"--max-version 2\"")
    ap.add_argument("--ab-protocol", action="store_true",
                    help="compare link protocol version 2 with version 3 (flow and move) on the same gateway: "
                         "the reference backend with --max-version 2 against the default (throughput, CPU per "
                         "round trip, latency) instead of the full report")
    ap.add_argument("--cpu-only", metavar="LIST",
                    help="only the throughput rounds (CPU per round trip) for these targets, comma-separated, "
                         "named as in the report (e.g. \"gateway wss,bare echo wss,bare relay direct wss\"); "
                         "skips latency, handshakes, large messages and idle sessions")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.duration, a.connections, a.idle, a.idle_hold = 1, "3s", 200, 500, "3s"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    certs = out / "certs"
    subprocess.run([str(BIN / "loadtest"), "devcert", "--out", str(certs)], check=True, capture_output=True)
    ca = ["--ca", str(certs / "ca.pem")]
    tls = ["--tls-cert", str(certs / "cert.pem"), "--tls-key", str(certs / "key.pem")]
    if a.ab:
        old = Path(a.ab).resolve()
        extra = a.ab_backend.split()
        return ab(a, {"old": (old, extra), "new": (BIN / "gateway", extra)}, out, ca, tls)
    if a.ab_protocol:
        a.idle = 0
        gw = BIN / "gateway"
        return ab(a, {"old": (gw, ["--max-version", "2"]), "new": (gw, [])}, out, ca, tls)
    results: dict = {"machine": machine(), "settings": vars(a)}
    procs: list = []
    try:
        backend = Proc([str(BIN / "loadtest"), "backend", "--listen", "127.0.0.1:0"], 1, "backend-echo", out)
        procs.append(backend)
        gw = Proc([str(BIN / "gateway"), "--listen", "127.0.0.1:0", "--listen-tls", "127.0.0.1:0", *tls,
                   "--admin", "127.0.0.1:0", "--backend", backend.addrs[0], "--links", "2"], 3, "gateway", out)
        procs.append(gw)
        gw_ws, gw_wss, gw_admin = gw.addrs
        echo = Proc([str(BIN / "loadtest"), "tcp-echo", "--listen", "127.0.0.1:0"], 1, "tcp-echo", out)
        procs.append(echo)
        ws_port, wsf_port = free_port(), free_port()
        websocat = Bridge([str(TOOLS / "bin" / "websocat"), "--binary", f"ws-l:127.0.0.1:{ws_port}",
                           f"tcp:{echo.addrs[0]}"], ws_port, "websocat", out)
        procs.append(websocat)
        websockify = Bridge([str(TOOLS / "venv" / "bin" / "websockify"), f"127.0.0.1:{wsf_port}", echo.addrs[0]],
                            wsf_port, "websockify", out)
        procs.append(websockify)
        # The floor: the same wss, upgrade and WebSocket crates as the
        # gateway, echoing on the connection and doing nothing else.
        bare = Proc([str(BIN / "loadtest"), "bare-echo", "--listen", "127.0.0.1:0", *tls], 1, "bare-echo", out)
        procs.append(bare)
        # The smallest relays: the floor, plus each message to the byte echo
        # and back, over a TCP connection per session (websocat's shape) or
        # over two shared by all (the gateway's shape), without sessions.
        relay = Proc([str(BIN / "loadtest"), "bare-echo", "--listen", "127.0.0.1:0", *tls,
                      "--relay", echo.addrs[0], "--shape", "own"], 1, "bare-relay-own", out)
        procs.append(relay)
        shared = Proc([str(BIN / "loadtest"), "bare-echo", "--listen", "127.0.0.1:0", *tls,
                       "--relay", echo.addrs[0], "--shape", "shared"], 1, "bare-relay-shared", out)
        procs.append(shared)
        # The same, with the links' readers writing the answers to the
        # clients themselves: a connection's task is woken by its client only.
        direct = Proc([str(BIN / "loadtest"), "bare-echo", "--listen", "127.0.0.1:0", *tls,
                       "--relay", echo.addrs[0], "--shape", "direct"], 1, "bare-relay-direct", out)
        procs.append(direct)
        time.sleep(1)

        # The server side of each target: every process that relays or
        # answers a message (the bridge and what stands behind it).
        servers = {
            "gateway wss": [gw, backend],
            "gateway ws": [gw, backend],
            "websocat ws": [websocat, echo],
            "websockify ws": [websockify, echo],
            "bare echo wss": [bare],
            "bare relay own wss": [relay, echo],
            "bare relay shared wss": [shared, echo],
            "bare relay direct wss": [direct, echo],
        }
        targets = {
            "gateway wss": ["--url", f"wss://localhost:{gw_wss.split(':')[1]}/ws", *ca],
            "gateway ws": ["--url", f"ws://{gw_ws}/ws"],
            "websocat ws": ["--url", f"ws://127.0.0.1:{ws_port}/"],
            "websockify ws": ["--url", f"ws://127.0.0.1:{wsf_port}/"],
            "bare echo wss": ["--url", f"wss://localhost:{bare.addrs[0].split(':')[1]}/ws", *ca],
            "bare relay own wss": ["--url", f"wss://localhost:{relay.addrs[0].split(':')[1]}/ws", *ca],
            "bare relay shared wss": ["--url", f"wss://localhost:{shared.addrs[0].split(':')[1]}/ws", *ca],
            "bare relay direct wss": ["--url", f"wss://localhost:{direct.addrs[0].split(':')[1]}/ws", *ca],
        }
        if a.cpu_only:
            wanted = [k.strip() for k in a.cpu_only.split(",")]
            unknown = [k for k in wanted if k not in targets]
            if unknown:
                raise SystemExit(f"unknown targets {unknown}; known: {list(targets)}")
            targets = {k: v for k, v in targets.items() if k in wanted}
        common = ["-c", str(a.connections), "--size", "64", "-d", a.duration, "--in-flight", "1"]
        runs: dict[str, list] = {k: [] for k in targets}
        for rnd in range(a.rounds):
            for name, t in targets.items():
                m0, c0 = (metrics(gw_admin), gw.cpu_s()) if name.startswith("gateway") else (None, None)
                s0 = sum(p.cpu_with_children_s() for p in servers[name])
                f0 = servers[name][0].cpu_with_children_s()
                r = loadtest([*t, *common])
                if "messages" in r:
                    s1 = sum(p.cpu_with_children_s() for p in servers[name])
                    r["server_cpu_us_per_rt"] = (s1 - s0) * 1e6 / max(r["messages"], 1)
                    # The bridge alone, without what stands behind it.
                    f1 = servers[name][0].cpu_with_children_s()
                    r["front_cpu_us_per_rt"] = (f1 - f0) * 1e6 / max(r["messages"], 1)
                if m0 is not None and "messages" in r:
                    m1, c1 = metrics(gw_admin), gw.cpu_s()
                    relayed = m1.get("gateway_messages_total", 0) - m0.get("gateway_messages_total", 0)
                    r["gateway_cpu_us_per_rt"] = (c1 - c0) * 1e6 / max(r["messages"], 1)
                    writes = m1.get("gateway_link_writes_total", 0) - m0.get("gateway_link_writes_total", 0)
                    frames = m1.get("gateway_link_frames_written_total", 0) - m0.get("gateway_link_frames_written_total", 0)
                    r["frames_per_link_write"] = frames / max(writes, 1)
                    r["gateway_relayed_both_ways"] = relayed
                runs[name].append(r)
                print(f"round {rnd + 1} {name}: {r.get('msgs_per_s', r.get('error'))}", file=sys.stderr)
        results["throughput"] = runs
        if a.cpu_only:
            a.idle = 0
            raise Done

        lat: list = []
        for rnd in range(a.rounds):
            lat.append(loadtest([*targets["gateway wss"], "-c", str(a.connections), "--size", "64",
                                 "-d", "20s" if not a.quick else a.duration, "--rate", "10000"]))
            print(f"round {rnd + 1} latency: p99 {lat[-1].get('p99_us')} us", file=sys.stderr)
        results["latency"] = lat

        hs: list = []
        for rnd in range(a.rounds):
            hs.append(loadtest([*targets["gateway wss"], "--scenario", "handshake", "-c", "32", "-d", a.duration]))
            print(f"round {rnd + 1} handshakes: {hs[-1].get('connections_ok')}", file=sys.stderr)
        results["handshake"] = hs

        for p in procs:
            p.stop()
        procs.clear()

        # Large messages, one way: the backend pushes 16 KiB messages.
        pusher = Proc([str(BIN / "loadtest"), "backend", "--listen", "127.0.0.1:0", "--mode", "push",
                       "--push-rate", "10000", "--push-size", "16384"], 1, "backend-push", out)
        procs.append(pusher)
        gw2 = Proc([str(BIN / "gateway"), "--listen-tls", "127.0.0.1:0", *tls, "--backend", pusher.addrs[0],
                    "--links", "2"], 1, "gateway-push", out)
        procs.append(gw2)
        large: list = []
        for rnd in range(a.rounds):
            large.append(loadtest(["--url", f"wss://localhost:{gw2.addrs[0].split(':')[1]}/ws", *ca,
                                   "--scenario", "push", "-c", "8", "-d", a.duration]))
            print(f"round {rnd + 1} large: {large[-1].get('mb_per_s')} MB/s", file=sys.stderr)
        results["large"] = large
        for p in procs:
            p.stop()
        procs.clear()

        if a.idle:
            results["idle"] = idle_capacity(BIN / "gateway", a.idle, a.idle_hold, out, ca, tls, "idle")
            print(f"idle: {results['idle'].get('connections_ok')} sessions, "
                  f"{results['idle']['rss_per_session_kib']:.1f} KiB each", file=sys.stderr)
    except Done:
        pass
    finally:
        for p in procs:
            p.stop()

    (out / "results.json").write_text(json.dumps(results, indent=2))
    report = render(results)
    (out / "results.md").write_text(report)
    print(report)
    return 0


def idle_capacity(gateway: Path, n: int, hold: str, out: Path, ca: list, tls: list, name: str) -> dict:
    """Holds `n` idle wss sessions on `gateway` (4 links) for `hold` while it
    pings them, then one round trip each; RSS growth per session."""
    procs = []
    try:
        backend = Proc([str(BIN / "loadtest"), "backend", "--listen", "127.0.0.1:0"], 1, f"backend-{name}", out)
        procs.append(backend)
        gw = Proc([str(gateway), "--listen-tls", "127.0.0.1:0", *tls, "--backend", backend.addrs[0],
                   "--links", "4", "--set", f"listen.max_sessions={n + 100}"], 1, f"gateway-{name}", out)
        procs.append(gw)
        time.sleep(1)
        rss0 = gw.rss_kib()
        sources = max(1, (n + 9999) // 10000)
        cmd = [str(BIN / "loadtest"), "run", "--json", "--url", f"wss://localhost:{gw.addrs[0].split(':')[1]}/ws",
               *ca, "--scenario", "idle", "-c", str(n), "--sources", str(sources), "-d", hold,
               "--ramp", "3000", "--timeout", "30s"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = rss0
        while p.poll() is None:
            peak = max(peak, gw.rss_kib())
            time.sleep(0.5)
        stdout, stderr = p.communicate()
        try:
            idle = json.loads(stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            idle = {"error": stderr[-500:]}
        idle["cmd"] = " ".join(cmd[1:])
        idle["rss_before_kib"] = rss0
        idle["rss_peak_kib"] = peak
        idle["rss_per_session_kib"] = (peak - rss0) / max(idle.get("connections_ok", 1), 1)
        return idle
    finally:
        for p in procs:
            p.stop()


def ab(a, targets: dict, out: Path, ca: list, tls: list) -> int:
    """Two targets side by side (a gateway binary, and the arguments of
    its reference backend): throughput and CPU per round trip (wss, ws),
    open-loop latency, and idle memory per session, interleaved (A B, then
    B A, ...) so that the machine's drift hits both alike."""
    bins = {k: b for k, (b, _) in targets.items()}
    procs: list = []
    runs: dict = {f"{k} {proto}": [] for k in bins for proto in ("wss", "ws", "latency", "handshake")}
    try:
        gws = {}
        for k, (b, backend_args) in targets.items():
            backend = Proc([str(BIN / "loadtest"), "backend", "--listen", "127.0.0.1:0", *backend_args], 1,
                           f"backend-{k}", out)
            procs.append(backend)
            gws[k] = Proc([str(b), "--listen", "127.0.0.1:0", "--listen-tls", "127.0.0.1:0", *tls,
                           "--admin", "127.0.0.1:0", "--backend", backend.addrs[0], "--links", "2"], 3, f"gateway-{k}", out)
            procs.append(gws[k])
        common = ["-c", str(a.connections), "--size", "64", "-d", a.duration]
        for rnd in range(a.rounds):
            order = list(bins) if rnd % 2 == 0 else list(reversed(bins))
            for k in order:
                gw = gws[k]
                ws, wss, _ = gw.addrs
                url = {"wss": ["--url", f"wss://localhost:{wss.split(':')[1]}/ws", *ca], "ws": ["--url", f"ws://{ws}/ws"]}
                only = a.ab_only.split(",")
                for proto in [p for p in ("wss", "ws") if p in only]:
                    c0 = gw.cpu_s()
                    r = loadtest([*url[proto], *common, "--in-flight", "1"])
                    r["gateway_cpu_us_per_rt"] = (gw.cpu_s() - c0) * 1e6 / max(r.get("messages", 0), 1)
                    runs[f"{k} {proto}"].append(r)
                    print(f"round {rnd + 1} {k} {proto}: {r.get('msgs_per_s', r.get('error'))}", file=sys.stderr)
                if "latency" in only:
                    r = loadtest([*url["wss"], *common, "--rate", "10000"])
                    runs[f"{k} latency"].append(r)
                    print(f"round {rnd + 1} {k} latency p99: {r.get('p99_us')}", file=sys.stderr)
                if "handshake" not in only:
                    continue
                # New wss sessions (TLS 1.3 handshake, upgrade, one round
                # trip, close), 32 at a time, and the gateway's CPU for each.
                c0 = gw.cpu_s()
                r = loadtest([*url["wss"], "--scenario", "handshake", "-c", "32", "-d", a.duration])
                secs = float(a.duration.rstrip("s"))
                r["sessions_per_s"] = r.get("connections_ok", 0) / secs
                r["gateway_cpu_us_per_session"] = (gw.cpu_s() - c0) * 1e6 / max(r.get("connections_ok", 0), 1)
                runs[f"{k} handshake"].append(r)
                print(f"round {rnd + 1} {k} handshakes: {r.get('connections_ok', r.get('error'))}", file=sys.stderr)
    finally:
        for p in procs:
            p.stop()
    idle = {}
    if a.idle:
        for k in ("old", "new"):
            idle[k] = idle_capacity(bins[k], a.idle, a.idle_hold, out, ca, tls, f"idle-{k}")
            print(f"idle {k}: {idle[k]['rss_per_session_kib']:.1f} KiB each", file=sys.stderr)
    described = {k: f"{b} {' '.join(args)}".strip() for k, (b, args) in targets.items()}
    (out / "ab.json").write_text(json.dumps({"runs": runs, "idle": idle, "targets": described}, indent=2))
    m = machine()
    row = lambda name, key, digits=0: (
        name, med([x.get(key) for x in runs[f"old {name.split()[0]}"]]),
        med([x.get(key) for x in runs[f"new {name.split()[0]}"]]), digits)
    rows = [row("wss round trips/s", "msgs_per_s"), row("ws round trips/s", "msgs_per_s"),
            row("wss CPU µs per round trip", "gateway_cpu_us_per_rt", 2),
            row("ws CPU µs per round trip", "gateway_cpu_us_per_rt", 2),
            row("latency p50 µs", "p50_us"), row("latency p99 µs", "p99_us"),
            row("handshake wss sessions/s", "sessions_per_s"),
            row("handshake CPU µs per new wss session", "gateway_cpu_us_per_session")]
    if idle:
        rows.append((f"idle wss KiB per session ({a.idle:,})", idle["old"]["rss_per_session_kib"],
                     idle["new"]["rss_per_session_kib"], 1))
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; {m['date']}.",
             f"old = {described['old']}, new = {described['new']} (each with its own reference backend"
             f"); medians of {a.rounds} interleaved rounds, "
             f"{a.connections} connections, {a.duration} each; latency: open loop at 10,000 msg/s over wss.", "",
             "| measure | old | new | new / old |", "|---|---:|---:|---:|"]
    for name, o, n, d in rows:
        if o is None and n is None:
            continue  # not measured (--ab-only)
        ratio = fmt(n / o, 2) if o and n else "–"
        lines.append(f"| {name} | {fmt(o, d)} | {fmt(n, d)} | {ratio} |")
    errs = {k: sum(sum(x.get("errors", {}).values()) for x in v) for k, v in runs.items()}
    lines += ["", f"Errors per target (all rounds): {errs}.", ""]
    report = "\n".join(lines)
    (out / "ab.md").write_text(report)
    print(report)
    return 0


def machine() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def render(r: dict) -> str:
    m = r["machine"]
    s = r["settings"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; {m['date']}.",
             f"Client, server and backend share the machine. Medians of {s['rounds']} interleaved rounds.", ""]
    tp = r["throughput"]
    med_rate = {k: med([x.get("msgs_per_s") for x in v]) for k, v in tp.items()}
    lines += [f"### Throughput: {s['connections']} connections, 64-byte binary, one in flight, {s['duration']} each",
              "", "| target | round trips/s | server CPU µs per round trip | p50 µs | p99 µs | errors | vs websocat | vs websockify |",
              "|---|---:|---:|---:|---:|---|---:|---:|"]
    for k, v in tp.items():
        errs = med([sum(x.get("errors", {}).values()) if "errors" in x else None for x in v])
        rate = med_rate[k]
        vs = lambda peer: fmt(rate / med_rate[peer], 2) + "x" if rate and med_rate.get(peer) else "–"
        lines.append(f"| {k} | {fmt(rate)} | {fmt(med([x.get('server_cpu_us_per_rt') for x in v]), 2)} | "
                     f"{fmt(med([x.get('p50_us') for x in v]))} | "
                     f"{fmt(med([x.get('p99_us') for x in v]))} | {fmt(errs)} | {vs('websocat ws')} | {vs('websockify ws')} |")
    g = tp.get("gateway wss", [])
    cpu = {k: med([x.get("server_cpu_us_per_rt") for x in v]) for k, v in tp.items()}
    front = {k: med([x.get("front_cpu_us_per_rt") for x in v]) for k, v in tp.items()}
    if cpu.get("websocat ws"):
        lines += ["", "Server CPU per round trip: every server-side process of the target (the gateway and the "
                  "reference backend; websocat or websockify and the TCP echo; the bare echo alone), user + "
                  "system, over the round trips completed. Against websocat: " + ", ".join(
                      f"{k} {fmt(cpu[k] / cpu['websocat ws'], 2)}x" for k in cpu
                      if cpu.get(k) and k != "websocat ws") + "."]
    if cpu.get("bare echo wss") and cpu.get("gateway wss"):
        lines += ["", "Against the bare wss echo (the floor: same TLS, upgrade and WebSocket crates, no backend): "
                  + ", ".join(f"{k} {fmt(cpu[k] / cpu['bare echo wss'], 2)}x"
                              for k in ("gateway wss", "bare relay own wss", "bare relay shared wss",
                                        "bare relay direct wss")
                              if cpu.get(k)) + ". "
                  "The bare relays are the floor plus each message to the TCP echo and back, over a connection "
                  "per session (websocat's shape) or over two shared by all (the gateway's shape; \"direct\": "
                  "the links' readers write the answers to the clients): what relaying costs without the "
                  "gateway's sessions.",
                  "", "The front process alone (without the backend or echo behind it): " + ", ".join(
                      f"{k} {fmt(front[k], 2)} µs ({fmt(front[k] / front['bare echo wss'], 2)}x the floor)"
                      for k in front if front.get(k) and (k.startswith("bare") or k == "gateway wss")) + "."]
    lines += ["", f"Gateway CPU per relayed round trip (wss): {fmt(med([x.get('gateway_cpu_us_per_rt') for x in g]), 2)} µs; "
              f"(ws): {fmt(med([x.get('gateway_cpu_us_per_rt') for x in tp.get('gateway ws', [])]), 2)} µs. "
              f"Frames per backend write (wss run): {fmt(med([x.get('frames_per_link_write') for x in g]), 1)}.", ""]
    if "latency" not in r:
        lines += ["Command (as run):", "", "```", " ".join(["python3", *sys.argv]), "```", ""]
        return "\n".join(lines)
    lat = r["latency"]
    lines += ["### Latency: open loop, 10,000 msg/s over 1,000 wss sessions", "",
              "| p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | msg/s | errors |", "|---:|---:|---:|---:|---:|---:|---:|",
              f"| {fmt(med([x.get('p50_us') for x in lat]))} | {fmt(med([x.get('p90_us') for x in lat]))} | "
              f"{fmt(med([x.get('p99_us') for x in lat]))} | {fmt(med([x.get('p999_us') for x in lat]))} | "
              f"{fmt(med([x.get('max_us') for x in lat]))} | {fmt(med([x.get('msgs_per_s') for x in lat]))} | "
              f"{fmt(med([sum(x.get('errors', {}).values()) for x in lat if 'errors' in x]))} |", ""]
    hs = r["handshake"]
    lines += ["### Handshakes: new wss sessions (TCP + TLS 1.3 + upgrade + one round trip + close), 32 at a time", "",
              f"{fmt(med([x.get('connections_ok', 0) / x['duration_s'] for x in hs if 'duration_s' in x]))} sessions/s, "
              f"connect p50 {fmt(med([x.get('connect_p50_us') for x in hs]))} µs, p99 {fmt(med([x.get('connect_p99_us') for x in hs]))} µs, "
              f"failures {fmt(med([x.get('connect_failed') for x in hs]))}.", ""]
    lg = r["large"]
    lines += ["### Large messages: 16 KiB pushed one way (backend -> 8 wss clients)", "",
              f"{fmt(med([x.get('mb_per_s') for x in lg]))} MB/s ({fmt(med([x.get('msgs_per_s') for x in lg]))} msg/s), "
              f"delivery p99 {fmt(med([x.get('p99_us') for x in lg]))} µs.", ""]
    if "idle" in r:
        i = r["idle"]
        lines += ["### Idle capacity: wss sessions over 4 links, held while pinged, then one round trip each", "",
                  f"{fmt(i.get('connections_ok'))} sessions connected, {fmt(i.get('messages'))} answered after the hold "
                  f"({fmt(i.get('connect_failed'))} connect failures, errors {i.get('errors')}); "
                  f"gateway RSS {fmt(i['rss_before_kib'] / 1024, 1)} MiB before, {fmt(i['rss_peak_kib'] / 1024, 1)} MiB peak: "
                  f"**{fmt(i['rss_per_session_kib'], 1)} KiB per session**.", ""]
    lines += ["Commands (as run):", "", "```"]
    lines += sorted({x["cmd"] for v in tp.values() for x in v if "cmd" in x})
    lines += sorted({x["cmd"] for x in lat + hs + lg if "cmd" in x})
    if "idle" in r:
        lines.append(r["idle"]["cmd"])
    lines += ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

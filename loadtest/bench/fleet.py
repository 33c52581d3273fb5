#!/usr/bin/env python3
"""A rolling deploy under load, as an operator runs it: resumable sessions
churn through HAProxy (deploy/haproxy/haproxy.cfg, round robin) in front of
N gateway instances sharing sessions through Redis, while the instances are
restarted one after another (SIGTERM, wait for exit, start again), and
optionally one is killed outright (SIGKILL) in the same run.

Every process is real: redis-server, haproxy, the gateways, a backend (the
reference backend, or the independent Python one), and `loadtest run
--scenario churn`, whose summary reports lost, duplicated and reordered
messages, 410s (resumes_refused), sessions ended (close_codes), sessions
handed off, and the reconnect time p50/p99.

    cargo build --release --bins
    python3 loadtest/bench/fleet.py --connections 5000 --duration 150
    python3 loadtest/bench/fleet.py --backend python --connections 5000
    python3 loadtest/bench/fleet.py --kill 1        # SIGKILL instance 1 too

Needs redis-server and haproxy on PATH (Debian: apt-get install
redis-server haproxy). Logs go to --out (default target/fleet).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, ROOT, Bridge, Proc, free_port, metrics  # noqa: E402


def gateway_config(path: Path, redis_port: int, ws: int, admin: int, backend: str, args) -> None:
    path.write_text(
        f"""
[listen]
ws = ["127.0.0.1:{ws}"]
max_sessions = 19000
[admin]
listen = "127.0.0.1:{admin}"
[backend]
endpoints = ["{backend}"]
links_per_endpoint = 2
[resume]
grace = "60s"
[shutdown]
close_spread = "{args.close_spread}s"
drain_timeout = "{args.drain_timeout}s"
[fleet]
redis_url = "redis://127.0.0.1:{redis_port}/0"
"""
    )


def start_gateway(i: int, cfg: Path, out: Path, generation: int) -> Proc:
    return Proc(
        [str(BIN / "gateway"), "--config", str(cfg)], 2, f"gateway{i}.{generation}", out
    )


def wait_member(admin: str, limit: float = 30) -> None:
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            m = metrics(admin)
            if m.get("gateway_fleet_connected") == 1 and m.get("gateway_links_up", 0) >= 1:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"instance {admin} did not join the fleet")


def haproxy_config(path: Path, port: int, servers: list[tuple[int, int]]) -> None:
    lines = []
    for line in (ROOT / "deploy/haproxy/haproxy.cfg").read_text().splitlines():
        if line.strip().startswith("server "):
            continue
        if line.strip() == "bind :8080":
            line = f"    bind 127.0.0.1:{port}"
        lines.append(line)
    for i, (ws, admin) in enumerate(servers):
        lines.append(f"    server gw{i} 127.0.0.1:{ws} check port {admin} inter 500ms fall 1 rise 2")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--connections", type=int, default=5000)
    ap.add_argument("--duration", type=int, default=150, help="seconds of load")
    ap.add_argument("--backend", choices=["reference", "python"], default="reference")
    ap.add_argument("--churn-share", default="0.1")
    ap.add_argument("--churn-every", default="10s")
    ap.add_argument("--close-spread", type=int, default=10)
    ap.add_argument("--drain-timeout", type=int, default=30)
    ap.add_argument("--first-deploy", type=int, default=20, help="seconds into the load")
    ap.add_argument("--between", type=int, default=25, help="seconds between deploys")
    ap.add_argument("--kill", type=int, default=None, help="also SIGKILL this instance (after the deploys)")
    ap.add_argument("--stop-redis", type=int, default=None, metavar="SECONDS",
                    help="also stop Redis for this long (after the deploys), then start it again, empty")
    ap.add_argument("--out", default=str(ROOT / "target" / "fleet"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs: list = []
    try:
        redis_port = free_port()
        redis = Bridge(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
             "--appendonly", "no"],
            redis_port, "redis", out)
        procs.append(redis)
        if args.backend == "python":
            venv = ROOT / ".venv" / "bin" / "python"
            py = str(venv) if venv.exists() else sys.executable
            backend = Proc([py, str(ROOT / "tests/interop/backend.py"), "--listen", "127.0.0.1:0"],
                           1, "backend", out)
        else:
            backend = Proc([str(BIN / "loadtest"), "backend", "--listen", "127.0.0.1:0"], 1,
                           "backend", out)
        procs.append(backend)
        backend_addr = backend.addrs[0]
        ports = [(free_port(), free_port()) for _ in range(args.instances)]
        cfgs = []
        gws = []
        for i, (ws, admin) in enumerate(ports):
            cfg = out / f"gateway{i}.toml"
            gateway_config(cfg, redis_port, ws, admin, backend_addr, args)
            cfgs.append(cfg)
            gws.append(start_gateway(i, cfg, out, 0))
        for _, admin in ports:
            wait_member(f"127.0.0.1:{admin}")
        hport = free_port()
        hcfg = out / "haproxy.cfg"
        haproxy_config(hcfg, hport, ports)
        haproxy = Bridge(["haproxy", "-db", "-f", str(hcfg)], hport, "haproxy", out)
        procs.append(haproxy)
        time.sleep(1.5)  # health checks mark the servers up

        load_args = [
            str(BIN / "loadtest"), "run", "--json", "--scenario", "churn",
            "--url", f"ws://127.0.0.1:{hport}/ws",
            "--connections", str(args.connections), "--duration", f"{args.duration}s",
            "--churn-share", args.churn_share, "--churn-every", args.churn_every,
            "--size", "64", "--timeout", "30s",
        ]
        with open(out / "loadtest.log", "w") as lerr:
            load = subprocess.Popen(load_args, stdout=subprocess.PIPE, stderr=lerr, text=True)
            t0 = time.time()
            events = []
            time.sleep(args.first_deploy)
            for i in range(args.instances):
                started = time.time()
                gws[i].p.send_signal(signal.SIGTERM)
                code = gws[i].p.wait(args.drain_timeout + 10)
                drained = time.time() - started
                gws[i] = start_gateway(i, cfgs[i], out, len(events) + 1)
                wait_member(f"127.0.0.1:{ports[i][1]}")
                events.append({"event": "deploy", "instance": i, "at_s": round(started - t0, 1),
                               "drained_s": round(drained, 2), "exit": code,
                               "back_after_s": round(time.time() - started, 2)})
                print(f"deployed instance {i}: {events[-1]}", file=sys.stderr)
                time.sleep(args.between)
            if args.stop_redis is not None:
                at = time.time()
                redis.p.kill()
                redis.p.wait()
                print(f"stopped redis for {args.stop_redis} s", file=sys.stderr)
                time.sleep(args.stop_redis)
                procs.remove(redis)
                redis = Bridge(
                    ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                     "--appendonly", "no"],
                    redis_port, "redis2", out)
                procs.append(redis)
                events.append({"event": "redis_stopped", "at_s": round(at - t0, 1),
                               "for_s": args.stop_redis})
                time.sleep(args.between)
            if args.kill is not None:
                i = args.kill
                before = metrics(f"127.0.0.1:{ports[i][1]}").get("gateway_sessions_open", 0)
                at = time.time()
                gws[i].p.kill()
                gws[i].p.wait()
                events.append({"event": "sigkill", "instance": i, "at_s": round(at - t0, 1),
                               "sessions_open": before})
                print(f"killed instance {i} holding {before:.0f} sessions", file=sys.stderr)
                time.sleep(2)
                gws[i] = start_gateway(i, cfgs[i], out, len(events) + 1)
                wait_member(f"127.0.0.1:{ports[i][1]}")
            stdout, _ = load.communicate(timeout=args.duration + 120)
        summary = json.loads(stdout.strip().splitlines()[-1])
        fleet_metrics = {}
        for i, (_, admin) in enumerate(ports):
            m = metrics(f"127.0.0.1:{admin}")
            fleet_metrics[f"gateway{i}"] = {k: v for k, v in m.items() if "fleet" in k or "resumes" in k}
        report = {
            "backend": args.backend,
            "instances": args.instances,
            "connections": args.connections,
            "events": events,
            "loadtest": {k: summary[k] for k in (
                "messages", "msgs_per_s", "lost", "duplicated", "reordered", "resumes",
                "resumes_refused", "handoffs", "drops", "retries", "close_codes",
                "reconnects", "reconnect_p50_us", "reconnect_p99_us", "p50_us", "p99_us",
                "errors")},
            "cmd": " ".join(["python3 loadtest/bench/fleet.py", *sys.argv[1:]]),
        }
        print(json.dumps(report, indent=1))
        (out / "fleet.json").write_text(json.dumps(report, indent=1))
        return 0
    finally:
        for g in list(locals().get("gws", [])) + procs:
            try:
                g.stop()
            except Exception:  # noqa: BLE001
                pass


if __name__ == "__main__":
    sys.exit(main())

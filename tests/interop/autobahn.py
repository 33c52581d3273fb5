#!/usr/bin/env python3
"""Run the Autobahn TestSuite fuzzing-client cases against a WebSocket server
with kosoku (tests/requirements.txt), and summarise the verdicts.

    python3 autobahn.py --url ws://127.0.0.1:PORT/ws --out DIR

Runs case groups 1-7, 9 and 10 (framing, pings, reserved bits, opcodes,
fragmentation, UTF-8, close handling, limits/performance, auto-fragmentation);
the compression groups 12 and 13 (permessage-deflate) are excluded. See
KOSOKU-NOTES.md beside this file for how kosoku works.

Writes:
  DIR/reports/       kosoku's Autobahn-format reports (index.json, index.html,
                     one .json and .html per case)
  DIR/kosoku.log     kosoku's own output
  DIR/summary.json   {"counts": {verdict: n}, "groups": {group: {verdict: n}},
                      "non_ok": [{"id", "verdict", "behavior", "behaviorClose",
                      "remoteCloseCode", "reportfile"}], ...}

and prints a table per case group, then, last, exactly:

  AUTOBAHN OK=a NON-STRICT=b INFORMATIONAL=c UNIMPLEMENTED=d FAILED=e

A case's verdict is its Autobahn "behavior" (the message exchange), except
that it counts as FAILED when that behavior could not be determined (kosoku's
ERROR: connection refused, crash) or when the closing-handshake verdict
("behaviorClose") is not OK or INFORMATIONAL (WRONG CODE, UNCLEAN, FAILED,
FAILED BY CLIENT). This is the same line kosoku draws between passed and
failed cases.

Exit status: 0 when kosoku produced results (whatever the verdicts; pass
--fail-on-failed to exit 1 when FAILED > 0); 2 when it produced none, or when
no case could be run at all (every case ERROR: the server is not there).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

VERDICTS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
DEFAULT_CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]
DEFAULT_EXCLUDE = ["12.*", "13.*"]  # permessage-deflate
PASSING_BEHAVIOR = {"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"}
PASSING_CLOSE = {"OK", "INFORMATIONAL"}


def case_key(case_id: str) -> list[int]:
    return [int(p) for p in case_id.split(".")]


def verdict(behavior: str, behavior_close: str) -> str:
    if behavior not in PASSING_BEHAVIOR:  # FAILED, ERROR, anything unknown
        return "FAILED"
    if behavior != "UNIMPLEMENTED" and behavior_close not in PASSING_CLOSE:
        return "FAILED"
    return behavior


def find_kosoku(explicit: str | None) -> str:
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "kosoku"  # same venv as this python
    if beside.exists():
        return str(beside)
    found = shutil.which("kosoku")
    if not found:
        sys.exit("autobahn.py: kosoku not found; pip install -r tests/requirements.txt")
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="ws:// URL of the server under test")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--case", action="append", metavar="GLOB",
                   help=f"case id or glob to run, repeatable (default: {' '.join(DEFAULT_CASES)})")
    p.add_argument("--exclude", action="append", metavar="GLOB", default=[],
                   help=f"case id or glob to skip, repeatable (always: {' '.join(DEFAULT_EXCLUDE)})")
    p.add_argument("--parallelism", type=int, default=1, help="cases run at once (kosoku -p)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before kosoku is stopped")
    p.add_argument("--kosoku", help="path of the kosoku executable")
    p.add_argument("--fail-on-failed", action="store_true", help="exit 1 when any case FAILED")
    args = p.parse_args()

    out = Path(args.out)
    reports = out / "reports"
    if reports.exists():
        shutil.rmtree(reports)  # ours: stale per-case files would mislead
    reports.mkdir(parents=True)

    cmd = [find_kosoku(args.kosoku), args.url]
    for c in args.case or DEFAULT_CASES:
        cmd += ["-i", c]
    for x in DEFAULT_EXCLUDE + args.exclude:
        cmd += ["-x", x]
    cmd += ["-p", str(args.parallelism), "-o", str(reports)]
    print("running:", shlex.join(cmd), file=sys.stderr, flush=True)

    started = time.monotonic()
    with open(out / "kosoku.log", "w") as log:
        try:
            # kosoku exits 1 when any case failed; its reports are complete
            # either way, so the exit code is only recorded.
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
            print(f"autobahn.py: kosoku still running after {args.timeout}s, stopped",
                  file=sys.stderr)
    elapsed = time.monotonic() - started
    sys.stderr.write((out / "kosoku.log").read_text(errors="replace")[-4000:])

    index_file = reports / "index.json"
    if not index_file.exists():
        print(f"autobahn.py: no {index_file}: kosoku produced no results (exit {rc})", file=sys.stderr)
        print("AUTOBAHN " + " ".join(f"{v}=0" for v in VERDICTS))
        return 2
    index = json.loads(index_file.read_text())  # {agent: {case_id: entry}}

    cases: dict[str, dict] = {}
    agents = sorted(index)
    for agent in agents:
        for case_id, entry in index[agent].items():
            cases[case_id] = entry
    counts = collections.Counter()
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    group_ms: collections.Counter = collections.Counter()
    non_ok = []
    errors = sum(1 for e in cases.values() if e["behavior"] == "ERROR")
    for case_id in sorted(cases, key=case_key):
        e = cases[case_id]
        v = verdict(e["behavior"], e["behaviorClose"])
        group = case_id.split(".")[0]
        counts[v] += 1
        groups[group][v] += 1
        group_ms[group] += e.get("duration") or 0
        if v != "OK":
            non_ok.append({
                "id": case_id, "verdict": v,
                "behavior": e["behavior"], "behaviorClose": e["behaviorClose"],
                "remoteCloseCode": e.get("remoteCloseCode"),
                "reportfile": str(reports / e["reportfile"]),
            })

    # The table.
    cols = VERDICTS + ["total", "time"]
    width = [6] + [max(len(c), 5) for c in cols]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, width))
    print(f"Autobahn fuzzing-client cases against {args.url} (agent: {', '.join(agents)})")
    print(line(["group"] + cols))
    for group in sorted(groups, key=int):
        c = groups[group]
        print(line([group] + [c[v] for v in VERDICTS]
                   + [sum(c.values()), f"{group_ms[group] / 1000:.1f}s"]))
    print(line(["all"] + [counts[v] for v in VERDICTS] + [sum(counts.values()), f"{elapsed:.1f}s"]))
    for n in non_ok:
        print(f"  {n['id']:<8} {n['verdict']:<13} behavior={n['behavior']} "
              f"close={n['behaviorClose']} remoteCloseCode={n['remoteCloseCode']}")

    summary = {
        "url": args.url,
        "agents": agents,
        "command": cmd,
        "kosoku_exit_code": rc,
        "elapsed_s": round(elapsed, 1),
        "total": sum(counts.values()),
        "counts": {v: counts[v] for v in VERDICTS},
        "groups": {g: {v: groups[g][v] for v in VERDICTS} for g in sorted(groups, key=int)},
        # cases kosoku could not run at all (behavior ERROR), counted as FAILED
        "error_cases": errors,
        "non_ok": non_ok,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("AUTOBAHN " + " ".join(f"{v}={counts[v]}" for v in VERDICTS), flush=True)
    if errors == len(cases):
        print("autobahn.py: no case could be run (is the server up?)", file=sys.stderr)
        return 2
    if args.fail_on_failed and counts["FAILED"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""WebSocket interoperability client for the gateway, built on `websockets`.

It talks to the gateway as an ordinary third-party client would, and is meant
to run against a gateway whose backend echoes (tests/interop/backend.py or
the loadtest backend).

Echo mode (default)::

    python3 ws_client.py ws://127.0.0.1:8080/ws
    python3 ws_client.py wss://127.0.0.1:8443/ws --ca ca.pem --subprotocol chat

sends, without waiting in between:

  1. a text message "héllo wörld" (non-ASCII UTF-8),
  2. a binary message of the bytes 0..255,
  3. a 100 KiB binary message,
  4. a text message sent as 3 WebSocket fragments,

then checks that each comes back echoed, in order, with the same type (str
for text, bytes for binary) and content, and closes with code 1000. It prints
one JSON line::

    {"ok": true, "echoed": 4, "subprotocol": "chat" | null, "errors": [],
     "close_code": 1000}

Close mode::

    python3 ws_client.py URL --expect-close-after "cmd:close:4001:bye"

sends one text message and waits for the server to close, then prints::

    {"close_code": 4001, "close_reason": "bye", "close_frame_received": true,
     "received": [...messages that arrived before the close...]}

Either mode reports a refused upgrade as {"ok": false, "http_status": 503,
...}. The exit status is 0 only if everything went as expected (in close
mode: a close frame arrived within --timeout).

TLS: with --ca the server certificate is verified against that CA file, for
the server name given by --server-name (default "localhost"), whatever host
the URL names.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
from urllib.parse import urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

TEXT_1 = "héllo wörld"
BINARY_2 = bytes(range(256))
BINARY_3 = bytes((i * 31 + 7) % 251 for i in range(100 * 1024))  # 100 KiB, not periodic in 256
FRAGMENTS_4 = ["fragment one, ", "fragment twö, ", "fragment three ✓"]


def connect_kwargs(args: argparse.Namespace) -> dict:
    kw: dict = {
        "open_timeout": args.timeout,
        "close_timeout": args.timeout,
        "max_size": 16 * 1024 * 1024,
        "proxy": None,  # never go through an HTTP(S)_PROXY from the environment
    }
    if args.subprotocol:
        kw["subprotocols"] = [args.subprotocol]
    if urlsplit(args.url).scheme == "wss":
        ctx = ssl.create_default_context(cafile=args.ca) if args.ca else ssl.create_default_context()
        kw["ssl"] = ctx
        kw["server_hostname"] = args.server_name
    return kw


def describe(msg: str | bytes) -> str:
    kind = "text" if isinstance(msg, str) else "binary"
    head = msg[:40]
    return f"{kind}({len(msg)}) {head!r}{'...' if len(msg) > 40 else ''}"


async def echo_mode(args: argparse.Namespace) -> dict:
    out: dict = {"ok": False, "echoed": 0, "subprotocol": None, "errors": [], "close_code": None}
    expected: list[str | bytes] = [TEXT_1, BINARY_2, BINARY_3, "".join(FRAGMENTS_4)]
    async with connect(args.url, **connect_kwargs(args)) as ws:
        out["subprotocol"] = ws.subprotocol
        if args.subprotocol and ws.subprotocol != args.subprotocol:
            out["errors"].append(f"asked for subprotocol {args.subprotocol!r}, got {ws.subprotocol!r}")
        await ws.send(TEXT_1)
        await ws.send(BINARY_2)
        await ws.send(BINARY_3)
        await ws.send(FRAGMENTS_4)  # an iterable of str: one text message, 3 frames
        for i, want in enumerate(expected, 1):
            try:
                got = await asyncio.wait_for(ws.recv(), args.timeout)
            except asyncio.TimeoutError:
                out["errors"].append(f"message {i}: no echo within {args.timeout}s")
                break
            except ConnectionClosed as e:
                out["errors"].append(f"message {i}: connection closed before the echo: {e}")
                break
            if type(got) is not type(want):
                out["errors"].append(f"message {i}: sent {describe(want)}, got back {describe(got)} (wrong type)")
            elif got != want:
                out["errors"].append(f"message {i}: sent {describe(want)}, got back {describe(got)} (wrong content)")
            else:
                out["echoed"] += 1
        await ws.close(1000)
        out["close_code"] = ws.close_code
        # close_code is what the server sent back in its close frame; 1006
        # means the connection ended without one.
        if ws.close_code != 1000:
            out["errors"].append(f"closing handshake: server answered {ws.close_code} {ws.close_reason!r}, expected 1000")
    out["ok"] = not out["errors"] and out["echoed"] == len(expected)
    return out


def show(msg: str | bytes) -> dict:
    return {"text": msg} if isinstance(msg, str) else {"binary": msg.hex()}


async def close_mode(args: argparse.Namespace) -> dict:
    out: dict = {"close_code": None, "close_reason": None, "close_frame_received": False, "received": []}
    async with connect(args.url, **connect_kwargs(args)) as ws:
        await ws.send(args.expect_close_after)
        try:
            async with asyncio.timeout(args.timeout):
                while True:
                    msg = await ws.recv()
                    if len(out["received"]) < 100:
                        out["received"].append(show(msg))
        except ConnectionClosed:
            pass  # the server closed (with any code): what we waited for
        except TimeoutError:
            out["error"] = f"the server did not close within {args.timeout}s"
            return out
        out["close_code"] = ws.close_code
        out["close_reason"] = ws.close_reason
        out["close_frame_received"] = ws.protocol.close_rcvd is not None
    return out


async def amain(args: argparse.Namespace) -> tuple[dict, bool]:
    try:
        if args.expect_close_after is not None:
            out = await close_mode(args)
            return out, out["close_frame_received"]
        out = await echo_mode(args)
        return out, out["ok"]
    except InvalidStatus as e:
        status = e.response.status_code
        return {"ok": False, "http_status": status,
                "errors": [f"upgrade refused: HTTP {status} {e.response.reason_phrase}"]}, False
    except Exception as e:  # connection refused, TLS failure, timeout, ...
        return {"ok": False, "errors": [f"{type(e).__name__}: {e}"]}, False


def main() -> int:
    p = argparse.ArgumentParser(description="WebSocket echo / close-code client for the gateway")
    p.add_argument("url", help="ws:// or wss:// URL of the gateway")
    p.add_argument("--ca", help="CA certificate file (PEM) to verify the server's certificate against")
    p.add_argument("--server-name", default="localhost",
                   help="TLS server name to send and verify (default: localhost)")
    p.add_argument("--subprotocol", help="WebSocket subprotocol to offer")
    p.add_argument("--expect-close-after", metavar="TEXT",
                   help="send TEXT as a text message, then wait for the server to close")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each step")
    args = p.parse_args()
    out, ok = asyncio.run(amain(args))
    print(json.dumps(out, ensure_ascii=False), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

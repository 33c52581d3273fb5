#!/usr/bin/env python3
"""Independent, strict backend for the gateway's link protocol (versions 1 and 2).

Written only from protocol/README.md and protocol/proto/wsgw/v1/link.proto,
using nothing but the Python standard library: the protobuf wire format is
encoded and decoded by hand below, so this file is a second, independent
reading of the contract next to the Rust implementation.

It implements the README's "Checklist for a backend implementation":

  1. listen on TCP, read length-prefixed frames (``--framing varint|u32be``),
     refuse bodies above ``--max-frame`` before reading them;
  2. expect ``hello`` first, answer ``hello_ack`` with the highest version it
     speaks (2, else 1) within the gateway's ``[min_version, max_version]``
     (or ``version: 0`` plus an error, then close, when neither is in it);
  3. answer every ``heartbeat{ack: false}`` with ``heartbeat{same nonce,
     ack: true}`` (and send its own heartbeat every ``--heartbeat`` seconds);
  4. keep a table of open sessions per link;
  5. send ``data`` only for open sessions;
  6. ignore frames for sessions it closed itself; skip unknown fields.

Version 2 adds two gateway -> backend frame kinds, ``detached`` (the client's
connection was lost and the session waits ``grace_ms`` for a resume) and
``attached`` (the client resumed; ``replayed`` backend messages were sent
again). Neither changes the session's state: it stays open, and the backend
keeps echoing and pushing to it (the gateway buffers while it is detached).
Both are recorded for ``cmd:stats``. On a link that negotiated version 1,
receiving either one is a protocol violation; for an unknown session they
are treated like any other session frame (ignored if they crossed our own
``close``, a violation otherwise).

It is *strict* about what the gateway sends: every protocol violation is
printed to stderr as ``PROTOCOL VIOLATION: ...``, counted, and the link is
closed. Test harnesses read the count with ``cmd:stats`` (below) or from the
exit status (1 when any violation was seen, on SIGINT/SIGTERM).

Behaviour per session:

* every ``data`` frame is echoed back to its session, same payload, same
  ``text`` flag;
* a TEXT payload starting with ``cmd:`` is a command instead:

  ``cmd:close:CODE[:REASON]``  send ``close{CODE, REASON}``, forget the session
  ``cmd:push:N``               send N binary messages ``push-0`` .. ``push-N-1``
  ``cmd:stats``                reply (text) with a JSON object, see ``stats()``
                               (includes ``detaches``, ``attaches`` and the
                               last 100 ``events``)
  ``cmd:big:N``                send one binary message of N bytes (``x`` * N)
  ``cmd:badutf8``              send a text ``data`` whose payload is not UTF-8
                               (the gateway must close the session with 1011
                               and send us ``close{1011, ...}``)
  ``cmd:violate:KIND``         deliberately break the protocol so the gateway
                               must drop the whole link; KIND is one of
                               ``session0`` (data with session_id 0),
                               ``bodyless`` (frame with no body),
                               ``empty`` (zero-length frame),
                               ``hello`` (send a hello),
                               ``hello_ack`` (a second hello_ack),
                               ``heartbeat_session`` (heartbeat for this
                               session), ``detached`` / ``attached`` (the
                               gateway's frames, sent by us),
                               ``badutf8_link`` (a hello_ack whose
                               backend_id is not UTF-8),
                               ``oversize`` (announce a frame above --max-frame)
  ``cmd:badclose``             send ``close`` for this session with a reason
                               that is not UTF-8 (the gateway must end only
                               this session and send us ``close{1011, ...}``)
  ``cmd:foreign``              send data for a session id never opened on this
                               link (the gateway must drop it silently), then
                               echo ``foreign-sent`` so the test can continue

Usage::

    python3 backend.py --listen 127.0.0.1:0 --framing varint
    python3 backend.py --self-test

After binding, exactly one line ``listening HOST:PORT`` is printed to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

# Protocol versions this backend speaks; the handshake picks the highest one
# the gateway offers. Version 2 adds the gateway -> backend frame kinds in
# V2_KINDS; version 1 has only the original six.
SUPPORTED_VERSIONS = (1, 2)
V2_KINDS = frozenset({"detached", "attached"})
DEFAULT_MAX_FRAME = 1_052_672  # 1 MiB + 4 KiB, the README's default
BACKEND_ID = "tests/interop/backend.py"

# ---------------------------------------------------------------------------
# Protobuf wire format, by hand.
#
# Wire types (https://protobuf.dev/programming-guides/encoding/):
#   0 VARINT, 1 I64, 2 LEN, 3 SGROUP (deprecated), 4 EGROUP (deprecated), 5 I32
# ---------------------------------------------------------------------------

WT_VARINT, WT_I64, WT_LEN, WT_SGROUP, WT_EGROUP, WT_I32 = 0, 1, 2, 3, 4, 5
U64_MASK = (1 << 64) - 1
U32_MASK = (1 << 32) - 1


class DecodeError(ValueError):
    """The bytes are not a valid encoding of the expected message."""


def encode_varint(value: int) -> bytes:
    """Base-128 varint of an unsigned 64-bit value (1 to 10 bytes)."""
    if value < 0 or value > U64_MASK:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a varint at ``buf[pos:]``; return ``(value, new_pos)``.

    At most 10 bytes; the 10th may only carry the 64th bit. Non-minimal
    encodings (e.g. ``80 00`` for 0) are accepted, as protobuf parsers do.
    """
    result = 0
    for i in range(10):
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        byte = buf[pos]
        pos += 1
        if i == 9 and byte > 1:
            raise DecodeError("varint overflows 64 bits")
        result |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return result, pos
    raise DecodeError("varint longer than 10 bytes")


def _key(field_no: int, wire_type: int) -> bytes:
    return encode_varint((field_no << 3) | wire_type)


def enc_uint(field_no: int, value: int) -> bytes:
    """A varint field, omitted when 0 (proto3 default)."""
    return _key(field_no, WT_VARINT) + encode_varint(value) if value else b""


def enc_bool(field_no: int, value: bool) -> bytes:
    return _key(field_no, WT_VARINT) + b"\x01" if value else b""


def enc_bytes(field_no: int, value: bytes, always: bool = False) -> bytes:
    """A length-delimited field; omitted when empty unless ``always`` (used
    for a oneof member, whose presence matters even when it is empty)."""
    if not value and not always:
        return b""
    return _key(field_no, WT_LEN) + encode_varint(len(value)) + value


def enc_str(field_no: int, value: str) -> bytes:
    return enc_bytes(field_no, value.encode("utf-8"))


def _skip_group(buf: bytes, pos: int, field_no: int, depth: int) -> int:
    """Skip a (deprecated) group body up to its matching EGROUP tag."""
    if depth > 100:
        raise DecodeError("groups nested too deeply")
    while True:
        if pos >= len(buf):
            raise DecodeError(f"unterminated group {field_no}")
        key, pos = decode_varint(buf, pos)
        fno, wt = key >> 3, key & 7
        if wt == WT_EGROUP:
            if fno != field_no:
                raise DecodeError(f"group {field_no} ended by EGROUP {fno}")
            return pos
        pos = _skip_value(buf, pos, fno, wt, depth + 1)


def _skip_value(buf: bytes, pos: int, field_no: int, wt: int, depth: int = 0) -> int:
    if wt == WT_VARINT:
        return decode_varint(buf, pos)[1]
    if wt == WT_I64:
        end = pos + 8
    elif wt == WT_I32:
        end = pos + 4
    elif wt == WT_LEN:
        length, pos = decode_varint(buf, pos)
        end = pos + length
    elif wt == WT_SGROUP:
        return _skip_group(buf, pos, field_no, depth)
    elif wt == WT_EGROUP:
        raise DecodeError(f"unexpected EGROUP for field {field_no}")
    else:
        raise DecodeError(f"invalid wire type {wt} (field {field_no})")
    if end > len(buf):
        raise DecodeError(f"truncated field {field_no}")
    return end


def iter_fields(buf: bytes):
    """Yield ``(field_no, wire_type, value)`` for every field in ``buf``.

    ``value`` is an int for VARINT/I64/I32 and bytes for LEN. Groups (wire
    types 3/4) are skipped entirely (value None): no field here uses them.
    """
    pos = 0
    while pos < len(buf):
        key, pos = decode_varint(buf, pos)
        field_no, wt = key >> 3, key & 7
        if field_no == 0:
            raise DecodeError("field number 0")
        if wt == WT_VARINT:
            value, pos = decode_varint(buf, pos)
        elif wt == WT_LEN:
            length, pos = decode_varint(buf, pos)
            if pos + length > len(buf):
                raise DecodeError(f"truncated length-delimited field {field_no}")
            value = bytes(buf[pos : pos + length])
            pos += length
        elif wt in (WT_I64, WT_I32):
            end = _skip_value(buf, pos, field_no, wt)
            value = int.from_bytes(buf[pos:end], "little")
            pos = end
        else:  # groups, or an invalid wire type (raises)
            pos = _skip_value(buf, pos, field_no, wt)
            value = None
        yield field_no, wt, value


def _want(field_no: int, wt: int, expected: int, msg: str) -> None:
    # A known field arriving with another wire type is malformed input. (Some
    # protobuf runtimes treat it as an unknown field instead; being strict is
    # the point of this backend.)
    if wt != expected:
        raise DecodeError(f"{msg} field {field_no} has wire type {wt}, expected {expected}")


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(f"{what} is not valid UTF-8: {e}") from None


# ---------------------------------------------------------------------------
# The wsgw.v1 messages. Each decoder skips unknown fields; scalar fields keep
# the last value seen; a repeated embedded message field is merged (protobuf
# merges repeated occurrences of a singular message field, which is the same
# as parsing the concatenation of their bytes).
# ---------------------------------------------------------------------------


@dataclass
class Hello:
    min_version: int = 0
    max_version: int = 0
    gateway_id: str = ""
    link_index: int = 0
    # Fields 5-10, added within version 1; 0 / "" from an older gateway.
    instance_id: str = ""
    heartbeat_interval_ms: int = 0
    heartbeat_timeout_ms: int = 0
    max_frame_size: int = 0
    max_message_size: int = 0
    client_queue_bytes: int = 0

    def encode(self) -> bytes:
        return (enc_uint(1, self.min_version) + enc_uint(2, self.max_version)
                + enc_str(3, self.gateway_id) + enc_uint(4, self.link_index)
                + enc_str(5, self.instance_id)
                + enc_uint(6, self.heartbeat_interval_ms)
                + enc_uint(7, self.heartbeat_timeout_ms)
                + enc_uint(8, self.max_frame_size)
                + enc_uint(9, self.max_message_size)
                + enc_uint(10, self.client_queue_bytes))

    @classmethod
    def decode(cls, buf: bytes) -> "Hello":
        m = cls()
        for fno, wt, v in iter_fields(buf):
            if fno == 1:
                _want(fno, wt, WT_VARINT, "Hello"); m.min_version = v & U32_MASK
            elif fno == 2:
                _want(fno, wt, WT_VARINT, "Hello"); m.max_version = v & U32_MASK
            elif fno == 3:
                _want(fno, wt, WT_LEN, "Hello"); m.gateway_id = _utf8(v, "Hello.gateway_id")
            elif fno == 4:
                _want(fno, wt, WT_VARINT, "Hello"); m.link_index = v & U32_MASK
            elif fno == 5:
                _want(fno, wt, WT_LEN, "Hello"); m.instance_id = _utf8(v, "Hello.instance_id")
            elif fno == 6:
                _want(fno, wt, WT_VARINT, "Hello"); m.heartbeat_interval_ms = v
            elif fno == 7:
                _want(fno, wt, WT_VARINT, "Hello"); m.heartbeat_timeout_ms = v
            elif fno == 8:
                _want(fno, wt, WT_VARINT, "Hello"); m.max_frame_size = v & U32_MASK
            elif fno == 9:
                _want(fno, wt, WT_VARINT, "Hello"); m.max_message_size = v & U32_MASK
            elif fno == 10:
                _want(fno, wt, WT_VARINT, "Hello"); m.client_queue_bytes = v
        return m


@dataclass
class HelloAck:
    version: int = 0
    backend_id: str = ""
    error: str = ""

    def encode(self) -> bytes:
        return enc_uint(1, self.version) + enc_str(2, self.backend_id) + enc_str(3, self.error)

    @classmethod
    def decode(cls, buf: bytes) -> "HelloAck":
        m = cls()
        for fno, wt, v in iter_fields(buf):
            if fno == 1:
                _want(fno, wt, WT_VARINT, "HelloAck"); m.version = v & U32_MASK
            elif fno == 2:
                _want(fno, wt, WT_LEN, "HelloAck"); m.backend_id = _utf8(v, "HelloAck.backend_id")
            elif fno == 3:
                _want(fno, wt, WT_LEN, "HelloAck"); m.error = _utf8(v, "HelloAck.error")
        return m


@dataclass
class Header:
    name: str = ""
    value: str = ""

    def encode(self) -> bytes:
        return enc_str(1, self.name) + enc_str(2, self.value)

    @classmethod
    def decode(cls, buf: bytes) -> "Header":
        m = cls()
        for fno, wt, v in iter_fields(buf):
            if fno == 1:
                _want(fno, wt, WT_LEN, "Header"); m.name = _utf8(v, "Header.name")
            elif fno == 2:
                _want(fno, wt, WT_LEN, "Header"); m.value = _utf8(v, "Header.value")
        return m


@dataclass
class SessionOpen:
    remote_addr: str = ""
    path: str = ""
    subprotocol: str = ""
    headers: list[Header] = field(default_factory=list)
    identity: str = ""

    def encode(self) -> bytes:
        out = enc_str(1, self.remote_addr) + enc_str(2, self.path) + enc_str(3, self.subprotocol)
        for h in self.headers:
            out += enc_bytes(4, h.encode(), always=True)
        return out + enc_str(5, self.identity)

    @classmethod
    def decode(cls, buf: bytes) -> "SessionOpen":
        m = cls()
        for fno, wt, v in iter_fields(buf):
            if fno == 1:
                _want(fno, wt, WT_LEN, "SessionOpen"); m.remote_addr = _utf8(v, "SessionOpen.remote_addr")
            elif fno == 2:
                _want(fno, wt, WT_LEN, "SessionOpen"); m.path = _utf8(v, "SessionOpen.path")
            elif fno == 3:
                _want(fno, wt, WT_LEN, "SessionOpen"); m.subprotocol = _utf8(v, "SessionOpen.subprotocol")
            elif fno == 4:
                _want(fno, wt, WT_LEN, "SessionOpen"); m.headers.append(Header.decode(v))
            elif fno == 5:
                _want(fno, wt, WT_LEN, "SessionOpen"); m.identity = _utf8(v, "SessionOpen.identity")
        return m


@dataclass
class Data:
    payload: bytes = b""
    text: bool = False

    def encode(self) -> bytes:
        return enc_bytes(1, self.payload) + enc_bool(2, self.text)

    @classmethod
    def decode(cls, buf: bytes) -> "Data":
        m = cls()
        for fno, wt, v in iter_fields(buf):
            if fno == 1:
                _want(fno, wt, WT_LEN, "Data"); m.payload = v
            elif fno == 2:
                _want(fno, wt, WT_VARINT, "Data"); m.text = v != 0
        return m


@dataclass
class SessionClose:
    code: int = 0
    reason: str = ""

    def encode(self) -> bytes:
        return enc_uint(1, self.code) + enc_str(2, self.reason)

    @classmethod
    def decode(cls, buf: bytes) -> "SessionClose":
        m = cls()
        for fno, wt, v in iter_fields(buf):
            if fno == 1:
                _want(fno, wt, WT_VARINT, "SessionClose"); m.code = v & U32_MASK
            elif fno == 2:
                _want(fno, wt, WT_LEN, "SessionClose"); m.reason = _utf8(v, "SessionClose.reason")
        return m


@dataclass
class Heartbeat:
    nonce: int = 0
    ack: bool = False

    def encode(self) -> bytes:
        return enc_uint(1, self.nonce) + enc_bool(2, self.ack)

    @classmethod
    def decode(cls, buf: bytes) -> "Heartbeat":
        m = cls()
        for fno, wt, v in iter_fields(buf):
            if fno == 1:
                _want(fno, wt, WT_VARINT, "Heartbeat"); m.nonce = v
            elif fno == 2:
                _want(fno, wt, WT_VARINT, "Heartbeat"); m.ack = v != 0
        return m


@dataclass
class SessionDetached:
    """Gateway -> backend, version 2: the client's connection was lost and the
    session (still open) waits up to ``grace_ms`` for the client to resume."""
    reason: str = ""
    grace_ms: int = 0

    def encode(self) -> bytes:
        return enc_str(1, self.reason) + enc_uint(2, self.grace_ms)

    @classmethod
    def decode(cls, buf: bytes) -> "SessionDetached":
        m = cls()
        for fno, wt, v in iter_fields(buf):
            if fno == 1:
                _want(fno, wt, WT_LEN, "SessionDetached"); m.reason = _utf8(v, "SessionDetached.reason")
            elif fno == 2:
                _want(fno, wt, WT_VARINT, "SessionDetached"); m.grace_ms = v
        return m


@dataclass
class SessionAttached:
    """Gateway -> backend, version 2: the client resumed the session from
    ``remote_addr``; ``replayed`` backend messages were sent to it again."""
    remote_addr: str = ""
    replayed: int = 0

    def encode(self) -> bytes:
        return enc_str(1, self.remote_addr) + enc_uint(2, self.replayed)

    @classmethod
    def decode(cls, buf: bytes) -> "SessionAttached":
        m = cls()
        for fno, wt, v in iter_fields(buf):
            if fno == 1:
                _want(fno, wt, WT_LEN, "SessionAttached"); m.remote_addr = _utf8(v, "SessionAttached.remote_addr")
            elif fno == 2:
                _want(fno, wt, WT_VARINT, "SessionAttached"); m.replayed = v
        return m


# Frame.body oneof: field number -> (name, message class). Fields 8 and 9
# exist only in version 2 (see V2_KINDS); a version-1 peer would see them as
# a body-less frame.
BODY_FIELDS = {
    2: ("hello", Hello),
    3: ("hello_ack", HelloAck),
    4: ("open", SessionOpen),
    5: ("data", Data),
    6: ("close", SessionClose),
    7: ("heartbeat", Heartbeat),
    8: ("detached", SessionDetached),
    9: ("attached", SessionAttached),
}
BODY_NUMBERS = {name: (no, cls) for no, (name, cls) in BODY_FIELDS.items()}


@dataclass
class Frame:
    session_id: int = 0
    kind: str | None = None  # which oneof member is set; None = no body
    body: object = None      # the decoded member message

    def encode(self) -> bytes:
        out = enc_uint(1, self.session_id)
        if self.kind is not None:
            no, cls = BODY_NUMBERS[self.kind]
            assert isinstance(self.body, cls), (self.kind, self.body)
            out += enc_bytes(no, self.body.encode(), always=True)
        return out

    @classmethod
    def decode(cls, buf: bytes) -> "Frame":
        session_id = 0
        body_no: int | None = None
        body_raw = b""
        for fno, wt, v in iter_fields(buf):
            if fno == 1:
                _want(fno, wt, WT_VARINT, "Frame")
                session_id = v
            elif fno in BODY_FIELDS:
                _want(fno, wt, WT_LEN, "Frame")
                # oneof: the last member seen wins; the same member seen
                # again is merged with the earlier occurrence.
                body_raw = body_raw + v if fno == body_no else v
                body_no = fno
        if body_no is None:
            return cls(session_id, None, None)
        name, mcls = BODY_FIELDS[body_no]
        return cls(session_id, name, mcls.decode(body_raw))


# ---------------------------------------------------------------------------
# Framing: a length prefix, then the protobuf body.
# ---------------------------------------------------------------------------


def frame_prefix(framing: str, length: int) -> bytes:
    if framing == "varint":
        return encode_varint(length)
    if framing == "u32be":
        return length.to_bytes(4, "big")
    raise ValueError(f"unknown framing {framing!r}")


def encode_wire(framing: str, frame: Frame) -> bytes:
    body = frame.encode()
    return frame_prefix(framing, len(body)) + body


async def read_prefix(reader: asyncio.StreamReader, framing: str) -> int | None:
    """Read one length prefix; None on a clean EOF before its first byte."""
    if framing == "u32be":
        try:
            raw = await reader.readexactly(4)
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return None
            raise
        return int.from_bytes(raw, "big")
    value = 0
    for i in range(10):
        try:
            b = (await reader.readexactly(1))[0]
        except asyncio.IncompleteReadError:
            if i == 0:
                return None
            raise
        if i == 9 and b > 1:
            raise DecodeError("length prefix varint overflows 64 bits")
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return value
    raise DecodeError("length prefix varint longer than 10 bytes")


# ---------------------------------------------------------------------------
# The backend.
# ---------------------------------------------------------------------------


def choose_version(min_version: int, max_version: int) -> tuple[int, str]:
    """The version to answer a ``hello`` offering ``[min_version, max_version]``
    with: the highest one we speak in that range, and "" -- or ``(0, error)``
    when there is none (the caller then sends that and closes the link)."""
    common = [v for v in SUPPORTED_VERSIONS if min_version <= v <= max_version]
    if common:
        return max(common), ""
    return 0, (f"no common version: gateway speaks [{min_version}, {max_version}], "
               f"backend speaks {', '.join(map(str, SUPPORTED_VERSIONS))}")


class ProtocolViolation(Exception):
    """The gateway broke the link protocol; the link must be closed."""


def log(msg: str) -> None:
    print(f"[backend {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Backend:
    def __init__(self, framing: str, max_frame: int, heartbeat: float, verbose: bool):
        self.framing = framing
        self.max_frame = max_frame
        self.heartbeat = heartbeat
        self.verbose = verbose
        self.links: dict[int, "Link"] = {}
        self.links_total = 0
        self.violations = 0
        self.closes: collections.deque = collections.deque(maxlen=100)
        self.opens: collections.deque = collections.deque(maxlen=100)
        self.sessions_lost = 0      # sessions ended by the loss of their link
        self.heartbeats_received = 0
        self.heartbeats_sent = 0
        self.heartbeat_acks = 0     # answers to our own heartbeats
        self.detaches = 0           # `detached` frames received (version 2)
        self.attaches = 0           # `attached` frames received (version 2)
        # the last 100 [kind, session_id, detail] for detached/attached, where
        # detail is the detach reason or the number of replayed messages
        self.events: collections.deque = collections.deque(maxlen=100)
        # the last 100 hellos, as dicts of their fields
        self.hellos: collections.deque = collections.deque(maxlen=100)
        self._link_ids = itertools.count(1)
        self.stopping = False

    def stats(self) -> dict:
        """What ``cmd:stats`` returns (as JSON)."""
        return {
            "links": len(self.links),
            "links_total": self.links_total,
            "sessions": sum(len(l.sessions) for l in self.links.values()),
            "violations": self.violations,
            # [session_id, code, reason] of each close received from the gateway
            "closes": [list(c) for c in self.closes],
            # the last 100 open messages; headers as [name, value] pairs
            "opens": list(self.opens),
            "sessions_lost": self.sessions_lost,
            "heartbeats_received": self.heartbeats_received,
            "heartbeats_sent": self.heartbeats_sent,
            "heartbeat_acks": self.heartbeat_acks,
            "detaches": self.detaches,
            "attaches": self.attaches,
            # [kind, session_id, detail]: detail is the reason of a "detached",
            # the replayed count of an "attached"
            "events": [list(e) for e in self.events],
            "hellos": list(self.hellos),
            "framing": self.framing,
        }

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(self, next(self._link_ids), reader, writer)
        link.task = asyncio.current_task()
        self.links[link.id] = link
        self.links_total += 1
        try:
            await link.run()
        finally:
            del self.links[link.id]


class Link:
    """One TCP connection from the gateway, with its own session table."""

    def __init__(self, backend: Backend, link_id: int,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.b = backend
        self.id = link_id
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.sessions: dict[int, SessionOpen] = {}  # open sessions
        self.closed_by_us: set[int] = set()    # late frames for these: ignore
        self.closed_by_peer: set[int] = set()  # frames for these: violation
        self.hello: Hello | None = None
        self.version = 0  # negotiated in the handshake (0 until then)
        self.pending_nonces: set[int] = set()
        self.nonces = itertools.count(1)
        self.task: asyncio.Task | None = None

    def log(self, msg: str) -> None:
        log(f"link {self.id} ({self.peer}): {msg}")

    def violation(self, msg: str) -> ProtocolViolation:
        self.b.violations += 1
        print(f"PROTOCOL VIOLATION: link {self.id} ({self.peer}): {msg}",
              file=sys.stderr, flush=True)
        return ProtocolViolation(msg)

    # -- writing: one frame is one write() call, so frames never interleave,
    # and all writes happen in program order on the event loop. --

    async def send(self, frame: Frame) -> None:
        body = frame.encode()
        if len(body) > self.b.max_frame:
            raise RuntimeError(f"refusing to send a {len(body)}-byte frame (max {self.b.max_frame})")
        await self.send_raw(frame_prefix(self.b.framing, len(body)) + body)
        if self.b.verbose:
            self.log(f"sent {frame.kind} session={frame.session_id}")

    async def send_raw(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def send_data(self, sid: int, payload: bytes, text: bool) -> None:
        if sid not in self.sessions:
            return  # never send for a session that is not open (checklist 5)
        await self.send(Frame(sid, "data", Data(payload, text)))

    async def send_close(self, sid: int, code: int, reason: str) -> None:
        if sid not in self.sessions:
            return
        del self.sessions[sid]
        self.closed_by_us.add(sid)
        await self.send(Frame(sid, "close", SessionClose(code, reason)))

    # -- reading --

    async def read_frame(self) -> Frame | None:
        try:
            length = await read_prefix(self.reader, self.b.framing)
        except DecodeError as e:
            raise self.violation(f"bad length prefix: {e}")
        if length is None:
            return None
        if length == 0:
            raise self.violation("zero-length frame (a Frame must carry a body)")
        if length > self.b.max_frame:
            raise self.violation(f"frame length {length} above maximum {self.b.max_frame}")
        body = await self.reader.readexactly(length)
        try:
            return Frame.decode(body)
        except DecodeError as e:
            raise self.violation(f"undecodable frame ({e}): {body[:64].hex()}")

    async def run(self) -> None:
        self.log("connected")
        hb_task = None
        why = "closed by gateway"
        try:
            while True:
                frame = await self.read_frame()
                if frame is None:
                    if self.b.stopping:
                        why = "backend shutting down"
                    break
                if self.b.verbose:
                    self.log(f"received {frame.kind} session={frame.session_id}")
                if self.hello is None:
                    await self.on_first(frame)
                    if self.b.heartbeat > 0:
                        hb_task = asyncio.create_task(self.heartbeat_loop())
                else:
                    await self.on_frame(frame)
        except ProtocolViolation as e:
            why = f"protocol violation: {e}"
        except asyncio.IncompleteReadError:
            why = "connection ended in the middle of a frame"
        except (ConnectionError, OSError) as e:
            why = f"connection error: {e!r}"
        finally:
            if hb_task:
                hb_task.cancel()
            # The end of the link is a close(1006) of every session on it.
            lost = len(self.sessions)
            self.b.sessions_lost += lost
            self.sessions.clear()
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError, asyncio.CancelledError):
                pass
            self.log(f"disconnected ({why}); {lost} session(s) ended with 1006")

    async def on_first(self, frame: Frame) -> None:
        if frame.kind != "hello":
            raise self.violation(f"first frame is {frame.kind or 'body-less'}, not hello")
        if frame.session_id != 0:
            raise self.violation(f"hello with session_id {frame.session_id}")
        h = frame.body
        assert isinstance(h, Hello)
        self.hello = h
        self.b.hellos.append(dict(h.__dict__))
        self.log(f"hello from gateway {h.gateway_id!r} instance {h.instance_id!r} "
                 f"link_index={h.link_index} versions [{h.min_version}, {h.max_version}] "
                 f"heartbeat {h.heartbeat_interval_ms} ms max_frame {h.max_frame_size}")
        if h.max_frame_size and h.max_frame_size != self.b.max_frame:
            # Not a violation (the gateway may be configured differently);
            # the README says both sides must use the same maximum.
            self.log(f"gateway max_frame_size {h.max_frame_size} differs from ours "
                     f"({self.b.max_frame})")
        version, err = choose_version(h.min_version, h.max_version)
        if not version:
            await self.send(Frame(0, "hello_ack", HelloAck(0, BACKEND_ID, err)))
            raise self.violation(f"bad hello range: {err}")
        self.version = version
        await self.send(Frame(0, "hello_ack", HelloAck(version, BACKEND_ID)))
        self.log(f"speaking version {version}")

    async def on_frame(self, frame: Frame) -> None:
        sid, kind, body = frame.session_id, frame.kind, frame.body
        if kind is None:
            raise self.violation(f"body-less frame (session_id {sid})")
        if kind in ("hello", "hello_ack"):
            raise self.violation(f"unexpected {kind} after the handshake")
        if kind in V2_KINDS and self.version < 2:
            raise self.violation(f"{kind} frame (session_id {sid}) on a version-{self.version} link")
        if kind == "heartbeat":
            if sid != 0:
                raise self.violation(f"heartbeat with session_id {sid}")
            assert isinstance(body, Heartbeat)
            if body.ack:
                # an answer to one of ours; answers to unknown nonces are ignored
                if body.nonce in self.pending_nonces:
                    self.pending_nonces.discard(body.nonce)
                    self.b.heartbeat_acks += 1
            else:
                self.b.heartbeats_received += 1
                await self.send(Frame(0, "heartbeat", Heartbeat(body.nonce, True)))
            return
        # open / data / close / detached / attached: session frames
        if sid == 0:
            raise self.violation(f"{kind} with session_id 0")
        if sid in self.closed_by_peer:
            raise self.violation(f"{kind} for session {sid} after the gateway closed it")
        if kind == "open":
            assert isinstance(body, SessionOpen)
            if sid in self.sessions or sid in self.closed_by_us:
                raise self.violation(f"duplicate open for session {sid}")
            self.sessions[sid] = body
            self.b.opens.append({
                "session_id": sid,
                "remote_addr": body.remote_addr,
                "path": body.path,
                "subprotocol": body.subprotocol,
                "headers": [[h.name, h.value] for h in body.headers],
                "identity": body.identity,
            })
            if self.b.verbose:
                self.log(f"open session {sid} path={body.path!r} from {body.remote_addr}")
            return
        if sid in self.closed_by_us:
            return  # crossed our own close: accept and ignore (checklist 6)
        if sid not in self.sessions:
            raise self.violation(f"{kind} for session {sid}, which was never opened on this link")
        if kind == "close":
            assert isinstance(body, SessionClose)
            del self.sessions[sid]
            self.closed_by_peer.add(sid)
            self.b.closes.append((sid, body.code, body.reason))
            if self.b.verbose:
                self.log(f"close session {sid}: {body.code} {body.reason!r}")
            return
        if kind == "detached":
            # The session stays open: we keep echoing and pushing to it, and
            # the gateway buffers that for the client's resume.
            assert isinstance(body, SessionDetached)
            self.b.detaches += 1
            self.b.events.append(("detached", sid, body.reason))
            if self.b.verbose:
                self.log(f"session {sid} detached ({body.reason!r}, grace {body.grace_ms} ms)")
            return
        if kind == "attached":
            assert isinstance(body, SessionAttached)
            self.b.attaches += 1
            self.b.events.append(("attached", sid, body.replayed))
            if self.b.verbose:
                self.log(f"session {sid} attached from {body.remote_addr}, "
                         f"{body.replayed} message(s) replayed")
            return
        assert kind == "data" and isinstance(body, Data)
        if body.text:
            try:
                text = body.payload.decode("utf-8")
            except UnicodeDecodeError as e:
                raise self.violation(f"text data for session {sid} is not valid UTF-8: {e}")
            if text.startswith("cmd:"):
                await self.command(sid, text)
                return
        await self.send_data(sid, body.payload, body.text)  # echo

    async def command(self, sid: int, text: str) -> None:
        parts = text.split(":", 3)
        cmd = parts[1] if len(parts) > 1 else ""
        try:
            if cmd == "close":
                code = int(parts[2])
                reason = parts[3] if len(parts) > 3 else ""
                await self.send_close(sid, code, reason)
            elif cmd == "push":
                for i in range(int(parts[2])):
                    await self.send_data(sid, f"push-{i}".encode(), False)
            elif cmd == "stats":
                await self.send_data(sid, json.dumps(self.b.stats()).encode(), True)
            elif cmd == "big":
                await self.send_data(sid, b"x" * int(parts[2]), False)
            elif cmd == "badutf8":
                await self.send_data(sid, b"bad \xff\xfe utf-8", True)
            elif cmd == "foreign":
                foreign = (1 << 63) + self.id  # never chosen by the gateway in tests
                await self.send(Frame(foreign, "data", Data(b"foreign", False)))
                await self.send_data(sid, b"foreign-sent", True)
            elif cmd == "badclose":
                # close for this session whose reason is not UTF-8: framed
                # correctly, so the gateway must end only this session
                # (close{1011} back to us) and keep the link.
                body = enc_uint(1, sid) + enc_bytes(
                    6, enc_uint(1, 1000) + enc_bytes(2, b"bye \xff"), always=True)
                await self.send_raw(frame_prefix(self.b.framing, len(body)) + body)
            elif cmd == "violate":
                await self.violate(sid, parts[2] if len(parts) > 2 else "")
            else:
                await self.send_data(sid, f"cmd-error: unknown command {text!r}".encode(), True)
        except (ValueError, IndexError) as e:
            await self.send_data(sid, f"cmd-error: {text!r}: {e}".encode(), True)

    async def violate(self, sid: int, kind: str) -> None:
        """Deliberately break the protocol (the gateway must close the link);
        ``sid`` is the session that asked for it."""
        self.log(f"deliberately sending a '{kind}' violation")
        if kind == "session0":
            await self.send(Frame(0, "data", Data(b"oops", False)))
        elif kind == "bodyless":
            await self.send(Frame(7, None, None))
        elif kind == "empty":
            await self.send_raw(frame_prefix(self.b.framing, 0))
        elif kind == "hello":
            await self.send(Frame(0, "hello", Hello(1, 1, "backend", 0)))
        elif kind == "hello_ack":
            await self.send(Frame(0, "hello_ack", HelloAck(self.version, BACKEND_ID)))
        elif kind == "heartbeat_session":
            await self.send(Frame(sid, "heartbeat", Heartbeat(1, False)))
        elif kind == "detached":
            await self.send(Frame(sid, "detached", SessionDetached("backend", 1000)))
        elif kind == "attached":
            await self.send(Frame(sid, "attached", SessionAttached("1.2.3.4:5", 0)))
        elif kind == "badutf8_link":
            # A link frame (session 0) with a string that is not UTF-8.
            ack = enc_uint(1, self.version) + enc_bytes(2, b"be \xff")
            body = enc_bytes(3, ack, always=True)
            await self.send_raw(frame_prefix(self.b.framing, len(body)) + body)
        elif kind == "oversize":
            # Announce one byte more than allowed and send nothing else: the
            # gateway must refuse on the prefix alone, before any body.
            await self.send_raw(frame_prefix(self.b.framing, self.b.max_frame + 1))
        else:
            raise ValueError(f"unknown violation kind {kind!r}")

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.b.heartbeat)
            nonce = next(self.nonces)
            self.pending_nonces.add(nonce)
            self.b.heartbeats_sent += 1
            try:
                await self.send(Frame(0, "heartbeat", Heartbeat(nonce, False)))
            except (ConnectionError, OSError):
                return


def parse_hostport(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {s!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(args: argparse.Namespace) -> int:
    backend = Backend(args.framing, args.max_frame, args.heartbeat, args.verbose)
    host, port = args.listen
    server = await asyncio.start_server(backend.handle, host, port, limit=1 << 16)
    sock = server.sockets[0]
    addr = sock.getsockname()
    shown = f"[{addr[0]}]" if sock.family == socket.AF_INET6 else addr[0]
    print(f"listening {shown}:{addr[1]}", flush=True)
    log(f"framing={args.framing} max_frame={args.max_frame} heartbeat={args.heartbeat}s")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
        # Close every link and let its task finish (it logs the lost sessions).
        backend.stopping = True
        tasks = [l.task for l in backend.links.values() if l.task]
        for l in list(backend.links.values()):
            l.writer.close()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
    log(f"stopping: {backend.links_total} link(s) accepted, {backend.violations} violation(s)")
    return 1 if backend.violations else 0


# ---------------------------------------------------------------------------
# Self-test: the README's worked example and a few decoding edge cases.
# ---------------------------------------------------------------------------


def self_test() -> int:
    if not __debug__:
        print("self-test needs assertions: run without -O", file=sys.stderr)
        return 2
    def h(s: str) -> bytes:
        return bytes.fromhex(s.replace(" ", ""))

    # The README's worked example.
    frame = Frame(5, "data", Data(b"hi", True))
    body = h("08 05 2a 06 0a 02 68 69 10 01")
    assert frame.encode() == body, frame.encode().hex(" ")
    assert encode_wire("varint", frame) == h("0a 08 05 2a 06 0a 02 68 69 10 01")
    assert encode_wire("u32be", frame) == h("00 00 00 0a 08 05 2a 06 0a 02 68 69 10 01")
    assert Frame.decode(body) == frame

    # The same, read back through the stream reader for both framings.
    async def read_back(framing: str, wire: bytes) -> Frame | None:
        r = asyncio.StreamReader()
        r.feed_data(wire)
        r.feed_eof()
        n = await read_prefix(r, framing)
        assert n is not None
        return Frame.decode(await r.readexactly(n))

    for framing in ("varint", "u32be"):
        assert asyncio.run(read_back(framing, encode_wire(framing, frame))) == frame

    # An empty binary Data is `2a 00` and must be accepted.
    f = Frame.decode(h("08 07 2a 00"))
    assert f == Frame(7, "data", Data(b"", False)), f
    assert Frame(7, "data", Data(b"", False)).encode() == h("08 07 2a 00")
    # A frame with no body decodes with kind None (a violation to the link).
    assert Frame.decode(h("08 07")).kind is None

    # Unknown fields of every wire type are skipped, in Frame and in Data:
    # varint (f10), i64 (f11), len (f12), group (f13, containing a varint),
    # i32 (f14). (Fields 8 and 9 of Frame are known since version 2.)
    unknown = h("50 96 01" "59 0102030405060708" "62 03 616263" "6b 08 01 6c" "75 01020304")
    f = Frame.decode(unknown + h("08 05") + unknown + h("2a 09") + unknown[:3] + h("0a 02 68 69 10 01"))
    assert f == frame, f
    f = Frame.decode(h("2a") + encode_varint(len(unknown) + 4) + unknown + h("0a 02 68 69"))
    assert f == Frame(0, "data", Data(b"hi", False)), f

    # Fields in any order; oneof: last member wins; a repeated member merges.
    assert Frame.decode(h("2a 06 0a 02 68 69 10 01 08 05")) == frame
    f = Frame.decode(h("3a 02 08 09" "2a 04 0a 02 68 69" "2a 02 10 01" "08 05"))
    assert f == frame, f

    # Varints: bounds and errors.
    for v in (0, 1, 127, 128, 300, 1_052_672, (1 << 63), (1 << 64) - 1):
        assert decode_varint(encode_varint(v), 0) == (v, len(encode_varint(v)))
    assert len(encode_varint((1 << 64) - 1)) == 10
    assert decode_varint(h("80 00"), 0) == (0, 2)  # non-minimal is accepted
    for bad in ("80", "ff ff ff ff ff ff ff ff ff 02", "ff ff ff ff ff ff ff ff ff ff 01"):
        try:
            decode_varint(h(bad), 0)
        except DecodeError:
            pass
        else:
            raise AssertionError(f"accepted bad varint {bad}")

    # Malformed bodies are rejected.
    for bad in ("2a 05 0a 02", "0a", "08", "0f", "2b 08 01"):
        try:
            Frame.decode(h(bad))
        except DecodeError:
            pass
        else:
            raise AssertionError(f"accepted malformed frame {bad}")

    # Every message round-trips.
    samples = [
        Frame(0, "hello", Hello(1, 3, "gw-1", 2)),
        Frame(0, "hello", Hello(1, 2, "gw-1", 2, "ab" * 16, 5000, 15000, 1_052_672, 1 << 20, 4 << 20)),
        Frame(0, "hello_ack", HelloAck(1, "be", "")),
        Frame(0, "hello_ack", HelloAck(0, "be", "no")),
        Frame(42, "open", SessionOpen("127.0.0.1:5555", "/ws?a=1", "chat",
                                      [Header("origin", "x"), Header("x-a", "é")], "")),
        Frame(42, "data", Data(bytes(range(256)), False)),
        Frame((1 << 64) - 1, "close", SessionClose(4999, "bye ✓")),
        Frame(0, "heartbeat", Heartbeat((1 << 64) - 1, True)),
        Frame(0, "heartbeat", Heartbeat(0, False)),
        Frame(42, "detached", SessionDetached("ping timeout", 30_000)),
        Frame(42, "detached", SessionDetached("", 0)),  # empty body: `42 00`
        Frame(42, "attached", SessionAttached("10.0.0.7:40000", 3)),
        Frame(42, "attached", SessionAttached("", (1 << 64) - 1)),
    ]
    for s in samples:
        assert Frame.decode(s.encode()) == s, s

    # The version-2 messages, byte for byte: field 8/9 of Frame, and their
    # own fields (string 1, uint64 2).
    f = Frame(5, "detached", SessionDetached("lost", 1000))
    assert f.encode() == h("08 05 42 09 0a 04 6c 6f 73 74 10 e8 07"), f.encode().hex(" ")
    f = Frame(5, "attached", SessionAttached("a:1", 2))
    assert f.encode() == h("08 05 4a 07 0a 03 61 3a 31 10 02"), f.encode().hex(" ")
    assert Frame.decode(h("08 05 42 00")) == Frame(5, "detached", SessionDetached())
    assert Frame.decode(h("08 05 4a 00")) == Frame(5, "attached", SessionAttached())
    # A wrong wire type for a known field is malformed.
    for bad in ("40 01", "48 01", "42 02 08 00", "42 02 12 00", "4a 02 08 01", "4a 02 12 00"):
        try:
            Frame.decode(h(bad))
        except DecodeError:
            pass
        else:
            raise AssertionError(f"accepted malformed frame {bad}")

    # Version choice: the highest version we speak within the offered range.
    assert choose_version(1, 2) == (2, "")
    assert choose_version(1, 1) == (1, "")
    assert choose_version(2, 3) == (2, "")
    assert choose_version(2, 2) == (2, "")
    for lo, hi in ((3, 4), (0, 0), (2, 1)):
        v, err = choose_version(lo, hi)
        assert v == 0 and "no common version" in err, (lo, hi, v, err)
    print("self-test OK")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=parse_hostport, default=("127.0.0.1", 0),
                   help="HOST:PORT to listen on (port 0 = any free port)")
    p.add_argument("--framing", choices=("varint", "u32be"), default="varint")
    p.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME,
                   help="maximum frame body size in bytes, both directions")
    p.add_argument("--heartbeat", type=float, default=5.0,
                   help="seconds between our own heartbeat requests (0: never)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every frame")
    p.add_argument("--self-test", action="store_true",
                   help="check the encoder/decoder against the README and exit")
    args = p.parse_args()
    if args.self_test:
        return self_test()
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())

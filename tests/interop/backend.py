#!/usr/bin/env python3
"""Independent, strict backend for the gateway's link protocol (versions 1 to 3).

Written only from protocol/README.md and protocol/proto/wsgw/v1/link.proto,
using nothing but the Python standard library: the protobuf wire format is
encoded and decoded by hand below, so this file is a second, independent
reading of the contract next to the Rust implementation.

It implements the README's "Checklist for a backend implementation":

  1. listen on TCP, read length-prefixed frames (``--framing varint|u32be``),
     refuse bodies above ``--max-frame`` before reading them;
  2. expect ``hello`` first, answer ``hello_ack`` with the highest version it
     speaks (3, 2, then 1; at most ``--max-version``) within the gateway's
     ``[min_version, max_version]`` (or ``version: 0`` plus an error, then
     close, when none is in it);
  3. answer every ``heartbeat{ack: false}`` with ``heartbeat{same nonce,
     ack: true}`` (and send its own heartbeat every ``--heartbeat`` seconds);
  4. keep a table of open sessions (shared by all links, keyed by
     (instance_id, session_id), where instance_id is that of the gateway
     instance that opened the session; each session is on one link at a
     time);
  5. send ``data`` only for open sessions;
  6. ignore frames for sessions it closed itself; skip unknown fields;
  7. version 3, capabilities ``flow``, ``move`` and ``fleet`` (below).

Version 2 adds two gateway -> backend frame kinds, ``detached`` (the client's
connection was lost and the session waits ``grace_ms`` for a resume) and
``attached`` (the client resumed; ``replayed`` backend messages were sent
again). Neither changes the session's state: it stays open, and the backend
keeps echoing and pushing to it (the gateway buffers while it is detached).
Both are recorded for ``cmd:stats``. On a link that negotiated version 1,
receiving either one is a protocol violation; for an unknown session they
are treated like any other session frame (ignored if they crossed our own
``close``, a violation otherwise).

Version 3 (chosen when offered, unless ``--max-version 2``) adopts the
capabilities of ``--caps`` (default ``flow,move,fleet``; ``none`` adopts none and
the link behaves as version 2) that the gateway offers, and grants
``--window`` bytes per session (0, the default: the gateway's own window).

* ``flow``: every session counts ``data`` costs (payload + 64) both ways.
  Each session has one handler that takes the gateway's messages in order;
  a message is *consumed* once its answer (echo, or a command's output) has
  been handed to the link within the gateway's limit; while the limit is
  used up the answer is held (in order), nothing more is consumed and no
  window is granted, so the gateway pauses that client alone. The backend
  grants ``window{consumed + window}`` whenever half a window or less is
  left. Checked: windows only with flow and a non-zero session id, for a
  session on this link; a limit never goes down; the gateway's data never
  passes our grant; hello's window fits a maximal message.
* ``move``: every window we send carries ``received``; every ``data`` we
  send is kept until acknowledged (checked: acknowledgements never go down
  nor past what we sent, and a limit is at most one gateway window past what
  was acknowledged, so what we keep stays within ``hello.session_window``).
  When a link is lost its sessions are kept ``hello.move_timeout_ms``, then
  forgotten (as a close 1006); a link that ended with a protocol violation
  (ours, deliberate, or the gateway's) ends its sessions at once. On
  ``resume`` the session moves to the new link (its frames still read from
  the old link are ignored), we answer ``window{limit, received}``, then
  resend our data from ``resume.received`` + 1; a session we do not know
  gets ``close{1012}`` (or the code we closed it with). Checked: resume only
  with move, never for a session open on that very link or closed by the
  gateway, and its ``open`` equals the original.
* ``fleet`` (adopted only with ``move``): a session is keyed by the
  instance that opened it, ``resume.origin_instance_id`` when set, else the
  ``hello.instance_id`` of the link that opened it, and keeps that key
  wherever it moves, so a resume on a link of another gateway instance finds
  it. A session still open on an up link (another instance handed it over)
  moves exactly as above. Without fleet a resume is keyed by its link's
  instance, as by a backend that ignores the field: one naming another
  origin (which the README says never comes) finds nothing and gets close.
* ``--reset-links-every SECONDS`` aborts every link with a TCP RST (SO_LINGER
  0) that often, to test moves from the backend's side.

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
  ``cmd:flood:N:SIZE``         send N binary messages of SIZE bytes (8 to
                               max_message_size), each starting with its
                               index as 8 bytes big-endian, as fast as the
                               gateway's window allows
  ``cmd:stall:SECONDS``        take nothing more from this session for that
                               long (no echo, no window: with flow, the
                               gateway must pause this client only)
  ``cmd:drop:N``               (move) count the next N data as sent but do
                               not write them, then reset the link: the
                               gateway must resume the session and get them
                               resent, in order
  ``cmd:freeze:SECONDS``       this session's link becomes a black hole for
                               that long (nothing read, everything written
                               dropped): the gateway declares it dead and
                               moves its sessions while it still looks up here
  ``cmd:overrun``              (flow) send past the gateway's window: it must
                               close the session with 1011 and send us
                               ``close{1011, ...}``
  ``cmd:stats``                reply (text) with a JSON object, see ``stats()``
                               (includes ``detaches``, ``attaches``, the
                               version-3 counters: ``windows_sent``,
                               ``windows_received``, ``stalls``,
                               ``max_held_bytes``, ``max_unacked_bytes``,
                               ``resumes_answered``, ``resumes_refused``,
                               ``frames_resent``, ``fleet_moves``,
                               ``sessions_kept``, ``sessions_expired``,
                               ``links_reset``, and the last 100 ``events``)
  ``cmd:session``              reply (text) with this session's counters (JSON)
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
                               ``window0`` (window with session_id 0),
                               ``window`` (window on a link without flow),
                               ``resume`` (the gateway's frame, sent by us),
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
    python3 backend.py --listen 127.0.0.1:9000 --caps flow --window 2097152
    python3 backend.py --listen 127.0.0.1:9000 --reset-links-every 2
    python3 backend.py --max-version 2       # the version-2 behaviour
    python3 backend.py --self-test

After binding, exactly one line ``listening HOST:PORT`` is printed to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import itertools
import json
import re
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

# Protocol versions this backend speaks; the handshake picks the highest one
# the gateway offers (at most --max-version). Version 2 adds the gateway ->
# backend frame kinds in V2_KINDS; version 1 has only the original six.
# Version 3 adds capabilities, each with its frame kind or field: "flow"
# (`window`, either direction), "move" (`resume`, gateway -> backend) and
# "fleet" (`resume.origin_instance_id`).
SUPPORTED_VERSIONS = (1, 2, 3)
V2_KINDS = frozenset({"detached", "attached"})
CAPABILITIES = ("flow", "move", "fleet")
COST_OVERHEAD = 64  # a data frame costs its payload length plus this (v3)
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
    # Fields 11-13, version 3 (read only when version 3 is chosen).
    capabilities: list[str] = field(default_factory=list)
    session_window: int = 0
    move_timeout_ms: int = 0

    def encode(self) -> bytes:
        return (enc_uint(1, self.min_version) + enc_uint(2, self.max_version)
                + enc_str(3, self.gateway_id) + enc_uint(4, self.link_index)
                + enc_str(5, self.instance_id)
                + enc_uint(6, self.heartbeat_interval_ms)
                + enc_uint(7, self.heartbeat_timeout_ms)
                + enc_uint(8, self.max_frame_size)
                + enc_uint(9, self.max_message_size)
                + enc_uint(10, self.client_queue_bytes)
                + b"".join(enc_bytes(11, c.encode(), always=True) for c in self.capabilities)
                + enc_uint(12, self.session_window)
                + enc_uint(13, self.move_timeout_ms))

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
            elif fno == 11:
                _want(fno, wt, WT_LEN, "Hello"); m.capabilities.append(_utf8(v, "Hello.capabilities"))
            elif fno == 12:
                _want(fno, wt, WT_VARINT, "Hello"); m.session_window = v
            elif fno == 13:
                _want(fno, wt, WT_VARINT, "Hello"); m.move_timeout_ms = v
        return m


@dataclass
class HelloAck:
    version: int = 0
    backend_id: str = ""
    error: str = ""
    # Version 3: the capabilities adopted, and the backend's per-session
    # window (0 = the same as Hello.session_window).
    capabilities: list[str] = field(default_factory=list)
    session_window: int = 0

    def encode(self) -> bytes:
        return (enc_uint(1, self.version) + enc_str(2, self.backend_id) + enc_str(3, self.error)
                + b"".join(enc_bytes(4, c.encode(), always=True) for c in self.capabilities)
                + enc_uint(5, self.session_window))

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
            elif fno == 4:
                _want(fno, wt, WT_LEN, "HelloAck"); m.capabilities.append(_utf8(v, "HelloAck.capabilities"))
            elif fno == 5:
                _want(fno, wt, WT_VARINT, "HelloAck"); m.session_window = v
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


TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


@dataclass
class SessionOpen:
    remote_addr: str = ""
    path: str = ""
    subprotocol: str = ""
    headers: list[Header] = field(default_factory=list)
    identity: str = ""
    # W3C traceparent for the backend's spans of this session (may be "").
    traceparent: str = ""

    def encode(self) -> bytes:
        out = enc_str(1, self.remote_addr) + enc_str(2, self.path) + enc_str(3, self.subprotocol)
        for h in self.headers:
            out += enc_bytes(4, h.encode(), always=True)
        return out + enc_str(5, self.identity) + enc_str(6, self.traceparent)

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
            elif fno == 6:
                _want(fno, wt, WT_LEN, "SessionOpen"); m.traceparent = _utf8(v, "SessionOpen.traceparent")
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


@dataclass
class Window:
    """Either direction, version 3 with "flow": the receiver's grant to the
    sender (``limit``, absolute, in bytes of cost from the session's start)
    and, with "move", how many of the sender's ``data`` frames it has
    received (``received``)."""
    limit: int = 0
    received: int = 0

    def encode(self) -> bytes:
        return enc_uint(1, self.limit) + enc_uint(2, self.received)

    @classmethod
    def decode(cls, buf: bytes) -> "Window":
        m = cls()
        for fno, wt, v in iter_fields(buf):
            if fno == 1:
                _want(fno, wt, WT_VARINT, "Window"); m.limit = v
            elif fno == 2:
                _want(fno, wt, WT_VARINT, "Window"); m.received = v
        return m


@dataclass
class SessionResume:
    """Gateway -> backend, version 3 with "move": the session, opened on a
    link that was lost, continues on this one. With "fleet",
    ``origin_instance_id`` names the gateway instance that opened it when
    that is not this link's (empty: this link's)."""
    open: SessionOpen = field(default_factory=SessionOpen)
    received: int = 0
    limit: int = 0
    origin_instance_id: str = ""

    def encode(self) -> bytes:
        return (enc_bytes(1, self.open.encode(), always=True)
                + enc_uint(2, self.received) + enc_uint(3, self.limit)
                + enc_str(4, self.origin_instance_id))

    @classmethod
    def decode(cls, buf: bytes) -> "SessionResume":
        m = cls()
        open_raw = b""  # a message field seen twice is merged
        for fno, wt, v in iter_fields(buf):
            if fno == 1:
                _want(fno, wt, WT_LEN, "SessionResume"); open_raw += v
            elif fno == 2:
                _want(fno, wt, WT_VARINT, "SessionResume"); m.received = v
            elif fno == 3:
                _want(fno, wt, WT_VARINT, "SessionResume"); m.limit = v
            elif fno == 4:
                _want(fno, wt, WT_LEN, "SessionResume")
                m.origin_instance_id = _utf8(v, "SessionResume.origin_instance_id")
        m.open = SessionOpen.decode(open_raw)
        return m


# Frame.body oneof: field number -> (name, message class). Fields 8 and 9
# exist only in version 2 (see V2_KINDS), 10 and 11 only in version 3 with
# a capability; an older peer would see them as a body-less frame.
BODY_FIELDS = {
    2: ("hello", Hello),
    3: ("hello_ack", HelloAck),
    4: ("open", SessionOpen),
    5: ("data", Data),
    6: ("close", SessionClose),
    7: ("heartbeat", Heartbeat),
    8: ("detached", SessionDetached),
    9: ("attached", SessionAttached),
    10: ("window", Window),
    11: ("resume", SessionResume),
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


def choose_version(min_version: int, max_version: int,
                   highest: int = SUPPORTED_VERSIONS[-1]) -> tuple[int, str]:
    """The version to answer a ``hello`` offering ``[min_version, max_version]``
    with: the highest one we speak (at most ``highest``) in that range, and ""
    -- or ``(0, error)`` when there is none (the caller then sends that and
    closes the link)."""
    ours = [v for v in SUPPORTED_VERSIONS if v <= highest]
    common = [v for v in ours if min_version <= v <= max_version]
    if common:
        return max(common), ""
    return 0, (f"no common version: gateway speaks [{min_version}, {max_version}], "
               f"backend speaks {', '.join(map(str, ours))}")


def data_cost(payload_len: int) -> int:
    """Version 3: what a ``data`` frame counts against a window."""
    return payload_len + COST_OVERHEAD


class ProtocolViolation(Exception):
    """The gateway broke the link protocol; the link must be closed."""


class FlowError(Exception):
    """The gateway broke a version-3 flow-control or move rule (the caller
    turns it into a protocol violation)."""


class FlowState:
    """One session's version-3 counters, both directions, without any I/O
    (the self-test drives it directly).

    Backend -> gateway (we send): the gateway's ``limit`` (initially
    ``hello.session_window``), our sent cost and count, and with "move" the
    frames not yet acknowledged (kept to be resent after a move).
    Gateway -> backend (we receive): the limit we granted (initially our
    window), what arrived (cost, count) and what our handler consumed.

    Everything counts from the session's start, across links; ``data``
    frames are numbered 1, 2, ... in each direction, and a frame resent
    after a move keeps its number (and is not counted again).
    """

    def __init__(self, send_window: int, recv_window: int, move: bool):
        self.move = move
        # we send
        self.send_window = send_window  # the gateway's initial grant
        self.send_limit = send_window
        self.sent_cost = 0
        self.sent_count = 0
        self.acked = 0                  # our frames the gateway acknowledged
        self.unacked: collections.deque = collections.deque()  # (number, cost, Data)
        self.unacked_cost = 0
        # we receive
        self.recv_window = recv_window  # our initial grant
        self.recv_limit = recv_window
        self.recv_cost = 0
        self.recv_count = 0
        self.consumed = 0

    # -- sending --

    def fits(self, cost: int) -> bool:
        return self.sent_cost + cost <= self.send_limit

    def never_fits(self, cost: int) -> bool:
        """True when no window can ever let this frame through: the gateway
        grants at most one window ahead of what it consumed."""
        return cost > self.send_window

    def record_sent(self, data: "Data") -> int:
        """Count a ``data`` frame we send; return its number."""
        cost = data_cost(len(data.payload))
        self.sent_cost += cost
        self.sent_count += 1
        if self.move:
            self.unacked.append((self.sent_count, cost, data))
            self.unacked_cost += cost
        return self.sent_count

    def _check(self, limit: int, received: int, what: str) -> None:
        """Raise FlowError if a window or resume breaks a rule; change nothing."""
        if limit < self.send_limit:
            raise FlowError(f"{what} limit {limit} is below the limit {self.send_limit} "
                            f"granted earlier (a window never goes down)")
        if not self.move:
            return  # `received` means nothing without move (it may be 0)
        if received < self.acked:
            raise FlowError(f"{what} acknowledges {received} data frames after it acknowledged "
                            f"{self.acked} (received never goes down)")
        if received > self.sent_count:
            raise FlowError(f"{what} acknowledges {received} data frames, but the backend "
                            f"sent only {self.sent_count}")
        # The README: a limit is at most consumed (<= received) + window, so
        # what we keep unacknowledged stays within the gateway's window.
        acked_cost = self.sent_cost - sum(c for n, c, _ in self.unacked if n > received)
        if limit - acked_cost > self.send_window:
            raise FlowError(
                f"{what} limit {limit} is {limit - acked_cost} bytes past what it "
                f"acknowledged ({received} frames, {acked_cost} bytes), more than "
                f"its window {self.send_window}: the backend's unacknowledged data "
                f"could exceed hello.session_window")

    def _apply(self, limit: int, received: int) -> None:
        self.send_limit = limit
        if self.move:
            while self.unacked and self.unacked[0][0] <= received:
                _, cost, _ = self.unacked.popleft()
                self.unacked_cost -= cost
            self.acked = received

    def on_window(self, limit: int, received: int) -> None:
        """A ``window`` from the gateway (raises FlowError on a violation)."""
        self._check(limit, received, "window")
        self._apply(limit, received)

    def on_resume(self, received: int, limit: int) -> list:
        """A ``resume``: return the ``(number, cost, Data)`` to resend, in order."""
        self._check(limit, received, "resume")
        self._apply(limit, received)
        return list(self.unacked)

    # -- receiving --

    def on_data(self, cost: int) -> None:
        """A ``data`` frame from the gateway (raises FlowError past our grant)."""
        self.recv_count += 1
        self.recv_cost += cost
        if self.recv_cost > self.recv_limit:
            raise FlowError(f"data #{self.recv_count} takes the gateway's sent cost to "
                            f"{self.recv_cost}, past the limit {self.recv_limit} the backend granted")

    def consume(self, cost: int) -> int | None:
        """Our handler took a message; return the new limit to grant, if the
        update rule says so (half a window or less left)."""
        self.consumed += cost
        if 2 * (self.recv_limit - self.consumed) <= self.recv_window:
            self.recv_limit = self.consumed + self.recv_window
            return self.recv_limit
        return None

    def window_frame(self) -> "Window":
        """The ``window`` we send: our grant and, with move, our count."""
        return Window(self.recv_limit, self.recv_count if self.move else 0)

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in (
            "send_window", "send_limit", "sent_cost", "sent_count", "acked", "unacked_cost",
            "recv_window", "recv_limit", "recv_cost", "recv_count", "consumed")}


def log(msg: str) -> None:
    print(f"[backend {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class SessionGone(Exception):
    """The session ended while its handler waited."""


class Session:
    """One session, in the backend's table shared by all links (keyed by
    (instance_id of the gateway instance that opened it, session_id)). It
    lives on one link at a time; with "move" it outlives that link for
    hello.move_timeout_ms.

    Its handler (``run``) takes the gateway's messages in order from
    ``inbox`` and consumes each one once its answer (the echo, or a
    command's output) has been handed to the link within the gateway's
    window: while the window is used up, the answer is held, nothing more is
    consumed, no window is granted, and the gateway pauses the client.
    """

    def __init__(self, backend: "Backend", key: tuple, sid: int, open_msg: SessionOpen,
                 link: "Link", flow: FlowState | None):
        self.b = backend
        self.key = key
        self.sid = sid
        self.open = open_msg
        self.link: Link | None = link
        self.flow = flow
        self.move = flow is not None and flow.move
        self.inbox: collections.deque = collections.deque()  # (Data, cost)
        self.inbox_cost = 0
        self.waiting_cost = 0  # an answer held for lack of window
        self.max_held = 0
        self.stalls = 0
        self.drop_next = 0  # cmd:drop: data to count as sent but not write
        self.closed = False
        self.expiry: asyncio.TimerHandle | None = None
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self.run())

    def note_held(self) -> None:
        held = self.inbox_cost + self.waiting_cost
        if held > self.max_held:
            self.max_held = held
            self.b.max_held_bytes = max(self.b.max_held_bytes, held)

    def counters(self) -> dict:
        out = {"session_id": self.sid, "link": self.link.id if self.link else None,
               "inbox": len(self.inbox), "inbox_cost": self.inbox_cost,
               "max_held_bytes": self.max_held, "stalls": self.stalls}
        if self.flow:
            out.update(self.flow.counters())
        return out

    # -- the handler --

    async def run(self) -> None:
        try:
            while not self.closed:
                if not self.inbox:
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                data, cost = self.inbox[0]
                await self.handle(data)
                if self.closed:
                    return
                self.inbox.popleft()
                self.inbox_cost -= cost
                self.consume(cost)
        except SessionGone:
            pass
        except Exception as e:  # e.g. a cmd:big above --max-frame
            log(f"session {self.sid}: handler failed: {e!r}; closing it with 1011")
            if self.link is not None and not self.closed:
                link = self.link
                self.b.end_session(self, ours=(1011, "backend handler failed"))
                link.send_nowait(Frame(self.sid, "close", SessionClose(1011, "backend handler failed")))

    def consume(self, cost: int) -> None:
        if not self.flow:
            return
        grant = self.flow.consume(cost)
        if grant is not None and self.link is not None:
            # without a link, the answer to the resume will carry the grant
            self.link.send_window(self)

    async def wait_link(self) -> "Link":
        while True:
            if self.closed:
                raise SessionGone()
            if self.link is not None and not self.link.closing():
                return self.link
            self.wake.clear()
            await self.wake.wait()

    async def send_data(self, payload: bytes, text: bool) -> None:
        """Send one ``data`` when the gateway's window allows (hold it until
        then), on whatever link the session is on by then."""
        data = Data(payload, text)
        cost = data_cost(len(payload))
        held = False
        while True:
            link = await self.wait_link()
            if self.flow is None or self.flow.fits(cost):
                break
            if self.flow.never_fits(cost):
                link.log(f"session {self.sid}: a {cost}-byte data can never fit the gateway's "
                         f"window ({self.flow.send_window}); sending it anyway")
                break
            if not held:
                held = True
                self.stalls += 1
                self.b.stalls += 1
                self.waiting_cost = cost
                self.note_held()
            self.wake.clear()
            await self.wake.wait()
        self.waiting_cost = 0
        if self.flow:
            self.flow.record_sent(data)
            if self.flow.unacked_cost > self.b.max_unacked_bytes:
                self.b.max_unacked_bytes = self.flow.unacked_cost
        if self.drop_next > 0:
            # cmd:drop: lost "in flight"; then the link must go at once, before
            # any later frame could be taken for this one.
            self.drop_next -= 1
            if self.drop_next == 0:
                link.reset("cmd:drop")
            return
        link.send_nowait(Frame(self.sid, "data", data))
        await link.drain()

    async def handle(self, data: Data) -> None:
        if data.text:
            text = data.payload.decode("utf-8")  # checked by the reader
            if text.startswith("cmd:"):
                await self.command(text)
                return
        await self.send_data(data.payload, data.text)  # echo

    async def close(self, code: int, reason: str) -> None:
        link = await self.wait_link()
        self.b.end_session(self, ours=(code, reason))
        link.send_nowait(Frame(self.sid, "close", SessionClose(code, reason)))
        await link.drain()

    async def command(self, text: str) -> None:
        parts = text.split(":", 3)
        cmd = parts[1] if len(parts) > 1 else ""
        try:
            if cmd == "close":
                code = int(parts[2])
                reason = parts[3] if len(parts) > 3 else ""
                await self.close(code, reason)
            elif cmd == "push":
                for i in range(int(parts[2])):
                    await self.send_data(f"push-{i}".encode(), False)
            elif cmd == "flood":
                n, size = int(parts[2]), int(parts[3])
                limit = self.link.hello.max_message_size if self.link and self.link.hello else 0
                if size < 8 or (limit and size > limit):
                    raise ValueError(f"SIZE must be 8 to {limit or 'max_message_size'}")
                filler = b"f" * (size - 8)
                for i in range(n):
                    await self.send_data(i.to_bytes(8, "big") + filler, False)
            elif cmd == "freeze":
                link = await self.wait_link()
                link.freeze(float(parts[2]))
            elif cmd == "stall":
                # Take nothing more (no echo, no window) for that long.
                seconds = float(parts[2])
                self.b.events.append(("stall", self.sid, seconds))
                await asyncio.sleep(seconds)
            elif cmd == "drop":
                if not self.move:
                    raise ValueError("needs the move capability")
                self.drop_next = int(parts[2])
                if self.drop_next < 1:
                    raise ValueError("N must be at least 1")
            elif cmd == "stats":
                await self.send_data(json.dumps(self.b.stats()).encode(), True)
            elif cmd == "session":
                await self.send_data(json.dumps(self.counters()).encode(), True)
            elif cmd == "big":
                await self.send_data(b"x" * int(parts[2]), False)
            elif cmd == "badutf8":
                await self.send_data(b"bad \xff\xfe utf-8", True)
            elif cmd == "overrun":
                await self.overrun()
            elif cmd == "foreign":
                link = await self.wait_link()
                foreign = (1 << 63) + link.id  # never chosen by the gateway in tests
                link.send_nowait(Frame(foreign, "data", Data(b"foreign", False)))
                await self.send_data(b"foreign-sent", True)
            elif cmd == "badclose":
                # close for this session whose reason is not UTF-8: framed
                # correctly, so the gateway must end only this session
                # (close{1011} back to us) and keep the link.
                link = await self.wait_link()
                body = enc_uint(1, self.sid) + enc_bytes(
                    6, enc_uint(1, 1000) + enc_bytes(2, b"bye \xff"), always=True)
                link.send_raw_nowait(frame_prefix(self.b.framing, len(body)) + body)
                await link.drain()
            elif cmd == "violate":
                link = await self.wait_link()
                await link.violate(self.sid, parts[2] if len(parts) > 2 else "")
            else:
                await self.send_data(f"cmd-error: unknown command {text!r}".encode(), True)
        except (ValueError, IndexError) as e:
            await self.send_data(f"cmd-error: {text!r}: {e}".encode(), True)

    async def overrun(self) -> None:
        """Deliberately send past the gateway's window: it must end this
        session (1011 to the client, close{1011, ...} to us)."""
        if not self.flow:
            raise ValueError("no flow control on this link")
        link = await self.wait_link()
        link.log(f"session {self.sid}: deliberately sending past the gateway's window")
        chunk = 60_000
        if link.hello and link.hello.max_message_size:
            chunk = min(chunk, link.hello.max_message_size)
        # Past the limit we know by many windows, in one write: the gateway
        # grants more as its client takes messages, and data within a newer
        # grant is no overrun; one burst arrives faster than any client
        # takes it.
        past = self.flow.send_limit + 32 * self.flow.send_window
        burst = []
        while self.flow.sent_cost <= past and not self.closed:
            data = Data(b"o" * chunk, False)
            self.flow.record_sent(data)
            burst.append(encode_wire(self.b.framing, Frame(self.sid, "data", data)))
        await link.send_raw(b"".join(burst))


class Backend:
    def __init__(self, framing: str, max_frame: int, heartbeat: float, verbose: bool,
                 max_version: int = SUPPORTED_VERSIONS[-1],
                 caps: tuple[str, ...] = CAPABILITIES, window: int = 0):
        self.framing = framing
        self.max_frame = max_frame
        self.heartbeat = heartbeat
        self.verbose = verbose
        self.max_version = max_version
        self.caps = caps      # the capabilities we adopt when offered
        self.window = window  # our session_window (0: the gateway's)
        self.links: dict[int, "Link"] = {}
        self.links_total = 0
        self.violations = 0
        # The session table, shared by all links: (instance_id, session_id)
        # -> Session, instance_id being the opening instance's (fleet: kept
        # when the session moves to another instance; "link N" for a gateway
        # that sends none).
        self.sessions: dict[tuple, Session] = {}
        # Sessions we closed, with our code and reason (answered again to a
        # resume), and sessions the gateway closed; the most recent 100,000.
        self.closed_by_us: collections.OrderedDict = collections.OrderedDict()
        self.closed_by_gateway: collections.OrderedDict = collections.OrderedDict()
        self.closes: collections.deque = collections.deque(maxlen=100)
        self.opens: collections.deque = collections.deque(maxlen=100)
        self.sessions_lost = 0      # sessions ended by the loss of their link
        self.heartbeats_received = 0
        self.heartbeats_sent = 0
        self.heartbeat_acks = 0     # answers to our own heartbeats
        self.detaches = 0           # `detached` frames received (version 2)
        self.attaches = 0           # `attached` frames received (version 2)
        # version 3
        self.windows_sent = 0
        self.windows_received = 0
        self.stalls = 0             # answers held for lack of the gateway's window
        self.max_held_bytes = 0     # per session: unconsumed input + held answer
        self.max_unacked_bytes = 0  # per session: kept for resending (move)
        self.resumes_answered = 0   # resume answered with window (session moved)
        self.resumes_refused = 0    # resume answered with close
        self.frames_resent = 0
        self.fleet_moves = 0        # resumes answered on a link not of the session's origin (fleet)
        self.sessions_kept = 0      # sessions kept when their link was lost (move)
        self.sessions_expired = 0   # ... and forgotten after move_timeout_ms
        self.links_reset = 0        # --reset-links-every
        # the last 100 [kind, session_id, detail] for detached/attached (detail:
        # the reason / the replayed count), stall (seconds), moved ([old link,
        # new link, resume.received, our sent count, our received count]),
        # resume_refused (the code)
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
            "sessions": len(self.sessions),
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
            "events": [list(e) for e in self.events],
            "hellos": list(self.hellos),
            "framing": self.framing,
            # version 3: per link [id, version, capabilities]
            "link_versions": [[l.id, l.version, list(l.caps)] for l in self.links.values()],
            "windows_sent": self.windows_sent,
            "windows_received": self.windows_received,
            "stalls": self.stalls,
            "max_held_bytes": self.max_held_bytes,
            "max_unacked_bytes": self.max_unacked_bytes,
            "resumes_answered": self.resumes_answered,
            "resumes_refused": self.resumes_refused,
            "frames_resent": self.frames_resent,
            "fleet_moves": self.fleet_moves,
            "sessions_kept": self.sessions_kept,
            "sessions_expired": self.sessions_expired,
            "links_reset": self.links_reset,
        }

    @staticmethod
    def _remember(table: collections.OrderedDict, key: tuple, value) -> None:
        table[key] = value
        if len(table) > 100_000:
            table.popitem(last=False)

    def end_session(self, sess: Session, ours: tuple[int, str] | None = None,
                    by_gateway: bool = False) -> None:
        """Forget a session: closed by us (``ours`` = (code, reason)), by the
        gateway, or lost with its link."""
        if sess.closed:
            return
        sess.closed = True
        self.sessions.pop(sess.key, None)
        if sess.expiry:
            sess.expiry.cancel()
        link = sess.link
        if link is not None:
            link.sessions.pop(sess.sid, None)
            (link.closed_by_us if ours else link.closed_by_peer).add(sess.sid)
        if ours:
            self._remember(self.closed_by_us, sess.key, ours)
        if by_gateway:
            self._remember(self.closed_by_gateway, sess.key, True)
        sess.wake.set()
        if sess.task is not asyncio.current_task():
            sess.task.cancel()

    def link_lost(self, link: "Link", keep: bool) -> tuple[int, int]:
        """The link ended: keep its sessions for move_timeout_ms (``keep``),
        or end them (as a close 1006). Returns (kept, ended)."""
        kept = ended = 0
        for sess in list(link.sessions.values()):
            link.sessions.pop(sess.sid, None)
            if keep:
                sess.link = None
                sess.expiry = asyncio.get_running_loop().call_later(
                    link.hello.move_timeout_ms / 1000, self.expire, sess)
                sess.wake.set()
                kept += 1
            else:
                sess.link = None
                self.end_session(sess)
                if link.poisoned:
                    # a resume gets close 1012, as the link's end gave in v2
                    self._remember(self.closed_by_us, sess.key,
                                   (1012, "its link ended with a protocol violation"))
                ended += 1
        self.sessions_kept += kept
        self.sessions_lost += ended
        return kept, ended

    def expire(self, sess: Session) -> None:
        if sess.link is None and not sess.closed:
            log(f"session {sess.sid} not resumed within move_timeout: forgotten (as a close 1006)")
            self.sessions_expired += 1
            self.sessions_lost += 1
            self.end_session(sess)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(self, next(self._link_ids), reader, writer)
        link.task = asyncio.current_task()
        self.links[link.id] = link
        self.links_total += 1
        try:
            await link.run()
        finally:
            del self.links[link.id]

    async def reset_loop(self, period: float) -> None:
        """--reset-links-every: abort every link with a TCP RST."""
        while True:
            await asyncio.sleep(period)
            for link in list(self.links.values()):
                link.reset()


class Link:
    """One TCP connection from the gateway, with the sessions now on it."""

    def __init__(self, backend: Backend, link_id: int,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.b = backend
        self.id = link_id
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.sessions: dict[int, Session] = {}  # sessions on this link now
        self.closed_by_us: set[int] = set()    # late frames for these: ignore
        self.closed_by_peer: set[int] = set()  # frames for these: violation
        self.moved_away: set[int] = set()      # resumed on another link: ignore
        self.hello: Hello | None = None
        self.instance = f"link {link_id}"  # hello.instance_id, when it has one
        self.version = 0  # negotiated in the handshake (0 until then)
        self.caps: tuple[str, ...] = ()  # the capabilities we adopted
        self.flow = False
        self.move = False
        self.fleet = False
        self.recv_window = 0  # what we grant each session at its start (flow)
        self.poisoned = False  # a protocol violation ended (or will end) it
        self.reset_by_us = False
        self.frozen_until = 0.0  # cmd:freeze: a black hole until then
        self.frozen_writes = 0
        self.pending_nonces: set[int] = set()
        self.nonces = itertools.count(1)
        self.task: asyncio.Task | None = None

    def log(self, msg: str) -> None:
        log(f"link {self.id} ({self.peer}): {msg}")

    def violation(self, msg: str) -> ProtocolViolation:
        self.b.violations += 1
        self.poisoned = True
        print(f"PROTOCOL VIOLATION: link {self.id} ({self.peer}): {msg}",
              file=sys.stderr, flush=True)
        return ProtocolViolation(msg)

    def closing(self) -> bool:
        return self.writer.transport.is_closing()

    def reset(self, why: str = "--reset-links-every") -> None:
        """Abort the connection with a TCP RST (SO_LINGER on, timeout 0)."""
        sock = self.writer.get_extra_info("socket")
        if sock is None or self.closing():
            return
        self.log(f"resetting the connection ({why})")
        self.reset_by_us = True
        self.b.links_reset += 1
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as e:
            self.log(f"SO_LINGER: {e!r}")
        self.writer.transport.abort()

    def freeze(self, seconds: float) -> None:
        """cmd:freeze: for that long, read nothing and drop everything we
        write (a black hole: the gateway declares the link dead by heartbeat
        timeout and moves its sessions while the link still looks up here)."""
        self.log(f"frozen for {seconds} s (cmd:freeze)")
        self.frozen_until = time.monotonic() + seconds

    def frozen(self) -> bool:
        return time.monotonic() < self.frozen_until

    # -- writing: one frame is one write() call, so frames never interleave,
    # and all writes happen in program order on the event loop. The reader
    # only writes without waiting (send_nowait), so it keeps reading while
    # the link is backed up (what it writes is bounded by the windows). --

    def send_nowait(self, frame: Frame) -> None:
        body = frame.encode()
        if len(body) > self.b.max_frame:
            raise RuntimeError(f"refusing to send a {len(body)}-byte frame (max {self.b.max_frame})")
        self.send_raw_nowait(frame_prefix(self.b.framing, len(body)) + body)
        if self.b.verbose:
            self.log(f"sent {frame.kind} session={frame.session_id}")

    def send_raw_nowait(self, raw: bytes) -> None:
        if self.frozen():
            self.frozen_writes += 1
        elif not self.closing():
            self.writer.write(raw)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass  # the reader sees the end of the link and deals with it

    async def send(self, frame: Frame) -> None:
        self.send_nowait(frame)
        await self.drain()

    async def send_raw(self, raw: bytes) -> None:
        self.send_raw_nowait(raw)
        await self.drain()

    def send_window(self, sess: Session) -> None:
        assert sess.flow is not None
        self.send_nowait(Frame(sess.sid, "window", sess.flow.window_frame()))
        self.b.windows_sent += 1

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
                if self.frozen():
                    # as if this frame (and all after it) were still unread
                    await asyncio.sleep(self.frozen_until - time.monotonic())
                    self.log(f"thawed; {self.frozen_writes} frame(s) were dropped meanwhile")
                if self.b.verbose:
                    self.log(f"received {frame.kind} session={frame.session_id}")
                if self.hello is None:
                    await self.on_first(frame)
                    if self.b.heartbeat > 0:
                        hb_task = asyncio.create_task(self.heartbeat_loop())
                else:
                    self.on_frame(frame)
        except ProtocolViolation as e:
            why = f"protocol violation: {e}"
        except asyncio.IncompleteReadError:
            why = "connection ended in the middle of a frame"
        except (ConnectionError, OSError) as e:
            why = f"connection error: {e!r}"
        finally:
            if self.reset_by_us:
                why = "reset by the backend"
            if hb_task:
                hb_task.cancel()
            self.writer.close()
            # Without move, the end of the link is a close(1006) of every
            # session on it; with move, its sessions wait move_timeout_ms for
            # a resume (unless a protocol violation ended the link).
            keep = self.move and not self.poisoned
            kept, ended = self.b.link_lost(self, keep)
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError, asyncio.CancelledError):
                pass
            if keep:
                self.log(f"disconnected ({why}); {kept} session(s) kept for "
                         f"{self.hello.move_timeout_ms} ms, waiting for a resume")
            else:
                self.log(f"disconnected ({why}); {ended} session(s) ended with 1006")

    async def on_first(self, frame: Frame) -> None:
        if frame.kind != "hello":
            raise self.violation(f"first frame is {frame.kind or 'body-less'}, not hello")
        if frame.session_id != 0:
            raise self.violation(f"hello with session_id {frame.session_id}")
        h = frame.body
        assert isinstance(h, Hello)
        self.hello = h
        if h.instance_id:
            self.instance = h.instance_id
        self.b.hellos.append(dict(h.__dict__))
        self.log(f"hello from gateway {h.gateway_id!r} instance {h.instance_id!r} "
                 f"link_index={h.link_index} versions [{h.min_version}, {h.max_version}] "
                 f"heartbeat {h.heartbeat_interval_ms} ms max_frame {h.max_frame_size}")
        if h.max_frame_size and h.max_frame_size != self.b.max_frame:
            # Not a violation (the gateway may be configured differently);
            # the README says both sides must use the same maximum.
            self.log(f"gateway max_frame_size {h.max_frame_size} differs from ours "
                     f"({self.b.max_frame})")
        version, err = choose_version(h.min_version, h.max_version, self.b.max_version)
        if not version:
            await self.send(Frame(0, "hello_ack", HelloAck(0, BACKEND_ID, err)))
            raise self.violation(f"bad hello range: {err}")
        self.version = version
        ack = HelloAck(version, BACKEND_ID)
        if version >= 3:
            self.check_v3_hello(h)
            caps = tuple(c for c in self.b.caps if c in h.capabilities)
            if "move" in caps and "flow" not in caps:
                self.log("adopting move without flow: the gateway must refuse this handshake")
            if "fleet" in caps and "move" not in caps:
                # "Adopt it only with move" (README, fleet)
                caps = tuple(c for c in caps if c != "fleet")
            self.caps = caps
            self.flow = "flow" in caps
            self.move = self.flow and "move" in caps
            self.fleet = self.move and "fleet" in caps
            ack.capabilities = list(caps)
            if self.flow:
                ack.session_window = self.b.window
                self.recv_window = self.b.window or h.session_window
                if self.recv_window < h.max_message_size + COST_OVERHEAD:
                    self.log(f"our session_window {self.recv_window} is below max_message_size "
                             f"+ 64: the gateway must refuse this handshake")
        await self.send(Frame(0, "hello_ack", ack))
        self.log(f"speaking version {version}"
                 + (f", capabilities {list(self.caps)}, windows: ours {self.recv_window}, "
                    f"the gateway's {h.session_window}, move_timeout {h.move_timeout_ms} ms"
                    if version >= 3 else ""))

    def check_v3_hello(self, h: Hello) -> None:
        """What a version-3 hello must say (README, "Negotiation")."""
        offered = h.capabilities
        if "move" in offered and "flow" not in offered:
            raise self.violation(f"hello offers move without flow: {offered}")
        if "flow" in offered:
            if h.session_window == 0:
                raise self.violation("hello offers flow with session_window 0")
            if h.max_message_size and h.session_window < h.max_message_size + COST_OVERHEAD:
                # The backend could never send a maximal message.
                raise self.violation(f"hello.session_window {h.session_window} is below "
                                     f"max_message_size + 64 ({h.max_message_size + 64})")
        if "fleet" in offered and "move" not in offered:
            # The README says fleet needs move but not that offering it
            # alone is wrong: not a violation, and we do not adopt it.
            self.log(f"hello offers fleet without move: {offered}")
        if "move" in offered:
            if h.move_timeout_ms == 0:
                raise self.violation("hello offers move with move_timeout_ms 0")
            if not h.instance_id:
                raise self.violation("hello offers move without an instance_id")

    def on_frame(self, frame: Frame) -> None:
        sid, kind, body = frame.session_id, frame.kind, frame.body
        if kind is None:
            raise self.violation(f"body-less frame (session_id {sid})")
        if kind in ("hello", "hello_ack"):
            raise self.violation(f"unexpected {kind} after the handshake")
        if kind in V2_KINDS and self.version < 2:
            raise self.violation(f"{kind} frame (session_id {sid}) on a version-{self.version} link")
        if kind == "window" and not self.flow:
            raise self.violation(f"window (session_id {sid}) on a link without flow")
        if kind == "resume" and not self.move:
            raise self.violation(f"resume (session_id {sid}) on a link without move")
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
                self.send_nowait(Frame(0, "heartbeat", Heartbeat(body.nonce, True)))
            return
        # open / data / close / detached / attached / window / resume
        if sid == 0:
            raise self.violation(f"{kind} with session_id 0")
        if sid in self.closed_by_peer:
            raise self.violation(f"{kind} for session {sid} after the gateway closed it")
        if kind == "resume":
            assert isinstance(body, SessionResume)
            self.on_resume(sid, body)
            return
        if kind == "open":
            assert isinstance(body, SessionOpen)
            self.on_open(sid, body)
            return
        if sid in self.closed_by_us:
            return  # crossed our own close: accept and ignore (checklist 6)
        if sid in self.moved_away:
            return  # sent before the gateway gave this link up: it resends them
        sess = self.sessions.get(sid)
        if sess is None:
            raise self.violation(f"{kind} for session {sid}, which was never opened on this link")
        if kind == "close":
            assert isinstance(body, SessionClose)
            self.b.end_session(sess, by_gateway=True)
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
        if kind == "window":
            assert isinstance(body, Window) and sess.flow is not None
            self.b.windows_received += 1
            try:
                sess.flow.on_window(body.limit, body.received)
            except FlowError as e:
                raise self.violation(f"session {sid}: {e}")
            sess.wake.set()
            return
        assert kind == "data" and isinstance(body, Data)
        if body.text:
            try:
                body.payload.decode("utf-8")
            except UnicodeDecodeError as e:
                raise self.violation(f"text data for session {sid} is not valid UTF-8: {e}")
        cost = data_cost(len(body.payload))
        if self.hello.max_message_size and len(body.payload) > self.hello.max_message_size:
            raise self.violation(f"data for session {sid} of {len(body.payload)} bytes, above "
                                 f"max_message_size {self.hello.max_message_size}")
        if sess.flow:
            try:
                sess.flow.on_data(cost)
            except FlowError as e:
                raise self.violation(f"session {sid}: {e}")
        sess.inbox.append((body, cost))
        sess.inbox_cost += cost
        sess.note_held()
        sess.wake.set()

    def on_open(self, sid: int, body: SessionOpen) -> None:
        key = (self.instance, sid)
        if (sid in self.sessions or sid in self.closed_by_us or key in self.b.sessions
                or key in self.b.closed_by_us or key in self.b.closed_by_gateway):
            raise self.violation(f"duplicate open for session {sid}")
        flow = None
        if self.flow:
            flow = FlowState(self.hello.session_window, self.recv_window, self.move)
        sess = Session(self.b, key, sid, body, self, flow)
        self.sessions[sid] = sess
        self.b.sessions[key] = sess
        self.b.opens.append({
            "session_id": sid,
            "remote_addr": body.remote_addr,
            "path": body.path,
            "subprotocol": body.subprotocol,
            "headers": [[h.name, h.value] for h in body.headers],
            "identity": body.identity,
            "traceparent": body.traceparent,
            # The contract: a 55-character version-00 value, or empty.
            "traceparent_valid": body.traceparent == "" or bool(TRACEPARENT.fullmatch(body.traceparent)),
        })
        if self.b.verbose:
            self.log(f"open session {sid} path={body.path!r} from {body.remote_addr}")

    def on_resume(self, sid: int, body: SessionResume) -> None:
        """README, "Sessions that outlive their link": move the session here,
        answer window{limit, received} first, then resend our data from
        resume.received + 1; or answer close for a session we do not know."""
        key = self.resume_key(sid, body)
        if sid in self.sessions:
            if self.sessions[sid].key != key:
                raise self.violation(f"resume for session {key}, while session "
                                     f"{self.sessions[sid].key} with the same id is open "
                                     f"on this link (frames cannot tell them apart)")
            raise self.violation(f"resume for session {sid}, which is open on this very link")
        if sid in self.closed_by_us:
            raise self.violation(f"resume for session {sid} twice on this link")
        if key in self.b.closed_by_gateway:
            raise self.violation(f"resume for session {sid}, which the gateway closed")
        sess = self.b.sessions.get(key)
        if sess is None:
            code, reason = self.b.closed_by_us.get(
                key, (1012, "session unknown to this backend (never opened here, or forgotten)"))
            self.log(f"resume for session {sid}, which this backend does not know: close {code}")
            self.closed_by_us.add(sid)
            self.b.resumes_refused += 1
            self.b.events.append(("resume_refused", sid, code))
            self.send_nowait(Frame(sid, "close", SessionClose(code, reason)))
            return
        if sess.link is not None and sess.link is not self and sess.link.poisoned:
            # Its link broke the protocol on purpose (cmd:violate), and the
            # gateway resumed the session here before that link's end was
            # handled: it ends with that link all the same, as
            # `link_lost` would have recorded (close 1012).
            self.b.link_lost(sess.link, False)
            self.log(f"resume for session {sid}, whose link broke the protocol: close 1012")
            self.closed_by_us.add(sid)
            self.b.resumes_refused += 1
            self.b.events.append(("resume_refused", sid, 1012))
            self.send_nowait(Frame(sid, "close", SessionClose(
                1012, "its link ended with a protocol violation")))
            return
        if not sess.move:
            raise self.violation(f"resume for session {sid}, opened on a link without move")
        if body.open != sess.open:
            raise self.violation(f"resume for session {sid} carries an open that differs "
                                 f"from the original: {body.open} != {sess.open}")
        assert sess.flow is not None
        try:
            resend = sess.flow.on_resume(body.received, body.limit)
        except FlowError as e:
            raise self.violation(f"session {sid}: {e}")
        old = sess.link
        if old is not None:
            # the gateway gave that link up, even if it still looks up to us
            # (with fleet: another instance's link, up, that handed it over)
            old.sessions.pop(sid, None)
            old.moved_away.add(sid)
        if sess.expiry:
            sess.expiry.cancel()
            sess.expiry = None
        sess.link = self
        self.sessions[sid] = sess
        # A fleet session may come back to a link it left, still up: what
        # arrives there from now on (after this resume) is its own again.
        self.moved_away.discard(sid)
        if key[0] != self.instance:
            self.b.fleet_moves += 1
        self.send_window(sess)
        for _, _, data in resend:
            self.send_nowait(Frame(sid, "data", data))
        self.b.frames_resent += len(resend)
        self.b.resumes_answered += 1
        self.b.events.append(("moved", sid, [old.id if old else None, self.id, body.received,
                                             sess.flow.sent_count, sess.flow.recv_count]))
        if self.b.verbose or resend:
            self.log(f"session {sid} moved here from link {old.id if old else '(lost)'}: "
                     f"the gateway had {body.received} of our {sess.flow.sent_count} data, "
                     f"we have {sess.flow.recv_count} of its; resent {len(resend)}")
        sess.wake.set()

    def resume_key(self, sid: int, body: SessionResume) -> tuple:
        """The session a ``resume`` names (README, "fleet"): (its origin
        instance if set, else this link's instance, session id)."""
        origin = body.origin_instance_id
        if not origin:
            return (self.instance, sid)
        if not self.fleet:
            # The README says this never happens; a backend that does not
            # know the field keys by this link's instance (and answers close).
            self.log(f"resume for session {sid} names origin instance {origin!r} on a link "
                     f"without fleet: ignoring the field, as a backend without fleet would")
            return (self.instance, sid)
        return (origin, sid)

    async def violate(self, sid: int, kind: str) -> None:
        """Deliberately break the protocol (the gateway must close the link);
        ``sid`` is the session that asked for it."""
        self.log(f"deliberately sending a '{kind}' violation")
        self.poisoned = True  # its sessions end with the link, even with move
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
        elif kind == "window0":
            await self.send(Frame(0, "window", Window(1 << 20, 0)))
        elif kind == "window":
            # a window for this session on a link without flow
            await self.send(Frame(sid, "window", Window(1 << 20, 0)))
        elif kind == "resume":
            await self.send(Frame(sid, "resume", SessionResume(SessionOpen(), 0, 1 << 20)))
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
            self.poisoned = False
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


def parse_caps(s: str) -> tuple[str, ...]:
    if s.strip() in ("", "none"):
        return ()
    caps = tuple(c.strip() for c in s.split(",") if c.strip())
    for c in caps:
        if c not in CAPABILITIES:
            raise argparse.ArgumentTypeError(
                f"unknown capability {c!r} (known: {', '.join(CAPABILITIES)}, none)")
    return caps


async def serve(args: argparse.Namespace) -> int:
    backend = Backend(args.framing, args.max_frame, args.heartbeat, args.verbose,
                      args.max_version, args.caps, args.window)
    host, port = args.listen
    server = await asyncio.start_server(backend.handle, host, port, limit=1 << 16)
    sock = server.sockets[0]
    addr = sock.getsockname()
    shown = f"[{addr[0]}]" if sock.family == socket.AF_INET6 else addr[0]
    print(f"listening {shown}:{addr[1]}", flush=True)
    log(f"framing={args.framing} max_frame={args.max_frame} heartbeat={args.heartbeat}s "
        f"max_version={args.max_version} caps={','.join(args.caps) or 'none'} "
        f"window={args.window or 'the gateway'}"
        + (f" reset_links_every={args.reset_links_every}s" if args.reset_links_every else ""))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    resetter = None
    if args.reset_links_every > 0:
        resetter = asyncio.create_task(backend.reset_loop(args.reset_links_every))
    async with server:
        await stop.wait()
        if resetter:
            resetter.cancel()
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
    # varint (f20), i64 (f21), len (f22), group (f23, containing a varint),
    # i32 (f24). (Fields 8 and 9 of Frame are known since version 2, 10 and
    # 11 since version 3.)
    unknown = h("a0 01 96 01" "a9 01 0102030405060708" "b2 01 03 616263" "bb 01 08 01 bc 01"
                "c5 01 01020304")
    f = Frame.decode(unknown + h("08 05") + unknown + h("2a 0a") + unknown[:4] + h("0a 02 68 69 10 01"))
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
    assert choose_version(2, 3) == (3, "")
    assert choose_version(1, 3, highest=2) == (2, "")
    assert choose_version(2, 2) == (2, "")
    assert choose_version(3, 4) == (3, "")
    for lo, hi, top in ((4, 5, 3), (0, 0, 3), (2, 1, 3), (3, 3, 2)):
        v, err = choose_version(lo, hi, top)
        assert v == 0 and "no common version" in err, (lo, hi, v, err)

    self_test_v3(h)
    # The links log as they would in service; shown only if the test fails.
    logged = io.StringIO()
    try:
        with contextlib.redirect_stderr(logged):
            asyncio.run(self_test_fleet(h))
    except BaseException:
        sys.stderr.write(logged.getvalue())
        raise
    print("self-test OK")
    return 0


def self_test_v3(h) -> None:
    """Version 3: encoding (the README's window example), and the window /
    acknowledgement bookkeeping of FlowState, on the README's examples."""
    # The README's window frame, byte for byte.
    frame = Frame(5, "window", Window(9_192, 5))
    assert frame.encode() == h("08 05 52 05 08 e8 47 10 05"), frame.encode().hex(" ")
    assert encode_wire("varint", frame) == h("09 08 05 52 05 08 e8 47 10 05")
    assert Frame.decode(h("08 05 52 05 08 e8 47 10 05")) == frame
    assert Frame.decode(h("08 05 52 00")) == Frame(5, "window", Window(0, 0))
    # resume: field 11 of Frame; open 1 (message), received 2, limit 3.
    op = SessionOpen("1.2.3.4:5", "/ws")
    f = Frame(5, "resume", SessionResume(op, 9, 40_000))
    assert f.encode() == (h("08 05 5a") + encode_varint(2 + len(op.encode()) + 6)
                          + h("0a") + encode_varint(len(op.encode())) + op.encode()
                          + h("10 09 18 c0 b8 02")), f.encode().hex(" ")
    assert Frame.decode(f.encode()) == f
    # an empty open is still present (`0a 00`), and a split open is merged
    assert Frame(5, "resume", SessionResume()).encode() == h("08 05 5a 02 0a 00")
    split = h("08 05 5a 0e 0a 05 0a 03 61 3a 31 10 02 0a 03 12 01 2f")
    assert Frame.decode(split) == Frame(5, "resume", SessionResume(SessionOpen("a:1", "/"), 2))
    # hello fields 11-13 and hello_ack fields 4-5
    hello = Hello(1, 3, "gw", 0, "ab" * 16, 5000, 15000, 1_052_672, 1 << 20, 4 << 20,
                  ["flow", "move"], 4 << 20, 10_000)
    assert Frame.decode(Frame(0, "hello", hello).encode()).body == hello
    assert hello.encode().endswith(h("5a 04 66 6c 6f 77 5a 04 6d 6f 76 65 60 80 80 80 02 68 90 4e"))
    ack = HelloAck(3, "be", "", ["flow"], 2 << 20)
    assert ack.encode() == h("08 03 12 02 62 65 22 04 66 6c 6f 77 28 80 80 80 01")
    assert Frame.decode(Frame(0, "hello_ack", ack).encode()).body == ack
    # wrong wire types: window as a varint, Window.limit as bytes, resume's
    # open as a varint, SessionResume.received as bytes
    for bad in ("50 01", "52 02 0a 00", "5a 02 08 01", "5a 02 12 00"):
        try:
            Frame.decode(h("08 05 " + bad))
        except DecodeError:
            pass
        else:
            raise AssertionError(f"accepted malformed frame {bad}")

    def fails(fn, *a) -> str:
        try:
            fn(*a)
        except FlowError as e:
            return str(e)
        raise AssertionError(f"{fn.__name__}{a} did not fail")

    # The README's window example: both windows 6,000; 1,000-byte messages.
    W = 6_000
    fs = FlowState(W, W, move=True)
    msgs = [Data(bytes([i]) * 1_000) for i in range(1, 11)]
    sent = 0
    while fs.fits(data_cost(1_000)):
        fs.record_sent(msgs[sent]); sent += 1
    assert sent == 5 and fs.sent_cost == 5_320 and fs.unacked_cost == 5_320
    fs.on_window(9_192, 5)  # the gateway read #1-#3 and received #1-#5
    assert fs.acked == 5 and fs.unacked_cost == 0 and not fs.unacked
    while fs.fits(data_cost(1_000)):
        fs.record_sent(msgs[sent]); sent += 1
    assert sent == 8 and fs.sent_cost == 8_512
    fs.on_window(9_192, 5)  # the same window twice is fine
    # violations: a limit going down, an acknowledgement going down or past
    # what was sent, a limit more than a window past what was acknowledged
    assert "never goes down" in fails(FlowState.on_window, fs, 9_000, 6)
    assert "never goes down" in fails(FlowState.on_window, fs, 9_192, 4)
    assert "only 8" in fails(FlowState.on_window, fs, 9_192, 9)
    assert "hello.session_window" in fails(FlowState.on_window, fs, 5 * 1_064 + W + 1, 5)
    fs.on_window(5 * 1_064 + W, 5)
    # without move, `received` means nothing and nothing is kept
    nm = FlowState(W, W, move=False)
    nm.record_sent(msgs[0])
    nm.on_window(W + 1_064, 0)
    nm.on_window(W + 1_064, 7)
    assert not nm.unacked and nm.send_limit == W + 1_064

    # The receiving side of the same example: grant consumed + window once
    # half a window or less is left; data past our grant is a violation.
    rs = FlowState(W, W, move=True)
    for _ in range(5):
        rs.on_data(1_064)
    assert rs.consume(1_064) is None and rs.consume(1_064) is None  # 3,872 left
    assert rs.consume(1_064) == 9_192                                # 2,808 <= 3,000
    assert rs.window_frame() == Window(9_192, 5)
    assert rs.consume(1_064) is None
    assert "past the limit 9192" in fails(rs.on_data, 9_192 - 5 * 1_064 + 1)
    rs = FlowState(W, W, move=False)
    rs.on_data(W)  # exactly the limit is fine
    assert rs.window_frame() == Window(W, 0) and rs.consume(W // 2) == W // 2 + W
    assert "past the limit" in fails(FlowState(W, W, False).on_data, W + 1)

    # The README's move example: we sent 10, the gateway received 9; we
    # received 3 of its data. Answer window{limit, received: 3}, resend #10.
    mv = FlowState(40_000, 30_000, move=True)
    for i in range(10):
        mv.record_sent(Data(b"m" * 100 + bytes([i])))
    for _ in range(3):
        mv.on_data(100)
    resend = mv.on_resume(9, 40_000)
    assert [n for n, _, _ in resend] == [10] and resend[0][2].payload.endswith(b"\x09")
    assert mv.window_frame() == Window(30_000, 3)
    assert mv.sent_cost == 10 * 165  # resending counts nothing again
    assert "never goes down" in fails(mv.on_resume, 8, 40_000)
    assert "below the limit" in fails(mv.on_resume, 9, 39_999)
    assert mv.on_resume(10, 40_000) == []  # another move later: nothing left


class _TestWriter:
    """The self-test's stand-in for a link's StreamWriter: it keeps what is
    written (varint framing) for ``frames`` to decode."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.transport = self
        self.closed = False

    def get_extra_info(self, name: str):
        return None

    def is_closing(self) -> bool:
        return self.closed

    def write(self, raw: bytes) -> None:
        self.out += raw

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def frames(self) -> list:
        """The frames written since the last call."""
        out, pos = [], 0
        while pos < len(self.out):
            n, pos = decode_varint(bytes(self.out), pos)
            out.append(Frame.decode(bytes(self.out[pos:pos + n])))
            pos += n
        self.out.clear()
        return out


async def self_test_fleet(h) -> None:
    """fleet: a session is keyed by the instance that opened it, whatever
    link of whatever instance it is resumed on (README, "Sessions that move
    between gateway instances")."""
    # SessionResume.origin_instance_id is field 4, a string
    f = Frame(5, "resume", SessionResume(SessionOpen(), 0, 0, "ab"))
    assert f.encode() == h("08 05 5a 06 0a 00 22 02 61 62"), f.encode().hex(" ")
    assert Frame.decode(f.encode()) == f

    b = Backend("varint", DEFAULT_MAX_FRAME, 0, False)
    window = 1 << 20

    async def link(instance: str, offered: list) -> Link:
        l = Link(b, next(b._link_ids), asyncio.StreamReader(), _TestWriter())
        await l.on_first(Frame(0, "hello", Hello(
            min_version=1, max_version=3, gateway_id="gw", instance_id=instance,
            max_message_size=1000, capabilities=offered, session_window=window,
            move_timeout_ms=10_000)))
        return l

    async def settle(l: Link) -> list:
        """Let the session handlers run; the frames they wrote on ``l``."""
        for _ in range(10):
            await asyncio.sleep(0)
        return l.writer.frames()

    def echo(payload: bytes) -> Frame:
        return Frame(5, "data", Data(payload))

    A, B = "a" * 32, "b" * 32
    all_caps = ["flow", "move", "fleet"]
    a, b1 = await link(A, all_caps), await link(B, all_caps)
    for l in (a, b1):
        assert l.fleet and l.writer.frames()[0].body.capabilities == all_caps
    op = SessionOpen("1.2.3.4:5", "/ws")
    a.on_frame(Frame(5, "open", op))
    a.on_frame(echo(b"one"))
    assert await settle(a) == [echo(b"one")]

    # Instance B takes session 5 over while A's link is still up. The key is
    # (A, 5) although b1's instance is B; the gateway had none of our data,
    # so the echo is resent after the window.
    b1.on_frame(Frame(5, "resume", SessionResume(op, 0, window, A)))
    assert b1.writer.frames() == [Frame(5, "window", Window(window, 1)), echo(b"one")]
    sess = b.sessions[(A, 5)]
    assert sess.link is b1 and list(b.sessions) == [(A, 5)] and b.fleet_moves == 1
    a.on_frame(echo(b"late"))  # A sent it before handing over: ignored
    b1.on_frame(echo(b"two"))
    assert await settle(a) == [] and await settle(b1) == [echo(b"two")]
    assert sess.flow.recv_count == 2

    # Back to A, its link still up: resumed without origin_instance_id (it is
    # that link's own instance); frames there belong to the session again.
    a.on_frame(Frame(5, "resume", SessionResume(op, 2, window)))
    assert a.writer.frames() == [Frame(5, "window", Window(window, 2))]
    assert sess.link is a and b.fleet_moves == 1
    b1.on_frame(echo(b"late"))
    a.on_frame(echo(b"three"))
    assert await settle(b1) == [] and await settle(a) == [echo(b"three")]

    # Without fleet adopted (not offered, or not in --caps), a resume naming
    # another origin is keyed by its link's instance: unknown, so close.
    for offered, caps in ((["flow", "move"], CAPABILITIES), (all_caps, ("flow", "move"))):
        b.caps = caps
        c = await link(B, offered)
        assert not c.fleet and c.writer.frames()[0].body.capabilities == ["flow", "move"]
        c.on_frame(Frame(5, "resume", SessionResume(op, 3, window, A)))
        [close] = c.writer.frames()
        assert close.session_id == 5 and close.body.code == 1012, close
    assert sess.link is a and b.violations == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=parse_hostport, default=("127.0.0.1", 0),
                   help="HOST:PORT to listen on (port 0 = any free port)")
    p.add_argument("--framing", choices=("varint", "u32be"), default="varint")
    p.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME,
                   help="maximum frame body size in bytes, both directions")
    p.add_argument("--heartbeat", type=float, default=5.0,
                   help="seconds between our own heartbeat requests (0: never)")
    p.add_argument("--max-version", type=int, choices=SUPPORTED_VERSIONS,
                   default=SUPPORTED_VERSIONS[-1],
                   help="highest protocol version to choose (2: the old behaviour)")
    p.add_argument("--caps", type=parse_caps, default=CAPABILITIES,
                   help="version-3 capabilities to adopt when offered: a comma-separated "
                        f"subset of {','.join(CAPABILITIES)}, or none (default: all of them; "
                        "fleet is adopted only with move)")
    p.add_argument("--window", type=int, default=0,
                   help="hello_ack.session_window in bytes (0: the same as the gateway's)")
    p.add_argument("--reset-links-every", type=float, default=0, metavar="SECONDS",
                   help="abort every link with a TCP RST this often (0: never)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every frame")
    p.add_argument("--self-test", action="store_true",
                   help="check the encoder/decoder against the README and exit")
    args = p.parse_args()
    if args.self_test:
        return self_test()
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())

//! What decoding a frame costs, measured: every byte requested from the
//! allocator (allocations, and growth by reallocation) while the codec
//! decodes one frame, counted by a wrapper around the system allocator.
//! The total is an upper bound on the peak. A frame of the gateway's
//! default `backend.max_frame_size` must never cost more than
//! [`MAX_COST_MULTIPLE`] times its size, whatever it holds.
//!
//! This file is its own test binary with one test, so that no other test
//! allocates while it measures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;

use bytes::{Bytes, BytesMut};
use prost::encoding::{encode_key, encode_varint, WireType};
use prost::Message;
use protocol::limits::{MAX_CAPABILITIES, MAX_HEADERS};
use protocol::{pb, Body, FrameCodec, Framing};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The gateway's default `backend.max_frame_size`: 1 MiB + 4 KiB.
const MAX_FRAME: usize = (1 << 20) + 4096;

/// The stated bound: bytes allocated while decoding, per byte of frame.
const MAX_COST_MULTIPLE: f64 = 2.0;

/// `n` bytes of `key, len, contents` for field `field`, repeated as many
/// times as fit: the shape that makes a decoder allocate per occurrence.
fn repeated(field: u32, contents: &[u8], n: usize) -> Vec<u8> {
    let mut one = Vec::new();
    encode_key(field, WireType::LengthDelimited, &mut one);
    encode_varint(contents.len() as u64, &mut one);
    one.extend_from_slice(contents);
    let mut out = Vec::with_capacity(n);
    while out.len() + one.len() <= n {
        out.extend_from_slice(&one);
    }
    out
}

/// A message field `field` of `Frame` holding `inner`.
fn frame_with(session_id: u64, field: u32, inner: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    if session_id != 0 {
        encode_key(1, WireType::Varint, &mut body);
        encode_varint(session_id, &mut body);
    }
    encode_key(field, WireType::LengthDelimited, &mut body);
    encode_varint(inner.len() as u64, &mut body);
    body.extend_from_slice(inner);
    body
}

/// Bodies of about `MAX_FRAME` bytes built to cost as much as possible.
fn hostile_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let room = MAX_FRAME - 16;
    let header = pb::Header {
        name: "a".into(),
        value: String::new(),
    }
    .encode_to_vec();
    vec![
        // The finding: half a million empty headers.
        (
            "open of empty headers",
            frame_with(7, 4, &repeated(4, &[], room)),
        ),
        (
            "open of one-byte headers",
            frame_with(7, 4, &repeated(4, &header, room)),
        ),
        (
            "resume whose open has empty headers",
            frame_with(7, 11, &repeated(1, &repeated(4, &[], 1 << 16), room)),
        ),
        (
            "hello of empty capabilities",
            frame_with(0, 2, &repeated(11, &[], room)),
        ),
        (
            "hello_ack of empty capabilities",
            frame_with(0, 3, &repeated(4, &[], room)),
        ),
        // Singular fields, over and over: each occurrence replaces the last.
        (
            "close reasons, repeated",
            frame_with(7, 6, &repeated(2, &[b'x'; 1000], room)),
        ),
        (
            "open paths, repeated",
            frame_with(7, 4, &repeated(2, &[b'/'; 3], room)),
        ),
        (
            "data frames, repeated",
            repeated(5, &repeated(1, &[1; 100], 104), room),
        ),
        ("heartbeats, repeated", repeated(7, &[0x08, 0x01], room)),
        (
            "one close with a 1 MiB reason",
            frame_with(7, 6, &repeated(2, &vec![b'y'; room - 8], room)),
        ),
        (
            "one data with a 1 MiB payload",
            frame_with(7, 5, &repeated(1, &vec![0; room - 8], room)),
        ),
        // The most a gateway sends: limits met exactly, big values.
        (
            "open at the header limit, 16 KiB values",
            frame_with(
                7,
                4,
                &pb::SessionOpen {
                    headers: vec![
                        pb::Header {
                            name: "n".into(),
                            value: "v".repeat(16 << 10),
                        };
                        MAX_HEADERS
                    ],
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ),
        (
            "hello at the capability limit",
            frame_with(
                0,
                2,
                &pb::Hello {
                    capabilities: vec!["c".repeat(60_000); MAX_CAPABILITIES],
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ),
    ]
}

#[test]
fn a_max_frame_size_frame_costs_at_most_twice_its_size_to_decode() {
    let codec = FrameCodec::new(Framing::Varint, MAX_FRAME);
    let mut report = Vec::new();
    for (what, body) in hostile_bodies() {
        assert!(body.len() <= MAX_FRAME, "{what}: {} bytes", body.len());
        let mut wire = BytesMut::new();
        prost::encode_length_delimiter(body.len(), &mut wire).unwrap();
        wire.extend_from_slice(&body);
        drop(body);
        let len = wire.len();
        let region = Region::new(GLOBAL);
        let decoded = codec.decode(&mut wire);
        let stats = region.change();
        let cost = stats.bytes_allocated + stats.bytes_reallocated.max(0) as usize;
        let kind = match &decoded {
            Ok(Some(f)) => f.body.as_ref().map_or("none", Body::kind).to_owned(),
            Ok(None) => "partial".to_owned(),
            Err(e) => format!("error: {e}"),
        };
        drop(decoded);
        let multiple = cost as f64 / len as f64;
        report.push(format!(
            "{what}: {len} bytes -> {cost} bytes allocated ({multiple:.3}x; {kind})"
        ));
        assert!(
            multiple <= MAX_COST_MULTIPLE,
            "{what}: decoding {len} bytes allocated {cost} ({multiple:.1}x)"
        );
    }
    // `cargo test -p wsgw-protocol --test decode_cost -- --nocapture`
    // prints the measurements.
    println!("{}", report.join("\n"));
    // The measure itself works: a decode that keeps a copy is seen.
    let region = Region::new(GLOBAL);
    let copy = Bytes::copy_from_slice(&[0; 4096]);
    assert!(region.change().bytes_allocated >= 4096);
    drop(copy);
}

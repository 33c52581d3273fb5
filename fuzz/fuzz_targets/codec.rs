//! The frame codec against an independent model, in both framings.
//!
//! The model splits the stream itself (its own varint and u32be readers)
//! and decodes each body with prost directly, counting repeated-field
//! entries with prost's own wire reader. The codec, fed the same bytes
//! whole, in fuzzer-chosen chunks and byte by byte, must give exactly the
//! model's frames and errors; `Ok(None)` must leave the buffer untouched;
//! every decoded frame re-encodes to exactly `wire_len` bytes and decodes
//! back to itself. Structured inputs (frames built from the fuzzer's
//! bytes) must round-trip through every way of feeding.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use prost::encoding::{decode_key, skip_field, DecodeContext, WireType};
use prost::Message;
use protocol::limits::{MAX_CAPABILITIES, MAX_HEADERS};
use protocol::{pb, Body, DecodeError, Frame, FrameCodec, Framing};
use wsgw_fuzz::Input;

/// What decoding one frame gives, comparable across feeding styles.
#[derive(Debug, PartialEq)]
enum Outcome {
    Frame(Frame),
    /// A body error; the stream stays in sync.
    InvalidBody(u64),
    Protobuf,
    MissingBody(u64),
    TooMany,
    /// Framing errors end the stream.
    TooLarge(u64),
    BadPrefix,
}

fn outcome(r: Result<Frame, DecodeError>) -> Outcome {
    match r {
        Ok(f) => Outcome::Frame(f),
        Err(DecodeError::InvalidBody { session_id, .. }) => Outcome::InvalidBody(session_id),
        Err(DecodeError::Protobuf(_)) => Outcome::Protobuf,
        Err(DecodeError::MissingBody { session_id }) => Outcome::MissingBody(session_id),
        Err(DecodeError::TooManyEntries(_)) => Outcome::TooMany,
        Err(DecodeError::FrameTooLarge { len, .. }) => Outcome::TooLarge(len),
        Err(DecodeError::BadLengthPrefix) => Outcome::BadPrefix,
    }
}

fn is_framing(o: &Outcome) -> bool {
    matches!(o, Outcome::TooLarge(_) | Outcome::BadPrefix)
}

/// The model's reading of a length prefix: Some((prefix bytes, length)),
/// None if incomplete, Err if malformed.
fn model_prefix(framing: Framing, b: &[u8]) -> Result<Option<(usize, u64)>, BadPrefix> {
    match framing {
        Framing::U32Be => Ok(
            (b.len() >= 4).then(|| (4, u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))))
        ),
        Framing::Varint => {
            let mut value: u128 = 0;
            for (i, &byte) in b.iter().enumerate() {
                value |= u128::from(byte & 0x7f) << (7 * i);
                if value > u128::from(u64::MAX) {
                    return Err(BadPrefix);
                }
                if byte & 0x80 == 0 {
                    return Ok(Some((i + 1, value as u64)));
                }
                if i == 9 {
                    return Err(BadPrefix);
                }
            }
            Ok(None)
        }
    }
}

/// A malformed varint prefix.
struct BadPrefix;

#[derive(Clone, PartialEq, prost::Message)]
struct SessionIdOnly {
    #[prost(uint64, tag = "1")]
    session_id: u64,
}

/// Entries of the capped repeated fields, counted with prost's wire
/// reader, across every occurrence; stops where prost's reader fails.
fn raw_counts(body: &[u8]) -> [usize; 4] {
    fn each(mut buf: &[u8], mut f: impl FnMut(u32, WireType, &[u8])) {
        while !buf.is_empty() {
            let Ok((tag, wire)) = decode_key(&mut buf) else {
                return;
            };
            let before = buf;
            if skip_field(wire, tag, &mut buf, DecodeContext::default()).is_err() {
                return;
            }
            let used = &before[..before.len() - buf.len()];
            let contents = if wire == WireType::LengthDelimited {
                let mut l = used;
                match prost::encoding::decode_varint(&mut l) {
                    Ok(_) => l,
                    Err(_) => return,
                }
            } else {
                &[][..]
            };
            f(tag, wire, contents);
        }
    }
    let mut n = [0usize; 4];
    each(body, |tag, wire, inner| {
        if wire != WireType::LengthDelimited {
            return;
        }
        let count = |inner: &[u8], wanted: u32, slot: &mut usize| {
            each(inner, |t, _, _| {
                if t == wanted {
                    *slot += 1;
                }
            })
        };
        match tag {
            2 => count(inner, 11, &mut n[0]),
            3 => count(inner, 4, &mut n[1]),
            4 => count(inner, 4, &mut n[2]),
            11 => each(inner, |t, w, open| {
                if t == 1 && w == WireType::LengthDelimited {
                    count(open, 4, &mut n[3]);
                }
            }),
            _ => {}
        }
    });
    n
}

fn model_body(body: &[u8]) -> Outcome {
    let n = raw_counts(body);
    if n[0] > MAX_CAPABILITIES
        || n[1] > MAX_CAPABILITIES
        || n[2] > MAX_HEADERS
        || n[3] > MAX_HEADERS
    {
        return Outcome::TooMany;
    }
    match Frame::decode(body) {
        Ok(f) if f.body.is_none() => Outcome::MissingBody(f.session_id),
        Ok(f) => Outcome::Frame(f),
        Err(_) => match SessionIdOnly::decode(body) {
            Ok(s) => Outcome::InvalidBody(s.session_id),
            Err(_) => Outcome::Protobuf,
        },
    }
}

/// The model's outcomes for a whole stream, and the bytes left over of an
/// incomplete last frame (0 after a framing error).
fn model(codec: &FrameCodec, mut b: &[u8]) -> (Vec<Outcome>, usize) {
    let mut out = Vec::new();
    loop {
        match model_prefix(codec.framing(), b) {
            Err(BadPrefix) => {
                out.push(Outcome::BadPrefix);
                return (out, 0);
            }
            Ok(None) => return (out, b.len()),
            Ok(Some((prefix, len))) => {
                if len > codec.max_frame() as u64 {
                    out.push(Outcome::TooLarge(len));
                    return (out, 0);
                }
                let Some(total) = prefix.checked_add(len as usize) else {
                    out.push(Outcome::TooLarge(len));
                    return (out, 0);
                };
                if b.len() < total {
                    return (out, b.len());
                }
                out.push(model_body(&b[prefix..total]));
                b = &b[total..];
            }
        }
    }
}

/// Feeds `parts` to the codec one after the other, decoding after each.
fn feed(codec: &FrameCodec, parts: &[&[u8]]) -> (Vec<Outcome>, usize) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for part in parts {
        buf.extend_from_slice(part);
        loop {
            let before = buf.clone();
            match codec.decode(&mut buf) {
                Ok(None) => {
                    assert_eq!(buf, before, "Ok(None) changed the buffer");
                    break;
                }
                Ok(Some(f)) => {
                    assert!(buf.len() < before.len());
                    check_reencode(codec, &f);
                    out.push(Outcome::Frame(f));
                }
                Err(e) => {
                    let o = outcome(Err(e));
                    let framing = is_framing(&o);
                    out.push(o);
                    if framing {
                        // What is left after a framing error depends on
                        // how much had arrived: not compared.
                        return (out, 0);
                    }
                }
            }
        }
    }
    (out, buf.len())
}

fn check_reencode(codec: &FrameCodec, f: &Frame) {
    let mut again = BytesMut::new();
    if codec.encode(f, &mut again).is_err() {
        // Only over the size limit: the limits on entries hold.
        assert!(f.encoded_len() > codec.max_frame());
        return;
    }
    assert_eq!(again.len(), codec.wire_len(f), "wire_len is exact");
    assert_eq!(codec.decode(&mut again).ok().flatten().as_ref(), Some(f));
    assert!(again.is_empty());
}

fn check_stream(codec: &FrameCodec, wire: &[u8], input: &mut Input) {
    let expected = model(codec, wire);
    assert_eq!(feed(codec, &[wire]), expected, "whole");
    let chunks = input.chunks(wire);
    assert_eq!(feed(codec, &chunks), expected, "in chunks");
    if wire.len() <= 4096 {
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(feed(codec, &bytes), expected, "byte by byte");
    }
}

fn string(input: &mut Input) -> String {
    String::from_utf8_lossy(input.short()).into_owned()
}

/// A frame built from the fuzzer's bytes.
fn frame(input: &mut Input) -> Frame {
    let session_id = match input.u8() % 4 {
        0 => 0,
        1 => u64::from(input.u8()),
        _ => input.u64(),
    };
    let body = match input.u8() % 11 {
        0 => Body::Hello(Box::new(pb::Hello {
            min_version: input.u32(),
            max_version: input.u32(),
            gateway_id: string(input),
            heartbeat_interval_ms: input.u64(),
            capabilities: (0..input.u8() % 20).map(|_| string(input)).collect(),
            ..Default::default()
        })),
        1 => Body::HelloAck(pb::HelloAck {
            version: input.u32(),
            capabilities: (0..input.u8() % 20).map(|_| string(input)).collect(),
            session_window: input.u64(),
            ..Default::default()
        }),
        2 => Body::Open(open(input)),
        3 | 4 => Body::Data(pb::Data {
            payload: Bytes::copy_from_slice(input.short()),
            text: input.bool(),
        }),
        5 => Body::Close(pb::SessionClose {
            code: input.u32(),
            reason: string(input),
        }),
        6 => Body::Heartbeat(pb::Heartbeat {
            nonce: input.u64(),
            ack: input.bool(),
        }),
        7 => Body::Detached(pb::SessionDetached {
            reason: string(input),
            grace_ms: input.u64(),
        }),
        8 => Body::Attached(pb::SessionAttached {
            remote_addr: string(input),
            replayed: input.u64(),
        }),
        9 => Body::Window(pb::Window {
            limit: input.u64(),
            received: input.u64(),
        }),
        _ => Body::Resume(pb::SessionResume {
            open: Some(Box::new(open(input))),
            received: input.u64(),
            limit: input.u64(),
            origin_instance_id: string(input),
        }),
    };
    Frame {
        session_id,
        body: Some(body),
    }
}

fn open(input: &mut Input) -> pb::SessionOpen {
    pb::SessionOpen {
        remote_addr: string(input),
        path: string(input),
        headers: (0..input.u8() % 80)
            .map(|_| pb::Header {
                name: string(input),
                value: string(input),
            })
            .collect(),
        ..Default::default()
    }
}

fn within_limits(f: &Frame) -> bool {
    match &f.body {
        Some(Body::Hello(h)) => h.capabilities.len() <= MAX_CAPABILITIES,
        Some(Body::HelloAck(a)) => a.capabilities.len() <= MAX_CAPABILITIES,
        Some(Body::Open(o)) => o.headers.len() <= MAX_HEADERS,
        Some(Body::Resume(r)) => r
            .open
            .as_ref()
            .is_none_or(|o| o.headers.len() <= MAX_HEADERS),
        _ => true,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let framing = input.framing();
    if input.bool() {
        // Raw bytes: anything a peer could send.
        // (A maximum near usize::MAX is the unit test
        // a_length_near_usize_max_is_refused_not_an_overflow: here the
        // decoder would reserve what a prefix announces, as it may.)
        let max = match input.u8() % 2 {
            0 => usize::from(input.u16()),
            _ => 1 << 20,
        };
        let codec = FrameCodec::new(framing, max);
        let wire = input.short().to_vec();
        let rest = input.rest();
        let mut wire = wire;
        wire.extend_from_slice(rest);
        let mut chunks_from = Input(data);
        check_stream(&codec, &wire, &mut chunks_from);
        return;
    }
    // Frames built from the input: encode, then every way of feeding.
    let codec = FrameCodec::new(framing, 1 << 20);
    let mut frames = Vec::new();
    let mut wire = BytesMut::new();
    while !input.is_empty() && frames.len() < 32 {
        let f = frame(&mut input);
        let before = wire.len();
        match codec.encode(&f, &mut wire) {
            Ok(()) => {
                assert!(within_limits(&f));
                assert_eq!(wire.len() - before, codec.wire_len(&f), "wire_len is exact");
                frames.push(f);
            }
            Err(_) => {
                assert!(!within_limits(&f), "a frame within the limits was refused");
                assert_eq!(wire.len(), before, "a refused frame wrote nothing");
            }
        }
    }
    let expected: Vec<Outcome> = frames.into_iter().map(Outcome::Frame).collect();
    assert_eq!(model(&codec, &wire), (expected, 0), "model");
    check_stream(&codec, &wire, &mut Input(data));
});

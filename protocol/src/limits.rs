//! Limits on repeated fields, checked on the wire before a frame is
//! decoded.
//!
//! Decoding protobuf allocates per entry of a repeated field: an empty
//! `Header` is 2 bytes on the wire and 48 bytes decoded (two `String`s),
//! before the vector's growth doubles it. Without a cap a 1 MiB frame of
//! empty headers decoded into about 48 MiB. Every other field of `Frame` is
//! singular: repeated occurrences replace (or merge into) one value, and
//! payloads are shared with the read buffer, not copied. So capping the
//! entries of the repeated fields bounds what decoding a frame costs to
//! about its own size (measured in `protocol/tests/decode_cost.rs`).
//!
//! The scan below walks the wire format without allocating. It sums entries
//! across every occurrence of the message that holds them (protobuf merges
//! repeated occurrences of a message field, concatenating their lists). On
//! wire data it cannot read it stops and lets the decoder report the error:
//! it reads exactly what prost reads, so the decoder fails at or before that
//! point too (the codec fuzz target checks this).

/// Most entries of `SessionOpen.headers` (also inside `SessionResume.open`):
/// the gateway forwards entries from a request of at most 64 header fields
/// (`MAX_REQUEST_HEADERS` in the gateway), so it never sends more.
pub const MAX_HEADERS: usize = 64;

/// Most entries of `Hello.capabilities` and of `HelloAck.capabilities`
/// (version 3 defines two).
pub const MAX_CAPABILITIES: usize = 16;

/// prost's recursion limit: a deeper group is an error for it, and the
/// scan stops there too.
const MAX_DEPTH: u32 = 100;

/// A repeated field of a frame over its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooMany {
    /// The field, as `Message.field`.
    pub field: &'static str,
    /// Its limit.
    pub max: usize,
}

/// Field numbers of the messages that hold repeated fields, and of those
/// fields (see `link.proto`).
mod tag {
    pub(super) const FRAME_HELLO: u64 = 2;
    pub(super) const FRAME_HELLO_ACK: u64 = 3;
    pub(super) const FRAME_OPEN: u64 = 4;
    pub(super) const FRAME_RESUME: u64 = 11;
    pub(super) const HELLO_CAPABILITIES: u64 = 11;
    pub(super) const HELLO_ACK_CAPABILITIES: u64 = 4;
    pub(super) const OPEN_HEADERS: u64 = 4;
    pub(super) const RESUME_OPEN: u64 = 1;
}

const LEN: u64 = 2;

/// Checks a `Frame` body against the limits without decoding it.
pub(crate) fn check(body: &[u8]) -> Result<(), TooMany> {
    let mut counts = Counts::default();
    // Malformed wire data ends the scan: the decoder rejects it.
    let _ = walk(body, 0, &mut |field, wire, inner| {
        if wire != LEN {
            return Ok(());
        }
        match field {
            tag::FRAME_HELLO => count(inner, tag::HELLO_CAPABILITIES, &mut counts.hello_caps),
            tag::FRAME_HELLO_ACK => count(inner, tag::HELLO_ACK_CAPABILITIES, &mut counts.ack_caps),
            tag::FRAME_OPEN => count(inner, tag::OPEN_HEADERS, &mut counts.headers),
            tag::FRAME_RESUME => walk(inner, 0, &mut |field, wire, open| {
                if field == tag::RESUME_OPEN && wire == LEN {
                    count(open, tag::OPEN_HEADERS, &mut counts.resume_headers)
                } else {
                    Ok(())
                }
            }),
            _ => Ok(()),
        }
    });
    counts.check()
}

#[derive(Default)]
struct Counts {
    hello_caps: usize,
    ack_caps: usize,
    headers: usize,
    resume_headers: usize,
}

impl Counts {
    fn check(&self) -> Result<(), TooMany> {
        for (n, field, max) in [
            (self.hello_caps, "Hello.capabilities", MAX_CAPABILITIES),
            (self.ack_caps, "HelloAck.capabilities", MAX_CAPABILITIES),
            (self.headers, "SessionOpen.headers", MAX_HEADERS),
            (
                self.resume_headers,
                "SessionResume.open.headers",
                MAX_HEADERS,
            ),
        ] {
            if n > max {
                return Err(TooMany { field, max });
            }
        }
        Ok(())
    }
}

/// Adds the occurrences of field `wanted` in `msg` to `n`.
fn count(msg: &[u8], wanted: u64, n: &mut usize) -> Result<(), Malformed> {
    walk(msg, 0, &mut |field, _, _| {
        if field == wanted {
            *n += 1;
        }
        Ok(())
    })
}

/// Wire data the scan cannot read.
struct Malformed;

/// What [`walk`] calls for each field: (field number, wire type, contents).
type Visit<'v> = dyn FnMut(u64, u64, &[u8]) -> Result<(), Malformed> + 'v;

/// Calls `f(field, wire type, contents)` for each field of `msg` in order
/// (contents: a length-delimited field's bytes, empty for the others);
/// groups are skipped, as prost skips them.
fn walk(mut msg: &[u8], depth: u32, f: &mut Visit<'_>) -> Result<(), Malformed> {
    while !msg.is_empty() {
        let (field, wire) = key(&mut msg)?;
        let contents = skip(&mut msg, field, wire, depth)?;
        f(field, wire, contents)?;
    }
    Ok(())
}

/// Reads a field key: (field number, wire type).
fn key(buf: &mut &[u8]) -> Result<(u64, u64), Malformed> {
    let k = varint(buf)?;
    // prost: keys above u32::MAX and field number 0 are invalid.
    if k > u64::from(u32::MAX) || k >> 3 == 0 {
        return Err(Malformed);
    }
    Ok((k >> 3, k & 7))
}

/// Skips one field's value; returns a length-delimited field's contents.
fn skip<'a>(buf: &mut &'a [u8], field: u64, wire: u64, depth: u32) -> Result<&'a [u8], Malformed> {
    let len = match wire {
        0 => varint(buf).map(|_| 0)?,
        1 => 8,
        5 => 4,
        2 => varint(buf)?,
        3 => {
            if depth >= MAX_DEPTH {
                return Err(Malformed);
            }
            loop {
                let (inner, inner_wire) = key(buf)?;
                if inner_wire == 4 {
                    if inner != field {
                        return Err(Malformed);
                    }
                    break 0;
                }
                skip(buf, inner, inner_wire, depth + 1)?;
            }
        }
        _ => return Err(Malformed),
    };
    let len = usize::try_from(len).map_err(|_| Malformed)?;
    let (contents, rest) = buf.split_at_checked(len).ok_or(Malformed)?;
    *buf = rest;
    Ok(if wire == LEN { contents } else { &[] })
}

/// A base-128 varint of at most 10 bytes, as prost reads it.
fn varint(buf: &mut &[u8]) -> Result<u64, Malformed> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&byte, rest) = buf.split_first().ok_or(Malformed)?;
        *buf = rest;
        if i == 9 && byte > 1 {
            return Err(Malformed);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Malformed)
}

/// Whether the limits are respected by a frame about to be encoded.
pub(crate) fn check_frame(frame: &crate::Frame) -> Result<(), TooMany> {
    use crate::Body;
    let mut counts = Counts::default();
    match &frame.body {
        Some(Body::Hello(h)) => counts.hello_caps = h.capabilities.len(),
        Some(Body::HelloAck(a)) => counts.ack_caps = a.capabilities.len(),
        Some(Body::Open(o)) => counts.headers = o.headers.len(),
        Some(Body::Resume(r)) => {
            counts.resume_headers = r.open.as_ref().map_or(0, |o| o.headers.len());
        }
        _ => {}
    }
    counts.check()
}

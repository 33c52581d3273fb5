//! Length-prefixed framing of [`Frame`]s.
//!
//! A frame on the wire is `prefix ‖ protobuf(Frame)`, where the prefix is the
//! byte length of the protobuf body as either
//! - [`Framing::Varint`]: a protobuf base-128 varint (what Java's
//!   `writeDelimitedTo` / `parseDelimitedFrom` use), 1 to 10 bytes; or
//! - [`Framing::U32Be`]: 4 bytes, unsigned big-endian.
//!
//! The decoder checks the announced length against the maximum frame size
//! before it reserves any memory, so a hostile or broken peer cannot make
//! its read buffer hold more than `max_frame + 10` bytes per link. Before a
//! complete body is decoded, the entries of its repeated fields are counted
//! on the wire against [`crate::limits`], so that decoding a frame costs
//! about its own size, not a multiple of it.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

use crate::{Body, Frame};

/// Longest valid varint for a 64-bit value.
const MAX_VARINT_LEN: usize = 10;

/// The largest `max_frame` a codec uses: a prefix and a body together must
/// fit in a buffer, which Rust caps at `isize::MAX` bytes. A larger
/// maximum is lowered to this one.
pub const MAX_FRAME_LIMIT: usize = isize::MAX as usize - MAX_VARINT_LEN;

/// Which length prefix a link uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Protobuf varint prefix (`writeDelimitedTo`).
    Varint,
    /// 4-byte big-endian unsigned length.
    U32Be,
}

impl std::str::FromStr for Framing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "varint" => Ok(Self::Varint),
            "u32be" => Ok(Self::U32Be),
            other => Err(format!(
                "unknown framing {other:?}: expected \"varint\" or \"u32be\""
            )),
        }
    }
}

impl std::fmt::Display for Framing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Varint => "varint",
            Self::U32Be => "u32be",
        })
    }
}

/// Why bytes from a peer could not be decoded into a [`Frame`].
///
/// Framing errors are fatal for the link: framing cannot be recovered once
/// it is lost. A frame that was framed correctly but whose body is invalid
/// has been consumed whole, so the stream stays in sync:
/// [`DecodeError::session`] says which session it belonged to, and a peer
/// may end only that session.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix announces more than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Announced body length.
        len: u64,
        /// Configured maximum.
        max: usize,
    },
    /// A varint prefix longer than 10 bytes, or one that overflows 64 bits.
    #[error("malformed varint length prefix")]
    BadLengthPrefix,
    /// The body is not a valid protobuf `Frame`.
    #[error("malformed protobuf frame: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// The body is not a valid protobuf `Frame` (for instance, a string
    /// field that is not UTF-8), but its `session_id` could be read.
    #[error("malformed protobuf frame for session {session_id}: {source}")]
    InvalidBody {
        /// Session id found in the frame.
        session_id: u64,
        /// What is wrong with the rest of it.
        source: prost::DecodeError,
    },
    /// The body decoded, but sets none of the `body` oneof.
    #[error("frame for session {session_id} has no body")]
    MissingBody {
        /// Session id found in the frame.
        session_id: u64,
    },
    /// A repeated field holds more entries than the contract allows
    /// ([`crate::limits`]); counted on the wire, the body was not decoded.
    #[error("frame has more than {} entries in {}", .0.max, .0.field)]
    TooManyEntries(crate::limits::TooMany),
}

impl DecodeError {
    /// The session a correctly framed frame with an undecodable body belongs
    /// to: the stream is still in sync after it. `None` for framing errors,
    /// a frame without a body, and frames whose session id cannot be read or
    /// is 0 (the link's own).
    pub fn session(&self) -> Option<u64> {
        match self {
            Self::InvalidBody { session_id, .. } => {
                Some(*session_id).filter(|id| *id != crate::LINK_SESSION_ID)
            }
            // A frame without a body is a peer that does not speak the
            // protocol, not one bad value.
            Self::MissingBody { .. }
            | Self::FrameTooLarge { .. }
            | Self::BadLengthPrefix
            | Self::Protobuf(_)
            // Only the gateway sends frames with repeated fields (and the
            // backend its hello_ack, before any session): a peer that
            // breaks their limits is not one bad value.
            | Self::TooManyEntries(_) => None,
        }
    }
}

/// Only the `session_id` of a [`Frame`]: other fields are skipped unread
/// (unknown fields are not validated), so it decodes wherever a frame's
/// first field can be read.
#[derive(Clone, PartialEq, prost::Message)]
struct SessionIdOnly {
    #[prost(uint64, tag = "1")]
    session_id: u64,
}

/// Why a [`Frame`] could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The encoded frame would exceed the configured maximum; the peer would
    /// reject it.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Encoded body length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A repeated field holds more entries than the contract allows
    /// ([`crate::limits`]); the peer would reject the frame.
    #[error("frame has more than {} entries in {}", .0.max, .0.field)]
    TooManyEntries(crate::limits::TooMany),
}

/// Encoder and decoder for one link's framing.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    framing: Framing,
    max_frame: usize,
}

impl FrameCodec {
    /// A codec for `framing` that accepts frame bodies of at most
    /// `max_frame` bytes (the prefix is not counted), lowered to what the
    /// prefix can express and to [`MAX_FRAME_LIMIT`].
    pub fn new(framing: Framing, max_frame: usize) -> Self {
        let max_frame = match framing {
            Framing::U32Be => max_frame.min(u32::MAX as usize),
            Framing::Varint => max_frame,
        }
        .min(MAX_FRAME_LIMIT);
        Self { framing, max_frame }
    }

    /// The framing this codec uses.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// The largest frame body this codec accepts or produces.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Bytes a frame occupies on the wire, prefix included.
    pub fn wire_len(&self, frame: &Frame) -> usize {
        let len = frame.encoded_len();
        self.prefix_len(len).saturating_add(len)
    }

    fn prefix_len(&self, len: usize) -> usize {
        match self.framing {
            Framing::Varint => prost::length_delimiter_len(len),
            Framing::U32Be => 4,
        }
    }

    /// Appends `frame`, prefixed, to `dst`.
    pub fn encode(&self, frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let len = frame.encoded_len();
        if len > self.max_frame {
            return Err(EncodeError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        crate::limits::check_frame(frame).map_err(EncodeError::TooManyEntries)?;
        // Cannot overflow: len <= max_frame <= MAX_FRAME_LIMIT.
        dst.reserve(self.prefix_len(len).saturating_add(len));
        match self.framing {
            Framing::Varint => prost::encode_length_delimiter(len, dst).map_err(|_| {
                EncodeError::FrameTooLarge {
                    len,
                    max: self.max_frame,
                }
            })?,
            // Cannot truncate: max_frame <= u32::MAX for this framing.
            Framing::U32Be => dst.put_u32(len as u32),
        }
        // Cannot fail: capacity was reserved above.
        frame.encode(dst).map_err(|_| EncodeError::FrameTooLarge {
            len,
            max: self.max_frame,
        })?;
        Ok(())
    }

    /// Takes one complete frame from the front of `src`.
    ///
    /// Returns `Ok(None)` when `src` holds only part of a frame (after
    /// reserving room for the rest, bounded by the maximum frame size), and
    /// leaves `src` untouched in that case.
    pub fn decode(&self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some((prefix, len)) = self.peek_len(src)? else {
            return Ok(None);
        };
        // peek_len keeps len <= max_frame <= MAX_FRAME_LIMIT, so this
        // cannot fail; checked all the same, as the codec is a public API.
        let total = prefix.checked_add(len).ok_or(DecodeError::FrameTooLarge {
            len: len as u64,
            max: self.max_frame,
        })?;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(prefix);
        let body = src.split_to(len).freeze();
        // Counted before decoding: decoding allocates per entry.
        crate::limits::check(&body).map_err(DecodeError::TooManyEntries)?;
        let frame = match Frame::decode(body.clone()) {
            Ok(frame) => frame,
            Err(source) => {
                return Err(match SessionIdOnly::decode(body) {
                    Ok(only) => DecodeError::InvalidBody {
                        session_id: only.session_id,
                        source,
                    },
                    Err(_) => DecodeError::Protobuf(source),
                })
            }
        };
        if frame.body.is_none() {
            return Err(DecodeError::MissingBody {
                session_id: frame.session_id,
            });
        }
        Ok(Some(frame))
    }

    /// Reads the prefix: `(prefix_len, body_len)`, or `None` if incomplete.
    fn peek_len(&self, src: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
        let len = match self.framing {
            Framing::U32Be => match src.get(..4) {
                None => return Ok(None),
                Some(b) => (4, u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
            },
            Framing::Varint => match read_varint(src)? {
                None => return Ok(None),
                Some(v) => v,
            },
        };
        let (prefix, body) = len;
        match usize::try_from(body) {
            Ok(body) if body <= self.max_frame => Ok(Some((prefix, body))),
            _ => Err(DecodeError::FrameTooLarge {
                len: body,
                max: self.max_frame,
            }),
        }
    }
}

/// Parses a base-128 varint: `(bytes used, value)`, `None` if incomplete.
fn read_varint(src: &[u8]) -> Result<Option<(usize, u64)>, DecodeError> {
    let mut value: u64 = 0;
    for (i, &byte) in src.iter().take(MAX_VARINT_LEN).enumerate() {
        let bits = u64::from(byte & 0x7f);
        // The 10th byte may only contribute the single top bit of a u64.
        if i == MAX_VARINT_LEN - 1 && byte > 1 {
            return Err(DecodeError::BadLengthPrefix);
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((i + 1, value)));
        }
    }
    if src.len() >= MAX_VARINT_LEN {
        Err(DecodeError::BadLengthPrefix)
    } else {
        Ok(None)
    }
}

impl Body {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Hello(_) => "hello",
            Body::HelloAck(_) => "hello_ack",
            Body::Open(_) => "open",
            Body::Data(_) => "data",
            Body::Close(_) => "close",
            Body::Heartbeat(_) => "heartbeat",
            Body::Detached(_) => "detached",
            Body::Attached(_) => "attached",
            Body::Window(_) => "window",
            Body::Resume(_) => "resume",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use bytes::Bytes;

    fn sample_frames() -> Vec<Frame> {
        vec![
            Frame::hello(full_hello()),
            Frame::data(42, Bytes::from_static(b"hello"), true),
            Frame::data(7, Bytes::from(vec![0u8; 300]), false),
            Frame::close(42, 1000, "bye"),
            Frame::heartbeat(9, true),
            Frame::window(42, 8 << 20, 17),
            Frame::resume(42, crate::pb::SessionOpen::default(), 3, 4 << 20),
        ]
    }

    fn full_hello() -> crate::pb::Hello {
        crate::pb::Hello {
            min_version: 1,
            max_version: 3,
            gateway_id: "gw-1".into(),
            link_index: 3,
            instance_id: "0123456789abcdef0123456789abcdef".into(),
            heartbeat_interval_ms: 5000,
            heartbeat_timeout_ms: 15_000,
            max_frame_size: 1_052_672,
            max_message_size: 1 << 20,
            client_queue_bytes: 4 << 20,
            capabilities: vec!["flow".into(), "move".into()],
            session_window: 4 << 20,
            move_timeout_ms: 10_000,
        }
    }

    /// `Hello` as it was before fields 5 to 10 were added: what an old
    /// backend's generated code knows.
    #[derive(Clone, PartialEq, prost::Message)]
    struct OldHello {
        #[prost(uint32, tag = "1")]
        min_version: u32,
        #[prost(uint32, tag = "2")]
        max_version: u32,
        #[prost(string, tag = "3")]
        gateway_id: String,
        #[prost(uint32, tag = "4")]
        link_index: u32,
    }

    /// The fields added to `Hello` are invisible to a backend built from
    /// the old schema, and an old gateway's `Hello` reads as all of them
    /// unset (0, empty), which the README says to expect.
    #[test]
    fn hello_fields_added_within_version_1_are_compatible_both_ways() {
        let new = full_hello();
        let old = OldHello::decode(new.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            (
                old.min_version,
                old.max_version,
                old.gateway_id.as_str(),
                old.link_index
            ),
            (1, 3, "gw-1", 3)
        );
        let back = crate::pb::Hello::decode(old.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.gateway_id, "gw-1");
        assert_eq!(back.instance_id, "");
        assert_eq!(
            (back.heartbeat_interval_ms, back.heartbeat_timeout_ms),
            (0, 0)
        );
        assert_eq!((back.max_frame_size, back.max_message_size), (0, 0));
        assert_eq!(back.client_queue_bytes, 0);
        assert!(back.capabilities.is_empty());
        assert_eq!((back.session_window, back.move_timeout_ms), (0, 0));
    }

    fn encode_all(codec: &FrameCodec, frames: &[Frame]) -> BytesMut {
        let mut buf = BytesMut::new();
        for f in frames {
            codec.encode(f, &mut buf).unwrap();
        }
        buf
    }

    #[test]
    fn round_trip_both_framings() {
        for framing in [Framing::Varint, Framing::U32Be] {
            let codec = FrameCodec::new(framing, 1 << 20);
            let frames = sample_frames();
            let mut buf = encode_all(&codec, &frames);
            let mut out = Vec::new();
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
            assert_eq!(out, frames, "{framing}");
            assert!(buf.is_empty());
        }
    }

    /// Feeding the stream split at every byte position yields the same frames.
    #[test]
    fn input_split_at_every_byte() {
        for framing in [Framing::Varint, Framing::U32Be] {
            let codec = FrameCodec::new(framing, 1 << 20);
            let frames = sample_frames();
            let wire = encode_all(&codec, &frames).freeze();
            for cut in 0..=wire.len() {
                let mut buf = BytesMut::new();
                let mut out = Vec::new();
                for part in [&wire[..cut], &wire[cut..]] {
                    buf.extend_from_slice(part);
                    while let Some(f) = codec.decode(&mut buf).unwrap() {
                        out.push(f);
                    }
                }
                assert_eq!(out, frames, "{framing} cut at {cut}");
            }
        }
    }

    /// One byte at a time: partial frames never produce a frame or an error.
    #[test]
    fn byte_at_a_time() {
        for framing in [Framing::Varint, Framing::U32Be] {
            let codec = FrameCodec::new(framing, 1 << 20);
            let frames = sample_frames();
            let wire = encode_all(&codec, &frames);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for b in wire.iter() {
                buf.extend_from_slice(&[*b]);
                while let Some(f) = codec.decode(&mut buf).unwrap() {
                    out.push(f);
                }
            }
            assert_eq!(out, frames);
        }
    }

    #[test]
    fn oversize_is_rejected_before_buffering() {
        let codec = FrameCodec::new(Framing::U32Be, 1024);
        let mut buf = BytesMut::from(&[0x00, 0x00, 0x04, 0x01][..]); // 1025
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::FrameTooLarge {
                len: 1025,
                max: 1024
            }
        ));
        // Nothing was reserved for the announced body.
        assert!(buf.capacity() < 1024);

        let codec = FrameCodec::new(Framing::Varint, 1024);
        let mut buf = BytesMut::new();
        prost::encode_length_delimiter(4 << 30, &mut buf).unwrap();
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(err, DecodeError::FrameTooLarge { .. }));
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn oversize_is_refused_on_encode() {
        let codec = FrameCodec::new(Framing::Varint, 100);
        let frame = Frame::data(1, Bytes::from(vec![1u8; 200]), false);
        let mut buf = BytesMut::new();
        assert!(matches!(
            codec.encode(&frame, &mut buf),
            Err(EncodeError::FrameTooLarge { .. })
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn exactly_max_is_accepted() {
        let frame = Frame::data(1, Bytes::from(vec![1u8; 100]), false);
        let len = prost::Message::encoded_len(&frame);
        for framing in [Framing::Varint, Framing::U32Be] {
            let codec = FrameCodec::new(framing, len);
            let mut buf = BytesMut::new();
            codec.encode(&frame, &mut buf).unwrap();
            assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame.clone()));
        }
    }

    /// Regression (fuzzing): with a maximum near `usize::MAX`, as
    /// `loadtest --max-frame` allows, `prefix + len` overflowed and the
    /// decoder panicked (`split_to` out of bounds in release builds).
    #[test]
    fn a_length_near_usize_max_is_refused_not_an_overflow() {
        for announced in [u64::MAX, u64::MAX - 1, u64::MAX - 9, 1 << 63] {
            let codec = FrameCodec::new(Framing::Varint, usize::MAX);
            let mut buf = BytesMut::new();
            prost::encode_length_delimiter(announced as usize, &mut buf).unwrap();
            buf.extend_from_slice(b"\x08\x01");
            assert!(matches!(
                codec.decode(&mut buf),
                Err(DecodeError::FrameTooLarge { .. })
            ));
        }
        assert_eq!(
            FrameCodec::new(Framing::Varint, usize::MAX).max_frame(),
            MAX_FRAME_LIMIT
        );
    }

    /// Regression (fuzzing): a 1 MiB `open` of empty headers decoded into
    /// about 48 MiB before the gateway rejected it. Entries are now counted
    /// on the wire first.
    #[test]
    fn repeated_fields_over_their_limit_are_refused_before_decoding() {
        use crate::limits::{MAX_CAPABILITIES, MAX_HEADERS};
        let open = |n: usize| crate::pb::SessionOpen {
            headers: vec![crate::pb::Header::default(); n],
            ..Default::default()
        };
        let frames = |n_headers: usize, n_caps: usize| {
            vec![
                Frame {
                    session_id: 3,
                    body: Some(Body::Open(open(n_headers))),
                },
                Frame::resume(3, open(n_headers), 0, 0),
                Frame::hello(crate::pb::Hello {
                    capabilities: vec![String::new(); n_caps],
                    ..Default::default()
                }),
                Frame::link(Body::HelloAck(crate::pb::HelloAck {
                    capabilities: vec![String::new(); n_caps],
                    ..Default::default()
                })),
            ]
        };
        let codec = FrameCodec::new(Framing::Varint, 1 << 20);
        for frame in frames(MAX_HEADERS, MAX_CAPABILITIES) {
            let mut buf = BytesMut::new();
            codec.encode(&frame, &mut buf).unwrap();
            assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame));
        }
        for frame in frames(MAX_HEADERS + 1, MAX_CAPABILITIES + 1) {
            let body = frame.encode_to_vec();
            let mut buf = BytesMut::new();
            prost::encode_length_delimiter(body.len(), &mut buf).unwrap();
            buf.extend_from_slice(&body);
            let err = codec.decode(&mut buf).unwrap_err();
            assert!(matches!(err, DecodeError::TooManyEntries(_)), "{err:?}");
            assert_eq!(err.session(), None, "the link is closed");
            assert!(buf.is_empty(), "the frame was consumed whole");
            assert!(matches!(
                codec.encode(&frame, &mut BytesMut::new()),
                Err(EncodeError::TooManyEntries(_))
            ));
        }
        // Entries add up across repeated occurrences of the message.
        let half = open(MAX_HEADERS / 2 + 1).encode_to_vec();
        let mut body = Vec::new();
        for _ in 0..2 {
            prost::encoding::encode_key(4, prost::encoding::WireType::LengthDelimited, &mut body);
            prost::encoding::encode_varint(half.len() as u64, &mut body);
            body.extend_from_slice(&half);
        }
        let mut buf = BytesMut::new();
        prost::encode_length_delimiter(body.len(), &mut buf).unwrap();
        buf.extend_from_slice(&body);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(DecodeError::TooManyEntries(_))
        ));
    }

    #[test]
    fn overlong_varint_is_an_error() {
        let codec = FrameCodec::new(Framing::Varint, 1024);
        let mut buf = BytesMut::from(&[0xff; 11][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(DecodeError::BadLengthPrefix)
        ));
        // A 10-byte varint whose last byte overflows 64 bits.
        let mut buf =
            BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(DecodeError::BadLengthPrefix)
        ));
        // Nine continuation bytes is still just incomplete.
        let mut buf = BytesMut::from(&[0x80; 9][..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }

    /// Deterministic pseudo-random numbers (xorshift).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn garbage_is_a_typed_error_never_a_panic_and_never_a_wrong_frame() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for framing in [Framing::Varint, Framing::U32Be] {
            let codec = FrameCodec::new(framing, 4096);
            for round in 0..4000 {
                // Short inputs often, long ones (past the maximum) too.
                let len = if round % 4 == 0 {
                    rng.below(6000)
                } else {
                    rng.below(64)
                };
                let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let mut buf = BytesMut::from(&bytes[..]);
                loop {
                    let before = buf.len();
                    match codec.decode(&mut buf) {
                        // A partial frame leaves the input untouched.
                        Ok(None) => {
                            assert_eq!(buf.len(), before);
                            break;
                        }
                        // Whatever decodes re-encodes to a frame that
                        // decodes the same: nothing is invented.
                        Ok(Some(frame)) => {
                            assert!(buf.len() < before, "a frame consumed nothing");
                            let mut again = BytesMut::new();
                            codec.encode(&frame, &mut again).unwrap();
                            assert_eq!(codec.decode(&mut again).unwrap(), Some(frame));
                        }
                        Err(_) => break,
                    }
                }
            }
        }
    }

    #[test]
    fn random_frames_split_anywhere_decode_to_themselves() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for framing in [Framing::Varint, Framing::U32Be] {
            let codec = FrameCodec::new(framing, 64 * 1024);
            for _ in 0..200 {
                let frames: Vec<Frame> = (0..rng.below(20) + 1)
                    .map(|_| {
                        let session = rng.next() >> rng.below(64);
                        let payload: Vec<u8> =
                            (0..rng.below(3000)).map(|_| rng.next() as u8).collect();
                        match rng.below(3) {
                            0 => Frame::data(session, Bytes::from(payload), false),
                            1 => Frame::close(session, 4000, "x".repeat(rng.below(200))),
                            _ => Frame::heartbeat(rng.next(), rng.below(2) == 0),
                        }
                    })
                    .collect();
                let mut wire = BytesMut::new();
                for f in &frames {
                    codec.encode(f, &mut wire).unwrap();
                }
                // Fed in random chunk sizes, as a socket would.
                let mut buf = BytesMut::new();
                let mut out = Vec::new();
                let mut rest = &wire[..];
                while !rest.is_empty() {
                    let n = (rng.below(700) + 1).min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    while let Some(f) = codec.decode(&mut buf).unwrap() {
                        out.push(f);
                    }
                }
                assert_eq!(out, frames);
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn empty_body_is_missing_body() {
        let codec = FrameCodec::new(Framing::Varint, 1024);
        let mut buf = BytesMut::from(&[0x00][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(DecodeError::MissingBody { session_id: 0 })
        ));
    }

    #[test]
    fn invalid_protobuf_is_an_error() {
        let codec = FrameCodec::new(Framing::U32Be, 1024);
        // Field 1 with wire type 7 (invalid).
        let mut buf = BytesMut::from(&[0, 0, 0, 2, 0x0f, 0x01][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(DecodeError::Protobuf(_))
        ));
    }

    #[test]
    fn an_invalid_frame_of_one_session_leaves_the_stream_in_sync() {
        let codec = FrameCodec::new(Framing::Varint, 1024);
        // Session 7's close, whose reason is not UTF-8 (0xff)...
        let mut buf = BytesMut::from(
            &[
                0x0a, 0x08, 0x07, 0x32, 0x06, 0x08, 0xa0, 0x1f, 0x12, 0x01, 0xff,
            ][..],
        );
        // ...then a valid frame for session 8.
        codec
            .encode(&Frame::data(8, Bytes::from_static(b"ok"), false), &mut buf)
            .unwrap();
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, DecodeError::InvalidBody { session_id: 7, .. }),
            "{err:?}"
        );
        assert_eq!(err.session(), Some(7));
        let next = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(next.session_id, 8);
        // Framing errors, and invalid link frames, have no session.
        assert_eq!(DecodeError::BadLengthPrefix.session(), None);
        assert_eq!(DecodeError::MissingBody { session_id: 7 }.session(), None);
    }

    /// The worked example in protocol/README.md, byte for byte.
    #[test]
    fn readme_worked_example() {
        let frame = Frame::data(5, Bytes::from_static(b"hi"), true);
        let mut varint = BytesMut::new();
        FrameCodec::new(Framing::Varint, 1024)
            .encode(&frame, &mut varint)
            .unwrap();
        assert_eq!(hex(&varint), "0a 08 05 2a 06 0a 02 68 69 10 01");
        let mut u32be = BytesMut::new();
        FrameCodec::new(Framing::U32Be, 1024)
            .encode(&frame, &mut u32be)
            .unwrap();
        assert_eq!(hex(&u32be), "00 00 00 0a 08 05 2a 06 0a 02 68 69 10 01");
    }

    /// The `window` example of protocol/README.md ("Version 3").
    #[test]
    fn readme_window_example() {
        let mut varint = BytesMut::new();
        FrameCodec::new(Framing::Varint, 1024)
            .encode(&Frame::window(5, 9192, 5), &mut varint)
            .unwrap();
        assert_eq!(hex(&varint), "09 08 05 52 05 08 e8 47 10 05");
    }

    fn hex(b: &[u8]) -> String {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

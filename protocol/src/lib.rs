//! The wire contract between the wss gateway and the protobuf TCP backend.
//!
//! This crate does no IO. It holds:
//! - [`pb`]: the messages generated from `proto/wsgw/v1/link.proto`;
//! - [`codec`]: length-prefixed framing (varint or 4-byte big-endian) with a
//!   maximum frame size enforced before any memory is reserved;
//! - [`limits`]: caps on the entries of repeated fields, checked on the
//!   wire before a frame is decoded;
//! - small constructors for the frames the gateway and backends send.
//!
//! `protocol/README.md` is the human-readable contract for backend teams.
// No unsafe code here: only the gateway binary has one documented exception
// (jemalloc's options in gateway/src/main.rs), so the workspace lint is deny.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod limits;

/// Messages generated from `proto/wsgw/v1/link.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/wsgw.v1.rs"));
}

pub use codec::{DecodeError, EncodeError, FrameCodec, Framing};
pub use pb::frame::Body;
pub use pb::Frame;

use bytes::Bytes;

/// Re-exported so users can call `Message` methods (`encoded_len`).
pub use prost;

/// The newest protocol version this build speaks (negotiated in the link
/// handshake). Version 2 adds `SessionDetached` and `SessionAttached`;
/// version 3 adds the optional capabilities [`CAP_FLOW`], [`CAP_MOVE`] and
/// [`CAP_FLEET`].
pub const PROTOCOL_VERSION: u32 = 3;

/// Version 3 capability: per-session flow control (`Window`).
pub const CAP_FLOW: &str = "flow";

/// Version 3 capability: sessions outlive their link (`SessionResume`,
/// acknowledgements in `Window.received`). Needs [`CAP_FLOW`].
pub const CAP_MOVE: &str = "move";

/// Version 3 capability: a session moves between the links of *different*
/// gateway instances of one fleet (`SessionResume.origin_instance_id`).
/// Needs [`CAP_MOVE`].
pub const CAP_FLEET: &str = "fleet";

/// What one `Data` costs of a flow-control window besides its payload.
pub const WINDOW_DATA_OVERHEAD: u64 = 64;

/// The cost of a `Data` with `payload_len` bytes against a window.
pub fn window_cost(payload_len: usize) -> u64 {
    payload_len as u64 + WINDOW_DATA_OVERHEAD
}

/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Session id 0 is reserved for link-level frames.
pub const LINK_SESSION_ID: u64 = 0;

/// A session's id on a link: non-zero (0 is [`LINK_SESSION_ID`]), chosen by
/// the gateway, unique for the life of one gateway process (across all its
/// links); another process's ids may collide with them by chance only
/// (they look random), so (`Hello.instance_id`, id) is what is unique for
/// certain across processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Frame {
    /// A link-level `Hello`. A gateway offers [`MIN_PROTOCOL_VERSION`] to
    /// [`PROTOCOL_VERSION`]; the caller fills in the rest.
    pub fn hello(hello: pb::Hello) -> Self {
        Self::link(Body::Hello(Box::new(hello)))
    }

    /// A link-level `HelloAck` choosing `version`.
    pub fn hello_ack(version: u32, backend_id: &str) -> Self {
        Self::link(Body::HelloAck(pb::HelloAck {
            version,
            backend_id: backend_id.to_owned(),
            ..Default::default()
        }))
    }

    /// A link-level heartbeat request (`ack == false`) or answer.
    pub fn heartbeat(nonce: u64, ack: bool) -> Self {
        Self::link(Body::Heartbeat(pb::Heartbeat { nonce, ack }))
    }

    /// One WebSocket message for `session_id`.
    pub fn data(session_id: u64, payload: Bytes, text: bool) -> Self {
        Self {
            session_id,
            body: Some(Body::Data(pb::Data { payload, text })),
        }
    }

    /// The end of `session_id`, with a WebSocket close code and reason.
    pub fn close(session_id: u64, code: u16, reason: impl Into<String>) -> Self {
        Self {
            session_id,
            body: Some(Body::Close(pb::SessionClose {
                code: u32::from(code),
                reason: reason.into(),
            })),
        }
    }

    /// The session's client connection was lost; it may resume (v2).
    pub fn detached(session_id: u64, reason: impl Into<String>, grace_ms: u64) -> Self {
        Self {
            session_id,
            body: Some(Body::Detached(pb::SessionDetached {
                reason: reason.into(),
                grace_ms,
            })),
        }
    }

    /// The session's client resumed on a new connection (v2).
    pub fn attached(session_id: u64, remote_addr: impl Into<String>, replayed: u64) -> Self {
        Self {
            session_id,
            body: Some(Body::Attached(pb::SessionAttached {
                remote_addr: remote_addr.into(),
                replayed,
            })),
        }
    }

    /// A flow-control grant (and acknowledgement) for `session_id` (v3).
    pub fn window(session_id: u64, limit: u64, received: u64) -> Self {
        Self {
            session_id,
            body: Some(Body::Window(pb::Window { limit, received })),
        }
    }

    /// Re-announces a session on a new link after its link was lost (v3,
    /// "move").
    pub fn resume(session_id: u64, open: pb::SessionOpen, received: u64, limit: u64) -> Self {
        Self {
            session_id,
            body: Some(Body::Resume(pb::SessionResume {
                open: Some(Box::new(open)),
                received,
                limit,
                origin_instance_id: String::new(),
            })),
        }
    }

    /// Moves a data payload into an allocation of its own size. A payload
    /// taken from a read buffer without copying keeps that whole buffer
    /// alive; a frame that is going to wait in a queue is compacted so that
    /// the queue holds what it counts.
    pub fn compact(&mut self) {
        if let Some(Body::Data(d)) = &mut self.body {
            d.payload = Bytes::copy_from_slice(&d.payload);
        }
    }

    fn link(body: Body) -> Self {
        Self {
            session_id: LINK_SESSION_ID,
            body: Some(body),
        }
    }
}

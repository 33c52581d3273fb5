//! The wire contract between the wss gateway and the protobuf TCP backend.
//!
//! This crate does no IO. It holds:
//! - [`pb`]: the messages generated from `proto/wsgw/v1/link.proto`;
//! - [`codec`]: length-prefixed framing (varint or 4-byte big-endian) with a
//!   maximum frame size enforced before any memory is reserved;
//! - small constructors for the frames the gateway and backends send.
//!
//! `protocol/README.md` is the human-readable contract for backend teams.
#![warn(missing_docs)]

pub mod codec;

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

/// The protocol version this build speaks (negotiated in the link handshake).
pub const PROTOCOL_VERSION: u32 = 1;

/// Session id 0 is reserved for link-level frames.
pub const LINK_SESSION_ID: u64 = 0;

impl Frame {
    /// A link-level `Hello` offering exactly [`PROTOCOL_VERSION`].
    pub fn hello(gateway_id: &str, link_index: u32) -> Self {
        Self::link(Body::Hello(pb::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            gateway_id: gateway_id.to_owned(),
            link_index,
        }))
    }

    /// A link-level `HelloAck` choosing `version`.
    pub fn hello_ack(version: u32, backend_id: &str) -> Self {
        Self::link(Body::HelloAck(pb::HelloAck {
            version,
            backend_id: backend_id.to_owned(),
            error: String::new(),
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

    fn link(body: Body) -> Self {
        Self {
            session_id: LINK_SESSION_ID,
            body: Some(body),
        }
    }
}

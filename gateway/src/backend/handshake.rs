//! The link handshake: the gateway sends `Hello` offering the protocol
//! versions it speaks (and its identity and limits), the backend answers
//! `HelloAck` choosing one.
//!
//! A failed handshake means the backend at that address does not speak the
//! protocol as this gateway is configured (wrong port, wrong framing, a
//! version gap, a broken backend): reconnecting will not fix it, so each
//! [`HandshakeError`] says what was wrong and what to check, and the pool
//! logs every one at error level.

use std::ops::RangeInclusive;
use std::time::Duration;

use bytes::BytesMut;
use protocol::{pb, Body, DecodeError, Frame, FrameCodec, Framing};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::flow::Caps;
use super::LinkError;

/// What a completed handshake gives the link.
pub(crate) struct Handshaken {
    /// Bytes read past the `HelloAck`; they belong to the reader.
    pub(crate) leftover: BytesMut,
    /// The backend's name for itself, for logs.
    pub(crate) backend_id: String,
    /// The protocol version the backend chose.
    pub(crate) version: u32,
    /// The version 3 capabilities it adopted.
    pub(crate) caps: Caps,
}

/// Why a link's handshake failed, with what an operator should check.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// No complete frame arrived within `backend.handshake_timeout`.
    #[error(
        "no hello_ack within {timeout:?} (backend.handshake_timeout): check that the endpoint \
         is a backend of this protocol (protocol/README.md) and that it uses {framing} framing \
         (backend.framing)"
    )]
    Timeout {
        /// The deadline that passed.
        timeout: Duration,
        /// The gateway's framing, which the backend must share.
        framing: Framing,
    },
    /// The backend closed the connection before answering.
    #[error(
        "the backend closed the connection without answering hello: check that it uses \
         {framing} framing (backend.framing) and accepts frames of {max_frame} bytes \
         (backend.max_frame_size), and see its logs"
    )]
    Closed {
        /// The gateway's framing.
        framing: Framing,
        /// The gateway's maximum frame size, announced in `Hello`.
        max_frame: usize,
    },
    /// Reading or writing failed before the answer arrived.
    #[error(
        "the connection failed during the handshake ({source}): check that the backend uses \
         {framing} framing (backend.framing), and see its logs"
    )]
    Io {
        /// The socket error.
        source: std::io::Error,
        /// The gateway's framing.
        framing: Framing,
    },
    /// The backend's bytes are not a frame in the configured framing.
    #[error(
        "the backend's answer is not a {framing}-framed protocol frame ({source}): check that \
         backend.framing matches the backend's framing and that the endpoint speaks this \
         protocol"
    )]
    Undecodable {
        /// What the decoder found.
        source: DecodeError,
        /// The gateway's framing.
        framing: Framing,
    },
    /// The first frame was not a `HelloAck`.
    #[error(
        "the backend answered hello with a {kind} frame: it must answer with exactly one \
         hello_ack first (protocol/README.md, \"Link lifecycle\"); fix the backend"
    )]
    NotHelloAck {
        /// The kind of frame it sent.
        kind: &'static str,
    },
    /// The backend answered `version: 0`: no version in common.
    #[error(
        "backend {backend_id:?} refused every protocol version this gateway speaks \
         ({offered:?}), saying {error:?}: upgrade the backend or the gateway so they share \
         a version"
    )]
    Refused {
        /// The backend's name from its `HelloAck`.
        backend_id: String,
        /// The versions offered.
        offered: RangeInclusive<u32>,
        /// The backend's explanation.
        error: String,
    },
    /// The backend chose a version that was not offered.
    #[error(
        "backend {backend_id:?} chose protocol version {chosen}, which is outside the offered \
         {offered:?}: fix the backend (it must choose within [min_version, max_version], or \
         answer 0)"
    )]
    BadVersion {
        /// The backend's name from its `HelloAck`.
        backend_id: String,
        /// The version it chose.
        chosen: u32,
        /// The versions offered.
        offered: RangeInclusive<u32>,
    },
    /// The backend's version 3 capabilities or window are not usable.
    #[error("backend {backend_id:?} answered hello with {detail}: fix the backend")]
    BadCapabilities {
        /// The backend's name from its `HelloAck`.
        backend_id: String,
        /// What was wrong.
        detail: String,
    },
}

impl HandshakeError {
    /// Label for the `link_handshake_failures` metric.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Closed { .. } => "closed",
            Self::Io { .. } => "io",
            Self::Undecodable { .. } => "undecodable",
            Self::NotHelloAck { .. } => "not_hello_ack",
            Self::Refused { .. } => "refused",
            Self::BadVersion { .. } => "bad_version",
            Self::BadCapabilities { .. } => "bad_capabilities",
        }
    }
}

/// Sends `hello` and waits up to `timeout` for a `HelloAck` choosing a
/// version in its range.
pub(crate) async fn handshake<S>(
    stream: &mut S,
    codec: &FrameCodec,
    hello: &pb::Hello,
    timeout: Duration,
) -> Result<Handshaken, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let framing = codec.framing();
    let mut out = BytesMut::new();
    // Cannot fail: a Hello is a few hundred bytes at most, and the frame
    // size is validated to be far larger.
    if let Err(e) = codec.encode(&Frame::hello(hello.clone()), &mut out) {
        return Err(LinkError::Protocol(format!("cannot encode hello: {e}")));
    }
    let io = |source| HandshakeError::Io { source, framing };
    let exchange = async {
        stream.write_all(&out).await.map_err(io)?;
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => return Ok((frame, buf)),
                Ok(None) => {}
                Err(source) => return Err(HandshakeError::Undecodable { source, framing }),
            }
            if stream.read_buf(&mut buf).await.map_err(io)? == 0 {
                return Err(HandshakeError::Closed {
                    framing,
                    max_frame: codec.max_frame(),
                });
            }
        }
    };
    let (frame, leftover) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout { timeout, framing })??;
    let offered = hello.min_version..=hello.max_version;
    let ack = match frame.body {
        Some(Body::HelloAck(ack)) => ack,
        // The decoder refuses frames without a body.
        Some(other) => Err(HandshakeError::NotHelloAck { kind: other.kind() })?,
        None => Err(HandshakeError::NotHelloAck { kind: "body-less" })?,
    };
    if offered.contains(&ack.version) {
        let caps = capabilities(hello, &ack)?;
        Ok(Handshaken {
            leftover,
            backend_id: ack.backend_id,
            version: ack.version,
            caps,
        })
    } else if ack.version == 0 {
        Err(HandshakeError::Refused {
            backend_id: ack.backend_id,
            offered,
            error: ack.error,
        }
        .into())
    } else {
        Err(HandshakeError::BadVersion {
            backend_id: ack.backend_id,
            chosen: ack.version,
            offered,
        }
        .into())
    }
}

/// What a version 3 backend adopted, checked: only capabilities offered,
/// "move" only with "flow", and a window that fits the largest message.
fn capabilities(hello: &pb::Hello, ack: &pb::HelloAck) -> Result<Caps, HandshakeError> {
    let bad = |detail: String| HandshakeError::BadCapabilities {
        backend_id: ack.backend_id.clone(),
        detail,
    };
    if ack.version < 3 {
        return Ok(Caps::default());
    }
    if let Some(c) = ack
        .capabilities
        .iter()
        .find(|c| !hello.capabilities.contains(c))
    {
        return Err(bad(format!(
            "the capability {c:?}, which was not offered (offered: {:?})",
            hello.capabilities
        )));
    }
    let has = |name: &str| ack.capabilities.iter().any(|c| c == name);
    let (flow, moves) = (has(protocol::CAP_FLOW), has(protocol::CAP_MOVE));
    if moves && !flow {
        return Err(bad(
            "the capability \"move\" without \"flow\" (acknowledgements ride on windows)".into(),
        ));
    }
    let fleet = has(protocol::CAP_FLEET);
    if fleet && !moves {
        return Err(bad(
            "the capability \"fleet\" without \"move\" (a handed-over session moves)".into(),
        ));
    }
    if !flow {
        return Ok(Caps::default());
    }
    let backend_window = match ack.session_window {
        0 => hello.session_window,
        w => w,
    };
    let needed = protocol::window_cost(hello.max_message_size as usize);
    if backend_window < needed {
        return Err(bad(format!(
            "session_window {backend_window}, smaller than the largest message \
             (max_message_size {} + 64 = {needed}): such a message could never be sent",
            hello.max_message_size
        )));
    }
    Ok(Caps {
        flow,
        moves,
        fleet,
        backend_window,
    })
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;

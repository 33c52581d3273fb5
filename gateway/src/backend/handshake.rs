//! The link handshake: the gateway sends `Hello` offering the protocol
//! versions it speaks, the backend answers `HelloAck` choosing one.

use std::time::Duration;

use bytes::BytesMut;
use protocol::{Body, Frame, FrameCodec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::LinkError;

/// What a completed handshake gives the link.
pub(crate) struct Handshaken {
    /// Bytes read past the `HelloAck`; they belong to the reader.
    pub(crate) leftover: BytesMut,
    /// The backend's name for itself, for logs.
    pub(crate) backend_id: String,
    /// The protocol version the backend chose.
    pub(crate) version: u32,
}

/// Sends `Hello` and waits up to `timeout` for a compatible `HelloAck`.
pub(crate) async fn handshake<S>(
    stream: &mut S,
    codec: &FrameCodec,
    gateway_id: &str,
    index: u32,
    timeout: Duration,
) -> Result<Handshaken, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    codec
        .encode(&Frame::hello(gateway_id, index), &mut out)
        .map_err(|e| LinkError::Handshake(e.to_string()))?;
    let exchange = async {
        stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            if let Some(frame) = codec.decode(&mut buf)? {
                return Ok::<_, LinkError>((frame, buf));
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(LinkError::Eof);
            }
        }
    };
    let (frame, leftover) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| LinkError::Handshake(format!("no HelloAck within {timeout:?}")))??;
    let offered = protocol::MIN_PROTOCOL_VERSION..=protocol::PROTOCOL_VERSION;
    match frame.body {
        Some(Body::HelloAck(ack)) if offered.contains(&ack.version) => Ok(Handshaken {
            leftover,
            backend_id: ack.backend_id,
            version: ack.version,
        }),
        Some(Body::HelloAck(ack)) if ack.version == 0 => Err(LinkError::Handshake(format!(
            "backend refused every protocol version we offer ({offered:?}): {}",
            ack.error
        ))),
        Some(Body::HelloAck(ack)) => Err(LinkError::Handshake(format!(
            "backend chose protocol version {}, we offered {offered:?}",
            ack.version,
        ))),
        Some(other) => Err(LinkError::Handshake(format!(
            "expected hello_ack, got {}",
            other.kind()
        ))),
        None => Err(LinkError::Handshake("empty frame".into())),
    }
}

//! Frames from the client: control frames, closes, read errors.

use std::time::Duration;

use fastwebsockets::{Frame as WsFrame, OpCode, Payload, WebSocketError};
use protocol::{Frame, SessionId};
use tracing::debug;

use super::connection::{ClientFrame, Connection, ReadError};
use super::End;
use crate::close::{self, CloseReason};

/// How long the gateway tries to echo a client's close frame.
const CLOSE_ECHO_DEADLINE: Duration = Duration::from_secs(1);

/// Handles one client frame: control frames are answered here; data frames
/// are reassembled, and a complete message is returned for the backend.
pub(super) async fn on_client_frame(
    frame: ClientFrame,
    conn: &mut Connection,
    id: SessionId,
    max_message: usize,
    write_timeout: Duration,
) -> Result<Option<Frame>, End> {
    // RFC 6455 5.5: control frames carry at most 125 bytes. fastwebsockets
    // checks this for pings only.
    if matches!(frame.opcode, OpCode::Close | OpCode::Pong) && frame.payload.len() > 125 {
        return Err(End::clean(CloseReason::ClientProtocolError(
            "control frame larger than 125 bytes".into(),
        )));
    }
    match frame.opcode {
        // Boxed, as the close below: a data message, the common case,
        // waits for nothing, and this future is part of the session's loop.
        OpCode::Ping => Box::pin(on_client_ping(&frame.payload, conn, write_timeout)).await,
        OpCode::Pong => Ok(None),
        OpCode::Close => Err(Box::pin(on_client_close(&frame.payload, conn)).await),
        OpCode::Text | OpCode::Binary | OpCode::Continuation => {
            let message = conn
                .assembler
                .push(frame.opcode, frame.fin, frame.payload, max_message)
                .map_err(End::clean)?;
            Ok(message.map(|(payload, text)| Frame::data(id.0, payload, text)))
        }
    }
}

/// Answers a ping with its pong.
async fn on_client_ping(
    payload: &[u8],
    conn: &mut Connection,
    write_timeout: Duration,
) -> Result<Option<Frame>, End> {
    let pong = WsFrame::pong(Payload::Borrowed(payload));
    match conn.write_flush(pong, write_timeout).await {
        Ok(()) => Ok(None),
        Err(Some(_)) => Err(End::broken(CloseReason::ClientLost)),
        Err(None) => Err(End::broken(CloseReason::ClientTimeout)),
    }
}

/// Validates the client's close, echoes it, and returns the session's end.
pub(super) async fn on_client_close(payload: &[u8], conn: &mut Connection) -> End {
    let (code, reason) = match payload {
        [] => (close::code::NO_STATUS, String::new()),
        [_] => {
            return End::clean(CloseReason::ClientProtocolError(
                "close frame with a 1-byte payload".into(),
            ))
        }
        [hi, lo, rest @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close::client_code_allowed(code) {
                return End::clean(CloseReason::ClientProtocolError(
                    format!("invalid close code {code}").into(),
                ));
            }
            match std::str::from_utf8(rest) {
                Ok(r) => (code, r.to_owned()),
                Err(_) => return End::clean(CloseReason::ClientInvalidUtf8),
            }
        }
    };
    // Echo the client's code, as RFC 6455 section 5.5.1 asks.
    let echo = if code == close::code::NO_STATUS {
        WsFrame::close_raw(Payload::Borrowed(&[]))
    } else {
        WsFrame::close(code, reason.as_bytes())
    };
    let _ = conn.write_flush(echo, CLOSE_ECHO_DEADLINE).await;
    End::broken(CloseReason::ClientClosed { code, reason })
}

/// The end of a session whose client sent no (valid) frame: 1002 for a
/// protocol violation, 1009 / 1007 for size and UTF-8, else a lost client.
pub(super) fn read_error_end(e: ReadError) -> End {
    use WebSocketError as E;
    let e = match e {
        ReadError::Unmasked => {
            return End::clean(CloseReason::ClientProtocolError(
                "unmasked client frame".into(),
            ))
        }
        ReadError::Ws(e) => e,
    };
    match e {
        E::FrameTooLarge => End::clean(CloseReason::ClientMessageTooBig),
        E::InvalidUTF8 => End::clean(CloseReason::ClientInvalidUtf8),
        E::ReservedBitsNotZero => {
            End::clean(CloseReason::ClientProtocolError("reserved bits set".into()))
        }
        E::ControlFrameFragmented => End::clean(CloseReason::ClientProtocolError(
            "fragmented control frame".into(),
        )),
        E::PingFrameTooLarge => End::clean(CloseReason::ClientProtocolError(
            "control frame too large".into(),
        )),
        E::InvalidValue => End::clean(CloseReason::ClientProtocolError("unknown opcode".into())),
        E::InvalidFragment | E::InvalidContinuationFrame => End::clean(
            CloseReason::ClientProtocolError("invalid fragmentation".into()),
        ),
        E::InvalidCloseFrame | E::InvalidCloseCode => End::clean(CloseReason::ClientProtocolError(
            "invalid close frame".into(),
        )),
        other => {
            debug!(error = %other, "client connection ended");
            End::broken(CloseReason::ClientLost)
        }
    }
}

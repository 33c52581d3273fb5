//! Frames from the client: control frames, closes, read errors.

use super::*;

/// Handles one client frame: control frames are answered here; data frames
/// are reassembled, and a complete message is returned for the backend.
pub(super) async fn on_client_frame(
    frame: ClientFrame,
    assembler: &mut Assembler,
    writer: &mut Writer,
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
        OpCode::Ping => {
            let pong = async {
                writer
                    .write_frame(WsFrame::pong(Payload::Borrowed(&frame.payload)))
                    .await?;
                writer.flush().await
            };
            match Box::pin(tokio::time::timeout(write_timeout, pong)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(End::broken(CloseReason::ClientLost)),
                Err(_) => return Err(End::broken(CloseReason::ClientTimeout)),
            }
            Ok(None)
        }
        OpCode::Pong => Ok(None),
        OpCode::Close => Err(Box::pin(on_client_close(&frame.payload, writer)).await),
        OpCode::Text | OpCode::Binary | OpCode::Continuation => {
            let message = assembler
                .push(frame.opcode, frame.fin, frame.payload, max_message)
                .map_err(End::clean)?;
            Ok(message.map(|(payload, text)| Frame::data(id.0, payload, text)))
        }
    }
}

/// Validates the client's close, echoes it, and returns the session's end.
pub(super) async fn on_client_close(payload: &[u8], writer: &mut Writer) -> End {
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
    let write = async {
        writer.write_frame(echo).await?;
        writer.flush().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
    End::broken(CloseReason::ClientClosed { code, reason })
}

pub(super) fn ws_error_end(e: WebSocketError) -> End {
    use WebSocketError as E;
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

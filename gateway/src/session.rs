//! Stage 4: one task per client, relaying between its WebSocket and its
//! backend link.
//!
//! The task selects over: the client's next frame, the session's mailbox
//! (backend frames), room on the link when a message is waiting for it, the
//! ping timer, eviction by the link reader, and gateway shutdown.
//!
//! fastwebsockets' `read_frame` is not cancel-safe, so the read future owns
//! the read half and is kept across loop iterations (`read.set(..)` starts
//! the next read only after one completed); it is never dropped midway
//! except when the connection is torn down.
//!
//! Backpressure: while a client message waits for room on the link
//! (`pending`), the client is not read. Backend messages keep flowing to the
//! client meanwhile.

use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fastwebsockets::{
    Frame as WsFrame, OpCode, Payload, Role, WebSocket, WebSocketError, WebSocketRead,
    WebSocketWrite,
};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use protocol::{pb, Body, Frame};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::close::{self, CloseReason};
use crate::link::{cost_of, Evict, LinkHandle, Mailbox, ToClient, TrySend};
use crate::pool::Lease;
use crate::{SessionId, Shared};

type Io = TokioIo<Upgraded>;
type Reader<'a> = WebSocketRead<&'a mut ReadHalf<Io>>;
type Writer = WebSocketWrite<WriteHalf<Io>>;

/// Backend messages written to the client before one flush.
const WRITE_BATCH: usize = 64;

/// Everything a session needs, prepared by the upgrade handler.
pub(crate) struct SessionStart {
    pub(crate) id: SessionId,
    pub(crate) lease: Lease,
    pub(crate) open: pb::SessionOpen,
    /// Admission permit, held for the session's whole life.
    pub(crate) _permit: OwnedSemaphorePermit,
}

/// How a session ended, and whether a close frame can still be written.
struct End {
    reason: CloseReason,
    /// False when the stream is broken (IO error, a write aborted midway) or
    /// the client already received its close.
    can_write: bool,
    /// The client may still be sending: drain the raw connection briefly
    /// before closing it.
    linger: bool,
}

impl End {
    fn clean(reason: CloseReason) -> Self {
        Self {
            reason,
            can_write: true,
            linger: false,
        }
    }

    fn broken(reason: CloseReason) -> Self {
        Self {
            reason,
            can_write: false,
            linger: false,
        }
    }
}

/// Runs one session to its end.
pub(crate) async fn run(ws: WebSocket<Io>, start: SessionStart, shared: Arc<Shared>) {
    let id = start.id;
    let link = start.lease.link().clone();
    let cfg = &shared.config.session;
    shared.metrics.session_opened();
    debug!(link = link.index(), "session open");

    // The read half stays ours (fastwebsockets only borrows it), so that
    // after an error close the connection can be drained below.
    let (mut raw_read, raw_write) = tokio::io::split(ws.into_inner());
    let (mut reader, mut writer) =
        fastwebsockets::after_handshake_split(&mut raw_read, raw_write, Role::Server);
    // The gateway answers pings and closes itself: it must see them to keep
    // liveness and to map closes through its table.
    reader.set_auto_close(false);
    reader.set_auto_pong(false);
    // fastwebsockets refuses frames of `>= limit` bytes.
    reader.set_max_message_size(cfg.max_message_size.bytes().saturating_add(1));
    writer.set_auto_apply_mask(false);

    let end = match link.register(id) {
        Ok(mailbox) => {
            let open = Frame {
                session_id: id.0,
                body: Some(Body::Open(start.open)),
            };
            match Box::pin(link.reserve(cost_of(&open))).await {
                Ok(slot) => {
                    slot.send(open);
                    relay(reader, &mut writer, mailbox, &link, id, &shared).await
                }
                Err(_) => End::clean(CloseReason::LinkLost),
            }
        }
        Err(_) => End::clean(CloseReason::LinkLost),
    };

    if let Some((code, reason)) = end.reason.to_backend() {
        // The link may be gone or full; a session's close is worth a short
        // wait, and the backend learns of lost links by itself.
        let frame = Frame::close(id.0, code, reason);
        let wait = Duration::from_secs(1);
        if let Ok(Ok(slot)) =
            Box::pin(tokio::time::timeout(wait, link.reserve(cost_of(&frame)))).await
        {
            slot.send(frame);
        }
    }
    link.unregister(id);

    if end.linger {
        Box::pin(linger(&mut raw_read, cfg.close_timeout)).await;
    }
    // The relay loop already sent the client its close frame; dropping
    // the write half (the read half is gone) closes the connection.
    drop(writer);

    let label = end.reason.label();
    shared.metrics.session_closed(label);
    if end.reason.is_notable() {
        warn!(session = id.0, reason = label, detail = ?end.reason, "session closed");
    } else {
        debug!(reason = label, detail = ?end.reason, "session closed");
    }
    drop(start.lease);
}

/// Reads and discards what the client still sends, until it closes or
/// `limit` passes; memory use is one small buffer.
async fn linger(rd: &mut ReadHalf<Io>, limit: Duration) {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 4096];
    let drain = async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(limit, drain).await;
}

/// One complete frame from the client, with its payload owned.
struct ClientFrame {
    fin: bool,
    opcode: OpCode,
    payload: BytesMut,
}

async fn read_frame(mut reader: Reader<'_>) -> (Reader<'_>, Result<ClientFrame, WebSocketError>) {
    // With auto-close and auto-pong off, fastwebsockets never asks us to
    // send anything from inside `read_frame`.
    let res = reader
        .read_frame(&mut |_| async { Ok::<(), WebSocketError>(()) })
        .await
        .map(|f| ClientFrame {
            fin: f.fin,
            opcode: f.opcode,
            payload: match f.payload {
                Payload::Bytes(b) => b,
                other => BytesMut::from(&other[..]),
            },
        });
    (reader, res)
}

/// The relay loop. Returns how the session ended, after the client was sent
/// its close frame where one is due.
async fn relay(
    reader: Reader<'_>,
    writer: &mut Writer,
    mut mailbox: Mailbox,
    link: &LinkHandle,
    id: SessionId,
    shared: &Shared,
) -> End {
    let cfg = &shared.config.session;
    let max_message = cfg.max_message_size.bytes();
    let mut read = pin!(read_frame(reader));
    let mut reading = true;
    let mut assembler = Assembler::default();
    let mut pending: Option<Frame> = None;
    let mut last_heard = Instant::now();
    let mut ping_sent = false;
    // Both are created once and kept across iterations: re-creating them
    // per message would re-register a timer and a waiter every time.
    let mut draining = pin!(shared.drain.notified());
    let mut ping_timer = pin!(tokio::time::sleep(cfg.ping_interval));
    // `notify_waiters` only reaches futures that existed when it was
    // called; a session that starts during shutdown sees the token instead.
    let already_draining = shared.shutdown.is_cancelled();

    let end = loop {
        if already_draining {
            break End::clean(CloseReason::Shutdown);
        }
        tokio::select! {
            biased;
            ev = &mut mailbox.evict => {
                match ev {
                    Ok(Evict::SlowConsumer) => break End::clean(CloseReason::SlowConsumer),
                    // The link is gone: deliver what it had already queued,
                    // then close with "reconnect".
                    Err(_) => break Box::pin(drain_after_link_loss(writer, &mut mailbox, max_message, cfg.ping_timeout)).await,
                }
            }
            _ = &mut draining => break End::clean(CloseReason::Shutdown),
            msg = mailbox.rx.recv() => {
                let Some(msg) = msg else {
                    // Sender dropped: eviction is reported just above.
                    continue;
                };
                let mut res = Box::pin(deliver_first(writer, msg, &mut mailbox.rx, &mailbox.queued_bytes, &mut mailbox.evict, max_message, cfg.ping_timeout)).await;
                if let Err(e) = res.take_end() {
                    break e;
                }
                if res.link_lost {
                    break Box::pin(drain_after_link_loss(writer, &mut mailbox, max_message, cfg.ping_timeout)).await;
                }
            }
            slot = link.reserve(pending.as_ref().map_or(0, cost_of)), if pending.is_some() => {
                match (slot, pending.take()) {
                    (Ok(slot), Some(frame)) => slot.send(frame),
                    _ => break End::clean(CloseReason::LinkLost),
                }
            }
            (r, res) = &mut read, if reading && pending.is_none() => {
                last_heard = Instant::now();
                ping_sent = false;
                read.set(read_frame(r));
                let frame = match res {
                    Ok(f) => f,
                    Err(e) => {
                        reading = false;
                        break ws_error_end(e);
                    }
                };
                match on_client_frame(frame, &mut assembler, writer, id, max_message).await {
                    Ok(None) => {}
                    Ok(Some(out)) => match link.try_send(out) {
                        TrySend::Sent => {}
                        TrySend::Full(frame) => pending = Some(*frame),
                        TrySend::Gone => break End::clean(CloseReason::LinkLost),
                    },
                    Err(end) => {
                        // After the client's close there is nothing more to
                        // read; after a message-level error the stream is
                        // still in sync and is drained for the close reply.
                        if matches!(end.reason, CloseReason::ClientClosed { .. }) {
                            reading = false;
                        }
                        break end;
                    }
                }
            }
            // The timer is re-armed only when it fires, not per message:
            // it then looks at when the client was last heard from.
            _ = &mut ping_timer => {
                let now = Instant::now();
                if now < last_heard + cfg.ping_interval {
                    ping_timer.as_mut().reset(last_heard + cfg.ping_interval);
                    continue;
                }
                if ping_sent {
                    break End::broken(CloseReason::ClientTimeout);
                }
                ping_sent = true;
                ping_timer.as_mut().reset(now + cfg.ping_timeout);
                let ping = async {
                    writer.write_frame(WsFrame::new(true, OpCode::Ping, None, Payload::Borrowed(b"gw"))).await?;
                    writer.flush().await
                };
                if Box::pin(tokio::time::timeout(cfg.ping_timeout, ping)).await.map_or(true, |r| r.is_err()) {
                    break End::broken(CloseReason::ClientTimeout);
                }
            }
        }
    };

    // A client message accepted from the client but still waiting for room
    // is sent now if the link has room within a short wait: it was accepted,
    // so the backend should see it before the close.
    if let Some(frame) = pending.take() {
        if let Ok(Ok(slot)) = Box::pin(tokio::time::timeout(
            Duration::from_secs(1),
            link.reserve(cost_of(&frame)),
        ))
        .await
        {
            slot.send(frame);
        }
    }

    // When the gateway closes, send the close and, if the client's side is
    // still readable, wait (bounded) for its reply so that it sees a clean
    // close handshake.
    if end.can_write {
        if let Some(c) = end.reason.to_client() {
            let write = async {
                writer
                    .write_frame(WsFrame::close(c.code, c.reason.as_bytes()))
                    .await?;
                writer.flush().await
            };
            let sent = matches!(
                Box::pin(tokio::time::timeout(cfg.close_timeout, write)).await,
                Ok(Ok(()))
            );
            if sent && reading {
                let drain = async {
                    loop {
                        let (r, res) = (&mut read).await;
                        match res {
                            Ok(f) if f.opcode == OpCode::Close => break,
                            Ok(_) => read.set(read_frame(r)),
                            Err(_) => break,
                        }
                    }
                };
                let _ = Box::pin(tokio::time::timeout(cfg.close_timeout, drain)).await;
            } else if sent {
                // The frame stream is unusable (say, a frame over the size
                // limit whose payload was never read), but the client must
                // still get to read our close: closing a socket with unread
                // input sends a reset, which can destroy the close frame in
                // the client's buffers. Linger instead.
                return End {
                    reason: end.reason,
                    can_write: false,
                    linger: true,
                };
            }
        }
    }
    End::broken(end.reason)
}

/// Result of writing a batch of backend messages to the client.
struct Delivered {
    end: Option<End>,
    link_lost: bool,
}

impl Delivered {
    fn take_end(&mut self) -> Result<(), End> {
        match self.end.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Writes `first` and whatever else is already queued (up to a batch), then
/// flushes once. The write is abandoned if the link reader evicts the
/// session as a slow consumer meanwhile, or if the client has not taken it
/// within `write_timeout`.
async fn deliver_first(
    writer: &mut Writer,
    first: ToClient,
    rx: &mut tokio::sync::mpsc::Receiver<ToClient>,
    queued_bytes: &std::sync::atomic::AtomicUsize,
    evict: &mut tokio::sync::oneshot::Receiver<Evict>,
    max_message: usize,
    write_timeout: Duration,
) -> Delivered {
    let write = async {
        let mut msg = Some(first);
        let mut written = 0;
        while let Some(m) = msg.take() {
            let len = match &m {
                ToClient::Data { payload, .. } => payload.len(),
                ToClient::Close { .. } => 0,
            };
            let res = write_one(writer, m, max_message).await;
            queued_bytes.fetch_sub(len, Ordering::Relaxed);
            res?;
            written += 1;
            if written < WRITE_BATCH {
                msg = rx.try_recv().ok();
            }
        }
        writer
            .flush()
            .await
            .map_err(|_| End::broken(CloseReason::ClientLost))
    };
    let mut write = pin!(write);
    let timer = tokio::time::sleep(write_timeout);
    let mut timer = pin!(timer);
    let mut link_lost = false;
    loop {
        tokio::select! {
            biased;
            r = &mut write => {
                return Delivered { end: r.err(), link_lost };
            }
            ev = &mut *evict, if !link_lost => {
                match ev {
                    // The client is not reading: abandon the write (the
                    // stream is now mid-frame, so no close frame can follow).
                    Ok(Evict::SlowConsumer) => {
                        return Delivered { end: Some(End::broken(CloseReason::SlowConsumer)), link_lost };
                    }
                    // Finish this write; the caller closes with 1012 after.
                    Err(_) => link_lost = true,
                }
            }
            _ = &mut timer => {
                return Delivered { end: Some(End::broken(CloseReason::SlowConsumer)), link_lost };
            }
        }
    }
}

/// The link is gone: deliver what it had already queued for the client,
/// then end with "reconnect" (1012).
async fn drain_after_link_loss(
    writer: &mut Writer,
    mailbox: &mut Mailbox,
    max_message: usize,
    write_timeout: Duration,
) -> End {
    while let Ok(msg) = mailbox.rx.try_recv() {
        if let Err(e) = deliver(writer, msg, mailbox, max_message, write_timeout).await {
            return e;
        }
    }
    End::clean(CloseReason::LinkLost)
}

/// Writes one queued message after the link was lost (no eviction to race).
async fn deliver(
    writer: &mut Writer,
    msg: ToClient,
    mailbox: &mut Mailbox,
    max_message: usize,
    write_timeout: Duration,
) -> Result<(), End> {
    let len = match &msg {
        ToClient::Data { payload, .. } => payload.len(),
        ToClient::Close { .. } => 0,
    };
    let write = async {
        write_one(writer, msg, max_message).await?;
        writer
            .flush()
            .await
            .map_err(|_| End::broken(CloseReason::ClientLost))
    };
    let res = tokio::time::timeout(write_timeout, write)
        .await
        .unwrap_or_else(|_| Err(End::broken(CloseReason::SlowConsumer)));
    mailbox.queued_bytes.fetch_sub(len, Ordering::Relaxed);
    res
}

/// Writes one backend message to the client (no flush).
async fn write_one(writer: &mut Writer, msg: ToClient, max_message: usize) -> Result<(), End> {
    match msg {
        ToClient::Data { payload, text } => {
            if payload.len() > max_message {
                return Err(End::clean(CloseReason::BackendInvalid(
                    "backend message larger than session.max_message_size".into(),
                )));
            }
            if text && std::str::from_utf8(&payload).is_err() {
                return Err(End::clean(CloseReason::BackendInvalid(
                    "backend sent invalid UTF-8".into(),
                )));
            }
            let opcode = if text { OpCode::Text } else { OpCode::Binary };
            writer
                .write_frame(WsFrame::new(
                    true,
                    opcode,
                    None,
                    Payload::Borrowed(&payload),
                ))
                .await
                .map_err(|_| End::broken(CloseReason::ClientLost))
        }
        ToClient::Close { code, reason } => {
            Err(End::clean(CloseReason::BackendClosed { code, reason }))
        }
    }
}

/// Handles one client frame: control frames are answered here; data frames
/// are reassembled, and a complete message is returned for the backend.
async fn on_client_frame(
    frame: ClientFrame,
    assembler: &mut Assembler,
    writer: &mut Writer,
    id: SessionId,
    max_message: usize,
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
            pong.await
                .map_err(|_| End::broken(CloseReason::ClientLost))?;
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
async fn on_client_close(payload: &[u8], writer: &mut Writer) -> End {
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

fn ws_error_end(e: WebSocketError) -> End {
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

/// Reassembles fragmented messages with a cap on the total size, validating
/// UTF-8 of text messages incrementally so invalid text fails fast.
#[derive(Default)]
struct Assembler {
    /// Text (true) or binary (false) of the message in progress.
    text: Option<bool>,
    buf: BytesMut,
    /// Prefix of `buf` known to be valid UTF-8.
    checked: usize,
}

impl Assembler {
    fn push(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: BytesMut,
        max: usize,
    ) -> Result<Option<(Bytes, bool)>, CloseReason> {
        match (opcode, self.text) {
            (OpCode::Continuation, None) => {
                return Err(CloseReason::ClientProtocolError(
                    "continuation frame without a message to continue".into(),
                ))
            }
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(CloseReason::ClientProtocolError(
                    "new message before the previous one was finished".into(),
                ))
            }
            // An unfragmented message: no copy. fastwebsockets has already
            // validated UTF-8 of unfragmented text frames.
            (OpCode::Text | OpCode::Binary, None) if fin => {
                return Ok(Some((payload.freeze(), opcode == OpCode::Text)));
            }
            (OpCode::Text | OpCode::Binary, None) => {
                self.text = Some(opcode == OpCode::Text);
                self.buf = payload;
                self.checked = 0;
            }
            (OpCode::Close | OpCode::Ping | OpCode::Pong, _) => {
                return Err(CloseReason::ClientProtocolError(
                    "control frame in a message".into(),
                ))
            }
            (OpCode::Continuation, Some(_)) => {
                if self.buf.len() + payload.len() > max {
                    return Err(CloseReason::ClientMessageTooBig);
                }
                self.buf.extend_from_slice(&payload);
            }
        }
        if self.buf.len() > max {
            return Err(CloseReason::ClientMessageTooBig);
        }
        let text = self.text == Some(true);
        if text {
            match std::str::from_utf8(&self.buf[self.checked..]) {
                Ok(_) => self.checked = self.buf.len(),
                Err(e) if e.error_len().is_some() => return Err(CloseReason::ClientInvalidUtf8),
                Err(e) => self.checked += e.valid_up_to(),
            }
        }
        if !fin {
            return Ok(None);
        }
        if text && self.checked != self.buf.len() {
            return Err(CloseReason::ClientInvalidUtf8);
        }
        self.text = None;
        self.checked = 0;
        Ok(Some((std::mem::take(&mut self.buf).freeze(), text)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn b(s: &[u8]) -> BytesMut {
        BytesMut::from(s)
    }

    #[test]
    fn reassembles_fragments() {
        let mut a = Assembler::default();
        assert_eq!(a.push(OpCode::Text, false, b(b"he"), 100).unwrap(), None);
        assert_eq!(
            a.push(OpCode::Continuation, false, b(b"ll"), 100).unwrap(),
            None
        );
        let (msg, text) = a
            .push(OpCode::Continuation, true, b(b"o"), 100)
            .unwrap()
            .unwrap();
        assert_eq!(&msg[..], b"hello");
        assert!(text);
        // Ready for the next message.
        let (msg, text) = a
            .push(OpCode::Binary, true, b(&[1, 2]), 100)
            .unwrap()
            .unwrap();
        assert_eq!(&msg[..], &[1, 2]);
        assert!(!text);
    }

    #[test]
    fn total_size_is_capped_across_fragments() {
        let mut a = Assembler::default();
        a.push(OpCode::Binary, false, b(&[0; 60]), 100).unwrap();
        assert_eq!(
            a.push(OpCode::Continuation, true, b(&[0; 41]), 100),
            Err(CloseReason::ClientMessageTooBig)
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_fine_but_invalid_fails_fast() {
        let euro = "€".as_bytes(); // 3 bytes
        let mut a = Assembler::default();
        a.push(OpCode::Text, false, b(&euro[..1]), 100).unwrap();
        a.push(OpCode::Continuation, false, b(&euro[1..2]), 100)
            .unwrap();
        let (msg, _) = a
            .push(OpCode::Continuation, true, b(&euro[2..]), 100)
            .unwrap()
            .unwrap();
        assert_eq!(&msg[..], euro);

        let mut a = Assembler::default();
        assert_eq!(
            a.push(OpCode::Text, false, b(&[0xff]), 100),
            Err(CloseReason::ClientInvalidUtf8)
        );
        // Truncated sequence at the end of the message.
        let mut a = Assembler::default();
        a.push(OpCode::Text, false, b(b"ok"), 100).unwrap();
        assert_eq!(
            a.push(OpCode::Continuation, true, b(&euro[..2]), 100),
            Err(CloseReason::ClientInvalidUtf8)
        );
    }

    #[test]
    fn fragmentation_errors_are_protocol_errors() {
        let mut a = Assembler::default();
        assert!(matches!(
            a.push(OpCode::Continuation, true, b(b"x"), 100),
            Err(CloseReason::ClientProtocolError(_))
        ));
        let mut a = Assembler::default();
        a.push(OpCode::Text, false, b(b"x"), 100).unwrap();
        assert!(matches!(
            a.push(OpCode::Binary, true, b(b"y"), 100),
            Err(CloseReason::ClientProtocolError(_))
        ));
    }
}

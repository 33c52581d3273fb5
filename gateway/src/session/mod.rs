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
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::close::{self, CloseReason};
use crate::link::{cost_of, Gone, LinkHandle, Mailbox, ToClient, TrySend};
use crate::pool::Lease;
use crate::resume::{AttachRequest, Attached, Refused, Ring, Token};
use crate::{SessionId, Shared};

mod assemble;
mod client;
mod deliver;
mod detach;

use assemble::Assembler;
use client::{on_client_frame, ws_error_end};
use deliver::{check_backend_message, deliver_first, drain_after_link_loss};
use detach::{after_gone, attach, detached, stale};

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
    /// For a resumable session: its credential and its resume requests.
    pub(crate) resume: Option<(Token, mpsc::Receiver<AttachRequest>)>,
}

/// What a session carries from one client connection to the next.
struct Carry {
    /// A client message accepted but still waiting for room on the link.
    pending: Option<Frame>,
    /// Resumable sessions: the most recent backend messages, for replay.
    ring: Option<Ring>,
    /// Client messages accepted in the session (told to a resuming client).
    received: u64,
    /// Messages to write first on a resumed connection.
    replay: Vec<(Bytes, bool)>,
    /// Resumable sessions: the credential currently valid.
    token: Option<Token>,
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
    /// A resume on a new connection is taking the session over.
    takeover: Option<AttachRequest>,
}

impl End {
    fn clean(reason: CloseReason) -> Self {
        Self {
            reason,
            can_write: true,
            linger: false,
            takeover: None,
        }
    }

    fn broken(reason: CloseReason) -> Self {
        Self {
            reason,
            can_write: false,
            linger: false,
            takeover: None,
        }
    }
}

/// Runs one session to its end, across client connections when it is
/// resumable.
pub(crate) async fn run(ws: WebSocket<Io>, start: SessionStart, shared: Arc<Shared>) {
    let id = start.id;
    let link = start.lease.link().clone();
    shared.metrics.session_opened();
    debug!(link = link.index(), "session open");
    let (token, mut attach_rx) = match start.resume {
        Some((t, rx)) => (Some(t), Some(rx)),
        None => (None, None),
    };
    let rc = &shared.config.resume;
    let mut carry = Carry {
        pending: None,
        ring: token
            .as_ref()
            .map(|_| Ring::new(rc.buffer_messages, rc.buffer_bytes.bytes())),
        received: 0,
        replay: Vec::new(),
        token,
    };

    let reason = match link.register(id) {
        Err(_) => CloseReason::LinkLost,
        Ok(mut mailbox) => {
            let open = Frame {
                session_id: id.0,
                body: Some(Body::Open(start.open)),
            };
            match Box::pin(link.reserve(cost_of(&open))).await {
                Err(_) => CloseReason::LinkLost,
                Ok(slot) => {
                    slot.send(open);
                    let mut ws = ws;
                    loop {
                        let end = serve_connection(
                            ws,
                            &mut carry,
                            &mut mailbox,
                            &link,
                            id,
                            &shared,
                            attach_rx.as_mut(),
                        )
                        .await;
                        // A resume taking over, or a lost connection of a
                        // resumable session: wait for (or serve) the resume.
                        // A connection lost after the route went away cannot
                        // be resumed: say why the session really ended.
                        let reason = match (end.reason, mailbox.evict.fired()) {
                            (CloseReason::ClientLost | CloseReason::ClientTimeout, Some(gone)) => {
                                after_gone(&mut mailbox, gone)
                            }
                            (reason, _) => reason,
                        };
                        let request = match (end.takeover, &reason) {
                            (Some(req), _) => Ok(req),
                            (None, CloseReason::ClientLost | CloseReason::ClientTimeout)
                                if attach_rx.is_some() =>
                            {
                                Box::pin(detached(
                                    &reason,
                                    &mut carry,
                                    &mut mailbox,
                                    attach_rx.as_mut(),
                                    &link,
                                    id,
                                    &shared,
                                ))
                                .await
                            }
                            (None, _) => Err(reason),
                        };
                        let attached = match request {
                            Ok(req) => Box::pin(attach(req, &mut carry, &link, id, &shared)).await,
                            Err(reason) => Err(reason),
                        };
                        match attached {
                            Ok(next) => ws = next,
                            Err(reason) => break reason,
                        }
                    }
                }
            }
        }
    };

    if let Some(t) = &carry.token {
        shared.resume.remove(t);
    }
    if let Some((code, why)) = reason.to_backend() {
        // The link may be gone or full; a session's close is worth a short
        // wait, and the backend learns of lost links by itself.
        let frame = Frame::close(id.0, code, why);
        let wait = Duration::from_secs(1);
        if let Ok(Ok(slot)) =
            Box::pin(tokio::time::timeout(wait, link.reserve(cost_of(&frame)))).await
        {
            slot.send(frame);
        }
    }
    link.unregister(id);

    let label = reason.label();
    shared.metrics.session_closed(label);
    if reason.is_notable() {
        warn!(session = id.0, reason = label, detail = ?reason, "session closed");
    } else {
        debug!(reason = label, detail = ?reason, "session closed");
    }
    drop(start.lease);
}

/// Serves one client connection of the session, including its close.
async fn serve_connection(
    ws: WebSocket<Io>,
    carry: &mut Carry,
    mailbox: &mut Mailbox,
    link: &LinkHandle,
    id: SessionId,
    shared: &Shared,
    attach_rx: Option<&mut mpsc::Receiver<AttachRequest>>,
) -> End {
    let cfg = &shared.config.session;
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

    let end = relay(
        reader,
        &mut writer,
        mailbox,
        link,
        id,
        shared,
        carry,
        attach_rx,
    )
    .await;
    if end.linger {
        Box::pin(linger(&mut raw_read, cfg.close_timeout)).await;
    }
    // The relay loop already sent the client its close frame; dropping
    // the halves closes the connection.
    end
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
#[allow(clippy::too_many_arguments)]
async fn relay(
    reader: Reader<'_>,
    writer: &mut Writer,
    mailbox: &mut Mailbox,
    link: &LinkHandle,
    id: SessionId,
    shared: &Shared,
    carry: &mut Carry,
    mut attach_rx: Option<&mut mpsc::Receiver<AttachRequest>>,
) -> End {
    let cfg = &shared.config.session;
    let max_message = cfg.max_message_size.bytes();
    let mut read = pin!(read_frame(reader));
    let mut reading = true;
    let mut assembler = Assembler::default();
    let mut last_heard = Instant::now();
    let mut ping_sent = false;
    // Both are created once and kept across iterations: re-creating them
    // per message would re-register a timer and a waiter every time.
    let mut draining = pin!(shared.drain.notified());
    let mut ping_timer = pin!(tokio::time::sleep(cfg.ping_interval));
    // `notify_waiters` only reaches futures that existed when it was
    // called; a session that starts during shutdown sees the token instead.
    let already_draining = shared.shutdown.is_cancelled();

    // A resumed connection first gets what the client missed.
    if !carry.replay.is_empty() {
        let replay = std::mem::take(&mut carry.replay);
        let write = async {
            for (payload, text) in &replay {
                let opcode = if *text { OpCode::Text } else { OpCode::Binary };
                writer
                    .write_frame(WsFrame::new(true, opcode, None, Payload::Borrowed(payload)))
                    .await?;
            }
            writer.flush().await
        };
        if !matches!(
            Box::pin(tokio::time::timeout(cfg.ping_timeout, write)).await,
            Ok(Ok(()))
        ) {
            return End::broken(CloseReason::ClientLost);
        }
    }
    let end = loop {
        if already_draining {
            break End::clean(CloseReason::Shutdown);
        }
        tokio::select! {
            biased;
                        gone = mailbox.evict.wait() => {
                match gone {
                    Gone::SlowConsumer => break End::clean(CloseReason::SlowConsumer),
                                        // The route is gone: deliver what was already queued,
                    // which ends with the backend's close if that is why;
                    // else close with "reconnect".
                    Gone::BackendClosed | Gone::LinkLost => break Box::pin(drain_after_link_loss(writer, mailbox, carry.ring.as_mut(), max_message, cfg.ping_timeout)).await,
                }
            }
            _ = &mut draining => break End::clean(CloseReason::Shutdown),
            req = recv_attach(&mut attach_rx), if attach_rx.is_some() => {
                                match req {
                    // Single use per attach: the newer connection wins.
                    Some(req) => {
                        if let Some(req) = stale(req, carry.token.as_ref()) {
                            let mut end = End::clean(CloseReason::TakenOver);
                            end.takeover = Some(req);
                            break end;
                        }
                    }
                    None => attach_rx = None,
                }
            }
            msg = mailbox.rx.recv() => {
                let Some(msg) = msg else {
                    // Sender dropped: eviction is reported just above.
                    continue;
                };
                let mut res = Box::pin(deliver_first(
                    writer,
                    msg,
                    mailbox,
                    carry.ring.as_mut(),
                    &mut attach_rx,
                    carry.token.as_ref(),
                    max_message,
                    cfg.ping_timeout,
                ))
                .await;
                                // The route went away during the write: deliver the rest of
                // what was queued (see above). A client lost meanwhile is
                // sorted out by the caller.
                if res.then_drain {
                    if let Err(e) = res.take_end() {
                        break e;
                    }
                    break Box::pin(drain_after_link_loss(writer, mailbox, carry.ring.as_mut(), max_message, cfg.ping_timeout)).await;
                }
                if let Err(e) = res.take_end() {
                    break e;
                }
            }
            slot = link.reserve(carry.pending.as_ref().map_or(0, cost_of)), if carry.pending.is_some() => {
                match (slot, carry.pending.take()) {
                    (Ok(slot), Some(frame)) => slot.send(frame),
                    _ => break End::clean(CloseReason::LinkLost),
                }
            }
            (r, res) = &mut read, if reading && carry.pending.is_none() => {
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
                match on_client_frame(frame, &mut assembler, writer, id, max_message, cfg.ping_timeout).await {
                    Ok(None) => {}
                    Ok(Some(out)) => {
                        carry.received += 1;
                        match link.try_send(out) {
                            TrySend::Sent => {}
                            TrySend::Full(frame) => carry.pending = Some(*frame),
                            TrySend::Gone => break End::clean(CloseReason::LinkLost),
                        }
                    }
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
                // While the client is paused for backpressure its pongs are
                // not read either: its liveness is not judged meanwhile.
                if carry.pending.is_some() {
                    last_heard = now;
                    ping_sent = false;
                }
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
    let continues = end.takeover.is_some()
        || (carry.ring.is_some()
            && matches!(
                end.reason,
                CloseReason::ClientLost | CloseReason::ClientTimeout
            ));
    if let (false, Some(frame)) = (continues, carry.pending.take()) {
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
                    takeover: end.takeover,
                };
            }
        }
    }
    End {
        reason: end.reason,
        can_write: false,
        linger: false,
        takeover: end.takeover,
    }
}

async fn recv_attach(rx: &mut Option<&mut mpsc::Receiver<AttachRequest>>) -> Option<AttachRequest> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

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

/// The session's final reason once its route on the link is gone and its
/// client connection too: the backend's close if that is why (it waits in
/// the mailbox), else the eviction's.
fn after_gone(mailbox: &mut Mailbox, gone: Gone) -> CloseReason {
    match gone {
        Gone::SlowConsumer => CloseReason::SlowConsumer,
        Gone::LinkLost => CloseReason::LinkLost,
        Gone::BackendClosed => {
            while let Ok(msg) = mailbox.rx.try_recv() {
                if let ToClient::Close { code, reason } = msg {
                    return CloseReason::BackendClosed { code, reason };
                }
            }
            CloseReason::LinkLost
        }
    }
}

/// A resume request that must not touch the session: it presents a
/// credential already replaced, or its requester stopped waiting. It is
/// refused (410) and dropped.
fn stale(req: AttachRequest, token: Option<&Token>) -> Option<AttachRequest> {
    if req.reply.is_closed() || token != Some(&req.token) {
        let _ = req.reply.send(Err(Refused::Stale));
        return None;
    }
    Some(req)
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

/// The client's connection was lost: keep the session (and what the backend
/// sends, bounded) for `resume.grace`, until a resume request arrives.
async fn detached(
    why: &CloseReason,
    carry: &mut Carry,
    mailbox: &mut Mailbox,
    attach_rx: Option<&mut mpsc::Receiver<AttachRequest>>,
    link: &LinkHandle,
    id: SessionId,
    shared: &Shared,
) -> Result<AttachRequest, CloseReason> {
    let rc = &shared.config.resume;
    let grace = tokio::time::sleep(rc.grace);
    let mut grace = pin!(grace);
    let Carry {
        ring,
        pending,
        token,
        ..
    } = carry;
    let (Some(ring), Some(attach_rx)) = (ring.as_mut(), attach_rx) else {
        return Err(why.clone());
    };
    let budget = &shared.detached;
    // A pending client message is held too, until the link takes it.
    let pending_bytes = pending.as_ref().map_or(0, |f| cost_of(f) as usize);
    if !budget.try_detach(
        ring.bytes() + pending_bytes,
        rc.max_detached,
        rc.max_detached_bytes.bytes(),
    ) {
        return Err(CloseReason::ResumeLost(
            "gateway holds too many detached sessions",
        ));
    }
    shared.metrics.detached(1);
    if link.version() >= 2 {
        let grace_ms = u64::try_from(rc.grace.as_millis()).unwrap_or(u64::MAX);
        let why = match why {
            CloseReason::ClientTimeout => "client ping timeout",
            _ => "client connection lost",
        };
        let frame = Frame::detached(id.0, why, grace_ms);
        // Advisory: not worth more than a short wait on a stuck link.
        if let Ok(Ok(slot)) =
            tokio::time::timeout(Duration::from_secs(1), link.reserve(cost_of(&frame))).await
        {
            slot.send(frame);
        }
    }
    let mut draining = pin!(shared.drain.notified());
    let outcome = loop {
        if shared.shutdown.is_cancelled() {
            break Err(CloseReason::Shutdown);
        }
        tokio::select! {
            biased;
                        gone = mailbox.evict.wait() => match gone {
                Gone::SlowConsumer => break Err(CloseReason::SlowConsumer),
                Gone::LinkLost => break Err(CloseReason::LinkLost),
                // Its close is in the mailbox, right behind its data.
                Gone::BackendClosed => continue,
            },
            _ = &mut draining => break Err(CloseReason::Shutdown),
            // A client message accepted before the loss still goes out.
            slot = link.reserve(pending.as_ref().map_or(0, cost_of)), if pending.is_some() => {
                match (slot, pending.take()) {
                    (Ok(slot), Some(frame)) => slot.send(frame),
                    _ => break Err(CloseReason::LinkLost),
                }
            }
                        req = attach_rx.recv() => match req {
                Some(req) => {
                    if let Some(req) = stale(req, token.as_ref()) {
                        break Ok(req);
                    }
                }
                None => break Err(CloseReason::ResumeLost("resume channel closed")),
            },
            msg = mailbox.rx.recv() => match msg {
                Some(ToClient::Data { payload, text }) => {
                    mailbox.queued_bytes.fetch_sub(payload.len(), Ordering::Relaxed);
                    if let Err(invalid) = check_backend_message(&payload, text, shared.config.session.max_message_size.bytes()) {
                        break Err(invalid);
                    }
                    if !budget.try_grow(payload.len(), rc.max_detached_bytes.bytes()) {
                        break Err(CloseReason::ResumeLost("gateway-wide buffer for detached sessions full"));
                    }
                    let (freed, evicted) = ring.push(&payload, text);
                    budget.shrink(freed);
                    if evicted {
                        break Err(CloseReason::ResumeLost("replay buffer full while detached"));
                    }
                }
                Some(ToClient::Close { code, reason }) => break Err(CloseReason::BackendClosed { code, reason }),
                None => continue,
            },
            _ = &mut grace => break Err(CloseReason::ResumeLost("client did not resume within resume.grace")),
        }
    };
    budget.release(ring.bytes() + pending_bytes);
    shared.metrics.detached(-1);
    outcome
}

/// Serves a resume request: checks the position, rotates the credential,
/// answers the upgrade handler, and returns the new connection.
async fn attach(
    req: AttachRequest,
    carry: &mut Carry,
    link: &LinkHandle,
    id: SessionId,
    shared: &Shared,
) -> Result<WebSocket<Io>, CloseReason> {
    shared.metrics.resume_attempt();
    let Some(req) = stale(req, carry.token.as_ref()) else {
        return Err(CloseReason::ResumeLost(
            "a stale resume arrived while the connection was lost",
        ));
    };
    let (Some(ring), Some(token)) = (carry.ring.as_ref(), carry.token.as_mut()) else {
        return Err(CloseReason::ResumeLost("not resumable"));
    };
    let missed = match ring.since(req.position) {
        Ok(m) => m,
        Err(refused) => {
            let _ = req.reply.send(Err(refused));
            return Err(CloseReason::ResumeLost(
                "the client resumed from a position no longer held",
            ));
        }
    };
    let Some(next) = shared.resume.rotate(token) else {
        let _ = req.reply.send(Err(Refused::Gap));
        return Err(CloseReason::ResumeLost("credential vanished"));
    };
    *token = next.clone();
    let answer = Attached {
        token: next,
        received: carry.received,
    };
    if req.reply.send(Ok(answer)).is_err() {
        return Err(CloseReason::ResumeLost(
            "the resuming client went away before the answer",
        ));
    }
    let ws = match tokio::time::timeout(shared.config.listen.http_header_timeout, req.upgrade).await
    {
        Ok(Ok(ws)) => ws,
        _ => {
            return Err(CloseReason::ResumeLost(
                "the resuming connection did not complete the upgrade",
            ))
        }
    };
    shared.metrics.resume_succeeded(missed.len() as u64);
    if link.version() >= 2 {
        let frame = Frame::attached(id.0, req.peer.to_string(), missed.len() as u64);
        if let Ok(Ok(slot)) =
            tokio::time::timeout(Duration::from_secs(1), link.reserve(cost_of(&frame))).await
        {
            slot.send(frame);
        }
    }
    debug!(session = id.0, replayed = missed.len(), "session resumed");
    carry.replay = missed;
    Ok(ws)
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
                let mut res = Box::pin(deliver_first(writer, msg, mailbox, carry.ring.as_mut(), max_message, cfg.ping_timeout)).await;
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

/// Result of writing a batch of backend messages to the client.
struct Delivered {
    end: Option<End>,
    /// The session's route went away during the write: what is queued is
    /// all there will be.
    then_drain: bool,
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
    mailbox: &mut Mailbox,
    mut ring: Option<&mut Ring>,
    max_message: usize,
    write_timeout: Duration,
) -> Delivered {
    // A resumable session whose client stops taking data detaches (it may
    // be a dead connection that a resume will replace); others are slow
    // consumers.
    let stalled = if ring.is_some() {
        CloseReason::ClientTimeout
    } else {
        CloseReason::SlowConsumer
    };
    let Mailbox {
        rx,
        queued_bytes,
        evict,
    } = mailbox;
    let write = async {
        let mut msg = Some(first);
        let mut written = 0;
        while let Some(m) = msg.take() {
            let len = match &m {
                ToClient::Data { payload, .. } => payload.len(),
                ToClient::Close { .. } => 0,
            };
            let res = write_one(writer, m, ring.as_deref_mut(), max_message).await;
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
    let mut then_drain = false;
    loop {
        tokio::select! {
            biased;
            r = &mut write => {
                return Delivered { end: r.err(), then_drain };
            }
            gone = evict.wait(), if !then_drain => {
                match gone {
                    // The client is not reading: abandon the write (the
                    // stream is now mid-frame, so no close frame can follow).
                    Gone::SlowConsumer => {
                        return Delivered { end: Some(End::broken(CloseReason::SlowConsumer)), then_drain };
                    }
                    // Finish this write; the caller delivers the rest.
                    Gone::BackendClosed | Gone::LinkLost => then_drain = true,
                }
            }
            _ = &mut timer => {
                return Delivered { end: Some(End::broken(stalled)), then_drain };
            }
        }
    }
}

/// The link is gone: deliver what it had already queued for the client,
/// then end with "reconnect" (1012).
async fn drain_after_link_loss(
    writer: &mut Writer,
    mailbox: &mut Mailbox,
    mut ring: Option<&mut Ring>,
    max_message: usize,
    write_timeout: Duration,
) -> End {
    while let Ok(msg) = mailbox.rx.try_recv() {
        if let Err(e) = deliver(
            writer,
            msg,
            mailbox,
            ring.as_deref_mut(),
            max_message,
            write_timeout,
        )
        .await
        {
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
    ring: Option<&mut Ring>,
    max_message: usize,
    write_timeout: Duration,
) -> Result<(), End> {
    let len = match &msg {
        ToClient::Data { payload, .. } => payload.len(),
        ToClient::Close { .. } => 0,
    };
    let write = async {
        write_one(writer, msg, ring, max_message).await?;
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

/// Writes one backend message to the client (no flush). A resumable
/// session records it for replay first: once handed to the socket it may
/// still be lost with the connection.
async fn write_one(
    writer: &mut Writer,
    msg: ToClient,
    ring: Option<&mut Ring>,
    max_message: usize,
) -> Result<(), End> {
    match msg {
        ToClient::Data { payload, text } => {
            check_backend_message(&payload, text, max_message).map_err(End::clean)?;
            if let Some(ring) = ring {
                ring.push(&payload, text);
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

/// A backend message the gateway cannot deliver ends the session (1011).
fn check_backend_message(
    payload: &[u8],
    text: bool,
    max_message: usize,
) -> Result<(), CloseReason> {
    if payload.len() > max_message {
        return Err(CloseReason::BackendInvalid(
            "backend message larger than session.max_message_size".into(),
        ));
    }
    if text && std::str::from_utf8(payload).is_err() {
        return Err(CloseReason::BackendInvalid(
            "backend sent invalid UTF-8".into(),
        ));
    }
    Ok(())
}

/// Handles one client frame: control frames are answered here; data frames
/// are reassembled, and a complete message is returned for the backend.
async fn on_client_frame(
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

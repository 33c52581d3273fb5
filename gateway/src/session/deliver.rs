//! Writing backend messages to the client.

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fastwebsockets::{Frame as WsFrame, OpCode, Payload};

use super::connection::{Connection, Writer};
use super::signals::{stale, Listen, Signal, Signals};
use super::{End, Session};
use crate::backend::{Gone, Queue, ToClient};
use crate::close::CloseReason;
use crate::metrics::{Metrics, Stamp};
use crate::resume::{Credentials, Ring};

/// Backend messages written to the client before one flush.
const WRITE_BATCH: usize = 64;

impl Session {
    /// Writes `first` and whatever else is already queued (up to a batch),
    /// then flushes once. The write is abandoned if the link reader evicts
    /// the session as a slow consumer meanwhile, if a resume takes the
    /// session over, or if the client has not taken it within the write
    /// deadline.
    pub(super) async fn deliver(
        &mut self,
        conn: &mut Connection,
        first: ToClient,
    ) -> ControlFlow<End> {
        let cfg = &self.shared.session;
        let (max_message, deadline) = (cfg.max_message, cfg.write_timeout);
        // A resumable session whose client stops taking data detaches (it
        // may be a dead connection that a resume will replace); others are
        // slow consumers.
        let (ring, token) = match &mut self.resumable {
            Some(r) => (Some(&mut r.ring), Some(&r.creds)),
            None => (None, None),
        };
        let stalled = if ring.is_some() {
            CloseReason::ClientTimeout
        } else {
            CloseReason::SlowConsumer
        };
        // Messages the client may have so far, kept current while the write
        // runs, for checking a resume's position meanwhile.
        let delivered = Progress::new(ring.as_ref().map_or(0, |r| r.next_seq()));
        let written = {
            let write = pin!(write_batch(
                &mut conn.writer,
                first,
                &mut self.queue,
                ring,
                max_message,
                &delivered,
                &self.shared.metrics,
            ));
            let watch = Watch {
                signals: &mut self.signals,
                token,
                delivered: &delivered,
            };
            interruptible(write, watch, deadline, stalled).await
        };
        match written {
            Err(end) => ControlFlow::Break(end),
            Ok(false) => ControlFlow::Continue(()),
            Ok(true) => self.route_gone(conn).await,
        }
    }

    /// The route went away during a write: a session whose link was lost
    /// moves if it can; else the client gets what was queued, then the end.
    async fn route_gone(&mut self, conn: &mut Connection) -> ControlFlow<End> {
        if self.moves() && self.signals.eviction.gone() == Some(Gone::LinkLost) {
            return Box::pin(self.on_link_lost(conn)).await;
        }
        ControlFlow::Break(Box::pin(self.deliver_queued(conn)).await)
    }

    /// A resumed connection first gets what the client missed. Like any
    /// write to the client it can be interrupted: a resume that takes the
    /// session over (this new connection died too) does not wait for it.
    pub(super) async fn replay(&mut self, conn: &mut Connection) -> Result<(), End> {
        let Some(r) = self.resumable.as_mut().filter(|r| !r.replay.is_empty()) else {
            return Ok(());
        };
        let replay = std::mem::take(&mut r.replay);
        // The ring already counts the replayed messages as delivered.
        let progress = Progress::new(r.ring.next_seq());
        let deadline = self.shared.session.write_timeout;
        let written = {
            let writer = &mut conn.writer;
            let progress = &progress;
            let write = pin!(async move {
                for (payload, text) in &replay {
                    let opcode = if *text { OpCode::Text } else { OpCode::Binary };
                    let frame = WsFrame::new(true, opcode, None, Payload::Borrowed(payload));
                    writer
                        .write_frame(frame)
                        .await
                        .map_err(|_| End::broken(CloseReason::ClientLost))?;
                    progress.taken(None);
                }
                writer
                    .flush()
                    .await
                    .map_err(|_| End::broken(CloseReason::ClientLost))
            });
            let watch = Watch {
                signals: &mut self.signals,
                token: Some(&r.creds),
                delivered: progress,
            };
            interruptible(write, watch, deadline, CloseReason::ClientTimeout).await
        };
        match written {
            Ok(false) => Ok(()),
            // The route went away meanwhile: what it queued, then the end.
            Ok(true) => match self.route_gone(conn).await {
                ControlFlow::Continue(()) => Ok(()),
                ControlFlow::Break(end) => Err(end),
            },
            Err(end) => Err(end),
        }
    }

    /// The route is gone: deliver what the link had already queued for the
    /// client, then end with "reconnect" (1012), or with the backend's
    /// close when that is what ended the route.
    pub(super) async fn deliver_queued(&mut self, conn: &mut Connection) -> End {
        let cfg = &self.shared.session;
        let (max_message, deadline) = (cfg.max_message, cfg.write_timeout);
        let mut ring = self.resumable.as_mut().map(|r| &mut r.ring);
        while let Some(msg) = self.queue.try_recv() {
            let queue = &mut self.queue;
            let write = async {
                write_one(&mut conn.writer, msg, ring.as_deref_mut(), max_message).await?;
                queue.written();
                conn.writer
                    .flush()
                    .await
                    .map_err(|_| End::broken(CloseReason::ClientLost))
            };
            match Box::pin(tokio::time::timeout(deadline, write)).await {
                Ok(Ok(())) => {}
                Ok(Err(end)) => return end,
                Err(_) => return End::broken(CloseReason::SlowConsumer),
            }
        }
        End::clean(CloseReason::LinkLost)
    }
}

/// Runs a write to the client to its end, unless the link reader evicts
/// the session as a slow consumer, a resume takes the session over, or the
/// client takes no message for `deadline`. Returns whether the route went
/// away meanwhile (the rest of the queue is then delivered after it).
async fn interruptible(
    mut write: Pin<&mut impl Future<Output = Result<(), End>>>,
    watch: Watch<'_>,
    deadline: Duration,
    stalled: CloseReason,
) -> Result<bool, End> {
    let Watch {
        signals,
        token,
        delivered,
    } = watch;
    // The client must take a message at least every `deadline`: a slow
    // link that keeps taking messages is not a stalled client.
    let mut timer = pin!(tokio::time::sleep(deadline));
    let mut route_gone = false;
    loop {
        let listen = Listen {
            eviction: !route_gone,
            attach: !route_gone,
            drain: false,
        };
        tokio::select! {
            biased;
            r = &mut write => return r.map(|()| route_gone),
            s = signals.next(listen), if !route_gone => match s {
                // The client is not reading: abandon the write (the stream
                // is now mid-frame, so no close frame can follow).
                Signal::Evicted(Gone::SlowConsumer) => {
                    return Err(End::broken(CloseReason::SlowConsumer));
                }
                // Finish this write; the caller delivers the rest.
                Signal::Evicted(Gone::BackendClosed | Gone::LinkLost) => route_gone = true,
                // A resume is waiting: this connection (probably dead, which
                // is why the write stalls) is being replaced. Abandon the
                // write; the ring holds what was in flight.
                Signal::Attach(req) => {
                    // The count moves during this write: read it as it is now.
                    let delivered = token.map(|_| delivered.delivered());
                    if let Some(req) = stale(req, token, delivered) {
                        return Err(End::broken(CloseReason::TakenOver).taken_over(req));
                    }
                }
                Signal::Drain | Signal::AttachClosed => {}
            },
            _ = &mut timer => {
                let due = delivered.last_taken() + deadline;
                if tokio::time::Instant::now() >= due {
                    return Err(End::broken(stalled));
                }
                timer.as_mut().reset(due);
            }
        }
    }
}

/// What a write to the client watches: the session's signals, and for a
/// resumable session its credential and how many messages the client may
/// have.
struct Watch<'a> {
    signals: &'a mut Signals,
    token: Option<&'a Credentials>,
    delivered: &'a Progress,
}

/// How far a write to the client has got: messages the client may have (a
/// position, for a resumable session) and when it last took one.
struct Progress {
    delivered: AtomicU64,
    /// Milliseconds after `start` when the client last took a message.
    last_ms: AtomicU64,
    start: tokio::time::Instant,
}

impl Progress {
    fn new(delivered: u64) -> Self {
        Self {
            delivered: AtomicU64::new(delivered),
            last_ms: AtomicU64::new(0),
            start: tokio::time::Instant::now(),
        }
    }

    /// The client took a message; for a resumable session, `position` is
    /// the messages delivered so far.
    fn taken(&self, position: Option<u64>) {
        if let Some(p) = position {
            self.delivered.store(p, Ordering::Relaxed);
        }
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// When the client last took a message (or the write began).
    fn last_taken(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Writes `first` and up to a batch of what is queued behind it, then
/// flushes. `delivered` follows the messages written so far: a client cannot
/// have a message whose write has not finished.
#[allow(clippy::too_many_arguments)]
async fn write_batch(
    writer: &mut Writer,
    first: ToClient,
    queue: &mut Queue,
    mut ring: Option<&mut Ring>,
    max_message: usize,
    delivered: &Progress,
    metrics: &Metrics,
) -> Result<(), End> {
    metrics.queue_depth(true, 1 + queue.depth());
    // When the link read each message written, for the relay time once
    // they are flushed (allocated only for a batch of more than one).
    let mut first_read = None;
    let mut more_read = Vec::new();
    let mut msg = Some(first);
    let mut written = 0;
    while let Some(m) = msg.take() {
        if let ToClient::Data { read_at, .. } = &m {
            if first_read.is_none() {
                first_read = Some(*read_at);
            } else {
                more_read.push(*read_at);
            }
        }
        write_one(writer, m, ring.as_deref_mut(), max_message).await?;
        delivered.taken(ring.as_deref().map(Ring::next_seq));
        queue.written();
        written += 1;
        if written < WRITE_BATCH {
            msg = queue.try_recv();
        }
    }
    writer
        .flush()
        .await
        .map_err(|_| End::broken(CloseReason::ClientLost))?;
    let now = Stamp::now();
    for t in first_read.into_iter().chain(more_read) {
        metrics.relayed(false, t.until(now));
    }
    Ok(())
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
        ToClient::Data { payload, text, .. } => {
            check_backend_message(&payload, text, max_message).map_err(End::clean)?;
            if let Some(ring) = ring {
                ring.push(&payload, text, u64::MAX);
            }
            let opcode = if text { OpCode::Text } else { OpCode::Binary };
            let frame = WsFrame::new(true, opcode, None, Payload::Borrowed(&payload));
            writer
                .write_frame(frame)
                .await
                .map_err(|_| End::broken(CloseReason::ClientLost))
        }
        ToClient::Close { code, reason } => {
            Err(End::clean(CloseReason::BackendClosed { code, reason }))
        }
        ToClient::Invalid { reason } => Err(End::clean(CloseReason::BackendInvalid(reason.into()))),
    }
}

/// A backend message the gateway cannot deliver ends the session (1011).
pub(super) fn check_backend_message(
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

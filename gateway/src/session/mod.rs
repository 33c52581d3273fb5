//! Stage 4: one task per client, relaying between its WebSocket and its
//! backend link.
//!
//! A [`Session`] owns everything that outlives one client connection: its
//! link, its mailbox of backend messages, a client message waiting for room
//! on the link, and for resumable sessions the credential and the replay
//! ring. Its life, read in this order:
//!
//! 1. [`run`]: open on the link, serve connections, finish.
//! 2. [`connected`]: one client connection ([`connection`]). One event source (client frames,
//!    backend messages, room on the link, the ping timer and the
//!    [`signals`] that interrupt every state), one short method per event.
//! 3. [`deliver`]: writing backend messages to the client.
//! 4. [`client`]: frames from the client: control frames, closes, errors.
//! 5. [`detach`]: a resumable session between connections, and its resume.
//!
//! Backpressure: while a client message waits for room on the link
//! (`pending`), the client is not read. Backend messages keep flowing to the
//! client meanwhile.

use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::WebSocket;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use protocol::{pb, Body, Frame, SessionId};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::debug;

use crate::backend::{Lease, LinkHandle, Mailbox, Queue, ADVISORY_SEND_DEADLINE};
use crate::close::CloseReason;
use crate::logs::limited;
use crate::resume::{AttachRequest, Credentials, Ring, Token};
use crate::shared::Shared;
use crate::telemetry::SessionSpan;

mod assemble;
pub(crate) use assemble::Assembler;
mod client;
mod connected;
mod connection;
mod deliver;
mod detach;
mod handover;
mod signals;
mod upstream;

pub(crate) use handover::{run_imported, Import};
use signals::Signals;
use upstream::Upstream;

/// The client connection once upgraded.
type Io = TokioIo<Upgraded>;

/// Everything a session needs, prepared by the upgrade handler.
pub(crate) struct SessionStart {
    pub(crate) id: SessionId,
    pub(crate) lease: Lease,
    pub(crate) open: pb::SessionOpen,
    /// Admission permit, held for the session's whole life.
    pub(crate) permit: OwnedSemaphorePermit,
    /// For a resumable session: its credential and its resume requests.
    pub(crate) resume: Option<(Token, mpsc::Receiver<Box<AttachRequest>>)>,
    /// The session's trace span (empty unless sampled).
    pub(crate) span: SessionSpan,
}

/// One session, across client connections when it is resumable.
struct Session {
    id: SessionId,
    link: LinkHandle,
    shared: Arc<Shared>,
    /// Backend messages for the client, in order.
    queue: Queue,
    /// What can interrupt the session in any state.
    signals: Signals,
    /// A client message accepted but still waiting for room on the link
    /// (or in the backend's window).
    pending: Option<Frame>,
    /// On a link with protocol version 3's flow control: the backend's
    /// window, and with "move" what it has not acknowledged.
    upstream: Option<Upstream>,
    /// Client messages accepted in the session (told to a resuming client).
    received: u64,
    /// Present for resumable sessions (boxed: a session that is not
    /// resumable keeps one word for it).
    resumable: Option<Box<Resumable>>,
    /// The session's trace span (empty unless sampled).
    span: SessionSpan,
    /// When the session started on this instance.
    started: Instant,
    /// When the latest client data message was read. The client is not
    /// read while a message is `pending`, so this is also that message's.
    read_at: Instant,
    /// Held for the session's life: its place on the link and under the
    /// session cap.
    _lease: Lease,
    _permit: OwnedSemaphorePermit,
}

/// What a resumable session keeps between connections.
struct Resumable {
    /// The credentials currently valid.
    creds: Credentials,
    /// The most recent backend messages, for replay.
    ring: Ring,
    /// Messages to write first on a resumed connection.
    replay: Vec<(Bytes, bool)>,
}

/// How a client connection ended, and whether a close frame can still be
/// written.
struct End {
    reason: CloseReason,
    /// False when the stream is broken (IO error, a write aborted midway) or
    /// the client already received its close.
    can_write: bool,
    /// A resume on a new connection is taking the session over.
    takeover: Option<Box<AttachRequest>>,
}

impl End {
    fn clean(reason: CloseReason) -> Self {
        Self {
            reason,
            can_write: true,
            takeover: None,
        }
    }

    fn broken(reason: CloseReason) -> Self {
        Self {
            reason,
            can_write: false,
            takeover: None,
        }
    }

    /// This connection is being replaced by the one in `req`.
    fn taken_over(mut self, req: Box<AttachRequest>) -> Self {
        self.takeover = Some(req);
        self
    }
}

/// Runs one session to its end, across client connections when it is
/// resumable.
///
/// The connection and the start come boxed, and the opening is a boxed
/// future of its own: an async function keeps its arguments and every
/// local that lives across an `.await` for all its life, and this one lives
/// as long as the session (issue 12: an idle session costs only what it
/// must).
pub(crate) async fn run(ws: Box<WebSocket<Io>>, start: Box<SessionStart>, shared: Arc<Shared>) {
    let Some(mut session) = Box::pin(open(start, shared)).await else {
        return;
    };
    let reason = session.serve(ws).await;
    Box::pin(session.finish(reason)).await;
}

/// Puts a new session on its link and tells the backend; `None` (the
/// session recorded as ended) when the link is gone.
async fn open(start: Box<SessionStart>, shared: Arc<Shared>) -> Option<Session> {
    let SessionStart {
        id,
        lease,
        open,
        permit,
        resume,
        span,
    } = *start;
    let started = Instant::now();
    shared.metrics.session_opened();
    let link = lease.link().clone();
    debug!(link = link.index(), "session open");
    let kept_open = link.caps().moves.then(|| open.clone());
    let open = Frame {
        session_id: id.0,
        body: Some(Body::Open(open)),
    };
    let (token, attach) = match resume {
        Some((t, rx)) => (Some(t), Some(rx)),
        None => (None, None),
    };
    let Ok(Mailbox {
        queue,
        eviction,
        flow,
    }) = link.register(id)
    else {
        finish_unopened(&shared, id, token.as_ref(), CloseReason::LinkLost, span);
        return None;
    };
    if link.send_pending(&mut Some(open), None).await.is_err() {
        link.unregister(id);
        finish_unopened(&shared, id, token.as_ref(), CloseReason::LinkLost, span);
        return None;
    }
    let rc = &shared.resume;
    let resumable = token.map(|token| {
        Box::new(Resumable {
            creds: Credentials::new(token),
            ring: Ring::new(rc.buffer_bytes),
            replay: Vec::new(),
        })
    });
    let upstream = flow.map(|f| Upstream::new(f, &link, kept_open));
    Some(Session {
        id,
        upstream,
        signals: Signals::new(eviction, attach, shared.shutdown.drain_signal()),
        link,
        queue,
        pending: None,
        received: 0,
        resumable,
        span,
        started,
        read_at: started,
        _lease: lease,
        _permit: permit,
        shared,
    })
}

impl Session {
    /// Serves client connections until the session ends; returns why.
    /// Each connection, and what follows the first, is a boxed future:
    /// only what the session is doing now takes room.
    async fn serve(&mut self, ws: Box<WebSocket<Io>>) -> CloseReason {
        let end = Box::pin(self.connected(ws)).await;
        Box::pin(self.serve_from(end)).await
    }

    /// Serves the connections that follow `end` until the session ends.
    async fn serve_from(&mut self, mut end: End) -> CloseReason {
        loop {
            match Box::pin(self.next_connection(end)).await {
                Ok(ws) => end = Box::pin(self.connected(Box::new(ws))).await,
                Err(reason) => return reason,
            }
        }
    }

    /// After a connection ended: the next one (a takeover, or a resume of a
    /// detached session), or why the session is over.
    async fn next_connection(&mut self, end: End) -> Result<WebSocket<Io>, CloseReason> {
        // A connection lost after the route went away cannot be resumed:
        // say why the session really ended.
        let reason = match (end.reason, self.signals.eviction.gone()) {
            (CloseReason::ClientLost | CloseReason::ClientTimeout, Some(gone)) => {
                self.after_gone(gone)
            }
            (reason, _) => reason,
        };
        // The backend hears `detached` unless this is a takeover.
        let mut told = end.takeover.is_none();
        let mut request = match end.takeover {
            Some(req) => req,
            None if reason.is_connection_loss() && self.resumable.is_some() => {
                self.detached(&reason, true).await?
            }
            None => return Err(reason),
        };
        loop {
            match Box::pin(self.attach(request)).await {
                Ok(ws) => return Ok(ws),
                Err(Err(reason)) => return Err(reason),
                // The resume came to nothing: wait for the next one.
                Err(Ok(why)) => {
                    request = self.detached(&why, !told).await?;
                    told = true;
                }
            }
        }
    }

    /// Tells the backend (when it should hear it), leaves the link, and
    /// records the end.
    async fn finish(mut self, reason: CloseReason) {
        // A resume arriving from now on finds no session (410); one handed
        // over is found at the instance that took it.
        if let Some(r) = &self.resumable {
            for t in r.creds.all() {
                if reason == CloseReason::HandedOver {
                    self.shared.resumable.remove_local(t);
                } else {
                    self.shared.resumable.remove(t);
                }
            }
        }
        // No grant may follow the close.
        if let Some(up) = &self.upstream {
            up.flow.end();
        }
        if let Some((code, why)) = reason.to_backend() {
            let close = Frame::close(self.id.0, code, why);
            self.link.send_within(close, ADVISORY_SEND_DEADLINE).await;
        }
        self.link.unregister(self.id);
        self.shared.metrics.session_lived(self.started.elapsed());
        record_end(&self.shared, self.id, &reason, &mut self.span);
    }
}

/// Ends a session that never got onto its link.
fn finish_unopened(
    shared: &Shared,
    id: SessionId,
    token: Option<&Token>,
    reason: CloseReason,
    mut span: SessionSpan,
) {
    if let Some(t) = token {
        shared.resumable.remove(t);
    }
    record_end(shared, id, &reason, &mut span);
}

/// Counts the end, ends the trace span and logs it.
fn record_end(shared: &Shared, id: SessionId, reason: &CloseReason, span: &mut SessionSpan) {
    let label = reason.label();
    let side = reason.side();
    shared.metrics.session_closed(reason);
    // The code the client got, or sent; 1006 (no close frame) when its
    // connection was lost or handed to another instance.
    let code = match (reason.to_client(), reason) {
        (Some(c), _) => c.code,
        (None, CloseReason::ClientClosed { code, .. }) => *code,
        (None, _) => 1006,
    };
    span.close(code, label);
    if reason.is_notable() {
        // A lost link closes every session on it at once: limited, with a
        // budget of its own so that such a burst does not hide other
        // notable ends (slow consumers, invalid backend data).
        match reason {
            CloseReason::LinkLost => {
                limited!(warn, session = id.0, reason = label, ?side, detail = ?reason, "session closed");
            }
            CloseReason::SlowConsumer => {
                limited!(warn, session = id.0, reason = label, ?side, detail = ?reason, "session closed");
            }
            _ => {
                limited!(warn, session = id.0, reason = label, ?side, detail = ?reason, "session closed");
            }
        }
    } else {
        debug!(reason = label, ?side, detail = ?reason, "session closed");
    }
}

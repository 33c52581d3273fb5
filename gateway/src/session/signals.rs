//! What can interrupt a session in any state: the link reader taking it off
//! the link, a resume request from a new connection, the gateway draining.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::{mpsc, Notify};

use crate::backend::{Eviction, Gone};
use crate::resume::{AttachRequest, Credentials};

/// One interruption.
pub(super) enum Signal {
    /// The session's route on its link is gone.
    Evicted(Gone),
    /// The gateway is draining: the session closes with 1001, or in a
    /// fleet is handed off (4000), at its moment within the close spread.
    Drain,
    /// A resume request arrived. It may be stale: see [`stale`].
    Attach(Box<AttachRequest>),
    /// The resume channel closed; no resume can arrive any more.
    AttachClosed,
}

/// Which signals a state listens to.
#[derive(Clone, Copy)]
pub(super) struct Listen {
    pub(super) eviction: bool,
    pub(super) attach: bool,
    pub(super) drain: bool,
}

impl Listen {
    /// Every signal.
    pub(super) const ALL: Self = Self {
        eviction: true,
        attach: true,
        drain: true,
    };
}

/// The sources of [`Signal`]s, owned by the session.
pub(super) struct Signals {
    pub(super) eviction: Eviction,
    /// Resume requests, for resumable sessions.
    attach: Option<mpsc::Receiver<Box<AttachRequest>>>,
    /// Created once, so that every `notify_waiters` after the session began
    /// reaches it (re-creating it per event would also cost a waiter
    /// registration per message).
    drain: Pin<Box<OwnedNotified>>,
}

impl Signals {
    pub(super) fn new(
        eviction: Eviction,
        attach: Option<mpsc::Receiver<Box<AttachRequest>>>,
        drain: Arc<Notify>,
    ) -> Self {
        Self {
            eviction,
            attach,
            drain: Box::pin(drain.notified_owned()),
        }
    }

    /// The next signal among those `listen` asks for; never resolves when
    /// it asks for none. Cancel-safe.
    pub(super) async fn next(&mut self, listen: Listen) -> Signal {
        let attach = listen.attach && self.attach.is_some();
        tokio::select! {
            biased;
            gone = self.eviction.wait(), if listen.eviction => Signal::Evicted(gone),
            _ = self.drain.as_mut(), if listen.drain => Signal::Drain,
            req = recv(&mut self.attach), if attach => match req {
                Some(req) => Signal::Attach(req),
                None => {
                    self.attach = None;
                    Signal::AttachClosed
                }
            },
            else => std::future::pending().await,
        }
    }
}

async fn recv(rx: &mut Option<mpsc::Receiver<Box<AttachRequest>>>) -> Option<Box<AttachRequest>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A resume request that must not touch the session: it presents a
/// credential already replaced (410), or its requester stopped waiting, or
/// it claims more messages than the session has delivered so far (400;
/// `delivered` is `None` where the count is not known yet). It is refused
/// and dropped.
pub(super) fn stale(
    req: Box<AttachRequest>,
    token: Option<&Credentials>,
    delivered: Option<u64>,
) -> Option<Box<AttachRequest>> {
    use crate::refusal::ResumeRefusal;
    let refusal = if req.abandoned() || !token.is_some_and(|c| c.accepts(&req.token)) {
        ResumeRefusal::Stale
    } else if delivered.is_some_and(|d| req.position > d) {
        ResumeRefusal::BadPosition
    } else {
        return Some(req);
    };
    req.refuse(refusal);
    None
}

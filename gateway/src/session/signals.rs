//! What can interrupt a session in any state: the link reader taking it off
//! the link, a resume request from a new connection, the gateway draining.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::mpsc;

use crate::backend::{Eviction, Gone};
use crate::resume::{AttachRequest, Credentials};
use crate::shutdown::DrainSignal;

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
    drain: DrainWatch,
}

/// The gateway's drain, as one session watches it.
///
/// The waiter is created once, so that every `notify_waiters` after the
/// session began reaches it (re-creating it per event would also cost a
/// waiter registration per message). Once it holds this task's waker it
/// is not polled again until the drain has begun: polling it takes the
/// `Notify`'s lock, which every session shares, and the session is polled
/// twice per message it relays (issue 12).
struct DrainWatch {
    notified: Pin<Box<OwnedNotified>>,
    /// Set before the waiter is woken.
    begun: Arc<AtomicBool>,
    /// The waker the waiter holds, once polled.
    waker: Option<Waker>,
}

impl DrainWatch {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let registered = self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if registered && !self.begun.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        let polled = self.notified.as_mut().poll(cx);
        if polled.is_pending() && !registered {
            self.waker = Some(cx.waker().clone());
        }
        polled
    }
}

impl Signals {
    pub(super) fn new(
        eviction: Eviction,
        attach: Option<mpsc::Receiver<Box<AttachRequest>>>,
        drain: DrainSignal,
    ) -> Self {
        Self {
            eviction,
            attach,
            drain: DrainWatch {
                notified: Box::pin(drain.notify.notified_owned()),
                begun: drain.begun,
                waker: None,
            },
        }
    }

    /// The next signal among those `listen` asks for; never resolves when
    /// it asks for none. Cancel-safe.
    pub(super) async fn next(&mut self, listen: Listen) -> Signal {
        let attach = listen.attach && self.attach.is_some();
        tokio::select! {
            biased;
            gone = self.eviction.wait(), if listen.eviction => Signal::Evicted(gone),
            () = std::future::poll_fn(|cx| self.drain.poll(cx)), if listen.drain => Signal::Drain,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    /// A waker that counts its wake-ups.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn a_drain_wakes_the_task_that_polled_the_watch_last_and_then_resolves() {
        let drain = DrainSignal::default();
        let mut watch = DrainWatch {
            notified: Box::pin(drain.notify.clone().notified_owned()),
            begun: drain.begun.clone(),
            waker: None,
        };
        let ((a, wa), (b, wb)) = (waker(), waker());
        assert!(watch.poll(&mut Context::from_waker(&wa)).is_pending());
        // Polled again by the same task: the flag alone is read.
        assert!(watch.poll(&mut Context::from_waker(&wa)).is_pending());
        // Polled by another task: that one must be woken now.
        assert!(watch.poll(&mut Context::from_waker(&wb)).is_pending());
        drain.fire();
        assert_eq!(a.0.load(Ordering::SeqCst), 0, "the old waker is not used");
        assert_eq!(b.0.load(Ordering::SeqCst), 1, "the current waker is woken");
        assert!(watch.poll(&mut Context::from_waker(&wb)).is_ready());
        // Later states may listen again: the drain stays begun.
        assert!(watch.poll(&mut Context::from_waker(&wa)).is_ready());
    }
}

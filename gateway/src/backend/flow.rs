//! Protocol version 3: per-session flow control ("flow") and sessions that
//! outlive their link ("move"). See protocol/README.md, "Version 3".
//!
//! Both directions count the cost of `data` frames (payload + 64 bytes)
//! from the session's start, across links; a `Window` carries an absolute
//! limit and an acknowledgement, so that a window update can be coalesced,
//! repeated or resent after a move without harm.
//!
//! - Backend to client: the gateway grants `session_window` bytes at the
//!   start and, each time the client has taken half of it, a new limit of
//!   what the client has taken plus `session_window` ([`Flow::grant_after`]).
//!   The backend can therefore never have more than one window waiting in
//!   the gateway for a slow client.
//! - Client to backend: the session sends a client message only when it
//!   fits the backend's limit; otherwise it stops reading its client until
//!   the backend grants more. Other sessions on the link are not affected.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;

use futures_util::task::AtomicWaker;

/// What a link's backend adopted in the handshake.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Caps {
    /// Per-session flow control.
    pub(crate) flow: bool,
    /// Sessions move to another link when theirs is lost (needs `flow`).
    pub(crate) moves: bool,
    /// Sessions handed over from another gateway instance of the fleet can
    /// move onto this link (needs `moves`).
    pub(crate) fleet: bool,
    /// The window the backend grants each session at its start.
    pub(crate) backend_window: u64,
}

/// One session's flow-control state, shared by the session, its route on
/// the link's reader, and the link's writer (which encodes grants).
///
/// # Concurrency
/// Each counter has one writer: the reader writes `arrivals`, `limit`,
/// `acked` and `windows_seen` (and wakes `room`); the session writes
/// `grant` and `windows_waited` (and registers its waker in `room`).
/// Readers of a
/// stale value only send a smaller grant or wait one more wake-up; limits
/// only grow (`fetch_max`). What the reader writes for every message
/// (`arrivals`) has a cache line of its own, so that the session, which
/// reads the rest for every message it sends, does not miss its cache.
#[derive(Debug, Default)]
pub(crate) struct Flow {
    /// Backend data frames received in the session, and their cost.
    arrivals: Arrivals,
    /// Backend to client: the limit the gateway granted the backend.
    grant: AtomicU64,
    /// A grant is waiting in the link's writer queue.
    grant_queued: AtomicBool,
    /// `received` as of the last grant written ("move": what the backend
    /// knows the gateway has); written by the link's writer.
    acked_to_backend: AtomicU64,
    /// The session is over (or its route gone): no more grants for it, so
    /// that none follows its `close` on the wire.
    ended: AtomicBool,
    /// Client to backend: the backend's limit and acknowledgement.
    limit: AtomicU64,
    acked: AtomicU64,
    /// Windows received from the backend (a resume's answer is the next).
    windows_seen: AtomicU64,
    /// The session waiting for a window, woken by every window from the
    /// backend. Only the session's task waits, so one waker is enough, and
    /// registering it takes no lock (issue 12: the session waits for a
    /// window in every turn of its loop while the backend holds messages
    /// unacknowledged).
    room: AtomicWaker,
    /// `windows_seen` when the session's last wait for a window ended.
    windows_waited: AtomicU64,
}

/// The reader's counters, alone on their cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Arrivals {
    count: AtomicU64,
    cost: AtomicU64,
}

/// What the reader found when a backend data frame arrived.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Within the window.
    Fits,
    /// Within the window, which has no room left for another message of
    /// this size: the backend must wait for a grant (a stall).
    Exhausted,
    /// Past the window: the backend broke the contract.
    Exceeded,
}

impl Flow {
    /// A session's state at its start: the gateway grants `gateway_window`,
    /// the backend `backend_window`.
    pub(crate) fn new(gateway_window: u64, backend_window: u64) -> Self {
        let f = Self::default();
        f.grant.store(gateway_window, Ordering::Relaxed);
        f.limit.store(backend_window, Ordering::Relaxed);
        f
    }

    /// A session taken over from another instance of the fleet, with its
    /// counts from there: backend data frames received and their cost, the
    /// limit granted to the backend, and the backend's limit and
    /// acknowledgement.
    pub(crate) fn imported(
        received: u64,
        received_cost: u64,
        grant: u64,
        limit: u64,
        acked: u64,
    ) -> Self {
        let f = Self::default();
        f.arrivals.count.store(received, Ordering::Relaxed);
        f.arrivals.cost.store(received_cost, Ordering::Relaxed);
        f.grant.store(grant, Ordering::Relaxed);
        f.limit.store(limit, Ordering::Relaxed);
        f.acked.store(acked, Ordering::Relaxed);
        f
    }

    /// Cost of the backend data frames received so far.
    pub(crate) fn received_cost(&self) -> u64 {
        self.arrivals.cost.load(Ordering::Relaxed)
    }

    /// The reader: a backend data frame of `cost` arrived.
    pub(crate) fn arrived(&self, cost: u64) -> Arrival {
        // The reader is the only writer: no read-modify-write needed.
        let a = &self.arrivals;
        a.count
            .store(a.count.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        let used = a.cost.load(Ordering::Relaxed) + cost;
        a.cost.store(used, Ordering::Relaxed);
        let grant = self.grant.load(Ordering::Acquire);
        if used > grant {
            Arrival::Exceeded
        } else if grant - used < cost {
            Arrival::Exhausted
        } else {
            Arrival::Fits
        }
    }

    /// The reader: a `Window` from the backend.
    pub(crate) fn window(&self, limit: u64, received: u64) {
        self.limit.fetch_max(limit, Ordering::Relaxed);
        self.acked.fetch_max(received, Ordering::Relaxed);
        self.windows_seen.fetch_add(1, Ordering::Release);
        self.room.wake();
    }

    /// Backend data frames received so far.
    pub(crate) fn received(&self) -> u64 {
        self.arrivals.count.load(Ordering::Relaxed)
    }

    /// The limit currently granted to the backend.
    pub(crate) fn grant(&self) -> u64 {
        self.grant.load(Ordering::Relaxed)
    }

    /// The update rule: with `granted` the limit granted last and
    /// `consumed` what the client has taken (cumulative), a new limit when
    /// half the window or less is left, else `None`. The caller keeps
    /// `granted`, so that this costs no shared read per message.
    pub(crate) fn next_grant(granted: u64, consumed: u64, window: u64) -> Option<u64> {
        (granted.saturating_sub(consumed) <= window / 2).then_some(consumed + window)
    }

    /// Records a new limit granted to the backend.
    pub(crate) fn set_grant(&self, limit: u64) {
        self.grant.store(limit, Ordering::Release);
    }

    /// Marks a grant as queued for the writer; false if one already is
    /// (the writer reads the newest values when it encodes it).
    pub(crate) fn queue_grant(&self) -> bool {
        !self.ended.load(Ordering::Acquire) && !self.grant_queued.swap(true, Ordering::AcqRel)
    }

    /// The writer: takes the queued grant's current values (limit,
    /// received), or `None` if the session has ended meanwhile. The swap
    /// orders the flag before the read: a grant stored after the flag was
    /// seen set is either read here or queued anew by its writer.
    pub(crate) fn take_grant(&self) -> Option<(u64, u64)> {
        self.grant_queued.swap(false, Ordering::AcqRel);
        if self.ended.load(Ordering::Acquire) {
            return None;
        }
        let received = self.received();
        self.acked_to_backend.store(received, Ordering::Relaxed);
        Some((self.grant.load(Ordering::Acquire), received))
    }

    /// Whether backend data frames have arrived that no grant written so
    /// far acknowledged (see [`Flow::take_grant`]).
    pub(crate) fn unacknowledged(&self) -> bool {
        self.received() > self.acked_to_backend.load(Ordering::Relaxed)
    }

    /// No more grants for this session: it is ending (its `close` is on its
    /// way), or its route is gone.
    pub(crate) fn end(&self) {
        self.ended.store(true, Ordering::Release);
    }

    /// The session moved to another link: grants may go again.
    pub(crate) fn restart(&self) {
        self.ended.store(false, Ordering::Release);
        self.grant_queued.store(false, Ordering::Release);
    }

    /// The backend's limit for client data.
    pub(crate) fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Client data frames the backend acknowledged.
    pub(crate) fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Windows received from the backend so far.
    pub(crate) fn windows_seen(&self) -> u64 {
        self.windows_seen.load(Ordering::Acquire)
    }

    /// Waits for the next window from the backend (or one that came since
    /// the last wait ended). Only the session's task may wait. Cancel-safe.
    pub(crate) async fn next_window(&self) {
        std::future::poll_fn(|cx| {
            let waited = self.windows_waited.load(Ordering::Relaxed);
            let mut seen = self.windows_seen();
            if seen == waited {
                self.room.register(cx.waker());
                // A window that came while the waker was being registered.
                seen = self.windows_seen();
                if seen == waited {
                    return Poll::Pending;
                }
            }
            self.windows_waited.store(seen, Ordering::Relaxed);
            Poll::Ready(())
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_follows_half_a_window_of_consumption() {
        assert_eq!(Flow::next_grant(1000, 400, 1000), None);
        assert_eq!(Flow::next_grant(1000, 500, 1000), Some(1500));
        assert_eq!(Flow::next_grant(1500, 900, 1000), None);
        assert_eq!(Flow::next_grant(1500, 1000, 1000), Some(2000));
    }

    #[test]
    fn arrivals_are_checked_against_the_grant() {
        let f = Flow::new(300, 0);
        assert_eq!(f.arrived(100), Arrival::Fits);
        assert_eq!(f.arrived(100), Arrival::Fits);
        assert_eq!(f.arrived(100), Arrival::Exhausted);
        assert_eq!(f.arrived(1), Arrival::Exceeded);
        assert_eq!(f.received(), 4);
    }

    #[test]
    fn windows_only_grow() {
        let f = Flow::new(0, 500);
        f.window(400, 3);
        assert_eq!((f.limit(), f.acked()), (500, 3));
        f.window(900, 2);
        assert_eq!((f.limit(), f.acked()), (900, 3));
        assert_eq!(f.windows_seen(), 2);
    }

    #[test]
    fn a_wait_for_a_window_ends_with_one_that_came_since_the_last_wait() {
        use futures_util::FutureExt;
        let f = Flow::new(1000, 1000);
        assert!(f.next_window().now_or_never().is_none(), "no window yet");
        f.window(2000, 1);
        f.window(3000, 2);
        assert!(f.next_window().now_or_never().is_some(), "windows came");
        assert!(
            f.next_window().now_or_never().is_none(),
            "both were seen by the last wait"
        );
        f.window(4000, 3);
        assert!(f.next_window().now_or_never().is_some());
    }

    #[tokio::test]
    async fn a_window_wakes_the_waiting_session() {
        let f = Flow::new(1000, 1000);
        let wait = tokio::time::timeout(std::time::Duration::from_secs(5), f.next_window());
        let send = async {
            tokio::task::yield_now().await;
            f.window(2000, 1);
        };
        // The wait first: it must be woken, not find the window on a poll
        // of its own.
        let (woken, ()) = tokio::join!(biased; wait, send);
        assert!(woken.is_ok(), "the window woke the wait");
    }
}

//! A session's receiving end on its link.
//!
//! The link's reader holds a [`Route`] per session and hands it each backend
//! frame with [`Route::offer`], which never waits. A mailbox is bounded by
//! bytes (each message counting its payload and [`QUEUED_OVERHEAD`]), not by
//! a number of messages, and slowness is judged on the client, over time:
//! - a burst that fits the bound is always taken, however many messages;
//! - a session whose queue stays above half the bound for longer than
//!   `drain_within` (`session.write_timeout`) is a slow consumer: the client
//!   does not take what it is sent;
//! - the bound itself is the memory cap: a message that would take the
//!   queue past it evicts the session at once (but a message always fits an
//!   empty queue, and the backend's close always fits).
//!
//! The session holds the
//! [`Mailbox`]: the messages in order, and an eviction signal that fires
//! once when the reader takes the session off the link.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use protocol::SessionId;

use super::chan;
use super::flow::Flow;
use super::{LinkHandle, BACKING_UP_DEPTH, QUEUED_OVERHEAD};

/// What the reader delivers to a session.
#[derive(Debug)]
pub(crate) enum ToClient {
    /// One message for the client.
    Data {
        /// Message body.
        payload: Bytes,
        /// Text (true) or binary.
        text: bool,
        /// When the link read it (for the relay time histogram).
        read_at: crate::metrics::Stamp,
    },
    /// The backend closed the session.
    Close {
        /// The backend's code.
        code: u32,
        /// The backend's reason.
        reason: String,
    },
    /// The backend sent a frame for the session that cannot be decoded: the
    /// session ends (1011, and the backend is told).
    Invalid {
        /// What was wrong, for the close reason and the logs.
        reason: String,
    },
}

impl ToClient {
    /// What it costs of the mailbox's byte bound: what holding it takes.
    fn cost(&self) -> usize {
        QUEUED_OVERHEAD
            + match self {
                Self::Data { payload, .. } => payload.len(),
                Self::Close { reason, .. } | Self::Invalid { reason } => reason.len(),
            }
    }
}

/// Why the reader took a session off the link. (When the link itself ends,
/// the sender is dropped instead, and the session sees a receive error.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Evict {
    SlowConsumer,
    BackendClosed,
}

/// Why a session's route on its link is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gone {
    /// The mailbox overflowed: the session must end as a slow consumer.
    SlowConsumer,
    /// The backend ended the session: its close (or the invalid frame that
    /// ends it) is in the mailbox, after any data that preceded it.
    BackendClosed,
    /// The link ended.
    LinkLost,
}

/// A session's receiving end on its link: the queue of backend messages,
/// and the signal of the route going away. Two parts, so that a session can
/// take messages from one while it watches the other.
pub(crate) struct Mailbox {
    /// Backend messages, in order.
    pub(crate) queue: Queue,
    /// Fires when the reader takes the session off the link.
    pub(crate) eviction: Eviction,
    /// On a link with flow control (version 3), the session's state.
    pub(crate) flow: Option<Arc<Flow>>,
}

/// Bounds of a session's mailbox.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MailboxLimits {
    /// Bytes (see [`ToClient::cost`]) a queue may hold.
    pub(crate) bytes: usize,
    /// How long a queue may stay above half of `bytes`.
    pub(crate) drain_within: Duration,
}

/// How full a queue is, shared by the session and the link's reader.
struct Fill {
    /// Bytes (see [`ToClient::cost`]) in the channel and in the session's
    /// hand.
    bytes: AtomicUsize,
    /// Since when the queue has been above half its bound, in milliseconds
    /// after `epoch`, plus one; 0 while it is not.
    over_since: AtomicU64,
    epoch: Instant,
    limits: MailboxLimits,
}

impl Fill {
    fn half(&self) -> usize {
        self.limits.bytes / 2
    }

    /// Whether the queue has been above half its bound for longer than
    /// allowed; starts the clock when it has just gone above.
    fn overdue(&self) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        match self.over_since.load(Ordering::Relaxed) {
            0 => {
                self.over_since
                    .store(now.saturating_add(1), Ordering::Relaxed);
                false
            }
            since => {
                let allowed =
                    u64::try_from(self.limits.drain_within.as_millis()).unwrap_or(u64::MAX);
                now.saturating_add(1).saturating_sub(since) > allowed
            }
        }
    }
}

/// Backend messages for one session, in order, bounded by bytes.
pub(crate) struct Queue {
    rx: chan::Receiver<ToClient>,
    /// Shared with the route.
    fill: Arc<Fill>,
    /// Bytes of the message the session took last and has not yet written:
    /// a message counts against the bound until it is written (or the
    /// session takes the next one), so the bound is what memory holds.
    in_hand: usize,
    /// On a link with flow control: what the client has taken, to grant
    /// the backend more.
    flow: Option<QueueFlow>,
}

/// A queue's side of flow control.
struct QueueFlow {
    id: SessionId,
    /// The link grants go out on (the session's current one).
    link: LinkHandle,
    shared: Arc<Flow>,
    /// The gateway's window per session (`session.client_queue_bytes`).
    window: u64,
    /// The limit granted last (the session is the only one to grant).
    granted: u64,
    /// Cost of the backend data the client has taken, cumulative.
    consumed: u64,
    /// A sender kept for the session's next route when it moves to another
    /// link ("move"); `None` otherwise, so that the queue ends with its
    /// route.
    spare: Option<chan::Sender<ToClient>>,
}

/// Watches for the route going away. Unlike a bare oneshot receiver it can
/// be waited on again after it fired (it then never resolves), and it
/// remembers what happened.
pub(crate) struct Eviction {
    rx: Option<oneshot::Receiver<Evict>>,
    gone: Option<Gone>,
}

/// The reader's entry for one session.
pub(super) struct Route {
    tx: chan::Sender<ToClient>,
    fill: Arc<Fill>,
    evict: oneshot::Sender<Evict>,
    /// On a link with flow control, the session's state.
    pub(super) flow: Option<Arc<Flow>>,
}

/// What [`Route::offer`] did with a frame.
pub(super) enum Offered {
    /// Queued; the route stays.
    Queued,
    /// Queued, and it was the session's close: the route is done.
    Closed,
    /// The mailbox was full (or the session is gone): the route is done.
    Dropped,
}

impl Mailbox {
    /// A mailbox within `limits`, and the route the link's reader keeps
    /// for it. With `flow` (the link and the session's state), the queue
    /// grants the backend more as the client takes messages; with `moves`
    /// it can be routed again from another link.
    pub(super) fn new(
        id: SessionId,
        limits: MailboxLimits,
        flow: Option<(LinkHandle, Arc<Flow>)>,
        moves: bool,
    ) -> (Self, Route) {
        // Bounded by bytes (see `Route::offer`), not by the channel.
        let (tx, rx) = chan::channel();
        let (evict_tx, evict_rx) = oneshot::channel();
        let fill = Arc::new(Fill {
            bytes: AtomicUsize::new(0),
            over_since: AtomicU64::new(0),
            epoch: Instant::now(),
            limits,
        });
        let shared = flow.as_ref().map(|(_, f)| f.clone());
        let queue_flow = flow.map(|(link, shared)| QueueFlow {
            // The initial grant is the session's window.
            window: shared.grant(),
            granted: shared.grant(),
            id,
            link,
            shared,
            consumed: 0,
            spare: moves.then(|| tx.clone()),
        });
        let route = Route {
            tx,
            fill: fill.clone(),
            evict: evict_tx,
            flow: shared.clone(),
        };
        let mailbox = Self {
            queue: Queue {
                rx,
                fill,
                in_hand: 0,
                flow: queue_flow,
            },
            eviction: Eviction {
                rx: Some(evict_rx),
                gone: None,
            },
            flow: shared,
        };
        (mailbox, route)
    }
}

impl Queue {
    /// The next message, in order. Cancel-safe. `None` once the link has
    /// dropped the route and the queue is empty.
    pub(crate) async fn recv(&mut self) -> Option<ToClient> {
        let msg = self.rx.recv().await?;
        self.taken(&msg);
        Some(msg)
    }

    /// How many messages wait to be taken.
    pub(crate) fn depth(&self) -> usize {
        self.rx.depth()
    }

    /// The next message if one is queued.
    pub(crate) fn try_recv(&mut self) -> Option<ToClient> {
        let msg = self.rx.try_recv()?;
        self.taken(&msg);
        Some(msg)
    }

    /// The message taken last was written to the client: its bytes no
    /// longer count.
    pub(crate) fn written(&mut self) {
        if self.in_hand > 0 {
            if let Some(f) = &mut self.flow {
                f.consumed += self.in_hand as u64;
                if let Some(limit) = Flow::next_grant(f.granted, f.consumed, f.window) {
                    f.granted = limit;
                    f.shared.set_grant(limit);
                    f.link.send_grant(f.id, &f.shared);
                }
            }
            let before = self.fill.bytes.fetch_sub(self.in_hand, Ordering::Relaxed);
            // Read first: the common case (never over) writes nothing the
            // link's reader shares.
            if before - self.in_hand <= self.fill.half()
                && self.fill.over_since.load(Ordering::Relaxed) != 0
            {
                self.fill.over_since.store(0, Ordering::Relaxed);
            }
            self.in_hand = 0;
        }
    }

    /// Flow control of a session taken over from another instance: the
    /// gateway's `window`, and what the client had taken there (the limit
    /// granted is the shared state's).
    pub(crate) fn continue_flow(&mut self, window: u64, consumed: u64) {
        if let Some(f) = self.flow.as_mut() {
            f.window = window;
            f.granted = f.shared.grant();
            f.consumed = consumed;
        }
    }

    /// With flow control: the limit granted last and the cost the client
    /// has taken (written) so far.
    pub(crate) fn flow_counts(&self) -> Option<(u64, u64)> {
        self.flow.as_ref().map(|f| (f.granted, f.consumed))
    }

    /// A new route for this queue on `link` (a move), sharing its bound
    /// and flow state; `None` unless the queue was made for moving.
    pub(super) fn reroute(&mut self, link: LinkHandle) -> Option<(Eviction, Route)> {
        let f = self.flow.as_mut()?;
        let tx = f.spare.clone()?;
        f.link = link;
        f.shared.restart();
        let (evict_tx, evict_rx) = oneshot::channel();
        let route = Route {
            tx,
            fill: self.fill.clone(),
            evict: evict_tx,
            flow: Some(f.shared.clone()),
        };
        let eviction = Eviction {
            rx: Some(evict_rx),
            gone: None,
        };
        Some((eviction, route))
    }

    fn taken(&mut self, msg: &ToClient) {
        // A message taken and never written (its write was abandoned)
        // stops counting when the next one is taken.
        self.written();
        self.in_hand = msg.cost();
    }
}

impl Eviction {
    /// Resolves once, when the route goes; after that never again (see
    /// [`Eviction::gone`]). Cancel-safe.
    pub(crate) async fn wait(&mut self) -> Gone {
        let Some(rx) = self.rx.as_mut() else {
            return std::future::pending().await;
        };
        let gone = match rx.await {
            Ok(Evict::SlowConsumer) => Gone::SlowConsumer,
            Ok(Evict::BackendClosed) => Gone::BackendClosed,
            Err(_) => Gone::LinkLost,
        };
        self.rx = None;
        self.gone = Some(gone);
        gone
    }

    /// What happened, if the route is already known to be gone.
    pub(crate) fn gone(&self) -> Option<Gone> {
        self.gone
    }
}

impl Route {
    /// Queues one backend message without waiting; evicts the session as a
    /// slow consumer when the message would take the queue past its bound,
    /// or when the queue has stayed above half of it for too long (see the
    /// module's text).
    pub(super) fn offer(&self, msg: ToClient) -> Offered {
        let is_close = matches!(msg, ToClient::Close { .. } | ToClient::Invalid { .. });
        let msg = match msg {
            ToClient::Data {
                payload,
                text,
                read_at,
            } if self.lagging() => ToClient::Data {
                payload: Bytes::copy_from_slice(&payload),
                text,
                read_at,
            },
            other => other,
        };
        let cost = msg.cost();
        let queued = self.fill.bytes.fetch_add(cost, Ordering::Relaxed) + cost;
        if !is_close {
            let full = queued > self.fill.limits.bytes && queued > cost;
            let overdue = self.flow.is_none() && queued > self.fill.half() && self.fill.overdue();
            if full || overdue {
                return Offered::Dropped;
            }
        }
        match self.tx.send(msg) {
            Ok(()) if is_close => Offered::Closed,
            Ok(()) => Offered::Queued,
            Err(_) => Offered::Dropped,
        }
    }

    /// Tells the session why its route went, after [`Route::offer`] ended
    /// it. A session that is itself gone needs no word.
    pub(super) fn evict(self, offered: &Offered) {
        let why = match offered {
            Offered::Queued => return,
            Offered::Closed => Evict::BackendClosed,
            Offered::Dropped if self.tx.is_closed() => return,
            Offered::Dropped => Evict::SlowConsumer,
        };
        let _ = self.evict.send(why);
    }

    fn lagging(&self) -> bool {
        self.tx.depth() >= BACKING_UP_DEPTH
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn data(n: usize) -> ToClient {
        ToClient::Data {
            payload: Bytes::from(vec![b'x'; n]),
            text: false,
            read_at: crate::metrics::Stamp::now(),
        }
    }

    /// A payload of `n` bytes costs this much of the bound.
    fn cost(n: usize) -> usize {
        n + QUEUED_OVERHEAD
    }

    fn limits(bytes: usize) -> MailboxLimits {
        MailboxLimits {
            bytes,
            drain_within: Duration::from_secs(20),
        }
    }

    #[tokio::test]
    async fn a_queue_above_half_for_too_long_is_a_slow_consumer() {
        let (mut mb, route) = Mailbox::new(
            SessionId(1),
            MailboxLimits {
                bytes: 10 * cost(1),
                drain_within: Duration::ZERO,
            },
            None,
            false,
        );
        for _ in 0..6 {
            assert!(matches!(route.offer(data(1)), Offered::Queued));
        }
        // Drained to half: the clock stops.
        mb.queue.try_recv().unwrap();
        mb.queue.written();
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            matches!(route.offer(data(1)), Offered::Queued),
            "clock restarted"
        );
        // Still above half a moment later: the client is not keeping up.
        std::thread::sleep(Duration::from_millis(5));
        let late = route.offer(data(1));
        assert!(matches!(late, Offered::Dropped));
        route.evict(&late);
        assert_eq!(mb.eviction.wait().await, Gone::SlowConsumer);
    }

    #[tokio::test]
    async fn the_backends_close_always_fits() {
        let (mut mb, route) = Mailbox::new(SessionId(1), limits(cost(10)), None, false);
        assert!(matches!(route.offer(data(10)), Offered::Queued));
        let close = route.offer(ToClient::Close {
            code: 1000,
            reason: "done".into(),
        });
        assert!(matches!(close, Offered::Closed));
        assert!(mb.queue.try_recv().is_some());
        assert!(matches!(mb.queue.try_recv(), Some(ToClient::Close { .. })));
    }

    #[tokio::test]
    async fn a_full_mailbox_evicts_its_session_as_a_slow_consumer() {
        let (mut mb, route) = Mailbox::new(SessionId(1), limits(2 * cost(1)), None, false);
        assert!(matches!(route.offer(data(1)), Offered::Queued));
        assert!(matches!(route.offer(data(1)), Offered::Queued));
        let third = route.offer(data(1));
        assert!(matches!(third, Offered::Dropped));
        route.evict(&third);
        assert_eq!(mb.eviction.wait().await, Gone::SlowConsumer);
        assert_eq!(mb.eviction.gone(), Some(Gone::SlowConsumer));
        // What was queued before the eviction is still delivered.
        assert!(mb.queue.try_recv().is_some());
        assert!(mb.queue.try_recv().is_some());
    }

    #[tokio::test]
    async fn a_burst_of_many_small_messages_is_bounded_by_bytes_only() {
        // 10,000 messages of 100 B fit in 2 MiB: none is refused for their
        // number, and the bytes counted are what they hold.
        let (mut mb, route) = Mailbox::new(SessionId(1), limits(2 << 20), None, false);
        for _ in 0..10_000 {
            assert!(matches!(route.offer(data(100)), Offered::Queued));
        }
        assert_eq!(
            mb.queue.fill.bytes.load(Ordering::Relaxed),
            10_000 * cost(100)
        );
        for _ in 0..10_000 {
            assert!(mb.queue.try_recv().is_some());
        }
        mb.queue.written();
        assert_eq!(mb.queue.fill.bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn one_message_always_fits_an_empty_mailbox() {
        let (mut mb, route) = Mailbox::new(SessionId(1), limits(100), None, false);
        assert!(matches!(route.offer(data(100)), Offered::Queued));
        assert!(matches!(route.offer(data(1)), Offered::Dropped));
        assert!(mb.queue.try_recv().is_some());
    }

    #[tokio::test]
    async fn bytes_are_counted_until_the_session_has_written_them() {
        for written in [false, true] {
            let (mut mb, route) =
                Mailbox::new(SessionId(1), limits(cost(60) + cost(40)), None, false);
            assert!(matches!(route.offer(data(60)), Offered::Queued));
            assert!(matches!(route.offer(data(40)), Offered::Queued));
            assert!(mb.queue.recv().await.is_some());
            if written {
                mb.queue.written();
                // 40 queued now: another 60 fits exactly, 61 would not.
                assert!(matches!(route.offer(data(60)), Offered::Queued));
            }
            // Taken but not yet written: still counted.
            assert!(matches!(route.offer(data(1)), Offered::Dropped));
        }
    }

    #[tokio::test]
    async fn a_backend_close_ends_the_route_after_its_data() {
        let (mut mb, route) = Mailbox::new(SessionId(1), limits(1000), None, false);
        assert!(matches!(route.offer(data(1)), Offered::Queued));
        let close = route.offer(ToClient::Close {
            code: 4000,
            reason: "bye".into(),
        });
        assert!(matches!(close, Offered::Closed));
        route.evict(&close);
        assert_eq!(mb.eviction.wait().await, Gone::BackendClosed);
        assert!(matches!(mb.queue.try_recv(), Some(ToClient::Data { .. })));
        assert!(matches!(
            mb.queue.try_recv(),
            Some(ToClient::Close { code: 4000, .. })
        ));
    }

    #[tokio::test]
    async fn a_dropped_route_reads_as_a_lost_link() {
        let (mut mb, route) = Mailbox::new(SessionId(1), limits(1000), None, false);
        drop(route);
        assert_eq!(mb.eviction.wait().await, Gone::LinkLost);
        assert!(mb.queue.recv().await.is_none());
    }
}

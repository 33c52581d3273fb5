//! The session's side of a link: [`LinkHandle`].
//!
//! A frame for the backend costs its wire length (the codec's own count)
//! plus what holding it costs ([`QUEUED_FRAME_OVERHEAD`]) of the link's byte
//! budget and one slot of its frame queue; the driver's
//! writer gives both back once the frame is written. A session sends with
//! one call: [`LinkHandle::try_send`] on the hot path (never waits),
//! [`LinkHandle::send_pending`] to wait for room for a message it holds,
//! [`LinkHandle::send_within`] for frames worth a bounded wait.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Stamp;
use protocol::{Frame, FrameCodec, SessionId};
use tokio::sync::{mpsc, Semaphore};

use super::driver::{Control, DriverQueues, Outbound};
use super::flow::{Caps, Flow};
use super::mailbox::{Eviction, Mailbox, MailboxLimits, Queue};
use super::{LinkSettings, BACKING_UP_DEPTH, QUEUED_FRAME_OVERHEAD};

/// Outcome of [`LinkHandle::try_send`].
pub(crate) enum TrySend {
    /// Queued.
    Sent,
    /// No room now; the frame is given back to wait for room.
    Full(Box<Frame>),
    /// The link is gone; the frame is given back (a session that moves
    /// sends it on its next link).
    Gone(Box<Frame>),
}

/// The link is gone; the session must end with close code 1012.
#[derive(Debug)]
pub(crate) struct LinkGone;

/// The cheap, clonable side of a link.
///
/// # Concurrency
/// Sessions on any worker thread send through `tx` (a bounded MPSC queue)
/// after taking `cost` permits from `budget`; only the writer receives and
/// only the writer returns permits. `sessions` is a load estimate written by
/// [`super::Lease`]s with relaxed atomics; a stale read only makes placement
/// slightly less even. The control queue is unbounded but carries at most
/// two messages per session (register, unregister), and sessions are capped
/// by `listen.max_sessions`.
#[derive(Clone)]
pub(crate) struct LinkHandle {
    shared: Arc<Shared>,
}

struct Shared {
    index: u32,
    version: u32,
    codec: FrameCodec,
    tx: mpsc::Sender<Outbound>,
    control: mpsc::UnboundedSender<Control>,
    /// Flow-control grants for the writer: at most one per session at a
    /// time (see [`Flow::queue_grant`]), so bounded by the session cap.
    grants: mpsc::UnboundedSender<(SessionId, Arc<Flow>)>,
    caps: Caps,
    budget: Semaphore,
    sessions: AtomicUsize,
    /// When the link came up.
    up_since: tokio::time::Instant,
    mailbox: MailboxLimits,
    session_window: u64,
    /// The whole byte budget: no frame costs more.
    queue_bytes: usize,
}

impl LinkHandle {
    /// A handle and the queues its driver will own.
    pub(crate) fn new(
        index: u32,
        version: u32,
        caps: Caps,
        s: &LinkSettings,
    ) -> (Self, DriverQueues) {
        let (tx, rx) = mpsc::channel(s.queue_frames);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (grants_tx, grants_rx) = mpsc::unbounded_channel();
        let handle = Self {
            shared: Arc::new(Shared {
                index,
                version,
                codec: s.codec,
                tx,
                control: control_tx,
                grants: grants_tx,
                caps,
                budget: Semaphore::new(s.queue_bytes),
                sessions: AtomicUsize::new(0),
                up_since: tokio::time::Instant::now(),
                mailbox: s.mailbox,
                session_window: s.session_window,
                queue_bytes: s.queue_bytes,
            }),
        };
        (
            handle,
            DriverQueues {
                rx,
                control: control_rx,
                grants: grants_rx,
            },
        )
    }

    /// Index of the link in the pool, for logs.
    pub(crate) fn index(&self) -> u32 {
        self.shared.index
    }

    /// The protocol version negotiated on this link.
    pub(crate) fn version(&self) -> u32 {
        self.shared.version
    }

    /// What the backend adopted of protocol version 3.
    pub(crate) fn caps(&self) -> Caps {
        self.shared.caps
    }

    /// Sessions placed on this link (estimate).
    pub(crate) fn load(&self) -> usize {
        self.shared.sessions.load(Ordering::Relaxed)
    }

    pub(super) fn add_load(&self) {
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn remove_load(&self) {
        self.shared.sessions.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether the link has been up (handshake done) for at least `d`.
    pub(crate) fn has_been_up_for(&self, d: Duration) -> bool {
        self.shared.up_since.elapsed() >= d
    }

    /// Whether the driver is still running.
    pub(crate) fn is_up(&self) -> bool {
        !self.shared.tx.is_closed()
    }

    /// Puts a session on the link; its backend frames arrive in the mailbox.
    /// Must be called before the session's `SessionOpen` is sent.
    /// On a link with flow control the mailbox carries the session's
    /// [`Flow`].
    pub(crate) fn register(&self, id: SessionId) -> Result<Mailbox, LinkGone> {
        let caps = self.shared.caps;
        let flow = caps.flow.then(|| {
            let window = self.shared.session_window;
            (
                self.clone(),
                Arc::new(Flow::new(window, caps.backend_window)),
            )
        });
        let (mailbox, route) = Mailbox::new(id, self.shared.mailbox, flow, caps.moves);
        self.shared
            .control
            .send(Control::Register(id, route))
            .map_err(|_| LinkGone)?;
        Ok(mailbox)
    }

    /// Puts a session taken over from another instance of the fleet on
    /// this link (which must have "fleet"), with its flow-control state
    /// from there; `consumed` is what its client has taken (cost, from the
    /// session's start). Before the session's `SessionResume` is sent.
    pub(crate) fn register_imported(
        &self,
        id: SessionId,
        flow: Arc<Flow>,
        consumed: u64,
    ) -> Result<Mailbox, LinkGone> {
        let window = self.shared.session_window;
        let (mut mailbox, route) =
            Mailbox::new(id, self.shared.mailbox, Some((self.clone(), flow)), true);
        mailbox.queue.continue_flow(window, consumed);
        self.shared
            .control
            .send(Control::Register(id, route))
            .map_err(|_| LinkGone)?;
        Ok(mailbox)
    }

    /// Puts a session that was on a lost link on this one (it must have
    /// the "move" capability): backend frames arrive in the same queue, in
    /// order after those that came before; the returned eviction replaces
    /// the old one. Before the session's `SessionResume` is sent.
    pub(crate) fn register_again(
        &self,
        id: SessionId,
        queue: &mut Queue,
    ) -> Result<Eviction, LinkGone> {
        let (eviction, route) = queue.reroute(self.clone()).ok_or(LinkGone)?;
        self.shared
            .control
            .send(Control::Register(id, route))
            .map_err(|_| LinkGone)?;
        Ok(eviction)
    }

    /// Has the writer send the session's current grant (and
    /// acknowledgement) soon, unless one is already waiting. Never waits:
    /// grants do not take room on the link.
    pub(crate) fn send_grant(&self, id: SessionId, flow: &Arc<Flow>) {
        queue_grant(&self.shared.grants, id, flow);
    }

    /// The writer's grant queue, for the link's reader (quiet sessions'
    /// acknowledgements).
    pub(super) fn grants(&self) -> mpsc::UnboundedSender<(SessionId, Arc<Flow>)> {
        self.shared.grants.clone()
    }

    /// Takes a session off the link; late backend frames for it are dropped.
    pub(crate) fn unregister(&self, id: SessionId) {
        // An error means the link is gone, and the map with it.
        let _ = self.shared.control.send(Control::Unregister(id));
    }

    /// Queues `frame` if there is room now; gives it back if not.
    /// `read_at`: when the client message in it was read, for the relay
    /// time histogram (None for the gateway's own frames).
    pub(crate) fn try_send(&self, mut frame: Frame, read_at: Option<Stamp>) -> TrySend {
        self.compact_if_backing_up(&mut frame);
        let cost = self.cost_of(&frame);
        let Ok(budget) = self.shared.budget.try_acquire_many(cost) else {
            return if self.shared.budget.is_closed() {
                TrySend::Gone(Box::new(frame))
            } else {
                TrySend::Full(Box::new(frame))
            };
        };
        match self.shared.tx.try_reserve() {
            Ok(slot) => {
                budget.forget();
                slot.send(Outbound {
                    frame,
                    cost,
                    read_at,
                });
                TrySend::Sent
            }
            Err(mpsc::error::TrySendError::Full(())) => TrySend::Full(Box::new(frame)),
            Err(mpsc::error::TrySendError::Closed(())) => TrySend::Gone(Box::new(frame)),
        }
    }

    /// Waits for room for the frame in `pending`, then queues it. Cancel-safe:
    /// until the instant it is queued the frame stays in `pending`, and
    /// dropping the future gives back whatever room it had taken. Returns at
    /// once when `pending` is empty.
    /// `read_at` as for [`LinkHandle::try_send`].
    pub(crate) async fn send_pending(
        &self,
        pending: &mut Option<Frame>,
        read_at: Option<Stamp>,
    ) -> Result<(), LinkGone> {
        let Some(cost) = pending.as_ref().map(|f| self.cost_of(f)) else {
            return Ok(());
        };
        let budget = self
            .shared
            .budget
            .acquire_many(cost)
            .await
            .map_err(|_| LinkGone)?;
        let slot = self.shared.tx.reserve().await.map_err(|_| LinkGone)?;
        if let Some(mut frame) = pending.take() {
            self.compact_if_backing_up(&mut frame);
            budget.forget();
            slot.send(Outbound {
                frame,
                cost,
                read_at,
            });
        }
        Ok(())
    }

    /// Waits for room for `frame` up to `deadline`, then queues it; drops it
    /// if the link is gone or still full by then.
    pub(crate) async fn send_within(&self, frame: Frame, deadline: Duration) -> bool {
        let mut pending = Some(frame);
        matches!(
            tokio::time::timeout(deadline, self.send_pending(&mut pending, None)).await,
            Ok(Ok(()))
        )
    }

    /// Gives back the room of frames the writer has written.
    pub(super) fn release(&self, bytes: usize) {
        self.shared.budget.add_permits(bytes);
    }

    /// Wakes every sender waiting for room: the link is over.
    pub(super) fn close(&self) {
        self.shared.budget.close();
    }

    /// What a frame costs of the link's byte budget: its length on the wire
    /// and what holding it costs besides (see [`QUEUED_FRAME_OVERHEAD`]); at most
    /// the whole budget, so that any frame can be sent on an idle link.
    fn cost_of(&self, frame: &Frame) -> u32 {
        let cost = (self.shared.codec.wire_len(frame) + QUEUED_FRAME_OVERHEAD)
            .min(self.shared.queue_bytes);
        // Fits, but for a frame within 170 bytes of 4 GiB: the wire length
        // is at most max_frame_size + 10, and max_frame_size < 4 GiB.
        u32::try_from(cost).unwrap_or(u32::MAX)
    }

    /// A frame joining a queue that is backing up will wait: it must not
    /// keep the client's read buffer it was cut from alive meanwhile, or the
    /// link's queue would hold about twice what its budget counts.
    fn compact_if_backing_up(&self, frame: &mut Frame) {
        let queued = self.shared.tx.max_capacity() - self.shared.tx.capacity();
        if queued >= BACKING_UP_DEPTH {
            frame.compact();
        }
    }
}

/// Queues the session's current grant for the writer, unless one already
/// waits.
pub(super) fn queue_grant(
    grants: &mpsc::UnboundedSender<(SessionId, Arc<Flow>)>,
    id: SessionId,
    flow: &Arc<Flow>,
) {
    if flow.queue_grant() {
        // An error means the link is gone; a resume carries the grant.
        let _ = grants.send((id, flow.clone()));
    }
}

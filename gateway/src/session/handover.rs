//! Fleet: a resumable session handed from one gateway instance to another
//! (see `crate::fleet` for how instances find each other).
//!
//! The instance that holds the session ([`Session::hand_over`]) leaves its
//! link without a word to the backend, puts everything the backend sent
//! into the replay ring, and answers with the session's state. The
//! instance the client's resume reached ([`run_imported`]) puts the session
//! on a link of its own with that state and announces it there with
//! version 3's `resume` (carrying the instance it was opened on), exactly
//! as after a lost link: the backend answers with what it has, and both
//! sides resend the rest. Then the resume is served as any other.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use protocol::{Body, Frame, SessionId};
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::debug;

use super::deliver::check_backend_message;
use super::signals::Signals;
use super::upstream::{NotMoved, Upstream};
use super::{finish_unopened, End, Resumable, Session};
use crate::backend::{Flow, Lease, Mailbox, ToClient};
use crate::close::CloseReason;
use crate::fleet::wire;
use crate::refusal::ResumeRefusal;
use crate::resume::{AttachRequest, Credentials, Ring, Token};
use crate::shared::Shared;

/// How long the link's reader gets to take the session off the link
/// (`fleet.handover_timeout` is at least 1 s longer).
const LEAVE_LINK_DEADLINE: Duration = Duration::from_secs(1);

/// The answer to another instance asking for the session.
type StateReply = oneshot::Sender<Result<Box<wire::State>, ResumeRefusal>>;

impl Session {
    /// Whether another instance of the fleet could take this session over:
    /// resumable, on a link whose backend adopted "fleet", and the fleet's
    /// channel is up (so that a request for it can arrive).
    pub(super) fn can_hand_over(&self) -> bool {
        self.resumable.is_some()
            && self.moves()
            && self.link.caps().fleet
            && self.shared.fleet.as_ref().is_some_and(|f| f.is_listening())
    }

    /// Another instance asks for the session (its client resumed there,
    /// having received `position` backend messages). `Ok(why)`: refused
    /// before anything changed, the session goes on here; `Err(reason)`:
    /// the session is over here (handed over, or lost on the way).
    pub(super) async fn hand_over(
        &mut self,
        position: u64,
        reply: StateReply,
    ) -> Result<CloseReason, CloseReason> {
        let refuse = |reply: StateReply, why| {
            let _ = reply.send(Err(why));
        };
        if !self.can_hand_over() {
            refuse(reply, ResumeRefusal::NotMovable);
            return Ok(CloseReason::ClientLost);
        }
        let Some(own) = self.shared.fleet.as_ref().map(|f| f.instance().to_owned()) else {
            refuse(reply, ResumeRefusal::NotMovable);
            return Ok(CloseReason::ClientLost);
        };
        if self
            .resumable
            .as_ref()
            .is_some_and(|r| position < r.ring.oldest_held())
        {
            refuse(reply, ResumeRefusal::Gap);
            return Err(CloseReason::ResumeLost(
                "the client resumed from a position no longer held",
            ));
        }
        // Leave the link: no grant may follow, and once the reader has
        // dropped the route, everything it took for the session is in the
        // queue.
        if let Some(up) = &self.upstream {
            up.flow.end();
        }
        self.link.unregister(self.id);
        if self.signals.eviction.gone().is_none() {
            let left = tokio::time::timeout(LEAVE_LINK_DEADLINE, self.signals.eviction.wait());
            if left.await.is_err() {
                refuse(reply, ResumeRefusal::Unknown);
                return Err(CloseReason::ResumeLost(
                    "handover: the link kept the session",
                ));
            }
        }
        if let Err(reason) = self.ring_everything(position) {
            refuse(reply, ResumeRefusal::Unknown);
            return Err(reason);
        }
        let Some(state) = self.export(&own) else {
            refuse(reply, ResumeRefusal::Unknown);
            return Err(CloseReason::ResumeLost("handover: counts disagree"));
        };
        let replayed = state.ring.len();
        if reply.send(Ok(Box::new(state))).is_err() {
            // Off the link already: the session cannot stay.
            return Err(CloseReason::ResumeLost(
                "handover: the asking instance gave up",
            ));
        }
        debug!(
            session = self.id.0,
            replayed, "session handed over to another instance"
        );
        Err(CloseReason::HandedOver)
    }

    /// Moves every backend message still queued into the replay ring (the
    /// next instance replays them), keeping every one from `position` on.
    fn ring_everything(&mut self, position: u64) -> Result<(), CloseReason> {
        // A message whose write was interrupted is in the ring already;
        // count it as taken, as its write would have.
        self.queue.written();
        let max_message = self.shared.session.max_message;
        while let Some(msg) = self.queue.try_recv() {
            match msg {
                ToClient::Data { payload, text, .. } => {
                    check_backend_message(&payload, text, max_message)?;
                    if let Some(r) = self.resumable.as_mut() {
                        r.ring.push(&payload, text, position);
                    }
                    self.queue.written();
                }
                ToClient::Close { code, reason } => {
                    return Err(CloseReason::BackendClosed { code, reason })
                }
                ToClient::Invalid { reason } => {
                    return Err(CloseReason::BackendInvalid(reason.into()))
                }
            }
        }
        Ok(())
    }

    /// The session's state for another instance; `None` if its counts do
    /// not agree (a message received but not in the ring).
    fn export(&mut self, own_instance: &str) -> Option<wire::State> {
        let r = self.resumable.as_ref()?;
        let up = self.upstream.as_mut()?;
        let delivered = r.ring.next_seq();
        if up.flow.received() != delivered {
            crate::logs::limited!(
                warn,
                session = self.id.0,
                received = up.flow.received(),
                delivered,
                "handover: backend messages received and ringed disagree"
            );
            return None;
        }
        let (granted, consumed) = self.queue.flow_counts()?;
        let pending = self.pending.take().and_then(|f| match f.body {
            Some(Body::Data(d)) => Some(wire::Msg {
                payload: d.payload,
                text: d.text,
            }),
            _ => None,
        });
        let mut state = wire::State {
            session_id: self.id.0,
            client_received: self.received,
            delivered,
            ring: r
                .ring
                .items()
                .map(|(payload, text)| wire::Msg {
                    payload: payload.clone(),
                    text: *text,
                })
                .collect(),
            received_cost: up.flow.received_cost(),
            granted,
            consumed,
            pending,
            ..wire::State::default()
        };
        up.export(&mut state, own_instance);
        Some(state)
    }
}

/// What a session taken over from another instance starts with here.
pub(crate) struct Import {
    pub(crate) state: wire::State,
    /// The credential the client presented.
    pub(crate) token: Token,
    /// A link with "fleet".
    pub(crate) lease: Lease,
    pub(crate) permit: OwnedSemaphorePermit,
    /// The client's resume, served once the backend has the session here;
    /// `None` for a session taken in after its resume gave up (it waits,
    /// detached, for the next).
    pub(crate) first: Option<Box<AttachRequest>>,
}

/// Runs a session taken over from another instance: onto the link, the
/// announcement, then the client's resume and the session as usual. The
/// taking in is a boxed future, as `run`'s opening is: its state does not
/// stay in the session's task.
pub(crate) async fn run_imported(import: Import, shared: Arc<Shared>) {
    let Some((mut session, end)) = Box::pin(take_in(import, shared)).await else {
        return;
    };
    let reason = Box::pin(session.serve_from(end)).await;
    Box::pin(session.finish(reason)).await;
}

/// Puts a session taken over onto a link and announces it to the backend;
/// the session, and the end to continue from (the client's resume as a
/// takeover), or `None` when it could not be taken in (recorded as ended).
async fn take_in(import: Import, shared: Arc<Shared>) -> Option<(Session, End)> {
    let Import {
        mut state,
        token,
        lease,
        permit,
        first,
    } = import;
    let id = SessionId(state.session_id);
    let started = Instant::now();
    let span = shared.telemetry.continued_span(
        state.open.as_ref().map_or("", |o| o.traceparent.as_str()),
        id.0,
    );
    let link = lease.link().clone();
    let flow = Arc::new(Flow::imported(
        state.delivered,
        state.received_cost,
        state.granted,
        state.backend_limit,
        state.acked,
    ));
    let Ok(Mailbox {
        queue, eviction, ..
    }) = link.register_imported(id, flow.clone(), state.consumed)
    else {
        if let Some(first) = first {
            first.refuse(ResumeRefusal::NotMovable);
        }
        shared.metrics.handover("in", "link_lost");
        finish_unopened(&shared, id, None, CloseReason::LinkLost, span);
        return None;
    };
    shared.metrics.session_opened();
    let attach = shared.resumable.register_with(token.clone(), id);
    let ring_items: VecDeque<_> = std::mem::take(&mut state.ring)
        .into_iter()
        .map(|m| (m.payload, m.text))
        .collect();
    let resumable = Resumable {
        creds: Credentials::new(token),
        ring: Ring::from_parts(shared.resume.buffer_bytes, state.delivered, ring_items),
        replay: Vec::new(),
    };
    let pending = state
        .pending
        .take()
        .map(|m| Frame::data(id.0, m.payload, m.text));
    let upstream = Upstream::import(flow, &link, &mut state);
    let mut session = Session {
        id,
        upstream: Some(upstream),
        signals: Signals::new(eviction, Some(attach), shared.shutdown.drain_signal()),
        link,
        queue,
        pending,
        received: state.client_received,
        resumable: Some(Box::new(resumable)),
        span,
        started,
        read_at: started,
        _lease: lease,
        _permit: permit,
        shared,
    };
    let deadline = Instant::now() + session.shared.pool.move_timeout();
    let moved = match session.announce(deadline).await {
        // The link was lost meanwhile: as after any lost link.
        Ok(None) => session.relink().await,
        Ok(Some(_)) => Ok(()),
        Err(why) => Err(why),
    };
    if let Err(why) = moved {
        if let Some(first) = first {
            first.refuse(ResumeRefusal::NotMovable);
        }
        session.shared.metrics.handover("in", "backend_refused");
        let reason = match why {
            NotMoved::LinkLost => CloseReason::LinkLost,
            NotMoved::Closed(gone) => session.after_gone(gone),
            NotMoved::Shutdown => CloseReason::Shutdown,
        };
        session.finish(reason).await;
        return None;
    }
    session.shared.metrics.handover("in", "ok");
    debug!(session = id.0, "session taken over from another instance");
    let end = End::clean(CloseReason::ClientLost);
    let end = match first {
        Some(first) => end.taken_over(first),
        None => end,
    };
    Some((session, end))
}

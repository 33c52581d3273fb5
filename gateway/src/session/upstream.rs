//! Client messages on their way to the backend, on a link with protocol
//! version 3: the backend's window ("flow"), and for "move" the messages it
//! has not acknowledged, resent when the session moves to another link
//! because its own was lost ([`Session::relink`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::KeyValue;
use protocol::{pb, Body, Frame};
use tokio::time::Instant;
use tracing::debug;

use super::Session;
use crate::backend::{Flow, Gone, LinkGone, LinkHandle, TrySend, ADVISORY_SEND_DEADLINE};
use crate::fleet::wire;
use crate::metrics::Stamp;

/// Why a session whose link was lost did not move.
#[derive(Debug)]
pub(super) enum NotMoved {
    /// No link that takes it within `backend.move_timeout`, or no answer:
    /// the client gets 1012.
    LinkLost,
    /// The backend answered the resume with a close (or ended the session
    /// meanwhile): the close waits in the queue behind earlier messages.
    Closed(Gone),
    /// The gateway is draining.
    Shutdown,
}

/// How often a session whose link was lost looks for another one.
const MOVE_POLL: Duration = Duration::from_millis(25);

/// The client-to-backend side of a flow-controlled session.
pub(super) struct Upstream {
    pub(super) flow: Arc<Flow>,
    /// The window the backend grants a session at its start: with "move",
    /// also the most the gateway keeps unacknowledged.
    backend_window: u64,
    /// Cost of the client data sent to the backend, cumulative.
    sent_cost: u64,
    /// Data frames acknowledged, and their cost.
    acked: u64,
    acked_cost: u64,
    /// With "move": messages sent and not acknowledged, oldest first, and
    /// the session's `open` to announce it again.
    unacked: Option<(VecDeque<Kept>, pb::SessionOpen)>,
    /// For a session taken over from another instance of the fleet: the
    /// `Hello.instance_id` it was opened under (the backend's key for it).
    origin: Option<String>,
}

/// A client message kept until the backend acknowledges it: its payload in
/// an allocation of its own (not the client's read buffer it was cut
/// from), its type and its window cost.
struct Kept {
    payload: Bytes,
    text: bool,
    cost: u64,
}

impl Kept {
    fn of(frame: &Frame) -> Option<Self> {
        match &frame.body {
            Some(Body::Data(d)) => Some(Self {
                payload: Bytes::copy_from_slice(&d.payload),
                text: d.text,
                cost: protocol::window_cost(d.payload.len()),
            }),
            _ => None,
        }
    }
}

impl Upstream {
    pub(super) fn new(flow: Arc<Flow>, link: &LinkHandle, open: Option<pb::SessionOpen>) -> Self {
        let caps = link.caps();
        Self {
            flow,
            backend_window: caps.backend_window,
            sent_cost: 0,
            acked: 0,
            acked_cost: 0,
            unacked: open.filter(|_| caps.moves).map(|o| (VecDeque::new(), o)),
            origin: None,
        }
    }

    /// The client-to-backend side of a session taken over from another
    /// instance, as `state` left it there, on `link` (with "fleet").
    pub(super) fn import(flow: Arc<Flow>, link: &LinkHandle, state: &mut wire::State) -> Self {
        let unacked = std::mem::take(&mut state.unacked)
            .into_iter()
            .map(|m| Kept {
                cost: protocol::window_cost(m.payload.len()),
                payload: m.payload,
                text: m.text,
            })
            .collect();
        Self {
            flow,
            backend_window: link.caps().backend_window,
            sent_cost: state.sent_cost,
            acked: state.acked,
            acked_cost: state.acked_cost,
            unacked: Some((unacked, state.open.take().unwrap_or_default())),
            origin: Some(std::mem::take(&mut state.origin_instance_id)),
        }
    }

    /// Writes this side's state into `state`, for another instance: the
    /// backend's limit, what it acknowledged, what was sent and what it has
    /// not acknowledged. `own_instance`: this instance's id, the origin of
    /// a session opened here.
    pub(super) fn export(&mut self, state: &mut wire::State, own_instance: &str) {
        self.trim();
        state.backend_limit = self.flow.limit();
        state.acked = self.acked;
        state.acked_cost = self.acked_cost;
        state.sent_cost = self.sent_cost;
        state.origin_instance_id = self
            .origin
            .clone()
            .unwrap_or_else(|| own_instance.to_owned());
        if let Some((unacked, open)) = &self.unacked {
            state.unacked = unacked
                .iter()
                .map(|k| wire::Msg {
                    payload: k.payload.clone(),
                    text: k.text,
                })
                .collect();
            state.open = Some(open.clone());
        }
    }

    /// Whether the session can move to another link when its own is lost.
    pub(super) fn moves(&self) -> bool {
        self.unacked.is_some()
    }

    /// Whether a data frame of `cost` may be sent now: within the backend's
    /// limit and, with "move", within one window of unacknowledged data.
    fn fits(&mut self, cost: u64) -> bool {
        self.trim();
        let mut limit = self.flow.limit();
        if self.unacked.is_some() {
            limit = limit.min(self.acked_cost + self.backend_window);
        }
        self.sent_cost + cost <= limit
    }

    /// Whether client messages are kept, waiting for the backend's
    /// acknowledgement ("move").
    pub(super) fn holds_unacknowledged(&self) -> bool {
        self.unacked.as_ref().is_some_and(|(u, _)| !u.is_empty())
    }

    /// Forgets what the backend has acknowledged.
    fn trim(&mut self) {
        let Some((unacked, _)) = self.unacked.as_mut() else {
            return;
        };
        let acked = self.flow.acked();
        while self.acked < acked {
            let Some(kept) = unacked.pop_front() else {
                break;
            };
            self.acked += 1;
            self.acked_cost += kept.cost;
        }
    }

    /// A data frame was queued on the link; with "move", `kept` is its
    /// copy, held until acknowledged.
    fn sent(&mut self, cost: u64, kept: Option<Kept>) {
        self.sent_cost += cost;
        if let (Some((unacked, _)), Some(kept)) = (self.unacked.as_mut(), kept) {
            unacked.push_back(kept);
        }
    }
}

/// The window cost of a client frame (only data counts).
fn cost_of(frame: &Frame) -> u64 {
    match &frame.body {
        Some(Body::Data(d)) => protocol::window_cost(d.payload.len()),
        _ => 0,
    }
}

/// What the session's upstream side did.
pub(super) enum UpstreamEvent {
    /// The pending client message went (or the link is gone).
    Sent(Result<(), LinkGone>),
    /// A window from the backend freed the client messages it acknowledged.
    Acknowledged,
}

/// With a message pending, [`send_pending`]. Otherwise, while the session
/// keeps client messages the backend has not acknowledged ("move"), waits
/// for the backend's next window and frees what it acknowledges: a backend
/// acknowledges a quiet session within about 300 ms (protocol/README.md,
/// "Acknowledge a quiet session"), so an idle session does not keep its
/// last messages. Never returns when there is neither. Cancel-safe.
///
/// `send_pending` is boxed: this future is part of every session's event
/// loop, while a message waits for room only under backpressure (issue 12).
pub(super) async fn send_or_trim(
    link: &LinkHandle,
    pending: &mut Option<Frame>,
    upstream: Option<&mut Upstream>,
    read_at: Instant,
) -> UpstreamEvent {
    if pending.is_some() {
        return UpstreamEvent::Sent(Box::pin(send_pending(link, pending, upstream, read_at)).await);
    }
    match upstream {
        Some(up) if up.holds_unacknowledged() => {
            up.flow.next_window().await;
            up.trim();
            UpstreamEvent::Acknowledged
        }
        _ => std::future::pending().await,
    }
}

/// Waits until the frame in `pending` fits the backend's window (if the
/// session has one) and the link has room, then queues it. Cancel-safe:
/// nothing changes until the frame is queued.
pub(super) async fn send_pending(
    link: &LinkHandle,
    pending: &mut Option<Frame>,
    upstream: Option<&mut Upstream>,
    read_at: Instant,
) -> Result<(), LinkGone> {
    let Some(frame) = pending.as_ref() else {
        return Ok(());
    };
    let Some(up) = upstream else {
        return link.send_pending(pending, Some(Stamp::of(read_at))).await;
    };
    let cost = cost_of(frame);
    while !up.fits(cost) {
        up.flow.next_window().await;
    }
    let kept = up.moves().then(|| Kept::of(frame)).flatten();
    link.send_pending(pending, Some(Stamp::of(read_at))).await?;
    up.sent(cost, kept);
    Ok(())
}

impl Session {
    /// Sends a client message now if the window and the link have room;
    /// else it waits in `pending` (and the client is not read meanwhile).
    /// Err when the link is gone and the session cannot move.
    pub(super) fn send_client(&mut self, frame: Frame) -> Result<(), LinkGone> {
        let cost = cost_of(&frame);
        if let Some(up) = self.upstream.as_mut() {
            if !up.fits(cost) {
                self.shared.metrics.window_stall(true);
                self.pending = Some(frame);
                return Ok(());
            }
        }
        let kept = self
            .upstream
            .as_ref()
            .filter(|u| u.moves())
            .and_then(|_| Kept::of(&frame));
        match self.link.try_send(frame, Some(Stamp::of(self.read_at))) {
            TrySend::Sent => {
                if let Some(up) = self.upstream.as_mut() {
                    up.sent(cost, kept);
                }
                Ok(())
            }
            TrySend::Full(frame) => {
                self.pending = Some(*frame);
                Ok(())
            }
            // A session that moves sends it on its next link.
            TrySend::Gone(frame) if self.moves() => {
                self.pending = Some(*frame);
                Ok(())
            }
            TrySend::Gone(_) => Err(LinkGone),
        }
    }

    /// Sends the pending client message within `deadline` (window and link
    /// room); false if it could not go. For messages accepted as a session
    /// ends.
    pub(super) async fn send_pending_within(&mut self, deadline: Duration) -> bool {
        let send = send_pending(
            &self.link,
            &mut self.pending,
            self.upstream.as_mut(),
            self.read_at,
        );
        matches!(tokio::time::timeout(deadline, send).await, Ok(Ok(())))
    }

    /// Whether the session moves to another link when its own is lost.
    pub(super) fn moves(&self) -> bool {
        self.upstream.as_ref().is_some_and(Upstream::moves)
    }

    /// Whether client messages wait for the backend's acknowledgement.
    pub(super) fn holds_unacknowledged(&self) -> bool {
        self.upstream
            .as_ref()
            .is_some_and(Upstream::holds_unacknowledged)
    }

    /// The session's link was lost. With "move" it continues on another
    /// link (or the same one, reconnected) within `backend.move_timeout`:
    /// it is announced there with what the gateway has received, the
    /// backend answers with what it has received, and the gateway resends
    /// the rest. Meanwhile the client is neither read nor written; it
    /// notices nothing but a pause. Err: the session is over.
    pub(super) async fn relink(&mut self) -> Result<(), NotMoved> {
        if !self.moves() {
            return Err(NotMoved::LinkLost);
        }
        let started = Instant::now();
        let deadline = started + self.shared.pool.move_timeout();
        loop {
            match self.try_relink(deadline).await {
                Ok(Some(resent)) => {
                    self.shared.metrics.session_moved(true, resent);
                    self.span.event(
                        "moved",
                        vec![
                            KeyValue::new("wsgw.link", i64::from(self.link.index())),
                            KeyValue::new("wsgw.resent", i64::try_from(resent).unwrap_or(i64::MAX)),
                        ],
                    );
                    debug!(
                        session = self.id.0,
                        link = self.link.index(),
                        resent,
                        took_ms = started.elapsed().as_millis() as u64,
                        "session moved to another link"
                    );
                    return Ok(());
                }
                // That link was lost too: try the next.
                Ok(None) => {}
                Err(why) => {
                    if matches!(why, NotMoved::LinkLost) {
                        self.shared.metrics.session_moved(false, 0);
                    }
                    debug!(
                        session = self.id.0,
                        ?why,
                        "session could not move to another link"
                    );
                    return Err(why);
                }
            }
        }
    }

    /// One attempt: a link, the announcement, the answer, the resend.
    /// `Ok(None)`: the link was lost during the attempt.
    async fn try_relink(&mut self, deadline: Instant) -> Result<Option<u64>, NotMoved> {
        let pool = self.shared.pool.clone();
        let lease = loop {
            if self.shared.shutdown.is_draining() {
                return Err(NotMoved::Shutdown);
            }
            if let Some(lease) = pool.lease_for_move() {
                break lease;
            }
            if Instant::now() >= deadline {
                return Err(NotMoved::LinkLost);
            }
            tokio::time::sleep(MOVE_POLL).await;
        };
        let link = lease.link().clone();
        let Ok(eviction) = link.register_again(self.id, &mut self.queue) else {
            tokio::task::yield_now().await;
            return Ok(None);
        };
        self.signals.eviction = eviction;
        self.link = link;
        self._lease = lease;
        self.announce(deadline).await
    }

    /// Announces the session on its link (new to it) with `resume`, waits
    /// for the backend's answer, and resends what the backend lacks;
    /// returns how many were resent. `Ok(None)`: the link was lost
    /// meanwhile.
    pub(super) async fn announce(&mut self, deadline: Instant) -> Result<Option<u64>, NotMoved> {
        let Some(up) = self.upstream.as_ref() else {
            return Err(NotMoved::LinkLost);
        };
        let Some((_, open)) = up.unacked.as_ref() else {
            return Err(NotMoved::LinkLost);
        };
        let flow = up.flow.clone();
        let seen = flow.windows_seen();
        let mut resume = Frame::resume(self.id.0, open.clone(), flow.received(), flow.grant());
        if let (Some(origin), Some(Body::Resume(r))) = (&up.origin, resume.body.as_mut()) {
            r.origin_instance_id.clone_from(origin);
        }
        if self
            .link
            .send_pending(&mut Some(resume), None)
            .await
            .is_err()
        {
            return Ok(None);
        }
        // The answer: a window saying what the backend has. Once the resume
        // is out, the answer gets a wait of its own (a backend may take a
        // moment to hand the session over from the link it was on).
        let answer_by = deadline.max(Instant::now() + self.shared.pool.move_timeout());
        while flow.windows_seen() == seen {
            tokio::select! {
                biased;
                gone = self.signals.eviction.wait() => match gone {
                    Gone::LinkLost => return Ok(None),
                    // It does not know the session, or ended it meanwhile:
                    // its close is in the queue, behind what came before.
                    other => return Err(NotMoved::Closed(other)),
                },
                () = flow.next_window() => {}
                () = tokio::time::sleep_until(answer_by) => {
                    // Given up: the backend must not keep the session.
                    flow.end();
                    let close = Frame::close(self.id.0, 1012, "no answer to resume");
                    self.link.send_within(close, ADVISORY_SEND_DEADLINE).await;
                    self.link.unregister(self.id);
                    return Err(NotMoved::LinkLost);
                }
            }
        }
        let Some(up) = self.upstream.as_mut() else {
            return Err(NotMoved::LinkLost);
        };
        up.trim();
        let id = self.id.0;
        let resend: Vec<Frame> = up
            .unacked
            .as_ref()
            .map(|(u, _)| {
                u.iter()
                    .map(|k| Frame::data(id, k.payload.clone(), k.text))
                    .collect()
            })
            .unwrap_or_default();
        let resent = resend.len() as u64;
        for frame in resend {
            if self
                .link
                .send_pending(&mut Some(frame), None)
                .await
                .is_err()
            {
                return Ok(None);
            }
        }
        Ok(Some(resent))
    }
}

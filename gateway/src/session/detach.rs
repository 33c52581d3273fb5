//! Resumable sessions between connections: the detached state, and resume
//! (attach).

use std::pin::pin;

use fastwebsockets::WebSocket;
use opentelemetry::KeyValue;
use protocol::Frame;
use tracing::debug;

use super::deliver::check_backend_message;
use super::signals::{stale, Listen, Signal};
use super::upstream::{self, NotMoved, UpstreamEvent};
use super::{Io, Session};
use crate::backend::{Gone, ToClient, ADVISORY_SEND_DEADLINE, QUEUED_OVERHEAD};
use crate::close::CloseReason;
use crate::refusal::ResumeRefusal;
use crate::resume::{AttachRequest, AttachTo, Attached};

impl Session {
    /// The session's final reason once its route on the link is gone and
    /// its client connection too: the backend's close if that is why (it
    /// waits in the queue), else the eviction's.
    pub(super) fn after_gone(&mut self, gone: Gone) -> CloseReason {
        match gone {
            Gone::SlowConsumer => CloseReason::SlowConsumer,
            Gone::LinkLost => CloseReason::LinkLost,
            Gone::BackendClosed => {
                while let Some(msg) = self.queue.try_recv() {
                    match msg {
                        ToClient::Close { code, reason } => {
                            return CloseReason::BackendClosed { code, reason }
                        }
                        ToClient::Invalid { reason } => {
                            return CloseReason::BackendInvalid(reason.into())
                        }
                        ToClient::Data { .. } => {}
                    }
                }
                CloseReason::LinkLost
            }
        }
    }

    /// The client's connection was lost: keep the session (and what the
    /// backend sends, bounded) for `resume.grace`, until a resume request
    /// arrives.
    pub(super) async fn detached(
        &mut self,
        why: &CloseReason,
        tell: bool,
    ) -> Result<Box<AttachRequest>, CloseReason> {
        let rc = &self.shared.resume;
        let (grace, max_detached, max_bytes) = (rc.grace, rc.max_detached, rc.max_detached_bytes);
        let Some(ring_bytes) = self.resumable.as_ref().map(|r| r.ring.bytes()) else {
            return Err(why.clone());
        };
        let budget = &self.shared.detached;
        // A pending client message is held too, until the link takes it.
        let pending_bytes = self
            .pending
            .as_ref()
            .map_or(0, protocol::prost::Message::encoded_len);
        // A session handed off on drain holds its memory already, and is
        // waiting only to be taken over: the caps do not refuse it.
        if *why == CloseReason::HandOff {
            budget.force_detach(ring_bytes + pending_bytes);
        } else if !budget.try_detach(ring_bytes + pending_bytes, max_detached, max_bytes) {
            return Err(CloseReason::ResumeLost(
                "gateway holds too many detached sessions",
            ));
        }
        self.shared.metrics.detached(1);
        self.span
            .event("detach", vec![KeyValue::new("wsgw.reason", why.label())]);
        let mut grace = pin!(tokio::time::sleep(grace));
        // A token a resume presented, not yet proven spent, stays good for
        // as long as the session waits.
        if let Some(r) = self.resumable.as_mut() {
            r.creds.extend_unproven(grace.deadline());
        }
        if tell {
            Box::pin(self.tell_detached(why)).await;
        }
        let outcome = self.detached_loop(grace.as_mut()).await;
        let ring_bytes = self.resumable.as_ref().map_or(0, |r| r.ring.bytes());
        self.shared.detached.release(ring_bytes + pending_bytes);
        self.shared.metrics.detached(-1);
        outcome
    }

    /// Tells a v2 backend that the session detached.
    async fn tell_detached(&self, why: &CloseReason) {
        if self.link.version() < 2 {
            return;
        }
        let grace_ms = u64::try_from(self.shared.resume.grace.as_millis()).unwrap_or(u64::MAX);
        let why = match why {
            CloseReason::ClientTimeout => "client ping timeout",
            _ => "client connection lost",
        };
        let frame = Frame::detached(self.id.0, why, grace_ms);
        // Advisory: not worth more than a short wait on a stuck link.
        self.link.send_within(frame, ADVISORY_SEND_DEADLINE).await;
    }

    /// The detached state's event loop.
    async fn detached_loop(
        &mut self,
        mut grace: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Result<Box<AttachRequest>, CloseReason> {
        let detached_from = self.resumable.as_ref().map_or(0, |r| r.ring.next_seq());
        // What arrived while detached, as the client queue counts it.
        let mut held = 0;
        let mut listen = Listen::ALL;
        loop {
            // Draining: a session another instance can take over waits for
            // it (until the drain's deadline); any other ends.
            if self.shared.shutdown.is_draining() {
                if !self.can_hand_over() {
                    return Err(CloseReason::Shutdown);
                }
                listen.drain = false;
            }
            tokio::select! {
                biased;
                s = self.signals.next(listen) => match s {
                    // Not a slow client: more arrived at once than the
                    // client queue holds while nobody can read.
                    Signal::Evicted(Gone::SlowConsumer) => {
                        return Err(CloseReason::ResumeLost(
                            "more arrived while detached than session.client_queue_bytes",
                        ));
                    }
                    // With "move" the session continues on another link.
                    Signal::Evicted(Gone::LinkLost) => {
                        if let Err(why) = Box::pin(self.relink()).await {
                            return Err(match why {
                                NotMoved::LinkLost => CloseReason::LinkLost,
                                NotMoved::Closed(gone) => self.after_gone(gone),
                                NotMoved::Shutdown => CloseReason::Shutdown,
                            });
                        }
                    }
                    // With flow control the queue is not read while
                    // detached: the close ends the session now.
                    Signal::Evicted(Gone::BackendClosed) if self.upstream.is_some() => {
                        return Err(self.after_gone(Gone::BackendClosed));
                    }
                    // Its close is in the queue, right behind its data.
                    Signal::Evicted(Gone::BackendClosed) => {}
                    // Looked at on the next turn.
                    Signal::Drain => {}
                    Signal::Attach(req) => {
                        if let Some(req) = stale(req, self.token(), self.delivered()) {
                            // A client message accepted before the loss goes
                            // ahead of the backend's `attached` if it can.
                            self.send_pending_now();
                            return Ok(req);
                        }
                    }
                    Signal::AttachClosed => {
                        return Err(CloseReason::ResumeLost("resume channel closed"));
                    }
                },
                // A client message accepted before the loss still goes
                // out; what the backend acknowledges is freed.
                e = upstream::send_or_trim(&self.link, &mut self.pending, self.upstream.as_mut(), self.read_at),
                    if self.pending.is_some() || self.holds_unacknowledged() =>
                {
                    if matches!(e, UpstreamEvent::Sent(Err(_))) && !self.moves() {
                        return Err(CloseReason::LinkLost);
                    }
                }
                // With flow control, what the backend sends waits in the
                // queue (bounded by the window) until the client is back:
                // the backend is held back instead of the session ending.
                msg = self.queue.recv(), if self.upstream.is_none() => {
                    if let Some(msg) = msg {
                        self.hold_while_detached(msg, detached_from, &mut held)?;
                    }
                }
                _ = &mut grace => {
                    return Err(CloseReason::ResumeLost(
                        "client did not resume within resume.grace",
                    ));
                }
            }
        }
    }

    /// Queues the pending client message if the link has room now; else it
    /// stays pending (the next connection sends it).
    fn send_pending_now(&mut self) {
        if let Some(frame) = self.pending.take() {
            // Whatever cannot go now stays pending for the next connection.
            let _ = self.send_client(frame);
        }
    }

    /// Keeps a backend message that arrived while detached for replay. The
    /// ring keeps every such message (the client has never seen them), up
    /// to what the client queue would hold (`held` counts them as it
    /// does), and within the gateway-wide budget for detached sessions,
    /// which counts every byte held.
    fn hold_while_detached(
        &mut self,
        msg: ToClient,
        detached_from: u64,
        held: &mut usize,
    ) -> Result<(), CloseReason> {
        let (payload, text) = match msg {
            ToClient::Data { payload, text, .. } => (payload, text),
            ToClient::Close { code, reason } => {
                return Err(CloseReason::BackendClosed { code, reason })
            }
            ToClient::Invalid { reason } => return Err(CloseReason::BackendInvalid(reason.into())),
        };
        let max_message = self.shared.session.max_message;
        check_backend_message(&payload, text, max_message)?;
        let cost = payload.len() + QUEUED_OVERHEAD;
        if *held > 0 && *held + cost > self.shared.session.client_queue_bytes {
            return Err(CloseReason::ResumeLost(
                "more arrived while detached than session.client_queue_bytes",
            ));
        }
        *held += cost;
        let budget = &self.shared.detached;
        let max_bytes = self.shared.resume.max_detached_bytes;
        if !budget.try_grow(payload.len(), max_bytes) {
            return Err(CloseReason::ResumeLost(
                "gateway-wide buffer for detached sessions full",
            ));
        }
        let Some(r) = self.resumable.as_mut() else {
            return Err(CloseReason::ResumeLost("not resumable"));
        };
        // Older messages, sent before the connection was lost, may go (a
        // client that missed them is refused with 410 on resume); one that
        // arrived while detached may not.
        let freed = r.ring.push(&payload, text, detached_from);
        budget.shrink(freed);
        Ok(())
    }

    /// Serves a resume request: checks the position, rotates the
    /// credential, answers the upgrade handler, and returns the new
    /// connection. `Err(Ok(..))`: the request came to nothing but the
    /// session goes on, detached (a stale request, a handshake cut before
    /// the 101 went out); `Err(Err(..))`: the session is over.
    pub(super) async fn attach(
        &mut self,
        req: Box<AttachRequest>,
    ) -> Result<WebSocket<Io>, Result<CloseReason, CloseReason>> {
        self.shared.metrics.resume_attempt();
        // Positions above what was delivered were refused (400) before
        // the session was touched (see `stale`); `since` below can only
        // find a gap.
        let Some(req) = stale(req, self.token(), self.delivered()) else {
            return Err(Ok(CloseReason::ClientLost));
        };
        let (upgrade, peer, reply) = match req.to {
            AttachTo::Here {
                upgrade,
                peer,
                reply,
            } => (upgrade, peer, reply),
            // The client resumed on another instance of the fleet.
            AttachTo::Elsewhere { reply } => {
                return Err(Box::pin(self.hand_over(req.position, reply)).await);
            }
        };
        let Some(r) = self.resumable.as_mut() else {
            return Err(Err(CloseReason::ResumeLost("not resumable")));
        };
        let missed = match r.ring.since(req.position) {
            Ok(m) => m,
            Err(refused) => {
                let _ = reply.send(Err(refused));
                return Err(Err(CloseReason::ResumeLost(
                    "the client resumed from a position no longer held",
                )));
            }
        };
        // The presented token keeps working until the new connection shows
        // it reached the client, in case this 101 never does.
        let unproven_until = tokio::time::Instant::now() + self.shared.resume.grace;
        if self
            .shared
            .resumable
            .rotate(&mut r.creds, &req.token, unproven_until)
            .is_none()
        {
            let _ = reply.send(Err(ResumeRefusal::Gap));
            return Err(Err(CloseReason::ResumeLost("credential vanished")));
        }
        let answer = Attached {
            token: r.creds.current().clone(),
            received: self.received,
        };
        // From here a failure is a handshake cut on the way: the client
        // never got this 101 and still holds the token it presented, which
        // stays good, so the session stays reachable.
        if reply.send(Ok(answer)).is_err() {
            return Err(Ok(CloseReason::ClientLost));
        }
        let handoff = self.shared.resume.handoff_timeout;
        let Ok(Ok(ws)) = tokio::time::timeout(handoff, upgrade).await else {
            return Err(Ok(CloseReason::ClientLost));
        };
        let replayed = missed.len() as u64;
        self.shared.metrics.resume_succeeded(replayed);
        self.span.event(
            "resume",
            vec![KeyValue::new(
                "wsgw.replayed",
                i64::try_from(replayed).unwrap_or(i64::MAX),
            )],
        );
        if self.link.version() >= 2 {
            let frame = Frame::attached(self.id.0, peer.to_string(), replayed);
            self.link.send_within(frame, ADVISORY_SEND_DEADLINE).await;
        }
        debug!(session = self.id.0, replayed, "session resumed");
        r.replay = missed;
        Ok(ws)
    }
}

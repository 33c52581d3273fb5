//! Resumable sessions: the detached state and resume (attach).

use super::*;

/// The session's final reason once its route on the link is gone and its
/// client connection too: the backend's close if that is why (it waits in
/// the mailbox), else the eviction's.
pub(super) fn after_gone(mailbox: &mut Mailbox, gone: Gone) -> CloseReason {
    match gone {
        Gone::SlowConsumer => CloseReason::SlowConsumer,
        Gone::LinkLost => CloseReason::LinkLost,
        Gone::BackendClosed => {
            while let Ok(msg) = mailbox.rx.try_recv() {
                if let ToClient::Close { code, reason } = msg {
                    return CloseReason::BackendClosed { code, reason };
                }
            }
            CloseReason::LinkLost
        }
    }
}

/// A resume request that must not touch the session: it presents a
/// credential already replaced, or its requester stopped waiting. It is
/// refused (410) and dropped.
pub(super) fn stale(req: AttachRequest, token: Option<&Token>) -> Option<AttachRequest> {
    if req.reply.is_closed() || token != Some(&req.token) {
        let _ = req.reply.send(Err(Refused::Stale));
        return None;
    }
    Some(req)
}

/// The client's connection was lost: keep the session (and what the backend
/// sends, bounded) for `resume.grace`, until a resume request arrives.
pub(super) async fn detached(
    why: &CloseReason,
    carry: &mut Carry,
    mailbox: &mut Mailbox,
    attach_rx: Option<&mut mpsc::Receiver<AttachRequest>>,
    link: &LinkHandle,
    id: SessionId,
    shared: &Shared,
) -> Result<AttachRequest, CloseReason> {
    let rc = &shared.config.resume;
    let grace = tokio::time::sleep(rc.grace);
    let mut grace = pin!(grace);
    let Carry {
        ring,
        pending,
        token,
        ..
    } = carry;
    let (Some(ring), Some(attach_rx)) = (ring.as_mut(), attach_rx) else {
        return Err(why.clone());
    };
    let budget = &shared.detached;
    // A pending client message is held too, until the link takes it.
    let pending_bytes = pending.as_ref().map_or(0, |f| cost_of(f) as usize);
    if !budget.try_detach(
        ring.bytes() + pending_bytes,
        rc.max_detached,
        rc.max_detached_bytes.bytes(),
    ) {
        return Err(CloseReason::ResumeLost(
            "gateway holds too many detached sessions",
        ));
    }
    shared.metrics.detached(1);
    let detached_from = ring.next_seq();
    if link.version() >= 2 {
        let grace_ms = u64::try_from(rc.grace.as_millis()).unwrap_or(u64::MAX);
        let why = match why {
            CloseReason::ClientTimeout => "client ping timeout",
            _ => "client connection lost",
        };
        let frame = Frame::detached(id.0, why, grace_ms);
        // Advisory: not worth more than a short wait on a stuck link.
        if let Ok(Ok(slot)) =
            tokio::time::timeout(Duration::from_secs(1), link.reserve(cost_of(&frame))).await
        {
            slot.send(frame);
        }
    }
    let mut draining = pin!(shared.drain.notified());
    let outcome = loop {
        if shared.shutdown.is_cancelled() {
            break Err(CloseReason::Shutdown);
        }
        tokio::select! {
            biased;
                        gone = mailbox.evict.wait() => match gone {
                Gone::SlowConsumer => break Err(CloseReason::SlowConsumer),
                Gone::LinkLost => break Err(CloseReason::LinkLost),
                // Its close is in the mailbox, right behind its data.
                Gone::BackendClosed => continue,
            },
            _ = &mut draining => break Err(CloseReason::Shutdown),
            // A client message accepted before the loss still goes out.
            slot = link.reserve(pending.as_ref().map_or(0, cost_of)), if pending.is_some() => {
                match (slot, pending.take()) {
                    (Ok(slot), Some(frame)) => slot.send(frame),
                    _ => break Err(CloseReason::LinkLost),
                }
            }
                        req = attach_rx.recv() => match req {
                Some(req) => {
                    if let Some(req) = stale(req, token.as_ref()) {
                        break Ok(req);
                    }
                }
                None => break Err(CloseReason::ResumeLost("resume channel closed")),
            },
            msg = mailbox.rx.recv() => match msg {
                Some(ToClient::Data { payload, text }) => {
                    mailbox.queued_bytes.fetch_sub(payload.len(), Ordering::Relaxed);
                    if let Err(invalid) = check_backend_message(&payload, text, shared.config.session.max_message_size.bytes()) {
                        break Err(invalid);
                    }
                    if !budget.try_grow(payload.len(), rc.max_detached_bytes.bytes()) {
                        break Err(CloseReason::ResumeLost("gateway-wide buffer for detached sessions full"));
                    }
                                        let (freed, _) = ring.push(&payload, text);
                    budget.shrink(freed);
                    // Older messages, sent before the connection was lost,
                    // may go (a client that missed them is refused with 410
                    // on resume); one that arrived while detached may not.
                    if ring.oldest_held() > detached_from {
                        break Err(CloseReason::ResumeLost("replay buffer full while detached"));
                    }
                }
                Some(ToClient::Close { code, reason }) => break Err(CloseReason::BackendClosed { code, reason }),
                None => continue,
            },
            _ = &mut grace => break Err(CloseReason::ResumeLost("client did not resume within resume.grace")),
        }
    };
    budget.release(ring.bytes() + pending_bytes);
    shared.metrics.detached(-1);
    outcome
}

/// Serves a resume request: checks the position, rotates the credential,
/// answers the upgrade handler, and returns the new connection.
pub(super) async fn attach(
    req: AttachRequest,
    carry: &mut Carry,
    link: &LinkHandle,
    id: SessionId,
    shared: &Shared,
) -> Result<WebSocket<Io>, CloseReason> {
    shared.metrics.resume_attempt();
    let Some(req) = stale(req, carry.token.as_ref()) else {
        return Err(CloseReason::ResumeLost(
            "a stale resume arrived while the connection was lost",
        ));
    };
    let (Some(ring), Some(token)) = (carry.ring.as_ref(), carry.token.as_mut()) else {
        return Err(CloseReason::ResumeLost("not resumable"));
    };
    let missed = match ring.since(req.position) {
        Ok(m) => m,
        Err(refused) => {
            let _ = req.reply.send(Err(refused));
            return Err(CloseReason::ResumeLost(
                "the client resumed from a position no longer held",
            ));
        }
    };
    let Some(next) = shared.resume.rotate(token) else {
        let _ = req.reply.send(Err(Refused::Gap));
        return Err(CloseReason::ResumeLost("credential vanished"));
    };
    *token = next.clone();
    let answer = Attached {
        token: next,
        received: carry.received,
    };
    if req.reply.send(Ok(answer)).is_err() {
        return Err(CloseReason::ResumeLost(
            "the resuming client went away before the answer",
        ));
    }
    let ws = match tokio::time::timeout(shared.config.listen.http_header_timeout, req.upgrade).await
    {
        Ok(Ok(ws)) => ws,
        _ => {
            return Err(CloseReason::ResumeLost(
                "the resuming connection did not complete the upgrade",
            ))
        }
    };
    shared.metrics.resume_succeeded(missed.len() as u64);
    if link.version() >= 2 {
        let frame = Frame::attached(id.0, req.peer.to_string(), missed.len() as u64);
        if let Ok(Ok(slot)) =
            tokio::time::timeout(Duration::from_secs(1), link.reserve(cost_of(&frame))).await
        {
            slot.send(frame);
        }
    }
    debug!(session = id.0, replayed = missed.len(), "session resumed");
    carry.replay = missed;
    Ok(ws)
}

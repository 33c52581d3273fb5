//! Writing backend messages to the client.

use super::*;

/// Result of writing a batch of backend messages to the client.
pub(super) struct Delivered {
    pub(super) end: Option<End>,
    /// The session's route went away during the write: what is queued is
    /// all there will be.
    pub(super) then_drain: bool,
}

impl Delivered {
    pub(super) fn take_end(&mut self) -> Result<(), End> {
        match self.end.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Writes `first` and whatever else is already queued (up to a batch), then
/// flushes once. The write is abandoned if the link reader evicts the
/// session as a slow consumer meanwhile, or if the client has not taken it
/// within `write_timeout`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn deliver_first(
    writer: &mut Writer,
    first: ToClient,
    mailbox: &mut Mailbox,
    mut ring: Option<&mut Ring>,
    attach_rx: &mut Option<&mut mpsc::Receiver<AttachRequest>>,
    token: Option<&Token>,
    max_message: usize,
    write_timeout: Duration,
) -> Delivered {
    // A resumable session whose client stops taking data detaches (it may
    // be a dead connection that a resume will replace); others are slow
    // consumers.
    let stalled = if ring.is_some() {
        CloseReason::ClientTimeout
    } else {
        CloseReason::SlowConsumer
    };
    let Mailbox {
        rx,
        queued_bytes,
        evict,
    } = mailbox;
    let write = async {
        let mut msg = Some(first);
        let mut written = 0;
        while let Some(m) = msg.take() {
            let len = match &m {
                ToClient::Data { payload, .. } => payload.len(),
                ToClient::Close { .. } => 0,
            };
            let res = write_one(writer, m, ring.as_deref_mut(), max_message).await;
            queued_bytes.fetch_sub(len, Ordering::Relaxed);
            res?;
            written += 1;
            if written < WRITE_BATCH {
                msg = rx.try_recv().ok();
            }
        }
        writer
            .flush()
            .await
            .map_err(|_| End::broken(CloseReason::ClientLost))
    };
    let mut write = pin!(write);
    let timer = tokio::time::sleep(write_timeout);
    let mut timer = pin!(timer);
    let mut then_drain = false;
    loop {
        tokio::select! {
            biased;
            r = &mut write => {
                return Delivered { end: r.err(), then_drain };
            }
            gone = evict.wait(), if !then_drain => {
                match gone {
                    // The client is not reading: abandon the write (the
                    // stream is now mid-frame, so no close frame can follow).
                    Gone::SlowConsumer => {
                        return Delivered { end: Some(End::broken(CloseReason::SlowConsumer)), then_drain };
                    }
                    // Finish this write; the caller delivers the rest.
                    Gone::BackendClosed | Gone::LinkLost => then_drain = true,
                }
            }
                        // A resume is waiting: this connection (probably dead, which
            // is why the write stalls) is being replaced. Abandon the write;
            // the replay ring holds what was in flight.
            req = recv_attach(attach_rx), if attach_rx.is_some() && !then_drain => {
                match req {
                    Some(req) => {
                        if let Some(req) = stale(req, token) {
                            let mut end = End::broken(CloseReason::TakenOver);
                            end.takeover = Some(req);
                            return Delivered { end: Some(end), then_drain };
                        }
                    }
                    None => *attach_rx = None,
                }
            }
            _ = &mut timer => {
                return Delivered { end: Some(End::broken(stalled)), then_drain };
            }
        }
    }
}

/// The link is gone: deliver what it had already queued for the client,
/// then end with "reconnect" (1012).
pub(super) async fn drain_after_link_loss(
    writer: &mut Writer,
    mailbox: &mut Mailbox,
    mut ring: Option<&mut Ring>,
    max_message: usize,
    write_timeout: Duration,
) -> End {
    while let Ok(msg) = mailbox.rx.try_recv() {
        if let Err(e) = deliver(
            writer,
            msg,
            mailbox,
            ring.as_deref_mut(),
            max_message,
            write_timeout,
        )
        .await
        {
            return e;
        }
    }
    End::clean(CloseReason::LinkLost)
}

/// Writes one queued message after the link was lost (no eviction to race).
pub(super) async fn deliver(
    writer: &mut Writer,
    msg: ToClient,
    mailbox: &mut Mailbox,
    ring: Option<&mut Ring>,
    max_message: usize,
    write_timeout: Duration,
) -> Result<(), End> {
    let len = match &msg {
        ToClient::Data { payload, .. } => payload.len(),
        ToClient::Close { .. } => 0,
    };
    let write = async {
        write_one(writer, msg, ring, max_message).await?;
        writer
            .flush()
            .await
            .map_err(|_| End::broken(CloseReason::ClientLost))
    };
    let res = tokio::time::timeout(write_timeout, write)
        .await
        .unwrap_or_else(|_| Err(End::broken(CloseReason::SlowConsumer)));
    mailbox.queued_bytes.fetch_sub(len, Ordering::Relaxed);
    res
}

/// Writes one backend message to the client (no flush). A resumable
/// session records it for replay first: once handed to the socket it may
/// still be lost with the connection.
pub(super) async fn write_one(
    writer: &mut Writer,
    msg: ToClient,
    ring: Option<&mut Ring>,
    max_message: usize,
) -> Result<(), End> {
    match msg {
        ToClient::Data { payload, text } => {
            check_backend_message(&payload, text, max_message).map_err(End::clean)?;
            if let Some(ring) = ring {
                ring.push(&payload, text);
            }
            let opcode = if text { OpCode::Text } else { OpCode::Binary };
            writer
                .write_frame(WsFrame::new(
                    true,
                    opcode,
                    None,
                    Payload::Borrowed(&payload),
                ))
                .await
                .map_err(|_| End::broken(CloseReason::ClientLost))
        }
        ToClient::Close { code, reason } => {
            Err(End::clean(CloseReason::BackendClosed { code, reason }))
        }
    }
}

/// A backend message the gateway cannot deliver ends the session (1011).
pub(super) fn check_backend_message(
    payload: &[u8],
    text: bool,
    max_message: usize,
) -> Result<(), CloseReason> {
    if payload.len() > max_message {
        return Err(CloseReason::BackendInvalid(
            "backend message larger than session.max_message_size".into(),
        ));
    }
    if text && std::str::from_utf8(payload).is_err() {
        return Err(CloseReason::BackendInvalid(
            "backend sent invalid UTF-8".into(),
        ));
    }
    Ok(())
}

//! A session with a client connection: the event loop and one method per
//! event. (The connection itself, and why its read future is kept across
//! iterations, is in `connection.rs`.)

use fastwebsockets::{Frame as WsFrame, OpCode, Payload, WebSocket};
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::{pin, Pin};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

use super::client::{on_client_frame, read_error_end};
use super::connection::{linger, read_frame, ClientFrame, Connection, ReadError, Reader};
use super::signals::{stale, Listen, Signal};
use super::upstream::{self, NotMoved, UpstreamEvent};
use super::{End, Io, Session};
use crate::backend::{Gone, LinkGone, ToClient, ADVISORY_SEND_DEADLINE};
use crate::close::CloseReason;

/// What the event loop does after an event.
type Step = ControlFlow<End>;

/// What woke the event loop.
enum Event {
    /// A signal (see `signals.rs`).
    Signal(Signal),
    /// The session's moment to close on a drain came.
    DrainDue,
    /// A backend message, or `None` when the route is gone.
    Backend(Option<ToClient>),
    /// The pending client message went, or the backend acknowledged some.
    Upstream(UpstreamEvent),
    /// A frame from the client, or the end of its stream.
    Client(Result<ClientFrame, ReadError>),
    /// The ping timer fired.
    PingDue,
}

impl Session {
    /// Serves one client connection of the session, including its close.
    ///
    /// Its phases are futures of their own: the replay, the event loop, the
    /// close (and the lingering after it). What only one phase needs then
    /// takes no room in this future while another runs: this future is
    /// part of every connected session (issue 12).
    pub(super) async fn connected(&mut self, ws: Box<WebSocket<Io>>) -> End {
        // The read half stays ours (fastwebsockets only borrows it), so that
        // after an error close the connection can be drained. The box is
        // freed here, not when this function returns.
        let (mut raw_read, raw_write) = {
            let ws = ws;
            tokio::io::split((*ws).into_inner())
        };
        // The frames, in a block: the frame reader borrows the read half
        // until the block ends.
        let (end, lingering) = {
            let cfg = &self.shared.session;
            let ping_interval = cfg.ping_interval;
            let (reader, mut conn) = Connection::new(&mut raw_read, raw_write, cfg.max_message);
            let mut read = pin!(read_frame(reader));
            // Created once and re-armed when it fires, not per message.
            let mut ping = pin!(tokio::time::sleep_until(on_ping_grid(
                Instant::now() + ping_interval,
                ping_interval
            )));
            // A resumed connection whose client has not shown yet that the
            // 101 reached it is pinged at once: the pong proves it within a
            // round trip (and spends the token the resume presented), and a
            // 101 lost on the way is found within `ping_timeout`.
            if self
                .resumable
                .as_ref()
                .is_some_and(|r| r.creds.has_unproven())
            {
                if let Some(earlier) = conn.last_heard.checked_sub(ping_interval) {
                    conn.last_heard = earlier;
                }
                ping.as_mut().reset(Instant::now());
            }
            // `notify_waiters` only reaches waiters that existed when it was
            // called; a session that starts during shutdown sees the token.
            // (A resumed connection still gets its replay first.)
            let draining = self.shared.shutdown.is_draining();
            // (`if let`, not `match`: a match would keep the replay's
            // result in this future for as long as the loop runs.)
            let end = 'served: {
                if let Err(end) = Box::pin(self.replay(&mut conn)).await {
                    break 'served end;
                }
                if draining {
                    break 'served End::clean(self.drain_reason());
                }
                self.event_loop(&mut conn, read.as_mut(), read_frame, ping)
                    .await
            };
            Box::pin(self.close(conn, read, read_frame, end)).await
        };
        if lingering {
            // The frame stream is unusable (say, a frame over the size limit
            // whose payload was never read), but the client must still get
            // to read our close: closing a socket with unread input sends a
            // reset, which can destroy the close frame in the client's
            // buffers. Linger instead.
            let close_timeout = self.shared.session.close_timeout;
            Box::pin(linger(&mut raw_read, close_timeout)).await;
        }
        // Dropping the halves closes the connection.
        end
    }

    /// Serves the connection until it ends: waits for the next event, and
    /// hands it to its method.
    async fn event_loop<'r, F>(
        &mut self,
        conn: &mut Connection,
        mut read: Pin<&mut F>,
        next: impl Fn(Reader<'r>) -> F,
        mut ping: Pin<&mut Sleep>,
    ) -> End
    where
        F: Future<Output = (Reader<'r>, Result<ClientFrame, ReadError>)>,
    {
        // On drain, the session closes (or hands off) at its own moment
        // within `shutdown.close_spread`, serving its client until then.
        let mut listen = Listen::ALL;
        // Made only once the drain began (a timer is 112 bytes).
        let mut drain_at: Option<Pin<Box<Sleep>>> = None;
        loop {
            let event = tokio::select! {
                biased;
                s = self.signals.next(listen) => Event::Signal(s),
                () = until(&mut drain_at), if drain_at.is_some() => Event::DrainDue,
                msg = self.queue.recv() => Event::Backend(msg),
                e = upstream::send_or_trim(&self.link, &mut self.pending, self.upstream.as_mut(), self.read_at),
                    if self.pending.is_some() || self.holds_unacknowledged() => Event::Upstream(e),
                (r, res) = &mut read, if conn.reading && self.pending.is_none() => {
                    read.set(next(r));
                    Event::Client(res)
                }
                () = &mut ping => Event::PingDue,
            };
            // The event moves whole into one call: this future keeps no
            // copy of it while its handling waits.
            let step = self
                .on_event(conn, ping.as_mut(), &mut listen, &mut drain_at, event)
                .await;
            if let ControlFlow::Break(end) = step {
                return end;
            }
        }
    }

    /// One event, to its method.
    async fn on_event(
        &mut self,
        conn: &mut Connection,
        ping: Pin<&mut Sleep>,
        listen: &mut Listen,
        drain_at: &mut Option<Pin<Box<Sleep>>>,
        event: Event,
    ) -> Step {
        match event {
            Event::Signal(Signal::Drain) => {
                listen.drain = false;
                *drain_at = Some(Box::pin(tokio::time::sleep_until(self.drain_moment())));
                Step::Continue(())
            }
            Event::Signal(s) => self.on_signal(conn, s).await,
            Event::DrainDue => Step::Break(End::clean(self.drain_reason())),
            Event::Backend(msg) => self.on_backend(conn, msg).await,
            Event::Upstream(UpstreamEvent::Sent(r)) => self.on_link_room(r),
            Event::Upstream(UpstreamEvent::Acknowledged) => Step::Continue(()),
            Event::Client(res) => self.on_client_frame(conn, res).await,
            Event::PingDue => self.on_ping_tick(conn, ping).await,
        }
    }

    /// Closes the connection after `end`: a client message accepted but not
    /// yet sent, the close frame, and the client's close reply. Returns
    /// the end, and whether the raw connection must be drained.
    async fn close<'r, F>(
        &mut self,
        mut conn: Connection,
        read: Pin<&mut F>,
        next: impl Fn(Reader<'r>) -> F,
        end: End,
    ) -> (End, bool)
    where
        F: Future<Output = (Reader<'r>, Result<ClientFrame, ReadError>)>,
    {
        let close_timeout = self.shared.session.close_timeout;
        let accepted_sent = self.send_accepted(&end).await;
        if end.takeover.is_some() {
            // The new connection waits for its 101: the old one (silent
            // after a network change, or stuck) gets its close only if it
            // can be written at once, and is dropped without waiting for a
            // reply.
            if end.can_write {
                self.close_frame(&mut conn, &end, Duration::ZERO).await;
            }
            return (end, false);
        }
        if !end.can_write || !self.close_frame(&mut conn, &end, close_timeout).await {
            return (end, false);
        }
        if !conn.reading {
            return (end, true);
        }
        // Not past a message that could not be sent (no gap).
        let forward = accepted_sent && end.reason == CloseReason::Shutdown;
        let reply = self.close_reply(&mut conn, read, next, forward);
        let _ = tokio::time::timeout(close_timeout, reply).await;
        (end, false)
    }

    /// Waits for the client's close reply, so that it sees a clean close
    /// handshake. With `forward` (a drain), what the client sent before it
    /// saw our close still goes to the backend, ahead of the session's
    /// close: it was sent while the session was open; not once the backend
    /// has closed the session.
    async fn close_reply<'r, F>(
        &mut self,
        conn: &mut Connection,
        mut read: Pin<&mut F>,
        next: impl Fn(Reader<'r>) -> F,
        mut forward: bool,
    ) where
        F: Future<Output = (Reader<'r>, Result<ClientFrame, ReadError>)>,
    {
        loop {
            let (r, res) = tokio::select! {
                biased;
                _ = self.signals.eviction.wait(), if forward => {
                    forward = false;
                    continue;
                }
                done = &mut read => done,
            };
            match res {
                Ok(f) if f.opcode == OpCode::Close => return,
                Ok(f) if forward => {
                    if !self.forward_late(conn, f).await {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
            read.set(next(r));
        }
    }

    /// The route went away, the gateway drains, or a resume arrived.
    async fn on_signal(&mut self, conn: &mut Connection, signal: Signal) -> Step {
        match signal {
            Signal::Evicted(Gone::SlowConsumer) => {
                Step::Break(End::clean(CloseReason::SlowConsumer))
            }
            // Deliver what was already queued, which ends with the
            // backend's close if that is why; else close with "reconnect".
            Signal::Evicted(Gone::LinkLost) if self.moves() => self.on_link_lost(conn).await,
            Signal::Evicted(Gone::BackendClosed | Gone::LinkLost) => {
                Step::Break(Box::pin(self.deliver_queued(conn)).await)
            }
            Signal::Drain => Step::Break(End::clean(self.drain_reason())),
            // Single use per attach: the newer connection wins.
            Signal::Attach(req) => match stale(req, self.token(), self.delivered()) {
                Some(req) => Step::Break(End::clean(CloseReason::TakenOver).taken_over(req)),
                None => Step::Continue(()),
            },
            Signal::AttachClosed => Step::Continue(()),
        }
    }

    /// A backend message for the client (`None`: the route is gone, which
    /// the eviction signal reports).
    async fn on_backend(&mut self, conn: &mut Connection, msg: Option<ToClient>) -> Step {
        match msg {
            Some(msg) => Box::pin(self.deliver(conn, msg)).await,
            None => Step::Continue(()),
        }
    }

    /// One frame from the client, or the end of its stream.
    async fn on_client_frame(
        &mut self,
        conn: &mut Connection,
        frame: Result<ClientFrame, ReadError>,
    ) -> Step {
        conn.last_heard = Instant::now();
        conn.ping_sent = false;
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                conn.reading = false;
                return Step::Break(read_error_end(e));
            }
        };
        // A frame from the client: this connection's 101 reached it, so the
        // token its resume presented is spent.
        if let Some(r) = self.resumable.as_mut() {
            self.shared.resumable.proven(&mut r.creds);
        }
        let cfg = &self.shared.session;
        let (max, write_timeout) = (cfg.max_message, cfg.write_timeout);
        match on_client_frame(frame, conn, self.id, max, write_timeout).await {
            Ok(None) => Step::Continue(()),
            Ok(Some(out)) => {
                self.received += 1;
                self.read_at = conn.last_heard;
                match self.send_client(out) {
                    Ok(()) => Step::Continue(()),
                    Err(LinkGone) => Step::Break(End::clean(CloseReason::LinkLost)),
                }
            }
            Err(end) => {
                // After the client's close there is nothing more to read;
                // after a message-level error the stream is still in sync
                // and is drained for the close reply.
                if matches!(end.reason, CloseReason::ClientClosed { .. }) {
                    conn.reading = false;
                }
                Step::Break(end)
            }
        }
    }

    /// The ping timer fired: ping an idle client, or give up on a silent
    /// one. The timer is re-armed only when it fires, not per message: it
    /// then looks at when the client was last heard from.
    async fn on_ping_tick(&mut self, conn: &mut Connection, timer: Pin<&mut Sleep>) -> Step {
        let cfg = &self.shared.session;
        let now = Instant::now();
        // While the client is paused for backpressure its pongs are not
        // read either: its liveness is not judged meanwhile.
        if self.pending.is_some() {
            conn.last_heard = now;
            conn.ping_sent = false;
        }
        if now < conn.last_heard + cfg.ping_interval {
            timer.reset(on_ping_grid(
                conn.last_heard + cfg.ping_interval,
                cfg.ping_interval,
            ));
            return Step::Continue(());
        }
        if conn.ping_sent {
            return Step::Break(End::broken(CloseReason::ClientTimeout));
        }
        conn.ping_sent = true;
        timer.reset(on_ping_grid(now + cfg.ping_timeout, cfg.ping_interval));
        let ping = WsFrame::new(true, OpCode::Ping, None, Payload::Borrowed(b"gw"));
        match conn.write_flush(ping, cfg.ping_timeout).await {
            Ok(()) => Step::Continue(()),
            Err(_) => Step::Break(End::broken(CloseReason::ClientTimeout)),
        }
    }

    /// A client message accepted but still waiting for room goes out now if
    /// the link has room within a short wait: it was accepted, so the
    /// backend should see it before the close. A session that goes on (a
    /// takeover, or a resumable session detaching) keeps it instead: it
    /// counts in `received`, so the client will not send it again. False
    /// if a message was dropped.
    async fn send_accepted(&mut self, end: &End) -> bool {
        let continues =
            end.takeover.is_some() || (self.resumable.is_some() && end.reason.is_connection_loss());
        if continues {
            return true;
        }
        self.send_pending_within(ADVISORY_SEND_DEADLINE).await
    }

    /// A client frame that arrived after the gateway sent its close on a
    /// drain: a complete data message goes to the backend. False when the
    /// stream cannot go on (a bad frame, the link gone).
    async fn forward_late(&mut self, conn: &mut Connection, frame: ClientFrame) -> bool {
        let (max, deadline) = (self.shared.session.max_message, ADVISORY_SEND_DEADLINE);
        let message = match frame.opcode {
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                conn.assembler
                    .push(frame.opcode, frame.fin, frame.payload, max)
            }
            // Pings and pongs need no answer once the close is out.
            _ => return true,
        };
        match message {
            Ok(None) => true,
            Ok(Some((payload, text))) => {
                self.received += 1;
                self.pending = Some(protocol::Frame::data(self.id.0, payload, text));
                self.send_pending_within(deadline).await
            }
            Err(_) => false,
        }
    }

    /// Sends the client its close frame where one is due; true if it went.
    async fn close_frame(&self, conn: &mut Connection, end: &End, limit: Duration) -> bool {
        let Some(c) = end.reason.to_client() else {
            return false;
        };
        let frame = WsFrame::close(c.code, c.reason.as_bytes());
        // A zero limit still tries once: the timeout polls the write first.
        conn.write_flush(frame, limit).await.is_ok()
    }

    /// Backend messages delivered to the client so far, if resumable.
    pub(super) fn delivered(&self) -> Option<u64> {
        self.resumable.as_ref().map(|r| r.ring.next_seq())
    }

    /// How the session ends its connection when the gateway drains: handed
    /// off (the client resumes at once, on another instance of the fleet)
    /// when it can be, else closed with 1001.
    pub(super) fn drain_reason(&self) -> CloseReason {
        if self.can_hand_over() {
            CloseReason::HandOff
        } else {
            CloseReason::Shutdown
        }
    }

    /// This session's moment to close on drain: uniformly random within
    /// `shutdown.close_spread` from now, so that clients do not all come
    /// back at once.
    fn drain_moment(&self) -> Instant {
        let spread = self.shared.session.close_spread;
        let offset = if spread.is_zero() {
            Duration::ZERO
        } else {
            spread.mul_f64(rand::random::<f64>())
        };
        Instant::now() + offset
    }

    /// The session's current resume credential, if it is resumable.
    pub(super) fn token(&self) -> Option<&crate::resume::Credentials> {
        self.resumable.as_ref().map(|r| &r.creds)
    }
}

impl Session {
    /// Room on the link for the pending client message: it was queued. A
    /// session that moves hears of a lost link from its eviction signal.
    fn on_link_room(&self, r: Result<(), LinkGone>) -> Step {
        match r {
            Ok(()) => Step::Continue(()),
            Err(LinkGone) if self.moves() => Step::Continue(()),
            Err(LinkGone) => Step::Break(End::clean(CloseReason::LinkLost)),
        }
    }

    /// The link was lost: a session that moves continues on another link
    /// with the same client connection; else (or if it cannot) the client
    /// gets what was queued, then 1012.
    pub(super) async fn on_link_lost(&mut self, conn: &mut Connection) -> Step {
        match Box::pin(self.relink()).await {
            Ok(()) => Step::Continue(()),
            // What was queued, then the backend's close or "reconnect".
            Err(NotMoved::LinkLost | NotMoved::Closed(_)) => {
                Step::Break(Box::pin(self.deliver_queued(conn)).await)
            }
            Err(NotMoved::Shutdown) => Step::Break(End::clean(CloseReason::Shutdown)),
        }
    }
}

/// The ping timer's deadline, rounded up to the next point of a grid
/// shared by every session of the process: `ping_interval / 16`, at most
/// [`PING_GRID_MAX`] (250 ms at the default 20 s).
///
/// Sessions whose pings fall due within one step of the grid then ping in
/// one wake-up of the runtime instead of one each. An idle gateway spends
/// its CPU on waking and parking worker threads, not on the pings (issue
/// 12: at 500 pings a second, about 200 µs of CPU per ping spread over
/// the second, 6 µs when they come in bunches); a ping goes out at most
/// one step late.
fn on_ping_grid(deadline: Instant, ping_interval: Duration) -> Instant {
    static ANCHOR: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let anchor = *ANCHOR.get_or_init(Instant::now);
    let step = (ping_interval / 16).clamp(Duration::from_millis(1), PING_GRID_MAX);
    // (Under a test's paused clock a deadline can precede an anchor taken
    // by another runtime: it is kept as it is.)
    let Some(since) = deadline.checked_duration_since(anchor) else {
        return deadline;
    };
    let step_ns = step.as_nanos();
    let steps = since.as_nanos().div_ceil(step_ns);
    u64::try_from(steps * step_ns)
        .ok()
        .and_then(|ns| anchor.checked_add(Duration::from_nanos(ns)))
        .unwrap_or(deadline)
}

/// The coarsest step of [`on_ping_grid`].
const PING_GRID_MAX: Duration = Duration::from_millis(250);

/// Waits for `timer`; never, without one.
async fn until(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pings_due_within_one_step_of_the_grid_fall_due_together() {
        let interval = Duration::from_secs(20);
        let step = PING_GRID_MAX;
        let now = Instant::now();
        let a = on_ping_grid(now + interval, interval);
        // Never early, at most one step late.
        assert!(a >= now + interval);
        assert!(a - (now + interval) <= step);
        // Every deadline within the step before a grid point maps to it;
        // one just past it, to the next point.
        for ms in [0, 1, 50, 100, 249] {
            let d = a + step - Duration::from_millis(ms);
            assert_eq!(on_ping_grid(d, interval), a + step, "{ms} ms before");
        }
        assert_eq!(on_ping_grid(a, interval), a);
        assert_eq!(
            on_ping_grid(a + Duration::from_millis(1), interval),
            a + step
        );
    }

    #[test]
    fn a_deadline_before_the_grid_began_is_kept() {
        let interval = Duration::from_secs(20);
        // The grid's anchor is taken at the first call, at the latest now.
        let _ = on_ping_grid(Instant::now(), interval);
        let early = Instant::now() - Duration::from_secs(1);
        assert_eq!(on_ping_grid(early, interval), early);
    }

    #[test]
    fn the_step_is_at_least_a_millisecond() {
        let interval = Duration::from_millis(5);
        let d = Instant::now() + Duration::from_secs(1);
        let g = on_ping_grid(d, interval);
        assert!(g >= d && g - d <= Duration::from_millis(1));
    }

    #[test]
    fn short_ping_intervals_get_a_fine_grid() {
        let interval = Duration::from_millis(160);
        let now = Instant::now();
        let d = now + interval;
        let g = on_ping_grid(d, interval);
        assert!(g >= d && g - d <= Duration::from_millis(10));
    }
}

//! The link driver: the one task that owns a link's socket and the map of
//! its sessions. Two futures run side by side inside it:
//!
//! - the **writer** takes [`Outbound`] frames from one bounded queue, encodes
//!   every frame that is waiting into one buffer and writes it with one
//!   syscall (batching), plus the link heartbeat;
//! - the **reader** decodes backend frames and offers each to its session's
//!   mailbox, which never waits on a client.
//!
//! When either future ends, the link is over: the session map is dropped,
//! which wakes every session on the link with a lost link.

use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use protocol::{Body, Frame, FrameCodec, SessionId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::flow::{Arrival, Caps, Flow};
use super::mailbox::{Offered, Route, ToClient};
use super::{LinkError, LinkHandle, LinkSettings};
use crate::metrics::{Metrics, Stamp};

/// Frames the writer encodes into one write at most. At 64-byte messages
/// this is ~60 KiB per write: large enough to amortise the syscall, small
/// enough to keep latency low.
const MAX_BATCH: usize = 512;

/// Bytes the writer encodes before it writes them out, even within a
/// batch: enough to amortise the syscall, and small enough that the write
/// buffer does not become a second copy of the link queue (512 frames of
/// 16 KiB would make it 8 MiB, beside what the budget counts).
const MAX_WRITE: usize = 256 * 1024;

/// The reader asks the kernel for at least this much per read.
const READ_CHUNK: usize = 64 * 1024;

/// Heartbeat answers go from the reader to the writer; a full queue means
/// the writer is far behind, and a dropped answer is then harmless.
const HEARTBEAT_ANSWERS: usize = 16;

/// "move": how often the reader looks at sessions whose backend data is
/// not yet acknowledged. One that got nothing for two looks in a row is
/// quiet and gets its acknowledgement, 200 to 300 ms after its last data
/// frame (protocol/README.md, "Acknowledge a quiet session").
const QUIET_LOOK: std::time::Duration = std::time::Duration::from_millis(100);
const QUIET_LOOKS: u8 = 2;

/// A frame on its way to the backend, with the bytes it holds of the link's
/// budget (released once written).
#[derive(Debug)]
pub(super) struct Outbound {
    pub(super) frame: Frame,
    pub(super) cost: u32,
    /// When the client message it carries was read (client data only).
    pub(super) read_at: Option<Stamp>,
}

/// A session joining or leaving the reader's map.
pub(super) enum Control {
    Register(SessionId, Route),
    Unregister(SessionId),
}

/// The reader's session map. Session ids are chosen by the gateway, so a
/// fast non-cryptographic hash is safe here.
type Routes = rustc_hash::FxHashMap<SessionId, Route>;

/// The receiving ends a driver owns, made together with its handle.
pub(crate) struct DriverQueues {
    pub(super) rx: mpsc::Receiver<Outbound>,
    pub(super) control: mpsc::UnboundedReceiver<Control>,
    pub(super) grants: mpsc::UnboundedReceiver<(SessionId, Arc<Flow>)>,
}

/// A socket that splits into halves the reader and writer own.
pub(crate) trait LinkStream: Send + 'static {
    /// The read half.
    type Read: AsyncRead + Unpin + Send;
    /// The write half.
    type Write: AsyncWrite + Unpin + Send;
    /// Splits the socket.
    fn split(self) -> (Self::Read, Self::Write);
}

impl LinkStream for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl LinkStream for tokio::io::DuplexStream {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn split(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// The task that owns one link's socket after its handshake.
#[must_use = "a link carries nothing until its driver runs"]
pub(crate) struct LinkDriver<S> {
    pub(super) stream: S,
    /// Bytes read past the handshake; they are the reader's.
    pub(super) leftover: BytesMut,
    pub(super) queues: DriverQueues,
    pub(super) settings: LinkSettings,
    pub(super) metrics: Arc<Metrics>,
    pub(super) handle: LinkHandle,
    /// The endpoint, for the heartbeat round-trip histogram.
    pub(super) endpoint: String,
}

impl<S: LinkStream> LinkDriver<S> {
    /// Runs until the link fails or `shutdown` fires. On shutdown the writer
    /// first sends every frame already queued (the sessions' closes), then
    /// closes the connection.
    pub(crate) async fn run(self, shutdown: CancellationToken) -> LinkError {
        let Self {
            stream,
            leftover,
            queues,
            settings,
            metrics,
            handle,
            endpoint,
        } = self;
        let (rd, wr) = stream.split();
        let (hb_tx, hb_rx) = mpsc::channel(HEARTBEAT_ANSWERS);
        let heartbeat = Mutex::new(std::collections::VecDeque::with_capacity(HEARTBEATS_KEPT));
        let reader = Reader {
            rd,
            buf: leftover,
            control: queues.control,
            routes: Routes::default(),
            hb_tx,
            grants: handle.grants(),
            unacked: Default::default(),
            caps: handle.caps(),
            settings: &settings,
            metrics: &metrics,
            read_at: Stamp::now(),
            heartbeat: &heartbeat,
            endpoint: &endpoint,
        };
        let writer = Writer {
            wr,
            rx: queues.rx,
            grants: queues.grants,
            hb_rx,
            settings: &settings,
            metrics: &metrics,
            handle: &handle,
            heartbeat: &heartbeat,
        };
        let end = tokio::select! {
            e = reader.run() => e,
            e = writer.run(shutdown) => e,
        };
        // Sessions waiting for room must not wait forever.
        handle.close();
        end
    }
}

struct Writer<'a, W> {
    wr: W,
    rx: mpsc::Receiver<Outbound>,
    grants: mpsc::UnboundedReceiver<(SessionId, Arc<Flow>)>,
    hb_rx: mpsc::Receiver<Frame>,
    settings: &'a LinkSettings,
    metrics: &'a Metrics,
    handle: &'a LinkHandle,
    heartbeat: &'a Heartbeat,
}

/// The gateway's recent heartbeats (nonce, when written), newest last: an
/// answer slower than the heartbeat interval still finds its own.
type Heartbeat = Mutex<std::collections::VecDeque<(u64, Instant)>>;

/// Heartbeats remembered for their round trip.
const HEARTBEATS_KEPT: usize = 8;

impl<W: AsyncWrite + Unpin> Writer<'_, W> {
    async fn run(mut self, shutdown: CancellationToken) -> LinkError {
        let codec = self.settings.codec;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // When the client messages in the write being built were read.
        let mut read_at = Vec::with_capacity(MAX_BATCH);
        let mut tick = tokio::time::interval(self.settings.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nonce: u64 = 0;
        loop {
            let mut closing = false;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.rx.close();
                    while let Ok(o) = self.rx.try_recv() {
                        batch.push(o);
                    }
                    closing = true;
                }
                Some(f) = self.hb_rx.recv() => encode(&codec, &f, &mut buf),
                // Grants go ahead of data: a backend waiting for one holds
                // back its session's data, and they are small.
                Some((id, flow)) = self.grants.recv() => {
                    let mut next = Some((id, flow));
                    while let Some((id, flow)) = next {
                        if let Some((limit, received)) = flow.take_grant() {
                            encode(&codec, &Frame::window(id.0, limit, received), &mut buf);
                        }
                        next = self.grants.try_recv().ok();
                    }
                }
                _ = tick.tick() => {
                    nonce = nonce.wrapping_add(1);
                    encode(&codec, &Frame::heartbeat(nonce, false), &mut buf);
                    if let Ok(mut hb) = self.heartbeat.lock() {
                        if hb.len() == HEARTBEATS_KEPT {
                            hb.pop_front();
                        }
                        hb.push_back((nonce, Instant::now()));
                    }
                }
                n = self.rx.recv_many(&mut batch, MAX_BATCH) => {
                    if n == 0 {
                        return LinkError::Shutdown;
                    }
                    self.gather(&mut batch).await;
                }
            }
            let (mut messages, mut bytes, mut released) = (0u64, 0u64, 0usize);
            if !batch.is_empty() {
                self.metrics.queue_depth(false, batch.len() + self.rx.len());
            }
            let mut frames = batch.drain(..).peekable();
            loop {
                let o = frames.next();
                if let Some(o) = &o {
                    released += o.cost as usize;
                    if let Some(Body::Data(d)) = &o.frame.body {
                        messages += 1;
                        bytes += d.payload.len() as u64;
                    }
                    if let Some(t) = o.read_at {
                        read_at.push(t);
                    }
                    encode(&codec, &o.frame, &mut buf);
                }
                if buf.len() < MAX_WRITE && o.is_some() {
                    continue;
                }
                if let Err(e) = self.wr.write_all(&buf).await {
                    return LinkError::Io(e);
                }
                if !read_at.is_empty() {
                    let now = Stamp::now();
                    for t in read_at.drain(..) {
                        self.metrics.relayed(true, t.until(now));
                    }
                }
                buf.clear();
                if buf.capacity() > 2 * MAX_WRITE {
                    // Grown for a large frame: the link does not keep it.
                    buf = BytesMut::with_capacity(READ_CHUNK);
                }
                self.handle.release(std::mem::take(&mut released));
                if frames.peek().is_none() {
                    break;
                }
            }
            drop(frames);
            self.metrics.link_batch_written(messages, bytes);
            if closing {
                let _ = self.wr.shutdown().await;
                return LinkError::Shutdown;
            }
        }
    }

    /// Under load, lets the sessions that are ready to run queue their
    /// frames too, so that one write carries many. When nothing else is
    /// runnable this returns at once.
    async fn gather(&mut self, batch: &mut Vec<Outbound>) {
        if batch.len() >= MAX_BATCH {
            return;
        }
        tokio::task::yield_now().await;
        while batch.len() < MAX_BATCH {
            match self.rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
    }
}

fn encode(codec: &FrameCodec, frame: &Frame, buf: &mut BytesMut) {
    // Sessions check sizes before sending, so this only fails on a bug;
    // dropping one frame is better than killing every session on the link.
    if let Err(e) = codec.encode(frame, buf) {
        tracing::error!(session = frame.session_id, error = %e, "dropping unencodable frame");
    }
}

struct Reader<'a, R> {
    rd: R,
    buf: BytesMut,
    control: mpsc::UnboundedReceiver<Control>,
    routes: Routes,
    hb_tx: mpsc::Sender<Frame>,
    /// "move": quiet sessions' acknowledgements go to the writer here.
    grants: mpsc::UnboundedSender<(SessionId, Arc<Flow>)>,
    /// "move": sessions that got backend data since their last grant, with
    /// `received` at the last look and how many looks it has not changed.
    unacked: rustc_hash::FxHashMap<SessionId, (u64, u8)>,
    caps: Caps,
    settings: &'a LinkSettings,
    metrics: &'a Metrics,
    /// When the latest bytes were read: the read time of the frames
    /// dispatched from them.
    read_at: Stamp,
    heartbeat: &'a Heartbeat,
    endpoint: &'a str,
}

impl<R: AsyncRead + Unpin> Reader<'_, R> {
    async fn run(mut self) -> LinkError {
        let timeout = self.settings.heartbeat_timeout;
        let mut deadline = Instant::now() + timeout;
        let mut quiet = tokio::time::interval(QUIET_LOOK);
        quiet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Err(e) = self.dispatch_buffered() {
                return e;
            }
            if self.buf.is_empty() && self.buf.capacity() > 4 * READ_CHUNK {
                // Grown for a large frame: the link does not keep it.
                self.buf = BytesMut::with_capacity(READ_CHUNK);
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                biased;
                Some(c) = self.control.recv() => self.apply(c),
                // Ahead of the read, which a busy link would always win;
                // it fires at most ten times a second.
                _ = quiet.tick(), if !self.unacked.is_empty() => self.acknowledge_quiet(),
                r = self.rd.read_buf(&mut self.buf) => match r {
                    Ok(0) => return LinkError::Eof,
                    Ok(_) => {
                        let now = Instant::now();
                        self.read_at = Stamp::of(now);
                        deadline = now + timeout;
                    }
                    Err(e) => return LinkError::Io(e),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return LinkError::HeartbeatTimeout(timeout);
                }
            }
        }
    }

    /// Sends a grant (the current limit, with `received`) to every session
    /// whose backend data is unacknowledged and that got none for
    /// [`QUIET_LOOKS`] looks: without it, the backend would keep a quiet
    /// session's last messages until the client consumed half a window.
    fn acknowledge_quiet(&mut self) {
        let (routes, grants) = (&self.routes, &self.grants);
        self.unacked.retain(|id, (seen, looks)| {
            let Some(flow) = routes.get(id).and_then(|r| r.flow.as_ref()) else {
                return false;
            };
            if !flow.unacknowledged() {
                return false;
            }
            let received = flow.received();
            if received != *seen {
                (*seen, *looks) = (received, 0);
                return true;
            }
            *looks += 1;
            if *looks < QUIET_LOOKS {
                return true;
            }
            super::link::queue_grant(grants, *id, flow);
            false
        });
    }

    /// Decodes and routes every complete frame in the buffer. A frame that
    /// is framed correctly but invalid ends only its session (1011): the
    /// stream is still in sync.
    fn dispatch_buffered(&mut self) -> Result<(), LinkError> {
        let (mut messages, mut bytes) = (0u64, 0u64);
        loop {
            let frame = match self.settings.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => match e.session() {
                    Some(id) => {
                        // The detail is for the logs: the client and the
                        // backend get a fixed reason.
                        let reason = "backend sent an undecodable frame".to_owned();
                        if self.route(SessionId(id), ToClient::Invalid { reason }) {
                            crate::logs::limited!(warn, session = id, error = %e, "undecodable frame from the backend; closing its session");
                        }
                        continue;
                    }
                    None => return Err(e.into()),
                },
            };
            if let Some(Body::Data(d)) = &frame.body {
                messages += 1;
                bytes += d.payload.len() as u64;
            }
            self.dispatch(frame)?;
        }
        self.metrics.link_batch_read(messages, bytes);
        Ok(())
    }

    fn apply(&mut self, c: Control) {
        match c {
            Control::Register(id, route) => {
                self.routes.insert(id, route);
            }
            Control::Unregister(id) => {
                self.routes.remove(&id);
            }
        }
    }

    /// The backend answered a heartbeat: its round trip, if it is one of
    /// the recent ones (each counts once).
    fn heartbeat_answered(&self, nonce: u64) {
        let sent = self.heartbeat.lock().ok().and_then(|mut hb| {
            let i = hb.iter().position(|(n, _)| *n == nonce)?;
            hb.remove(i).map(|(_, at)| at)
        });
        if let Some(at) = sent {
            self.metrics.heartbeat_rtt(self.endpoint, at.elapsed());
        }
    }

    /// Routes one backend frame: link frames are answered here, session
    /// frames go to their session's mailbox.
    fn dispatch(&mut self, frame: Frame) -> Result<(), LinkError> {
        let id = SessionId(frame.session_id);
        let body = frame
            .body
            .ok_or_else(|| LinkError::Protocol("frame without body".into()))?;
        if id.0 == protocol::LINK_SESSION_ID {
            return match body {
                Body::Heartbeat(hb) if !hb.ack => {
                    let _ = self.hb_tx.try_send(Frame::heartbeat(hb.nonce, true));
                    Ok(())
                }
                Body::Heartbeat(hb) => {
                    self.heartbeat_answered(hb.nonce);
                    Ok(())
                }
                other => Err(LinkError::Protocol(format!(
                    "{} frame with session id 0",
                    other.kind()
                ))),
            };
        }
        let msg = match body {
            Body::Window(w) if self.caps.flow => {
                self.window(id, &w);
                return Ok(());
            }
            Body::Data(d) => ToClient::Data {
                payload: d.payload,
                text: d.text,
                read_at: self.read_at,
            },
            Body::Close(c) => ToClient::Close {
                code: c.code,
                reason: c.reason,
            },
            other => {
                return Err(LinkError::Protocol(format!(
                    "backend sent a {} frame for session {id}",
                    other.kind(),
                )))
            }
        };
        self.route(id, msg);
        Ok(())
    }

    /// A flow-control window from the backend for one session.
    fn window(&mut self, id: SessionId, w: &protocol::pb::Window) {
        if !self.routes.contains_key(&id) {
            while let Ok(c) = self.control.try_recv() {
                self.apply(c);
            }
        }
        match self.routes.get(&id).and_then(|r| r.flow.as_ref()) {
            Some(flow) => flow.window(w.limit, w.received),
            None => self.metrics.late_frame(),
        }
    }

    /// Offers one message to its session's mailbox; false if no session
    /// with that id is on this link (the frame is dropped and counted).
    fn route(&mut self, id: SessionId, msg: ToClient) -> bool {
        if !self.routes.contains_key(&id) {
            // The session may have registered after this read began: the
            // registration was queued before its SessionOpen was written,
            // so it is in the control queue by now.
            while let Ok(c) = self.control.try_recv() {
                self.apply(c);
            }
        }
        let Some(route) = self.routes.get(&id) else {
            self.metrics.late_frame();
            tracing::debug!(
                session = id.0,
                "dropping backend frame for a session not on this link"
            );
            return false;
        };
        // With flow control the backend cannot send more than the window,
        // which is the queue's bound: a slow client only slows its backend.
        let msg = match (&msg, &route.flow) {
            (ToClient::Data { payload, .. }, Some(flow)) => {
                match flow.arrived(protocol::window_cost(payload.len())) {
                    Arrival::Exceeded => ToClient::Invalid {
                        reason: "backend exceeded the session's flow-control window".into(),
                    },
                    Arrival::Exhausted => {
                        self.metrics.window_stall(false);
                        msg
                    }
                    Arrival::Fits => msg,
                }
            }
            _ => msg,
        };
        if self.caps.moves && matches!(msg, ToClient::Data { .. }) {
            self.unacked.entry(id).or_insert((0, 0));
        }
        let offered = route.offer(msg);
        if !matches!(offered, Offered::Queued) {
            // The backend closed it, or the session is over: no grant may
            // follow.
            if let Some(flow) = &route.flow {
                flow.end();
            }
            if let Some(route) = self.routes.remove(&id) {
                route.evict(&offered);
            }
        }
        true
    }
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;

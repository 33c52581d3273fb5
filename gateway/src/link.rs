//! Stage 5: a backend link, one TCP connection multiplexing many sessions.
//!
//! A [`LinkHandle`] is the cheap, clonable side that sessions use; the link
//! driver ([`run`]) is one task that alone owns the TCP socket and the map of
//! sessions on the link. Inside that task two futures run side by side:
//!
//! - the **writer** takes [`Outbound`] frames from one bounded queue, encodes
//!   every frame that is waiting into one buffer, and writes it with one
//!   syscall (batching), plus the link heartbeat;
//! - the **reader** decodes backend frames and hands each to its session's
//!   mailbox with `try_send`: it never waits on a client. A session whose
//!   mailbox is full is evicted as a slow consumer.
//!
//! When either future ends, the link is over: the session map is dropped,
//! which wakes every session on the link with a receive error on its
//! eviction channel: the link is lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use protocol::{Body, Frame, FrameCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::SessionId;

/// Frames the writer encodes into one write at most. At 64-byte messages
/// this is ~60 KiB per write: large enough to amortise the syscall, small
/// enough to keep latency low.
const MAX_BATCH: usize = 512;

/// The reader asks the kernel for at least this much per read.
const READ_CHUNK: usize = 64 * 1024;

/// A session whose mailbox already holds this many messages is lagging; its
/// payloads are copied out of the shared read buffer so that it does not pin
/// 64 KiB read chunks while it catches up.
const LAGGING_DEPTH: usize = 4;

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TCP connect failed or timed out.
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    /// The backend did not answer `Hello` properly.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// Reading or writing the socket failed.
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    /// The backend closed the connection.
    #[error("backend closed the link")]
    Eof,
    /// Nothing arrived for `backend.heartbeat_timeout`.
    #[error("no data from the backend for {0:?} (heartbeat timeout)")]
    HeartbeatTimeout(Duration),
    /// The backend's bytes are not valid frames.
    #[error("undecodable frame: {0}")]
    Decode(#[from] protocol::DecodeError),
    /// A valid frame that the backend must not send.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The gateway is shutting down.
    #[error("gateway shutting down")]
    Shutdown,
}

/// A frame on its way to the backend, with the bytes it holds of the link's
/// budget (released once written).
#[derive(Debug)]
pub(crate) struct Outbound {
    frame: Frame,
    cost: u32,
}

/// What the reader delivers to a session.
#[derive(Debug)]
pub(crate) enum ToClient {
    /// One message for the client.
    Data {
        /// Message body.
        payload: Bytes,
        /// Text (true) or binary.
        text: bool,
    },
    /// The backend closed the session.
    Close {
        /// The backend's code.
        code: u32,
        /// The backend's reason.
        reason: String,
    },
}

/// Why the reader took a session off the link. (When the link itself ends,
/// the sender is dropped instead, and the session sees a receive error.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Evict {
    /// The session's mailbox overflowed.
    SlowConsumer,
    /// The backend closed the session; its close is in the mailbox, after
    /// any data that preceded it.
    BackendClosed,
}

/// Why a session's route on its link is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gone {
    /// The mailbox overflowed: the session must end as a slow consumer.
    SlowConsumer,
    /// The backend closed the session (the close is in the mailbox).
    BackendClosed,
    /// The link ended.
    LinkLost,
}

/// Watches for the route going away. Unlike a bare oneshot receiver it can
/// be waited on again after it fired (it then never resolves), and it
/// remembers what happened.
pub(crate) struct EvictWatch {
    rx: Option<oneshot::Receiver<Evict>>,
    fired: Option<Gone>,
}

impl EvictWatch {
    /// Resolves once, when the route goes. Cancel-safe.
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
        self.fired = Some(gone);
        gone
    }

    /// What happened, if the route is already known to be gone.
    pub(crate) fn fired(&self) -> Option<Gone> {
        self.fired
    }
}

/// A session's receiving end on its link.
pub(crate) struct Mailbox {
    /// Messages from the backend, in order.
    pub(crate) rx: mpsc::Receiver<ToClient>,
    /// Payload bytes in `rx`; the session subtracts what it has written.
    pub(crate) queued_bytes: Arc<AtomicUsize>,
    /// Fires when the reader takes the session off the link.
    pub(crate) evict: EvictWatch,
}

/// The reader's entry for one session.
struct Route {
    tx: mpsc::Sender<ToClient>,
    queued_bytes: Arc<AtomicUsize>,
    evict: oneshot::Sender<Evict>,
}

enum Control {
    Register(SessionId, Route),
    Unregister(SessionId),
}

/// The reader's session map. Session ids are small sequential integers
/// chosen by the gateway, so a fast non-cryptographic hash is safe here.
type Routes = rustc_hash::FxHashMap<SessionId, Route>;

/// Limits for a session's mailbox.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MailboxLimits {
    pub(crate) messages: usize,
    pub(crate) bytes: usize,
}

/// Outcome of [`LinkHandle::try_send`].
pub(crate) enum TrySend {
    /// Queued.
    Sent,
    /// No room now; the frame is given back to wait for room.
    Full(Box<Frame>),
    /// The link is gone.
    Gone,
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
/// [`crate::pool::Pool`] leases with relaxed atomics; a stale read only makes
/// placement slightly less even. The control queue is unbounded but carries
/// at most two messages per session (register, unregister), and sessions
/// are capped by `listen.max_sessions`.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Shared>,
}

struct Shared {
    endpoint: String,
    index: u32,
    version: u32,
    tx: mpsc::Sender<Outbound>,
    control: mpsc::UnboundedSender<Control>,
    budget: Semaphore,
    sessions: AtomicUsize,
    limits: MailboxLimits,
}

/// A reserved place in the link's queue; [`Reserved::send`] cannot wait.
pub(crate) struct Reserved<'a> {
    budget: SemaphorePermit<'a>,
    slot: mpsc::Permit<'a, Outbound>,
    cost: u32,
}

impl Reserved<'_> {
    /// Queues `frame`, which must cost what was reserved.
    pub(crate) fn send(self, frame: Frame) {
        self.budget.forget();
        self.slot.send(Outbound {
            frame,
            cost: self.cost,
        });
    }
}

/// What a frame costs of the link's byte budget.
pub(crate) fn cost_of(frame: &Frame) -> u32 {
    // Fits: frames are limited to max_frame_size, validated below 4 GiB.
    u32::try_from(protocol::prost::Message::encoded_len(frame) + 16).unwrap_or(u32::MAX)
}

impl LinkHandle {
    /// Endpoint address, for logs.
    pub fn endpoint(&self) -> &str {
        &self.shared.endpoint
    }

    /// Index of the link in the pool, for logs.
    pub fn index(&self) -> u32 {
        self.shared.index
    }

    /// The protocol version negotiated on this link.
    pub fn version(&self) -> u32 {
        self.shared.version
    }

    /// Sessions placed on this link (estimate).
    pub fn load(&self) -> usize {
        self.shared.sessions.load(Ordering::Relaxed)
    }

    pub(crate) fn add_load(&self) {
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn remove_load(&self) {
        self.shared.sessions.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether the driver is still running.
    pub fn is_up(&self) -> bool {
        !self.shared.tx.is_closed()
    }

    /// Puts a session on the link; its backend frames arrive in the mailbox.
    /// Must be called before the session's `SessionOpen` is sent.
    pub(crate) fn register(&self, id: SessionId) -> Result<Mailbox, LinkGone> {
        let (tx, rx) = mpsc::channel(self.shared.limits.messages);
        let (evict_tx, evict_rx) = oneshot::channel();
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let route = Route {
            tx,
            queued_bytes: queued_bytes.clone(),
            evict: evict_tx,
        };
        self.shared
            .control
            .send(Control::Register(id, route))
            .map_err(|_| LinkGone)?;
        Ok(Mailbox {
            rx,
            queued_bytes,
            evict: EvictWatch {
                rx: Some(evict_rx),
                fired: None,
            },
        })
    }

    /// Takes a session off the link; late backend frames for it are dropped.
    pub(crate) fn unregister(&self, id: SessionId) {
        // An error means the link is gone, and the map with it.
        let _ = self.shared.control.send(Control::Unregister(id));
    }

    /// Queues `frame` if there is room now; gives it back if not.
    pub(crate) fn try_send(&self, frame: Frame) -> TrySend {
        let cost = cost_of(&frame);
        let Ok(budget) = self.shared.budget.try_acquire_many(cost) else {
            return if self.shared.budget.is_closed() {
                TrySend::Gone
            } else {
                TrySend::Full(Box::new(frame))
            };
        };
        match self.shared.tx.try_reserve() {
            Ok(slot) => {
                Reserved { budget, slot, cost }.send(frame);
                TrySend::Sent
            }
            Err(mpsc::error::TrySendError::Full(())) => TrySend::Full(Box::new(frame)),
            Err(mpsc::error::TrySendError::Closed(())) => TrySend::Gone,
        }
    }

    /// Waits for room for a frame of `cost`. Cancel-safe: dropping the
    /// future gives back whatever it had taken.
    pub(crate) async fn reserve(&self, cost: u32) -> Result<Reserved<'_>, LinkGone> {
        let budget = self
            .shared
            .budget
            .acquire_many(cost)
            .await
            .map_err(|_| LinkGone)?;
        let slot = self.shared.tx.reserve().await.map_err(|_| LinkGone)?;
        Ok(Reserved { budget, slot, cost })
    }
}

/// Settings of one link.
#[derive(Debug, Clone)]
pub(crate) struct LinkSettings {
    pub(crate) codec: FrameCodec,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) heartbeat_timeout: Duration,
    pub(crate) queue_frames: usize,
    pub(crate) queue_bytes: usize,
    pub(crate) mailbox: MailboxLimits,
}

/// The receiving ends a driver needs, made together with its handle.
pub(crate) struct DriverParts {
    rx: mpsc::Receiver<Outbound>,
    control: mpsc::UnboundedReceiver<Control>,
}

/// Creates a handle and the queues its driver will own.
pub(crate) fn channel(
    endpoint: &str,
    index: u32,
    version: u32,
    s: &LinkSettings,
) -> (LinkHandle, DriverParts) {
    let (tx, rx) = mpsc::channel(s.queue_frames);
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let handle = LinkHandle {
        shared: Arc::new(Shared {
            endpoint: endpoint.to_owned(),
            index,
            version,
            tx,
            control: control_tx,
            budget: Semaphore::new(s.queue_bytes),
            sessions: AtomicUsize::new(0),
            limits: s.mailbox,
        }),
    };
    (
        handle,
        DriverParts {
            rx,
            control: control_rx,
        },
    )
}

/// Sends `Hello` and waits for a compatible `HelloAck`. Returns bytes read
/// past the ack, which belong to the reader.
pub(crate) async fn handshake(
    stream: &mut TcpStream,
    codec: &FrameCodec,
    gateway_id: &str,
    index: u32,
    timeout: Duration,
) -> Result<(BytesMut, String, u32), LinkError> {
    let mut out = BytesMut::new();
    codec
        .encode(&Frame::hello(gateway_id, index), &mut out)
        .map_err(|e| LinkError::Handshake(e.to_string()))?;
    let exchange = async {
        stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            if let Some(frame) = codec.decode(&mut buf)? {
                return Ok::<_, LinkError>((frame, buf));
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(LinkError::Eof);
            }
        }
    };
    let (frame, rest) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| LinkError::Handshake(format!("no HelloAck within {timeout:?}")))??;
    match frame.body {
        Some(Body::HelloAck(ack))
            if (protocol::MIN_PROTOCOL_VERSION..=protocol::PROTOCOL_VERSION)
                .contains(&ack.version) =>
        {
            Ok((rest, ack.backend_id, ack.version))
        }
        Some(Body::HelloAck(ack)) if ack.version == 0 => Err(LinkError::Handshake(format!(
            "backend refused every protocol version we offer ({}..={}): {}",
            protocol::MIN_PROTOCOL_VERSION,
            protocol::PROTOCOL_VERSION,
            ack.error
        ))),
        Some(Body::HelloAck(ack)) => Err(LinkError::Handshake(format!(
            "backend chose protocol version {}, we offered {}..={}",
            ack.version,
            protocol::MIN_PROTOCOL_VERSION,
            protocol::PROTOCOL_VERSION
        ))),
        Some(other) => Err(LinkError::Handshake(format!(
            "expected hello_ack, got {}",
            other.kind()
        ))),
        None => Err(LinkError::Handshake("empty frame".into())),
    }
}

/// The link driver: runs until the link fails or `shutdown` fires. On
/// shutdown the writer first sends every frame already queued (the
/// sessions' closes), then closes the connection.
pub(crate) async fn run(
    stream: TcpStream,
    leftover: BytesMut,
    parts: DriverParts,
    settings: LinkSettings,
    metrics: Arc<Metrics>,
    handle: LinkHandle,
    shutdown: CancellationToken,
) -> LinkError {
    // Nagle would hold small frames back waiting for ACKs; we batch ourselves.
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    // Heartbeat answers go from the reader to the writer; a full queue means
    // the writer is far behind, and a dropped answer is then harmless.
    let (hb_tx, hb_rx) = mpsc::channel(16);
    let reader = read_loop(rd, leftover, parts.control, hb_tx, &settings, &metrics);
    let writer = write_loop(wr, parts.rx, hb_rx, &settings, &metrics, &handle, shutdown);
    let end = tokio::select! {
        e = reader => e,
        e = writer => e,
    };
    // Sessions waiting for room must not wait forever.
    handle.shared.budget.close();
    end
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Outbound>,
    mut hb_rx: mpsc::Receiver<Frame>,
    s: &LinkSettings,
    metrics: &Metrics,
    handle: &LinkHandle,
    shutdown: CancellationToken,
) -> LinkError {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut tick = tokio::time::interval(s.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce: u64 = 0;
    loop {
        let mut released: usize = 0;
        let mut closing = false;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                rx.close();
                while let Ok(o) = rx.try_recv() {
                    batch.push(o);
                }
                closing = true;
            }
            Some(f) = hb_rx.recv() => encode(&s.codec, &f, &mut buf),
            _ = tick.tick() => {
                nonce = nonce.wrapping_add(1);
                encode(&s.codec, &Frame::heartbeat(nonce, false), &mut buf);
            }
            n = rx.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 {
                    return LinkError::Shutdown;
                }
                // Under load, let the sessions that are ready to run queue
                // their frames too, so that one write carries many. When
                // nothing else is runnable this returns at once.
                if n < MAX_BATCH {
                    tokio::task::yield_now().await;
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(o) => batch.push(o),
                            Err(_) => break,
                        }
                    }
                }
            }
        }
        let (mut messages, mut bytes) = (0u64, 0u64);
        for o in batch.drain(..) {
            released += o.cost as usize;
            if let Some(Body::Data(d)) = &o.frame.body {
                messages += 1;
                bytes += d.payload.len() as u64;
            }
            encode(&s.codec, &o.frame, &mut buf);
        }
        if let Err(e) = wr.write_all(&buf).await {
            return LinkError::Io(e);
        }
        buf.clear();
        handle.shared.budget.add_permits(released);
        metrics.link_batch_written(messages, bytes);
        if closing {
            let _ = wr.shutdown().await;
            return LinkError::Shutdown;
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

async fn read_loop(
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    mut control: mpsc::UnboundedReceiver<Control>,
    hb_tx: mpsc::Sender<Frame>,
    s: &LinkSettings,
    metrics: &Metrics,
) -> LinkError {
    let mut routes: Routes = Routes::default();
    let mut deadline = Instant::now() + s.heartbeat_timeout;
    loop {
        let (mut messages, mut bytes) = (0u64, 0u64);
        loop {
            let frame = match s.codec.decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return LinkError::Decode(e),
            };
            if let Some(Body::Data(d)) = &frame.body {
                messages += 1;
                bytes += d.payload.len() as u64;
            }
            if let Err(e) = dispatch(
                frame,
                &mut routes,
                &mut control,
                &hb_tx,
                s.mailbox.bytes,
                metrics,
            ) {
                return e;
            }
        }
        metrics.link_batch_read(messages, bytes);
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            biased;
            Some(c) = control.recv() => apply(c, &mut routes),
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => return LinkError::Eof,
                Ok(_) => deadline = Instant::now() + s.heartbeat_timeout,
                Err(e) => return LinkError::Io(e),
            },
            _ = tokio::time::sleep_until(deadline) => {
                return LinkError::HeartbeatTimeout(s.heartbeat_timeout);
            }
        }
    }
}

fn apply(c: Control, routes: &mut Routes) {
    match c {
        Control::Register(id, route) => {
            routes.insert(id, route);
        }
        Control::Unregister(id) => {
            routes.remove(&id);
        }
    }
}

fn dispatch(
    frame: Frame,
    routes: &mut Routes,
    control: &mut mpsc::UnboundedReceiver<Control>,
    hb_tx: &mpsc::Sender<Frame>,
    byte_limit: usize,
    metrics: &Metrics,
) -> Result<(), LinkError> {
    let id = SessionId(frame.session_id);
    let body = frame
        .body
        .ok_or_else(|| LinkError::Protocol("frame without body".into()))?;
    if id.0 == protocol::LINK_SESSION_ID {
        return match body {
            Body::Heartbeat(hb) if !hb.ack => {
                let _ = hb_tx.try_send(Frame::heartbeat(hb.nonce, true));
                Ok(())
            }
            Body::Heartbeat(_) => Ok(()),
            other => Err(LinkError::Protocol(format!(
                "{} frame with session id 0",
                other.kind()
            ))),
        };
    }
    let msg = match body {
        Body::Data(d) => ToClient::Data {
            payload: d.payload,
            text: d.text,
        },
        Body::Close(c) => ToClient::Close {
            code: c.code,
            reason: c.reason,
        },
        other => {
            return Err(LinkError::Protocol(format!(
                "backend sent a {} frame for session {}",
                other.kind(),
                id.0
            )))
        }
    };
    if !routes.contains_key(&id) {
        // The session may have registered after this read began: the
        // registration was queued before its SessionOpen was written, so it
        // is in the control queue by now.
        while let Ok(c) = control.try_recv() {
            apply(c, routes);
        }
    }
    let Some(route) = routes.get(&id) else {
        metrics.late_frame();
        tracing::debug!(
            session = id.0,
            "dropping backend frame for a session not on this link"
        );
        return Ok(());
    };
    let is_close = matches!(msg, ToClient::Close { .. });
    let msg = match msg {
        ToClient::Data { payload, text } => {
            let lagging = route.tx.max_capacity() - route.tx.capacity() >= LAGGING_DEPTH;
            let payload = if lagging {
                Bytes::copy_from_slice(&payload)
            } else {
                payload
            };
            ToClient::Data { payload, text }
        }
        close => close,
    };
    let len = match &msg {
        ToClient::Data { payload, .. } => payload.len(),
        ToClient::Close { .. } => 0,
    };
    let queued = route.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
    let over_bytes = queued > byte_limit;
    let outcome = if over_bytes {
        Err(true)
    } else {
        match route.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(true),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(false),
        }
    };
    match outcome {
        Ok(()) if is_close => {
            if let Some(route) = routes.remove(&id) {
                let _ = route.evict.send(Evict::BackendClosed);
            }
        }
        Ok(()) => {}
        Err(slow) => {
            if let Some(route) = routes.remove(&id) {
                if slow {
                    let _ = route.evict.send(Evict::SlowConsumer);
                }
            }
        }
    }
    Ok(())
}

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

use std::sync::Arc;

use bytes::BytesMut;
use protocol::{Body, Frame, FrameCodec, SessionId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::mailbox::{Offered, Route, ToClient};
use super::{LinkError, LinkHandle, LinkSettings};
use crate::metrics::Metrics;

/// Frames the writer encodes into one write at most. At 64-byte messages
/// this is ~60 KiB per write: large enough to amortise the syscall, small
/// enough to keep latency low.
const MAX_BATCH: usize = 512;

/// The reader asks the kernel for at least this much per read.
const READ_CHUNK: usize = 64 * 1024;

/// Heartbeat answers go from the reader to the writer; a full queue means
/// the writer is far behind, and a dropped answer is then harmless.
const HEARTBEAT_ANSWERS: usize = 16;

/// A frame on its way to the backend, with the bytes it holds of the link's
/// budget (released once written).
#[derive(Debug)]
pub(super) struct Outbound {
    pub(super) frame: Frame,
    pub(super) cost: u32,
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
    stream: S,
    leftover: BytesMut,
    queues: DriverQueues,
    settings: LinkSettings,
    metrics: Arc<Metrics>,
    handle: LinkHandle,
}

impl<S: LinkStream> LinkDriver<S> {
    /// A driver for `stream`, with `leftover` bytes read past the handshake.
    pub(crate) fn new(
        stream: S,
        leftover: BytesMut,
        queues: DriverQueues,
        settings: LinkSettings,
        metrics: Arc<Metrics>,
        handle: LinkHandle,
    ) -> Self {
        Self {
            stream,
            leftover,
            queues,
            settings,
            metrics,
            handle,
        }
    }

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
        } = self;
        let (rd, wr) = stream.split();
        let (hb_tx, hb_rx) = mpsc::channel(HEARTBEAT_ANSWERS);
        let reader = Reader {
            rd,
            buf: leftover,
            control: queues.control,
            routes: Routes::default(),
            hb_tx,
            settings: &settings,
            metrics: &metrics,
        };
        let writer = Writer {
            wr,
            rx: queues.rx,
            hb_rx,
            settings: &settings,
            metrics: &metrics,
            handle: &handle,
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
    hb_rx: mpsc::Receiver<Frame>,
    settings: &'a LinkSettings,
    metrics: &'a Metrics,
    handle: &'a LinkHandle,
}

impl<W: AsyncWrite + Unpin> Writer<'_, W> {
    async fn run(mut self, shutdown: CancellationToken) -> LinkError {
        let codec = self.settings.codec;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut batch = Vec::with_capacity(MAX_BATCH);
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
                _ = tick.tick() => {
                    nonce = nonce.wrapping_add(1);
                    encode(&codec, &Frame::heartbeat(nonce, false), &mut buf);
                }
                n = self.rx.recv_many(&mut batch, MAX_BATCH) => {
                    if n == 0 {
                        return LinkError::Shutdown;
                    }
                    self.gather(&mut batch).await;
                }
            }
            let (mut messages, mut bytes, mut released) = (0u64, 0u64, 0usize);
            for o in batch.drain(..) {
                released += o.cost as usize;
                if let Some(Body::Data(d)) = &o.frame.body {
                    messages += 1;
                    bytes += d.payload.len() as u64;
                }
                encode(&codec, &o.frame, &mut buf);
            }
            if let Err(e) = self.wr.write_all(&buf).await {
                return LinkError::Io(e);
            }
            buf.clear();
            self.handle.release(released);
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
    settings: &'a LinkSettings,
    metrics: &'a Metrics,
}

impl<R: AsyncRead + Unpin> Reader<'_, R> {
    async fn run(mut self) -> LinkError {
        let timeout = self.settings.heartbeat_timeout;
        let mut deadline = Instant::now() + timeout;
        loop {
            if let Err(e) = self.dispatch_buffered() {
                return e;
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                biased;
                Some(c) = self.control.recv() => self.apply(c),
                r = self.rd.read_buf(&mut self.buf) => match r {
                    Ok(0) => return LinkError::Eof,
                    Ok(_) => deadline = Instant::now() + timeout,
                    Err(e) => return LinkError::Io(e),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return LinkError::HeartbeatTimeout(timeout);
                }
            }
        }
    }

    /// Decodes and routes every complete frame in the buffer.
    fn dispatch_buffered(&mut self) -> Result<(), LinkError> {
        let (mut messages, mut bytes) = (0u64, 0u64);
        while let Some(frame) = self.settings.codec.decode(&mut self.buf)? {
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
                    "backend sent a {} frame for session {id}",
                    other.kind(),
                )))
            }
        };
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
            return Ok(());
        };
        let offered = route.offer(msg);
        if !matches!(offered, Offered::Queued) {
            if let Some(route) = self.routes.remove(&id) {
                route.evict(&offered);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::time::Duration;

    use bytes::Bytes;
    use protocol::Framing;
    use tokio::io::DuplexStream;

    use super::*;
    use crate::backend::{Gone, Mailbox, MailboxLimits, TrySend};

    fn settings() -> LinkSettings {
        LinkSettings {
            codec: FrameCodec::new(Framing::Varint, 64 * 1024),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(14),
            queue_frames: 16,
            queue_bytes: 1 << 20,
            mailbox: MailboxLimits {
                messages: 4,
                bytes: 1024,
            },
        }
    }

    /// A driver over an in-memory stream; the other end is the backend's.
    fn driver() -> (LinkDriver<DuplexStream>, LinkHandle, DuplexStream) {
        let (gateway_end, backend_end) = tokio::io::duplex(256 * 1024);
        let s = settings();
        let (handle, queues) = LinkHandle::new(0, 2, &s);
        let metrics = Arc::new(Metrics::new().unwrap());
        let d = LinkDriver::new(
            gateway_end,
            BytesMut::new(),
            queues,
            s,
            metrics,
            handle.clone(),
        );
        (d, handle, backend_end)
    }

    /// The backend's side: reads frames until the gateway closes the link.
    async fn read_all(mut end: DuplexStream) -> Vec<(Duration, Frame)> {
        let codec = settings().codec;
        let start = Instant::now();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        loop {
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                frames.push((start.elapsed(), f));
            }
            if end.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return frames;
            }
        }
    }

    async fn write(end: &mut DuplexStream, frame: Frame) {
        let mut out = BytesMut::new();
        settings().codec.encode(&frame, &mut out).unwrap();
        end.write_all(&out).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_go_out_every_interval_and_a_silent_backend_ends_the_link() {
        let (d, _handle, backend) = driver();
        let start = Instant::now();
        let (end, frames) = tokio::join!(d.run(CancellationToken::new()), read_all(backend));
        assert!(matches!(end, LinkError::HeartbeatTimeout(_)), "{end:?}");
        // Exactly when nothing arrived for heartbeat_timeout, not before.
        assert_eq!(start.elapsed(), Duration::from_secs(14));
        let beats: Vec<(Duration, u64)> = frames
            .into_iter()
            .map(|(at, f)| match f.body {
                Some(Body::Heartbeat(hb)) if !hb.ack && f.session_id == 0 => (at, hb.nonce),
                other => panic!("unexpected frame {other:?}"),
            })
            .collect();
        let secs: Vec<u64> = beats.iter().map(|(at, _)| at.as_secs()).collect();
        assert_eq!(secs, vec![0, 5, 10], "one heartbeat per interval");
        let nonces: Vec<u64> = beats.iter().map(|(_, n)| *n).collect();
        assert_eq!(nonces, vec![1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn backend_heartbeats_are_answered_and_keep_the_link_alive() {
        let (d, _handle, mut backend) = driver();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let backend_side = async move {
            // Twenty seconds of heartbeats every 4 s: longer than the
            // heartbeat timeout, so the link lives only because they count.
            for nonce in 100..105 {
                write(&mut backend, Frame::heartbeat(nonce, false)).await;
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
            stop.cancel();
            read_all(backend).await
        };
        let (end, frames) = tokio::join!(d.run(shutdown), backend_side);
        assert!(matches!(end, LinkError::Shutdown), "{end:?}");
        // The last answer may still be in the stream when the backend
        // starts reading; every answer carries the backend's nonce.
        let acks: Vec<u64> = frames
            .iter()
            .filter_map(|(_, f)| match &f.body {
                Some(Body::Heartbeat(hb)) if hb.ack => Some(hb.nonce),
                _ => None,
            })
            .collect();
        assert_eq!(acks, vec![100, 101, 102, 103, 104]);
    }

    #[tokio::test(start_paused = true)]
    async fn frames_reach_their_session_and_a_backend_close_evicts_it_after_its_data() {
        let (d, handle, mut backend) = driver();
        let Mailbox {
            mut queue,
            mut eviction,
        } = handle.register(SessionId(7)).unwrap();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let backend_side = async move {
            write(
                &mut backend,
                Frame::data(7, Bytes::from_static(b"one"), true),
            )
            .await;
            // A frame for a session this link does not carry is dropped.
            write(&mut backend, Frame::data(8, Bytes::from_static(b"x"), true)).await;
            write(&mut backend, Frame::close(7, 4000, "done")).await;
            let gone = eviction.wait().await;
            stop.cancel();
            (gone, backend)
        };
        let (end, (gone, _backend)) = tokio::join!(d.run(shutdown), backend_side);
        assert!(matches!(end, LinkError::Shutdown));
        assert_eq!(gone, Gone::BackendClosed);
        assert!(matches!(
            queue.try_recv(),
            Some(ToClient::Data { text: true, .. })
        ));
        assert!(matches!(
            queue.try_recv(),
            Some(ToClient::Close { code: 4000, .. })
        ));
        assert!(queue.try_recv().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_protocol_violation_ends_the_link_and_its_sessions_learn_it_was_lost() {
        let (d, handle, mut backend) = driver();
        let mut mailbox = handle.register(SessionId(1)).unwrap();
        let backend_side = async move {
            // A backend must never send Hello.
            write(&mut backend, Frame::hello("backend", 0)).await;
            backend
        };
        let (end, _backend) = tokio::join!(d.run(CancellationToken::new()), backend_side);
        assert!(matches!(end, LinkError::Protocol(_)), "{end:?}");
        assert_eq!(mailbox.eviction.wait().await, Gone::LinkLost);
        // Senders learn at once that the link is gone.
        assert!(matches!(
            handle.try_send(Frame::data(1, Bytes::new(), false)),
            TrySend::Gone
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_writes_what_is_queued_then_closes_the_link() {
        let (d, handle, backend) = driver();
        for i in 0..3u8 {
            let sent = handle.try_send(Frame::data(1, Bytes::from(vec![i]), false));
            assert!(matches!(sent, TrySend::Sent));
        }
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let (end, frames) = tokio::join!(d.run(shutdown), read_all(backend));
        assert!(matches!(end, LinkError::Shutdown));
        let data: Vec<u8> = frames
            .iter()
            .filter_map(|(_, f)| match &f.body {
                Some(Body::Data(d)) => Some(d.payload[0]),
                _ => None,
            })
            .collect();
        assert_eq!(data, vec![0, 1, 2]);
    }
}

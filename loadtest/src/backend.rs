//! The reference backend: speaks the link protocol strictly, echoes every
//! data frame to its session (same payload, same text flag), and in push
//! mode also sends every open session a stream of timestamped messages.
//!
//! Anything the gateway does that `protocol/README.md` forbids is reported
//! on stderr as `PROTOCOL VIOLATION` and counted, and the link is closed.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use protocol::{pb, Body, Frame, FrameCodec, Framing, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the backend does besides echoing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Echo only.
    Echo,
    /// Echo, and push `push_rate` messages per second to every session.
    Push,
}

/// Backend settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Echo or push.
    pub mode: Mode,
    /// Length-prefix style.
    pub framing: Framing,
    /// Largest frame body accepted or sent.
    pub max_frame: usize,
    /// Push mode: messages per second to each session.
    pub push_rate: u32,
    /// Push mode: payload size (at least 16: sequence number and timestamp).
    pub push_size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mode: Mode::Echo,
            framing: Framing::Varint,
            max_frame: (1 << 20) + 4096,
            push_rate: 10,
            push_size: 64,
        }
    }
}

/// Counters, readable while the backend runs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Links currently connected.
    pub links: AtomicU64,
    /// Links ever accepted.
    pub links_total: AtomicU64,
    /// Sessions currently open.
    pub sessions: AtomicU64,
    /// Protocol violations seen.
    pub violations: AtomicU64,
    /// Data frames received.
    pub data_in: AtomicU64,
    /// Data frames sent.
    pub data_out: AtomicU64,
}

/// Accepts links forever.
pub async fn serve(listener: TcpListener, opts: Options, stats: Arc<Stats>) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let opts = opts.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            stats.links.fetch_add(1, Ordering::Relaxed);
            stats.links_total.fetch_add(1, Ordering::Relaxed);
            let mut link = Link::new(&opts, &stats);
            if let Err(e) = link.run(stream, peer).await {
                stats.violations.fetch_add(1, Ordering::Relaxed);
                eprintln!("PROTOCOL VIOLATION from gateway link {peer}: {e}");
            }
            stats
                .sessions
                .fetch_sub(link.sessions.len() as u64, Ordering::Relaxed);
            stats.links.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

struct Link<'a> {
    opts: &'a Options,
    stats: &'a Stats,
    codec: FrameCodec,
    sessions: HashSet<u64>,
    push_seq: u64,
}

impl<'a> Link<'a> {
    fn new(opts: &'a Options, stats: &'a Stats) -> Self {
        Self {
            opts,
            stats,
            codec: FrameCodec::new(opts.framing, opts.max_frame),
            sessions: HashSet::new(),
            push_seq: 0,
        }
    }

    async fn run(&mut self, mut stream: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
        let _ = stream.set_nodelay(true);
        let mut inbuf = BytesMut::with_capacity(64 * 1024);
        let mut out = BytesMut::with_capacity(64 * 1024);

        // Handshake: the first frame must be a Hello offering our version.
        let hello = loop {
            if let Some(f) = self.codec.decode(&mut inbuf)? {
                break f;
            }
            if stream.read_buf(&mut inbuf).await? == 0 {
                return Ok(());
            }
        };
        match hello.body {
            Some(Body::Hello(h))
                if h.min_version <= PROTOCOL_VERSION && MIN_PROTOCOL_VERSION <= h.max_version =>
            {
                eprintln!(
                    "backend: link from {peer} (gateway {:?}, link {})",
                    h.gateway_id, h.link_index
                );
                self.codec.encode(
                    &Frame::hello_ack(h.max_version.min(PROTOCOL_VERSION), "loadtest-backend"),
                    &mut out,
                )?;
            }
            Some(Body::Hello(h)) => {
                let ack = Frame {
                    session_id: 0,
                    body: Some(Body::HelloAck(pb::HelloAck {
                        version: 0,
                        backend_id: "loadtest-backend".into(),
                        error: format!("only version {PROTOCOL_VERSION} is supported"),
                        ..Default::default()
                    })),
                };
                self.codec.encode(&ack, &mut out)?;
                stream.write_all(&out).await?;
                anyhow::bail!(
                    "no common version: gateway offers {}..={}",
                    h.min_version,
                    h.max_version
                );
            }
            other => anyhow::bail!("first frame is not hello: {:?}", other.map(|b| b.kind())),
        }
        stream.write_all(&out).await?;
        out.clear();

        let push = self.opts.mode == Mode::Push && self.opts.push_rate > 0;
        // Timers tick in whole milliseconds: above 1,000 msg/s each tick
        // sends as many messages as the elapsed time calls for.
        let period =
            (Duration::from_secs(1) / self.opts.push_rate.max(1)).max(Duration::from_millis(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_tick = tokio::time::Instant::now();
        let mut owed = 0.0f64;
        loop {
            tokio::select! {
                r = stream.read_buf(&mut inbuf) => {
                    if r? == 0 {
                        return Ok(());
                    }
                    while let Some(frame) = self.codec.decode(&mut inbuf)? {
                        self.on_frame(frame, &mut out)?;
                    }
                }
                now = tick.tick(), if push => {
                    owed += f64::from(self.opts.push_rate) * (now - last_tick).as_secs_f64();
                    last_tick = now;
                    // Never more than one second's worth at once.
                    owed = owed.min(f64::from(self.opts.push_rate));
                    let n = owed.floor();
                    owed -= n;
                    for _ in 0..n as u64 {
                        self.push_all(&mut out)?;
                    }
                }
            }
            if !out.is_empty() {
                stream.write_all(&out).await?;
                out.clear();
            }
            if inbuf.capacity() - inbuf.len() < 16 * 1024 {
                inbuf.reserve(64 * 1024);
            }
        }
    }

    fn on_frame(&mut self, frame: Frame, out: &mut BytesMut) -> anyhow::Result<()> {
        let id = frame.session_id;
        let Some(body) = frame.body else {
            anyhow::bail!("frame without body");
        };
        match body {
            Body::Heartbeat(hb) if id == 0 => {
                if !hb.ack {
                    self.codec.encode(&Frame::heartbeat(hb.nonce, true), out)?;
                }
            }
            Body::Open(_) if id != 0 => {
                if !self.sessions.insert(id) {
                    anyhow::bail!("session {id} opened twice");
                }
                self.stats.sessions.fetch_add(1, Ordering::Relaxed);
            }
            Body::Data(d) if id != 0 => {
                // This backend never closes sessions itself, so no data can
                // have crossed its close: unknown ids are violations.
                if !self.sessions.contains(&id) {
                    anyhow::bail!("data for session {id}, which was never opened");
                }
                if d.text && std::str::from_utf8(&d.payload).is_err() {
                    anyhow::bail!("text data with invalid UTF-8 for session {id}");
                }
                self.stats.data_in.fetch_add(1, Ordering::Relaxed);
                self.stats.data_out.fetch_add(1, Ordering::Relaxed);
                self.codec
                    .encode(&Frame::data(id, d.payload, d.text), out)?;
            }
            Body::Close(_) if id != 0 => {
                if self.sessions.remove(&id) {
                    self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
                } else {
                    anyhow::bail!("close for session {id}, which was never opened");
                }
            }
            // Version 2: the session stays open while its client is away.
            Body::Detached(_) | Body::Attached(_) if id != 0 => {
                if !self.sessions.contains(&id) {
                    anyhow::bail!("detach/attach for session {id}, which is not open");
                }
            }
            other => anyhow::bail!("unexpected {} frame for session id {id}", other.kind()),
        }
        Ok(())
    }

    fn push_all(&mut self, out: &mut BytesMut) -> anyhow::Result<()> {
        let size = self.opts.push_size.max(16);
        let ids: Vec<u64> = self.sessions.iter().copied().collect();
        for id in ids {
            self.push_seq += 1;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            let mut p = BytesMut::with_capacity(size);
            p.put_u64(self.push_seq);
            p.put_u64(now);
            p.resize(size, 0);
            self.codec
                .encode(&Frame::data(id, Bytes::from(p), false), out)?;
            self.stats.data_out.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

//! The reference backend: speaks the link protocol strictly, echoes every
//! data frame to its session (same payload, same text flag), and in push
//! mode also sends every open session a stream of timestamped messages.
//!
//! It speaks version 3 with both capabilities (unless told otherwise):
//! per-session flow control (it holds messages the gateway's window has no
//! room for, and grants the gateway more as its echo handler consumes) and
//! sessions that move between links (a session table shared by all links,
//! unacknowledged messages kept and resent after a `resume`).
//!
//! Text messages starting with `cmd:` are commands, not echoed:
//! - `cmd:flood:N:SIZE`: send N binary messages of SIZE bytes (at least 8),
//!   each starting with its index (big-endian u64), as fast as the window
//!   allows;
//! - `cmd:stall:SECS`: stop consuming the session's messages for SECS
//!   seconds (no echo, no grant): a slow handler, which with flow control
//!   pauses only this client.
//!
//! Anything the gateway does that `protocol/README.md` forbids is reported
//! on stderr as `PROTOCOL VIOLATION` and counted, and the link is closed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use protocol::{
    pb, window_cost, Body, Frame, FrameCodec, Framing, CAP_FLEET, CAP_FLOW, CAP_MOVE,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

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
    /// Highest protocol version to accept.
    pub max_version: u32,
    /// Version 3 capabilities to adopt when offered.
    pub caps: Vec<String>,
    /// The window granted to each session (0: the gateway's own).
    pub window: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mode: Mode::Echo,
            framing: Framing::Varint,
            max_frame: (1 << 20) + 4096,
            push_rate: 10,
            push_size: 64,
            max_version: PROTOCOL_VERSION,
            caps: vec![CAP_FLOW.into(), CAP_MOVE.into(), CAP_FLEET.into()],
            window: 0,
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
    /// Messages held back for lack of window.
    pub held: AtomicU64,
    /// Sessions resumed after a move.
    pub resumed: AtomicU64,
    /// Data frames sent again after a move.
    pub resent: AtomicU64,
}

/// Accepts links forever.
pub async fn serve(listener: TcpListener, opts: Options, stats: Arc<Stats>) -> anyhow::Result<()> {
    let registry = Arc::new(Registry::default());
    let mut serial = 0u64;
    loop {
        let (stream, peer) = listener.accept().await?;
        let opts = opts.clone();
        let stats = stats.clone();
        let registry = registry.clone();
        serial += 1;
        tokio::spawn(async move {
            stats.links.fetch_add(1, Ordering::Relaxed);
            stats.links_total.fetch_add(1, Ordering::Relaxed);
            let mut link = Link::new(&opts, &stats, registry, serial);
            match link.run(stream, peer).await {
                Ok(()) => {}
                // A reset or a broken connection is a lost link, not a
                // violation.
                Err(e) if e.downcast_ref::<std::io::Error>().is_some() => {
                    eprintln!("backend: link from {peer} lost: {e}");
                }
                Err(e) => {
                    stats.violations.fetch_add(1, Ordering::Relaxed);
                    eprintln!("PROTOCOL VIOLATION from gateway link {peer}: {e}");
                }
            }
            link.end();
            stats.links.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// A session's key beyond its link: (`Hello.instance_id`, session id).
type Key = (Arc<str>, u64);

/// Sessions that outlive their link ("move"): who holds each, and those
/// whose link was lost, waiting for a `resume`.
#[derive(Default)]
struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    /// The link serial holding each session, and how to ask it for one.
    owners: HashMap<Key, (u64, mpsc::UnboundedSender<Steal>)>,
    /// Sessions whose link was lost, and until when they wait.
    orphans: HashMap<Key, (Session, Instant)>,
}

/// A request to a link for one of its sessions (its link is dead to the
/// gateway, which resumed it elsewhere).
type Steal = (u64, oneshot::Sender<Option<Session>>);

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One session's state; with flow control, its windows both ways.
#[derive(Debug, Default)]
struct Session {
    // Gateway -> backend.
    /// Data frames received, their cost, and the cost consumed (echoed).
    received: u64,
    received_cost: u64,
    consumed: u64,
    /// The limit granted to the gateway.
    granted: u64,
    /// `received` as of the last `window` sent: what the gateway knows we
    /// have ("move"), and when the last data frame arrived.
    acked_received: u64,
    last_data: Option<Instant>,
    /// Received, not yet consumed (stalled, or no window for the echo).
    inbox: VecDeque<pb::Data>,
    stalled_until: Option<Instant>,
    // Backend -> gateway.
    /// Data frames sent and their cost; the gateway's limit and acks.
    sent: u64,
    sent_cost: u64,
    limit: u64,
    acked: u64,
    /// Sent, not yet acknowledged ("move"): resent after a move.
    unacked: VecDeque<Bytes>,
    unacked_text: VecDeque<bool>,
    /// A flood in progress: messages left, their size, the next index.
    flood: Option<(u64, usize, u64)>,
}

struct Link<'a> {
    opts: &'a Options,
    stats: &'a Stats,
    registry: Arc<Registry>,
    serial: u64,
    codec: FrameCodec,
    sessions: HashMap<u64, Session>,
    push_seq: u64,
    /// Negotiated: version 3's flow control and moves, the window each
    /// side grants a session, and how long lost sessions wait.
    flow: bool,
    moves: bool,
    /// "fleet": a `resume` may come from another gateway instance than the
    /// one that opened the session (`origin_instance_id`).
    fleet: bool,
    /// Keys of sessions on this link opened by another gateway instance
    /// (the rest are keyed by this link's `Hello.instance_id`).
    foreign: HashMap<u64, Key>,
    my_window: u64,
    their_window: u64,
    move_timeout: Duration,
    instance: Arc<str>,
    steal_tx: mpsc::UnboundedSender<Steal>,
    steal_rx: mpsc::UnboundedReceiver<Steal>,
    /// Sessions taken from another link for a `resume` (or not: `None`).
    stolen_tx: mpsc::UnboundedSender<Stolen>,
    stolen_rx: mpsc::UnboundedReceiver<Stolen>,
    /// Sessions that moved to another link, or that this link refused a
    /// resume of: frames for them still arriving here are late.
    moved_away: HashSet<u64>,
    /// Sessions with data frames not yet acknowledged ("move"): each gets
    /// a `window` once it has been quiet for [`QUIET_ACK`].
    to_ack: HashSet<u64>,
    /// When the frames being handled were read (one clock read per read).
    read_at: Instant,
}

/// protocol/README.md, "Acknowledge a quiet session": with "move", data
/// frames not yet acknowledged are acknowledged once the session has had
/// no data frame for this long, so that the gateway does not hold a quiet
/// client's last messages for the rest of its session.
const QUIET_ACK: Duration = Duration::from_millis(200);

/// The outcome of taking a session from another link for a `resume`.
type Stolen = (Key, pb::SessionResume, Option<Session>);

/// What handling a frame left to do that needs waiting.
enum After {
    Nothing,
    /// A `resume` for a session another (dead) link still holds.
    Steal(Key, pb::SessionResume, u64),
}

impl<'a> Link<'a> {
    fn new(opts: &'a Options, stats: &'a Stats, registry: Arc<Registry>, serial: u64) -> Self {
        let (steal_tx, steal_rx) = mpsc::unbounded_channel();
        let (stolen_tx, stolen_rx) = mpsc::unbounded_channel();
        Self {
            opts,
            stats,
            registry,
            serial,
            codec: FrameCodec::new(opts.framing, opts.max_frame),
            sessions: HashMap::new(),
            push_seq: 0,
            flow: false,
            moves: false,
            fleet: false,
            foreign: HashMap::new(),
            my_window: 0,
            their_window: 0,
            move_timeout: Duration::ZERO,
            instance: Arc::from(""),
            steal_tx,
            steal_rx,
            stolen_tx,
            stolen_rx,
            moved_away: HashSet::new(),
            to_ack: HashSet::new(),
            read_at: Instant::now(),
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
        let max = self.opts.max_version.min(PROTOCOL_VERSION);
        match hello.body {
            Some(Body::Hello(h))
                if h.min_version <= max && MIN_PROTOCOL_VERSION <= h.max_version =>
            {
                let version = h.max_version.min(max);
                eprintln!(
                    "backend: link from {peer} (gateway {:?}, link {}, version {version})",
                    h.gateway_id, h.link_index
                );
                let mut ack = Frame::hello_ack(version, "loadtest-backend");
                if version >= 3 {
                    let adopt = |c: &str| {
                        h.capabilities.iter().any(|o| o == c)
                            && self.opts.caps.iter().any(|o| o == c)
                    };
                    self.flow = adopt(CAP_FLOW);
                    self.moves = self.flow && adopt(CAP_MOVE);
                    self.fleet = self.moves && adopt(CAP_FLEET);
                    self.their_window = h.session_window;
                    self.my_window = match self.opts.window {
                        0 => h.session_window,
                        w => w,
                    };
                    self.move_timeout = Duration::from_millis(h.move_timeout_ms);
                    if let Some(Body::HelloAck(a)) = ack.body.as_mut() {
                        if self.flow {
                            a.capabilities.push(CAP_FLOW.into());
                            a.session_window = self.my_window;
                        }
                        if self.moves {
                            a.capabilities.push(CAP_MOVE.into());
                        }
                        if self.fleet {
                            a.capabilities.push(CAP_FLEET.into());
                        }
                    }
                }
                self.instance = Arc::from(h.instance_id.as_str());
                self.codec.encode(&ack, &mut out)?;
            }
            Some(Body::Hello(h)) => {
                let ack = Frame {
                    session_id: 0,
                    body: Some(Body::HelloAck(pb::HelloAck {
                        version: 0,
                        backend_id: "loadtest-backend".into(),
                        error: format!(
                            "only versions {MIN_PROTOCOL_VERSION}..={max} are supported"
                        ),
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
        let mut last_tick = Instant::now();
        let mut owed = 0.0f64;
        // Stalled sessions are looked at this often.
        let mut stall_tick = tokio::time::interval(Duration::from_millis(20));
        stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Quiet sessions are acknowledged within 1.5 x QUIET_ACK.
        let mut ack_tick = tokio::time::interval(QUIET_ACK / 2);
        ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                r = stream.read_buf(&mut inbuf) => {
                    if r? == 0 {
                        return Ok(());
                    }
                    self.read_at = Instant::now();
                    while let Some(frame) = self.codec.decode(&mut inbuf)? {
                        if let After::Steal(id, resume, owner) = self.on_frame(frame, &mut out)? {
                            self.steal(id, resume, owner);
                        }
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
                _ = stall_tick.tick(), if self.any_stalled() => {
                    let ids: Vec<u64> = self.sessions.keys().copied().collect();
                    for id in ids {
                        self.pump(id, &mut out)?;
                    }
                }
                _ = ack_tick.tick(), if !self.to_ack.is_empty() => self.ack_quiet(&mut out)?,
                Some((id, reply)) = self.steal_rx.recv() => {
                    // The gateway resumed this session on another link: it
                    // is no longer ours, and frames for it still arriving
                    // here are late (ignored).
                    if let Some(s) = self.sessions.remove(&id) {
                        self.moved_away.insert(id);
                        if let Err(Some(s)) = reply.send(Some(s)) {
                            // The taker gave up meanwhile: still ours.
                            self.moved_away.remove(&id);
                            self.sessions.insert(id, s);
                        } else {
                            self.foreign.remove(&id);
                        }
                    } else {
                        let _ = reply.send(None);
                    }
                }
                Some((key, resume, taken)) = self.stolen_rx.recv() => match taken {
                    Some(s) => {
                        let id = key.1;
                        self.own(key);
                        self.resumed(id, s, &resume, &mut out)?;
                    }
                    None => {
                        let id = key.1;
                        eprintln!("backend: resume of session {id}, held by another link, failed");
                        self.moved_away.insert(id);
                        self.codec.encode(
                            &Frame::close(id, 1012, "session unknown to the backend"),
                            &mut out,
                        )?;
                    }
                },
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

    /// The link is over: with "move" its sessions wait for a `resume`.
    fn end(&mut self) {
        // Sessions taken from another link for a resume this link did not
        // get to answer: they wait for the next resume too.
        self.stolen_rx.close();
        while let Ok((key, _, taken)) = self.stolen_rx.try_recv() {
            if let Some(s) = taken {
                self.sessions.insert(key.1, s);
                self.set_key(key);
            }
        }
        let mut reg = self.registry.lock();
        let now = Instant::now();
        let before = reg.orphans.len();
        reg.orphans.retain(|_, (_, until)| now < *until);
        // Not resumed in time: over, as if closed with 1006.
        let expired = (before - reg.orphans.len()) as u64;
        self.stats.sessions.fetch_sub(expired, Ordering::Relaxed);
        let until = now + self.move_timeout;
        let ids: Vec<u64> = self.sessions.keys().copied().collect();
        for id in ids {
            let key = self.key(id);
            let Some(s) = self.sessions.remove(&id) else {
                continue;
            };
            if reg.owners.get(&key).is_some_and(|(o, _)| *o == self.serial) {
                reg.owners.remove(&key);
            }
            if self.moves {
                reg.orphans.insert(key, (s, until));
            } else {
                self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn any_stalled(&self) -> bool {
        self.flow && self.sessions.values().any(|s| s.stalled_until.is_some())
    }

    fn on_frame(&mut self, frame: Frame, out: &mut BytesMut) -> anyhow::Result<After> {
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
                if self.sessions.contains_key(&id) {
                    anyhow::bail!("session {id} opened twice");
                }
                let s = Session {
                    granted: self.my_window,
                    limit: self.their_window,
                    ..Session::default()
                };
                self.sessions.insert(id, s);
                if self.moves {
                    let key = self.key(id);
                    self.registry
                        .lock()
                        .owners
                        .insert(key, (self.serial, self.steal_tx.clone()));
                }
                self.stats.sessions.fetch_add(1, Ordering::Relaxed);
            }
            Body::Data(d) if id != 0 => {
                if d.text && std::str::from_utf8(&d.payload).is_err() {
                    anyhow::bail!("text data with invalid UTF-8 for session {id}");
                }
                // This backend never closes sessions itself, so no data can
                // have crossed its close: unknown ids are violations.
                let flow = self.flow;
                if self.moved_away.contains(&id) {
                    return Ok(After::Nothing);
                }
                let Some(s) = self.sessions.get_mut(&id) else {
                    anyhow::bail!("data for session {id}, which was never opened");
                };
                self.stats.data_in.fetch_add(1, Ordering::Relaxed);
                if !flow {
                    self.stats.data_out.fetch_add(1, Ordering::Relaxed);
                    self.codec
                        .encode(&Frame::data(id, d.payload, d.text), out)?;
                    return Ok(After::Nothing);
                }
                s.received += 1;
                s.received_cost += window_cost(d.payload.len());
                if self.moves {
                    s.last_data = Some(self.read_at);
                    // Listed once, when it stops being all acknowledged.
                    if s.received == s.acked_received + 1 {
                        self.to_ack.insert(id);
                    }
                }
                if s.received_cost > s.granted {
                    anyhow::bail!(
                        "session {id}: the gateway sent {} bytes of cost past the window {}",
                        s.received_cost,
                        s.granted
                    );
                }
                s.inbox.push_back(d);
                self.pump(id, out)?;
            }
            Body::Window(w) if id != 0 && self.flow => {
                // A window may cross our close (or a move away).
                if self.moved_away.contains(&id) {
                    return Ok(After::Nothing);
                }
                let Some(s) = self.sessions.get_mut(&id) else {
                    anyhow::bail!("window for session {id}, which is not on this link");
                };
                s.limit = s.limit.max(w.limit);
                if self.moves {
                    s.ack(id, w.received)?;
                }
                self.pump(id, out)?;
            }
            Body::Resume(r) if id != 0 && self.moves => {
                if self.sessions.contains_key(&id) {
                    anyhow::bail!("resume for session {id}, which is open on this link");
                }
                let key = match &r.origin_instance_id {
                    o if self.fleet && !o.is_empty() => (Arc::from(o.as_str()), id),
                    _ => (self.instance.clone(), id),
                };
                let mut reg = self.registry.lock();
                let now = Instant::now();
                reg.orphans.retain(|_, (_, until)| now < *until);
                if let Some((s, _)) = reg.orphans.remove(&key) {
                    // Ours from this instant: a resume on another link now
                    // asks us for it, rather than finding it nowhere.
                    reg.owners
                        .insert(key.clone(), (self.serial, self.steal_tx.clone()));
                    drop(reg);
                    self.set_key(key);
                    self.resumed(id, s, &r, out)?;
                } else if let Some((owner, _)) = reg.owners.get(&key) {
                    return Ok(After::Steal(key, r, *owner));
                } else {
                    drop(reg);
                    eprintln!("backend: resume of session {id}, which it does not know");
                    self.moved_away.insert(id);
                    self.codec.encode(
                        &Frame::close(id, 1012, "session unknown to the backend"),
                        out,
                    )?;
                }
            }
            Body::Close(_) if id != 0 && self.moved_away.remove(&id) => {}
            Body::Close(_) if id != 0 => {
                if self.sessions.remove(&id).is_some() {
                    self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
                    if self.moves {
                        let key = self.key(id);
                        self.registry.lock().owners.remove(&key);
                        self.foreign.remove(&id);
                    }
                } else {
                    anyhow::bail!("close for session {id}, which was never opened");
                }
            }
            // Late, from a link the session moved away from (a gateway
            // instance that handed it over still flushes what it queued).
            Body::Detached(_) | Body::Attached(_) if id != 0 && self.moved_away.contains(&id) => {}
            // Version 2: the session stays open while its client is away.
            Body::Detached(_) | Body::Attached(_) if id != 0 => {
                if !self.sessions.contains_key(&id) {
                    anyhow::bail!("detach/attach for session {id}, which is not open");
                }
            }
            other => anyhow::bail!("unexpected {} frame for session id {id}", other.kind()),
        }
        Ok(After::Nothing)
    }

    /// Takes a resumed session from the link that held it (dead to the
    /// gateway, maybe not yet to us), without holding up this link: the
    /// outcome comes back through `stolen_rx`.
    fn steal(&self, key: Key, resume: pb::SessionResume, owner: u64) {
        let id = key.1;
        let wait = self.move_timeout;
        let registry = self.registry.clone();
        let back = self.stolen_tx.clone();
        tokio::spawn(async move {
            let tx = registry.lock().owners.get(&key).map(|(_, tx)| tx.clone());
            let (reply_tx, reply_rx) = oneshot::channel();
            let taken = match tx {
                Some(tx) if tx.send((id, reply_tx)).is_ok() => {
                    tokio::time::timeout(Duration::from_secs(2), reply_rx)
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .flatten()
                }
                _ => None,
            };
            // The owner may have ended meanwhile: its sessions are orphans.
            let taken = taken.or_else(|| registry.lock().orphans.remove(&key).map(|(s, _)| s));
            if taken.is_none() {
                eprintln!("backend: link {owner} did not hand over session {id}");
            }
            if let Err(mpsc::error::SendError((_, _, Some(s)))) =
                back.send((key.clone(), resume, taken))
            {
                // This link ended meanwhile: the session waits for the next
                // resume.
                registry
                    .lock()
                    .orphans
                    .insert(key, (s, Instant::now() + wait));
            }
        });
    }

    /// Records that this link holds the session `key` now.
    fn own(&mut self, key: Key) {
        self.registry
            .lock()
            .owners
            .insert(key.clone(), (self.serial, self.steal_tx.clone()));
        self.set_key(key);
    }

    /// The session's key: opened by this link's gateway instance, or by
    /// another one of its fleet.
    fn key(&self, id: u64) -> Key {
        self.foreign
            .get(&id)
            .cloned()
            .unwrap_or_else(|| (self.instance.clone(), id))
    }

    fn set_key(&mut self, key: Key) {
        if key.0 == self.instance {
            self.foreign.remove(&key.1);
        } else {
            self.foreign.insert(key.1, key);
        }
    }

    /// A session moved to this link: answer with what we have, resend
    /// what the gateway has not, then carry on.
    fn resumed(
        &mut self,
        id: u64,
        mut s: Session,
        r: &pb::SessionResume,
        out: &mut BytesMut,
    ) -> anyhow::Result<()> {
        s.ack(id, r.received)?;
        s.limit = s.limit.max(r.limit);
        s.acked_received = s.received;
        self.codec
            .encode(&Frame::window(id, s.granted, s.received), out)?;
        let mut resent = 0;
        for (payload, text) in s.unacked.iter().zip(&s.unacked_text) {
            self.codec
                .encode(&Frame::data(id, payload.clone(), *text), out)?;
            resent += 1;
        }
        self.stats.resent.fetch_add(resent, Ordering::Relaxed);
        self.stats.resumed.fetch_add(1, Ordering::Relaxed);
        self.moved_away.remove(&id);
        self.sessions.insert(id, s);
        self.pump(id, out)
    }

    /// Does for one session what its windows allow: echo what it received
    /// (unless stalled), go on with a flood, and grant the gateway more.
    fn pump(&mut self, id: u64, out: &mut BytesMut) -> anyhow::Result<()> {
        let (codec, moves, my_window) = (self.codec, self.moves, self.my_window);
        let Some(s) = self.sessions.get_mut(&id) else {
            return Ok(());
        };
        if s.stalled_until.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        s.stalled_until = None;
        while let Some(d) = s.inbox.front() {
            if let Some(cmd) = command(d) {
                let d = s.inbox.pop_front().unwrap_or_default();
                s.consumed += window_cost(d.payload.len());
                match cmd {
                    Command::Flood(n, size) => s.flood = Some((n, size.max(8), 0)),
                    Command::Stall(secs) => {
                        s.stalled_until = Some(Instant::now() + Duration::from_secs_f64(secs));
                        break;
                    }
                }
                continue;
            }
            let cost = window_cost(d.payload.len());
            if !s.fits(cost) {
                self.stats.held.fetch_add(1, Ordering::Relaxed);
                break;
            }
            let d = s.inbox.pop_front().unwrap_or_default();
            s.consumed += cost;
            s.send(id, d.payload, d.text, moves, &codec, out)?;
            self.stats.data_out.fetch_add(1, Ordering::Relaxed);
        }
        while let Some((left, size, next)) = s.flood {
            if left == 0 {
                s.flood = None;
                break;
            }
            if !s.fits(window_cost(size)) {
                break;
            }
            let mut p = BytesMut::with_capacity(size);
            p.put_u64(next);
            p.resize(size, b'f');
            s.send(id, p.freeze(), false, moves, &codec, out)?;
            self.stats.data_out.fetch_add(1, Ordering::Relaxed);
            s.flood = Some((left - 1, size, next + 1));
        }
        // The update rule: grant consumed + window once half is used.
        if s.granted.saturating_sub(s.consumed) <= my_window / 2 {
            s.granted = s.consumed + my_window;
            s.acked_received = s.received;
            codec.encode(&Frame::window(id, s.granted, s.received), out)?;
        }
        Ok(())
    }

    /// Acknowledges the sessions whose data frames are not yet
    /// acknowledged and that have had none for [`QUIET_ACK`]; the window
    /// sent is the current limit, or consumed + window if that is higher.
    fn ack_quiet(&mut self, out: &mut BytesMut) -> anyhow::Result<()> {
        let now = Instant::now();
        let (codec, my_window) = (self.codec, self.my_window);
        let sessions = &mut self.sessions;
        let mut result = Ok(());
        self.to_ack.retain(|id| {
            let Some(s) = sessions.get_mut(id) else {
                return false;
            };
            if s.acked_received >= s.received {
                return false;
            }
            if s.last_data
                .is_some_and(|t| now.duration_since(t) < QUIET_ACK)
            {
                return true;
            }
            s.granted = s.granted.max(s.consumed + my_window);
            s.acked_received = s.received;
            if result.is_ok() {
                result = codec.encode(&Frame::window(*id, s.granted, s.received), out);
            }
            false
        });
        Ok(result?)
    }

    fn push_all(&mut self, out: &mut BytesMut) -> anyhow::Result<()> {
        let size = self.opts.push_size.max(16);
        let ids: Vec<u64> = self.sessions.keys().copied().collect();
        let (codec, flow, moves) = (self.codec, self.flow, self.moves);
        for id in ids {
            let Some(s) = self.sessions.get_mut(&id) else {
                continue;
            };
            if flow && !s.fits(window_cost(size)) {
                // No room in the window: this push is skipped.
                self.stats.held.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.push_seq += 1;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            let mut p = BytesMut::with_capacity(size);
            p.put_u64(self.push_seq);
            p.put_u64(now);
            p.resize(size, 0);
            if flow {
                s.send(id, p.freeze(), false, moves, &codec, out)?;
            } else {
                codec.encode(&Frame::data(id, p.freeze(), false), out)?;
            }
            self.stats.data_out.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Session {
    /// Whether a data frame of `cost` fits the gateway's window.
    fn fits(&self, cost: u64) -> bool {
        self.sent_cost + cost <= self.limit
    }

    /// Sends a data frame within the window; with "move", keeps it until
    /// it is acknowledged.
    fn send(
        &mut self,
        id: u64,
        payload: Bytes,
        text: bool,
        moves: bool,
        codec: &FrameCodec,
        out: &mut BytesMut,
    ) -> anyhow::Result<()> {
        self.sent += 1;
        self.sent_cost += window_cost(payload.len());
        if moves {
            self.unacked.push_back(payload.clone());
            self.unacked_text.push_back(text);
        }
        codec.encode(&Frame::data(id, payload, text), out)?;
        Ok(())
    }

    /// The gateway has received `received` of our data frames (in a
    /// window, or a resume); more than we sent is a violation.
    fn ack(&mut self, id: u64, received: u64) -> anyhow::Result<()> {
        if received > self.sent {
            anyhow::bail!(
                "session {id}: the gateway says it received {received} data frames of {} sent",
                self.sent
            );
        }
        while self.acked < received && self.unacked.pop_front().is_some() {
            self.unacked_text.pop_front();
            self.acked += 1;
        }
        self.acked = self.acked.max(received);
        Ok(())
    }
}

/// A command in a client message.
enum Command {
    Flood(u64, usize),
    Stall(f64),
}

fn command(d: &pb::Data) -> Option<Command> {
    if !d.text || !d.payload.starts_with(b"cmd:") {
        return None;
    }
    let text = std::str::from_utf8(&d.payload).ok()?;
    let mut parts = text.split(':').skip(1);
    match (parts.next()?, parts.next(), parts.next()) {
        ("flood", Some(n), Some(size)) => Some(Command::Flood(n.parse().ok()?, size.parse().ok()?)),
        ("stall", Some(secs), None) => Some(Command::Stall(secs.parse().ok()?)),
        _ => None,
    }
}

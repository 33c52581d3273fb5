//! An in-process backend for tests: accepts links, answers the handshake
//! and heartbeats, optionally echoes, records every event, and lets a test
//! push data to or close any session, or kill the whole backend.
//!
//! It also checks the gateway's side of the contract (protocol/README.md,
//! "What the gateway guarantees") on every frame it reads, and records each
//! breach as a violation. Violations (and panics of its own tasks) fail the
//! test: [`TestBackend::assert_clean`] checks them explicitly, and dropping
//! the backend checks them too, so a test that never calls it still fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use protocol::{pb, Body, Frame, FrameCodec, Framing, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// What the backend saw.
#[derive(Debug, Clone)]
pub enum Event {
    /// A link connected and completed the handshake (link number).
    Link(usize),
    /// A session opened on a link.
    Open {
        link: usize,
        session: u64,
        open: pb::SessionOpen,
    },
    /// Data from the gateway.
    Data {
        session: u64,
        payload: Bytes,
        text: bool,
    },
    /// The gateway closed a session.
    Close {
        session: u64,
        code: u32,
        reason: String,
    },
    /// A session's client connection was lost; it may resume.
    Detached { session: u64, reason: String },
    /// A session's client resumed.
    Attached { session: u64, replayed: u64 },
    /// A link ended.
    LinkClosed(usize),
}

type Routes = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Frame>>>>;

/// Contract violations seen so far, in the order they were seen.
type Violations = Arc<Mutex<Vec<String>>>;

/// Where a session stands, as far as this backend can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionState {
    /// Opened by the gateway on the link with this number.
    Open(usize),
    /// This backend sent `close` on that link; frames that crossed it on
    /// the wire (data, and at most one close) may still arrive.
    ClosedByBackend(usize),
    /// The gateway sent `close`: nothing more may come for it.
    ClosedByGateway,
}

/// Every session id any link ever opened, keyed by (gateway instance, id):
/// ids are unique per instance (`Hello.instance_id`) for its lifetime, never
/// reused; a restarted gateway counts from 1 again under a new instance id.
type Sessions = Arc<Mutex<HashMap<(String, u64), SessionState>>>;

/// How a [`TestBackend`] answers the gateway's `hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloReply {
    /// `hello_ack` with the highest common version.
    Normal,
    /// No answer at all (a late `hello_ack`).
    Silent,
    /// `hello_ack{version: 0, error}`, then the link is closed.
    Refuse,
    /// `hello_ack` naming this version, whatever was offered.
    Version(u32),
    /// A normal `hello_ack`, then the link is closed after this long: a
    /// flapping endpoint.
    Flap(std::time::Duration),
}

/// How a [`TestBackend`] behaves.
#[derive(Debug, Clone, Copy)]
pub struct BackendOpts {
    pub framing: Framing,
    /// Send data frames back.
    pub echo: bool,
    /// Highest protocol version this backend speaks (1 or 2).
    pub max_version: u32,
    /// How it answers the handshake.
    pub hello: HelloReply,
}

impl BackendOpts {
    pub fn new(framing: Framing, echo: bool) -> Self {
        Self {
            framing,
            echo,
            max_version: PROTOCOL_VERSION,
            hello: HelloReply::Normal,
        }
    }
}

/// State shared between the [`TestBackend`] handle and its link tasks.
#[derive(Clone)]
struct Shared {
    opts: BackendOpts,
    events: mpsc::UnboundedSender<Event>,
    routes: Routes,
    paused: Arc<AtomicBool>,
    violations: Violations,
    sessions: Sessions,
}

impl Shared {
    fn violation(&self, v: String) {
        self.violations.lock().unwrap().push(v);
    }
}

pub struct TestBackend {
    pub addr: SocketAddr,
    pub events: mpsc::UnboundedReceiver<Event>,
    routes: Routes,
    accepted: Arc<AtomicUsize>,
    paused: Arc<AtomicBool>,
    violations: Violations,
    tasks: JoinSet<()>,
}

impl TestBackend {
    /// Starts on a fresh port; `echo` sends data frames back.
    pub async fn start(framing: Framing, echo: bool) -> Self {
        Self::start_with(
            "127.0.0.1:0".parse().unwrap(),
            BackendOpts::new(framing, echo),
        )
        .await
    }

    pub async fn start_on(addr: SocketAddr, framing: Framing, echo: bool) -> Self {
        Self::start_with(addr, BackendOpts::new(framing, echo)).await
    }

    pub async fn start_with(addr: SocketAddr, opts: BackendOpts) -> Self {
        let listener = bind_reusing(addr).await;
        let addr = listener.local_addr().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let shared = Shared {
            opts,
            events: tx,
            routes: Arc::default(),
            paused: Arc::new(AtomicBool::new(false)),
            violations: Arc::default(),
            sessions: Arc::default(),
        };
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let (sh, a) = (shared.clone(), accepted.clone());
        tasks.spawn(async move {
            let mut links = JoinSet::new();
            loop {
                tokio::select! {
                    r = listener.accept() => {
                        let Ok((stream, _)) = r else { continue };
                        let n = a.fetch_add(1, Ordering::SeqCst);
                        links.spawn(link(stream, n, sh.clone()));
                    }
                    // Join the link tasks as they end, so a panic in one
                    // is seen (and fails the test) instead of vanishing.
                    Some(r) = links.join_next() => {
                        if let Err(e) = r {
                            if e.is_panic() {
                                sh.violation(format!("a test backend link task panicked: {e}"));
                            }
                        }
                    }
                }
            }
        });
        Self {
            addr,
            events,
            routes: shared.routes,
            accepted,
            paused: shared.paused,
            violations: shared.violations,
            tasks,
        }
    }

    /// Stops (true) or resumes (false) reading from every link, like a
    /// backend that is stuck.
    pub fn pause_reading(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Contract violations recorded so far.
    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    /// Panics if the gateway broke the contract, or a task of this backend
    /// panicked.
    pub fn assert_clean(&self) {
        let v = self.violations();
        assert!(
            v.is_empty(),
            "the test backend saw {} contract violation(s):\n  {}",
            v.len(),
            v.join("\n  ")
        );
    }

    /// Sends a frame for `session` on the link that carries it.
    pub fn send(&self, session: u64, frame: Frame) {
        let routes = self.routes.lock().unwrap();
        let tx = routes
            .get(&session)
            .unwrap_or_else(|| panic!("session {session} unknown"));
        tx.send(frame).unwrap();
    }

    pub fn push(&self, session: u64, payload: &[u8], text: bool) {
        self.send(
            session,
            Frame::data(session, Bytes::copy_from_slice(payload), text),
        );
    }

    pub fn close(&self, session: u64, code: u16, reason: &str) {
        self.send(session, Frame::close(session, code, reason));
    }

    /// Next event, waiting up to 10 s.
    pub async fn next(&mut self) -> Event {
        let e = tokio::time::timeout(std::time::Duration::from_secs(10), self.events.recv()).await;
        // A violation is the better explanation for a missing event.
        self.assert_clean();
        e.expect("no backend event within 10 s")
            .expect("backend gone")
    }

    /// Waits for the next event matching `f`, skipping others.
    pub async fn wait_for<T>(&mut self, mut f: impl FnMut(&Event) -> Option<T>) -> T {
        loop {
            let e = self.next().await;
            if let Some(t) = f(&e) {
                return t;
            }
        }
    }

    /// Waits for the next session open; returns its id and metadata.
    pub async fn next_open(&mut self) -> (u64, pb::SessionOpen) {
        self.wait_for(|e| match e {
            Event::Open { session, open, .. } => Some((*session, open.clone())),
            _ => None,
        })
        .await
    }

    /// Waits for the next data frame of `session`; returns its payload.
    pub async fn next_data(&mut self, session: u64) -> Bytes {
        self.wait_for(|e| match e {
            Event::Data {
                session: s,
                payload,
                ..
            } if *s == session => Some(payload.clone()),
            _ => None,
        })
        .await
    }

    /// Waits for the gateway's close of `session`: (code, reason).
    pub async fn wait_close(&mut self, session: u64) -> (u32, String) {
        self.wait_for(|e| match e {
            Event::Close {
                session: s,
                code,
                reason,
            } if *s == session => Some((*code, reason.clone())),
            _ => None,
        })
        .await
    }

    /// Waits for `detached` of `session`; returns its reason.
    pub async fn wait_detached(&mut self, session: u64) -> String {
        self.wait_for(|e| match e {
            Event::Detached { session: s, reason } if *s == session => Some(reason.clone()),
            _ => None,
        })
        .await
    }

    /// Stops accepting and drops every link, as a crashed backend would.
    pub fn kill(mut self) {
        self.tasks.abort_all();
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.tasks.abort_all();
        if std::thread::panicking() {
            return;
        }
        self.assert_clean();
    }
}

async fn bind_reusing(addr: SocketAddr) -> TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    socket.listen(1024).unwrap()
}

/// One link's view of the contract: what it has seen so far.
struct LinkCheck {
    n: usize,
    /// The gateway process's `instance_id`, from its `hello`.
    instance: Option<String>,
    /// The version this backend chose in its `hello_ack`.
    version: u32,
    shared: Shared,
}

impl LinkCheck {
    fn violation(&self, what: impl std::fmt::Display) {
        self.shared.violation(format!("link {}: {what}", self.n));
    }

    /// Checks a session frame (`open` excluded) of kind `kind` for `id`
    /// against the contract; returns whether it is acceptable (so the
    /// backend acts on it).
    fn session_frame(&self, id: u64, kind: &str) -> bool {
        if id == 0 {
            self.violation(format!("{kind} with session id 0"));
            return false;
        }
        let Some(instance) = &self.instance else {
            self.violation(format!("{kind} for session {id} before hello"));
            return false;
        };
        let mut sessions = self.shared.sessions.lock().unwrap();
        let key = (instance.clone(), id);
        match sessions.get(&key).copied() {
            None => {
                self.violation(format!("{kind} for session {id}, never opened"));
                false
            }
            Some(SessionState::ClosedByGateway) => {
                self.violation(format!(
                    "{kind} for session {id} after the gateway closed it"
                ));
                false
            }
            Some(SessionState::Open(l)) | Some(SessionState::ClosedByBackend(l)) if l != self.n => {
                self.violation(format!(
                    "{kind} for session {id}, which was opened on link {l}"
                ));
                false
            }
            Some(_) => {
                if kind == "close" {
                    sessions.insert(key, SessionState::ClosedByGateway);
                }
                true
            }
        }
    }

    /// Notes a frame this backend is about to send.
    fn sending(&self, f: &Frame) {
        if let (Some(Body::Close(_)), Some(instance)) = (&f.body, &self.instance) {
            let mut sessions = self.shared.sessions.lock().unwrap();
            let key = (instance.clone(), f.session_id);
            if let Some(SessionState::Open(l)) = sessions.get(&key).copied() {
                sessions.insert(key, SessionState::ClosedByBackend(l));
            }
        }
    }
}

async fn link(mut stream: tokio::net::TcpStream, n: usize, shared: Shared) {
    let codec = FrameCodec::new(shared.opts.framing, 64 << 20);
    let echo = shared.opts.echo;
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Frame>();
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::new();
    let mut check = LinkCheck {
        n,
        instance: None,
        version: 0,
        shared: shared.clone(),
    };
    let events = shared.events.clone();
    let mut mine: Vec<u64> = Vec::new();
    // When a flapping link breaks.
    let mut flap_at: Option<tokio::time::Instant> = None;
    'link: loop {
        let reading = !shared.paused.load(Ordering::SeqCst);
        tokio::select! {
            _ = tokio::time::sleep_until(flap_at.unwrap_or_else(tokio::time::Instant::now)), if flap_at.is_some() => break 'link,
            _ = tokio::time::sleep(std::time::Duration::from_millis(10)), if !reading => {}
            r = stream.read_buf(&mut inbuf), if reading => {
                match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                loop {
                    let frame = match codec.decode(&mut inbuf) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => {
                            check.violation(format!("undecodable frame: {e}"));
                            break 'link;
                        }
                    };
                    let id = frame.session_id;
                    let Some(body) = frame.body else {
                        check.violation(format!("frame without a body (session {id})"));
                        continue;
                    };
                    if check.instance.is_none() && !matches!(body, Body::Hello(_)) {
                        check.violation(format!("first frame is {} not hello", body.kind()));
                    }
                    match body {
                        Body::Hello(h) => {
                            if check.instance.is_some() {
                                check.violation("second hello");
                                continue;
                            }
                            if id != 0 {
                                check.violation(format!("hello with session id {id}"));
                            }
                            if !(h.min_version <= shared.opts.max_version && h.max_version >= 1) {
                                check.violation(format!(
                                    "hello offers versions {}..{}",
                                    h.min_version, h.max_version
                                ));
                            }
                            let version = h.max_version.min(shared.opts.max_version);
                            if h.instance_id.is_empty()
                                || h.heartbeat_interval_ms == 0
                                || h.heartbeat_timeout_ms <= h.heartbeat_interval_ms
                                || h.max_frame_size == 0
                                || h.max_message_size == 0
                                || h.max_message_size >= h.max_frame_size
                                || h.client_queue_bytes < u64::from(h.max_message_size)
                            {
                                check.violation(format!("hello without its identity or limits: {h:?}"));
                            }
                            check.instance = Some(h.instance_id);
                            check.version = version;
                            match shared.opts.hello {
                                HelloReply::Normal => {
                                    codec.encode(&Frame::hello_ack(version, "test-backend"), &mut out).unwrap();
                                    let _ = events.send(Event::Link(n));
                                }
                                HelloReply::Silent => {}
                                HelloReply::Refuse => {
                                    let mut ack = Frame::hello_ack(0, "test-backend");
                                    if let Some(Body::HelloAck(a)) = ack.body.as_mut() {
                                        a.error = "no common version (test)".into();
                                    }
                                    codec.encode(&ack, &mut out).unwrap();
                                    let _ = stream.write_all(&out).await;
                                    break 'link;
                                }
                                HelloReply::Flap(after) => {
                                    codec.encode(&Frame::hello_ack(version, "test-backend"), &mut out).unwrap();
                                    let _ = events.send(Event::Link(n));
                                    flap_at = Some(tokio::time::Instant::now() + after);
                                }
                                HelloReply::Version(v) => {
                                    check.version = v;
                                    codec.encode(&Frame::hello_ack(v, "test-backend"), &mut out).unwrap();
                                }
                            }
                        }
                        Body::Heartbeat(hb) => {
                            if id != 0 {
                                check.violation(format!("heartbeat with session id {id}"));
                            }
                            if !hb.ack {
                                codec.encode(&Frame::heartbeat(hb.nonce, true), &mut out).unwrap();
                            }
                        }
                        Body::Open(open) => {
                            if id == 0 {
                                check.violation("open with session id 0");
                                continue;
                            }
                            let Some(instance) = check.instance.clone() else {
                                continue;
                            };
                            let prev = shared
                                .sessions
                                .lock()
                                .unwrap()
                                .insert((instance, id), SessionState::Open(n));
                            if let Some(prev) = prev {
                                check.violation(format!(
                                    "second open for session {id} (was {prev:?})"
                                ));
                            }
                            shared.routes.lock().unwrap().insert(id, out_tx.clone());
                            mine.push(id);
                            let _ = events.send(Event::Open { link: n, session: id, open });
                        }
                        Body::Data(d) => {
                            if !check.session_frame(id, "data") {
                                continue;
                            }
                            if d.text && std::str::from_utf8(&d.payload).is_err() {
                                check.violation(format!("invalid UTF-8 in text data for session {id}"));
                            }
                            if echo {
                                codec.encode(&Frame::data(id, d.payload.clone(), d.text), &mut out).unwrap();
                            }
                            let _ = events.send(Event::Data { session: id, payload: d.payload, text: d.text });
                        }
                        Body::Close(c) => {
                            if !check.session_frame(id, "close") {
                                continue;
                            }
                            let _ = events.send(Event::Close { session: id, code: c.code, reason: c.reason });
                        }
                        Body::Detached(d) => {
                            if check.version < 2 {
                                check.violation(format!("detached on a version {} link", check.version));
                            }
                            if !check.session_frame(id, "detached") {
                                continue;
                            }
                            let _ = events.send(Event::Detached { session: id, reason: d.reason });
                        }
                        Body::Attached(a) => {
                            // `attached` without a `detached` before it is
                            // allowed: a takeover of a live connection.
                            if check.version < 2 {
                                check.violation(format!("attached on a version {} link", check.version));
                            }
                            if !check.session_frame(id, "attached") {
                                continue;
                            }
                            let _ = events.send(Event::Attached { session: id, replayed: a.replayed });
                        }
                        // This backend adopts no version 3 capability.
                        Body::Window(_) | Body::Resume(_) => check.violation(format!(
                            "{} for session {id} on a link without the capability",
                            body.kind()
                        )),
                        Body::HelloAck(_) => check.violation("gateway sent hello_ack"),
                    }
                }
            }
            Some(f) = out_rx.recv() => {
                check.sending(&f);
                codec.encode(&f, &mut out).unwrap();
            }
        }
        while let Ok(f) = out_rx.try_recv() {
            check.sending(&f);
            codec.encode(&f, &mut out).unwrap();
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
    }
    let mut r = shared.routes.lock().unwrap();
    for id in mine {
        r.remove(&id);
    }
    let _ = events.send(Event::LinkClosed(n));
}

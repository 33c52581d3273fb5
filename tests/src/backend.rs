//! An in-process backend for tests: accepts links, answers the handshake
//! and heartbeats, optionally echoes, records every event, and lets a test
//! push data to or close any session, or kill the whole backend.

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

pub struct TestBackend {
    pub addr: SocketAddr,
    pub events: mpsc::UnboundedReceiver<Event>,
    routes: Routes,
    accepted: Arc<AtomicUsize>,
    paused: Arc<AtomicBool>,
    tasks: JoinSet<()>,
}

impl TestBackend {
    /// Starts on a fresh port; `echo` sends data frames back.
    pub async fn start(framing: Framing, echo: bool) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), framing, echo).await
    }

    pub async fn start_on(addr: SocketAddr, framing: Framing, echo: bool) -> Self {
        let listener = bind_reusing(addr).await;
        let addr = listener.local_addr().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let routes: Routes = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let paused = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        let (r, a, p) = (routes.clone(), accepted.clone(), paused.clone());
        tasks.spawn(async move {
            let mut links = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let n = a.fetch_add(1, Ordering::SeqCst);
                links.spawn(link(
                    stream,
                    n,
                    framing,
                    echo,
                    tx.clone(),
                    r.clone(),
                    p.clone(),
                ));
            }
        });
        Self {
            addr,
            events,
            routes,
            accepted,
            paused,
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
        tokio::time::timeout(std::time::Duration::from_secs(10), self.events.recv())
            .await
            .expect("no backend event within 10 s")
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

    /// Stops accepting and drops every link, as a crashed backend would.
    pub fn kill(mut self) {
        self.tasks.abort_all();
    }
}

async fn bind_reusing(addr: SocketAddr) -> TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    socket.listen(1024).unwrap()
}

async fn link(
    mut stream: tokio::net::TcpStream,
    n: usize,
    framing: Framing,
    echo: bool,
    events: mpsc::UnboundedSender<Event>,
    routes: Routes,
    paused: Arc<AtomicBool>,
) {
    let codec = FrameCodec::new(framing, 64 << 20);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Frame>();
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::new();
    let mut handshaken = false;
    let mut mine: Vec<u64> = Vec::new();
    loop {
        let reading = !paused.load(Ordering::SeqCst);
        tokio::select! {
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
                        Err(e) => panic!("test backend: undecodable frame from gateway: {e}"),
                    };
                    let id = frame.session_id;
                    match frame.body.expect("body") {
                        Body::Hello(h) => {
                            assert!(!handshaken, "second hello");
                            assert!(h.min_version <= PROTOCOL_VERSION && h.max_version >= 1);
                            handshaken = true;
                            let version = h.max_version.min(PROTOCOL_VERSION);
                            codec.encode(&Frame::hello_ack(version, "test-backend"), &mut out).unwrap();
                            let _ = events.send(Event::Link(n));
                        }
                        Body::Heartbeat(hb) => {
                            if !hb.ack {
                                codec.encode(&Frame::heartbeat(hb.nonce, true), &mut out).unwrap();
                            }
                        }
                        Body::Open(open) => {
                            routes.lock().unwrap().insert(id, out_tx.clone());
                            mine.push(id);
                            let _ = events.send(Event::Open { link: n, session: id, open });
                        }
                        Body::Data(d) => {
                            if echo {
                                codec.encode(&Frame::data(id, d.payload.clone(), d.text), &mut out).unwrap();
                            }
                            let _ = events.send(Event::Data { session: id, payload: d.payload, text: d.text });
                        }
                        Body::Close(c) => {
                            let _ = events.send(Event::Close { session: id, code: c.code, reason: c.reason });
                        }
                        Body::Detached(d) => {
                            let _ = events.send(Event::Detached { session: id, reason: d.reason });
                        }
                        Body::Attached(a) => {
                            let _ = events.send(Event::Attached { session: id, replayed: a.replayed });
                        }
                        Body::HelloAck(_) => panic!("gateway sent hello_ack"),
                    }
                }
            }
            Some(f) = out_rx.recv() => codec.encode(&f, &mut out).unwrap(),
        }
        while let Ok(f) = out_rx.try_recv() {
            codec.encode(&f, &mut out).unwrap();
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
    }
    let mut r = routes.lock().unwrap();
    for id in mine {
        r.remove(&id);
    }
    let _ = events.send(Event::LinkClosed(n));
}

//! A bare WebSocket echo server: the floor for the gateway's CPU per round
//! trip in the benchmark (issue 12). It terminates the same wss the gateway
//! does (tokio-rustls, hyper's upgrade, fastwebsockets) and does nothing
//! else: no backend, no sessions, no queues; each message goes straight
//! back on its connection.
//!
//! With `--relay` it is the smallest relay instead, in one of three shapes,
//! each message going to a byte echo and back before it is echoed:
//! - `own`: each connection has a TCP connection of its own to the echo,
//!   and sends and reads in its own task (a 4-byte length, then the
//!   payload): the shape of websocat;
//! - `shared`: every connection's messages share two TCP connections to the
//!   echo (a 4-byte connection id, a 4-byte length, then the payload), as
//!   the gateway's links do: a writer task per link batches what the
//!   connections queued into one write, a reader task per link hands each
//!   answer to its connection. The gateway's shape, without its sessions'
//!   guarantees (no flow control, resume, bounds, metrics or logs);
//! - `direct`: as `shared`, but the link's reader writes each answer to its
//!   WebSocket connection itself (the write half behind a lock), so that a
//!   connection's task is woken only by its client, as the floor's is.
//!   Answers to a client that does not read hold up the whole link, and
//!   pings and closes are not answered: a measuring point, not a design
//!   the gateway could ship as it is.
//!
//! Beside the floor they show what relaying itself costs on this machine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

/// A TLS acceptor for the PEM certificate chain and key (TLS 1.3 and 1.2,
/// the gateway's defaults).
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// How messages are relayed (see the module's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// A TCP connection per WebSocket connection.
    Own,
    /// Two TCP connections shared by every WebSocket connection.
    Shared,
    /// Shared, and the links' readers write the answers to the clients.
    Direct,
}

/// Where a connection's messages go before they are echoed.
#[derive(Clone)]
enum Relay {
    Own(SocketAddr),
    Shared(Arc<[SharedLink]>),
    Direct(Arc<[SharedLink]>),
}

/// A WebSocket connection's write half, for the `direct` shape's readers.
type ClientWriter = fastwebsockets::WebSocketWrite<tokio::io::WriteHalf<TokioIo<Upgraded>>>;

/// Links shared by the `shared` shape.
const SHARED_LINKS: usize = 2;

/// One shared link: the writer's queue and the reader's map of
/// connections.
struct SharedLink {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    routes: Mutex<HashMap<u32, mpsc::UnboundedSender<Bytes>>>,
    /// `direct`: the connections' write halves.
    clients: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<ClientWriter>>>>,
}

async fn shared_links(addr: SocketAddr, direct: bool) -> anyhow::Result<Arc<[SharedLink]>> {
    let (mut links, mut readers) = (Vec::new(), Vec::new());
    for _ in 0..SHARED_LINKS {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (rd, mut wr) = tcp.into_split();
        readers.push(rd);
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            let (mut batch, mut buf) = (Vec::new(), Vec::new());
            while rx.recv_many(&mut batch, 512).await > 0 {
                buf.clear();
                for frame in batch.drain(..) {
                    buf.extend_from_slice(&frame);
                }
                if wr.write_all(&buf).await.is_err() {
                    return;
                }
            }
        });
        links.push(SharedLink {
            tx,
            routes: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
        });
    }
    let links: Arc<[SharedLink]> = links.into();
    for (i, rd) in readers.into_iter().enumerate() {
        tokio::spawn(read_shared(rd, links.clone(), i, direct));
    }
    Ok(links)
}

/// The reader of shared link `i`: hands each answer to its connection,
/// or with `direct` writes it to the connection's client.
async fn read_shared(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    links: Arc<[SharedLink]>,
    i: usize,
    direct: bool,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                // The link is gone: its connections end (no reconnect).
                lock(&links[i].routes).clear();
                lock(&links[i].clients).clear();
                return;
            }
            Ok(_) => {}
        }
        while buf.len() >= 8 {
            let id = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
            if buf.len() < 8 + len {
                break;
            }
            let mut frame = buf.split_to(8 + len);
            let payload = frame.split_off(8).freeze();
            if direct {
                let client = lock(&links[i].clients).get(&id).cloned();
                if let Some(client) = client {
                    let mut w = client.lock().await;
                    let frame = Frame::new(true, OpCode::Binary, None, Payload::Borrowed(&payload));
                    if w.write_frame(frame).await.is_err() || w.flush().await.is_err() {
                        lock(&links[i].clients).remove(&id);
                    }
                }
            } else if let Some(tx) = lock(&links[i].routes).get(&id) {
                let _ = tx.send(payload);
            }
        }
        buf.reserve(16 * 1024);
    }
}

/// Serves WebSocket echo on every connection (wss when `tls` is given),
/// forever; with `relay`, through the TCP echo at that address, in the
/// given shape.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    relay: Option<(SocketAddr, Shape)>,
) -> anyhow::Result<()> {
    let relay = match relay {
        None => None,
        Some((addr, Shape::Own)) => Some(Relay::Own(addr)),
        Some((addr, Shape::Shared)) => Some(Relay::Shared(shared_links(addr, false).await?)),
        Some((addr, Shape::Direct)) => Some(Relay::Direct(shared_links(addr, true).await?)),
    };
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let relay = relay.clone();
        tokio::spawn(async move {
            match tls {
                Some(tls) => {
                    if let Ok(s) = tls.accept(tcp).await {
                        http(s, relay).await;
                    }
                }
                None => http(tcp, relay).await,
            }
        });
    }
}

async fn http<S>(io: S, relay: Option<Relay>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _ = http1::Builder::new()
        .serve_connection(
            TokioIo::new(io),
            service_fn(move |req| upgrade(req, relay.clone())),
        )
        .with_upgrades()
        .await;
}

async fn upgrade(
    mut req: Request<Incoming>,
    relay: Option<Relay>,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        let Ok(ws) = fut.await else { return };
        match relay {
            None => {
                let _ = echo(ws, None).await;
            }
            Some(Relay::Own(addr)) => {
                let Ok(tcp) = TcpStream::connect(addr).await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let _ = echo(ws, Some(tcp)).await;
            }
            Some(Relay::Shared(links)) => {
                let (id, link) = place(&links);
                let (tx, rx) = mpsc::unbounded_channel();
                lock(&link.routes).insert(id, tx);
                let _ = echo_shared(ws, link, id, rx).await;
                lock(&link.routes).remove(&id);
            }
            Some(Relay::Direct(links)) => {
                let (id, link) = place(&links);
                echo_direct(ws, link, id).await;
            }
        }
    });
    Ok(response)
}

static NEXT_ID: AtomicU32 = AtomicU32::new(1);

/// A new connection's id, and the shared link it goes on.
fn place(links: &[SharedLink]) -> (u32, &SharedLink) {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    (id, &links[id as usize % links.len()])
}

/// A message on a shared link: the connection's id, the length, the payload.
fn encode(id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&id.to_be_bytes());
    // Messages are loadtest's, far below 4 GiB.
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `shared` shape: each message goes to the link's writer, and its
/// answer comes from the link's reader.
async fn echo_shared<S>(
    mut ws: fastwebsockets::WebSocket<S>,
    link: &SharedLink,
    id: u32,
    mut answers: mpsc::UnboundedReceiver<Bytes>,
) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => {
                let opcode = frame.opcode;
                link.tx.send(encode(id, &frame.payload))?;
                let answer = answers.recv().await.context("link gone")?;
                ws.write_frame(Frame::new(true, opcode, None, Payload::Borrowed(&answer)))
                    .await?;
                ws.flush().await?;
            }
            _ => {}
        }
    }
}

/// The `direct` shape: each message goes to the link's writer, and the
/// link's reader writes its answer to the client.
async fn echo_direct(ws: fastwebsockets::WebSocket<TokioIo<Upgraded>>, link: &SharedLink, id: u32) {
    let (mut rd, wr) = ws.split(tokio::io::split);
    lock(&link.clients).insert(id, Arc::new(tokio::sync::Mutex::new(wr)));
    // Pongs and close replies are not sent (see the module).
    let mut no_reply = |_| std::future::ready(Ok::<(), std::io::Error>(()));
    while let Ok(frame) = rd.read_frame(&mut no_reply).await {
        let relayed = match frame.opcode {
            OpCode::Binary => link.tx.send(encode(id, &frame.payload)).is_ok(),
            OpCode::Close => false,
            _ => true,
        };
        if !relayed {
            break;
        }
    }
    lock(&link.clients).remove(&id);
}

async fn echo<S>(
    mut ws: fastwebsockets::WebSocket<S>,
    mut backend: Option<TcpStream>,
) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::new();
    let mut back = Vec::new();
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => {
                let payload = match backend.as_mut() {
                    Some(b) => {
                        out.clear();
                        out.extend_from_slice(&u32::try_from(frame.payload.len())?.to_be_bytes());
                        out.extend_from_slice(&frame.payload);
                        b.write_all(&out).await?;
                        back.resize(out.len(), 0);
                        b.read_exact(&mut back).await?;
                        Payload::Borrowed(&back[4..])
                    }
                    None => frame.payload,
                };
                ws.write_frame(Frame::new(true, frame.opcode, None, payload))
                    .await?;
                ws.flush().await?;
            }
            _ => {}
        }
    }
}

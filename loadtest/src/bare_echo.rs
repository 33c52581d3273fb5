//! A bare WebSocket echo server: the floor for the gateway's CPU per round
//! trip in the benchmark (issue 12). It terminates the same wss the gateway
//! does (tokio-rustls, hyper's upgrade, fastwebsockets) and does nothing
//! else: no backend, no sessions, no queues; each message goes straight
//! back on its connection.
//!
//! With `--relay` it is the smallest relay instead, in one of two shapes,
//! each message going to a byte echo and back before it is echoed:
//! - `own`: each connection has a TCP connection of its own to the echo,
//!   and sends and reads in its own task (a 4-byte length, then the
//!   payload): the shape of websocat;
//! - `shared`: every connection's messages share two TCP connections to the
//!   echo (a 4-byte connection id, a 4-byte length, then the payload), as
//!   the gateway's links do: a writer task per link batches what the
//!   connections queued into one write, a reader task per link hands each
//!   answer to its connection. The gateway's shape, without its sessions'
//!   guarantees (no flow control, resume, bounds, metrics or logs).
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
}

/// Where a connection's messages go before they are echoed.
#[derive(Clone)]
enum Relay {
    Own(SocketAddr),
    Shared(Arc<[SharedLink]>),
}

/// Links shared by the `shared` shape.
const SHARED_LINKS: usize = 2;

/// One shared link: the writer's queue and the reader's map of
/// connections.
struct SharedLink {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    routes: Mutex<HashMap<u32, mpsc::UnboundedSender<Bytes>>>,
}

async fn shared_links(addr: SocketAddr) -> anyhow::Result<Arc<[SharedLink]>> {
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
        });
    }
    let links: Arc<[SharedLink]> = links.into();
    for (i, rd) in readers.into_iter().enumerate() {
        tokio::spawn(read_shared(rd, links.clone(), i));
    }
    Ok(links)
}

/// The reader of shared link `i`: hands each answer to its connection.
async fn read_shared(mut rd: tokio::net::tcp::OwnedReadHalf, links: Arc<[SharedLink]>, i: usize) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
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
            if let Some(tx) = lock(&links[i].routes).get(&id) {
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
        Some((addr, Shape::Shared)) => Some(Relay::Shared(shared_links(addr).await?)),
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
                let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                let i = id as usize % links.len();
                let (tx, rx) = mpsc::unbounded_channel();
                lock(&links[i].routes).insert(id, tx);
                let _ = echo_shared(ws, &links[i], id, rx).await;
                lock(&links[i].routes).remove(&id);
            }
        }
    });
    Ok(response)
}

static NEXT_ID: AtomicU32 = AtomicU32::new(1);

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
                let mut out = Vec::with_capacity(8 + frame.payload.len());
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&u32::try_from(frame.payload.len())?.to_be_bytes());
                out.extend_from_slice(&frame.payload);
                let opcode = frame.opcode;
                link.tx.send(out)?;
                let answer = answers.recv().await.context("link gone")?;
                ws.write_frame(Frame::new(true, opcode, None, Payload::Borrowed(&answer)))
                    .await?;
                ws.flush().await?;
            }
            _ => {}
        }
    }
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

//! Stages 1 and 2: accept TCP connections, then (in the connection's own
//! task) the TLS handshake and the HTTP/1.1 exchange that leads to the
//! upgrade.
//!
//! Both pre-upgrade phases run under deadlines (`listen.tls_handshake_timeout`
//! and `listen.http_header_timeout`), so a client that opens TCP and sends
//! nothing, or half a handshake, is cut. At most `listen.max_handshakes` TLS
//! handshakes run at once. The accept loop itself does nothing that can wait
//! on a client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::HandshakeKind;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::handshake::{MAX_REQUEST_HEADERS, MAX_REQUEST_HEAD_BYTES};
use crate::logs::limited;
use crate::metrics::{Metrics, Phase};
use crate::refusal::Refusal;
use crate::shared::Shared;
use crate::upgrade;

/// Accepts connections until shutdown; each gets its own task.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.draining() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                // An IPv6 listener that also accepts IPv4 sees IPv4 clients
                // as `::ffff:a.b.c.d`; the backend contract promises
                // "a.b.c.d:port" for them (`SessionOpen.remote_addr`).
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                let task = connection(tcp, peer, tls.clone(), shared.clone());
                shared.shutdown.spawn_session(task);
            }
            Err(e) => {
                // Usually EMFILE: out of file descriptors. Back off briefly
                // instead of spinning; existing sessions keep running.
                limited!(warn, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let accepted = Instant::now();
    // Small WebSocket frames must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    match tls {
        None => serve_http(tcp, peer, shared.clone(), Arrival::at(accepted)).await,
        Some(acceptor) => {
            // A connection still in its handshake (or waiting for a slot)
            // when the gateway drains never reaches a session: it must not
            // hold the drain.
            let handshake = tokio::select! {
                r = tls_handshake(tcp, &acceptor, &shared) => r,
                () = shared.shutdown.draining() => return,
            };
            match handshake {
                Ok(stream) => {
                    let secured = Instant::now();
                    shared
                        .metrics
                        .handshake_phase(Phase::Tls, secured - accepted);
                    let arrival = Arrival { accepted, secured };
                    serve_http(stream, peer, shared.clone(), arrival).await;
                }
                Err((refusal, e)) => {
                    shared.metrics.session_refused(&refusal);
                    limited!(debug, %peer, reason = refusal.label(), error = ?e, "TLS handshake refused");
                }
            }
        }
    }
}

/// When a client connection was accepted, and when its TLS handshake was
/// done (the same instant for ws), for the handshake duration histogram.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrival {
    pub(crate) accepted: Instant,
    pub(crate) secured: Instant,
}

impl Arrival {
    /// A connection without TLS, accepted at `accepted`.
    pub(crate) fn at(accepted: Instant) -> Self {
        Self {
            accepted,
            secured: accepted,
        }
    }

    /// The 101 went out: the upgrade and total phases.
    pub(crate) fn upgraded(self, metrics: &Metrics) {
        let now = Instant::now();
        metrics.handshake_phase(Phase::Upgrade, now - self.secured);
        metrics.handshake_phase(Phase::Total, now - self.accepted);
    }
}

/// Stage 2: the TLS handshake, holding one of `listen.max_handshakes`
/// slots, all within `listen.tls_handshake_timeout` from accept.
///
/// The slots bound the handshake work the runtime has queued at once, so
/// that in a reconnect storm the established sessions' tasks still get
/// their turn. A connection takes its slot only once its ClientHello starts
/// to arrive: a client that connects and says nothing costs no CPU and
/// must not keep others from handshaking. The wait for a slot counts
/// against the same deadline, so a storm larger than the gateway can
/// handshake in time is refused (`tls_busy`) rather than queued without
/// end; the client retries.
async fn tls_handshake(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    shared: &Shared,
) -> Result<TlsStream<TcpStream>, (Refusal, Option<std::io::Error>)> {
    let deadline = Instant::now() + shared.listen.tls_handshake_timeout;
    // `peek`, not `readable`: readiness can be reported before any byte
    // has arrived.
    match timeout_at(deadline, tcp.peek(&mut [0u8; 1])).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err((Refusal::TlsError, Some(e))),
        Err(_) => return Err((Refusal::TlsTimeout, None)),
    }
    let _slot = {
        let _waiting = Gauge::up(shared, Metrics::tls_handshakes_waiting);
        match timeout_at(deadline, shared.handshakes.acquire()).await {
            Ok(Ok(permit)) => (permit, Gauge::up(shared, Metrics::tls_handshakes_active)),
            // The semaphore is never closed.
            Ok(Err(_)) => return Err((Refusal::TlsError, None)),
            Err(_) => return Err((Refusal::TlsBusy, None)),
        }
    };
    match timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            let resumed = stream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
            shared.metrics.tls_handshake_done(resumed);
            Ok(stream)
        }
        Ok(Err(e)) => Err((Refusal::TlsError, Some(e))),
        Err(_) => Err((Refusal::TlsTimeout, None)),
    }
}

/// One unit of an up-down counter, given back when dropped (the handshake
/// future may be dropped at any await: drain, deadline).
struct Gauge<'a> {
    shared: &'a Shared,
    add: fn(&Metrics, i64),
}

impl<'a> Gauge<'a> {
    fn up(shared: &'a Shared, add: fn(&Metrics, i64)) -> Self {
        add(&shared.metrics, 1);
        Self { shared, add }
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        (self.add)(&self.shared.metrics, -1);
    }
}

/// Serves HTTP/1.1 on one connection until it upgrades or ends. The whole
/// exchange before the upgrade is bounded by `http_header_timeout`: the
/// gateway answers every request at once, so only a slow client can use up
/// that time, and it also ends any keep-alive connection after a plain HTTP
/// answer. (Keep-alive itself stays on: hyper would otherwise answer the
/// upgrade with `Connection: close`, which clients reject.) When the gateway
/// drains, a connection waiting for its request is closed at once; one whose
/// request is being answered finishes that answer (a 503, or the 101 of a
/// session that then closes with 1001).
pub(crate) async fn serve_http<S>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    arrival: Arrival,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = shared.listen.http_header_timeout;
    let svc_shared = shared.clone();
    // Set while a request is being answered: a drain waits for that answer
    // (a 503, or a resume's 101), and cuts the connection otherwise.
    let answering = Arc::new(AtomicBool::new(false));
    let svc_answering = answering.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        let answering = svc_answering.clone();
        async move {
            answering.store(true, Ordering::Relaxed);
            let resp = upgrade::handle(req, peer, &shared, arrival).await;
            answering.store(false, Ordering::Relaxed);
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    // hyper answers a request head over either cap with 431 and closes
    // the connection. (`max_buf_size` bounds the read buffer, head or not;
    // without `max_header_size` it would be the head's cap too.)
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_header_size(MAX_REQUEST_HEAD_BYTES)
        .max_headers(MAX_REQUEST_HEADERS)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut deadline = std::pin::pin!(tokio::time::sleep(timeout));
    let served = tokio::select! {
        r = conn.as_mut() => Some(r),
        () = &mut deadline => None,
        () = shared.shutdown.draining() => {
            // A connection waiting for (the rest of) its request is cut now;
            // an answer in progress is finished first. (Not hyper's
            // graceful_shutdown: it keeps reading a half-sent request, and it
            // adds `Connection: close` to a 101, which clients reject.)
            if !answering.load(Ordering::Relaxed) {
                return;
            }
            tokio::select! {
                r = conn.as_mut() => Some(r),
                () = &mut deadline => None,
            }
        }
    };
    match served {
        Some(Ok(())) => {}
        // hyper's own header timeout (the same bound) may fire first.
        Some(Err(e)) if e.is_timeout() => refused_slow(&shared, peer),
        // hyper has answered 431.
        Some(Err(e)) if e.is_parse_too_large() => {
            shared.metrics.session_refused(&Refusal::HeadersTooLarge);
            limited!(debug, %peer, "request head too large");
        }
        Some(Err(e)) => limited!(debug, %peer, error = %e, "HTTP connection error"),
        None => refused_slow(&shared, peer),
    }
}

/// A client too slow to send its request within `http_header_timeout`.
fn refused_slow(shared: &Shared, peer: SocketAddr) {
    shared.metrics.session_refused(&Refusal::HttpTimeout);
    limited!(debug, %peer, "HTTP request timed out");
}

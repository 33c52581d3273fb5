//! Stages 1 and 2: accept TCP connections, then (in the connection's own
//! task) the TLS handshake and the HTTP/1.1 exchange that leads to the
//! upgrade.
//!
//! Both pre-upgrade phases run under deadlines (`listen.tls_handshake_timeout`
//! and `listen.http_header_timeout`), so a client that opens TCP and sends
//! nothing, or half a handshake, is cut. The accept loop itself does nothing
//! that can wait on a client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::handshake::{MAX_REQUEST_HEADERS, MAX_REQUEST_HEAD_BYTES};
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
                warn!(error = %e, "accept failed");
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
    // Small WebSocket frames must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let listen = &shared.listen;
    match tls {
        None => serve_http(tcp, peer, shared.clone()).await,
        Some(acceptor) => {
            let handshake =
                tokio::time::timeout(listen.tls_handshake_timeout, acceptor.accept(tcp));
            // A connection still in its handshake when the gateway drains
            // never reaches a session: it must not hold the drain.
            let handshake = tokio::select! {
                r = handshake => r,
                () = shared.shutdown.draining() => return,
            };
            match handshake {
                Ok(Ok(stream)) => serve_http(stream, peer, shared.clone()).await,
                Ok(Err(e)) => {
                    shared.metrics.session_refused(&Refusal::TlsError);
                    debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    shared.metrics.session_refused(&Refusal::TlsTimeout);
                    debug!(%peer, "TLS handshake timed out");
                }
            }
        }
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
pub(crate) async fn serve_http<S>(stream: S, peer: SocketAddr, shared: Arc<Shared>)
where
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
            let resp = upgrade::handle(req, peer, &shared).await;
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
            debug!(%peer, "request head too large");
        }
        Some(Err(e)) => debug!(%peer, error = %e, "HTTP connection error"),
        None => refused_slow(&shared, peer),
    }
}

/// A client too slow to send its request within `http_header_timeout`.
fn refused_slow(shared: &Shared, peer: SocketAddr) {
    shared.metrics.session_refused(&Refusal::HttpTimeout);
    debug!(%peer, "HTTP request timed out");
}

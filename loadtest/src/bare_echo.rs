//! A bare WebSocket echo server: the floor for the gateway's CPU per round
//! trip in the benchmark (issue 12). It terminates the same wss the gateway
//! does (tokio-rustls, hyper's upgrade, fastwebsockets) and does nothing
//! else: no backend, no sessions, no queues; each message goes straight
//! back on its connection.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, WebSocketError};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
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

/// Serves WebSocket echo on every connection (wss when `tls` is given),
/// forever.
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>) -> anyhow::Result<()> {
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(tls) => {
                    if let Ok(s) = tls.accept(tcp).await {
                        http(s).await;
                    }
                }
                None => http(tcp).await,
            }
        });
    }
}

async fn http<S>(io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(io), service_fn(upgrade))
        .with_upgrades()
        .await;
}

async fn upgrade(mut req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        if let Ok(ws) = fut.await {
            let _ = echo(ws).await;
        }
    });
    Ok(response)
}

async fn echo<S>(mut ws: fastwebsockets::WebSocket<S>) -> Result<(), WebSocketError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => {
                ws.write_frame(Frame::new(true, frame.opcode, None, frame.payload))
                    .await?;
                ws.flush().await?;
            }
            _ => {}
        }
    }
}

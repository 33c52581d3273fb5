//! Opening one client connection: TCP from a chosen 127.0.0.x source, TLS
//! (trusting a CA file, or nothing with `--insecure`), WebSocket upgrade.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use fastwebsockets::WebSocket;
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::{TcpSocket, TcpStream};

use super::stats::ErrorKind;

/// The byte stream under an upgraded connection.
pub type Io = TokioIo<Upgraded>;

/// An upgraded client connection.
pub type Ws = WebSocket<Io>;

/// Where to connect, parsed from the URL.
#[derive(Clone)]
pub struct Target {
    /// Resolved address.
    pub addr: SocketAddr,
    /// Host as written (Host header, TLS server name).
    pub host: String,
    /// Path and query.
    pub path: String,
    /// TLS connector for wss.
    pub tls: Option<tokio_rustls::TlsConnector>,
}

impl Target {
    /// Parses `ws://host:port/path` or `wss://...`.
    pub async fn parse(url: &str, ca: Option<&Path>, insecure: bool) -> anyhow::Result<Self> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (false, r)
        } else {
            bail!("{url}: the URL must start with ws:// or wss://");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse().context("port")?,
            ),
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let addr = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{host} has no IPv4 address"))?;
        let tls = if tls {
            Some(connector(ca, insecure)?)
        } else {
            None
        };
        Ok(Self {
            addr,
            host: host.to_owned(),
            path: path.to_owned(),
            tls,
        })
    }
}

fn connector(ca: Option<&Path>, insecure: bool) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let cfg = client_config(ca, insecure, rustls::DEFAULT_VERSIONS)?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// The client TLS configuration: trust `ca` (or, with `insecure`, any
/// certificate), offer `versions`, ALPN http/1.1, rustls' default
/// resumption (an in-memory session store).
pub fn client_config(
    ca: Option<&Path>,
    insecure: bool,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?;
    let mut cfg = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        let path = ca.context("wss needs --ca FILE (the CA to trust) or --insecure")?;
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading {}", path.display()))?
        {
            roots.add(cert?)?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Accepts any certificate (`--insecure`), still checking signatures.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Runs hyper's client connection tasks on the current tokio runtime.
pub struct SpawnExecutor;

impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: std::future::Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::spawn(fut);
    }
}

/// Opens the TCP connection from `source`. With `zero_linger`, dropping the
/// connection later sends RST instead of FIN (a client that vanishes).
pub async fn tcp(
    target: &Target,
    source: IpAddr,
    zero_linger: bool,
) -> Result<TcpStream, ErrorKind> {
    let socket = TcpSocket::new_v4().map_err(|_| ErrorKind::Connect)?;
    if zero_linger {
        socket.set_zero_linger().map_err(|_| ErrorKind::Connect)?;
    }
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|_| ErrorKind::Connect)?;
    let stream = socket
        .connect(target.addr)
        .await
        .map_err(|_| ErrorKind::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// What to ask the gateway about session resume.
#[derive(Debug, Clone)]
pub enum ResumeAsk {
    /// A plain session.
    No,
    /// A new resumable session.
    New,
    /// Resume with this credential, having received this many messages.
    Resume(String, u64),
}

/// The gateway's resume answer: the next credential, and how many of our
/// messages it has.
#[derive(Debug, Clone)]
pub struct ResumeAnswer {
    /// Credential for the next resume.
    pub token: String,
    /// Client messages the gateway has received in the session.
    pub received: u64,
}

/// A WebSocket upgrade request for `uri` on `host`, without a body yet.
pub fn upgrade_request(uri: &str, host: &str) -> hyper::http::request::Builder {
    Request::builder()
        .method("GET")
        .uri(uri)
        .header("Host", host)
        .header("Upgrade", "websocket")
        .header("Connection", "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
}

/// TLS (for wss) and the WebSocket upgrade on `stream`.
pub async fn upgrade(target: &Target, stream: TcpStream) -> Result<Ws, ErrorKind> {
    upgrade_resumable(target, stream, &ResumeAsk::No)
        .await
        .map(|(ws, _)| ws)
}

/// Like [`upgrade`], asking for (or resuming) a resumable session. A
/// refused resume (HTTP 410) is [`ErrorKind::ResumeRefused`].
pub async fn upgrade_resumable(
    target: &Target,
    stream: TcpStream,
    ask: &ResumeAsk,
) -> Result<(Ws, Option<ResumeAnswer>), ErrorKind> {
    let mut req = upgrade_request(
        &target.path,
        &format!("{}:{}", target.host, target.addr.port()),
    );
    match ask {
        ResumeAsk::No => {}
        ResumeAsk::New => req = req.header("X-Wsgw-Resume", "new"),
        ResumeAsk::Resume(token, received) => {
            req = req
                .header("X-Wsgw-Resume", token.as_str())
                .header("X-Wsgw-Received", received.to_string());
        }
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|_| ErrorKind::Handshake)?;
    let ws = match &target.tls {
        None => fastwebsockets::handshake::client(&SpawnExecutor, req, stream).await,
        Some(connector) => {
            let name = ServerName::try_from(target.host.clone()).map_err(|_| ErrorKind::Tls)?;
            let tls = connector
                .connect(name, stream)
                .await
                .map_err(|_| ErrorKind::Tls)?;
            fastwebsockets::handshake::client(&SpawnExecutor, req, tls).await
        }
    };
    let (mut ws, resp) = ws.map_err(|e| match e {
        fastwebsockets::WebSocketError::InvalidStatusCode(410) => ErrorKind::ResumeRefused,
        _ => ErrorKind::Handshake,
    })?;
    // Large messages are the point of some runs; the gateway enforces its
    // own limit.
    ws.set_max_message_size(64 << 20);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let answer = match (
        header("x-wsgw-resume"),
        header("x-wsgw-received").and_then(|r| r.parse().ok()),
    ) {
        (Some(token), Some(received)) => Some(ResumeAnswer { token, received }),
        _ => None,
    };
    Ok((ws, answer))
}

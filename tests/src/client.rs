//! A WebSocket client over real TCP and TLS (fastwebsockets + rustls), and a
//! minimal HTTP GET.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload, WebSocket};
use http_body_util::{BodyExt, Empty};
use hyper::upgrade::Upgraded;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub type Ws = WebSocket<TokioIo<Upgraded>>;

use loadtest::run::conn::SpawnExecutor;

/// TLS client configuration trusting exactly the CA in `ca`.
pub fn tls_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    tls_config_versions(ca, rustls::DEFAULT_VERSIONS)
}

/// Like [`tls_config`], offering only `versions`. Each configuration has
/// its own TLS session store (rustls' default), as one phone would.
pub fn tls_config_versions(
    ca: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A TLS handshake (no WebSocket) with `addr` as `localhost`.
pub async fn tls_connect(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tls_over(tcp, cfg).await
}

/// A TLS handshake as `localhost` over an open TCP connection.
pub async fn tls_over(
    tcp: TcpStream,
    cfg: &Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Options of one connection.
#[derive(Default, Clone)]
pub struct Connect<'a> {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub headers: Vec<(&'a str, String)>,
}

impl Connect<'_> {
    /// Asks for a resumable session (`"new"`) or resumes one (a token).
    pub fn resume(value: impl Into<String>) -> Self {
        Self {
            headers: vec![("X-Wsgw-Resume", value.into())],
            ..Self::default()
        }
    }
}

/// Connects to `addr` and upgrades at `path_and_query`. Returns the
/// socket and the 101 response, or the HTTP status of a refusal.
pub async fn connect(
    addr: SocketAddr,
    path_and_query: &str,
    opts: &Connect<'_>,
) -> Result<(Ws, Response<hyper::body::Incoming>), fastwebsockets::WebSocketError> {
    let tcp = TcpStream::connect(addr).await?;
    let mut req = loadtest::run::conn::upgrade_request(
        &format!("http://localhost:{}{path_and_query}", addr.port()),
        &format!("localhost:{}", addr.port()),
    );
    for (k, v) in &opts.headers {
        req = req.header(*k, v);
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    match &opts.tls {
        None => handshake(req, tcp).await,
        Some(cfg) => {
            let connector = tokio_rustls::TlsConnector::from(cfg.clone());
            let tls = connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await?;
            handshake(req, tls).await
        }
    }
}

async fn handshake<S>(
    req: Request<Empty<Bytes>>,
    s: S,
) -> Result<(Ws, Response<hyper::body::Incoming>), fastwebsockets::WebSocketError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    fastwebsockets::handshake::client(&SpawnExecutor, req, s).await
}

/// Opens a resumable session at `addr` (`resume`: None), or resumes one
/// (its token and the messages received): the client, the new credential
/// and the gateway's count of client messages received (`X-Wsgw-Received`);
/// or the HTTP status of a refusal.
pub async fn resumable(
    addr: SocketAddr,
    resume: Option<(&str, u64)>,
) -> Result<(Client, String, u64), u16> {
    let mut headers = vec![];
    match resume {
        None => headers.push(("X-Wsgw-Resume", "new".to_owned())),
        Some((token, received)) => {
            headers.push(("X-Wsgw-Resume", token.to_owned()));
            headers.push(("X-Wsgw-Received", received.to_string()));
        }
    }
    let opts = Connect {
        headers,
        ..Connect::default()
    };
    match connect(addr, "/ws", &opts).await {
        Ok((ws, resp)) => {
            let h = |name: &str| resp.headers()[name].to_str().unwrap().to_owned();
            Ok((
                Client::from_ws(ws),
                h("x-wsgw-resume"),
                h("x-wsgw-received").parse().unwrap(),
            ))
        }
        Err(fastwebsockets::WebSocketError::InvalidStatusCode(code)) => Err(code),
        Err(e) => panic!("connect: {e}"),
    }
}

/// A received message or close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Text(String),
    Binary(Vec<u8>),
    Close(u16, String),
}

/// A connected client that reassembles messages and answers pings.
pub struct Client {
    pub ws: FragmentCollector<TokioIo<Upgraded>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr, path: &str, opts: &Connect<'_>) -> Self {
        let (ws, _) = connect(addr, path, opts).await.expect("connect");
        Self::from_ws(ws)
    }

    pub fn from_ws(mut ws: Ws) -> Self {
        // Tests exercise the gateway's limits, not the client's.
        ws.set_max_message_size(64 << 20);
        Self {
            ws: FragmentCollector::new(ws),
        }
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws
            .write_frame(Frame::text(Payload::Owned(s.as_bytes().to_vec())))
            .await
            .unwrap();
    }

    pub async fn send_binary(&mut self, b: &[u8]) {
        self.ws
            .write_frame(Frame::binary(Payload::Owned(b.to_vec())))
            .await
            .unwrap();
    }

    /// Sends `text` and expects it back (through an echo backend).
    pub async fn echo(&mut self, text: &str) {
        self.send_text(text).await;
        assert_eq!(
            self.recv_within(Duration::from_secs(10)).await,
            Some(Msg::Text(text.to_owned()))
        );
    }

    /// Next message, or `None` if the connection ended without a close.
    pub async fn recv(&mut self) -> Option<Msg> {
        let f = self.ws.read_frame().await.ok()?;
        Some(match f.opcode {
            OpCode::Text => Msg::Text(String::from_utf8(f.payload.to_vec()).unwrap()),
            OpCode::Binary => Msg::Binary(f.payload.to_vec()),
            OpCode::Close => {
                let p = f.payload.to_vec();
                let code = if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    1005
                };
                Msg::Close(
                    code,
                    String::from_utf8_lossy(p.get(2..).unwrap_or(&[])).into_owned(),
                )
            }
            other => panic!("unexpected {other:?}"),
        })
    }

    /// Next message within `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Option<Msg> {
        tokio::time::timeout(limit, self.recv())
            .await
            .expect("no message in time")
    }

    /// Waits for the close frame (skipping messages) and returns its code.
    pub async fn expect_close(&mut self, limit: Duration) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.recv()).await {
                Err(_) => panic!("no close within {limit:?}"),
                Ok(None) => panic!("connection ended without a close frame"),
                Ok(Some(Msg::Close(c, r))) => return (c, r),
                Ok(Some(_)) => {}
            }
        }
    }
}

/// A plain HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header("Host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

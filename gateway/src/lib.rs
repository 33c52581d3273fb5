//! A secure WebSocket gateway in front of a length-delimited protobuf TCP
//! backend.
//!
//! # The data path, in the order a message travels
//!
//! 1. **accept** ([`listener`]): the accept loop takes a TCP connection and
//!    spawns its task; nothing else.
//! 2. **TLS** ([`listener`], [`tls`]): the handshake runs in that task under
//!    `listen.tls_handshake_timeout`.
//! 3. **upgrade** ([`upgrade`]): hyper reads the HTTP/1.1 request under
//!    `listen.http_header_timeout`; the gateway checks path, admission
//!    (session cap) and that a backend link is up, picks the subprotocol,
//!    answers 101 and spawns the session.
//! 4. **session** ([`session`]): one task per client. A client message
//!    (fragments reassembled, size capped, UTF-8 checked) becomes a `Data`
//!    frame queued on the session's link; a backend frame arriving in the
//!    session's mailbox becomes a WebSocket message of the same type.
//! 5. **backend link** ([`link`], [`pool`]): a driver task per link owns the
//!    TCP socket and the map of its sessions; it batches frames into writes
//!    and routes each backend frame to its session's mailbox.
//!
//! Connection phases have their own types: `TcpStream` -> `TlsStream` ->
//! `WebSocket` -> the session task. Every way a session ends maps through
//! [`close::CloseReason`] to a close code, a backend `SessionClose`, a metric
//! label and a log level.
#![warn(missing_docs)]

mod admin;
mod backend;
pub mod close;
pub mod config;
mod listener;
mod metrics;
mod resume;
mod session;
pub mod tls;
mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::HeaderName;
use protocol::FrameCodec;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;

/// State shared by listeners, upgrades and sessions.
///
/// # Concurrency
/// Read-only after start-up except for its own synchronised parts: the
/// admission semaphore, the pool (see [`backend::Pool`]), metrics (atomic
/// instruments), the shutdown token and the task tracker.
pub struct Shared {
    config: Config,
    metrics: Arc<metrics::Metrics>,
    pool: Arc<backend::Pool>,
    admission: Arc<Semaphore>,
    /// Fires on shutdown: listeners stop, upgrades are refused.
    shutdown: CancellationToken,
    /// Wakes every session on shutdown, to close with 1001. (Sessions wait
    /// on this rather than on `shutdown`, whose every poll takes a lock.)
    drain: Arc<tokio::sync::Notify>,
    /// Every connection and session task.
    tracker: TaskTracker,
    forward_headers: Vec<HeaderName>,
    /// Resumable sessions by credential.
    resume: resume::Registry,
    /// Gateway-wide accounting of detached sessions.
    detached: resume::DetachedBudget,
}

/// Addresses the gateway actually bound (useful with port 0).
#[derive(Debug, Clone, Default)]
pub struct BoundAddrs {
    /// Plain ws listeners.
    pub ws: Vec<SocketAddr>,
    /// wss listeners.
    pub wss: Vec<SocketAddr>,
    /// Admin listener.
    pub admin: Option<SocketAddr>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The configuration key it came from.
        key: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The metrics exporter.
    #[error("metrics: {0}")]
    Metrics(String),
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    addrs: BoundAddrs,
    links_stop: CancellationToken,
    links: TaskTracker,
    admin_stop: CancellationToken,
}

impl Gateway {
    /// Binds every listener and starts the link pool. Returns once the
    /// listeners accept connections (links come up in the background).
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let metrics =
            Arc::new(metrics::Metrics::new().map_err(|e| StartError::Metrics(e.to_string()))?);
        let tls = if config.listen.wss.is_empty() {
            None
        } else {
            // validate() guarantees both paths are set when wss is used.
            let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
                return Err(StartError::Tls(tls::TlsError::Rustls(
                    rustls::Error::General("tls.cert and tls.key are required".into()),
                )));
            };
            Some(TlsAcceptor::from(tls::server_config(cert, key)?))
        };

        let links_stop = CancellationToken::new();
        let links = TaskTracker::new();
        let b = &config.backend;
        let max_message = config.session.max_message_size.bytes();
        let pool = backend::Pool::start(
            backend::PoolSettings {
                endpoints: b.endpoints.clone(),
                links_per_endpoint: b.links_per_endpoint,
                gateway_id: config.gateway_id(),
                connect_timeout: b.connect_timeout,
                handshake_timeout: b.handshake_timeout,
                reconnect_min: b.reconnect_min,
                reconnect_max: b.reconnect_max,
                link: backend::LinkSettings {
                    codec: FrameCodec::new(b.framing.into(), b.max_frame_size.bytes()),
                    heartbeat_interval: b.heartbeat_interval,
                    heartbeat_timeout: b.heartbeat_timeout,
                    queue_frames: b.link_queue_frames,
                    queue_bytes: b.link_queue_bytes.bytes(),
                    mailbox: backend::MailboxLimits {
                        messages: config.session.client_queue_messages,
                        bytes: config.session.client_queue_bytes.bytes().max(max_message),
                    },
                },
            },
            metrics.clone(),
            &links,
            links_stop.clone(),
        );

        let forward_headers = config
            .session
            .forward_headers
            .iter()
            .filter_map(|h| h.to_ascii_lowercase().parse().ok())
            .collect();
        let shared = Arc::new(Shared {
            admission: Arc::new(Semaphore::new(config.listen.max_sessions)),
            metrics,
            pool,
            shutdown: CancellationToken::new(),
            drain: Arc::new(tokio::sync::Notify::new()),
            tracker: TaskTracker::new(),
            forward_headers,
            resume: resume::Registry::default(),
            detached: resume::DetachedBudget::default(),
            config,
        });

        let mut addrs = BoundAddrs::default();
        let mut bound = Vec::new();
        for (key, list, is_tls) in [
            ("listen.ws", &shared.config.listen.ws, false),
            ("listen.wss", &shared.config.listen.wss, true),
        ] {
            for addr in list {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind {
                        addr: *addr,
                        key,
                        source,
                    })?;
                let local = l.local_addr().map_err(|source| StartError::Bind {
                    addr: *addr,
                    key,
                    source,
                })?;
                if is_tls {
                    addrs.wss.push(local);
                } else {
                    addrs.ws.push(local);
                }
                bound.push((l, is_tls));
            }
        }
        let admin_stop = CancellationToken::new();
        if let Some(addr) = shared.config.admin.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr,
                    key: "admin.listen",
                    source,
                })?;
            addrs.admin = l.local_addr().ok();
            tokio::spawn(admin::serve(l, shared.clone(), admin_stop.clone()));
        }
        for (l, is_tls) in bound {
            let acceptor = if is_tls { tls.clone() } else { None };
            shared
                .tracker
                .spawn(listener::accept_loop(l, acceptor, shared.clone()));
        }
        Ok(Self {
            shared,
            addrs,
            links_stop,
            links,
            admin_stop,
        })
    }

    /// The bound addresses.
    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }

    /// Backend links currently up.
    pub fn links_up(&self) -> usize {
        self.shared.pool.links_up()
    }

    /// Runs until `signal` completes, then drains: stop accepting, close
    /// every session with 1001 (telling the backend), wait for them up to
    /// `shutdown.drain_timeout`, then close the links after they have sent
    /// what was queued.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }

    /// Drains and stops now; see [`Gateway::run_until`].
    pub async fn shutdown(self) {
        let drain = self.shared.config.shutdown.drain_timeout;
        info!(?drain, "shutting down: closing sessions");
        self.shared.shutdown.cancel();
        self.shared.drain.notify_waiters();
        self.shared.tracker.close();
        if tokio::time::timeout(drain, self.shared.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = self.shared.tracker.len(),
                "drain deadline passed; dropping the remaining connections"
            );
        }
        self.links_stop.cancel();
        self.links.close();
        // The links only flush what is already queued.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.links.wait()).await;
        self.admin_stop.cancel();
        info!("stopped");
    }
}

//! A secure WebSocket gateway in front of a length-delimited protobuf TCP
//! backend.
//!
//! # The data path, in the order a message travels
//!
//! 1. **accept** (`listener.rs`): the accept loop takes a TCP connection
//!    and spawns its task; nothing else.
//! 2. **TLS** (`listener.rs`, `tls.rs`): the handshake runs in that task
//!    under `listen.tls_handshake_timeout`, holding one of
//!    `listen.max_handshakes` slots; `certs.rs` picks the certificate by
//!    SNI and reloads the certificates when their files change or on
//!    SIGHUP.
//! 3. **upgrade** (`upgrade.rs`): hyper reads the HTTP/1.1 request under
//!    `listen.http_header_timeout` and the size caps of `handshake.rs`;
//!    the gateway checks path, method, the RFC 6455 handshake
//!    (`handshake.rs`), admission (session cap) and that a backend link is
//!    up, picks the subprotocol, answers 101 and spawns the session.
//! 4. **session** (`session/`): one task per client, a `Session` that owns
//!    its state. `session/connected.rs` is its event loop: a client frame
//!    (`session/client.rs`: fragments reassembled, size capped, UTF-8
//!    checked) becomes a `Data` frame sent on the session's link.
//! 5. **backend link** (`backend/`): `backend/link.rs` queues the frame;
//!    the link's driver (`backend/driver.rs`), the one task owning the TCP
//!    socket, batches frames into writes. Its reader decodes the backend's
//!    frames and routes each to its session's mailbox
//!    (`backend/mailbox.rs`).
//! 6. **back to the client** (`session/deliver.rs`): the session writes the
//!    mailbox's messages to the client, a batch per flush.
//!
//! Connection phases have their own types: `TcpStream` -> `TlsStream` ->
//! `WebSocket` -> `Session`. Every way a session ends maps through
//! `close::CloseReason` to a close code, a backend `SessionClose`, a
//! metric label and a log level.
//!
//! Around the path: `config.rs` (the configuration file, environment and
//! flags), `settings.rs` (the typed settings made from it once),
//! `shutdown.rs` (every spawned task, and the order they stop in),
//! `shared.rs` (what the stages share), `resume.rs` (credentials and the
//! replay ring), `fleet/` (several instances sharing resumable sessions
//! through Redis; the session side is `session/handover.rs`),
//! `metrics.rs` (the instruments), `telemetry.rs` (their export, and each
//! session's trace span) and `admin.rs`.
// No unsafe code here: only the gateway binary has one documented exception
// (jemalloc's options in gateway/src/main.rs), so the workspace lint is deny.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod backend;
mod certs;
mod close;
pub mod config;
mod fleet;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod listener;
mod logs;
mod metrics;
mod refusal;
mod resume;
mod session;
mod settings;
mod shared;
mod shutdown;
pub mod telemetry;
mod tls;
mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

pub use certs::ReloadHandle;
pub use config::{Config, ConfigError};
pub use tls::TlsError;

use settings::Settings;

/// How long a stopping gateway waits for its last metrics and spans to be
/// exported.
const TELEMETRY_FLUSH: Duration = Duration::from_secs(5);
use shared::Shared;
use shutdown::Shutdown;

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
    /// The configuration cannot be turned into settings (TLS files).
    #[error(transparent)]
    Config(#[from] ConfigError),
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
    /// Telemetry could not start (a bad OTLP endpoint or header).
    #[error("telemetry: {0}")]
    Telemetry(#[from] telemetry::TelemetryError),
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    addrs: BoundAddrs,
    drain_timeout: Duration,
    tls_reload: Option<ReloadHandle>,
}

impl Gateway {
    /// Binds every listener and starts the link pool. Returns once the
    /// listeners accept connections (links come up in the background).
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let settings = Settings::from_config(&config)?;
        let telemetry =
            telemetry::Telemetry::start(&config.telemetry, &settings.backend.hello.instance_id)?;
        let metrics = Arc::new(metrics::Metrics::new(&telemetry));
        let shutdown = Shutdown::new();
        // Backend logs name the gateway by these two (its `Hello`).
        tracing::info!(
            gateway_id = settings.backend.hello.gateway_id,
            instance_id = settings.backend.hello.instance_id,
            "gateway starting"
        );
        let fleet = match settings.fleet {
            Some(f) => {
                let instance = settings.backend.hello.instance_id.clone();
                Some(fleet::Fleet::new(f, instance).map_err(|e| {
                    StartError::Config(ConfigError::Invalid {
                        key: "fleet.redis_url",
                        reason: e.to_string(),
                    })
                })?)
            }
            None => None,
        };
        let (fleet, directory, directory_writes) = match fleet {
            Some((f, d, w)) => (Some(f), Some(d), Some(w)),
            None => (None, None, None),
        };
        let pool = backend::Pool::start(settings.backend, metrics.clone(), &shutdown);
        let listeners = bind(&settings.listen).await?;
        let admin = match settings.admin {
            Some(addr) => Some(bind_one(addr, "admin.listen").await?),
            None => None,
        };
        let shared = Arc::new(Shared {
            admission: Arc::new(Semaphore::new(settings.listen.max_sessions)),
            handshakes: Semaphore::new(settings.listen.max_handshakes),
            listen: settings.listen,
            session: settings.session,
            resume: settings.resume,
            metrics,
            telemetry,
            pool,
            shutdown,
            resumable: resume::Registry::new(directory),
            detached: resume::DetachedBudget::default(),
            fleet,
        });
        if let (Some(f), Some(writes)) = (&shared.fleet, directory_writes) {
            f.spawn(&shared, writes);
        }
        let (tls, tls_reload) = match settings.tls {
            Some(t) => {
                let (config, handle) = t.start(shared.metrics.clone(), &shared.shutdown);
                (Some(config), Some(handle))
            }
            None => (None, None),
        };
        shared
            .shutdown
            .spawn_admin(logs::summarise_until(shared.shutdown.admin_stop()));
        let mut addrs = BoundAddrs::default();
        if let Some((l, addr)) = admin {
            addrs.admin = Some(addr);
            let stop = shared.shutdown.admin_stop();
            let task = admin::serve(l, shared.clone(), stop);
            shared.shutdown.spawn_admin(task);
        }
        for (l, addr, is_tls) in listeners {
            let acceptor = match (is_tls, &tls) {
                (true, Some(tls)) => {
                    addrs.wss.push(addr);
                    Some(TlsAcceptor::from(tls.clone()))
                }
                _ => {
                    addrs.ws.push(addr);
                    None
                }
            };
            let task = listener::accept_loop(l, acceptor, shared.clone());
            shared.shutdown.spawn_session(task);
        }
        Ok(Self {
            shared,
            addrs,
            drain_timeout: settings.drain_timeout,
            tls_reload,
        })
    }

    /// What reloads the wss certificates (SIGHUP in the binary); `None`
    /// without wss listeners.
    pub fn tls_reload(&self) -> Option<ReloadHandle> {
        self.tls_reload.clone()
    }

    /// The bound addresses.
    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }

    /// Backend links currently up.
    pub fn links_up(&self) -> usize {
        self.shared.pool.links_up()
    }

    /// A client connection over an in-memory stream of `buffer` bytes each
    /// way instead of a socket: the gateway serves the returned stream's
    /// other end as it would an accepted plain ws connection from `peer`.
    /// For tests that need to control exactly what the client's network
    /// does (stall, fall silent).
    #[doc(hidden)]
    pub fn connect_in_memory(&self, peer: SocketAddr, buffer: usize) -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(buffer);
        let arrival = listener::Arrival::at(tokio::time::Instant::now());
        let task = listener::serve_http(server, peer, self.shared.clone(), arrival);
        self.shared.shutdown.spawn_session(task);
        client
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
        self.shared.shutdown.run(self.drain_timeout).await;
        // The last metrics and the sessions' spans go out before the exit.
        self.shared.telemetry.shutdown(TELEMETRY_FLUSH).await;
    }
}

/// Binds every public listener: (listener, bound address, is wss).
async fn bind(
    listen: &settings::ListenSettings,
) -> Result<Vec<(TcpListener, SocketAddr, bool)>, StartError> {
    let mut bound = Vec::new();
    for (key, list, is_tls) in [
        ("listen.ws", &listen.ws, false),
        ("listen.wss", &listen.wss, true),
    ] {
        for addr in list {
            let err = |source| StartError::Bind {
                addr: *addr,
                key,
                source,
            };
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
            .map_err(err)?;
            // As std's bind does: a restarted gateway can bind at once.
            socket.set_reuseaddr(true).map_err(err)?;
            socket.bind(*addr).map_err(err)?;
            let l = socket.listen(listen.backlog).map_err(err)?;
            let local = l.local_addr().map_err(err)?;
            bound.push((l, local, is_tls));
        }
    }
    Ok(bound)
}

async fn bind_one(
    addr: SocketAddr,
    key: &'static str,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind { addr, key, source };
    let l = TcpListener::bind(addr).await.map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    Ok((l, local))
}

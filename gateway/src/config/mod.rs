//! One typed configuration tree, loaded and validated before the runtime
//! starts.
//!
//! Sources, later ones winning: built-in defaults, the TOML file
//! (`--config`), environment variables `GATEWAY_<SECTION>__<KEY>` (for example
//! `GATEWAY_SESSION__MAX_MESSAGE_SIZE=2MiB`), then command-line flags.
//! Every key is documented in `deploy/gateway.example.toml`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use protocol::Framing;
use serde::{Deserialize, Serialize};

mod load;
pub(crate) mod size;

pub use load::{AdminFlags, BackendFlags, ListenFlags, Overrides, TlsFlags};
pub use size::ByteSize;

/// Extra bytes a backend frame needs beyond the client message it carries:
/// the session id, field tags and length prefixes (at most ~30 bytes), with
/// room for a `SessionOpen` carrying forwarded headers.
pub const FRAME_OVERHEAD: usize = 4096;

/// The longest any duration in the configuration may be. Each is a
/// timeout or a period that is useful in seconds or minutes; a day leaves
/// every plausible value valid, and keeps each far inside what the runtime
/// does with it: `Instant + duration` (which panics on overflow, as in
/// hyper's header timer and the link's heartbeat deadline) and tokio's
/// timers (which cannot wait longer than about two years).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// The most permits a tokio semaphore or bounded channel holds (2^61 - 1):
/// the bound of every count and byte budget the runtime hands to one
/// (`listen.max_sessions`, `listen.max_handshakes`,
/// `backend.link_queue_frames`, `backend.link_queue_bytes`). Tokio panics
/// beyond it.
pub const MAX_PERMITS: usize = tokio::sync::Semaphore::MAX_PERMITS;

/// The most links per endpoint: each is a socket and a task, and the design
/// multiplexes thousands of sessions on each; beyond a few dozen a link
/// pool only costs the backend connections.
pub const MAX_LINKS_PER_ENDPOINT: usize = 1024;

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Public listeners and the WebSocket upgrade.
    pub listen: ListenConfig,
    /// Certificates and keys for the wss listeners.
    pub tls: TlsConfig,
    /// Per-session limits and timers.
    pub session: SessionConfig,
    /// The backend endpoints and the link pool.
    pub backend: BackendConfig,
    /// The admin listener (health, readiness, metrics).
    pub admin: AdminConfig,
    /// Session resume after a lost connection.
    pub resume: ResumeConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Several instances sharing resumable sessions through Redis.
    pub fleet: FleetConfig,
    /// Telemetry export (OTLP metrics and traces).
    pub telemetry: TelemetryConfig,
    /// Logging.
    pub log: LogConfig,
}

/// Session resume: a client whose connection is lost without a close can
/// come back within `grace` and continue with nothing lost or duplicated.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResumeConfig {
    /// Whether clients may ask for resumable sessions.
    pub enabled: bool,
    /// How long a detached session waits for its client.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Retired: the replay buffer is bounded by bytes only. Accepted so
    /// that old configurations still start; ignored, with a warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer_messages: Option<usize>,
    /// Bytes of backend messages kept per session for replay (the most
    /// recent ones; each counts its payload and 64 bytes).
    pub buffer_bytes: ByteSize,
    /// Most sessions detached at once; beyond it a lost connection ends
    /// its session.
    pub max_detached: usize,
    /// Most bytes held for all detached sessions together; a detached
    /// session that would exceed it is lost.
    pub max_detached_bytes: ByteSize,
    /// How long a resume request waits for its session to take it (a
    /// session busy writing to its old connection answers when that write
    /// ends), and then for the resumed connection's upgrade to complete.
    #[serde(with = "humantime_serde")]
    pub handoff_timeout: Duration,
}

impl Default for ResumeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            // Long enough for a tunnel, an elevator or a network handover;
            // short enough that abandoned sessions do not pile up.
            grace: Duration::from_secs(60),
            buffer_messages: None,
            buffer_bytes: ByteSize(256 << 10),
            max_detached: 20_000,
            max_detached_bytes: ByteSize(512 << 20),
            handoff_timeout: Duration::from_secs(10),
        }
    }
}

/// Public listeners and the WebSocket upgrade.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Plain ws listeners (for deployments behind a TLS-terminating balancer).
    pub ws: Vec<SocketAddr>,
    /// wss listeners; need `tls.cert` and `tls.key`.
    pub wss: Vec<SocketAddr>,
    /// Request paths on which the WebSocket upgrade is accepted.
    pub paths: Vec<String>,
    /// Subprotocols the gateway accepts, in the client's order of preference.
    pub subprotocols: Vec<String>,
    /// Refuse clients that offer subprotocols none of which is accepted.
    pub require_subprotocol: bool,
    /// Deadline for the TLS handshake, from TCP accept.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// Deadline for the HTTP request head of the upgrade, from TCP accept or
    /// from the end of the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub http_header_timeout: Duration,
    /// Cap on concurrent sessions; beyond it the upgrade gets HTTP 503.
    pub max_sessions: usize,
    /// Listen backlog of the public listeners: connections the kernel holds
    /// completed before the gateway accepts them. The kernel caps it at
    /// `net.core.somaxconn`.
    pub backlog: u32,
    /// Most TLS handshakes in progress at once; further wss connections
    /// wait for a slot (once their ClientHello starts to arrive) within
    /// `tls_handshake_timeout`.
    pub max_handshakes: usize,
}

/// Certificates and keys for the wss listeners.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file: the certificate chain, leaf first. The default
    /// certificate: served when the client sends no SNI or one that no
    /// certificate is valid for.
    pub cert: Option<PathBuf>,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// How often the certificate and key files are checked for a change
    /// (metadata only: modification time, length, inode, following
    /// symlinks); a change reloads them. 0 turns the check off (SIGHUP
    /// still reloads); below 200ms counts as 200ms.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Further certificates, chosen by the client's SNI: the first
    /// certificate (`tls.cert`, then these in order) valid for the name.
    // Last: serialized, an array of tables must follow the plain keys.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertKeyPair>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            certificates: Vec::new(),
            // A few metadata calls per file each time: 5 s costs nothing
            // and is well inside the days of overlap a renewed certificate
            // has with the one it replaces.
            reload_interval: Duration::from_secs(5),
        }
    }
}

/// One additional certificate chain and its key (`[[tls.certificates]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertKeyPair {
    /// PEM file: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file: the private key.
    pub key: PathBuf,
}

/// Per-session limits and timers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Largest client message after reassembling fragments (close 1009), and
    /// largest backend payload forwarded to a client.
    pub max_message_size: ByteSize,
    /// Retired: the queue towards a client is bounded by bytes only (a
    /// burst of many small messages is not a slow client). Accepted so that
    /// old configurations still start; ignored, with a warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_queue_messages: Option<usize>,
    /// Bytes queued towards one client (each message counts its payload and
    /// 64 bytes) before it is a slow consumer.
    pub client_queue_bytes: ByteSize,
    /// Idle time after which the gateway pings the client.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Time a pinged client has to show any sign of life before it is
    /// dropped as dead.
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// How long a write to the client (a batch of backend messages, a pong,
    /// a replay) may take before the client is judged stalled: a slow
    /// consumer, or for a resumable session a lost connection.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// After the gateway sends a close frame, how long it waits for the
    /// client's close frame before dropping the connection.
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    /// Request headers copied into the backend's `SessionOpen` (lower case).
    pub forward_headers: Vec<String>,
}

/// The backend endpoints and the link pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// Backend addresses ("host:port"); at least one is required.
    pub endpoints: Vec<String>,
    /// Links (TCP connections) to open to each endpoint.
    pub links_per_endpoint: usize,
    /// Length prefix style of the backend protocol.
    #[serde(with = "framing_name")]
    pub framing: Framing,
    /// Largest frame body either side may send on a link.
    pub max_frame_size: ByteSize,
    /// Name sent to the backend in `Hello`; empty means the host name.
    pub gateway_id: String,
    /// TCP connect deadline for one link.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline for the backend's `HelloAck`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Period of the gateway's link heartbeat.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A link from which nothing arrives for this long is dead.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// First reconnect delay after a link fails.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Largest reconnect delay (the delay doubles per failure up to this).
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// How long a link must stay up to count as stable: only then does its
    /// reconnect backoff start again from `reconnect_min`, and new sessions
    /// go to stable links first.
    #[serde(with = "humantime_serde")]
    pub stable_after: Duration,
    /// How long a session whose link was lost waits to continue on another
    /// link, with a backend that adopted protocol version 3's "move"
    /// capability; 0 turns moving off (such sessions end with 1012).
    #[serde(with = "humantime_serde")]
    pub move_timeout: Duration,
    /// Frames queued towards one link before clients on it stop being read.
    pub link_queue_frames: usize,
    /// Bytes queued towards one link before clients on it stop being read.
    pub link_queue_bytes: ByteSize,
}

/// The admin listener.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of `/healthz`, `/readyz` and `/metrics`; none disables it.
    pub listen: Option<SocketAddr>,
}

/// Graceful shutdown.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT, how long sessions get to close before the
    /// gateway exits anyway.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// After SIGTERM/SIGINT, sessions are closed (or, in a fleet, handed
    /// over) one by one at random moments spread over this long, so that
    /// their clients do not all reconnect at once. Must be below
    /// `drain_timeout`.
    #[serde(with = "humantime_serde")]
    pub close_spread: Duration,
}

/// Several gateway instances behind a load balancer, sharing resumable
/// sessions: a resume may reach any instance, which takes the session
/// over from the one that holds it. Off unless `redis_url` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// The Redis (or Valkey) holding the session directory, e.g.
    /// `redis://10.0.0.5:6379/0` (plain TCP: `rediss://` is not built in). Unset: no fleet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key and channel, so that fleets can share a
    /// Redis.
    pub key_prefix: String,
    /// How long a resume waits for another instance to hand its session
    /// over (and for Redis to answer).
    #[serde(with = "humantime_serde")]
    pub handover_timeout: Duration,
    /// How long a session's directory entry outlives an instance that
    /// stopped refreshing it (a crash); refreshed every third of it.
    #[serde(with = "humantime_serde")]
    pub directory_ttl: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            key_prefix: "wsgw".to_owned(),
            handover_timeout: Duration::from_secs(3),
            directory_ttl: Duration::from_secs(120),
        }
    }
}

/// Telemetry export. The Prometheus page on the admin listener is always
/// there; OTLP export of metrics and of session traces is off unless
/// `otlp_endpoint` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `service.name` of the resource every metric and span carries.
    pub service_name: String,
    /// Base URL of an OTLP receiver (an OpenTelemetry Collector, or
    /// Prometheus' own OTLP receiver for metrics), e.g.
    /// `http://127.0.0.1:4317` for gRPC or `http://127.0.0.1:4318` for
    /// HTTP (where `/v1/metrics` and `/v1/traces` are appended). `https://`
    /// uses TLS with the system's trust roots. Unset: no OTLP export.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf`.
    pub otlp_protocol: OtlpProtocol,
    /// Headers sent with every export (gRPC metadata), e.g. an
    /// `authorization` token.
    pub otlp_headers: std::collections::BTreeMap<String, String>,
    /// How long one export may take.
    #[serde(with = "humantime_serde")]
    pub otlp_timeout: Duration,
    /// How often metrics are exported.
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
    /// Whether metrics are exported over OTLP (with `otlp_endpoint`).
    pub otlp_metrics: bool,
    /// The share of sessions traced, 0.0 to 1.0 (with `otlp_endpoint`).
    /// 0 exports no traces.
    pub traces_sample_ratio: f64,
    /// Whether a client's `traceparent` decides instead, when it has one:
    /// its sampled flag is followed (the W3C parent-based rule).
    pub traces_follow_client: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            service_name: "wsgw".to_owned(),
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            otlp_headers: std::collections::BTreeMap::new(),
            otlp_timeout: Duration::from_secs(10),
            metrics_interval: Duration::from_secs(60),
            otlp_metrics: true,
            traces_sample_ratio: 0.01,
            traces_follow_client: true,
        }
    }
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (port 4317 by convention).
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP over HTTP with protobuf bodies (port 4318 by convention).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `info,gateway::link=debug`;
    /// `RUST_LOG` overrides it.
    pub level: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable key=value lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `backend.framing` in the configuration: the protocol crate's
/// [`Framing`], written `"varint"` or `"u32be"`.
mod framing_name {
    use protocol::Framing;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(f: &Framing, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(f)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Framing, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }

    pub(super) fn serialize_some<S: Serializer>(
        f: &Option<Framing>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match f {
            Some(f) => s.collect_str(f),
            None => s.serialize_none(),
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            ws: Vec::new(),
            wss: Vec::new(),
            paths: vec!["/ws".to_owned()],
            subprotocols: Vec::new(),
            require_subprotocol: false,
            // A mobile TLS handshake over a poor link takes a few round
            // trips of up to ~1 s each; 10 s leaves room without letting
            // idle sockets pile up.
            tls_handshake_timeout: Duration::from_secs(10),
            http_header_timeout: Duration::from_secs(10),
            // The box caps a process at 20,000 open files; leave room for
            // links, listeners and the admin port.
            max_sessions: 19_000,
            // A reconnect storm (every phone after a deploy) arrives at once;
            // 128 made the kernel drop SYNs at 3,000 simultaneous connects.
            // 4096 is Linux's default somaxconn since 5.4.
            backlog: 4096,
            // A slot is held for about one client round trip, so the cap is
            // also a rate limit of max_handshakes / RTT: 256 allows ~850/s
            // at 300 ms and ~2,500/s at 100 ms, about what two cores can
            // handshake (BENCHMARKS.md, "Reconnect storms"), while bounding
            // the handshake work queued at once.
            max_handshakes: 256,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_message_size: ByteSize(1 << 20),
            client_queue_messages: None,
            client_queue_bytes: ByteSize(4 << 20),
            // Carrier NATs drop idle flows after 30 s to a few minutes; a
            // 20 s ping keeps them open and finds dead phones within 40 s.
            ping_interval: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(20),
            // As long as a ping may take to be answered: a client that cannot
            // take a write for that long would be judged dead anyway.
            write_timeout: Duration::from_secs(20),
            close_timeout: Duration::from_secs(2),
            forward_headers: vec!["user-agent".to_owned(), "x-request-id".to_owned()],
        }
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            links_per_endpoint: 2,
            framing: Framing::Varint,
            max_frame_size: ByteSize((1 << 20) + FRAME_OVERHEAD as u64),
            gateway_id: String::new(),
            connect_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(15),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            // Two heartbeat timeouts: a link that lasts that long has seen
            // its backend answer several heartbeats.
            stable_after: Duration::from_secs(30),
            // Covers a link's reconnect (backoff 50-100 ms after a stable
            // link) and a backend restart of a few seconds.
            move_timeout: Duration::from_secs(10),
            // Enough to absorb a burst from a few thousand clients while the
            // backend catches up; the byte bound below is what caps memory.
            link_queue_frames: 8192,
            link_queue_bytes: ByteSize(16 << 20),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(10),
            close_spread: Duration::ZERO,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, environment or flags could not be parsed into the tree.
    #[error("{0}")]
    Parse(#[from] Box<figment::Error>),
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A value parsed but is not usable.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid {
        /// Dotted key, e.g. `session.max_message_size`.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

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

use figment::providers::{Env, Format, Serialized, Toml};
use figment::{Figment, Provider};
use protocol::Framing;
use serde::{Deserialize, Serialize};

/// Extra bytes a backend frame needs beyond the client message it carries:
/// the session id, field tags and length prefixes (at most ~30 bytes), with
/// room for a `SessionOpen` carrying forwarded headers.
pub const FRAME_OVERHEAD: usize = 4096;

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Public listeners and the WebSocket upgrade.
    pub listen: ListenConfig,
    /// Certificate and key for the wss listeners.
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
    /// Backend messages kept per session for replay (the most recent ones).
    pub buffer_messages: usize,
    /// Bytes of backend messages kept per session for replay.
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
            buffer_messages: 256,
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
}

/// Certificate and key for the wss listeners.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file: the certificate chain, leaf first.
    pub cert: Option<PathBuf>,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

/// Per-session limits and timers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Largest client message after reassembling fragments (close 1009), and
    /// largest backend payload forwarded to a client.
    pub max_message_size: ByteSize,
    /// Messages queued towards one client before it is a slow consumer.
    pub client_queue_messages: usize,
    /// Bytes queued towards one client before it is a slow consumer.
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
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_message_size: ByteSize(1 << 20),
            client_queue_messages: 256,
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

/// A size in bytes: an integer, or a string such as `"64KiB"`, `"1 MiB"`,
/// `"2MB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size as `usize`, saturating on 32-bit targets.
    pub fn bytes(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 65536, \"64KiB\" or \"1MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
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

/// Values given on the command line; each one, when present, overrides the
/// file and the environment. The flags are declared here, once: serialized,
/// this is a partial configuration tree (flags not given are skipped) that
/// is merged over the file and the environment.
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct Overrides {
    /// Listener flags.
    #[command(flatten)]
    pub listen: ListenFlags,
    /// TLS flags.
    #[command(flatten)]
    pub tls: TlsFlags,
    /// Backend flags.
    #[command(flatten)]
    pub backend: BackendFlags,
    /// Admin flags.
    #[command(flatten)]
    pub admin: AdminFlags,
    /// Set any key, e.g. --set session.max_message_size='"2MiB"' (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
    #[serde(skip)]
    pub set: Vec<(String, String)>,
}

/// Flags of the `listen` section.
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct ListenFlags {
    /// Plain ws listener address (repeatable); overrides listen.ws.
    #[arg(long = "listen", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ws: Vec<SocketAddr>,
    /// wss listener address (repeatable); overrides listen.wss.
    #[arg(long = "listen-tls", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub wss: Vec<SocketAddr>,
}

/// Flags of the `tls` section.
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct TlsFlags {
    /// PEM certificate chain for wss; overrides tls.cert.
    #[arg(long = "tls-cert", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key for wss; overrides tls.key.
    #[arg(long = "tls-key", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// Flags of the `backend` section.
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct BackendFlags {
    /// Backend endpoint host:port (repeatable); overrides backend.endpoints.
    #[arg(long = "backend", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Links per backend endpoint; overrides backend.links_per_endpoint.
    #[arg(long = "links", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub links_per_endpoint: Option<usize>,
    /// Backend framing, varint or u32be; overrides backend.framing.
    #[arg(long = "framing", value_name = "STYLE")]
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "framing_name::serialize_some"
    )]
    pub framing: Option<Framing>,
}

/// Flags of the `admin` section.
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct AdminFlags {
    /// Admin listener address (/healthz, /readyz, /metrics); overrides admin.listen.
    #[arg(long = "admin", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

fn parse_set(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

impl Config {
    /// Loads defaults, then `file`, then `GATEWAY_*` variables, then
    /// `overrides`, and validates the result.
    pub fn load(
        file: Option<&std::path::Path>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Invalid {
                    key: "--config",
                    reason: format!("file {} does not exist", path.display()),
                });
            }
            fig = fig.merge(Toml::file(path));
        }
        // GATEWAY_CONFIG names the file (a flag's environment form), not a key.
        fig = fig.merge(Env::prefixed("GATEWAY_").ignore(&["CONFIG"]).split("__"));
        fig = apply_overrides(fig, overrides);
        let config: Config = fig.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks cross-field rules that types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                reason: reason.into(),
            }
        }
        if self.listen.ws.is_empty() && self.listen.wss.is_empty() {
            return Err(invalid(
                "listen",
                "no listener: set listen.ws and/or listen.wss (or --listen / --listen-tls)",
            ));
        }
        if !self.listen.wss.is_empty() {
            if self.tls.cert.is_none() {
                return Err(invalid(
                    "tls.cert",
                    "required by listen.wss (or --tls-cert)",
                ));
            }
            if self.tls.key.is_none() {
                return Err(invalid("tls.key", "required by listen.wss (or --tls-key)"));
            }
        }
        if self.listen.paths.is_empty() {
            return Err(invalid("listen.paths", "at least one path is required"));
        }
        if let Some(p) = self.listen.paths.iter().find(|p| !p.starts_with('/')) {
            return Err(invalid(
                "listen.paths",
                format!("{p:?} must start with '/'"),
            ));
        }
        if self.listen.max_sessions == 0 {
            return Err(invalid("listen.max_sessions", "must be at least 1"));
        }
        if self.backend.endpoints.is_empty() {
            return Err(invalid(
                "backend.endpoints",
                "at least one backend endpoint is required (or --backend)",
            ));
        }
        if self.backend.links_per_endpoint == 0 {
            return Err(invalid("backend.links_per_endpoint", "must be at least 1"));
        }
        let max_msg = self.session.max_message_size.bytes();
        if max_msg == 0 {
            return Err(invalid(
                "session.max_message_size",
                "must be at least 1 byte",
            ));
        }
        if self.backend.max_frame_size.bytes() < max_msg.saturating_add(FRAME_OVERHEAD) {
            return Err(invalid(
                "backend.max_frame_size",
                format!(
                    "must be at least session.max_message_size + {FRAME_OVERHEAD} = {}",
                    max_msg.saturating_add(FRAME_OVERHEAD)
                ),
            ));
        }
        if self.backend.framing == Framing::U32Be
            && self.backend.max_frame_size.0 > u64::from(u32::MAX)
        {
            return Err(invalid(
                "backend.max_frame_size",
                "must fit in 32 bits with u32be framing",
            ));
        }
        if self.backend.link_queue_frames == 0 {
            return Err(invalid("backend.link_queue_frames", "must be at least 1"));
        }
        // A single message must always fit in the link's byte budget, or a
        // session sending it would wait forever.
        if self.backend.link_queue_bytes.bytes() < self.backend.max_frame_size.bytes() {
            return Err(invalid(
                "backend.link_queue_bytes",
                "must be at least backend.max_frame_size",
            ));
        }
        if u32::try_from(self.backend.max_frame_size.0).is_err() {
            return Err(invalid("backend.max_frame_size", "must be below 4 GiB"));
        }
        if self.resume.enabled {
            if self.resume.grace.is_zero() {
                return Err(invalid("resume.grace", "must be greater than zero"));
            }
            if self.resume.buffer_messages == 0 {
                return Err(invalid("resume.buffer_messages", "must be at least 1"));
            }
        }
        if self.session.client_queue_messages == 0 {
            return Err(invalid(
                "session.client_queue_messages",
                "must be at least 1",
            ));
        }
        if self.session.client_queue_bytes.bytes() < max_msg {
            return Err(invalid(
                "session.client_queue_bytes",
                "must be at least session.max_message_size",
            ));
        }
        for (key, d) in [
            ("session.ping_interval", self.session.ping_interval),
            ("session.ping_timeout", self.session.ping_timeout),
            ("session.write_timeout", self.session.write_timeout),
            ("resume.handoff_timeout", self.resume.handoff_timeout),
            (
                "backend.heartbeat_interval",
                self.backend.heartbeat_interval,
            ),
            ("backend.heartbeat_timeout", self.backend.heartbeat_timeout),
            ("backend.connect_timeout", self.backend.connect_timeout),
            ("backend.handshake_timeout", self.backend.handshake_timeout),
            (
                "listen.tls_handshake_timeout",
                self.listen.tls_handshake_timeout,
            ),
            (
                "listen.http_header_timeout",
                self.listen.http_header_timeout,
            ),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        if self.backend.heartbeat_timeout <= self.backend.heartbeat_interval {
            return Err(invalid(
                "backend.heartbeat_timeout",
                "must be longer than backend.heartbeat_interval",
            ));
        }
        if self.backend.reconnect_max < self.backend.reconnect_min {
            return Err(invalid(
                "backend.reconnect_max",
                "must be at least backend.reconnect_min",
            ));
        }
        if let Some(h) = self
            .session
            .forward_headers
            .iter()
            .find(|h| h.parse::<hyper::header::HeaderName>().is_err())
        {
            return Err(invalid(
                "session.forward_headers",
                format!("{h:?} is not a header name"),
            ));
        }
        Ok(())
    }

    /// The name sent to the backend in `Hello`.
    pub fn gateway_id(&self) -> String {
        if !self.backend.gateway_id.is_empty() {
            return self.backend.gateway_id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "gateway".to_owned())
    }
}

fn apply_overrides(mut fig: Figment, o: &Overrides) -> Figment {
    fig = fig.merge(Serialized::defaults(o));
    for (key, value) in &o.set {
        // `--set` values use TOML syntax; a bare word is taken as a string.
        let toml = format!("{key} = {value}");
        fig = match Toml::string(&toml).nested().data() {
            Ok(_) => fig.merge(Toml::string(&toml)),
            Err(_) => fig.merge(Serialized::default(key, value)),
        };
    }
    fig
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn base() -> Overrides {
        let mut o = Overrides::default();
        o.listen.ws = vec!["127.0.0.1:0".parse().unwrap()];
        o.backend.endpoints = vec!["127.0.0.1:9000".to_owned()];
        o
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1 MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("2MB").unwrap(), 2_000_000);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn flags_alone_are_enough() {
        let c = Config::load(None, &base()).unwrap();
        assert_eq!(c.backend.endpoints, vec!["127.0.0.1:9000"]);
        assert_eq!(c.backend.links_per_endpoint, 2);
    }

    #[test]
    fn every_flag_lands_on_its_key() {
        let mut o = base();
        o.listen.wss = vec!["127.0.0.1:8443".parse().unwrap()];
        o.tls.cert = Some("c.pem".into());
        o.tls.key = Some("k.pem".into());
        o.backend.links_per_endpoint = Some(5);
        o.backend.framing = Some(Framing::U32Be);
        o.admin.listen = Some("127.0.0.1:9999".parse().unwrap());
        let c = Config::load(None, &o).unwrap();
        assert_eq!(c.listen.ws, o.listen.ws);
        assert_eq!(c.listen.wss, o.listen.wss);
        assert_eq!(c.tls.cert.as_deref(), Some(std::path::Path::new("c.pem")));
        assert_eq!(c.tls.key.as_deref(), Some(std::path::Path::new("k.pem")));
        assert_eq!(c.backend.endpoints, vec!["127.0.0.1:9000"]);
        assert_eq!(c.backend.links_per_endpoint, 5);
        assert_eq!(c.backend.framing, Framing::U32Be);
        assert_eq!(c.admin.listen, o.admin.listen);
        // Flags not given leave the defaults alone.
        assert_eq!(c.listen.paths, vec!["/ws"]);
    }

    #[test]
    fn set_overrides_any_key() {
        let mut o = base();
        o.set = vec![
            ("session.max_message_size".into(), "\"64KiB\"".into()),
            ("session.ping_interval".into(), "\"5s\"".into()),
            ("backend.links_per_endpoint".into(), "3".into()),
        ];
        let c = Config::load(None, &o).unwrap();
        assert_eq!(c.session.max_message_size, ByteSize(65536));
        assert_eq!(c.session.ping_interval, Duration::from_secs(5));
        assert_eq!(c.backend.links_per_endpoint, 3);
    }

    #[test]
    fn errors_name_the_key() {
        let mut o = base();
        o.set = vec![("session.max_message_size".into(), "\"lots\"".into())];
        let e = Config::load(None, &o).unwrap_err().to_string();
        assert!(e.contains("max_message_size"), "{e}");

        let mut o = base();
        o.backend.endpoints.clear();
        let e = Config::load(None, &o).unwrap_err().to_string();
        assert!(e.contains("backend.endpoints"), "{e}");

        let mut o = base();
        o.set = vec![("session.bogus_key".into(), "1".into())];
        let e = Config::load(None, &o).unwrap_err().to_string();
        assert!(e.contains("bogus_key"), "{e}");

        let mut o = base();
        o.listen.wss = vec!["127.0.0.1:0".parse().unwrap()];
        let e = Config::load(None, &o).unwrap_err().to_string();
        assert!(e.contains("tls.cert"), "{e}");
    }

    #[test]
    fn example_file_is_valid_and_complete() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        // Parses with every section present and no unknown key.
        let fig = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(&text));
        let c: Config = fig.extract().unwrap();
        c.validate().unwrap();
        // Every key of the tree appears in the example file.
        let tree = serde_json_keys(&Config::default());
        for key in tree {
            let leaf = key.rsplit('.').next().unwrap();
            assert!(
                text.contains(&format!("{leaf} =")) || text.contains(&format!("# {leaf} =")),
                "{key} is not documented in the example file"
            );
        }
    }

    fn serde_json_keys(c: &Config) -> Vec<String> {
        let v = figment::value::Value::serialize(c).unwrap();
        let mut out = Vec::new();
        fn walk(prefix: &str, v: &figment::value::Value, out: &mut Vec<String>) {
            if let Some(d) = v.as_dict() {
                for (k, v) in d {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    if v.as_dict().is_some() {
                        walk(&key, v, out);
                    } else {
                        out.push(key);
                    }
                }
            }
        }
        walk("", &v, &mut out);
        out
    }
}

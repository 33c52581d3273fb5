//! Loading the configuration: defaults, the file, the environment, then
//! the command-line flags (declared here, once), and validation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::{Figment, Provider};
use protocol::Framing;
use serde::Serialize;

use super::{
    framing_name, Config, ConfigError, OtlpProtocol, FRAME_OVERHEAD, MAX_DURATION,
    MAX_LINKS_PER_ENDPOINT, MAX_PERMITS,
};

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

    /// What is set but has no effect: retired keys. Logged at start and by
    /// `--check-config`.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.session.client_queue_messages.is_some() {
            out.push(
                "session.client_queue_messages is retired and ignored: the queue towards a \
                 client is bounded by session.client_queue_bytes only (each message counts \
                 its payload and 64 bytes)"
                    .to_owned(),
            );
        }
        if self.resume.buffer_messages.is_some() {
            out.push(
                "resume.buffer_messages is retired and ignored: the replay buffer is bounded \
                 by resume.buffer_bytes only (each message counts its payload and 64 bytes)"
                    .to_owned(),
            );
        }
        out
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
        } else if !self.tls.certificates.is_empty() {
            return Err(invalid(
                "tls.certificates",
                "set without listen.wss: no listener would serve them",
            ));
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
        if self.listen.backlog == 0 {
            return Err(invalid("listen.backlog", "must be at least 1"));
        }
        if self.listen.max_handshakes == 0 {
            return Err(invalid("listen.max_handshakes", "must be at least 1"));
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
        if self.resume.enabled && self.resume.grace.is_zero() {
            return Err(invalid("resume.grace", "must be greater than zero"));
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
        for (key, d) in self.durations() {
            if d > MAX_DURATION {
                return Err(invalid(
                    key,
                    format!(
                        "must be at most {}",
                        humantime_serde::re::humantime::format_duration(MAX_DURATION)
                    ),
                ));
            }
        }
        for (key, n) in [
            ("listen.max_sessions", self.listen.max_sessions),
            ("listen.max_handshakes", self.listen.max_handshakes),
            ("backend.link_queue_frames", self.backend.link_queue_frames),
            (
                "backend.link_queue_bytes",
                self.backend.link_queue_bytes.bytes(),
            ),
        ] {
            if n > MAX_PERMITS {
                return Err(invalid(key, format!("must be at most {MAX_PERMITS}")));
            }
        }
        if self.backend.links_per_endpoint > MAX_LINKS_PER_ENDPOINT {
            return Err(invalid(
                "backend.links_per_endpoint",
                format!("must be at most {MAX_LINKS_PER_ENDPOINT}"),
            ));
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
        if !self.shutdown.close_spread.is_zero()
            && self.shutdown.close_spread >= self.shutdown.drain_timeout
        {
            return Err(invalid(
                "shutdown.close_spread",
                "must be shorter than shutdown.drain_timeout",
            ));
        }
        if let Some(url) = &self.fleet.redis_url {
            if let Err(e) = redis::Client::open(url.as_str()) {
                return Err(invalid("fleet.redis_url", e.to_string()));
            }
            let f = &self.fleet;
            if f.handover_timeout < Duration::from_secs(1)
                || f.handover_timeout > Duration::from_secs(60)
            {
                return Err(invalid(
                    "fleet.handover_timeout",
                    "must be between 1s and 60s",
                ));
            }
            if f.directory_ttl < Duration::from_secs(3)
                || f.directory_ttl > Duration::from_secs(86_400)
            {
                return Err(invalid("fleet.directory_ttl", "must be between 3s and 24h"));
            }
            if f.key_prefix.is_empty() || f.key_prefix.contains(char::is_whitespace) {
                return Err(invalid(
                    "fleet.key_prefix",
                    "must be non-empty, without spaces",
                ));
            }
            if !self.resume.enabled {
                return Err(invalid(
                    "fleet.redis_url",
                    "a fleet shares resumable sessions: resume.enabled must be true",
                ));
            }
        }
        self.validate_telemetry()?;
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

    /// Every duration in the configuration, by key: each is bounded by
    /// [`MAX_DURATION`].
    pub fn durations(&self) -> [(&'static str, Duration); 23] {
        let (l, s, b) = (&self.listen, &self.session, &self.backend);
        [
            ("listen.tls_handshake_timeout", l.tls_handshake_timeout),
            ("tls.reload_interval", self.tls.reload_interval),
            ("listen.http_header_timeout", l.http_header_timeout),
            ("session.ping_interval", s.ping_interval),
            ("session.ping_timeout", s.ping_timeout),
            ("session.write_timeout", s.write_timeout),
            ("session.close_timeout", s.close_timeout),
            ("backend.connect_timeout", b.connect_timeout),
            ("backend.handshake_timeout", b.handshake_timeout),
            ("backend.heartbeat_interval", b.heartbeat_interval),
            ("backend.heartbeat_timeout", b.heartbeat_timeout),
            ("backend.reconnect_min", b.reconnect_min),
            ("backend.reconnect_max", b.reconnect_max),
            ("backend.stable_after", b.stable_after),
            ("backend.move_timeout", b.move_timeout),
            ("resume.grace", self.resume.grace),
            ("telemetry.otlp_timeout", self.telemetry.otlp_timeout),
            (
                "telemetry.metrics_interval",
                self.telemetry.metrics_interval,
            ),
            ("resume.handoff_timeout", self.resume.handoff_timeout),
            ("shutdown.drain_timeout", self.shutdown.drain_timeout),
            ("shutdown.close_spread", self.shutdown.close_spread),
            ("fleet.handover_timeout", self.fleet.handover_timeout),
            ("fleet.directory_ttl", self.fleet.directory_ttl),
        ]
    }

    fn validate_telemetry(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                reason: reason.into(),
            }
        }
        let t = &self.telemetry;
        if t.service_name.trim().is_empty() {
            return Err(bad("telemetry.service_name", "must not be empty"));
        }
        if !(0.0..=1.0).contains(&t.traces_sample_ratio) {
            return Err(bad(
                "telemetry.traces_sample_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        if t.metrics_interval < Duration::from_millis(100) {
            return Err(bad("telemetry.metrics_interval", "must be at least 100ms"));
        }
        if t.otlp_timeout.is_zero() {
            return Err(bad("telemetry.otlp_timeout", "must be more than 0"));
        }
        if let Some(url) = &t.otlp_endpoint {
            let ok = url
                .parse::<hyper::Uri>()
                .ok()
                .filter(|u| matches!(u.scheme_str(), Some("http" | "https")))
                .is_some_and(|u| u.host().is_some());
            if !ok {
                return Err(bad(
                    "telemetry.otlp_endpoint",
                    "must be an http:// or https:// URL with a host",
                ));
            }
            if url.starts_with("https://") && t.otlp_protocol == OtlpProtocol::HttpProtobuf {
                return Err(bad(
                    "telemetry.otlp_endpoint",
                    "https:// needs otlp_protocol = \"grpc\" (the HTTP exporter is built \
                     without TLS); or send to a local collector over http://",
                ));
            }
        }
        for (name, value) in &t.otlp_headers {
            let name_ok = hyper::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
                && name.bytes().all(|b| !b.is_ascii_uppercase());
            if !name_ok || hyper::header::HeaderValue::from_str(value).is_err() {
                return Err(bad(
                    "telemetry.otlp_headers",
                    format!("{name:?}: not a valid lower-case header name and value"),
                ));
            }
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
#[path = "tests.rs"]
mod tests;

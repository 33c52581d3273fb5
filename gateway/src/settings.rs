//! Runtime settings: the validated configuration turned, once, into the
//! typed values each component uses (certificate and key loaded together,
//! header names parsed, the protocol crate's framing, the gateway id
//! resolved). Each component receives its own piece by value; nothing
//! re-derives a fact from the raw configuration.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::header::HeaderName;
use protocol::{pb, FrameCodec};

use crate::backend::{LinkSettings, MailboxLimits, PoolSettings};
use crate::certs::TlsSettings;
use crate::config::{Config, ConfigError};
use crate::tls::PairFiles;

/// Everything the gateway needs to run.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) listen: ListenSettings,
    /// The wss listeners' certificates, loaded; `None` without wss
    /// listeners.
    pub(crate) tls: Option<TlsSettings>,
    pub(crate) session: SessionSettings,
    pub(crate) resume: ResumeSettings,
    pub(crate) backend: PoolSettings,
    /// The admin listener's address, if any.
    pub(crate) admin: Option<SocketAddr>,
    /// How long sessions get to close after SIGTERM/SIGINT.
    pub(crate) drain_timeout: Duration,
    /// The fleet, if `fleet.redis_url` is set.
    pub(crate) fleet: Option<crate::fleet::FleetSettings>,
}

/// Public listeners and the upgrade.
#[derive(Debug, Clone)]
pub(crate) struct ListenSettings {
    pub(crate) ws: Vec<SocketAddr>,
    pub(crate) wss: Vec<SocketAddr>,
    pub(crate) paths: Vec<String>,
    pub(crate) subprotocols: Vec<String>,
    pub(crate) require_subprotocol: bool,
    pub(crate) tls_handshake_timeout: Duration,
    pub(crate) http_header_timeout: Duration,
    pub(crate) max_sessions: usize,
    pub(crate) backlog: u32,
    pub(crate) max_handshakes: usize,
}

/// Per-session limits and timers.
#[derive(Debug, Clone)]
pub(crate) struct SessionSettings {
    /// Largest message either way, after reassembly.
    pub(crate) max_message: usize,
    pub(crate) ping_interval: Duration,
    pub(crate) ping_timeout: Duration,
    /// A client that takes no message (or pong, or replay) for this long
    /// while the gateway writes to it is stalled.
    pub(crate) write_timeout: Duration,
    /// Bytes queued towards one client (payload + 64 B per message); also
    /// what a detached session keeps of what arrives while it is away.
    pub(crate) client_queue_bytes: usize,
    pub(crate) close_timeout: Duration,
    /// On drain, sessions close at random moments within this.
    pub(crate) close_spread: Duration,
    /// Request headers copied into `SessionOpen`, parsed.
    pub(crate) forward_headers: Vec<HeaderName>,
}

/// Session resume.
#[derive(Debug, Clone)]
pub(crate) struct ResumeSettings {
    pub(crate) enabled: bool,
    pub(crate) grace: Duration,
    pub(crate) buffer_bytes: usize,
    pub(crate) max_detached: usize,
    pub(crate) max_detached_bytes: usize,
    /// How long a resume request may wait for the session to take it, and
    /// the session for the resumed connection's upgrade to complete.
    pub(crate) handoff_timeout: Duration,
}

impl Config {
    /// Checks what [`Config::validate`] cannot: that the settings can be
    /// made, loading every TLS certificate and key.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        Settings::from_config(self).map(drop)
    }
}

impl Settings {
    /// Turns a configuration into settings; loads the TLS certificates and
    /// keys. `config` must have passed [`Config::validate`].
    pub(crate) fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let tls = if config.listen.wss.is_empty() {
            None
        } else {
            let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
                return Err(ConfigError::Invalid {
                    key: "tls.cert",
                    reason: "tls.cert and tls.key are required by listen.wss".into(),
                });
            };
            let default = PairFiles {
                cert: cert.clone(),
                key: key.clone(),
                name: "tls".to_owned(),
            };
            let others = config
                .tls
                .certificates
                .iter()
                .enumerate()
                .map(|(i, p)| PairFiles {
                    cert: p.cert.clone(),
                    key: p.key.clone(),
                    name: format!("tls.certificates[{i}]"),
                });
            let files = std::iter::once(default).chain(others).collect();
            Some(TlsSettings::load(files, config.tls.reload_interval)?)
        };
        let l = &config.listen;
        let s = &config.session;
        let r = &config.resume;
        let b = &config.backend;
        let max_message = s.max_message_size.bytes();
        let forward_headers = s
            .forward_headers
            .iter()
            .map(|h| {
                h.to_ascii_lowercase()
                    .parse()
                    .map_err(|_| ConfigError::Invalid {
                        key: "session.forward_headers",
                        reason: format!("{h:?} is not a header name"),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            listen: ListenSettings {
                ws: l.ws.clone(),
                wss: l.wss.clone(),
                paths: l.paths.clone(),
                subprotocols: l.subprotocols.clone(),
                require_subprotocol: l.require_subprotocol,
                tls_handshake_timeout: l.tls_handshake_timeout,
                http_header_timeout: l.http_header_timeout,
                max_sessions: l.max_sessions,
                backlog: l.backlog,
                max_handshakes: l.max_handshakes,
            },
            tls,
            session: SessionSettings {
                max_message,
                ping_interval: s.ping_interval,
                ping_timeout: s.ping_timeout,
                write_timeout: s.write_timeout,
                client_queue_bytes: s.client_queue_bytes.bytes(),
                close_timeout: s.close_timeout,
                close_spread: config.shutdown.close_spread,
                forward_headers,
            },
            resume: ResumeSettings {
                enabled: r.enabled,
                grace: r.grace,
                buffer_bytes: r.buffer_bytes.bytes(),
                max_detached: r.max_detached,
                max_detached_bytes: r.max_detached_bytes.bytes(),
                handoff_timeout: r.handoff_timeout,
            },
            backend: PoolSettings {
                endpoints: b.endpoints.clone(),
                links_per_endpoint: b.links_per_endpoint,
                hello: pb::Hello {
                    min_version: protocol::MIN_PROTOCOL_VERSION,
                    max_version: protocol::PROTOCOL_VERSION,
                    gateway_id: config.gateway_id(),
                    link_index: 0,
                    instance_id: new_instance_id(),
                    heartbeat_interval_ms: millis(b.heartbeat_interval),
                    heartbeat_timeout_ms: millis(b.heartbeat_timeout),
                    // validate() keeps both below 4 GiB.
                    max_frame_size: u32::try_from(b.max_frame_size.bytes()).unwrap_or(u32::MAX),
                    max_message_size: u32::try_from(max_message).unwrap_or(u32::MAX),
                    client_queue_bytes: u64::try_from(s.client_queue_bytes.bytes())
                        .unwrap_or(u64::MAX),
                    capabilities: offered_capabilities(
                        b.move_timeout,
                        config.fleet.redis_url.is_some(),
                    ),
                    session_window: session_window(s.client_queue_bytes.bytes(), max_message),
                    move_timeout_ms: millis(b.move_timeout),
                },
                connect_timeout: b.connect_timeout,
                handshake_timeout: b.handshake_timeout,
                reconnect_min: b.reconnect_min,
                reconnect_max: b.reconnect_max,
                stable_after: b.stable_after,
                move_timeout: b.move_timeout,
                link: LinkSettings {
                    codec: FrameCodec::new(b.framing, b.max_frame_size.bytes()),
                    heartbeat_interval: b.heartbeat_interval,
                    heartbeat_timeout: b.heartbeat_timeout,
                    queue_frames: b.link_queue_frames,
                    queue_bytes: b.link_queue_bytes.bytes(),
                    mailbox: MailboxLimits {
                        // The window (below), so that a backend within it
                        // always fits.
                        bytes: usize::try_from(session_window(
                            s.client_queue_bytes.bytes(),
                            max_message,
                        ))
                        .unwrap_or(usize::MAX),
                        drain_within: s.write_timeout,
                    },
                    session_window: session_window(s.client_queue_bytes.bytes(), max_message),
                },
            },
            admin: config.admin.listen,
            drain_timeout: config.shutdown.drain_timeout,
            fleet: config
                .fleet
                .redis_url
                .as_ref()
                .map(|url| crate::fleet::FleetSettings {
                    redis_url: url.clone(),
                    prefix: config.fleet.key_prefix.clone(),
                    handover_timeout: config.fleet.handover_timeout,
                    directory_ttl: config.fleet.directory_ttl,
                }),
        })
    }
}

/// A fresh random id for this process, sent as `Hello.instance_id`: 128
/// bits from `rand`'s thread RNG (a CSPRNG seeded by the operating system),
/// as 32 lowercase hex digits. With a host name as `gateway_id` and session
/// ids counting from 1 in every process, this is what keeps
/// (instance, session id) unique across restarts and across gateways
/// sharing a host; 128 bits make a collision between any two processes
/// negligible.
fn new_instance_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The window the gateway grants each session (protocol version 3): its
/// client queue's bound, but never less than one maximal message.
pub(crate) fn session_window(client_queue_bytes: usize, max_message: usize) -> u64 {
    let queue = u64::try_from(client_queue_bytes).unwrap_or(u64::MAX);
    queue.max(protocol::window_cost(max_message))
}

/// The version 3 capabilities this gateway offers: flow control always,
/// moving sessions unless `backend.move_timeout` is 0, and moving them
/// between instances in a fleet.
fn offered_capabilities(move_timeout: Duration, fleet: bool) -> Vec<String> {
    let mut caps = vec![protocol::CAP_FLOW.to_owned()];
    if !move_timeout.is_zero() {
        caps.push(protocol::CAP_MOVE.to_owned());
        if fleet {
            caps.push(protocol::CAP_FLEET.to_owned());
        }
    }
    caps
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

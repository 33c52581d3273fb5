//! Entry points for the fuzz targets in `fuzz/` (not a stable API): the
//! smallest surface of the gateway's pure cores that lets a target drive
//! them as the gateway does and check what they decide. Hidden from the
//! documentation; nothing in the gateway uses it.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fastwebsockets::OpCode;
use figment::providers::{Format, Serialized, Toml};
use figment::Figment;

use crate::close::CloseReason;
use crate::config::{Config, ConfigError};
use crate::settings::Settings;

pub use crate::backend::fuzzing::{run_link, Delivered, LinkEnd, LinkRun, SessionRun};

/// The gateway's reassembly of fragmented client messages.
#[derive(Default)]
pub struct Assembler(crate::session::Assembler);

/// A WebSocket frame's kind, as the assembler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// Continuation.
    Continuation,
    /// Text.
    Text,
    /// Binary.
    Binary,
    /// Close, ping or pong.
    Control,
}

/// Why the assembler ends a session, with the close code the client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssemblyError {
    /// 1002: fragments out of order, or a control frame inside a message.
    Protocol,
    /// 1007: text that is not UTF-8.
    InvalidUtf8,
    /// 1009: over the size limit.
    TooBig,
}

impl Assembler {
    /// Offers one frame; a whole message once its last fragment arrived.
    pub fn push(
        &mut self,
        opcode: Opcode,
        fin: bool,
        payload: &[u8],
        max: usize,
    ) -> Result<Option<(Bytes, bool)>, AssemblyError> {
        let opcode = match opcode {
            Opcode::Continuation => OpCode::Continuation,
            Opcode::Text => OpCode::Text,
            Opcode::Binary => OpCode::Binary,
            Opcode::Control => OpCode::Ping,
        };
        self.0
            .push(opcode, fin, BytesMut::from(payload), max)
            .map_err(|e| match e {
                CloseReason::ClientInvalidUtf8 => AssemblyError::InvalidUtf8,
                CloseReason::ClientMessageTooBig => AssemblyError::TooBig,
                _ => AssemblyError::Protocol,
            })
    }
}

/// What the close table decides for one way a session ends.
#[derive(Debug)]
pub struct CloseDecision {
    /// The close frame the client gets, if any.
    pub to_client: Option<(u16, String)>,
    /// The `SessionClose` the backend gets, if any.
    pub to_backend: Option<(u16, String)>,
    /// The metric label.
    pub label: &'static str,
}

/// How many ways a session can end ([`close_decision`]'s `kind`).
pub const CLOSE_KINDS: u8 = 13;

/// The close table's decision for the way numbered `kind` (modulo
/// [`CLOSE_KINDS`]); `code` and `reason` are the peer's, for the ways that
/// carry them.
pub fn close_decision(kind: u8, code: u32, reason: &str) -> CloseDecision {
    let text = || std::borrow::Cow::Owned(reason.to_owned());
    let why: CloseReason = match kind % CLOSE_KINDS {
        0 => CloseReason::ClientClosed {
            code: u16::try_from(code).unwrap_or(u16::MAX),
            reason: reason.to_owned(),
        },
        1 => CloseReason::ClientLost,
        2 => CloseReason::ClientTimeout,
        3 => CloseReason::ClientProtocolError(text()),
        4 => CloseReason::ClientInvalidUtf8,
        5 => CloseReason::ClientMessageTooBig,
        6 => CloseReason::SlowConsumer,
        7 => CloseReason::BackendClosed {
            code,
            reason: reason.to_owned(),
        },
        8 => CloseReason::BackendInvalid(text()),
        9 => CloseReason::LinkLost,
        10 => CloseReason::Shutdown,
        11 => CloseReason::TakenOver,
        _ => CloseReason::ResumeLost("the client did not come back in time"),
    };
    CloseDecision {
        to_client: why.to_client().map(|c| (c.code, c.reason)),
        to_backend: why.to_backend(),
        label: why.label(),
    }
}

/// Whether the gateway accepts `code` in a client's close frame.
pub fn client_code_allowed(code: u16) -> bool {
    crate::close::client_code_allowed(code)
}

/// A client's resume request, read from its upgrade request's headers.
#[derive(Debug, PartialEq, Eq)]
pub enum ResumeAsk {
    /// No resume header: a plain session.
    None,
    /// A new resumable session.
    New,
    /// Resume with this credential (`None`: malformed, treated as unknown)
    /// from this position.
    Resume(Option<String>, u64),
    /// Refused with 400.
    Refused,
}

/// Reads the resume headers of a request with `headers` (name, value).
pub fn resume_ask(headers: &[(&str, &[u8])]) -> ResumeAsk {
    let mut req = hyper::Request::new(());
    for (name, value) in headers {
        let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(name.as_bytes()),
            hyper::header::HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        req.headers_mut().append(name, value);
    }
    let given = |t: &crate::resume::Token| {
        req.headers()
            .get(crate::resume::RESUME_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() == t.as_str())
    };
    match crate::upgrade::resume_ask(&req) {
        Ok(crate::upgrade::Ask::None) => ResumeAsk::None,
        Ok(crate::upgrade::Ask::New) => ResumeAsk::New,
        // A malformed credential is replaced by a fresh random one.
        Ok(crate::upgrade::Ask::Resume(t, p)) => {
            ResumeAsk::Resume(given(&t).then(|| t.as_str().to_owned()), p)
        }
        Err(_) => ResumeAsk::Refused,
    }
}

/// The replay ring of a resumable session.
pub struct Ring(crate::resume::Ring);

impl Ring {
    /// An empty ring of at most `max_bytes` (payload + 64 each).
    pub fn new(max_bytes: usize) -> Self {
        Self(crate::resume::Ring::new(max_bytes))
    }
    /// Appends the next message; evicts none numbered `keep_from` or later.
    /// Returns the payload bytes evicted.
    pub fn push(&mut self, payload: &[u8], text: bool, keep_from: u64) -> usize {
        self.0
            .push(&Bytes::copy_from_slice(payload), text, keep_from)
    }
    /// Messages pushed so far.
    pub fn next_seq(&self) -> u64 {
        self.0.next_seq()
    }
    /// Number of the oldest message held.
    pub fn oldest_held(&self) -> u64 {
        self.0.oldest_held()
    }
    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.0.bytes()
    }
    /// Messages from `position` on; `Err` with the refusal's label.
    pub fn since(&self, position: u64) -> Result<Vec<(Bytes, bool)>, &'static str> {
        self.0.since(position).map_err(|r| r.label())
    }
}

/// Loads a configuration as `Config::load` does, from TOML text instead of
/// a file, and validates it.
pub fn config_from_toml(text: &str) -> Result<Config, ConfigError> {
    let config: Config = Figment::from(Serialized::defaults(Config::default()))
        .merge(Toml::string(text))
        .extract()
        .map_err(Box::new)?;
    config.validate()?;
    Ok(config)
}

/// Does with a validated configuration what the runtime does with its
/// values, short of opening sockets: makes the settings, the semaphores,
/// queues and mailboxes they size, every deadline they set
/// (`Instant + duration`, as the link reader, hyper's header timer and
/// the session's deadlines compute them), tokio timers and the reconnect
/// backoff. Panics where the runtime would; `Err` if settings cannot be
/// made. Without wss listeners: TLS files are not the point.
pub fn exercise_config(config: &Config) -> Result<(), ConfigError> {
    let mut config = config.clone();
    config.listen.wss.clear();
    let s = Settings::from_config(&config)?;
    static RUNTIME: std::sync::OnceLock<std::io::Result<tokio::runtime::Runtime>> =
        std::sync::OnceLock::new();
    let runtime = RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
        })
        .as_ref()
        .map_err(|e| ConfigError::Invalid {
            key: "runtime",
            reason: e.to_string(),
        })?;
    runtime.block_on(async {
        // As Gateway::start does.
        let _admission = tokio::sync::Semaphore::new(s.listen.max_sessions);
        let _handshakes = tokio::sync::Semaphore::new(s.listen.max_handshakes);
        let link = &s.backend.link;
        let caps = crate::backend::flow::Caps {
            flow: true,
            moves: true,
            fleet: s.fleet.is_some(),
            backend_window: link.session_window,
        };
        let (handle, _queues) = crate::backend::LinkHandle::new(0, 3, caps, link);
        let _mailbox = handle.register(protocol::SessionId(1));
        let _ring = crate::resume::Ring::new(s.resume.buffer_bytes);
        let durations = [
            s.listen.tls_handshake_timeout,
            s.listen.http_header_timeout,
            s.session.ping_interval,
            s.session.ping_timeout,
            s.session.write_timeout,
            s.session.close_timeout,
            s.resume.grace,
            s.resume.handoff_timeout,
            s.backend.connect_timeout,
            s.backend.handshake_timeout,
            s.backend.reconnect_min,
            s.backend.reconnect_max,
            s.backend.stable_after,
            s.backend.move_timeout,
            link.heartbeat_interval,
            link.heartbeat_timeout,
            link.mailbox.drain_within,
            s.drain_timeout,
            s.session.close_spread,
        ];
        let fleet = s
            .fleet
            .as_ref()
            .map(|f| [f.handover_timeout, f.directory_ttl, f.directory_ttl / 3])
            .unwrap_or_default();
        for d in durations.into_iter().chain(fleet) {
            let _ = std::time::Instant::now() + d;
            let _ = tokio::time::Instant::now() + d;
            // A deadline moved on from one already set (move, resume).
            let _ = tokio::time::Instant::now() + d + d;
            let mut sleep = std::pin::pin!(tokio::time::sleep(d));
            let _ = futures_poll_once(sleep.as_mut()).await;
        }
        // The link writer's heartbeat.
        let mut tick = tokio::time::interval(link.heartbeat_interval);
        tick.tick().await;
        let _ = futures_poll_once(std::pin::pin!(tick.tick())).await;
        for failures in [0, 1, 20, u32::MAX] {
            let _ =
                crate::backend::backoff(failures, s.backend.reconnect_min, s.backend.reconnect_max);
        }
        let _ =
            crate::settings::session_window(s.session.client_queue_bytes, s.session.max_message);
    });
    Ok(())
}

/// Polls `f` once.
async fn futures_poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| match f.as_mut().poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

/// A duration as the configuration writes it.
pub fn format_duration(d: Duration) -> String {
    humantime_serde::re::humantime::format_duration(d).to_string()
}

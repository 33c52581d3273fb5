//! Every way a client is refused before a session begins, in one table:
//! the HTTP status, the `gateway_sessions_refused_total` reason label and
//! the body. Resume refusals (HTTP 410) have their own table.

use std::borrow::Cow;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use crate::handshake::WS_VERSION;

/// Response body type for every answer the gateway gives.
pub(crate) type Body = Full<Bytes>;

/// Why a connection or upgrade request got no session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The TLS handshake failed.
    TlsError,
    /// The TLS handshake did not finish within `listen.tls_handshake_timeout`.
    TlsTimeout,
    /// No handshake slot (`listen.max_handshakes`) came free within
    /// `listen.tls_handshake_timeout`.
    TlsBusy,
    /// The request did not arrive within `listen.http_header_timeout`.
    HttpTimeout,
    /// The request target is longer than the gateway forwards (414).
    TargetTooLong,
    /// No WebSocket endpoint at this path (404).
    NotFound,
    /// Not a GET (405).
    MethodNotAllowed,
    /// A GET without the upgrade (426).
    NotUpgrade,
    /// A malformed opening handshake (400): HTTP/1.0, no single valid
    /// `Host`, a `Sec-WebSocket-Key` that is not 16 bytes in base64 or
    /// appears twice, a repeated `Sec-WebSocket-Version` (see
    /// `handshake.rs`).
    BadUpgrade(Cow<'static, str>),
    /// A missing or other `Sec-WebSocket-Version` than 13 (426, listing
    /// 13).
    UnsupportedVersion,
    /// A request head over `handshake::MAX_REQUEST_HEAD_BYTES` or with
    /// more than `handshake::MAX_REQUEST_HEADERS` fields (431). hyper sends
    /// that answer itself, before any request reaches the gateway; this
    /// variant only counts it.
    HeadersTooLarge,
    /// An invalid resume header (400).
    BadResume(&'static str),
    /// No acceptable subprotocol while one is required (400).
    NoSubprotocol,
    /// The gateway is draining (503).
    ShuttingDown,
    /// At `listen.max_sessions` (503).
    AtCapacity,
    /// No backend link is up (503).
    NoBackend,
}

impl Refusal {
    /// The HTTP status; `None` when the connection ends without an answer.
    pub(crate) fn status(&self) -> Option<StatusCode> {
        Some(match self {
            Self::TlsError | Self::TlsTimeout | Self::TlsBusy | Self::HttpTimeout => return None,
            Self::TargetTooLong => StatusCode::URI_TOO_LONG,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotUpgrade | Self::UnsupportedVersion => StatusCode::UPGRADE_REQUIRED,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BadUpgrade(_) | Self::BadResume(_) | Self::NoSubprotocol => {
                StatusCode::BAD_REQUEST
            }
            Self::ShuttingDown | Self::AtCapacity | Self::NoBackend => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        })
    }

    /// The `reason` label of `gateway_sessions_refused_total`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::TlsError => "tls_error",
            Self::TlsTimeout => "tls_timeout",
            Self::TlsBusy => "tls_busy",
            Self::HttpTimeout => "http_timeout",
            Self::TargetTooLong
            | Self::MethodNotAllowed
            | Self::BadUpgrade(_)
            | Self::UnsupportedVersion
            | Self::BadResume(_)
            | Self::NoSubprotocol => "bad_request",
            Self::NotFound => "not_found",
            Self::NotUpgrade => "not_upgrade",
            // Its own label: the one refusal that may mean the cap is too
            // tight for what a proxy in front adds.
            Self::HeadersTooLarge => "headers_too_large",
            Self::ShuttingDown => "shutting_down",
            Self::AtCapacity => "at_capacity",
            Self::NoBackend => "no_backend",
        }
    }

    /// The plain-text body.
    fn body(&self) -> Cow<'static, str> {
        match self {
            Self::TlsError | Self::TlsTimeout | Self::TlsBusy | Self::HttpTimeout => "".into(),
            Self::TargetTooLong => "request target too long\n".into(),
            Self::NotFound => "no WebSocket endpoint at this path\n".into(),
            Self::MethodNotAllowed => "use GET with a WebSocket upgrade\n".into(),
            Self::NotUpgrade => "this endpoint speaks WebSocket only\n".into(),
            Self::BadUpgrade(e) => format!("invalid WebSocket upgrade: {e}\n").into(),
            Self::UnsupportedVersion => "this gateway speaks WebSocket version 13 only\n".into(),
            Self::HeadersTooLarge => "request header fields too large\n".into(),
            Self::BadResume(why) => (*why).into(),
            Self::NoSubprotocol => "no acceptable subprotocol (Sec-WebSocket-Protocol)\n".into(),
            Self::ShuttingDown => "gateway shutting down\n".into(),
            Self::AtCapacity => "gateway at its session limit\n".into(),
            Self::NoBackend => "no backend link available\n".into(),
        }
    }

    /// The answer to send.
    pub(crate) fn response(&self) -> Response<Body> {
        let status = self.status().unwrap_or(StatusCode::BAD_REQUEST);
        let mut resp = plain(status, &self.body());
        let headers = resp.headers_mut();
        // A refused upgrade leaves the connection in an unknown state.
        let mut connection = "close";
        if *self == Self::NotUpgrade {
            // A plain HTTP request: the connection can go on.
            connection = "upgrade";
        }
        if *self == Self::UnsupportedVersion {
            // RFC 6455 4.2.2: the versions the server speaks, so that the
            // client can retry with one.
            headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static(WS_VERSION),
            );
            connection = "upgrade, close";
        }
        if status == StatusCode::UPGRADE_REQUIRED {
            // Say what to do instead (RFC 9110 15.5.22: a 426 names the
            // protocol to upgrade to, and `upgrade` must then be listed in
            // `Connection`).
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        headers.insert(header::CONNECTION, HeaderValue::from_static(connection));
        if *self == Self::MethodNotAllowed {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// Why a resume was refused: HTTP 410 ("session lost: start a new one and
/// resync"), or 400 for [`ResumeRefusal::BadPosition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResumeRefusal {
    /// `resume.enabled` is false.
    Disabled,
    /// No session holds the credential (expired, ended, or never issued).
    Unknown,
    /// Messages the client missed are no longer buffered.
    Gap,
    /// The client claims more messages than were ever delivered (400; the
    /// session goes on).
    BadPosition,
    /// The credential was replaced by another resume meanwhile.
    Stale,
    /// The session did not take the request within
    /// `resume.handoff_timeout`.
    SessionBusy,
    /// Fleet: the instance that held the session is gone (crashed, or
    /// stopped before anyone took it over).
    OwnerLost,
    /// Fleet: the session is on another instance, but cannot move here
    /// (its backend link lacks version 3's "fleet"; or this instance has no
    /// such link).
    NotMovable,
    /// Fleet: the session directory (Redis) or the instance holding the
    /// session did not answer within `fleet.handover_timeout`: 503 with
    /// `Retry-After`, the session is not lost.
    FleetUnavailable,
}

impl ResumeRefusal {
    /// The `reason` label of `gateway_resumes_refused_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Unknown => "unknown",
            Self::Gap => "gap",
            Self::BadPosition => "bad_position",
            Self::Stale => "stale",
            Self::SessionBusy => "session_busy",
            Self::OwnerLost => "owner_lost",
            Self::NotMovable => "not_movable",
            Self::FleetUnavailable => "fleet_unavailable",
        }
    }

    /// The refusal with this [`ResumeRefusal::label`] (from another
    /// instance of the fleet).
    pub(crate) fn from_label(label: &str) -> Self {
        [
            Self::Disabled,
            Self::Unknown,
            Self::Gap,
            Self::BadPosition,
            Self::Stale,
            Self::SessionBusy,
            Self::OwnerLost,
            Self::NotMovable,
            Self::FleetUnavailable,
        ]
        .into_iter()
        .find(|r| r.label() == label)
        .unwrap_or(Self::Unknown)
    }

    /// The answer to send: 410 ("session lost: start a new one and
    /// resync"), except for a position the gateway never delivered, a
    /// client bug that leaves the session as it was (400).
    pub(crate) fn response(self) -> Response<Body> {
        let mut r = match self {
            Self::BadPosition => plain(
                StatusCode::BAD_REQUEST,
                "X-Wsgw-Received is more than the gateway delivered; the session is unchanged\n",
            ),
            Self::FleetUnavailable => {
                let mut r = plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the session is on another instance, which could not be reached; retry\n",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            _ => plain(StatusCode::GONE, "session lost: start a new session\n"),
        };
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut resp = Response::new(Body::new(Bytes::copy_from_slice(text.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

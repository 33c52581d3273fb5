//! Stage 3: the HTTP/1.1 request on a client connection, and the WebSocket
//! upgrade.
//!
//! Everything that can refuse a client happens here, before the 101, where
//! a proper HTTP status can still be sent: wrong path (404), not an upgrade
//! (426), bad upgrade (400), at the session cap or no backend link up (503
//! with `Retry-After`), no acceptable subprotocol when one is required (400).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use protocol::pb;
use tracing::{debug, Instrument};

use crate::resume::{self, AttachRequest, Refused, Token};
use crate::session::{self, SessionStart};
use crate::Shared;

/// Response body type for every answer the gateway gives.
pub(crate) type Body = Full<Bytes>;

/// Forwarded headers are capped so that a `SessionOpen` always fits in a
/// backend frame (see `config::FRAME_OVERHEAD`).
const MAX_FORWARDED_HEADER_BYTES: usize = 1024;

/// Longest request target (path and query) accepted; with the forwarded
/// headers and the remote address it keeps `SessionOpen` within
/// `config::FRAME_OVERHEAD`.
const MAX_PATH_BYTES: usize = 2048;

/// Handles one HTTP request on a client connection.
pub(crate) async fn handle(
    mut req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Response<Body> {
    let listen = &shared.listen;
    // The path and query go to the backend in SessionOpen, which must fit
    // in one frame (see `config::FRAME_OVERHEAD`).
    if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > MAX_PATH_BYTES {
        return refuse(
            shared,
            StatusCode::URI_TOO_LONG,
            "bad_request",
            "request target too long\n",
        );
    }
    if !listen.paths.iter().any(|p| p == req.uri().path()) {
        return refuse(
            shared,
            StatusCode::NOT_FOUND,
            "not_found",
            "no WebSocket endpoint at this path\n",
        );
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        if req.method() != Method::GET {
            return refuse(
                shared,
                StatusCode::METHOD_NOT_ALLOWED,
                "bad_request",
                "use GET with a WebSocket upgrade\n",
            );
        }
        let mut resp = plain(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket only\n",
        );
        resp.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        shared.metrics.session_refused("not_upgrade");
        return resp;
    }
    if shared.shutdown.is_draining() {
        return unavailable(shared, "shutting_down", "gateway shutting down\n");
    }
    let resumable = match resume_ask(&req) {
        Ok(Ask::None) => false,
        Ok(Ask::New) => shared.resume.enabled,
        Ok(Ask::Resume(token, position)) => {
            return resume(req, peer, shared, token, position).await
        }
        Err(why) => return refuse(shared, StatusCode::BAD_REQUEST, "bad_request", why),
    };
    let subprotocol = match choose_subprotocol(&req, &listen.subprotocols) {
        Some(p) => Some(p),
        None if listen.require_subprotocol => {
            return refuse(
                shared,
                StatusCode::BAD_REQUEST,
                "bad_request",
                "no acceptable subprotocol (Sec-WebSocket-Protocol)\n",
            );
        }
        None => None,
    };
    let Ok(permit) = shared.admission.clone().try_acquire_owned() else {
        return unavailable(shared, "at_capacity", "gateway at its session limit\n");
    };
    let Some(lease) = shared.pool.lease() else {
        return unavailable(shared, "no_backend", "no backend link available\n");
    };
    let open = session_open(&req, peer, subprotocol.as_deref(), shared);
    let (response, upgrade) = match ws_upgrade(&mut req, shared) {
        Ok(pair) => pair,
        Err(refusal) => return *refusal,
    };
    let (mut parts, _) = response.into_parts();
    if let Some(p) = &subprotocol {
        if let Ok(v) = HeaderValue::from_str(p) {
            parts.headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
    }

    let id = shared.pool.next_session_id();
    let resume = resumable.then(|| shared.resumable.register(id));
    if let Some((token, _)) = &resume {
        add_resume_headers(&mut parts.headers, token, 0);
    }
    // A debug-level span: entering it on every poll costs time on the data
    // path, so at the default info level it is disabled, and the few
    // session logs above debug carry the id themselves.
    let span = tracing::debug_span!("session", id = id.0, peer = %peer);
    let start = SessionStart {
        id,
        lease,
        open,
        permit,
        resume,
    };
    let task_shared = shared.clone();
    let fut = async move {
        match upgrade.await {
            Ok(ws) => session::run(ws, start, task_shared).await,
            Err(e) => {
                // The session never started: its credential must not stay.
                if let Some((token, _)) = &start.resume {
                    task_shared.resumable.remove(token);
                }
                debug!(error = %e, "upgrade did not complete");
            }
        }
    }
    .instrument(span);
    shared.shutdown.spawn_session(fut);
    Response::from_parts(parts, Body::default())
}

/// The 101 response to send, and the future of the upgraded connection.
type Upgrading = (
    Response<http_body_util::Empty<Bytes>>,
    fastwebsockets::upgrade::UpgradeFut,
);

/// Validates the WebSocket handshake: the 101 response to send and the
/// future of the upgraded connection, or a 400 answer.
fn ws_upgrade(
    req: &mut Request<hyper::body::Incoming>,
    shared: &Shared,
) -> Result<Upgrading, Box<Response<Body>>> {
    fastwebsockets::upgrade::upgrade(req).map_err(|e| {
        Box::new(refuse(
            shared,
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("invalid WebSocket upgrade: {e}\n"),
        ))
    })
}

/// What the client asked for about resume.
enum Ask {
    /// Nothing: a plain session.
    None,
    /// A new resumable session.
    New,
    /// Resume the session holding this credential, from this position.
    Resume(Token, u64),
}

fn resume_ask<B>(req: &Request<B>) -> Result<Ask, &'static str> {
    let Some(v) = req.headers().get(resume::RESUME_HEADER) else {
        return Ok(Ask::None);
    };
    let v = v.to_str().map_err(|_| "invalid X-Wsgw-Resume\n")?.trim();
    if v.eq_ignore_ascii_case("new") {
        return Ok(Ask::New);
    }
    // A malformed credential is treated like an unknown one (410), so that
    // probing learns nothing.
    let token = Token::parse(v).unwrap_or_else(Token::generate);
    let position = req
        .headers()
        .get(resume::RECEIVED_HEADER)
        .and_then(|p| p.to_str().ok())
        .and_then(|p| p.trim().parse::<u64>().ok())
        .ok_or("a resume needs X-Wsgw-Received: <messages received>\n")?;
    Ok(Ask::Resume(token, position))
}

fn add_resume_headers(headers: &mut hyper::HeaderMap, token: &Token, received: u64) {
    if let Ok(v) = HeaderValue::from_str(token.as_str()) {
        headers.insert(resume::RESUME_HEADER, v);
    }
    headers.insert(resume::RECEIVED_HEADER, HeaderValue::from(received));
}

/// A resume: hand the connection to the session holding the credential, or
/// answer 410 Gone ("session lost: start a new one and resync").
async fn resume(
    mut req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    token: Token,
    position: u64,
) -> Response<Body> {
    let lost = |reason: &'static str| {
        shared.metrics.resume_refused(reason);
        let mut r = plain(StatusCode::GONE, "session lost: start a new session\n");
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    };
    if !shared.resume.enabled {
        return lost("disabled");
    }
    let Some(session) = shared.resumable.lookup(&token) else {
        return lost("unknown");
    };
    let (response, upgrade) = match ws_upgrade(&mut req, shared) {
        Ok(pair) => pair,
        Err(refusal) => return *refusal,
    };
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    let request = AttachRequest {
        token,
        position,
        upgrade,
        peer,
        reply: reply_tx,
    };
    // The session answers at once unless it is busy writing; bound the wait.
    let wait = shared.resume.handoff_timeout;
    let answer = async {
        session.send(request).await.ok()?;
        reply_rx.await.ok()
    };
    match tokio::time::timeout(wait, answer).await {
        Ok(Some(Ok(attached))) => {
            let (mut parts, _) = response.into_parts();
            add_resume_headers(&mut parts.headers, &attached.token, attached.received);
            Response::from_parts(parts, Body::default())
        }
        Ok(Some(Err(Refused::Gap))) => lost("gap"),
        Ok(Some(Err(Refused::BadPosition))) => lost("bad_position"),
        Ok(Some(Err(Refused::Stale))) => lost("stale"),
        _ => lost("session_busy"),
    }
}

/// The first subprotocol the client offers that the gateway accepts.
fn choose_subprotocol<B>(req: &Request<B>, accepted: &[String]) -> Option<String> {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|offered| accepted.iter().any(|a| a == offered))
        .map(str::to_owned)
}

fn session_open<B>(
    req: &Request<B>,
    peer: SocketAddr,
    subprotocol: Option<&str>,
    shared: &Shared,
) -> pb::SessionOpen {
    let mut headers = Vec::new();
    let mut budget = MAX_FORWARDED_HEADER_BYTES;
    for name in &shared.session.forward_headers {
        for value in req.headers().get_all(name) {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            let size = name.as_str().len() + value.len();
            if size > budget {
                debug!(header = %name, "forwarded headers over budget; dropping the rest");
                break;
            }
            budget -= size;
            headers.push(pb::Header {
                name: name.as_str().to_owned(),
                value,
            });
        }
    }
    pb::SessionOpen {
        remote_addr: peer.to_string(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned()),
        subprotocol: subprotocol.unwrap_or_default().to_owned(),
        headers,
        identity: String::new(),
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

fn refuse(shared: &Shared, status: StatusCode, reason: &'static str, text: &str) -> Response<Body> {
    shared.metrics.session_refused(reason);
    let mut resp = plain(status, text);
    // A refused upgrade leaves the connection in an unknown state.
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn unavailable(shared: &Shared, reason: &'static str, text: &str) -> Response<Body> {
    let mut resp = refuse(shared, StatusCode::SERVICE_UNAVAILABLE, reason, text);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

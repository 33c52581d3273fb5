//! Stage 3: the HTTP/1.1 request on a client connection, and the WebSocket
//! upgrade.
//!
//! Everything that can refuse a client happens here, before the 101, where
//! a proper HTTP status can still be sent: wrong path (404), another method
//! (405), not an upgrade (426), a malformed handshake (400) or another
//! WebSocket version (426; both in `handshake.rs`), at the session cap or no
//! backend link up (503 with `Retry-After`), no acceptable subprotocol when
//! one is required (400). (A request head too large is answered 431 by hyper
//! before it gets here; see `listener.rs`.)

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response};
use protocol::pb;
use tracing::{debug, Instrument};

use crate::handshake;
use crate::listener::Arrival;
use crate::refusal::{Body, Refusal, ResumeRefusal};
use crate::resume::{self, AttachRequest, AttachTo, Token};
use crate::session::{self, SessionStart};
use crate::shared::Shared;

/// Forwarded headers are capped so that a `SessionOpen` always fits in a
/// backend frame (see `config::FRAME_OVERHEAD`).
const MAX_FORWARDED_HEADER_BYTES: usize = 1024;

/// Longest request target (path and query) accepted; with the forwarded
/// headers and the remote address it keeps `SessionOpen` within
/// `config::FRAME_OVERHEAD`.
const MAX_PATH_BYTES: usize = 2048;

/// Handles one HTTP request on a client connection.
pub(crate) async fn handle(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    arrival: Arrival,
) -> Response<Body> {
    let answer = match check(&req, shared) {
        Ok(Ask::Resume(token, position)) => {
            return resume(req, peer, shared, token, position).await
        }
        Ok(Ask::New) => open_session(req, peer, shared, shared.resume.enabled, arrival),
        Ok(Ask::None) => open_session(req, peer, shared, false, arrival),
        Err(refusal) => Err(refusal),
    };
    answer.unwrap_or_else(|refusal| refuse(shared, &refusal))
}

/// The checks that take nothing: what the request asks for, or why it is
/// refused.
fn check<B>(req: &Request<B>, shared: &Shared) -> Result<Ask, Refusal> {
    // The path and query go to the backend in SessionOpen, which must fit
    // in one frame (see `config::FRAME_OVERHEAD`).
    if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > MAX_PATH_BYTES {
        return Err(Refusal::TargetTooLong);
    }
    if !shared.listen.paths.iter().any(|p| p == req.uri().path()) {
        return Err(Refusal::NotFound);
    }
    // RFC 6455 4.1: the opening handshake is a GET, whatever else it says.
    if req.method() != Method::GET {
        return Err(Refusal::MethodNotAllowed);
    }
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        return Err(Refusal::NotUpgrade);
    }
    handshake::check(req)?;
    if shared.shutdown.is_draining() {
        return Err(Refusal::ShuttingDown);
    }
    resume_ask(req).map_err(Refusal::BadResume)
}

/// A new session: takes an admission permit and a link, answers 101 and
/// spawns the session for when the upgrade completes.
fn open_session(
    mut req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    resumable: bool,
    arrival: Arrival,
) -> Result<Response<Body>, Refusal> {
    let listen = &shared.listen;
    let subprotocol = match choose_subprotocol(&req, &listen.subprotocols) {
        Some(p) => Some(p),
        None if listen.require_subprotocol => return Err(Refusal::NoSubprotocol),
        None => None,
    };
    let permit = (shared.admission.clone().try_acquire_owned()).map_err(|_| Refusal::AtCapacity)?;
    let lease = shared.pool.lease().ok_or(Refusal::NoBackend)?;
    let open = session_open(&req, peer, subprotocol.as_deref(), shared);
    let (response, upgrade) = ws_upgrade(&mut req)?;
    let (mut parts, _) = response.into_parts();
    if let Some(p) = &subprotocol {
        if let Ok(v) = HeaderValue::from_str(p) {
            parts.headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
    }

    let id = shared.pool.next_session_id();
    let (trace_span, traceparent) = shared.telemetry.session_span(req.headers(), id.0);
    let mut open = open;
    open.traceparent = traceparent;
    let resume = resumable.then(|| shared.resumable.register(id));
    if let Some((token, _)) = &resume {
        add_resume_headers(&mut parts.headers, token, 0, shared);
    }
    // A debug-level span: entering it on every poll costs time on the data
    // path, so at the default info level it is disabled, and the few
    // session logs above debug carry the id themselves.
    let span = tracing::debug_span!("session", id = id.0, peer = %peer);
    // Boxed, like the connection below: see `session::run`.
    let start = Box::new(SessionStart {
        id,
        lease,
        open,
        permit,
        resume,
        span: trace_span,
    });
    let task_shared = shared.clone();
    let fut = async move {
        let ws = match upgrade.await {
            Ok(ws) => {
                arrival.upgraded(&task_shared.metrics);
                Box::new(ws)
            }
            Err(e) => {
                // The session never started: its credential must not stay,
                // and its span ends here.
                let mut start = start;
                start.span.close(1006, "upgrade_failed");
                if let Some((token, _)) = &start.resume {
                    task_shared.resumable.remove(token);
                }
                debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        session::run(ws, start, task_shared).await;
    }
    .instrument(span);
    shared.shutdown.spawn_session(fut);
    Ok(Response::from_parts(parts, Body::default()))
}

/// The 101 response to send, and the future of the upgraded connection.
type Upgrading = (
    Response<http_body_util::Empty<Bytes>>,
    fastwebsockets::upgrade::UpgradeFut,
);

/// The 101 response to send and the future of the upgraded connection.
/// (fastwebsockets' own checks here are a subset of `handshake::check`.)
fn ws_upgrade(req: &mut Request<hyper::body::Incoming>) -> Result<Upgrading, Refusal> {
    fastwebsockets::upgrade::upgrade(req).map_err(|e| Refusal::BadUpgrade(e.to_string().into()))
}

/// What the client asked for about resume.
pub(crate) enum Ask {
    /// Nothing: a plain session.
    None,
    /// A new resumable session.
    New,
    /// Resume the session holding this credential, from this position.
    Resume(Token, u64),
}

pub(crate) fn resume_ask<B>(req: &Request<B>) -> Result<Ask, &'static str> {
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

fn add_resume_headers(
    headers: &mut hyper::HeaderMap,
    token: &Token,
    received: u64,
    shared: &Shared,
) {
    if let Ok(v) = HeaderValue::from_str(token.as_str()) {
        headers.insert(resume::RESUME_HEADER, v);
    }
    headers.insert(resume::RECEIVED_HEADER, HeaderValue::from(received));
    let grace_ms = u64::try_from(shared.resume.grace.as_millis()).unwrap_or(u64::MAX);
    headers.insert(resume::GRACE_HEADER, HeaderValue::from(grace_ms));
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
    let lost = |why: ResumeRefusal| {
        shared.metrics.resume_refused(why);
        why.response()
    };
    if !shared.resume.enabled {
        return lost(ResumeRefusal::Disabled);
    }
    let session = shared.resumable.lookup(&token);
    if session.is_none() && shared.fleet.is_none() {
        return lost(ResumeRefusal::Unknown);
    }
    let (response, upgrade) = match ws_upgrade(&mut req) {
        Ok(pair) => pair,
        Err(refusal) => return refuse(shared, &refusal),
    };
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    let request = Box::new(AttachRequest {
        token: token.clone(),
        position,
        to: AttachTo::Here {
            upgrade,
            peer,
            reply: reply_tx,
        },
    });
    // The session answers at once unless it is busy writing; bound the wait.
    let wait = shared.resume.handoff_timeout;
    let request = match session {
        Some(session) => match tokio::time::timeout(wait, session.send(request)).await {
            Ok(Ok(())) => None,
            // It ended meanwhile; in a fleet it may have gone to another
            // instance.
            Ok(Err(tokio::sync::mpsc::error::SendError(request))) => Some(request),
            Err(_) => return lost(ResumeRefusal::SessionBusy),
        },
        None => Some(request),
    };
    if let Some(request) = request {
        // Not here: in a fleet, another instance may hold it.
        if let Err(why) = take_over(shared, token, position, request).await {
            return lost(why);
        }
    }
    let answer = reply_rx;
    match tokio::time::timeout(wait, answer).await {
        Ok(Ok(Ok(attached))) => {
            let (mut parts, _) = response.into_parts();
            add_resume_headers(
                &mut parts.headers,
                &attached.token,
                attached.received,
                shared,
            );
            Response::from_parts(parts, Body::default())
        }
        Ok(Ok(Err(why))) => lost(why),
        _ => lost(ResumeRefusal::SessionBusy),
    }
}

/// Fleet: takes the session holding `token` over from the instance that
/// holds it, and starts it here with `first` (the client's resume) to
/// serve. A session cannot come here without a link whose backend adopted
/// "fleet" and room under `listen.max_sessions`; both are checked first,
/// so that a session is never taken from its holder only to be lost.
async fn take_over(
    shared: &Arc<Shared>,
    token: Token,
    position: u64,
    first: Box<AttachRequest>,
) -> Result<(), ResumeRefusal> {
    let Some(fleet) = &shared.fleet else {
        return Err(ResumeRefusal::Unknown);
    };
    let permit = shared
        .admission
        .clone()
        .try_acquire_owned()
        .map_err(|_| ResumeRefusal::FleetUnavailable)?;
    // No link that can take it right now (links reconnecting): the
    // session is intact where it is; retry.
    let lease = shared
        .pool
        .lease_for_move()
        .filter(|l| l.link().caps().fleet)
        .ok_or(ResumeRefusal::FleetUnavailable)?;
    let state = fleet.take(&token, position).await.inspect_err(|why| {
        shared.metrics.handover("in", why.label());
    })?;
    start_imported(shared, state, token, lease, permit, Some(first));
    Ok(())
}

/// Fleet: a session's state that arrived after the resume that asked for
/// it gave up (its holder let it go all the same): it is taken in,
/// detached, under the token that resume presented, so that the client's
/// next resume finds it here. Without room or a link for it, it is lost
/// (logged).
pub(crate) fn take_in_late(shared: &Arc<Shared>, state: crate::fleet::wire::State, token: &str) {
    let permit = shared.admission.clone().try_acquire_owned().ok();
    let lease = shared
        .pool
        .lease_for_move()
        .filter(|l| l.link().caps().fleet);
    let (Some(token), Some(permit), Some(lease)) = (Token::parse(token), permit, lease) else {
        crate::logs::limited!(
            warn,
            session = state.session_id,
            "fleet: a session handed over too late found no room or link here; it is lost"
        );
        shared.metrics.handover("in", "lost_late");
        return;
    };
    start_imported(shared, state, token, lease, permit, None);
}

/// Spawns a session taken over from another instance.
fn start_imported(
    shared: &Arc<Shared>,
    state: crate::fleet::wire::State,
    token: Token,
    lease: crate::backend::Lease,
    permit: tokio::sync::OwnedSemaphorePermit,
    first: Option<Box<AttachRequest>>,
) {
    let import = session::Import {
        state,
        token,
        lease,
        permit,
        first,
    };
    let task = session::run_imported(import, shared.clone());
    shared.shutdown.spawn_session(task);
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
            // The contract's limit on entries (a frame with more is never
            // sent): repeated header names could otherwise pass it.
            if headers.len() >= protocol::limits::MAX_HEADERS {
                debug!(header = %name, "forwarded headers over the entry limit; dropping the rest");
                break;
            }
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
        traceparent: String::new(),
    }
}

fn refuse(shared: &Shared, refusal: &Refusal) -> Response<Body> {
    shared.metrics.session_refused(refusal);
    refusal.response()
}

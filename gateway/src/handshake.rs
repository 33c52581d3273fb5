//! What RFC 6455 (sections 4.1, 4.2.1 and 11.3) asks of an opening
//! handshake before a server may answer 101, as pure checks on the request
//! head. `upgrade.rs` runs them once the path, the method (405) and the
//! `Upgrade: websocket` / `Connection: upgrade` tokens (426) are known good.
//!
//! Neither library does this for us: hyper reads HTTP/1.0 and requests
//! without `Host`, and fastwebsockets only checks that some
//! `Sec-WebSocket-Key` exists (any text) and that the first
//! `Sec-WebSocket-Version` is `13`.
//!
//! The limits on the request head as a whole (bytes, header count) are
//! hyper's, set from [`MAX_REQUEST_HEAD_BYTES`] and [`MAX_REQUEST_HEADERS`].

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::Authority;
use hyper::{Request, Version};

use crate::refusal::Refusal;

/// Largest request head (request line, headers, blank line) hyper reads
/// before answering 431. A WebSocket upgrade from an app is well under
/// 1 KiB; load balancers and CDNs add a few hundred bytes, a bearer token a
/// few KiB. 16 KiB is what Node.js and HAProxy (`tune.bufsize`) allow; it
/// also bounds what a connection can make the gateway buffer before it
/// knows whether there will be a session.
pub(crate) const MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;

/// Most header fields in one request; hyper answers 431 beyond it. An
/// upgrade carries about 10 and proxies add under 20: 64 leaves room, and
/// caps the per-request work of parsing and looking up headers.
pub(crate) const MAX_REQUEST_HEADERS: usize = 64;

/// The WebSocket version the gateway speaks (RFC 6455 4.2.1 item 6); the
/// 426 answer to any other lists it.
pub(crate) const WS_VERSION: &str = "13";

/// Checks what the RFC requires of an upgrade request beyond its method
/// and upgrade tokens: 400 for a malformed handshake, 426 (listing
/// [`WS_VERSION`]) for a missing or other WebSocket version.
pub(crate) fn check<B>(req: &Request<B>) -> Result<(), Refusal> {
    // 4.1: "The method of the request MUST be GET, and the HTTP version
    // MUST be at least 1.1." (hyper does not upgrade 1.0 connections: it
    // would send a 101 and then drop the connection.)
    if req.version() < Version::HTTP_11 {
        return Err(bad("HTTP/1.1 or later is required"));
    }
    let headers = req.headers();
    // 4.1 / 4.2.1 item 2: a Host with the server's authority; RFC 9112
    // 3.2: 400 for no Host, more than one, or an invalid one. (Which
    // authority is the server's depends on the load balancer in front, so
    // any valid one is taken.)
    if !single(headers, &header::HOST).is_some_and(is_host) {
        return Err(bad("exactly one valid Host header is required"));
    }
    // 4.2.2 / 4.4: a version the server does not speak gets a status
    // such as 426 and the versions it does; 11.3.5: the field appears at
    // most once in a request.
    match single_or_many(headers, &header::SEC_WEBSOCKET_VERSION) {
        Count::One(v) if v.as_bytes() == WS_VERSION.as_bytes() => {}
        Count::Many => return Err(bad("more than one Sec-WebSocket-Version")),
        Count::None | Count::One(_) => return Err(Refusal::UnsupportedVersion),
    }
    // 4.1: the key is a nonce of 16 random bytes, base64-encoded; 11.3.1:
    // it appears once.
    if !single(headers, &header::SEC_WEBSOCKET_KEY).is_some_and(|k| is_key(k.as_bytes())) {
        return Err(bad(
            "Sec-WebSocket-Key must appear once and be 16 bytes in base64",
        ));
    }
    Ok(())
}

fn bad(why: &'static str) -> Refusal {
    Refusal::BadUpgrade(why.into())
}

/// How often a header field appears.
enum Count<'a> {
    None,
    One(&'a HeaderValue),
    Many,
}

fn single_or_many<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Count<'a> {
    let mut all = headers.get_all(name).iter();
    match (all.next(), all.next()) {
        (None, _) => Count::None,
        (Some(v), None) => Count::One(v),
        (Some(_), Some(_)) => Count::Many,
    }
}

/// The field's value if it appears exactly once.
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    match single_or_many(headers, name) {
        Count::One(v) => Some(v),
        Count::None | Count::Many => None,
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 7.2): a non-empty authority without
/// user information.
fn is_host(v: &HeaderValue) -> bool {
    let bytes = v.as_bytes();
    !bytes.is_empty()
        && !bytes.contains(&b'@')
        && Authority::try_from(bytes).is_ok_and(|a| !a.host().is_empty())
}

/// Whether `key` is 16 bytes in canonical base64: 22 characters of the
/// standard alphabet, then `==`. The 22nd character holds the last 2 bits
/// of byte 16 and 4 padding bits, which must be zero (RFC 4648 3.5), so it
/// is one of `A`, `Q`, `g`, `w`.
fn is_key(key: &[u8]) -> bool {
    let b64 = |c: &u8| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/';
    match key {
        [body @ .., last, b'=', b'='] if body.len() == 21 => {
            body.iter().all(b64) && matches!(last, b'A' | b'Q' | b'g' | b'w')
        }
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A request that passes, from RFC 6455 section 1.2, with `edit`
    /// applied.
    fn req(edit: impl FnOnce(&mut Request<()>)) -> Result<(), Refusal> {
        let mut r = Request::get("/ws")
            .header("host", "server.example.com")
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .body(())
            .unwrap();
        edit(&mut r);
        check(&r)
    }

    fn set(name: &'static str, value: &'static str) -> impl FnOnce(&mut Request<()>) {
        move |r| {
            r.headers_mut()
                .insert(name, HeaderValue::from_static(value));
        }
    }

    fn add(name: &'static str, value: &'static str) -> impl FnOnce(&mut Request<()>) {
        move |r| {
            r.headers_mut()
                .append(name, HeaderValue::from_static(value));
        }
    }

    fn remove(name: &'static str) -> impl FnOnce(&mut Request<()>) {
        move |r| {
            r.headers_mut().remove(name);
        }
    }

    fn is_400(r: Result<(), Refusal>) -> bool {
        matches!(r, Err(Refusal::BadUpgrade(_)))
    }

    #[test]
    fn the_rfc_example_passes() {
        assert_eq!(req(|_| {}), Ok(()));
        assert_eq!(req(set("host", "127.0.0.1:8080")), Ok(()));
        assert_eq!(req(set("host", "[::1]:443")), Ok(()));
    }

    #[test]
    fn http_1_0_is_refused() {
        assert!(is_400(req(|r| *r.version_mut() = Version::HTTP_10)));
    }

    #[test]
    fn host_must_appear_once_and_be_an_authority() {
        assert!(is_400(req(remove("host"))));
        assert!(is_400(req(set("host", ""))));
        assert!(is_400(req(set("host", "user@server.example.com"))));
        assert!(is_400(req(set("host", "a b"))));
        assert!(is_400(req(add("host", "other.example.com"))));
    }

    #[test]
    fn a_missing_or_other_version_is_426_and_a_repeated_one_400() {
        let unsupported = Err(Refusal::UnsupportedVersion);
        assert_eq!(req(remove("sec-websocket-version")), unsupported);
        assert_eq!(req(set("sec-websocket-version", "8")), unsupported);
        assert_eq!(req(set("sec-websocket-version", "13, 8")), unsupported);
        assert!(is_400(req(add("sec-websocket-version", "13"))));
    }

    #[test]
    fn the_key_is_16_bytes_of_canonical_base64_sent_once() {
        for good in [
            "AAAAAAAAAAAAAAAAAAAAAA==",
            "////////////////////+w==",
            "x3JJHMbDL1EzLkh9GBhXDw==",
        ] {
            assert!(is_key(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "not a key",
            // 15 and 17 bytes.
            "AAAAAAAAAAAAAAAAAAAA",
            "AAAAAAAAAAAAAAAAAAAAAAA=",
            // Unpadded, URL-safe alphabet, padding bits set.
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZ-==",
            "dGhlIHNhbXBsZSBub25jZR==",
            "dGhlIHNhbXBsZSBub25jZQ===",
        ] {
            assert!(!is_key(bad.as_bytes()), "{bad}");
        }
        assert!(is_400(req(remove("sec-websocket-key"))));
        assert!(is_400(req(set("sec-websocket-key", "hello"))));
        assert!(is_400(req(add(
            "sec-websocket-key",
            "AAAAAAAAAAAAAAAAAAAAAA=="
        ))));
    }
}

//! RFC 6455 on the server side, byte for byte: every opening handshake the
//! RFC says a server must refuse gets its documented status (never a 101),
//! the request head caps answer 431 at their exact boundary, and every
//! frame §5 says must fail the connection gets close 1002. Requests and
//! frames are written raw, as no well-behaved client library would send
//! them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gateway_tests::backend::Event;
use gateway_tests::raw::{http_head, upgrade_request, Frame, Raw};
use gateway_tests::{Gateway, GatewayOpts, TestBackend};
use protocol::Framing;

const T: Duration = Duration::from_secs(10);

/// The request head caps, as the README documents them.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

async fn gateway() -> (TestBackend, Gateway) {
    let backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr));
    gw.wait_ready(T).await;
    (backend, gw)
}

/// The valid request with the header line starting `name:` replaced by
/// `line` (removed when `line` is empty).
fn with_line(name: &str, line: &str) -> String {
    let req = upgrade_request("/ws", "");
    let start = req.find(&format!("\r\n{name}:")).expect("no such header") + 2;
    let end = start + req[start..].find("\r\n").unwrap() + 2;
    format!("{}{line}{}", &req[..start], &req[end..])
}

/// RFC 6455 4.1 / 4.2.1 and 11.3, RFC 9112 3.2: each request differs from
/// an accepted one in one way, and each gets 400 and `Connection: close`.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_opening_handshakes_get_400_not_101() {
    let (_backend, gw) = gateway().await;
    let addr = gw.ws.unwrap();
    assert_eq!(http_head(addr, &upgrade_request("/ws", "")).await.0, 101);
    let key = "Sec-WebSocket-Key";
    let cases = [
        (
            "HTTP/1.0",
            upgrade_request("/ws", "").replacen("HTTP/1.1", "HTTP/1.0", 1),
        ),
        ("no Host", with_line("Host", "")),
        ("empty Host", with_line("Host", "Host: \r\n")),
        (
            "Host with user info",
            with_line("Host", "Host: a@localhost\r\n"),
        ),
        ("two Hosts", upgrade_request("/ws", "Host: other\r\n")),
        (
            "key not base64",
            with_line(key, &format!("{key}: hello\r\n")),
        ),
        (
            "key of 15 bytes",
            with_line(key, &format!("{key}: AAAAAAAAAAAAAAAAAAAA\r\n")),
        ),
        (
            "key of 17 bytes",
            with_line(key, &format!("{key}: AAAAAAAAAAAAAAAAAAAAAAA=\r\n")),
        ),
        (
            "key without padding",
            with_line(key, &format!("{key}: dGhlIHNhbXBsZSBub25jZQ\r\n")),
        ),
        (
            "two keys",
            upgrade_request("/ws", &format!("{key}: AAAAAAAAAAAAAAAAAAAAAA==\r\n")),
        ),
        (
            "two versions",
            upgrade_request("/ws", "Sec-WebSocket-Version: 13\r\n"),
        ),
    ];
    for (what, req) in cases {
        let (status, head) = http_head(addr, &req).await;
        assert_eq!(status, 400, "{what}: {head}");
        assert!(head.contains("\r\nconnection: close"), "{what}: {head}");
    }
}

/// RFC 6455 4.2.2 / 4.4: a version the gateway does not speak (or none)
/// gets 426 with `Sec-WebSocket-Version: 13`, so the client can retry.
#[tokio::test(flavor = "multi_thread")]
async fn another_websocket_version_gets_426_listing_13() {
    let (_backend, gw) = gateway().await;
    let addr = gw.ws.unwrap();
    let version = "Sec-WebSocket-Version";
    for (what, req) in [
        (
            "version 8",
            with_line(version, &format!("{version}: 8\r\n")),
        ),
        (
            "version 14",
            with_line(version, &format!("{version}: 14\r\n")),
        ),
        (
            "a list",
            with_line(version, &format!("{version}: 13, 8\r\n")),
        ),
        ("no version", with_line(version, "")),
    ] {
        let (status, head) = http_head(addr, &req).await;
        assert_eq!(status, 426, "{what}: {head}");
        let has = |line: &str| head.lines().any(|l| l == line);
        assert!(has("sec-websocket-version: 13"), "{what}: {head}");
        assert!(has("upgrade: websocket"), "{what}: {head}");
    }
}

/// RFC 6455 4.2.1 items 3 and 4: `Upgrade` must list `websocket` and
/// `Connection` must list `Upgrade`, both compared case-insensitively
/// within comma-separated lists; without them the answer is 426.
#[tokio::test(flavor = "multi_thread")]
async fn upgrade_and_connection_tokens_are_required_and_matched_as_lists() {
    let (_backend, gw) = gateway().await;
    let addr = gw.ws.unwrap();
    for (what, req, want) in [
        (
            "Upgrade: h2c",
            with_line("Upgrade", "Upgrade: h2c\r\n"),
            426,
        ),
        ("no Upgrade", with_line("Upgrade", ""), 426),
        (
            "Connection: keep-alive",
            with_line("Connection", "Connection: keep-alive\r\n"),
            426,
        ),
        ("no Connection", with_line("Connection", ""), 426),
        (
            "token lists, any case",
            with_line("Upgrade", "Upgrade: foo, WebSocket\r\n").replace(
                "Connection: Upgrade\r\n",
                "Connection: keep-alive, UPGRADE\r\n",
            ),
            101,
        ),
    ] {
        let (status, head) = http_head(addr, &req).await;
        assert_eq!(status, want, "{what}: {head}");
    }
}

/// The request head (request line, headers, blank line) may be up to
/// 16 KiB and carry up to 64 header fields; one byte or one field more is
/// answered 431 and counted as `headers_too_large`.
#[tokio::test(flavor = "multi_thread")]
async fn request_heads_over_16_kib_or_64_headers_get_431() {
    let (_backend, gw) = gateway().await;
    let addr = gw.ws.unwrap();
    // A request head of exactly `bytes` bytes, padded by one header.
    let sized = |bytes: usize| {
        let bare = upgrade_request("/ws", "X-Pad: \r\n").len();
        upgrade_request("/ws", &format!("X-Pad: {}\r\n", "p".repeat(bytes - bare)))
    };
    assert_eq!(sized(MAX_HEAD_BYTES).len(), MAX_HEAD_BYTES);
    assert_eq!(http_head(addr, &sized(MAX_HEAD_BYTES)).await.0, 101);
    let (status, head) = http_head(addr, &sized(MAX_HEAD_BYTES + 1)).await;
    assert_eq!(status, 431, "{head}");

    // The valid request has 5 header fields.
    let counted = |fields: usize| {
        let extra: String = (5..fields).map(|i| format!("X-H{i}: v\r\n")).collect();
        upgrade_request("/ws", &extra)
    };
    assert_eq!(http_head(addr, &counted(MAX_HEADERS)).await.0, 101);
    let (status, head) = http_head(addr, &counted(MAX_HEADERS + 1)).await;
    assert_eq!(status, 431, "{head}");

    let label = "gateway_sessions_refused_total{reason=\"headers_too_large\"";
    gw.wait_metric(label, |v| v == 2.0, T).await;
}

/// RFC 6455 5.1: "The server MUST close the connection upon receiving a
/// frame that is not masked." The client gets 1002, and the backend the
/// session's close, never the payload.
#[tokio::test(flavor = "multi_thread")]
async fn an_unmasked_client_frame_fails_the_connection_with_1002() {
    let (mut backend, gw) = gateway().await;
    let mut c = Raw::connect(gw.ws.unwrap(), &[]).await.unwrap();
    let (session, _) = backend.next_open().await;
    // A masked frame passes...
    c.write(&Raw::encode(b"masked")).await.unwrap();
    assert_eq!(&backend.next_data(session).await[..], b"masked");
    // ... an unmasked one does not.
    c.write(&[0x82, 8, b'u', b'n', b'm', b'a', b's', b'k', b'e', b'd'])
        .await
        .unwrap();
    assert_eq!(c.next(T).await.unwrap(), Some(Frame::Close(1002)));
    let after = backend
        .wait_for(|e| match e {
            Event::Data { session: s, .. } if *s == session => Some(None),
            Event::Close {
                session: s, code, ..
            } if *s == session => Some(Some(*code)),
            _ => None,
        })
        .await;
    assert_eq!(
        after,
        Some(1002),
        "the unmasked payload reached the backend"
    );
}

/// A masked client frame: `first` is the first header byte (FIN, RSV,
/// opcode).
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Raw::encode(payload);
    f[0] = first;
    f
}

/// RFC 6455 5.2 (reserved bits without a negotiated extension, reserved
/// opcodes), 5.4 (a continuation only inside a message, no new message
/// before the last ended), 5.5 (control frames not fragmented, at most
/// 125 bytes), 5.5.1 and 7.4 (close payloads): each fails the connection
/// with 1002. (fastwebsockets and the gateway enforced these before; the
/// unmasked frame above is the one that got through.)
#[tokio::test(flavor = "multi_thread")]
async fn frames_rfc_6455_says_must_fail_the_connection_get_1002() {
    let (_backend, gw) = gateway().await;
    let big = [b'x'; 126];
    let cases: [(&str, Vec<u8>); 14] = [
        ("RSV1", frame(0x80 | 0x40 | 0x2, b"x")),
        ("RSV2", frame(0x80 | 0x20 | 0x2, b"x")),
        ("RSV3", frame(0x80 | 0x10 | 0x2, b"x")),
        ("reserved data opcode 0x3", frame(0x80 | 0x3, b"x")),
        ("reserved data opcode 0x7", frame(0x80 | 0x7, b"x")),
        ("reserved control opcode 0xb", frame(0x80 | 0xb, b"x")),
        ("reserved control opcode 0xf", frame(0x80 | 0xf, b"x")),
        ("fragmented ping", frame(0x9, b"x")),
        ("ping of 126 bytes", frame(0x80 | 0x9, &big)),
        ("pong of 126 bytes", frame(0x80 | 0xa, &big)),
        (
            "close of 126 bytes",
            frame(0x80 | 0x8, &[&[0x03, 0xe8][..], &big[2..]].concat()),
        ),
        ("continuation without a start", frame(0x80, b"x")),
        (
            "new message before the last ended",
            [frame(0x2, b"a"), frame(0x82, b"b")].concat(),
        ),
        ("close with a 1-byte payload", frame(0x88, &[0x03])),
    ];
    for (what, bytes) in cases {
        let mut c = Raw::connect(gw.ws.unwrap(), &[]).await.unwrap();
        c.write(&bytes).await.unwrap();
        assert_eq!(c.next(T).await.unwrap(), Some(Frame::Close(1002)), "{what}");
    }
    // 7.4.1: codes a client must not send (1004-1006, 1015 and below 1000
    // are reserved or local-only).
    for code in [999u16, 1004, 1005, 1006, 1015, 2999] {
        let mut c = Raw::connect(gw.ws.unwrap(), &[]).await.unwrap();
        c.write(&frame(0x88, &code.to_be_bytes())).await.unwrap();
        assert_eq!(
            c.next(T).await.unwrap(),
            Some(Frame::Close(1002)),
            "close code {code}"
        );
    }
}

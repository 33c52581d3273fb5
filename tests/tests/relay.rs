//! The relay path, end to end: a real gateway process between real clients
//! (Rust over TLS, and Python `websockets`) and a backend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gateway_tests::client::{self, Client, Connect, Msg};
use gateway_tests::kib;
use gateway_tests::{Certs, Gateway, GatewayOpts, TestBackend};
use protocol::Framing;

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn wss_echo_keeps_message_types() {
    let certs = Certs::new();
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).tls(&certs));
    gw.wait_ready(T).await;
    let tls = Connect {
        tls: Some(client::tls_config(&certs.ca())),
        ..Connect::default()
    };
    let mut c = Client::connect(gw.wss.unwrap(), "/ws", &tls).await;
    c.send_text("héllo").await;
    c.send_binary(&[0, 1, 2, 255]).await;
    c.send_binary(&[]).await;
    assert_eq!(c.recv_within(T).await, Some(Msg::Text("héllo".into())));
    assert_eq!(
        c.recv_within(T).await,
        Some(Msg::Binary(vec![0, 1, 2, 255]))
    );
    assert_eq!(c.recv_within(T).await, Some(Msg::Binary(vec![])));
}

/// An independent client implementation (Python `websockets`) over wss.
#[tokio::test(flavor = "multi_thread")]
async fn python_websockets_client_over_wss() {
    let certs = Certs::new();
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).tls(&certs));
    gw.wait_ready(T).await;
    let v = gateway_tests::python_ws_client(&gw.wss_url("/ws"), &certs.ca()).await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["echoed"], 4, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn push_reaches_only_its_session_and_closes_map_both_ways() {
    let mut backend = TestBackend::start(Framing::U32Be, false).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).framing("u32be"));
    gw.wait_ready(T).await;
    let plain = Connect::default();
    let mut a = Client::connect(gw.ws.unwrap(), "/ws?who=a", &plain).await;
    let (sa, open_a) = backend.next_open().await;
    let mut b = Client::connect(gw.ws.unwrap(), "/ws?who=b", &plain).await;
    let (sb, open_b) = backend.next_open().await;
    assert_eq!(open_a.path, "/ws?who=a");
    assert_eq!(open_b.path, "/ws?who=b");
    assert_ne!(sa, sb);

    // A push to a reaches a, and b sees nothing of it.
    backend.push(sa, b"for a only", false);
    backend.push(sb, "for b only".as_bytes(), true);
    assert_eq!(
        a.recv_within(T).await,
        Some(Msg::Binary(b"for a only".to_vec()))
    );
    assert_eq!(b.recv_within(T).await, Some(Msg::Text("for b only".into())));

    // A backend close reaches the client with its application code.
    backend.close(sa, 4001, "account suspended");
    assert_eq!(a.expect_close(T).await, (4001, "account suspended".into()));

    // A client close reaches the backend with the client's code and reason.
    b.ws.write_frame(fastwebsockets::Frame::close(4100, b"user logged out"))
        .await
        .unwrap();
    let (code, reason) = backend.wait_close(sb).await;
    assert_eq!((code, reason.as_str()), (4100, "user logged out"));
    // ... and the gateway echoes the close to the client.
    assert_eq!(b.expect_close(T).await.0, 4100);
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_close_codes_that_are_invalid_on_the_wire_become_1011() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr));
    gw.wait_ready(T).await;
    let mut c = Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await;
    let (s, _) = backend.next_open().await;
    backend.close(s, 1006, "nope");
    let (code, reason) = c.expect_close(T).await;
    assert_eq!(code, 1011);
    assert!(reason.contains("1006"), "{reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn session_open_carries_client_metadata_and_subprotocol() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .config(|c| c.listen.subprotocols = vec!["chat.v2".into(), "chat.v1".into()])
            .config(|c| {
                c.session.forward_headers = vec!["user-agent".into(), "x-app-version".into()]
            }),
    );
    gw.wait_ready(T).await;
    // The gateway lists chat.v2 first; the client prefers chat.v1. The
    // client's first offered protocol that the gateway supports wins.
    let opts = Connect {
        headers: vec![
            ("Sec-WebSocket-Protocol", "other, chat.v1, chat.v2".into()),
            ("User-Agent", "TestApp/1.0".into()),
            ("X-App-Version", "42".into()),
            ("X-Secret", "not forwarded".into()),
        ],
        ..Connect::default()
    };
    let (_ws, resp) = client::connect(gw.ws.unwrap(), "/ws?device=ios", &opts)
        .await
        .unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "chat.v1"
    );
    let (_, open) = backend.next_open().await;
    assert_eq!(open.path, "/ws?device=ios");
    assert_eq!(open.subprotocol, "chat.v1");
    assert!(
        open.remote_addr.starts_with("127.0.0.1:"),
        "{}",
        open.remote_addr
    );
    let headers: Vec<(String, String)> = open
        .headers
        .iter()
        .map(|h| (h.name.clone(), h.value.clone()))
        .collect();
    assert_eq!(
        headers,
        vec![
            ("user-agent".into(), "TestApp/1.0".into()),
            ("x-app-version".into(), "42".into())
        ]
    );
    // The other order picks the other protocol: the client's order decides.
    let opts = Connect {
        headers: vec![("Sec-WebSocket-Protocol", "chat.v2, chat.v1".into())],
        ..Connect::default()
    };
    let (_ws2, resp) = client::connect(gw.ws.unwrap(), "/ws", &opts).await.unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "chat.v2"
    );
    assert_eq!(backend.next_open().await.1.subprotocol, "chat.v2");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_and_invalid_messages_get_their_close_codes() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr).config(|c| c.session.max_message_size = kib(64)),
    );
    gw.wait_ready(T).await;
    let plain = Connect::default();

    // One frame over the limit.
    let mut c = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    let (s1, _) = backend.next_open().await;
    c.send_binary(&vec![7u8; 64 * 1024]).await; // exactly the limit: accepted
    assert_eq!(
        c.recv_within(T)
            .await
            .map(|m| matches!(m, Msg::Binary(b) if b.len() == 64 * 1024)),
        Some(true)
    );
    c.send_binary(&vec![7u8; 64 * 1024 + 1]).await;
    assert_eq!(c.expect_close(T).await.0, 1009);
    let (code, _) = backend.wait_close(s1).await;
    assert_eq!(code, 1009);

    // Fragments that are small alone but too big together.
    let mut c = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    for i in 0..3 {
        let f = fastwebsockets::Frame::new(
            false,
            if i == 0 {
                fastwebsockets::OpCode::Binary
            } else {
                fastwebsockets::OpCode::Continuation
            },
            None,
            fastwebsockets::Payload::Owned(vec![1u8; 30 * 1024]),
        );
        c.ws.write_frame(f).await.unwrap();
    }
    assert_eq!(c.expect_close(T).await.0, 1009);

    // Invalid UTF-8 in a text message, unfragmented and fragmented.
    let mut c = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    c.ws.write_frame(fastwebsockets::Frame::text(fastwebsockets::Payload::Owned(
        vec![b'o', 0xff, b'k'],
    )))
    .await
    .unwrap();
    assert_eq!(c.expect_close(T).await.0, 1007);
    let mut c = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    c.ws.write_frame(fastwebsockets::Frame::new(
        false,
        fastwebsockets::OpCode::Text,
        None,
        fastwebsockets::Payload::Owned(b"ok".to_vec()),
    ))
    .await
    .unwrap();
    c.ws.write_frame(fastwebsockets::Frame::new(
        true,
        fastwebsockets::OpCode::Continuation,
        None,
        fastwebsockets::Payload::Owned(vec![0xc3, 0x28]),
    ))
    .await
    .unwrap();
    assert_eq!(c.expect_close(T).await.0, 1007);

    // The gateway still serves everyone else.
    let mut ok = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    ok.echo("still here").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_text_from_the_backend_closes_only_that_session_with_1011() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).links(1));
    gw.wait_ready(T).await;
    let plain = Connect::default();
    let mut bad = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    let (s_bad, _) = backend.next_open().await;
    let mut good = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    let (s_good, _) = backend.next_open().await;
    backend.push(s_bad, &[0xff, 0xfe], true);
    assert_eq!(bad.expect_close(T).await.0, 1011);
    let (code, _) = backend.wait_close(s_bad).await;
    assert_eq!(code, 1011);
    // Same link, still fine.
    backend.push(s_good, b"fine", true);
    assert_eq!(good.recv_within(T).await, Some(Msg::Text("fine".into())));
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_that_are_not_upgrades_get_a_proper_http_answer() {
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr));
    gw.wait_ready(T).await;
    let addr = gw.ws.unwrap();
    assert_eq!(client::http_get(addr, "/ws").await.0, 426);
    assert_eq!(client::http_get(addr, "/elsewhere").await.0, 404);
    // A request target too long to forward to the backend.
    let long = format!("/ws?q={}", "x".repeat(4096));
    assert_eq!(client::http_get(addr, &long).await.0, 414);
}

#[tokio::test(flavor = "multi_thread")]
async fn admission_cap_and_missing_backend_refuse_with_503() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).config(|c| c.listen.max_sessions = 2));
    gw.wait_ready(T).await;
    let plain = Connect::default();
    let _a = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    let _b = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    backend.next_open().await;
    backend.next_open().await;
    match client::connect(gw.ws.unwrap(), "/ws", &plain).await {
        Err(fastwebsockets::WebSocketError::InvalidStatusCode(503)) => {}
        Err(e) => panic!("expected 503, got {e}"),
        Ok(_) => panic!("expected 503, got an upgrade"),
    }

    // A gateway whose backend is down refuses at once, and is not ready.
    let dead: std::net::SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw2 = Gateway::start(GatewayOpts::new(dead));
    let started = std::time::Instant::now();
    match client::connect(gw2.ws.unwrap(), "/ws", &plain).await {
        Err(fastwebsockets::WebSocketError::InvalidStatusCode(503)) => {}
        Err(e) => panic!("expected 503, got {e}"),
        Ok(_) => panic!("expected 503, got an upgrade"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusal must not hang"
    );
    assert_eq!(gw2.admin_get("/readyz").await.0, 503);
    assert_eq!(gw2.admin_get("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_sessions_messages_and_links() {
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr));
    gw.wait_ready(T).await;
    let mut c = Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await;
    for _ in 0..3 {
        c.send_text("m").await;
        c.recv_within(T).await;
    }
    gw.wait_metric("gateway_sessions_open", |v| v == 1.0, T)
        .await;
    gw.wait_links_up(2, T).await;
    gw.wait_metric(
        "gateway_messages_total{direction=\"client_to_backend\"",
        |v| v == 3.0,
        T,
    )
    .await;
    gw.wait_metric(
        "gateway_messages_total{direction=\"backend_to_client\"",
        |v| v == 3.0,
        T,
    )
    .await;
    c.ws.write_frame(fastwebsockets::Frame::close(1000, b""))
        .await
        .unwrap();
    c.expect_close(T).await;
    gw.wait_metric(
        "gateway_sessions_closed_total{reason=\"client_closed\"",
        |v| v == 1.0,
        T,
    )
    .await;
    gw.wait_metric("gateway_sessions_open", |v| v == 0.0, T)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_data_then_close_arrive_in_order() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr));
    gw.wait_ready(T).await;
    let mut c = Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await;
    let (s, _) = backend.next_open().await;
    for i in 0..50u8 {
        backend.push(s, &[i], false);
    }
    backend.close(s, 4003, "done");
    for i in 0..50u8 {
        assert_eq!(c.recv_within(T).await, Some(Msg::Binary(vec![i])));
    }
    assert_eq!(c.expect_close(T).await, (4003, "done".into()));
    // Counted as the backend's close.
    gw.wait_metric(
        "gateway_sessions_closed_total{reason=\"backend_closed\"",
        |v| v == 1.0,
        T,
    )
    .await;
}

/// The metrics no other test reads: refusals, message bytes, link connects,
/// link writes and frames written, refused resumes.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_refusals_bytes_link_writes_and_refused_resumes() {
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).config(|c| c.listen.max_sessions = 2));
    gw.wait_ready(T).await;
    gw.wait_links_up(2, T).await;
    let plain = Connect::default();
    let mut a = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    for m in ["hello", "world", "12345"] {
        a.echo(m).await;
    }
    for dir in ["client_to_backend", "backend_to_client"] {
        gw.wait_metric(
            &format!("gateway_message_bytes_total{{direction=\"{dir}\""),
            |v| v == 15.0,
            T,
        )
        .await;
    }
    gw.wait_metric("gateway_link_connects_total", |v| v == 2.0, T)
        .await;
    // Frames written counts the data frames (one per client message);
    // writes count every write to a link socket, batches included.
    gw.wait_metric("gateway_link_frames_written_total", |v| v == 3.0, T)
        .await;
    let writes = gw.metric("gateway_link_writes_total").await;
    assert!(writes >= 1.0, "link writes {writes}");

    // A resume with a credential nobody issued.
    let resume = Connect {
        headers: vec![
            ("X-Wsgw-Resume", "0123456789abcdef0123456789abcdef".into()),
            ("X-Wsgw-Received", "0".into()),
        ],
        ..Connect::default()
    };
    assert!(matches!(
        client::connect(gw.ws.unwrap(), "/ws", &resume).await,
        Err(fastwebsockets::WebSocketError::InvalidStatusCode(410))
    ));
    gw.wait_metric("gateway_resumes_refused_total", |v| v == 1.0, T)
        .await;

    // Over the session cap.
    let _b = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    assert!(matches!(
        client::connect(gw.ws.unwrap(), "/ws", &plain).await,
        Err(fastwebsockets::WebSocketError::InvalidStatusCode(503))
    ));
    gw.wait_metric("gateway_sessions_refused_total", |v| v == 1.0, T)
        .await;
}

//! README promises that had no test: HTTP refusals (405, 400, 410), the
//! pass-through close codes, TLS 1.2 and ALPN, resume switched off, a
//! silent drop (ping timeout) detaching a resumable session, drain
//! (readiness, refusals, detached sessions, SIGINT), JSON logs, and
//! configuration precedence as `--check-config` prints it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_tests::client::{self, Client, Connect, Msg};
use gateway_tests::raw::{http_head, upgrade_request, Frame as RawFrame, Raw};
use gateway_tests::{bin, Certs, Event, Gateway, GatewayOpts, TestBackend};
use gateway_tests::{ms, secs};
use protocol::Framing;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn refusals_before_the_upgrade_are_405_400_and_410() {
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .config(|c| c.listen.subprotocols = vec!["chat.v1".into()])
            .config(|c| c.listen.require_subprotocol = true),
    );
    gw.wait_ready(T).await;
    let addr = gw.ws.unwrap();
    let proto = "Sec-WebSocket-Protocol: chat.v1\r\n";
    // The same request, well-formed, is accepted: each refusal below is
    // for the one thing changed.
    assert_eq!(http_head(addr, &upgrade_request("/ws", proto)).await.0, 101);
    // Another method.
    let post = "POST /ws HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(http_head(addr, post).await.0, 405);
    // A malformed upgrade: no Sec-WebSocket-Key.
    let no_key = upgrade_request("/ws", proto)
        .replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
    assert_eq!(http_head(addr, &no_key).await.0, 400);
    // require_subprotocol: none offered, or none accepted.
    assert_eq!(http_head(addr, &upgrade_request("/ws", "")).await.0, 400);
    let other = "Sec-WebSocket-Protocol: chat.v9\r\n";
    assert_eq!(http_head(addr, &upgrade_request("/ws", other)).await.0, 400);
    // A resume without X-Wsgw-Received.
    let resume = format!("{proto}X-Wsgw-Resume: 0123456789abcdef0123456789abcdef\r\n");
    assert_eq!(
        http_head(addr, &upgrade_request("/ws", &resume)).await.0,
        400
    );
    // ... and with it, for a session that does not exist: 410.
    let resume = format!("{resume}X-Wsgw-Received: 0\r\n");
    assert_eq!(
        http_head(addr, &upgrade_request("/ws", &resume)).await.0,
        410
    );
}

/// Both 503 refusals carry `Retry-After`: the session cap, and no link up.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_with_503_carry_retry_after() {
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).config(|c| c.listen.max_sessions = 1));
    gw.wait_ready(T).await;
    let _held = Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await;
    let (status, head) = http_head(gw.ws.unwrap(), &upgrade_request("/ws", "")).await;
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("\r\nretry-after:"), "session cap: {head}");

    let dead: std::net::SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw2 = Gateway::start(GatewayOpts::new(dead));
    let (status, head) = http_head(gw2.ws.unwrap(), &upgrade_request("/ws", "")).await;
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("\r\nretry-after:"), "no link up: {head}");
}

/// RFC 6455 4.2.1: the opening handshake is a GET; the README promises
/// 405 for another method.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_with_another_method_is_refused_with_405() {
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr));
    gw.wait_ready(T).await;
    let addr = gw.ws.unwrap();
    assert_eq!(http_head(addr, &upgrade_request("/ws", "")).await.0, 101);
    for method in ["POST", "DELETE"] {
        let req = upgrade_request("/ws", "").replacen("GET", method, 1);
        assert_eq!(http_head(addr, &req).await.0, 405, "{method} upgrade");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_close_codes_1000_1001_1003_1013_1014_pass_through() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr));
    gw.wait_ready(T).await;
    let codes = [1000u16, 1001, 1003, 1013, 1014, 3000, 4999];
    let mut got = Vec::new();
    for code in codes {
        // A raw client: fastwebsockets (the Rust test client) refuses
        // 1014 itself, its close-code table predating that code.
        let mut c = Raw::connect(gw.ws.unwrap(), &[]).await.unwrap();
        let (s, _) = backend.next_open().await;
        backend.close(s, code, "from the backend");
        got.push(c.next(T).await.unwrap());
    }
    let want: Vec<_> = codes.iter().map(|c| Some(RawFrame::Close(*c))).collect();
    assert_eq!(got, want);
}

fn tls_client(
    certs: &Certs,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(certs.ca()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

#[tokio::test(flavor = "multi_thread")]
async fn wss_speaks_tls_1_2_and_1_3_and_chooses_http_1_1_by_alpn() {
    let certs = Certs::new();
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).tls(&certs));
    gw.wait_ready(T).await;
    for (version, name) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let cfg = tls_client(&certs, &[version], &[b"h2", b"http/1.1"]);
        let tcp = TcpStream::connect(gw.wss.unwrap()).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.protocol_version(), Some(name));
        assert_eq!(conn.alpn_protocol(), Some(&b"http/1.1"[..]), "{name:?}");
        drop(tls);
        // And a WebSocket session works over it.
        let opts = Connect {
            tls: Some(cfg),
            ..Connect::default()
        };
        let mut c = Client::connect(gw.wss.unwrap(), "/ws", &opts).await;
        c.echo("over tls").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_resume_disabled_a_request_for_resume_gets_a_plain_session() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).config(|c| c.resume.enabled = false));
    gw.wait_ready(T).await;
    let opts = Connect {
        headers: vec![("X-Wsgw-Resume", "new".into())],
        ..Connect::default()
    };
    let (ws, resp) = client::connect(gw.ws.unwrap(), "/ws", &opts).await.unwrap();
    assert!(
        resp.headers().get("x-wsgw-resume").is_none(),
        "no resume token when resume is off: {:?}",
        resp.headers()
    );
    let (s, _) = backend.next_open().await;
    drop(ws);
    // Lost means closed: no detach.
    let code = backend
        .wait_for(|e| match e {
            Event::Detached { session, .. } if *session == s => panic!("detached"),
            Event::Close { session, code, .. } if *session == s => Some(*code),
            _ => None,
        })
        .await;
    assert_eq!(code, 1006);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resumable_client_that_goes_silent_detaches_on_ping_timeout_and_resumes() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .config(|c| c.session.ping_interval = ms(300))
            .config(|c| c.session.ping_timeout = ms(300)),
    );
    gw.wait_ready(T).await;
    let opts = Connect {
        headers: vec![("X-Wsgw-Resume", "new".into())],
        ..Connect::default()
    };
    // The socket stays open but is never read again: no FIN, no RST, no
    // pong (a phone in a tunnel).
    let (silent, resp) = client::connect(gw.ws.unwrap(), "/ws", &opts).await.unwrap();
    let token = resp.headers()["x-wsgw-resume"].to_str().unwrap().to_owned();
    let (s, _) = backend.next_open().await;
    let reason = backend
        .wait_for(|e| match e {
            Event::Detached { session, reason } if *session == s => Some(reason.clone()),
            Event::Close {
                session, reason, ..
            } if *session == s => panic!("closed: {reason}"),
            _ => None,
        })
        .await;
    assert!(reason.contains("ping"), "{reason}");
    backend.push(s, b"while away", true);
    let opts = Connect {
        headers: vec![("X-Wsgw-Resume", token), ("X-Wsgw-Received", "0".into())],
        ..Connect::default()
    };
    let (ws, _) = client::connect(gw.ws.unwrap(), "/ws", &opts).await.unwrap();
    let mut c = Client::from_ws(ws);
    assert_eq!(c.recv_within(T).await, Some(Msg::Text("while away".into())));
    drop(silent);
}

/// SIGTERM (and SIGINT, the same): readiness goes 503 at once, new clients
/// are refused, messages sent before the signal reach the backend before
/// its `close{1001}`, detached sessions are closed with 1001 too, and the
/// process exits 0 within the drain deadline.
async fn drain(signal: &str, in_flight: bool) {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let mut gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .config(|c| c.shutdown.drain_timeout = secs(3))
            .config(|c| c.session.close_timeout = secs(2)),
    );
    gw.wait_ready(T).await;
    // A client that never reads: the gateway waits for its close reply, so
    // the drain lasts long enough to look at.
    let (stuck, _) = client::connect(gw.ws.unwrap(), "/ws", &Connect::default())
        .await
        .unwrap();
    let (s_stuck, _) = backend.next_open().await;
    // A client that sends, then the signal at once.
    let mut c = Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await;
    let (s, _) = backend.next_open().await;
    // A detached resumable session.
    let opts = Connect {
        headers: vec![("X-Wsgw-Resume", "new".into())],
        ..Connect::default()
    };
    let (gone, _) = client::connect(gw.ws.unwrap(), "/ws", &opts).await.unwrap();
    let (s_detached, _) = backend.next_open().await;
    drop(gone);
    backend
        .wait_for(|e| {
            matches!(e, Event::Detached { session, .. } if *session == s_detached).then_some(())
        })
        .await;

    for i in 0..20 {
        c.send_text(&format!("m{i}")).await;
    }
    let signalled = Instant::now();
    gw.proc.signal(signal);
    // Readiness and new clients, while the drain is under way.
    loop {
        // An admin listener already closed is "not ready" to a load
        // balancer too.
        let Ok(tcp) = TcpStream::connect(gw.admin.unwrap()).await else {
            break;
        };
        drop(tcp);
        let (status, _) = gw.admin_get("/readyz").await;
        if status == 503 {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "/readyz still {status}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match TcpStream::connect(gw.ws.unwrap()).await {
        // Stopped accepting: refused outright.
        Err(_) => {}
        Ok(mut tcp) => {
            tcp.write_all(upgrade_request("/ws", "").as_bytes())
                .await
                .unwrap();
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(T, tcp.read(&mut buf))
                .await
                .unwrap()
                .unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
            assert!(
                n == 0 || (head.starts_with("http/1.1 503") && head.contains("retry-after")),
                "a new client during the drain: {head}"
            );
        }
    }
    assert_eq!(c.expect_close(T).await.0, 1001);
    // Every message sent before the signal arrives, in order, before the
    // session's close.
    let mut got = 0;
    let mut closed = Vec::new();
    while closed.len() < 3 {
        match backend.next().await {
            Event::Data {
                session, payload, ..
            } if session == s => {
                assert!(!closed.contains(&s), "data after close");
                assert_eq!(payload, format!("m{got}").as_bytes());
                got += 1;
            }
            Event::Close { session, code, .. } => {
                assert_eq!(code, 1001, "session {session}");
                closed.push(session);
            }
            _ => {}
        }
    }
    if in_flight {
        assert_eq!(got, 20, "messages sent before the signal");
    }
    closed.sort_unstable();
    let mut want = vec![s, s_stuck, s_detached];
    want.sort_unstable();
    assert_eq!(closed, want);
    let code = tokio::task::spawn_blocking(move || {
        let code = gw.proc.wait_exit(Duration::from_secs(8));
        (code, gw)
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0), "exit status after {signal}");
    assert!(
        signalled.elapsed() < Duration::from_secs(3 + 3),
        "exit after {:?}: beyond the 3 s drain deadline (+ link flush)",
        signalled.elapsed()
    );
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_readiness_refusals_in_flight_messages_and_detached_sessions() {
    drain("TERM", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_drains_like_sigterm() {
    drain("INT", false).await;
}

/// Messages the client had sent (written to its socket) before SIGTERM
/// reach the backend before the session's `close{1001}` (the drain lets
/// in-flight work finish).
#[tokio::test(flavor = "multi_thread")]
async fn messages_sent_just_before_sigterm_reach_the_backend() {
    drain("TERM", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr).config(|c| c.log.format = gateway::config::LogFormat::Json),
    );
    gw.wait_ready(T).await;
    // An ordinary client that comes and goes: logged at debug only.
    let mut plain = Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await;
    let (s_plain, _) = backend.next_open().await;
    plain
        .ws
        .write_frame(fastwebsockets::Frame::close(1000, b""))
        .await
        .unwrap();
    plain.expect_close(T).await;
    backend.wait_close(s_plain).await;
    // Invalid backend data: logged at warn, with the session's id.
    let mut c = Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await;
    let (s, _) = backend.next_open().await;
    backend.push(s, &[0xff], true);
    assert_eq!(c.expect_close(T).await.0, 1011);
    let start = Instant::now();
    let lines: Vec<serde_json::Value> = loop {
        let err = gw.proc.stderr();
        let lines: Vec<serde_json::Value> = err
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        if lines.iter().any(|v| v["level"] == "WARN") {
            break lines;
        }
        assert!(
            start.elapsed() < T,
            "no warn line for invalid backend data:\n{err}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for v in &lines {
        assert!(v.is_object(), "{v}");
    }
    let mentions = |v: &serde_json::Value, key: &str, want: &serde_json::Value| {
        v["fields"][key] == *want || v["span"][key] == *want
    };
    // Lines about a link carry its endpoint and index.
    let endpoint = serde_json::Value::from(backend.addr.to_string());
    assert!(
        lines.iter().any(|v| mentions(v, "endpoint", &endpoint)
            && (mentions(v, "index", &0.into()) || mentions(v, "index", &1.into()))),
        "no link line with endpoint and index: {lines:?}"
    );
    // The warn line names the session; the plain client's close is no
    // warning.
    let warns: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["level"] == "WARN" || v["level"] == "ERROR")
        .collect();
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(mentions(warns[0], "session", &s.into()), "{}", warns[0]);
}

/// Sources, later ones winning: defaults < file < environment < flags.
#[test]
fn configuration_precedence_is_defaults_file_env_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(
        &file,
        "[listen]\nws = [\"127.0.0.1:0\"]\n[backend]\nendpoints = [\"127.0.0.1:1\"]\n\
         links_per_endpoint = 3\nheartbeat_interval = \"7s\"\nconnect_timeout = \"4s\"\n",
    )
    .unwrap();
    let out = Command::new(bin("gateway"))
        .args(["--check-config", "--config", file.to_str().unwrap()])
        .args(["--set", "backend.connect_timeout=\"9s\""])
        .env("GATEWAY_BACKEND__HEARTBEAT_INTERVAL", "8s")
        .env("GATEWAY_BACKEND__CONNECT_TIMEOUT", "6s")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let printed = format!("{stdout}{stderr}");
    // It prints the effective configuration as `key: value,` lines.
    let value = |key: &str| -> String {
        printed
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("--check-config does not print {key}:\n{printed}"))
            .trim_end_matches(',')
            .to_owned()
    };
    assert_eq!(
        value("links_per_endpoint"),
        "3",
        "the file beats the default"
    );
    assert_eq!(value("heartbeat_interval"), "8s", "env beats the file");
    assert_eq!(value("connect_timeout"), "9s", "flags beat env");
    assert_eq!(value("handshake_timeout"), "5s", "the default stays");
}

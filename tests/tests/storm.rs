//! Reconnect storms: TLS session resumption for clients coming back, and
//! the cap on concurrent TLS handshakes (`listen.max_handshakes`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gateway_tests::client::{self, Client, Connect};
use gateway_tests::{secs, Certs, Gateway, GatewayOpts, TestBackend};
use protocol::Framing;
use rustls::HandshakeKind;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

/// More clients than rustls' default server session cache holds (256
/// entries; a TLS 1.3 connection takes two of them).
const OTHERS: usize = 400;

#[tokio::test(flavor = "multi_thread")]
async fn a_client_coming_back_resumes_its_tls_session_after_many_others_connected() {
    let certs = Certs::new();
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).tls(&certs));
    gw.wait_ready(T).await;
    let wss = gw.wss.unwrap();
    for (version, name) in [
        (&rustls::version::TLS13, "TLS 1.3"),
        (&rustls::version::TLS12, "TLS 1.2"),
    ] {
        // The phone: its own session store, a session with one round trip
        // (reading the answer also reads the TLS 1.3 tickets).
        let phone = client::tls_config_versions(&certs.ca(), &[version]);
        let opts = Connect {
            tls: Some(phone.clone()),
            ..Connect::default()
        };
        Client::connect(wss, "/ws", &opts).await.echo("first").await;
        // Everyone else connects meanwhile (each a first, full handshake).
        for _ in 0..OTHERS {
            let other = client::tls_config_versions(&certs.ca(), &[version]);
            let tls = client::tls_connect(wss, &other).await.unwrap();
            assert_eq!(tls.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
        }
        // The phone comes back.
        let tls = client::tls_connect(wss, &phone).await.unwrap();
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{name}: the returning client paid a full handshake"
        );
        drop(tls);
        // And a session works over a resumed connection.
        Client::connect(wss, "/ws", &opts).await.echo("back").await;
    }
    // Counted by kind: the phone's two returns per version were resumed.
    let resumed = r#"gateway_tls_handshakes_total{kind="resumed""#;
    gw.wait_metric(resumed, |v| v == 4.0, T).await;
    let full = r#"gateway_tls_handshakes_total{kind="full""#;
    gw.wait_metric(full, |v| v == 2.0 * (OTHERS + 1) as f64, T)
        .await;
}

/// The `gateway_sessions_refused_total` count of one reason (0 before the
/// first).
async fn refused(gw: &Gateway, reason: &str) -> f64 {
    let (_, body) = gw.admin_get("/metrics").await;
    let label = format!(r#"reason="{reason}""#);
    body.lines()
        .filter(|l| l.starts_with("gateway_sessions_refused_total{") && l.contains(&label))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// Waits until [`refused`] for `reason` is `n`.
async fn wait_refused(gw: &Gateway, reason: &str, n: f64) {
    let start = std::time::Instant::now();
    loop {
        let v = refused(gw, reason).await;
        if v == n {
            return;
        }
        assert!(start.elapsed() < T, "refused {reason}: {v}, expected {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP connection that sends the start of a ClientHello and stalls: it
/// holds a handshake slot until `tls_handshake_timeout`.
async fn stalled_client_hello(gw: &Gateway) -> TcpStream {
    let mut s = TcpStream::connect(gw.wss.unwrap()).await.unwrap();
    s.write_all(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])
    .await
    .unwrap();
    s
}

/// With one handshake slot: a silent connection takes none; a stalled
/// handshake holds it, later handshakes queue while established sessions
/// keep echoing; a queued one whose deadline comes first is refused
/// (`tls_busy`); when the stalled one times out the next proceeds.
///
/// The order of deadlines, not the speed of the machine, decides each
/// outcome: the margins between them are 0.5 s and 2 s.
#[tokio::test(flavor = "multi_thread")]
async fn tls_handshakes_queue_for_max_handshakes_while_sessions_echo() {
    let certs = Certs::new();
    let backend = TestBackend::start(Framing::Varint, true).await;
    let timeout = secs(5);
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .tls(&certs)
            .config(|c| c.listen.max_handshakes = 1)
            .config(|c| c.listen.tls_handshake_timeout = timeout),
    );
    gw.wait_ready(T).await;
    let wss = gw.wss.unwrap();
    let opts = Connect {
        tls: Some(client::tls_config(&certs.ca())),
        ..Connect::default()
    };

    // A connection that says nothing holds no slot: a session connects
    // while it sits there (before its deadline cuts it).
    let _silent = TcpStream::connect(wss).await.unwrap();
    let mut established = Client::connect(wss, "/ws", &opts).await;
    established.echo("while a client is silent").await;
    assert_eq!(refused(&gw, "tls_timeout").await, 0.0);

    // W connects now and sends its ClientHello only later, so its deadline
    // falls before that of the stalled handshake.
    let w_tcp = TcpStream::connect(wss).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stalled = stalled_client_hello(&gw).await;
    gw.wait_metric("gateway_tls_handshakes_active", |v| v == 1.0, T)
        .await;

    // C arrives 2 s after the stalled one, so that it still has 2 s left
    // when the stalled one is cut. Then W sends its ClientHello.
    tokio::time::sleep(secs(2)).await;
    let c_opts = opts.clone();
    let c = tokio::spawn(async move {
        let mut c = Client::connect(wss, "/ws", &c_opts).await;
        c.echo("after the queue").await;
    });
    gw.wait_metric("gateway_tls_handshakes_waiting", |v| v == 1.0, T)
        .await;
    let w_cfg = client::tls_config(&certs.ca());
    let w = tokio::spawn(async move { client::tls_over(w_tcp, &w_cfg).await.map(drop) });
    gw.wait_metric("gateway_tls_handshakes_waiting", |v| v == 2.0, T)
        .await;
    assert!(!c.is_finished(), "C handshook past the cap");
    // Established sessions do not wait for handshake slots.
    for i in 0..10 {
        established.echo(&format!("during the queue {i}")).await;
    }

    // W's deadline comes while the slot is still held: refused as busy.
    let w = tokio::time::timeout(timeout + T, w).await.unwrap().unwrap();
    assert!(w.is_err(), "W should have been cut while waiting");
    wait_refused(&gw, "tls_busy", 1.0).await;

    // The stalled handshake is cut at its deadline, and C proceeds.
    tokio::time::timeout(timeout + T, c).await.unwrap().unwrap();
    drop(stalled);
    // The silent connection and the stalled handshake timed out.
    wait_refused(&gw, "tls_timeout", 2.0).await;
    assert_eq!(refused(&gw, "tls_busy").await, 1.0);
    gw.wait_metric("gateway_tls_handshakes_waiting", |v| v == 0.0, T)
        .await;
    established.echo("after the storm").await;
}

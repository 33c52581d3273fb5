//! Things going wrong: the backend dies and returns, a client stops reading,
//! clients that never finish their handshakes or stop answering pings,
//! shutdown, and bad configuration.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use gateway_tests::client::{self, Client, Connect, Msg};
use gateway_tests::{bin, Certs, Event, Gateway, GatewayOpts, TestBackend};
use gateway_tests::{kib, mib, ms, secs};
use protocol::Framing;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

/// Peak RSS growth allowed while 64 MiB are pushed at a client whose queue
/// is 1 MiB: the queue, the link's read chunks, and allocator slack. Well
/// under the 64 MiB pushed, so holding even a tenth of them fails.
const SLOW_CONSUMER_RSS_BOUND_KIB: u64 = 4 * 1024;

/// Peak RSS growth allowed while a client sends 64 MiB towards a stuck
/// backend whose link queue is 256 KiB: that queue, one message in
/// reassembly, buffers, and allocator slack.
const STUCK_LINK_RSS_BOUND_KIB: u64 = 3 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn backend_death_closes_clients_with_1012_and_links_come_back_by_themselves() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let addr = backend.addr;
    let gw = Gateway::start(
        GatewayOpts::new(addr)
            .config(|c| c.backend.reconnect_min = ms(50))
            .config(|c| c.backend.reconnect_max = ms(500)),
    );
    gw.wait_ready(T).await;
    let plain = Connect::default();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Client::connect(gw.ws.unwrap(), "/ws", &plain).await);
        backend.next_open().await;
    }

    let killed = Instant::now();
    backend.kill();
    for c in &mut clients {
        let (code, _) = c.expect_close(Duration::from_secs(5)).await;
        assert_eq!(code, 1012, "clients are told to reconnect");
    }
    assert!(killed.elapsed() < Duration::from_secs(5));
    // While the backend is down: not ready, and new clients are refused.
    assert_eq!(gw.admin_get("/readyz").await.0, 503);
    assert!(matches!(
        client::connect(gw.ws.unwrap(), "/ws", &plain).await,
        Err(fastwebsockets::WebSocketError::InvalidStatusCode(503))
    ));

    // The backend returns on the same address; so do the links.
    let backend = TestBackend::start_on(addr, Framing::Varint, true).await;
    gw.wait_ready(T).await;
    let mut c = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    c.echo("back again").await;
    // Both links return, not just the first.
    gw.wait_links_up(2, T).await;
    drop(backend);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_closed_as_slow_consumer_without_hurting_others() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .links(1)
            .config(|c| c.session.client_queue_bytes = mib(1)),
    );
    gw.wait_ready(T).await;
    let plain = Connect::default();
    let slow = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    let (s_slow, _) = backend.next_open().await;
    let mut fast = Client::connect(gw.ws.unwrap(), "/ws", &plain).await;
    backend.next_open().await;
    let rss_before = gw.proc.rss_kib();

    // Flood the slow client (which never reads) with 64 MiB; the other
    // client on the same link keeps doing round trips meanwhile.
    let chunk = vec![0xabu8; 16 * 1024];
    for _ in 0..4096 {
        backend.push(s_slow, &chunk, false);
    }
    let mut worst = Duration::ZERO;
    for i in 0..200 {
        let sent = Instant::now();
        fast.send_text(&format!("ping {i}")).await;
        assert_eq!(
            fast.recv_within(T).await,
            Some(Msg::Text(format!("ping {i}")))
        );
        worst = worst.max(sent.elapsed());
    }
    let (code, _) = backend.wait_close(s_slow).await;
    assert_eq!(code, 1008, "the backend is told: slow consumer");
    gw.wait_metric("gateway_slow_consumer_closes_total", |v| v == 1.0, T)
        .await;
    // Not a latency benchmark: only that the other client was never stuck
    // behind the slow one (which would take until its write timeout).
    assert!(
        worst < Duration::from_secs(2),
        "other client stalled for {worst:?}"
    );
    // 64 MiB were pushed at it; the gateway held at most its queue bound
    // (1 MiB) plus the link's read chunk and allocator slack.
    let grew = gw.proc.peak_rss_kib().saturating_sub(rss_before);
    println!("slow consumer: peak RSS grew by {grew} KiB");
    assert!(
        grew < SLOW_CONSUMER_RSS_BOUND_KIB,
        "gateway peak RSS grew by {grew} KiB (client queue 1 MiB)"
    );
    drop(slow);
}

async fn assert_cut_within(mut s: TcpStream, what: &str, min: Duration, max: Duration) {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(max + Duration::from_secs(2), s.read(&mut buf)).await {
            Err(_) => panic!("{what}: still open after {:?}", start.elapsed()),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {} // e.g. a 408 or an alert before the close
        }
    }
    let took = start.elapsed();
    assert!(
        took >= min && took <= max,
        "{what}: cut after {took:?}, expected {min:?}..{max:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_and_half_handshakes_are_cut_at_the_configured_timeout() {
    let certs = Certs::new();
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .tls(&certs)
            .config(|c| c.listen.tls_handshake_timeout = secs(1))
            .config(|c| c.listen.http_header_timeout = secs(1)),
    );
    gw.wait_ready(T).await;
    let (lo, hi) = (Duration::from_millis(900), Duration::from_secs(3));

    // TCP only, nothing sent: on the wss port and on the ws port.
    let s = TcpStream::connect(gw.wss.unwrap()).await.unwrap();
    assert_cut_within(s, "silent TLS client", lo, hi).await;
    let s = TcpStream::connect(gw.ws.unwrap()).await.unwrap();
    assert_cut_within(s, "silent HTTP client", lo, hi).await;

    // Half a TLS ClientHello (a record header announcing more than is sent).
    let mut s = TcpStream::connect(gw.wss.unwrap()).await.unwrap();
    s.write_all(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])
    .await
    .unwrap();
    assert_cut_within(s, "half TLS handshake", lo, hi).await;

    // Half an HTTP upgrade request (headers never finished).
    let mut s = TcpStream::connect(gw.ws.unwrap()).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    assert_cut_within(s, "half HTTP request", lo, hi).await;

    // TLS done, then silence.
    let tcp = TcpStream::connect(gw.wss.unwrap()).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client::tls_config(&certs.ca()));
    let mut tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "TLS client that sends no request must be cut"
    );
    assert!(start.elapsed() <= hi, "cut after {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_answering_pings_is_dropped_and_the_backend_told() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .config(|c| c.session.ping_interval = ms(500))
            .config(|c| c.session.ping_timeout = ms(500)),
    );
    gw.wait_ready(T).await;
    // A connected client that never reads again (so never answers a ping),
    // like a phone that went into a tunnel.
    let (_ws, _) = client::connect(gw.ws.unwrap(), "/ws", &Connect::default())
        .await
        .unwrap();
    let (s, _) = backend.next_open().await;
    // A client that reads (and so answers pings) stays.
    let mut alive = Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await;
    let (s_alive, _) = backend.next_open().await;
    let alive_task = tokio::spawn(async move {
        // Reading answers pings; nothing else arrives.
        let r = tokio::time::timeout(Duration::from_secs(3), alive.recv()).await;
        (r.is_err(), alive)
    });
    let start = Instant::now();
    let (code, reason) = backend
        .wait_for(|e| match e {
            Event::Close {
                session,
                code,
                reason,
            } if *session == s => Some((*code, reason.clone())),
            Event::Close { session, .. } if *session == s_alive => panic!("live client dropped"),
            _ => None,
        })
        .await;
    assert_eq!(code, 1006);
    assert!(reason.contains("ping"), "{reason}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    let (timed_out, mut alive) = alive_task.await.unwrap();
    assert!(timed_out, "the live client received something unexpected");
    alive.echo("still here").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_sessions_with_1001_tells_the_backend_and_exits() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let mut gw = Gateway::start(
        GatewayOpts::new(backend.addr).config(|c| c.shutdown.drain_timeout = secs(5)),
    );
    gw.wait_ready(T).await;
    let mut clients = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await);
        sessions.push(backend.next_open().await.0);
    }
    gw.proc.sigterm();
    for c in &mut clients {
        assert_eq!(c.expect_close(T).await.0, 1001);
    }
    let mut closed = Vec::new();
    while closed.len() < sessions.len() {
        if let Event::Close { session, code, .. } = backend.next().await {
            assert_eq!(code, 1001);
            closed.push(session);
        }
    }
    closed.sort_unstable();
    sessions.sort_unstable();
    assert_eq!(closed, sessions);
    let code = tokio::task::spawn_blocking(move || gw.proc.wait_exit(Duration::from_secs(8)))
        .await
        .unwrap();
    assert_eq!(
        code,
        Some(0),
        "gateway must exit cleanly within the drain deadline"
    );
}

fn run_gateway(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(bin("gateway"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_exits_non_zero_naming_the_key() {
    let (code, err) = run_gateway(&["--backend", "127.0.0.1:1"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("listen"), "{err}");

    let (code, err) = run_gateway(
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:1",
            "--set",
            "session.max_message_size=\"lots\"",
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("max_message_size"), "{err}");

    let (code, err) = run_gateway(
        &["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"],
        &[("GATEWAY_SESSION__PING_INTERVAL", "soon")],
    );
    assert_eq!(code, 2);
    assert!(err.to_lowercase().contains("ping_interval"), "{err}");

    let (code, err) = run_gateway(
        &["--listen-tls", "127.0.0.1:0", "--backend", "127.0.0.1:1"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("tls.cert"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[backend]\nendpoints = [\"127.0.0.1:1\"]\nlinks_per_endpont = 3\n",
    )
    .unwrap();
    let (code, err) = run_gateway(
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("links_per_endpont"), "{err}");
}

/// Retired keys still start the gateway (an old configuration must not
/// stop a deploy), and each says, as a warning, that it is ignored.
#[test]
fn retired_keys_are_accepted_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.toml");
    std::fs::write(
        &path,
        "[listen]\nws = [\"127.0.0.1:0\"]\n[backend]\nendpoints = [\"127.0.0.1:1\"]\n\
         [session]\nclient_queue_messages = 256\n[resume]\nbuffer_messages = 256\n",
    )
    .unwrap();
    let (code, err) = run_gateway(&["--check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    for key in ["session.client_queue_messages", "resume.buffer_messages"] {
        assert!(
            err.lines()
                .any(|l| l.contains("warning") && l.contains(key) && l.contains("ignored")),
            "no warning for {key}: {err}"
        );
    }
}

#[test]
fn example_configuration_checks_out() {
    let example = gateway_tests::repo_root().join("deploy/gateway.example.toml");
    let example = example.to_str().unwrap();
    // As shipped, it names certificate files that do not exist here.
    let (code, err) = run_gateway(&["--check-config", "--config", example], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("tls.cert"), "{err}");
    let certs = gateway_tests::Certs::new();
    let (cert, key) = (certs.cert(), certs.key());
    let (code, err) = run_gateway(
        &[
            "--check-config",
            "--config",
            example,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    // The file can also be named in the environment.
    let (code, err) = run_gateway(
        &[
            "--check-config",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[("GATEWAY_CONFIG", example)],
    );
    assert_eq!(code, 0, "{err}");
}

/// A stuck backend: the link queue fills, the gateway stops reading from the
/// clients (their sends block), memory stays bounded, and when the backend
/// recovers every accepted message arrives, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_backend_pauses_clients_and_loses_nothing() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .links(1)
            .config(|c| c.session.max_message_size = kib(64))
            .config(|c| c.backend.max_frame_size = kib(68))
            .config(|c| c.backend.link_queue_bytes = kib(256))
            // A paused client cannot answer pings; it must not be taken
            // for dead while the gateway is the one not reading.
            .config(|c| c.session.ping_interval = ms(300))
            .config(|c| c.session.ping_timeout = ms(300)),
    );
    gw.wait_ready(T).await;
    let mut c = Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await;
    let (s, _) = backend.next_open().await;
    let rss_before = gw.proc.rss_kib();
    backend.pause_reading(true);

    // 4,000 messages of 16 KiB = 64 MiB, far more than every buffer on the
    // way; the sender must end up blocked rather than the gateway growing.
    const N: usize = 4000;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let sender = tokio::spawn(async move {
        for i in 0..N {
            let mut m = vec![0u8; 16 * 1024];
            m[..8].copy_from_slice(&(i as u64).to_be_bytes());
            c.send_binary(&m).await;
            counter.store(i + 1, std::sync::atomic::Ordering::SeqCst);
        }
        c
    });
    // Observe the pause directly: the client's sends stop completing (its
    // count stays put for a whole second) well before all were sent.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut since) = (usize::MAX, Instant::now());
    let stuck_at = loop {
        let now = sent.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            now < N,
            "64 MiB went through a stuck backend: the client was never paused"
        );
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(1) {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the client's sends never stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!sender.is_finished());
    // What the gateway holds for a paused link: the link queue, plus a
    // message being read from each client (64 KiB max here); the client's
    // bytes beyond that wait in the kernel's socket buffers, not in RSS.
    let grew = gw.proc.peak_rss_kib().saturating_sub(rss_before);
    println!("paused after {stuck_at} messages; peak RSS grew by {grew} KiB");
    assert!(
        grew < STUCK_LINK_RSS_BOUND_KIB,
        "gateway peak RSS grew by {grew} KiB while the backend was stuck \
         (link queue 256 KiB)"
    );

    backend.pause_reading(false);
    let mut next = 0u64;
    while next < N as u64 {
        if let Event::Data {
            session, payload, ..
        } = backend.next().await
        {
            assert_eq!(session, s);
            let seq = u64::from_be_bytes(payload[..8].try_into().unwrap());
            assert_eq!(seq, next, "messages must arrive once each, in order");
            next += 1;
        }
    }
    let _c = sender.await.unwrap();
}

/// The README's worst case for a stuck backend is what a user measures:
/// with the backend not reading, clients sending 16 KiB messages flat out
/// make the gateway hold at most `link_queue_bytes` for the link, plus a
/// read buffer per client. (It was 1.5 to 2 times the queue: payloads kept
/// in shared read buffers, and read buffers that grew to megabytes.)
#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_link_holds_no_more_than_link_queue_bytes() {
    const QUEUE_MIB: u64 = 32;
    const CLIENTS: usize = 16;
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .links(1)
            .config(|c| c.backend.link_queue_bytes = mib(QUEUE_MIB))
            .config(|c| c.session.ping_interval = secs(60)),
    );
    gw.wait_ready(T).await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await);
        backend.next_open().await;
    }
    let rss_before = gw.proc.rss_kib();
    backend.pause_reading(true);

    // Each client sends until its sends stop completing: far more in all
    // (16 x 8 MiB) than the link queue holds.
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for mut c in clients {
        let sent = sent.clone();
        senders.push(tokio::spawn(async move {
            let m = vec![7u8; 16 * 1024];
            for _ in 0..512 {
                c.send_binary(&m).await;
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (usize::MAX, Instant::now());
    loop {
        let now = sent.load(std::sync::atomic::Ordering::SeqCst);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(2) {
            break;
        }
        assert!(Instant::now() < deadline, "the clients were never paused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held_mib = last as u64 * 16 / 1024;
    assert!(
        held_mib >= QUEUE_MIB - 1,
        "only {last} messages ({held_mib} MiB) were accepted before the pause"
    );
    // The queue; per client a 64 KiB read and the message being read; and
    // 10 MiB of allocator slack (measured: 1.10-1.17 x the queue in all
    // with glibc's malloc, 1.29 with jemalloc, whose size classes round a
    // block just over 16 KiB up to 20 KiB).
    let bound = QUEUE_MIB * 1024 + CLIENTS as u64 * 128 + 10 * 1024;
    let grew = gw.proc.peak_rss_kib().saturating_sub(rss_before);
    println!("paused after {last} messages; peak RSS grew by {grew} KiB (bound {bound} KiB)");
    assert!(
        grew < bound,
        "gateway peak RSS grew by {grew} KiB with a {QUEUE_MIB} MiB link queue"
    );
    backend.pause_reading(false);
    for s in senders {
        s.await.unwrap();
    }
}

/// A backend burst is not a slow client: 10,000 messages of 100 B written
/// to one session at once (a history sync) all reach a client that reads,
/// in order, plain or resumable, and the gateway holds no more for them
/// than the client queue counts (10,000 x (100 + 64) B). The burst is above
/// half the 2 MiB queue: the client has `write_timeout` to drain it.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_burst_of_10000_small_messages_reaches_a_reading_client() {
    const N: u32 = 10_000;
    for opts in [Connect::default(), Connect::resume("new")] {
        // A gateway per case: its peak RSS is this case's.
        let mut backend = TestBackend::start(Framing::Varint, false).await;
        let gw = Gateway::start(
            GatewayOpts::new(backend.addr)
                .links(1)
                .config(|c| c.session.client_queue_bytes = mib(2)),
        );
        gw.wait_ready(T).await;
        let mut c = Client::connect(gw.ws.unwrap(), "/ws", &opts).await;
        let (s, _) = backend.next_open().await;
        let rss_before = gw.proc.rss_kib();
        for i in 0..N {
            let mut m = [0u8; 100];
            m[..4].copy_from_slice(&i.to_be_bytes());
            backend.push(s, &m, false);
        }
        for i in 0..N {
            match c.recv_within(T).await {
                Some(Msg::Binary(m)) => {
                    assert_eq!(m.len(), 100);
                    let got = u32::from_be_bytes(m[..4].try_into().unwrap());
                    assert_eq!(got, i, "messages must arrive once each, in order");
                }
                other => panic!("message {i}: {other:?}"),
            }
        }
        // What the queue counts, and 1 MiB for the link's read chunks and
        // allocator slack (measured: 0.9-1.6 MiB in all).
        let grew = gw.proc.peak_rss_kib().saturating_sub(rss_before);
        let bound = u64::from(N) * 164 / 1024 + 1024;
        println!("burst of {N}: peak RSS grew by {grew} KiB (bound {bound} KiB)");
        assert!(grew < bound, "peak RSS grew by {grew} KiB for a 1 MB burst");
        backend.push(s, b"still open", true);
        assert_eq!(c.recv_within(T).await, Some(Msg::Text("still open".into())));
        let slow = gw.metric_opt("gateway_slow_consumer_closes_total").await;
        assert_eq!(slow.unwrap_or(0.0), 0.0);
    }
}

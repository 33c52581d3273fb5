//! The gateway in-process, on port 0, under paused tokio time: timing
//! behaviour (ping timeout, resume grace, a stalled write) checked at its
//! real default durations, to the exact bound, in milliseconds of wall time.
//!
//! Paused time advances only when every task waits, and loopback sockets
//! deliver synchronously, so the gateway, the test backend and the client
//! (all in this test's single-threaded runtime, over real TCP) see the same
//! virtual clock. Tests that need a process (signals, exit codes, memory,
//! other languages' clients) stay in the other files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use gateway::config::Overrides;
use gateway::{Config, Gateway};
use gateway_tests::client::{self, Client, Connect, Msg};
use gateway_tests::{Event, TestBackend};
use http_body_util::Empty;
use loadtest::run::conn::{upgrade_request, SpawnExecutor};
use protocol::Framing;
use tokio::time::Instant;

/// A configuration for a gateway in front of `backend`, with one plain ws
/// listener on port 0 and one link; tests change fields before starting.
fn config(backend: SocketAddr) -> Config {
    let mut o = Overrides::default();
    o.listen.ws = vec!["127.0.0.1:0".parse().unwrap()];
    o.backend.endpoints = vec![backend.to_string()];
    o.backend.links_per_endpoint = Some(1);
    Config::load(None, &o).unwrap()
}

/// Starts the gateway and waits until its link is up; returns it and its
/// ws address.
async fn start(config: Config) -> (Gateway, SocketAddr) {
    let gw = Gateway::start(config).await.unwrap();
    let ws = gw.addrs().ws[0];
    while gw.links_up() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (gw, ws)
}

/// A client over an in-memory stream of `buffer` bytes each way, asking for
/// `headers`: the WebSocket and the values of the 101's resume headers
/// (credential, received count, grace in ms), or the refusal's status.
async fn try_connect_in_memory(
    gw: &Gateway,
    buffer: usize,
    headers: &[(&str, String)],
) -> Result<(Client, String, u64, u64), u16> {
    let stream = gw.connect_in_memory("10.9.8.7:4321".parse().unwrap(), buffer);
    let mut req = upgrade_request("http://localhost/ws", "localhost");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let (ws, resp) = match fastwebsockets::handshake::client(&SpawnExecutor, req, stream).await {
        Ok(pair) => pair,
        Err(fastwebsockets::WebSocketError::InvalidStatusCode(status)) => return Err(status),
        Err(e) => panic!("handshake: {e}"),
    };
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let received = header("x-wsgw-received").parse().unwrap_or(0);
    let grace = header("x-wsgw-grace-ms").parse().unwrap_or(0);
    Ok((
        Client::from_ws(ws),
        header("x-wsgw-resume"),
        received,
        grace,
    ))
}

/// As [`try_connect_in_memory`], for a connection that must succeed.
async fn connect_in_memory(
    gw: &Gateway,
    buffer: usize,
    headers: &[(&str, String)],
) -> (Client, String, u64) {
    let (c, token, received, _) = try_connect_in_memory(gw, buffer, headers)
        .await
        .unwrap_or_else(|status| panic!("refused with {status}"));
    (c, token, received)
}

/// The next `Detached` event of `session`: its reason.
async fn detached(backend: &mut TestBackend, session: u64) -> String {
    backend
        .wait_for(|e| match e {
            Event::Detached { session: s, reason } if *s == session => Some(reason.clone()),
            _ => None,
        })
        .await
}

/// Whether the backend has seen `session` detach, without waiting.
fn detached_seen(backend: &mut TestBackend, session: u64) -> bool {
    while let Ok(e) = backend.events.try_recv() {
        if matches!(e, Event::Detached { session: s, .. } if s == session) {
            return true;
        }
    }
    false
}

/// Pushes `n` binary messages of `size` bytes to `session`, each starting
/// with its number (big-endian u64).
fn push_numbered(backend: &TestBackend, session: u64, n: usize, size: usize) {
    for i in 0..n {
        let mut m = vec![0u8; size];
        m[..8].copy_from_slice(&(i as u64).to_be_bytes());
        backend.push(session, &m, false);
    }
}

/// Receives messages 0..n pushed by [`push_numbered`], in order.
async fn expect_numbered(client: &mut Client, n: usize) {
    for i in 0..n {
        match client.recv().await {
            Some(Msg::Binary(m)) => {
                assert_eq!(u64::from_be_bytes(m[..8].try_into().unwrap()), i as u64)
            }
            other => panic!("message {i}: {other:?}"),
        }
    }
}

/// The close the backend received for `session`, if any, without waiting.
fn close_seen(backend: &mut TestBackend, session: u64) -> Option<(u32, String)> {
    while let Ok(e) = backend.events.try_recv() {
        if let Event::Close {
            session: s,
            code,
            reason,
        } = e
        {
            if s == session {
                return Some((code, reason));
            }
        }
    }
    None
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_dropped_after_ping_interval_plus_ping_timeout_and_not_before() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let c = config(backend.addr);
    // The defaults, spelled out: this is the bound the README states.
    assert_eq!(c.session.ping_interval, Duration::from_secs(20));
    assert_eq!(c.session.ping_timeout, Duration::from_secs(20));
    let (_gw, ws) = start(c).await;
    // Connected, and then never reads again (never answers a ping): a phone
    // that went into a tunnel.
    let (_silent, _) = client::connect(ws, "/ws", &Connect::default())
        .await
        .unwrap();
    let (s, _) = backend.next_open().await;
    let opened = Instant::now();

    tokio::time::sleep(Duration::from_millis(39_900)).await;
    assert_eq!(close_seen(&mut backend, s), None, "dropped too early");
    // Pings go out on a grid shared by all sessions (250 ms at these
    // settings; the README states it): the ping and the end of its timeout
    // each up to one step late, so the bound is 40.5 s (and a margin).
    tokio::time::sleep(Duration::from_millis(600 + 200)).await;
    let (code, reason) = close_seen(&mut backend, s).expect("not dropped by 40.7 s");
    assert_eq!((code, reason.as_str()), (1006, "client ping timeout"));
    assert!(opened.elapsed() >= Duration::from_secs(40));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_answers_pings_stays_however_long_it_is_idle() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let (_gw, ws) = start(config(backend.addr)).await;
    let mut c = Client::connect(ws, "/ws", &Connect::default()).await;
    let (s, _) = backend.next_open().await;
    // Reading answers pings; ten minutes of idleness, 30 ping rounds.
    let r = tokio::time::timeout(Duration::from_secs(600), c.recv()).await;
    assert!(r.is_err(), "nothing but pings should arrive: {r:?}");
    assert_eq!(close_seen(&mut backend, s), None);
    c.echo("still here").await;
}

#[tokio::test(start_paused = true)]
async fn a_detached_session_expires_at_the_grace_period_and_not_before() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let c = config(backend.addr);
    assert_eq!(c.resume.grace, Duration::from_secs(60));
    let (_gw, ws) = start(c).await;
    let opts = Connect {
        headers: vec![("X-Wsgw-Resume", "new".to_owned())],
        ..Connect::default()
    };
    let (client, _) = client::connect(ws, "/ws", &opts).await.unwrap();
    let (s, _) = backend.next_open().await;
    drop(client);
    let reason = backend.wait_detached(s).await;
    assert_eq!(reason, "client connection lost");
    let detached = Instant::now();

    tokio::time::sleep(Duration::from_millis(59_900)).await;
    assert_eq!(close_seen(&mut backend, s), None, "expired too early");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, reason) = close_seen(&mut backend, s).expect("not expired at 60 s");
    assert_eq!(code, 1006);
    assert_eq!(
        reason,
        "session expired: client did not resume within resume.grace"
    );
    assert!(detached.elapsed() >= Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn a_backend_close_while_a_write_to_the_client_is_stalled_reaches_the_client_after_its_data()
{
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let mut c = config(backend.addr);
    // Room for everything below, so that the client is not a slow consumer.
    c.session.client_queue_bytes = gateway::config::ByteSize(64 << 20);
    let (_gw, ws) = start(c).await;
    let mut client = Client::connect(ws, "/ws", &Connect::default()).await;
    let (s, _) = backend.next_open().await;

    // 12.5 MiB towards a client that is not reading: far more than the
    // socket buffers hold, so the gateway's write to it stalls.
    const N: usize = 400;
    push_numbered(&backend, s, N, 32 * 1024);
    // The backend ends the session while that write is stuck.
    backend.close(s, 4001, "done");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The client reads: everything, in order, then the backend's close.
    expect_numbered(&mut client, N).await;
    assert_eq!(
        client.recv().await,
        Some(Msg::Close(4001, "done".to_owned()))
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_clients_with_1001_and_tells_the_backend() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let (gw, ws) = start(config(backend.addr)).await;
    let mut client = Client::connect(ws, "/ws", &Connect::default()).await;
    let (s, _) = backend.next_open().await;
    client.echo("before").await;
    let reader = async move { client.recv().await };
    let ((), closed) = tokio::join!(gw.shutdown(), reader);
    assert_eq!(
        closed,
        Some(Msg::Close(1001, "gateway shutting down".to_owned()))
    );
    let (code, _) = backend.wait_close(s).await;
    assert_eq!(code, 1001);
}

#[tokio::test(start_paused = true)]
async fn a_resumable_client_that_falls_silent_detaches_at_the_ping_timeout() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let (gw, _) = start(config(backend.addr)).await;
    let new = [("X-Wsgw-Resume", "new".to_owned())];
    // The phone enters a tunnel: its connection neither closes nor answers.
    let (_silent, token, _) = connect_in_memory(&gw, 64 * 1024, &new).await;
    assert_eq!(token.len(), 32);
    let (s, open) = backend.next_open().await;
    assert_eq!(open.remote_addr, "10.9.8.7:4321");

    tokio::time::sleep(Duration::from_millis(39_900)).await;
    assert!(!detached_seen(&mut backend, s), "detached too early");
    // By 40.5 s (pings go out on a grid: see the silent client's test).
    tokio::time::sleep(Duration::from_millis(600 + 200)).await;
    let at = Instant::now();
    assert_eq!(detached(&mut backend, s).await, "client ping timeout");
    assert_eq!(at.elapsed(), Duration::ZERO, "not detached by 40.7 s");
    assert_eq!(close_seen(&mut backend, s), None, "detached, not closed");
}

#[tokio::test(start_paused = true)]
async fn a_resumable_client_whose_writes_stall_detaches_and_resumes_with_everything() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let c = config(backend.addr);
    assert_eq!(c.session.write_timeout, Duration::from_secs(20));
    let (gw, _) = start(c).await;
    let new = [("X-Wsgw-Resume", "new".to_owned())];
    // A 4 KiB network: the client stops reading, so writes stall at once.
    let (_stalled, token, _) = connect_in_memory(&gw, 4096, &new).await;
    let (s, _) = backend.next_open().await;
    const N: usize = 20;
    push_numbered(&backend, s, N, 1024);
    tokio::time::sleep(Duration::from_millis(19_900)).await;
    assert!(!detached_seen(&mut backend, s), "detached too early");
    tokio::time::sleep(Duration::from_millis(200)).await;
    detached(&mut backend, s).await;

    // The client comes back having received nothing: it gets everything.
    let resume = [
        ("X-Wsgw-Resume", token),
        ("X-Wsgw-Received", "0".to_owned()),
    ];
    let (mut client, next_token, received) = connect_in_memory(&gw, 64 * 1024, &resume).await;
    assert_eq!(next_token.len(), 32);
    assert_eq!(received, 0);
    expect_numbered(&mut client, N).await;
    let replayed = backend
        .wait_for(|e| match e {
            Event::Attached { session, replayed } if *session == s => Some(*replayed),
            _ => None,
        })
        .await;
    assert_eq!(replayed, N as u64);
}

/// A client on a slow network that keeps taking messages, one every 5 s,
/// is not stalled, however long the whole queue takes (100 s here, five
/// times `write_timeout`): `write_timeout` is per message taken, not per
/// batch. (The client reads the network in chunks, so the gateway sees it
/// take about three messages every 15 s.)
#[tokio::test(start_paused = true)]
async fn a_slow_client_that_keeps_taking_messages_is_not_a_slow_consumer() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let mut c = config(backend.addr);
    assert_eq!(c.session.write_timeout, Duration::from_secs(20));
    // The gateway's pings wait behind ~15 s of data on this network; the
    // liveness check is not what this test is about.
    c.session.ping_timeout = Duration::from_secs(60);
    let (gw, _) = start(c).await;
    // A 4 KiB network: about three 1 KiB messages in flight at a time.
    let (mut client, _, _) = connect_in_memory(&gw, 4096, &[]).await;
    let (s, _) = backend.next_open().await;
    const N: usize = 20;
    push_numbered(&backend, s, N, 1024);
    for i in 0..N {
        tokio::time::sleep(Duration::from_secs(5)).await;
        match client.recv().await {
            Some(Msg::Binary(m)) => {
                assert_eq!(u64::from_be_bytes(m[..8].try_into().unwrap()), i as u64)
            }
            other => panic!(
                "message {i}: {other:?}, backend saw {:?}",
                close_seen(&mut backend, s)
            ),
        }
    }
    assert_eq!(close_seen(&mut backend, s), None, "still open");
}

#[tokio::test(start_paused = true)]
async fn connections_without_a_whole_request_do_not_hold_the_drain() {
    let backend = TestBackend::start(Framing::Varint, true).await;
    let c = config(backend.addr);
    assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(10));
    let (gw, ws) = start(c).await;
    // Connected, silent: a port scanner, or a phone that lost its network
    // right after the TCP handshake; and one that lost it halfway through
    // its request.
    let _silent = tokio::net::TcpStream::connect(ws).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(ws).await.unwrap();
    use tokio::io::AsyncWriteExt;
    half.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let began = Instant::now();
    gw.shutdown().await;
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "a connection without a session held the drain for {:?}",
        began.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_too_slow_to_send_its_request_is_cut_and_counted_as_refused() {
    let backend = TestBackend::start(Framing::Varint, true).await;
    let mut c = config(backend.addr);
    c.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    let (gw, ws) = start(c).await;
    let admin = gw.addrs().admin.unwrap();
    let mut slow = tokio::net::TcpStream::connect(ws).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let began = Instant::now();
    let mut buf = [0u8; 256];
    let n = slow.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "cut without an answer");
    assert_eq!(
        began.elapsed(),
        Duration::from_secs(10),
        "cut at http_header_timeout"
    );
    let (_, body) = client::http_get(admin, "/metrics").await;
    let refused: f64 = body
        .lines()
        .filter(|l| l.starts_with("gateway_sessions_refused_total") && l.contains("http_timeout"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, 1.0, "{body}");
}

#[tokio::test(start_paused = true)]
async fn a_resume_claiming_more_than_was_delivered_gets_400_and_the_session_goes_on() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let (gw, _) = start(config(backend.addr)).await;
    let new = [("X-Wsgw-Resume", "new".to_owned())];
    let (mut c, token, _, grace) = try_connect_in_memory(&gw, 64 * 1024, &new).await.unwrap();
    // The client is told how long a resume is worth trying.
    assert_eq!(grace, 60_000);
    let (s, _) = backend.next_open().await;
    for i in 0..3u8 {
        backend.push(s, &[i], false);
        assert_eq!(c.recv().await, Some(Msg::Binary(vec![i])));
    }
    drop(c);
    detached(&mut backend, s).await;
    let began = Instant::now();

    // A client bug: it claims 99 messages. Refused, and nothing changes.
    let bad = [
        ("X-Wsgw-Resume", token.clone()),
        ("X-Wsgw-Received", "99".to_owned()),
    ];
    assert_eq!(
        try_connect_in_memory(&gw, 64 * 1024, &bad).await.err(),
        Some(400)
    );
    // The same credential still works, from the right position.
    let good = [
        ("X-Wsgw-Resume", token),
        ("X-Wsgw-Received", "3".to_owned()),
    ];
    let (mut c, _, _) = connect_in_memory(&gw, 64 * 1024, &good).await;
    let replayed = backend
        .wait_for(|e| match e {
            Event::Attached { session, replayed } if *session == s => Some(*replayed),
            _ => None,
        })
        .await;
    assert_eq!(replayed, 0);
    backend.push(s, b"after", false);
    assert_eq!(c.recv().await, Some(Msg::Binary(b"after".to_vec())));
    assert_eq!(close_seen(&mut backend, s), None);
    assert!(began.elapsed() < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_refused_resume_does_not_extend_the_grace_period() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let (gw, _) = start(config(backend.addr)).await;
    let new = [("X-Wsgw-Resume", "new".to_owned())];
    let (c, token, _) = connect_in_memory(&gw, 64 * 1024, &new).await;
    let (s, _) = backend.next_open().await;
    drop(c);
    detached(&mut backend, s).await;
    tokio::time::sleep(Duration::from_secs(50)).await;
    let bad = [
        ("X-Wsgw-Resume", token),
        ("X-Wsgw-Received", "1".to_owned()),
    ];
    assert_eq!(
        try_connect_in_memory(&gw, 64 * 1024, &bad).await.err(),
        Some(400)
    );
    // Still 60 s after the loss, not 60 s after the refused resume.
    tokio::time::sleep(Duration::from_millis(10_100)).await;
    let (code, reason) = close_seen(&mut backend, s).expect("expired at 60 s");
    assert_eq!(code, 1006);
    assert!(reason.contains("resume.grace"), "{reason}");
}

/// The listen backlog the kernel holds for a listening port, from `ss`
/// (its Send-Q column is the backlog for a listening socket).
fn backlog_of(port: u16) -> u32 {
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2) is needed to read a listen backlog");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no listener on {port}: {text}"));
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_listen_backlog_is_the_configured_one() {
    let backend = TestBackend::start(Framing::Varint, true).await;
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (_gw, ws) = start(config(backend.addr)).await;
    assert_eq!(backlog_of(ws.port()), 4096.min(somaxconn), "the default");
    let mut c = config(backend.addr);
    c.listen.backlog = 700;
    let (_gw, ws) = start(c).await;
    assert_eq!(backlog_of(ws.port()), 700.min(somaxconn));
}

#[tokio::test(start_paused = true)]
async fn a_bad_resume_during_a_write_leaves_the_live_connection_alone() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let (gw, _) = start(config(backend.addr)).await;
    let new = [("X-Wsgw-Resume", "new".to_owned())];
    // A 4 KiB network: the gateway is mid-write while the client waits.
    let (mut c, token, _) = connect_in_memory(&gw, 4096, &new).await;
    let (s, _) = backend.next_open().await;
    const N: usize = 20;
    push_numbered(&backend, s, N, 1024);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let bad = [
        ("X-Wsgw-Resume", token),
        ("X-Wsgw-Received", "999".to_owned()),
    ];
    assert_eq!(
        try_connect_in_memory(&gw, 64 * 1024, &bad).await.err(),
        Some(400)
    );
    // The live connection goes on: everything arrives, in order.
    expect_numbered(&mut c, N).await;
    assert!(!detached_seen(&mut backend, s), "the session detached");
}

//! Session resume: a client whose connection is lost comes back with its
//! credential and position, and nothing is lost or duplicated.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gateway_tests::client::{self, Client, Connect, Msg};
use gateway_tests::{kib, mib, ms, secs};
use gateway_tests::{Event, Gateway, GatewayOpts, TestBackend};
use protocol::Framing;

const T: Duration = Duration::from_secs(10);

/// Opens a resumable session, or resumes one: returns the client, the new
/// credential and the gateway's count of client messages received.
async fn connect(gw: &Gateway, resume: Option<(&str, u64)>) -> Result<(Client, String, u64), u16> {
    client::resumable(gw.ws.unwrap(), resume).await
}

fn gateway(backend: &TestBackend, grace: Duration) -> Gateway {
    Gateway::start(
        GatewayOpts::new(backend.addr)
            .links(1)
            .config(|c| c.resume.grace = grace),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_connection_resumes_with_nothing_lost_or_duplicated() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = gateway(&backend, secs(30));
    gw.wait_ready(T).await;
    let (mut c, token, received) = connect(&gw, None).await.unwrap();
    assert_eq!(received, 0);
    let (s, _) = backend.next_open().await;

    // Both directions flow; the client counts what it received.
    c.send_text("c0").await;
    c.send_text("c1").await;
    backend.push(s, b"b0", true);
    backend.push(s, b"b1", true);
    assert_eq!(c.recv_within(T).await, Some(Msg::Text("b0".into())));
    assert_eq!(c.recv_within(T).await, Some(Msg::Text("b1".into())));
    let mut got = 2u64;
    for want in ["c0", "c1"] {
        let p = backend.next_data(s).await;
        assert_eq!(&p[..], want.as_bytes());
    }

    // The connection drops without a close (a phone in a tunnel).
    drop(c);
    let reason = backend
        .wait_for(|e| match e {
            Event::Detached { session, reason } if *session == s => Some(reason.clone()),
            Event::Close { session, .. } if *session == s => panic!("the session must not close"),
            _ => None,
        })
        .await;
    assert!(reason.contains("lost"), "{reason}");
    // The backend keeps talking while the client is away.
    backend.push(s, b"b2", true);
    backend.push(s, &[3], false);

    // The client comes back: it gets what it missed, in order, and learns
    // that the gateway has both of its messages.
    let (mut c, token2, received) = connect(&gw, Some((&token, got))).await.unwrap();
    assert_ne!(token2, token, "credentials are single-use");
    assert_eq!(received, 2);
    assert_eq!(c.recv_within(T).await, Some(Msg::Text("b2".into())));
    assert_eq!(c.recv_within(T).await, Some(Msg::Binary(vec![3])));
    got += 2;
    let replayed = backend
        .wait_for(|e| match e {
            Event::Attached { session, replayed } if *session == s => Some(*replayed),
            _ => None,
        })
        .await;
    // b2 and [3] are replayed from the buffer, or (if the resume overtook
    // them inside the gateway) delivered straight from the session's
    // mailbox, which no outside signal can tell apart; either way each was
    // received exactly once above. The exact count, where it is determined,
    // is checked in `replayed_counts_are_exact_and_a_position_no_longer_buffered_is_refused`.
    assert!(replayed <= 2, "{replayed}");

    // Same session, same backend session id, still working both ways.
    c.send_text("c2").await;
    let p = backend.next_data(s).await;
    assert_eq!(&p[..], b"c2");

    // The old credential is refused now: single use.
    assert_eq!(connect(&gw, Some((&token, got))).await.err(), Some(410));
    // A guessed one too.
    assert_eq!(
        connect(&gw, Some(("0123456789abcdef0123456789abcdef", 0)))
            .await
            .err(),
        Some(410)
    );
    assert_eq!(
        connect(&gw, Some(("not-a-token", 0))).await.err(),
        Some(410)
    );
    gw.wait_metric(
        "gateway_resumes_total{result=\"succeeded\"",
        |v| v == 1.0,
        T,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resume_after_the_grace_period_is_told_the_session_is_lost() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = gateway(&backend, ms(500));
    gw.wait_ready(T).await;
    let (c, token, _) = connect(&gw, None).await.unwrap();
    let (s, _) = backend.next_open().await;
    drop(c);
    backend.wait_detached(s).await;
    // The grace started before the gateway sent `detached`, so the time
    // from here is at most the grace; allow for timer granularity only.
    let detached = std::time::Instant::now();
    let (code, reason) = backend.wait_close(s).await;
    let waited = detached.elapsed();
    assert_eq!(code, 1006);
    assert!(reason.starts_with("session expired"), "{reason}");
    assert!(
        waited >= Duration::from_millis(450),
        "expired after {waited:?}, before the 500 ms grace"
    );
    assert!(waited < Duration::from_secs(5), "expired after {waited:?}");
    assert_eq!(connect(&gw, Some((&token, 0))).await.err(), Some(410));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resume_while_the_old_connection_lives_takes_over() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = gateway(&backend, secs(30));
    gw.wait_ready(T).await;
    let (mut old, token, _) = connect(&gw, None).await.unwrap();
    let (s, _) = backend.next_open().await;
    backend.push(s, b"one", true);
    assert_eq!(old.recv_within(T).await, Some(Msg::Text("one".into())));
    // The phone switched networks; the gateway has not noticed yet.
    let (mut new, _, _) = connect(&gw, Some((&token, 1))).await.unwrap();
    assert_eq!(
        old.expect_close(T).await.0,
        1008,
        "the older connection is closed"
    );
    backend.push(s, b"two", true);
    assert_eq!(new.recv_within(T).await, Some(Msg::Text("two".into())));
}

/// A resume whose 101 never reached the client (the handshake was cut):
/// the client still holds only the token it presented, and that token
/// still resumes, until a connection shows it reached the client by
/// sending a frame. The token of the lost 101 is then void, and only one
/// connection ever holds the session.
#[tokio::test(flavor = "multi_thread")]
async fn the_presented_token_survives_a_lost_101_until_the_new_connection_proves_itself() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let gw = gateway(&backend, secs(30));
    gw.wait_ready(T).await;
    let (mut c, t1, _) = connect(&gw, None).await.unwrap();
    let (s, _) = backend.next_open().await;
    c.echo("one").await;
    drop(c);
    backend.wait_detached(s).await;
    // The resume is accepted, but the client never sees its 101.
    let (lost, t2, _) = connect(&gw, Some((&t1, 1))).await.unwrap();
    drop(lost);
    // It tries again with the only token it has: accepted.
    let (mut c, t3, received) = connect(&gw, Some((&t1, 1)))
        .await
        .expect("the presented token resumes after a lost 101");
    assert_eq!(received, 1);
    assert_ne!(t3, t1);
    // The lost 101's token was never the client's: void.
    assert_eq!(connect(&gw, Some((&t2, 1))).await.err(), Some(410));
    // A frame from the client proves the connection: t1 is spent now.
    c.echo("two").await;
    assert_eq!(connect(&gw, Some((&t1, 2))).await.err(), Some(410));
    // The session is whole, and t3 resumes it (a takeover).
    let (mut c2, _, received) = connect(&gw, Some((&t3, 2))).await.unwrap();
    assert_eq!(received, 2);
    assert_eq!(c.expect_close(T).await.0, 1008);
    c2.echo("three").await;
}

/// The handshake is cut before the client reads the 101 (it sent its
/// resume request and lost the connection): the session stays reachable
/// with the token the client still holds, and a later resume with it gets
/// everything.
#[tokio::test(flavor = "multi_thread")]
async fn a_resume_whose_handshake_is_cut_leaves_the_session_reachable() {
    use tokio::io::AsyncWriteExt;
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let gw = gateway(&backend, secs(30));
    gw.wait_ready(T).await;
    let (mut c, t1, _) = connect(&gw, None).await.unwrap();
    let (s, _) = backend.next_open().await;
    c.echo("one").await;
    drop(c);
    backend.wait_detached(s).await;
    for _ in 0..3 {
        let request = gateway_tests::raw::upgrade_request(
            "/ws",
            &format!("X-Wsgw-Resume: {t1}\r\nX-Wsgw-Received: 1\r\n"),
        );
        let mut tcp = tokio::net::TcpStream::connect(gw.ws.unwrap())
            .await
            .unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        // Gone before the 101 could be read.
        drop(tcp);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut c, _, received) = connect(&gw, Some((&t1, 1)))
        .await
        .expect("the session survives cut resume handshakes");
    assert_eq!(received, 1);
    c.echo("two").await;
}

/// The connection that resumed died during its replay (the write to it is
/// stuck): the next resume takes the session over at once, and gets
/// everything from where it says it is.
#[tokio::test(flavor = "multi_thread")]
async fn a_resume_takes_over_a_connection_stuck_in_its_replay() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .config(|c| c.resume.grace = secs(30))
            .config(|c| c.session.client_queue_bytes = mib(64))
            .config(|c| c.session.close_timeout = secs(5)),
    );
    gw.wait_ready(T).await;
    let (c, t1, _) = connect(&gw, None).await.unwrap();
    let (s, _) = backend.next_open().await;
    drop(c);
    backend.wait_detached(s).await;
    // While away: the replay of it to a client that does not read gets
    // stuck.
    push_more_than_sockets_hold(&gw, &backend, s).await;
    let (stuck, t2, _) = connect(&gw, Some((&t1, 0))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = resume_within_a_second(&gw, &t2, "a replay is stuck").await;
    expect_all_of_it(&mut c).await;
    drop(stuck);
}

/// The phone changed networks: its old connection went silent without a
/// FIN (it never answers the close). A resume gets its 101 within a round
/// trip, not after `close_timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn a_takeover_of_a_silent_connection_answers_at_once() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .config(|c| c.resume.grace = secs(30))
            .config(|c| c.session.close_timeout = secs(5)),
    );
    gw.wait_ready(T).await;
    let (mut old, token, _) = connect(&gw, None).await.unwrap();
    let (s, _) = backend.next_open().await;
    backend.push(s, b"one", true);
    assert_eq!(old.recv_within(T).await, Some(Msg::Text("one".into())));
    // `old` is kept open but never read again: silent.
    let started = std::time::Instant::now();
    let (mut new, _, _) = connect(&gw, Some((&token, 1))).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the resume waited {:?} for the silent connection (close_timeout is 5 s)",
        started.elapsed()
    );
    backend.push(s, b"two", true);
    assert_eq!(new.recv_within(T).await, Some(Msg::Text("two".into())));
    drop(old);
}

/// A backend burst while the client is away, bigger than the replay
/// buffer: the buffer keeps every message the client never saw, up to what
/// the client queue would hold, and the resume gets every one, in order.
/// Only beyond that does the session end.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_while_away_is_kept_for_the_resume_up_to_the_client_queue() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            // Four 100 B messages (each counts 100 + 64 bytes).
            .config(|c| c.resume.buffer_bytes = gateway::config::ByteSize(4 * 164))
            .config(|c| c.session.max_message_size = kib(1))
            .config(|c| c.session.client_queue_bytes = kib(16))
            .config(|c| c.resume.grace = secs(30)),
    );
    gw.wait_ready(T).await;
    let (c, token, _) = connect(&gw, None).await.unwrap();
    let (s, _) = backend.next_open().await;
    drop(c);
    backend
        .wait_for(|e| matches!(e, Event::Detached { .. }).then_some(()))
        .await;
    // 90 messages of 100 B arrive at once: far more than the 4 the replay
    // buffer keeps, but they fit the 16 KiB client queue (90 x 164 B).
    for i in 0..90u8 {
        backend.push(s, &[i; 100], false);
    }
    gw.wait_metric(
        "gateway_messages_total{direction=\"backend_to_client\"",
        |v| v >= 90.0,
        T,
    )
    .await;
    let (mut c, token, _) = connect(&gw, Some((&token, 0))).await.unwrap();
    for i in 0..90u8 {
        assert_eq!(c.recv_within(T).await, Some(Msg::Binary(vec![i; 100])));
    }
    drop(c);
    backend
        .wait_for(|e| matches!(e, Event::Detached { .. }).then_some(()))
        .await;
    // 200 messages: more than ring and client queue hold together.
    for i in 0..200u8 {
        backend.push(s, &[i; 100], false);
    }
    let (code, reason) = backend.wait_close(s).await;
    assert_eq!(code, 1006);
    assert!(reason.contains("while detached"), "{reason}");
    assert_eq!(connect(&gw, Some((&token, 90))).await.err(), Some(410));
}

/// Opens a resumable session, has the backend send it `n` messages that the
/// client reads, then drops the connection and waits until it detached.
async fn delivered_then_dropped(gw: &Gateway, backend: &mut TestBackend, n: u8) -> (u64, String) {
    let (mut c, token, _) = connect(gw, None).await.unwrap();
    let (s, _) = backend.next_open().await;
    for i in 0..n {
        backend.push(s, &[i], false);
    }
    for i in 0..n {
        assert_eq!(c.recv_within(T).await, Some(Msg::Binary(vec![i])));
    }
    drop(c);
    backend.wait_detached(s).await;
    (s, token)
}

/// Waits for `attached` of session `s`; returns its `replayed`.
async fn wait_attached(backend: &mut TestBackend, s: u64) -> u64 {
    backend
        .wait_for(|e| match e {
            Event::Attached { session, replayed } if *session == s => Some(*replayed),
            Event::Close {
                session, reason, ..
            } if *session == s => panic!("session closed instead of resuming: {reason}"),
            _ => None,
        })
        .await
}

/// The client missed more, before the drop, than the replay buffer holds
/// (it says it received fewer messages than the gateway delivered): 410,
/// and the session ends. One message fewer missed, exactly what the buffer
/// holds, resumes and replays exactly those; none missed replays none.
#[tokio::test(flavor = "multi_thread")]
async fn replayed_counts_are_exact_and_a_position_no_longer_buffered_is_refused() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .links(1)
            // Four 1-byte messages (each counts 1 + 64 bytes).
            .config(|c| c.resume.buffer_bytes = gateway::config::ByteSize(4 * 65))
            .config(|c| c.resume.grace = secs(30)),
    );
    gw.wait_ready(T).await;
    // Delivered 10, the buffer holds the last 4 (6..=9): the client claims
    // it received 6, so it missed exactly 4: all replayed.
    let (s, token) = delivered_then_dropped(&gw, &mut backend, 10).await;
    let (mut c, token, _) = connect(&gw, Some((&token, 6)))
        .await
        .expect("resume at the buffer's edge");
    for i in 6..10u8 {
        assert_eq!(c.recv_within(T).await, Some(Msg::Binary(vec![i])));
    }
    assert_eq!(wait_attached(&mut backend, s).await, 4);
    // Again, having missed nothing: nothing replayed.
    drop(c);
    backend.wait_detached(s).await;
    let (_c, _, _) = connect(&gw, Some((&token, 10)))
        .await
        .expect("resume having missed nothing");
    assert_eq!(wait_attached(&mut backend, s).await, 0);

    // Delivered 10 again, but the client claims it received 5: message 5
    // is no longer buffered. A valid, unused token, refused for the
    // position alone: 410, and the session ends.
    let (s, token) = delivered_then_dropped(&gw, &mut backend, 10).await;
    assert_eq!(connect(&gw, Some((&token, 5))).await.err(), Some(410));
    let (code, reason) = backend.wait_close(s).await;
    assert_eq!(code, 1006);
    assert!(reason.contains("position"), "{reason}");
    gw.wait_metric("gateway_resume_replayed", |v| v == 4.0, T)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_sessions_still_end_when_the_connection_is_lost() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = gateway(&backend, secs(30));
    gw.wait_ready(T).await;
    let c = Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await;
    let (s, _) = backend.next_open().await;
    drop(c);
    let (code, _) = backend.wait_close(s).await;
    assert_eq!(code, 1006);
}

/// The phone switched networks and the old connection is dead but not yet
/// noticed: the gateway is stuck writing to it. A resume must still go
/// through at once, and replay everything the client has not read.
#[tokio::test(flavor = "multi_thread")]
async fn a_resume_takes_over_a_connection_stuck_in_a_write() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .config(|c| c.resume.grace = secs(30))
            .config(|c| c.resume.buffer_bytes = mib(64))
            .config(|c| c.session.client_queue_bytes = mib(64))
            // The old connection is not waited for: not its write, not its
            // close reply.
            .config(|c| c.session.close_timeout = secs(5)),
    );
    gw.wait_ready(T).await;
    let (old, token, _) = connect(&gw, None).await.unwrap();
    let (s, _) = backend.next_open().await;
    // The old connection never reads it: the gateway's write blocks.
    push_more_than_sockets_hold(&gw, &backend, s).await;
    let mut new = resume_within_a_second(&gw, &token, "a write is stuck").await;
    expect_all_of_it(&mut new).await;
    drop(old);
}

/// A busy session (its replay buffer long full of delivered messages) can
/// still detach, keep receiving, and resume.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_session_resumes_after_its_buffer_filled_with_delivered_messages() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .config(|c| c.resume.buffer_bytes = gateway::config::ByteSize(16 * 65)),
    );
    gw.wait_ready(T).await;
    let (mut c, token, _) = connect(&gw, None).await.unwrap();
    let (s, _) = backend.next_open().await;
    for i in 0..100u8 {
        backend.push(s, &[i], false);
    }
    for i in 0..100u8 {
        assert_eq!(c.recv_within(T).await, Some(Msg::Binary(vec![i])));
    }
    drop(c);
    backend
        .wait_for(|e| matches!(e, Event::Detached { .. }).then_some(()))
        .await;
    for i in 100..110u8 {
        backend.push(s, &[i], false);
    }
    let (mut c, _, _) = connect(&gw, Some((&token, 100)))
        .await
        .expect("resume of a busy session");
    for i in 100..110u8 {
        assert_eq!(c.recv_within(T).await, Some(Msg::Binary(vec![i])));
    }
}

/// `resume.max_detached`: beyond the cap a lost session ends at once.
#[tokio::test(flavor = "multi_thread")]
async fn beyond_max_detached_a_lost_session_ends_at_once() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .config(|c| c.resume.grace = secs(30))
            .config(|c| c.resume.max_detached = 2),
    );
    gw.wait_ready(T).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(&gw, None).await.unwrap().0);
        backend.next_open().await;
    }
    drop(clients);
    let (mut detached, mut closed) = (0, Vec::new());
    while detached + closed.len() < 3 {
        match backend.next().await {
            Event::Detached { .. } => detached += 1,
            Event::Close { code, reason, .. } => closed.push((code, reason)),
            _ => {}
        }
    }
    assert_eq!(detached, 2);
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0].0, 1006);
    assert!(closed[0].1.contains("too many detached"), "{closed:?}");
    gw.wait_metric("gateway_sessions_detached", |v| v == 2.0, T)
        .await;
}

/// `resume.max_detached_bytes`: a detached session whose backend keeps
/// sending beyond the gateway-wide budget ends.
#[tokio::test(flavor = "multi_thread")]
async fn beyond_max_detached_bytes_a_detached_session_ends() {
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .config(|c| c.resume.grace = secs(30))
            .config(|c| c.resume.max_detached_bytes = kib(4)),
    );
    gw.wait_ready(T).await;
    let (c, _, _) = connect(&gw, None).await.unwrap();
    let (s, _) = backend.next_open().await;
    drop(c);
    backend.wait_detached(s).await;
    for _ in 0..8 {
        backend.push(s, &[1u8; 1024], false);
    }
    let (code, reason) = backend.wait_close(s).await;
    assert_eq!(code, 1006);
    assert!(reason.contains("detached sessions full"), "{reason}");
}

/// Numbered 16 KiB messages, 24 MiB in all: more than the socket buffers on
/// the way hold, so writing them to a client that does not read gets
/// stuck. Returns once the gateway has read them all from the link.
const STUCK_LOAD: usize = 1536;

async fn push_more_than_sockets_hold(gw: &Gateway, backend: &TestBackend, s: u64) {
    for i in 0..STUCK_LOAD {
        let mut m = vec![7u8; 16 * 1024];
        m[..4].copy_from_slice(&(i as u32).to_be_bytes());
        backend.push(s, &m, false);
    }
    gw.wait_metric(
        "gateway_messages_total{direction=\"backend_to_client\"",
        |v| v >= STUCK_LOAD as f64,
        T,
    )
    .await;
}

/// Every message of [`push_more_than_sockets_hold`], in order.
async fn expect_all_of_it(c: &mut Client) {
    for i in 0..STUCK_LOAD {
        match c.recv_within(T).await {
            Some(Msg::Binary(m)) => {
                assert_eq!(u32::from_be_bytes(m[..4].try_into().unwrap()) as usize, i)
            }
            other => panic!("message {i}: {other:?}"),
        }
    }
}

/// Resumes from position 0 and requires the 101 within a second (the
/// gateways here have a 5 s `close_timeout` that must not be waited for).
async fn resume_within_a_second(gw: &Gateway, token: &str, while_: &str) -> Client {
    let started = std::time::Instant::now();
    let (c, _, _) = connect(gw, Some((token, 0)))
        .await
        .unwrap_or_else(|status| panic!("resume while {while_}: {status}"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the resume while {while_} waited {:?}",
        started.elapsed()
    );
    c
}

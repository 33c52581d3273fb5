//! Logs that do not drown an operator (issue 11): an event repeated once
//! per client or per session logs a few lines, then one line with the
//! count of the rest; the metrics count every one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gateway_tests::client::{Client, Connect};
use gateway_tests::{Certs, Gateway, GatewayOpts, TestBackend};
use protocol::Framing;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(10);

/// The lines of `stderr` holding `needle`.
fn lines_with<'a>(stderr: &'a str, needle: &str) -> Vec<&'a str> {
    stderr.lines().filter(|l| l.contains(needle)).collect()
}

/// The events the summary lines of one call site say they suppressed.
fn suppressed(stderr: &str, site_file: &str) -> u64 {
    lines_with(stderr, "similar log lines suppressed")
        .iter()
        .filter(|l| l.contains(site_file))
        .map(|l| {
            let v = l
                .split("suppressed=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_else(|| panic!("no count in {l:?}"));
            v.parse::<u64>().unwrap()
        })
        .sum()
}

/// Waits until `done(stderr)` or panics with the stderr's tail.
async fn wait_stderr(gw: &Gateway, limit: Duration, done: impl Fn(&str) -> bool) -> String {
    let start = tokio::time::Instant::now();
    loop {
        let s = gw.proc.stderr();
        if done(&s) {
            return s;
        }
        if start.elapsed() > limit {
            let tail: Vec<_> = s.lines().rev().take(20).collect();
            panic!("stderr never got there; its last lines: {tail:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_bad_handshakes_log_ten_lines_and_a_count() {
    const N: u64 = 10_000;
    let backend = TestBackend::start(Framing::Varint, true).await;
    let certs = Certs::new();
    // Debug: the level at which each refused handshake is logged.
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .tls(&certs)
            .log("info,gateway=debug"),
    );
    gw.wait_ready(T).await;
    let wss = gw.wss.unwrap();
    // Plain HTTP on the TLS port: each one a failed TLS handshake.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            for _ in 0..N / 8 {
                let mut s = tokio::net::TcpStream::connect(wss).await.unwrap();
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
                let _ = s.shutdown().await;
                let mut sink = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut sink).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    gw.wait_metric(
        "gateway_sessions_refused_total{reason=\"tls_error\"",
        |v| v == N as f64,
        T,
    )
    .await;
    // The summary comes within a window (10 s) of the burst, from the
    // periodic summariser, with no further event needed.
    let site = "listener.rs";
    let stderr = wait_stderr(&gw, Duration::from_secs(30), |s| {
        let logged = lines_with(s, "TLS handshake refused").len() as u64;
        logged + suppressed(s, site) == N
    })
    .await;
    let logged = lines_with(&stderr, "TLS handshake refused").len();
    assert!(
        (1..=20).contains(&logged),
        "{logged} lines for {N} refused handshakes"
    );
    let summaries = lines_with(&stderr, "similar log lines suppressed").len();
    assert!(
        summaries <= 3,
        "{summaries} summary lines for one burst of {N}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_lost_under_two_thousand_sessions_logs_a_count_not_a_line_each() {
    const N: usize = 2_000;
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    // One link, so every session is on the one that is lost.
    let gw = Gateway::start(GatewayOpts::new(backend.addr).links(1));
    gw.wait_ready(T).await;
    let mut clients = Vec::with_capacity(N);
    for _ in 0..N {
        clients.push(Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await);
        backend.next_open().await;
    }
    backend.kill();
    for c in &mut clients {
        let (code, _) = c.expect_close(T).await;
        assert_eq!(code, 1012);
    }
    gw.wait_metric(
        "gateway_sessions_closed_total{reason=\"link_lost\"",
        |v| v == N as f64,
        T,
    )
    .await;
    let stderr = wait_stderr(&gw, Duration::from_secs(30), |s| {
        let logged = lines_with(s, "session closed").len() as u64;
        logged + suppressed(s, "session/mod.rs") == N as u64
    })
    .await;
    let logged = lines_with(&stderr, "session closed").len();
    assert!(
        (1..=20).contains(&logged),
        "{logged} 'session closed' lines for {N} sessions on a lost link"
    );
    // The link's own loss is one line.
    assert_eq!(lines_with(&stderr, "link down").len(), 1, "{stderr}");
}

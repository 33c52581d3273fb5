//! A fleet: several gateway instances sharing resumable sessions through a
//! real `redis-server`, behind a real `haproxy`, in front of the reference
//! backend (version 3 with "fleet"). A client's resume may reach any
//! instance; a deploy (SIGTERM) hands sessions over instead of ending them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use gateway_tests::client::{resumable, Msg};
use gateway_tests::fleet::{free_port, Haproxy, Redis};
use gateway_tests::{python_backend, reference_backend, secs, Gateway, GatewayOpts};

const T: Duration = Duration::from_secs(10);

/// A gateway instance of the fleet at `redis`, in front of `backend`.
fn instance(backend: SocketAddr, redis: &Redis) -> Gateway {
    let url = redis.url();
    Gateway::start(GatewayOpts::new(backend).config(|c| {
        c.fleet.redis_url = Some(url);
        c.resume.grace = secs(30);
    }))
}

/// Waits until the instance is ready and subscribed to its fleet channel.
async fn wait_member(gw: &Gateway) {
    gw.wait_ready(T).await;
    gw.wait_metric("gateway_fleet_connected", |v| v == 1.0, T)
        .await;
}

/// A session opened on one instance, its connection lost with messages in
/// flight, resumes on another instance: the 101 confirms every message the
/// first instance accepted, the echoes of those in flight are replayed
/// once and in order, and the session goes on; the first instance holds
/// nothing any more.
#[tokio::test]
async fn a_session_resumes_on_another_instance_with_nothing_lost() {
    let redis = Redis::start();
    let (_backend, backend_addr) = reference_backend(&[]);
    let a = instance(backend_addr, &redis);
    let b = instance(backend_addr, &redis);
    wait_member(&a).await;
    wait_member(&b).await;

    let (mut c, token, _) = resumable(a.ws.unwrap(), None).await.unwrap();
    for i in 0..20 {
        c.echo(&format!("m{i}")).await;
    }
    // Five more whose echoes are not read before the connection drops.
    for i in 20..25 {
        c.send_text(&format!("m{i}")).await;
    }
    a.wait_metric(
        "gateway_messages_total{direction=\"client_to_backend\"",
        |v| v >= 25.0,
        T,
    )
    .await;
    drop(c);
    a.wait_metric("gateway_sessions_detached", |v| v == 1.0, T)
        .await;

    let started = std::time::Instant::now();
    let (mut c, token, confirmed) = match resumable(b.ws.unwrap(), Some((&token, 20))).await {
        Ok(v) => v,
        Err(code) => {
            let (_, m) = b.admin_get("/metrics").await;
            let (_, ma) = a.admin_get("/metrics").await;
            panic!(
                "resume on B: {code}\nB: {}\nA: {}\nB stderr: {}\nA stderr: {}",
                m.lines()
                    .filter(|l| l.contains("fleet") || l.contains("resume"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                ma.lines()
                    .filter(|l| l.contains("fleet") || l.contains("resume"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                b.proc.stderr(),
                a.proc.stderr()
            );
        }
    };
    assert_eq!(
        confirmed, 25,
        "the 101 confirms every message instance A accepted"
    );
    for i in 20..25 {
        assert_eq!(
            c.recv_within(T).await,
            Some(Msg::Text(format!("m{i}"))),
            "replayed by instance B, in order"
        );
    }
    let crossing = started.elapsed();
    c.echo("after the move").await;
    let extra = tokio::time::timeout(Duration::from_millis(300), c.recv()).await;
    assert!(extra.is_err(), "nothing more (no duplicate): {extra:?}");

    assert_eq!(a.metric("gateway_sessions_open").await, 0.0);
    assert_eq!(b.metric("gateway_sessions_open").await, 1.0);
    assert_eq!(
        a.metric("gateway_fleet_handovers_total{direction=\"out\",result=\"ok\"")
            .await,
        1.0
    );
    assert_eq!(
        b.metric("gateway_fleet_handovers_total{direction=\"in\",result=\"ok\"")
            .await,
        1.0
    );
    // For comparison, a resume on the instance that holds the session.
    drop(c);
    b.wait_metric("gateway_sessions_detached", |v| v == 1.0, T)
        .await;
    let started = std::time::Instant::now();
    let (mut c, _, _) = resumable(b.ws.unwrap(), Some((&token, 26))).await.unwrap();
    let local = started.elapsed();
    c.echo("local").await;
    eprintln!("resume taking the session over from another instance: {crossing:?}; on its own instance: {local:?}");
}

/// Three instances behind HAProxy (the deploy file, round robin, no
/// stickiness).
struct Fleet {
    redis: Redis,
    backend: SocketAddr,
    instances: Vec<Gateway>,
    /// (ws port, admin port) of each instance, kept across restarts.
    ports: Vec<(u16, u16)>,
    haproxy: Haproxy,
}

impl Fleet {
    async fn start(backend: SocketAddr, redis: Redis, n: usize) -> Self {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let mut instances = Vec::new();
        for &(ws, admin) in &ports {
            instances.push(fleet_instance(backend, &redis, ws, admin));
        }
        for gw in &instances {
            wait_member(gw).await;
        }
        let servers: Vec<(SocketAddr, SocketAddr)> = instances
            .iter()
            .map(|g| (g.ws.unwrap(), g.admin.unwrap()))
            .collect();
        let haproxy = Haproxy::start(&servers);
        Self {
            redis,
            backend,
            instances,
            ports,
            haproxy,
        }
    }

    /// Deploys instance `i`: SIGTERM, wait for it to exit (it hands its
    /// sessions over first), start it again on the same ports.
    async fn redeploy(&mut self, i: usize) -> Duration {
        let started = std::time::Instant::now();
        self.instances[i].proc.sigterm();
        let code = tokio::task::block_in_place(|| self.instances[i].proc.wait_exit(secs(30)));
        assert_eq!(
            code,
            Some(0),
            "instance {i} did not exit cleanly:\n{}",
            self.instances[i].proc.stderr()
        );
        let took = started.elapsed();
        let (ws, admin) = self.ports[i];
        self.instances[i] = fleet_instance(self.backend, &self.redis, ws, admin);
        wait_member(&self.instances[i]).await;
        took
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.haproxy.addr)
    }
}

/// An instance for a rolling deploy: fixed ports, sessions handed off
/// over 2 s on SIGTERM, their state kept up to 8 s.
fn fleet_instance(backend: SocketAddr, redis: &Redis, ws: u16, admin: u16) -> Gateway {
    let url = redis.url();
    let mut o = GatewayOpts::new(backend).config(|c| {
        c.fleet.redis_url = Some(url);
        c.resume.grace = secs(30);
        c.shutdown.close_spread = secs(2);
        c.shutdown.drain_timeout = secs(8);
    });
    o.ws_port = ws;
    o.admin_port = admin;
    Gateway::start(o)
}

/// `loadtest run --scenario churn` through the load balancer, as a child
/// process; its JSON summary when it ends.
fn churn(url: &str, connections: u32, duration: Duration) -> std::process::Child {
    std::process::Command::new(gateway_tests::bin("loadtest"))
        .args(["run", "--json", "--scenario", "churn", "--url", url])
        .args(["--connections", &connections.to_string()])
        .args(["--duration", &format!("{}s", duration.as_secs())])
        .args(["--churn-every", "3s", "--churn-share", "0.1"])
        .args(["--suspend-min", "200ms", "--suspend-max", "1s"])
        .args(["--size", "64"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn summary(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    gateway_tests::assert_no_panic("loadtest", &stderr);
    assert!(out.status.success(), "loadtest failed: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A rolling deploy, as an operator runs it: 300 resumable sessions echo
/// through HAProxy in front of 3 instances while 10% of the clients drop
/// every 3 s, and each instance in turn is stopped (SIGTERM) and started
/// again. Every session survives: nothing lost, duplicated or reordered,
/// no session ended, no 410; sessions were handed off (4000) and taken
/// over by the other instances.
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_deploy_behind_haproxy_ends_no_session() {
    let (backend_proc, backend) = reference_backend(&[]);
    rolling_deploy(backend_proc, backend).await;
}

/// The same rolling deploy in front of the independent Python backend,
/// written from protocol/README.md only (its `fleet` capability included).
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_deploy_with_the_independent_python_backend_ends_no_session() {
    let (backend_proc, backend) = python_backend(&[]);
    rolling_deploy(backend_proc, backend).await;
}

async fn rolling_deploy(_backend_proc: gateway_tests::Proc, backend: SocketAddr) {
    let mut fleet = Fleet::start(backend, Redis::start(), 3).await;
    let run = churn(&fleet.url(), 300, secs(40));
    tokio::time::sleep(secs(6)).await;
    let mut took = Vec::new();
    for i in 0..3 {
        took.push(fleet.redeploy(i).await);
        tokio::time::sleep(secs(3)).await;
    }
    let s = tokio::task::block_in_place(|| summary(run));
    eprintln!("rolling deploy: {s}\ninstances took {took:?} to drain");
    assert_eq!(s["lost"], 0, "{s}");
    assert_eq!(s["duplicated"], 0, "{s}");
    assert_eq!(s["reordered"], 0, "{s}");
    assert_eq!(s["resumes_refused"], 0, "no 410: {s}");
    assert_eq!(
        s["close_codes"],
        serde_json::json!({}),
        "no session ended: {s}"
    );
    assert!(
        s["handoffs"].as_u64().unwrap() > 0,
        "sessions were handed off: {s}"
    );
    assert!(s["messages"].as_u64().unwrap() > 10_000, "{s}");
    for gw in &fleet.instances {
        assert!(
            gw.proc.stderr().lines().all(|l| !l.contains(" ERROR ")),
            "{}",
            gw.proc.stderr()
        );
    }
}

/// An instance killed outright (SIGKILL): its clients' resumes reach
/// another instance, which finds nobody on the holder's channel and, once
/// the holder's liveness key has expired (at most 3 s: until then it could
/// be a holder between two subscriptions, and the answer is 503 with
/// Retry-After), answers 410: an explicit answer within seconds, never a
/// hang. The other instance's sessions go on untouched.
#[tokio::test]
async fn a_killed_instance_sessions_get_a_410_within_seconds_elsewhere() {
    let redis = Redis::start();
    let (_backend, backend_addr) = reference_backend(&[]);
    let mut a = instance(backend_addr, &redis);
    let b = instance(backend_addr, &redis);
    wait_member(&a).await;
    wait_member(&b).await;
    let (mut on_a, token, _) = resumable(a.ws.unwrap(), None).await.unwrap();
    on_a.echo("one").await;
    let (mut on_b, _, _) = resumable(b.ws.unwrap(), None).await.unwrap();
    on_b.echo("one").await;

    a.proc.signal("KILL");
    a.proc.wait_exit(T);
    let started = std::time::Instant::now();
    let mut answers = Vec::new();
    let last = loop {
        let r = resumable(b.ws.unwrap(), Some((&token, 1))).await.err();
        answers.push((started.elapsed(), r));
        if r != Some(503) {
            break r;
        }
        // As a client does on 503: retry after Retry-After (1 s).
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let took = started.elapsed();
    eprintln!("resumes of a killed instance's session: {answers:?}");
    assert_eq!(
        last,
        Some(410),
        "a session whose instance died is lost, said so"
    );
    assert!(took < Duration::from_secs(6), "within seconds: {answers:?}");
    assert_eq!(
        b.metric("gateway_resumes_refused_total{reason=\"owner_lost\"")
            .await,
        1.0
    );
    // Its directory entry is gone with it: asking again is answered at once.
    assert_eq!(
        resumable(b.ws.unwrap(), Some((&token, 1))).await.err(),
        Some(410)
    );
    on_b.echo("two").await;
}

/// Redis stopped: resumes on the instance holding the session work; a
/// resume that needs another instance gets 503 with Retry-After within
/// fleet.handover_timeout (no hang); new sessions open. Redis back (empty):
/// the instances resubscribe and rewrite their directory entries, and a
/// resume on another instance works again.
#[tokio::test]
async fn redis_down_degrades_to_local_resume_and_recovers() {
    let mut redis = Redis::start();
    let (_backend, backend_addr) = reference_backend(&[]);
    let start = |redis: &Redis| {
        let url = redis.url();
        Gateway::start(GatewayOpts::new(backend_addr).config(|c| {
            c.fleet.redis_url = Some(url);
            c.fleet.handover_timeout = secs(2);
            c.fleet.directory_ttl = secs(3);
            c.resume.grace = secs(60);
        }))
    };
    let a = start(&redis);
    let b = start(&redis);
    wait_member(&a).await;
    wait_member(&b).await;
    let (mut c, token, _) = resumable(a.ws.unwrap(), None).await.unwrap();
    c.echo("one").await;
    drop(c);
    a.wait_metric("gateway_sessions_detached", |v| v == 1.0, T)
        .await;

    redis.stop();
    // Elsewhere: 503, soon, with Retry-After.
    let started = std::time::Instant::now();
    let (status, retry_after) = raw_resume(b.ws.unwrap(), &token, 1).await;
    let took = started.elapsed();
    eprintln!("cross-instance resume with Redis down: {status} in {took:?}");
    assert_eq!(status, 503);
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(
        took < Duration::from_secs(5),
        "bounded by handover_timeout: {took:?}"
    );
    // On the instance holding it: resumed as ever.
    let (mut c, token, _) = resumable(a.ws.unwrap(), Some((&token, 1))).await.unwrap();
    c.echo("two").await;
    // New sessions open on either.
    let (mut fresh, _, _) = resumable(b.ws.unwrap(), None).await.unwrap();
    fresh.echo("new").await;
    drop(c);
    a.wait_metric("gateway_sessions_detached", |v| v == 1.0, T)
        .await;

    // Redis back, empty: resubscribed, and the session moves to B at once
    // (its directory entry rewritten, or, until then, found by asking
    // every instance).
    redis.restart();
    wait_member(&a).await;
    wait_member(&b).await;
    let (mut c, _, confirmed) = resumable(b.ws.unwrap(), Some((&token, 2))).await.unwrap();
    assert_eq!(confirmed, 2);
    c.echo("three").await;
}

/// A resume's raw HTTP answer: its status and `Retry-After`.
async fn raw_resume(addr: SocketAddr, token: &str, received: u64) -> (u16, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         X-Wsgw-Resume: {token}\r\nX-Wsgw-Received: {received}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let retry_after = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("retry-after: ")
                .or_else(|| l.strip_prefix("Retry-After: "))
        })
        .map(str::to_owned);
    (status, retry_after)
}

/// Two resumes of one session race on two other instances: exactly one
/// connection ends up holding the session (its echo works); the other is
/// told, as on one instance: closed with 1008 "session resumed on another
/// connection" if it got its 101 first, or refused.
#[tokio::test]
async fn two_racing_resumes_on_two_instances_leave_exactly_one_holder() {
    let redis = Redis::start();
    let (_backend, backend_addr) = reference_backend(&[]);
    let a = instance(backend_addr, &redis);
    let b = instance(backend_addr, &redis);
    let c = instance(backend_addr, &redis);
    for gw in [&a, &b, &c] {
        wait_member(gw).await;
    }
    for round in 0..5 {
        let (mut s, token, _) = resumable(a.ws.unwrap(), None).await.unwrap();
        s.echo("hello").await;
        drop(s);
        a.wait_metric("gateway_sessions_detached", |v| v == 1.0, T)
            .await;
        let (on_b, on_c) = tokio::join!(
            resumable(b.ws.unwrap(), Some((&token, 1))),
            resumable(c.ws.unwrap(), Some((&token, 1)))
        );
        let mut holders = 0;
        for (name, r) in [("B", on_b), ("C", on_c)] {
            match r {
                Ok((mut cl, _, confirmed)) => {
                    assert_eq!(confirmed, 1);
                    cl.send_text("who holds it").await;
                    match cl.recv_within(T).await {
                        Some(Msg::Text(t)) => {
                            assert_eq!(t, "who holds it");
                            holders += 1;
                        }
                        Some(Msg::Close(code, reason)) => {
                            assert_eq!(code, 1008, "{name}: {reason}");
                        }
                        // Taken over while a write was in progress: the
                        // older connection is dropped without a close.
                        None => {}
                        other => panic!("round {round}, {name}: {other:?}"),
                    }
                }
                Err(status) => assert!(
                    status == 410 || status == 503,
                    "round {round}, {name}: refused with {status}"
                ),
            }
        }
        assert_eq!(holders, 1, "round {round}: exactly one holder");
        // One session per round, across the fleet: none was duplicated.
        let started = std::time::Instant::now();
        loop {
            let mut open = 0.0;
            for gw in [&a, &b, &c] {
                open += gw.metric("gateway_sessions_open").await;
            }
            if open == f64::from(round + 1) {
                break;
            }
            assert!(started.elapsed() < T, "round {round}: {open} sessions open");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

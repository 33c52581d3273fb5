//! A fleet: several gateway instances sharing resumable sessions through a
//! real `redis-server`, behind a real `haproxy`, in front of the reference
//! backend (version 3 with "fleet"). A client's resume may reach any
//! instance; a deploy (SIGTERM) hands sessions over instead of ending them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use gateway_tests::client::{resumable, Msg};
use gateway_tests::fleet::Redis;
use gateway_tests::{reference_backend, secs, Gateway, GatewayOpts};

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

    let (mut c, _, confirmed) = match resumable(b.ws.unwrap(), Some((&token, 20))).await {
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
    // A resume with the token just spent at B, on A, finds the session at B
    // (the token stays good until B's connection proves itself): taken over.
    drop(c);
}

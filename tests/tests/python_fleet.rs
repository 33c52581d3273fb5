//! The independent Python backend (tests/interop/backend.py) behind a
//! fleet of two gateway instances sharing a real `redis-server`: a session
//! opened on one instance and resumed on the other moves to a link of the
//! other instance, keyed by `resume.origin_instance_id` (protocol/README.md,
//! "Sessions that move between gateway instances").
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use gateway_tests::client::resumable;
use gateway_tests::fleet::Redis;
use gateway_tests::{python, python_backend_stats, repo_root, secs, Gateway, GatewayOpts, Proc};

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn python_backend_finds_a_session_resumed_on_another_instance() {
    let redis = Redis::start();
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("tests/interop/backend.py"))
        .args(["--listen", "127.0.0.1:0"]);
    let (backend, addr) = Proc::spawn_server(cmd);
    let instance = || {
        let url = redis.url();
        Gateway::start(GatewayOpts::new(addr).config(|c| {
            c.fleet.redis_url = Some(url);
            c.resume.grace = secs(30);
        }))
    };
    let (a, b) = (instance(), instance());
    for gw in [&a, &b] {
        gw.wait_ready(T).await;
        gw.wait_metric("gateway_fleet_connected", |v| v == 1.0, T)
            .await;
    }

    let (mut c, token, _) = resumable(a.ws.unwrap(), None).await.unwrap();
    for i in 0..5 {
        c.echo(&format!("m{i}")).await;
    }
    drop(c);
    a.wait_metric("gateway_sessions_detached", |v| v == 1.0, T)
        .await;
    let (mut c, _, confirmed) = resumable(b.ws.unwrap(), Some((&token, 5)))
        .await
        .unwrap_or_else(|code| panic!("resume on B: {code}\nbackend: {}", backend.stderr()));
    assert_eq!(confirmed, 5);
    c.echo("after the move").await;
    let extra = tokio::time::timeout(Duration::from_millis(300), c.recv()).await;
    assert!(extra.is_err(), "nothing more (no duplicate): {extra:?}");
    drop(c);

    let stats = python_backend_stats(&b).await;
    assert_eq!(stats["violations"], 0, "{}", backend.stderr());
    assert_eq!(stats["fleet_moves"], 1, "{stats}\n{}", backend.stderr());
}

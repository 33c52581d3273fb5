//! Interoperability with a backend written only from protocol/README.md, in
//! another language (tests/interop/backend.py, standard library Python with
//! hand-written protobuf), in both framings, driven by both a Python
//! `websockets` client and the Rust client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use gateway_tests::client::{self, Client, Connect, Msg};
use gateway_tests::{python, repo_root, Certs, Gateway, GatewayOpts, Proc};

const T: Duration = Duration::from_secs(10);

fn python_backend(framing: &str) -> (Proc, std::net::SocketAddr) {
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("tests/interop/backend.py")).args([
        "--listen",
        "127.0.0.1:0",
        "--framing",
        framing,
    ]);
    let (proc, lines) = Proc::spawn(cmd, 1);
    let addr = lines[0]
        .strip_prefix("listening ")
        .unwrap()
        .parse()
        .unwrap();
    (proc, addr)
}

async fn run(framing: &str) {
    let certs = Certs::new();
    let (mut backend, addr) = python_backend(framing);
    let gw = Gateway::start(GatewayOpts {
        framing,
        ..GatewayOpts::new(addr).tls(&certs)
    });
    gw.wait_ready(T).await;
    gw.wait_links_up(2, T).await;

    // Python client -> Rust gateway -> Python backend.
    gateway_tests::python_ws_client(&gw.wss_url("/ws?from=python"), &certs.ca()).await;

    // Rust client: pushes, stats and a backend-initiated close.
    let tls = Connect {
        tls: Some(client::tls_config(&certs.ca())),
        ..Connect::default()
    };
    let mut c = Client::connect(gw.wss.unwrap(), "/ws?from=rust", &tls).await;
    c.send_text("cmd:push:3").await;
    for i in 0..3 {
        assert_eq!(
            c.recv_within(T).await,
            Some(Msg::Binary(format!("push-{i}").into_bytes()))
        );
    }
    c.send_binary(&[9, 8, 7]).await;
    assert_eq!(c.recv_within(T).await, Some(Msg::Binary(vec![9, 8, 7])));
    c.send_text("cmd:stats").await;
    let Some(Msg::Text(stats)) = c.recv_within(T).await else {
        panic!("no stats")
    };
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(
        stats["violations"],
        0,
        "{stats}\nbackend stderr:\n{}",
        backend.stderr()
    );
    assert_eq!(stats["links"], 2, "{stats}");
    let paths: Vec<&str> = stats["opens"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["path"].as_str())
        .collect();
    assert!(
        paths.contains(&"/ws?from=python") && paths.contains(&"/ws?from=rust"),
        "{paths:?}"
    );
    c.send_text("cmd:close:4002:see you").await;
    assert_eq!(c.expect_close(T).await, (4002, "see you".into()));
    assert!(
        !backend.stderr().contains("PROTOCOL VIOLATION"),
        "{}",
        backend.stderr()
    );
    // Its exit status says whether it saw any violation at all.
    backend.stop_cleanly(T);
}

#[tokio::test(flavor = "multi_thread")]
async fn python_backend_varint_framing() {
    run("varint").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_backend_u32be_framing() {
    run("u32be").await;
}

/// Protocol version 2 with the independent backend: it sees a resumable
/// session detach and attach, and nothing it considers a violation.
#[tokio::test(flavor = "multi_thread")]
async fn python_backend_sees_detach_and_attach() {
    let (mut backend, addr) = python_backend("varint");
    let gw = Gateway::start(GatewayOpts::new(addr));
    gw.wait_ready(T).await;
    let (mut c, resp) = gw.echo_drop_and_resume().await;
    assert_eq!(resp.headers()["x-wsgw-received"], "1");
    c.send_text("cmd:stats").await;
    let Some(Msg::Text(stats)) = c.recv_within(T).await else {
        panic!("no stats")
    };
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["detaches"], 1, "{stats}");
    assert_eq!(stats["attaches"], 1, "{stats}");
    assert_eq!(stats["violations"], 0, "{stats}\n{}", backend.stderr());
    backend.stop_cleanly(T);
}

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
    let (proc, addr) = Proc::spawn_server(cmd);
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

/// What the independent backend reads in `Hello`: the configured name,
/// heartbeat and limits, each link's index, and one instance id per
/// gateway process, which a restarted gateway does not reuse; and version
/// 3's offer (capabilities, the session window, the move timeout).
#[tokio::test(flavor = "multi_thread")]
async fn hello_carries_the_configured_values_and_a_fresh_instance_id_per_process() {
    let (mut backend, addr) = python_backend("varint");
    let start = || {
        let gw = Gateway::start(GatewayOpts::new(addr).config(|c| {
            c.backend.gateway_id = "gw-test".into();
            c.backend.heartbeat_interval = gateway_tests::ms(1500);
            c.backend.heartbeat_timeout = gateway_tests::ms(4500);
            c.backend.max_frame_size = gateway_tests::kib(300);
            c.session.max_message_size = gateway_tests::kib(256);
            c.session.client_queue_bytes = gateway_tests::kib(512);
        }));
        gw
    };
    let hellos = |s: &serde_json::Value| s["hellos"].as_array().unwrap().clone();
    let mut first = start();
    first.wait_links_up(2, T).await;
    let seen = hellos(&gateway_tests::python_backend_stats(&first).await);
    assert_eq!(seen.len(), 2, "{seen:?}");
    let mut indexes: Vec<u64> = seen
        .iter()
        .map(|h| h["link_index"].as_u64().unwrap())
        .collect();
    indexes.sort_unstable();
    assert_eq!(indexes, [0, 1]);
    for h in &seen {
        assert_eq!(h["gateway_id"], "gw-test", "{h}");
        assert_eq!(
            (h["min_version"].as_u64(), h["max_version"].as_u64()),
            (Some(1), Some(3))
        );
        assert_eq!(
            h["capabilities"],
            serde_json::json!(["flow", "move"]),
            "{h}"
        );
        // The client queue's bound, above one maximal message (+ 64).
        assert_eq!(h["session_window"], 512 * 1024, "{h}");
        assert_eq!(h["move_timeout_ms"], 10_000, "{h}");
        assert_eq!(h["heartbeat_interval_ms"], 1500, "{h}");
        assert_eq!(h["heartbeat_timeout_ms"], 4500, "{h}");
        assert_eq!(h["max_frame_size"], 300 * 1024, "{h}");
        assert_eq!(h["max_message_size"], 256 * 1024, "{h}");
        assert_eq!(h["client_queue_bytes"], 512 * 1024, "{h}");
        let id = h["instance_id"].as_str().unwrap();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id:?}"
        );
    }
    let instance = seen[0]["instance_id"].clone();
    assert_eq!(seen[1]["instance_id"], instance, "one id for all links");
    first.proc.stop_cleanly(T);

    let second = start();
    second.wait_links_up(2, T).await;
    let all = hellos(&gateway_tests::python_backend_stats(&second).await);
    assert_eq!(all.len(), 4, "{all:?}");
    for h in &all[2..] {
        assert_eq!(h["gateway_id"], "gw-test", "same name, same host");
        assert_ne!(h["instance_id"], instance, "a restarted gateway: {h}");
    }
    assert_eq!(all[2]["instance_id"], all[3]["instance_id"]);
    backend.stop_cleanly(T);
}

/// `SessionOpen.traceparent` reaches a backend written from
/// protocol/README.md alone, as the contract says: the client's header
/// passed on when the gateway does not trace; the gateway's own session
/// span (same trace, a new span id, sampled) when it does.
#[tokio::test(flavor = "multi_thread")]
async fn the_python_backend_gets_the_traceparent_the_contract_describes() {
    let client_tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let opens_for = |stats: &serde_json::Value, path: &str| -> Vec<serde_json::Value> {
        stats["opens"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["path"] == path)
            .cloned()
            .collect()
    };
    for traced in [false, true] {
        let (_backend, addr) = python_backend("varint");
        let gw = Gateway::start(GatewayOpts::new(addr).config(|c| {
            if traced {
                // Nothing listens there: spans are made and sampled, and
                // their export fails quietly, which is what is tested.
                c.telemetry.otlp_endpoint = Some("http://127.0.0.1:9".into());
                c.telemetry.otlp_metrics = false;
                c.telemetry.traces_sample_ratio = 1.0;
            }
        }));
        gw.wait_ready(T).await;
        let mut opts = Connect::default();
        opts.headers.push(("traceparent", client_tp.into()));
        let mut c = Client::connect(gw.ws.unwrap(), "/ws?tp=1", &opts).await;
        c.echo("hi").await;
        let mut bad = Connect::default();
        bad.headers
            .push(("traceparent", "00-nothex-00f067aa0ba902b7-01".into()));
        let mut c2 = Client::connect(gw.ws.unwrap(), "/ws?tp=bad", &bad).await;
        c2.echo("hi").await;
        let stats = gateway_tests::python_backend_stats(&gw).await;
        let open = &opens_for(&stats, "/ws?tp=1")[0];
        assert_eq!(open["traceparent_valid"], true, "{open}");
        let tp = open["traceparent"].as_str().unwrap();
        if traced {
            let parts: Vec<&str> = tp.split('-').collect();
            assert_eq!(
                parts[1], "4bf92f3577b34da6a3ce929d0e0e4736",
                "same trace: {tp}"
            );
            assert_ne!(parts[2], "00f067aa0ba902b7", "the gateway's span: {tp}");
            assert_eq!(parts[3], "01", "sampled: {tp}");
        } else {
            assert_eq!(tp, client_tp);
        }
        let bad_open = &opens_for(&stats, "/ws?tp=bad")[0];
        assert_eq!(bad_open["traceparent_valid"], true, "{bad_open}");
        if !traced {
            assert_eq!(
                bad_open["traceparent"], "",
                "a malformed header is not passed on"
            );
        }
    }
}

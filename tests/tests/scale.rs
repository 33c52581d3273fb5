//! 1,000 concurrent wss clients over 2 backend links: every client gets
//! exactly its own messages, in order, and the backend sees 2 connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gateway_tests::client::{self, Client, Connect, Msg};
use gateway_tests::{Certs, Gateway, GatewayOpts, TestBackend};
use protocol::Framing;

const T: Duration = Duration::from_secs(10);
const CLIENTS: usize = 1000;
const MESSAGES: usize = 20;

#[tokio::test(flavor = "multi_thread")]
async fn thousand_wss_clients_over_two_links_each_get_their_own_messages_in_order() {
    let certs = Certs::new();
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).tls(&certs));
    gw.wait_ready(Duration::from_secs(10)).await;
    let tls = Connect {
        tls: Some(client::tls_config(&certs.ca())),
        ..Connect::default()
    };
    let addr = gw.wss.unwrap();

    // Connect everyone first, so that all sessions are open at once.
    let mut clients = Vec::with_capacity(CLIENTS);
    let mut connecting = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let tls = tls.tls.clone();
        connecting.spawn(async move {
            let opts = Connect {
                tls,
                ..Connect::default()
            };
            (i, Client::connect(addr, "/ws", &opts).await)
        });
    }
    while let Some(r) = connecting.join_next().await {
        clients.push(r.unwrap());
    }
    gw.wait_metric("gateway_sessions_open", |v| v == CLIENTS as f64, T)
        .await;

    // Everyone sends numbered messages without waiting, and must get back
    // exactly its own, in order, with the right type.
    let mut running = tokio::task::JoinSet::new();
    for (i, mut c) in clients {
        running.spawn(async move {
            for j in 0..MESSAGES {
                let m = format!("client {i} message {j}");
                if j % 2 == 0 {
                    c.send_text(&m).await;
                } else {
                    c.send_binary(m.as_bytes()).await;
                }
            }
            for j in 0..MESSAGES {
                let m = format!("client {i} message {j}");
                let expected = if j % 2 == 0 {
                    Msg::Text(m)
                } else {
                    Msg::Binary(m.into_bytes())
                };
                let got = c.recv_within(Duration::from_secs(30)).await;
                assert_eq!(got, Some(expected), "client {i}");
            }
            c
        });
    }
    let mut done = Vec::new();
    while let Some(r) = running.join_next().await {
        done.push(r.unwrap());
    }
    assert_eq!(done.len(), CLIENTS);
    assert_eq!(
        backend.accepted(),
        2,
        "the backend must see exactly 2 TCP connections"
    );
    gw.wait_metric(
        "gateway_messages_total{direction=\"backend_to_client\"",
        |v| v == (CLIENTS * MESSAGES) as f64,
        T,
    )
    .await;
}

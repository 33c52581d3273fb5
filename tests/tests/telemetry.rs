//! Telemetry as an operator sees it: a real Prometheus scraping the admin
//! listener, an OTLP receiver (on the official protobuf definitions) fed
//! over gRPC and HTTP, the session span and the `traceparent` the backend
//! gets, `--version`, and a clean exit when the receiver is gone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use fastwebsockets::Frame;
use gateway::config::OtlpProtocol;
use gateway_tests::client::{self, Client, Connect};
use gateway_tests::telemetry::{attr, id_hex, OtlpReceiver, Prometheus};
use gateway_tests::{bin, ms, secs, Certs, Gateway, GatewayOpts, TestBackend};
use protocol::Framing;
use serde_json::Value;

const T: Duration = Duration::from_secs(10);
/// How long an export may take to reach the receiver: the batch span
/// processor's schedule delay (5 s by default) with room to spare.
const EXPORT: Duration = Duration::from_secs(20);
/// How long Prometheus may take to pick up a new target and scrape it
/// (its scrape interval here is 1 s; targets apply after about 5 s).
const SCRAPE: Duration = Duration::from_secs(30);

/// The client's trace and span (the W3C specification's example ids).
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn client_traceparent(flags: &str) -> String {
    format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-{flags}")
}

/// The workspace version (the test crate shares it).
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A W3C `traceparent` taken apart; panics unless it is well formed.
#[derive(Debug)]
struct Traceparent {
    trace: String,
    span: String,
    flags: String,
}

fn parse_traceparent(s: &str) -> Traceparent {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && p.bytes().any(|b| b != b'0')
    };
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && parts[3].len() == 2,
        "not a valid W3C traceparent: {s:?}"
    );
    Traceparent {
        trace: parts[1].to_owned(),
        span: parts[2].to_owned(),
        flags: parts[3].to_owned(),
    }
}

/// A connection option carrying a `traceparent` header.
fn with_traceparent(tp: &str) -> Connect<'static> {
    Connect {
        headers: vec![("traceparent", tp.to_owned())],
        ..Connect::default()
    }
}

/// `gateway --version`'s field `name` (`commit`, `rustc`, ...).
fn version_field(name: &str) -> String {
    let out = Command::new(bin("gateway"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success(), "gateway --version failed: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no `{name}: ` line in gateway --version:\n{text}"))
        .to_owned()
}

/// The gateway's `Hello.instance_id`, from its start-up log line.
fn instance_id(gw: &Gateway) -> String {
    let log = gw.proc.stderr();
    log.lines()
        .find(|l| l.contains("gateway starting"))
        .and_then(|l| l.split("instance_id=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no instance_id in the start-up log:\n{log}"))
        .to_owned()
}

/// One session with `n` echoed messages, closed by the client with 1000.
async fn echo_session(c: &mut Client, n: usize) {
    for i in 0..n {
        c.echo(&format!("message {i}")).await;
    }
    c.ws.write_frame(Frame::close(1000, b"done")).await.unwrap();
    assert_eq!(c.expect_close(T).await.0, 1000);
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_gateway() {
    const SESSIONS: usize = 3;
    const MESSAGES: usize = 20;
    let certs = Certs::new();
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).tls(&certs));
    gw.wait_ready(T).await;
    let prom = Prometheus::start("wsgw", &[gw.admin.unwrap()]);
    // Over wss, so that every handshake phase is measured.
    let wss = Connect {
        tls: Some(client::tls_config(&certs.ca())),
        ..Connect::default()
    };
    for _ in 0..SESSIONS {
        let mut c = Client::connect(gw.wss.unwrap(), "/ws", &wss).await;
        echo_session(&mut c, MESSAGES).await;
    }

    let (up, _) = prom
        .wait_one(r#"up{job="wsgw"}"#, |v| v == 1.0, SCRAPE)
        .await;
    assert_eq!(up["instance"], gw.admin.unwrap().to_string());
    let n = (SESSIONS * MESSAGES) as f64;
    for direction in ["client_to_backend", "backend_to_client"] {
        let sel = format!(r#"{{job="wsgw",direction="{direction}"}}"#);
        prom.wait_one(&format!("gateway_messages_total{sel}"), |v| v == n, SCRAPE)
            .await;
        prom.wait_one(
            &format!("gateway_relay_duration_seconds_count{sel}"),
            |v| v == n,
            SCRAPE,
        )
        .await;
        // Every message took some time, on loopback far less than a
        // second on average.
        prom.wait_one(
            &format!("gateway_relay_duration_seconds_sum{sel}"),
            |v| v > 0.0 && v < n,
            SCRAPE,
        )
        .await;
    }
    for phase in ["tls", "upgrade", "total"] {
        prom.wait_one(
            &format!(r#"gateway_handshake_duration_seconds_count{{phase="{phase}"}}"#),
            |v| v == SESSIONS as f64,
            SCRAPE,
        )
        .await;
    }
    prom.wait_one(
        "gateway_session_duration_seconds_count",
        |v| v == SESSIONS as f64,
        SCRAPE,
    )
    .await;
    prom.wait_one(
        r#"gateway_sessions_closed_total{reason="client_closed"}"#,
        |v| v == SESSIONS as f64,
        SCRAPE,
    )
    .await;
    // Each client write saw the session's queue once per message.
    prom.wait_one(
        r#"gateway_queue_depth_count{toward="client"}"#,
        |v| v == n,
        SCRAPE,
    )
    .await;
    // Two links to the one endpoint, each with a heartbeat answered.
    let (rtt, _) = prom
        .wait_one(
            "gateway_link_heartbeat_rtt_seconds_count",
            |v| v >= 2.0,
            SCRAPE,
        )
        .await;
    assert_eq!(rtt["endpoint"], backend.addr.to_string());

    let (build, _) = prom
        .wait_one("gateway_build_info", |v| v == 1.0, SCRAPE)
        .await;
    assert_eq!(build["version"], VERSION, "{build:?}");
    assert_eq!(build["commit"], version_field("commit"), "{build:?}");
    assert_eq!(build["rustc"], version_field("rustc"), "{build:?}");
    assert_eq!(build["profile"], "release", "{build:?}");
    // The resource, as Prometheus shows it.
    let (target, _) = prom.wait_one("target_info", |v| v == 1.0, SCRAPE).await;
    assert_eq!(target["service_name"], "wsgw", "{target:?}");
    assert_eq!(target["service_version"], VERSION, "{target:?}");
    assert_eq!(
        target["service_instance_id"],
        instance_id(&gw),
        "{target:?}"
    );
}

/// Every span the receiver got: (resource, span).
fn spans(records: &[Value]) -> Vec<(Value, Value)> {
    let mut out = Vec::new();
    for r in records.iter().filter(|r| r["signal"] == "traces") {
        for rs in r["body"]["resource_spans"].as_array().into_iter().flatten() {
            for ss in rs["scope_spans"].as_array().into_iter().flatten() {
                for sp in ss["spans"].as_array().into_iter().flatten() {
                    out.push((rs["resource"].clone(), sp.clone()));
                }
            }
        }
    }
    out
}

/// The latest data point of metric `name` per value of its attribute
/// `by`, from the newest export that has it (cumulative temporality, so
/// the newest is the total): (resource, metric, points).
fn latest_points(records: &[Value], name: &str, by: &str) -> Option<(Value, Value, Vec<Value>)> {
    let mut latest = None;
    for r in records.iter().filter(|r| r["signal"] == "metrics") {
        for rm in r["body"]["resource_metrics"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for sm in rm["scope_metrics"].as_array().into_iter().flatten() {
                for m in sm["metrics"].as_array().into_iter().flatten() {
                    if m["name"] == name {
                        latest = Some((rm["resource"].clone(), m.clone()));
                    }
                }
            }
        }
    }
    let (resource, metric) = latest?;
    let data = ["histogram", "sum", "gauge"]
        .iter()
        .find_map(|k| metric.get(*k))?
        .clone();
    let mut points: Vec<Value> = data["data_points"].as_array().cloned().unwrap_or_default();
    points.sort_by_key(|p| attr(&p["attributes"], by));
    Some((resource, metric, points))
}

/// The count (histogram) or value (sum) of each data point, keyed by the
/// attribute `by`.
fn counts(points: &[Value], by: &str) -> HashMap<String, u64> {
    points
        .iter()
        .map(|p| {
            let v = p.get("count").or_else(|| p.get("as_int"));
            let v = v
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no count in {p}"));
            (attr(&p["attributes"], by).unwrap_or_default(), v)
        })
        .collect()
}

/// A session traced end to end over `protocol`: the backend's
/// `traceparent`, the exported session span (parent, events, resource),
/// the relay histogram and message counter over OTLP, and the headers.
async fn session_exported_over(protocol: OtlpProtocol) {
    const MESSAGES: u64 = 7;
    let receiver = OtlpReceiver::start();
    let url = match protocol {
        OtlpProtocol::Grpc => receiver.grpc_url.clone(),
        OtlpProtocol::HttpProtobuf => receiver.http_url.clone(),
    };
    let transport = match protocol {
        OtlpProtocol::Grpc => "grpc",
        OtlpProtocol::HttpProtobuf => "http",
    };
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).config(|c| {
        let t = &mut c.telemetry;
        t.service_name = "wsgw-test".into();
        t.otlp_endpoint = Some(url);
        t.otlp_protocol = protocol;
        t.metrics_interval = ms(500);
        t.traces_sample_ratio = 1.0;
        t.otlp_headers
            .insert("authorization".into(), "Bearer t0ken".into());
    }));
    gw.wait_ready(T).await;

    let mut c = Client::connect(
        gw.ws.unwrap(),
        "/ws",
        &with_traceparent(&client_traceparent("01")),
    )
    .await;
    let (session, open) = backend.next_open().await;
    // The backend's context: the client's trace, the gateway's span.
    let to_backend = parse_traceparent(&open.traceparent);
    assert_eq!(to_backend.trace, CLIENT_TRACE, "{to_backend:?}");
    assert_ne!(to_backend.span, CLIENT_SPAN, "{to_backend:?}");
    assert_eq!(to_backend.flags, "01", "{to_backend:?}");
    echo_session(&mut c, MESSAGES as usize).await;
    assert_eq!(backend.wait_close(session).await.0, 1000);

    let (resource, span) = receiver
        .wait_for("session span in the client's trace", EXPORT, |records| {
            let all = spans(records);
            all.iter()
                .find(|(_, s)| id_hex(&s["trace_id"]) == CLIENT_TRACE)
                .cloned()
                .ok_or_else(|| format!("spans: {all:?}"))
        })
        .await;
    assert_eq!(span["name"], "session", "{span}");
    assert_eq!(span["kind"], "SPAN_KIND_SERVER", "{span}");
    assert_eq!(id_hex(&span["parent_span_id"]), CLIENT_SPAN, "{span}");
    assert_eq!(id_hex(&span["span_id"]), to_backend.span, "{span}");
    let attrs = &span["attributes"];
    assert_eq!(attr(attrs, "wsgw.session.id"), Some(session.to_string()));
    assert_eq!(attr(attrs, "websocket.close.code").as_deref(), Some("1000"));
    let events: Vec<&Value> = span["events"].as_array().unwrap().iter().collect();
    let names: Vec<&str> = events.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["open", "close"], "{span}");
    let close = &events[1]["attributes"];
    assert_eq!(attr(close, "websocket.close.code").as_deref(), Some("1000"));
    assert_eq!(
        attr(close, "wsgw.close.reason").as_deref(),
        Some("client_closed")
    );
    let instance = instance_id(&gw);
    let check_resource = |r: &Value| {
        let a = &r["attributes"];
        assert_eq!(attr(a, "service.name").as_deref(), Some("wsgw-test"), "{r}");
        assert_eq!(attr(a, "service.version").as_deref(), Some(VERSION), "{r}");
        assert_eq!(
            attr(a, "service.instance.id"),
            Some(instance.clone()),
            "{r}"
        );
        assert_eq!(
            attr(a, "vcs.ref.head.revision"),
            Some(version_field("commit")),
            "{r}"
        );
    };
    check_resource(&resource);

    // Metrics: cumulative, so the newest export holds the totals.
    let want: HashMap<String, u64> = ["backend_to_client", "client_to_backend"]
        .into_iter()
        .map(|d| (d.to_owned(), MESSAGES))
        .collect();
    let (resource, relay, _) = receiver
        .wait_for("relay histogram with every message", EXPORT, |records| {
            let latest = latest_points(records, "gateway.relay.duration", "direction");
            match latest {
                Some((r, m, p)) if counts(&p, "direction") == want => Ok((r, m, p)),
                other => Err(format!("latest gateway.relay.duration: {other:?}")),
            }
        })
        .await;
    assert_eq!(relay["unit"], "s", "{relay}");
    assert_eq!(
        relay["histogram"]["aggregation_temporality"], "AGGREGATION_TEMPORALITY_CUMULATIVE",
        "{relay}"
    );
    check_resource(&resource);
    receiver
        .wait_for(
            "gateway.messages with every message",
            EXPORT,
            |records| match latest_points(records, "gateway.messages", "direction") {
                Some((_, _, p)) if counts(&p, "direction") == want => Ok(()),
                other => Err(format!("latest gateway.messages: {other:?}")),
            },
        )
        .await;

    for signal in ["metrics", "traces"] {
        let records = receiver.signal(signal);
        assert!(!records.is_empty(), "no {signal} export");
        for r in records {
            assert_eq!(r["transport"], transport, "{signal}: {r}");
            assert_eq!(
                r["headers"]["authorization"], "Bearer t0ken",
                "{signal} export without the configured header: {}",
                r["headers"]
            );
        }
    }
    assert_eq!(backend.violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn otlp_grpc_exports_metrics_and_session_traces() {
    session_exported_over(OtlpProtocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn otlp_http_protobuf_exports_too() {
    session_exported_over(OtlpProtocol::HttpProtobuf).await;
}

/// One span for the whole session, across a lost connection and its
/// resume.
#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_session_is_one_span_with_detach_and_resume() {
    let receiver = OtlpReceiver::start();
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).config(|c| {
        let t = &mut c.telemetry;
        t.otlp_endpoint = Some(receiver.grpc_url.clone());
        t.otlp_metrics = false;
        t.traces_sample_ratio = 1.0;
    }));
    gw.wait_ready(T).await;
    let (mut c, _) = gw.echo_drop_and_resume().await;
    let (session, open) = backend.next_open().await;
    let to_backend = parse_traceparent(&open.traceparent);
    c.echo("after").await;
    c.ws.write_frame(Frame::close(1000, b"done")).await.unwrap();
    assert_eq!(c.expect_close(T).await.0, 1000);

    let span = receiver
        .wait_for("span of the resumed session", EXPORT, |records| {
            let all = spans(records);
            let mine: Vec<Value> = all
                .iter()
                .filter(|(_, s)| {
                    attr(&s["attributes"], "wsgw.session.id") == Some(session.to_string())
                })
                .map(|(_, s)| s.clone())
                .collect();
            match mine.as_slice() {
                [one] => Ok(one.clone()),
                _ => Err(format!("spans: {all:?}")),
            }
        })
        .await;
    assert_eq!(id_hex(&span["trace_id"]), to_backend.trace, "{span}");
    assert_eq!(id_hex(&span["span_id"]), to_backend.span, "{span}");
    // No traceparent from the client: the session span is the root.
    assert_eq!(id_hex(&span["parent_span_id"]), "", "{span}");
    let names: Vec<&str> = span["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["open", "detach", "resume", "close"], "{span}");
    assert_eq!(
        attr(&span["attributes"], "websocket.close.code").as_deref(),
        Some("1000")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn untraced_gateway_passes_the_clients_traceparent_on() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr));
    gw.wait_ready(T).await;
    let ws = gw.ws.unwrap();
    let cases = [
        (client_traceparent("01"), client_traceparent("01")),
        (client_traceparent("00"), client_traceparent("00")),
        (format!("00-zz-{CLIENT_SPAN}-01"), String::new()),
        (
            format!("00-{}-{CLIENT_SPAN}-01", "0".repeat(32)),
            String::new(),
        ),
        (
            format!("00-{CLIENT_TRACE}-{}-01", "0".repeat(16)),
            String::new(),
        ),
        (format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}"), String::new()),
    ];
    for (sent, want) in cases {
        let mut c = Client::connect(ws, "/ws", &with_traceparent(&sent)).await;
        let (_, open) = backend.next_open().await;
        assert_eq!(open.traceparent, want, "client sent {sent:?}");
        c.echo("hi").await;
    }
    let _c = Client::connect(ws, "/ws", &Connect::default()).await;
    assert_eq!(backend.next_open().await.1.traceparent, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn sampling_ratio_zero_traces_only_sampled_clients() {
    let receiver = OtlpReceiver::start();
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).config(|c| {
        let t = &mut c.telemetry;
        t.otlp_endpoint = Some(receiver.grpc_url.clone());
        t.otlp_metrics = false;
        t.traces_sample_ratio = 0.0;
        t.traces_follow_client = true;
    }));
    gw.wait_ready(T).await;
    let ws = gw.ws.unwrap();

    // Not sampled: no header, and a client that says "not sampled". They
    // end first, so a span of theirs would be exported no later than the
    // sampled session's.
    let mut unsampled = Vec::new();
    for connect in [
        Connect::default(),
        with_traceparent(&client_traceparent("00")),
    ] {
        let mut c = Client::connect(ws, "/ws", &connect).await;
        let (session, open) = backend.next_open().await;
        let tp = parse_traceparent(&open.traceparent);
        assert_eq!(tp.flags, "00", "unsampled, yet {tp:?}");
        if !connect.headers.is_empty() {
            assert_eq!(tp.trace, CLIENT_TRACE, "{tp:?}");
        }
        echo_session(&mut c, 1).await;
        unsampled.push(session.to_string());
    }

    let mut c = Client::connect(ws, "/ws", &with_traceparent(&client_traceparent("01"))).await;
    let (sampled, open) = backend.next_open().await;
    let tp = parse_traceparent(&open.traceparent);
    assert_eq!((tp.trace.as_str(), tp.flags.as_str()), (CLIENT_TRACE, "01"));
    echo_session(&mut c, 1).await;

    let all = receiver
        .wait_for("span of the sampled session", EXPORT, |records| {
            let all = spans(records);
            let found = all.iter().any(|(_, s)| {
                attr(&s["attributes"], "wsgw.session.id") == Some(sampled.to_string())
            });
            if found {
                Ok(all)
            } else {
                Err(format!("spans: {all:?}"))
            }
        })
        .await;
    let ids: Vec<Option<String>> = all
        .iter()
        .map(|(_, s)| attr(&s["attributes"], "wsgw.session.id"))
        .collect();
    assert_eq!(ids, [Some(sampled.to_string())], "unsampled: {unsampled:?}");
}

#[test]
fn version_reports_the_build() {
    let out = Command::new(bin("gateway"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let first = text.lines().next().unwrap_or_default();
    assert_eq!(first, format!("wsgw {VERSION}"), "{text}");
    let commit = version_field("commit");
    let sha = commit.strip_suffix("-dirty").unwrap_or(&commit);
    assert!(
        sha == "unknown" || (sha.len() >= 7 && sha.bytes().all(|b| b.is_ascii_hexdigit())),
        "commit: {commit:?}"
    );
    assert!(version_field("rustc").starts_with("rustc 1."), "{text}");
    assert_eq!(
        version_field("target"),
        format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
        "{text}"
    );
    assert_eq!(version_field("profile"), "release", "{text}");
    // -V is the short form: the version and the commit.
    let out = Command::new(bin("gateway")).arg("-V").output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("wsgw {VERSION} ({commit})")
    );
}

/// The gateway's longest way out after SIGTERM once its sessions have
/// closed: the links' flush, then the telemetry flush (`TELEMETRY_FLUSH`,
/// 5 s), with 2 s for the process to start and end.
fn exit_bound() -> Duration {
    gateway_tests::link_flush_deadline() + secs(5) + secs(2)
}

/// A traced gateway exporting to `url`, with one session open (its span
/// not yet ended).
async fn traced_gateway(url: String, protocol: OtlpProtocol) -> (Gateway, Client, TestBackend) {
    let backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(GatewayOpts::new(backend.addr).config(|c| {
        c.shutdown.drain_timeout = secs(2);
        let t = &mut c.telemetry;
        t.otlp_endpoint = Some(url);
        t.otlp_protocol = protocol;
        // Far beyond the gateway's flush bound: an exit that waited for
        // an export's own timeout would show.
        t.otlp_timeout = secs(60);
        t.metrics_interval = ms(200);
        t.traces_sample_ratio = 1.0;
    }));
    gw.wait_ready(T).await;
    let mut c = Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await;
    c.echo("traced").await;
    (gw, c, backend)
}

/// SIGTERMs the gateway and asserts it closes the session with 1001 and
/// exits with 0 within [`exit_bound`]; returns how long it took.
async fn stop_within_bound(mut gw: Gateway, mut c: Client, what: &str) -> Duration {
    let start = Instant::now();
    gw.proc.sigterm();
    assert_eq!(c.expect_close(T).await.0, 1001);
    let code = tokio::task::block_in_place(|| gw.proc.wait_exit(secs(20)));
    let took = start.elapsed();
    assert_eq!(
        code,
        Some(0),
        "{what}: the gateway did not exit cleanly within 20 s of SIGTERM; stderr:\n{}",
        gw.proc.stderr()
    );
    assert!(
        took < exit_bound(),
        "{what}: exit took {took:?}, more than {:?}; stderr:\n{}",
        exit_bound(),
        gw.proc.stderr()
    );
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_cleanly_when_the_receiver_is_gone() {
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::HttpProtobuf] {
        let mut receiver = OtlpReceiver::start();
        let url = match protocol {
            OtlpProtocol::Grpc => receiver.grpc_url.clone(),
            OtlpProtocol::HttpProtobuf => receiver.http_url.clone(),
        };
        let (gw, c, _backend) = traced_gateway(url, protocol).await;
        // Exports were flowing; then the receiver goes away.
        receiver
            .wait_for("metrics export", EXPORT, |records| {
                latest_points(records, "gateway.messages", "direction")
                    .map(|_| ())
                    .ok_or_else(|| format!("records: {records:?}"))
            })
            .await;
        receiver.proc.stop_cleanly(T);
        stop_within_bound(gw, c, &format!("{protocol:?}, receiver gone")).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_within_the_flush_bound_when_the_receiver_never_answers() {
    // Connections complete (into the kernel's backlog) and are never read
    // or answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::HttpProtobuf] {
        let (gw, c, _backend) = traced_gateway(url.clone(), protocol).await;
        stop_within_bound(gw, c, &format!("{protocol:?}, silent receiver")).await;
    }
}

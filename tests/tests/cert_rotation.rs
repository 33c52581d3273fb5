//! Certificates rotate without a blip: new files are picked up on SIGHUP and
//! when they change, established sessions keep going, new handshakes get
//! the new certificate, a bad pair keeps the old one, and the client's SNI
//! chooses among several certificates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::config::CertKeyPair;
use gateway_tests::certs::{client_config, install, presented, replace_file, Issued, TestCa};
use gateway_tests::client::{self, Client, Connect, Msg};
use gateway_tests::{bin, ms, reference_backend, Certs, Gateway, GatewayOpts};

const T: Duration = Duration::from_secs(10);

/// The end-entity certificate (DER) in a PEM chain file.
fn leaf_of(path: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// Polls fresh full handshakes until the gateway presents `want`.
async fn wait_presented(gw: &Gateway, cfg: &Arc<rustls::ClientConfig>, want: &[u8]) {
    let start = Instant::now();
    loop {
        let got = presented(gw.wss.unwrap(), cfg, Some("localhost")).await;
        if got.as_deref().ok() == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < T,
            "the new certificate was not presented within {T:?} ({got:?}); stderr:\n{}",
            gw.proc.stderr()
        );
        tokio::time::sleep(ms(50)).await;
    }
}

/// Lines of the gateway's log that contain `needle`.
fn log_lines(gw: &Gateway, needle: &str) -> usize {
    gw.proc
        .stderr()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Counts of the reload metric, `ok` and `failed` (0 before the first).
async fn reloads(gw: &Gateway) -> (f64, f64) {
    let m = |r: &str| format!("gateway_tls_reloads_total{{result=\"{r}\"");
    (
        gw.metric_opt(&m("ok")).await.unwrap_or(0.0),
        gw.metric_opt(&m("failed")).await.unwrap_or(0.0),
    )
}

/// 1,000 wss sessions echoing continuously while the certificate is
/// replaced twice, once announced by SIGHUP and once only by the files
/// changing: no session drops or errs, every one keeps echoing through
/// both, and new handshakes present each new certificate.
#[tokio::test(flavor = "multi_thread")]
async fn rotation_under_1000_echoing_sessions_drops_nothing() {
    const SESSIONS: usize = 1000;
    let ca = TestCa::new();
    let certs = Certs::from_ca(&ca);
    let (_backend, backend) = reference_backend(&[]);
    let gw = Gateway::start(
        GatewayOpts::new(backend)
            .tls(&certs)
            .config(|c| c.tls.reload_interval = ms(500)),
    );
    gw.wait_ready(T).await;
    let verify = client_config(Some(&[&ca.pem]));
    assert_eq!(
        presented(gw.wss.unwrap(), &verify, Some("localhost"))
            .await
            .unwrap(),
        leaf_of(&certs.cert())
    );

    // The sessions: each echoes a numbered message, then waits 300 ms,
    // until told to stop; it fails on any error or missing echo.
    let stop = Arc::new(AtomicBool::new(false));
    let echoes = Arc::new(AtomicU64::new(0));
    let connecting = Arc::new(tokio::sync::Semaphore::new(64));
    let tls = Connect {
        tls: Some(client::tls_config(&certs.ca())),
        ..Connect::default()
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..SESSIONS {
        let (stop, echoes, connecting, tls) = (
            stop.clone(),
            echoes.clone(),
            connecting.clone(),
            tls.clone(),
        );
        let addr = gw.wss.unwrap();
        tasks.spawn(async move {
            let permit = connecting.acquire_owned().await.unwrap();
            let (ws, _) = client::connect(addr, "/ws", &tls)
                .await
                .map_err(|e| format!("session {i}: connect: {e}"))?;
            drop(permit);
            let mut c = Client::from_ws(ws);
            let mut n = 0u64;
            // Spread the sessions' echoes over the period.
            tokio::time::sleep(ms(i as u64 % 300)).await;
            while !stop.load(Ordering::Relaxed) {
                let text = format!("{i}:{n}");
                c.send_text(&text).await;
                match tokio::time::timeout(T, c.recv()).await {
                    Ok(Some(Msg::Text(t))) if t == text => {}
                    other => return Err(format!("session {i}, echo {n}: {other:?}")),
                }
                n += 1;
                echoes.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(ms(300)).await;
            }
            c.ws.write_frame(fastwebsockets::Frame::close(1000, b""))
                .await
                .map_err(|e| format!("session {i}: close: {e}"))?;
            Ok::<u64, String>(n)
        });
    }
    gw.wait_metric("gateway_sessions_open", |v| v == SESSIONS as f64, 2 * T)
        .await;

    // Every session echoes within `T` of now (each one's own counter would
    // say more, but the total rising by several per session shows it).
    let flowing = |after: u64| {
        let echoes = echoes.clone();
        async move {
            let start = Instant::now();
            while echoes.load(Ordering::Relaxed) < after + 3 * SESSIONS as u64 {
                assert!(start.elapsed() < 2 * T, "echoes stalled");
                tokio::time::sleep(ms(50)).await;
            }
        }
    };
    flowing(echoes.load(Ordering::Relaxed)).await;

    // 1. Announced: new files, then SIGHUP.
    let second = ca.issue(&["localhost", "127.0.0.1"]);
    install(&second, &certs.cert(), &certs.key());
    gw.proc.signal("HUP");
    wait_presented(&gw, &verify, &second.leaf_der).await;
    let at = Instant::now();
    while log_lines(&gw, "trigger=\"signal\"") == 0 {
        assert!(at.elapsed() < T, "no reload logged for SIGHUP");
        tokio::time::sleep(ms(20)).await;
    }
    flowing(echoes.load(Ordering::Relaxed)).await;

    // 2. Unannounced: only the files change.
    let third = ca.issue(&["localhost", "127.0.0.1"]);
    install(&third, &certs.cert(), &certs.key());
    wait_presented(&gw, &verify, &third.leaf_der).await;
    assert!(log_lines(&gw, "trigger=\"file_change\"") >= 1);
    flowing(echoes.load(Ordering::Relaxed)).await;

    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    let mut least = u64::MAX;
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(n) => least = least.min(n),
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "{} sessions failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    // Each session echoed all along (from the last one's connect to the
    // end took several seconds at one echo per 300 ms).
    assert!(least >= 5, "a session echoed only {least} times");
    let (ok, failed) = reloads(&gw).await;
    assert!(
        ok >= 2.0 && failed == 0.0,
        "reloads ok {ok}, failed {failed}"
    );
    gw.wait_metric("gateway_sessions_open", |v| v == 0.0, T)
        .await;
    // Every session ended by the client's close, none otherwise.
    let closed = gw.metric("gateway_sessions_closed_total").await;
    let normal = gw
        .metric("gateway_sessions_closed_total{reason=\"client_closed\"")
        .await;
    assert_eq!((closed, normal), (SESSIONS as f64, SESSIONS as f64));
}

/// A bad new pair (a key that is not the certificate's, a file that is
/// not PEM, a missing file) keeps the old certificate and its sessions,
/// logs one error line per attempt, and counts it; a good pair after it
/// is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_pair_keeps_the_old_certificate() {
    let ca = TestCa::new();
    let certs = Certs::from_ca(&ca);
    let (_backend, backend) = reference_backend(&[]);
    let gw = Gateway::start(
        GatewayOpts::new(backend)
            .tls(&certs)
            .config(|c| c.tls.reload_interval = ms(100)),
    );
    gw.wait_ready(T).await;
    let verify = client_config(Some(&[&ca.pem]));
    let original = leaf_of(&certs.cert());
    let mut session = Client::connect(
        gw.wss.unwrap(),
        "/ws",
        &Connect {
            tls: Some(client::tls_config(&certs.ca())),
            ..Connect::default()
        },
    )
    .await;
    session.echo("before").await;
    const FAILED: &str = "tls certificate reload failed";

    // The certificate of one new pair with the key of another.
    let (a, b) = (
        ca.issue(&["localhost", "127.0.0.1"]),
        ca.issue(&["localhost", "127.0.0.1"]),
    );
    replace_file(&certs.key(), &b.key_pem);
    replace_file(&certs.cert(), &a.cert_pem);
    let failed_metric = "gateway_tls_reloads_total{result=\"failed\"";
    gw.wait_metric(failed_metric, |v| v == 1.0, T).await;
    // Many polls later: still one attempt, one line (the same bad files are
    // not tried again until they change).
    tokio::time::sleep(ms(1000)).await;
    assert_eq!(reloads(&gw).await, (0.0, 1.0));
    assert_eq!(log_lines(&gw, FAILED), 1, "{}", gw.proc.stderr());
    let line = gw
        .proc
        .stderr()
        .lines()
        .find(|l| l.contains(FAILED))
        .unwrap()
        .to_owned();
    assert!(
        line.contains("ERROR")
            && line.contains("tls.cert/tls.key")
            && line.contains("trigger=\"file_change\""),
        "{line}"
    );
    assert_eq!(
        presented(gw.wss.unwrap(), &verify, Some("localhost"))
            .await
            .unwrap(),
        original
    );

    // SIGHUP tries again (and fails again).
    gw.proc.signal("HUP");
    gw.wait_metric(failed_metric, |v| v == 2.0, T).await;

    // A certificate file that is not PEM.
    replace_file(&certs.cert(), "not a certificate\n");
    gw.wait_metric(failed_metric, |v| v == 3.0, T).await;
    // A missing key file.
    std::fs::remove_file(certs.key()).unwrap();
    gw.wait_metric(failed_metric, |v| v == 4.0, T).await;
    assert_eq!(log_lines(&gw, FAILED), 4, "{}", gw.proc.stderr());
    assert_eq!(
        presented(gw.wss.unwrap(), &verify, Some("localhost"))
            .await
            .unwrap(),
        original
    );
    session.echo("still here").await;

    // A good pair: served, and the session is still there.
    install(&a, &certs.cert(), &certs.key());
    wait_presented(&gw, &verify, &a.leaf_der).await;
    assert_eq!(reloads(&gw).await, (1.0, 4.0));
    session.echo("after").await;
    assert_eq!(gw.metric("gateway_sessions_open").await, 1.0);
}

/// Several certificates: the client's SNI picks the first valid for it
/// (wildcards included); no SNI, or a name none is valid for, gets the
/// default (`tls.cert`). A reload replaces the additional ones too.
#[tokio::test(flavor = "multi_thread")]
async fn sni_chooses_the_certificate() {
    let ca = TestCa::new();
    let certs = Certs::from_ca(&ca);
    let dir = certs.dir.path();
    let (a, b) = (ca.issue(&["a.test"]), ca.issue(&["*.b.test"]));
    let pair = |name: &str, issued: &Issued| {
        let (cert, key) = (
            dir.join(format!("{name}-cert.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        install(issued, &cert, &key);
        CertKeyPair { cert, key }
    };
    let pairs = vec![pair("a", &a), pair("b", &b)];
    let (_backend, backend) = reference_backend(&[]);
    let gw = Gateway::start(GatewayOpts::new(backend).tls(&certs).config(|c| {
        c.tls.certificates = pairs;
        c.tls.reload_interval = Duration::ZERO;
    }));
    gw.wait_ready(T).await;
    let default = leaf_of(&certs.cert());
    let verify = client_config(Some(&[&ca.pem]));
    let any = client_config(None);
    let wss = gw.wss.unwrap();

    // Names a certificate is valid for: the client verifies it.
    assert_eq!(
        presented(wss, &verify, Some("a.test")).await.unwrap(),
        a.leaf_der
    );
    assert_eq!(
        presented(wss, &verify, Some("x.b.test")).await.unwrap(),
        b.leaf_der
    );
    assert_eq!(
        presented(wss, &verify, Some("localhost")).await.unwrap(),
        default
    );
    // No match and no SNI: the default, which the client then rejects
    // unless it accepts anything.
    assert_eq!(
        presented(wss, &any, Some("unknown.test")).await.unwrap(),
        default
    );
    assert_eq!(
        presented(wss, &any, Some("y.x.b.test")).await.unwrap(),
        default
    );
    assert_eq!(presented(wss, &any, None).await.unwrap(), default);
    assert!(presented(wss, &verify, Some("unknown.test")).await.is_err());

    // A whole WebSocket session under an SNI name.
    let mut c = Client::from_ws(wss_with_sni(wss, &verify, "a.test").await);
    c.echo("hello a").await;

    // Polling is off here: a changed file waits for SIGHUP.
    let b2 = ca.issue(&["*.b.test"]);
    install(&b2, &dir.join("b-cert.pem"), &dir.join("b-key.pem"));
    tokio::time::sleep(ms(300)).await;
    assert_eq!(
        presented(wss, &verify, Some("x.b.test")).await.unwrap(),
        b.leaf_der
    );
    gw.proc.signal("HUP");
    let start = Instant::now();
    while presented(wss, &verify, Some("x.b.test")).await.unwrap() != b2.leaf_der {
        assert!(start.elapsed() < T, "b was not reloaded");
        tokio::time::sleep(ms(50)).await;
    }
    assert_eq!(
        presented(wss, &verify, Some("a.test")).await.unwrap(),
        a.leaf_der
    );
    c.echo("still a").await;
}

/// A WebSocket over TLS to `addr` with `sni` as the server name.
async fn wss_with_sni(
    addr: std::net::SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    sni: &str,
) -> client::Ws {
    use http_body_util::Empty;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(
            rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let req = loadtest::run::conn::upgrade_request(
        &format!("http://{sni}:{}/ws", addr.port()),
        &format!("{sni}:{}", addr.port()),
    )
    .body(Empty::<bytes::Bytes>::new())
    .unwrap();
    fastwebsockets::handshake::client(&loadtest::run::conn::SpawnExecutor, req, tls)
        .await
        .unwrap()
        .0
}

/// `--check-config` loads every certificate: a bad additional pair is
/// reported by its key, and the exit status is 2.
#[test]
fn check_config_validates_every_certificate() {
    let ca = TestCa::new();
    let certs = Certs::from_ca(&ca);
    let dir = certs.dir.path();
    let other = ca.issue(&["a.test"]);
    std::fs::write(dir.join("a-cert.pem"), &other.cert_pem).unwrap();
    // The default pair's key: not the certificate's.
    let config = dir.join("gateway.toml");
    let write = |key: &Path| {
        std::fs::write(
            &config,
            format!(
                "[[tls.certificates]]\ncert = {:?}\nkey = {:?}\n",
                dir.join("a-cert.pem"),
                key
            ),
        )
        .unwrap();
    };
    let run = || {
        Command::new(bin("gateway"))
            .arg("--check-config")
            .args(["--listen-tls", "127.0.0.1:0", "--backend", "127.0.0.1:1"])
            .arg("--tls-cert")
            .arg(certs.cert())
            .arg("--tls-key")
            .arg(certs.key())
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    write(&certs.key());
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("tls.certificates[0].cert/tls.certificates[0].key"),
        "{err}"
    );
    std::fs::write(dir.join("a-key.pem"), &other.key_pem).unwrap();
    write(&dir.join("a-key.pem"));
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

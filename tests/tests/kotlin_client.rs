//! The Kotlin client library (`protocol/clients/kotlin`) against the real
//! gateway over real TLS, in front of the reference echo backend
//! (`loadtest backend`): 20 sessions exchange numbered text and binary
//! messages while their connections are cut at random with OkHttp's
//! `cancel()` (also while connecting), taken over (a resume while the old
//! connection is open), and resumed through a proxy that cuts the
//! connection right after the gateway answered 101, so the client never
//! sees it and must resume again with its old token. Every echo must come
//! back exactly once, in order, with its type and bytes: the client's
//! messages reached the backend exactly once (or the echoes would show it)
//! and the backend's reached the app exactly once.
//!
//! `protocol/clients/kotlin/build.sh` compiles the library, the torture run
//! and the README's Kotlin example with Debian's `kotlin` and OkHttp 3.13.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_tests::client::{tls_config, tls_connect};
use gateway_tests::{bin, bin_dir, repo_root, Certs, Gateway, GatewayOpts, Proc};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const CLIENTS: u64 = 20;
const MESSAGES: u64 = 1500;

/// Builds the Kotlin jars (only what changed) and returns the classpath.
fn build_kotlin() -> String {
    let out = bin_dir()
        .parent()
        .expect("target dir")
        .join("kotlin");
    let script = repo_root().join("protocol/clients/kotlin/build.sh");
    let o = Command::new("bash").arg(&script).arg(&out).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "{} failed (the README's Kotlin example is compiled there too):\n{stderr}",
        script.display()
    );
    eprint!("{stderr}");
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .last()
        .expect("build.sh prints the classpath")
        .to_owned()
}

fn reference_backend() -> (Proc, SocketAddr) {
    let mut cmd = Command::new(bin("loadtest"));
    cmd.args(["backend", "--listen", "127.0.0.1:0", "--mode", "echo"]);
    let (p, lines) = Proc::spawn(cmd, 1);
    let addr = lines[0]
        .strip_prefix("listening ")
        .unwrap()
        .parse()
        .unwrap();
    (p, addr)
}

/// A TLS-terminating proxy in front of the gateway. It passes new sessions
/// through, and cuts every resume right after the gateway's 101 arrived,
/// before any of it reaches the client: a resume handshake whose answer is
/// lost, after the gateway has handed the session to it.
struct CutProxy {
    addr: SocketAddr,
    cut_101s: Arc<AtomicU64>,
    passed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn server_tls(certs: &Certs) -> Arc<rustls::ServerConfig> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certs.cert())
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(certs.key()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Reads up to the end of an HTTP head (and whatever came with it).
async fn read_head(s: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > 16 * 1024 || s.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf)
}

fn resume_header(head: &[u8]) -> Option<String> {
    String::from_utf8_lossy(head).lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("x-wsgw-resume")
            .then(|| value.trim().to_owned())
    })
}

impl CutProxy {
    async fn start(certs: &Certs, gateway: SocketAddr, ca: &Path) -> Self {
        let acceptor = tokio_rustls::TlsAcceptor::from(server_tls(certs));
        let upstream = tls_config(ca);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut_101s = Arc::new(AtomicU64::new(0));
        let passed = Arc::new(AtomicU64::new(0));
        let (cut, pass) = (cut_101s.clone(), passed.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                let (cut, pass) = (cut.clone(), pass.clone());
                conns.spawn(async move {
                    let relay = async {
                        let mut down = acceptor.accept(tcp).await?;
                        let head = read_head(&mut down).await?;
                        let resuming = resume_header(&head).is_some_and(|v| v != "new");
                        let mut up = tls_connect(gateway, &upstream).await?;
                        up.write_all(&head).await?;
                        if resuming {
                            let answer = read_head(&mut up).await?;
                            if answer.starts_with(b"HTTP/1.1 101") {
                                // Both sides dropped: the client sees the
                                // connection end where its 101 should be.
                                cut.fetch_add(1, Ordering::Relaxed);
                                return Ok(());
                            }
                            down.write_all(&answer).await?;
                        } else {
                            pass.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::io::copy_bidirectional(&mut down, &mut up).await?;
                        std::io::Result::Ok(())
                    };
                    let _ = relay.await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            cut_101s,
            passed,
            task,
        }
    }
}

fn count(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in the torture run's totals: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kotlin_client_exactly_once_in_order_with_types_through_cuts_takeovers_and_lost_101s() {
    let classpath = build_kotlin();
    let certs = Certs::new();
    let (_backend, backend) = reference_backend();
    // The gateway's defaults for everything about resuming.
    let gw = Gateway::start(GatewayOpts::new(backend).tls(&certs));
    gw.wait_ready(Duration::from_secs(10)).await;
    let proxy = CutProxy::start(&certs, gw.wss.unwrap(), &certs.ca()).await;

    let started = Instant::now();
    let run = tokio::process::Command::new("java")
        .arg("-cp")
        .arg(&classpath)
        .arg("wsgw.client.TortureKt")
        .arg("--url")
        .arg(gw.wss_url("/ws"))
        .arg("--ca")
        .arg(certs.ca())
        .arg("--proxy-port")
        .arg(proxy.addr.port().to_string())
        .args(["--clients", &CLIENTS.to_string()])
        .args(["--messages", &MESSAGES.to_string()])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(170), run)
        .await
        .expect("the torture run did not finish within 170 s")
        .unwrap();
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let totals: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!("no totals from the torture run; stdout:\n{stdout}\nstderr:\n{stderr}")
        });

    let resumed = gw
        .metric_opt("gateway_resumes_total{result=\"succeeded\"")
        .await
        .unwrap_or(0.0);
    let refused = gw
        .metric_opt("gateway_resumes_refused_total")
        .await
        .unwrap_or(0.0);
    let cut_101s = proxy.cut_101s.load(Ordering::Relaxed);
    println!(
        "kotlin torture: {CLIENTS} clients, {} messages each way, {} cuts of open connections, \
         {} cuts while connecting, {} takeovers, {cut_101s} resume handshakes cut after the 101 \
         ({} passed through the proxy), {} connections, {} resumes seen by the client, \
         {resumed} by the gateway, {refused} refused; lost {}, duplicated {}, reordered {}, \
         type changes {}, corrupted {}, sessions lost {}; {:.1} s",
        count(&totals, "messages_sent"),
        count(&totals, "cuts_open"),
        count(&totals, "cuts_connecting"),
        count(&totals, "takeovers"),
        proxy.passed.load(Ordering::Relaxed),
        count(&totals, "connections"),
        count(&totals, "resumes"),
        count(&totals, "lost"),
        count(&totals, "duplicated"),
        count(&totals, "reordered"),
        count(&totals, "type_changes"),
        count(&totals, "corrupted"),
        count(&totals, "sessions_lost"),
        elapsed.as_secs_f64(),
    );
    println!("totals: {totals}");

    for key in [
        "lost",
        "duplicated",
        "reordered",
        "type_changes",
        "corrupted",
        "sessions_lost",
        "failures",
        "unfinished",
    ] {
        assert_eq!(count(&totals, key), 0, "{key}; the run's stderr:\n{stderr}");
    }
    assert!(out.status.success(), "torture run failed:\n{stderr}");
    assert_eq!(count(&totals, "messages_sent"), CLIENTS * MESSAGES);
    assert_eq!(count(&totals, "echoes"), CLIENTS * MESSAGES);
    assert_eq!(refused, 0.0, "the gateway refused resumes:\n{stderr}");
    // The run must actually have done what it claims to test.
    let cuts = count(&totals, "cuts_open") + count(&totals, "cuts_connecting");
    assert!(cuts >= 300, "only {cuts} cuts");
    assert!(count(&totals, "takeovers") >= 50, "too few takeovers");
    assert!(cut_101s >= 20, "only {cut_101s} resume handshakes cut");
    assert!(
        resumed >= count(&totals, "resumes") as f64,
        "the gateway counted fewer resumes ({resumed}) than the client saw"
    );
}

//! The Kotlin client library (`protocol/clients/kotlin`) against the real
//! gateway over real TLS, in front of the reference echo backend
//! (`loadtest backend`): 20 sessions exchange numbered text and binary
//! messages while their connections are cut at random with OkHttp's
//! `cancel()` (also while connecting), taken over (a resume while the old
//! connection is open), moved to a fresh connection to trim their outbox
//! (every 16 KiB sent), and resumed through a proxy that cuts the
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
use gateway_tests::TestBackend;
use gateway_tests::{bin_dir, kib, repo_root, secs, Certs, Gateway, GatewayOpts, Proc};
use protocol::Framing;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const CLIENTS: u64 = 20;
const MESSAGES: u64 = 1500;

/// The two tests take turns: both start JVMs on a 2-core machine, and the
/// scenario test's timing (it acts while its client waits to resume) should
/// not depend on the torture run's load. Holding it also keeps the two from
/// running build.sh, which writes the same jars, at once.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Builds the Kotlin jars (only what changed) and returns the classpath.
fn build_kotlin() -> String {
    let out = bin_dir().parent().expect("target dir").join("kotlin");
    let script = repo_root().join("protocol/clients/kotlin/build.sh");
    let o = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .output()
        .unwrap();
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

/// `java -cp CLASSPATH MAIN`, killed when the test drops it.
fn java(classpath: &str, main: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("java");
    cmd.arg("-cp").arg(classpath).arg(main).kill_on_drop(true);
    cmd
}

/// The output of a Java run (`what`), which must end within `limit`.
async fn finish_within(
    run: impl std::future::Future<Output = std::io::Result<std::process::Output>>,
    limit: Duration,
    what: &str,
) -> std::process::Output {
    tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
        .unwrap()
}

fn reference_backend() -> (Proc, SocketAddr) {
    gateway_tests::reference_backend(&["--mode", "echo"])
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
    let _turn = ONE_AT_A_TIME.lock().await;
    let classpath = build_kotlin();
    let certs = Certs::new();
    let (_backend, backend) = reference_backend();
    // The gateway's defaults for everything about resuming.
    let gw = Gateway::start(GatewayOpts::new(backend).tls(&certs));
    gw.wait_ready(Duration::from_secs(10)).await;
    let proxy = CutProxy::start(&certs, gw.wss.unwrap(), &certs.ca()).await;

    let started = Instant::now();
    let run = java(&classpath, "wsgw.client.TortureKt")
        .arg("--url")
        .arg(gw.wss_url("/ws"))
        .arg("--ca")
        .arg(certs.ca())
        .arg("--proxy-port")
        .arg(proxy.addr.port().to_string())
        .args(["--clients", &CLIENTS.to_string()])
        .args(["--messages", &MESSAGES.to_string()])
        .output();
    let out = finish_within(run, Duration::from_secs(170), "the torture run").await;
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
    let replayed = gw
        .metric_opt("gateway_resume_replayed_total")
        .await
        .unwrap_or(0.0);
    let cut_101s = proxy.cut_101s.load(Ordering::Relaxed);
    println!(
        "kotlin torture: {CLIENTS} clients, {} messages each way, {} cuts of open connections, \
         {} cuts while connecting, {} takeovers, {} outbox trims, {cut_101s} resume handshakes \
         cut after the 101 ({} passed through the proxy), {} connections, {} resumes seen by \
         the client, {resumed} by the gateway, {refused} refused, {replayed} messages replayed; \
         lost {}, duplicated {}, reordered {}, type changes {}, corrupted {}, sessions lost {}; \
         {:.1} s",
        count(&totals, "messages_sent"),
        count(&totals, "cuts_open"),
        count(&totals, "cuts_connecting"),
        count(&totals, "takeovers"),
        count(&totals, "trims"),
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
        "bad_closes",
    ] {
        assert_eq!(count(&totals, key), 0, "{key}; the run's stderr:\n{stderr}");
    }
    assert!(out.status.success(), "torture run failed:\n{stderr}");
    assert_eq!(count(&totals, "messages_sent"), CLIENTS * MESSAGES);
    assert_eq!(count(&totals, "echoes"), CLIENTS * MESSAGES);
    assert_eq!(refused, 0.0, "the gateway refused resumes:\n{stderr}");
    // The run must actually have done what it claims to test. The cut and
    // takeover counts are attempts (a cut may hit a connection that was
    // already going); the resumes are their effects.
    let cuts = count(&totals, "cuts_open") + count(&totals, "cuts_connecting");
    assert!(cuts >= 300, "only {cuts} cuts");
    assert!(count(&totals, "takeovers") >= 50, "too few takeovers");
    assert!(cut_101s >= 20, "only {cut_101s} resume handshakes cut");
    let trims = count(&totals, "trims");
    assert!(trims > 0, "no outbox trim: outboxTrimBytes never reached");
    // Resumes the client saw that no takeover or trim started: lost
    // connections that the session survived. At least half the cuts of
    // open connections must have been such losses.
    let client_resumes = count(&totals, "resumes");
    let after_losses = client_resumes.saturating_sub(count(&totals, "takeovers") + trims);
    assert!(
        after_losses >= count(&totals, "cuts_open") / 2,
        "only {after_losses} resumes after lost connections for {} cuts of open ones",
        count(&totals, "cuts_open")
    );
    // Every resume the client saw, and every one whose 101 the proxy cut,
    // completed at the gateway.
    assert!(
        resumed >= (client_resumes + cut_101s) as f64,
        "the gateway counted {resumed} resumes; the client saw {client_resumes} and the proxy \
         cut {cut_101s}"
    );
    // Cuts lost messages in flight to the client, which resumes got back.
    assert!(
        replayed > 0.0,
        "no message was ever replayed after a resume"
    );
}

/// One Kotlin client session (`wsgw.client.scenario.ScenarioKt`) driven
/// line by line: its callbacks come out as lines, commands go in.
struct Scenario {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    seen: Vec<String>,
}

impl Scenario {
    fn start(classpath: &str, url: &str, ca: &Path, backoff_ms: u64) -> Self {
        let mut child = java(classpath, "wsgw.client.scenario.ScenarioKt")
            .args(["--url", url])
            .arg("--ca")
            .arg(ca)
            .args(["--backoff-ms", &backoff_ms.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next callback line that is not `disconnected` (informational).
    async fn next(&mut self) -> String {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no callback within 20 s; so far: {:?}", self.seen))
                .unwrap()
                .unwrap_or_else(|| panic!("the client exited; so far: {:?}", self.seen));
            self.seen.push(line.clone());
            if !line.starts_with("disconnected") {
                return line;
            }
        }
    }

    async fn expect(&mut self, prefix: &str) -> String {
        let line = self.next().await;
        assert!(
            line.starts_with(prefix),
            "expected {prefix:?}, got {line:?}; so far: {:?}",
            self.seen
        );
        line
    }

    async fn expect_line(&mut self, want: &str) {
        let line = self.next().await;
        assert_eq!(line, want, "so far: {:?}", self.seen);
    }

    async fn command(&mut self, cmd: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }
}

async fn next_open(backend: &mut TestBackend) -> u64 {
    tokio::time::timeout(Duration::from_secs(20), backend.next_open())
        .await
        .expect("no new session at the backend")
        .0
}

/// What the library does with each way a session can end: a 410 to its
/// resume (the session overflowed while it was away) and the close codes
/// that mean "reconnect" start a new session and tell the app, with the
/// messages that were not confirmed; a code that means "don't" ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kotlin_client_starts_over_after_410_and_follows_the_close_code_table() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let classpath = build_kotlin();
    let certs = Certs::new();
    let mut backend = TestBackend::start(Framing::Varint, false).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .tls(&certs)
            .config(|c| c.session.max_message_size = kib(1))
            .config(|c| c.session.client_queue_bytes = kib(16))
            .config(|c| c.resume.grace = secs(30)),
    );
    gw.wait_ready(Duration::from_secs(10)).await;
    // A long first backoff (1.5-3 s): the test acts while the client is away.
    let mut c = Scenario::start(&classpath, &gw.wss_url("/ws"), &certs.ca(), 3000);

    c.expect("open resumed=false").await;
    let s1 = next_open(&mut backend).await;
    backend.push(s1, b"hello", true);
    c.expect_line("text hello").await;
    backend.push(s1, b"abc", false);
    c.expect_line("binary 3").await;
    c.command("send a").await;
    assert_eq!(&backend.next_data(s1).await[..], b"a");

    // Cut; while the client waits to resume, more arrives than the
    // session's client queue holds, so the gateway ends it: the resume gets
    // 410, and the library starts over.
    c.command("cut").await;
    backend.wait_detached(s1).await;
    c.command("send queued").await;
    for i in 0..200u8 {
        backend.push(s1, &[i; 100], false);
    }
    backend.wait_close(s1).await;
    // "a" was never confirmed (no resume since), "queued" never sent.
    c.expect_line("lost 2 HTTP 410 to the resume").await;
    c.expect("open resumed=false").await;
    let s2 = next_open(&mut backend).await;
    c.command("send b").await;
    assert_eq!(&backend.next_data(s2).await[..], b"b");

    // 1013 (try again later): the session is over, a new one starts after
    // a backoff. OkHttp 3.x refuses close codes 1012-1014 as reserved (its
    // table predates their registration; OkHttp 4 reads them) and fails the
    // connection instead: the library resumes, the gateway, which has ended
    // the session, answers 410, and the app hears of it that way.
    backend.close(s2, 1013, "later");
    let cut = c.seen.len();
    c.expect_line("lost 1 HTTP 410 to the resume").await;
    assert!(
        c.seen[cut..]
            .iter()
            .any(|l| l.contains("Code 1013 is reserved")),
        "OkHttp 3 reads 1013 now? Then expect 'closed by the gateway: 1013' here: {:?}",
        c.seen
    );
    c.expect("open resumed=false").await;
    let s3 = next_open(&mut backend).await;
    // 1001 (drain): a new session at once.
    backend.close(s3, 1001, "going away");
    c.expect_line("lost 0 closed by the gateway: 1001 going away")
        .await;
    c.expect("open resumed=false").await;
    let s4 = next_open(&mut backend).await;
    // 4000 is the gateway's own "resume now": a backend's becomes 1011,
    // and the library starts a new session after a backoff, never resumes.
    backend.close(s4, 4000, "done");
    c.expect_line("lost 0 closed by the gateway: 1011 backend sent invalid close code 4000")
        .await;
    c.expect("open resumed=false").await;
    let s5 = next_open(&mut backend).await;

    // An application code: the session ends and nothing reconnects.
    backend.close(s5, 4001, "done");
    c.expect_line("closed 4001 done").await;
    // Nothing after the end.
    c.expect_line("end").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), backend.next_open())
            .await
            .is_err(),
        "the library reconnected after 4001"
    );

    // A clean close by the app: the close handshake completes. A reason
    // over 123 bytes is refused first and leaves the session able to close
    // (OkHttp's close() would throw after the library had marked it closing).
    let mut c = Scenario::start(&classpath, &gw.wss_url("/ws"), &certs.ca(), 3000);
    c.expect("open resumed=false").await;
    let s6 = next_open(&mut backend).await;
    c.command("close-long-reason").await;
    c.expect_line("close refused").await;
    c.command("close 1000").await;
    assert_eq!(backend.wait_close(s6).await.0, 1000);
    c.expect("closed 1000").await;
    c.expect_line("end").await;
}

/// Close code 4000 ("resume now") comes only from a fleet instance being
/// drained, which needs Redis: `ResumeNow.kt` plays the gateway on fake
/// connections instead and checks that the library resumes at once, with
/// the same token, count and outbox, and does not tell the app the session
/// was lost or closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kotlin_client_resumes_at_once_after_4000() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let classpath = build_kotlin();
    let run = java(&classpath, "wsgw.client.resumenow.ResumeNowKt").output();
    let out = finish_within(run, Duration::from_secs(60), "ResumeNow.kt").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("resume-now OK"),
        "ResumeNow.kt failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! Harness for the end-to-end tests: the real `gateway` and `loadtest`
//! binaries as child processes, an in-process [`TestBackend`] that records
//! what the gateway sends and can push or close sessions, a WebSocket
//! [`client`] over real TLS, and per-run certificates.
//!
//! Tests learn ports from the processes themselves (they bind port 0 and
//! print `listening ...`), never from fixed ports or sleeps.
// No unsafe code here: only the gateway binary has one documented exception
// (jemalloc's options in gateway/src/main.rs), so the workspace lint is deny.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod backend;
pub mod certs;
pub mod client;
pub mod faults;
pub mod fleet;
pub mod raw;
pub mod telemetry;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub use backend::{Event, TestBackend};

/// Directory holding the workspace's release binaries (built by
/// `tests/run.sh` before `cargo test`).
pub fn bin_dir() -> PathBuf {
    // target/release/deps/<test-binary> -> target/release
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Path of a workspace binary; panics with the fix if it was not built, or
/// if it is older than the sources it is built from (so `cargo test
/// --release` alone cannot test a stale binary).
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with tests/run.sh, which builds the binaries first \
         (cargo build --release --workspace --bins)",
        p.display()
    );
    let sources: &[&str] = match name {
        "gateway" => &[
            "gateway/src",
            "gateway/Cargo.toml",
            "protocol/src",
            "protocol/proto",
        ],
        "loadtest" => &[
            "loadtest/src",
            "loadtest/Cargo.toml",
            "protocol/src",
            "protocol/proto",
        ],
        _ => &[],
    };
    let built = mtime(&p);
    if let Some((newest, path)) = sources
        .iter()
        .filter_map(|s| newest_file(&repo_root().join(s)))
        .max()
    {
        assert!(
            built >= newest,
            "{} is older than {}: it is stale. Run the tests with tests/run.sh, which \
             builds the binaries first (cargo build --release --workspace --bins)",
            p.display(),
            path.display()
        );
    }
    p
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The newest modification time of a file at or under `p`, with its path.
fn newest_file(p: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let meta = std::fs::metadata(p).ok()?;
    if meta.is_file() {
        return Some((mtime(p), p.to_path_buf()));
    }
    std::fs::read_dir(p)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest_file(&e.path()))
        .max()
}

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The gateway's bound on flushing the links after the drain
/// (`LINK_FLUSH_DEADLINE`, private to the gateway), read from its source
/// so that the deployment files' checks follow a change of it.
pub fn link_flush_deadline() -> Duration {
    source_secs("gateway/src/shutdown.rs", "LINK_FLUSH_DEADLINE")
}

/// The gateway's bound on exporting its last metrics and spans after that
/// (`TELEMETRY_FLUSH` in gateway/src/lib.rs), read from its source.
pub fn telemetry_flush() -> Duration {
    source_secs("gateway/src/lib.rs", "TELEMETRY_FLUSH")
}

/// A `const NAME: Duration = Duration::from_secs(N)` in a source file.
fn source_secs(file: &str, name: &str) -> Duration {
    let src = std::fs::read_to_string(repo_root().join(file)).unwrap();
    let line = src
        .lines()
        .find(|l| l.contains(&format!("const {name}")))
        .unwrap_or_else(|| panic!("{name} in {file}"));
    let secs = line
        .split("from_secs(")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not Duration::from_secs(N): {line}"));
    Duration::from_secs(secs)
}

/// The Python interpreter of the test virtualenv made by `tests/run.sh`.
pub fn python() -> PathBuf {
    let p = repo_root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run the tests with tests/run.sh, which creates it from tests/requirements.txt",
        p.display()
    );
    p
}

/// The independent Python backend's `cmd:stats` (tests/interop/backend.py),
/// asked through a fresh session on `gw`.
/// The reference backend (`loadtest backend`) with `args`, on a free port.
pub fn reference_backend(args: &[&str]) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(bin("loadtest"));
    cmd.args(["backend", "--listen", "127.0.0.1:0"]).args(args);
    Proc::spawn_server(cmd)
}

/// The independent Python backend (tests/interop/backend.py, written from
/// protocol/README.md only) on a free port, with `args`.
pub fn python_backend(args: &[&str]) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("tests/interop/backend.py"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args);
    Proc::spawn_server(cmd)
}

pub async fn python_backend_stats(gw: &Gateway) -> serde_json::Value {
    use client::{Client, Connect, Msg};
    let mut c = Client::connect(gw.ws.unwrap(), "/ws", &Connect::default()).await;
    c.send_text("cmd:stats").await;
    let Some(Msg::Text(s)) = c.recv_within(Duration::from_secs(10)).await else {
        panic!("no stats from the Python backend")
    };
    serde_json::from_str(&s).unwrap()
}

/// Runs the Python `websockets` client (tests/interop/ws_client.py) against
/// `url`, trusting `ca`; asserts it succeeded and returns its JSON report.
pub async fn python_ws_client(url: &str, ca: &Path) -> serde_json::Value {
    let out = tokio::process::Command::new(python())
        .arg(repo_root().join("tests/interop/ws_client.py"))
        .arg(url)
        .arg("--ca")
        .arg(ca)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ws_client.py failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

/// A fresh CA and `localhost` certificate in a temporary directory.
pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        loadtest::devcert::generate(&["localhost", "127.0.0.1"])
            .unwrap()
            .write_to(dir.path())
            .unwrap();
        Self { dir }
    }
    /// A `localhost` certificate issued by `ca` (which can issue the
    /// certificates that replace it); `ca.pem` is `ca`'s certificate.
    pub fn from_ca(ca: &certs::TestCa) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let issued = ca.issue(&["localhost", "127.0.0.1"]);
        std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
        std::fs::write(dir.path().join("cert.pem"), &issued.cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), &issued.key_pem).unwrap();
        Self { dir }
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }
}

impl Default for Certs {
    fn default() -> Self {
        Self::new()
    }
}

/// A child process killed when dropped, with the addresses it printed.
///
/// Dropping it fails the test (unless the test is already failing) if the
/// process logged a panic: a panic in the gateway or loadtest must never go
/// unnoticed just because the process was killed at the end of the test.
pub struct Proc {
    pub child: Child,
    pub stderr_path: PathBuf,
    _stderr_dir: tempfile::TempDir,
}

/// What a Rust process writes to stderr when a thread panics.
const PANIC_MARK: &str = "panicked at";

/// Panics if `stderr` (of the process `what`) shows a panic.
pub fn assert_no_panic(what: &str, stderr: &str) {
    assert!(
        !stderr.contains(PANIC_MARK),
        "{what} panicked; its stderr:\n{stderr}"
    );
}

impl Proc {
    /// Spawns a server that prints `listening ADDR` first (a backend);
    /// returns it and that address.
    pub fn spawn_server(cmd: Command) -> (Self, SocketAddr) {
        let (p, lines) = Self::spawn(cmd, 1);
        let addr = lines[0]
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("not `listening ADDR`: {:?}", lines[0]));
        (p, addr)
    }

    /// Spawns `cmd`, then reads stdout lines until `expect` lines starting
    /// with "listening" arrived; returns them.
    pub fn spawn(mut cmd: Command, expect: usize) -> (Self, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        while lines.len() < expect {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(l) if l.starts_with("listening") => lines.push(l),
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    panic!("process did not report {expect} listeners; stderr:\n{err}");
                }
            }
        }
        (
            Self {
                child,
                stderr_path,
                _stderr_dir: dir,
            },
            lines,
        )
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`TERM`, `INT`, ...).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Waits for exit up to `limit`; returns the exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends SIGTERM and asserts the process exits with status 0 within
    /// `limit` (for processes whose exit status reports what they saw,
    /// like the Python backend's count of protocol violations).
    pub fn stop_cleanly(&mut self, limit: Duration) {
        self.sigterm();
        let code = self.wait_exit(limit);
        assert_eq!(
            code,
            Some(0),
            "process did not exit cleanly after SIGTERM; stderr:\n{}",
            self.stderr()
        );
    }

    /// A line of /proc/PID/status in KiB; panics if it cannot be read, so
    /// that a memory assertion can never pass on a missing number.
    fn proc_status_kib(&self, key: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {path} for {key}: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {path}:\n{status}"))
    }

    /// Resident set size now, in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS:")
    }

    /// Peak resident set size so far, in KiB (VmHWM): what a bound on
    /// memory use is about, since a spike that was freed again still had to
    /// fit.
    pub fn peak_rss_kib(&self) -> u64 {
        self.proc_status_kib("VmHWM:")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            assert_no_panic("a child process of this test", &self.stderr());
        }
    }
}

/// Milliseconds, for typed settings.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Seconds, for typed settings.
pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// KiB, for typed settings.
pub fn kib(n: u64) -> gateway::config::ByteSize {
    gateway::config::ByteSize(n << 10)
}

/// MiB, for typed settings.
pub fn mib(n: u64) -> gateway::config::ByteSize {
    gateway::config::ByteSize(n << 20)
}

/// A running gateway process.
pub struct Gateway {
    pub proc: Proc,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// How to start a gateway for a test.
pub struct GatewayOpts<'a> {
    pub backends: Vec<SocketAddr>,
    pub links: usize,
    pub ws: bool,
    pub certs: Option<&'a Certs>,
    pub admin: bool,
    pub framing: &'a str,
    /// The gateway's log filter (`RUST_LOG`); `info` unless set here or
    /// by `WSGW_TEST_LOG`.
    pub log: Option<&'a str>,
    /// Ports of the ws and admin listeners (0: any free one). Fixed ports
    /// let a restarted instance come back where a load balancer expects it.
    pub ws_port: u16,
    pub admin_port: u16,
    /// Every other setting, typed; written to a configuration file that
    /// the flags above override.
    pub config: gateway::Config,
}

impl<'a> GatewayOpts<'a> {
    pub fn new(backend: SocketAddr) -> Self {
        Self {
            backends: vec![backend],
            links: 2,
            ws: true,
            certs: None,
            admin: true,
            framing: "varint",
            log: None,
            ws_port: 0,
            admin_port: 0,
            config: gateway::Config::default(),
        }
    }
    pub fn tls(mut self, certs: &'a Certs) -> Self {
        self.certs = Some(certs);
        self
    }
    /// Changes the configuration: `.config(|c| c.resume.grace = secs(30))`.
    pub fn config(mut self, f: impl FnOnce(&mut gateway::Config)) -> Self {
        f(&mut self.config);
        self
    }
    /// Links per backend endpoint (`--links`).
    pub fn log(mut self, filter: &'a str) -> Self {
        self.log = Some(filter);
        self
    }

    pub fn links(mut self, n: usize) -> Self {
        self.links = n;
        self
    }
    /// The backend's framing (`--framing`): `varint` or `u32be`.
    pub fn framing(mut self, framing: &'a str) -> Self {
        self.framing = framing;
        self
    }
}

impl Gateway {
    /// A resumable session that echoes one message, loses its connection
    /// (no close), is seen detached, and resumes having received that one
    /// message: the resumed client and the resume's 101.
    pub async fn echo_drop_and_resume(
        &self,
    ) -> (client::Client, hyper::Response<hyper::body::Incoming>) {
        use client::{Client, Connect};
        let limit = Duration::from_secs(10);
        let (ws, resp) = client::connect(self.ws.unwrap(), "/ws", &Connect::resume("new"))
            .await
            .unwrap();
        let token = resp.headers()["x-wsgw-resume"].to_str().unwrap().to_owned();
        let mut c = Client::from_ws(ws);
        c.echo("before").await;
        drop(c);
        self.wait_metric("gateway_sessions_detached", |v| v == 1.0, limit)
            .await;
        let mut opts = Connect::resume(token);
        opts.headers.push(("X-Wsgw-Received", "1".into()));
        let (ws, resp) = client::connect(self.ws.unwrap(), "/ws", &opts)
            .await
            .unwrap();
        (Client::from_ws(ws), resp)
    }

    pub fn start(o: GatewayOpts<'_>) -> Self {
        let mut cmd = Command::new(bin("gateway"));
        let mut expect = 0;
        if o.ws {
            cmd.arg("--listen").arg(format!("127.0.0.1:{}", o.ws_port));
            expect += 1;
        }
        if let Some(c) = o.certs {
            cmd.args(["--listen-tls", "127.0.0.1:0"]);
            cmd.arg("--tls-cert").arg(c.cert());
            cmd.arg("--tls-key").arg(c.key());
            expect += 1;
        }
        if o.admin {
            cmd.arg("--admin")
                .arg(format!("127.0.0.1:{}", o.admin_port));
            expect += 1;
        }
        for b in &o.backends {
            cmd.arg("--backend").arg(b.to_string());
        }
        cmd.arg("--links").arg(o.links.to_string());
        cmd.arg("--framing").arg(o.framing);
        // The typed configuration, as the file a user would write. It is
        // read at start-up, before the process says it is listening.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, toml::to_string(&o.config).unwrap()).unwrap();
        cmd.arg("--config").arg(&file);
        // WSGW_TEST_LOG overrides the gateways' log filter when debugging.
        let filter = match o.log {
            Some(f) => f.to_owned(),
            None => std::env::var("WSGW_TEST_LOG").unwrap_or_else(|_| "info".into()),
        };
        cmd.env("RUST_LOG", filter);
        let (proc, lines) = Proc::spawn(cmd, expect);
        drop(dir);
        let find = |kind: &str| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(&format!("listening {kind} ")))
                .map(|a| a.parse().unwrap())
        };
        Self {
            ws: find("ws"),
            wss: find("wss"),
            admin: find("admin"),
            proc,
        }
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.ws.expect("ws listener"))
    }

    pub fn wss_url(&self, path: &str) -> String {
        format!(
            "wss://localhost:{}{path}",
            self.wss.expect("wss listener").port()
        )
    }

    /// GET on the admin listener: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        client::http_get(self.admin.expect("admin listener"), path).await
    }

    /// Waits until /readyz says ready (links up), up to `limit`.
    pub async fn wait_ready(&self, limit: Duration) {
        let start = std::time::Instant::now();
        loop {
            let (status, body) = self.admin_get("/readyz").await;
            if status == 200 {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "gateway not ready after {limit:?}: {body}\nstderr:\n{}",
                self.proc.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the `gateway_links_up` metric reaches `n`, up to `limit`.
    pub async fn wait_links_up(&self, n: usize, limit: Duration) {
        self.wait_metric("gateway_links_up", |v| v >= n as f64, limit)
            .await;
    }

    /// Sum of the Prometheus samples whose line starts with `prefix`, or
    /// None if there is no such sample.
    pub async fn metric_opt(&self, prefix: &str) -> Option<f64> {
        let (status, body) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "/metrics: {body}");
        let values: Vec<f64> = body
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| {
                l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("unparsable metric line {l:?}"))
            })
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// Value of the Prometheus sample(s) whose line starts with `prefix`;
    /// panics if the gateway exports no such sample (a misspelt or removed
    /// metric must not read as 0).
    pub async fn metric(&self, prefix: &str) -> f64 {
        match self.metric_opt(prefix).await {
            Some(v) => v,
            None => {
                let (_, body) = self.admin_get("/metrics").await;
                panic!("no metric sample starts with {prefix:?}; /metrics:\n{body}")
            }
        }
    }

    /// Polls the metric `prefix` until `ok(value)`, up to `limit`; returns
    /// the value. A sample that does not exist yet (a labelled counter
    /// before its first increment) counts as not yet there.
    pub async fn wait_metric(
        &self,
        prefix: &str,
        ok: impl Fn(f64) -> bool,
        limit: Duration,
    ) -> f64 {
        let start = std::time::Instant::now();
        loop {
            let v = self.metric_opt(prefix).await;
            if let Some(v) = v.filter(|v| ok(*v)) {
                return v;
            }
            assert!(
                start.elapsed() < limit,
                "metric {prefix} is {v:?} after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

//! What the telemetry tests export to and read back from: the OTLP receiver
//! (tests/interop/otlp_receiver.py, on the official OTLP protobuf
//! definitions) and a real Prometheus server, each a child process on
//! ports of its own choosing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{client, python, repo_root, Proc};

/// The OTLP receiver, recording every export request as a JSON line.
pub struct OtlpReceiver {
    pub proc: Proc,
    /// Base URL of its OTLP/gRPC listener.
    pub grpc_url: String,
    /// Base URL of its OTLP/HTTP listener (the exporter appends `/v1/...`).
    pub http_url: String,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl OtlpReceiver {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("otlp.jsonl");
        let mut cmd = Command::new(python());
        cmd.arg(repo_root().join("tests/interop/otlp_receiver.py"))
            .arg("--out")
            .arg(&out);
        let (proc, lines) = Proc::spawn(cmd, 2);
        let url = |kind: &str| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(&format!("listening {kind} ")))
                .map(|a| format!("http://{a}"))
                .unwrap_or_else(|| panic!("no `listening {kind}` line in {lines:?}"))
        };
        Self {
            grpc_url: url("grpc"),
            http_url: url("http"),
            proc,
            out,
            _dir: dir,
        }
    }

    /// Every export request recorded so far, in arrival order.
    pub fn records(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        // Lines are written whole and flushed, but a read can still catch
        // the last one half written: only complete lines count.
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// The export requests of one signal (`metrics` or `traces`).
    pub fn signal(&self, signal: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["signal"] == signal)
            .collect()
    }

    /// Polls the records until `f` finds what it looks for, up to `limit`;
    /// on timeout panics naming `what`, with `f`'s last report on the
    /// records (`Err`) so a failure says what did arrive.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&[Value]) -> Result<T, String>,
    ) -> T {
        let start = Instant::now();
        loop {
            match f(&self.records()) {
                Ok(t) => return t,
                Err(last) => assert!(
                    start.elapsed() < limit,
                    "the OTLP receiver got no {what} within {limit:?}; {last}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An attribute value from an OTLP `KeyValue` list (as `MessageToDict`
/// writes it), as a string whatever its type (ints are strings there).
pub fn attr(attributes: &Value, key: &str) -> Option<String> {
    let kv = attributes.as_array()?.iter().find(|kv| kv["key"] == key)?;
    let v = kv["value"].as_object()?.values().next()?;
    Some(match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// A `bytes` field as `MessageToDict` writes it (base64) in lower-case hex,
/// as trace and span ids are written in a `traceparent`.
pub fn id_hex(v: &Value) -> String {
    let s = v.as_str().unwrap_or_default();
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = String::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        let d = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => panic!("not base64: {s:?}"),
        };
        bits = (bits << 6) | u32::from(d);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push_str(&format!("{:02x}", (bits >> n) & 0xff));
        }
    }
    out
}

/// Whether Prometheus at `addr` answers `/-/ready` with 200.
fn ready(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /-/ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

/// A real Prometheus server (the `prometheus` binary) scraping `targets`'
/// `/metrics` every second under the job `job`.
pub struct Prometheus {
    pub proc: Proc,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(job: &str, targets: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: '{job}'\n    static_configs:\n      \
                 - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let stderr_dir = tempfile::tempdir().unwrap();
        let stderr_path = stderr_dir.path().join("stderr.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn prometheus (Debian package `prometheus`)");
        let mut proc = Proc {
            child,
            stderr_path,
            _stderr_dir: stderr_dir,
        };
        // Prometheus logs the address it bound: `msg="Listening on"
        // address=127.0.0.1:NNNNN`.
        let start = Instant::now();
        let addr = loop {
            let log = proc.stderr();
            let found = log
                .lines()
                .filter(|l| l.contains("msg=\"Listening on\""))
                .find_map(|l| l.split("address=").nth(1))
                .and_then(|a| a.split_whitespace().next())
                .and_then(|a| a.parse().ok());
            if let Some(addr) = found {
                break addr;
            }
            if let Some(status) = proc.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}) before listening:\n{log}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "prometheus did not say where it listens within 20 s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // It listens before its storage is open, and answers queries 503
        // until then: wait for `/-/ready`.
        loop {
            if ready(addr) {
                break;
            }
            if let Some(status) = proc.child.try_wait().unwrap() {
                panic!(
                    "prometheus exited ({status}) before it was ready:\n{}",
                    proc.stderr()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "prometheus was not ready within 30 s:\n{}",
                proc.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            proc,
            addr,
            _dir: dir,
        }
    }

    /// An instant query: each series' labels and value.
    pub async fn query(&self, promql: &str) -> Vec<(HashMap<String, String>, f64)> {
        let (status, body) = client::http_get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        )
        .await;
        assert_eq!(status, 200, "query {promql}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "query {promql}: {body}");
        v["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("query {promql}: not a vector: {body}"))
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                let value = s["value"][1].as_str().unwrap().parse().unwrap();
                (labels, value)
            })
            .collect()
    }

    /// Polls `promql` until it returns exactly one series whose value
    /// satisfies `ok`, up to `limit`; returns that series.
    pub async fn wait_one(
        &self,
        promql: &str,
        ok: impl Fn(f64) -> bool,
        limit: Duration,
    ) -> (HashMap<String, String>, f64) {
        let start = Instant::now();
        loop {
            let r = self.query(promql).await;
            if let [(labels, v)] = r.as_slice() {
                if ok(*v) {
                    return (labels.clone(), *v);
                }
            }
            assert!(
                start.elapsed() < limit,
                "Prometheus answers {promql} with {r:?} after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Percent-encodes a query parameter value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

//! The fleet's real parts: `redis-server` (the session directory) and
//! `haproxy` (the load balancer in front of the instances), as child
//! processes on free loopback ports.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Proc;

/// A free loopback port for a process that must keep it across restarts
/// (Redis, HAProxy, a redeployed instance).
///
/// Binding to port 0 and releasing it is racy where it matters most: the
/// kernel hands out ports from the ephemeral range, the same range every
/// outgoing connection's source port comes from, and these tests open
/// thousands of them (churn through HAProxy). So the port is taken from
/// below the ephemeral range (`net.ipv4.ip_local_port_range`), is never
/// handed out twice by one test process, and must be bindable now.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_100));
    let span = u32::from(high - low);
    // A different starting point per process and per call, so that test
    // binaries run one after another do not retry the same ports.
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for i in 0..span {
        let port = low + ((seed.wrapping_add(i.wrapping_mul(7919))) % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// A `redis-server` without persistence, killed when dropped.
pub struct Redis {
    pub proc: Option<Proc>,
    pub port: u16,
}

impl Redis {
    /// Starts one on a free port and waits until it answers `PING`.
    pub fn start() -> Self {
        let mut r = Self {
            proc: None,
            port: free_port(),
        };
        r.restart();
        r
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it (again, on the same port, empty) and waits until it
    /// answers.
    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new(redis_server());
        cmd.args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--logfile", "/dev/null"]);
        let (proc, _) = Proc::spawn(cmd, 0);
        self.proc = Some(proc);
        let start = Instant::now();
        while !self.answers() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not answer on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it (SIGKILL): every connection to it breaks.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// Whether it answers `PING` now.
    pub fn answers(&self) -> bool {
        self.command("PING\r\n")
            .is_some_and(|r| r.starts_with("+PONG"))
    }

    /// One inline command's raw answer.
    pub fn command(&self, line: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(line.as_bytes()).ok()?;
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `redis-server` binary (Debian's `redis-server`; `.ci/run` installs
/// it).
pub fn redis_server() -> &'static str {
    "redis-server"
}

/// An `haproxy` in front of `servers`, round robin, with health checks on
/// each server's `/readyz` (its admin address), killed when dropped.
pub struct Haproxy {
    pub proc: Proc,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// `servers`: (public ws address, admin address) of each instance.
    pub fn start(servers: &[(SocketAddr, SocketAddr)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let template =
            std::fs::read_to_string(crate::repo_root().join("deploy/haproxy/haproxy.cfg")).unwrap();
        // The deploy file as it is, but for its addresses.
        let mut cfg = String::new();
        for line in template.lines() {
            if line.trim_start().starts_with("server ") {
                continue;
            }
            if line.trim() == "bind :8080" {
                cfg.push_str(&format!("    bind 127.0.0.1:{port}\n"));
                continue;
            }
            cfg.push_str(line);
            cfg.push('\n');
        }
        for (i, (ws, admin)) in servers.iter().enumerate() {
            cfg.push_str(&format!(
                "    server gw{i} {ws} check port {} inter 500ms fall 1 rise 2\n",
                admin.port()
            ));
        }
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, cfg).unwrap();
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "haproxy -c: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&file);
        let (proc, _) = Proc::spawn(cmd, 0);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let start = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "haproxy did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            proc,
            addr,
            _dir: dir,
        }
    }
}

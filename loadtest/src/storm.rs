//! `loadtest storm`: a reconnect storm, as after a mass 1012 or a deploy.
//!
//! `--clients` wss clients connect (at `--ramp` per second) and each does
//! one echo round trip. Meanwhile `--probes` established sessions, on their
//! own thread and runtime, do a round trip every `--probe-interval`. After a
//! calm period every client drops its connection, and after `--pause` (the
//! old sessions end) all reconnect at the same instant: TCP, TLS (resumed from the client's own session
//! store, as a phone would, unless `--no-resumption`), upgrade, one round
//! trip. A client is "back" when that round trip returns; one whose attempt
//! fails retries after 100-500 ms until `--timeout`.
//!
//! Reported: time until all are back, failed attempts and clients never
//! back, TLS handshakes per second during the storm (full and resumed, as
//! the clients saw them), the probes' round-trip latency before and during
//! the storm (from each round trip's intended start, so a stalled probe
//! counts its wait), and with `--gateway-pid` the gateway's CPU time per
//! connection, for the first connects and for the storm.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload};
use hdrhistogram::Histogram;
use http_body_util::Empty;
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::HandshakeKind;
use serde::Serialize;
use tokio::sync::watch;

use crate::run::conn::{self, SpawnExecutor, Target, Ws};
use crate::run::stats::{micros, ErrorKind};

/// Options of `loadtest storm`.
#[derive(Debug, Clone, clap::Args)]
pub struct StormArgs {
    /// Target, wss://host:port/path (ws:// works, without TLS figures).
    #[arg(long)]
    pub url: String,
    /// CA certificate (PEM) to trust for wss.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Accept any server certificate (wss).
    #[arg(long)]
    pub insecure: bool,
    /// Clients that drop and reconnect at once.
    #[arg(long, short = 'c', default_value_t = 10_000)]
    pub clients: u32,
    /// Established sessions doing round trips through the storm.
    #[arg(long, default_value_t = 100)]
    pub probes: u32,
    /// Time between one probe's round trips.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub probe_interval: Duration,
    /// New connections per second while the clients first connect.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp: f64,
    /// Probe latency measured before the drop (the baseline).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub calm: Duration,
    /// Between the drop and the reconnect: the old sessions end first, as
    /// after a mass 1012 (the gateway closed them) or a deploy (another
    /// process had them). The storm's clock starts at the reconnect.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub pause: Duration,
    /// Reconnect with a full TLS handshake: each client forgets its session.
    #[arg(long)]
    pub no_resumption: bool,
    /// Offer TLS 1.2 only (default: 1.3 and 1.2, so 1.3).
    #[arg(long)]
    pub tls12: bool,
    /// Spread connections over this many source addresses 127.0.0.1, .2, ...
    #[arg(long, default_value_t = 2)]
    pub sources: u8,
    /// A client not back this long after the drop counts as never back.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The gateway's process id, to report its CPU time from /proc.
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Print the report as JSON (stable keys) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Probe phases: which histogram a round trip counts in (none while OFF).
const OFF: u8 = 0;
const CALM: u8 = 1;
const STORM: u8 = 2;
const DONE: u8 = 3;

/// How one reconnection attempt (or first connect) failed.
type Failure = ErrorKind;

/// The storm's report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Clients asked for.
    pub clients: u32,
    /// Whether clients resumed TLS sessions.
    pub resumption: bool,
    /// The TLS version offered ("1.3" or "1.2"; "none" for ws).
    pub tls: &'static str,
    /// Clients connected before the drop.
    pub connected: u64,
    /// First connects that failed (those clients sit the storm out).
    pub connect_failures: BTreeMap<Failure, u64>,
    /// Gateway CPU per first connect, µs (with --gateway-pid).
    pub connect_cpu_us: Option<f64>,
    /// Clients back (reconnected and answered) after the drop.
    pub back: u64,
    /// Clients not back within --timeout.
    pub not_back: u64,
    /// Failed reconnection attempts (each retried), by kind.
    pub attempt_failures: BTreeMap<Failure, u64>,
    /// From the drop to the last client back, seconds.
    pub all_back_s: f64,
    /// From the drop to a client back: p50, p99, ms.
    pub back_p50_ms: f64,
    /// See `back_p50_ms`.
    pub back_p99_ms: f64,
    /// TLS handshakes completed during the storm per second (until all back).
    pub handshakes_per_s: f64,
    /// Storm handshakes the client saw resumed.
    pub resumed: u64,
    /// Storm handshakes the client saw as full.
    pub full: u64,
    /// Gateway CPU during the storm, seconds (with --gateway-pid).
    pub storm_cpu_s: Option<f64>,
    /// Gateway CPU per reconnection (TLS, upgrade, one round trip, and the
    /// old session's end), µs (with --gateway-pid).
    pub storm_cpu_us: Option<f64>,
    /// Probe round trips before the drop: p50, p99, max, µs.
    pub calm_us: [u64; 3],
    /// Probe round trips during the storm: p50, p99, max, µs.
    pub storm_us: [u64; 3],
    /// Probe round trips in the storm.
    pub storm_round_trips: u64,
    /// Probe sessions that failed (connect or a round trip).
    pub probe_errors: u64,
}

struct Shared {
    args: StormArgs,
    target: Target,
    /// Per-client TLS configuration template (each client gets its own
    /// session store).
    tls: Option<rustls::ClientConfig>,
    /// `Some(instant)` once the clients must drop.
    drop_at: watch::Receiver<Option<Instant>>,
    phase: AtomicU8,
    resumed: AtomicU64,
    full: AtomicU64,
}

/// What one client saw.
#[derive(Default)]
struct ClientTally {
    connected: bool,
    connect_failure: Option<Failure>,
    back_after: Option<Duration>,
    attempt_failures: BTreeMap<Failure, u64>,
}

/// Runs the storm and prints the report.
pub fn main(args: StormArgs) -> anyhow::Result<()> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let needed = u64::from(args.clients) + u64::from(args.probes) + 64;
    if needed > limit {
        bail!("{needed} open files needed, this process may open {limit}");
    }
    if args.sources == 0 {
        bail!("--sources must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(storm(args.clone()))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

async fn storm(args: StormArgs) -> anyhow::Result<Report> {
    let target = Target::parse(&args.url, args.ca.as_deref(), args.insecure).await?;
    let tls = match &target.tls {
        None => None,
        Some(_) => {
            let versions: &[&'static rustls::SupportedProtocolVersion] = if args.tls12 {
                &[&rustls::version::TLS12]
            } else {
                rustls::DEFAULT_VERSIONS
            };
            Some(conn::client_config(
                args.ca.as_deref(),
                args.insecure,
                versions,
            )?)
        }
    };
    let (drop_tx, drop_at) = watch::channel(None);
    let sh = Arc::new(Shared {
        args,
        target,
        tls,
        drop_at,
        phase: AtomicU8::new(OFF),
        resumed: AtomicU64::new(0),
        full: AtomicU64::new(0),
    });
    let args = &sh.args;

    // The probes first, on their own thread: the storm's client work must
    // not delay their timers in this process's runtime.
    let (probes_up_tx, probes_up) = tokio::sync::oneshot::channel();
    let probe_thread = {
        let sh = sh.clone();
        std::thread::spawn(move || probes(sh, probes_up_tx))
    };
    probes_up.await.context("probe thread")??;

    let cpu0 = gateway_cpu(args.gateway_pid)?;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(1024);
    let mut tasks = tokio::task::JoinSet::new();
    let ramp = Duration::from_secs_f64(1.0 / args.ramp.max(1.0));
    for i in 0..args.clients {
        let sh = sh.clone();
        let ready = ready_tx.clone();
        tasks.spawn(async move {
            tokio::time::sleep(ramp.saturating_mul(i)).await;
            client(i, &sh, ready).await
        });
    }
    drop(ready_tx);
    let mut reported = 0;
    while reported < args.clients && ready_rx.recv().await.is_some() {
        reported += 1;
    }
    let cpu1 = gateway_cpu(args.gateway_pid)?;
    // Let the first connects' tails (closing, tickets) settle, then measure
    // the calm.
    sh.phase.store(CALM, Ordering::Relaxed);
    tokio::time::sleep(args.calm).await;

    // The old sessions' ends are neither calm nor storm.
    sh.phase.store(OFF, Ordering::Relaxed);
    let t0 = Instant::now() + args.pause;
    let _ = drop_tx.send(Some(t0));
    tokio::time::sleep_until(t0.into()).await;
    let cpu2 = gateway_cpu(args.gateway_pid)?;
    sh.phase.store(STORM, Ordering::Relaxed);
    let mut tallies = Vec::with_capacity(args.clients as usize);
    while let Some(t) = tasks.join_next().await {
        tallies.push(t?);
    }
    let all_back = t0.elapsed();
    sh.phase.store(DONE, Ordering::Relaxed);
    let cpu3 = gateway_cpu(args.gateway_pid)?;
    let probe = probe_thread
        .join()
        .map_err(|_| anyhow::anyhow!("probe thread panicked"))?;

    let mut r = Report {
        clients: args.clients,
        resumption: !args.no_resumption,
        tls: match (&sh.tls, args.tls12) {
            (None, _) => "none",
            (Some(_), true) => "1.2",
            (Some(_), false) => "1.3",
        },
        connected: 0,
        connect_failures: BTreeMap::new(),
        connect_cpu_us: None,
        back: 0,
        not_back: 0,
        attempt_failures: BTreeMap::new(),
        all_back_s: all_back.as_secs_f64(),
        back_p50_ms: 0.0,
        back_p99_ms: 0.0,
        handshakes_per_s: 0.0,
        resumed: sh.resumed.load(Ordering::Relaxed),
        full: sh.full.load(Ordering::Relaxed),
        storm_cpu_s: None,
        storm_cpu_us: None,
        calm_us: quantiles(&probe.calm),
        storm_us: quantiles(&probe.storm),
        storm_round_trips: probe.storm.len(),
        probe_errors: probe.errors,
    };
    let mut back = histogram();
    for t in &tallies {
        r.connected += u64::from(t.connected);
        if let Some(k) = t.connect_failure {
            *r.connect_failures.entry(k).or_default() += 1;
        }
        for (k, n) in &t.attempt_failures {
            *r.attempt_failures.entry(*k).or_default() += n;
        }
        match t.back_after {
            Some(d) => {
                r.back += 1;
                let _ = back.record(micros(d));
            }
            None if t.connected => r.not_back += 1,
            None => {}
        }
    }
    r.back_p50_ms = back.value_at_quantile(0.5) as f64 / 1000.0;
    r.back_p99_ms = back.value_at_quantile(0.99) as f64 / 1000.0;
    r.handshakes_per_s = r.back as f64 / all_back.as_secs_f64();
    if let (Some(c0), Some(c1), Some(c2), Some(c3)) = (cpu0, cpu1, cpu2, cpu3) {
        r.connect_cpu_us = Some((c1 - c0) * 1e6 / r.connected.max(1) as f64);
        r.storm_cpu_s = Some(c3 - c2);
        r.storm_cpu_us = Some((c3 - c2) * 1e6 / r.back.max(1) as f64);
    }
    Ok(r)
}

/// One client: connect and echo; at the drop, reconnect until back.
async fn client(i: u32, sh: &Shared, ready: tokio::sync::mpsc::Sender<()>) -> ClientTally {
    let mut tally = ClientTally::default();
    let connector = sh.tls.as_ref().map(|base| {
        let mut cfg = base.clone();
        // A phone keeps its own sessions; a few are plenty for one server.
        cfg.resumption = if sh.args.no_resumption {
            Resumption::disabled()
        } else {
            Resumption::in_memory_sessions(4)
        };
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    });
    let first = connect_and_echo(i, sh, connector.as_ref(), false).await;
    let _ = ready.send(()).await;
    drop(ready);
    let ws = match first {
        Ok(ws) => ws,
        Err(k) => {
            tally.connect_failure = Some(k);
            return tally;
        }
    };
    tally.connected = true;
    let mut drop_at = sh.drop_at.clone();
    let t0 = match drop_at.wait_for(Option::is_some).await {
        Ok(t) => t.unwrap_or_else(Instant::now),
        Err(_) => return tally,
    };
    // Gone at once, as after a 1012 or a deploy: the socket closes (FIN).
    // Everyone comes back at the same instant.
    drop(ws);
    tokio::time::sleep_until(t0.into()).await;
    while t0.elapsed() < sh.args.timeout {
        match connect_and_echo(i, sh, connector.as_ref(), true).await {
            Ok(ws) => {
                tally.back_after = Some(t0.elapsed());
                drop(ws);
                return tally;
            }
            Err(k) => {
                *tally.attempt_failures.entry(k).or_default() += 1;
                let backoff = rand::random_range(100..500);
                tokio::time::sleep(Duration::from_millis(backoff)).await;
            }
        }
    }
    tally
}

/// TCP, TLS, upgrade and one round trip. `count` records the TLS
/// handshake's kind.
async fn connect_and_echo(
    i: u32,
    sh: &Shared,
    connector: Option<&tokio_rustls::TlsConnector>,
    count: bool,
) -> Result<Ws, Failure> {
    let n = u32::from(sh.args.sources);
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % n) as u8));
    let target = &sh.target;
    let tcp = conn::tcp(target, source, false).await?;
    let req = conn::upgrade_request(
        &target.path,
        &format!("{}:{}", target.host, target.addr.port()),
    )
    .body(Empty::<Bytes>::new())
    .map_err(|_| ErrorKind::Handshake)?;
    let limit = Duration::from_secs(30);
    let upgrade = async {
        match connector {
            None => fastwebsockets::handshake::client(&SpawnExecutor, req, tcp).await,
            Some(c) => {
                let name = ServerName::try_from(target.host.clone()).map_err(|_| ErrorKind::Tls)?;
                let tls = c.connect(name, tcp).await.map_err(|_| ErrorKind::Tls)?;
                if count {
                    let counter = match tls.get_ref().1.handshake_kind() {
                        Some(HandshakeKind::Resumed) => &sh.resumed,
                        _ => &sh.full,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                fastwebsockets::handshake::client(&SpawnExecutor, req, tls).await
            }
        }
        .map_err(|_| ErrorKind::Handshake)
    };
    let (mut ws, _) = tokio::time::timeout(limit, upgrade)
        .await
        .map_err(|_| ErrorKind::Timeout)??;
    let payload = i.to_be_bytes();
    round_trip(&mut ws, &payload, limit).await?;
    Ok(ws)
}

/// Sends `payload` and waits for it to come back.
async fn round_trip(ws: &mut Ws, payload: &[u8], limit: Duration) -> Result<(), Failure> {
    ws.write_frame(Frame::binary(Payload::Borrowed(payload)))
        .await
        .map_err(|_| ErrorKind::Disconnected)?;
    // TLS buffers what fastwebsockets writes.
    ws.flush().await.map_err(|_| ErrorKind::Disconnected)?;
    let read = async {
        loop {
            let f = ws.read_frame().await.map_err(|_| ErrorKind::Disconnected)?;
            match f.opcode {
                OpCode::Binary if &f.payload[..] == payload => return Ok(()),
                OpCode::Binary | OpCode::Text => return Err(ErrorKind::Corrupt),
                OpCode::Close => return Err(ErrorKind::CloseCode),
                _ => {}
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| ErrorKind::Timeout)?
}

/// What the probes measured.
struct ProbeResult {
    calm: Histogram<u64>,
    storm: Histogram<u64>,
    errors: u64,
}

/// The probes' thread: its own runtime, `--probes` sessions, each a round
/// trip every `--probe-interval` until the storm is over.
fn probes(sh: Arc<Shared>, up: tokio::sync::oneshot::Sender<anyhow::Result<()>>) -> ProbeResult {
    let mut result = ProbeResult {
        calm: histogram(),
        storm: histogram(),
        errors: 0,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = up.send(Err(e.into()));
            return result;
        }
    };
    rt.block_on(async {
        let mut sessions = Vec::new();
        for i in 0..sh.args.probes {
            // Probes use the last source address, their own TLS sessions.
            let connector = sh
                .tls
                .as_ref()
                .map(|c| tokio_rustls::TlsConnector::from(Arc::new(c.clone())));
            match connect_and_echo(u32::MAX - i, &sh, connector.as_ref(), false).await {
                Ok(ws) => sessions.push(ws),
                Err(k) => {
                    let _ = up.send(Err(anyhow::anyhow!("a probe could not connect: {k:?}")));
                    return;
                }
            }
        }
        let _ = up.send(Ok(()));
        let mut set = tokio::task::JoinSet::new();
        let n = sessions.len().max(1) as u32;
        for (i, ws) in sessions.into_iter().enumerate() {
            let sh = sh.clone();
            // Stagger the probes over one interval.
            let offset = sh.args.probe_interval / n * i as u32;
            set.spawn(async move { probe(i as u32, ws, &sh, offset).await });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(p) => {
                    let _ = result.calm.add(&p.calm);
                    let _ = result.storm.add(&p.storm);
                    result.errors += p.errors;
                }
                Err(_) => result.errors += 1,
            }
        }
    });
    result
}

/// One probe session's round trips, each timed from its intended start.
async fn probe(i: u32, mut ws: Ws, sh: &Shared, offset: Duration) -> ProbeResult {
    let mut r = ProbeResult {
        calm: histogram(),
        storm: histogram(),
        errors: 0,
    };
    let interval = sh.args.probe_interval;
    let start = tokio::time::Instant::now() + offset;
    let payload = (u32::MAX - i).to_be_bytes();
    for k in 0u32.. {
        let intended = start + interval * k;
        tokio::time::sleep_until(intended).await;
        let phase = sh.phase.load(Ordering::Relaxed);
        if phase == DONE {
            break;
        }
        if round_trip(&mut ws, &payload, Duration::from_secs(30))
            .await
            .is_err()
        {
            r.errors += 1;
            break;
        }
        let took = micros(intended.elapsed());
        let _ = match phase {
            CALM => r.calm.record(took),
            STORM => r.storm.record(took),
            _ => Ok(()),
        };
    }
    r
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes at 3 significant digits; cannot fail for these
    // bounds.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

fn quantiles(h: &Histogram<u64>) -> [u64; 3] {
    [h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max()]
}

/// User + system CPU seconds of `pid` so far, from /proc/PID/stat.
fn gateway_cpu(pid: Option<u32>) -> anyhow::Result<Option<f64>> {
    let Some(pid) = pid else { return Ok(None) };
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |n: usize| -> anyhow::Result<u64> {
        f.get(n)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{path}: field {}", n + 3))
    };
    // utime and stime are fields 14 and 15; 100 ticks per second on Linux.
    Ok(Some((ticks(11)? + ticks(12)?) as f64 / 100.0))
}

impl Report {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let cpu = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.0} µs"));
        format!(
            "clients         {} over TLS {}, resumption {}\n\
             first connects  {} ok, failures {:?}, gateway CPU {} each\n\
             storm           {} back in {:.2} s (p50 {:.0} ms, p99 {:.0} ms), {} never back\n\
             attempts failed {:?}\n\
             handshakes      {:.0}/s ({} resumed, {} full), gateway CPU {} per reconnect\n\
             probes calm     p50 {} µs  p99 {} µs  max {} µs\n\
             probes storm    p50 {} µs  p99 {} µs  max {} µs  ({} round trips, {} errors)\n",
            self.clients,
            self.tls,
            if self.resumption { "on" } else { "off" },
            self.connected,
            self.connect_failures,
            cpu(self.connect_cpu_us),
            self.back,
            self.all_back_s,
            self.back_p50_ms,
            self.back_p99_ms,
            self.not_back,
            self.attempt_failures,
            self.handshakes_per_s,
            self.resumed,
            self.full,
            cpu(self.storm_cpu_us),
            self.calm_us[0],
            self.calm_us[1],
            self.calm_us[2],
            self.storm_us[0],
            self.storm_us[1],
            self.storm_us[2],
            self.storm_round_trips,
            self.probe_errors,
        )
    }
}

//! `loadtest run`: the load generator.
//!
//! Every connection is a task. Connections open at `--ramp` per second from
//! the `--sources` 127.0.0.x addresses; once all are up (or failed), the
//! measured period of `--duration` starts for everyone at once. Each
//! received message is verified (right connection, right order, right
//! bytes, see [`payload`]) before its latency counts.

pub mod conn;
pub mod payload;
mod scenario;
pub mod schedule;
pub mod stats;
mod wire;

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use conn::{ResumeAnswer, ResumeAsk, Target, Ws};
use scenario::{churn, churn_waves, echo_closed, echo_open, handshakes, idle, push};
use stats::{ErrorKind, Summary, Tally};
use wire::{split, End};

/// Which load to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Round trips through an echo backend (closed loop with --in-flight, or
    /// open loop with --rate / --rate-per-conn).
    Echo,
    /// Receive what a push backend sends; latency from the payload's
    /// timestamp (`loadtest backend --mode push`).
    Push,
    /// Echo, while a share of the clients vanish without a close (reset or
    /// silence) and come back after a random suspension.
    Churn,
    /// Open every connection, hold it idle for --duration (answering the
    /// server's pings), then check that each still answers one message.
    Idle,
    /// New sessions as fast as possible: connect, one round trip, close;
    /// --connections of them at a time, for --duration.
    Handshake,
}

/// How vanishing clients vanish in the churn scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Vanish {
    /// Reset the TCP connection (RST).
    Rst,
    /// Stop reading and writing, keep the socket open for the suspension,
    /// then reset it.
    Silence,
}

/// Options of `loadtest run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Target, ws://host:port/path or wss://host:port/path.
    #[arg(long)]
    pub url: String,
    /// CA certificate (PEM) to trust for wss.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Accept any server certificate (wss).
    #[arg(long)]
    pub insecure: bool,
    /// Scenario.
    #[arg(long, value_enum, default_value = "echo")]
    pub scenario: Scenario,
    /// Concurrent connections (handshake: concurrent connectors).
    #[arg(long, short = 'c', default_value_t = 100)]
    pub connections: u32,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp: f64,
    /// Measured period (idle: how long to hold), e.g. 10s.
    #[arg(long, short = 'd', default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Message size in bytes (at least 20, or 40 for text).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Send text messages instead of binary.
    #[arg(long)]
    pub text: bool,
    /// Closed loop: messages in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub in_flight: u32,
    /// Open loop: total messages per second, spread over the connections.
    #[arg(long, conflicts_with = "rate_per_conn")]
    pub rate: Option<f64>,
    /// Open loop: messages per second per connection.
    #[arg(long)]
    pub rate_per_conn: Option<f64>,
    /// Give up on a message (and its connection) after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Spread connections over this many source addresses 127.0.0.1, .2, ...
    #[arg(long, default_value_t = 1)]
    pub sources: u8,
    /// Churn: share of the clients that vanish each period (0..1).
    #[arg(long, default_value_t = 0.1)]
    pub churn_share: f64,
    /// Churn: period between vanishing waves.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub churn_every: Duration,
    /// Churn: how clients vanish.
    #[arg(long, value_enum, default_value = "rst")]
    pub vanish: Vanish,
    /// Churn: shortest suspension before coming back.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub suspend_min: Duration,
    /// Churn: longest suspension before coming back.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub suspend_max: Duration,
    /// Churn: reconnect as new sessions instead of resuming.
    #[arg(long)]
    pub no_resume: bool,
    /// Print the summary as JSON (stable keys) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write the latency histogram as an HdrHistogram percentile
    /// distribution (text) to this file.
    #[arg(long)]
    pub hdr_out: Option<PathBuf>,
}

/// Live counters for the progress line.
#[derive(Default)]
struct Live {
    connected: AtomicU64,
    messages: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    args: RunArgs,
    target: Target,
    /// Time zero for payload timestamps.
    epoch: Instant,
    /// Becomes true when the measured period starts.
    go: watch::Receiver<bool>,
    /// Fires when the measured period ends.
    stop: CancellationToken,
    live: Live,
    /// Open loop: the pacing thread.
    pacer: schedule::driver::Driver,
    /// Churn: the wave counter, bumped every `--churn-every`.
    waves: watch::Sender<u64>,
}

impl Shared {
    fn since_epoch(&self) -> Duration {
        self.epoch.elapsed()
    }
}

/// Runs the load and prints the summary. Returns an error (non-zero exit)
/// only for bad arguments or when nothing could connect.
pub fn main(args: RunArgs) -> anyhow::Result<()> {
    if args.size < payload::min_size(args.text)
        && matches!(
            args.scenario,
            Scenario::Echo | Scenario::Churn | Scenario::Idle | Scenario::Handshake
        )
    {
        bail!(
            "--size must be at least {} for {} messages",
            payload::min_size(args.text),
            if args.text { "text" } else { "binary" }
        );
    }
    if args.sources == 0 {
        bail!("--sources must be at least 1");
    }
    let limit = raise_nofile();
    let needed = u64::from(args.connections) + 64;
    if needed > limit {
        bail!(
            "{} connections need about {needed} open files, but this process may open only {limit} \
             (the hard limit). Run several loadtest processes, each with fewer --connections.",
            args.connections
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let summary = rt.block_on(run(args.clone()))?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.table());
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard limit; returns the result.
fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

async fn run(args: RunArgs) -> anyhow::Result<Summary> {
    let target = Target::parse(&args.url, args.ca.as_deref(), args.insecure).await?;
    let (go_tx, go) = watch::channel(false);
    let epoch = Instant::now();
    let shared = Arc::new(Shared {
        pacer: schedule::driver::Driver::start(epoch),
        target,
        epoch,
        go,
        stop: CancellationToken::new(),
        live: Live::default(),
        waves: watch::channel(0).0,
        args,
    });
    let args = &shared.args;
    let progress = tokio::spawn(progress(shared.clone()));

    // Ramp: connection i starts at i / ramp seconds.
    let mut tasks = tokio::task::JoinSet::new();
    let ramp = Duration::from_secs_f64(1.0 / args.ramp.max(1.0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(1024);
    for i in 0..args.connections {
        let sh = shared.clone();
        let ready = ready_tx.clone();
        let start = ramp.saturating_mul(i);
        tasks.spawn(async move {
            tokio::time::sleep(start).await;
            connection(i, sh, ready).await
        });
    }
    drop(ready_tx);
    // Every connection reports once: connected, or failed.
    let mut reported = 0;
    while reported < args.connections {
        if ready_rx.recv().await.is_none() {
            break;
        }
        reported += 1;
    }
    if shared.live.connected.load(Ordering::Relaxed) == 0 && args.scenario != Scenario::Handshake {
        shared.stop.cancel();
    }
    let measured = Instant::now();
    let _ = go_tx.send(true);
    if args.scenario == Scenario::Churn {
        tokio::spawn(churn_waves(shared.clone()));
    }
    tokio::select! {
        _ = tokio::time::sleep(args.duration) => {}
        _ = shared.stop.cancelled() => {}
    }
    let elapsed = measured.elapsed();
    shared.pacer.stop();
    shared.stop.cancel();
    let mut total = Tally::new();
    // A connection task that panicked took its counts with it (its lost or
    // corrupt messages among them), so the summary would under-count: the
    // run fails instead.
    let mut panicked = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(t) => total.merge(&t),
            Err(e) => panicked.push(e.to_string()),
        }
    }
    progress.abort();
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    if let Some(path) = &args.hdr_out {
        write_hdr(path, &total)?;
    }
    if !panicked.is_empty() {
        let s = Summary::new(scenario_name(args.scenario), &args.url, &total, elapsed);
        eprint!("{}", s.table());
        bail!(
            "{} connection task(s) failed, their counts are missing from the summary above: {}",
            panicked.len(),
            panicked.join("; ")
        );
    }
    if total.connections_ok == 0 {
        let s = Summary::new(scenario_name(args.scenario), &args.url, &total, elapsed);
        eprint!("{}", s.table());
        bail!("no connection succeeded");
    }
    Ok(Summary::new(
        scenario_name(args.scenario),
        &args.url,
        &total,
        elapsed,
    ))
}

fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::Echo => "echo",
        Scenario::Push => "push",
        Scenario::Churn => "churn",
        Scenario::Idle => "idle",
        Scenario::Handshake => "handshake",
    }
}

fn write_hdr(path: &std::path::Path, t: &Tally) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut out = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    for v in t.latency.iter_quantiles(1) {
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            1.0 / (1.0 - q)
        } else {
            f64::INFINITY
        };
        let _ = writeln!(
            out,
            "{:12.3} {:14.12} {:10} {:14.2}",
            v.value_iterated_to() as f64,
            q,
            v.count_since_last_iteration(),
            inv
        );
    }
    std::fs::write(path, out)?;
    Ok(())
}

async fn progress(sh: Arc<Shared>) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    let mut last = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let m = sh.live.messages.load(Ordering::Relaxed);
        eprint!(
            "\r{:>7} connected  {:>9} msg/s  {:>6} errors   ",
            sh.live.connected.load(Ordering::Relaxed),
            m - last,
            sh.live.errors.load(Ordering::Relaxed)
        );
        last = m;
    }
}

fn source(sh: &Shared, i: u32) -> IpAddr {
    let n = u32::from(sh.args.sources);
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % n) as u8))
}

/// Opens a connection (recording its connect time), or records why not.
async fn open(i: u32, sh: &Shared, tally: &mut Tally, zero_linger: bool) -> Option<Ws> {
    open_resumable(i, sh, tally, zero_linger, &ResumeAsk::No)
        .await
        .ok()
        .map(|(ws, _)| ws)
}

/// Like [`open`], asking for a resumable session or resuming one.
async fn open_resumable(
    i: u32,
    sh: &Shared,
    tally: &mut Tally,
    zero_linger: bool,
    ask: &ResumeAsk,
) -> Result<(Ws, Option<ResumeAnswer>), ErrorKind> {
    let t0 = Instant::now();
    let result = match conn::tcp(&sh.target, source(sh, i), zero_linger).await {
        Ok(tcp) => conn::upgrade_resumable(&sh.target, tcp, ask).await,
        Err(k) => Err(k),
    };
    match &result {
        Ok(_) => {
            let _ = tally.connect.record(stats::micros(t0.elapsed()));
            tally.connections_ok += 1;
        }
        Err(k) => {
            tally.error(*k);
            sh.live.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    result
}

async fn connection(i: u32, sh: Arc<Shared>, ready: tokio::sync::mpsc::Sender<()>) -> Tally {
    let mut tally = Tally::new();
    if sh.args.scenario == Scenario::Handshake {
        let _ = ready.send(()).await;
        drop(ready);
        handshakes(i, &sh, &mut tally).await;
        return tally;
    }
    let churning = sh.args.scenario == Scenario::Churn;
    let ask = if churning && !sh.args.no_resume {
        ResumeAsk::New
    } else {
        ResumeAsk::No
    };
    let opened = open_resumable(i, &sh, &mut tally, churning, &ask)
        .await
        .ok();
    let answer = opened.as_ref().and_then(|(_, a)| a.clone());
    let ws = opened.map(|(ws, _)| ws);
    if ws.is_some() {
        sh.live.connected.fetch_add(1, Ordering::Relaxed);
    }
    let _ = ready.send(()).await;
    drop(ready);
    let Some(ws) = ws else { return tally };
    let mut go = sh.go.clone();
    let _ = go.wait_for(|g| *g).await;
    let end = match sh.args.scenario {
        Scenario::Echo if sh.args.rate.is_some() || sh.args.rate_per_conn.is_some() => {
            echo_open(i, ws, &sh, &mut tally).await
        }
        Scenario::Echo => echo_closed(i, split(ws), &sh, &mut tally, None).await.0,
        Scenario::Churn => churn(i, ws, answer, &sh, &mut tally).await,
        Scenario::Push => push(ws, &sh, &mut tally).await,
        Scenario::Idle => idle(i, ws, &sh, &mut tally).await,
        Scenario::Handshake => Ok(()),
    };
    if let Err(k) = end {
        sh.live.errors.fetch_add(1, Ordering::Relaxed);
        tally.error(k.kind());
        if let End::Closed(code) = k {
            *tally.close_codes.entry(code).or_default() += 1;
        }
    }
    tally
}

//! `loadtest run`: the load generator.
//!
//! Every connection is a task. Connections open at `--ramp` per second from
//! the `--sources` 127.0.0.x addresses; once all are up (or failed), the
//! measured period of `--duration` starts for everyone at once. Each
//! received message is verified (right connection, right order, right
//! bytes, see [`payload`]) before its latency counts.

pub mod conn;
pub mod payload;
pub mod schedule;
pub mod stats;

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use rand::Rng;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use conn::{ResumeAnswer, ResumeAsk, Target, Ws};
use payload::Stamp;
use schedule::Pacer;
use stats::{ErrorKind, Summary, Tally};

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
    while let Some(r) = tasks.join_next().await {
        if let Ok(t) = r {
            total.merge(&t);
        }
    }
    progress.abort();
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    if let Some(path) = &args.hdr_out {
        write_hdr(path, &total)?;
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

/// How a connection's run ended early.
#[derive(Debug)]
enum End {
    Closed(u16),
    Disconnected,
    Timeout,
    Corrupt,
}

impl End {
    fn kind(&self) -> ErrorKind {
        match self {
            End::Closed(_) => ErrorKind::CloseCode,
            End::Disconnected => ErrorKind::Disconnected,
            End::Timeout => ErrorKind::Timeout,
            End::Corrupt => ErrorKind::Corrupt,
        }
    }
}

type Reader = fastwebsockets::WebSocketRead<tokio::io::ReadHalf<conn::Io>>;
type Writer = Arc<Mutex<fastwebsockets::WebSocketWrite<tokio::io::WriteHalf<conn::Io>>>>;

fn split(ws: Ws) -> (Reader, Writer) {
    let (r, w) = ws.split(tokio::io::split);
    (r, Arc::new(Mutex::new(w)))
}

/// Reads the next data message (answering pings and closes on the way).
async fn recv(r: &mut Reader, w: &Writer, timeout: Duration) -> Result<(Vec<u8>, bool), End> {
    recv_or_pong(r, w, timeout, false)
        .await
        .map(|m| m.unwrap_or_default())
}

/// Like [`recv`]; with `pong`, a pong frame returns `None`.
async fn recv_or_pong(
    r: &mut Reader,
    w: &Writer,
    timeout: Duration,
    pong: bool,
) -> Result<Option<(Vec<u8>, bool)>, End> {
    let send = |f: Frame<'static>| {
        let w = w.clone();
        async move {
            let mut w = w.lock().await;
            w.write_frame(f).await?;
            w.flush().await
        }
    };
    let mut send = send;
    let read = async {
        loop {
            let f = r
                .read_frame::<_, WebSocketError>(&mut send)
                .await
                .map_err(|_| End::Disconnected)?;
            match f.opcode {
                OpCode::Binary | OpCode::Text => {
                    if !f.fin {
                        // The gateway sends whole messages; fragments from a
                        // peer bridge are reassembled here.
                        let text = f.opcode == OpCode::Text;
                        let mut buf = f.payload.to_vec();
                        loop {
                            let c = r
                                .read_frame::<_, WebSocketError>(&mut send)
                                .await
                                .map_err(|_| End::Disconnected)?;
                            if c.opcode == OpCode::Continuation {
                                buf.extend_from_slice(&c.payload);
                                if c.fin {
                                    return Ok(Some((buf, text)));
                                }
                            }
                        }
                    }
                    return Ok(Some((f.payload.to_vec(), f.opcode == OpCode::Text)));
                }
                OpCode::Close => {
                    let p = &f.payload;
                    let code = if p.len() >= 2 {
                        u16::from_be_bytes([p[0], p[1]])
                    } else {
                        1005
                    };
                    return Err(End::Closed(code));
                }
                OpCode::Pong if pong => return Ok(None),
                _ => {}
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| End::Timeout)?
}

async fn send(
    w: &Writer,
    i: u32,
    seq: u64,
    t: Duration,
    sh: &Shared,
    buf: &mut Vec<u8>,
) -> Result<(), End> {
    send_raw(w, i, seq, t, SendCtx::of(sh), buf).await
}

fn check(msg: &[u8], text: bool, i: u32, expected: u64, sh: &Shared) -> Result<Stamp, End> {
    if text != sh.args.text {
        return Err(End::Corrupt);
    }
    payload::verify(msg, i, expected, sh.args.size, sh.args.text).map_err(|_| End::Corrupt)
}

/// Closed loop: keep `in_flight` messages outstanding; latency from the
/// actual send time. Returns the end and the reader/writer if still usable.
async fn echo_closed(
    i: u32,
    (mut r, w): (Reader, Writer),
    sh: &Shared,
    tally: &mut Tally,
    vanish: Option<&watch::Receiver<u64>>,
) -> (Result<(), End>, Option<(Reader, Writer)>) {
    let mut buf = Vec::with_capacity(sh.args.size);
    let (mut next, mut expect) = (0u64, 0u64);
    let wave = vanish.map(|v| *v.borrow());
    loop {
        let stopping = sh.stop.is_cancelled();
        if let (Some(v), Some(w0)) = (vanish, wave) {
            if *v.borrow() != w0 && expect == next {
                return (Ok(()), Some((r, w)));
            }
        }
        while !stopping && next - expect < u64::from(sh.args.in_flight) {
            if let Err(e) = send(&w, i, next, sh.since_epoch(), sh, &mut buf).await {
                return (Err(e), None);
            }
            next += 1;
        }
        if expect == next {
            return (Ok(()), Some((r, w)));
        }
        let (msg, text) = match recv(&mut r, &w, sh.args.timeout).await {
            Ok(m) => m,
            Err(e) => return (Err(e), None),
        };
        match check(&msg, text, i, expect, sh) {
            Ok(stamp) => {
                let sent = Duration::from_nanos(stamp.t_ns);
                tally.message(sh.since_epoch().saturating_sub(sent), msg.len());
                sh.live.messages.fetch_add(1, Ordering::Relaxed);
                expect += 1;
            }
            Err(e) => return (Err(e), None),
        }
    }
}

/// Open loop: send on a fixed schedule; latency from the intended time.
async fn echo_open(i: u32, ws: Ws, sh: &Shared, tally: &mut Tally) -> Result<(), End> {
    let per_conn = match (sh.args.rate, sh.args.rate_per_conn) {
        (Some(total), _) => total / f64::from(sh.args.connections.max(1)),
        (None, Some(r)) => r,
        (None, None) => 1.0,
    };
    let interval = Pacer::interval_for(per_conn);
    // Stagger the first send over one interval so connections spread out.
    let offset = interval.mul_f64(rand::rng().random_range(0.0..1.0));
    let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel();
    sh.pacer.add(schedule::driver::Registration {
        pacer: Pacer::new(sh.since_epoch() + offset, interval),
        due: due_tx,
    });
    let (mut r, w) = split(ws);
    let sent = Arc::new(AtomicU64::new(0));
    let writer = {
        let (w, sent, stop) = (w.clone(), sent.clone(), sh.stop.clone());
        let ctx = SendCtx::of(sh);
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(ctx.size);
            loop {
                let due = tokio::select! {
                    d = due_rx.recv() => d,
                    _ = stop.cancelled() => None,
                };
                let Some(due) = due else {
                    // Wake the reader: the server's pong marks the end of
                    // this connection's sends.
                    let mut w = w.lock().await;
                    let _ = w
                        .write_frame(Frame::new(
                            true,
                            OpCode::Ping,
                            None,
                            Payload::Borrowed(b"end"),
                        ))
                        .await;
                    let _ = w.flush().await;
                    return Ok::<(), End>(());
                };
                let seq = sent.load(Ordering::Relaxed);
                send_raw(&w, i, seq, due, ctx, &mut buf).await?;
                sent.store(seq + 1, Ordering::Release);
            }
        })
    };
    let mut expect = 0u64;
    let result = loop {
        if sh.stop.is_cancelled() && writer.is_finished() && expect >= sent.load(Ordering::Acquire)
        {
            break Ok(());
        }
        let (msg, text) = match recv_or_pong(&mut r, &w, sh.args.timeout, true).await {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => break Err(e),
        };
        match check(&msg, text, i, expect, sh) {
            Ok(stamp) => {
                let due = Duration::from_nanos(stamp.t_ns);
                tally.message(sh.since_epoch().saturating_sub(due), msg.len());
                sh.live.messages.fetch_add(1, Ordering::Relaxed);
                expect += 1;
            }
            Err(e) => break Err(e),
        }
    };
    writer.abort();
    result
}

/// What a sender needs to build messages.
#[derive(Clone, Copy)]
struct SendCtx {
    size: usize,
    text: bool,
}

impl SendCtx {
    fn of(sh: &Shared) -> Self {
        Self {
            size: sh.args.size,
            text: sh.args.text,
        }
    }
}

async fn send_raw(
    w: &Writer,
    i: u32,
    seq: u64,
    t: Duration,
    ctx: SendCtx,
    buf: &mut Vec<u8>,
) -> Result<(), End> {
    let stamp = Stamp {
        conn: i,
        seq,
        t_ns: u64::try_from(t.as_nanos()).unwrap_or(u64::MAX),
    };
    payload::encode(stamp, ctx.size, ctx.text, buf);
    let frame = if ctx.text {
        Frame::text(Payload::BorrowedMut(buf))
    } else {
        Frame::binary(Payload::BorrowedMut(buf))
    };
    let mut w = w.lock().await;
    w.write_frame(frame).await.map_err(|_| End::Disconnected)?;
    w.flush().await.map_err(|_| End::Disconnected)
}

/// Push: verify increasing sequence numbers; latency from the backend's
/// wall-clock timestamp (same machine, same clock).
async fn push(ws: Ws, sh: &Shared, tally: &mut Tally) -> Result<(), End> {
    let (mut r, w) = split(ws);
    let mut last = 0u64;
    loop {
        let got = tokio::select! {
            m = recv(&mut r, &w, sh.args.timeout) => m,
            _ = sh.stop.cancelled() => return Ok(()),
        };
        let (msg, _) = got?;
        let (Some(seq), Some(ts)) = (msg.get(0..8), msg.get(8..16)) else {
            return Err(End::Corrupt);
        };
        let seq = u64::from_be_bytes(seq.try_into().map_err(|_| End::Corrupt)?);
        let ts = u64::from_be_bytes(ts.try_into().map_err(|_| End::Corrupt)?);
        if seq <= last {
            return Err(End::Corrupt);
        }
        last = seq;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        tally.message(Duration::from_micros(now.saturating_sub(ts)), msg.len());
        sh.live.messages.fetch_add(1, Ordering::Relaxed);
    }
}

/// Idle: hold the connection (answering pings) for the period, then one
/// round trip.
async fn idle(i: u32, ws: Ws, sh: &Shared, tally: &mut Tally) -> Result<(), End> {
    let (mut r, w) = split(ws);
    // A reader that answers pings while the connection sits idle; any data
    // message arriving now is unexpected.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let reader_w = w.clone();
    let reader = tokio::spawn(async move {
        let r2 = recv(&mut r, &reader_w, Duration::from_secs(86_400)).await;
        let _ = tx.send(r2).await;
    });
    tokio::select! {
        _ = sh.stop.cancelled() => {}
        m = rx.recv() => {
            reader.abort();
            return match m {
                Some(Err(e)) => Err(e),
                _ => Err(End::Corrupt),
            };
        }
    }
    let mut buf = Vec::new();
    let t = sh.since_epoch();
    send(&w, i, 0, t, sh, &mut buf).await?;
    let got = tokio::time::timeout(sh.args.timeout, rx.recv())
        .await
        .map_err(|_| End::Timeout)?;
    match got {
        Some(Ok((msg, text))) => {
            check(&msg, text, i, 0, sh)?;
            tally.message(sh.since_epoch().saturating_sub(t), msg.len());
            Ok(())
        }
        Some(Err(e)) => Err(e),
        None => Err(End::Disconnected),
    }
}

/// Handshake: connect, one round trip, close, again, until the end.
async fn handshakes(i: u32, sh: &Shared, tally: &mut Tally) {
    let mut go = sh.go.clone();
    let _ = go.wait_for(|g| *g).await;
    let mut buf = Vec::new();
    while !sh.stop.is_cancelled() {
        let Some(ws) = open(i, sh, tally, false).await else {
            continue;
        };
        let (mut r, w) = split(ws);
        let t = sh.since_epoch();
        let res = async {
            send(&w, i, 0, t, sh, &mut buf).await?;
            let (msg, text) = recv(&mut r, &w, sh.args.timeout).await?;
            check(&msg, text, i, 0, sh)
        }
        .await;
        match res {
            Ok(_) => {
                tally.message(sh.since_epoch().saturating_sub(t), sh.args.size);
                sh.live.messages.fetch_add(1, Ordering::Relaxed);
                let mut wl = w.lock().await;
                let _ = wl.write_frame(Frame::close(1000, b"")).await;
                let _ = wl.flush().await;
            }
            Err(e) => {
                tally.error(e.kind());
                sh.live.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Churn: echo in a closed loop; when this client's number comes up in a
/// wave, vanish without a close, stay away for a random suspension, and
/// come back: resuming the session (unless `--no-resume`), so that every
/// message must still arrive exactly once and in order.
async fn churn(
    i: u32,
    ws: Ws,
    answer: Option<ResumeAnswer>,
    sh: &Shared,
    tally: &mut Tally,
) -> Result<(), End> {
    let waves = sh.waves.subscribe();
    let mut handled_wave = *waves.borrow();
    let mut token = answer.map(|a| a.token);
    let mut cont = payload::Continuity::default();
    let mut next: u64 = 0;
    let mut reconnect_started: Option<Instant> = None;
    let mut buf = Vec::with_capacity(sh.args.size);
    let (mut r, mut w) = split(ws);
    loop {
        // One connection's life.
        let vanish = loop {
            let stopping = sh.stop.is_cancelled();
            if stopping && cont.expected >= next {
                tally.lost += cont.lost();
                // End the session cleanly, so the gateway does not keep it
                // waiting for a resume.
                let mut wl = w.lock().await;
                let _ = wl.write_frame(Frame::close(1000, b"")).await;
                let _ = wl.flush().await;
                return Ok(());
            }
            let wave = *waves.borrow();
            if !stopping && wave != handled_wave {
                handled_wave = wave;
                if picked(i, wave, sh.args.churn_share) {
                    break true;
                }
            }
            while !stopping && next - cont.expected.min(next) < u64::from(sh.args.in_flight) {
                send(&w, i, next, sh.since_epoch(), sh, &mut buf).await?;
                next += 1;
            }
            let (msg, text) = match recv(&mut r, &w, sh.args.timeout).await {
                Ok(m) => m,
                Err(End::Timeout) if stopping => {
                    tally.lost += cont.lost() + next.saturating_sub(cont.expected);
                    return Err(End::Timeout);
                }
                Err(e) => return Err(e),
            };
            let stamp = payload::decode(&msg, text).ok_or(End::Corrupt)?;
            check(&msg, text, i, stamp.seq, sh)?;
            match cont.observe(stamp.seq) {
                payload::Seen::InOrder => {}
                payload::Seen::Ahead(_) => {}
                payload::Seen::Reordered => tally.reordered += 1,
                payload::Seen::Duplicate => {
                    tally.duplicated += 1;
                    continue;
                }
            }
            if let Some(t0) = reconnect_started.take() {
                let _ = tally.reconnect.record(stats::micros(t0.elapsed()));
            }
            tally.message(
                sh.since_epoch()
                    .saturating_sub(Duration::from_nanos(stamp.t_ns)),
                msg.len(),
            );
            sh.live.messages.fetch_add(1, Ordering::Relaxed);
        };
        debug_assert!(vanish);
        let suspend = {
            let (lo, hi) = (
                sh.args.suspend_min,
                sh.args.suspend_max.max(sh.args.suspend_min),
            );
            lo + (hi - lo).mul_f64(rand::rng().random_range(0.0..=1.0))
        };
        match sh.args.vanish {
            // The socket has zero linger: dropping it sends RST.
            Vanish::Rst => {
                drop((r, w));
                tokio::time::sleep(suspend).await;
            }
            // Go quiet with the socket still open, then reset it.
            Vanish::Silence => {
                tokio::time::sleep(suspend).await;
                drop((r, w));
            }
        }
        if sh.stop.is_cancelled() {
            tally.lost += cont.lost();
            return Ok(());
        }
        reconnect_started = Some(Instant::now());
        let ask = match &token {
            Some(t) => ResumeAsk::Resume(t.clone(), cont.expected),
            None => ResumeAsk::No,
        };
        let (ws, answer, resumed) = match open_resumable(i, sh, tally, true, &ask).await {
            Ok((ws, answer)) => (ws, answer, matches!(ask, ResumeAsk::Resume(..))),
            // Continuity lost (said explicitly): start over in a new session.
            Err(ErrorKind::ResumeRefused) => {
                tally.lost += cont.lost() + next.saturating_sub(cont.expected);
                let ask = if sh.args.no_resume {
                    ResumeAsk::No
                } else {
                    ResumeAsk::New
                };
                let (ws, answer) = open_resumable(i, sh, tally, true, &ask)
                    .await
                    .map_err(|_| End::Disconnected)?;
                (ws, answer, false)
            }
            Err(_) => return Err(End::Disconnected),
        };
        match answer {
            Some(a) => {
                if resumed {
                    tally.resumes += 1;
                    // Resend only what the gateway never got.
                    next = a.received;
                } else {
                    cont = payload::Continuity::default();
                    next = 0;
                }
                token = Some(a.token);
            }
            // A plain session: nothing carries over.
            None => {
                cont = payload::Continuity::default();
                next = 0;
            }
        }
        (r, w) = split(ws);
    }
}

/// Deterministic pick: client `i` vanishes in `wave` with probability `share`.
fn picked(i: u32, wave: u64, share: f64) -> bool {
    let mut x =
        u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ wave.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 29;
    (x % 10_000) < (share.clamp(0.0, 1.0) * 10_000.0) as u64
}

async fn churn_waves(sh: Arc<Shared>) {
    let mut tick = tokio::time::interval(sh.args.churn_every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => sh.waves.send_modify(|w| *w += 1),
            _ = sh.stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_picks_about_the_share() {
        let picked_n = (0..10_000).filter(|i| picked(*i, 3, 0.1)).count();
        assert!((900..1100).contains(&picked_n), "{picked_n}");
        // Different waves pick different clients.
        let a: Vec<u32> = (0..1000).filter(|i| picked(*i, 1, 0.1)).collect();
        let b: Vec<u32> = (0..1000).filter(|i| picked(*i, 2, 0.1)).collect();
        assert_ne!(a, b);
    }
}

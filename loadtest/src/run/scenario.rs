//! The scenarios: what each connection does once the measured period
//! starts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fastwebsockets::{Frame, OpCode, Payload};
use rand::Rng;
use tokio::sync::watch;

use super::conn::{ResumeAnswer, ResumeAsk, Ws};
use super::schedule::{self, Pacer};
use super::stats::{self, ErrorKind, Tally};
use super::wire::{check, recv, recv_or_pong, send, send_raw, split, End, Reader, SendCtx, Writer};
use super::{open, open_resumable, payload, Shared, Vanish};

/// Closed loop: keep `in_flight` messages outstanding; latency from the
/// actual send time. Returns the end and the reader/writer if still usable.
pub(super) async fn echo_closed(
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
pub(super) async fn echo_open(i: u32, ws: Ws, sh: &Shared, tally: &mut Tally) -> Result<(), End> {
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
    // Set once the writer has sent its last message: `sent` is final. (Not
    // `writer.is_finished()`: the server's pong can arrive before the
    // writer task is seen to have finished, and the reader would then
    // wait for a message that never comes.)
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (w, sent, stop) = (w.clone(), sent.clone(), sh.stop.clone());
        let done = done.clone();
        let ctx = SendCtx::of(sh);
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(ctx.size);
            loop {
                let due = tokio::select! {
                    d = due_rx.recv() => d,
                    _ = stop.cancelled() => None,
                };
                let Some(due) = due else {
                    done.store(true, Ordering::Release);
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
        if done.load(Ordering::Acquire) && expect >= sent.load(Ordering::Acquire) {
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

/// Push: verify increasing sequence numbers; latency from the backend's
/// wall-clock timestamp (same machine, same clock).
pub(super) async fn push(ws: Ws, sh: &Shared, tally: &mut Tally) -> Result<(), End> {
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
pub(super) async fn idle(i: u32, ws: Ws, sh: &Shared, tally: &mut Tally) -> Result<(), End> {
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
pub(super) async fn handshakes(i: u32, sh: &Shared, tally: &mut Tally) {
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
pub(super) async fn churn(
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
                // A fleet instance going away hands the session off: resume
                // at once. A connection lost without a close (an instance
                // killed, a reset) is what resume is for: resume too.
                Err(End::Closed(RESUME_NOW)) if token.is_some() && !stopping => {
                    tally.handoffs += 1;
                    break false;
                }
                Err(End::Disconnected) if token.is_some() && !stopping => {
                    tally.drops += 1;
                    break false;
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
        let suspend = if !vanish {
            Duration::ZERO
        } else {
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
        let (ws, answer, resumed) = match reopen(i, sh, tally, &ask).await {
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

/// The gateway's "resume now" close code (a fleet instance going away).
const RESUME_NOW: u16 = 4000;

/// How long a churning client keeps retrying a reconnect that fails for
/// any reason but 410 (503 from a draining instance or a busy fleet, a
/// refused connection while an instance restarts).
const RECONNECT_FOR: Duration = Duration::from_secs(30);

/// Opens (resumes) a churning client's next connection, retrying with
/// backoff what may pass (not a 410) for up to [`RECONNECT_FOR`].
async fn reopen(
    i: u32,
    sh: &Shared,
    tally: &mut Tally,
    ask: &ResumeAsk,
) -> Result<(Ws, Option<ResumeAnswer>), ErrorKind> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        match open_resumable(i, sh, tally, true, ask).await {
            Err(k) if k != ErrorKind::ResumeRefused && started.elapsed() < RECONNECT_FOR => {
                tally.retries += 1;
                let jitter = rand::rng().random_range(0.5..=1.0);
                tokio::time::sleep(pause.mul_f64(jitter)).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// Deterministic pick: client `i` vanishes in `wave` with probability `share`.
pub(super) fn picked(i: u32, wave: u64, share: f64) -> bool {
    let mut x =
        u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ wave.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 29;
    (x % 10_000) < (share.clamp(0.0, 1.0) * 10_000.0) as u64
}

pub(super) async fn churn_waves(sh: Arc<Shared>) {
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

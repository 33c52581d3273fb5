//! The backend link pool: `links_per_endpoint` links to each endpoint, each
//! kept up by its own supervisor task (connect, handshake, run, reconnect
//! with exponential backoff and jitter), and placement of new sessions on
//! the least-loaded link that is up.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use protocol::{pb, SessionId};

use super::handshake::{handshake, Handshaken};
use super::{LinkDriver, LinkError, LinkHandle, LinkSettings};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// All links to the backend.
///
/// # Concurrency
/// Each slot's `current` is written only by that slot's supervisor (when a
/// link comes up or goes down) and read by upgrades choosing a link: one
/// short lock per new session, never per message.
pub(crate) struct Pool {
    slots: Vec<Arc<Slot>>,
    next_session: AtomicU64,
    /// Keys the permutation that turns the counter into session ids.
    id_key: u64,
    stable_after: Duration,
    move_timeout: Duration,
}

struct Slot {
    endpoint: String,
    index: u32,
    current: Mutex<Option<LinkHandle>>,
    /// The supervisor's failure count (links that broke before they were
    /// stable, failed connects): among links not yet stable, placement
    /// prefers the fewest.
    failures: AtomicU32,
}

/// A session's claim on a link; counts towards the link's load until dropped.
pub(crate) struct Lease {
    handle: LinkHandle,
}

impl Lease {
    /// The link.
    pub(crate) fn link(&self) -> &LinkHandle {
        &self.handle
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.handle.remove_load();
    }
}

/// Pool-wide settings.
#[derive(Debug)]
pub(crate) struct PoolSettings {
    pub(crate) endpoints: Vec<String>,
    pub(crate) links_per_endpoint: usize,
    /// What every link's `Hello` says, but for its `link_index`.
    pub(crate) hello: pb::Hello,
    pub(crate) connect_timeout: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    /// A link up this long is stable (backoff reset, preferred for new
    /// sessions).
    pub(crate) stable_after: Duration,
    /// How long a session whose link was lost waits for another link.
    pub(crate) move_timeout: Duration,
    pub(crate) link: LinkSettings,
}

impl Pool {
    /// Starts one supervisor per link; they stop when the shutdown reaches
    /// the links.
    pub(crate) fn start(
        settings: PoolSettings,
        metrics: Arc<Metrics>,
        shutdown: &Shutdown,
    ) -> Arc<Self> {
        let mut slots = Vec::new();
        for endpoint in &settings.endpoints {
            for _ in 0..settings.links_per_endpoint {
                let index = u32::try_from(slots.len()).unwrap_or(u32::MAX);
                slots.push(Arc::new(Slot {
                    endpoint: endpoint.clone(),
                    index,
                    current: Mutex::new(None),
                    failures: AtomicU32::new(0),
                }));
            }
        }
        let settings = Arc::new(settings);
        for slot in &slots {
            let span = tracing::info_span!("link", endpoint = %slot.endpoint, index = slot.index);
            let task = supervise(
                slot.clone(),
                settings.clone(),
                metrics.clone(),
                shutdown.links_stop(),
            );
            shutdown.spawn_link(task.instrument(span));
        }
        Arc::new(Self {
            slots,
            next_session: AtomicU64::new(1),
            id_key: rand::random(),
            stable_after: settings.stable_after,
            move_timeout: settings.move_timeout,
        })
    }

    /// Places a new session on the least-loaded stable link that is up;
    /// when none is stable yet (at start, or after every backend
    /// restarted), on one whose supervisor saw the fewest failures, then
    /// the least loaded. A link that has just come back may be an endpoint
    /// that flaps, and a session placed there would end with 1012 when it
    /// breaks again.
    pub(crate) fn lease(&self) -> Option<Lease> {
        self.lease_where(|_| true)
    }

    /// Places a session whose link was lost on another link that can take
    /// it (one whose backend adopted "move"), by the same preferences.
    pub(crate) fn lease_for_move(&self) -> Option<Lease> {
        self.lease_where(|l| l.caps().moves)
    }

    /// How long a session whose link was lost waits for another
    /// (`backend.move_timeout`).
    pub(crate) fn move_timeout(&self) -> Duration {
        self.move_timeout
    }

    fn lease_where(&self, usable: impl Fn(&LinkHandle) -> bool) -> Option<Lease> {
        let stable_after = self.stable_after;
        let (_, best) = self
            .slots
            .iter()
            .filter_map(|s| {
                let link = s.current.lock().ok().and_then(|c| c.clone())?;
                let failures = s.failures.load(Ordering::Relaxed);
                Some((failures, link))
            })
            .filter(|(_, l)| l.is_up() && usable(l))
            .min_by_key(|(failures, l)| {
                let stable = l.has_been_up_for(stable_after);
                (!stable, if stable { 0 } else { *failures }, l.load())
            })?;
        best.add_load();
        Some(Lease { handle: best })
    }

    /// A fresh session id: never reused in this process, and unique
    /// across processes with overwhelming probability (see
    /// [`session_id_of`]).
    pub(crate) fn next_session_id(&self) -> SessionId {
        loop {
            let n = self.next_session.fetch_add(1, Ordering::Relaxed);
            let id = session_id_of(n, self.id_key);
            if id != 0 {
                return SessionId(id);
            }
        }
    }

    /// Links currently up.
    pub(crate) fn links_up(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| {
                s.current
                    .lock()
                    .ok()
                    .is_some_and(|c| c.as_ref().is_some_and(LinkHandle::is_up))
            })
            .count()
    }

    /// Links configured.
    pub(crate) fn links_total(&self) -> usize {
        self.slots.len()
    }
}

async fn supervise(
    slot: Arc<Slot>,
    s: Arc<PoolSettings>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        let attempt = connect(&slot, &s);
        let result = tokio::select! {
            r = attempt => r,
            _ = shutdown.cancelled() => return,
        };
        match result {
            Ok((stream, hs)) => {
                metrics.link_connect(&slot.endpoint, true);
                let (handle, queues) = LinkHandle::new(slot.index, hs.version, hs.caps, &s.link);
                set_current(&slot, Some(handle.clone()));
                metrics.link_up(&slot.endpoint, 1);
                info!(
                    backend_id = hs.backend_id,
                    version = hs.version,
                    flow = hs.caps.flow,
                    moves = hs.caps.moves,
                    fleet = hs.caps.fleet,
                    backend_window = hs.caps.backend_window,
                    "link up"
                );
                let driver = LinkDriver {
                    stream,
                    leftover: hs.leftover,
                    queues,
                    settings: s.link.clone(),
                    metrics: metrics.clone(),
                    handle,
                    endpoint: slot.endpoint.to_string(),
                };
                let up = tokio::time::Instant::now();
                let moves = hs.caps.moves;
                let end = driver.run(shutdown.clone()).await;
                failures = after_link(failures, up.elapsed(), s.stable_after);
                slot.failures.store(failures, Ordering::Relaxed);
                set_current(&slot, None);
                metrics.link_up(&slot.endpoint, -1);
                if matches!(end, LinkError::Shutdown) {
                    info!("link closed for shutdown");
                    return;
                }
                if moves {
                    warn!(error = %end, "link down; its sessions move to another link (protocol v3 \"move\")");
                } else {
                    warn!(error = %end, "link down; sessions on it are closed with 1012");
                }
            }
            Err(e) => {
                metrics.link_connect(&slot.endpoint, false);
                // A backend that does not speak the protocol as configured
                // will not heal by retrying: every attempt says so.
                if let LinkError::Handshake(h) = &e {
                    metrics.link_handshake_failed(&slot.endpoint, h.label());
                    error!(error = %h, "backend handshake failed; retrying with backoff");
                } else if failures == 0 {
                    // The first failure after a good run is worth a
                    // warning; repeated ones during an outage are not news.
                    warn!(error = %e, "link connect failed; retrying with backoff");
                } else {
                    tracing::debug!(error = %e, failures, "link connect failed again");
                }
                failures = failures.saturating_add(1);
                slot.failures.store(failures, Ordering::Relaxed);
            }
        }
        let delay = backoff(failures, s.reconnect_min, s.reconnect_max);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn connect(slot: &Slot, s: &PoolSettings) -> Result<(TcpStream, Handshaken), LinkError> {
    let mut stream = tokio::time::timeout(s.connect_timeout, TcpStream::connect(&slot.endpoint))
        .await
        .map_err(|_| {
            LinkError::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", s.connect_timeout),
            ))
        })?
        .map_err(LinkError::Connect)?;
    // Nagle would hold small frames back waiting for ACKs; the writer
    // batches by itself.
    let _ = stream.set_nodelay(true);
    let hello = pb::Hello {
        link_index: slot.index,
        ..s.hello.clone()
    };
    let hs = handshake(&mut stream, &s.link.codec, &hello, s.handshake_timeout).await?;
    Ok((stream, hs))
}

fn set_current(slot: &Slot, handle: Option<LinkHandle>) {
    if let Ok(mut c) = slot.current.lock() {
        *c = handle;
    }
}

/// The `n`th session id of a process whose key is `key`: a keyed
/// permutation of the 63-bit numbers (xor with the key, then invertible
/// multiply-xorshift rounds, all modulo 2^63). Being a permutation, a
/// process never repeats an id (it would take 2^63 sessions); keyed by a
/// random number, two processes' ids look independent, so among a million
/// sessions open at once across a fleet a collision has a probability near
/// 10^-7. 63 bits: the id fits a signed 64-bit integer (Java `long`,
/// SQL `bigint`). 0 is skipped by the caller.
pub(crate) fn session_id_of(n: u64, key: u64) -> u64 {
    const MASK: u64 = (1 << 63) - 1;
    let mut x = (n ^ key) & MASK;
    for m in [0x9E37_79B9_7F4A_7C15_u64, 0xBF58_476D_1CE4_E5B9] {
        x ^= x >> 29;
        x = x.wrapping_mul(m | 1) & MASK;
    }
    x ^ (x >> 32)
}

/// The failure count after a link that was up for `up_for` went down: a
/// stable link starts the backoff again; one that broke sooner counts as
/// one more failure, so an endpoint that flaps keeps backing off.
fn after_link(failures: u32, up_for: Duration, stable_after: Duration) -> u32 {
    if up_for >= stable_after {
        0
    } else {
        failures.saturating_add(1)
    }
}

/// Delay before reconnect attempt number `failures` (0 = right after a
/// stable link went down): doubling from `min`, capped at `max`, with "equal
/// jitter" (between half and all of it) so that many gateways restarting
/// together do not reconnect in lockstep.
pub(crate) fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let exp = min.saturating_mul(1u32 << failures.min(20));
    let capped = exp.min(max);
    let half = capped / 2;
    let jitter = rand::rng().random_range(0.0..=1.0);
    half + half.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn session_ids_never_repeat_within_a_process_and_differ_between_processes() {
        let (a, b) = (rand::random::<u64>(), rand::random::<u64>());
        let mut seen = std::collections::HashSet::new();
        for n in 1..200_000u64 {
            let id = session_id_of(n, a);
            assert!(id < 1 << 63, "id {id} does not fit 63 bits");
            assert!(seen.insert(id), "id {id} repeated at {n}");
        }
        // Another process (another key) shares almost none of them.
        let shared = (1..200_000u64)
            .filter(|&n| seen.contains(&session_id_of(n, b)))
            .count();
        assert!(shared < 3, "{shared} ids shared between two processes");
    }

    #[test]
    fn only_a_stable_link_resets_the_backoff() {
        let stable = Duration::from_secs(30);
        assert_eq!(after_link(5, Duration::from_secs(30), stable), 0);
        assert_eq!(after_link(5, Duration::from_secs(29), stable), 6);
        assert_eq!(after_link(0, Duration::from_millis(300), stable), 1);
        assert_eq!(after_link(u32::MAX, Duration::ZERO, stable), u32::MAX);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        let ms = |d: Duration| d.as_millis() as u64;
        let (mut d0, mut d3, mut d30) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..200 {
            d0.push(ms(backoff(0, min, max)));
            d3.push(ms(backoff(3, min, max)));
            d30.push(ms(backoff(30, min, max)));
        }
        // Each delay lies in [half, all] of the doubled, capped value...
        for (samples, lo, hi) in [(&d0, 50, 100), (&d3, 400, 800), (&d30, 5000, 10_000)] {
            for d in samples.iter() {
                assert!((lo..=hi).contains(d), "{d} ms not in {lo}..={hi}");
            }
            // ...and is spread over it: jitter, not one fixed point. 200
            // uniform samples all in one quarter of the range would happen
            // with probability 4 * 0.25^200.
            let (min_seen, max_seen) = (samples.iter().min(), samples.iter().max());
            let spread = max_seen.unwrap() - min_seen.unwrap();
            assert!(
                spread > (hi - lo) / 4,
                "delays barely vary: {min_seen:?}..{max_seen:?}"
            );
        }
    }
}

//! Log lines that cannot drown an operator: an event that can repeat once
//! per client or per session (a refused handshake, a session closed by a
//! lost link that held 19,000 of them) logs through [`limited!`], which
//! lets [`BURST`] lines from one call site through per [`WINDOW`] and
//! counts the rest. The count comes out as one summary line at the same
//! level once the window is over: when the call site is next reached, or
//! from [`summarise`], which the gateway runs every [`WINDOW`], so a burst
//! that stops is still summarised.
//!
//! The metrics count every event regardless; the logs say what kind of
//! thing happened and how often. A summary line has the call site's level
//! and module (its target), so it passes the same filters as the lines it
//! counts; `site` names the file and line. It comes at most two windows
//! after the burst began.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines let through per call site per window.
pub(crate) const BURST: u32 = 10;

/// The window.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);

/// Logs like `tracing`'s macro of the same level name, at most [`BURST`]
/// lines per [`WINDOW`] from this call site; see the module's text.
macro_rules! limited {
    ($level:ident, $($arg:tt)+) => {{
        // The summary is logged from here, so that it has the call site's
        // module as its target and passes the same filters as the lines.
        fn summary(suppressed: u64) {
            tracing::$level!(
                site = concat!(file!(), ":", line!()),
                suppressed,
                window_s = $crate::logs::WINDOW.as_secs(),
                "similar log lines suppressed (the metrics count every event)"
            );
        }
        static LIMIT: $crate::logs::Limit = $crate::logs::Limit::new(summary);
        if tracing::enabled!($crate::logs::level!($level)) && LIMIT.admit() {
            tracing::$level!($($arg)+);
        }
    }};
}
pub(crate) use limited;

/// The `tracing::Level` of a macro name.
macro_rules! level {
    (error) => {
        tracing::Level::ERROR
    };
    (warn) => {
        tracing::Level::WARN
    };
    (info) => {
        tracing::Level::INFO
    };
    (debug) => {
        tracing::Level::DEBUG
    };
    (trace) => {
        tracing::Level::TRACE
    };
}
pub(crate) use level;

/// One call site's budget.
pub(crate) struct Limit {
    /// Logs the summary line, at the call site's level and target.
    summary: fn(u64),
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// When the current window began; `None` before the first event.
    since: Option<Instant>,
    /// Lines let through in it.
    logged: u32,
    /// Events not logged in it.
    suppressed: u64,
    /// Whether [`summarise`] knows this site.
    registered: bool,
}

/// Every call site that has suppressed something, for [`summarise`].
static SITES: Mutex<Vec<&'static Limit>> = Mutex::new(Vec::new());

impl Limit {
    /// A call site's budget (made by [`limited!`]).
    pub(crate) const fn new(summary: fn(u64)) -> Self {
        Self {
            summary,
            state: Mutex::new(State {
                since: None,
                logged: 0,
                suppressed: 0,
                registered: false,
            }),
        }
    }

    /// Whether this event may be logged; if not, it is counted.
    pub(crate) fn admit(&'static self) -> bool {
        let now = Instant::now();
        let (admit, summary, register) = {
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let summary = s.roll(now);
            let admit = if s.logged < BURST {
                s.logged += 1;
                true
            } else {
                s.suppressed += 1;
                false
            };
            let register = !admit && !s.registered;
            if register {
                s.registered = true;
            }
            (admit, summary, register)
        };
        if register {
            SITES
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(self);
        }
        if let Some(n) = summary {
            (self.summary)(n);
        }
        admit
    }

    /// The summary of a window that is over (or of any window, with
    /// `now_anyway`), if it suppressed anything.
    fn due(&self, now: Instant, now_anyway: bool) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let over = now_anyway || s.since.is_some_and(|t| now.duration_since(t) >= WINDOW);
        if over && s.suppressed > 0 {
            let n = s.suppressed;
            s.suppressed = 0;
            s.logged = 0;
            s.since = Some(now);
            return Some(n);
        }
        None
    }
}

impl State {
    /// Starts a new window if the current one is over; returns what the
    /// old one suppressed, if anything.
    fn roll(&mut self, now: Instant) -> Option<u64> {
        match self.since {
            Some(t) if now.duration_since(t) < WINDOW => None,
            _ => {
                self.since = Some(now);
                self.logged = 0;
                let n = std::mem::take(&mut self.suppressed);
                (n > 0).then_some(n)
            }
        }
    }
}

/// Logs the summary of every window that is over and suppressed lines
/// (of every window, with `now_anyway`: at exit).
pub(crate) fn summarise(now_anyway: bool) {
    let now = Instant::now();
    let sites: Vec<&'static Limit> = SITES.lock().unwrap_or_else(PoisonError::into_inner).clone();
    for site in sites {
        if let Some(n) = site.due(now, now_anyway) {
            (site.summary)(n);
        }
    }
}

/// Runs [`summarise`] every [`WINDOW`] until `stop`.
pub(crate) async fn summarise_until(stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(WINDOW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => summarise(false),
            // The last lines before the exit (a drain, a lost link) are
            // counted too.
            () = stop.cancelled() => {
                summarise(true);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_and_counted_then_the_next_window_summarises_it() {
        let mut s = State::default();
        let t0 = Instant::now();
        assert_eq!(s.roll(t0), None);
        s.logged = BURST;
        s.suppressed = 9_990;
        assert_eq!(s.roll(t0 + Duration::from_secs(1)), None);
        assert_eq!(s.roll(t0 + WINDOW), Some(9_990));
        assert_eq!(s.logged, 0);
        assert_eq!(s.roll(t0 + WINDOW * 2), None);
    }
}

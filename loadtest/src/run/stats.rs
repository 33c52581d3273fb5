//! Counting: latency histograms, errors by kind, and the summary.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Error kinds, as they appear in the summary's `errors` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// TCP connect failed.
    Connect,
    /// TLS handshake failed.
    Tls,
    /// WebSocket upgrade refused or malformed.
    Handshake,
    /// The server closed the connection (close frame) unexpectedly.
    CloseCode,
    /// The connection ended without a close frame.
    Disconnected,
    /// A message was not answered in time.
    Timeout,
    /// A message had the wrong session, order or bytes.
    Corrupt,
    /// A resume was refused (HTTP 410): continuity was lost.
    ResumeRefused,
}

/// One worker's (or the run's) counts.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Message latency, microseconds.
    pub latency: Histogram<u64>,
    /// Connect time (TCP + TLS + upgrade), microseconds.
    pub connect: Histogram<u64>,
    /// Messages received and verified.
    pub messages: u64,
    /// Payload bytes received and verified.
    pub bytes: u64,
    /// Connections that completed the upgrade.
    pub connections_ok: u64,
    /// Errors by kind.
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Close codes received unexpectedly, by code.
    pub close_codes: BTreeMap<u16, u64>,
    /// Churn: time from starting to reconnect to the first answered message.
    pub reconnect: Histogram<u64>,
    /// Churn with resume: messages never received.
    pub lost: u64,
    /// Churn with resume: messages received twice.
    pub duplicated: u64,
    /// Churn with resume: messages received after a later one.
    pub reordered: u64,
    /// Churn with resume: successful resumes.
    pub resumes: u64,
    /// Churn: connections the gateway handed off with 4000 ("resume now":
    /// a fleet instance going away), each resumed at once.
    pub handoffs: u64,
    /// Churn: connections lost without a close (not by the client's own
    /// choice), each resumed.
    pub drops: u64,
    /// Churn: reconnect attempts that failed and were retried (503, a
    /// refused connection).
    pub retries: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Self::new()
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes at 3 significant digits; cannot fail for these
    // bounds.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

impl Tally {
    /// Empty counts.
    pub fn new() -> Self {
        Self {
            latency: histogram(),
            connect: histogram(),
            messages: 0,
            bytes: 0,
            connections_ok: 0,
            errors: BTreeMap::new(),
            close_codes: BTreeMap::new(),
            reconnect: histogram(),
            lost: 0,
            duplicated: 0,
            reordered: 0,
            resumes: 0,
            handoffs: 0,
            drops: 0,
            retries: 0,
        }
    }

    /// Records one verified message.
    pub fn message(&mut self, latency: Duration, bytes: usize) {
        self.messages += 1;
        self.bytes += bytes as u64;
        let _ = self.latency.record(micros(latency));
    }

    /// Records an error.
    pub fn error(&mut self, kind: ErrorKind) {
        *self.errors.entry(kind).or_default() += 1;
    }

    /// Adds another tally into this one.
    pub fn merge(&mut self, other: &Tally) {
        let _ = self.latency.add(&other.latency);
        let _ = self.connect.add(&other.connect);
        let _ = self.reconnect.add(&other.reconnect);
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.connections_ok += other.connections_ok;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.resumes += other.resumes;
        self.handoffs += other.handoffs;
        self.drops += other.drops;
        self.retries += other.retries;
        for (k, v) in &other.errors {
            *self.errors.entry(*k).or_default() += v;
        }
        for (k, v) in &other.close_codes {
            *self.close_codes.entry(*k).or_default() += v;
        }
    }
}

/// Clamps a duration into the histogram's range, in microseconds.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, 600_000_000)
}

/// Keys every `--json` summary has (documented in the README; stable).
pub const SUMMARY_KEYS: [&str; 13] = [
    "connections_ok",
    "connect_failed",
    "messages",
    "msgs_per_s",
    "p50_us",
    "p90_us",
    "p99_us",
    "p999_us",
    "max_us",
    "connect_p50_us",
    "connect_p99_us",
    "errors",
    "corrupt",
];

/// The `--json` summary. Key names are stable.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Target URL.
    pub url: String,
    /// Connections that completed the upgrade (reconnections included).
    pub connections_ok: u64,
    /// Connection attempts that failed.
    pub connect_failed: u64,
    /// Messages received and verified.
    pub messages: u64,
    /// Verified messages per second over the measured period.
    pub msgs_per_s: f64,
    /// Verified payload megabytes (10^6) per second.
    pub mb_per_s: f64,
    /// Latency percentiles, µs.
    pub p50_us: u64,
    /// 90th percentile latency, µs.
    pub p90_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// 99.9th percentile latency, µs.
    pub p999_us: u64,
    /// Largest latency, µs.
    pub max_us: u64,
    /// Median connect time (TCP + TLS + upgrade), µs.
    pub connect_p50_us: u64,
    /// 99th percentile connect time, µs.
    pub connect_p99_us: u64,
    /// Errors by kind (every kind present, zero or not).
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Messages with the wrong session, order or bytes.
    pub corrupt: u64,
    /// Unexpected close codes received, by code.
    pub close_codes: BTreeMap<u16, u64>,
    /// Measured period, seconds.
    pub duration_s: f64,
    /// Churn: reconnections that answered a message.
    pub reconnects: u64,
    /// Churn: median time from reconnect start to first answered message, µs.
    pub reconnect_p50_us: u64,
    /// Churn: 99th percentile of the same, µs.
    pub reconnect_p99_us: u64,
    /// Churn with resume: successful resumes.
    pub resumes: u64,
    /// Churn with resume: messages never received.
    pub lost: u64,
    /// Churn with resume: messages received twice.
    pub duplicated: u64,
    /// Churn with resume: messages received after a later one.
    pub reordered: u64,
    /// Churn: connections handed off with 4000 (a fleet instance going
    /// away) and resumed at once.
    pub handoffs: u64,
    /// Churn: connections lost without a close that the client did not
    /// choose (an instance killed), then resumed.
    pub drops: u64,
    /// Churn: reconnect attempts that failed (503, refused) and were
    /// retried.
    pub retries: u64,
    /// Churn: resumes refused with 410 (continuity lost; a new session
    /// started).
    pub resumes_refused: u64,
}

impl Summary {
    /// Summarises `t` over `elapsed`.
    pub fn new(scenario: &str, url: &str, t: &Tally, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let mut errors = BTreeMap::new();
        for k in [
            ErrorKind::Connect,
            ErrorKind::Tls,
            ErrorKind::Handshake,
            ErrorKind::CloseCode,
            ErrorKind::Disconnected,
            ErrorKind::Timeout,
            ErrorKind::Corrupt,
            ErrorKind::ResumeRefused,
        ] {
            errors.insert(k, t.errors.get(&k).copied().unwrap_or(0));
        }
        let q = |h: &Histogram<u64>, p: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(p)
            }
        };
        let connect_failed =
            errors[&ErrorKind::Connect] + errors[&ErrorKind::Tls] + errors[&ErrorKind::Handshake];
        Self {
            scenario: scenario.to_owned(),
            url: url.to_owned(),
            connections_ok: t.connections_ok,
            connect_failed,
            messages: t.messages,
            msgs_per_s: t.messages as f64 / secs,
            mb_per_s: t.bytes as f64 / secs / 1e6,
            p50_us: q(&t.latency, 0.5),
            p90_us: q(&t.latency, 0.9),
            p99_us: q(&t.latency, 0.99),
            p999_us: q(&t.latency, 0.999),
            max_us: if t.latency.is_empty() {
                0
            } else {
                t.latency.max()
            },
            connect_p50_us: q(&t.connect, 0.5),
            connect_p99_us: q(&t.connect, 0.99),
            corrupt: errors[&ErrorKind::Corrupt],
            errors,
            close_codes: t.close_codes.clone(),
            duration_s: secs,
            reconnects: t.reconnect.len(),
            reconnect_p50_us: q(&t.reconnect, 0.5),
            reconnect_p99_us: q(&t.reconnect, 0.99),
            resumes: t.resumes,
            lost: t.lost,
            duplicated: t.duplicated,
            reordered: t.reordered,
            handoffs: t.handoffs,
            drops: t.drops,
            retries: t.retries,
            resumes_refused: t
                .errors
                .get(&ErrorKind::ResumeRefused)
                .copied()
                .unwrap_or(0),
        }
    }

    /// A table for people.
    pub fn table(&self) -> String {
        let errors: Vec<String> = self
            .errors
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| {
                format!(
                    "{}={v}",
                    serde_json::to_value(k)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                )
            })
            .collect();
        let mut s = String::new();
        s.push_str(&format!(
            "scenario        {} against {}\n",
            self.scenario, self.url
        ));
        s.push_str(&format!(
            "connections     {} ok, {} failed\n",
            self.connections_ok, self.connect_failed
        ));
        s.push_str(&format!(
            "messages        {} in {:.1} s = {:.0} msg/s, {:.1} MB/s\n",
            self.messages, self.duration_s, self.msgs_per_s, self.mb_per_s
        ));
        s.push_str(&format!(
            "latency µs      p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
            self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us
        ));
        s.push_str(&format!(
            "connect µs      p50 {}  p99 {}\n",
            self.connect_p50_us, self.connect_p99_us
        ));
        if self.reconnects > 0 {
            s.push_str(&format!(
                "reconnect µs    p50 {}  p99 {}  ({} reconnections, {} resumed)\n",
                self.reconnect_p50_us, self.reconnect_p99_us, self.reconnects, self.resumes
            ));
            s.push_str(&format!(
                "continuity      lost {}  duplicated {}  reordered {}\n",
                self.lost, self.duplicated, self.reordered
            ));
            s.push_str(&format!(
                "fleet           handed off {}  dropped {}  retried {}  refused (410) {}\n",
                self.handoffs, self.drops, self.retries, self.resumes_refused
            ));
        }
        s.push_str(&format!(
            "errors          {}\n",
            if errors.is_empty() {
                "none".to_owned()
            } else {
                errors.join(" ")
            }
        ));
        if !self.close_codes.is_empty() {
            s.push_str(&format!("close codes     {:?}\n", self.close_codes));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn percentiles_and_rates() {
        let mut t = Tally::new();
        for i in 1..=1000u64 {
            t.message(Duration::from_micros(i), 64);
        }
        t.error(ErrorKind::Timeout);
        let s = Summary::new("echo", "ws://x", &t, Duration::from_secs(2));
        assert_eq!(s.messages, 1000);
        assert!((s.msgs_per_s - 500.0).abs() < 1e-9);
        assert!((s.p50_us as i64 - 500).abs() <= 1, "{}", s.p50_us);
        assert!((s.p99_us as i64 - 990).abs() <= 1, "{}", s.p99_us);
        assert_eq!(s.max_us, 1000);
        assert_eq!(s.errors[&ErrorKind::Timeout], 1);
        assert_eq!(s.errors[&ErrorKind::Corrupt], 0);
        let json = serde_json::to_value(&s).unwrap();
        for key in SUMMARY_KEYS {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["errors"]["timeout"], 1);
    }

    #[test]
    fn merge_adds_everything() {
        let mut a = Tally::new();
        let mut b = Tally::new();
        a.message(Duration::from_micros(10), 1);
        b.message(Duration::from_micros(20), 2);
        b.error(ErrorKind::Corrupt);
        b.connections_ok = 3;
        a.merge(&b);
        assert_eq!(a.messages, 2);
        assert_eq!(a.bytes, 3);
        assert_eq!(a.connections_ok, 3);
        assert_eq!(a.errors[&ErrorKind::Corrupt], 1);
        assert_eq!(a.latency.len(), 2);
    }
}

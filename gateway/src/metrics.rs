//! Instruments, created through the OpenTelemetry metrics API and exported
//! in Prometheus text format on the admin listener (and over OTLP when
//! configured; see `telemetry.rs`).
//!
//! Per-message counts are added once per link read or write batch, not per
//! message, to keep the data path cheap. The relay-time histogram takes
//! one observation per message, with one of two fixed attribute sets.

use std::time::Duration;

use opentelemetry::metrics::{Counter, Gauge, Histogram, MeterProvider, UpDownCounter};
use opentelemetry::KeyValue;
use prometheus::{Encoder, TextEncoder};

use crate::telemetry::{build, Telemetry};

use crate::close::CloseReason;
use crate::refusal::{Refusal, ResumeRefusal};

/// The gateway's instruments and the registry they are exported through.
pub(crate) struct Metrics {
    registry: prometheus::Registry,
    relay_duration: Histogram<f64>,
    handshake_duration: Histogram<f64>,
    session_duration: Histogram<f64>,
    heartbeat_rtt: Histogram<f64>,
    queue_depth: Histogram<u64>,
    _build_info: Gauge<u64>,
    sessions_open: UpDownCounter<i64>,
    sessions_closed: Counter<u64>,
    sessions_refused: Counter<u64>,
    slow_consumer_closes: Counter<u64>,
    messages: Counter<u64>,
    bytes: Counter<u64>,
    links_up: UpDownCounter<i64>,
    link_connects: Counter<u64>,
    link_handshake_failures: Counter<u64>,
    link_writes: Counter<u64>,
    link_frames_written: Counter<u64>,
    late_frames: Counter<u64>,
    window_stalls: Counter<u64>,
    sessions_moved: Counter<u64>,
    handovers: Counter<u64>,
    fleet_connected: UpDownCounter<i64>,
    frames_resent: Counter<u64>,
    resumes: Counter<u64>,
    resumes_refused: Counter<u64>,
    replayed: Counter<u64>,
    detached: UpDownCounter<i64>,
    tls_handshakes: Counter<u64>,
    tls_handshakes_active: UpDownCounter<i64>,
    tls_handshakes_waiting: UpDownCounter<i64>,
    tls_reloads: Counter<u64>,
    to_backend: [KeyValue; 1],
    to_client: [KeyValue; 1],
    phases: [[KeyValue; 1]; 3],
    toward_client: [KeyValue; 1],
    toward_link: [KeyValue; 1],
}

/// An instant in eight bytes (nanoseconds since the first one taken), for
/// timestamps that travel with every queued message: a `tokio` `Instant`
/// takes sixteen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Stamp(std::num::NonZeroU64);

static EPOCH: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

impl Stamp {
    /// Now.
    pub(crate) fn now() -> Self {
        Self::of(tokio::time::Instant::now())
    }

    /// The stamp of `at`.
    pub(crate) fn of(at: tokio::time::Instant) -> Self {
        // One more than the nanoseconds, so that `Option<Stamp>` is eight
        // bytes too.
        let nanos = at.into_std().saturating_duration_since(*EPOCH).as_nanos();
        let n = u64::try_from(nanos)
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        Self(std::num::NonZeroU64::new(n).unwrap_or(std::num::NonZeroU64::MAX))
    }

    /// Time from this stamp to `later`.
    pub(crate) fn until(self, later: Self) -> Duration {
        Duration::from_nanos(later.0.get().saturating_sub(self.0.get()))
    }
}

/// Bucket bounds, in seconds, of the relay and handshake histograms: 50 µs
/// to 10 s.
const FAST_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Bucket bounds, in seconds, of the session duration: 1 s to a day.
const SESSION_BUCKETS: [f64; 11] = [
    1.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1_800.0, 3_600.0, 14_400.0, 43_200.0, 86_400.0,
];

/// Bucket bounds of the queue depths, in messages.
const DEPTH_BUCKETS: [f64; 11] = [
    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1_024.0,
];

/// A handshake phase: accept to TLS done, TLS done (or accept, for ws) to
/// the 101, and accept to the 101.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Phase {
    Tls = 0,
    Upgrade = 1,
    Total = 2,
}

impl Metrics {
    /// Creates the instruments on the telemetry's meter provider.
    pub(crate) fn new(telemetry: &Telemetry) -> Self {
        let meter = telemetry.meters.meter("gateway");
        let build_info = meter
            .u64_gauge("gateway.build.info")
            .with_description("Always 1; the attributes say what the running binary was built from")
            .build();
        build_info.record(
            1,
            &[
                KeyValue::new("version", build::VERSION),
                KeyValue::new("commit", build::COMMIT),
                KeyValue::new("rustc", build::RUSTC),
                KeyValue::new("target", build::TARGET),
                KeyValue::new("profile", build::PROFILE),
            ],
        );
        Self {
            relay_duration: meter
                .f64_histogram("gateway.relay.duration")
                .with_unit("s")
                .with_description(
                    "Time a message spends in the gateway, by direction: client_to_backend \
                     from the client's frame read to its write on the backend link; \
                     backend_to_client from the link read to the flush to the client",
                )
                .with_boundaries(FAST_BUCKETS.to_vec())
                .build(),
            handshake_duration: meter
                .f64_histogram("gateway.handshake.duration")
                .with_unit("s")
                .with_description(
                    "Client handshakes, by phase: tls (accept to TLS done, every completed \
                     TLS handshake), upgrade (TLS done, or accept for ws, to the 101) and total \
                     (accept to the 101), both for new sessions",
                )
                .with_boundaries(FAST_BUCKETS.to_vec())
                .build(),
            session_duration: meter
                .f64_histogram("gateway.session.duration")
                .with_unit("s")
                .with_description(
                    "Sessions ended on this instance, from their start (on this instance) \
                     to their end, detached time included",
                )
                .with_boundaries(SESSION_BUCKETS.to_vec())
                .build(),
            heartbeat_rtt: meter
                .f64_histogram("gateway.link.heartbeat.rtt")
                .with_unit("s")
                .with_description("Backend link heartbeat round trips, by endpoint")
                .with_boundaries(FAST_BUCKETS.to_vec())
                .build(),
            queue_depth: meter
                .u64_histogram("gateway.queue.depth")
                .with_unit("{message}")
                .with_description(
                    "Messages queued, by toward: client (a session's backend messages \
                     waiting, seen at each write to its client), link (frames waiting on a \
                     backend link, seen at each write to it)",
                )
                .with_boundaries(DEPTH_BUCKETS.to_vec())
                .build(),
            _build_info: build_info,
            sessions_open: meter
                .i64_up_down_counter("gateway.sessions.open")
                .with_description("Sessions currently open")
                .build(),
            sessions_closed: meter
                .u64_counter("gateway.sessions.closed")
                .with_description("Sessions ended, by reason")
                .build(),
            sessions_refused: meter
                .u64_counter("gateway.sessions.refused")
                .with_description("Upgrade requests refused before a session began, by reason")
                .build(),
            slow_consumer_closes: meter
                .u64_counter("gateway.slow_consumer.closes")
                .with_description("Clients closed because their outbound queue overflowed")
                .build(),
            messages: meter
                .u64_counter("gateway.messages")
                .with_description("WebSocket messages relayed, by direction")
                .build(),
            bytes: meter
                .u64_counter("gateway.message.bytes")
                .with_description("Payload bytes relayed, by direction")
                .build(),
            links_up: meter
                .i64_up_down_counter("gateway.links.up")
                .with_description("Backend links currently up, by endpoint")
                .build(),
            link_connects: meter
                .u64_counter("gateway.link.connects")
                .with_description("Backend link connection attempts, by endpoint and result")
                .build(),
            link_handshake_failures: meter
                .u64_counter("gateway.link.handshake_failures")
                .with_description(
                    "Backend link handshakes that failed (an incompatible or misconfigured \
                     backend), by endpoint and reason",
                )
                .build(),
            link_writes: meter
                .u64_counter("gateway.link.writes")
                .with_description(
                    "Write calls on backend links (frames_written / writes = batching)",
                )
                .build(),
            link_frames_written: meter
                .u64_counter("gateway.link.frames_written")
                .with_description("Data frames written to backend links")
                .build(),
            late_frames: meter
                .u64_counter("gateway.link.late_frames")
                .with_description("Backend frames for sessions no longer on the link (dropped)")
                .build(),
            window_stalls: meter
                .u64_counter("gateway.flow.window_stalls")
                .with_description(
                    "Flow-control stalls (protocol v3), by direction: client_to_backend, a \
                     client message waited for the backend's window; backend_to_client, the \
                     backend used up the window the gateway granted a session",
                )
                .build(),
            handovers: meter
                .u64_counter("gateway.fleet.handovers")
                .with_description(
                    "Fleet: sessions handed between instances, by direction (out: to \
                     another instance; in: taken over from one) and result",
                )
                .build(),
            fleet_connected: meter
                .i64_up_down_counter("gateway.fleet.connected")
                .with_description(
                    "Fleet: 1 while this instance is subscribed to its Redis channel \
                     (handovers can reach it), else 0",
                )
                .build(),
            sessions_moved: meter
                .u64_counter("gateway.sessions.moved")
                .with_description(
                    "Sessions whose link was lost, by result: moved to another link, or \
                     failed (closed with 1012)",
                )
                .build(),
            frames_resent: meter
                .u64_counter("gateway.link.frames_resent")
                .with_description("Client messages sent again to the backend after a move")
                .build(),
            resumes: meter
                .u64_counter("gateway.resumes")
                .with_description("Resume attempts, by result (attempted, succeeded)")
                .build(),
            resumes_refused: meter
                .u64_counter("gateway.resumes.refused")
                .with_description("Resume attempts refused with HTTP 410, by reason")
                .build(),
            replayed: meter
                .u64_counter("gateway.resume.replayed")
                .with_description("Backend messages replayed to resumed clients")
                .build(),
            detached: meter
                .i64_up_down_counter("gateway.sessions.detached")
                .with_description("Sessions waiting for their client to resume")
                .build(),
            tls_handshakes: meter
                .u64_counter("gateway.tls.handshakes")
                .with_description("Completed TLS handshakes, by kind (full, resumed)")
                .build(),
            tls_handshakes_active: meter
                .i64_up_down_counter("gateway.tls.handshakes.active")
                .with_description("TLS handshakes in progress (at most listen.max_handshakes)")
                .build(),
            tls_handshakes_waiting: meter
                .i64_up_down_counter("gateway.tls.handshakes.waiting")
                .with_description("Connections waiting for a TLS handshake slot")
                .build(),
            tls_reloads: meter
                .u64_counter("gateway.tls.reloads")
                .with_description("Certificate reloads, by result (ok, failed: old ones kept)")
                .build(),
            to_backend: [KeyValue::new("direction", "client_to_backend")],
            to_client: [KeyValue::new("direction", "backend_to_client")],
            phases: [
                [KeyValue::new("phase", "tls")],
                [KeyValue::new("phase", "upgrade")],
                [KeyValue::new("phase", "total")],
            ],
            toward_client: [KeyValue::new("toward", "client")],
            toward_link: [KeyValue::new("toward", "link")],
            registry: telemetry.registry.clone(),
        }
    }

    /// Instruments on a provider of their own with the default
    /// configuration (no export), for tests and fuzz targets.
    pub(crate) fn standalone() -> Result<Self, crate::telemetry::TelemetryError> {
        let t = Telemetry::start(&crate::config::TelemetryConfig::default(), "test")?;
        Ok(Self::new(&t))
    }

    /// One message's time through the gateway.
    pub(crate) fn relayed(&self, to_backend: bool, took: Duration) {
        let dir = if to_backend {
            &self.to_backend
        } else {
            &self.to_client
        };
        self.relay_duration.record(took.as_secs_f64(), dir);
    }

    /// One phase of a client handshake.
    pub(crate) fn handshake_phase(&self, phase: Phase, took: Duration) {
        self.handshake_duration
            .record(took.as_secs_f64(), &self.phases[phase as usize]);
    }

    /// A session ended after `lived`.
    pub(crate) fn session_lived(&self, lived: Duration) {
        self.session_duration.record(lived.as_secs_f64(), &[]);
    }

    /// A heartbeat answered on a link to `endpoint`.
    pub(crate) fn heartbeat_rtt(&self, endpoint: &str, rtt: Duration) {
        self.heartbeat_rtt.record(
            rtt.as_secs_f64(),
            &[KeyValue::new("endpoint", endpoint.to_owned())],
        );
    }

    /// Messages queued toward a client (`to_client`) or a link.
    pub(crate) fn queue_depth(&self, to_client: bool, depth: usize) {
        let toward = if to_client {
            &self.toward_client
        } else {
            &self.toward_link
        };
        self.queue_depth.record(depth as u64, toward);
    }

    /// The current values in Prometheus text format.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    pub(crate) fn session_opened(&self) {
        self.sessions_open.add(1, &[]);
    }

    pub(crate) fn session_closed(&self, reason: &CloseReason) {
        self.sessions_open.add(-1, &[]);
        self.sessions_closed
            .add(1, &[KeyValue::new("reason", reason.label())]);
        if *reason == CloseReason::SlowConsumer {
            self.slow_consumer_closes.add(1, &[]);
        }
    }

    pub(crate) fn session_refused(&self, refusal: &Refusal) {
        self.sessions_refused
            .add(1, &[KeyValue::new("reason", refusal.label())]);
    }

    pub(crate) fn link_batch_written(&self, messages: u64, bytes: u64) {
        self.link_writes.add(1, &[]);
        if messages > 0 {
            self.link_frames_written.add(messages, &[]);
            self.messages.add(messages, &self.to_backend);
            self.bytes.add(bytes, &self.to_backend);
        }
    }

    pub(crate) fn link_batch_read(&self, messages: u64, bytes: u64) {
        if messages > 0 {
            self.messages.add(messages, &self.to_client);
            self.bytes.add(bytes, &self.to_client);
        }
    }

    pub(crate) fn link_up(&self, endpoint: &str, delta: i64) {
        self.links_up
            .add(delta, &[KeyValue::new("endpoint", endpoint.to_owned())]);
    }

    pub(crate) fn link_connect(&self, endpoint: &str, connected: bool) {
        let result = if connected { "ok" } else { "failed" };
        self.link_connects.add(
            1,
            &[
                KeyValue::new("endpoint", endpoint.to_owned()),
                KeyValue::new("result", result),
            ],
        );
    }

    pub(crate) fn link_handshake_failed(&self, endpoint: &str, reason: &'static str) {
        self.link_handshake_failures.add(
            1,
            &[
                KeyValue::new("endpoint", endpoint.to_owned()),
                KeyValue::new("reason", reason),
            ],
        );
    }

    pub(crate) fn resume_attempt(&self) {
        self.resumes.add(1, &[KeyValue::new("result", "attempted")]);
    }

    pub(crate) fn resume_succeeded(&self, replayed: u64) {
        self.resumes.add(1, &[KeyValue::new("result", "succeeded")]);
        self.replayed.add(replayed, &[]);
    }

    pub(crate) fn resume_refused(&self, why: ResumeRefusal) {
        self.resumes_refused
            .add(1, &[KeyValue::new("reason", why.label())]);
    }

    pub(crate) fn detached(&self, delta: i64) {
        self.detached.add(delta, &[]);
    }

    pub(crate) fn late_frame(&self) {
        self.late_frames.add(1, &[]);
    }

    /// A flow-control window stalled one direction of a session.
    pub(crate) fn window_stall(&self, to_backend: bool) {
        let dir = if to_backend {
            &self.to_backend
        } else {
            &self.to_client
        };
        self.window_stalls.add(1, dir);
    }

    /// A session whose link was lost moved to another link (or could not),
    /// resending `resent` client messages.
    pub(crate) fn session_moved(&self, moved: bool, resent: u64) {
        let result = if moved { "moved" } else { "failed" };
        self.sessions_moved
            .add(1, &[KeyValue::new("result", result)]);
        if resent > 0 {
            self.frames_resent.add(resent, &[]);
        }
    }

    /// A fleet handover: `direction` "in" or "out", `result` "ok" or a
    /// refusal's label.
    pub(crate) fn handover(&self, direction: &'static str, result: &'static str) {
        self.handovers.add(
            1,
            &[
                KeyValue::new("direction", direction),
                KeyValue::new("result", result),
            ],
        );
    }

    /// The fleet's Redis channel came up (+1) or went down (-1).
    pub(crate) fn fleet_connected(&self, delta: i64) {
        self.fleet_connected.add(delta, &[]);
    }

    pub(crate) fn tls_handshake_done(&self, resumed: bool) {
        let kind = if resumed { "resumed" } else { "full" };
        self.tls_handshakes.add(1, &[KeyValue::new("kind", kind)]);
    }

    pub(crate) fn tls_handshakes_active(&self, delta: i64) {
        self.tls_handshakes_active.add(delta, &[]);
    }

    pub(crate) fn tls_handshakes_waiting(&self, delta: i64) {
        self.tls_handshakes_waiting.add(delta, &[]);
    }

    /// A certificate reload succeeded, or failed and kept the old ones.
    pub(crate) fn tls_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.tls_reloads.add(1, &[KeyValue::new("result", result)]);
    }
}

//! Instruments, created through the OpenTelemetry metrics API and exported
//! in Prometheus text format on the admin listener.
//!
//! Per-message counts are added once per link read or write batch, not per
//! message, to keep the data path cheap.

use opentelemetry::metrics::{Counter, MeterProvider, UpDownCounter};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

use crate::close::CloseReason;
use crate::refusal::{Refusal, ResumeRefusal};

/// The gateway's instruments and the registry they are exported through.
pub(crate) struct Metrics {
    registry: prometheus::Registry,
    _provider: SdkMeterProvider,
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
}

impl Metrics {
    /// Creates the instruments and their Prometheus exporter.
    pub(crate) fn new() -> Result<Self, opentelemetry_sdk::error::OTelSdkError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter("gateway");
        Ok(Self {
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
            registry,
            _provider: provider,
        })
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

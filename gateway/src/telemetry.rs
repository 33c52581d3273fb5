//! Telemetry wiring: the meter and tracer providers, their resource, OTLP
//! export, and each session's span.
//!
//! Metrics are always recorded and always on the admin listener's
//! Prometheus page (`metrics.rs` holds the instruments). With
//! `telemetry.otlp_endpoint` set they are also pushed over OTLP every
//! `telemetry.metrics_interval`, and a sampled share of sessions is traced:
//! one span per session (open to close, across detach and resume), whose
//! context goes to the backend in `SessionOpen.traceparent` so the
//! backend's spans join the client's trace. There are no per-message
//! spans.
//!
//! The SDK's export threads run outside the tokio runtime, and shutting
//! the providers down blocks until the last export is done or times out,
//! so [`Telemetry::shutdown`] runs it on a thread of its own.

use std::collections::HashMap;
use std::time::Duration;

use hyper::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanContext, TraceContextExt, Tracer as _, TracerProvider};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::config::{OtlpProtocol, TelemetryConfig};

/// What the binary was built from, for `--version`, the
/// `gateway.build.info` metric and the resource's `service.version`.
pub mod build {
    /// The package version.
    pub const VERSION: &str = env!("CARGO_PKG_VERSION");
    /// The git commit the binary was built from (`unknown` outside a git
    /// checkout), with `-dirty` when the tree had changes.
    pub const COMMIT: &str = env!("WSGW_BUILD_COMMIT");
    /// The compiler that built it.
    pub const RUSTC: &str = env!("WSGW_BUILD_RUSTC");
    /// The target triple.
    pub const TARGET: &str = env!("WSGW_BUILD_TARGET");
    /// `release` or `debug`.
    pub const PROFILE: &str = env!("WSGW_BUILD_PROFILE");
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The Prometheus exporter.
    #[error("prometheus exporter: {0}")]
    Prometheus(#[from] opentelemetry_sdk::error::OTelSdkError),
    /// An OTLP exporter (a bad endpoint or header).
    #[error("OTLP exporter: {0}")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The providers, and the tracer when traces are exported.
///
/// Dropped without [`Telemetry::shutdown`] (a start-up that failed after
/// it was made), the providers are shut down on a thread of their own: the
/// SDK's shutdown blocks, and must not block the runtime.
pub(crate) struct Telemetry {
    pub(crate) meters: SdkMeterProvider,
    pub(crate) registry: prometheus::Registry,
    tracers: Option<SdkTracerProvider>,
    tracer: Option<SdkTracer>,
    /// Whether anything is exported over OTLP (else there is nothing to
    /// flush at the end: the Prometheus page is pulled).
    exports: bool,
}

impl Telemetry {
    /// Builds the providers. Must run inside the tokio runtime (the gRPC
    /// exporter's channel starts a task on it).
    pub(crate) fn start(
        config: &TelemetryConfig,
        instance_id: &str,
    ) -> Result<Self, TelemetryError> {
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attributes([
                KeyValue::new("service.version", build::VERSION),
                KeyValue::new("service.instance.id", instance_id.to_owned()),
                KeyValue::new("vcs.ref.head.revision", build::COMMIT),
            ])
            .build();
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()?;
        let mut meters = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(prometheus);
        let mut tracers = None;
        if let Some(endpoint) = &config.otlp_endpoint {
            if config.otlp_metrics {
                let exporter = metric_exporter(config, endpoint)?;
                let reader = PeriodicReader::builder(exporter)
                    .with_interval(config.metrics_interval)
                    .build();
                meters = meters.with_reader(reader);
            }
            if config.traces_sample_ratio > 0.0 || config.traces_follow_client {
                let exporter = span_exporter(config, endpoint)?;
                let ratio = Sampler::TraceIdRatioBased(config.traces_sample_ratio);
                let sampler = if config.traces_follow_client {
                    Sampler::ParentBased(Box::new(ratio))
                } else {
                    ratio
                };
                tracers = Some(
                    SdkTracerProvider::builder()
                        .with_resource(resource)
                        .with_sampler(sampler)
                        .with_batch_exporter(exporter)
                        .build(),
                );
            }
        }
        let tracer = tracers.as_ref().map(|p| p.tracer("wsgw"));
        Ok(Self {
            meters: meters.build(),
            registry,
            tracers,
            tracer,
            exports: config.otlp_endpoint.is_some(),
        })
    }

    /// Starts a session's span as a child of the client's `traceparent`
    /// (if it sent one). Returns the span (only if sampled) and the
    /// `traceparent` for the backend: the span's own context when the
    /// gateway traces, else the client's header passed on as it came
    /// (once checked), else empty.
    pub(crate) fn session_span(&self, headers: &HeaderMap, id: u64) -> (SessionSpan, String) {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        self.start_span(&parent, id, "open")
    }

    /// The span of a session taken over from another instance: a child of
    /// the `traceparent` its backend was given, so it joins the same trace.
    pub(crate) fn continued_span(&self, traceparent: &str, id: u64) -> SessionSpan {
        let mut headers = HeaderMap::new();
        if let Ok(v) = traceparent.parse() {
            headers.insert("traceparent", v);
        }
        let parent = TraceContextPropagator::new().extract(&Headers(&headers));
        self.start_span(&parent, id, "taken_over").0
    }

    fn start_span(
        &self,
        parent: &opentelemetry::Context,
        id: u64,
        first: &'static str,
    ) -> (SessionSpan, String) {
        let Some(tracer) = &self.tracer else {
            let sc = parent.span().span_context().clone();
            return (SessionSpan(None), traceparent(&sc));
        };
        let mut span = tracer
            .span_builder("session")
            .with_kind(opentelemetry::trace::SpanKind::Server)
            .with_attributes([KeyValue::new(
                "wsgw.session.id",
                i64::try_from(id).unwrap_or(i64::MAX),
            )])
            .start_with_context(tracer, parent);
        let header = traceparent(span.span_context());
        if !span.is_recording() {
            return (SessionSpan(None), header);
        }
        span.add_event(first, Vec::new());
        (SessionSpan(Some(Box::new(span))), header)
    }

    /// Flushes and stops the exporters, waiting at most `limit`; returns
    /// at once when nothing is exported over OTLP.
    pub(crate) async fn shutdown(&self, limit: Duration) {
        if !self.exports {
            return;
        }
        let meters = self.meters.clone();
        let tracers = self.tracers.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A plain thread: the SDK's shutdown blocks, and with an unreachable
        // receiver it blocks until its own timeout.
        let spawned = std::thread::Builder::new()
            .name("telemetry-shutdown".into())
            .spawn(move || {
                if let Some(t) = tracers {
                    let _ = t.shutdown();
                }
                let _ = meters.shutdown();
                let _ = tx.send(());
            });
        if spawned.is_ok() {
            let _ = tokio::time::timeout(limit, rx).await;
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        // Without OTLP only the Prometheus reader is there: nothing blocks.
        if !self.exports {
            return;
        }
        let meters = self.meters.clone();
        let tracers = self.tracers.take();
        self.tracer = None;
        let _ = std::thread::Builder::new()
            .name("telemetry-drop".into())
            .spawn(move || {
                if let Some(t) = tracers {
                    let _ = t.shutdown();
                }
                let _ = meters.shutdown();
            });
    }
}

/// The W3C `traceparent` of a span context, empty if it is not valid.
fn traceparent(sc: &SpanContext) -> String {
    if !sc.is_valid() {
        return String::new();
    }
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// A session's span: present only when the session is sampled, boxed so
/// that an unsampled session carries one word.
#[derive(Default)]
pub(crate) struct SessionSpan(Option<Box<opentelemetry_sdk::trace::Span>>);

impl SessionSpan {
    /// Adds a named event ("detach", "resume", "moved").
    pub(crate) fn event(&mut self, name: &'static str, attributes: Vec<KeyValue>) {
        if let Some(s) = self.0.as_mut() {
            s.add_event(name, attributes);
        }
    }

    /// Ends the span with its close: the WebSocket close code the client
    /// got and the gateway's reason label.
    pub(crate) fn close(&mut self, code: u16, reason: &'static str) {
        if let Some(mut s) = self.0.take() {
            s.add_event(
                "close",
                vec![
                    KeyValue::new("websocket.close.code", i64::from(code)),
                    KeyValue::new("wsgw.close.reason", reason),
                ],
            );
            s.set_attribute(KeyValue::new("websocket.close.code", i64::from(code)));
            s.end();
        }
    }
}

/// Request headers as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(hyper::header::HeaderName::as_str)
            .collect()
    }
}

/// Builds one signal's OTLP exporter (`MetricExporter` or `SpanExporter`:
/// the same builder calls on different types) for the configured protocol.
macro_rules! otlp_exporter {
    ($exporter:ty, $config:expr, $endpoint:expr, $signal:literal) => {{
        let (config, endpoint): (&TelemetryConfig, &str) = ($config, $endpoint);
        let b = <$exporter>::builder();
        match config.otlp_protocol {
            OtlpProtocol::Grpc => {
                let b = b
                    .with_tonic()
                    .with_endpoint(endpoint)
                    .with_timeout(config.otlp_timeout)
                    .with_metadata(metadata(config));
                if endpoint.starts_with("https://") {
                    b.with_tls_config(tls()).build()
                } else {
                    b.build()
                }
            }
            OtlpProtocol::HttpProtobuf => b
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(signal_url(endpoint, $signal))
                .with_timeout(config.otlp_timeout)
                .with_headers(headers(config))
                .build(),
        }
    }};
}

fn metric_exporter(
    config: &TelemetryConfig,
    endpoint: &str,
) -> Result<opentelemetry_otlp::MetricExporter, opentelemetry_otlp::ExporterBuildError> {
    otlp_exporter!(
        opentelemetry_otlp::MetricExporter,
        config,
        endpoint,
        "metrics"
    )
}

fn span_exporter(
    config: &TelemetryConfig,
    endpoint: &str,
) -> Result<opentelemetry_otlp::SpanExporter, opentelemetry_otlp::ExporterBuildError> {
    otlp_exporter!(opentelemetry_otlp::SpanExporter, config, endpoint, "traces")
}

/// TLS for an `https://` gRPC endpoint: the system's trust roots (tonic's
/// default has none).
fn tls() -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new().with_native_roots()
}

/// OTLP/HTTP's per-signal URL under a base endpoint, as the OTLP
/// specification builds it from `OTEL_EXPORTER_OTLP_ENDPOINT`.
fn signal_url(base: &str, signal: &str) -> String {
    format!("{}/v1/{signal}", base.trim_end_matches('/'))
}

fn headers(config: &TelemetryConfig) -> HashMap<String, String> {
    config
        .otlp_headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn metadata(config: &TelemetryConfig) -> tonic::metadata::MetadataMap {
    let mut map = HeaderMap::new();
    for (k, v) in &config.otlp_headers {
        // Checked when the configuration was validated.
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            hyper::header::HeaderValue::from_str(v),
        ) {
            map.insert(k, v);
        }
    }
    tonic::metadata::MetadataMap::from_headers(map)
}

/// The current context's span context, for tests of the extractor.
#[cfg(test)]
fn extracted(headers: &HeaderMap) -> SpanContext {
    let cx: opentelemetry::Context = TraceContextPropagator::new().extract(&Headers(headers));
    cx.span().span_context().clone()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_clients_traceparent_passes_through_when_the_gateway_does_not_trace() {
        let mut h = HeaderMap::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", tp.parse().unwrap());
        assert_eq!(traceparent(&extracted(&h)), tp);
        let t = Telemetry::start(&TelemetryConfig::default(), "i").unwrap();
        let (span, header) = t.session_span(&h, 1);
        assert!(span.0.is_none());
        assert_eq!(header, tp);
    }

    #[test]
    fn a_malformed_traceparent_is_not_passed_on() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", "00-zz-00f067aa0ba902b7-01".parse().unwrap());
        let t = Telemetry::start(&TelemetryConfig::default(), "i").unwrap();
        assert_eq!(t.session_span(&h, 1).1, "");
        assert_eq!(t.session_span(&HeaderMap::new(), 1).1, "");
    }

    #[test]
    fn otlp_http_urls_are_built_per_signal() {
        assert_eq!(
            signal_url("http://c:4318/", "traces"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            signal_url("http://c:4318", "metrics"),
            "http://c:4318/v1/metrics"
        );
    }
}

//! Logs, traces and the metrics endpoint of one process.
//!
//! Logs are readable lines by default, JSON on request, with verbosity from
//! `RUST_LOG` (default `info`). With an OTLP endpoint configured, every
//! tracing span is also exported over OTLP/gRPC (batched, on a background
//! thread) under the process's `service.name`, and W3C trace context
//! (`traceparent`, `tracestate`) is read from incoming calls and written into
//! outgoing ones, so one user call is one trace across services. Without an
//! endpoint none of that runs: the OpenTelemetry layer is not installed and
//! propagation is a single atomic load per call.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{LogFormat, ServerArgs};
use crate::metrics::MetricsServer;

/// Set once the OpenTelemetry layer is part of the global subscriber.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (and so whether trace context is propagated).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// What [`init`] set up; keep it alive for the life of the process. Dropping
/// it (or [`Telemetry::shutdown`]) flushes the spans not yet exported and
/// stops the metrics endpoint.
#[must_use = "dropping the guard stops span export and the metrics endpoint"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    metrics: Option<MetricsServer>,
}

impl Telemetry {
    /// Where the metrics endpoint listens, when `--metrics-listen` was given.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// Exports the spans still queued (waiting at most the SDK's export
    /// timeout) and stops exporting; stops the metrics endpoint.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Blocks this thread while the batch thread exports; fine on a
            // multi-threaded runtime (natter's mains), whose workers keep the
            // exporter's connection going meanwhile.
            if let Err(e) = provider.shutdown() {
                eprintln!("flushing spans failed: {e}");
            }
        }
        self.metrics = None;
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sets up logs, span export and the metrics endpoint from the shared server
/// flags, for the binary `service_name` (`natter-sessions`, `natter`, ...;
/// the traces' `service.name`). Call once, from `main`, inside the Tokio
/// runtime, and keep the guard: `let _telemetry = init("natter", &args)?;`.
///
/// The OTLP endpoint is `--otlp-endpoint` (`NATTER_OTLP_ENDPOINT`), else the
/// standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; the SDK's own variables (`OTEL_BSP_*`
/// batching, `OTEL_TRACES_SAMPLER`, `OTEL_RESOURCE_ATTRIBUTES`) apply too.
///
/// Errors: the metrics address cannot be bound, or the OTLP endpoint is not
/// a valid URL.
pub fn init(service_name: &'static str, args: &ServerArgs) -> std::io::Result<Telemetry> {
    Builder::new(service_name)
        .log_format(args.log_format)
        .otlp_endpoint(args.otlp_endpoint.clone().or_else(otlp_endpoint_from_env))
        .metrics_listen(args.metrics_listen)
        .install()
}

fn otlp_endpoint_from_env() -> Option<String> {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .into_iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
}

/// [`init`] with every choice explicit (tests use it for a short batch delay
/// and no log output).
#[derive(Clone, Debug)]
pub struct Builder {
    service_name: &'static str,
    log_format: LogFormat,
    logs: bool,
    otlp_endpoint: Option<String>,
    batch_delay: Option<Duration>,
    metrics_listen: Option<SocketAddr>,
}

impl Builder {
    /// Text logs, no export, no metrics endpoint.
    pub fn new(service_name: &'static str) -> Self {
        Self {
            service_name,
            log_format: LogFormat::Text,
            logs: true,
            otlp_endpoint: None,
            batch_delay: None,
            metrics_listen: None,
        }
    }

    /// Log line format.
    pub fn log_format(mut self, format: LogFormat) -> Self {
        self.log_format = format;
        self
    }

    /// Whether to write log lines at all (tests turn them off).
    pub fn logs(mut self, on: bool) -> Self {
        self.logs = on;
        self
    }

    /// Exports spans to this OTLP/gRPC endpoint (`http://host:4317`).
    pub fn otlp_endpoint(mut self, endpoint: Option<String>) -> Self {
        self.otlp_endpoint = endpoint;
        self
    }

    /// Longest time a finished span waits for its batch (the SDK's default,
    /// or `OTEL_BSP_SCHEDULE_DELAY`, is 5 s).
    pub fn batch_delay(mut self, delay: Duration) -> Self {
        self.batch_delay = Some(delay);
        self
    }

    /// Serves Prometheus metrics at `http://addr/metrics`.
    pub fn metrics_listen(mut self, addr: Option<SocketAddr>) -> Self {
        self.metrics_listen = addr;
        self
    }

    /// Installs the global subscriber and starts export and the metrics
    /// endpoint. A second call in one process (tests that start several
    /// servers) keeps the first subscriber: its spans go where the first
    /// call said.
    ///
    /// Errors: as [`init`].
    pub fn install(self) -> std::io::Result<Telemetry> {
        let provider = match &self.otlp_endpoint {
            Some(endpoint) => Some(self.tracer_provider(endpoint)?),
            None => None,
        };
        let metrics = self.metrics_listen.map(crate::metrics::serve_on).transpose()?;

        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        // Log lines are events with their own fields. Spans (one per RPC and
        // more per send) go to OTLP only: the log layer would otherwise
        // format every span's fields on every call, which cost a tenth of the
        // server's CPU on the send path, for lines that are rarely written.
        let events_only = tracing_subscriber::filter::filter_fn(|meta| meta.is_event());
        let logs = self.logs.then(|| match self.log_format {
            LogFormat::Text => tracing_subscriber::fmt::layer().with_target(false).with_filter(events_only).boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .with_target(false)
                .json()
                .flatten_event(true)
                .with_filter(events_only)
                .boxed(),
        });
        let otel = provider
            .as_ref()
            .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(self.service_name)).with_level(true));
        // Without OTLP no layer wants spans: turn them off for the whole
        // subscriber, so that `#[instrument]` and friends create nothing
        // (else the registry allocates, enters and closes each one anyway).
        let no_spans = provider.is_none().then(|| tracing_subscriber::filter::filter_fn(|meta| meta.is_event()));
        let installed =
            tracing_subscriber::registry().with(logs).with(otel).with(no_spans).with(filter).try_init().is_ok();
        let provider = match provider {
            Some(provider) if installed => {
                EXPORTING.store(true, Ordering::Relaxed);
                tracing::info!(endpoint = self.otlp_endpoint.as_deref(), "exporting spans over OTLP");
                Some(provider)
            }
            Some(unused) => {
                let _ = unused.shutdown();
                None
            }
            None => None,
        };
        if let Some(metrics) = &metrics {
            tracing::info!(addr = %metrics.local_addr(), "serving metrics at /metrics");
        }
        Ok(Telemetry { provider, metrics })
    }

    fn tracer_provider(&self, endpoint: &str) -> std::io::Result<SdkTracerProvider> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| std::io::Error::other(format!("OTLP endpoint {endpoint:?}: {e}")))?;
        let mut batch = BatchConfigBuilder::default();
        if let Some(delay) = self.batch_delay {
            batch = batch.with_scheduled_delay(delay);
        }
        let processor = BatchSpanProcessor::builder(exporter).with_batch_config(batch.build()).build();
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(self.service_name).build();
        Ok(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build())
    }
}

/// Makes `span` a child of the trace context in incoming `headers`
/// (`traceparent`, `tracestate`), when spans are exported and the headers
/// carry a valid context. Call before the span is first entered.
pub fn set_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    if !exporting() || !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Writes the current span's trace context into `headers` as `traceparent`
/// (and `tracestate`), replacing any there, so the callee's spans become its
/// children. Does nothing when spans are not exported (headers pass as they
/// are). The edge calls it on each forwarded request.
pub fn inject_headers(headers: &mut http::HeaderMap) {
    if !exporting() {
        return;
    }
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (http::HeaderName::try_from(key), http::HeaderValue::try_from(value)) {
            self.0.insert(name, value);
        }
    }
}

/// A tower layer for clients: every request leaves with the current span's
/// trace context ([`inject_headers`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct PropagateLayer;

impl<S> tower::Layer<S> for PropagateLayer {
    type Service = Propagate<S>;

    fn layer(&self, inner: S) -> Propagate<S> {
        Propagate { inner, header: None }
    }
}

/// See [`PropagateLayer`]. Calls to another natter service's internal
/// listener also carry a fixed header, the service credential (set by
/// `internal::Link`).
#[derive(Clone)]
pub struct Propagate<S> {
    inner: S,
    header: Option<(http::HeaderName, http::HeaderValue)>,
}

impl<S> Propagate<S> {
    /// Every request also carries `name: value`, replacing any there.
    pub(crate) fn with_header(mut self, name: http::HeaderName, value: http::HeaderValue) -> Self {
        self.header = Some((name, value));
        self
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Propagate<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Propagate").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl<S, B> tower::Service<http::Request<B>> for Propagate<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> S::Future {
        inject_headers(request.headers_mut());
        if let Some((name, value)) = &self.header {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        self.inner.call(request)
    }
}

/// A tonic channel whose calls carry trace context: what service-to-service
/// clients use.
pub type TracedChannel = Propagate<tonic::transport::Channel>;

/// Wraps `channel` so its calls carry trace context.
pub fn traced(channel: tonic::transport::Channel) -> TracedChannel {
    Propagate { inner: channel, header: None }
}

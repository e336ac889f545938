//! Logs, traces and the metrics endpoint of one process.
//!
//! Logs are readable lines by default, JSON on request, with verbosity from
//! `RUST_LOG` (default [`DEFAULT_LOG_FILTER`]). With an OTLP endpoint configured, every
//! tracing span is also exported over OTLP/gRPC (batched, on a background
//! thread) under the process's `service.name`, and W3C trace context
//! (`traceparent`, `tracestate`) is read from incoming calls and written into
//! outgoing ones, so one user call is one trace across services. Without an
//! endpoint none of that runs: the OpenTelemetry layer is not installed and
//! propagation is a single atomic load per call.
//!
//! Every call to another service is a client span (OpenTelemetry RPC
//! semantic conventions: `rpc.system`, `rpc.service`, `rpc.method`,
//! `server.address`, `rpc.grpc.status_code`, the status message), the parent
//! of the callee's server span; in the all-in-one the in-process calls get
//! the same client spans ([`crate::observe::in_process`]), so both modes draw the same
//! trace. A failed export is logged at WARN with the endpoint (at most once
//! a minute). Health checks are not traced unless asked
//! (`--trace-health-checks`). Each process names itself with
//! `service.instance.id` (host name and listen port, or `--instance-id`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{LogFormat, ServerArgs};
use crate::metrics::MetricsServer;

/// The log filter when `RUST_LOG` is not set: `info`, but PostgreSQL's
/// NOTICE messages (which sqlx logs at INFO under `sqlx::postgres::notice`)
/// only from WARNING up: the NOTICEs natter meets are "schema ... already
/// exists, skipping" and the like, once per store at every start. Their
/// warnings and errors still show.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx::postgres::notice=warn";

/// Set once the OpenTelemetry layer is part of the global subscriber.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Set by `--trace-health-checks`.
static TRACE_HEALTH: AtomicBool = AtomicBool::new(false);

/// Whether calls of `grpc.health.v1.Health` get spans (off by default: a
/// probe every few seconds per replica would be a trace each).
pub fn trace_health_checks() -> bool {
    TRACE_HEALTH.load(Ordering::Relaxed)
}

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
/// an `http` or `https` URL with a host (the error names the flag).
pub fn init(service_name: &'static str, args: &ServerArgs) -> std::io::Result<Telemetry> {
    let instance = args.instance_id.clone().unwrap_or_else(|| format!("{}:{}", host_name(), args.listen.port()));
    Builder::new(service_name)
        .log_format(args.log_format)
        .otlp_endpoint(args.otlp_endpoint.clone().or_else(otlp_endpoint_from_env))
        .metrics_listen(args.metrics_listen)
        .trace_health_checks(args.trace_health_checks)
        .instance_id(Some(instance))
        .install()
}

/// This machine's (or pod's) host name: `HOSTNAME`, else the kernel's,
/// else `localhost`.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Checks an OTLP/gRPC endpoint: an `http` or `https` URL with a host.
///
/// Errors: [`std::io::ErrorKind::InvalidInput`], naming `--otlp-endpoint`.
pub fn check_otlp_endpoint(endpoint: &str) -> std::io::Result<()> {
    let bad = |why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "--otlp-endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT) {endpoint:?}: {why} (expected http://host:4317 or \
                 https://...)"
            ),
        )
    };
    let uri: http::Uri = endpoint.parse().map_err(|_| bad("not a URL"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(host)) if !host.is_empty() => Ok(()),
        (Some("http" | "https"), _) => Err(bad("no host")),
        _ => Err(bad("the scheme must be http or https")),
    }
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
    logs_to_stderr: bool,
    otlp_endpoint: Option<String>,
    batch_delay: Option<Duration>,
    metrics_listen: Option<SocketAddr>,
    trace_health_checks: bool,
    instance_id: Option<String>,
}

impl Builder {
    /// Text logs, no export, no metrics endpoint.
    pub fn new(service_name: &'static str) -> Self {
        Self {
            service_name,
            log_format: LogFormat::Text,
            logs: true,
            logs_to_stderr: false,
            otlp_endpoint: None,
            batch_delay: None,
            metrics_listen: None,
            trace_health_checks: false,
            instance_id: None,
        }
    }

    /// Whether health-check calls get spans ([`trace_health_checks`]).
    pub fn trace_health_checks(mut self, on: bool) -> Self {
        self.trace_health_checks = on;
        self
    }

    /// The `service.instance.id` resource attribute of exported spans,
    /// unless `OTEL_RESOURCE_ATTRIBUTES` sets one.
    pub fn instance_id(mut self, id: Option<String>) -> Self {
        self.instance_id = id;
        self
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

    /// Whether log lines go to standard error rather than standard output
    /// (the default, for servers): for a command whose standard output is
    /// its report (`natter migrate`), so that the two do not interleave.
    pub fn logs_to_stderr(mut self, on: bool) -> Self {
        self.logs_to_stderr = on;
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
        if let Some(endpoint) = &self.otlp_endpoint {
            check_otlp_endpoint(endpoint)?;
        }
        TRACE_HEALTH.store(self.trace_health_checks, Ordering::Relaxed);
        let provider = match &self.otlp_endpoint {
            Some(endpoint) => Some(self.tracer_provider(endpoint)?),
            None => None,
        };
        let metrics = self.metrics_listen.map(crate::metrics::serve_on).transpose()?;

        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
        // Log lines are events with their own fields. Spans (one per RPC and
        // more per send) go to OTLP only: the log layer would otherwise
        // format every span's fields on every call, which cost a tenth of the
        // server's CPU on the send path, for lines that are rarely written.
        let events_only = tracing_subscriber::filter::filter_fn(|meta| meta.is_event());
        let to_stderr = self.logs_to_stderr;
        let writer = move || {
            if to_stderr { BoxMakeWriter::new(std::io::stderr) } else { BoxMakeWriter::new(std::io::stdout) }
        };
        let logs = self.logs.then(|| match self.log_format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(writer())
                .with_target(false)
                .with_filter(events_only)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .with_writer(writer())
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
        let last_warning = crate::limits::Throttle::new(EXPORT_WARNING_EVERY);
        let exporter = WarnOnFailure { inner: exporter, endpoint: endpoint.to_owned(), last_warning };
        let processor = BatchSpanProcessor::builder(exporter).with_batch_config(batch.build()).build();
        let mut resource = opentelemetry_sdk::Resource::builder().with_service_name(self.service_name);
        let set_by_env = std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.instance.id="));
        if let Some(id) = self.instance_id.clone().filter(|_| !set_by_env) {
            resource = resource.with_attribute(opentelemetry::KeyValue::new("service.instance.id", id));
        }
        let resource = resource.build();
        Ok(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build())
    }
}

/// The OTLP exporter, logging a failed export at WARN with the endpoint, at
/// most once a minute, counting the failures not logged since the previous
/// line (the SDK reports them only at debug level, so a mistyped or
/// unreachable collector went unnoticed).
#[derive(Debug)]
struct WarnOnFailure<E> {
    inner: E,
    endpoint: String,
    last_warning: crate::limits::Throttle,
}

/// Shortest time between two export warnings.
const EXPORT_WARNING_EVERY: Duration = Duration::from_secs(60);

impl<E: SpanExporter> SpanExporter for WarnOnFailure<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        if let Err(error) = &result
            && let Some(suppressed) = self.last_warning.admit()
        {
            tracing::warn!(endpoint = %self.endpoint, spans, %error, suppressed, "exporting spans over OTLP failed");
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Makes `span` a child of the trace context in incoming `headers`
/// (`traceparent`, `tracestate`), when spans are exported and the headers
/// carry a valid context. Call before the span is first entered. A
/// `tracestate` that [`trusted_trace_state`] refuses is left out: the span
/// keeps its parent and carries (and passes on) no trace state.
pub fn set_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    if !exporting() || !headers.contains_key("traceparent") {
        return;
    }
    let trace_state = trusted_trace_state(headers);
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers, trace_state.as_deref()));
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

/// The most list members of a `tracestate` natter passes on (W3C Trace
/// Context, section 3.3.1.1: at most 32).
pub const MAX_TRACE_STATE_MEMBERS: usize = 32;

/// The longest `tracestate` natter passes on, in bytes, all its header
/// fields joined by commas: the 512 characters W3C Trace Context asks every
/// vendor to propagate (section 3.3.1.5). Anyone on the internet can send
/// one; the 16 KiB a header block may hold would otherwise travel on every
/// hop and every exported span of the call.
pub const MAX_TRACE_STATE_BYTES: usize = 512;

/// The incoming `tracestate` of `headers` (its fields joined by commas, as
/// W3C Trace Context combines them), if natter passes it on: at most
/// [`MAX_TRACE_STATE_BYTES`], at most [`MAX_TRACE_STATE_MEMBERS`] list
/// members, each a valid `key=value`. Anything else is dropped whole (the
/// spec lets a vendor discard a tracestate it cannot parse); the
/// `traceparent` beside it still counts.
pub fn trusted_trace_state(headers: &http::HeaderMap) -> Option<String> {
    let mut fields = headers.get_all("tracestate").iter();
    let first = fields.next()?.to_str().ok()?;
    let mut joined = first.to_owned();
    for field in fields {
        joined.push(',');
        joined.push_str(field.to_str().ok()?);
        if joined.len() > MAX_TRACE_STATE_BYTES {
            return None;
        }
    }
    if joined.len() > MAX_TRACE_STATE_BYTES {
        return None;
    }
    let members = joined.split(',').filter(|m| !m.trim_matches([' ', '\t']).is_empty()).count();
    if members > MAX_TRACE_STATE_MEMBERS {
        return None;
    }
    joined.parse::<opentelemetry::trace::TraceState>().ok()?;
    Some(joined)
}

/// Removes the `tracestate` of `headers` unless [`trusted_trace_state`]
/// passes it: for a request forwarded as it came (the edge, when it exports
/// no spans and so writes no trace context of its own).
pub fn drop_untrusted_trace_state(headers: &mut http::HeaderMap) {
    if headers.contains_key("tracestate") && trusted_trace_state(headers).is_none() {
        headers.remove("tracestate");
    }
}

/// Reads the trace context of incoming headers, the `tracestate` as
/// [`trusted_trace_state`] gave it.
struct HeaderExtractor<'a>(&'a http::HeaderMap, Option<&'a str>);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key.eq_ignore_ascii_case("tracestate") {
            return self.1;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's tracestate is passed on only within W3C Trace Context's
    /// limits: 32 members, 512 bytes, valid members; otherwise dropped.
    #[test]
    fn a_tracestate_is_passed_on_only_within_the_w3c_limits() {
        let headers = |values: &[&str]| {
            let mut headers = http::HeaderMap::new();
            for v in values {
                headers.append("tracestate", http::HeaderValue::from_str(v).unwrap());
            }
            headers
        };
        let members = |n: usize| (0..n).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        assert_eq!(trusted_trace_state(&headers(&["congo=t61rcWkgMzE"])).as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(trusted_trace_state(&headers(&["a=1", "b=2"])).as_deref(), Some("a=1,b=2"), "fields joined");
        assert_eq!(trusted_trace_state(&headers(&[&members(32)])), Some(members(32)));
        assert_eq!(trusted_trace_state(&headers(&[&members(33)])), None, "33 members");
        assert_eq!(
            trusted_trace_state(&headers(&[&format!("k={}", "v".repeat(250)), &format!("j={}", "v".repeat(260))])),
            None,
            "over 512 bytes"
        );
        assert_eq!(trusted_trace_state(&headers(&["Not A Key=1"])), None, "invalid member");
        assert_eq!(trusted_trace_state(&headers(&[])), None);
        let mut oversized = headers(&[&members(40)]);
        oversized.insert(
            "traceparent",
            http::HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        drop_untrusted_trace_state(&mut oversized);
        assert!(!oversized.contains_key("tracestate"));
        assert!(oversized.contains_key("traceparent"), "the parent still counts");
    }

    #[test]
    fn otlp_endpoints_need_an_http_scheme_and_a_host() {
        for good in ["http://collector:4317", "https://otel.example.com", "http://127.0.0.1:4317/", "http://[::1]:4317"]
        {
            assert!(check_otlp_endpoint(good).is_ok(), "{good}");
        }
        // What operators mistype: no scheme, another protocol's scheme, no
        // host, not a URL.
        for bad in
            ["collector:4317", "localhost", "grpc://collector:4317", "udp://collector:4317", "http://", "http:// x", ""]
        {
            let refused = check_otlp_endpoint(bad).expect_err(bad);
            assert_eq!(refused.kind(), std::io::ErrorKind::InvalidInput);
            assert!(refused.to_string().contains("--otlp-endpoint"), "names the flag: {refused}");
        }
    }
}

//! Prometheus metrics of one process, and the plain-HTTP endpoint that
//! serves them (`GET /metrics`, text exposition format 0.0.4).
//!
//! Uses the `prometheus` crate (the Prometheus Go client's model: counters
//! and histograms are atomics behind handles) rather than OpenTelemetry
//! metrics with a Prometheus exporter: it needs no SDK pipeline, its handles
//! are cheap enough for the per-RPC path, and its text output is the format
//! every scraper reads. One registry per process: the all-in-one's three
//! services share it, as they share one port.
//!
//! What is measured:
//! - `natter_rpc_requests_total{service,method,code}`: finished RPCs by gRPC
//!   status code name (`OK`, `NOT_FOUND`, ...); errors are the ones whose
//!   code is not `OK`. A call the client abandoned counts as `CANCELLED`.
//!   `service` and `method` name a method natter serves (its own services,
//!   health, reflection); a call to any other path counts as
//!   `service="unknown",method="unknown"`, so clients cannot add series.
//! - `natter_rpc_duration_seconds{service,method}`: time from the request's
//!   arrival to its final status (for a stream: the stream's whole life).
//! - `natter_active_streams`: open StreamEvents streams ([`StreamGuard`]).
//! - `natter_connections_open{listener}`: TCP connections a listener
//!   (`public` or `internal`) holds now, from accept to close;
//!   `natter_connection_handshake_timeouts_total{listener}`: connections
//!   closed because no request came within `--handshake-timeout`;
//!   `natter_connection_idle_closes_total{listener}`: connections closed
//!   after `--max-connection-idle` with no call in flight;
//!   `natter_connection_cap_reached_total{listener}`: times a listener
//!   stopped accepting because it held `--max-connections`
//!   ([`ConnectionGuard`]);
//!   `natter_connection_address_cap_refusals_total{listener}`: connections
//!   closed at accept because their client address held
//!   `--max-connections-per-address`;
//!   `natter_unread_answers_ended_total{listener,ended}`: answers ended
//!   because they waited unread for `--max-unread-answer-time`, by what
//!   was ended: `stream` (an HTTP/2 stream reset, `crate::unread`) or
//!   `connection` (a write that made no progress, `crate::accept`)
//!   ([`unread_answer_ended`]).
//! - `natter_request_budget_refusals_total`: calls a public server refused
//!   because it held `--max-buffered-request-bytes` of requests
//!   ([`request_budget_refused`]);
//!   `natter_request_budget_address_refusals_total`: calls refused because
//!   their client address held its share of it
//!   (`--max-buffered-request-bytes-per-address`,
//!   [`request_budget_address_refused`]).
//! - `natter_tokenless_stream_refusals_total{limit}`: streaming calls that
//!   need no token (reflection, health Watch) refused at their cap, by the
//!   cap met: `connection`, `address` or `server`
//!   ([`tokenless_stream_refused`]).
//! - whatever a service registers of its own ([`register`]; the messages
//!   writer's batch, commit and phase metrics).
//! - `natter_bus_published_total`, `natter_bus_received_total`: events put
//!   on and taken off the event bus ([`bus_published`], [`bus_received`]);
//!   a publish counts once NATS's client took it (within one process: at
//!   once).
//! - `natter_bus_resent_total`: resync hints and invalidations the NATS bus
//!   published again because the first may have been lost
//!   ([`bus_resent`]); `natter_bus_unsent_total`: events published after
//!   the bus's `close()`, which only this process's streams received
//!   ([`bus_unsent`]); `natter_bus_peer_resyncs_total`: times every local
//!   stream was told to re-read the store because another process was
//!   lost or lost events ([`bus_peer_resynced`]).
//! - `natter_bus_subscriptions`, `natter_bus_subscribes_total`,
//!   `natter_bus_unsubscribes_total`: the NATS subscriptions this process
//!   holds now, and how many it made and ended (interest routing follows
//!   the topics of local streams; [`bus_subscribed`], [`bus_unsubscribed`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    core::Collector,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Seconds; from half a millisecond (a cached read) to ten seconds.
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The descriptor sets of every gRPC service a natter server may serve:
/// natter's own (public and internal), grpc.health.v1 and server
/// reflection (v1 and v1alpha). Their methods are the only ones with a
/// metric series of their own.
const KNOWN_SERVICES: [&[u8]; 4] = [
    natter_proto::INTERNAL_FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// The `service` and `method` label of every call to a path that is no
/// method of [`KNOWN_SERVICES`] (a made-up path, a service this build does
/// not have): one series, however many such paths clients send.
const UNKNOWN: &str = "unknown";

/// gRPC status code names by number (grpc/doc/statuscodes.md).
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

struct Metrics {
    registry: Registry,
    rpc_requests: IntCounterVec,
    rpc_duration: HistogramVec,
    active_streams: IntGauge,
    connections_open: IntGaugeVec,
    handshake_timeouts: IntCounterVec,
    idle_closes: IntCounterVec,
    connection_cap_reached: IntCounterVec,
    address_cap_refusals: IntCounterVec,
    unread_answers_ended: IntCounterVec,
    request_budget_refusals: IntCounter,
    request_budget_address_refusals: IntCounter,
    tokenless_stream_refusals: IntCounterVec,
    bus_published: IntCounter,
    bus_received: IntCounter,
    bus_resent: IntCounter,
    bus_unsent: IntCounter,
    bus_peer_resyncs: IntCounter,
    bus_subscriptions: IntGauge,
    bus_subscribes: IntCounter,
    bus_unsubscribes: IntCounter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let rpc_requests = IntCounterVec::new(
        Opts::new("natter_rpc_requests_total", "RPCs finished, by service, method and gRPC status code."),
        &["service", "method", "code"],
    )
    .expect("valid metric");
    let rpc_duration = HistogramVec::new(
        HistogramOpts::new("natter_rpc_duration_seconds", "Time from an RPC's arrival to its final status.")
            .buckets(LATENCY_BUCKETS.to_vec()),
        &["service", "method"],
    )
    .expect("valid metric");
    let active_streams =
        IntGauge::new("natter_active_streams", "StreamEvents streams open now.").expect("valid metric");
    let connections_open = IntGaugeVec::new(
        Opts::new("natter_connections_open", "TCP connections a listener holds now, from accept to close."),
        &["listener"],
    )
    .expect("valid metric");
    let handshake_timeouts = IntCounterVec::new(
        Opts::new(
            "natter_connection_handshake_timeouts_total",
            "Connections closed because no request came within the handshake timeout.",
        ),
        &["listener"],
    )
    .expect("valid metric");
    let idle_closes = IntCounterVec::new(
        Opts::new(
            "natter_connection_idle_closes_total",
            "Connections closed because they had no call in flight for the idle timeout.",
        ),
        &["listener"],
    )
    .expect("valid metric");
    let connection_cap_reached = IntCounterVec::new(
        Opts::new(
            "natter_connection_cap_reached_total",
            "Times a listener stopped accepting because it held its maximum of connections.",
        ),
        &["listener"],
    )
    .expect("valid metric");
    let address_cap_refusals = IntCounterVec::new(
        Opts::new(
            "natter_connection_address_cap_refusals_total",
            "Connections closed at accept because their client address held its most connections.",
        ),
        &["listener"],
    )
    .expect("valid metric");
    let unread_answers_ended = IntCounterVec::new(
        Opts::new(
            "natter_unread_answers_ended_total",
            "Answers ended because they waited unread for the max unread answer time, by what was ended.",
        ),
        &["listener", "ended"],
    )
    .expect("valid metric");
    let request_budget_refusals = IntCounter::new(
        "natter_request_budget_refusals_total",
        "Calls refused because the process held its most bytes of buffered requests.",
    )
    .expect("valid metric");
    let request_budget_address_refusals = IntCounter::new(
        "natter_request_budget_address_refusals_total",
        "Calls refused because their client address held its share of the buffered request bytes.",
    )
    .expect("valid metric");
    let tokenless_stream_refusals = IntCounterVec::new(
        Opts::new(
            "natter_tokenless_stream_refusals_total",
            "Streaming calls without a token (reflection, health Watch) refused at their cap, by the cap met.",
        ),
        &["limit"],
    )
    .expect("valid metric");
    let bus_published =
        IntCounter::new("natter_bus_published_total", "Events published on the event bus.").expect("valid metric");
    let bus_received =
        IntCounter::new("natter_bus_received_total", "Events received from the event bus.").expect("valid metric");
    let bus_resent = IntCounter::new(
        "natter_bus_resent_total",
        "Resync hints and invalidations published again because the first may have been lost.",
    )
    .expect("valid metric");
    let bus_unsent = IntCounter::new(
        "natter_bus_unsent_total",
        "Events published after the bus closed: received by this process's streams only.",
    )
    .expect("valid metric");
    let bus_peer_resyncs = IntCounter::new(
        "natter_bus_peer_resyncs_total",
        "Times every local stream re-read the store because another process was lost or lost events.",
    )
    .expect("valid metric");
    let bus_subscriptions =
        IntGauge::new("natter_bus_subscriptions", "NATS subscriptions this process holds now.").expect("valid metric");
    let bus_subscribes =
        IntCounter::new("natter_bus_subscribes_total", "NATS subscriptions made (SUB).").expect("valid metric");
    let bus_unsubscribes =
        IntCounter::new("natter_bus_unsubscribes_total", "NATS subscriptions ended (UNSUB).").expect("valid metric");
    for collector in [
        Box::new(rpc_requests.clone()) as Box<dyn Collector>,
        Box::new(rpc_duration.clone()),
        Box::new(active_streams.clone()),
        Box::new(connections_open.clone()),
        Box::new(handshake_timeouts.clone()),
        Box::new(idle_closes.clone()),
        Box::new(connection_cap_reached.clone()),
        Box::new(address_cap_refusals.clone()),
        Box::new(unread_answers_ended.clone()),
        Box::new(request_budget_refusals.clone()),
        Box::new(request_budget_address_refusals.clone()),
        Box::new(tokenless_stream_refusals.clone()),
        Box::new(bus_published.clone()),
        Box::new(bus_received.clone()),
        Box::new(bus_resent.clone()),
        Box::new(bus_unsent.clone()),
        Box::new(bus_peer_resyncs.clone()),
        Box::new(bus_subscriptions.clone()),
        Box::new(bus_subscribes.clone()),
        Box::new(bus_unsubscribes.clone()),
    ] {
        registry.register(collector).expect("metric names are unique");
    }
    Metrics {
        registry,
        rpc_requests,
        rpc_duration,
        active_streams,
        connections_open,
        handshake_timeouts,
        idle_closes,
        connection_cap_reached,
        address_cap_refusals,
        unread_answers_ended,
        request_budget_refusals,
        request_budget_address_refusals,
        tokenless_stream_refusals,
        bus_published,
        bus_received,
        bus_resent,
        bus_unsent,
        bus_peer_resyncs,
        bus_subscriptions,
        bus_subscribes,
        bus_unsubscribes,
    }
});

/// Set once a metrics endpoint runs; until then the RPC layer skips its
/// bookkeeping (metrics are off by default).
static RECORDING: AtomicBool = AtomicBool::new(false);

/// Whether per-RPC metrics are kept (a metrics endpoint was started).
pub fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

/// Counts one open event stream while alive: create one when a StreamEvents
/// stream starts and keep it in the stream, so it drops when the stream ends
/// however it ends.
#[derive(Debug)]
#[must_use = "the stream counts as open only while the guard lives"]
pub struct StreamGuard(());

impl StreamGuard {
    /// Counts a stream as open (`natter_active_streams` + 1).
    pub fn new() -> Self {
        METRICS.active_streams.inc();
        Self(())
    }
}

impl Default for StreamGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        METRICS.active_streams.dec();
    }
}

/// Counts one open connection of a listener while alive
/// (`natter_connections_open{listener}`): the listener creates one at
/// accept and the connection keeps it until it closes.
#[derive(Debug)]
#[must_use = "the connection counts as open only while the guard lives"]
pub struct ConnectionGuard {
    open: IntGauge,
}

impl ConnectionGuard {
    /// Counts a connection of `listener` (`public`, `internal`) as open.
    pub fn new(listener: &str) -> Self {
        let open = METRICS.connections_open.with_label_values(&[listener]);
        open.inc();
        Self { open }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Counts a connection of `listener` closed because no request came within
/// the handshake timeout.
pub fn handshake_timed_out(listener: &str) {
    METRICS.handshake_timeouts.with_label_values(&[listener]).inc();
}

/// Counts a connection of `listener` closed because it had no call in
/// flight for the idle timeout.
pub fn idle_closed(listener: &str) {
    METRICS.idle_closes.with_label_values(&[listener]).inc();
}

/// Counts a time `listener` reached its cap of connections and stopped
/// accepting.
pub fn connection_cap_reached(listener: &str) {
    METRICS.connection_cap_reached.with_label_values(&[listener]).inc();
}

/// Counts a connection of `listener` closed at accept because its client
/// address held `--max-connections-per-address`.
pub fn address_cap_refused(listener: &str) {
    METRICS.address_cap_refusals.with_label_values(&[listener]).inc();
}

/// Counts an answer of `listener` ended because it waited unread for
/// `--max-unread-answer-time`; `ended`: `stream` (an HTTP/2 stream reset)
/// or `connection` (closed: a write made no progress).
pub fn unread_answer_ended(listener: &str, ended: &str) {
    METRICS.unread_answers_ended.with_label_values(&[listener, ended]).inc();
}

/// Counts a call refused because the process held its most bytes of
/// buffered requests (`--max-buffered-request-bytes`, `crate::budget`).
pub fn request_budget_refused() {
    METRICS.request_budget_refusals.inc();
}

/// Counts a call refused because its client address held its share of the
/// buffered request bytes (`--max-buffered-request-bytes-per-address`,
/// `crate::budget`).
pub fn request_budget_address_refused() {
    METRICS.request_budget_address_refusals.inc();
}

/// Counts a streaming call without a token refused at the cap `limit`
/// (`connection`, `address` or `server`; `crate::tokenless`).
pub fn tokenless_stream_refused(limit: &str) {
    METRICS.tokenless_stream_refusals.with_label_values(&[limit]).inc();
}

/// Registers a service's own metric in the process's registry, so that
/// `/metrics` ([`render`]) serves it beside the RPC metrics (the messages
/// writer registers its batch, commit and phase metrics so).
///
/// Panics when a metric of the same name is registered already: register
/// each once (behind a `LazyLock`).
pub fn register(collector: Box<dyn Collector>) {
    METRICS.registry.register(collector).expect("metric names are unique");
}

/// Counts `count` events published on the event bus.
pub fn bus_published(count: u64) {
    METRICS.bus_published.inc_by(count);
}

/// Counts `count` resync hints or invalidations published again.
pub fn bus_resent(count: u64) {
    METRICS.bus_resent.inc_by(count);
}

/// Counts `count` events published after the bus closed (sent to this
/// process's streams only).
pub fn bus_unsent(count: u64) {
    METRICS.bus_unsent.inc_by(count);
}

/// Counts `count` passes telling every local stream to re-read the store
/// because another process was lost or lost events.
pub fn bus_peer_resynced(count: u64) {
    METRICS.bus_peer_resyncs.inc_by(count);
}

/// Counts `count` events received from the event bus.
pub fn bus_received(count: u64) {
    METRICS.bus_received.inc_by(count);
}

/// Counts `count` NATS subscriptions made (and now held).
pub fn bus_subscribed(count: u64) {
    METRICS.bus_subscribes.inc_by(count);
    METRICS.bus_subscriptions.add(i64::try_from(count).unwrap_or(i64::MAX));
}

/// Counts `count` NATS subscriptions ended (and no longer held).
pub fn bus_unsubscribed(count: u64) {
    METRICS.bus_unsubscribes.inc_by(count);
    METRICS.bus_subscriptions.sub(i64::try_from(count).unwrap_or(i64::MAX));
}

/// Every metric in the text exposition format.
pub fn render() -> String {
    prometheus::TextEncoder::new().encode_to_string(&METRICS.registry.gather()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "encoding metrics failed");
        String::new()
    })
}

/// The metric handles of one RPC path, resolved once: the per-call cost is
/// one map lookup under a read lock, then atomics.
pub(crate) struct MethodMetrics {
    service: Box<str>,
    method: Box<str>,
    duration: Histogram,
    by_code: [OnceLock<IntCounter>; 17],
}

impl MethodMetrics {
    fn new(service: &str, method: &str) -> Self {
        Self {
            duration: METRICS.rpc_duration.with_label_values(&[service, method]),
            service: service.into(),
            method: method.into(),
            by_code: Default::default(),
        }
    }

    /// Records a finished call: its status `code` and `elapsed` time.
    pub(crate) fn finish(&self, code: i32, elapsed: Duration) {
        let index = usize::try_from(code).ok().filter(|&c| c < CODE_NAMES.len()).unwrap_or(2);
        self.by_code[index]
            .get_or_init(|| METRICS.rpc_requests.with_label_values(&[&self.service, &self.method, CODE_NAMES[index]]))
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// The handles for the RPC at `path` (`/package.Service/Method`): its own
/// for a method of [`KNOWN_SERVICES`], made on its first call and kept for
/// the process; for any other path the one `unknown` set, so that the
/// series are bounded by the methods natter has, and random paths cannot
/// take the places of real ones.
pub(crate) fn for_path(path: &str) -> &'static MethodMetrics {
    static KNOWN: LazyLock<HashMap<String, OnceLock<MethodMetrics>>> =
        LazyLock::new(|| known_paths().into_iter().map(|path| (path, OnceLock::new())).collect());
    static OTHER: LazyLock<MethodMetrics> = LazyLock::new(|| MethodMetrics::new(UNKNOWN, UNKNOWN));
    match KNOWN.get(path) {
        Some(cell) => cell.get_or_init(|| {
            let (service, method) = split_path(path);
            MethodMetrics::new(service, method)
        }),
        None => &OTHER,
    }
}

/// The path (`/package.Service/Method`) of every method of
/// [`KNOWN_SERVICES`].
fn known_paths() -> Vec<String> {
    use prost::Message as _;
    let mut paths = Vec::new();
    for encoded in KNOWN_SERVICES {
        let set = prost_types::FileDescriptorSet::decode(encoded).expect("the compiled-in descriptor sets are valid");
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                let prefix = if package.is_empty() {
                    service.name().to_owned()
                } else {
                    format!("{package}.{}", service.name())
                };
                paths.extend(service.method.iter().map(|m| format!("/{prefix}/{}", m.name())));
            }
        }
    }
    paths
}

/// `/package.Service/Method` as (`package.Service`, `Method`): the labels of
/// an RPC's metrics and the attributes of its span.
pub(crate) fn split_path(path: &str) -> (&str, &str) {
    let path = path.trim_start_matches('/');
    path.split_once('/').unwrap_or((path, ""))
}

/// A running metrics endpoint; dropping it stops it.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl MetricsServer {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds `addr` and serves `/metrics` there on a task of the current Tokio
/// runtime until the returned handle drops (see [`crate::telemetry::init`],
/// which calls it for `--metrics-listen`).
///
/// Errors: `addr` cannot be bound, or there is no Tokio runtime.
pub fn serve_on(addr: SocketAddr) -> std::io::Result<MetricsServer> {
    let runtime = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let listener = {
        let _entered = runtime.enter();
        TcpListener::from_std(listener)?
    };
    let stop = CancellationToken::new();
    RECORDING.store(true, Ordering::Relaxed);
    runtime.spawn(serve(listener, stop.clone()));
    Ok(MetricsServer { addr, stop })
}

/// Serves `GET /metrics` over plain HTTP/1.1 on `listener` until `shutdown`
/// is cancelled, and turns per-RPC metrics on.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    RECORDING.store(true, Ordering::Relaxed);
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    continue;
                }
            },
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer));
            tokio::select! {
                _ = connection => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

async fn answer(request: Request<Incoming>) -> Result<Response<String>, Infallible> {
    let response = |status: StatusCode, body: String| {
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response
    };
    Ok(match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let mut ok = response(StatusCode::OK, render());
            ok.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            ok
        }
        (_, "/metrics") => response(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into()),
        _ => response(StatusCode::NOT_FOUND, "metrics are at /metrics\n".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made-up paths, however many, share the one `unknown` series and
    /// take no place from a real method: one called after 600 of them has
    /// its own labels (it fell under a catch-all once 512 paths had come).
    #[test]
    fn only_natter_s_methods_get_series_of_their_own() {
        for i in 0..600 {
            let made_up = for_path(&format!("/evil.Service/Method{i}"));
            assert_eq!((&*made_up.service, &*made_up.method), (UNKNOWN, UNKNOWN));
        }
        for (path, service, method) in [
            ("/natter.messages.v1.MessageService/SendMessage", "natter.messages.v1.MessageService", "SendMessage"),
            (
                "/natter.sessions.v1.SessionInternalService/IntrospectSession",
                "natter.sessions.v1.SessionInternalService",
                "IntrospectSession",
            ),
            ("/grpc.health.v1.Health/Check", "grpc.health.v1.Health", "Check"),
            (
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                "grpc.reflection.v1alpha.ServerReflection",
                "ServerReflectionInfo",
            ),
        ] {
            let known = for_path(path);
            assert_eq!((&*known.service, &*known.method), (service, method), "{path}");
        }
        // A real service with a made-up method, or a near miss, is unknown too.
        assert_eq!(&*for_path("/natter.messages.v1.MessageService/Nope").service, UNKNOWN);
        assert_eq!(&*for_path("natter.messages.v1.MessageService/SendMessage").service, UNKNOWN);
    }
}

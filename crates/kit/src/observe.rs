//! The per-RPC tower layer: a span for every call (a child of the caller's
//! trace when the request carries one) that ends with the call's gRPC status,
//! and the call's request count and latency. Calls of the standard health
//! service (`grpc.health.v1.Health`) get no span unless
//! [`crate::telemetry::trace_health_checks`] says so: probes every few
//! seconds would otherwise be a trace each.
//!
//! The same body and future wrappers finish the client spans of calls to
//! other services: [`Propagate`] on the channels of the split services,
//! [`in_process`] around the all-in-one's direct calls.
//!
//! The final status of a gRPC call is in the response headers when the call
//! failed before sending anything (trailers-only), else in the trailers at
//! the end of the body; the layer watches both, so a server stream is
//! measured until its last message. It sits inside gRPC-web translation, so
//! it sees plain gRPC either way.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};

use crate::metrics::MethodMetrics;

/// See the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RpcLayer;

impl<S> tower::Layer<S> for RpcLayer {
    type Service = Rpc<S>;

    fn layer(&self, inner: S) -> Rpc<S> {
        Rpc { inner }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Rpc<S> {
    inner: S,
}

/// One call in flight: what finishing it must update.
struct Call {
    span: tracing::Span,
    metrics: Option<&'static MethodMetrics>,
    start: Instant,
    /// The caller's side of the call (a client span).
    client: bool,
}

impl Call {
    fn finish(self, code: i32, message: Option<&str>) {
        let elapsed = self.start.elapsed();
        if let Some(metrics) = self.metrics {
            metrics.finish(code, elapsed);
        }
        record_status(&self.span, code, message, self.client, elapsed);
    }
}

/// Records a call's end on its span: the gRPC status code, its message (as
/// `otel.status_description`) and whether the span is an error, following
/// the OpenTelemetry semantic conventions for gRPC: on a client span every
/// code but OK is an error; on a server span only the codes that are the
/// server's fault (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
/// UNAVAILABLE, DATA_LOSS).
fn record_status(span: &tracing::Span, code: i32, message: Option<&str>, client: bool, elapsed: Duration) {
    span.record("rpc.grpc.status_code", code);
    if let Some(message) = message.filter(|m| !m.is_empty()) {
        span.record("otel.status_description", message);
    }
    if client && code != 0 {
        span.record("otel.status_code", "ERROR");
        tracing::debug!(parent: span, code, elapsed_ms = elapsed.as_secs_f64() * 1e3, "rpc finished");
        return;
    }
    if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
        span.record("otel.status_code", "ERROR");
    }
    tracing::debug!(parent: span, code, elapsed_ms = elapsed.as_secs_f64() * 1e3, "rpc finished");
}

/// One span per RPC, named after the gRPC method (`package.Service/Method`),
/// with the OpenTelemetry RPC semantic-convention attributes; the status code
/// is recorded when the call ends. Domain functions add the ids that matter
/// (chat_id, seq) in child spans; never tokens, passwords or message text.
fn rpc_span(path: &str) -> tracing::Span {
    if !crate::telemetry::trace_health_checks() && path.starts_with("/grpc.health.v1.Health/") {
        return tracing::Span::none();
    }
    span_of("server", path, None)
}

/// The client span of a call to another service: `path` is the gRPC path
/// (`/package.Service/Method`), `server` the callee's `host:port` (or
/// `in-process` in the all-in-one). OpenTelemetry RPC semantic conventions:
/// `rpc.system`, `rpc.service`, `rpc.method`, `server.address`, and at the
/// end `rpc.grpc.status_code` with the status message.
pub fn client_span(path: &str, server: &str) -> tracing::Span {
    span_of("client", path, Some(server))
}

/// The span of one side (`kind`: "server" or "client") of the call `path`.
fn span_of(kind: &'static str, path: &str, server: Option<&str>) -> tracing::Span {
    let (service, method) = crate::metrics::split_path(path);
    let span = tracing::info_span!(
        "rpc",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = kind,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        server.address = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    if let Some(server) = server {
        span.record("server.address", server);
    }
    span
}

/// Finishes a client `span` (see [`client_span`]) with a call's outcome
/// that never reached the wire or came back as a [`tonic::Status`] (the
/// in-process calls of the all-in-one).
pub(crate) fn finish_client_span(span: &tracing::Span, code: i32, message: &str, start: Instant) {
    record_status(span, code, Some(message), true, start.elapsed());
}

/// The response future of a call to another service whose client `span`
/// ends with the call: the status of trailers-only answers, of the
/// trailers, or UNAVAILABLE with the transport's error.
pub fn client_future<F>(span: tracing::Span, inner: F) -> RpcFuture<F> {
    RpcFuture { inner, call: Some(Call { span, metrics: None, start: Instant::now(), client: true }) }
}

/// `grpc-status` of a header or trailer map, when present.
fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    let value = headers.get("grpc-status")?.as_bytes();
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// `grpc-message` of a header or trailer map, percent-decoded (gRPC over
/// HTTP/2 sends it percent-encoded), when present.
fn grpc_message(headers: &HeaderMap) -> Option<String> {
    let raw = headers.get("grpc-message")?.as_bytes();
    Some(percent_encoding::percent_decode(raw).decode_utf8_lossy().into_owned())
}

impl<S, B> tower::Service<Request<tonic::body::Body>> for Rpc<S>
where
    S: tower::Service<Request<tonic::body::Body>, Response = Response<B>>,
    S::Error: std::fmt::Display,
    B: Body,
{
    type Response = Response<RpcBody<B>>;
    type Error = S::Error;
    type Future = RpcFuture<tokio::task::futures::TaskLocalFuture<Instant, S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let start = Instant::now();
        let path = request.uri().path();
        let span = rpc_span(path);
        crate::telemetry::set_remote_parent(&span, request.headers());
        let metrics = crate::metrics::recording().then(|| crate::metrics::for_path(path));
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        // The replicas' caches look up the call's arrival, so that all its
        // look-ups share one sync (see `crate::cache`).
        let future = crate::cache::within_call(start, future);
        RpcFuture { inner: future, call: Some(Call { span, metrics, start, client: false }) }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Rpc`].
    pub struct RpcFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, B, E> Future for RpcFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
    E: std::fmt::Display,
{
    type Output = Result<Response<RpcBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.call.as_ref().map(|c| c.span.enter());
            ready!(this.inner.poll(cx))
        };
        let call = this.call.take();
        Poll::Ready(match result {
            Ok(response) => {
                let call = match (call, grpc_status(response.headers())) {
                    // Trailers-only: the call is over already.
                    (Some(call), Some(code)) => {
                        call.finish(code, grpc_message(response.headers()).as_deref());
                        None
                    }
                    // No status and nothing to come: not a gRPC answer.
                    (Some(call), None) if response.body().is_end_stream() => {
                        call.finish(2, Some("an answer without a gRPC status"));
                        None
                    }
                    (call, _) => call,
                };
                Ok(response.map(|inner| RpcBody { inner, call }))
            }
            Err(e) => {
                if let Some(call) = call {
                    // A client that got no answer: the callee is
                    // unreachable (tonic answers UNAVAILABLE).
                    let code = if call.client { 14 } else { 2 };
                    call.finish(code, Some(&e.to_string()));
                }
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that finishes its call at the trailers (or when
    /// dropped early: the client went away).
    pub struct RpcBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for RpcBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.finish(1, None);
            }
        }
    }
}

impl<B: Body> Body for RpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = {
            let _entered = this.call.as_ref().map(|c| c.span.enter());
            ready!(this.inner.poll_frame(cx))
        };
        let end = match &frame {
            Some(Ok(frame)) => frame.trailers_ref().map(|t| (grpc_status(t).unwrap_or(2), grpc_message(t))),
            Some(Err(_)) => Some((2, None)),
            // Ended without trailers: not a proper gRPC ending.
            None => Some((2, None)),
        };
        if let Some((code, message)) = end
            && let Some(call) = this.call.take()
        {
            call.finish(code, message.as_deref());
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Runs `call`, a call of the gRPC method `path` to a service in this
/// process, inside a client span like the one a call over the network gets
/// (`server.address` = `in-process`), finished with its status.
pub async fn in_process<T>(
    path: &'static str,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    if !crate::telemetry::exporting() {
        return call.await;
    }
    let span = client_span(path, "in-process");
    let start = Instant::now();
    let result = tracing::Instrument::instrument(call, span.clone()).await;
    match &result {
        Ok(_) => finish_client_span(&span, 0, "", start),
        Err(status) => finish_client_span(&span, status.code() as i32, status.message(), start),
    }
    result
}

/// A tower layer for clients: every request leaves with the current span's
/// trace context ([`crate::telemetry::inject_headers`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct PropagateLayer;

impl<S> tower::Layer<S> for PropagateLayer {
    type Service = Propagate<S>;

    fn layer(&self, inner: S) -> Propagate<S> {
        Propagate { inner, header: None, server: None }
    }
}

/// See [`PropagateLayer`]. Calls to another natter service's internal
/// listener also carry a fixed header, the service credential (set by
/// `internal::Link`).
#[derive(Clone)]
pub struct Propagate<S> {
    inner: S,
    header: Option<(http::HeaderName, http::HeaderValue)>,
    /// The callee's `host:port`, for the client spans' `server.address`.
    server: Option<std::sync::Arc<str>>,
}

impl<S> Propagate<S> {
    /// Every request also carries `name: value`, replacing any there.
    pub(crate) fn with_header(mut self, name: http::HeaderName, value: http::HeaderValue) -> Self {
        self.header = Some((name, value));
        self
    }

    /// Names the callee in client spans: `server` is its `host:port`.
    pub(crate) fn with_server(mut self, server: &str) -> Self {
        self.server = Some(server.into());
        self
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Propagate<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Propagate").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for Propagate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Error: std::fmt::Display,
    RB: http_body::Body,
{
    type Response = http::Response<RpcBody<RB>>;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    /// Opens the call's client span (when spans are exported), writes its
    /// trace context into the request, and finishes the span with the
    /// call's status.
    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let span = if crate::telemetry::exporting() {
            let uri = request.uri();
            // tonic adds the origin inside the channel: the link's own
            // address, else whatever authority the request has.
            let server = self.server.as_deref().or_else(|| uri.authority().map(|a| a.as_str())).unwrap_or_default();
            client_span(uri.path(), server)
        } else {
            tracing::Span::none()
        };
        let future = {
            let _entered = span.enter();
            crate::telemetry::inject_headers(request.headers_mut());
            if let Some((name, value)) = &self.header {
                request.headers_mut().insert(name.clone(), value.clone());
            }
            self.inner.call(request)
        };
        client_future(span, future)
    }
}

/// A tonic channel whose calls carry trace context: what service-to-service
/// clients use.
pub type TracedChannel = Propagate<tonic::transport::Channel>;

/// Wraps `channel` so its calls carry trace context.
pub fn traced(channel: tonic::transport::Channel) -> TracedChannel {
    Propagate { inner: channel, header: None, server: None }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use http_body_util::BodyExt as _;
    use tower::{Layer as _, ServiceExt as _};

    /// A handler answering with one message, then trailers carrying
    /// `grpc-status: <x-code>` (the request's header).
    async fn handler(request: Request<tonic::body::Body>) -> Result<Response<tonic::body::Body>, Infallible> {
        let code = request.headers()["x-code"].clone();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", code);
        let frames =
            [Ok::<_, tonic::Status>(Frame::data(bytes::Bytes::from_static(b"x"))), Ok(Frame::trailers(trailers))];
        Ok(Response::new(tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)))))
    }

    fn count(service_method: &str, code: &str) -> f64 {
        let (service, method) = service_method.split_once('/').unwrap();
        let wanted = format!(r#"natter_rpc_requests_total{{code="{code}",method="{method}",service="{service}"}} "#);
        crate::metrics::render().lines().find_map(|l| l.strip_prefix(&wanted)?.parse().ok()).unwrap_or(0.0)
    }

    async fn call(path: &str, code: &str) -> Response<RpcBody<tonic::body::Body>> {
        let service = RpcLayer.layer(tower::service_fn(handler));
        let request = Request::builder().uri(path).header("x-code", code).body(tonic::body::Body::empty()).unwrap();
        service.oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn status_comes_from_trailers_or_counts_as_cancelled() {
        let _endpoint = crate::metrics::serve_on("127.0.0.1:0".parse().unwrap()).unwrap();
        // Read to the end: the trailers' code.
        call("/natter.chats.v1.ChatService/GetChat", "5").await.into_body().collect().await.unwrap();
        assert_eq!(count("natter.chats.v1.ChatService/GetChat", "NOT_FOUND"), 1.0);
        // Dropped before the trailers: the client went away.
        drop(call("/natter.chats.v1.ChatService/ListChats", "0").await);
        assert_eq!(count("natter.chats.v1.ChatService/ListChats", "CANCELLED"), 1.0);
        assert_eq!(count("natter.chats.v1.ChatService/ListChats", "OK"), 0.0);
    }
}

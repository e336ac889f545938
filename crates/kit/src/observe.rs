//! The per-RPC tower layer: a span for every call (a child of the caller's
//! trace when the request carries one) that ends with the call's gRPC status,
//! and the call's request count and latency.
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
}

impl Call {
    fn finish(self, code: i32) {
        let elapsed = self.start.elapsed();
        if let Some(metrics) = self.metrics {
            metrics.finish(code, elapsed);
        }
        record_status(&self.span, code, elapsed);
    }
}

fn record_status(span: &tracing::Span, code: i32, elapsed: Duration) {
    span.record("rpc.grpc.status_code", code);
    // OpenTelemetry's RPC conventions: for a server, these codes are the
    // server's fault and mark the span as an error; the rest are the caller's.
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
    let (service, method) = crate::metrics::split_path(path);
    tracing::info_span!(
        "rpc",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
    )
}

/// `grpc-status` of a header or trailer map, when present.
fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    let value = headers.get("grpc-status")?.as_bytes();
    std::str::from_utf8(value).ok()?.parse().ok()
}

impl<S, B> tower::Service<Request<tonic::body::Body>> for Rpc<S>
where
    S: tower::Service<Request<tonic::body::Body>, Response = Response<B>>,
    B: Body,
{
    type Response = Response<RpcBody<B>>;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

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
        RpcFuture { inner: future, call: Some(Call { span, metrics, start }) }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Rpc`].
    pub(crate) struct RpcFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, B, E> Future for RpcFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
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
                        call.finish(code);
                        None
                    }
                    // No status and nothing to come: not a gRPC answer.
                    (Some(call), None) if response.body().is_end_stream() => {
                        call.finish(2);
                        None
                    }
                    (call, _) => call,
                };
                Ok(response.map(|inner| RpcBody { inner, call }))
            }
            Err(e) => {
                if let Some(call) = call {
                    call.finish(2);
                }
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that finishes its call at the trailers (or when
    /// dropped early: the client went away).
    pub(crate) struct RpcBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for RpcBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.finish(1);
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
        let code = match &frame {
            Some(Ok(frame)) => frame.trailers_ref().map(|t| grpc_status(t).unwrap_or(2)),
            Some(Err(_)) => Some(2),
            // Ended without trailers: not a proper gRPC ending.
            None => Some(2),
        };
        if let Some(code) = code
            && let Some(call) = this.call.take()
        {
            call.finish(code);
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use http_body_util::BodyExt as _;
    use tower::{Layer as _, ServiceExt as _};

    /// A handler answering `/t.S/<code>` with one message, then trailers
    /// carrying `grpc-status: <code>`.
    async fn handler(request: Request<tonic::body::Body>) -> Result<Response<tonic::body::Body>, Infallible> {
        let code = request.uri().path().rsplit('/').next().unwrap().to_owned();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", code.parse().unwrap());
        let frames =
            [Ok::<_, tonic::Status>(Frame::data(bytes::Bytes::from_static(b"x"))), Ok(Frame::trailers(trailers))];
        Ok(Response::new(tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)))))
    }

    fn count(service_method: &str, code: &str) -> f64 {
        let (service, method) = service_method.split_once('/').unwrap();
        let wanted = format!(r#"natter_rpc_requests_total{{code="{code}",method="{method}",service="{service}"}} "#);
        crate::metrics::render().lines().find_map(|l| l.strip_prefix(&wanted)?.parse().ok()).unwrap_or(0.0)
    }

    async fn call(path: &str) -> Response<RpcBody<tonic::body::Body>> {
        let service = RpcLayer.layer(tower::service_fn(handler));
        let request = Request::builder().uri(path).body(tonic::body::Body::empty()).unwrap();
        service.oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn status_comes_from_trailers_or_counts_as_cancelled() {
        let _endpoint = crate::metrics::serve_on("127.0.0.1:0".parse().unwrap()).unwrap();
        // Read to the end: the trailers' code.
        call("/t.S/5").await.into_body().collect().await.unwrap();
        assert_eq!(count("t.S/5", "NOT_FOUND"), 1.0);
        // Dropped before the trailers: the client went away.
        drop(call("/t.S/0").await);
        assert_eq!(count("t.S/0", "CANCELLED"), 1.0);
        assert_eq!(count("t.S/0", "OK"), 0.0);
    }
}

//! A request whose body the client cut short is the client's fault, and is
//! answered and counted so: CANCELLED when its connection or stream failed
//! mid-body (it went away, or reset the call), INVALID_ARGUMENT when the body
//! ended inside a gRPC frame or inside a base64 quantum of gRPC-web text.
//!
//! tonic-web turns any failure of the body under it into INTERNAL
//! (`tonic-web: error reading a body from connection`), keeping only the
//! error's text, and tonic's decoder answers a body that ends inside a frame
//! INTERNAL (`Unexpected EOF decoding stream.`): both were logged and
//! counted as server errors. [`WatchBodyLayer`], outside gRPC-web, keeps
//! what failed the body as it came off the connection; [`by_the_client`],
//! inside the span and metrics, answers with that instead of the INTERNAL it
//! became. A body that ended cleanly but inside a frame or a base64
//! quantum is tonic's and tonic-web's own answer, corrected by its message
//! in `crate::serve`'s table of tonic's answers. The trade-off: only an
//! answer that travels trailers-only (a failure before any message
//! was sent, which is every unary and server-streaming call's) is
//! corrected. natter's one bidirectional stream, reflection, is not
//! affected: cut mid-way, tonic-reflection ends it OK (it stops at its
//! request stream's first error), so it is recorded as OK, not CANCELLED.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tonic::Code;

/// What failed a request's body as it came off the connection, if anything
/// did: the answer's code and message.
#[derive(Clone, Debug, Default)]
struct Cut(Arc<OnceLock<(Code, String)>>);

/// Watches each request body as it comes off the connection, outside
/// gRPC-web, and keeps what failed it in the request's extensions for
/// [`AnswerCutBodiesLayer`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WatchBodyLayer;

impl<S> tower::Layer<S> for WatchBodyLayer {
    type Service = WatchBody<S>;

    fn layer(&self, inner: S) -> WatchBody<S> {
        WatchBody { inner }
    }
}

/// See [`WatchBodyLayer`].
#[derive(Clone, Debug)]
pub(crate) struct WatchBody<S> {
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for WatchBody<S>
where
    S: tower::Service<Request<Watched<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> S::Future {
        let (mut parts, body) = request.into_parts();
        let cut = Cut::default();
        parts.extensions.insert(cut.clone());
        self.inner.call(Request::from_parts(parts, Watched { inner: body, cut }))
    }
}

pin_project_lite::pin_project! {
    /// A request body whose failure is kept ([`WatchBodyLayer`]).
    pub(crate) struct Watched<B> {
        #[pin]
        inner: B,
        cut: Cut,
    }
}

impl<B> Body for Watched<B>
where
    B: Body,
    B::Error: std::fmt::Display,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Err(e)) = &frame {
            // The connection or the stream failed under the body: the client
            // went away, reset its call, or its connection broke.
            let _ = this.cut.0.set((Code::Cancelled, format!("the request body ended early: {e}")));
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

/// Answers a call whose body the client cut short as [`by_the_client`]
/// says; innermost, so the span, the metrics and gRPC-web see its answer.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AnswerCutBodiesLayer;

impl<S> tower::Layer<S> for AnswerCutBodiesLayer {
    type Service = AnswerCutBodies<S>;

    fn layer(&self, inner: S) -> AnswerCutBodies<S> {
        AnswerCutBodies { inner }
    }
}

/// See [`AnswerCutBodiesLayer`].
#[derive(Clone, Debug)]
pub(crate) struct AnswerCutBodies<S> {
    inner: S,
}

impl<S, B, R> tower::Service<Request<B>> for AnswerCutBodies<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Answered<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let cut = request.extensions().get::<Cut>().cloned();
        Answered { inner: self.inner.call(request), cut }
    }
}

pin_project_lite::pin_project! {
    /// The answer of [`AnswerCutBodies`].
    pub(crate) struct Answered<F> {
        #[pin]
        inner: F,
        cut: Option<Cut>,
    }
}

impl<F, R, E> Future for Answered<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = Result<Response<R>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let cut = this.cut.as_ref().and_then(|c| c.0.get());
        Poll::Ready(Ok(by_the_client(response, cut)))
    }
}

/// `response`, answered as the client's fault when it is an INTERNAL (or
/// UNKNOWN) that a cut body caused: `cut`, what failed the body as it came
/// off the connection. Any other answer goes as it is (tonic's answers to
/// a body that ended inside a frame or a base64 quantum are
/// `crate::serve`'s table's).
pub(crate) fn by_the_client<R>(mut response: Response<R>, cut: Option<&(Code, String)>) -> Response<R> {
    let Some((code, message)) = cut else { return response };
    let headers = response.headers_mut();
    if !matches!(headers.get("grpc-status").map(HeaderValue::as_bytes), Some(b"13" | b"2")) {
        return response;
    }
    headers.remove("grpc-message");
    headers.remove("grpc-status-details-bin");
    // Cannot fail: the message is ASCII, percent-encoded, with no details.
    let _ = tonic::Status::new(*code, message.clone()).add_header(headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(code: &'static str, message: &'static str) -> Response<()> {
        let mut response = Response::new(());
        response.headers_mut().insert("grpc-status", HeaderValue::from_static(code));
        response.headers_mut().insert("grpc-message", HeaderValue::from_static(message));
        response
    }

    fn status(response: &Response<()>) -> tonic::Status {
        tonic::Status::from_header_map(response.headers()).expect("a status")
    }

    #[test]
    fn a_cut_body_is_answered_by_its_cause_and_other_answers_stay() {
        let cause = (Code::Cancelled, "the request body ended early: gone".to_owned());
        let gone = by_the_client(answer("13", "tonic-web:%20error%20reading%20a%20body"), Some(&cause));
        assert_eq!((status(&gone).code(), status(&gone).message()), (Code::Cancelled, cause.1.as_str()));
        // A server's own INTERNAL, and any other code, go as they are.
        let own = by_the_client(answer("13", "database%20down"), None);
        assert_eq!((status(&own).code(), status(&own).message()), (Code::Internal, "database down"));
        let denied = by_the_client(answer("7", "not%20a%20member"), Some(&cause));
        assert_eq!(status(&denied).code(), Code::PermissionDenied);
    }
}

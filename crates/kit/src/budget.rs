//! The budget of request bytes a public server holds at once, all calls
//! together (`--max-buffered-request-bytes`), and the tower layer that
//! keeps every request body within it.
//!
//! Each request is capped on its own (`--max-request-bytes`), but a server
//! reads a message whole before decoding it, so a client that sends many
//! messages slowly, on many streams and connections, made it hold a
//! megabyte for each, with no limit all together. Here every byte of a
//! request body is taken from one budget as the server reads it and given
//! back once the message it belongs to has been decoded (the next time the
//! reader asks for more), or when the body goes: finished, refused, or its
//! client gone mid-message. A body whose next frame does not fit is refused
//! at once, RESOURCE_EXHAUSTED "server busy" with a RetryInfo, and counted
//! (`natter_request_budget_refusals_total`): a busy server refuses the call
//! that would go past it instead of growing its memory. The trade-off: a
//! frame is a unit, so a budget smaller than one frame (16 KiB on HTTP/2)
//! refuses every call that sends one.
//!
//! A reader that keeps the bytes after reading them (the edge, which holds
//! a request until its replica answers) calls [`HeldBytes::keep`]: its
//! bytes then stay taken until the last [`HeldBytes`] goes.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::Semaphore;

/// How long a client refused for a full budget is told to wait (RetryInfo):
/// a unary call is answered within milliseconds, so the budget frees fast.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The request bytes one server may hold at once: one permit a byte.
#[derive(Clone, Debug)]
pub struct RequestBudget {
    bytes: Arc<Semaphore>,
}

impl RequestBudget {
    /// A budget of `max_bytes` (`--max-buffered-request-bytes`; more than
    /// a semaphore counts is clamped to what it does, about 2^61).
    pub fn new(max_bytes: u64) -> Self {
        let permits = usize::try_from(max_bytes).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        Self { bytes: Arc::new(Semaphore::new(permits)) }
    }

    /// Takes `n` bytes, if there is room for them.
    fn take(&self, n: usize) -> bool {
        let Ok(n) = u32::try_from(n) else { return false };
        self.bytes.try_acquire_many(n).map(tokio::sync::SemaphorePermit::forget).is_ok()
    }

    fn give_back(&self, n: usize) {
        if n > 0 {
            self.bytes.add_permits(n);
        }
    }
}

/// RESOURCE_EXHAUSTED for a call refused because its server holds
/// `--max-buffered-request-bytes` of requests: "server busy", with a
/// RetryInfo of [`BUSY_RETRY_AFTER`].
fn server_busy() -> tonic::Status {
    crate::limits::server_busy("too many request bytes in flight", BUSY_RETRY_AFTER)
}

/// Puts every request body of the service it wraps on a [`RequestBudget`]
/// ([`BudgetedBody`]), and a [`HeldBytes`] for it in the request's
/// extensions.
#[derive(Clone, Debug)]
pub struct RequestBudgetLayer {
    budget: RequestBudget,
}

impl RequestBudgetLayer {
    /// A layer taking from `budget` (one per server: all its calls share it).
    pub fn new(budget: RequestBudget) -> Self {
        Self { budget }
    }
}

impl<S> tower::Layer<S> for RequestBudgetLayer {
    type Service = Budgeted<S>;

    fn layer(&self, inner: S) -> Budgeted<S> {
        Budgeted { inner, budget: self.budget.clone() }
    }
}

/// See [`RequestBudgetLayer`].
#[derive(Clone, Debug)]
pub struct Budgeted<S> {
    inner: S,
    budget: RequestBudget,
}

impl<S, B> tower::Service<http::Request<B>> for Budgeted<S>
where
    S: tower::Service<http::Request<BudgetedBody<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        let (mut parts, body) = request.into_parts();
        let held = HeldBytes(Arc::new(Kept {
            budget: self.budget.clone(),
            kept: AtomicBool::new(false),
            bytes: AtomicUsize::new(0),
        }));
        parts.extensions.insert(held.clone());
        let body = BudgetedBody {
            inner: body,
            account: Account { held, taken: 0, partial: 0 },
            framing: Framing::default(),
            refused: false,
        };
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

/// A request's bytes on the budget, found in its extensions: by default
/// given back as its messages are decoded; [`HeldBytes::keep`] holds them
/// until the last clone of this goes.
#[derive(Clone, Debug)]
pub struct HeldBytes(Arc<Kept>);

#[derive(Debug)]
struct Kept {
    budget: RequestBudget,
    /// Set by [`HeldBytes::keep`].
    kept: AtomicBool,
    /// Bytes handed over by a kept body when it went.
    bytes: AtomicUsize,
}

impl HeldBytes {
    /// Holds the request's bytes, all it reads, until this (and every
    /// clone) is dropped, instead of giving back each message's once it is
    /// decoded: for a reader that keeps the bytes themselves. Call it before
    /// reading the body.
    pub fn keep(&self) {
        self.0.kept.store(true, Ordering::Relaxed);
    }

    fn kept(&self) -> bool {
        self.0.kept.load(Ordering::Relaxed)
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.budget.give_back(*self.bytes.get_mut());
    }
}

/// What one body has taken from the budget; all of it goes back (or, kept,
/// to its [`HeldBytes`]) when the body goes.
struct Account {
    held: HeldBytes,
    /// Taken and not given back.
    taken: usize,
    /// Of `taken`, the bytes of the message not yet whole.
    partial: usize,
}

impl Drop for Account {
    fn drop(&mut self) {
        if self.held.kept() {
            self.held.0.bytes.fetch_add(self.taken, Ordering::Relaxed);
        } else {
            self.held.0.budget.give_back(self.taken);
        }
    }
}

/// Where a body stands in gRPC's framing ("Length-Prefixed-Message": a
/// flag byte and a big-endian u32 length, then that many bytes; gRPC over
/// HTTP/2, "Requests"), so that a whole message's bytes can go back.
#[derive(Default)]
struct Framing {
    prefix: [u8; 5],
    /// Bytes of the prefix read (5: in the message).
    prefix_read: usize,
    /// Bytes of the message still to come.
    left: u64,
}

impl Framing {
    /// Reads `data` on from where the last call stopped; returns how many
    /// of its bytes, from its start, end with the last message made whole
    /// in it (0: none).
    fn advance(&mut self, data: &[u8]) -> usize {
        let mut at = 0;
        let mut whole = 0;
        while at < data.len() {
            if self.prefix_read < self.prefix.len() {
                let n = (self.prefix.len() - self.prefix_read).min(data.len() - at);
                self.prefix[self.prefix_read..self.prefix_read + n].copy_from_slice(&data[at..at + n]);
                self.prefix_read += n;
                at += n;
                if self.prefix_read < self.prefix.len() {
                    break;
                }
                let [_, len @ ..] = self.prefix;
                self.left = u64::from(u32::from_be_bytes(len));
            }
            let n = usize::try_from(self.left).unwrap_or(usize::MAX).min(data.len() - at);
            self.left -= n as u64;
            at += n;
            if self.left == 0 {
                self.prefix_read = 0;
                whole = at;
            }
        }
        whole
    }
}

pin_project_lite::pin_project! {
    /// A request body whose bytes are taken from a [`RequestBudget`] as
    /// they are read (see the module docs). Its error is the inner body's,
    /// or, for a frame the budget has no room for, RESOURCE_EXHAUSTED
    /// "server busy" with a RetryInfo (a [`tonic::Status`], which tonic
    /// answers the call with as it is).
    pub struct BudgetedBody<B> {
        #[pin]
        inner: B,
        account: Account,
        framing: Framing,
        refused: bool,
    }
}

impl<B> http_body::Body for BudgetedBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<tower::BoxError>,
{
    type Data = Bytes;
    type Error = tower::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let account = this.account;
        // A reader asks for more only once it has taken every whole message
        // it was given (tonic's decoder does): their bytes are its now.
        if !account.held.kept() {
            account.held.0.budget.give_back(account.taken - account.partial);
            account.taken = account.partial;
        }
        if *this.refused {
            return Poll::Ready(None);
        }
        let frame = match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            if !account.held.0.budget.take(data.len()) {
                *this.refused = true;
                crate::metrics::request_budget_refused();
                tracing::debug!(bytes = account.taken + data.len(), "request budget full; refusing a call");
                return Poll::Ready(Some(Err(Box::new(server_busy()))));
            }
            account.taken += data.len();
            match this.framing.advance(data) {
                0 => account.partial += data.len(),
                whole => account.partial = data.len() - whole,
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.refused || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use tower::Layer as _;

    fn message(len: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.resize(5 + len as usize, b'x');
        bytes
    }

    #[test]
    fn framing_finds_the_ends_of_messages_across_frames() {
        let mut framing = Framing::default();
        let two = [message(3), message(0)].concat();
        assert_eq!(framing.advance(&two), two.len(), "both whole");
        let one = message(10);
        assert_eq!(framing.advance(&one[..2]), 0, "in the prefix");
        assert_eq!(framing.advance(&one[2..7]), 0, "in the message");
        let next = message(4);
        assert_eq!(framing.advance(&[&one[7..], &next[..3]].concat()), 8, "the end of the first, not the second");
        assert_eq!(framing.advance(&next[3..]), 6);
    }

    /// A body of `frames`, on `budget`.
    fn body(
        budget: &RequestBudget,
        frames: Vec<Vec<u8>>,
    ) -> (BudgetedBody<impl http_body::Body<Data = Bytes, Error = std::convert::Infallible>>, HeldBytes) {
        let frames = frames.into_iter().map(|f| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(f))));
        let inner = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let request = http::Request::new(inner);
        let mut service = RequestBudgetLayer::new(budget.clone()).layer(tower::service_fn(
            |request: http::Request<BudgetedBody<_>>| async move { Ok::<_, std::convert::Infallible>(request) },
        ));
        let request = futures::executor::block_on(tower::ServiceExt::oneshot(&mut service, request)).unwrap();
        let held = request.extensions().get::<HeldBytes>().unwrap().clone();
        (request.into_body(), held)
    }

    fn room(budget: &RequestBudget) -> usize {
        budget.bytes.available_permits()
    }

    #[tokio::test]
    async fn whole_messages_go_back_as_the_reader_asks_for_more_and_the_rest_when_the_body_goes() {
        let budget = RequestBudget::new(100);
        let first = message(20);
        let (mut body, _held) = body(&budget, vec![first[..10].to_vec(), [&first[10..], &message(30)[..5]].concat()]);
        body.frame().await.unwrap().unwrap();
        assert_eq!(room(&budget), 90);
        body.frame().await.unwrap().unwrap();
        assert_eq!(room(&budget), 100 - 30, "the first whole, 5 of the next");
        assert!(body.frame().await.is_none());
        assert_eq!(room(&budget), 95, "the first decoded; the partial one held");
        drop(body);
        assert_eq!(room(&budget), 100, "all back with the body");
    }

    #[tokio::test]
    async fn a_frame_past_the_budget_is_refused_as_server_busy_and_its_body_let_go() {
        let budget = RequestBudget::new(30);
        let (mut holder, _h) = body(&budget, vec![message(100)[..20].to_vec()]);
        holder.frame().await.unwrap().unwrap();
        let (mut refused, _r) = body(&budget, vec![message(100)[..5].to_vec(), message(100)[5..20].to_vec()]);
        refused.frame().await.unwrap().unwrap();
        let error = refused.frame().await.unwrap().unwrap_err();
        let status = error.downcast::<tonic::Status>().expect("a status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().starts_with("server busy"), "{status:?}");
        assert!(refused.frame().await.is_none(), "nothing more");
        drop(refused);
        assert_eq!(room(&budget), 10, "the refused body's 5 back; the holder's 20 held");
    }

    #[tokio::test]
    async fn kept_bytes_stay_taken_until_the_last_holder_goes() {
        let budget = RequestBudget::new(100);
        let (mut body, held) = body(&budget, vec![message(10)]);
        held.keep();
        body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.is_none());
        drop(body);
        assert_eq!(room(&budget), 85, "kept past the body");
        drop(held);
        assert_eq!(room(&budget), 100);
    }
}

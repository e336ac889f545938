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
//!
//! One budget for everyone let one client address fill it, from as many
//! streams and connections as it liked, and every other client was refused
//! "server busy" for as long as it kept sending slowly: a denial of service
//! by refusal. So where clients reach the server (the all-in-one, the
//! edge), each client address may hold at most its share of the budget at
//! once (`--max-buffered-request-bytes-per-address`; by default a quarter,
//! and never less than one message of `--max-request-bytes`): a frame
//! that would take it past its share is refused the same way, counted
//! apart (`natter_request_budget_address_refusals_total`), while others'
//! go on. The address is the one every per-address limit uses
//! ([`crate::limits::ClientAddresses`]: the TCP peer, or the client a
//! trusted proxy names). A hard share rather than one that only bites once
//! the budget runs low: with the latter, one address idle-fills the budget
//! and the next client to come is refused anyway. The trade-off: it takes
//! four addresses to fill the budget, and clients behind one NAT share one
//! quarter (64 MiB at the default budget: thousands of chat messages in
//! flight at once). A service's own public port, which only the edge
//! calls (one address for all its clients), has no shares; the edge's own
//! share of a client bounds what that client can have it forward.
//! Addresses are counted in a map with an entry only while an address
//! holds bytes, so it is bounded by the requests in flight.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::Semaphore;

use crate::config::ServerArgs;
use crate::limits::ClientAddresses;

/// How long a client refused for a full budget is told to wait (RetryInfo):
/// a unary call is answered within milliseconds, so the budget frees fast.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The default share of one client address, as a fraction of the budget
/// (module docs): 1 / this.
const ADDRESS_SHARE_DIVISOR: u64 = 4;

/// The request bytes one server may hold at once (one permit a byte), and
/// those each client address holds of them.
#[derive(Clone, Debug)]
pub struct RequestBudget(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    bytes: Semaphore,
    /// The most bytes one client address may hold.
    per_address: usize,
    /// Bytes held by each client address; one that holds none has no entry.
    by_address: Mutex<HashMap<IpAddr, usize>>,
}

/// What a frame the budget has no room for met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Full {
    /// The whole server's budget.
    Server,
    /// Its client address's share.
    Address,
}

impl RequestBudget {
    /// A budget of `max_bytes` (`--max-buffered-request-bytes`), of which
    /// one client address may hold `per_address` (more than a semaphore
    /// counts is clamped to what it does, about 2^61).
    pub fn new(max_bytes: u64, per_address: u64) -> Self {
        let clamp = |n: u64| usize::try_from(n).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        Self(Arc::new(Shared {
            bytes: Semaphore::new(clamp(max_bytes)),
            per_address: clamp(per_address),
            by_address: Mutex::default(),
        }))
    }

    /// The budget of a server with `args`: `--max-buffered-request-bytes`,
    /// and `--max-buffered-request-bytes-per-address` of it for one address
    /// (by default a quarter, at least one message of
    /// `--max-request-bytes` and its 5-byte prefix, at most all of it).
    pub fn for_server(args: &ServerArgs) -> Self {
        let max = args.max_buffered_request_bytes;
        let one_message = u64::try_from(args.max_request_bytes).unwrap_or(u64::MAX).saturating_add(5);
        let per_address = args
            .max_buffered_request_bytes_per_address
            .unwrap_or_else(|| (max / ADDRESS_SHARE_DIVISOR).max(one_message.min(max)));
        Self::new(max, per_address)
    }

    /// Takes `n` bytes for `client` (`None`: an address not known, counted
    /// on the server only), if the server and the address's share have
    /// room for them.
    fn take(&self, client: Option<IpAddr>, n: usize) -> Result<(), Full> {
        let Ok(permits) = u32::try_from(n) else { return Err(Full::Server) };
        let from_server = || self.0.bytes.try_acquire_many(permits).map(tokio::sync::SemaphorePermit::forget);
        let Some(client) = client else { return from_server().map_err(|_| Full::Server) };
        let mut by_address = self.0.by_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The server's first: a full server is busy for everyone, whatever
        // the address holds.
        from_server().map_err(|_| Full::Server)?;
        let held = by_address.entry(client).or_insert(0);
        if held.saturating_add(n) > self.0.per_address {
            if *held == 0 {
                by_address.remove(&client);
            }
            self.0.bytes.add_permits(n);
            return Err(Full::Address);
        }
        *held += n;
        Ok(())
    }

    fn give_back(&self, client: Option<IpAddr>, n: usize) {
        if n == 0 {
            return;
        }
        if let Some(client) = client {
            let mut by_address = self.0.by_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let std::collections::hash_map::Entry::Occupied(mut held) = by_address.entry(client) {
                *held.get_mut() = held.get().saturating_sub(n);
                if *held.get() == 0 {
                    held.remove();
                }
            }
        }
        self.0.bytes.add_permits(n);
    }
}

impl Full {
    /// RESOURCE_EXHAUSTED for a call refused by this: "server busy" naming
    /// the limit, with a RetryInfo of [`BUSY_RETRY_AFTER`].
    fn status(self, budget: &RequestBudget) -> tonic::Status {
        match self {
            Self::Server => crate::limits::server_busy("too many request bytes in flight", BUSY_RETRY_AFTER),
            Self::Address => {
                let why = format!(
                    "too many request bytes in flight from this client address (its share: {} at once)",
                    budget.0.per_address
                );
                crate::limits::server_busy(&why, BUSY_RETRY_AFTER)
            }
        }
    }
}

/// Puts every request body of the service it wraps on a [`RequestBudget`]
/// ([`BudgetedBody`]), and a [`HeldBytes`] for it in the request's
/// extensions.
#[derive(Clone, Debug)]
pub struct RequestBudgetLayer {
    budget: RequestBudget,
    clients: Option<ClientAddresses>,
}

impl RequestBudgetLayer {
    /// A layer taking from `budget` (one per server: all its calls share
    /// it), each client address its share as `clients` finds it (`None`:
    /// no shares).
    pub fn new(budget: RequestBudget, clients: Option<ClientAddresses>) -> Self {
        Self { budget, clients }
    }

    /// The layer of a public server with `args`
    /// ([`RequestBudget::for_server`], [`ServerArgs::client_addresses`]).
    pub fn for_server(args: &ServerArgs) -> Self {
        Self::new(RequestBudget::for_server(args), args.client_addresses.clone())
    }
}

impl<S> tower::Layer<S> for RequestBudgetLayer {
    type Service = Budgeted<S>;

    fn layer(&self, inner: S) -> Budgeted<S> {
        Budgeted { inner, budget: self.budget.clone(), clients: self.clients.clone() }
    }
}

/// See [`RequestBudgetLayer`].
#[derive(Clone, Debug)]
pub struct Budgeted<S> {
    inner: S,
    budget: RequestBudget,
    clients: Option<ClientAddresses>,
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
        let client = self.clients.as_ref().and_then(|clients| clients.of(&parts));
        let held = HeldBytes(Arc::new(Kept {
            budget: self.budget.clone(),
            client,
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
    /// The client address whose share the bytes are on (`None`: no share).
    client: Option<IpAddr>,
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
        self.budget.give_back(self.client, *self.bytes.get_mut());
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
            self.held.0.budget.give_back(self.held.0.client, self.taken);
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
        let kept = &account.held.0;
        if !account.held.kept() {
            kept.budget.give_back(kept.client, account.taken - account.partial);
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
            if let Err(full) = kept.budget.take(kept.client, data.len()) {
                *this.refused = true;
                match full {
                    Full::Server => crate::metrics::request_budget_refused(),
                    Full::Address => crate::metrics::request_budget_address_refused(),
                }
                tracing::debug!(bytes = account.taken + data.len(), client = ?kept.client, ?full, "request budget full; refusing a call");
                return Poll::Ready(Some(Err(Box::new(full.status(&kept.budget)))));
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
        let mut service = RequestBudgetLayer::new(budget.clone(), None).layer(tower::service_fn(
            |request: http::Request<BudgetedBody<_>>| async move { Ok::<_, std::convert::Infallible>(request) },
        ));
        let request = futures::executor::block_on(tower::ServiceExt::oneshot(&mut service, request)).unwrap();
        let held = request.extensions().get::<HeldBytes>().unwrap().clone();
        (request.into_body(), held)
    }

    fn room(budget: &RequestBudget) -> usize {
        budget.0.bytes.available_permits()
    }

    #[test]
    fn an_address_holds_at_most_its_share_and_is_forgotten_once_it_holds_nothing() {
        let budget = RequestBudget::new(100, 40);
        let ip = |last: u8| Some(IpAddr::from([192, 0, 2, last]));
        budget.take(ip(1), 30).unwrap();
        assert_eq!(budget.take(ip(1), 11), Err(Full::Address), "past its share");
        budget.take(ip(1), 10).unwrap();
        budget.take(ip(2), 40).unwrap();
        assert_eq!(budget.take(ip(2), 1), Err(Full::Address));
        budget.take(None, 15).unwrap();
        assert_eq!(room(&budget), 5);
        assert_eq!(budget.take(ip(3), 6), Err(Full::Server), "within its share, past the server's");
        let status = Full::Address.status(&budget);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("from this client address (its share: 40 at once)"), "{status:?}");
        budget.give_back(ip(1), 25);
        budget.give_back(ip(1), 15);
        budget.give_back(None, 15);
        assert_eq!(room(&budget), 60);
        assert_eq!(budget.0.by_address.lock().unwrap().keys().collect::<Vec<_>>(), [&ip(2).unwrap()], "1 holds none");
        budget.take(ip(1), 40).expect("its share again");
    }

    #[test]
    fn the_default_share_is_a_quarter_and_at_least_one_message() {
        let share = |max_buffered_request_bytes, max_request_bytes, per_address| {
            let args = ServerArgs {
                max_buffered_request_bytes,
                max_request_bytes,
                max_buffered_request_bytes_per_address: per_address,
                ..ServerArgs::default()
            };
            RequestBudget::for_server(&args).0.per_address
        };
        assert_eq!(share(256 << 20, 1 << 20, None), 64 << 20);
        assert_eq!(share(2 << 20, 1 << 20, None), (1 << 20) + 5, "one whole message");
        assert_eq!(share(1000, 1 << 20, None), 1000, "at most the budget");
        assert_eq!(share(256 << 20, 1 << 20, Some(10)), 10, "as set");
    }

    #[tokio::test]
    async fn whole_messages_go_back_as_the_reader_asks_for_more_and_the_rest_when_the_body_goes() {
        let budget = RequestBudget::new(100, 100);
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
        let budget = RequestBudget::new(30, 30);
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
        let budget = RequestBudget::new(100, 100);
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

//! A cap on the streaming calls a public server answers without a token:
//! server reflection's ServerReflectionInfo (v1 and v1alpha) and
//! grpc.health.v1's Watch. At most [`STREAMS_PER_CONNECTION`] of them on
//! one connection and [`STREAMS_PER_SERVER`] on one server; the call over
//! either is refused at once, RESOURCE_EXHAUSTED "server busy" with a
//! RetryInfo, and a slot is given back when its response body goes
//! (answered, the client's reset, the connection closed, shutdown).
//!
//! Why: each such stream answers for as long as it is asked, and a client
//! that asks (reflection's answers are tens of KB) but never reads made the
//! server hold what hyper buffers for a stream (up to 400 KiB) and tonic's
//! encode buffer, on every stream of every connection it opened: 128
//! streams a connection held about 67 MB, with no token. Unary calls with
//! no token (log-in, health Check) answer once, in a few hundred bytes.
//! Now one such stream holds at most hyper's 400 KiB and two answers, and
//! its connection at most its HTTP/2 window (1 MiB) of requests nobody read
//! yet: about 3 MB a connection and 100 MB a server at worst.
//!
//! The trade-off: reflection clients (`grpcurl`, `buf curl`) open one
//! stream at a time, but a client that fills the server's slots keeps
//! others' reflection and Watch out until its streams end (a reflection
//! stream whose client stops sending ends at the request body deadline;
//! one whose client ended its requests and reads nothing, when its
//! connection closes); health Check, which load balancers use, is never
//! capped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::accept::{ConnectionId, HoldingBody};

/// The streaming calls with no token one connection may have open at once
/// (reflection clients open one at a time).
pub const STREAMS_PER_CONNECTION: usize = 4;

/// The streaming calls with no token one server may have open at once, all
/// connections together: with [`STREAMS_PER_CONNECTION`], what clients
/// that never read can make it hold is bounded (module docs).
pub const STREAMS_PER_SERVER: usize = 64;

/// The paths of the calls capped here.
const CAPPED_PATHS: [&str; 3] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.health.v1.Health/Watch",
];

/// What the calls capped here are, in a refusal's message.
const WHAT: &str = "streaming calls without a token (reflection, health Watch)";

/// How long a refused client is told to wait (RetryInfo): a reflection
/// client's stream ends with its command.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The open capped streams of one server: all of them, and per connection.
#[derive(Debug)]
struct Slots {
    per_connection: usize,
    per_server: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    /// Connections with a capped stream open (one is forgotten with its last).
    connections: HashMap<ConnectionId, usize>,
}

impl Slots {
    /// A slot for a stream on `connection` (`None`: a request that came by
    /// no [`crate::accept`] connection, counted on the server only), held
    /// until the [`Slot`] drops; the refusal when none is free.
    fn take(self: &Arc<Self>, connection: Option<ConnectionId>) -> Result<Slot, tonic::Status> {
        let mut open = self.open.lock().expect("not poisoned");
        if open.total >= self.per_server {
            let why = format!("{} {WHAT} are open on this server, its limit", self.per_server);
            return Err(crate::limits::server_busy(&why, RETRY_AFTER));
        }
        if let Some(id) = connection {
            let on_connection = open.connections.entry(id).or_insert(0);
            if *on_connection >= self.per_connection {
                let why = format!("{} {WHAT} are open on this connection, its limit", self.per_connection);
                return Err(crate::limits::server_busy(&why, RETRY_AFTER));
            }
            *on_connection += 1;
        }
        open.total += 1;
        Ok(Slot { slots: self.clone(), connection })
    }
}

/// One open capped stream, given back when dropped.
#[derive(Debug)]
struct Slot {
    slots: Arc<Slots>,
    connection: Option<ConnectionId>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().expect("not poisoned");
        open.total -= 1;
        if let Some(id) = self.connection
            && let Some(count) = open.connections.get_mut(&id)
        {
            *count -= 1;
            if *count == 0 {
                open.connections.remove(&id);
            }
        }
    }
}

/// Caps the streaming calls with no token of the service it wraps (module
/// docs); one per server, all its connections share it.
#[derive(Clone, Debug)]
pub(crate) struct TokenlessStreamsLayer {
    slots: Arc<Slots>,
}

impl TokenlessStreamsLayer {
    /// At most `per_connection` capped streams on one connection and
    /// `per_server` in all.
    pub(crate) fn new(per_connection: usize, per_server: usize) -> Self {
        Self { slots: Arc::new(Slots { per_connection, per_server, open: Mutex::default() }) }
    }
}

impl<S> tower::Layer<S> for TokenlessStreamsLayer {
    type Service = TokenlessStreams<S>;

    fn layer(&self, inner: S) -> TokenlessStreams<S> {
        TokenlessStreams { inner, slots: self.slots.clone() }
    }
}

/// See [`TokenlessStreamsLayer`].
#[derive(Clone, Debug)]
pub(crate) struct TokenlessStreams<S> {
    inner: S,
    slots: Arc<Slots>,
}

impl<S, B> tower::Service<http::Request<B>> for TokenlessStreams<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future =
        futures::future::Either<futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !CAPPED_PATHS.contains(&request.uri().path()) {
            return futures::future::Either::Right(self.inner.call(request));
        }
        let slot = match self.slots.take(request.extensions().get::<ConnectionId>().copied()) {
            Ok(slot) => slot,
            Err(refused) => return futures::future::Either::Left(Box::pin(async move { Ok(refused.into_http()) })),
        };
        let call = self.inner.call(request);
        futures::future::Either::Left(Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|inner| tonic::body::Body::new(HoldingBody::new(inner, slot))))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_connection_and_per_server_and_come_back() {
        let slots = Arc::new(Slots { per_connection: 2, per_server: 3, open: Mutex::default() });
        let (a, b) = (Some(ConnectionId::for_test(1)), Some(ConnectionId::for_test(2)));
        let a1 = slots.take(a).expect("a's first");
        let _a2 = slots.take(a).expect("a's second");
        let refused = slots.take(a).expect_err("a's third");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("2 streaming calls"), "{}", refused.message());
        let _b1 = slots.take(b).expect("b's first");
        let refused = slots.take(b).expect_err("the server's fourth");
        assert!(refused.message().contains("3 streaming calls"), "{}", refused.message());
        drop(a1);
        let _b2 = slots.take(b).expect("a slot came back");
        assert_eq!(slots.open.lock().unwrap().connections.len(), 2);
    }
}

//! A cap on the streaming calls a public server answers without a token:
//! server reflection's ServerReflectionInfo (v1 and v1alpha) and
//! grpc.health.v1's Watch. At most [`STREAMS_PER_CONNECTION`] of them on
//! one connection, [`STREAMS_PER_ADDRESS`] from one client address (where
//! clients reach the server) and [`STREAMS_PER_SERVER`] on one server; the
//! call over any is refused at once, RESOURCE_EXHAUSTED "server busy" with
//! a RetryInfo naming the cap, and counted
//! (`natter_tokenless_stream_refusals_total{limit}`), and a slot is given
//! back when its response body goes (answered, the client's reset, the
//! connection closed, shutdown).
//!
//! Why: each such stream answers for as long as it is asked, and a client
//! that asks (reflection's answers are tens of KB) but never reads made the
//! server hold what hyper buffers for a stream (up to 400 KiB) and tonic's
//! encode buffer, on every stream of every connection it opened: 128
//! streams a connection held about 67 MB, with no token. Unary calls with
//! no token (log-in, health Check) answer once, in a few hundred bytes.
//! Now one such stream holds at most the HTTP/2 send buffer
//! (`crate::serve::MAX_SEND_BUF_BYTES`, 64 KiB) and two answers, and its
//! connection at most its HTTP/2 window (256 KiB) of requests nobody read
//! yet: under 1 MB a connection and about 15 MB a server at worst.
//!
//! The trade-off: reflection clients (`grpcurl`, `buf curl`) open one
//! stream at a time, but clients that fill the server's slots keep
//! others' reflection and Watch out until their streams end (a reflection
//! stream whose client stops sending ends at the request body deadline;
//! one whose client ended its requests and reads nothing, when its
//! connection closes); health Check, which load balancers use, is never
//! capped. One address alone could do it, with 16 connections: so one
//! address holds at most a quarter of the server's slots, and it takes
//! four to keep everyone else out. The address is the one every
//! per-address limit uses ([`crate::limits::ClientAddresses`]: the TCP
//! peer, or the client a trusted proxy names); a service's own public
//! port, which only the edge and probes reach, has no per-address cap. The
//! addresses with a slot are counted in a map that forgets one with its
//! last slot, so it holds at most [`STREAMS_PER_SERVER`] entries.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::accept::{ConnectionId, HoldingBody};
use crate::config::ServerArgs;
use crate::limits::ClientAddresses;

/// The streaming calls with no token one connection may have open at once
/// (reflection clients open one at a time).
pub const STREAMS_PER_CONNECTION: usize = 4;

/// The streaming calls with no token one client address may have open at
/// once, all its connections together: a quarter of
/// [`STREAMS_PER_SERVER`] (module docs).
pub const STREAMS_PER_ADDRESS: usize = STREAMS_PER_SERVER / 4;

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

/// The open capped streams of one server: all of them, per client
/// address and per connection.
#[derive(Debug)]
struct Slots {
    per_connection: usize,
    per_address: usize,
    per_server: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    /// Client addresses with a capped stream open (one is forgotten with
    /// its last).
    addresses: HashMap<IpAddr, usize>,
    /// Connections with a capped stream open (likewise).
    connections: HashMap<ConnectionId, usize>,
}

/// Whether `key`'s count in `counts` is below `cap` (no key: nothing to
/// count, always).
fn below<K: Hash + Eq>(counts: &HashMap<K, usize>, key: Option<&K>, cap: usize) -> bool {
    key.is_none_or(|key| counts.get(key).copied().unwrap_or(0) < cap)
}

/// One more for `key` in `counts`.
fn count_up<K: Hash + Eq + Copy>(counts: &mut HashMap<K, usize>, key: Option<K>) {
    if let Some(key) = key {
        *counts.entry(key).or_insert(0) += 1;
    }
}

/// One less for `key` in `counts`, which forgets a key whose count is 0.
fn count_down<K: Hash + Eq>(counts: &mut HashMap<K, usize>, key: Option<K>) {
    if let Some(key) = key
        && let std::collections::hash_map::Entry::Occupied(mut count) = counts.entry(key)
    {
        *count.get_mut() -= 1;
        if *count.get() == 0 {
            count.remove();
        }
    }
}

impl Slots {
    /// A slot for a stream from `client` on `connection` (`None`: an
    /// address not known, or a request that came by no [`crate::accept`]
    /// connection; not counted there), held until the [`Slot`] drops; the
    /// refusal, counted, when none is free.
    fn take(self: &Arc<Self>, client: Option<IpAddr>, connection: Option<ConnectionId>) -> Result<Slot, tonic::Status> {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let full = if open.total >= self.per_server {
            Some(("server", self.per_server, "on this server"))
        } else if !below(&open.addresses, client.as_ref(), self.per_address) {
            Some(("address", self.per_address, "from this client address"))
        } else if !below(&open.connections, connection.as_ref(), self.per_connection) {
            Some(("connection", self.per_connection, "on this connection"))
        } else {
            None
        };
        if let Some((limit, cap, scope)) = full {
            crate::metrics::tokenless_stream_refused(limit);
            let why = format!("{cap} {WHAT} are open {scope}, its limit");
            return Err(crate::limits::server_busy(&why, RETRY_AFTER));
        }
        open.total += 1;
        count_up(&mut open.addresses, client);
        count_up(&mut open.connections, connection);
        Ok(Slot { slots: self.clone(), client, connection })
    }
}

/// One open capped stream, given back when dropped.
#[derive(Debug)]
struct Slot {
    slots: Arc<Slots>,
    client: Option<IpAddr>,
    connection: Option<ConnectionId>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        open.total -= 1;
        count_down(&mut open.addresses, self.client);
        count_down(&mut open.connections, self.connection);
    }
}

/// Caps the streaming calls with no token of the service it wraps (module
/// docs); one per server, all its connections share it.
#[derive(Clone, Debug)]
pub(crate) struct TokenlessStreamsLayer {
    slots: Arc<Slots>,
    clients: Option<ClientAddresses>,
}

impl TokenlessStreamsLayer {
    /// At most [`STREAMS_PER_CONNECTION`] capped streams on one connection,
    /// [`STREAMS_PER_ADDRESS`] from one client address as
    /// [`ServerArgs::client_addresses`] finds it (none: no such cap) and
    /// [`STREAMS_PER_SERVER`] in all.
    pub(crate) fn for_server(args: &ServerArgs) -> Self {
        let slots = Slots {
            per_connection: STREAMS_PER_CONNECTION,
            per_address: STREAMS_PER_ADDRESS,
            per_server: STREAMS_PER_SERVER,
            open: Mutex::default(),
        };
        Self { slots: Arc::new(slots), clients: args.client_addresses.clone() }
    }
}

impl<S> tower::Layer<S> for TokenlessStreamsLayer {
    type Service = TokenlessStreams<S>;

    fn layer(&self, inner: S) -> TokenlessStreams<S> {
        TokenlessStreams { inner, slots: self.slots.clone(), clients: self.clients.clone() }
    }
}

/// See [`TokenlessStreamsLayer`].
#[derive(Clone, Debug)]
pub(crate) struct TokenlessStreams<S> {
    inner: S,
    slots: Arc<Slots>,
    clients: Option<ClientAddresses>,
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
        let (parts, body) = request.into_parts();
        let client = self.clients.as_ref().and_then(|clients| clients.of(&parts));
        let slot = match self.slots.take(client, parts.extensions.get::<ConnectionId>().copied()) {
            Ok(slot) => slot,
            Err(refused) => return futures::future::Either::Left(Box::pin(async move { Ok(refused.into_http()) })),
        };
        let call = self.inner.call(http::Request::from_parts(parts, body));
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
        let slots = Arc::new(Slots { per_connection: 2, per_address: 3, per_server: 3, open: Mutex::default() });
        let (a, b) = (Some(ConnectionId::for_test(1)), Some(ConnectionId::for_test(2)));
        let a1 = slots.take(None, a).expect("a's first");
        let _a2 = slots.take(None, a).expect("a's second");
        let refused = slots.take(None, a).expect_err("a's third");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("2 streaming calls"), "{}", refused.message());
        let _b1 = slots.take(None, b).expect("b's first");
        let refused = slots.take(None, b).expect_err("the server's fourth");
        assert!(refused.message().contains("3 streaming calls"), "{}", refused.message());
        drop(a1);
        let _b2 = slots.take(None, b).expect("a slot came back");
        assert_eq!(slots.open.lock().unwrap().connections.len(), 2);
    }

    #[test]
    fn one_address_holds_at_most_its_share_of_the_server_s_slots() {
        let slots = Arc::new(Slots { per_connection: 2, per_address: 3, per_server: 5, open: Mutex::default() });
        let (x, y) = (Some(IpAddr::from([192, 0, 2, 1])), Some(IpAddr::from([192, 0, 2, 2])));
        let connection = |n| Some(ConnectionId::for_test(n));
        let mut held = vec![slots.take(x, connection(1)).unwrap(), slots.take(x, connection(1)).unwrap()];
        held.push(slots.take(x, connection(2)).expect("x's third, on another connection"));
        let refused = slots.take(x, connection(3)).expect_err("x's fourth, on a fresh connection");
        assert!(
            refused.message().contains("3 streaming calls") && refused.message().contains("address"),
            "{refused:?}"
        );
        let y1 = slots.take(y, connection(4)).expect("y is not refused");
        held.pop();
        held.push(slots.take(x, connection(3)).expect("x's slot came back"));
        drop((held, y1));
        let open = slots.open.lock().unwrap();
        assert!(open.addresses.is_empty() && open.connections.is_empty() && open.total == 0, "{open:?}");
    }
}

//! The connections a natter listener accepts: at most `--max-connections`
//! open at once, each closed unless its first request arrives within
//! `--handshake-timeout`, and, on a public listener, asked to close once
//! it has had no call in flight for `--max-connection-idle`
//! ([`crate::config::TransportArgs`], [`IdleWatch`]).
//!
//! The rules live in the connection itself (a semaphore permit, and a
//! handshake deadline checked where hyper reads it), so hyper serves it as
//! any other (`crate::serve`); a service wrapped around each connection's
//! stack ([`TrackCalls`]) tells the connection when each call starts and
//! ends (its response body dropped: answered, or the client went away).
//! The trade-off: the handshake deadline strikes when hyper next reads,
//! which it does for as long as it waits for a request, so it is late by
//! no more than a timer tick. A client that
//! connects ahead of its first call (tonic's `Endpoint::connect`) and
//! calls later than the timeout finds the connection closed and connects
//! again (tonic's channel does so by itself); natter's own clients connect
//! lazily, with their first call.
//!
//! A public listener also holds at most `--max-connections-per-address`
//! connections from one client address (an IPv6 /64 is one): a further one
//! from it is closed as soon as it is accepted. There, unlike at the cap,
//! accept-and-close is right: only the address over its share waits, and
//! its flood cannot keep others out.
//!
//! At the cap the listener stops accepting, rather than accepting and
//! closing at once: open connections are untouched; a new client waits
//! (the kernel completed its TCP handshake and queues it) and is served as
//! soon as a connection closes, which under a flood of silent connections
//! is within the handshake timeout, where an accept-and-close would fail
//! every newcomer for as long as the flood lasts; and no descriptor or
//! accept is spent on a connection only to close it. The cost: a waiting
//! client is not told why, and once the kernel's queue (the listen backlog)
//! is full, new connection attempts go unanswered until the client retries
//! them. A load balancer's health check waits too, so a full replica looks
//! unready and gets no new traffic. Connections that each made a call
//! (a health check needs no token) and then idle hold their places for
//! `--max-connection-idle` (5 minutes) on a public listener.
//!
//! The idle deadline (gRPC's MAX_CONNECTION_IDLE, gRFC A9) counts from the
//! moment the connection's last call ended; a call in flight (an open
//! StreamEvents, a unary call being answered) stops it. As gRPC does, the
//! connection is then closed gracefully (`crate::serve` starts hyper's
//! graceful close when [`IdleWatch::expired`] resolves): an HTTP/2 client
//! is sent GOAWAY, so it opens a new connection for its next call, and a
//! call that crossed the GOAWAY is refused as never processed (REFUSED,
//! safe to retry) or, if the server had taken it, answered, within
//! `--max-connection-age-grace`; an idle HTTP/1.1 connection is closed.
//! (It was closed abruptly, by failing hyper's read: a call sent just then
//! failed UNAVAILABLE, as on any dropped connection.) A client that
//! answers no PING to complete the close is closed by the HTTP/2
//! keepalive. The internal listener has no idle deadline: only natter's
//! own services, holding the service credential, reach it, and their
//! channels would reconnect for nothing.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;
use tokio_util::sync::PollSemaphore;
use tonic::transport::server::{Connected as _, TcpConnectInfo, TcpIncoming};

use crate::metrics::{self, ConnectionGuard};

/// How long a listener waits before accepting again when accept failed for
/// want of resources (out of file descriptors, buffers, memory): the
/// waiting connection stays in the kernel's queue, and the accept loop
/// (`crate::serve`) would retry at once, spinning a core for as long as it lasts (hyper's
/// own accept loop waited a second).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How often, at most, a listener logs that it reached its cap: under a
/// flood it reaches it again each time a connection closes.
const CAP_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// File descriptors kept for what is not a client connection (database
/// pools, NATS, the edge's upstream connections, SQLite files, the metrics
/// endpoint): the cap warning counts them in.
const RESERVED_FDS: u64 = 512;

/// The connections of one listener, as `crate::serve` takes them: a
/// connection is accepted only while fewer than the cap are open, and each
/// carries its permit and handshake deadline.
pub(crate) struct Incoming {
    inner: TcpIncoming,
    slots: PollSemaphore,
    /// A permit taken while accept was still pending.
    slot: Option<OwnedSemaphorePermit>,
    deadlines: Deadlines,
    /// The `listener` label of the metrics: `public` or `internal`.
    listener: &'static str,
    /// Set after accept failed for want of resources.
    backoff: Option<Pin<Box<Sleep>>>,
    /// Whether the listener waits for a connection to close.
    at_cap: bool,
    /// The cap's warning, at most once per [`CAP_WARNING_INTERVAL`].
    cap_warning: crate::limits::Throttle,
    /// The open connections of each client address; `None`: no cap.
    per_address: Option<Arc<PerAddress>>,
    /// The per-address cap's warning, as `cap_warning`.
    address_warning: crate::limits::Throttle,
}

/// How many connections a listener holds from each client address, and
/// how many it may ([`Incoming`]).
#[derive(Debug)]
struct PerAddress {
    cap: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    /// A place for a connection from `peer`, held until the guard drops;
    /// `None` when its address holds the cap already.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<AddressGuard> {
        let key = client_address(peer);
        let mut open = self.open.lock().expect("not poisoned");
        let count = open.entry(key).or_insert(0);
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(AddressGuard { table: self.clone(), key })
    }
}

/// A connection's place in its address's count ([`PerAddress`]), given
/// back (and the address forgotten with its last) when the connection is
/// dropped.
#[derive(Debug)]
struct AddressGuard {
    table: Arc<PerAddress>,
    key: IpAddr,
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().expect("not poisoned");
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The address a connection from `peer` counts under: an IPv4 address
/// (an IPv4-mapped IPv6 one as IPv4), or an IPv6 address's /64, the
/// smallest block a host is given (RFC 6177), so that a host cannot take
/// a new share with each of its 2^64 addresses.
fn client_address(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

impl Incoming {
    /// Accepts from `inner` at most `max_connections` connections at once,
    /// at most `per_address` of them from one client address (0: no such
    /// cap), each closed past its `deadlines`, as [`TrackCalls`] reports
    /// its calls. `listener` names it in metrics and logs.
    pub(crate) fn new(
        inner: TcpIncoming,
        max_connections: u32,
        per_address: u32,
        deadlines: Deadlines,
        listener: &'static str,
    ) -> Self {
        let permits = (max_connections as usize).clamp(1, Semaphore::MAX_PERMITS);
        let per_address = (per_address > 0)
            .then(|| Arc::new(PerAddress { cap: per_address as usize, open: Mutex::new(HashMap::new()) }));
        Self {
            inner,
            slots: PollSemaphore::new(Arc::new(Semaphore::new(permits))),
            slot: None,
            deadlines,
            listener,
            backoff: None,
            at_cap: false,
            cap_warning: crate::limits::Throttle::new(CAP_WARNING_INTERVAL),
            per_address,
            address_warning: crate::limits::Throttle::new(CAP_WARNING_INTERVAL),
        }
    }

    /// A place for `stream` in its address's count (`Some(None)`: no cap),
    /// or `None` when its address holds its share: the stream is closed.
    fn admit(&mut self, stream: &TcpStream) -> Option<Option<AddressGuard>> {
        let Some(per_address) = &self.per_address else { return Some(None) };
        // A stream without a peer address is already gone: hyper finds so.
        let Ok(peer) = stream.peer_addr() else { return Some(None) };
        if let Some(guard) = per_address.admit(peer.ip()) {
            return Some(Some(guard));
        }
        metrics::address_cap_refused(self.listener);
        if let Some(held) = self.address_warning.admit() {
            tracing::warn!(
                listener = self.listener,
                peer = %client_address(peer.ip()),
                since_last_warning = held,
                "a client address at --max-connections-per-address: its new connection closed"
            );
        }
        None
    }

    fn reached_cap(&mut self) {
        self.at_cap = true;
        metrics::connection_cap_reached(self.listener);
        if let Some(held) = self.cap_warning.admit() {
            tracing::warn!(
                listener = self.listener,
                since_last_warning = held,
                "at --max-connections: new connections wait in the accept queue until open ones close"
            );
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(backoff) = &mut this.backoff {
                ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            if this.slot.is_none() {
                match this.slots.poll_acquire(cx) {
                    Poll::Ready(Some(permit)) => {
                        this.at_cap = false;
                        this.slot = Some(permit);
                    }
                    // The semaphore is never closed.
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => {
                        if !this.at_cap {
                            this.reached_cap();
                        }
                        return Poll::Pending;
                    }
                }
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Ok(stream)) => {
                    // Over its address's share: closed (dropped), and the
                    // permit kept for the next connection.
                    let Some(address) = this.admit(&stream) else { continue };
                    let slot = this.slot.take().expect("a permit is taken before accepting");
                    let connection = Connection::new(stream, slot, address, this.deadlines, this.listener);
                    return Poll::Ready(Some(Ok(connection)));
                }
                // A connection that failed between the kernel's handshake
                // and accept: take the next one.
                Some(Err(e)) if is_connection_error(&e) => {
                    tracing::debug!(error = %e, listener = this.listener, "accept: connection gone")
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, listener = this.listener, backoff = ?ACCEPT_BACKOFF, "accept failed");
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
            }
        }
    }
}

/// How long an accepted connection may be silent before the kernel probes
/// its peer (TCP keepalive, RFC 1122 section 4.2.3.6), how often it probes
/// then, and how many unanswered probes close it: a client whose network
/// vanished (a laptop's Wi-Fi gone, a NAT's mapping expired) is found in
/// about 90 s. HTTP/2 clients are found by the server's pings as well;
/// gRPC-web over HTTP/1.1 has no pings, and its open StreamEvents held a
/// connection and one of the user's streams until --max-connection-age.
const TCP_KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(60), Duration::from_secs(10), 3);

/// The accepted connections of `listener`: no Nagle delay, TCP keepalive
/// ([`TCP_KEEPALIVE`]).
pub(crate) fn tcp_incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    let (idle, interval, retries) = TCP_KEEPALIVE;
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(idle))
        .with_keepalive_interval(Some(interval))
        .with_keepalive_retries(Some(retries))
}

/// Whether an accept error concerns only the connection being accepted (as
/// hyper 0.14's accept loop told them apart), not the listener's resources.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// How long a connection may wait for its first request, once it had
/// one, stay with no call in flight, and wait for its client to read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadlines {
    /// From accept to the first request's headers.
    pub(crate) handshake: Duration,
    /// From the end of the last call to the close; `None`: never.
    pub(crate) idle: Option<Duration>,
    /// How long a write may make no progress (the client reads nothing of
    /// its socket) before the connection is closed
    /// (`--max-unread-answer-time`); `None`: for ever.
    pub(crate) write: Option<Duration>,
}

/// One accepted connection: a TCP stream holding its listener's permit
/// (released when hyper drops the connection, however it ends), closed by
/// failing its reads once its handshake deadline ([`Deadlines`]) passed,
/// and its writes once one made no progress for the write deadline; its
/// idle deadline is watched by [`IdleWatch`].
///
/// The write deadline is the slow-consumer rule (`crate::unread`) for a
/// client that reads nothing of its socket. An HTTP/1.1 call (gRPC-web)
/// has nothing else to end it: hyper's write waits, its call is in flight,
/// so neither the idle deadline nor, until its grace ends, the connection's
/// age closes it. (An HTTP/2 client that reads nothing stops answering
/// PINGs too, and the keepalive closes it after 50 s.)
pub(crate) struct Connection {
    stream: TcpStream,
    deadlines: Deadlines,
    calls: Arc<Calls>,
    /// The handshake deadline's timer.
    timer: Pin<Box<Sleep>>,
    /// Set once the handshake deadline closed the connection: every read
    /// fails.
    closed: bool,
    /// Set while a write waits for room in the socket: the write
    /// deadline's timer.
    write_timer: Option<Pin<Box<Sleep>>>,
    /// Set once the write deadline closed the connection: every write
    /// fails.
    write_closed: bool,
    listener: &'static str,
    _open: ConnectionGuard,
    _slot: OwnedSemaphorePermit,
    _address: Option<AddressGuard>,
}

impl Connection {
    fn new(
        stream: TcpStream,
        slot: OwnedSemaphorePermit,
        address: Option<AddressGuard>,
        deadlines: Deadlines,
        listener: &'static str,
    ) -> Self {
        let opened = Instant::now();
        Self {
            stream,
            deadlines,
            calls: Arc::new(Calls::new(opened)),
            timer: Box::pin(tokio::time::sleep_until(opened + deadlines.handshake)),
            closed: false,
            write_timer: None,
            write_closed: false,
            listener,
            _open: ConnectionGuard::new(listener),
            _slot: slot,
            _address: address,
        }
    }

    /// Fails a read with `TimedOut` (hyper then closes the connection)
    /// once the handshake deadline passed with no request; registers its
    /// wake-up while it has not.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.closed && !self.calls.first_came() && self.timer.as_mut().poll(cx).is_ready() {
            self.closed = true;
            metrics::handshake_timed_out(self.listener);
            tracing::debug!(
                peer = ?self.stream.peer_addr().ok(),
                listener = self.listener,
                "closing a connection that sent no request within --handshake-timeout"
            );
        }
        if self.closed {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no request within the handshake timeout"));
        }
        Ok(())
    }
}

impl Connection {
    /// Passes on a write's result, unless it waited on a full socket for
    /// the write deadline: then fails it, and every write after it, with
    /// `TimedOut` (hyper then closes the connection). Any progress restarts
    /// the deadline.
    fn check_write(&mut self, cx: &mut Context<'_>, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        let Some(limit) = self.deadlines.write else { return written };
        if written.is_ready() {
            self.write_timer = None;
            return written;
        }
        let timer = self.write_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.write_closed = true;
        metrics::unread_answer_ended(self.listener, "connection");
        tracing::debug!(
            peer = ?self.stream.peer_addr().ok(),
            listener = self.listener,
            "closing a connection whose client read nothing for --max-unread-answer-time"
        );
        Poll::Ready(Err(write_deadline_passed()))
    }
}

/// The error of every write to a connection once its write deadline passed.
fn write_deadline_passed() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the client read nothing within the write deadline")
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check_deadline(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(write_deadline_passed()));
        }
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.check_write(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(write_deadline_passed()));
        }
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.check_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connection {
    /// What [`TrackCalls`] needs to know of this connection.
    pub(crate) fn info(&self) -> ConnectionInfo {
        ConnectionInfo { tcp: self.stream.connect_info(), calls: self.calls.clone() }
    }

    /// The watch of this connection's idle deadline, for whoever serves it.
    pub(crate) fn idle_watch(&self) -> IdleWatch {
        IdleWatch {
            calls: self.calls.clone(),
            idle: self.deadlines.idle,
            peer: self.stream.peer_addr().ok(),
            listener: self.listener,
        }
    }
}

/// A connection's idle deadline ([`Deadlines::idle`]): [`IdleWatch::expired`]
/// resolves once the connection, after its first call, has had no call in
/// flight for that long; `crate::serve` then closes it gracefully.
#[derive(Debug)]
pub(crate) struct IdleWatch {
    calls: Arc<Calls>,
    idle: Option<Duration>,
    peer: Option<std::net::SocketAddr>,
    listener: &'static str,
}

impl IdleWatch {
    /// Resolves when the idle deadline passed (never, with none), counted
    /// in `natter_connection_idle_closes_total`.
    pub(crate) async fn expired(&self) {
        let Some(idle) = self.idle else { return std::future::pending().await };
        loop {
            // Registered before the state is read: a call starting or
            // ending after the read wakes it.
            let changed = self.calls.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if !self.calls.first_came() || self.calls.in_flight() > 0 {
                changed.await;
                continue;
            }
            // A deadline past what an `Instant` holds never comes.
            let Some(at) = self.calls.idle_since().checked_add(idle) else { return std::future::pending().await };
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = changed => continue,
            }
            metrics::idle_closed(self.listener);
            tracing::debug!(
                peer = ?self.peer,
                listener = self.listener,
                "closing a connection with no call in flight for --max-connection-idle"
            );
            return;
        }
    }
}

/// The calls of one connection, as [`TrackCalls`] reports them.
#[derive(Debug)]
struct Calls {
    /// When the connection was accepted.
    opened: Instant,
    /// Set by the first request.
    first: AtomicBool,
    /// Calls started and not yet ended.
    in_flight: AtomicUsize,
    /// When the last call in flight ended, in milliseconds after `opened`
    /// (only ever raised, so two calls ending together leave the later).
    idle_since_ms: AtomicU64,
    /// Which connection this is, for the limits kept per connection.
    id: ConnectionId,
    /// Notified when the calls in flight go from none to one and back
    /// ([`IdleWatch`]).
    changed: tokio::sync::Notify,
}

/// A connection of a listener, told apart from every other one the
/// process accepted (ids are never reused): [`TrackCalls`] puts it
/// in the extensions of each request, for the limits kept per connection
/// (`crate::tokenless`). A client address and port would be reused once
/// the connection closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConnectionId(u64);

impl ConnectionId {
    fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// A given id, for unit tests of the limits kept per connection.
    #[cfg(test)]
    pub(crate) fn for_test(id: u64) -> Self {
        Self(id)
    }
}

impl Calls {
    fn new(opened: Instant) -> Self {
        Self {
            opened,
            first: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            id: ConnectionId::next(),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn first_came(&self) -> bool {
        self.first.load(Ordering::Acquire)
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn idle_since(&self) -> Instant {
        self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire))
    }
}

/// One call in flight on its connection, from the request reaching the
/// stack until its response body is dropped (sent whole, or the client
/// went away) or the call failed without a response.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Calls>);

impl InFlight {
    fn start(calls: Arc<Calls>) -> Self {
        let before = calls.in_flight.fetch_add(1, Ordering::AcqRel);
        calls.first.store(true, Ordering::Release);
        // Only the first call in flight or the last one's end moves the
        // idle deadline: no wake-up of the watch for the calls between.
        if before == 0 {
            calls.changed.notify_waiters();
        }
        Self(calls)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let ended = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.fetch_max(ended, Ordering::AcqRel);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

/// One [`Connection`] as [`TrackCalls`] tells its requests about it: the
/// client's address and the connection's calls.
#[derive(Clone, Debug)]
pub(crate) struct ConnectionInfo {
    tcp: TcpConnectInfo,
    calls: Arc<Calls>,
}

/// The service of one connection, around the server's stack (outermost,
/// so that any request counts, even one a gate then refuses): tells the
/// connection that a call started on it, and when it ended (the response
/// body dropped), so that its handshake deadline no longer applies and its
/// idle one counts from the last call's end; puts tonic's
/// [`TcpConnectInfo`] in the request's extensions, where `remote_addr()`
/// and the rate limits look for the client's address, and the
/// connection's [`ConnectionId`], for the limits kept per connection.
#[derive(Clone, Debug)]
pub(crate) struct TrackCalls<S> {
    inner: S,
    info: ConnectionInfo,
}

impl<S> TrackCalls<S> {
    /// `inner`, serving the connection `info` describes ([`Connection::info`]).
    pub(crate) fn new(inner: S, info: ConnectionInfo) -> Self {
        Self { inner, info }
    }
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for TrackCalls<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        request.extensions_mut().insert(self.info.tcp.clone());
        request.extensions_mut().insert(self.info.calls.id);
        let call = Some(InFlight::start(self.info.calls.clone()));
        TrackedFuture { inner: self.inner.call(request), call }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`TrackCalls`]: holds the call in flight
    /// until the response, then hands it to the response's body.
    pub(crate) struct TrackedFuture<F> {
        #[pin]
        inner: F,
        call: Option<InFlight>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let call = this.call.take();
        Poll::Ready(Ok(response.map(|inner| HoldingBody::new(inner, call))))
    }
}

/// A response body that holds its call in flight until dropped.
pub(crate) type TrackedBody<B> = HoldingBody<B, Option<InFlight>>;

pin_project_lite::pin_project! {
    /// A response body that holds `H` (a guard: a call in flight, a
    /// stream's slot) until it is dropped: sent whole, or its client went
    /// away.
    pub(crate) struct HoldingBody<B, H> {
        #[pin]
        inner: B,
        held: H,
    }
}

impl<B, H> HoldingBody<B, H> {
    /// `inner`, holding `held` until dropped.
    pub(crate) fn new(inner: B, held: H) -> Self {
        Self { inner, held }
    }
}

impl<B: http_body::Body, H> http_body::Body for HoldingBody<B, H> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Raises the process's soft open-file limit to its hard limit, once, and
/// warns when `max_connections` and [`RESERVED_FDS`] do not fit under it
/// (descriptors would run out before the cap, and accept fail for all).
/// Unix only; elsewhere nothing is done.
pub(crate) fn check_open_file_limit(max_connections: u32, listener: &'static str) {
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let Some(limit) = *LIMIT.get_or_init(raise_open_file_limit) else { return };
    if u64::from(max_connections) + RESERVED_FDS > limit {
        tracing::warn!(
            listener,
            max_connections,
            open_file_limit = limit,
            "--max-connections does not fit under the open-file limit: descriptors run out first \
             and then accept fails for everyone; raise the limit (ulimit -n) or lower the cap"
        );
    }
}

/// The soft open-file limit after raising it to the hard limit (as Go's
/// runtime does at start; the `rlimit` crate's `increase_nofile_limit`);
/// `None` when it cannot be read.
fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read or raise the open-file limit");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IPv4 addresses count alone, IPv6 ones by their /64, and an
    /// IPv4-mapped IPv6 address as its IPv4 address.
    #[test]
    fn client_addresses_group_ipv6_by_its_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client_address(ip("203.0.113.7")), ip("203.0.113.7"));
        assert_eq!(client_address(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(client_address(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")), ip("2001:db8:1:2::"));
        assert_ne!(client_address(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(client_address(ip("::ffff:203.0.113.7")), ip("203.0.113.7"));
    }

    /// An accepted connection has TCP keepalive on, with its timings: a
    /// peer that vanished is found without a byte to send.
    #[tokio::test]
    async fn accepted_connections_probe_a_silent_peer() {
        use tokio_stream::StreamExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = tcp_incoming(listener);
        let _client = TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.expect("a connection").unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.keepalive().unwrap(), "SO_KEEPALIVE");
        assert_eq!(socket.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE.0);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), TCP_KEEPALIVE.1);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), TCP_KEEPALIVE.2);
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY");
    }

    /// An address holds at most the cap; a connection closed gives its
    /// place back, and an address with none open is forgotten.
    #[test]
    fn an_address_holds_at_most_its_cap() {
        let table = Arc::new(PerAddress { cap: 2, open: Mutex::new(HashMap::new()) });
        let (a, b) = ("198.51.100.1".parse().unwrap(), "198.51.100.2".parse().unwrap());
        let first = table.admit(a).unwrap();
        let _second = table.admit(a).unwrap();
        assert!(table.admit(a).is_none());
        let other = table.admit(b).expect("another address has its own share");
        drop(first);
        let _third = table.admit(a).expect("a place given back");
        drop(other);
        assert!(!table.open.lock().unwrap().contains_key(&b));
    }
}

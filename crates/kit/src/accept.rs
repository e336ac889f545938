//! The connections a natter listener accepts: at most `--max-connections`
//! open at once, each closed unless its first request arrives within
//! `--handshake-timeout` ([`crate::config::TransportArgs`]).
//!
//! Both rules live in the connection itself (a semaphore permit, and a
//! deadline checked where hyper reads it), so tonic's server serves it as
//! any other; a layer at the top of the stack ([`FirstRequestLayer`]) tells
//! the connection its first request came. The trade-off: the deadline
//! strikes when hyper next reads, which it does for as long as it waits for
//! a request, so it is late by no more than a timer tick. A client that
//! connects ahead of its first call (tonic's `Endpoint::connect`) and
//! calls later than the timeout finds the connection closed and connects
//! again (tonic's channel does so by itself); natter's own clients connect
//! lazily, with their first call.
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
//! (a health check needs no token) and then idle hold their places until
//! `--max-connection-age`: against those the cap keeps the process and its
//! open connections alive, not newcomers served.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tokio_util::sync::PollSemaphore;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

use crate::metrics::{self, ConnectionGuard};

/// How long a listener waits before accepting again when accept failed for
/// want of resources (out of file descriptors, buffers, memory): the
/// waiting connection stays in the kernel's queue, and tonic's accept loop
/// would retry at once, spinning a core for as long as it lasts (hyper's
/// own accept loop waited a second).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How often, at most, a listener logs that it reached its cap: under a
/// flood it reaches it again each time a connection closes.
const CAP_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// File descriptors kept for what is not a client connection (database
/// pools, NATS, the edge's upstream connections, SQLite files, the metrics
/// endpoint): the cap warning counts them in.
const RESERVED_FDS: u64 = 512;

/// The connections of one listener, as tonic's server takes them: a
/// connection is accepted only while fewer than the cap are open, and each
/// carries its permit and handshake deadline.
pub(crate) struct Incoming {
    inner: TcpIncoming,
    slots: PollSemaphore,
    /// A permit taken while accept was still pending.
    slot: Option<OwnedSemaphorePermit>,
    handshake_timeout: Duration,
    /// The `listener` label of the metrics: `public` or `internal`.
    listener: &'static str,
    /// Set after accept failed for want of resources.
    backoff: Option<Pin<Box<Sleep>>>,
    /// Whether the listener waits for a connection to close.
    at_cap: bool,
    /// The cap's warning, at most once per [`CAP_WARNING_INTERVAL`].
    cap_warning: crate::limits::Throttle,
}

impl Incoming {
    /// Accepts from `inner` at most `max_connections` connections at once,
    /// each closed unless its first request reaches [`FirstRequestLayer`]
    /// within `handshake_timeout`. `listener` names it in metrics and logs.
    pub(crate) fn new(
        inner: TcpIncoming,
        max_connections: u32,
        handshake_timeout: Duration,
        listener: &'static str,
    ) -> Self {
        let permits = (max_connections as usize).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            inner,
            slots: PollSemaphore::new(Arc::new(Semaphore::new(permits))),
            slot: None,
            handshake_timeout,
            listener,
            backoff: None,
            at_cap: false,
            cap_warning: crate::limits::Throttle::new(CAP_WARNING_INTERVAL),
        }
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
                    let slot = this.slot.take().expect("a permit is taken before accepting");
                    let connection = Connection::new(stream, slot, this.handshake_timeout, this.listener);
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

/// Whether an accept error concerns only the connection being accepted (as
/// hyper 0.14's accept loop told them apart), not the listener's resources.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// One accepted connection: a TCP stream holding its listener's permit
/// (released when hyper drops the connection, however it ends) and, until
/// its first request comes, a deadline that fails its reads.
pub(crate) struct Connection {
    stream: TcpStream,
    handshake: Handshake,
    first_request: FirstRequest,
    listener: &'static str,
    _open: ConnectionGuard,
    _slot: OwnedSemaphorePermit,
}

/// Where a connection stands with its handshake deadline.
enum Handshake {
    /// No request yet; reads fail once the deadline passes.
    Waiting(Pin<Box<Sleep>>),
    /// A request came: the deadline no longer applies.
    Done,
    /// The deadline passed first: every read fails.
    TimedOut,
}

impl Connection {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, handshake_timeout: Duration, listener: &'static str) -> Self {
        Self {
            stream,
            handshake: Handshake::Waiting(Box::pin(tokio::time::sleep(handshake_timeout))),
            first_request: FirstRequest::default(),
            listener,
            _open: ConnectionGuard::new(listener),
            _slot: slot,
        }
    }

    /// Fails a read past the handshake deadline with `TimedOut` (hyper
    /// then closes the connection); registers the deadline's wake-up while
    /// it has not passed.
    fn check_handshake(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Handshake::Waiting(deadline) = &mut self.handshake {
            if self.first_request.came() {
                self.handshake = Handshake::Done;
            } else if deadline.as_mut().poll(cx).is_ready() {
                self.handshake = Handshake::TimedOut;
                metrics::handshake_timed_out(self.listener);
                tracing::debug!(
                    peer = ?self.stream.peer_addr().ok(),
                    listener = self.listener,
                    "closing a connection that sent no request within --handshake-timeout"
                );
            }
        }
        match self.handshake {
            Handshake::TimedOut => {
                Err(io::Error::new(io::ErrorKind::TimedOut, "no request within the handshake timeout"))
            }
            Handshake::Waiting(_) | Handshake::Done => Ok(()),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check_handshake(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
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

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo { tcp: self.stream.connect_info(), first_request: self.first_request.clone() }
    }
}

/// Set once a connection's first request reaches the service stack.
#[derive(Clone, Debug, Default)]
struct FirstRequest(Arc<AtomicBool>);

impl FirstRequest {
    fn came(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// What tonic puts in the extensions of each request of a [`Connection`];
/// [`FirstRequestLayer`] takes it out and leaves tonic's own
/// [`TcpConnectInfo`] in its place, where `remote_addr()` and the rate
/// limits look for the client's address.
#[derive(Clone, Debug)]
pub(crate) struct ConnectionInfo {
    tcp: TcpConnectInfo,
    first_request: FirstRequest,
}

/// Marks the connection of each request as having had its first request
/// (so the handshake deadline no longer applies) and turns its
/// [`ConnectionInfo`] into tonic's [`TcpConnectInfo`]. Outermost in the
/// stack: any request counts, even one a gate then refuses, and every layer
/// after it finds the client's address where tonic puts it.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FirstRequestLayer;

impl<S> tower::Layer<S> for FirstRequestLayer {
    type Service = MarkFirstRequest<S>;

    fn layer(&self, inner: S) -> MarkFirstRequest<S> {
        MarkFirstRequest { inner }
    }
}

/// See [`FirstRequestLayer`].
#[derive(Clone, Debug)]
pub(crate) struct MarkFirstRequest<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for MarkFirstRequest<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> S::Future {
        if let Some(info) = request.extensions_mut().remove::<ConnectionInfo>() {
            info.first_request.mark();
            request.extensions_mut().insert(info.tcp);
        }
        self.inner.call(request)
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

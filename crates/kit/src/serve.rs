//! [`Server`]: a set of tonic services plus what every natter server needs,
//! served on one listener until a shutdown token fires.
//!
//! Every server gets grpc.health.v1, server reflection (v1 and v1alpha, so
//! `grpcurl` and `buf curl` work with no proto files), gRPC-web with CORS on
//! the same port (HTTP/1.1 and HTTP/2), a span per RPC, a limit on the
//! decoded request size, on a public server a budget of request bytes held
//! at once by all calls together (`crate::budget`) and a cap on the streams
//! that need no token (`crate::tokenless`), and the transport limits of
//! [`crate::config::TransportArgs`], among them a cap on open connections
//! and a deadline for a connection's first request (`crate::accept`). A
//! public server ([`Server::new`]) never serves an internal service and its
//! reflection lists public ones only; an internal listener
//! ([`Server::internal`]) answers only calls that carry the service
//! credential. Shutdown is graceful: the listener closes, in-flight
//! calls finish, streams are told to end through the same token, and after
//! `shutdown_grace` the server stops regardless.
//!
//! Connections are served with hyper directly (hyper-util's HTTP/1.1 and
//! HTTP/2 server, as tonic's server did), not through tonic's server,
//! which cannot set what bounds a client that does not read:
//!
//! - Answers it does not read: hyper asks a response body for its next
//!   chunk only while less than [`MAX_SEND_BUF_BYTES`] (64 KiB) of the
//!   stream waits unsent, so one stream holds at most that plus two chunks
//!   (one sent past the mark, one waiting for room; a chunk is a message,
//!   or tonic's batch of small ones). A connection holds at most
//!   `--max-concurrent-streams` (128) of those, 8 MiB and 256 chunks, plus
//!   its sockets' buffers; a server `--max-connections` such connections,
//!   `--max-connections-per-address` of them from one address. It was 400
//!   KiB a stream, 50 MB a connection. A client that reads nothing has
//!   its connection closed once a write has made no progress for
//!   `--max-unread-answer-time` (30 s, `crate::accept`), and answers no
//!   PING, so the keepalive would close it too. A client that reads the
//!   socket (and answers PINGs) but grants a stream no flow-control window
//!   has that stream reset (CANCELLED) once its next chunk waited
//!   `--max-unread-answer-time` for window, the slow-consumer rule
//!   (`crate::unread`): what the stream held is freed, its call ends, and
//!   the connection's other streams go on; before, it held its answer
//!   until `--max-connection-age` and its grace. Answers go to hyper in
//!   pieces of at most [`crate::unread::ANSWER_PIECE_BYTES`] (16 KiB), the
//!   last byte of a longer chunk than
//!   [`crate::unread::UNWATCHED_CHUNK_BYTES`] (1 KiB) on its own, so a
//!   stream that ended, or has nothing more to send, holds at most that
//!   much past the client's window unwatched. HTTP/1.1 carries one call at a time,
//!   and hyper buffers at most [`HTTP1_MAX_BUF_BYTES`] (64 KiB) of its
//!   answer and two chunks (it was hyper's default, about 408 KiB), until
//!   the write deadline closes a connection whose client does not read.
//! - Requests no service has read: HTTP/2 flow control lets a client send
//!   at most [`STREAM_WINDOW_BYTES`] (64 KiB) a stream and
//!   [`CONNECTION_WINDOW_BYTES`] (256 KiB) a connection, all streams
//!   together, ahead of what the services read (hyper's defaults were
//!   1 MiB each); at most `--max-connections` times that a server. Bytes a
//!   service has read are on the public listener's request budget
//!   (`--max-buffered-request-bytes`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto as http_server;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic_health::server::HealthReporter;
use tower::{ServiceBuilder, ServiceExt as _};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::services::ServeDir;

use crate::web_page::PageSource;

use crate::accept::{Deadlines, IdleWatch, Incoming, TrackCalls};
use crate::budget::RequestBudgetLayer;
use crate::config::{ServerArgs, TransportArgs};
use crate::internal::ServiceCredential;
use crate::limits::{AuthFailures, Rate, TrustedProxies};
use crate::tokenless::TokenlessStreamsLayer;
use crate::unread::{AnswerBody, UnreadAnswerExecutor};

/// Headers a gRPC-web browser client sends (Fetch/XHR needs them allowed).
const CORS_ALLOW_HEADERS: [&str; 8] = [
    "authorization",
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "traceparent",
    "tracestate",
    "connect-protocol-version",
];

/// Response headers a browser client must be able to read.
/// The largest message, in bytes, that grpc.health.v1 and server
/// reflection read (they need no token; their requests are a service or
/// symbol name): a larger one is refused by its length prefix, before its
/// bytes are buffered.
pub const UNAUTHENTICATED_MESSAGE_MAX: usize = 64 * 1024;

const CORS_EXPOSE_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

/// Builder for one natter server: add services, then [`Server::serve`].
pub struct Server {
    args: ServerArgs,
    routes: RoutesBuilder,
    health: HealthReporter,
    page: PageSource,
    credential: Option<ServiceCredential>,
    failed_auth: Option<FailedAuthLayer>,
}

/// A [`Server`] taken apart, for a caller that adds a fallback route (the
/// edge) before [`serve_routes`].
pub struct Parts {
    pub args: ServerArgs,
    pub health: HealthReporter,
    pub routes: Routes,
    pub page: PageSource,
    /// Set for an internal listener: every call but health must carry it.
    pub credential: Option<ServiceCredential>,
    /// Set for a server clients reach (the all-in-one, the edge): see
    /// [`Server::limit_failed_auth`].
    pub failed_auth: Option<FailedAuthLayer>,
}

impl Server {
    /// A public server (what clients and the edge reach) with health and
    /// reflection already registered; reflection lists the public services
    /// only.
    pub fn new(args: &ServerArgs) -> Self {
        Self::with_reflection(args, natter_proto::FILE_DESCRIPTOR_SET, None)
    }

    /// An internal listener's server: only calls carrying `credential` get
    /// past it (health excepted), and its reflection also describes the
    /// internal services. Add the `*InternalService`s here, never to
    /// [`Server::new`].
    pub fn internal(args: &ServerArgs, credential: ServiceCredential) -> Self {
        let args = ServerArgs { cors_allow_origins: Vec::new(), ..args.clone() };
        Self::with_reflection(&args, natter_proto::INTERNAL_FILE_DESCRIPTOR_SET, Some(credential))
    }

    fn with_reflection(args: &ServerArgs, descriptors: &[u8], credential: Option<ServiceCredential>) -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        // Health and reflection need no token: their messages are small, so
        // they read no more than [`UNAUTHENTICATED_MESSAGE_MAX`] (tonic's
        // default, 4 MiB, let a caller with no token hold that much a stream).
        routes.add_service(health_service.max_decoding_message_size(UNAUTHENTICATED_MESSAGE_MAX));
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the compiled-in descriptor sets are valid");
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("the compiled-in descriptor sets are valid");
        routes
            .add_service(reflection_v1.max_decoding_message_size(UNAUTHENTICATED_MESSAGE_MAX))
            .add_service(reflection_v1alpha.max_decoding_message_size(UNAUTHENTICATED_MESSAGE_MAX));
        Self { args: args.clone(), routes, health, page: PageSource::Off, credential, failed_auth: None }
    }

    /// Serves the browser page at `/` (GET and HEAD requests; gRPC and
    /// gRPC-web are POSTs) from `page`; [`PageSource::Off`] (the default)
    /// leaves the server API only.
    pub fn set_web_page(&mut self, page: PageSource) -> &mut Self {
        match &page {
            PageSource::Off => {}
            PageSource::Embedded => tracing::info!("serving the built-in web page at /"),
            PageSource::Dir(dir) => {
                tracing::info!(web_dir = %dir.display(), "serving the web page at / from a directory")
            }
        }
        self.page = page;
        self
    }

    /// Counts the calls that carry a token not proven lately (new, or
    /// failed) per client address and refuses those beyond `rate` with
    /// RESOURCE_EXHAUSTED ([`AuthFailures`]). For the server
    /// clients reach (the all-in-one, the edge), never for one behind the
    /// edge, where every client has the edge's address. The client address
    /// is found as [`crate::client_ip`] finds it, from
    /// `trust_forwarded_for` and `trusted` proxies.
    pub fn limit_failed_auth(&mut self, rate: Rate, trust_forwarded_for: bool, trusted: TrustedProxies) -> &mut Self {
        if rate != Rate::Off {
            let failures = std::sync::Arc::new(AuthFailures::new(rate));
            self.failed_auth = Some(FailedAuthLayer { failures, trust_forwarded_for, trusted });
        }
        self
    }

    /// The server's configuration.
    pub fn args(&self) -> &ServerArgs {
        &self.args
    }

    /// The health reporter, to mark services serving or not.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Adds a tonic service and reports it SERVING on grpc.health.v1.
    pub async fn add_service<S>(&mut self, service: S) -> &mut Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.health.set_serving::<S>().await;
        self.routes.add_service(service);
        self
    }

    /// Everything added so far (for a caller that adds a fallback route).
    pub fn into_parts(self) -> Parts {
        Parts {
            args: self.args,
            health: self.health,
            routes: self.routes.routes(),
            page: self.page,
            credential: self.credential,
            failed_auth: self.failed_auth,
        }
    }

    /// Serves until `shutdown` is cancelled, then drains as described above.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
        serve_routes(self.into_parts(), listener, shutdown).await
    }
}

/// Serves a split service until `shutdown`: its public server (the API the
/// edge routes to) and its internal server ([`Server::internal`]) on their
/// own listeners. Either failing stops both.
pub async fn serve_split(
    public: (Server, TcpListener),
    internal: (Server, TcpListener),
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(addr) = internal.1.local_addr() {
        tracing::info!(%addr, "internal listener (other natter services only)");
    }
    tokio::try_join!(public.0.serve(public.1, shutdown.clone()), internal.0.serve(internal.1, shutdown))?;
    Ok(())
}

/// Serves `routes` on `listener` with natter's layer stack until `shutdown`
/// is cancelled (see the module docs).
///
/// Errors: none today (`crate::accept` retries failed accepts); a
/// `Result`, as the binaries' `run` functions `?` it.
pub async fn serve_routes(parts: Parts, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
    let Parts { args, health, routes, page, credential, failed_auth } = parts;
    let credential_free = credential.is_none();
    if credential_free {
        warn_on_open_cors(&args.cors_allow_origins, &listener);
    }
    let transport = &args.transport;
    let listener_name = if credential_free { "public" } else { "internal" };
    // Each connection wraps this stack in its `TrackCalls` (outermost:
    // any request, even one refused below, ends the connection's handshake
    // deadline and holds off its idle one until the response is sent; and
    // every layer below finds the client's address where tonic's server
    // put it).
    let layers = ServiceBuilder::new()
        // First on an internal listener: nothing without the service
        // credential gets any further, not even a CORS preflight.
        .option_layer(credential.map(|c| GateLayer::new(crate::internal::require_credential(c))))
        // Before anything reads headers: a header block over the limit is
        // refused (HTTP/2 peers are told the limit in SETTINGS; this also
        // holds it on HTTP/1.1, where hyper alone would take ~400 KB).
        .layer(GateLayer::new(header_limit(transport.max_header_list_bytes as usize)))
        // Before gRPC-web: a CORS preflight (OPTIONS) is answered here and
        // never reaches a gRPC service.
        .layer(cors(&args.cors_allow_origins))
        // Plain GETs (the browser page) never reach gRPC-web, which refuses
        // anything but gRPC on HTTP/1.1.
        .layer(WebPageLayer::new(page))
        // Outside gRPC-web, which turns any failure of the body under it
        // into INTERNAL: keeps what failed it (the client went away) for
        // the answer, made the client's fault innermost below.
        .layer(crate::cut_body::WatchBodyLayer)
        // Turns gRPC-web (HTTP/1.1 or HTTP/2) into plain gRPC for the services.
        .layer(tonic_web::GrpcWebLayer::new())
        // The span and metrics of each call. Inside gRPC-web, so it reads
        // the status of plain gRPC (gRPC-web moves trailers into the body);
        // outside the status fix below, so it records the corrected code.
        .layer(crate::observe::RpcLayer)
        // On a public listener, a call that needs a token and carries none
        // is refused before its body is read (inside gRPC-web, so a browser
        // gets gRPC-web; inside the span, so it is recorded).
        .option_layer(credential_free.then(|| GateLayer::new(require_token)))
        // Public listeners: the streams that need no token (reflection,
        // health Watch), capped per connection, client address and server
        // so that a client that asks and never reads cannot make the
        // server buffer their answers without limit (`crate::tokenless`).
        // Inside the span, so a refusal is recorded; inside gRPC-web, so a
        // browser hears it as gRPC-web.
        .option_layer(credential_free.then(|| TokenlessStreamsLayer::for_server(&args)))
        // Inside the span, so a refusal is recorded; sees plain gRPC, whose
        // errors before any message come in the response headers.
        .option_layer(failed_auth)
        // Inside the span, so a timed-out call is recorded as one.
        .layer(RequestTimeoutLayer { timeout: transport.request_timeout })
        // The whole request body within twice that time: the layer above
        // ends only a call that has not started answering, and a stream
        // answers at once (reflection's, which needs no token, reads its
        // requests as they come), so a body that trickles or never ends
        // held its buffer and its HTTP/2 stream for as long as the
        // connection lived. Twice, so that a unary call whose body never
        // comes still ends DEADLINE_EXCEEDED by the layer above.
        .layer(tower_http::timeout::RequestBodyDeadlineLayer::new(transport.request_timeout * 2))
        // Public listeners: every request body's bytes on the server's one
        // budget (`crate::budget`), so that slow senders on many streams
        // cannot make it hold a message each without limit. Inside
        // gRPC-web, so it counts the gRPC messages the services decode.
        // None on an internal listener: only calls with the service
        // credential get this far there, from natter's own services.
        .option_layer(credential_free.then(|| RequestBudgetLayer::for_server(&args)))
        // Innermost, so gRPC-web clients and the span see the corrected
        // code too; outside the cut bodies' answer, so a body that failed
        // is answered by its cause before tonic's own answers are read.
        .map_response(tonic_codes_by_the_table)
        // Inside the span, so a body the client cut short is recorded as
        // the client's fault (`crate::cut_body`), not INTERNAL.
        .layer(crate::cut_body::AnswerCutBodiesLayer);
    crate::accept::check_open_file_limit(transport.max_connections, listener_name);
    let incoming = Incoming::new(
        crate::accept::tcp_incoming(listener),
        transport.max_connections,
        // Public listeners only: an internal one's clients are natter's own
        // services, a few addresses with many connections each.
        if credential_free { transport.max_connections_per_address } else { 0 },
        Deadlines {
            handshake: transport.handshake_timeout,
            // Public listeners only (see `crate::accept`).
            idle: Some(transport.max_connection_idle).filter(|idle| credential_free && !idle.is_zero()),
            write: Some(transport.max_unread_answer_time).filter(|write| !write.is_zero()),
        },
        listener_name,
    );
    let drain = async move {
        shutdown.cancelled().await;
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        tracing::info!("shutting down: draining in-flight calls");
    };
    let lifetime = Lifetime { age: transport.max_connection_age, grace: transport.max_connection_age_grace };
    let stack = layers.service(routes.prepare());
    let http = http_builder(transport, listener_name);
    serve_connections(incoming, stack, http, lifetime, drain, args.shutdown_grace).await;
    Ok(())
}

/// The most bytes of a response that hyper holds for one HTTP/2 stream
/// and has not yet handed to the socket (h2's `max_send_buffer_size`):
/// hyper asks the response body for its next chunk only while less than
/// this is waiting. 64 KiB, four HTTP/2 frames, keeps the socket fed
/// (the kernel's send buffer holds what is on its way) while a client that
/// never reads, on a connection full of streams with large answers
/// (history pages, search), makes the server hold 64 KiB and two chunks
/// per stream instead of hyper's default 400 KiB.
pub const MAX_SEND_BUF_BYTES: usize = 64 * 1024;

/// The most bytes of responses that hyper buffers for one HTTP/1.1
/// connection (gRPC-web from browsers, health checks) and has not yet
/// handed to the socket (hyper's `max_buf_size`): hyper asks a response
/// body for its next chunk only while less than this waits, so a client
/// that never reads makes the connection hold this and two chunks, as
/// [`MAX_SEND_BUF_BYTES`] bounds an HTTP/2 stream. hyper's default was
/// about 408 KiB. The same bound caps a request head on HTTP/1.1, kept
/// above `--max-header-list-bytes` (`http_builder`).
pub const HTTP1_MAX_BUF_BYTES: usize = 64 * 1024;

/// The HTTP/2 flow-control window of each request stream
/// (SETTINGS_INITIAL_WINDOW_SIZE, RFC 9113 section 6.9.2): the most bytes
/// of one request a client may send before its service reads them. 64
/// KiB holds a whole chat message (at most 32 KiB of text) with room to
/// spare; a larger request (up to `--max-request-bytes`) comes as the
/// service reads it, one window per round trip. hyper's default was
/// 1 MiB.
pub const STREAM_WINDOW_BYTES: u32 = 64 * 1024;

/// The HTTP/2 flow-control window of each connection, all its request
/// streams together: the most request bytes one connection may have sent
/// that no service has read yet (bytes read are on the request budget,
/// `crate::budget`). Four streams' windows: unread request data on a
/// connection is at most this, however many streams it opens. hyper's
/// default was 1 MiB.
pub const CONNECTION_WINDOW_BYTES: u32 = 4 * STREAM_WINDOW_BYTES;

/// hyper's connection builder with natter's HTTP/1.1 and HTTP/2 settings:
/// those of [`TransportArgs`] and the buffer and window sizes above. The
/// rest is hyper's defaults, which tonic's server kept too (its HTTP/1.1
/// header read timeout of 30 s, 16 KiB frames, at most 20 streams reset
/// by the client before the server accepted them), but for the streams
/// the server may reset for a client's protocol errors before it sends
/// GOAWAY: hyper's limit of 1,024, which tonic's server turned off. Its
/// executor runs each HTTP/2 stream under the slow-consumer rule
/// (`--max-unread-answer-time`, `crate::unread`); `listener` names the
/// listener in the metrics.
fn http_builder(transport: &TransportArgs, listener: &'static str) -> http_server::Builder<UnreadAnswerExecutor> {
    let executor = UnreadAnswerExecutor::new(transport.max_unread_answer_time, listener);
    let mut builder = http_server::Builder::new(executor);
    builder
        .http1()
        // hyper enforces its HTTP/1.1 header read timeout only with a timer.
        .timer(TokioTimer::new())
        // The same bound caps the read buffer, so a request head of
        // `--max-header-list-bytes` (counted with 32 bytes a field, more
        // than its ": " and CRLF) and a request line still fit.
        .max_buf_size(HTTP1_MAX_BUF_BYTES.max(transport.max_header_list_bytes as usize + 8 * 1024));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(transport.max_concurrent_streams)
        .max_header_list_size(transport.max_header_list_bytes)
        .keep_alive_interval(transport.http2_keepalive_interval)
        .keep_alive_timeout(transport.http2_keepalive_timeout)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_send_buf_size(MAX_SEND_BUF_BYTES);
    builder
}

/// How long a connection is served: asked to close (HTTP/2 GOAWAY, or
/// HTTP/1.1's close after the call in flight) at `age`, closed regardless
/// `grace` later.
#[derive(Clone, Copy, Debug)]
struct Lifetime {
    age: Duration,
    grace: Duration,
}

/// Serves each connection of `incoming` with hyper on `stack` until
/// `drain` resolves; then stops accepting (the listener closes), asks every
/// connection to close once its calls are done (GOAWAY), and returns once
/// all are closed, or after `shutdown_grace`, closing those left.
async fn serve_connections<S, B>(
    mut incoming: Incoming,
    stack: S,
    http: http_server::Builder<UnreadAnswerExecutor>,
    lifetime: Lifetime,
    drain: impl Future<Output = ()>,
    shutdown_grace: Duration,
) where
    S: tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    let http = Arc::new(http);
    let draining = CancellationToken::new();
    // Cancelled when this returns, or is dropped (a caller that stops
    // serving): no connection outlives its server.
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    // Each connection's task holds a sender: the channel closes when the
    // last one ended.
    let (open, mut all_closed) = tokio::sync::mpsc::channel::<Infallible>(1);
    let mut drain = std::pin::pin!(drain);
    loop {
        let connection = tokio::select! {
            () = &mut drain => break,
            next = incoming.next() => match next {
                Some(Ok(connection)) => connection,
                // `Incoming` retries accept errors itself.
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
                None => break,
            },
        };
        // As tonic's server: gRPC errors a layer returns become their
        // status, outermost.
        let idle = connection.idle_watch();
        let service = tonic::service::RecoverError::new(TrackCalls::new(stack.clone(), connection.info()));
        // Outermost, so it sees each chunk as hyper takes it
        // (`crate::unread`).
        let service = service.map_response(|response| response.map(AnswerBody::new));
        let service = TowerToHyperService::new(service);
        let (http, draining, stop, open) = (http.clone(), draining.clone(), stop.clone(), open.clone());
        tokio::spawn(async move {
            serve_connection(&http, connection, service, lifetime, idle, draining, stop).await;
            drop(open);
        });
    }
    // The listener closes now: new clients are refused, not left waiting.
    drop(incoming);
    drop(open);
    draining.cancel();
    tokio::select! {
        None = all_closed.recv() => {}
        () = tokio::time::sleep(shutdown_grace) => {
            tracing::warn!(grace = ?shutdown_grace, "shutdown grace period over; stopping with calls in flight");
        }
    }
}

/// Serves one connection until it closes: asked to close (HTTP/2 GOAWAY,
/// in-flight calls go on) at its age, at its idle deadline (`idle`) or
/// when the server drains; closed `lifetime.grace` after its age or its
/// idle deadline, or when the server stops.
async fn serve_connection<S, B>(
    http: &http_server::Builder<UnreadAnswerExecutor>,
    io: crate::accept::Connection,
    service: S,
    lifetime: Lifetime,
    idle: IdleWatch,
    draining: CancellationToken,
    stop: CancellationToken,
) where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<tower::BoxError>,
{
    let connection = http.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let deadline = tokio::time::sleep(lifetime.age);
    let mut deadline = std::pin::pin!(deadline);
    let idle = idle.expired();
    let mut idle = std::pin::pin!(idle);
    // `in_grace`: asked to close at its age or idle deadline, and closed
    // when `deadline` (then the grace's end) comes.
    let (mut closing, mut in_grace) = (false, false);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = draining.cancelled(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            // Only calls that crossed the GOAWAY can be in flight: they
            // have the age's grace, which ends before the age's would.
            () = idle.as_mut(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
                in_grace = true;
                deadline.set(tokio::time::sleep(lifetime.grace));
            }
            () = &mut deadline => {
                if in_grace {
                    tracing::debug!("closing a connection past its --max-connection-age-grace");
                    return;
                }
                in_grace = true;
                if !closing {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
                // `sleep`, unlike an `Instant` sum, takes any grace.
                deadline.set(tokio::time::sleep(lifetime.grace));
            }
            () = stop.cancelled() => return,
        }
    }
}

/// See [`Server::limit_failed_auth`].
#[derive(Clone, Debug)]
pub struct FailedAuthLayer {
    failures: std::sync::Arc<AuthFailures>,
    trust_forwarded_for: bool,
    trusted: TrustedProxies,
}

impl<S> tower::Layer<S> for FailedAuthLayer {
    type Service = FailedAuth<S>;

    fn layer(&self, inner: S) -> FailedAuth<S> {
        FailedAuth { inner, limit: self.clone() }
    }
}

/// See [`Server::limit_failed_auth`].
#[derive(Clone, Debug)]
pub struct FailedAuth<S> {
    inner: S,
    limit: FailedAuthLayer,
}

impl<S, B> tower::Service<http::Request<B>> for FailedAuth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::Either<
        futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>,
        std::future::Ready<Result<Self::Response, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (parts, body) = request.into_parts();
        // Only calls that check a token are counted and refused: log-in and
        // new guests have limits of their own, and browsers send their
        // token along with every call.
        let token = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .filter(|_| !UNAUTHENTICATED_PATHS.iter().any(|p| parts.uri.path().starts_with(p)))
            .cloned();
        let client = token
            .as_ref()
            .and_then(|_| crate::limits::client_addr(&parts, self.limit.trust_forwarded_for, &self.limit.trusted));
        let (Some(token), Some(client)) = (token, client) else {
            return futures::future::Either::Left(Box::pin(self.inner.call(http::Request::from_parts(parts, body))));
        };
        // Drawn before the call goes on: neither calls at once nor calls
        // given up on escape the count.
        if let Err(refused) = self.limit.failures.check(client, token.as_bytes()) {
            let status: tonic::Status = refused.into();
            return futures::future::Either::Right(std::future::ready(Ok(status.into_http())));
        }
        let call = self.inner.call(http::Request::from_parts(parts, body));
        let failures = self.limit.failures.clone();
        futures::future::Either::Left(Box::pin(async move {
            let response = call.await?;
            // An error before any message travels in the headers: there
            // UNAUTHENTICATED is a refused token. A response without it is
            // the service answering, past its token check.
            match response.headers().get("grpc-status") {
                Some(code) if code == "16" => failures.failed(token.as_bytes()),
                None => failures.passed(token.as_bytes()),
                _ => {}
            }
            Ok(response)
        }))
    }
}

/// The paths of the calls that answer without checking a token (log-in,
/// registration, health, reflection): never counted, and an answer from one
/// proves nothing about the token a client sent along.
const UNAUTHENTICATED_PATHS: [&str; 4] = [
    "/natter.sessions.v1.SessionService/CreateSession",
    "/natter.sessions.v1.SessionService/CreateUser",
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
];

/// One of tonic's own answers that carries the wrong code by the gRPC
/// status code table (grpc/doc/statuscodes.md), which DESIGN.md promises
/// clients, known by its code and message ([`TONIC_ANSWERS`]).
struct TonicAnswer {
    /// Its grpc-status.
    code: &'static [u8],
    /// Any of these in its grpc-message (as sent, percent-encoded, or not).
    message_has: &'static [&'static [u8]],
    /// The code by the table.
    by_the_table: &'static str,
    /// The message to give instead (None: tonic's stays).
    message: Option<&'static str>,
}

/// tonic's answers with the wrong code:
/// - a request message over `max_decoding_message_size` is OUT_OF_RANGE in
///   tonic, RESOURCE_EXHAUSTED by the table;
/// - a request body that ends inside a gRPC frame, and gRPC-web text that
///   ends inside a base64 quantum, are INTERNAL in tonic and tonic-web:
///   the client's fault, INVALID_ARGUMENT (a body that failed as it came
///   off the connection is answered by its cause before, `crate::cut_body`);
/// - so is a request message that does not decode (a string that is not
///   UTF-8, a field of the wrong wire type), whose message names the field
///   (`CreateUserRequest.username: invalid string value: ...`). A response
///   of another natter service that does not decode is no client's fault:
///   [`crate::internal::Link::call`] answers it INTERNAL in words of its own.
const TONIC_ANSWERS: [TonicAnswer; 4] = [
    TonicAnswer { code: b"11", message_has: &[b"length%20too%", b"length too la"], by_the_table: "8", message: None },
    TonicAnswer {
        code: b"13",
        message_has: &[b"Unexpected%20EOF%20decoding", b"Unexpected EOF decoding"],
        by_the_table: "3",
        message: Some("the request body ended inside a gRPC message (a truncated frame)"),
    },
    TonicAnswer {
        code: b"13",
        message_has: &[b"malformed%20base64", b"malformed base64"],
        by_the_table: "3",
        message: Some("the gRPC-web text request body is not whole base64"),
    },
    TonicAnswer {
        code: b"13",
        message_has: &[b"failed%20to%20decode%20Protobuf%20message", b"failed to decode Protobuf message"],
        by_the_table: "3",
        message: None,
    },
];

/// Answers tonic's own answers by the gRPC status code table
/// ([`TONIC_ANSWERS`]). They travel trailers-only, in the response
/// headers, so this rewrites just those. (tonic's server had another, a
/// call past the client's grpc-timeout answered CANCELLED outside every
/// layer; natter serves with hyper itself, and [`RequestTimeoutLayer`]
/// answers that call.)
fn tonic_codes_by_the_table<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let Some(code) = headers.get("grpc-status") else { return response };
    let message_has = |needles: &[&[u8]]| {
        headers.get("grpc-message").is_some_and(|m| {
            let m = m.as_bytes();
            needles.iter().any(|n| m.windows(n.len()).any(|w| w == *n))
        })
    };
    let Some(&TonicAnswer { by_the_table: fixed, message, .. }) =
        TONIC_ANSWERS.iter().find(|answer| code.as_bytes() == answer.code && message_has(answer.message_has))
    else {
        return response;
    };
    match message {
        // Cannot fail: the message is ASCII, percent-encoded, with no
        // details.
        Some(message) => {
            headers.remove("grpc-status-details-bin");
            let _ = tonic::Status::new(tonic::Code::from_bytes(fixed.as_bytes()), message).add_header(headers);
        }
        None => {
            headers.insert("grpc-status", http::HeaderValue::from_static(fixed));
        }
    }
    response
}

/// Logs a warning when any browser origin may call a server that listens
/// beyond loopback: fine for local development, not for production (README,
/// "Security").
fn warn_on_open_cors(origins: &[String], listener: &TcpListener) {
    if listener.local_addr().is_ok_and(|addr| cors_open_beyond_loopback(origins, addr)) {
        tracing::warn!(
            "CORS allows any origin (--cors-allow-origins '*') on a non-loopback address: \
             any web page can call this server from its visitors' browsers; list your origins"
        );
    }
}

/// Whether `origins` allow any origin while `addr` is reachable from other
/// machines (a wildcard or unspecified address counts as reachable).
fn cors_open_beyond_loopback(origins: &[String], addr: std::net::SocketAddr) -> bool {
    !addr.ip().is_loopback() && origins.iter().any(|o| o == "*")
}

/// Ends a call that has not started answering within `timeout` (a unary
/// request whose body never arrives, a handler stuck on a dependency), or
/// within the client's own `grpc-timeout` when that is shorter, with
/// DEADLINE_EXCEEDED. A stream only has to start within it.
///
/// tonic's server applied a client's `grpc-timeout` outside natter's
/// layers (its `GrpcTimeout` wrapped the whole stack): its answer was
/// CANCELLED "Timeout expired", never recorded on the call's span and
/// metrics, and without CORS headers or the gRPC-web framing, so a browser
/// saw a network error. This layer, inside those, is the only one that
/// applies it now (natter serves with hyper itself, `serve_connections`),
/// so the client hears DEADLINE_EXCEEDED through every layer, as with any
/// other answer.
#[derive(Clone, Copy, Debug)]
struct RequestTimeoutLayer {
    timeout: Duration,
}

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> RequestTimeout<S> {
        RequestTimeout { inner, timeout: self.timeout }
    }
}

#[derive(Clone, Debug)]
struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S, B> tower::Service<http::Request<B>> for RequestTimeout<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let server = self.timeout;
        let client = request.headers().get("grpc-timeout").and_then(|v| v.to_str().ok());
        let client = client.and_then(crate::time::parse_grpc_timeout);
        let call = self.inner.call(request);
        Box::pin(async move {
            // The client's deadline, if it comes first.
            let client = client.filter(|client| *client < server);
            let timeout = client.unwrap_or(server);
            match tokio::time::timeout(timeout, call).await {
                Ok(result) => result,
                Err(_elapsed) => {
                    let message = match client {
                        Some(client) => format!("the call did not answer within its grpc-timeout of {client:?}"),
                        None => format!("the call did not start answering within {server:?}"),
                    };
                    Ok(tonic::Status::deadline_exceeded(message).into_http())
                }
            }
        })
    }
}

/// A tower layer that answers a request itself, with the [`tonic::Status`]
/// its check returns, instead of passing it on: the shape of every "refuse
/// before the service sees it" rule (header limits, the service credential).
#[derive(Clone)]
pub(crate) struct GateLayer<F> {
    check: F,
}

impl<F> GateLayer<F>
where
    F: Fn(&http::request::Parts) -> Option<tonic::Status> + Clone,
{
    pub(crate) fn new(check: F) -> Self {
        Self { check }
    }
}

impl<S, F: Clone> tower::Layer<S> for GateLayer<F> {
    type Service = Gate<S, F>;

    fn layer(&self, inner: S) -> Gate<S, F> {
        Gate { inner, check: self.check.clone() }
    }
}

/// See [`GateLayer`].
#[derive(Clone)]
pub(crate) struct Gate<S, F> {
    inner: S,
    check: F,
}

impl<S, F, B> tower::Service<http::Request<B>> for Gate<S, F>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    F: Fn(&http::request::Parts) -> Option<tonic::Status>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, std::future::Ready<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (parts, body) = request.into_parts();
        match (self.check)(&parts) {
            Some(status) => futures::future::Either::Right(std::future::ready(Ok(status.into_http()))),
            None => futures::future::Either::Left(self.inner.call(http::Request::from_parts(parts, body))),
        }
    }
}

/// Refuses a call to a public natter service that needs a bearer token and
/// carries no `authorization` header, with UNAUTHENTICATED, before its body
/// is read: the service would read and decode up to `--max-request-bytes`
/// first, and the failed-auth limit counts only calls that carry a token.
/// Log-in, registration, health, reflection, internal services (not served
/// on a public listener: UNIMPLEMENTED) and paths of no natter service pass.
fn require_token(parts: &http::request::Parts) -> Option<tonic::Status> {
    let path = parts.uri.path();
    let service = path.strip_prefix('/').and_then(|p| p.split_once('/')).map_or("", |(service, _)| service);
    let needs = service.starts_with("natter.")
        && !service.ends_with("InternalService")
        && !UNAUTHENTICATED_PATHS.iter().any(|p| path.starts_with(p));
    (needs && !parts.headers.contains_key(http::header::AUTHORIZATION))
        .then(|| tonic::Status::unauthenticated("missing authorization: Bearer token"))
}

/// Refuses a request whose header block is larger than `max_bytes`, counted
/// as HTTP/2 counts SETTINGS_MAX_HEADER_LIST_SIZE (RFC 9113 section 6.5.2:
/// name + value + 32 per field), with RESOURCE_EXHAUSTED.
fn header_limit(max_bytes: usize) -> impl Fn(&http::request::Parts) -> Option<tonic::Status> + Clone {
    move |parts| {
        let size: usize = parts.headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 32).sum();
        (size > max_bytes).then(|| {
            tonic::Status::resource_exhausted(format!(
                "request headers of {size} bytes are over the limit of {max_bytes}"
            ))
        })
    }
}

/// Serves GET and HEAD requests from the page's source, passes the rest on.
#[derive(Clone)]
struct WebPageLayer {
    files: Files,
}

/// A [`PageSource`] ready to answer.
#[derive(Clone)]
enum Files {
    Off,
    Embedded,
    Dir(ServeDir),
}

impl WebPageLayer {
    fn new(page: PageSource) -> Self {
        let files = match page {
            PageSource::Off => Files::Off,
            PageSource::Embedded => Files::Embedded,
            PageSource::Dir(dir) => Files::Dir(ServeDir::new(dir)),
        };
        Self { files }
    }
}

impl<S> tower::Layer<S> for WebPageLayer {
    type Service = WebPage<S>;

    fn layer(&self, inner: S) -> WebPage<S> {
        WebPage { inner, files: self.files.clone() }
    }
}

#[derive(Clone)]
struct WebPage<S> {
    inner: S,
    files: Files,
}

impl<S, B> tower::Service<http::Request<B>> for WebPage<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            return Box::pin(self.inner.call(request));
        }
        match &self.files {
            Files::Off => Box::pin(self.inner.call(request)),
            Files::Embedded => {
                let response = crate::web_page::embedded(&request);
                Box::pin(async move { Ok(response) })
            }
            Files::Dir(files) => {
                let files = files.clone();
                Box::pin(async move {
                    let response = match tower::ServiceExt::oneshot(files, request).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    };
                    let mut response = response.map(tonic::body::Body::new);
                    crate::web_page::secure(response.headers_mut());
                    Ok(response)
                })
            }
        }
    }
}

fn cors(origins: &[String]) -> CorsLayer {
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers(CORS_ALLOW_HEADERS.map(HeaderName::from_static))
        .expose_headers(CORS_EXPOSE_HEADERS.map(HeaderName::from_static))
        .max_age(Duration::from_secs(24 * 3600))
}

/// Resolves when the process gets Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            () = ctrl_c => {},
            () = term => {},
        }
    }
}

/// A token cancelled on Ctrl-C or SIGTERM.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        child.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tonic's answers to a body that ended inside a frame, to gRPC-web
    /// text that ended inside a base64 quantum, and to a message that does
    /// not decode, are the client's fault; a server's own INTERNAL goes as
    /// it is.
    #[test]
    fn tonic_s_answers_to_truncated_bodies_are_invalid_argument() {
        let answer = |code: &'static str, message: &'static str| {
            let mut response = http::Response::new(());
            response.headers_mut().insert("grpc-status", http::HeaderValue::from_static(code));
            response.headers_mut().insert("grpc-message", http::HeaderValue::from_static(message));
            tonic_codes_by_the_table(response)
        };
        let status =
            |response: &http::Response<()>| tonic::Status::from_header_map(response.headers()).expect("a status");
        let truncated = answer("13", "Unexpected%20EOF%20decoding%20stream.");
        assert_eq!(status(&truncated).code(), tonic::Code::InvalidArgument);
        let text = answer("13", "tonic-web:%20malformed%20base64%20request");
        assert_eq!(status(&text).code(), tonic::Code::InvalidArgument);
        let undecoded = answer(
            "13",
            "failed%20to%20decode%20Protobuf%20message:%20CreateUserRequest.username:%20invalid%20string%20value",
        );
        assert_eq!(
            (status(&undecoded).code(), status(&undecoded).message()),
            (
                tonic::Code::InvalidArgument,
                "failed to decode Protobuf message: CreateUserRequest.username: invalid string value"
            )
        );
        let own = answer("13", "database%20down");
        assert_eq!((status(&own).code(), status(&own).message()), (tonic::Code::Internal, "database down"));
    }

    #[test]
    fn open_cors_is_flagged_only_beyond_loopback() {
        let any = ["*".to_owned()];
        let listed = ["https://chat.example.com".to_owned()];
        assert!(cors_open_beyond_loopback(&any, "0.0.0.0:7070".parse().unwrap()));
        assert!(cors_open_beyond_loopback(&any, "10.1.2.3:7070".parse().unwrap()));
        assert!(!cors_open_beyond_loopback(&any, "127.0.0.1:7070".parse().unwrap()));
        assert!(!cors_open_beyond_loopback(&any, "[::1]:7070".parse().unwrap()));
        assert!(!cors_open_beyond_loopback(&listed, "0.0.0.0:7070".parse().unwrap()));
    }

    #[test]
    fn header_blocks_are_counted_as_http2_counts_them() {
        let request = |value: &str| http::Request::get("/").header("x-big", value).body(()).unwrap().into_parts().0;
        // "x-big" (5) + value + 32.
        assert!(header_limit(5 + 10 + 32)(&request(&"v".repeat(10))).is_none());
        let refused = header_limit(5 + 10 + 32)(&request(&"v".repeat(11))).expect("over the limit");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    }
}

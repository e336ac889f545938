//! natter's edge: the one port browsers and terminals use in split mode.
//!
//! It accepts gRPC and gRPC-web (HTTP/1.1 and HTTP/2, CORS) with the same
//! layer stack as every natter server, and forwards each call, by the
//! service prefix of its path, to an upstream replica over HTTP/2. Message
//! bodies are never decoded, so the edge needs no knowledge of the API beyond
//! four path prefixes; internal services (`*InternalService`) are not
//! routed. Health and reflection are answered by the edge itself.
//!
//! Each service may have several replicas. The edge checks each one's
//! grpc.health.v1 every `--upstream-health-interval`, sends calls round-robin
//! to the healthy ones, and retries a call on the next replica when the
//! connection to one fails before the call was sent (a killed replica), so
//! clients do not see its death. Request bodies (one message per natter RPC)
//! are buffered for that; responses, streams included, flow through.
//!
//! Each buffered request is capped (`--max-request-bytes`), and all of them
//! together too, by the budget every natter server keeps
//! (`natter_kit::budget`): the edge holds at most
//! `--max-buffered-request-bytes` (256 MiB) of request bodies at once, from
//! their first byte until the replica has answered (a slow replica keeps
//! them). A request that would go past it is refused at once,
//! RESOURCE_EXHAUSTED ("server busy", with a RetryInfo), instead of growing
//! the edge's memory by a megabyte for every client that sends one; its
//! bytes so far are let go. One client address (the TCP peer, or the client
//! a `--trusted-proxies` proxy names) holds at most its share of that
//! (`--max-buffered-request-bytes-per-address`, by default a quarter), so
//! that one host cannot fill it and have everyone else refused.
//!
//! A replica caps the calls a connection carries at once (HTTP/2's
//! SETTINGS_MAX_CONCURRENT_STREAMS, `--max-concurrent-streams`, 128), and a
//! live stream holds its place for as long as it is open. So the edge counts
//! the calls on each of its connections to a replica and opens another when
//! all are full (`--upstream-calls-per-connection`, 100): with a fixed set,
//! the 513th stream through one edge to a replica, and every unary call
//! after it, would wait for a stream to end.
//!
//! The edge hands a response's HTTP/2 flow-control credit back to its
//! replica only as the client reads, so a client that stops reading keeps
//! its calls' windows full. Each upstream connection's window is therefore
//! the sum of its calls' stream windows (`UPSTREAM_STREAM_WINDOW` each):
//! streams nobody reads hold their own windows and nothing of their
//! neighbours'. The price is memory: at most 256 KiB a stalled call, 25 MiB
//! a connection at the default 100 calls, and not for long: the edge's
//! listener resets a client's stream whose answer waited unread for
//! `--max-unread-answer-time` (`natter_kit::unread`), which drops the
//! call's upstream response, so h2 resets the stream to the replica too
//! (the replica's call ends) and frees what the edge held of it.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, Uri, Version};
use http_body_util::{BodyExt as _, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use natter_kit::budget::HeldBytes;
use natter_kit::web_page::PageSource;
use natter_kit::{Server, ServerArgs};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

/// Command line of `natter-edge`.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "natter-edge",
    version,
    about = "natter's edge: forwards gRPC and gRPC-web calls to the natter services"
)]
pub struct EdgeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// URLs of the sessions service replicas (http://host:port), comma separated.
    #[arg(long, env = "NATTER_SESSIONS_URL", value_delimiter = ',', required = true)]
    pub sessions_url: Vec<String>,
    /// URLs of the chats service replicas, comma separated.
    #[arg(long, env = "NATTER_CHATS_URL", value_delimiter = ',', required = true)]
    pub chats_url: Vec<String>,
    /// URLs of the messages service replicas, comma separated.
    #[arg(long, env = "NATTER_MESSAGES_URL", value_delimiter = ',', required = true)]
    pub messages_url: Vec<String>,
    /// URLs of the assistant service replicas, comma separated; none: the
    /// assistant's calls are UNIMPLEMENTED.
    #[arg(long, env = "NATTER_ASSISTANT_URL", value_delimiter = ',')]
    pub assistant_url: Vec<String>,
    /// How often each upstream replica's health is checked (while a
    /// service has no replica serving: from 50 ms, doubling up to this).
    #[arg(long, env = "NATTER_UPSTREAM_HEALTH_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub upstream_health_interval: Duration,
    /// HTTP/2 connections to each upstream replica, calls spread over them
    /// in turn: one connection is one task in the edge and in the replica,
    /// whatever the cores. More are opened while these are full (see
    /// --upstream-calls-per-connection)
    #[arg(long, env = "NATTER_UPSTREAM_CONNECTIONS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub upstream_connections: u16,
    /// Most calls (live streams included) the edge puts on one upstream
    /// connection at once; a call finding every connection to its replica
    /// full opens another, up to 1,024 a replica. Keep it at most the
    /// replicas' --max-concurrent-streams (128 by default): calls beyond
    /// that wait for a free stream
    #[arg(long, env = "NATTER_UPSTREAM_CALLS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub upstream_calls_per_connection: u32,
    /// Serve the browser page at `/` from this directory instead of the one
    /// built into the binary
    #[arg(long, env = "NATTER_WEB_DIR")]
    pub web_dir: Option<std::path::PathBuf>,
    /// Serve no browser page: the API only
    #[arg(long, env = "NATTER_NO_WEB_PAGE", conflicts_with = "web_dir")]
    pub no_web_page: bool,
    /// The proxies in front of the edge (an ingress, a load balancer that
    /// keeps HTTP), in CIDR notation, comma-separated: a call from one of
    /// them counts by the client its `x-forwarded-for` names (the
    /// rightmost entry no trusted proxy wrote), not as the proxy's own
    /// address, which would put every client under one per-address limit.
    /// Empty: the TCP peer is the client
    #[arg(long, env = "NATTER_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: natter_kit::TrustedProxies,
    /// Checks of tokens not proven in the last 15 minutes (new ones, and
    /// ones a service refused) per client address, counted here as the
    /// calls come in: beyond it, such calls are refused (RESOURCE_EXHAUSTED),
    /// so random tokens cannot keep the sessions service busy, while proven
    /// tokens from the same address go on. Log-in, registration and health
    /// are not counted. N/PERIOD, or `off`
    #[arg(long, env = "NATTER_FAILED_AUTH_RATE", default_value = "100/1m")]
    pub failed_auth_rate: natter_kit::limits::Rate,
}

/// Most connections the edge opens to one replica: 102,400 calls at the
/// default 100 a connection.
const MAX_CONNECTIONS_PER_REPLICA: usize = 1024;

/// The HTTP/2 flow-control window of each call the edge makes to a replica,
/// in bytes: 256 KiB (SETTINGS_INITIAL_WINDOW_SIZE, RFC 9113 sections 6.5.2
/// and 6.9.2).
///
/// The most of a response the replica sends before the edge has passed it
/// on, so the most a call whose client stops reading holds in the edge
/// (the replica then waits, holding its events itself), and, times
/// `--upstream-calls-per-connection`, the most a connection holds: 25 MiB
/// at the default 100. Against that memory, throughput: a stream moves at
/// most one window a round trip, 256 KiB per 0.5 ms on a LAN (about
/// 500 MiB/s; 125 MiB/s at a 2 ms cross-zone RTT), far more than a chat's
/// events or a page of 32 KiB messages need. hyper's default, 2 MiB, holds
/// 8 times as much per stalled call for speed no chat uses. Fixed, never
/// adaptive: hyper's adaptive window sets stream and connection windows
/// alike (up to 16 MiB), past [`upstream_connection_window`].
const UPSTREAM_STREAM_WINDOW: u32 = 256 * 1024;

/// The HTTP/2 connection flow-control window of an upstream connection
/// carrying at most `calls` calls at once, in bytes (RFC 9113 section 6.9):
/// `calls` x [`UPSTREAM_STREAM_WINDOW`], at most 2^31-1, the largest window
/// HTTP/2 allows (RFC 9113 section 6.9.1).
///
/// A connection's calls share its window, and each holds its part until
/// its client reads. As the sum of the calls' own windows, it cannot be
/// used up by calls whose clients stopped reading: the others on the
/// connection always find room. (hyper's default, 5 MiB for 2 MiB streams,
/// was used up by three unread streams, and every call on the connection
/// then hung after its response headers, out of the request timeout's
/// reach.) The clamp only bites beyond 8,191 calls a connection, far past
/// any replica's --max-concurrent-streams; the guarantee also assumes no
/// more than `calls` calls, which a lane only exceeds once its replica has
/// [`MAX_CONNECTIONS_PER_REPLICA`] full connections.
fn upstream_connection_window(calls: usize) -> u32 {
    const MAX_WINDOW: u64 = (1 << 31) - 1;
    let window = (calls as u64).saturating_mul(u64::from(UPSTREAM_STREAM_WINDOW)).min(MAX_WINDOW);
    u32::try_from(window).unwrap_or(u32::MAX)
}

/// How the edge opens a connection to a replica: the TCP connector and the
/// HTTP/2 client settings every [`Lane`] shares.
#[derive(Clone)]
struct Dialer {
    connector: HttpConnector,
    builder: hyper_util::client::legacy::Builder,
}

impl Dialer {
    /// A dialer for connections of at most `calls_per_connection` calls,
    /// each pinged after `keepalive.0` without a frame and closed when a
    /// ping goes unanswered for `keepalive.1` (the edge's own
    /// --http2-keepalive-interval and --http2-keepalive-timeout), idle or
    /// not, with TCP keepalive under it. A replica lost without a word (its
    /// node down, a partition) is found so: the streams it carried end
    /// with UNAVAILABLE and their clients resume elsewhere. Before, a quiet
    /// stream waited for ever, and the client's own pings, which the edge
    /// answers, told it all was well.
    fn new(calls_per_connection: usize, keepalive: (Duration, Duration)) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(keepalive.0)
            .http2_keep_alive_timeout(keepalive.1)
            .http2_keep_alive_while_idle(true)
            .http2_only(true)
            .http2_adaptive_window(false)
            .http2_initial_stream_window_size(UPSTREAM_STREAM_WINDOW)
            .http2_initial_connection_window_size(upstream_connection_window(calls_per_connection));
        Self { connector, builder }
    }

    /// A client of its own (a client pools one HTTP/2 connection a host).
    fn client(&self) -> Client<HttpConnector, Buffered> {
        self.builder.build(self.connector.clone())
    }
}

/// One replica of a service.
struct Replica {
    uri: Uri,
    healthy: AtomicBool,
    /// The connections to it (opened on first use, reopened after a
    /// failure or an idle close by the client of each), taken in turn.
    lanes: std::sync::RwLock<Vec<Arc<Lane>>>,
    next: AtomicUsize,
}

/// One HTTP/2 connection to a replica: a client of its own (a client pools
/// one connection a host) and the calls in flight on it.
struct Lane {
    client: Client<HttpConnector, Buffered>,
    calls: AtomicUsize,
}

/// A call's place on a [`Lane`], given back when dropped (the response
/// over, streams included, or the call failed).
struct Slot(Arc<Lane>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Lane {
    fn new(dialer: &Dialer) -> Self {
        Self { client: dialer.client(), calls: AtomicUsize::new(0) }
    }

    /// A place on this connection, if it has fewer than `cap` calls.
    fn take(self: &Arc<Self>, cap: usize) -> Option<Slot> {
        self.calls.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1)).ok()?;
        Some(Slot(self.clone()))
    }

    /// A place on this connection, however many calls it has.
    fn occupy(self: &Arc<Self>) -> Slot {
        self.calls.fetch_add(1, Ordering::AcqRel);
        Slot(self.clone())
    }
}

impl Replica {
    fn new(uri: Uri, connections: usize, dialer: &Dialer) -> Self {
        let lanes = (0..connections).map(|_| Arc::new(Lane::new(dialer))).collect();
        Self { uri, healthy: AtomicBool::new(true), lanes: std::sync::RwLock::new(lanes), next: AtomicUsize::new(0) }
    }

    /// A place for one call: on the next connection in turn with fewer than
    /// `cap` calls, else on a new connection, else (at
    /// [`MAX_CONNECTIONS_PER_REPLICA`]) on the least busy one, where h2
    /// holds the call until a stream is free.
    fn slot(&self, cap: usize, dialer: &Dialer) -> Slot {
        let turn = |lanes: &[Arc<Lane>], start: usize| {
            (0..lanes.len()).find_map(|i| lanes[(start + i) % lanes.len()].take(cap))
        };
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = turn(&self.lanes.read().unwrap_or_else(std::sync::PoisonError::into_inner), start) {
            return slot;
        }
        let mut lanes = self.lanes.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Another call may have given a place back or opened a lane meanwhile.
        if let Some(slot) = turn(&lanes, start) {
            return slot;
        }
        if lanes.len() < MAX_CONNECTIONS_PER_REPLICA {
            let lane = Arc::new(Lane::new(dialer));
            lanes.push(lane.clone());
            tracing::debug!(upstream = %self.uri, connections = lanes.len(), "upstream connections full; opening another");
            return lane.occupy();
        }
        lanes.iter().min_by_key(|lane| lane.calls.load(Ordering::Acquire)).expect("lanes").occupy()
    }
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("uri", &self.uri).field("healthy", &self.healthy).finish_non_exhaustive()
    }
}

/// The replicas of one service and the calls routed to them.
#[derive(Debug)]
struct Route {
    /// Path prefix of the service's calls, e.g. `/natter.chats.v1.ChatService/`.
    prefix: &'static str,
    /// Fully-qualified service name, for health checks.
    service: &'static str,
    replicas: Vec<Arc<Replica>>,
    next: AtomicUsize,
}

impl Route {
    /// Replicas to try, in order: healthy ones round-robin, then the others
    /// (a health check may lag behind a replica coming back).
    fn candidates(&self) -> Vec<Arc<Replica>> {
        let n = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let ring = (0..n).map(|i| self.replicas[(start + i) % n].clone());
        let (mut healthy, sick): (Vec<_>, Vec<_>) = ring.partition(|r| r.healthy.load(Ordering::Relaxed));
        healthy.extend(sick);
        healthy
    }
}

/// The forwarding service behind the edge's own health and reflection.
#[derive(Clone)]
struct Forward {
    routes: Arc<[Route]>,
    dialer: Dialer,
    /// `--upstream-calls-per-connection`.
    calls_per_connection: usize,
    /// `--max-request-bytes`: the most bytes of one request message.
    max_request_bytes: usize,
    /// `--trusted-proxies`.
    trusted_proxies: natter_kit::TrustedProxies,
    /// The edge's own shutdown: ends the streams it carries.
    shutdown: CancellationToken,
}

/// The one call whose response lasts (a StreamEvents stream): the edge
/// ends it itself when it shuts down. Other responses end by themselves
/// within the shutdown grace.
const STREAM_PATH: &str = "/natter.messages.v1.MessageService/StreamEvents";

impl Forward {
    fn new(args: &EdgeArgs, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let calls_per_connection = args.upstream_calls_per_connection as usize;
        let transport = &args.server.transport;
        let dialer =
            Dialer::new(calls_per_connection, (transport.http2_keepalive_interval, transport.http2_keepalive_timeout));
        let connections = usize::from(args.upstream_connections);
        let parse = |name: &str, urls: &[String]| -> anyhow::Result<Vec<Arc<Replica>>> {
            anyhow::ensure!(!urls.is_empty(), "--{name}-url needs at least one URL");
            urls.iter()
                .map(|url| {
                    let uri: Uri = url.trim().parse().map_err(|e| anyhow::anyhow!("--{name}-url {url:?}: {e}"))?;
                    anyhow::ensure!(
                        uri.scheme_str() == Some("http") && uri.authority().is_some(),
                        "--{name}-url must be http://host:port"
                    );
                    Ok(Arc::new(Replica::new(uri, connections, &dialer)))
                })
                .collect()
        };
        let route = |prefix, service, replicas| Route { prefix, service, replicas, next: AtomicUsize::new(0) };
        let mut routes = vec![
            route(
                "/natter.sessions.v1.SessionService/",
                "natter.sessions.v1.SessionService",
                parse("sessions", &args.sessions_url)?,
            ),
            route("/natter.chats.v1.ChatService/", "natter.chats.v1.ChatService", parse("chats", &args.chats_url)?),
            route(
                "/natter.messages.v1.MessageService/",
                "natter.messages.v1.MessageService",
                parse("messages", &args.messages_url)?,
            ),
        ];
        if !args.assistant_url.is_empty() {
            routes.push(route(
                "/natter.assistant.v1.AssistantService/",
                "natter.assistant.v1.AssistantService",
                parse("assistant", &args.assistant_url)?,
            ));
        }
        Ok(Self {
            routes: routes.into(),
            dialer,
            calls_per_connection,
            max_request_bytes: args.server.max_request_bytes,
            trusted_proxies: args.trusted_proxies.clone(),
            shutdown,
        })
    }

    /// Reads a request body whole. Its bytes are on the server's budget
    /// (`--max-buffered-request-bytes`, [`natter_kit::budget`]) as they
    /// come, kept there by `held` (the request's, from its extensions) until
    /// the last holder drops it: the edge holds them until the replica has
    /// answered.
    ///
    /// Errors: as [`body_failed`] says: RESOURCE_EXHAUSTED when the body is
    /// over `--max-request-bytes`, or when the budget has no room for its
    /// next frame ("server busy", with a RetryInfo; counted in
    /// `natter_request_budget_refusals_total`); DEADLINE_EXCEEDED past the
    /// body's deadline; CANCELLED (or the code of the stream's reset) when
    /// the client went away mid-body. What was taken is given back as
    /// `held` goes.
    async fn buffer(&self, body: Body, held: Option<&HeldBytes>) -> Result<Bytes, tonic::Status> {
        if let Some(held) = held {
            held.keep();
        }
        // A gRPC frame header (5 bytes) on top of the largest message.
        let mut body = std::pin::pin!(Limited::new(body, self.max_request_bytes + 5));
        let mut bytes = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| body_failed(e, self.max_request_bytes))?;
            let Ok(data) = frame.into_data() else { continue };
            bytes.extend_from_slice(&data);
        }
        Ok(bytes.freeze())
    }

    async fn call(self, request: Request<Body>) -> Result<Response<Body>, Infallible> {
        let path = request.uri().path();
        let Some(route) = self.routes.iter().find(|r| path.starts_with(r.prefix)) else {
            let status = tonic::Status::unimplemented(format!("no service at {path}"));
            return Ok(status.into_http::<Body>());
        };
        let peer = request
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(tonic::transport::server::TcpConnectInfo::remote_addr);
        let (mut parts, body) = request.into_parts();
        // Always there behind natter's public layer stack.
        let held = parts.extensions.remove::<HeldBytes>();
        let body = match self.buffer(body, held.as_ref()).await {
            Ok(buffered) => buffered,
            Err(status) => return Ok(status.into_http::<Body>()),
        };
        // The client speaks HTTP/2 to the upstream whatever the browser used.
        parts.version = Version::HTTP_2;
        parts.headers.remove(http::header::HOST);
        parts.headers.remove(http::header::CONNECTION);
        // A client's tracestate travels on only within W3C's limits (when
        // the edge exports spans, it writes the trace context anew anyway).
        natter_kit::telemetry::drop_untrusted_trace_state(&mut parts.headers);
        // The client's address, for per-address rate limits upstream: the
        // peer, or the client a trusted proxy in front names; never what
        // the client claims (the header is replaced, not extended).
        let client = peer.map(|p| {
            let forwarded = parts.headers.get_all(FORWARDED_FOR).into_iter().filter_map(|v| v.to_str().ok());
            self.trusted_proxies.client(p.ip(), forwarded)
        });
        parts.headers.remove(FORWARDED_FOR);
        if let Some(value) = client.and_then(|ip| http::HeaderValue::from_str(&ip.to_string()).ok()) {
            parts.headers.insert(FORWARDED_FOR, value);
        }
        for replica in route.candidates() {
            let mut uri = replica.uri.clone().into_parts();
            uri.path_and_query = parts.uri.path_and_query().cloned();
            let mut attempt = Request::new(Buffered::new(body.clone(), held.clone()));
            *attempt.method_mut() = parts.method.clone();
            *attempt.uri_mut() = Uri::from_parts(uri).unwrap_or_default();
            *attempt.version_mut() = Version::HTTP_2;
            *attempt.headers_mut() = parts.headers.clone();
            // Each attempt is a client span naming the replica; the
            // upstream's spans become its children.
            let span = if natter_kit::telemetry::exporting() {
                let server = replica.uri.authority().map_or("", |a| a.as_str());
                natter_kit::client_span(parts.uri.path(), server)
            } else {
                tracing::Span::none()
            };
            // Held until the response is over: a live stream keeps its
            // place on the connection.
            let slot = replica.slot(self.calls_per_connection, &self.dialer);
            let sent = {
                let _entered = span.enter();
                natter_kit::telemetry::inject_headers(attempt.headers_mut());
                slot.0.client.request(attempt)
            };
            match natter_kit::client_future(span, sent).await {
                Ok(response) => {
                    let upstream = replica.uri.clone();
                    let ends = (parts.uri.path() == STREAM_PATH).then(|| self.shutdown.clone());
                    return Ok(response.map(|body| Body::new(UpstreamBody::new(body, upstream, slot, ends))));
                }
                // Never sent: safe to try the next replica.
                Err(e) if e.is_connect() => {
                    if replica.healthy.swap(false, Ordering::Relaxed) {
                        tracing::warn!(upstream = %replica.uri, error = %e, "upstream unreachable; trying another replica");
                    }
                }
                Err(e) => {
                    tracing::warn!(upstream = %replica.uri, error = %e, "upstream call failed");
                    return Ok(tonic::Status::unavailable("upstream service unavailable").into_http::<Body>());
                }
            }
        }
        Ok(tonic::Status::unavailable(format!("no replica of {} is reachable", route.service)).into_http::<Body>())
    }
}

/// The answer to a call whose request body failed as the edge read it
/// (`error`, from [`Limited`] over the body of the edge's layer stack):
/// - the [`tonic::Status`] a layer failed it with (the request budget's
///   "server busy") as it is;
/// - RESOURCE_EXHAUSTED, naming `--max-request-bytes` (`max_request_bytes`),
///   for a body over it;
/// - DEADLINE_EXCEEDED for a body that did not arrive whole within the
///   layer stack's body deadline (`tower_http`'s
///   `RequestBodyDeadlineLayer`);
/// - else, its client gone mid-body (a reset, a closed connection), the
///   code of the reset as tonic reads it, or CANCELLED.
///
/// Each used to be "request too large", so a client cut off or gone was
/// told (and counted) RESOURCE_EXHAUSTED, as if it had sent too much. With
/// today's layer stack a client seldom hears the last two: the request
/// timeout, half the body deadline, answers a stalled body first (also
/// DEADLINE_EXCEEDED), and a client that resets its call is gone before
/// the answer (counted CANCELLED). This keeps the answer right if that
/// changes.
fn body_failed(error: tower::BoxError, max_request_bytes: usize) -> tonic::Status {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
    while let Some(e) = source {
        if e.is::<tonic::Status>() {
            break;
        }
        if e.is::<http_body_util::LengthLimitError>() {
            return tonic::Status::resource_exhausted(format!(
                "request message larger than --max-request-bytes ({max_request_bytes} bytes)"
            ));
        }
        if e.is::<tower_http::timeout::TimeoutError>() {
            return tonic::Status::deadline_exceeded("the request body did not arrive whole within its deadline");
        }
        source = e.source();
    }
    tonic::Status::try_from_error(error)
        .unwrap_or_else(|e| tonic::Status::cancelled(format!("the request body ended early: {e}")))
}

/// A buffered request body on its way to a replica (each attempt gets one):
/// the bytes, as one data frame, and the request's share of
/// `--max-buffered-request-bytes`, held while hyper holds the body.
struct Buffered {
    data: Option<Bytes>,
    _held: Option<HeldBytes>,
}

impl Buffered {
    fn new(data: Bytes, held: Option<HeldBytes>) -> Self {
        Self { data: Some(data).filter(|d| !d.is_empty()), _held: held }
    }
}

impl http_body::Body for Buffered {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.get_mut().data.take().map(|data| Ok(http_body::Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// `x-forwarded-for`: set by the edge to the client's IP address alone (see
/// [`EdgeArgs::trusted_proxies`]).
const FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

pin_project_lite::pin_project! {
    /// An upstream's response body, passed through frame by frame; when the
    /// upstream fails mid-response (a replica killed, its connection reset),
    /// or the edge shuts down during a stream, the body ends with trailers
    /// `grpc-status: 14` (UNAVAILABLE: "reconnect and resume", as the
    /// protos promise) instead of a reset that clients would see as
    /// INTERNAL.
    struct UpstreamBody<B> {
        #[pin]
        inner: B,
        upstream: Uri,
        failed: bool,
        // A stream's end when the edge shuts down (None: not a stream).
        ends: Option<CancellationToken>,
        // Made at the first wait for the upstream, so a stream that is
        // waiting wakes when the edge shuts down.
        ending: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
        // The call's place on its upstream connection, until the body goes.
        _slot: Slot,
    }
}

impl<B> UpstreamBody<B> {
    fn new(inner: B, upstream: Uri, slot: Slot, ends: Option<CancellationToken>) -> Self {
        Self { inner, upstream, failed: false, ends, ending: None, _slot: slot }
    }
}

/// The trailers-only end of a response the edge cuts short: UNAVAILABLE
/// with `message` (printable ASCII but `%`, unencoded: gRPC over HTTP/2,
/// "Responses").
fn unavailable_trailers(message: &'static str) -> http_body::Frame<Bytes> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
    trailers.insert("grpc-message", http::HeaderValue::from_static(message));
    http_body::Frame::trailers(trailers)
}

impl<B> http_body::Body for UpstreamBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let this = self.project();
        if *this.failed {
            return std::task::Poll::Ready(None);
        }
        let polled = this.inner.poll_frame(cx);
        if polled.is_pending()
            && let Some(ends) = this.ends
        {
            let ending = this.ending.get_or_insert_with(|| Box::pin(ends.clone().cancelled_owned()));
            if ending.as_mut().poll(cx).is_ready() {
                *this.failed = true;
                let end = unavailable_trailers("server shutting down; reconnect and resume");
                return std::task::Poll::Ready(Some(Ok(end)));
            }
        }
        match std::task::ready!(polled) {
            Some(Ok(frame)) => std::task::Poll::Ready(Some(Ok(frame))),
            None => std::task::Poll::Ready(None),
            Some(Err(e)) => {
                *this.failed = true;
                tracing::warn!(upstream = %this.upstream, error = %e, "upstream failed mid-response");
                let end = unavailable_trailers("upstream service failed mid-call; reconnect and resume");
                std::task::Poll::Ready(Some(Ok(end)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }
}

/// The first wait before checking again a service none of whose replicas
/// answered SERVING (doubled each round it stays so, up to the interval).
const RECHECK_DOWN: Duration = Duration::from_millis(50);

/// Checks every replica's health on an interval, records it for routing, and
/// reports each service SERVING on the edge's own health while any replica is.
/// While some service has no replica SERVING (replicas still migrating at
/// start-up, or all of them restarting), the checks come sooner: after 50 ms,
/// then twice as long each round up to the interval, so the edge reports a
/// service back within a round trip of its first replica serving rather
/// than up to an interval later.
async fn watch_health(routes: Arc<[Route]>, health: HealthReporter, interval: Duration, shutdown: CancellationToken) {
    let mut next_check = Duration::ZERO;
    let channels: Vec<Vec<tonic::transport::Channel>> = routes
        .iter()
        .map(|r| {
            r.replicas
                .iter()
                .map(|rep| {
                    tonic::transport::Endpoint::from(rep.uri.clone())
                        .connect_timeout(Duration::from_secs(1))
                        .timeout(interval.max(Duration::from_millis(500)))
                        .connect_lazy()
                })
                .collect()
        })
        .collect();
    let mut recheck = RECHECK_DOWN;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(next_check) => {}
        }
        let mut all_up = true;
        for (route, channels) in routes.iter().zip(&channels) {
            let checks = route.replicas.iter().zip(channels).map(|(replica, channel)| async move {
                let request = HealthCheckRequest { service: route.service.to_owned() };
                let up = matches!(
                    HealthClient::new(channel.clone()).check(request).await,
                    Ok(r) if r.get_ref().status == ServingStatus::Serving as i32
                );
                if replica.healthy.swap(up, Ordering::Relaxed) != up {
                    tracing::info!(upstream = %replica.uri, service = route.service, healthy = up, "upstream health changed");
                }
                up
            });
            let any = futures::future::join_all(checks).await.into_iter().any(|up| up);
            all_up &= any;
            let status = if any { ServingStatus::Serving } else { ServingStatus::NotServing };
            health.set_service_status(route.service, status).await;
        }
        (next_check, recheck) =
            if all_up { (interval, RECHECK_DOWN) } else { (recheck.min(interval), (recheck * 2).min(interval)) };
    }
}

/// Serves the edge on `listener` until `shutdown` is cancelled.
///
/// Errors: a malformed upstream URL, or serving fails.
pub async fn run(args: EdgeArgs, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let forward = Forward::new(&args, shutdown.clone())?;
    // Clients reach the edge: its per-address shares find the client as
    // its other per-address limits do.
    let client_addresses =
        natter_kit::limits::ClientAddresses { trust_forwarded_for: false, trusted: args.trusted_proxies.clone() };
    let mut server = Server::new(&ServerArgs { client_addresses: Some(client_addresses), ..args.server.clone() });
    server.limit_failed_auth(args.failed_auth_rate, false, args.trusted_proxies.clone());
    // Replicas count as healthy until a check says otherwise.
    for route in forward.routes.iter() {
        server.health().set_service_status(route.service, ServingStatus::Serving).await;
    }
    tokio::spawn(watch_health(
        forward.routes.clone(),
        server.health(),
        args.upstream_health_interval,
        shutdown.clone(),
    ));
    server.set_web_page(PageSource::from_flags(args.web_dir.as_deref(), args.no_web_page)?);
    let mut parts = server.into_parts();
    let proxy = tower::service_fn(move |request: Request<Body>| forward.clone().call(request));
    parts.routes = parts.routes.into_axum_router().fallback_service(proxy).into();
    natter_kit::serve::serve_routes(parts, listener, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service whose replicas were not yet serving at the edge's first
    /// check (their stores migrating) is reported SERVING soon after they
    /// are, not an `--upstream-health-interval` later (an hour here).
    #[tokio::test]
    async fn a_service_that_comes_up_is_reported_serving_within_moments() {
        const SERVICES: [&str; 4] = [
            "natter.sessions.v1.SessionService",
            "natter.chats.v1.ChatService",
            "natter.messages.v1.MessageService",
            "natter.assistant.v1.AssistantService",
        ];
        let (upstream, upstream_service) = tonic_health::server::health_reporter();
        for service in SERVICES {
            upstream.set_service_status(service, ServingStatus::NotServing).await;
        }
        let replica = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let replica_url = format!("http://{}", replica.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(upstream_service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(replica)),
        );
        let mut argv = vec!["natter-edge", "--listen", "127.0.0.1:0", "--upstream-health-interval", "1h"];
        for flag in ["--sessions-url", "--chats-url", "--messages-url", "--assistant-url"] {
            argv.extend([flag, replica_url.as_str()]);
        }
        let args = <EdgeArgs as clap::Parser>::try_parse_from(argv).unwrap();
        let edge = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let edge_url = format!("http://{}", edge.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let _stop = shutdown.clone().drop_guard();
        tokio::spawn(run(args, edge, shutdown));
        let mut health = HealthClient::new(tonic::transport::Endpoint::from_shared(edge_url).unwrap().connect_lazy());
        let chats = || HealthCheckRequest { service: SERVICES[1].into() };
        let status_becomes = |want: ServingStatus| {
            let mut health = health.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        match health.check(chats()).await {
                            Ok(r) if r.get_ref().status == want as i32 => return,
                            _ => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                })
                .await
            }
        };
        status_becomes(ServingStatus::NotServing).await.expect("the first check finds no replica serving");
        for service in SERVICES {
            upstream.set_service_status(service, ServingStatus::Serving).await;
        }
        let reported = status_becomes(ServingStatus::Serving).await;
        let now = health.check(chats()).await.map(|r| r.into_inner().status);
        assert!(reported.is_ok(), "the replica serves, but 10 s on the edge still reports {now:?} (1 = SERVING)");
    }

    /// A body the edge could not read whole is answered by its cause (each
    /// was RESOURCE_EXHAUSTED "request too large"): too long, past its
    /// deadline, refused by a layer, or its client gone.
    #[tokio::test]
    async fn a_body_that_fails_is_answered_by_its_cause() {
        // As `Forward::buffer` reads one, at --max-request-bytes 10.
        let fail = |body: Body| async move {
            let mut body = std::pin::pin!(Limited::new(body, 10 + 5));
            loop {
                match body.frame().await.expect("the body fails") {
                    Ok(_) => continue,
                    Err(e) => return body_failed(e, 10),
                }
            }
        };
        let frames = |frames: Vec<Result<http_body::Frame<Bytes>, tower::BoxError>>| {
            Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)))
        };

        let too_large = fail(Body::from(vec![0u8; 16])).await;
        assert_eq!(too_large.code(), tonic::Code::ResourceExhausted, "{too_large:?}");
        assert!(too_large.message().contains("--max-request-bytes (10 bytes)"), "{too_large:?}");

        let never_ends = futures::stream::pending::<Result<http_body::Frame<Bytes>, Infallible>>();
        let stalled = tower_http::timeout::DeadlineBody::new(
            Duration::from_millis(1),
            http_body_util::StreamBody::new(never_ends),
        );
        let late = fail(Body::new(stalled)).await;
        assert_eq!(late.code(), tonic::Code::DeadlineExceeded, "{late:?}");

        let busy = tonic::Status::resource_exhausted("server busy: too many request bytes in flight");
        let refused = fail(frames(vec![Ok(http_body::Frame::data(Bytes::from_static(b"x"))), Err(busy.into())])).await;
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(refused.message(), "server busy: too many request bytes in flight", "as the layer said");

        let closed = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed mid-body");
        let gone = fail(frames(vec![Err(closed.into())])).await;
        assert_eq!(gone.code(), tonic::Code::Cancelled, "{gone:?}");
    }

    #[test]
    fn a_connections_window_is_its_calls_windows_within_http2s_limit() {
        // The default 100 calls: 25 MiB, room for every call's own window.
        assert_eq!(upstream_connection_window(100), 100 * 256 * 1024);
        assert_eq!(upstream_connection_window(1), UPSTREAM_STREAM_WINDOW);
        // 2^31-1 at most (RFC 9113 section 6.9.1): h2 panics beyond it,
        // which --upstream-calls-per-connection 100000 would ask for.
        assert_eq!(upstream_connection_window(8191), 8191 * 256 * 1024);
        assert_eq!(upstream_connection_window(8192), (1 << 31) - 1);
        assert_eq!(upstream_connection_window(100_000), (1 << 31) - 1);
    }
}

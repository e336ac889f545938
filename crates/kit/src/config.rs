//! Flags and `NATTER_*` variables that every natter binary accepts.

use std::net::SocketAddr;
use std::time::Duration;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Options shared by every server binary; flatten into a binary's own
/// `clap::Parser` with `#[command(flatten)]`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on (gRPC and gRPC-web on one port); port 0 picks a free port.
    #[arg(long, env = "NATTER_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,

    /// Log format: text or json. Verbosity follows RUST_LOG (default info, PostgreSQL notices from warn).
    #[arg(long, env = "NATTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Browser origins allowed by CORS for gRPC-web, comma separated, each
    /// as a browser sends it (`https://chat.example.com`, with a port if not
    /// the scheme's: no path, no trailing `/`, lower case); `*` allows any.
    /// Anything else stops the start-up with an error naming it
    #[arg(long, env = "NATTER_CORS_ALLOW_ORIGINS", value_delimiter = ',', default_value = "*",
          value_parser = parse_cors_origin)]
    pub cors_allow_origins: Vec<String>,

    /// Largest decoded request message, in bytes (larger ones are refused).
    #[arg(long, env = "NATTER_MAX_REQUEST_BYTES", default_value_t = 1024 * 1024)]
    pub max_request_bytes: usize,

    /// Most bytes of request bodies the server holds at once, all calls
    /// together (each one at most --max-request-bytes): a message's bytes
    /// are held from the first until it is decoded (the edge: until its
    /// replica answers). A request that would go past it is refused,
    /// RESOURCE_EXHAUSTED ("server busy", retry in 1 s), and what it sent
    /// so far is let go. Internal listeners have none
    #[arg(long, env = "NATTER_MAX_BUFFERED_REQUEST_BYTES", default_value_t = DEFAULT_MAX_BUFFERED_REQUEST_BYTES,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_buffered_request_bytes: u64,

    /// Most bytes of request bodies one client address may hold of
    /// --max-buffered-request-bytes at once, so that no one address fills
    /// the budget and has every other client refused; past it, its calls
    /// are refused (RESOURCE_EXHAUSTED, "server busy", retry in 1 s) while
    /// others go on. Default: a quarter of --max-buffered-request-bytes, and
    /// never less than one message of --max-request-bytes. Only where
    /// clients reach the server (the all-in-one, the edge); a service's own
    /// port, which the edge calls, has none
    #[arg(long, env = "NATTER_MAX_BUFFERED_REQUEST_BYTES_PER_ADDRESS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_buffered_request_bytes_per_address: Option<u64>,

    /// Not a flag: how the server finds a call's client address for its
    /// per-address shares (of --max-buffered-request-bytes, and of the
    /// streams that need no token), set from its binary's own flags by a
    /// server clients reach (the all-in-one, the edge). `None` (a
    /// service's public port, which only the edge calls, as one address):
    /// no per-address shares.
    #[arg(skip)]
    pub client_addresses: Option<crate::limits::ClientAddresses>,

    /// How long in-flight calls may run after a shutdown signal before the server stops anyway.
    #[arg(long, env = "NATTER_SHUTDOWN_GRACE", value_parser = humantime::parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,

    /// OTLP/gRPC endpoint to export trace spans to (`http://collector:4317`);
    /// unset: the standard OTEL_EXPORTER_OTLP_ENDPOINT if set, else no export.
    #[arg(long, env = "NATTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Address to serve Prometheus metrics on, at `GET /metrics` over plain
    /// HTTP (for example 0.0.0.0:9090); unset: no metrics endpoint.
    #[arg(long, env = "NATTER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Trace calls of the standard health service too (grpc.health.v1;
    /// off: a probe every few seconds per replica would be a trace each).
    #[arg(long, env = "NATTER_TRACE_HEALTH_CHECKS")]
    pub trace_health_checks: bool,

    /// The `service.instance.id` of exported spans (default: the host
    /// name and the listen port, e.g. `natter-messages-0:7070`); an
    /// `OTEL_RESOURCE_ATTRIBUTES` that sets one wins.
    #[arg(long, env = "NATTER_INSTANCE_ID")]
    pub instance_id: Option<String>,

    #[command(flatten)]
    pub transport: TransportArgs,
}

/// Checks one value of `--cors-allow-origins`: `*`, or an origin as a
/// browser serializes it in its `Origin` header (RFC 6454 section 6.2:
/// `scheme://host[:port]`, lower case, nothing after), which is what CORS
/// compares byte for byte. Spaces around it are trimmed.
///
/// Errors: anything else, saying what is wrong (clap adds the flag and the
/// value), so that an origin that could never match stops the start-up
/// instead of being dropped, leaving its page unable to call.
fn parse_cors_origin(value: &str) -> Result<String, String> {
    let origin = value.trim();
    if origin == "*" {
        return Ok(origin.to_owned());
    }
    let expected = "expected `*` or an origin such as https://chat.example.com (scheme://host[:port])";
    let uri: http::Uri = origin.parse().map_err(|_| format!("not an origin: {expected}"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(format!("no scheme or host: {expected}"));
    };
    // http::Uri reads `https://host` with the path `/`.
    if uri.path() != "/" || uri.query().is_some() || origin.ends_with('/') {
        return Err(format!("an origin has no path, not even a trailing `/`: {expected}"));
    }
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return Err(format!("an origin has a host and no user name: {expected}"));
    }
    if !scheme.chars().chain(authority.as_str().chars()).all(|c| !c.is_ascii_uppercase()) {
        return Err(format!("browsers send origins in lower case: {expected}"));
    }
    http::HeaderValue::from_str(origin).map_err(|_| format!("not a header value: {expected}"))?;
    Ok(origin.to_owned())
}

/// The default of `--max-buffered-request-bytes`: 256 MiB, 256 requests at
/// the default `--max-request-bytes` of 1 MiB, and thousands of ordinary
/// ones (a chat message is at most 32 KiB of text). A size a pod's memory
/// limit holds beside what else a server has in flight.
pub const DEFAULT_MAX_BUFFERED_REQUEST_BYTES: u64 = 256 * 1024 * 1024;

/// The default of `--max-connections`, per listener. The cap exists so
/// that file descriptors never run out (then accept fails for every user,
/// and so do the process's own files and upstream connections); it sits far
/// under the open-file limit a server has once its soft limit is raised to
/// the hard one, which the listener does at start (systemd and containerd
/// give a hard limit of 524288, Docker's default was 1048576). Where even
/// the hard limit leaves no room for the cap plus the process's own
/// descriptors (512 are counted), those still run out first, and the
/// listener logs a warning at start. It is
/// far more than one replica serves (a client holds one HTTP/2 connection,
/// the edge a few per replica), and costs memory a pod can hold: an idle
/// HTTP/2 connection after a call takes about 19 KiB, one that sent only
/// its preface 13 KiB, a silent one 4 KiB (measured with 2,000 of each), so
/// 10,000 at worst about 200 MiB.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;

/// The default of `--max-connections-per-address`: a tenth of
/// [`DEFAULT_MAX_CONNECTIONS`], so that it takes ten hosts to fill a
/// listener, and far more than one client holds (a browser or tonic
/// channel keeps one HTTP/2 connection; a browser on HTTP/1.1 at most six).
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: u32 = 1_000;

/// Limits of the HTTP/2 and HTTP/1.1 transport, applied by hyper and tonic
/// to every connection of a server (public and internal listeners alike).
#[derive(Clone, Debug, clap::Args)]
pub struct TransportArgs {
    /// Most concurrent HTTP/2 streams (calls) a client may open on one
    /// connection (SETTINGS_MAX_CONCURRENT_STREAMS, RFC 9113 section 6.5.2).
    #[arg(long, env = "NATTER_MAX_CONCURRENT_STREAMS", default_value_t = 128)]
    pub max_concurrent_streams: u32,

    /// Largest request header block, in bytes: HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE,
    /// and the same limit checked on HTTP/1.1 (gRPC-web) requests (larger: 431).
    #[arg(long, env = "NATTER_MAX_HEADER_LIST_BYTES", default_value_t = 16 * 1024)]
    pub max_header_list_bytes: u32,

    /// How long a call may take to start answering: a unary call whose
    /// request body never arrives, or whose handler hangs, ends with
    /// DEADLINE_EXCEEDED then (a client's shorter grpc-timeout wins). Streams
    /// only need to start within it; every request body (a stream's too)
    /// must have arrived whole within twice it, or the call is ended.
    #[arg(long, env = "NATTER_REQUEST_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub request_timeout: Duration,

    /// How often an HTTP/2 connection is pinged when no frame arrived
    /// (finds dead peers behind NATs and load balancers). The edge pings
    /// its connections to the replicas so too.
    #[arg(long, env = "NATTER_HTTP2_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration, default_value = "30s")]
    pub http2_keepalive_interval: Duration,

    /// How long a ping may go unanswered before the connection is closed.
    #[arg(long, env = "NATTER_HTTP2_KEEPALIVE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "20s")]
    pub http2_keepalive_timeout: Duration,

    /// Age after which a connection is asked to close (HTTP/2 GOAWAY): no
    /// new calls on it; clients reconnect, as with gRPC's MAX_CONNECTION_AGE.
    /// Bounds how long any connection, idle or not, is held.
    #[arg(long, env = "NATTER_MAX_CONNECTION_AGE", value_parser = humantime::parse_duration, default_value = "1h")]
    pub max_connection_age: Duration,

    /// How long calls on a connection past its age may still run before it
    /// is closed (open streams then end with UNAVAILABLE; clients resume).
    #[arg(long, env = "NATTER_MAX_CONNECTION_AGE_GRACE", value_parser = humantime::parse_duration, default_value = "10m")]
    pub max_connection_age_grace: Duration,

    /// How long a new connection has to deliver its first request, from
    /// accept until that request's headers are read (HTTP/2: the preface,
    /// SETTINGS and a whole HEADERS block; HTTP/1.1: the request head). One
    /// that has not by then is closed, however many bytes it sent; one that
    /// has is never cut by it (idle ones are left to --max-connection-idle).
    #[arg(long, env = "NATTER_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub handshake_timeout: Duration,

    /// How long a connection to a public listener may stay open with no
    /// call in flight (no unary call being answered, no stream open) after
    /// its last call ended, before it is closed (HTTP/2: GOAWAY first); its
    /// client connects again for its next call (gRPC's MAX_CONNECTION_IDLE). 0s: never. Internal
    /// listeners keep idle connections (only natter's services reach them).
    #[arg(long, env = "NATTER_MAX_CONNECTION_IDLE", value_parser = humantime::parse_duration, default_value = "5m")]
    pub max_connection_idle: Duration,

    /// Most TCP connections one listener holds at once (a split service's
    /// public and internal listeners each). At the cap the listener stops
    /// accepting: open connections go on; new ones wait in the kernel's
    /// accept queue and are taken, oldest first, as open ones close. At
    /// start the soft open-file limit is raised to the hard one (often
    /// 524288 or more; a warning says if the cap does not fit under it).
    #[arg(long, env = "NATTER_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Most TCP connections a public listener holds at once from one
    /// client address (an IPv6 /64 counts as one address). A further
    /// connection from it is closed at once, so that one host cannot take
    /// every place of --max-connections (a health Watch needs no token and
    /// never ends) while others wait. 0: no cap. Clients behind one NAT
    /// share it; where one proxy or load balancer carries every client's
    /// connections (or the edge those of a split service's public
    /// listener), set 0 there. Internal listeners have none.
    #[arg(long, env = "NATTER_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS)]
    pub max_connections_per_address: u32,

    /// How long an answer may wait for a client that does not read it
    /// (the slow-consumer rule). An HTTP/2 stream whose next chunk waits
    /// this long for the client's flow-control window is reset: the client
    /// sees CANCELLED, the server lets go of the call and what it buffered
    /// of it, and StreamEvents, called again with its resume positions,
    /// resumes where it was. A connection whose writes make no progress for
    /// this long (a client that reads nothing from its socket; on HTTP/1.1,
    /// gRPC-web, one call's answer) is closed: UNAVAILABLE. A client that
    /// reads, but takes longer than this for one chunk (up to 16 KiB), is
    /// cut too. 0s: never.
    #[arg(long, env = "NATTER_MAX_UNREAD_ANSWER_TIME", value_parser = humantime::parse_duration, default_value = "30s")]
    pub max_unread_answer_time: Duration,
}

impl Default for TransportArgs {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 128,
            max_header_list_bytes: 16 * 1024,
            request_timeout: Duration::from_secs(30),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(20),
            max_connection_age: Duration::from_secs(3600),
            max_connection_age_grace: Duration::from_secs(600),
            handshake_timeout: Duration::from_secs(10),
            max_connection_idle: Duration::from_secs(300),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            max_unread_answer_time: Duration::from_secs(30),
        }
    }
}

impl Default for ServerArgs {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_format: LogFormat::Text,
            cors_allow_origins: vec!["*".to_owned()],
            max_request_bytes: 1024 * 1024,
            max_buffered_request_bytes: DEFAULT_MAX_BUFFERED_REQUEST_BYTES,
            max_buffered_request_bytes_per_address: None,
            client_addresses: None,
            shutdown_grace: Duration::from_secs(10),
            otlp_endpoint: None,
            metrics_listen: None,
            trace_health_checks: false,
            instance_id: None,
            transport: TransportArgs::default(),
        }
    }
}

/// What marks the placeholder secrets natter's deploy files ship
/// (`deploy/k8s/secret.yaml`, `deploy/dev-secrets/`).
pub const PLACEHOLDER_MARK: &str = "REPLACE-ME";

/// Checks that `secret` (the `what` of a flag, for the message) is not one
/// of the placeholders of natter's deploy files. In a Kubernetes pod
/// (`KUBERNETES_SERVICE_HOST` is set, as the kubelet sets it in every
/// container) a placeholder is refused: anyone who read the public manifests
/// would hold the secret. Elsewhere (compose on one machine, where the
/// internal ports are not published) it is logged at warn.
///
/// Errors: the secret is a placeholder, in a Kubernetes pod.
pub fn check_secret(what: &str, secret: &str) -> anyhow::Result<()> {
    check_secret_in(what, secret, std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
}

/// Binds the listener that `flag` sets (`--listen`, `--internal-listen`)
/// to `addr`.
///
/// Errors: the address cannot be bound. The error names the address and
/// the flag (the operating system's own, "Address already in use (os error
/// 98)", names neither, and the all-in-one, the edge and the split
/// services all default to 127.0.0.1:7070), and for an address in use says
/// what to do.
pub async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(": another process (another natter?) listens there; stop it, or give {flag} another address")
        } else {
            String::new()
        };
        anyhow::anyhow!("cannot listen on {addr} ({flag}): {e}{hint}")
    })
}

/// Checks the database flags against the server's: `--database-url` (when
/// set) as [`check_secret`] does (its password is a secret, and
/// deploy/k8s/secret.yaml ships a placeholder), and, on PostgreSQL, that a
/// call gives up waiting for a connection (`--database-acquire-timeout`)
/// and has a statement cancelled (`--database-statement-timeout`) before
/// its own deadline (`--request-timeout`): its client then hears
/// UNAVAILABLE, which says to retry, not DEADLINE_EXCEEDED.
///
/// Errors: the URL holds the placeholder, in a Kubernetes pod; either
/// timeout is not below the request timeout.
pub fn check_store(store: &natter_db::StoreArgs, server: &ServerArgs) -> anyhow::Result<()> {
    let Some(url) = store.database_url.as_deref() else { return Ok(()) };
    check_secret("the database URL (--database-url)", url)?;
    check_store_timeouts(&store.pool_settings(), server.transport.request_timeout)
}

fn check_store_timeouts(pool: &natter_db::PoolSettings, request_timeout: Duration) -> anyhow::Result<()> {
    for (flag, timeout) in
        [("--database-acquire-timeout", pool.acquire_timeout), ("--database-statement-timeout", pool.statement_timeout)]
    {
        anyhow::ensure!(
            timeout < request_timeout,
            "{flag} ({}) must be below --request-timeout ({}), so that a call the database holds up \
             fails UNAVAILABLE before its deadline",
            humantime::format_duration(timeout),
            humantime::format_duration(request_timeout),
        );
    }
    Ok(())
}

fn check_secret_in(what: &str, secret: &str, in_kubernetes: bool) -> anyhow::Result<()> {
    if !secret.to_ascii_uppercase().contains(PLACEHOLDER_MARK) {
        return Ok(());
    }
    anyhow::ensure!(
        !in_kubernetes,
        "{what} is the placeholder of natter's deploy files (it contains {PLACEHOLDER_MARK}): \
         create a secret of your own (deploy/k8s/secret.yaml says how)"
    );
    tracing::warn!("{what} is the placeholder of natter's deploy files: replace it before anyone else can reach this");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        server: ServerArgs,
    }

    /// A `--cors-allow-origins` value no browser origin could match stops
    /// the start-up with an error naming the flag and the value (it was
    /// dropped without a word, and its page's calls failed CORS).
    #[test]
    fn a_bad_cors_origin_stops_the_start_up_naming_flag_and_value() {
        use clap::Parser as _;
        let origins = |value: &str| {
            Cli::try_parse_from(["natter", "--cors-allow-origins", value]).map(|cli| cli.server.cors_allow_origins)
        };
        assert_eq!(origins("*").unwrap(), ["*"]);
        assert_eq!(
            origins("https://chat.example.com, http://localhost:5173").unwrap(),
            ["https://chat.example.com", "http://localhost:5173"]
        );
        for bad in [
            "https://chat.example.com/",
            "https://chat.example.com/app",
            "chat.example.com",
            "https://Chat.example.com",
            "https://user@chat.example.com",
            "https://chat example.com",
            "",
        ] {
            let error = origins(&format!("https://ok.example,{bad}")).expect_err(bad).to_string();
            assert!(error.contains("--cors-allow-origins"), "names the flag: {error}");
            assert!(error.contains(&format!("'{bad}'")), "names the value: {error}");
        }
        assert_eq!(Cli::try_parse_from(["natter"]).unwrap().server.cors_allow_origins, ["*"], "the default");
    }

    #[test]
    fn a_placeholder_secret_is_refused_in_kubernetes_only() {
        let placeholder = "REPLACE-ME-natter-service-credential-placeholder-not-secret";
        let refused = check_secret_in("the service credential", placeholder, true).unwrap_err().to_string();
        assert!(refused.contains("the service credential is the placeholder"), "{refused}");
        assert!(check_secret_in("the service credential", "replace-me-too-lower-case", true).is_err());
        check_secret_in("the service credential", placeholder, false).expect("compose: a warning only");
        check_secret_in("the service credential", "q3Vx9mZ2c1bKp0LrT8wYh4nJ6sFgA5dE", true).expect("a real secret");
    }

    /// The defaults pass; a statement or acquire timeout at or past the
    /// request timeout is refused at start-up, naming the flag.
    #[test]
    fn database_timeouts_must_be_below_the_request_timeout() {
        let defaults = natter_db::PoolSettings::default();
        check_store_timeouts(&defaults, TransportArgs::default().request_timeout).expect("the defaults");
        let refused = check_store_timeouts(&defaults, Duration::from_secs(10)).unwrap_err().to_string();
        assert!(
            refused.starts_with("--database-statement-timeout (10s) must be below --request-timeout (10s)"),
            "{refused}"
        );
        let slow = natter_db::PoolSettings { acquire_timeout: Duration::from_secs(30), ..defaults };
        let refused = check_store_timeouts(&slow, Duration::from_secs(30)).unwrap_err().to_string();
        assert!(refused.starts_with("--database-acquire-timeout"), "{refused}");
    }
}

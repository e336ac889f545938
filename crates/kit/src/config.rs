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

    /// Log format: text or json. Verbosity follows RUST_LOG (default info).
    #[arg(long, env = "NATTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Browser origins allowed by CORS for gRPC-web, comma separated; `*` allows any.
    #[arg(long, env = "NATTER_CORS_ALLOW_ORIGINS", value_delimiter = ',', default_value = "*")]
    pub cors_allow_origins: Vec<String>,

    /// Largest decoded request message, in bytes (larger ones are refused).
    #[arg(long, env = "NATTER_MAX_REQUEST_BYTES", default_value_t = 1024 * 1024)]
    pub max_request_bytes: usize,

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
}

impl Default for ServerArgs {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_format: LogFormat::Text,
            cors_allow_origins: vec!["*".to_owned()],
            max_request_bytes: 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            otlp_endpoint: None,
            metrics_listen: None,
        }
    }
}

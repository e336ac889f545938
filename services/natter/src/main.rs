//! `natter`: one binary that runs every component together (`serve`) or any
//! one of them (`sessions`, `chats`, `messages`, `edge`), as Loki and Mimir
//! do; plus `health`, a grpc.health.v1 probe for container health checks,
//! and `migrate`, the stores' migrations as a step of their own.

use std::time::Duration;

use clap::{Parser, Subcommand};

/// jemalloc instead of glibc's malloc: the request path allocates and frees
/// many small buffers on several threads, where glibc's arenas spent about 9%
/// of the server's CPU; with jemalloc a send costs ~7% less server CPU, an
/// idle stream ~5.6 KB instead of ~8 KB, and memory freed after a burst
/// (argon2 hashes take 19 MiB each) goes back to the system. mimalloc was
/// measured too: as fast, but ~12.5 KB per idle stream. See BENCHMARKS.md.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (its `malloc_conf`, which the `_RJEM_MALLOC_CONF`
/// environment variable still overrides): a background thread returns freed
/// pages to the system after a second (`dirty_decay_ms`; jemalloc's default
/// is 10 s, and without the thread it purges only while allocating, so an
/// idle server kept what tens of thousands of closed streams had freed).
#[unsafe(export_name = "_rjem_malloc_conf")]
#[allow(non_upper_case_globals)]
static malloc_conf: Option<&std::ffi::c_char> =
    // SAFETY: a C string literal lives for the whole program.
    Some(unsafe { &*c"background_thread:true,dirty_decay_ms:1000".as_ptr() });

/// natter, a chat backend built as gRPC services.
#[derive(Debug, Parser)]
#[command(name = "natter", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the sessions, chats, messages and assistant services on one port (gRPC and
    /// gRPC-web), on SQLite in --data-dir unless --database-url is given.
    Serve(Box<natter::ServeArgs>),
    /// Runs the sessions service alone (as natter-sessions does).
    Sessions(natter_sessions::Config),
    /// Runs the chats service alone (as natter-chats does).
    Chats(natter_chats::Config),
    /// Runs the messages service alone (as natter-messages does).
    Messages(Box<natter_messages::Config>),
    /// Runs the assistant service alone (as natter-assistant does).
    Assistant(natter_assistant::Config),
    /// Runs the edge (as natter-edge does).
    Edge(natter_edge::EdgeArgs),
    /// Checks a server's grpc.health.v1: exits 0 when it is SERVING, 1 otherwise.
    Health(HealthArgs),
    /// Migrates the stores of the services named by --service (creating them if
    /// missing), runs their one-off backfills and reports what it did for each;
    /// every service also does so as it starts, so this is for a step of its own
    /// (a Kubernetes init container, a job before a rollout). Exits non-zero
    /// naming the store that failed.
    Migrate(natter::MigrateArgs),
}

#[derive(Debug, clap::Args)]
struct HealthArgs {
    /// Address of the server to check (host:port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// Service to ask about; empty: the server as a whole.
    #[arg(long, default_value = "")]
    service: String,
    /// How long to wait for an answer.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => {
            let _telemetry = natter_kit::telemetry::init("natter", &args.server)?;
            let app = natter::App::build(&args, natter_kit::serve::shutdown_token()).await?;
            tracing::info!(addr = %app.local_addr()?, store = %args.store.location(), "natter listening");
            app.run().await
        }
        Command::Sessions(config) => {
            let _telemetry = natter_kit::telemetry::init("natter-sessions", &config.server)?;
            let listener = listen(config.server.listen, "natter sessions").await?;
            let internal = natter_kit::config::bind(config.internal.internal_listen, "--internal-listen").await?;
            natter_sessions::run(config, listener, internal, natter_kit::serve::shutdown_token()).await
        }
        Command::Chats(config) => {
            let _telemetry = natter_kit::telemetry::init("natter-chats", &config.server)?;
            let listener = listen(config.server.listen, "natter chats").await?;
            let internal = natter_kit::config::bind(config.internal.internal_listen, "--internal-listen").await?;
            natter_chats::run(config, listener, internal, natter_kit::serve::shutdown_token()).await
        }
        Command::Messages(config) => {
            let _telemetry = natter_kit::telemetry::init("natter-messages", &config.server)?;
            let listener = listen(config.server.listen, "natter messages").await?;
            let internal = natter_kit::config::bind(config.internal.internal_listen, "--internal-listen").await?;
            natter_messages::run(*config, listener, internal, natter_kit::serve::shutdown_token()).await
        }
        Command::Assistant(config) => {
            let _telemetry = natter_kit::telemetry::init("natter-assistant", &config.server)?;
            let listener = listen(config.server.listen, "natter assistant").await?;
            let internal = natter_kit::config::bind(config.internal.internal_listen, "--internal-listen").await?;
            natter_assistant::run(config, listener, internal, natter_kit::serve::shutdown_token()).await
        }
        Command::Edge(args) => {
            let _telemetry = natter_kit::telemetry::init("natter-edge", &args.server)?;
            let listener = listen(args.server.listen, "natter edge").await?;
            natter_edge::run(args, listener, natter_kit::serve::shutdown_token()).await
        }
        Command::Health(args) => std::process::exit(if health(&args).await { 0 } else { 1 }),
        Command::Migrate(args) => {
            let _telemetry = natter_kit::telemetry::Builder::new("natter-migrate")
                .log_format(args.log_format)
                .logs_to_stderr(true)
                .install()?;
            natter::migrate(&args, &mut std::io::stdout()).await
        }
    }
}

async fn listen(addr: std::net::SocketAddr, name: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = natter_kit::config::bind(addr, "--listen").await?;
    tracing::info!(addr = %listener.local_addr()?, "{name} listening");
    Ok(listener)
}

async fn health(args: &HealthArgs) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.addr))?.connect().await?;
        let request = HealthCheckRequest { service: args.service.clone() };
        let status = HealthClient::new(channel).check(request).await?.into_inner().status;
        anyhow::Ok(ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown))
    };
    match tokio::time::timeout(args.timeout, check).await {
        Ok(Ok(ServingStatus::Serving)) => true,
        Ok(Ok(status)) => {
            eprintln!("natter health: {}: {}", args.addr, status.as_str_name());
            false
        }
        Ok(Err(e)) => {
            // The whole chain: tonic's own text is only "transport error",
            // the cause (connection refused, no such host) is its source
            // (hyper's "tcp connect error" comes twice: said once).
            let mut causes: Vec<String> = e.chain().map(ToString::to_string).collect();
            causes.dedup();
            eprintln!("natter health: {}: {}", args.addr, causes.join(": "));
            false
        }
        Err(_) => {
            eprintln!("natter health: {}: no answer within {:?}", args.addr, args.timeout);
            false
        }
    }
}

//! `natter`: the all-in-one binary.

use clap::{Parser, Subcommand};

/// natter, a chat backend: every service in one process.
#[derive(Debug, Parser)]
#[command(name = "natter", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the sessions, chats and messages services on one port (gRPC and
    /// gRPC-web), on SQLite in --data-dir unless --database-url is given.
    Serve(natter::ServeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { command: Command::Serve(args) } = Cli::parse();
    natter_kit::telemetry::init(args.server.log_format);
    let app = natter::App::build(&args, natter_kit::serve::shutdown_token()).await?;
    tracing::info!(addr = %app.local_addr()?, data_dir = %args.store.data_dir.display(), "natter listening");
    app.run().await
}

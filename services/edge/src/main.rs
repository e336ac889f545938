//! `natter-edge`: the gRPC / gRPC-web gateway of split mode.

use clap::Parser;

/// natter's edge: forwards gRPC and gRPC-web calls to the natter services.
#[derive(Debug, Parser)]
#[command(name = "natter-edge", version)]
struct Config {
    #[command(flatten)]
    edge: natter_edge::EdgeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    natter_kit::telemetry::init(config.edge.server.log_format);
    let edge = natter_edge::Edge::build(&config.edge, natter_kit::serve::shutdown_token()).await?;
    tracing::info!(addr = %edge.local_addr()?, "natter-edge listening");
    edge.run().await
}

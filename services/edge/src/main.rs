//! `natter-edge`: the gRPC / gRPC-web gateway of split mode.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = natter_edge::EdgeArgs::parse();
    let _telemetry = natter_kit::telemetry::init("natter-edge", &args.server)?;
    let listener = natter_kit::config::bind(args.server.listen, "--listen").await?;
    tracing::info!(addr = %listener.local_addr()?, "natter-edge listening");
    natter_edge::run(args, listener, natter_kit::serve::shutdown_token()).await
}

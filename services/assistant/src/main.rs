//! `natter-assistant`: the assistant service alone (split mode).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = natter_assistant::Config::parse();
    let _telemetry = natter_kit::telemetry::init("natter-assistant", &config.server)?;
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "natter-assistant listening");
    let internal = tokio::net::TcpListener::bind(config.internal.internal_listen).await?;
    natter_assistant::run(config, listener, internal, natter_kit::serve::shutdown_token()).await
}

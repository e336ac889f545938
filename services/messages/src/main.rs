//! `natter-messages`: the messages service alone (split mode).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = natter_messages::Config::parse();
    let _telemetry = natter_kit::telemetry::init("natter-messages", &config.server)?;
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "natter-messages listening");
    let internal = tokio::net::TcpListener::bind(config.internal.internal_listen).await?;
    natter_messages::run(config, listener, internal, natter_kit::serve::shutdown_token()).await
}

//! `natter-chats`: the chats service alone (split mode).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = natter_chats::Config::parse();
    let _telemetry = natter_kit::telemetry::init("natter-chats", &config.server)?;
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "natter-chats listening");
    let internal = tokio::net::TcpListener::bind(config.internal.internal_listen).await?;
    natter_chats::run(config, listener, internal, natter_kit::serve::shutdown_token()).await
}

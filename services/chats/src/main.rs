//! `natter-chats`: the chats service alone (split mode).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = natter_chats::Config::parse();
    let _telemetry = natter_kit::telemetry::init("natter-chats", &config.server)?;
    let listener = natter_kit::config::bind(config.server.listen, "--listen").await?;
    tracing::info!(addr = %listener.local_addr()?, "natter-chats listening");
    let internal = natter_kit::config::bind(config.internal.internal_listen, "--internal-listen").await?;
    natter_chats::run(config, listener, internal, natter_kit::serve::shutdown_token()).await
}

//! `natter-assistant`: the assistant service alone (split mode).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = natter_assistant::Config::parse();
    let _telemetry = natter_kit::telemetry::init("natter-assistant", &config.server)?;
    let listener = natter_kit::config::bind(config.server.listen, "--listen").await?;
    tracing::info!(addr = %listener.local_addr()?, "natter-assistant listening");
    let internal = natter_kit::config::bind(config.internal.internal_listen, "--internal-listen").await?;
    natter_assistant::run(config, listener, internal, natter_kit::serve::shutdown_token()).await
}

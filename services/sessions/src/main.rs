//! `natter-sessions`: the sessions service alone (split mode).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = natter_sessions::Config::parse();
    let _telemetry = natter_kit::telemetry::init("natter-sessions", &config.server)?;
    let listener = natter_kit::config::bind(config.server.listen, "--listen").await?;
    tracing::info!(addr = %listener.local_addr()?, "natter-sessions listening");
    let internal = natter_kit::config::bind(config.internal.internal_listen, "--internal-listen").await?;
    natter_sessions::run(config, listener, internal, natter_kit::serve::shutdown_token()).await
}

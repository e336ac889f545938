//! `natter-sessions`: the sessions service alone (split mode).

use std::sync::Arc;

use clap::Parser;
use natter_kit::{Server, ServerArgs};

/// natter's sessions service: users, credentials and bearer-token sessions.
#[derive(Debug, Parser)]
#[command(name = "natter-sessions", version)]
struct Config {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    store: natter_db::StoreArgs,
    #[command(flatten)]
    sessions: natter_sessions::SessionsArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    natter_kit::telemetry::init(config.server.log_format);
    let bus = Arc::new(natter_bus::Hub::new());
    let sessions = natter_sessions::open(&config.store.config("sessions")?, bus, &config.sessions).await?;
    let mut server = Server::new(&config.server);
    natter_sessions::add_services(&mut server, &sessions).await;
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "natter-sessions listening");
    server.serve(listener, natter_kit::serve::shutdown_token()).await?;
    sessions.store().db().close().await;
    Ok(())
}

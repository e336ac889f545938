//! `natter-messages`: the messages service alone (split mode).

use std::sync::Arc;

use clap::Parser;
use natter_kit::{Server, ServerArgs};
use natter_links::Grpc;

/// natter's messages service: messages, read positions and the event stream.
#[derive(Debug, Parser)]
#[command(name = "natter-messages", version)]
struct Config {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    store: natter_db::StoreArgs,
    #[command(flatten)]
    messages: natter_messages::MessagesArgs,
    /// URL of the sessions service (token checks).
    #[arg(long, env = "NATTER_SESSIONS_URL")]
    sessions_url: String,
    /// URL of the chats service (membership, activity).
    #[arg(long, env = "NATTER_CHATS_URL")]
    chats_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    natter_kit::telemetry::init(config.server.log_format);
    let sessions = natter_links::channel(&config.sessions_url).map_err(anyhow::Error::msg)?;
    let chats = natter_links::channel(&config.chats_url).map_err(anyhow::Error::msg)?;
    let bus = Arc::new(natter_bus::Hub::new());
    let messages =
        natter_messages::open(&config.store.config("messages")?, Arc::new(Grpc(chats)), bus, &config.messages).await?;
    let auth = natter_auth::Authenticator::new(Arc::new(natter_auth::GrpcVerifier::new(sessions)));
    let shutdown = natter_kit::serve::shutdown_token();
    let mut server = Server::new(&config.server);
    natter_messages::add_services(&mut server, &messages, auth, shutdown.clone()).await;
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "natter-messages listening");
    server.serve(listener, shutdown).await?;
    messages.store().db().close().await;
    Ok(())
}

//! `natter-chats`: the chats service alone (split mode).

use std::sync::Arc;

use clap::Parser;
use natter_kit::{Server, ServerArgs};
use natter_links::Grpc;

/// natter's chats service: chats, membership and chat state.
#[derive(Debug, Parser)]
#[command(name = "natter-chats", version)]
struct Config {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    store: natter_db::StoreArgs,
    #[command(flatten)]
    chats: natter_chats::ChatsArgs,
    /// URL of the sessions service (token checks, user look-ups).
    #[arg(long, env = "NATTER_SESSIONS_URL")]
    sessions_url: String,
    /// URL of the messages service (previews, unread counts).
    #[arg(long, env = "NATTER_MESSAGES_URL")]
    messages_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    natter_kit::telemetry::init(config.server.log_format);
    let sessions = natter_links::channel(&config.sessions_url).map_err(anyhow::Error::msg)?;
    let messages = natter_links::channel(&config.messages_url).map_err(anyhow::Error::msg)?;
    let bus = Arc::new(natter_bus::Hub::new());
    let chats = natter_chats::open(
        &config.store.config("chats")?,
        Arc::new(Grpc(sessions.clone())),
        Arc::new(Grpc(messages)),
        bus,
        &config.chats,
    )
    .await?;
    let auth = natter_auth::Authenticator::new(Arc::new(natter_auth::GrpcVerifier::new(sessions)));
    let mut server = Server::new(&config.server);
    natter_chats::add_services(&mut server, &chats, auth).await;
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "natter-chats listening");
    server.serve(listener, natter_kit::serve::shutdown_token()).await?;
    chats.store().db().close().await;
    Ok(())
}

//! natter's sessions service: users (password and guest), argon2id
//! credentials, and opaque bearer-token sessions stored only as hashes.
//!
//! Layers: [`domain`] (rules, no IO), [`store`] (SQL), [`service`] (the
//! domain operations), [`grpc`] (the thin tonic translation).

pub mod domain;
pub mod error;
pub mod grpc;
pub mod service;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use natter_bus::EventBus;
use natter_db::{Db, DbConfig, DbError};
use natter_kit::Server;
use natter_proto::sessions::v1::session_internal_service_server::SessionInternalServiceServer;
use natter_proto::sessions::v1::session_service_server::SessionServiceServer;

pub use error::SessionsError;
pub use grpc::{SessionApi, SessionInternalApi};
pub use service::Sessions;

/// The sessions schema, embedded at compile time.
pub static MIGRATOR: natter_db::sqlx::migrate::Migrator = natter_db::sqlx::migrate!("./migrations");

/// Options of the sessions service.
#[derive(Clone, Debug, clap::Args)]
pub struct SessionsArgs {
    /// How long a session (bearer token) stays valid after log-in.
    #[arg(long, env = "NATTER_SESSION_TTL", value_parser = humantime::parse_duration, default_value = "30d")]
    pub session_ttl: Duration,
}

impl Default for SessionsArgs {
    fn default() -> Self {
        Self { session_ttl: Duration::from_secs(30 * 86_400) }
    }
}

/// Opens the sessions store (running migrations) and builds the service;
/// `only_instance` (no other sessions replica: no NATS) lets it cache live
/// tokens (see [`Sessions::with_token_cache`]).
///
/// Errors: the database cannot be opened or migrated.
pub async fn open(
    db: &DbConfig,
    bus: Arc<dyn EventBus>,
    args: &SessionsArgs,
    only_instance: bool,
) -> Result<Arc<Sessions>, DbError> {
    let db = Db::connect(db, &MIGRATOR).await?;
    let sessions = Sessions::new(store::Store::new(db), bus, args.session_ttl);
    Ok(Arc::new(if only_instance { sessions.with_token_cache() } else { sessions }))
}

/// Adds the public sessions service to `server`.
pub async fn add_services(server: &mut Server, sessions: &Arc<Sessions>) {
    let limit = server.args().max_request_bytes;
    server
        .add_service(SessionServiceServer::new(SessionApi::new(sessions.clone())).max_decoding_message_size(limit))
        .await;
}

/// Adds the internal sessions service to `server`, an internal listener
/// ([`Server::internal`]); never to a public one.
pub async fn add_internal_services(server: &mut Server, sessions: &Arc<Sessions>) {
    let limit = server.args().max_request_bytes;
    server
        .add_service(
            SessionInternalServiceServer::new(SessionInternalApi::new(sessions.clone()))
                .max_decoding_message_size(limit),
        )
        .await;
}

/// Command line of `natter-sessions` (split mode).
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "natter-sessions",
    version,
    about = "natter's sessions service: users, credentials and bearer-token sessions"
)]
pub struct Config {
    #[command(flatten)]
    pub server: natter_kit::ServerArgs,
    #[command(flatten)]
    pub store: natter_db::StoreArgs,
    #[command(flatten)]
    pub bus: natter_bus::BusArgs,
    #[command(flatten)]
    pub sessions: SessionsArgs,
    #[command(flatten)]
    pub internal: natter_kit::InternalArgs,
}

/// Runs the sessions service alone until `shutdown`: the public API on
/// `listener`, the internal one on `internal_listener`.
///
/// Errors: no service credential, the store cannot be opened, or serving
/// fails.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    internal_listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let credential = config.internal.credential()?;
    let bus = config.bus.connect(shutdown.clone()).await?;
    let only_instance = config.bus.nats_url.is_none();
    let sessions = open(&config.store.config("sessions")?, bus, &config.sessions, only_instance).await?;
    let mut public = Server::new(&config.server);
    add_services(&mut public, &sessions).await;
    let mut internal = Server::internal(&config.server, credential);
    add_internal_services(&mut internal, &sessions).await;
    natter_kit::serve::serve_split((public, listener), (internal, internal_listener), shutdown).await?;
    sessions.store().db().close().await;
    Ok(())
}

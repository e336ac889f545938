//! natter's sessions service: users (password and guest), argon2id
//! credentials, and opaque bearer-token sessions stored only as hashes.
//!
//! Layers: [`domain`] (rules, no IO), [`store`] (SQL), [`service`] (the
//! domain operations), [`grpc`] (the thin tonic translation).

pub mod domain;
pub mod error;
pub mod grpc;
pub mod guard;
pub mod service;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use natter_bus::EventBus;
use natter_db::{Db, DbConfig, DbError};
use natter_kit::Server;
use natter_kit::limits::Rate;
use natter_proto::sessions::v1::session_internal_service_server::SessionInternalServiceServer;
use natter_proto::sessions::v1::session_service_server::SessionServiceServer;

pub use error::SessionsError;
pub use grpc::{SessionApi, SessionInternalApi};
pub use service::Sessions;

/// The sessions schema, embedded at compile time.
pub static MIGRATOR: natter_db::sqlx::migrate::Migrator = natter_db::sqlx::migrate!("./migrations");

/// Options of the sessions service.
///
/// The rate limits are counted in memory by each process: in split mode
/// every sessions replica admits its own share (a shared count would cost a
/// PostgreSQL or Redis round trip per call), so N replicas admit up to N
/// times a limit.
#[derive(Clone, Debug, clap::Args)]
pub struct SessionsArgs {
    /// How long a session (bearer token) stays valid after log-in.
    #[arg(long, env = "NATTER_SESSION_TTL", value_parser = humantime::parse_duration, default_value = "30d")]
    pub session_ttl: Duration,

    /// How long an expired (or revoked, then expired) session is kept
    /// before it is deleted; checked at start-up and every
    /// --session-purge-interval. A guest (who cannot log in again) is
    /// deleted with its last session, and taken out of its chats: its
    /// assistant chats and the groups it alone was in are deleted, a group
    /// it owned passes to its longest-standing admin (else member), and a
    /// direct chat with a person stays theirs
    #[arg(long, env = "NATTER_SESSION_RETENTION", value_parser = humantime::parse_duration, default_value = "30d")]
    pub session_retention: Duration,

    /// How often sessions and guests past --session-retention are deleted
    #[arg(long, env = "NATTER_SESSION_PURGE_INTERVAL", value_parser = humantime::parse_duration, default_value = "1h")]
    pub session_purge_interval: Duration,

    /// Take the client address of per-address limits from the last
    /// `x-forwarded-for` entry instead of the TCP peer. Set it only behind
    /// natter's edge (which writes that entry); on a port clients reach
    /// directly anyone could pick their own address.
    #[arg(long, env = "NATTER_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: bool,

    /// The proxies in front of this server (an ingress, a load balancer
    /// that keeps HTTP), in CIDR notation, comma-separated: a call from one
    /// of them counts by the client its `x-forwarded-for` names (the
    /// rightmost entry no trusted proxy wrote), not as the proxy's own
    /// address, which would put every client under one limit. Empty: the
    /// TCP peer is the client. (Behind natter's edge use
    /// --trust-forwarded-for; the edge has this flag itself.)
    #[arg(long, env = "NATTER_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: natter_kit::TrustedProxies,

    /// CreateSession calls (guest and password log-ins) per client address:
    /// N/PERIOD admits N at once and N per PERIOD; `off` admits all.
    #[arg(long, env = "NATTER_CREATE_SESSION_RATE", default_value = "120/1m")]
    pub create_session_rate: Rate,

    /// Guests created (CreateSession without credentials) per client
    /// address, on top of --create-session-rate: each guest is a user with
    /// every per-user quota of its own, so guests come slower than log-ins.
    /// N/PERIOD, or `off`.
    #[arg(long, env = "NATTER_CREATE_GUEST_RATE", default_value = "60/1h")]
    pub create_guest_rate: Rate,

    /// Password hashes and checks (Argon2: a core and 19 MiB each for tens
    /// of milliseconds) under way or waiting at most, across all callers:
    /// beyond, CreateUser, ClaimAccount and log-ins are refused at once
    /// (RESOURCE_EXHAUSTED, retry in a second) instead of queueing behind
    /// a flood from many addresses until every real log-in times out.
    #[arg(long, env = "NATTER_PASSWORD_CHECK_QUEUE", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub password_check_queue: u32,

    /// CreateUser and ClaimAccount calls per client address: N/PERIOD, or
    /// `off`.
    #[arg(long, env = "NATTER_CREATE_USER_RATE", default_value = "30/10m")]
    pub create_user_rate: Rate,

    /// After a failed log-in, how long the same address waits before trying
    /// that username again; doubles with each further failure up to
    /// --login-backoff-max, a success clears it; 0s: no wait.
    #[arg(long, env = "NATTER_LOGIN_BACKOFF", value_parser = humantime::parse_duration, default_value = "1s")]
    pub login_backoff: Duration,

    /// Longest log-in back-off.
    #[arg(long, env = "NATTER_LOGIN_BACKOFF_MAX", value_parser = humantime::parse_duration, default_value = "15m")]
    pub login_backoff_max: Duration,

    /// Failed log-ins for one username from one address that cost no wait
    /// (typos): the back-off starts after them.
    #[arg(long, env = "NATTER_LOGIN_FREE_FAILURES", default_value_t = 3)]
    pub login_free_failures: u32,

    /// Log-in attempts per username, across all addresses, by addresses that
    /// failed for it before (a first attempt from a clean address, like the
    /// owner's, never counts): N/PERIOD, or `off`.
    #[arg(long, env = "NATTER_LOGIN_RETRY_RATE", default_value = "100/1h")]
    pub login_retry_rate: Rate,

    /// GetUser calls by username per account (finding someone to talk
    /// to): a cap on how fast one account can learn which usernames exist.
    /// Look-ups by id are not counted (ids cannot be guessed). N/PERIOD, or
    /// `off`.
    #[arg(long, env = "NATTER_USERNAME_LOOKUP_RATE", default_value = "60/1m")]
    pub username_lookup_rate: Rate,

    /// GetUser calls by username of all guests at one client address
    /// together (a guest costs nothing to make, so a budget per guest would
    /// cap nothing; larger than --username-lookup-rate for the many guests
    /// behind one NAT). N/PERIOD, or `off`.
    #[arg(long, env = "NATTER_GUEST_USERNAME_LOOKUP_RATE", default_value = "600/1m")]
    pub guest_username_lookup_rate: Rate,

    /// UpdateUser and ChangePassword calls per user (each password change
    /// hashes twice, an Argon2 core each): N/PERIOD, or `off`.
    #[arg(long, env = "NATTER_PROFILE_CHANGE_RATE", default_value = "30/1h")]
    pub profile_change_rate: Rate,
}

impl Default for SessionsArgs {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(30 * 86_400),
            session_retention: Duration::from_secs(30 * 86_400),
            session_purge_interval: Duration::from_secs(3600),
            trust_forwarded_for: false,
            trusted_proxies: natter_kit::TrustedProxies::default(),
            create_session_rate: Rate::parse("120/1m").expect("valid rate"),
            create_guest_rate: Rate::parse("60/1h").expect("valid rate"),
            password_check_queue: 32,
            create_user_rate: Rate::parse("30/10m").expect("valid rate"),
            login_backoff: Duration::from_secs(1),
            login_free_failures: 3,
            login_backoff_max: Duration::from_secs(15 * 60),
            login_retry_rate: Rate::parse("100/1h").expect("valid rate"),
            username_lookup_rate: Rate::parse("60/1m").expect("valid rate"),
            guest_username_lookup_rate: Rate::parse("600/1m").expect("valid rate"),
            profile_change_rate: Rate::parse("30/1h").expect("valid rate"),
        }
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
    let sessions = Sessions::new(store::Store::new(db), bus, args);
    let sessions = Arc::new(if only_instance { sessions.with_token_cache() } else { sessions });
    tokio::spawn(purge(Arc::downgrade(&sessions), args.session_retention, args.session_purge_interval));
    Ok(sessions)
}

/// Migrates the sessions store `db` names (created if missing), as
/// [`open`] does, without opening it: what `natter migrate` does. The
/// sessions store has no backfills.
///
/// Errors: the URL is unsupported, the database is unreachable or a
/// migration fails.
pub async fn migrate(db: &DbConfig) -> Result<natter_db::Migrated, DbError> {
    Ok(natter_db::Migrated { applied: natter_db::migrate(db, &MIGRATOR).await?, backfills: Vec::new() })
}

/// Deletes sessions expired more than `retention` ago, then the guests
/// left without any, at start-up and every `every`, until the service is
/// dropped. A failure is logged and tried again at the next round.
async fn purge(sessions: std::sync::Weak<Sessions>, retention: Duration, every: Duration) {
    let mut every = tokio::time::interval(every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(sessions) = sessions.upgrade() else { return };
        match sessions.purge_expired(retention).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "expired sessions deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot delete expired sessions; will try again"),
        }
        match sessions.purge_guests(retention).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "guests without sessions deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot delete guests without sessions; will try again"),
        }
    }
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
    natter_kit::config::check_store(&config.store, &config.server)?;
    let only_instance = config.bus.nats_url.is_none();
    // Without NATS this process must be the only one on its store, and on
    // NATS it must not meet one without: refused here, before anything
    // serves (natter_db::StoreArgs::claim; on SQLite, its store's file
    // serves this process alone, NATS or not).
    let instance = config.store.claim(&["sessions"], only_instance, &shutdown).await?;
    let bus = config.bus.connect(shutdown.clone()).await?;
    let sessions = open(&config.store.config("sessions")?, bus.clone(), &config.sessions, only_instance).await?;
    let mut public = Server::new(&config.server);
    add_services(&mut public, &sessions).await;
    let mut internal = Server::internal(&config.server, credential);
    add_internal_services(&mut internal, &sessions).await;
    natter_kit::serve::serve_split((public, listener), (internal, internal_listener), shutdown).await?;
    sessions.store().db().close().await;
    bus.close().await;
    if let Some(instance) = instance {
        // Lost to another process while serving: exits non-zero saying so.
        instance.release().await?;
    }
    Ok(())
}

//! natter's messages service: messages with gap-free per-chat sequence
//! numbers, idempotent sends, read positions and StreamEvents with exact
//! resume.
//!
//! Layers: [`domain`] and [`search`] (rules and validated commands, no
//! IO; the search query language and its two engines' forms), [`store`] (the
//! store contract and its SQLite and PostgreSQL implementations),
//! [`service`] (the domain operations), [`stream`] (the live stream),
//! [`grpc`] (the thin tonic translation, the only place protobuf is built
//! from domain types). It reaches the chats service only through
//! `natter-links`.

pub mod checkpoints;
pub mod classifier;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod presence;
pub mod registry;
pub mod search;
pub mod service;
pub mod store;
pub mod stream;
pub mod writer;

use std::sync::Arc;

use natter_auth::Authenticator;
use natter_bus::EventBus;
use natter_db::DbConfig;
use natter_kit::Server;
use natter_kit::limits::Rate;
use natter_links::ChatDirectory;
use natter_proto::messages::v1::message_internal_service_server::MessageInternalServiceServer;
use natter_proto::messages::v1::message_service_server::MessageServiceServer;
use tokio_util::sync::CancellationToken;

pub use error::MessagesError;
pub use grpc::{MessageApi, MessageInternalApi};
pub use service::Messages;

/// The messages schema both engines share, embedded at compile time
/// (`migrations/*.sql`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The schema of the SQLite store: [`MIGRATOR`]'s migrations and SQLite's
/// own (`migrations/sqlite/`, from 0009 on: full-text search).
pub static SQLITE_MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> =
    std::sync::LazyLock::new(|| with_engine_migrations(&sqlx::migrate!("./migrations/sqlite")));

/// The schema of the PostgreSQL store: [`MIGRATOR`]'s migrations and
/// PostgreSQL's own (`migrations/postgres/`).
pub static POSTGRES_MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> =
    std::sync::LazyLock::new(|| with_engine_migrations(&sqlx::migrate!("./migrations/postgres")));

/// [`MIGRATOR`]'s migrations followed by `engine`'s, in version order (one
/// sequence of versions: an engine's migration takes a number no shared one
/// has).
fn with_engine_migrations(engine: &sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    sqlx::migrate::Migrator::with_migrations(MIGRATOR.iter().chain(engine.iter()).cloned().collect())
}

/// Options of the messages service (the limits DESIGN.md lists).
///
/// The rate limits are counted in memory by each process: in split mode
/// every messages replica admits its own share (a shared count would cost a
/// PostgreSQL or Redis round trip per call), so N replicas admit up to N
/// times a limit.
#[derive(Clone, Debug, clap::Args)]
pub struct MessagesArgs {
    /// Longest message text, in bytes of UTF-8. Times one more than
    /// --max-message-edits, at most 3.5 MiB: a message with all its
    /// revisions fits one response.
    #[arg(long, env = "NATTER_MAX_TEXT_BYTES", default_value_t = 32 * 1024)]
    pub max_text_bytes: usize,
    /// Most attachments per message.
    #[arg(long, env = "NATTER_MAX_ATTACHMENTS", default_value_t = 10)]
    pub max_attachments: usize,

    // StreamEvents limits (see `registry`); per process, so in split mode
    // per messages replica.
    /// Most StreamEvents streams one user may hold open on this process (in
    /// split mode: on each messages replica); more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "NATTER_MAX_STREAMS_PER_USER", default_value_t = 32)]
    pub max_streams_per_user: usize,
    /// Most entries in each of a StreamEvents request's chat_ids, resume and
    /// resume_changes; more are refused with INVALID_ARGUMENT.
    #[arg(long, env = "NATTER_MAX_STREAM_CHATS", default_value_t = 1000)]
    pub max_stream_chats: usize,
    /// Longest time between two checks of an open stream's session, so that
    /// a revocation whose bus event was lost still ends its streams (each
    /// session is checked at a random point of the period's second half);
    /// 0s: never.
    #[arg(long, env = "NATTER_STREAM_SESSION_RECHECK_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stream_session_recheck_interval: std::time::Duration,
    /// Most edits of one message; EditMessage is RESOURCE_EXHAUSTED (with a
    /// QuotaFailure) after. Plus one, times --max-text-bytes, at most
    /// 3.5 MiB.
    #[arg(long, env = "NATTER_MAX_MESSAGE_EDITS", default_value_t = 100)]
    pub max_message_edits: usize,
    /// SendMessage calls per user (retries too): N/PERIOD admits N at once
    /// and N per PERIOD; `off` admits all.
    #[arg(long, env = "NATTER_SEND_MESSAGE_RATE", default_value = "1200/1m")]
    pub send_message_rate: Rate,
    /// EditMessage, PinMessage and UnpinMessage calls per user, together:
    /// N/PERIOD, or `off`.
    #[arg(long, env = "NATTER_EDIT_MESSAGE_RATE", default_value = "600/1m")]
    pub edit_message_rate: Rate,
    /// Bytes a user may store, sends and edits together (each counts its
    /// text's bytes and its attachments' URL and MIME type; an edit keeps
    /// the old text as a revision, so it counts its new text whole; a
    /// retry counts again): N/PERIOD admits N bytes at once and N per
    /// PERIOD; `off` admits all. A message larger than N waits for a full
    /// budget. Past it, RESOURCE_EXHAUSTED with RetryInfo, nothing stored.
    #[arg(long, env = "NATTER_STORED_BYTES_RATE", default_value = "50000000/1d")]
    pub stored_bytes_rate: Rate,
    /// AddReaction and RemoveReaction calls per user, together: N/PERIOD,
    /// or `off`.
    #[arg(long, env = "NATTER_REACTION_RATE", default_value = "600/1m")]
    pub reaction_rate: Rate,
    /// SearchMessages calls per user: N/PERIOD, or `off` (a search reads
    /// the text index of every chat of the caller's).
    #[arg(long, env = "NATTER_SEARCH_RATE", default_value = "120/1m")]
    pub search_rate: Rate,
    /// MarkRead calls per user: N/PERIOD, or `off` (a client marks a chat
    /// read as its user scrolls; a no-op is answered without writing).
    #[arg(long, env = "NATTER_MARK_READ_RATE", default_value = "600/1m")]
    pub mark_read_rate: Rate,
    /// DeleteMessage, ReportMessage and ResolveReport calls per user,
    /// together: N/PERIOD, or `off`.
    #[arg(long, env = "NATTER_MODERATION_RATE", default_value = "120/1m")]
    pub moderation_rate: Rate,
    /// StreamEvents streams opened per user: N/PERIOD, or `off`.
    #[arg(long, env = "NATTER_STREAM_OPEN_RATE", default_value = "120/1m")]
    pub stream_open_rate: Rate,
    /// SetTyping calls per user: N/PERIOD, or `off` (a client renews about
    /// every 3 s per chat it types in).
    #[arg(long, env = "NATTER_TYPING_RATE", default_value = "60/1m")]
    pub typing_rate: Rate,
    /// How long a typing indicator lasts unless renewed.
    #[arg(long, env = "NATTER_TYPING_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub typing_timeout: std::time::Duration,
    /// Scan every message's text for prompt injection when it is sent or
    /// edited (natter-detect, microseconds a message), storing the verdict
    /// with it (`all`), or not at all (`off`).
    #[arg(long, env = "NATTER_SCAN_MESSAGES", value_enum, default_value = "all")]
    pub scan_messages: Scan,
    /// User ids of server staff, comma separated: they see every chat's
    /// flagged and reported messages (ListFlaggedMessages) and resolve
    /// reports anywhere, and see every chat's flags and list any user's chats
    /// on ListChats (split mode: give natter-chats the same list). Staff is
    /// granted here only, never by an RPC.
    #[arg(long, env = "NATTER_STAFF_USER_IDS", value_delimiter = ',')]
    pub staff_user_ids: Vec<uuid::Uuid>,
    /// Base URL of an external prompt-injection classifier (Hugging Face
    /// text-embeddings-inference serving a sequence classifier: `POST
    /// /predict`). Each message sent or edited is also sent there after
    /// its commit; a worse verdict raises its flags as a change (never
    /// lowers them). The all-in-one's assistant also asks it about each
    /// person's message before that goes to the model. Unset:
    /// natter-detect alone.
    #[arg(long, env = "NATTER_CLASSIFIER_URL", value_parser = http_url)]
    pub classifier_url: Option<String>,
    /// Longest wait for the classifier's answer.
    #[arg(long, env = "NATTER_CLASSIFIER_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub classifier_timeout: std::time::Duration,
    /// How often this replica tells the others (over the bus) which users
    /// hold StreamEvents streams on it; a replica silent for 3 intervals is
    /// taken as dead and its users go offline (sooner, within about 14 s,
    /// when the bus finds its process dead: 4 s, and the
    /// --presence-lost-grace). Give every replica the same.
    #[arg(long, env = "NATTER_PRESENCE_HEARTBEAT", default_value = "10s", value_parser = positive_duration)]
    pub presence_heartbeat: std::time::Duration,
    /// How long the users of a replica whose process the bus finds dead
    /// (NATS: its liveness announcements stopped for 3 s) stay online
    /// unless it is heard again: a replica only cut off from NATS (a
    /// network blip, a NATS restart, a long pause) that is back within it
    /// never shows its users offline. Longer hides more blips and delays
    /// a real death's offline by as much; at most 3 --presence-heartbeat
    /// intervals count; 0s: offline as soon as the bus finds the death.
    #[arg(long, env = "NATTER_PRESENCE_LOST_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub presence_lost_grace: std::time::Duration,
    /// GetPresence calls per user: N/PERIOD, or `off`.
    #[arg(long, env = "NATTER_PRESENCE_RATE", default_value = "120/1m")]
    pub presence_rate: Rate,
}

/// The most bytes a message with all its revisions may take
/// (`--max-text-bytes` times `--max-message-edits` + 1, checked at start by
/// [`MessagesArgs::check`]): ListMessages with `include_history` sends a
/// message and every earlier revision in one response, which must stay
/// under the 4 MiB gRPC clients accept by default (grpc-go's and tonic's
/// default largest message received), with room left for its attachments
/// and fields. The defaults (32 KiB, 100 edits) take 3.16 MiB.
pub const MESSAGE_WITH_REVISIONS_BYTES: usize = 3584 * 1024;

impl MessagesArgs {
    /// Checks what each flag's parser cannot check alone.
    ///
    /// Errors: `--max-text-bytes` and `--max-message-edits` that let one
    /// message with its revisions pass [`MESSAGE_WITH_REVISIONS_BYTES`]
    /// (no client could read it with its history), naming both flags and
    /// the fix.
    pub fn check(&self) -> anyhow::Result<()> {
        let (text, edits) = (self.max_text_bytes, self.max_message_edits);
        let whole = text.saturating_mul(edits.saturating_add(1));
        if whole > MESSAGE_WITH_REVISIONS_BYTES {
            anyhow::bail!(
                "--max-text-bytes {text} with --max-message-edits {edits}: a message with all its revisions could \
                 take {whole} bytes, more than the {MESSAGE_WITH_REVISIONS_BYTES} one response may carry (gRPC \
                 clients accept 4 MiB); lower either flag"
            );
        }
        Ok(())
    }
}

/// A duration above zero (humantime), for a flag.
fn positive_duration(value: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(value) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be above zero".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// An http(s) URL, for a flag.
fn http_url(value: &str) -> Result<String, String> {
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(value.to_owned())
    } else {
        Err("must be an http:// or https:// URL".into())
    }
}

/// Which messages the injection detector scans.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Scan {
    /// Every message sent or edited.
    #[default]
    All,
    /// None.
    Off,
}

impl Default for MessagesArgs {
    fn default() -> Self {
        let limits = domain::Limits::default();
        let streams = registry::StreamLimits::default();
        Self {
            max_text_bytes: limits.text_bytes,
            max_attachments: limits.attachments,
            max_streams_per_user: streams.streams_per_user,
            max_stream_chats: streams.chats_per_request,
            stream_session_recheck_interval: streams.session_recheck,
            max_message_edits: limits.edits,
            send_message_rate: Rate::parse("1200/1m").expect("valid rate"),
            edit_message_rate: Rate::parse("600/1m").expect("valid rate"),
            stored_bytes_rate: Rate::parse("50000000/1d").expect("valid rate"),
            reaction_rate: Rate::parse("600/1m").expect("valid rate"),
            search_rate: Rate::parse("120/1m").expect("valid rate"),
            mark_read_rate: Rate::parse("600/1m").expect("valid rate"),
            moderation_rate: Rate::parse("120/1m").expect("valid rate"),
            stream_open_rate: streams.open_rate,
            typing_rate: Rate::parse("60/1m").expect("valid rate"),
            typing_timeout: std::time::Duration::from_secs(5),
            scan_messages: Scan::All,
            staff_user_ids: Vec::new(),
            classifier_url: None,
            classifier_timeout: std::time::Duration::from_secs(2),
            presence_heartbeat: std::time::Duration::from_secs(10),
            presence_lost_grace: crate::presence::LOST_GRACE,
            presence_rate: Rate::parse("120/1m").expect("valid rate"),
        }
    }
}

impl MessagesArgs {
    /// The limits these options set.
    pub fn limits(&self) -> domain::Limits {
        domain::Limits {
            text_bytes: self.max_text_bytes,
            attachments: self.max_attachments,
            edits: self.max_message_edits,
            ..domain::Limits::default()
        }
    }

    /// The StreamEvents limits these options set.
    pub fn stream_limits(&self) -> registry::StreamLimits {
        registry::StreamLimits {
            streams_per_user: self.max_streams_per_user,
            chats_per_request: self.max_stream_chats,
            session_recheck: self.stream_session_recheck_interval,
            open_rate: self.stream_open_rate,
        }
    }
}

/// Opens the messages store (running migrations) and builds the service.
///
/// Errors: the database cannot be opened or migrated.
pub async fn open(
    db: &DbConfig,
    chats: Arc<dyn ChatDirectory>,
    bus: Arc<dyn EventBus>,
    args: &MessagesArgs,
) -> anyhow::Result<Arc<Messages>> {
    args.check()?;
    let store = store::open(db).await?;
    let messages = Arc::new(Messages::new(store, chats, bus, args));
    announce_recent_activity(&messages).await;
    Ok(messages)
}

/// Migrates the messages store `db` names (created if missing) and runs
/// its backfills, as [`open`] does, then closes it: what `natter migrate`
/// does (see [`store::migrate`]).
///
/// Errors: the database cannot be reached or migrated, or a backfill
/// fails.
pub async fn migrate(db: &DbConfig) -> Result<natter_db::Migrated, store::StoreError> {
    store::migrate(db).await
}

/// [`Messages::announce_recent_activity`] at start-up; when the chats
/// service cannot take it yet (split services starting together), tried again
/// once a second in the background, ten times at most, then logged.
async fn announce_recent_activity(messages: &Arc<Messages>) {
    match messages.announce_recent_activity().await {
        Ok(0) => {}
        Ok(chats) => tracing::info!(chats, "re-announced recent chat activity"),
        Err(first) => {
            tracing::warn!(error = %first, "re-announcing recent chat activity failed; trying again");
            let messages = messages.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    match messages.announce_recent_activity().await {
                        Ok(_) => return,
                        Err(e) => tracing::warn!(error = %e, "re-announcing recent chat activity failed"),
                    }
                }
            });
        }
    }
}

/// Adds the public messages service to `server`; open streams end when
/// `shutdown` is cancelled.
pub async fn add_services(
    server: &mut Server,
    messages: &Arc<Messages>,
    auth: Authenticator,
    shutdown: CancellationToken,
) {
    let limit = server.args().max_request_bytes;
    server
        .add_service(
            MessageServiceServer::new(MessageApi::new(messages.clone(), auth, shutdown))
                .max_decoding_message_size(limit),
        )
        .await;
}

/// Adds the internal messages service to `server`, an internal listener
/// ([`Server::internal`]); never to a public one. Its FollowChats streams
/// end when `shutdown` is cancelled.
pub async fn add_internal_services(server: &mut Server, messages: &Arc<Messages>, shutdown: CancellationToken) {
    let limit = server.args().max_request_bytes;
    server
        .add_service(
            MessageInternalServiceServer::new(MessageInternalApi::new(messages.clone(), shutdown.clone()))
                .max_decoding_message_size(limit),
        )
        .await;
}

/// Command line of `natter-messages` (split mode).
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "natter-messages",
    version,
    about = "natter's messages service: messages, read positions and the event stream"
)]
pub struct Config {
    #[command(flatten)]
    pub server: natter_kit::ServerArgs,
    #[command(flatten)]
    pub store: natter_db::StoreArgs,
    #[command(flatten)]
    pub bus: natter_bus::BusArgs,
    #[command(flatten)]
    pub messages: MessagesArgs,
    #[command(flatten)]
    pub internal: natter_kit::InternalArgs,
    /// URL of the sessions service's internal listener (token checks), e.g.
    /// http://sessions:7071.
    #[arg(long, env = "NATTER_SESSIONS_URL")]
    pub sessions_url: String,
    /// URL of the chats service's internal listener (membership, activity),
    /// e.g. http://chats:7071.
    #[arg(long, env = "NATTER_CHATS_URL")]
    pub chats_url: String,
}

/// Runs the messages service alone until `shutdown`: the public API on
/// `listener`, the internal one on `internal_listener`.
///
/// Errors: no service credential, a malformed URL, the store cannot be
/// opened, or serving fails.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    internal_listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let credential = config.internal.credential()?;
    natter_kit::config::check_store(&config.store, &config.server)?;
    let deadline = config.internal.internal_call_timeout;
    let sessions = natter_kit::Link::connect("sessions", &config.sessions_url, &credential, deadline)?;
    let chats = natter_kit::Link::connect("chats", &config.chats_url, &credential, deadline)?;
    // Without NATS this process must be the only one on its store, and on
    // NATS it must not meet one without: refused here, before anything
    // serves (natter_db::StoreArgs::claim; on SQLite, its store's file
    // serves this process alone, NATS or not).
    let instance = config.store.claim(&["messages"], config.bus.nats_url.is_none(), &shutdown).await?;
    let bus = config.bus.connect(shutdown.clone()).await?;
    let (verifier, chats) = (natter_auth::GrpcVerifier::new(sessions), natter_links::Grpc(chats));
    // Replicas on NATS keep token and membership answers, dropped by the bus.
    let (auth, chats): (Authenticator, Arc<dyn ChatDirectory>) = match config.bus.replica_cache_ttl() {
        Some(ttl) => (
            Authenticator::new(Arc::new(natter_auth::CachingVerifier::new(verifier, ttl, bus.invalidator().clone()))),
            Arc::new(natter_links::CachingChatDirectory::new(chats, ttl, bus.invalidator().clone())),
        ),
        None => (Authenticator::new(Arc::new(verifier)), Arc::new(chats)),
    };
    let messages = open(&config.store.config("messages")?, chats, bus.clone(), &config.messages).await?;
    let mut public = Server::new(&config.server);
    add_services(&mut public, &messages, auth, shutdown.clone()).await;
    let mut internal = Server::internal(&config.server, credential);
    add_internal_services(&mut internal, &messages, shutdown.clone()).await;
    natter_kit::serve::serve_split((public, listener), (internal, internal_listener), shutdown).await?;
    messages.close().await;
    bus.close().await;
    if let Some(instance) = instance {
        // Lost to another process while serving: exits non-zero saying so.
        instance.release().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message and its revisions must fit one response: the defaults
    /// do, and so do more edits of shorter texts; more edits of the
    /// longest text do not.
    #[test]
    fn text_and_edit_limits_are_checked_together() {
        let with = |text: usize, edits: usize| {
            MessagesArgs { max_text_bytes: text, max_message_edits: edits, ..MessagesArgs::default() }.check()
        };
        assert!(with(32 * 1024, 100).is_ok(), "the defaults");
        assert!(with(16 * 1024, 200).is_ok());
        let refused = with(32 * 1024, 200).unwrap_err().to_string();
        assert!(refused.starts_with("--max-text-bytes 32768 with --max-message-edits 200: "), "{refused}");
        assert!(with(usize::MAX, usize::MAX).is_err(), "no overflow");
    }

    /// [`open`] is awaited inside spawned server futures: it must be `Send`
    /// for every lifetime (checked at compile time).
    #[allow(dead_code)]
    fn open_can_be_spawned(db: DbConfig, chats: Arc<dyn ChatDirectory>, bus: Arc<dyn EventBus>, args: MessagesArgs) {
        fn spawnable<T: Send + 'static>(_: T) {}
        spawnable(async move { open(&db, chats, bus, &args).await.map(drop) });
    }
}

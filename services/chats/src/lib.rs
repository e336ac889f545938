//! natter's chats service: direct chats (unique per pair), group chats,
//! membership and chat state, ordered by last activity.
//!
//! Layers: [`domain`] (rules and records, no IO), [`store`] (one trait, one
//! implementation per engine), [`service`] (the domain operations), [`grpc`]
//! (validation into domain types and the thin tonic translation). It reaches the
//! sessions service (user look-ups) and the messages service (previews,
//! unread counts) only through `natter-links`.

pub mod domain;
pub mod error;
pub mod grpc;
pub mod service;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use natter_auth::Authenticator;
use natter_db::DbConfig;
use natter_kit::Server;
use natter_kit::limits::Rate;
use natter_links::{MessageDirectory, UserDirectory};
use natter_proto::chats::v1::chat_internal_service_server::ChatInternalServiceServer;
use natter_proto::chats::v1::chat_service_server::ChatServiceServer;

pub use error::ChatsError;
pub use grpc::{ChatApi, ChatInternalApi};
pub use service::Chats;
pub use store::{ChatStore, MIGRATOR, StoreError};

/// Options of the chats service (the limits DESIGN.md lists).
///
/// The rate limit is counted in memory by each process: in split mode every
/// chats replica admits its own share (a shared count would cost a
/// PostgreSQL or Redis round trip per call).
#[derive(Clone, Debug, clap::Args)]
pub struct ChatsArgs {
    /// Longest chat title, in characters.
    #[arg(long, env = "NATTER_MAX_TITLE_CHARS", default_value_t = 200)]
    pub max_title_chars: usize,
    /// Longest chat description, in characters.
    #[arg(long, env = "NATTER_MAX_DESCRIPTION_CHARS", default_value_t = 2000)]
    pub max_description_chars: usize,
    /// Most members of a group chat, the owner included.
    #[arg(long, env = "NATTER_MAX_GROUP_MEMBERS", default_value_t = 1000)]
    pub max_group_members: usize,
    /// Most group chats one user (not a bot) may be a member of at once,
    /// archived ones too (direct chats are not counted: they cannot be
    /// left). CreateChat and AddMembers that would put a user in one more
    /// fail RESOURCE_EXHAUSTED naming them; leaving a group makes room.
    #[arg(long, env = "NATTER_MAX_GROUPS_PER_USER", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    pub max_groups_per_user: usize,
    /// Most users one user may block at once (BlockUser past it fails
    /// RESOURCE_EXHAUSTED; UnblockUser makes room).
    #[arg(long, env = "NATTER_MAX_BLOCKS_PER_USER", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    pub max_blocks_per_user: usize,
    /// On SQLite, how long chat activity (the ListChats order) may stay in
    /// memory before it is written; listings write it first. At most 8s, so
    /// that the 10s the messages service re-announces after a crash cover it.
    #[arg(long, env = "NATTER_ACTIVITY_FLUSH_INTERVAL", value_parser = flush_interval, default_value = "50ms")]
    pub activity_flush_interval: Duration,
    /// CreateChat calls per user (retries too): N/PERIOD admits N at once and
    /// N per PERIOD; `off` admits all.
    #[arg(long, env = "NATTER_CREATE_CHAT_RATE", default_value = "240/1h")]
    pub create_chat_rate: Rate,
    /// Changes of chats per user: UpdateChat, ArchiveChat, UnarchiveChat,
    /// DeleteChat, AddMembers (joins too), RemoveMember (leaves too),
    /// UpdateMember, UpdatePrivacySettings, BlockUser and UnblockUser,
    /// repeats included. Each but the last three is a change every member's
    /// streams receive: N/PERIOD, or `off`.
    #[arg(long, env = "NATTER_CHAT_CHANGE_RATE", default_value = "600/10m")]
    pub chat_change_rate: Rate,
    /// Who may add a user who has not set their privacy setting group_adds
    /// to a group: `everyone` (as WhatsApp and Telegram do), `peers` (users
    /// who share a chat with them) or `nobody`. Stricter is safer against
    /// unwanted groups, at the cost of more "ask them first".
    #[arg(long, env = "NATTER_DEFAULT_GROUP_ADDS", value_parser = group_adds, default_value = "everyone")]
    pub default_group_adds: domain::GroupAdds,
    /// Who may start a direct chat with a user who has not set their
    /// privacy setting direct_chats: `everyone` (as most apps do), `peers`
    /// (users who share a chat with them) or `nobody`. A direct chat that
    /// exists goes on whatever it says; a bot (the assistant) takes chats
    /// from anyone.
    #[arg(long, env = "NATTER_DEFAULT_DIRECT_CHATS", value_parser = direct_chats, default_value = "everyone")]
    pub default_direct_chats: domain::DirectChats,
    /// Who sees how far a user who has not set their privacy setting
    /// read_receipts has read a chat: `everyone` (the chat's members, as
    /// most apps do) or `nobody` (Matrix's private read receipts). Unread
    /// counts are the same either way.
    #[arg(long, env = "NATTER_DEFAULT_READ_RECEIPTS", value_parser = read_receipts, default_value = "everyone")]
    pub default_read_receipts: domain::ReadReceipts,
}

/// `everyone`, `peers` or `nobody`.
fn group_adds(s: &str) -> Result<domain::GroupAdds, String> {
    domain::GroupAdds::parse(s).ok_or_else(|| format!("{s:?} is none of: everyone, peers, nobody"))
}

/// `everyone`, `peers` or `nobody`.
fn direct_chats(s: &str) -> Result<domain::DirectChats, String> {
    domain::DirectChats::parse(s).ok_or_else(|| format!("{s:?} is none of: everyone, peers, nobody"))
}

/// `everyone` or `nobody`.
fn read_receipts(s: &str) -> Result<domain::ReadReceipts, String> {
    domain::ReadReceipts::parse(s).ok_or_else(|| format!("{s:?} is none of: everyone, nobody"))
}

/// A humantime duration (`50ms`, `1s`) that
/// [`natter_links::activity::check_flush_interval`] accepts: above zero and
/// within what the messages service re-announces after a crash.
fn flush_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    natter_links::activity::check_flush_interval(d)?;
    Ok(d)
}

impl Default for ChatsArgs {
    fn default() -> Self {
        let limits = domain::Limits::default();
        Self {
            max_title_chars: limits.title_chars,
            max_description_chars: limits.description_chars,
            max_group_members: limits.group_members,
            max_groups_per_user: limits.groups_per_user,
            max_blocks_per_user: limits.blocks_per_user,
            activity_flush_interval: natter_links::activity::DEFAULT_FLUSH_INTERVAL,
            create_chat_rate: Rate::parse("240/1h").expect("valid rate"),
            chat_change_rate: Rate::parse("600/10m").expect("valid rate"),
            default_group_adds: domain::GroupAdds::Everyone,
            default_direct_chats: domain::DirectChats::Everyone,
            default_read_receipts: domain::ReadReceipts::Everyone,
        }
    }
}

impl ChatsArgs {
    /// The limits these options set.
    pub fn limits(&self) -> domain::Limits {
        domain::Limits {
            title_chars: self.max_title_chars,
            description_chars: self.max_description_chars,
            group_members: self.max_group_members,
            groups_per_user: self.max_groups_per_user,
            blocks_per_user: self.max_blocks_per_user,
        }
    }
}

/// Opens the chats store (running migrations) and builds the service, with
/// `staff` as server staff (`--staff-user-ids`, which the all-in-one takes
/// once for the chats and messages services alike), invalidating other
/// replicas' cached memberships over `bus`.
///
/// Errors: the database cannot be opened or migrated, or the activity
/// flush interval is out of range ([`store::open`]).
pub async fn open(
    db: &DbConfig,
    users: Arc<dyn UserDirectory>,
    messages: Arc<dyn MessageDirectory>,
    bus: Arc<dyn natter_bus::EventBus>,
    args: &ChatsArgs,
    staff: &[uuid::Uuid],
    only_instance: bool,
) -> Result<Arc<Chats>, StoreError> {
    let store = store::open(db, args.activity_flush_interval).await?;
    let rates = service::Rates { create: args.create_chat_rate, change: args.chat_change_rate };
    let chats = Chats::new(store, users, messages, bus, args.limits(), rates)
        .with_staff(staff.iter().map(|u| natter_kit::id::UserId::from(*u)))
        .with_default_group_adds(args.default_group_adds)
        .with_default_direct_chats(args.default_direct_chats)
        .with_default_read_receipts(args.default_read_receipts);
    let chats = Arc::new(if only_instance { chats.with_membership_cache() } else { chats });
    chats.start_relay(service::RELAY_INTERVAL);
    Ok(chats)
}

/// Migrates the chats store `db` names (created if missing), as [`open`]
/// does, without opening it: what `natter migrate` does. The chats store
/// has no backfills.
///
/// Errors: the URL is unsupported, the database is unreachable or a
/// migration fails.
pub async fn migrate(db: &DbConfig) -> Result<natter_db::Migrated, StoreError> {
    Ok(natter_db::Migrated { applied: natter_db::migrate(db, &MIGRATOR).await?, backfills: Vec::new() })
}

/// Adds the public chats service to `server`.
pub async fn add_services(server: &mut Server, chats: &Arc<Chats>, auth: Authenticator) {
    let limit = server.args().max_request_bytes;
    server
        .add_service(ChatServiceServer::new(ChatApi::new(chats.clone(), auth)).max_decoding_message_size(limit))
        .await;
}

/// Adds the internal chats service to `server`, an internal listener
/// ([`Server::internal`]); never to a public one.
pub async fn add_internal_services(server: &mut Server, chats: &Arc<Chats>) {
    let limit = server.args().max_request_bytes;
    server
        .add_service(
            ChatInternalServiceServer::new(ChatInternalApi::new(chats.clone())).max_decoding_message_size(limit),
        )
        .await;
}

/// Command line of `natter-chats` (split mode).
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "natter-chats", version, about = "natter's chats service: chats, membership and chat state")]
pub struct Config {
    #[command(flatten)]
    pub server: natter_kit::ServerArgs,
    #[command(flatten)]
    pub store: natter_db::StoreArgs,
    // The chats service announces no events (the messages service announces
    // the changes it records for it); on NATS it publishes the invalidation
    // of every change it commits, for the replicas' membership caches, and
    // keeps token introspections in a cache of its own.
    #[command(flatten)]
    pub bus: natter_bus::BusArgs,
    #[command(flatten)]
    pub chats: ChatsArgs,
    #[command(flatten)]
    pub internal: natter_kit::InternalArgs,
    /// URL of the sessions service's internal listener (token checks, user
    /// look-ups), e.g. http://sessions:7071.
    #[arg(long, env = "NATTER_SESSIONS_URL")]
    pub sessions_url: String,
    /// URL of the messages service's internal listener (previews, unread
    /// counts), e.g. http://messages:7071.
    #[arg(long, env = "NATTER_MESSAGES_URL")]
    pub messages_url: String,
    /// User ids of server staff, comma separated (the same list as the
    /// messages service's): they see every chat's flags (Chat.flagged,
    /// max_severity) and list any user's chats (ListChats user_id). Staff is
    /// granted here only, never by an RPC.
    #[arg(long, env = "NATTER_STAFF_USER_IDS", value_delimiter = ',')]
    pub staff_user_ids: Vec<uuid::Uuid>,
}

/// Runs the chats service alone until `shutdown`: the public API on
/// `listener`, the internal one on `internal_listener`.
///
/// Errors: no service credential, a malformed URL, the store cannot be
/// opened, or serving fails.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    internal_listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let credential = config.internal.credential()?;
    natter_kit::config::check_store(&config.store, &config.server)?;
    let deadline = config.internal.internal_call_timeout;
    let sessions = natter_kit::Link::connect("sessions", &config.sessions_url, &credential, deadline)?;
    let messages = natter_kit::Link::connect("messages", &config.messages_url, &credential, deadline)?;
    let users = Arc::new(natter_links::Grpc(sessions.clone()));
    let only_instance = config.bus.nats_url.is_none();
    // Without NATS this process must be the only one on its store, and on
    // NATS it must not meet one without: refused here, before anything
    // serves (natter_db::StoreArgs::claim; on SQLite, its store's file
    // serves this process alone, NATS or not).
    let instance = config.store.claim(&["chats"], only_instance, &shutdown).await?;
    let bus = config.bus.connect(shutdown.clone()).await?;
    let chats = open(
        &config.store.config("chats")?,
        users,
        Arc::new(natter_links::Grpc(messages)),
        bus.clone(),
        &config.chats,
        &config.staff_user_ids,
        only_instance,
    )
    .await?;
    let verifier = natter_auth::GrpcVerifier::new(sessions);
    let auth = match config.bus.replica_cache_ttl() {
        Some(ttl) => {
            Authenticator::new(Arc::new(natter_auth::CachingVerifier::new(verifier, ttl, bus.invalidator().clone())))
        }
        None => Authenticator::new(Arc::new(verifier)),
    };
    let mut public = Server::new(&config.server);
    add_services(&mut public, &chats, auth).await;
    let mut internal = Server::internal(&config.server, credential);
    add_internal_services(&mut internal, &chats).await;
    natter_kit::serve::serve_split((public, listener), (internal, internal_listener), shutdown).await?;
    chats.close().await;
    bus.close().await;
    if let Some(instance) = instance {
        // Lost to another process while serving: exits non-zero saying so.
        instance.release().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        chats: super::ChatsArgs,
    }

    #[test]
    fn the_activity_flush_interval_is_a_positive_duration() {
        let parse = |v: &str| Cli::try_parse_from(["natter", "--activity-flush-interval", v]).map(|c| c.chats);
        assert_eq!(parse("20ms").unwrap().activity_flush_interval, std::time::Duration::from_millis(20));
        let zero = parse("0s").err().unwrap().to_string();
        assert!(zero.contains("--activity-flush-interval") && zero.contains("must be more than 0"), "{zero}");
        assert!(parse("soon").is_err());
        assert_eq!(parse("8s").unwrap().activity_flush_interval, natter_links::activity::MAX_FLUSH_INTERVAL);
        let long = parse("1h").err().unwrap().to_string();
        assert!(long.contains("at most 8s") && long.contains("re-announces"), "{long}");
    }

    /// `open`'s future is `Send` for every lifetime of its borrows, as
    /// `tokio::spawn` of a service that calls it needs (sqlx's SQLite
    /// migrations on a `&mut` connection are not).
    #[test]
    fn opening_is_send() {
        fn is_send<T: Send>(_: &T) {}
        fn probe(db: &natter_db::DbConfig, args: &super::ChatsArgs, deps: super::service::Deps) {
            let (users, messages) = deps;
            is_send(&super::open(db, users, messages, std::sync::Arc::new(natter_bus::Hub::new()), args, &[], true));
        }
        let _ = probe;
    }
}

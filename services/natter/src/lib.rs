//! The all-in-one natter: the sessions, chats, messages and assistant services in one
//! process on one port (gRPC and gRPC-web), linked by direct in-process calls
//! and an in-process event bus, on SQLite files in a data directory (or on
//! PostgreSQL with `--database-url`).
//!
//! Same code as the split binaries; only the wiring differs: every link is a
//! `natter_links::InProcess` instead of a gRPC client.

use std::net::SocketAddr;
use std::sync::Arc;

use natter_auth::{Authenticator, CachingVerifier, InProcessVerifier};
use natter_bus::EventBus;
use natter_kit::web_page::PageSource;
use natter_kit::{Server, ServerArgs};
use natter_links::{CachingChatDirectory, ChatDirectory, Deferred, InProcess, MessageDirectory};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Everything `natter serve` accepts.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub store: natter_db::StoreArgs,
    #[command(flatten)]
    pub bus: natter_bus::BusArgs,
    #[command(flatten)]
    pub sessions: natter_sessions::SessionsArgs,
    #[command(flatten)]
    pub chats: natter_chats::ChatsArgs,
    #[command(flatten)]
    pub messages: natter_messages::MessagesArgs,
    #[command(flatten)]
    pub assistant: natter_assistant::AssistantArgs,
    /// Serve the browser page at `/` from this directory instead of the one
    /// built into the binary (for page work: `npm --prefix web run build`
    /// writes `web/dist`)
    #[arg(long, env = "NATTER_WEB_DIR")]
    pub web_dir: Option<std::path::PathBuf>,
    /// Serve no browser page: the API only
    #[arg(long, env = "NATTER_NO_WEB_PAGE", conflicts_with = "web_dir")]
    pub no_web_page: bool,
    /// Checks of tokens not proven in the last 15 minutes (new ones, and
    /// ones that failed) per client address, as found for
    /// --create-session-rate, counted as the calls come in: beyond it, such
    /// calls are refused (RESOURCE_EXHAUSTED), so random tokens cannot keep
    /// the sessions store busy, while proven tokens from the same address go
    /// on. Log-in, registration and health are not counted. N/PERIOD, or
    /// `off`
    #[arg(long, env = "NATTER_FAILED_AUTH_RATE", default_value = "100/1m")]
    pub failed_auth_rate: natter_kit::limits::Rate,
}

/// A built all-in-one server, bound to its listener, not yet serving.
pub struct App {
    listener: TcpListener,
    server: Server,
    shutdown: CancellationToken,
    /// The sessions database, closed at shutdown.
    sessions_db: natter_db::Db,
    /// The messages service, whose store is closed at shutdown.
    messages: Arc<natter_messages::Messages>,
    /// Its store writes the chat activity still in memory at shutdown.
    chats: Arc<natter_chats::Chats>,
    /// The assistant (None: off), whose replies being written end before
    /// the stores close.
    assistant: Option<Arc<natter_assistant::Assistant>>,
    /// The event bus the services share.
    bus: Arc<dyn EventBus>,
    /// This process's claim on its stores, released last.
    instance: Option<natter_db::InstanceClaim>,
}

impl App {
    /// Opens the three stores (running migrations), wires the services and
    /// binds the listener. `shutdown` ends the server and its open streams.
    ///
    /// Errors: a store cannot be opened or the address cannot be bound.
    pub async fn build(args: &ServeArgs, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let listener = natter_kit::config::bind(args.server.listen, "--listen").await?;
        Self::build_on(args, listener, shutdown).await
    }

    /// As [`App::build`], on a listener bound by the caller.
    pub async fn build_on(
        args: &ServeArgs,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        // In process by default; over NATS when several all-in-ones share
        // one PostgreSQL.
        natter_kit::config::check_store(&args.store, &args.server)?;
        // One instance of each service, unless NATS links several all-in-ones:
        // then nothing may be cached that another instance could change.
        let only_instance = args.bus.nats_url.is_none();
        // And so no other process on the same stores: refused here, before
        // anything serves; on PostgreSQL with NATS, only beside one without
        // (natter_db::postgres::InstanceLock); on SQLite, always
        // (natter_db::sqlite::StoreLock).
        let instance = args.store.claim(&["sessions", "chats", "messages"], only_instance, &shutdown).await?;
        let bus: Arc<dyn EventBus> = args.bus.connect(shutdown.clone()).await?;

        let sessions =
            natter_sessions::open(&args.store.config("sessions")?, bus.clone(), &args.sessions, only_instance).await?;
        let session_internal = Arc::new(natter_sessions::SessionInternalApi::new(sessions.clone()));
        // Several all-in-ones on NATS keep token and membership answers,
        // dropped by the bus when they change (one alone keeps exact caches
        // in the sessions and chats services instead).
        let verifier = InProcessVerifier(session_internal.clone());
        let auth = match args.bus.replica_cache_ttl() {
            Some(ttl) => Authenticator::new(Arc::new(CachingVerifier::new(verifier, ttl, bus.invalidator().clone()))),
            None => Authenticator::new(Arc::new(verifier)),
        };

        // chats and messages call each other: chats gets a deferred link to
        // messages, set once messages exists.
        let to_messages: Arc<Deferred<dyn MessageDirectory>> = Arc::new(Deferred::default());
        let chats = natter_chats::open(
            &args.store.config("chats")?,
            Arc::new(InProcess(session_internal.clone())),
            to_messages.clone(),
            bus.clone(),
            &args.chats,
            &args.messages.staff_user_ids,
            only_instance,
        )
        .await?;
        let chat_internal = Arc::new(natter_chats::ChatInternalApi::new(chats.clone()));
        let to_chats: Arc<dyn ChatDirectory> = match args.bus.replica_cache_ttl() {
            Some(ttl) => {
                Arc::new(CachingChatDirectory::new(InProcess(chat_internal.clone()), ttl, bus.invalidator().clone()))
            }
            None => Arc::new(InProcess(chat_internal.clone())),
        };
        let messages =
            natter_messages::open(&args.store.config("messages")?, to_chats, bus.clone(), &args.messages).await?;
        let message_internal = Arc::new(natter_messages::MessageInternalApi::new(messages.clone(), shutdown.clone()));
        to_messages.set(Arc::new(InProcess(message_internal.clone())));
        // Alone, the all-in-one keys its assistant's reply ids by a key of
        // its own; instances linked by NATS must share one (the flag's).
        let own_key = if args.assistant.enabled() && only_instance && args.assistant.assistant_reply_key_file.is_none()
        {
            Some(own_reply_key(&args.store.data_dir.join("assistant-reply-key"))?)
        } else {
            None
        };
        let assistant = natter_assistant::open(
            &args.assistant,
            natter_assistant::Links {
                users: Arc::new(InProcess(session_internal.clone())),
                messages: Arc::new(InProcess(message_internal)),
                chats: Arc::new(InProcess(chat_internal.clone())),
            },
            own_key.as_deref().map(str::as_bytes),
            shutdown.clone(),
            // The same grace as the calls in flight.
            args.server.shutdown_grace,
            // The messages service's classifier judges prompts too.
            natter_assistant::classifier(args.messages.classifier_url.as_deref(), args.messages.classifier_timeout)?,
        )
        .await?;

        // Clients reach this server: its per-address shares find the client
        // as its other per-address limits do.
        let client_addresses = natter_kit::limits::ClientAddresses {
            trust_forwarded_for: args.sessions.trust_forwarded_for,
            trusted: args.sessions.trusted_proxies.clone(),
        };
        let mut server =
            Server::new(&natter_kit::ServerArgs { client_addresses: Some(client_addresses), ..args.server.clone() });
        server.limit_failed_auth(
            args.failed_auth_rate,
            args.sessions.trust_forwarded_for,
            args.sessions.trusted_proxies.clone(),
        );
        natter_sessions::add_services(&mut server, &sessions).await;
        natter_chats::add_services(&mut server, &chats, auth.clone()).await;
        natter_messages::add_services(&mut server, &messages, auth.clone(), shutdown.clone()).await;
        natter_assistant::add_services(&mut server, assistant.clone(), auth).await;

        let sessions_db = sessions.store().db().clone();
        server.set_web_page(PageSource::from_flags(args.web_dir.as_deref(), args.no_web_page)?);
        Ok(Self { listener, server, shutdown, sessions_db, messages, chats, assistant, bus, instance })
    }

    /// The event bus the services share (to read its size in tests).
    pub fn bus(&self) -> &Arc<dyn EventBus> {
        &self.bus
    }

    /// The address the server listens on (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the shutdown token is cancelled, then drains, lets the
    /// assistant's replies being written finish within `--shutdown-grace`
    /// (those still going end INTERRUPTED with their text, stored), writes
    /// the chat activity still in memory and closes the stores.
    ///
    /// Errors: serving fails, or (on PostgreSQL without NATS) another
    /// process took the stores' instance lock while this one's database
    /// session was gone, which is what shut it down
    /// ([`natter_db::DbError::InstanceLost`]).
    pub async fn run(self) -> anyhow::Result<()> {
        self.server.serve(self.listener, self.shutdown).await?;
        if let Some(assistant) = &self.assistant {
            assistant.stopped().await;
        }
        self.chats.close().await;
        self.sessions_db.close().await;
        self.messages.close().await;
        // Last: the presence goodbye the messages service just said.
        self.bus.close().await;
        if let Some(instance) = self.instance {
            // Lost to another process while serving (the shutdown came
            // from there): exits non-zero saying so.
            instance.release().await?;
        }
        Ok(())
    }
}

/// Everything `natter migrate` accepts.
#[derive(Clone, Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub store: natter_db::StoreArgs,
    /// The services whose stores to migrate, comma separated, in that order
    #[arg(
        long,
        env = "NATTER_MIGRATE_SERVICE",
        value_enum,
        value_delimiter = ',',
        default_value = "sessions,chats,messages"
    )]
    pub service: Vec<StoreService>,
    /// Log format: text or json. Verbosity follows RUST_LOG (default info, PostgreSQL notices from warn)
    #[arg(long, env = "NATTER_LOG_FORMAT", value_enum, default_value_t = natter_kit::config::LogFormat::Text)]
    pub log_format: natter_kit::config::LogFormat,
}

/// A service with a store of its own (the assistant and the edge have
/// none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreService {
    /// Users, credentials and sessions.
    Sessions,
    /// Chats and their members.
    Chats,
    /// Messages and their change log.
    Messages,
}

impl StoreService {
    /// Its name: its SQLite file's (`NAME.db`) and its PostgreSQL schema's
    /// after the prefix.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sessions => "sessions",
            Self::Chats => "chats",
            Self::Messages => "messages",
        }
    }
}

/// Migrates the store of each service of `args.service` in turn (each
/// once), as the service does when it starts: creates it if missing,
/// applies the migrations this binary has that it lacks and runs the
/// backfills that are due. Writes each store's [`report`] to `out` once it
/// is done.
///
/// On SQLite it first takes the stores' locks as `natter serve` does
/// ([`natter_db::sqlite::StoreLock`]) and holds them until it is done: a
/// data directory serves one process at a time, and a migrate beside the
/// server on it would hold the file's one write lock for as long as its
/// migrations run (the server's writes failing busy meanwhile) and change
/// the schema under the statements of the server's release. So it refuses
/// to run beside one: stop the server (which migrates its stores itself
/// as it starts anyway). On PostgreSQL it claims nothing: a rolling
/// upgrade migrates while the previous release still serves (replicas on
/// NATS, or the process without NATS that a job before its rollout
/// migrates for), which is safe there, as migrations only add, take turns
/// on PostgreSQL's advisory lock and wait `--database-lock-timeout` at
/// most for a table's lock, and the backfills rewrite stored text and
/// reactions, which no server's cache holds (tokens, memberships, chat
/// activity).
///
/// Errors: the database URL is the deploy files' placeholder (in a
/// Kubernetes pod), another process serves a SQLite store to migrate
/// (naming the data directory and, if known, its process id), or a store
/// cannot be migrated: the error names it and where it is, and the stores
/// before it stay migrated.
pub async fn migrate(args: &MigrateArgs, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if let Some(url) = &args.store.database_url {
        natter_kit::config::check_secret("the database URL (--database-url)", url)?;
    }
    // Each once, in the order given.
    let mut services = args.service.clone();
    let mut done = Vec::new();
    services.retain(|service| {
        let first = !done.contains(service);
        done.push(*service);
        first
    });
    // Held until every store is migrated (dropped on return).
    let _locks = match &args.store.database_url {
        None => {
            let names: Vec<&str> = services.iter().map(|service| service.name()).collect();
            Some(natter_db::sqlite::StoreLock::claim(&args.store.data_dir, &names).context(
                "natter migrate needs the stores it migrates to itself: stop the natter process serving them \
                 first (a server migrates its stores itself as it starts)",
            )?)
        }
        Some(_) => None,
    };
    for &service in &services {
        let config = args
            .store
            .config(service.name())
            .with_context(|| format!("creating the data directory {}", args.store.data_dir.display()))?;
        let migrated = match service {
            StoreService::Sessions => natter_sessions::migrate(&config).await.map_err(anyhow::Error::from),
            StoreService::Chats => natter_chats::migrate(&config).await.map_err(anyhow::Error::from),
            StoreService::Messages => natter_messages::migrate(&config).await.map_err(anyhow::Error::from),
        }
        .with_context(|| format!("migrating the {} store ({}) failed", service.name(), config.location()))?;
        out.write_all(report(service.name(), &config.location(), &migrated).as_bytes())?;
        out.flush()?;
    }
    Ok(())
}

/// The lines `natter migrate` prints for one store: its name and location
/// (no password), then each migration applied (`applied 0013 store
/// backfills`) or `up to date`, then each backfill run (`backfill nfc_text:
/// 3 rewritten`).
pub fn report(service: &str, location: &str, migrated: &natter_db::Migrated) -> String {
    let mut out = format!("{service}: {location}\n");
    if migrated.applied.is_empty() {
        out.push_str("  up to date\n");
    }
    for m in &migrated.applied {
        out.push_str(&format!("  applied {:04} {}\n", m.version, m.description));
    }
    for b in &migrated.backfills {
        out.push_str(&format!("  backfill {}: {} rewritten\n", b.name, b.rewritten));
    }
    out
}

/// The all-in-one's own key for its assistant's reply ids
/// ([`natter_assistant::ReplyIds`]): read from `path`, or made the first
/// time (256 random bits, hex) and kept there, readable by its owner only,
/// so that the ids stay the same across restarts. The key is written to a
/// file of its own first, then linked to `path` in one step: a crash midway
/// leaves no empty key, and of two starts at once both use the first's.
///
/// Errors: the file cannot be read or written.
fn own_reply_key(path: &std::path::Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(key) if key.trim().len() >= 32 => return Ok(key.trim().to_owned()),
        Ok(_) => anyhow::bail!("{} holds no key of at least 32 bytes: remove it to have one made", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    }
    let key = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let draft = path.with_extension(format!("new-{}", uuid::Uuid::new_v4().simple()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&draft).and_then(|mut file| {
        std::io::Write::write_all(&mut file, key.as_bytes())?;
        file.sync_all()
    });
    // Linked only if no key is there yet: never replaces one.
    let linked = written.and_then(|()| std::fs::hard_link(&draft, path));
    let _ = std::fs::remove_file(&draft);
    match linked {
        Ok(()) => Ok(key),
        // Made meanwhile (by another start): that one.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => own_reply_key(path),
        Err(e) => anyhow::bail!("creating {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_reply_key_is_made_once_for_its_owner_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("assistant-reply-key");
        let made = own_reply_key(&path).unwrap();
        assert_eq!(made.len(), 64);
        assert_eq!(own_reply_key(&path).unwrap(), made, "the same after a restart");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::write(&path, "short").unwrap();
        assert!(own_reply_key(&path).unwrap_err().to_string().contains("at least 32 bytes"));
    }
}

//! Database plumbing shared by natter's services.
//!
//! Each service owns its tables: on SQLite a file per service, on PostgreSQL
//! a schema per service (`search_path`), each with its own sqlx migrations.
//! Ids are stored as TEXT (UUID strings), times as BIGINT microseconds since
//! the epoch, flags as nullable times.
//!
//! - [`sqlite`] and [`postgres`]: the building blocks of a store native to
//!   its engine (the messages and chats stores: a rusqlite reader pool and
//!   one writer thread on SQLite, a sqlx `Postgres` pool on PostgreSQL).
//! - [`Db`]: one SQL text over sqlx's `Any` driver with `$1`-style
//!   placeholders, for a store with no engine-specific statement (sessions).
//! - [`DbConfig`] / [`StoreArgs`]: which engine and where, from the flags.
//! - [`testing`]: the PostgreSQL URL and fresh schemas of the conformance
//!   suites.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, AssertSqlSafe, ConnectOptions, Executor};

pub use sqlx;
pub use sqlx::Any;

pub mod postgres;
pub mod sqlite;
pub mod testing;

/// Failure to open or migrate a database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL is neither `sqlite:` nor `postgres:`/`postgresql:`.
    #[error("unsupported database url {0:?} (use sqlite:PATH or postgres://...)")]
    UnsupportedUrl(String),
    /// The schema name is not `[a-z_][a-z0-9_]*`.
    #[error("invalid schema name {0:?}")]
    InvalidSchema(String),
    /// The PostgreSQL database the URL names does not exist and could not
    /// be created.
    #[error(
        "database {name:?} does not exist and could not be created ({reason}); create it (createdb {name}) or name one that exists in the URL"
    )]
    MissingDatabase { name: String, reason: String },
    /// Another natter process serves the store of `schema` in this
    /// database in a way this one cannot run beside
    /// ([`postgres::InstanceLock`]): this one has no NATS (`alone`), or
    /// the other has none.
    #[error(
        "another natter process serves schema {schema} of this database{}; processes on one database must all \
         share one NATS (--nats-url), or there must be only one of them: stop the other first (a Kubernetes \
         Deployment without NATS needs strategy: Recreate, so that a rollout stops the old pod before it starts \
         the new one)",
        if *alone { " and this one has no --nats-url" } else { " without --nats-url" }
    )]
    InUse {
        /// The schema whose lock was refused.
        schema: String,
        /// This process has no NATS (it wanted the lock for itself).
        alone: bool,
    },
    /// The instance lock this process held on the store of `schema`
    /// ([`postgres::InstanceLock`]) was lost while it ran (its database
    /// session ended) and another process took it before this one could
    /// take it again: that one serves the store now, and this one stopped.
    #[error(
        "lost the instance lock of schema {schema}: its database session ended and another natter process took \
         it meanwhile; that one serves these stores now, so this one stopped (two processes without NATS on one \
         store serve stale answers)"
    )]
    InstanceLost {
        /// The schema whose lock the other process took.
        schema: String,
    },
    /// Another process holds a SQLite store of the data directory `dir`
    /// ([`sqlite::StoreLock`]).
    #[error(
        "another natter process{} is using the {store} store in the data directory {} (it holds {store}.lock \
         there); a data directory serves one process at a time: stop the other one first, or give this one \
         a --data-dir of its own (processes that share their data need PostgreSQL, --database-url, and one \
         NATS, --nats-url)",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default(),
        dir.display()
    )]
    DataDirInUse {
        /// The data directory.
        dir: std::path::PathBuf,
        /// The store whose lock was refused (`sessions`, ...).
        store: String,
        /// The process id the holder noted in the lock file, if it could
        /// be read.
        holder: Option<u32>,
    },
    /// A file or directory of a SQLite store could not be made, read or
    /// locked.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The database refused or failed.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    /// A migration failed.
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A connection of its own to a SQLite file could not be opened, or a
    /// statement on it failed.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// A blocking read was cancelled (the runtime is shutting down).
    #[error("database read cancelled: shutting down")]
    Cancelled,
    /// The SQLite writer thread has stopped (the store is closing).
    #[error("database closed")]
    Closed,
    /// A transaction got no answer within the time a live database takes
    /// at most ([`PoolSettings::unresponsive_after`]): its connection is
    /// taken for dead.
    #[error("the database did not answer within {0:?}")]
    Unresponsive(Duration),
    /// A failure of the database's that put it out of reach for now,
    /// passed on as text: to each message of a batch that failed as one.
    #[error("database unavailable: {0}")]
    Unavailable(String),

    /// A thread of the SQLite store could not be started.
    #[error("cannot start a database thread: {0}")]
    Thread(String),
}

/// A migration that migrating a store applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedMigration {
    /// Its version: the number its file name starts with (`0013`: 13).
    pub version: i64,
    /// Its description: the rest of its file name, words apart (`store
    /// backfills`).
    pub description: String,
}

/// A one-off rewrite of stored rows that migrating a store ran (the
/// services' backfills: what SQL cannot say on both engines, done by the
/// store's code once per database).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backfilled {
    /// Its name (on the messages store, as in `store_backfills`).
    pub name: String,
    /// How many rows (messages, chats) it rewrote; 0 when it ran and found
    /// nothing to rewrite.
    pub rewritten: u64,
}

/// What migrating one store did, as `natter migrate` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    /// The migrations applied, in version order; empty: the schema was up
    /// to date.
    pub applied: Vec<AppliedMigration>,
    /// The backfills that ran, in order; empty: none was due.
    pub backfills: Vec<Backfilled>,
}

/// Migrates the store `config` names (the SQLite file or PostgreSQL schema
/// created if missing) with `migrator`, as the stores do when they open:
/// [`sqlite::migrate`] or [`postgres::migrate_schema`]. Returns the
/// migrations it applied.
///
/// Errors: as those two, or the URL names no supported engine.
pub async fn migrate(config: &DbConfig, migrator: &Migrator) -> Result<Vec<AppliedMigration>, DbError> {
    match config.engine()? {
        Engine::Sqlite { path } => sqlite::migrate(&path, migrator).await,
        Engine::Postgres { url, schema } => postgres::migrate_schema(&url, &schema, &config.pool, migrator).await,
    }
}

/// Runs `migrator` on `conn`, tolerant of a schema a newer natter migrated
/// further: migrations this binary does not know are left as they are, not
/// refused. So the previous release still starts on the next one's schema
/// (a rollback, or an old replica restarting during a rolling upgrade).
/// That holds because natter's migrations only add (tables, columns with
/// defaults, indexes); one that drops or renames must come a release after
/// the code stops using what it removes (expand, then contract). A
/// migration the binary knows but the database applied with other SQL is
/// still an error.
///
/// `conn` must keep other processes' migrations out until this returns (a
/// PostgreSQL advisory lock, a SQLite write transaction): the migrations it
/// applied are those not recorded before it ran, which it returns.
///
/// Errors: a migration fails, or an applied one was changed.
pub(crate) async fn run_migrations<C>(
    migrator: &Migrator,
    conn: &mut C,
) -> Result<Vec<AppliedMigration>, sqlx::migrate::MigrateError>
where
    C: sqlx::migrate::Migrate,
{
    let mut tolerant = Migrator::with_migrations(migrator.iter().cloned().collect());
    tolerant.set_ignore_missing(true);
    // The caller holds the lock (sqlx's SQLite migrator takes none at all).
    tolerant.set_locking(false);
    conn.ensure_migrations_table(&tolerant.table_name).await?;
    let before: std::collections::HashSet<i64> =
        conn.list_applied_migrations(&tolerant.table_name).await?.iter().map(|m| m.version).collect();
    // run_direct, not run: run's `Acquire` bound on `&mut Connection` makes
    // the future not `Send` for every lifetime (sqlx says as much on
    // run_direct), and services' starts are spawned.
    tolerant.run_direct(None, conn, false).await?;
    Ok(tolerant
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !before.contains(&m.version))
        .map(|m| AppliedMigration { version: m.version, description: m.description.to_string() })
        .collect())
}

/// What a failed database call is to the client of the call that made it:
/// the services answer [`Failure::Unavailable`] with gRPC UNAVAILABLE,
/// [`Failure::Conflict`] with ABORTED and [`Failure::Internal`] with
/// INTERNAL (gRPC status codes: UNAVAILABLE "most likely a transient
/// condition, which can be corrected by retrying with a backoff", ABORTED
/// "typically due to a concurrency issue such as ... transaction abort").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The database is out of reach, overloaded, out of space or shutting
    /// down, or this store is closing: the same call may succeed later.
    Unavailable,
    /// The database aborted the transaction for a concurrent one (a
    /// serialization failure, a deadlock): retrying the call may succeed.
    Conflict,
    /// Anything else: a fault of ours or of the data, that a retry does not
    /// mend.
    Internal,
}

impl Failure {
    /// The failure of a sqlx call. PostgreSQL's errors are told apart by
    /// SQLSTATE class (PostgreSQL manual, appendix A "Error Codes"): 08
    /// connection exception, 53 insufficient resources, 57 operator
    /// intervention (57014 a statement cancelled, by
    /// `statement_timeout` among others; 57P admin or crash shutdown), 58
    /// system error, 55P03 lock not available (`lock_timeout`), 25P03 a
    /// session ended by `idle_in_transaction_session_timeout` and 25006 a
    /// write refused by a read-only server (a standby that the database's
    /// address still names after a failover) are unavailable; 40001 serialization failure and 40P01 deadlock are
    /// conflicts. sqlx's pool timing out (no connection free within its
    /// acquire timeout) is unavailable too. A SQLite error (the sessions
    /// store, through sqlx) is judged by its result code as in
    /// [`Failure::of_sqlite`].
    pub fn of_sqlx(e: &sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Self::Unavailable,
            sqlx::Error::Database(db) if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() => {
                match db.code().and_then(|code| code.parse().ok()) {
                    Some(code) if sqlite_unavailable(code) => Self::Unavailable,
                    _ => Self::Internal,
                }
            }
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("40001" | "40P01") => Self::Conflict,
                Some(code)
                    if ["08", "53", "57", "58", "55P03", "25P03", "25006"]
                        .iter()
                        .any(|class| code.starts_with(class)) =>
                {
                    Self::Unavailable
                }
                _ => Self::Internal,
            },
            _ => Self::Internal,
        }
    }

    /// The failure of a rusqlite call: the database busy or locked past
    /// its timeout, the disk full, an I/O error, the file out of reach or
    /// memory short are unavailable (SQLite result codes,
    /// <https://sqlite.org/rescode.html>).
    pub fn of_sqlite(e: &rusqlite::Error) -> Self {
        match e {
            rusqlite::Error::SqliteFailure(failure, _) if sqlite_unavailable(failure.extended_code) => {
                Self::Unavailable
            }
            _ => Self::Internal,
        }
    }
}

/// Whether a SQLite result code (primary or extended: the primary is the
/// extended one's low byte) says the database is out of reach for now:
/// SQLITE_BUSY 5, SQLITE_LOCKED 6, SQLITE_NOMEM 7, SQLITE_IOERR 10,
/// SQLITE_FULL 13, SQLITE_CANTOPEN 14.
fn sqlite_unavailable(code: i32) -> bool {
    matches!(code & 0xff, 5 | 6 | 7 | 10 | 13 | 14)
}

impl DbError {
    /// What this failure is to a client (see [`Failure`]).
    pub fn failure(&self) -> Failure {
        match self {
            Self::Sqlx(e) => Failure::of_sqlx(e),
            Self::Sqlite(e) => Failure::of_sqlite(e),
            Self::Cancelled | Self::Closed | Self::Unresponsive(_) | Self::Unavailable(_) => Failure::Unavailable,
            Self::UnsupportedUrl(_)
            | Self::InvalidSchema(_)
            | Self::MissingDatabase { .. }
            | Self::InUse { .. }
            | Self::InstanceLost { .. }
            | Self::DataDirInUse { .. }
            | Self::Io { .. }
            | Self::Migrate(_)
            | Self::Thread(_) => Failure::Internal,
        }
    }
}

/// Which engine, and where, a [`DbConfig`] names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Engine {
    /// A SQLite file.
    Sqlite {
        /// The file (created if missing).
        path: std::path::PathBuf,
    },
    /// A PostgreSQL database and the schema of this service's tables.
    Postgres {
        /// `postgres://...`.
        url: String,
        /// `[a-z_][a-z0-9_]*` ([`valid_schema`]).
        schema: String,
    },
}

/// Connection settings for one service's store.
#[derive(Clone, Debug)]
pub struct DbConfig {
    /// `sqlite:PATH` or `postgres://...`.
    pub url: String,
    /// PostgreSQL schema that holds this service's tables (ignored by SQLite).
    pub schema: String,
    /// The pool's size and, on PostgreSQL, its timeouts.
    pub pool: PoolSettings,
}

impl DbConfig {
    /// A SQLite file `NAME.db` in `dir` (created if missing).
    pub fn sqlite_in(dir: &Path, name: &str) -> Self {
        Self {
            url: format!("sqlite://{}?mode=rwc", dir.join(format!("{name}.db")).display()),
            schema: name.to_owned(),
            pool: PoolSettings { max_connections: 8, ..PoolSettings::default() },
        }
    }

    /// A PostgreSQL URL with the service's schema, and the default pool.
    pub fn postgres(url: &str, schema: &str) -> Self {
        Self { url: url.to_owned(), schema: schema.to_owned(), pool: PoolSettings::default() }
    }

    /// Where this store is, for a report or a log line, with no password
    /// in it: the SQLite file's path, or the PostgreSQL URL less its
    /// password and the schema (`postgres://natter@db:5432/natter, schema
    /// natter_chats`).
    pub fn location(&self) -> String {
        match self.engine() {
            Ok(Engine::Sqlite { path }) => path.display().to_string(),
            Ok(Engine::Postgres { url, schema }) => format!("{}, schema {schema}", without_password(&url)),
            Err(_) => without_password(&self.url),
        }
    }

    /// The engine and place this configuration names.
    ///
    /// Errors: the URL is neither `sqlite:` nor `postgres:`/`postgresql:`,
    /// or a `sqlite:` URL does not parse.
    pub fn engine(&self) -> Result<Engine, DbError> {
        let url = self.url.as_str();
        if url.starts_with("sqlite:") {
            let path = sqlx::sqlite::SqliteConnectOptions::from_str(url)?.get_filename().to_owned();
            Ok(Engine::Sqlite { path })
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Engine::Postgres { url: self.url.clone(), schema: self.schema.clone() })
        } else {
            Err(DbError::UnsupportedUrl(self.url.clone()))
        }
    }
}

/// `url` without a password: neither its user part's (`user:password@`)
/// nor a `password` (or `sslpassword`) query parameter.
fn without_password(url: &str) -> String {
    let (head, query) = url.split_once('?').map_or((url, None), |(head, query)| (head, Some(query)));
    let mut out = match head.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest, rest.rfind('@')?))) {
        Some((scheme, rest, at)) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{scheme}://{user}{}", &rest[at..])
        }
        None => head.to_owned(),
    };
    let kept: Vec<&str> = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|param| !param.split('=').next().unwrap_or_default().to_ascii_lowercase().contains("password"))
        .collect();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    out
}

/// How many connections a service's pool holds, how long a call waits for
/// one, and how long PostgreSQL lets a statement run or wait for a lock.
///
/// The timeouts are PostgreSQL's; SQLite ignores them (its stores wait for
/// the single writer with a busy timeout of their own). Each is above zero:
/// PostgreSQL reads a zero `statement_timeout` or `lock_timeout` as no
/// limit at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    /// Most connections in the pool.
    pub max_connections: u32,
    /// How long a call waits for a connection of the pool (all in use, or
    /// a new one opening) before failing with sqlx's `PoolTimedOut`
    /// ([`Failure::Unavailable`]).
    pub acquire_timeout: Duration,
    /// PostgreSQL's `statement_timeout` on every connection of the pool: a
    /// statement that runs longer is cancelled (SQLSTATE 57014,
    /// [`Failure::Unavailable`]), and its connection and locks are freed.
    /// Migrations run without it (see [`postgres::connect`]).
    pub statement_timeout: Duration,
    /// PostgreSQL's `lock_timeout` on every connection of the pool and on
    /// migrations: a statement that waits longer for a lock (a row another
    /// transaction holds, a table a migration alters) fails (SQLSTATE
    /// 55P03, [`Failure::Unavailable`]).
    pub lock_timeout: Duration,
}

impl PoolSettings {
    /// How long a transaction of a few statements may go unanswered
    /// before its connection is taken for dead: the wait for a connection
    /// and three statement timeouts (a live PostgreSQL cuts each statement
    /// at its statement_timeout). sqlx sets no TCP keepalive, so a
    /// connection whose server vanished without closing it (a host crash,
    /// a failover, a NAT or firewall that dropped the flow) is otherwise
    /// waited on for ever. The PostgreSQL pools close a connection given
    /// back that owes answers for longer than this (`postgres::settle_owed`).
    pub fn unresponsive_after(&self) -> Duration {
        self.acquire_timeout + self.statement_timeout * 3
    }
}

impl Default for PoolSettings {
    /// The flags' defaults: 16 connections, 5 s to get one, statements cut
    /// at 10 s and lock waits at 5 s, all below the services' 30 s request
    /// timeout.
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
            lock_timeout: Duration::from_secs(5),
        }
    }
}

/// Command-line options that choose a service's database.
#[derive(Clone, Debug, clap::Args)]
pub struct StoreArgs {
    /// PostgreSQL URL (postgres://...); unset: SQLite files in --data-dir.
    #[arg(long, env = "NATTER_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Directory for the SQLite files (one per service), created if missing.
    #[arg(long, env = "NATTER_DATA_DIR", default_value = "./natter-data")]
    pub data_dir: std::path::PathBuf,

    /// Prefix of each service's PostgreSQL schema (`<prefix>sessions`, ...).
    #[arg(long, env = "NATTER_DATABASE_SCHEMA_PREFIX", default_value = "natter_")]
    pub database_schema_prefix: String,

    /// Most PostgreSQL connections each service of this process opens (the
    /// all-in-one has three services): replicas times services times this
    /// must stay under the server's max_connections.
    #[arg(long, env = "NATTER_DATABASE_MAX_CONNECTIONS", default_value_t = 16,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub database_max_connections: u32,

    /// Longest a call waits for one of its service's PostgreSQL connections
    /// (all --database-max-connections in use, or a new one opening): past
    /// it the call fails UNAVAILABLE (retry with backoff). Must be below
    /// --request-timeout, or clients see DEADLINE_EXCEEDED instead. Ignored
    /// on SQLite
    #[arg(long, env = "NATTER_DATABASE_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = positive_duration)]
    pub database_acquire_timeout: Duration,

    /// Longest a PostgreSQL statement may run (statement_timeout, set on
    /// every pooled connection): past it PostgreSQL cancels it, the call
    /// fails UNAVAILABLE (retry with backoff), and a runaway query gives
    /// back its connection and the row locks it held. Must be below
    /// --request-timeout, or clients see DEADLINE_EXCEEDED instead.
    /// Migrations at start-up are not cut (an index build may take long).
    /// Ignored on SQLite
    #[arg(long, env = "NATTER_DATABASE_STATEMENT_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub database_statement_timeout: Duration,

    /// Longest a PostgreSQL statement may wait for a lock (lock_timeout: a
    /// row another transaction holds, a table a migration alters): past it
    /// the call fails UNAVAILABLE. Migrations at start-up wait this long
    /// for a table's lock, then fail and the process exits to be restarted,
    /// instead of queueing every query behind them; waiting for another
    /// replica's migrations is not limited. Ignored on SQLite
    #[arg(long, env = "NATTER_DATABASE_LOCK_TIMEOUT", default_value = "5s", value_parser = positive_duration)]
    pub database_lock_timeout: Duration,
}

/// A duration above zero (humantime), for a flag: PostgreSQL reads a zero
/// timeout as none.
fn positive_duration(value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be above zero".into()),
        Err(e) => Err(e.to_string()),
    }
}

impl StoreArgs {
    /// Where these flags put the stores, for a log line, with no password in
    /// it: the SQLite data directory, or the PostgreSQL URL less its
    /// password and the schemas' prefix (`postgres://natter@db:5432/natter,
    /// schemas natter_*`).
    pub fn location(&self) -> String {
        match &self.database_url {
            None => self.data_dir.display().to_string(),
            Some(url) => format!("{}, schemas {}*", without_password(url), self.database_schema_prefix),
        }
    }

    /// The pool these flags set.
    pub fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.database_max_connections,
            acquire_timeout: self.database_acquire_timeout,
            statement_timeout: self.database_statement_timeout,
            lock_timeout: self.database_lock_timeout,
        }
    }

    /// Claims the stores of `services` (`sessions`, `chats`, `messages`)
    /// for this process; hold the claim returned until the process has
    /// closed its stores, then [`InstanceClaim::release`] it.
    ///
    /// - PostgreSQL ([`postgres::InstanceLock::claim`]): for itself if
    ///   `alone` (no NATS), watched while it runs: `shutdown` is cancelled
    ///   if its session ended and another process took the lock meanwhile;
    ///   else checks that no process without NATS holds them (`None`).
    /// - SQLite ([`sqlite::StoreLock::claim`]): for itself, NATS or not
    ///   (a SQLite file serves one process), creating the data directory.
    ///   A lock the operating system keeps for the open file cannot be
    ///   lost: `shutdown` is not needed.
    ///
    /// Errors: [`DbError::InUse`] or [`DbError::DataDirInUse`] when
    /// another process serves one of them in a way this one cannot run
    /// beside; the server refused; a lock file cannot be made.
    pub async fn claim(
        &self,
        services: &[&str],
        alone: bool,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<InstanceClaim>, DbError> {
        let Some(url) = &self.database_url else {
            return Ok(Some(InstanceClaim::Sqlite(sqlite::StoreLock::claim(&self.data_dir, services)?)));
        };
        let schemas: Vec<String> =
            services.iter().map(|name| format!("{}{name}", self.database_schema_prefix)).collect();
        Ok(postgres::InstanceLock::claim(url, &schemas, alone, shutdown).await?.map(InstanceClaim::Postgres))
    }

    /// The database of the service `name` (`sessions`, `chats`, `messages`).
    ///
    /// Errors: the data directory cannot be created.
    pub fn config(&self, name: &str) -> std::io::Result<DbConfig> {
        match &self.database_url {
            Some(url) => Ok(DbConfig {
                pool: self.pool_settings(),
                ..DbConfig::postgres(url, &format!("{}{name}", self.database_schema_prefix))
            }),
            None => {
                std::fs::create_dir_all(&self.data_dir)?;
                Ok(DbConfig::sqlite_in(&self.data_dir, name))
            }
        }
    }
}

/// A process's claim on its stores ([`StoreArgs::claim`]), which keeps
/// any other process that would make its caches stale from starting on
/// them.
#[derive(Debug)]
pub enum InstanceClaim {
    /// Advisory locks on the PostgreSQL schemas (a process without NATS).
    Postgres(postgres::InstanceLock),
    /// Locks on the SQLite stores' lock files.
    Sqlite(sqlite::StoreLock),
}

impl InstanceClaim {
    /// Releases the claim (at shutdown, once the stores are closed), so
    /// that a process started right after this one finds the stores free.
    ///
    /// Errors: [`DbError::InstanceLost`] when the PostgreSQL lock was lost
    /// to another process while this one ran (and its shutdown was
    /// requested for that): the process should exit non-zero with it.
    pub async fn release(self) -> Result<(), DbError> {
        match self {
            Self::Postgres(lock) => lock.release().await,
            Self::Sqlite(lock) => {
                lock.release();
                Ok(())
            }
        }
    }
}

/// A service's database over sqlx's `Any` driver: a read pool and a write
/// pool (the same pool on PostgreSQL; a single connection on SQLite, whose
/// one-writer rule would otherwise surface as SQLITE_BUSY), and on SQLite a
/// background checkpointer.
#[derive(Clone, Debug)]
pub struct Db {
    read: AnyPool,
    write: AnyPool,
}

impl Db {
    /// Opens the database after running `migrator` on it ([`migrate`]: on
    /// PostgreSQL as [`postgres::connect`] does, with `config.pool`'s
    /// timeouts; on SQLite in one transaction, as [`sqlite::migrate`] does).
    ///
    /// Errors: [`DbError`] when the URL is unsupported, the server is
    /// unreachable (after the pool's acquire timeout) or a migration fails.
    pub async fn connect(config: &DbConfig, migrator: &Migrator) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        migrate(config, migrator).await?;
        match config.engine()? {
            Engine::Sqlite { .. } => Self::connect_sqlite(config).await,
            Engine::Postgres { url, schema } => Self::connect_postgres(&url, &schema, config).await,
        }
    }

    async fn connect_sqlite(config: &DbConfig) -> Result<Self, DbError> {
        let options = AnyConnectOptions::from_str(&config.url)?.disable_statement_logging();
        let setup = sqlite::SETUP;
        let write = AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL;").await?;
                    conn.execute(setup).await?;
                    Ok(())
                })
            })
            .connect_with(options.clone())
            .await?;
        let read = AnyPoolOptions::new()
            .max_connections(config.pool.max_connections.max(1))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    conn.execute(setup).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        tokio::spawn(checkpoint_in_background(read.clone()));
        Ok(Self { read, write })
    }

    async fn connect_postgres(url: &str, schema: &str, config: &DbConfig) -> Result<Self, DbError> {
        let options = AnyConnectOptions::from_str(url)?.disable_statement_logging();
        let setup = postgres::session_setup(schema, &config.pool);
        let owed_limit = config.pool.unresponsive_after();
        let pool = AnyPoolOptions::new()
            .max_connections(config.pool.max_connections.max(1))
            .acquire_timeout(config.pool.acquire_timeout)
            .after_connect(move |conn, _| {
                let setup = setup.clone();
                Box::pin(async move {
                    conn.execute(AssertSqlSafe(setup)).await?;
                    Ok(())
                })
            })
            .after_release(move |conn, _| Box::pin(postgres::settle_owed(conn, owed_limit)))
            .connect_with(options)
            .await?;
        Ok(Self { read: pool.clone(), write: pool })
    }

    /// The pool for reads.
    pub fn read(&self) -> &AnyPool {
        &self.read
    }

    /// The pool for writes (begin transactions on it).
    pub fn write(&self) -> &AnyPool {
        &self.write
    }

    /// Closes both pools, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }
}

/// Checkpoints a SQLite database every [`sqlite::CHECKPOINT_INTERVAL`] until `pool`
/// is closed, in PASSIVE mode: it copies what it can without waiting for or
/// blocking readers and writers, on a pool connection of its own.
///
/// SQLite's automatic checkpoint (at 1,000 WAL pages) still runs in the
/// committing connection, after its commit, and only it can let the WAL
/// start over (it copies the last frames while no other write is under
/// way). This task does the bulk of the copying beforehand, so that one
/// finds little left to copy and the commit that triggers it barely waits.
/// An idle database costs one cheap PRAGMA per interval. See
/// <https://sqlite.org/wal.html#ckpt>.
async fn checkpoint_in_background(pool: AnyPool) {
    let mut every = tokio::time::interval(sqlite::CHECKPOINT_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !pool.is_closed() {
        every.tick().await;
        match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
            Ok(_) => {}
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; retrying"),
        }
    }
}

/// True for PostgreSQL schema names this crate accepts: `[a-z_][a-z0-9_]*`,
/// at most 63 bytes (so they need no quoting).
pub fn valid_schema(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().next().is_some_and(|b| b == b'_' || b.is_ascii_lowercase())
        && name.bytes().all(|b| b == b'_' || b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Builds a query from static SQL fragments and bound values, numbering
/// placeholders `$1, $2, ...` (which both engines accept; sqlx's own
/// `QueryBuilder` writes `?` for the Any driver, which PostgreSQL rejects).
/// Only `&'static str` fragments are accepted, so values can never be spliced
/// into the SQL text.
#[derive(Default)]
pub struct SqlBuilder {
    sql: String,
    args: sqlx::any::AnyArguments,
    count: usize,
    error: Option<String>,
}

impl SqlBuilder {
    /// Starts with `sql`.
    pub fn new(sql: &'static str) -> Self {
        Self { sql: sql.to_owned(), ..Self::default() }
    }

    /// Appends a static fragment.
    pub fn push(&mut self, sql: &'static str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    /// Appends the next placeholder and binds `value` to it.
    pub fn bind<T>(&mut self, value: T) -> &mut Self
    where
        T: for<'q> sqlx::Encode<'q, Any> + sqlx::Type<Any>,
    {
        use sqlx::Arguments as _;
        self.count += 1;
        self.sql.push('$');
        self.sql.push_str(&self.count.to_string());
        if let Err(e) = self.args.add(value) {
            self.error.get_or_insert(e.to_string());
        }
        self
    }

    /// Appends ` LIMIT n`, the number written into the SQL rather than bound.
    /// SQLite's planner looks at a bound LIMIT's value, so a prepared
    /// statement whose LIMIT is a parameter expires each time it is bound
    /// again and is compiled anew on every execution (`sqlite3Reprepare`,
    /// about as costly as running a page query); a number cannot inject
    /// anything. Each distinct limit is a statement of its own in the cache.
    pub fn limit(&mut self, n: u32) -> &mut Self {
        self.sql.push_str(" LIMIT ");
        self.sql.push_str(&n.to_string());
        self
    }

    /// Appends `(v1, v2, ...)`, binding each value.
    pub fn bind_list<T, I>(&mut self, values: I) -> &mut Self
    where
        I: IntoIterator<Item = T>,
        T: for<'q> sqlx::Encode<'q, Any> + sqlx::Type<Any>,
    {
        self.push("(");
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.bind(v);
        }
        self.push(")")
    }

    /// The SQL so far (for logs and tests).
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The bound values, or the first value that failed to encode.
    fn arguments(&mut self) -> Result<sqlx::any::AnyArguments, sqlx::Error> {
        match self.error.take() {
            Some(e) => Err(sqlx::Error::Encode(e.into())),
            None => Ok(std::mem::take(&mut self.args)),
        }
    }

    /// A query that returns no rows of interest.
    ///
    /// Errors: a bound value failed to encode (`sqlx::Error::Encode`).
    pub fn build(mut self) -> Result<sqlx::query::Query<'static, Any, sqlx::any::AnyArguments>, sqlx::Error> {
        let args = self.arguments()?;
        Ok(sqlx::query_with(AssertSqlSafe(self.sql), args))
    }

    /// A query whose rows decode into `O` (as [`SqlBuilder::build`]).
    pub fn build_as<O>(mut self) -> Result<sqlx::query::QueryAs<'static, Any, O, sqlx::any::AnyArguments>, sqlx::Error>
    where
        O: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow>,
    {
        let args = self.arguments()?;
        Ok(sqlx::query_as_with(AssertSqlSafe(self.sql), args))
    }
}

/// True when the error is a unique-constraint violation (on either engine).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// True if `e` is a foreign-key violation (a row referring to one that is
/// gone), on either engine.
pub fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_foreign_key_violation())
}

/// Escapes `%`, `_` and `\` for a `LIKE ... ESCAPE '\'` pattern.
pub fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_need_no_quoting() {
        assert!(valid_schema("natter_chats"));
        assert!(valid_schema("t0123_messages"));
        assert!(!valid_schema("Chats"));
        assert!(!valid_schema("x; drop table users"));
        assert!(!valid_schema(""));
        assert!(!valid_schema("1abc"));
    }

    #[test]
    fn builder_numbers_placeholders() {
        let mut q = SqlBuilder::new("SELECT * FROM t WHERE a = ");
        q.bind(1i64).push(" AND b IN ").bind_list(["x".to_owned(), "y".to_owned()]);
        assert_eq!(q.sql(), "SELECT * FROM t WHERE a = $1 AND b IN ($2, $3)");
        // A limit is written in, not bound, and takes no placeholder number.
        q.push(" AND c = ").bind(2i64).push(" ORDER BY a").limit(20);
        assert_eq!(q.sql(), "SELECT * FROM t WHERE a = $1 AND b IN ($2, $3) AND c = $4 ORDER BY a LIMIT 20");
    }

    #[test]
    fn a_database_out_of_reach_is_unavailable_and_a_fault_of_ours_internal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.db");
        let holder = rusqlite::Connection::open(&path).unwrap();
        holder.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY); BEGIN IMMEDIATE;").unwrap();
        let other = rusqlite::Connection::open(&path).unwrap();
        other.busy_timeout(std::time::Duration::ZERO).unwrap();
        let busy = other.execute("INSERT INTO t (id) VALUES (1)", []).unwrap_err();
        assert_eq!(Failure::of_sqlite(&busy), Failure::Unavailable, "{busy}");
        holder.execute_batch("COMMIT; INSERT INTO t (id) VALUES (1);").unwrap();
        let taken = other.execute("INSERT INTO t (id) VALUES (1)", []).unwrap_err();
        assert_eq!(Failure::of_sqlite(&taken), Failure::Internal, "{taken}");
        assert_eq!(DbError::Closed.failure(), Failure::Unavailable);
        assert_eq!(Failure::of_sqlx(&sqlx::Error::PoolTimedOut), Failure::Unavailable);
        assert_eq!(Failure::of_sqlx(&sqlx::Error::RowNotFound), Failure::Internal);
    }

    /// PostgreSQL's errors by SQLSTATE, from a real server
    /// (`NATTER_TEST_DATABASE_URL`; skipped without it): a server out of
    /// reach, a deadlock, a syntax error, and the ends of the timeouts
    /// [`postgres::connect`] sets (a statement cancelled, a lock wait given
    /// up, a session idle in a transaction ended), which a retry on another
    /// connection may get past.
    #[tokio::test]
    async fn postgres_failures_are_told_apart_by_sqlstate() {
        let Ok(url) = std::env::var("NATTER_TEST_DATABASE_URL") else { return };
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let unreachable = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_secs(2))
            .connect(&format!("postgres://postgres@127.0.0.1:{closed}/test"))
            .await
            .unwrap_err();
        assert_eq!(Failure::of_sqlx(&unreachable), Failure::Unavailable, "{unreachable}");
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&url).await.unwrap();
        let syntax = sqlx::query("SELEC 1").execute(&pool).await.unwrap_err();
        assert_eq!(Failure::of_sqlx(&syntax), Failure::Internal, "{syntax}");
        // Two transactions that each lock a row, then wait for the other's.
        let table = format!("deadlock_{}", std::process::id());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE TABLE {table} (id INT PRIMARY KEY)")))
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO {table} VALUES (1), (2)"))).execute(&pool).await.unwrap();
        let (mut a, mut b) = (pool.begin().await.unwrap(), pool.begin().await.unwrap());
        let lock = |id: i32| sqlx::AssertSqlSafe(format!("UPDATE {table} SET id = id WHERE id = {id}"));
        sqlx::query(lock(1)).execute(&mut *a).await.unwrap();
        sqlx::query(lock(2)).execute(&mut *b).await.unwrap();
        let (first, second) =
            tokio::join!(sqlx::query(lock(2)).execute(&mut *a), sqlx::query(lock(1)).execute(&mut *b));
        let deadlock = first.err().or(second.err()).expect("PostgreSQL breaks the deadlock");
        drop((a, b));
        assert_eq!(Failure::of_sqlx(&deadlock), Failure::Conflict, "{deadlock}");

        let mut conn = pool.acquire().await.unwrap();
        conn.execute("SET statement_timeout = 50").await.unwrap();
        let cancelled = sqlx::query("SELECT pg_sleep(5)").execute(&mut *conn).await.unwrap_err();
        assert_eq!(Failure::of_sqlx(&cancelled), Failure::Unavailable, "{cancelled}");
        conn.execute("SET statement_timeout = 0; SET lock_timeout = 50").await.unwrap();
        let mut holder = pool.begin().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("LOCK TABLE {table}"))).execute(&mut *holder).await.unwrap();
        let locked = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT * FROM {table}"))).execute(&mut *conn).await;
        let locked = locked.unwrap_err();
        assert_eq!(Failure::of_sqlx(&locked), Failure::Unavailable, "{locked}");
        holder.rollback().await.unwrap();
        // A write on a read-only server (a standby after a failover).
        conn.execute("SET lock_timeout = 0; SET default_transaction_read_only = on").await.unwrap();
        let read_only = sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO {table} VALUES (3)"))).execute(&mut *conn);
        let read_only = read_only.await.unwrap_err();
        assert_eq!(Failure::of_sqlx(&read_only), Failure::Unavailable, "{read_only}");
        conn.execute("SET default_transaction_read_only = off").await.unwrap();
        conn.execute("SET idle_in_transaction_session_timeout = 50; BEGIN").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let ended = sqlx::query("SELECT 1").execute(&mut *conn).await.unwrap_err();
        assert_eq!(Failure::of_sqlx(&ended), Failure::Unavailable, "{ended}");
        conn.detach();
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}"))).execute(&pool).await.unwrap();
    }

    /// The previous release starts on a schema the next one migrated
    /// further (a rollback); a migration it knows, changed, still fails.
    #[tokio::test]
    async fn a_schema_migrated_further_by_a_newer_release_still_opens() {
        use sqlx::migrate::{Migration, MigrationType};
        let migration = |version: i64, sql: &'static str| {
            Migration::new(
                version,
                format!("m{version}").into(),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(sql),
                false,
            )
        };
        let (older, newer) = (
            vec![migration(1, "CREATE TABLE t (id INTEGER PRIMARY KEY)")],
            vec![
                migration(1, "CREATE TABLE t (id INTEGER PRIMARY KEY)"),
                migration(2, "ALTER TABLE t ADD COLUMN n INTEGER NOT NULL DEFAULT 0"),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollback.db");
        sqlite::migrate(&path, &Migrator::with_migrations(newer)).await.unwrap();
        sqlite::migrate(&path, &Migrator::with_migrations(older)).await.expect("the older release opens it");
        let changed = vec![migration(1, "CREATE TABLE t (id TEXT PRIMARY KEY)")];
        assert!(
            sqlite::migrate(&path, &Migrator::with_migrations(changed)).await.is_err(),
            "a known migration changed"
        );
    }

    /// A report names where a store is and never its password.
    #[test]
    fn a_location_holds_no_password() {
        let located = |url: &str| DbConfig::postgres(url, "natter_chats").location();
        assert_eq!(
            located("postgres://natter:s3cr3t@db:5432/natter?sslmode=require&password=s3cr3t"),
            "postgres://natter@db:5432/natter?sslmode=require, schema natter_chats"
        );
        assert_eq!(
            located("postgresql://natter:a/b:c@db/natter"),
            "postgresql://natter@db/natter, schema natter_chats"
        );
        assert_eq!(located("postgres://db/natter"), "postgres://db/natter, schema natter_chats");
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            DbConfig::sqlite_in(dir.path(), "chats").location(),
            dir.path().join("chats.db").display().to_string()
        );
        // What `natter serve` logs: the data directory only on SQLite.
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            store: StoreArgs,
        }
        let flags = |args: &[&str]| Flags::parse_from([&["natter"], args].concat()).store.location();
        assert_eq!(flags(&["--data-dir", "/var/natter"]), "/var/natter");
        assert_eq!(
            flags(&["--data-dir", "/var/natter", "--database-url", "postgres://natter:s3cr3t@db/natter"]),
            "postgres://natter@db/natter, schemas natter_*"
        );
    }

    #[test]
    fn like_patterns_are_escaped() {
        assert_eq!(escape_like("50%_off\\"), "50\\%\\_off\\\\");
    }

    #[tokio::test]
    async fn sqlite_store_opens_migrates_and_round_trips() {
        static MIGRATOR: Migrator = Migrator::DEFAULT;
        let dir = std::env::temp_dir().join(format!("natter-db-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = Db::connect(&DbConfig::sqlite_in(&dir, "probe"), &MIGRATOR).await.unwrap();
        sqlx::query("CREATE TABLE IF NOT EXISTS t (id TEXT PRIMARY KEY, n BIGINT NOT NULL)")
            .execute(db.write())
            .await
            .unwrap();
        sqlx::query("INSERT INTO t (id, n) VALUES ($1, $2)").bind("a").bind(7i64).execute(db.write()).await.unwrap();
        let dup = sqlx::query("INSERT INTO t (id, n) VALUES ($1, $2)").bind("a").bind(8i64).execute(db.write()).await;
        assert!(is_unique_violation(&dup.unwrap_err()));
        let (n,): (i64,) =
            sqlx::query_as("SELECT n FROM t WHERE id = $1").bind("a").fetch_one(db.read()).await.unwrap();
        assert_eq!(n, 7);
        db.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

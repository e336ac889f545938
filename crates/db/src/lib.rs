//! One SQL code path over SQLite (the embedded default) and PostgreSQL.
//!
//! Queries go through sqlx's `Any` driver with `$1`-style placeholders, which
//! both backends accept; ids are stored as TEXT (UUID strings), times as
//! BIGINT microseconds since the epoch, flags as nullable times. That keeps
//! every query identical on both engines; what differs (connection set-up,
//! the SQLite single-writer rule, the PostgreSQL schema per service) lives
//! here and nowhere else.
//!
//! Each service owns its tables: on SQLite a file per service, on PostgreSQL a
//! schema per service (`search_path`), each with its own sqlx migrations.
//!
//! One exception, for speed: on SQLite the hot paths run on rusqlite
//! connections of this crate's making, because sqlx hands every SQLite
//! statement (and every row) to a worker thread and back. The two writes on
//! the send path (the messages writer's batch and the chats' activity
//! update) use [`Db::sqlite_commit_connection`] (WAL writes gathered into
//! one per commit by the VFS of `wal_vfs.rs`) and [`Db::sqlite_connection`]
//! and take the same [`Db::write_turn`] as every other SQLite write; history
//! pages and chat
//! summaries read through [`Db::sqlite_read`]. They share the schema and the
//! SQL shapes of the sqlx path.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, AssertSqlSafe, ConnectOptions, Connection, Executor};
use tokio::sync::{Mutex, MutexGuard};

pub use sqlx;
pub use sqlx::Any;

pub mod postgres;
pub mod sqlite;
pub mod testing;
mod wal_vfs;

/// Which engine a [`Db`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite in WAL mode, one writer connection.
    Sqlite,
    /// PostgreSQL, one schema per service.
    Postgres,
}

/// Failure to open or migrate a database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL is neither `sqlite:` nor `postgres:`/`postgresql:`.
    #[error("unsupported database url {0:?} (use sqlite:PATH or postgres://...)")]
    UnsupportedUrl(String),
    /// The schema name is not `[a-z_][a-z0-9_]*`.
    #[error("invalid schema name {0:?}")]
    InvalidSchema(String),
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
    /// The gathering WAL VFS could not be set up: SQLite refused to
    /// register it (its result code), or a commit connection is not
    /// `synchronous = FULL` (its setting), which the VFS relies on.
    #[error("WAL VFS: {0}")]
    WalVfs(String),
    /// The SQLite writer thread has stopped (the store is closing).
    #[error("database closed")]
    Closed,
    /// A thread of the SQLite store could not be started.
    #[error("cannot start a database thread: {0}")]
    Thread(String),
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
    /// Most connections in the pool.
    pub max_connections: u32,
}

impl DbConfig {
    /// A SQLite file `NAME.db` in `dir` (created if missing).
    pub fn sqlite_in(dir: &Path, name: &str) -> Self {
        Self {
            url: format!("sqlite://{}?mode=rwc", dir.join(format!("{name}.db")).display()),
            schema: name.to_owned(),
            max_connections: 8,
        }
    }

    /// A PostgreSQL URL with the service's schema.
    pub fn postgres(url: &str, schema: &str) -> Self {
        Self { url: url.to_owned(), schema: schema.to_owned(), max_connections: 16 }
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
}

impl StoreArgs {
    /// The database of the service `name` (`sessions`, `chats`, `messages`).
    ///
    /// Errors: the data directory cannot be created.
    pub fn config(&self, name: &str) -> std::io::Result<DbConfig> {
        match &self.database_url {
            Some(url) => Ok(DbConfig::postgres(url, &format!("{}{name}", self.database_schema_prefix))),
            None => {
                std::fs::create_dir_all(&self.data_dir)?;
                Ok(DbConfig::sqlite_in(&self.data_dir, name))
            }
        }
    }
}

/// A service's database: a read pool and a write pool (the same pool on
/// PostgreSQL; a single connection on SQLite, whose one-writer rule would
/// otherwise surface as SQLITE_BUSY), and on SQLite the writers' turn and a
/// background checkpointer.
#[derive(Clone, Debug)]
pub struct Db {
    read: AnyPool,
    write: AnyPool,
    dialect: Dialect,
    turn: Arc<Mutex<()>>,
    /// On SQLite, the file and the connections of [`Db::sqlite_read`].
    readers: Option<Arc<Readers>>,
}

/// A SQLite database's file, and its idle rusqlite connections for
/// [`Db::sqlite_read`], reused across calls.
#[derive(Debug)]
struct Readers {
    path: std::path::PathBuf,
    idle: std::sync::Mutex<Vec<rusqlite::Connection>>,
    /// One per connection: reads beyond the pool's size wait here (on the
    /// runtime, holding no thread) rather than open connections of their own.
    permits: Arc<tokio::sync::Semaphore>,
}

impl Readers {
    /// Runs `read` on an idle connection (or a new one), then keeps the
    /// connection for the next call. Call it holding one of `permits`.
    fn run<T>(&self, read: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>) -> Result<T, DbError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = open_sqlite(&self.path, None)?;
                // Readers only: a write here would bypass the write turn.
                conn.execute_batch("PRAGMA query_only = ON;")?;
                conn.set_prepared_statement_cache_capacity(64);
                conn
            }
        };
        let out = read(&conn);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        Ok(out?)
    }
}

/// A rusqlite connection to the SQLite file at `path` with the pools'
/// settings ([`SQLITE_SETUP`]), through the VFS named `vfs` (else the
/// default one).
fn open_sqlite(path: &Path, vfs: Option<&std::ffi::CStr>) -> rusqlite::Result<rusqlite::Connection> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = match vfs {
        Some(vfs) => rusqlite::Connection::open_with_flags_and_vfs(path, flags, vfs)?,
        None => rusqlite::Connection::open_with_flags(path, flags)?,
    };
    conn.execute_batch(SQLITE_SETUP)?;
    Ok(conn)
}

impl Db {
    /// Opens the database and runs `migrator` on it.
    ///
    /// Errors: [`DbError`] when the URL is unsupported, the server is
    /// unreachable (after the pool's connect timeout) or a migration fails.
    pub async fn connect(config: &DbConfig, migrator: &Migrator) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let url = config.url.as_str();
        if url.starts_with("sqlite:") {
            Self::connect_sqlite(config, migrator).await
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Self::connect_postgres(config, migrator).await
        } else {
            Err(DbError::UnsupportedUrl(config.url.clone()))
        }
    }

    async fn connect_sqlite(config: &DbConfig, migrator: &Migrator) -> Result<Self, DbError> {
        let options = AnyConnectOptions::from_str(&config.url)?.disable_statement_logging();
        let setup = SQLITE_SETUP;
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
        migrator.run(&write).await?;
        let read = AnyPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    conn.execute(setup).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        tokio::spawn(checkpoint_in_background(read.clone()));
        let path = sqlx::sqlite::SqliteConnectOptions::from_str(&config.url)?.get_filename().to_owned();
        let readers = Arc::new(Readers {
            path,
            idle: std::sync::Mutex::default(),
            permits: Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1) as usize)),
        });
        Ok(Self { read, write, dialect: Dialect::Sqlite, turn: Arc::default(), readers: Some(readers) })
    }

    async fn connect_postgres(config: &DbConfig, migrator: &Migrator) -> Result<Self, DbError> {
        let schema = config.schema.clone();
        if !valid_schema(&schema) {
            return Err(DbError::InvalidSchema(schema));
        }
        let options = AnyConnectOptions::from_str(&config.url)?.disable_statement_logging();
        {
            let mut conn = sqlx::AnyConnection::connect_with(&options).await?;
            let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
            // Replicas starting together may race on the catalog; the loser
            // sees a unique violation and the schema exists either way.
            if let Err(e) = conn.execute(AssertSqlSafe(create)).await
                && !is_unique_violation(&e)
            {
                return Err(e.into());
            }
            conn.close().await?;
        }
        let set_path = format!("SET search_path TO {schema}");
        let pool = AnyPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                let set_path = set_path.clone();
                Box::pin(async move {
                    conn.execute(AssertSqlSafe(set_path)).await?;
                    // Every natter query is short. PostgreSQL compiles a plan
                    // with LLVM when its estimated cost passes
                    // `jit_above_cost`, and estimates over skewed chats (one of
                    // a million messages beside many small ones) pass it for
                    // queries that take a fraction of a millisecond: a page of
                    // ListChats summaries then spent ~10 ms compiling.
                    conn.execute("SET jit = off").await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        migrator.run(&pool).await?;
        Ok(Self { read: pool.clone(), write: pool, dialect: Dialect::Postgres, readers: None, turn: Arc::default() })
    }

    /// The pool for reads.
    pub fn read(&self) -> &AnyPool {
        &self.read
    }

    /// The pool for writes (begin transactions on it).
    pub fn write(&self) -> &AnyPool {
        &self.write
    }

    /// The engine behind this database.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// On SQLite, a connection of the caller's own to this database, beside
    /// the pools, for a hot path that should not hand every statement to
    /// sqlx's worker thread (the messages writer, chat activity). It has the
    /// pools' settings; `synchronous` is FULL unless the caller changes it.
    /// Its writes must hold [`Db::write_turn`] like every other write.
    /// None on PostgreSQL.
    ///
    /// Errors: the file cannot be opened.
    pub fn sqlite_connection(&self) -> Result<Option<rusqlite::Connection>, DbError> {
        let Some(readers) = &self.readers else { return Ok(None) };
        Ok(Some(open_sqlite(&readers.path, None)?))
    }

    /// On SQLite, a connection for a single hot committer (the messages
    /// writer): as [`Db::sqlite_connection`], but its WAL writes go through
    /// a VFS that hands each transaction's frames to the kernel in one write
    /// instead of two per frame (see `wal_vfs.rs`), which is safe only
    /// because `synchronous` is FULL (checked here) and stays so: the caller
    /// must not lower it. None on PostgreSQL.
    ///
    /// Errors: the VFS cannot be registered, the file cannot be opened, or
    /// the connection's `synchronous` is not FULL.
    pub fn sqlite_commit_connection(&self) -> Result<Option<rusqlite::Connection>, DbError> {
        let Some(readers) = &self.readers else { return Ok(None) };
        let vfs = wal_vfs::register().map_err(|code| DbError::WalVfs(format!("registration failed (code {code})")))?;
        let conn = open_sqlite(&readers.path, Some(vfs))?;
        // 2 = FULL: the VFS relies on the sync before SQLite publishes frames.
        let synchronous: i64 = conn.query_row("PRAGMA synchronous", [], |row| row.get(0))?;
        if synchronous < 2 {
            return Err(DbError::WalVfs(format!("needs synchronous = FULL (2), the connection has {synchronous}")));
        }
        Ok(Some(conn))
    }

    /// On SQLite, runs `read` on a read-only rusqlite connection of this
    /// crate's own (at most the read pool's size of them, kept for the next
    /// call) on tokio's blocking pool, and returns what it returned. One
    /// hand-off to a thread and one back per call, where a sqlx query hands
    /// every row across threads and copies every value: for hot read paths
    /// such as history pages. None on PostgreSQL (use the pools).
    ///
    /// Errors: a connection cannot be opened, `read` fails, or the runtime
    /// is shutting down. A panic in `read` is resumed here.
    pub async fn sqlite_read<T, F>(&self, read: F) -> Result<Option<T>, DbError>
    where
        F: FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let Some(readers) = self.readers.clone() else { return Ok(None) };
        // Held by the blocking task, so a caller that goes away early does
        // not free a connection still in use.
        let permit = readers.permits.clone().acquire_owned().await.map_err(|_| DbError::Cancelled)?;
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            readers.run(read)
        })
        .await;
        match result {
            Ok(out) => out.map(Some),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(DbError::Cancelled),
        }
    }

    /// On SQLite, the writers' turn: every write takes it for the length of
    /// its transaction, so the write pool and the connections of
    /// [`Db::sqlite_connection`] never meet SQLite's write lock at once and
    /// wait in arrival order (tokio's mutex is fair) rather than in SQLite's
    /// busy handler. None on PostgreSQL, which takes row locks itself.
    pub async fn write_turn(&self) -> Option<MutexGuard<'_, ()>> {
        match self.dialect {
            Dialect::Sqlite => Some(self.turn.lock().await),
            Dialect::Postgres => None,
        }
    }

    /// The lock behind [`Db::write_turn`], for a thread that takes it with
    /// `blocking_lock` (only on SQLite).
    pub fn write_turn_lock(&self) -> Arc<Mutex<()>> {
        self.turn.clone()
    }

    /// Closes both pools, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }
}

/// Settings of every SQLite connection: durable commits (synchronous=FULL
/// syncs the WAL on every commit), a wait instead of an error on a busy
/// file, enforced foreign keys, and a WAL file cut back to 64 MiB when it
/// starts over after a burst.
const SQLITE_SETUP: &str = "PRAGMA busy_timeout = 5000; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
                            PRAGMA journal_size_limit = 67108864;";

/// How often the WAL of a SQLite database is copied into the database file
/// in the background.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(50);

/// Checkpoints a SQLite database every [`CHECKPOINT_INTERVAL`] until `pool`
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
    let mut every = tokio::time::interval(CHECKPOINT_INTERVAL);
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
///
/// It also keeps every bound value for rusqlite ([`SqlBuilder::sqlite`]): a
/// hot read on SQLite can run the same SQL through [`Db::sqlite_read`]
/// (SQLite numbers `$N` by first appearance, which is the order here).
#[derive(Default)]
pub struct SqlBuilder {
    sql: String,
    args: sqlx::any::AnyArguments,
    values: Vec<rusqlite::types::Value>,
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
        T: for<'q> sqlx::Encode<'q, Any> + sqlx::Type<Any> + rusqlite::ToSql,
    {
        use sqlx::Arguments as _;
        self.count += 1;
        self.sql.push('$');
        self.sql.push_str(&self.count.to_string());
        match value.to_sql().map(owned) {
            Ok(Some(v)) => self.values.push(v),
            Ok(None) => {
                self.error.get_or_insert("a bound value rusqlite cannot hold as its own".into());
            }
            Err(e) => {
                self.error.get_or_insert(e.to_string());
            }
        }
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
        T: for<'q> sqlx::Encode<'q, Any> + sqlx::Type<Any> + rusqlite::ToSql,
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

    /// The SQL and its bound values, for rusqlite (a copy).
    ///
    /// Errors: a bound value could not be encoded (`sqlx::Error::Encode`,
    /// as running the query through sqlx would fail).
    pub fn sqlite(&self) -> Result<(String, Vec<rusqlite::types::Value>), sqlx::Error> {
        match &self.error {
            Some(e) => Err(sqlx::Error::Encode(e.clone().into())),
            None => Ok((self.sql.clone(), self.values.clone())),
        }
    }

    /// A query that returns no rows of interest.
    pub fn build(self) -> sqlx::query::Query<'static, Any, sqlx::any::AnyArguments> {
        sqlx::query_with(AssertSqlSafe(self.sql), self.args)
    }

    /// A query whose rows decode into `O`.
    pub fn build_as<O>(self) -> sqlx::query::QueryAs<'static, Any, O, sqlx::any::AnyArguments>
    where
        O: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow>,
    {
        sqlx::query_as_with(AssertSqlSafe(self.sql), self.args)
    }
}

/// A value rusqlite borrowed from a bound value, as its own; None for the
/// outputs that are not plain values (zeroblobs, arrays), which natter never
/// binds.
fn owned(v: rusqlite::types::ToSqlOutput<'_>) -> Option<rusqlite::types::Value> {
    use rusqlite::types::{ToSqlOutput, Value, ValueRef};
    match v {
        ToSqlOutput::Borrowed(r) => Some(match r {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(f) => Value::Real(f),
            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        }),
        ToSqlOutput::Owned(v) => Some(v),
        _ => None,
    }
}

/// True when the error is a unique-constraint violation (on either engine).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
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
        // The same SQL and values, in placeholder order, for rusqlite.
        use rusqlite::types::Value;
        let (sql, values) = q.sqlite().unwrap();
        assert_eq!(sql, q.sql());
        let expected = [Value::Integer(1), Value::Text("x".into()), Value::Text("y".into()), Value::Integer(2)];
        assert_eq!(values, expected);
        let mut nulls = SqlBuilder::new("SELECT ");
        nulls.bind(None::<i64>);
        assert_eq!(nulls.sqlite().unwrap().1, [Value::Null]);
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
        // The rusqlite readers see what the pools committed, and only read.
        let read = db.sqlite_read(|c| c.query_row("SELECT n FROM t WHERE id = 'a'", [], |r| r.get::<_, i64>(0)));
        assert_eq!(read.await.unwrap(), Some(7));
        let write = db.sqlite_read(|c| c.execute("UPDATE t SET n = 9", []));
        assert!(matches!(write.await, Err(DbError::Sqlite(_))), "a reader must not write");
        db.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

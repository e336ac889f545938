//! PostgreSQL through sqlx's native `Postgres` driver, for a store native to
//! it: one pool whose connections work in the store's own schema, with
//! timeouts that give a stuck statement's connection and locks back, and
//! migrations run on a connection of their own that no statement timeout
//! cuts.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions as _, Connection, Executor as _, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::{AppliedMigration, DbError, PoolSettings, valid_schema};

/// PostgreSQL's `idle_in_transaction_session_timeout` on every connection:
/// a session left in an open transaction with nothing running for this long
/// is ended, and the locks it holds with it. No natter call keeps a
/// transaction open between its statements for more than the time of a
/// call (at most the 30 s request timeout), so a session idle this long in
/// one belongs to a process that hung or lost its way, and would otherwise
/// hold a chat's row lock until someone killed it. Fixed rather than a
/// flag: it is a safety net above every call's deadline, not a knob.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Opens a pool of up to `settings.max_connections` to `url` whose
/// connections start with `session_setup` for `schema` (created if
/// missing), after running `migrator` in it (see `migrate`).
///
/// A database the URL names that does not exist is created (see
/// `create_database`). A connection given back owing answers it does not
/// get in time is closed (`settle_owed`).
///
/// Errors: an invalid schema name ([`valid_schema`]), the server is
/// unreachable, the database is missing and cannot be created
/// ([`DbError::MissingDatabase`]), or a migration fails (one that waited
/// `settings.lock_timeout` for a table's lock among them).
pub async fn connect(url: &str, schema: &str, settings: &PoolSettings, migrator: &Migrator) -> Result<PgPool, DbError> {
    migrate_schema(url, schema, settings, migrator).await?;
    let options: PgConnectOptions = url.parse::<PgConnectOptions>()?.disable_statement_logging();
    let setup = session_setup(schema, settings);
    let owed_limit = settings.unresponsive_after();
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections.max(1))
        .acquire_timeout(settings.acquire_timeout)
        .after_connect(move |conn, _| {
            let setup = setup.clone();
            Box::pin(async move {
                conn.execute(AssertSqlSafe(setup)).await?;
                Ok(())
            })
        })
        .after_release(move |conn, _| Box::pin(settle_owed(conn, owed_limit)))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Creates `schema` on `url` if missing (and the database, see
/// `create_database`) and runs `migrator` in it as `migrate` says: on a
/// connection of its own, under sqlx's migration lock, with
/// `settings.lock_timeout` on the migrations' statements. Returns the
/// migrations it applied, in version order (empty: up to date).
///
/// Errors: as [`connect`].
pub async fn migrate_schema(
    url: &str,
    schema: &str,
    settings: &PoolSettings,
    migrator: &Migrator,
) -> Result<Vec<AppliedMigration>, DbError> {
    let options: PgConnectOptions = url.parse::<PgConnectOptions>()?.disable_statement_logging();
    create_schema(&options, schema).await?;
    migrate(&options, schema, settings, migrator).await
}

/// The statements (one batch) every pooled connection of a store in
/// `schema` starts with:
/// - its `search_path`;
/// - PostgreSQL's JIT off. Every natter query is short; the JIT compiles a
///   plan with LLVM once its estimated cost passes `jit_above_cost`, and
///   estimates over skewed chats (one of a million messages beside many
///   small ones) pass it for queries that take a fraction of a millisecond
///   (a page of ListChats summaries spent ~10 ms compiling);
/// - `statement_timeout` and `lock_timeout` from `settings`, so a runaway
///   statement or one stuck behind a lock fails (UNAVAILABLE) before the
///   call's deadline and frees its connection;
/// - `idle_in_transaction_session_timeout` ([`IDLE_IN_TRANSACTION_TIMEOUT`]).
pub(crate) fn session_setup(schema: &str, settings: &PoolSettings) -> String {
    format!(
        "SET search_path TO {schema}; SET jit = off; SET statement_timeout = {}; SET lock_timeout = {}; \
         SET idle_in_transaction_session_timeout = {}",
        millis(settings.statement_timeout),
        millis(settings.lock_timeout),
        millis(IDLE_IN_TRANSACTION_TIMEOUT),
    )
}

/// What a PostgreSQL pool of natter's does with a connection a call gives
/// back, before sqlx's own check of it (a ping, with no time limit): it
/// waits at most `limit` for what the connection still owes, the answers
/// to a statement of a call that was dropped before they came (its
/// deadline passed, its client went away) and the rollback its dropped
/// transaction queued. Answers `Ok(true)` (keep it) once they came, at
/// once when nothing is owed (the usual case: no round trip); `Ok(false)`
/// (close it, freeing its place in the pool) when they did not come in
/// time; an error of the connection's as it is (sqlx closes it).
///
/// Without it, a connection whose server vanished without closing it (a
/// failover, a host crash, a firewall that dropped the flow) kept its
/// place in the pool for as long as the kernel retransmits, about 15
/// minutes, and a pool whose every place was so held answered nothing
/// but UNAVAILABLE long after the new server was up. `limit` is
/// [`PoolSettings::unresponsive_after`], longer than a live server takes
/// to end any statement (its `statement_timeout` cuts it).
///
/// sqlx's `Connection::flush` waits for the owed answers (its pool calls it
/// for the same purpose); it is hidden from sqlx's docs, so a sqlx upgrade
/// must keep `a_connection_whose_server_went_silent_gives_its_place_back`
/// passing.
pub(crate) async fn settle_owed<C: Connection>(conn: &mut C, limit: Duration) -> Result<bool, sqlx::Error> {
    match tokio::time::timeout(limit, conn.flush()).await {
        Ok(answered) => answered.map(|()| true),
        Err(_) => {
            tracing::warn!(?limit, "a connection given back owed answers the database never sent; closing it");
            Ok(false)
        }
    }
}

/// `d` in whole milliseconds (PostgreSQL's unit for its timeouts), rounded
/// up and at least 1: PostgreSQL reads 0 as no timeout at all.
fn millis(d: Duration) -> u128 {
    d.as_micros().div_ceil(1000).max(1)
}

/// Runs `migrator` in `schema`, on a connection of its own that is closed
/// afterwards, and as sqlx's migrator would apart from its timeouts:
///
/// - No `statement_timeout`: a backfill or an index build must be able to
///   finish, however long it takes.
/// - Replicas starting together take turns on the advisory lock sqlx's
///   migrator takes (the same key, so releases that let sqlx take it still
///   take turns with this one), with no `lock_timeout` while they wait: it
///   cuts advisory lock waits too (55P03), and a replica waits for another
///   one's migrations as long as they take.
/// - Then `settings.lock_timeout` on the migrations' statements: one that
///   waits for a table's lock (an ALTER TABLE behind a long transaction)
///   fails after it instead of queueing every query of the table behind
///   its own wait, the classic migration outage. The process then fails to
///   start, and its restart tries again.
///
/// Returns the migrations it applied.
///
/// Errors: the server refused, or a migration failed.
async fn migrate(
    options: &PgConnectOptions,
    schema: &str,
    settings: &PoolSettings,
    migrator: &Migrator,
) -> Result<Vec<AppliedMigration>, DbError> {
    let mut conn = PgConnection::connect_with(options).await?;
    let migrated = migrate_on(&mut conn, schema, settings, migrator).await;
    // Ending the session releases the advisory lock, even after a migration
    // failed halfway; an error closing it changes nothing of the outcome.
    let _ = conn.close().await;
    migrated
}

async fn migrate_on(
    conn: &mut PgConnection,
    schema: &str,
    settings: &PoolSettings,
    migrator: &Migrator,
) -> Result<Vec<AppliedMigration>, DbError> {
    conn.execute(AssertSqlSafe(session_setup(schema, settings))).await?;
    conn.execute("SET statement_timeout = 0; SET lock_timeout = 0").await?;
    let database: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&mut *conn).await?;
    let key = migration_lock_key(&database);
    advisory_lock(conn, key, schema, "migrations").await?;
    conn.execute(AssertSqlSafe(format!("SET lock_timeout = {}", millis(settings.lock_timeout)))).await?;
    let applied = crate::run_migrations(migrator, conn).await?;
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(key).execute(&mut *conn).await?;
    Ok(applied)
}

/// Takes the session-level advisory lock `key` on `conn`, waiting as long
/// as another session holds it (`conn`'s `lock_timeout` must be 0: it cuts
/// advisory lock waits too), and logs once that it waits for another
/// process's `work` in `schema`.
async fn advisory_lock(conn: &mut PgConnection, key: i64, schema: &str, work: &str) -> Result<(), sqlx::Error> {
    let (locked,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut *conn).await?;
    if !locked {
        tracing::info!(%schema, "waiting for another process's {work}");
        sqlx::query("SELECT pg_advisory_lock($1)").bind(key).execute(&mut *conn).await?;
    }
    Ok(())
}

/// A session-level advisory lock on a connection of its own that keeps a
/// store's backfills to one process at a time: replicas starting together,
/// or `natter migrate` and a replica, would otherwise run the same one-off
/// rewrite at once. Its key is `backfill_lock_key` of the store's schema
/// (advisory locks are the database's: other databases do not share it).
/// Held until [`BackfillLock::release`], or until the connection ends (the
/// process exits or the guard is dropped), which frees it too.
#[derive(Debug)]
pub struct BackfillLock {
    conn: PgConnection,
    key: i64,
}

impl BackfillLock {
    /// Takes the backfill lock of `schema` on `url`, waiting for as long as
    /// another process holds it (no `lock_timeout`: its backfill may take
    /// long, and this one then finds it done).
    ///
    /// Errors: the URL does not parse, or the server refused.
    pub async fn take(url: &str, schema: &str) -> Result<Self, DbError> {
        let options: PgConnectOptions = url.parse::<PgConnectOptions>()?.disable_statement_logging();
        let mut conn = PgConnection::connect_with(&options).await?;
        conn.execute("SET statement_timeout = 0; SET lock_timeout = 0").await?;
        let key = backfill_lock_key(schema);
        advisory_lock(&mut conn, key, schema, "backfills").await?;
        Ok(Self { conn, key })
    }

    /// Releases the lock and closes its connection. A failure is only
    /// logged: the connection's end frees the lock anyway.
    pub async fn release(mut self) {
        if let Err(e) = sqlx::query("SELECT pg_advisory_unlock($1)").bind(self.key).execute(&mut self.conn).await {
            tracing::warn!(error = %e, "releasing the backfill lock failed; closing its connection frees it");
        }
        let _ = self.conn.close().await;
    }
}

/// Keeps a natter process without NATS alone on its stores: a
/// session-level advisory lock per store schema, held exclusively on a
/// connection of its own for as long as the process runs.
///
/// A process without NATS keeps exact caches (tokens, memberships) that
/// only its own writes evict, and its streams hear of no other process's
/// changes: a second process on the same stores, with NATS or without,
/// would have it serve stale answers (a removed member keeps reading).
/// Processes on NATS evict each other's caches; one only checks at
/// start-up that no process without NATS holds its stores (taking the
/// lock shared for a moment), and holds nothing, so that replicas cost no
/// connection for it. (So a process without NATS started beside running
/// processes on NATS is not caught.) A process that is refused does not
/// start ([`DbError::InUse`]). The lock goes with its session: when the
/// process exits, or its connection ends (PostgreSQL ends a session whose
/// client vanished after about a minute of unanswered keepalives, set
/// here, rather than the server's default of hours).
///
/// A session can also end under a running process (a failover or restart
/// of PostgreSQL, `idle_session_timeout`, `pg_terminate_backend`, a network
/// cut), and the lock with it, silently. So a task watches the lock's
/// connection, one round trip every [`INSTANCE_LOCK_CHECK_INTERVAL`]; when
/// the session is gone it takes the lock again on a new connection,
/// retrying at that interval for as long as the server is out of reach.
/// If another process took the lock meanwhile, this one is no longer alone
/// on its stores, and one of the two must go: this one logs an error and
/// cancels the shutdown token it was given (it drains its calls and
/// stops), and [`InstanceLock::release`] answers [`DbError::InstanceLost`],
/// which the process exits with, non-zero. An orchestrator restarts it,
/// and the restart's claim is refused ([`DbError::InUse`], saying why) for
/// as long as the other one runs. Serving on beside the other would serve
/// stale answers until someone noticed; stopping says so at once. The
/// lock's loss shows at the next check: for that long, and until the
/// other's start-up is done, both may serve.
#[derive(Debug)]
pub struct InstanceLock {
    /// Sent (or dropped) to have the watcher release the lock and end.
    stop: tokio::sync::oneshot::Sender<()>,
    /// The task that owns the lock's connection and watches it; it answers
    /// the schema whose lock another process took, if one did.
    watcher: tokio::task::JoinHandle<Option<String>>,
}

/// How often the connection of an [`InstanceLock`] is checked (one round
/// trip) and, once its session ended, a new one tries to take the lock
/// again: it bounds how long another process can run on the stores before
/// this one notices. Fixed rather than a flag: a round trip a second is
/// nothing to a server, and a longer gap helps no one.
pub const INSTANCE_LOCK_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long a check of an [`InstanceLock`]'s connection waits for its
/// answer before taking the session for gone (a server that vanished
/// without closing the connection): far above what a live server takes to
/// answer a ping, however loaded.
const INSTANCE_LOCK_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The `application_name` of an [`InstanceLock`]'s connection, which
/// names it in `pg_stat_activity`.
pub const INSTANCE_LOCK_APPLICATION: &str = "natter instance lock";

impl InstanceLock {
    /// Claims `schemas` on `url` for this process, without waiting: if
    /// `alone` (no NATS), takes their lock exclusively and holds it (the
    /// lock is returned), watched as the type's docs say: `shutdown` is
    /// cancelled if another process takes it; else checks that no process
    /// without NATS holds any of them (`None`).
    ///
    /// A database the URL names that the server does not have is created
    /// (as [`connect`] does; the claim comes first at start-up).
    ///
    /// Errors: [`DbError::InUse`] naming the first schema another process
    /// holds incompatibly (then none is held), the URL does not parse, the
    /// server refused, or the database is missing and cannot be created
    /// ([`DbError::MissingDatabase`]).
    pub async fn claim(
        url: &str,
        schemas: &[String],
        alone: bool,
        shutdown: &CancellationToken,
    ) -> Result<Option<Self>, DbError> {
        Self::claim_checking(url, schemas, alone, shutdown, INSTANCE_LOCK_CHECK_INTERVAL).await
    }

    /// As [`InstanceLock::claim`], the lock's connection checked `every`.
    async fn claim_checking(
        url: &str,
        schemas: &[String],
        alone: bool,
        shutdown: &CancellationToken,
        every: Duration,
    ) -> Result<Option<Self>, DbError> {
        let options: PgConnectOptions =
            url.parse::<PgConnectOptions>()?.disable_statement_logging().application_name(INSTANCE_LOCK_APPLICATION);
        // Claimed before the stores open, which create a database the
        // server does not have yet (a fresh server): so does this.
        let mut conn = connect_creating(&options).await?;
        conn.execute(INSTANCE_LOCK_SESSION).await?;
        if let Some(refused) = take_instance_locks(&mut conn, schemas, alone).await? {
            // Closing the session releases the locks taken so far.
            let _ = conn.close().await;
            return Err(DbError::InUse { schema: refused, alone });
        }
        if !alone {
            release_instance_locks(conn).await;
            return Ok(None);
        }
        let session = this_session(&mut conn).await?;
        let watched = Watched { options, schemas: schemas.to_vec(), every, shutdown: shutdown.clone() };
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let watcher = tokio::spawn(watch_instance_lock(conn, session, watched, stopped));
        Ok(Some(Self { stop, watcher }))
    }

    /// Releases the locks and closes their connection (at shutdown, once
    /// the stores are closed). A failure to release is only logged: the
    /// session's end frees them anyway.
    ///
    /// Errors: [`DbError::InstanceLost`] when the lock was lost to another
    /// process while this one ran (its shutdown token was cancelled then),
    /// so that the process exits non-zero.
    pub async fn release(self) -> Result<(), DbError> {
        let _ = self.stop.send(());
        match self.watcher.await {
            Ok(None) => Ok(()),
            Ok(Some(schema)) => Err(DbError::InstanceLost { schema }),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down: the task and its connection
            // are gone, and the lock with them.
            Err(_) => Ok(()),
        }
    }

    /// The process id of the PostgreSQL backend whose session holds the
    /// instance lock of `schema` on `url` exclusively (a process without
    /// NATS serves it), if one does: for an operator's question "who holds
    /// my stores?" and for tests.
    ///
    /// Errors: the URL does not parse, or the server refused.
    pub async fn holder(url: &str, schema: &str) -> Result<Option<i32>, DbError> {
        let options: PgConnectOptions = url.parse::<PgConnectOptions>()?.disable_statement_logging();
        let mut conn = PgConnection::connect_with(&options).await?;
        let holder = instance_lock_holder(&mut conn, schema).await;
        let _ = conn.close().await;
        Ok(holder?.map(|session| session.pid))
    }
}

/// What every connection of an [`InstanceLock`] starts with: no timeouts
/// (it waits for nothing, and runs nothing long), and TCP keepalives that
/// have PostgreSQL end its session about a minute after this process
/// vanished, rather than the server's default of hours.
const INSTANCE_LOCK_SESSION: &str = "SET statement_timeout = 0; SET lock_timeout = 0; SET tcp_keepalives_idle = 30; \
                                     SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3";

/// Takes the instance lock of each of `schemas` on `conn` without waiting,
/// exclusively if `alone`, else shared. Answers the first schema whose lock
/// was refused (the ones before stay taken: close the connection), None
/// when all were taken.
///
/// Errors: the server refused.
async fn take_instance_locks(
    conn: &mut PgConnection,
    schemas: &[String],
    alone: bool,
) -> Result<Option<String>, sqlx::Error> {
    let take = if alone { "SELECT pg_try_advisory_lock($1)" } else { "SELECT pg_try_advisory_lock_shared($1)" };
    for schema in schemas {
        let (locked,): (bool,) = sqlx::query_as(take).bind(instance_lock_key(schema)).fetch_one(&mut *conn).await?;
        if !locked {
            return Ok(Some(schema.clone()));
        }
    }
    Ok(None)
}

/// Releases every lock `conn` holds, then closes it.
async fn release_instance_locks(mut conn: PgConnection) {
    // Released before the session ends (which frees them too, but after
    // the close returns): a process started right after this one stopped
    // finds them free.
    if let Err(e) = conn.execute("SELECT pg_advisory_unlock_all()").await {
        tracing::warn!(error = %e, "releasing the instance lock failed; its session's end frees it");
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the instance lock's connection failed; its session's end frees it");
    }
}

/// A PostgreSQL session: its backend's process id and when it started
/// (None where this role may not see it), which together name it, as the
/// server may give the id of a session that ended to a later one.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
struct Session {
    pid: i32,
    start: Option<String>,
}

/// `conn`'s session.
async fn this_session(conn: &mut PgConnection) -> Result<Session, sqlx::Error> {
    sqlx::query_as("SELECT pid, backend_start::text AS start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        .fetch_one(conn)
        .await
}

/// The session holding the instance lock of `schema` exclusively, from
/// `pg_locks`, where a lock on a bigint key shows its high half as
/// `classid`, its low half as `objid`, and 1 as `objsubid`.
async fn instance_lock_holder(conn: &mut PgConnection, schema: &str) -> Result<Option<Session>, sqlx::Error> {
    let key = instance_lock_key(schema);
    sqlx::query_as(
        "SELECT l.pid, a.backend_start::text AS start FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.mode = 'ExclusiveLock' AND l.objsubid = 1 \
         AND l.classid::bigint = $1 AND l.objid::bigint = $2 \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(key >> 32)
    .bind(key & 0xffff_ffff)
    .fetch_optional(conn)
    .await
}

/// What the watcher of an [`InstanceLock`] needs to take it again.
struct Watched {
    options: PgConnectOptions,
    schemas: Vec<String>,
    every: Duration,
    shutdown: CancellationToken,
}

/// The watcher of an [`InstanceLock`] held on `conn` (`session`): checks
/// the connection every `watched.every`, and takes the lock again on a new
/// one once its session ended ([`retake_instance_locks`]), until `stop`
/// says (or its sender is gone): then releases it. Answers the schema
/// whose lock another process took meanwhile, after cancelling
/// `watched.shutdown`; None once released.
async fn watch_instance_lock(
    mut conn: PgConnection,
    mut session: Session,
    watched: Watched,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Option<String> {
    loop {
        tokio::select! {
            _ = &mut stop => {
                release_instance_locks(conn).await;
                return None;
            }
            () = tokio::time::sleep(watched.every) => {}
        }
        match tokio::time::timeout(INSTANCE_LOCK_CHECK_TIMEOUT, conn.ping()).await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the instance lock's database session ended; taking the lock again")
            }
            Err(_) => tracing::warn!(
                timeout = ?INSTANCE_LOCK_CHECK_TIMEOUT,
                "the instance lock's database session did not answer; taking the lock again on a new one"
            ),
        }
        match retake_instance_locks(&watched, &session, &mut stop).await {
            Retaken::Held(new, new_session) => {
                // The old connection is dropped: if its session is still
                // alive on the server, it ends as the socket closes.
                (conn, session) = (new, new_session);
                tracing::info!(schemas = ?watched.schemas, "the instance lock is held again");
            }
            Retaken::Stopped => return None,
            Retaken::Lost(schema) => {
                tracing::error!(
                    %schema,
                    "the instance lock's database session ended and another natter process took the lock meanwhile: \
                     it serves these stores now, and this process stops, as two processes on one store without \
                     NATS would serve stale answers"
                );
                watched.shutdown.cancel();
                return Some(schema);
            }
        }
    }
}

/// What taking an [`InstanceLock`] again came to.
enum Retaken {
    /// Held again on this connection, of this session.
    Held(PgConnection, Session),
    /// Another process holds the lock of this schema.
    Lost(String),
    /// The lock was released (the process is stopping) before it was
    /// held again.
    Stopped,
}

/// Takes the locks of `watched.schemas` again, exclusively, on a new
/// connection, every `watched.every` until it is held or another process
/// is found holding one, or `stop` says. A lock still held by the old
/// session, `old` (the server has not yet noticed that its client went),
/// is waited for: the server ends that session and frees it.
async fn retake_instance_locks(
    watched: &Watched,
    old: &Session,
    stop: &mut tokio::sync::oneshot::Receiver<()>,
) -> Retaken {
    loop {
        match retake_once(watched).await {
            Ok(Attempt::Held(conn, session)) => return Retaken::Held(conn, session),
            Ok(Attempt::Refused(schema, Some(holder))) if &holder == old => {
                tracing::info!(%schema, pid = old.pid, "waiting for the server to end the instance lock's old session");
            }
            // Released between the try and the look at its holder: again.
            Ok(Attempt::Refused(_, None)) => {}
            Ok(Attempt::Refused(schema, _)) => return Retaken::Lost(schema),
            Err(e) => tracing::warn!(error = %e, "taking the instance lock again failed; retrying"),
        }
        tokio::select! {
            _ = &mut *stop => return Retaken::Stopped,
            () = tokio::time::sleep(watched.every) => {}
        }
    }
}

/// What one try of [`retake_instance_locks`] came to.
enum Attempt {
    /// Held on this new connection, of this session.
    Held(PgConnection, Session),
    /// The lock of this schema is held by this session (None: released
    /// meanwhile).
    Refused(String, Option<Session>),
}

/// One try of [`retake_instance_locks`].
///
/// Errors: the server is out of reach or refused.
async fn retake_once(watched: &Watched) -> Result<Attempt, sqlx::Error> {
    let mut conn = PgConnection::connect_with(&watched.options).await?;
    conn.execute(INSTANCE_LOCK_SESSION).await?;
    match take_instance_locks(&mut conn, &watched.schemas, true).await? {
        None => {
            let session = this_session(&mut conn).await?;
            Ok(Attempt::Held(conn, session))
        }
        Some(schema) => {
            let holder = instance_lock_holder(&mut conn, &schema).await?;
            let _ = conn.close().await;
            Ok(Attempt::Refused(schema, holder))
        }
    }
}

/// The key of [`InstanceLock`] for `schema`: "nins" (natter instances) in
/// the high 32 bits, the CRC-32 (ISO-HDLC) of the schema's name in the low
/// ones. In `pg_locks` the high half shows as `classid`, the low one as
/// `objid` (with `objsubid` 1).
pub fn instance_lock_key(schema: &str) -> i64 {
    const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    (i64::from(u32::from_be_bytes(*b"nins")) << 32) | i64::from(CRC.checksum(schema.as_bytes()))
}

/// The key of [`BackfillLock`] for `schema`: "nbfl" (natter backfills) in
/// the high 32 bits, the CRC-32 (ISO-HDLC) of the schema's name in the low
/// ones.
fn backfill_lock_key(schema: &str) -> i64 {
    const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    (i64::from(u32::from_be_bytes(*b"nbfl")) << 32) | i64::from(CRC.checksum(schema.as_bytes()))
}

/// The key of the advisory lock sqlx's PostgreSQL migrator takes on
/// `database` (sqlx-postgres' `generate_lock_id`): 0x3d32ad9e times the
/// CRC-32 (ISO-HDLC) of its name. One for the whole database, so the
/// services' migrations take turns with each other too.
fn migration_lock_key(database: &str) -> i64 {
    const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    0x3d32_ad9e * i64::from(CRC.checksum(database.as_bytes()))
}

/// Creates `schema` unless it exists. Replicas starting together may race
/// on the catalog: the loser sees a unique violation, and the schema exists
/// either way.
///
/// Errors: an invalid schema name ([`valid_schema`]), or the server refused.
pub(crate) async fn create_schema(options: &PgConnectOptions, schema: &str) -> Result<(), DbError> {
    if !valid_schema(schema) {
        return Err(DbError::InvalidSchema(schema.to_owned()));
    }
    let mut conn = connect_creating(options).await?;
    let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    if let Err(e) = conn.execute(AssertSqlSafe(create)).await
        && !crate::is_unique_violation(&e)
    {
        return Err(e.into());
    }
    conn.close().await?;
    Ok(())
}

/// A connection to the database `options` name, created first if the
/// server does not have it ([`create_database`]).
///
/// Errors: the server refused, or the database is missing and cannot be
/// created ([`DbError::MissingDatabase`]).
async fn connect_creating(options: &PgConnectOptions) -> Result<PgConnection, DbError> {
    match PgConnection::connect_with(options).await {
        Err(e) if is_missing_database(&e) => {
            create_database(options).await?;
            Ok(PgConnection::connect_with(options).await?)
        }
        connected => Ok(connected?),
    }
}

/// Whether `e` says the database the URL names does not exist (SQLSTATE
/// 3D000, invalid_catalog_name).
fn is_missing_database(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("3D000"))
}

/// Creates the database `options` name, connected to the server's
/// `postgres` database as the same user: the README's split-mode block
/// names a `natter` database a fresh server does not have. Replicas
/// starting together race: a loser sees duplicate_database (42P04) or, when
/// the winner's row is not committed yet as it checks, a unique violation
/// on `pg_database` (23505); either way the database exists, and neither is
/// an error.
///
/// Errors: the user may not create databases (or the server refused):
/// [`DbError::MissingDatabase`], which says to create it by hand.
async fn create_database(options: &PgConnectOptions) -> Result<(), DbError> {
    let name = options.get_database().unwrap_or_default().to_owned();
    let missing = |reason: String| DbError::MissingDatabase { name: name.clone(), reason };
    let mut conn = sqlx::PgConnection::connect_with(&options.clone().database("postgres"))
        .await
        .map_err(|e| missing(e.to_string()))?;
    let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match conn.execute(AssertSqlSafe(create)).await {
        Ok(_) => tracing::info!(database = %name, "created the database"),
        Err(sqlx::Error::Database(d)) if matches!(d.code().as_deref(), Some("42P04" | "23505")) => {}
        Err(e) => return Err(missing(e.to_string())),
    }
    conn.close().await?;
    Ok(())
}

/// Drops `schema` and everything in it (for tests that made one of their
/// own).
///
/// Errors: an invalid schema name, or the server refused.
pub async fn drop_schema(url: &str, schema: &str) -> Result<(), DbError> {
    if !valid_schema(schema) {
        return Err(DbError::InvalidSchema(schema.to_owned()));
    }
    let mut conn = sqlx::PgConnection::connect(url).await?;
    conn.execute(AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))).await?;
    conn.close().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of one connection, with the default timeouts.
    fn one() -> PoolSettings {
        PoolSettings { max_connections: 1, ..PoolSettings::default() }
    }

    /// A TCP relay to `target` that can freeze: the connections it carries
    /// then forward nothing either way but stay open, which is how a server
    /// that vanished without a word (a failover, a host crash, a dropped
    /// flow) looks to its clients. Connections opened after that are
    /// carried on: the server that took its place.
    async fn freezing_relay(target: std::net::SocketAddr) -> (u16, tokio::sync::watch::Sender<bool>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (freeze, frozen) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut frozen = frozen.clone();
                frozen.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = frozen.changed() => std::future::pending::<()>().await,
                    }
                });
            }
        });
        (port, freeze)
    }

    /// A call whose statement the server never answers (it went silent
    /// under the call) gives up at its deadline; the connection it gives
    /// back is closed within the pool's `unresponsive_after` instead of
    /// holding the pool's one place for the 15 minutes the kernel
    /// retransmits, so the next call reaches the server that took its
    /// place. Both pools natter opens on PostgreSQL: a store's own
    /// ([`connect`]) and [`crate::Db`]'s.
    #[tokio::test]
    async fn a_connection_whose_server_went_silent_gives_its_place_back() {
        let Some(url) = crate::testing::postgres_url() else { return };
        let options: PgConnectOptions = url.parse().unwrap();
        let target = tokio::net::lookup_host((options.get_host(), options.get_port())).await.unwrap().next().unwrap();
        let (port, freeze) = freezing_relay(target).await;
        let via = options.clone().host("127.0.0.1").port(port).to_url_lossy().to_string();
        let settings = PoolSettings {
            max_connections: 1,
            acquire_timeout: Duration::from_millis(300),
            statement_timeout: Duration::from_millis(200),
            lock_timeout: Duration::from_millis(100),
        };
        let schema = crate::testing::unique_schema("silent");
        let store = connect(&via, &schema, &settings, &Migrator::DEFAULT).await.unwrap();
        let config = crate::DbConfig { pool: settings, ..crate::DbConfig::postgres(&via, &schema) };
        let db = crate::Db::connect(&config, &Migrator::DEFAULT).await.unwrap();
        let mut held = store.acquire().await.unwrap();
        let mut held_any = db.write().acquire().await.unwrap();
        freeze.send(true).unwrap();
        let deadline = Duration::from_millis(500);
        let unanswered = tokio::time::timeout(deadline, sqlx::query("SELECT 1").execute(&mut *held)).await;
        assert!(unanswered.is_err(), "the silent server answered: {unanswered:?}");
        let unanswered = tokio::time::timeout(deadline, sqlx::query("SELECT 1").execute(&mut *held_any)).await;
        assert!(unanswered.is_err(), "the silent server answered: {unanswered:?}");
        drop((held, held_any));
        let recovered = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match sqlx::query("SELECT 1").execute(&store).await {
                    Ok(_) => break,
                    Err(e) => assert!(matches!(e, sqlx::Error::PoolTimedOut), "{e}"),
                }
            }
            loop {
                match sqlx::query("SELECT 1").execute(db.write()).await {
                    Ok(_) => break,
                    Err(e) => assert!(matches!(e, sqlx::Error::PoolTimedOut), "{e}"),
                }
            }
        })
        .await;
        assert!(recovered.is_ok(), "the pools' one place is still held by the connection to the silent server");
        drop_schema(&url, &schema).await.unwrap();
    }

    /// A process's claim on its stores, the first thing it does on a
    /// fresh server whose database the URL names but the server does not
    /// have yet (the README's split-mode block): the claim creates it, with
    /// NATS or without, where it failed "database ... does not exist" and
    /// the process did not start.
    #[tokio::test]
    async fn an_instance_claim_on_a_missing_database_creates_it() {
        let Some(url) = crate::testing::postgres_url() else { return };
        let schemas = [crate::testing::unique_schema("chats")];
        let mut dropped = Vec::new();
        for alone in [true, false] {
            let name = crate::testing::unique_schema("db");
            let options: PgConnectOptions = url.parse::<PgConnectOptions>().unwrap().database(&name);
            let url = options.to_url_lossy().to_string();
            match InstanceLock::claim(&url, &schemas, alone, &CancellationToken::new()).await {
                Ok(Some(lock)) if alone => lock.release().await.unwrap(),
                Ok(None) if !alone => {}
                other => panic!("alone {alone}: the claim on a missing database: {other:?}"),
            }
            dropped.push(options);
        }
        for options in dropped {
            let name = options.get_database().unwrap().to_owned();
            let mut admin = sqlx::PgConnection::connect_with(&options.database("postgres")).await.unwrap();
            admin.execute(AssertSqlSafe(format!("DROP DATABASE \"{name}\" WITH (FORCE)"))).await.unwrap();
        }
    }

    /// A URL naming a database the server does not have yet: natter creates
    /// it (the README's split-mode block needs no `createdb`), and a second
    /// start finds it.
    #[tokio::test]
    async fn a_missing_database_is_created() {
        let Some(url) = crate::testing::postgres_url() else { return };
        let name = crate::testing::unique_schema("db");
        let options: PgConnectOptions = url.parse::<PgConnectOptions>().unwrap().database(&name);
        let (migrator, url) = (Migrator::DEFAULT, options.to_url_lossy());
        let pool = connect(url.as_ref(), "natter_test", &one(), &migrator).await.unwrap();
        let (current,): (String,) = sqlx::query_as("SELECT current_database()").fetch_one(&pool).await.unwrap();
        assert_eq!(current, name);
        pool.close().await;
        let again = connect(url.as_ref(), "natter_test", &one(), &migrator).await.unwrap();
        again.close().await;
        let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres")).await.unwrap();
        admin.execute(AssertSqlSafe(format!("DROP DATABASE \"{name}\" WITH (FORCE)"))).await.unwrap();
    }

    /// Replicas of a service started together on a fresh server (the
    /// README's split-mode block, a Kubernetes rollout) all find the
    /// database missing and all create it: every one of them starts.
    #[tokio::test]
    async fn replicas_starting_together_all_create_the_missing_database() {
        let Some(url) = crate::testing::postgres_url() else { return };
        let name = crate::testing::unique_schema("db");
        let options: PgConnectOptions = url.parse::<PgConnectOptions>().unwrap().database(&name);
        let url = options.to_url_lossy().to_string();
        let mut replicas = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let url = url.clone();
            replicas.spawn(async move { connect(&url, "natter_test", &one(), &Migrator::DEFAULT).await });
        }
        let started = replicas.join_all().await;
        let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres")).await.unwrap();
        for pool in started.iter().flatten() {
            pool.close().await;
        }
        admin.execute(AssertSqlSafe(format!("DROP DATABASE \"{name}\" WITH (FORCE)"))).await.unwrap();
        let failed: Vec<String> = started.into_iter().filter_map(Result::err).map(|e| e.to_string()).collect();
        assert!(failed.is_empty(), "{failed:?}");
    }

    /// A schema of the test's own on `NATTER_TEST_DATABASE_URL`, dropped by
    /// [`Fresh::drop`]; None without the variable.
    struct Fresh {
        url: String,
        schema: String,
    }

    impl Fresh {
        fn new(name: &str) -> Option<Self> {
            let url = crate::testing::postgres_url()?;
            Some(Self { url, schema: crate::testing::unique_schema(name) })
        }

        async fn connect(&self, settings: PoolSettings, migrator: &Migrator) -> Result<PgPool, DbError> {
            connect(&self.url, &self.schema, &settings, migrator).await
        }

        async fn drop(self) {
            drop_schema(&self.url, &self.schema).await.unwrap();
        }
    }

    /// A migrator of `migrations` (version, SQL), numbered from 1.
    fn migrator(migrations: &[&'static str]) -> Migrator {
        use sqlx::migrate::{Migration, MigrationType};
        Migrator::with_migrations(
            (1..)
                .zip(migrations)
                .map(|(version, sql)| {
                    let sql = sqlx::SqlSafeStr::into_sql_str(*sql);
                    Migration::new(version, format!("m{version}").into(), MigrationType::Simple, sql, false)
                })
                .collect(),
        )
    }

    /// The SQLSTATE of a database error, for the messages of the asserts.
    fn sqlstate(e: &sqlx::Error) -> Option<String> {
        e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned())
    }

    /// How long a test waits for what should fail within a fraction of a
    /// second; without the timeouts it would wait for ever (or 30 s).
    const PATIENCE: Duration = Duration::from_secs(3);

    /// A runaway statement (pg_sleep standing for a bad plan) is cancelled
    /// at the statement timeout, and the call would answer UNAVAILABLE;
    /// the connection is good for the next statement.
    #[tokio::test]
    async fn a_statement_past_the_statement_timeout_is_cancelled_and_unavailable() {
        let Some(fresh) = Fresh::new("stmt") else { return };
        let settings = PoolSettings { statement_timeout: Duration::from_millis(200), ..one() };
        let pool = fresh.connect(settings, &Migrator::DEFAULT).await.unwrap();
        let slow = tokio::time::timeout(PATIENCE, sqlx::query("SELECT pg_sleep(10)").execute(&pool))
            .await
            .expect("cancelled at the statement timeout")
            .unwrap_err();
        assert_eq!(sqlstate(&slow).as_deref(), Some("57014"), "{slow}");
        assert_eq!(crate::Failure::of_sqlx(&slow), crate::Failure::Unavailable, "{slow}");
        let (one,): (i32,) = sqlx::query_as("SELECT 1").fetch_one(&pool).await.unwrap();
        assert_eq!(one, 1);
        pool.close().await;
        fresh.drop().await;
    }

    /// A statement waiting for a row another transaction holds locked (a
    /// chat's head, say) gives up at the lock timeout, UNAVAILABLE, instead
    /// of holding its connection until the other one ends.
    #[tokio::test]
    async fn a_statement_waiting_for_a_row_lock_fails_at_the_lock_timeout_unavailable() {
        let Some(fresh) = Fresh::new("lock") else { return };
        let settings = PoolSettings { max_connections: 2, lock_timeout: Duration::from_millis(200), ..one() };
        let pool =
            fresh.connect(settings, &migrator(&["CREATE TABLE heads (id INT PRIMARY KEY, seq INT)"])).await.unwrap();
        sqlx::query("INSERT INTO heads VALUES (1, 0)").execute(&pool).await.unwrap();
        let mut holder = pool.begin().await.unwrap();
        sqlx::query("SELECT seq FROM heads WHERE id = 1 FOR UPDATE").execute(&mut *holder).await.unwrap();
        let waited =
            tokio::time::timeout(PATIENCE, sqlx::query("UPDATE heads SET seq = seq + 1 WHERE id = 1").execute(&pool))
                .await
                .expect("given up at the lock timeout")
                .unwrap_err();
        assert_eq!(sqlstate(&waited).as_deref(), Some("55P03"), "{waited}");
        assert_eq!(crate::Failure::of_sqlx(&waited), crate::Failure::Unavailable, "{waited}");
        holder.rollback().await.unwrap();
        sqlx::query("UPDATE heads SET seq = seq + 1 WHERE id = 1")
            .execute(&pool)
            .await
            .expect("the lock is free again");
        pool.close().await;
        fresh.drop().await;
    }

    /// With every connection of the pool in use, a call waiting for one
    /// gives up at the acquire timeout, UNAVAILABLE.
    #[tokio::test]
    async fn a_call_waiting_for_a_busy_pool_fails_at_the_acquire_timeout_unavailable() {
        let Some(fresh) = Fresh::new("acquire") else { return };
        let settings = PoolSettings { acquire_timeout: Duration::from_millis(200), ..one() };
        let pool = fresh.connect(settings, &Migrator::DEFAULT).await.unwrap();
        let held = pool.acquire().await.unwrap();
        let waited =
            tokio::time::timeout(PATIENCE, pool.acquire()).await.expect("given up at the acquire timeout").unwrap_err();
        assert!(matches!(waited, sqlx::Error::PoolTimedOut), "{waited}");
        assert_eq!(crate::Failure::of_sqlx(&waited), crate::Failure::Unavailable, "{waited}");
        drop(held);
        pool.close().await;
        fresh.drop().await;
    }

    /// A migration may run far longer than the statement timeout (an index
    /// build over a large table): it completes.
    #[tokio::test]
    async fn a_migration_longer_than_the_statement_timeout_completes() {
        let Some(fresh) = Fresh::new("longmig") else { return };
        let settings = PoolSettings { statement_timeout: Duration::from_millis(100), ..one() };
        let migrations = migrator(&["CREATE TABLE t (id INT); SELECT pg_sleep(0.5)"]);
        let pool = fresh.connect(settings, &migrations).await.expect("the migration is not cut");
        let (applied,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM _sqlx_migrations").fetch_one(&pool).await.unwrap();
        assert_eq!(applied, 1);
        pool.close().await;
        fresh.drop().await;
    }

    /// Replicas starting together take turns on the migration lock: the
    /// one that waits, longer than the lock timeout, still starts (the
    /// lock timeout cuts advisory lock waits too), and the migration runs
    /// once.
    #[tokio::test]
    async fn replicas_migrating_together_wait_for_each_other_past_the_lock_timeout() {
        let Some(fresh) = Fresh::new("turns") else { return };
        let settings = PoolSettings { lock_timeout: Duration::from_millis(100), ..one() };
        let migrations = migrator(&["CREATE TABLE t (id INT); SELECT pg_sleep(1)"]);
        let (a, b) = tokio::join!(fresh.connect(settings, &migrations), fresh.connect(settings, &migrations));
        let (a, b) = (a.expect("the first replica starts"), b.expect("the second replica starts"));
        let (applied,): (i64,) = sqlx::query_as("SELECT count(*) FROM _sqlx_migrations").fetch_one(&a).await.unwrap();
        assert_eq!(applied, 1);
        a.close().await;
        b.close().await;
        fresh.drop().await;
    }

    /// A migration that needs a table a long transaction is using (an
    /// ALTER TABLE behind a report) gives up at the lock timeout, rather
    /// than wait with every later query of the table queued behind it; the
    /// replica's restart, once the transaction is over, migrates.
    #[tokio::test]
    async fn a_migration_waiting_for_a_table_lock_gives_up_at_the_lock_timeout() {
        let Some(fresh) = Fresh::new("ddl") else { return };
        let settings = PoolSettings { max_connections: 2, lock_timeout: Duration::from_millis(200), ..one() };
        let v1 = "CREATE TABLE t (id INT PRIMARY KEY)";
        let pool = fresh.connect(settings, &migrator(&[v1])).await.unwrap();
        let mut reader = pool.begin().await.unwrap();
        sqlx::query("SELECT count(*) FROM t").execute(&mut *reader).await.unwrap();
        let v2 = migrator(&[v1, "ALTER TABLE t ADD COLUMN n INT NOT NULL DEFAULT 0"]);
        let refused = tokio::time::timeout(PATIENCE, fresh.connect(settings, &v2))
            .await
            .expect("given up at the lock timeout")
            .unwrap_err();
        let DbError::Migrate(sqlx::migrate::MigrateError::ExecuteMigration(e, 2)) = &refused else {
            panic!("not the second migration failing: {refused}")
        };
        assert_eq!(sqlstate(e).as_deref(), Some("55P03"), "{e}");
        sqlx::query("SELECT count(*) FROM t").execute(&mut *reader).await.expect("the reader was not disturbed");
        reader.commit().await.unwrap();
        let restarted = fresh.connect(settings, &v2).await.expect("the restart migrates");
        sqlx::query("SELECT n FROM t").execute(&restarted).await.unwrap();
        restarted.close().await;
        pool.close().await;
        fresh.drop().await;
    }

    /// A schema's backfill lock is one process's at a time: a second
    /// taker waits (past any lock timeout) until the first releases it;
    /// another schema's is not held up.
    #[tokio::test]
    async fn the_backfill_lock_is_one_process_at_a_time_per_schema() {
        let Some(fresh) = Fresh::new("bfl") else { return };
        let first = BackfillLock::take(&fresh.url, &fresh.schema).await.unwrap();
        let other = tokio::time::timeout(PATIENCE, BackfillLock::take(&fresh.url, &format!("{}_other", fresh.schema)))
            .await
            .expect("another schema's lock is free")
            .unwrap();
        other.release().await;
        let mut second = tokio::spawn({
            let (url, schema) = (fresh.url.clone(), fresh.schema.clone());
            async move { BackfillLock::take(&url, &schema).await }
        });
        let waited = tokio::time::timeout(Duration::from_millis(500), &mut second).await;
        assert!(waited.is_err(), "the second taker waits while the first holds it");
        first.release().await;
        let second = tokio::time::timeout(PATIENCE, second).await.expect("taken once released").unwrap().unwrap();
        second.release().await;
        assert_ne!(backfill_lock_key("natter_messages"), backfill_lock_key("natter_chats"));
    }

    /// The migration lock is the one sqlx's own migrator takes (the
    /// previous release's replicas take turns with this one's): held here,
    /// sqlx's migrator waits for it.
    #[tokio::test]
    async fn the_migration_lock_is_sqlx_migrators() {
        assert_eq!(migration_lock_key("123456789"), 0x3d32_ad9e * 0xcbf4_3926, "CRC-32/ISO-HDLC's check value");
        let Some(fresh) = Fresh::new("key") else { return };
        let options: PgConnectOptions = fresh.url.parse().unwrap();
        let mut holder = PgConnection::connect_with(&options).await.unwrap();
        let database: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&mut holder).await.unwrap();
        // Another test's migrations may hold it for a moment: wait.
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(migration_lock_key(&database))
            .execute(&mut holder)
            .await
            .unwrap();
        let mut other = PgConnection::connect_with(&options).await.unwrap();
        other
            .execute(AssertSqlSafe(format!("SET lock_timeout = 100; SET search_path TO {}", fresh.schema)))
            .await
            .unwrap();
        let waited = Migrator::DEFAULT.run_direct(None, &mut other, false).await.unwrap_err();
        let sqlx::migrate::MigrateError::Execute(e) = &waited else { panic!("{waited}") };
        assert_eq!(sqlstate(e).as_deref(), Some("55P03"), "sqlx's migrator waited for the lock: {e}");
        holder.close().await.unwrap();
        other.close().await.unwrap();
    }

    /// Waits (10 s at most) until the instance lock of `schema` is held by
    /// a backend `held` accepts, and answers it.
    async fn holder_once(url: &str, schema: &str, held: impl Fn(Option<i32>) -> bool) -> Option<i32> {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let holder = InstanceLock::holder(url, schema).await.unwrap();
                if held(holder) {
                    return holder;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        waited.await.unwrap_or_else(|_| panic!("the instance lock of {schema} never came to the holder expected"))
    }

    /// Ends the backend `pid`'s session, as an administrator (or a
    /// failover, or `idle_session_timeout`) would.
    async fn terminate_backend(url: &str, pid: i32) {
        let mut admin = PgConnection::connect(url).await.unwrap();
        let (ended,): (bool,) =
            sqlx::query_as("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(&mut admin).await.unwrap();
        assert!(ended, "backend {pid} was not there to end");
        admin.close().await.unwrap();
    }

    /// A lock whose session ended under a running process (terminated
    /// here) is taken again on a new connection, so a second process
    /// without NATS is still refused; the holder serves on (its shutdown
    /// is not requested) and releases it cleanly.
    #[tokio::test]
    async fn an_instance_lock_whose_session_ended_is_taken_again() {
        let Some(url) = crate::testing::postgres_url() else { return };
        let schemas = [crate::testing::unique_schema("chats"), crate::testing::unique_schema("messages")];
        let shutdown = CancellationToken::new();
        let every = Duration::from_millis(50);
        let lock = InstanceLock::claim_checking(&url, &schemas, true, &shutdown, every).await.unwrap().unwrap();
        let first = holder_once(&url, &schemas[1], |h| h.is_some()).await.unwrap();
        terminate_backend(&url, first).await;
        let again = holder_once(&url, &schemas[1], |h| h.is_some_and(|h| h != first)).await.unwrap();
        assert_eq!(InstanceLock::holder(&url, &schemas[0]).await.unwrap(), Some(again), "every schema's lock");
        match InstanceLock::claim(&url, std::slice::from_ref(&schemas[0]), true, &CancellationToken::new()).await {
            Err(DbError::InUse { .. }) => {}
            other => panic!("a second process took the stores of a running one: {other:?}"),
        }
        assert!(!shutdown.is_cancelled(), "the holder was stopped though it holds the lock again");
        lock.release().await.expect("released cleanly");
        assert_eq!(InstanceLock::holder(&url, &schemas[0]).await.unwrap(), None, "free once released");
    }

    /// A lock whose session ended while another process waited for it:
    /// that one has it at once, so the holder cannot take it again and is
    /// no longer alone on its stores. It asks its process to shut down
    /// (its token is cancelled) and its release says the lock was lost,
    /// naming the schema, for the process to exit non-zero.
    #[tokio::test]
    async fn an_instance_lock_taken_by_another_process_while_its_session_was_gone_stops_the_holder() {
        let Some(url) = crate::testing::postgres_url() else { return };
        let schemas = [crate::testing::unique_schema("sessions")];
        let shutdown = CancellationToken::new();
        let every = Duration::from_millis(50);
        let lock = InstanceLock::claim_checking(&url, &schemas, true, &shutdown, every).await.unwrap().unwrap();
        let holder = holder_once(&url, &schemas[0], |h| h.is_some()).await.unwrap();
        // Another process queues for the lock (PostgreSQL grants it to the
        // waiter as the holder's session ends, before any retry).
        let mut other = PgConnection::connect(&url).await.unwrap();
        let other_pid = this_session(&mut other).await.unwrap().pid;
        let key = instance_lock_key(&schemas[0]);
        let waiting = tokio::spawn(async move {
            sqlx::query("SELECT pg_advisory_lock($1)").bind(key).execute(&mut other).await.unwrap();
            other
        });
        let mut probe = PgConnection::connect(&url).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let queued: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 AND NOT granted)",
                )
                .bind(other_pid)
                .fetch_one(&mut probe)
                .await
                .unwrap();
                if queued {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the other process queues for the lock");
        terminate_backend(&url, holder).await;
        let other = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("the other has it").unwrap();
        tokio::time::timeout(Duration::from_secs(10), shutdown.cancelled())
            .await
            .expect("the holder did not stop though another process took its stores");
        match lock.release().await {
            Err(e @ DbError::InstanceLost { .. }) => {
                assert!(e.to_string().contains(&format!("lost the instance lock of schema {}", schemas[0])), "{e}")
            }
            other => panic!("the release did not say the lock was lost: {other:?}"),
        }
        assert_eq!(InstanceLock::holder(&url, &schemas[0]).await.unwrap(), Some(other_pid), "the other keeps it");
        other.close().await.unwrap();
        probe.close().await.unwrap();
    }

    /// One process without NATS holds a store alone: a second one is
    /// refused, with NATS or without, saying what to do; another
    /// deployment's schema is free. Processes on NATS hold nothing, so any
    /// number of them start. A lock released is free at once (a restart, a
    /// rollout with strategy: Recreate).
    #[tokio::test]
    async fn one_process_without_nats_holds_a_store_alone_and_any_number_on_nats_start() {
        let Some(url) = crate::testing::postgres_url() else { return };
        let (chats, messages) = (crate::testing::unique_schema("chats"), crate::testing::unique_schema("messages"));
        let both = [chats.clone(), messages.clone()];
        let refused = |claimed: Result<Option<InstanceLock>, DbError>| match claimed {
            Err(e @ DbError::InUse { .. }) => e.to_string(),
            other => panic!("not refused: {other:?}"),
        };

        let alone = InstanceLock::claim(&url, &both, true, &CancellationToken::new())
            .await
            .unwrap()
            .expect("the first takes its stores");
        let second =
            refused(InstanceLock::claim(&url, std::slice::from_ref(&messages), true, &CancellationToken::new()).await);
        let named = format!("schema {messages} of this database and this one has no --nats-url");
        assert!(second.contains(&named) && second.contains("strategy: Recreate"), "{second}");
        let on_nats =
            refused(InstanceLock::claim(&url, std::slice::from_ref(&chats), false, &CancellationToken::new()).await);
        assert!(on_nats.contains(&format!("schema {chats} of this database without --nats-url")), "{on_nats}");
        let elsewhere = [crate::testing::unique_schema("chats")];
        let other = InstanceLock::claim(&url, &elsewhere, true, &CancellationToken::new())
            .await
            .unwrap()
            .expect("another deployment's is free");
        alone.release().await.unwrap();

        for _ in 0..2 {
            let on_nats = InstanceLock::claim(&url, &both, false, &CancellationToken::new())
                .await
                .expect("processes on NATS start");
            assert!(on_nats.is_none(), "and hold nothing");
        }
        let again = InstanceLock::claim(&url, &both, true, &CancellationToken::new())
            .await
            .unwrap()
            .expect("free once released");
        again.release().await.unwrap();
        other.release().await.unwrap();
    }
}

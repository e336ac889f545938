//! SQLite through rusqlite, for a store native to it: the file migrated and
//! in WAL mode, a pool of read-only connections used on tokio's blocking
//! pool, one writer thread that owns the only writable connection, and a
//! background checkpointer.
//!
//! One writer, because SQLite has one: every write of a store goes to the
//! writer thread as a closure over its connection, so writes never meet
//! SQLite's write lock at once and wait in arrival order instead of in its
//! busy handler. A store that batches (the messages writer's group commit)
//! hands the whole batch over as one closure: one hand-off in and one out
//! per transaction, never one per statement (sqlx's SQLite driver hands
//! every statement and row to a worker thread and back).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions as _, Connection as _};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{AppliedMigration, DbError};

/// Settings of every connection: durable commits (`synchronous = FULL`
/// syncs the WAL at every commit), a wait instead of an error on a busy
/// file, enforced foreign keys, a WAL file cut back to 64 MiB when it
/// starts over after a burst, and deleted content overwritten with zeros
/// (`secure_delete`: a deleted message's or an edited-away text's bytes do
/// not stay in the file's free space; it costs writes only where content
/// is freed, never on a send). Pages the WAL still holds keep old content
/// until the WAL is overwritten; a full-text index keeps a deleted word's
/// token in its segments until they merge (README, "What deleting removes").
/// See <https://sqlite.org/pragma.html>.
pub const SETUP: &str = "PRAGMA busy_timeout = 5000; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
                         PRAGMA journal_size_limit = 67108864; PRAGMA secure_delete = ON;";

/// Keeps a natter process alone on its SQLite stores: an exclusive
/// advisory lock on `NAME.lock` beside each store's file `NAME.db`, taken
/// before the store opens and held for as long as the process runs (the
/// SQLite counterpart of [`crate::postgres::InstanceLock`]).
///
/// A process keeps exact caches (tokens, memberships) that only its own
/// writes evict, and keeps chat activity in memory between writes; a
/// second process on the same files would serve stale answers (a member
/// removed through one keeps reading through the other), NATS or not. So
/// a second process is refused at start-up ([`DbError::DataDirInUse`]).
/// One lock per store, not per directory: the split services (each with
/// a store of its own) may share a data directory, and the all-in-one's
/// three services hold one each.
///
/// The lock is the operating system's (`flock` on Unix, `LockFileEx` on
/// Windows, through the `fs4` crate): it goes with its process however it
/// ends, a crash or SIGKILL included, so no stale lock outlives it. The
/// file stays (removing it would let two processes lock two different
/// files of one name); it holds the holder's process id, for the message.
/// `flock` locks belong to an open file, so a second claim in the same
/// process is refused too, as a second process's is. Network filesystems
/// may not pass such locks on (NFS before Linux 2.6.12 does not).
#[derive(Debug)]
pub struct StoreLock {
    /// The locked files, each open for as long as it is held.
    files: Vec<std::fs::File>,
}

impl StoreLock {
    /// Takes the lock of the store of each of `names` (`sessions`, ...) in
    /// `dir` (created if missing), without waiting.
    ///
    /// Errors: [`DbError::DataDirInUse`] naming `dir` and the first store
    /// another holder has (then none is held); [`DbError::Io`] when the
    /// directory or a lock file cannot be made or locked.
    pub fn claim(dir: &Path, names: &[&str]) -> Result<Self, DbError> {
        use std::io::{Read as _, Seek as _, Write as _};
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DbError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            let path = dir.join(format!("{name}.lock"));
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io(&path))?;
            // Named in full: std's File::try_lock (Rust 1.89) would win
            // over the trait's method past the workspace's rust-version.
            match fs4::FileExt::try_lock(&file) {
                Ok(()) => {}
                Err(fs4::TryLockError::WouldBlock) => {
                    let mut text = String::new();
                    let holder = file.read_to_string(&mut text).ok().and_then(|_| text.trim().parse().ok());
                    return Err(DbError::DataDirInUse { dir: dir.to_path_buf(), store: (*name).to_owned(), holder });
                }
                Err(fs4::TryLockError::Error(e)) => return Err(io(&path)(e)),
            }
            // Who holds it, for the message of one refused; a failure
            // here costs only that.
            let noted =
                file.set_len(0).and_then(|()| file.rewind()).and_then(|_| writeln!(file, "{}", std::process::id()));
            if let Err(e) = noted {
                tracing::warn!(path = %path.display(), error = %e, "could not note this process's id in its lock file");
            }
            files.push(file);
        }
        Ok(Self { files })
    }

    /// Releases the locks (at shutdown, once the stores are closed);
    /// dropping the lock does the same.
    pub fn release(self) {
        drop(self.files);
    }
}

/// How often the WAL is copied into the database file in the background.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(50);

/// Most writes queued for the writer thread before callers wait their turn
/// to queue (on the runtime, holding no thread).
const WRITE_QUEUE: usize = 1024;

/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 64;

/// Opens a connection to the SQLite file at `path` with [`SETUP`].
///
/// Errors: the file cannot be opened or a setting is refused.
fn connection(path: &Path) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.execute_batch(SETUP)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// How long migrating a SQLite file waits for another process's write
/// transaction (its migrations, say, which may build an index over every
/// message) before failing with SQLITE_BUSY.
pub const MIGRATION_BUSY_TIMEOUT: Duration = Duration::from_secs(300);

/// Creates the file at `path` if missing, switches it to WAL mode and runs
/// `migrator` on it (sqlx's migrations, so the `_sqlx_migrations` table is
/// the same whichever store opened the file before), all of them in ONE
/// `BEGIN IMMEDIATE` transaction: it takes the file's write lock before it
/// reads which migrations are applied, so two processes migrating one file
/// at once take turns (the second waits up to [`MIGRATION_BUSY_TIMEOUT`],
/// then finds the work done) rather than both applying the first migration
/// and one failing on "table already exists". A failed migration leaves
/// the file as it was. Returns the migrations it applied. The connection
/// used is closed before this returns.
///
/// Errors: the file cannot be created, or a migration fails.
pub async fn migrate(path: &Path, migrator: &Migrator) -> Result<Vec<AppliedMigration>, DbError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(MIGRATION_BUSY_TIMEOUT)
        .disable_statement_logging();
    let mut conn = SqliteConnection::connect_with(&options).await?;
    let migrated = match switch_to_wal(&mut conn).await {
        Ok(()) => migrate_on(&mut conn, migrator).await,
        Err(e) => Err(e),
    };
    // A transaction left open by a failure is rolled back as it drops and
    // the connection closes; an error closing it changes nothing.
    let _ = conn.close().await;
    migrated
}

/// Switches the file `conn` is open on to WAL mode (a no-op once it is).
///
/// Switching a file out of the rollback journal takes its exclusive lock by
/// upgrading a read lock, a wait SQLite's busy handler does not take (two
/// connections upgrading at once would deadlock, so one of them gets
/// SQLITE_BUSY at once, whatever the busy timeout; sqlx says so on its
/// `journal_mode` option, <https://github.com/launchbadge/sqlx/pull/1930>).
/// Processes opening one fresh file together meet there, so this retries
/// SQLITE_BUSY itself, backing off from 5 ms to 100 ms, for up to
/// [`MIGRATION_BUSY_TIMEOUT`].
///
/// Errors: SQLITE_BUSY past that time, or any other failure at once.
async fn switch_to_wal(conn: &mut SqliteConnection) -> Result<(), DbError> {
    let deadline = tokio::time::Instant::now() + MIGRATION_BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(5);
    loop {
        match sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await {
            Ok(_) => return Ok(()),
            Err(sqlx::Error::Database(e))
                if is_busy(e.code().as_deref()) && tokio::time::Instant::now() + pause < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether a SQLite (extended) result code, as sqlx gives it, is
/// SQLITE_BUSY (5) or one of its extended codes (`5 | n << 8`).
fn is_busy(code: Option<&str>) -> bool {
    code.and_then(|code| code.parse::<i32>().ok()).is_some_and(|code| code & 0xff == 5)
}

async fn migrate_on(conn: &mut SqliteConnection, migrator: &Migrator) -> Result<Vec<AppliedMigration>, DbError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    // Each migration runs in a savepoint of this transaction (sqlx's
    // migrator nests its own transaction so).
    let applied = crate::run_migrations(migrator, &mut *tx).await?;
    tx.commit().await?;
    Ok(applied)
}

/// A type-erased write for the writer thread.
type WriteJob = Box<dyn FnOnce(&mut Connection) + Send>;

/// A migrated SQLite database as one store uses it: [`Sqlite::read`] on a
/// pool of read-only connections, [`Sqlite::write`] on the one writer
/// thread. Cheap to clone; the writer thread ends once every clone is
/// dropped or [`Sqlite::close`] is called, after the writes queued before.
#[derive(Clone, Debug)]
pub struct Sqlite {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    idle: std::sync::Mutex<Vec<Connection>>,
    /// One per reader: reads beyond the pool's size wait here (on the
    /// runtime, holding no thread) rather than open connections of their own.
    permits: Arc<Semaphore>,
    /// The writer thread's queue; None once closed.
    writes: std::sync::Mutex<Option<mpsc::Sender<WriteJob>>>,
    /// Dropped to stop the checkpointer.
    _checkpointer: std::sync::mpsc::Sender<()>,
}

impl Sqlite {
    /// Migrates the file at `path` (created if missing) and opens it with up
    /// to `readers` reader connections, the writer thread and the
    /// checkpointer.
    ///
    /// Errors: as [`migrate`], or a connection or thread cannot be started.
    pub async fn open(path: &Path, migrator: &Migrator, readers: usize) -> Result<Self, DbError> {
        migrate(path, migrator).await?;
        let writer = connection(path)?;
        Self::start(path, readers, writer)
    }

    /// As [`Sqlite::open`] for a file migrated already, with `writer` as the
    /// writer thread's connection.
    ///
    /// Errors: a thread cannot be started.
    fn start(path: &Path, readers: usize, writer: Connection) -> Result<Self, DbError> {
        let (writes, jobs) = mpsc::channel::<WriteJob>(WRITE_QUEUE);
        std::thread::Builder::new()
            .name("natter-sqlite-writer".into())
            .spawn(move || write_loop(writer, jobs))
            .map_err(|e| DbError::Thread(e.to_string()))?;
        let (stop, stopped) = std::sync::mpsc::channel();
        let checkpoint = connection(path)?;
        std::thread::Builder::new()
            .name("natter-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpoint, &stopped))
            .map_err(|e| DbError::Thread(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                idle: std::sync::Mutex::default(),
                permits: Arc::new(Semaphore::new(readers.max(1))),
                writes: std::sync::Mutex::new(Some(writes)),
                _checkpointer: stop,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `read` on a read-only connection (reused across calls, at most
    /// the pool's size of them) on tokio's blocking pool and returns what it
    /// returned: one hand-off to a thread and one back per call.
    ///
    /// Errors: a connection cannot be opened, `read` fails, or the runtime
    /// is shutting down ([`DbError::Cancelled`]). A panic in `read` is
    /// resumed here.
    pub async fn read<T, F>(&self, read: F) -> Result<T, DbError>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        // Held by the blocking task, so a caller that goes away early does
        // not free a connection still in use.
        let permit = self.inner.permits.clone().acquire_owned().await.map_err(|_| DbError::Cancelled)?;
        let inner = self.inner.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            inner.read(read)
        })
        .await;
        match result {
            Ok(out) => out,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(DbError::Cancelled),
        }
    }

    /// Runs `write` on the writer thread's connection, after every write
    /// queued before it, and returns what it returned. `write` opens its own
    /// transaction (`Connection::transaction_with_behavior(Immediate)`); a
    /// transaction it leaves open is rolled back when its guard drops.
    ///
    /// Errors: `write` fails, or the writer has stopped
    /// ([`DbError::Closed`]). A panic in `write` is resumed here; the
    /// writer thread goes on with the next write.
    pub async fn write<T, F>(&self, write: F) -> Result<T, DbError>
    where
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let queue = self.inner.writes.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or(DbError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let job: WriteJob = Box::new(move |conn: &mut Connection| {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(conn)));
            let _ = reply.send(out);
        });
        queue.send(job).await.map_err(|_| DbError::Closed)?;
        match answer.await.map_err(|_| DbError::Closed)? {
            Ok(out) => Ok(out?),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Stops taking writes and waits until the writes queued before are
    /// done. Reads still work (on the file as the writes left it).
    pub async fn close(&self) {
        let queue = self.inner.writes.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(queue) = queue {
            // The writer answers jobs in order: once this no-op is done,
            // everything queued before it is too. Then the last sender goes.
            let (done, wait) = oneshot::channel::<()>();
            let flush: WriteJob = Box::new(move |_| {
                let _ = done.send(());
            });
            if queue.send(flush).await.is_ok() {
                let _ = wait.await;
            }
        }
    }
}

impl Inner {
    fn read<T>(&self, read: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, DbError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = connection(&self.path)?;
                // Readers only: every write goes through the writer thread.
                conn.execute_batch("PRAGMA query_only = ON;")?;
                conn
            }
        };
        let out = read(&conn);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        Ok(out?)
    }
}

/// The writer thread: runs each queued write in turn until every sender is
/// gone.
fn write_loop(mut conn: Connection, mut jobs: mpsc::Receiver<WriteJob>) {
    while let Some(job) = jobs.blocking_recv() {
        job(&mut conn);
        // A write that panicked or returned early inside a transaction has
        // had it rolled back by the guard's drop; make sure nothing is left
        // open for the next one.
        if !conn.is_autocommit() {
            tracing::error!("a write left its transaction open; rolling it back");
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
}

/// Checkpoints every [`CHECKPOINT_INTERVAL`] until `stop`'s sender is
/// dropped, in PASSIVE mode: it copies what it can without waiting for or
/// blocking readers and the writer.
///
/// SQLite's automatic checkpoint (at 1,000 WAL pages) still runs in the
/// committing connection after its commit, and only it can let the WAL
/// start over (it copies the last frames while no write is under way). This
/// thread does the bulk of the copying beforehand, so that one finds little
/// left and the commit that triggers it barely waits. An idle database costs
/// one cheap PRAGMA per interval. See <https://sqlite.org/wal.html#ckpt>.
fn checkpoint_loop(conn: &Connection, stop: &std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_INTERVAL) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static NO_MIGRATIONS: Migrator = Migrator::DEFAULT;

    /// A store serves one holder at a time: a second claim of it is
    /// refused naming the directory, the store and the holder's process
    /// id, and takes none of the stores it asked for; other stores of the
    /// same directory (the split services, each with its own) and other
    /// directories are free; a lock released is free at once.
    #[test]
    fn a_store_lock_keeps_one_holder_per_store() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let refused = |claimed: Result<StoreLock, DbError>| match claimed {
            Err(e @ DbError::DataDirInUse { .. }) => e.to_string(),
            other => panic!("not refused: {other:?}"),
        };

        let chats = StoreLock::claim(&data, &["chats"]).expect("a store of a new directory");
        let messages = StoreLock::claim(&data, &["messages"]).expect("another store of the same directory");
        let second = refused(StoreLock::claim(&data, &["sessions", "messages"]));
        let named = format!(
            "another natter process (pid {}) is using the messages store in the data directory {}",
            std::process::id(),
            data.display()
        );
        assert!(second.contains(&named) && second.contains("--data-dir of its own"), "{second}");
        let sessions = StoreLock::claim(&data, &["sessions"]).expect("a refused claim holds nothing");
        let elsewhere = tempfile::tempdir().unwrap();
        let other = StoreLock::claim(elsewhere.path(), &["sessions", "chats", "messages"]).expect("another directory");

        refused(StoreLock::claim(&data, &["chats"]));
        chats.release();
        let again = StoreLock::claim(&data, &["chats"]).expect("free once released");
        drop((again, messages, sessions, other));
    }

    /// A service is started with `tokio::spawn`, so opening a store must be
    /// a `Send` future (this fails to compile otherwise).
    #[tokio::test]
    async fn open_is_send() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let opened =
            tokio::spawn(async move { Sqlite::open(&path, &NO_MIGRATIONS, 1).await.map(|db| db.path().to_owned()) });
        assert_eq!(opened.await.unwrap().unwrap(), dir.path().join("t.db"));
    }

    /// Processes started together on one fresh file (two all-in-ones on
    /// one data directory, `natter migrate` beside a starting service) all
    /// migrate it: one applies every migration, the others wait for it and
    /// find them applied, and none fails on "table already exists".
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn migrations_of_one_file_at_once_all_succeed_and_apply_once() {
        use sqlx::migrate::{Migration, MigrationType};
        let migrations: Vec<Migration> = [
            "CREATE TABLE a (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
            // Work enough that the others come along meanwhile.
            "WITH RECURSIVE k(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM k WHERE n < 200000) \
             INSERT INTO a (n) SELECT n FROM k",
            "CREATE TABLE b (id INTEGER PRIMARY KEY)",
            "CREATE INDEX a_n ON a (n)",
        ]
        .into_iter()
        .zip(1..)
        .map(|(sql, version)| {
            let sql = sqlx::SqlSafeStr::into_sql_str(sql);
            Migration::new(version, format!("m{version}").into(), MigrationType::Simple, sql, false)
        })
        .collect();
        let migrator = Arc::new(Migrator::with_migrations(migrations));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("race.db");
        let mut processes = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (path, migrator) = (path.clone(), migrator.clone());
            processes.spawn(async move { migrate(&path, &migrator).await });
        }
        let outcomes = processes.join_all().await;
        let failed: Vec<String> = outcomes.iter().filter_map(|o| o.as_ref().err()).map(|e| e.to_string()).collect();
        assert!(failed.is_empty(), "{failed:?}");
        let mut versions: Vec<i64> = outcomes.into_iter().flatten().flatten().map(|m| m.version).collect();
        versions.sort_unstable();
        assert_eq!(versions, [1, 2, 3, 4], "each migration applied (and reported) once");
        let again = migrate(&path, &migrator).await.unwrap();
        assert!(again.is_empty(), "up to date: {again:?}");
    }

    /// A process opening a fresh file while another is switching it to WAL
    /// (here: holds the rollback journal's write lock, as that switch does)
    /// waits its turn and opens it. SQLite's busy handler does not wait on
    /// that lock upgrade, so without a retry of our own it failed at once
    /// with "database is locked" (CI saw it when four `migrate`s met).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_being_switched_to_wal_by_another_process_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh.db");
        let switching = Connection::open(&path).unwrap();
        switching.execute_batch("BEGIN IMMEDIATE; CREATE TABLE early (id INTEGER PRIMARY KEY);").unwrap();
        let migrator = Migrator::with_migrations(Vec::new());
        let opening = tokio::spawn({
            let path = path.clone();
            async move { migrate(&path, &migrator).await }
        });
        // The other process finishes a moment later (if this opens after
        // that, the test passes without saying anything: it cannot be
        // made to fail by a slow machine, only to prove less).
        tokio::time::sleep(Duration::from_millis(300)).await;
        switching.execute_batch("COMMIT").unwrap();
        drop(switching);
        opening.await.unwrap().expect("waits for the other process and opens the file");
        let mode: String = Connection::open(&path).unwrap().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn writes_go_through_the_writer_and_readers_only_read() {
        let dir = tempfile::tempdir().unwrap();
        let db = Sqlite::open(&dir.path().join("t.db"), &NO_MIGRATIONS, 2).await.unwrap();
        db.write(|c| c.execute_batch("CREATE TABLE t (id TEXT PRIMARY KEY, n BIGINT NOT NULL)")).await.unwrap();
        let inserted = db.write(|c| c.execute("INSERT INTO t VALUES ('a', 7)", [])).await.unwrap();
        assert_eq!(inserted, 1);
        let n = db.read(|c| c.query_row("SELECT n FROM t WHERE id = 'a'", [], |r| r.get::<_, i64>(0))).await;
        assert_eq!(n.unwrap(), 7);
        let refused = db.read(|c| c.execute("UPDATE t SET n = 9", [])).await;
        assert!(matches!(refused, Err(DbError::Sqlite(_))), "a reader must not write");
        // A failed write leaves nothing behind and the writer goes on.
        let failed = db
            .write(|c| {
                let tx = c.transaction()?;
                tx.execute("UPDATE t SET n = 8", [])?;
                tx.execute("INSERT INTO t VALUES ('a', 1)", [])?;
                tx.commit()
            })
            .await;
        assert!(matches!(failed, Err(DbError::Sqlite(_))));
        let n = db.read(|c| c.query_row("SELECT n FROM t", [], |r| r.get::<_, i64>(0))).await.unwrap();
        assert_eq!(n, 7, "the failed transaction was rolled back");
        db.close().await;
        assert!(matches!(db.write(|_| Ok(())).await, Err(DbError::Closed)));
    }

    #[tokio::test]
    async fn a_panicking_write_reaches_its_caller_and_not_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let db = Sqlite::open(&dir.path().join("t.db"), &NO_MIGRATIONS, 1).await.unwrap();
        let panicked = tokio::spawn({
            let db = db.clone();
            async move { db.write(|_| -> rusqlite::Result<()> { panic!("boom") }).await }
        })
        .await;
        assert!(panicked.unwrap_err().is_panic());
        assert_eq!(db.write(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))).await.unwrap(), 1);
    }
}

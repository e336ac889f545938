//! Chat activity on SQLite: kept in memory, written in the background.
//!
//! Every committed message moves its chat's activity (`last_seq`,
//! `last_activity_time`, `last_message_time`: ListChats orders by it). On
//! SQLite the messages writer used to write it to `chats.db` once per batch,
//! on its own thread, before answering: a transaction that dirtied a page of
//! `chats` and of its activity index per chat, more WAL than the messages
//! themselves, and 6-14% of the writer's time (BENCHMARKS.md).
//!
//! [`ActivityBuffer`] keeps the newest activity of each chat in a map
//! instead and writes the map in one transaction:
//! - every `interval` (50 ms by default), from a task of its own;
//! - before a listing, the pending activity of the chats that listing can
//!   show (the caller's chats, or the public ones: [`listed`], then
//!   [`ActivityBuffer::flush_some`] from `Store::list_chats`), so a listing
//!   sees every activity of its chats recorded before it began: a client
//!   that sends and then lists still finds its chat on top. (Writing
//!   everything pending before every listing cost listings under send load
//!   two thirds of their rate: BENCHMARKS.md.) Activity of chats a listing
//!   cannot show is left to the timer;
//! - at shutdown (`Store::close`).
//!
//! Reads of one chat do not wait for a write: they lay the pending activity
//! over the row they read ([`ActivityBuffer::overlay`]), so GetChat and the
//! seq that membership events carry are never behind.
//!
//! A crash (SIGKILL, power loss) can lose what was still in the map. The
//! messages service has the truth and re-announces, when it starts, the
//! newest message of every chat written in the last seconds before its
//! newest message (`natter_messages::Store::recent_activity`): in the
//! all-in-one both start together, so nothing is lost for longer than a
//! restart. (A chats service on SQLite run on its own, which nobody runs in
//! production, can lose up to one interval of activity when it alone is
//! killed: until the messages service restarts or those chats get a new
//! message.)
//!
//! Only a store that no other process reads may keep activity back like
//! this: on PostgreSQL (several replicas) `Store::record_activity` still
//! writes through.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use natter_db::{Db, DbError};

use crate::store::ChatRow;

/// A chat's newest message as far as activity goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Newest {
    seq: i64,
    /// Its send time, µs since the Unix epoch.
    time: i64,
}

/// Pending chat activity over a SQLite connection of its own.
pub(crate) struct ActivityBuffer {
    db: Db,
    conn: Mutex<rusqlite::Connection>,
    /// Newest activity per chat id not yet written (or being written).
    pending: Mutex<HashMap<String, Newest>>,
    /// One write at a time: a flush that finds the map empty must still wait
    /// for a write in progress, or a listing could miss what that write holds.
    writing: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ActivityBuffer {
    /// A buffer writing through `conn` (a connection to `db`'s migrated
    /// chats database; its commits need no sync, see `Store::new`), flushed
    /// every `interval` by a task on the current tokio runtime until the
    /// buffer is dropped.
    ///
    /// Panics outside a tokio runtime.
    pub(crate) fn start(db: Db, conn: rusqlite::Connection, interval: Duration) -> Arc<Self> {
        let buffer = Arc::new(Self {
            db,
            conn: Mutex::new(conn),
            pending: Mutex::new(HashMap::new()),
            writing: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(flush_every(Arc::downgrade(&buffer), interval));
        buffer
    }

    /// Records `(chat_id, last_seq, time)` activities in memory: never moves
    /// a chat back (a lower seq than one pending is ignored).
    pub(crate) fn record(&self, activities: &[(String, i64, i64)]) {
        let mut pending = lock(&self.pending);
        for (chat_id, seq, time) in activities {
            let newest = Newest { seq: *seq, time: *time };
            match pending.get_mut(chat_id.as_str()) {
                Some(known) if known.seq >= *seq => {}
                Some(known) => *known = newest,
                None => {
                    pending.insert(chat_id.clone(), newest);
                }
            }
        }
    }

    /// Lays the pending activity of `row`'s chat over it, where newer (the
    /// same rule as the UPDATE that will write it).
    pub(crate) fn overlay(&self, row: &mut ChatRow) {
        if let Some(newest) = lock(&self.pending).get(row.id.as_str())
            && newest.seq > row.last_seq
        {
            row.last_seq = newest.seq;
            row.last_activity_time = newest.time;
            row.last_message_time = Some(newest.time);
        }
    }

    /// Writes every pending activity in one transaction (on tokio's blocking
    /// pool, in the database's write turn) and forgets what it wrote. When
    /// it returns, everything recorded before it was called is in the
    /// database, or still pending if the write failed.
    ///
    /// Errors: the write failed (the activity stays pending for the next
    /// flush).
    pub(crate) async fn flush(self: &Arc<Self>) -> Result<(), DbError> {
        let _one = self.writing.lock().await;
        let batch = self.pending();
        self.write_locked(batch).await
    }

    /// Writes `batch` (from [`ActivityBuffer::pending`]) as
    /// [`ActivityBuffer::flush`] writes everything: what a listing can show.
    ///
    /// Errors: the write failed (the activity stays pending).
    pub(crate) async fn flush_some(self: &Arc<Self>, batch: Vec<(String, i64, i64)>) -> Result<(), DbError> {
        let _one = self.writing.lock().await;
        self.write_locked(batch).await
    }

    /// The pending activity, as `(chat_id, last_seq, time)`.
    pub(crate) fn pending(&self) -> Vec<(String, i64, i64)> {
        lock(&self.pending).iter().map(|(chat, n)| (chat.clone(), n.seq, n.time)).collect()
    }

    /// Writes `batch` and forgets it, unless newer activity came meanwhile;
    /// the caller holds `writing`.
    async fn write_locked(self: &Arc<Self>, batch: Vec<(String, i64, i64)>) -> Result<(), DbError> {
        if batch.is_empty() {
            return Ok(());
        }
        let _turn = self.db.write_turn().await;
        let this = self.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut conn = lock(&this.conn);
            write(&mut conn, &batch).map(|()| batch)
        })
        .await
        .map_err(|_| DbError::Cancelled)??;
        let mut pending = lock(&self.pending);
        for (chat_id, seq, _) in &written {
            if pending.get(chat_id.as_str()).is_some_and(|n| n.seq <= *seq) {
                pending.remove(chat_id.as_str());
            }
        }
        Ok(())
    }
}

/// Of `pending` (`(chat_id, last_seq, time)`), the chats a listing can show:
/// the public ones (`public`), else those `user_id` is a member of. One
/// primary-key lookup each, on `conn` (any connection to the chats
/// database).
pub(crate) fn listed(
    conn: &rusqlite::Connection,
    pending: &[(String, i64, i64)],
    public: bool,
    user_id: &str,
) -> rusqlite::Result<Vec<(String, i64, i64)>> {
    let mut out = Vec::new();
    if pending.is_empty() {
        return Ok(out);
    }
    let mut is_public = conn.prepare_cached("SELECT 1 FROM chats WHERE id = ?1 AND visibility = 'public'")?;
    let mut is_member = conn.prepare_cached("SELECT 1 FROM members WHERE chat_id = ?1 AND user_id = ?2")?;
    for activity in pending {
        let shown =
            if public { is_public.exists([&activity.0])? } else { is_member.exists([activity.0.as_str(), user_id])? };
        if shown {
            out.push(activity.clone());
        }
    }
    Ok(out)
}

/// The background flush: every `interval` while the buffer lives.
async fn flush_every(buffer: Weak<ActivityBuffer>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(buffer) = buffer.upgrade() else { return };
        if let Err(e) = buffer.flush().await {
            tracing::warn!(error = %e, "writing chat activity failed; kept for the next try");
        }
    }
}

/// One transaction of one prepared UPDATE per chat; a chat whose stored
/// seq is newer (or that is gone) is left alone.
pub(crate) fn write(conn: &mut rusqlite::Connection, activities: &[(String, i64, i64)]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut update = tx.prepare_cached(
            // `?N`, not `$N`: SQLite numbers `$N` by first appearance, and
            // rusqlite binds by number.
            "UPDATE chats SET last_seq = ?2, last_activity_time = ?3, last_message_time = ?3 \
             WHERE id = ?1 AND last_seq < ?2",
        )?;
        for (chat_id, last_seq, time) in activities {
            update.execute(rusqlite::params![chat_id, last_seq, time])?;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use natter_db::{Db, DbConfig};

    use crate::store::{ChatFilter, ChatRow, MemberRow, Store};

    /// A store on SQLite in `dir` with chats "a" (created at 1 µs) and "b"
    /// (at 2 µs) of member "u", and "c" (at 3 µs) of member "v".
    async fn store(dir: &std::path::Path, interval: Duration) -> Store {
        let db = Db::connect(&DbConfig::sqlite_in(dir, "chats"), &crate::MIGRATOR).await.unwrap();
        let store = Store::new(db, interval).unwrap();
        for (id, time, user) in [("a", 1, "u"), ("b", 2, "u"), ("c", 3, "v")] {
            let chat = ChatRow {
                id: id.into(),
                kind: "group".into(),
                title: id.into(),
                description: String::new(),
                visibility: "private".into(),
                owner_id: user.into(),
                creator_id: user.into(),
                member_count: 1,
                archive_time: None,
                create_time: time,
                update_time: time,
                last_activity_time: time,
                last_seq: 0,
                last_message_time: None,
            };
            let member = MemberRow { chat_id: id.into(), user_id: user.into(), role: "owner".into(), join_time: time };
            store.insert_chat(&chat, id, None, &[member]).await.unwrap();
        }
        store
    }

    /// `(last_seq, last_activity_time)` as stored, past the buffer.
    async fn stored(store: &Store, id: &str) -> (i64, i64) {
        sqlx::query_as("SELECT last_seq, last_activity_time FROM chats WHERE id = $1")
            .bind(id)
            .fetch_one(store.db().read())
            .await
            .unwrap()
    }

    async fn listed(store: &Store) -> Vec<String> {
        let rows = store.list_chats("u", &ChatFilter::default(), None, 10).await.unwrap();
        rows.into_iter().map(|c| c.id).collect()
    }

    #[tokio::test]
    async fn a_listing_writes_pending_activity_first_and_a_read_sees_it_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), Duration::from_secs(3600)).await;
        store.record_activity(&[("a".into(), 5, 10), ("c".into(), 2, 50)]).await.unwrap();
        // Not written yet (the timer is an hour away), but a read of the
        // chat already has it.
        assert_eq!(stored(&store, "a").await, (0, 1));
        let a = store.chat("a").await.unwrap().unwrap();
        assert_eq!((a.last_seq, a.last_activity_time, a.last_message_time), (5, 10, Some(10)));
        // A listing writes its chats' activity first, so "a" is on top; "c"
        // is not u's, so its activity waits.
        assert_eq!(listed(&store).await, ["a", "b"]);
        assert_eq!(stored(&store, "a").await, (5, 10));
        assert_eq!(stored(&store, "c").await, (0, 3));
        assert_eq!(store.chat("c").await.unwrap().unwrap().last_seq, 2);
        // Activity never moves back, pending or stored.
        store.record_activity(&[("a".into(), 4, 20), ("b".into(), 1, 3)]).await.unwrap();
        store.record_activity(&[("b".into(), 0, 30)]).await.unwrap();
        let b = store.chat("b").await.unwrap().unwrap();
        assert_eq!((b.last_seq, b.last_activity_time), (1, 3));
        store.flush_activity().await.unwrap();
        assert_eq!(stored(&store, "a").await, (5, 10));
        assert_eq!(stored(&store, "b").await, (1, 3));
        assert_eq!(stored(&store, "c").await, (2, 50));
    }

    #[tokio::test]
    async fn the_timer_writes_pending_activity() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), Duration::from_millis(10)).await;
        store.record_activity(&[("b".into(), 2, 7)]).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while stored(&store, "b").await != (2, 7) {
            assert!(Instant::now() < deadline, "activity not written by the timer within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

//! Chat activity on SQLite: kept in memory, written through the writer
//! thread in the background.
//!
//! Every committed message moves its chat's activity (`last_seq`,
//! `last_activity_time`, `last_message_time`: ListChats orders by it).
//! Written once per message batch, that was a transaction that dirtied a
//! page of `chats` and of its activity index per chat, more WAL than the
//! messages themselves, and 6-14% of the messages writer's time
//! (BENCHMARKS.md).
//!
//! [`ActivityBuffer`] keeps the newest activity of each chat in a map
//! instead and writes the map in one transaction on the store's writer
//! thread (the one that owns every write of the file; no connection of its
//! own, no lock beside the writer's queue):
//! - every flush interval (50 ms by default, at most
//!   [`natter_links::activity::MAX_FLUSH_INTERVAL`]), from a task of its own;
//! - before a listing, the pending activity of the chats that listing can
//!   show (the caller's chats, or the public ones: [`listed`], then
//!   [`ActivityBuffer::write`] from `list_chats`), so a listing sees every
//!   activity of its chats recorded before it began: a client that sends
//!   and then lists still finds its chat on top. (Writing everything
//!   pending before every listing cost listings under send load two thirds
//!   of their rate: BENCHMARKS.md.) Activity of chats a listing cannot show
//!   is left to the timer;
//! - at shutdown (`close`).
//!
//! An activity leaves the map only once a write that holds it has
//! committed, and the writer runs writes in arrival order: when a write
//! returns, everything pending when it was queued is in the file, whatever
//! other flushes run meanwhile.
//!
//! Reads of one chat do not wait for a write: they lay the pending activity
//! over the row they read ([`ActivityBuffer::overlay`]), so GetChat and the
//! seq that membership events carry are never behind.
//!
//! A crash (SIGKILL, power loss) can lose what was still in the map. The
//! messages service has the truth and re-announces, when it starts, the
//! newest message of every chat written within
//! [`natter_links::activity::REANNOUNCE_WINDOW`] before its newest message,
//! which covers the longest flush interval (a checked constant there): in
//! the all-in-one both start together, so nothing is lost for longer than a
//! restart. (A chats service on SQLite run on its own, which nobody runs in
//! production, can lose up to one interval of activity when it alone is
//! killed: until the messages service restarts or those chats get a new
//! message.)
//!
//! Only a store that no other process reads may keep activity back like
//! this: on PostgreSQL (several replicas) activity is written through.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use natter_db::sqlite::Sqlite;
use natter_kit::id::{ChatId, UserId};
use rusqlite::{Connection, TransactionBehavior};

use crate::domain::{Activity, Chat};
use crate::store::StoreError;

/// Pending chat activity of one SQLite chats store.
#[derive(Debug)]
pub(super) struct ActivityBuffer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    db: Sqlite,
    /// Newest activity per chat not yet written (or being written).
    pending: Mutex<HashMap<ChatId, Activity>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ActivityBuffer {
    /// A buffer writing through `db`'s writer thread, flushed every
    /// `interval` by a task on the current tokio runtime until the buffer
    /// is dropped.
    ///
    /// Panics outside a tokio runtime.
    pub(super) fn start(db: Sqlite, interval: Duration) -> Self {
        let shared = Arc::new(Shared { db, pending: Mutex::new(HashMap::new()) });
        tokio::spawn(flush_every(Arc::downgrade(&shared), interval));
        Self { shared }
    }

    /// Records activities in memory: never moves a chat back (a seq not
    /// above one pending is ignored).
    pub(super) fn record(&self, activities: &[Activity]) {
        let mut pending = lock(&self.shared.pending);
        for activity in activities {
            match pending.get_mut(&activity.chat_id) {
                Some(known) if known.last_seq >= activity.last_seq => {}
                Some(known) => *known = *activity,
                None => {
                    pending.insert(activity.chat_id, *activity);
                }
            }
        }
    }

    /// `chat` with its pending activity laid over it, where newer (the same
    /// rule as the UPDATE that will write it).
    pub(super) fn overlay(&self, mut chat: Chat) -> Chat {
        if let Some(activity) = lock(&self.shared.pending).get(&chat.id) {
            chat.apply(activity);
        }
        chat
    }

    /// Forgets the pending activity of a deleted chat.
    pub(super) fn forget(&self, chat: ChatId) {
        lock(&self.shared.pending).remove(&chat);
    }

    /// The pending activity.
    pub(super) fn pending(&self) -> Vec<Activity> {
        lock(&self.shared.pending).values().copied().collect()
    }

    /// Writes every pending activity in one transaction. When it returns,
    /// everything recorded before it was called is in the database, or
    /// still pending if the write failed.
    ///
    /// Errors: the write failed (the activity stays pending for the next
    /// flush).
    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        self.shared.write(self.pending()).await
    }

    /// Writes `batch` (of [`ActivityBuffer::pending`]) as
    /// [`ActivityBuffer::flush`] writes everything: what a listing can show.
    ///
    /// Errors: the write failed (the activity stays pending).
    pub(super) async fn write(&self, batch: Vec<Activity>) -> Result<(), StoreError> {
        self.shared.write(batch).await
    }
}

impl Shared {
    /// Writes `batch` on the writer thread and forgets it, unless newer
    /// activity came meanwhile.
    async fn write(&self, batch: Vec<Activity>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let written = self.db.write(move |conn| write(conn, &batch).map(|()| batch)).await?;
        let mut pending = lock(&self.pending);
        for activity in &written {
            if pending.get(&activity.chat_id).is_some_and(|p| p.last_seq <= activity.last_seq) {
                pending.remove(&activity.chat_id);
            }
        }
        Ok(())
    }
}

/// Of `pending`, the chats a listing can show: the public ones (`public`),
/// else those `user` is a member of. One primary-key lookup each, on
/// `conn` (a reader).
pub(super) fn listed(
    conn: &Connection,
    pending: &[Activity],
    public: bool,
    user: UserId,
) -> rusqlite::Result<Vec<Activity>> {
    let mut out = Vec::new();
    if pending.is_empty() {
        return Ok(out);
    }
    let mut is_public = conn.prepare_cached("SELECT 1 FROM chats WHERE id = ?1 AND visibility = 'public'")?;
    let mut is_member = conn.prepare_cached("SELECT 1 FROM members WHERE chat_id = ?1 AND user_id = ?2")?;
    let user = user.to_string();
    for activity in pending {
        let chat = activity.chat_id.to_string();
        let shown = if public { is_public.exists([&chat])? } else { is_member.exists([&chat, &user])? };
        if shown {
            out.push(*activity);
        }
    }
    Ok(out)
}

/// The background flush: every `interval` while the buffer lives.
async fn flush_every(shared: Weak<Shared>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else { return };
        let batch: Vec<Activity> = lock(&shared.pending).values().copied().collect();
        if let Err(e) = shared.write(batch).await {
            tracing::warn!(error = %e, "writing chat activity failed; kept for the next try");
        }
    }
}

/// One transaction of one prepared UPDATE per chat; a chat whose stored
/// seq is newer (or that is gone) is left alone.
///
/// Activity is derived data: its commit skips the WAL sync (`synchronous =
/// NORMAL` for this transaction only; the writer's next durable commit
/// syncs it along with its own), so a flush under send load costs no fsync.
fn write(conn: &mut Connection, activities: &[Activity]) -> rusqlite::Result<()> {
    conn.execute_batch("PRAGMA synchronous = NORMAL")?;
    let written = write_tx(conn, activities);
    conn.execute_batch("PRAGMA synchronous = FULL")?;
    written
}

fn write_tx(conn: &mut Connection, activities: &[Activity]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut update = tx.prepare_cached(
            "UPDATE chats SET last_seq = ?2, last_activity_time = ?3, last_message_time = ?3 \
             WHERE id = ?1 AND last_seq < ?2",
        )?;
        for a in activities {
            update.execute(rusqlite::params![a.chat_id.to_string(), a.last_seq, a.time])?;
        }
    }
    tx.commit()
}

//! Sends on SQLite: the commit stage's own connection, on its own thread.
//!
//! sqlx runs each SQLite statement on a worker thread and hands it over
//! through channels, so every statement of a batch costs two thread wake-ups
//! and re-binds its arguments by name. The commit thread instead owns one
//! rusqlite connection to the same file and runs a whole batch with cached
//! prepared statements, one row at a time, in one transaction: a batch costs
//! one hand-off in and one out, and a row a few microseconds of SQLite.
//!
//! SQLite has one writer at a time. The store's other writes (edits, read
//! positions, ...) go through sqlx's write pool, so they and this connection
//! take turns through [`natter_db::Db::write_turn`], in arrival order,
//! instead of waiting in SQLite's busy handler.

use std::collections::HashMap;

use natter_kit::metrics::{PhaseClock, WriterPhase};
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};

use crate::store::{NewMessage, Sent, insert_message_sql};

/// A writable connection to a migrated messages database.
pub struct SqliteCommitter {
    conn: Connection,
}

impl SqliteCommitter {
    /// Commits through `conn`, a connection to a migrated messages database
    /// from [`natter_db::Db::sqlite_commit_connection`] (durable commits:
    /// `synchronous = FULL` syncs the WAL at every commit).
    pub fn new(conn: Connection) -> Self {
        Self { conn }
    }

    /// Inserts `batch` in ONE transaction, in order; the outcomes are in the
    /// batch's order. Each chat's next seq comes from its head, read once
    /// per batch and written back once; a message that is refused takes no
    /// seq, so seqs stay gap-free.
    ///
    /// An id that is stored already (or earlier in the batch) is a
    /// `Duplicate`; a reply to a seq the chat does not have (counting the
    /// batch's earlier messages) is `NoSuchReply`. An error rolls the whole
    /// batch back: nothing of it is written.
    ///
    /// Charges its time to `clock`: the statements, then the COMMIT (WAL
    /// write and sync).
    pub fn insert_batch(&mut self, batch: &[NewMessage], clock: &mut PhaseClock) -> rusqlite::Result<Vec<Sent>> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            // rusqlite binds by number and SQLite numbers `$N` by first
            // appearance, so these use `?N` (the insert, shared with the
            // PostgreSQL path, names `$1..$8` in order).
            let mut has_seq = tx.prepare_cached("SELECT 1 FROM messages WHERE chat_id = ?1 AND seq = ?2")?;
            let mut read_head = tx.prepare_cached("SELECT last_seq FROM chat_heads WHERE chat_id = ?1")?;
            // A stored id (a retry) inserts nothing: one index lookup, where
            // a SELECT first would walk the id index twice.
            let mut insert = tx.prepare_cached(concat!(insert_message_sql!(), " ON CONFLICT (id) DO NOTHING"))?;
            // Heads of the chats this batch adds to.
            let mut heads: HashMap<&str, i64> = HashMap::new();
            for m in batch {
                if m.reply_to_seq > 0 && !has_seq.exists(params![m.chat_id, m.reply_to_seq])? {
                    outcomes.push(Sent::NoSuchReply);
                    continue;
                }
                let head = match heads.get_mut(m.chat_id.as_str()) {
                    Some(head) => head,
                    None => {
                        let stored: Option<i64> = read_head.query_row([&m.chat_id], |row| row.get(0)).optional()?;
                        heads.entry(m.chat_id.as_str()).or_insert(stored.unwrap_or(0))
                    }
                };
                let seq = *head + 1;
                let inserted = insert.execute(params![
                    m.id,
                    m.chat_id,
                    seq,
                    m.author_id,
                    m.text,
                    m.attachments,
                    m.reply_to_seq,
                    m.send_time
                ])?;
                if inserted == 0 {
                    // The id is stored already: it takes no seq.
                    outcomes.push(Sent::Duplicate);
                    continue;
                }
                *head = seq;
                outcomes.push(Sent::Created(m.row(seq)));
            }
            let mut write_head = tx.prepare_cached(
                "INSERT INTO chat_heads (chat_id, last_seq) VALUES (?1, ?2) \
                 ON CONFLICT (chat_id) DO UPDATE SET last_seq = excluded.last_seq",
            )?;
            for (chat, head) in &heads {
                write_head.execute(params![chat, head])?;
            }
        }
        clock.lap(WriterPhase::Statements);
        let committed = tx.commit();
        clock.lap(WriterPhase::Commit);
        committed?;
        Ok(outcomes)
    }
}

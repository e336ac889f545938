//! The messages store on SQLite, through rusqlite only
//! ([`natter_db::sqlite::Sqlite`]): reads (history pages, summaries,
//! heads) on the reader pool, every write on the one writer thread.
//!
//! A send batch is one closure on the writer thread: one hand-off in and
//! one out per batch, cached prepared statements, one transaction and one
//! WAL sync. SQLite has a single writer, so the seq algorithm needs no
//! locks: each chat's head is read once per batch, the messages take the
//! next seqs as they are inserted, and the heads are written back at the
//! end.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use natter_db::sqlite::Sqlite;
use natter_kit::id::{ChatId, MessageId, UserId};
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension as _, Row, TransactionBehavior, params};

use super::{
    ARCHIVE_CHAT, Activity, CHAT_LOG_KEEP, CLOSE_DIRECT_CHAT, Change, ChatChange, Checkpoint, Deleted, Deletion,
    Edited, Finish, Finished, Finishing, Flags, Generation, GenerationInfo, Heads, HeadsState, LATEST_MEMBERSHIP_SQL,
    Logged, MESSAGE_COLUMNS, Marked, Membership, Message, MessageStore, NewMessage, NewReply, PURGE_HEADS, Pin, Pinned,
    QueueCursor, QueueFilter, RECENT_ACTIVITY_ROWS, RECORD_DEPARTURE, Range, Reacted, Reaction, ReadState, Reply,
    Reported, Resolved, Revision, Role, SEARCH_RANK_MAX, SEARCH_SCAN, SearchCursor, SearchFilter, SearchHit,
    SearchPage, Sent, Seq, Started, StoreError, StoredReport, Summary, ThreadBump, ThreadSummary, aggregates_sql,
    chat_change_of, chat_change_row, created_after_bounds, decode_mentions, encode_mentions, first_seq_created_after,
    list_sql, mention_count_sql, merge_changes, message_columns, pinned_sql, report_columns, stop_generating_sql,
    thread_root_of, unread_count_sql,
};
use crate::domain::{decode_attachments, encode_attachments};

/// Ids per `IN (...)` list.
const CHUNK: usize = 256;

/// `SELECT` of one message by id (`?1`).
const MESSAGE_BY_ID: &str = concat!("SELECT ", message_columns!(), " FROM messages WHERE id = ?1");

/// The capped unread and mention counts of user `?2` in chat `?1` from
/// their stored read position.
const COUNTS_FROM_POSITION: &str = concat!(
    "SELECT ",
    unread_count_sql!(
        "?1",
        "COALESCE((SELECT read_seq FROM read_positions WHERE chat_id = ?1 AND user_id = ?2), 0)",
        "?2"
    ),
    ", ",
    mention_count_sql!(
        "?1",
        "COALESCE((SELECT read_seq FROM read_positions WHERE chat_id = ?1 AND user_id = ?2), 0)",
        "?2"
    )
);

/// The SQL of a best-match-first [`MessageStore::search`]: `?1` the FTS5
/// query, `?2` the chat ids as a JSON array, then with `after` the cursor
/// (`?3` rank, `?4` rowid). It ranks every match by bm25 (lower is better).
/// The limit is written in, as [`list_sql`]'s.
fn ranked_search_sql(after: bool, limit: u32) -> String {
    let cursor = if after { " AND (s.rank > ?3 OR (s.rank = ?3 AND s.rowid < ?4))" } else { "" };
    format!(
        "SELECT {}, s.rowid, s.rank FROM message_search s JOIN messages m ON m.rowid = s.rowid \
         WHERE message_search MATCH ?1 AND m.chat_id IN (SELECT value FROM json_each(?2)) \
         AND m.delete_time IS NULL AND m.superseded = 0{cursor} ORDER BY s.rank ASC, s.rowid DESC LIMIT {limit}",
        message_columns!()
    )
}

/// The matches of a newest-first [`MessageStore::search`], newest first,
/// with their chats: `?1` the FTS5 query, then with `after` `?2` the rowid
/// to go on below. FTS5 walks its index in rowid order (the order messages
/// were stored in): no sort, and the caller stops stepping when it has
/// enough.
fn search_scan_sql(after: bool) -> &'static str {
    if after {
        "SELECT s.rowid, m.chat_id FROM message_search s JOIN messages m ON m.rowid = s.rowid \
         WHERE message_search MATCH ?1 AND s.rowid < ?2 AND m.delete_time IS NULL AND m.superseded = 0 \
         ORDER BY s.rowid DESC"
    } else {
        "SELECT s.rowid, m.chat_id FROM message_search s JOIN messages m ON m.rowid = s.rowid \
         WHERE message_search MATCH ?1 AND m.delete_time IS NULL AND m.superseded = 0 ORDER BY s.rowid DESC"
    }
}

/// Whether the FTS5 query `fts` matches more than `most` messages of the
/// server (counted up to one past it, in the index alone): a search by
/// relevance ranks every match, the caller's or not.
fn matches_over(conn: &Connection, fts: &rusqlite::types::Value, most: usize) -> rusqlite::Result<bool> {
    let most = i64::try_from(most).unwrap_or(i64::MAX - 1);
    let matches: i64 = conn
        .prepare_cached("SELECT count(*) FROM (SELECT 1 FROM message_search WHERE message_search MATCH ?1 LIMIT ?2)")?
        .query_row(params![fts, most + 1], |row| row.get(0))?;
    Ok(matches > most)
}

/// The summaries of `chats` for `user` (see [`MessageStore::summaries`]),
/// each read in one snapshot with the others: read apart, a message
/// committed between a chat's count and its newest message showed a
/// preview its count and unread count did not hold. `between` runs after
/// the first chat's count (nothing in production: tests commit writes
/// there).
fn read_summaries(
    conn: &Connection,
    chats: &[String],
    user: Option<&str>,
    between: impl FnOnce(),
) -> rusqlite::Result<Vec<Summary>> {
    // Dropped at the end (a rollback: it wrote nothing).
    let conn = conn.unchecked_transaction()?;
    let mut newest = conn.prepare_cached(&list_sql(Range::default(), None, 1).0)?;
    let mut counts = conn.prepare_cached(COUNTS_FROM_POSITION)?;
    let mut aggregates = conn.prepare_cached(concat!("SELECT ", aggregates_sql!("?1")))?;
    let mut between = Some(between);
    chats
        .iter()
        .map(|chat| {
            let (message_count, max_severity) = aggregates.query_row([chat], |row| Ok((row.get(0)?, row.get(1)?)))?;
            if let Some(between) = between.take() {
                between();
            }
            let (unread, mentions) = match user {
                Some(user) => counts.query_row([chat, user], |row| Ok((row.get(0)?, row.get(1)?)))?,
                None => (0, 0),
            };
            Ok(Summary {
                newest: newest.query_row([chat], message_row).optional()?,
                unread,
                mentions,
                message_count,
                max_severity,
            })
        })
        .collect()
}

/// A newest-first search on `conn` (see [`MessageStore::search`]): steps
/// through the matches of `fts` below `from` (a rowid), keeping those of
/// `chats`, until `limit` are kept or `scan` ([`SEARCH_SCAN`]) were stepped
/// through, then reads the kept messages, all in one read transaction;
/// `after_scan` runs between the two (nothing in production: tests commit
/// writes there).
fn search_newest(
    conn: &Connection,
    fts: &str,
    chats: &HashSet<String>,
    from: Option<i64>,
    limit: usize,
    scan: usize,
    after_scan: impl FnOnce(),
) -> rusqlite::Result<SearchPage> {
    // One snapshot for the scan and the reads: read apart, a delete, a
    // superseding reply or a purge committed between them would turn a hit
    // into a tombstone, a superseded reply or no row (INTERNAL). Dropped at
    // the end (a rollback: it wrote nothing).
    let conn = conn.unchecked_transaction()?;
    let mut matches = conn.prepare_cached(search_scan_sql(from.is_some()))?;
    let mut rows = match from {
        Some(below) => matches.query(params![fts, below])?,
        None => matches.query(params![fts])?,
    };
    let (mut kept, mut stepped, mut last) = (Vec::new(), 0, None);
    while kept.len() < limit
        && stepped < scan
        && let Some(row) = rows.next()?
    {
        let rowid: i64 = row.get(0)?;
        stepped += 1;
        last = Some(rowid);
        if chats.contains(row.get_ref(1)?.as_str()?) {
            kept.push(rowid);
        }
    }
    let stopped = kept.len() < limit && stepped == scan;
    drop(rows);
    after_scan();
    // In the scan's snapshot, every row it kept is there, live and not
    // superseded.
    let mut read = conn.prepare_cached(concat!("SELECT ", message_columns!(), " FROM messages WHERE rowid = ?1"))?;
    let hits = kept
        .into_iter()
        .map(|rowid| {
            let message = read.query_row([rowid], message_row)?;
            Ok(SearchHit { message, cursor: SearchCursor { position: rowid, rank: 0.0 } })
        })
        .collect::<rusqlite::Result<_>>()?;
    let scanned_to = last.filter(|_| stopped).map(|position| SearchCursor { position, rank: 0.0 });
    Ok(SearchPage { hits, scanned_to, too_broad: false })
}

/// Rows a batch of [`MessageStore::normalize_texts`] rewrites in one write
/// transaction.
const REWRITE_BATCH: usize = 1000;

/// Chats a batch of [`MessageStore::scrub_chat_details`] rewrites in one
/// write transaction (each up to [`CHAT_LOG_KEEP`] entries).
const SCRUB_BATCH: usize = 100;

/// The messages store on a SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    db: Sqlite,
}

impl SqliteStore {
    /// Opens (creating and migrating as needed) the SQLite file at `path`
    /// with up to `readers` reader connections.
    ///
    /// Errors: the file cannot be created, opened or migrated.
    pub async fn open(path: &Path, readers: usize) -> Result<Self, StoreError> {
        Ok(Self { db: Sqlite::open(path, &crate::SQLITE_MIGRATOR, readers).await? })
    }

    /// Rewrites `items` (found on a reader, so the writer stays free for
    /// sends) on the writer, `batch` of them to an IMMEDIATE transaction,
    /// so sends wait behind one batch at most, never the whole backfill;
    /// `rewrite` does one item and says how many rows it changed. Returns
    /// the total.
    async fn write_in_batches<T, F>(&self, items: Vec<T>, batch: usize, rewrite: F) -> Result<u64, StoreError>
    where
        T: Clone + Send + 'static,
        F: Fn(&Connection, &T) -> rusqlite::Result<u64> + Send + Sync + 'static,
    {
        let rewrite = std::sync::Arc::new(rewrite);
        let mut rewritten = 0;
        for chunk in items.chunks(batch) {
            let (chunk, rewrite) = (chunk.to_vec(), rewrite.clone());
            rewritten += self
                .db
                .write(move |conn| {
                    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let mut n = 0;
                    for item in &chunk {
                        n += rewrite(&tx, item)?;
                    }
                    tx.commit()?;
                    Ok(n)
                })
                .await?;
        }
        Ok(rewritten)
    }

    /// Runs `deletes` (deletes and the like), each with `key` as its one
    /// parameter (`?1`), in order, in ONE IMMEDIATE transaction on the
    /// writer.
    async fn in_one_transaction(&self, deletes: &'static [&'static str], key: String) -> Result<(), StoreError> {
        let done = self.db.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for sql in deletes {
                tx.execute(sql, [&key])?;
            }
            tx.commit()
        });
        Ok(done.await?)
    }
}

/// A typed id from a TEXT column.
fn id_at<T: std::str::FromStr<Err = uuid::Error>>(row: &Row<'_>, i: usize) -> rusqlite::Result<T> {
    row.get_ref(i)?.as_str()?.parse().map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, Type::Text, Box::new(e)))
}

/// A row of [`message_columns!`].
fn message_row(row: &Row<'_>) -> rusqlite::Result<Message> {
    let delete_time: Option<i64> = row.get(10)?;
    Ok(Message {
        id: id_at(row, 0)?,
        chat_id: id_at(row, 1)?,
        seq: Seq(row.get(2)?),
        author_id: id_at(row, 3)?,
        text: row.get(4)?,
        attachments: decode_attachments(row.get_ref(5)?.as_str()?),
        reply_to: Some(Seq(row.get(6)?)).filter(|s| s.0 > 0),
        send_time: row.get(7)?,
        edit_time: row.get(8)?,
        revision: row.get(9)?,
        delete_time,
        change_seq: row.get(11)?,
        create_change: row.get(12)?,
        reply: Reply::of_columns(
            row.get(13)?,
            row.get(14)?,
            row.get_ref(15)?.as_str_or_null()?,
            row.get(16)?,
            row.get_ref(17)?.as_str()?,
            row.get(18)?,
        )
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(15, Type::Text, e.into()))?,
        flags: Flags::of_columns(row.get(19)?, row.get_ref(20)?.as_str()?),
        reactions: Vec::new(),
        reaction_rows: row.get(21)?,
        mentions: decode_mentions(row.get_ref(22)?.as_str()?)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(22, Type::Text, e.into()))?,
        thread_root: Some(Seq(row.get(23)?)).filter(|s| s.0 > 0),
        thread: ThreadSummary::of_columns(row.get(24)?, row.get(25)?, row.get_ref(26)?.as_str()?)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(26, Type::Text, e.into()))?,
        pin: Pin::of_columns(row.get(27)?, row.get_ref(28)?.as_str_or_null()?, delete_time.is_some())
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(28, Type::Text, e.into()))?,
        deleted_by: match row.get_ref(29)?.as_str_or_null()? {
            Some(_) => Some(id_at(row, 29)?),
            None => None,
        },
    })
}

/// A row of [`report_columns!`].
fn report_row(row: &Row<'_>) -> rusqlite::Result<StoredReport> {
    Ok(StoredReport {
        message_id: id_at(row, 0)?,
        reporter: id_at(row, 1)?,
        chat_id: id_at(row, 2)?,
        reason: row.get(3)?,
        comment: row.get(4)?,
        create_time: row.get(5)?,
        resolve_time: row.get(6)?,
    })
}

/// Takes the next change number of chat `chat` (creating its heads row if
/// need be), inside the caller's transaction.
fn next_change(tx: &Connection, chat: &str) -> rusqlite::Result<i64> {
    next_change_of_members(tx, chat).map(|(change, _)| change)
}

/// [`next_change`], with the chat's members version
/// ([`MessageStore::record_departure`], 0 for none), whether it is closed
/// ([`MessageStore::close_direct_chat`]) and whether it is archived
/// ([`MessageStore::archive_chat`]) read in the same statement: the one
/// writer records no departure, closure or archive between it and the
/// commit.
fn next_change_of_members(tx: &Connection, chat: &str) -> rusqlite::Result<(i64, HeadsState)> {
    tx.prepare_cached(
        "INSERT INTO chat_heads (chat_id, last_seq, last_change) VALUES (?1, 0, 1) \
         ON CONFLICT (chat_id) DO UPDATE SET last_change = chat_heads.last_change + 1 \
         RETURNING last_change, members_version, closed, archived",
    )?
    .query_row([chat], |row| {
        Ok((row.get(0)?, HeadsState { members_version: row.get(1)?, closed: row.get(2)?, archived: row.get(3)? }))
    })
}

/// A row of `change_seq, kind, user_id, details, seq, change_time` of
/// `chat_changes`.
fn chat_change_entry(row: &Row<'_>) -> rusqlite::Result<Change> {
    let change = chat_change_of(row.get_ref(1)?.as_str()?, row.get_ref(2)?.as_str()?, row.get_ref(3)?.as_str()?)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, Type::Text, e.into()))?;
    Ok(Change::Chat { change_seq: row.get(0)?, change, seq: Seq(row.get(4)?), time: row.get(5)? })
}

/// A row of `message_id, revision, text, edit_time`.
fn revision_row(row: &Row<'_>) -> rusqlite::Result<Revision> {
    Ok(Revision { message_id: id_at(row, 0)?, revision: row.get(1)?, text: row.get(2)?, edit_time: row.get(3)? })
}

/// Checks a thread reply's `named` root in chat `chat` (see
/// [`NewMessage::thread_root`]) inside the batch's transaction: the root's
/// seq, or the refusal. A root met for the first time gets an entry in
/// `bumps` with its participants as stored.
fn thread_root(
    tx: &Connection,
    chat: ChatId,
    named: Seq,
    bumps: &mut Vec<((ChatId, Seq), ThreadBump)>,
) -> rusqlite::Result<Result<Seq, Sent>> {
    let mut row = tx.prepare_cached(
        "SELECT thread_root_seq, delete_time IS NOT NULL, thread_participants FROM messages \
         WHERE chat_id = ?1 AND seq = ?2",
    )?;
    let mut read = |seq: Seq| {
        row.query_row(params![chat.to_string(), seq.0], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, bool>(1)?, r.get::<_, String>(2)?))
        })
        .optional()
    };
    let Some((row_root, mut deleted, mut participants)) = read(named)? else {
        return Ok(Err(Sent::NoSuchThreadRoot));
    };
    let root = thread_root_of(named, row_root);
    if root != named {
        let Some((_, root_deleted, root_participants)) = read(root)? else {
            return Ok(Err(Sent::NoSuchThreadRoot));
        };
        (deleted, participants) = (root_deleted, root_participants);
    }
    if deleted {
        return Ok(Err(Sent::ThreadRootDeleted));
    }
    if !bumps.iter().any(|(key, _)| *key == (chat, root)) {
        let bump = ThreadBump::of_stored(&participants)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(2, Type::Text, e.into()))?;
        bumps.push(((chat, root), bump));
    }
    Ok(Ok(root))
}

/// A chat's heads as a batch moves them: its id as text, last seq, last
/// change number, and the last change number as stored.
type OpenHeads = (String, i64, i64, i64);

/// Inserts `batch` in one transaction (see the module docs).
fn insert_batch(conn: &mut Connection, batch: Vec<NewMessage>) -> rusqlite::Result<Vec<Sent>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    {
        // A reply names a message stored before the batch: checked before
        // any of the batch is inserted.
        let mut has_seq = tx.prepare_cached("SELECT 1 FROM messages WHERE chat_id = ?1 AND seq = ?2")?;
        let mut replies_ok = Vec::with_capacity(batch.len());
        // Each thread reply's root (checked likewise), and the roots'
        // summaries as stored, to fold the batch's replies into.
        let mut roots: Vec<Result<Option<Seq>, Sent>> = Vec::with_capacity(batch.len());
        let mut bumps: Vec<((ChatId, Seq), ThreadBump)> = Vec::new();
        for m in &batch {
            replies_ok.push(match m.reply_to {
                Some(reply) => has_seq.exists(params![m.chat_id.to_string(), reply.0])?,
                None => true,
            });
            roots.push(match m.thread_root {
                Some(named) => thread_root(&tx, m.chat_id, named, &mut bumps)?.map(Some),
                None => Ok(None),
            });
        }
        // Per chat, the lowest members version the checks of its messages
        // saw: a departure recorded after it refuses them all.
        let mut checked: HashMap<ChatId, i64> = HashMap::new();
        for m in &batch {
            checked.entry(m.chat_id).and_modify(|v| *v = (*v).min(m.members_version)).or_insert(m.members_version);
        }
        let mut read_head = tx.prepare_cached(
            "SELECT last_seq, last_change, closed, members_version, archived FROM chat_heads WHERE chat_id = ?1",
        )?;
        // A stored id (a retry, or one earlier in the batch) inserts
        // nothing: one index lookup, where a SELECT first would walk the id
        // index twice.
        let mut insert = tx.prepare_cached(
            "INSERT INTO messages (id, chat_id, seq, author_id, text, attachments, reply_to_seq, send_time, edit_time, \
             revision, delete_time, change_seq, create_change, flag_severity, flags, mentions, thread_root_seq) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, 1, NULL, ?9, ?9, ?10, ?11, ?12, ?13) \
             ON CONFLICT (id) DO NOTHING",
        )?;
        // chat -> (its id as text, last seq, last change number, the last
        // change number as stored), or the refusal of its messages: a
        // departure after their checks (or the chat's deletion), an
        // archive, a closed direct chat (read in this transaction: the one
        // writer records none between this read and the commit).
        let mut heads: HashMap<ChatId, Result<OpenHeads, Sent>> = HashMap::new();
        for ((mut m, reply_ok), root) in batch.into_iter().zip(replies_ok).zip(roots) {
            let open = match heads.entry(m.chat_id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let chat = m.chat_id.to_string();
                    let stored: Option<(i64, i64, HeadsState)> = read_head
                        .query_row([&chat], |row| {
                            let state =
                                HeadsState { closed: row.get(2)?, members_version: row.get(3)?, archived: row.get(4)? };
                            Ok((row.get(0)?, row.get(1)?, state))
                        })
                        .optional()?;
                    let (seq, change, state) = stored.unwrap_or_default();
                    e.insert(match state.refusal(checked[&m.chat_id], true) {
                        Some(refusal) => Err(refusal.into()),
                        None => Ok((chat, seq, change, change)),
                    })
                }
            };
            // The chat's state first: a message whose reply or root is
            // missing from a purged chat is refused as stale (checked
            // afresh, the chat is not found), not for its reply.
            let (chat, head, change, _) = match open {
                Ok(open) => open,
                Err(refused) => {
                    outcomes.push(refused.clone());
                    continue;
                }
            };
            if !reply_ok {
                outcomes.push(Sent::NoSuchReply);
                continue;
            }
            match root {
                Ok(root) => m.thread_root = root,
                Err(refused) => {
                    outcomes.push(refused);
                    continue;
                }
            }
            let (seq, next_change) = (*head + 1, *change + 1);
            let (flag_severity, flags) = Flags::columns(m.flags.as_ref());
            let inserted = insert.execute(params![
                m.id.to_string(),
                chat.as_str(),
                seq,
                m.author_id.to_string(),
                m.text,
                encode_attachments(&m.attachments),
                m.reply_to.map_or(0, |s| s.0),
                m.send_time,
                next_change,
                flag_severity,
                flags,
                encode_mentions(&m.mentions),
                m.thread_root.map_or(0, |s| s.0)
            ])?;
            if inserted == 0 {
                outcomes.push(Sent::Duplicate);
                continue;
            }
            // Prepared only for a message that mentions someone.
            if m.counted_mentions().next().is_some() {
                // None of a forgotten user: it would outlive the forget
                // (the writer runs one write at a time, so this sees any).
                let mut mention = tx.prepare_cached(
                    "INSERT INTO message_mentions (chat_id, user_id, seq) SELECT ?1, ?2, ?3 \
                     WHERE NOT EXISTS (SELECT 1 FROM forgotten_users WHERE user_id = ?2) ON CONFLICT DO NOTHING",
                )?;
                for user in m.counted_mentions() {
                    mention.execute(params![chat.as_str(), user.to_string(), seq])?;
                }
            }
            (*head, *change) = (seq, next_change);
            if let Some(root) = m.thread_root
                && let Some((_, bump)) = bumps.iter_mut().find(|(key, _)| *key == (m.chat_id, root))
            {
                bump.add(m.author_id, m.send_time);
            }
            outcomes.push(Sent::Created(m.into_message(Seq(seq), next_change)));
        }
        // Each root replied to: the next change number after the batch's
        // messages of its chat, and its summary.
        for ((chat, root), bump) in bumps.iter().filter(|(_, b)| b.replies > 0) {
            let Some(Ok((chat, _, change, _))) = heads.get_mut(chat) else { continue };
            *change += 1;
            tx.prepare_cached(
                "UPDATE messages SET reply_count = reply_count + ?3, \
                 last_reply_time = MAX(COALESCE(last_reply_time, 0), ?4), thread_participants = ?5, change_seq = ?6 \
                 WHERE chat_id = ?1 AND seq = ?2",
            )?
            .execute(params![
                chat.as_str(),
                root.0,
                bump.replies,
                bump.last_reply_time,
                encode_mentions(&bump.participants),
                *change
            ])?;
        }
        let mut write_head = tx.prepare_cached(
            "INSERT INTO chat_heads (chat_id, last_seq, last_change) VALUES (?1, ?2, ?3) \
             ON CONFLICT (chat_id) DO UPDATE SET last_seq = excluded.last_seq, last_change = excluded.last_change",
        )?;
        // Only the heads the batch moved: a chat whose messages were all
        // refused (or retries) keeps its row as it is, or gets none.
        for (chat, head, change, stored) in heads.values().flatten() {
            if change != stored {
                write_head.execute(params![chat, head, change])?;
            }
        }
    }
    tx.commit()?;
    Ok(outcomes)
}

/// `user`'s read position in `chat` as stored, and where a MarkRead to
/// `seq` moves it (clamped to the chat's newest seq).
fn read_and_target(conn: &Connection, chat: &str, user: &str, seq: Seq) -> rusqlite::Result<(i64, i64)> {
    conn.prepare_cached(
        "SELECT COALESCE((SELECT read_seq FROM read_positions WHERE chat_id = ?1 AND user_id = ?2), 0), \
         MIN(?3, COALESCE((SELECT last_seq FROM chat_heads WHERE chat_id = ?1), 0))",
    )?
    .query_row(params![chat, user, seq.0], |row| Ok((row.get(0)?, row.get(1)?)))
}

/// Edits one message in one transaction (see [`MessageStore::edit`]).
fn edit(
    conn: &mut Connection,
    id: &str,
    text: &str,
    (flag_severity, flags): (i32, String),
    now: i64,
    max_edits: usize,
    members_version: i64,
) -> rusqlite::Result<Edited> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let live: Option<(i64, String, String)> = tx
        .prepare_cached("SELECT revision, chat_id, text FROM messages WHERE id = ?1 AND delete_time IS NULL")?
        .query_row([id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .optional()?;
    let Some((revision, chat, current)) = live else { return Ok(Edited::Deleted) };
    if current == text {
        return Ok(Edited::Unchanged(tx.prepare_cached(MESSAGE_BY_ID)?.query_row([id], message_row)?));
    }
    if usize::try_from(revision - 1).unwrap_or(usize::MAX) >= max_edits {
        return Ok(Edited::TooManyEdits);
    }
    tx.prepare_cached(
        "INSERT INTO message_revisions (message_id, revision, text, edit_time) \
         SELECT id, revision, text, COALESCE(edit_time, send_time) FROM messages WHERE id = ?1",
    )?
    .execute([id])?;
    // A departure recorded after the editor's check, an archive or a
    // block's closure refuses the edit (the revision above rolls back with
    // the rest).
    let (change, heads) = next_change_of_members(&tx, &chat)?;
    if let Some(refusal) = heads.refusal(members_version, true) {
        return Ok(refusal.into());
    }
    let message = tx
        .prepare_cached(concat!(
            "UPDATE messages SET text = ?1, revision = revision + 1, edit_time = ?2, change_seq = ?4, \
             flag_severity = ?5, flags = ?6 WHERE id = ?3 RETURNING ",
            message_columns!()
        ))?
        .query_row(params![text, now, id, change, flag_severity, flags], message_row)?;
    tx.commit()?;
    Ok(Edited::Done(message))
}

/// Tombstones one message and its assistant's live replies, replies
/// first, in one transaction (see [`MessageStore::delete_with_replies`]).
fn delete(conn: &mut Connection, id: &str, by: &str, now: i64, members_version: i64) -> rusqlite::Result<Deletion> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let target: Option<(String, i64, i64)> = tx
        .prepare_cached("SELECT chat_id, seq, role FROM messages WHERE id = ?1")?
        .query_row([id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .optional()?;
    let Some((chat, seq, role)) = target else { return Ok(Deletion::NotFound) };
    let mut replies = Vec::new();
    if Role::of(role) == Role::User {
        let live: Vec<String> = tx
            .prepare_cached(
                "SELECT id FROM messages WHERE chat_id = ?1 AND reply_to_seq = ?2 AND role = 2 \
                 AND delete_time IS NULL ORDER BY seq",
            )?
            .query_map(params![chat, seq], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for reply in live {
            // Stale: nothing of the call is kept (dropped, the transaction
            // rolls back).
            if !tombstone(&tx, &reply, by, now, members_version)? {
                return Ok(Deletion::Stale);
            }
            replies.push(tx.prepare_cached(MESSAGE_BY_ID)?.query_row([&reply], message_row)?);
        }
    }
    if !tombstone(&tx, id, by, now, members_version)? {
        return Ok(Deletion::Stale);
    }
    let message = tx.prepare_cached(MESSAGE_BY_ID)?.query_row([id], message_row)?;
    tx.commit()?;
    Ok(Deletion::Done(Deleted { message, replies }))
}

/// Tombstones one live message inside the caller's transaction (a
/// tombstone stays as it is), deleted by `by`: see [`MessageStore::delete`].
/// False, having written nothing the caller keeps (it rolls back), when the
/// chat's members version is above `members_version` (see
/// [`MessageStore::delete_with_replies`]).
fn tombstone(tx: &Connection, id: &str, by: &str, now: i64, members_version: i64) -> rusqlite::Result<bool> {
    let live: Option<(String, i64, String, i64)> = tx
        .prepare_cached(
            "SELECT chat_id, seq, mentions, thread_root_seq FROM messages WHERE id = ?1 AND delete_time IS NULL",
        )?
        .query_row([id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))
        .optional()?;
    let Some((chat, seq, mentions, root)) = live else { return Ok(true) };
    // A departure (or a loss of rights) recorded after the deleting user's
    // check refuses the deletion.
    let (change, heads) = next_change_of_members(tx, &chat)?;
    if heads.refusal(members_version, false).is_some() {
        return Ok(false);
    }
    if root > 0 {
        let root_change = next_change(tx, &chat)?;
        tx.prepare_cached(
            "UPDATE messages SET reply_count = reply_count - 1, change_seq = ?3 \
             WHERE chat_id = ?1 AND seq = ?2 AND reply_count > 0",
        )?
        .execute(params![chat, root, root_change])?;
    }
    tx.prepare_cached(concat!(
        "UPDATE messages SET text = '', attachments = '', delete_time = ?1, change_seq = ?3, flag_severity = 0, \
         flags = '', reaction_rows = 0, mentions = '', pin_time = NULL, pinned_by = NULL, deleted_by = ?4, ",
        stop_generating_sql!(),
        " WHERE id = ?2"
    ))?
    .execute(params![now, id, change, by])?;
    for user in mentions.split_whitespace() {
        tx.prepare_cached("DELETE FROM message_mentions WHERE chat_id = ?1 AND user_id = ?2 AND seq = ?3")?
            .execute(params![chat, user, seq])?;
    }
    tx.prepare_cached("DELETE FROM message_revisions WHERE message_id = ?1")?.execute([id])?;
    tx.prepare_cached("DELETE FROM message_reactions WHERE message_id = ?1")?.execute([id])?;
    Ok(true)
}

/// The reactions of `ids` aggregated per emoji, for `viewer` ('' for
/// none): see [`MessageStore::reactions`].
fn reactions_of(
    conn: &Connection,
    ids: &[String],
    viewer: &str,
) -> rusqlite::Result<HashMap<MessageId, Vec<Reaction>>> {
    let mut out: HashMap<MessageId, Vec<Reaction>> = HashMap::new();
    for chunk in ids.chunks(CHUNK) {
        let marks: Vec<String> = (0..chunk.len()).map(|i| format!("?{}", i + 2)).collect();
        let sql = format!(
            "SELECT message_id, emoji, COUNT(*), MAX(user_id = ?1), MIN(create_time) AS first FROM message_reactions \
             WHERE message_id IN ({}) GROUP BY message_id, emoji ORDER BY message_id, first, emoji",
            marks.join(", ")
        );
        let mut statement = conn.prepare_cached(&sql)?;
        let values = std::iter::once(viewer).chain(chunk.iter().map(String::as_str));
        let mut rows = statement.query(rusqlite::params_from_iter(values))?;
        while let Some(row) = rows.next()? {
            let reaction = Reaction { emoji: row.get(1)?, count: row.get(2)?, mine: row.get(3)? };
            out.entry(id_at(row, 0)?).or_default().push(reaction);
        }
    }
    Ok(out)
}

/// Adds or removes a reaction in one transaction (see
/// [`MessageStore::react`]).
#[expect(clippy::too_many_arguments, reason = "one reaction's fields, as MessageStore::react has them")]
fn react(
    conn: &mut Connection,
    id: &str,
    user: &str,
    emoji: &str,
    add: bool,
    now: i64,
    max_emoji: usize,
    members_version: i64,
) -> rusqlite::Result<Reacted> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let live: Option<String> = tx
        .prepare_cached("SELECT chat_id FROM messages WHERE id = ?1 AND delete_time IS NULL")?
        .query_row([id], |row| row.get(0))
        .optional()?;
    let Some(chat) = live else { return Ok(Reacted::Gone) };
    let written = if add {
        let (held, distinct): (bool, i64) = tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM message_reactions WHERE message_id = ?1 AND emoji = ?2), \
                 (SELECT COUNT(DISTINCT emoji) FROM message_reactions WHERE message_id = ?1)",
            )?
            .query_row(params![id, emoji], |row| Ok((row.get(0)?, row.get(1)?)))?;
        if !held && usize::try_from(distinct).unwrap_or(usize::MAX) >= max_emoji {
            return Ok(Reacted::TooManyEmoji);
        }
        tx.prepare_cached(
            "INSERT INTO message_reactions (message_id, user_id, emoji, create_time) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (message_id, user_id, emoji) DO NOTHING",
        )?
        .execute(params![id, user, emoji, now])?
    } else {
        tx.prepare_cached("DELETE FROM message_reactions WHERE message_id = ?1 AND user_id = ?2 AND emoji = ?3")?
            .execute(params![id, user, emoji])?
    };
    let mut message = if written > 0 {
        // A departure recorded after the reacting user's check refuses the
        // change, and an archive or a block's closure an add (rolled back
        // with the rest).
        let (change, heads) = next_change_of_members(&tx, &chat)?;
        if let Some(refusal) = heads.refusal(members_version, add) {
            return Ok(refusal.into());
        }
        let rows = if add { 1 } else { -1 };
        tx.prepare_cached(concat!(
            "UPDATE messages SET change_seq = ?2, reaction_rows = reaction_rows + ?3 WHERE id = ?1 RETURNING ",
            message_columns!()
        ))?
        .query_row(params![id, change, rows], message_row)?
    } else {
        tx.prepare_cached(MESSAGE_BY_ID)?.query_row([id], message_row)?
    };
    message.reactions = reactions_of(&tx, &[id.to_owned()], user)?.remove(&message.id).unwrap_or_default();
    tx.commit()?;
    Ok(if written > 0 { Reacted::Changed(message) } else { Reacted::Unchanged(message) })
}

/// Rewrites message `id`'s reactions stored in a form `forms` maps into
/// that form, in the caller's transaction (see
/// [`MessageStore::canonicalize_reactions`]): 1 when it rewrote any (the
/// message took a change number), else 0.
fn canonical_reactions(tx: &Connection, id: &String, forms: &HashMap<String, String>) -> rusqlite::Result<u64> {
    let live: Option<String> = tx
        .prepare_cached("SELECT chat_id FROM messages WHERE id = ?1 AND delete_time IS NULL")?
        .query_row([id], |row| row.get(0))
        .optional()?;
    let Some(chat) = live else { return Ok(0) };
    let rows: Vec<(String, String, i64)> = tx
        .prepare_cached("SELECT user_id, emoji, create_time FROM message_reactions WHERE message_id = ?1")?
        .query_map([id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut rewritten = 0;
    for (user, emoji, time) in rows {
        let Some(canonical) = forms.get(&emoji) else { continue };
        tx.prepare_cached("DELETE FROM message_reactions WHERE message_id = ?1 AND user_id = ?2 AND emoji = ?3")?
            .execute(params![id, user, emoji])?;
        tx.prepare_cached(
            "INSERT INTO message_reactions (message_id, user_id, emoji, create_time) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (message_id, user_id, emoji) DO UPDATE SET create_time = min(create_time, excluded.create_time)",
        )?
        .execute(params![id, user, canonical, time])?;
        rewritten = 1;
    }
    if rewritten > 0 {
        let change = next_change(tx, &chat)?;
        tx.prepare_cached(
            "UPDATE messages SET change_seq = ?2, \
             reaction_rows = (SELECT COUNT(*) FROM message_reactions WHERE message_id = ?1) WHERE id = ?1",
        )?
        .execute(params![id, change])?;
    }
    Ok(rewritten)
}

/// Pins or unpins a message in one transaction (see [`MessageStore::pin`]).
fn pin_message(
    conn: &mut Connection,
    id: &str,
    user: &str,
    pin: bool,
    now: i64,
    max_pins: usize,
    members_version: i64,
) -> rusqlite::Result<Pinned> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found = tx.prepare_cached(MESSAGE_BY_ID)?.query_row([id], message_row).optional()?;
    let Some(message) = found.filter(|m| !m.deleted()) else { return Ok(Pinned::Gone) };
    if message.pin.is_some() == pin {
        return Ok(Pinned::Unchanged(message));
    }
    let chat = message.chat_id.to_string();
    if pin {
        let pins: i64 = tx
            .prepare_cached(concat!("SELECT COUNT(*) FROM messages WHERE chat_id = ?1 AND ", pinned_sql!()))?
            .query_row([&chat], |row| row.get(0))?;
        if usize::try_from(pins).unwrap_or(usize::MAX) >= max_pins {
            return Ok(Pinned::TooMany);
        }
    }
    // A departure recorded after the pinning user's check refuses the
    // change, and an archive or a block's closure a pin.
    let (change, heads) = next_change_of_members(&tx, &chat)?;
    if let Some(refusal) = heads.refusal(members_version, pin) {
        return Ok(refusal.into());
    }
    let (time, by) = if pin { (Some(now), Some(user)) } else { (None, None) };
    let message = tx
        .prepare_cached(concat!(
            "UPDATE messages SET change_seq = ?2, pin_time = ?3, pinned_by = ?4 WHERE id = ?1 RETURNING ",
            message_columns!()
        ))?
        .query_row(params![id, change, time, by], message_row)?;
    tx.commit()?;
    Ok(Pinned::Changed(message))
}

/// Starts a reply in one transaction (see [`MessageStore::start_reply`]).
fn start_reply(conn: &mut Connection, r: &NewReply) -> rusqlite::Result<Started> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let id = r.id.to_string();
    let existing = tx.prepare_cached(MESSAGE_BY_ID)?.query_row([&id], message_row).optional()?;
    if let Some(existing) = existing {
        // The caller's own start, still generating: its lease renewed, on
        // the store's clock, in this transaction (a finished reply is
        // never restarted).
        let resumed = match &r.owner {
            Some(owner) => tx
                .prepare_cached(concat!(
                    "UPDATE messages SET checkpoint_time = ?3 \
                     WHERE id = ?1 AND generation = 1 AND reply_owner = ?2 RETURNING ",
                    message_columns!()
                ))?
                .query_row(params![id, owner, natter_kit::time::now_micros()], message_row)
                .optional()?,
            None => None,
        };
        let started = match resumed {
            Some(reply) => Started::Resumed(reply),
            None => Started::Exists(existing),
        };
        tx.commit()?;
        return Ok(started);
    }
    let chat = r.chat_id.to_string();
    let prompt: Option<(i64, bool)> = tx
        .prepare_cached("SELECT seq, delete_time IS NOT NULL FROM messages WHERE id = ?1 AND chat_id = ?2")?
        .query_row(params![r.prompt.to_string(), chat], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((prompt_seq, prompt_deleted)) = prompt else { return Ok(Started::NoSuchPrompt) };
    if prompt_deleted {
        return Ok(Started::PromptDeleted);
    }
    let replaces = r.replaces.map(|m| m.to_string());
    if let Some(old) = &replaces {
        let is_reply = tx
            .prepare_cached("SELECT 1 FROM messages WHERE id = ?1 AND chat_id = ?2 AND role = 2")?
            .exists(params![old, chat])?;
        if !is_reply {
            return Ok(Started::NotAReply);
        }
    }
    if r.finished.is_none() {
        let busy: Option<MessageId> = tx
            .prepare_cached("SELECT id FROM messages WHERE chat_id = ?1 AND generation = 1 LIMIT 1")?
            .query_row([&chat], |row| id_at(row, 0))
            .optional()?;
        if let Some(other) = busy {
            return Ok(Started::Busy(other));
        }
    }
    let (text, generation, info, checkpoint) = match &r.finished {
        Some((status, text, info)) => (text.as_str(), *status, GenerationInfo::encode(Some(info)), None),
        // On the store's clock (`MessageStore::clock`), like every later
        // checkpoint.
        None => ("", Generation::Generating, String::new(), Some(natter_kit::time::now_micros())),
    };
    // The chat's recorded members version, archive and closure, read in
    // the writer's transaction: none is recorded between this read and the
    // commit.
    let (last_seq, last_change, heads) = tx
        .prepare_cached(
            "SELECT last_seq, last_change, members_version, archived, closed FROM chat_heads WHERE chat_id = ?1",
        )?
        .query_row([&chat], |row| {
            let heads = HeadsState { members_version: row.get(2)?, archived: row.get(3)?, closed: row.get(4)? };
            Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, heads))
        })
        .optional()?
        .unwrap_or_default();
    if let Some(refusal) = heads.refusal(r.members_version.unwrap_or(i64::MAX), true) {
        return Ok(refusal.into());
    }
    let (seq, change) = (last_seq + 1, last_change + 1);
    let reply = tx
        .prepare_cached(concat!(
            "INSERT INTO messages (id, chat_id, seq, author_id, text, attachments, reply_to_seq, send_time, edit_time, \
             revision, delete_time, change_seq, create_change, role, generation, replaces_id, generation_info, \
             checkpoint_time, reply_owner) \
             VALUES (?1, ?2, ?3, ?4, ?9, '', ?5, ?6, NULL, 1, NULL, ?7, ?7, 2, ?10, ?8, ?11, ?12, ?13) RETURNING ",
            message_columns!()
        ))?
        .query_row(
            params![
                id,
                chat,
                seq,
                r.author_id.to_string(),
                prompt_seq,
                r.now,
                change,
                replaces,
                text,
                generation as i64,
                info,
                checkpoint,
                r.owner
            ],
            message_row,
        )?;
    let mut last = change;
    let superseded = match &replaces {
        Some(old) => {
            last += 1;
            tx.prepare_cached(concat!(
                "UPDATE messages SET superseded = 1, change_seq = ?2 WHERE id = ?1 RETURNING ",
                message_columns!()
            ))?
            .query_row(params![old, last], message_row)
            .optional()?
        }
        None => None,
    };
    tx.prepare_cached(
        "INSERT INTO chat_heads (chat_id, last_seq, last_change) VALUES (?1, ?2, ?3) \
         ON CONFLICT (chat_id) DO UPDATE SET last_seq = excluded.last_seq, last_change = excluded.last_change",
    )?
    .execute(params![chat, seq, last])?;
    tx.commit()?;
    Ok(Started::Created(reply, superseded))
}

/// Finishes a reply in one transaction (see [`MessageStore::finish_reply`]).
fn finish_reply(conn: &mut Connection, id: &str, finish: &Finish) -> rusqlite::Result<Finishing> {
    let info = GenerationInfo::encode(Some(&finish.info));
    let (flag_severity, flags) = Flags::columns(finish.flags.as_ref());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(reply) = tx.prepare_cached(MESSAGE_BY_ID)?.query_row([id], message_row).optional()? else {
        return Ok(Finishing::NotFound);
    };
    if reply.generation() != Some(Generation::Generating) {
        return Ok(Finishing::Done(Finished { reply, changed: false, restored: None }));
    }
    let text = match finish.stale_before {
        None => finish.text.as_str(),
        Some(before) => {
            let checkpoint: Option<i64> = tx
                .prepare_cached("SELECT checkpoint_time FROM messages WHERE id = ?1")?
                .query_row([id], |row| row.get(0))?;
            if checkpoint.is_some_and(|t| t >= before) {
                return Ok(Finishing::Done(Finished { reply, changed: false, restored: None }));
            }
            reply.text.as_str()
        }
    };
    let chat = reply.chat_id.to_string();
    let (change, heads) = next_change_of_members(&tx, &chat)?;
    let Some(status) = finish.status_under(heads) else {
        // Dropped, the transaction rolls back: no change number taken.
        return Ok(Finishing::Stale);
    };
    let reply = tx
        .prepare_cached(concat!(
            "UPDATE messages SET text = ?2, generation = ?3, generation_info = ?4, change_seq = ?5, \
             checkpoint_time = NULL, flag_severity = ?6, flags = ?7 WHERE id = ?1 RETURNING ",
            message_columns!()
        ))?
        .query_row(params![id, text, status as i64, info, change, flag_severity, flags], message_row)?;
    let restored = match reply.replaces() {
        Some(old) if finish.restore_replaced && status == Generation::Failed => {
            let change = next_change(&tx, &chat)?;
            tx.prepare_cached(concat!(
                "UPDATE messages SET superseded = 0, change_seq = ?2 WHERE id = ?1 AND superseded = 1 RETURNING ",
                message_columns!()
            ))?
            .query_row(params![old.to_string(), change], message_row)
            .optional()?
        }
        _ => None,
    };
    tx.commit()?;
    Ok(Finishing::Done(Finished { reply, changed: true, restored }))
}

/// Records a chat's membership and detail changes in one transaction (see
/// [`MessageStore::record_chat_changes`]).
fn record_chat_changes(
    conn: &mut Connection,
    chat: &str,
    changes: &[ChatChange],
    now: i64,
    origin: &str,
) -> rusqlite::Result<Vec<Logged>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if !origin.is_empty() {
        let recorded = tx
            .prepare_cached(
                "SELECT change_seq, kind, seq FROM chat_changes WHERE chat_id = ?1 AND origin = ?2 ORDER BY change_seq",
            )?
            .query_map(params![chat, origin], |row| {
                Ok(Logged::of_entry(row.get(0)?, row.get_ref(1)?.as_str()?, Seq(row.get(2)?)))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        if !recorded.is_empty() {
            return Ok(recorded);
        }
    }
    let (seq, last): (i64, i64) = tx
        .prepare_cached("SELECT last_seq, last_change FROM chat_heads WHERE chat_id = ?1")?
        .query_row([chat], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?
        .unwrap_or((0, 0));
    // Where a join puts its member's read position: the newest message sent
    // by the time it was committed.
    let joined = if changes.iter().any(|c| matches!(c, ChatChange::Joined(_))) {
        tx.prepare_cached("SELECT seq FROM messages WHERE chat_id = ?1 AND send_time <= ?2 ORDER BY seq DESC LIMIT 1")?
            .query_row(params![chat, now], |row| row.get(0))
            .optional()?
            .unwrap_or(0)
    } else {
        seq
    };
    // Read positions the joiners have already (read while their join was on
    // its way): a join never moves one back.
    let mut kept = HashMap::new();
    {
        let mut read_of =
            tx.prepare_cached("SELECT read_seq FROM read_positions WHERE chat_id = ?1 AND user_id = ?2")?;
        for c in changes {
            if let ChatChange::Joined(user) = c {
                let read: Option<i64> =
                    read_of.query_row(params![chat, user.to_string()], |row| row.get(0)).optional()?;
                kept.insert(*user, read.unwrap_or(0));
            }
        }
    }
    let logged =
        Logged::number(changes, last, Seq(seq), &|user| Seq(joined.max(kept.get(&user).copied().unwrap_or(0))));
    {
        let mut entry = tx.prepare_cached(
            "INSERT INTO chat_changes (chat_id, change_seq, kind, user_id, details, seq, change_time, origin) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        // Not a forgotten user's: it would outlive the forget (the write
        // transaction orders the two).
        let mut reset_read = tx.prepare_cached(
            "INSERT INTO read_positions (chat_id, user_id, read_seq, change_seq) SELECT ?1, ?2, ?3, ?4 \
             WHERE NOT EXISTS (SELECT 1 FROM forgotten_users WHERE user_id = ?2) \
             ON CONFLICT (chat_id, user_id) DO UPDATE SET read_seq = excluded.read_seq, change_seq = excluded.change_seq",
        )?;
        for (c, l) in changes.iter().zip(&logged) {
            let (kind, user, details) = chat_change_row(c);
            entry.execute(params![chat, l.change_seq, kind, user, details, l.seq.0, now, origin])?;
            if let Some((read_change, read_seq)) = l.read {
                reset_read.execute(params![chat, user, read_seq.0, read_change])?;
            }
        }
    }
    tx.prepare_cached(
        "INSERT INTO chat_heads (chat_id, last_seq, last_change) VALUES (?1, 0, ?2) \
         ON CONFLICT (chat_id) DO UPDATE SET last_change = excluded.last_change",
    )?
    .execute(params![chat, Logged::last(&logged).unwrap_or(last)])?;
    if changes.iter().any(|c| matches!(c, ChatChange::Updated(_))) {
        scrub_details(&tx, chat)?;
    }
    // Keep the newest CHAT_LOG_KEEP entries; the floor rises past the rest.
    let cut: Option<i64> = tx
        .prepare_cached(
            "SELECT change_seq FROM chat_changes WHERE chat_id = ?1 ORDER BY change_seq DESC LIMIT 1 OFFSET ?2",
        )?
        .query_row(params![chat, CHAT_LOG_KEEP], |row| row.get(0))
        .optional()?;
    if let Some(cut) = cut {
        tx.prepare_cached("DELETE FROM chat_changes WHERE chat_id = ?1 AND change_seq <= ?2")?
            .execute(params![chat, cut])?;
        tx.prepare_cached("UPDATE chat_heads SET log_floor = MAX(log_floor, ?2) WHERE chat_id = ?1")?
            .execute(params![chat, cut])?;
    }
    tx.commit()?;
    Ok(logged)
}

/// Sets the title and description of every `updated` entry of `chat`'s
/// log to its newest entry's (see [`MessageStore::record_chat_changes`]);
/// the rest of each entry's details stays. Returns how many entries it
/// rewrote.
fn scrub_details(conn: &Connection, chat: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "UPDATE chat_changes \
         SET details = json_set(details, '$.title', newest.title, '$.description', newest.description) \
         FROM (SELECT json_extract(details, '$.title') AS title, \
                 json_extract(details, '$.description') AS description \
               FROM chat_changes WHERE chat_id = ?1 AND kind = 'updated' ORDER BY change_seq DESC LIMIT 1) AS newest \
         WHERE chat_id = ?1 AND kind = 'updated' \
           AND (json_extract(details, '$.title') IS NOT newest.title \
             OR json_extract(details, '$.description') IS NOT newest.description)",
    )?
    .execute([chat])
}

#[async_trait::async_trait]
impl MessageStore for SqliteStore {
    async fn insert_batch(&self, batch: &[NewMessage]) -> Result<Vec<Sent>, StoreError> {
        let batch = batch.to_vec();
        Ok(self.db.write(move |conn| insert_batch(conn, batch)).await?)
    }

    async fn normalize_texts(&self) -> Result<u64, StoreError> {
        let stale: Vec<(String, String, String)> = self
            .db
            .read(|conn| {
                let mut select =
                    conn.prepare("SELECT id, text FROM messages WHERE text <> '' AND generation IS NOT 1")?;
                let mut rows = select.query([])?;
                let mut stale = Vec::new();
                while let Some(row) = rows.next()? {
                    let text: String = row.get(1)?;
                    let normal = crate::domain::nfc(text.clone());
                    if normal != text {
                        stale.push((row.get(0)?, text, normal));
                    }
                }
                Ok(stale)
            })
            .await?;
        // Each row only if its text is still what was read; the search
        // index follows by its trigger.
        self.write_in_batches(stale, REWRITE_BATCH, |tx, (id, old, new)| {
            let mut update = tx.prepare_cached("UPDATE messages SET text = ?3 WHERE id = ?1 AND text = ?2")?;
            Ok(update.execute(rusqlite::params![id, old, new])? as u64)
        })
        .await
    }

    async fn canonicalize_reactions(&self) -> Result<u64, StoreError> {
        let (forms, ids) = self
            .db
            .read(|conn| {
                let stored: Vec<String> = conn
                    .prepare("SELECT DISTINCT emoji FROM message_reactions")?
                    .query_map([], |row| row.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                let forms = super::stale_emoji_forms(stored);
                let mut ids = std::collections::BTreeSet::new();
                let mut select = conn.prepare("SELECT DISTINCT message_id FROM message_reactions WHERE emoji = ?1")?;
                for stale in forms.keys() {
                    for id in select.query_map([stale], |row| row.get::<_, String>(0))? {
                        ids.insert(id?);
                    }
                }
                Ok((forms, ids))
            })
            .await?;
        let forms = std::sync::Arc::new(forms);
        self.write_in_batches(ids.into_iter().collect(), REWRITE_BATCH, move |tx, id| {
            canonical_reactions(tx, id, &forms)
        })
        .await
    }

    async fn clock(&self) -> Result<i64, StoreError> {
        Ok(natter_kit::time::now_micros())
    }

    async fn scrub_chat_details(&self) -> Result<u64, StoreError> {
        // The chats whose entries disagree.
        let chats: Vec<String> = self
            .db
            .read(|conn| {
                conn.prepare(
                    "SELECT chat_id FROM chat_changes WHERE kind = 'updated' GROUP BY chat_id \
                     HAVING COUNT(DISTINCT json_extract(details, '$.title')) > 1 \
                       OR COUNT(DISTINCT json_extract(details, '$.description')) > 1",
                )?
                .query_map([], |row| row.get(0))?
                .collect()
            })
            .await?;
        // On the writer, which every change of a chat goes through.
        self.write_in_batches(chats, SCRUB_BATCH, |tx, chat| Ok(u64::from(scrub_details(tx, chat)? > 0))).await
    }

    async fn backfilled(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        Ok(self
            .db
            .read(move |conn| {
                conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM store_backfills WHERE name = ?1)")?
                    .query_row([name], |row| row.get(0))
            })
            .await?)
    }

    async fn record_backfill(&self, name: &str, now: i64) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.db
            .write(move |conn| {
                conn.execute(
                    "INSERT INTO store_backfills (name, done_time) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
                    rusqlite::params![name, now],
                )
            })
            .await?;
        Ok(())
    }

    async fn message(&self, id: MessageId) -> Result<Option<Message>, StoreError> {
        let id = id.to_string();
        Ok(self
            .db
            .read(move |conn| conn.prepare_cached(MESSAGE_BY_ID)?.query_row([id], message_row).optional())
            .await?)
    }

    async fn edit(
        &self,
        id: MessageId,
        text: &str,
        flags: Option<&Flags>,
        now: i64,
        max_edits: usize,
        members_version: i64,
    ) -> Result<Edited, StoreError> {
        let (id, text, flags) = (id.to_string(), text.to_owned(), Flags::columns(flags));
        Ok(self.db.write(move |conn| edit(conn, &id, &text, flags, now, max_edits, members_version)).await?)
    }

    async fn delete_with_replies(
        &self,
        id: MessageId,
        by: UserId,
        now: i64,
        members_version: i64,
    ) -> Result<Deletion, StoreError> {
        let (id, by) = (id.to_string(), by.to_string());
        Ok(self.db.write(move |conn| delete(conn, &id, &by, now, members_version)).await?)
    }

    async fn replies(&self, chat: ChatId, prompt: Seq) -> Result<Vec<Message>, StoreError> {
        let chat = chat.to_string();
        let replies = self.db.read(move |conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages WHERE chat_id = ?1 AND reply_to_seq = ?2 AND role = 2 ORDER BY seq"
            ))?
            .query_map(params![chat, prompt.0], message_row)?
            .collect::<rusqlite::Result<Vec<_>>>()
        });
        Ok(replies.await?)
    }

    async fn head(&self, chat: ChatId) -> Result<Seq, StoreError> {
        let chat = chat.to_string();
        let head = self.db.read(move |conn| {
            conn.prepare_cached("SELECT last_seq FROM chat_heads WHERE chat_id = ?1")?
                .query_row([chat], |row| row.get(0))
                .optional()
        });
        Ok(Seq(head.await?.unwrap_or(0)))
    }

    async fn list(
        &self,
        chat: ChatId,
        range: Range,
        from: Option<Seq>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let chat = chat.to_string();
        let rows = self.db.read(move |conn| {
            let (sql, bounds) = list_sql(range, from, limit);
            let mut statement = conn.prepare_cached(&sql)?;
            let params = std::iter::once(rusqlite::types::Value::Text(chat))
                .chain(bounds.into_iter().map(rusqlite::types::Value::Integer));
            statement.query_map(rusqlite::params_from_iter(params), message_row)?.collect()
        });
        Ok(rows.await?)
    }

    async fn revisions(&self, message_ids: &[MessageId]) -> Result<Vec<Revision>, StoreError> {
        if message_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = message_ids.iter().map(MessageId::to_string).collect();
        let rows = self.db.read(move |conn| {
            let mut out = Vec::new();
            for chunk in ids.chunks(CHUNK) {
                let marks = vec!["?"; chunk.len()].join(", ");
                let sql = format!(
                    "SELECT message_id, revision, text, edit_time FROM message_revisions WHERE message_id IN ({marks}) \
                     ORDER BY message_id, revision"
                );
                let mut statement = conn.prepare_cached(&sql)?;
                for row in statement.query_map(rusqlite::params_from_iter(chunk), revision_row)? {
                    out.push(row?);
                }
            }
            Ok(out)
        });
        Ok(rows.await?)
    }

    async fn revisions_after(
        &self,
        message_id: MessageId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Revision>, StoreError> {
        let id = message_id.to_string();
        let rows = self.db.read(move |conn| {
            conn.prepare_cached(
                "SELECT message_id, revision, text, edit_time FROM message_revisions \
                 WHERE message_id = ?1 AND revision > ?2 ORDER BY revision LIMIT ?3",
            )?
            .query_map(params![id, after, limit], revision_row)?
            .collect()
        });
        Ok(rows.await?)
    }

    async fn mark_read(
        &self,
        chat: ChatId,
        user: UserId,
        seq: Seq,
        members_version: i64,
    ) -> Result<Marked, StoreError> {
        let (chat, user) = (chat.to_string(), user.to_string());
        // A call that moves nothing (a client repeating itself, or behind)
        // is answered on a reader: the writer, which every send of the
        // process waits for, sees only the calls that move a position.
        let (c, u) = (chat.clone(), user.clone());
        let stays = self.db.read(move |conn| {
            let (read_seq, target) = read_and_target(conn, &c, &u, seq)?;
            if target > read_seq {
                return Ok(None);
            }
            let unread: i64 = conn
                .prepare_cached(concat!("SELECT ", unread_count_sql!("?1", "?2", "?3")))?
                .query_row(params![c, read_seq, u], |row| row.get(0))?;
            Ok(Some(ReadState { read_seq: Seq(read_seq), unread, change_seq: None }))
        });
        if let Some(state) = stays.await? {
            return Ok(Marked::Done(state));
        }
        let state = self.db.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let (read_seq, target) = read_and_target(&tx, &chat, &user, seq)?;
            // A forgotten user's position is not stored: it would outlive
            // the forget (the writer runs one write at a time, so this
            // sees any).
            let forgotten: bool = tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM forgotten_users WHERE user_id = ?1)")?
                .query_row([&user], |row| row.get(0))?;
            let (read_seq, change_seq) = if target > read_seq && !forgotten {
                // A departure recorded after the user's check refuses the
                // move (dropped, the transaction rolls back).
                let (change, heads) = next_change_of_members(&tx, &chat)?;
                if heads.refusal(members_version, false).is_some() {
                    return Ok(Marked::Stale);
                }
                tx.prepare_cached(
                    "INSERT INTO read_positions (chat_id, user_id, read_seq, change_seq) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (chat_id, user_id) DO UPDATE SET read_seq = excluded.read_seq, \
                     change_seq = excluded.change_seq",
                )?
                .execute(params![chat, user, target, change])?;
                (target, Some(change))
            } else {
                (read_seq, None)
            };
            let unread: i64 = tx
                .prepare_cached(concat!("SELECT ", unread_count_sql!("?1", "?2", "?3")))?
                .query_row(params![chat, read_seq, user], |row| row.get(0))?;
            tx.commit()?;
            Ok(Marked::Done(ReadState { read_seq: Seq(read_seq), unread, change_seq }))
        });
        Ok(state.await?)
    }

    async fn record_chat_changes(
        &self,
        chat: ChatId,
        changes: &[ChatChange],
        now: i64,
        origin: &str,
    ) -> Result<Vec<Logged>, StoreError> {
        let (chat, changes, origin) = (chat.to_string(), changes.to_vec(), origin.to_owned());
        Ok(self.db.write(move |conn| record_chat_changes(conn, &chat, &changes, now, &origin)).await?)
    }

    async fn close_direct_chat(&self, chat: ChatId, closed: bool, version: i64) -> Result<(), StoreError> {
        let chat = chat.to_string();
        self.db
            .write(move |conn| {
                conn.prepare_cached(CLOSE_DIRECT_CHAT)?.execute(params![chat, closed, version])?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn archive_chat(&self, chat: ChatId, archived: bool, version: i64) -> Result<(), StoreError> {
        let chat = chat.to_string();
        self.db
            .write(move |conn| {
                conn.prepare_cached(ARCHIVE_CHAT)?.execute(params![chat, archived, version])?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn record_departure(&self, chat: ChatId, version: i64) -> Result<(), StoreError> {
        let chat = chat.to_string();
        self.db
            .write(move |conn| {
                conn.prepare_cached(RECORD_DEPARTURE)?.execute(params![chat, version])?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn heads(&self, chat: ChatId) -> Result<Heads, StoreError> {
        let chat = chat.to_string();
        let heads = self.db.read(move |conn| {
            conn.prepare_cached("SELECT last_seq, last_change, log_floor FROM chat_heads WHERE chat_id = ?1")?
                .query_row([chat], |row| Ok(Heads { seq: Seq(row.get(0)?), change: row.get(1)?, floor: row.get(2)? }))
                .optional()
        });
        Ok(heads.await?.unwrap_or_default())
    }

    async fn latest_membership(&self, chat: ChatId, user: UserId) -> Result<Option<Membership>, StoreError> {
        let (chat, user) = (chat.to_string(), user.to_string());
        let latest = self.db.read(move |conn| {
            conn.prepare_cached(LATEST_MEMBERSHIP_SQL)?
                .query_row([chat, user], |row| Ok(Membership::of_entry(row.get(0)?, row.get_ref(1)?.as_str()?)))
                .optional()
        });
        Ok(latest.await?)
    }

    async fn changes(
        &self,
        chat: ChatId,
        user: UserId,
        after: i64,
        limit: u32,
    ) -> Result<(Vec<Change>, bool), StoreError> {
        let reader = user;
        let (chat, user) = (chat.to_string(), user.to_string());
        let sources = self.db.read(move |conn| {
            // One snapshot for the four sources: read apart, a change
            // committed between them shows in a later source but not in an
            // earlier one, and the page's cursor passes over it for good.
            // Dropped at the end (a rollback: it wrote nothing).
            let conn = conn.unchecked_transaction()?;
            let last_seq: i64 = conn
                .prepare_cached("SELECT last_seq FROM chat_heads WHERE chat_id = ?1")?
                .query_row([&chat], |row| row.get(0))
                .optional()?
                .unwrap_or(0);
            let mut create_change =
                conn.prepare_cached("SELECT create_change FROM messages WHERE chat_id = ?1 AND seq = ?2")?;
            let first = first_seq_created_after(created_after_bounds(after, last_seq), after, |seq| {
                create_change.query_row(params![chat, seq], |row| row.get(0)).optional()
            })?;
            let created = conn
                .prepare_cached(concat!(
                    "SELECT ",
                    message_columns!(),
                    " FROM messages WHERE chat_id = ?1 AND seq >= ?2 AND change_seq = create_change \
                     AND create_change > ?3 ORDER BY seq LIMIT ?4"
                ))?
                .query_map(params![chat, first, after, limit], |row| message_row(row).map(Change::Message))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let changed = conn
                .prepare_cached(concat!(
                    "SELECT ",
                    message_columns!(),
                    " FROM messages WHERE chat_id = ?1 AND change_seq > create_change AND change_seq > ?2 \
                     ORDER BY change_seq LIMIT ?3"
                ))?
                .query_map(params![chat, after, limit], |row| message_row(row).map(Change::Message))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let read = conn
                .prepare_cached(
                    "SELECT change_seq, read_seq FROM read_positions WHERE chat_id = ?1 AND user_id = ?2 \
                     AND change_seq > ?3",
                )?
                .query_row(params![chat, user, after], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            let log = conn
                .prepare_cached(
                    "SELECT change_seq, kind, user_id, details, seq, change_time FROM chat_changes \
                     WHERE chat_id = ?1 AND change_seq > ?2 ORDER BY change_seq LIMIT ?3",
                )?
                .query_map(params![chat, after, limit], chat_change_entry)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((created, changed, read, log))
        });
        let (created, changed, read, log) = sources.await?;
        let read =
            read.map(|(change_seq, read_seq)| Change::Read { change_seq, user: reader, read_seq: Seq(read_seq) });
        Ok(merge_changes([created, changed, read.into_iter().collect(), log], limit))
    }

    async fn summaries(&self, chats: &[ChatId], user: Option<UserId>) -> Result<Vec<Summary>, StoreError> {
        let chats: Vec<String> = chats.iter().map(ChatId::to_string).collect();
        let user = user.map(|u| u.to_string());
        let rows = self.db.read(move |conn| read_summaries(conn, &chats, user.as_deref(), || ()));
        Ok(rows.await?)
    }

    async fn recent_activity(&self, window_us: i64) -> Result<Vec<Activity>, StoreError> {
        let recent = self.db.read(move |conn| {
            let mut rows = conn.prepare("SELECT chat_id, seq, send_time FROM messages ORDER BY rowid DESC")?;
            let mut rows = rows.query([])?;
            let mut newest: HashMap<ChatId, (i64, i64)> = HashMap::new();
            let mut since = None;
            let mut scanned = 0;
            while let Some(row) = rows.next()? {
                let (chat, seq, time): (ChatId, i64, i64) = (id_at(row, 0)?, row.get(1)?, row.get(2)?);
                let since = *since.get_or_insert(time - window_us);
                scanned += 1;
                if time < since || scanned > RECENT_ACTIVITY_ROWS {
                    break;
                }
                let entry = newest.entry(chat).or_insert((seq, time));
                if seq > entry.0 {
                    *entry = (seq, time);
                }
            }
            Ok(newest
                .into_iter()
                .map(|(chat_id, (seq, send_time))| Activity { chat_id, seq: Seq(seq), send_time })
                .collect())
        });
        Ok(recent.await?)
    }

    async fn read_positions(&self, user: UserId, chats: &[ChatId]) -> Result<Vec<Seq>, StoreError> {
        let chats: Vec<String> = chats.iter().map(ChatId::to_string).collect();
        let user = user.to_string();
        let rows = self.db.read(move |conn| {
            let mut read =
                conn.prepare_cached("SELECT read_seq FROM read_positions WHERE chat_id = ?1 AND user_id = ?2")?;
            chats
                .iter()
                .map(|chat| Ok(Seq(read.query_row([chat, &user], |row| row.get(0)).optional()?.unwrap_or(0))))
                .collect()
        });
        Ok(rows.await?)
    }

    async fn chat_read_positions(
        &self,
        chat: ChatId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<(UserId, Seq)>, StoreError> {
        let (chat, after) = (chat.to_string(), after.map(|u| u.to_string()).unwrap_or_default());
        let rows = self.db.read(move |conn| {
            conn.prepare_cached(
                "SELECT user_id, read_seq FROM read_positions WHERE chat_id = ?1 AND user_id > ?2 \
                 ORDER BY user_id LIMIT ?3",
            )?
            .query_map(params![chat, after, limit], |row| Ok((id_at(row, 0)?, Seq(row.get(1)?))))?
            .collect()
        });
        Ok(rows.await?)
    }

    async fn start_reply(&self, reply: &NewReply) -> Result<Started, StoreError> {
        let reply = reply.clone();
        Ok(self.db.write(move |conn| start_reply(conn, &reply)).await?)
    }

    async fn checkpoint_replies(&self, checkpoints: &[Checkpoint], now: i64) -> Result<Vec<Option<bool>>, StoreError> {
        let checkpoints = checkpoints.to_vec();
        let stops = self.db.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut stops = Vec::with_capacity(checkpoints.len());
            {
                let mut update = tx.prepare_cached(
                    "UPDATE messages SET text = COALESCE(?2, text), checkpoint_time = ?3 \
                     WHERE id = ?1 AND generation = 1 RETURNING stop_requested",
                )?;
                for checkpoint in &checkpoints {
                    let id = checkpoint.id.to_string();
                    stops.push(update.query_row(params![id, checkpoint.text, now], |row| row.get(0)).optional()?);
                }
            }
            tx.commit()?;
            Ok(stops)
        });
        Ok(stops.await?)
    }

    async fn finish_reply(&self, id: MessageId, finish: &Finish) -> Result<Finishing, StoreError> {
        let (id, finish) = (id.to_string(), finish.clone());
        Ok(self.db.write(move |conn| finish_reply(conn, &id, &finish)).await?)
    }

    async fn stop_reply(&self, id: MessageId) -> Result<Option<Message>, StoreError> {
        let id = id.to_string();
        let message = self.db.write(move |conn| {
            conn.prepare_cached("UPDATE messages SET stop_requested = 1 WHERE id = ?1 AND generation = 1")?
                .execute([&id])?;
            conn.prepare_cached(MESSAGE_BY_ID)?.query_row([&id], message_row).optional()
        });
        Ok(message.await?)
    }

    async fn stale_replies(&self, before: i64, limit: u32) -> Result<Vec<Message>, StoreError> {
        let rows = self.db.read(move |conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages WHERE generation = 1 AND checkpoint_time < ?1 ORDER BY checkpoint_time LIMIT ?2"
            ))?
            .query_map(params![before, limit], message_row)?
            .collect::<rusqlite::Result<Vec<_>>>()
        });
        Ok(rows.await?)
    }

    async fn raise_flags(&self, id: MessageId, revision: i64, flags: &Flags) -> Result<Option<Message>, StoreError> {
        let (id, (severity, json)) = (id.to_string(), Flags::columns(Some(flags)));
        let raised = self.db.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let chat: Option<String> = tx
                .prepare_cached(
                    "SELECT chat_id FROM messages WHERE id = ?1 AND revision = ?2 AND delete_time IS NULL \
                     AND flag_severity < ?3",
                )?
                .query_row(params![id, revision, severity], |row| row.get(0))
                .optional()?;
            let Some(chat) = chat else { return Ok(None) };
            let change = next_change(&tx, &chat)?;
            let message = tx
                .prepare_cached(concat!(
                    "UPDATE messages SET flag_severity = ?2, flags = ?3, change_seq = ?4 WHERE id = ?1 RETURNING ",
                    message_columns!()
                ))?
                .query_row(params![id, severity, json, change], message_row)?;
            tx.commit()?;
            Ok(Some(message))
        });
        Ok(raised.await?)
    }

    async fn react(
        &self,
        id: MessageId,
        user: UserId,
        emoji: &str,
        add: bool,
        now: i64,
        max_emoji: usize,
        members_version: i64,
    ) -> Result<Reacted, StoreError> {
        let (id, user, emoji) = (id.to_string(), user.to_string(), emoji.to_owned());
        Ok(self.db.write(move |conn| react(conn, &id, &user, &emoji, add, now, max_emoji, members_version)).await?)
    }

    async fn pin(
        &self,
        id: MessageId,
        user: UserId,
        pin: bool,
        now: i64,
        max_pins: usize,
        members_version: i64,
    ) -> Result<Pinned, StoreError> {
        let (id, user) = (id.to_string(), user.to_string());
        Ok(self.db.write(move |conn| pin_message(conn, &id, &user, pin, now, max_pins, members_version)).await?)
    }

    async fn reactions(
        &self,
        ids: &[MessageId],
        viewer: Option<UserId>,
    ) -> Result<HashMap<MessageId, Vec<Reaction>>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<String> = ids.iter().map(MessageId::to_string).collect();
        let viewer = viewer.map(|v| v.to_string()).unwrap_or_default();
        Ok(self.db.read(move |conn| reactions_of(conn, &ids, &viewer)).await?)
    }

    async fn report(&self, report: &StoredReport, members_version: i64) -> Result<Reported, StoreError> {
        let r = report.clone();
        let stored = self.db.write(move |conn| {
            let (message, reporter) = (r.message_id.to_string(), r.reporter.to_string());
            // The chat's members version read in the insert's statement, on
            // its heads row (which every message's chat has); the one writer
            // records no departure meanwhile. No row: nothing inserted.
            conn.prepare_cached(
                "INSERT INTO message_reports (message_id, reporter_id, chat_id, reason, comment, create_time) \
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6 FROM chat_heads WHERE chat_id = ?3 AND members_version <= ?7 \
                 ON CONFLICT (message_id, reporter_id) DO NOTHING",
            )?
            .execute(params![
                message,
                reporter,
                r.chat_id.to_string(),
                r.reason,
                r.comment,
                r.create_time,
                members_version
            ])?;
            conn.prepare_cached(concat!(
                "SELECT ",
                report_columns!(),
                " FROM message_reports WHERE message_id = ?1 AND reporter_id = ?2"
            ))?
            .query_row(params![message, reporter], report_row)
            .optional()
        });
        // None: refused as stale, and no earlier report of theirs.
        Ok(stored.await?.map_or(Reported::Stale, Reported::Stored))
    }

    async fn resolve_reports(
        &self,
        message: MessageId,
        chat: ChatId,
        resolver: UserId,
        now: i64,
        members_version: Option<i64>,
    ) -> Result<Resolved, StoreError> {
        let (message, chat, resolver) = (message.to_string(), chat.to_string(), resolver.to_string());
        let resolved = self.db.write(move |conn| {
            // The chat's members version read in the update's statement, on
            // its heads row (which every message's chat has); the one writer
            // records no departure meanwhile. Staff compare nothing.
            let done = conn
                .prepare_cached(
                    "UPDATE message_reports SET resolve_time = ?3, resolver_id = ?2 \
                     WHERE message_id = ?1 AND resolve_time IS NULL AND (?5 IS NULL OR EXISTS \
                       (SELECT 1 FROM chat_heads WHERE chat_id = ?4 AND members_version <= ?5))",
                )?
                .execute(params![message, resolver, now, chat, members_version])?;
            if done > 0 || members_version.is_none() {
                return Ok(Resolved::Done(done as u64));
            }
            let current = conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM chat_heads WHERE chat_id = ?1 AND members_version <= ?2)",
                )?
                .query_row(params![chat, members_version], |row| row.get(0))?;
            Ok(if current { Resolved::Done(0) } else { Resolved::Stale })
        });
        Ok(resolved.await?)
    }

    async fn flagged(
        &self,
        filter: &QueueFilter,
        from: Option<QueueCursor>,
        limit: u32,
    ) -> Result<Vec<(Message, Vec<StoredReport>)>, StoreError> {
        let chats: Option<Vec<String>> = filter.chats.as_ref().map(|c| c.iter().map(ChatId::to_string).collect());
        if chats.as_ref().is_some_and(Vec::is_empty) {
            return Ok(Vec::new());
        }
        let (min_severity, sent_after, sent_before) = (filter.min_severity, filter.sent_after, filter.sent_before);
        let page = self.db.read(move |conn| {
            let mut sql = format!(
                "SELECT {} FROM messages m WHERE m.delete_time IS NULL AND (m.flag_severity >= ? OR EXISTS \
                 (SELECT 1 FROM message_reports r WHERE r.message_id = m.id AND r.resolve_time IS NULL))",
                message_columns!()
            );
            let mut values: Vec<rusqlite::types::Value> = vec![i64::from(min_severity).into()];
            if let Some((time, id)) = from {
                sql.push_str(" AND (m.send_time < ? OR (m.send_time = ? AND m.id < ?))");
                values.extend([time.into(), time.into(), id.to_string().into()]);
            }
            if let Some(after) = sent_after {
                sql.push_str(" AND m.send_time >= ?");
                values.push(after.into());
            }
            if let Some(before) = sent_before {
                sql.push_str(" AND m.send_time < ?");
                values.push(before.into());
            }
            if let Some(chats) = &chats {
                sql.push_str(&format!(" AND m.chat_id IN ({})", vec!["?"; chats.len()].join(", ")));
                values.extend(chats.iter().map(|c| c.clone().into()));
            }
            sql.push_str(&format!(" ORDER BY m.send_time DESC, m.id DESC LIMIT {limit}"));
            let messages = conn
                .prepare(&sql)?
                .query_map(rusqlite::params_from_iter(values), message_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut open = conn.prepare_cached(concat!(
                "SELECT ",
                report_columns!(),
                " FROM message_reports WHERE message_id = ?1 AND resolve_time IS NULL ORDER BY create_time"
            ))?;
            messages
                .into_iter()
                .map(|m| {
                    let reports =
                        open.query_map([m.id.to_string()], report_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok((m, reports))
                })
                .collect()
        });
        Ok(page.await?)
    }

    async fn search(
        &self,
        filter: &SearchFilter<'_>,
        from: Option<SearchCursor>,
        limit: u32,
    ) -> Result<SearchPage, StoreError> {
        let chats: Vec<String> = filter.chats.iter().map(ChatId::to_string).collect();
        let fts = filter.query.fts5();
        if !filter.relevance {
            let chats: HashSet<String> = chats.into_iter().collect();
            let below = from.map(|c| c.position);
            let page =
                self.db.read(move |conn| search_newest(conn, &fts, &chats, below, limit as usize, SEARCH_SCAN, || ()));
            return Ok(page.await?);
        }
        let mut values: Vec<rusqlite::types::Value> =
            vec![fts.into(), serde_json::to_string(&chats).expect("strings serialize").into()];
        if let Some(c) = from {
            values.extend([c.rank.into(), c.position.into()]);
        }
        let sql = ranked_search_sql(from.is_some(), limit);
        let page = self.db.read(move |conn| {
            if matches_over(conn, &values[0], SEARCH_RANK_MAX)? {
                return Ok(SearchPage { too_broad: true, ..SearchPage::default() });
            }
            let hits = conn
                .prepare_cached(&sql)?
                .query_map(rusqlite::params_from_iter(values), |row| {
                    let cursor =
                        SearchCursor { position: row.get(MESSAGE_COLUMNS)?, rank: row.get(MESSAGE_COLUMNS + 1)? };
                    Ok(SearchHit { message: message_row(row)?, cursor })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(SearchPage { hits, scanned_to: None, too_broad: false })
        });
        Ok(page.await?)
    }

    async fn purge_chat(&self, chat: ChatId) -> Result<(), StoreError> {
        let deletes = &[
            "DELETE FROM message_revisions WHERE message_id IN (SELECT id FROM messages WHERE chat_id = ?1)",
            "DELETE FROM message_reactions WHERE message_id IN (SELECT id FROM messages WHERE chat_id = ?1)",
            "DELETE FROM message_reports WHERE chat_id = ?1",
            "DELETE FROM message_mentions WHERE chat_id = ?1",
            "DELETE FROM messages WHERE chat_id = ?1",
            "DELETE FROM read_positions WHERE chat_id = ?1",
            "DELETE FROM chat_changes WHERE chat_id = ?1",
            PURGE_HEADS,
        ];
        self.in_one_transaction(deletes, chat.to_string()).await
    }

    async fn forget_user(&self, user: UserId) -> Result<(), StoreError> {
        let deletes = &[
            "INSERT INTO forgotten_users (user_id) VALUES (?1) ON CONFLICT (user_id) DO NOTHING",
            "DELETE FROM user_presence WHERE user_id = ?1",
            "DELETE FROM read_positions WHERE user_id = ?1",
            "DELETE FROM message_mentions WHERE user_id = ?1",
        ];
        self.in_one_transaction(deletes, user.to_string()).await
    }

    async fn record_last_seen(&self, seen: &[(UserId, i64)]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        let seen: Vec<(String, i64)> = seen.iter().map(|(u, t)| (u.to_string(), *t)).collect();
        let written = self.db.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut upsert = tx.prepare_cached(
                    "INSERT INTO user_presence (user_id, last_seen_time) \
                     SELECT ?1, ?2 WHERE NOT EXISTS (SELECT 1 FROM forgotten_users WHERE user_id = ?1) \
                     ON CONFLICT (user_id) DO UPDATE SET last_seen_time = MAX(last_seen_time, excluded.last_seen_time)",
                )?;
                for (user, time) in &seen {
                    upsert.execute(params![user, time])?;
                }
            }
            tx.commit()
        });
        Ok(written.await?)
    }

    async fn last_seen(&self, users: &[UserId]) -> Result<HashMap<UserId, i64>, StoreError> {
        let users = users.to_vec();
        let found = self.db.read(move |conn| {
            let mut read = conn.prepare_cached("SELECT last_seen_time FROM user_presence WHERE user_id = ?1")?;
            let mut found = HashMap::new();
            for user in users {
                if let Some(time) = read.query_row([user.to_string()], |row| row.get(0)).optional()? {
                    found.insert(user, time);
                }
            }
            Ok(found)
        });
        Ok(found.await?)
    }

    async fn close(&self) {
        self.db.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain message of `text` by `author` to `chat`.
    fn new_message(chat: ChatId, author: UserId, text: &str) -> NewMessage {
        NewMessage {
            id: MessageId::new_v7(),
            chat_id: chat,
            author_id: author,
            text: text.into(),
            attachments: Vec::new(),
            reply_to: None,
            send_time: 1,
            flags: None,
            mentions: Vec::new(),
            thread_root: None,
            members_version: 0,
        }
    }

    /// A deleted message's text does not stay in the database file's free
    /// space (`secure_delete`): neither a short one, kept in its row's page,
    /// nor a long one, kept in overflow pages that the deletion frees. (The
    /// full-text index holds lower-cased words, never the text as written.)
    #[tokio::test]
    async fn a_deleted_text_leaves_no_bytes_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("messages.db");
        let store = SqliteStore::open(&path, 1).await.unwrap();
        let (chat, author) = (ChatId::new_v7(), UserId::new_v7());
        let short = "Correct-Horse-Battery-Staple-4711!".to_owned();
        let long = format!("Tr0ub4dor&3 {}", "Zx9!".repeat(2000));
        let batch = [new_message(chat, author, &short), new_message(chat, author, &long)];
        store.insert_batch(&batch).await.unwrap();
        let file = || {
            let mut bytes = std::fs::read(&path).unwrap();
            bytes.extend(std::fs::read(path.with_extension("db-wal")).unwrap_or_default());
            bytes
        };
        let holds = |bytes: &[u8], text: &str| bytes.windows(text.len()).any(|w| w == text.as_bytes());
        let checkpoint = || store.db.write(|conn| conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);"));
        checkpoint().await.unwrap();
        let before = file();
        assert!(holds(&before, &short) && holds(&before, &long[..40]), "the texts are in the file at first");
        for m in &batch {
            store.delete(m.id, author, 2).await.unwrap().unwrap();
        }
        checkpoint().await.unwrap();
        let after = file();
        assert!(!holds(&after, &short), "the short text is gone from the file");
        assert!(!holds(&after, &long[..40]), "the long text is gone from the file");
        store.db.close().await;
    }

    /// Newest first, a search reads the FTS5 index in rowid order and stops
    /// at the page's end: no sort of every match (a word in 1% of a
    /// million-message chat is 10,000 of them), each match's message read
    /// by rowid.
    #[tokio::test]
    async fn newest_first_search_walks_the_index_in_order_without_a_sort() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("messages.db"), 1).await.unwrap();
        for after in [false, true] {
            let sql = format!("EXPLAIN QUERY PLAN {}", search_scan_sql(after));
            let plan: Vec<String> = store
                .db
                .read(move |conn| {
                    let mut values: Vec<rusqlite::types::Value> = vec!["\"x\"".to_owned().into()];
                    values.extend(after.then_some(rusqlite::types::Value::Integer(9)));
                    conn.prepare(&sql)?
                        .query_map(rusqlite::params_from_iter(values), |row| row.get::<_, String>(3))?
                        .collect::<rusqlite::Result<_>>()
                })
                .await
                .unwrap();
            assert!(!plan.iter().any(|step| step.contains("TEMP B-TREE")), "{plan:?}");
            assert!(plan.iter().any(|step| step.contains("VIRTUAL TABLE INDEX")), "{plan:?}");
            assert!(plan.iter().any(|step| step.contains("INTEGER PRIMARY KEY (rowid=?)")), "{plan:?}");
        }
        store.db.close().await;
    }

    /// A newest-first search steps through a bounded number of matches per
    /// call: matches of chats not the caller's, newer than theirs, end a
    /// call with no hits and where to go on, and the next calls find the
    /// caller's, each once. By relevance, a query with too many matches on
    /// the server is too broad to rank.
    #[tokio::test]
    async fn a_search_does_a_bounded_share_of_work_per_call_and_goes_on_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("messages.db"), 1).await.unwrap();
        let (mine, others, author) = (ChatId::new_v7(), ChatId::new_v7(), UserId::new_v7());
        let message = |chat: ChatId, text: String| new_message(chat, author, &text);
        let older: Vec<_> = (0..3).map(|i| message(mine, format!("needle mine {i}"))).collect();
        let newer: Vec<_> = (0..25).map(|i| message(others, format!("needle other {i}"))).collect();
        store.insert_batch(&older).await.unwrap();
        store.insert_batch(&newer).await.unwrap();
        let query = crate::search::Query::parse("needle").unwrap();
        let chats: HashSet<String> = [mine.to_string()].into();
        let (mut texts, mut from, mut calls) = (Vec::new(), None, 0);
        loop {
            let (fts, chats) = (query.fts5(), chats.clone());
            let page = store.db.read(move |conn| search_newest(conn, &fts, &chats, from, 10, 10, || ())).await.unwrap();
            calls += 1;
            texts.extend(page.hits.iter().map(|h| h.message.text.clone()));
            match page.scanned_to {
                Some(cursor) => from = Some(cursor.position),
                None => break,
            }
        }
        assert_eq!(texts, ["needle mine 2", "needle mine 1", "needle mine 0"]);
        assert_eq!(calls, 3, "25 other matches, 10 a call, then the caller's");
        let fts = rusqlite::types::Value::from(query.fts5());
        let over = store.db.read(move |conn| Ok((matches_over(conn, &fts, 27)?, matches_over(conn, &fts, 28)?)));
        assert_eq!(over.await.unwrap(), (true, false), "28 matches");
        store.db.close().await;
    }

    /// A newest-first search reads the messages it found in the snapshot
    /// it found them in: a delete, a superseding reply or a purge committed
    /// between its scan and its reads neither comes back as a hit (a
    /// tombstone, a superseded reply), nor fails the search (a row gone),
    /// nor drops a hit (a short page with no cursor ends the results).
    #[tokio::test]
    async fn a_newest_first_search_reads_its_hits_in_the_snapshot_it_found_them_in() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("messages.db"), 1).await.unwrap();
        let (chat, purged, author) = (ChatId::new_v7(), ChatId::new_v7(), UserId::new_v7());
        let live = new_message(chat, author, "needle live");
        let prompt = new_message(chat, author, "a question");
        let deleted = new_message(chat, author, "needle deleted");
        let gone = new_message(purged, author, "needle purged");
        store.insert_batch(&[live, prompt.clone(), deleted.clone(), gone]).await.unwrap();
        let reply = NewReply {
            id: MessageId::new_v7(),
            chat_id: chat,
            author_id: UserId::new_v7(),
            prompt: prompt.id,
            replaces: None,
            now: 2,
            finished: Some((Generation::Complete, "needle reply".into(), GenerationInfo::default())),
            owner: None,
            members_version: None,
        };
        assert!(matches!(store.start_reply(&reply).await.unwrap(), Started::Created(..)));
        let chats: HashSet<String> = [chat.to_string(), purged.to_string()].into();
        // The search waits after its scan until the test's writes are
        // committed.
        let (scanned, scan_done) = tokio::sync::oneshot::channel();
        let (committed, writes_done) = std::sync::mpsc::channel::<()>();
        let fts = crate::search::Query::parse("needle").unwrap().fts5();
        let db = store.db.clone();
        let search = tokio::spawn(async move {
            db.read(move |conn| {
                search_newest(conn, &fts, &chats, None, 10, 10, move || {
                    scanned.send(()).ok();
                    writes_done.recv().ok();
                })
            })
            .await
        });
        scan_done.await.unwrap();
        store.delete(deleted.id, deleted.author_id, 4).await.unwrap().expect("deleted");
        let replacement =
            NewReply { id: MessageId::new_v7(), replaces: Some(reply.id), now: 5, finished: None, ..reply };
        let superseded = store.start_reply(&replacement).await.unwrap();
        assert!(matches!(superseded, Started::Created(_, Some(_))), "{superseded:?}");
        store.purge_chat(purged).await.unwrap();
        committed.send(()).unwrap();
        let page = search.await.unwrap().expect("no error for a row gone");
        let texts: Vec<&str> = page.hits.iter().map(|h| h.message.text.as_str()).collect();
        assert_eq!(texts, ["needle reply", "needle purged", "needle deleted", "needle live"], "as of the scan");
        // The next search sees the writes.
        let (fts, chats) = (crate::search::Query::parse("needle").unwrap().fts5(), [chat.to_string()].into());
        let page = store.db.read(move |conn| search_newest(conn, &fts, &chats, None, 10, 10, || ())).await.unwrap();
        let texts: Vec<&str> = page.hits.iter().map(|h| h.message.text.as_str()).collect();
        assert_eq!(texts, ["needle live"]);
        store.db.close().await;
    }

    /// A chat's summary is read in one snapshot: a message committed while
    /// it is read (after its count) is in none of its parts, so the
    /// preview, the count and the unread count agree.
    #[tokio::test]
    async fn a_summary_is_read_in_one_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("messages.db"), 1).await.unwrap();
        let (chat, reader, author) = (ChatId::new_v7(), UserId::new_v7(), UserId::new_v7());
        store.insert_batch(&[new_message(chat, author, "one"), new_message(chat, author, "two")]).await.unwrap();
        let (counted, count_done) = tokio::sync::oneshot::channel();
        let (committed, write_done) = std::sync::mpsc::channel::<()>();
        let (db, chats, user) = (store.db.clone(), vec![chat.to_string()], reader.to_string());
        let read = tokio::spawn(async move {
            db.read(move |conn| {
                read_summaries(conn, &chats, Some(&user), move || {
                    counted.send(()).ok();
                    write_done.recv().ok();
                })
            })
            .await
        });
        count_done.await.unwrap();
        store.insert_batch(&[new_message(chat, author, "three")]).await.unwrap();
        committed.send(()).unwrap();
        let summary = read.await.unwrap().unwrap().remove(0);
        let newest = summary.newest.expect("a newest message");
        assert_eq!(
            (summary.message_count, summary.unread, newest.text.as_str()),
            (2, 2, "two"),
            "count, unread and preview as of one moment"
        );
        let summary = store.summaries(&[chat], Some(reader)).await.unwrap().remove(0);
        assert_eq!((summary.message_count, summary.unread), (3, 3), "the next read sees the write");
        store.db.close().await;
    }

    /// A MarkRead that moves nothing is answered while the writer is busy
    /// (it does not queue behind every send of the process); one that
    /// moves the position still moves it.
    #[tokio::test]
    async fn a_mark_read_that_moves_nothing_does_not_wait_for_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("messages.db"), 1).await.unwrap();
        let (chat, reader, author) = (ChatId::new_v7(), UserId::new_v7(), UserId::new_v7());
        let message = |text: &str| new_message(chat, author, text);
        store.insert_batch(&[message("one"), message("two")]).await.unwrap();
        let moved = store.mark_read(chat, reader, Seq(1), 0).await.unwrap();
        assert!(matches!(moved, Marked::Done(ReadState { change_seq: Some(_), .. })), "moved");
        // The writer held by a write that waits for the test.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (holding, writer_held) = tokio::sync::oneshot::channel();
        let db = store.db.clone();
        let busy = tokio::spawn(async move {
            db.write(move |_| {
                holding.send(()).ok();
                held.recv().ok();
                Ok(())
            })
            .await
        });
        writer_held.await.unwrap();
        let bound = std::time::Duration::from_secs(10);
        let again = tokio::time::timeout(bound, store.mark_read(chat, reader, Seq(1), 0)).await;
        let again = again.expect("answered while the writer is busy").unwrap();
        assert_eq!(again, Marked::Done(ReadState { read_seq: Seq(1), unread: 1, change_seq: None }));
        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        let Marked::Done(moved) = store.mark_read(chat, reader, Seq(2), 0).await.unwrap() else { panic!("moved") };
        assert_eq!((moved.read_seq, moved.unread), (Seq(2), 0));
        assert!(moved.change_seq.is_some());
        store.db.close().await;
    }
}

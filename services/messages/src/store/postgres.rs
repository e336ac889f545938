//! The messages store on PostgreSQL, through sqlx's native `Postgres`
//! driver: one pool, working in the service's schema.
//!
//! A send batch (a single send is a batch of one) costs one statement and no
//! explicit transaction in the common case: it bumps every chat's head
//! (locking the heads in chat-id order, so concurrent batches of other
//! replicas cannot deadlock) and inserts the rows with the seqs it returned,
//! atomically. Only a batch with replies, or one that hit a stored id (a
//! client's retry: the statement fails on the unique id and writes nothing),
//! first reads which ids are taken and which replies name stored messages
//! (`CHECK_BATCH`); if a concurrent send of the same id commits between the
//! two, the insert fails again and the whole is run once more, finding the
//! id taken. The check is not run on every send because PostgreSQL plans it
//! anew each time (its custom plan stays cheaper than a generic one, ~0.1 ms
//! of planning per send), while the insert settles on a generic plan. Lists
//! of values travel as arrays (`UNNEST`), so each statement's text is the
//! same whatever the batch size and stays prepared. A batch with thread
//! replies is one transaction of its own
//! (`PostgresStore::try_insert_threaded`): it locks the roots, inserts as
//! above and updates each root's summary; batches without any never take
//! that path.

use std::collections::{BTreeMap, HashMap, HashSet};

use natter_kit::id::{ChatId, MessageId, UserId};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row as _};

use super::{
    ARCHIVE_CHAT, Activity, CHAT_LOG_KEEP, CLOSE_DIRECT_CHAT, Change, ChatChange, Checkpoint, Deleted, Deletion,
    Edited, Finish, Finished, Finishing, Flags, Generation, GenerationInfo, Heads, HeadsState, LATEST_MEMBERSHIP_SQL,
    Logged, MESSAGE_COLUMNS, Marked, Membership, Message, MessageStore, NewMessage, NewReply, PURGE_HEADS, Pin, Pinned,
    QueueCursor, QueueFilter, RECORD_DEPARTURE, Range, Reacted, Reaction, ReadState, Reply, Reported, Resolved,
    Revision, Role, SearchCursor, SearchFilter, SearchHit, SearchPage, Sent, Seq, Started, StoreError, StoredReport,
    Summary, ThreadBump, ThreadSummary, aggregates_sql, chat_change_of, chat_change_row, decode_mentions,
    encode_mentions, list_sql, mention_count_sql, merge_changes, message_columns, parse_id, pinned_sql, report_columns,
    stop_generating_sql, thread_root_of, unread_count_sql,
};
use crate::domain::{decode_attachments, encode_attachments};

/// For each message of a batch, in order: whether its id is stored already,
/// and whether its reply (0: none) names a stored message of its chat. `$1`
/// ids, `$2` chat ids, `$3` replies.
/// The database's clock in µs since the Unix epoch, as SQL: the clock
/// replies are checkpointed and judged stale on (see `MessageStore::clock`).
/// `clock_timestamp()`, not `now()`: the time of the statement, not of its
/// transaction's start.
macro_rules! db_clock_micros {
    () => {
        "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
    };
}

/// Then the state of each message's chat as its heads row holds it now
/// (members version, archived, closed; a chat without one: 0, false,
/// false), read without a lock: it only decides why a message refused
/// anyway (a missing reply or thread root) is refused.
const CHECK_BATCH: &str = "SELECT EXISTS (SELECT 1 FROM messages m WHERE m.id = i.id) AS taken, \
     (i.reply = 0 OR EXISTS (SELECT 1 FROM messages m WHERE m.chat_id = i.chat_id AND m.seq = i.reply)) AS reply_ok, \
     COALESCE(h.members_version, 0), COALESCE(h.archived, FALSE), COALESCE(h.closed, FALSE) \
     FROM UNNEST($1::text[], $2::text[], $3::bigint[]) WITH ORDINALITY AS i (id, chat_id, reply, ord) \
     LEFT JOIN chat_heads h ON h.chat_id = i.chat_id ORDER BY i.ord";

/// The batch insert's SQL, `$extra` a further common table expression
/// ("" for none) between the messages' insert and the answer.
macro_rules! insert_batch_sql {
    ($extra:literal) => {
        concat!(
            "WITH heads AS ( \
               INSERT INTO chat_heads (chat_id, last_seq, last_change, members_version) \
               SELECT c.chat_id, c.n, c.n, c.v \
               FROM UNNEST($1::text[], $2::bigint[], $16::bigint[]) WITH ORDINALITY AS c (chat_id, n, v, ord) \
               ORDER BY c.ord \
               ON CONFLICT (chat_id) DO UPDATE SET \
                 last_seq = chat_heads.last_seq + CASE WHEN chat_heads.closed OR chat_heads.archived \
                   OR chat_heads.members_version > excluded.members_version THEN 0 ELSE excluded.last_seq END, \
                 last_change = chat_heads.last_change + CASE WHEN chat_heads.closed OR chat_heads.archived \
                   OR chat_heads.members_version > excluded.members_version THEN 0 ELSE excluded.last_change END \
               RETURNING chat_id, last_seq, last_change, closed, members_version, archived), \
             inserted AS ( \
               INSERT INTO messages (id, chat_id, seq, author_id, text, attachments, reply_to_seq, send_time, edit_time, \
                                     revision, delete_time, change_seq, create_change, flag_severity, flags, mentions, \
                                     search_vector, thread_root_seq) \
               SELECT i.id, i.chat_id, h.last_seq - c.n + i.k, i.author_id, i.text, i.attachments, i.reply, i.send_time, \
                      NULL, 1, NULL, h.last_change - c.n + i.k, h.last_change - c.n + i.k, i.flag_severity, i.flags, \
                      i.mentions, i.search_vector::tsvector, i.thread_root \
               FROM UNNEST($3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[], $8::text[], $9::bigint[], \
                           $10::bigint[], $11::int[], $12::text[], $13::text[], $14::text[], $15::bigint[]) \
                    AS i (id, chat_id, k, author_id, text, attachments, reply, send_time, flag_severity, flags, mentions, \
                          search_vector, thread_root) \
               JOIN heads h ON h.chat_id = i.chat_id AND NOT h.closed AND NOT h.archived \
               JOIN UNNEST($1::text[], $2::bigint[], $16::bigint[]) AS c (chat_id, n, v) \
                 ON c.chat_id = i.chat_id AND h.members_version <= c.v)",
            $extra,
            " SELECT chat_id, last_seq, last_change, closed, members_version, archived FROM heads"
        )
    };
}

/// Bumps the heads of chats `$1` (in chat-id order), seq and change number
/// alike, by counts `$2` unless a departure after `$16` (the lowest members
/// version the checks of each chat's messages saw) is recorded there, and
/// inserts the messages `$3..$15` (id, chat id,
/// 1-based position among the batch's messages of its chat, author, text,
/// attachments, reply, send time, flags, mentions, the text's words
/// as a `tsvector` literal, and the thread root's seq or 0) with seq `head - count + position` and change
/// number likewise; returns every chat's new heads (chat id, seq, change
/// number, closed, members version, archived). A closed direct chat's
/// heads stay as they are and its messages are not inserted, and so do
/// those of an archived chat and of a chat whose recorded members version
/// is above the one its messages' checks saw: `closed`, `archived` and the
/// version are read in the upsert that locks the heads row, so a closure,
/// an archive or a departure committed before it is seen
/// (under READ COMMITTED, ON CONFLICT DO UPDATE locks and works on the
/// row's latest version, even one its snapshot does not see), and one
/// recorded after it waits for this transaction. A new heads row takes the
/// checks' version: no departure was recorded for the chat, and the version
/// they saw is at most the chats service's.
const INSERT_BATCH: &str = insert_batch_sql!("");

/// [`INSERT_BATCH`] for a batch that mentions someone: it also inserts the
/// rows `$17..$19` of `message_mentions` (chat id, the message's position
/// as in `$5`, user id) at the seqs their messages take, in the same
/// statement, but none of a forgotten user (run it after
/// [`hold_off_forgets`]). Batches without mentions keep to
/// [`INSERT_BATCH`], whose plan never sees the table.
const INSERT_BATCH_MENTIONS: &str = insert_batch_sql!(
    ", mentioned AS ( \
       INSERT INTO message_mentions (chat_id, user_id, seq) \
       SELECT n.chat_id, n.user_id, h.last_seq - c.n + n.k \
       FROM UNNEST($17::text[], $18::bigint[], $19::text[]) AS n (chat_id, k, user_id) \
       JOIN heads h ON h.chat_id = n.chat_id AND NOT h.closed AND NOT h.archived \
       JOIN UNNEST($1::text[], $2::bigint[], $16::bigint[]) AS c (chat_id, n, v) \
         ON c.chat_id = n.chat_id AND h.members_version <= c.v \
       WHERE NOT EXISTS (SELECT 1 FROM forgotten_users f WHERE f.user_id = n.user_id) \
       ON CONFLICT DO NOTHING)"
);

/// Messages [`PostgresStore::index_unindexed`] indexes per statement.
const INDEX_BATCH: i64 = 1000;

/// Takes the next change number of chat `$1` (creating its heads row if
/// need be), locking the row until the transaction ends; returns it, then
/// the chat's members version ([`MessageStore::record_departure`], 0 for
/// none), whether it is closed ([`MessageStore::close_direct_chat`]) and
/// whether it is archived ([`MessageStore::archive_chat`]), read on the
/// row's latest version after its lock (so a departure, a closure or an
/// archive committed meanwhile is seen; one recorded after waits for this
/// transaction). Callers that need none of them read the first column only
/// ([`next_change_of_members`] reads them all).
const NEXT_CHANGE: &str = "INSERT INTO chat_heads (chat_id, last_seq, last_change) VALUES ($1, 0, 1) \
     ON CONFLICT (chat_id) DO UPDATE SET last_change = chat_heads.last_change + 1 \
     RETURNING last_change, members_version, closed, archived";

/// [`NEXT_CHANGE`] of chat `chat` in `tx`: its next change number and what
/// its heads row holds then.
async fn next_change_of_members(tx: &mut sqlx::PgConnection, chat: &str) -> Result<(i64, HeadsState), sqlx::Error> {
    let (change, members_version, closed, archived): (i64, i64, bool, bool) =
        sqlx::query_as(NEXT_CHANGE).bind(chat).fetch_one(&mut *tx).await?;
    Ok((change, HeadsState { members_version, archived, closed }))
}

/// `SELECT` of one message by id (`$1`).
const MESSAGE_BY_ID: &str = concat!("SELECT ", message_columns!(), " FROM messages WHERE id = $1");

/// [`MESSAGE_BY_ID`], locking the row for the rest of the transaction.
const MESSAGE_FOR_UPDATE: &str = concat!("SELECT ", message_columns!(), " FROM messages WHERE id = $1 FOR UPDATE");

/// [`MessageStore::purge_chat`]'s deletes of chat `$1`'s rows, run twice in
/// its transaction: before [`PURGE_HEADS`] (so the rows a write locks
/// before the heads row, a message's, are taken in that order, as every
/// write takes them) and again after it. Under READ COMMITTED each
/// statement reads what was committed when it began, so a send that took
/// the heads row before the mark and committed its message after the first
/// pass read the chat is found by the second, which no send can add to
/// behind the heads lock (a later send waits, then reads the mark).
pub(super) const PURGE_ROWS: [&str; 7] = [
    "DELETE FROM message_revisions WHERE message_id IN (SELECT id FROM messages WHERE chat_id = $1)",
    "DELETE FROM message_reactions WHERE message_id IN (SELECT id FROM messages WHERE chat_id = $1)",
    "DELETE FROM message_reports WHERE chat_id = $1",
    "DELETE FROM message_mentions WHERE chat_id = $1",
    "DELETE FROM messages WHERE chat_id = $1",
    "DELETE FROM read_positions WHERE chat_id = $1",
    "DELETE FROM chat_changes WHERE chat_id = $1",
];

/// The arguments of the advisory lock between [`MessageStore::forget_user`]
/// (exclusive) and the writes of rows kept under a user's id that it
/// deletes (shared, [`hold_off_forgets`]): last-seen times
/// ([`MessageStore::record_last_seen`]), read positions
/// ([`MessageStore::mark_read`], a join's
/// [`MessageStore::record_chat_changes`]) and mention rows (a batch that mentions
/// someone, [`MessageStore::insert_batch`]). A key of natter's own ("natt"
/// in ASCII) and a hash of the schema's name, as advisory locks are the
/// whole database's. Such a row is stored only if its user is not
/// forgotten, and `NOT EXISTS` cannot lock a row that is not there yet:
/// without the lock, a write whose statement began before a forget
/// committed stored the row after the forget had deleted it, kept for ever
/// for a deleted user.
macro_rules! forgotten_lock {
    () => {
        "1851880564, hashtext(current_schema() || ' forgotten')"
    };
}

/// Takes `forgotten_lock!` shared in transaction `tx`, as its first
/// statement: a forget under way commits first, and the statements after
/// this one (their snapshots taken after) see the user it forgot. First,
/// so that `tx` holds no row lock while it waits (the forget deletes rows).
async fn hold_off_forgets(tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(concat!("SELECT pg_advisory_xact_lock_shared(", forgotten_lock!(), ")")).execute(&mut *tx).await?;
    Ok(())
}

/// [`MessageStore::forget_user`]'s work for user `user` in transaction
/// `tx`: it takes `forgotten_lock!` exclusively, waiting for the last-seen
/// records under way and holding back those after until `tx` ends, then
/// records the user forgotten and deletes their presence, read positions
/// and mention rows.
pub(super) async fn forget_user_in(tx: &mut sqlx::PgConnection, user: &str) -> Result<(), StoreError> {
    sqlx::query(concat!("SELECT pg_advisory_xact_lock(", forgotten_lock!(), ")")).execute(&mut *tx).await?;
    for sql in [
        "INSERT INTO forgotten_users (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING",
        "DELETE FROM user_presence WHERE user_id = $1",
        "DELETE FROM read_positions WHERE user_id = $1",
        "DELETE FROM message_mentions WHERE user_id = $1",
    ] {
        sqlx::query(sql).bind(user).execute(&mut *tx).await?;
    }
    Ok(())
}

/// The messages store in a PostgreSQL schema.
#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
    /// How long a batch's insert may go unanswered before its connection
    /// is taken for dead ([`natter_db::PoolSettings::unresponsive_after`]).
    unresponsive_after: std::time::Duration,
}

impl PostgresStore {
    /// Connects to `url` with a pool as `pool` says, in `schema` (created
    /// and migrated as needed; see [`natter_db::postgres::connect`]). The
    /// messages stored before search have no index yet:
    /// [`super::open`] indexes them (`PostgresStore::index_unindexed`).
    ///
    /// Errors: an invalid schema name, the server is unreachable, or a
    /// migration fails.
    pub async fn open(url: &str, schema: &str, pool: &natter_db::PoolSettings) -> Result<Self, StoreError> {
        Ok(Self {
            pool: natter_db::postgres::connect(url, schema, pool, &crate::POSTGRES_MIGRATOR).await?,
            unresponsive_after: pool.unresponsive_after(),
        })
    }

    /// Writes the `search_vector` of messages stored before migration 0009
    /// (NULL: its SQL cannot split words as `crate::search` does), a batch
    /// of [`INDEX_BATCH`] at a time; nothing once they all have one.
    /// Returns how many it indexed. Replicas starting together take turns
    /// (under the backfill lock [`super::open`] takes); a message edited
    /// meanwhile keeps its edit's index ([`PostgresStore::write_index`]).
    pub(super) async fn index_unindexed(&self) -> Result<u64, StoreError> {
        let mut indexed = 0;
        loop {
            let rows = self.unindexed_batch().await?;
            if rows.is_empty() {
                return Ok(indexed);
            }
            indexed += self.write_index(rows).await?;
        }
    }

    /// Up to [`INDEX_BATCH`] messages with no `search_vector`: (id, text).
    pub(super) async fn unindexed_batch(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as("SELECT id, text FROM messages WHERE search_vector IS NULL LIMIT $1")
            .bind(INDEX_BATCH)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Writes the `search_vector` of `rows` (id, text as read) where the
    /// message still has none, and returns how many it wrote. A message
    /// whose text was written since it was read (an edit, a delete) has
    /// the index of that write, which is newer: it is left alone (under
    /// READ COMMITTED, PostgreSQL checks `IS NULL` again on the row as the
    /// concurrent write left it).
    pub(super) async fn write_index(&self, rows: Vec<(String, String)>) -> Result<u64, StoreError> {
        let (ids, vectors): (Vec<String>, Vec<String>) =
            rows.into_iter().map(|(id, text)| (id, crate::search::tsvector(&text))).unzip();
        let written = sqlx::query(
            "UPDATE messages m SET search_vector = v.search_vector::tsvector \
             FROM UNNEST($1::text[], $2::text[]) AS v (id, search_vector) \
             WHERE m.id = v.id AND m.search_vector IS NULL",
        )
        .bind(&ids)
        .bind(&vectors)
        .execute(&self.pool)
        .await?;
        Ok(written.rows_affected())
    }

    /// Runs `deletes` (deletes and the like), each with `key` as its one
    /// parameter (`$1`), in order, in ONE transaction.
    async fn in_one_transaction(&self, deletes: &[&'static str], key: String) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for sql in deletes {
            sqlx::query(*sql).bind(&key).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// One attempt at [`MessageStore::start_reply`].
    async fn try_start_reply(&self, r: &NewReply) -> Result<Started, StoreError> {
        let id = r.id.to_string();
        let chat = r.chat_id.to_string();
        if let Some(owner) = &r.owner {
            // The caller's own start, still generating: its lease renewed
            // on the database's clock, in one statement (a finished reply is
            // never restarted; a finish racing this one is waited for and
            // then seen).
            let resumed = sqlx::query(concat!(
                "UPDATE messages SET checkpoint_time = ",
                db_clock_micros!(),
                " WHERE id = $1 AND generation = 1 AND reply_owner = $2 RETURNING ",
                message_columns!()
            ))
            .bind(&id)
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = resumed {
                return Ok(Started::Resumed(message_row(&row)?));
            }
        }
        if let Some(row) = sqlx::query(MESSAGE_BY_ID).bind(&id).fetch_optional(&self.pool).await? {
            return Ok(Started::Exists(message_row(&row)?));
        }
        let mut tx = self.pool.begin().await?;
        // The prompt's row shared-locked: a deletion of it (which locks it
        // first) either committed before, and is seen here, or waits for
        // this start, and deletes its reply too.
        let prompt: Option<(i64, bool)> = sqlx::query_as(
            "SELECT seq, delete_time IS NOT NULL FROM messages WHERE id = $1 AND chat_id = $2 FOR SHARE",
        )
        .bind(r.prompt.to_string())
        .bind(&chat)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((prompt_seq, prompt_deleted)) = prompt else { return Ok(Started::NoSuchPrompt) };
        if prompt_deleted {
            return Ok(Started::PromptDeleted);
        }
        let replaces = r.replaces.map(|m| m.to_string());
        if let Some(old) = &replaces {
            // Lock order everywhere: message rows, then the chat's heads.
            let locked = sqlx::query("SELECT 1 FROM messages WHERE id = $1 AND chat_id = $2 AND role = 2 FOR UPDATE")
                .bind(old)
                .bind(&chat)
                .fetch_optional(&mut *tx)
                .await?;
            if locked.is_none() {
                return Ok(Started::NotAReply);
            }
        }
        // The chat's members version, archive and closure, read on the
        // heads row's latest version after its lock (READ COMMITTED's ON
        // CONFLICT DO UPDATE): a departure, an archive, a closure or a
        // purge committed before is seen, one recorded after waits for this
        // transaction. Returning drops the transaction (rolled back): no
        // seq taken.
        let (seq, change, members_version, archived, closed): (i64, i64, i64, bool, bool) = sqlx::query_as(
            "INSERT INTO chat_heads (chat_id, last_seq, last_change) VALUES ($1, 1, 1) \
             ON CONFLICT (chat_id) DO UPDATE SET last_seq = chat_heads.last_seq + 1, \
             last_change = chat_heads.last_change + 1 \
             RETURNING last_seq, last_change, members_version, archived, closed",
        )
        .bind(&chat)
        .fetch_one(&mut *tx)
        .await?;
        let heads = HeadsState { members_version, archived, closed };
        if let Some(refusal) = heads.refusal(r.members_version.unwrap_or(i64::MAX), true) {
            return Ok(refusal.into());
        }
        // Under the heads lock: a reply another replica started is
        // committed and seen. Returning drops the transaction (rolled back).
        if r.finished.is_none() {
            let busy: Option<(String,)> =
                sqlx::query_as("SELECT id FROM messages WHERE chat_id = $1 AND generation = 1 LIMIT 1")
                    .bind(&chat)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some((other,)) = busy {
                return Ok(Started::Busy(parse_id("id", &other).map_err(StoreError::Corrupt)?));
            }
        }
        // A reply still generating is checkpointed now, on the database's
        // clock, the one every later checkpoint and the sweeper's staleness
        // test read (see `MessageStore::clock`).
        let (text, generation, info, checkpointed) = match &r.finished {
            Some((status, text, info)) => (text.as_str(), *status, GenerationInfo::encode(Some(info)), false),
            None => ("", Generation::Generating, String::new(), true),
        };
        let row = sqlx::query(concat!(
            "INSERT INTO messages (id, chat_id, seq, author_id, text, attachments, reply_to_seq, send_time, edit_time, \
             revision, delete_time, change_seq, create_change, role, generation, replaces_id, generation_info, \
             checkpoint_time, search_vector, reply_owner) \
             VALUES ($1, $2, $3, $4, $9, '', $5, $6, NULL, 1, NULL, $7, $7, 2, $10, $8, $11, \
             CASE WHEN $12 THEN ",
            db_clock_micros!(),
            " END, $13::tsvector, $14) RETURNING ",
            message_columns!()
        ))
        .bind(&id)
        .bind(&chat)
        .bind(seq)
        .bind(r.author_id.to_string())
        .bind(prompt_seq)
        .bind(r.now)
        .bind(change)
        .bind(&replaces)
        .bind(text)
        .bind(generation as i32)
        .bind(info)
        .bind(checkpointed)
        .bind(crate::search::tsvector(text))
        .bind(&r.owner)
        .fetch_one(&mut *tx)
        .await?;
        let reply = message_row(&row)?;
        let mut superseded = None;
        if let Some(old) = &replaces {
            let (change,): (i64,) = sqlx::query_as(NEXT_CHANGE).bind(&chat).fetch_one(&mut *tx).await?;
            let row = sqlx::query(concat!(
                "UPDATE messages SET superseded = 1, change_seq = $2 WHERE id = $1 RETURNING ",
                message_columns!()
            ))
            .bind(old)
            .bind(change)
            .fetch_one(&mut *tx)
            .await?;
            superseded = Some(message_row(&row)?);
        }
        tx.commit().await?;
        Ok(Started::Created(reply, superseded))
    }

    /// One attempt at [`MessageStore::insert_batch`].
    async fn try_insert_batch(&self, batch: &[NewMessage]) -> Result<Vec<Sent>, sqlx::Error> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if batch.iter().any(|m| m.thread_root.is_some()) {
            return self.try_insert_threaded(batch).await;
        }
        let ids: Vec<String> = batch.iter().map(|m| m.id.to_string()).collect();
        let chats: Vec<String> = batch.iter().map(|m| m.chat_id.to_string()).collect();
        let replies: Vec<i64> = batch.iter().map(|m| m.reply_to.map_or(0, |s| s.0)).collect();
        if replies.iter().all(|&r| r == 0) {
            // Optimistic: no reply to check, and ids are new unless a client
            // retries. A stored id fails the statement, which writes nothing.
            let unchecked = vec![Ok(false); batch.len()];
            match self.insert_holding_off_forgets(batch, &ids, &chats, &replies, &unchecked).await {
                Err(e) if natter_db::is_unique_violation(&e) => {}
                other => return other,
            }
        }
        let (checks, _) = check_batch(&self.pool, batch, &ids, &chats, &replies).await?;
        self.insert_holding_off_forgets(batch, &ids, &chats, &replies, &checks).await
    }

    /// [`insert_checked`] on the pool, one statement; for a batch that
    /// mentions someone, in a transaction that [`hold_off_forgets`] first,
    /// so that no mention row outlives a forget of its user that committed
    /// meanwhile (three round trips more, only for such batches).
    async fn insert_holding_off_forgets(
        &self,
        batch: &[NewMessage],
        ids: &[String],
        chats: &[String],
        replies: &[i64],
        checks: &[Result<bool, Sent>],
    ) -> Result<Vec<Sent>, sqlx::Error> {
        if !batch.iter().any(|m| m.counted_mentions().next().is_some()) {
            return insert_checked(&self.pool, batch, ids, chats, replies, checks).await;
        }
        let mut tx = self.pool.begin().await?;
        hold_off_forgets(&mut tx).await?;
        let sent = insert_checked(&mut *tx, batch, ids, chats, replies, checks).await?;
        tx.commit().await?;
        Ok(sent)
    }

    /// One attempt at [`MessageStore::insert_batch`] of a batch with thread
    /// replies, in one transaction: each reply's root is found (a named
    /// reply stands for its root: `thread_root_seq` never changes, so this
    /// read locks nothing), the roots are locked in (chat, seq) order and
    /// checked live, the batch is checked and inserted as any other, then
    /// each root replied to takes its chat's next change number with its
    /// summary. Lock order as everywhere: message rows (the roots), then
    /// the chats' heads.
    async fn try_insert_threaded(&self, batch: &[NewMessage]) -> Result<Vec<Sent>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if batch.iter().any(|m| m.counted_mentions().next().is_some()) {
            hold_off_forgets(&mut tx).await?;
        }
        let named: Vec<(usize, String, i64)> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.thread_root.map(|r| (i, m.chat_id.to_string(), r.0)))
            .collect();
        let found: Vec<(Option<i64>,)> = sqlx::query_as(
            "SELECT m.thread_root_seq FROM UNNEST($1::text[], $2::bigint[]) WITH ORDINALITY AS i (chat_id, seq, ord) \
             LEFT JOIN messages m ON m.chat_id = i.chat_id AND m.seq = i.seq ORDER BY i.ord",
        )
        .bind(named.iter().map(|(_, c, _)| c.as_str()).collect::<Vec<_>>())
        .bind(named.iter().map(|(_, _, r)| *r).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        // Per message: its root (0: in no thread), or the refusal.
        let mut roots: Vec<Result<i64, Sent>> = vec![Ok(0); batch.len()];
        for ((i, _, r), (row_root,)) in named.iter().zip(found) {
            roots[*i] = row_root.map(|row_root| thread_root_of(Seq(*r), row_root).0).ok_or(Sent::NoSuchThreadRoot);
        }
        let mut locked: BTreeMap<(String, i64), Option<(bool, String)>> = BTreeMap::new();
        for (i, root) in roots.iter().enumerate() {
            if let Ok(root) = root.as_ref().copied().map_err(drop)
                && root > 0
            {
                locked.insert((batch[i].chat_id.to_string(), root), None);
            }
        }
        for ((chat, root), state) in &mut locked {
            *state = sqlx::query_as(
                "SELECT delete_time IS NOT NULL, thread_participants FROM messages \
                 WHERE chat_id = $1 AND seq = $2 FOR UPDATE",
            )
            .bind(chat.as_str())
            .bind(*root)
            .fetch_optional(&mut *tx)
            .await?;
        }
        let mut normalized = batch.to_vec();
        let ids: Vec<String> = batch.iter().map(|m| m.id.to_string()).collect();
        let chats: Vec<String> = batch.iter().map(|m| m.chat_id.to_string()).collect();
        let replies: Vec<i64> = batch.iter().map(|m| m.reply_to.map_or(0, |s| s.0)).collect();
        let (mut checks, chat_refusals) = check_batch(&mut *tx, batch, &ids, &chats, &replies).await?;
        for (i, root) in roots.into_iter().enumerate() {
            let refusal = match root {
                Ok(0) => continue,
                Ok(root) => match &locked[&(chats[i].clone(), root)] {
                    None => Sent::NoSuchThreadRoot,
                    Some((true, _)) => Sent::ThreadRootDeleted,
                    Some((false, _)) => {
                        normalized[i].thread_root = Some(Seq(root));
                        continue;
                    }
                },
                Err(refusal) => refusal,
            };
            // The chat's state first, as for a missing reply.
            if checks[i].is_ok() {
                checks[i] = Err(chat_refusals[i].clone().unwrap_or(refusal));
            }
        }
        let outcomes = insert_checked(&mut *tx, &normalized, &ids, &chats, &replies, &checks).await?;
        let mut bumps: BTreeMap<(String, i64), ThreadBump> = BTreeMap::new();
        for sent in &outcomes {
            let Sent::Created(m) = sent else { continue };
            let Some(root) = m.thread_root else { continue };
            let key = (m.chat_id.to_string(), root.0);
            let bump = match bumps.entry(key) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let stored = locked[e.key()].as_ref().map_or("", |(_, p)| p.as_str());
                    e.insert(ThreadBump::of_stored(stored).map_err(|e| sqlx::Error::Decode(e.into()))?)
                }
            };
            bump.add(m.author_id, m.send_time);
        }
        for ((chat, root), bump) in &bumps {
            let (change,): (i64,) = sqlx::query_as(NEXT_CHANGE).bind(chat).fetch_one(&mut *tx).await?;
            sqlx::query(
                "UPDATE messages SET reply_count = reply_count + $3, \
                 last_reply_time = GREATEST(COALESCE(last_reply_time, 0), $4), thread_participants = $5, \
                 change_seq = $6 WHERE chat_id = $1 AND seq = $2",
            )
            .bind(chat)
            .bind(*root)
            .bind(bump.replies)
            .bind(bump.last_reply_time)
            .bind(encode_mentions(&bump.participants))
            .bind(change)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }
}

/// [`CHECK_BATCH`] of `batch`'s messages: per message, whether its id is
/// taken (`Ok`), or its refusal: [`Sent::NoSuchReply`], unless its chat's
/// state refuses it already (see below); and per message, the refusal its
/// chat's state makes as read now ([`HeadsState::refusal`] with the
/// version its check saw: a purged chat's is [`Sent::Stale`]), which the
/// write makes again under the heads row's lock for a message it inserts,
/// and which a message refused for its reply or its thread root gets
/// instead, so that a deleted chat answers NOT_FOUND (checked afresh), not
/// INVALID_ARGUMENT.
async fn check_batch<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    batch: &[NewMessage],
    ids: &[String],
    chats: &[String],
    replies: &[i64],
) -> Result<(Vec<Result<bool, Sent>>, Vec<Option<Sent>>), sqlx::Error> {
    let rows = sqlx::query(CHECK_BATCH).bind(ids).bind(chats).bind(replies).fetch_all(executor).await?;
    if rows.len() != ids.len() {
        return Err(sqlx::Error::Protocol("batch check returned the wrong number of rows".into()));
    }
    let mut checks = Vec::with_capacity(rows.len());
    let mut chat_refusals = Vec::with_capacity(rows.len());
    for (r, m) in rows.iter().zip(batch) {
        let (taken, reply_ok): (bool, bool) = (r.try_get(0)?, r.try_get(1)?);
        let heads = HeadsState { members_version: r.try_get(2)?, archived: r.try_get(3)?, closed: r.try_get(4)? };
        let chat_refusal = heads.refusal(m.members_version, true).map(Sent::from);
        checks.push(if reply_ok { Ok(taken) } else { Err(chat_refusal.clone().unwrap_or(Sent::NoSuchReply)) });
        chat_refusals.push(chat_refusal);
    }
    Ok((checks, chat_refusals))
}

/// Inserts the messages of `batch` that `checks` (per message: whether its
/// id is taken, or why it is refused) lets through, and the outcome of
/// each. `ids`, `chats` and `replies` are the batch's, as bound values.
async fn insert_checked<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    batch: &[NewMessage],
    ids: &[String],
    chats: &[String],
    replies: &[i64],
    checks: &[Result<bool, Sent>],
) -> Result<Vec<Sent>, sqlx::Error> {
    let mut outcomes: Vec<Option<Sent>> = Vec::with_capacity(batch.len());
    let mut seen = HashSet::with_capacity(batch.len());
    // chat -> messages of the batch it takes seqs for.
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    // chat -> the lowest members version the checks of its messages saw.
    let mut checked: HashMap<&str, i64> = HashMap::new();
    for (m, chat) in batch.iter().zip(chats) {
        checked.entry(chat.as_str()).and_modify(|v| *v = (*v).min(m.members_version)).or_insert(m.members_version);
    }
    let mut positions = Vec::with_capacity(batch.len());
    for (i, check) in checks.iter().enumerate() {
        if let Err(refusal) = check {
            outcomes.push(Some(refusal.clone()));
        } else if check == &Ok(true) || !seen.insert(batch[i].id) {
            outcomes.push(Some(Sent::Duplicate));
        } else {
            let n = counts.entry(chats[i].as_str()).or_default();
            *n += 1;
            positions.push((i, *n));
            outcomes.push(None);
        }
    }
    if !positions.is_empty() {
        let (head_chats, head_counts): (Vec<&str>, Vec<i64>) = counts.iter().map(|(c, n)| (*c, *n)).unzip();
        let head_versions: Vec<i64> = head_chats.iter().map(|c| checked[c]).collect();
        let pick = |f: &dyn Fn(usize) -> String| positions.iter().map(|(i, _)| f(*i)).collect::<Vec<_>>();
        // The mention rows: (chat id, position, user id) of each.
        let mut mentions: (Vec<&str>, Vec<i64>, Vec<String>) = Default::default();
        for &(i, k) in &positions {
            for user in batch[i].counted_mentions() {
                mentions.0.push(chats[i].as_str());
                mentions.1.push(k);
                mentions.2.push(user.to_string());
            }
        }
        let sql = if mentions.0.is_empty() { INSERT_BATCH } else { INSERT_BATCH_MENTIONS };
        let query = sqlx::query_as(sql)
            .bind(&head_chats)
            .bind(&head_counts)
            .bind(pick(&|i| ids[i].clone()))
            .bind(pick(&|i| chats[i].clone()))
            .bind(positions.iter().map(|(_, k)| *k).collect::<Vec<i64>>())
            .bind(pick(&|i| batch[i].author_id.to_string()))
            .bind(pick(&|i| batch[i].text.clone()))
            .bind(pick(&|i| encode_attachments(&batch[i].attachments)))
            .bind(positions.iter().map(|(i, _)| replies[*i]).collect::<Vec<i64>>())
            .bind(positions.iter().map(|(i, _)| batch[*i].send_time).collect::<Vec<i64>>())
            .bind(positions.iter().map(|(i, _)| Flags::columns(batch[*i].flags.as_ref()).0).collect::<Vec<i32>>())
            .bind(pick(&|i| Flags::columns(batch[i].flags.as_ref()).1))
            .bind(pick(&|i| encode_mentions(&batch[i].mentions)))
            .bind(pick(&|i| crate::search::tsvector(&batch[i].text)))
            .bind(positions.iter().map(|(i, _)| batch[*i].thread_root.map_or(0, |s| s.0)).collect::<Vec<i64>>())
            .bind(&head_versions);
        let query =
            if mentions.0.is_empty() { query } else { query.bind(&mentions.0).bind(&mentions.1).bind(&mentions.2) };
        let heads: Vec<(String, i64, i64, bool, i64, bool)> = query.fetch_all(executor).await?;
        let heads: HashMap<String, (i64, i64, HeadsState)> = heads
            .into_iter()
            .map(|(chat, seq, change, closed, members_version, archived)| {
                (chat, (seq, change, HeadsState { members_version, archived, closed }))
            })
            .collect();
        for (i, k) in positions {
            let &(seq, change, state) = heads
                .get(&chats[i])
                .ok_or_else(|| sqlx::Error::Protocol("chat head missing from the batch insert".into()))?;
            if let Some(refusal) = state.refusal(checked[chats[i].as_str()], true) {
                outcomes[i] = Some(refusal.into());
                continue;
            }
            let n = counts[chats[i].as_str()];
            outcomes[i] = Some(Sent::Created(batch[i].clone().into_message(Seq(seq - n + k), change - n + k)));
        }
    }
    Ok(outcomes.into_iter().map(|o| o.unwrap_or(Sent::Duplicate)).collect())
}

/// A typed id from a TEXT column.
fn id_at<T: std::str::FromStr>(row: &PgRow, i: usize) -> Result<T, StoreError> {
    let text: &str = row.try_get(i)?;
    parse_id(&format!("column {i}"), text).map_err(StoreError::Corrupt)
}

/// Tombstones one live message inside the caller's transaction (a
/// tombstone stays as it is), deleted by `by`: see
/// [`MessageStore::delete`]. Locks the message's row, then a thread reply's
/// root's, then the chat's heads. False, having written nothing the
/// caller keeps (it rolls back), when the chat's members version is above
/// `members_version` (see [`MessageStore::delete_with_replies`]).
async fn tombstone(
    tx: &mut sqlx::PgConnection,
    id: &str,
    by: &str,
    now: i64,
    members_version: i64,
) -> Result<bool, StoreError> {
    let live: Option<(String, i64, String, i64)> = sqlx::query_as(
        "UPDATE messages SET delete_time = $1, deleted_by = $3 WHERE id = $2 AND delete_time IS NULL \
         RETURNING chat_id, seq, mentions, thread_root_seq",
    )
    .bind(now)
    .bind(id)
    .bind(by)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((chat, seq, mentions, root)) = live else { return Ok(true) };
    if root > 0 {
        // The root's row next (before the heads): the order a thread
        // reply's batch locks them in.
        sqlx::query("SELECT 1 FROM messages WHERE chat_id = $1 AND seq = $2 FOR UPDATE")
            .bind(&chat)
            .bind(root)
            .fetch_optional(&mut *tx)
            .await?;
    }
    // A departure (or a loss of rights) recorded after the deleting
    // user's check refuses the deletion.
    let (change, heads) = next_change_of_members(tx, &chat).await?;
    if heads.refusal(members_version, false).is_some() {
        return Ok(false);
    }
    if root > 0 {
        let (root_change,): (i64,) = sqlx::query_as(NEXT_CHANGE).bind(&chat).fetch_one(&mut *tx).await?;
        sqlx::query(
            "UPDATE messages SET reply_count = reply_count - 1, change_seq = $3 \
             WHERE chat_id = $1 AND seq = $2 AND reply_count > 0",
        )
        .bind(&chat)
        .bind(root)
        .bind(root_change)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(concat!(
        "UPDATE messages SET text = '', attachments = '', change_seq = $2, flag_severity = 0, flags = '', \
         reaction_rows = 0, mentions = '', search_vector = '', pin_time = NULL, pinned_by = NULL, ",
        stop_generating_sql!(),
        " WHERE id = $1"
    ))
    .bind(id)
    .bind(change)
    .execute(&mut *tx)
    .await?;
    if !mentions.is_empty() {
        let users: Vec<&str> = mentions.split_whitespace().collect();
        sqlx::query("DELETE FROM message_mentions WHERE chat_id = $1 AND user_id = ANY($2) AND seq = $3")
            .bind(&chat)
            .bind(&users)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("DELETE FROM message_revisions WHERE message_id = $1").bind(id).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM message_reactions WHERE message_id = $1").bind(id).execute(&mut *tx).await?;
    Ok(true)
}

/// A row of [`message_columns!`].
fn message_row(row: &PgRow) -> Result<Message, StoreError> {
    let attachments: &str = row.try_get(5)?;
    let reply: i64 = row.try_get(6)?;
    let delete_time: Option<i64> = row.try_get(10)?;
    Ok(Message {
        id: id_at(row, 0)?,
        chat_id: id_at(row, 1)?,
        seq: Seq(row.try_get(2)?),
        author_id: id_at(row, 3)?,
        text: row.try_get(4)?,
        attachments: decode_attachments(attachments),
        reply_to: Some(Seq(reply)).filter(|s| s.0 > 0),
        send_time: row.try_get(7)?,
        edit_time: row.try_get(8)?,
        revision: row.try_get(9)?,
        delete_time,
        change_seq: row.try_get(11)?,
        create_change: row.try_get(12)?,
        reply: Reply::of_columns(
            row.try_get::<i32, _>(13)?.into(),
            row.try_get::<i32, _>(14)?.into(),
            row.try_get(15)?,
            row.try_get::<i32, _>(16)? != 0,
            row.try_get(17)?,
            row.try_get::<i32, _>(18)? != 0,
        )
        .map_err(StoreError::Corrupt)?,
        flags: Flags::of_columns(row.try_get::<i32, _>(19)?.into(), row.try_get(20)?),
        reactions: Vec::new(),
        reaction_rows: row.try_get("reaction_rows")?,
        mentions: decode_mentions(row.try_get("mentions")?).map_err(StoreError::Corrupt)?,
        thread_root: Some(Seq(row.try_get("thread_root_seq")?)).filter(|s| s.0 > 0),
        thread: ThreadSummary::of_columns(
            row.try_get("reply_count")?,
            row.try_get("last_reply_time")?,
            row.try_get("thread_participants")?,
        )
        .map_err(StoreError::Corrupt)?,
        pin: Pin::of_columns(row.try_get("pin_time")?, row.try_get("pinned_by")?, delete_time.is_some())
            .map_err(StoreError::Corrupt)?,
        deleted_by: match row.try_get::<Option<&str>, _>("deleted_by")? {
            Some(by) => Some(parse_id("deleted_by", by).map_err(StoreError::Corrupt)?),
            None => None,
        },
    })
}

/// The reactions of `ids` aggregated per emoji, for `viewer` ('' for
/// none): see [`MessageStore::reactions`]. Emoji of the same first time
/// are ordered by their bytes, as on SQLite.
async fn reactions_of<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    ids: &[String],
    viewer: &str,
) -> Result<HashMap<MessageId, Vec<Reaction>>, StoreError> {
    let rows = sqlx::query(
        "SELECT message_id, emoji, COUNT(*), BOOL_OR(user_id = $1), MIN(create_time) AS first \
         FROM message_reactions WHERE message_id = ANY($2) GROUP BY message_id, emoji \
         ORDER BY message_id, first, emoji COLLATE \"C\"",
    )
    .bind(viewer)
    .bind(ids)
    .fetch_all(executor)
    .await?;
    let mut out: HashMap<MessageId, Vec<Reaction>> = HashMap::new();
    for row in &rows {
        let reaction = Reaction { emoji: row.try_get(1)?, count: row.try_get(2)?, mine: row.try_get(3)? };
        out.entry(id_at(row, 0)?).or_default().push(reaction);
    }
    Ok(out)
}

/// Locks message `id`'s row for the rest of `tx` if it is live (not
/// deleted), and returns its chat; None for no such live message.
async fn lock_live_message(tx: &mut sqlx::PgConnection, id: &str) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar("SELECT chat_id FROM messages WHERE id = $1 AND delete_time IS NULL FOR UPDATE")
        .bind(id)
        .fetch_optional(tx)
        .await?)
}

/// A row of [`report_columns!`].
fn report_row(row: &PgRow) -> Result<StoredReport, StoreError> {
    Ok(StoredReport {
        message_id: id_at(row, 0)?,
        reporter: id_at(row, 1)?,
        chat_id: id_at(row, 2)?,
        reason: row.try_get(3)?,
        comment: row.try_get(4)?,
        create_time: row.try_get(5)?,
        resolve_time: row.try_get(6)?,
    })
}

/// Sets the title and description of every `updated` entry of chat `$1`'s
/// log to its newest entry's (see [`MessageStore::record_chat_changes`]);
/// the rest of each entry's details stays.
const SCRUB_DETAILS: &str = "WITH newest AS (SELECT details::jsonb AS d FROM chat_changes \
       WHERE chat_id = $1 AND kind = 'updated' ORDER BY change_seq DESC LIMIT 1) \
     UPDATE chat_changes c SET details = (c.details::jsonb \
       || jsonb_build_object('title', newest.d -> 'title', 'description', newest.d -> 'description'))::text \
     FROM newest WHERE c.chat_id = $1 AND c.kind = 'updated' \
       AND (c.details::jsonb -> 'title' IS DISTINCT FROM newest.d -> 'title' \
         OR c.details::jsonb -> 'description' IS DISTINCT FROM newest.d -> 'description')";

/// A row of `change_seq, kind, user_id, details, seq, change_time` of
/// `chat_changes`.
fn chat_change_entry(row: &PgRow) -> Result<Change, StoreError> {
    let change = chat_change_of(row.try_get(1)?, row.try_get(2)?, row.try_get(3)?).map_err(StoreError::Corrupt)?;
    Ok(Change::Chat { change_seq: row.try_get(0)?, change, seq: Seq(row.try_get(4)?), time: row.try_get(5)? })
}

/// A row of `message_id, revision, text, edit_time`.
fn revision_row(row: &PgRow) -> Result<Revision, StoreError> {
    Ok(Revision {
        message_id: id_at(row, 0)?,
        revision: row.try_get(1)?,
        text: row.try_get(2)?,
        edit_time: row.try_get(3)?,
    })
}

#[async_trait::async_trait]
impl MessageStore for PostgresStore {
    async fn normalize_texts(&self) -> Result<u64, StoreError> {
        let mut after = String::new();
        let mut rewritten = 0;
        loop {
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT id, text FROM messages WHERE id > $1 AND text <> '' AND generation IS DISTINCT FROM 1 \
                 ORDER BY id LIMIT $2",
            )
            .bind(&after)
            .bind(INDEX_BATCH)
            .fetch_all(&self.pool)
            .await?;
            let Some((last, _)) = rows.last() else { return Ok(rewritten) };
            after = last.clone();
            for (id, text) in rows {
                let normal = crate::domain::nfc(text.clone());
                if normal == text {
                    continue;
                }
                rewritten += sqlx::query(
                    "UPDATE messages SET text = $3, search_vector = $4::tsvector WHERE id = $1 AND text = $2",
                )
                .bind(&id)
                .bind(&text)
                .bind(&normal)
                .bind(crate::search::tsvector(&normal))
                .execute(&self.pool)
                .await?
                .rows_affected();
            }
        }
    }

    async fn canonicalize_reactions(&self) -> Result<u64, StoreError> {
        let stored: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT emoji FROM message_reactions").fetch_all(&self.pool).await?;
        let forms = super::stale_emoji_forms(stored);
        if forms.is_empty() {
            return Ok(0);
        }
        let stale: Vec<&str> = forms.keys().map(String::as_str).collect();
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT message_id FROM message_reactions WHERE emoji = ANY($1)")
                .bind(&stale)
                .fetch_all(&self.pool)
                .await?;
        let mut rewritten = 0;
        for id in ids {
            let mut tx = self.pool.begin().await?;
            // Lock order as a reaction's: the message row, then its chat's
            // heads.
            let Some(chat) = lock_live_message(&mut tx, &id).await? else { continue };
            let rows: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT user_id, emoji, create_time FROM message_reactions WHERE message_id = $1 AND emoji = ANY($2)",
            )
            .bind(&id)
            .bind(&stale)
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                continue;
            }
            for (user, emoji, time) in rows {
                sqlx::query("DELETE FROM message_reactions WHERE message_id = $1 AND user_id = $2 AND emoji = $3")
                    .bind(&id)
                    .bind(&user)
                    .bind(&emoji)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO message_reactions (message_id, user_id, emoji, create_time) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (message_id, user_id, emoji) \
                     DO UPDATE SET create_time = LEAST(message_reactions.create_time, EXCLUDED.create_time)",
                )
                .bind(&id)
                .bind(&user)
                .bind(&forms[&emoji])
                .bind(time)
                .execute(&mut *tx)
                .await?;
            }
            let (change,): (i64,) = sqlx::query_as(NEXT_CHANGE).bind(&chat).fetch_one(&mut *tx).await?;
            sqlx::query(
                "UPDATE messages SET change_seq = $2, \
                 reaction_rows = (SELECT COUNT(*) FROM message_reactions WHERE message_id = $1) WHERE id = $1",
            )
            .bind(&id)
            .bind(change)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            rewritten += 1;
        }
        Ok(rewritten)
    }

    async fn clock(&self) -> Result<i64, StoreError> {
        let (now,): (i64,) = sqlx::query_as(concat!("SELECT ", db_clock_micros!())).fetch_one(&self.pool).await?;
        Ok(now)
    }

    async fn scrub_chat_details(&self) -> Result<u64, StoreError> {
        let chats: Vec<String> = sqlx::query_scalar(
            "SELECT chat_id FROM chat_changes WHERE kind = 'updated' GROUP BY chat_id \
             HAVING COUNT(DISTINCT details::jsonb -> 'title') > 1 \
               OR COUNT(DISTINCT details::jsonb -> 'description') > 1",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut rewritten = 0;
        for chat in chats {
            // Each chat under its heads' lock, which every change of the
            // chat takes first: a change recorded meanwhile by a replica
            // (which scrubs as it records) is either seen or waits.
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT 1 FROM chat_heads WHERE chat_id = $1 FOR UPDATE")
                .bind(&chat)
                .fetch_optional(&mut *tx)
                .await?;
            let scrubbed = sqlx::query(SCRUB_DETAILS).bind(&chat).execute(&mut *tx).await?.rows_affected();
            tx.commit().await?;
            rewritten += u64::from(scrubbed > 0);
        }
        Ok(rewritten)
    }

    async fn backfilled(&self, name: &str) -> Result<bool, StoreError> {
        let (done,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM store_backfills WHERE name = $1)")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(done)
    }

    async fn record_backfill(&self, name: &str, now: i64) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO store_backfills (name, done_time) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn insert_batch(&self, batch: &[NewMessage]) -> Result<Vec<Sent>, StoreError> {
        // Bounded: the writer commits one batch at a time, so a connection
        // whose server vanished unnoticed (no TCP keepalive) would stall
        // every send for good. Given up, the batch's callers hear
        // UNAVAILABLE (committed or not: their retries find the message
        // by its id) and the next batch takes another connection.
        let attempt = || async {
            tokio::time::timeout(self.unresponsive_after, self.try_insert_batch(batch))
                .await
                .map_err(|_| StoreError::Db(natter_db::DbError::Unresponsive(self.unresponsive_after)))
        };
        match attempt().await? {
            // A concurrent send of one of the ids committed between the
            // check and the insert: the next check sees it.
            Err(e) if natter_db::is_unique_violation(&e) => Ok(attempt().await??),
            other => Ok(other?),
        }
    }

    async fn message(&self, id: MessageId) -> Result<Option<Message>, StoreError> {
        let row = sqlx::query(MESSAGE_BY_ID).bind(id.to_string()).fetch_optional(&self.pool).await?;
        row.as_ref().map(message_row).transpose()
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
        let id = id.to_string();
        let (flag_severity, flags) = Flags::columns(flags);
        let mut tx = self.pool.begin().await?;
        // Lock the row first so concurrent edits queue, each keeps the text
        // it replaces and sees the revision count the others left.
        let locked: Option<(i64, String, String)> = sqlx::query_as(
            "UPDATE messages SET revision = revision WHERE id = $1 AND delete_time IS NULL \
             RETURNING revision, chat_id, text",
        )
        .bind(&id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((revision, chat, current)) = locked else { return Ok(Edited::Deleted) };
        if current == text {
            let row = sqlx::query(MESSAGE_BY_ID).bind(&id).fetch_one(&mut *tx).await?;
            return Ok(Edited::Unchanged(message_row(&row)?));
        }
        if usize::try_from(revision - 1).unwrap_or(usize::MAX) >= max_edits {
            return Ok(Edited::TooManyEdits);
        }
        sqlx::query(
            "INSERT INTO message_revisions (message_id, revision, text, edit_time) \
             SELECT id, revision, text, COALESCE(edit_time, send_time) FROM messages WHERE id = $1",
        )
        .bind(&id)
        .execute(&mut *tx)
        .await?;
        // Lock order everywhere: a message row, then its chat's heads. A
        // departure recorded after the editor's check, an archive or a
        // block's closure refuses the edit (the revision above rolls back
        // with the rest).
        let (change, heads) = next_change_of_members(&mut tx, &chat).await?;
        if let Some(refusal) = heads.refusal(members_version, true) {
            return Ok(refusal.into());
        }
        let row = sqlx::query(concat!(
            "UPDATE messages SET text = $1, revision = revision + 1, edit_time = $2, change_seq = $4, \
             flag_severity = $5, flags = $6, search_vector = $7::tsvector WHERE id = $3 RETURNING ",
            message_columns!()
        ))
        .bind(text)
        .bind(now)
        .bind(&id)
        .bind(change)
        .bind(flag_severity)
        .bind(flags)
        .bind(crate::search::tsvector(text))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Edited::Done(message_row(&row)?))
    }

    async fn delete_with_replies(
        &self,
        id: MessageId,
        by: UserId,
        now: i64,
        members_version: i64,
    ) -> Result<Deletion, StoreError> {
        let (id, by) = (id.to_string(), by.to_string());
        let mut tx = self.pool.begin().await?;
        // Lock the message's row first (a StartReply of it shares this
        // lock), then its live replies' in seq order, then (each
        // tombstone) the chat's heads.
        let target: Option<(String, i64, i32)> =
            sqlx::query_as("SELECT chat_id, seq, role FROM messages WHERE id = $1 FOR UPDATE")
                .bind(&id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((chat, seq, role)) = target else { return Ok(Deletion::NotFound) };
        let mut replies = Vec::new();
        if Role::of(role.into()) == Role::User {
            let live: Vec<(String,)> = sqlx::query_as(
                "SELECT id FROM messages WHERE chat_id = $1 AND reply_to_seq = $2 AND role = 2 \
                 AND delete_time IS NULL ORDER BY seq FOR UPDATE",
            )
            .bind(&chat)
            .bind(seq)
            .fetch_all(&mut *tx)
            .await?;
            for (reply,) in live {
                // Stale: nothing of the call is kept (the transaction rolls
                // back when dropped).
                if !tombstone(&mut tx, &reply, &by, now, members_version).await? {
                    return Ok(Deletion::Stale);
                }
                let row = sqlx::query(MESSAGE_BY_ID).bind(&reply).fetch_one(&mut *tx).await?;
                replies.push(message_row(&row)?);
            }
        }
        if !tombstone(&mut tx, &id, &by, now, members_version).await? {
            return Ok(Deletion::Stale);
        }
        let row = sqlx::query(MESSAGE_BY_ID).bind(&id).fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok(Deletion::Done(Deleted { message: message_row(&row)?, replies }))
    }

    async fn replies(&self, chat: ChatId, prompt: Seq) -> Result<Vec<Message>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE chat_id = $1 AND reply_to_seq = $2 AND role = 2 ORDER BY seq"
        ))
        .bind(chat.to_string())
        .bind(prompt.0)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(message_row)
        .collect()
    }

    async fn archive_chat(&self, chat: ChatId, archived: bool, version: i64) -> Result<(), StoreError> {
        sqlx::query(ARCHIVE_CHAT).bind(chat.to_string()).bind(archived).bind(version).execute(&self.pool).await?;
        Ok(())
    }

    async fn close_direct_chat(&self, chat: ChatId, closed: bool, version: i64) -> Result<(), StoreError> {
        sqlx::query(CLOSE_DIRECT_CHAT).bind(chat.to_string()).bind(closed).bind(version).execute(&self.pool).await?;
        Ok(())
    }

    async fn record_departure(&self, chat: ChatId, version: i64) -> Result<(), StoreError> {
        sqlx::query(RECORD_DEPARTURE).bind(chat.to_string()).bind(version).execute(&self.pool).await?;
        Ok(())
    }

    async fn head(&self, chat: ChatId) -> Result<Seq, StoreError> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT last_seq FROM chat_heads WHERE chat_id = $1")
            .bind(chat.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(Seq(row.map_or(0, |(s,)| s)))
    }

    async fn list(
        &self,
        chat: ChatId,
        range: Range,
        from: Option<Seq>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let (sql, bounds) = list_sql(range, from, limit);
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(chat.to_string());
        for bound in bounds {
            query = query.bind(bound);
        }
        query.fetch_all(&self.pool).await?.iter().map(message_row).collect()
    }

    async fn revisions(&self, message_ids: &[MessageId]) -> Result<Vec<Revision>, StoreError> {
        if message_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = message_ids.iter().map(MessageId::to_string).collect();
        sqlx::query(
            "SELECT message_id, revision, text, edit_time FROM message_revisions WHERE message_id = ANY($1) \
             ORDER BY message_id, revision",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(revision_row)
        .collect()
    }

    async fn revisions_after(
        &self,
        message_id: MessageId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Revision>, StoreError> {
        sqlx::query(
            "SELECT message_id, revision, text, edit_time FROM message_revisions \
             WHERE message_id = $1 AND revision > $2 ORDER BY revision LIMIT $3",
        )
        .bind(message_id.to_string())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(revision_row)
        .collect()
    }

    async fn mark_read(
        &self,
        chat: ChatId,
        user: UserId,
        seq: Seq,
        members_version: i64,
    ) -> Result<Marked, StoreError> {
        let (chat, user) = (chat.to_string(), user.to_string());
        // Without a lock first: most calls do not move the position (a
        // client marks what it already marked), and those take no change
        // number, lock nothing and cost this one statement.
        let (stored, target, unread): (i64, i64, i64) = sqlx::query_as(concat!(
            "WITH r AS (SELECT COALESCE((SELECT read_seq FROM read_positions WHERE chat_id = $1 AND user_id = $2), 0) \
             AS read_seq) SELECT r.read_seq, \
             LEAST($3, COALESCE((SELECT last_seq FROM chat_heads WHERE chat_id = $1), 0)), ",
            unread_count_sql!("$1", "r.read_seq", "$2"),
            " FROM r"
        ))
        .bind(&chat)
        .bind(&user)
        .bind(seq.0)
        .fetch_one(&self.pool)
        .await?;
        let mut state = ReadState { read_seq: Seq(stored), unread, change_seq: None };
        if target <= stored {
            return Ok(Marked::Done(state));
        }
        // Lock order: the forgets held off, the chat's heads, then the
        // position. A concurrent call that moved the position as far first
        // leaves this one nothing to do, and so does a forget of the user
        // that committed meanwhile (a position stored now would outlive
        // it): it rolls back, returning its number.
        let mut tx = self.pool.begin().await?;
        hold_off_forgets(&mut tx).await?;
        // A departure recorded after the user's check refuses the move
        // (rolled back when dropped).
        let (change, heads) = next_change_of_members(&mut tx, &chat).await?;
        if heads.refusal(members_version, false).is_some() {
            return Ok(Marked::Stale);
        }
        let moved: Option<(i64,)> = sqlx::query_as(
            "INSERT INTO read_positions (chat_id, user_id, read_seq, change_seq) SELECT $1, $2, $3, $4 \
             WHERE NOT EXISTS (SELECT 1 FROM forgotten_users WHERE user_id = $2) \
             ON CONFLICT (chat_id, user_id) DO UPDATE SET read_seq = excluded.read_seq, \
             change_seq = excluded.change_seq WHERE read_positions.read_seq < excluded.read_seq RETURNING read_seq",
        )
        .bind(&chat)
        .bind(&user)
        .bind(target)
        .bind(change)
        .fetch_optional(&mut *tx)
        .await?;
        if moved.is_some() {
            tx.commit().await?;
            state = ReadState { read_seq: Seq(target), unread: 0, change_seq: Some(change) };
        } else {
            tx.rollback().await?;
            // None: the user was forgotten.
            let now: Option<i64> =
                sqlx::query_scalar("SELECT read_seq FROM read_positions WHERE chat_id = $1 AND user_id = $2")
                    .bind(&chat)
                    .bind(&user)
                    .fetch_optional(&self.pool)
                    .await?;
            state.read_seq = Seq(now.unwrap_or(0));
        }
        let (unread,): (i64,) = sqlx::query_as(concat!("SELECT ", unread_count_sql!("$1", "$2", "$3")))
            .bind(&chat)
            .bind(state.read_seq.0)
            .bind(&user)
            .fetch_one(&self.pool)
            .await?;
        state.unread = unread;
        Ok(Marked::Done(state))
    }

    async fn record_chat_changes(
        &self,
        chat: ChatId,
        changes: &[ChatChange],
        now: i64,
        origin: &str,
    ) -> Result<Vec<Logged>, StoreError> {
        let chat = chat.to_string();
        let mut tx = self.pool.begin().await?;
        // A join stores its joiner's read position: not a forgotten user's
        // (a ForgetUser under way commits first, and the position's insert
        // sees it), as MarkRead. First, before the heads' row lock.
        if changes.iter().any(|c| matches!(c, ChatChange::Joined(_))) {
            hold_off_forgets(&mut tx).await?;
        }
        // Lock the chat's heads first (as every writer of the chat does),
        // which also orders two calls of the same origin.
        let (seq, last): (i64, i64) = sqlx::query_as(
            "INSERT INTO chat_heads (chat_id, last_seq, last_change) VALUES ($1, 0, 0) \
             ON CONFLICT (chat_id) DO UPDATE SET last_change = chat_heads.last_change RETURNING last_seq, last_change",
        )
        .bind(&chat)
        .fetch_one(&mut *tx)
        .await?;
        if !origin.is_empty() {
            let recorded: Vec<(i64, String, i64)> = sqlx::query_as(
                "SELECT change_seq, kind, seq FROM chat_changes WHERE chat_id = $1 AND origin = $2 ORDER BY change_seq",
            )
            .bind(&chat)
            .bind(origin)
            .fetch_all(&mut *tx)
            .await?;
            if !recorded.is_empty() {
                tx.rollback().await?;
                return Ok(recorded
                    .into_iter()
                    .map(|(change_seq, kind, seq)| Logged::of_entry(change_seq, &kind, Seq(seq)))
                    .collect());
            }
        }
        // Where a join puts its member's read position: the newest message
        // sent by the time it was committed.
        let joined: i64 = if changes.iter().any(|c| matches!(c, ChatChange::Joined(_))) {
            sqlx::query_scalar(
                "SELECT seq FROM messages WHERE chat_id = $1 AND send_time <= $2 ORDER BY seq DESC LIMIT 1",
            )
            .bind(&chat)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?
            .unwrap_or(0)
        } else {
            seq
        };
        // Read positions the joiners have already (read while their join was
        // on its way): a join never moves one back.
        let joiners: Vec<String> = changes
            .iter()
            .filter_map(|c| match c {
                ChatChange::Joined(user) => Some(user.to_string()),
                _ => None,
            })
            .collect();
        let kept: HashMap<String, i64> = if joiners.is_empty() {
            HashMap::new()
        } else {
            sqlx::query_as("SELECT user_id, read_seq FROM read_positions WHERE chat_id = $1 AND user_id = ANY($2)")
                .bind(&chat)
                .bind(&joiners)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect()
        };
        let read_of = |user: UserId| Seq(joined.max(kept.get(&user.to_string()).copied().unwrap_or(0)));
        let logged = Logged::number(changes, last, Seq(seq), &read_of);
        let numbers: Vec<i64> = logged.iter().map(|l| l.change_seq).collect();
        let seqs: Vec<i64> = logged.iter().map(|l| l.seq.0).collect();
        let (mut kinds, mut users, mut details) = (Vec::new(), Vec::new(), Vec::new());
        // user -> (read position's change number, seq): the last join of
        // each user (an upsert may touch a row once per statement).
        let mut reads: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for (c, l) in changes.iter().zip(&logged) {
            let (kind, user, detail) = chat_change_row(c);
            if let Some((read_change, read_seq)) = l.read {
                reads.insert(user.clone(), (read_change, read_seq.0));
            }
            kinds.push(kind);
            users.push(user);
            details.push(detail);
        }
        sqlx::query(
            "INSERT INTO chat_changes (chat_id, change_seq, kind, user_id, details, seq, change_time, origin) \
             SELECT $1, c.n, c.kind, c.user_id, c.details, c.seq, $7, $8 \
             FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[]) \
             AS c (n, kind, user_id, details, seq)",
        )
        .bind(&chat)
        .bind(&numbers)
        .bind(&kinds)
        .bind(&users)
        .bind(&details)
        .bind(&seqs)
        .bind(now)
        .bind(origin)
        .execute(&mut *tx)
        .await?;
        if !reads.is_empty() {
            let (read_users, reads): (Vec<String>, Vec<(i64, i64)>) = reads.into_iter().unzip();
            let (read_changes, read_seqs): (Vec<i64>, Vec<i64>) = reads.into_iter().unzip();
            sqlx::query(
                "INSERT INTO read_positions (chat_id, user_id, read_seq, change_seq) \
                 SELECT $1, r.user_id, r.seq, r.n FROM UNNEST($2::text[], $3::bigint[], $4::bigint[]) \
                 AS r (user_id, n, seq) \
                 WHERE NOT EXISTS (SELECT 1 FROM forgotten_users f WHERE f.user_id = r.user_id) \
                 ON CONFLICT (chat_id, user_id) DO UPDATE SET read_seq = excluded.read_seq, \
                 change_seq = excluded.change_seq",
            )
            .bind(&chat)
            .bind(&read_users)
            .bind(&read_changes)
            .bind(&read_seqs)
            .execute(&mut *tx)
            .await?;
        }
        // The new head; the log keeps its newest CHAT_LOG_KEEP entries and
        // the floor rises past the rest.
        sqlx::query(
            "WITH cut AS (SELECT change_seq FROM chat_changes WHERE chat_id = $1 \
               ORDER BY change_seq DESC LIMIT 1 OFFSET $3), \
             pruned AS (DELETE FROM chat_changes WHERE chat_id = $1 AND change_seq <= (SELECT change_seq FROM cut)) \
             UPDATE chat_heads SET last_change = $2, \
               log_floor = GREATEST(log_floor, COALESCE((SELECT change_seq FROM cut), 0)) WHERE chat_id = $1",
        )
        .bind(&chat)
        .bind(Logged::last(&logged).unwrap_or(last))
        .bind(CHAT_LOG_KEEP)
        .execute(&mut *tx)
        .await?;
        if changes.iter().any(|c| matches!(c, ChatChange::Updated(_))) {
            sqlx::query(SCRUB_DETAILS).bind(&chat).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(logged)
    }

    async fn heads(&self, chat: ChatId) -> Result<Heads, StoreError> {
        let row: Option<(i64, i64, i64)> =
            sqlx::query_as("SELECT last_seq, last_change, log_floor FROM chat_heads WHERE chat_id = $1")
                .bind(chat.to_string())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map_or_else(Heads::default, |(seq, change, floor)| Heads { seq: Seq(seq), change, floor }))
    }

    async fn latest_membership(&self, chat: ChatId, user: UserId) -> Result<Option<Membership>, StoreError> {
        let latest: Option<(i64, String)> = sqlx::query_as(LATEST_MEMBERSHIP_SQL)
            .bind(chat.to_string())
            .bind(user.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(latest.map(|(n, kind)| Membership::of_entry(n, &kind)))
    }

    async fn changes(
        &self,
        chat: ChatId,
        user: UserId,
        after: i64,
        limit: u32,
    ) -> Result<(Vec<Change>, bool), StoreError> {
        let id = chat.to_string();
        // One snapshot for the four sources: read apart, a change committed
        // between them shows in a later source but not in an earlier one,
        // and the page's cursor passes over it for good.
        let mut tx = self.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?;
        // Both message sources bind (chat, after, limit).
        async fn messages(
            tx: &mut sqlx::PgConnection,
            sql: &'static str,
            id: &str,
            after: i64,
            limit: u32,
        ) -> Result<Vec<Change>, StoreError> {
            sqlx::query(sql)
                .bind(id)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(tx)
                .await?
                .iter()
                .map(|row| message_row(row).map(Change::Message))
                .collect()
        }
        // The binary search of `first_seq_created_after`, as a recursive
        // query (one round trip; `lo` only grows, so the greatest is where
        // it ended), then the seq range from there.
        let created = messages(
            &mut tx,
            concat!(
                "WITH RECURSIVE search (lo, hi) AS ( \
               SELECT 1::bigint, LEAST(GREATEST($2, 0), \
                 COALESCE((SELECT last_seq FROM chat_heads WHERE chat_id = $1), 0)) + 1 \
               UNION ALL \
               SELECT CASE WHEN m.create_change > $2 THEN s.lo ELSE (s.lo + s.hi) / 2 + 1 END, \
                      CASE WHEN m.create_change > $2 THEN (s.lo + s.hi) / 2 ELSE s.hi END \
               FROM search s JOIN messages m ON m.chat_id = $1 AND m.seq = (s.lo + s.hi) / 2 \
               WHERE s.lo < s.hi) \
             SELECT ",
                message_columns!(),
                " FROM messages WHERE chat_id = $1 AND seq >= (SELECT MAX(lo) FROM search) \
             AND change_seq = create_change AND create_change > $2 ORDER BY seq LIMIT $3"
            ),
            &id,
            after,
            limit,
        )
        .await?;
        let changed = messages(
            &mut tx,
            concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages WHERE chat_id = $1 AND change_seq > create_change AND change_seq > $2 \
                 ORDER BY change_seq LIMIT $3"
            ),
            &id,
            after,
            limit,
        )
        .await?;
        let read: Option<(i64, i64)> = sqlx::query_as(
            "SELECT change_seq, read_seq FROM read_positions WHERE chat_id = $1 AND user_id = $2 AND change_seq > $3",
        )
        .bind(&id)
        .bind(user.to_string())
        .bind(after)
        .fetch_optional(&mut *tx)
        .await?;
        let log = sqlx::query(
            "SELECT change_seq, kind, user_id, details, seq, change_time FROM chat_changes \
             WHERE chat_id = $1 AND change_seq > $2 ORDER BY change_seq LIMIT $3",
        )
        .bind(&id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(chat_change_entry)
        .collect::<Result<Vec<_>, _>>()?;
        tx.commit().await?;
        let read = read.map(|(change_seq, read_seq)| Change::Read { change_seq, user, read_seq: Seq(read_seq) });
        Ok(merge_changes([created, changed, read.into_iter().collect(), log], limit))
    }

    async fn summaries(&self, chats: &[ChatId], user: Option<UserId>) -> Result<Vec<Summary>, StoreError> {
        // One statement for the whole page (a LATERAL join per chat), where
        // a query per chat and value cost ~90 µs of this process's CPU each.
        // No user ('' for $2): no counts, and their subqueries never run.
        let ids: Vec<String> = chats.iter().map(ChatId::to_string).collect();
        let rows = sqlx::query(concat!(
            "SELECT m.*, CASE WHEN $2 = '' THEN 0 ELSE ",
            unread_count_sql!("v.chat_id", "COALESCE(r.read_seq, 0)", "$2"),
            " END AS unread, ",
            aggregates_sql!("v.chat_id"),
            ", CASE WHEN $2 = '' THEN 0 ELSE ",
            mention_count_sql!("v.chat_id", "COALESCE(r.read_seq, 0)", "$2"),
            " END FROM UNNEST($1::text[]) WITH ORDINALITY AS v (chat_id, ord) \
             LEFT JOIN LATERAL (SELECT ",
            message_columns!(),
            " FROM messages WHERE chat_id = v.chat_id ORDER BY seq DESC LIMIT 1) m ON TRUE \
             LEFT JOIN read_positions r ON r.chat_id = v.chat_id AND r.user_id = $2 ORDER BY v.ord"
        ))
        .bind(&ids)
        .bind(user.map_or_else(String::new, |u| u.to_string()))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: Option<&str> = row.try_get(0)?;
                let newest = if id.is_some() { Some(message_row(row)?) } else { None };
                Ok(Summary {
                    newest,
                    unread: row.try_get(MESSAGE_COLUMNS)?,
                    message_count: row.try_get(MESSAGE_COLUMNS + 1)?,
                    max_severity: row.try_get(MESSAGE_COLUMNS + 2)?,
                    mentions: row.try_get(MESSAGE_COLUMNS + 3)?,
                })
            })
            .collect()
    }

    async fn recent_activity(&self, _window_us: i64) -> Result<Vec<Activity>, StoreError> {
        Ok(Vec::new())
    }

    async fn read_positions(&self, user: UserId, chats: &[ChatId]) -> Result<Vec<Seq>, StoreError> {
        let ids: Vec<String> = chats.iter().map(ChatId::to_string).collect();
        let rows: Vec<(i64,)> = sqlx::query_as(
            "SELECT COALESCE(r.read_seq, 0) FROM UNNEST($1::text[]) WITH ORDINALITY AS v (chat_id, ord) \
             LEFT JOIN read_positions r ON r.chat_id = v.chat_id AND r.user_id = $2 ORDER BY v.ord",
        )
        .bind(&ids)
        .bind(user.to_string())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(s,)| Seq(s)).collect())
    }

    async fn chat_read_positions(
        &self,
        chat: ChatId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<(UserId, Seq)>, StoreError> {
        let rows = sqlx::query(
            "SELECT user_id, read_seq FROM read_positions WHERE chat_id = $1 AND user_id > $2 \
             ORDER BY user_id LIMIT $3",
        )
        .bind(chat.to_string())
        .bind(after.map(|u| u.to_string()).unwrap_or_default())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok((id_at(row, 0)?, Seq(row.try_get(1)?)))).collect()
    }

    async fn start_reply(&self, reply: &NewReply) -> Result<Started, StoreError> {
        match self.try_start_reply(reply).await {
            // A concurrent start of the same reply committed first: the next
            // try finds it.
            Err(StoreError::Db(natter_db::DbError::Sqlx(e))) if natter_db::is_unique_violation(&e) => {
                self.try_start_reply(reply).await
            }
            other => other,
        }
    }

    async fn checkpoint_replies(&self, checkpoints: &[Checkpoint], now: i64) -> Result<Vec<Option<bool>>, StoreError> {
        let ids: Vec<String> = checkpoints.iter().map(|c| c.id.to_string()).collect();
        let texts: Vec<Option<&str>> = checkpoints.iter().map(|c| c.text.as_deref()).collect();
        let vectors: Vec<Option<String>> =
            checkpoints.iter().map(|c| c.text.as_deref().map(crate::search::tsvector)).collect();
        let rows: Vec<(String, i32)> = sqlx::query_as(
            "UPDATE messages m SET text = COALESCE(c.text, m.text), checkpoint_time = $3, \
             search_vector = COALESCE(c.search_vector::tsvector, m.search_vector) \
             FROM UNNEST($1::text[], $2::text[], $4::text[]) AS c(id, text, search_vector) \
             WHERE m.id = c.id AND m.generation = 1 RETURNING m.id, m.stop_requested",
        )
        .bind(&ids)
        .bind(&texts)
        .bind(now)
        .bind(&vectors)
        .fetch_all(&self.pool)
        .await?;
        let stops: std::collections::HashMap<String, bool> = rows.into_iter().map(|(id, s)| (id, s != 0)).collect();
        Ok(ids.iter().map(|id| stops.get(id).copied()).collect())
    }

    async fn finish_reply(&self, id: MessageId, finish: &Finish) -> Result<Finishing, StoreError> {
        let id = id.to_string();
        let restore_replaced = finish.restore_replaced;
        let (flag_severity, flags) = Flags::columns(finish.flags.as_ref());
        let mut tx = self.pool.begin().await?;
        // Lock order everywhere: message rows, then the chat's heads.
        let Some(row) = sqlx::query(MESSAGE_FOR_UPDATE).bind(&id).fetch_optional(&mut *tx).await? else {
            return Ok(Finishing::NotFound);
        };
        let reply = message_row(&row)?;
        if reply.generation() != Some(Generation::Generating) {
            return Ok(Finishing::Done(Finished { reply, changed: false, restored: None }));
        }
        let text = match finish.stale_before {
            None => finish.text.clone(),
            Some(before) => {
                let (checkpoint,): (Option<i64>,) =
                    sqlx::query_as("SELECT checkpoint_time FROM messages WHERE id = $1")
                        .bind(&id)
                        .fetch_one(&mut *tx)
                        .await?;
                if checkpoint.is_some_and(|t| t >= before) {
                    return Ok(Finishing::Done(Finished { reply, changed: false, restored: None }));
                }
                reply.text.clone()
            }
        };
        // The replaced reply is locked before the heads (the lock order),
        // on the status asked for, and restored on the status stored.
        let restore =
            reply.replaces().filter(|_| restore_replaced && finish.status == Generation::Failed).map(|m| m.to_string());
        if let Some(old) = &restore {
            sqlx::query("SELECT 1 FROM messages WHERE id = $1 FOR UPDATE").bind(old).execute(&mut *tx).await?;
        }
        let chat = reply.chat_id.to_string();
        let (change, heads) = next_change_of_members(&mut tx, &chat).await?;
        let Some(status) = finish.status_under(heads) else {
            // Dropped, the transaction rolls back: no change number taken.
            return Ok(Finishing::Stale);
        };
        let restore = restore.filter(|_| status == Generation::Failed);
        let row = sqlx::query(concat!(
            "UPDATE messages SET text = $2, generation = $3, generation_info = $4, change_seq = $5, \
             checkpoint_time = NULL, flag_severity = $6, flags = $7, search_vector = $8::tsvector WHERE id = $1 \
             RETURNING ",
            message_columns!()
        ))
        .bind(&id)
        .bind(&text)
        .bind(status as i32)
        .bind(GenerationInfo::encode(Some(&finish.info)))
        .bind(change)
        .bind(flag_severity)
        .bind(flags)
        .bind(crate::search::tsvector(&text))
        .fetch_one(&mut *tx)
        .await?;
        let reply = message_row(&row)?;
        let mut restored = None;
        if let Some(old) = &restore {
            let (change,): (i64,) = sqlx::query_as(NEXT_CHANGE).bind(&chat).fetch_one(&mut *tx).await?;
            let row = sqlx::query(concat!(
                "UPDATE messages SET superseded = 0, change_seq = $2 WHERE id = $1 AND superseded = 1 RETURNING ",
                message_columns!()
            ))
            .bind(old)
            .bind(change)
            .fetch_optional(&mut *tx)
            .await?;
            restored = row.as_ref().map(message_row).transpose()?;
        }
        tx.commit().await?;
        Ok(Finishing::Done(Finished { reply, changed: true, restored }))
    }

    async fn stop_reply(&self, id: MessageId) -> Result<Option<Message>, StoreError> {
        let id = id.to_string();
        sqlx::query("UPDATE messages SET stop_requested = 1 WHERE id = $1 AND generation = 1")
            .bind(&id)
            .execute(&self.pool)
            .await?;
        let row = sqlx::query(MESSAGE_BY_ID).bind(&id).fetch_optional(&self.pool).await?;
        row.as_ref().map(message_row).transpose()
    }

    async fn stale_replies(&self, before: i64, limit: u32) -> Result<Vec<Message>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE generation = 1 AND checkpoint_time < $1 ORDER BY checkpoint_time LIMIT $2"
        ))
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(message_row)
        .collect()
    }

    async fn raise_flags(&self, id: MessageId, revision: i64, flags: &Flags) -> Result<Option<Message>, StoreError> {
        let (id, (severity, json)) = (id.to_string(), Flags::columns(Some(flags)));
        let mut tx = self.pool.begin().await?;
        // Lock order everywhere: a message row, then its chat's heads.
        let locked: Option<(String,)> = sqlx::query_as(
            "UPDATE messages SET flag_severity = flag_severity WHERE id = $1 AND revision = $2 \
             AND delete_time IS NULL AND flag_severity < $3 RETURNING chat_id",
        )
        .bind(&id)
        .bind(revision)
        .bind(severity)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((chat,)) = locked else { return Ok(None) };
        let (change,): (i64,) = sqlx::query_as(NEXT_CHANGE).bind(&chat).fetch_one(&mut *tx).await?;
        let row = sqlx::query(concat!(
            "UPDATE messages SET flag_severity = $2, flags = $3, change_seq = $4 WHERE id = $1 RETURNING ",
            message_columns!()
        ))
        .bind(&id)
        .bind(severity)
        .bind(json)
        .bind(change)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(message_row(&row)?))
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
        let (id, user) = (id.to_string(), user.to_string());
        let mut tx = self.pool.begin().await?;
        // Lock order everywhere: a message row, then its chat's heads. The
        // row lock queues the message's reactions, so the limit check and
        // the write see the same rows.
        let Some(chat) = lock_live_message(&mut tx, &id).await? else { return Ok(Reacted::Gone) };
        let done = if add {
            let (held, distinct): (bool, i64) = sqlx::query_as(
                "SELECT EXISTS (SELECT 1 FROM message_reactions WHERE message_id = $1 AND emoji = $2), \
                 (SELECT COUNT(DISTINCT emoji) FROM message_reactions WHERE message_id = $1)",
            )
            .bind(&id)
            .bind(emoji)
            .fetch_one(&mut *tx)
            .await?;
            if !held && usize::try_from(distinct).unwrap_or(usize::MAX) >= max_emoji {
                return Ok(Reacted::TooManyEmoji);
            }
            sqlx::query(
                "INSERT INTO message_reactions (message_id, user_id, emoji, create_time) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (message_id, user_id, emoji) DO NOTHING",
            )
            .bind(&id)
            .bind(&user)
            .bind(emoji)
            .bind(now)
            .execute(&mut *tx)
            .await?
        } else {
            sqlx::query("DELETE FROM message_reactions WHERE message_id = $1 AND user_id = $2 AND emoji = $3")
                .bind(&id)
                .bind(&user)
                .bind(emoji)
                .execute(&mut *tx)
                .await?
        };
        let written = done.rows_affected() > 0;
        let row = if written {
            // A departure recorded after the reacting user's check refuses
            // the change, and an archive or a block's closure an add (rolled
            // back with the rest).
            let (change, heads) = next_change_of_members(&mut tx, &chat).await?;
            if let Some(refusal) = heads.refusal(members_version, add) {
                return Ok(refusal.into());
            }
            sqlx::query(concat!(
                "UPDATE messages SET change_seq = $2, reaction_rows = reaction_rows + $3 WHERE id = $1 RETURNING ",
                message_columns!()
            ))
            .bind(&id)
            .bind(change)
            .bind(if add { 1i64 } else { -1 })
            .fetch_one(&mut *tx)
            .await?
        } else {
            sqlx::query(MESSAGE_BY_ID).bind(&id).fetch_one(&mut *tx).await?
        };
        let mut message = message_row(&row)?;
        message.reactions =
            reactions_of(&mut *tx, std::slice::from_ref(&id), &user).await?.remove(&message.id).unwrap_or_default();
        tx.commit().await?;
        Ok(if written { Reacted::Changed(message) } else { Reacted::Unchanged(message) })
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
        let id = id.to_string();
        let mut tx = self.pool.begin().await?;
        // Lock order everywhere: a message row, then its chat's heads.
        let found = sqlx::query(MESSAGE_FOR_UPDATE).bind(&id).fetch_optional(&mut *tx).await?;
        let Some(message) = found.as_ref().map(message_row).transpose()?.filter(|m| !m.deleted()) else {
            return Ok(Pinned::Gone);
        };
        if message.pin.is_some() == pin {
            return Ok(Pinned::Unchanged(message));
        }
        let chat = message.chat_id.to_string();
        // The heads row's lock, taken with the change number, queues the
        // chat's other pins behind this one: the count below is theirs too.
        // A refusal rolls the number back with the rest, as one for a
        // departure recorded after the pinning user's check, or for a pin
        // in a chat archived or closed by a block.
        let (change, heads) = next_change_of_members(&mut tx, &chat).await?;
        if let Some(refusal) = heads.refusal(members_version, pin) {
            return Ok(refusal.into());
        }
        if pin {
            let (pins,): (i64,) =
                sqlx::query_as(concat!("SELECT COUNT(*) FROM messages WHERE chat_id = $1 AND ", pinned_sql!()))
                    .bind(&chat)
                    .fetch_one(&mut *tx)
                    .await?;
            if usize::try_from(pins).unwrap_or(usize::MAX) >= max_pins {
                return Ok(Pinned::TooMany);
            }
        }
        let (time, by) = if pin { (Some(now), Some(user.to_string())) } else { (None, None) };
        let row = sqlx::query(concat!(
            "UPDATE messages SET change_seq = $2, pin_time = $3, pinned_by = $4 WHERE id = $1 RETURNING ",
            message_columns!()
        ))
        .bind(&id)
        .bind(change)
        .bind(time)
        .bind(by)
        .fetch_one(&mut *tx)
        .await?;
        let message = message_row(&row)?;
        tx.commit().await?;
        Ok(Pinned::Changed(message))
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
        reactions_of(&self.pool, &ids, &viewer.map(|v| v.to_string()).unwrap_or_default()).await
    }

    async fn report(&self, report: &StoredReport, members_version: i64) -> Result<Reported, StoreError> {
        let (message, reporter) = (report.message_id.to_string(), report.reporter.to_string());
        // The chat's members version is read on its heads row (which every
        // message's chat has) under a share lock, in the insert's own
        // statement: a departure being recorded (it holds the row) is
        // waited for and then read, as committed (READ COMMITTED reads the
        // row's latest version after the wait); one recorded after waits
        // for this statement's commit. No row: stale, nothing inserted.
        sqlx::query(
            "INSERT INTO message_reports (message_id, reporter_id, chat_id, reason, comment, create_time) \
             SELECT $1, $2, $3, $4, $5, $6 FROM chat_heads WHERE chat_id = $3 AND members_version <= $7 \
             FOR SHARE ON CONFLICT (message_id, reporter_id) DO NOTHING",
        )
        .bind(&message)
        .bind(&reporter)
        .bind(report.chat_id.to_string())
        .bind(report.reason)
        .bind(&report.comment)
        .bind(report.create_time)
        .bind(members_version)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            report_columns!(),
            " FROM message_reports WHERE message_id = $1 AND reporter_id = $2"
        ))
        .bind(&message)
        .bind(&reporter)
        .fetch_optional(&self.pool)
        .await?;
        // None: refused as stale, and no earlier report of theirs.
        row.as_ref().map_or(Ok(Reported::Stale), |row| Ok(Reported::Stored(report_row(row)?)))
    }

    async fn resolve_reports(
        &self,
        message: MessageId,
        chat: ChatId,
        resolver: UserId,
        now: i64,
        members_version: Option<i64>,
    ) -> Result<Resolved, StoreError> {
        // As a report's insert: the chat's members version read on its heads
        // row under a share lock, in the update's own statement (a departure
        // or a demotion being recorded is waited for, then read as
        // committed; one recorded after waits for this statement). Staff
        // (no version) compare nothing.
        let (current, done): (bool, i64) = sqlx::query_as(
            "WITH heads AS (SELECT 1 FROM chat_heads WHERE chat_id = $4 \
               AND members_version <= COALESCE($5, members_version) FOR SHARE), \
             done AS (UPDATE message_reports SET resolve_time = $3, resolver_id = $2 \
               WHERE message_id = $1 AND resolve_time IS NULL AND ($5::bigint IS NULL OR EXISTS (SELECT 1 FROM heads)) \
               RETURNING 1) \
             SELECT $5::bigint IS NULL OR EXISTS (SELECT 1 FROM heads), (SELECT COUNT(*) FROM done)",
        )
        .bind(message.to_string())
        .bind(resolver.to_string())
        .bind(now)
        .bind(chat.to_string())
        .bind(members_version)
        .fetch_one(&self.pool)
        .await?;
        Ok(if current { Resolved::Done(u64::try_from(done).unwrap_or_default()) } else { Resolved::Stale })
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
        let (from_time, from_id) = from.map_or((i64::MAX, String::new()), |(t, id)| (t, id.to_string()));
        let rows = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages m WHERE m.delete_time IS NULL AND (m.flag_severity >= $1 OR EXISTS \
             (SELECT 1 FROM message_reports r WHERE r.message_id = m.id AND r.resolve_time IS NULL)) \
             AND ($2::boolean OR m.send_time < $3 OR (m.send_time = $3 AND m.id < $4)) \
             AND ($5::text[] IS NULL OR m.chat_id = ANY($5)) \
             AND ($7::bigint IS NULL OR m.send_time >= $7) AND ($8::bigint IS NULL OR m.send_time < $8) \
             ORDER BY m.send_time DESC, m.id DESC LIMIT $6"
        ))
        .bind(filter.min_severity)
        .bind(from.is_none())
        .bind(from_time)
        .bind(from_id)
        .bind(chats)
        .bind(i64::from(limit))
        .bind(filter.sent_after)
        .bind(filter.sent_before)
        .fetch_all(&self.pool)
        .await?;
        let messages = rows.iter().map(message_row).collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<String> = messages.iter().map(|m| m.id.to_string()).collect();
        let reports = sqlx::query(concat!(
            "SELECT ",
            report_columns!(),
            " FROM message_reports WHERE message_id = ANY($1) AND resolve_time IS NULL ORDER BY create_time"
        ))
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(report_row)
        .collect::<Result<Vec<_>, _>>()?;
        Ok(messages
            .into_iter()
            .map(|m| {
                let open = reports.iter().filter(|r| r.message_id == m.id).cloned().collect();
                (m, open)
            })
            .collect())
    }

    async fn purge_chat(&self, chat: ChatId) -> Result<(), StoreError> {
        let statements: Vec<&'static str> =
            PURGE_ROWS.iter().chain([&PURGE_HEADS]).chain(&PURGE_ROWS).copied().collect();
        self.in_one_transaction(&statements, chat.to_string()).await
    }

    async fn forget_user(&self, user: UserId) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        forget_user_in(&mut tx, &user.to_string()).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn record_last_seen(&self, seen: &[(UserId, i64)]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        let (users, times): (Vec<String>, Vec<i64>) = seen.iter().map(|(u, t)| (u.to_string(), *t)).unzip();
        let mut tx = self.pool.begin().await?;
        hold_off_forgets(&mut tx).await?;
        // One statement; the latest time per user first, as one INSERT may
        // not touch a row twice.
        sqlx::query(
            "INSERT INTO user_presence (user_id, last_seen_time) \
             SELECT user_id, MAX(time) FROM UNNEST($1::text[], $2::bigint[]) AS v (user_id, time) \
             WHERE NOT EXISTS (SELECT 1 FROM forgotten_users f WHERE f.user_id = v.user_id) GROUP BY user_id \
             ON CONFLICT (user_id) DO UPDATE \
             SET last_seen_time = GREATEST(user_presence.last_seen_time, excluded.last_seen_time)",
        )
        .bind(&users)
        .bind(&times)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn last_seen(&self, users: &[UserId]) -> Result<HashMap<UserId, i64>, StoreError> {
        let ids: Vec<String> = users.iter().map(UserId::to_string).collect();
        let rows = sqlx::query("SELECT user_id, last_seen_time FROM user_presence WHERE user_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| Ok((id_at(row, 0)?, row.try_get(1)?))).collect()
    }

    async fn search(
        &self,
        filter: &SearchFilter<'_>,
        from: Option<SearchCursor>,
        limit: u32,
    ) -> Result<SearchPage, StoreError> {
        let chats: Vec<String> = filter.chats.iter().map(ChatId::to_string).collect();
        // ts_rank is a real: compared as float8, it round-trips through a
        // page token exactly.
        let (rank, order, after) = if filter.relevance {
            (
                "ts_rank(search_vector, $1::tsquery)::float8",
                "search_rank DESC, search_position DESC",
                "($3::float8 IS NULL OR ts_rank(search_vector, $1::tsquery)::float8 < $3 \
                 OR (ts_rank(search_vector, $1::tsquery)::float8 = $3 AND search_position < $4))",
            )
        } else {
            ("0::float8", "search_position DESC", "($3::float8 IS NULL OR search_position < $4)")
        };
        let sql = format!(
            "SELECT {}, search_position, {rank} AS search_rank FROM messages \
             WHERE search_vector @@ $1::tsquery AND chat_id = ANY($2) AND delete_time IS NULL AND superseded = 0 \
             AND {after} ORDER BY {order} LIMIT {limit}",
            message_columns!()
        );
        // Not a named prepared statement: after five runs PostgreSQL would
        // switch it to a generic plan, which cannot see how common the
        // words are or how many chats there are, and chooses a BitmapAnd of
        // the text index with (chat_id, seq) over every listed chat: 86-95
        // ms against 14-16 ms for the plan made with the values, on a chat
        // of a million messages (BENCHMARKS.md, "Full-text search on
        // PostgreSQL"). An unnamed statement is planned at each run with
        // its values.
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .persistent(false)
            .bind(filter.query.tsquery())
            .bind(&chats)
            .bind(from.map(|c| c.rank))
            .bind(from.map_or(i64::MAX, |c| c.position))
            .fetch_all(&self.pool)
            .await?;
        let hits = rows
            .iter()
            .map(|row| {
                let cursor =
                    SearchCursor { position: row.try_get(MESSAGE_COLUMNS)?, rank: row.try_get(MESSAGE_COLUMNS + 1)? };
                Ok(SearchHit { message: message_row(row)?, cursor })
            })
            .collect::<Result<_, StoreError>>()?;
        // PostgreSQL plans each search with its values: it walks the text
        // index or the caller's chats, whichever is smaller.
        Ok(SearchPage { hits, scanned_to: None, too_broad: false })
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `write` while a forget of `user` is under way (its statements
    /// done, not yet committed), until `write` waits for it or is done
    /// without waiting; then commits the forget and answers what `write`
    /// did.
    async fn during_a_forget<T: Send + 'static>(
        store: &PostgresStore,
        user: UserId,
        write: impl Future<Output = T> + Send + 'static,
    ) -> T {
        let mut forget = store.pool.begin().await.unwrap();
        let (forgetter,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()").fetch_one(&mut *forget).await.unwrap();
        forget_user_in(&mut forget, &user.to_string()).await.unwrap();
        let mut write = tokio::spawn(write);
        let mut done = None;
        while done.is_none() {
            let (waiting,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
                    .bind(forgetter)
                    .fetch_one(&store.pool)
                    .await
                    .unwrap();
            if waiting > 0 {
                break;
            }
            tokio::select! {
                written = &mut write => done = Some(written),
                () = tokio::task::yield_now() => {}
            }
        }
        forget.commit().await.unwrap();
        match done {
            Some(written) => written,
            None => write.await,
        }
        .unwrap()
    }

    /// A store in a schema of the test's own (None without
    /// `NATTER_TEST_DATABASE_URL`), and the URL and schema to drop.
    async fn fresh(name: &str) -> Option<(PostgresStore, String, String)> {
        let url = natter_db::testing::postgres_url()?;
        let schema = natter_db::testing::unique_schema(name);
        let store = PostgresStore::open(&url, &schema, &natter_db::PoolSettings::default()).await.unwrap();
        Some((store, url, schema))
    }

    /// A last-seen time recorded while a forget of its user is under way
    /// (a replica's periodic record racing DeleteAccount) waits for it and
    /// then stores nothing: the forgotten user keeps no presence row.
    #[tokio::test]
    async fn a_last_seen_time_recorded_during_a_forget_is_not_kept() {
        let Some((store, url, schema)) = fresh("forget").await else { return };
        let user = UserId::new_v7();
        let recorder = store.clone();
        during_a_forget(&store, user, async move { recorder.record_last_seen(&[(user, 5)]).await }).await.unwrap();
        assert!(store.last_seen(&[user]).await.unwrap().is_empty(), "a last-seen time kept for a forgotten user");
        store.close().await;
        natter_db::postgres::drop_schema(&url, &schema).await.unwrap();
    }

    /// A MarkRead of a user being forgotten (it passed its membership
    /// check before the user was taken out) waits for the forget and then
    /// stores no read position, taking no change number; a send that
    /// mentions the user likewise stores the message but no mention row.
    #[tokio::test]
    async fn a_read_position_or_a_mention_written_during_a_forget_is_not_kept() {
        let Some((store, url, schema)) = fresh("forgetread").await else { return };
        let (chat, user, author) = (ChatId::new_v7(), UserId::new_v7(), UserId::new_v7());
        let message = |text: &str, mentions: Vec<UserId>| NewMessage {
            id: MessageId::new_v7(),
            chat_id: chat,
            author_id: author,
            text: text.to_owned(),
            attachments: Vec::new(),
            reply_to: None,
            send_time: 1,
            flags: None,
            mentions,
            thread_root: None,
            members_version: 0,
        };
        store.insert_batch(&[message("first", Vec::new())]).await.unwrap();
        let head = store.heads(chat).await.unwrap().change;
        let reader = store.clone();
        let read = during_a_forget(&store, user, async move { reader.mark_read(chat, user, Seq(1), 0).await }).await;
        let Marked::Done(read) = read.unwrap() else { panic!("refused as stale") };
        assert_eq!(read.change_seq, None, "a read position moved for a forgotten user");
        assert_eq!(store.read_positions(user, &[chat]).await.unwrap(), [Seq::ZERO], "a read position kept");
        assert_eq!(store.heads(chat).await.unwrap().change, head, "a change number taken for nothing");

        // Another user: the first one is forgotten already.
        let (sender, other) = (store.clone(), UserId::new_v7());
        let mentioned = message("hello @other", vec![other, author]);
        let sent = during_a_forget(&store, other, async move { sender.insert_batch(&[mentioned]).await }).await;
        assert!(matches!(sent.unwrap()[..], [Sent::Created(_)]), "the message itself is stored");
        let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM message_mentions WHERE user_id = $1")
            .bind(other.to_string())
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(rows, 0, "a mention row kept for a forgotten user");
        store.close().await;
        natter_db::postgres::drop_schema(&url, &schema).await.unwrap();
    }
}

//! The messages service's SQL. A send is one short transaction whose first
//! statement bumps the chat's head seq; history is a keyset walk of
//! `(chat_id, seq)`.

use natter_db::sqlx::AssertSqlSafe;
use natter_db::{Db, DbError, SqlBuilder};
use rusqlite::OptionalExtension as _;

/// Rows per multi-row statement (8 bound values each: well under both
/// engines' limits on parameters).
const CHUNK: usize = 256;

/// Most rows [`Store::recent_activity`] reads: a bound on start-up time
/// (about a second) whatever the rate of sends before a crash.
pub const RECENT_ACTIVITY_ROWS: usize = 1_000_000;

/// A row of `messages`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct MessageRow {
    pub id: String,
    pub chat_id: String,
    pub seq: i64,
    pub author_id: String,
    pub text: String,
    pub attachments: String,
    pub reply_to_seq: i64,
    pub send_time: i64,
    pub edit_time: Option<i64>,
    pub revision: i64,
    pub delete_time: Option<i64>,
}

/// The SQL of [`INSERT_MESSAGE`], as a literal for `concat!`.
macro_rules! insert_message_sql {
    () => {
        "INSERT INTO messages (id, chat_id, seq, author_id, text, attachments, reply_to_seq, send_time, edit_time, revision, delete_time) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, 1, NULL)"
    };
}
pub(crate) use insert_message_sql;

/// Inserts one new message: `$1..$8` are id, chat_id, seq, author_id, text,
/// attachments, reply_to_seq, send_time, in that order of appearance (the
/// SQLite writer binds them by position).
pub(crate) const INSERT_MESSAGE: &str = insert_message_sql!();

const MESSAGE_SELECT: &str = "SELECT id, chat_id, seq, author_id, text, attachments, reply_to_seq, send_time, edit_time, revision, delete_time FROM messages";

/// The most an unread count counts: [`UNREAD_COUNT_CAP`] as a literal for
/// the SQL (`concat!`).
macro_rules! unread_count_cap {
    () => {
        1000
    };
}

/// The most an unread count counts: a count of this value means at least
/// this many (a client shows "999+"). Counting walks the chat's index from
/// the read position, so an uncapped count cost O(unread) on every ListChats
/// entry, GetChat and MarkRead: a member a million messages behind made each
/// of them a million-entry walk.
pub const UNREAD_COUNT_CAP: i64 = unread_count_cap!();

/// A user's read position in a chat and the messages after it that are not
/// theirs and not deleted, counted up to [`UNREAD_COUNT_CAP`]: `$1` chat id,
/// `$2` user id (each used twice; first appearances in order, as rusqlite
/// binds them).
const READ_STATE: &str = concat!(
    "SELECT r.read_seq, (SELECT COUNT(*) FROM (SELECT 1 FROM messages m WHERE m.chat_id = $1 AND m.seq > r.read_seq \
     AND m.author_id <> $2 AND m.delete_time IS NULL LIMIT ",
    unread_count_cap!(),
    ") u) FROM (SELECT COALESCE((SELECT read_seq FROM read_positions WHERE chat_id = $1 AND user_id = $2), 0) AS read_seq) r"
);

/// A [`MESSAGE_SELECT`] row read through rusqlite.
fn message_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRow> {
    Ok(MessageRow {
        id: row.get(0)?,
        chat_id: row.get(1)?,
        seq: row.get(2)?,
        author_id: row.get(3)?,
        text: row.get(4)?,
        attachments: row.get(5)?,
        reply_to_seq: row.get(6)?,
        send_time: row.get(7)?,
        edit_time: row.get(8)?,
        revision: row.get(9)?,
        delete_time: row.get(10)?,
    })
}

/// The SQL of [`Store::list`] for both engines and its seq bounds: `$1` is
/// the chat id, `$2, $3, ...` the bounds in order (each placeholder appears
/// once and in order, so SQLite's numbering by first appearance agrees).
/// The limit is written in (see [`natter_db::SqlBuilder::limit`]).
fn list_sql(range: Range, from: Option<i64>, limit: u32) -> (String, Vec<i64>) {
    let mut sql = format!("{MESSAGE_SELECT} WHERE chat_id = $1");
    let mut bounds = Vec::with_capacity(3);
    let mut bound = |sql: &mut String, op: &str, value: i64| {
        bounds.push(value);
        sql.push_str(&format!(" AND seq {op} ${}", bounds.len() + 1));
    };
    if let Some(b) = range.before {
        bound(&mut sql, "<", b);
    }
    if let Some(a) = range.after {
        bound(&mut sql, ">", a);
    }
    if let Some(f) = from {
        bound(&mut sql, if range.ascending { ">" } else { "<" }, f);
    }
    let order = if range.ascending { "ASC" } else { "DESC" };
    sql.push_str(&format!(" ORDER BY seq {order} LIMIT {limit}"));
    (sql, bounds)
}

/// A row of [`Store::summaries`] on PostgreSQL: the chat's newest message
/// (every column NULL before the first) and the caller's unread count.
#[derive(sqlx::FromRow)]
struct SummaryRow {
    id: Option<String>,
    chat_id: Option<String>,
    seq: Option<i64>,
    author_id: Option<String>,
    text: Option<String>,
    attachments: Option<String>,
    reply_to_seq: Option<i64>,
    send_time: Option<i64>,
    edit_time: Option<i64>,
    revision: Option<i64>,
    delete_time: Option<i64>,
    unread: i64,
}

impl SummaryRow {
    fn message(self) -> Option<MessageRow> {
        Some(MessageRow {
            id: self.id?,
            chat_id: self.chat_id?,
            seq: self.seq?,
            author_id: self.author_id?,
            text: self.text?,
            attachments: self.attachments?,
            reply_to_seq: self.reply_to_seq?,
            send_time: self.send_time?,
            edit_time: self.edit_time,
            revision: self.revision?,
            delete_time: self.delete_time,
        })
    }
}

/// A row of `message_revisions`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RevisionRow {
    pub message_id: String,
    pub revision: i64,
    pub text: String,
    pub edit_time: i64,
}

/// A message to insert; the store assigns its seq.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub id: String,
    pub chat_id: String,
    pub author_id: String,
    pub text: String,
    pub attachments: String,
    pub reply_to_seq: i64,
    pub send_time: i64,
}

impl NewMessage {
    /// The row this message becomes with `seq`.
    pub(crate) fn row(&self, seq: i64) -> MessageRow {
        MessageRow {
            id: self.id.clone(),
            chat_id: self.chat_id.clone(),
            seq,
            author_id: self.author_id.clone(),
            text: self.text.clone(),
            attachments: self.attachments.clone(),
            reply_to_seq: self.reply_to_seq,
            send_time: self.send_time,
            edit_time: None,
            revision: 1,
            delete_time: None,
        }
    }
}

/// Outcome of inserting a message.
#[derive(Debug)]
pub enum Sent {
    /// Committed with this row.
    Created(MessageRow),
    /// A message with this id exists already (a retry).
    Duplicate,
    /// reply_to_seq names no message of the chat.
    NoSuchReply,
}

/// Outcome of an edit.
#[derive(Debug)]
pub enum Edited {
    /// Committed; the message as it is now.
    Done(MessageRow),
    /// The message is deleted (or missing).
    Deleted,
    /// The message was edited as often as allowed; nothing changed.
    TooManyEdits,
}

/// Range and order of a history listing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Range {
    /// Only seq < before.
    pub before: Option<i64>,
    /// Only seq > after.
    pub after: Option<i64>,
    pub ascending: bool,
}

/// The messages tables.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
}

impl Store {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Inserts a message with the chat's next seq, in one transaction.
    pub async fn insert(&self, m: &NewMessage) -> Result<Sent, sqlx::Error> {
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.write().begin().await?;
        // First statement is a write: it takes the chat's lock before any read.
        let (seq,): (i64,) = sqlx::query_as(
            "INSERT INTO chat_heads (chat_id, last_seq) VALUES ($1, 1) \
             ON CONFLICT (chat_id) DO UPDATE SET last_seq = chat_heads.last_seq + 1 RETURNING last_seq",
        )
        .bind(&m.chat_id)
        .fetch_one(&mut *tx)
        .await?;
        if m.reply_to_seq > 0 {
            let found: Option<(i64,)> = sqlx::query_as("SELECT seq FROM messages WHERE chat_id = $1 AND seq = $2")
                .bind(&m.chat_id)
                .bind(m.reply_to_seq)
                .fetch_optional(&mut *tx)
                .await?;
            if found.is_none() {
                tx.rollback().await?;
                return Ok(Sent::NoSuchReply);
            }
        }
        let inserted = sqlx::query(INSERT_MESSAGE)
            .bind(&m.id)
            .bind(&m.chat_id)
            .bind(seq)
            .bind(&m.author_id)
            .bind(&m.text)
            .bind(&m.attachments)
            .bind(m.reply_to_seq)
            .bind(m.send_time)
            .execute(&mut *tx)
            .await;
        match inserted {
            Ok(_) => {}
            Err(e) if natter_db::is_unique_violation(&e) => {
                // The rollback also undoes the seq bump: no gap.
                tx.rollback().await?;
                return Ok(Sent::Duplicate);
            }
            Err(e) => return Err(e),
        }
        tx.commit().await?;
        Ok(Sent::Created(m.row(seq)))
    }

    /// Inserts a batch of messages in ONE transaction (group commit): per
    /// chat, the head seq is bumped once for all of its messages, then all
    /// rows go in with one statement per chunk. Results are in input order.
    ///
    /// Ids that exist already (or repeat within the batch) come back as
    /// `Duplicate`, a reply to a missing message as `NoSuchReply`; neither
    /// takes a seq. An error fails the whole batch and writes nothing (the
    /// caller may then retry the messages one by one with [`Store::insert`]).
    pub async fn insert_batch(&self, batch: &[NewMessage]) -> Result<Vec<Sent>, sqlx::Error> {
        if batch.len() == 1 {
            return Ok(vec![self.insert(&batch[0]).await?]);
        }
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.write().begin().await?;
        let mut outcome: Vec<Option<Sent>> = (0..batch.len()).map(|_| None).collect();

        // Ids already stored, or used earlier in this batch: retries.
        let mut existing = std::collections::HashSet::new();
        for chunk in batch.chunks(CHUNK) {
            let mut q = SqlBuilder::new("SELECT id FROM messages WHERE id IN ");
            q.bind_list(chunk.iter().map(|m| m.id.clone()));
            let rows: Vec<(String,)> = q.build_as().fetch_all(&mut *tx).await?;
            existing.extend(rows.into_iter().map(|(id,)| id));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, m) in batch.iter().enumerate() {
            if existing.contains(&m.id) || !seen.insert(m.id.as_str()) {
                outcome[i] = Some(Sent::Duplicate);
            }
        }
        for (i, m) in batch.iter().enumerate() {
            if outcome[i].is_none() && m.reply_to_seq > 0 {
                let found: Option<(i64,)> = sqlx::query_as("SELECT seq FROM messages WHERE chat_id = $1 AND seq = $2")
                    .bind(&m.chat_id)
                    .bind(m.reply_to_seq)
                    .fetch_optional(&mut *tx)
                    .await?;
                if found.is_none() {
                    outcome[i] = Some(Sent::NoSuchReply);
                }
            }
        }

        // One seq range per chat, locked in chat-id order so that concurrent
        // batches (other replicas) cannot deadlock.
        let mut per_chat: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        for (i, m) in batch.iter().enumerate() {
            if outcome[i].is_none() {
                *per_chat.entry(m.chat_id.as_str()).or_default() += 1;
            }
        }
        // One statement for every chat of the batch; rows are locked in the
        // VALUES order, which is chat-id order.
        let mut next_seq: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
        if !per_chat.is_empty() {
            let mut q = SqlBuilder::new("INSERT INTO chat_heads (chat_id, last_seq) VALUES ");
            for (n, (chat, count)) in per_chat.iter().enumerate() {
                q.push(if n == 0 { "(" } else { ", (" }).bind(chat.to_string()).push(", ").bind(*count).push(")");
            }
            q.push(" ON CONFLICT (chat_id) DO UPDATE SET last_seq = chat_heads.last_seq + excluded.last_seq RETURNING chat_id, last_seq");
            let heads: Vec<(String, i64)> = q.build_as().fetch_all(&mut *tx).await?;
            for (chat, head) in heads {
                let count = per_chat.get(chat.as_str()).copied().unwrap_or(0);
                next_seq.insert(chat, head - count + 1);
            }
        }

        let mut rows = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            if outcome[i].is_some() {
                continue;
            }
            let Some(seq) = next_seq.get_mut(m.chat_id.as_str()) else {
                return Err(sqlx::Error::Protocol("chat head missing from RETURNING".into()));
            };
            rows.push((i, m.row(*seq)));
            *seq += 1;
        }
        for chunk in rows.chunks(CHUNK) {
            let mut q = SqlBuilder::new(
                "INSERT INTO messages (id, chat_id, seq, author_id, text, attachments, reply_to_seq, send_time, edit_time, revision, delete_time) VALUES ",
            );
            for (n, (_, r)) in chunk.iter().enumerate() {
                q.push(if n == 0 { "(" } else { ", (" });
                q.bind(r.id.clone()).push(", ").bind(r.chat_id.clone()).push(", ").bind(r.seq).push(", ");
                q.bind(r.author_id.clone())
                    .push(", ")
                    .bind(r.text.clone())
                    .push(", ")
                    .bind(r.attachments.clone())
                    .push(", ");
                q.bind(r.reply_to_seq).push(", ").bind(r.send_time).push(", NULL, 1, NULL)");
            }
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        for (i, row) in rows {
            outcome[i] = Some(Sent::Created(row));
        }
        Ok(outcome.into_iter().map(|o| o.unwrap_or(Sent::Duplicate)).collect())
    }

    pub async fn message(&self, id: &str) -> Result<Option<MessageRow>, sqlx::Error> {
        let mut q = SqlBuilder::new(MESSAGE_SELECT);
        q.push(" WHERE id = ").bind(id.to_owned());
        q.build_as().fetch_optional(self.db.read()).await
    }

    /// Replaces a live message's text, keeping the old one as a revision,
    /// unless it was edited `max_edits` times already.
    pub async fn edit(&self, id: &str, text: &str, now: i64, max_edits: usize) -> Result<Edited, sqlx::Error> {
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.write().begin().await?;
        // Lock the row first so concurrent edits queue, each keeps the text
        // it replaces and sees the revision count the others left.
        let locked: Option<(i64,)> = sqlx::query_as(
            "UPDATE messages SET revision = revision WHERE id = $1 AND delete_time IS NULL RETURNING revision",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((revision,)) = locked else {
            tx.rollback().await?;
            return Ok(Edited::Deleted);
        };
        if usize::try_from(revision - 1).unwrap_or(usize::MAX) >= max_edits {
            tx.rollback().await?;
            return Ok(Edited::TooManyEdits);
        }
        sqlx::query(
            "INSERT INTO message_revisions (message_id, revision, text, edit_time) \
             SELECT id, revision, text, COALESCE(edit_time, send_time) FROM messages WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE messages SET text = $1, revision = revision + 1, edit_time = $2 WHERE id = $3")
            .bind(text)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let mut q = SqlBuilder::new(MESSAGE_SELECT);
        q.push(" WHERE id = ").bind(id.to_owned());
        let row = q.build_as().fetch_optional(&mut *tx).await?;
        tx.commit().await?;
        Ok(row.map_or(Edited::Deleted, Edited::Done))
    }

    /// Turns a message into a tombstone: seq stays, text, attachments and
    /// earlier revisions go. True if it was live.
    pub async fn delete(&self, id: &str, now: i64) -> Result<bool, sqlx::Error> {
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.write().begin().await?;
        let done = sqlx::query(
            "UPDATE messages SET text = '', attachments = '', delete_time = $1 WHERE id = $2 AND delete_time IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM message_revisions WHERE message_id = $1").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// The newest seq of a chat (0 before the first message).
    pub async fn head(&self, chat_id: &str) -> Result<i64, sqlx::Error> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT last_seq FROM chat_heads WHERE chat_id = $1")
            .bind(chat_id)
            .fetch_optional(self.db.read())
            .await?;
        Ok(row.map(|(s,)| s).unwrap_or(0))
    }

    /// Up to `limit` messages of a chat in `range`, after the keyset position
    /// `from` (a seq) in the range's order.
    ///
    /// On SQLite through a rusqlite connection of natter-db's
    /// ([`Db::sqlite_read`]): a page of 50 through sqlx cost about four times
    /// the server CPU, most of it handing rows across threads.
    pub async fn list(
        &self,
        chat_id: &str,
        range: Range,
        from: Option<i64>,
        limit: u32,
    ) -> Result<Vec<MessageRow>, DbError> {
        let chat = chat_id.to_owned();
        let sqlite = self.db.sqlite_read(move |conn| {
            let (sql, bounds) = list_sql(range, from, limit);
            let mut statement = conn.prepare_cached(&sql)?;
            let params = std::iter::once(rusqlite::types::Value::Text(chat))
                .chain(bounds.into_iter().map(rusqlite::types::Value::Integer));
            statement.query_map(rusqlite::params_from_iter(params), message_row)?.collect()
        });
        if let Some(rows) = sqlite.await? {
            return Ok(rows);
        }
        let (sql, bounds) = list_sql(range, from, limit);
        let mut query = sqlx::query_as(AssertSqlSafe(sql)).bind(chat_id.to_owned());
        for bound in bounds {
            query = query.bind(bound);
        }
        Ok(query.fetch_all(self.db.read()).await?)
    }

    /// Earlier revisions of the given messages, oldest first.
    pub async fn revisions(&self, message_ids: &[String]) -> Result<Vec<RevisionRow>, sqlx::Error> {
        if message_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut q =
            SqlBuilder::new("SELECT message_id, revision, text, edit_time FROM message_revisions WHERE message_id IN ");
        q.bind_list(message_ids.iter().cloned()).push(" ORDER BY message_id, revision");
        q.build_as().fetch_all(self.db.read()).await
    }

    /// Up to `limit` earlier revisions of one message after revision `after`,
    /// oldest first.
    pub async fn revisions_after(
        &self,
        message_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<RevisionRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT message_id, revision, text, edit_time FROM message_revisions \
             WHERE message_id = $1 AND revision > $2 ORDER BY revision LIMIT $3",
        )
        .bind(message_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(self.db.read())
        .await
    }

    /// Moves a user's read position forward to `seq` (never back) and returns
    /// the position after the call.
    pub async fn mark_read(&self, chat_id: &str, user_id: &str, seq: i64) -> Result<i64, sqlx::Error> {
        let _turn = self.db.write_turn().await;
        let (read_seq,): (i64,) = sqlx::query_as(
            "INSERT INTO read_positions (chat_id, user_id, read_seq) VALUES ($1, $2, $3) \
             ON CONFLICT (chat_id, user_id) DO UPDATE SET read_seq = \
             CASE WHEN excluded.read_seq > read_positions.read_seq THEN excluded.read_seq ELSE read_positions.read_seq END \
             RETURNING read_seq",
        )
        .bind(chat_id)
        .bind(user_id)
        .bind(seq)
        .fetch_one(self.db.write())
        .await?;
        Ok(read_seq)
    }

    /// Sets users' read positions to the chat's newest seq (even backwards:
    /// a rejoining member starts from now).
    pub async fn reset_read_positions(&self, chat_id: &str, user_ids: &[String]) -> Result<(), sqlx::Error> {
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.write().begin().await?;
        for user_id in user_ids {
            sqlx::query(
                "INSERT INTO read_positions (chat_id, user_id, read_seq) \
                 VALUES ($1, $2, COALESCE((SELECT last_seq FROM chat_heads WHERE chat_id = $1), 0)) \
                 ON CONFLICT (chat_id, user_id) DO UPDATE SET read_seq = excluded.read_seq",
            )
            .bind(chat_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Messages after `read_seq`, not by `user_id`, not deleted, counted up
    /// to [`UNREAD_COUNT_CAP`].
    pub async fn unread_count(&self, chat_id: &str, user_id: &str, read_seq: i64) -> Result<i64, sqlx::Error> {
        let (n,): (i64,) = sqlx::query_as(concat!(
            "SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE chat_id = $1 AND seq > $2 AND author_id <> $3 \
             AND delete_time IS NULL LIMIT ",
            unread_count_cap!(),
            ") u"
        ))
        .bind(chat_id)
        .bind(read_seq)
        .bind(user_id)
        .fetch_one(self.db.read())
        .await?;
        Ok(n)
    }

    /// For each of `chat_ids`, in order: its newest message (None before the
    /// first) and the number of messages `user_id` has not read, counted up
    /// to [`UNREAD_COUNT_CAP`]. On SQLite all of it is one trip to a reader
    /// connection ([`Db::sqlite_read`]); on PostgreSQL one statement per
    /// page.
    pub async fn summaries(
        &self,
        chat_ids: &[String],
        user_id: &str,
    ) -> Result<Vec<(Option<MessageRow>, i64)>, DbError> {
        let (chats, user) = (chat_ids.to_vec(), user_id.to_owned());
        let sqlite = self.db.sqlite_read(move |conn| {
            let mut newest = conn.prepare_cached(&list_sql(Range::default(), None, 1).0)?;
            let mut state = conn.prepare_cached(READ_STATE)?;
            chats
                .iter()
                .map(|chat| {
                    let message = newest.query_row([chat], message_row).optional()?;
                    let unread = state.query_row([chat, &user], |row| row.get(1))?;
                    Ok((message, unread))
                })
                .collect()
        });
        if let Some(rows) = sqlite.await? {
            return Ok(rows);
        }
        // PostgreSQL: one statement for the whole page (a LATERAL join per
        // chat), where a query per chat and value cost ~90 µs of this
        // process's CPU each.
        let mut out = Vec::with_capacity(chat_ids.len());
        for chunk in chat_ids.chunks(CHUNK) {
            let mut q = SqlBuilder::new(
                "SELECT m.id, m.chat_id, m.seq, m.author_id, m.text, m.attachments, m.reply_to_seq, m.send_time, \
                 m.edit_time, m.revision, m.delete_time, \
                 (SELECT COUNT(*) FROM (SELECT 1 FROM messages u WHERE u.chat_id = v.chat_id \
                  AND u.seq > COALESCE(r.read_seq, 0) AND u.author_id <> ",
            );
            q.bind(user_id.to_owned()).push(concat!(
                " AND u.delete_time IS NULL LIMIT ",
                unread_count_cap!(),
                ") c) AS unread FROM (VALUES "
            ));
            for (n, chat_id) in chunk.iter().enumerate() {
                q.push(if n == 0 { "(" } else { ", (" }).bind(chat_id.clone()).push(", ").bind(n as i64).push(")");
            }
            q.push(
                ") AS v (chat_id, ord) \
                 LEFT JOIN LATERAL (SELECT * FROM messages WHERE chat_id = v.chat_id ORDER BY seq DESC LIMIT 1) m ON TRUE \
                 LEFT JOIN read_positions r ON r.chat_id = v.chat_id AND r.user_id = ",
            );
            q.bind(user_id.to_owned()).push(" ORDER BY v.ord");
            let rows: Vec<SummaryRow> = q.build_as().fetch_all(self.db.read()).await?;
            out.extend(rows.into_iter().map(|r| {
                let unread = r.unread;
                (r.message(), unread)
            }));
        }
        Ok(out)
    }

    /// On SQLite, the newest message of every chat that has one sent within
    /// `window_us` µs before the newest message stored, as `(chat_id, seq,
    /// send_time)`, read backwards through the table by rowid (commit
    /// order) and at most [`RECENT_ACTIVITY_ROWS`] rows. None on PostgreSQL.
    ///
    /// For re-announcing chat activity after a crash: the chats store may
    /// have held the newest of it in memory (`natter_chats::activity`). The
    /// window is taken from the newest message, not the clock, so any time
    /// may pass between the crash and the start.
    pub async fn recent_activity(&self, window_us: i64) -> Result<Option<Vec<(String, i64, i64)>>, DbError> {
        self.db
            .sqlite_read(move |conn| {
                let mut rows = conn.prepare("SELECT chat_id, seq, send_time FROM messages ORDER BY rowid DESC")?;
                let mut rows = rows.query([])?;
                let mut newest: std::collections::HashMap<String, (i64, i64)> = std::collections::HashMap::new();
                let mut since = None;
                let mut scanned = 0;
                while let Some(row) = rows.next()? {
                    let (chat_id, seq, time): (String, i64, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
                    let since = *since.get_or_insert(time - window_us);
                    scanned += 1;
                    if time < since || scanned > RECENT_ACTIVITY_ROWS {
                        break;
                    }
                    let entry = newest.entry(chat_id).or_insert((seq, time));
                    if seq > entry.0 {
                        *entry = (seq, time);
                    }
                }
                Ok(newest.into_iter().map(|(chat, (seq, time))| (chat, seq, time)).collect())
            })
            .await
    }

    /// Deletes everything of a chat.
    pub async fn purge_chat(&self, chat_id: &str) -> Result<(), sqlx::Error> {
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.write().begin().await?;
        sqlx::query("DELETE FROM message_revisions WHERE message_id IN (SELECT id FROM messages WHERE chat_id = $1)")
            .bind(chat_id)
            .execute(&mut *tx)
            .await?;
        for sql in [
            "DELETE FROM messages WHERE chat_id = $1",
            "DELETE FROM read_positions WHERE chat_id = $1",
            "DELETE FROM chat_heads WHERE chat_id = $1",
        ] {
            sqlx::query(sql).bind(chat_id).execute(&mut *tx).await?;
        }
        tx.commit().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, chat: &str, reply_to_seq: i64) -> NewMessage {
        NewMessage {
            id: id.into(),
            chat_id: chat.into(),
            author_id: "author".into(),
            text: format!("text of {id}"),
            attachments: String::new(),
            reply_to_seq,
            send_time: 1,
        }
    }

    fn seq(s: &Sent) -> Option<i64> {
        match s {
            Sent::Created(row) => Some(row.seq),
            _ => None,
        }
    }

    /// A batch of retries, replies and two chats, after "m0" took seq 1 of
    /// chat "a".
    fn mixed_batch() -> [NewMessage; 7] {
        [
            msg("m1", "a", 0),
            msg("m2", "b", 0),
            msg("m0", "a", 0),  // stored already: a retry
            msg("m3", "a", 1),  // a reply to a stored message
            msg("m1", "a", 0),  // repeats m1 within the batch
            msg("m4", "b", 99), // a reply to nothing
            msg("m5", "b", 0),
        ]
    }

    /// What both commit paths must make of [`mixed_batch`].
    async fn assert_mixed_batch_outcome(store: &Store, out: &[Sent]) {
        assert_eq!(out.iter().map(seq).collect::<Vec<_>>(), [Some(2), Some(1), None, Some(3), None, None, Some(2)]);
        assert!(
            matches!(out[2], Sent::Duplicate)
                && matches!(out[4], Sent::Duplicate)
                && matches!(out[5], Sent::NoSuchReply)
        );
        assert_eq!(
            (store.head("a").await.unwrap(), store.head("b").await.unwrap()),
            (3, 2),
            "no seq taken by a refused message"
        );
        let stored: Vec<(i64, String)> = store
            .list("a", Range { ascending: true, ..Range::default() }, None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.seq, m.id))
            .collect();
        assert_eq!(stored, [(1, "m0".to_owned()), (2, "m1".to_owned()), (3, "m3".to_owned())]);
    }

    async fn open_store(dir: &std::path::Path) -> Store {
        let db = Db::connect(&natter_db::DbConfig::sqlite_in(dir, "messages"), &crate::MIGRATOR).await.unwrap();
        Store::new(db)
    }

    #[tokio::test]
    async fn a_batch_assigns_gap_free_seqs_per_chat_and_skips_retries() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path()).await;
        assert_eq!(seq(&store.insert(&msg("m0", "a", 0)).await.unwrap()), Some(1));
        let out = store.insert_batch(&mixed_batch()).await.unwrap();
        assert_mixed_batch_outcome(&store, &out).await;
    }

    #[tokio::test]
    async fn the_sqlite_commit_thread_batches_exactly_like_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path()).await;
        let mut committer =
            crate::sqlite_commit::SqliteCommitter::new(store.db().sqlite_commit_connection().unwrap().unwrap());
        let mut clock = natter_kit::metrics::PhaseClock::start();
        assert_eq!(seq(&committer.insert_batch(&[msg("m0", "a", 0)], &mut clock).unwrap()[0]), Some(1));
        let out = committer.insert_batch(&mixed_batch(), &mut clock).unwrap();
        assert_mixed_batch_outcome(&store, &out).await;
        // A reply to a message earlier in the same batch is accepted.
        let out = committer.insert_batch(&[msg("m6", "c", 0), msg("m7", "c", 1)], &mut clock).unwrap();
        assert_eq!(out.iter().map(seq).collect::<Vec<_>>(), [Some(1), Some(2)]);
    }
}

//! The chats store on SQLite, through rusqlite only
//! ([`natter_db::sqlite::Sqlite`]): reads on the reader pool, every write
//! (chat activity included) on the one writer thread, so writes queue in
//! arrival order and never meet SQLite's write lock at once.
//!
//! Chat activity is kept in memory and written in the background
//! (`activity`): one writer, one process, so no one else reads the file
//! and may miss it; reads of a chat lay it over the row.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use natter_db::DbError;
use natter_db::sqlite::Sqlite;
use natter_kit::id::{ChatId, MessageId, UserId};
use rusqlite::types::{Type, Value};
use rusqlite::{Connection, OptionalExtension as _, Row, TransactionBehavior, params};

use natter_kit::time::now_micros;
use natter_proto::messages::v1 as mpb;

use super::{
    Added, Adder, BLOCKS_WITHIN, Backoff, Blocked, ChatStore, Checked, Created, FIRST_ARCHIVE_VERSION,
    FIRST_BLOCK_VERSION, MIGRATOR, OLD_ARCHIVED_CHATS, OLD_BLOCKED_DIRECT_CHATS, PAIR_BLOCKED, Peers, Pending,
    RAISE_BLOCK_VERSION, RAISE_MEMBERS_VERSION, ROLE_TARGETS, Removal, StoreError, blocks_between_refused, changes_to,
    chat_archived, chat_columns, chat_updated, check_roles, departed, direct_chat_closed, direct_key, joined,
    loses_rights, may_change, may_delete, members_departed, membership, order_column, outbox_rows, parse_enum,
    parse_id, pending_row, role_changes, time_bounds, updated_by,
};
use crate::domain::{
    Activity, AssistantReplies, Chat, ChatAccess, ChatCursor, ChatFilter, ChatUpdate, DirectChats, GroupAdds, Kind,
    Limits, Member, MemberCursor, PrivacyChoices, ReadReceipts, Role, StoredPrivacy, Visibility, title_key,
};

mod activity;

use activity::ActivityBuffer;

/// The chats store on one SQLite file (see the module docs).
#[derive(Debug)]
pub struct SqliteChatStore {
    db: Sqlite,
    activity: ActivityBuffer,
}

impl SqliteChatStore {
    /// Migrates the file at `path` (created if missing), opens it with up to
    /// `readers` reader connections and the writer thread, and starts the
    /// activity flush every `activity_interval` on the current tokio runtime.
    ///
    /// Errors: the file cannot be opened or migrated. Panics outside a tokio
    /// runtime.
    pub async fn open(path: &Path, readers: usize, activity_interval: Duration) -> Result<Self, StoreError> {
        let db = Sqlite::open(path, &MIGRATOR, readers).await?;
        let activity = ActivityBuffer::start(db.clone(), activity_interval);
        Ok(Self { db, activity })
    }

    /// The database (for tests that look past the activity buffer).
    pub fn db(&self) -> &Sqlite {
        &self.db
    }

    /// The chat `id` as the file has it, with pending activity laid over.
    async fn read_chat(&self, id: ChatId) -> Result<Option<Chat>, StoreError> {
        let chat = self.db.read(move |conn| select_chat(conn, id)).await.map_err(unwrap)?;
        Ok(chat.map(|chat| self.activity.overlay(chat)))
    }
}

/// A [`StoreError`] out of a [`DbError`]: a corrupt value that a row mapper
/// had to wrap in a rusqlite error comes back out as itself.
fn unwrap(e: DbError) -> StoreError {
    match e {
        DbError::Sqlite(rusqlite::Error::FromSqlConversionFailure(_, _, inner)) if inner.is::<StoreError>() => {
            *inner.downcast::<StoreError>().expect("checked above")
        }
        e => StoreError::Db(e),
    }
}

/// A corrupt value of column `idx`, as a rusqlite error (row mappers can
/// return only those); [`unwrap`] takes it out again.
fn corrupt(idx: usize, column: &'static str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(StoreError::corrupt(column, value)))
}

/// Reads column `idx` as text and parses it strictly with `parse`.
fn parsed<T>(row: &Row<'_>, idx: usize, column: &'static str, parse: fn(&str) -> Option<T>) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    parse_enum(column, &text, parse).map_err(|_| corrupt(idx, column, &text))
}

/// [`parsed`] of a nullable column: None for NULL.
fn parsed_opt<T>(
    row: &Row<'_>,
    idx: usize,
    column: &'static str,
    parse: fn(&str) -> Option<T>,
) -> rusqlite::Result<Option<T>> {
    let text: Option<String> = row.get(idx)?;
    text.map(|t| parse_enum(column, &t, parse).map_err(|_| corrupt(idx, column, &t))).transpose()
}

/// `ids` as a JSON array of strings (a UUID's text needs no escaping), for
/// `json_each`: one statement whatever their number (callers bound it).
fn json_ids(ids: &[UserId]) -> String {
    format!("[{}]", ids.iter().map(|id| format!("\"{id}\"")).collect::<Vec<_>>().join(","))
}

/// Reads column `idx` as an id.
fn id<T: std::str::FromStr>(row: &Row<'_>, idx: usize, column: &'static str) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    parse_id(column, &text).map_err(|_| corrupt(idx, column, &text))
}

/// The one chat row mapper: `chat_columns!()` from column 0.
fn chat_row(row: &Row<'_>) -> rusqlite::Result<Chat> {
    Ok(Chat {
        id: id(row, 0, "chats.id")?,
        kind: parsed(row, 1, "chats.kind", Kind::parse)?,
        title: row.get(2)?,
        description: row.get(3)?,
        visibility: parsed(row, 4, "chats.visibility", Visibility::parse)?,
        owner_id: id(row, 5, "chats.owner_id")?,
        creator_id: id(row, 6, "chats.creator_id")?,
        member_count: row.get(7)?,
        archive_time: row.get(8)?,
        create_time: row.get(9)?,
        update_time: row.get(10)?,
        last_activity_time: row.get(11)?,
        last_seq: row.get(12)?,
        last_message_time: row.get(13)?,
        assistant_replies: parsed(row, 14, "chats.assistant_replies", AssistantReplies::parse)?,
        members_version: row.get(15)?,
    })
}

/// The member row mapper: `chat_id, user_id, role, join_time`.
fn member_row(row: &Row<'_>) -> rusqlite::Result<Member> {
    Ok(Member {
        chat_id: id(row, 0, "members.chat_id")?,
        user_id: id(row, 1, "members.user_id")?,
        role: parsed(row, 2, "members.role", Role::parse)?,
        join_time: row.get(3)?,
    })
}

fn select_chat(conn: &Connection, id: ChatId) -> rusqlite::Result<Option<Chat>> {
    let sql = concat!("SELECT ", chat_columns!(), " FROM chats c WHERE c.id = ?1");
    conn.prepare_cached(sql)?.query_row([id.to_string()], chat_row).optional()
}

/// True for a unique or primary-key violation.
fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

/// The first of `users` recorded by [`ChatStore::record_forgotten`], read
/// inside the transaction of a write about them (a membership, a block).
fn forgotten_among(tx: &Connection, users: impl IntoIterator<Item = UserId>) -> rusqlite::Result<Option<UserId>> {
    let mut select = tx.prepare_cached("SELECT 1 FROM forgotten_users WHERE user_id = ?1")?;
    for user in users {
        if select.exists([user.to_string()])? {
            return Ok(Some(user));
        }
    }
    Ok(None)
}

/// The blocker of the first of `pairs` (blocker, blocked) that is a block,
/// read in the membership write's transaction `tx` (the one writer: no
/// block commits before this write does; see [`blocks_between_refused`]).
fn first_block(tx: &Connection, pairs: &[(UserId, UserId)]) -> rusqlite::Result<Option<UserId>> {
    let mut select = tx.prepare_cached("SELECT 1 FROM blocks WHERE user_id = ?1 AND blocked_user_id = ?2")?;
    for (blocker, blocked) in pairs {
        if select.exists([blocker.to_string(), blocked.to_string()])? {
            return Ok(Some(*blocker));
        }
    }
    Ok(None)
}

/// `user`'s role in `chat`, None if no member, read in the transaction `tx`
/// of a membership change.
fn role_in(tx: &Connection, chat: &str, user: UserId) -> rusqlite::Result<Option<Role>> {
    tx.prepare_cached("SELECT role FROM members WHERE chat_id = ?1 AND user_id = ?2")?
        .query_row([chat, &user.to_string()], |row| parsed(row, 0, "members.role", Role::parse))
        .optional()
}

/// What a change of chat `id` by `by` ([`ChatStore::update_chat`],
/// [`ChatStore::delete_chat`]) answers instead of being written, read in
/// its transaction `tx`: None if it may go on (no `by`, or one who may:
/// `may`, [`may_change`] or [`may_delete`]), Some(None) if there is no such
/// chat, Some(Some(Actor)) if `by` may not.
fn refused_change<T>(
    tx: &Connection,
    id: ChatId,
    by: Option<UserId>,
    may: fn(Kind, Option<Role>) -> bool,
) -> rusqlite::Result<Option<Option<Checked<T>>>> {
    let Some(by) = by else { return Ok(None) };
    let key = id.to_string();
    let kind = tx
        .prepare_cached("SELECT kind FROM chats WHERE id = ?1")?
        .query_row([&key], |row| parsed(row, 0, "chats.kind", Kind::parse))
        .optional()?;
    let Some(kind) = kind else { return Ok(Some(None)) };
    let role = role_in(tx, &key, by)?;
    Ok((!may(kind, role)).then_some(Some(Checked::Actor(role))))
}

/// Sets a chat's update time as the first write of a membership change.
fn touch(tx: &Connection, chat: &str, now: i64) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE chats SET update_time = ?1 WHERE id = ?2")?.execute(params![now, chat])?;
    Ok(())
}

/// Appends the outbox entries of `changes` (none for none) to `chat`'s, in
/// the transaction `tx` of the change (the one writer makes max + 1 unique).
fn push_outbox(tx: &Connection, chat: &str, changes: &[mpb::ChatChange], now: i64) -> rusqlite::Result<()> {
    let rows = outbox_rows(changes, now);
    if rows.is_empty() {
        return Ok(());
    }
    let last: i64 = tx
        .prepare_cached("SELECT COALESCE(MAX(position), 0) FROM chat_outbox WHERE chat_id = ?1")?
        .query_row([chat], |r| r.get(0))?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO chat_outbox (chat_id, position, origin, changes, create_time) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (position, (key, changes)) in (last + 1..).zip(rows) {
        insert.execute(params![chat, position, key, changes, now])?;
    }
    Ok(())
}

/// Raises the block version of the direct chat of `a` and `b`, if any,
/// with its closure as the blocks between them now have it in the outbox,
/// in the transaction `tx` of a change of those blocks.
fn reclose_direct(tx: &Connection, a: UserId, b: UserId, now: i64) -> rusqlite::Result<()> {
    let raised: Option<(String, i64)> = tx
        .prepare_cached(RAISE_BLOCK_VERSION)?
        .query_row([crate::domain::direct_key(a, b)], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((chat, version)) = raised else { return Ok(()) };
    let closed: bool = tx.prepare_cached(PAIR_BLOCKED)?.query_row([a.to_string(), b.to_string()], |row| row.get(0))?;
    push_outbox(tx, &chat, &[direct_chat_closed(closed, version)], now)
}

/// Recomputes a chat's member count and returns it (0 for no such chat).
fn recount(tx: &Connection, chat: &str) -> rusqlite::Result<i64> {
    tx.prepare_cached(
        "UPDATE chats SET member_count = (SELECT COUNT(*) FROM members WHERE chat_id = ?1) WHERE id = ?1 \
         RETURNING member_count",
    )?
    .query_row([chat], |r| r.get(0))
    .optional()
    .map(Option::unwrap_or_default)
}

/// The SQL and values of a ListChats page (`?N` numbered placeholders):
/// `chat_columns!()` then `m.role`, `user`'s role ([`access_row`]).
fn list_sql(user: UserId, filter: &ChatFilter, after: Option<ChatCursor>, limit: u32) -> (String, Vec<Value>) {
    let mut sql = String::from(concat!("SELECT ", chat_columns!(), ", m.role FROM chats c"));
    let mut values: Vec<Value> = Vec::new();
    let bind = |values: &mut Vec<Value>, v: Value| {
        values.push(v);
        format!("?{}", values.len())
    };
    let p = bind(&mut values, Value::Text(user.to_string()));
    if filter.public {
        sql.push_str(&format!(
            " LEFT JOIN members m ON m.chat_id = c.id AND m.user_id = {p} WHERE c.visibility = 'public'"
        ));
    } else {
        sql.push_str(&format!(" JOIN members m ON m.chat_id = c.id WHERE m.user_id = {p}"));
    }
    if filter.managed_only {
        sql.push_str(" AND m.role IN ('owner', 'admin')");
    }
    if let Some(kind) = filter.kind {
        let p = bind(&mut values, Value::Text(kind.as_str().into()));
        sql.push_str(&format!(" AND c.kind = {p}"));
    }
    match filter.archived {
        Some(true) => sql.push_str(" AND c.archive_time IS NOT NULL"),
        Some(false) => sql.push_str(" AND c.archive_time IS NULL"),
        None => {}
    }
    for (bound, condition) in time_bounds(filter) {
        if let Some(t) = bound {
            let p = bind(&mut values, Value::Integer(t));
            sql.push_str(&format!(" AND {condition} {p}"));
        }
    }
    if let Some(query) = &filter.query {
        let p = bind(&mut values, Value::Text(format!("%{}%", natter_db::escape_like(query))));
        sql.push_str(&format!(" AND c.title_key LIKE {p} ESCAPE '\\'"));
    }
    let (cmp, order) = if filter.ascending { (">", "ASC") } else { ("<", "DESC") };
    let key = order_column(filter.order_by);
    if let Some(after) = after {
        let t = bind(&mut values, Value::Integer(after.time));
        let i = bind(&mut values, Value::Text(after.chat_id.to_string()));
        sql.push_str(&format!(" AND ({key} {cmp} {t} OR ({key} = {t} AND c.id {cmp} {i}))"));
    }
    // The limit is written, not bound: SQLite re-prepares a statement whose
    // bound LIMIT changes (see natter_db::SqlBuilder::limit).
    sql.push_str(&format!(" ORDER BY {key} {order}, c.id {order} LIMIT {limit}"));
    (sql, values)
}

fn page(conn: &Connection, sql: &str, values: &[Value]) -> rusqlite::Result<Vec<ChatAccess>> {
    let mut page = conn.prepare_cached(sql)?;
    let rows = page.query_map(rusqlite::params_from_iter(values), access_row)?;
    rows.collect()
}

/// The access row mapper: `chat_columns!()`, then the member's role (NULL:
/// not a member) at column 16.
fn access_row(row: &Row<'_>) -> rusqlite::Result<ChatAccess> {
    let role: Option<String> = row.get(16)?;
    let role = match role {
        Some(role) => Some(Role::parse(&role).ok_or_else(|| corrupt(16, "members.role", &role))?),
        None => None,
    };
    Ok(ChatAccess { chat: chat_row(row)?, role })
}

#[async_trait]
impl ChatStore for SqliteChatStore {
    async fn create_chat(&self, chat: &Chat, members: &[Member]) -> Result<Created, StoreError> {
        let direct_key = direct_key(chat, members)?;
        let (chat, members) = (chat.clone(), members.to_vec());
        let created = self.db.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Some(user) = forgotten_among(&tx, members.iter().map(|m| m.user_id))? {
                return Ok(Created::Forgotten(user));
            }
            let users: Vec<UserId> = members.iter().map(|m| m.user_id).collect();
            let pairs = blocks_between_refused(chat.creator_id, &users, chat.kind == Kind::Direct);
            if let Some(blocker) = first_block(&tx, &pairs)? {
                return Ok(Created::Blocked(blocker));
            }
            // Ids are never reused, a deleted chat's included.
            if tx
                .prepare_cached("INSERT INTO chat_ids (id) VALUES (?1) ON CONFLICT (id) DO NOTHING")?
                .execute([chat.id.to_string()])?
                == 0
            {
                return Ok(Created::Conflict);
            }
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO chats (id, kind, title, title_key, description, visibility, owner_id, creator_id, \
                     direct_key, member_count, archive_time, create_time, update_time, last_activity_time, last_seq, \
                     last_message_time, assistant_replies) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
                )?
                .execute(params![
                    chat.id.to_string(),
                    chat.kind.as_str(),
                    chat.title,
                    title_key(&chat.title),
                    chat.description,
                    chat.visibility.as_str(),
                    chat.owner_id.to_string(),
                    chat.creator_id.to_string(),
                    direct_key,
                    chat.member_count,
                    chat.archive_time,
                    chat.create_time,
                    chat.update_time,
                    chat.last_activity_time,
                    chat.last_seq,
                    chat.last_message_time,
                    chat.assistant_replies.as_str(),
                ]);
            match inserted {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => return Ok(Created::Conflict),
                Err(e) => return Err(e),
            }
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO members (chat_id, user_id, role, join_time) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for m in &members {
                    insert.execute(params![
                        m.chat_id.to_string(),
                        m.user_id.to_string(),
                        m.role.as_str(),
                        m.join_time
                    ])?;
                }
            }
            let joins = joined(members.iter().map(|m| m.user_id));
            push_outbox(&tx, &chat.id.to_string(), &joins, chat.create_time)?;
            tx.commit()?;
            Ok(Created::Created)
        });
        created.await.map_err(unwrap)
    }

    async fn chat(&self, id: ChatId) -> Result<Option<Chat>, StoreError> {
        self.read_chat(id).await
    }

    async fn direct_chat(&self, a: UserId, b: UserId) -> Result<Option<Chat>, StoreError> {
        let key = crate::domain::direct_key(a, b);
        let chat = self.db.read(move |conn| {
            let sql = concat!("SELECT ", chat_columns!(), " FROM chats c WHERE c.direct_key = ?1");
            conn.prepare_cached(sql)?.query_row([key], chat_row).optional()
        });
        Ok(chat.await.map_err(unwrap)?.map(|chat| self.activity.overlay(chat)))
    }

    async fn access(&self, chat: ChatId, user: UserId) -> Result<Option<ChatAccess>, StoreError> {
        // One read: this is on every send's path (membership check).
        let access = self.db.read(move |conn| {
            let sql = concat!(
                "SELECT ",
                chat_columns!(),
                ", m.role FROM chats c LEFT JOIN members m ON m.chat_id = c.id AND m.user_id = ?1 WHERE c.id = ?2"
            );
            conn.prepare_cached(sql)?.query_row([user.to_string(), chat.to_string()], access_row).optional()
        });
        Ok(access.await.map_err(unwrap)?.map(|mut access| {
            access.chat = self.activity.overlay(access.chat);
            access
        }))
    }

    async fn role(&self, chat: ChatId, user: UserId) -> Result<Option<Role>, StoreError> {
        let role = self.db.read(move |conn| {
            conn.prepare_cached("SELECT role FROM members WHERE chat_id = ?1 AND user_id = ?2")?
                .query_row([chat.to_string(), user.to_string()], |row| parsed(row, 0, "members.role", Role::parse))
                .optional()
        });
        role.await.map_err(unwrap)
    }

    async fn members_among(&self, chat: ChatId, users: &[UserId]) -> Result<Vec<UserId>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let users = users.to_vec();
        // One probe of the primary key per user with one cached statement
        // (an IN list of each length would be a statement of its own,
        // crowding the hot ones out of the connection's cache).
        let members = self.db.read(move |conn| {
            let mut probe = conn.prepare_cached(
                "SELECT 1 FROM members WHERE chat_id = ?1 AND user_id = ?2 \
                 AND NOT EXISTS (SELECT 1 FROM forgotten_users WHERE user_id = ?2)",
            )?;
            let chat = chat.to_string();
            let mut members = Vec::new();
            for user in users {
                if probe.exists([chat.as_str(), user.to_string().as_str()])? {
                    members.push(user);
                }
            }
            Ok(members)
        });
        members.await.map_err(unwrap)
    }

    async fn record_forgotten(&self, user: UserId, now: i64) -> Result<(), StoreError> {
        // One writer: a membership write either committed before this (and
        // the caller's next read sees it) or checks after it.
        let done = self.db.write(move |conn| {
            let tx = conn.transaction()?;
            tx.prepare_cached(
                "INSERT INTO forgotten_users (user_id, forget_time) VALUES (?1, ?2) ON CONFLICT (user_id) DO NOTHING",
            )?
            .execute(params![user.to_string(), now])?;
            tx.prepare_cached("DELETE FROM privacy_settings WHERE user_id = ?1")?.execute([user.to_string()])?;
            // The others of the blocks that go, each once.
            let others: BTreeSet<UserId> = tx
                .prepare_cached(
                    "DELETE FROM blocks WHERE user_id = ?1 OR blocked_user_id = ?1 \
                     RETURNING CASE WHEN user_id = ?1 THEN blocked_user_id ELSE user_id END",
                )?
                .query_map([user.to_string()], |row| id(row, 0, "blocks.user_id"))?
                .collect::<rusqlite::Result<_>>()?;
            for other in others {
                reclose_direct(&tx, user, other, now)?;
            }
            tx.commit()
        });
        done.await.map_err(unwrap)?;
        Ok(())
    }

    async fn privacy_settings(&self, user: UserId) -> Result<Option<StoredPrivacy>, StoreError> {
        let settings = self.db.read(move |conn| {
            conn.prepare_cached(
                "SELECT group_adds, direct_chats, read_receipts, update_time FROM privacy_settings WHERE user_id = ?1",
            )?
            .query_row([user.to_string()], stored_privacy)
            .optional()
        });
        settings.await.map_err(unwrap)
    }

    async fn set_privacy_settings(
        &self,
        user: UserId,
        update: PrivacyChoices,
        now: i64,
    ) -> Result<Option<StoredPrivacy>, StoreError> {
        let done = self.db.write(move |conn| {
            let tx = conn.transaction()?;
            // A user forgotten since the caller looked them up keeps no row.
            if forgotten_among(&tx, [user])?.is_some() {
                return Ok(None);
            }
            let stored = tx
                .prepare_cached(
                    "INSERT INTO privacy_settings (user_id, group_adds, direct_chats, read_receipts, update_time) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (user_id) DO UPDATE SET \
                 group_adds = COALESCE(excluded.group_adds, privacy_settings.group_adds), \
                 direct_chats = COALESCE(excluded.direct_chats, privacy_settings.direct_chats), \
                 read_receipts = COALESCE(excluded.read_receipts, privacy_settings.read_receipts), \
                 update_time = excluded.update_time \
                 RETURNING group_adds, direct_chats, read_receipts, update_time",
                )?
                .query_row(
                    params![
                        user.to_string(),
                        update.group_adds.map(GroupAdds::as_str),
                        update.direct_chats.map(DirectChats::as_str),
                        update.read_receipts.map(ReadReceipts::as_str),
                        now
                    ],
                    stored_privacy,
                )?;
            tx.commit()?;
            Ok(Some(stored))
        });
        done.await.map_err(unwrap)
    }

    async fn privacy_among(&self, users: &[UserId]) -> Result<Vec<(UserId, PrivacyChoices)>, StoreError> {
        let users = json_ids(users);
        let found = self.db.read(move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT group_adds, direct_chats, read_receipts, user_id FROM privacy_settings \
                 WHERE user_id IN (SELECT value FROM json_each(?1))",
            )?;
            let rows = select
                .query_map([users], |row| Ok((id(row, 3, "privacy_settings.user_id")?, privacy_choices(row)?)))?;
            rows.collect()
        });
        found.await.map_err(unwrap)
    }

    async fn block(&self, user: UserId, other: UserId, now: i64, limit: usize) -> Result<Blocked, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let done = self.db.write(move |conn| {
            let tx = conn.transaction()?;
            // A user forgotten since the caller looked them up keeps no block.
            if let Some(gone) = forgotten_among(&tx, [user, other])? {
                return Ok(Blocked::Forgotten(gone));
            }
            let (blocker, blocked) = (user, other);
            let (user, other) = (user.to_string(), other.to_string());
            let exists = tx
                .prepare_cached("SELECT 1 FROM blocks WHERE user_id = ?1 AND blocked_user_id = ?2")?
                .exists([&user, &other])?;
            if exists {
                return Ok(Blocked::Done);
            }
            let count: i64 = tx
                .prepare_cached("SELECT COUNT(*) FROM (SELECT 1 FROM blocks WHERE user_id = ?1 LIMIT ?2)")?
                .query_row(params![user, limit], |row| row.get(0))?;
            if count >= limit {
                return Ok(Blocked::TooMany); // the guard rolls back
            }
            tx.prepare_cached("INSERT INTO blocks (user_id, blocked_user_id, block_time) VALUES (?1, ?2, ?3)")?
                .execute(params![user, other, now])?;
            reclose_direct(&tx, blocker, blocked, now)?;
            tx.commit()?;
            Ok(Blocked::Done)
        });
        done.await.map_err(unwrap)
    }

    async fn unblock(&self, user: UserId, other: UserId, now: i64) -> Result<(), StoreError> {
        let done = self.db.write(move |conn| {
            let tx = conn.transaction()?;
            let deleted = tx
                .prepare_cached("DELETE FROM blocks WHERE user_id = ?1 AND blocked_user_id = ?2")?
                .execute([user.to_string(), other.to_string()])?;
            if deleted > 0 {
                reclose_direct(&tx, user, other, now)?;
            }
            tx.commit()
        });
        done.await.map_err(unwrap)?;
        Ok(())
    }

    async fn version_old_blocks(&self, now: i64, limit: u32) -> Result<usize, StoreError> {
        let found = self.db.write(move |conn| {
            let chats: Vec<String> = conn
                .prepare_cached(OLD_BLOCKED_DIRECT_CHATS)?
                .query_map([limit], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for chat in &chats {
                let tx = conn.transaction()?;
                if tx.prepare_cached(FIRST_BLOCK_VERSION)?.exists([chat])? {
                    let closed: bool = tx.prepare_cached(BLOCKS_WITHIN)?.query_row([chat], |row| row.get(0))?;
                    push_outbox(&tx, chat, &[direct_chat_closed(closed, 1)], now)?;
                }
                tx.commit()?;
            }
            Ok(chats.len())
        });
        found.await.map_err(unwrap)
    }

    async fn version_old_archives(&self, now: i64, limit: u32) -> Result<usize, StoreError> {
        let found = self.db.write(move |conn| {
            let chats: Vec<String> = conn
                .prepare_cached(OLD_ARCHIVED_CHATS)?
                .query_map([limit], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for chat in &chats {
                let tx = conn.transaction()?;
                if tx.prepare_cached(FIRST_ARCHIVE_VERSION)?.exists([chat])? {
                    push_outbox(&tx, chat, &[chat_archived(true, 1)], now)?;
                }
                tx.commit()?;
            }
            Ok(chats.len())
        });
        found.await.map_err(unwrap)
    }

    async fn blocked_users(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<(UserId, i64)>, StoreError> {
        let after = after.map(|a| a.to_string()).unwrap_or_default();
        let found = self.db.read(move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT blocked_user_id, block_time FROM blocks WHERE user_id = ?1 AND blocked_user_id > ?2 \
                 ORDER BY blocked_user_id LIMIT ?3",
            )?;
            let rows = select.query_map(params![user.to_string(), after, limit], |row| {
                Ok((id(row, 0, "blocks.blocked_user_id")?, row.get(1)?))
            })?;
            rows.collect()
        });
        found.await.map_err(unwrap)
    }

    async fn blockers_among(&self, user: UserId, users: &[UserId]) -> Result<Vec<UserId>, StoreError> {
        let users = json_ids(users);
        let found = self.db.read(move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT DISTINCT u.value FROM json_each(?1) u \
                 WHERE EXISTS (SELECT 1 FROM blocks WHERE user_id = u.value AND blocked_user_id = ?2)",
            )?;
            let rows = select.query_map((users, user.to_string()), id_of)?;
            rows.collect()
        });
        found.await.map_err(unwrap)
    }

    async fn blocks_within(&self, chat: ChatId) -> Result<bool, StoreError> {
        let found = self.db.read(move |conn| {
            conn.prepare_cached(
                "SELECT 1 FROM members m JOIN blocks b ON b.user_id = m.user_id \
                 JOIN members o ON o.chat_id = m.chat_id AND o.user_id = b.blocked_user_id \
                 WHERE m.chat_id = ?1 LIMIT 1",
            )?
            .exists([chat.to_string()])
        });
        found.await.map_err(unwrap)
    }

    async fn users_in_groups(&self, users: &[UserId], groups: usize) -> Result<Vec<UserId>, StoreError> {
        let users = json_ids(users);
        let groups = i64::try_from(groups).unwrap_or(i64::MAX);
        let found = self.db.read(move |conn| {
            // Walks members_by_user, each row's chat by its key, until
            // `groups` groups are found.
            let mut select = conn.prepare_cached(
                "SELECT DISTINCT u.value FROM json_each(?1) u \
                 WHERE (SELECT COUNT(*) FROM (SELECT 1 FROM members m JOIN chats c ON c.id = m.chat_id \
                 WHERE m.user_id = u.value AND c.kind = 'group' LIMIT ?2)) >= ?2",
            )?;
            let rows = select.query_map((users, groups), id_of)?;
            rows.collect()
        });
        found.await.map_err(unwrap)
    }

    async fn member_chat_ids(&self, user: UserId, managed_only: bool) -> Result<Vec<ChatId>, StoreError> {
        let ids = self.db.read(move |conn| {
            let mut select = conn.prepare_cached(if managed_only {
                "SELECT chat_id FROM members WHERE user_id = ?1 AND role IN ('owner', 'admin')"
            } else {
                "SELECT chat_id FROM members WHERE user_id = ?1"
            })?;
            let ids = select.query_map([user.to_string()], |row| id(row, 0, "members.chat_id"))?;
            ids.collect()
        });
        ids.await.map_err(unwrap)
    }

    async fn peers_among(&self, user: UserId, candidates: &[UserId], by: Peers) -> Result<Vec<UserId>, StoreError> {
        let candidates = json_ids(candidates);
        let (private_only, unblocked) = (by == Peers::Privacy, by == Peers::Presence);
        let ids = self.db.read(move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT DISTINCT o.user_id FROM members o \
                 WHERE o.user_id IN (SELECT value FROM json_each(?2)) \
                 AND EXISTS (SELECT 1 FROM members m WHERE m.chat_id = o.chat_id AND m.user_id = ?1) \
                 AND (?3 = 0 OR EXISTS (SELECT 1 FROM chats c WHERE c.id = o.chat_id AND c.visibility <> 'public')) \
                 AND (?4 = 0 OR NOT EXISTS (SELECT 1 FROM blocks b WHERE \
                     (b.user_id = ?1 AND b.blocked_user_id = o.user_id) \
                     OR (b.user_id = o.user_id AND b.blocked_user_id = ?1))) \
                 AND NOT EXISTS (SELECT 1 FROM forgotten_users f WHERE f.user_id = o.user_id)",
            )?;
            let ids = select.query_map((user.to_string(), candidates, private_only, unblocked), id_of)?;
            ids.collect()
        });
        ids.await.map_err(unwrap)
    }

    async fn blocked_peers(&self, user: UserId) -> Result<Vec<UserId>, StoreError> {
        let ids = self.db.read(move |conn| {
            // Each direction by its own index (the key, blocks_by_blocked).
            let mut select = conn.prepare_cached(
                "SELECT r.other FROM (SELECT blocked_user_id AS other FROM blocks WHERE user_id = ?1 \
                 UNION SELECT user_id FROM blocks WHERE blocked_user_id = ?1) r \
                 WHERE EXISTS (SELECT 1 FROM members m JOIN members o ON o.chat_id = m.chat_id \
                 WHERE m.user_id = ?1 AND o.user_id = r.other)",
            )?;
            let ids = select.query_map([user.to_string()], id_of)?;
            ids.collect()
        });
        ids.await.map_err(unwrap)
    }

    async fn list_chats(
        &self,
        user: UserId,
        filter: &ChatFilter,
        after: Option<ChatCursor>,
        limit: u32,
    ) -> Result<Vec<ChatAccess>, StoreError> {
        let (sql, values) = list_sql(user, filter, after, limit);
        // One trip to a reader: it checks whether pending activity concerns
        // chats this listing can show, and reads the page when none does.
        // Only otherwise is that activity written first (through the writer
        // thread) and the page read again.
        let (pending, public) = (self.activity.pending(), filter.public);
        let first = self.db.read(move |conn| {
            let shown = activity::listed(conn, &pending, public, user)?;
            Ok(if shown.is_empty() { Ok(page(conn, &sql, &values)?) } else { Err((shown, sql, values)) })
        });
        match first.await.map_err(unwrap)? {
            Ok(rows) => Ok(rows),
            Err((shown, sql, values)) => {
                if let Err(e) = self.activity.write(shown).await {
                    tracing::warn!(error = %e, "writing chat activity before a listing failed");
                }
                self.db.read(move |conn| page(conn, &sql, &values)).await.map_err(unwrap)
            }
        }
    }

    async fn record_activity(&self, activities: &[Activity]) -> Result<(), StoreError> {
        self.activity.record(activities);
        Ok(())
    }

    async fn flush_activity(&self) -> Result<(), StoreError> {
        self.activity.flush().await
    }

    async fn update_chat(
        &self,
        id: ChatId,
        update: &ChatUpdate,
        now: i64,
        by: Option<UserId>,
    ) -> Result<Option<Checked<Chat>>, StoreError> {
        let update = update.clone();
        let chat = self.db.write(move |conn| {
            // The one writer: the role and the chat read here hold until the
            // commit.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Some(refused) = refused_change(&tx, id, by, may_change)? {
                return Ok(refused); // the guard rolls back
            }
            let Some(before) = select_chat(&tx, id)? else { return Ok(None) };
            let key = id.to_string();
            if update.title.is_some() {
                // A title someone set is theirs, though it is the one it
                // has: no prompt's deletion takes it back.
                tx.prepare_cached("UPDATE chats SET title_source_message_id = NULL WHERE id = ?1")?.execute([&key])?;
            }
            let change = changes_to(&before, &update);
            if change == ChatUpdate::default() {
                tx.commit()?;
                return Ok(Some(Checked::Done(before)));
            }
            // One UPDATE of the fields that change.
            let mut sql = String::from("UPDATE chats SET update_time = ?1");
            let mut values: Vec<Value> = vec![Value::Integer(now)];
            if let Some(title) = &change.title {
                values.extend([Value::Text(title.clone()), Value::Text(title_key(title))]);
                sql.push_str(&format!(", title = ?{}, title_key = ?{}", values.len() - 1, values.len()));
            }
            if let Some(description) = &change.description {
                values.push(Value::Text(description.clone()));
                sql.push_str(&format!(", description = ?{}", values.len()));
            }
            if let Some(visibility) = change.visibility {
                values.push(Value::Text(visibility.as_str().into()));
                sql.push_str(&format!(", visibility = ?{}", values.len()));
            }
            if let Some(replies) = change.assistant_replies {
                values.push(Value::Text(replies.as_str().into()));
                sql.push_str(&format!(", assistant_replies = ?{}", values.len()));
            }
            values.push(Value::Text(key.clone()));
            sql.push_str(&format!(" WHERE id = ?{}", values.len()));
            tx.prepare_cached(&sql)?.execute(rusqlite::params_from_iter(&values))?;
            let chat = select_chat(&tx, id)?;
            if let Some(chat) = &chat {
                push_outbox(&tx, &key, &[updated_by(chat, &change)], now)?;
            }
            tx.commit()?;
            Ok(chat.map(Checked::Done))
        });
        Ok(chat.await.map_err(unwrap)?.map(|checked| checked.map(|chat| self.activity.overlay(chat))))
    }

    async fn title_chat(
        &self,
        id: ChatId,
        title: &str,
        source: Option<MessageId>,
        now: i64,
    ) -> Result<Option<(Chat, bool)>, StoreError> {
        let update = ChatUpdate { title: Some(title.to_owned()), ..ChatUpdate::default() };
        let source = source.map(|m| m.to_string());
        let titled = self.db.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let title = update.title.as_deref().unwrap_or_default();
            let changed = tx
                .prepare_cached(
                    "UPDATE chats SET title = ?1, title_key = ?2, update_time = ?3, title_source_message_id = ?5 \
                     WHERE id = ?4 AND title = ''",
                )?
                .execute(params![title, title_key(title), now, id.to_string(), source])?
                == 1;
            let chat = select_chat(&tx, id)?;
            if let Some(chat) = chat.as_ref().filter(|_| changed) {
                push_outbox(&tx, &id.to_string(), &[updated_by(chat, &update)], now)?;
            }
            tx.commit()?;
            Ok(chat.map(|chat| (chat, changed)))
        });
        Ok(titled.await.map_err(unwrap)?.map(|(chat, changed)| (self.activity.overlay(chat), changed)))
    }

    async fn untitle_chat(&self, id: ChatId, source: MessageId, now: i64) -> Result<Option<Chat>, StoreError> {
        let update = ChatUpdate { title: Some(String::new()), ..ChatUpdate::default() };
        let untitled = self.db.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let changed = tx
                .prepare_cached(
                    "UPDATE chats SET title = '', title_key = ?1, update_time = ?2, title_source_message_id = NULL \
                     WHERE id = ?3 AND title_source_message_id = ?4",
                )?
                .execute(params![title_key(""), now, id.to_string(), source.to_string()])?
                == 1;
            let chat = if changed { select_chat(&tx, id)? } else { None };
            if let Some(chat) = &chat {
                push_outbox(&tx, &id.to_string(), &[updated_by(chat, &update)], now)?;
            }
            tx.commit()?;
            Ok(chat)
        });
        Ok(untitled.await.map_err(unwrap)?.map(|chat| self.activity.overlay(chat)))
    }

    async fn set_archived(
        &self,
        id: ChatId,
        archive_time: Option<i64>,
        now: i64,
        by: Option<UserId>,
    ) -> Result<Option<Checked<Chat>>, StoreError> {
        let chat = self.db.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Some(refused) = refused_change(&tx, id, by, may_change)? {
                return Ok(refused); // the guard rolls back
            }
            let version: Option<i64> = tx
                .prepare_cached(
                    "UPDATE chats SET archive_time = ?1, update_time = ?2, archive_version = archive_version + 1 \
                     WHERE id = ?3 AND (archive_time IS NULL) <> (?1 IS NULL) RETURNING archive_version",
                )?
                .query_row(params![archive_time, now, id.to_string()], |row| row.get(0))
                .optional()?;
            let chat = select_chat(&tx, id)?;
            if let (Some(chat), Some(version)) = (chat.as_ref(), version) {
                push_outbox(&tx, &id.to_string(), &[chat_updated(chat, vec!["archived"])], now)?;
                push_outbox(&tx, &id.to_string(), &[chat_archived(archive_time.is_some(), version)], now)?;
            }
            tx.commit()?;
            Ok(chat.map(Checked::Done))
        });
        Ok(chat.await.map_err(unwrap)?.map(|checked| checked.map(|chat| self.activity.overlay(chat))))
    }

    async fn delete_chat(&self, id: ChatId, now: i64, by: Option<UserId>) -> Result<Checked<Vec<UserId>>, StoreError> {
        let members = self.db.write(move |conn| {
            // The one writer: the role read here holds until the commit.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            match refused_change(&tx, id, by, may_delete)? {
                None => {}
                Some(None) => return Ok(Checked::Done(Vec::new())), // gone already
                Some(Some(refused)) => return Ok(refused),          // the guard rolls back
            }
            let key = id.to_string();
            let members = {
                let mut delete = tx.prepare_cached("DELETE FROM members WHERE chat_id = ?1 RETURNING user_id")?;
                let rows = delete.query_map([&key], id_of)?;
                rows.collect::<rusqlite::Result<Vec<UserId>>>()?
            };
            if tx.prepare_cached("DELETE FROM chats WHERE id = ?1")?.execute([&key])? > 0 {
                tx.prepare_cached("UPDATE chat_ids SET delete_time = ?2 WHERE id = ?1")?.execute(params![key, now])?;
            }
            let removals: Vec<_> =
                members.iter().map(|user| membership(*user, mpb::MembershipChange::Removed)).collect();
            push_outbox(&tx, &key, &removals, now_micros())?;
            tx.commit()?;
            Ok(Checked::Done(members))
        });
        let members = members.await.map_err(unwrap)?;
        if let Checked::Done(_) = members {
            self.activity.forget(id);
        }
        Ok(members)
    }

    async fn chats_to_purge(&self, limit: u32) -> Result<Vec<ChatId>, StoreError> {
        let ids = self.db.read(move |conn| {
            conn.prepare_cached(
                "SELECT id FROM chat_ids WHERE delete_time IS NOT NULL AND purge_time IS NULL \
                 ORDER BY delete_time LIMIT ?1",
            )?
            .query_map([limit], |row| row.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()
        });
        ids.await.map_err(unwrap)?.iter().map(|id| parse_id("chat_ids.id", id)).collect()
    }

    async fn chat_purged(&self, id: ChatId, now: i64) -> Result<(), StoreError> {
        let done = self.db.write(move |conn| {
            conn.prepare_cached("UPDATE chat_ids SET purge_time = ?2 WHERE id = ?1 AND delete_time IS NOT NULL")?
                .execute(params![id.to_string(), now])
        });
        done.await.map_err(unwrap)?;
        Ok(())
    }

    async fn purge_due(&self, id: ChatId) -> Result<bool, StoreError> {
        let due = self.db.read(move |conn| {
            conn.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM chat_ids WHERE id = ?1 AND delete_time IS NOT NULL AND purge_time IS NULL)",
            )?
            .query_row([id.to_string()], |row| row.get::<_, bool>(0))
        });
        Ok(due.await.map_err(unwrap)?)
    }

    async fn followed(&self, name: &str) -> Result<i64, StoreError> {
        let name = name.to_owned();
        let position = self.db.read(move |conn| {
            conn.prepare_cached("SELECT position FROM followed_logs WHERE name = ?1")?
                .query_row([name], |row| row.get::<_, i64>(0))
                .optional()
        });
        Ok(position.await.map_err(unwrap)?.unwrap_or(0))
    }

    async fn follow_to(&self, name: &str, position: i64) -> Result<(), StoreError> {
        let name = name.to_owned();
        let done = self.db.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO followed_logs (name, position) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET position = MAX(position, excluded.position)",
            )?
            .execute(params![name, position])
        });
        done.await.map_err(unwrap)?;
        Ok(())
    }

    async fn retry_later(&self, name: &str, item: &str, now: i64, backoff: Backoff) -> Result<(), StoreError> {
        let (name, item) = (name.to_owned(), item.to_owned());
        let done = self.db.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO followed_log_retries (name, item, retry_time, delay) VALUES (?1, ?2, ?3 + ?4, ?4) \
                 ON CONFLICT (name, item) DO UPDATE SET \
                 delay = min(max(delay * 2, ?4), ?5), retry_time = ?3 + min(max(delay * 2, ?4), ?5)",
            )?
            .execute(params![name, item, now, backoff.first, backoff.max])
        });
        done.await.map_err(unwrap)?;
        Ok(())
    }

    async fn retries(&self, name: &str, now: i64, limit: u32) -> Result<Vec<String>, StoreError> {
        let name = name.to_owned();
        let items = self.db.read(move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT item FROM followed_log_retries WHERE name = ?1 AND retry_time <= ?2 \
                 ORDER BY retry_time, item LIMIT ?3",
            )?;
            let items = select.query_map(params![name, now, limit], |row| row.get::<_, String>(0))?;
            items.collect()
        });
        items.await.map_err(unwrap)
    }

    async fn retried(&self, name: &str, item: &str) -> Result<(), StoreError> {
        let (name, item) = (name.to_owned(), item.to_owned());
        let done = self.db.write(move |conn| {
            conn.prepare_cached("DELETE FROM followed_log_retries WHERE name = ?1 AND item = ?2")?
                .execute(params![name, item])
        });
        done.await.map_err(unwrap)?;
        Ok(())
    }

    async fn add_members(
        &self,
        chat: ChatId,
        by: Adder,
        members: &[Member],
        limits: &Limits,
        now: i64,
    ) -> Result<Added, StoreError> {
        let (members, limits) = (members.to_vec(), *limits);
        let added = self.db.write(move |conn| {
            // The one writer: the chat and the roles read here hold until
            // the commit.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let key = chat.to_string();
            if let Some(user) = forgotten_among(&tx, members.iter().map(|m| m.user_id))? {
                return Ok(Added::Forgotten(user)); // the guard rolls back
            }
            let visibility = tx
                .prepare_cached("SELECT visibility FROM chats WHERE id = ?1")?
                .query_row([&key], |row| parsed(row, 0, "chats.visibility", Visibility::parse))
                .optional()?;
            let Some(visibility) = visibility else { return Ok(Added::ChatGone) };
            let may = match by {
                Adder::Manager(user) => role_in(&tx, &key, user)?.is_some_and(Role::manages),
                Adder::Joiner => visibility == Visibility::Public,
                Adder::Unchecked => true,
            };
            if !may {
                return Ok(Added::Refused); // the guard rolls back
            }
            touch(&tx, &key, now)?;
            let mut added = Vec::new();
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO members (chat_id, user_id, role, join_time) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (chat_id, user_id) DO NOTHING",
                )?;
                for m in &members {
                    if insert.execute(params![key, m.user_id.to_string(), m.role.as_str(), m.join_time])? == 1 {
                        added.push(*m);
                    }
                }
            }
            let count = recount(&tx, &key)? as usize;
            if !limits.admits_members(count) {
                return Ok(Added::TooMany(count)); // the guard rolls back
            }
            if let Adder::Manager(adder) = by {
                let users: Vec<UserId> = added.iter().map(|m: &Member| m.user_id).collect();
                if let Some(blocker) = first_block(&tx, &blocks_between_refused(adder, &users, false))? {
                    return Ok(Added::Blocked(blocker)); // the guard rolls back
                }
            }
            push_outbox(&tx, &key, &joined(added.iter().map(|m: &Member| m.user_id)), now)?;
            tx.commit()?;
            Ok(Added::Added(added))
        });
        added.await.map_err(unwrap)
    }

    async fn remove_member(
        &self,
        chat: ChatId,
        user: UserId,
        removal: Removal<'_>,
        now: i64,
    ) -> Result<Checked<()>, StoreError> {
        let Removal { departure, targets, actor } = removal;
        let (targets, actor) = (targets.to_vec(), actor.map(|(actor, required)| (actor, required.to_vec())));
        let removed = self.db.write(move |conn| {
            // The one writer: the roles read here hold until the commit.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let key = chat.to_string();
            let actor = match &actor {
                Some((actor, required)) => Some((role_in(&tx, &key, *actor)?, required.as_slice())),
                None => None,
            };
            let role = match check_roles(actor, role_in(&tx, &key, user)?, &targets) {
                Ok(role) => role,
                Err(refused) => return Ok(refused), // the guard rolls back
            };
            let removed = tx
                .prepare_cached("DELETE FROM members WHERE chat_id = ?1 AND user_id = ?2 AND role = ?3")?
                .execute([key.as_str(), &user.to_string(), role.as_str()])?;
            if removed == 0 {
                return Ok(Checked::NotMember); // the guard rolls back
            }
            touch(&tx, &key, now)?;
            recount(&tx, &key)?;
            let version: i64 = tx.prepare_cached(RAISE_MEMBERS_VERSION)?.query_row([&key], |row| row.get(0))?;
            for entry in departed(user, departure, version) {
                push_outbox(&tx, &key, &entry, now)?;
            }
            tx.commit()?;
            Ok(Checked::Done(()))
        });
        removed.await.map_err(unwrap)
    }

    async fn set_role(
        &self,
        chat: ChatId,
        by: UserId,
        user: UserId,
        role: Role,
        now: i64,
    ) -> Result<Checked<Member>, StoreError> {
        let member = self.db.write(move |conn| {
            // The one writer: the roles read here hold until the commit.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let key = chat.to_string();
            let actor = role_in(&tx, &key, by)?;
            let current = match check_roles(Some((actor, &[Role::Owner])), role_in(&tx, &key, user)?, ROLE_TARGETS) {
                Ok(current) => current,
                Err(refused) => return Ok(refused), // the guard rolls back
            };
            let user = user.to_string();
            touch(&tx, &key, now)?;
            let mut previous_owners = Vec::new();
            if role == Role::Owner {
                let mut demote = tx.prepare_cached(
                    "UPDATE members SET role = 'admin' WHERE chat_id = ?1 AND role = 'owner' AND user_id <> ?2 \
                     RETURNING user_id",
                )?;
                previous_owners = demote.query_map([&key, &user], id_of)?.collect::<rusqlite::Result<_>>()?;
                tx.prepare_cached("UPDATE chats SET owner_id = ?1 WHERE id = ?2")?.execute([&user, &key])?;
            }
            let member = tx
                .prepare_cached(
                    "UPDATE members SET role = ?1 WHERE chat_id = ?2 AND user_id = ?3 AND role = ?4 \
                     RETURNING chat_id, user_id, role, join_time",
                )?
                .query_row(params![role.as_str(), key, user, current.as_str()], member_row)
                .optional()?;
            let Some(member) = member else {
                return Ok(Checked::NotMember); // the guard rolls back
            };
            let demoted = loses_rights(current, role, !previous_owners.is_empty());
            push_outbox(&tx, &key, &role_changes(member.user_id, previous_owners), now)?;
            if demoted {
                let version: i64 = tx.prepare_cached(RAISE_MEMBERS_VERSION)?.query_row([&key], |row| row.get(0))?;
                push_outbox(&tx, &key, &[members_departed(version)], now)?;
            }
            tx.commit()?;
            Ok(Checked::Done(member))
        });
        member.await.map_err(unwrap)
    }

    async fn members(&self, chat: ChatId, after: Option<MemberCursor>, limit: u32) -> Result<Vec<Member>, StoreError> {
        let members = self.db.read(move |conn| {
            let key = chat.to_string();
            match after {
                None => {
                    let sql = format!(
                        "SELECT chat_id, user_id, role, join_time FROM members WHERE chat_id = ?1 \
                         ORDER BY join_time, user_id LIMIT {limit}"
                    );
                    let mut select = conn.prepare_cached(&sql)?;
                    let rows = select.query_map([key], member_row)?;
                    rows.collect()
                }
                Some(after) => {
                    let sql = format!(
                        "SELECT chat_id, user_id, role, join_time FROM members WHERE chat_id = ?1 \
                         AND (join_time > ?2 OR (join_time = ?2 AND user_id > ?3)) ORDER BY join_time, user_id LIMIT {limit}"
                    );
                    let mut select = conn.prepare_cached(&sql)?;
                    let rows = select.query_map(params![key, after.join_time, after.user_id.to_string()], member_row)?;
                    rows.collect()
                }
            }
        });
        members.await.map_err(unwrap)
    }

    async fn pending(&self, chat: Option<ChatId>, limit: u32) -> Result<Vec<Pending>, StoreError> {
        let rows = self.db.read(move |conn| {
            let columns = "SELECT chat_id, position, origin, changes FROM chat_outbox";
            let row = |r: &Row<'_>| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get::<_, String>(3)?));
            match chat {
                Some(chat) => conn
                    .prepare_cached(&format!("{columns} WHERE chat_id = ?1 ORDER BY position LIMIT ?2"))?
                    .query_map(params![chat.to_string(), limit], row)?
                    .collect::<rusqlite::Result<Vec<_>>>(),
                None => conn
                    .prepare_cached(&format!("{columns} ORDER BY chat_id, position LIMIT ?1"))?
                    .query_map([limit], row)?
                    .collect(),
            }
        });
        let rows = rows.await.map_err(unwrap)?;
        rows.into_iter().map(|(chat, position, key, changes)| pending_row(&chat, position, key, &changes)).collect()
    }

    async fn forget_pending(&self, entry: &Pending) -> Result<(), StoreError> {
        let (chat, position, key) = (entry.chat_id.to_string(), entry.position, entry.key.clone());
        let forgotten = self.db.write(move |conn| {
            conn.prepare_cached("DELETE FROM chat_outbox WHERE chat_id = ?1 AND position = ?2 AND origin = ?3")?
                .execute(params![chat, position, key])?;
            Ok(())
        });
        forgotten.await.map_err(unwrap)
    }

    async fn close(&self) {
        if let Err(e) = self.activity.flush().await {
            tracing::warn!(error = %e, "writing chat activity at shutdown failed");
        }
        self.db.close().await;
    }
}

/// Column 0 as a user id (`members.user_id`).
/// The choices of a privacy_settings row (group_adds, direct_chats,
/// read_receipts, update_time).
fn stored_privacy(row: &Row<'_>) -> rusqlite::Result<StoredPrivacy> {
    Ok(StoredPrivacy { choices: privacy_choices(row)?, update_time: row.get(3)? })
}

/// The choices of a privacy_settings row's first three columns
/// (group_adds, direct_chats, read_receipts), each NULL until the user sets
/// it.
fn privacy_choices(row: &Row<'_>) -> rusqlite::Result<PrivacyChoices> {
    Ok(PrivacyChoices {
        group_adds: parsed_opt(row, 0, "privacy_settings.group_adds", GroupAdds::parse)?,
        direct_chats: parsed_opt(row, 1, "privacy_settings.direct_chats", DirectChats::parse)?,
        read_receipts: parsed_opt(row, 2, "privacy_settings.read_receipts", ReadReceipts::parse)?,
    })
}

fn id_of(row: &Row<'_>) -> rusqlite::Result<UserId> {
    id(row, 0, "members.user_id")
}

#[cfg(test)]
mod tests {
    //! What only this engine has: activity kept in memory, and what the file
    //! holds past it.

    use std::time::{Duration, Instant};

    use natter_kit::id::{ChatId, UserId};

    use super::SqliteChatStore;
    use crate::domain::{Activity, ChatFilter};
    use crate::store::ChatStore as _;
    use crate::store::tests::{chat, owner};

    /// `(last_seq, last_activity_time)` as stored, past the buffer.
    async fn stored(store: &SqliteChatStore, id: ChatId) -> (i64, i64) {
        let read = store.db().read(move |c| {
            c.query_row("SELECT last_seq, last_activity_time FROM chats WHERE id = ?1", [id.to_string()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
        });
        read.await.unwrap()
    }

    /// Chats a (at 1 µs) and b (at 2 µs) of user u, and c (at 3 µs) of v.
    async fn three_chats(store: &SqliteChatStore) -> ([ChatId; 3], UserId) {
        let (u, v) = (UserId::new_v7(), UserId::new_v7());
        let mut ids = Vec::new();
        for (time, user) in [(1, u), (2, u), (3, v)] {
            let chat = chat(user, time);
            store.create_chat(&chat, &[owner(&chat)]).await.unwrap();
            ids.push(chat.id);
        }
        (ids.try_into().unwrap(), u)
    }

    #[tokio::test]
    async fn a_listing_writes_pending_activity_first_and_a_read_sees_it_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteChatStore::open(&dir.path().join("chats.db"), 2, Duration::from_secs(3600)).await.unwrap();
        let ([a, b, c], u) = three_chats(&store).await;
        let act = |chat_id, last_seq, time| Activity { chat_id, last_seq, time };
        store.record_activity(&[act(a, 5, 10), act(c, 2, 50)]).await.unwrap();
        // Not written yet (the timer is an hour away), but a read of the
        // chat already has it.
        assert_eq!(stored(&store, a).await, (0, 1));
        let got = store.chat(a).await.unwrap().unwrap();
        assert_eq!((got.last_seq, got.last_activity_time, got.last_message_time), (5, 10, Some(10)));
        // A listing writes its chats' activity first, so a is on top; c is
        // not u's, so its activity waits.
        let listed = store.list_chats(u, &ChatFilter::default(), None, 10).await.unwrap();
        assert_eq!(listed.iter().map(|c| c.chat.id).collect::<Vec<_>>(), [a, b]);
        assert_eq!(stored(&store, a).await, (5, 10));
        assert_eq!(stored(&store, c).await, (0, 3));
        assert_eq!(store.chat(c).await.unwrap().unwrap().last_seq, 2);
        // Activity never moves back, pending or stored.
        store.record_activity(&[act(a, 4, 20), act(b, 1, 3)]).await.unwrap();
        store.record_activity(&[act(b, 0, 30)]).await.unwrap();
        let got = store.chat(b).await.unwrap().unwrap();
        assert_eq!((got.last_seq, got.last_activity_time), (1, 3));
        store.flush_activity().await.unwrap();
        assert_eq!(stored(&store, a).await, (5, 10));
        assert_eq!(stored(&store, b).await, (1, 3));
        assert_eq!(stored(&store, c).await, (2, 50));
    }

    #[tokio::test]
    async fn the_timer_writes_pending_activity() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteChatStore::open(&dir.path().join("chats.db"), 2, Duration::from_millis(10)).await.unwrap();
        let ([_, b, _], _) = three_chats(&store).await;
        store.record_activity(&[Activity { chat_id: b, last_seq: 2, time: 7 }]).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while stored(&store, b).await != (2, 7) {
            assert!(Instant::now() < deadline, "activity not written by the timer within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn close_writes_pending_activity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chats.db");
        let store = SqliteChatStore::open(&path, 2, Duration::from_secs(3600)).await.unwrap();
        let ([a, _, _], _) = three_chats(&store).await;
        store.record_activity(&[Activity { chat_id: a, last_seq: 3, time: 9 }]).await.unwrap();
        store.close().await;
        assert_eq!(stored(&store, a).await, (3, 9), "reads still work after close, on what it wrote");
    }

    #[tokio::test]
    async fn an_unknown_stored_kind_is_an_error_not_a_default() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteChatStore::open(&dir.path().join("chats.db"), 2, Duration::from_secs(3600)).await.unwrap();
        let ([a, _, _], _) = three_chats(&store).await;
        store
            .db()
            .write(move |c| c.execute("UPDATE chats SET kind = 'channel' WHERE id = ?1", [a.to_string()]))
            .await
            .unwrap();
        let err = store.chat(a).await.unwrap_err();
        assert!(
            matches!(&err, crate::store::StoreError::Corrupt { column: "chats.kind", value } if value == "channel"),
            "{err:?}"
        );
    }
}

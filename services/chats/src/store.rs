//! The chats service's SQL: keyset-paged listings, one transaction per
//! change. Unique violations become domain outcomes; nothing else of the
//! database leaves this module.

use std::sync::Arc;
use std::time::Duration;

use natter_db::{Db, DbError, SqlBuilder, escape_like};

use crate::activity::ActivityBuffer;
use crate::domain::{Kind, Role};

/// A row of `chats`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ChatRow {
    pub id: String,
    pub kind: String,
    pub title: String,
    pub description: String,
    pub visibility: String,
    pub owner_id: String,
    pub creator_id: String,
    pub member_count: i64,
    pub archive_time: Option<i64>,
    pub create_time: i64,
    pub update_time: i64,
    pub last_activity_time: i64,
    pub last_seq: i64,
    pub last_message_time: Option<i64>,
}

const CHAT_SELECT: &str = "SELECT c.id, c.kind, c.title, c.description, c.visibility, c.owner_id, c.creator_id, \
    c.member_count, c.archive_time, c.create_time, c.update_time, c.last_activity_time, c.last_seq, c.last_message_time \
    FROM chats c";

/// A chat with one user's role in it (NULL: not a member); `$1` is the user.
const CHAT_SELECT_WITH_ROLE: &str = "SELECT c.id, c.kind, c.title, c.description, c.visibility, c.owner_id, c.creator_id, \
    c.member_count, c.archive_time, c.create_time, c.update_time, c.last_activity_time, c.last_seq, c.last_message_time, \
    m.role FROM chats c LEFT JOIN members m ON m.chat_id = c.id AND m.user_id = ";

/// The rows of a listing's `sql` with `values` bound, through rusqlite.
fn page(conn: &rusqlite::Connection, sql: &str, values: Vec<rusqlite::types::Value>) -> rusqlite::Result<Vec<ChatRow>> {
    let mut page = conn.prepare_cached(sql)?;
    let rows = page.query_map(rusqlite::params_from_iter(values), chat_row)?;
    rows.collect()
}

/// A [`CHAT_SELECT`] row read through rusqlite.
fn chat_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ChatRow> {
    Ok(ChatRow {
        id: row.get(0)?,
        kind: row.get(1)?,
        title: row.get(2)?,
        description: row.get(3)?,
        visibility: row.get(4)?,
        owner_id: row.get(5)?,
        creator_id: row.get(6)?,
        member_count: row.get(7)?,
        archive_time: row.get(8)?,
        create_time: row.get(9)?,
        update_time: row.get(10)?,
        last_activity_time: row.get(11)?,
        last_seq: row.get(12)?,
        last_message_time: row.get(13)?,
    })
}

#[derive(sqlx::FromRow)]
struct AccessRow {
    #[sqlx(flatten)]
    chat: ChatRow,
    role: Option<String>,
}

/// A row of `members`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct MemberRow {
    pub chat_id: String,
    pub user_id: String,
    pub role: String,
    pub join_time: i64,
}

/// A chat with the caller's role in it (if a member).
#[derive(Clone, Debug)]
pub struct ChatAccess {
    pub chat: ChatRow,
    pub role: Option<Role>,
}

/// Filters of ListChats.
#[derive(Clone, Debug, Default)]
pub struct ChatFilter {
    /// Public chats instead of the caller's chats.
    pub public: bool,
    pub kind: Option<Kind>,
    pub archived: Option<bool>,
    pub last_message_after: Option<i64>,
    pub last_message_before: Option<i64>,
    /// Lower-cased substring of the title.
    pub query: Option<String>,
    /// Oldest activity first.
    pub ascending: bool,
}

/// Outcome of inserting a chat.
#[derive(Debug)]
pub enum Inserted {
    /// The chat is new.
    Created,
    /// A chat with this id or this direct pair already exists.
    Conflict,
}

/// The chats tables.
#[derive(Clone)]
pub struct Store {
    db: Db,
    /// On SQLite, chat activity not yet written (see
    /// [`Store::record_activity`] and [`crate::activity`]).
    activity: Option<Arc<ActivityBuffer>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("db", &self.db).finish_non_exhaustive()
    }
}

impl Store {
    /// The store over `db`. On SQLite it opens the connection that writes
    /// chat activity and keeps activity in memory between writes, which
    /// happen every `activity_interval` (see [`crate::activity`]).
    ///
    /// Errors: that connection cannot be opened. Panics on SQLite outside a
    /// tokio runtime.
    pub fn new(db: Db, activity_interval: Duration) -> Result<Self, DbError> {
        let activity = match db.sqlite_connection()? {
            Some(conn) => {
                // Activity is derived data: its commits skip the WAL sync
                // (see `record_activity`); a durable commit on the other
                // connection syncs them along with its own.
                conn.execute_batch("PRAGMA synchronous = NORMAL;")?;
                Some(ActivityBuffer::start(db.clone(), conn, activity_interval))
            }
            None => None,
        };
        Ok(Self { db, activity })
    }

    /// Lays pending chat activity over `row` (SQLite).
    fn overlay(&self, mut row: ChatRow) -> ChatRow {
        if let Some(activity) = &self.activity {
            activity.overlay(&mut row);
        }
        row
    }

    /// Writes the chat activity kept in memory (SQLite; nothing to do on
    /// PostgreSQL).
    ///
    /// Errors: the write failed; the activity stays in memory.
    pub(crate) async fn flush_activity(&self) -> Result<(), DbError> {
        match &self.activity {
            Some(activity) => activity.flush().await,
            None => Ok(()),
        }
    }

    /// Writes the chat activity kept in memory (a failure is logged), then
    /// closes the pools. Call once serving has stopped.
    pub async fn close(&self) {
        if let Err(e) = self.flush_activity().await {
            tracing::warn!(error = %e, "writing chat activity at shutdown failed");
        }
        self.db.close().await;
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Inserts a chat and its members in one transaction.
    pub async fn insert_chat(
        &self,
        chat: &ChatRow,
        title_key: &str,
        direct_key: Option<&str>,
        members: &[MemberRow],
    ) -> Result<Inserted, sqlx::Error> {
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.write().begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO chats (id, kind, title, title_key, description, visibility, owner_id, creator_id, direct_key, \
             member_count, archive_time, create_time, update_time, last_activity_time, last_seq, last_message_time) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL, $11, $12, $13, 0, NULL)",
        )
        .bind(&chat.id)
        .bind(&chat.kind)
        .bind(&chat.title)
        .bind(title_key)
        .bind(&chat.description)
        .bind(&chat.visibility)
        .bind(&chat.owner_id)
        .bind(&chat.creator_id)
        .bind(direct_key)
        .bind(chat.member_count)
        .bind(chat.create_time)
        .bind(chat.update_time)
        .bind(chat.last_activity_time)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if natter_db::is_unique_violation(&e) => return Ok(Inserted::Conflict),
            Err(e) => return Err(e),
        }
        if !members.is_empty() {
            let mut q = SqlBuilder::new("INSERT INTO members (chat_id, user_id, role, join_time) VALUES ");
            for (i, m) in members.iter().enumerate() {
                q.push(if i == 0 { "(" } else { ", (" });
                q.bind(m.chat_id.clone()).push(", ").bind(m.user_id.clone()).push(", ");
                q.bind(m.role.clone()).push(", ").bind(m.join_time).push(")");
            }
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Inserted::Created)
    }

    pub async fn chat(&self, id: &str) -> Result<Option<ChatRow>, sqlx::Error> {
        let mut q = SqlBuilder::new(CHAT_SELECT);
        q.push(" WHERE c.id = ").bind(id.to_owned());
        let row = q.build_as().fetch_optional(self.db.read()).await?;
        Ok(row.map(|row| self.overlay(row)))
    }

    pub async fn chat_by_direct_key(&self, key: &str) -> Result<Option<ChatRow>, sqlx::Error> {
        let mut q = SqlBuilder::new(CHAT_SELECT);
        q.push(" WHERE c.direct_key = ").bind(key.to_owned());
        let row = q.build_as().fetch_optional(self.db.read()).await?;
        Ok(row.map(|row| self.overlay(row)))
    }

    /// A chat and the role of `user_id` in it.
    pub async fn access(&self, chat_id: &str, user_id: &str) -> Result<Option<ChatAccess>, sqlx::Error> {
        // One query: this is on every send's path (membership check).
        let mut q = SqlBuilder::new(CHAT_SELECT_WITH_ROLE);
        q.bind(user_id.to_owned()).push(" WHERE c.id = ").bind(chat_id.to_owned());
        let row: Option<AccessRow> = q.build_as().fetch_optional(self.db.read()).await?;
        Ok(row.map(|r| ChatAccess { chat: self.overlay(r.chat), role: r.role.as_deref().map(Role::parse) }))
    }

    /// The role of `user_id` in `chat_id`, if a member.
    pub async fn role(&self, chat_id: &str, user_id: &str) -> Result<Option<Role>, sqlx::Error> {
        let row: Option<(String,)> = sqlx::query_as("SELECT role FROM members WHERE chat_id = $1 AND user_id = $2")
            .bind(chat_id)
            .bind(user_id)
            .fetch_optional(self.db.read())
            .await?;
        Ok(row.map(|(r,)| Role::parse(&r)))
    }

    /// The ids of every chat `user_id` is in.
    pub async fn member_chat_ids(&self, user_id: &str) -> Result<Vec<String>, sqlx::Error> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT chat_id FROM members WHERE user_id = $1")
            .bind(user_id)
            .fetch_all(self.db.read())
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// A page of chats by last activity, after the keyset position `after`
    /// (last_activity_time, id) in the listing's order. Pending activity of
    /// the chats it can show is written first, so the order includes every
    /// activity of them recorded before the call (a failed write is logged
    /// and the page read as the database has it).
    pub async fn list_chats(
        &self,
        user_id: &str,
        filter: &ChatFilter,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<ChatRow>, DbError> {
        let mut q = SqlBuilder::new(CHAT_SELECT);
        if filter.public {
            q.push(" WHERE c.visibility = 'public'");
        } else {
            q.push(" JOIN members m ON m.chat_id = c.id WHERE m.user_id = ").bind(user_id.to_owned());
        }
        if let Some(kind) = filter.kind {
            q.push(" AND c.kind = ").bind(kind.as_str().to_owned());
        }
        match filter.archived {
            Some(true) => q.push(" AND c.archive_time IS NOT NULL"),
            Some(false) => q.push(" AND c.archive_time IS NULL"),
            None => &mut q,
        };
        if let Some(t) = filter.last_message_after {
            q.push(" AND c.last_message_time > ").bind(t);
        }
        if let Some(t) = filter.last_message_before {
            q.push(" AND c.last_message_time < ").bind(t);
        }
        if let Some(query) = &filter.query {
            q.push(" AND c.title_key LIKE ").bind(format!("%{}%", escape_like(query))).push(" ESCAPE '\\'");
        }
        let cmp = if filter.ascending { " > " } else { " < " };
        if let Some((time, id)) = after {
            q.push(" AND (c.last_activity_time").push(cmp).bind(time);
            q.push(" OR (c.last_activity_time = ").bind(time).push(" AND c.id").push(cmp).bind(id).push("))");
        }
        q.push(if filter.ascending {
            " ORDER BY c.last_activity_time ASC, c.id ASC"
        } else {
            " ORDER BY c.last_activity_time DESC, c.id DESC"
        });
        q.limit(limit);
        // On SQLite one trip to a rusqlite reader: sqlx would hand each row
        // across threads (~45% of a ListChats page's CPU in a profile). The
        // same trip checks whether pending activity concerns chats this
        // listing can show; only then is that activity written first and the
        // page read again (see `crate::activity`).
        if let Some(activity) = &self.activity {
            let (sql, values) = q.sqlite()?;
            let (pending, public, user) = (activity.pending(), filter.public, user_id.to_owned());
            // The page, or the activity to write first (and the query back).
            let first = self.db.sqlite_read(move |conn| {
                let shown = crate::activity::listed(conn, &pending, public, &user)?;
                Ok(if shown.is_empty() { Ok(page(conn, &sql, values)?) } else { Err((shown, sql, values)) })
            });
            match first.await? {
                Some(Ok(rows)) => return Ok(rows),
                Some(Err((shown, sql, values))) => {
                    if let Err(e) = activity.flush_some(shown).await {
                        tracing::warn!(error = %e, "writing chat activity before a listing failed");
                    }
                    if let Some(rows) = self.db.sqlite_read(move |conn| page(conn, &sql, values)).await? {
                        return Ok(rows);
                    }
                }
                None => {}
            }
        }
        Ok(q.build_as().fetch_all(self.db.read()).await?)
    }

    /// Moves chats' last activity forward (never back): `(chat_id, last_seq,
    /// time)` each.
    ///
    /// On SQLite it only records them in memory ([`crate::activity`]): they
    /// are written within the activity interval, before a listing that can
    /// show their chats and at shutdown, and reads of a chat see them at once.
    ///
    /// On PostgreSQL it writes them in one transaction. Activity is derived
    /// data (the messages store has the truth), so that commit skips the disk
    /// flush (`synchronous_commit = off`): a crash of the database may lose a
    /// chat's newest activity, which its next message restores; it never
    /// loses a chat or a membership.
    pub async fn record_activity(&self, activities: &[(String, i64, i64)]) -> Result<(), DbError> {
        if activities.is_empty() {
            return Ok(());
        }
        if let Some(activity) = &self.activity {
            activity.record(activities);
            return Ok(());
        }
        let mut q = SqlBuilder::new(
            "UPDATE chats SET last_seq = v.column2, last_activity_time = v.column3, last_message_time = v.column3 FROM (VALUES ",
        );
        for (n, (chat_id, last_seq, time)) in activities.iter().enumerate() {
            q.push(if n == 0 { "(" } else { ", (" });
            q.bind(chat_id.clone()).push(", ").bind(*last_seq).push(", ").bind(*time).push(")");
        }
        q.push(") AS v WHERE chats.id = v.column1 AND chats.last_seq < v.column2");
        let mut tx = self.db.write().begin().await?;
        sqlx::query("SET LOCAL synchronous_commit TO OFF").execute(&mut *tx).await?;
        q.build().execute(&mut *tx).await?;
        Ok(tx.commit().await?)
    }

    /// Applies an update (None: leave the field as it is) and returns the row.
    pub async fn update_chat(
        &self,
        id: &str,
        title: Option<&str>,
        description: Option<&str>,
        visibility: Option<&str>,
        now: i64,
    ) -> Result<Option<ChatRow>, sqlx::Error> {
        let mut q = SqlBuilder::new("UPDATE chats SET update_time = ");
        q.bind(now);
        if let Some(title) = title {
            q.push(", title = ").bind(title.to_owned()).push(", title_key = ").bind(crate::domain::title_key(title));
        }
        if let Some(description) = description {
            q.push(", description = ").bind(description.to_owned());
        }
        if let Some(visibility) = visibility {
            q.push(", visibility = ").bind(visibility.to_owned());
        }
        q.push(" WHERE id = ").bind(id.to_owned());
        {
            let _turn = self.db.write_turn().await;
            q.build().execute(self.db.write()).await?;
        }
        self.chat(id).await
    }

    /// Sets or clears a chat's archive time.
    pub async fn set_archived(
        &self,
        id: &str,
        archive_time: Option<i64>,
        now: i64,
    ) -> Result<Option<ChatRow>, sqlx::Error> {
        {
            let _turn = self.db.write_turn().await;
            sqlx::query("UPDATE chats SET archive_time = $1, update_time = $2 WHERE id = $3")
                .bind(archive_time)
                .bind(now)
                .bind(id)
                .execute(self.db.write())
                .await?;
        }
        self.chat(id).await
    }

    /// Deletes a chat and its memberships; returns the ids of its members.
    pub async fn delete_chat(&self, id: &str) -> Result<Vec<String>, sqlx::Error> {
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.write().begin().await?;
        let members: Vec<(String,)> = sqlx::query_as("DELETE FROM members WHERE chat_id = $1 RETURNING user_id")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM chats WHERE id = $1").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(members.into_iter().map(|(u,)| u).collect())
    }

    /// Adds members that are not in the chat yet, in one transaction, unless
    /// the chat would then have more than `max_members`. Returns the rows
    /// added, or `None` when the limit would be broken.
    pub async fn add_members(
        &self,
        chat_id: &str,
        members: &[MemberRow],
        max_members: usize,
        now: i64,
    ) -> Result<Option<Vec<MemberRow>>, sqlx::Error> {
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.write().begin().await?;
        // Lock the chat row first: concurrent adds to one chat queue here, so
        // the member count they check is exact.
        touch(&mut tx, chat_id, now).await?;
        let mut added = Vec::new();
        for m in members {
            let done = sqlx::query(
                "INSERT INTO members (chat_id, user_id, role, join_time) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (chat_id, user_id) DO NOTHING",
            )
            .bind(&m.chat_id)
            .bind(&m.user_id)
            .bind(&m.role)
            .bind(m.join_time)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                added.push(m.clone());
            }
        }
        let count = recount(&mut tx, chat_id).await?;
        if count as usize > max_members {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(added))
    }

    /// Removes a member; false if they were not one.
    pub async fn remove_member(&self, chat_id: &str, user_id: &str, now: i64) -> Result<bool, sqlx::Error> {
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.write().begin().await?;
        touch(&mut tx, chat_id, now).await?;
        let done = sqlx::query("DELETE FROM members WHERE chat_id = $1 AND user_id = $2")
            .bind(chat_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        recount(&mut tx, chat_id).await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Sets a member's role; making someone owner demotes the current owner
    /// to admin in the same transaction. Returns the member's row.
    pub async fn set_role(
        &self,
        chat_id: &str,
        user_id: &str,
        role: Role,
        now: i64,
    ) -> Result<Option<MemberRow>, sqlx::Error> {
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.write().begin().await?;
        touch(&mut tx, chat_id, now).await?;
        if role == Role::Owner {
            sqlx::query("UPDATE members SET role = 'admin' WHERE chat_id = $1 AND role = 'owner'")
                .bind(chat_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE chats SET owner_id = $1 WHERE id = $2")
                .bind(user_id)
                .bind(chat_id)
                .execute(&mut *tx)
                .await?;
        }
        let row: Option<MemberRow> = sqlx::query_as(
            "UPDATE members SET role = $1 WHERE chat_id = $2 AND user_id = $3 RETURNING chat_id, user_id, role, join_time",
        )
        .bind(role.as_str())
        .bind(chat_id)
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
        if row.is_some() {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(row)
    }

    /// A page of a chat's members in join order, after `(join_time, user_id)`.
    pub async fn members(
        &self,
        chat_id: &str,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<MemberRow>, sqlx::Error> {
        let mut q = SqlBuilder::new("SELECT chat_id, user_id, role, join_time FROM members WHERE chat_id = ");
        q.bind(chat_id.to_owned());
        if let Some((time, user)) = after {
            q.push(" AND (join_time > ").bind(time);
            q.push(" OR (join_time = ").bind(time).push(" AND user_id > ").bind(user).push("))");
        }
        q.push(" ORDER BY join_time, user_id").limit(limit);
        q.build_as().fetch_all(self.db.read()).await
    }
}

/// Sets a chat's update time as the first write of a membership change, which
/// takes the chat's row lock: concurrent changes to one chat queue here.
async fn touch(
    tx: &mut sqlx::Transaction<'static, natter_db::Any>,
    chat_id: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE chats SET update_time = $1 WHERE id = $2").bind(now).bind(chat_id).execute(&mut **tx).await?;
    Ok(())
}

/// Recomputes a chat's member count inside a transaction and returns it.
async fn recount(tx: &mut sqlx::Transaction<'static, natter_db::Any>, chat_id: &str) -> Result<i64, sqlx::Error> {
    let (count,): (i64,) = sqlx::query_as(
        "UPDATE chats SET member_count = (SELECT COUNT(*) FROM members WHERE chat_id = $1) WHERE id = $1 RETURNING member_count",
    )
    .bind(chat_id)
    .fetch_one(&mut **tx)
    .await?;
    Ok(count)
}

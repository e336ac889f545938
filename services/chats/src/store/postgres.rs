//! The chats store on PostgreSQL, through sqlx's native `Postgres` driver:
//! one pool in the service's schema. Several replicas share it, so nothing
//! is kept in memory: activity is written through (without a disk flush,
//! it is derived data), and membership changes lock the chat's row first so
//! concurrent changes to one chat queue there.

use async_trait::async_trait;
use natter_kit::id::{ChatId, MessageId, UserId};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, QueryBuilder, Row as _};

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

/// The chats store on a PostgreSQL schema (see the module docs).
#[derive(Clone, Debug)]
pub struct PostgresChatStore {
    pool: PgPool,
}

impl PostgresChatStore {
    /// Migrates `schema` on `url` (created if missing) and connects a pool
    /// as `pool` says (see [`natter_db::postgres::connect`]).
    ///
    /// Errors: an invalid schema name, the server is unreachable, or a
    /// migration fails.
    pub async fn open(url: &str, schema: &str, pool: &natter_db::PoolSettings) -> Result<Self, StoreError> {
        let pool = natter_db::postgres::connect(url, schema, pool, &MIGRATOR).await?;
        Ok(Self { pool })
    }

    /// The pool (for tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The one chat row mapper: `chat_columns!()` by name.
fn chat_row(row: &PgRow) -> Result<Chat, StoreError> {
    let text = |column: &str| row.try_get::<String, _>(column);
    Ok(Chat {
        id: parse_id("chats.id", &text("id")?)?,
        kind: parse_enum("chats.kind", &text("kind")?, Kind::parse)?,
        title: text("title")?,
        description: text("description")?,
        visibility: parse_enum("chats.visibility", &text("visibility")?, Visibility::parse)?,
        owner_id: parse_id("chats.owner_id", &text("owner_id")?)?,
        creator_id: parse_id("chats.creator_id", &text("creator_id")?)?,
        member_count: row.try_get("member_count")?,
        archive_time: row.try_get("archive_time")?,
        create_time: row.try_get("create_time")?,
        update_time: row.try_get("update_time")?,
        last_activity_time: row.try_get("last_activity_time")?,
        last_seq: row.try_get("last_seq")?,
        last_message_time: row.try_get("last_message_time")?,
        assistant_replies: parse_enum("chats.assistant_replies", &text("assistant_replies")?, AssistantReplies::parse)?,
        members_version: row.try_get("members_version")?,
    })
}

/// The access row mapper: `chat_columns!()` and `role`, the member's role
/// (NULL: not a member).
fn access_row(row: &PgRow) -> Result<ChatAccess, StoreError> {
    let role: Option<String> = row.try_get("role")?;
    let role = role.map(|r| parse_enum("members.role", &r, Role::parse)).transpose()?;
    Ok(ChatAccess { chat: chat_row(row)?, role })
}

/// The member row mapper: `chat_id, user_id, role, join_time`.
fn member_row(row: &PgRow) -> Result<Member, StoreError> {
    Ok(Member {
        chat_id: parse_id("members.chat_id", &row.try_get::<String, _>("chat_id")?)?,
        user_id: parse_id("members.user_id", &row.try_get::<String, _>("user_id")?)?,
        role: parse_enum("members.role", &row.try_get::<String, _>("role")?, Role::parse)?,
        join_time: row.try_get("join_time")?,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// The arguments of the advisory lock between
/// [`ChatStore::record_forgotten`] (exclusive) and membership writes
/// (shared): a key of natter's own ("natt" in ASCII) and the schema's, as
/// advisory locks are the whole database's.
macro_rules! forgotten_lock {
    () => {
        "1851880564, hashtext(current_schema())"
    };
}

/// The argument of the advisory lock a [`ChatStore::block`] holds while it
/// counts and adds the blocking user's blocks, with that user's id as the
/// SQL expression `$id` (a literal: `"$1"`): the 64-bit hash of the
/// schema's name and the id, in the one-key space (apart from
/// `forgotten_lock!`'s two keys), as advisory locks are the whole
/// database's. Membership writes take it shared for each user whose block
/// they read ([`first_block`]).
macro_rules! blocker_lock {
    ($id:literal) => {
        concat!("hashtextextended(current_schema() || ' blocks ' || ", $id, ", 1851880564)")
    };
}
#[cfg(test)]
pub(crate) use blocker_lock;

/// The blocker of the first of `pairs` (blocker, blocked) that is a block,
/// read in the membership write's transaction `tx` after taking, shared,
/// each blocker's `blocker_lock!` (held to the end): a block of theirs
/// under way commits before this reads, and one after waits for this
/// write's commit (see [`super::blocks_between_refused`]).
async fn first_block(tx: &mut sqlx::PgConnection, pairs: &[(UserId, UserId)]) -> Result<Option<UserId>, StoreError> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let (blockers, blocked): (Vec<String>, Vec<String>) =
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).unzip();
    sqlx::query(concat!(
        "SELECT pg_advisory_xact_lock_shared(",
        blocker_lock!("u"),
        ") FROM (SELECT DISTINCT u FROM UNNEST($1::text[]) AS u) s"
    ))
    .bind(&blockers)
    .execute(&mut *tx)
    .await?;
    let found: Vec<i64> = sqlx::query_scalar(
        "SELECT p.n FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS p (blocker, blocked, n) \
         WHERE EXISTS (SELECT 1 FROM blocks b WHERE b.user_id = p.blocker AND b.blocked_user_id = p.blocked) \
         ORDER BY p.n LIMIT 1",
    )
    .bind(&blockers)
    .bind(&blocked)
    .fetch_all(&mut *tx)
    .await?;
    Ok(found.first().and_then(|n| pairs.get(usize::try_from(*n).ok()? - 1)).map(|(blocker, _)| *blocker))
}

/// The first of `users` recorded by [`ChatStore::record_forgotten`], read
/// in the transaction of a write about them (a membership, a block) under
/// the shared advisory lock (see `forgotten_lock!`), which it holds to the
/// end.
async fn forgotten_among(
    tx: &mut sqlx::PgConnection,
    users: impl IntoIterator<Item = UserId>,
) -> Result<Option<UserId>, StoreError> {
    sqlx::query(concat!("SELECT pg_advisory_xact_lock_shared(", forgotten_lock!(), ")")).execute(&mut *tx).await?;
    let users: Vec<UserId> = users.into_iter().collect();
    let ids: Vec<String> = users.iter().map(ToString::to_string).collect();
    let found: Vec<String> = sqlx::query_scalar("SELECT user_id FROM forgotten_users WHERE user_id = ANY($1)")
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
    Ok(users.into_iter().zip(&ids).find(|(_, id)| found.contains(id)).map(|(user, _)| user))
}

/// Sets a chat's update time as the first write of a membership change,
/// which takes the chat's row lock: concurrent changes to one chat queue
/// here.
async fn touch(tx: &mut sqlx::PgConnection, chat: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE chats SET update_time = $1 WHERE id = $2").bind(now).bind(chat).execute(&mut *tx).await?;
    Ok(())
}

/// `user`'s role in `chat`, None if no member, read in the transaction `tx`
/// of a membership change (which holds the chat's row lock already).
async fn role_in(tx: &mut sqlx::PgConnection, chat: &str, user: UserId) -> Result<Option<Role>, StoreError> {
    let role: Option<String> = sqlx::query_scalar("SELECT role FROM members WHERE chat_id = $1 AND user_id = $2")
        .bind(chat)
        .bind(user.to_string())
        .fetch_optional(&mut *tx)
        .await?;
    role.map(|r| parse_enum("members.role", &r, Role::parse)).transpose()
}

/// What a change of chat `id` by `by` ([`ChatStore::update_chat`],
/// [`ChatStore::delete_chat`]) answers instead of being written, read in
/// its transaction `tx` under the chat's row lock (taken here; role changes
/// take it first too): None if it may go on (no `by`, or one who may:
/// `may`, [`may_change`] or [`may_delete`]), Some(None) if there is no such
/// chat, Some(Some(Actor)) if `by` may not.
async fn refused_change<T>(
    tx: &mut sqlx::PgConnection,
    id: ChatId,
    by: Option<UserId>,
    may: fn(Kind, Option<Role>) -> bool,
) -> Result<Option<Option<Checked<T>>>, StoreError> {
    let Some(by) = by else { return Ok(None) };
    let key = id.to_string();
    let kind: Option<String> = sqlx::query_scalar("SELECT kind FROM chats WHERE id = $1 FOR UPDATE")
        .bind(&key)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(kind) = kind else { return Ok(Some(None)) };
    let kind = parse_enum("chats.kind", &kind, Kind::parse)?;
    let role = role_in(tx, &key, by).await?;
    Ok((!may(kind, role)).then_some(Some(Checked::Actor(role))))
}

/// Appends the outbox entries of `changes` (none for none) to `chat`'s, in
/// one statement of the change's transaction `tx`, which holds the chat's
/// row lock already (so max + 1 is unique: writers of a chat queue there).
async fn push_outbox(
    tx: &mut sqlx::PgConnection,
    chat: &str,
    changes: &[mpb::ChatChange],
    now: i64,
) -> Result<(), sqlx::Error> {
    let (keys, changes): (Vec<String>, Vec<String>) = outbox_rows(changes, now).into_iter().unzip();
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO chat_outbox (chat_id, position, origin, changes, create_time) \
         SELECT $1, COALESCE((SELECT MAX(position) FROM chat_outbox WHERE chat_id = $1), 0) + e.n, e.origin, \
         e.changes, $4 FROM UNNEST($2::text[], $3::text[]) WITH ORDINALITY AS e (origin, changes, n)",
    )
    .bind(chat)
    .bind(keys)
    .bind(changes)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Raises the block version of the direct chat of `a` and `b`, if any,
/// taking its row lock, with its closure as the blocks between them now
/// have it in the outbox, in the transaction `tx` of a change of those
/// blocks. The closure is read after the lock, in a statement of its own:
/// under READ COMMITTED it sees every change of the pair's blocks
/// committed while this waited (each takes this lock before its
/// commit), so the highest version always carries the last state.
async fn reclose_direct(tx: &mut sqlx::PgConnection, a: UserId, b: UserId, now: i64) -> Result<(), sqlx::Error> {
    let raised: Option<(String, i64)> =
        sqlx::query_as(RAISE_BLOCK_VERSION).bind(crate::domain::direct_key(a, b)).fetch_optional(&mut *tx).await?;
    let Some((chat, version)) = raised else { return Ok(()) };
    let closed: bool =
        sqlx::query_scalar(PAIR_BLOCKED).bind(a.to_string()).bind(b.to_string()).fetch_one(&mut *tx).await?;
    push_outbox(tx, &chat, &[direct_chat_closed(closed, version)], now).await
}

/// Recomputes a chat's member count and returns it (0 for no such chat).
async fn recount(tx: &mut sqlx::PgConnection, chat: &str) -> Result<i64, sqlx::Error> {
    let count: Option<i64> = sqlx::query_scalar(
        "UPDATE chats SET member_count = (SELECT COUNT(*) FROM members WHERE chat_id = $1) WHERE id = $1 \
         RETURNING member_count",
    )
    .bind(chat)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(count.unwrap_or_default())
}

async fn select_chat(conn: &mut sqlx::PgConnection, id: ChatId) -> Result<Option<Chat>, StoreError> {
    let row = sqlx::query(concat!("SELECT ", chat_columns!(), " FROM chats c WHERE c.id = $1"))
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(chat_row).transpose()
}

#[async_trait]
impl ChatStore for PostgresChatStore {
    async fn create_chat(&self, chat: &Chat, members: &[Member]) -> Result<Created, StoreError> {
        let direct_key = direct_key(chat, members)?;
        let mut tx = self.pool.begin().await?;
        if let Some(user) = forgotten_among(&mut tx, members.iter().map(|m| m.user_id)).await? {
            return Ok(Created::Forgotten(user));
        }
        let users: Vec<UserId> = members.iter().map(|m| m.user_id).collect();
        let pairs = blocks_between_refused(chat.creator_id, &users, chat.kind == Kind::Direct);
        if let Some(blocker) = first_block(&mut tx, &pairs).await? {
            return Ok(Created::Blocked(blocker));
        }
        // Ids are never reused, a deleted chat's included.
        let taken = sqlx::query("INSERT INTO chat_ids (id) VALUES ($1) ON CONFLICT (id) DO NOTHING")
            .bind(chat.id.to_string())
            .execute(&mut *tx)
            .await?;
        if taken.rows_affected() == 0 {
            return Ok(Created::Conflict);
        }
        let inserted = sqlx::query(
            "INSERT INTO chats (id, kind, title, title_key, description, visibility, owner_id, creator_id, direct_key, \
             member_count, archive_time, create_time, update_time, last_activity_time, last_seq, last_message_time, \
             assistant_replies) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
        .bind(chat.id.to_string())
        .bind(chat.kind.as_str())
        .bind(&chat.title)
        .bind(title_key(&chat.title))
        .bind(&chat.description)
        .bind(chat.visibility.as_str())
        .bind(chat.owner_id.to_string())
        .bind(chat.creator_id.to_string())
        .bind(direct_key)
        .bind(chat.member_count)
        .bind(chat.archive_time)
        .bind(chat.create_time)
        .bind(chat.update_time)
        .bind(chat.last_activity_time)
        .bind(chat.last_seq)
        .bind(chat.last_message_time)
        .bind(chat.assistant_replies.as_str())
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => return Ok(Created::Conflict),
            Err(e) => return Err(e.into()),
        }
        if !members.is_empty() {
            // One statement for every member: arrays of each column.
            sqlx::query(
                "INSERT INTO members (chat_id, user_id, role, join_time) \
                 SELECT $1, m.user_id, m.role, m.join_time FROM UNNEST($2::text[], $3::text[], $4::bigint[]) \
                 AS m (user_id, role, join_time)",
            )
            .bind(chat.id.to_string())
            .bind(members.iter().map(|m| m.user_id.to_string()).collect::<Vec<_>>())
            .bind(members.iter().map(|m| m.role.as_str()).collect::<Vec<_>>())
            .bind(members.iter().map(|m| m.join_time).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        let joins = joined(members.iter().map(|m| m.user_id));
        push_outbox(&mut tx, &chat.id.to_string(), &joins, chat.create_time).await?;
        tx.commit().await?;
        Ok(Created::Created)
    }

    async fn chat(&self, id: ChatId) -> Result<Option<Chat>, StoreError> {
        select_chat(&mut *self.pool.acquire().await?, id).await
    }

    async fn direct_chat(&self, a: UserId, b: UserId) -> Result<Option<Chat>, StoreError> {
        let row = sqlx::query(concat!("SELECT ", chat_columns!(), " FROM chats c WHERE c.direct_key = $1"))
            .bind(crate::domain::direct_key(a, b))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(chat_row).transpose()
    }

    async fn access(&self, chat: ChatId, user: UserId) -> Result<Option<ChatAccess>, StoreError> {
        // One query: this is on every send's path (membership check).
        let row = sqlx::query(concat!(
            "SELECT ",
            chat_columns!(),
            ", m.role FROM chats c LEFT JOIN members m ON m.chat_id = c.id AND m.user_id = $1 WHERE c.id = $2"
        ))
        .bind(user.to_string())
        .bind(chat.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(access_row).transpose()
    }

    async fn role(&self, chat: ChatId, user: UserId) -> Result<Option<Role>, StoreError> {
        let role: Option<String> = sqlx::query_scalar("SELECT role FROM members WHERE chat_id = $1 AND user_id = $2")
            .bind(chat.to_string())
            .bind(user.to_string())
            .fetch_optional(&self.pool)
            .await?;
        role.map(|r| parse_enum("members.role", &r, Role::parse)).transpose()
    }

    async fn members_among(&self, chat: ChatId, users: &[UserId]) -> Result<Vec<UserId>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let users: Vec<String> = users.iter().map(UserId::to_string).collect();
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT m.user_id FROM members m WHERE m.chat_id = $1 AND m.user_id = ANY($2) \
                 AND NOT EXISTS (SELECT 1 FROM forgotten_users f WHERE f.user_id = m.user_id)",
        )
        .bind(chat.to_string())
        .bind(&users)
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|i| parse_id("members.user_id", i)).collect()
    }

    async fn record_forgotten(&self, user: UserId, now: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        // Exclusive: waits for the membership writes under way (they hold
        // it shared) to commit, and holds back those after, until this
        // record is committed for them to see.
        sqlx::query(concat!("SELECT pg_advisory_xact_lock(", forgotten_lock!(), ")")).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO forgotten_users (user_id, forget_time) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(user.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM privacy_settings WHERE user_id = $1").bind(user.to_string()).execute(&mut *tx).await?;
        // The others of the blocks that go, each once, in order (the
        // order their chats' rows are locked in).
        let others: Vec<String> = sqlx::query_scalar(
            "WITH gone AS (DELETE FROM blocks WHERE user_id = $1 OR blocked_user_id = $1 \
               RETURNING CASE WHEN user_id = $1 THEN blocked_user_id ELSE user_id END AS other) \
             SELECT DISTINCT other FROM gone ORDER BY other",
        )
        .bind(user.to_string())
        .fetch_all(&mut *tx)
        .await?;
        for other in others {
            reclose_direct(&mut tx, user, parse_id("blocks.user_id", &other)?, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn privacy_settings(&self, user: UserId) -> Result<Option<StoredPrivacy>, StoreError> {
        let row: Option<PrivacyRow> = sqlx::query_as(
            "SELECT group_adds, direct_chats, read_receipts, update_time FROM privacy_settings WHERE user_id = $1",
        )
        .bind(user.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(stored_privacy).transpose()
    }

    async fn set_privacy_settings(
        &self,
        user: UserId,
        update: PrivacyChoices,
        now: i64,
    ) -> Result<Option<StoredPrivacy>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // A user forgotten since the caller looked them up keeps no row.
        if forgotten_among(&mut tx, [user]).await?.is_some() {
            return Ok(None);
        }
        let row: PrivacyRow = sqlx::query_as(
            "INSERT INTO privacy_settings (user_id, group_adds, direct_chats, read_receipts, update_time) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (user_id) DO UPDATE SET \
             group_adds = COALESCE(excluded.group_adds, privacy_settings.group_adds), \
             direct_chats = COALESCE(excluded.direct_chats, privacy_settings.direct_chats), \
             read_receipts = COALESCE(excluded.read_receipts, privacy_settings.read_receipts), \
             update_time = excluded.update_time \
             RETURNING group_adds, direct_chats, read_receipts, update_time",
        )
        .bind(user.to_string())
        .bind(update.group_adds.map(GroupAdds::as_str))
        .bind(update.direct_chats.map(DirectChats::as_str))
        .bind(update.read_receipts.map(ReadReceipts::as_str))
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        stored_privacy(row).map(Some)
    }

    async fn privacy_among(&self, users: &[UserId]) -> Result<Vec<(UserId, PrivacyChoices)>, StoreError> {
        let users: Vec<String> = users.iter().map(UserId::to_string).collect();
        let rows: Vec<(String, Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT user_id, group_adds, direct_chats, read_receipts FROM privacy_settings WHERE user_id = ANY($1)",
        )
        .bind(&users)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(user, group_adds, direct_chats, read_receipts)| {
                Ok((
                    parse_id("privacy_settings.user_id", &user)?,
                    privacy_choices(group_adds, direct_chats, read_receipts)?,
                ))
            })
            .collect()
    }

    async fn block(&self, user: UserId, other: UserId, now: i64, limit: usize) -> Result<Blocked, StoreError> {
        let mut tx = self.pool.begin().await?;
        // A user forgotten since the caller looked them up keeps no block.
        if let Some(gone) = forgotten_among(&mut tx, [user, other]).await? {
            return Ok(Blocked::Forgotten(gone));
        }
        // The user's blocks are counted and added under a lock of theirs,
        // held to the commit: under READ COMMITTED, blocks racing each other
        // (BlockUser calls at once) would each count without the others'
        // uncommitted rows and pass the limit by their number.
        sqlx::query(concat!("SELECT pg_advisory_xact_lock(", blocker_lock!("$1"), ")"))
            .bind(user.to_string())
            .execute(&mut *tx)
            .await?;
        // One statement: the row, unless there is one, or the user blocks
        // `limit` users already.
        let done: Option<(bool, bool)> = sqlx::query_as(
            "WITH existing AS (SELECT 1 FROM blocks WHERE user_id = $1 AND blocked_user_id = $2), \
             counted AS (SELECT COUNT(*) AS n FROM (SELECT 1 FROM blocks WHERE user_id = $1 LIMIT $4) s), \
             inserted AS (INSERT INTO blocks (user_id, blocked_user_id, block_time) \
               SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT 1 FROM existing) AND (SELECT n FROM counted) < $4 \
               ON CONFLICT (user_id, blocked_user_id) DO NOTHING RETURNING 1) \
             SELECT EXISTS (SELECT 1 FROM existing) OR EXISTS (SELECT 1 FROM inserted) \
               OR (SELECT n FROM counted) < $4, EXISTS (SELECT 1 FROM inserted)",
        )
        .bind(user.to_string())
        .bind(other.to_string())
        .bind(now)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_optional(&mut *tx)
        .await?;
        if done.is_some_and(|(_, inserted)| inserted) {
            reclose_direct(&mut tx, user, other, now).await?;
        }
        tx.commit().await?;
        Ok(if done.is_some_and(|(ok, _)| ok) { Blocked::Done } else { Blocked::TooMany })
    }

    async fn unblock(&self, user: UserId, other: UserId, now: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM blocks WHERE user_id = $1 AND blocked_user_id = $2")
            .bind(user.to_string())
            .bind(other.to_string())
            .execute(&mut *tx)
            .await?;
        if deleted.rows_affected() > 0 {
            reclose_direct(&mut tx, user, other, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn version_old_blocks(&self, now: i64, limit: u32) -> Result<usize, StoreError> {
        let chats: Vec<String> =
            sqlx::query_scalar(OLD_BLOCKED_DIRECT_CHATS).bind(i64::from(limit)).fetch_all(&self.pool).await?;
        for chat in &chats {
            let mut tx = self.pool.begin().await?;
            let first: Option<String> =
                sqlx::query_scalar(FIRST_BLOCK_VERSION).bind(chat).fetch_optional(&mut *tx).await?;
            if first.is_some() {
                let closed: bool = sqlx::query_scalar(BLOCKS_WITHIN).bind(chat).fetch_one(&mut *tx).await?;
                push_outbox(&mut tx, chat, &[direct_chat_closed(closed, 1)], now).await?;
            }
            tx.commit().await?;
        }
        Ok(chats.len())
    }

    async fn version_old_archives(&self, now: i64, limit: u32) -> Result<usize, StoreError> {
        let chats: Vec<String> =
            sqlx::query_scalar(OLD_ARCHIVED_CHATS).bind(i64::from(limit)).fetch_all(&self.pool).await?;
        for chat in &chats {
            let mut tx = self.pool.begin().await?;
            let first: Option<String> =
                sqlx::query_scalar(FIRST_ARCHIVE_VERSION).bind(chat).fetch_optional(&mut *tx).await?;
            if first.is_some() {
                push_outbox(&mut tx, chat, &[chat_archived(true, 1)], now).await?;
            }
            tx.commit().await?;
        }
        Ok(chats.len())
    }

    async fn blocked_users(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<(UserId, i64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT blocked_user_id, block_time FROM blocks WHERE user_id = $1 AND blocked_user_id > $2 \
             ORDER BY blocked_user_id LIMIT $3",
        )
        .bind(user.to_string())
        .bind(after.map(|a| a.to_string()).unwrap_or_default())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|(id, time)| Ok((parse_id("blocks.blocked_user_id", id)?, *time))).collect()
    }

    async fn blockers_among(&self, user: UserId, users: &[UserId]) -> Result<Vec<UserId>, StoreError> {
        let users: Vec<String> = users.iter().map(UserId::to_string).collect();
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT u FROM UNNEST($1::text[]) AS u \
             WHERE EXISTS (SELECT 1 FROM blocks WHERE user_id = u AND blocked_user_id = $2)",
        )
        .bind(&users)
        .bind(user.to_string())
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|id| parse_id("blocks.user_id", id)).collect()
    }

    async fn blocks_within(&self, chat: ChatId) -> Result<bool, StoreError> {
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM members m JOIN blocks b ON b.user_id = m.user_id \
             JOIN members o ON o.chat_id = m.chat_id AND o.user_id = b.blocked_user_id \
             WHERE m.chat_id = $1 LIMIT 1",
        )
        .bind(chat.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    async fn users_in_groups(&self, users: &[UserId], groups: usize) -> Result<Vec<UserId>, StoreError> {
        let users: Vec<String> = users.iter().map(UserId::to_string).collect();
        // Walks members_by_user, each row's chat by its key, until `groups`
        // groups are found.
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT u FROM UNNEST($1::text[]) AS u \
             WHERE (SELECT COUNT(*) FROM (SELECT 1 FROM members m JOIN chats c ON c.id = m.chat_id \
             WHERE m.user_id = u AND c.kind = 'group' LIMIT $2) s) >= $2",
        )
        .bind(&users)
        .bind(i64::try_from(groups).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|id| parse_id("members.user_id", id)).collect()
    }

    async fn member_chat_ids(&self, user: UserId, managed_only: bool) -> Result<Vec<ChatId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT chat_id FROM members WHERE user_id = $1 AND (NOT $2 OR role IN ('owner', 'admin'))",
        )
        .bind(user.to_string())
        .bind(managed_only)
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|id| parse_id("members.chat_id", id)).collect()
    }

    async fn peers_among(&self, user: UserId, candidates: &[UserId], by: Peers) -> Result<Vec<UserId>, StoreError> {
        let candidates: Vec<String> = candidates.iter().map(UserId::to_string).collect();
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT o.user_id FROM members o \
             WHERE o.user_id = ANY($2) \
             AND EXISTS (SELECT 1 FROM members m WHERE m.chat_id = o.chat_id AND m.user_id = $1) \
             AND (NOT $3 OR EXISTS (SELECT 1 FROM chats c WHERE c.id = o.chat_id AND c.visibility <> 'public')) \
             AND (NOT $4 OR NOT EXISTS (SELECT 1 FROM blocks b WHERE \
                 (b.user_id = $1 AND b.blocked_user_id = o.user_id) \
                 OR (b.user_id = o.user_id AND b.blocked_user_id = $1))) \
             AND NOT EXISTS (SELECT 1 FROM forgotten_users f WHERE f.user_id = o.user_id)",
        )
        .bind(user.to_string())
        .bind(&candidates)
        .bind(by == Peers::Privacy)
        .bind(by == Peers::Presence)
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|id| parse_id("members.user_id", id)).collect()
    }

    async fn blocked_peers(&self, user: UserId) -> Result<Vec<UserId>, StoreError> {
        // Each direction by its own index (the key, blocks_by_blocked).
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT r.other FROM (SELECT blocked_user_id AS other FROM blocks WHERE user_id = $1 \
             UNION SELECT user_id FROM blocks WHERE blocked_user_id = $1) r \
             WHERE EXISTS (SELECT 1 FROM members m JOIN members o ON o.chat_id = m.chat_id \
             WHERE m.user_id = $1 AND o.user_id = r.other)",
        )
        .bind(user.to_string())
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|id| parse_id("blocks.user_id", id)).collect()
    }

    async fn list_chats(
        &self,
        user: UserId,
        filter: &ChatFilter,
        after: Option<ChatCursor>,
        limit: u32,
    ) -> Result<Vec<ChatAccess>, StoreError> {
        let mut q = QueryBuilder::<Postgres>::new(concat!("SELECT ", chat_columns!(), ", m.role FROM chats c"));
        if filter.public {
            q.push(" LEFT JOIN members m ON m.chat_id = c.id AND m.user_id = ").push_bind(user.to_string());
            q.push(" WHERE c.visibility = 'public'");
        } else {
            q.push(" JOIN members m ON m.chat_id = c.id WHERE m.user_id = ").push_bind(user.to_string());
        }
        if filter.managed_only {
            q.push(" AND m.role IN ('owner', 'admin')");
        }
        if let Some(kind) = filter.kind {
            q.push(" AND c.kind = ").push_bind(kind.as_str());
        }
        match filter.archived {
            Some(true) => {
                q.push(" AND c.archive_time IS NOT NULL");
            }
            Some(false) => {
                q.push(" AND c.archive_time IS NULL");
            }
            None => {}
        }
        for (bound, condition) in time_bounds(filter) {
            if let Some(t) = bound {
                q.push(format_args!(" AND {condition} ")).push_bind(t);
            }
        }
        if let Some(query) = &filter.query {
            q.push(" AND c.title_key LIKE ").push_bind(format!("%{}%", natter_db::escape_like(query)));
            q.push(" ESCAPE '\\'");
        }
        let (cmp, order) = if filter.ascending { (" > ", "ASC") } else { (" < ", "DESC") };
        let key = order_column(filter.order_by);
        if let Some(after) = after {
            q.push(format_args!(" AND ({key}")).push(cmp).push_bind(after.time);
            q.push(format_args!(" OR ({key} = ")).push_bind(after.time);
            q.push(" AND c.id").push(cmp).push_bind(after.chat_id.to_string()).push("))");
        }
        q.push(format_args!(" ORDER BY {key} {order}, c.id {order} LIMIT {limit}"));
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter().map(access_row).collect()
    }

    async fn record_activity(&self, activities: &[Activity]) -> Result<(), StoreError> {
        if activities.is_empty() {
            return Ok(());
        }
        // Activity is derived data (the messages store has the truth), so
        // its commit skips the disk flush (`synchronous_commit = off`): a
        // crash of the database may lose a chat's newest activity, which its
        // next message restores; it never loses a chat or a membership.
        // The newest of each chat only: an UPDATE joined to two rows of one
        // chat would apply either of them.
        let mut newest: std::collections::HashMap<ChatId, Activity> = std::collections::HashMap::new();
        for a in activities {
            let known = newest.entry(a.chat_id).or_insert(*a);
            if a.last_seq > known.last_seq {
                *known = *a;
            }
        }
        let activities: Vec<Activity> = newest.into_values().collect();
        // One statement, so one round trip in its own implicit transaction:
        // `set_config(..., is_local => true)` in the FROM list is SET LOCAL
        // for that transaction, whose commit then skips the flush (before,
        // BEGIN, SET LOCAL, UPDATE and COMMIT were four round trips on the
        // message writer's path).
        sqlx::query(
            "UPDATE chats SET last_seq = v.last_seq, last_activity_time = v.time, last_message_time = v.time \
             FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) AS v (id, last_seq, time), \
                  (SELECT set_config('synchronous_commit', 'off', true)) AS local_setting \
             WHERE chats.id = v.id AND chats.last_seq < v.last_seq",
        )
        .bind(activities.iter().map(|a| a.chat_id.to_string()).collect::<Vec<_>>())
        .bind(activities.iter().map(|a| a.last_seq).collect::<Vec<_>>())
        .bind(activities.iter().map(|a| a.time).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn flush_activity(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn update_chat(
        &self,
        id: ChatId,
        update: &ChatUpdate,
        now: i64,
        by: Option<UserId>,
    ) -> Result<Option<Checked<Chat>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(refused) = refused_change(&mut tx, id, by, may_change).await? {
            tx.rollback().await?;
            return Ok(refused);
        }
        // The chat under its row lock (taken here, or above already): the
        // fields compared stay as read until the commit.
        let row = sqlx::query(concat!("SELECT ", chat_columns!(), " FROM chats c WHERE c.id = $1 FOR UPDATE"))
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let before = chat_row(&row)?;
        if update.title.is_some() {
            // A title someone set is theirs, though it is the one it has:
            // no prompt's deletion takes it back.
            sqlx::query("UPDATE chats SET title_source_message_id = NULL WHERE id = $1")
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        let change = changes_to(&before, update);
        if change == ChatUpdate::default() {
            tx.commit().await?;
            return Ok(Some(Checked::Done(before)));
        }
        // One UPDATE of the fields that change, returning the row.
        let mut q = QueryBuilder::<Postgres>::new("UPDATE chats c SET update_time = ");
        q.push_bind(now);
        if let Some(title) = &change.title {
            q.push(", title = ").push_bind(title.clone()).push(", title_key = ").push_bind(title_key(title));
        }
        if let Some(description) = &change.description {
            q.push(", description = ").push_bind(description.clone());
        }
        if let Some(visibility) = change.visibility {
            q.push(", visibility = ").push_bind(visibility.as_str());
        }
        if let Some(replies) = change.assistant_replies {
            q.push(", assistant_replies = ").push_bind(replies.as_str());
        }
        q.push(" WHERE c.id = ").push_bind(id.to_string()).push(concat!(" RETURNING ", chat_columns!()));
        let Some(row) = q.build().fetch_optional(&mut *tx).await? else { return Ok(None) };
        let chat = chat_row(&row)?;
        push_outbox(&mut tx, &id.to_string(), &[updated_by(&chat, &change)], now).await?;
        tx.commit().await?;
        Ok(Some(Checked::Done(chat)))
    }

    async fn title_chat(
        &self,
        id: ChatId,
        title: &str,
        source: Option<MessageId>,
        now: i64,
    ) -> Result<Option<(Chat, bool)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(concat!(
            "UPDATE chats c SET title = $1, title_key = $2, update_time = $3, title_source_message_id = $5 \
             WHERE c.id = $4 AND c.title = '' RETURNING ",
            chat_columns!()
        ))
        .bind(title)
        .bind(title_key(title))
        .bind(now)
        .bind(id.to_string())
        .bind(source.map(|m| m.to_string()))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(self.chat(id).await?.map(|chat| (chat, false)));
        };
        let chat = chat_row(&row)?;
        let update = ChatUpdate { title: Some(title.to_owned()), ..ChatUpdate::default() };
        push_outbox(&mut tx, &id.to_string(), &[updated_by(&chat, &update)], now).await?;
        tx.commit().await?;
        Ok(Some((chat, true)))
    }

    async fn untitle_chat(&self, id: ChatId, source: MessageId, now: i64) -> Result<Option<Chat>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(concat!(
            "UPDATE chats c SET title = '', title_key = $1, update_time = $2, title_source_message_id = NULL \
             WHERE c.id = $3 AND c.title_source_message_id = $4 RETURNING ",
            chat_columns!()
        ))
        .bind(title_key(""))
        .bind(now)
        .bind(id.to_string())
        .bind(source.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let chat = chat_row(&row)?;
        let update = ChatUpdate { title: Some(String::new()), ..ChatUpdate::default() };
        push_outbox(&mut tx, &id.to_string(), &[updated_by(&chat, &update)], now).await?;
        tx.commit().await?;
        Ok(Some(chat))
    }

    async fn set_archived(
        &self,
        id: ChatId,
        archive_time: Option<i64>,
        now: i64,
        by: Option<UserId>,
    ) -> Result<Option<Checked<Chat>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(refused) = refused_change(&mut tx, id, by, may_change).await? {
            tx.rollback().await?;
            return Ok(refused);
        }
        let row = sqlx::query(concat!(
            "UPDATE chats c SET archive_time = $1, update_time = $2, archive_version = archive_version + 1 \
             WHERE c.id = $3 AND (c.archive_time IS NULL) <> ($1::bigint IS NULL) RETURNING c.archive_version, ",
            chat_columns!()
        ))
        .bind(archive_time)
        .bind(now)
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            // Archived (unarchived) already, or no such chat: nothing changed.
            tx.rollback().await?;
            return Ok(self.chat(id).await?.map(Checked::Done));
        };
        let chat = chat_row(&row)?;
        let version: i64 = row.try_get("archive_version")?;
        push_outbox(&mut tx, &id.to_string(), &[chat_updated(&chat, vec!["archived"])], now).await?;
        push_outbox(&mut tx, &id.to_string(), &[chat_archived(archive_time.is_some(), version)], now).await?;
        tx.commit().await?;
        Ok(Some(Checked::Done(chat)))
    }

    async fn delete_chat(&self, id: ChatId, now: i64, by: Option<UserId>) -> Result<Checked<Vec<UserId>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The caller's role under the chat's row lock (taken here), which a
        // hand-over, a demotion or a removal takes first too.
        match refused_change(&mut tx, id, by, may_delete).await? {
            None => {}
            Some(None) => return Ok(Checked::Done(Vec::new())), // gone already
            Some(Some(refused)) => {
                tx.rollback().await?;
                return Ok(refused);
            }
        }
        // The chat's row lock first, as every membership change takes it: an
        // add under way commits before the members are read, so its joiner
        // is among those removed (and told so).
        touch(&mut tx, &id.to_string(), now).await?;
        let members: Vec<String> = sqlx::query_scalar("DELETE FROM members WHERE chat_id = $1 RETURNING user_id")
            .bind(id.to_string())
            .fetch_all(&mut *tx)
            .await?;
        let deleted = sqlx::query("DELETE FROM chats WHERE id = $1").bind(id.to_string()).execute(&mut *tx).await?;
        if deleted.rows_affected() > 0 {
            sqlx::query("UPDATE chat_ids SET delete_time = $2 WHERE id = $1")
                .bind(id.to_string())
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        let members = members.iter().map(|u| parse_id("members.user_id", u)).collect::<Result<Vec<UserId>, _>>()?;
        let removals: Vec<_> = members.iter().map(|user| membership(*user, mpb::MembershipChange::Removed)).collect();
        push_outbox(&mut tx, &id.to_string(), &removals, now_micros()).await?;
        tx.commit().await?;
        Ok(Checked::Done(members))
    }

    async fn chats_to_purge(&self, limit: u32) -> Result<Vec<ChatId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM chat_ids WHERE delete_time IS NOT NULL AND purge_time IS NULL ORDER BY delete_time LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|id| parse_id("chat_ids.id", id)).collect()
    }

    async fn chat_purged(&self, id: ChatId, now: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE chat_ids SET purge_time = $2 WHERE id = $1 AND delete_time IS NOT NULL")
            .bind(id.to_string())
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn purge_due(&self, id: ChatId) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM chat_ids WHERE id = $1 AND delete_time IS NOT NULL AND purge_time IS NULL)",
        )
        .bind(id.to_string())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn followed(&self, name: &str) -> Result<i64, StoreError> {
        let position: Option<(i64,)> = sqlx::query_as("SELECT position FROM followed_logs WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(position.map_or(0, |(p,)| p))
    }

    async fn follow_to(&self, name: &str, position: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO followed_logs (name, position) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET position = GREATEST(followed_logs.position, excluded.position)",
        )
        .bind(name)
        .bind(position)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn retry_later(&self, name: &str, item: &str, now: i64, backoff: Backoff) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO followed_log_retries (name, item, retry_time, delay) VALUES ($1, $2, $3 + $4, $4) \
             ON CONFLICT (name, item) DO UPDATE SET \
             delay = LEAST(GREATEST(followed_log_retries.delay * 2, $4), $5), \
             retry_time = $3 + LEAST(GREATEST(followed_log_retries.delay * 2, $4), $5)",
        )
        .bind(name)
        .bind(item)
        .bind(now)
        .bind(backoff.first)
        .bind(backoff.max)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn retries(&self, name: &str, now: i64, limit: u32) -> Result<Vec<String>, StoreError> {
        let items: Vec<(String,)> = sqlx::query_as(
            "SELECT item FROM followed_log_retries WHERE name = $1 AND retry_time <= $2 \
             ORDER BY retry_time, item LIMIT $3",
        )
        .bind(name)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(items.into_iter().map(|(item,)| item).collect())
    }

    async fn retried(&self, name: &str, item: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM followed_log_retries WHERE name = $1 AND item = $2")
            .bind(name)
            .bind(item)
            .execute(&self.pool)
            .await?;
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
        let key = chat.to_string();
        let mut tx = self.pool.begin().await?;
        if let Some(user) = forgotten_among(&mut tx, members.iter().map(|m| m.user_id)).await? {
            return Ok(Added::Forgotten(user));
        }
        // The chat's row lock next: concurrent adds to one chat queue here,
        // so the member count they check is exact, and role changes, a
        // deletion or a change of visibility wait for the commit.
        let visibility: Option<String> =
            sqlx::query_scalar("UPDATE chats SET update_time = $1 WHERE id = $2 RETURNING visibility")
                .bind(now)
                .bind(&key)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(visibility) = visibility else {
            tx.rollback().await?;
            return Ok(Added::ChatGone);
        };
        let may = match by {
            Adder::Manager(user) => role_in(&mut tx, &key, user).await?.is_some_and(Role::manages),
            Adder::Joiner => parse_enum("chats.visibility", &visibility, Visibility::parse)? == Visibility::Public,
            Adder::Unchecked => true,
        };
        if !may {
            tx.rollback().await?;
            return Ok(Added::Refused);
        }
        let inserted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO members (chat_id, user_id, role, join_time) \
             SELECT $1, m.user_id, m.role, m.join_time FROM UNNEST($2::text[], $3::text[], $4::bigint[]) \
             AS m (user_id, role, join_time) ON CONFLICT (chat_id, user_id) DO NOTHING RETURNING user_id",
        )
        .bind(&key)
        .bind(members.iter().map(|m| m.user_id.to_string()).collect::<Vec<_>>())
        .bind(members.iter().map(|m| m.role.as_str()).collect::<Vec<_>>())
        .bind(members.iter().map(|m| m.join_time).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        let count = recount(&mut tx, &key).await? as usize;
        if !limits.admits_members(count) {
            tx.rollback().await?;
            return Ok(Added::TooMany(count));
        }
        // In request order, as the engine's RETURNING order is not promised.
        let added: Vec<Member> =
            members.iter().filter(|m| inserted.contains(&m.user_id.to_string())).copied().collect();
        if let Adder::Manager(adder) = by {
            let users: Vec<UserId> = added.iter().map(|m| m.user_id).collect();
            if let Some(blocker) = first_block(&mut tx, &blocks_between_refused(adder, &users, false)).await? {
                tx.rollback().await?;
                return Ok(Added::Blocked(blocker));
            }
        }
        push_outbox(&mut tx, &key, &joined(added.iter().map(|m| m.user_id)), now).await?;
        tx.commit().await?;
        Ok(Added::Added(added))
    }

    async fn remove_member(
        &self,
        chat: ChatId,
        user: UserId,
        removal: Removal<'_>,
        now: i64,
    ) -> Result<Checked<()>, StoreError> {
        let key = chat.to_string();
        let mut tx = self.pool.begin().await?;
        // The chat's row lock first: role and membership changes of this
        // chat queue there, so the roles read next hold until the commit.
        touch(&mut tx, &key, now).await?;
        let actor = match removal.actor {
            Some((actor, required)) => Some((role_in(&mut tx, &key, actor).await?, required)),
            None => None,
        };
        let target = role_in(&mut tx, &key, user).await?;
        let role = match check_roles(actor, target, removal.targets) {
            Ok(role) => role,
            Err(refused) => {
                tx.rollback().await?;
                return Ok(refused);
            }
        };
        let done = sqlx::query("DELETE FROM members WHERE chat_id = $1 AND user_id = $2 AND role = $3")
            .bind(&key)
            .bind(user.to_string())
            .bind(role.as_str())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(Checked::NotMember);
        }
        recount(&mut tx, &key).await?;
        let version: i64 = sqlx::query_scalar(RAISE_MEMBERS_VERSION).bind(&key).fetch_one(&mut *tx).await?;
        for entry in departed(user, removal.departure, version) {
            push_outbox(&mut tx, &key, &entry, now).await?;
        }
        tx.commit().await?;
        Ok(Checked::Done(()))
    }

    async fn set_role(
        &self,
        chat: ChatId,
        by: UserId,
        user: UserId,
        role: Role,
        now: i64,
    ) -> Result<Checked<Member>, StoreError> {
        let key = chat.to_string();
        let mut tx = self.pool.begin().await?;
        // The chat's row lock first, as in remove_member.
        touch(&mut tx, &key, now).await?;
        let actor = role_in(&mut tx, &key, by).await?;
        let target = role_in(&mut tx, &key, user).await?;
        let current = match check_roles(Some((actor, &[Role::Owner])), target, ROLE_TARGETS) {
            Ok(current) => current,
            Err(refused) => {
                tx.rollback().await?;
                return Ok(refused);
            }
        };
        let user = user.to_string();
        let mut previous_owners = Vec::new();
        if role == Role::Owner {
            let demoted: Vec<String> = sqlx::query_scalar(
                "UPDATE members SET role = 'admin' WHERE chat_id = $1 AND role = 'owner' AND user_id <> $2 \
                 RETURNING user_id",
            )
            .bind(&key)
            .bind(&user)
            .fetch_all(&mut *tx)
            .await?;
            previous_owners =
                demoted.iter().map(|u| parse_id("members.user_id", u)).collect::<Result<Vec<UserId>, _>>()?;
            sqlx::query("UPDATE chats SET owner_id = $1 WHERE id = $2")
                .bind(&user)
                .bind(&key)
                .execute(&mut *tx)
                .await?;
        }
        let row = sqlx::query(
            "UPDATE members SET role = $1 WHERE chat_id = $2 AND user_id = $3 AND role = $4 \
             RETURNING chat_id, user_id, role, join_time",
        )
        .bind(role.as_str())
        .bind(&key)
        .bind(&user)
        .bind(current.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(Checked::NotMember);
        };
        let member = member_row(&row)?;
        let demoted = loses_rights(current, role, !previous_owners.is_empty());
        push_outbox(&mut tx, &key, &role_changes(member.user_id, previous_owners), now).await?;
        if demoted {
            let version: i64 = sqlx::query_scalar(RAISE_MEMBERS_VERSION).bind(&key).fetch_one(&mut *tx).await?;
            push_outbox(&mut tx, &key, &[members_departed(version)], now).await?;
        }
        tx.commit().await?;
        Ok(Checked::Done(member))
    }

    async fn members(&self, chat: ChatId, after: Option<MemberCursor>, limit: u32) -> Result<Vec<Member>, StoreError> {
        let rows = match after {
            None => {
                sqlx::query(
                    "SELECT chat_id, user_id, role, join_time FROM members WHERE chat_id = $1 \
                     ORDER BY join_time, user_id LIMIT $2",
                )
                .bind(chat.to_string())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
            Some(after) => {
                sqlx::query(
                    "SELECT chat_id, user_id, role, join_time FROM members WHERE chat_id = $1 \
                     AND (join_time > $2 OR (join_time = $2 AND user_id > $3)) ORDER BY join_time, user_id LIMIT $4",
                )
                .bind(chat.to_string())
                .bind(after.join_time)
                .bind(after.user_id.to_string())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(member_row).collect()
    }

    async fn pending(&self, chat: Option<ChatId>, limit: u32) -> Result<Vec<Pending>, StoreError> {
        let rows: Vec<(String, i64, String, String)> =
            match chat {
                Some(chat) => {
                    sqlx::query_as(
                        "SELECT chat_id, position, origin, changes FROM chat_outbox WHERE chat_id = $1 \
                     ORDER BY position LIMIT $2",
                    )
                    .bind(chat.to_string())
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?
                }
                None => sqlx::query_as(
                    "SELECT chat_id, position, origin, changes FROM chat_outbox ORDER BY chat_id, position LIMIT $1",
                )
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?,
            };
        rows.into_iter().map(|(chat, position, key, changes)| pending_row(&chat, position, key, &changes)).collect()
    }

    async fn forget_pending(&self, entry: &Pending) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM chat_outbox WHERE chat_id = $1 AND position = $2 AND origin = $3")
            .bind(entry.chat_id.to_string())
            .bind(entry.position)
            .bind(&entry.key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// A privacy_settings row: group_adds, direct_chats, read_receipts,
/// update_time.
type PrivacyRow = (Option<String>, Option<String>, Option<String>, i64);

/// The choices a privacy_settings row holds.
fn stored_privacy(
    (group_adds, direct_chats, read_receipts, update_time): PrivacyRow,
) -> Result<StoredPrivacy, StoreError> {
    Ok(StoredPrivacy { choices: privacy_choices(group_adds, direct_chats, read_receipts)?, update_time })
}

/// The choices of a privacy_settings row's group_adds, direct_chats and
/// read_receipts, each NULL until the user sets it.
fn privacy_choices(
    group_adds: Option<String>,
    direct_chats: Option<String>,
    read_receipts: Option<String>,
) -> Result<PrivacyChoices, StoreError> {
    Ok(PrivacyChoices {
        group_adds: group_adds.map(|g| parse_enum("privacy_settings.group_adds", &g, GroupAdds::parse)).transpose()?,
        direct_chats: direct_chats
            .map(|d| parse_enum("privacy_settings.direct_chats", &d, DirectChats::parse))
            .transpose()?,
        read_receipts: read_receipts
            .map(|r| parse_enum("privacy_settings.read_receipts", &r, ReadReceipts::parse))
            .transpose()?,
    })
}

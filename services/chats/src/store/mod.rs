//! The chats store contract: one trait ([`ChatStore`]) speaking domain
//! types, one implementation native to each engine ([`sqlite`] on rusqlite,
//! [`postgres`] on sqlx's Postgres driver) and one conformance suite run
//! against both (`tests.rs`). Engine differences live in those two files,
//! never as a branch inside a shared method.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use natter_db::{DbConfig, Engine};
use natter_kit::id::{ChatId, UserId};

use crate::domain::{
    Activity, Chat, ChatAccess, ChatCursor, ChatFilter, ChatUpdate, Limits, Member, MemberCursor, Role,
};

pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod tests;

/// The chats schema, embedded at compile time (the same DDL on both engines).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A failure of the store. Nothing of it reaches a client (INTERNAL); the
/// service logs it with the place it arose.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused or failed.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused or failed.
    #[error(transparent)]
    Postgres(#[from] sqlx::Error),
    /// Opening, migrating or reaching the database failed.
    #[error(transparent)]
    Db(#[from] natter_db::DbError),
    /// A stored value is not one the domain knows (an unknown kind, role or
    /// visibility, a malformed id): never read as a default.
    #[error("corrupt {column} in the chats store: {value:?}")]
    Corrupt {
        /// `table.column`.
        column: &'static str,
        /// The value found (cut to 64 characters).
        value: String,
    },
    /// A store option is out of range.
    #[error("invalid chats store option: {0}")]
    Config(String),
}

impl StoreError {
    /// A corrupt value of `column`.
    pub(crate) fn corrupt(column: &'static str, value: &str) -> Self {
        Self::Corrupt { column, value: value.chars().take(64).collect() }
    }
}

/// The columns each engine's chat row mapper reads, in its order, of
/// `chats c` (a macro, for `concat!`).
macro_rules! chat_columns {
    () => {
        "c.id, c.kind, c.title, c.description, c.visibility, c.owner_id, c.creator_id, c.member_count, \
         c.archive_time, c.create_time, c.update_time, c.last_activity_time, c.last_seq, c.last_message_time"
    };
}
pub(crate) use chat_columns;

/// Parses a stored id strictly.
pub(crate) fn parse_id<T: std::str::FromStr>(column: &'static str, value: &str) -> Result<T, StoreError> {
    value.parse().map_err(|_| StoreError::corrupt(column, value))
}

/// Parses a stored enum strictly (`parse` is the domain type's).
pub(crate) fn parse_enum<T>(column: &'static str, value: &str, parse: fn(&str) -> Option<T>) -> Result<T, StoreError> {
    parse(value).ok_or_else(|| StoreError::corrupt(column, value))
}

/// The key that makes a direct chat unique per pair (`chats.direct_key`):
/// None for a group, the pair of a direct chat's two members.
///
/// Errors: a direct chat without exactly two members.
pub(crate) fn direct_key(chat: &Chat, members: &[Member]) -> Result<Option<String>, StoreError> {
    match (chat.kind, members) {
        (crate::domain::Kind::Group, _) => Ok(None),
        (crate::domain::Kind::Direct, [a, b]) => Ok(Some(crate::domain::direct_key(a.user_id, b.user_id))),
        (crate::domain::Kind::Direct, _) => Err(StoreError::Config("a direct chat has exactly two members".into())),
    }
}

/// Outcome of creating a chat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// The chat is new.
    Created,
    /// A chat with this id, or a direct chat of this pair, exists already;
    /// nothing was written.
    Conflict,
}

/// Outcome of adding members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Added {
    /// The members that were not in the chat yet, now added (in request
    /// order).
    Added(Vec<Member>),
    /// The chat would have had this many members, more than the limit
    /// admits; nothing was written.
    TooMany(usize),
}

/// Everything the chats service keeps: chats, members, chat activity.
/// Shared as `Arc<dyn ChatStore>`.
///
/// Every method fails only with [`StoreError`]; "not found" is `None` or
/// `false`, never an error.
#[async_trait]
pub trait ChatStore: Send + Sync + 'static {
    /// Inserts `chat` and its `members` in one transaction. A direct chat's
    /// pair (its two members) is unique: a second direct chat of the same
    /// pair, or a chat whose id is taken, is [`Created::Conflict`].
    async fn create_chat(&self, chat: &Chat, members: &[Member]) -> Result<Created, StoreError>;

    /// The chat, with its newest activity.
    async fn chat(&self, id: ChatId) -> Result<Option<Chat>, StoreError>;

    /// The direct chat of `a` and `b` (either order), if any.
    async fn direct_chat(&self, a: UserId, b: UserId) -> Result<Option<Chat>, StoreError>;

    /// The chat and `user`'s role in it, in one read (every send checks it).
    async fn access(&self, chat: ChatId, user: UserId) -> Result<Option<ChatAccess>, StoreError>;

    /// `user`'s role in `chat`, if a member.
    async fn role(&self, chat: ChatId, user: UserId) -> Result<Option<Role>, StoreError>;

    /// Every chat `user` is a member of.
    async fn member_chat_ids(&self, user: UserId) -> Result<Vec<ChatId>, StoreError>;

    /// Up to `limit` chats by last activity (then id) in `filter`'s order,
    /// after `after`: `user`'s chats, or the public ones. The order includes
    /// every activity of these chats recorded before the call.
    async fn list_chats(
        &self,
        user: UserId,
        filter: &ChatFilter,
        after: Option<ChatCursor>,
        limit: u32,
    ) -> Result<Vec<Chat>, StoreError>;

    /// Moves chats' activity forward, never back (a lower or equal seq than
    /// the one known is ignored; an unknown chat too). Reads of a chat see it
    /// at once; it is derived data, which an engine may keep in memory for a
    /// while or commit without a sync (the messages service has the truth
    /// and re-announces it after a crash).
    async fn record_activity(&self, activities: &[Activity]) -> Result<(), StoreError>;

    /// Writes any activity still kept in memory (nothing to do where
    /// activity is written through).
    async fn flush_activity(&self) -> Result<(), StoreError>;

    /// Applies `update` and sets the update time to `now`; returns the chat,
    /// None if there is no such chat.
    async fn update_chat(&self, id: ChatId, update: &ChatUpdate, now: i64) -> Result<Option<Chat>, StoreError>;

    /// Sets (Some) or clears (None) a chat's archive time, and the update
    /// time to `now`; returns the chat, None if there is no such chat.
    async fn set_archived(&self, id: ChatId, archive_time: Option<i64>, now: i64) -> Result<Option<Chat>, StoreError>;

    /// Deletes a chat and its memberships; returns who were its members
    /// (empty if there was no such chat).
    async fn delete_chat(&self, id: ChatId) -> Result<Vec<UserId>, StoreError>;

    /// Adds the `members` (all of chat `chat`) not in it yet, in one
    /// transaction that locks the chat first, unless the chat would then
    /// have more members than `limits` admit ([`Limits::admits_members`],
    /// counted exactly under that lock). Sets the update time to `now`.
    async fn add_members(
        &self,
        chat: ChatId,
        members: &[Member],
        limits: &Limits,
        now: i64,
    ) -> Result<Added, StoreError>;

    /// Removes a member; false if they were not one. Sets the update time
    /// to `now` and recounts the members.
    async fn remove_member(&self, chat: ChatId, user: UserId, now: i64) -> Result<bool, StoreError>;

    /// Sets a member's role, in one transaction: making someone owner makes
    /// the current owner an admin and the chat's `owner_id` them. Returns
    /// the member, None (and nothing changed) if they are not one.
    async fn set_role(&self, chat: ChatId, user: UserId, role: Role, now: i64) -> Result<Option<Member>, StoreError>;

    /// Up to `limit` members of `chat` in join order (then user id), after
    /// `after`.
    async fn members(&self, chat: ChatId, after: Option<MemberCursor>, limit: u32) -> Result<Vec<Member>, StoreError>;

    /// Writes the activity kept in memory (a failure is logged) and closes
    /// the database. Call once serving has stopped.
    async fn close(&self);
}

/// Opens (creating and migrating) the chats store `config` names: SQLite
/// keeps chat activity in memory for up to `activity_interval` (see
/// [`sqlite`]), PostgreSQL writes it through.
///
/// Errors: `activity_interval` is zero or above
/// [`natter_links::activity::MAX_FLUSH_INTERVAL`] ([`StoreError::Config`]),
/// the URL is unsupported, the database is unreachable or a migration fails.
pub async fn open(config: &DbConfig, activity_interval: Duration) -> Result<Arc<dyn ChatStore>, StoreError> {
    natter_links::activity::check_flush_interval(activity_interval).map_err(StoreError::Config)?;
    Ok(match config.engine()? {
        Engine::Sqlite { path } => {
            let readers = config.max_connections as usize;
            Arc::new(sqlite::SqliteChatStore::open(&path, readers, activity_interval).await?)
        }
        Engine::Postgres { url, schema } => {
            Arc::new(postgres::PostgresChatStore::open(&url, &schema, config.max_connections).await?)
        }
    })
}

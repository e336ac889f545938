//! The chats store contract: one trait ([`ChatStore`]) speaking domain
//! types, one implementation native to each engine ([`sqlite`] on rusqlite,
//! [`postgres`] on sqlx's Postgres driver) and one conformance suite run
//! against both (`tests.rs`). Engine differences live in those two files,
//! never as a branch inside a shared method.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use natter_db::{DbConfig, Engine};
use natter_kit::id::{ChatId, MessageId, UserId};
use natter_kit::time::timestamp;
use natter_proto::messages::v1 as mpb;
use prost::Message as _;

use crate::domain::{
    Activity, AssistantReplies, Chat, ChatAccess, ChatCursor, ChatFilter, ChatOrder, ChatUpdate, Kind, Limits, Member,
    MemberCursor, PrivacyChoices, Role, StoredPrivacy, Visibility,
};

pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod tests;

/// The chats schema, embedded at compile time (the same DDL on both engines).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A failure of the store. Nothing of it reaches a client but its kind
/// (UNAVAILABLE, ABORTED or INTERNAL: `natter_kit::store_failure_at`); the
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
         c.archive_time, c.create_time, c.update_time, c.last_activity_time, c.last_seq, c.last_message_time, \
         c.assistant_replies, c.members_version"
    };
}
pub(crate) use chat_columns;

/// The column of `chats c` a listing in `order` sorts and pages by (the
/// same on both engines).
pub(crate) fn order_column(order: ChatOrder) -> &'static str {
    match order {
        ChatOrder::Activity => "c.last_activity_time",
        ChatOrder::CreateTime => "c.create_time",
    }
}

/// The time bounds of a listing as `(value, "column op")` conditions of
/// `chats c`, each to apply when set: the newest message strictly inside
/// `(last_message_after, last_message_before)`, the creation time in the
/// half-open `[created_after, created_before)` (the same on both engines).
pub(crate) fn time_bounds(filter: &ChatFilter) -> [(Option<i64>, &'static str); 4] {
    [
        (filter.last_message_after, "c.last_message_time >"),
        (filter.last_message_before, "c.last_message_time <"),
        (filter.created_after, "c.create_time >="),
        (filter.created_before, "c.create_time <"),
    ]
}

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

/// How long an item of a followed log waits before it is tried again
/// ([`ChatStore::retry_later`]): `first` after its first failure, then twice
/// its last wait after each further one, never more than `max` (both µs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure, µs.
    pub first: i64,
    /// The longest wait, µs.
    pub max: i64,
}

/// Outcome of creating a chat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// The chat is new.
    Created,
    /// A chat with this id, or a direct chat of this pair, exists already;
    /// nothing was written.
    Conflict,
    /// This member is a user taken out of every chat for good
    /// ([`ChatStore::record_forgotten`]: its account is deleted); nothing
    /// was written.
    Forgotten(UserId),
    /// This user blocks the creator (or, for a direct chat, the creator
    /// blocks the other: then the creator), as read in the write's
    /// transaction ([`blocks_between_refused`]); nothing was written.
    Blocked(UserId),
}

/// Outcome of [`ChatStore::block`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// Blocked now, or already.
    Done,
    /// The user blocks the most users one may already: nothing changed.
    TooMany,
    /// This one of the two was recorded forgotten (its account deleted)
    /// since the caller looked it up: nothing changed.
    Forgotten(UserId),
}

/// Which shared chats make two users peers ([`ChatStore::peers_among`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peers {
    /// For presence: any chat, public ones included, unless either of the
    /// two blocked the other (a block hides presence both ways, BlockUser).
    Presence,
    /// For the privacy settings' PEERS: only chats that are not public (a
    /// stranger who joined a public group anyone may join must not pass a
    /// PEERS setting of everyone there). Blocks do not count: the caller
    /// checks them on their own, with their own refusal.
    Privacy,
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
    /// This member is a user taken out of every chat for good
    /// ([`ChatStore::record_forgotten`]: its account is deleted); nothing
    /// was written.
    Forgotten(UserId),
    /// The chat is gone (deleted since the caller looked); nothing was
    /// written.
    ChatGone,
    /// The [`Adder`] may not add (any more): no owner or admin now, or the
    /// chat is no longer public; nothing was written.
    Refused,
    /// This user, one of those the add would add, blocks the
    /// [`Adder::Manager`] adding them, as read in the write's transaction
    /// ([`blocks_between_refused`]); nothing was written.
    Blocked(UserId),
}

/// The blocks a membership write ([`ChatStore::create_chat`],
/// [`ChatStore::add_members`]) checks in its own transaction, after the
/// service checked them from a read that may be stale by then (a BlockUser
/// committed in between): none of the users it makes members with `adder`
/// (the creator, the manager who adds) may block `adder`, and for a new
/// direct chat `adder` may not block the other either. Checked so that a
/// block and a write about the same pair of users are ordered: SQLite runs
/// one write at a time; PostgreSQL's write takes, before it reads the
/// blocks, the advisory lock of each user whose block it reads (shared),
/// the lock [`ChatStore::block`] holds (exclusive) until its commit. So
/// either the block committed first and the write sees it, or the write
/// committed first and the block finds them in the group (which goes on,
/// as every group does) or the direct chat (which it closes).
///
/// Answers the pairs `(blocker, blocked)` to look for: each of `members`
/// but `adder` blocking `adder`, then, with `direct`, `adder` blocking
/// them.
pub fn blocks_between_refused(adder: UserId, members: &[UserId], direct: bool) -> Vec<(UserId, UserId)> {
    let others = members.iter().copied().filter(|m| *m != adder);
    let mut pairs: Vec<(UserId, UserId)> = others.clone().map(|m| (m, adder)).collect();
    if direct {
        pairs.extend(others.map(|m| (adder, m)));
    }
    pairs
}

/// Who adds members ([`ChatStore::add_members`]), checked again in the
/// add's transaction under the chat's lock: the service checked it from a
/// read that may be stale by then (a removal, a demotion, or the chat made
/// private, committed in between).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adder {
    /// This user, an owner or admin of the chat.
    Manager(UserId),
    /// A user adding only themselves to a public chat (a join).
    Joiner,
    /// Nobody to check.
    Unchecked,
}

/// How a member left a chat (the change [`ChatStore::remove_member`]
/// records).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Departure {
    /// The member left by themselves.
    Left,
    /// Someone else removed them.
    Removed,
}

/// What [`ChatStore::remove_member`] checks under the chat's lock, in the
/// transaction that removes: the roles a request read before it may have
/// changed since (a hand-over, a demotion, a leave).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Removal<'a> {
    /// How the member goes (the change recorded).
    pub departure: Departure,
    /// The roles the member removed may have. The owner is never removed,
    /// listed or not: a group keeps its one owner (a leaving owner, a
    /// deleted one too, hands ownership over first and leaves as an admin).
    pub targets: &'a [Role],
    /// The member who removes them and the roles they must still have;
    /// None when nobody else acts (a leave, a deleted user taken out).
    pub actor: Option<(UserId, &'a [Role])>,
}

/// Outcome of a membership write that checks roles under the chat's lock
/// ([`ChatStore::remove_member`], [`ChatStore::set_role`]). Anything but
/// [`Checked::Done`] wrote nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked<T> {
    /// Written; what the write answers.
    Done(T),
    /// The member acted on is not one (any more).
    NotMember,
    /// The member acting does not hold a role the write requires (any
    /// more): their role now, None if they are no member.
    Actor(Option<Role>),
    /// The member acted on has a role the write does not allow: their role
    /// now.
    Target(Role),
}

/// The rule of a role-checked write, on the roles read under the chat's
/// lock, in this order: the actor's (`Some((role, required))` when one acts:
/// their role, None if no member, and the roles they must hold), then the
/// target's (`target`, None if no member) against `allowed`, the owner never
/// allowed. Answers the target's role when the write may go ahead, else the
/// refusal (the same rule on both engines).
/// Whether a member of role `role` (None: no member) may change the
/// details of a chat of `kind` or archive it: an owner or admin of a group,
/// either member of a direct chat.
pub(crate) fn may_change(kind: Kind, role: Option<Role>) -> bool {
    match kind {
        Kind::Direct => role.is_some(),
        _ => role.is_some_and(Role::manages),
    }
}

/// Whether a member of role `role` (None: no member) may delete a chat of
/// `kind`: the owner of a group, either member of a direct chat (the
/// service checks that nobody else keeps it).
pub(crate) fn may_delete(kind: Kind, role: Option<Role>) -> bool {
    match kind {
        Kind::Direct => role.is_some(),
        _ => role == Some(Role::Owner),
    }
}

#[cfg(test)]
impl<T: std::fmt::Debug> Checked<T> {
    /// What was written; panics if it was not.
    pub fn done(self) -> T {
        match self {
            Checked::Done(t) => t,
            refused => panic!("not written: {refused:?}"),
        }
    }
}

impl<T> Checked<T> {
    /// `f` applied to what was written, if it was.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Checked<U> {
        match self {
            Checked::Done(t) => Checked::Done(f(t)),
            Checked::NotMember => Checked::NotMember,
            Checked::Actor(role) => Checked::Actor(role),
            Checked::Target(role) => Checked::Target(role),
        }
    }
}

pub(crate) fn check_roles<T>(
    actor: Option<(Option<Role>, &[Role])>,
    target: Option<Role>,
    allowed: &[Role],
) -> Result<Role, Checked<T>> {
    if let Some((role, required)) = actor
        && !role.is_some_and(|r| required.contains(&r))
    {
        return Err(Checked::Actor(role));
    }
    match target {
        None => Err(Checked::NotMember),
        Some(role) if role == Role::Owner || !allowed.contains(&role) => Err(Checked::Target(role)),
        Some(role) => Ok(role),
    }
}

/// The roles [`ChatStore::set_role`] may change: anyone's but the owner's
/// (the owner's changes only by a hand-over).
pub(crate) const ROLE_TARGETS: &[Role] = &[Role::Admin, Role::Member];

/// Most changes one outbox entry holds: what one `RecordChatChanges` call
/// takes (messages_internal.proto; more is INVALID_ARGUMENT). An operation
/// with more (a chat of more members than that created or deleted) writes
/// several entries, in order.
pub const OUTBOX_ENTRY_CHANGES: usize = 1_000;

/// An outbox entry: committed changes of one chat's membership or details
/// that the messages service has not recorded yet. Every operation that
/// changes them writes its entries in its own transaction (the
/// transactional outbox pattern), so a crash or a failed call between the
/// commit and `RecordChatChanges` delays the record but never loses it.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    /// The chat changed.
    pub chat_id: ChatId,
    /// Per chat, from 1, in commit order: entries are recorded in this order.
    pub position: i64,
    /// The idempotency key of every `RecordChatChanges` call for this entry
    /// (a UUID v7 in simple form, 32 characters).
    pub key: String,
    /// 1 to [`OUTBOX_ENTRY_CHANGES`] changes, in the order they happened.
    pub changes: Vec<mpb::ChatChange>,
    /// When they were committed (None: an entry written before this was
    /// kept), for the messages service to place a join's read position.
    pub change_time: Option<natter_proto::Timestamp>,
}

/// A membership change of `user`, as the messages service records it.
pub fn membership(user: UserId, change: mpb::MembershipChange) -> mpb::ChatChange {
    let change = mpb::MembershipChanged { user_id: user.to_string(), change: change as i32 };
    mpb::ChatChange { change: Some(mpb::chat_change::Change::MembershipChanged(change)) }
}

/// A change of `chat`'s details: `mask` names the fields that changed
/// ("title", "description", "visibility", "archived"), the rest is the chat
/// as stored after the change.
pub fn chat_updated(chat: &Chat, mask: Vec<&str>) -> mpb::ChatChange {
    let updated = mpb::ChatUpdated {
        update_mask: Some(natter_proto::FieldMask { paths: mask.into_iter().map(str::to_owned).collect() }),
        title: chat.title.clone(),
        description: chat.description.clone(),
        public: chat.visibility == Visibility::Public,
        archived: chat.archive_time.is_some(),
        update_time: Some(timestamp(chat.update_time)),
        assistant_replies: assistant_replies_pb(chat),
    };
    mpb::ChatChange { change: Some(mpb::chat_change::Change::ChatUpdated(updated)) }
}

/// `chat`'s natter.messages.v1.AssistantReplies: UNSPECIFIED for a direct
/// chat (always answered), else its setting.
pub(crate) fn assistant_replies_pb(chat: &Chat) -> i32 {
    let replies = match chat.assistant_replies {
        _ if chat.kind == Kind::Direct => mpb::AssistantReplies::Unspecified,
        AssistantReplies::Mentions => mpb::AssistantReplies::Mentions,
        AssistantReplies::All => mpb::AssistantReplies::All,
        AssistantReplies::Off => mpb::AssistantReplies::Off,
    };
    replies as i32
}

/// `users` joined.
pub(crate) fn joined(users: impl IntoIterator<Item = UserId>) -> Vec<mpb::ChatChange> {
    users.into_iter().map(|user| membership(user, mpb::MembershipChange::Joined)).collect()
}

/// The outbox change of a direct chat's closure by blocks: whether it
/// takes new messages (`closed`: one of its two members blocks the other),
/// at `version` (`chats.block_version`).
pub fn direct_chat_closed(closed: bool, version: i64) -> mpb::ChatChange {
    let closure = mpb::DirectChatClosed { closed, version };
    mpb::ChatChange { change: Some(mpb::chat_change::Change::DirectChatClosed(closure)) }
}

/// Raises the block version of the direct chat whose `direct_key` is `$1`
/// (none: nothing), taking its row lock on PostgreSQL, and answers its id
/// and new version (the same text on both engines: `?N` and `$N` alike bind
/// by position). Whether it is closed is read after it, in a statement of
/// its own ([`PAIR_BLOCKED`]), so that it sees every block change committed
/// while this one waited for the lock.
pub(crate) const RAISE_BLOCK_VERSION: &str =
    "UPDATE chats SET block_version = block_version + 1 WHERE direct_key = $1 RETURNING id, block_version";

/// Whether user `$1` blocks user `$2` or `$2` blocks `$1` (the same text
/// on both engines).
pub(crate) const PAIR_BLOCKED: &str = "SELECT EXISTS (SELECT 1 FROM blocks WHERE (user_id = $1 AND blocked_user_id = $2) \
     OR (user_id = $2 AND blocked_user_id = $1))";

/// Up to `$1` direct chats, by id, one of whose members blocks the other
/// while no closure was recorded for them (`block_version` 0: blocked
/// under a release before closures): see
/// [`ChatStore::version_old_blocks`] (the same text on both engines).
pub(crate) const OLD_BLOCKED_DIRECT_CHATS: &str = "SELECT DISTINCT c.id FROM chats c \
     JOIN members m ON m.chat_id = c.id JOIN blocks b ON b.user_id = m.user_id \
     JOIN members o ON o.chat_id = c.id AND o.user_id = b.blocked_user_id \
     WHERE c.kind = 'direct' AND c.block_version = 0 ORDER BY c.id LIMIT $1";

/// Block version 1 for chat `$1` if it still has none, taking its row lock
/// on PostgreSQL; answers its id if so.
pub(crate) const FIRST_BLOCK_VERSION: &str =
    "UPDATE chats SET block_version = 1 WHERE id = $1 AND block_version = 0 RETURNING id";

/// Whether one member of chat `$1` blocks another (read after
/// [`FIRST_BLOCK_VERSION`]'s lock, in a statement of its own).
pub(crate) const BLOCKS_WITHIN: &str = "SELECT EXISTS (SELECT 1 FROM members m JOIN blocks b ON b.user_id = m.user_id \
     JOIN members o ON o.chat_id = m.chat_id AND o.user_id = b.blocked_user_id WHERE m.chat_id = $1)";

/// Up to `$1` chats, by id, archived while no archived state was recorded
/// for them (`archive_version` 0: archived under a release before archived
/// states): see [`ChatStore::version_old_archives`] (the same text on both
/// engines).
pub(crate) const OLD_ARCHIVED_CHATS: &str =
    "SELECT id FROM chats WHERE archive_time IS NOT NULL AND archive_version = 0 ORDER BY id LIMIT $1";

/// Archive version 1 for chat `$1` if it is still archived with none,
/// taking its row lock on PostgreSQL; answers its id if so (an unarchive
/// or an archive meanwhile raised it and put its own state in the outbox).
pub(crate) const FIRST_ARCHIVE_VERSION: &str = "UPDATE chats SET archive_version = 1 \
     WHERE id = $1 AND archive_version = 0 AND archive_time IS NOT NULL RETURNING id";

/// The outbox change of a chat's archived state (ArchiveChat,
/// UnarchiveChat): whether it is archived, at `version`
/// (`chats.archive_version`). It goes in an entry of its own, after the
/// archive's `chat_updated`, so that a messages service of an earlier
/// release, which refuses it, still records the update.
pub fn chat_archived(archived: bool, version: i64) -> mpb::ChatChange {
    mpb::ChatChange { change: Some(mpb::chat_change::Change::ChatArchived(mpb::ChatArchived { archived, version })) }
}

/// The outbox entries of `user`'s `departure` at members version
/// `version` (`chats.members_version` raised by it,
/// [`RAISE_MEMBERS_VERSION`]): the departure, then the version
/// ([`members_departed`]) in an entry of its own, so that a messages
/// service of an earlier release, which refuses the version (an unknown
/// change), still records the departure.
pub(crate) fn departed(user: UserId, departure: Departure, version: i64) -> [[mpb::ChatChange; 1]; 2] {
    let change = match departure {
        Departure::Left => mpb::MembershipChange::Left,
        Departure::Removed => mpb::MembershipChange::Removed,
    };
    [[membership(user, change)], [members_departed(version)]]
}

/// The outbox change that tells the messages service that a chat's
/// members version is `version` after a departure or a loss of rights (a
/// demotion, a hand-over): a write (send, edit, reaction, pin, deletion,
/// read marker, report) refuses a change whose membership check saw a
/// lower one.
pub fn members_departed(version: i64) -> mpb::ChatChange {
    mpb::ChatChange { change: Some(mpb::chat_change::Change::MembersDeparted(mpb::MembersDeparted { version })) }
}

/// Raises the members version of chat `$1` and answers it, in the
/// transaction of a departure or of a loss of rights ([`loses_rights`]),
/// under the chat's row lock (PostgreSQL) or the one writer (SQLite); the
/// same text on both engines. `chats.members_version` is thus raised by
/// every departure or loss of rights, whatever its name says.
pub(crate) const RAISE_MEMBERS_VERSION: &str =
    "UPDATE chats SET members_version = members_version + 1 WHERE id = $1 RETURNING members_version";

/// Whether an UpdateMember that makes a member of role `current` a
/// `role` takes rights away from anyone: a demotion (admin to member), or a
/// hand-over (`handed_over`: the owners it made admins). Such a change
/// raises the chat's members version ([`RAISE_MEMBERS_VERSION`]), which
/// goes to the outbox after the role changes, in an entry of its own
/// ([`members_departed`]), so that a pin or a moderation deletion whose
/// check saw the old role is refused where it is written. A promotion, or
/// a role set to the one held (a retry), takes nothing away.
pub(crate) fn loses_rights(current: Role, role: Role, handed_over: bool) -> bool {
    handed_over || (current == Role::Admin && role == Role::Member)
}

/// The role changes of an UpdateMember of `member`: theirs, then those of
/// the owners a hand-over made admins.
pub(crate) fn role_changes(member: UserId, previous_owners: Vec<UserId>) -> Vec<mpb::ChatChange> {
    std::iter::once(member)
        .chain(previous_owners)
        .map(|user| membership(user, mpb::MembershipChange::RoleChanged))
        .collect()
}

/// The change of an UpdateChat that set the fields of `update`, leaving
/// `chat`.
pub(crate) fn updated_by(chat: &Chat, update: &ChatUpdate) -> mpb::ChatChange {
    let named = [
        ("title", update.title.is_some()),
        ("description", update.description.is_some()),
        ("visibility", update.visibility.is_some()),
        ("assistant_replies", update.assistant_replies.is_some()),
    ];
    chat_updated(chat, named.into_iter().filter(|(_, set)| *set).map(|(path, _)| path).collect())
}

/// The part of `update` that changes `chat`: the fields it sets to a value
/// other than the chat's, the rest None (all None: an update that changes
/// nothing, such as a retry whose answer was lost). The same rule on both
/// engines, applied under the chat's lock.
pub(crate) fn changes_to(chat: &Chat, update: &ChatUpdate) -> ChatUpdate {
    ChatUpdate {
        title: update.title.clone().filter(|title| *title != chat.title),
        description: update.description.clone().filter(|description| *description != chat.description),
        visibility: update.visibility.filter(|visibility| *visibility != chat.visibility),
        assistant_replies: update.assistant_replies.filter(|replies| *replies != chat.assistant_replies),
    }
}

/// The outbox rows of `changes` committed at `now` (µs; none for none):
/// `(key, changes)` of each entry of at most [`OUTBOX_ENTRY_CHANGES`], in
/// order, each with a fresh key; `changes` as the `changes` column stores
/// them (a RecordChatChangesRequest of the changes and their commit time).
pub(crate) fn outbox_rows(changes: &[mpb::ChatChange], now: i64) -> Vec<(String, String)> {
    changes
        .chunks(OUTBOX_ENTRY_CHANGES)
        .map(|chunk| {
            let request = mpb::RecordChatChangesRequest {
                changes: chunk.to_vec(),
                change_time: Some(timestamp(now)),
                ..Default::default()
            };
            let key = uuid::Uuid::now_v7().simple().to_string();
            (key, base64::engine::general_purpose::STANDARD.encode(request.encode_to_vec()))
        })
        .collect()
}

/// An outbox row read back. Errors: a key or changes column that is not
/// what [`outbox_rows`] writes ([`StoreError::Corrupt`]).
pub(crate) fn pending_row(chat_id: &str, position: i64, key: String, changes: &str) -> Result<Pending, StoreError> {
    let corrupt = || StoreError::corrupt("chat_outbox.changes", changes);
    let bytes = base64::engine::general_purpose::STANDARD.decode(changes).map_err(|_| corrupt())?;
    let request = mpb::RecordChatChangesRequest::decode(bytes.as_slice()).map_err(|_| corrupt())?;
    if request.changes.is_empty() {
        return Err(corrupt());
    }
    Ok(Pending {
        chat_id: parse_id("chat_outbox.chat_id", chat_id)?,
        position,
        key,
        changes: request.changes,
        change_time: request.change_time,
    })
}

/// Everything the chats service keeps: chats, members, chat activity, and
/// the outbox of changes for the messages service. Shared as
/// `Arc<dyn ChatStore>`.
///
/// Every method that changes a chat's membership or details writes, in the
/// same transaction, the outbox entries of what it changed ([`Pending`]:
/// joins, departures, role changes, the chat's details after an update), and
/// nothing when it changed nothing. Entries of one chat take positions in
/// commit order.
///
/// Every method fails only with [`StoreError`]; "not found" is `None`,
/// `false` or [`Checked::NotMember`], never an error.
#[async_trait]
pub trait ChatStore: Send + Sync + 'static {
    /// Inserts `chat` and its `members` in one transaction, with their
    /// joins (in `members` order) in the outbox. A direct chat's pair (its
    /// two members) is unique: a second direct chat of the same pair, or a
    /// chat whose id is taken (by a chat, or by one deleted since: ids are
    /// never reused), is [`Created::Conflict`]; a member recorded by
    /// [`ChatStore::record_forgotten`] is [`Created::Forgotten`]; a block
    /// between a member and the creator ([`blocks_between_refused`], read
    /// in the transaction) is [`Created::Blocked`].
    async fn create_chat(&self, chat: &Chat, members: &[Member]) -> Result<Created, StoreError>;

    /// The chat, with its newest activity.
    async fn chat(&self, id: ChatId) -> Result<Option<Chat>, StoreError>;

    /// The direct chat of `a` and `b` (either order), if any.
    async fn direct_chat(&self, a: UserId, b: UserId) -> Result<Option<Chat>, StoreError>;

    /// The chat and `user`'s role in it, in one read (every send checks it).
    async fn access(&self, chat: ChatId, user: UserId) -> Result<Option<ChatAccess>, StoreError>;

    /// `user`'s role in `chat`, if a member.
    async fn role(&self, chat: ChatId, user: UserId) -> Result<Option<Role>, StoreError>;

    /// Which of `users` are members of `chat` (a message's mentions): one
    /// read for the whole list, in no particular order. A deleted user
    /// ([`ChatStore::record_forgotten`]) is none, though a direct chat with
    /// a person keeps them as a member: no mention of them is stored again
    /// once the messages service has forgotten them.
    async fn members_among(&self, chat: ChatId, users: &[UserId]) -> Result<Vec<UserId>, StoreError>;

    /// Records that `user` is taken out of every chat for good (its account
    /// is deleted), at `now` (µs); a user recorded already stays as it is.
    /// From then on [`ChatStore::create_chat`] and
    /// [`ChatStore::add_members`] refuse it as a member (`Forgotten`).
    ///
    /// Race-free with those two: a membership write committed before this
    /// returns is seen by any read that starts after it (so the caller's
    /// [`ChatStore::member_chat_ids`] that follows finds it), and one that
    /// commits after it sees the record. PostgreSQL: this takes an
    /// exclusive transaction-level advisory lock that membership writes
    /// take shared; SQLite: one writer. The user's privacy settings and blocks
    /// (theirs and of them) go in the same transaction, each direct chat
    /// of a pair that had a block reopened there as [`ChatStore::unblock`]
    /// reopens it (its closure in the outbox).
    async fn record_forgotten(&self, user: UserId, now: i64) -> Result<(), StoreError>;

    /// `user`'s privacy choices; None if they set none (the service's
    /// defaults apply to all).
    async fn privacy_settings(&self, user: UserId) -> Result<Option<StoredPrivacy>, StoreError>;

    /// Stores the choices `update` makes (its Some fields) as `user`'s, the
    /// others kept as they are, with `now` (µs) as their update time, and
    /// returns all of `user`'s choices as stored; None, writing nothing, if
    /// `user` is recorded forgotten (read in the write's transaction as
    /// [`ChatStore::block`] reads it, so an update racing the account's
    /// deletion leaves no row behind). One transaction.
    async fn set_privacy_settings(
        &self,
        user: UserId,
        update: PrivacyChoices,
        now: i64,
    ) -> Result<Option<StoredPrivacy>, StoreError>;

    /// The privacy choices of those of `users` who set any (the rest have
    /// the service's defaults for all), in no set order: one read for the
    /// whole list (the caller bounds it).
    async fn privacy_among(&self, users: &[UserId]) -> Result<Vec<(UserId, PrivacyChoices)>, StoreError>;

    /// Records that `user` blocked `other` at `now` (µs), unless `user`
    /// blocks `limit` users already ([`Blocked::TooMany`]) or either is
    /// recorded forgotten ([`Blocked::Forgotten`], read in the write's
    /// transaction as membership writes read it, so a block racing a
    /// deletion leaves no row behind); blocking someone blocked already
    /// changes nothing. One transaction, which also raises the block
    /// version of the pair's direct chat, if any, under its row lock, with
    /// its closure ([`direct_chat_closed`]) in the outbox.
    async fn block(&self, user: UserId, other: UserId, now: i64, limit: usize) -> Result<Blocked, StoreError>;

    /// Takes `user`'s block of `other` back (none: nothing changes), at
    /// `now` (µs), in one transaction that, when there was a block, raises
    /// the block version of the pair's direct chat, if any, under its row
    /// lock, with its closure as it is then ([`direct_chat_closed`]: still
    /// closed if `other` blocks `user`) in the outbox.
    async fn unblock(&self, user: UserId, other: UserId, now: i64) -> Result<(), StoreError>;

    /// Gives up to `limit` direct chats blocked under an earlier release
    /// (a block, but block version 0: no closure recorded) block version 1
    /// and their closure as their blocks have it then
    /// ([`direct_chat_closed`]) in the outbox, at `now` (µs), each in a
    /// transaction of its own under its row lock; a chat whose blocks
    /// changed meanwhile (its version raised) is left as it is. Answers how
    /// many it found (fewer than `limit`: none is left).
    async fn version_old_blocks(&self, now: i64, limit: u32) -> Result<usize, StoreError>;

    /// Gives up to `limit` chats archived under an earlier release (archived,
    /// but archive version 0: no archived state recorded) archive version 1
    /// and their state ([`chat_archived`], archived) in the outbox, at `now`
    /// (µs), each in a transaction of its own under its row lock; a chat
    /// unarchived or archived again meanwhile (its version raised) is left
    /// as it is. Answers how many it found (fewer than `limit`: none is
    /// left).
    async fn version_old_archives(&self, now: i64, limit: u32) -> Result<usize, StoreError>;

    /// Up to `limit` users `user` blocked, by id, after `after`, each with
    /// its block time (µs).
    async fn blocked_users(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<(UserId, i64)>, StoreError>;

    /// Those of `users` who blocked `user`, each once, in no set order: one
    /// read for the whole list (the caller bounds it).
    async fn blockers_among(&self, user: UserId, users: &[UserId]) -> Result<Vec<UserId>, StoreError>;

    /// Whether one member of `chat` blocked another (for a direct chat:
    /// whether it takes new messages). One read.
    async fn blocks_within(&self, chat: ChatId) -> Result<bool, StoreError>;

    /// Those of `users` who are members of at least `groups` group chats
    /// (public, private, archived: direct chats are not counted), each once,
    /// in no set order: one read for the whole list (the caller bounds it),
    /// which stops counting a user's groups at `groups`.
    async fn users_in_groups(&self, users: &[UserId], groups: usize) -> Result<Vec<UserId>, StoreError>;

    /// Every chat `user` is a member of.
    async fn member_chat_ids(&self, user: UserId, managed_only: bool) -> Result<Vec<ChatId>, StoreError>;

    /// The peers of `user` among `candidates`, `by` the rule of
    /// [`Peers`]: those who are members of at least one chat `user` is a
    /// member of, each once, in no set order (`user` itself if a candidate
    /// and a member of any chat). A deleted user
    /// ([`ChatStore::record_forgotten`]) is no one's peer, though a direct
    /// chat with a person keeps them as a member. One query, whatever the
    /// number of chats either side is in or of blocks either has.
    async fn peers_among(&self, user: UserId, candidates: &[UserId], by: Peers) -> Result<Vec<UserId>, StoreError>;

    /// The users who share a chat with `user` and whom `user` blocked or
    /// who blocked `user`, each once, in no set order: those who must not
    /// hear of `user`'s presence, nor `user` of theirs (the presence of
    /// others reaches only those who share a chat with them, so no one
    /// else matters). One read, bounded by `user`'s peers.
    async fn blocked_peers(&self, user: UserId) -> Result<Vec<UserId>, StoreError>;

    /// Up to `limit` chats by last activity or creation time (then id), as
    /// `filter` orders them, after `after` (a cursor of that order): `user`'s
    /// chats, or the public ones; with `filter.managed_only`, only those
    /// `user` owns or administers. Each comes with `user`'s role in it (None:
    /// a public chat `user` is not in). The order and the filters include
    /// every activity of these chats recorded before the call. The severity
    /// filter is not the store's (it ignores it).
    async fn list_chats(
        &self,
        user: UserId,
        filter: &ChatFilter,
        after: Option<ChatCursor>,
        limit: u32,
    ) -> Result<Vec<ChatAccess>, StoreError>;

    /// Moves chats' activity forward, never back (a lower or equal seq than
    /// the one known is ignored; an unknown chat too). Reads of a chat see it
    /// at once; it is derived data, which an engine may keep in memory for a
    /// while or commit without a sync (the messages service has the truth
    /// and re-announces it after a crash).
    async fn record_activity(&self, activities: &[Activity]) -> Result<(), StoreError>;

    /// Writes any activity still kept in memory (nothing to do where
    /// activity is written through).
    async fn flush_activity(&self) -> Result<(), StoreError>;

    /// Applies `update` and sets the update time to `now`, with the chat's
    /// details after it (masked to the fields `update` changes) in the
    /// outbox; returns the chat, None if there is no such chat. Fields set
    /// to the value they have change nothing: an update that changes no
    /// field (a retry whose answer was lost) writes no update time and no
    /// outbox entry, and answers the chat as it is (a title named, though,
    /// is the person's from then on, as [`ChatStore::untitle_chat`] says).
    /// With `by`, checks
    /// first, in the same transaction under the chat's lock, that this user
    /// may (`may_change`); if not, nothing is written
    /// ([`Checked::Actor`], with their role now).
    async fn update_chat(
        &self,
        id: ChatId,
        update: &ChatUpdate,
        now: i64,
        by: Option<UserId>,
    ) -> Result<Option<Checked<Chat>>, StoreError>;

    /// Sets (Some) or clears (None) a chat's archive time, and the update
    /// time to `now`, with the chat's details (mask "archived") in the
    /// outbox, and raises its archive version with its archived state
    /// ([`chat_archived`]) in an outbox entry of its own after them,
    /// unless the chat was archived (unarchived) already: then nothing
    /// changes. Returns the chat, None if there is no such chat.
    /// `by` is checked as [`ChatStore::update_chat`] checks it.
    async fn set_archived(
        &self,
        id: ChatId,
        archive_time: Option<i64>,
        now: i64,
        by: Option<UserId>,
    ) -> Result<Option<Checked<Chat>>, StoreError>;

    /// Gives chat `id` the (checked) `title` if it has none, in ONE
    /// transaction with its outbox entry (chat_updated, path "title"), at
    /// `now` (µs), recording `source`, the prompt it was made from (None:
    /// none), for [`ChatStore::untitle_chat`]. Answers the chat and whether
    /// it changed; a chat with a title is answered as it is. None: no such
    /// chat.
    async fn title_chat(
        &self,
        id: ChatId,
        title: &str,
        source: Option<MessageId>,
        now: i64,
    ) -> Result<Option<(Chat, bool)>, StoreError>;

    /// Takes back the title [`ChatStore::title_chat`] made from the prompt
    /// `source` (deleted since): chat `id` has no title again, in ONE
    /// transaction with its outbox entry (chat_updated, path "title", an
    /// empty title), at `now` (µs). A title set otherwise, or made from
    /// another prompt, stays (an UpdateChat of the title forgets its
    /// source). Answers the chat if it changed (None: nothing changed, or
    /// no such chat).
    async fn untitle_chat(&self, id: ChatId, source: MessageId, now: i64) -> Result<Option<Chat>, StoreError>;

    /// Deletes a chat and its memberships, with every member's removal in
    /// the outbox, and marks its id deleted at `now` (µs), its messages
    /// still to purge; returns who were its members (empty if there was no
    /// such chat). With `by`, checks first, in the same transaction under
    /// the chat's lock, that this user may delete it (`may_delete`: the
    /// group's owner, a member of a direct chat), since the service's
    /// check may be stale by then (a hand-over, a demotion, a removal
    /// committed in between); if not, nothing is written
    /// ([`Checked::Actor`], with their role now).
    async fn delete_chat(&self, id: ChatId, now: i64, by: Option<UserId>) -> Result<Checked<Vec<UserId>>, StoreError>;

    /// Up to `limit` deleted chats whose messages are still to purge,
    /// deleted longest ago first.
    async fn chats_to_purge(&self, limit: u32) -> Result<Vec<ChatId>, StoreError>;

    /// Records that the messages of deleted chat `id` are purged (at `now`,
    /// µs); a no-op for any other id.
    async fn chat_purged(&self, id: ChatId, now: i64) -> Result<(), StoreError>;

    /// Whether chat `id` is deleted with its messages still to purge (one
    /// of [`ChatStore::chats_to_purge`]); false for a live chat, a purged
    /// one and an id never taken.
    async fn purge_due(&self, id: ChatId) -> Result<bool, StoreError>;

    /// How far the log `name` of another service is followed (0: not yet).
    async fn followed(&self, name: &str) -> Result<i64, StoreError>;

    /// Records that the log `name` is followed up to `position`; a
    /// position below the one recorded changes nothing (two replicas may
    /// follow it at once).
    async fn follow_to(&self, name: &str, position: i64) -> Result<(), StoreError>;

    /// Keeps `item` of log `name` to be tried again (its handling failed
    /// at `now`, µs), due after `backoff.first`; an item kept already is
    /// kept once, due after twice its last wait (at least `backoff.first`:
    /// items kept before waits were, wait 0; at most `backoff.max`), so
    /// that an item that keeps failing costs ever less and goes behind the
    /// others due.
    async fn retry_later(&self, name: &str, item: &str, now: i64, backoff: Backoff) -> Result<(), StoreError>;

    /// Up to `limit` items of log `name` kept by [`ChatStore::retry_later`]
    /// and due at `now` (µs), the longest due first (then in item order):
    /// items that keep failing take turns, however many there are.
    async fn retries(&self, name: &str, now: i64, limit: u32) -> Result<Vec<String>, StoreError>;

    /// Forgets `item` of log `name` (handled at last); a no-op for an item
    /// not kept.
    async fn retried(&self, name: &str, item: &str) -> Result<(), StoreError>;

    /// Adds the `members` (all of chat `chat`) not in it yet, in one
    /// transaction that locks the chat first, unless the chat is gone
    /// ([`Added::ChatGone`]), `by` may not add ([`Added::Refused`]), the
    /// chat would then have more members than `limits` admit
    /// ([`Limits::admits_members`], counted exactly under that lock), or
    /// one of them is recorded by [`ChatStore::record_forgotten`]
    /// ([`Added::Forgotten`]), or one of those it would add blocks the
    /// [`Adder::Manager`] ([`Added::Blocked`], read in the transaction:
    /// [`blocks_between_refused`]). Sets the update time to `now`; the
    /// joins of those added go to the outbox, in request order.
    async fn add_members(
        &self,
        chat: ChatId,
        by: Adder,
        members: &[Member],
        limits: &Limits,
        now: i64,
    ) -> Result<Added, StoreError>;

    /// Removes member `user`, with `removal.departure` in the outbox, in
    /// one transaction that locks the chat first (PostgreSQL: its row, which
    /// every membership change locks first; SQLite: one writer), so that
    /// no role changes before it commits, and checks there, in this
    /// order: that `removal.actor` (if any) is a member with one of its
    /// required roles ([`Checked::Actor`] with their role now), that `user`
    /// is a member ([`Checked::NotMember`]) and that their role is one of
    /// `removal.targets` and not the owner ([`Checked::Target`] with it).
    /// A refusal writes nothing. Sets the update time to `now`, recounts
    /// the members and raises the chat's members version
    /// (`chats.members_version`), which goes to the outbox after the
    /// departure, in an entry of its own ([`members_departed`]); answers
    /// [`Checked::Done`].
    async fn remove_member(
        &self,
        chat: ChatId,
        user: UserId,
        removal: Removal<'_>,
        now: i64,
    ) -> Result<Checked<()>, StoreError>;

    /// Sets member `user`'s role on behalf of `by`, in one transaction that
    /// locks the chat first (as [`ChatStore::remove_member`] does) and
    /// checks there, in this order: that `by` is
    /// still the owner ([`Checked::Actor`] with their role now, None if no
    /// member), that `user` is a member ([`Checked::NotMember`]) and not the
    /// owner ([`Checked::Target`]: the owner's role changes only by a
    /// hand-over). A refusal writes nothing. Making someone owner makes the
    /// current owner an admin and the chat's `owner_id` them. The role
    /// changes go to the outbox: the member's, then the previous owner's.
    /// A change that takes rights away (`loses_rights`: a demotion, a
    /// hand-over) also raises the chat's members version, which goes to the
    /// outbox after them, in an entry of its own ([`members_departed`]).
    /// Answers the member ([`Checked::Done`]).
    async fn set_role(
        &self,
        chat: ChatId,
        by: UserId,
        user: UserId,
        role: Role,
        now: i64,
    ) -> Result<Checked<Member>, StoreError>;

    /// Up to `limit` members of `chat` in join order (then user id), after
    /// `after`.
    async fn members(&self, chat: ChatId, after: Option<MemberCursor>, limit: u32) -> Result<Vec<Member>, StoreError>;

    /// Up to `limit` outbox entries: `chat`'s (None: any chat's), ordered
    /// by chat, then position.
    async fn pending(&self, chat: Option<ChatId>, limit: u32) -> Result<Vec<Pending>, StoreError>;

    /// Removes `entry` from the outbox (recorded, or given up on): the entry
    /// at its chat and position with its key, so that a position taken again
    /// by a later entry (an empty outbox starts again from 1) is left alone;
    /// nothing if it is gone already.
    async fn forget_pending(&self, entry: &Pending) -> Result<(), StoreError>;

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
            let readers = config.pool.max_connections as usize;
            Arc::new(sqlite::SqliteChatStore::open(&path, readers, activity_interval).await?)
        }
        Engine::Postgres { url, schema } => {
            Arc::new(postgres::PostgresChatStore::open(&url, &schema, &config.pool).await?)
        }
    })
}

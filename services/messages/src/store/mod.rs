//! The messages store: one contract ([`MessageStore`]) in the messages
//! domain's own types, one implementation native to each engine
//! ([`sqlite`] on rusqlite, [`postgres`] on sqlx's Postgres driver) and one
//! conformance suite run against both (`tests.rs`).
//!
//! What both engines share lives here: the domain types that cross the
//! trait, the message column list, the seq bounds of a history page and the
//! capped unread count. Everything engine-specific (how a batch takes its
//! seqs, how a page of summaries is read) lives in the engine's file.
//!
//! Adding a column to `messages` touches: a new migration, [`Message`] (and
//! [`NewMessage`] if a send sets it), `message_columns!`, and the row mapper
//! and insert of each engine file.

use std::collections::HashMap;
use std::sync::Arc;

use natter_db::{Backfilled, DbConfig, DbError, Engine, Migrated};
use natter_kit::id::{ChatId, MessageId, UserId};

use crate::domain::Attachment;

pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod tests;

/// Most rows [`MessageStore::recent_activity`] reads: a bound on start-up
/// time (about a second) whatever the rate of sends before a crash.
pub const RECENT_ACTIVITY_ROWS: usize = 1_000_000;

/// The most an unread count counts: [`UNREAD_COUNT_CAP`] as a literal for
/// the SQL (`concat!`).
macro_rules! unread_count_cap {
    () => {
        1000
    };
}
pub(crate) use unread_count_cap;

/// The most an unread count counts: a count of this value means at least
/// this many (a client shows "999+"). Counting walks the chat's index from
/// the read position, so an uncapped count cost O(unread) on every ListChats
/// entry, GetChat and MarkRead: a member a million messages behind made each
/// of them a million-entry walk.
pub const UNREAD_COUNT_CAP: i64 = unread_count_cap!();

/// The capped unread count as one SQL expression, the same text on both
/// engines: the messages of chat `$chat` after seq `$read` that are not by
/// user `$user`, not deleted and not superseded (a reloaded reply: the
/// history shows only its replacement), counted up to [`UNREAD_COUNT_CAP`]. The
/// arguments are SQL (placeholders or column references) as literals.
macro_rules! unread_count_sql {
    ($chat:literal, $read:literal, $user:literal) => {
        concat!(
            "(SELECT COUNT(*) FROM (SELECT 1 FROM messages u WHERE u.chat_id = ",
            $chat,
            " AND u.seq > ",
            $read,
            " AND u.author_id <> ",
            $user,
            " AND u.delete_time IS NULL AND u.superseded = 0 LIMIT ",
            $crate::store::unread_count_cap!(),
            ") c)"
        )
    };
}
pub(crate) use unread_count_sql;

/// The capped mention count as one SQL expression, the same text on both
/// engines: the rows of `message_mentions` of user `$user` in chat `$chat`
/// after seq `$read`, counted up to [`UNREAD_COUNT_CAP`]. The rows hold
/// only live messages' mentions of members other than the author, so this
/// is the count of unread messages that mention the user: never more than
/// the unread count. A walk of the table's primary key from the read
/// position (one probe for a user never mentioned).
macro_rules! mention_count_sql {
    ($chat:literal, $read:literal, $user:literal) => {
        concat!(
            "(SELECT COUNT(*) FROM (SELECT 1 FROM message_mentions n WHERE n.chat_id = ",
            $chat,
            " AND n.user_id = ",
            $user,
            " AND n.seq > ",
            $read,
            " LIMIT ",
            $crate::store::unread_count_cap!(),
            ") c)"
        )
    };
}
pub(crate) use mention_count_sql;

/// The assignments (for both engines) that end a GENERATING reply as
/// [`Generation::Stopped`] with its stop flag set, and leave any other
/// message as it is: deleting a reply while it is written ends its
/// generation in the same transaction, so the generator's next checkpoint
/// finds it finished, stops, and writes no text into the tombstone.
macro_rules! stop_generating_sql {
    () => {
        "generation = CASE generation WHEN 1 THEN 3 ELSE generation END, \
         stop_requested = CASE generation WHEN 1 THEN 1 ELSE stop_requested END, \
         checkpoint_time = NULL"
    };
}
pub(crate) use stop_generating_sql;

/// The condition (for both engines) of a chat's pinned messages: pinned,
/// and not deleted (see [`Pin::of_columns`]), so that a tombstone a release
/// before pins left pinned is neither listed nor counted against the limit.
macro_rules! pinned_sql {
    () => {
        "pin_time IS NOT NULL AND delete_time IS NULL"
    };
}
pub(crate) use pinned_sql;

/// The columns of a message, in the order both engines' row mappers read
/// them.
macro_rules! message_columns {
    () => {
        "id, chat_id, seq, author_id, text, attachments, reply_to_seq, send_time, edit_time, revision, delete_time, \
         change_seq, create_change, role, generation, replaces_id, superseded, generation_info, stop_requested, \
         flag_severity, flags, reaction_rows, mentions, thread_root_seq, reply_count, last_reply_time, \
         thread_participants, pin_time, pinned_by, deleted_by"
    };
}
pub(crate) use message_columns;

/// How many columns [`message_columns!`] names: the index of the first
/// column a query selects after them.
pub(crate) const MESSAGE_COLUMNS: usize = 30;

/// `flag_severity` of a flagged message: LOW or more.
pub const FLAGGED_FROM: i32 = 2;

/// The prompt-injection detector's verdict on a message's text, as stored
/// (`flag_severity`, and `flags` as JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Flags {
    /// natter.messages.v1.Severity: 1 none, 2 low, 3 medium, 4 high, 5
    /// critical (0: not scanned).
    #[serde(skip)]
    pub severity: i32,
    /// The score in thousandths (0..=1000).
    #[serde(default)]
    pub score_millis: u16,
    #[serde(default)]
    pub categories: Vec<String>,
    #[serde(default)]
    pub detector: String,
}

impl Flags {
    /// A verdict: `severity` as natter.messages.v1.Severity numbers it,
    /// `score` in 0..=1 (kept in thousandths).
    pub fn of_score(severity: i32, score: f32, categories: Vec<String>, detector: impl Into<String>) -> Self {
        Flags {
            severity,
            score_millis: (score.clamp(0.0, 1.0) * 1000.0).round() as u16,
            categories,
            detector: detector.into(),
        }
    }

    /// natter.messages.v1.Severity of a natter-detect severity (NONE is 1).
    pub fn severity_of(severity: natter_detect::Severity) -> i32 {
        severity as i32 + 1
    }

    /// True from LOW up.
    pub fn flagged(&self) -> bool {
        self.severity >= FLAGGED_FROM
    }

    /// The flags of the stored columns (None: not scanned).
    pub(crate) fn of_columns(severity: i64, json: &str) -> Option<Box<Flags>> {
        if severity <= 0 {
            return None;
        }
        let mut flags: Flags = serde_json::from_str(json).unwrap_or_default();
        flags.severity = i32::try_from(severity).unwrap_or(0);
        Some(Box::new(flags))
    }

    /// The stored columns of `flags` (0 and '' for none).
    pub(crate) fn columns(flags: Option<&Flags>) -> (i32, String) {
        match flags {
            Some(f) => (f.severity, serde_json::to_string(f).expect("flags serialize")),
            None => (0, String::new()),
        }
    }
}

/// Who a message speaks for (`messages.role`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Role {
    /// A person (every message sent with SendMessage).
    #[default]
    User = 1,
    /// An assistant's generated reply.
    Assistant = 2,
}

impl Role {
    /// The role of a stored `role` value (anything unknown reads as a
    /// person's).
    pub fn of(value: i64) -> Self {
        if value == Self::Assistant as i64 { Self::Assistant } else { Self::User }
    }
}

/// Where an assistant's reply stands (`messages.generation`; 0 for every
/// message that is no reply). The numbers are natter.messages.v1's
/// GenerationStatus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Generation {
    /// Being written; the text is a checkpoint.
    Generating = 1,
    Complete = 2,
    Stopped = 3,
    Failed = 4,
    Interrupted = 5,
}

impl Generation {
    /// The status of a stored `generation` value (None: no reply, or a
    /// value this build does not know).
    pub fn of(value: i64) -> Option<Self> {
        Some(match value {
            1 => Self::Generating,
            2 => Self::Complete,
            3 => Self::Stopped,
            4 => Self::Failed,
            5 => Self::Interrupted,
            _ => return None,
        })
    }

    /// True for every status but [`Generation::Generating`].
    pub fn finished(self) -> bool {
        self != Self::Generating
    }
}

/// How a finished reply was generated (`messages.generation_info`, JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GenerationInfo {
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub finish_reason: String,
    #[serde(default)]
    pub prompt_tokens: i32,
    #[serde(default)]
    pub completion_tokens: i32,
    /// Why it failed, for people.
    #[serde(default)]
    pub error: String,
}

impl GenerationInfo {
    /// The stored JSON ('' for none).
    pub(crate) fn encode(info: Option<&GenerationInfo>) -> String {
        info.map(|i| serde_json::to_string(i).expect("generation info serializes")).unwrap_or_default()
    }

    /// The stored JSON's info (None for '' or what does not parse).
    fn decode(json: &str) -> Option<GenerationInfo> {
        if json.is_empty() { None } else { serde_json::from_str(json).ok() }
    }
}
/// A message's position in its chat: 1, 2, 3 ... without gaps; 0 stands for
/// "before the first message".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(pub i64);

impl Seq {
    /// Before the first message.
    pub const ZERO: Seq = Seq(0);

    /// The number.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl std::fmt::Display for Seq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A stored message. Times are µs since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: MessageId,
    pub chat_id: ChatId,
    pub seq: Seq,
    pub author_id: UserId,
    /// Empty once deleted.
    pub text: String,
    /// Empty once deleted.
    pub attachments: Vec<Attachment>,
    /// The message this one answers, if any.
    pub reply_to: Option<Seq>,
    pub send_time: i64,
    /// When the text was last replaced (None: never edited).
    pub edit_time: Option<i64>,
    /// 1 for the text as sent, +1 per edit.
    pub revision: i64,
    /// Set once the message is a tombstone.
    pub delete_time: Option<i64>,
    /// The chat's change number of the message's latest change (created,
    /// edited, deleted).
    pub change_seq: i64,
    /// The chat's change number of the message's creation.
    pub create_change: i64,
    /// Set for an assistant's reply ([`Role::Assistant`]); boxed, as most
    /// messages are no reply.
    pub reply: Option<Box<Reply>>,
    /// The injection detector's verdict (None: not scanned, or deleted).
    pub flags: Option<Box<Flags>>,
    /// Its reactions, one per distinct emoji, oldest first. Not a column:
    /// empty as rows are read, filled for a viewer where messages leave the
    /// service ([`MessageStore::reactions`]).
    pub reactions: Vec<Reaction>,
    /// How many reaction rows it has (0: [`MessageStore::reactions`] need
    /// not be asked about it).
    pub reaction_rows: i64,
    /// The users it mentions, as sent (empty once deleted): the `mentions`
    /// column, read with the row.
    pub mentions: Vec<UserId>,
    /// The root of the thread it replies in (None: in no thread).
    pub thread_root: Option<Seq>,
    /// Its thread's summary, for a root that has had a reply (None for
    /// every other message): columns of the row, kept by each reply's
    /// transaction and each reply's deletion.
    pub thread: Option<Box<ThreadSummary>>,
    /// Its pin to the chat, if pinned (`pin_time`, `pinned_by`).
    pub pin: Option<Pin>,
    /// Who deleted it (`deleted_by`: the caller of the DeleteMessage that
    /// made the tombstone; None: not deleted, or deleted before the column
    /// was). Only for answering that user's retry; never shown to anyone.
    pub deleted_by: Option<UserId>,
}

/// A message's pin (PinMessage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pin {
    /// When, µs since the Unix epoch.
    pub time: i64,
    /// Who pinned it.
    pub by: UserId,
}

impl Pin {
    /// The pin of the columns `pin_time` and `pinned_by` (both NULL: none)
    /// of a message deleted (`delete_time` set) or not. A deleted message
    /// has none: a release before pins deleted without clearing the columns
    /// it did not know (in a rolling upgrade, or after a rollback).
    ///
    /// Errors: one set without the other, or a pinner that is no UUID.
    pub fn of_columns(time: Option<i64>, by: Option<&str>, deleted: bool) -> Result<Option<Self>, String> {
        match (time, by) {
            _ if deleted => Ok(None),
            (None, None) => Ok(None),
            (Some(time), Some(by)) => Ok(Some(Pin { time, by: parse_id("pinned_by", by)? })),
            _ => Err("pin_time and pinned_by must be set together".to_owned()),
        }
    }
}

/// A thread's summary, kept on its root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadSummary {
    /// Replies not deleted.
    pub replies: i64,
    /// When the newest reply was sent, µs since the Unix epoch (a deletion
    /// does not move it back).
    pub last_reply_time: i64,
    /// The distinct authors of its replies, the latest replier first, at
    /// most [`THREAD_PARTICIPANTS_MAX`] (a deletion takes no one off).
    pub participants: Vec<UserId>,
}

/// Most participants a thread's summary lists: a root's row, and every
/// event that carries it, stay small however many people reply.
pub const THREAD_PARTICIPANTS_MAX: usize = 10;

impl ThreadSummary {
    /// The summary of a row's thread columns (`reply_count,
    /// last_reply_time, thread_participants`): None for a message that has
    /// never had a reply.
    ///
    /// Errors: a participant that is no UUID (a corrupt row).
    pub(crate) fn of_columns(
        replies: i64,
        last_reply_time: Option<i64>,
        participants: &str,
    ) -> Result<Option<Box<ThreadSummary>>, String> {
        let Some(last_reply_time) = last_reply_time else { return Ok(None) };
        let participants = decode_mentions(participants)?;
        Ok(Some(Box::new(ThreadSummary { replies, last_reply_time, participants })))
    }
}

/// The replies a batch adds to one thread's root, in the batch's order, to
/// fold into the root's summary columns in the batch's transaction.
#[derive(Clone, Debug, Default)]
pub(crate) struct ThreadBump {
    /// The root's `thread_participants` as stored, then with each reply's
    /// author moved to the front.
    pub participants: Vec<UserId>,
    /// Replies added.
    pub replies: i64,
    /// The newest reply's send time (µs).
    pub last_reply_time: i64,
}

impl ThreadBump {
    /// A bump of a root whose `thread_participants` column is `stored`.
    pub(crate) fn of_stored(stored: &str) -> Result<Self, String> {
        Ok(Self { participants: decode_mentions(stored)?, ..Self::default() })
    }

    /// Counts one reply by `author` sent at `send_time`.
    pub(crate) fn add(&mut self, author: UserId, send_time: i64) {
        self.participants.retain(|p| *p != author);
        self.participants.insert(0, author);
        self.participants.truncate(THREAD_PARTICIPANTS_MAX);
        self.replies += 1;
        self.last_reply_time = self.last_reply_time.max(send_time);
    }
}

/// The root of the thread a send joins when its `thread_root_seq` names
/// seq `named`, whose row's own `thread_root_seq` is `row_root`: `named`
/// itself when it is in no thread, else its root (a root is never in a
/// thread itself, so one step is enough). See [`NewMessage::thread_root`].
pub(crate) fn thread_root_of(named: Seq, row_root: i64) -> Seq {
    if row_root > 0 { Seq(row_root) } else { named }
}

/// The reactions of one emoji on a message, for one viewer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reaction {
    pub emoji: String,
    /// Users who reacted with it (at least 1).
    pub count: i64,
    /// The viewer is one of them.
    pub mine: bool,
}

/// Outcome of [`MessageStore::pin`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pinned {
    /// Committed as a change of the chat (its next change number is the
    /// message's `change_seq`); the message as it is now.
    Changed(Message),
    /// Pinned already (pinning) or not pinned (unpinning): nothing written,
    /// no change number taken; the message as it is.
    Unchanged(Message),
    /// No such message, or a tombstone.
    Gone,
    /// The chat holds as many pins as allowed; nothing written.
    TooMany,
    /// A member left the chat or was removed, or someone lost rights (a
    /// demotion, a hand-over), after the caller's membership check (see
    /// [`Sent::Stale`]); nothing written, no change number taken. Check
    /// again, afresh, and pin again.
    Stale,
    /// A pin in a direct chat closed by a block
    /// ([`MessageStore::close_direct_chat`]), as read in the write (an
    /// unpin is never refused so); nothing written, no change number taken.
    Closed,
    /// A pin in an archived chat ([`MessageStore::archive_chat`]), as read
    /// in the write (an unpin is not refused so: see
    /// [`MessageStore::pin`]); nothing written, no change number taken.
    Archived,
}

/// Outcome of [`MessageStore::react`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reacted {
    /// Committed as a change of the chat (its next change number is the
    /// message's `change_seq`); the message as it is now, with its
    /// reactions as the reacting user sees them.
    Changed(Message),
    /// The user already had (adding) or did not have (removing) that
    /// reaction: nothing written, no change number taken; the message as it
    /// is, with its reactions.
    Unchanged(Message),
    /// No such message, or a tombstone.
    Gone,
    /// Adding another distinct emoji would pass the limit; nothing written.
    TooManyEmoji,
    /// A member left the chat or was removed, or someone lost rights,
    /// after the caller's membership check (see [`Sent::Stale`]); nothing
    /// written, no change number taken. Check again, afresh, and react
    /// again.
    Stale,
    /// A reaction added in a direct chat closed by a block
    /// ([`MessageStore::close_direct_chat`]), as read in the write (taking
    /// one back is never refused so); nothing written, no change number
    /// taken.
    Closed,
    /// A reaction added in an archived chat
    /// ([`MessageStore::archive_chat`]), as read in the write (taking one
    /// back is not refused so: see [`MessageStore::react`]); nothing
    /// written, no change number taken.
    Archived,
}

/// What an assistant's reply has besides a message's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub generation: Generation,
    /// The reply this one replaced.
    pub replaces: Option<MessageId>,
    /// Replaced by a newer reply: hidden from history unless asked for.
    pub superseded: bool,
    /// A finished reply's details.
    pub info: Option<GenerationInfo>,
    /// A stop was asked for while it was GENERATING.
    pub stop_requested: bool,
}

impl Reply {
    /// The reply of a row's reply columns (`role, generation, replaces_id,
    /// superseded, generation_info, stop_requested`): None unless the role
    /// is [`Role::Assistant`].
    fn of_columns(
        role: i64,
        generation: i64,
        replaces: Option<&str>,
        superseded: bool,
        info: &str,
        stop_requested: bool,
    ) -> Result<Option<Box<Reply>>, String> {
        if Role::of(role) != Role::Assistant {
            return Ok(None);
        }
        Ok(Some(Box::new(Reply {
            // A status this build does not know reads as the end of it.
            generation: Generation::of(generation).unwrap_or(Generation::Interrupted),
            replaces: replaces.map(|r| parse_id("replaces_id", r)).transpose()?,
            superseded,
            info: GenerationInfo::decode(info),
            stop_requested,
        })))
    }
}

impl Message {
    /// [`Role::Assistant`] for a reply.
    pub fn role(&self) -> Role {
        if self.reply.is_some() { Role::Assistant } else { Role::User }
    }

    /// A reply's status (None for every other message).
    pub fn generation(&self) -> Option<Generation> {
        self.reply.as_ref().map(|r| r.generation)
    }

    /// True for a superseded reply.
    pub fn superseded(&self) -> bool {
        self.reply.as_ref().is_some_and(|r| r.superseded)
    }

    /// The reply a reply replaced.
    pub fn replaces(&self) -> Option<MessageId> {
        self.reply.as_ref().and_then(|r| r.replaces)
    }
}

impl Message {
    /// True for a tombstone.
    pub fn deleted(&self) -> bool {
        self.delete_time.is_some()
    }

    /// Roughly the bytes it takes in memory and in a response: its text,
    /// attachments and mentions, and the fields around them.
    pub fn weight(&self) -> usize {
        let attachments: usize = self.attachments.iter().map(|a| 32 + a.url.len() + a.mime_type.len()).sum();
        256 + self.text.len() + attachments + 40 * self.mentions.len()
    }
}

/// A message to insert; the store assigns its seq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub id: MessageId,
    pub chat_id: ChatId,
    pub author_id: UserId,
    pub text: String,
    pub attachments: Vec<Attachment>,
    /// Must name a message of the chat stored before this message's batch.
    pub reply_to: Option<Seq>,
    /// µs since the Unix epoch.
    pub send_time: i64,
    /// The injection detector's verdict on `text` (None: not scanned).
    pub flags: Option<Flags>,
    /// The users it mentions (members of the chat, no duplicates, at most
    /// [`crate::domain::MENTIONS_MAX`]); each but the author gets a row of
    /// `message_mentions` in the message's transaction.
    pub mentions: Vec<UserId>,
    /// The thread it replies in, as asked: the seq of a live message of the
    /// chat stored before this message's batch; a seq naming a thread reply
    /// stands for that reply's root. The root's summary is updated in the
    /// batch's transaction (one change of the root per batch).
    pub thread_root: Option<Seq>,
    /// The chat's members version its membership check saw
    /// (CheckMembership's `members_version`): the write refuses it
    /// ([`Sent::Stale`]) when a later departure is recorded
    /// ([`MessageStore::record_departure`]).
    pub members_version: i64,
}

impl NewMessage {
    /// The users whose mention counts this message raises: its mentions but
    /// the author.
    pub(crate) fn counted_mentions(&self) -> impl Iterator<Item = &UserId> {
        self.mentions.iter().filter(move |u| **u != self.author_id)
    }

    /// The message this becomes with `seq`, created as change `change`.
    pub fn into_message(self, seq: Seq, change: i64) -> Message {
        Message {
            id: self.id,
            chat_id: self.chat_id,
            seq,
            author_id: self.author_id,
            text: self.text,
            attachments: self.attachments,
            reply_to: self.reply_to,
            send_time: self.send_time,
            edit_time: None,
            revision: 1,
            delete_time: None,
            change_seq: change,
            create_change: change,
            reply: None,
            flags: self.flags.map(Box::new),
            reactions: Vec::new(),
            reaction_rows: 0,
            mentions: self.mentions,
            thread_root: self.thread_root,
            thread: None,
            pin: None,
            deleted_by: None,
        }
    }
}

/// The `mentions` column of user ids: separated by single spaces, '' for
/// none.
pub(crate) fn encode_mentions(mentions: &[UserId]) -> String {
    let ids: Vec<String> = mentions.iter().map(UserId::to_string).collect();
    ids.join(" ")
}

/// The user ids of a `mentions` column.
///
/// Errors: a part that is no UUID (a corrupt row).
pub(crate) fn decode_mentions(column: &str) -> Result<Vec<UserId>, String> {
    column.split_whitespace().map(|u| parse_id("mentions", u)).collect()
}

/// A GENERATING reply's checkpoint ([`MessageStore::checkpoint_replies`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub id: MessageId,
    /// The whole text so far; None renews only the lease (the heartbeat).
    pub text: Option<String>,
}

/// An assistant's reply to start ([`MessageStore::start_reply`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewReply {
    pub id: MessageId,
    pub chat_id: ChatId,
    /// The assistant.
    pub author_id: UserId,
    /// The message it answers (its seq becomes the reply's reply_to).
    pub prompt: MessageId,
    /// The reply it replaces, superseded in the same transaction.
    pub replaces: Option<MessageId>,
    /// µs since the Unix epoch: the send time. (A reply still generating
    /// gets its first checkpoint on the store's clock,
    /// [`MessageStore::clock`], as every later one.)
    pub now: i64,
    /// Created finished (a refusal) with this status, text and info,
    /// instead of GENERATING.
    pub finished: Option<(Generation, String, GenerationInfo)>,
    /// The starting generator's token (StartReplyRequest.owner, 128 bytes
    /// at most), stored with the reply: a start of the same id with the
    /// same owner while the reply is GENERATING is [`Started::Resumed`].
    /// None never matches.
    pub owner: Option<String>,
    /// The chat's members version the caller's membership checks saw
    /// (StartReplyRequest.members_version: the lowest of the assistant's
    /// and the prompt author's CheckMembership `members_version`): the
    /// start is refused ([`Started::Stale`]) when a later departure, loss
    /// of rights or the chat's purge is recorded
    /// ([`MessageStore::record_departure`], [`DELETED_MEMBERS_VERSION`]),
    /// as a send's write refuses one ([`NewMessage::members_version`]).
    /// None (a caller of an earlier release, which sends none) compares
    /// nothing.
    pub members_version: Option<i64>,
}

/// Outcome of [`MessageStore::delete_with_replies`].
#[expect(
    clippy::large_enum_variant,
    reason = "an outcome lives on the stack for one call; boxing its message would cost an allocation per deletion"
)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deletion {
    /// The message after the call and the replies it deleted.
    Done(Deleted),
    /// No such message.
    NotFound,
    /// A member left the chat or was removed, or someone lost rights,
    /// after the caller's membership check (see [`Sent::Stale`]); nothing
    /// written (neither the message nor any reply), no change number taken.
    /// Check again, afresh, and delete again.
    Stale,
}

/// What [`MessageStore::delete_with_replies`] deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deleted {
    /// The message after the call: a tombstone.
    pub message: Message,
    /// Its assistant's replies this call deleted, in seq order (tombstones,
    /// each with its own change number, below the message's when the
    /// message was deleted by this call too).
    pub replies: Vec<Message>,
}

/// Outcome of [`MessageStore::start_reply`].
#[expect(
    clippy::large_enum_variant,
    reason = "an outcome lives on the stack for one call; boxing its message would cost an allocation per send"
)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Started {
    /// Committed: the reply, and the reply it superseded.
    Created(Message, Option<Message>),
    /// A message with the reply's id exists already (nothing written).
    Exists(Message),
    /// The reply exists, still GENERATING, started with this start's
    /// [owner](NewReply::owner): the caller's own start, whose answer it
    /// lost. Nothing written but its checkpoint time, renewed on the
    /// store's clock (the lease its caller now holds).
    Resumed(Message),
    /// The prompt is no message of the chat.
    NoSuchPrompt,
    /// The prompt is deleted: nothing answers it any more.
    PromptDeleted,
    /// The replaced message is no reply of the chat.
    NotAReply,
    /// Another reply of the chat is GENERATING (its id): one at a time per
    /// chat, whichever assistant replica starts it. Nothing written.
    Busy(MessageId),
    /// A member left the chat or was removed (the assistant itself, or the
    /// prompt's author), someone lost rights, or the chat was deleted,
    /// after the caller's membership checks ([`NewReply::members_version`]
    /// is below the version recorded, as read where the start takes its
    /// seq); nothing written, no seq taken. Check again, afresh, and start
    /// again.
    Stale,
    /// The chat is archived ([`MessageStore::archive_chat`]), as read where
    /// the start takes its seq: like a send, a reply (a refusal created
    /// finished included) is refused there. Nothing written. Read after
    /// [`Started::Stale`] and before [`Started::Closed`], as a send's
    /// write reads them.
    Archived,
    /// The chat is a direct chat closed by a block
    /// ([`MessageStore::close_direct_chat`]), as read where the start takes
    /// its seq: it takes no new messages, replies included. Nothing
    /// written.
    Closed,
}

/// A member's report of a message (`message_reports`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredReport {
    pub message_id: MessageId,
    pub reporter: UserId,
    pub chat_id: ChatId,
    /// natter.messages.v1.ReportReason.
    pub reason: i32,
    pub comment: String,
    /// µs since the Unix epoch.
    pub create_time: i64,
    /// None while open.
    pub resolve_time: Option<i64>,
}

/// The columns of a report, in the order both engines' row mappers read
/// them.
macro_rules! report_columns {
    () => {
        "message_id, reporter_id, chat_id, reason, comment, create_time, resolve_time"
    };
}
pub(crate) use report_columns;

/// Where a page of the moderation queue goes on: after this (send time,
/// message id), newest first.
pub type QueueCursor = (i64, MessageId);

/// Where a page of search results goes on: after the result with this
/// rank and position. `position` is the order messages were stored in
/// (SQLite's rowid, PostgreSQL's `search_position`), highest first;
/// `rank` is the engine's own relevance score (FTS5's bm25, lower is
/// better; PostgreSQL's ts_rank, higher is better), 0 when ordered newest
/// first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SearchCursor {
    pub rank: f64,
    pub position: i64,
}

/// Matches one newest-first search call steps through at most (see
/// [`MessageStore::search`]): on SQLite about 20 ms of a reader.
pub const SEARCH_SCAN: usize = 20_000;

/// Matches a best-match-first search ranks at most (see
/// [`MessageStore::search`]): on SQLite ranking 10,000 took 35 ms
/// (BENCHMARKS.md, "Full-text search").
pub const SEARCH_RANK_MAX: usize = 50_000;

/// What one [`MessageStore::search`] call found.
#[derive(Clone, Debug, Default)]
pub struct SearchPage {
    pub hits: Vec<SearchHit>,
    /// The call stopped at its share of work ([`SEARCH_SCAN`]) with fewer
    /// hits than asked: the next page goes on from here.
    pub scanned_to: Option<SearchCursor>,
    /// Best match first, the query matches more than [`SEARCH_RANK_MAX`]
    /// messages: nothing was ranked.
    pub too_broad: bool,
}

/// What [`MessageStore::search`] looks for.
#[derive(Clone, Debug)]
pub struct SearchFilter<'a> {
    pub query: &'a crate::search::Query,
    /// The chats searched (the caller's): never empty.
    pub chats: &'a [ChatId],
    /// Best match first (then newest), rather than newest first.
    pub relevance: bool,
}

/// A message a search found, and where the next page starts if it ends here.
#[derive(Clone, Debug)]
pub struct SearchHit {
    pub message: Message,
    pub cursor: SearchCursor,
}

/// Which messages the moderation queue lists ([`MessageStore::flagged`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueFilter {
    /// Of these chats (None: of every chat; empty: of none).
    pub chats: Option<Vec<ChatId>>,
    /// Flagged from this severity up (messages with open reports whatever
    /// their severity).
    pub min_severity: i32,
    /// Sent at or after this time (µs since the Unix epoch).
    pub sent_after: Option<i64>,
    /// Sent before this time (µs): with `sent_after`, the half-open range
    /// `[sent_after, sent_before)`.
    pub sent_before: Option<i64>,
}

/// How a reply ends ([`MessageStore::finish_reply`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finish {
    pub text: String,
    /// Any status but [`Generation::Generating`].
    pub status: Generation,
    pub info: GenerationInfo,
    /// Flags for the reply itself (a leaked system prompt's canary).
    pub flags: Option<Flags>,
    /// With [`Generation::Failed`]: un-supersede the reply it replaced.
    pub restore_replaced: bool,
    /// The sweeper's condition (µs): finish only if the reply's checkpoint
    /// is older than this, keeping its stored text instead of `text`.
    pub stale_before: Option<i64>,
    /// The chat's members version the check that the reply's author may
    /// still write in its chat saw (CheckMembership's `members_version`;
    /// [`Messages::finish_reply`](crate::service::Messages::finish_reply)
    /// checks a COMPLETE finish). Read where the finish takes its change
    /// number, as a send's write reads it: a departure, a loss of rights or
    /// the chat's purge recorded above it refuses the finish
    /// ([`Finishing::Stale`]: check again, afresh); a direct chat closed by
    /// a block ([`MessageStore::close_direct_chat`]) stores the reply
    /// [`Generation::Stopped`] instead of `status`, as a checkpoint after
    /// the block would have ended it. None (no check made) reads neither.
    pub members_version: Option<i64>,
}

impl Finish {
    /// The status this finish stores in a chat whose heads read `heads`
    /// where it takes its change number (see [`Finish::members_version`]):
    /// None when stale, [`Generation::Stopped`] in a direct chat closed by
    /// a block, else [`Finish::status`]; always the latter without a
    /// members version.
    pub(crate) fn status_under(&self, heads: HeadsState) -> Option<Generation> {
        let Some(checked) = self.members_version else { return Some(self.status) };
        if heads.refusal(checked, false) == Some(Refusal::Stale) {
            None
        } else if heads.closed {
            Some(Generation::Stopped)
        } else {
            Some(self.status)
        }
    }
}

/// Outcome of [`MessageStore::finish_reply`].
#[expect(
    clippy::large_enum_variant,
    reason = "an outcome lives on the stack for one call; boxing its reply would cost an allocation per finish"
)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finishing {
    /// Finished by this call, or answered as it is.
    Done(Finished),
    /// No such message.
    NotFound,
    /// The reply is GENERATING, and a member left the chat or was removed,
    /// someone lost rights, or the chat was purged, after the check of its
    /// author ([`Finish::members_version`] is below the version recorded,
    /// as read where the finish takes its change number); nothing written,
    /// no change number taken. Check again, afresh, and finish again.
    Stale,
}

/// A reply as [`MessageStore::finish_reply`] leaves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    /// The reply as it is now (as it was, if it was finished already).
    pub reply: Message,
    /// True when this call finished it (a change was made).
    pub changed: bool,
    /// The reply it replaced, when this call un-superseded it.
    pub restored: Option<Message>,
}

/// Outcome of inserting one message of a batch.
#[expect(
    clippy::large_enum_variant,
    reason = "an outcome lives on the stack for one call; boxing its message would cost an allocation per send"
)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sent {
    /// Committed as this message.
    Created(Message),
    /// A message with this id exists already (a retry, or the id is used
    /// earlier in the batch); nothing was written and no seq taken.
    Duplicate,
    /// `reply_to` names no message of the chat stored before the batch;
    /// nothing was written and no seq taken.
    NoSuchReply,
    /// `thread_root` names no message of the chat stored before the batch;
    /// nothing was written and no seq taken.
    NoSuchThreadRoot,
    /// `thread_root` names a deleted message, or a reply of a thread whose
    /// root is deleted; nothing was written and no seq taken.
    ThreadRootDeleted,
    /// The chat is a direct chat closed by a block
    /// ([`MessageStore::close_direct_chat`]), as read in the batch's write;
    /// nothing was written and no seq taken.
    Closed,
    /// The chat is archived ([`MessageStore::archive_chat`]), as read in
    /// the batch's write; nothing was written and no seq taken.
    Archived,
    /// A member left the chat or was removed after the membership check of
    /// this message, or of another of the batch's messages to its chat
    /// (their lowest [`NewMessage::members_version`] is below the version
    /// [`MessageStore::record_departure`] recorded, as read in the batch's
    /// write); nothing was written and no seq taken. Check again, afresh,
    /// and send again.
    Stale,
}

/// Outcome of an edit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edited {
    /// Committed; the message as it is now.
    Done(Message),
    /// The message has that text already (a retried edit): nothing
    /// written, no revision, no change number; the message as it is.
    Unchanged(Message),
    /// The message is deleted (or missing).
    Deleted,
    /// The message was edited as often as allowed; nothing changed.
    TooManyEdits,
    /// A member left the chat or was removed, or someone lost rights,
    /// after the caller's membership check (see [`Sent::Stale`]); nothing
    /// written, no revision, no change number taken. Check again, afresh,
    /// and edit again.
    Stale,
    /// The message's chat is a direct chat closed by a block
    /// ([`MessageStore::close_direct_chat`]), as read in the write: nothing
    /// written, no revision, no change number taken.
    Closed,
    /// The message's chat is archived ([`MessageStore::archive_chat`]), as
    /// read in the write: nothing written, no revision, no change number
    /// taken.
    Archived,
}

/// An earlier text of an edited message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    pub message_id: MessageId,
    /// 1 for the text as sent.
    pub revision: i64,
    pub text: String,
    /// When this text was written (send or edit), µs since the Unix epoch.
    pub edit_time: i64,
}

/// Range and order of a history listing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    /// Only seq < before.
    pub before: Option<Seq>,
    /// Only seq > after.
    pub after: Option<Seq>,
    /// Oldest first (else newest first).
    pub ascending: bool,
    /// List superseded replies too (else their seqs are skipped).
    pub superseded: bool,
    /// Only flagged messages.
    pub flagged: bool,
    /// Only pinned messages, superseded replies too (whatever
    /// `superseded` says).
    pub pinned: bool,
    /// Which messages, as to threads.
    pub timeline: Timeline,
}

/// Which messages a history listing holds, as to threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Timeline {
    /// Every message, thread replies too.
    #[default]
    Everything,
    /// The main timeline: thread replies left out. The chat's `(chat_id,
    /// seq)` key is walked and thread replies skipped, so a page costs
    /// its messages plus the thread replies among them (no index entry
    /// of its own: a send outside threads writes none).
    Main,
    /// The replies of the thread with this root (not the root), through
    /// the `messages_thread` key.
    Thread(Seq),
}

/// Outcome of [`MessageStore::mark_read`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marked {
    /// The position after the call.
    Done(ReadState),
    /// The position would have moved, but a member left the chat or was
    /// removed after the caller's membership check (see [`Sent::Stale`]);
    /// nothing written, no change number taken. Check again, afresh, and
    /// mark again.
    Stale,
}

/// Outcome of [`MessageStore::report`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reported {
    /// The report stored: this one, or the reporter's first on a repeat.
    Stored(StoredReport),
    /// A member left the chat or was removed after the reporter's
    /// membership check (see [`Sent::Stale`]), and the reporter had not
    /// reported the message before; nothing written. Check again, afresh,
    /// and report again.
    Stale,
}

/// What the write of a member's change (an edit, a reaction, a pin) reads
/// on its chat's heads row, under the row's lock (PostgreSQL) or the one
/// writer (SQLite), with the change number it takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HeadsState {
    /// [`MessageStore::record_departure`]'s version (0: none recorded).
    pub members_version: i64,
    /// Archived ([`MessageStore::archive_chat`]).
    pub archived: bool,
    /// A direct chat closed by a block ([`MessageStore::close_direct_chat`]).
    pub closed: bool,
}

/// Why a write of a member's change is refused by its chat's heads
/// ([`HeadsState::refusal`]): each outcome enum has a variant of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    Stale,
    Archived,
    Closed,
}

impl HeadsState {
    /// The refusal of a change whose membership check saw members version
    /// `checked`: stale first (a departure, a loss of rights, the chat's
    /// deletion: the caller checks again, afresh), then, for a change that
    /// `adds` to the chat (a message, an edit, a reaction or a pin; not
    /// one taken back), an archive, then a block's closure.
    pub(crate) fn refusal(&self, checked: i64, adds: bool) -> Option<Refusal> {
        if self.members_version > checked {
            Some(Refusal::Stale)
        } else if adds && self.archived {
            Some(Refusal::Archived)
        } else if adds && self.closed {
            Some(Refusal::Closed)
        } else {
            None
        }
    }
}

/// One `From<Refusal>` for each write's outcome enum.
macro_rules! refused_as {
    ($($outcome:ident),*) => {$(
        impl From<Refusal> for $outcome {
            fn from(refusal: Refusal) -> Self {
                match refusal {
                    Refusal::Stale => Self::Stale,
                    Refusal::Archived => Self::Archived,
                    Refusal::Closed => Self::Closed,
                }
            }
        }
    )*};
}
refused_as!(Sent, Edited, Reacted, Pinned, Started);

/// Outcome of [`MessageStore::resolve_reports`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Resolved: how many open reports there were (0: none).
    Done(u64),
    /// A member left the chat or was removed, or someone lost rights (a
    /// demotion, a hand-over), after the resolver's membership check (see
    /// [`Sent::Stale`]); nothing written. Check again, afresh, and resolve
    /// again.
    Stale,
}

/// A user's read position in a chat and what is left unread after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The last seq read (0: none).
    pub read_seq: Seq,
    /// Messages after it not by the user and not deleted, counted up to
    /// [`UNREAD_COUNT_CAP`].
    pub unread: i64,
    /// The change number the call took when it moved the position; `None`
    /// when the position stayed where it was (no change happened).
    pub change_seq: Option<i64>,
}

/// How many membership and chat changes each chat's log keeps: a resume
/// point older than the oldest kept gets a reset instead of a replay. Each
/// entry is a short row, so a chat's log stays under ~200 KB; 1,000 changes
/// is weeks of joins and leaves for a busy group.
pub const CHAT_LOG_KEEP: i64 = 1000;

/// A change of a chat's membership or details, made by the chats service
/// and kept in the chat's log ([`MessageStore::record_chat_changes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatChange {
    Joined(UserId),
    Left(UserId),
    Removed(UserId),
    RoleChanged(UserId),
    /// The chat's details after an UpdateChat, ArchiveChat or UnarchiveChat.
    Updated(ChatDetails),
}

impl ChatChange {
    /// The member concerned (None for [`ChatChange::Updated`]).
    pub fn user(&self) -> Option<UserId> {
        match self {
            Self::Joined(u) | Self::Left(u) | Self::Removed(u) | Self::RoleChanged(u) => Some(*u),
            Self::Updated(_) => None,
        }
    }
}

/// A chat's details as a [`ChatChange::Updated`] left them.
///
/// `title` and `description` are text people wrote: the chat's log keeps
/// only the chat's current ones, in every `updated` entry (see
/// [`MessageStore::record_chat_changes`]), so a replay never shows a title
/// or description that was replaced. The rest (`fields`, the flags,
/// `update_time`, `assistant_replies`) stays as each change left it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatDetails {
    /// The fields that changed: "title", "description", "visibility",
    /// "archived", "assistant_replies".
    pub fields: Vec<String>,
    pub title: String,
    pub description: String,
    pub public: bool,
    pub archived: bool,
    /// µs since the Unix epoch.
    pub update_time: i64,
    /// natter.messages.v1.AssistantReplies (0 in entries logged before it
    /// existed).
    #[serde(default)]
    pub assistant_replies: i32,
}

/// What one [`ChatChange`] took: its change number and, for a join, the
/// joiner's read position set to the chat's newest seq by the next number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Logged {
    pub change_seq: i64,
    /// (change number, read position) of a join's read position.
    pub read: Option<(i64, Seq)>,
    /// The chat's newest seq at the time.
    pub seq: Seq,
}

impl Logged {
    /// How `changes` are numbered after the chat's newest change number
    /// `last` (its newest seq then `seq`), in order: each takes the next
    /// number, and a join also takes the one after for its joiner's read
    /// position, `joined(joiner)`: the newest seq when the join was
    /// committed (at most `seq`), or the joiner's read position if further
    /// (read while the join was on its way), which is also the join's own
    /// seq. The same rule answers a retried call from its log entries
    /// ([`Logged::of_entry`]).
    fn number(changes: &[ChatChange], last: i64, seq: Seq, joined: &dyn Fn(UserId) -> Seq) -> Vec<Logged> {
        let mut next = last;
        changes
            .iter()
            .map(|c| {
                next += 1;
                let change_seq = next;
                if let ChatChange::Joined(joiner) = c {
                    next += 1;
                    let read = joined(*joiner);
                    Logged { change_seq, read: Some((next, read)), seq: read }
                } else {
                    Logged { change_seq, read: None, seq }
                }
            })
            .collect()
    }

    /// What a stored log entry of `kind` (a `chat_changes.kind`) took.
    fn of_entry(change_seq: i64, kind: &str, seq: Seq) -> Logged {
        Logged { change_seq, read: (kind == JOINED).then_some((change_seq + 1, seq)), seq }
    }

    /// The newest change number the changes took.
    fn last(logged: &[Logged]) -> Option<i64> {
        logged.last().map(|l| l.read.map_or(l.change_seq, |(n, _)| n))
    }
}

/// `chat_changes.kind` of a [`ChatChange::Joined`].
pub(crate) const JOINED: &str = "joined";

/// One change of a chat as the store holds it now, for replay.
#[expect(
    clippy::large_enum_variant,
    reason = "most changes a replay reads are messages: boxing them would cost an allocation per replayed message"
)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A message created, edited or deleted since the resume point, in its
    /// current state (its `change_seq` is the change's number).
    Message(Message),
    /// The asking user's own read position, moved since the resume point.
    Read { change_seq: i64, user: UserId, read_seq: Seq },
    /// An entry of the chat's log.
    Chat { change_seq: i64, change: ChatChange, seq: Seq, time: i64 },
}

impl Change {
    /// Roughly the bytes it takes (see [`Message::weight`]).
    pub fn weight(&self) -> usize {
        match self {
            Self::Message(m) => m.weight(),
            Self::Read { .. } | Self::Chat { .. } => 256,
        }
    }

    /// Its change number.
    pub fn change_seq(&self) -> i64 {
        match self {
            Self::Message(m) => m.change_seq,
            Self::Read { change_seq, .. } | Self::Chat { change_seq, .. } => *change_seq,
        }
    }
}

/// A member's latest join or departure in a chat's log
/// ([`MessageStore::latest_membership`]), with its change number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    Joined(i64),
    /// Left or removed.
    Departed(i64),
}

impl Membership {
    /// The membership of a log entry of `kind` (`joined`, `left` or
    /// `removed`) at `change_seq`.
    pub(crate) fn of_entry(change_seq: i64, kind: &str) -> Self {
        if kind == JOINED { Self::Joined(change_seq) } else { Self::Departed(change_seq) }
    }
}

/// The latest join or departure of member `$2` in chat `$1` (the same
/// text on both engines: `?N` and `$N` alike bind by position).
pub(crate) const LATEST_MEMBERSHIP_SQL: &str = "SELECT change_seq, kind FROM chat_changes \
     WHERE chat_id = $1 AND user_id = $2 AND kind IN ('joined', 'left', 'removed') ORDER BY change_seq DESC LIMIT 1";

/// [`MessageStore::close_direct_chat`]: chat `$1` closed (`$2`) at
/// version `$3`, its heads row created if need be (no seq, no change
/// number), unless it holds that version or a higher one (the same text on
/// both engines, as [`LATEST_MEMBERSHIP_SQL`]). On PostgreSQL the upsert
/// takes the row's lock, as a send's write does.
pub(crate) const CLOSE_DIRECT_CHAT: &str = "INSERT INTO chat_heads (chat_id, last_seq, last_change, closed, \
     closed_version) VALUES ($1, 0, 0, $2, $3) ON CONFLICT (chat_id) DO UPDATE SET closed = excluded.closed, \
     closed_version = excluded.closed_version WHERE chat_heads.closed_version < excluded.closed_version";

/// [`MessageStore::archive_chat`]: chat `$1` archived (`$2`) at version
/// `$3`, its heads row created if need be (no seq, no change number),
/// unless it holds that version or a higher one (the same text on both
/// engines, as [`CLOSE_DIRECT_CHAT`]). On PostgreSQL the upsert takes the
/// row's lock, as a send's write does.
pub(crate) const ARCHIVE_CHAT: &str = "INSERT INTO chat_heads (chat_id, last_seq, last_change, archived, \
     archived_version) VALUES ($1, 0, 0, $2, $3) ON CONFLICT (chat_id) DO UPDATE SET archived = excluded.archived, \
     archived_version = excluded.archived_version WHERE chat_heads.archived_version < excluded.archived_version";

/// [`MessageStore::record_departure`]: chat `$1`'s members version is `$2`,
/// its heads row created if need be (no seq, no change number), unless it
/// holds that version or a higher one (the same text on both engines). On
/// PostgreSQL the upsert takes the row's lock, as a send's write does.
pub(crate) const RECORD_DEPARTURE: &str = "INSERT INTO chat_heads (chat_id, last_seq, last_change, \
     members_version) VALUES ($1, 0, 0, $2) ON CONFLICT (chat_id) DO UPDATE SET members_version = \
     excluded.members_version WHERE chat_heads.members_version < excluded.members_version";

/// The members version a purged chat's heads row holds
/// ([`MessageStore::purge_chat`]): above any a membership check answers, so
/// every send's write finds the chat's messages checked before a
/// departure ([`Sent::Stale`]) with the comparison it makes anyway, and
/// the check made afresh finds no chat (NOT_FOUND). A departure's version
/// never lowers it (a recorded members version only rises).
pub const DELETED_MEMBERS_VERSION: i64 = i64::MAX;

/// [`MessageStore::purge_chat`]'s last statement: chat `$1`'s heads row as
/// a new chat's (no seq, no change number, open, not archived) but with members version
/// [`DELETED_MEMBERS_VERSION`] (the same text on both engines). On
/// PostgreSQL the upsert takes the row's lock, as a send's write does, so
/// a write under way commits first (and its message is purged with the
/// rest) or waits and reads the mark.
pub(crate) const PURGE_HEADS: &str = "INSERT INTO chat_heads (chat_id, last_seq, last_change, log_floor, closed, \
     closed_version, archived, archived_version, members_version) \
     VALUES ($1, 0, 0, 0, FALSE, 0, FALSE, 0, 9223372036854775807) ON CONFLICT (chat_id) \
     DO UPDATE SET last_seq = 0, last_change = 0, log_floor = 0, closed = FALSE, closed_version = 0, \
     archived = FALSE, archived_version = 0, members_version = excluded.members_version";

/// A chat's heads: where its timeline and its changes stand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heads {
    /// The newest message's seq ([`Seq::ZERO`] before the first).
    pub seq: Seq,
    /// The newest change number (0 before the first change).
    pub change: i64,
    /// The newest change number pruned from the chat's log: a resume point
    /// below it cannot be replayed.
    pub floor: i64,
}

/// A chat's preview for one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// The chat's newest message (None before the first).
    pub newest: Option<Message>,
    /// As [`ReadState::unread`].
    pub unread: i64,
    /// Unread messages that mention the user (not by the user, not
    /// deleted), counted up to [`UNREAD_COUNT_CAP`]: at most `unread`.
    pub mentions: i64,
    /// Live messages (not deleted, not superseded).
    pub message_count: i64,
    /// The highest `flag_severity` of its live messages (0: none flagged
    /// or scanned; from [`FLAGGED_FROM`] it is flagged).
    pub max_severity: i32,
}

/// A chat's message count and highest flag severity as SQL, the same text
/// on both engines: `$chat` is the chat id's placeholder; each count walks
/// a partial index (`messages_gone`, `messages_flagged`) of the chat's few
/// tombstones, superseded replies and flagged messages, never the chat.
macro_rules! aggregates_sql {
    ($chat:literal) => {
        concat!(
            "COALESCE((SELECT last_seq FROM chat_heads WHERE chat_id = ",
            $chat,
            "), 0) - (SELECT COUNT(*) FROM messages g WHERE g.chat_id = ",
            $chat,
            " AND (g.delete_time IS NOT NULL OR g.superseded = 1)), \
             COALESCE((SELECT MAX(f.flag_severity) FROM messages f WHERE f.chat_id = ",
            $chat,
            " AND f.flag_severity >= 2), 0)"
        )
    };
}
pub(crate) use aggregates_sql;

/// The newest message of a chat, for re-announcing chat activity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    pub chat_id: ChatId,
    pub seq: Seq,
    /// µs since the Unix epoch.
    pub send_time: i64,
}

/// A failure of the store: the engine's error, or a row that does not hold
/// what the schema promises.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed (or the store is closed).
    #[error(transparent)]
    Db(#[from] DbError),
    /// A stored value is not what the schema promises (e.g. an id that is
    /// not a UUID).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Sqlx(e))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Db(DbError::Sqlite(e))
    }
}

impl StoreError {
    /// What this failure is to a client (see [`natter_db::Failure`]): a
    /// corrupt row is internal.
    pub fn failure(&self) -> natter_db::Failure {
        match self {
            Self::Db(e) => e.failure(),
            Self::Corrupt(_) => natter_db::Failure::Internal,
        }
    }
}

/// The messages tables, in the messages domain's types. Every write is one
/// transaction; every method may fail with [`StoreError`].
#[async_trait::async_trait]
pub trait MessageStore: Send + Sync + std::fmt::Debug + 'static {
    /// Inserts `batch` in ONE transaction (group commit); the outcomes are
    /// in the batch's order. Each chat's messages take its next seqs in
    /// batch order, gap-free: a refused message ([`Sent::Duplicate`],
    /// [`Sent::NoSuchReply`], [`Sent::Closed`], [`Sent::Archived`],
    /// [`Sent::Stale`]) takes none. Whether a chat is closed
    /// ([`MessageStore::close_direct_chat`]) or archived
    /// ([`MessageStore::archive_chat`]) and its members version
    /// ([`MessageStore::record_departure`]) are read on its heads row in
    /// the write that takes its seqs: a closure or an archive recorded
    /// before the batch's transaction reads it refuses the chat's
    /// messages, whenever their membership was checked, and so does a
    /// departure recorded after the lowest version the checks of the
    /// chat's messages saw ([`Sent::Stale`], one comparison per chat; it
    /// comes first: a departure, or the chat's deletion, is checked
    /// afresh, then an archive, then a closure). A message whose reply or
    /// thread root is missing is refused for its chat's state first when
    /// that refuses it (a purged chat: [`Sent::Stale`], whose check afresh
    /// finds no chat), and only then [`Sent::NoSuchReply`] or
    /// [`Sent::NoSuchThreadRoot`]. A message's mentions
    /// ([`NewMessage::mentions`]) are written with it; a batch without any
    /// costs nothing for them. A thread reply ([`NewMessage::thread_root`])
    /// is checked against its root before any of the batch is inserted
    /// ([`Sent::NoSuchThreadRoot`], [`Sent::ThreadRootDeleted`]); each
    /// root the batch replies to then takes its chat's next change number,
    /// after the batch's messages, with its summary updated (a batch
    /// without thread replies costs nothing for them). An error writes
    /// nothing.
    async fn insert_batch(&self, batch: &[NewMessage]) -> Result<Vec<Sent>, StoreError>;

    /// The message with this id, live or a tombstone.
    async fn message(&self, id: MessageId) -> Result<Option<Message>, StoreError>;

    /// Replaces a live message's text (and its flags, the detector's verdict
    /// on the new text), keeping the old text as a revision, unless it was
    /// edited `max_edits` times already; `now` in µs. Refused
    /// ([`Edited::Stale`]) when the chat's members version recorded by
    /// [`MessageStore::record_departure`] is above `members_version` (the
    /// one the editor's membership check saw), then ([`Edited::Archived`])
    /// when the chat is archived ([`MessageStore::archive_chat`]), then
    /// ([`Edited::Closed`]) when it is a direct chat closed by a block
    /// ([`MessageStore::close_direct_chat`]), all read on the heads row the
    /// edit locks for its change number (PostgreSQL: after the message's
    /// row), so a departure or a closure recorded before the edit commits is
    /// seen. An edit to the text the message has (a retry) is answered
    /// [`Edited::Unchanged`] before either is read.
    async fn edit(
        &self,
        id: MessageId,
        text: &str,
        flags: Option<&Flags>,
        now: i64,
        max_edits: usize,
        members_version: i64,
    ) -> Result<Edited, StoreError>;

    /// Turns a message into a tombstone at `now` (µs), deleted by `by`
    /// (its `deleted_by`): seq stays, text, attachments, flags, reactions,
    /// mentions and earlier revisions go; a tombstone stays as it is (its
    /// first deleter too). A thread reply's root loses it from its
    /// reply count in the same transaction, as a change of the root (the
    /// next change number after the deletion's); a root keeps its summary.
    /// (PostgreSQL locks the reply's row, then the root's, then the
    /// chat's heads.)
    /// Returns the message after the call (None: no such message).
    ///
    /// A person's message takes its assistant's replies with it
    /// ([`MessageStore::delete_with_replies`], whose message this is). No
    /// members version is compared: this is for callers whose right to
    /// delete comes from no membership check (tests, tools); DeleteMessage
    /// calls [`MessageStore::delete_with_replies`] with the version its
    /// check saw.
    async fn delete(&self, id: MessageId, by: UserId, now: i64) -> Result<Option<Message>, StoreError> {
        Ok(match self.delete_with_replies(id, by, now, i64::MAX).await? {
            Deletion::Done(deleted) => Some(deleted.message),
            Deletion::NotFound | Deletion::Stale => None,
        })
    }

    /// [`MessageStore::delete`], and first, in the same transaction, each
    /// live assistant's reply to the message (a prompt's: role ASSISTANT,
    /// `reply_to_seq` its seq, superseded ones too, as
    /// [`MessageStore::replies`] lists them), in seq order, each a
    /// deletion of its own (its own change number, below the message's; a
    /// reply still GENERATING ends STOPPED as a deleted reply does). A
    /// reply restates its prompt: deleting the prompt takes it back too.
    /// A tombstone whose replies are live (deleted before this rule) has
    /// them deleted now, so a retry ends as the first call would have.
    /// (PostgreSQL locks the message's row, then its replies' in seq
    /// order, then the chat's heads; a StartReply of the prompt shares the
    /// prompt's row lock, so it either commits first, and its reply is
    /// deleted here, or sees the prompt deleted.)
    /// Returns the message after the call and the replies this call
    /// deleted ([`Deletion::NotFound`]: no such message). Each reply
    /// deleted here is recorded as deleted by `by` too. Refused, nothing
    /// written ([`Deletion::Stale`]), when the chat's members version
    /// recorded by [`MessageStore::record_departure`] is above
    /// `members_version` (the one the deleting user's check saw), read as
    /// an edit reads it ([`MessageStore::edit`]) on the heads row each
    /// tombstone locks for its change number; deleting a tombstone with no
    /// live reply writes nothing and reads none. A block's closure refuses
    /// no deletion.
    async fn delete_with_replies(
        &self,
        id: MessageId,
        by: UserId,
        now: i64,
        members_version: i64,
    ) -> Result<Deletion, StoreError>;

    /// The assistant's replies to the message at `prompt` in `chat` (role
    /// ASSISTANT, `reply_to_seq` = `prompt`), live and deleted, superseded
    /// ones too, in seq order (index `messages_replies`).
    async fn replies(&self, chat: ChatId, prompt: Seq) -> Result<Vec<Message>, StoreError>;

    /// The newest seq of a chat ([`Seq::ZERO`] before the first message).
    async fn head(&self, chat: ChatId) -> Result<Seq, StoreError>;

    /// Up to `limit` messages of a chat in `range`, after the keyset
    /// position `from` (a seq) in the range's order.
    async fn list(&self, chat: ChatId, range: Range, from: Option<Seq>, limit: u32)
    -> Result<Vec<Message>, StoreError>;

    /// Earlier revisions of the given messages, by message id, oldest first.
    async fn revisions(&self, message_ids: &[MessageId]) -> Result<Vec<Revision>, StoreError>;

    /// Up to `limit` earlier revisions of one message after revision
    /// `after`, oldest first.
    async fn revisions_after(&self, message_id: MessageId, after: i64, limit: u32)
    -> Result<Vec<Revision>, StoreError>;

    /// Moves `user`'s read position in `chat` forward to `seq`, clamped to
    /// the chat's newest seq (never back), and returns the position after
    /// the call with the unread count after it. A forgotten user's
    /// ([`MessageStore::forget_user`]) position stays where the forget
    /// left it (none), and takes no change number. A move is refused
    /// ([`Marked::Stale`], nothing written) when the chat's members version
    /// recorded by [`MessageStore::record_departure`] is above
    /// `members_version` (the one the user's check saw), read as an edit
    /// reads it ([`MessageStore::edit`]) on the heads row the move locks for
    /// its change number; a call that moves nothing writes nothing and is
    /// answered whatever the version.
    async fn mark_read(&self, chat: ChatId, user: UserId, seq: Seq, members_version: i64)
    -> Result<Marked, StoreError>;

    /// Records `changes` of the chat's membership or details in ONE
    /// transaction: each takes the chat's next change number and an entry
    /// in its log (which then keeps its newest [`CHAT_LOG_KEEP`], raising
    /// the floor past what it prunes); a [`ChatChange::Joined`] also sets the
    /// joiner's read position to the chat's newest message sent at or before
    /// `now`, unless it is further already (read while the join was on its
    /// way), with the number after the join's, and the join's seq to it. Answers in the
    /// order of `changes`; `now` in µs: when the changes were committed (a
    /// join recorded late leaves what was sent since unread). A forgotten
    /// user's join ([`MessageStore::forget_user`], done before the join
    /// arrived or racing it) is logged and numbered the same, but stores no
    /// read position.
    ///
    /// A [`ChatChange::Updated`] also rewrites, in the same transaction,
    /// the title and description of every earlier `updated` entry of the
    /// chat's log to the newest one's (the chat as it is now), and nothing
    /// else of them: replayed in order, the entries still end with the
    /// chat's details, and a title or description replaced is no longer
    /// stored or replayed (it was announced live while it was current).
    /// Change numbers and order are untouched.
    ///
    /// `origin` is the caller's idempotency key ("" for none): when the
    /// chat's log holds entries of the same origin, nothing is written and
    /// the answer is theirs (a retry after a lost answer records nothing
    /// twice, for as long as the log keeps the entries).
    async fn record_chat_changes(
        &self,
        chat: ChatId,
        changes: &[ChatChange],
        now: i64,
        origin: &str,
    ) -> Result<Vec<Logged>, StoreError>;

    /// Records whether direct chat `chat` is closed to new messages (a
    /// block between its members: RecordChatChanges' direct_chat_closed) at
    /// `version` (1 or more), on its heads row (created if need be, with no
    /// seq and no change number taken), unless the row holds this version
    /// or a higher one already: then nothing changes, so a repeated or late
    /// call never undoes a newer state. Takes no change number and logs
    /// nothing. Serialized with [`MessageStore::insert_batch`] on the heads
    /// row (PostgreSQL: its row lock; SQLite: the one writer): a batch that
    /// reads the row after this commits refuses the chat's messages
    /// ([`Sent::Closed`]).
    async fn close_direct_chat(&self, chat: ChatId, closed: bool, version: i64) -> Result<(), StoreError>;

    /// Records whether chat `chat` is archived (ArchiveChat, UnarchiveChat:
    /// RecordChatChanges' chat_archived) at `version` (1 or more), on its
    /// heads row (created if need be, with no seq and no change number
    /// taken), unless the row holds this version or a higher one already:
    /// then nothing changes, so a repeated or late call never undoes a
    /// newer state. Takes no change number and logs nothing (the archive's
    /// own `ChatUpdated` is logged as any change). Serialized with the
    /// writes that read it on the heads row as
    /// [`MessageStore::close_direct_chat`] is: a batch that reads the row
    /// after this commits refuses the chat's messages ([`Sent::Archived`]),
    /// and so do an edit, a reaction added and a pin ([`Edited::Archived`],
    /// [`Reacted::Archived`], [`Pinned::Archived`]).
    async fn archive_chat(&self, chat: ChatId, archived: bool, version: i64) -> Result<(), StoreError>;

    /// Records that chat `chat`'s members version is `version` (1 or more)
    /// after a departure or a loss of rights (RecordChatChanges'
    /// members_departed), on its
    /// heads row (created if need be, with no seq and no change number
    /// taken), unless the row holds this version or a higher one already.
    /// Takes no change number and logs nothing. Serialized with
    /// [`MessageStore::insert_batch`] on the heads row as
    /// [`MessageStore::close_direct_chat`] is: a batch that reads the row
    /// after this commits refuses the chat's messages checked at a lower
    /// version ([`Sent::Stale`]), and so do the other writes of a member's
    /// change that read it (edits, reactions, pins, deletions, read moves,
    /// reports: their `Stale` outcomes).
    async fn record_departure(&self, chat: ChatId, version: i64) -> Result<(), StoreError>;

    /// The chat's heads (all zero for a chat with no message and no change).
    async fn heads(&self, chat: ChatId) -> Result<Heads, StoreError>;

    /// `user`'s latest join or departure of `chat` still in the chat's log
    /// (None: never logged, or pruned). A stream that missed a join
    /// replays from it; one that finds its user gone replays up to the
    /// departure.
    async fn latest_membership(&self, chat: ChatId, user: UserId) -> Result<Option<Membership>, StoreError>;

    /// Up to `limit` changes of `chat` with a change number above `after`,
    /// in change order, as the store holds them now: messages (each once, at
    /// its latest change), `user`'s own read position, and the chat's log
    /// entries. The flag says whether more may follow the last one.
    ///
    /// Only messages changed after their creation are indexed by change
    /// number (`messages_changed_by_chat`, so a send writes no extra index
    /// entry); those created since `after` and unchanged are found by seq:
    /// creations take seqs and change numbers in the same order, so the
    /// first of them is found by a binary search over seqs
    /// (`first_seq_created_after`), then read as a seq range.
    async fn changes(
        &self,
        chat: ChatId,
        user: UserId,
        after: i64,
        limit: u32,
    ) -> Result<(Vec<Change>, bool), StoreError>;

    /// For each of `chats`, in order: its newest message and `user`'s
    /// unread and mention counts (None: no one's, zero: a public chat listed
    /// to someone outside it costs no count). One trip to the database for
    /// the whole page.
    async fn summaries(&self, chats: &[ChatId], user: Option<UserId>) -> Result<Vec<Summary>, StoreError>;

    /// The newest message of every chat that has one sent within `window_us`
    /// µs before the newest message stored, read in commit order and at most
    /// [`RECENT_ACTIVITY_ROWS`] rows, for re-announcing chat activity after a
    /// crash (the chats store on SQLite keeps the newest of it in memory for
    /// a moment). The window is taken from the newest message, not the
    /// clock, so any time may pass between the crash and the start. Empty
    /// on PostgreSQL, whose chats store writes activity as it comes.
    async fn recent_activity(&self, window_us: i64) -> Result<Vec<Activity>, StoreError>;

    /// Deletes everything of a deleted chat (its messages, their
    /// revisions, reactions, reports and mentions, its read positions and
    /// change log) in one transaction, and leaves its heads row marked
    /// deleted (seq and change number back to zero, members version
    /// [`DELETED_MEMBERS_VERSION`]), which a send's write reads on
    /// the row it locks anyway: a message whose membership check passed
    /// before the chat's deletion and whose write comes after the purge is
    /// refused ([`Sent::Stale`]; checked again, the chat is not found)
    /// rather than stored in the deleted chat with a seq of 1. One written
    /// before the purge goes with it. A repeat deletes nothing more.
    async fn purge_chat(&self, chat: ChatId) -> Result<(), StoreError>;

    /// Forgets deleted user `user`: deletes, in ONE transaction, every row
    /// kept under its id that holds no message content, which is its
    /// last-seen time (`user_presence`), its read position in every chat
    /// (`read_positions`) and its mention rows (`message_mentions`). What
    /// the chats' other members see stays: the messages it sent (and the
    /// mentions listed on them), its reactions, its reports and the chats'
    /// change logs. The user is recorded as forgotten in the same
    /// transaction: [`MessageStore::record_last_seen`] stores no time of
    /// theirs afterwards, [`MessageStore::mark_read`] and a join's
    /// [`MessageStore::record_chat_changes`] no read position, and
    /// [`MessageStore::insert_batch`] no mention row (the message is
    /// stored), even a write under way as the forget commits. A repeat
    /// deletes nothing.
    async fn forget_user(&self, user: UserId) -> Result<(), StoreError>;

    /// Rewrites in Unicode NFC ([`crate::domain::nfc`]) the text of every
    /// message stored otherwise (sent before sends were normalized), and
    /// its search index entry with it, so that NFC queries find it; a
    /// message whose text changed meanwhile, and a reply still GENERATING
    /// (its checkpoints match its deltas byte for byte), are left as they
    /// are. Neither a
    /// revision nor a change: the text reads the same. Returns how many
    /// it rewrote. [`open`] runs it once per database (see
    /// [`NFC_TEXT_BACKFILL`]).
    async fn normalize_texts(&self) -> Result<u64, StoreError>;

    /// Rewrites every reaction stored in a form other than its canonical
    /// one ([`crate::domain::canonical_emoji`]: reactions added before
    /// AddReaction canonicalized, ❤ beside ❤️) into that form. A user's
    /// reaction stored in both forms becomes one (its older time kept), so
    /// each emoji counts once per user. A message whose reactions it
    /// rewrote takes its chat's next change number, as a RemoveReaction
    /// would: a client resuming the chat re-reads it. Deleted messages (no
    /// reactions left) and forms `canonical_emoji` refuses (look-alikes,
    /// which RemoveReaction still takes back) stay as they are. Returns how
    /// many messages it rewrote. [`open`] runs it once per database (see
    /// [`REACTION_FORMS_BACKFILL`]).
    async fn canonicalize_reactions(&self) -> Result<u64, StoreError>;

    /// Rewrites the title and description of every chat's `updated` log
    /// entries to the chat's newest entry's, as
    /// [`MessageStore::record_chat_changes`] does for each new one: entries
    /// logged before it did so still held replaced text. Each chat's in one
    /// transaction, taken in turn with the chat's writers. Returns how many
    /// chats it rewrote. [`open`] runs it once per database (see
    /// [`CHAT_DETAILS_BACKFILL`]).
    async fn scrub_chat_details(&self) -> Result<u64, StoreError>;

    /// Whether the one-off rewrite `name` (a row of `store_backfills`) is
    /// done.
    async fn backfilled(&self, name: &str) -> Result<bool, StoreError>;

    /// Records the one-off rewrite `name` done at `now` (µs); again is a
    /// no-op.
    async fn record_backfill(&self, name: &str, now: i64) -> Result<(), StoreError>;

    /// `user`'s read position in each of `chats`, in order ([`Seq::ZERO`]
    /// where none is stored).
    async fn read_positions(&self, user: UserId, chats: &[ChatId]) -> Result<Vec<Seq>, StoreError>;

    /// The read positions stored for `chat` (its members', and those of
    /// users who have left it since: the caller keeps the members), by user
    /// id, up to `limit` after user `after` (ListReadPositions).
    async fn chat_read_positions(
        &self,
        chat: ChatId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<(UserId, Seq)>, StoreError>;

    /// Starts an assistant's reply in ONE transaction: a message by the
    /// assistant (role ASSISTANT, GENERATING, empty text, reply_to the
    /// prompt's seq, checkpoint at `now`) with the chat's next seq and
    /// change number, unless the prompt is deleted
    /// ([`Started::PromptDeleted`], nothing written); with `replaces`, that
    /// reply is superseded, taking the next change number. The reply keeps [`NewReply::owner`]. A stored id
    /// writes nothing ([`Started::Exists`]), save for a reply still
    /// GENERATING and started with the same owner, whose lease is renewed
    /// ([`Started::Resumed`]; a finished reply is never restarted); neither
    /// does a chat with another reply GENERATING
    /// ([`Started::Busy`]), checked under the chat's heads lock so two
    /// replicas cannot both start one. A reply created finished
    /// ([`NewReply::finished`]) skips that check. Nor does a start whose
    /// [members version](NewReply::members_version) is below the chat's
    /// recorded one ([`Started::Stale`]), one in an archived chat
    /// ([`Started::Archived`]) or one in a direct chat closed by a block
    /// ([`Started::Closed`]), refused in that order, as a send's write
    /// refuses: each read on the heads row where the seq is taken
    /// (PostgreSQL: after its lock, on its latest version; SQLite: in the
    /// writer's transaction), so a departure, an archive or a purge
    /// recorded before the start commits is seen, and one recorded after it
    /// waits for it.
    async fn start_reply(&self, reply: &NewReply) -> Result<Started, StoreError>;

    /// Stores the text so far of GENERATING replies, in ONE transaction
    /// (one WAL sync on SQLite, one statement on PostgreSQL), each with its
    /// checkpoint time `now` (µs): no revision, no change number. Answers,
    /// in `checkpoints`' order, whether a stop was asked for each, or None
    /// for one that is not GENERATING (finished, or no such message).
    async fn checkpoint_replies(&self, checkpoints: &[Checkpoint], now: i64) -> Result<Vec<Option<bool>>, StoreError>;

    /// [`MessageStore::checkpoint_replies`] of one reply (`text` None: only
    /// the heartbeat).
    async fn checkpoint_reply(&self, id: MessageId, text: Option<&str>, now: i64) -> Result<Option<bool>, StoreError> {
        let one = Checkpoint { id, text: text.map(str::to_owned) };
        Ok(self.checkpoint_replies(std::slice::from_ref(&one), now).await?.pop().flatten())
    }

    /// Finishes a GENERATING reply in ONE transaction: its text, status and
    /// info, as a change of the chat (next change number, no revision); a
    /// [`Generation::Failed`] one with `restore_replaced` also un-supersedes
    /// the reply it replaced (the next change number). A finished reply is
    /// answered as it is (`changed` false), and so is one whose checkpoint
    /// is not older than [`Finish::stale_before`] when that is set (its
    /// stored text is then kept). A finish checked at a members version
    /// ([`Finish::members_version`]) is refused ([`Finishing::Stale`]) when
    /// a later one is recorded, and stored STOPPED in a direct chat closed
    /// by a block, both read on the chat's heads row where the change
    /// number is taken (PostgreSQL: under its lock; SQLite: the one
    /// writer), so a removal or a block recorded before the commit is
    /// never missed.
    async fn finish_reply(&self, id: MessageId, finish: &Finish) -> Result<Finishing, StoreError>;

    /// Sets the stop flag of a GENERATING reply (a no-op otherwise) and
    /// returns the message as it is (None: no such message).
    async fn stop_reply(&self, id: MessageId) -> Result<Option<Message>, StoreError>;

    /// The clock that stamps replies' checkpoints and judges them stale
    /// (µs since the Unix epoch): PostgreSQL's own, which every messages
    /// replica shares, so replicas whose clocks differ still agree on what
    /// is stale; this process's on SQLite (one process).
    async fn clock(&self) -> Result<i64, StoreError>;

    /// Up to `limit` GENERATING replies whose last checkpoint is before
    /// `before` (µs), oldest checkpoint first.
    async fn stale_replies(&self, before: i64, limit: u32) -> Result<Vec<Message>, StoreError>;

    /// Raises a live message's flags to `flags` (an external classifier's
    /// verdict) as a change of its chat, if its revision is still
    /// `revision` and `flags` is more severe than what it has; returns the
    /// message as it is then (None: nothing changed).
    async fn raise_flags(&self, id: MessageId, revision: i64, flags: &Flags) -> Result<Option<Message>, StoreError>;

    /// Adds (`add`) or removes `user`'s reaction `emoji` on a live message
    /// in ONE transaction: a real add or removal takes the chat's next
    /// change number and sets it as the message's `change_seq` (no
    /// revision); a no-op writes nothing and takes none. An add of an emoji
    /// the message does not hold yet is refused when it holds `max_emoji`
    /// distinct ones. Serialized per message (SQLite: the single writer;
    /// PostgreSQL: the message row's lock, then the chat's heads), so the
    /// limit holds and counts, read from the rows, never drift. `now` in µs
    /// orders the emoji. A real change is refused ([`Reacted::Stale`]) as
    /// an edit is ([`MessageStore::edit`]) when a departure recorded since
    /// is above `members_version`, the one `user`'s check saw, and a real
    /// add in an archived chat ([`Reacted::Archived`]) or in a direct chat
    /// closed by a block ([`Reacted::Closed`]). Taking a reaction back
    /// reads neither (the service refuses it in an archived chat as it
    /// checks membership, as before: a removal checked before the archive
    /// adds nothing to the chat).
    #[expect(clippy::too_many_arguments, reason = "one reaction's fields, as the request has them")]
    async fn react(
        &self,
        id: MessageId,
        user: UserId,
        emoji: &str,
        add: bool,
        now: i64,
        max_emoji: usize,
        members_version: i64,
    ) -> Result<Reacted, StoreError>;

    /// Pins (`pin`) or unpins message `id` for `user` at `now` (µs), in one
    /// transaction that takes the chat's next change number for a real
    /// change, like [`MessageStore::react`]. A pin past `max_pins` pinned
    /// messages of the chat is refused ([`Pinned::TooMany`]); the count and
    /// the write are serialized with other pins of the chat (SQLite: the
    /// write lock; PostgreSQL: the chat's heads row, locked after the
    /// message's row and before the count), so the limit holds under
    /// concurrent pins. A real change is refused ([`Pinned::Stale`]) as an
    /// edit is ([`MessageStore::edit`]) when a departure recorded since is
    /// above `members_version`, the one `user`'s check saw, and a real pin
    /// in an archived chat ([`Pinned::Archived`]) or in a direct chat
    /// closed by a block ([`Pinned::Closed`]). An unpin reads neither (as
    /// taking a reaction back: see [`MessageStore::react`]).
    async fn pin(
        &self,
        id: MessageId,
        user: UserId,
        pin: bool,
        now: i64,
        max_pins: usize,
        members_version: i64,
    ) -> Result<Pinned, StoreError>;

    /// The reactions of each of `ids` that has any, aggregated per emoji
    /// (count, and whether `viewer` is among them: never without one),
    /// ordered by the time of each emoji's oldest reaction (then by emoji).
    /// One statement for the whole list.
    async fn reactions(
        &self,
        ids: &[MessageId],
        viewer: Option<UserId>,
    ) -> Result<HashMap<MessageId, Vec<Reaction>>, StoreError>;

    /// Records `report` unless its reporter reported the message already;
    /// returns the report stored (the first one, on a repeat). A new report
    /// is refused ([`Reported::Stale`], nothing written) when the chat's
    /// members version recorded by [`MessageStore::record_departure`] is
    /// above `members_version` (the one the reporter's check saw), read in
    /// the insert's own statement on the chat's heads row (PostgreSQL: under
    /// a share lock, so a departure being recorded is waited for and one
    /// recorded after waits for the insert; SQLite: the one writer).
    async fn report(&self, report: &StoredReport, members_version: i64) -> Result<Reported, StoreError>;

    /// Resolves the open reports of `message` (of chat `chat`) by
    /// `resolver` at `now` (µs); returns how many there were
    /// ([`Resolved::Done`]). With `members_version` (the one a resolving
    /// owner's or admin's check saw; None for staff, who are no members and
    /// compare nothing), nothing is resolved ([`Resolved::Stale`]) when the
    /// chat's members version recorded by
    /// [`MessageStore::record_departure`] is above it (the resolver may
    /// have been demoted or removed since), read in the update's own
    /// statement on the chat's heads row as [`MessageStore::report`] reads
    /// it (PostgreSQL: under a share lock; SQLite: the one writer).
    async fn resolve_reports(
        &self,
        message: MessageId,
        chat: ChatId,
        resolver: UserId,
        now: i64,
        members_version: Option<i64>,
    ) -> Result<Resolved, StoreError>;

    /// The moderation queue: up to `limit` live messages that `filter`
    /// admits, newest first (send time, then id) after `from`, each with its
    /// open reports, oldest first.
    async fn flagged(
        &self,
        filter: &QueueFilter,
        from: Option<QueueCursor>,
        limit: u32,
    ) -> Result<Vec<(Message, Vec<StoredReport>)>, StoreError>;

    /// Records that each of `seen`'s users was last online at its time (µs),
    /// in ONE transaction, keeping a later time already stored (so repeats
    /// and out-of-order writes by several replicas are harmless); a user
    /// forgotten already ([`MessageStore::forget_user`]) is left out.
    async fn record_last_seen(&self, seen: &[(UserId, i64)]) -> Result<(), StoreError>;

    /// When each of `users` that has a record was last online (µs).
    async fn last_seen(&self, users: &[UserId]) -> Result<HashMap<UserId, i64>, StoreError>;

    /// Full-text search: up to `limit` live messages of `filter.chats`
    /// whose current text matches `filter.query` (never a deleted message
    /// nor a superseded reply), newest first (by stored order) or best
    /// match first, after `from`. Uses the engine's text index (FTS5 or a
    /// GIN `tsvector` index), kept in step with every write of a message's
    /// text in the same transaction.
    ///
    /// The work of one call is bounded where the engine would walk every
    /// match on the server (SQLite: its index holds every chat's words, and
    /// the chats are filtered after): newest first, a call steps through
    /// at most [`SEARCH_SCAN`] matches and, if it stops there short of
    /// `limit`, says where the next call goes on ([`SearchPage::scanned_to`]);
    /// best match first ranks every match, so a query with more than
    /// [`SEARCH_RANK_MAX`] is [`SearchPage::too_broad`].
    async fn search(
        &self,
        filter: &SearchFilter<'_>,
        from: Option<SearchCursor>,
        limit: u32,
    ) -> Result<SearchPage, StoreError>;

    /// Stops taking writes and waits for the writes queued before.
    async fn close(&self);
}

/// Opens (creating and migrating as needed) the messages store `config`
/// names, on its engine, and runs the backfills that are due ([`migrate`]
/// says which).
///
/// Errors: the URL names no supported engine, the database cannot be
/// reached or migrated, or a backfill fails.
pub async fn open(config: &DbConfig) -> Result<Arc<dyn MessageStore>, StoreError> {
    Ok(open_and_backfill(config).await?.0)
}

/// Migrates the messages store `config` names (created if missing) and
/// runs its backfills, as [`open`] does, then closes it: what `natter
/// migrate` does. Returns the migrations applied and the backfills run:
/// on PostgreSQL `search_index` (messages stored before search, indexed;
/// reported when there were any), then on both engines those recorded in
/// `store_backfills` that had not run yet ([`NFC_TEXT_BACKFILL`],
/// [`CHAT_DETAILS_BACKFILL`], [`REACTION_FORMS_BACKFILL`]).
///
/// Errors: as [`open`].
pub async fn migrate(config: &DbConfig) -> Result<Migrated, StoreError> {
    let migrator = match config.engine()? {
        Engine::Sqlite { .. } => &*crate::SQLITE_MIGRATOR,
        Engine::Postgres { .. } => &*crate::POSTGRES_MIGRATOR,
    };
    let applied = natter_db::migrate(config, migrator).await?;
    let (store, backfills) = open_and_backfill(config).await?;
    store.close().await;
    Ok(Migrated { applied, backfills })
}

/// [`open`], and the backfills it ran. On PostgreSQL they run under the
/// schema's backfill lock ([`natter_db::postgres::BackfillLock`]), so that
/// replicas starting together, or `natter migrate` and a replica, take
/// turns: the later one finds them recorded and runs none.
async fn open_and_backfill(config: &DbConfig) -> Result<(Arc<dyn MessageStore>, Vec<Backfilled>), StoreError> {
    match config.engine()? {
        Engine::Sqlite { path } => {
            let store = Arc::new(sqlite::SqliteStore::open(&path, config.pool.max_connections as usize).await?);
            let backfills = backfill(&*store).await?;
            Ok((store, backfills))
        }
        Engine::Postgres { url, schema } => {
            let store = Arc::new(postgres::PostgresStore::open(&url, &schema, &config.pool).await?);
            let lock = natter_db::postgres::BackfillLock::take(&url, &schema).await?;
            let backfills = async {
                let indexed = store.index_unindexed().await?;
                let mut backfills = Vec::new();
                if indexed > 0 {
                    tracing::info!(indexed, "messages stored before search indexed");
                    backfills.push(Backfilled { name: SEARCH_INDEX_BACKFILL.to_owned(), rewritten: indexed });
                }
                backfills.extend(backfill(&*store).await?);
                Ok::<_, StoreError>(backfills)
            }
            .await;
            lock.release().await;
            Ok((store, backfills?))
        }
    }
}

/// Runs each one-off rewrite of `store_backfills` that has not run on
/// `store`'s database yet, records it, and returns those it ran.
async fn backfill(store: &dyn MessageStore) -> Result<Vec<Backfilled>, StoreError> {
    let mut ran = Vec::new();
    if !store.backfilled(NFC_TEXT_BACKFILL).await? {
        let rewritten = store.normalize_texts().await?;
        store.record_backfill(NFC_TEXT_BACKFILL, natter_kit::time::now_micros()).await?;
        tracing::info!(rewritten, "messages' text stored in Unicode NFC");
        ran.push(Backfilled { name: NFC_TEXT_BACKFILL.to_owned(), rewritten });
    }
    if !store.backfilled(CHAT_DETAILS_BACKFILL).await? {
        let chats = store.scrub_chat_details().await?;
        store.record_backfill(CHAT_DETAILS_BACKFILL, natter_kit::time::now_micros()).await?;
        tracing::info!(chats, "replaced chat titles and descriptions removed from the change log");
        ran.push(Backfilled { name: CHAT_DETAILS_BACKFILL.to_owned(), rewritten: chats });
    }
    if !store.backfilled(REACTION_FORMS_BACKFILL).await? {
        let messages = store.canonicalize_reactions().await?;
        store.record_backfill(REACTION_FORMS_BACKFILL, natter_kit::time::now_micros()).await?;
        tracing::info!(messages, "reactions stored in other forms of their emoji rewritten");
        ran.push(Backfilled { name: REACTION_FORMS_BACKFILL.to_owned(), rewritten: messages });
    }
    Ok(ran)
}

/// The name [`migrate`] reports the indexing of messages stored before
/// search under (PostgreSQL's `search_vector`; SQLite's migration 0009
/// fills its index itself). Not a row of `store_backfills`: it looks for
/// unindexed messages at every start, which an index makes cheap.
pub const SEARCH_INDEX_BACKFILL: &str = "search_index";

/// The one-off rewrite of chat logs' replaced titles and descriptions
/// ([`MessageStore::scrub_chat_details`]), by its name in
/// `store_backfills`. On PostgreSQL, replicas opening together take turns
/// ([`open`]); on SQLite, processes opening one file together may both run
/// it: each writes every chat's current text, under the chat's lock.
pub const CHAT_DETAILS_BACKFILL: &str = "chat_details_text";

/// The one-off rewrite of reactions into their emoji's canonical form
/// ([`MessageStore::canonicalize_reactions`]), by its name in
/// `store_backfills`. On PostgreSQL, replicas opening together take turns
/// ([`open`]); on SQLite, processes opening one file together may both run
/// it: the second finds nothing left to rewrite.
pub const REACTION_FORMS_BACKFILL: &str = "reaction_forms";

/// The reactions' emoji among `stored` that are not in their canonical
/// form ([`crate::domain::canonical_emoji`]), each with that form; those it
/// refuses are left out (they stay as stored).
fn stale_emoji_forms(stored: Vec<String>) -> HashMap<String, String> {
    stored
        .into_iter()
        .filter_map(|emoji| match crate::domain::canonical_emoji(&emoji) {
            Ok(canonical) if canonical != emoji => Some((emoji, canonical)),
            _ => None,
        })
        .collect()
}

/// The one-off rewrite of messages' text in NFC
/// ([`MessageStore::normalize_texts`]), by its name in `store_backfills`.
/// On PostgreSQL, replicas opening together take turns ([`open`]); on
/// SQLite, processes opening one file together may both run it: each
/// writes the same text.
pub const NFC_TEXT_BACKFILL: &str = "nfc_text";

/// The SQL of [`MessageStore::list`] (both engines) and its seq bounds: `$1`
/// is the chat id, `$2, $3, ...` the bounds in order (each placeholder
/// appears once and in order, so SQLite's numbering by first appearance
/// agrees). The limit is written in: SQLite's planner looks at a bound
/// LIMIT, which makes a cached statement re-prepare on every run.
fn list_sql(range: Range, from: Option<Seq>, limit: u32) -> (String, Vec<i64>) {
    let mut sql = format!("SELECT {} FROM messages WHERE chat_id = $1", message_columns!());
    let mut bounds = Vec::with_capacity(3);
    let mut bound = |sql: &mut String, op: &str, value: Seq| {
        bounds.push(value.0);
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
    // A pin outlives a Regenerate: the pins list every pinned reply, as the
    // limit counts them.
    if !range.superseded && !range.pinned {
        sql.push_str(" AND superseded = 0");
    }
    if range.flagged {
        sql.push_str(&format!(" AND flag_severity >= {FLAGGED_FROM}"));
    }
    if range.pinned {
        // Walks the chat's few pins (`messages_pinned`), never the chat.
        sql.push_str(concat!(" AND ", pinned_sql!()));
    }
    match range.timeline {
        Timeline::Everything => {}
        Timeline::Main => sql.push_str(" AND thread_root_seq = 0"),
        Timeline::Thread(root) => {
            bounds.push(root.0);
            // The literal `> 0` lets both planners prove the partial
            // index's predicate, which a placeholder alone cannot.
            sql.push_str(&format!(" AND thread_root_seq > 0 AND thread_root_seq = ${}", bounds.len() + 1));
        }
    }
    let order = if range.ascending { "ASC" } else { "DESC" };
    sql.push_str(&format!(" ORDER BY seq {order} LIMIT {limit}"));
    (sql, bounds)
}

/// A stored UUID column as a typed id.
fn parse_id<T: std::str::FromStr>(column: &str, value: &str) -> Result<T, String> {
    value.parse().map_err(|_| format!("{column} {value:?} is not a UUID"))
}

/// A [`ChatChange`] as the columns of `chat_changes`: (kind, user_id,
/// details).
fn chat_change_row(change: &ChatChange) -> (&'static str, String, String) {
    let user = |u: &UserId| u.to_string();
    match change {
        ChatChange::Joined(u) => (JOINED, user(u), String::new()),
        ChatChange::Left(u) => ("left", user(u), String::new()),
        ChatChange::Removed(u) => ("removed", user(u), String::new()),
        ChatChange::RoleChanged(u) => ("role_changed", user(u), String::new()),
        ChatChange::Updated(details) => {
            ("updated", String::new(), serde_json::to_string(details).expect("details serialize"))
        }
    }
}

/// The [`ChatChange`] of the columns of `chat_changes` (kind, user_id,
/// details).
///
/// Errors: a kind this build does not know, a user id that is no UUID,
/// details that do not parse.
fn chat_change_of(kind: &str, user: &str, details: &str) -> Result<ChatChange, String> {
    let user = || parse_id::<UserId>("user_id", user);
    Ok(match kind {
        JOINED => ChatChange::Joined(user()?),
        "left" => ChatChange::Left(user()?),
        "removed" => ChatChange::Removed(user()?),
        "role_changed" => ChatChange::RoleChanged(user()?),
        "updated" => ChatChange::Updated(
            serde_json::from_str(details).map_err(|e| format!("chat change details {details:?}: {e}"))?,
        ),
        other => return Err(format!("unknown chat change kind {other:?}")),
    })
}

/// The bounds `[lo, hi)` of the binary search for the first seq of a chat
/// whose creation took a change number above `after`, for a chat whose
/// newest seq is `last_seq`: a message's creation number is at least its
/// seq (every seq before it took one too), so the answer is at most
/// `after + 1`; `hi` itself means "none".
pub(crate) fn created_after_bounds(after: i64, last_seq: i64) -> (i64, i64) {
    (1, after.max(0).min(last_seq) + 1)
}

/// The first seq in `[lo, hi)` whose message's creation took a change number
/// above `after`, or `hi` for none, by binary search: `create_change(seq)`
/// (None: no such row) reads one message. Creation numbers grow with seqs,
/// so the predicate is monotonic. A missing row (seqs are gap-free, tombstones
/// keep their rows, but a search must never skip a message) ends the search
/// early with its lower bound, which is never past the answer: the seq
/// range read from it is only longer.
pub(crate) fn first_seq_created_after<E>(
    (mut lo, mut hi): (i64, i64),
    after: i64,
    mut create_change: impl FnMut(i64) -> Result<Option<i64>, E>,
) -> Result<i64, E> {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match create_change(mid)? {
            Some(number) if number > after => hi = mid,
            Some(_) => lo = mid + 1,
            None => return Ok(lo),
        }
    }
    Ok(lo)
}

/// One page of [`MessageStore::changes`] from its sources (messages created
/// and unchanged since, messages changed since, the reader's position, the
/// chat's log), each read in change order with the same `limit`: merged in
/// change order and cut where a full source may hold more (a source that
/// returned `limit` rows may have further rows below the other sources'
/// later ones), so the page skips nothing. The flag says whether more may
/// follow.
fn merge_changes<const N: usize>(sources: [Vec<Change>; N], limit: u32) -> (Vec<Change>, bool) {
    let full = |source: &Vec<Change>| source.len() >= limit as usize;
    // The last number every full source is complete up to.
    let bound = sources.iter().filter(|s| full(s)).filter_map(|s| s.last().map(Change::change_seq)).min();
    let mut all: Vec<Change> = sources.into_iter().flatten().collect();
    all.sort_by_key(Change::change_seq);
    if let Some(bound) = bound {
        all.retain(|c| c.change_seq() <= bound);
    }
    let more = bound.is_some() || all.len() > limit as usize;
    all.truncate(limit as usize);
    (all, more)
}

#[cfg(test)]
mod merge_tests {
    use super::*;

    fn read(n: i64) -> Change {
        Change::Read { change_seq: n, user: UserId(uuid::Uuid::nil()), read_seq: Seq(n) }
    }

    #[test]
    fn the_search_finds_the_first_creation_after_a_point_and_never_passes_it() {
        // Seqs 1..=6 created at change numbers 1, 2, 5, 6, 9, 10 (edits and
        // membership changes took 3, 4, 7, 8).
        let created = [1, 2, 5, 6, 9, 10];
        let mut reads = 0;
        let mut find = |after: i64| {
            let bounds = created_after_bounds(after, created.len() as i64);
            first_seq_created_after::<()>(bounds, after, |seq| {
                reads += 1;
                Ok(created.get(seq as usize - 1).copied())
            })
            .unwrap()
        };
        let found: Vec<i64> = (0..=11).map(&mut find).collect();
        assert_eq!(found, [1, 2, 3, 3, 3, 4, 5, 5, 5, 6, 7, 7], "after 0..=11");
        assert!(reads <= 12 * 3, "about log2(6) reads a search: {reads}");
        // A missing row stops the search below the answer, never past it.
        let gap =
            first_seq_created_after::<()>((1, 7), 8, |seq| Ok((seq != 4).then(|| created[seq as usize - 1]))).unwrap();
        assert!(gap <= 5, "{gap}");
    }

    #[test]
    fn a_page_merges_in_change_order_and_stops_where_a_full_source_may_hold_more() {
        // Source 0 is full at 4 (limit 2): what it holds after 4 is unknown,
        // so 5 and 7 of the others wait for the next page.
        let (page, more) = merge_changes([vec![read(1), read(4)], vec![read(2), read(5)], vec![read(7)]], 2);
        assert_eq!(page.iter().map(Change::change_seq).collect::<Vec<_>>(), [1, 2]);
        assert!(more);
        let (page, more) = merge_changes([vec![read(6)], vec![read(5)], vec![read(7)]], 4);
        assert_eq!(page.iter().map(Change::change_seq).collect::<Vec<_>>(), [5, 6, 7]);
        assert!(!more);
        // No source is full, yet together they fill more than a page.
        let (page, more) = merge_changes([vec![read(1), read(3)], vec![read(2)], vec![read(4), read(5)]], 3);
        assert_eq!(page.iter().map(Change::change_seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(more);
    }

    #[test]
    fn chat_changes_round_trip_through_their_columns() {
        let user = UserId(uuid::Uuid::now_v7());
        let details = ChatDetails {
            fields: vec!["title".into()],
            title: "t".into(),
            description: "d".into(),
            public: true,
            archived: false,
            update_time: 7,
            assistant_replies: 2,
        };
        // An entry logged before assistant_replies existed still reads.
        let old =
            r#"{"fields":["title"],"title":"t","description":"d","public":true,"archived":false,"update_time":7}"#;
        assert_eq!(
            chat_change_of("updated", "", old),
            Ok(ChatChange::Updated(ChatDetails { assistant_replies: 0, ..details.clone() }))
        );
        for change in [
            ChatChange::Joined(user),
            ChatChange::Left(user),
            ChatChange::Removed(user),
            ChatChange::RoleChanged(user),
            ChatChange::Updated(details),
        ] {
            let (kind, user, details) = chat_change_row(&change);
            assert_eq!(chat_change_of(kind, &user, &details).unwrap(), change);
        }
        assert!(chat_change_of("exploded", "", "").is_err());
    }
}

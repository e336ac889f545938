//! The tonic face of the messages service: authenticate, validate and
//! convert at the boundary, call [`Messages`], convert back.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use natter_auth::Authenticator;
use natter_kit::id::{ChatId, MessageId, UserId};
use natter_kit::time::{timestamp, timestamp_opt};
use natter_kit::{FieldViolations, id, paging};
use natter_proto::messages::v1::{
    self as pb, message_internal_service_server::MessageInternalService, message_service_server::MessageService,
};
use pb::stream_events_response::Event;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::{
    self, Attachment, EditMessage, Limits, ListMessages, ListReadPositions, ListRevisions, MarkRead, React,
    SendMessage, WithHistory,
};
use crate::error::MessagesError;
use crate::presence::Seen;
use crate::registry::{StreamLimits, StreamRegistry};
use crate::search::{self, Query, SearchMessages};
use crate::service::Messages;
use crate::store::{
    Change, ChatChange, ChatDetails, Flags, Generation, GenerationInfo, Heads, Message, QueueFilter, Range, Reaction,
    Revision, Role, SearchCursor, Seq, StoredReport, Summary, Timeline,
};
use crate::stream::{self, EventStream, Follow, Resume};

/// Validates a SendMessage request against `limits`: INVALID_ARGUMENT listing
/// every field at fault, before anything reaches the writer's batch.
pub fn send_request(r: pb::SendMessageRequest, limits: &Limits) -> Result<SendMessage, Status> {
    let mut violations = FieldViolations::new();
    if r.attachments.len() > limits.attachments {
        violations.add("attachments", format!("at most {} attachments (limit attachments)", limits.attachments));
    }
    let mut attachments = Vec::with_capacity(r.attachments.len());
    for (i, a) in r.attachments.into_iter().enumerate().take(limits.attachments) {
        let field = format!("attachments[{i}]");
        if a.kind != pb::AttachmentKind::Image as i32 {
            violations.add(format!("{field}.kind"), "must be ATTACHMENT_KIND_IMAGE");
        }
        let a = Attachment {
            url: a.url,
            mime_type: a.mime_type,
            width: a.width,
            height: a.height,
            size_bytes: a.size_bytes,
        };
        for (field, description) in domain::check_attachment(&field, &a, limits) {
            violations.add(field, description);
        }
        attachments.push(a);
    }
    let text = domain::nfc_within(r.text, limits.text_bytes);
    if let Err((field, description)) = domain::check_text("text", &text, !attachments.is_empty(), limits) {
        violations.add(field, description);
    }
    if r.reply_to_seq < 0 {
        violations.add("reply_to_seq", "must not be negative");
    }
    if r.thread_root_seq < 0 {
        violations.add("thread_root_seq", "must not be negative");
    }
    let mentions = domain::mentions(&r.mention_user_ids).unwrap_or_else(|faults| {
        for (field, description) in faults {
            violations.add(field, description);
        }
        Vec::new()
    });
    violations.check()?;
    Ok(SendMessage {
        chat_id: ChatId::parse("chat_id", &r.chat_id)?,
        message_id: MessageId::parse_optional("message_id", &r.message_id)?,
        text,
        attachments,
        reply_to: (r.reply_to_seq > 0).then_some(Seq(r.reply_to_seq)),
        mentions,
        thread_root: (r.thread_root_seq > 0).then_some(Seq(r.thread_root_seq)),
    })
}

/// Validates an EditMessage request.
pub fn edit_request(r: pb::EditMessageRequest, limits: &Limits) -> Result<EditMessage, Status> {
    let message_id = MessageId::parse("message_id", &r.message_id)?;
    let text = domain::nfc_within(r.text, limits.text_bytes);
    domain::check_text("text", &text, false, limits)
        .map_err(|(field, description)| FieldViolations::single(field, description).into_status())?;
    Ok(EditMessage { message_id, text })
}

/// Validates an AddReaction (`add`) or RemoveReaction request's fields:
/// INVALID_ARGUMENT naming `message_id` and `emoji`, each at fault.
/// The emoji is taken in canonical form ([`domain::canonical_emoji`]); a
/// removal also takes back the form sent, when that passes the rule before
/// canonical forms ([`domain::check_emoji`]) and differs.
pub fn react_request(message_id_text: &str, emoji: String, add: bool) -> Result<React, Status> {
    let mut violations = FieldViolations::new();
    let message_id = MessageId::parse("message_id", message_id_text);
    let old_form = !add && domain::check_emoji(&emoji).is_ok();
    let (canonical, as_sent) = match domain::canonical_emoji(&emoji) {
        Ok(canonical) => {
            let as_sent = (old_form && canonical != emoji).then_some(emoji);
            (canonical, as_sent)
        }
        // No emoji of the list now, but one a reaction may be stored under.
        Err(_) if old_form => (emoji, None),
        Err(reason) => {
            violations.add("emoji", reason);
            (emoji, None)
        }
    };
    if message_id.is_err() {
        violations.add("message_id", if message_id_text.is_empty() { "is required" } else { "must be a UUID" });
    }
    violations.check()?;
    Ok(React { message_id: message_id?, emoji: canonical, add, as_sent })
}

/// The protobuf form of a reaction.
pub(crate) fn reaction_pb(r: Reaction) -> pb::Reaction {
    pb::Reaction { emoji: r.emoji, count: i32::try_from(r.count).unwrap_or(i32::MAX), reacted_by_me: r.mine }
}

/// Validates a ListMessages request: the command and the fingerprint of its
/// filters, which its page tokens carry.
pub fn list_request(r: &pb::ListMessagesRequest) -> Result<(ListMessages, u64), Status> {
    let chat_id = ChatId::parse("chat_id", &r.chat_id)?;
    let page_size = paging::page_size("page_size", r.page_size, domain::MESSAGE_PAGE_DEFAULT, domain::PAGE_MAX)?;
    let ascending = match pb::SortOrder::try_from(r.order) {
        Ok(pb::SortOrder::Unspecified | pb::SortOrder::Desc) => false,
        Ok(pb::SortOrder::Asc) => true,
        Err(_) => return Err(FieldViolations::single("order", "unknown sort order").into_status()),
    };
    for (field, seq) in
        [("before_seq", r.before_seq), ("after_seq", r.after_seq), ("thread_root_seq", r.thread_root_seq)]
    {
        if seq < 0 {
            return Err(FieldViolations::single(field, "must not be negative").into_status());
        }
    }
    let timeline = match (r.thread_root_seq, r.include_thread_replies) {
        // A chat's pins are few, and a pinned thread reply is one of them.
        (0, false) if r.pinned => Timeline::Everything,
        (0, false) => Timeline::Main,
        (0, true) => Timeline::Everything,
        (root, false) => Timeline::Thread(Seq(root)),
        (_, true) => {
            let reason = "a thread's page holds only thread replies: leave include_thread_replies unset";
            return Err(FieldViolations::single("include_thread_replies", reason).into_status());
        }
    };
    let (before, after) = ((r.before_seq > 0).then_some(r.before_seq), (r.after_seq > 0).then_some(r.after_seq));
    let fingerprint = paging::fingerprint(&[
        &chat_id.0,
        &before,
        &after,
        &ascending,
        &r.include_history,
        &r.flagged,
        &r.thread_root_seq,
        &r.include_thread_replies,
    ]);
    // Folded in only when set, so page tokens of listings without it stay
    // what they were.
    let fingerprint = if r.pinned { paging::fingerprint(&[&fingerprint, &"pinned"]) } else { fingerprint };
    let from = paging::decode::<i64>("page_token", &r.page_token, fingerprint)?.map(Seq);
    let range = Range {
        before: before.map(Seq),
        after: after.map(Seq),
        ascending,
        superseded: r.include_history,
        flagged: r.flagged,
        pinned: r.pinned,
        timeline,
    };
    Ok((ListMessages { chat_id, range, from, page_size, include_history: r.include_history }, fingerprint))
}

/// Validates a SearchMessages request: the command and the fingerprint of
/// its query, chat and order, which its page tokens carry. INVALID_ARGUMENT
/// lists every field at fault.
pub fn search_request(r: &pb::SearchMessagesRequest) -> Result<(SearchMessages, u64), Status> {
    let query = domain::nfc_within(r.query.clone(), crate::search::QUERY_MAX_BYTES);
    let query = Query::parse(&query).map_err(|reason| ("query", reason));
    let chat_id = ChatId::parse_optional("chat_id", &r.chat_id).map_err(|_| ("chat_id", "must be a UUID".to_owned()));
    let relevance = match r.order_by.trim() {
        "" | "send_time desc" => Ok(false),
        "relevance" => Ok(true),
        _ => Err(("order_by", "must be \"\", \"send_time desc\" or \"relevance\"".to_owned())),
    };
    let page_size = paging::page_size("page_size", r.page_size, search::SEARCH_PAGE_DEFAULT, search::SEARCH_PAGE_MAX)
        .map_err(|_| ("page_size", "must not be negative".to_owned()));
    let (query, chat_id, relevance, page_size) = match (query, chat_id, relevance, page_size) {
        (Ok(q), Ok(c), Ok(o), Ok(p)) => (q, c, o, p),
        (q, c, o, p) => {
            let mut violations = FieldViolations::new();
            for (field, reason) in [q.err(), c.err(), o.err(), p.err()].into_iter().flatten() {
                violations.add(field, reason);
            }
            return Err(violations.into_status());
        }
    };
    let fingerprint = paging::fingerprint(&[&r.query, &chat_id.map(|c| c.0), &relevance]);
    // The rank travels as its bits: a float's decimal form need not parse
    // back to the same float, and the next page starts after it exactly.
    // No rank the server gives is NaN or infinite: a forged one would page
    // differently on each engine (SQLite: nothing; PostgreSQL: the first
    // page again).
    let from = paging::decode::<(u64, i64)>("page_token", &r.page_token, fingerprint)?
        .map(|(rank, position)| SearchCursor { rank: f64::from_bits(rank), position });
    if from.is_some_and(|c| !c.rank.is_finite()) {
        return Err(natter_kit::error::invalid_argument("page_token", "is not a page token issued by this server"));
    }
    Ok((SearchMessages { query, chat_id, page_size, from, relevance }, fingerprint))
}

/// Validates a ListMessageRevisions request: the command and the
/// fingerprint its page tokens carry.
pub fn revisions_request(r: &pb::ListMessageRevisionsRequest) -> Result<(ListRevisions, u64), Status> {
    let message_id = MessageId::parse("message_id", &r.message_id)?;
    let page_size = paging::page_size("page_size", r.page_size, domain::REVISION_PAGE_DEFAULT, domain::PAGE_MAX)?;
    let fingerprint = paging::fingerprint(&[&message_id.0]);
    let after = paging::decode("page_token", &r.page_token, fingerprint)?;
    Ok((ListRevisions { message_id, after, page_size }, fingerprint))
}

/// Validates a ListReadPositions request: the command and the fingerprint
/// its page tokens carry (the chat's).
pub fn read_positions_request(r: &pb::ListReadPositionsRequest) -> Result<(ListReadPositions, u64), Status> {
    let chat_id = ChatId::parse("chat_id", &r.chat_id)?;
    let page_size = paging::page_size("page_size", r.page_size, domain::PAGE_MAX, domain::PAGE_MAX)?;
    let fingerprint = paging::fingerprint(&[&chat_id.0]);
    let after = paging::decode::<String>("page_token", &r.page_token, fingerprint)?;
    let after = after.map(|user| UserId::parse("page_token", &user)).transpose()?;
    Ok((ListReadPositions { chat_id, after, page_size }, fingerprint))
}

/// Validates a MarkRead request.
pub fn mark_read_request(r: &pb::MarkReadRequest) -> Result<MarkRead, Status> {
    let chat_id = ChatId::parse("chat_id", &r.chat_id)?;
    if r.seq < 0 {
        return Err(FieldViolations::single("seq", "must not be negative").into_status());
    }
    Ok(MarkRead { chat_id, seq: Seq(r.seq) })
}

/// Parses the ids of an internal request (from the chats service), naming
/// the first malformed one.
fn parse_ids<T: From<Uuid>>(field: &str, ids: &[String]) -> Result<Vec<T>, Status> {
    ids.iter().enumerate().map(|(i, s)| id::parse(&format!("{field}[{i}]"), s).map(T::from)).collect()
}

/// The protobuf form of a message (tombstones carry no content).
pub fn message_pb(m: Message, history: Vec<pb::Revision>) -> pb::Message {
    let role = match m.role() {
        Role::User => pb::MessageRole::User,
        Role::Assistant => pb::MessageRole::Assistant,
    } as i32;
    let (generation_status, replaces_message_id, superseded) =
        (m.generation().map_or(0, |g| g as i32), m.replaces().map(|r| r.to_string()), m.superseded());
    let attachments = m
        .attachments
        .into_iter()
        .map(|a| pb::Attachment {
            kind: pb::AttachmentKind::Image as i32,
            url: a.url,
            mime_type: a.mime_type,
            width: a.width,
            height: a.height,
            size_bytes: a.size_bytes,
        })
        .collect();
    pb::Message {
        id: m.id.to_string(),
        chat_id: m.chat_id.to_string(),
        seq: m.seq.0,
        author_id: m.author_id.to_string(),
        text: m.text,
        attachments,
        reply_to_seq: m.reply_to.map_or(0, |s| s.0),
        send_time: Some(timestamp(m.send_time)),
        edit_time: timestamp_opt(m.edit_time),
        revision: i32::try_from(m.revision).unwrap_or(i32::MAX),
        deleted: m.delete_time.is_some(),
        history,
        change_seq: m.change_seq,
        role,
        generation_status,
        replaces_message_id: replaces_message_id.unwrap_or_default(),
        superseded,
        flags: m.flags.map(|f| pb::MessageFlags {
            flagged: f.flagged(),
            score: f32::from(f.score_millis) / 1000.0,
            severity: f.severity,
            categories: f.categories,
            detector: f.detector,
        }),
        reactions: m.reactions.into_iter().map(reaction_pb).collect(),
        mention_user_ids: m.mentions.iter().map(UserId::to_string).collect(),
        thread_root_seq: m.thread_root.map_or(0, |s| s.0),
        thread: m.thread.map(|t| pb::ThreadSummary {
            reply_count: i32::try_from(t.replies).unwrap_or(i32::MAX),
            last_reply_time: Some(timestamp(t.last_reply_time)),
            participants: t.participants.iter().map(UserId::to_string).collect(),
        }),
        pin_time: m.pin.map(|p| timestamp(p.time)),
        pinned_by_id: m.pin.map(|p| p.by.to_string()).unwrap_or_default(),
        generation: m.reply.and_then(|r| r.info).map(|i| pb::GenerationInfo {
            model: i.model,
            finish_reason: i.finish_reason,
            prompt_tokens: i.prompt_tokens,
            completion_tokens: i.completion_tokens,
            error: i.error,
        }),
    }
}

/// The protobuf form of a message and its earlier revisions.
fn with_history_pb(m: WithHistory) -> pb::Message {
    message_pb(m.message, m.history.into_iter().map(revision_pb).collect())
}

/// The protobuf form of a revision.
fn revision_pb(r: Revision) -> pb::Revision {
    pb::Revision {
        revision: i32::try_from(r.revision).unwrap_or(i32::MAX),
        text: r.text,
        edit_time: Some(timestamp(r.edit_time)),
    }
}

/// The protobuf form of a chat's preview (`chat_id` as the caller wrote
/// it); the text is cut to 200 characters.
fn summary_pb(chat_id: String, s: Summary) -> pb::ChatSummary {
    let max_severity = if s.max_severity >= crate::store::FLAGGED_FROM { s.max_severity } else { 0 };
    match s.newest {
        Some(m) => pb::ChatSummary {
            chat_id,
            last_seq: m.seq.0,
            last_author_id: m.author_id.to_string(),
            last_text: m.text.chars().take(200).collect(),
            last_send_time: Some(timestamp(m.send_time)),
            unread_count: s.unread,
            mention_count: s.mentions,
            message_count: s.message_count,
            max_severity,
        },
        None => pb::ChatSummary { chat_id, message_count: s.message_count, max_severity, ..Default::default() },
    }
}

/// The stream event `event` of `message`, with the message's seq and
/// change number.
fn message_event(message: pb::Message, event: fn(pb::Message) -> Event) -> pb::StreamEventsResponse {
    pb::StreamEventsResponse {
        chat_id: message.chat_id.clone(),
        seq: message.seq,
        change_seq: message.change_seq,
        event: Some(event(message)),
    }
}

/// The stream event announcing a new message.
pub fn created_event(message: pb::Message) -> pb::StreamEventsResponse {
    message_event(message, Event::MessageCreated)
}

/// The stream event announcing an edit.
pub(crate) fn edited_event(m: Message) -> pb::StreamEventsResponse {
    message_event(message_pb(m, Vec::new()), Event::MessageEdited)
}

/// The stream event announcing a tombstone.
pub(crate) fn deleted_event(m: Message) -> pb::StreamEventsResponse {
    message_event(message_pb(m, Vec::new()), Event::MessageDeleted)
}

/// The stream event announcing a user's new read position, change
/// `change_seq` of the chat.
pub(crate) fn read_event(chat: ChatId, user: UserId, read_seq: Seq, change_seq: i64) -> pb::StreamEventsResponse {
    pb::StreamEventsResponse {
        chat_id: chat.to_string(),
        seq: read_seq.0,
        change_seq,
        event: Some(Event::ReadUpdated(pb::ReadUpdated { user_id: user.to_string(), read_seq: read_seq.0 })),
    }
}

/// The ephemeral stream event of `user` typing in `chat` until `until` (µs
/// since the epoch). Its change_seq is 0 on the bus: each stream sends it
/// with its own last change number of the chat.
pub(crate) fn typing_event(chat: ChatId, user: UserId, until: i64) -> pb::StreamEventsResponse {
    pb::StreamEventsResponse {
        chat_id: chat.to_string(),
        seq: 0,
        change_seq: 0,
        event: Some(Event::Typing(pb::Typing { user_id: user.to_string(), until: Some(timestamp(until)) })),
    }
}

/// A user's presence as the API shows it (see [`Seen`]).
pub(crate) fn presence_pb(user: UserId, seen: Seen) -> pb::Presence {
    let (state, last_seen) = match seen {
        Seen::Hidden => (pb::PresenceState::Unspecified, None),
        Seen::Online => (pb::PresenceState::Online, None),
        Seen::Offline(at) => (pb::PresenceState::Offline, at),
    };
    pb::Presence { user_id: user.to_string(), state: state as i32, last_seen_time: timestamp_opt(last_seen) }
}

/// The ephemeral stream event of a user's presence change: no chat and
/// change number 0 on the bus; each stream sends it with one of its chats
/// the user is in and its own last change number of that chat.
pub(crate) fn presence_event(user: UserId, seen: Seen) -> pb::StreamEventsResponse {
    pb::StreamEventsResponse {
        chat_id: String::new(),
        seq: 0,
        change_seq: 0,
        event: Some(Event::PresenceChanged(presence_pb(user, seen))),
    }
}

/// Most ids of one GetPresence request.
pub const PRESENCE_IDS_MAX: usize = 100;

/// Validates a GetPresence request: 1 to [`PRESENCE_IDS_MAX`] well-formed
/// user ids (INVALID_ARGUMENT naming `user_ids` or `user_ids[i]`).
pub fn presence_request(r: &pb::GetPresenceRequest) -> Result<Vec<UserId>, Status> {
    if r.user_ids.is_empty() || r.user_ids.len() > PRESENCE_IDS_MAX {
        return Err(FieldViolations::single("user_ids", format!("must hold 1 to {PRESENCE_IDS_MAX} ids")).into_status());
    }
    parse_ids("user_ids", &r.user_ids)
}

/// The stream event of a change of a chat's membership or details, change
/// `change_seq` of the chat, whose newest seq was `seq` at the time.
pub(crate) fn chat_change_event(
    chat: ChatId,
    change: &ChatChange,
    seq: Seq,
    change_seq: i64,
) -> pb::StreamEventsResponse {
    let membership = |user: &UserId, change: pb::MembershipChange| {
        Event::MembershipChanged(pb::MembershipChanged { user_id: user.to_string(), change: change as i32 })
    };
    let event = match change {
        ChatChange::Joined(u) => membership(u, pb::MembershipChange::Joined),
        ChatChange::Left(u) => membership(u, pb::MembershipChange::Left),
        ChatChange::Removed(u) => membership(u, pb::MembershipChange::Removed),
        ChatChange::RoleChanged(u) => membership(u, pb::MembershipChange::RoleChanged),
        ChatChange::Updated(d) => Event::ChatUpdated(pb::ChatUpdated {
            update_mask: Some(prost_types::FieldMask { paths: d.fields.clone() }),
            title: d.title.clone(),
            description: d.description.clone(),
            public: d.public,
            archived: d.archived,
            update_time: Some(timestamp(d.update_time)),
            assistant_replies: d.assistant_replies,
        }),
    };
    pb::StreamEventsResponse { chat_id: chat.to_string(), seq: seq.0, change_seq, event: Some(event) }
}

/// Why a stream resets a chat instead of replaying it ([`pb::ChatReset`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetReason {
    /// The resume point is older than the chat's log keeps.
    LogTruncated,
    /// The resume point is newer than the chat's newest change.
    AheadOfServer,
}

/// The stream event telling a client to re-read `chat` and resume from
/// `heads.change`.
pub(crate) fn reset_event(chat: ChatId, heads: Heads, reason: ResetReason) -> pb::StreamEventsResponse {
    let reason = match reason {
        ResetReason::LogTruncated => "log_truncated",
        ResetReason::AheadOfServer => "ahead_of_server",
    };
    pb::StreamEventsResponse {
        chat_id: chat.to_string(),
        seq: heads.seq.0,
        change_seq: heads.change,
        event: Some(Event::ChatReset(pb::ChatReset { reason: reason.to_owned() })),
    }
}

/// The stream event replaying `change` to a client whose resume point was
/// `since`: a message it never saw (created after `since`) arrives as
/// created, in its current state; a tombstone as deleted; any other as
/// edited.
pub(crate) fn replay_event(chat: ChatId, change: Change, since: i64) -> pb::StreamEventsResponse {
    match change {
        Change::Message(m) if m.deleted() => deleted_event(m),
        Change::Message(m) if m.create_change > since => created_event(message_pb(m, Vec::new())),
        Change::Message(m) => edited_event(m),
        Change::Read { change_seq, user, read_seq } => read_event(chat, user, read_seq, change_seq),
        Change::Chat { change_seq, change, seq, .. } => chat_change_event(chat, &change, seq, change_seq),
    }
}

/// A change of a RecordChatChanges request kept on the chat's heads row,
/// not logged: a direct chat's closure (`direct_chat_closed`), a
/// departure's members version (`members_departed`) or a chat's archived
/// state (`chat_archived`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadsChange {
    /// The change's place among the request's changes.
    pub index: usize,
    /// 1 or more.
    pub version: i64,
    pub kind: HeadsKind,
}

/// What a [`HeadsChange`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadsKind {
    /// Whether the direct chat is closed by a block.
    Closed(bool),
    /// Whether the chat is archived.
    Archived(bool),
    /// A departure's (or a loss of rights') members version.
    Departed,
}

/// The validated chat changes of a RecordChatChanges request: those logged,
/// in order, and those kept on the heads row, which are not.
///
/// Errors: INVALID_ARGUMENT for no changes, more than
/// [`domain::CHAT_CHANGES_MAX`], a change with no event or an unknown
/// membership change, a malformed user id, a closure's, a departure's or
/// an archived state's version below 1, or an idempotency key longer than
/// [`domain::IDEMPOTENCY_KEY_MAX`] (each naming its field).
pub fn chat_changes_request(
    r: &pb::RecordChatChangesRequest,
) -> Result<(ChatId, Vec<ChatChange>, Vec<HeadsChange>), Status> {
    let chat = ChatId::parse("chat_id", &r.chat_id)?;
    if r.idempotency_key.len() > domain::IDEMPOTENCY_KEY_MAX {
        let max = domain::IDEMPOTENCY_KEY_MAX;
        return Err(FieldViolations::single("idempotency_key", format!("at most {max} characters")).into_status());
    }
    if r.changes.is_empty() || r.changes.len() > domain::CHAT_CHANGES_MAX {
        return Err(
            FieldViolations::single("changes", format!("1 to {} changes", domain::CHAT_CHANGES_MAX)).into_status()
        );
    }
    let mut changes = Vec::with_capacity(r.changes.len());
    let mut kept = Vec::new();
    for (i, c) in r.changes.iter().enumerate() {
        let field = format!("changes[{i}]");
        let heads_change = match &c.change {
            Some(pb::chat_change::Change::DirectChatClosed(c)) => {
                Some(("direct_chat_closed", c.version, HeadsKind::Closed(c.closed)))
            }
            Some(pb::chat_change::Change::MembersDeparted(d)) => {
                Some(("members_departed", d.version, HeadsKind::Departed))
            }
            Some(pb::chat_change::Change::ChatArchived(a)) => {
                Some(("chat_archived", a.version, HeadsKind::Archived(a.archived)))
            }
            _ => None,
        };
        if let Some((name, version, kind)) = heads_change {
            if version < 1 {
                return Err(
                    FieldViolations::single(format!("{field}.{name}.version"), "must be 1 or more").into_status()
                );
            }
            kept.push(HeadsChange { index: i, version, kind });
            continue;
        }
        let change = match &c.change {
            Some(
                pb::chat_change::Change::DirectChatClosed(_)
                | pb::chat_change::Change::MembersDeparted(_)
                | pb::chat_change::Change::ChatArchived(_),
            ) => {
                continue;
            }
            Some(pb::chat_change::Change::MembershipChanged(m)) => {
                let user = UserId::parse(&format!("{field}.membership_changed.user_id"), &m.user_id)?;
                match pb::MembershipChange::try_from(m.change) {
                    Ok(pb::MembershipChange::Joined) => ChatChange::Joined(user),
                    Ok(pb::MembershipChange::Left) => ChatChange::Left(user),
                    Ok(pb::MembershipChange::Removed) => ChatChange::Removed(user),
                    Ok(pb::MembershipChange::RoleChanged) => ChatChange::RoleChanged(user),
                    _ => {
                        return Err(FieldViolations::single(
                            format!("{field}.membership_changed.change"),
                            "must be JOINED, LEFT, REMOVED or ROLE_CHANGED",
                        )
                        .into_status());
                    }
                }
            }
            Some(pb::chat_change::Change::ChatUpdated(u)) => ChatChange::Updated(ChatDetails {
                fields: u.update_mask.as_ref().map(|m| m.paths.clone()).unwrap_or_default(),
                title: u.title.clone(),
                description: u.description.clone(),
                public: u.public,
                archived: u.archived,
                update_time: u.update_time.as_ref().map_or(0, natter_kit::time::micros),
                assistant_replies: u.assistant_replies,
            }),
            None => return Err(FieldViolations::single(field, "names no change").into_status()),
        };
        changes.push(change);
    }
    Ok((chat, changes, kept))
}

/// The chat ids of a StreamEvents request, parsed and de-duplicated (first
/// occurrence kept, in linear time), and its resume points (a chat in both
/// maps resumes by change number; a resume entry keyed by the empty
/// string, the chat_id of user_updated, account_updated and
/// ephemeral_lost, is ignored).
///
/// Errors: INVALID_ARGUMENT naming `chat_ids`, `resume` or `resume_changes`
/// when one has more than `limits.chats_per_request` entries (checked before
/// anything is parsed), or the first malformed id or negative resume point.
pub fn follow_request(
    r: pb::StreamEventsRequest,
    limits: &StreamLimits,
) -> Result<(Vec<Uuid>, HashMap<Uuid, Resume>), Status> {
    let max = limits.chats_per_request;
    // The empty key, ignored below, takes no place.
    let points = |map: &HashMap<String, i64>| map.len() - usize::from(map.contains_key(""));
    let mut too_many = FieldViolations::new();
    for (field, len) in
        [("chat_ids", r.chat_ids.len()), ("resume", points(&r.resume)), ("resume_changes", points(&r.resume_changes))]
    {
        if len > max {
            too_many.add(field, format!("at most {max} entries (limit max_stream_chats)"));
        }
    }
    too_many.check()?;
    let mut seen = HashSet::with_capacity(r.chat_ids.len());
    let mut chat_ids = Vec::with_capacity(r.chat_ids.len());
    for (i, c) in r.chat_ids.iter().enumerate() {
        let chat = id::parse(&format!("chat_ids[{i}]"), c)?;
        if seen.insert(chat) {
            chat_ids.push(chat);
        }
    }
    let mut resume = HashMap::with_capacity(r.resume.len() + r.resume_changes.len());
    for (field, map, by_change) in [("resume", &r.resume, false), ("resume_changes", &r.resume_changes, true)] {
        for (chat, point) in map {
            // An empty key names no chat: it is the chat_id of the events of
            // no chat (user_updated, account_updated, ephemeral_lost),
            // which a client keeping every event's change_seq by its chat_id
            // sends back. Ignored, as a chat no longer followed is.
            if chat.is_empty() {
                continue;
            }
            // The key is not echoed: it may be anything up to the request size.
            let chat = Uuid::try_parse(chat).map_err(|_| MessagesError::invalid(field, "keys must be chat UUIDs"))?;
            if *point < 0 {
                return Err(MessagesError::invalid(format!("{field}[{chat}]"), "must not be negative").into());
            }
            resume.insert(chat, if by_change { Resume::Changes(*point) } else { Resume::Seq(Seq(*point)) });
        }
    }
    Ok((chat_ids, resume))
}

/// `natter.messages.v1.MessageService`.
#[derive(Clone)]
pub struct MessageApi {
    messages: Arc<Messages>,
    auth: Authenticator,
    shutdown: CancellationToken,
    streams: Arc<StreamRegistry>,
}

impl MessageApi {
    /// The public API; open streams end when `shutdown` is cancelled. Starts
    /// the periodic re-check of open streams' sessions (see
    /// [`StreamRegistry::spawn_session_recheck`]); call within a Tokio
    /// runtime.
    pub fn new(messages: Arc<Messages>, auth: Authenticator, shutdown: CancellationToken) -> Self {
        let streams = StreamRegistry::new(*messages.stream_limits());
        streams.spawn_session_recheck(auth.clone(), shutdown.clone());
        Self { messages, auth, shutdown, streams }
    }

    /// The open streams of this API (for tests).
    pub fn streams(&self) -> &Arc<StreamRegistry> {
        &self.streams
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<UserId, Status> {
        Ok(UserId(self.auth.authenticate(request).await?.user_id))
    }
}

#[tonic::async_trait]
impl MessageService for MessageApi {
    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let caller = self.caller(&request).await?;
        let send = send_request(request.into_inner(), self.messages.limits())?;
        let message = self.messages.send(caller, send).await?;
        Ok(Response::new(pb::SendMessageResponse { message: Some(message_pb(message, Vec::new())) }))
    }

    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let caller = self.caller(&request).await?;
        let (list, fingerprint) = list_request(request.get_ref())?;
        let (messages, next) = self.messages.list(caller, list).await?;
        Ok(Response::new(pb::ListMessagesResponse {
            messages: messages.into_iter().map(with_history_pb).collect(),
            next_page_token: next.map(|seq| paging::encode(&seq.0, fingerprint)).unwrap_or_default(),
        }))
    }

    async fn get_message(
        &self,
        request: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::GetMessageResponse>, Status> {
        let caller = self.caller(&request).await?;
        let message_id = MessageId::parse("message_id", &request.get_ref().message_id)?;
        let message = self.messages.get(caller, message_id).await?;
        Ok(Response::new(pb::GetMessageResponse { message: Some(message_pb(message, Vec::new())) }))
    }

    async fn edit_message(
        &self,
        request: Request<pb::EditMessageRequest>,
    ) -> Result<Response<pb::EditMessageResponse>, Status> {
        let caller = self.caller(&request).await?;
        let edit = edit_request(request.into_inner(), self.messages.limits())?;
        let message = self.messages.edit(caller, edit).await?;
        Ok(Response::new(pb::EditMessageResponse { message: Some(message_pb(message, Vec::new())) }))
    }

    async fn delete_message(
        &self,
        request: Request<pb::DeleteMessageRequest>,
    ) -> Result<Response<pb::DeleteMessageResponse>, Status> {
        let caller = self.caller(&request).await?;
        let message_id = MessageId::parse("message_id", &request.get_ref().message_id)?;
        let message = self.messages.delete(caller, message_id).await?;
        Ok(Response::new(pb::DeleteMessageResponse { message: Some(message_pb(message, Vec::new())) }))
    }

    async fn add_reaction(
        &self,
        request: Request<pb::AddReactionRequest>,
    ) -> Result<Response<pb::AddReactionResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let message = self.messages.react(caller, react_request(&r.message_id, r.emoji, true)?).await?;
        Ok(Response::new(pb::AddReactionResponse { message: Some(message_pb(message, Vec::new())) }))
    }

    async fn remove_reaction(
        &self,
        request: Request<pb::RemoveReactionRequest>,
    ) -> Result<Response<pb::RemoveReactionResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let message = self.messages.react(caller, react_request(&r.message_id, r.emoji, false)?).await?;
        Ok(Response::new(pb::RemoveReactionResponse { message: Some(message_pb(message, Vec::new())) }))
    }

    async fn pin_message(
        &self,
        request: Request<pb::PinMessageRequest>,
    ) -> Result<Response<pb::PinMessageResponse>, Status> {
        let caller = self.caller(&request).await?;
        let id = MessageId::parse("message_id", &request.get_ref().message_id)?;
        let message = self.messages.pin(caller, id, true).await?;
        Ok(Response::new(pb::PinMessageResponse { message: Some(message_pb(message, Vec::new())) }))
    }

    async fn unpin_message(
        &self,
        request: Request<pb::UnpinMessageRequest>,
    ) -> Result<Response<pb::UnpinMessageResponse>, Status> {
        let caller = self.caller(&request).await?;
        let id = MessageId::parse("message_id", &request.get_ref().message_id)?;
        let message = self.messages.pin(caller, id, false).await?;
        Ok(Response::new(pb::UnpinMessageResponse { message: Some(message_pb(message, Vec::new())) }))
    }

    async fn list_message_revisions(
        &self,
        request: Request<pb::ListMessageRevisionsRequest>,
    ) -> Result<Response<pb::ListMessageRevisionsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let (list, fingerprint) = revisions_request(request.get_ref())?;
        let (revisions, next) = self.messages.revisions(caller, list).await?;
        Ok(Response::new(pb::ListMessageRevisionsResponse {
            revisions: revisions.into_iter().map(revision_pb).collect(),
            next_page_token: next.map(|k| paging::encode(&k, fingerprint)).unwrap_or_default(),
        }))
    }

    async fn mark_read(&self, request: Request<pb::MarkReadRequest>) -> Result<Response<pb::MarkReadResponse>, Status> {
        let caller = self.caller(&request).await?;
        let mark = mark_read_request(request.get_ref())?;
        let state = self.messages.mark_read(caller, mark).await?;
        Ok(Response::new(pb::MarkReadResponse { read_seq: state.read_seq.0, unread_count: state.unread }))
    }

    async fn list_read_positions(
        &self,
        request: Request<pb::ListReadPositionsRequest>,
    ) -> Result<Response<pb::ListReadPositionsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let (list, fingerprint) = read_positions_request(request.get_ref())?;
        let (positions, next) = self.messages.chat_read_positions(caller, list).await?;
        Ok(Response::new(pb::ListReadPositionsResponse {
            read_positions: positions
                .into_iter()
                .map(|(user, seq)| pb::ReadPosition { user_id: user.to_string(), read_seq: seq.0 })
                .collect(),
            next_page_token: next.map(|u| paging::encode(&u.to_string(), fingerprint)).unwrap_or_default(),
        }))
    }

    async fn set_typing(
        &self,
        request: Request<pb::SetTypingRequest>,
    ) -> Result<Response<pb::SetTypingResponse>, Status> {
        let caller = self.caller(&request).await?;
        let chat = ChatId::parse("chat_id", &request.get_ref().chat_id)?;
        let until = self.messages.set_typing(caller, chat, request.get_ref().typing).await?;
        Ok(Response::new(pb::SetTypingResponse { until: Some(timestamp(until)) }))
    }

    async fn report_message(
        &self,
        request: Request<pb::ReportMessageRequest>,
    ) -> Result<Response<pb::ReportMessageResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let mut violations = FieldViolations::new();
        let message_id = MessageId::parse("message_id", &r.message_id);
        match pb::ReportReason::try_from(r.reason) {
            Ok(pb::ReportReason::Unspecified) | Err(_) => {
                violations.add("reason", "must be SPAM, ABUSE, PROMPT_INJECTION or OTHER")
            }
            Ok(_) => {}
        }
        if let Err(reason) =
            natter_kit::limits::check_str(&r.comment, natter_kit::limits::MaxLen::Chars(REPORT_COMMENT_MAX))
        {
            violations.add("comment", reason);
        }
        violations.check()?;
        let report = self.messages.report(caller, message_id?, r.reason, r.comment).await?;
        Ok(Response::new(pb::ReportMessageResponse { report: Some(report_pb(report)) }))
    }

    async fn resolve_report(
        &self,
        request: Request<pb::ResolveReportRequest>,
    ) -> Result<Response<pb::ResolveReportResponse>, Status> {
        let caller = self.caller(&request).await?;
        let message_id = MessageId::parse("message_id", &request.get_ref().message_id)?;
        let resolved = self.messages.resolve_reports(caller, message_id).await?;
        Ok(Response::new(pb::ResolveReportResponse { resolved: i32::try_from(resolved).unwrap_or(i32::MAX) }))
    }

    async fn list_flagged_messages(
        &self,
        request: Request<pb::ListFlaggedMessagesRequest>,
    ) -> Result<Response<pb::ListFlaggedMessagesResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let size = paging::page_size("page_size", r.page_size, 50, domain::PAGE_MAX)?;
        let min_severity = match r.min_severity {
            0 => crate::store::FLAGGED_FROM,
            n if (crate::store::FLAGGED_FROM..=pb::Severity::Critical as i32).contains(&n) => n,
            _ => {
                return Err(
                    FieldViolations::single("min_severity", "must be LOW, MEDIUM, HIGH or CRITICAL").into_status()
                );
            }
        };
        let filter = QueueFilter {
            min_severity,
            sent_after: r.send_time_after.as_ref().map(natter_kit::time::micros),
            sent_before: r.send_time_before.as_ref().map(natter_kit::time::micros),
            ..QueueFilter::default()
        };
        // Tokens of the listings before the time range existed stay valid.
        let fingerprint = match (filter.sent_after, filter.sent_before) {
            (None, None) => paging::fingerprint(&[&min_severity]),
            (after, before) => {
                paging::fingerprint(&[&min_severity, &after.unwrap_or(i64::MIN), &before.unwrap_or(i64::MAX)])
            }
        };
        let from = match paging::decode::<(i64, String)>("page_token", &r.page_token, fingerprint)? {
            Some((time, id)) => Some((time, MessageId::parse("page_token", &id)?)),
            None => None,
        };
        let mut page = self.messages.flagged(caller, filter, from, size + 1).await?;
        // A page ends at page_size, or before its bytes pass PAGE_BYTES, as
        // a ListMessages page does: its open reports count too.
        let weight = |(m, reports): &(_, Vec<StoredReport>)| {
            Message::weight(m) + reports.iter().map(|r| 128 + r.comment.len()).sum::<usize>()
        };
        let fit = crate::service::fitting(&page, weight).0.min(size as usize);
        let next = if page.len() > fit {
            page.truncate(fit);
            page.last().map(|(m, _)| paging::encode(&(m.send_time, m.id.to_string()), fingerprint))
        } else {
            None
        };
        Ok(Response::new(pb::ListFlaggedMessagesResponse {
            messages: page
                .into_iter()
                .map(|(m, reports)| pb::FlaggedMessage {
                    message: Some(message_pb(m, Vec::new())),
                    open_reports: reports.into_iter().map(report_pb).collect(),
                })
                .collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_presence(
        &self,
        request: Request<pb::GetPresenceRequest>,
    ) -> Result<Response<pb::GetPresenceResponse>, Status> {
        let caller = self.caller(&request).await?;
        let users = presence_request(request.get_ref())?;
        let seen = self.messages.presence_of(caller, &users).await?;
        Ok(Response::new(pb::GetPresenceResponse {
            presences: users.into_iter().zip(seen).map(|(user, seen)| presence_pb(user, seen)).collect(),
        }))
    }

    async fn search_messages(
        &self,
        request: Request<pb::SearchMessagesRequest>,
    ) -> Result<Response<pb::SearchMessagesResponse>, Status> {
        let caller = self.caller(&request).await?;
        let (search, fingerprint) = search_request(request.get_ref())?;
        let (found, next) = self.messages.search(caller, search).await?;
        Ok(Response::new(pb::SearchMessagesResponse {
            results: found
                .into_iter()
                .map(|f| pb::SearchResult { message: Some(message_pb(f.message, Vec::new())), snippet: f.snippet })
                .collect(),
            next_page_token: next
                .map(|c| paging::encode(&(c.rank.to_bits(), c.position), fingerprint))
                .unwrap_or_default(),
        }))
    }

    type StreamEventsStream = EventStream;

    async fn stream_events(&self, request: Request<pb::StreamEventsRequest>) -> Result<Response<EventStream>, Status> {
        let principal = self.auth.authenticate(&request).await?;
        let token = natter_auth::bearer_token(request.metadata())?.to_owned();
        let (chat_ids, resume) = follow_request(request.into_inner(), self.streams.limits())?;
        let ticket = self.streams.admit(&principal, &token)?;
        let follow = Follow { principal, token, chat_ids, resume, presence: true };
        let stream =
            stream::open(self.messages.clone(), Some(self.auth.clone()), self.shutdown.clone(), ticket, follow).await?;
        Ok(Response::new(stream))
    }
}

/// The ephemeral stream event of a piece of a reply being generated (see
/// [`typing_event`] for its change_seq).
pub(crate) fn delta_event(chat: ChatId, delta: pb::MessageDelta) -> pb::StreamEventsResponse {
    pb::StreamEventsResponse {
        chat_id: chat.to_string(),
        seq: 0,
        change_seq: 0,
        event: Some(Event::MessageDelta(delta)),
    }
}

/// Longest report comment, in characters.
const REPORT_COMMENT_MAX: usize = 1000;

/// The protobuf form of a report.
fn report_pb(r: StoredReport) -> pb::Report {
    pb::Report {
        message_id: r.message_id.to_string(),
        reporter_id: r.reporter.to_string(),
        reason: r.reason,
        comment: r.comment,
        create_time: Some(timestamp(r.create_time)),
        resolve_time: timestamp_opt(r.resolve_time),
    }
}

/// Most ids and most seqs of one LookupMessages request.
const LOOKUP_MAX: usize = 100;

/// The status a StartReply request creates its reply with: None for
/// GENERATING (or UNSPECIFIED).
///
/// Errors: INVALID_ARGUMENT naming `status` for STOPPED, INTERRUPTED or an
/// unknown value.
fn start_status(status: i32) -> Result<Option<Generation>, Status> {
    match Generation::of(status.into()) {
        None if status == 0 => Ok(None),
        Some(Generation::Generating) => Ok(None),
        Some(g @ (Generation::Complete | Generation::Failed)) => Ok(Some(g)),
        _ => Err(FieldViolations::single("status", "must be GENERATING, COMPLETE or FAILED").into_status()),
    }
}

/// Most bytes of a StartReply's owner token.
const OWNER_MAX: usize = 128;

/// A StartReply's owner token: None when empty (none, never matched).
///
/// Errors: INVALID_ARGUMENT naming `owner` when over [`OWNER_MAX`] bytes.
fn start_owner(owner: &str) -> Result<Option<String>, Status> {
    match owner {
        "" => Ok(None),
        long if long.len() > OWNER_MAX => {
            Err(FieldViolations::single("owner", "must be at most 128 bytes").into_status())
        }
        owner => Ok(Some(owner.to_owned())),
    }
}

/// The store's form of a GenerationInfo.
fn info_of(info: pb::GenerationInfo) -> GenerationInfo {
    GenerationInfo {
        model: info.model,
        finish_reason: info.finish_reason,
        prompt_tokens: info.prompt_tokens,
        completion_tokens: info.completion_tokens,
        error: info.error,
    }
}

/// The generation status of a FinishReply request.
///
/// Errors: INVALID_ARGUMENT naming `status` for GENERATING, UNSPECIFIED or
/// an unknown value.
fn finished_status(status: i32) -> Result<Generation, Status> {
    match Generation::of(status.into()) {
        Some(g) if g.finished() => Ok(g),
        _ => Err(FieldViolations::single("status", "must be COMPLETE, STOPPED, FAILED or INTERRUPTED").into_status()),
    }
}

/// `natter.messages.v1.MessageInternalService`: what the other natter
/// services ask of messages (previews and clean-up for chats; messages on a
/// user's behalf, a bot's event stream and replies for the assistant).
#[derive(Clone)]
pub struct MessageInternalApi {
    messages: Arc<Messages>,
    shutdown: CancellationToken,
    streams: Arc<StreamRegistry>,
}

impl MessageInternalApi {
    /// The internal API; FollowChats streams end when `shutdown` is
    /// cancelled.
    pub fn new(messages: Arc<Messages>, shutdown: CancellationToken) -> Self {
        let streams = StreamRegistry::new(*messages.stream_limits());
        Self { messages, shutdown, streams }
    }
}

#[tonic::async_trait]
impl MessageInternalService for MessageInternalApi {
    async fn get_chat_summaries(
        &self,
        request: Request<pb::GetChatSummariesRequest>,
    ) -> Result<Response<pb::GetChatSummariesResponse>, Status> {
        let r = request.into_inner();
        let chats: Vec<ChatId> = parse_ids("chat_ids", &r.chat_ids)?;
        let user = UserId::parse_optional("user_id", &r.user_id)?;
        let summaries = self.messages.summaries(&chats, user).await?;
        Ok(Response::new(pb::GetChatSummariesResponse {
            summaries: r.chat_ids.into_iter().zip(summaries).map(|(chat, s)| summary_pb(chat, s)).collect(),
        }))
    }

    async fn list_recent_messages(
        &self,
        request: Request<pb::ListRecentMessagesRequest>,
    ) -> Result<Response<pb::ListRecentMessagesResponse>, Status> {
        let r = request.into_inner();
        let chat = ChatId::parse("chat_id", &r.chat_id)?;
        let size = paging::page_size("page_size", r.page_size, domain::MESSAGE_PAGE_DEFAULT, domain::PAGE_MAX)?;
        let viewer = UserId::parse_optional("viewer_id", &r.viewer_id)?;
        let before = match r.before_seq {
            n if n < 0 => return Err(FieldViolations::single("before_seq", "must not be negative").into_status()),
            0 => None,
            n => Some(Seq(n)),
        };
        let messages = self.messages.recent(chat, size, viewer, before).await?;
        Ok(Response::new(pb::ListRecentMessagesResponse {
            messages: messages.into_iter().map(|m| message_pb(m, Vec::new())).collect(),
        }))
    }

    async fn record_chat_changes(
        &self,
        request: Request<pb::RecordChatChangesRequest>,
    ) -> Result<Response<pb::RecordChatChangesResponse>, Status> {
        let (chat, changes, kept) = chat_changes_request(request.get_ref())?;
        let key = &request.get_ref().idempotency_key;
        let committed = request.get_ref().change_time.as_ref().map(natter_kit::time::micros);
        for change in &kept {
            match change.kind {
                HeadsKind::Closed(closed) => self.messages.close_direct_chat(chat, closed, change.version).await?,
                HeadsKind::Archived(archived) => self.messages.archive_chat(chat, archived, change.version).await?,
                HeadsKind::Departed => self.messages.record_departure(chat, change.version).await?,
            }
        }
        let logged = if changes.is_empty() {
            Vec::new()
        } else {
            self.messages.record_chat_changes(chat, &changes, key, committed).await?
        };
        // A change kept on the heads row takes no change number: 0 in its
        // place.
        let mut logged = logged.into_iter();
        let change_seqs = (0..request.get_ref().changes.len())
            .map(|i| if kept.iter().any(|c| c.index == i) { 0 } else { logged.next().unwrap_or_default() })
            .collect();
        Ok(Response::new(pb::RecordChatChangesResponse { change_seqs }))
    }

    async fn purge_chat(
        &self,
        request: Request<pb::PurgeChatRequest>,
    ) -> Result<Response<pb::PurgeChatResponse>, Status> {
        let chat = ChatId::parse("chat_id", &request.get_ref().chat_id)?;
        self.messages.purge(chat).await?;
        Ok(Response::new(pb::PurgeChatResponse {}))
    }

    async fn forget_user(
        &self,
        request: Request<pb::ForgetUserRequest>,
    ) -> Result<Response<pb::ForgetUserResponse>, Status> {
        let user = UserId::parse("user_id", &request.get_ref().user_id)?;
        self.messages.forget_user(user).await?;
        Ok(Response::new(pb::ForgetUserResponse {}))
    }

    async fn lookup_messages(
        &self,
        request: Request<pb::LookupMessagesRequest>,
    ) -> Result<Response<pb::LookupMessagesResponse>, Status> {
        let r = request.into_inner();
        let mut violations = FieldViolations::new();
        for (field, len) in [("message_ids", r.message_ids.len()), ("seqs", r.seqs.len())] {
            if len > LOOKUP_MAX {
                violations.add(field, format!("at most {LOOKUP_MAX}"));
            }
        }
        violations.check()?;
        let ids: Vec<MessageId> = parse_ids("message_ids", &r.message_ids)?;
        let chat = if r.seqs.is_empty() { None } else { Some(ChatId::parse("chat_id", &r.chat_id)?) };
        let seqs: Vec<Seq> = r.seqs.iter().map(|s| Seq(*s)).collect();
        let messages = self.messages.lookup(&ids, chat.map(|c| (c, seqs.as_slice()))).await?;
        Ok(Response::new(pb::LookupMessagesResponse {
            messages: messages.into_iter().map(|m| message_pb(m, Vec::new())).collect(),
        }))
    }

    async fn send_message_as(
        &self,
        request: Request<pb::SendMessageAsRequest>,
    ) -> Result<Response<pb::SendMessageAsResponse>, Status> {
        let r = request.into_inner();
        let user = UserId::parse("user_id", &r.user_id)?;
        let send = send_request(r.request.unwrap_or_default(), self.messages.limits())?;
        let message = self.messages.send(user, send).await?;
        Ok(Response::new(pb::SendMessageAsResponse { message: Some(message_pb(message, Vec::new())) }))
    }

    async fn edit_message_as(
        &self,
        request: Request<pb::EditMessageAsRequest>,
    ) -> Result<Response<pb::EditMessageAsResponse>, Status> {
        let r = request.into_inner();
        let user = UserId::parse("user_id", &r.user_id)?;
        let edit = edit_request(r.request.unwrap_or_default(), self.messages.limits())?;
        let message = self.messages.edit(user, edit).await?;
        Ok(Response::new(pb::EditMessageAsResponse { message: Some(message_pb(message, Vec::new())) }))
    }

    async fn mark_read_as(
        &self,
        request: Request<pb::MarkReadAsRequest>,
    ) -> Result<Response<pb::MarkReadAsResponse>, Status> {
        let r = request.into_inner();
        let user = UserId::parse("user_id", &r.user_id)?;
        let mark = mark_read_request(&r.request.unwrap_or_default())?;
        let state = self.messages.mark_read_as(user, mark).await?;
        Ok(Response::new(pb::MarkReadAsResponse { read_seq: state.read_seq.0, unread_count: state.unread }))
    }

    type FollowChatsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::FollowChatsResponse, Status>> + Send + 'static>>;

    async fn follow_chats(
        &self,
        request: Request<pb::FollowChatsRequest>,
    ) -> Result<Response<Self::FollowChatsStream>, Status> {
        let user = UserId::parse("user_id", &request.get_ref().user_id)?;
        let resume = self.messages.read_positions(user).await?;
        // A bot has no session: nothing to re-check, nothing expires.
        let principal =
            natter_auth::Principal { user_id: user.0, session_id: Uuid::nil(), guest: false, expire_micros: i64::MAX };
        let ticket = self.streams.admit(&principal, "")?;
        let follow = Follow { principal, token: String::new(), chat_ids: Vec::new(), resume, presence: false };
        let stream = stream::open(self.messages.clone(), None, self.shutdown.clone(), ticket, follow).await?;
        Ok(Response::new(Box::pin(futures::StreamExt::map(stream, |event| {
            event.map(|event| pb::FollowChatsResponse { event: Some(event) })
        }))))
    }

    async fn start_reply(
        &self,
        request: Request<pb::StartReplyRequest>,
    ) -> Result<Response<pb::StartReplyResponse>, Status> {
        let r = request.get_ref();
        let reply = crate::store::NewReply {
            id: MessageId::parse("message_id", &r.message_id)?,
            chat_id: ChatId::parse("chat_id", &r.chat_id)?,
            author_id: UserId::parse("author_id", &r.author_id)?,
            prompt: MessageId::parse("prompt_message_id", &r.prompt_message_id)?,
            replaces: match r.replaces_message_id.as_str() {
                "" => None,
                id => Some(MessageId::parse("replaces_message_id", id)?),
            },
            now: natter_kit::time::now_micros(),
            finished: match start_status(r.status)? {
                None => None,
                Some(status) => {
                    let info = r.generation.clone().unwrap_or_default();
                    Some((status, r.text.clone(), info_of(info)))
                }
            },
            owner: start_owner(&r.owner)?,
            // Unset: a caller of an earlier release, which compares nothing.
            members_version: r.members_version,
        };
        let (message, created) = self.messages.start_reply(reply).await?;
        Ok(Response::new(pb::StartReplyResponse { message: Some(message_pb(message, Vec::new())), created }))
    }

    async fn update_reply(
        &self,
        request: Request<pb::UpdateReplyRequest>,
    ) -> Result<Response<pb::UpdateReplyResponse>, Status> {
        let r = request.into_inner();
        let id = MessageId::parse("message_id", &r.message_id)?;
        let chat = ChatId::parse("chat_id", &r.chat_id)?;
        let author = UserId::parse("author_id", &r.author_id)?;
        let stop_requested = self.messages.update_reply(chat, id, author, r.deltas, r.checkpoint_text).await?;
        Ok(Response::new(pb::UpdateReplyResponse { stop_requested }))
    }

    async fn finish_reply(
        &self,
        request: Request<pb::FinishReplyRequest>,
    ) -> Result<Response<pb::FinishReplyResponse>, Status> {
        let r = request.into_inner();
        let id = MessageId::parse("message_id", &r.message_id)?;
        let finish = crate::store::Finish {
            status: finished_status(r.status)?,
            info: info_of(r.generation.unwrap_or_default()),
            flags: r.flags.map(|f| Flags::of_score(f.severity, f.score, f.categories, f.detector)),
            restore_replaced: r.restore_replaced,
            // The final text in NFC, as sent text is (the checkpoints before
            // stay as the deltas were, byte for byte: clients place deltas
            // by offset; the finish's change carries the whole text).
            text: domain::nfc(r.text),
            stale_before: self
                .stale_before(stale_bound(r.stale_for.as_ref(), {
                    #[allow(deprecated)] // read from callers older than stale_for
                    r.stale_before.as_ref()
                })?)
                .await?,
            // Set by the service's check of the reply's author.
            members_version: None,
        };
        let message = self.messages.finish_reply(id, &finish).await?;
        Ok(Response::new(pb::FinishReplyResponse { message: Some(message_pb(message, Vec::new())) }))
    }

    async fn stop_reply(
        &self,
        request: Request<pb::StopReplyRequest>,
    ) -> Result<Response<pb::StopReplyResponse>, Status> {
        let id = MessageId::parse("message_id", &request.get_ref().message_id)?;
        let message = self.messages.stop_reply(id).await?;
        Ok(Response::new(pb::StopReplyResponse { message: Some(message_pb(message, Vec::new())) }))
    }

    async fn list_stale_replies(
        &self,
        request: Request<pb::ListStaleRepliesRequest>,
    ) -> Result<Response<pb::ListStaleRepliesResponse>, Status> {
        let r = request.get_ref();
        let bound = stale_bound(r.stale_for.as_ref(), {
            #[allow(deprecated)] // read from callers older than stale_for
            r.checkpoint_before.as_ref()
        })?;
        let before = self
            .stale_before(bound)
            .await?
            .ok_or_else(|| FieldViolations::single("stale_for", "must be more than 0").into_status())?;
        let size = paging::page_size("page_size", r.page_size, 100, 1000)?;
        let messages = self.messages.stale_replies(before, size).await?;
        Ok(Response::new(pb::ListStaleRepliesResponse {
            messages: messages.into_iter().map(|m| message_pb(m, Vec::new())).collect(),
        }))
    }
}

/// Where a reply's checkpoint counts as stale, as a request gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StaleBound {
    /// No condition.
    None,
    /// Older than this long (µs) before now on the store's clock, which
    /// stamped the checkpoints.
    Ago(i64),
    /// Older than this time (µs), on a caller's clock (a caller older than
    /// `stale_for`).
    Before(i64),
}

/// The bound `stale_for` gives, else (from a caller older than that field)
/// `before`.
///
/// Errors: INVALID_ARGUMENT for a `stale_for` below zero.
fn stale_bound(
    stale_for: Option<&prost_types::Duration>,
    before: Option<&prost_types::Timestamp>,
) -> Result<StaleBound, Status> {
    match stale_for.map(natter_kit::time::duration_micros) {
        Some(us) if us > 0 => Ok(StaleBound::Ago(us)),
        Some(0) | None => Ok(before.map_or(StaleBound::None, |t| StaleBound::Before(natter_kit::time::micros(t)))),
        Some(_) => Err(FieldViolations::single("stale_for", "must be more than 0").into_status()),
    }
}

impl MessageInternalApi {
    /// `bound` as a time (µs): [`StaleBound::Ago`] against the store's
    /// clock ([`crate::store::MessageStore::clock`]: PostgreSQL's, which
    /// every messages replica shares), read only then.
    async fn stale_before(&self, bound: StaleBound) -> Result<Option<i64>, Status> {
        Ok(match bound {
            StaleBound::None => None,
            StaleBound::Before(t) => Some(t),
            StaleBound::Ago(us) => {
                let now = self.messages.store().clock().await.map_err(MessagesError::from)?;
                Some(now.saturating_sub(us))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_is_judged_on_the_store_s_clock_and_callers_before_stale_for_still_count() {
        let secs = |seconds| prost_types::Duration { seconds, nanos: 0 };
        let theirs = natter_kit::time::timestamp(42);
        assert_eq!(stale_bound(Some(&secs(15)), Some(&theirs)).unwrap(), StaleBound::Ago(15_000_000), "stale_for wins");
        assert_eq!(stale_bound(None, Some(&theirs)).unwrap(), StaleBound::Before(42), "an older caller's bound");
        assert_eq!(stale_bound(Some(&secs(0)), None).unwrap(), StaleBound::None);
        assert_eq!(stale_bound(Some(&secs(-1)), Some(&theirs)).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
    use crate::domain::MESSAGE_PAGE_DEFAULT;

    fn request(chat_ids: Vec<String>, resume: Vec<(String, i64)>) -> pb::StreamEventsRequest {
        pb::StreamEventsRequest { chat_ids, resume: resume.into_iter().collect(), ..Default::default() }
    }

    fn fields(status: &Status) -> Vec<String> {
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let details = tonic_types::StatusExt::get_error_details(status);
        details.bad_request().expect("field violations").field_violations.iter().map(|v| v.field.clone()).collect()
    }

    #[test]
    fn a_send_is_validated_once_into_domain_types() {
        let chat = Uuid::now_v7();
        let request = |text: &str, reply_to_seq| pb::SendMessageRequest {
            chat_id: chat.to_string(),
            text: text.into(),
            reply_to_seq,
            ..Default::default()
        };
        let send = send_request(request("hi", 0), &Limits::default()).unwrap();
        assert_eq!((send.chat_id, send.message_id, send.reply_to), (ChatId(chat), None, None));
        assert_eq!(send_request(request("hi", 3), &Limits::default()).unwrap().reply_to, Some(Seq(3)));
        // Every broken rule is named, not only the first.
        let bad = pb::SendMessageRequest {
            attachments: vec![pb::Attachment { kind: 0, ..Default::default() }],
            ..request("", -1)
        };
        let status = send_request(bad, &Limits::default()).unwrap_err();
        assert_eq!(fields(&status)[..2], ["attachments[0].kind", "attachments[0].url"]);
        assert_eq!(fields(&status).last().map(String::as_str), Some("reply_to_seq"));
        let bad_mention =
            pb::SendMessageRequest { mention_user_ids: vec![chat.to_string(), "bob".into()], ..request("hi", 0) };
        assert_eq!(fields(&send_request(bad_mention, &Limits::default()).unwrap_err()), ["mention_user_ids[1]"]);
        // A megabyte of empty ids is one violation, not half a million.
        let flood = pb::SendMessageRequest { mention_user_ids: vec![String::new(); 500_000], ..request("hi", 0) };
        assert_eq!(fields(&send_request(flood, &Limits::default()).unwrap_err()), ["mention_user_ids"]);
        let repeats = pb::SendMessageRequest {
            mention_user_ids: vec![chat.to_string(); domain::MENTION_IDS_MAX],
            ..request("hi", 0)
        };
        assert_eq!(send_request(repeats, &Limits::default()).unwrap().mentions.len(), 1, "repeats collapse");
        let bad_thread = pb::SendMessageRequest { thread_root_seq: -1, ..request("hi", 0) };
        assert_eq!(fields(&send_request(bad_thread, &Limits::default()).unwrap_err()), ["thread_root_seq"]);
    }

    #[test]
    fn a_history_page_token_belongs_to_its_filters() {
        let chat = Uuid::now_v7().to_string();
        let list = |before_seq, page_token: &str| pb::ListMessagesRequest {
            chat_id: chat.clone(),
            before_seq,
            page_token: page_token.into(),
            ..Default::default()
        };
        let (first, fingerprint) = list_request(&list(50, "")).unwrap();
        assert_eq!((first.range.before, first.from, first.page_size), (Some(Seq(50)), None, MESSAGE_PAGE_DEFAULT));
        let token = paging::encode(&40i64, fingerprint);
        assert_eq!(list_request(&list(50, &token)).unwrap().0.from, Some(Seq(40)));
        assert_eq!(fields(&list_request(&list(60, &token)).unwrap_err()), ["page_token"], "another filter");
        assert_eq!(fields(&list_request(&list(-1, "")).unwrap_err()), ["before_seq"]);
        let too_big = pb::ListMessagesRequest { page_size: 500, ..list(0, "") };
        assert_eq!(list_request(&too_big).unwrap().0.page_size, domain::PAGE_MAX, "clamped");
        // Threads: the timeline by default, a thread's replies, or all; a
        // token of one is no token of another.
        let thread = |root, all| pb::ListMessagesRequest {
            thread_root_seq: root,
            include_thread_replies: all,
            ..list(50, &token)
        };
        let timeline = |r: &pb::ListMessagesRequest| list_request(r).map(|(l, _)| l.range.timeline);
        assert_eq!(timeline(&list(50, &token)).unwrap(), Timeline::Main);
        assert_eq!(fields(&list_request(&thread(3, false)).unwrap_err()), ["page_token"], "another filter");
        assert_eq!(fields(&list_request(&thread(0, true)).unwrap_err()), ["page_token"], "another filter");
        let fresh = |r: pb::ListMessagesRequest| pb::ListMessagesRequest { page_token: String::new(), ..r };
        assert_eq!(timeline(&fresh(thread(3, false))).unwrap(), Timeline::Thread(Seq(3)));
        assert_eq!(timeline(&fresh(thread(0, true))).unwrap(), Timeline::Everything);
        assert_eq!(fields(&list_request(&fresh(thread(-3, false))).unwrap_err()), ["thread_root_seq"]);
        assert_eq!(fields(&list_request(&fresh(thread(3, true))).unwrap_err()), ["include_thread_replies"]);
    }

    /// A search page token carrying a rank no search gives (NaN or
    /// infinite, forged) is refused, naming page_token, not paged
    /// differently by each engine; a finite one goes on after its rank.
    #[test]
    fn a_search_page_token_with_a_non_finite_rank_is_refused() {
        for relevance in [true, false] {
            let order_by = if relevance { "relevance" } else { "" };
            let request = |page_token: String| pb::SearchMessagesRequest {
                query: "needle".into(),
                order_by: order_by.into(),
                page_token,
                ..Default::default()
            };
            let (_, fingerprint) = search_request(&request(String::new())).unwrap();
            let token = |rank: f64| paging::encode(&(rank.to_bits(), 7_i64), fingerprint);
            for rank in [f64::NAN, -f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                assert_eq!(fields(&search_request(&request(token(rank))).unwrap_err()), ["page_token"], "{rank}");
            }
            let (search, _) = search_request(&request(token(-0.25))).unwrap();
            assert_eq!(search.from, Some(SearchCursor { rank: -0.25, position: 7 }));
        }
    }

    #[test]
    fn chat_ids_are_deduplicated_in_order() {
        let ids: Vec<Uuid> = (0..500).map(|_| Uuid::now_v7()).collect();
        // Every id three times, interleaved: 1,500 entries, 500 distinct.
        let repeated: Vec<String> = ids.iter().chain(&ids).chain(ids.iter().rev()).map(Uuid::to_string).collect();
        let (chat_ids, _) = follow_request(
            request(repeated, Vec::new()),
            &StreamLimits { chats_per_request: 1500, ..StreamLimits::default() },
        )
        .unwrap();
        assert_eq!(chat_ids, ids);
    }

    #[test]
    fn too_many_chat_ids_or_resume_entries_name_their_field() {
        let limits = StreamLimits { chats_per_request: 3, ..StreamLimits::default() };
        let ids = |n: usize| (0..n).map(|_| Uuid::now_v7().to_string()).collect::<Vec<_>>();
        let fields = |r| {
            let status = follow_request(r, &limits).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            let details = tonic_types::StatusExt::get_error_details(&status);
            details
                .bad_request()
                .expect("field violations")
                .field_violations
                .iter()
                .map(|v| v.field.clone())
                .collect::<Vec<_>>()
        };
        // Refused before parsing: the malformed ids are never looked at.
        let mut bad = ids(3);
        bad.push("not-a-uuid".into());
        assert_eq!(fields(request(bad, Vec::new())), ["chat_ids"]);
        let resume = ids(4).into_iter().map(|c| (c, 0)).collect();
        assert_eq!(fields(request(Vec::new(), resume)), ["resume"]);
        assert!(follow_request(request(ids(3), ids(3).into_iter().map(|c| (c, 1)).collect()), &limits).is_ok());
        let changes = pb::StreamEventsRequest {
            resume_changes: ids(4).into_iter().map(|c| (c, 0)).collect(),
            ..Default::default()
        };
        assert_eq!(fields(changes), ["resume_changes"]);
    }

    #[test]
    fn resume_points_are_read_from_both_maps_and_change_numbers_win() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let r = pb::StreamEventsRequest {
            resume: [(a.to_string(), 5), (b.to_string(), 7)].into_iter().collect(),
            resume_changes: [(b.to_string(), 9)].into_iter().collect(),
            ..Default::default()
        };
        let (_, resume) = follow_request(r, &StreamLimits::default()).unwrap();
        assert_eq!(resume[&a], Resume::Seq(Seq(5)));
        assert_eq!(resume[&b], Resume::Changes(9));
        // The chat_id of the events of a user, kept by a client as any
        // other: no chat, no resume point.
        let of_no_chat = pb::StreamEventsRequest {
            resume: [(String::new(), 0)].into_iter().collect(),
            resume_changes: [(String::new(), 0), (a.to_string(), 3)].into_iter().collect(),
            ..Default::default()
        };
        let (_, resume) = follow_request(of_no_chat, &StreamLimits::default()).unwrap();
        assert_eq!(resume, [(a, Resume::Changes(3))].into_iter().collect());
        let negative = pb::StreamEventsRequest {
            resume_changes: [(a.to_string(), -1)].into_iter().collect(),
            ..Default::default()
        };
        assert_eq!(
            fields(&follow_request(negative, &StreamLimits::default()).unwrap_err()),
            [format!("resume_changes[{a}]")]
        );
    }

    #[test]
    fn a_replayed_message_is_created_for_a_client_that_never_saw_it() {
        let chat = ChatId::new_v7();
        let message = |create_change, change_seq, deleted: bool| Message {
            id: MessageId::new_v7(),
            chat_id: chat,
            seq: Seq(3),
            author_id: UserId::new_v7(),
            text: "now".into(),
            attachments: Vec::new(),
            reply_to: None,
            send_time: 1,
            edit_time: Some(2),
            revision: 2,
            delete_time: deleted.then_some(3),
            change_seq,
            create_change,
            reply: None,
            flags: None,
            reactions: Vec::new(),
            reaction_rows: 0,
            mentions: Vec::new(),
            thread_root: None,
            thread: None,
            pin: None,
            deleted_by: None,
        };
        let kind = |m, since| match replay_event(chat, Change::Message(m), since).event {
            Some(Event::MessageCreated(m)) => ("created", m.change_seq),
            Some(Event::MessageEdited(m)) => ("edited", m.change_seq),
            Some(Event::MessageDeleted(m)) => ("deleted", m.change_seq),
            other => panic!("not a message event: {other:?}"),
        };
        // Sent at 4 and edited at 9: new to a client at 3, an edit to one at 4.
        assert_eq!(kind(message(4, 9, false), 3), ("created", 9));
        assert_eq!(kind(message(4, 9, false), 4), ("edited", 9));
        assert_eq!(kind(message(4, 9, true), 3), ("deleted", 9));
    }

    #[test]
    fn chat_changes_are_validated_naming_the_field() {
        let chat = Uuid::now_v7().to_string();
        let member = |user_id: &str, change: pb::MembershipChange| pb::ChatChange {
            change: Some(pb::chat_change::Change::MembershipChanged(pb::MembershipChanged {
                user_id: user_id.into(),
                change: change as i32,
            })),
        };
        let request = |changes| pb::RecordChatChangesRequest {
            chat_id: chat.clone(),
            changes,
            idempotency_key: String::new(),
            change_time: None,
        };
        let user = UserId::new_v7();
        let closed = |closed, version| pb::ChatChange {
            change: Some(pb::chat_change::Change::DirectChatClosed(pb::DirectChatClosed { closed, version })),
        };
        let (_, changes, kept) = chat_changes_request(&request(vec![
            closed(true, 3),
            member(&user.to_string(), pb::MembershipChange::Joined),
        ]))
        .unwrap();
        assert_eq!(changes, [ChatChange::Joined(user)], "a closure is not logged");
        assert_eq!(kept, [HeadsChange { index: 0, version: 3, kind: HeadsKind::Closed(true) }]);
        assert_eq!(
            fields(&chat_changes_request(&request(vec![closed(false, 0)])).unwrap_err()),
            ["changes[0].direct_chat_closed.version"]
        );
        let departed = |version| pb::ChatChange {
            change: Some(pb::chat_change::Change::MembersDeparted(pb::MembersDeparted { version })),
        };
        let (_, changes, kept) =
            chat_changes_request(&request(vec![member(&user.to_string(), pb::MembershipChange::Removed), departed(4)]))
                .unwrap();
        assert_eq!(changes, [ChatChange::Removed(user)], "a departure's version is not logged");
        assert_eq!(kept, [HeadsChange { index: 1, version: 4, kind: HeadsKind::Departed }]);
        assert_eq!(
            fields(&chat_changes_request(&request(vec![departed(0)])).unwrap_err()),
            ["changes[0].members_departed.version"]
        );
        let archived = |archived, version| pb::ChatChange {
            change: Some(pb::chat_change::Change::ChatArchived(pb::ChatArchived { archived, version })),
        };
        let (_, changes, kept) = chat_changes_request(&request(vec![archived(true, 2)])).unwrap();
        assert_eq!(changes, [], "an archived state is not logged");
        assert_eq!(kept, [HeadsChange { index: 0, version: 2, kind: HeadsKind::Archived(true) }]);
        assert_eq!(
            fields(&chat_changes_request(&request(vec![archived(false, 0)])).unwrap_err()),
            ["changes[0].chat_archived.version"]
        );
        assert_eq!(fields(&chat_changes_request(&request(Vec::new())).unwrap_err()), ["changes"]);
        assert_eq!(
            fields(&chat_changes_request(&request(vec![member("x", pb::MembershipChange::Left)])).unwrap_err()),
            ["changes[0].membership_changed.user_id"]
        );
        assert_eq!(
            fields(
                &chat_changes_request(&request(vec![member(&user.to_string(), pb::MembershipChange::Unspecified)]))
                    .unwrap_err()
            ),
            ["changes[0].membership_changed.change"]
        );
        assert_eq!(
            fields(&chat_changes_request(&request(vec![pb::ChatChange { change: None }])).unwrap_err()),
            ["changes[0]"]
        );
        let joined = vec![member(&user.to_string(), pb::MembershipChange::Joined)];
        let keyed =
            |key: usize| pb::RecordChatChangesRequest { idempotency_key: "k".repeat(key), ..request(joined.clone()) };
        assert!(chat_changes_request(&keyed(domain::IDEMPOTENCY_KEY_MAX)).is_ok());
        assert_eq!(
            fields(&chat_changes_request(&keyed(domain::IDEMPOTENCY_KEY_MAX + 1)).unwrap_err()),
            ["idempotency_key"]
        );
    }
}

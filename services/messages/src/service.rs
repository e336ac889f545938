//! The messages domain operations over the [`Store`], the chats link and the
//! event bus.

use std::sync::Arc;

use natter_bus::{Event as BusEvent, EventBus, Topic};
use natter_kit::limits::RateLimiter;
use natter_kit::time::{now_micros, timestamp, timestamp_opt};
use natter_links::ChatDirectory;
use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as pb;
use pb::stream_events_response::Event;
use uuid::Uuid;

use crate::MessagesArgs;
use crate::domain::{self, Attachment, Limits};
use crate::error::MessagesError;
use crate::registry::StreamLimits;
use crate::store::{Edited, MessageRow, NewMessage, Range, RevisionRow, Sent, Store};
use crate::writer::Writer;

/// How far back from the newest message [`Messages::announce_recent_activity`]
/// looks, in µs: far more than the chats store keeps activity in memory
/// (50 ms by default), and than a message waits in the writer's queue.
pub const RECOVERY_WINDOW_US: i64 = 10_000_000;

/// A validated SendMessage request.
#[derive(Clone, Debug)]
pub struct SendRequest {
    pub chat_id: Uuid,
    pub message_id: Option<Uuid>,
    pub text: String,
    pub attachments: Vec<Attachment>,
    pub reply_to_seq: i64,
}

/// The protobuf form of a stored message (tombstones carry no content).
pub fn message_pb(row: MessageRow, history: Vec<pb::Revision>) -> pb::Message {
    let attachments = domain::decode_attachments(&row.attachments)
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
        id: row.id,
        chat_id: row.chat_id,
        seq: row.seq,
        author_id: row.author_id,
        text: row.text,
        attachments,
        reply_to_seq: row.reply_to_seq,
        send_time: Some(timestamp(row.send_time)),
        edit_time: timestamp_opt(row.edit_time),
        revision: i32::try_from(row.revision).unwrap_or(i32::MAX),
        deleted: row.delete_time.is_some(),
        history,
    }
}

/// The stream event announcing a new message.
pub fn created_event(message: pb::Message) -> pb::StreamEventsResponse {
    pb::StreamEventsResponse {
        chat_id: message.chat_id.clone(),
        seq: message.seq,
        event: Some(Event::MessageCreated(message)),
    }
}

/// The messages service's domain object; share it behind an `Arc`.
pub struct Messages {
    store: Store,
    writer: Writer,
    chats: Arc<dyn ChatDirectory>,
    bus: Arc<dyn EventBus>,
    limits: Limits,
    stream_limits: StreamLimits,
    /// SendMessage calls per user.
    send_rate: RateLimiter<Uuid>,
    /// EditMessage calls per user.
    edit_rate: RateLimiter<Uuid>,
}

impl Messages {
    /// Starts the message writer (see [`Writer::start`]) over `store`, with
    /// the limits and rates of `args`.
    ///
    /// Errors: the writer's SQLite connection cannot be opened.
    pub fn new(
        store: Store,
        chats: Arc<dyn ChatDirectory>,
        bus: Arc<dyn EventBus>,
        args: &MessagesArgs,
    ) -> std::io::Result<Self> {
        Ok(Self {
            writer: Writer::start(store.clone(), chats.clone())?,
            store,
            chats,
            bus,
            limits: args.limits(),
            stream_limits: args.stream_limits(),
            send_rate: RateLimiter::new("messages sent", args.send_message_rate),
            edit_rate: RateLimiter::new("message edits", args.edit_message_rate),
        })
    }

    /// Re-announces to the chats service the newest message of every chat
    /// sent within [`RECOVERY_WINDOW_US`] before the newest message stored
    /// (SQLite only; see [`Store::recent_activity`]), so that activity the
    /// chats store still held in memory when the process died is not lost.
    /// The chats service ignores what it has already (a seq never moves
    /// back). Call once at start-up, before serving.
    ///
    /// Errors: reading the store, or the chats service refused the call.
    pub async fn announce_recent_activity(&self) -> Result<usize, MessagesError> {
        let Some(recent) = self.store.recent_activity(RECOVERY_WINDOW_US).await? else { return Ok(0) };
        let chats = recent.len();
        let activities: Vec<cpb::Activity> = recent
            .into_iter()
            .map(|(chat_id, last_seq, time)| cpb::Activity {
                chat_id,
                last_seq,
                last_activity_time: Some(timestamp(time)),
            })
            .collect();
        for chunk in activities.chunks(1000) {
            self.chats.record_activity(chunk.to_vec()).await.map_err(MessagesError::Upstream)?;
        }
        Ok(chats)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The limits of StreamEvents.
    pub fn stream_limits(&self) -> &StreamLimits {
        &self.stream_limits
    }

    pub fn bus(&self) -> &Arc<dyn EventBus> {
        &self.bus
    }

    pub fn chats(&self) -> &Arc<dyn ChatDirectory> {
        &self.chats
    }

    /// Membership of `user` in `chat`: NOT_FOUND / PERMISSION_DENIED unless a member.
    pub async fn member(&self, chat: Uuid, user: Uuid) -> Result<cpb::CheckMembershipResponse, MessagesError> {
        let m = self.chats.check_membership(&chat.to_string(), &user.to_string()).await?;
        if !m.chat_exists {
            Err(MessagesError::ChatNotFound)
        } else if !m.member {
            Err(MessagesError::Denied("not a member of this chat"))
        } else {
            Ok(m)
        }
    }

    /// Read access: a member, or anyone for a public chat.
    pub async fn readable(&self, chat: Uuid, user: Uuid) -> Result<cpb::CheckMembershipResponse, MessagesError> {
        let m = self.chats.check_membership(&chat.to_string(), &user.to_string()).await?;
        if !m.chat_exists {
            Err(MessagesError::ChatNotFound)
        } else if !m.member && m.visibility != cpb::Visibility::Public as i32 {
            Err(MessagesError::Denied("not a member of this chat"))
        } else {
            Ok(m)
        }
    }

    /// SendMessage: commits the message with the chat's next seq, announces
    /// it, and records the chat's activity. A retry with the same
    /// message_id returns the original.
    #[tracing::instrument(skip_all, fields(chat_id = %req.chat_id, message_id = tracing::field::Empty, seq = tracing::field::Empty))]
    pub async fn send(&self, caller: Uuid, req: SendRequest) -> Result<MessageRow, MessagesError> {
        self.send_rate.check(&caller)?;
        // A retry is caught by the writer (the id exists); only when the
        // send would now be refused (archived meanwhile, left the chat) is
        // the original looked up first, so a retry still returns it.
        let allowed = match self.member(req.chat_id, caller).await {
            Ok(m) if m.archived => Err(MessagesError::Precondition("chat is archived")),
            other => other.map(drop),
        };
        if let Err(refused) = allowed {
            if let Some(id) = req.message_id
                && let Some(existing) = self.store.message(&id.to_string()).await?
            {
                return same_message(existing, &req, caller);
            }
            return Err(refused);
        }
        let new = NewMessage {
            id: req.message_id.unwrap_or_else(Uuid::now_v7).to_string(),
            chat_id: req.chat_id.to_string(),
            author_id: caller.to_string(),
            text: req.text.clone(),
            attachments: domain::encode_attachments(&req.attachments),
            reply_to_seq: req.reply_to_seq,
            send_time: now_micros(),
        };
        let id = new.id.clone();
        let row = match self.writer.send(new).await.map_err(MessagesError::Commit)? {
            Sent::Created(row) => {
                tracing::Span::current().record("message_id", row.id.as_str()).record("seq", row.seq);
                row
            }
            Sent::NoSuchReply => {
                return Err(MessagesError::invalid("reply_to_seq", "names no message of this chat"));
            }
            Sent::Duplicate => {
                // A concurrent retry won the race: answer with its message.
                let existing = self.store.message(&id).await?.ok_or(MessagesError::MessageNotFound)?;
                return same_message(existing, &req, caller);
            }
        };
        let event = created_event(message_pb(row.clone(), Vec::new()));
        self.bus.publish(Topic::Chat(req.chat_id), Arc::new(BusEvent::new(req.chat_id.into(), event)));
        Ok(row)
    }

    /// A message and the caller's membership of its chat (NOT_FOUND /
    /// PERMISSION_DENIED as for its chat).
    async fn message_for(
        &self,
        caller: Uuid,
        message_id: Uuid,
        write: bool,
    ) -> Result<(MessageRow, cpb::CheckMembershipResponse), MessagesError> {
        let row = self.store.message(&message_id.to_string()).await?.ok_or(MessagesError::MessageNotFound)?;
        let chat = Uuid::try_parse(&row.chat_id).map_err(|_| MessagesError::MessageNotFound)?;
        let membership = if write { self.member(chat, caller).await? } else { self.readable(chat, caller).await? };
        Ok((row, membership))
    }

    /// GetMessage.
    pub async fn get(&self, caller: Uuid, message_id: Uuid) -> Result<pb::Message, MessagesError> {
        let (row, _) = self.message_for(caller, message_id, false).await?;
        Ok(message_pb(row, Vec::new()))
    }

    /// EditMessage (author only): keeps every earlier revision, up to
    /// `limits.edits` edits; announces it.
    pub async fn edit(&self, caller: Uuid, message_id: Uuid, text: &str) -> Result<pb::Message, MessagesError> {
        self.edit_rate.check(&caller)?;
        let (row, membership) = self.message_for(caller, message_id, true).await?;
        if row.author_id != caller.to_string() {
            return Err(MessagesError::Denied("only the author may edit a message"));
        }
        if row.delete_time.is_some() {
            return Err(MessagesError::Precondition("message is deleted"));
        }
        if membership.archived {
            return Err(MessagesError::Precondition("chat is archived"));
        }
        let edited = match self.store.edit(&row.id, text, now_micros(), self.limits.edits).await? {
            Edited::Done(row) => row,
            Edited::Deleted => return Err(MessagesError::Precondition("message is deleted")),
            Edited::TooManyEdits => return Err(MessagesError::TooManyEdits(self.limits.edits)),
        };
        let message = message_pb(edited, Vec::new());
        self.announce(Event::MessageEdited(message.clone()), &message);
        Ok(message)
    }

    /// DeleteMessage (author, or the chat's owner or an admin): leaves a
    /// tombstone; deleting a tombstone returns it.
    pub async fn delete(&self, caller: Uuid, message_id: Uuid) -> Result<pb::Message, MessagesError> {
        let (row, membership) = self.message_for(caller, message_id, true).await?;
        let manager =
            membership.role == cpb::MemberRole::Owner as i32 || membership.role == cpb::MemberRole::Admin as i32;
        if row.author_id != caller.to_string() && !manager {
            return Err(MessagesError::Denied("only the author, the owner or an admin may delete a message"));
        }
        if row.delete_time.is_some() {
            return Ok(message_pb(row, Vec::new()));
        }
        self.store.delete(&row.id, now_micros()).await?;
        let deleted = self.store.message(&row.id).await?.ok_or(MessagesError::MessageNotFound)?;
        let message = message_pb(deleted, Vec::new());
        self.announce(Event::MessageDeleted(message.clone()), &message);
        Ok(message)
    }

    /// ListMessageRevisions: up to `page_size` revisions after revision
    /// `after` (a page token's key), oldest first, the current one last;
    /// with the key of the next page while there are more.
    pub async fn revisions(
        &self,
        caller: Uuid,
        message_id: Uuid,
        after: Option<i64>,
        page_size: u32,
    ) -> Result<(Vec<pb::Revision>, Option<i64>), MessagesError> {
        let (row, _) = self.message_for(caller, message_id, false).await?;
        if row.delete_time.is_some() {
            return Ok((Vec::new(), None));
        }
        let after = after.unwrap_or(0);
        let mut out: Vec<pb::Revision> =
            self.store.revisions_after(&row.id, after, page_size + 1).await?.iter().map(revision_pb).collect();
        // The current text is the newest revision: it follows every earlier one.
        if row.revision > after {
            out.push(pb::Revision {
                revision: i32::try_from(row.revision).unwrap_or(i32::MAX),
                text: row.text,
                edit_time: Some(timestamp(row.edit_time.unwrap_or(row.send_time))),
            });
        }
        let next = if out.len() > page_size as usize {
            out.truncate(page_size as usize);
            out.last().map(|r| i64::from(r.revision))
        } else {
            None
        };
        Ok((out, next))
    }

    fn announce(&self, event: Event, message: &pb::Message) {
        if let Ok(chat) = Uuid::try_parse(&message.chat_id) {
            let event =
                pb::StreamEventsResponse { chat_id: message.chat_id.clone(), seq: message.seq, event: Some(event) };
            self.bus.publish(Topic::Chat(chat), Arc::new(BusEvent::new(chat.into(), event)));
        }
    }

    /// A page of history with, when asked, every earlier revision.
    pub async fn list(
        &self,
        caller: Uuid,
        chat: Uuid,
        range: Range,
        from: Option<i64>,
        page_size: u32,
        include_history: bool,
    ) -> Result<(Vec<pb::Message>, Option<i64>), MessagesError> {
        self.readable(chat, caller).await?;
        let mut rows = self.store.list(&chat.to_string(), range, from, page_size + 1).await?;
        let next = if rows.len() > page_size as usize {
            rows.truncate(page_size as usize);
            rows.last().map(|m| m.seq)
        } else {
            None
        };
        Ok((self.with_history(rows, include_history).await?, next))
    }

    /// Converts rows, attaching their earlier revisions when asked.
    pub async fn with_history(
        &self,
        rows: Vec<MessageRow>,
        include_history: bool,
    ) -> Result<Vec<pb::Message>, MessagesError> {
        let edited: Vec<String> = if include_history {
            rows.iter().filter(|r| r.revision > 1).map(|r| r.id.clone()).collect()
        } else {
            Vec::new()
        };
        let mut revisions = self.store.revisions(&edited).await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let history: Vec<pb::Revision> =
                    revisions.iter().filter(|r| r.message_id == row.id).map(revision_pb).collect();
                revisions.retain(|r| r.message_id != row.id);
                message_pb(row, history)
            })
            .collect())
    }

    /// MarkRead: moves the caller's read position forward (clamped to the
    /// newest message) and returns it with the unread count.
    pub async fn mark_read(&self, caller: Uuid, chat: Uuid, seq: i64) -> Result<(i64, i64), MessagesError> {
        self.member(chat, caller).await?;
        let chat_id = chat.to_string();
        let user_id = caller.to_string();
        let head = self.store.head(&chat_id).await?;
        let read_seq = self.store.mark_read(&chat_id, &user_id, seq.min(head)).await?;
        let unread = self.store.unread_count(&chat_id, &user_id, read_seq).await?;
        let event = pb::StreamEventsResponse {
            chat_id: chat_id.clone(),
            seq: read_seq,
            event: Some(Event::ReadUpdated(pb::ReadUpdated { user_id, read_seq })),
        };
        self.bus.publish(Topic::Chat(chat), Arc::new(BusEvent::new(chat.into(), event).concerning(caller.into())));
        Ok((read_seq, unread))
    }

    /// Internal: each chat's newest message and the user's unread count.
    pub async fn summaries(&self, chat_ids: &[String], user_id: &str) -> Result<Vec<pb::ChatSummary>, MessagesError> {
        let summaries = self.store.summaries(chat_ids, user_id).await?;
        Ok(chat_ids
            .iter()
            .zip(summaries)
            .map(|(chat_id, (newest, unread_count))| match newest {
                Some(m) => pb::ChatSummary {
                    chat_id: chat_id.clone(),
                    last_seq: m.seq,
                    last_author_id: m.author_id,
                    last_text: m.text.chars().take(200).collect(),
                    last_send_time: Some(timestamp(m.send_time)),
                    unread_count,
                },
                None => pb::ChatSummary { chat_id: chat_id.clone(), ..Default::default() },
            })
            .collect())
    }

    /// Internal: a chat's newest messages, newest first.
    pub async fn recent(&self, chat_id: &str, page_size: u32) -> Result<Vec<pb::Message>, MessagesError> {
        let rows = self.store.list(chat_id, Range::default(), None, page_size).await?;
        self.with_history(rows, false).await
    }

    /// Internal: users just joined; history before now is not unread.
    pub async fn reset_read_positions(&self, chat_id: &str, user_ids: &[String]) -> Result<(), MessagesError> {
        Ok(self.store.reset_read_positions(chat_id, user_ids).await?)
    }

    /// Internal: deletes everything of a chat.
    pub async fn purge(&self, chat_id: &str) -> Result<(), MessagesError> {
        Ok(self.store.purge_chat(chat_id).await?)
    }
}

fn revision_pb(r: &RevisionRow) -> pb::Revision {
    pb::Revision {
        revision: i32::try_from(r.revision).unwrap_or(i32::MAX),
        text: r.text.clone(),
        edit_time: Some(timestamp(r.edit_time)),
    }
}

/// The answer to a retried send: the original message if it is the caller's
/// in the same chat, else ALREADY_EXISTS.
fn same_message(existing: MessageRow, req: &SendRequest, caller: Uuid) -> Result<MessageRow, MessagesError> {
    if existing.chat_id == req.chat_id.to_string() && existing.author_id == caller.to_string() {
        Ok(existing)
    } else {
        Err(MessagesError::MessageIdTaken)
    }
}

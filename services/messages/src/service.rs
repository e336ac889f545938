//! The messages domain operations over the [`MessageStore`], the chats link
//! and the event bus. Validated commands in, domain types out; the protobuf
//! of the answers is built in `grpc.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use natter_bus::{Event as BusEvent, EventBus, Topic};
use natter_kit::id::{ChatId, MessageId, UserId};
use natter_kit::limits::RateLimiter;
use natter_kit::time::{now_micros, timestamp};
use natter_links::{ChatDirectory, Sight};
use natter_proto::chats::v1 as cpb;
use uuid::Uuid;

use crate::MessagesArgs;
use crate::domain::{
    EditMessage, Limits, ListMessages, ListReadPositions, ListRevisions, MarkRead, PINS_MAX, REACTION_EMOJI_MAX, React,
    SendMessage, WithHistory,
};
use crate::error::MessagesError;
use crate::grpc;
use crate::presence::{Presence, Seen};
use crate::registry::StreamLimits;
use crate::search::{Found, SearchMessages};
use crate::store::{
    ChatChange, Deleted, Deletion, Edited, Finish, Finishing, Flags, Generation, Marked, Membership, Message,
    MessageStore, NewMessage, NewReply, Pinned, QueueCursor, QueueFilter, Range, Reacted, ReadState, Reported,
    Resolved, Revision, SearchCursor, SearchFilter, Sent, Seq, Started, StoreError, StoredReport, Summary, Timeline,
};
use crate::stream::Resume;
use crate::writer::Writer;

/// How far back from the newest message [`Messages::announce_recent_activity`]
/// looks, in µs: the window the chats store's longest activity flush
/// interval is checked against ([`natter_links::activity`]).
pub const RECOVERY_WINDOW_US: i64 = natter_links::activity::REANNOUNCE_WINDOW_US;

/// The most bytes of messages (text, attachments, mentions) and earlier
/// revisions one ListMessages page carries, roughly as encoded: a page ends
/// before the message that would pass it, so that a response stays under
/// the 4 MiB that gRPC clients accept by default (grpc-go's and tonic's
/// default largest message received). Its first message always comes,
/// whatever its size; the limits bound that to about 3.3 MiB (32 KiB of
/// text and 100 earlier revisions of as much).
pub const PAGE_BYTES: usize = 3 << 20;

/// How many of `items` (a page, in order) fit in [`PAGE_BYTES`] by
/// `weight` (at least the first), and their bytes.
pub(crate) fn fitting<T>(items: &[T], weight: impl Fn(&T) -> usize) -> (usize, usize) {
    let mut bytes = 0;
    let fit = items
        .iter()
        .take_while(|item| {
            let weight = weight(item);
            let fits = bytes == 0 || bytes + weight <= PAGE_BYTES;
            if fits {
                bytes += weight;
            }
            fits
        })
        .count();
    (fit, bytes)
}

/// Roughly the bytes revision `r` takes in a response.
fn revision_weight(r: &Revision) -> usize {
    32 + r.text.len()
}

/// What [`Messages::check_author`] found of a reply's author.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuthorCheck {
    /// A member who may write, as of this members version.
    May(i64),
    /// No member (or the chat deleted), or a direct chat closed by a block.
    Gone,
    /// The check failed (the chats service out of reach).
    Unknown,
}

/// A ListMessages page with its messages' earlier revisions
/// ([`Messages::with_history`]).
struct HistoryPage {
    messages: Vec<WithHistory>,
    /// Cut short of the messages read: the next page starts after its
    /// last message.
    cut: bool,
}

/// The messages service's domain object; share it behind an `Arc`.
pub struct Messages {
    store: Arc<dyn MessageStore>,
    writer: Writer,
    /// Batches the checkpoints of replies being generated.
    checkpoints: crate::checkpoints::Checkpoints,
    chats: Arc<dyn ChatDirectory>,
    bus: Arc<dyn EventBus>,
    limits: Limits,
    stream_limits: StreamLimits,
    /// SendMessage calls per user.
    send_rate: RateLimiter<UserId>,
    /// EditMessage, PinMessage and UnpinMessage calls per user.
    edit_rate: RateLimiter<UserId>,
    /// Bytes stored per user, sends and edits together ([`stored_bytes`]).
    stored_bytes: RateLimiter<UserId>,
    /// AddReaction and RemoveReaction calls per user.
    reaction_rate: RateLimiter<UserId>,
    /// SetTyping calls per user.
    typing_rate: RateLimiter<UserId>,
    /// SearchMessages calls per user.
    search_rate: RateLimiter<UserId>,
    /// MarkRead calls per user (not the assistant's MarkReadAs).
    mark_read_rate: RateLimiter<UserId>,
    /// DeleteMessage, ReportMessage and ResolveReport calls per user,
    /// together.
    moderation_rate: RateLimiter<UserId>,
    /// How long an indicator lasts unless renewed.
    typing_timeout: std::time::Duration,
    /// The prompt-injection detector (None: scanning off).
    detector: Option<natter_detect::Detector>,
    /// Server staff (--staff-user-ids).
    staff: std::collections::HashSet<UserId>,
    /// The external classifier (--classifier-url).
    classifier: Option<Arc<crate::classifier::Classifier>>,
    /// Who is online ([`crate::presence`]).
    presence: Arc<Presence>,
    /// GetPresence calls per user.
    presence_rate: RateLimiter<UserId>,
    /// The turns of its streams' resyncs.
    resyncs: crate::stream::Resyncs,
}

impl Messages {
    /// Starts the message writer (see [`Writer::start`]) over `store`, with
    /// the limits and rates of `args`.
    ///
    /// Panics outside a tokio runtime.
    pub fn new(
        store: Arc<dyn MessageStore>,
        chats: Arc<dyn ChatDirectory>,
        bus: Arc<dyn EventBus>,
        args: &MessagesArgs,
    ) -> Self {
        let classifier = args.classifier_url.as_deref().and_then(|url| {
            crate::classifier::Classifier::new(url, args.classifier_timeout, store.clone(), bus.clone())
                .map_err(|e| tracing::error!(error = %e, "the external classifier is off"))
                .ok()
                .map(Arc::new)
        });
        let presence = Presence::start(
            bus.clone(),
            chats.clone(),
            store.clone(),
            args.presence_heartbeat,
            args.presence_lost_grace,
        );
        // A send cancelled while its message was being committed announced
        // nothing: its chat's streams are told to re-read the store (which
        // also brings a thread root's new counts), and it is classified.
        let orphaned: crate::writer::Orphaned = Box::new({
            let (bus, classifier) = (bus.clone(), classifier.clone());
            move |message: &Message| {
                resync(bus.as_ref(), message.chat_id);
                if let Some(classifier) = &classifier {
                    classifier.spawn(message.id, message.chat_id, message.revision, message.text.clone());
                }
            }
        });
        Self {
            writer: Writer::start(store.clone(), chats.clone(), orphaned),
            checkpoints: crate::checkpoints::Checkpoints::start(store.clone()),
            store,
            chats,
            bus,
            limits: args.limits(),
            stream_limits: args.stream_limits(),
            send_rate: RateLimiter::new("messages sent", args.send_message_rate),
            edit_rate: RateLimiter::new("message edits and pins", args.edit_message_rate),
            stored_bytes: RateLimiter::new("bytes stored", args.stored_bytes_rate),
            reaction_rate: RateLimiter::new("reactions", args.reaction_rate),
            typing_rate: RateLimiter::new("typing indicators", args.typing_rate),
            search_rate: RateLimiter::new("searches", args.search_rate),
            mark_read_rate: RateLimiter::new("read markers", args.mark_read_rate),
            moderation_rate: RateLimiter::new("deletions and reports", args.moderation_rate),
            typing_timeout: args.typing_timeout,
            detector: (args.scan_messages == crate::Scan::All).then(natter_detect::Detector::default),
            staff: args.staff_user_ids.iter().map(|u| UserId(*u)).collect(),
            classifier,
            presence,
            presence_rate: RateLimiter::new("presence queries", args.presence_rate),
            resyncs: crate::stream::Resyncs::new(crate::stream::RESYNC_READS),
        }
    }

    /// Re-announces to the chats service the newest message of every chat
    /// sent within [`RECOVERY_WINDOW_US`] before the newest message stored
    /// (see [`MessageStore::recent_activity`]), so that activity the chats
    /// store still held in memory when the process died is not lost. The
    /// chats service ignores what it has already (a seq never moves back).
    /// Call once at start-up, before serving.
    ///
    /// Errors: reading the store, or the chats service refused the call.
    pub async fn announce_recent_activity(&self) -> Result<usize, MessagesError> {
        let recent = self.store.recent_activity(RECOVERY_WINDOW_US).await?;
        let chats = recent.len();
        let activities: Vec<cpb::Activity> = recent
            .into_iter()
            .map(|a| cpb::Activity {
                chat_id: a.chat_id.to_string(),
                last_seq: a.seq.0,
                last_activity_time: Some(timestamp(a.send_time)),
            })
            .collect();
        for chunk in activities.chunks(1000) {
            self.chats.record_activity(chunk.to_vec()).await.map_err(MessagesError::Upstream)?;
        }
        Ok(chats)
    }

    /// The turns of this replica's streams' resyncs.
    pub fn resyncs(&self) -> &crate::stream::Resyncs {
        &self.resyncs
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn MessageStore> {
        &self.store
    }

    /// Says presence goodbye (recording the last-seen times of the users
    /// still online here), then stops the store taking writes, after those
    /// queued (call at shutdown, once serving has stopped, before closing
    /// the bus).
    pub async fn close(&self) {
        self.presence.close().await;
        self.store.close().await;
    }

    /// Presence on this replica.
    pub fn presence(&self) -> &Arc<Presence> {
        &self.presence
    }

    /// GetPresence: the presence of each of `users`, in order, as `caller`
    /// may see it: their own, and that of users who share a chat with them
    /// with no block either way between the two (the chats service's
    /// FilterPeers); [`Seen::Hidden`] for anyone else, existing or not.
    ///
    /// Errors: RESOURCE_EXHAUSTED (`--presence-rate`), UNAVAILABLE (the
    /// chats service), the store's.
    pub async fn presence_of(&self, caller: UserId, users: &[UserId]) -> Result<Vec<Seen>, MessagesError> {
        self.presence_rate.check(&caller)?;
        let others: HashSet<String> = users.iter().filter(|u| **u != caller).map(UserId::to_string).collect();
        // One question to the chats service, whatever the number of users.
        let peers = if others.is_empty() {
            Vec::new()
        } else {
            self.chats.peers_among(&caller.to_string(), others.into_iter().collect()).await?
        };
        let mut visible: HashSet<UserId> = peers.iter().filter_map(|p| p.parse().ok()).collect();
        visible.insert(caller);
        // Before the store's times: a time recorded after this read is in
        // the store's, one not recorded yet (a user who has just gone
        // offline) comes from here.
        let known = self.presence.seen(users);
        let offline: Vec<UserId> = users
            .iter()
            .zip(&known)
            .filter(|(u, seen)| **seen != Seen::Online && visible.contains(u))
            .map(|(u, _)| *u)
            .collect();
        let last_seen = self.store.last_seen(&offline).await?;
        Ok(users
            .iter()
            .zip(known)
            .map(|(user, known)| match (visible.contains(user), known) {
                (false, _) => Seen::Hidden,
                (true, Seen::Offline(unrecorded)) => Seen::Offline(last_seen.get(user).copied().max(unrecorded)),
                (true, seen) => seen,
            })
            .collect())
    }

    /// The limits of messages.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The limits of StreamEvents.
    pub fn stream_limits(&self) -> &StreamLimits {
        &self.stream_limits
    }

    /// The event bus.
    pub fn bus(&self) -> &Arc<dyn EventBus> {
        &self.bus
    }

    /// The chats service.
    pub fn chats(&self) -> &Arc<dyn ChatDirectory> {
        &self.chats
    }

    /// Membership of `user` in `chat`: NOT_FOUND / PERMISSION_DENIED unless a member.
    pub async fn member(
        &self,
        chat: impl Into<ChatId>,
        user: impl Into<UserId>,
    ) -> Result<cpb::CheckMembershipResponse, MessagesError> {
        self.member_with(chat.into(), user.into(), Vec::new(), false).await
    }

    /// As [`Messages::member`], also telling which of `others` are members
    /// (`other_members`, in order), and with `read_receipts` whose read
    /// receipts are private (`private_read_receipts` of `user`,
    /// `other_private_read_receipts`), in the same call to the chats
    /// service.
    async fn member_with(
        &self,
        chat: ChatId,
        user: UserId,
        others: Vec<String>,
        read_receipts: bool,
    ) -> Result<cpb::CheckMembershipResponse, MessagesError> {
        let request = cpb::CheckMembershipRequest {
            chat_id: chat.to_string(),
            user_id: user.to_string(),
            other_user_ids: others,
            read_receipts,
        };
        let m = self.chats.check_memberships(request).await?;
        if !m.chat_exists {
            Err(MessagesError::ChatNotFound)
        } else if !m.member {
            Err(MessagesError::Denied("not a member of this chat"))
        } else {
            Ok(m)
        }
    }

    /// Read access: a member, or anyone for a public chat.
    pub async fn readable(&self, chat: ChatId, user: UserId) -> Result<cpb::CheckMembershipResponse, MessagesError> {
        let m = self.chats.check_membership(&chat.to_string(), &user.to_string()).await?;
        if !m.chat_exists {
            Err(MessagesError::ChatNotFound)
        } else if !m.member && m.visibility != cpb::Visibility::Public as i32 {
            Err(MessagesError::Denied("not a member of this chat"))
        } else {
            Ok(m)
        }
    }

    /// The injection detector's verdict on `text` (None: scanning off).
    fn flags_of(&self, text: &str) -> Option<Flags> {
        let verdict = self.detector.as_ref()?.scan(text);
        Some(Flags::of_score(
            Flags::severity_of(verdict.severity),
            verdict.score,
            verdict.categories.iter().map(|c| c.as_str().to_owned()).collect(),
            natter_detect::DETECTOR,
        ))
    }

    /// The refusal of an edit, a reaction, a pin, a deletion, a read move, a
    /// report or a resolve whose write found the chat's members changed
    /// again (a departure, or someone's loss of rights: a demotion, a
    /// hand-over) after it was checked afresh.
    pub const MEMBERS_CHANGED: &'static str =
        "the chat's members or their roles changed while the change was on its way: retry";

    /// [`Messages::MEMBERS_CHANGED`] for a send.
    pub const MEMBERS_CHANGED_SENDING: &'static str =
        "the chat's members or their roles changed while the message was on its way: retry";

    /// The refusal of a send, an edit, a reaction, a pin, taking a
    /// reaction back, an unpin or a typing indicator in an archived chat
    /// (as checked, or, for those that add to the chat, as read in the
    /// write).
    pub const ARCHIVED: &'static str = "chat is archived";

    /// The refusal of a reply's start whose checks (the caller's) came
    /// before a departure, a loss of rights or the chat's deletion recorded
    /// since ([`Started::Stale`]).
    pub const REPLY_MEMBERS_CHANGED: &'static str = "the chat's members or their roles changed, or the chat was deleted, after the reply's membership checks: check again";

    /// The refusal of a send, an edit, a reaction, a pin or a typing
    /// indicator in a direct chat closed by a block (as checked, or as read
    /// in the write).
    pub const BLOCKED: &'static str = "this direct chat takes no new messages: one of you blocked the other";

    /// SendMessage: commits the message with the chat's next seq, announces
    /// it, and records the chat's activity. A retry with the same
    /// message_id returns the original. A direct chat one of whose members
    /// blocked the other takes none (PERMISSION_DENIED, [`Messages::BLOCKED`]).
    #[tracing::instrument(skip_all, fields(chat_id = %req.chat_id, message_id = tracing::field::Empty, seq = tracing::field::Empty))]
    pub async fn send(&self, caller: UserId, req: SendMessage) -> Result<Message, MessagesError> {
        self.send_rate.check(&caller)?;
        self.stored_bytes.check_n(&caller, stored_bytes(&req.text, &req.attachments))?;
        // A retry is caught by the writer (the id exists); only when the
        // send would now be refused (archived meanwhile, left the chat) is
        // the original looked up first, so a retry still returns it.
        // The mentioned users' membership comes with the caller's, in one
        // call; a send without mentions asks for nothing more.
        let mentioned: Vec<String> = req.mentions.iter().map(|(_, u)| u.to_string()).collect();
        let id = req.message_id.unwrap_or_else(MessageId::new_v7);
        let flags = self.flags_of(&req.text);
        // Whether the membership check below is one made after the write
        // found the last one older than a departure (Sent::Stale).
        let mut rechecked = false;
        let message = loop {
            let allowed = match self.member_with(req.chat_id, caller, mentioned.clone(), false).await {
                Ok(m) if m.archived => Err(MessagesError::Precondition(Self::ARCHIVED)),
                Ok(m) if m.blocked => Err(MessagesError::Denied(Self::BLOCKED)),
                Ok(m) => mentions_of_members(&req.mentions, &m.other_members).map(|()| m.members_version),
                Err(e) => Err(e),
            };
            let members_version = match allowed {
                Ok(version) => version,
                Err(refused) => return self.refused_send(caller, &req, refused).await,
            };
            let new = NewMessage {
                id,
                chat_id: req.chat_id,
                author_id: caller,
                text: req.text.clone(),
                attachments: req.attachments.clone(),
                reply_to: req.reply_to,
                send_time: now_micros(),
                flags: flags.clone(),
                mentions: req.mentions.iter().map(|(_, u)| *u).collect(),
                thread_root: req.thread_root,
                members_version,
            };
            match self.writer.send(new).await? {
                Sent::Created(message) => {
                    tracing::Span::current()
                        .record("message_id", tracing::field::display(message.id))
                        .record("seq", message.seq.0);
                    break message;
                }
                // A member left or was removed after the check above (a
                // send in flight as RemoveMember answered, or a check kept
                // from before): checked again, afresh, once. A departed
                // caller is then refused as any non-member; a member whose
                // check was merely old sends.
                Sent::Stale => {
                    self.check_again(req.chat_id, caller, &mut rechecked, Self::MEMBERS_CHANGED_SENDING)?;
                    continue;
                }
                Sent::NoSuchReply => {
                    return Err(MessagesError::invalid("reply_to_seq", "names no message of this chat"));
                }
                Sent::NoSuchThreadRoot => {
                    return Err(MessagesError::invalid("thread_root_seq", "names no message of this chat"));
                }
                // Closed by a block recorded after the membership check above
                // (a send in flight as BlockUser answered): refused as a send
                // checked after it is.
                Sent::Closed => return self.refused_send(caller, &req, MessagesError::Denied(Self::BLOCKED)).await,
                // Archived after the membership check above (a send in flight
                // as ArchiveChat answered): refused as a send checked after
                // it is.
                Sent::Archived => {
                    return self.refused_send(caller, &req, MessagesError::Precondition(Self::ARCHIVED)).await;
                }
                Sent::ThreadRootDeleted => {
                    // A retry of a reply sent before its root was deleted still
                    // answers the original.
                    if let Some(existing) = self.store.message(id).await? {
                        return same_message(existing, &req, caller);
                    }
                    return Err(MessagesError::Precondition("thread_root_seq: the thread's root is deleted"));
                }
                Sent::Duplicate => {
                    // A retry (its first answer lost), a concurrent retry that
                    // won the race, or a batch committed though its commit
                    // reported a failure (then tried again message by message,
                    // announced by nobody): answered with the message, which is
                    // announced again as it was created. A stream that has it
                    // drops it at once (at or below its cursor), one that missed
                    // it gets it; changed since, the streams re-read the store.
                    let existing = self.store.message(id).await?.ok_or(MessagesError::MessageNotFound)?;
                    let answer = same_message(existing, &req, caller)?;
                    if answer.change_seq == answer.create_change {
                        let event = grpc::created_event(grpc::message_pb(answer.clone(), Vec::new()));
                        self.bus.publish(Topic::Chat(req.chat_id.0), Arc::new(BusEvent::new(req.chat_id, event)));
                    } else {
                        resync(self.bus.as_ref(), req.chat_id);
                    }
                    return Ok(answer);
                }
            }
        };
        let event = grpc::created_event(grpc::message_pb(message.clone(), Vec::new()));
        self.bus.publish(Topic::Chat(req.chat_id.0), Arc::new(BusEvent::new(req.chat_id, event)));
        if let Some(root) = message.thread_root {
            self.announce_root(message.chat_id, root).await;
        }
        if let Some(classifier) = &self.classifier {
            classifier.spawn(message.id, message.chat_id, message.revision, message.text.clone());
        }
        Ok(message)
    }

    /// The answer to a send refused (`refused`) by its chat's state: a
    /// retry of a message stored before, not deleted since, gets it back as
    /// it was created (someone no longer in the chat learns nothing of it
    /// since: replies in its thread, how many changes it saw, who pinned it
    /// or reacted to it, and when); anything else, the refusal.
    async fn refused_send(
        &self,
        caller: UserId,
        req: &SendMessage,
        refused: MessagesError,
    ) -> Result<Message, MessagesError> {
        let Some(id) = req.message_id else { return Err(refused) };
        let Some(existing) = self.store.message(id).await? else { return Err(refused) };
        let mut m = same_message(existing, req, caller)?;
        // One deleted since has nothing of its creation left to answer with.
        if m.deleted() {
            return Err(refused);
        }
        m.thread = None;
        m.pin = None;
        m.reactions.clear();
        m.reaction_rows = 0;
        m.change_seq = m.create_change;
        Ok(m)
    }

    /// A message and the caller's membership of its chat (NOT_FOUND /
    /// PERMISSION_DENIED as for its chat).
    async fn message_for(
        &self,
        caller: UserId,
        message_id: MessageId,
        write: bool,
    ) -> Result<(Message, cpb::CheckMembershipResponse), MessagesError> {
        let message = self.store.message(message_id).await?.ok_or(MessagesError::MessageNotFound)?;
        let membership = if write {
            self.member(message.chat_id, caller).await?
        } else {
            self.readable(message.chat_id, caller).await?
        };
        Ok((message, membership))
    }

    /// GetMessage (flags only for the author, the owner and admins).
    pub async fn get(&self, caller: UserId, message_id: MessageId) -> Result<Message, MessagesError> {
        let (mut message, membership) = self.message_for(caller, message_id, false).await?;
        with_reactions(self.store.as_ref(), std::slice::from_mut(&mut message), Some(caller)).await?;
        Ok(flags_for(message, caller, Sight::of(&membership)))
    }

    /// EditMessage (author only): keeps every earlier revision, up to
    /// `limits.edits` edits; announces it. Not in a direct chat closed by a
    /// block ([`Messages::BLOCKED`]). An edit to the text the message
    /// has already (a retry) changes nothing and is answered as it is,
    /// archived or blocked since or not, and also to its author who left
    /// the chat since, if it has not changed since they left
    /// (`seen_before_leaving`).
    ///
    /// An edit whose membership check came before a departure the store
    /// recorded since (an edit on its way as RemoveMember or a leave
    /// answered) is refused in its write ([`Edited::Stale`]) and checked
    /// again, afresh, once: an author removed meanwhile is refused as any
    /// non-member; ABORTED if the members changed again meanwhile. One
    /// whose check came before a block closed the direct chat is refused in
    /// its write too ([`Edited::Closed`]), as one checked after the block.
    pub async fn edit(&self, caller: UserId, req: EditMessage) -> Result<Message, MessagesError> {
        self.edit_rate.check(&caller)?;
        self.stored_bytes.check_n(&caller, stored_bytes(&req.text, &[]))?;
        let message = self.store.message(req.message_id).await?.ok_or(MessagesError::MessageNotFound)?;
        let flags = self.flags_of(&req.text);
        // Whether the membership check below is one made after the store
        // found the last one older than a departure (Edited::Stale).
        let mut rechecked = false;
        let mut edited = loop {
            let membership = match self.member(message.chat_id, caller).await {
                // A retry by its author who left since, as DeleteMessage's.
                Err(MessagesError::Denied(_))
                    if !message.deleted()
                        && message.text == req.text
                        && self.seen_before_leaving(caller, &message).await? =>
                {
                    return self.as_it_is(message, caller).await;
                }
                membership => membership?,
            };
            if message.author_id != caller {
                return Err(MessagesError::Denied("only the author may edit a message"));
            }
            if message.deleted() {
                return Err(MessagesError::Precondition("message is deleted"));
            }
            // A retry (its answer lost) finds the text in place: answered as
            // it is whatever came since (the chat archived, a block), as the
            // store answers one below, rather than refused as if it had
            // failed.
            if membership.archived || membership.blocked {
                if message.text == req.text {
                    return self.as_it_is(message, caller).await;
                }
                if membership.archived {
                    return Err(MessagesError::Precondition(Self::ARCHIVED));
                }
                return Err(MessagesError::Denied(Self::BLOCKED));
            }
            let (now, max) = (now_micros(), self.limits.edits);
            match self.store.edit(message.id, &req.text, flags.as_ref(), now, max, membership.members_version).await? {
                Edited::Done(message) => break message,
                Edited::Unchanged(message) => return self.as_it_is(message, caller).await,
                Edited::Deleted => return Err(MessagesError::Precondition("message is deleted")),
                Edited::TooManyEdits => {
                    let (message, limit) = (message.id.to_string(), self.limits.edits);
                    return Err(MessagesError::TooManyEdits { message, limit });
                }
                // A member left or was removed after the check above: checked
                // again, afresh, once, as a send is.
                Edited::Stale => self.check_again(message.chat_id, caller, &mut rechecked, Self::MEMBERS_CHANGED)?,
                // Closed by a block recorded after the check above (an edit
                // on its way as BlockUser answered): refused as one checked
                // after it is.
                Edited::Closed => return Err(MessagesError::Denied(Self::BLOCKED)),
                // Archived after the check above (an edit on its way as
                // ArchiveChat answered): likewise.
                Edited::Archived => return Err(MessagesError::Precondition(Self::ARCHIVED)),
            }
        };
        let unannounced = Unannounced::new(&self.bus, edited.chat_id);
        with_reactions(self.store.as_ref(), std::slice::from_mut(&mut edited), Some(caller)).await?;
        self.bus.publish(
            Topic::Chat(edited.chat_id.0),
            Arc::new(BusEvent::new(edited.chat_id, grpc::edited_event(counts_only(edited.clone())))),
        );
        unannounced.announced();
        if let Some(classifier) = &self.classifier {
            classifier.spawn(edited.id, edited.chat_id, edited.revision, edited.text.clone());
        }
        Ok(edited)
    }

    /// The answer to an edit that changes nothing (the text it has
    /// already): the message as it is, with its reactions as `caller` sees
    /// them.
    async fn as_it_is(&self, mut message: Message, caller: UserId) -> Result<Message, MessagesError> {
        with_reactions(self.store.as_ref(), std::slice::from_mut(&mut message), Some(caller)).await?;
        Ok(message)
    }

    /// DeleteMessage (author, the chat's owner or an admin, or the person of
    /// an assistant chat for the assistant's replies): leaves a
    /// tombstone; deleting a tombstone returns it. A prompt's assistant
    /// replies go with it (privacy audit M3: a reply restates its prompt),
    /// in the same transaction, each announced as its own deletion before
    /// the prompt's ([`MessageStore::delete_with_replies`]). A person's
    /// message in a direct chat then takes back the chat's title if an
    /// assistant made it from that message (M2, UntitleChat).
    ///
    /// A retry whose first answer was lost is answered with the tombstone,
    /// as a member's is, also to the user who deleted it (its author, or an
    /// owner or admin moderating) whatever their role now, and to its
    /// author or that user no longer in the chat if they saw it deleted
    /// (`seen_before_leaving`); else a former member is refused
    /// (PERMISSION_DENIED), as any request of theirs is, and a member who
    /// may not delete it too.
    ///
    /// A deletion whose membership check came before a departure or a loss
    /// of rights the store recorded since (a deletion on its way as
    /// RemoveMember, a leave or a demotion answered) is refused in its write
    /// ([`Deletion::Stale`]) and checked again, afresh, once, as an edit is
    /// ([`Messages::edit`]): a removed author, or a demoted moderator, is
    /// then refused as such.
    ///
    /// Errors: as [`Messages::member`]; ABORTED (the chat's members changed
    /// again while the deletion was on its way: retry); UNAVAILABLE (or the
    /// chats service's error) when the title could not be taken back: the
    /// deletion is stored, and a retry (a tombstone: no change) asks again.
    pub async fn delete(&self, caller: UserId, message_id: MessageId) -> Result<Message, MessagesError> {
        self.moderation_rate.check(&caller)?;
        let message = self.store.message(message_id).await?.ok_or(MessagesError::MessageNotFound)?;
        // Whether the membership check below is one made after the store
        // found the last one older than a departure (Deletion::Stale).
        let mut rechecked = false;
        let (membership, deleted, replies) = loop {
            let membership = match self.member(message.chat_id, caller).await {
                Err(MessagesError::Denied(_))
                    if message.deleted() && self.seen_before_leaving(caller, &message).await? =>
                {
                    return Ok(message);
                }
                membership => membership?,
            };
            let manager = natter_links::manages(&membership);
            // An assistant's reply in a direct chat (an assistant chat): its
            // person, the only other member, may delete it.
            let assistant_chat_reply =
                membership.kind == cpb::ChatKind::Direct as i32 && message.role() == crate::store::Role::Assistant;
            if message.author_id != caller && !manager && !assistant_chat_reply {
                // A retry by a moderator demoted since: their delete happened.
                if message.deleted() && message.deleted_by == Some(caller) {
                    return Ok(message);
                }
                return Err(MessagesError::Denied("only the author, the owner or an admin may delete a message"));
            }
            // A tombstone too: its replies still live (deleted before replies
            // went with their prompt) go now, and its title is asked again.
            match self.store.delete_with_replies(message.id, caller, now_micros(), membership.members_version).await? {
                Deletion::Done(Deleted { message: deleted, replies }) => break (membership, deleted, replies),
                Deletion::NotFound => return Err(MessagesError::MessageNotFound),
                // A member left or was removed, or lost rights, after the
                // check above: checked again, afresh, once.
                Deletion::Stale => {
                    self.check_again(message.chat_id, caller, &mut rechecked, Self::MEMBERS_CHANGED)?;
                }
            }
        };
        let chat = deleted.chat_id;
        for reply in replies {
            self.bus.publish(Topic::Chat(chat.0), Arc::new(BusEvent::new(chat, grpc::deleted_event(reply))));
        }
        if !message.deleted() {
            self.bus.publish(Topic::Chat(chat.0), Arc::new(BusEvent::new(chat, grpc::deleted_event(deleted.clone()))));
            if let Some(root) = deleted.thread_root {
                self.announce_root(chat, root).await;
            }
        }
        // Only a direct chat (an assistant chat) is titled from a prompt.
        if membership.kind == cpb::ChatKind::Direct as i32 && deleted.role() == crate::store::Role::User {
            self.chats.untitle_chat(&chat.to_string(), &deleted.id.to_string()).await.map_err(|status| {
                tracing::warn!(chat_id = %chat, message_id = %deleted.id, error = %status.message(), "cannot take back a deleted prompt's title");
                MessagesError::Upstream(status)
            })?;
        }
        Ok(deleted)
    }

    /// After a write refused as stale (its membership check came before a
    /// departure the store recorded since): the first time (`rechecked`
    /// false, then set), drops `caller`'s cached membership of `chat`, so
    /// that the caller's next check is made afresh; the second time,
    /// ABORTED with `why` (the members changed again meanwhile: retry).
    fn check_again(
        &self,
        chat: ChatId,
        caller: UserId,
        rechecked: &mut bool,
        why: &'static str,
    ) -> Result<(), MessagesError> {
        if std::mem::replace(rechecked, true) {
            return Err(MessagesError::Aborted(why));
        }
        self.chats.forget_membership(&chat.to_string(), &caller.to_string());
        Ok(())
    }

    /// Whether `caller`, who is no member of `message`'s chat (any more),
    /// saw `message` as it is now: they are its author or deleted it (an
    /// owner or admin then), and nothing has changed it since they left
    /// (its change number is below their departure's in the chat's log; a
    /// departure not logged yet comes after every change so far; one
    /// pruned from the log is not told). A retry of theirs whose first
    /// answer was lost (a DeleteMessage that finds the tombstone, an
    /// EditMessage that finds its text) is then answered with it: that
    /// tells nothing they did not see as a member.
    async fn seen_before_leaving(&self, caller: UserId, message: &Message) -> Result<bool, MessagesError> {
        if message.author_id != caller && message.deleted_by != Some(caller) {
            return Ok(false);
        }
        Ok(match self.store.latest_membership(message.chat_id, caller).await? {
            Some(Membership::Departed(departure)) => message.change_seq < departure,
            Some(Membership::Joined(_)) => true,
            None => false,
        })
    }

    /// Announces a thread's root as edited (deleted, for a deleted root)
    /// after a reply to it, or a reply's deletion, changed its summary: the
    /// root as the store holds it now, read after the change committed. The
    /// event's number is the root's change_seq then, at least the change's
    /// own, and all before it is stored, so streams take it as any event
    /// (concurrent replies may announce the same state twice: a stream
    /// drops the repeat). The change is committed already: a failed read is
    /// logged, and streams get the root's change from the store at their
    /// next event of the chat (a gap fill) or on resume.
    async fn announce_root(&self, chat: ChatId, root: Seq) {
        let read = async {
            let mut found = self.message_at(chat, root).await?;
            with_reactions(self.store.as_ref(), found.as_mut_slice(), None).await?;
            Ok::<_, MessagesError>(found)
        };
        let root = match read.await {
            Ok(Some(root)) => root,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(chat_id = %chat, seq = root.0, error = %e, "announcing a thread's root failed");
                return;
            }
        };
        // A deleted root's change is a deletion's, as a replay tells it.
        let event = if root.deleted() { grpc::deleted_event(root) } else { grpc::edited_event(counts_only(root)) };
        self.bus.publish(Topic::Chat(chat.0), Arc::new(BusEvent::new(chat, event)));
    }

    /// The message of `chat` at `seq` (superseded replies too), if any.
    async fn message_at(&self, chat: ChatId, seq: Seq) -> Result<Option<Message>, MessagesError> {
        let range = Range { after: Some(Seq(seq.0 - 1)), ascending: true, superseded: true, ..Range::default() };
        Ok(self.store.list(chat, range, None, 1).await?.into_iter().find(|m| m.seq == seq))
    }

    /// AddReaction / RemoveReaction (a member of the message's chat):
    /// adds or removes the caller's reaction and, when that changed
    /// anything, announces the message as edited (counts only: each stream
    /// sets its own user's `reacted_by_me`). Returns the message with its
    /// reactions as the caller sees them. No reaction is added in a direct
    /// chat closed by a block ([`Messages::BLOCKED`]); one is taken back.
    /// Refused (archived, blocked), a request the message already answers
    /// (a retry: the reaction there, or gone) is answered as a repeat is.
    /// A change whose membership check came before a departure recorded
    /// since is refused in its write and checked again, afresh, once, as
    /// an edit is ([`Messages::edit`]); an add whose check came before a
    /// block closed the direct chat is refused in its write
    /// ([`Reacted::Closed`]).
    #[tracing::instrument(skip_all, fields(message_id = %req.message_id, add = req.add))]
    pub async fn react(&self, caller: UserId, req: React) -> Result<Message, MessagesError> {
        self.reaction_rate.check(&caller)?;
        // Whether the membership check below is one made after the store
        // found the last one older than a departure (Reacted::Stale).
        let mut rechecked = false;
        loop {
            let (message, membership) = self.message_for(caller, req.message_id, true).await?;
            if message.deleted() {
                return Err(MessagesError::MessageNotFound);
            }
            let sight = Sight::of(&membership);
            // Taking one's reaction back is no new message.
            if let Some(refused) = refusal(&membership, req.add) {
                // A retry (its answer lost) that finds its change made
                // already is answered as a repeat is (a no-op), not refused
                // as if it had failed.
                let mut message = message;
                with_reactions(self.store.as_ref(), std::slice::from_mut(&mut message), Some(caller)).await?;
                let mine = message.reactions.iter().any(|r| r.emoji == req.emoji && r.mine);
                return if mine == req.add { Ok(flags_for(message, caller, sight)) } else { Err(refused) };
            }
            let version = membership.members_version;
            // A removal takes back the form sent too (a reaction stored
            // before canonical forms).
            let mut stale = false;
            if let Some(as_sent) = req.as_sent.as_deref().filter(|_| !req.add) {
                match self
                    .store
                    .react(message.id, caller, as_sent, false, now_micros(), REACTION_EMOJI_MAX, version)
                    .await?
                {
                    Reacted::Changed(message) => {
                        let chat = message.chat_id;
                        let event = grpc::edited_event(counts_only(message));
                        self.bus.publish(Topic::Chat(chat.0), Arc::new(BusEvent::new(chat, event)));
                    }
                    Reacted::Stale => stale = true,
                    Reacted::Unchanged(_)
                    | Reacted::Gone
                    | Reacted::TooManyEmoji
                    | Reacted::Closed
                    | Reacted::Archived => {}
                }
            }
            let reacted = if stale {
                Reacted::Stale
            } else {
                self.store
                    .react(message.id, caller, &req.emoji, req.add, now_micros(), REACTION_EMOJI_MAX, version)
                    .await?
            };
            return match reacted {
                Reacted::Changed(message) => {
                    let chat = message.chat_id;
                    let event = grpc::edited_event(counts_only(message.clone()));
                    self.bus.publish(Topic::Chat(chat.0), Arc::new(BusEvent::new(chat, event)));
                    Ok(flags_for(message, caller, sight))
                }
                Reacted::Unchanged(message) => Ok(flags_for(message, caller, sight)),
                Reacted::Gone => Err(MessagesError::MessageNotFound),
                Reacted::TooManyEmoji => Err(MessagesError::TooManyReactions {
                    message: req.message_id.to_string(),
                    limit: REACTION_EMOJI_MAX,
                }),
                // An add in a direct chat closed by a block recorded after
                // the check above: refused as one checked after it is.
                Reacted::Closed => Err(MessagesError::Denied(Self::BLOCKED)),
                // An add in a chat archived after the check above: likewise.
                Reacted::Archived => Err(MessagesError::Precondition(Self::ARCHIVED)),
                // A member left or was removed after the check above: checked
                // again, afresh, once.
                Reacted::Stale => {
                    self.check_again(message.chat_id, caller, &mut rechecked, Self::MEMBERS_CHANGED)?;
                    continue;
                }
            };
        }
    }

    /// PinMessage (`pin`) and UnpinMessage: a direct chat's members, a
    /// group's owner and admins; not in an archived chat; a pin not in a
    /// direct chat closed by a block ([`Messages::BLOCKED`]), an unpin
    /// always. A real change is announced as `message_edited`; a repeat
    /// answers the message as it is, even where a change would now be
    /// refused (a retry). At most [`PINS_MAX`] pins a chat.
    /// Counts against the edit rate. A change whose membership check came
    /// before a departure or a loss of rights (a demotion) recorded since
    /// is refused in its write and checked again, afresh, once, as an edit
    /// is ([`Messages::edit`]): a demoted admin is then refused as a plain
    /// member. A pin whose check came before a block closed the direct chat
    /// is refused in its write ([`Pinned::Closed`]).
    pub async fn pin(&self, caller: UserId, message_id: MessageId, pin: bool) -> Result<Message, MessagesError> {
        self.edit_rate.check(&caller)?;
        // Whether the membership check below is one made after the store
        // found the last one older than a departure (Pinned::Stale).
        let mut rechecked = false;
        let (mut message, changed, sight) = loop {
            let (message, membership) = self.message_for(caller, message_id, true).await?;
            if message.deleted() {
                return Err(MessagesError::MessageNotFound);
            }
            let sight = Sight::of(&membership);
            if !sight.direct && !sight.manager {
                return Err(MessagesError::Denied("only the chat's owner and admins may pin or unpin its messages"));
            }
            if let Some(refused) = refusal(&membership, pin) {
                // A retry (its answer lost) that finds the message pinned
                // (or not) as asked is answered as a repeat is, not refused.
                if message.pin.is_some() != pin {
                    return Err(refused);
                }
                let mut message = message;
                with_reactions(self.store.as_ref(), std::slice::from_mut(&mut message), Some(caller)).await?;
                return Ok(flags_for(message, caller, sight));
            }
            let version = membership.members_version;
            match self.store.pin(message.id, caller, pin, now_micros(), PINS_MAX, version).await? {
                Pinned::Changed(message) => break (message, true, sight),
                Pinned::Unchanged(message) => break (message, false, sight),
                Pinned::Gone => return Err(MessagesError::MessageNotFound),
                Pinned::TooMany => {
                    return Err(MessagesError::TooManyPins { chat: message.chat_id.to_string(), limit: PINS_MAX });
                }
                // A member left or was removed after the check above:
                // checked again, afresh, once.
                Pinned::Stale => self.check_again(message.chat_id, caller, &mut rechecked, Self::MEMBERS_CHANGED)?,
                // A pin in a direct chat closed by a block recorded after
                // the check above: refused as one checked after it is.
                Pinned::Closed => return Err(MessagesError::Denied(Self::BLOCKED)),
                // A pin in a chat archived after the check above: likewise.
                Pinned::Archived => return Err(MessagesError::Precondition(Self::ARCHIVED)),
            }
        };
        let unannounced = changed.then(|| Unannounced::new(&self.bus, message.chat_id));
        with_reactions(self.store.as_ref(), std::slice::from_mut(&mut message), Some(caller)).await?;
        if let Some(unannounced) = unannounced {
            let chat = message.chat_id;
            let event = grpc::edited_event(counts_only(message.clone()));
            self.bus.publish(Topic::Chat(chat.0), Arc::new(BusEvent::new(chat, event)));
            unannounced.announced();
        }
        Ok(flags_for(message, caller, sight))
    }

    /// ListMessageRevisions: up to `page_size` revisions after revision
    /// `after` (a page token's key), oldest first, the current one last;
    /// with the key of the next page while there are more.
    pub async fn revisions(
        &self,
        caller: UserId,
        req: ListRevisions,
    ) -> Result<(Vec<Revision>, Option<i64>), MessagesError> {
        let (message, _) = self.message_for(caller, req.message_id, false).await?;
        if message.deleted() {
            return Ok((Vec::new(), None));
        }
        let after = req.after.unwrap_or(0);
        let mut out = self.store.revisions_after(message.id, after, req.page_size + 1).await?;
        // The current text is the newest revision: it follows every earlier one.
        if message.revision > after {
            out.push(Revision {
                message_id: message.id,
                revision: message.revision,
                edit_time: message.edit_time.unwrap_or(message.send_time),
                text: message.text,
            });
        }
        let next = if out.len() > req.page_size as usize {
            out.truncate(req.page_size as usize);
            out.last().map(|r| r.revision)
        } else {
            None
        };
        Ok((out, next))
    }

    /// ListMessages: a page of history with, when asked, every earlier
    /// revision; with the key of the next page while there are more.
    pub async fn list(
        &self,
        caller: UserId,
        req: ListMessages,
    ) -> Result<(Vec<WithHistory>, Option<Seq>), MessagesError> {
        let membership = self.readable(req.chat_id, caller).await?;
        let sight = Sight::of(&membership);
        if req.range.flagged && !sight.manager {
            return Err(MessagesError::Denied("only the chat's owner and admins may list its flagged messages"));
        }
        let mut messages: Vec<Message> = (self.store.list(req.chat_id, req.range, req.from, req.page_size + 1).await?)
            .into_iter()
            .map(|m| flags_for(m, caller, sight))
            .collect();
        let mut next = if messages.len() > req.page_size as usize {
            messages.truncate(req.page_size as usize);
            messages.last().map(|m| m.seq)
        } else {
            None
        };
        // The page ends where its bytes would pass PAGE_BYTES (its first
        // message always comes); `bytes` is what it keeps.
        let (fit, bytes) = fitting(&messages, Message::weight);
        if fit < messages.len() {
            messages.truncate(fit);
            next = messages.last().map(|m| m.seq);
        }
        with_reactions(self.store.as_ref(), &mut messages, Some(caller)).await?;
        if !req.include_history {
            return Ok((
                messages.into_iter().map(|message| WithHistory { message, history: Vec::new() }).collect(),
                next,
            ));
        }
        let page = self.with_history(messages, PAGE_BYTES.saturating_sub(bytes)).await?;
        if page.cut {
            next = page.messages.last().map(|m| m.message.seq);
        }
        Ok((page.messages, next))
    }

    /// Attaches their earlier revisions to `messages`, in order, while they
    /// fit in `budget` bytes: the page is cut before the first message
    /// whose revisions would pass it (never before the first). Revisions
    /// are read for a run of messages at a time, as many as fit in what is
    /// left of the budget were each of their revisions as long as a text
    /// may be, so no more than about twice the budget is ever held.
    async fn with_history(&self, messages: Vec<Message>, budget: usize) -> Result<HistoryPage, MessagesError> {
        let most = |m: &Message| usize::try_from(m.revision - 1).unwrap_or(0) * (32 + self.limits.text_bytes);
        let mut page = HistoryPage { messages: Vec::with_capacity(messages.len()), cut: false };
        let mut spent = 0;
        let mut pending = messages.into_iter().peekable();
        while pending.peek().is_some() {
            let mut run = Vec::new();
            let mut at_most = 0;
            while let Some(m) = pending.next_if(|m| run.is_empty() || at_most + most(m) <= budget.saturating_sub(spent))
            {
                at_most += most(&m);
                run.push(m);
            }
            let edited: Vec<MessageId> = run.iter().filter(|m| m.revision > 1).map(|m| m.id).collect();
            let mut revisions = if edited.is_empty() { Vec::new() } else { self.store.revisions(&edited).await? };
            for message in run {
                let (history, rest): (Vec<Revision>, Vec<Revision>) =
                    revisions.drain(..).partition(|r| r.message_id == message.id);
                revisions = rest;
                let size: usize = history.iter().map(revision_weight).sum();
                if !page.messages.is_empty() && spent + size > budget {
                    page.cut = true;
                    return Ok(page);
                }
                spent += size;
                page.messages.push(WithHistory { message, history });
            }
        }
        Ok(page)
    }

    /// MarkRead: moves the caller's read position forward (clamped to the
    /// newest message) and returns it with the unread count; announces it
    /// when it moved (a change of the chat). Counted against the caller's
    /// `--mark-read-rate`.
    pub async fn mark_read(&self, caller: UserId, req: MarkRead) -> Result<ReadState, MessagesError> {
        self.mark_read_rate.check(&caller)?;
        self.mark_read_as(caller, req).await
    }

    /// ListReadPositions: up to `page_size` read positions of the chat's
    /// members after user `after` (a page token's key), by user id, with
    /// the key of the next page while a position after the page is to be
    /// listed. Read positions kept for users who have left, those of other
    /// users whose read receipts are private, and the other member's in a
    /// direct chat closed by a block, are left out, by the same call to the
    /// chats service that checks the caller is a member; the page is
    /// filled from the store's next rows instead, for up to
    /// [`READ_POSITION_ROUNDS`] store reads a call (past that a page may be
    /// short, with a next key: AIP-158 allows it). So a page is empty, or
    /// has a next key, only when that many reads found nothing to list.
    ///
    /// Errors: NOT_FOUND (no such chat), PERMISSION_DENIED (not a member).
    pub async fn chat_read_positions(
        &self,
        caller: UserId,
        req: ListReadPositions,
    ) -> Result<(Vec<(UserId, Seq)>, Option<UserId>), MessagesError> {
        let want = req.page_size as usize;
        let (mut page, mut after) = (Vec::with_capacity(want), req.after);
        for _ in 0..READ_POSITION_ROUNDS {
            // One row past what the page still needs: whether a next page
            // has anything to list is known by the same check.
            let need = want - page.len();
            let fetched = self.store.chat_read_positions(req.chat_id, after, need as u32 + 1).await?;
            let exhausted = fetched.len() <= need;
            after = fetched.last().map(|(user, _)| *user);
            let users = fetched.iter().map(|(user, _)| user.to_string()).collect();
            let m = self.member_with(req.chat_id, caller, users, true).await?;
            // A chats service of a build before private read receipts
            // answers none: taken as private (only the caller's own is
            // listed) until it is upgraded. In a direct chat closed by a
            // block, neither sees the other's.
            let mut private = m.other_private_read_receipts.iter().chain(std::iter::repeat(&true));
            let mut members = m.other_members.iter();
            page.extend(fetched.into_iter().filter(|(user, _)| {
                let (member, private) = (members.next().copied().unwrap_or(false), *private.next().unwrap_or(&true));
                member && (*user == caller || !(private || m.blocked))
            }));
            if page.len() > want {
                page.truncate(want);
                let next = page.last().map(|(user, _)| *user);
                return Ok((page, next));
            }
            if exhausted || after.is_none() {
                return Ok((page, None));
            }
        }
        // Rounds spent on positions nobody may see: the rest next time.
        Ok((page, after))
    }

    /// Internal MarkReadAs (the assistant, for its bot):
    /// [`Messages::mark_read`] as `caller`, with no rate of its own (the
    /// bot marks every chat it answers). A caller whose read receipts are
    /// private (their privacy setting read_receipts, read from the chats
    /// service in the membership check), or who marks a direct chat closed
    /// by a block, has the move announced to their own streams only.
    ///
    /// A move whose membership check came before a departure the store
    /// recorded since (a MarkRead on its way as RemoveMember or a leave
    /// answered) is refused in its write ([`Marked::Stale`]) and checked
    /// again, afresh, once, as an edit is ([`Messages::edit`]): ABORTED if
    /// the members changed again meanwhile.
    pub async fn mark_read_as(&self, caller: UserId, req: MarkRead) -> Result<ReadState, MessagesError> {
        // Whether the membership check below is one made after the store
        // found the last one older than a departure (Marked::Stale).
        let mut rechecked = false;
        let (m, state) = loop {
            let m = self.member_with(req.chat_id, caller, Vec::new(), true).await?;
            match self.store.mark_read(req.chat_id, caller, req.seq, m.members_version).await? {
                Marked::Done(state) => break (m, state),
                Marked::Stale => self.check_again(req.chat_id, caller, &mut rechecked, Self::MEMBERS_CHANGED)?,
            }
        };
        if let Some(change_seq) = state.change_seq {
            let payload = grpc::read_event(req.chat_id, caller, state.read_seq, change_seq);
            let mut event = BusEvent::new(req.chat_id, payload).concerning(caller);
            // Private by the caller's setting, or in a direct chat closed by
            // a block (as WhatsApp sends no receipts to a blocked contact).
            if m.private_read_receipts || m.blocked {
                event = event.for_its_users_only();
            }
            self.bus.publish(Topic::Chat(req.chat_id.0), Arc::new(event));
        }
        Ok(state)
    }

    /// SetTyping: announces that `caller` is typing in a chat (or stopped)
    /// to the chat's streams, as an ephemeral event (nothing is stored);
    /// returns when the indicator ends unless renewed, in µs since the
    /// epoch. Not in a direct chat closed by a block ([`Messages::BLOCKED`]),
    /// but for a stop: an indicator started before the block ends at once,
    /// not seconds later.
    pub async fn set_typing(&self, caller: UserId, chat: ChatId, typing: bool) -> Result<i64, MessagesError> {
        self.typing_rate.check(&caller)?;
        let m = self.member(chat, caller).await?;
        if m.archived {
            return Err(MessagesError::Precondition(Self::ARCHIVED));
        }
        if m.blocked && typing {
            return Err(MessagesError::Denied(Self::BLOCKED));
        }
        let now = natter_kit::time::now_micros();
        let until = if typing { now + i64::try_from(self.typing_timeout.as_micros()).unwrap_or(i64::MAX) } else { now };
        let payload = grpc::typing_event(chat, caller, until);
        self.bus.publish(Topic::Chat(chat.0), Arc::new(BusEvent::new(chat, payload).concerning(caller)));
        Ok(until)
    }

    /// Internal: records whether direct chat `chat` takes new messages
    /// (RecordChatChanges' direct_chat_closed, sent by the chats service
    /// for a block or an unblock before it answers), at `version`, where
    /// every send's write reads it ([`MessageStore::close_direct_chat`]).
    /// Announces nothing: the blocked user is not told.
    pub async fn close_direct_chat(&self, chat: ChatId, closed: bool, version: i64) -> Result<(), MessagesError> {
        self.store.close_direct_chat(chat, closed, version).await?;
        tracing::debug!(chat_id = %chat, closed, version, "direct chat closure recorded");
        Ok(())
    }

    /// Internal: records that `chat`'s members version is `version` after
    /// a departure or a loss of rights (RecordChatChanges'
    /// members_departed, sent by the chats service before RemoveMember or
    /// UpdateMember answers), where every write of a member's change reads
    /// it ([`MessageStore::record_departure`]).
    pub async fn record_departure(&self, chat: ChatId, version: i64) -> Result<(), MessagesError> {
        self.store.record_departure(chat, version).await?;
        tracing::debug!(chat_id = %chat, version, "members version recorded");
        Ok(())
    }

    /// Internal: records whether chat `chat` is archived (RecordChatChanges'
    /// chat_archived, sent by the chats service for an ArchiveChat or an
    /// UnarchiveChat before it answers), at `version`, where the writes
    /// that add to the chat read it ([`MessageStore::archive_chat`]).
    /// Announces nothing: the chat's members hear of it by the archive's
    /// own chat_updated.
    pub async fn archive_chat(&self, chat: ChatId, archived: bool, version: i64) -> Result<(), MessagesError> {
        self.store.archive_chat(chat, archived, version).await?;
        tracing::debug!(chat_id = %chat, archived, version, "chat's archived state recorded");
        Ok(())
    }

    /// Internal: records committed changes of a chat's membership or
    /// details (see [`MessageStore::record_chat_changes`]) and announces
    /// each on the chat's topic, a membership change also on its member's
    /// (whose streams follow the chats they join), a joiner's reset read
    /// position on the chat's. `committed`: when the chats service committed
    /// them (µs; None: now), which places a join's read position. Returns
    /// the change numbers, in order. A retry with the same non-empty
    /// `idempotency_key` records nothing again and announces the changes
    /// again (a stream drops what it saw).
    pub async fn record_chat_changes(
        &self,
        chat: ChatId,
        changes: &[ChatChange],
        idempotency_key: &str,
        committed: Option<i64>,
    ) -> Result<Vec<i64>, MessagesError> {
        let now = committed.unwrap_or_else(now_micros);
        let logged = self.store.record_chat_changes(chat, changes, now, idempotency_key).await?;
        let joiners: Vec<UserId> =
            changes.iter().zip(&logged).filter(|(_, l)| l.read.is_some()).filter_map(|(c, _)| c.user()).collect();
        let private = self.private_receipts(chat, &joiners).await;
        for (change, logged) in changes.iter().zip(&logged) {
            let payload = grpc::chat_change_event(chat, change, logged.seq, logged.change_seq);
            let mut event = BusEvent::new(chat, payload);
            if let Some(user) = change.user() {
                event = event.concerning(user);
                let event = Arc::new(event);
                self.bus.publish(Topic::User(user.0), event.clone());
                self.bus.publish(Topic::Chat(chat.0), event);
                if let Some((change_seq, read_seq)) = logged.read {
                    let mut read =
                        BusEvent::new(chat, grpc::read_event(chat, user, read_seq, change_seq)).concerning(user);
                    // As MarkRead's: a joiner whose read receipts are
                    // private is heard by their own streams only.
                    if private.contains(&user) {
                        read = read.for_its_users_only();
                    }
                    self.bus.publish(Topic::Chat(chat.0), Arc::new(read));
                }
            } else {
                self.bus.publish(Topic::Chat(chat.0), Arc::new(event));
            }
        }
        Ok(logged.into_iter().map(|l| l.change_seq).collect())
    }

    /// Which of `users` (at most a group's members) keep their read
    /// receipts of `chat` from the others (their privacy setting, or a
    /// block in a direct chat), in one call to the chats service; all of
    /// them when it fails (a receipt left unsaid, never one told against a
    /// setting).
    async fn private_receipts(&self, chat: ChatId, users: &[UserId]) -> HashSet<UserId> {
        let Some((first, others)) = users.split_first() else { return HashSet::new() };
        let request = cpb::CheckMembershipRequest {
            chat_id: chat.to_string(),
            user_id: first.to_string(),
            other_user_ids: others.iter().map(UserId::to_string).collect(),
            read_receipts: true,
        };
        match self.chats.check_memberships(request).await {
            Ok(m) if m.chat_exists => {
                let mut private = m.other_private_read_receipts.iter().chain(std::iter::repeat(&true));
                let first_private = m.private_read_receipts || m.blocked;
                std::iter::once(first_private)
                    .chain(others.iter().map(|_| *private.next().unwrap_or(&true) || m.blocked))
                    .zip(users)
                    .filter_map(|(private, user)| private.then_some(*user))
                    .collect()
            }
            // Deleted meanwhile: no stream follows it any more.
            Ok(_) => users.iter().copied().collect(),
            Err(status) => {
                tracing::warn!(chat_id = %chat, error = %status.message(), "cannot read joiners' read receipts settings; their join positions go to their own streams only");
                users.iter().copied().collect()
            }
        }
    }

    /// Internal: each chat's newest message and the user's unread count, in
    /// the order of `chats`.
    pub async fn summaries(&self, chats: &[ChatId], user: Option<UserId>) -> Result<Vec<Summary>, MessagesError> {
        Ok(self.store.summaries(chats, user).await?)
    }

    /// Internal: a chat's newest messages of its main timeline (those with
    /// a seq below `before`, if given), newest first (superseded replies
    /// and thread replies left out, as ListMessages by default), at most
    /// `page_size` and, as a ListMessages page, no more than fit in
    /// [`PAGE_BYTES`] (the newest always).
    pub async fn recent(
        &self,
        chat: ChatId,
        page_size: u32,
        viewer: Option<UserId>,
        before: Option<Seq>,
    ) -> Result<Vec<Message>, MessagesError> {
        let range = Range { timeline: Timeline::Main, before, ..Range::default() };
        let mut messages = self.store.list(chat, range, None, page_size).await?;
        // GetChat's screen, as a ListMessages page: no more than a client
        // can take, the newest first.
        messages.truncate(fitting(&messages, Message::weight).0);
        if viewer.is_some() {
            with_reactions(self.store.as_ref(), &mut messages, viewer).await?;
        }
        Ok(messages)
    }

    /// Internal: deletes everything of a chat.
    pub async fn purge(&self, chat: ChatId) -> Result<(), MessagesError> {
        Ok(self.store.purge_chat(chat).await?)
    }

    /// Internal: forgets deleted user `user`, deleting its last-seen time,
    /// read positions and mention rows ([`MessageStore::forget_user`]).
    #[tracing::instrument(skip_all, fields(user_id = %user))]
    pub async fn forget_user(&self, user: UserId) -> Result<(), MessagesError> {
        Ok(self.store.forget_user(user).await?)
    }

    /// Internal: the messages with `ids` and those of a chat at `seqs`
    /// (superseded replies too), the ones that exist.
    pub async fn lookup(&self, ids: &[MessageId], at: Option<(ChatId, &[Seq])>) -> Result<Vec<Message>, MessagesError> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            found.extend(self.store.message(*id).await?);
        }
        if let Some((chat, seqs)) = at {
            for seq in seqs {
                found.extend(self.message_at(chat, *seq).await?);
            }
        }
        Ok(found)
    }

    /// ReportMessage: `caller` (a member, not the author) reports a live
    /// message; a repeat returns the first report. A report whose
    /// membership check came before a departure the store recorded since is
    /// refused in its write ([`Reported::Stale`]) and checked again, afresh,
    /// once, as an edit is ([`Messages::edit`]): ABORTED if the members
    /// changed again meanwhile.
    pub async fn report(
        &self,
        caller: UserId,
        message_id: MessageId,
        reason: i32,
        comment: String,
    ) -> Result<StoredReport, MessagesError> {
        self.moderation_rate.check(&caller)?;
        // Whether the membership check below is one made after the store
        // found the last one older than a departure (Reported::Stale).
        let mut rechecked = false;
        loop {
            let (message, membership) = self.message_for(caller, message_id, true).await?;
            if message.author_id == caller {
                return Err(MessagesError::Precondition("one cannot report one's own message"));
            }
            if message.deleted() {
                return Err(MessagesError::Precondition("message is deleted"));
            }
            let report = StoredReport {
                message_id,
                reporter: caller,
                chat_id: message.chat_id,
                reason,
                comment: comment.clone(),
                create_time: now_micros(),
                resolve_time: None,
            };
            match self.store.report(&report, membership.members_version).await? {
                Reported::Stored(report) => return Ok(report),
                Reported::Stale => self.check_again(message.chat_id, caller, &mut rechecked, Self::MEMBERS_CHANGED)?,
            }
        }
    }

    /// ResolveReport: the chat's owner or an admin, or staff, resolves a
    /// message's open reports; returns how many.
    ///
    /// An owner's or admin's resolve whose membership check came before a
    /// departure or a loss of rights the store recorded since (a resolve
    /// on its way as RemoveMember or a demotion answered) is refused in its
    /// write ([`Resolved::Stale`]) and checked again, afresh, once, as an
    /// edit is ([`Messages::edit`]): a demoted admin is then refused
    /// (PERMISSION_DENIED); ABORTED if the members changed again meanwhile.
    /// Staff are no members: theirs compares nothing.
    pub async fn resolve_reports(&self, caller: UserId, message_id: MessageId) -> Result<u64, MessagesError> {
        self.moderation_rate.check(&caller)?;
        let message = self.store.message(message_id).await?.ok_or(MessagesError::MessageNotFound)?;
        // Whether the membership check below is one made after the store
        // found the last one older than a departure (Resolved::Stale).
        let mut rechecked = false;
        loop {
            let members_version = if self.staff.contains(&caller) {
                None
            } else {
                let membership = self.member(message.chat_id, caller).await?;
                if !natter_links::manages(&membership) {
                    return Err(MessagesError::Denied("only the chat's owner, an admin or staff may resolve reports"));
                }
                Some(membership.members_version)
            };
            let now = now_micros();
            match self.store.resolve_reports(message_id, message.chat_id, caller, now, members_version).await? {
                Resolved::Done(resolved) => return Ok(resolved),
                Resolved::Stale => self.check_again(message.chat_id, caller, &mut rechecked, Self::MEMBERS_CHANGED)?,
            }
        }
    }

    /// ListFlaggedMessages: flagged or reported messages that `filter`
    /// admits of the chats `caller` manages (staff: of every chat; the
    /// filter's own chats are replaced), newest first, after `from`.
    pub async fn flagged(
        &self,
        caller: UserId,
        mut filter: QueueFilter,
        from: Option<QueueCursor>,
        limit: u32,
    ) -> Result<Vec<(Message, Vec<StoredReport>)>, MessagesError> {
        filter.chats = if self.staff.contains(&caller) {
            None
        } else {
            Some(chat_ids(self.chats.managed_chat_ids(&caller.to_string()).await?))
        };
        let (mut messages, reports): (Vec<Message>, Vec<Vec<StoredReport>>) =
            self.store.flagged(&filter, from, limit).await?.into_iter().unzip();
        with_reactions(self.store.as_ref(), &mut messages, Some(caller)).await?;
        Ok(messages.into_iter().zip(reports).collect())
    }

    /// SearchMessages: a page of the messages of the caller's chats (or of
    /// the one chat asked for, of which the caller must be a member) that
    /// match the query, each with its snippet, flags as GetMessage shows
    /// them and reactions; with the cursor of the next page while there
    /// are more. The chats are the caller's now (the chats service's
    /// membership), so a chat left is never searched.
    ///
    /// Errors: RESOURCE_EXHAUSTED (--search-rate), NOT_FOUND /
    /// PERMISSION_DENIED for `chat_id` as [`Messages::member`].
    #[tracing::instrument(skip_all, fields(relevance = req.relevance))]
    pub async fn search(
        &self,
        caller: UserId,
        req: SearchMessages,
    ) -> Result<(Vec<Found>, Option<SearchCursor>), MessagesError> {
        self.search_rate.check(&caller)?;
        let mut sights = HashMap::new();
        let chats: Vec<ChatId> = match req.chat_id {
            Some(chat) => {
                sights.insert(chat, Sight::of(&self.member(chat, caller).await?));
                vec![chat]
            }
            None => chat_ids(self.chats.member_chat_ids(&caller.to_string()).await?),
        };
        if chats.is_empty() {
            return Ok((Vec::new(), None));
        }
        let filter = SearchFilter { query: &req.query, chats: &chats, relevance: req.relevance };
        let page = self.store.search(&filter, req.from, req.page_size + 1).await?;
        if page.too_broad {
            return Err(MessagesError::Precondition(
                "the query matches over 50,000 messages, too many to rank by relevance: add a word, or order newest first",
            ));
        }
        let mut hits = page.hits;
        // A page cut short by the store's share of work goes on where it
        // stopped: fewer hits than asked, and a next page. One ends before
        // its bytes pass PAGE_BYTES too, as a ListMessages page does (a
        // snippet is a few words of the text, but a word may be long).
        let weight = |h: &crate::store::SearchHit| h.message.weight() + h.message.text.len();
        let fit = fitting(&hits, weight).0.min(req.page_size as usize);
        let next = if hits.len() > fit {
            hits.truncate(fit);
            hits.last().map(|h| h.cursor)
        } else {
            page.scanned_to
        };
        // Another's flags are shown as the chat allows (Sight): ask only for
        // the chats of a page's flagged messages of others (cached answers).
        for h in &hits {
            let chat = h.message.chat_id;
            if h.message.flags.is_some() && h.message.author_id != caller && !sights.contains_key(&chat) {
                let membership = self.chats.check_membership(&chat.to_string(), &caller.to_string()).await?;
                sights.insert(chat, if membership.member { Sight::of(&membership) } else { Sight::default() });
            }
        }
        let mut messages: Vec<Message> = hits
            .into_iter()
            .map(|h| {
                let sight = sights.get(&h.message.chat_id).copied().unwrap_or_default();
                flags_for(h.message, caller, sight)
            })
            .collect();
        with_reactions(self.store.as_ref(), &mut messages, Some(caller)).await?;
        let found =
            messages.into_iter().map(|message| Found { snippet: req.query.snippet(&message.text), message }).collect();
        Ok((found, next))
    }

    /// Internal: where a bot's stream resumes each of its chats: its read
    /// position (it moves it past each message it has taken).
    pub async fn read_positions(&self, user: UserId) -> Result<HashMap<Uuid, Resume>, MessagesError> {
        let chats = chat_ids(self.chats.member_chat_ids(&user.to_string()).await?);
        let positions = self.store.read_positions(user, &chats).await?;
        Ok(chats.into_iter().zip(positions).map(|(chat, seq)| (chat.0, Resume::Seq(seq))).collect())
    }

    /// Internal: starts an assistant's reply (see
    /// [`MessageStore::start_reply`]), announces it (and the reply it
    /// superseded) and records the chat's activity. Returns the reply and
    /// whether this call created it: also true for a retry of the start
    /// that created it ([`Started::Resumed`], same owner, still
    /// GENERATING), which has the chat's streams re-read the store (the
    /// start it retries lost its answer, perhaps cancelled before it
    /// announced the reply).
    ///
    /// Errors: NOT_FOUND (no such prompt in the chat), FAILED_PRECONDITION
    /// (the prompt is deleted), FAILED_PRECONDITION
    /// (the replaced message is no reply of the chat), ALREADY_EXISTS (the
    /// id is another message's), [`MessagesError::MembersChanged`] (the
    /// chat's members changed after the caller's checks,
    /// [`NewReply::members_version`]: nothing written), FAILED_PRECONDITION
    /// (an archived chat, [`Messages::ARCHIVED`]), PERMISSION_DENIED (a
    /// direct chat closed by a block, [`Messages::BLOCKED`]).
    pub async fn start_reply(&self, reply: NewReply) -> Result<(Message, bool), MessagesError> {
        let (chat, author) = (reply.chat_id, reply.author_id);
        match self.store.start_reply(&reply).await? {
            Started::Created(message, superseded) => {
                let event = grpc::created_event(grpc::message_pb(message.clone(), Vec::new()));
                self.bus.publish(Topic::Chat(chat.0), Arc::new(BusEvent::new(chat, event)));
                if let Some(mut old) = superseded {
                    let unannounced = Unannounced::new(&self.bus, chat);
                    with_reactions(self.store.as_ref(), std::slice::from_mut(&mut old), None).await?;
                    let event = grpc::edited_event(old);
                    self.bus.publish(Topic::Chat(chat.0), Arc::new(BusEvent::new(chat, event)));
                    unannounced.announced();
                }
                let created = Sent::Created(message.clone());
                crate::writer::record_activity(self.chats.as_ref(), &[&created]).await;
                Ok((message, true))
            }
            Started::Resumed(message) if message.chat_id == chat && message.author_id == author => {
                resync(self.bus.as_ref(), chat);
                Ok((message, true))
            }
            Started::Exists(message) if message.chat_id == chat && message.author_id == author => Ok((message, false)),
            Started::Resumed(_) | Started::Exists(_) => Err(MessagesError::MessageIdTaken),
            Started::NoSuchPrompt => Err(MessagesError::MessageNotFound),
            Started::PromptDeleted => Err(MessagesError::Precondition("prompt is deleted")),
            Started::NotAReply => Err(MessagesError::Precondition("the replaced message is no reply of this chat")),
            Started::Busy(_) => Err(MessagesError::Aborted("another reply of this chat is being generated")),
            // A departure (the assistant's own, the prompt author's, any
            // member's), a loss of rights or the chat's purge recorded after
            // the caller's checks: the caller checks again (it made them).
            Started::Stale => Err(MessagesError::MembersChanged(Self::REPLY_MEMBERS_CHANGED)),
            Started::Archived => Err(MessagesError::Precondition(Self::ARCHIVED)),
            Started::Closed => Err(MessagesError::Denied(Self::BLOCKED)),
        }
    }

    /// Internal: publishes pieces of a reply being generated to its chat's
    /// streams (not its author's) and, with `checkpoint`, stores the text so
    /// far; answers whether a stop was asked for, or, at a checkpoint,
    /// whether the reply's author may no longer write in the chat
    /// (the reply's author removed or left, the chat deleted, or a
    /// direct chat closed by a block), whose stop flag is then set as
    /// [`Messages::stop_reply`] sets it. So a reply whose assistant is
    /// taken out of the chat while it is written ends STOPPED at its next
    /// checkpoint (about a second), whichever replica generates it and
    /// whether or not that replica heard of the removal; the assistant
    /// that hears it stops at once.
    ///
    /// Errors: FAILED_PRECONDITION when a checkpoint finds the reply no
    /// longer GENERATING.
    pub async fn update_reply(
        &self,
        chat: ChatId,
        id: MessageId,
        author: UserId,
        deltas: Vec<natter_proto::messages::v1::MessageDelta>,
        checkpoint: Option<String>,
    ) -> Result<bool, MessagesError> {
        for delta in deltas {
            let event = BusEvent::new(chat, grpc::delta_event(chat, delta)).concerning(author);
            self.bus.publish(Topic::Chat(chat.0), Arc::new(event));
        }
        let Some(text) = checkpoint else { return Ok(false) };
        let stop = self
            .checkpoints
            .checkpoint(crate::store::Checkpoint { id, text: Some(text) })
            .await?
            .ok_or(MessagesError::Precondition("the reply is no longer generating"))?;
        if stop {
            return Ok(true);
        }
        if self.author_gone(chat, author).await {
            tracing::info!(chat_id = %chat, reply = %id, "a reply's author is no longer a member of its chat: stopping it");
            self.store.stop_reply(id).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Whether `author` may no longer write in `chat`
    /// ([`Messages::check_author`] says [`AuthorCheck::Gone`]).
    async fn author_gone(&self, chat: ChatId, author: UserId) -> bool {
        self.check_author(chat, author).await == AuthorCheck::Gone
    }

    /// Whether `author` may still write in `chat`, by the same kept
    /// CheckMembership a send reads (any change of the chat drops it): no
    /// member of it (or the chat deleted), or the chat is a direct chat
    /// closed by a block, is [`AuthorCheck::Gone`]. A check that fails (the
    /// chats service out of reach) is [`AuthorCheck::Unknown`]: the reply
    /// goes on, and the next checkpoint asks again.
    async fn check_author(&self, chat: ChatId, author: UserId) -> AuthorCheck {
        match self.chats.check_membership(&chat.to_string(), &author.to_string()).await {
            Ok(m) if !m.chat_exists || !m.member || m.blocked => AuthorCheck::Gone,
            Ok(m) => AuthorCheck::May(m.members_version),
            Err(status) => {
                tracing::debug!(chat_id = %chat, error = %status.message(), "cannot check a reply's author");
                AuthorCheck::Unknown
            }
        }
    }

    /// Internal: finishes a reply (see [`MessageStore::finish_reply`]) and
    /// announces the change (and the reply it un-superseded).
    ///
    /// A COMPLETE finish of a reply still GENERATING whose author may no
    /// longer write in its chat (the assistant removed or gone, the chat
    /// deleted, a direct chat closed by a block: the check
    /// [`Messages::update_reply`] makes at a checkpoint, of the chat and
    /// author the stored reply names) is stored STOPPED instead, with the
    /// text and info sent: the model's name, finish_reason and token counts
    /// as the server reported them, and no error (STOPPED is no failure).
    /// That is how the reply would have ended had its generation reached
    /// one more checkpoint first, and how StopGeneration ends one (the
    /// text so far, the info gathered by then); its stop flag is not set
    /// (the reply is finished: nothing reads it any more). So a reply that
    /// finishes between the removal and its next checkpoint, on a replica
    /// that did not hear of the removal, does not end as if answered to a
    /// chat the assistant is no member of.
    ///
    /// The check's members version goes with the write
    /// ([`Finish::members_version`]): a removal recorded after the check
    /// and before the write (a finish on its way as RemoveMember answered)
    /// refuses the write, and the author is checked again, afresh, once,
    /// as a send's is; a block recorded meanwhile stores it STOPPED. FAILED
    /// and INTERRUPTED finishes are stored as sent: they end no answer.
    ///
    /// Errors: NOT_FOUND (no such message); ABORTED when the chat's
    /// members changed again after the second check (the caller finishes
    /// again).
    pub async fn finish_reply(&self, id: MessageId, finish: &Finish) -> Result<Message, MessagesError> {
        // Whether the check below is one made after the store found the
        // last one older than a departure (Finishing::Stale).
        let mut rechecked = false;
        let finished = loop {
            let mut finish = finish.clone();
            let checked = self.check_finish(id, &mut finish).await?;
            match self.store.finish_reply(id, &finish).await? {
                Finishing::Done(finished) => break finished,
                Finishing::NotFound => return Err(MessagesError::MessageNotFound),
                Finishing::Stale => {
                    let (chat, author) = checked.expect("only a finish checked at a members version is stale");
                    self.check_again(chat, author, &mut rechecked, Self::REPLY_MEMBERS_CHANGED)?;
                }
            }
        };
        if finished.changed {
            let chat = finished.reply.chat_id;
            let unannounced = Unannounced::new(&self.bus, chat);
            let mut changed: Vec<Message> = std::iter::once(finished.reply.clone()).chain(finished.restored).collect();
            with_reactions(self.store.as_ref(), &mut changed, None).await?;
            for message in changed {
                let event = grpc::edited_event(message);
                self.bus.publish(Topic::Chat(chat.0), Arc::new(BusEvent::new(chat, event)));
            }
            unannounced.announced();
        }
        Ok(finished.reply)
    }

    /// Checks the author of reply `id` for a COMPLETE `finish` of it while
    /// it is GENERATING ([`Messages::check_author`]): one who may no longer
    /// write makes it STOPPED; one who may sets the version the check saw
    /// ([`Finish::members_version`]) and is returned with the reply's chat.
    /// Nothing is checked for another status, no such message (the finish
    /// answers NOT_FOUND) or a finished one (it answers it as it is).
    async fn check_finish(
        &self,
        id: MessageId,
        finish: &mut Finish,
    ) -> Result<Option<(ChatId, UserId)>, MessagesError> {
        if finish.status != Generation::Complete {
            return Ok(None);
        }
        let Some(reply) = self.store.message(id).await? else { return Ok(None) };
        if reply.reply.as_ref().is_none_or(|r| r.generation != Generation::Generating) {
            return Ok(None);
        }
        match self.check_author(reply.chat_id, reply.author_id).await {
            AuthorCheck::Gone => {
                tracing::info!(reply = %id, "a reply finished after its author was taken out of its chat: stopped");
                finish.status = Generation::Stopped;
                Ok(None)
            }
            AuthorCheck::May(version) => {
                finish.members_version = Some(version);
                Ok(Some((reply.chat_id, reply.author_id)))
            }
            AuthorCheck::Unknown => Ok(None),
        }
    }

    /// Internal: asks a GENERATING reply to stop (a durable flag the
    /// generator reads at its next checkpoint); returns the message.
    pub async fn stop_reply(&self, id: MessageId) -> Result<Message, MessagesError> {
        self.store.stop_reply(id).await?.ok_or(MessagesError::MessageNotFound)
    }

    /// Internal: GENERATING replies whose last checkpoint is before
    /// `before` (µs), oldest first.
    pub async fn stale_replies(&self, before: i64, limit: u32) -> Result<Vec<Message>, MessagesError> {
        Ok(self.store.stale_replies(before, limit).await?)
    }
}

/// Most store reads one ListReadPositions call makes to fill its page
/// past positions it may not list (users who left, private read receipts):
/// each read is one indexed range of the chat's positions and one
/// membership call.
pub const READ_POSITION_ROUNDS: usize = 4;

/// Tells the streams of `chat` to re-read the store (a resync hint): for a
/// change committed that nobody announced, so that it is not left for the
/// chat's next one to reveal.
fn resync(bus: &dyn EventBus, chat: ChatId) {
    bus.publish(Topic::Chat(chat.0), Arc::new(BusEvent::hint(chat)));
}

/// A change of a chat committed but not announced yet: dropped before
/// [`Unannounced::announced`] (the request was cancelled, or failed after
/// its commit), it [resyncs](resync) the chat's streams.
struct Unannounced<'a> {
    bus: &'a Arc<dyn EventBus>,
    chat: Option<ChatId>,
}

impl<'a> Unannounced<'a> {
    fn new(bus: &'a Arc<dyn EventBus>, chat: ChatId) -> Self {
        Self { bus, chat: Some(chat) }
    }

    /// The change was announced: nothing more to do.
    fn announced(mut self) {
        self.chat = None;
    }
}

impl Drop for Unannounced<'_> {
    fn drop(&mut self) {
        if let Some(chat) = self.chat.take() {
            resync(self.bus.as_ref(), chat);
        }
    }
}

/// Fills the reactions of `messages` (tombstones have none) as `viewer`
/// sees them (None: counts only, for an event on the bus), in one store
/// read.
pub(crate) async fn with_reactions(
    store: &dyn MessageStore,
    messages: &mut [Message],
    viewer: Option<UserId>,
) -> Result<(), StoreError> {
    let ids: Vec<MessageId> = messages.iter().filter(|m| m.reaction_rows > 0 && !m.deleted()).map(|m| m.id).collect();
    if ids.is_empty() {
        return Ok(());
    }
    let mut found = store.reactions(&ids, viewer).await?;
    for message in messages {
        message.reactions = found.remove(&message.id).unwrap_or_default();
    }
    Ok(())
}

/// The chat ids the chats service answered, as ids (it answers only
/// well-formed ones).
fn chat_ids(ids: Vec<String>) -> Vec<ChatId> {
    ids.iter().filter_map(|c| Uuid::try_parse(c).ok().map(ChatId)).collect()
}

/// `message` with its reactions' counts only (no viewer's own), as events
/// go on the bus.
fn counts_only(mut message: Message) -> Message {
    for reaction in &mut message.reactions {
        reaction.mine = false;
    }
    message
}

/// `message` as `viewer` may see it: its injection flags only for its
/// author and as `sight` allows.
pub(crate) fn flags_for(mut message: Message, viewer: UserId, sight: Sight) -> Message {
    if !sight.sees(message.author_id == viewer, message.role() == crate::store::Role::Assistant) {
        message.flags = None;
    }
    message
}

/// Refuses a send whose `mentions` (each with its index in the request)
/// name anyone who is not a member of the chat, by `members` (the chats
/// service's answer for each, in order; a missing answer is no member):
/// INVALID_ARGUMENT naming each such `mention_user_ids[i]`.
fn mentions_of_members(mentions: &[crate::domain::Mention], members: &[bool]) -> Result<(), MessagesError> {
    let mut violations = natter_kit::FieldViolations::new();
    for (n, (i, _)) in mentions.iter().enumerate() {
        if !members.get(n).copied().unwrap_or(false) {
            violations.add(format!("mention_user_ids[{i}]"), "is not a member of this chat");
        }
    }
    if violations.is_empty() { Ok(()) } else { Err(MessagesError::Invalid(violations)) }
}

/// Why a reaction or a pin (`adds`), or taking one back, is refused now:
/// the chat is archived, or (to add one) a direct chat closed by a block.
fn refusal(membership: &cpb::CheckMembershipResponse, adds: bool) -> Option<MessagesError> {
    if membership.archived {
        Some(MessagesError::Precondition(Messages::ARCHIVED))
    } else if membership.blocked && adds {
        Some(MessagesError::Denied(Messages::BLOCKED))
    } else {
        None
    }
}

/// The answer to a retried send: the original message if it is the caller's
/// in the same chat, else ALREADY_EXISTS.
fn same_message(existing: Message, req: &SendMessage, caller: UserId) -> Result<Message, MessagesError> {
    if existing.chat_id == req.chat_id && existing.author_id == caller {
        Ok(existing)
    } else {
        Err(MessagesError::MessageIdTaken)
    }
}

/// What a message's text and attachments add to the store, in bytes, as
/// `--stored-bytes-rate` counts it: the text, and each attachment's URL and
/// MIME type (its other fields are numbers).
fn stored_bytes(text: &str, attachments: &[crate::domain::Attachment]) -> u64 {
    let attached: usize = attachments.iter().map(|a| a.url.len() + a.mime_type.len()).sum();
    (text.len() + attached) as u64
}

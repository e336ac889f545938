//! Calls between natter services, each behind a small trait with two
//! implementations: a tonic client (split mode, one process per service) and
//! a direct call into the other service's internal API (the all-in-one).
//!
//! Both implementations run the same code on the serving side: the in-process
//! one calls the very `*InternalService` trait method that the gRPC server
//! exposes, minus the network. The messages are the generated protobuf types,
//! so nothing is converted twice.

use std::sync::Arc;

use async_trait::async_trait;
use natter_kit::cache::{Invalidator, Lookup, Tag, TaggedCache};
use natter_kit::in_process;
use natter_proto::chats::v1 as chats;
use natter_proto::messages::v1 as messages;
use natter_proto::sessions::v1 as sessions;
use tonic::{Request, Status};

use chats::chat_internal_service_client::ChatInternalServiceClient;
use chats::chat_internal_service_server::ChatInternalService;
use messages::message_internal_service_client::MessageInternalServiceClient;
use messages::message_internal_service_server::MessageInternalService;
use sessions::session_internal_service_client::SessionInternalServiceClient;
use sessions::session_internal_service_server::SessionInternalService;

/// The contract between the chats store's in-memory activity (SQLite) and
/// the messages service's re-announcement of it after a crash, as checked
/// constants rather than a comment.
///
/// On SQLite the chats store keeps each chat's newest activity in memory
/// and writes it at least every flush interval; a crash loses what it
/// still held. At start-up the messages service re-announces the newest
/// message of every chat sent within [`activity::REANNOUNCE_WINDOW`] before its
/// newest message. Nothing is lost for longer than a restart as long as
/// that window covers one flush interval plus the time from a message's
/// send time to its activity reaching the buffer ([`activity::RECORD_SLACK`]): the
/// `const` assertions below hold that, and the chats service refuses a
/// flush interval above [`activity::MAX_FLUSH_INTERVAL`] ([`activity::check_flush_interval`]).
pub mod activity {
    use std::time::Duration;

    /// How far back from its newest message the messages service
    /// re-announces chat activity at start-up.
    pub const REANNOUNCE_WINDOW: Duration = Duration::from_secs(10);

    /// [`REANNOUNCE_WINDOW`] in µs, the unit of stored send times.
    pub const REANNOUNCE_WINDOW_US: i64 = REANNOUNCE_WINDOW.as_micros() as i64;

    /// Most time from a message's send time (set before its commit) to its
    /// activity reaching the chats store's buffer: the writer's queue and
    /// group commit, then the in-process call.
    pub const RECORD_SLACK: Duration = Duration::from_secs(2);

    /// Longest flush interval of the chats store's activity buffer:
    /// [`REANNOUNCE_WINDOW`] less [`RECORD_SLACK`].
    pub const MAX_FLUSH_INTERVAL: Duration = Duration::from_secs(8);

    /// Default flush interval of the chats store's activity buffer.
    pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(50);

    const _: () = assert!(
        MAX_FLUSH_INTERVAL.as_nanos() + RECORD_SLACK.as_nanos() <= REANNOUNCE_WINDOW.as_nanos(),
        "the re-announce window must cover the longest flush interval plus the record slack"
    );
    const _: () = assert!(DEFAULT_FLUSH_INTERVAL.as_nanos() <= MAX_FLUSH_INTERVAL.as_nanos());
    const _: () = assert!(REANNOUNCE_WINDOW_US as u128 == REANNOUNCE_WINDOW.as_micros());

    /// Checks a flush interval: above zero and at most
    /// [`MAX_FLUSH_INTERVAL`].
    ///
    /// Errors: a description of the rule broken, for a flag's error message.
    pub fn check_flush_interval(interval: Duration) -> Result<(), String> {
        if interval.is_zero() {
            return Err("must be more than 0".into());
        }
        if interval > MAX_FLUSH_INTERVAL {
            return Err(format!(
                "must be at most {MAX_FLUSH_INTERVAL:?}: the messages service re-announces only {REANNOUNCE_WINDOW:?} \
                 of chat activity after a crash"
            ));
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn flush_intervals_are_bounded_by_the_window() {
            assert!(check_flush_interval(DEFAULT_FLUSH_INTERVAL).is_ok());
            assert!(check_flush_interval(MAX_FLUSH_INTERVAL).is_ok());
            assert!(check_flush_interval(Duration::ZERO).is_err());
            let refused = check_flush_interval(MAX_FLUSH_INTERVAL + Duration::from_millis(1)).unwrap_err();
            assert!(refused.contains("at most 8s"), "{refused}");
        }
    }
}

/// True for a group chat's owner and admins (by a CheckMembership answer);
/// a direct chat's two members are equals, and neither manages it.
pub fn manages(membership: &chats::CheckMembershipResponse) -> bool {
    membership.kind != chats::ChatKind::Direct as i32
        && (membership.role == chats::MemberRole::Owner as i32 || membership.role == chats::MemberRole::Admin as i32)
}

/// What a viewer may see of the injection flags of others' messages in one
/// chat.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sight {
    /// The chat's owner or an admin: every message's flags.
    pub manager: bool,
    /// A direct chat: the flags of the assistant's replies. A direct chat
    /// with the assistant (an assistant chat) has its person as the only
    /// other member, who has no owner above them to see a reply flagged,
    /// say, for leaking the system prompt.
    pub direct: bool,
}

impl Sight {
    /// By a CheckMembership answer.
    pub fn of(membership: &chats::CheckMembershipResponse) -> Self {
        Self { manager: manages(membership), direct: membership.kind == chats::ChatKind::Direct as i32 }
    }

    /// Whether the viewer sees the flags of a message, by whether the viewer
    /// wrote it and whether it is an assistant's reply (role ASSISTANT).
    pub fn sees(self, own: bool, assistant_reply: bool) -> bool {
        own || self.manager || (self.direct && assistant_reply)
    }
}

/// What the messages service asks the chats service.
#[async_trait]
pub trait ChatDirectory: Send + Sync + 'static {
    /// CheckMembership: the membership of the request's user in its chat,
    /// the chat's state, and whether each of its `other_user_ids` is a
    /// member (`other_members`, in order: a message's mentions).
    async fn check_memberships(
        &self,
        request: chats::CheckMembershipRequest,
    ) -> Result<chats::CheckMembershipResponse, Status>;
    /// Membership of `user_id` in `chat_id`, and the chat's state.
    async fn check_membership(&self, chat_id: &str, user_id: &str) -> Result<chats::CheckMembershipResponse, Status> {
        let request = chats::CheckMembershipRequest {
            chat_id: chat_id.to_owned(),
            user_id: user_id.to_owned(),
            ..Default::default()
        };
        self.check_memberships(request).await
    }
    /// Drops whatever is kept of `user_id`'s membership of `chat_id` (a
    /// write found it older than a departure recorded since), so the next
    /// check asks the chats service. The default keeps nothing.
    fn forget_membership(&self, chat_id: &str, user_id: &str) {
        let _ = (chat_id, user_id);
    }
    /// Every chat `user_id` is a member of.
    async fn member_chat_ids(&self, user_id: &str) -> Result<Vec<String>, Status>;
    /// Every chat `user_id` owns or administers.
    async fn managed_chat_ids(&self, user_id: &str) -> Result<Vec<String>, Status>;
    /// ListMemberChatIds with `with_blocks`: every chat `user_id` is a
    /// member of (`chat_ids`), and the users who share a chat with it and
    /// whom it blocked or who blocked it (`blocked_peer_user_ids`), in one
    /// call: where presence tells a change of the user's, and whom it must
    /// not reach. The default lists the chats and no blocks, for
    /// directories that keep none (test stand-ins); so does a chats service
    /// of a release before it.
    async fn member_chats_and_blocks(&self, user_id: &str) -> Result<chats::ListMemberChatIdsResponse, Status> {
        Ok(chats::ListMemberChatIdsResponse { chat_ids: self.member_chat_ids(user_id).await?, ..Default::default() })
    }
    /// FilterPeers: which of `candidates` (at most 1,000) are members now of
    /// a chat `user_id` is a member of now, with no block either way between
    /// them and `user_id` (presence's peers), each once, in no set order.
    /// The default asks for each one's chats ([`peers_by_listing`]), for
    /// directories without the call.
    async fn peers_among(&self, user_id: &str, candidates: Vec<String>) -> Result<Vec<String>, Status> {
        peers_by_listing(self, user_id, candidates).await
    }
    /// Records the newest message of chats (for ordering by activity).
    async fn record_activity(&self, activities: Vec<chats::Activity>) -> Result<(), Status>;
    /// UntitleChat: takes back the title made from the prompt
    /// `source_message_id` of `chat_id` (deleted); whether it changed
    /// anything. The default, for directories that keep no titles (test
    /// stand-ins), changes nothing.
    async fn untitle_chat(&self, chat_id: &str, source_message_id: &str) -> Result<bool, Status> {
        let _ = (chat_id, source_message_id);
        Ok(false)
    }
}

/// [`ChatDirectory::peers_among`] by a listing of `user_id`'s chats and one
/// of each candidate's, a few at a time: what a chats service without
/// FilterPeers (a replica of an earlier release) can answer. It knows no
/// blocks: a candidate with a block either way with `user_id` passes.
pub async fn peers_by_listing<D: ChatDirectory + ?Sized>(
    directory: &D,
    user_id: &str,
    candidates: Vec<String>,
) -> Result<Vec<String>, Status> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let mine: std::collections::HashSet<String> = directory.member_chat_ids(user_id).await?.into_iter().collect();
    let candidates: std::collections::HashSet<String> = candidates.into_iter().collect();
    futures::stream::iter(candidates)
        .map(|user| {
            let mine = &mine;
            async move {
                let theirs = directory.member_chat_ids(&user).await?;
                Ok::<_, Status>(theirs.iter().any(|c| mine.contains(c)).then_some(user))
            }
        })
        .buffer_unordered(8)
        .try_filter_map(|peer| async move { Ok(peer) })
        .try_collect()
        .await
}

/// A [`ChatDirectory`] whose membership answers a replica keeps in memory
/// (see [`natter_kit::cache`]): each is tagged with its chat, so any change
/// the chats service commits to the chat ([`Tag::Chat`]) drops it on every
/// replica. Only answers about an existing chat and without
/// `other_user_ids` (a message's mentions) are kept, by chat, user and
/// whether `read_receipts` was asked; one with `read_receipts` is also
/// tagged with its user ([`Tag::User`]), whose privacy settings the chats
/// service invalidates so when they change. Everything else goes to
/// `inner`.
pub struct CachingChatDirectory<D> {
    inner: D,
    cache: Arc<TaggedCache<(uuid::Uuid, uuid::Uuid, bool), chats::CheckMembershipResponse>>,
}

/// Most memberships a [`CachingChatDirectory`] keeps before it starts over.
const CACHED_MEMBERSHIPS: usize = 100_000;

impl<D: ChatDirectory> CachingChatDirectory<D> {
    /// `inner`, with its answers kept for `ttl` (zero: none) and dropped by
    /// `invalidator`.
    pub fn new(inner: D, ttl: std::time::Duration, invalidator: Arc<Invalidator>) -> Self {
        Self { inner, cache: TaggedCache::new("memberships", ttl, CACHED_MEMBERSHIPS, invalidator) }
    }
}

#[async_trait]
impl<D: ChatDirectory> ChatDirectory for CachingChatDirectory<D> {
    async fn check_memberships(
        &self,
        request: chats::CheckMembershipRequest,
    ) -> Result<chats::CheckMembershipResponse, Status> {
        let key = match (uuid::Uuid::try_parse(&request.chat_id), uuid::Uuid::try_parse(&request.user_id)) {
            (Ok(chat), Ok(user)) if request.other_user_ids.is_empty() => (chat, user, request.read_receipts),
            _ => return self.inner.check_memberships(request).await,
        };
        let ticket = match self.cache.get(&key).await {
            Lookup::Hit(answer) => return Ok(answer),
            Lookup::Miss(ticket) => Some(ticket),
            Lookup::Bypass => None,
        };
        let answer = self.inner.check_memberships(request).await?;
        if let Some(ticket) = ticket.filter(|_| answer.chat_exists) {
            let mut tags = vec![Tag::Chat(key.0)];
            if key.2 {
                tags.push(Tag::User(key.1));
            }
            self.cache.put(ticket, key, answer.clone(), tags);
        }
        Ok(answer)
    }

    fn forget_membership(&self, chat_id: &str, user_id: &str) {
        if let (Ok(chat), Ok(user)) = (uuid::Uuid::try_parse(chat_id), uuid::Uuid::try_parse(user_id)) {
            self.cache.remove(&(chat, user, false));
            self.cache.remove(&(chat, user, true));
        }
        self.inner.forget_membership(chat_id, user_id);
    }

    async fn member_chat_ids(&self, user_id: &str) -> Result<Vec<String>, Status> {
        self.inner.member_chat_ids(user_id).await
    }

    async fn managed_chat_ids(&self, user_id: &str) -> Result<Vec<String>, Status> {
        self.inner.managed_chat_ids(user_id).await
    }

    async fn member_chats_and_blocks(&self, user_id: &str) -> Result<chats::ListMemberChatIdsResponse, Status> {
        self.inner.member_chats_and_blocks(user_id).await
    }

    async fn peers_among(&self, user_id: &str, candidates: Vec<String>) -> Result<Vec<String>, Status> {
        self.inner.peers_among(user_id, candidates).await
    }

    async fn record_activity(&self, activities: Vec<chats::Activity>) -> Result<(), Status> {
        self.inner.record_activity(activities).await
    }

    async fn untitle_chat(&self, chat_id: &str, source_message_id: &str) -> Result<bool, Status> {
        self.inner.untitle_chat(chat_id, source_message_id).await
    }
}

/// What the chats service asks the messages service.
#[async_trait]
pub trait MessageDirectory: Send + Sync + 'static {
    /// Each chat's newest message and `user_id`'s unread and mention counts
    /// ("": no one's, zero), in request order.
    async fn chat_summaries(&self, chat_ids: Vec<String>, user_id: &str) -> Result<Vec<messages::ChatSummary>, Status>;
    /// A chat's newest `page_size` messages, newest first, with their
    /// reactions as `viewer_id` sees them ("": without reactions).
    async fn recent_messages(
        &self,
        chat_id: &str,
        page_size: i32,
        viewer_id: &str,
    ) -> Result<Vec<messages::Message>, Status>;
    /// Deletes every message and read position of a chat.
    async fn purge_chat(&self, chat_id: &str) -> Result<(), Status>;
    /// Deletes what the messages store keeps of deleted user `user_id`
    /// apart from its messages: its last-seen time, read positions and
    /// mention rows. Repeatable.
    async fn forget_user(&self, user_id: &str) -> Result<(), Status>;
    /// Records committed changes of a chat's membership or details in its
    /// change log, each with the chat's next change number (returned in
    /// order), and announces them to its streams; a join also resets the
    /// joiner's read position to the chat's newest message sent at or before
    /// `change_time` (when the changes were committed; None: now). A
    /// repeated call with the same non-empty `idempotency_key` records
    /// nothing again.
    async fn record_chat_changes(
        &self,
        chat_id: &str,
        changes: Vec<messages::ChatChange>,
        idempotency_key: &str,
        change_time: Option<prost_types::Timestamp>,
    ) -> Result<Vec<i64>, Status>;
}

/// What the chats service asks the sessions service.
#[async_trait]
pub trait UserDirectory: Send + Sync + 'static {
    /// The users among `user_ids` that exist.
    async fn lookup_users(&self, user_ids: Vec<String>) -> Result<Vec<sessions::User>, Status>;

    /// ListDeletedUsers: up to `page_size` users deleted after
    /// `after_position` in the sessions service's deletion log, oldest
    /// first. A directory that keeps no log (a stand-in) answers
    /// UNIMPLEMENTED.
    async fn deleted_users(&self, after_position: i64, page_size: i32) -> Result<Vec<sessions::DeletedUser>, Status> {
        let _ = (after_position, page_size);
        Err(Status::unimplemented("this directory keeps no deletion log"))
    }
}

/// Calls another service's internal listener over gRPC: each call carries
/// the caller's trace context (W3C `traceparent`, so the callee's spans join
/// the caller's trace) and the service credential, and has a deadline
/// (see [`natter_kit::Link`]).
#[derive(Clone, Debug)]
pub struct Grpc(pub natter_kit::Link);

/// Calls another service's internal API in the same process.
pub struct InProcess<S>(pub Arc<S>);

/// A ListMemberChatIdsRequest: every chat of `user_id`, or (`managed_only`)
/// those it owns or administers; `with_blocks`, with its blocked peers.
fn member_chats_request(user_id: &str, managed_only: bool, with_blocks: bool) -> chats::ListMemberChatIdsRequest {
    chats::ListMemberChatIdsRequest { user_id: user_id.to_owned(), managed_only, with_blocks }
}

impl Grpc {
    /// ListMemberChatIds.
    async fn list_member_chat_ids(
        &self,
        request: chats::ListMemberChatIdsRequest,
    ) -> Result<chats::ListMemberChatIdsResponse, Status> {
        let mut client = ChatInternalServiceClient::new(self.0.channel());
        self.0.call(client.list_member_chat_ids(self.0.request(request))).await
    }
}

impl<S: ChatInternalService> InProcess<S> {
    /// As [`Grpc::list_member_chat_ids`], in process.
    async fn list_member_chat_ids(
        &self,
        request: chats::ListMemberChatIdsRequest,
    ) -> Result<chats::ListMemberChatIdsResponse, Status> {
        Ok(in_process(
            "/natter.chats.v1.ChatInternalService/ListMemberChatIds",
            self.0.list_member_chat_ids(Request::new(request)),
        )
        .await?
        .into_inner())
    }
}

#[async_trait]
impl ChatDirectory for Grpc {
    async fn check_memberships(
        &self,
        request: chats::CheckMembershipRequest,
    ) -> Result<chats::CheckMembershipResponse, Status> {
        self.0.call(ChatInternalServiceClient::new(self.0.channel()).check_membership(self.0.request(request))).await
    }

    async fn member_chat_ids(&self, user_id: &str) -> Result<Vec<String>, Status> {
        Ok(self.list_member_chat_ids(member_chats_request(user_id, false, false)).await?.chat_ids)
    }

    async fn managed_chat_ids(&self, user_id: &str) -> Result<Vec<String>, Status> {
        Ok(self.list_member_chat_ids(member_chats_request(user_id, true, false)).await?.chat_ids)
    }

    async fn member_chats_and_blocks(&self, user_id: &str) -> Result<chats::ListMemberChatIdsResponse, Status> {
        self.list_member_chat_ids(member_chats_request(user_id, false, true)).await
    }

    async fn peers_among(&self, user_id: &str, candidates: Vec<String>) -> Result<Vec<String>, Status> {
        let request = chats::FilterPeersRequest { user_id: user_id.to_owned(), candidate_user_ids: candidates };
        let mut client = ChatInternalServiceClient::new(self.0.channel());
        match self.0.call(client.filter_peers(self.0.request(request.clone()))).await {
            Ok(answer) => Ok(answer.peer_user_ids),
            // A chats replica of an earlier release, mid-upgrade.
            Err(e) if e.code() == tonic::Code::Unimplemented => {
                peers_by_listing(self, user_id, request.candidate_user_ids).await
            }
            Err(e) => Err(e),
        }
    }

    async fn record_activity(&self, activities: Vec<chats::Activity>) -> Result<(), Status> {
        let request = chats::RecordActivityRequest { activities };
        self.0.call(ChatInternalServiceClient::new(self.0.channel()).record_activity(self.0.request(request))).await?;
        Ok(())
    }

    async fn untitle_chat(&self, chat_id: &str, source_message_id: &str) -> Result<bool, Status> {
        let request = untitle_request(chat_id, source_message_id);
        let mut client = ChatInternalServiceClient::new(self.0.channel());
        Ok(self.0.call(client.untitle_chat(self.0.request(request))).await?.changed)
    }
}

/// An UntitleChatRequest.
fn untitle_request(chat_id: &str, source_message_id: &str) -> chats::UntitleChatRequest {
    chats::UntitleChatRequest { chat_id: chat_id.to_owned(), source_message_id: source_message_id.to_owned() }
}

/// A TitleChatRequest.
fn title_request(chat_id: &str, title: &str, source_message_id: &str) -> chats::TitleChatRequest {
    chats::TitleChatRequest {
        chat_id: chat_id.to_owned(),
        title: title.to_owned(),
        source_message_id: source_message_id.to_owned(),
    }
}

#[async_trait]
impl<S: ChatInternalService> ChatDirectory for InProcess<S> {
    async fn check_memberships(
        &self,
        request: chats::CheckMembershipRequest,
    ) -> Result<chats::CheckMembershipResponse, Status> {
        Ok(in_process(
            "/natter.chats.v1.ChatInternalService/CheckMembership",
            self.0.check_membership(Request::new(request)),
        )
        .await?
        .into_inner())
    }

    async fn member_chat_ids(&self, user_id: &str) -> Result<Vec<String>, Status> {
        Ok(self.list_member_chat_ids(member_chats_request(user_id, false, false)).await?.chat_ids)
    }

    async fn managed_chat_ids(&self, user_id: &str) -> Result<Vec<String>, Status> {
        Ok(self.list_member_chat_ids(member_chats_request(user_id, true, false)).await?.chat_ids)
    }

    async fn member_chats_and_blocks(&self, user_id: &str) -> Result<chats::ListMemberChatIdsResponse, Status> {
        self.list_member_chat_ids(member_chats_request(user_id, false, true)).await
    }

    async fn peers_among(&self, user_id: &str, candidates: Vec<String>) -> Result<Vec<String>, Status> {
        let request = chats::FilterPeersRequest { user_id: user_id.to_owned(), candidate_user_ids: candidates };
        Ok(in_process("/natter.chats.v1.ChatInternalService/FilterPeers", self.0.filter_peers(Request::new(request)))
            .await?
            .into_inner()
            .peer_user_ids)
    }

    async fn record_activity(&self, activities: Vec<chats::Activity>) -> Result<(), Status> {
        let request = chats::RecordActivityRequest { activities };
        in_process(
            "/natter.chats.v1.ChatInternalService/RecordActivity",
            self.0.record_activity(Request::new(request)),
        )
        .await?;
        Ok(())
    }

    async fn untitle_chat(&self, chat_id: &str, source_message_id: &str) -> Result<bool, Status> {
        let request = untitle_request(chat_id, source_message_id);
        Ok(in_process("/natter.chats.v1.ChatInternalService/UntitleChat", self.0.untitle_chat(Request::new(request)))
            .await?
            .into_inner()
            .changed)
    }
}

#[async_trait]
impl MessageDirectory for Grpc {
    async fn chat_summaries(&self, chat_ids: Vec<String>, user_id: &str) -> Result<Vec<messages::ChatSummary>, Status> {
        let request = messages::GetChatSummariesRequest { chat_ids, user_id: user_id.to_owned() };
        Ok(self
            .0
            .call(MessageInternalServiceClient::new(self.0.channel()).get_chat_summaries(self.0.request(request)))
            .await?
            .summaries)
    }

    async fn recent_messages(
        &self,
        chat_id: &str,
        page_size: i32,
        viewer_id: &str,
    ) -> Result<Vec<messages::Message>, Status> {
        self.list_recent(recent_request(chat_id, page_size, viewer_id, 0)).await
    }

    async fn purge_chat(&self, chat_id: &str) -> Result<(), Status> {
        let request = messages::PurgeChatRequest { chat_id: chat_id.to_owned() };
        self.0.call(MessageInternalServiceClient::new(self.0.channel()).purge_chat(self.0.request(request))).await?;
        Ok(())
    }

    async fn forget_user(&self, user_id: &str) -> Result<(), Status> {
        let request = messages::ForgetUserRequest { user_id: user_id.to_owned() };
        self.0.call(MessageInternalServiceClient::new(self.0.channel()).forget_user(self.0.request(request))).await?;
        Ok(())
    }

    async fn record_chat_changes(
        &self,
        chat_id: &str,
        changes: Vec<messages::ChatChange>,
        idempotency_key: &str,
        change_time: Option<prost_types::Timestamp>,
    ) -> Result<Vec<i64>, Status> {
        let request = messages::RecordChatChangesRequest {
            chat_id: chat_id.to_owned(),
            changes,
            idempotency_key: idempotency_key.to_owned(),
            change_time,
        };
        let response = self
            .0
            .call(MessageInternalServiceClient::new(self.0.channel()).record_chat_changes(self.0.request(request)))
            .await?;
        Ok(response.change_seqs)
    }
}

impl Grpc {
    /// ListRecentMessages.
    async fn list_recent(
        &self,
        request: messages::ListRecentMessagesRequest,
    ) -> Result<Vec<messages::Message>, Status> {
        Ok(self
            .0
            .call(MessageInternalServiceClient::new(self.0.channel()).list_recent_messages(self.0.request(request)))
            .await?
            .messages)
    }
}

impl<S: MessageInternalService> InProcess<S> {
    /// ListRecentMessages.
    async fn list_recent(
        &self,
        request: messages::ListRecentMessagesRequest,
    ) -> Result<Vec<messages::Message>, Status> {
        Ok(in_process(
            "/natter.messages.v1.MessageInternalService/ListRecentMessages",
            self.0.list_recent_messages(Request::new(request)),
        )
        .await?
        .into_inner()
        .messages)
    }
}

/// ListRecentMessages' request, over gRPC or in process alike.
fn recent_request(
    chat_id: &str,
    page_size: i32,
    viewer_id: &str,
    before_seq: i64,
) -> messages::ListRecentMessagesRequest {
    messages::ListRecentMessagesRequest {
        chat_id: chat_id.to_owned(),
        page_size,
        viewer_id: viewer_id.to_owned(),
        before_seq,
    }
}

#[async_trait]
impl<S: MessageInternalService> MessageDirectory for InProcess<S> {
    async fn chat_summaries(&self, chat_ids: Vec<String>, user_id: &str) -> Result<Vec<messages::ChatSummary>, Status> {
        let request = messages::GetChatSummariesRequest { chat_ids, user_id: user_id.to_owned() };
        Ok(in_process(
            "/natter.messages.v1.MessageInternalService/GetChatSummaries",
            self.0.get_chat_summaries(Request::new(request)),
        )
        .await?
        .into_inner()
        .summaries)
    }

    async fn recent_messages(
        &self,
        chat_id: &str,
        page_size: i32,
        viewer_id: &str,
    ) -> Result<Vec<messages::Message>, Status> {
        self.list_recent(recent_request(chat_id, page_size, viewer_id, 0)).await
    }

    async fn purge_chat(&self, chat_id: &str) -> Result<(), Status> {
        let request = messages::PurgeChatRequest { chat_id: chat_id.to_owned() };
        in_process("/natter.messages.v1.MessageInternalService/PurgeChat", self.0.purge_chat(Request::new(request)))
            .await?;
        Ok(())
    }

    async fn forget_user(&self, user_id: &str) -> Result<(), Status> {
        let request = messages::ForgetUserRequest { user_id: user_id.to_owned() };
        in_process("/natter.messages.v1.MessageInternalService/ForgetUser", self.0.forget_user(Request::new(request)))
            .await?;
        Ok(())
    }

    async fn record_chat_changes(
        &self,
        chat_id: &str,
        changes: Vec<messages::ChatChange>,
        idempotency_key: &str,
        change_time: Option<prost_types::Timestamp>,
    ) -> Result<Vec<i64>, Status> {
        let request = messages::RecordChatChangesRequest {
            chat_id: chat_id.to_owned(),
            changes,
            idempotency_key: idempotency_key.to_owned(),
            change_time,
        };
        Ok(in_process(
            "/natter.messages.v1.MessageInternalService/RecordChatChanges",
            self.0.record_chat_changes(Request::new(request)),
        )
        .await?
        .into_inner()
        .change_seqs)
    }
}

#[async_trait]
impl UserDirectory for Grpc {
    async fn lookup_users(&self, user_ids: Vec<String>) -> Result<Vec<sessions::User>, Status> {
        let request = sessions::LookupUsersRequest { user_ids };
        Ok(self
            .0
            .call(SessionInternalServiceClient::new(self.0.channel()).lookup_users(self.0.request(request)))
            .await?
            .users)
    }

    async fn deleted_users(&self, after_position: i64, page_size: i32) -> Result<Vec<sessions::DeletedUser>, Status> {
        let request = sessions::ListDeletedUsersRequest { after_position, page_size };
        let mut client = SessionInternalServiceClient::new(self.0.channel());
        Ok(self.0.call(client.list_deleted_users(self.0.request(request))).await?.deleted_users)
    }
}

#[async_trait]
impl<S: SessionInternalService> UserDirectory for InProcess<S> {
    async fn lookup_users(&self, user_ids: Vec<String>) -> Result<Vec<sessions::User>, Status> {
        let request = sessions::LookupUsersRequest { user_ids };
        Ok(in_process(
            "/natter.sessions.v1.SessionInternalService/LookupUsers",
            self.0.lookup_users(Request::new(request)),
        )
        .await?
        .into_inner()
        .users)
    }

    async fn deleted_users(&self, after_position: i64, page_size: i32) -> Result<Vec<sessions::DeletedUser>, Status> {
        let request = sessions::ListDeletedUsersRequest { after_position, page_size };
        Ok(in_process(
            "/natter.sessions.v1.SessionInternalService/ListDeletedUsers",
            self.0.list_deleted_users(Request::new(request)),
        )
        .await?
        .into_inner()
        .deleted_users)
    }
}

/// A link whose target is set after construction, for services that call
/// each other in one process (chats asks messages for previews, messages asks
/// chats for membership): build one, hand it out, then [`Deferred::set`].
/// Calls before `set` fail with UNAVAILABLE.
pub struct Deferred<T: ?Sized>(std::sync::OnceLock<Arc<T>>);

impl<T: ?Sized> Default for Deferred<T> {
    fn default() -> Self {
        Self(std::sync::OnceLock::new())
    }
}

impl<T: ?Sized> Deferred<T> {
    /// Sets the target; a second call is ignored.
    pub fn set(&self, target: Arc<T>) {
        let _ = self.0.set(target);
    }

    fn get(&self) -> Result<&Arc<T>, Status> {
        self.0.get().ok_or_else(|| Status::unavailable("service link not ready"))
    }
}

#[async_trait]
impl MessageDirectory for Deferred<dyn MessageDirectory> {
    async fn chat_summaries(&self, chat_ids: Vec<String>, user_id: &str) -> Result<Vec<messages::ChatSummary>, Status> {
        self.get()?.chat_summaries(chat_ids, user_id).await
    }

    async fn recent_messages(
        &self,
        chat_id: &str,
        page_size: i32,
        viewer_id: &str,
    ) -> Result<Vec<messages::Message>, Status> {
        self.get()?.recent_messages(chat_id, page_size, viewer_id).await
    }

    async fn purge_chat(&self, chat_id: &str) -> Result<(), Status> {
        self.get()?.purge_chat(chat_id).await
    }

    async fn forget_user(&self, user_id: &str) -> Result<(), Status> {
        self.get()?.forget_user(user_id).await
    }

    async fn record_chat_changes(
        &self,
        chat_id: &str,
        changes: Vec<messages::ChatChange>,
        idempotency_key: &str,
        change_time: Option<prost_types::Timestamp>,
    ) -> Result<Vec<i64>, Status> {
        self.get()?.record_chat_changes(chat_id, changes, idempotency_key, change_time).await
    }
}

/// A stream of events, from a generated client or in process.
pub type EventStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<messages::StreamEventsResponse, Status>> + Send>>;

/// What the assistant service asks the messages service: messages on a
/// user's behalf, its bot's event stream, and its replies (see
/// `messages_internal.proto` for each call's contract).
#[async_trait]
pub trait AssistantMessages: Send + Sync + 'static {
    /// SendMessage as `user_id`.
    async fn send_as(&self, user_id: &str, request: messages::SendMessageRequest) -> Result<messages::Message, Status>;
    /// EditMessage as `user_id`.
    async fn edit_as(&self, user_id: &str, request: messages::EditMessageRequest) -> Result<messages::Message, Status>;
    /// MarkRead as `user_id`.
    async fn mark_read_as(&self, user_id: &str, chat_id: &str, seq: i64) -> Result<(), Status>;
    /// The events of every chat of `user_id` (a bot), resumed from its
    /// read positions.
    async fn follow_chats(&self, user_id: &str) -> Result<EventStream, Status>;
    /// A chat's newest messages, newest first (superseded replies left
    /// out), of those whose seq is below `before_seq` if it is not 0.
    async fn recent_messages(
        &self,
        chat_id: &str,
        page_size: i32,
        before_seq: i64,
    ) -> Result<Vec<messages::Message>, Status>;
    /// The messages with `message_ids` and those of `chat_id` at `seqs`.
    async fn lookup_messages(
        &self,
        message_ids: Vec<String>,
        chat_id: &str,
        seqs: Vec<i64>,
    ) -> Result<Vec<messages::Message>, Status>;
    /// Starts a reply: the reply and whether this call created it.
    async fn start_reply(&self, request: messages::StartReplyRequest) -> Result<(messages::Message, bool), Status>;
    /// Publishes pieces of a reply and checkpoints it: whether a stop was
    /// asked for.
    async fn update_reply(&self, request: messages::UpdateReplyRequest) -> Result<bool, Status>;
    /// Finishes a reply.
    async fn finish_reply(&self, request: messages::FinishReplyRequest) -> Result<messages::Message, Status>;
    /// Sets a reply's stop flag.
    async fn stop_reply(&self, message_id: &str) -> Result<messages::Message, Status>;
    /// GENERATING replies whose checkpoint is older than `stale_for` (on
    /// the messages store's clock), up to 100.
    async fn stale_replies(&self, stale_for: std::time::Duration) -> Result<Vec<messages::Message>, Status>;
}

/// ListStaleReplies of up to 100 replies stale for `stale_for`, with the
/// same bound on this process's clock for messages replicas older than
/// `stale_for` (for one release).
fn stale_request(stale_for: std::time::Duration) -> messages::ListStaleRepliesRequest {
    #[allow(deprecated)] // for messages replicas older than stale_for
    messages::ListStaleRepliesRequest {
        stale_for: Some(natter_kit::time::duration(stale_for)),
        checkpoint_before: Some(natter_kit::time::timestamp(natter_kit::time::micros_ago(stale_for))),
        page_size: 100,
    }
}

/// What the assistant service asks the chats service.
#[async_trait]
pub trait AssistantChats: Send + Sync + 'static {
    /// Membership of `user_id` in `chat_id`, and the chat's state.
    async fn check_membership(&self, chat_id: &str, user_id: &str) -> Result<chats::CheckMembershipResponse, Status>;
    /// CreateChat as `user_id`.
    async fn create_chat_as(&self, user_id: &str, request: chats::CreateChatRequest) -> Result<chats::Chat, Status>;
    /// Gives an untitled chat `title` (TitleChat), made from the prompt
    /// `source_message_id`; a titled one keeps its own.
    async fn title_chat(&self, chat_id: &str, title: &str, source_message_id: &str) -> Result<chats::Chat, Status>;
    /// Takes back the title made from the prompt `source_message_id`, deleted
    /// since (UntitleChat); whether it changed anything.
    async fn untitle_chat(&self, chat_id: &str, source_message_id: &str) -> Result<bool, Status>;
}

/// What the assistant service asks the sessions service (besides
/// LookupUsers: the names of a group's speakers).
#[async_trait]
pub trait AssistantUsers: UserDirectory {
    /// The bot user `username`, created on first use.
    async fn ensure_bot_user(&self, username: &str, display_name: &str) -> Result<sessions::User, Status>;
}

#[async_trait]
impl AssistantMessages for Grpc {
    async fn send_as(&self, user_id: &str, request: messages::SendMessageRequest) -> Result<messages::Message, Status> {
        let request = messages::SendMessageAsRequest { user_id: user_id.to_owned(), request: Some(request) };
        let mut client = MessageInternalServiceClient::new(self.0.channel());
        self.0.call(client.send_message_as(self.0.request(request))).await?.message.ok_or_else(no_message)
    }

    async fn edit_as(&self, user_id: &str, request: messages::EditMessageRequest) -> Result<messages::Message, Status> {
        let request = messages::EditMessageAsRequest { user_id: user_id.to_owned(), request: Some(request) };
        let mut client = MessageInternalServiceClient::new(self.0.channel());
        self.0.call(client.edit_message_as(self.0.request(request))).await?.message.ok_or_else(no_message)
    }

    async fn mark_read_as(&self, user_id: &str, chat_id: &str, seq: i64) -> Result<(), Status> {
        let request = messages::MarkReadAsRequest {
            user_id: user_id.to_owned(),
            request: Some(messages::MarkReadRequest { chat_id: chat_id.to_owned(), seq }),
        };
        let mut client = MessageInternalServiceClient::new(self.0.channel());
        self.0.call(client.mark_read_as(self.0.request(request))).await?;
        Ok(())
    }

    async fn follow_chats(&self, user_id: &str) -> Result<EventStream, Status> {
        // No deadline on the stream itself: only on its answer.
        let request = Request::new(messages::FollowChatsRequest { user_id: user_id.to_owned() });
        let mut client = MessageInternalServiceClient::new(self.0.channel());
        Ok(follow_events(self.0.call(client.follow_chats(request)).await?))
    }

    async fn recent_messages(
        &self,
        chat_id: &str,
        page_size: i32,
        before_seq: i64,
    ) -> Result<Vec<messages::Message>, Status> {
        self.list_recent(recent_request(chat_id, page_size, "", before_seq)).await
    }

    async fn lookup_messages(
        &self,
        message_ids: Vec<String>,
        chat_id: &str,
        seqs: Vec<i64>,
    ) -> Result<Vec<messages::Message>, Status> {
        let request = messages::LookupMessagesRequest { message_ids, chat_id: chat_id.to_owned(), seqs };
        let mut client = MessageInternalServiceClient::new(self.0.channel());
        Ok(self.0.call(client.lookup_messages(self.0.request(request))).await?.messages)
    }

    async fn start_reply(&self, request: messages::StartReplyRequest) -> Result<(messages::Message, bool), Status> {
        let mut client = MessageInternalServiceClient::new(self.0.channel());
        let response = self.0.call(client.start_reply(self.0.request(request))).await?;
        Ok((response.message.ok_or_else(no_message)?, response.created))
    }

    async fn update_reply(&self, request: messages::UpdateReplyRequest) -> Result<bool, Status> {
        let mut client = MessageInternalServiceClient::new(self.0.channel());
        Ok(self.0.call(client.update_reply(self.0.request(request))).await?.stop_requested)
    }

    async fn finish_reply(&self, request: messages::FinishReplyRequest) -> Result<messages::Message, Status> {
        let mut client = MessageInternalServiceClient::new(self.0.channel());
        self.0.call(client.finish_reply(self.0.request(request))).await?.message.ok_or_else(no_message)
    }

    async fn stop_reply(&self, message_id: &str) -> Result<messages::Message, Status> {
        let request = messages::StopReplyRequest { message_id: message_id.to_owned() };
        let mut client = MessageInternalServiceClient::new(self.0.channel());
        self.0.call(client.stop_reply(self.0.request(request))).await?.message.ok_or_else(no_message)
    }

    async fn stale_replies(&self, stale_for: std::time::Duration) -> Result<Vec<messages::Message>, Status> {
        let request = stale_request(stale_for);
        let mut client = MessageInternalServiceClient::new(self.0.channel());
        Ok(self.0.call(client.list_stale_replies(self.0.request(request))).await?.messages)
    }
}

#[async_trait]
impl<S: MessageInternalService> AssistantMessages for InProcess<S> {
    async fn send_as(&self, user_id: &str, request: messages::SendMessageRequest) -> Result<messages::Message, Status> {
        let request = messages::SendMessageAsRequest { user_id: user_id.to_owned(), request: Some(request) };
        in_process(
            "/natter.messages.v1.MessageInternalService/SendMessageAs",
            self.0.send_message_as(Request::new(request)),
        )
        .await?
        .into_inner()
        .message
        .ok_or_else(no_message)
    }

    async fn edit_as(&self, user_id: &str, request: messages::EditMessageRequest) -> Result<messages::Message, Status> {
        let request = messages::EditMessageAsRequest { user_id: user_id.to_owned(), request: Some(request) };
        in_process(
            "/natter.messages.v1.MessageInternalService/EditMessageAs",
            self.0.edit_message_as(Request::new(request)),
        )
        .await?
        .into_inner()
        .message
        .ok_or_else(no_message)
    }

    async fn mark_read_as(&self, user_id: &str, chat_id: &str, seq: i64) -> Result<(), Status> {
        let request = messages::MarkReadAsRequest {
            user_id: user_id.to_owned(),
            request: Some(messages::MarkReadRequest { chat_id: chat_id.to_owned(), seq }),
        };
        in_process("/natter.messages.v1.MessageInternalService/MarkReadAs", self.0.mark_read_as(Request::new(request)))
            .await?;
        Ok(())
    }

    async fn follow_chats(&self, user_id: &str) -> Result<EventStream, Status> {
        let request = messages::FollowChatsRequest { user_id: user_id.to_owned() };
        Ok(follow_events(self.0.follow_chats(Request::new(request)).await?.into_inner()))
    }

    async fn recent_messages(
        &self,
        chat_id: &str,
        page_size: i32,
        before_seq: i64,
    ) -> Result<Vec<messages::Message>, Status> {
        self.list_recent(recent_request(chat_id, page_size, "", before_seq)).await
    }

    async fn lookup_messages(
        &self,
        message_ids: Vec<String>,
        chat_id: &str,
        seqs: Vec<i64>,
    ) -> Result<Vec<messages::Message>, Status> {
        let request = messages::LookupMessagesRequest { message_ids, chat_id: chat_id.to_owned(), seqs };
        Ok(in_process(
            "/natter.messages.v1.MessageInternalService/LookupMessages",
            self.0.lookup_messages(Request::new(request)),
        )
        .await?
        .into_inner()
        .messages)
    }

    async fn start_reply(&self, request: messages::StartReplyRequest) -> Result<(messages::Message, bool), Status> {
        let response = in_process(
            "/natter.messages.v1.MessageInternalService/StartReply",
            self.0.start_reply(Request::new(request)),
        )
        .await?
        .into_inner();
        Ok((response.message.ok_or_else(no_message)?, response.created))
    }

    async fn update_reply(&self, request: messages::UpdateReplyRequest) -> Result<bool, Status> {
        Ok(in_process(
            "/natter.messages.v1.MessageInternalService/UpdateReply",
            self.0.update_reply(Request::new(request)),
        )
        .await?
        .into_inner()
        .stop_requested)
    }

    async fn finish_reply(&self, request: messages::FinishReplyRequest) -> Result<messages::Message, Status> {
        in_process("/natter.messages.v1.MessageInternalService/FinishReply", self.0.finish_reply(Request::new(request)))
            .await?
            .into_inner()
            .message
            .ok_or_else(no_message)
    }

    async fn stop_reply(&self, message_id: &str) -> Result<messages::Message, Status> {
        let request = messages::StopReplyRequest { message_id: message_id.to_owned() };
        in_process("/natter.messages.v1.MessageInternalService/StopReply", self.0.stop_reply(Request::new(request)))
            .await?
            .into_inner()
            .message
            .ok_or_else(no_message)
    }

    async fn stale_replies(&self, stale_for: std::time::Duration) -> Result<Vec<messages::Message>, Status> {
        let request = stale_request(stale_for);
        Ok(in_process(
            "/natter.messages.v1.MessageInternalService/ListStaleReplies",
            self.0.list_stale_replies(Request::new(request)),
        )
        .await?
        .into_inner()
        .messages)
    }
}

#[async_trait]
impl AssistantChats for Grpc {
    async fn check_membership(&self, chat_id: &str, user_id: &str) -> Result<chats::CheckMembershipResponse, Status> {
        ChatDirectory::check_membership(self, chat_id, user_id).await
    }

    async fn create_chat_as(&self, user_id: &str, request: chats::CreateChatRequest) -> Result<chats::Chat, Status> {
        let request = chats::CreateChatAsRequest { user_id: user_id.to_owned(), request: Some(request) };
        let mut client = ChatInternalServiceClient::new(self.0.channel());
        self.0.call(client.create_chat_as(self.0.request(request))).await?.chat.ok_or_else(no_message)
    }

    async fn title_chat(&self, chat_id: &str, title: &str, source_message_id: &str) -> Result<chats::Chat, Status> {
        let request = title_request(chat_id, title, source_message_id);
        let mut client = ChatInternalServiceClient::new(self.0.channel());
        self.0.call(client.title_chat(self.0.request(request))).await?.chat.ok_or_else(no_message)
    }

    async fn untitle_chat(&self, chat_id: &str, source_message_id: &str) -> Result<bool, Status> {
        ChatDirectory::untitle_chat(self, chat_id, source_message_id).await
    }
}

#[async_trait]
impl<S: ChatInternalService> AssistantChats for InProcess<S> {
    async fn check_membership(&self, chat_id: &str, user_id: &str) -> Result<chats::CheckMembershipResponse, Status> {
        ChatDirectory::check_membership(self, chat_id, user_id).await
    }

    async fn create_chat_as(&self, user_id: &str, request: chats::CreateChatRequest) -> Result<chats::Chat, Status> {
        let request = chats::CreateChatAsRequest { user_id: user_id.to_owned(), request: Some(request) };
        in_process("/natter.chats.v1.ChatInternalService/CreateChatAs", self.0.create_chat_as(Request::new(request)))
            .await?
            .into_inner()
            .chat
            .ok_or_else(no_message)
    }

    async fn title_chat(&self, chat_id: &str, title: &str, source_message_id: &str) -> Result<chats::Chat, Status> {
        let request = title_request(chat_id, title, source_message_id);
        in_process("/natter.chats.v1.ChatInternalService/TitleChat", self.0.title_chat(Request::new(request)))
            .await?
            .into_inner()
            .chat
            .ok_or_else(no_message)
    }

    async fn untitle_chat(&self, chat_id: &str, source_message_id: &str) -> Result<bool, Status> {
        ChatDirectory::untitle_chat(self, chat_id, source_message_id).await
    }
}

#[async_trait]
impl AssistantUsers for Grpc {
    async fn ensure_bot_user(&self, username: &str, display_name: &str) -> Result<sessions::User, Status> {
        let request =
            sessions::EnsureBotUserRequest { username: username.to_owned(), display_name: display_name.to_owned() };
        let mut client = SessionInternalServiceClient::new(self.0.channel());
        self.0.call(client.ensure_bot_user(self.0.request(request))).await?.user.ok_or_else(no_message)
    }
}

#[async_trait]
impl<S: SessionInternalService> AssistantUsers for InProcess<S> {
    async fn ensure_bot_user(&self, username: &str, display_name: &str) -> Result<sessions::User, Status> {
        let request =
            sessions::EnsureBotUserRequest { username: username.to_owned(), display_name: display_name.to_owned() };
        in_process(
            "/natter.sessions.v1.SessionInternalService/EnsureBotUser",
            self.0.ensure_bot_user(Request::new(request)),
        )
        .await?
        .into_inner()
        .user
        .ok_or_else(no_message)
    }
}

/// The events a FollowChats stream carries.
fn follow_events(
    stream: impl futures::Stream<Item = Result<messages::FollowChatsResponse, Status>> + Send + 'static,
) -> EventStream {
    Box::pin(futures::StreamExt::filter_map(stream, |item| async move { item.map(|r| r.event).transpose() }))
}

/// A callee's answer without the message it promises.
fn no_message() -> Status {
    Status::internal("the service's answer holds no result")
}

#[cfg(test)]
mod caching_tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    /// A chats service whose every membership answer carries the number
    /// of checks it answered (as `members_version`).
    #[derive(Default)]
    struct Counting(AtomicI64);

    #[async_trait]
    impl ChatDirectory for Counting {
        async fn check_memberships(
            &self,
            _: chats::CheckMembershipRequest,
        ) -> Result<chats::CheckMembershipResponse, Status> {
            let version = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(chats::CheckMembershipResponse {
                chat_exists: true,
                member: true,
                members_version: version,
                ..Default::default()
            })
        }

        async fn member_chat_ids(&self, _: &str) -> Result<Vec<String>, Status> {
            Ok(Vec::new())
        }

        async fn managed_chat_ids(&self, _: &str) -> Result<Vec<String>, Status> {
            Ok(Vec::new())
        }

        async fn record_activity(&self, _: Vec<chats::Activity>) -> Result<(), Status> {
            Ok(())
        }
    }

    /// A membership a write found older than a departure is asked of the
    /// chats service again, not answered from the cache; others stay kept.
    #[tokio::test]
    async fn a_forgotten_membership_is_asked_again() {
        let invalidator = Invalidator::new(true);
        let directory = CachingChatDirectory::new(Counting::default(), std::time::Duration::from_secs(60), invalidator);
        let [chat, user, other] = [(); 3].map(|_| uuid::Uuid::now_v7().to_string());
        let version = |user: &str| {
            let (directory, chat, user) = (&directory, chat.clone(), user.to_owned());
            async move { directory.check_membership(&chat, &user).await.unwrap().members_version }
        };
        assert_eq!(version(&user).await, 1);
        assert_eq!(version(&other).await, 2);
        assert_eq!(version(&user).await, 1, "kept");
        directory.forget_membership(&chat, &user);
        assert_eq!(version(&user).await, 3, "asked again");
        assert_eq!(version(&other).await, 2, "another user's kept");
    }
}

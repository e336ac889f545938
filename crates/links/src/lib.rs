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
/// message of every chat sent within [`REANNOUNCE_WINDOW`] before its
/// newest message. Nothing is lost for longer than a restart as long as
/// that window covers one flush interval plus the time from a message's
/// send time to its activity reaching the buffer ([`RECORD_SLACK`]): the
/// `const` assertions below hold that, and the chats service refuses a
/// flush interval above [`MAX_FLUSH_INTERVAL`] ([`check_flush_interval`]).
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

/// What the messages service asks the chats service.
#[async_trait]
pub trait ChatDirectory: Send + Sync + 'static {
    /// Membership of `user_id` in `chat_id`, and the chat's state.
    async fn check_membership(&self, chat_id: &str, user_id: &str) -> Result<chats::CheckMembershipResponse, Status>;
    /// Every chat `user_id` is a member of.
    async fn member_chat_ids(&self, user_id: &str) -> Result<Vec<String>, Status>;
    /// Records the newest message of chats (for ordering by activity).
    async fn record_activity(&self, activities: Vec<chats::Activity>) -> Result<(), Status>;
}

/// What the chats service asks the messages service.
#[async_trait]
pub trait MessageDirectory: Send + Sync + 'static {
    /// Each chat's newest message and `user_id`'s unread count, in request order.
    async fn chat_summaries(&self, chat_ids: Vec<String>, user_id: &str) -> Result<Vec<messages::ChatSummary>, Status>;
    /// A chat's newest `page_size` messages, newest first.
    async fn recent_messages(&self, chat_id: &str, page_size: i32) -> Result<Vec<messages::Message>, Status>;
    /// Deletes every message and read position of a chat.
    async fn purge_chat(&self, chat_id: &str) -> Result<(), Status>;
    /// Records committed changes of a chat's membership or details in its
    /// change log, each with the chat's next change number (returned in
    /// order), and announces them to its streams; a join also resets the
    /// joiner's read position to the chat's newest seq. A repeated call with
    /// the same non-empty `idempotency_key` records nothing again.
    async fn record_chat_changes(
        &self,
        chat_id: &str,
        changes: Vec<messages::ChatChange>,
        idempotency_key: &str,
    ) -> Result<Vec<i64>, Status>;
}

/// What the chats service asks the sessions service.
#[async_trait]
pub trait UserDirectory: Send + Sync + 'static {
    /// The users among `user_ids` that exist.
    async fn lookup_users(&self, user_ids: Vec<String>) -> Result<Vec<sessions::User>, Status>;
}

/// Calls another service's internal listener over gRPC: each call carries
/// the caller's trace context (W3C `traceparent`, so the callee's spans join
/// the caller's trace) and the service credential, and has a deadline
/// (see [`natter_kit::Link`]).
#[derive(Clone, Debug)]
pub struct Grpc(pub natter_kit::Link);

/// Calls another service's internal API in the same process.
pub struct InProcess<S>(pub Arc<S>);

#[async_trait]
impl ChatDirectory for Grpc {
    async fn check_membership(&self, chat_id: &str, user_id: &str) -> Result<chats::CheckMembershipResponse, Status> {
        let request = chats::CheckMembershipRequest { chat_id: chat_id.to_owned(), user_id: user_id.to_owned() };
        self.0.call(ChatInternalServiceClient::new(self.0.channel()).check_membership(self.0.request(request))).await
    }

    async fn member_chat_ids(&self, user_id: &str) -> Result<Vec<String>, Status> {
        let request = chats::ListMemberChatIdsRequest { user_id: user_id.to_owned() };
        Ok(self
            .0
            .call(ChatInternalServiceClient::new(self.0.channel()).list_member_chat_ids(self.0.request(request)))
            .await?
            .chat_ids)
    }

    async fn record_activity(&self, activities: Vec<chats::Activity>) -> Result<(), Status> {
        let request = chats::RecordActivityRequest { activities };
        self.0.call(ChatInternalServiceClient::new(self.0.channel()).record_activity(self.0.request(request))).await?;
        Ok(())
    }
}

#[async_trait]
impl<S: ChatInternalService> ChatDirectory for InProcess<S> {
    async fn check_membership(&self, chat_id: &str, user_id: &str) -> Result<chats::CheckMembershipResponse, Status> {
        let request = chats::CheckMembershipRequest { chat_id: chat_id.to_owned(), user_id: user_id.to_owned() };
        Ok(in_process(
            "/natter.chats.v1.ChatInternalService/CheckMembership",
            self.0.check_membership(Request::new(request)),
        )
        .await?
        .into_inner())
    }

    async fn member_chat_ids(&self, user_id: &str) -> Result<Vec<String>, Status> {
        let request = chats::ListMemberChatIdsRequest { user_id: user_id.to_owned() };
        Ok(in_process(
            "/natter.chats.v1.ChatInternalService/ListMemberChatIds",
            self.0.list_member_chat_ids(Request::new(request)),
        )
        .await?
        .into_inner()
        .chat_ids)
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

    async fn recent_messages(&self, chat_id: &str, page_size: i32) -> Result<Vec<messages::Message>, Status> {
        let request = messages::ListRecentMessagesRequest { chat_id: chat_id.to_owned(), page_size };
        Ok(self
            .0
            .call(MessageInternalServiceClient::new(self.0.channel()).list_recent_messages(self.0.request(request)))
            .await?
            .messages)
    }

    async fn purge_chat(&self, chat_id: &str) -> Result<(), Status> {
        let request = messages::PurgeChatRequest { chat_id: chat_id.to_owned() };
        self.0.call(MessageInternalServiceClient::new(self.0.channel()).purge_chat(self.0.request(request))).await?;
        Ok(())
    }

    async fn record_chat_changes(
        &self,
        chat_id: &str,
        changes: Vec<messages::ChatChange>,
        idempotency_key: &str,
    ) -> Result<Vec<i64>, Status> {
        let request = messages::RecordChatChangesRequest {
            chat_id: chat_id.to_owned(),
            changes,
            idempotency_key: idempotency_key.to_owned(),
        };
        let response = self
            .0
            .call(MessageInternalServiceClient::new(self.0.channel()).record_chat_changes(self.0.request(request)))
            .await?;
        Ok(response.change_seqs)
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

    async fn recent_messages(&self, chat_id: &str, page_size: i32) -> Result<Vec<messages::Message>, Status> {
        let request = messages::ListRecentMessagesRequest { chat_id: chat_id.to_owned(), page_size };
        Ok(in_process(
            "/natter.messages.v1.MessageInternalService/ListRecentMessages",
            self.0.list_recent_messages(Request::new(request)),
        )
        .await?
        .into_inner()
        .messages)
    }

    async fn purge_chat(&self, chat_id: &str) -> Result<(), Status> {
        let request = messages::PurgeChatRequest { chat_id: chat_id.to_owned() };
        in_process("/natter.messages.v1.MessageInternalService/PurgeChat", self.0.purge_chat(Request::new(request)))
            .await?;
        Ok(())
    }

    async fn record_chat_changes(
        &self,
        chat_id: &str,
        changes: Vec<messages::ChatChange>,
        idempotency_key: &str,
    ) -> Result<Vec<i64>, Status> {
        let request = messages::RecordChatChangesRequest {
            chat_id: chat_id.to_owned(),
            changes,
            idempotency_key: idempotency_key.to_owned(),
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

    async fn recent_messages(&self, chat_id: &str, page_size: i32) -> Result<Vec<messages::Message>, Status> {
        self.get()?.recent_messages(chat_id, page_size).await
    }

    async fn purge_chat(&self, chat_id: &str) -> Result<(), Status> {
        self.get()?.purge_chat(chat_id).await
    }

    async fn record_chat_changes(
        &self,
        chat_id: &str,
        changes: Vec<messages::ChatChange>,
        idempotency_key: &str,
    ) -> Result<Vec<i64>, Status> {
        self.get()?.record_chat_changes(chat_id, changes, idempotency_key).await
    }
}

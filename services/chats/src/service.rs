//! The chats domain operations over the [`Store`] and the links to the other
//! services. No tonic types except those the links carry.

use std::collections::HashMap;
use std::sync::Arc;

use natter_bus::{EventBus, Topic};
use natter_kit::time::now_micros;
use natter_links::{MessageDirectory, UserDirectory};
use natter_proto::messages::v1 as mpb;
use uuid::Uuid;

use crate::domain::{self, Kind, Limits, Role, Visibility};
use crate::error::ChatsError;
use crate::store::{ChatAccess, ChatFilter, ChatRow, Inserted, MemberRow, Store};

/// A validated CreateChat request.
#[derive(Clone, Debug)]
pub struct NewChat {
    pub chat_id: Option<Uuid>,
    pub kind: Option<Kind>,
    pub title: String,
    pub description: String,
    pub member_ids: Vec<Uuid>,
    pub visibility: Visibility,
}

/// A chat as one caller sees it: the row plus its message preview.
#[derive(Clone, Debug)]
pub struct ChatView {
    pub chat: ChatRow,
    /// Newest message and the caller's unread count (None before the first message).
    pub summary: Option<mpb::ChatSummary>,
}

/// The chats service's domain object; share it behind an `Arc`.
pub struct Chats {
    store: Store,
    users: Arc<dyn UserDirectory>,
    messages: Arc<dyn MessageDirectory>,
    bus: Arc<dyn EventBus>,
    limits: Limits,
}

impl Chats {
    pub fn new(
        store: Store,
        users: Arc<dyn UserDirectory>,
        messages: Arc<dyn MessageDirectory>,
        bus: Arc<dyn EventBus>,
        limits: Limits,
    ) -> Self {
        Self { store, users, messages, bus, limits }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Creates a chat (see CreateChat in chats.proto for the rules).
    #[tracing::instrument(skip_all, fields(caller = %caller))]
    pub async fn create_chat(&self, caller: Uuid, new: NewChat) -> Result<ChatView, ChatsError> {
        let mut others: Vec<Uuid> = Vec::with_capacity(new.member_ids.len());
        for id in new.member_ids.iter().copied() {
            if id != caller && !others.contains(&id) {
                others.push(id);
            }
        }
        let kind =
            domain::resolve_kind(new.kind, &new.title, others.len()).map_err(|(f, r)| ChatsError::invalid(f, r))?;
        if kind == Kind::Direct && new.visibility == Visibility::Public {
            return Err(ChatsError::invalid("visibility", "a direct chat is always private"));
        }
        if others.len() + 1 > self.limits.group_members {
            return Err(ChatsError::invalid(
                "member_ids",
                format!("a chat has at most {} members", self.limits.group_members),
            ));
        }
        let direct_key = (kind == Kind::Direct).then(|| domain::direct_key(caller, others[0]));

        // Idempotency: the same client-chosen id, or the same direct pair,
        // returns the chat that exists.
        if let Some(existing) = self.existing(caller, new.chat_id, direct_key.as_deref()).await? {
            return self.view(caller, existing).await;
        }

        let found = self.users.lookup_users(others.iter().map(Uuid::to_string).collect()).await?;
        if let Some(missing) = others.iter().find(|id| !found.iter().any(|u| u.id == id.to_string())) {
            return Err(ChatsError::UserNotFound(missing.to_string()));
        }

        let now = now_micros();
        let id = new.chat_id.unwrap_or_else(Uuid::now_v7).to_string();
        let chat = ChatRow {
            id: id.clone(),
            kind: kind.as_str().to_owned(),
            title: new.title.clone(),
            description: new.description.clone(),
            visibility: new.visibility.as_str().to_owned(),
            owner_id: caller.to_string(),
            creator_id: caller.to_string(),
            member_count: others.len() as i64 + 1,
            archive_time: None,
            create_time: now,
            update_time: now,
            last_activity_time: now,
            last_seq: 0,
            last_message_time: None,
        };
        let members: Vec<MemberRow> = std::iter::once((caller, Role::Owner))
            .chain(others.iter().map(|u| (*u, Role::Member)))
            .map(|(user, role)| MemberRow {
                chat_id: id.clone(),
                user_id: user.to_string(),
                role: role.as_str().to_owned(),
                join_time: now,
            })
            .collect();
        match self.store.insert_chat(&chat, &domain::title_key(&chat.title), direct_key.as_deref(), &members).await? {
            Inserted::Created => {
                tracing::info!(chat_id = %id, kind = kind.as_str(), members = members.len(), "chat created");
                for m in &members {
                    self.announce_membership(&id, &m.user_id, mpb::MembershipChange::Joined);
                }
                Ok(ChatView { chat, summary: None })
            }
            // Lost a race with an identical request: return its chat.
            Inserted::Conflict => match self.existing(caller, new.chat_id, direct_key.as_deref()).await? {
                Some(existing) => self.view(caller, existing).await,
                None => Err(ChatsError::ChatIdTaken),
            },
        }
    }

    /// The chat an idempotent CreateChat should return, if any.
    async fn existing(
        &self,
        caller: Uuid,
        chat_id: Option<Uuid>,
        direct_key: Option<&str>,
    ) -> Result<Option<ChatRow>, ChatsError> {
        if let Some(key) = direct_key
            && let Some(chat) = self.store.chat_by_direct_key(key).await?
        {
            return Ok(Some(chat));
        }
        if let Some(id) = chat_id
            && let Some(chat) = self.store.chat(&id.to_string()).await?
        {
            if chat.creator_id != caller.to_string() {
                return Err(ChatsError::ChatIdTaken);
            }
            return Ok(Some(chat));
        }
        Ok(None)
    }

    fn announce_membership(&self, chat_id: &str, user_id: &str, change: mpb::MembershipChange) {
        let (Ok(chat), Ok(user)) = (Uuid::try_parse(chat_id), Uuid::try_parse(user_id)) else { return };
        let event = Arc::new(mpb::StreamEventsResponse {
            chat_id: chat_id.to_owned(),
            seq: 0,
            event: Some(mpb::stream_events_response::Event::MembershipChanged(mpb::MembershipChanged {
                user_id: user_id.to_owned(),
                change: change as i32,
            })),
        });
        self.bus.publish(Topic::User(user), event.clone());
        self.bus.publish(Topic::Chat(chat), event);
    }

    /// A chat the caller may see: a member, or anyone for a public chat.
    pub async fn readable(&self, caller: Uuid, chat_id: Uuid) -> Result<ChatAccess, ChatsError> {
        let access =
            self.store.access(&chat_id.to_string(), &caller.to_string()).await?.ok_or(ChatsError::ChatNotFound)?;
        if access.role.is_none() && Visibility::parse(&access.chat.visibility) != Visibility::Public {
            return Err(ChatsError::Denied("not a member of this chat"));
        }
        Ok(access)
    }

    /// GetChat: the chat and, when asked, its newest messages.
    pub async fn get_chat(
        &self,
        caller: Uuid,
        chat_id: Uuid,
        message_page_size: u32,
    ) -> Result<(ChatView, Vec<mpb::Message>), ChatsError> {
        let access = self.readable(caller, chat_id).await?;
        let messages = if message_page_size > 0 && access.chat.last_seq > 0 {
            self.messages.recent_messages(&access.chat.id, message_page_size as i32).await?
        } else {
            Vec::new()
        };
        Ok((self.view(caller, access.chat).await?, messages))
    }

    /// One view (see [`Chats::views`]).
    async fn view(&self, caller: Uuid, chat: ChatRow) -> Result<ChatView, ChatsError> {
        let mut views = self.views(caller, vec![chat]).await?;
        Ok(views.remove(0))
    }

    /// Adds previews and unread counts to chats, with one call to the
    /// messages service for all of them.
    pub async fn views(&self, caller: Uuid, chats: Vec<ChatRow>) -> Result<Vec<ChatView>, ChatsError> {
        let with_messages: Vec<String> = chats.iter().filter(|c| c.last_seq > 0).map(|c| c.id.clone()).collect();
        let mut summaries: HashMap<String, mpb::ChatSummary> = if with_messages.is_empty() {
            HashMap::new()
        } else {
            self.messages
                .chat_summaries(with_messages, &caller.to_string())
                .await?
                .into_iter()
                .map(|s| (s.chat_id.clone(), s))
                .collect()
        };
        Ok(chats
            .into_iter()
            .map(|chat| {
                let summary = summaries.remove(&chat.id).filter(|s| s.last_seq > 0);
                ChatView { chat, summary }
            })
            .collect())
    }

    /// A page of chats for ListChats, plus the keyset position of its last row
    /// when more may follow.
    pub async fn list_chats(
        &self,
        caller: Uuid,
        filter: &ChatFilter,
        after: Option<(i64, String)>,
        page_size: u32,
    ) -> Result<(Vec<ChatView>, Option<(i64, String)>), ChatsError> {
        let mut rows = self.store.list_chats(&caller.to_string(), filter, after, page_size + 1).await?;
        let next = if rows.len() > page_size as usize {
            rows.truncate(page_size as usize);
            rows.last().map(|c| (c.last_activity_time, c.id.clone()))
        } else {
            None
        };
        Ok((self.views(caller, rows).await?, next))
    }

    /// A page of members for ListMembers (callers who may read the chat).
    pub async fn list_members(
        &self,
        caller: Uuid,
        chat_id: Uuid,
        after: Option<(i64, String)>,
        page_size: u32,
    ) -> Result<(Vec<MemberRow>, Option<(i64, String)>), ChatsError> {
        self.readable(caller, chat_id).await?;
        let mut rows = self.store.members(&chat_id.to_string(), after, page_size + 1).await?;
        let next = if rows.len() > page_size as usize {
            rows.truncate(page_size as usize);
            rows.last().map(|m| (m.join_time, m.user_id.clone()))
        } else {
            None
        };
        Ok((rows, next))
    }

    /// Internal: membership and chat state, for the messages service.
    pub async fn membership(&self, chat_id: &str, user_id: &str) -> Result<Option<ChatAccess>, ChatsError> {
        Ok(self.store.access(chat_id, user_id).await?)
    }

    /// Internal: every chat of a user.
    pub async fn member_chat_ids(&self, user_id: &str) -> Result<Vec<String>, ChatsError> {
        Ok(self.store.member_chat_ids(user_id).await?)
    }

    /// Internal: newest messages of chats, for ordering by activity.
    pub async fn record_activity(&self, chat_id: &str, last_seq: i64, time: i64) -> Result<(), ChatsError> {
        Ok(self.store.record_activity(chat_id, last_seq, time).await?)
    }
}

//! The chats domain operations over the [`Store`] and the links to the other
//! services. No tonic types except those the links carry.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use natter_bus::{Event, EventBus, Topic};
use natter_kit::limits::{LOOKUP_USERS_MAX_IDS, Rate, RateLimiter};
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
    /// CreateChat calls per user.
    create_rate: RateLimiter<Uuid>,
    /// (chat, user) -> membership, for the messages service's checks; only
    /// when this is the only chats instance (see [`Chats::with_membership_cache`]).
    cache: Option<Mutex<Cache>>,
}

/// Most memberships the cache holds before it starts over.
const CACHE_ENTRIES: usize = 100_000;

/// Cached memberships, and a generation that every eviction bumps: a lookup
/// that raced with a change (read the store before it, would cache after
/// its eviction) sees the generation moved and does not cache.
#[derive(Default)]
struct Cache {
    entries: HashMap<(String, String), Arc<ChatAccess>>,
    generation: u64,
}

impl Chats {
    pub fn new(
        store: Store,
        users: Arc<dyn UserDirectory>,
        messages: Arc<dyn MessageDirectory>,
        bus: Arc<dyn EventBus>,
        limits: Limits,
        create_chat_rate: Rate,
    ) -> Self {
        let create_rate = RateLimiter::new("chats created", create_chat_rate);
        Self { store, users, messages, bus, limits, create_rate, cache: None }
    }

    /// Caches membership checks in memory. Correct only when every change to
    /// chats goes through this instance (the all-in-one without NATS): each
    /// change evicts the chat's entries once committed, so the cache has no
    /// stale window. Replicas never cache.
    pub fn with_membership_cache(mut self) -> Self {
        self.cache = Some(Mutex::new(Cache::default()));
        self
    }

    /// Forgets everything cached about `chat_id` (call on every change,
    /// after its commit).
    fn evict(&self, chat_id: &str) {
        if let Some(cache) = &self.cache {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.generation += 1;
            cache.entries.retain(|(chat, _), _| chat != chat_id);
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Creates a chat (see CreateChat in chats.proto for the rules); each
    /// call, a retry too, counts against the caller's CreateChat rate.
    #[tracing::instrument(skip_all, fields(caller = %caller))]
    pub async fn create_chat(&self, caller: Uuid, new: NewChat) -> Result<ChatView, ChatsError> {
        self.create_rate.check(&caller)?;
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

        self.require_users(&others.iter().map(Uuid::to_string).collect::<Vec<_>>()).await?;

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
                    self.announce_membership(&id, &m.user_id, mpb::MembershipChange::Joined, 0);
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

    /// NOT_FOUND naming the first of `ids` (canonical UUIDs) that is no
    /// user; asks the sessions service in calls of at most
    /// [`LOOKUP_USERS_MAX_IDS`] ids, whatever the member limit.
    async fn require_users(&self, ids: &[String]) -> Result<(), ChatsError> {
        let mut found = HashSet::with_capacity(ids.len());
        for chunk in ids.chunks(LOOKUP_USERS_MAX_IDS) {
            found.extend(self.users.lookup_users(chunk.to_vec()).await?.into_iter().map(|u| u.id));
        }
        match ids.iter().find(|id| !found.contains(*id)) {
            Some(missing) => Err(ChatsError::UserNotFound(missing.clone())),
            None => Ok(()),
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

    /// Announces a membership change on the chat's topic and the user's
    /// (whose streams follow the chats they join). `seq` is the chat's newest
    /// seq at the time, from which a joining stream catches up.
    fn announce_membership(&self, chat_id: &str, user_id: &str, change: mpb::MembershipChange, seq: i64) {
        let (Ok(chat), Ok(user)) = (Uuid::try_parse(chat_id), Uuid::try_parse(user_id)) else { return };
        let payload = mpb::StreamEventsResponse {
            chat_id: chat_id.to_owned(),
            seq,
            event: Some(mpb::stream_events_response::Event::MembershipChanged(mpb::MembershipChanged {
                user_id: user_id.to_owned(),
                change: change as i32,
            })),
        };
        let event = Arc::new(Event::new(chat.into(), payload).concerning(user.into()));
        self.bus.publish(Topic::User(user), event.clone());
        self.bus.publish(Topic::Chat(chat), event);
    }

    /// The chat and the caller's role: NOT_FOUND without the chat,
    /// PERMISSION_DENIED when the caller is not a member.
    async fn member(&self, caller: Uuid, chat_id: Uuid) -> Result<(ChatRow, Role), ChatsError> {
        let access =
            self.store.access(&chat_id.to_string(), &caller.to_string()).await?.ok_or(ChatsError::ChatNotFound)?;
        match access.role {
            Some(role) => Ok((access.chat, role)),
            None => Err(ChatsError::Denied("not a member of this chat")),
        }
    }

    /// As [`Chats::member`], requiring owner or admin (any member of a
    /// direct chat, whose two members are equals).
    async fn manager(&self, caller: Uuid, chat_id: Uuid) -> Result<(ChatRow, Role), ChatsError> {
        let (chat, role) = self.member(caller, chat_id).await?;
        if role.manages() || Kind::parse(&chat.kind) == Kind::Direct {
            Ok((chat, role))
        } else {
            Err(ChatsError::Denied("only the owner or an admin may do this"))
        }
    }

    /// UpdateChat: the fields named by the mask (None: unchanged).
    pub async fn update_chat(
        &self,
        caller: Uuid,
        chat_id: Uuid,
        title: Option<String>,
        description: Option<String>,
        visibility: Option<Visibility>,
    ) -> Result<ChatView, ChatsError> {
        let (chat, role) = self.member(caller, chat_id).await?;
        if Kind::parse(&chat.kind) == Kind::Direct {
            return Err(ChatsError::Precondition("a direct chat has no title, description or visibility to change"));
        }
        if !role.manages() {
            return Err(ChatsError::Denied("only the owner or an admin may do this"));
        }
        let row = self
            .store
            .update_chat(
                &chat.id,
                title.as_deref(),
                description.as_deref(),
                visibility.map(Visibility::as_str),
                now_micros(),
            )
            .await?
            .ok_or(ChatsError::ChatNotFound)?;
        self.evict(&chat.id);
        self.view(caller, row).await
    }

    /// ArchiveChat / UnarchiveChat (owner or admin; either member of a
    /// direct chat). Idempotent.
    pub async fn set_archived(&self, caller: Uuid, chat_id: Uuid, archived: bool) -> Result<ChatView, ChatsError> {
        let (chat, _) = self.manager(caller, chat_id).await?;
        let row = if chat.archive_time.is_some() == archived {
            chat
        } else {
            let now = now_micros();
            self.store.set_archived(&chat.id, archived.then_some(now), now).await?.ok_or(ChatsError::ChatNotFound)?
        };
        self.evict(&row.id);
        self.view(caller, row).await
    }

    /// DeleteChat (owner only): the chat, its memberships, then its messages.
    pub async fn delete_chat(&self, caller: Uuid, chat_id: Uuid) -> Result<(), ChatsError> {
        let (chat, role) = self.member(caller, chat_id).await?;
        if role != Role::Owner {
            return Err(ChatsError::Denied("only the owner may delete a chat"));
        }
        let members = self.store.delete_chat(&chat.id).await?;
        self.evict(&chat.id);
        for user in &members {
            self.announce_membership(&chat.id, user, mpb::MembershipChange::Removed, chat.last_seq);
        }
        // The chat is gone, so its messages are unreachable already; a failed
        // purge only leaves unreachable rows behind (logged).
        if let Err(e) = self.messages.purge_chat(&chat.id).await {
            tracing::warn!(chat_id = %chat.id, error = %e, "purging the messages of a deleted chat failed");
        }
        tracing::info!(chat_id = %chat.id, "chat deleted");
        Ok(())
    }

    /// AddMembers: owner or admin adds anyone; anyone adds themselves to a
    /// public chat (join). Returns the members actually added.
    pub async fn add_members(
        &self,
        caller: Uuid,
        chat_id: Uuid,
        user_ids: Vec<Uuid>,
    ) -> Result<Vec<MemberRow>, ChatsError> {
        let access =
            self.store.access(&chat_id.to_string(), &caller.to_string()).await?.ok_or(ChatsError::ChatNotFound)?;
        let chat = access.chat;
        let joining_self = user_ids.len() == 1 && user_ids[0] == caller;
        let public = Visibility::parse(&chat.visibility) == Visibility::Public;
        match access.role {
            _ if Kind::parse(&chat.kind) == Kind::Direct => {
                return Err(ChatsError::Precondition("a direct chat never changes members"));
            }
            Some(role) if role.manages() => {}
            None if joining_self && public => {}
            Some(_) => return Err(ChatsError::Denied("only the owner or an admin may add members")),
            None => return Err(ChatsError::Denied("not a member of this chat")),
        }
        let mut ids: Vec<Uuid> = Vec::with_capacity(user_ids.len());
        for id in user_ids {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        let others: Vec<String> = ids.iter().filter(|id| **id != caller).map(Uuid::to_string).collect();
        self.require_users(&others).await?;
        let now = now_micros();
        let rows: Vec<MemberRow> = ids
            .iter()
            .map(|u| MemberRow {
                chat_id: chat.id.clone(),
                user_id: u.to_string(),
                role: Role::Member.as_str().to_owned(),
                join_time: now,
            })
            .collect();
        let added =
            self.store.add_members(&chat.id, &rows, self.limits.group_members, now).await?.ok_or_else(|| {
                ChatsError::invalid("user_ids", format!("a chat has at most {} members", self.limits.group_members))
            })?;
        self.evict(&chat.id);
        if !added.is_empty() {
            let user_ids = added.iter().map(|m| m.user_id.clone()).collect();
            self.messages.reset_read_positions(&chat.id, user_ids).await?;
            for m in &added {
                self.announce_membership(&chat.id, &m.user_id, mpb::MembershipChange::Joined, chat.last_seq);
            }
        }
        Ok(added)
    }

    /// RemoveMember: oneself (leave; not the owner), or others by the owner
    /// (anyone) or an admin (plain members).
    pub async fn remove_member(&self, caller: Uuid, chat_id: Uuid, user_id: Uuid) -> Result<(), ChatsError> {
        let (chat, role) = self.member(caller, chat_id).await?;
        if Kind::parse(&chat.kind) == Kind::Direct {
            return Err(ChatsError::Precondition("a direct chat never changes members"));
        }
        let change = if user_id == caller {
            if role == Role::Owner {
                return Err(ChatsError::Precondition(
                    "the owner must hand ownership over (UpdateMember) before leaving",
                ));
            }
            mpb::MembershipChange::Left
        } else {
            let target = self
                .store
                .role(&chat.id, &user_id.to_string())
                .await?
                .ok_or_else(|| ChatsError::MemberNotFound(user_id.to_string()))?;
            let allowed = match role {
                Role::Owner => true,
                Role::Admin => target == Role::Member,
                Role::Member => false,
            };
            if !allowed {
                return Err(ChatsError::Denied("only the owner, or an admin for plain members, may remove members"));
            }
            mpb::MembershipChange::Removed
        };
        let removed = self.store.remove_member(&chat.id, &user_id.to_string(), now_micros()).await?;
        self.evict(&chat.id);
        if !removed {
            return Err(ChatsError::MemberNotFound(user_id.to_string()));
        }
        self.announce_membership(&chat.id, &user_id.to_string(), change, chat.last_seq);
        Ok(())
    }

    /// UpdateMember (owner only): sets a role; OWNER hands ownership over and
    /// makes the previous owner an admin.
    pub async fn update_member(
        &self,
        caller: Uuid,
        chat_id: Uuid,
        user_id: Uuid,
        role: Role,
    ) -> Result<MemberRow, ChatsError> {
        let (chat, caller_role) = self.member(caller, chat_id).await?;
        if Kind::parse(&chat.kind) == Kind::Direct {
            return Err(ChatsError::Precondition("a direct chat has no roles to change"));
        }
        if caller_role != Role::Owner {
            return Err(ChatsError::Denied("only the owner may change roles"));
        }
        if user_id == caller {
            return Err(ChatsError::Precondition("the owner changes role only by making another member owner"));
        }
        let row = self
            .store
            .set_role(&chat.id, &user_id.to_string(), role, now_micros())
            .await?
            .ok_or_else(|| ChatsError::MemberNotFound(user_id.to_string()))?;
        self.evict(&chat.id);
        self.announce_membership(&chat.id, &row.user_id, mpb::MembershipChange::RoleChanged, chat.last_seq);
        if role == Role::Owner {
            self.announce_membership(&chat.id, &caller.to_string(), mpb::MembershipChange::RoleChanged, chat.last_seq);
        }
        Ok(row)
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
    /// Shared with the cache: a hit costs no copy of the chat row.
    pub async fn membership(&self, chat_id: &str, user_id: &str) -> Result<Option<Arc<ChatAccess>>, ChatsError> {
        let Some(cache) = &self.cache else { return Ok(self.store.access(chat_id, user_id).await?.map(Arc::new)) };
        let key = (chat_id.to_owned(), user_id.to_owned());
        let generation = {
            let cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hit) = cache.entries.get(&key) {
                return Ok(Some(hit.clone()));
            }
            cache.generation
        };
        let access = self.store.access(chat_id, user_id).await?.map(Arc::new);
        // Only existing chats are cached: a chat created later needs no eviction.
        if let Some(access) = &access {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.generation == generation {
                if cache.entries.len() >= CACHE_ENTRIES {
                    cache.entries.clear();
                }
                cache.entries.insert(key, access.clone());
            }
        }
        Ok(access)
    }

    /// Internal: every chat of a user.
    pub async fn member_chat_ids(&self, user_id: &str) -> Result<Vec<String>, ChatsError> {
        Ok(self.store.member_chat_ids(user_id).await?)
    }

    /// Internal: newest messages of chats, for ordering by activity
    /// (`(chat_id, last_seq, time)` each, one transaction).
    pub async fn record_activity(&self, activities: &[(String, i64, i64)]) -> Result<(), ChatsError> {
        Ok(self.store.record_activity(activities).await?)
    }
}

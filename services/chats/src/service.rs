//! The chats domain operations over a [`ChatStore`] and the links to the
//! other services. Takes and returns domain types; protobuf appears only
//! where a link carries it (previews and recent messages from the messages
//! service, the committed changes recorded with it).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use natter_bus::{EventBus, Topic};
use natter_kit::cache::Tag;
use natter_kit::id::{ChatId, MessageId, UserId};
use natter_kit::limits::{LOOKUP_USERS_MAX_IDS, Rate, RateLimiter};
use natter_kit::time::{micros, now_micros};
use natter_links::{MessageDirectory, UserDirectory};
use natter_proto::messages::v1 as mpb;

use crate::domain::{
    self, Activity, AssistantReplies, Chat, ChatAccess, ChatCursor, ChatFilter, ChatUpdate, DirectChats, GroupAdds,
    Kind, Limits, Member, MemberCursor, NewChat, PrivacyChoices, PrivacySettings, ReadReceipts, Role, SeverityFilter,
    StoredPrivacy, Visibility,
};
use crate::error::ChatsError;
use crate::store::{Added, Adder, Backoff, Blocked, ChatStore, Checked, Created, Departure, Peers, Pending, Removal};

/// A chat's newest message and the caller's unread count, as the messages
/// service reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preview {
    /// The newest message's seq.
    pub seq: i64,
    /// Its author (a user id as the messages service has it).
    pub author_id: String,
    /// At most 200 characters (the messages service cuts it).
    pub text: String,
    /// µs since the Unix epoch.
    pub send_time: Option<i64>,
    /// Counted up to 1000.
    pub unread_count: i64,
    /// The caller's unread mentions, counted up to 1000 (at most
    /// `unread_count`).
    pub mention_count: i64,
}

/// A chat's message count and highest flag severity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Aggregates {
    /// Live messages.
    pub message_count: i64,
    /// natter.messages.v1.Severity of its worst live flagged message (0:
    /// none).
    pub max_severity: i32,
}

/// A chat as one caller sees it: the chat plus its message preview.
#[derive(Clone, Debug)]
pub struct ChatView {
    /// The chat.
    pub chat: Chat,
    /// None before the first message.
    pub preview: Option<Preview>,
    /// Its message count and highest flag severity.
    pub aggregates: Aggregates,
    /// The caller may see the moderation aggregates: the chat's owner and
    /// admins, and server staff ([`Chats::is_staff`]).
    pub moderator: bool,
}

/// Most store pages one severity-filtered ListChats call reads.
const FLAGGED_SCAN_PAGES: usize = 10;

/// A page of a listing and the keyset position of its last row when more
/// may follow.
#[derive(Clone, Debug)]
pub struct Page<T, C> {
    /// At most the page size.
    pub items: Vec<T>,
    /// Where the next page starts; None on the last page.
    pub next: Option<C>,
}

/// Whether a failed internal call may succeed when repeated: the codes of a
/// callee that is down, overloaded, slow or failed inside, not those of a
/// request it refused.
fn may_be_transient(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(code, Unavailable | DeadlineExceeded | ResourceExhausted | Aborted | Internal | Unknown | Cancelled)
}

/// The links a [`Chats`] needs (for tests that build one).
#[cfg(test)]
pub(crate) type Deps = (Arc<dyn UserDirectory>, Arc<dyn MessageDirectory>);

/// Outbox entries read at a time.
const RELAY_BATCH: u32 = 100;

/// What an earlier release left without a version, which the relay's start
/// versions once ([`Chats::version_old`]).
#[derive(Clone, Copy, Debug)]
enum Old {
    /// Direct chats blocked before closures ([`ChatStore::version_old_blocks`]).
    Blocks,
    /// Chats archived before archived states ([`ChatStore::version_old_archives`]).
    Archives,
}

impl Old {
    /// What its states are, for the logs.
    fn what(self) -> &'static str {
        match self {
            Self::Blocks => "closures of direct chats blocked before closures",
            Self::Archives => "archived states of chats archived before archived states",
        }
    }
}

/// How often the relay looks for outbox entries left behind (by a failed
/// call, a crash, or another replica): one indexed read of an (almost
/// always) empty table.
pub const RELAY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The name under which the store keeps how far the sessions service's log
/// of deleted users is followed ([`Chats::forget_deleted_users`]).
const DELETED_USERS_LOG: &str = "sessions.deleted_users";

/// Deleted users asked for at a time.
const DELETED_USERS_PAGE: i32 = 100;

/// The name under which [`Chats::forget_user`] keeps, as items to retry
/// (one chat id each, [`ChatStore::retry_later`]), the chats it takes
/// deleted user `user` out of or deletes, from before it does so until the
/// messages service has recorded it: an attempt that fails midway leaves
/// them for the next one, which no longer finds them among the user's
/// chats, to wait for.
fn departures_log(user: UserId) -> String {
    format!("{DELETED_USERS_LOG}.departures.{user}")
}

/// How long a deleted user whose removal failed waits to be tried again:
/// the next relay round, then twice as long after each further failure, an
/// hour at most (one that always fails costs a round ever less often).
const RETRY_BACKOFF: Backoff = Backoff { first: RELAY_INTERVAL.as_micros() as i64, max: 3_600_000_000 };

/// Attempts at one RecordChatChanges call before its entry is left for the
/// relay.
const RECORD_ATTEMPTS: u32 = 4;

/// The wait before the second attempt; each further wait is 4 times the
/// last (50, 200, 800 ms: about a second in all, within a client's usual
/// deadline, enough to ride out a messages replica restarting behind a
/// load balancer).
const RECORD_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(50);

/// The refusal of a new direct chat with someone the caller blocks.
const YOU_BLOCKED: &str = "you blocked this user: unblock them (UnblockUser) first";

/// The chats service's domain object; share it behind an `Arc`.
pub struct Chats {
    store: Arc<dyn ChatStore>,
    users: Arc<dyn UserDirectory>,
    messages: Arc<dyn MessageDirectory>,
    limits: Limits,
    /// CreateChat calls per user.
    create_rate: RateLimiter<UserId>,
    change_rate: RateLimiter<UserId>,
    /// (chat, user) -> membership, for the messages service's checks; only
    /// when this is the only chats instance (see [`Chats::with_membership_cache`]).
    cache: Option<Mutex<Cache>>,
    /// Carries each committed change's invalidation to other replicas'
    /// caches ([`Chats::evict`]).
    bus: Arc<dyn EventBus>,
    /// The relay task ([`Chats::start_relay`]), if started.
    relay: Mutex<Option<tokio::task::AbortHandle>>,
    /// Server staff (--staff-user-ids): they see every chat's moderation
    /// aggregates and list any user's chats.
    staff: HashSet<UserId>,
    /// The group-add setting of users who set none.
    default_group_adds: GroupAdds,
    /// The direct-chat setting of users who set none.
    default_direct_chats: DirectChats,
    /// The read-receipts setting of users who set none.
    default_read_receipts: ReadReceipts,
    /// How long a deleted user whose removal failed waits to be tried again.
    retry_backoff: Backoff,
}

/// Most candidates of one FilterPeers call (GetPresence asks about 100 at a
/// time).
pub const PEER_CANDIDATES_MAX: usize = 1000;

/// Most memberships the cache holds before it starts over.
const CACHE_ENTRIES: usize = 100_000;

/// Cached memberships, and a generation that every eviction bumps: a lookup
/// that raced with a change (read the store before it, would cache after
/// its eviction) sees the generation moved and does not cache.
#[derive(Default)]
struct Cache {
    entries: HashMap<(ChatId, UserId), Arc<Membership>>,
    generation: u64,
}

/// A user's membership of a chat as the messages service checks it
/// (CheckMembership): the chat and the user's role, and whether the chat
/// takes new messages from them as far as blocks go.
#[derive(Clone, Debug)]
pub struct Membership {
    /// The chat and the user's role in it (None: not a member).
    pub access: ChatAccess,
    /// A direct chat one of whose two members blocked the other: it takes
    /// no new messages (always false for a group, and for a non-member).
    pub blocked: bool,
}

/// The per-user rates of [`Chats`] (`--create-chat-rate`,
/// `--chat-change-rate`).
#[derive(Clone, Copy, Debug)]
pub struct Rates {
    /// CreateChat calls, retries too.
    pub create: Rate,
    /// Calls that change a chat or its members, repeats too.
    pub change: Rate,
}

impl Rates {
    /// No limit (tests).
    pub const OFF: Self = Self { create: Rate::Off, change: Rate::Off };
}

impl Chats {
    /// The service over `store`, reaching sessions through `users` and
    /// messages through `messages` (which also records and announces every
    /// committed change of membership or chat details), invalidating other
    /// replicas' cached memberships over `bus`.
    pub fn new(
        store: Arc<dyn ChatStore>,
        users: Arc<dyn UserDirectory>,
        messages: Arc<dyn MessageDirectory>,
        bus: Arc<dyn EventBus>,
        limits: Limits,
        rates: Rates,
    ) -> Self {
        Self {
            store,
            users,
            messages,
            limits,
            create_rate: RateLimiter::new("chats created", rates.create),
            change_rate: RateLimiter::new("changes of chats", rates.change),
            cache: None,
            bus,
            relay: Mutex::default(),
            staff: HashSet::new(),
            retry_backoff: RETRY_BACKOFF,
            default_group_adds: GroupAdds::Everyone,
            default_direct_chats: DirectChats::Everyone,
            default_read_receipts: ReadReceipts::Everyone,
        }
    }

    /// Makes `adds` the group-add setting of users who set none
    /// (`--default-group-adds`; else [`GroupAdds::Everyone`]).
    pub fn with_default_group_adds(mut self, adds: GroupAdds) -> Self {
        self.default_group_adds = adds;
        self
    }

    /// Makes `direct` the direct-chat setting of users who set none
    /// (`--default-direct-chats`; else [`DirectChats::Everyone`]).
    pub fn with_default_direct_chats(mut self, direct: DirectChats) -> Self {
        self.default_direct_chats = direct;
        self
    }

    /// Makes `receipts` the read-receipts setting of users who set none
    /// (`--default-read-receipts`; else [`ReadReceipts::Everyone`]).
    pub fn with_default_read_receipts(mut self, receipts: ReadReceipts) -> Self {
        self.default_read_receipts = receipts;
        self
    }

    /// Tries deleted users whose removal failed again after `backoff`
    /// rather than the default (the next relay round, then twice as long
    /// after each failure, an hour at most).
    pub fn with_retry_backoff(mut self, backoff: Backoff) -> Self {
        self.retry_backoff = backoff;
        self
    }

    /// Makes `staff` server staff (granted by configuration only, never by
    /// an RPC: `--staff-user-ids`).
    pub fn with_staff(mut self, staff: impl IntoIterator<Item = UserId>) -> Self {
        self.staff = staff.into_iter().collect();
        self
    }

    /// Whether `user` is server staff.
    pub fn is_staff(&self, user: UserId) -> bool {
        self.staff.contains(&user)
    }

    /// Caches membership checks in memory. Correct only when every change to
    /// chats goes through this instance (the all-in-one without NATS): each
    /// change evicts the chat's entries once committed, so the cache has no
    /// stale window. Replicas on NATS cache in the callers instead
    /// (`natter_links::CachingChatDirectory`, invalidated over the bus).
    pub fn with_membership_cache(mut self) -> Self {
        self.cache = Some(Mutex::new(Cache::default()));
        self
    }

    /// Forgets everything cached about `chat_id`, here and (over the bus)
    /// in every replica's membership cache, returning once the NATS server
    /// has taken the invalidation (see [`EventBus::invalidate`]). Call on
    /// every change, after its commit and before the RPC returns.
    async fn evict(&self, chat_id: ChatId) {
        if let Some(cache) = &self.cache {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.generation += 1;
            cache.entries.retain(|(chat, _), _| *chat != chat_id);
        }
        self.bus.invalidate(vec![Tag::Chat(chat_id.uuid())]).await;
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ChatStore> {
        &self.store
    }

    /// The limits this service enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Stops the relay, writes the chat activity kept in memory and closes
    /// the store. Call once serving has stopped.
    pub async fn close(&self) {
        if let Some(relay) = self.relay.lock().unwrap_or_else(|p| p.into_inner()).take() {
            relay.abort();
        }
        self.store.close().await;
    }

    /// Creates a chat (see CreateChat in chats.proto for the rules); each
    /// call, a retry too, counts against the caller's CreateChat rate.
    /// `new` comes validated from [`crate::grpc::new_chat`].
    #[tracing::instrument(skip_all, fields(caller = %caller))]
    pub async fn create_chat(&self, caller: UserId, new: NewChat) -> Result<ChatView, ChatsError> {
        self.create_rate.check(&caller)?;
        let kind = domain::resolve_kind(new.kind, &new.title, new.others.len())?;
        if kind == Kind::Direct && new.visibility == Visibility::Public {
            return Err(ChatsError::invalid("visibility", "a direct chat is always private"));
        }
        let other = (kind == Kind::Direct).then(|| new.others[0]);

        // Idempotency: the same client-chosen id, or the same direct pair,
        // returns the chat that exists.
        if let Some(existing) = self.existing(caller, new.chat_id, other).await? {
            return self.member_view(caller, existing).await?.ok_or(ChatsError::ChatIdTaken);
        }

        let bots = self.require_users(&new.others).await?;
        if let Some(other) = other {
            self.check_blocks(caller, &[other], true).await?;
            if !self.store.blockers_among(other, &[caller]).await?.is_empty() {
                return Err(ChatsError::Precondition(YOU_BLOCKED));
            }
            self.check_direct_chats(caller, other, &bots).await?;
        }
        if kind == Kind::Group {
            self.check_blocks(caller, &new.others, false).await?;
            self.check_group_adds(caller, &new.others, &bots).await?;
            let joining: Vec<UserId> = std::iter::once(caller).chain(new.others.iter().copied()).collect();
            self.check_group_limit(caller, &joining, &bots).await?;
        }

        let now = now_micros();
        let id = new.chat_id.unwrap_or_else(ChatId::new_v7);
        let chat = Chat {
            id,
            kind,
            title: new.title,
            description: new.description,
            visibility: new.visibility,
            owner_id: caller,
            creator_id: caller,
            member_count: new.others.len() as i64 + 1,
            archive_time: None,
            create_time: now,
            update_time: now,
            last_activity_time: now,
            last_seq: 0,
            last_message_time: None,
            assistant_replies: AssistantReplies::Mentions,
            members_version: 0,
        };
        // A direct chat's two members are equals: no owner to moderate the
        // other's messages or reports, or to delete the chat.
        let creator = if kind == Kind::Direct { Role::Member } else { Role::Owner };
        let members: Vec<Member> = std::iter::once((caller, creator))
            .chain(new.others.iter().map(|u| (*u, Role::Member)))
            .map(|(user_id, role)| Member { chat_id: id, user_id, role, join_time: now })
            .collect();
        match self.store.create_chat(&chat, &members).await? {
            Created::Created => {
                tracing::info!(chat_id = %id, kind = kind.as_str(), members = members.len(), "chat created");
                self.deliver(id).await;
                Ok(ChatView { chat, preview: None, aggregates: Aggregates::default(), moderator: true })
            }
            // Lost a race with an identical request: return its chat.
            Created::Conflict => match self.existing(caller, new.chat_id, other).await? {
                Some(existing) => self.member_view(caller, existing).await?.ok_or(ChatsError::ChatIdTaken),
                None => Err(ChatsError::ChatIdTaken),
            },
            // Deleted after the look-up above (or the caller, mid-request).
            Created::Forgotten(user) => Err(ChatsError::UserNotFound(user.to_string())),
            // Blocked since the checks above: refused as they refuse.
            Created::Blocked(user) if user == caller => Err(ChatsError::Precondition(YOU_BLOCKED)),
            Created::Blocked(user) if kind == Kind::Direct => Err(ChatsError::DirectRefused(user.to_string())),
            Created::Blocked(user) => Err(ChatsError::AddRefused(user.to_string())),
        }
    }

    /// NOT_FOUND naming the first of `ids` that is no user; else the bots
    /// among them (the assistant), whatever the member limit.
    async fn require_users(&self, ids: &[UserId]) -> Result<HashSet<UserId>, ChatsError> {
        let found = self.lookup_kinds(ids.iter().copied()).await?;
        match ids.iter().find(|id| !found.contains_key(id)) {
            Some(missing) => Err(ChatsError::UserNotFound(missing.to_string())),
            None => Ok(found.into_iter().filter_map(|(id, bot)| bot.then_some(id)).collect()),
        }
    }

    /// The users of `ids` that exist, each with whether it is a bot, asked
    /// of the sessions service in calls of at most
    /// [`LOOKUP_USERS_MAX_IDS`] ids.
    async fn lookup_kinds(&self, ids: impl Iterator<Item = UserId>) -> Result<HashMap<UserId, bool>, ChatsError> {
        let ids: Vec<String> = ids.map(|u| u.to_string()).collect();
        let bot = natter_proto::sessions::v1::UserKind::Bot as i32;
        let mut found = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(LOOKUP_USERS_MAX_IDS) {
            for user in self.users.lookup_users(chunk.to_vec()).await? {
                if let Ok(id) = uuid::Uuid::try_parse(&user.id) {
                    found.insert(UserId(id), user.kind == bot);
                }
            }
        }
        Ok(found)
    }

    /// The chat an idempotent CreateChat should return, if any: the direct
    /// chat of the caller and `other`, or the caller's chat of `chat_id`
    /// (ALREADY_EXISTS when someone else created it).
    async fn existing(
        &self,
        caller: UserId,
        chat_id: Option<ChatId>,
        other: Option<UserId>,
    ) -> Result<Option<Chat>, ChatsError> {
        if let Some(other) = other
            && let Some(chat) = self.store.direct_chat(caller, other).await?
        {
            return Ok(Some(chat));
        }
        if let Some(id) = chat_id
            && let Some(chat) = self.store.chat(id).await?
        {
            if chat.creator_id != caller {
                return Err(ChatsError::ChatIdTaken);
            }
            return Ok(Some(chat));
        }
        Ok(None)
    }

    /// Records `chat_id`'s outbox entries with the messages service, oldest
    /// first, each removed once recorded: the messages service gives every
    /// change the chat's next change number, keeps it in the chat's change
    /// log and announces it to the chat's streams (and a member's own); a
    /// join also resets the joiner's read position. Returns false when an
    /// entry is left for later (the entries after it wait behind it, so the
    /// changes are recorded in the order they were committed).
    ///
    /// Every operation calls this after its commit (so, within a second or
    /// so, its changes are on the streams before it answers), and so does
    /// the relay ([`Chats::relay`]) for whatever is left. Each entry's calls
    /// carry its own idempotency key, so a retry after a lost answer, two
    /// callers delivering the same entry, or a redelivery after a crash
    /// record nothing twice (as long as the chat's change log still holds
    /// the entry's numbers: its newest 1,000 changes).
    ///
    /// An entry is retried on a failure that may be transient (UNAVAILABLE,
    /// DEADLINE_EXCEEDED, ...; up to [`RECORD_ATTEMPTS`] attempts), then left
    /// in the outbox for the relay (logged at warn). An entry the messages
    /// service refuses outright (INVALID_ARGUMENT, ...) is dropped, logged at
    /// error: repeating it would block the chat's later changes for good.
    /// Neither failure reaches the caller: its change is committed, and an
    /// error would only make it retry into a no-op. (BlockUser,
    /// UnblockUser, RemoveMember, UpdateMember, ArchiveChat and
    /// UnarchiveChat are the exception: their callers hear of an entry left
    /// for later, see `deliver_now`, as a block, a departure, a loss of
    /// rights or an archive must hold for writes on their way once it
    /// answers.)
    #[tracing::instrument(skip_all, fields(chat_id = %chat_id))]
    async fn deliver(&self, chat_id: ChatId) -> bool {
        loop {
            let pending = match self.store.pending(Some(chat_id), RELAY_BATCH).await {
                Ok(pending) => pending,
                Err(e) => {
                    tracing::warn!(chat_id = %chat_id, error = %e, "reading the chat's outbox failed; the relay retries");
                    return false;
                }
            };
            let full = pending.len() == RELAY_BATCH as usize;
            for entry in pending {
                if !self.record(&entry).await {
                    return false;
                }
                if let Err(e) = self.store.forget_pending(&entry).await {
                    // Recorded, so a second delivery records nothing again.
                    tracing::warn!(chat_id = %chat_id, error = %e, "removing a recorded outbox entry failed");
                    return false;
                }
            }
            if !full {
                return true;
            }
        }
    }

    /// One outbox entry to the messages service (see [`Chats::deliver`]):
    /// true when recorded or dropped, false when left for later.
    async fn record(&self, entry: &Pending) -> bool {
        let chat = entry.chat_id.to_string();
        let mut wait = RECORD_RETRY_FIRST;
        let mut attempt = 1;
        loop {
            match self.messages.record_chat_changes(&chat, entry.changes.clone(), &entry.key, entry.change_time).await {
                Ok(_) => return true,
                Err(e) if may_be_transient(e.code()) && attempt < RECORD_ATTEMPTS => {
                    tracing::debug!(chat_id = %chat, attempt, error = %e, "recording chat changes: retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 4;
                    attempt += 1;
                }
                Err(e) if may_be_transient(e.code()) => {
                    tracing::warn!(
                        chat_id = %chat, changes = entry.changes.len(), attempts = attempt, error = %e,
                        "recording committed chat changes with the messages service failed; kept for the relay"
                    );
                    return false;
                }
                Err(e) => {
                    tracing::error!(
                        chat_id = %chat, changes = entry.changes.len(), error = %e,
                        "the messages service refused committed chat changes; dropped"
                    );
                    return true;
                }
            }
        }
    }

    /// The relay: delivers what the outbox holds of every chat (left by a
    /// failed call, a crash, or another replica's), each chat's in order
    /// (`Chats::deliver`), then purges the messages of deleted chats
    /// whose purge failed (`Chats::purge`); returns how many chats are
    /// done. Runs at start and every [`RELAY_INTERVAL`]
    /// ([`Chats::start_relay`]).
    pub async fn relay(&self) -> usize {
        let pending = match self.store.pending(None, RELAY_BATCH).await {
            Ok(pending) => pending,
            Err(e) => {
                tracing::warn!(error = %e, "reading the outbox failed");
                return 0;
            }
        };
        let chats: std::collections::BTreeSet<ChatId> = pending.iter().map(|p| p.chat_id).collect();
        let mut done = 0;
        for chat in chats {
            if self.deliver(chat).await {
                done += 1;
            }
        }
        if done > 0 {
            tracing::info!(chats = done, "the relay recorded outbox entries left behind");
        }
        done += self.forget_deleted_users().await;
        // Deleted chats whose messages are still to purge.
        match self.store.chats_to_purge(RELAY_BATCH).await {
            Ok(due) => {
                for chat in due {
                    if self.purge(chat).await {
                        tracing::info!(chat_id = %chat, "the relay purged a deleted chat's messages");
                        done += 1;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the chats to purge failed"),
        }
        done
    }

    /// Starts the relay ([`Chats::relay`]) now and every `every` after, on
    /// the current tokio runtime, until [`Chats::close`] (or the last
    /// `Arc` is dropped). First, once, it puts in the outbox the closures
    /// of direct chats blocked under an earlier release
    /// ([`ChatStore::version_old_blocks`]) and the archived states of chats
    /// archived under one ([`ChatStore::version_old_archives`]), which its
    /// first round records.
    pub fn start_relay(self: &Arc<Self>, every: std::time::Duration) {
        let chats = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            if let Some(chats) = chats.upgrade() {
                chats.version_old(Old::Blocks).await;
                chats.version_old(Old::Archives).await;
            }
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(chats) = chats.upgrade() else { return };
                chats.relay().await;
            }
        });
        let previous = self.relay.lock().unwrap_or_else(|p| p.into_inner()).replace(task.abort_handle());
        if let Some(previous) = previous {
            previous.abort();
        }
    }

    /// Puts in the outbox, for the relay to record, the closures of the
    /// direct chats blocked under a release before closures existed
    /// ([`ChatStore::version_old_blocks`]), or the archived states of the
    /// chats archived under a release before those
    /// ([`ChatStore::version_old_archives`]), so that their blocks (their
    /// archives) hold for writes on their way as new ones do. Once at the
    /// relay's start; a failure is logged (those chats' writes are still
    /// checked as before).
    async fn version_old(&self, old: Old) {
        let mut total = 0;
        loop {
            let found = match old {
                Old::Blocks => self.store.version_old_blocks(now_micros(), RELAY_BATCH).await,
                Old::Archives => self.store.version_old_archives(now_micros(), RELAY_BATCH).await,
            };
            match found {
                Ok(found) => {
                    total += found;
                    if found < RELAY_BATCH as usize {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, what = old.what(), "putting old states in the outbox failed");
                    return;
                }
            }
        }
        if total > 0 {
            tracing::info!(chats = total, what = old.what(), "old states put in the outbox");
        }
    }

    /// The chat and the caller's access: NOT_FOUND without the chat.
    async fn access(&self, caller: UserId, chat_id: ChatId) -> Result<ChatAccess, ChatsError> {
        self.store.access(chat_id, caller).await?.ok_or(ChatsError::ChatNotFound)
    }

    /// The chat and the caller's role: NOT_FOUND without the chat,
    /// PERMISSION_DENIED when the caller is not a member.
    async fn member(&self, caller: UserId, chat_id: ChatId) -> Result<(Chat, Role), ChatsError> {
        let access = self.access(caller, chat_id).await?;
        match access.role {
            Some(role) => Ok((access.chat, role)),
            None => Err(ChatsError::Denied("not a member of this chat")),
        }
    }

    /// As [`Chats::member`], requiring owner or admin (any member of a
    /// direct chat, whose two members are equals).
    async fn manager(&self, caller: UserId, chat_id: ChatId) -> Result<(Chat, Role), ChatsError> {
        let (chat, role) = self.member(caller, chat_id).await?;
        if role.manages() || chat.kind == Kind::Direct {
            Ok((chat, role))
        } else {
            Err(ChatsError::Denied("only the owner or an admin may do this"))
        }
    }

    /// UpdateChat: the fields `update` names.
    pub async fn update_chat(
        &self,
        caller: UserId,
        chat_id: ChatId,
        update: ChatUpdate,
    ) -> Result<ChatView, ChatsError> {
        self.change_rate.check(&caller)?;
        let (chat, role) = self.member(caller, chat_id).await?;
        if chat.kind == Kind::Direct {
            // An assistant chat is its person's alone: they may name it.
            let title_only =
                update.title.is_some() && update == ChatUpdate { title: update.title.clone(), ..ChatUpdate::default() };
            if !title_only || !self.nobody_else_keeps(chat.id, caller).await? {
                return Err(ChatsError::Precondition(
                    "a direct chat has no title, description or visibility to change (an assistant chat: its title only)",
                ));
            }
        } else if !role.manages() {
            return Err(ChatsError::Denied("only the owner or an admin may do this"));
        }
        // Checked again as it is written (a removal or a demotion may
        // commit meanwhile).
        let chat = match self.store.update_chat(chat.id, &update, now_micros(), Some(caller)).await? {
            None => return Err(ChatsError::ChatNotFound),
            Some(Checked::Done(chat)) => chat,
            Some(_) => return Err(ChatsError::Denied("only the owner or an admin may do this")),
        };
        self.evict(chat.id).await;
        self.deliver(chat.id).await;
        self.view(caller, ChatAccess { chat, role: Some(role) }).await
    }

    /// TitleChat (internal): gives a chat without a title (an assistant's
    /// direct chat) `title`, checked as UpdateChat checks one, made from
    /// the prompt `source` (None: none; see [`Chats::untitle_chat`]); a
    /// chat with a title keeps it and is answered as it is.
    pub async fn title_chat(
        &self,
        chat_id: ChatId,
        title: &str,
        source: Option<MessageId>,
    ) -> Result<Chat, ChatsError> {
        let title = title.trim();
        domain::check_title(title, &self.limits).map_err(|e| ChatsError::invalid("title", e))?;
        if title.is_empty() {
            return Err(ChatsError::invalid("title", "must not be empty"));
        }
        let (chat, changed) =
            self.store.title_chat(chat_id, title, source, now_micros()).await?.ok_or(ChatsError::ChatNotFound)?;
        if changed {
            self.evict(chat.id).await;
            self.deliver(chat.id).await;
        }
        Ok(chat)
    }

    /// UntitleChat (internal): takes back the title TitleChat made from the
    /// prompt `source`, deleted since (privacy audit M2: the title restates
    /// the prompt); a title set otherwise stays. Returns whether it
    /// changed anything.
    pub async fn untitle_chat(&self, chat_id: ChatId, source: MessageId) -> Result<bool, ChatsError> {
        let Some(chat) = self.store.untitle_chat(chat_id, source, now_micros()).await? else { return Ok(false) };
        tracing::info!(chat_id = %chat.id, "an automatic title taken back with its prompt");
        self.evict(chat.id).await;
        self.deliver(chat.id).await;
        Ok(true)
    }

    /// ArchiveChat / UnarchiveChat (owner or admin; either member of a
    /// direct chat). Idempotent. It answers once the messages service has
    /// recorded the chat's archived state, which the writes that add to the
    /// chat read (a send, an edit, a reaction added, a pin): none whose
    /// membership check came before the archive is stored after it answers.
    ///
    /// Errors: as ArchiveChat in chats.proto, and UNAVAILABLE when the
    /// change is committed but could not be recorded yet (the relay
    /// records it later; a retry, which changes nothing more, records it
    /// now).
    pub async fn set_archived(&self, caller: UserId, chat_id: ChatId, archived: bool) -> Result<ChatView, ChatsError> {
        self.change_rate.check(&caller)?;
        let (chat, role) = self.manager(caller, chat_id).await?;
        let changes = chat.archive_time.is_some() != archived;
        let chat = if changes {
            let now = now_micros();
            // Checked again as it is written, as UpdateChat is.
            match self.store.set_archived(chat.id, archived.then_some(now), now, Some(caller)).await? {
                None => return Err(ChatsError::ChatNotFound),
                Some(Checked::Done(chat)) => chat,
                Some(_) => return Err(ChatsError::Denied("only the owner or an admin may do this")),
            }
        } else {
            chat
        };
        self.evict(chat.id).await;
        // A repeat too: a retry after UNAVAILABLE records what is left.
        self.deliver_now(chat.id).await?;
        self.view(caller, ChatAccess { chat, role: Some(role) }).await
    }

    /// DeleteChat (owner only): the chat, its memberships, then its messages.
    /// A direct chat has no owner (FAILED_PRECONDITION): deleting it would
    /// take the other member's history too; it can be archived. A direct
    /// chat with a bot (an assistant chat) or with a deleted user its person
    /// may delete: nobody else's history goes with it. The caller's role is
    /// checked again in the delete's write: one who handed the group over,
    /// or was demoted or removed, since the check deletes nothing
    /// (PERMISSION_DENIED). It answers once the messages service has purged
    /// the chat, which leaves a mark every send's write reads: no message
    /// is stored in the chat after it answers, one already past its
    /// membership check included.
    ///
    /// Errors: as DeleteChat in chats.proto, and UNAVAILABLE when the chat
    /// is deleted but its purge could not be done yet (the relay does it
    /// later; a retry does it now, then answers NOT_FOUND as for any
    /// deleted chat).
    pub async fn delete_chat(&self, caller: UserId, chat_id: ChatId) -> Result<(), ChatsError> {
        const OWNER_ONLY: &str = "only the owner may delete a chat";
        self.change_rate.check(&caller)?;
        let (chat, role) = match self.member(caller, chat_id).await {
            Ok(found) => found,
            // Deleted already (a retry after UNAVAILABLE, or a delete that
            // raced this one): not found, once its purge is done.
            Err(ChatsError::ChatNotFound) => {
                if self.store.purge_due(chat_id).await? {
                    self.purge_now(chat_id).await?;
                }
                return Err(ChatsError::ChatNotFound);
            }
            Err(e) => return Err(e),
        };
        if chat.kind == Kind::Direct {
            if !self.nobody_else_keeps(chat.id, caller).await? {
                return Err(ChatsError::Precondition("a direct chat has no owner to delete it: archive it instead"));
            }
        } else if role != Role::Owner {
            return Err(ChatsError::Denied(OWNER_ONLY));
        }
        match self.remove_chat(chat.id, Some(caller)).await? {
            Checked::Done(()) => Ok(()),
            Checked::Actor(None) => Err(ChatsError::Denied("not a member of this chat")),
            _ => Err(ChatsError::Denied(OWNER_ONLY)),
        }
    }

    /// Deletes chat `chat`, its memberships, then its messages; with `by`,
    /// only if that user may still ([`ChatStore::delete_chat`]), else
    /// nothing is written and the refusal is answered.
    ///
    /// Errors: UNAVAILABLE when the chat is deleted but its messages could
    /// not be purged yet ([`Chats::purge_now`]).
    async fn remove_chat(&self, chat: ChatId, by: Option<UserId>) -> Result<Checked<()>, ChatsError> {
        let members = match self.store.delete_chat(chat, now_micros(), by).await? {
            Checked::Done(members) => members,
            refused => return Ok(refused.map(drop)),
        };
        self.evict(chat).await;
        tracing::debug!(chat_id = %chat, members = members.len(), "chat's members removed");
        // The chat is gone, so its messages are unreachable already (its id
        // is never given to another chat); a purge that fails now is
        // retried by the relay.
        self.purge_now(chat).await?;
        tracing::info!(chat_id = %chat, "chat deleted");
        Ok(Checked::Done(()))
    }

    /// Takes the users the sessions service deleted (guests long gone,
    /// accounts deleted by their owner) out of their chats
    /// ([`Chats::forget_user`]), following its log (`ListDeletedUsers`)
    /// from the position kept in the store, one page a round; returns how
    /// many were taken out. Run by the relay. A user whose removal fails is
    /// kept apart ([`ChatStore::retry_later`]) and tried again at the start
    /// of each later round, so that it does not hold up those deleted after
    /// it; when even that cannot be stored (the database is down), the rest
    /// waits for the next round. Replicas may follow at once: forgetting a
    /// user twice changes nothing the second time.
    pub async fn forget_deleted_users(&self) -> usize {
        let mut forgotten = self.forget_retries().await;
        let after = match self.store.followed(DELETED_USERS_LOG).await {
            Ok(after) => after,
            Err(e) => {
                tracing::warn!(error = %e, "reading how far deleted users are followed failed");
                return forgotten;
            }
        };
        // One page a round: the rest of the relay's work is not held up by
        // a long log (the first start after an upgrade).
        let page = match self.users.deleted_users(after, DELETED_USERS_PAGE).await {
            Ok(page) => page,
            // A stand-in directory (tests) keeps no log.
            Err(e) if e.code() == tonic::Code::Unimplemented => return forgotten,
            Err(e) => {
                tracing::warn!(error = %e, "listing deleted users failed; will retry");
                return forgotten;
            }
        };
        for deleted in &page {
            match uuid::Uuid::try_parse(&deleted.user_id) {
                Ok(user) => match self.forget_user(UserId(user)).await {
                    Ok(()) => forgotten += 1,
                    Err(e) => {
                        tracing::warn!(user_id = %user, error = %e, "taking a deleted user out of their chats failed; will retry it apart");
                        if let Err(e) = self
                            .store
                            .retry_later(DELETED_USERS_LOG, &user.to_string(), now_micros(), self.retry_backoff)
                            .await
                        {
                            tracing::warn!(error = %e, "keeping a deleted user to retry failed; will retry the log from here");
                            break;
                        }
                    }
                },
                Err(_) => tracing::warn!(user_id = %deleted.user_id, "a deleted user's id is no UUID; skipped"),
            }
            if let Err(e) = self.store.follow_to(DELETED_USERS_LOG, deleted.position).await {
                tracing::warn!(error = %e, "recording how far deleted users are followed failed; will retry");
                break;
            }
        }
        forgotten
    }

    /// Tries again the deleted users whose removal failed in an earlier
    /// round (a page of them); returns how many are out now.
    async fn forget_retries(&self) -> usize {
        let waiting = match self.store.retries(DELETED_USERS_LOG, now_micros(), DELETED_USERS_PAGE as u32).await {
            Ok(waiting) => waiting,
            Err(e) => {
                tracing::warn!(error = %e, "reading the deleted users to retry failed");
                return 0;
            }
        };
        let mut forgotten = 0;
        for item in waiting {
            // Only UUIDs are kept (see forget_deleted_users).
            let Ok(user) = uuid::Uuid::try_parse(&item) else { continue };
            if let Err(e) = self.forget_user(UserId(user)).await {
                tracing::warn!(user_id = %user, error = %e, "taking a deleted user out of their chats failed again; will retry");
                // Later, and behind the others due: they take turns.
                if let Err(e) = self.store.retry_later(DELETED_USERS_LOG, &item, now_micros(), self.retry_backoff).await
                {
                    tracing::warn!(user_id = %user, error = %e, "recording a retry's failure failed");
                }
                continue;
            }
            match self.store.retried(DELETED_USERS_LOG, &item).await {
                Ok(()) => forgotten += 1,
                Err(e) => tracing::warn!(user_id = %user, error = %e, "recording a retry done failed; will repeat it"),
            }
        }
        forgotten
    }

    /// Takes deleted user `user` out of every chat: an assistant chat (a
    /// direct chat with a bot), a direct chat whose other member is deleted
    /// too, and a group no other person is in (bots and deleted users are
    /// no people) are deleted with their messages; a group it owned passes
    /// to its longest-standing admin, else member, among the people, before
    /// it leaves (members see it leave, as if it had); a direct chat
    /// with a person stays as it is, the other person's history with it.
    /// First the user is recorded as forgotten, so that no request that
    /// checked it before its deletion makes it a member again afterwards
    /// ([`ChatStore::record_forgotten`]). Each chat's streams hear that the
    /// account is gone (`user_updated.deleted`) before it leaves the chat:
    /// the sessions service announced it when it deleted the account, but
    /// that announcement is lost with a replica that stops between its
    /// commit and its publish, or with a bus connection that drops (the
    /// presence topic is never re-read), while this log is followed until
    /// done. Streams drop the copy they have. Once it is out of every chat, the
    /// messages service forgets it too (`ForgetUser`: its last-seen time,
    /// read positions and mention rows); should that fail, so does this, and
    /// the relay retries it. Repeatable after a failure midway.
    /// Before that, it waits until the messages service has recorded each
    /// departure (and purged each chat deleted), as RemoveMember and
    /// DeleteChat do before they answer, those of an earlier attempt that
    /// failed midway included (kept under `departures_log`): a message of
    /// the user's already past its membership check is refused in its write
    /// rather than stored after the user left, and the user is forgotten
    /// only once out of every chat as far as the messages service knows.
    /// While one cannot be recorded (UNAVAILABLE), this fails and the relay
    /// retries.
    /// A user made owner after its role was read here stays in that group
    /// (the store never removes the owner) and this fails, so that the
    /// retry hands the group over.
    pub async fn forget_user(&self, user: UserId) -> Result<(), ChatsError> {
        self.store.record_forgotten(user, now_micros()).await?;
        let departures = departures_log(user);
        let deleted = Arc::new(natter_bus::Event::user_deleted(user));
        for chat_id in self.store.member_chat_ids(user, false).await? {
            self.bus.publish(Topic::Chat(chat_id.uuid()), deleted.clone());
            let Some(ChatAccess { chat, role: Some(role) }) = self.store.access(chat_id, user).await? else { continue };
            if chat.kind == Kind::Direct {
                if self.nobody_else_keeps(chat.id, user).await? {
                    self.note_departure(&departures, chat.id).await?;
                    self.remove_chat(chat.id, None).await?;
                }
                continue;
            }
            let members = self.store.members(chat.id, None, self.limits.group_members as u32 + 1).await?;
            let others: Vec<&Member> = members.iter().filter(|m| m.user_id != user).collect();
            // Bots (the assistant) and users deleted too neither keep a
            // group nor inherit it.
            let people = self.people_among(others.iter().map(|m| m.user_id)).await?;
            let heirs: Vec<&Member> = others.into_iter().filter(|m| people.contains(&m.user_id)).collect();
            let Some(&first) = heirs.first() else {
                self.note_departure(&departures, chat.id).await?;
                self.remove_chat(chat.id, None).await?;
                continue;
            };
            let now = now_micros();
            if role == Role::Owner {
                let heir = heirs.iter().find(|m| m.role == Role::Admin).copied().unwrap_or(first);
                match self.store.set_role(chat.id, user, heir.user_id, Role::Owner, now).await? {
                    Checked::Done(_) => {}
                    // The heir left meanwhile: the next round reads the
                    // members again.
                    Checked::NotMember => return Err(ChatsError::MemberNotFound(heir.user_id.to_string())),
                    // Handed over meanwhile (by a replica forgetting it too):
                    // the next round reads its role again.
                    Checked::Actor(_) | Checked::Target(_) => {
                        return Err(ChatsError::Precondition("a deleted owner's group changed hands meanwhile"));
                    }
                }
            }
            // As an admin or a member only: made owner since its role was
            // read above, it stays, and the next round hands the group over.
            let leave = Removal { departure: Departure::Left, targets: &[Role::Admin, Role::Member], actor: None };
            self.note_departure(&departures, chat.id).await?;
            let left = self.store.remove_member(chat.id, user, leave, now).await?;
            self.evict(chat.id).await;
            self.deliver(chat.id).await;
            if let Checked::Actor(_) | Checked::Target(_) = left {
                return Err(ChatsError::Precondition("a deleted user was made owner meanwhile"));
            }
            tracing::info!(chat_id = %chat.id, user_id = %user, "a deleted user left the chat");
        }
        self.await_departures(&departures).await?;
        self.messages.forget_user(&user.to_string()).await?;
        Ok(())
    }

    /// Keeps `chat` under `departures` ([`departures_log`]) before
    /// [`Chats::forget_user`] takes its user out of it or deletes it, so
    /// that an attempt that fails after that still waits for it.
    async fn note_departure(&self, departures: &str, chat: ChatId) -> Result<(), ChatsError> {
        Ok(self.store.retry_later(departures, &chat.to_string(), now_micros(), self.retry_backoff).await?)
    }

    /// Waits until the messages service has recorded every chat kept under
    /// `departures` ([`Chats::note_departure`]): its outbox (the
    /// departure and its members version) delivered and, for a chat
    /// deleted, its purge done; each is forgotten once it is.
    ///
    /// Errors: UNAVAILABLE when one could not be recorded yet (the rest
    /// stay kept for the next attempt).
    async fn await_departures(&self, departures: &str) -> Result<(), ChatsError> {
        loop {
            let kept = self.store.retries(departures, i64::MAX, RELAY_BATCH).await?;
            if kept.is_empty() {
                return Ok(());
            }
            for item in kept {
                // Only chat ids are kept (see note_departure).
                if let Ok(chat) = uuid::Uuid::try_parse(&item).map(ChatId) {
                    self.deliver_now(chat).await?;
                    if self.store.purge_due(chat).await? {
                        self.purge_now(chat).await?;
                    }
                }
                self.store.retried(departures, &item).await?;
            }
        }
    }

    /// Which of `users` are people: users that exist and are no bots.
    async fn people_among(&self, users: impl Iterator<Item = UserId>) -> Result<HashSet<UserId>, ChatsError> {
        let found = self.lookup_kinds(users).await?;
        Ok(found.into_iter().filter_map(|(id, bot)| (!bot).then_some(id)).collect())
    }

    /// Whether nobody but `caller` keeps direct chat `chat`: its other
    /// member is a bot user (an assistant chat), or a user since deleted (a
    /// guest long gone).
    async fn nobody_else_keeps(&self, chat: ChatId, caller: UserId) -> Result<bool, ChatsError> {
        let members = self.store.members(chat, None, 2).await?;
        let Some(other) = members.iter().find(|m| m.user_id != caller) else { return Ok(false) };
        Ok(self.people_among(std::iter::once(other.user_id)).await?.is_empty())
    }

    /// [`Chats::purge`] for a call that answers only once it is done: so a
    /// send whose membership was checked before the chat's deletion, still
    /// on its way to its write, is refused there
    /// (natter_messages' `MessageStore::purge_chat` marks the chat).
    ///
    /// Errors: UNAVAILABLE when the purge could not be done (the chat is
    /// deleted, and the relay purges it later; a retry of the call purges
    /// it now).
    async fn purge_now(&self, chat: ChatId) -> Result<(), ChatsError> {
        if !self.purge(chat).await {
            return Err(ChatsError::Upstream(tonic::Status::unavailable(
                "deleted, but the messages service has not purged the chat yet: retry to be sure no message already \
                 on its way is stored in it",
            )));
        }
        Ok(())
    }

    /// Purges a deleted chat's messages from the messages service, after
    /// every member's removal is recorded (so that each member's streams
    /// stop following the chat first), and records it done. False when it
    /// is left for the relay to retry (logged).
    async fn purge(&self, chat: ChatId) -> bool {
        if !self.deliver(chat).await {
            return false;
        }
        if let Err(e) = self.messages.purge_chat(&chat.to_string()).await {
            tracing::warn!(chat_id = %chat, error = %e, "purging the messages of a deleted chat failed; will retry");
            return false;
        }
        if let Err(e) = self.store.chat_purged(chat, now_micros()).await {
            tracing::warn!(chat_id = %chat, error = %e, "recording a purge failed; will purge again");
            return false;
        }
        true
    }

    /// AddMembers: owner or admin adds anyone; anyone adds themselves to a
    /// public chat (join), and a member adding only themselves (a join
    /// retried) is answered with nobody added. `user_ids` come without
    /// repeats, at most as many as a chat may have members. Returns the
    /// members actually added.
    pub async fn add_members(
        &self,
        caller: UserId,
        chat_id: ChatId,
        user_ids: Vec<UserId>,
    ) -> Result<Vec<Member>, ChatsError> {
        self.change_rate.check(&caller)?;
        let ChatAccess { chat, role } = self.access(caller, chat_id).await?;
        let joining_self = user_ids == [caller];
        // Checked again in the add's transaction (a removal, a demotion or
        // the chat made private may commit meanwhile).
        let by = match role {
            _ if chat.kind == Kind::Direct => {
                return Err(ChatsError::Precondition("a direct chat never changes members"));
            }
            Some(role) if role.manages() => Adder::Manager(caller),
            None if joining_self && chat.visibility == Visibility::Public => Adder::Joiner,
            // A member adding only themselves (a join retried, its answer
            // lost): already in, nothing to add.
            Some(_) if joining_self => return Ok(Vec::new()),
            Some(_) => return Err(ChatsError::Denied("only the owner or an admin may add members")),
            None => return Err(ChatsError::Denied("not a member of this chat")),
        };
        let others: Vec<UserId> = user_ids.iter().copied().filter(|id| *id != caller).collect();
        let bots = self.require_users(&others).await?;
        // Members already (a retried add, a join of one's own chat) are not
        // added again, whatever their setting or number of groups says now.
        let members: HashSet<UserId> = self.store.members_among(chat.id, &user_ids).await?.into_iter().collect();
        let joining: Vec<UserId> = user_ids.iter().copied().filter(|u| !members.contains(u)).collect();
        let others: Vec<UserId> = joining.iter().copied().filter(|u| *u != caller).collect();
        self.check_blocks(caller, &others, false).await?;
        self.check_group_adds(caller, &others, &bots).await?;
        self.check_group_limit(caller, &joining, &bots).await?;
        let now = now_micros();
        let members: Vec<Member> = user_ids
            .into_iter()
            .map(|user_id| Member { chat_id: chat.id, user_id, role: Role::Member, join_time: now })
            .collect();
        let added = match self.store.add_members(chat.id, by, &members, &self.limits, now).await? {
            Added::Added(added) => added,
            Added::TooMany(count) => return Err(self.limits.check_members("user_ids", count).unwrap_err().into()),
            // Deleted after the look-up above (or the caller, mid-request).
            Added::Forgotten(user) => return Err(ChatsError::UserNotFound(user.to_string())),
            // Blocked the caller since the check above: refused as it refuses.
            Added::Blocked(user) => return Err(ChatsError::AddRefused(user.to_string())),
            Added::ChatGone => return Err(ChatsError::ChatNotFound),
            Added::Refused if by == Adder::Joiner => return Err(ChatsError::Denied("not a member of this chat")),
            Added::Refused => return Err(ChatsError::Denied("only the owner or an admin may add members")),
        };
        self.evict(chat.id).await;
        if !added.is_empty() {
            self.deliver(chat.id).await;
        }
        Ok(added)
    }

    /// [`ChatsError::AddRefused`] naming the first of `users` (in their
    /// order) whose privacy setting does not let `caller` add them to a
    /// group: [`GroupAdds::Nobody`], or [`GroupAdds::Peers`] while they
    /// share no chat with `caller`. Users who set none have the default
    /// (`--default-group-adds`), but `bots` (the assistant, which never
    /// signs in to set one) anyone may add. Two reads at most, whatever
    /// the number of users. Checked before the add is written, so a
    /// setting changed in between is the add's to miss, as in the apps
    /// that have one.
    async fn check_group_adds(
        &self,
        caller: UserId,
        users: &[UserId],
        bots: &HashSet<UserId>,
    ) -> Result<(), ChatsError> {
        if users.is_empty() {
            return Ok(());
        }
        let set = self.set_among(users, |choices| choices.group_adds).await?;
        let default = |user: &UserId| if bots.contains(user) { GroupAdds::Everyone } else { self.default_group_adds };
        let adds = |user: &UserId| set.get(user).copied().unwrap_or_else(|| default(user));
        let mut refused: HashSet<UserId> = users.iter().copied().filter(|u| adds(u) == GroupAdds::Nobody).collect();
        let peers_only: Vec<UserId> = users.iter().copied().filter(|u| adds(u) == GroupAdds::Peers).collect();
        if !peers_only.is_empty() {
            let peers: HashSet<UserId> =
                self.store.peers_among(caller, &peers_only, Peers::Privacy).await?.into_iter().collect();
            refused.extend(peers_only.into_iter().filter(|user| !peers.contains(user)));
        }
        match users.iter().find(|user| refused.contains(user)) {
            Some(user) => Err(ChatsError::AddRefused(user.to_string())),
            None => Ok(()),
        }
    }

    /// [`ChatsError::GroupLimit`] naming the first of `users` (in their
    /// order), bots aside, who is a member of as many groups as one user
    /// may be ([`crate::domain::Limits::groups_per_user`]): adding them to
    /// a group would take them past it. One read, whatever the number of
    /// users. Checked before the add is written: adds racing in other chats
    /// may each pass it, so a user can end up past the limit by the number
    /// of adds that raced, never by more.
    async fn check_group_limit(
        &self,
        caller: UserId,
        users: &[UserId],
        bots: &HashSet<UserId>,
    ) -> Result<(), ChatsError> {
        let people: Vec<UserId> = users.iter().copied().filter(|u| !bots.contains(u)).collect();
        if people.is_empty() {
            return Ok(());
        }
        let limit = self.limits.groups_per_user;
        let full: HashSet<UserId> = self.store.users_in_groups(&people, limit).await?.into_iter().collect();
        match people.iter().find(|u| full.contains(u)) {
            Some(user) => Err(ChatsError::GroupLimit { user: user.to_string(), limit, yourself: *user == caller }),
            None => Ok(()),
        }
    }

    /// Refuses a new direct chat with (`direct`), or a group add of, any
    /// of `users` who blocked `caller`, as their privacy settings would
    /// refuse it ([`ChatsError::DirectRefused`], [`ChatsError::AddRefused`]
    /// naming the first in order), so that a block is not told from a
    /// setting. One read.
    async fn check_blocks(&self, caller: UserId, users: &[UserId], direct: bool) -> Result<(), ChatsError> {
        if users.is_empty() {
            return Ok(());
        }
        let blockers: HashSet<UserId> = self.store.blockers_among(caller, users).await?.into_iter().collect();
        match users.iter().find(|u| blockers.contains(u)) {
            Some(user) if direct => Err(ChatsError::DirectRefused(user.to_string())),
            Some(user) => Err(ChatsError::AddRefused(user.to_string())),
            None => Ok(()),
        }
    }

    /// [`ChatsError::DirectRefused`] when `other`'s privacy setting does
    /// not let `caller` start a direct chat with them:
    /// [`DirectChats::Nobody`], or [`DirectChats::Peers`] while they share
    /// no chat. Users who set none have the default
    /// (`--default-direct-chats`), but a bot (the assistant, in `bots`)
    /// anyone may start one with. Only a direct chat that does not exist yet
    /// is asked about: one that exists goes on whatever the setting says.
    async fn check_direct_chats(
        &self,
        caller: UserId,
        other: UserId,
        bots: &HashSet<UserId>,
    ) -> Result<(), ChatsError> {
        if bots.contains(&other) {
            return Ok(());
        }
        let set = self.store.privacy_settings(other).await?.and_then(|s| s.choices.direct_chats);
        let allowed = match set.unwrap_or(self.default_direct_chats) {
            DirectChats::Everyone => true,
            DirectChats::Peers => !self.store.peers_among(caller, &[other], Peers::Privacy).await?.is_empty(),
            DirectChats::Nobody => false,
        };
        if allowed { Ok(()) } else { Err(ChatsError::DirectRefused(other.to_string())) }
    }

    /// A user's privacy settings as they apply: the choices in `stored`,
    /// and the defaults ([`Chats::with_default_group_adds`],
    /// [`Chats::with_default_direct_chats`],
    /// [`Chats::with_default_read_receipts`]) for the rest.
    fn applied(&self, stored: Option<StoredPrivacy>) -> PrivacySettings {
        let choices = stored.map(|s| s.choices).unwrap_or_default();
        PrivacySettings {
            group_adds: choices.group_adds.unwrap_or(self.default_group_adds),
            direct_chats: choices.direct_chats.unwrap_or(self.default_direct_chats),
            read_receipts: choices.read_receipts.unwrap_or(self.default_read_receipts),
            update_time: stored.map(|s| s.update_time),
        }
    }

    /// The one privacy setting `pick` takes of those of `users` who set it
    /// (the rest have the default): one read for the whole list.
    async fn set_among<T>(
        &self,
        users: &[UserId],
        pick: impl Fn(PrivacyChoices) -> Option<T>,
    ) -> Result<HashMap<UserId, T>, ChatsError> {
        let among = self.store.privacy_among(users).await?;
        Ok(among.into_iter().filter_map(|(user, choices)| Some((user, pick(choices)?))).collect())
    }

    /// Whether each of `users` (in order) keeps their read receipts private
    /// (their setting, or the default, is [`ReadReceipts::Nobody`]): one
    /// read for the whole list (the caller bounds it).
    pub async fn private_read_receipts(&self, users: &[UserId]) -> Result<Vec<bool>, ChatsError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let set = self.set_among(users, |choices| choices.read_receipts).await?;
        let private = |user| set.get(user).copied().unwrap_or(self.default_read_receipts) == ReadReceipts::Nobody;
        Ok(users.iter().map(private).collect())
    }

    /// The caller's privacy settings (GetPrivacySettings): the defaults for
    /// each they have not set.
    pub async fn privacy_settings(&self, caller: UserId) -> Result<PrivacySettings, ChatsError> {
        Ok(self.applied(self.store.privacy_settings(caller).await?))
    }

    /// UpdatePrivacySettings: stores the choices `update` makes (validated
    /// by [`crate::grpc::privacy_settings_update`]) as the caller's, keeping
    /// the others, and returns the settings as they now apply; counts
    /// against the caller's chat-change rate. A change of read_receipts
    /// invalidates the caller's cached memberships on every replica before
    /// it returns.
    pub async fn set_privacy_settings(
        &self,
        caller: UserId,
        update: PrivacyChoices,
    ) -> Result<PrivacySettings, ChatsError> {
        self.change_rate.check(&caller)?;
        let Some(stored) = self.store.set_privacy_settings(caller, update, now_micros()).await? else {
            // The account was deleted while the call ran.
            return Err(ChatsError::UserNotFound(caller.to_string()));
        };
        if update.read_receipts.is_some() {
            // Replicas keep membership answers that carry the setting
            // (natter_links::CachingChatDirectory): none of them answers
            // from the old one once this returns.
            self.bus.invalidate(vec![Tag::User(caller.uuid())]).await;
        }
        let applied = self.applied(Some(stored));
        self.announce_account(caller, mpb::AccountChange::PrivacySettings);
        tracing::info!(
            user_id = %caller,
            group_adds = applied.group_adds.as_str(),
            direct_chats = applied.direct_chats.as_str(),
            read_receipts = applied.read_receipts.as_str(),
            "privacy settings updated"
        );
        Ok(applied)
    }

    /// BlockUser: from now on `other` cannot start a direct chat with the
    /// caller or add them to a group (refused as the privacy settings
    /// refuse), and the direct chat between the two, if any, takes no new
    /// messages from either, those on their way included: it answers once
    /// the messages service has recorded the chat closed, where every
    /// send's write reads it. Blocking someone blocked already changes
    /// nothing (but records a closure still waiting in the outbox). Counts
    /// against the caller's chat-change rate.
    ///
    /// Errors: INVALID_ARGUMENT (oneself), NOT_FOUND (no such user),
    /// FAILED_PRECONDITION (a bot: the assistant writes only where asked),
    /// [`ChatsError::BlockLimit`], UNAVAILABLE (blocked, but not yet
    /// recorded by the messages service: retry).
    pub async fn block_user(&self, caller: UserId, other: UserId) -> Result<(), ChatsError> {
        self.change_rate.check(&caller)?;
        if other == caller {
            return Err(ChatsError::invalid("user_id", "cannot block yourself"));
        }
        if !self.require_users(&[other]).await?.is_empty() {
            return Err(ChatsError::Precondition(
                "a bot cannot be blocked: it writes only where it is asked to; leave its group, turn its replies off \
                 there, or delete its chat",
            ));
        }
        let limit = self.limits.blocks_per_user;
        match self.store.block(caller, other, now_micros(), limit).await? {
            Blocked::Done => {}
            Blocked::TooMany => return Err(ChatsError::BlockLimit(limit, caller.to_string())),
            Blocked::Forgotten(user) => return Err(ChatsError::UserNotFound(user.to_string())),
        }
        tracing::info!(user_id = %caller, blocked_user_id = %other, "user blocked");
        self.reclose_direct(caller, other).await?;
        self.announce_account(caller, mpb::AccountChange::BlockedUsers);
        Ok(())
    }

    /// UnblockUser: takes the caller's block of `other` back (none: no
    /// change). Counts against the caller's chat-change rate. Answers as
    /// BlockUser does once their direct chat's state is recorded (it takes
    /// new messages again unless `other` blocks the caller).
    pub async fn unblock_user(&self, caller: UserId, other: UserId) -> Result<(), ChatsError> {
        self.change_rate.check(&caller)?;
        self.store.unblock(caller, other, now_micros()).await?;
        self.reclose_direct(caller, other).await?;
        self.announce_account(caller, mpb::AccountChange::BlockedUsers);
        Ok(())
    }

    /// After a change of the blocks between `a` and `b` (committed, with
    /// their direct chat's closure in the outbox): evicts the direct chat's
    /// cached memberships, if there is one, then records its outbox with
    /// the messages service, where every send's write reads the closure
    /// ([`Chats::deliver`]). So a send whose membership was checked before
    /// the block, still on its way to its write, is refused there: a block
    /// is in force for every send once BlockUser has answered.
    ///
    /// Errors: UNAVAILABLE when the closure could not be recorded (the
    /// block is committed, and the relay records it later; a retry, a
    /// no-op in the chats store, records it now).
    async fn reclose_direct(&self, a: UserId, b: UserId) -> Result<(), ChatsError> {
        let Some(chat) = self.store.direct_chat(a, b).await? else { return Ok(()) };
        self.evict(chat.id).await;
        self.deliver_now(chat.id).await
    }

    /// Tells every stream of `user` (their other tabs and devices) that
    /// `change` of their account happened (`account_updated`).
    fn announce_account(&self, user: UserId, change: mpb::AccountChange) {
        self.bus.publish(Topic::User(user.uuid()), Arc::new(natter_bus::Event::account_updated(user, change)));
    }

    /// ListBlockedUsers: the users the caller blocked, by id, after `after`,
    /// each with its block time (µs).
    pub async fn blocked_users(
        &self,
        caller: UserId,
        after: Option<UserId>,
        page_size: u32,
    ) -> Result<Page<(UserId, i64), UserId>, ChatsError> {
        let mut blocked = self.store.blocked_users(caller, after, page_size + 1).await?;
        let next = if blocked.len() > page_size as usize {
            blocked.truncate(page_size as usize);
            blocked.last().map(|(user, _)| *user)
        } else {
            None
        };
        Ok(Page { items: blocked, next })
    }

    /// RemoveMember: oneself (leave; not the owner), or others by the owner
    /// (anyone) or an admin (plain members). The roles read here are
    /// checked again in the store's write ([`ChatStore::remove_member`]):
    /// a removal of someone made owner since, or by someone demoted since,
    /// is refused, so a group never loses its owner. It answers once the
    /// messages service has recorded the departure and the chat's new
    /// members version, which every send's write reads: no message of the
    /// departed member is stored after it answers, one already past its
    /// membership check included.
    ///
    /// Errors: as RemoveMember in chats.proto, and UNAVAILABLE when the
    /// departure is committed but could not be recorded yet (the relay
    /// records it later; a retry, which changes nothing more, records it
    /// now).
    pub async fn remove_member(&self, caller: UserId, chat_id: ChatId, user_id: UserId) -> Result<(), ChatsError> {
        const OWNER_LEAVING: &str = "the owner must hand ownership over (UpdateMember) before leaving";
        const ONLY_MANAGERS: &str = "only the owner, or an admin for plain members, may remove members";
        self.change_rate.check(&caller)?;
        let access = self.access(caller, chat_id).await?;
        let (chat, role) = match access.role {
            Some(role) => (access.chat, role),
            // A retried leave (its answer was lost): done already, once
            // recorded.
            None if user_id == caller => return self.deliver_now(chat_id).await,
            None => return Err(ChatsError::Denied("not a member of this chat")),
        };
        if chat.kind == Kind::Direct {
            return Err(ChatsError::Precondition("a direct chat never changes members"));
        }
        let leaving = user_id == caller;
        let removal = if leaving {
            if role == Role::Owner {
                return Err(ChatsError::Precondition(OWNER_LEAVING));
            }
            Removal { departure: Departure::Left, targets: &[Role::Admin, Role::Member], actor: None }
        } else {
            // The roles the caller must still hold, and those the removed
            // member may have.
            let (required, targets): (&[Role], &[Role]) = match role {
                Role::Owner => (&[Role::Owner], &[Role::Admin, Role::Member]),
                Role::Admin => (&[Role::Owner, Role::Admin], &[Role::Member]),
                Role::Member => return Err(ChatsError::Denied(ONLY_MANAGERS)),
            };
            Removal { departure: Departure::Removed, targets, actor: Some((caller, required)) }
        };
        let outcome = self.store.remove_member(chat.id, user_id, removal, now_micros()).await?;
        self.evict(chat.id).await;
        match outcome {
            Checked::Done(()) => {}
            // Left since the read above (a retried leave): done already.
            Checked::NotMember if leaving => {}
            // Removed already (a retry whose first answer was lost): once
            // that removal is recorded.
            Checked::NotMember => {
                self.deliver_now(chat.id).await?;
                return Err(ChatsError::MemberNotFound(user_id.to_string()));
            }
            // Made owner since the read above.
            Checked::Target(Role::Owner) if leaving => return Err(ChatsError::Precondition(OWNER_LEAVING)),
            Checked::Actor(None) => return Err(ChatsError::Denied("not a member of this chat")),
            Checked::Actor(Some(_)) | Checked::Target(_) => return Err(ChatsError::Denied(ONLY_MANAGERS)),
        }
        self.deliver_now(chat.id).await
    }

    /// After a change every write of the messages service must see once
    /// its call answers (the members version of a departure or of a loss of
    /// rights, a block's closure, an archived state: committed, in the
    /// outbox): records
    /// `chat_id`'s outbox with the messages service ([`Chats::deliver`]), so
    /// a write whose membership was checked before the change is refused.
    ///
    /// Errors: UNAVAILABLE when it could not be recorded (the change is
    /// committed, and the relay records it later; a retry of the call, a
    /// no-op in the chats store, records it now).
    async fn deliver_now(&self, chat_id: ChatId) -> Result<(), ChatsError> {
        if !self.deliver(chat_id).await {
            return Err(ChatsError::Upstream(tonic::Status::unavailable(
                "saved, but the messages service has not taken it yet: retry to be sure it holds for messages \
                 already on their way",
            )));
        }
        Ok(())
    }

    /// UpdateMember (owner only): sets a role; OWNER hands ownership over and
    /// makes the previous owner an admin. The store checks again in its
    /// write that the caller is still the owner and the member still one
    /// ([`ChatStore::set_role`]). A bot is never made owner or admin
    /// (FAILED_PRECONDITION naming `user_id`, nothing written). A change
    /// that takes rights away (a demotion, a hand-over) raises the chat's
    /// members version, as a departure does, and every call answers once
    /// the messages service has recorded it: no pin, unpin or moderation
    /// deletion of a demoted admin (or of an owner who handed over) whose
    /// check saw the old role is stored after the call answers.
    ///
    /// Errors: as UpdateMember in chats.proto, and UNAVAILABLE when the
    /// change is committed but could not be recorded yet (the relay
    /// records it later; a retry, which changes nothing more, records it
    /// now).
    pub async fn update_member(
        &self,
        caller: UserId,
        chat_id: ChatId,
        user_id: UserId,
        role: Role,
    ) -> Result<Member, ChatsError> {
        const ONLY_THE_OWNER: &str = "only the owner may change roles";
        const NOT_ONESELF: &str = "the owner changes role only by making another member owner";
        const NO_BOT: &str = "user_id: a bot cannot be made owner or admin: it stays a plain member";
        self.change_rate.check(&caller)?;
        let (chat, caller_role) = self.member(caller, chat_id).await?;
        if chat.kind == Kind::Direct {
            return Err(ChatsError::Precondition("a direct chat has no roles to change"));
        }
        if caller_role != Role::Owner {
            return Err(ChatsError::Denied(ONLY_THE_OWNER));
        }
        if user_id == caller {
            return Err(ChatsError::Precondition(NOT_ONESELF));
        }
        // A bot (the assistant) writes where it is asked and administers
        // nothing: owner and admin are people's roles. Whether a user is a
        // bot never changes, so this holds at the write too.
        if role.manages() && self.lookup_kinds(std::iter::once(user_id)).await?.get(&user_id) == Some(&true) {
            return Err(ChatsError::Precondition(NO_BOT));
        }
        let outcome = self.store.set_role(chat.id, caller, user_id, role, now_micros()).await?;
        self.evict(chat.id).await;
        let member = match outcome {
            Checked::Done(member) => member,
            Checked::NotMember => return Err(ChatsError::MemberNotFound(user_id.to_string())),
            Checked::Actor(None) => return Err(ChatsError::Denied("not a member of this chat")),
            // No longer the owner: handed over since the read above.
            Checked::Actor(Some(_)) => return Err(ChatsError::Denied(ONLY_THE_OWNER)),
            // The member is the owner: never while the caller is (one owner).
            Checked::Target(_) => return Err(ChatsError::Precondition(NOT_ONESELF)),
        };
        self.deliver_now(chat.id).await?;
        Ok(member)
    }

    /// A chat the caller may see: a member, or anyone for a public chat.
    pub async fn readable(&self, caller: UserId, chat_id: ChatId) -> Result<ChatAccess, ChatsError> {
        let access = self.access(caller, chat_id).await?;
        if access.role.is_none() && access.chat.visibility != Visibility::Public {
            return Err(ChatsError::Denied("not a member of this chat"));
        }
        Ok(access)
    }

    /// GetChat: the chat and, when `message_page_size` > 0, its newest
    /// messages (newest first, as the messages service sends them).
    pub async fn get_chat(
        &self,
        caller: UserId,
        chat_id: ChatId,
        message_page_size: u32,
    ) -> Result<(ChatView, Vec<mpb::Message>), ChatsError> {
        let access = self.readable(caller, chat_id).await?;
        let mut messages = if message_page_size > 0 && access.chat.last_seq > 0 {
            let (chat, viewer) = (access.chat.id.to_string(), caller.to_string());
            self.messages.recent_messages(&chat, message_page_size as i32, &viewer).await?
        } else {
            Vec::new()
        };
        // Injection flags as ListMessages gives them (natter_links::Sight).
        let sight = natter_links::Sight {
            manager: access.role.is_some_and(|r| r.manages()),
            direct: access.chat.kind == Kind::Direct,
        };
        let me = caller.to_string();
        for m in &mut messages {
            if !sight.sees(m.author_id == me, m.role == mpb::MessageRole::Assistant as i32) {
                m.flags = None;
            }
        }
        Ok((self.view(caller, access).await?, messages))
    }

    /// One view (see [`Chats::views`]).
    async fn view(&self, caller: UserId, access: ChatAccess) -> Result<ChatView, ChatsError> {
        let mut views = self.views(caller, vec![access]).await?;
        Ok(views.remove(0))
    }

    /// One view of a chat the caller is in, after reading their role (an
    /// idempotent CreateChat's answer: ownership may have moved since);
    /// None when they are no longer a member (a retry must not show a
    /// chat someone was removed from).
    async fn member_view(&self, caller: UserId, chat: Chat) -> Result<Option<ChatView>, ChatsError> {
        match self.store.role(chat.id, caller).await? {
            Some(role) => Ok(Some(self.view(caller, ChatAccess { chat, role: Some(role) }).await?)),
            None => Ok(None),
        }
    }

    /// Adds previews and unread counts to chats, with one call to the
    /// messages service for the caller's chats and one for the others
    /// (none when no chat has a message).
    /// Each chat comes with the caller's role in it (or, when staff lists
    /// another user's chats, that user's): the owner and admins, and staff
    /// for any chat, see the moderation aggregates.
    pub async fn views(&self, caller: UserId, chats: Vec<ChatAccess>) -> Result<Vec<ChatView>, ChatsError> {
        // Unread and mention counts are a member's: a public chat listed to
        // someone outside it is asked for without them (they cost a count
        // of up to 1,000 messages each).
        let (mut with_messages, mut outside) = (Vec::new(), Vec::new());
        for a in chats.iter().filter(|a| a.chat.last_seq > 0) {
            if a.role.is_some() { &mut with_messages } else { &mut outside }.push(a.chat.id.to_string());
        }
        let mut summaries = Vec::new();
        if !with_messages.is_empty() {
            summaries.extend(self.messages.chat_summaries(with_messages, &caller.to_string()).await?);
        }
        if !outside.is_empty() {
            let page = match self.messages.chat_summaries(outside.clone(), "").await {
                // A messages replica of the previous release takes no empty
                // user: asked as the caller, whose counts are dropped below.
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    self.messages.chat_summaries(outside, &caller.to_string()).await?
                }
                page => page?,
            };
            summaries.extend(page);
        }
        let mut previews: HashMap<String, (Preview, Aggregates)> = summaries
            .into_iter()
            .filter(|s| s.last_seq > 0)
            .map(|s| {
                let aggregates = Aggregates { message_count: s.message_count, max_severity: s.max_severity };
                let preview = Preview {
                    seq: s.last_seq,
                    author_id: s.last_author_id,
                    text: s.last_text,
                    send_time: s.last_send_time.as_ref().map(micros),
                    unread_count: s.unread_count,
                    mention_count: s.mention_count,
                };
                (s.chat_id, (preview, aggregates))
            })
            .collect();
        let staff = self.is_staff(caller);
        Ok(chats
            .into_iter()
            .map(|ChatAccess { chat, role }| {
                let (mut preview, aggregates) = match previews.remove(&chat.id.to_string()) {
                    Some((p, a)) => (Some(p), a),
                    None => (None, Aggregates::default()),
                };
                // Unread and mention counts are a member's: a public chat
                // listed to someone outside it has none.
                if let Some(preview) = preview.as_mut().filter(|_| role.is_none()) {
                    preview.unread_count = 0;
                    preview.mention_count = 0;
                }
                let moderator = staff || role.is_some_and(Role::manages);
                ChatView { chat, preview, aggregates, moderator }
            })
            .collect())
    }

    /// A page of chats for ListChats: `user`'s chats (None: the caller's;
    /// someone else's only for staff, else PERMISSION_DENIED), or the public
    /// ones, as `filter` selects and orders them.
    pub async fn list_chats(
        &self,
        caller: UserId,
        user: Option<UserId>,
        filter: &ChatFilter,
        after: Option<ChatCursor>,
        page_size: u32,
    ) -> Result<Page<ChatView, ChatCursor>, ChatsError> {
        let staff = self.is_staff(caller);
        let user = match user {
            Some(user) if user != caller && !staff => {
                return Err(ChatsError::Denied("only staff may list another user's chats"));
            }
            Some(user) => user,
            None => caller,
        };
        if let Some(severity) = filter.severity {
            // Only chats whose flags the caller sees can match: those the
            // listed user (the caller) manages, or any for staff.
            let filter = ChatFilter { managed_only: !staff, ..filter.clone() };
            return self.list_flagged_chats(caller, user, &filter, severity, after, page_size).await;
        }
        let mut chats = self.store.list_chats(user, filter, after, page_size + 1).await?;
        let next = if chats.len() > page_size as usize {
            chats.truncate(page_size as usize);
            chats.last().map(|a| a.chat.cursor(filter.order_by))
        } else {
            None
        };
        Ok(Page { items: self.views(caller, chats).await?, next })
    }

    /// ListChats with a severity filter: the chats the store lists, kept
    /// when the caller sees their flags and their worst live flagged
    /// message matches `severity` (the messages service's aggregates). At
    /// most [`FLAGGED_SCAN_PAGES`] store pages are read per call; the page
    /// then ends early with a token after the last chat read.
    async fn list_flagged_chats(
        &self,
        caller: UserId,
        user: UserId,
        filter: &ChatFilter,
        severity: SeverityFilter,
        mut after: Option<ChatCursor>,
        page_size: u32,
    ) -> Result<Page<ChatView, ChatCursor>, ChatsError> {
        let order = filter.order_by;
        let mut items = Vec::new();
        for _ in 0..FLAGGED_SCAN_PAGES {
            let chats = self.store.list_chats(user, filter, after, page_size).await?;
            let more = chats.len() == page_size as usize;
            let page_end = chats.last().map(|a| a.chat.cursor(order));
            let mut last_kept = None;
            for view in self.views(caller, chats).await? {
                let shown = view.moderator && severity.admits(view.aggregates.max_severity);
                if shown && items.len() < page_size as usize {
                    last_kept = Some(view.chat.cursor(order));
                    items.push(view);
                }
            }
            if items.len() == page_size as usize {
                // Full: go on after the last chat kept (the rest of this
                // store page is read again next time).
                return Ok(Page { next: last_kept, items });
            }
            if !more {
                return Ok(Page { items, next: None });
            }
            after = page_end;
        }
        Ok(Page { items, next: after })
    }

    /// A page of members for ListMembers (callers who may read the chat).
    pub async fn list_members(
        &self,
        caller: UserId,
        chat_id: ChatId,
        after: Option<MemberCursor>,
        page_size: u32,
    ) -> Result<Page<Member, MemberCursor>, ChatsError> {
        self.readable(caller, chat_id).await?;
        let mut members = self.store.members(chat_id, after, page_size + 1).await?;
        let next = if members.len() > page_size as usize {
            members.truncate(page_size as usize);
            members.last().map(Member::cursor)
        } else {
            None
        };
        Ok(Page { items: members, next })
    }

    /// Internal: membership and chat state, for the messages service, with
    /// whether blocks close a direct chat to new messages. Shared with the
    /// cache: a hit costs no copy of the chat. BlockUser and UnblockUser
    /// evict the direct chat of the pair, as every change of a chat does.
    pub async fn membership(&self, chat_id: ChatId, user_id: UserId) -> Result<Option<Arc<Membership>>, ChatsError> {
        let Some(cache) = &self.cache else { return self.read_membership(chat_id, user_id).await };
        let key = (chat_id, user_id);
        let generation = {
            let cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hit) = cache.entries.get(&key) {
                return Ok(Some(hit.clone()));
            }
            cache.generation
        };
        let membership = self.read_membership(chat_id, user_id).await?;
        // Only existing chats are cached: a chat created later needs no eviction.
        if let Some(membership) = &membership {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.generation == generation {
                if cache.entries.len() >= CACHE_ENTRIES {
                    cache.entries.clear();
                }
                cache.entries.insert(key, membership.clone());
            }
        }
        Ok(membership)
    }

    /// [`Chats::membership`] from the store: one read, a second for a
    /// member of a direct chat (its blocks).
    async fn read_membership(&self, chat_id: ChatId, user_id: UserId) -> Result<Option<Arc<Membership>>, ChatsError> {
        let Some(access) = self.store.access(chat_id, user_id).await? else { return Ok(None) };
        let blocked =
            access.role.is_some() && access.chat.kind == Kind::Direct && self.store.blocks_within(chat_id).await?;
        Ok(Some(Arc::new(Membership { access, blocked })))
    }

    /// Internal: which of `users` are members of `chat_id` (a message's
    /// mentions), in one store read, uncached.
    pub async fn members_among(
        &self,
        chat_id: ChatId,
        users: &[UserId],
    ) -> Result<std::collections::HashSet<UserId>, ChatsError> {
        Ok(self.store.members_among(chat_id, users).await?.into_iter().collect())
    }

    /// Internal: every chat of a user.
    pub async fn member_chat_ids(&self, user_id: UserId, managed_only: bool) -> Result<Vec<ChatId>, ChatsError> {
        Ok(self.store.member_chat_ids(user_id, managed_only).await?)
    }

    /// Internal: the peers of `user_id` among `candidates` for presence
    /// (see [`ChatStore::peers_among`], [`Peers::Presence`]: a user with a
    /// block either way with `user_id` is none; the caller bounds them:
    /// FilterPeers to [`PEER_CANDIDATES_MAX`]).
    pub async fn peers_among(&self, user_id: UserId, candidates: &[UserId]) -> Result<Vec<UserId>, ChatsError> {
        Ok(self.store.peers_among(user_id, candidates, Peers::Presence).await?)
    }

    /// Internal: the users who share a chat with `user_id` and whom it
    /// blocked or who blocked it ([`ChatStore::blocked_peers`]): those its
    /// presence changes must not reach, nor theirs it.
    pub async fn blocked_peers(&self, user_id: UserId) -> Result<Vec<UserId>, ChatsError> {
        Ok(self.store.blocked_peers(user_id).await?)
    }

    /// Internal: newest messages of chats, for ordering by activity.
    pub async fn record_activity(&self, activities: &[Activity]) -> Result<(), ChatsError> {
        Ok(self.store.record_activity(activities).await?)
    }
}

#[cfg(test)]
mod tests {
    //! What the chats service records with the messages service after each
    //! operation, through a messages link that keeps every call.

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use natter_proto::sessions::v1 as spb;
    use tonic::Status;

    use natter_kit::time::timestamp;

    use super::*;
    use crate::store::sqlite::SqliteChatStore;
    use crate::store::{OUTBOX_ENTRY_CHANGES, chat_archived, direct_chat_closed, members_departed, membership};

    /// Every user asked about exists.
    struct AnyUser;

    #[async_trait]
    impl UserDirectory for AnyUser {
        async fn lookup_users(&self, user_ids: Vec<String>) -> Result<Vec<spb::User>, Status> {
            Ok(user_ids.into_iter().map(|id| spb::User { id, ..Default::default() }).collect())
        }
    }

    /// Users that exist, with some of them bots, and a log of deleted users.
    #[derive(Default)]
    struct Directory {
        bots: Vec<UserId>,
        deleted: Mutex<Vec<spb::DeletedUser>>,
        /// Look-ups of these users fail (UNAVAILABLE).
        unreachable: Mutex<Vec<UserId>>,
        /// Runs at the next look-up, before it answers: a request racing
        /// the caller's.
        on_lookup: Mutex<Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>>,
    }

    impl Directory {
        /// Deletes `user`: logged, and no longer looked up.
        fn delete(&self, user: UserId) {
            let mut log = self.deleted.lock().unwrap();
            let position = log.len() as i64 + 1;
            log.push(spb::DeletedUser { position, user_id: user.to_string(), delete_time: None });
        }

        fn gone(&self, id: &str) -> bool {
            self.deleted.lock().unwrap().iter().any(|d| d.user_id == id)
        }
    }

    #[async_trait]
    impl UserDirectory for Directory {
        async fn lookup_users(&self, user_ids: Vec<String>) -> Result<Vec<spb::User>, Status> {
            let racing = self.on_lookup.lock().unwrap().take();
            if let Some(racing) = racing {
                racing.await;
            }
            if self.unreachable.lock().unwrap().iter().any(|u| user_ids.contains(&u.to_string())) {
                return Err(Status::unavailable("sessions is down for this user"));
            }
            let kind = |id: &str| {
                let bot = self.bots.iter().any(|b| b.to_string() == id);
                if bot { spb::UserKind::Bot } else { spb::UserKind::Human }
            };
            let users = user_ids.into_iter().filter(|id| !self.gone(id));
            Ok(users.map(|id| spb::User { kind: kind(&id) as i32, id, ..Default::default() }).collect())
        }

        async fn deleted_users(&self, after: i64, page_size: i32) -> Result<Vec<spb::DeletedUser>, Status> {
            let log = self.deleted.lock().unwrap();
            Ok(log.iter().filter(|d| d.position > after).take(page_size as usize).cloned().collect())
        }
    }

    /// Keeps every RecordChatChanges call; fails them while `down` is set
    /// and the next `failures` of them. `keys` holds the idempotency key of
    /// every attempt, failed or not.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<(String, Vec<mpb::ChatChange>)>>,
        keys: Mutex<Vec<String>>,
        down: AtomicBool,
        /// Answers INVALID_ARGUMENT while set.
        refuse: AtomicBool,
        failures: std::sync::atomic::AtomicUsize,
        /// The chats whose messages were purged, in order.
        purged: Mutex<Vec<String>>,
        /// The users forgotten (ForgetUser), in order.
        forgotten: Mutex<Vec<String>>,
        /// The change time (µs) of every attempt, failed or not.
        times: Mutex<Vec<Option<i64>>>,
    }

    impl Recorder {
        /// The calls since the last take.
        fn take(&self) -> Vec<(String, Vec<mpb::ChatChange>)> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    #[async_trait]
    impl MessageDirectory for Recorder {
        async fn chat_summaries(&self, _: Vec<String>, _: &str) -> Result<Vec<mpb::ChatSummary>, Status> {
            Ok(Vec::new())
        }

        async fn recent_messages(&self, _: &str, _: i32, _: &str) -> Result<Vec<mpb::Message>, Status> {
            Ok(Vec::new())
        }

        async fn purge_chat(&self, chat_id: &str) -> Result<(), Status> {
            if self.down.load(Ordering::SeqCst) {
                return Err(Status::unavailable("messages is down"));
            }
            self.purged.lock().unwrap().push(chat_id.to_owned());
            Ok(())
        }

        async fn forget_user(&self, user_id: &str) -> Result<(), Status> {
            if self.down.load(Ordering::SeqCst) {
                return Err(Status::unavailable("messages is down"));
            }
            self.forgotten.lock().unwrap().push(user_id.to_owned());
            Ok(())
        }

        async fn record_chat_changes(
            &self,
            chat_id: &str,
            changes: Vec<mpb::ChatChange>,
            idempotency_key: &str,
            change_time: Option<natter_proto::Timestamp>,
        ) -> Result<Vec<i64>, Status> {
            self.keys.lock().unwrap().push(idempotency_key.to_owned());
            self.times.lock().unwrap().push(change_time.map(|t| natter_kit::time::micros(&t)));
            let failing = self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
            if failing || self.down.load(Ordering::SeqCst) {
                return Err(Status::unavailable("messages is down"));
            }
            if self.refuse.load(Ordering::SeqCst) {
                return Err(Status::invalid_argument("changes: refused"));
            }
            let seqs = (1..=changes.len() as i64).collect();
            self.calls.lock().unwrap().push((chat_id.to_owned(), changes));
            Ok(seqs)
        }
    }

    struct Harness {
        chats: Chats,
        messages: Arc<Recorder>,
        _dir: tempfile::TempDir,
    }

    async fn harness(limits: Limits) -> Harness {
        harness_with(limits, Arc::new(AnyUser)).await
    }

    async fn harness_with(limits: Limits, users: Arc<dyn UserDirectory>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteChatStore::open(&dir.path().join("chats.db"), 2, Duration::from_secs(3600)).await.unwrap();
        let messages = Arc::new(Recorder::default());
        let chats =
            Chats::new(Arc::new(store), users, messages.clone(), Arc::new(natter_bus::Hub::new()), limits, Rates::OFF)
                // Retried at the next round, whenever that is.
                .with_retry_backoff(Backoff { first: 0, max: 0 });
        Harness { chats, messages, _dir: dir }
    }

    fn group(title: &str, others: Vec<UserId>) -> NewChat {
        NewChat {
            chat_id: None,
            kind: Some(Kind::Group),
            title: title.to_owned(),
            description: String::new(),
            others,
            visibility: Visibility::Private,
        }
    }

    fn joined(user: UserId) -> mpb::ChatChange {
        membership(user, mpb::MembershipChange::Joined)
    }

    fn role_changed(user: UserId) -> mpb::ChatChange {
        membership(user, mpb::MembershipChange::RoleChanged)
    }

    /// The ChatUpdated of a change, with its mask's paths.
    fn updated(change: &mpb::ChatChange) -> (&mpb::ChatUpdated, Vec<&str>) {
        let Some(mpb::chat_change::Change::ChatUpdated(u)) = &change.change else { panic!("not a chat update") };
        (u, u.update_mask.as_ref().unwrap().paths.iter().map(String::as_str).collect())
    }

    #[tokio::test]
    async fn a_deleted_user_leaves_every_chat_and_its_assistant_chat_goes() {
        let [guest, bot, alice, bob] = [(); 4].map(|_| UserId::new_v7());
        let directory = Arc::new(Directory { bots: vec![bot], ..Directory::default() });
        let h = harness_with(Limits::default(), directory.clone()).await;
        let direct = |other| NewChat { kind: Some(Kind::Direct), others: vec![other], ..group("", Vec::new()) };
        let assistant = h.chats.create_chat(guest, direct(bot)).await.unwrap().chat.id;
        let with_alice = h.chats.create_chat(guest, direct(alice)).await.unwrap().chat.id;
        let owned = h.chats.create_chat(guest, group("owned", vec![alice, bob])).await.unwrap().chat.id;
        h.chats.update_member(guest, owned, bob, Role::Admin).await.unwrap();
        let alone = h.chats.create_chat(guest, group("alone", Vec::new())).await.unwrap().chat.id;
        let joined = h.chats.create_chat(alice, group("alice's", vec![guest])).await.unwrap().chat.id;
        // The assistant joined before alice: it inherits nothing, and keeps
        // no group alone.
        let with_bot = h.chats.create_chat(guest, group("with bot", vec![bot, alice])).await.unwrap().chat.id;
        let bot_only = h.chats.create_chat(guest, group("bot only", vec![bot])).await.unwrap().chat.id;

        let other_guest = UserId::new_v7();
        let guests = h.chats.create_chat(guest, direct(other_guest)).await.unwrap().chat.id;
        let store = h.chats.store();
        directory.delete(guest);
        assert_eq!(h.chats.forget_deleted_users().await, 1);
        assert!(store.access(guests, other_guest).await.unwrap().is_some(), "the other guest keeps it for now");
        // The other guest goes too: nobody keeps their chat.
        directory.delete(other_guest);
        assert_eq!(h.chats.forget_deleted_users().await, 1);
        assert!(store.access(guests, other_guest).await.unwrap().is_none(), "deleted once both are gone");
        assert!(
            store.member_chat_ids(guest, false).await.unwrap() == [with_alice],
            "only alice's direct chat keeps it"
        );
        for gone in [assistant, alone] {
            assert!(store.access(gone, alice).await.unwrap().is_none(), "deleted");
            assert!(h.messages.purged.lock().unwrap().contains(&gone.to_string()), "its messages purged");
        }
        // The admin, not the longer-standing member, owns the group now.
        assert_eq!(store.role(owned, bob).await.unwrap(), Some(Role::Owner));
        assert_eq!(store.role(owned, alice).await.unwrap(), Some(Role::Member));
        assert_eq!(store.role(joined, alice).await.unwrap(), Some(Role::Owner));
        assert_eq!(store.role(with_bot, alice).await.unwrap(), Some(Role::Owner), "a person, not the bot");
        assert_eq!(store.role(with_bot, bot).await.unwrap(), Some(Role::Member));
        assert!(store.access(bot_only, bot).await.unwrap().is_none(), "a group left to a bot is deleted");
        assert_eq!(store.role(with_alice, alice).await.unwrap(), Some(Role::Member), "her history stays");
        assert_eq!(store.followed(DELETED_USERS_LOG).await.unwrap(), 2);
        // Followed past: the next round asks from there and does nothing.
        assert_eq!(h.chats.forget_deleted_users().await, 0);
        // Forgetting again (a replica that raced, a retry) changes nothing.
        h.chats.forget_user(guest).await.unwrap();
        assert_eq!(store.role(owned, bob).await.unwrap(), Some(Role::Owner));
    }

    #[tokio::test]
    async fn a_deleted_user_made_owner_while_taken_out_keeps_the_group_until_the_retry_hands_it_over() {
        let [guest, alice, bob] = [(); 3].map(|_| UserId::new_v7());
        let directory = Arc::new(Directory::default());
        let h = harness_with(Limits::default(), directory.clone()).await;
        let team = h.chats.create_chat(alice, group("team", vec![guest, bob])).await.unwrap().chat.id;
        let store = h.chats.store().clone();
        // Alice's hand-over to the guest (an UpdateMember that checked it
        // before its deletion) commits after the removal read the guest's
        // role, while it looks up the heirs.
        let racing = store.clone();
        *directory.on_lookup.lock().unwrap() = Some(Box::pin(async move {
            let handed = racing.set_role(team, alice, guest, Role::Owner, now_micros()).await.unwrap();
            assert!(matches!(handed, Checked::Done(_)), "{handed:?}");
        }));
        directory.delete(guest);

        assert_eq!(h.chats.forget_deleted_users().await, 0, "the owner is not taken out as a member");
        assert_eq!(store.role(team, guest).await.unwrap(), Some(Role::Owner));
        assert_eq!(store.chat(team).await.unwrap().unwrap().owner_id, guest, "the group has its owner");
        assert_eq!(store.retries(DELETED_USERS_LOG, i64::MAX, 10).await.unwrap(), [guest.to_string()]);

        assert_eq!(h.chats.forget_deleted_users().await, 1, "retried: handed over, then out");
        assert_eq!(store.role(team, guest).await.unwrap(), None);
        let members = store.members(team, None, 10).await.unwrap();
        let owners: Vec<UserId> = members.iter().filter(|m| m.role == Role::Owner).map(|m| m.user_id).collect();
        assert_eq!(owners, [alice], "the admin inherits it");
        assert_eq!(store.chat(team).await.unwrap().unwrap().owner_id, alice);
        h.chats.delete_chat(alice, team).await.expect("its owner may delete it");
    }

    #[tokio::test]
    async fn a_user_looked_up_before_its_deletion_is_not_made_a_member_after_its_removal() {
        let [alice, bob] = [(); 2].map(|_| UserId::new_v7());
        // The directory still answers for bob: the look-ups of these calls
        // ran before his deletion, their writes after the relay took him out.
        let h = harness_with(Limits::default(), Arc::new(Directory::default())).await;
        let team = h.chats.create_chat(alice, group("team", Vec::new())).await.unwrap().chat.id;
        h.chats.forget_user(bob).await.unwrap();

        let refused = |e: ChatsError| matches!(e, ChatsError::UserNotFound(id) if id == bob.to_string());
        assert!(refused(h.chats.add_members(alice, team, vec![bob]).await.unwrap_err()), "added to a group");
        assert!(refused(h.chats.create_chat(alice, group("new", vec![bob])).await.unwrap_err()), "in a new group");
        let direct = NewChat { kind: Some(Kind::Direct), others: vec![bob], ..group("", Vec::new()) };
        assert!(refused(h.chats.create_chat(alice, direct).await.unwrap_err()), "a direct chat");
        // His own request, authenticated before the deletion.
        assert!(refused(h.chats.create_chat(bob, group("his", Vec::new())).await.unwrap_err()), "his own group");
        assert_eq!(h.chats.store().member_chat_ids(bob, false).await.unwrap(), []);
        assert_eq!(h.chats.store().members(team, None, 10).await.unwrap().len(), 1, "alice alone");
    }

    #[tokio::test]
    async fn a_deleted_user_whose_removal_fails_is_retried_apart_without_holding_up_the_log() {
        let [stuck, next, flaky, alice] = [(); 4].map(|_| UserId::new_v7());
        let directory = Arc::new(Directory::default());
        let h = harness_with(Limits::default(), directory.clone()).await;
        let direct = |other| NewChat { kind: Some(Kind::Direct), others: vec![other], ..group("", Vec::new()) };
        // Taking `stuck` out asks about `flaky`, its direct chat's other member.
        h.chats.create_chat(stuck, direct(flaky)).await.unwrap();
        let team = h.chats.create_chat(stuck, group("team", vec![alice])).await.unwrap().chat.id;
        let alone = h.chats.create_chat(next, group("alone", Vec::new())).await.unwrap().chat.id;
        directory.unreachable.lock().unwrap().push(flaky);
        directory.delete(stuck);
        directory.delete(next);
        let store = h.chats.store();

        assert_eq!(h.chats.forget_deleted_users().await, 1, "the user after it is taken out");
        assert!(store.access(alone, next).await.unwrap().is_none(), "its lone group is gone");
        assert_eq!(store.followed(DELETED_USERS_LOG).await.unwrap(), 2, "the log is followed past both");
        assert_eq!(store.retries(DELETED_USERS_LOG, i64::MAX, 10).await.unwrap(), [stuck.to_string()]);
        assert_eq!(h.chats.forget_deleted_users().await, 0, "still failing: it waits");
        assert_eq!(store.retries(DELETED_USERS_LOG, i64::MAX, 10).await.unwrap(), [stuck.to_string()]);

        directory.unreachable.lock().unwrap().clear();
        assert_eq!(h.chats.forget_deleted_users().await, 1, "retried at the next round");
        assert_eq!(store.retries(DELETED_USERS_LOG, i64::MAX, 10).await.unwrap(), Vec::<String>::new());
        assert_eq!(store.role(team, alice).await.unwrap(), Some(Role::Owner), "its group passed on");
        assert_eq!(store.role(team, stuck).await.unwrap(), None);
    }

    /// A deployment's stricter default (here: nobody) binds people only: a
    /// bot (the assistant), which never signs in to set one, anyone may add.
    #[tokio::test]
    async fn the_default_group_adds_binds_people_and_never_bots() {
        let [alice, bob, bot] = [(); 3].map(|_| UserId::new_v7());
        let directory = Arc::new(Directory { bots: vec![bot], ..Directory::default() });
        let h = harness_with(Limits::default(), directory).await;
        let chats = h.chats.with_default_group_adds(GroupAdds::Nobody);
        let refused = chats.create_chat(alice, group("team", vec![bot, bob])).await.unwrap_err();
        assert!(matches!(&refused, ChatsError::AddRefused(u) if *u == bob.to_string()), "{refused:?}");
        let helpers = chats.create_chat(alice, group("helpers", vec![bot])).await.unwrap().chat.id;
        let plain = chats.create_chat(alice, group("plain", vec![])).await.unwrap().chat.id;
        assert_eq!(chats.add_members(alice, plain, vec![bot]).await.unwrap().len(), 1);
        assert_eq!(chats.store().role(helpers, bot).await.unwrap(), Some(Role::Member));
    }

    /// A deployment's stricter default for direct chats (here: nobody)
    /// binds people only: anyone may start a chat with a bot (the
    /// assistant), and a person's own setting beats the default.
    #[tokio::test]
    async fn the_default_direct_chats_binds_people_and_never_bots() {
        let [alice, bob, carol, bot] = [(); 4].map(|_| UserId::new_v7());
        let directory = Arc::new(Directory { bots: vec![bot], ..Directory::default() });
        let h = harness_with(Limits::default(), directory).await;
        let chats = h.chats.with_default_direct_chats(DirectChats::Nobody);
        let direct = |other| NewChat { kind: Some(Kind::Direct), title: String::new(), ..group("", vec![other]) };
        let refused = chats.create_chat(alice, direct(bob)).await.unwrap_err();
        assert!(matches!(&refused, ChatsError::DirectRefused(u) if *u == bob.to_string()), "{refused:?}");
        chats.create_chat(alice, direct(bot)).await.unwrap();
        let open = PrivacyChoices { direct_chats: Some(DirectChats::Everyone), ..PrivacyChoices::default() };
        let applied = chats.set_privacy_settings(carol, open).await.unwrap();
        assert_eq!((applied.direct_chats, applied.group_adds), (DirectChats::Everyone, GroupAdds::Everyone));
        chats.create_chat(alice, direct(carol)).await.unwrap();
    }

    /// The groups-per-user limit binds people only: a bot (the assistant)
    /// is added to any number of groups.
    #[tokio::test]
    async fn the_group_limit_binds_people_and_never_bots() {
        let [alice, bob, carol, bot] = [(); 4].map(|_| UserId::new_v7());
        let directory = Arc::new(Directory { bots: vec![bot], ..Directory::default() });
        let h = harness_with(Limits { groups_per_user: 1, ..Limits::default() }, directory).await;
        h.chats.create_chat(alice, group("one", vec![bot])).await.unwrap();
        h.chats.create_chat(bob, group("two", vec![bot])).await.unwrap();
        let three = h.chats.create_chat(bob, group("three", vec![])).await.unwrap_err();
        assert!(
            matches!(&three, ChatsError::GroupLimit { user, limit: 1, yourself: true } if *user == bob.to_string())
        );
        let full = h.chats.create_chat(carol, group("with alice", vec![bot, alice])).await.unwrap_err();
        assert!(matches!(&full, ChatsError::GroupLimit { user, yourself: false, .. } if *user == alice.to_string()));
    }

    /// Once a deleted user is out of its chats the messages service forgets
    /// it (ForgetUser); while that fails, the user waits apart for the
    /// retry like any removal that failed.
    #[tokio::test]
    async fn the_messages_service_forgets_a_deleted_user_once_it_is_out_and_a_failure_is_retried() {
        let [gone, alice] = [(); 2].map(|_| UserId::new_v7());
        let directory = Arc::new(Directory::default());
        let h = harness_with(Limits::default(), directory.clone()).await;
        let team = h.chats.create_chat(alice, group("team", vec![gone])).await.unwrap().chat.id;
        directory.delete(gone);
        let store = h.chats.store();

        h.messages.down.store(true, Ordering::SeqCst);
        assert_eq!(h.chats.forget_deleted_users().await, 0, "not done while messages is down");
        assert_eq!(store.role(team, gone).await.unwrap(), None, "out of the group all the same");
        assert_eq!(*h.messages.forgotten.lock().unwrap(), Vec::<String>::new());
        assert_eq!(store.retries(DELETED_USERS_LOG, i64::MAX, 10).await.unwrap(), [gone.to_string()]);

        h.messages.down.store(false, Ordering::SeqCst);
        h.messages.take();
        assert_eq!(h.chats.forget_deleted_users().await, 1, "retried at the next round");
        let departure = vec![membership(gone, mpb::MembershipChange::Left), members_departed(1)];
        let recorded: Vec<_> = h.messages.take().into_iter().flat_map(|(_, changes)| changes).collect();
        assert_eq!(recorded, departure, "the departure of the failed attempt recorded by the retry");
        assert_eq!(*h.messages.forgotten.lock().unwrap(), [gone.to_string()]);
        assert_eq!(store.retries(DELETED_USERS_LOG, i64::MAX, 10).await.unwrap(), Vec::<String>::new());
        assert_eq!(store.retries(&departures_log(gone), i64::MAX, 10).await.unwrap(), Vec::<String>::new());
    }

    /// A deleted user's departures are recorded with the messages service
    /// (so that a message of theirs already past its membership check is
    /// refused in its write), as RemoveMember's are before it answers,
    /// before the user counts as taken out and the messages service forgets
    /// them: while a departure cannot be recorded, even with ForgetUser
    /// answering, the user waits for the retry, which records it first,
    /// though the user is no longer among the chat's members by then.
    #[tokio::test]
    async fn a_deleted_user_is_forgotten_only_once_its_departures_are_recorded() {
        let [gone, alice, bob] = [(); 3].map(|_| UserId::new_v7());
        let directory = Arc::new(Directory::default());
        let h = harness_with(Limits::default(), directory.clone()).await;
        let team = h.chats.create_chat(alice, group("team", vec![gone, bob])).await.unwrap().chat.id;
        directory.delete(gone);
        let store = h.chats.store();
        h.messages.take();

        // Every attempt at recording the departure fails, in the loop and
        // in the wait after it; ForgetUser would answer.
        h.messages.failures.store(2 * RECORD_ATTEMPTS as usize, Ordering::SeqCst);
        assert_eq!(h.chats.forget_deleted_users().await, 0, "not done while its departure is not recorded");
        assert_eq!(store.role(team, gone).await.unwrap(), None, "out of the group all the same");
        assert_eq!(h.messages.take(), [], "nothing recorded");
        assert_eq!(*h.messages.forgotten.lock().unwrap(), Vec::<String>::new(), "not forgotten before it");
        assert_eq!(store.retries(DELETED_USERS_LOG, i64::MAX, 10).await.unwrap(), [gone.to_string()]);
        assert_eq!(store.retries(&departures_log(gone), i64::MAX, 10).await.unwrap(), [team.to_string()]);

        assert_eq!(h.chats.forget_deleted_users().await, 1, "retried at the next round");
        let departure = vec![membership(gone, mpb::MembershipChange::Left), members_departed(1)];
        let recorded: Vec<_> = h.messages.take().into_iter().flat_map(|(_, changes)| changes).collect();
        assert_eq!(recorded, departure, "recorded by the retry, though no longer among its chats");
        assert_eq!(*h.messages.forgotten.lock().unwrap(), [gone.to_string()]);
        assert_eq!(store.retries(&departures_log(gone), i64::MAX, 10).await.unwrap(), Vec::<String>::new());
        assert_eq!(h.chats.relay().await, 0, "nothing left behind");
    }

    /// DeleteChat answers once the messages service has purged the chat
    /// (whose mark refuses a send on its way): while it cannot, UNAVAILABLE,
    /// the chat deleted all the same; the retry purges it and answers
    /// NOT_FOUND, as for any deleted chat.
    #[tokio::test]
    async fn deletes_answer_once_the_chat_is_purged() {
        let h = harness(Limits::default()).await;
        let [owner, a] = [(); 2].map(|_| UserId::new_v7());
        let chat = h.chats.create_chat(owner, group("Team", vec![a])).await.unwrap().chat;

        h.messages.down.store(true, Ordering::SeqCst);
        let failed = h.chats.delete_chat(owner, chat.id).await.unwrap_err();
        assert_eq!(tonic::Status::from(failed).code(), tonic::Code::Unavailable, "not purged: not answered as done");
        assert!(h.chats.store().chat(chat.id).await.unwrap().is_none(), "deleted all the same");
        assert_eq!(*h.messages.purged.lock().unwrap(), Vec::<String>::new());
        h.messages.down.store(false, Ordering::SeqCst);

        let retried = h.chats.delete_chat(owner, chat.id).await.unwrap_err();
        assert_eq!(tonic::Status::from(retried).code(), tonic::Code::NotFound, "deleted already");
        assert_eq!(*h.messages.purged.lock().unwrap(), [chat.id.to_string()], "purged by the retry");
        assert!(matches!(h.chats.delete_chat(owner, chat.id).await, Err(ChatsError::ChatNotFound)));
        assert!(matches!(h.chats.delete_chat(a, ChatId::new_v7()).await, Err(ChatsError::ChatNotFound)));
        assert_eq!(h.messages.purged.lock().unwrap().len(), 1, "purged once");
        assert_eq!(h.chats.relay().await, 0, "nothing left for the relay");
    }

    /// The messages service places a late join's read position by when
    /// the join was committed, not by when it is recorded.
    #[tokio::test]
    async fn a_change_goes_to_the_messages_service_with_its_commit_time() {
        let h = harness(Limits::default()).await;
        let [owner, member] = [(); 2].map(|_| UserId::new_v7());
        let before = now_micros();
        h.chats.create_chat(owner, group("Team", vec![member])).await.unwrap();
        let after = now_micros();
        let times = h.messages.times.lock().unwrap().clone();
        assert_eq!(times.len(), 1);
        assert!(times[0].is_some_and(|t| (before..=after).contains(&t)), "{times:?} not in {before}..={after}");
    }

    #[tokio::test]
    async fn every_committed_operation_is_recorded_once_with_its_changes_in_order() {
        let h = harness(Limits::default()).await;
        let [owner, a, b, c] = [(); 4].map(|_| UserId::new_v7());

        let chat = h.chats.create_chat(owner, group("Team", vec![a])).await.unwrap().chat;
        let id = chat.id.to_string();
        assert_eq!(h.messages.take(), [(id.clone(), vec![joined(owner), joined(a)])], "creator first");

        h.chats.add_members(owner, chat.id, vec![b, c]).await.unwrap();
        assert_eq!(h.messages.take(), [(id.clone(), vec![joined(b), joined(c)])]);
        h.chats.add_members(owner, chat.id, vec![b]).await.unwrap();
        assert_eq!(h.messages.take(), [], "nobody was added");

        h.chats.update_member(owner, chat.id, a, Role::Admin).await.unwrap();
        assert_eq!(h.messages.take(), [(id.clone(), vec![role_changed(a)])]);
        h.chats.update_member(owner, chat.id, b, Role::Owner).await.unwrap();
        let handed_over = vec![role_changed(b), role_changed(owner)];
        let version = vec![members_departed(1)];
        assert_eq!(
            h.messages.take(),
            [(id.clone(), handed_over), (id.clone(), version)],
            "hand-over: a loss of rights"
        );
        h.chats.update_member(b, chat.id, a, Role::Member).await.unwrap();
        let version = vec![members_departed(2)];
        assert_eq!(h.messages.take(), [(id.clone(), vec![role_changed(a)]), (id.clone(), version)], "a demotion");
        h.chats.update_member(b, chat.id, a, Role::Admin).await.unwrap();
        assert_eq!(h.messages.take(), [(id.clone(), vec![role_changed(a)])], "a promotion takes nothing away");

        h.chats.remove_member(b, chat.id, c).await.unwrap();
        let removed = vec![membership(c, mpb::MembershipChange::Removed)];
        let version = vec![members_departed(3)];
        assert_eq!(h.messages.take(), [(id.clone(), removed), (id.clone(), version)], "then the new members version");
        h.chats.remove_member(a, chat.id, a).await.unwrap();
        let left = vec![membership(a, mpb::MembershipChange::Left)];
        assert_eq!(h.messages.take(), [(id.clone(), left), (id.clone(), vec![members_departed(4)])]);

        let update =
            ChatUpdate { title: Some("Renamed".into()), visibility: Some(Visibility::Public), ..Default::default() };
        let after = h.chats.update_chat(b, chat.id, update).await.unwrap().chat;
        let calls = h.messages.take();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, id);
        let [change] = &calls[0].1[..] else { panic!("one change: {calls:?}") };
        let (u, mask) = updated(change);
        assert_eq!(mask, ["title", "visibility"]);
        assert_eq!((u.title.as_str(), u.description.as_str(), u.public, u.archived), ("Renamed", "", true, false));
        assert_eq!(u.update_time, Some(timestamp(after.update_time)));

        h.chats.set_archived(b, chat.id, true).await.unwrap();
        let calls = h.messages.take();
        let [(_, changes), (_, state)] = &calls[..] else { panic!("two calls: {calls:?}") };
        let (u, mask) = updated(&changes[0]);
        assert_eq!((mask, u.archived, u.title.as_str(), u.public), (vec!["archived"], true, "Renamed", true));
        assert_eq!(state, &[chat_archived(true, 1)], "then the archived state, in an entry of its own");
        h.chats.set_archived(b, chat.id, true).await.unwrap();
        assert_eq!(h.messages.take(), [], "archiving an archived chat changes nothing");
        h.chats.set_archived(b, chat.id, false).await.unwrap();
        let calls = h.messages.take();
        let [(_, changes), (_, state)] = &calls[..] else { panic!("two calls: {calls:?}") };
        assert_eq!((updated(&changes[0]).1, updated(&changes[0]).0.archived), (vec!["archived"], false));
        assert_eq!(state, &[chat_archived(false, 2)]);
        h.chats.set_archived(b, chat.id, false).await.unwrap();
        assert_eq!(h.messages.take(), []);

        h.chats.delete_chat(b, chat.id).await.unwrap();
        let calls = h.messages.take();
        let [(chat_id, changes)] = &calls[..] else { panic!("one call: {calls:?}") };
        assert_eq!(chat_id, &id);
        let mut removed: Vec<_> = changes.clone();
        let mut expected =
            vec![membership(owner, mpb::MembershipChange::Removed), membership(b, mpb::MembershipChange::Removed)];
        let key = |c: &mpb::ChatChange| format!("{c:?}");
        removed.sort_by_key(key);
        expected.sort_by_key(key);
        assert_eq!(removed, expected, "every remaining member, removed");
    }

    /// A send already past its membership check when BlockUser answers is
    /// refused in its write only if the messages service has the closure
    /// by then: BlockUser and UnblockUser answer once it is recorded, and
    /// fail (to be retried) while it cannot be.
    #[tokio::test]
    async fn blocks_answer_once_the_direct_chats_closure_is_recorded() {
        let h = harness(Limits::default()).await;
        let [alice, bob] = [(); 2].map(|_| UserId::new_v7());
        let direct = NewChat { kind: Some(Kind::Direct), others: vec![bob], ..group("", Vec::new()) };
        let chat = h.chats.create_chat(alice, direct).await.unwrap().chat.id.to_string();
        h.messages.take();

        h.chats.block_user(alice, bob).await.unwrap();
        assert_eq!(
            h.messages.take(),
            [(chat.clone(), vec![direct_chat_closed(true, 1)])],
            "recorded before it answered"
        );

        h.messages.down.store(true, Ordering::SeqCst);
        let failed = h.chats.unblock_user(alice, bob).await.unwrap_err();
        assert_eq!(tonic::Status::from(failed).code(), tonic::Code::Unavailable, "not recorded: not answered as done");
        h.messages.down.store(false, Ordering::SeqCst);
        h.chats.unblock_user(alice, bob).await.unwrap();
        assert_eq!(h.messages.take(), [(chat.clone(), vec![direct_chat_closed(false, 2)])], "the retry records it");

        h.chats.block_user(alice, UserId::new_v7()).await.unwrap();
        assert_eq!(h.messages.take(), [], "no direct chat: nothing to record");
    }

    /// A send already past its membership check when RemoveMember answers
    /// is refused in its write only if the messages service has the
    /// departure's members version by then: RemoveMember answers once it is
    /// recorded, and fails (to be retried) while it cannot be; the retry,
    /// a leave's or a removal's, records it.
    #[tokio::test]
    async fn removals_answer_once_the_departure_is_recorded() {
        let h = harness(Limits::default()).await;
        let [owner, a, b] = [(); 3].map(|_| UserId::new_v7());
        let chat = h.chats.create_chat(owner, group("Team", vec![a, b])).await.unwrap().chat;
        let id = chat.id.to_string();
        h.messages.take();

        h.messages.down.store(true, Ordering::SeqCst);
        let failed = h.chats.remove_member(owner, chat.id, a).await.unwrap_err();
        assert_eq!(tonic::Status::from(failed).code(), tonic::Code::Unavailable, "not recorded: not answered as done");
        let failed = h.chats.remove_member(b, chat.id, b).await.unwrap_err();
        assert_eq!(tonic::Status::from(failed).code(), tonic::Code::Unavailable, "a leave likewise");
        h.messages.down.store(false, Ordering::SeqCst);

        let retried = h.chats.remove_member(owner, chat.id, a).await.unwrap_err();
        assert_eq!(tonic::Status::from(retried).code(), tonic::Code::NotFound, "removed already");
        let expected = [
            (id.clone(), vec![membership(a, mpb::MembershipChange::Removed)]),
            (id.clone(), vec![members_departed(1)]),
            (id.clone(), vec![membership(b, mpb::MembershipChange::Left)]),
            (id.clone(), vec![members_departed(2)]),
        ];
        assert_eq!(h.messages.take(), expected, "the retry records them");
        h.chats.remove_member(b, chat.id, b).await.unwrap();
        assert_eq!(h.messages.take(), [], "a retried leave: nothing more");
        let check = h.chats.membership(chat.id, owner).await.unwrap().unwrap();
        assert_eq!(check.access.chat.members_version, 2, "what CheckMembership answers");
    }

    /// A pin or a moderation deletion already past its membership check
    /// when UpdateMember takes the role that allowed it away is refused in
    /// its write only if the messages service has the new members version
    /// by then: a demotion (or a hand-over) answers once it is recorded,
    /// and fails (to be retried) while it cannot be; the retry records it.
    #[tokio::test]
    async fn demotions_answer_once_the_loss_of_rights_is_recorded() {
        let h = harness(Limits::default()).await;
        let [owner, a, b] = [(); 3].map(|_| UserId::new_v7());
        let chat = h.chats.create_chat(owner, group("Team", vec![a, b])).await.unwrap().chat;
        let id = chat.id.to_string();
        h.chats.update_member(owner, chat.id, a, Role::Admin).await.unwrap();
        h.messages.take();

        h.messages.down.store(true, Ordering::SeqCst);
        let failed = h.chats.update_member(owner, chat.id, a, Role::Member).await.unwrap_err();
        assert_eq!(tonic::Status::from(failed).code(), tonic::Code::Unavailable, "not recorded: not answered as done");
        let failed = h.chats.update_member(owner, chat.id, b, Role::Owner).await.unwrap_err();
        assert_eq!(tonic::Status::from(failed).code(), tonic::Code::Unavailable, "a hand-over likewise");
        h.messages.down.store(false, Ordering::SeqCst);

        let retried = h.chats.update_member(b, chat.id, a, Role::Member).await.unwrap();
        assert_eq!(retried.role, Role::Member);
        let expected = [
            (id.clone(), vec![role_changed(a)]),
            (id.clone(), vec![members_departed(1)]),
            (id.clone(), vec![role_changed(b), role_changed(owner)]),
            (id.clone(), vec![members_departed(2)]),
            (id.clone(), vec![role_changed(a)]),
        ];
        assert_eq!(h.messages.take(), expected, "the retry records them, and takes nothing more away");
        let check = h.chats.membership(chat.id, owner).await.unwrap().unwrap();
        assert_eq!(check.access.chat.members_version, 2, "what CheckMembership answers");
    }

    #[tokio::test]
    async fn more_changes_than_one_call_takes_go_in_order_in_several() {
        let h = harness(Limits { group_members: 1_500, ..Limits::default() }).await;
        let owner = UserId::new_v7();
        let others: Vec<UserId> = (0..1_199).map(|_| UserId::new_v7()).collect();
        h.chats.create_chat(owner, group("Crowd", others.clone())).await.unwrap();
        let calls = h.messages.take();
        assert_eq!(calls.iter().map(|(_, c)| c.len()).collect::<Vec<_>>(), [OUTBOX_ENTRY_CHANGES, 200]);
        let all: Vec<mpb::ChatChange> = calls.into_iter().flat_map(|(_, c)| c).collect();
        let expected: Vec<mpb::ChatChange> = std::iter::once(owner).chain(others).map(joined).collect();
        assert_eq!(all, expected);
    }

    #[tokio::test]
    async fn a_failed_record_is_retried_with_the_same_key() {
        let h = harness(Limits::default()).await;
        let [owner, a] = [(); 2].map(|_| UserId::new_v7());
        h.messages.failures.store(2, Ordering::SeqCst);
        let chat = h.chats.create_chat(owner, group("Team", vec![a])).await.unwrap().chat;
        assert_eq!(h.messages.take(), [(chat.id.to_string(), vec![joined(owner), joined(a)])], "recorded once");
        let keys = std::mem::take(&mut *h.messages.keys.lock().unwrap());
        assert_eq!(keys.len(), 3, "two failures, then the record");
        assert!(!keys[0].is_empty() && keys.iter().all(|k| *k == keys[0]), "one key for all attempts: {keys:?}");
        h.chats.add_members(owner, chat.id, vec![UserId::new_v7()]).await.unwrap();
        let next = h.messages.keys.lock().unwrap().clone();
        assert!(next.len() == 1 && next[0] != keys[0], "each operation its own key");
    }

    #[tokio::test]
    async fn a_failed_record_answers_the_committed_change_and_is_recorded_in_order_before_the_next() {
        let h = harness(Limits::default()).await;
        let [owner, a, b] = [(); 3].map(|_| UserId::new_v7());
        let chat = h.chats.create_chat(owner, group("Team", vec![a])).await.unwrap().chat;
        h.messages.take();

        h.messages.down.store(true, Ordering::SeqCst);
        let added = h.chats.add_members(owner, chat.id, vec![b]).await.expect("the join is committed");
        assert_eq!(added.iter().map(|m| m.user_id).collect::<Vec<_>>(), [b]);
        assert!(h.chats.membership(chat.id, b).await.unwrap().unwrap().access.role.is_some(), "b is a member");
        // The archive must hold for writes on their way once it answers:
        // committed, but not answered as done.
        let failed = h.chats.set_archived(owner, chat.id, true).await.unwrap_err();
        assert_eq!(tonic::Status::from(failed).code(), tonic::Code::Unavailable);
        let archived = h.chats.store().chat(chat.id).await.unwrap().unwrap();
        assert!(archived.archive_time.is_some(), "the archive is committed");
        assert_eq!(h.messages.take(), [], "nothing recorded while messages is down");
        assert_eq!(h.chats.store().pending(Some(chat.id), 10).await.unwrap().len(), 3, "all kept in the outbox");

        h.messages.down.store(false, Ordering::SeqCst);
        h.chats.remove_member(owner, chat.id, b).await.unwrap();
        let calls = h.messages.take();
        let changes: Vec<&mpb::ChatChange> = calls.iter().flat_map(|(_, c)| c).collect();
        assert_eq!(changes.len(), 5, "{calls:?}");
        assert_eq!(changes[0], &joined(b), "the join first");
        assert_eq!(updated(changes[1]).1, ["archived"], "then the archive");
        assert_eq!(changes[2], &chat_archived(true, 1), "and its state");
        assert_eq!(changes[3], &membership(b, mpb::MembershipChange::Removed), "then the removal");
        assert_eq!(h.chats.store().pending(None, 10).await.unwrap(), [], "the outbox is empty");
    }

    #[tokio::test]
    async fn the_relay_records_what_a_crash_left_in_the_outbox_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chats.db");
        let [owner, a] = [(); 2].map(|_| UserId::new_v7());
        let messages = Arc::new(Recorder::default());
        let open = || async {
            let store = SqliteChatStore::open(&path, 2, Duration::from_secs(3600)).await.unwrap();
            Chats::new(
                Arc::new(store),
                Arc::new(AnyUser),
                messages.clone(),
                Arc::new(natter_bus::Hub::new()),
                Limits::default(),
                Rates::OFF,
            )
        };

        // The process "crashes" between the commit and the call: the link is
        // down until the process is gone.
        let chats = open().await;
        messages.down.store(true, Ordering::SeqCst);
        let chat = chats.create_chat(owner, group("Team", vec![a])).await.unwrap().chat;
        chats.close().await;
        messages.down.store(false, Ordering::SeqCst);
        assert_eq!(messages.take(), []);

        let chats = open().await;
        assert_eq!(chats.relay().await, 1, "one chat's entries recorded");
        assert_eq!(messages.take(), [(chat.id.to_string(), vec![joined(owner), joined(a)])]);
        assert_eq!(chats.relay().await, 0, "nothing left");
        assert_eq!(messages.take(), []);
        let keys = messages.keys.lock().unwrap().clone();
        assert!(keys.len() >= 2 && keys.iter().all(|k| *k == keys[0]), "every attempt under one key: {keys:?}");
    }

    #[tokio::test]
    async fn a_deleted_chat_is_purged_once_the_messages_service_is_back_and_its_id_never_returns() {
        let h = harness(Limits::default()).await;
        let [owner, a] = [(); 2].map(|_| UserId::new_v7());
        let new = NewChat { chat_id: Some(ChatId::new_v7()), ..group("Team", vec![a]) };
        let chat = h.chats.create_chat(owner, new.clone()).await.unwrap().chat;
        h.messages.down.store(true, Ordering::SeqCst);
        let failed = h.chats.delete_chat(owner, chat.id).await.expect_err("committed, not purged");
        assert_eq!(tonic::Status::from(failed).code(), tonic::Code::Unavailable);
        assert_eq!(*h.messages.purged.lock().unwrap(), Vec::<String>::new(), "nothing purged while down");
        // The same id, even by its creator: ALREADY_EXISTS, no new chat.
        assert!(matches!(h.chats.create_chat(owner, new.clone()).await, Err(ChatsError::ChatIdTaken)));
        assert!(matches!(h.chats.create_chat(a, new).await, Err(ChatsError::ChatIdTaken)));

        h.messages.down.store(false, Ordering::SeqCst);
        assert_eq!(h.chats.relay().await, 2, "the removals recorded, then the purge");
        assert_eq!(*h.messages.purged.lock().unwrap(), [chat.id.to_string()]);
        assert_eq!(h.chats.relay().await, 0, "nothing left");
        assert_eq!(h.messages.purged.lock().unwrap().len(), 1, "purged once");
    }

    #[tokio::test]
    async fn a_refused_entry_is_dropped_and_does_not_block_the_next() {
        let h = harness(Limits::default()).await;
        let [owner, a, b] = [(); 3].map(|_| UserId::new_v7());
        h.messages.refuse.store(true, Ordering::SeqCst);
        let chat = h.chats.create_chat(owner, group("Team", vec![a])).await.unwrap().chat;
        h.messages.refuse.store(false, Ordering::SeqCst);
        assert_eq!(h.messages.take(), []);
        assert_eq!(h.chats.store().pending(None, 10).await.unwrap(), [], "not kept to block the chat");
        h.chats.add_members(owner, chat.id, vec![b]).await.unwrap();
        assert_eq!(h.messages.take(), [(chat.id.to_string(), vec![joined(b)])]);
    }
}

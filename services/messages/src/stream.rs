//! StreamEvents: live events of a caller's chats with exact resume by
//! change number.
//!
//! Every change to a chat takes the chat's next change number in its
//! transaction (`store/mod.rs`); the stream keeps, per chat, a cursor: the
//! last change number it delivered or skipped. The order of operations is
//! what makes the switch-over gap-free: subscribe to the bus first, then
//! read each chat's heads from the store, then replay the store from the
//! client's resume point, then go live. A live event at or below the cursor
//! is a duplicate (or older than what a replay already sent) and dropped;
//! the one right after it is delivered; one further ahead means
//! announcements were missed, so the gap is filled from the store first. The
//! bus may therefore drop, reorder or lag without a client seeing a gap or a
//! duplicate. (Centrifugo's stream recovery works on the same idea: history
//! is the truth, pub/sub is the hint.)
//!
//! The store holds every message, but a chat's membership and chat changes
//! only in a log of its newest 1,000 (`CHAT_LOG_KEEP`). A read from a cursor
//! the log has been pruned past (a resume point that old, or a stream whose
//! client stopped reading while more than that happened) cannot send what
//! was pruned: the stream sends a `chat_reset` (`log_truncated`) instead and
//! goes on from the chat's newest change, so the client re-reads the chat
//! rather than miss changes without a word. Only the compatibility resume by
//! seq passes over them, as it always has, and a bot's stream (the
//! assistant's), which needs the messages (never pruned): it is told all the
//! same, with a `chat_reset` (`log_truncated`) whose change_seq is where it
//! goes on reading from, so that it reads again what it keeps of the chat
//! (the assistant, its reply setting: a switch may be among what was pruned).
//!
//! A read from the store returns each changed row once, as it is now: a
//! message edited five times is sent once, with the number of its latest
//! change, and the numbers of its earlier changes are skipped. Changes
//! committed in a chat are numbered in commit order (the head row is the
//! first write of every change's transaction and serializes them), so once a
//! live event with number n arrives, everything up to n is in the store and
//! a fill up to n leaves no hole.
//!
//! A member removed from a chat receives nothing sent after the removal,
//! however long their stream stalled:
//! - the stream follows its user's topic, where every join, leave and
//!   removal of the user is announced, and polls it before any chat: the
//!   chat's subscription, with whatever it still queues, is dropped when the
//!   removal is seen;
//! - a stream that opens (or re-reads its chats after a lag) reads each
//!   chat's heads, then the user's chats again from the chats service: a
//!   removal committed after the first check but inside the heads (its
//!   announcement is then at or below the cursor, and dropped) is found by
//!   that second read;
//! - every read from the store (replay, gap fill, a lag, a resync hint)
//!   stops at the user's own departure in the chat's log, and re-checks
//!   membership after reading a page and before sending any of it, so a page
//!   is sent only if the caller was still a member after it was read, or
//!   comes before their departure in the log. Such a page (one that ends at
//!   a departure) sends an assistant's reply still GENERATING without its
//!   text: its checkpoints take no change number, so its stored text may
//!   have been written after the departure.
//!
//! A stream that finds itself no longer a member (by that check, by the
//! second read at opening, or by re-reading its chats after it lagged on its
//! user's topic or was hinted there) looks up the user's departure in the
//! chat's log: if it lies after the cursor, the changes up to it are replayed
//! (the user was there for them) and the departure ends the chat as a live
//! one would. If not (the departure has not reached the log yet), it sends a
//! `MEMBERSHIP_CHANGE_REMOVED` event of its own (change_seq: the last one it
//! sent of that chat) and nothing after the cursor, and stops following the
//! chat.
//!
//! A resync (a hint on a stream's user, chat or session topic, or a lag
//! there) has a stream re-read what it may have missed; a peer replica's
//! death hints every topic of every surviving replica, so all their
//! streams would re-read at once: a burst of store reads and calls to the
//! chats and sessions services as large as the streams held, in the pool
//! sends wait on too. [`Resyncs`] lets [`RESYNC_READS`] of a replica's
//! streams do so at a time; the others wait their turn, each with the
//! events it queued.
//!
//! A live event that arrives in order costs no membership check. In split
//! mode a removal reaches a replica over NATS, so a message sent right after
//! a removal can reach that replica's streams before the removal does; the
//! window is the bus's delivery time, as for revocations (DESIGN.md).

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, Stream, StreamExt as _};
use natter_auth::{Authenticator, Principal};
use natter_bus::{Lagged, Shared as BusEvent, Subscription, Topic};
use natter_kit::id::{ChatId, MessageId, UserId};
use natter_links::Sight;
use natter_proto::messages::v1 as pb;
use pb::stream_events_response::Event;
use tokio_stream::StreamMap;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

use crate::error::MessagesError;
use crate::grpc::{ResetReason, replay_event, reset_event};
use crate::registry::Ticket;
use crate::service::Messages;
use crate::store::{Change, ChatChange, Generation, Heads, Membership, Range, Seq};

/// How many changes one store read of a replay or gap fill returns.
const REPLAY_PAGE: u32 = 256;

/// The most bytes of changes a stream holds from one store read (a page
/// is cut after the change that passes it, the rest read again next): a
/// client that stops reading holds its stream at the page it was sent, and
/// 256 messages of 32 KiB with attachments would be 14 MiB.
const REPLAY_PAGE_BYTES: usize = 1 << 20;

/// Most resyncs a replica's streams run at once ([`Resyncs`]): store
/// reads after a hint or a lag, re-reads of a user's chats from the chats
/// service, and session checks with the sessions service. Half the
/// default PostgreSQL pool (16 connections): a burst of resyncs (a peer
/// replica's death hints every stream) leaves the other half to sends.
pub const RESYNC_READS: usize = 8;

/// A replica's bound on its streams' resyncs ([`RESYNC_READS`] at a time,
/// first come, first served), so that a hint to every stream is a queue of
/// cheap waiting tasks rather than a burst of reads as large as the
/// streams held.
#[derive(Debug)]
pub struct Resyncs {
    permits: tokio::sync::Semaphore,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Resyncs {
    /// Up to `permits` resyncs at a time.
    pub fn new(permits: usize) -> Self {
        Self { permits: tokio::sync::Semaphore::new(permits), waiting: Default::default() }
    }

    /// Waits for a turn; the resync runs while the permit is held.
    pub async fn permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        use std::sync::atomic::Ordering::Relaxed;
        /// Counts a waiter out however its wait ends (a dropped stream too).
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        self.waiting.fetch_add(1, Relaxed);
        let _waiting = Waiting(&self.waiting);
        self.permits.acquire().await.expect("the resync semaphore is never closed")
    }

    /// How many resyncs wait for a turn now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The response stream of StreamEvents.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::StreamEventsResponse, Status>> + Send + 'static>>;

/// Most resume entries a stream opening asks the chats service about
/// (whether their chat was deleted while the client was away): chats
/// deleted in one absence are few, entries for chats never one's own are
/// not worth more.
const DELETED_CHAT_CHECKS: usize = 16;

/// Where a client resumes a chat from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The last change number it saw (`resume_changes`).
    Changes(i64),
    /// The last message seq it saw (`resume`, the compatibility path): the
    /// changes since that message's creation are replayed, and a point below
    /// the log's floor is not reset.
    Seq(Seq),
}

/// A validated StreamEvents request. Its `Debug` leaves the token out.
#[derive(Clone)]
pub struct Follow {
    pub principal: Principal,
    /// The caller's token, re-checked when its session is revoked.
    pub token: String,
    /// Empty: every chat of the caller, including chats joined later.
    pub chat_ids: Vec<Uuid>,
    /// chat -> where the client resumes it.
    pub resume: HashMap<Uuid, Resume>,
    /// A public stream: counts towards its user's presence and receives
    /// `presence_changed` (not the assistant's FollowChats).
    pub presence: bool,
}

impl std::fmt::Debug for Follow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follow")
            .field("principal", &self.principal)
            .field("token", &"<redacted>")
            .field("chat_ids", &self.chat_ids)
            .field("resume", &self.resume)
            .field("presence", &self.presence)
            .finish()
    }
}

/// Opens a stream admitted by `ticket` (held until the stream is dropped).
/// `auth` re-checks the session when it may have been revoked (None for a
/// bot's stream, which has no session). Errors that concern the request
/// (not a member, unknown chat) are returned here, before any event, as the
/// call's status.
pub async fn open(
    messages: Arc<Messages>,
    auth: Option<Authenticator>,
    shutdown: CancellationToken,
    ticket: Ticket,
    follow: Follow,
) -> Result<EventStream, MessagesError> {
    let user = follow.principal.user_id;
    let bus = messages.bus().clone();
    let all = follow.chat_ids.is_empty();
    // Subscribe to the user's topic before listing chats, so a chat joined
    // (or left) in between is not missed. Across replicas the subscription
    // takes effect once the NATS server has it: wait for that, then drop
    // what it queued (its resync hint, and changes the listing covers), so
    // the stream does not re-read its chats at once: a re-read racing a
    // chat being created would announce the user's join twice (once made
    // up by the re-read, once from the chat's log).
    let mut user_events = bus.subscribe(Topic::User(user));
    bus.settled().await;
    drain(&mut user_events);
    let user_events = Some(user_events);
    let chats: Vec<Uuid> = if all {
        uuids(&messages.chats().member_chat_ids(&user.to_string()).await?)
    } else {
        for chat in &follow.chat_ids {
            messages.member(*chat, user).await?;
        }
        follow.chat_ids.clone()
    };
    let session_events = Some(bus.subscribe(Topic::Session(follow.principal.session_id)));

    // Injection flags go to a message's author and the chat's owner and
    // admins (a bot's stream, which has no session to check, sees every
    // verdict: the assistant's policy needs them).
    let every_flag = auth.is_none();
    let managed: HashSet<Uuid> =
        if every_flag { HashSet::new() } else { uuids(&messages.chats().managed_chat_ids(&user.to_string()).await?) };
    let mut follower = Follower {
        messages,
        user,
        all,
        live: StreamMap::new(),
        cursors: HashMap::new(),
        left: HashMap::new(),
        receipts: HashMap::new(),
        managed,
        direct: HashMap::new(),
        presence: follow.presence.then(HashMap::new),
        profiles: follow.presence.then(HashMap::new),
        skips_pruned: every_flag,
    };
    // Subscribe first, read the heads second: a change committed after the
    // head was read is announced to a subscription that already exists.
    for chat in &chats {
        follower.follow(*chat, 0);
    }
    // Across replicas a subscription takes effect once the NATS server has
    // it: wait for that, then drop what the chats' subscriptions queued so
    // far (resync hints, and events the heads read next already covers), so
    // nothing published from now on is missed and no store read is
    // repeated (a repeated read sends a message's latest state only).
    bus.settled().await;
    follower.drain_queued();
    let mut first = Vec::new();
    let mut refills = VecDeque::new();
    for chat in &chats {
        let heads = follower.messages.store().heads((*chat).into()).await?;
        let start = match follow.resume.get(chat) {
            None => heads.change,
            Some(Resume::Changes(seen)) if *seen > heads.change => {
                first.push(reset_event((*chat).into(), heads, ResetReason::AheadOfServer));
                heads.change
            }
            Some(Resume::Changes(seen)) if *seen < heads.floor => {
                first.push(reset_event((*chat).into(), heads, ResetReason::LogTruncated));
                heads.change
            }
            Some(Resume::Changes(seen)) => *seen,
            Some(Resume::Seq(seq)) => follower.created_at((*chat).into(), *seq, heads).await?,
        };
        follower.cursors.insert(*chat, start);
        if start < heads.change {
            let by_seq = matches!(follow.resume.get(chat), Some(Resume::Seq(_)));
            refills.push_back(Refill { skips_pruned: by_seq, ..Refill::to(*chat, heads.change) });
        }
    }
    // Read first, check second (as a refill does): a removal committed
    // between the check above and a chat's heads read is inside those heads,
    // where its own announcement (at or below the cursor) is dropped, so the
    // chats are read again now, from the chats service itself rather than a
    // replica's cached answers. A removal after this read is numbered above
    // the heads and ends the following live.
    let still: HashSet<Uuid> = uuids(&follower.messages.chats().member_chat_ids(&user.to_string()).await?);
    for chat in chats.iter().filter(|c| !still.contains(*c)) {
        refills.retain(|r| r.chat != *chat);
        match follower.departed(*chat).await? {
            Gone::Replay(refill) => refills.push_back(refill),
            Gone::Removed => first.push(follower.removed(*chat)),
        }
    }
    // A chat the client resumes that the user left (or was removed from)
    // before the stream opened: as for a departure found above, what the
    // client had not seen of it before the departure, then the departure,
    // so that the client drops the chat; no other event would ever tell it.
    // A chat deleted since (its log gone with it) gets the removal, and so
    // does one whose log was pruned past the point (the departure maybe
    // with it). Any other chat whose log holds no departure of the user
    // (never theirs) stays ignored. One the user is in again (joined since the listing) is
    // left to its join, which follows on the user's topic.
    if all {
        let gone: Vec<(Uuid, Resume)> = follow
            .resume
            .iter()
            .filter(|(c, _)| !chats.contains(c) && !still.contains(*c))
            .map(|(c, r)| (*c, *r))
            .collect();
        // An entry with no departure in the chat's log costs a call to the
        // chats service; a client may send 1,000 of them, for chats never
        // its own: a few per open are asked about, the rest ignored.
        let mut checks = 0;
        for (chat, point) in gone {
            let latest = follower.messages.store().latest_membership(chat.into(), UserId(user)).await;
            let latest = latest.map_err(MessagesError::from)?;
            if !matches!(latest, Some(Membership::Departed(_))) {
                if checks == DELETED_CHAT_CHECKS {
                    continue;
                }
                checks += 1;
                let found = follower.messages.chats().check_membership(&chat.to_string(), &user.to_string()).await?;
                if !found.chat_exists {
                    // At the client's own point: the chat's numbers went with it.
                    follower.cursors.insert(chat, if let Resume::Changes(seen) = point { seen } else { 0 });
                    first.push(follower.removed(chat));
                } else if !found.member {
                    // The log was pruned past the client's point: the user's
                    // departure may have gone with it, and nothing else
                    // would ever tell the client. A chat never the user's
                    // whose log still reaches the point stays ignored.
                    let heads = follower.messages.store().heads(chat.into()).await.map_err(MessagesError::from)?;
                    let seen = match point {
                        Resume::Changes(seen) => seen,
                        Resume::Seq(seq) => follower.created_at(chat.into(), seq, heads).await?,
                    };
                    if seen < heads.floor {
                        follower.cursors.insert(chat, seen);
                        first.push(follower.removed(chat));
                    }
                }
                continue;
            }
            let seen = match point {
                Resume::Changes(seen) => seen,
                Resume::Seq(seq) => {
                    let heads = follower.messages.store().heads(chat.into()).await.map_err(MessagesError::from)?;
                    follower.created_at(chat.into(), seq, heads).await?
                }
            };
            follower.cursors.insert(chat, seen);
            match follower.gone(chat, latest) {
                Gone::Replay(refill) => refills.push_back(refill),
                Gone::Removed => first.push(follower.removed(chat)),
            }
        }
    }
    tracing::debug!(user_id = %user, chats = chats.len(), replay = refills.len(), "stream opened");

    let token = follow.token;
    // The stream ends when its session expires, as a new call would fail then.
    let left = follow.principal.expire_micros.saturating_sub(natter_kit::time::now_micros()).max(0);
    let expires = tokio::time::Instant::now()
        + std::time::Duration::from_micros(left.min(i64::from(u32::MAX) * 1_000_000) as u64);
    let active = natter_kit::metrics::StreamGuard::new();
    // Online from now (the stream is open: nothing more can refuse it)
    // until the stream is dropped.
    let online = follow.presence.then(|| follower.messages.presence().enter(UserId(user)));
    // News of users this replica lost before it reached the stream.
    let news_lost = follow.presence.then(|| follower.messages.presence().news_lost());
    // Its resyncs take their turns (Resyncs).
    let messages = follower.messages.clone();
    let stream = async_stream::try_stream! {
        // Counted in natter_active_streams and against the user's cap until
        // the stream is dropped, however it ends.
        let _active = active;
        let _online = online;
        // The three ways the stream ends, made once and polled only when one
        // of them woke the stream: a future polled at every wake-up would
        // take the shutdown token's lock (shared by every stream of the
        // process) and the session token's each time an event passes, and
        // one made anew at each would also register with them and the timer
        // wheel and leave again.
        let mut ends: FuturesUnordered<BoxFuture<'static, Wake>> = FuturesUnordered::new();
        ends.push(Box::pin(shutdown.cancelled_owned().map(|()| Wake::Shutdown)));
        ends.push(Box::pin(tokio::time::sleep_until(expires).map(|()| Wake::Expired)));
        ends.push(Box::pin(ticket.revoked().clone().cancelled_owned().map(|()| Wake::Revoked)));
        if let Some(news_lost) = news_lost {
            ends.push(Box::pin(next_loss(news_lost)));
        }
        let _ticket = ticket;
        let mut follower = follower;
        let mut user_events = user_events;
        let mut session_events = session_events;
        // Store reads still to do.
        let mut refills = refills;
        // Ephemeral news may have been lost, not yet told (EphemeralLost).
        let mut lost = false;
        for event in first {
            yield event;
        }
        loop {
            // One page at a time, each sent before the next is read: a
            // stalled client holds the stream here, and the next page is
            // read (and membership checked) only once it reads on.
            while let Some(refill) = refills.front_mut() {
                let chat = refill.chat;
                let turn = if refill.resync { Some(messages.resyncs().permit().await) } else { None };
                let (mut events, more) = follower.refill(refill).await?;
                drop(turn);
                if !more {
                    refills.pop_front();
                    events.extend(follower.held_receipts(chat));
                }
                follower.track_roles(&events).await?;
                if !every_flag {
                    follower.learn_direct(&events).await;
                }
                for event in events {
                    yield follower.shown(event, every_flag);
                }
            }
            let wake = tokio::select! {
                biased;
                Some(end) = ends.next() => end,
                event = next_of(&mut session_events) => Wake::Session(event),
                // Before any chat: a removal is seen before what the chat
                // queued after it.
                event = next_of(&mut user_events) => Wake::User(event),
                Some((chat, item)) = follower.live.next() => Wake::Chat(chat, item),
                // Last: only once nothing else is ready, so that losses
                // close together (a bus reconnect hints every topic) are
                // told once, after what they made the stream re-read.
                () = std::future::ready(()), if lost => Wake::CaughtUp,
            };
            // Ephemeral news for the stream may have been lost (it fell
            // behind a topic, the bus reconnected, or the replica lost news
            // of users on their way): the store has the chats' changes, not
            // these. A reconnect hints every topic, the
            // user's among them; a chat's topic alone is hinted when its
            // subscription, made as the user joined it, takes effect on
            // NATS, which costs the client nothing to re-read: it reads the
            // chat's people as it learns of the chat.
            lost |= follower.profiles.is_some()
                && match &wake {
                    Wake::User(Some(Err(Lagged(_)))) | Wake::Chat(_, Err(Lagged(_))) | Wake::NewsLost(_) => true,
                    Wake::User(Some(Ok(event))) => event.is_hint(),
                    _ => false,
                };
            let step = match wake {
                Wake::CaughtUp => {
                    lost = false;
                    Step::send(ephemeral_lost())
                }
                Wake::NewsLost(news_lost) => {
                    ends.push(Box::pin(next_loss(news_lost)));
                    Step::default()
                }
                // UNAVAILABLE tells clients to reconnect (elsewhere) and resume.
                Wake::Shutdown => Err(Status::unavailable("server shutting down; reconnect and resume"))?,
                Wake::Expired => Err(Status::unauthenticated("session expired"))?,
                Wake::Revoked => Err(Status::unauthenticated("session revoked"))?,
                Wake::Session(None) => {
                    session_events = None;
                    Step::default()
                }
                Wake::Session(Some(_)) => {
                    // Revoked, or lagged behind what may be a revocation
                    // (a bot's stream has no session to check).
                    if let Some(auth) = &auth {
                        let _turn = messages.resyncs().permit().await;
                        auth.recheck(&token).await?;
                    }
                    Step::default()
                }
                Wake::User(None) => {
                    user_events = None;
                    Step::default()
                }
                // A hint (the bus may have lost announcements: a reconnect,
                // or the user's topic only just subscribed on NATS) is like
                // a lag: re-read the user's chats.
                Wake::User(Some(Ok(event))) if event.is_hint() => {
                    let _turn = messages.resyncs().permit().await;
                    follower.reconcile().await?
                }
                Wake::User(Some(Ok(event))) => follower.on_user_event(&event),
                Wake::User(Some(Err(Lagged(_)))) => {
                    let _turn = messages.resyncs().permit().await;
                    follower.reconcile().await?
                }
                Wake::Chat(chat, Ok(event)) => follower.on_chat_event(chat, &event),
                // Fell behind the bus: the store has everything.
                Wake::Chat(chat, Err(Lagged(_))) => Step::refill(Refill::resync(chat)),
            };
            refills.extend(step.refill);
            let mut events = step.events;
            follower.track_roles(&events).await?;
            if !every_flag {
                follower.learn_direct(&events).await;
            }
            follower.reactions(&mut events).await?;
            for event in events {
                yield follower.shown(event, every_flag);
            }
        }
    };
    // Frames of one event to many streams of a connection: one write.
    Ok(Box::pin(natter_kit::coalesce::Coalesced::new(stream)))
}

/// The chat ids among `ids` (as the chats service lists them).
fn uuids<C: FromIterator<Uuid>>(ids: &[String]) -> C {
    ids.iter().filter_map(|c| Uuid::try_parse(c).ok()).collect()
}

/// What woke a stream up.
enum Wake {
    Shutdown,
    Expired,
    Revoked,
    Session(Option<Result<BusEvent, Lagged>>),
    User(Option<Result<BusEvent, Lagged>>),
    Chat(Uuid, Result<BusEvent, Lagged>),
    /// Nothing else was ready, with a loss not yet told.
    CaughtUp,
    /// The replica lost news of users meant for its streams
    /// ([`crate::presence::Presence::news_lost`]); the receiver, to wait for
    /// the next loss.
    NewsLost(tokio::sync::watch::Receiver<u64>),
}

/// Waits for the replica's next loss of news of users; never, once it is
/// gone.
async fn next_loss(mut news_lost: tokio::sync::watch::Receiver<u64>) -> Wake {
    match news_lost.changed().await {
        Ok(()) => Wake::NewsLost(news_lost),
        Err(_) => std::future::pending().await,
    }
}

/// `ephemeral_lost`, of no chat.
fn ephemeral_lost() -> pb::StreamEventsResponse {
    pb::StreamEventsResponse {
        event: Some(Event::EphemeralLost(pb::EphemeralLost {})),
        ..pb::StreamEventsResponse::default()
    }
}

/// A store read still to do: the changes of `chat` after its cursor.
#[derive(Clone, Copy, Debug)]
struct Refill {
    chat: Uuid,
    /// At least up to this change number (None: whatever the store has);
    /// numbers up to it that the store no longer holds (coalesced, or not
    /// for this user) are skipped.
    until: Option<i64>,
    /// The cursor when the read started: a message created after it is new
    /// to the client (set by the first page).
    since: Option<i64>,
    /// The user's departure was read and no rejoining after it yet: what
    /// follows is not theirs to see.
    absent: bool,
    /// The change number of the user's departure when the read is known to
    /// end with it ([`Follower::departed`]): the changes up to it were made
    /// while the user was a member, so their pages need no membership check
    /// (0: not known).
    departure: i64,
    /// Passes over the chat's changes that its log no longer holds (the
    /// compatibility `resume` by seq, which never resets); otherwise a
    /// read from a cursor below the log's floor ends in a `chat_reset`
    /// ([`Follower::truncated`]).
    skips_pruned: bool,
    /// A bot's stream was told that this read passes over changes its log
    /// no longer holds (its `chat_reset` went with the first page).
    told_pruned: bool,
    /// A resync's read (a hint or a lag): each page waits its turn
    /// ([`Resyncs`]).
    resync: bool,
}

impl Refill {
    fn to(chat: Uuid, until: i64) -> Self {
        Self {
            chat,
            until: Some(until),
            since: None,
            absent: false,
            departure: 0,
            skips_pruned: false,
            told_pruned: false,
            resync: false,
        }
    }

    fn all(chat: Uuid) -> Self {
        Self { until: None, ..Self::to(chat, 0) }
    }

    /// [`Refill::all`] for a resync (a hint or a lag on the chat's topic).
    fn resync(chat: Uuid) -> Self {
        Self { resync: true, ..Self::all(chat) }
    }
}

/// What a stream does about a chat it finds its user no longer belongs to
/// ([`Follower::departed`]).
enum Gone {
    /// Read the changes up to the user's departure, which ends with it.
    Replay(Refill),
    /// Send a removal of its own now ([`Follower::removed`]); nothing more
    /// of the chat.
    Removed,
}

/// What one wake-up sends: events now, then maybe a store read.
#[derive(Default)]
struct Step {
    events: Vec<pb::StreamEventsResponse>,
    refill: Vec<Refill>,
}

impl Step {
    fn send(event: pb::StreamEventsResponse) -> Self {
        Self { events: vec![event], refill: Vec::new() }
    }

    fn refill(refill: Refill) -> Self {
        Self { events: Vec::new(), refill: vec![refill] }
    }
}

/// The chats a stream follows and how far it has sent each.
struct Follower {
    messages: Arc<Messages>,
    user: Uuid,
    /// Follows every chat of the user, joining new ones.
    all: bool,
    live: StreamMap<Uuid, Subscription>,
    /// chat -> the last change number sent or skipped (only chats followed).
    cursors: HashMap<Uuid, i64>,
    /// chat -> the last change number sent of it, for chats no longer
    /// followed (the user left them, or was removed): a join at or before
    /// it was sent already (announced again: a retried delivery).
    left: HashMap<Uuid, i64>,
    /// chat -> other members' read receipts heard beyond a gap, to send
    /// once the store read that fills it is done ([`Follower::on_chat_event`]).
    receipts: HashMap<Uuid, Vec<pb::StreamEventsResponse>>,
    /// The chats the user owns or administers (see [`Follower::shown`]).
    managed: HashSet<Uuid>,
    /// chat -> whether it is a direct chat, learnt on the first flagged
    /// reply of an assistant in it (see [`Follower::shown`]; a chat's kind
    /// never changes).
    direct: HashMap<Uuid, bool>,
    /// user -> the serial of the last presence change of theirs sent (a
    /// change comes once per chat shared); None: the stream gets no
    /// presence changes (the assistant's).
    presence: Option<HashMap<Uuid, i64>>,
    /// user -> the serial of the last `user_updated` of theirs sent; `None`
    /// for a stream that gets none (the assistant's).
    profiles: Option<HashMap<Uuid, i64>>,
    /// Reads on past the changes a chat's log no longer holds instead of
    /// going on from the chat's newest change: a bot's stream (the
    /// assistant's), which needs every message (never pruned). Its
    /// `chat_reset` goes first all the same, at the point it reads on from
    /// ([`Follower::refill`]): the chat's details it keeps are stale.
    skips_pruned: bool,
}

impl Follower {
    /// Starts following `chat` live, from change `cursor` on.
    fn follow(&mut self, chat: Uuid, cursor: i64) {
        self.live.insert(chat, self.messages.bus().subscribe(Topic::Chat(chat)));
        self.cursors.insert(chat, cursor);
        self.left.remove(&chat);
    }

    /// Drops whatever the chats' subscriptions queued (before their heads
    /// are read, which cover it).
    fn drain_queued(&mut self) {
        for (_, subscription) in self.live.iter_mut() {
            drain(subscription);
        }
    }

    /// `payload` if `event` is another member's read receipt that this
    /// stream may see (not private to its reader).
    fn others_receipt(&self, event: &BusEvent, payload: &pb::StreamEventsResponse) -> Option<pb::StreamEventsResponse> {
        let Some(Event::ReadUpdated(read)) = &payload.event else { return None };
        (read.user_id != self.user.to_string() && event.is_for(UserId(self.user))).then(|| payload.clone())
    }

    /// Other members' read receipts of `chat` held for the end of a store
    /// read ([`Follower::on_chat_event`]), with the stream's change number
    /// of the chat (none if it follows the chat no more).
    fn held_receipts(&mut self, chat: Uuid) -> Vec<pb::StreamEventsResponse> {
        let held = self.receipts.remove(&chat).unwrap_or_default();
        let Some(cursor) = self.cursors.get(&chat).copied() else { return Vec::new() };
        held.into_iter().map(|receipt| pb::StreamEventsResponse { change_seq: cursor, ..receipt }).collect()
    }

    /// Stops following `chat`, whose changes were sent up to number `sent`:
    /// its subscription goes, with whatever events it still queued.
    fn unfollow(&mut self, chat: Uuid, sent: i64) {
        self.live.remove(&chat);
        self.cursors.remove(&chat);
        self.receipts.remove(&chat);
        self.left.insert(chat, sent);
    }

    /// The change number at which the message with `seq` (at most the
    /// newest) was created: where a client resuming by seq resumes; 0 for
    /// seq 0.
    async fn created_at(&self, chat: ChatId, seq: Seq, heads: Heads) -> Result<i64, MessagesError> {
        let seq = seq.min(heads.seq);
        if seq == Seq::ZERO {
            return Ok(0);
        }
        let range = Range { after: Some(Seq(seq.0 - 1)), ascending: true, superseded: true, ..Range::default() };
        let found = self.messages.store().list(chat, range, None, 1).await?;
        Ok(found.first().filter(|m| m.seq == seq).map_or(heads.change, |m| m.create_change))
    }

    /// What to do about `chat` once the stream knows its user no longer
    /// belongs to it: where the chat's log holds their departure after the
    /// cursor, replay up to it (what came before was theirs to see, and the
    /// replay sends the departure itself, then stops following the chat);
    /// otherwise (the departure not logged yet, or pruned) a removal of the
    /// stream's own, with nothing after the cursor: no change is then known
    /// to be from before the departure.
    async fn departed(&self, chat: Uuid) -> Result<Gone, Status> {
        let latest = self.messages.store().latest_membership(chat.into(), UserId(self.user)).await;
        Ok(self.gone(chat, latest.map_err(MessagesError::from)?))
    }

    /// As [`Follower::departed`], with the user's `latest` membership of
    /// `chat` read already.
    fn gone(&self, chat: Uuid, latest: Option<Membership>) -> Gone {
        let cursor = self.cursors.get(&chat).copied().unwrap_or(0);
        match latest {
            Some(Membership::Departed(n)) if n > cursor => Gone::Replay(Refill { departure: n, ..Refill::to(chat, n) }),
            _ => Gone::Removed,
        }
    }

    /// A store read of `chat` found its log pruned past the cursor (the
    /// stream fell more than the log's length behind: its client stopped
    /// reading, or the bus lagged): the changes the log no longer holds
    /// cannot be sent, so the client is told to re-read the chat, as a
    /// resume from that point is (`chat_reset`, `log_truncated`, with the
    /// chat's newest change number, where the stream goes on from). A user
    /// no longer a member gets the removal of [`Follower::removed`]
    /// instead: their departure may be among what was pruned. A change of
    /// the user's role may be among it too: whether they see others'
    /// injection flags is read again from the membership.
    async fn truncated(&mut self, chat: Uuid, heads: Heads) -> Result<(Vec<pb::StreamEventsResponse>, bool), Status> {
        match self.messages.member(chat, self.user).await {
            Ok(membership) => {
                if natter_links::manages(&membership) {
                    self.managed.insert(chat);
                } else {
                    self.managed.remove(&chat);
                }
                self.cursors.insert(chat, heads.change);
                Ok((vec![reset_event(chat.into(), heads, ResetReason::LogTruncated)], false))
            }
            Err(MessagesError::Denied(_) | MessagesError::ChatNotFound) => Ok((vec![self.removed(chat)], false)),
            Err(other) => Err(other.into()),
        }
    }

    /// The event a stream sends when it finds by itself that its user no
    /// longer belongs to `chat` (the chats service's own event was lost to
    /// it); change_seq is the last one it sent of the chat.
    fn removed(&mut self, chat: Uuid) -> pb::StreamEventsResponse {
        let change_seq = self.cursors.get(&chat).copied().unwrap_or(0);
        self.unfollow(chat, change_seq);
        pb::StreamEventsResponse {
            chat_id: chat.to_string(),
            change_seq,
            event: Some(Event::MembershipChanged(pb::MembershipChanged {
                user_id: self.user.to_string(),
                change: pb::MembershipChange::Removed as i32,
            })),
            ..Default::default()
        }
    }

    /// `event` as the user may see it: a message's injection flags only for
    /// its author and as [`Sight`] allows (`every_flag`: a bot's stream,
    /// every verdict).
    fn shown(&self, mut event: pb::StreamEventsResponse, every_flag: bool) -> pb::StreamEventsResponse {
        if let Some(Event::MessageCreated(m) | Event::MessageEdited(m) | Event::MessageDeleted(m)) = &mut event.event
            && m.flags.is_some()
            && !every_flag
            && !self.sight(&m.chat_id).sees(m.author_id.parse() == Ok(self.user), is_assistant_reply(m))
        {
            m.flags = None;
        }
        event
    }

    /// What the user sees of others' flags in `chat` (as far as known: a
    /// chat whose kind is not learnt yet counts as a group chat).
    fn sight(&self, chat: &str) -> Sight {
        let Ok(chat) = Uuid::try_parse(chat) else { return Sight::default() };
        Sight { manager: self.managed.contains(&chat), direct: self.direct.get(&chat).copied().unwrap_or(false) }
    }

    /// Learns the kind of each chat among `events` with a flagged
    /// assistant's reply whose kind is not known yet (one cached
    /// CheckMembership each; flagged replies are rare), so that
    /// [`Follower::shown`] shows those flags in direct chats. A failed
    /// look-up leaves the kind unknown (the flags hidden) and the stream
    /// open; the next flagged reply asks again.
    async fn learn_direct(&mut self, events: &[pb::StreamEventsResponse]) {
        for event in events {
            let Some(Event::MessageCreated(m) | Event::MessageEdited(m) | Event::MessageDeleted(m)) = &event.event
            else {
                continue;
            };
            if m.flags.is_none() || !is_assistant_reply(m) {
                continue;
            }
            let Ok(chat) = Uuid::try_parse(&m.chat_id) else { continue };
            if self.direct.contains_key(&chat) {
                continue;
            }
            match self.messages.chats().check_membership(&m.chat_id, &self.user.to_string()).await {
                Ok(membership) if membership.chat_exists => {
                    self.direct.insert(chat, membership.kind == natter_proto::chats::v1::ChatKind::Direct as i32);
                }
                Ok(_) => {}
                Err(status) => tracing::warn!(chat_id = %chat, error = %status.message(), "cannot read a chat's kind"),
            }
        }
    }

    /// Sets the user's own `reacted_by_me` on the live message events
    /// among `events`, in one store read: a live message keeps the counts
    /// it was announced with (the state of its change). A message announced
    /// without reactions needs no read, so the events of messages nobody
    /// reacted to cost nothing. (A replayed page gets its reactions in
    /// [`Follower::refill`].)
    async fn reactions(&self, events: &mut [pb::StreamEventsResponse]) -> Result<(), Status> {
        let ids: Vec<MessageId> = events
            .iter_mut()
            .filter_map(message_of)
            .filter(|m| !m.reactions.is_empty())
            .filter_map(|m| m.id.parse().ok())
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let found =
            self.messages.store().reactions(&ids, Some(UserId(self.user))).await.map_err(MessagesError::from)?;
        for m in events.iter_mut().filter_map(message_of) {
            let Ok(id) = m.id.parse::<MessageId>() else { continue };
            let current = found.get(&id).map_or(&[][..], Vec::as_slice);
            for r in &mut m.reactions {
                r.reacted_by_me = current.iter().any(|c| c.mine && c.emoji == r.emoji);
            }
        }
        Ok(())
    }

    /// Keeps [`Follower::managed`] current with the user's joins, role
    /// changes and departures among `events` (before they are sent: a
    /// promotion shows the flags of what follows it).
    async fn track_roles(&mut self, events: &[pb::StreamEventsResponse]) -> Result<(), Status> {
        for event in events {
            let Some(Event::MembershipChanged(change)) = &event.event else { continue };
            let Ok(chat) = Uuid::try_parse(&event.chat_id) else { continue };
            if change.user_id.parse() != Ok(self.user) {
                continue;
            }
            if is_departure(change) {
                self.managed.remove(&chat);
                continue;
            }
            let membership = self.messages.chats().check_membership(&event.chat_id, &self.user.to_string()).await?;
            if membership.member && natter_links::manages(&membership) {
                self.managed.insert(chat);
            } else {
                self.managed.remove(&chat);
            }
        }
        Ok(())
    }

    /// A membership change of the user (the user's own topic).
    fn on_user_event(&mut self, event: &BusEvent) -> Step {
        let Some(payload) = &event.payload else { return Step::default() };
        // News of the user's own account or profile, from another of their
        // tabs or devices (or this one): public streams pass it on as it is,
        // a profile only if newer than one passed on (renames racing, or
        // announced by replicas in another order than they were made).
        if let Some(Event::UserUpdated(_) | Event::AccountUpdated(_)) = &payload.event {
            let fresh = event.chat.is_none()
                && match &payload.event {
                    Some(Event::UserUpdated(_)) => news(self.profiles.as_mut(), event),
                    _ => self.profiles.is_some(),
                };
            return if fresh { Step::send(payload.clone()) } else { Step::default() };
        }
        let Some(chat) = event.chat.map(|c| c.uuid()) else { return Step::default() };
        let Some(Event::MembershipChanged(change)) = &payload.event else { return Step::default() };
        if !event.users.iter().any(|u| u.uuid() == self.user) {
            return Step::default();
        }
        let followed = self.cursors.get(&chat).copied();
        match followed {
            // Its own departure ends following at once (its copy on the
            // chat's topic goes with the subscription)...
            Some(cursor) if is_departure(change) && event.change_seq == cursor + 1 => {
                self.unfollow(chat, event.change_seq);
                Step::send(payload.clone())
            }
            // ...once the changes before it, which the user was still there
            // for, are sent: read from the store up to it (the refill sends
            // the departure, then stops following).
            Some(cursor) if is_departure(change) && event.change_seq > cursor => {
                Step::refill(Refill::to(chat, event.change_seq))
            }
            // A join announced again after the user left (a retried
            // delivery, late) was sent already, with all up to the
            // departure: not followed again.
            None if change.change == pb::MembershipChange::Joined as i32
                && self.all
                && self.left.get(&chat).is_none_or(|&sent| event.change_seq > sent) =>
            {
                // Subscribe, then catch up from the join: what the chat
                // announced before the subscription existed is read from the
                // store.
                self.follow(chat, event.change_seq);
                Step { events: vec![payload.clone()], refill: vec![Refill::all(chat)] }
            }
            _ => Step::default(),
        }
    }

    /// A presence change of a user of `chat` (ephemeral, like typing): sent
    /// once, with this chat and the stream's last change number of it,
    /// unless it is the stream's own user's or already sent (through
    /// another shared chat), or older than one sent, or unseen by the
    /// stream's user (a block either way between the two: BlockUser).
    fn on_presence(&mut self, chat: Uuid, cursor: i64, event: &BusEvent, payload: &pb::StreamEventsResponse) -> Step {
        if event.unseen_by.contains(&UserId(self.user)) || !news_of_another(self.presence.as_mut(), self.user, event) {
            return Step::default();
        }
        Step::send(pb::StreamEventsResponse { chat_id: chat.to_string(), change_seq: cursor, ..payload.clone() })
    }

    /// What others see of a user of `chat` changed (ephemeral): sent once,
    /// as it is (no chat, no change number), unless it is the stream's own
    /// user's (that comes on their own topic) or already sent through another
    /// shared chat, or older than one sent.
    fn on_profile(&mut self, event: &BusEvent, payload: &pb::StreamEventsResponse) -> Step {
        if !news_of_another(self.profiles.as_mut(), self.user, event) {
            return Step::default();
        }
        Step::send(payload.clone())
    }

    /// An event of a followed chat.
    fn on_chat_event(&mut self, chat: Uuid, event: &BusEvent) -> Step {
        let Some(cursor) = self.cursors.get(&chat).copied() else { return Step::default() };
        // Ephemeral: someone else's typing, or a piece of a reply being
        // generated, goes out at once, with this stream's last change number
        // of the chat (never a resume point of its own); nothing to store,
        // order or refill.
        if let Some(payload) = &event.payload
            && let Some(Event::Typing(_) | Event::MessageDelta(_)) = &payload.event
        {
            // The typer (or the assistant writing) is the user the event
            // concerns.
            if event.users.iter().any(|u| u.uuid() == self.user) {
                return Step::default();
            }
            return Step::send(pb::StreamEventsResponse { change_seq: cursor, ..payload.clone() });
        }
        if let Some(payload) = &event.payload
            && let Some(Event::PresenceChanged(_)) = &payload.event
        {
            return self.on_presence(chat, cursor, event, payload);
        }
        if let Some(payload) = &event.payload
            && let Some(Event::UserUpdated(_)) = &payload.event
        {
            return self.on_profile(event, payload);
        }
        // A resync hint (the bus may have lost announcements), or an event of
        // a kind this build does not know: whatever the store has beyond the
        // cursor is missed.
        let Some(payload) = event.payload.as_ref().filter(|p| p.event.is_some() && event.change_seq > 0) else {
            return Step::refill(Refill::resync(chat));
        };
        let n = event.change_seq;
        // Another member's read receipt is no change of this stream's user,
        // so a store read passes its number without it (a resume replays the
        // user's own positions only): one whose number the stream passed
        // already (a store read filled a gap up to a later change the bus
        // brought first) still goes, with the stream's change number, as
        // presence does; one beyond a gap goes after the read that fills it.
        if n <= cursor {
            return match self.others_receipt(event, payload) {
                Some(receipt) => Step::send(pb::StreamEventsResponse { change_seq: cursor, ..receipt }),
                None => Step::default(),
            };
        }
        if n > cursor + 1 {
            if let Some(receipt) = self.others_receipt(event, payload) {
                self.receipts.entry(chat).or_default().push(receipt);
            }
            return Step::refill(Refill::to(chat, n));
        }
        self.cursors.insert(chat, n);
        // A private read receipt of another member: its number is passed,
        // nothing sent.
        if !event.is_for(UserId(self.user)) {
            return Step::default();
        }
        if let Some(Event::MembershipChanged(change)) = &payload.event
            && is_departure(change)
            && event.users.iter().any(|u| u.uuid() == self.user)
        {
            self.unfollow(chat, event.change_seq);
        }
        Step::send(payload.clone())
    }

    /// After lagging on the user's topic (membership changes were lost):
    /// re-reads the user's chats, stops following those it left, and (when
    /// following every chat) starts following those it joined, from the
    /// join (replayed from the store, as a live join is), or from now with
    /// a join of its own where the chat's log no longer holds it.
    async fn reconcile(&mut self) -> Result<Step, Status> {
        let user = self.user.to_string();
        let member: HashSet<Uuid> = uuids(&self.messages.chats().member_chat_ids(&user).await?);
        let gone: Vec<Uuid> = self.cursors.keys().filter(|c| !member.contains(*c)).copied().collect();
        let (mut events, mut refills) = (Vec::new(), Vec::new());
        for chat in gone {
            match self.departed(chat).await? {
                Gone::Replay(refill) => refills.push(refill),
                Gone::Removed => events.push(self.removed(chat)),
            }
        }
        if self.all {
            let mut joined = Vec::new();
            for chat in member {
                if self.cursors.contains_key(&chat) {
                    continue;
                }
                self.follow(chat, 0);
                let store = self.messages.store();
                let heads = store.heads(chat.into()).await.map_err(MessagesError::from)?;
                let latest =
                    store.latest_membership(chat.into(), UserId(self.user)).await.map_err(MessagesError::from)?;
                let join = match latest {
                    Some(Membership::Joined(n)) => Some(n),
                    _ => None,
                };
                // Just before the join: the replay starts with it.
                self.cursors.insert(chat, join.map_or(heads.change, |n| n - 1));
                joined.push((chat, heads, join));
            }
            // Read first, check second, as when the stream opened: a chat
            // left between the listing and its heads read is not followed.
            let still: HashSet<Uuid> = if joined.is_empty() {
                HashSet::new()
            } else {
                uuids(&self.messages.chats().member_chat_ids(&user).await?)
            };
            for (chat, heads, join) in joined {
                if !still.contains(&chat) {
                    self.unfollow(chat, 0); // nothing of it sent
                    continue;
                }
                if join.is_some() {
                    refills.push(Refill::all(chat));
                    continue;
                }
                events.push(pb::StreamEventsResponse {
                    chat_id: chat.to_string(),
                    seq: heads.seq.0,
                    change_seq: heads.change,
                    event: Some(Event::MembershipChanged(pb::MembershipChanged {
                        user_id: user.clone(),
                        change: pb::MembershipChange::Joined as i32,
                    })),
                });
            }
        }
        Ok(Step { events, refill: refills })
    }

    /// Reads one page from the store of the changes of `refill.chat` after
    /// its cursor, advancing the cursor (past `refill.until` once the store
    /// has nothing more); the flag says whether more may follow.
    ///
    /// The user's own departure is sent and nothing after it but their
    /// rejoining; a read that ends with the user gone stops following the
    /// chat. Otherwise the page is sent only if the user is still a member
    /// once it has been read; if not (the departure never reached the log),
    /// the chat is no longer followed and the answer is a removal.
    async fn refill(&mut self, refill: &mut Refill) -> Result<(Vec<pb::StreamEventsResponse>, bool), Status> {
        let chat = refill.chat;
        let Some(cursor) = self.cursors.get(&chat).copied() else { return Ok((Vec::new(), false)) };
        if refill.until.is_some_and(|u| cursor >= u) {
            return Ok((Vec::new(), false));
        }
        let since = *refill.since.get_or_insert(cursor);
        let (mut changes, mut more) = self
            .messages
            .store()
            .changes(chat.into(), self.user.into(), cursor, REPLAY_PAGE)
            .await
            .map_err(MessagesError::from)?;
        // Read after the changes: a floor above the cursor now was above it
        // then, or rose past it since (a reset the client did not strictly
        // need then, never a gap). A catch-up to the user's departure goes
        // on regardless: the client drops the chat at its end. A bot's
        // stream reads on too, whatever its resume point: it needs the
        // messages, which stay; but it is told first, once per read, with
        // a reset at its cursor (where it reads on from), as it may have
        // missed a change of the chat's details it keeps.
        let check = if self.skips_pruned { !refill.told_pruned } else { !refill.skips_pruned };
        let mut told = None;
        if check && !refill.absent && refill.departure <= cursor {
            let heads = self.messages.store().heads(chat.into()).await.map_err(MessagesError::from)?;
            if heads.floor > cursor {
                if !self.skips_pruned {
                    return self.truncated(chat, heads).await;
                }
                refill.told_pruned = true;
                told = Some(reset_event(chat.into(), Heads { change: cursor, ..heads }, ResetReason::LogTruncated));
            }
        }
        let mut bytes = 0;
        if let Some(past) = changes.iter().position(|c| {
            bytes += c.weight();
            bytes > REPLAY_PAGE_BYTES
        }) && past + 1 < changes.len()
        {
            changes.truncate(past + 1);
            more = true;
        }
        let me = UserId(self.user);
        // The page's reactions as the user sees them now, in one read, of
        // the messages that have any.
        let reacted: Vec<MessageId> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Message(m) if m.reaction_rows > 0 && !m.deleted() => Some(m.id),
                _ => None,
            })
            .collect();
        if !reacted.is_empty() {
            let mut found = self.messages.store().reactions(&reacted, Some(me)).await.map_err(MessagesError::from)?;
            for change in &mut changes {
                if let Change::Message(m) = change
                    && let Some(reactions) = found.remove(&m.id)
                {
                    m.reactions = reactions;
                }
            }
        }
        let mut out = Vec::with_capacity(changes.len());
        let mut last = cursor;
        for change in changes {
            last = change.change_seq();
            let send = match &change {
                Change::Chat { change: ChatChange::Left(u) | ChatChange::Removed(u), .. } if *u == me => {
                    refill.absent = true;
                    true
                }
                Change::Chat { change: ChatChange::Joined(u), .. } if *u == me => {
                    refill.absent = false;
                    true
                }
                _ => !refill.absent,
            };
            if send {
                out.push(change);
            }
        }
        if !more {
            last = last.max(refill.until.unwrap_or(0));
        }
        if refill.absent {
            if more {
                self.cursors.insert(chat, last);
            } else {
                self.unfollow(chat, last);
            }
            return Ok((told.into_iter().chain(replayed(chat, out, since, true)).collect(), more));
        }
        // Changes to send, or numbers the store no longer holds (a chat
        // deleted, its log purged, while the stream read up to the removal
        // that told it so: that removal is then not in the store either).
        let mut member = false;
        if (!out.is_empty() || last > cursor) && last > refill.departure {
            // Read first, check second: a member now was a member when every
            // change of the page was made. One who is not was a member up to
            // their departure, if the log holds it further on.
            match self.messages.member(chat, self.user).await {
                Ok(_) => member = true,
                Err(MessagesError::Denied(_) | MessagesError::ChatNotFound) => match self.departed(chat).await? {
                    Gone::Replay(to) if to.departure > last => *refill = Refill { since: refill.since, ..to },
                    Gone::Replay(_) | Gone::Removed => return Ok((vec![self.removed(chat)], false)),
                },
                Err(other) => return Err(other.into()),
            }
        }
        self.cursors.insert(chat, last);
        // A member now of a chat the stream has no subscription to: it
        // replayed a departure found as it opened (which subscribes to
        // nothing) and read on into the user's rejoining. Subscribe, then
        // read on to the store's end, which covers what the chat announced
        // before the subscription existed; the live events the store read
        // covered are dropped by the cursor.
        if member && !self.live.contains_key(&chat) {
            self.live.insert(chat, self.messages.bus().subscribe(Topic::Chat(chat)));
            refill.until = None;
            more = true;
        }
        // Short of a departure still to come, the user is a member now.
        Ok((told.into_iter().chain(replayed(chat, out, since, refill.departure > last)).collect(), more))
    }
}

/// The events replaying `changes` of `chat` to a client whose resume point
/// was `since` ([`replay_event`]). `gone`: the user left the chat (or was
/// removed) after these changes and is not back: each is sent as it was
/// while they could see it. A message carries its state as of its change
/// number, save for an assistant's reply still GENERATING, whose
/// checkpoints store its text without taking a number: written, for all the
/// store says, after the departure, so the reply goes as it started, with
/// no text (its end, a change of its own, comes after the departure and is
/// not sent), and a chat's update, which goes without title and description
/// (the log holds only the newest, maybe given after the departure).
fn replayed(chat: Uuid, changes: Vec<Change>, since: i64, gone: bool) -> Vec<pb::StreamEventsResponse> {
    changes
        .into_iter()
        .map(|mut change| {
            match &mut change {
                Change::Message(m) if gone && m.generation() == Some(Generation::Generating) => m.text.clear(),
                // Every `updated` entry of the log holds the chat's newest
                // title and description (a replaced one is not replayed):
                // maybe given after the departure, so neither goes.
                Change::Chat { change: ChatChange::Updated(d), .. } if gone => {
                    d.title.clear();
                    d.description.clear();
                    d.fields.retain(|field| field != "title" && field != "description");
                }
                _ => {}
            }
            replay_event(chat.into(), change, since)
        })
        .collect()
}

/// The message of a created or edited message event (tombstones have no
/// reactions).
fn message_of(event: &mut pb::StreamEventsResponse) -> Option<&mut pb::Message> {
    match &mut event.event {
        Some(Event::MessageCreated(m) | Event::MessageEdited(m)) => Some(m),
        _ => None,
    }
}

/// True for an assistant's reply (role ASSISTANT).
fn is_assistant_reply(m: &pb::Message) -> bool {
    m.role == pb::MessageRole::Assistant as i32
}
/// Whether `event`, news of its one user (a presence change, a rename) that
/// reached a stream of `own` through one of their shared chats, is to be
/// passed on (see [`news`]), and not the stream's own user's.
fn news_of_another(sent: Option<&mut HashMap<Uuid, i64>>, own: Uuid, event: &BusEvent) -> bool {
    event.users.first().is_some_and(|user| user.uuid() != own) && news(sent, event)
}

/// Whether `event`, news of its one user, is to be passed on, and if so
/// records it in `sent` (user -> the serial of the last news of them passed
/// on): not when the stream gets none of that kind (`sent` is None: the
/// assistant's), and not a copy (through another shared chat, or on another
/// topic) or older news than one passed on.
fn news(sent: Option<&mut HashMap<Uuid, i64>>, event: &BusEvent) -> bool {
    let (Some(sent), Some(user)) = (sent, event.users.first()) else { return false };
    if sent.get(&user.uuid()).is_some_and(|last| *last >= event.change_seq) {
        return false;
    }
    sent.insert(user.uuid(), event.change_seq);
    true
}

/// A leave or a removal.
fn is_departure(change: &pb::MembershipChanged) -> bool {
    change.change == pb::MembershipChange::Left as i32 || change.change == pb::MembershipChange::Removed as i32
}

/// Drops whatever `subscription` has queued.
fn drain(subscription: &mut Subscription) {
    while let Some(Some(_)) = subscription.recv().now_or_never() {}
}

/// The next event of an optional subscription (never, without one).
async fn next_of(subscription: &mut Option<Subscription>) -> Option<Result<BusEvent, Lagged>> {
    match subscription {
        // As a stream, whose receive stays registered with the topic between
        // wake-ups (a `recv` future would register and leave at each one).
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, OnceLock, Weak};

    use async_trait::async_trait;
    use natter_db::DbConfig;
    use natter_proto::chats::v1 as cpb;

    use super::*;
    use crate::MessagesArgs;
    use crate::domain::{EditMessage, React, SendMessage};
    use crate::registry::StreamRegistry;
    use crate::store::{CHAT_LOG_KEEP, ChatChange, Message, Started};

    #[test]
    fn a_follow_s_debug_leaves_its_token_out() {
        let principal =
            Principal { user_id: Uuid::now_v7(), session_id: Uuid::now_v7(), guest: false, expire_micros: 0 };
        let token = "natter-secret-token-123".to_owned();
        let follow = Follow { principal, token, chat_ids: Vec::new(), resume: HashMap::new(), presence: true };
        let shown = format!("{follow:?}");
        assert!(!shown.contains("natter-secret-token-123") && shown.contains("<redacted>"), "{shown}");
    }

    /// Who is in which chat, with one removal that happens right after the
    /// chats service answered the stream's first membership read: the
    /// removal races the stream's opening as closely as it can.
    #[derive(Default)]
    struct Directory {
        members: Mutex<HashSet<(Uuid, Uuid)>>,
        /// (chat, user): removed, and logged in the messages store as the
        /// chats service's delivery would, right after the next answer
        /// about the user (a membership check or a listing).
        remove_after_answer: Mutex<Option<(Uuid, Uuid)>>,
        /// A user whose chats cannot be listed (the chats service out of
        /// reach, for this user only).
        unlistable: Mutex<Option<Uuid>>,
        /// The chat's members version, raised by each removal above.
        members_version: Mutex<i64>,
        /// A members version kept from before (a replica's cached check),
        /// answered instead until `forget_membership` drops it.
        kept_version: Mutex<Option<i64>>,
        /// How often `forget_membership` was called.
        forgotten: Mutex<usize>,
        /// Held for writing, listings of a user's chats wait (the chats
        /// service slow to answer).
        listing_gate: tokio::sync::RwLock<()>,
        /// Listings of a user's chats under way (waiting at the gate
        /// included).
        listings_under_way: std::sync::atomic::AtomicUsize,
        /// Listings of a user's chats answered.
        listings_answered: std::sync::atomic::AtomicUsize,
        messages: OnceLock<Weak<Messages>>,
    }

    impl Directory {
        async fn remove_if_armed(&self, user: Uuid) {
            let armed = self.remove_after_answer.lock().unwrap().take_if(|(_, u)| *u == user);
            let Some((chat, user)) = armed else { return };
            self.members.lock().unwrap().remove(&(chat, user));
            let version = {
                let mut version = self.members_version.lock().unwrap();
                *version += 1;
                *version
            };
            let messages = self.messages.get().and_then(Weak::upgrade).unwrap();
            messages.record_departure(chat.into(), version).await.unwrap();
            messages.record_chat_changes(chat.into(), &[ChatChange::Removed(UserId(user))], "", None).await.unwrap();
        }
    }

    #[async_trait]
    impl natter_links::ChatDirectory for Directory {
        async fn check_memberships(
            &self,
            request: cpb::CheckMembershipRequest,
        ) -> Result<cpb::CheckMembershipResponse, Status> {
            let (chat, user) = (Uuid::parse_str(&request.chat_id).unwrap(), Uuid::parse_str(&request.user_id).unwrap());
            let member = self.members.lock().unwrap().contains(&(chat, user));
            let answer = cpb::CheckMembershipResponse {
                chat_exists: true,
                member,
                role: if member { cpb::MemberRole::Member as i32 } else { 0 },
                other_members: vec![false; request.other_user_ids.len()],
                members_version: self.kept_version.lock().unwrap().unwrap_or(*self.members_version.lock().unwrap()),
                ..Default::default()
            };
            self.remove_if_armed(user).await;
            Ok(answer)
        }

        fn forget_membership(&self, _: &str, _: &str) {
            *self.kept_version.lock().unwrap() = None;
            *self.forgotten.lock().unwrap() += 1;
        }

        async fn member_chat_ids(&self, user_id: &str) -> Result<Vec<String>, Status> {
            use std::sync::atomic::Ordering::SeqCst;
            self.listings_under_way.fetch_add(1, SeqCst);
            drop(self.listing_gate.read().await);
            self.listings_under_way.fetch_sub(1, SeqCst);
            self.listings_answered.fetch_add(1, SeqCst);
            let user = Uuid::parse_str(user_id).unwrap();
            if *self.unlistable.lock().unwrap() == Some(user) {
                return Err(Status::unavailable("chats service out of reach"));
            }
            let chats: Vec<String> =
                self.members.lock().unwrap().iter().filter(|(_, u)| *u == user).map(|(c, _)| c.to_string()).collect();
            self.remove_if_armed(user).await;
            Ok(chats)
        }

        async fn managed_chat_ids(&self, _: &str) -> Result<Vec<String>, Status> {
            Ok(Vec::new())
        }

        async fn record_activity(&self, _: Vec<cpb::Activity>) -> Result<(), Status> {
            Ok(())
        }
    }

    /// A chat of an owner and a member, on a messages service of its own.
    struct Harness {
        messages: Arc<Messages>,
        directory: Arc<Directory>,
        chat: Uuid,
        owner: Uuid,
        member: Uuid,
        /// The bus the service publishes on (in-process, as all-in-one).
        hub: Arc<natter_bus::Hub>,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        async fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = crate::store::open(&DbConfig::sqlite_in(dir.path(), "messages")).await.unwrap();
            let directory = Arc::new(Directory::default());
            let hub = Arc::new(natter_bus::Hub::new());
            let bus: Arc<dyn natter_bus::EventBus> = hub.clone();
            let messages = Arc::new(Messages::new(store, directory.clone(), bus, &MessagesArgs::default()));
            directory.messages.set(Arc::downgrade(&messages)).unwrap();
            let (chat, owner, member) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
            directory.members.lock().unwrap().extend([(chat, owner), (chat, member)]);
            Self { messages, directory, chat, owner, member, hub, _dir: dir }
        }

        /// The member's stream of `chat_ids` (empty: all their chats).
        async fn stream_of_member(&self, chat_ids: Vec<Uuid>) -> EventStream {
            self.stream_of_member_from(chat_ids, HashMap::new()).await
        }

        /// The member's stream of `chat_ids` (empty: all their chats),
        /// resuming chats as `resume` says.
        async fn stream_of_member_from(&self, chat_ids: Vec<Uuid>, resume: HashMap<Uuid, Resume>) -> EventStream {
            self.open_of_member(Follow { chat_ids, resume, presence: false, ..self.follow_of_member() }).await
        }

        /// The member's public stream (as StreamEvents opens it, not the
        /// assistant's FollowChats) of `chat_ids` (empty: all their chats).
        async fn public_stream_of_member(&self, chat_ids: Vec<Uuid>) -> EventStream {
            self.open_of_member(Follow { chat_ids, ..self.follow_of_member() }).await
        }

        /// A public stream of every chat of the member, from now on.
        fn follow_of_member(&self) -> Follow {
            let principal =
                Principal { user_id: self.member, session_id: Uuid::now_v7(), guest: false, expire_micros: i64::MAX };
            Follow { principal, token: "token".into(), chat_ids: Vec::new(), resume: HashMap::new(), presence: true }
        }

        async fn open_of_member(&self, follow: Follow) -> EventStream {
            let ticket = StreamRegistry::new(Default::default()).admit(&follow.principal, "token").unwrap();
            open(self.messages.clone(), None, CancellationToken::new(), ticket, follow).await.unwrap()
        }

        /// A message of `text` to the chat.
        fn send_of_owner(&self, text: &str) -> SendMessage {
            SendMessage {
                chat_id: self.chat.into(),
                message_id: None,
                text: text.into(),
                attachments: Vec::new(),
                reply_to: None,
                mentions: Vec::new(),
                thread_root: None,
            }
        }

        /// A message of `text` by the owner as the store takes it: stored
        /// this way, it is announced to nobody.
        fn unannounced(&self, text: &str) -> crate::store::NewMessage {
            crate::store::NewMessage {
                id: MessageId::new_v7(),
                chat_id: self.chat.into(),
                author_id: UserId(self.owner),
                text: text.into(),
                attachments: Vec::new(),
                reply_to: None,
                send_time: natter_kit::time::now_micros(),
                flags: None,
                mentions: Vec::new(),
                thread_root: None,
                members_version: 0,
            }
        }

        /// A send of `text` by the owner.
        fn owner_sends(&self, text: &str) -> impl std::future::Future<Output = Result<Message, MessagesError>> + '_ {
            self.messages.send(UserId(self.owner), self.send_of_owner(text))
        }
    }

    /// A send whose membership check is older than a departure the
    /// messages service recorded since (a check kept from before, or one
    /// answered just before a removal) is refused in its write and checked
    /// again, afresh, once: a member still in sends, a member removed meanwhile
    /// is refused as any non-member, and a second refusal is ABORTED.
    #[tokio::test]
    async fn a_send_checked_before_a_departure_is_checked_again_after_its_write_refused_it() {
        let h = Harness::start().await;
        // Someone else left: version 1 recorded; the owner's check, kept
        // from before, says 0.
        *h.directory.members_version.lock().unwrap() = 1;
        *h.directory.kept_version.lock().unwrap() = Some(0);
        h.messages.record_departure(h.chat.into(), 1).await.unwrap();
        let sent = h.owner_sends("still here").await.unwrap();
        assert_eq!((sent.seq, *h.directory.forgotten.lock().unwrap()), (Seq(1), 1), "checked again, then stored");

        // The member's check answers "member", then the removal is recorded
        // before the write.
        *h.directory.remove_after_answer.lock().unwrap() = Some((h.chat, h.member));
        let send = h.messages.send(UserId(h.member), h.send_of_owner("on its way"));
        let refused = send.await.unwrap_err();
        assert!(matches!(refused, MessagesError::Denied("not a member of this chat")), "{refused:?}");

        // A departure recorded above any version the chats service answers
        // (its check cannot catch up): refused twice, ABORTED.
        h.messages.record_departure(h.chat.into(), 9).await.unwrap();
        let refused = h.owner_sends("again").await.unwrap_err();
        assert!(matches!(refused, MessagesError::Aborted(_)), "{refused:?}");
        assert_eq!(h.messages.store().head(h.chat.into()).await.unwrap(), Seq(1), "nothing stored but the first");
    }

    /// A reaction or an edit whose membership check is older than a
    /// departure the messages service recorded since is refused in its
    /// write and checked again, afresh, once: a member still in makes the
    /// change; an author removed meanwhile is refused as any non-member,
    /// their text as it was.
    #[tokio::test]
    async fn an_edit_or_a_reaction_checked_before_a_departure_is_checked_again_after_its_write_refused_it() {
        let h = Harness::start().await;
        let (owner, member) = (UserId(h.owner), UserId(h.member));
        let mine = h.messages.send(member, h.send_of_owner("mine")).await.unwrap();
        // Someone else left: version 1 recorded; the owner's check, kept
        // from before, says 0.
        *h.directory.members_version.lock().unwrap() = 1;
        *h.directory.kept_version.lock().unwrap() = Some(0);
        h.messages.record_departure(h.chat.into(), 1).await.unwrap();
        let react = React { message_id: mine.id, emoji: "👍".into(), add: true, as_sent: None };
        let reacted = h.messages.react(owner, react).await.unwrap();
        let forgotten = *h.directory.forgotten.lock().unwrap();
        assert_eq!((reacted.reactions.len(), forgotten), (1, 1), "checked again, then stored");

        // The author's check answers "member", then the removal is recorded
        // before the write.
        *h.directory.remove_after_answer.lock().unwrap() = Some((h.chat, h.member));
        let edit = EditMessage { message_id: mine.id, text: "edited on its way".into() };
        let refused = h.messages.edit(member, edit).await.unwrap_err();
        assert!(matches!(refused, MessagesError::Denied("not a member of this chat")), "{refused:?}");
        let stored = h.messages.store().message(mine.id).await.unwrap().unwrap();
        assert_eq!((stored.text.as_str(), stored.revision), ("mine", 1), "not edited");
    }

    /// A COMPLETE finish of a reply (here by the member, as an assistant
    /// writes one) whose author's check is older than a departure recorded
    /// since is refused in its write and checked again, afresh, once: an
    /// author still a member (someone else left) ends it COMPLETE; one
    /// whose check answered "member" just before their removal was
    /// recorded ends it STOPPED, with the text sent, as a checkpoint after
    /// the removal would have. Before, the check and the write were apart:
    /// the removal between them was not seen, and the reply was stored
    /// COMPLETE in a chat its author had left.
    #[tokio::test]
    async fn a_finish_checked_before_a_departure_is_checked_again_after_its_write_refused_it() {
        use crate::store::{Finish, Generation, GenerationInfo, NewReply};
        let h = Harness::start().await;
        let store = h.messages.store().clone();
        let start = |prompt: MessageId| NewReply {
            id: MessageId(Uuid::now_v7()),
            chat_id: h.chat.into(),
            author_id: UserId(h.member),
            prompt,
            replaces: None,
            now: 1,
            finished: None,
            owner: None,
            members_version: None,
        };
        let info = GenerationInfo { model: "m".into(), finish_reason: "stop".into(), ..Default::default() };
        let finish = Finish {
            text: "the whole answer".into(),
            status: Generation::Complete,
            info: info.clone(),
            flags: None,
            restore_replaced: false,
            stale_before: None,
            members_version: None,
        };
        let ended =
            |reply: &Message| (reply.generation(), reply.text.clone(), reply.reply.as_ref().unwrap().info.clone());

        // Someone else left: version 1 recorded; the author's check, kept
        // from before, says 0.
        let prompt = h.owner_sends("@assistant one").await.unwrap();
        let Started::Created(reply, _) = store.start_reply(&start(prompt.id)).await.unwrap() else { panic!("started") };
        *h.directory.members_version.lock().unwrap() = 1;
        *h.directory.kept_version.lock().unwrap() = Some(0);
        h.messages.record_departure(h.chat.into(), 1).await.unwrap();
        let done = h.messages.finish_reply(reply.id, &finish).await.unwrap();
        let complete = (Some(Generation::Complete), "the whole answer".to_owned(), Some(info.clone()));
        assert_eq!((ended(&done), *h.directory.forgotten.lock().unwrap()), (complete, 1), "checked again, then stored");

        // The author's check answers "member", then their removal is
        // recorded before the write.
        let prompt = h.owner_sends("@assistant two").await.unwrap();
        let Started::Created(reply, _) = store.start_reply(&start(prompt.id)).await.unwrap() else { panic!("started") };
        *h.directory.remove_after_answer.lock().unwrap() = Some((h.chat, h.member));
        let done = h.messages.finish_reply(reply.id, &finish).await.unwrap();
        let stopped = (Some(Generation::Stopped), "the whole answer".to_owned(), Some(info.clone()));
        assert_eq!(ended(&done), stopped);
        assert_eq!(ended(&store.message(reply.id).await.unwrap().unwrap()), stopped, "as stored");
    }

    /// A resync hint on the user's topic (what a peer replica's death
    /// sends every stream) has each of the user's streams re-read their
    /// chats from the chats service, [`RESYNC_READS`] at a time: the
    /// others wait their turn, and all have re-read once the service
    /// answers. Before, every stream asked at once.
    #[tokio::test]
    async fn a_hint_to_every_stream_has_them_re_read_their_chats_a_few_at_a_time() {
        use std::sync::atomic::Ordering::SeqCst;
        let h = Harness::start().await;
        let streams = RESYNC_READS + 4;
        let mut polled = Vec::new();
        for _ in 0..streams {
            let mut stream = h.stream_of_member(Vec::new()).await;
            polled.push(tokio::spawn(async move { while stream.next().await.is_some() {} }));
        }
        let answered = h.directory.listings_answered.load(SeqCst);
        let slow = h.directory.listing_gate.write().await;
        let hint = Arc::new(natter_bus::Event::resync_hint(Topic::User(h.member)).unwrap());
        h.messages.bus().publish(Topic::User(h.member), hint);
        // Every stream has either asked or is waiting its turn.
        let (asking, waiting) = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let seen = (h.directory.listings_under_way.load(SeqCst), h.messages.resyncs().waiting());
                if seen.0 + seen.1 >= streams {
                    return seen;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("every stream took the hint");
        assert_eq!((asking, waiting), (RESYNC_READS, streams - RESYNC_READS), "asking at once, waiting their turn");

        drop(slow);
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while h.directory.listings_answered.load(SeqCst) < answered + streams {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("all have re-read");
        assert_eq!(h.messages.resyncs().waiting(), 0);
        for task in polled {
            assert!(!task.is_finished(), "the streams go on");
            task.abort();
        }
    }

    /// The next event of `stream` (ten seconds at most: a bound, not a wait).
    async fn next_event(stream: &mut EventStream) -> pb::StreamEventsResponse {
        tokio::time::timeout(std::time::Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap()
    }

    /// The first event of a stream of the member that opens (on the chat,
    /// or on `every_chat` of theirs) while the member is removed from the
    /// chat, once the owner has sent a message to the chat.
    async fn first_event_of_a_stream_opening_during_a_removal(every_chat: bool) -> pb::StreamEventsResponse {
        let h = Harness::start().await;
        *h.directory.remove_after_answer.lock().unwrap() = Some((h.chat, h.member));
        let mut stream = h.stream_of_member(if every_chat { Vec::new() } else { vec![h.chat] }).await;
        assert!(h.directory.remove_after_answer.lock().unwrap().is_none(), "removed while the stream opened");
        h.owner_sends("after the removal").await.unwrap();
        next_event(&mut stream).await
    }

    /// A bot's stream (the assistant's: FollowChats resumes by seq, from
    /// the bot's read position) that resumes below the chat's log floor
    /// reads every message on (messages are never pruned), but is told
    /// first, with a chat_reset at its resume point: a change of the chat's
    /// details that the bot keeps (the assistant's reply setting) may be
    /// among what the log no longer holds.
    #[tokio::test]
    async fn a_bot_s_stream_resuming_below_the_log_s_floor_is_told_and_reads_every_message_on() {
        let h = Harness::start().await;
        let seen = h.owner_sends("seen").await.unwrap();
        h.owner_sends("unseen").await.unwrap();
        let churn: Vec<ChatChange> = (0..=CHAT_LOG_KEEP).map(|_| ChatChange::RoleChanged(UserId(h.owner))).collect();
        h.messages.record_chat_changes(h.chat.into(), &churn, "", None).await.unwrap();
        h.owner_sends("after").await.unwrap();
        let resume = [(h.chat, Resume::Seq(seen.seq))].into();
        let mut stream = h.stream_of_member_from(vec![h.chat], resume).await;
        let first = next_event(&mut stream).await;
        let reset = Event::ChatReset(pb::ChatReset { reason: "log_truncated".into() });
        assert_eq!(first.event, Some(reset), "told before anything else: {first:?}");
        assert_eq!(first.change_seq, seen.create_change, "at the point it reads on from");
        let mut texts = Vec::new();
        while texts.last().is_none_or(|t| t != "after") {
            if let Some(Event::MessageCreated(m)) = next_event(&mut stream).await.event {
                texts.push(m.text);
            }
        }
        assert_eq!(texts, ["unseen", "after"], "every message after the resume point");
    }

    /// A store that is gone (closed here; in production a database out of
    /// reach) answers UNAVAILABLE, which clients retry with a backoff, not
    /// INTERNAL.
    #[tokio::test]
    async fn a_send_to_a_store_that_is_gone_is_unavailable() {
        let h = Harness::start().await;
        h.messages.store().close().await;
        let status = Status::from(h.owner_sends("lost?").await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(!status.message().contains("closed"), "nothing of the cause: {status:?}");
    }

    #[tokio::test]
    async fn a_message_whose_send_was_cancelled_while_committing_still_reaches_open_streams() {
        let h = Harness::start().await;
        let mut stream = h.stream_of_member(vec![h.chat]).await;
        // The client goes away (a reset, a deadline) once its message is
        // with the writer, before the commit answers.
        let mut send = Box::pin(h.owner_sends("sent, then cancelled"));
        assert!(futures::poll!(&mut send).is_pending(), "waiting for the commit");
        drop(send);
        let event = next_event(&mut stream).await;
        let Some(Event::MessageCreated(message)) = &event.event else { panic!("the message: {event:?}") };
        assert_eq!(message.text, "sent, then cancelled");
    }

    /// A message committed but announced by nobody (its batch's commit
    /// reported a failure) reaches the streams when its sender retries; a
    /// retry of one they have is not sent twice.
    #[tokio::test]
    async fn a_retried_send_announces_what_was_never_announced_and_nothing_twice() {
        let h = Harness::start().await;
        let mut stream = h.stream_of_member(vec![h.chat]).await;
        let unannounced = h.unannounced("committed unseen");
        let id = unannounced.id;
        h.messages.store().insert_batch(&[unannounced]).await.unwrap();
        let retry = SendMessage { message_id: Some(id), ..h.send_of_owner("committed unseen") };
        assert_eq!(h.messages.send(UserId(h.owner), retry.clone()).await.unwrap().id, id);
        let created = |event: &pb::StreamEventsResponse| match &event.event {
            Some(Event::MessageCreated(m)) => m.text.clone(),
            _ => panic!("{event:?}"),
        };
        assert_eq!(created(&next_event(&mut stream).await), "committed unseen");
        // Retried again: the stream has it, and drops it.
        h.messages.send(UserId(h.owner), retry).await.unwrap();
        h.owner_sends("next").await.unwrap();
        assert_eq!(created(&next_event(&mut stream).await), "next");
    }

    /// The kind of each event, as a short name (`message:<text>` for a
    /// message created).
    fn kind(event: &pb::StreamEventsResponse) -> String {
        match &event.event {
            Some(Event::MessageCreated(m)) => format!("message:{}", m.text),
            Some(Event::Typing(_)) => "typing".into(),
            Some(Event::EphemeralLost(_)) => {
                assert_eq!((event.chat_id.as_str(), event.seq, event.change_seq), ("", 0, 0), "of no chat");
                "ephemeral_lost".into()
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The kinds of the events of `stream` up to and including the first
    /// `last`.
    async fn kinds_until(stream: &mut EventStream, last: &str) -> Vec<String> {
        let mut kinds = Vec::new();
        while kinds.last().is_none_or(|k| k != last) {
            kinds.push(kind(&next_event(stream).await));
        }
        kinds
    }

    /// A client reading slower than its chat's events come: its stream
    /// falls behind the chat's topic. The message it missed comes from the
    /// store, what the topic still held follows, and then, once, the news
    /// that ephemeral events (here typing; in general presence and renames)
    /// may have been lost, which the store cannot replay.
    #[tokio::test]
    async fn a_stream_that_fell_behind_is_told_once_that_ephemeral_events_may_be_lost() {
        let h = Harness::start().await;
        let mut stream = h.public_stream_of_member(vec![h.chat]).await;
        h.owner_sends("missed live").await.unwrap();
        // The owner's typing, more than the topic holds, while the client
        // reads nothing: the message's announcement and the first typing
        // are lost.
        let until = natter_kit::time::now_micros() + 5_000_000;
        for _ in 0..natter_bus::TOPIC_CAPACITY {
            let typing = crate::grpc::typing_event(h.chat.into(), UserId(h.owner), until);
            let event = natter_bus::Event::new(h.chat.into(), typing).concerning(UserId(h.owner));
            h.messages.bus().publish(Topic::Chat(h.chat), Arc::new(event));
        }
        let kinds = kinds_until(&mut stream, "ephemeral_lost").await;
        assert_eq!(kinds[0], "message:missed live", "from the store, first");
        // Then what the topic held: the typing (less any slot the member's
        // own presence change took, which the stream passes over).
        let held = &kinds[1..kinds.len() - 1];
        assert!(held.iter().all(|k| k == "typing") && held.len() <= natter_bus::TOPIC_CAPACITY, "{held:?}");
        // Told last, and once: nothing else is ready, and the next event is
        // the next message.
        assert!(futures::poll!(stream.next()).is_pending(), "all sent before it");
        h.owner_sends("after").await.unwrap();
        assert_eq!(kind(&next_event(&mut stream).await), "message:after");
    }

    /// The bus reconnected (every topic hinted, as NATS's client does after
    /// a reconnect): the stream re-reads its chats and its user's, then says
    /// once that ephemeral events may have been lost. The assistant's
    /// internal stream, which gets no ephemeral news of users, is not told.
    #[tokio::test]
    async fn a_bus_that_reconnected_is_told_once_on_public_streams_only() {
        let h = Harness::start().await;
        let other = Uuid::now_v7();
        h.directory.members.lock().unwrap().extend([(other, h.owner), (other, h.member)]);
        let mut public = h.public_stream_of_member(Vec::new()).await;
        let mut internal = h.stream_of_member(Vec::new()).await;
        // Stored while the bus was away: announced to nobody.
        h.messages.store().insert_batch(&[h.unannounced("while the bus was away")]).await.unwrap();
        h.hub.resync();
        assert_eq!(
            kinds_until(&mut public, "ephemeral_lost").await,
            ["message:while the bus was away", "ephemeral_lost"]
        );
        assert_eq!(kind(&next_event(&mut internal).await), "message:while the bus was away");
        h.owner_sends("after").await.unwrap();
        for stream in [&mut public, &mut internal] {
            assert_eq!(kind(&next_event(stream).await), "message:after");
        }
    }

    /// The replica's presence task fell behind the presence topic, which
    /// carries renames for every stream of the replica: public streams are
    /// told that ephemeral events may have been lost; the assistant's
    /// internal one is not.
    #[tokio::test]
    async fn a_replica_that_lost_news_of_users_tells_its_public_streams() {
        let h = Harness::start().await;
        let mut public = h.public_stream_of_member(Vec::new()).await;
        let mut internal = h.stream_of_member(Vec::new()).await;
        // More than the topic holds, published without a pause for the
        // presence task (this test's runtime has one thread): news of no
        // one's here (not hints, which tell a loss of their own).
        let nobodys = natter_bus::Event::account_updated(UserId(Uuid::now_v7()), pb::AccountChange::BlockedUsers);
        for _ in 0..=natter_bus::PRESENCE_TOPIC_CAPACITY {
            h.messages.bus().publish(Topic::Presence, Arc::new(nobodys.clone()));
        }
        assert_eq!(kind(&next_event(&mut public).await), "ephemeral_lost");
        h.owner_sends("after").await.unwrap();
        for stream in [&mut public, &mut internal] {
            assert_eq!(kind(&next_event(stream).await), "message:after");
        }
    }

    /// Another replica lost its NATS connection while it published on the
    /// presence topic (a rename, say) and hints it once back: public
    /// streams are told that ephemeral events may have been lost, once; the
    /// assistant's internal one is not.
    #[tokio::test]
    async fn a_presence_hint_from_a_replica_that_lost_its_connection_is_told_as_lost() {
        let h = Harness::start().await;
        let mut public = h.public_stream_of_member(Vec::new()).await;
        let mut internal = h.stream_of_member(Vec::new()).await;
        h.messages.bus().publish(Topic::Presence, Arc::new(natter_bus::Event::default()));
        assert_eq!(kind(&next_event(&mut public).await), "ephemeral_lost");
        h.owner_sends("after").await.unwrap();
        for stream in [&mut public, &mut internal] {
            assert_eq!(kind(&next_event(stream).await), "message:after");
        }
    }

    /// The owner renames themself while the chats service cannot list
    /// their chats to this replica, which hands a rename to the streams of
    /// those chats: the member's stream is told that it may have missed
    /// one.
    #[tokio::test]
    async fn a_rename_the_replica_cannot_pass_on_is_told_as_lost() {
        let h = Harness::start().await;
        let mut stream = h.public_stream_of_member(Vec::new()).await;
        *h.directory.unlistable.lock().unwrap() = Some(h.owner);
        let rename = natter_bus::Event::user_updated(UserId(h.owner), "owner".into(), "Renamed".into(), 1);
        h.messages.bus().publish(Topic::Presence, Arc::new(rename));
        assert_eq!(kind(&next_event(&mut stream).await), "ephemeral_lost");
    }

    /// A group deleted: the chats service records each member's removal
    /// (announced on the chat's topic and each member's), then has the
    /// messages service purge the chat. The member's stream takes their own
    /// removal (on their topic) first, ahead of the owner's still queued on
    /// the chat's, so it reads the store up to it; by then the purge has
    /// taken the log. The stream still tells the member they are out.
    #[tokio::test]
    async fn a_stream_reading_up_to_its_removal_from_a_chat_purged_meanwhile_sends_the_removal() {
        let h = Harness::start().await;
        let mut stream = h.public_stream_of_member(Vec::new()).await;
        h.directory.members.lock().unwrap().retain(|(chat, _)| *chat != h.chat);
        let removals = [ChatChange::Removed(UserId(h.owner)), ChatChange::Removed(UserId(h.member))];
        h.messages.record_chat_changes(h.chat.into(), &removals, "", None).await.unwrap();
        h.messages.store().purge_chat(h.chat.into()).await.unwrap();
        let event = next_event(&mut stream).await;
        let of_member = matches!(&event.event, Some(Event::MembershipChanged(m)) if m.user_id == h.member.to_string());
        assert!(is_removal_of(&event) && of_member && event.chat_id == h.chat.to_string(), "{event:?}");
        // And it follows the chat no more: what the topic still held of it
        // (the owner's removal) is not sent.
        assert!(futures::poll!(stream.next()).is_pending(), "nothing after the removal");
    }

    #[tokio::test]
    async fn a_chat_joined_while_the_stream_lagged_is_replayed_from_the_join() {
        let h = Harness::start().await;
        let mut stream = h.stream_of_member(Vec::new()).await;
        // The member joins another chat, and the announcement is lost (only
        // the store has it); two messages follow there.
        let other = Uuid::now_v7();
        h.directory.members.lock().unwrap().extend([(other, h.owner), (other, h.member)]);
        let joined = [ChatChange::Joined(UserId(h.member))];
        h.messages.store().record_chat_changes(other.into(), &joined, 1, "").await.unwrap();
        for text in ["first", "second"] {
            let send = SendMessage { chat_id: other.into(), text: text.into(), ..h.send_of_owner("") };
            h.messages.send(UserId(h.owner), send).await.unwrap();
        }
        // The user's topic tells the stream it may have missed changes.
        let hint = Arc::new(natter_bus::Event::resync_hint(Topic::User(h.member)).unwrap());
        h.messages.bus().publish(Topic::User(h.member), hint);

        let join = next_event(&mut stream).await;
        assert!(
            matches!(&join.event, Some(Event::MembershipChanged(m)) if m.change == pb::MembershipChange::Joined as i32),
            "{join:?}"
        );
        // Then the join's reset of the member's read position, and both
        // messages.
        let mut texts = Vec::new();
        while texts.len() < 2 {
            let event = next_event(&mut stream).await;
            assert_eq!(event.chat_id, other.to_string());
            match &event.event {
                Some(Event::MessageCreated(message)) => texts.push(message.text.clone()),
                Some(Event::ReadUpdated(_)) => {}
                _ => panic!("{event:?}"),
            }
        }
        assert_eq!(texts, ["first", "second"]);
    }

    /// The owner's read position (public) as its event carries it.
    fn owner_read(h: &Harness, read_seq: Seq, change_seq: i64) -> BusEvent {
        let payload = crate::grpc::read_event(h.chat.into(), UserId(h.owner), read_seq, change_seq);
        Arc::new(natter_bus::Event::new(h.chat.into(), payload).concerning(UserId(h.owner)))
    }

    /// Whether `event` is the owner's read receipt, and at which seq.
    fn owners_read(h: &Harness, event: &pb::StreamEventsResponse) -> Option<i64> {
        match &event.event {
            Some(Event::ReadUpdated(r)) if r.user_id == h.owner.to_string() => Some(r.read_seq),
            _ => None,
        }
    }

    /// Two read positions move close together, the owner's (change N) then
    /// the member's own (N + 1), and the bus brings the member's first: the
    /// member's stream fills the gap from the store, which holds only the
    /// member's own positions for them, and passes N. The owner's receipt,
    /// coming after, still goes (with the stream's change number); before,
    /// it was dropped as seen, and the member's page never showed it.
    #[tokio::test]
    async fn another_member_s_receipt_the_bus_brought_after_a_later_change_still_goes() {
        let h = Harness::start().await;
        let mut stream = h.stream_of_member(vec![h.chat]).await;
        let sent = h.owner_sends("read me").await.unwrap();
        assert_eq!(kind(&next_event(&mut stream).await), "message:read me");
        let owners = h.messages.store().mark_read(h.chat.into(), UserId(h.owner), sent.seq, 0).await.unwrap();
        let crate::store::Marked::Done(crate::store::ReadState { change_seq: Some(n), .. }) = owners else {
            panic!("a change: {owners:?}")
        };
        let mark = crate::domain::MarkRead { chat_id: h.chat.into(), seq: sent.seq };
        h.messages.mark_read_as(UserId(h.member), mark).await.unwrap();
        let own = next_event(&mut stream).await;
        assert!(matches!(&own.event, Some(Event::ReadUpdated(r)) if r.user_id == h.member.to_string()), "{own:?}");
        assert_eq!(own.change_seq, n + 1);
        h.messages.bus().publish(Topic::Chat(h.chat), owner_read(&h, sent.seq, n));
        let receipt = next_event(&mut stream).await;
        assert_eq!((owners_read(&h, &receipt), receipt.change_seq), (Some(sent.seq.0), n + 1), "{receipt:?}");
    }

    /// The owner's receipt comes beyond a gap (a message the bus never
    /// brought): the stream reads the gap from the store, then sends the
    /// receipt, with its change number then; before, the store read passed
    /// the receipt's number and it was lost.
    #[tokio::test]
    async fn another_member_s_receipt_beyond_a_gap_goes_after_the_gap_is_read() {
        let h = Harness::start().await;
        let mut stream = h.stream_of_member(vec![h.chat]).await;
        h.owner_sends("live").await.unwrap();
        assert_eq!(kind(&next_event(&mut stream).await), "message:live");
        let missed = h.messages.store().insert_batch(&[h.unannounced("missed")]).await.unwrap();
        let crate::store::Sent::Created(missed) = &missed[0] else { panic!("{missed:?}") };
        let seq = missed.seq;
        let owners = h.messages.store().mark_read(h.chat.into(), UserId(h.owner), seq, 0).await.unwrap();
        let crate::store::Marked::Done(crate::store::ReadState { change_seq: Some(n), .. }) = owners else {
            panic!("a change: {owners:?}")
        };
        h.messages.bus().publish(Topic::Chat(h.chat), owner_read(&h, seq, n));
        assert_eq!(kind(&next_event(&mut stream).await), "message:missed");
        let receipt = next_event(&mut stream).await;
        assert_eq!((owners_read(&h, &receipt), receipt.change_seq), (Some(seq.0), n), "{receipt:?}");
    }

    /// The member joins another chat and leaves it again, their stream
    /// following both; then the join is announced again (a late retry of
    /// the chats service's delivery, which announces again what it
    /// records). The stream, which follows that chat no more, takes
    /// nothing of it: before, it followed it again and replayed the join
    /// and all up to the departure a second time.
    #[tokio::test]
    async fn a_join_announced_again_after_the_user_left_replays_nothing() {
        let h = Harness::start().await;
        let mut stream = h.stream_of_member(Vec::new()).await;
        h.owner_sends("live").await.unwrap();
        assert_eq!(kind(&next_event(&mut stream).await), "message:live");
        let other = Uuid::now_v7();
        h.directory.members.lock().unwrap().extend([(other, h.owner), (other, h.member)]);
        let join = [ChatChange::Joined(UserId(h.member))];
        h.messages.record_chat_changes(other.into(), &join, "join", None).await.unwrap();
        h.directory.members.lock().unwrap().remove(&(other, h.member));
        let leave = [ChatChange::Left(UserId(h.member))];
        h.messages.record_chat_changes(other.into(), &leave, "leave", None).await.unwrap();
        loop {
            let event = next_event(&mut stream).await;
            let left = matches!(&event.event, Some(Event::MembershipChanged(m)) if m.change == pb::MembershipChange::Left as i32);
            if event.chat_id == other.to_string() && left {
                break;
            }
        }
        // The join's delivery retried late: announced again.
        h.messages.record_chat_changes(other.into(), &join, "join", None).await.unwrap();
        h.owner_sends("marker").await.unwrap();
        let next = next_event(&mut stream).await;
        assert_eq!((next.chat_id.as_str(), kind(&next).as_str()), (h.chat.to_string().as_str(), "message:marker"));
    }

    /// The member left the chat; their stream of every chat opens with a
    /// resume point of it from before (so it replays up to the departure),
    /// and the member joins again before the stream's replay reads past
    /// the departure. The replay goes on into the rejoining, and the chat
    /// is followed live from there (before: no subscription was made, so
    /// nothing more of the chat came until a reconnect).
    #[tokio::test]
    async fn a_chat_rejoined_while_its_departure_is_replayed_is_followed_live() {
        let h = Harness::start().await;
        h.owner_sends("before").await.unwrap();
        h.directory.members.lock().unwrap().remove(&(h.chat, h.member));
        h.messages.record_chat_changes(h.chat.into(), &[ChatChange::Left(UserId(h.member))], "", None).await.unwrap();
        let resume = HashMap::from([(h.chat, Resume::Changes(0))]);
        let mut stream = h.stream_of_member_from(Vec::new(), resume).await;
        // Opened (its replay of the departure queued), not read yet.
        h.directory.members.lock().unwrap().insert((h.chat, h.member));
        h.messages.record_chat_changes(h.chat.into(), &[ChatChange::Joined(UserId(h.member))], "", None).await.unwrap();
        h.owner_sends("after the rejoining").await.unwrap();
        let shown = |event: &pb::StreamEventsResponse| match &event.event {
            Some(Event::MessageCreated(m)) => m.text.clone(),
            Some(Event::MembershipChanged(m)) => format!("{:?}", pb::MembershipChange::try_from(m.change).unwrap()),
            other => format!("{other:?}"),
        };
        let mut events = Vec::new();
        while events.last().is_none_or(|e| e != "after the rejoining") {
            let event = next_event(&mut stream).await;
            if !matches!(event.event, Some(Event::ReadUpdated(_))) {
                events.push(shown(&event));
            }
        }
        assert_eq!(events, ["before", "Left", "Joined", "after the rejoining"]);
        h.owner_sends("live").await.unwrap();
        assert_eq!(shown(&next_event(&mut stream).await), "live", "followed live");
    }

    fn is_removal_of(event: &pb::StreamEventsResponse) -> bool {
        matches!(&event.event, Some(Event::MembershipChanged(m)) if m.change == pb::MembershipChange::Removed as i32)
    }

    /// The texts of the messages a stream sends up to the member's removal,
    /// and the removal's change number.
    async fn texts_until_the_removal(stream: &mut EventStream) -> (Vec<String>, i64) {
        let mut texts = Vec::new();
        loop {
            let event = next_event(stream).await;
            match &event.event {
                Some(Event::MessageCreated(m)) => texts.push(m.text.clone()),
                _ if is_removal_of(&event) => return (texts, event.change_seq),
                _ => panic!("{event:?}"),
            }
        }
    }

    /// What a member who resumes (the chat, or `every_chat` of theirs)
    /// from the first of three messages gets when they are removed while
    /// their stream opens, and the owner then sends one more.
    async fn a_resumed_stream_opening_during_a_removal(every_chat: bool) -> ((Vec<String>, i64), i64) {
        let h = Harness::start().await;
        let seen = h.owner_sends("seen").await.unwrap();
        for text in ["missed 1", "missed 2"] {
            h.owner_sends(text).await.unwrap();
        }
        *h.directory.remove_after_answer.lock().unwrap() = Some((h.chat, h.member));
        let resume = HashMap::from([(h.chat, Resume::Changes(seen.change_seq))]);
        let mut stream = h.stream_of_member_from(if every_chat { Vec::new() } else { vec![h.chat] }, resume).await;
        assert!(h.directory.remove_after_answer.lock().unwrap().is_none(), "removed while the stream opened");
        h.owner_sends("after the removal").await.unwrap();
        let latest = h.messages.store().latest_membership(h.chat.into(), UserId(h.member)).await.unwrap();
        let Some(Membership::Departed(removal)) = latest else { panic!("{latest:?}") };
        (texts_until_the_removal(&mut stream).await, removal)
    }

    #[tokio::test]
    async fn a_member_removed_while_their_resumed_stream_of_the_chat_opens_gets_what_came_before_the_removal() {
        let (got, removal) = a_resumed_stream_opening_during_a_removal(false).await;
        assert_eq!(got, (vec!["missed 1".to_owned(), "missed 2".to_owned()], removal), "then the removal as logged");
    }

    #[tokio::test]
    async fn a_member_removed_while_their_resumed_stream_of_every_chat_opens_gets_what_came_before_the_removal() {
        let (got, removal) = a_resumed_stream_opening_during_a_removal(true).await;
        assert_eq!(got, (vec!["missed 1".to_owned(), "missed 2".to_owned()], removal), "then the removal as logged");
    }

    /// A stream that lost the announcements of two messages and of its
    /// member's removal (only the store has them), then re-reads its chats
    /// on a hint, sends the two messages, then the removal.
    #[tokio::test]
    async fn a_stream_that_lost_a_removal_sends_what_came_before_it_then_the_removal() {
        let h = Harness::start().await;
        let mut stream = h.stream_of_member(Vec::new()).await;
        let store = h.messages.store();
        store.insert_batch(&[h.unannounced("missed 1"), h.unannounced("missed 2")]).await.unwrap();
        h.directory.members.lock().unwrap().remove(&(h.chat, h.member));
        let removed = [ChatChange::Removed(UserId(h.member))];
        let logged = store.record_chat_changes(h.chat.into(), &removed, natter_kit::time::now_micros(), "").await;
        store.insert_batch(&[h.unannounced("after the removal")]).await.unwrap();
        let hint = Arc::new(natter_bus::Event::resync_hint(Topic::User(h.member)).unwrap());
        h.messages.bus().publish(Topic::User(h.member), hint);
        let (texts, removal) = texts_until_the_removal(&mut stream).await;
        assert_eq!(texts, ["missed 1", "missed 2"]);
        assert_eq!(removal, logged.unwrap()[0].change_seq, "the removal as logged");
    }

    /// A replay of long messages is read about a megabyte at a time, not a
    /// page of 256 (a client that stops reading holds its stream at the
    /// page it was sent), and the next read goes on from where it stopped.
    #[tokio::test]
    async fn a_replay_of_long_messages_holds_about_a_megabyte_at_a_time() {
        let h = Harness::start().await;
        let long = |i: usize| h.unannounced(&format!("{i:<8}{}", "x".repeat(32 * 1024 - 8)));
        let batch: Vec<_> = (0..100).map(long).collect();
        h.messages.store().insert_batch(&batch).await.unwrap();
        let mut follower = follower_from_the_start(&h);
        let mut refill = Refill::all(h.chat);
        let mut pages = Vec::new();
        loop {
            let (events, more) = follower.refill(&mut refill).await.unwrap();
            let text = |e: &pb::StreamEventsResponse| match &e.event {
                Some(Event::MessageCreated(m)) => m.text.len(),
                _ => 0,
            };
            let bytes: usize = events.iter().map(text).sum();
            assert!(bytes < REPLAY_PAGE_BYTES + 64 * 1024, "{bytes} bytes in a page");
            pages.push(events.iter().map(|e| e.seq).collect::<Vec<_>>());
            if !more {
                break;
            }
        }
        assert!(pages.len() >= 3, "{} pages", pages.len());
        assert_eq!(pages.concat(), (1..=100).collect::<Vec<_>>(), "each message once, in order");
    }

    /// A gap longer than a page of the store, then the member's removal,
    /// all unannounced: the first page's membership check finds the member
    /// gone, and the stream still sends every page up to the removal.
    #[tokio::test]
    async fn a_gap_of_many_pages_before_a_removal_is_sent_whole() {
        let h = Harness::start().await;
        let mut stream = h.stream_of_member(vec![h.chat]).await;
        let count = REPLAY_PAGE as usize + 44;
        let batch: Vec<_> = (0..count).map(|i| h.unannounced(&format!("missed {i}"))).collect();
        let store = h.messages.store();
        store.insert_batch(&batch).await.unwrap();
        h.directory.members.lock().unwrap().remove(&(h.chat, h.member));
        let removed = [ChatChange::Removed(UserId(h.member))];
        store.record_chat_changes(h.chat.into(), &removed, natter_kit::time::now_micros(), "").await.unwrap();
        // The chat's topic says announcements may have been lost.
        let hint = Arc::new(natter_bus::Event::resync_hint(Topic::Chat(h.chat)).unwrap());
        h.messages.bus().publish(Topic::Chat(h.chat), hint);
        let (texts, _) = texts_until_the_removal(&mut stream).await;
        assert_eq!(texts.len(), count, "every message before the removal");
        assert_eq!(texts.last().map(String::as_str), Some(format!("missed {}", count - 1).as_str()));
    }

    /// The owner's prompt and an assistant's reply to it still GENERATING
    /// (both unannounced), then `filler` more messages; then the member is
    /// removed (logged, unannounced), and the reply's next checkpoint
    /// stores text written after the removal. Returns the reply's id.
    async fn a_reply_written_on_after_a_removal(h: &Harness, filler: usize) -> MessageId {
        let store = h.messages.store();
        let prompt = h.unannounced("prompt");
        let reply = crate::store::NewReply {
            id: MessageId::new_v7(),
            chat_id: h.chat.into(),
            author_id: UserId(Uuid::now_v7()),
            prompt: prompt.id,
            replaces: None,
            now: natter_kit::time::now_micros(),
            finished: None,
            owner: None,
            members_version: None,
        };
        store.insert_batch(&[prompt]).await.unwrap();
        assert!(matches!(store.start_reply(&reply).await.unwrap(), crate::store::Started::Created(..)));
        let batch: Vec<_> = (0..filler).map(|i| h.unannounced(&format!("filler {i}"))).collect();
        if !batch.is_empty() {
            store.insert_batch(&batch).await.unwrap();
        }
        h.directory.members.lock().unwrap().remove(&(h.chat, h.member));
        let removed = [ChatChange::Removed(UserId(h.member))];
        store.record_chat_changes(h.chat.into(), &removed, natter_kit::time::now_micros(), "").await.unwrap();
        let now = store.clock().await.unwrap();
        assert_eq!(
            store.checkpoint_reply(reply.id, Some("written after the removal"), now).await.unwrap(),
            Some(false)
        );
        reply.id
    }

    /// A reply whose author (the assistant) is taken out of its chat while
    /// it is written is told to stop at its next checkpoint, whichever
    /// replica generates it and whether or not that one heard of the
    /// removal: the stop flag is set as StopReply sets it, so every later
    /// checkpoint answers it too. An update without a checkpoint (deltas
    /// only) asks nothing.
    #[tokio::test]
    async fn a_checkpoint_of_a_reply_whose_author_was_taken_out_answers_stop() {
        let h = Harness::start().await;
        let store = h.messages.store();
        let prompt = h.unannounced("prompt");
        store.insert_batch(std::slice::from_ref(&prompt)).await.unwrap();
        let (chat, author) = (ChatId(h.chat), UserId(h.member));
        let reply = crate::store::NewReply {
            id: MessageId::new_v7(),
            chat_id: chat,
            author_id: author,
            prompt: prompt.id,
            replaces: None,
            now: natter_kit::time::now_micros(),
            finished: None,
            owner: None,
            members_version: Some(0),
        };
        assert!(matches!(store.start_reply(&reply).await.unwrap(), crate::store::Started::Created(..)));
        let update =
            |text: Option<&str>| h.messages.update_reply(chat, reply.id, author, Vec::new(), text.map(str::to_owned));
        assert!(!update(Some("so far")).await.unwrap(), "a member's reply goes on");
        h.directory.members.lock().unwrap().remove(&(h.chat, h.member));
        assert!(!update(None).await.unwrap(), "deltas only: nothing asked");
        assert!(update(Some("so far, and more")).await.unwrap(), "its author is no member: stop");
        let stored = store.message(reply.id).await.unwrap().unwrap();
        assert!(stored.reply.as_ref().is_some_and(|r| r.stop_requested), "the stop flag is set: {stored:?}");
        assert_eq!(stored.text, "so far, and more", "the text so far is kept");
        assert!(update(Some("so far, and more")).await.unwrap(), "and answered again");
    }

    /// The reply among `events`: its text and status.
    fn reply_among(events: &[pb::StreamEventsResponse], id: MessageId) -> (String, i32) {
        let reply = events.iter().find_map(|e| match &e.event {
            Some(Event::MessageCreated(m)) if m.id == id.to_string() => Some((m.text.clone(), m.generation_status)),
            _ => None,
        });
        reply.unwrap_or_else(|| panic!("the reply is among {events:?}"))
    }

    /// The member's follower of the chat from its first change, reading
    /// the store directly.
    fn follower_from_the_start(h: &Harness) -> Follower {
        Follower {
            messages: h.messages.clone(),
            user: h.member,
            all: false,
            live: StreamMap::new(),
            cursors: HashMap::from([(h.chat, 0)]),
            left: HashMap::new(),
            receipts: HashMap::new(),
            managed: HashSet::new(),
            direct: HashMap::new(),
            presence: None,
            profiles: None,
            skips_pruned: false,
        }
    }

    const GENERATING: i32 = pb::GenerationStatus::Generating as i32;

    /// A user's own renames reach their streams in the order the database
    /// numbered them, whatever order their announcements arrive in (renames
    /// racing, replicas announcing out of order): one older than a rename
    /// sent is dropped, as for the renames of others. Account changes all
    /// go out.
    #[tokio::test]
    async fn a_user_s_own_rename_older_than_one_sent_is_dropped() {
        let h = Harness::start().await;
        let mut follower = Follower { profiles: Some(HashMap::new()), ..follower_from_the_start(&h) };
        let renamed = |name: &str, serial| {
            Arc::new(natter_bus::Event::user_updated(UserId(h.member), "member".into(), name.into(), serial))
        };
        let names = |step: Step| -> Vec<String> {
            step.events
                .into_iter()
                .filter_map(|e| match e.event {
                    Some(Event::UserUpdated(u)) => Some(u.display_name),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(names(follower.on_user_event(&renamed("second", 2))), ["second"]);
        assert_eq!(names(follower.on_user_event(&renamed("first", 1))), Vec::<String>::new(), "older: dropped");
        assert_eq!(names(follower.on_user_event(&renamed("third", 3))), ["third"]);
        let account = Arc::new(natter_bus::Event::account_updated(UserId(h.member), pb::AccountChange::BlockedUsers));
        for _ in 0..2 {
            assert_eq!(follower.on_user_event(&account).events.len(), 1, "each account change goes out");
        }
    }

    /// The privacy audit's L4: a stream that lost the announcements of a
    /// reply's start and of its member's removal re-reads its chats on a
    /// hint and catches up to the removal: the reply, still GENERATING,
    /// comes as it started, without the text written since the removal.
    #[tokio::test]
    async fn a_stream_catching_up_to_a_removal_sends_a_reply_being_written_without_its_later_text() {
        let h = Harness::start().await;
        let mut stream = h.stream_of_member(Vec::new()).await;
        let reply = a_reply_written_on_after_a_removal(&h, 0).await;
        let hint = Arc::new(natter_bus::Event::resync_hint(Topic::User(h.member)).unwrap());
        h.messages.bus().publish(Topic::User(h.member), hint);
        let mut events = Vec::new();
        loop {
            let event = next_event(&mut stream).await;
            let removal = is_removal_of(&event);
            events.push(event);
            if removal {
                break;
            }
        }
        assert_eq!(reply_among(&events, reply), (String::new(), GENERATING));
        let shown = format!("{events:?}");
        assert!(!shown.contains("written after the removal"), "{shown}");
    }

    /// The same catch-up read from the store without knowing of the
    /// removal: the page that holds it, and (the removal beyond the first
    /// page) a page whose membership check finds the member gone. A member
    /// still in the chat gets the reply's text so far.
    #[tokio::test]
    async fn a_catch_up_ending_at_a_removal_sends_a_reply_being_written_without_its_later_text() {
        for filler in [0, REPLAY_PAGE as usize] {
            let h = Harness::start().await;
            let reply = a_reply_written_on_after_a_removal(&h, filler).await;
            let (events, _) = follower_from_the_start(&h).refill(&mut Refill::all(h.chat)).await.unwrap();
            assert_eq!(reply_among(&events, reply), (String::new(), GENERATING), "{filler} messages after it");
            assert_eq!(events.iter().any(is_removal_of), filler == 0, "the removal on the first page");
            // Back in the chat, the member reads what a member may.
            h.directory.members.lock().unwrap().insert((h.chat, h.member));
            let joined = [ChatChange::Joined(UserId(h.member))];
            h.messages.store().record_chat_changes(h.chat.into(), &joined, 1, "").await.unwrap();
            let (events, _) = follower_from_the_start(&h).refill(&mut Refill::all(h.chat)).await.unwrap();
            assert_eq!(reply_among(&events, reply), ("written after the removal".to_owned(), GENERATING));
        }
    }

    #[tokio::test]
    async fn a_member_removed_while_their_stream_of_the_chat_opens_gets_the_removal_not_the_chat() {
        let first = first_event_of_a_stream_opening_during_a_removal(false).await;
        assert!(is_removal_of(&first), "the removal, not what was sent after it: {first:?}");
    }

    #[tokio::test]
    async fn a_member_removed_while_their_stream_of_every_chat_opens_gets_the_removal_not_the_chat() {
        let first = first_event_of_a_stream_opening_during_a_removal(true).await;
        assert!(is_removal_of(&first), "the removal, not what was sent after it: {first:?}");
    }
}

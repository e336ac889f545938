//! StreamEvents: live events of a caller's chats with exact resume.
//!
//! The order of operations is what makes the switch-over gap-free: subscribe
//! to the bus first, then read each chat's head from the store, then replay
//! the store from the client's resume point, then go live. Every chat keeps a
//! cursor (the last seq delivered); a live message event at or below it is a
//! duplicate and dropped, one right after it is delivered, and one further
//! ahead means announcements were missed, so the gap is filled from the store
//! first. The bus may therefore drop, reorder or lag without a client seeing
//! a gap or a duplicate. (Centrifugo's stream recovery works on the same idea:
//! history is the truth, pub/sub is the hint.)
//!
//! A member removed from a chat receives nothing sent after the removal,
//! however long their stream stalled:
//! - the stream follows its user's topic, where the chats service announces
//!   every join, leave and removal, and polls it before any chat: the chat's
//!   subscription, with whatever it still queues, is dropped when the
//!   removal is seen;
//! - every read from the store (replay, gap fill, a lag, a resync hint)
//!   re-checks membership after reading a page and before sending any of it,
//!   so a page is sent only if the caller was still a member after it was
//!   read. A stream that finds itself no longer a member this way, or that
//!   lagged on its user's topic and re-read its chats, sends a
//!   `MEMBERSHIP_CHANGE_REMOVED` event of its own (seq: the last seq it
//!   sent of that chat) and stops following the chat.
//!
//! A live event that arrives in order costs no membership check. In split
//! mode a removal reaches a replica over NATS, so a message sent right after
//! a removal can reach that replica's streams before the removal does; the
//! window is the bus's delivery time, as for revocations (DESIGN.md).

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use natter_auth::{Authenticator, Principal};
use natter_bus::{Lagged, Shared as BusEvent, Subscription, Topic};
use natter_proto::messages::v1 as pb;
use pb::stream_events_response::Event;
use tokio_stream::StreamMap;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

use crate::error::MessagesError;
use crate::grpc::{created_event, message_pb};
use crate::registry::Ticket;
use crate::service::Messages;
use crate::store::{Range, Seq};

/// How many messages one store read of a replay or gap fill returns.
const REPLAY_PAGE: u32 = 256;

/// The response stream of StreamEvents.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::StreamEventsResponse, Status>> + Send + 'static>>;

/// A validated StreamEvents request.
#[derive(Clone, Debug)]
pub struct Follow {
    pub principal: Principal,
    /// The caller's token, re-checked when its session is revoked.
    pub token: String,
    /// Empty: every chat of the caller, including chats joined later.
    pub chat_ids: Vec<Uuid>,
    /// chat -> last seq the client saw.
    pub resume: HashMap<Uuid, i64>,
}

/// Opens a stream admitted by `ticket` (held until the stream is dropped).
/// Errors that concern the request (not a member, unknown chat) are returned
/// here, before any event, as the call's status.
pub async fn open(
    messages: Arc<Messages>,
    auth: Authenticator,
    shutdown: CancellationToken,
    ticket: Ticket,
    follow: Follow,
) -> Result<EventStream, MessagesError> {
    let user = follow.principal.user_id;
    let bus = messages.bus().clone();
    let all = follow.chat_ids.is_empty();
    // Subscribe to the user's topic before listing chats, so a chat joined
    // (or left) in between is not missed.
    let user_events = Some(bus.subscribe(Topic::User(user)));
    let chats: Vec<Uuid> = if all {
        messages
            .chats()
            .member_chat_ids(&user.to_string())
            .await?
            .iter()
            .filter_map(|c| Uuid::try_parse(c).ok())
            .collect()
    } else {
        for chat in &follow.chat_ids {
            messages.member(*chat, user).await?;
        }
        follow.chat_ids.clone()
    };
    let session_events = Some(bus.subscribe(Topic::Session(follow.principal.session_id)));

    let mut follower = Follower { messages, user, all, live: StreamMap::new(), cursors: HashMap::new() };
    for chat in &chats {
        let head = follower.messages.store().head((*chat).into()).await?.0;
        let start = follow.resume.get(chat).map_or(head, |seen| (*seen).clamp(0, head));
        follower.follow(*chat, start);
    }
    // Chats to replay from the store before going live; resume entries for
    // chats the caller no longer follows (left, removed, deleted) are ignored.
    let replay: VecDeque<(Uuid, Option<i64>)> =
        follow.resume.keys().filter(|chat| follower.cursors.contains_key(*chat)).map(|chat| (*chat, None)).collect();
    tracing::debug!(user_id = %user, chats = chats.len(), replay = replay.len(), "stream opened");

    let token = follow.token;
    // The stream ends when its session expires, as a new call would fail then.
    let left = follow.principal.expire_micros.saturating_sub(natter_kit::time::now_micros()).max(0);
    let expires = tokio::time::Instant::now()
        + std::time::Duration::from_micros(left.min(i64::from(u32::MAX) * 1_000_000) as u64);
    let active = natter_kit::metrics::StreamGuard::new();
    let stream = async_stream::try_stream! {
        // Counted in natter_active_streams and against the user's cap until
        // the stream is dropped, however it ends.
        let _active = active;
        let revoked = ticket.revoked().clone();
        let _ticket = ticket;
        let mut follower = follower;
        let mut user_events = user_events;
        let mut session_events = session_events;
        // Store reads still to do: (chat, up to which seq at least).
        let mut refills = replay;
        loop {
            // One page at a time, each sent before the next is read: a
            // stalled client holds the stream here, and the next page is
            // read (and membership checked) only once it reads on.
            while let Some((chat, until)) = refills.front().copied() {
                let (events, more) = follower.refill(chat, until).await?;
                if !more {
                    refills.pop_front();
                }
                for event in events {
                    yield event;
                }
            }
            let wake = tokio::select! {
                biased;
                () = shutdown.cancelled() => Wake::Shutdown,
                () = tokio::time::sleep_until(expires) => Wake::Expired,
                () = revoked.cancelled() => Wake::Revoked,
                event = next_of(&mut session_events) => Wake::Session(event),
                // Before any chat: a removal is seen before what the chat
                // queued after it.
                event = next_of(&mut user_events) => Wake::User(event),
                Some((chat, item)) = follower.live.next() => Wake::Chat(chat, item),
            };
            let step = match wake {
                // UNAVAILABLE tells clients to reconnect (elsewhere) and resume.
                Wake::Shutdown => Err(Status::unavailable("server shutting down; reconnect and resume"))?,
                Wake::Expired => Err(Status::unauthenticated("session expired"))?,
                Wake::Revoked => Err(Status::unauthenticated("session revoked"))?,
                Wake::Session(None) => {
                    session_events = None;
                    Step::default()
                }
                Wake::Session(Some(_)) => {
                    // Revoked, or lagged behind what may be a revocation.
                    auth.check(&token).await?;
                    Step::default()
                }
                Wake::User(None) => {
                    user_events = None;
                    Step::default()
                }
                Wake::User(Some(Ok(event))) => follower.on_user_event(&event),
                Wake::User(Some(Err(Lagged(_)))) => follower.reconcile().await?,
                Wake::Chat(chat, Ok(event)) => follower.on_chat_event(chat, event),
                // Fell behind the bus: the store has everything.
                Wake::Chat(chat, Err(Lagged(_))) => Step { refill: Some((chat, None)), ..Step::default() },
            };
            refills.extend(step.refill);
            for event in step.events {
                yield event;
            }
        }
    };
    Ok(Box::pin(stream.map(|item: Result<pb::StreamEventsResponse, Status>| item)))
}

/// What woke a stream up.
enum Wake {
    Shutdown,
    Expired,
    Revoked,
    Session(Option<Result<BusEvent, Lagged>>),
    User(Option<Result<BusEvent, Lagged>>),
    Chat(Uuid, Result<BusEvent, Lagged>),
}

/// What one wake-up sends: events now, then maybe a store read.
#[derive(Default)]
struct Step {
    events: Vec<pb::StreamEventsResponse>,
    refill: Option<(Uuid, Option<i64>)>,
}

impl Step {
    fn send(event: pb::StreamEventsResponse) -> Self {
        Self { events: vec![event], refill: None }
    }
}

/// The chats a stream follows and how far it has sent each.
struct Follower {
    messages: Arc<Messages>,
    user: Uuid,
    /// Follows every chat of the user, joining new ones.
    all: bool,
    live: StreamMap<Uuid, Subscription>,
    /// chat -> the last seq sent of it (only chats followed).
    cursors: HashMap<Uuid, i64>,
}

impl Follower {
    /// Starts following `chat` live, from `cursor` on.
    fn follow(&mut self, chat: Uuid, cursor: i64) {
        self.live.insert(chat, self.messages.bus().subscribe(Topic::Chat(chat)));
        self.cursors.insert(chat, cursor);
    }

    /// Stops following `chat`: its subscription goes, with whatever events
    /// it still queued.
    fn unfollow(&mut self, chat: Uuid) {
        self.live.remove(&chat);
        self.cursors.remove(&chat);
    }

    /// The event a stream sends when it finds by itself that its user no
    /// longer belongs to `chat` (the chats service's own event was lost to
    /// it); seq is the last one it sent of the chat.
    fn removed(&mut self, chat: Uuid) -> pb::StreamEventsResponse {
        let seq = self.cursors.get(&chat).copied().unwrap_or(0);
        self.unfollow(chat);
        pb::StreamEventsResponse {
            chat_id: chat.to_string(),
            seq,
            event: Some(Event::MembershipChanged(pb::MembershipChanged {
                user_id: self.user.to_string(),
                change: pb::MembershipChange::Removed as i32,
            })),
        }
    }

    /// A membership change of the user (the user's own topic).
    fn on_user_event(&mut self, event: &BusEvent) -> Step {
        let Some(chat) = event.chat.map(|c| c.uuid()) else { return Step::default() };
        let Some(payload) = &event.payload else { return Step::default() };
        let Some(Event::MembershipChanged(change)) = &payload.event else { return Step::default() };
        if !event.users.iter().any(|u| u.uuid() == self.user) {
            return Step::default();
        }
        let followed = self.cursors.contains_key(&chat);
        if is_departure(change) && followed {
            self.unfollow(chat);
            return Step::send(payload.clone());
        }
        if change.change == pb::MembershipChange::Joined as i32 && self.all && !followed {
            // Subscribe, then catch up from the chat's newest seq at the time
            // of joining (the event's seq), so a message sent right after the
            // join is not missed.
            self.follow(chat, event.seq.max(0));
            return Step { events: vec![payload.clone()], refill: Some((chat, None)) };
        }
        Step::default()
    }

    /// An event of a followed chat.
    fn on_chat_event(&mut self, chat: Uuid, event: BusEvent) -> Step {
        // A resync hint (the bus may have lost announcements): whatever
        // the store has beyond the cursor is missed.
        let Some(payload) = &event.payload else { return Step { refill: Some((chat, None)), ..Step::default() } };
        match &payload.event {
            Some(Event::MessageCreated(_)) => {
                let cursor = self.cursors.get(&chat).copied().unwrap_or(0);
                if event.seq == cursor + 1 {
                    self.cursors.insert(chat, event.seq);
                    Step::send(payload.clone())
                } else if event.seq > cursor + 1 {
                    Step { refill: Some((chat, Some(event.seq))), ..Step::default() }
                } else {
                    Step::default()
                }
            }
            Some(Event::MembershipChanged(change)) => {
                if is_departure(change) && event.users.iter().any(|u| u.uuid() == self.user) {
                    self.unfollow(chat);
                }
                Step::send(payload.clone())
            }
            Some(_) => Step::send(payload.clone()),
            // A payload with no event (a newer kind this build does not
            // know): as a hint, re-read the store.
            None => Step { refill: Some((chat, None)), ..Step::default() },
        }
    }

    /// After lagging on the user's topic (membership changes were lost):
    /// re-reads the user's chats, stops following those it left, and (when
    /// following every chat) starts following those it joined, from now.
    async fn reconcile(&mut self) -> Result<Step, Status> {
        let user = self.user.to_string();
        let member: HashSet<Uuid> = self
            .messages
            .chats()
            .member_chat_ids(&user)
            .await?
            .iter()
            .filter_map(|c| Uuid::try_parse(c).ok())
            .collect();
        let gone: Vec<Uuid> = self.cursors.keys().filter(|c| !member.contains(*c)).copied().collect();
        let mut events: Vec<pb::StreamEventsResponse> = gone.into_iter().map(|chat| self.removed(chat)).collect();
        if self.all {
            for chat in member {
                if self.cursors.contains_key(&chat) {
                    continue;
                }
                let head = self.messages.store().head(chat.into()).await.map_err(MessagesError::from)?.0;
                self.follow(chat, head);
                events.push(pb::StreamEventsResponse {
                    chat_id: chat.to_string(),
                    seq: head,
                    event: Some(Event::MembershipChanged(pb::MembershipChanged {
                        user_id: user.clone(),
                        change: pb::MembershipChange::Joined as i32,
                    })),
                });
            }
        }
        Ok(Step { events, refill: None })
    }

    /// Reads one page from the store of the messages of `chat` after its
    /// cursor (up to `until`, if given), advancing the cursor; the flag says
    /// whether more may follow. The page is returned only if the user is
    /// still a member once it has been read; otherwise the chat is no longer
    /// followed and the answer is a removal.
    async fn refill(
        &mut self,
        chat: Uuid,
        until: Option<i64>,
    ) -> Result<(Vec<pb::StreamEventsResponse>, bool), Status> {
        let Some(cursor) = self.cursors.get(&chat).copied() else { return Ok((Vec::new(), false)) };
        if until.is_some_and(|u| cursor >= u) {
            return Ok((Vec::new(), false));
        }
        let range = Range { ascending: true, ..Range::default() };
        let rows = self
            .messages
            .store()
            .list(chat.into(), range, Some(Seq(cursor)), REPLAY_PAGE)
            .await
            .map_err(MessagesError::from)?;
        if rows.is_empty() {
            return Ok((Vec::new(), false));
        }
        // Read first, check second: a member now was a member when every
        // message of the page was sent.
        match self.messages.member(chat, self.user).await {
            Ok(_) => {}
            Err(MessagesError::Denied(_) | MessagesError::ChatNotFound) => {
                return Ok((vec![self.removed(chat)], false));
            }
            Err(other) => return Err(other.into()),
        }
        let more = rows.len() == REPLAY_PAGE as usize;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            self.cursors.insert(chat, row.seq.0);
            out.push(created_event(message_pb(row, Vec::new())));
        }
        Ok((out, more))
    }
}

/// A leave or a removal.
fn is_departure(change: &pb::MembershipChanged) -> bool {
    change.change == pb::MembershipChange::Left as i32 || change.change == pb::MembershipChange::Removed as i32
}

/// The next event of an optional subscription (never, without one).
async fn next_of(subscription: &mut Option<Subscription>) -> Option<Result<BusEvent, Lagged>> {
    match subscription {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

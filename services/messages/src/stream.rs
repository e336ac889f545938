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

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use natter_auth::{Authenticator, Principal};
use natter_bus::{Event as BusEvent, Topic};
use natter_proto::messages::v1 as pb;
use pb::stream_events_response::Event;
use tokio::sync::broadcast;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::BroadcastStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

use crate::error::MessagesError;
use crate::service::{Messages, created_event, message_pb};
use crate::store::Range;

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

/// Opens a stream. Errors that concern the request (not a member, unknown
/// chat) are returned here, before any event, as the call's status.
pub async fn open(
    messages: Arc<Messages>,
    auth: Authenticator,
    shutdown: CancellationToken,
    follow: Follow,
) -> Result<EventStream, MessagesError> {
    let user = follow.principal.user_id;
    let bus = messages.bus().clone();
    let all = follow.chat_ids.is_empty();
    // Subscribe to the user's topic before listing chats, so a chat joined in
    // between is not missed.
    let mut user_rx = all.then(|| bus.subscribe(Topic::User(user)));
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
    let mut session_rx = bus.subscribe(Topic::Session(follow.principal.session_id));

    let mut live: StreamMap<Uuid, BroadcastStream<BusEvent>> = StreamMap::new();
    let mut cursors: HashMap<Uuid, i64> = HashMap::new();
    for chat in &chats {
        live.insert(*chat, BroadcastStream::new(bus.subscribe(Topic::Chat(*chat))));
        let head = messages.store().head(&chat.to_string()).await?;
        let start = follow.resume.get(chat).map_or(head, |seen| (*seen).clamp(0, head));
        cursors.insert(*chat, start);
    }
    // Chats to replay from the store before going live; resume entries for
    // chats the caller no longer follows (left, removed, deleted) are ignored.
    let replay: Vec<(Uuid, i64)> =
        follow.resume.keys().filter_map(|chat| cursors.get(chat).map(|c| (*chat, *c))).collect();
    tracing::debug!(user_id = %user, chats = chats.len(), replay = replay.len(), "stream opened");

    let token = follow.token;
    // The stream ends when its session expires, as a new call would fail then.
    let left = follow.principal.expire_micros.saturating_sub(natter_kit::time::now_micros()).max(0);
    let expires = tokio::time::Instant::now()
        + std::time::Duration::from_micros(left.min(i64::from(u32::MAX) * 1_000_000) as u64);
    let active = natter_kit::metrics::StreamGuard::new();
    let stream = async_stream::try_stream! {
        // Counted in natter_active_streams until the stream is dropped.
        let _active = active;
        for (chat, _) in replay {
            loop {
                let (events, more) = fill(&messages, chat, &mut cursors, None).await?;
                for event in events {
                    yield event;
                }
                if !more {
                    break;
                }
            }
        }
        loop {
            let wake = tokio::select! {
                biased;
                () = shutdown.cancelled() => Wake::Shutdown,
                () = tokio::time::sleep_until(expires) => Wake::Expired,
                revoked = session_rx.recv() => Wake::Session(revoked),
                joined = recv_opt(&mut user_rx) => Wake::User(joined),
                Some((chat, item)) = live.next() => Wake::Chat(chat, item),
            };
            match wake {
                Wake::Shutdown => {
                    // UNAVAILABLE tells clients to reconnect (elsewhere) and resume.
                    Err(Status::unavailable("server shutting down; reconnect and resume"))?;
                }
                Wake::Expired => {
                    Err(Status::unauthenticated("session expired"))?;
                }
                Wake::Session(revoked) => {
                    if !matches!(revoked, Err(broadcast::error::RecvError::Closed)) {
                        auth.check(&token).await?;
                    }
                }
                Wake::User(joined) => {
                    let Some(Ok(event)) = joined else { continue };
                    let Ok(chat) = Uuid::try_parse(&event.chat_id) else { continue };
                    let Some(Event::MembershipChanged(change)) = &event.event else { continue };
                    if change.change == pb::MembershipChange::Joined as i32 && !live.contains_key(&chat) {
                        // Subscribe, then catch up from the chat's newest seq
                        // at the time of joining (the event's seq), so a
                        // message sent right after the join is not missed.
                        live.insert(chat, BroadcastStream::new(bus.subscribe(Topic::Chat(chat))));
                        cursors.insert(chat, event.seq.max(0));
                        yield (*event).clone();
                        loop {
                            let (events, more) = fill(&messages, chat, &mut cursors, None).await?;
                            for missed in events {
                                yield missed;
                            }
                            if !more {
                                break;
                            }
                        }
                    }
                }
                Wake::Chat(chat, Ok(event)) => match &event.event {
                    Some(Event::MessageCreated(_)) => {
                        let cursor = cursors.get(&chat).copied().unwrap_or(0);
                        if event.seq == cursor + 1 {
                            cursors.insert(chat, event.seq);
                            yield (*event).clone();
                        } else if event.seq > cursor + 1 {
                            loop {
                                let (events, more) = fill(&messages, chat, &mut cursors, Some(event.seq)).await?;
                                for missed in events {
                                    yield missed;
                                }
                                if !more {
                                    break;
                                }
                            }
                        }
                    }
                    Some(Event::MembershipChanged(change)) => {
                        let gone = change.change == pb::MembershipChange::Left as i32
                            || change.change == pb::MembershipChange::Removed as i32;
                        yield (*event).clone();
                        if gone && change.user_id == user.to_string() {
                            live.remove(&chat);
                        }
                    }
                    Some(_) => yield (*event).clone(),
                    // A resync hint (the bus may have lost announcements):
                    // whatever the store has beyond the cursor is missed.
                    None => loop {
                        let (events, more) = fill(&messages, chat, &mut cursors, None).await?;
                        for missed in events {
                            yield missed;
                        }
                        if !more {
                            break;
                        }
                    },
                },
                // Fell behind the bus: the store has everything.
                Wake::Chat(chat, Err(_lagged)) => loop {
                    let (events, more) = fill(&messages, chat, &mut cursors, None).await?;
                    for missed in events {
                        yield missed;
                    }
                    if !more {
                        break;
                    }
                },
            }
        }
    };
    Ok(Box::pin(stream.map(|item: Result<pb::StreamEventsResponse, Status>| item)))
}

/// What woke a stream up.
enum Wake {
    Shutdown,
    Expired,
    Session(Result<BusEvent, broadcast::error::RecvError>),
    User(Option<Result<BusEvent, broadcast::error::RecvError>>),
    Chat(Uuid, Result<BusEvent, tokio_stream::wrappers::errors::BroadcastStreamRecvError>),
}

/// Reads one page from the store of the messages of `chat` after its
/// cursor (up to `until`, if given), advancing the cursor; the flag says
/// whether more may follow.
async fn fill(
    messages: &Messages,
    chat: Uuid,
    cursors: &mut HashMap<Uuid, i64>,
    until: Option<i64>,
) -> Result<(Vec<pb::StreamEventsResponse>, bool), Status> {
    let cursor = cursors.get(&chat).copied().unwrap_or(0);
    if until.is_some_and(|u| cursor >= u) {
        return Ok((Vec::new(), false));
    }
    let range = Range { ascending: true, ..Range::default() };
    let rows = messages
        .store()
        .list(&chat.to_string(), range, Some(cursor), REPLAY_PAGE)
        .await
        .map_err(MessagesError::from)?;
    let more = rows.len() == REPLAY_PAGE as usize;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        cursors.insert(chat, row.seq);
        out.push(created_event(message_pb(row, Vec::new())));
    }
    Ok((out, more))
}

async fn recv_opt(
    rx: &mut Option<broadcast::Receiver<BusEvent>>,
) -> Option<Result<BusEvent, broadcast::error::RecvError>> {
    match rx {
        Some(rx) => Some(rx.recv().await),
        None => std::future::pending().await,
    }
}

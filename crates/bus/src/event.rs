//! What the bus carries: an [`Event`], the envelope a replica routes by (chat,
//! users, change number) around the payload its streams deliver, and its wire form
//! between replicas.
//!
//! The wire form is the bus's own, not the API's: a small protobuf message
//! written and read only here (so no `.proto` of its own; this doc is its
//! schema), on subjects `natter.events.<chat|user|session>.<uuid>` and
//! `natter.events.presence`:
//!
//! ```proto
//! message Event {
//!   bytes chat_id = 1;           // 16 bytes (UUID); empty: no chat
//!   repeated bytes user_ids = 2; // 16 bytes each
//!   int64 change_seq = 3;      // the chat's change number; 0 for hints
//!   natter.messages.v1.StreamEventsResponse payload = 4; // absent: a hint
//!   Beat beat = 5;               // presence announcements only
//!   bool private = 6;            // the payload is for users' streams only
//! }
//! message Beat {
//!   bytes replica = 1;           // 16 bytes (UUID)
//!   int32 kind = 2;              // BeatKind: 1 online .. 5 goodbye
//!   int64 time = 3;              // µs since the epoch, the sender's clock
//!   int64 interval = 4;          // µs, the sender's heartbeat interval
//!   uint32 parts = 5;            // a heartbeat sent in this many beats
//! }
//! ```
//!
//! It is encoded once per publish ([`Event::to_wire`]), straight from the
//! shared event (the payload is not copied into a message to encode), and
//! decoded once per received message, whatever the number of subscribers.

use bytes::{BufMut as _, Bytes, BytesMut};
use natter_kit::id::{ChatId, UserId};
use natter_proto::messages::v1::{
    AccountChange, AccountUpdated, StreamEventsResponse, UserUpdated, stream_events_response,
};
use prost::Message as _;
use prost::encoding::{WireType, encode_key, encode_varint, key_len};
use uuid::Uuid;

use crate::Topic;

/// Field numbers of the wire form (see the module docs).
const CHAT_ID: u32 = 1;
const USER_IDS: u32 = 2;
const SEQ: u32 = 3;
const PAYLOAD: u32 = 4;
const BEAT: u32 = 5;
const PRIVATE: u32 = 6;

/// One announcement: what happened in a chat (or to a session), for the
/// streams of every replica. Subscribers share it by `Arc`; only what a
/// stream finally delivers is copied, into the stream's own response.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Event {
    /// The chat it concerns; `None` for events of a session (revoked).
    pub chat: Option<ChatId>,
    /// The users it concerns, if any: the member whose membership changed,
    /// the reader whose read position moved. Empty for a new message.
    pub users: Vec<UserId>,
    /// The chat's change number of the change (the payload's
    /// `change_seq`); 0 for hints and session events.
    pub change_seq: i64,
    /// What streams deliver to their clients (its `chat_id` and
    /// `change_seq` are the envelope's); `None` is a hint with nothing to deliver: re-read
    /// the store (a chat), re-read the user's chats (a user), re-check the
    /// session (a session).
    pub payload: Option<StreamEventsResponse>,
    /// A replica's presence announcement (on [`Topic::Presence`](crate::Topic::Presence)),
    /// about `users`.
    pub beat: Option<Beat>,
    /// The payload is for the streams of `users` only (a MarkRead by a
    /// user whose read receipts are private): other streams take its
    /// change number as sent and send nothing. A replica of a build from
    /// before it delivers the payload to every stream.
    pub private: bool,
    /// Users whose streams deliver nothing of it: for a presence change,
    /// those with a block either way with its user (BlockUser hides
    /// presence both ways). Never on the wire: only events published to
    /// this process's subscribers ([`EventBus::publish_local`]) carry it.
    ///
    /// [`EventBus::publish_local`]: crate::EventBus::publish_local
    pub unseen_by: Vec<UserId>,
}

/// What a replica announces about the users holding streams on it (the
/// messages service's presence; see its `presence` module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    /// The announcing replica's random id (new at every start).
    pub replica: Uuid,
    /// What it announces.
    pub kind: BeatKind,
    /// When, in µs since the epoch by the sender's clock.
    pub time: i64,
    /// The sender's heartbeat interval, in µs: its peers take it as gone
    /// after three without a word from it.
    pub interval: i64,
    /// A heartbeat too long for one message is sent as this many beats of
    /// the same `time`, whose users together are the replica's (0 or 1: one
    /// beat).
    pub parts: u32,
}

/// The kinds of [`Beat`] (their wire numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BeatKind {
    /// The users opened their first stream on the replica.
    Online = 1,
    /// The users closed their last stream on the replica.
    Offline = 2,
    /// The replica is alive and the users are all it holds streams of.
    Heartbeat = 3,
    /// The replica has just started: peers answer with a heartbeat.
    Hello = 4,
    /// The replica is stopping: none of its users is online on it any more.
    Goodbye = 5,
    /// The replica's process is dead: the bus of this process found it
    /// silent ([`Event::process_lost`]). Never on the wire: the bus
    /// delivers it to its own process's subscribers only.
    Lost = 6,
    /// This process's bus is connected again after losing its connection
    /// to NATS ([`Event::rejoined`]): its peers may have taken it as dead
    /// meanwhile, and it missed their beats. Never on the wire: the bus
    /// delivers it to its own process's subscribers only.
    Rejoined = 7,
}

impl BeatKind {
    fn from_wire(n: i32) -> Option<Self> {
        [Self::Online, Self::Offline, Self::Heartbeat, Self::Hello, Self::Goodbye].into_iter().find(|k| *k as i32 == n)
    }
}

/// [`Beat`] as prost encodes and decodes it.
#[derive(Clone, PartialEq, prost::Message)]
struct BeatWire {
    #[prost(bytes = "bytes", tag = "1")]
    replica: Bytes,
    #[prost(int32, tag = "2")]
    kind: i32,
    #[prost(int64, tag = "3")]
    time: i64,
    #[prost(int64, tag = "4")]
    interval: i64,
    #[prost(uint32, tag = "5")]
    parts: u32,
}

impl From<&Beat> for BeatWire {
    fn from(b: &Beat) -> Self {
        Self {
            replica: Bytes::copy_from_slice(b.replica.as_bytes()),
            kind: b.kind as i32,
            time: b.time,
            interval: b.interval,
            parts: b.parts,
        }
    }
}

impl Event {
    /// An event of `chat` delivering `payload`, at the payload's change
    /// number.
    pub fn new(chat: ChatId, payload: StreamEventsResponse) -> Self {
        Self { chat: Some(chat), change_seq: payload.change_seq, payload: Some(payload), ..Self::default() }
    }

    /// A presence announcement about `users`.
    pub fn beat(beat: Beat, users: Vec<UserId>) -> Self {
        Self { users, beat: Some(beat), ..Self::default() }
    }

    /// The bus found the process `process` ([`EventBus::process`] of its
    /// bus) dead: a beat of kind [`BeatKind::Lost`] with that replica id
    /// and nothing else, which the bus delivers on [`Topic::Presence`] to
    /// its own process only. The presence whose replica id is that process's
    /// takes its users offline unless it is heard again within a grace (it
    /// may have been only cut off), rather than after missing its
    /// heartbeats.
    ///
    /// [`EventBus::process`]: crate::EventBus::process
    pub fn process_lost(process: Uuid) -> Self {
        let beat = Beat { replica: process, kind: BeatKind::Lost, time: 0, interval: 0, parts: 0 };
        Self { beat: Some(beat), ..Self::default() }
    }

    /// This process's bus has reconnected to NATS after losing its
    /// connection: a beat of kind [`BeatKind::Rejoined`] (its replica id
    /// nil, its other fields zero), which the bus delivers on
    /// [`Topic::Presence`](crate::Topic::Presence) to its own process only.
    /// The presence tells its peers at once who streams on it (which they
    /// may have dropped, or be about to, after missing the process) and
    /// asks for theirs (their beats on the way were lost).
    pub fn rejoined() -> Self {
        let beat = Beat { replica: Uuid::nil(), kind: BeatKind::Rejoined, time: 0, interval: 0, parts: 0 };
        Self { beat: Some(beat), ..Self::default() }
    }

    /// What others see of `user` changed (`user_updated`: their username
    /// and display name as they are now). `version` orders the changes of
    /// one user (the users row's `profile_version`, which each change moves
    /// on in its own statement, so no replica's clock decides): a stream
    /// that has sent one drops an older or the same one reaching it again
    /// through another shared chat. Published on the user's own topic (their
    /// streams) and on [`Topic::Presence`] (every replica, which hands it to
    /// the streams that follow a chat of the user).
    pub fn user_updated(user: UserId, username: String, display_name: String, version: i64) -> Self {
        Self::of_profile(
            user,
            UserUpdated { user_id: user.to_string(), username, display_name, deleted: false, profile_version: version },
            version,
        )
    }

    /// `user`'s account was deleted (`user_updated` with `deleted`, no
    /// names): the last news of them, after every version of their profile.
    /// Published on [`Topic::Presence`] as [`Event::user_updated`]; their
    /// own streams end with their sessions.
    pub fn user_deleted(user: UserId) -> Self {
        Self::of_profile(
            user,
            UserUpdated {
                user_id: user.to_string(),
                deleted: true,
                profile_version: i64::MAX,
                ..UserUpdated::default()
            },
            i64::MAX,
        )
    }

    /// A `user_updated` event of `user`, ordered by `version`.
    fn of_profile(user: UserId, news: UserUpdated, version: i64) -> Self {
        let payload = StreamEventsResponse {
            event: Some(stream_events_response::Event::UserUpdated(news)),
            ..StreamEventsResponse::default()
        };
        Self { users: vec![user], change_seq: version, payload: Some(payload), ..Self::default() }
    }

    /// The account of `user` changed (`account_updated`), for their own
    /// streams: published on their topic.
    pub fn account_updated(user: UserId, change: AccountChange) -> Self {
        let payload = StreamEventsResponse {
            event: Some(stream_events_response::Event::AccountUpdated(AccountUpdated { change: change as i32 })),
            ..StreamEventsResponse::default()
        };
        Self { users: vec![user], payload: Some(payload), ..Self::default() }
    }

    /// A hint for the streams of `chat` that announcements may have been
    /// lost: they re-read the store.
    pub fn hint(chat: ChatId) -> Self {
        Self { chat: Some(chat), ..Self::default() }
    }

    /// The hint that tells the subscribers of `topic` announcements may have
    /// been lost ([`Event::is_hint`]): [`Event::hint`] for a chat, an empty
    /// event for a user or a session; `None` for presence, which the next
    /// heartbeats restore by themselves.
    pub fn resync_hint(topic: Topic) -> Option<Self> {
        match topic {
            Topic::Chat(chat) => Some(Self::hint(ChatId(chat))),
            Topic::User(_) | Topic::Session(_) => Some(Self::default()),
            Topic::Presence => None,
        }
    }

    /// Whether this is a hint, with nothing to deliver (no payload, no
    /// presence beat): its subscribers re-read what the topic is about.
    pub fn is_hint(&self) -> bool {
        self.payload.is_none() && self.beat.is_none()
    }

    /// The same event, also concerning `user`.
    pub fn concerning(mut self, user: UserId) -> Self {
        self.users.push(user);
        self
    }

    /// The same event, its payload for the streams of the users it
    /// concerns only ([`Event::private`]).
    pub fn for_its_users_only(mut self) -> Self {
        self.private = true;
        self
    }

    /// Whether a stream of `user` delivers this event's payload: always,
    /// unless it is [`Event::private`] to other users.
    pub fn is_for(&self, user: UserId) -> bool {
        !self.private || self.users.contains(&user)
    }

    /// The wire form (module docs): one buffer of exactly the encoded size.
    pub fn to_wire(&self) -> Bytes {
        let id_len = |tag: u32| key_len(tag) + 1 + 16;
        let beat = self.beat.as_ref().map(BeatWire::from);
        let len = self.chat.map_or(0, |_| id_len(CHAT_ID))
            + self.users.len() * id_len(USER_IDS)
            + if self.change_seq == 0 { 0 } else { prost::encoding::int64::encoded_len(SEQ, &self.change_seq) }
            + self.payload.as_ref().map_or(0, |p| prost::encoding::message::encoded_len(PAYLOAD, p))
            + beat.as_ref().map_or(0, |b| prost::encoding::message::encoded_len(BEAT, b))
            + if self.private { prost::encoding::bool::encoded_len(PRIVATE, &true) } else { 0 };
        let mut buf = BytesMut::with_capacity(len);
        fn put_id(tag: u32, id: &Uuid, buf: &mut BytesMut) {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(16, buf);
            buf.put_slice(id.as_bytes());
        }
        if let Some(chat) = &self.chat {
            put_id(CHAT_ID, &chat.0, &mut buf);
        }
        for user in &self.users {
            put_id(USER_IDS, &user.0, &mut buf);
        }
        if self.change_seq != 0 {
            prost::encoding::int64::encode(SEQ, &self.change_seq, &mut buf);
        }
        if let Some(payload) = &self.payload {
            prost::encoding::message::encode(PAYLOAD, payload, &mut buf);
        }
        if let Some(beat) = &beat {
            prost::encoding::message::encode(BEAT, beat, &mut buf);
        }
        if self.private {
            prost::encoding::bool::encode(PRIVATE, &true, &mut buf);
        }
        debug_assert_eq!(buf.len(), len, "the size computed up front is the size written");
        buf.freeze()
    }

    /// Reads the wire form.
    ///
    /// Errors: not protobuf, an id that is not 16 bytes (such as an
    /// event of an older natter, which sent the bare payload), or a beat of
    /// an unknown kind.
    pub fn from_wire(wire: Bytes) -> Result<Self, WireError> {
        let wire = Wire::decode(wire)?;
        let id = |bytes: &[u8]| Uuid::from_slice(bytes).map_err(|_| WireError::Id(bytes.len()));
        let chat = if wire.chat_id.is_empty() { None } else { Some(ChatId(id(&wire.chat_id)?)) };
        let users = wire.user_ids.iter().map(|u| id(u).map(UserId)).collect::<Result<_, _>>()?;
        let beat = match wire.beat {
            None => None,
            Some(b) => Some(Beat {
                replica: id(&b.replica)?,
                kind: BeatKind::from_wire(b.kind).ok_or(WireError::Kind(b.kind))?,
                time: b.time,
                interval: b.interval,
                parts: b.parts,
            }),
        };
        // `unseen_by` is never on the wire (local events only).
        let (change_seq, payload, private) = (wire.change_seq, wire.payload, wire.private);
        Ok(Self { chat, users, change_seq, payload, beat, private, unseen_by: Vec::new() })
    }
}

/// Why a message from NATS is no [`Event`].
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not protobuf, or fields of the wrong type.
    #[error("not a bus event: {0}")]
    Decode(#[from] prost::DecodeError),
    /// An id of this many bytes instead of 16.
    #[error("an id of {0} bytes, not 16")]
    Id(usize),
    /// A presence beat of a kind this build does not know.
    #[error("a presence beat of unknown kind {0}")]
    Kind(i32),
}

/// The wire form as prost reads it (writing goes through [`Event::to_wire`]).
#[derive(Clone, PartialEq, prost::Message)]
struct Wire {
    #[prost(bytes = "bytes", tag = "1")]
    chat_id: Bytes,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    user_ids: Vec<Bytes>,
    #[prost(int64, tag = "3")]
    change_seq: i64,
    #[prost(message, optional, tag = "4")]
    payload: Option<StreamEventsResponse>,
    #[prost(message, optional, tag = "5")]
    beat: Option<BeatWire>,
    #[prost(bool, tag = "6")]
    private: bool,
}

#[cfg(test)]
mod tests {
    use natter_proto::messages::v1 as pb;

    use super::*;

    fn message_event() -> Event {
        let chat = ChatId::new_v7();
        let message = pb::Message {
            id: Uuid::now_v7().to_string(),
            chat_id: chat.to_string(),
            change_seq: 300,
            text: "héllo".into(),
            ..Default::default()
        };
        Event::new(
            chat,
            pb::StreamEventsResponse {
                chat_id: chat.to_string(),
                seq: 3,
                change_seq: 300,
                event: Some(pb::stream_events_response::Event::MessageCreated(message)),
            },
        )
    }

    #[test]
    fn events_cross_the_wire_unchanged() {
        let user = UserId::new_v7();
        for event in [
            message_event(),
            message_event().concerning(user).concerning(UserId::new_v7()),
            message_event().concerning(user).for_its_users_only(),
            Event::hint(ChatId::new_v7()),
            Event::default(),
            Event { change_seq: -1, ..Event::default() },
            Event::beat(
                Beat {
                    replica: Uuid::now_v7(),
                    kind: BeatKind::Heartbeat,
                    time: 1_700_000_000_000_000,
                    interval: 10_000_000,
                    parts: 3,
                },
                vec![user, UserId::new_v7()],
            ),
            Event::beat(
                Beat { replica: Uuid::now_v7(), kind: BeatKind::Goodbye, time: 0, interval: 0, parts: 0 },
                Vec::new(),
            ),
        ] {
            assert_eq!(Event::from_wire(event.to_wire()).unwrap(), event);
        }
    }

    #[test]
    fn the_hand_written_encoding_is_protobufs() {
        for private in [false, true] {
            let event = Event { private, ..message_event().concerning(UserId::new_v7()) };
            let by_prost = Wire {
                chat_id: Bytes::copy_from_slice(event.chat.unwrap().0.as_bytes()),
                user_ids: event.users.iter().map(|u| Bytes::copy_from_slice(u.0.as_bytes())).collect(),
                change_seq: event.change_seq,
                payload: event.payload.clone(),
                beat: None,
                private,
            }
            .encode_to_vec();
            assert_eq!(event.to_wire(), by_prost);
        }
        assert!(Event::default().to_wire().is_empty(), "a session event is zero bytes");
    }

    #[test]
    fn a_private_event_is_for_its_users_streams_only() {
        let (reader, other) = (UserId::new_v7(), UserId::new_v7());
        let shared = message_event().concerning(reader);
        assert!(shared.is_for(reader) && shared.is_for(other));
        let private = shared.for_its_users_only();
        assert!(private.is_for(reader));
        assert!(!private.is_for(other));
    }

    #[test]
    fn a_beat_is_encoded_as_protobuf_and_an_unknown_kind_refused() {
        let beat = Beat { replica: Uuid::now_v7(), kind: BeatKind::Offline, time: 42, interval: 7, parts: 0 };
        let event = Event::beat(beat, vec![UserId::new_v7()]);
        let mut wire = BeatWire::from(&beat);
        let by_prost = Wire {
            chat_id: Bytes::new(),
            user_ids: event.users.iter().map(|u| Bytes::copy_from_slice(u.0.as_bytes())).collect(),
            change_seq: 0,
            payload: None,
            beat: Some(wire.clone()),
            private: false,
        };
        assert_eq!(event.to_wire(), by_prost.encode_to_vec());
        wire.kind = 99;
        let future = Wire { beat: Some(wire), ..by_prost };
        assert!(matches!(Event::from_wire(future.encode_to_vec().into()), Err(WireError::Kind(99))));
    }

    #[test]
    fn a_bare_api_message_is_refused() {
        // What natter sent before the bus had a wire form of its own: a
        // replica of an older build must not be mistaken for a hint.
        let old = message_event().payload.unwrap().encode_to_vec();
        assert!(Event::from_wire(old.into()).is_err());
    }
}

//! The event bus: tells live streams that something happened.
//!
//! The store is the source of truth; the bus only announces. A subscriber
//! that misses announcements (it lagged, the bus dropped them, a replica
//! restarted) notices a jump in a chat's change numbers and fills the gap
//! from the store, so the bus may be lossy without any stream losing an
//! event.
//!
//! The bus carries an [`Event`] of its own (the chat, users and change
//! number it is about, around the payload streams deliver), not an API
//! message: a hint
//! or a session's revocation is an event without a payload, not a fake
//! response.
//!
//! Fan-out is one `tokio::sync::broadcast` channel per topic: an event is
//! built once, shared by `Arc`, and each subscriber only clones the pointer;
//! across replicas it is encoded once per publish ([`Event::to_wire`]).
//! A channel lives exactly as long as its topic has a [`Subscription`]: the
//! last one to go drops it, so streams that come and go leave nothing behind.
//!
//! Two implementations: [`Hub`] (one process: the all-in-one) and
//! [`NatsBus`] (replicas: core NATS carries each event to the processes with
//! subscribers of its topic, whose own hub fans it out). Core NATS, not
//! JetStream: the store already keeps every event durably, so the bus needs
//! no persistence of its own; what it loses (a reconnect, a slow consumer,
//! the moment before a new subscription takes effect) is announced locally
//! as a resync hint, and streams re-read the store. What a publisher loses
//! with its own connection, the other replicas cannot notice: it publishes
//! the hints itself once reconnected; what it loses by dying, they notice
//! by its silence (every process announces itself once a second), and
//! resync all their streams (`nats` module docs).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};

use futures::{Stream, StreamExt as _};
use natter_kit::cache::{Invalidator, Tag};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::BroadcastStream;
use uuid::Uuid;

/// How many events a slow subscriber of a chat may fall behind before it
/// lags (and then refills from the store).
pub const TOPIC_CAPACITY: usize = 1024;

/// The same for a user's topic (a few membership changes; a stream that lags
/// on it re-reads the user's chats from the chats service).
pub const USER_TOPIC_CAPACITY: usize = 64;

/// The same for a session's topic (revocations only; a stream that lags on it
/// re-checks its session).
pub const SESSION_TOPIC_CAPACITY: usize = 8;

/// The same for the presence topic (one subscriber per process; what it
/// loses, the next heartbeat of each replica restores).
pub const PRESENCE_TOPIC_CAPACITY: usize = 1024;

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Events of one chat (messages, reads, membership).
    Chat(Uuid),
    /// Events for one user across chats (joined, left or removed from a chat).
    User(Uuid),
    /// One session (revoked).
    Session(Uuid),
    /// Presence announcements of every replica (an [`Event`] with a
    /// [`Beat`]).
    Presence,
}

impl Topic {
    /// Slots of this topic's channel: a broadcast channel allocates all of
    /// them up front (about 40 bytes each), and every open stream holds a
    /// user and a session topic of its own, so only chats get many.
    pub fn capacity(self) -> usize {
        match self {
            Topic::Chat(_) => TOPIC_CAPACITY,
            Topic::User(_) => USER_TOPIC_CAPACITY,
            Topic::Session(_) => SESSION_TOPIC_CAPACITY,
            Topic::Presence => PRESENCE_TOPIC_CAPACITY,
        }
    }
}

mod event;
pub use event::{Beat, BeatKind, Event, WireError};

/// An announced event, shared by every subscriber of its topic.
pub type Shared = Arc<Event>;

/// A subscriber fell this many events behind its topic; they are lost to it
/// (the store has them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lagged(pub u64);

/// Publishes and subscribes to events.
pub trait EventBus: Send + Sync + 'static {
    /// Announces `event` to the current subscribers of `topic` (best effort).
    fn publish(&self, topic: Topic, event: Shared);
    /// Announces `event` to this process's subscribers of `topic` only: for
    /// what every replica works out by itself (presence changes).
    fn publish_local(&self, topic: Topic, event: Shared);
    /// Receives the events published to `topic` from now on, until dropped.
    fn subscribe(&self, topic: Topic) -> Subscription;
    /// Sends what was published so far and stops publishing to other
    /// processes (waiting a few seconds at most), says goodbye to them
    /// (telling them to re-read the store if what it sent last could not
    /// be confirmed), and stops keeping the caches in step with them (a
    /// look-up then asks the owning service); call last at shutdown. A
    /// bus dropped without it counts as crashed: the other processes
    /// re-read the store once they miss it. A no-op within one process.
    fn close(&self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// Topics of this process with at least one subscriber (each holds one
    /// channel); for tests and metrics.
    fn topic_count(&self) -> usize;
    /// The invalidator of this process's caches of other services' answers
    /// ([`natter_kit::cache`]): the bus feeds it every invalidation it
    /// receives and tells it when it is not live (disconnected, or
    /// resynchronising after a reconnect or a slow-consumer notice).
    fn invalidator(&self) -> &Arc<Invalidator>;
    /// Drops `tags` from the caches of this process (at once) and of every
    /// other process on the bus (as each receives it). Returns once the
    /// NATS server has taken the invalidation (a round trip after its
    /// publish), or after a few seconds if it cannot tell, logged (the bus
    /// then publishes it again, after its reconnect if the connection
    /// dropped): call it after the change commits and before the RPC that
    /// made it returns.
    fn invalidate(&self, tags: Vec<Tag>) -> futures::future::BoxFuture<'_, ()>;
    /// Resolves once every subscription made so far is in effect across
    /// processes (NATS with interest routing: the server has processed the
    /// SUBs, and the resync hints for them are already queued on their
    /// subscriptions); at once within one process. A reader that waits for
    /// it before reading the store misses nothing published afterwards.
    fn settled(&self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// This process's id among the processes on the bus (NATS: random, new
    /// at every start, announced on the liveness subject); `None` within
    /// one process. When the bus finds a peer process dead it delivers
    /// [`Event::process_lost`] with that peer's id on [`Topic::Presence`]
    /// to this process: the messages service's presence uses this id as
    /// its replica id, so its peers know which replica died.
    fn process(&self) -> Option<Uuid> {
        None
    }
}

/// A change of this process's interest in a topic: `(topic, true)` when
/// its first subscriber came, `(topic, false)` when its last went. Sent
/// while the hub's map is locked, so they arrive in the order the map
/// changed and the last one about a topic is its state now.
pub(crate) enum Interest {
    /// `(topic, true)` when its first subscriber came, `false` when its
    /// last went.
    Topic(Topic, bool),
    /// Answer once every topic announced before is subscribed on the
    /// server and its subscribers hinted ([`EventBus::settled`]).
    Settle(tokio::sync::oneshot::Sender<()>),
}

type Channels = HashMap<Topic, broadcast::Sender<Shared>>;

/// The hub's topics, and who hears when one comes or goes.
#[derive(Default)]
struct Topics {
    channels: Mutex<Channels>,
    /// The NATS bus's router ([`NatsBus`] with interest routing); none in
    /// one process.
    interest: Option<mpsc::UnboundedSender<Interest>>,
}

impl Topics {
    fn lock(&self) -> MutexGuard<'_, Channels> {
        // The map stays consistent whatever panicked while holding it.
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the router (if any) that `topic` gained or lost its last
    /// subscriber; called with the map locked.
    fn interest(&self, topic: Topic, wanted: bool) {
        if let Some(router) = &self.interest {
            // Fails only once the router has stopped (shutdown).
            let _ = router.send(Interest::Topic(topic, wanted));
        }
    }
}

/// In-process fan-out: one broadcast channel per topic with subscribers,
/// dropped with its last [`Subscription`].
pub struct Hub {
    topics: Arc<Topics>,
    invalidator: Arc<Invalidator>,
}

impl Default for Hub {
    /// An empty hub whose caches are live: in one process every change is
    /// invalidated synchronously.
    fn default() -> Self {
        Self { topics: Arc::default(), invalidator: Invalidator::new(true) }
    }
}

/// One subscriber of a topic: a stream of its events (`Err(Lagged)` when
/// events were lost to it, the end only if the hub is gone). Dropping the
/// last subscription of a topic drops the topic's channel at once.
pub struct Subscription {
    topic: Topic,
    hub: Weak<Topics>,
    /// `None` only while dropping.
    events: Option<Receiving>,
}

/// A plain receiver while only [`Subscription::recv`] is used (no
/// allocation); boxed into a stream the first time it is polled as one. A
/// subscriber that waits for it beside other things should poll it as a
/// stream: the stream's pending receive stays registered with the topic
/// between polls, where each dropped `recv` future takes the topic's lock to
/// register and again to leave.
enum Receiving {
    Receiver(broadcast::Receiver<Shared>),
    Stream(BroadcastStream<Shared>),
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl Subscription {
    /// The topic subscribed to.
    pub fn topic(&self) -> Topic {
        self.topic
    }

    /// The next event; `None` once the hub is gone.
    pub async fn recv(&mut self) -> Option<Result<Shared, Lagged>> {
        if let Some(Receiving::Receiver(receiver)) = self.events.as_mut() {
            return match receiver.recv().await {
                Ok(event) => Some(Ok(event)),
                Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(Lagged(n))),
                Err(broadcast::error::RecvError::Closed) => None,
            };
        }
        self.next().await
    }
}

impl Stream for Subscription {
    type Item = Result<Shared, Lagged>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(Receiving::Receiver(_)) = self.events
            && let Some(Receiving::Receiver(receiver)) = self.events.take()
        {
            self.events = Some(Receiving::Stream(BroadcastStream::new(receiver)));
        }
        let Some(Receiving::Stream(events)) = self.events.as_mut() else { return Poll::Ready(None) };
        events.poll_next_unpin(cx).map(|next| {
            next.map(|item| {
                item.map_err(|tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)| Lagged(n))
            })
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(hub) = self.hub.upgrade() else { return };
        let mut topics = hub.lock();
        // The receiver goes while the map is locked: a concurrent subscribe
        // (which takes the lock too) either came before and keeps the
        // channel alive, or comes after and finds no entry and makes a new
        // one. No subscriber is ever left on a channel the map forgot.
        drop(self.events.take());
        if topics.get(&self.topic).is_some_and(|sender| sender.receiver_count() == 0) {
            topics.remove(&self.topic);
            hub.interest(self.topic, false);
        }
    }
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// A hub that tells `router` whenever a topic gains its first
    /// subscriber or loses its last ([`Interest`]): the NATS bus subscribes
    /// to what this process's streams follow.
    pub(crate) fn with_interest(router: mpsc::UnboundedSender<Interest>) -> Self {
        Self { topics: Arc::new(Topics { channels: Mutex::default(), interest: Some(router) }), ..Self::default() }
    }

    /// This hub feeding `invalidator` instead (the [`NatsBus`]'s, live only
    /// while connected).
    pub fn with_invalidator(self, invalidator: Arc<Invalidator>) -> Self {
        Self { invalidator, ..self }
    }

    /// Tells every local subscriber of every chat, user and session topic
    /// that announcements may have been lost ([`Event::resync_hint`]):
    /// streams re-read the store, their user's chats and their session,
    /// and (a user topic's hint) tell their client that ephemeral news may
    /// be lost (`ephemeral_lost`).
    pub fn resync(&self) {
        let topics = self.topics.lock();
        for (topic, sender) in topics.iter() {
            if let Some(hint) = Event::resync_hint(*topic) {
                let _ = sender.send(Arc::new(hint));
            }
        }
    }

    /// The same as [`Hub::resync`] for `topics` only (those without local
    /// subscribers are passed over): their subscription has just taken
    /// effect, and what was published before it did was not received.
    pub(crate) fn resync_topics(&self, topics: &[Topic]) {
        let channels = self.topics.lock();
        for topic in topics {
            if let (Some(sender), Some(hint)) = (channels.get(topic), Event::resync_hint(*topic)) {
                let _ = sender.send(Arc::new(hint));
            }
        }
    }

    /// Whether `topic` has a local subscriber now.
    pub(crate) fn is_followed(&self, topic: Topic) -> bool {
        self.topics.lock().contains_key(&topic)
    }

    /// Number of topics with a channel (for tests and metrics).
    pub fn topic_count(&self) -> usize {
        self.topics.lock().len()
    }

    /// Delivers `event` to this process's subscribers of `topic`.
    fn fan_out(&self, topic: Topic, event: Shared) {
        let topics = self.topics.lock();
        if let Some(sender) = topics.get(&topic) {
            // Fails only without receivers, which the last subscription's
            // drop has already cleaned up.
            let _ = sender.send(event);
        }
    }

    /// A subscription to `topic` on this hub.
    fn subscribe_local(&self, topic: Topic) -> Subscription {
        let mut topics = self.topics.lock();
        let receiver = match topics.entry(topic) {
            Entry::Occupied(entry) => entry.get().subscribe(),
            Entry::Vacant(entry) => {
                let receiver = entry.insert(broadcast::channel(topic.capacity()).0).subscribe();
                self.topics.interest(topic, true);
                receiver
            }
        };
        Subscription { topic, hub: Arc::downgrade(&self.topics), events: Some(Receiving::Receiver(receiver)) }
    }
}

impl EventBus for Hub {
    fn publish(&self, topic: Topic, event: Shared) {
        natter_kit::metrics::bus_published(1);
        self.fan_out(topic, event);
    }

    fn publish_local(&self, topic: Topic, event: Shared) {
        self.fan_out(topic, event);
    }

    fn subscribe(&self, topic: Topic) -> Subscription {
        self.subscribe_local(topic)
    }

    fn topic_count(&self) -> usize {
        Hub::topic_count(self)
    }

    fn invalidator(&self) -> &Arc<Invalidator> {
        &self.invalidator
    }

    fn invalidate(&self, tags: Vec<Tag>) -> futures::future::BoxFuture<'_, ()> {
        self.invalidator.invalidate(&tags);
        Box::pin(async {})
    }
}

mod nats;
pub use nats::{ConnectError, Credentials, NatsBus, Routing, SubjectPrefix, redact_url, split_url};

/// Command-line options that choose the bus.
///
/// `Debug` shows `nats_url` with any password replaced by `***`.
#[derive(Clone, Default, clap::Args)]
pub struct BusArgs {
    /// NATS server URL (nats://host:4222) carrying events between replicas;
    /// unset: events stay within this process. It may carry credentials
    /// (nats://user:password@host:4222); --nats-user with
    /// --nats-password-file keeps the password off the command line and out
    /// of the environment
    #[arg(long, env = "NATTER_NATS_URL")]
    pub nats_url: Option<String>,
    /// First tokens of every NATS subject this deployment uses
    /// (`PREFIX.events.>` and `PREFIX.caches.>`): processes with the same
    /// prefix are one deployment and hear each other's events, cache
    /// invalidations and deaths. Give each deployment or environment
    /// sharing a NATS server (staging beside production, test runs) a
    /// prefix of its own; every process of one deployment needs the same.
    /// Dot-separated tokens without whitespace, * or >, none of them events
    /// or caches
    #[arg(long, env = "NATTER_NATS_SUBJECT_PREFIX", value_name = "PREFIX", default_value_t = SubjectPrefix::default())]
    pub nats_subject_prefix: SubjectPrefix,
    /// NATS user to log in as (with --nats-password-file); the NATS server
    /// should let only this user publish on `PREFIX.events.>` and
    /// `PREFIX.caches.>` (--nats-subject-prefix, natter by default)
    #[arg(long, env = "NATTER_NATS_USER", requires = "nats_password_file")]
    pub nats_user: Option<String>,
    /// File holding the password of --nats-user (its whole content, without a
    /// final line break), such as a mounted Kubernetes Secret; read at
    /// start-up
    #[arg(long, env = "NATTER_NATS_PASSWORD_FILE", value_name = "PATH", requires = "nats_user")]
    pub nats_password_file: Option<std::path::PathBuf>,
    /// Which events this process receives from NATS: interest (those of the
    /// chats, users and sessions its streams follow, subscribed to one
    /// subject each, and presence) or broadcast (every event of the
    /// deployment, on `PREFIX.events.>`; the behaviour before interest
    /// routing, kept to measure against)
    #[arg(long, env = "NATTER_NATS_ROUTING", value_enum, default_value_t = Routing::Interest)]
    pub nats_routing: Routing,
    /// With --nats-url: how long a replica answers token and membership
    /// checks from memory; the bus drops an entry at once when its session
    /// is revoked or its chat changes, this bounds what a lost invalidation
    /// could leave. 0s: every check asks the owning service
    #[arg(long, env = "NATTER_CACHE_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub cache_ttl: std::time::Duration,
}

impl std::fmt::Debug for BusArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusArgs")
            .field("nats_url", &self.nats_url.as_deref().map(redact_url))
            .field("nats_subject_prefix", &self.nats_subject_prefix)
            .field("nats_user", &self.nats_user)
            .field("nats_password_file", &self.nats_password_file)
            .field("nats_routing", &self.nats_routing)
            .field("cache_ttl", &self.cache_ttl)
            .finish()
    }
}

impl BusArgs {
    /// How long this replica may keep other services' answers
    /// (`--cache-ttl`): `None` without NATS, where the only instance of
    /// each service keeps exact caches of its own instead.
    pub fn replica_cache_ttl(&self) -> Option<std::time::Duration> {
        self.nats_url.as_ref().map(|_| self.cache_ttl)
    }

    /// The bus these options choose: NATS when a URL is given, else an
    /// in-process hub. `shutdown` stops the NATS subscriptions of events
    /// (and a start-up still waiting for the server); the publisher and the
    /// caches' sync last until [`EventBus::close`].
    ///
    /// Errors: a malformed URL, credentials without a URL, a user without a
    /// password file (or the reverse), an unreadable password file, the
    /// server refuses the log-in, or `shutdown` fires while waiting for it.
    pub async fn connect(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Arc<dyn EventBus>, ConnectError> {
        let credentials = match (&self.nats_user, &self.nats_password_file) {
            (None, None) => None,
            (Some(user), Some(path)) => Some(Credentials::from_password_file(user.clone(), path.clone())?),
            (Some(_), None) => return Err(ConnectError::Options("--nats-user needs --nats-password-file")),
            (None, Some(_)) => return Err(ConnectError::Options("--nats-password-file needs --nats-user")),
        };
        match &self.nats_url {
            Some(url) => {
                Ok(NatsBus::connect(url, credentials, self.nats_routing, &self.nats_subject_prefix, shutdown).await?)
            }
            None if credentials.is_some() => Err(ConnectError::Options("--nats-user needs --nats-url")),
            None => Ok(Arc::new(Hub::new())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64) -> Shared {
        Arc::new(Event { change_seq: seq, ..Event::default() })
    }

    #[tokio::test]
    async fn subscribers_of_a_topic_get_its_events_only() {
        let hub = Hub::new();
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        let mut ra = hub.subscribe(Topic::Chat(a));
        let mut rb = hub.subscribe(Topic::Chat(b));
        hub.publish(Topic::Chat(a), event(1));
        hub.publish(Topic::Chat(b), event(2));
        assert_eq!(ra.recv().await.unwrap().unwrap().change_seq, 1);
        assert_eq!(rb.recv().await.unwrap().unwrap().change_seq, 2);
        assert!(futures::FutureExt::now_or_never(ra.recv()).is_none(), "nothing else for a");
    }

    #[tokio::test]
    async fn a_topic_goes_with_its_last_subscription_without_a_publish() {
        let hub = Hub::new();
        let chat = Topic::Chat(Uuid::now_v7());
        let first = hub.subscribe(chat);
        let mut second = hub.subscribe(chat);
        drop(first);
        assert_eq!(hub.topic_count(), 1, "still subscribed");
        hub.publish(chat, event(1));
        assert_eq!(second.recv().await.unwrap().unwrap().change_seq, 1);
        drop(second);
        assert_eq!(hub.topic_count(), 0);
    }

    #[tokio::test]
    async fn ten_thousand_subscriptions_leave_no_channel_behind() {
        let hub = Hub::new();
        let shared = Topic::Chat(Uuid::now_v7());
        let mut held = Vec::new();
        for i in 0..10_000 {
            // Half on one busy chat, half on topics of their own (a stream's
            // user and session topics).
            let topic = if i % 2 == 0 { shared } else { Topic::Session(Uuid::now_v7()) };
            held.push(hub.subscribe(topic));
        }
        assert_eq!(hub.topic_count(), 5_001);
        hub.publish(shared, event(7));
        // Dropped in an order unlike the one they were made in.
        while let Some(sub) = held.pop() {
            if !held.is_empty() {
                drop(held.swap_remove(held.len() / 2));
            }
            drop(sub);
        }
        assert_eq!(hub.topic_count(), 0);
    }

    #[test]
    fn concurrent_subscribes_and_drops_never_orphan_a_subscriber() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).build().unwrap();
        runtime.block_on(async {
            let hub = Arc::new(Hub::new());
            let topic = Topic::Chat(Uuid::now_v7());
            let churn: Vec<_> = (0..4)
                .map(|_| {
                    let hub = hub.clone();
                    tokio::spawn(async move {
                        for _ in 0..5_000 {
                            let sub = hub.subscribe(topic);
                            tokio::task::yield_now().await;
                            drop(sub);
                        }
                    })
                })
                .collect();
            // Subscriptions taken while the others churn must stay connected
            // to the channel that publishes reach.
            let mut late = Vec::new();
            for _ in 0..200 {
                late.push(hub.subscribe(topic));
                tokio::task::yield_now().await;
            }
            for task in churn {
                task.await.unwrap();
            }
            hub.publish(topic, event(9));
            for sub in &mut late {
                assert_eq!(sub.recv().await.unwrap().unwrap().change_seq, 9);
            }
            assert_eq!(hub.topic_count(), 1);
            drop(late);
            assert_eq!(hub.topic_count(), 0);
        });
    }

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_how_many_it_lost() {
        let hub = Hub::new();
        let user = Topic::User(Uuid::now_v7());
        let mut sub = hub.subscribe(user);
        for seq in 0..(USER_TOPIC_CAPACITY as i64 + 3) {
            hub.publish(user, event(seq));
        }
        assert_eq!(sub.recv().await.unwrap(), Err(Lagged(3)));
        assert_eq!(sub.recv().await.unwrap().unwrap().change_seq, 3);
    }
}

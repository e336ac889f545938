//! The event bus: tells live streams that something happened.
//!
//! The store is the source of truth; the bus only announces. A subscriber
//! that misses announcements (it lagged, the bus dropped them, a replica
//! restarted) notices a seq jump and fills the gap from the store, so the bus
//! may be lossy without any stream losing an event.
//!
//! Fan-out is one `tokio::sync::broadcast` channel per topic: an event is
//! encoded once, shared by `Arc`, and each subscriber only clones the pointer.
//!
//! Two implementations: [`Hub`] (one process: the all-in-one) and
//! [`NatsBus`] (replicas: core NATS carries each event to every other
//! process, whose own hub fans it out). Core NATS, not JetStream: the store
//! already keeps every event durably, so the bus needs no persistence of its
//! own; what it loses (a reconnect, a slow consumer) is announced locally as
//! a resync hint, and streams re-read the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use natter_proto::messages::v1::StreamEventsResponse;
use tokio::sync::broadcast;
use uuid::Uuid;

/// How many events a slow subscriber may fall behind before it lags (and
/// then refills from the store).
pub const TOPIC_CAPACITY: usize = 1024;

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Events of one chat (messages, reads, membership).
    Chat(Uuid),
    /// Events for one user across chats (joined or left a chat).
    User(Uuid),
    /// One session (revoked).
    Session(Uuid),
}

/// An announced event, shared by every subscriber of its topic.
pub type Event = Arc<StreamEventsResponse>;

/// Publishes and subscribes to events.
pub trait EventBus: Send + Sync + 'static {
    /// Announces `event` to the current subscribers of `topic` (best effort).
    fn publish(&self, topic: Topic, event: Event);
    /// Receives the events published to `topic` from now on.
    fn subscribe(&self, topic: Topic) -> broadcast::Receiver<Event>;
}

/// In-process fan-out: one broadcast channel per topic with subscribers.
#[derive(Default)]
pub struct Hub {
    topics: Mutex<HashMap<Topic, broadcast::Sender<Event>>>,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tells every local subscriber of every chat topic to re-read the store
    /// (an event with no payload): announcements may have been lost.
    pub fn resync(&self) {
        let Ok(topics) = self.topics.lock() else { return };
        for (topic, sender) in topics.iter() {
            if let Topic::Chat(chat) = topic {
                let hint = StreamEventsResponse { chat_id: chat.to_string(), ..Default::default() };
                let _ = sender.send(Arc::new(hint));
            }
        }
    }

    /// Number of topics with a channel (for tests and metrics).
    pub fn topic_count(&self) -> usize {
        self.topics.lock().map(|t| t.len()).unwrap_or(0)
    }
}

impl Hub {
    /// Delivers `event` to this process's subscribers of `topic`.
    fn fan_out(&self, topic: Topic, event: Event) {
        let Ok(mut topics) = self.topics.lock() else { return };
        if let Some(sender) = topics.get(&topic)
            && sender.send(event).is_err()
        {
            // Nobody listens any more: drop the channel.
            topics.remove(&topic);
        }
    }
}

impl EventBus for Hub {
    fn publish(&self, topic: Topic, event: Event) {
        natter_kit::metrics::bus_published(1);
        self.fan_out(topic, event);
    }

    fn subscribe(&self, topic: Topic) -> broadcast::Receiver<Event> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.entry(topic).or_insert_with(|| broadcast::channel(TOPIC_CAPACITY).0).subscribe()
    }
}

mod nats;
pub use nats::{ConnectError, Credentials, NatsBus, redact_url, split_url};

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
    /// NATS user to log in as (with --nats-password-file); the NATS server
    /// should let only this user publish on natter.events.>
    #[arg(long, env = "NATTER_NATS_USER", requires = "nats_password_file")]
    pub nats_user: Option<String>,
    /// File holding the password of --nats-user (its whole content, without a
    /// final line break), such as a mounted Kubernetes Secret; read at
    /// start-up
    #[arg(long, env = "NATTER_NATS_PASSWORD_FILE", value_name = "PATH", requires = "nats_user")]
    pub nats_password_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for BusArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusArgs")
            .field("nats_url", &self.nats_url.as_deref().map(redact_url))
            .field("nats_user", &self.nats_user)
            .field("nats_password_file", &self.nats_password_file)
            .finish()
    }
}

impl BusArgs {
    /// The bus these options choose: NATS when a URL is given, else an
    /// in-process hub. `shutdown` stops the NATS tasks (and a start-up still
    /// waiting for the server).
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
            Some(url) => Ok(NatsBus::connect(url, credentials, shutdown).await?),
            None if credentials.is_some() => Err(ConnectError::Options("--nats-user needs --nats-url")),
            None => Ok(Arc::new(Hub::new())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64) -> Event {
        Arc::new(StreamEventsResponse { seq, ..Default::default() })
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
        assert_eq!(ra.recv().await.unwrap().seq, 1);
        assert_eq!(rb.recv().await.unwrap().seq, 2);
        assert!(ra.try_recv().is_err());
    }

    #[tokio::test]
    async fn topics_without_subscribers_are_dropped() {
        let hub = Hub::new();
        let chat = Uuid::now_v7();
        drop(hub.subscribe(Topic::Chat(chat)));
        hub.publish(Topic::Chat(chat), event(1));
        assert_eq!(hub.topic_count(), 0);
    }
}

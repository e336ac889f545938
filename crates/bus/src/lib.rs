//! The event bus: tells live streams that something happened.
//!
//! The store is the source of truth; the bus only announces. A subscriber
//! that misses announcements (it lagged, the bus dropped them, a replica
//! restarted) notices a seq jump and fills the gap from the store, so the bus
//! may be lossy without any stream losing an event.
//!
//! Fan-out is one `tokio::sync::broadcast` channel per topic: an event is
//! encoded once, shared by `Arc`, and each subscriber only clones the pointer.

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

    /// Number of topics with a channel (for tests and metrics).
    pub fn topic_count(&self) -> usize {
        self.topics.lock().map(|t| t.len()).unwrap_or(0)
    }
}

impl EventBus for Hub {
    fn publish(&self, topic: Topic, event: Event) {
        let Ok(mut topics) = self.topics.lock() else { return };
        if let Some(sender) = topics.get(&topic)
            && sender.send(event).is_err()
        {
            // Nobody listens any more: drop the channel.
            topics.remove(&topic);
        }
    }

    fn subscribe(&self, topic: Topic) -> broadcast::Receiver<Event> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.entry(topic).or_insert_with(|| broadcast::channel(TOPIC_CAPACITY).0).subscribe()
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

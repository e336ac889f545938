//! The bus across replicas: core NATS between processes, a [`Hub`] within
//! each.
//!
//! Subjects are `natter.events.<chat|user|session>.<uuid>`; payloads are the
//! protobuf-encoded `StreamEventsResponse`. A publish goes to the local hub at
//! once and to NATS through one publisher task (so the process's events keep
//! their order); the connection is opened with `no_echo`, so a process never
//! receives its own events twice. Every process subscribes to
//! `natter.events.>` and fans what arrives out to its local subscribers.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt as _;
use natter_proto::messages::v1::StreamEventsResponse;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Event, EventBus, Hub, Subscription, Topic};

/// Subject prefix of every natter event.
const PREFIX: &str = "natter.events";

/// How many events may wait for the publisher task before new ones are
/// dropped (the store has them; streams fill gaps).
const PUBLISH_QUEUE: usize = 16 * 1024;

/// Events over core NATS, fanned out locally by a [`Hub`].
pub struct NatsBus {
    hub: Arc<Hub>,
    outbox: mpsc::Sender<(Topic, Event)>,
}

fn subject(topic: Topic) -> String {
    match topic {
        Topic::Chat(id) => format!("{PREFIX}.chat.{id}"),
        Topic::User(id) => format!("{PREFIX}.user.{id}"),
        Topic::Session(id) => format!("{PREFIX}.session.{id}"),
    }
}

fn topic(subject: &str) -> Option<Topic> {
    let rest = subject.strip_prefix(PREFIX)?.strip_prefix('.')?;
    let (kind, id) = rest.split_once('.')?;
    let id = Uuid::try_parse(id).ok()?;
    match kind {
        "chat" => Some(Topic::Chat(id)),
        "user" => Some(Topic::User(id)),
        "session" => Some(Topic::Session(id)),
        _ => None,
    }
}

impl NatsBus {
    /// Connects to NATS at `url` and starts the publisher and subscriber
    /// tasks, which end when `shutdown` is cancelled.
    ///
    /// Errors: the first connection fails (later disconnects are retried by
    /// the client and answered with a resync).
    pub async fn connect(url: &str, shutdown: CancellationToken) -> Result<Arc<Self>, async_nats::ConnectError> {
        let hub = Arc::new(Hub::new());
        let on_event = hub.clone();
        let client = async_nats::ConnectOptions::new()
            .no_echo()
            .name("natter")
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let hub = on_event.clone();
                async move {
                    match event {
                        // Announcements may have been lost while away, or
                        // dropped for a slow consumer: re-read the store.
                        async_nats::Event::Connected | async_nats::Event::SlowConsumer(_) => {
                            tracing::info!(%event, "nats: resync streams from the store");
                            hub.resync();
                        }
                        other => tracing::warn!(event = %other, "nats"),
                    }
                }
            })
            .connect(url)
            .await?;
        let subscriber = match client.subscribe(format!("{PREFIX}.>")).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "nats: subscribe failed");
                return Err(async_nats::ConnectError::new(async_nats::ConnectErrorKind::Io));
            }
        };
        // Wait for the server to acknowledge the subscription (a PING/PONG
        // round trip), so events published right after start-up reach us.
        if let Err(e) = client.flush().await {
            tracing::warn!(error = %e, "nats: flush after subscribe failed");
        }
        let (outbox, mut queue) = mpsc::channel::<(Topic, Event)>(PUBLISH_QUEUE);

        let publisher = client.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let (topic, event) = tokio::select! {
                    () = stop.cancelled() => break,
                    next = queue.recv() => match next { Some(item) => item, None => break },
                };
                let payload = Bytes::from(event.encode_to_vec());
                if let Err(e) = publisher.publish(subject(topic), payload).await {
                    tracing::warn!(error = %e, "nats: publish failed (streams will refill from the store)");
                }
            }
            let _ = publisher.flush().await;
        });

        let local = hub.clone();
        tokio::spawn(async move {
            let mut subscriber = subscriber;
            loop {
                let message = tokio::select! {
                    () = shutdown.cancelled() => break,
                    next = subscriber.next() => match next { Some(m) => m, None => break },
                };
                natter_kit::metrics::bus_received(1);
                let Some(topic) = topic(message.subject.as_str()) else { continue };
                match StreamEventsResponse::decode(message.payload) {
                    Ok(event) => local.fan_out(topic, Arc::new(event)),
                    Err(e) => tracing::warn!(subject = %message.subject, error = %e, "nats: undecodable event"),
                }
            }
            let _ = subscriber.unsubscribe().await;
        });

        Ok(Arc::new(Self { hub, outbox }))
    }
}

impl EventBus for NatsBus {
    fn publish(&self, topic: Topic, event: Event) {
        natter_kit::metrics::bus_published(1);
        self.hub.fan_out(topic, event.clone());
        if self.outbox.try_send((topic, event)).is_err() {
            tracing::warn!("nats: publish queue full; event dropped (streams will refill from the store)");
        }
    }

    fn subscribe(&self, topic: Topic) -> Subscription {
        self.hub.subscribe(topic)
    }

    fn topic_count(&self) -> usize {
        self.hub.topic_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        let id = Uuid::now_v7();
        for t in [Topic::Chat(id), Topic::User(id), Topic::Session(id)] {
            assert_eq!(topic(&subject(t)), Some(t));
        }
        assert_eq!(topic("natter.events.chat.not-a-uuid"), None);
        assert_eq!(topic("other.chat.x"), None);
    }

    /// Two buses on one NATS server: what one publishes, the other's
    /// subscribers receive (runs when NATTER_TEST_NATS_URL is set).
    #[tokio::test]
    async fn events_cross_processes() {
        let Some(url) = std::env::var("NATTER_TEST_NATS_URL").ok().filter(|u| !u.is_empty()) else {
            assert!(std::env::var_os("CI").is_none(), "CI must set NATTER_TEST_NATS_URL");
            return;
        };
        let stop = CancellationToken::new();
        let a = NatsBus::connect(&url, stop.clone()).await.unwrap();
        let b = NatsBus::connect(&url, stop.clone()).await.unwrap();
        let chat = Uuid::now_v7();
        let mut on_b = b.subscribe(Topic::Chat(chat));
        let mut on_a = a.subscribe(Topic::Chat(chat));
        // Subscriptions travel to the server asynchronously: publish until
        // one arrives (bounded), then check order and the local copy.
        let mut got = None;
        for seq in 1..=50 {
            a.publish(
                Topic::Chat(chat),
                Arc::new(StreamEventsResponse { chat_id: chat.to_string(), seq, event: None }),
            );
            if let Ok(Some(Ok(e))) = tokio::time::timeout(std::time::Duration::from_millis(100), on_b.recv()).await {
                got = Some(e.seq);
                break;
            }
        }
        assert!(got.is_some(), "b received a's event over NATS");
        assert_eq!(on_a.recv().await.unwrap().unwrap().seq, 1, "a's own subscribers get it locally, once");
        stop.cancel();
    }
}

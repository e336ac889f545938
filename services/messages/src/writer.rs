//! Group commit for SendMessage: concurrent sends share one transaction.
//!
//! One writer task takes sends from a queue. It commits whatever has queued
//! up while the previous commit ran, as one batch ([`Store::insert_batch`]),
//! and answers each caller when that batch is durably committed. Under light
//! load a batch is one message and nothing waits; under heavy load one fsync
//! (SQLite) or one commit round trip (PostgreSQL) serves many messages. No
//! timer: the batch is exactly what arrived during the last commit.
//!
//! Each batch also tells the chats service, in one call, the newest message
//! of every chat it touched (for ListChats' order by activity) before its
//! callers are answered, so a client that sends and then lists sees its chat
//! on top.

use std::sync::Arc;

use std::collections::HashMap;

use natter_links::ChatDirectory;
use natter_proto::chats::v1::Activity;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use crate::store::{MessageRow, NewMessage, Sent, Store};

/// Most messages in one batch.
pub const MAX_BATCH: usize = 512;

/// How many sends may wait for the writer before callers queue in `send`.
const QUEUE: usize = 4096;

type Reply = oneshot::Sender<Result<Sent, Arc<sqlx::Error>>>;

/// A queued send: the message, where to answer, and the caller's span.
type Job = (NewMessage, Reply, tracing::Span);

/// The sending half: cheap to clone.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer task over `store`, reporting activity to `chats`;
    /// it ends when every `Writer` clone is dropped.
    pub fn start(store: Store, chats: Arc<dyn ChatDirectory>) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, chats, jobs));
        Self { queue }
    }

    /// Commits one message (in whatever batch it lands in) and returns its
    /// outcome once that batch is committed.
    pub async fn send(&self, message: NewMessage) -> Result<Sent, Arc<sqlx::Error>> {
        let (reply, answer) = oneshot::channel();
        let closed = || Arc::new(sqlx::Error::PoolClosed);
        self.queue.send((message, reply, tracing::Span::current())).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

async fn run(store: Store, chats: Arc<dyn ChatDirectory>, mut jobs: mpsc::Receiver<Job>) {
    let mut messages = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    while let Some((message, reply, span)) = jobs.recv().await {
        messages.push(message);
        replies.push(reply);
        while messages.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok((message, reply, _)) => {
                    messages.push(message);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        // The batch's work is traced under its first caller's span.
        commit(&store, chats.as_ref(), &mut messages, &mut replies).instrument(span).await;
    }
}

/// Commits one batch and answers its callers.
async fn commit(store: &Store, chats: &dyn ChatDirectory, messages: &mut Vec<NewMessage>, replies: &mut Vec<Reply>) {
    let started = std::time::Instant::now();
    match store.insert_batch(messages).await {
        Ok(outcomes) => {
            natter_kit::metrics::observe_commit(messages.len(), started.elapsed());
            record_activity(chats, &outcomes).await;
            for (reply, outcome) in replies.drain(..).zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        // A batch that failed wrote nothing: retry its messages one by one,
        // so one bad message (or a race with another replica on an id)
        // fails only its own caller.
        Err(e) if messages.len() > 1 => {
            tracing::warn!(batch = messages.len(), error = %e, "batch failed; committing one by one");
            for (message, reply) in messages.iter().zip(replies.drain(..)) {
                let outcome = store.insert(message).await;
                if let Ok(sent) = &outcome {
                    record_activity(chats, std::slice::from_ref(sent)).await;
                }
                let _ = reply.send(outcome.map_err(Arc::new));
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for reply in replies.drain(..) {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
    messages.clear();
}

/// Tells the chats service the newest committed message of each chat in
/// `outcomes`, in one call. The messages are committed already: a failure
/// only delays a chat's place in ListChats until its next message (logged).
async fn record_activity(chats: &dyn ChatDirectory, outcomes: &[Sent]) {
    let mut newest: HashMap<&str, &MessageRow> = HashMap::new();
    for outcome in outcomes {
        if let Sent::Created(row) = outcome {
            let entry = newest.entry(row.chat_id.as_str()).or_insert(row);
            if row.seq > entry.seq {
                *entry = row;
            }
        }
    }
    if newest.is_empty() {
        return;
    }
    let activities = newest
        .into_values()
        .map(|row| Activity {
            chat_id: row.chat_id.clone(),
            last_seq: row.seq,
            last_activity_time: Some(natter_kit::time::timestamp(row.send_time)),
        })
        .collect();
    if let Err(e) = chats.record_activity(activities).await {
        tracing::warn!(error = %e, "recording chat activity failed");
    }
}

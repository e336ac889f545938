//! Group commit for SendMessage: concurrent sends share one transaction.
//!
//! One writer task takes sends from a queue. It commits whatever has queued
//! up while the previous commit ran, as one batch ([`Store::insert_batch`]),
//! and answers each caller when that batch is durably committed. Under light
//! load a batch is one message and nothing waits; under heavy load one fsync
//! (SQLite) or one commit round trip (PostgreSQL) serves many messages. No
//! timer: the batch is exactly what arrived during the last commit.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{NewMessage, Sent, Store};

/// Most messages in one batch.
pub const MAX_BATCH: usize = 512;

/// How many sends may wait for the writer before callers queue in `send`.
const QUEUE: usize = 4096;

type Reply = oneshot::Sender<Result<Sent, Arc<sqlx::Error>>>;

/// The sending half: cheap to clone.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<(NewMessage, Reply)>,
}

impl Writer {
    /// Starts the writer task over `store`; it ends when every `Writer` clone
    /// is dropped.
    pub fn start(store: Store) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, jobs));
        Self { queue }
    }

    /// Commits one message (in whatever batch it lands in) and returns its
    /// outcome once that batch is committed.
    pub async fn send(&self, message: NewMessage) -> Result<Sent, Arc<sqlx::Error>> {
        let (reply, answer) = oneshot::channel();
        let closed = || Arc::new(sqlx::Error::PoolClosed);
        self.queue.send((message, reply)).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

async fn run(store: Store, mut jobs: mpsc::Receiver<(NewMessage, Reply)>) {
    let mut messages = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    while let Some((message, reply)) = jobs.recv().await {
        messages.push(message);
        replies.push(reply);
        while messages.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok((message, reply)) => {
                    messages.push(message);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        match store.insert_batch(&messages).await {
            Ok(outcomes) => {
                natter_kit::metrics::observe_commit(messages.len(), started.elapsed());
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
                    let _ = reply.send(store.insert(message).await.map_err(Arc::new));
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
}

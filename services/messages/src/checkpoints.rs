//! Group commit for the checkpoints of replies being generated.
//!
//! Every reply an assistant generates stores its text so far about once a
//! second (UpdateReply with `checkpoint_text`), which also renews its lease.
//! With 200 replies at once that is 200 write transactions a second: on
//! SQLite 200 WAL syncs on the one writer thread the sends' group commits
//! use. One task gathers the checkpoints that queued up while the last
//! batch was written and stores them with one
//! [`MessageStore::checkpoint_replies`] (as [`crate::writer`] does for
//! sends: no timer, a batch is what arrived meanwhile).

use std::sync::Arc;

use natter_kit::time::now_micros;
use tokio::sync::{mpsc, oneshot};

use crate::store::{Checkpoint, MessageStore, StoreError};

/// Most checkpoints in one batch.
const MAX_BATCH: usize = 256;

/// How many checkpoints may wait before callers queue in `checkpoint`.
const QUEUE: usize = 1024;

type Outcome = Result<Option<bool>, StoreError>;
type Job = (Checkpoint, oneshot::Sender<Outcome>);

/// The sending half: cheap to clone.
#[derive(Clone)]
pub struct Checkpoints {
    queue: mpsc::Sender<Job>,
}

impl Checkpoints {
    /// Starts the batching task over `store` on the current tokio runtime;
    /// it ends when every clone is dropped.
    ///
    /// Panics outside a tokio runtime.
    pub fn start(store: Arc<dyn MessageStore>) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE);
        tokio::spawn(checkpoint_loop(store, jobs));
        Self { queue }
    }

    /// Stores `checkpoint` (in whatever batch it lands in) and answers, once
    /// that batch is committed, whether a stop was asked for the reply
    /// (None: it is not GENERATING).
    pub async fn checkpoint(&self, checkpoint: Checkpoint) -> Outcome {
        let (reply, answer) = oneshot::channel();
        let closed = || StoreError::Db(natter_db::DbError::Closed);
        self.queue.send((checkpoint, reply)).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

async fn checkpoint_loop(store: Arc<dyn MessageStore>, mut jobs: mpsc::Receiver<Job>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH
            && let Ok(job) = jobs.try_recv()
        {
            batch.push(job);
        }
        let (checkpoints, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        // On the store's clock, which judges the checkpoints stale (this
        // process's should it fail to answer: the batch is tried anyway).
        let now = store.clock().await.unwrap_or_else(|_| now_micros());
        match store.checkpoint_replies(&checkpoints, now).await {
            Ok(stops) => {
                for (reply, stop) in replies.into_iter().zip(stops) {
                    let _ = reply.send(Ok(stop));
                }
            }
            // One by one, so that each caller gets its own answer.
            Err(e) => {
                tracing::warn!(batch = checkpoints.len(), error = %e, "checkpoint batch failed; storing one by one");
                for (checkpoint, reply) in checkpoints.into_iter().zip(replies) {
                    let _ = reply.send(store.checkpoint_reply(checkpoint.id, checkpoint.text.as_deref(), now).await);
                }
            }
        }
    }
}

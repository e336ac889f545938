//! Group commit for SendMessage: concurrent sends share one transaction.
//!
//! Two stages, each a task, so that neither waits on the other:
//!
//! 1. **commit**: takes whatever sends queued up while the previous commit
//!    ran, commits them as one batch ([`Store::insert_batch`]: one
//!    transaction, one seq bump per chat, one fsync on SQLite), and hands the
//!    outcomes on. Under light load a batch is one message and nothing waits;
//!    under heavy load one commit serves many messages. No timer: a batch is
//!    exactly what arrived during the last commit.
//! 2. **announce**: tells the chats service, in one call for every batch
//!    that is ready, the newest message of each chat they touched (ListChats
//!    orders by it), then answers the callers. So a caller hears back only
//!    after its message is durably committed and its chat's activity
//!    recorded: a client that sends and then lists sees its chat on top.
//!
//! While stage 2 records one batch's activity, stage 1 already commits the
//! next batch.

use std::collections::HashMap;
use std::sync::Arc;

use natter_links::ChatDirectory;
use natter_proto::chats::v1::Activity;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use crate::store::{MessageRow, NewMessage, Sent, Store};

/// Most messages in one batch.
pub const MAX_BATCH: usize = 512;

/// How many sends may wait for the writer before callers queue in `send`.
const QUEUE: usize = 4096;

/// How many committed batches may wait for stage 2.
const COMMITTED: usize = 64;

type Outcome = Result<Sent, Arc<sqlx::Error>>;
type Reply = oneshot::Sender<Outcome>;

/// A queued send: the message, where to answer, and the caller's span.
type Job = (NewMessage, Reply, tracing::Span);

/// A committed batch on its way to its callers.
struct Committed {
    outcomes: Vec<Outcome>,
    replies: Vec<Reply>,
    span: tracing::Span,
}

/// The sending half: cheap to clone.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts both stages over `store`, reporting activity to `chats`; they
    /// end when every `Writer` clone is dropped.
    pub fn start(store: Store, chats: Arc<dyn ChatDirectory>) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE);
        let (committed, ready) = mpsc::channel(COMMITTED);
        tokio::spawn(commit_stage(store, jobs, committed));
        tokio::spawn(announce_stage(chats, ready));
        Self { queue }
    }

    /// Commits one message (in whatever batch it lands in) and returns its
    /// outcome once that batch is committed and its activity recorded.
    pub async fn send(&self, message: NewMessage) -> Outcome {
        let (reply, answer) = oneshot::channel();
        let closed = || Arc::new(sqlx::Error::PoolClosed);
        self.queue.send((message, reply, tracing::Span::current())).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

async fn commit_stage(store: Store, mut jobs: mpsc::Receiver<Job>, committed: mpsc::Sender<Committed>) {
    while let Some((message, reply, span)) = jobs.recv().await {
        let mut messages = Vec::with_capacity(16);
        let mut replies = Vec::with_capacity(16);
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
        let outcomes = commit(&store, &messages).instrument(span.clone()).await;
        if committed.send(Committed { outcomes, replies, span }).await.is_err() {
            return;
        }
    }
}

/// Commits one batch; the outcomes are in the batch's order.
async fn commit(store: &Store, messages: &[NewMessage]) -> Vec<Outcome> {
    let started = std::time::Instant::now();
    match store.insert_batch(messages).await {
        Ok(outcomes) => {
            natter_kit::metrics::observe_commit(messages.len(), started.elapsed());
            outcomes.into_iter().map(Ok).collect()
        }
        // A batch that failed wrote nothing: retry its messages one by one,
        // so one bad message (or a race with another replica on an id) fails
        // only its own caller.
        Err(e) if messages.len() > 1 => {
            tracing::warn!(batch = messages.len(), error = %e, "batch failed; committing one by one");
            let mut outcomes = Vec::with_capacity(messages.len());
            for message in messages {
                outcomes.push(store.insert(message).await.map_err(Arc::new));
            }
            outcomes
        }
        Err(e) => vec![Err(Arc::new(e))],
    }
}

async fn announce_stage(chats: Arc<dyn ChatDirectory>, mut ready: mpsc::Receiver<Committed>) {
    while let Some(first) = ready.recv().await {
        let span = first.span.clone();
        let mut batches = vec![first];
        while let Ok(more) = ready.try_recv() {
            batches.push(more);
        }
        let created: Vec<&Sent> =
            batches.iter().flat_map(|b| b.outcomes.iter()).filter_map(|o| o.as_ref().ok()).collect();
        record_activity(chats.as_ref(), &created).instrument(span).await;
        for batch in batches {
            for (reply, outcome) in batch.replies.into_iter().zip(batch.outcomes) {
                let _ = reply.send(outcome);
            }
        }
    }
}

/// Tells the chats service the newest committed message of each chat in
/// `outcomes`, in one call. The messages are committed already: a failure
/// only delays a chat's place in ListChats until its next message (logged).
async fn record_activity(chats: &dyn ChatDirectory, outcomes: &[&Sent]) {
    let mut newest: HashMap<&str, &MessageRow> = HashMap::new();
    for outcome in outcomes {
        if let Sent::Created(row) = *outcome {
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

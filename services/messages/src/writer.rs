//! Group commit for SendMessage: concurrent sends share one transaction.
//!
//! One thread, the writer, loops over three steps:
//!
//! 1. **gather**: whatever sends queued up while it worked on the last
//!    batch (up to [`MAX_BATCH`]). Under light load a batch is one message
//!    and nothing waits; under heavy load one round serves many messages. No
//!    timer: a batch is exactly what arrived during the last round.
//! 2. **commit** the batch with [`MessageStore::insert_batch`]: one
//!    transaction, gap-free seqs per chat, one WAL sync on SQLite (where the
//!    store runs it on its one writer thread, as one closure).
//! 3. **announce**: tell the chats service, in one call, the newest message
//!    of each chat the batch touched (ListChats orders by it), then answer
//!    the callers. So a caller hears back only after its message is durably
//!    committed and its chat's activity recorded: a client that sends and
//!    then lists sees its chat on top. (On SQLite the chats store records it
//!    in memory and writes it in the background and before a listing of its
//!    chats, so this step costs the writer a map update; see `natter_chats`'s
//!    `activity` module. Activity lost in a crash is re-announced at
//!    start-up: [`crate::Messages::announce_recent_activity`].)
//!
//! The loop charges its wall-clock time to these steps
//! (`natter_writer_seconds_total{phase}`, see [`WriterPhase`]): whether
//! the writer waits for work, for the database or for the chats service
//! shows there.
//!
//! The writer is a thread, not a task, so that it never waits behind the
//! request tasks for a turn on the runtime's workers. Committing and
//! announcing on one thread, rather than on two that hand batches over,
//! measured faster on two cores: every hand-off between threads costs a
//! wake-up that waits for a free core (see BENCHMARKS.md).
//! On SQLite the commit itself runs on the store's writer thread, the one
//! thread that owns every SQLite write: one hand-off there and back per
//! batch, not per message.

use std::collections::HashMap;
use std::sync::Arc;

use natter_links::ChatDirectory;
use natter_proto::chats::v1::Activity;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use crate::metrics::{PhaseClock, WriterPhase, observe_commit};
use crate::store::{Message, MessageStore, NewMessage, Sent, StoreError};

/// Most messages in one batch.
pub const MAX_BATCH: usize = 512;

/// How many sends may wait for the writer before callers queue in `send`.
const QUEUE: usize = 4096;

/// A send's outcome once its batch is committed (or why it failed).
type Outcome = Result<Sent, StoreError>;
type Reply = oneshot::Sender<Outcome>;

/// A queued send: the message, where to answer, and the caller's span.
type Job = (NewMessage, Reply, tracing::Span);

/// The sending half: cheap to clone.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread over `store`, reporting activity to
    /// `chats` through the current tokio runtime; it ends when every
    /// `Writer` clone is dropped.
    ///
    /// Errors: the thread cannot be started. Panics outside a tokio
    /// runtime.
    pub fn start(store: Arc<dyn MessageStore>, chats: Arc<dyn ChatDirectory>) -> std::io::Result<Self> {
        crate::metrics::register();
        let (queue, jobs) = mpsc::channel(QUEUE);
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("natter-writer".into())
            .spawn(move || write_loop(&runtime, store.as_ref(), chats.as_ref(), jobs))?;
        Ok(Self { queue })
    }

    /// Commits one message (in whatever batch it lands in) and returns its
    /// outcome once that batch is committed and its activity recorded.
    pub async fn send(&self, message: NewMessage) -> Outcome {
        let (reply, answer) = oneshot::channel();
        let closed = || StoreError::Db(natter_db::DbError::Closed);
        self.queue.send((message, reply, tracing::Span::current())).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

/// Commits one batch; the outcomes are in the batch's order. A batch that
/// fails writes nothing: its messages are then committed one by one, so one
/// bad message fails only its own caller.
fn commit(
    runtime: &tokio::runtime::Handle,
    store: &dyn MessageStore,
    messages: &[NewMessage],
    clock: &mut PhaseClock,
) -> Vec<Outcome> {
    let started = std::time::Instant::now();
    let batch = runtime.block_on(store.insert_batch(messages));
    clock.lap(WriterPhase::Commit);
    match batch {
        Ok(outcomes) => {
            observe_commit(messages.len(), started.elapsed());
            outcomes.into_iter().map(Ok).collect()
        }
        Err(e) if messages.len() > 1 => {
            tracing::warn!(batch = messages.len(), error = %e, "batch failed; committing one by one");
            messages.iter().flat_map(|m| commit(runtime, store, std::slice::from_ref(m), clock)).collect()
        }
        Err(e) => vec![Err(e)],
    }
}

/// The next batch: `first` and whatever else is queued, up to [`MAX_BATCH`].
/// The batch's work is traced under its first caller's span.
fn gather(first: Job, jobs: &mut mpsc::Receiver<Job>) -> (Vec<NewMessage>, Vec<Reply>, tracing::Span) {
    let (message, reply, span) = first;
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
    (messages, replies, span)
}

/// The writer thread: gather, commit, record activity, answer; until every
/// `Writer` is dropped.
fn write_loop(
    runtime: &tokio::runtime::Handle,
    store: &dyn MessageStore,
    chats: &dyn ChatDirectory,
    mut jobs: mpsc::Receiver<Job>,
) {
    let mut clock = PhaseClock::start();
    while let Some(first) = jobs.blocking_recv() {
        clock.lap(WriterPhase::Idle);
        let (messages, replies, span) = gather(first, &mut jobs);
        let outcomes = span.in_scope(|| commit(runtime, store, &messages, &mut clock));
        let created: Vec<&Sent> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        runtime.block_on(record_activity(chats, &created).instrument(span));
        clock.lap(WriterPhase::Activity);
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            let _ = reply.send(outcome);
        }
        clock.lap(WriterPhase::Answer);
    }
}

/// Tells the chats service the newest committed message of each chat in
/// `outcomes`, in one call. The messages are committed already: a failure
/// only delays a chat's place in ListChats until its next message (logged).
async fn record_activity(chats: &dyn ChatDirectory, outcomes: &[&Sent]) {
    let mut newest: HashMap<natter_kit::id::ChatId, &Message> = HashMap::new();
    for outcome in outcomes {
        if let Sent::Created(row) = *outcome {
            let entry = newest.entry(row.chat_id).or_insert(row);
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
            chat_id: row.chat_id.to_string(),
            last_seq: row.seq.0,
            last_activity_time: Some(natter_kit::time::timestamp(row.send_time)),
        })
        .collect();
    if let Err(e) = chats.record_activity(activities).await {
        tracing::warn!(error = %e, "recording chat activity failed");
    }
}

//! Group commit for SendMessage: concurrent sends share one transaction.
//!
//! One task, the writer, loops over three steps:
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
//! The writer is a tokio task. On SQLite the commit runs on the store's
//! writer thread, the one thread that owns every SQLite write: one hand-off
//! there and back per batch, not per message. (A writer thread of its own
//! in front of that one cost every send two more thread wake-ups: 30-40 µs
//! of server CPU and ~0.1 ms of latency per send at concurrency 1; see
//! BENCHMARKS.md. Before the stores were split by engine the writer thread
//! committed on a connection of its own, which is why it was a thread.)

use std::collections::HashMap;
use std::sync::Arc;

use natter_db::DbError;
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

/// What the writer does with a message committed after its caller went
/// away (see [`Writer::start`]).
pub type Orphaned = Box<dyn Fn(&Message) + Send + Sync>;

/// The sending half: cheap to clone.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer task over `store`, reporting activity to `chats`,
    /// on the current tokio runtime; it ends when every `Writer` clone is
    /// dropped.
    ///
    /// Panics outside a tokio runtime.
    ///
    /// `orphaned` is called with each message committed after its caller
    /// went away (the request was cancelled: a client reset, a deadline),
    /// which therefore announces nothing itself.
    pub fn start(store: Arc<dyn MessageStore>, chats: Arc<dyn ChatDirectory>, orphaned: Orphaned) -> Self {
        crate::metrics::register();
        let (queue, jobs) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(store, chats, orphaned, jobs));
        Self { queue }
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
/// bad message fails only its own caller; unless the database is out of
/// reach ([`natter_db::Failure::Unavailable`]: a pool with no connection
/// to give, a server that does not answer), when they all fail with it,
/// as one at a time would each wait as long again.
async fn commit(store: &dyn MessageStore, messages: &[NewMessage], clock: &mut PhaseClock) -> Vec<Outcome> {
    let started = std::time::Instant::now();
    let batch = store.insert_batch(messages).await;
    clock.lap(WriterPhase::Commit);
    match batch {
        Ok(outcomes) => {
            observe_commit(messages.len(), started.elapsed());
            outcomes.into_iter().map(Ok).collect()
        }
        Err(e) if messages.len() > 1 && e.failure() == natter_db::Failure::Unavailable => {
            tracing::warn!(batch = messages.len(), error = %e, "batch failed: the database is out of reach");
            let text = e.to_string();
            let others = (1..messages.len()).map(|_| Err(StoreError::Db(DbError::Unavailable(text.clone()))));
            std::iter::once(Err(e)).chain(others).collect()
        }
        Err(e) if messages.len() > 1 => {
            tracing::warn!(batch = messages.len(), error = %e, "batch failed; committing one by one");
            let mut outcomes = Vec::with_capacity(messages.len());
            for message in messages {
                let started = std::time::Instant::now();
                let one = store.insert_batch(std::slice::from_ref(message)).await;
                clock.lap(WriterPhase::Commit);
                match one {
                    Ok(sent) => {
                        observe_commit(1, started.elapsed());
                        outcomes.extend(sent.into_iter().map(Ok));
                    }
                    Err(e) => outcomes.push(Err(e)),
                }
            }
            outcomes
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

/// The writer task: gather, commit, record activity, answer; until every
/// `Writer` is dropped.
async fn write_loop(
    store: Arc<dyn MessageStore>,
    chats: Arc<dyn ChatDirectory>,
    orphaned: Orphaned,
    mut jobs: mpsc::Receiver<Job>,
) {
    let mut clock = PhaseClock::start();
    while let Some(first) = jobs.recv().await {
        clock.lap(WriterPhase::Idle);
        let (messages, replies, span) = gather(first, &mut jobs);
        let outcomes = commit(store.as_ref(), &messages, &mut clock).instrument(span.clone()).await;
        let created: Vec<&Sent> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        record_activity(chats.as_ref(), &created).instrument(span).await;
        clock.lap(WriterPhase::Activity);
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            if let Err(Ok(Sent::Created(message))) = reply.send(outcome) {
                orphaned(&message);
            }
        }
        clock.lap(WriterPhase::Answer);
    }
}

/// Tells the chats service the newest committed message of each chat in
/// `outcomes`, in one call. The messages are committed already: a failure
/// only delays a chat's place in ListChats until its next message (logged).
pub(crate) async fn record_activity(chats: &dyn ChatDirectory, outcomes: &[&Sent]) {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use natter_kit::id::{ChatId, MessageId, UserId};
    use natter_proto::chats::v1 as cpb;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tonic::Status;

    use super::*;

    /// A guard against a hang: every wait here ends within it.
    const GUARD: Duration = Duration::from_secs(20);

    /// A TCP proxy to `upstream` that can freeze a connection mid-query:
    /// once armed, the next PostgreSQL statement a client sends (a message
    /// of type Parse, Bind, Query or Execute; not the Sync of sqlx's ping)
    /// reaches the server, and from then on nothing more is forwarded on
    /// that connection, either way, while it stays open: as a server gone
    /// without a FIN looks to its client (a host crash or failover under
    /// load, a NAT that dropped the flow). Other connections go on.
    struct FreezingProxy {
        addr: std::net::SocketAddr,
        armed: Arc<AtomicBool>,
        /// Set: nothing more is forwarded on any connection, and new ones
        /// are accepted and left unanswered, as a server out of reach
        /// looks (a connect or a ping waits, then times out).
        down: Arc<AtomicBool>,
        /// Notified when a connection freezes.
        frozen: Arc<tokio::sync::Notify>,
    }

    impl FreezingProxy {
        async fn start(upstream: std::net::SocketAddr) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let armed = Arc::new(AtomicBool::new(false));
            let down = Arc::new(AtomicBool::new(false));
            let frozen_once = Arc::new(tokio::sync::Notify::new());
            let (arming, downed, freezes) = (armed.clone(), down.clone(), frozen_once.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if downed.load(Ordering::Acquire) {
                        tokio::spawn(async move {
                            let _unanswered = client;
                            std::future::pending::<()>().await
                        });
                        continue;
                    }
                    let (armed, freezes, down) = (arming.clone(), freezes.clone(), downed.clone());
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else { return };
                        let ((mut from_client, mut to_client), (mut from_server, mut to_server)) =
                            (client.into_split(), server.into_split());
                        let frozen = AtomicBool::new(false);
                        let up = async {
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = from_client.read(&mut buf).await?;
                                if n == 0 {
                                    return Ok::<_, std::io::Error>(());
                                }
                                if down.load(Ordering::Acquire) {
                                    std::future::pending::<()>().await;
                                }
                                let statement = b"PBQE".contains(&buf[0]);
                                if statement && armed.swap(false, Ordering::AcqRel) {
                                    frozen.store(true, Ordering::Release);
                                    to_server.write_all(&buf[..n]).await?;
                                    freezes.notify_one();
                                    std::future::pending::<()>().await;
                                }
                                to_server.write_all(&buf[..n]).await?;
                            }
                        };
                        let down = async {
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = from_server.read(&mut buf).await?;
                                if n == 0 {
                                    return Ok::<_, std::io::Error>(());
                                }
                                if frozen.load(Ordering::Acquire) || down.load(Ordering::Acquire) {
                                    std::future::pending::<()>().await;
                                }
                                to_client.write_all(&buf[..n]).await?;
                            }
                        };
                        let _ = tokio::join!(up, down);
                    });
                }
            });
            Self { addr, armed, down, frozen: frozen_once }
        }

        /// Freezes the next connection a statement is sent on.
        fn arm(&self) {
            self.armed.store(true, Ordering::Release);
        }

        /// Forwards nothing more, on any connection, old or new.
        fn go_down(&self) {
            self.down.store(true, Ordering::Release);
        }
    }

    /// A chats service that records activity and is asked nothing else.
    struct Activity;

    #[async_trait]
    impl ChatDirectory for Activity {
        async fn check_memberships(
            &self,
            _: cpb::CheckMembershipRequest,
        ) -> Result<cpb::CheckMembershipResponse, Status> {
            Err(Status::unimplemented("not asked"))
        }

        async fn member_chat_ids(&self, _: &str) -> Result<Vec<String>, Status> {
            Err(Status::unimplemented("not asked"))
        }

        async fn managed_chat_ids(&self, _: &str) -> Result<Vec<String>, Status> {
            Err(Status::unimplemented("not asked"))
        }

        async fn record_activity(&self, _: Vec<cpb::Activity>) -> Result<(), Status> {
            Ok(())
        }
    }

    fn message(n: u128) -> NewMessage {
        NewMessage {
            id: MessageId(uuid::Uuid::from_u128(0x1_0000 + n)),
            chat_id: ChatId(uuid::Uuid::from_u128(0xc0)),
            author_id: UserId(uuid::Uuid::from_u128(0xa0)),
            text: format!("message {n}"),
            attachments: Vec::new(),
            reply_to: None,
            send_time: 1_000 + n as i64,
            flags: None,
            mentions: Vec::new(),
            thread_root: None,
            members_version: 0,
        }
    }

    /// A send whose connection to PostgreSQL froze mid-commit (the server
    /// gone without a word while the statement was under way) fails
    /// UNAVAILABLE once a live server would have answered, and the next
    /// send commits on another connection: the writer, which commits one
    /// batch at a time, waited on it for ever, and every send after it
    /// with it. (A connection that froze while idle was caught already:
    /// sqlx pings it before handing it out, within the acquire timeout.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_on_a_frozen_connection_is_given_up_and_the_next_send_commits() {
        let Some(h) = Frozen::start().await else { return };
        let (proxy, writer, limit) = (&h.proxy, &h.writer, h.limit);

        let first = tokio::time::timeout(GUARD, writer.send(message(1))).await.expect("answered");
        assert!(matches!(first, Ok(Sent::Created(_))), "{first:?}");

        proxy.arm();
        let started = std::time::Instant::now();
        let frozen = tokio::time::timeout(GUARD, writer.send(message(2))).await.expect("given up, not waited on");
        let failure = frozen.as_ref().map(drop).map_err(StoreError::failure);
        assert_eq!(failure, Err(natter_db::Failure::Unavailable), "{frozen:?}");
        assert!(started.elapsed() >= limit, "given up at {:?}, before {limit:?}", started.elapsed());

        let next = tokio::time::timeout(GUARD, writer.send(message(3))).await.expect("answered");
        assert!(matches!(next, Ok(Sent::Created(_))), "{next:?}");
        h.finish().await;
    }

    /// While PostgreSQL is out of reach, a batch of sends fails as one:
    /// each sender hears UNAVAILABLE once the batch's wait for a connection
    /// ran out. They were retried one at a time, each waiting the acquire
    /// timeout again (a batch of five: six waits), so the writer, and every
    /// send queued behind it, spent an outage grinding through them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_fails_as_one_while_the_database_is_out_of_reach() {
        let Some(h) = Frozen::start().await else { return };
        let writer = Arc::new(h.writer.clone());
        let first = tokio::time::timeout(GUARD, writer.send(message(1))).await.expect("answered");
        assert!(matches!(first, Ok(Sent::Created(_))), "{first:?}");

        // The writer waits on a frozen connection while five sends queue
        // up behind it: its next batch.
        h.proxy.arm();
        let stuck = tokio::spawn({
            let writer = writer.clone();
            async move { writer.send(message(2)).await }
        });
        tokio::time::timeout(GUARD, h.proxy.frozen.notified()).await.expect("the statement froze");
        h.proxy.go_down();
        let batch: Vec<_> = (10..15)
            .map(|n| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    let outcome = writer.send(message(n)).await;
                    (outcome.map(drop).map_err(|e| e.failure()), std::time::Instant::now())
                })
            })
            .collect();
        let stuck = tokio::time::timeout(GUARD, stuck).await.expect("given up").unwrap();
        assert_eq!(stuck.map(drop).map_err(|e| e.failure()), Err(natter_db::Failure::Unavailable));
        let given_up = std::time::Instant::now();
        let mut last = given_up;
        for send in batch {
            let (outcome, at) = tokio::time::timeout(GUARD, send).await.expect("answered").unwrap();
            assert_eq!(outcome, Err(natter_db::Failure::Unavailable));
            last = last.max(at);
        }
        // One wait for a connection (300 ms), not six.
        let took = last - given_up;
        assert!(took < h.acquire_timeout * 3, "the batch's senders heard back {took:?} after the frozen send");
        h.finish().await;
    }

    /// A writer over a PostgreSQL store reached through a [`FreezingProxy`],
    /// with short timeouts (acquire 300 ms, statements 200 ms).
    struct Frozen {
        proxy: FreezingProxy,
        writer: Writer,
        /// When a batch is given up ([`natter_db::PoolSettings::unresponsive_after`]).
        limit: Duration,
        acquire_timeout: Duration,
        url: String,
        schema: String,
    }

    impl Frozen {
        /// `None` when no test database is set.
        async fn start() -> Option<Self> {
            let url = natter_db::testing::postgres_url()?;
            // postgres://USER@HOST:PORT/DB: the same URL, through the proxy.
            let (_, rest) = url.split_once("://").unwrap();
            let authority = rest.split('/').next().unwrap();
            let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let (host, port) = host_port.rsplit_once(':').map_or((host_port, 5432), |(h, p)| (h, p.parse().unwrap()));
            let upstream = tokio::net::lookup_host((host, port)).await.unwrap().next().unwrap();
            let proxy = FreezingProxy::start(upstream).await;
            let through = url.replacen(host_port, &proxy.addr.to_string(), 1);
            let schema = natter_db::testing::unique_schema("writer");
            let mut config = natter_db::DbConfig::postgres(&through, &schema);
            config.pool.acquire_timeout = Duration::from_millis(300);
            config.pool.statement_timeout = Duration::from_millis(200);
            let limit = config.pool.unresponsive_after();
            let store = crate::store::open(&config).await.unwrap();
            let writer = Writer::start(store, Arc::new(Activity), Box::new(|_| {}));
            let acquire_timeout = config.pool.acquire_timeout;
            Some(Self { proxy, writer, limit, acquire_timeout, url, schema })
        }

        async fn finish(self) {
            drop(self.writer);
            natter_db::postgres::drop_schema(&self.url, &self.schema).await.unwrap();
        }
    }
}

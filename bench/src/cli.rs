//! Command-line flags and the settings they resolve to. Flags that `--smoke`
//! shortens are `Option`s: an explicit flag always wins over the smoke value.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// Benchmarks a running natter over loopback (or one it spawns itself) and
/// prints one JSON object per scenario on stdout, a table on stderr.
#[derive(Debug, clap::Parser)]
#[command(name = "natter-bench", version)]
pub(crate) struct Args {
    /// URL of the server to drive (ignored with --spawn).
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub(crate) target: String,

    /// Path of a `natter` binary: start `natter serve` on a free port with a
    /// fresh data dir, benchmark it, stop it with SIGTERM. Implies the pid and
    /// --seed-sqlite.
    #[arg(long, value_name = "PATH_TO_NATTER")]
    pub(crate) spawn: Option<PathBuf>,

    /// An extra argument for the spawned `natter serve` (repeat for more),
    /// e.g. `--server-arg=--scan-messages=off` for an A/B of a server flag.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) server_arg: Vec<String>,

    /// Pid of the server process whose memory the `streams` scenario reads
    /// (default: the process listening on the target's port, when found).
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,

    /// `host:port` of the server's Prometheus endpoint (natter's
    /// `--metrics-listen`): the half-rate send loops then also report the
    /// server's own latency histogram for their window. Set automatically
    /// with --spawn.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) server_metrics: Option<String>,

    /// Scenarios to run, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ceiling,send,fanout,typing,reactions,resume,history,chats,streams,assistant,search"
    )]
    pub(crate) scenarios: Vec<Scenario>,

    /// A very short run of every scenario, to prove the tool works.
    #[arg(long)]
    pub(crate) smoke: bool,

    /// Measurement window of each figure [default: 5s; --smoke: 300ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) duration: Option<Duration>,

    /// Unmeasured warm-up before each window [default: 1s; --smoke: 50ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) warmup: Option<Duration>,

    /// HTTP/2 connections for unary calls (one tonic Channel each).
    #[arg(long, default_value_t = 16)]
    pub(crate) connections: usize,

    /// In-flight calls per connection for `ceiling` and the loaded `history`
    /// figure (total concurrency = connections x this).
    #[arg(long, default_value_t = 16)]
    pub(crate) streams_per_connection: usize,

    /// Users the tool creates (CreateUser + CreateSession, argon2 on the
    /// server), and so the number of chats `send` spreads over [default: 64; --smoke: 8].
    #[arg(long)]
    pub(crate) users: Option<usize>,

    /// Closed-loop concurrency levels of `send`, comma separated [default: 1,16,64,256; --smoke: 1,16].
    #[arg(long, value_delimiter = ',')]
    pub(crate) send_concurrency: Option<Vec<usize>>,

    /// Skip `send`'s ceiling at each concurrency (grpc.health.v1 Check
    /// before each closed loop; `ratio@c` is then absent), so that the whole
    /// run's CPU is sends: for tools that count every process's CPU over the
    /// run, such as bench/work-per-send.sh.
    #[arg(long)]
    pub(crate) send_skip_ceiling_at_concurrency: bool,

    /// Live StreamEvents streams on the `fanout` chat [default: 1000; --smoke: 10].
    #[arg(long)]
    pub(crate) fanout_streams: Option<usize>,

    /// Messages per second the `fanout` sender sends.
    #[arg(long, default_value_t = 50.0)]
    pub(crate) fanout_rate: f64,

    /// Where the `fanout` sender sends: another replica on the same
    /// database and bus than --target (which holds the streams), so every
    /// delivery crosses the bus [default: --target].
    #[arg(long, value_name = "URL")]
    pub(crate) fanout_send_target: Option<String>,

    /// Live StreamEvents streams on the `typing` chat [default: 1000; --smoke: 10].
    #[arg(long)]
    pub(crate) typing_streams: Option<usize>,

    /// SetTyping calls per second of `typing` (spread over 100 typists).
    #[arg(long, default_value_t = 50.0)]
    pub(crate) typing_rate: f64,

    /// StreamEvents streams per HTTP/2 connection (`fanout`, `typing`, `streams`).
    #[arg(long, default_value_t = 100)]
    pub(crate) event_streams_per_connection: usize,

    /// Depth of the deep `history` page: the page below the newest N messages [default: 1000000; --smoke: 1000].
    #[arg(long)]
    pub(crate) history_depth: Option<u64>,

    /// Messages of the big chat `search` searches [default: 1000000; --smoke: 2000].
    #[arg(long)]
    pub(crate) search_depth: Option<u64>,

    /// Other chats (of 100 messages each) of the user who searches in
    /// `search` [default: 100; --smoke: 5].
    #[arg(long)]
    pub(crate) search_chats: Option<usize>,

    /// Seed `history` by SQL straight into this SQLite messages store (the
    /// server's `<data-dir>/messages.db`); the server may keep running.
    #[arg(long, value_name = "PATH_TO_messages.db")]
    pub(crate) seed_sqlite: Option<PathBuf>,

    /// Seed `history` by SQL straight into this PostgreSQL database.
    #[arg(long, value_name = "URL")]
    pub(crate) seed_postgres: Option<String>,

    /// PostgreSQL schema of the messages service (with --seed-postgres).
    #[arg(long, default_value = "natter_messages")]
    pub(crate) schema: String,

    /// The target is the edge of the split services on PostgreSQL: `history`
    /// seeds through --seed-postgres, `streams` needs --server-pid.
    #[arg(long)]
    pub(crate) postgres: bool,

    /// Idle stream counts of `streams`, comma separated, ascending [default: 10000,50000; --smoke: 10,50].
    #[arg(long, value_delimiter = ',')]
    pub(crate) idle_streams: Option<Vec<usize>>,

    /// Clients of `resume`, each resuming one chat's stream [default: 1000; --smoke: 20].
    #[arg(long)]
    pub(crate) resume_clients: Option<usize>,

    /// Clients of `resume` per chat (the chats are groups of every user).
    #[arg(long, default_value_t = 10)]
    pub(crate) resume_clients_per_chat: usize,

    /// Changes made to each chat while its `resume` clients are away
    /// (sends, edits, deletes) [default: 100; --smoke: 10].
    #[arg(long)]
    pub(crate) resume_changes: Option<usize>,

    /// Replies the `assistant` scenario generates at once, each in its own
    /// chat [default: 200; --smoke: 4].
    #[arg(long)]
    pub(crate) assistant_generations: Option<usize>,

    /// Live streams of `assistant`, spread over its chats [default: 1000; --smoke: 8].
    #[arg(long)]
    pub(crate) assistant_streams: Option<usize>,

    /// Time between two tokens of the scripted model in `assistant`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "50ms")]
    pub(crate) assistant_token_interval: Duration,
}

/// A benchmark scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Scenario {
    /// grpc.health.v1 Check rate: the machine's limit for one unary call.
    Ceiling,
    /// SendMessage throughput and latency, many chats and one hot chat.
    Send,
    /// Delivery latency from SendMessage to every live stream of one chat.
    Fanout,
    /// Typing indicators to the live streams of one chat, and SendMessage
    /// on other chats beside them.
    Typing,
    /// Every user adding and removing reactions on one message at once; no
    /// update may be lost.
    Reactions,
    /// Time from reconnecting with resume_changes to caught up, many
    /// clients at once after changes made while they were away.
    Resume,
    /// ListMessages at the newest end and deep in one chat.
    History,
    /// ListChats pages of 20 chats with previews and unread counts.
    Chats,
    /// Server memory per idle StreamEvents stream.
    Streams,
    /// Replies generated at once, streamed as deltas to live streams, and
    /// SendMessage beside them (needs --spawn).
    Assistant,
    /// SearchMessages, one- and two-word queries, over a chat of a million
    /// messages and 100 others.
    Search,
}

/// Every knob of a run, resolved from the flags (printed with the results).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Settings {
    pub(crate) target: String,
    pub(crate) spawned: bool,
    pub(crate) smoke: bool,
    pub(crate) postgres: bool,
    #[serde(serialize_with = "as_secs")]
    pub(crate) duration: Duration,
    #[serde(serialize_with = "as_secs")]
    pub(crate) warmup: Duration,
    pub(crate) connections: usize,
    pub(crate) streams_per_connection: usize,
    pub(crate) users: usize,
    pub(crate) send_concurrency: Vec<usize>,
    pub(crate) send_skip_ceiling_at_concurrency: bool,
    pub(crate) fanout_streams: usize,
    pub(crate) fanout_rate: f64,
    pub(crate) fanout_send_target: Option<String>,
    pub(crate) typing_streams: usize,
    pub(crate) typing_rate: f64,
    pub(crate) event_streams_per_connection: usize,
    pub(crate) history_depth: u64,
    pub(crate) history_page_size: i32,
    pub(crate) search_depth: u64,
    pub(crate) search_chats: usize,
    pub(crate) idle_streams: Vec<usize>,
    pub(crate) resume_clients: usize,
    pub(crate) resume_clients_per_chat: usize,
    pub(crate) resume_changes: usize,
    pub(crate) assistant_generations: usize,
    pub(crate) assistant_streams: usize,
    #[serde(serialize_with = "as_secs")]
    pub(crate) assistant_token_interval: Duration,
}

impl Settings {
    /// Resolves the flags; `target` is the URL actually driven.
    pub(crate) fn resolve(args: &Args, target: String) -> Self {
        let smoke = args.smoke;
        let mut idle_streams =
            args.idle_streams.clone().unwrap_or_else(|| pick(smoke, vec![10_000, 50_000], vec![10, 50]));
        idle_streams.sort_unstable();
        Self {
            target,
            spawned: args.spawn.is_some(),
            smoke,
            postgres: args.postgres,
            duration: args.duration.unwrap_or(pick(smoke, Duration::from_secs(5), Duration::from_millis(300))),
            warmup: args.warmup.unwrap_or(pick(smoke, Duration::from_secs(1), Duration::from_millis(50))),
            connections: args.connections.max(1),
            streams_per_connection: args.streams_per_connection.max(1),
            users: args.users.unwrap_or(pick(smoke, 64, 8)).max(2),
            send_concurrency: args
                .send_concurrency
                .clone()
                .unwrap_or_else(|| pick(smoke, vec![1, 16, 64, 256], vec![1, 16])),
            send_skip_ceiling_at_concurrency: args.send_skip_ceiling_at_concurrency,
            fanout_streams: args.fanout_streams.unwrap_or(pick(smoke, 1000, 10)).max(1),
            fanout_rate: args.fanout_rate.max(0.1),
            fanout_send_target: args.fanout_send_target.clone(),
            typing_streams: args.typing_streams.unwrap_or(pick(smoke, 1000, 10)).max(1),
            typing_rate: args.typing_rate.max(0.1),
            event_streams_per_connection: args.event_streams_per_connection.max(1),
            history_depth: args.history_depth.unwrap_or(pick(smoke, 1_000_000, 1000)).max(1),
            history_page_size: 50,
            search_depth: args.search_depth.unwrap_or(pick(smoke, 1_000_000, 2000)).max(100),
            search_chats: args.search_chats.unwrap_or(pick(smoke, 100, 5)),
            idle_streams,
            resume_clients: args.resume_clients.unwrap_or(pick(smoke, 1000, 20)).max(1),
            resume_clients_per_chat: args.resume_clients_per_chat.max(1),
            resume_changes: args.resume_changes.unwrap_or(pick(smoke, 100, 10)).max(1),
            assistant_generations: args.assistant_generations.unwrap_or(pick(smoke, 200, 4)).max(1),
            assistant_streams: args.assistant_streams.unwrap_or(pick(smoke, 1000, 8)).max(1),
            assistant_token_interval: args.assistant_token_interval.max(Duration::from_millis(1)),
        }
    }

    /// Tokens of each scripted reply of `assistant`: enough to stream
    /// through its three windows (each after a warm-up), with room to spare.
    pub(crate) fn assistant_tokens(&self) -> usize {
        let span = 3.0 * (self.warmup + self.duration).as_secs_f64() * 1.3 + 1.0;
        (span / self.assistant_token_interval.as_secs_f64()).ceil() as usize
    }

    /// Total in-flight unary calls of `ceiling` (connections x streams per connection).
    pub(crate) fn unary_concurrency(&self) -> usize {
        self.connections * self.streams_per_connection
    }
}

/// `normal`, or `short` under --smoke.
fn pick<T>(smoke: bool, normal: T, short: T) -> T {
    if smoke { short } else { normal }
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

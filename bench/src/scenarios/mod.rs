//! The scenarios. Each returns a [`Report`]: one JSON object for stdout and
//! table lines for stderr. Rates are also given as a ratio to the `ceiling`
//! (health Check calls per second measured in the same run), which survives
//! a noisy or slower machine better than the raw figure.

pub(crate) mod assistant;
pub(crate) mod ceiling;
pub(crate) mod chats;
pub(crate) mod fanout;
pub(crate) mod history;
pub(crate) mod reactions;
pub(crate) mod resume;
pub(crate) mod search;
pub(crate) mod send;
pub(crate) mod streams;
pub(crate) mod typing;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::Settings;
use crate::client::Fixture;
use crate::load::{self, Measured, Outcome};
use crate::seed;
use crate::server::Target;

/// What a scenario works with.
pub(crate) struct Ctx<'a> {
    pub(crate) settings: &'a Settings,
    pub(crate) fixture: &'a Fixture,
    pub(crate) target: &'a Target,
    /// Direct access to the messages store, for seeding `history`.
    pub(crate) store: Option<seed::Store>,
    /// Health Check calls per second, when `ceiling` ran.
    pub(crate) ceiling: Option<f64>,
    /// The scripted model server the spawned natter's assistant streams
    /// from (`assistant`).
    pub(crate) llm: Option<natter_llm::testing::ScriptedServer>,
}

impl Ctx<'_> {
    /// `rate` as a fraction of the ceiling (None without one).
    pub(crate) fn ratio(&self, rate: f64) -> Option<f64> {
        self.ceiling.filter(|c| *c > 0.0).map(|c| load::round4(rate / c))
    }
}

/// What a "sends beside a load" ratio can be on this machine: the CPU the
/// sends took alone, and the CPU the load took on its own, the server's
/// and this tool's (all in cores: CPU seconds per second). Only where the
/// tool and the server share the cores and the sends alone keep them busy
/// (no idle time, which this does not measure) do the sends beside the
/// load fall by about the load's cores over the sends'
/// (`load_share_of_sends`), and does a tool share alone above a tenth of
/// the sends' cores rule out "within 10%" whatever the server spends.
#[derive(Serialize)]
pub(crate) struct CpuBudget {
    pub(crate) send_alone_cores: Option<f64>,
    pub(crate) load_server_cores: Option<f64>,
    pub(crate) load_tool_cores: Option<f64>,
    /// (server + tool cores of the load) / the sends' cores.
    pub(crate) load_share_of_sends: Option<f64>,
    /// The tool's cores of the load / the sends' cores.
    pub(crate) tool_share_of_sends: Option<f64>,
}

impl CpuBudget {
    /// From the sends alone and the load's (server, tool) cores.
    pub(crate) fn new(send_alone: &Outcome, (server, tool): (Option<f64>, Option<f64>)) -> Self {
        let (send_server, send_tool) = send_alone.cores();
        let sends = send_server.zip(send_tool).map(|(a, b)| a + b).filter(|c| *c > 0.0);
        let share = |cores: Option<f64>| cores.zip(sends).map(|(c, s)| load::round3(c / s));
        Self {
            send_alone_cores: sends.map(load::round3),
            load_server_cores: server,
            load_tool_cores: tool,
            load_share_of_sends: share(server.zip(tool).map(|(a, b)| a + b)),
            tool_share_of_sends: share(tool),
        }
    }

    /// `CPU (cores) sends alone .. | load: server .. tool .. (.. / .. of the sends')`.
    pub(crate) fn summary(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        format!(
            "CPU cores: sends alone {} | the load alone: server {}, this tool {} ({} and {} of the sends')",
            f(self.send_alone_cores),
            f(self.load_server_cores),
            f(self.load_tool_cores),
            f(self.load_share_of_sends),
            f(self.tool_share_of_sends),
        )
    }
}

/// A closed loop of page reads (history, chats): its rate and what it cost.
#[derive(Serialize)]
pub(crate) struct PageRate {
    pub(crate) concurrency: usize,
    pub(crate) pages_per_s: f64,
    pub(crate) ratio_to_ceiling: Option<f64>,
    #[serde(flatten)]
    pub(crate) measured: Measured,
}

impl PageRate {
    /// The figures of `out`, a closed loop at `concurrency`.
    pub(crate) fn of(ctx: &Ctx<'_>, concurrency: usize, out: Outcome) -> Self {
        Self {
            concurrency,
            pages_per_s: load::round3(out.per_sec()),
            ratio_to_ceiling: ctx.ratio(out.per_sec()),
            measured: out.measured(),
        }
    }

    /// `N pages/s ratio R  <latency and CPU per page>` for a table line.
    pub(crate) fn summary(&self) -> String {
        format!(
            "{:.0} pages/s ratio {}  {}",
            self.pages_per_s,
            fmt_ratio(self.ratio_to_ceiling),
            self.measured.summary("page")
        )
    }
}

/// A scenario's results.
pub(crate) struct Report {
    /// The results as a JSON object (its fields go after `"scenario"`).
    pub(crate) results: serde_json::Value,
    pub(crate) table: Vec<String>,
}

impl Report {
    /// A report of `results` (a struct that serializes to an object).
    pub(crate) fn new(results: impl Serialize, table: Vec<String>) -> anyhow::Result<Self> {
        Ok(Self { results: serde_json::to_value(results)?, table })
    }
}

/// Formats an optional ratio for the table.
pub(crate) fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"))
}

/// Receivers record into one of these per window, by receiver index, to
/// keep lock contention low.
const SHARDS: usize = 16;

/// Latencies recorded by many receivers (streams) in numbered measurement
/// windows (1, 2, ...), one open at a time; what arrives while none is
/// open is not recorded.
pub(crate) struct Windows {
    shards: Vec<Mutex<Histogram<u64>>>,
    /// The open window, 0 for none.
    open: AtomicUsize,
}

impl Windows {
    /// Room for `count` windows, none open.
    pub(crate) fn new(count: usize) -> std::sync::Arc<Self> {
        let shards = (0..count * SHARDS).map(|_| Mutex::new(load::histogram())).collect();
        std::sync::Arc::new(Self { shards, open: AtomicUsize::new(0) })
    }

    /// The open window, if any.
    pub(crate) fn current(&self) -> Option<usize> {
        Some(self.open.load(Ordering::Relaxed)).filter(|w| *w > 0)
    }

    /// Opens `window` (0 closes them all).
    pub(crate) fn set(&self, window: usize) {
        self.open.store(window, Ordering::Relaxed);
    }

    /// Opens `window` after `warmup`, and closes it `length` later, in a task.
    pub(crate) fn schedule(self: &std::sync::Arc<Self>, window: usize, warmup: Duration, length: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            this.set(window);
            tokio::time::sleep(length).await;
            this.set(0);
        });
    }

    /// The shard of `receiver` in `window`, locked (to record a batch).
    pub(crate) fn shard(&self, window: usize, receiver: usize) -> std::sync::MutexGuard<'_, Histogram<u64>> {
        self.shards[(window - 1) * SHARDS + receiver % SHARDS].lock().expect("no panics while locked")
    }

    /// Every receiver's latencies of `window`.
    pub(crate) fn merged(&self, window: usize) -> Histogram<u64> {
        let mut latency = load::histogram();
        for shard in &self.shards[(window - 1) * SHARDS..window * SHARDS] {
            latency.add(&*shard.lock().expect("no panics while locked")).expect("histograms share bounds");
        }
        latency
    }
}

/// Reads every stream in a task of its own until it ends, handing each
/// event to `on_event(stream index, event)`; a stream that fails counts in
/// `errors` and stops.
pub(crate) fn receive_all<F>(
    streams: Vec<tonic::Streaming<natter_proto::messages::v1::StreamEventsResponse>>,
    errors: std::sync::Arc<std::sync::atomic::AtomicU64>,
    on_event: F,
) -> tokio::task::JoinSet<()>
where
    F: Fn(usize, natter_proto::messages::v1::StreamEventsResponse) + Clone + Send + 'static,
{
    let mut receivers = tokio::task::JoinSet::new();
    for (j, mut stream) in streams.into_iter().enumerate() {
        let (errors, on_event) = (errors.clone(), on_event.clone());
        receivers.spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(event)) => on_event(j, event),
                    Ok(None) => break,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        });
    }
    receivers
}

/// A SendMessage call for a load loop: call `i` sends `"{tag} {i}"` to chat
/// `i % chats.len()` as user `chat % users` (the chat's owner when chat k
/// is owned by user k % users), over one of 16 connections.
pub(crate) fn send_call(
    f: &crate::client::Fixture,
    chats: &[String],
    tag: &'static str,
) -> impl Fn(usize) -> futures::future::BoxFuture<'static, Result<(), tonic::Status>> + Clone + Send + 'static {
    let (users, chats, clients) = (f.users.clone(), chats.to_vec(), (0..16).map(|i| f.messages(i)).collect::<Vec<_>>());
    move |i: usize| {
        let chat = i % chats.len();
        let request = users[chat % users.len()].request(natter_proto::messages::v1::SendMessageRequest {
            chat_id: chats[chat].clone(),
            text: format!("{tag} {i}"),
            ..Default::default()
        });
        let mut client = clients[i % clients.len()].clone();
        Box::pin(async move { client.send_message(request).await.map(drop) })
    }
}

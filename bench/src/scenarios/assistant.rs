//! `assistant`: G replies generated at once, each in a group chat of its
//! own with the assistant (prompt "@assistant ..."), streaming from a
//! scripted OpenAI-compatible server in this process at a fixed token rate
//! (`--assistant-token-interval`) to S live streams (S / G per chat). Every
//! token is the time the scripted server wrote it (µs since the epoch, then
//! `|`); a stream that receives a `message_delta` records now − that time
//! for each token in it. That latency covers the model server's HTTP
//! stream, the assistant's parsing, its coalescing of tokens into deltas
//! (GCRA: one per 50 ms per reply on average, two at most within 50 ms; a
//! token beyond that waits its turn),
//! the publish through the messages service and the bus, and the stream.
//! For the delivery alone (publish to client) see `fanout`: deltas take the
//! same bus and streams as messages.
//!
//! Three windows: the replies alone (token -> client latency, the server's
//! CPU per delta); then SendMessage in a closed loop of 16 callers over the
//! same chats (no mention: no reply) beside them, against the same loop
//! before the prompts (`send_beside_ratio`, with the token latency while
//! the sends take every core they can); then SendMessage in an open loop at
//! half the alone rate, beside them and before the prompts: the latency the
//! assistant costs everyone else when the server is not saturated.
//!
//! Needs `--spawn`: the spawned natter's assistant is pointed at the scripted
//! server (`--assistant-base-url`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use natter_proto::assistant::v1 as apb;
use natter_proto::assistant::v1::assistant_service_client::AssistantServiceClient;
use natter_proto::chats::v1 as cpb;
use natter_proto::chats::v1::chat_service_client::ChatServiceClient;
use natter_proto::messages::v1::SendMessageRequest;
use natter_proto::messages::v1::stream_events_response::Event;
use serde::Serialize;

use super::{CpuBudget, Ctx, Report, Windows};
use crate::client::{self, Fixture};
use crate::load::{self, Latency, Measured};

/// Callers of the send loops.
const SEND_CALLERS: usize = 16;

#[derive(Serialize)]
struct Results {
    generations: usize,
    streams: usize,
    token_interval_ms: f64,
    /// Deltas received by all streams in the window, and per second.
    deltas: u64,
    deltas_per_s: f64,
    tokens_received: u64,
    /// Provider emits a token -> a client holds it (coalescing included),
    /// in the window of the replies alone.
    token_to_client: Latency,
    /// The same while the closed send loop runs beside the replies.
    token_to_client_beside_sends: Latency,
    /// Server CPU time in the window of the replies alone per delta
    /// received by a stream (the generations' whole cost: model stream,
    /// parsing, checkpoints, publish, fan-out), and per token generated.
    server_cpu_us_per_delta: Option<f64>,
    server_cpu_us_per_token: Option<f64>,
    /// SendMessage at 16 callers with no reply being generated, then beside
    /// the generations.
    send_alone_per_s: f64,
    send_beside_per_s: f64,
    /// `send_beside_per_s / send_alone_per_s`.
    send_beside_ratio: f64,
    send_alone: Measured,
    send_beside: Measured,
    /// SendMessage in an open loop at half `send_alone_per_s`, before the
    /// prompts and beside the replies.
    half_rate_per_s: f64,
    half_rate_alone: Measured,
    half_rate_beside: Measured,
    /// The sends' CPU alone against the replies' alone (the tool's side:
    /// the scripted model's SSE streams and the streams receiving).
    cpu_budget: CpuBudget,
    stream_errors: u64,
}

/// The `assistant` scenario (see the module docs).
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Report> {
    if ctx.llm.is_none() {
        let skipped = serde_json::json!({ "skipped": "needs --spawn (the assistant is pointed at a scripted server)" });
        return Report::new(skipped, vec!["assistant skipped: needs --spawn".into()]);
    }
    let s = ctx.settings;
    let f = ctx.fixture;
    let (g, n) = (s.assistant_generations, s.assistant_streams.max(s.assistant_generations));
    let users = f.users.len();
    let bot = AssistantServiceClient::new(f.channel(0))
        .get_or_create_assistant_chat(f.users[0].request(apb::GetOrCreateAssistantChatRequest {}))
        .await
        .context("GetOrCreateAssistantChat (is the spawned natter's assistant on?)")?
        .into_inner()
        .assistant_user_id;
    // Chat i: owned by user i % users, with the assistant.
    let chats: Vec<String> =
        futures::stream::iter(0..g).map(|i| assistant_group(f, i % users, &bot, i)).buffered(16).try_collect().await?;

    let per_conn = s.event_streams_per_connection;
    let connections = client::connect(&s.target, n.div_ceil(per_conn)).await?;
    let streams: Vec<_> = futures::stream::iter(0..n)
        .map(|j| Fixture::open_stream(connections[j / per_conn].clone(), &f.users[(j % g) % users], &chats[j % g]))
        .buffer_unordered(64)
        .try_collect()
        .await?;
    // Window 1: the replies alone; 2: beside the closed send loop.
    let windows = Windows::new(2);
    let (deltas, tokens, stream_errors) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut receivers = {
        let (windows, deltas, tokens) = (windows.clone(), deltas.clone(), tokens.clone());
        super::receive_all(streams, stream_errors.clone(), move |j, event| {
            let Some(Event::MessageDelta(delta)) = event.event else { return };
            let Some(window) = windows.current() else { return };
            let now = load::now_micros();
            let mut shard = windows.shard(window, j);
            for stamp in delta.text.split('|').filter_map(|t| t.parse::<u64>().ok()) {
                load::record(&mut shard, Duration::from_micros(now.saturating_sub(stamp)));
                tokens.fetch_add(u64::from(window == 1), Ordering::Relaxed);
            }
            if window == 1 {
                deltas.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    // Sends alone, then the prompts, then sends beside the generations.
    let send = |tag| super::send_call(f, &chats, tag);
    let alone = load::closed_loop(SEND_CALLERS, s.warmup, s.duration, ctx.target.pid, send("alone")).await;
    let half_rate = (alone.per_sec() / 2.0).max(1.0);
    let half_alone = load::open_loop(half_rate, s.warmup, s.duration, ctx.target.pid, send("half alone")).await;
    futures::stream::iter(0..g)
        .map(|i| {
            let request = f.users[i % users].request(SendMessageRequest {
                chat_id: chats[i].clone(),
                text: "@assistant go".into(),
                ..Default::default()
            });
            let mut client = f.messages(i);
            async move { client.send_message(request).await }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .context("a prompt")?;
    // The replies alone, once every reply streams (the warm-up).
    tokio::time::sleep(s.warmup).await;
    let cpu_before = load::cpu_now(ctx.target.pid);
    windows.set(1);
    tokio::time::sleep(s.duration).await;
    windows.set(0);
    let (server_cpu, tool_cpu) = load::cpu_since(ctx.target.pid, cpu_before);
    let cores = |us: Option<u64>| us.map(|us| load::round3(us as f64 / 1e6 / s.duration.as_secs_f64()));
    let replies_cores = (cores(server_cpu), cores(tool_cpu));
    // Beside the closed send loop (its window: after its warm-up).
    windows.schedule(2, s.warmup, s.duration);
    let beside = load::closed_loop(SEND_CALLERS, s.warmup, s.duration, ctx.target.pid, send("beside")).await;
    let half_beside = load::open_loop(half_rate, s.warmup, s.duration, ctx.target.pid, send("half beside")).await;
    receivers.abort_all();
    drop(connections);

    let (latency, latency_beside) = (windows.merged(1), windows.merged(2));
    let (deltas, tokens) = (deltas.load(Ordering::Relaxed), tokens.load(Ordering::Relaxed));
    let server_cpu = server_cpu.map(|us| us as f64);
    let generated = (s.duration.as_secs_f64() / s.assistant_token_interval.as_secs_f64()) * g as f64;
    let per_s = |out: &load::Outcome| load::round3(out.per_sec());
    let results = Results {
        generations: g,
        streams: n,
        token_interval_ms: s.assistant_token_interval.as_secs_f64() * 1e3,
        deltas,
        deltas_per_s: load::round3(deltas as f64 / s.duration.as_secs_f64()),
        tokens_received: tokens,
        token_to_client: Latency::of(&latency),
        token_to_client_beside_sends: Latency::of(&latency_beside),
        server_cpu_us_per_delta: server_cpu.filter(|_| deltas > 0).map(|us| load::round3(us / deltas as f64)),
        server_cpu_us_per_token: server_cpu.filter(|_| generated > 0.0).map(|us| load::round3(us / generated)),
        send_alone_per_s: per_s(&alone),
        send_beside_per_s: per_s(&beside),
        send_beside_ratio: load::round3(beside.per_sec() / alone.per_sec().max(f64::MIN_POSITIVE)),
        send_alone: alone.measured(),
        send_beside: beside.measured(),
        half_rate_per_s: load::round3(half_rate),
        half_rate_alone: half_alone.measured(),
        half_rate_beside: half_beside.measured(),
        cpu_budget: CpuBudget::new(&alone, replies_cores),
        stream_errors: stream_errors.load(Ordering::Relaxed),
    };
    let table = vec![
        format!(
            "assistant {g} replies at a token every {:.0} ms to {n} streams: {deltas} deltas ({:.0}/s), token -> client p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms (coalescing included), server CPU µs/delta {}",
            results.token_interval_ms,
            results.deltas_per_s,
            results.token_to_client.p50_ms,
            results.token_to_client.p99_ms,
            results.token_to_client.max_ms,
            results.server_cpu_us_per_delta.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}")),
        ),
        format!(
            "assistant send c={SEND_CALLERS}: alone {:.0}/s, beside the replies {:.0}/s (ratio {:.3}; token -> client meanwhile p50 {:.3} ms  p99 {:.3} ms) | stream errors {}",
            results.send_alone_per_s,
            results.send_beside_per_s,
            results.send_beside_ratio,
            results.token_to_client_beside_sends.p50_ms,
            results.token_to_client_beside_sends.p99_ms,
            results.stream_errors
        ),
        format!(
            "assistant send open loop at {:.0}/s: alone {} | beside the replies {}",
            results.half_rate_per_s,
            results.half_rate_alone.summary("call"),
            results.half_rate_beside.summary("call")
        ),
        format!("assistant {}", results.cpu_budget.summary()),
    ];
    Report::new(results, table)
}

/// A group chat owned by user `owner` with the assistant `bot`.
async fn assistant_group(f: &Fixture, owner: usize, bot: &str, i: usize) -> anyhow::Result<String> {
    let request = cpb::CreateChatRequest {
        kind: cpb::ChatKind::Group as i32,
        title: format!("bench assistant {i} {}", f.run_id),
        member_ids: vec![bot.to_owned()],
        ..Default::default()
    };
    let chat = ChatServiceClient::new(f.channel(owner))
        .create_chat(f.users[owner].request(request))
        .await
        .context("CreateChat")?
        .into_inner();
    Ok(chat.chat.context("CreateChat returned no chat")?.id)
}

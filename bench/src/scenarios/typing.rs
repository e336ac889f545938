//! `typing`: N live StreamEvents streams on one group chat, SetTyping at a
//! fixed rate (`--typing-rate`, spread over 100 typists so each stays at a
//! person's pace), and SendMessage in a closed loop on other chats without
//! and with the typing running: what typing indicators cost everyone else.
//!
//! A typing event carries `until` = the server's time of the SetTyping call
//! (after its membership check) + the indicator's 5 s; a stream that
//! receives one records now − (until − 5 s). That latency covers the
//! publish, the bus and the stream, not the caller's leg to the server
//! (which `send` measures). Server and tool share this machine's clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use natter_proto::messages::v1::SetTypingRequest;
use natter_proto::messages::v1::stream_events_response::Event;
use serde::Serialize;

use super::{CpuBudget, Ctx, Report, Windows};
use crate::client::{self, Fixture};
use crate::load::{self, Latency, Measured};

/// Callers of the send loops.
const SEND_CALLERS: usize = 16;

/// Users taking turns at typing (each at rate / 100 per second).
const TYPISTS: usize = 100;

/// How long the server's typing indicator lasts (its `--typing-timeout`
/// default), µs.
const INDICATOR_US: u64 = 5_000_000;

#[derive(Serialize)]
struct Results {
    streams: usize,
    members: usize,
    typing_rate_per_s: f64,
    /// Typing events received by all streams in the window alone.
    deliveries: u64,
    deliveries_per_s: f64,
    /// Server accepts SetTyping -> a stream holds the event.
    delivery: Latency,
    /// The same while the closed send loop runs beside.
    delivery_beside_sends: Latency,
    /// Server CPU per typing event delivered, typing alone.
    server_cpu_us_per_delivery: Option<f64>,
    set_typing: Measured,
    /// SendMessage at 16 callers on chats without streams: with no typing,
    /// then beside it.
    send_alone_per_s: f64,
    send_beside_per_s: f64,
    /// `send_beside_per_s / send_alone_per_s`.
    send_beside_ratio: f64,
    send_alone: Measured,
    send_beside: Measured,
    /// The sends' CPU alone against the typing's alone.
    cpu_budget: CpuBudget,
    stream_errors: u64,
}

/// The `typing` scenario (see the module docs).
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Report> {
    let s = ctx.settings;
    let f = ctx.fixture;
    let members = f.users.len().min(1000);
    let typists = members.min(TYPISTS);
    let everyone: Vec<usize> = (0..members).collect();
    let chat = f.group_chat(0, &everyone, "bench typing").await?;
    // The send loop's chats: small groups with no streams on them.
    let send_chats: Vec<String> = futures::stream::iter(0..SEND_CALLERS)
        .map(|i| {
            let owner = i % f.users.len();
            async move { f.group_chat(owner, &[owner, (owner + 1) % f.users.len()], "bench typing sends").await }
        })
        .buffered(8)
        .try_collect()
        .await?;

    let n = s.typing_streams;
    let per_conn = s.event_streams_per_connection;
    let connections = client::connect(&s.target, n.div_ceil(per_conn)).await?;
    let streams: Vec<_> = futures::stream::iter(0..n)
        .map(|j| Fixture::open_stream(connections[j / per_conn].clone(), &f.users[j % members], &chat))
        .buffer_unordered(64)
        .try_collect()
        .await?;
    // Window 1: typing alone; 2: beside the closed send loop.
    let windows = Windows::new(2);
    let (delivered, stream_errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut receivers = {
        let (windows, delivered) = (windows.clone(), delivered.clone());
        super::receive_all(streams, stream_errors.clone(), move |j, event| {
            let Some(Event::Typing(typing)) = event.event else { return };
            let Some((window, until)) = windows.current().zip(typing.until) else { return };
            let until_us =
                u64::try_from(until.seconds).unwrap_or(0) * 1_000_000 + u64::try_from(until.nanos / 1000).unwrap_or(0);
            let latency = load::now_micros().saturating_sub(until_us.saturating_sub(INDICATOR_US));
            load::record(&mut windows.shard(window, j), Duration::from_micros(latency));
            if window == 1 {
                delivered.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let send = |tag| super::send_call(f, &send_chats, tag);
    let type_once = {
        let (users, chat, clients) =
            (f.users.clone(), chat.clone(), (0..typists).map(|i| f.messages(i)).collect::<Vec<_>>());
        move |k: usize| {
            let typist = k % typists;
            let request = users[typist].request(SetTypingRequest { chat_id: chat.clone(), typing: true });
            let mut client = clients[typist].clone();
            async move { client.set_typing(request).await.map(drop) }
        }
    };

    let alone = load::closed_loop(SEND_CALLERS, s.warmup, s.duration, ctx.target.pid, send("alone")).await;
    // Typing alone: the open loop's own window is the measured one.
    windows.schedule(1, s.warmup, s.duration);
    let typing = load::open_loop(s.typing_rate, s.warmup, s.duration, ctx.target.pid, type_once.clone()).await;
    // Typing beside the closed send loop, both over the same window.
    windows.schedule(2, s.warmup, s.duration);
    let typing_beside = tokio::spawn(load::open_loop(s.typing_rate, s.warmup, s.duration, None, type_once));
    let beside = load::closed_loop(SEND_CALLERS, s.warmup, s.duration, ctx.target.pid, send("beside")).await;
    typing_beside.await?;
    receivers.abort_all();
    drop(connections);

    let deliveries = delivered.load(Ordering::Relaxed);
    // Server CPU per delivery: the typing window's server CPU per SetTyping
    // call, over the streams each one reached.
    let per_call_deliveries = deliveries as f64 / typing.ok.max(1) as f64;
    let results = Results {
        streams: n,
        members,
        typing_rate_per_s: s.typing_rate,
        deliveries,
        deliveries_per_s: load::round3(deliveries as f64 / s.duration.as_secs_f64()),
        delivery: Latency::of(&windows.merged(1)),
        delivery_beside_sends: Latency::of(&windows.merged(2)),
        server_cpu_us_per_delivery: typing
            .cpu
            .server_cpu_us_per_call
            .filter(|_| per_call_deliveries > 0.0)
            .map(|us| load::round3(us / per_call_deliveries)),
        set_typing: typing.measured(),
        send_alone_per_s: load::round3(alone.per_sec()),
        send_beside_per_s: load::round3(beside.per_sec()),
        send_beside_ratio: load::round3(beside.per_sec() / alone.per_sec().max(f64::MIN_POSITIVE)),
        send_alone: alone.measured(),
        send_beside: beside.measured(),
        cpu_budget: CpuBudget::new(&alone, typing.cores()),
        stream_errors: stream_errors.load(Ordering::Relaxed),
    };
    let table = vec![
        format!(
            "typing   {n} streams ({members} members), SetTyping {:.0}/s by {typists} typists: {deliveries} deliveries ({:.0}/s), delivery p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms, server CPU µs/delivery {} | SetTyping {}",
            s.typing_rate,
            results.deliveries_per_s,
            results.delivery.p50_ms,
            results.delivery.p99_ms,
            results.delivery.max_ms,
            results.server_cpu_us_per_delivery.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}")),
            results.set_typing.summary("call"),
        ),
        format!(
            "typing   send c={SEND_CALLERS}: alone {:.0}/s, beside typing {:.0}/s (ratio {:.3}; delivery meanwhile p50 {:.3} ms  p99 {:.3} ms) | stream errors {}",
            results.send_alone_per_s,
            results.send_beside_per_s,
            results.send_beside_ratio,
            results.delivery_beside_sends.p50_ms,
            results.delivery_beside_sends.p99_ms,
            results.stream_errors
        ),
        format!("typing   {}", results.cpu_budget.summary()),
    ];
    Report::new(results, table)
}

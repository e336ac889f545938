//! `fanout`: N live StreamEvents streams on one group chat, a sender at a
//! fixed rate. Each message carries the client's wall-clock time taken just
//! before its SendMessage call; every stream that receives it records
//! now − that time, so a delivery's latency covers the send, the commit, the
//! bus and the stream. A group has at most 1,000 members, so with more
//! streams than users each user holds several streams. With
//! `--fanout-send-target` the sender sends through another replica, so
//! every delivery crosses the bus (bench/bus-traffic-per-replica.sh).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use hdrhistogram::Histogram;
use natter_proto::messages::v1::SendMessageRequest;
use natter_proto::messages::v1::stream_events_response::Event;
use serde::Serialize;

use super::{Ctx, Report, fmt_ratio};
use crate::client::{self, Fixture};
use crate::load::{self, CpuPerCall, Latency};

/// Receivers record into one of these, by stream index, to keep lock
/// contention low.
const SHARDS: usize = 16;

#[derive(Serialize)]
struct Results {
    streams: usize,
    stream_connections: usize,
    members: usize,
    streams_opened_per_s: f64,
    rate_per_s: f64,
    messages_sent: u64,
    deliveries_expected: u64,
    deliveries: u64,
    deliveries_per_s: f64,
    deliveries_ratio_to_ceiling: Option<f64>,
    delivery: Latency,
    /// CPU time of the server and of this tool (sender and receivers) over
    /// the measurement window, per delivery: a send's CPU divided by the
    /// streams it reaches.
    server_cpu_us_per_delivery: Option<f64>,
    client_cpu_us_per_delivery: Option<f64>,
    send: Latency,
    send_errors: u64,
    stream_errors: u64,
    first_error: Option<String>,
}

/// Opens the streams, sends for warm-up + duration, waits for the
/// deliveries (10 s at most), then closes everything.
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Report> {
    let s = ctx.settings;
    let f = ctx.fixture;
    let members = f.users.len().min(1000);
    let everyone: Vec<usize> = (0..members).collect();
    let chat = f.group_chat(0, &everyone, "bench fanout").await?;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();

    let n = s.fanout_streams;
    let per_conn = s.event_streams_per_connection;
    let connections = client::connect(&s.target, n.div_ceil(per_conn)).await?;
    let opened_at = Instant::now();
    let streams: Vec<_> = futures::stream::iter(0..n)
        .map(|j| Fixture::open_stream(connections[j / per_conn].clone(), &f.users[j % members], &chat))
        .buffer_unordered(64)
        .try_collect()
        .await?;
    let open_rate = n as f64 / opened_at.elapsed().as_secs_f64();

    let shards: Arc<Vec<Mutex<Histogram<u64>>>> =
        Arc::new((0..SHARDS).map(|_| Mutex::new(load::histogram())).collect());
    let delivered = Arc::new(AtomicU64::new(0));
    let stream_errors = Arc::new(AtomicU64::new(0));
    let prefix = format!("fanout {tag} ");
    let mut receivers = tokio::task::JoinSet::new();
    for (j, mut stream) in streams.into_iter().enumerate() {
        let (shards, delivered, stream_errors, prefix) =
            (shards.clone(), delivered.clone(), stream_errors.clone(), prefix.clone());
        receivers.spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(event)) => {
                        let Some(Event::MessageCreated(m)) = event.event else { continue };
                        // "fanout TAG m MICROS": m = measured, w = warm-up.
                        let Some(rest) = m.text.strip_prefix(&prefix) else { continue };
                        let Some(sent) = rest.strip_prefix("m ").and_then(|t| t.parse::<u64>().ok()) else { continue };
                        let latency = Duration::from_micros(load::now_micros().saturating_sub(sent));
                        load::record(&mut shards[j % SHARDS].lock().expect("no panics while locked"), latency);
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => break,
                    Err(_) => {
                        stream_errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        });
    }

    let sent = Arc::new(AtomicU64::new(0));
    let measure_from = Instant::now() + s.warmup;
    let sender = f.users[0].clone();
    let client = match &s.fanout_send_target {
        Some(url) => natter_proto::messages::v1::message_service_client::MessageServiceClient::new(
            client::connect(url, 1).await?.remove(0),
        ),
        None => f.messages(0),
    };
    let send = {
        let (chat, sent, prefix) = (chat.clone(), sent.clone(), prefix.clone());
        load::open_loop(s.fanout_rate, s.warmup, s.duration, ctx.target.pid, move |_| {
            let measured = Instant::now() >= measure_from;
            let text = format!("{prefix}{} {}", if measured { "m" } else { "w" }, load::now_micros());
            let request = sender.request(SendMessageRequest { chat_id: chat.clone(), text, ..Default::default() });
            let (mut client, sent) = (client.clone(), sent.clone());
            async move {
                client.send_message(request).await?;
                if measured {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        })
        .await
    };
    let messages_sent = sent.load(Ordering::Relaxed);
    let expected = messages_sent * n as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    receivers.abort_all();
    drop(connections);

    let mut delivery = load::histogram();
    for shard in shards.iter() {
        delivery.add(&*shard.lock().expect("no panics while locked")).expect("histograms share bounds");
    }
    let deliveries = delivered.load(Ordering::Relaxed);
    let per_s = deliveries as f64 / s.duration.as_secs_f64();
    let results = Results {
        streams: n,
        stream_connections: n.div_ceil(per_conn),
        members,
        streams_opened_per_s: load::round3(open_rate),
        rate_per_s: s.fanout_rate,
        messages_sent,
        deliveries_expected: expected,
        deliveries,
        deliveries_per_s: load::round3(per_s),
        deliveries_ratio_to_ceiling: ctx.ratio(per_s),
        delivery: Latency::of(&delivery),
        server_cpu_us_per_delivery: send.cpu.server_cpu_us_per_call.map(|us| load::round3(us / n as f64)),
        client_cpu_us_per_delivery: send.cpu.client_cpu_us_per_call.map(|us| load::round3(us / n as f64)),
        send: Latency::of(&send.latency),
        send_errors: send.errors,
        stream_errors: stream_errors.load(Ordering::Relaxed),
        first_error: send.first_error,
    };
    let table = vec![
        format!(
            "fanout   {n} streams ({} conns, {members} users, opened at {open_rate:.0}/s), {} msg/s for {:?}: sent {messages_sent}, delivered {deliveries}/{expected} ({per_s:.0}/s, ratio {})",
            results.stream_connections,
            s.fanout_rate,
            s.duration,
            fmt_ratio(results.deliveries_ratio_to_ceiling)
        ),
        format!(
            "fanout   delivery p50 {:.3} ms  p99 {:.3} ms  p999 {:.3} ms  max {:.3} ms  CPU µs/delivery (server / client) {} | send p50 {:.3} ms  p99 {:.3} ms | errors: send {}, stream {}",
            results.delivery.p50_ms,
            results.delivery.p99_ms,
            results.delivery.p999_ms,
            results.delivery.max_ms,
            CpuPerCall {
                server_cpu_us_per_call: results.server_cpu_us_per_delivery,
                client_cpu_us_per_call: results.client_cpu_us_per_delivery
            }
            .cell(),
            results.send.p50_ms,
            results.send.p99_ms,
            results.send_errors,
            results.stream_errors
        ),
    ];
    Report::new(results, table)
}

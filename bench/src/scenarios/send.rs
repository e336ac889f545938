//! `send`: SendMessage in closed loops of 1, 16, 64, 256 callers, once
//! spread over many chats (one per user, so sends of different chats can
//! proceed together) and once on one hot chat (every send serializes on the
//! chat's seq), then an open loop at half the concurrency-64 throughput for
//! the latency a lightly loaded server gives ("p99 at half rate"). Before
//! each closed loop it measures Check at the same concurrency on the same
//! connections: the ceiling at that concurrency.

use std::sync::Arc;

use natter_proto::messages::v1::SendMessageRequest;
use serde::Serialize;

use super::{Ctx, Report, ceiling, fmt_ratio};
use crate::client::User;
use crate::load::{self, Measured, Outcome};
use crate::server_latency::{self, ServerLatency, ServerWindow, WriterShares};

#[derive(Serialize)]
struct ClosedRun {
    spread: &'static str,
    chats: usize,
    concurrency: usize,
    messages_per_s: f64,
    /// Over the run's ceiling (Check at `connections x
    /// streams_per_connection` in flight, measured first).
    ratio_to_ceiling: Option<f64>,
    /// Check calls per second at this loop's concurrency on the same
    /// connections, measured just before it: the ceiling at the same
    /// concurrency, i.e. the most calls per second this many callers, each
    /// waiting for its reply, get from the server for the cheapest RPC; 0
    /// with `--send-skip-ceiling-at-concurrency`.
    ceiling_at_concurrency_per_s: f64,
    /// `messages_per_s` over `ceiling_at_concurrency_per_s`.
    ratio_to_ceiling_at_concurrency: Option<f64>,
    #[serde(flatten)]
    measured: Measured,
    /// The server's own histogram over the window (with `--server-metrics`
    /// or `--spawn`).
    server_latency: Option<ServerLatency>,
    /// Where the server's message writer spent the window (likewise).
    writer: Option<WriterShares>,
}

#[derive(Serialize)]
struct HalfRate {
    spread: &'static str,
    /// The closed-loop concurrency whose throughput was halved.
    of_concurrency: usize,
    target_per_s: f64,
    achieved_per_s: f64,
    ratio_to_ceiling: Option<f64>,
    #[serde(flatten)]
    measured: Measured,
    /// The server's own histogram over the window (with `--server-metrics`
    /// or `--spawn`).
    server_latency: Option<ServerLatency>,
    /// Where the server's message writer spent the window (likewise).
    writer: Option<WriterShares>,
}

#[derive(Serialize)]
struct Results {
    ceiling_per_s: Option<f64>,
    closed_loop: Vec<ClosedRun>,
    half_rate: Vec<HalfRate>,
}

/// Who sends where: caller i is user i % users on connection i % connections.
struct Plan {
    users: Vec<User>,
    /// The chat of each user.
    chat_of_user: Vec<String>,
    clients: Vec<natter_proto::messages::v1::message_service_client::MessageServiceClient<tonic::transport::Channel>>,
}

impl Plan {
    fn call(self: &Arc<Self>, i: usize) -> impl Future<Output = Result<(), tonic::Status>> + Send + 'static + use<> {
        let user = &self.users[i % self.users.len()];
        let request = user.request(SendMessageRequest {
            chat_id: self.chat_of_user[i % self.users.len()].clone(),
            text: "benchmark message".to_owned(),
            ..Default::default()
        });
        let mut client = self.clients[i % self.clients.len()].clone();
        async move { client.send_message(request).await.map(drop) }
    }
}

/// Runs every closed loop and the half-rate open loops.
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Report> {
    let s = ctx.settings;
    let f = ctx.fixture;
    let n = f.users.len();
    // Chat i: owned by user i, with user i+1 (a group with a title).
    let many = futures::future::try_join_all((0..n).map(|i| async move {
        let other = [(i + 1) % n];
        f.group_chat(i, &other, "bench send").await
    }))
    .await?;
    let everyone: Vec<usize> = (0..n).collect();
    let hot = f.group_chat(0, &everyone, "bench hot").await?;
    let clients: Vec<_> = (0..s.connections).map(|i| f.messages(i)).collect();
    let spreads = [
        ("many_chats", n, Arc::new(Plan { users: f.users.clone(), chat_of_user: many, clients: clients.clone() })),
        ("hot_chat", 1, Arc::new(Plan { users: f.users.clone(), chat_of_user: vec![hot; n], clients })),
    ];

    let mut closed = Vec::new();
    let mut half = Vec::new();
    let mut table = vec![format!(
        "send     {:<10} {:>5} {:>6} {:>12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>13} {:>7}",
        "spread",
        "chats",
        "conc",
        "msgs/s",
        "ratio",
        "ratio@c",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "CPU µs s / c",
        "errors"
    )];
    for (spread, chats, plan) in &spreads {
        let mut base: Option<(usize, f64)> = None;
        for &concurrency in &s.send_concurrency {
            let check = if s.send_skip_ceiling_at_concurrency {
                0.0
            } else {
                ceiling::check_loop(ctx, concurrency).await.per_sec()
            };
            let plan = plan.clone();
            let from = std::time::Instant::now() + s.warmup;
            let server = server_latency::window(ctx.target.metrics.clone(), "SendMessage", from, from + s.duration);
            let out = load::closed_loop(concurrency, s.warmup, s.duration, ctx.target.pid, move |i| plan.call(i)).await;
            if concurrency <= 64 || base.is_none() {
                base = Some((concurrency, out.per_sec()));
            }
            let run = closed_run(ctx, spread, *chats, concurrency, check, out, server.await.ok().flatten());
            table.push(format!(
                "send     {:<10} {:>5} {:>6} {:>12.0} {:>8} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>13} {:>7}{}",
                spread,
                chats,
                concurrency,
                run.messages_per_s,
                fmt_ratio(run.ratio_to_ceiling),
                fmt_ratio(run.ratio_to_ceiling_at_concurrency),
                run.measured.latency.p50_ms,
                run.measured.latency.p99_ms,
                run.measured.latency.p999_ms,
                run.measured.cpu.cell(),
                run.measured.errors,
                run.writer.as_ref().map(|w| format!("  {}", w.summary())).unwrap_or_default()
            ));
            closed.push(run);
        }
        if let Some((of_concurrency, rate)) = base.filter(|(_, r)| *r > 0.0) {
            let target = rate / 2.0;
            let plan = plan.clone();
            let from = std::time::Instant::now() + s.warmup;
            let server = server_latency::window(ctx.target.metrics.clone(), "SendMessage", from, from + s.duration);
            let out = load::open_loop(target, s.warmup, s.duration, ctx.target.pid, move |k| plan.call(k)).await;
            let measured = out.measured();
            let (server_latency, writer) = split(server.await.ok().flatten());
            table.push(format!(
                "send     {spread:<10} {chats:>5}  open loop at half the conc-{of_concurrency} rate, {target:.0}/s: achieved {:.0}/s  {}{}{}",
                out.per_sec(),
                measured.summary("call"),
                server_latency.as_ref().map(|l| format!("  ({})", l.summary())).unwrap_or_default(),
                writer.as_ref().map(|w| format!("  {}", w.summary())).unwrap_or_default()
            ));
            half.push(HalfRate {
                spread,
                of_concurrency,
                target_per_s: load::round3(target),
                achieved_per_s: load::round3(out.per_sec()),
                ratio_to_ceiling: ctx.ratio(out.per_sec()),
                measured,
                server_latency,
                writer,
            });
        }
    }
    Report::new(Results { ceiling_per_s: ctx.ceiling.map(load::round3), closed_loop: closed, half_rate: half }, table)
}

fn closed_run(
    ctx: &Ctx<'_>,
    spread: &'static str,
    chats: usize,
    concurrency: usize,
    check_per_s: f64,
    out: Outcome,
    server: Option<ServerWindow>,
) -> ClosedRun {
    let (server_latency, writer) = split(server);
    ClosedRun {
        spread,
        chats,
        concurrency,
        messages_per_s: load::round3(out.per_sec()),
        ratio_to_ceiling: ctx.ratio(out.per_sec()),
        ceiling_at_concurrency_per_s: load::round3(check_per_s),
        ratio_to_ceiling_at_concurrency: (check_per_s > 0.0).then(|| load::round4(out.per_sec() / check_per_s)),
        measured: out.measured(),
        server_latency,
        writer,
    }
}

/// The server's view of a window as the report's two fields.
fn split(server: Option<ServerWindow>) -> (Option<ServerLatency>, Option<WriterShares>) {
    server.map_or((None, None), |w| (Some(w.latency), w.writer))
}

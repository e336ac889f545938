//! `ceiling`: grpc.health.v1 Check at the same connection count and
//! concurrency the other scenarios use: the most unary calls per second this
//! machine manages through the whole stack (TCP, HTTP/2, tonic, natter's
//! layer stack) with no service work behind them.

use std::sync::Arc;

use serde::Serialize;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::{Ctx, Report};
use crate::load::{self, Latency};

#[derive(Serialize)]
struct Results {
    connections: usize,
    concurrency: usize,
    calls_per_s: f64,
    #[serde(flatten)]
    latency: Latency,
    errors: u64,
    first_error: Option<String>,
}

/// Measures the Check rate; returns the report and calls per second.
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<(Report, f64)> {
    let s = ctx.settings;
    let clients: Arc<Vec<_>> = Arc::new(ctx.fixture.channels.iter().cloned().map(HealthClient::new).collect());
    let concurrency = s.unary_concurrency();
    let out = load::closed_loop(concurrency, s.warmup, s.duration, move |i| {
        let mut client = clients[i % clients.len()].clone();
        async move { client.check(HealthCheckRequest { service: String::new() }).await.map(drop) }
    })
    .await;
    let rate = out.per_sec();
    let results = Results {
        connections: s.connections,
        concurrency,
        calls_per_s: load::round3(rate),
        latency: Latency::of(&out.latency),
        errors: out.errors,
        first_error: out.first_error,
    };
    let table = vec![format!(
        "ceiling  health Check  {} conns x {} = {concurrency} in flight: {rate:.0} calls/s  p50 {:.3} ms  p99 {:.3} ms  p999 {:.3} ms  errors {}",
        s.connections,
        s.streams_per_connection,
        results.latency.p50_ms,
        results.latency.p99_ms,
        results.latency.p999_ms,
        results.errors
    )];
    Ok((Report::new(results, table)?, rate))
}

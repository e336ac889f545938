//! `ceiling`: grpc.health.v1 Check at the same connection count and
//! concurrency the other scenarios use: the most unary calls per second this
//! machine manages through the whole stack (TCP, HTTP/2, tonic, natter's
//! layer stack) with no service work behind them.

use std::sync::Arc;

use serde::Serialize;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::{Ctx, Report};
use crate::load::{self, Measured, Outcome};

/// When the ceiling is measured: first, or again after every other scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum At {
    Start,
    End,
}

#[derive(Serialize)]
struct Results {
    /// `start` (the figure the ratios use) or `end`.
    at: At,
    /// At the end: this rate over the start's, minus one (how much the
    /// machine's speed moved while the run went on).
    #[serde(skip_serializing_if = "Option::is_none")]
    drift_from_start: Option<f64>,
    connections: usize,
    concurrency: usize,
    calls_per_s: f64,
    #[serde(flatten)]
    measured: Measured,
}

/// A closed loop of `concurrency` Check callers over the fixture's
/// connections (caller i on connection i % connections, as `send` spreads
/// its callers), for the settings' warm-up and window.
pub(crate) async fn check_loop(ctx: &Ctx<'_>, concurrency: usize) -> Outcome {
    let s = ctx.settings;
    let clients: Arc<Vec<_>> = Arc::new(ctx.fixture.channels.iter().cloned().map(HealthClient::new).collect());
    load::closed_loop(concurrency, s.warmup, s.duration, ctx.target.pid, move |i| {
        let mut client = clients[i % clients.len()].clone();
        async move { client.check(HealthCheckRequest { service: String::new() }).await.map(drop) }
    })
    .await
}

/// Measures the Check rate; returns the report and calls per second. `at`
/// End compares the rate with the start's (`ctx.ceiling`).
pub(crate) async fn run(ctx: &Ctx<'_>, at: At) -> anyhow::Result<(Report, f64)> {
    let s = ctx.settings;
    let concurrency = s.unary_concurrency();
    let out = check_loop(ctx, concurrency).await;
    let rate = out.per_sec();
    let drift = match at {
        At::End => ctx.ceiling.filter(|c| *c > 0.0).map(|c| load::round3(rate / c - 1.0)),
        At::Start => None,
    };
    let results = Results {
        at,
        drift_from_start: drift,
        connections: s.connections,
        concurrency,
        calls_per_s: load::round3(rate),
        measured: out.measured(),
    };
    let label = match (at, drift) {
        (At::Start, _) => String::new(),
        (At::End, Some(d)) => format!(" at the end ({:+.0}% from the start)", d * 100.0),
        (At::End, None) => " at the end".to_owned(),
    };
    let table = vec![format!(
        "ceiling{label}  health Check  {} conns x {} = {concurrency} in flight: {rate:.0} calls/s  {}",
        s.connections,
        s.streams_per_connection,
        results.measured.summary("call (server / client)")
    )];
    Ok((Report::new(results, table)?, rate))
}

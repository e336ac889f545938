//! `streams`: the server's memory per idle StreamEvents stream. Reads the
//! server's resident set size (VmRSS) before any stream, opens streams up
//! to each configured count (on a quiet chat, over connections of
//! `event_streams_per_connection` streams each), lets the server settle and
//! reads it again: bytes per stream = (RSS with streams − RSS before) /
//! streams. RSS is what the kernel sees, so allocator caching counts too.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;

use super::{Ctx, Report};
use crate::client::{self, Fixture};
use crate::load;
use crate::server::rss_bytes;

#[derive(Serialize)]
struct Step {
    streams: usize,
    connections: usize,
    opened_per_s: f64,
    rss_bytes: u64,
    bytes_per_stream: f64,
    /// (RSS − RSS of the previous step) / streams added: the marginal cost,
    /// less blurred by memory the server had freed but still held before.
    marginal_bytes_per_stream: f64,
}

#[derive(Serialize)]
struct Results {
    server_pid: u32,
    rss_before_bytes: u64,
    steps: Vec<Step>,
    /// RSS once every stream is closed again (memory the server kept).
    rss_after_close_bytes: u64,
}

/// Opens the streams step by step, reading the server's RSS after each.
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Report> {
    let s = ctx.settings;
    let f = ctx.fixture;
    let pid = ctx.target.pid.context(
        "streams needs the server's pid: pass --server-pid (not found from the target's port), or use --spawn",
    )?;
    let members = f.users.len().min(1000);
    let everyone: Vec<usize> = (0..members).collect();
    let chat = f.group_chat(0, &everyone, "bench idle").await?;
    let settle = if s.smoke { Duration::from_millis(200) } else { Duration::from_secs(2) };

    tokio::time::sleep(settle).await;
    let before = rss_bytes(pid)?;
    let per_conn = s.event_streams_per_connection;
    let mut held = Vec::new();
    let mut connections = Vec::new();
    let mut steps = Vec::new();
    let mut previous = (0usize, before);
    let mut table = vec![format!("streams  server pid {pid}: RSS before {:.1} MiB", mib(before))];
    for &target in &s.idle_streams {
        let extra = target.saturating_sub(held.len());
        let fresh = client::connect(&s.target, extra.div_ceil(per_conn)).await?;
        let opened_at = Instant::now();
        let offset = held.len();
        let new: Vec<_> = futures::stream::iter(0..extra)
            .map(|j| Fixture::open_stream(fresh[j / per_conn].clone(), &f.users[(offset + j) % members], &chat))
            .buffer_unordered(128)
            .try_collect()
            .await?;
        let open_rate = extra as f64 / opened_at.elapsed().as_secs_f64();
        held.extend(new);
        connections.extend(fresh);
        tokio::time::sleep(settle).await;
        let rss = rss_bytes(pid)?;
        let per_stream = (rss as f64 - before as f64) / held.len() as f64;
        let marginal = (rss as f64 - previous.1 as f64) / (held.len() - previous.0).max(1) as f64;
        previous = (held.len(), rss);
        table.push(format!(
            "streams  {:>6} idle streams on {} conns (opened at {open_rate:.0}/s): RSS {:.1} MiB, {per_stream:.0} bytes/stream ({marginal:.0} marginal)",
            held.len(),
            connections.len(),
            mib(rss)
        ));
        steps.push(Step {
            streams: held.len(),
            connections: connections.len(),
            opened_per_s: load::round3(open_rate),
            rss_bytes: rss,
            bytes_per_stream: per_stream.round(),
            marginal_bytes_per_stream: marginal.round(),
        });
    }
    drop(held);
    drop(connections);
    tokio::time::sleep(settle).await;
    let after = rss_bytes(pid)?;
    table.push(format!("streams  all closed: RSS {:.1} MiB", mib(after)));
    Report::new(Results { server_pid: pid, rss_before_bytes: before, steps, rss_after_close_bytes: after }, table)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

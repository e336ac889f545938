//! The server's own view of a loop: natter's `natter_rpc_duration_seconds`
//! histogram (time from a request's arrival to its final status) and its
//! message writer's time by phase (`natter_writer_seconds_total`,
//! `natter_store_batch_size`), read from its Prometheus endpoint at the
//! start and the end of the measurement window.
//!
//! The tool's latencies are measured in the client, which shares the two
//! cores with the server: a call whose response sits in the client's socket
//! while the client's threads wait for a core counts as server latency
//! there. The histogram leaves that out, at the resolution of its buckets
//! (0.5, 1, 2.5, 5, 10, 25 ms, ...).

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Buckets of one method's `natter_rpc_duration_seconds`: (upper bound in
/// seconds, cumulative count), ascending, `+Inf` last.
type Buckets = Vec<(f64, f64)>;

/// What the server's histogram says about the calls of one window.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ServerLatency {
    /// Calls of the method that finished in the window.
    pub(crate) calls: u64,
    /// Share of them that took more than 5 ms in the server (0..1).
    pub(crate) share_over_5ms: f64,
    /// The smallest bucket bound at or below which 99% finished, in ms
    /// (the server-side p99 is at most this).
    pub(crate) p99_at_most_ms: Option<f64>,
}

impl ServerLatency {
    /// `server: p99 <= .. ms, .. % over 5 ms`, for a table line.
    pub(crate) fn summary(&self) -> String {
        let p99 = self.p99_at_most_ms.map_or_else(|| "?".to_owned(), |ms| format!("{ms}"));
        format!("server-side: p99 <= {p99} ms, {:.2}% over 5 ms", self.share_over_5ms * 100.0)
    }
}

/// Where the message writer's wall-clock time went in one window.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct WriterShares {
    /// Share of the window (0..1) in each phase of `natter_writer_seconds_total`
    /// (`idle`, `commit`, `activity`, `answer`; servers before the store
    /// rework of issue 17 also had `turn` and `statements`); they add up to ~1.
    pub(crate) phases: BTreeMap<String, f64>,
    /// Messages per committed batch, on average (`natter_store_batch_size`).
    pub(crate) mean_batch: Option<f64>,
}

impl WriterShares {
    /// `writer: idle 31%, commit 47%, ..., batch 16.3`, for a table line
    /// (phases that round to 0% left out).
    pub(crate) fn summary(&self) -> String {
        let mut parts: Vec<String> = ["idle", "turn", "statements", "commit", "activity", "answer"]
            .iter()
            .filter_map(|phase| {
                let share = *self.phases.get(*phase)?;
                let percent = (share * 100.0).round();
                (percent >= 1.0).then(|| format!("{phase} {percent}%"))
            })
            .collect();
        if let Some(batch) = self.mean_batch {
            parts.push(format!("batch {batch:.1}"));
        }
        format!("writer: {}", parts.join(", "))
    }
}

/// What the server's metrics say about one window.
#[derive(Clone, Debug)]
pub(crate) struct ServerWindow {
    pub(crate) latency: ServerLatency,
    /// None when the server exports no writer metrics (a process without
    /// the messages service, or an older natter).
    pub(crate) writer: Option<WriterShares>,
}

/// Reads the server's metrics at `from` and at `until` from the Prometheus
/// endpoint at `addr` (`host:port`), and compares: `method`'s latency
/// histogram and the writer's phases. None without an endpoint, or when a
/// read fails (the failure is printed).
pub(crate) fn window(
    addr: Option<String>,
    method: &'static str,
    from: Instant,
    until: Instant,
) -> tokio::task::JoinHandle<Option<ServerWindow>> {
    tokio::spawn(async move {
        let addr = addr?;
        tokio::time::sleep_until(from.into()).await;
        let start = scrape(&addr).await.map(|text| (Instant::now(), text));
        tokio::time::sleep_until(until.into()).await;
        let end = scrape(&addr).await.map(|text| (Instant::now(), text));
        match (start, end) {
            (Ok((t0, start)), Ok((t1, end))) => Some(ServerWindow {
                latency: compare(&parse(&start, method), &parse(&end, method)),
                writer: writer_shares(&start, &end, (t1 - t0).as_secs_f64()),
            }),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("natter-bench: cannot read the server's metrics at {addr}: {e}");
                None
            }
        }
    })
}

/// One GET of `/metrics` (HTTP/1.0, so the server closes when done): the
/// response, headers and all.
async fn scrape(addr: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: natter\r\n\r\n").await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

/// The samples of a Prometheus text exposition whose series name (labels
/// included) starts with `prefix`: (the rest of the series, value).
fn samples<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let (series, value) = line.strip_prefix(prefix)?.rsplit_once(' ')?;
        Some((series, value.trim().parse().ok()?))
    })
}

/// The writer's shares of `seconds` of wall-clock time between two readings.
fn writer_shares(start: &str, end: &str, seconds: f64) -> Option<WriterShares> {
    let phases = |text| -> BTreeMap<String, f64> {
        samples(text, "natter_writer_seconds_total{phase=\"")
            .filter_map(|(rest, value)| Some((rest.split_once('"')?.0.to_owned(), value)))
            .collect()
    };
    let (before, after) = (phases(start), phases(end));
    if after.is_empty() || seconds <= 0.0 {
        return None;
    }
    let phases = after
        .iter()
        .map(|(phase, value)| {
            (phase.clone(), crate::load::round3((value - before.get(phase).unwrap_or(&0.0)) / seconds))
        })
        .collect();
    let total = |text, name| samples(text, name).map(|(_, v)| v).sum::<f64>();
    let messages = total(end, "natter_store_batch_size_sum") - total(start, "natter_store_batch_size_sum");
    let batches = total(end, "natter_store_batch_size_count") - total(start, "natter_store_batch_size_count");
    let mean_batch = (batches > 0.0).then(|| crate::load::round3(messages / batches));
    Some(WriterShares { phases, mean_batch })
}

/// The buckets of `method` in a Prometheus text exposition, summed over
/// every series of that method.
fn parse(text: &str, method: &str) -> Buckets {
    let label = format!("method=\"{method}\"");
    let mut buckets: Buckets = Vec::new();
    for (labels, count) in samples(text, "natter_rpc_duration_seconds_bucket{") {
        let labels = labels.trim_end_matches('}');
        if !labels.split(',').any(|l| l == label) {
            continue;
        }
        let Some(le) = labels.split(',').find_map(|l| l.strip_prefix("le=\"")?.strip_suffix('"')) else { continue };
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
        match buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, total)) => *total += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The calls between two readings of the same histogram.
fn compare(start: &Buckets, end: &Buckets) -> ServerLatency {
    let before = |le: f64| start.iter().find(|(bound, _)| *bound == le).map_or(0.0, |(_, n)| *n);
    let delta: Vec<(f64, f64)> = end.iter().map(|&(le, n)| (le, n - before(le))).collect();
    let calls = delta.last().map_or(0.0, |(_, n)| *n);
    let within_5ms = delta.iter().find(|(le, _)| *le == 0.005).map_or(0.0, |(_, n)| *n);
    let p99 = delta.iter().find(|(_, n)| calls > 0.0 && *n >= 0.99 * calls).map(|(le, _)| *le * 1000.0);
    ServerLatency {
        calls: calls as u64,
        share_over_5ms: if calls > 0.0 { crate::load::round3((calls - within_5ms) / calls) } else { 0.0 },
        p99_at_most_ms: p99.filter(|ms| ms.is_finite()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "\
# TYPE natter_rpc_duration_seconds histogram
natter_rpc_duration_seconds_bucket{method=\"SendMessage\",service=\"natter.messages.v1.MessageService\",le=\"0.0025\"} 10
natter_rpc_duration_seconds_bucket{method=\"SendMessage\",service=\"natter.messages.v1.MessageService\",le=\"0.005\"} 10
natter_rpc_duration_seconds_bucket{method=\"SendMessage\",service=\"natter.messages.v1.MessageService\",le=\"0.01\"} 10
natter_rpc_duration_seconds_bucket{method=\"SendMessage\",service=\"natter.messages.v1.MessageService\",le=\"+Inf\"} 10
natter_rpc_duration_seconds_bucket{method=\"Check\",service=\"grpc.health.v1.Health\",le=\"+Inf\"} 99
";

    #[test]
    fn a_window_counts_only_its_own_calls_of_the_method() {
        // 1,000 more sends: 985 within 2.5 ms, 990 within 5 ms, all within 10 ms.
        let after = BEFORE
            .replace("le=\"0.0025\"} 10", "le=\"0.0025\"} 995")
            .replace("le=\"0.005\"} 10", "le=\"0.005\"} 1000")
            .replace("le=\"0.01\"} 10", "le=\"0.01\"} 1010")
            .replace("le=\"+Inf\"} 10", "le=\"+Inf\"} 1010");
        let seen = compare(&parse(BEFORE, "SendMessage"), &parse(&after, "SendMessage"));
        assert_eq!(seen.calls, 1000);
        assert_eq!(seen.share_over_5ms, 0.01);
        assert_eq!(seen.p99_at_most_ms, Some(5.0));
        assert!(parse(BEFORE, "GetMessage").is_empty());
    }

    #[test]
    fn writer_shares_are_the_phases_growth_over_the_window() {
        let reading = |idle: f64, commit: f64, sum: f64, count: f64| {
            format!(
                "natter_writer_seconds_total{{phase=\"idle\"}} {idle}\n\
                 natter_writer_seconds_total{{phase=\"commit\"}} {commit}\n\
                 natter_store_batch_size_sum {sum}\nnatter_store_batch_size_count {count}\n"
            )
        };
        // Over 2 s: 0.5 s more idle, 1.5 s more committing, 300 messages in 20 batches.
        let shares = writer_shares(&reading(10.0, 4.0, 100.0, 10.0), &reading(10.5, 5.5, 400.0, 30.0), 2.0).unwrap();
        assert_eq!(shares.phases["idle"], 0.25);
        assert_eq!(shares.phases["commit"], 0.75);
        assert_eq!(shares.mean_batch, Some(15.0));
        assert_eq!(shares.summary(), "writer: idle 25%, commit 75%, batch 15.0");
        let mut tiny = shares.clone();
        // Shares are rounded to 0.001: 0.005 shows as 1%, 0.004 not at all.
        tiny.phases.insert("activity".into(), 0.005);
        tiny.phases.insert("answer".into(), 0.004);
        assert_eq!(tiny.summary(), "writer: idle 25%, commit 75%, activity 1%, batch 15.0");
        assert!(writer_shares(BEFORE, BEFORE, 2.0).is_none(), "no writer metrics, no shares");
    }
}

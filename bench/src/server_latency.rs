//! The server's own view of a loop's latency: natter's
//! `natter_rpc_duration_seconds` histogram (time from a request's arrival to
//! its final status), read from its Prometheus endpoint at the start and the
//! end of the measurement window.
//!
//! The tool's latencies are measured in the client, which shares the two
//! cores with the server: a call whose response sits in the client's socket
//! while the client's threads wait for a core counts as server latency
//! there. The histogram leaves that out, at the resolution of its buckets
//! (0.5, 1, 2.5, 5, 10, 25 ms, ...).

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

/// Reads the histogram of `method` at `from` and at `until` from the
/// Prometheus endpoint at `addr` (`host:port`), and compares. None without
/// an endpoint, or when a read fails (the failure is printed).
pub(crate) fn window(
    addr: Option<String>,
    method: &'static str,
    from: Instant,
    until: Instant,
) -> tokio::task::JoinHandle<Option<ServerLatency>> {
    tokio::spawn(async move {
        let addr = addr?;
        tokio::time::sleep_until(from.into()).await;
        let start = scrape(&addr, method).await;
        tokio::time::sleep_until(until.into()).await;
        let end = scrape(&addr, method).await;
        match (start, end) {
            (Ok(start), Ok(end)) => Some(compare(&start, &end)),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("natter-bench: cannot read the server's metrics at {addr}: {e}");
                None
            }
        }
    })
}

/// One GET of `/metrics` (HTTP/1.0, so the server closes when done).
async fn scrape(addr: &str, method: &str) -> std::io::Result<Buckets> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: natter\r\n\r\n").await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(parse(&body, method))
}

/// The buckets of `method` in a Prometheus text exposition, summed over
/// every series of that method.
fn parse(text: &str, method: &str) -> Buckets {
    let label = format!("method=\"{method}\"");
    let mut buckets: Buckets = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("natter_rpc_duration_seconds_bucket{") else { continue };
        let Some((labels, count)) = rest.split_once("} ") else { continue };
        if !labels.split(',').any(|l| l == label) {
            continue;
        }
        let le = labels.split(',').find_map(|l| l.strip_prefix("le=\"")?.strip_suffix('"'));
        let (Some(le), Ok(count)) = (le, count.trim().parse::<f64>()) else { continue };
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
}

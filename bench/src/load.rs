//! Load generators and latency bookkeeping. A closed loop keeps N callers
//! busy (throughput at a concurrency); an open loop starts calls on a fixed
//! schedule and measures each from its scheduled start, so a slow server
//! cannot hide its queueing (no coordinated omission). Latencies are HDR
//! histograms in microseconds, 3 significant digits.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// A fresh latency histogram: 1 µs to 10 min, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

/// Records a duration in microseconds (saturating at the histogram's top).
pub(crate) fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
}

/// Latency quantiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct Latency {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
}

impl Latency {
    /// Quantiles of a histogram in microseconds.
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        let ms = |q: f64| round3(h.value_at_quantile(q) as f64 / 1000.0);
        if h.is_empty() {
            return Self::default();
        }
        Self { p50_ms: ms(0.5), p99_ms: ms(0.99), p999_ms: ms(0.999), max_ms: round3(h.max() as f64 / 1000.0) }
    }
}

/// Rounds to four decimals (ratios).
pub(crate) fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Rounds to three decimals (keeps the JSON readable).
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// CPU time spent per successful call inside the measurement window, in
/// microseconds (utime + stime from /proc, 10 ms resolution): the server's
/// (when its pid is known) and this tool's own. Steadier than rates on a
/// noisy machine, and it says which side a change made cheaper.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct CpuPerCall {
    pub(crate) server_cpu_us_per_call: Option<f64>,
    pub(crate) client_cpu_us_per_call: Option<f64>,
}

impl CpuPerCall {
    /// `server / client µs per call` for a table cell.
    pub(crate) fn cell(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        format!("{} / {}", f(self.server_cpu_us_per_call), f(self.client_cpu_us_per_call))
    }
}

/// CPU time of the server (`pid`) and of this process so far, µs.
pub(crate) fn cpu_now(pid: Option<u32>) -> (Option<u64>, Option<u64>) {
    (pid.and_then(crate::server::cpu_micros), crate::server::cpu_micros(std::process::id()))
}

/// CPU time the server (`pid`) and this process each spent since `start`
/// (what [`cpu_now`] said then), µs.
pub(crate) fn cpu_since(pid: Option<u32>, start: (Option<u64>, Option<u64>)) -> (Option<u64>, Option<u64>) {
    let end = cpu_now(pid);
    let delta = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
    (delta(start.0, end.0), delta(start.1, end.1))
}

/// Samples CPU time at `from` and at `until`; resolves to the differences.
fn cpu_window(pid: Option<u32>, from: Instant, until: Instant) -> tokio::task::JoinHandle<(Option<u64>, Option<u64>)> {
    tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        let start = cpu_now(pid);
        tokio::time::sleep_until(until.into()).await;
        cpu_since(pid, start)
    })
}

/// What every measured loop reports besides its rate, flattened into each
/// scenario's JSON: latency quantiles, CPU per call and failures.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Measured {
    #[serde(flatten)]
    pub(crate) latency: Latency,
    #[serde(flatten)]
    pub(crate) cpu: CpuPerCall,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
}

impl Measured {
    /// `p50 .. ms  p99 .. ms  p999 .. ms  CPU µs/<per> s / c  errors n`, for
    /// a table line.
    pub(crate) fn summary(&self, per: &str) -> String {
        format!(
            "p50 {:.3} ms  p99 {:.3} ms  p999 {:.3} ms  CPU µs/{per} {}  errors {}",
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.latency.p999_ms,
            self.cpu.cell(),
            self.errors
        )
    }
}

/// What one measurement saw.
#[derive(Clone, Debug)]
pub(crate) struct Outcome {
    /// Calls that succeeded within the window.
    pub(crate) ok: u64,
    /// Calls that failed within the window.
    pub(crate) errors: u64,
    /// The first failure, for the report.
    pub(crate) first_error: Option<String>,
    /// Latency of the successful calls, µs.
    pub(crate) latency: Histogram<u64>,
    pub(crate) window: Duration,
    /// CPU used in the window, per successful call.
    pub(crate) cpu: CpuPerCall,
}

impl Outcome {
    fn new(window: Duration) -> Self {
        Self { ok: 0, errors: 0, first_error: None, latency: histogram(), window, cpu: CpuPerCall::default() }
    }

    /// Sets [`Outcome::cpu`] from the window's CPU time (µs) and `self.ok`.
    fn set_cpu(&mut self, (server, client): (Option<u64>, Option<u64>)) {
        let per_call = |us: Option<u64>| us.filter(|_| self.ok > 0).map(|us| round3(us as f64 / self.ok as f64));
        self.cpu = CpuPerCall { server_cpu_us_per_call: per_call(server), client_cpu_us_per_call: per_call(client) };
    }

    fn add(&mut self, other: Self) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.latency.add(&other.latency).expect("histograms share bounds");
    }

    fn note(&mut self, result: Result<(), tonic::Status>, latency: Duration) {
        match result {
            Ok(()) => {
                self.ok += 1;
                record(&mut self.latency, latency);
            }
            Err(status) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{:?}: {}", status.code(), status.message()));
                }
            }
        }
    }

    /// The latency, CPU and failure figures of this measurement.
    pub(crate) fn measured(&self) -> Measured {
        Measured {
            latency: Latency::of(&self.latency),
            cpu: self.cpu,
            errors: self.errors,
            first_error: self.first_error.clone(),
        }
    }

    /// Successful calls per second over the window.
    pub(crate) fn per_sec(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64()
    }

    /// CPU the server and this tool each spent over the window, in cores
    /// (CPU seconds per second).
    pub(crate) fn cores(&self) -> (Option<f64>, Option<f64>) {
        let cores = |us_per_call: Option<f64>| us_per_call.map(|us| round3(us * self.per_sec() / 1e6));
        (cores(self.cpu.server_cpu_us_per_call), cores(self.cpu.client_cpu_us_per_call))
    }
}

/// Runs `callers` concurrent loops of `call(caller)` for `warmup + window`;
/// counts the calls that complete inside the window, and the CPU time the
/// server (`pid`, when known) and this tool spent in it.
pub(crate) async fn closed_loop<F, Fut>(
    callers: usize,
    warmup: Duration,
    window: Duration,
    pid: Option<u32>,
    call: F,
) -> Outcome
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    let from = Instant::now() + warmup;
    let until = from + window;
    let cpu = cpu_window(pid, from, until);
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut out = Outcome::new(window);
                loop {
                    let start = Instant::now();
                    if start >= until {
                        break;
                    }
                    let result = call(i).await;
                    let end = Instant::now();
                    if end >= from && end <= until {
                        out.note(result, end - start);
                    }
                }
                out
            })
        })
        .collect();
    let mut total = Outcome::new(window);
    for task in tasks {
        total.add(task.await.expect("a load task panicked"));
    }
    total.set_cpu(cpu.await.expect("the CPU sampler panicked"));
    total
}

/// Shortest sleep of the open loop's pacer: at high rates a wake starts
/// several calls.
const PACER_TICK: Duration = Duration::from_micros(200);

/// Starts `call(k)` at `rate` calls per second for `warmup + window` (calls
/// due at the same wake of the pacer share a task) and measures each from
/// its scheduled start. Calls still
/// running 10 s after the window count as errors; more than 10,000 in flight
/// means the server cannot keep up, and further calls are skipped as errors.
/// CPU time as for [`closed_loop`].
///
/// The schedule is kept by a thread of its own (`bench-pacer`) that sleeps
/// until the next call is due, but at least [`PACER_TICK`], and then starts
/// every call that is due in one task on the runtime: tokio's timer ticks in
/// whole milliseconds, so pacing with it released calls in bursts once a
/// millisecond (11 at a time at 11,000/s) and counted up to 1 ms of the
/// timer's own lateness as server latency. A wake and a spawn per call, on
/// the other hand, cost the client ~10-20 µs of CPU a call (context
/// switches), taken from the server on a two-core machine. A call that
/// starts late still counts from its scheduled time, so the tick's lateness
/// (a fraction of a millisecond) is counted against the server, not hidden.
pub(crate) async fn open_loop<F, Fut>(
    rate: f64,
    warmup: Duration,
    window: Duration,
    pid: Option<u32>,
    call: F,
) -> Outcome
where
    F: Fn(usize) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    const MAX_IN_FLIGHT: usize = 10_000;
    let start = Instant::now();
    let from = start + warmup;
    let until = from + window;
    let period = Duration::from_secs_f64(1.0 / rate);
    let cpu = cpu_window(pid, from, until);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let runtime = tokio::runtime::Handle::current();
    let pacer = {
        let in_flight = in_flight.clone();
        std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || {
                // Measured calls not started because too many were in flight.
                let mut skipped = 0u64;
                let mut k = 0usize;
                let due_of = |k: usize| start + period.mul_f64(k as f64);
                while due_of(k) < until {
                    // Every call due by now starts, in one task.
                    let now = Instant::now();
                    let mut calls = Vec::new();
                    while due_of(k) <= now && due_of(k) < until {
                        let due = due_of(k);
                        let measured = due >= from;
                        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                            skipped += u64::from(measured);
                        } else {
                            in_flight.fetch_add(1, Ordering::Relaxed);
                            calls.push((due, measured, call(k)));
                        }
                        k += 1;
                    }
                    if !calls.is_empty() {
                        let tx = tx.clone();
                        runtime.spawn(futures::future::join_all(calls.into_iter().map(move |(due, measured, fut)| {
                            let tx = tx.clone();
                            async move {
                                let result = fut.await;
                                let _ = tx.send((measured, result, due.elapsed()));
                            }
                        })));
                    }
                    let next = due_of(k);
                    if next < until {
                        std::thread::sleep(next.saturating_duration_since(Instant::now()).max(PACER_TICK));
                    }
                }
                skipped
            })
            .expect("cannot start the pacer thread")
    };
    let mut total = Outcome::new(window);
    let drain_until = tokio::time::Instant::from_std(until + Duration::from_secs(10));
    // Ends when the pacer and every call it started are done (the last
    // sender is gone), or at the drain deadline.
    while let Ok(Some((measured, result, latency))) = tokio::time::timeout_at(drain_until, rx.recv()).await {
        in_flight.fetch_sub(1, Ordering::Relaxed);
        if measured {
            total.note(result, latency);
        }
    }
    let skipped = tokio::task::spawn_blocking(move || pacer.join().expect("the pacer thread panicked"))
        .await
        .expect("joining the pacer thread panicked");
    if skipped > 0 {
        total.errors += skipped;
        total.first_error.get_or_insert_with(|| "bench: too many calls in flight".to_owned());
    }
    total.errors += in_flight.load(Ordering::Relaxed) as u64;
    total.set_cpu(cpu.await.expect("the CPU sampler panicked"));
    total
}

/// Wall-clock µs since the Unix epoch: latencies that cross processes
/// (server, scripted model server, this tool) on one machine's clock.
pub(crate) fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

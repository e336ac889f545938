//! Load generators and latency bookkeeping. A closed loop keeps N callers
//! busy (throughput at a concurrency); an open loop starts calls on a fixed
//! schedule and measures each from its scheduled start, so a slow server
//! cannot hide its queueing (no coordinated omission). Latencies are HDR
//! histograms in microseconds, 3 significant digits.

use std::future::Future;
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

/// Rounds to three decimals (keeps the JSON readable).
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
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
}

impl Outcome {
    fn new(window: Duration) -> Self {
        Self { ok: 0, errors: 0, first_error: None, latency: histogram(), window }
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

    /// Successful calls per second over the window.
    pub(crate) fn per_sec(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64()
    }
}

/// Runs `callers` concurrent loops of `call(caller)` for `warmup + window`;
/// counts the calls that complete inside the window.
pub(crate) async fn closed_loop<F, Fut>(callers: usize, warmup: Duration, window: Duration, call: F) -> Outcome
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    let from = Instant::now() + warmup;
    let until = from + window;
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
    total
}

/// Starts `call(k)` at `rate` calls per second for `warmup + window`, each
/// as its own task, and measures each from its scheduled start. Calls still
/// running 10 s after the window count as errors; more than 10,000 in flight
/// means the server cannot keep up, and further calls are skipped as errors.
pub(crate) async fn open_loop<F, Fut>(rate: f64, warmup: Duration, window: Duration, call: F) -> Outcome
where
    F: Fn(usize) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    const MAX_IN_FLIGHT: usize = 10_000;
    let start = Instant::now();
    let from = start + warmup;
    let until = from + window;
    let period = Duration::from_secs_f64(1.0 / rate);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut total = Outcome::new(window);
    let mut in_flight = 0usize;
    let mut k = 0usize;
    loop {
        let due = start + period.mul_f64(k as f64);
        if due >= until {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        while let Ok((measured, result, latency)) = rx.try_recv() {
            in_flight -= 1;
            if measured {
                total.note(result, latency);
            }
        }
        let measured = due >= from;
        if in_flight >= MAX_IN_FLIGHT {
            if measured {
                total.note(Err(tonic::Status::resource_exhausted("bench: too many calls in flight")), period);
            }
        } else {
            in_flight += 1;
            let tx = tx.clone();
            let fut = call(k);
            tokio::spawn(async move {
                let result = fut.await;
                let _ = tx.send((measured, result, due.elapsed()));
            });
        }
        k += 1;
    }
    let drain_until = tokio::time::Instant::now() + Duration::from_secs(10);
    while in_flight > 0 {
        match tokio::time::timeout_at(drain_until, rx.recv()).await {
            Ok(Some((measured, result, latency))) => {
                in_flight -= 1;
                if measured {
                    total.note(result, latency);
                }
            }
            _ => break,
        }
    }
    total.errors += in_flight as u64;
    total
}

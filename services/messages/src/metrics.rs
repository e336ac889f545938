//! The message writer's metrics, registered in the process's registry
//! (`natter_kit::metrics::register`) when a writer starts ([`register`]):
//! - `natter_store_batch_size`, `natter_store_commit_seconds`: messages per
//!   group commit and how long its store call took ([`observe_commit`]);
//! - `natter_writer_seconds_total{phase}`: where the writer's wall-clock
//!   time goes, by [`WriterPhase`] ([`PhaseClock`]). The phases' rates add
//!   up to 1 (one thread) while the writer runs.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use prometheus::{Counter, CounterVec, Histogram, HistogramOpts, Opts};

/// Seconds; from half a millisecond to ten seconds (as the RPC latencies).
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

struct WriterMetrics {
    batch_size: Histogram,
    commit_seconds: Histogram,
    /// `natter_writer_seconds_total`, one handle per [`WriterPhase`].
    phases: [Counter; WriterPhase::ALL.len()],
}

static METRICS: LazyLock<WriterMetrics> = LazyLock::new(|| {
    let batch_size = Histogram::with_opts(
        HistogramOpts::new("natter_store_batch_size", "Messages written per store transaction.")
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]),
    )
    .expect("valid metric");
    let commit_seconds = Histogram::with_opts(
        HistogramOpts::new("natter_store_commit_seconds", "Time to write and commit one store transaction.")
            .buckets(LATENCY_BUCKETS.to_vec()),
    )
    .expect("valid metric");
    let phases = CounterVec::new(
        Opts::new(
            "natter_writer_seconds_total",
            "Wall-clock seconds the message writer spent, by phase (idle, commit, activity, answer).",
        ),
        &["phase"],
    )
    .expect("valid metric");
    let handles = WriterPhase::ALL.map(|phase| phases.with_label_values(&[phase.label()]));
    for collector in [
        Box::new(batch_size.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(commit_seconds.clone()),
        Box::new(phases),
    ] {
        natter_kit::metrics::register(collector);
    }
    WriterMetrics { batch_size, commit_seconds, phases: handles }
});

/// Registers the writer's metrics (once per process), so that they are
/// served from the writer's start, before its first batch.
pub fn register() {
    LazyLock::force(&METRICS);
}

/// Records one group commit: `batch_size` messages, committed by a store
/// call that took `duration` (waiting for the database's writer included).
pub fn observe_commit(batch_size: usize, duration: Duration) {
    let m = &*METRICS;
    m.batch_size.observe(batch_size as f64);
    m.commit_seconds.observe(duration.as_secs_f64());
}

/// A phase of the message writer's loop (see the `writer` module), the
/// label of `natter_writer_seconds_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriterPhase {
    /// Waiting for the first send of the next batch.
    Idle,
    /// The store's batch insert: on SQLite the wait for its writer thread
    /// (behind edits, deletes and read positions), the statements and the
    /// COMMIT with its WAL sync; on PostgreSQL its two statements.
    Commit,
    /// Recording the chats' newest messages with the chats service (on
    /// SQLite in the all-in-one, a map update: the chats store writes them
    /// in the background).
    Activity,
    /// Answering the batch's callers.
    Answer,
}

impl WriterPhase {
    /// Every phase, in loop order.
    pub const ALL: [WriterPhase; 4] =
        [WriterPhase::Idle, WriterPhase::Commit, WriterPhase::Activity, WriterPhase::Answer];

    /// The `phase` label: `idle`, `commit`, `activity` or `answer`.
    pub fn label(self) -> &'static str {
        match self {
            WriterPhase::Idle => "idle",
            WriterPhase::Commit => "commit",
            WriterPhase::Activity => "activity",
            WriterPhase::Answer => "answer",
        }
    }
}

// `PhaseClock::lap` indexes the handles, built in `ALL`'s order, by
// discriminant.
const _: () = {
    let mut i = 0;
    while i < WriterPhase::ALL.len() {
        assert!(WriterPhase::ALL[i] as usize == i, "WriterPhase::ALL is in declaration order");
        i += 1;
    }
};

/// Charges the writer's wall-clock time to its phases: each [`lap`]
/// charges the time since the previous lap (or since [`start`]) to one
/// phase, so no instant is counted twice or left out.
///
/// [`lap`]: PhaseClock::lap
/// [`start`]: PhaseClock::start
#[derive(Debug)]
pub struct PhaseClock {
    last: Instant,
}

impl PhaseClock {
    /// A clock whose first lap starts now.
    pub fn start() -> Self {
        Self { last: Instant::now() }
    }

    /// Charges the time since the last lap to `phase`: one atomic add.
    pub fn lap(&mut self, phase: WriterPhase) {
        let now = Instant::now();
        METRICS.phases[phase as usize].inc_by((now - self.last).as_secs_f64());
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_metrics_are_served_by_the_process_registry() {
        observe_commit(3, Duration::from_millis(2));
        PhaseClock::start().lap(WriterPhase::Commit);
        let text = natter_kit::metrics::render();
        for name in
            ["natter_store_batch_size", "natter_store_commit_seconds", "natter_writer_seconds_total{phase=\"commit\"}"]
        {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}

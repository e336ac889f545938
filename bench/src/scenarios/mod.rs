//! The scenarios. Each returns a [`Report`]: one JSON object for stdout and
//! table lines for stderr. Rates are also given as a ratio to the `ceiling`
//! (health Check calls per second measured in the same run), which survives
//! a noisy or slower machine better than the raw figure.

pub(crate) mod assistant;
pub(crate) mod ceiling;
pub(crate) mod chats;
pub(crate) mod fanout;
pub(crate) mod history;
pub(crate) mod resume;
pub(crate) mod send;
pub(crate) mod streams;

use serde::Serialize;

use crate::cli::Settings;
use crate::client::Fixture;
use crate::load::{self, Measured, Outcome};
use crate::seed;
use crate::server::Target;

/// What a scenario works with.
pub(crate) struct Ctx<'a> {
    pub(crate) settings: &'a Settings,
    pub(crate) fixture: &'a Fixture,
    pub(crate) target: &'a Target,
    /// Direct access to the messages store, for seeding `history`.
    pub(crate) store: Option<seed::Store>,
    /// Health Check calls per second, when `ceiling` ran.
    pub(crate) ceiling: Option<f64>,
    /// The scripted model server the spawned natter's assistant streams
    /// from (`assistant`).
    pub(crate) llm: Option<natter_llm::testing::ScriptedServer>,
}

impl Ctx<'_> {
    /// `rate` as a fraction of the ceiling (None without one).
    pub(crate) fn ratio(&self, rate: f64) -> Option<f64> {
        self.ceiling.filter(|c| *c > 0.0).map(|c| load::round4(rate / c))
    }
}

/// A closed loop of page reads (history, chats): its rate and what it cost.
#[derive(Serialize)]
pub(crate) struct PageRate {
    pub(crate) concurrency: usize,
    pub(crate) pages_per_s: f64,
    pub(crate) ratio_to_ceiling: Option<f64>,
    #[serde(flatten)]
    pub(crate) measured: Measured,
}

impl PageRate {
    /// The figures of `out`, a closed loop at `concurrency`.
    pub(crate) fn of(ctx: &Ctx<'_>, concurrency: usize, out: Outcome) -> Self {
        Self {
            concurrency,
            pages_per_s: load::round3(out.per_sec()),
            ratio_to_ceiling: ctx.ratio(out.per_sec()),
            measured: out.measured(),
        }
    }

    /// `N pages/s ratio R  <latency and CPU per page>` for a table line.
    pub(crate) fn summary(&self) -> String {
        format!(
            "{:.0} pages/s ratio {}  {}",
            self.pages_per_s,
            fmt_ratio(self.ratio_to_ceiling),
            self.measured.summary("page")
        )
    }
}

/// A scenario's results.
pub(crate) struct Report {
    /// The results as a JSON object (its fields go after `"scenario"`).
    pub(crate) results: serde_json::Value,
    pub(crate) table: Vec<String>,
}

impl Report {
    /// A report of `results` (a struct that serializes to an object).
    pub(crate) fn new(results: impl Serialize, table: Vec<String>) -> anyhow::Result<Self> {
        Ok(Self { results: serde_json::to_value(results)?, table })
    }
}

/// Formats an optional ratio for the table.
pub(crate) fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"))
}

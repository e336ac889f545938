//! `natter-bench`: drives a running natter (or one it spawns) over loopback
//! through the generated tonic clients and prints one JSON object per
//! scenario on stdout and a readable table on stderr. Every run measures the
//! trivial-RPC ceiling too, so figures can be read as ratios to it.
//!
//! Client and server share the machine: the figures include the tool's own
//! CPU use, which is also why the ceiling is measured under the same
//! conditions. See bench/README.md.

mod cli;
mod client;
mod load;
mod scenarios;
mod seed;
mod server;
mod server_latency;

use std::io::Write as _;
use std::time::Instant;

use anyhow::bail;
use clap::Parser as _;

use crate::cli::{Args, Scenario, Settings};
use crate::scenarios::ceiling::At;
use crate::scenarios::{Ctx, Report};
use crate::server::Target;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.postgres && args.spawn.is_some() {
        bail!("--postgres drives split services that are already running: it does not go with --spawn");
    }
    let started = Instant::now();
    let nofile = server::raise_nofile_limit();
    // `assistant`: a scripted model server in this process, which the
    // spawned natter's assistant streams from.
    let llm = match &args.spawn {
        Some(_) if args.scenarios.contains(&Scenario::Assistant) => {
            let server = natter_llm::testing::ScriptedServer::start(0).await;
            let settings = Settings::resolve(&args, String::new());
            let script =
                natter_llm::testing::Script::stamped(settings.assistant_tokens(), settings.assistant_token_interval);
            server.set_fallback(script);
            Some(server)
        }
        _ => None,
    };
    let mut extra: Vec<String> = match &llm {
        Some(server) => {
            ["--assistant-base-url", server.url(), "--assistant-concurrency", "100000", "--assistant-queue", "1000"]
                .map(str::to_owned)
                .to_vec()
        }
        None => Vec::new(),
    };
    extra.extend(args.server_arg.iter().cloned());
    let target = match &args.spawn {
        Some(natter) => Target::spawn(natter, &extra).await?,
        None => Target::existing(args.target.clone(), args.server_pid, args.server_metrics.clone()),
    };
    let outcome = run(&args, &target, nofile, llm).await;
    target.stop().await?;
    let failed = outcome?;
    eprintln!("natter-bench: done in {:.1} s", started.elapsed().as_secs_f64());
    if failed > 0 {
        bail!("{failed} scenario(s) failed");
    }
    Ok(())
}

/// One line of stdout: the scenario's name first, its results, how long it
/// took (seconds, set-up included) and the settings of the run.
#[derive(serde::Serialize)]
struct Line<'a> {
    scenario: Scenario,
    #[serde(flatten)]
    results: &'a serde_json::Value,
    seconds: f64,
    settings: &'a Settings,
}

/// Runs the selected scenarios in a fixed order (ceiling first, so the
/// others can be given as ratios); returns how many failed.
async fn run(
    args: &Args,
    target: &Target,
    nofile: u64,
    llm: Option<natter_llm::testing::ScriptedServer>,
) -> anyhow::Result<usize> {
    let settings = Settings::resolve(args, target.url.clone());
    let store = match (&target.data_dir, &args.seed_sqlite, &args.seed_postgres) {
        (_, Some(path), _) => Some(seed::Store::Sqlite(path.clone())),
        (_, None, Some(url)) => Some(seed::Store::Postgres { url: url.clone(), schema: args.schema.clone() }),
        (Some(dir), None, None) => Some(seed::Store::Sqlite(dir.join("messages.db"))),
        (None, None, None) => None,
    };
    let selected = |s: Scenario| args.scenarios.contains(&s);
    let history_total = settings.history_depth + settings.history_page_size as u64;
    if selected(Scenario::History) && store.is_none() && history_total > scenarios::history::API_SEED_MAX {
        bail!(
            "history at depth {} needs direct store access: --seed-sqlite PATH/messages.db, --seed-postgres URL (with --postgres), or --spawn",
            settings.history_depth
        );
    }
    if selected(Scenario::Search) && store.is_none() {
        bail!("search needs direct store access: --seed-sqlite PATH/messages.db, --seed-postgres URL, or --spawn");
    }
    if args.postgres && selected(Scenario::History) && args.seed_postgres.is_none() {
        bail!("--postgres: history seeds through --seed-postgres URL (schema --schema)");
    }

    eprintln!(
        "natter-bench: {} ({}), pid {}, {} users, open-file limit {nofile}",
        settings.target,
        if settings.spawned { "spawned" } else { "existing" },
        target.pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
        settings.users
    );
    eprintln!("settings: {}", serde_json::to_string(&settings)?);
    let setup = Instant::now();
    let fixture = client::Fixture::setup(&settings.target, settings.connections, settings.users).await?;
    eprintln!("setup: {} users with sessions in {:.1} s", settings.users, setup.elapsed().as_secs_f64());

    let mut ctx = Ctx { settings: &settings, fixture: &fixture, target, store, ceiling: None, llm };
    let mut failed = 0;
    // The ceiling again at the end, when other scenarios ran after it: the
    // ratios use the first one, the second shows how far the machine's
    // speed moved meanwhile.
    let ceiling_again = selected(Scenario::Ceiling) && args.scenarios.len() > 1;
    let order = [
        Scenario::Ceiling,
        Scenario::Send,
        Scenario::Fanout,
        Scenario::Typing,
        Scenario::Reactions,
        Scenario::Resume,
        Scenario::History,
        Scenario::Chats,
        Scenario::Streams,
        Scenario::Search,
        // Last: its replies may still stream after it.
        Scenario::Assistant,
    ];
    let steps = order.into_iter().filter(|s| selected(*s)).map(|s| (s, At::Start));
    for (scenario, at) in steps.chain(ceiling_again.then_some((Scenario::Ceiling, At::End))) {
        let began = Instant::now();
        let result = match scenario {
            Scenario::Ceiling => scenarios::ceiling::run(&ctx, at).await.map(|(report, rate)| {
                if at == At::Start {
                    ctx.ceiling = Some(rate);
                }
                report
            }),
            Scenario::Send => scenarios::send::run(&ctx).await,
            Scenario::Fanout => scenarios::fanout::run(&ctx).await,
            Scenario::Typing => scenarios::typing::run(&ctx).await,
            Scenario::Reactions => scenarios::reactions::run(&ctx).await,
            Scenario::Resume => scenarios::resume::run(&ctx).await,
            Scenario::History => scenarios::history::run(&ctx).await,
            Scenario::Chats => scenarios::chats::run(&ctx).await,
            Scenario::Streams => scenarios::streams::run(&ctx).await,
            Scenario::Assistant => scenarios::assistant::run(&ctx).await,
            Scenario::Search => scenarios::search::run(&ctx).await,
        };
        let report = result.unwrap_or_else(|e| {
            failed += 1;
            Report {
                results: serde_json::json!({ "error": format!("{e:#}") }),
                table: vec![format!("{scenario:?} FAILED: {e:#}")],
            }
        });
        let line = Line {
            scenario,
            results: &report.results,
            seconds: load::round3(began.elapsed().as_secs_f64()),
            settings: &settings,
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
        out.flush()?;
        for line in &report.table {
            eprintln!("{line}");
        }
    }
    Ok(failed)
}

//! `search`: SearchMessages over one chat of `--search-depth` (1,000,000)
//! messages and `--search-chats` (100) other chats of 100 messages each,
//! all of which the searching user is a member of. Message `n`'s text is
//! "seeded message N about topicX in colorY" with X = n mod 100 and Y = n
//! mod 7, so a one-word query (`topic7`) matches 1% of the messages (10,000
//! of the big chat) and a two-word query (`topic7 color3`) 1 in 700 (the
//! rarer of its words is in 1%, the other in 14%). Each query
//! kind is measured at concurrency 1 (latency: p50/p99), newest first, and
//! the one-word query also by relevance (which ranks every match).
//!
//! The messages are written by SQL straight into the messages store (see
//! `seed`), indexed as the service indexes them.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, ensure};
use natter_proto::messages::v1::SearchMessagesRequest;
use serde::Serialize;

use super::{Ctx, PageRate, Report};
use crate::load;
use crate::seed;

/// Message `n`'s text (see the module docs), an SQL expression both
/// engines read alike.
const TEXT: &str = "'seeded message ' || n || ' about topic' || (n % 100) || ' in color' || (n % 7)";

/// Messages in each of the other chats.
const OTHER_CHAT_MESSAGES: u64 = 100;

/// Results per page (SearchMessages' default).
const PAGE: i32 = 20;

/// The query kinds: name, query, order_by.
const QUERIES: [(&str, &str, &str); 3] =
    [("one_word", "topic7", ""), ("two_words", "topic7 color3", ""), ("one_word_relevance", "topic7", "relevance")];

#[derive(Serialize)]
struct Query {
    kind: &'static str,
    query: &'static str,
    order_by: &'static str,
    #[serde(flatten)]
    rate: PageRate,
}

#[derive(Serialize)]
struct Results {
    messages_in_big_chat: u64,
    other_chats: usize,
    messages_per_other_chat: u64,
    page_size: i32,
    seed_seconds: f64,
    queries: Vec<Query>,
}

/// Seeds the chats, checks each query once, then measures.
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Report> {
    let s = ctx.settings;
    let f = ctx.fixture;
    let store = ctx.store.as_ref().context("search seeds by SQL: needs --seed-sqlite, --seed-postgres or --spawn")?;
    let seeding = Instant::now();
    let big = f.group_chat(0, &[1], "bench search").await?;
    eprintln!("search: seeding {} messages by SQL into the messages store ...", s.search_depth);
    seed::seed(store, &big, &f.users[0].id, s.search_depth, TEXT).await?;
    for k in 0..s.search_chats {
        let chat = f.group_chat(0, &[1], &format!("bench search {k}")).await?;
        seed::seed(store, &chat, &f.users[0].id, OTHER_CHAT_MESSAGES, TEXT).await?;
    }
    let seed_seconds = seeding.elapsed().as_secs_f64();

    let request = |query: &str, order_by: &str| SearchMessagesRequest {
        query: query.to_owned(),
        order_by: order_by.to_owned(),
        page_size: PAGE,
        ..Default::default()
    };
    for (kind, query, order_by) in QUERIES {
        let page = f.messages(1).search_messages(f.users[1].request(request(query, order_by))).await?.into_inner();
        let words: Vec<String> = query.split(' ').map(|w| format!("«{w}»")).collect();
        // A full page but for the two-word query of a small (--smoke) seed.
        let want = if kind == "two_words" { 1 } else { PAGE as usize };
        ensure!(
            (want..=PAGE as usize).contains(&page.results.len())
                && page.results.iter().all(|r| words.iter().all(|w| r.snippet.contains(w.as_str()))),
            "search {kind}: expected {want} to {PAGE} results marking {words:?}, got {} (first snippet {:?})",
            page.results.len(),
            page.results.first().map(|r| &r.snippet)
        );
    }

    let mut queries = Vec::new();
    let mut table = vec![format!(
        "search   a chat of {} messages and {} chats of {OTHER_CHAT_MESSAGES}, seeded in {seed_seconds:.1} s",
        s.search_depth, s.search_chats
    )];
    for (kind, query, order_by) in QUERIES {
        let reader = f.users[1].clone();
        let clients: Arc<Vec<_>> = Arc::new((0..s.connections).map(|i| f.messages(i)).collect());
        let out = load::closed_loop(1, s.warmup, s.duration, ctx.target.pid, move |i| {
            let request = reader.request(request(query, order_by));
            let mut client = clients[i % clients.len()].clone();
            async move { client.search_messages(request).await.map(drop) }
        })
        .await;
        let q = Query { kind, query, order_by, rate: PageRate::of(ctx, 1, out) };
        table.push(format!("search   {kind:<18} {query:<14} conc 1: {}", q.rate.summary()));
        queries.push(q);
    }
    Report::new(
        Results {
            messages_in_big_chat: s.search_depth,
            other_chats: s.search_chats,
            messages_per_other_chat: OTHER_CHAT_MESSAGES,
            page_size: PAGE,
            seed_seconds: load::round3(seed_seconds),
            queries,
        },
        table,
    )
}

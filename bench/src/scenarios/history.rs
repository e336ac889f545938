//! `history`: ListMessages pages of 50 in one chat of depth + 50 messages:
//! the newest page, and the page below the newest `depth` messages
//! (`before_seq` = 51, so seqs 50..1). A keyset walk of `(chat_id, seq)`
//! should cost the same at both ends. Each is measured at concurrency 1
//! (latency) and at the ceiling's concurrency (throughput, as a ratio).
//!
//! The chat is created through the API; its messages are written by SQL
//! straight into the messages store (see `seed`), or, for small depths with
//! no store access, through SendMessage.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure};
use futures::{StreamExt as _, TryStreamExt as _};
use natter_proto::messages::v1::{ListMessagesRequest, SendMessageRequest};
use serde::Serialize;

use super::{Ctx, PageRate, Report};
use crate::load;
use crate::seed;

/// Deepest history seeded through SendMessage when there is no store access.
pub(crate) const API_SEED_MAX: u64 = 20_000;

#[derive(Serialize)]
struct Page {
    page: &'static str,
    before_seq: i64,
    #[serde(flatten)]
    rate: PageRate,
}

#[derive(Serialize)]
struct Results {
    depth: u64,
    messages_in_chat: u64,
    page_size: i32,
    seeded_by: &'static str,
    seed_seconds: f64,
    pages: Vec<Page>,
}

/// Seeds the chat, checks both pages once, then measures them.
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Report> {
    let s = ctx.settings;
    let f = ctx.fixture;
    let page = s.history_page_size;
    let total = s.history_depth + page as u64;
    let chat = f.group_chat(0, &[1], "bench history").await?;

    let seeding = Instant::now();
    let seeded_by = match &ctx.store {
        Some(store) => {
            eprintln!("history: seeding {total} messages by SQL into the messages store ...");
            seed::seed(store, &chat, &f.users[0].id, total, seed::PLAIN_TEXT).await?;
            match store {
                seed::Store::Sqlite(_) => "sqlite",
                seed::Store::Postgres { .. } => "postgres",
            }
        }
        None if total <= API_SEED_MAX => {
            eprintln!("history: seeding {total} messages through SendMessage ...");
            futures::stream::iter(0..total)
                .map(|k| {
                    let request = f.users[0].request(SendMessageRequest {
                        chat_id: chat.clone(),
                        text: format!("seeded message {}", k + 1),
                        ..Default::default()
                    });
                    let mut client = f.messages(k as usize);
                    async move { client.send_message(request).await }
                })
                .buffered(64)
                .try_for_each(|_| async { Ok(()) })
                .await?;
            "api"
        }
        None => bail!("history at depth {} needs --seed-sqlite, --seed-postgres or --spawn", s.history_depth),
    };
    let seed_seconds = seeding.elapsed().as_secs_f64();

    let total = i64::try_from(total)?;
    let deep_before = total - i64::try_from(s.history_depth)? + 1;
    let pages = [("newest", 0), ("deep", deep_before)];
    for (name, before_seq) in pages {
        let mut client = f.messages(0);
        let request = f.users[1].request(list_request(&chat, page, before_seq));
        let messages = client.list_messages(request).await?.into_inner().messages;
        let top = if before_seq == 0 { total } else { before_seq - 1 };
        ensure!(
            messages.len() == page as usize && messages[0].seq == top,
            "{name} page: expected {page} messages from seq {top}, got {} from {:?}",
            messages.len(),
            messages.first().map(|m| m.seq)
        );
    }

    let mut results = Vec::new();
    let mut table = Vec::new();
    for (name, before_seq) in pages {
        for concurrency in [1, s.unary_concurrency()] {
            // Users 0 and 1 are the chat's members: callers alternate them.
            let readers = Arc::new([f.users[0].clone(), f.users[1].clone()]);
            let clients: Arc<Vec<_>> = Arc::new((0..s.connections).map(|i| f.messages(i)).collect());
            let chat = chat.clone();
            let out = load::closed_loop(concurrency, s.warmup, s.duration, ctx.target.pid, move |i| {
                let request = readers[i % 2].request(list_request(&chat, page, before_seq));
                let mut client = clients[i % clients.len()].clone();
                async move { client.list_messages(request).await.map(drop) }
            })
            .await;
            let p = Page { page: name, before_seq, rate: PageRate::of(ctx, concurrency, out) };
            table.push(format!(
                "history  {name:<6} page of {page} (before_seq {before_seq}) conc {concurrency:>4}: {}",
                p.rate.summary()
            ));
            results.push(p);
        }
    }
    table.insert(
        0,
        format!(
            "history  chat of {total} messages (depth {} + a page), seeded by {seeded_by} in {seed_seconds:.1} s",
            s.history_depth
        ),
    );
    Report::new(
        Results {
            depth: s.history_depth,
            messages_in_chat: total as u64,
            page_size: page,
            seeded_by,
            seed_seconds: load::round3(seed_seconds),
            pages: results,
        },
        table,
    )
}

fn list_request(chat: &str, page_size: i32, before_seq: i64) -> ListMessagesRequest {
    ListMessagesRequest { chat_id: chat.to_owned(), page_size, before_seq, ..Default::default() }
}

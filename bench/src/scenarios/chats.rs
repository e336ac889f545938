//! `chats`: ListChats, the call a client makes when it opens. Users 0 and 1
//! share 20 group chats, each with a message from user 0, so every page of
//! 20 carries 20 previews and, for user 1, 20 unread counts (the messages
//! service's chat summaries). Measured at concurrency 1 (latency) and at the
//! ceiling's concurrency (throughput, as a ratio).

use std::sync::Arc;

use anyhow::ensure;
use natter_proto::chats::v1::ListChatsRequest;
use natter_proto::chats::v1::chat_service_client::ChatServiceClient;
use natter_proto::messages::v1::SendMessageRequest;
use serde::Serialize;

use super::{Ctx, PageRate, Report};
use crate::load;

/// Chats per page, and chats the two users share.
const PAGE: i32 = 20;

#[derive(Serialize)]
struct Results {
    page_size: i32,
    runs: Vec<PageRate>,
}

/// Creates the chats, checks one page, then measures.
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Report> {
    let s = ctx.settings;
    let f = ctx.fixture;
    for k in 0..PAGE {
        let chat = f.group_chat(0, &[1], &format!("bench chats {k}")).await?;
        let request = f.users[0].request(SendMessageRequest {
            chat_id: chat,
            text: format!("preview {k}"),
            ..Default::default()
        });
        f.messages(0).send_message(request).await?;
    }
    let list = || ListChatsRequest { page_size: PAGE, ..Default::default() };
    let first = ChatServiceClient::new(f.channel(1)).list_chats(f.users[1].request(list())).await?.into_inner();
    ensure!(
        first.chats.len() == PAGE as usize && first.chats.iter().all(|c| c.unread_count >= 1),
        "chats: expected {PAGE} chats with unread messages for user 1, got {} ({:?} unread)",
        first.chats.len(),
        first.chats.iter().map(|c| c.unread_count).collect::<Vec<_>>()
    );

    let mut runs = Vec::new();
    let mut table = Vec::new();
    for concurrency in [1, s.unary_concurrency()] {
        // Users 0 and 1 share the chats: callers alternate them.
        let readers = Arc::new([f.users[0].clone(), f.users[1].clone()]);
        let clients: Arc<Vec<_>> = Arc::new(f.channels.iter().cloned().map(ChatServiceClient::new).collect());
        let out = load::closed_loop(concurrency, s.warmup, s.duration, ctx.target.pid, move |i| {
            let request = readers[i % 2].request(list());
            let mut client = clients[i % clients.len()].clone();
            async move { client.list_chats(request).await.map(drop) }
        })
        .await;
        let run = PageRate::of(ctx, concurrency, out);
        table.push(format!(
            "chats    ListChats page of {PAGE} (previews, unread counts) conc {concurrency:>4}: {}",
            run.summary()
        ));
        runs.push(run);
    }
    Report::new(Results { page_size: PAGE, runs }, table)
}

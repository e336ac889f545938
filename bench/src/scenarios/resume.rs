//! `resume`: clients come back after changes they missed. Each of
//! `--resume-clients` clients holds a StreamEvents stream on one group chat
//! (`--resume-clients-per-chat` per chat) until it has seen a marker, then
//! drops it; while all are away, each chat takes `--resume-changes` changes
//! (about 60% sends, 20% edits, 20% deletes); then every client reconnects
//! at once with `resume_changes` set to the last change_seq it saw. A
//! client is caught up when it has the chat's newest change number; the
//! figure is the time from its reconnect call to that, over all clients.
//! A client that sees a change number twice, or not increasing, counts as
//! an error.

use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use natter_proto::messages::v1::message_service_client::MessageServiceClient;
use natter_proto::messages::v1::stream_events_response::Event;
use natter_proto::messages::v1::{
    DeleteMessageRequest, EditMessageRequest, SendMessageRequest, StreamEventsRequest, StreamEventsResponse,
};
use serde::Serialize;
use tonic::codec::Streaming;

use super::{Ctx, Report};
use crate::client::{self, Fixture};
use crate::load::{self, Latency};

/// How long a client may take to catch up before it counts as an error.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);

#[derive(Serialize)]
struct Results {
    clients: usize,
    chats: usize,
    changes_per_chat: usize,
    /// Events replayed per client on average (edits and deletes of a
    /// message sent while away coalesce into one).
    events_per_client: f64,
    /// Reconnect to caught up, over all clients.
    caught_up: Latency,
    /// Wall time from the first reconnect to the last client caught up.
    all_caught_up_ms: f64,
    errors: u64,
    first_error: Option<String>,
}

/// The next event, at most [`CATCH_UP_LIMIT`] away.
async fn next(stream: &mut Streaming<StreamEventsResponse>) -> anyhow::Result<StreamEventsResponse> {
    match tokio::time::timeout(CATCH_UP_LIMIT, stream.message()).await {
        Ok(Ok(Some(event))) => Ok(event),
        Ok(Ok(None)) => anyhow::bail!("stream ended"),
        Ok(Err(status)) => anyhow::bail!("stream failed: {status}"),
        Err(_) => anyhow::bail!("no event within {CATCH_UP_LIMIT:?}"),
    }
}

/// Reads until change number `until`; the changes read, or an error for a
/// number seen twice or out of order. Ephemeral events (typing, presence,
/// reply deltas) are no changes: they carry the stream's last change number
/// and are skipped.
async fn catch_up(stream: &mut Streaming<StreamEventsResponse>, after: i64, until: i64) -> anyhow::Result<u64> {
    let (mut last, mut events) = (after, 0);
    while last < until {
        let event = next(stream).await?;
        if matches!(event.event, Some(Event::Typing(_) | Event::PresenceChanged(_) | Event::MessageDelta(_))) {
            continue;
        }
        anyhow::ensure!(event.change_seq > last, "change {} after {last}: repeated or out of order", event.change_seq);
        last = event.change_seq;
        events += 1;
    }
    Ok(events)
}

pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Report> {
    let s = ctx.settings;
    let f = ctx.fixture;
    let members = f.users.len().min(1000);
    let everyone: Vec<usize> = (0..members).collect();
    let clients = s.resume_clients;
    let chats_n = clients.div_ceil(s.resume_clients_per_chat);
    let mut chats = Vec::with_capacity(chats_n);
    for k in 0..chats_n {
        chats.push(f.group_chat(0, &everyone, &format!("bench resume {k}")).await?);
    }
    let chat_of = |j: usize| &chats[j / s.resume_clients_per_chat];
    let user_of = |j: usize| &f.users[j % members];
    let per_conn = s.event_streams_per_connection;
    let connections = client::connect(&s.target, clients.div_ceil(per_conn)).await?;
    let sender = &f.users[0];
    let messages = || f.messages(0);

    // Every client sees its chat up to a marker: its resume point.
    let mut streams: Vec<_> = futures::stream::iter(0..clients)
        .map(|j| Fixture::open_stream(connections[j / per_conn].clone(), user_of(j), chat_of(j)))
        .buffered(64)
        .try_collect()
        .await?;
    let mut markers = Vec::with_capacity(chats_n);
    for chat in &chats {
        let request = SendMessageRequest { chat_id: chat.clone(), text: "resume marker".into(), ..Default::default() };
        let marker = messages().send_message(sender.request(request)).await?.into_inner().message;
        markers.push(marker.map_or(0, |m| m.change_seq));
    }
    let seen: Vec<i64> = futures::stream::iter(streams.iter_mut().enumerate())
        .map(|(j, stream)| {
            let marker = markers[j / s.resume_clients_per_chat];
            async move { catch_up(stream, 0, marker).await.map(|_| marker) }
        })
        .buffered(64)
        .try_collect()
        .await?;
    drop(streams); // everyone goes away

    // While they are away: each chat's changes, chats in parallel.
    let heads: Vec<i64> = futures::stream::iter(&chats)
        .map(|chat| async move {
            let mut client = messages();
            let (mut sent, mut head): (Vec<String>, i64) = (Vec::new(), 0);
            for i in 0..s.resume_changes {
                let message = match (i % 5, sent.len()) {
                    (3, n) if n > 0 => {
                        let id = sent[i % n].clone();
                        let request = EditMessageRequest { message_id: id, text: format!("edited {i}") };
                        client.edit_message(sender.request(request)).await?.into_inner().message
                    }
                    (4, n) if n > 0 => {
                        let id = sent.swap_remove(i % n);
                        let request = DeleteMessageRequest { message_id: id };
                        client.delete_message(sender.request(request)).await?.into_inner().message
                    }
                    _ => {
                        let request = SendMessageRequest {
                            chat_id: chat.clone(),
                            text: format!("away {i}"),
                            ..Default::default()
                        };
                        let m = client.send_message(sender.request(request)).await?.into_inner().message;
                        sent.extend(m.as_ref().map(|m| m.id.clone()));
                        m
                    }
                };
                head = head.max(message.map_or(0, |m| m.change_seq));
            }
            anyhow::Ok(head)
        })
        .buffered(16)
        .try_collect()
        .await?;

    // Everyone back at once.
    let began = Instant::now();
    let outcomes: Vec<anyhow::Result<(Duration, u64)>> = futures::stream::iter(0..clients)
        .map(|j| {
            let channel = connections[j / per_conn].clone();
            let (chat, user, after) = (chat_of(j).clone(), user_of(j), seen[j]);
            let until = heads[j / s.resume_clients_per_chat];
            async move {
                let start = Instant::now();
                let request = StreamEventsRequest {
                    chat_ids: vec![chat.clone()],
                    resume_changes: [(chat, after)].into(),
                    ..Default::default()
                };
                let mut stream =
                    MessageServiceClient::new(channel).stream_events(user.request(request)).await?.into_inner();
                let events = catch_up(&mut stream, after, until).await?;
                Ok((start.elapsed(), events))
            }
        })
        .buffer_unordered(clients)
        .collect()
        .await;
    let all = began.elapsed();
    drop(connections);

    let mut caught_up = load::histogram();
    let (mut events, mut errors, mut first_error) = (0u64, 0u64, None);
    for outcome in outcomes {
        match outcome {
            Ok((took, n)) => {
                load::record(&mut caught_up, took);
                events += n;
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let ok = clients as u64 - errors;
    let results = Results {
        clients,
        chats: chats_n,
        changes_per_chat: s.resume_changes,
        events_per_client: load::round3(if ok == 0 { 0.0 } else { events as f64 / ok as f64 }),
        caught_up: Latency::of(&caught_up),
        all_caught_up_ms: load::round3(all.as_secs_f64() * 1000.0),
        errors,
        first_error,
    };
    let table = vec![format!(
        "resume   {clients} clients on {chats_n} chats, {} changes each while away: {:.1} events/client, caught up p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms, all in {:.1} ms  errors {errors}",
        s.resume_changes,
        results.events_per_client,
        results.caught_up.p50_ms,
        results.caught_up.p99_ms,
        results.caught_up.max_ms,
        results.all_caught_up_ms
    )];
    Report::new(results, table)
}

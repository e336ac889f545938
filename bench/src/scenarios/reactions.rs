//! `reactions`: every user (64 by default) reacts to one message at once,
//! in a closed loop: each adds, then removes, its reaction with one of 8
//! emoji (user i: emoji i % 8, so 8 users share each), for the window. Then
//! each adds it once more and the message's counts are read back: every
//! count must be the number of users holding that emoji, or updates were
//! lost (`lost_updates`, which must be 0).

use std::time::Instant;

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use natter_proto::messages::v1::{AddReactionRequest, GetMessageRequest, RemoveReactionRequest, SendMessageRequest};
use serde::Serialize;

use super::{Ctx, Report};
use crate::load::{self, Measured};

/// The emoji the reactors share.
const EMOJI: [&str; 8] = ["👍", "❤️", "😂", "🎉", "😮", "😢", "🙏", "🔥"];

#[derive(Serialize)]
struct Results {
    reactors: usize,
    /// AddReaction and RemoveReaction calls per second, all reactors.
    calls_per_s: f64,
    ratio_to_ceiling: Option<f64>,
    #[serde(flatten)]
    measured: Measured,
    /// Counts read back after every reactor added its emoji once more,
    /// against the number of reactors of each emoji: the sum of the
    /// differences (0, or reactions were lost or doubled).
    lost_updates: u64,
}

/// The `reactions` scenario (see the module docs).
pub(crate) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<Report> {
    let s = ctx.settings;
    let f = ctx.fixture;
    let reactors = f.users.len();
    let everyone: Vec<usize> = (0..reactors).collect();
    let chat = f.group_chat(0, &everyone, "bench reactions").await?;
    let message = f
        .messages(0)
        .send_message(f.users[0].request(SendMessageRequest {
            chat_id: chat,
            text: "react to this".into(),
            ..Default::default()
        }))
        .await
        .context("SendMessage")?
        .into_inner()
        .message
        .context("SendMessage returned no message")?
        .id;

    let toggle = {
        let (users, message, clients) =
            (f.users.clone(), message.clone(), (0..reactors).map(|i| f.messages(i)).collect::<Vec<_>>());
        // Each caller alternates add and remove; its own state, so no lock.
        let added: std::sync::Arc<Vec<std::sync::atomic::AtomicBool>> =
            std::sync::Arc::new((0..reactors).map(|_| std::sync::atomic::AtomicBool::new(false)).collect());
        move |i: usize| {
            let (message, emoji) = (message.clone(), EMOJI[i % EMOJI.len()].to_owned());
            let (user, mut client, added) = (users[i].clone(), clients[i].clone(), added.clone());
            async move {
                if added[i].load(std::sync::atomic::Ordering::Relaxed) {
                    client.remove_reaction(user.request(RemoveReactionRequest { message_id: message, emoji })).await?;
                } else {
                    client.add_reaction(user.request(AddReactionRequest { message_id: message, emoji })).await?;
                }
                added[i].fetch_xor(true, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
        }
    };
    let began = Instant::now();
    let out = load::closed_loop(reactors, s.warmup, s.duration, ctx.target.pid, toggle).await;
    // Every reactor ends holding its emoji (an add of one held is a no-op).
    futures::stream::iter(0..reactors)
        .map(|i| {
            let request = f.users[i]
                .request(AddReactionRequest { message_id: message.clone(), emoji: EMOJI[i % EMOJI.len()].to_owned() });
            let mut client = f.messages(i);
            async move { client.add_reaction(request).await }
        })
        .buffer_unordered(reactors)
        .try_collect::<Vec<_>>()
        .await
        .context("the final AddReaction")?;
    let read = f
        .messages(0)
        .get_message(f.users[0].request(GetMessageRequest { message_id: message }))
        .await
        .context("GetMessage")?
        .into_inner()
        .message
        .context("GetMessage returned no message")?;
    let lost_updates = EMOJI
        .iter()
        .enumerate()
        .map(|(e, emoji)| {
            let expected = (0..reactors).filter(|i| i % EMOJI.len() == e).count() as i64;
            let got = read.reactions.iter().find(|r| r.emoji == *emoji).map_or(0, |r| i64::from(r.count));
            expected.abs_diff(got)
        })
        .sum();
    let per_s = out.per_sec();
    let results = Results {
        reactors,
        calls_per_s: load::round3(per_s),
        ratio_to_ceiling: ctx.ratio(per_s),
        measured: out.measured(),
        lost_updates,
    };
    let table = vec![format!(
        "reactions {reactors} reactors on one message ({} emoji): {:.0} add/remove calls/s ratio {}  {} | lost updates {lost_updates} ({:.1} s)",
        EMOJI.len(),
        results.calls_per_s,
        super::fmt_ratio(results.ratio_to_ceiling),
        results.measured.summary("call"),
        began.elapsed().as_secs_f64()
    )];
    Report::new(results, table)
}

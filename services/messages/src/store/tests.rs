//! The conformance suite of [`MessageStore`]: every test runs against
//! SQLite (a fresh file) and, when `NATTER_TEST_DATABASE_URL` is set,
//! against PostgreSQL (a fresh schema, dropped afterwards).

use std::sync::Arc;

use natter_db::DbConfig;
use natter_kit::id::{ChatId, MessageId, UserId};

use super::*;
use crate::domain::Attachment;

/// A store under test, and what to clean up after it.
struct Harness {
    store: Arc<dyn MessageStore>,
    postgres: bool,
    cleanup: Cleanup,
}

enum Cleanup {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Schema { url: String, schema: String },
}

impl Harness {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&DbConfig::sqlite_in(dir.path(), "messages")).await.unwrap();
        Self { store, postgres: false, cleanup: Cleanup::Dir(dir) }
    }

    async fn postgres() -> Option<Self> {
        let url = natter_db::testing::postgres_url()?;
        let schema = natter_db::testing::unique_schema("messages");
        let store = open(&DbConfig::postgres(&url, &schema)).await.unwrap();
        Some(Self { store, postgres: true, cleanup: Cleanup::Schema { url, schema } })
    }

    async fn finish(self) {
        self.store.close().await;
        if let Cleanup::Schema { url, schema } = &self.cleanup {
            natter_db::postgres::drop_schema(url, schema).await.unwrap();
        }
    }
}

/// Stamps each test fn of the suite into a `sqlite` and a `postgres` module.
macro_rules! message_store_suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let harness = super::Harness::sqlite().await;
                    super::$test(&harness).await;
                    harness.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(harness) = super::Harness::postgres().await else { return };
                    super::$test(&harness).await;
                    harness.finish().await;
                }
            )*
        }
    };
}

message_store_suite!(
    a_retry_with_the_same_id_creates_nothing,
    a_batch_assigns_gap_free_seqs_per_chat_and_skips_retries,
    a_batch_without_replies_skips_retries_too,
    a_reply_names_a_message_stored_before_its_batch,
    concurrent_batches_take_gap_free_seqs,
    history_pages_both_ways,
    unread_counts_skip_own_and_deleted_messages_up_to_the_cap,
    edits_keep_revisions_up_to_the_cap,
    a_delete_leaves_a_tombstone,
    read_positions_only_move_forward_until_reset,
    summaries_follow_the_requested_order,
    recent_activity_lists_the_newest_message_of_recent_chats,
    purging_a_chat_removes_all_of_it,
);

/// Fixed ids, so tests can name chats and users by letter.
fn chat(n: u8) -> ChatId {
    ChatId(uuid::Uuid::from_u128(0xc000 + u128::from(n)))
}

fn user(n: u8) -> UserId {
    UserId(uuid::Uuid::from_u128(0xa000 + u128::from(n)))
}

fn id(n: u32) -> MessageId {
    MessageId(uuid::Uuid::from_u128(0x1_0000 + u128::from(n)))
}

fn msg(n: u32, c: u8, reply_to: i64) -> NewMessage {
    NewMessage {
        id: id(n),
        chat_id: chat(c),
        author_id: user(0),
        text: format!("text of {n}"),
        attachments: Vec::new(),
        reply_to: Some(Seq(reply_to)).filter(|s| s.0 > 0),
        send_time: 1_000 + i64::from(n),
    }
}

fn by(mut m: NewMessage, author: u8) -> NewMessage {
    m.author_id = user(author);
    m
}

fn seqs(out: &[Sent]) -> Vec<Option<i64>> {
    out.iter()
        .map(|s| match s {
            Sent::Created(m) => Some(m.seq.0),
            _ => None,
        })
        .collect()
}

async fn send(h: &Harness, batch: &[NewMessage]) -> Vec<Sent> {
    h.store.insert_batch(batch).await.unwrap()
}

/// The seqs and ids of a chat, oldest first.
async fn stored(h: &Harness, c: u8) -> Vec<(i64, MessageId)> {
    let all = Range { ascending: true, ..Range::default() };
    h.store.list(chat(c), all, None, 10_000).await.unwrap().into_iter().map(|m| (m.seq.0, m.id)).collect()
}

async fn a_retry_with_the_same_id_creates_nothing(h: &Harness) {
    let image = Attachment {
        url: "https://img.example/a.png".into(),
        mime_type: "image/png".into(),
        width: 1,
        height: 2,
        size_bytes: 3,
    };
    let first = NewMessage { attachments: vec![image], ..msg(1, 1, 0) };
    let out = send(h, std::slice::from_ref(&first)).await;
    let Sent::Created(original) = &out[0] else { panic!("created: {out:?}") };
    assert_eq!(original, &first.clone().into_message(Seq(1)));
    // A retry, and the id reused in another chat by another author: neither
    // writes anything nor takes a seq.
    assert_eq!(send(h, std::slice::from_ref(&first)).await, [Sent::Duplicate]);
    let elsewhere = by(NewMessage { text: "other".into(), ..msg(1, 2, 0) }, 9);
    assert_eq!(send(h, &[elsewhere]).await, [Sent::Duplicate]);
    assert_eq!(h.store.message(id(1)).await.unwrap().as_ref(), Some(original), "the original stays");
    assert_eq!((h.store.head(chat(1)).await.unwrap(), h.store.head(chat(2)).await.unwrap()), (Seq(1), Seq::ZERO));
    assert_eq!(seqs(&send(h, &[msg(2, 1, 0)]).await), [Some(2)]);
    assert_eq!(h.store.message(id(99)).await.unwrap(), None);
}

async fn a_batch_assigns_gap_free_seqs_per_chat_and_skips_retries(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(0, 1, 0)]).await), [Some(1)]);
    let out = send(
        h,
        &[
            msg(1, 1, 0),
            msg(2, 2, 0),
            msg(0, 1, 0),  // stored already: a retry
            msg(3, 1, 1),  // a reply to a stored message
            msg(1, 1, 0),  // repeats 1 within the batch
            msg(4, 2, 99), // a reply to nothing
            msg(5, 2, 0),
        ],
    )
    .await;
    assert_eq!(seqs(&out), [Some(2), Some(1), None, Some(3), None, None, Some(2)]);
    assert_eq!((&out[2], &out[4], &out[5]), (&Sent::Duplicate, &Sent::Duplicate, &Sent::NoSuchReply));
    assert_eq!(
        (h.store.head(chat(1)).await.unwrap(), h.store.head(chat(2)).await.unwrap()),
        (Seq(3), Seq(2)),
        "no seq taken by a refused message"
    );
    assert_eq!(stored(h, 1).await, [(1, id(0)), (2, id(1)), (3, id(3))]);
    assert_eq!(stored(h, 2).await, [(1, id(2)), (2, id(5))]);
    let Sent::Created(reply) = &out[3] else { unreachable!() };
    assert_eq!(reply.reply_to, Some(Seq(1)));
    assert_eq!(send(h, &[]).await, []);
}

/// Without replies, PostgreSQL inserts without checking first: a stored id
/// must still be a duplicate that takes no seq, and the rest go in.
async fn a_batch_without_replies_skips_retries_too(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(10, 4, 0)]).await), [Some(1)]);
    let out = send(h, &[msg(11, 4, 0), msg(10, 4, 0), msg(12, 5, 0), msg(11, 4, 0), msg(13, 4, 0)]).await;
    assert_eq!(seqs(&out), [Some(2), None, Some(1), None, Some(3)]);
    assert_eq!((&out[1], &out[3]), (&Sent::Duplicate, &Sent::Duplicate));
    assert_eq!((h.store.head(chat(4)).await.unwrap(), h.store.head(chat(5)).await.unwrap()), (Seq(3), Seq(1)));
    assert_eq!(stored(h, 4).await, [(1, id(10)), (2, id(11)), (3, id(13))]);
}

async fn a_reply_names_a_message_stored_before_its_batch(h: &Harness) {
    // Seq 1 of chat 3 is taken within this very batch: not stored before it.
    let out = send(h, &[msg(6, 3, 0), msg(7, 3, 1)]).await;
    assert_eq!(seqs(&out), [Some(1), None]);
    assert_eq!(out[1], Sent::NoSuchReply);
    assert_eq!(seqs(&send(h, &[msg(7, 3, 1)]).await), [Some(2)], "once stored, it may be answered");
}

async fn concurrent_batches_take_gap_free_seqs(h: &Harness) {
    const TASKS: u32 = 8;
    const BATCHES: u32 = 10;
    const PER_BATCH: u32 = 6;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = h.store.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..BATCHES {
                // Every batch writes to three chats, in an order that varies.
                let batch: Vec<NewMessage> = (0..PER_BATCH)
                    .map(|i| {
                        let n = (t * BATCHES + b) * PER_BATCH + i;
                        msg(n, ((i + t + b) % 3) as u8, 0)
                    })
                    .collect();
                let out = store.insert_batch(&batch).await.unwrap();
                assert!(out.iter().all(|s| matches!(s, Sent::Created(_))));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut total = 0;
    for c in 0..3 {
        let got: Vec<i64> = stored(h, c).await.into_iter().map(|(s, _)| s).collect();
        let n = got.len() as i64;
        assert_eq!(got, (1..=n).collect::<Vec<_>>(), "chat {c}: seqs 1..={n} without gaps or repeats");
        assert_eq!(h.store.head(chat(c)).await.unwrap(), Seq(n));
        total += n;
    }
    assert_eq!(total, i64::from(TASKS * BATCHES * PER_BATCH));
}

async fn history_pages_both_ways(h: &Harness) {
    let batch: Vec<NewMessage> = (1..=10).map(|n| msg(n, 1, 0)).collect();
    send(h, &batch).await;
    let page = |range: Range, from: Option<i64>, limit: u32| async move {
        let rows = h.store.list(chat(1), range, from.map(Seq), limit).await.unwrap();
        rows.into_iter().map(|m| m.seq.0).collect::<Vec<_>>()
    };
    let desc = Range::default();
    let asc = Range { ascending: true, ..Range::default() };
    assert_eq!(page(desc, None, 3).await, [10, 9, 8]);
    assert_eq!(page(desc, Some(8), 3).await, [7, 6, 5]);
    assert_eq!(page(desc, Some(2), 3).await, [1]);
    assert_eq!(page(asc, None, 3).await, [1, 2, 3]);
    assert_eq!(page(asc, Some(3), 3).await, [4, 5, 6]);
    assert_eq!(page(asc, Some(10), 3).await, Vec::<i64>::new());
    let before = Range { before: Some(Seq(5)), ..desc };
    assert_eq!(page(before, None, 2).await, [4, 3]);
    assert_eq!(page(before, Some(3), 10).await, [2, 1]);
    let after = Range { after: Some(Seq(7)), ascending: true, before: None };
    assert_eq!(page(after, None, 10).await, [8, 9, 10]);
    let between = Range { after: Some(Seq(2)), before: Some(Seq(6)), ascending: false };
    assert_eq!(page(between, None, 10).await, [5, 4, 3]);
    assert_eq!(page(Range { ascending: true, ..between }, Some(3), 1).await, [4]);
    assert!(h.store.list(chat(2), desc, None, 10).await.unwrap().is_empty());
}

async fn unread_counts_skip_own_and_deleted_messages_up_to_the_cap(h: &Harness) {
    // User 1 has not read anything of chat 1: three by others, one of them
    // deleted later, and one of their own.
    send(h, &[by(msg(1, 1, 0), 2), by(msg(2, 1, 0), 1), by(msg(3, 1, 0), 2), by(msg(4, 1, 0), 3)]).await;
    h.store.delete(id(3), 5_000).await.unwrap();
    let summary = h.store.summaries(&[chat(1)], user(1)).await.unwrap();
    assert_eq!(summary[0].unread, 2);
    let state = h.store.mark_read(chat(1), user(1), Seq(1)).await.unwrap();
    assert_eq!(state, ReadState { read_seq: Seq(1), unread: 1 });
    assert_eq!(h.store.summaries(&[chat(1)], user(1)).await.unwrap()[0].unread, 1);

    // Far behind: counted up to the cap.
    let many = UNREAD_COUNT_CAP as u32 + 5;
    let batch: Vec<NewMessage> = (0..many).map(|n| by(msg(100 + n, 2, 0), 2)).collect();
    send(h, &batch).await;
    assert_eq!(h.store.summaries(&[chat(2)], user(1)).await.unwrap()[0].unread, UNREAD_COUNT_CAP);
    let state = h.store.mark_read(chat(2), user(1), Seq(3)).await.unwrap();
    assert_eq!(state, ReadState { read_seq: Seq(3), unread: UNREAD_COUNT_CAP });
    let state = h.store.mark_read(chat(2), user(1), Seq(i64::from(many) - 10)).await.unwrap();
    assert_eq!(state.unread, 10);
}

async fn edits_keep_revisions_up_to_the_cap(h: &Harness) {
    send(h, &[msg(1, 1, 0), msg(2, 1, 0)]).await;
    for (n, text) in ["second", "third"].into_iter().enumerate() {
        let Edited::Done(m) = h.store.edit(id(1), text, 2_000 + n as i64, 2).await.unwrap() else {
            panic!("edit {n} refused")
        };
        assert_eq!((m.text.as_str(), m.revision, m.edit_time), (text, n as i64 + 2, Some(2_000 + n as i64)));
    }
    assert_eq!(h.store.edit(id(1), "fourth", 3_000, 2).await.unwrap(), Edited::TooManyEdits);
    let now = h.store.message(id(1)).await.unwrap().unwrap();
    assert_eq!((now.text.as_str(), now.revision), ("third", 3));

    let earlier = h.store.revisions_after(id(1), 0, 10).await.unwrap();
    let texts: Vec<(i64, &str, i64)> = earlier.iter().map(|r| (r.revision, r.text.as_str(), r.edit_time)).collect();
    assert_eq!(texts, [(1, "text of 1", 1_001), (2, "second", 2_000)]);
    let page: Vec<i64> = h.store.revisions_after(id(1), 1, 1).await.unwrap().iter().map(|r| r.revision).collect();
    assert_eq!(page, [2]);
    assert!(h.store.revisions_after(id(1), 2, 10).await.unwrap().is_empty());

    send(h, &[msg(3, 1, 0)]).await;
    h.store.edit(id(3), "edited", 4_000, 5).await.unwrap();
    let all: Vec<(MessageId, i64)> =
        h.store.revisions(&[id(3), id(1), id(2)]).await.unwrap().iter().map(|r| (r.message_id, r.revision)).collect();
    assert_eq!(all, [(id(1), 1), (id(1), 2), (id(3), 1)]);
    assert!(h.store.revisions(&[]).await.unwrap().is_empty());
    assert_eq!(h.store.edit(id(42), "x", 1, 5).await.unwrap(), Edited::Deleted, "no such message");
}

async fn a_delete_leaves_a_tombstone(h: &Harness) {
    let image =
        Attachment { url: "https://x/y".into(), mime_type: "image/png".into(), width: 1, height: 1, size_bytes: 1 };
    send(h, &[NewMessage { attachments: vec![image], ..msg(1, 1, 0) }, msg(2, 1, 0)]).await;
    h.store.edit(id(1), "edited", 2_000, 5).await.unwrap();
    let gone = h.store.delete(id(1), 3_000).await.unwrap().unwrap();
    assert_eq!((gone.seq, gone.text.as_str(), gone.attachments.len(), gone.delete_time), (Seq(1), "", 0, Some(3_000)));
    assert!(gone.deleted());
    assert!(h.store.revisions_after(id(1), 0, 10).await.unwrap().is_empty(), "earlier revisions go too");
    assert_eq!(h.store.edit(id(1), "again", 4_000, 5).await.unwrap(), Edited::Deleted);
    let again = h.store.delete(id(1), 5_000).await.unwrap().unwrap();
    assert_eq!(again.delete_time, Some(3_000), "a tombstone stays as it is");
    assert_eq!(stored(h, 1).await, [(1, id(1)), (2, id(2))], "the seq stays");
    assert_eq!(h.store.delete(id(9), 1).await.unwrap(), None);
}

async fn read_positions_only_move_forward_until_reset(h: &Harness) {
    let batch: Vec<NewMessage> = (1..=5).map(|n| by(msg(n, 1, 0), 2)).collect();
    send(h, &batch).await;
    let mark = |seq: i64| async move { h.store.mark_read(chat(1), user(1), Seq(seq)).await.unwrap() };
    assert_eq!(mark(3).await, ReadState { read_seq: Seq(3), unread: 2 });
    assert_eq!(mark(2).await, ReadState { read_seq: Seq(3), unread: 2 }, "never back");
    assert_eq!(mark(100).await, ReadState { read_seq: Seq(5), unread: 0 }, "clamped to the newest");
    assert_eq!(
        h.store.mark_read(chat(9), user(1), Seq(4)).await.unwrap(),
        ReadState { read_seq: Seq::ZERO, unread: 0 },
        "a chat without messages"
    );
    // A reset sets the position to the newest seq, even backwards.
    h.store.mark_read(chat(1), user(2), Seq(1)).await.unwrap();
    send(h, &[by(msg(6, 1, 0), 3)]).await;
    h.store.reset_read_positions(chat(1), &[user(2), user(3), user(2)]).await.unwrap();
    for u in [2, 3] {
        assert_eq!(h.store.summaries(&[chat(1)], user(u)).await.unwrap()[0].unread, 0);
        assert_eq!(h.store.mark_read(chat(1), user(u), Seq::ZERO).await.unwrap().read_seq, Seq(6));
    }
    assert_eq!(h.store.summaries(&[chat(1)], user(1)).await.unwrap()[0].unread, 1, "others keep theirs");
    h.store.reset_read_positions(chat(1), &[]).await.unwrap();
}

async fn summaries_follow_the_requested_order(h: &Harness) {
    send(h, &[by(msg(1, 1, 0), 2), by(msg(2, 2, 0), 2), by(msg(3, 1, 0), 2)]).await;
    let out = h.store.summaries(&[chat(2), chat(3), chat(1)], user(1)).await.unwrap();
    let newest: Vec<Option<(MessageId, i64)>> =
        out.iter().map(|s| s.newest.as_ref().map(|m| (m.id, m.seq.0))).collect();
    assert_eq!(newest, [Some((id(2), 1)), None, Some((id(3), 2))]);
    assert_eq!(out.iter().map(|s| s.unread).collect::<Vec<_>>(), [1, 0, 2]);
    assert_eq!(out[2].newest.as_ref().unwrap().text, "text of 3");
    assert!(h.store.summaries(&[], user(1)).await.unwrap().is_empty());
}

async fn recent_activity_lists_the_newest_message_of_recent_chats(h: &Harness) {
    let at = |mut m: NewMessage, time: i64| {
        m.send_time = time;
        m
    };
    send(h, &[at(msg(1, 1, 0), 1_000), at(msg(2, 2, 0), 50_000), at(msg(3, 3, 0), 95_000)]).await;
    send(h, &[at(msg(4, 2, 0), 96_000), at(msg(5, 3, 0), 100_000)]).await;
    let mut recent = h.store.recent_activity(10_000).await.unwrap();
    recent.sort_by_key(|a| a.chat_id);
    if h.postgres {
        assert!(recent.is_empty(), "PostgreSQL's chats store loses no activity");
        return;
    }
    let expected = [
        Activity { chat_id: chat(2), seq: Seq(2), send_time: 96_000 },
        Activity { chat_id: chat(3), seq: Seq(2), send_time: 100_000 },
    ];
    assert_eq!(recent, expected, "within 10 ms of the newest message");
}

async fn purging_a_chat_removes_all_of_it(h: &Harness) {
    send(h, &[by(msg(1, 1, 0), 2), msg(2, 1, 0), msg(3, 2, 0)]).await;
    h.store.edit(id(1), "edited", 2_000, 5).await.unwrap();
    h.store.mark_read(chat(1), user(1), Seq(1)).await.unwrap();
    h.store.purge_chat(chat(1)).await.unwrap();
    assert_eq!(h.store.head(chat(1)).await.unwrap(), Seq::ZERO);
    assert!(stored(h, 1).await.is_empty());
    assert_eq!(h.store.message(id(1)).await.unwrap(), None);
    assert!(h.store.revisions(&[id(1)]).await.unwrap().is_empty());
    assert_eq!(h.store.summaries(&[chat(1)], user(1)).await.unwrap()[0], Summary { newest: None, unread: 0 });
    assert_eq!(stored(h, 2).await, [(1, id(3))], "other chats stay");
    // The chat starts over from seq 1.
    assert_eq!(seqs(&send(h, &[msg(4, 1, 0)]).await), [Some(1)]);
}

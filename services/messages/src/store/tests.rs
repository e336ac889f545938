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
    Dir(tempfile::TempDir),
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

    /// Runs `sql` on the store's database behind the store's back: rows as
    /// an earlier release left them.
    async fn execute(&self, sql: &str) {
        match &self.cleanup {
            Cleanup::Dir(dir) => {
                let conn = rusqlite::Connection::open(dir.path().join("messages.db")).unwrap();
                conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
                conn.execute_batch(sql).unwrap();
            }
            Cleanup::Schema { url, schema } => {
                use sqlx::{Connection as _, Executor as _};
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                conn.execute(sqlx::AssertSqlSafe(format!("SET search_path TO {schema}; {sql}"))).await.unwrap();
                conn.close().await.unwrap();
            }
        }
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
    a_join_recorded_late_leaves_what_was_sent_since_unread,
    an_external_verdict_only_raises_the_flags_of_the_revision_it_saw,
    reports_are_once_per_user_and_the_queue_lists_flagged_and_reported_messages,
    flags_are_stored_replaced_on_edit_cleared_on_delete_and_filter_a_listing,
    a_reply_takes_the_next_seq_streams_by_checkpoints_and_finishes_as_a_change,
    a_replacement_supersedes_the_old_reply_and_a_failed_one_restores_it,
    stale_replies_are_those_whose_checkpoint_is_old_and_checkpoints_renew_them,
    one_reply_generates_at_a_time_per_chat_and_a_refusal_is_not_held_up,
    a_start_retried_by_its_owner_resumes_its_reply_while_it_generates,
    a_reply_whose_checks_came_before_a_departure_or_a_closure_is_refused_in_its_start,
    a_reply_started_after_its_chat_s_archive_is_refused_in_its_start,
    a_finish_checked_before_a_departure_or_a_block_is_refused_or_stopped_in_its_write,
    a_start_waiting_on_a_departure_being_recorded_is_refused_once_it_commits,
    read_positions_are_read_in_order,
    a_chat_s_read_positions_are_listed_by_user_a_page_at_a_time,
    a_retry_with_the_same_id_creates_nothing,
    a_batch_assigns_gap_free_seqs_per_chat_and_skips_retries,
    a_batch_without_replies_skips_retries_too,
    a_closed_direct_chat_takes_no_message_written_after_its_closure,
    an_archived_chat_takes_no_message_edit_reaction_or_pin_written_after_its_archive,
    a_send_waiting_on_an_archive_being_recorded_is_refused_once_it_commits,
    a_resolve_checked_before_a_departure_or_demotion_is_refused_in_its_write,
    a_resolve_waiting_on_a_departure_being_recorded_is_refused_once_it_commits,
    a_message_naming_a_reply_or_root_in_a_purged_chat_is_refused_as_stale,
    a_send_waiting_on_a_closure_being_recorded_is_refused_once_it_commits,
    a_departure_recorded_after_a_messages_check_refuses_it_in_the_write,
    a_send_waiting_on_a_departure_being_recorded_is_refused_once_it_commits,
    an_edit_checked_before_a_departure_is_refused_in_its_write,
    an_edit_waiting_on_a_departure_being_recorded_is_refused_once_it_commits,
    a_reaction_checked_before_a_departure_is_refused_in_its_write,
    a_pin_checked_before_a_departure_is_refused_in_its_write,
    a_deletion_checked_before_a_departure_is_refused_in_its_write,
    a_read_move_checked_before_a_departure_is_refused_in_its_write,
    a_report_checked_before_a_departure_is_refused_in_its_write,
    a_report_waiting_on_a_departure_being_recorded_is_refused_once_it_commits,
    a_closed_direct_chat_takes_no_edit_reaction_or_pin_written_after_its_closure,
    a_reply_names_a_message_stored_before_its_batch,
    concurrent_batches_take_gap_free_seqs,
    history_pages_both_ways,
    unread_counts_skip_own_and_deleted_messages_up_to_the_cap,
    edits_keep_revisions_up_to_the_cap,
    a_delete_leaves_a_tombstone,
    deleting_a_prompt_deletes_its_replies_first_and_a_deleted_prompt_gets_none,
    read_positions_only_move_forward_until_a_join_resets_them,
    every_change_takes_the_next_change_number,
    replaced_chat_details_are_neither_kept_nor_replayed,
    concurrent_changes_take_gap_free_numbers,
    the_log_keeps_its_newest_entries_and_raises_the_floor,
    a_retried_origin_records_nothing_twice,
    summaries_follow_the_requested_order,
    recent_activity_lists_the_newest_message_of_recent_chats,
    purging_a_chat_removes_all_of_it,
    a_purged_chat_takes_no_message_written_after_its_purge,
    a_purged_chat_takes_no_edit_reaction_or_pin,
    a_send_waiting_on_a_purge_is_refused_once_it_commits,
    a_message_sent_while_a_purge_reads_the_chat_goes_with_it,
    reactions_are_once_per_user_per_emoji_and_only_real_changes_take_numbers,
    concurrent_reactions_on_one_message_never_drift,
    mentions_are_kept_with_the_message_and_count_only_unread_live_mentions_of_others,
    last_seen_keeps_the_latest_time_whatever_order_replicas_write_in,
    forgetting_a_user_deletes_its_presence_read_positions_and_mentions_and_keeps_its_messages,
    a_join_recorded_after_its_user_was_forgotten_stores_no_read_position,
    a_join_racing_the_forget_of_its_user_stores_no_read_position,
    search_finds_the_current_text_of_live_messages_of_the_chats_asked,
    search_pages_walk_every_result_once_in_both_orders,
    text_stored_before_nfc_is_rewritten_once_and_found,
    reactions_stored_in_other_forms_are_rewritten_once_and_count_once_per_user,
    both_engines_find_the_same_messages_for_the_same_queries,
    a_thread_reply_joins_its_roots_thread_and_changes_the_root,
    thread_roots_are_live_messages_stored_before_the_batch,
    concurrent_thread_replies_count_exactly_and_page_without_gaps,
    a_reader_following_changes_while_replies_commit_sees_each_once,
    deleting_a_reply_being_written_ends_it_and_no_later_write_restores_its_text,
    pins_take_numbers_only_when_real_hold_the_limit_under_concurrent_pins_and_go_with_a_delete,
    a_pinned_reply_stays_among_the_pins_when_a_replacement_supersedes_it,
    a_pin_left_on_a_message_an_earlier_release_deleted_is_no_pin,
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
        flags: None,
        mentions: Vec::new(),
        thread_root: None,
        members_version: 0,
    }
}

/// `m` replying in the thread of seq `root`.
fn in_thread(mut m: NewMessage, root: i64) -> NewMessage {
    m.thread_root = Some(Seq(root));
    m
}

/// The message of chat `c` at `seq`.
async fn at(h: &Harness, c: u8, seq: i64) -> Message {
    let range = Range { after: Some(Seq(seq - 1)), ascending: true, superseded: true, ..Range::default() };
    h.store.list(chat(c), range, None, 1).await.unwrap().remove(0)
}

/// Every seq of chat `c` on `timeline`, walked a page of `page` at a time
/// (in `ascending` order), each page starting after the last.
async fn walk(h: &Harness, c: u8, timeline: Timeline, ascending: bool, page: u32) -> Vec<i64> {
    let range = Range { ascending, timeline, ..Range::default() };
    let (mut all, mut from) = (Vec::new(), None);
    loop {
        let got = h.store.list(chat(c), range, from, page).await.unwrap();
        all.extend(got.iter().map(|m| m.seq.0));
        if got.len() < page as usize {
            return all;
        }
        from = got.last().map(|m| m.seq);
    }
}

/// `m` mentioning users `users` (by letter).
fn mentioning(mut m: NewMessage, users: &[u8]) -> NewMessage {
    m.mentions = users.iter().map(|&u| user(u)).collect();
    m
}

/// Each user's mention count in chat `c`, in the order of `users`.
async fn mention_counts(h: &Harness, c: u8, users: &[u8]) -> Vec<i64> {
    let mut counts = Vec::new();
    for &u in users {
        counts.push(h.store.summaries(&[chat(c)], Some(user(u))).await.unwrap()[0].mentions);
    }
    counts
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

/// MarkRead as checked at members version 0 (no departure recorded): the
/// position after it (a refusal fails the test).
async fn mark_read(store: &dyn MessageStore, chat: ChatId, user: UserId, seq: Seq) -> Result<ReadState, StoreError> {
    match store.mark_read(chat, user, seq, 0).await? {
        Marked::Done(state) => Ok(state),
        Marked::Stale => panic!("refused as stale at members version 0"),
    }
}

/// [`MessageStore::delete_with_replies`] as checked at members version 0
/// (no departure recorded): what it deleted (None: no such message).
async fn delete_with_replies(h: &Harness, id: MessageId, by: UserId, now: i64) -> Option<Deleted> {
    match h.store.delete_with_replies(id, by, now, 0).await.unwrap() {
        Deletion::Done(deleted) => Some(deleted),
        Deletion::NotFound => None,
        Deletion::Stale => panic!("refused as stale at members version 0"),
    }
}

/// [`MessageStore::report`] as checked at members version 0 (no departure
/// recorded): the report stored.
async fn reported(h: &Harness, report: &StoredReport) -> StoredReport {
    match h.store.report(report, 0).await.unwrap() {
        Reported::Stored(report) => report,
        Reported::Stale => panic!("refused as stale at members version 0"),
    }
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
    assert_eq!(original, &first.clone().into_message(Seq(1), 1));
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

/// A send checked (member, not blocked) before a block and written after
/// the block's closure was recorded: the write refuses it, whatever the
/// batch's path (plain, replies checked, mentions, thread replies), takes
/// no seq and no change number, and lets other chats' messages through.
async fn a_closed_direct_chat_takes_no_message_written_after_its_closure(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(20, 6, 0)]).await), [Some(1)]);
    let before = h.store.heads(chat(6)).await.unwrap();
    h.store.close_direct_chat(chat(6), true, 1).await.unwrap();
    assert_eq!(h.store.heads(chat(6)).await.unwrap(), before, "a closure takes no change number");
    let out = send(h, &[msg(21, 6, 0), msg(22, 7, 0)]).await;
    assert_eq!((&out[0], seqs(&out)[1]), (&Sent::Closed, Some(1)), "refused in the write; the other chat goes on");
    assert_eq!(send(h, &[msg(23, 6, 1), msg(24, 7, 1)]).await[0], Sent::Closed, "with replies");
    assert_eq!(send(h, &[mentioning(msg(25, 6, 0), &[1])]).await, [Sent::Closed], "with mentions");
    assert_eq!(send(h, &[in_thread(msg(26, 6, 0), 1)]).await, [Sent::Closed], "in a thread");
    assert_eq!(h.store.heads(chat(6)).await.unwrap(), before, "no seq, no change number taken");

    // A lower or equal version (late, repeated) changes nothing.
    h.store.close_direct_chat(chat(6), false, 1).await.unwrap();
    assert_eq!(send(h, &[msg(27, 6, 0)]).await, [Sent::Closed], "still closed");
    h.store.close_direct_chat(chat(6), false, 2).await.unwrap();
    assert_eq!(seqs(&send(h, &[msg(27, 6, 0)]).await), [Some(2)], "open again, no gap");
    h.store.close_direct_chat(chat(6), true, 2).await.unwrap();
    assert_eq!(seqs(&send(h, &[msg(28, 6, 0)]).await), [Some(3)], "version 2 again: no change");

    // A chat closed before its first message or change.
    h.store.close_direct_chat(chat(8), true, 1).await.unwrap();
    assert_eq!(send(h, &[msg(29, 8, 0)]).await, [Sent::Closed]);
    assert_eq!(h.store.heads(chat(8)).await.unwrap(), Heads::default());
}

/// PostgreSQL, two transactions by hand: a send whose write reaches the
/// chat's heads while a closure of the chat is being recorded (its
/// transaction holds the heads row) waits for it, then reads the
/// committed closure and is refused. (SQLite runs one write at a time.)
async fn a_send_waiting_on_a_closure_being_recorded_is_refused_once_it_commits(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(30, 9, 0)]).await), [Some(1)]);
    let closure = sqlx::query(CLOSE_DIRECT_CHAT).bind(chat(9).to_string()).bind(true).bind(1_i64);
    let Some(out) = insert_behind(h, closure, vec![msg(31, 9, 0)]).await else { return };
    assert_eq!(out, [Sent::Closed], "the write read the closure committed while it waited");
    assert_eq!(h.store.head(chat(9)).await.unwrap(), Seq(1));
}

/// PostgreSQL only (None on SQLite, which runs one write at a time):
/// writes `hold` (which takes a chat's heads row lock) in a transaction of
/// its own, starts inserting `batch`, waits until that insert waits for
/// the transaction's lock (a condition, not a time), commits it, and
/// answers the insert's outcomes.
async fn insert_behind(
    h: &Harness,
    hold: sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>,
    batch: Vec<NewMessage>,
) -> Option<Vec<Sent>> {
    write_behind(h, hold, |store| async move { store.insert_batch(&batch).await.unwrap() }).await
}

/// As [`insert_behind`], for any write of the store: `write` (given the
/// store) runs while `hold`'s transaction holds its lock, and its answer
/// is returned once that commits.
async fn write_behind<T: Send + 'static, F: Future<Output = T> + Send + 'static>(
    h: &Harness,
    hold: sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>,
    write: impl FnOnce(Arc<dyn MessageStore>) -> F,
) -> Option<T> {
    use sqlx::{Connection as _, Executor as _};
    let Cleanup::Schema { url, schema } = &h.cleanup else { return None };
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    conn.execute(sqlx::AssertSqlSafe(format!("SET search_path TO {schema}"))).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    hold.execute(&mut *tx).await.unwrap();
    let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *tx).await.unwrap();
    let writing = tokio::spawn(write(h.store.clone()));
    natter_db::testing::wait_until_blocked_by(url, holder, || writing.is_finished()).await;
    tx.commit().await.unwrap();
    Some(writing.await.unwrap())
}

/// `m` as checked at members version `version`.
fn checked_at(m: NewMessage, version: i64) -> NewMessage {
    NewMessage { members_version: version, ..m }
}

/// A send whose membership was checked before a departure (a lower members
/// version) and written after the departure was recorded: the write
/// refuses it, with every other message of its chat in the batch (each is
/// checked again), whatever the batch's path (plain, mentions, thread
/// replies), takes no seq and no change number, and lets other chats'
/// messages through; one checked at the recorded version or later is
/// stored.
async fn a_departure_recorded_after_a_messages_check_refuses_it_in_the_write(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(40, 10, 0)]).await), [Some(1)]);
    let before = h.store.heads(chat(10)).await.unwrap();
    h.store.record_departure(chat(10), 2).await.unwrap();
    assert_eq!(h.store.heads(chat(10)).await.unwrap(), before, "a departure's version takes no change number");
    let out = send(h, &[checked_at(msg(41, 10, 0), 1), msg(42, 11, 0)]).await;
    assert_eq!((&out[0], seqs(&out)[1]), (&Sent::Stale, Some(1)), "refused in the write; the other chat goes on");
    let out = send(h, &[checked_at(msg(43, 10, 0), 2), checked_at(msg(44, 10, 0), 1)]).await;
    assert_eq!(out, [Sent::Stale, Sent::Stale], "a chat's messages in a batch go together");
    assert_eq!(send(h, &[mentioning(checked_at(msg(45, 10, 0), 1), &[1])]).await, [Sent::Stale], "with mentions");
    assert_eq!(send(h, &[in_thread(checked_at(msg(46, 10, 0), 1), 1)]).await, [Sent::Stale], "in a thread");
    assert_eq!(h.store.heads(chat(10)).await.unwrap(), before, "no seq, no change number taken");

    let out = send(h, &[checked_at(msg(43, 10, 0), 2), checked_at(msg(44, 10, 0), 3)]).await;
    assert_eq!(seqs(&out), [Some(2), Some(3)], "checked at the recorded version or later: stored, no gap");
    // A lower or equal version (late, repeated) changes nothing.
    h.store.record_departure(chat(10), 1).await.unwrap();
    assert_eq!(send(h, &[checked_at(msg(47, 10, 0), 1)]).await, [Sent::Stale], "still 2");
    assert_eq!(seqs(&send(h, &[checked_at(msg(47, 10, 0), 2)]).await), [Some(4)]);

    // A chat whose first record is a departure.
    h.store.record_departure(chat(12), 1).await.unwrap();
    assert_eq!(send(h, &[msg(48, 12, 0)]).await, [Sent::Stale]);
    assert_eq!(h.store.heads(chat(12)).await.unwrap(), Heads::default());
}

/// PostgreSQL, two transactions by hand: a send whose write reaches the
/// chat's heads while a departure from the chat is being recorded (its
/// transaction holds the heads row) waits for it, then reads the
/// committed members version (which its statement's snapshot predates)
/// and is refused.
async fn a_send_waiting_on_a_departure_being_recorded_is_refused_once_it_commits(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(50, 13, 0)]).await), [Some(1)]);
    let departure = sqlx::query(RECORD_DEPARTURE).bind(chat(13).to_string()).bind(1_i64);
    let Some(out) = insert_behind(h, departure, vec![msg(51, 13, 0)]).await else { return };
    assert_eq!(out, [Sent::Stale], "the write read the departure committed while it waited");
    assert_eq!(h.store.head(chat(13)).await.unwrap(), Seq(1));
}

/// An edit whose editor's membership check saw a members version below
/// the one a departure recorded since is refused in its write
/// ([`Edited::Stale`]) and changes nothing: no text, no revision, no change
/// number; one checked at the recorded version or later is stored.
async fn an_edit_checked_before_a_departure_is_refused_in_its_write(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(1, 1, 0)]).await), [Some(1)]);
    h.store.record_departure(chat(1), 2).await.unwrap();
    let (before, heads) = (at(h, 1, 1).await, h.store.heads(chat(1)).await.unwrap());
    assert_eq!(h.store.edit(id(1), "changed", None, 2_000, 5, 1).await.unwrap(), Edited::Stale);
    assert_eq!(at(h, 1, 1).await, before, "the text and revision as they were");
    assert_eq!(h.store.revisions(&[id(1)]).await.unwrap(), [], "no revision kept");
    assert_eq!(h.store.heads(chat(1)).await.unwrap(), heads, "no change number taken");
    let Edited::Done(edited) = h.store.edit(id(1), "changed", None, 2_000, 5, 2).await.unwrap() else {
        panic!("checked at the recorded version: edited")
    };
    assert_eq!((edited.text.as_str(), edited.change_seq), ("changed", heads.change + 1));
}

/// PostgreSQL, two transactions by hand: an edit whose write reaches the
/// chat's heads (after locking the message's row) while a departure from
/// the chat is being recorded waits for it, then reads the committed
/// members version and is refused. Reactions and pins take the heads row
/// with the same statement.
async fn an_edit_waiting_on_a_departure_being_recorded_is_refused_once_it_commits(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(1, 1, 0)]).await), [Some(1)]);
    let before = at(h, 1, 1).await;
    let departure = sqlx::query(RECORD_DEPARTURE).bind(chat(1).to_string()).bind(1_i64);
    let edit =
        |store: Arc<dyn MessageStore>| async move { store.edit(id(1), "changed", None, 2_000, 5, 0).await.unwrap() };
    let Some(out) = write_behind(h, departure, edit).await else { return };
    assert_eq!(out, Edited::Stale, "the edit read the departure committed while it waited");
    assert_eq!(at(h, 1, 1).await, before, "not edited");
}

/// A reaction added or taken back by a user whose membership check saw a
/// members version below the one a departure recorded since is refused in
/// its write ([`Reacted::Stale`]) and changes nothing; one checked at the
/// recorded version or later is stored.
async fn a_reaction_checked_before_a_departure_is_refused_in_its_write(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(1, 1, 0)]).await), [Some(1)]);
    h.store.record_departure(chat(1), 1).await.unwrap();
    let heads = h.store.heads(chat(1)).await.unwrap();
    assert_eq!(h.store.react(id(1), user(1), "👍", true, 2_000, 20, 0).await.unwrap(), Reacted::Stale);
    assert_eq!(h.store.reactions(&[id(1)], None).await.unwrap(), HashMap::new(), "no reaction stored");
    assert_eq!(h.store.heads(chat(1)).await.unwrap(), heads, "no change number taken");
    assert!(matches!(h.store.react(id(1), user(1), "👍", true, 2_001, 20, 1).await.unwrap(), Reacted::Changed(_)));
    assert_eq!(h.store.react(id(1), user(1), "👍", false, 2_002, 20, 0).await.unwrap(), Reacted::Stale);
    assert_eq!(h.store.reactions(&[id(1)], None).await.unwrap()[&id(1)].len(), 1, "not taken back");
    assert_eq!(h.store.heads(chat(1)).await.unwrap().change, heads.change + 1);
}

/// A pin or unpin by a user whose membership check saw a members version
/// below the one a departure recorded since is refused in its write
/// ([`Pinned::Stale`]) and changes nothing; one checked at the recorded
/// version or later is stored.
async fn a_pin_checked_before_a_departure_is_refused_in_its_write(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(1, 1, 0)]).await), [Some(1)]);
    h.store.record_departure(chat(1), 1).await.unwrap();
    let heads = h.store.heads(chat(1)).await.unwrap();
    assert_eq!(h.store.pin(id(1), user(1), true, 2_000, 10, 0).await.unwrap(), Pinned::Stale);
    assert_eq!(at(h, 1, 1).await.pin, None, "not pinned");
    assert_eq!(h.store.heads(chat(1)).await.unwrap(), heads, "no change number taken");
    assert!(matches!(h.store.pin(id(1), user(1), true, 2_001, 10, 1).await.unwrap(), Pinned::Changed(_)));
    assert_eq!(h.store.pin(id(1), user(1), false, 2_002, 10, 0).await.unwrap(), Pinned::Stale);
    assert!(at(h, 1, 1).await.pin.is_some(), "still pinned");
    assert_eq!(h.store.heads(chat(1)).await.unwrap().change, heads.change + 1);
}

/// A deletion by a user whose membership check saw a members version
/// below the one a departure (or a loss of rights) recorded since is
/// refused in its write ([`Deletion::Stale`]) and changes nothing: the
/// message stays live, no change number is taken; one checked at the
/// recorded version or later deletes it. Deleting a tombstone writes
/// nothing and is answered whatever the version.
async fn a_deletion_checked_before_a_departure_is_refused_in_its_write(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(1, 1, 0)]).await), [Some(1)]);
    assert_eq!(seqs(&send(h, &[in_thread(msg(2, 1, 0), 1)]).await), [Some(2)]);
    h.store.record_departure(chat(1), 1).await.unwrap();
    let heads = h.store.heads(chat(1)).await.unwrap();
    assert_eq!(h.store.delete_with_replies(id(1), user(1), 2_000, 0).await.unwrap(), Deletion::Stale);
    assert_eq!(h.store.delete_with_replies(id(2), user(1), 2_000, 0).await.unwrap(), Deletion::Stale, "a reply");
    assert!(!at(h, 1, 1).await.deleted() && !at(h, 1, 2).await.deleted(), "both live");
    assert_eq!(at(h, 1, 1).await.thread.map(|t| t.replies), Some(1), "the root's count as it was");
    assert_eq!(h.store.heads(chat(1)).await.unwrap(), heads, "no change number taken");
    let Deletion::Done(deleted) = h.store.delete_with_replies(id(2), user(1), 2_001, 1).await.unwrap() else {
        panic!("checked at the recorded version: deleted")
    };
    assert!(deleted.message.deleted());
    let again = h.store.delete_with_replies(id(2), user(1), 2_002, 0).await.unwrap();
    assert_eq!(
        again,
        Deletion::Done(Deleted { message: deleted.message, replies: Vec::new() }),
        "a tombstone: as it is"
    );
}

/// A read position moved by a user whose membership check saw a members
/// version below the one a departure recorded since is refused in its
/// write ([`Marked::Stale`]): the position stays, no change number is
/// taken; a call that moves nothing is answered whatever the version, and
/// one checked at the recorded version or later moves it.
async fn a_read_move_checked_before_a_departure_is_refused_in_its_write(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(1, 1, 0), msg(2, 1, 0)]).await), [Some(1), Some(2)]);
    assert!(matches!(h.store.mark_read(chat(1), user(1), Seq(1), 0).await.unwrap(), Marked::Done(_)));
    h.store.record_departure(chat(1), 1).await.unwrap();
    let heads = h.store.heads(chat(1)).await.unwrap();
    assert_eq!(h.store.mark_read(chat(1), user(1), Seq(2), 0).await.unwrap(), Marked::Stale);
    assert_eq!(h.store.heads(chat(1)).await.unwrap(), heads, "no change number taken");
    let stays = ReadState { read_seq: Seq(1), unread: 1, change_seq: None };
    assert_eq!(h.store.mark_read(chat(1), user(1), Seq(1), 0).await.unwrap(), Marked::Done(stays), "nothing moved");
    let moved = ReadState { read_seq: Seq(2), unread: 0, change_seq: Some(heads.change + 1) };
    assert_eq!(h.store.mark_read(chat(1), user(1), Seq(2), 1).await.unwrap(), Marked::Done(moved));
}

/// A report by a user whose membership check saw a members version below
/// the one a departure recorded since is refused in its write
/// ([`Reported::Stale`]) and stores nothing; one checked at the recorded
/// version or later is stored, and a repeat answers it whatever the
/// version.
async fn a_report_checked_before_a_departure_is_refused_in_its_write(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(1, 1, 0)]).await), [Some(1)]);
    h.store.record_departure(chat(1), 1).await.unwrap();
    assert_eq!(h.store.report(&report_of(1, 7, 1, 5_000), 0).await.unwrap(), Reported::Stale);
    let reports = || async {
        let queue = h.store.flagged(&QueueFilter::default(), None, 10).await.unwrap();
        queue.iter().map(|(_, reports)| reports.len()).sum::<usize>()
    };
    assert_eq!(reports().await, 0, "no report stored");
    let first = h.store.report(&report_of(1, 7, 1, 5_001), 1).await.unwrap();
    assert_eq!(first, Reported::Stored(report_of(1, 7, 1, 5_001)));
    assert_eq!(h.store.report(&report_of(1, 7, 1, 5_002), 0).await.unwrap(), first, "a repeat: the first");
}

/// PostgreSQL, two transactions by hand: a report whose insert reaches the
/// chat's heads while a departure from the chat is being recorded (its
/// transaction holds the heads row) waits for it, then reads the
/// committed members version and is refused. (A report takes no change
/// number: it reads the row under a share lock.)
async fn a_report_waiting_on_a_departure_being_recorded_is_refused_once_it_commits(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(1, 1, 0)]).await), [Some(1)]);
    let departure = sqlx::query(RECORD_DEPARTURE).bind(chat(1).to_string()).bind(1_i64);
    let report =
        |store: Arc<dyn MessageStore>| async move { store.report(&report_of(1, 7, 1, 5_000), 0).await.unwrap() };
    let Some(out) = write_behind(h, departure, report).await else { return };
    assert_eq!(out, Reported::Stale, "the report read the departure committed while it waited");
}

/// In a direct chat closed by a block, written after the closure was
/// recorded (whenever the membership was checked): an edit, a reaction
/// added and a pin are refused ([`Edited::Closed`], [`Reacted::Closed`],
/// [`Pinned::Closed`]) and change nothing; an edit to the text the message
/// has (a retry) is answered as it is, and taking a reaction or a pin back,
/// and deleting, go through. Reopened, the chat takes them again.
async fn a_closed_direct_chat_takes_no_edit_reaction_or_pin_written_after_its_closure(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(1, 1, 0), msg(2, 1, 0), msg(3, 1, 0)]).await), [Some(1), Some(2), Some(3)]);
    assert!(matches!(h.store.react(id(1), user(1), "👍", true, 1_500, 20, 0).await.unwrap(), Reacted::Changed(_)));
    assert!(matches!(h.store.pin(id(1), user(1), true, 1_501, 10, 0).await.unwrap(), Pinned::Changed(_)));
    h.store.close_direct_chat(chat(1), true, 1).await.unwrap();
    let heads = h.store.heads(chat(1)).await.unwrap();
    assert_eq!(h.store.edit(id(1), "changed", None, 2_000, 5, 0).await.unwrap(), Edited::Closed);
    assert_eq!(h.store.react(id(1), user(1), "🎉", true, 2_001, 20, 0).await.unwrap(), Reacted::Closed);
    assert_eq!(h.store.pin(id(2), user(1), true, 2_002, 10, 0).await.unwrap(), Pinned::Closed);
    assert_eq!(h.store.heads(chat(1)).await.unwrap(), heads, "no change number taken");
    let first = at(h, 1, 1).await;
    assert_eq!((first.text.as_str(), first.revision), ("text of 1", 1), "not edited");
    assert_eq!(h.store.revisions(&[id(1)]).await.unwrap(), [], "no revision kept");
    assert_eq!(h.store.reactions(&[id(1)], None).await.unwrap()[&id(1)].len(), 1, "no reaction added");
    assert_eq!(at(h, 1, 2).await.pin, None, "not pinned");

    assert!(matches!(h.store.edit(id(1), "text of 1", None, 2_003, 5, 0).await.unwrap(), Edited::Unchanged(_)));
    assert!(matches!(h.store.react(id(1), user(1), "👍", true, 2_004, 20, 0).await.unwrap(), Reacted::Unchanged(_)));
    assert!(matches!(h.store.react(id(1), user(1), "👍", false, 2_005, 20, 0).await.unwrap(), Reacted::Changed(_)));
    assert!(matches!(h.store.pin(id(1), user(1), false, 2_006, 10, 0).await.unwrap(), Pinned::Changed(_)));
    assert!(matches!(h.store.delete_with_replies(id(3), user(0), 2_007, 0).await.unwrap(), Deletion::Done(_)));

    h.store.close_direct_chat(chat(1), false, 2).await.unwrap();
    assert!(matches!(h.store.edit(id(1), "changed", None, 3_000, 5, 0).await.unwrap(), Edited::Done(_)));
    assert!(matches!(h.store.react(id(1), user(1), "🎉", true, 3_001, 20, 0).await.unwrap(), Reacted::Changed(_)));
    assert!(matches!(h.store.pin(id(2), user(1), true, 3_002, 10, 0).await.unwrap(), Pinned::Changed(_)));
}

/// In an archived chat, written after the archive was recorded (whenever
/// the membership was checked): a message, an edit, a reaction added and a
/// pin are refused ([`Sent::Archived`], [`Edited::Archived`],
/// [`Reacted::Archived`], [`Pinned::Archived`]), take no seq and no change
/// number and change nothing; an edit to the text the message has (a
/// retry) is answered as it is, and taking a reaction or a pin back,
/// deleting and a read move go through. A lower or equal version (late,
/// repeated) changes nothing; unarchived, the chat takes them again.
async fn an_archived_chat_takes_no_message_edit_reaction_or_pin_written_after_its_archive(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(1, 1, 0), msg(2, 1, 0), msg(3, 1, 0)]).await), [Some(1), Some(2), Some(3)]);
    assert!(matches!(h.store.react(id(1), user(1), "👍", true, 1_500, 20, 0).await.unwrap(), Reacted::Changed(_)));
    assert!(matches!(h.store.pin(id(1), user(1), true, 1_501, 10, 0).await.unwrap(), Pinned::Changed(_)));
    h.store.archive_chat(chat(1), true, 1).await.unwrap();
    let heads = h.store.heads(chat(1)).await.unwrap();
    let out = send(h, &[msg(4, 1, 0), msg(5, 2, 0)]).await;
    assert_eq!((&out[0], seqs(&out)[1]), (&Sent::Archived, Some(1)), "refused in the write; the other chat goes on");
    assert_eq!(send(h, &[msg(6, 1, 1), msg(7, 2, 1)]).await[0], Sent::Archived, "with replies");
    assert_eq!(send(h, &[mentioning(msg(8, 1, 0), &[1])]).await, [Sent::Archived], "with mentions");
    assert_eq!(send(h, &[in_thread(msg(9, 1, 0), 1)]).await, [Sent::Archived], "in a thread");
    assert_eq!(h.store.edit(id(1), "changed", None, 2_000, 5, 0).await.unwrap(), Edited::Archived);
    assert_eq!(h.store.react(id(1), user(1), "🎉", true, 2_001, 20, 0).await.unwrap(), Reacted::Archived);
    assert_eq!(h.store.pin(id(2), user(1), true, 2_002, 10, 0).await.unwrap(), Pinned::Archived);
    assert_eq!(h.store.heads(chat(1)).await.unwrap(), heads, "no seq, no change number taken");
    let first = at(h, 1, 1).await;
    assert_eq!((first.text.as_str(), first.revision), ("text of 1", 1), "not edited");
    assert_eq!(h.store.revisions(&[id(1)]).await.unwrap(), [], "no revision kept");
    assert_eq!(h.store.reactions(&[id(1)], None).await.unwrap()[&id(1)].len(), 1, "no reaction added");
    assert_eq!(at(h, 1, 2).await.pin, None, "not pinned");

    assert!(matches!(h.store.edit(id(1), "text of 1", None, 2_003, 5, 0).await.unwrap(), Edited::Unchanged(_)));
    assert!(matches!(h.store.react(id(1), user(1), "👍", false, 2_005, 20, 0).await.unwrap(), Reacted::Changed(_)));
    assert!(matches!(h.store.pin(id(1), user(1), false, 2_006, 10, 0).await.unwrap(), Pinned::Changed(_)));
    assert!(matches!(h.store.delete_with_replies(id(3), user(0), 2_007, 0).await.unwrap(), Deletion::Done(_)));
    assert_eq!(mark_read(h.store.as_ref(), chat(1), user(1), Seq(3)).await.unwrap().read_seq, Seq(3));

    h.store.archive_chat(chat(1), false, 1).await.unwrap();
    assert_eq!(send(h, &[msg(10, 1, 0)]).await, [Sent::Archived], "version 1 again: still archived");
    h.store.archive_chat(chat(1), false, 2).await.unwrap();
    assert_eq!(seqs(&send(h, &[msg(10, 1, 0)]).await), [Some(4)], "unarchived, no gap");
    assert!(matches!(h.store.edit(id(1), "changed", None, 3_000, 5, 0).await.unwrap(), Edited::Done(_)));
    assert!(matches!(h.store.react(id(1), user(1), "🎉", true, 3_001, 20, 0).await.unwrap(), Reacted::Changed(_)));
    assert!(matches!(h.store.pin(id(2), user(1), true, 3_002, 10, 0).await.unwrap(), Pinned::Changed(_)));
    h.store.archive_chat(chat(1), true, 1).await.unwrap();
    assert_eq!(seqs(&send(h, &[msg(11, 1, 0)]).await), [Some(5)], "a late archive undoes no unarchive");

    // A chat archived before its first message, and a departure's stale
    // refusal before the archive's (the sender is checked afresh first).
    h.store.archive_chat(chat(3), true, 1).await.unwrap();
    assert_eq!(send(h, &[msg(12, 3, 0)]).await, [Sent::Archived]);
    h.store.record_departure(chat(3), 1).await.unwrap();
    assert_eq!(send(h, &[msg(12, 3, 0)]).await, [Sent::Stale]);
    assert_eq!(h.store.heads(chat(3)).await.unwrap(), Heads::default());
}

/// PostgreSQL: a send whose write reaches the chat's heads while an
/// archive of the chat is being recorded (its transaction holds the heads
/// row) waits for it, then reads the committed archive and is refused.
async fn a_send_waiting_on_an_archive_being_recorded_is_refused_once_it_commits(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(30, 9, 0)]).await), [Some(1)]);
    let archive = sqlx::query(ARCHIVE_CHAT).bind(chat(9).to_string()).bind(true).bind(1_i64);
    let Some(out) = insert_behind(h, archive, vec![msg(31, 9, 0)]).await else { return };
    assert_eq!(out, [Sent::Archived], "the write read the archive committed while it waited");
    assert_eq!(h.store.head(chat(9)).await.unwrap(), Seq(1));
}

/// A resolve by an owner or admin checked before a departure or a loss of
/// rights (a lower members version) and written after it was recorded is
/// refused ([`Resolved::Stale`]) and resolves nothing; one checked at the
/// recorded version resolves, and staff (no version) compare nothing.
async fn a_resolve_checked_before_a_departure_or_demotion_is_refused_in_its_write(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(1, 1, 0), msg(2, 1, 0)]).await), [Some(1), Some(2)]);
    reported(h, &report_of(1, 7, 1, 5_000)).await;
    reported(h, &report_of(2, 7, 1, 5_001)).await;
    h.store.record_departure(chat(1), 1).await.unwrap();
    let resolve = |message, version| h.store.resolve_reports(id(message), chat(1), user(9), 6_000, version);
    assert_eq!(resolve(1, Some(0)).await.unwrap(), Resolved::Stale);
    let open = || async {
        let queue = h.store.flagged(&QueueFilter::default(), None, 10).await.unwrap();
        queue.iter().map(|(_, reports)| reports.len()).sum::<usize>()
    };
    assert_eq!(open().await, 2, "nothing resolved");
    assert_eq!(resolve(1, Some(1)).await.unwrap(), Resolved::Done(1), "checked after it");
    assert_eq!(resolve(2, None).await.unwrap(), Resolved::Done(1), "staff compare nothing");
    assert_eq!(resolve(2, Some(0)).await.unwrap(), Resolved::Stale, "refused, even with nothing left to resolve");
    assert_eq!(open().await, 0);
}

/// PostgreSQL: a resolve whose update reaches the chat's heads while a
/// departure (or a demotion) is being recorded waits for it, then reads
/// the committed members version and is refused.
async fn a_resolve_waiting_on_a_departure_being_recorded_is_refused_once_it_commits(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(1, 1, 0)]).await), [Some(1)]);
    reported(h, &report_of(1, 7, 1, 5_000)).await;
    let departure = sqlx::query(RECORD_DEPARTURE).bind(chat(1).to_string()).bind(1_i64);
    let resolve = |store: Arc<dyn MessageStore>| async move {
        store.resolve_reports(id(1), chat(1), user(9), 6_000, Some(0)).await.unwrap()
    };
    let Some(out) = write_behind(h, departure, resolve).await else { return };
    assert_eq!(out, Resolved::Stale, "the resolve read the departure committed while it waited");
}

/// A message naming a reply or a thread root in a purged (deleted) chat,
/// checked before the deletion, is refused as stale (checked afresh, the
/// chat is not found), not for its reply or its root, which the purge took
/// with the rest: the deleted chat answers first, as for a plain message.
async fn a_message_naming_a_reply_or_root_in_a_purged_chat_is_refused_as_stale(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(1, 1, 0), msg(2, 1, 0)]).await), [Some(1), Some(2)]);
    h.store.purge_chat(chat(1)).await.unwrap();
    let out = send(h, &[msg(3, 1, 1), msg(4, 2, 0)]).await;
    assert_eq!((&out[0], seqs(&out)[1]), (&Sent::Stale, Some(1)), "a reply; the other chat goes on");
    assert_eq!(send(h, &[in_thread(msg(5, 1, 0), 2)]).await, [Sent::Stale], "in a thread");
    assert_eq!(send(h, &[in_thread(msg(6, 1, 2), 2)]).await, [Sent::Stale], "both");
    assert_eq!(send(h, &[msg(7, 2, 9)]).await, [Sent::NoSuchReply], "a live chat's missing reply as before");
    assert_eq!(send(h, &[in_thread(msg(8, 2, 0), 9)]).await, [Sent::NoSuchThreadRoot]);
    assert!(stored(h, 1).await.is_empty(), "nothing stored in the deleted chat");
    assert_eq!(h.store.heads(chat(1)).await.unwrap(), Heads::default());
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
    let after = Range {
        after: Some(Seq(7)),
        ascending: true,
        before: None,
        superseded: false,
        flagged: false,
        pinned: false,
        timeline: Timeline::Everything,
    };
    assert_eq!(page(after, None, 10).await, [8, 9, 10]);
    let between = Range {
        after: Some(Seq(2)),
        before: Some(Seq(6)),
        ascending: false,
        superseded: false,
        flagged: false,
        pinned: false,
        timeline: Timeline::Everything,
    };
    assert_eq!(page(between, None, 10).await, [5, 4, 3]);
    assert_eq!(page(Range { ascending: true, ..between }, Some(3), 1).await, [4]);
    assert!(h.store.list(chat(2), desc, None, 10).await.unwrap().is_empty());
}

async fn unread_counts_skip_own_and_deleted_messages_up_to_the_cap(h: &Harness) {
    // User 1 has not read anything of chat 1: three by others, one of them
    // deleted later, and one of their own.
    send(h, &[by(msg(1, 1, 0), 2), by(msg(2, 1, 0), 1), by(msg(3, 1, 0), 2), by(msg(4, 1, 0), 3)]).await;
    h.store.delete(id(3), user(1), 5_000).await.unwrap();
    let summary = h.store.summaries(&[chat(1)], Some(user(1))).await.unwrap();
    assert_eq!(summary[0].unread, 2);
    // No one's counts: the preview alone (a public chat listed to someone
    // outside it).
    let anyone = h.store.summaries(&[chat(1)], None).await.unwrap();
    assert_eq!((anyone[0].unread, anyone[0].mentions), (0, 0));
    assert_eq!(anyone[0].newest.as_ref().map(|m| m.id), summary[0].newest.as_ref().map(|m| m.id));
    let state = mark_read(h.store.as_ref(), chat(1), user(1), Seq(1)).await.unwrap();
    assert_eq!(state, ReadState { read_seq: Seq(1), unread: 1, change_seq: Some(6) });
    assert_eq!(h.store.summaries(&[chat(1)], Some(user(1))).await.unwrap()[0].unread, 1);

    // Far behind: counted up to the cap.
    let many = UNREAD_COUNT_CAP as u32 + 5;
    let batch: Vec<NewMessage> = (0..many).map(|n| by(msg(100 + n, 2, 0), 2)).collect();
    send(h, &batch).await;
    assert_eq!(h.store.summaries(&[chat(2)], Some(user(1))).await.unwrap()[0].unread, UNREAD_COUNT_CAP);
    let state = mark_read(h.store.as_ref(), chat(2), user(1), Seq(3)).await.unwrap();
    assert_eq!(state, ReadState { read_seq: Seq(3), unread: UNREAD_COUNT_CAP, change_seq: Some(many as i64 + 1) });
    let state = mark_read(h.store.as_ref(), chat(2), user(1), Seq(i64::from(many) - 10)).await.unwrap();
    assert_eq!(state.unread, 10);
}

async fn edits_keep_revisions_up_to_the_cap(h: &Harness) {
    send(h, &[msg(1, 1, 0), msg(2, 1, 0)]).await;
    for (n, text) in ["second", "third"].into_iter().enumerate() {
        let Edited::Done(m) = h.store.edit(id(1), text, None, 2_000 + n as i64, 2, 0).await.unwrap() else {
            panic!("edit {n} refused")
        };
        assert_eq!((m.text.as_str(), m.revision, m.edit_time), (text, n as i64 + 2, Some(2_000 + n as i64)));
    }
    assert_eq!(h.store.edit(id(1), "fourth", None, 3_000, 2, 0).await.unwrap(), Edited::TooManyEdits);
    let now = h.store.message(id(1)).await.unwrap().unwrap();
    assert_eq!((now.text.as_str(), now.revision), ("third", 3));
    // The last edit retried (its answer was lost): the message as it is,
    // no revision, no change number, even at the cap.
    let heads = h.store.heads(chat(1)).await.unwrap();
    assert_eq!(h.store.edit(id(1), "third", None, 3_500, 2, 0).await.unwrap(), Edited::Unchanged(now.clone()));
    assert_eq!(h.store.heads(chat(1)).await.unwrap(), heads);

    let earlier = h.store.revisions_after(id(1), 0, 10).await.unwrap();
    let texts: Vec<(i64, &str, i64)> = earlier.iter().map(|r| (r.revision, r.text.as_str(), r.edit_time)).collect();
    assert_eq!(texts, [(1, "text of 1", 1_001), (2, "second", 2_000)]);
    let page: Vec<i64> = h.store.revisions_after(id(1), 1, 1).await.unwrap().iter().map(|r| r.revision).collect();
    assert_eq!(page, [2]);
    assert!(h.store.revisions_after(id(1), 2, 10).await.unwrap().is_empty());

    send(h, &[msg(3, 1, 0)]).await;
    h.store.edit(id(3), "edited", None, 4_000, 5, 0).await.unwrap();
    let all: Vec<(MessageId, i64)> =
        h.store.revisions(&[id(3), id(1), id(2)]).await.unwrap().iter().map(|r| (r.message_id, r.revision)).collect();
    assert_eq!(all, [(id(1), 1), (id(1), 2), (id(3), 1)]);
    assert!(h.store.revisions(&[]).await.unwrap().is_empty());
    assert_eq!(h.store.edit(id(42), "x", None, 1, 5, 0).await.unwrap(), Edited::Deleted, "no such message");
}

async fn a_delete_leaves_a_tombstone(h: &Harness) {
    let image =
        Attachment { url: "https://x/y".into(), mime_type: "image/png".into(), width: 1, height: 1, size_bytes: 1 };
    send(h, &[NewMessage { attachments: vec![image], ..msg(1, 1, 0) }, msg(2, 1, 0)]).await;
    h.store.edit(id(1), "edited", None, 2_000, 5, 0).await.unwrap();
    assert_eq!(h.store.message(id(1)).await.unwrap().unwrap().deleted_by, None);
    // Deleted by a moderator (user 2), not its author.
    let gone = h.store.delete(id(1), user(2), 3_000).await.unwrap().unwrap();
    assert_eq!((gone.seq, gone.text.as_str(), gone.attachments.len(), gone.delete_time), (Seq(1), "", 0, Some(3_000)));
    assert!(gone.deleted());
    assert_eq!(gone.deleted_by, Some(user(2)), "who deleted it is recorded");
    assert_eq!(h.store.message(id(1)).await.unwrap().unwrap().deleted_by, Some(user(2)));
    assert!(h.store.revisions_after(id(1), 0, 10).await.unwrap().is_empty(), "earlier revisions go too");
    assert_eq!(h.store.edit(id(1), "again", None, 4_000, 5, 0).await.unwrap(), Edited::Deleted);
    let again = h.store.delete(id(1), user(3), 5_000).await.unwrap().unwrap();
    assert_eq!((again.delete_time, again.deleted_by), (Some(3_000), Some(user(2))), "a tombstone stays as it is");
    assert_eq!(stored(h, 1).await, [(1, id(1)), (2, id(2))], "the seq stays");
    assert_eq!(h.store.delete(id(9), user(1), 1).await.unwrap(), None);
}

/// A join recorded late (the messages service was out of reach) puts its
/// member's read position where the chat was when the join was committed:
/// what was sent since stays unread.
/// Privacy audit M3: a reply restates its prompt, so deleting the prompt
/// deletes every assistant's reply to it (superseded ones and one still
/// GENERATING too), each a deletion of its own numbered before the
/// prompt's, in one call; nothing else goes, and nothing answers the
/// prompt afterwards.
async fn deleting_a_prompt_deletes_its_replies_first_and_a_deleted_prompt_gets_none(h: &Harness) {
    // seq 1 the prompt; 2 its first reply (replaced by 3, still writing);
    // 4 a person quoting the prompt; 5 another prompt and 6 its reply.
    send(h, &[by(msg(1, 1, 0), 1)]).await;
    let info = GenerationInfo::default();
    let (first, _) = created(h.store.start_reply(&reply(2, 1, 1, None)).await.unwrap());
    h.store.finish_reply(first.id, &fin("the prompt, restated", Generation::Complete, &info, false)).await.unwrap();
    let (second, _) = created(h.store.start_reply(&reply(3, 1, 1, Some(2))).await.unwrap());
    h.store.checkpoint_reply(second.id, Some("so far"), 6_000).await.unwrap();
    send(h, &[by(msg(4, 1, 1), 2), by(msg(5, 1, 0), 1)]).await;
    let done =
        NewReply { finished: Some((Generation::Complete, "other".into(), info.clone())), ..reply(6, 1, 5, None) };
    created(h.store.start_reply(&done).await.unwrap());
    let listed = |prompt: i64| async move {
        let replies = h.store.replies(chat(1), Seq(prompt)).await.unwrap();
        replies.iter().map(|m| (m.id, m.deleted())).collect::<Vec<_>>()
    };
    assert_eq!(listed(1).await, [(id(2), false), (id(3), false)], "superseded ones too, in seq order");
    assert!(listed(4).await.is_empty(), "a person's message is no reply");
    let before = h.store.heads(chat(1)).await.unwrap().change;

    let deleted = delete_with_replies(h, id(1), user(1), 9_000).await.unwrap();
    let replies: Vec<(MessageId, bool, &str, i64)> =
        deleted.replies.iter().map(|m| (m.id, m.deleted(), m.text.as_str(), m.change_seq)).collect();
    assert_eq!(replies, [(id(2), true, "", before + 1), (id(3), true, "", before + 2)], "replies first");
    assert!(deleted.replies.iter().all(|m| m.deleted_by == Some(user(1))), "deleted by the prompt's deleter");
    assert_eq!((deleted.message.id, deleted.message.deleted(), deleted.message.change_seq), (id(1), true, before + 3));
    let stopped = h.store.message(id(3)).await.unwrap().unwrap();
    assert_eq!((stopped.generation(), stopped.text.as_str()), (Some(Generation::Stopped), ""), "stops generating");
    assert_eq!(h.store.checkpoint_reply(id(3), Some("more"), 9_100).await.unwrap(), None);
    assert_eq!(listed(1).await, [(id(2), true), (id(3), true)]);
    // A resumed stream sees three deletions, nothing else.
    let (page, _) = h.store.changes(chat(1), user(1), before, 100).await.unwrap();
    assert_eq!(numbers(&page), [before + 1, before + 2, before + 3]);
    // The quote, the other prompt and its reply stay.
    for n in [4, 5, 6] {
        assert!(!h.store.message(id(n)).await.unwrap().unwrap().deleted(), "{n} stays");
    }
    // Nothing answers a deleted prompt.
    assert_eq!(h.store.start_reply(&reply(7, 1, 1, None)).await.unwrap(), Started::PromptDeleted);
    let refusal =
        NewReply { finished: Some((Generation::Failed, String::new(), info.clone())), ..reply(7, 1, 1, None) };
    assert_eq!(h.store.start_reply(&refusal).await.unwrap(), Started::PromptDeleted);
    // Again (a client's retry): nothing more.
    let again = delete_with_replies(h, id(1), user(1), 9_500).await.unwrap();
    assert_eq!((again.message, again.replies), (deleted.message, Vec::new()));
    assert_eq!(h.store.heads(chat(1)).await.unwrap().change, before + 3);
    // Deleting a reply leaves its prompt.
    assert!(delete_with_replies(h, id(6), user(1), 9_600).await.unwrap().replies.is_empty());
    assert!(!h.store.message(id(5)).await.unwrap().unwrap().deleted());
    // A prompt deleted before replies went with it: deleting it again
    // takes its live replies now.
    send(h, &[by(msg(8, 1, 0), 1)]).await;
    let old = NewReply { finished: Some((Generation::Complete, "kept".into(), info.clone())), ..reply(9, 1, 8, None) };
    created(h.store.start_reply(&old).await.unwrap());
    h.execute(&format!("UPDATE messages SET text = '', delete_time = 1 WHERE id = '{}'", id(8))).await;
    let late = delete_with_replies(h, id(8), user(1), 9_700).await.unwrap();
    assert_eq!(late.replies.iter().map(|m| (m.id, m.deleted())).collect::<Vec<_>>(), [(id(9), true)]);
    assert_eq!(h.store.delete_with_replies(id(99), user(1), 1, 0).await.unwrap(), Deletion::NotFound);
}

async fn a_join_recorded_late_leaves_what_was_sent_since_unread(h: &Harness) {
    // Sent at 1,001 to 1,005.
    let batch: Vec<NewMessage> = (1..=5).map(|n| msg(n, 1, 0)).collect();
    send(h, &batch).await;
    let late = h.store.record_chat_changes(chat(1), &[ChatChange::Joined(user(7))], 1_003, "late").await.unwrap();
    assert_eq!(late[0].read.map(|(_, seq)| seq), Some(Seq(3)));
    assert_eq!(late[0].seq, Seq(3), "the join's seq: the chat's newest when it was committed");
    assert_eq!(h.store.summaries(&[chat(1)], Some(user(7))).await.unwrap()[0].unread, 2);
    let again = h.store.record_chat_changes(chat(1), &[ChatChange::Joined(user(7))], 9_999, "late").await.unwrap();
    assert_eq!(again, late, "a retry answers what the call took");
    // Before the first message: everything is unread.
    h.store.record_chat_changes(chat(1), &[ChatChange::Joined(user(8))], 1_000, "").await.unwrap();
    assert_eq!(h.store.summaries(&[chat(1)], Some(user(8))).await.unwrap()[0].unread, 5);
    // Read while the join was on its way: the join does not move it back.
    mark_read(h.store.as_ref(), chat(1), user(9), Seq(4)).await.unwrap();
    let joined = h.store.record_chat_changes(chat(1), &[ChatChange::Joined(user(9))], 1_002, "").await.unwrap();
    assert_eq!(joined[0].read.map(|(_, seq)| seq), Some(Seq(4)));
    assert_eq!(h.store.summaries(&[chat(1)], Some(user(9))).await.unwrap()[0].unread, 1);
}

async fn read_positions_only_move_forward_until_a_join_resets_them(h: &Harness) {
    let batch: Vec<NewMessage> = (1..=5).map(|n| by(msg(n, 1, 0), 2)).collect();
    send(h, &batch).await;
    let mark = |seq: i64| async move { mark_read(h.store.as_ref(), chat(1), user(1), Seq(seq)).await.unwrap() };
    // Sends took change numbers 1..=5; a move takes the next, a call that
    // moves nothing takes none.
    assert_eq!(mark(3).await, ReadState { read_seq: Seq(3), unread: 2, change_seq: Some(6) });
    assert_eq!(mark(2).await, ReadState { read_seq: Seq(3), unread: 2, change_seq: None }, "never back");
    assert_eq!(mark(100).await, ReadState { read_seq: Seq(5), unread: 0, change_seq: Some(7) }, "clamped");
    assert_eq!(mark(100).await.change_seq, None);
    assert_eq!(
        mark_read(h.store.as_ref(), chat(9), user(1), Seq(4)).await.unwrap(),
        ReadState { read_seq: Seq::ZERO, unread: 0, change_seq: None },
        "a chat without messages"
    );
    // A join sets the joiner's position to the newest seq, even backwards,
    // by the number after the join's.
    assert_eq!(mark_read(h.store.as_ref(), chat(1), user(2), Seq(1)).await.unwrap().change_seq, Some(8));
    send(h, &[by(msg(6, 1, 0), 3)]).await;
    let logged = h
        .store
        .record_chat_changes(chat(1), &[ChatChange::Joined(user(2)), ChatChange::Joined(user(3))], 7_000, "")
        .await
        .unwrap();
    assert_eq!(
        logged,
        [
            Logged { change_seq: 10, read: Some((11, Seq(6))), seq: Seq(6) },
            Logged { change_seq: 12, read: Some((13, Seq(6))), seq: Seq(6) },
        ]
    );
    for u in [2, 3] {
        assert_eq!(h.store.summaries(&[chat(1)], Some(user(u))).await.unwrap()[0].unread, 0);
        assert_eq!(mark_read(h.store.as_ref(), chat(1), user(u), Seq::ZERO).await.unwrap().read_seq, Seq(6));
    }
    assert_eq!(h.store.summaries(&[chat(1)], Some(user(1))).await.unwrap()[0].unread, 1, "others keep theirs");
    assert_eq!(h.store.heads(chat(1)).await.unwrap(), Heads { seq: Seq(6), change: 13, floor: 0 });
    // Where a stream that missed a join replays from (the latest join),
    // and up to where one that finds its user gone does (the departure).
    let latest = |u| h.store.latest_membership(chat(1), user(u));
    assert_eq!(latest(3).await.unwrap(), Some(Membership::Joined(12)));
    h.store.record_chat_changes(chat(1), &[ChatChange::RoleChanged(user(3))], 8_000, "").await.unwrap();
    assert_eq!(latest(3).await.unwrap(), Some(Membership::Joined(12)), "a role change is no join");
    let left = h.store.record_chat_changes(chat(1), &[ChatChange::Left(user(3))], 8_000, "").await.unwrap();
    assert_eq!(latest(3).await.unwrap(), Some(Membership::Departed(left[0].change_seq)), "left since");
    let removed = h.store.record_chat_changes(chat(1), &[ChatChange::Removed(user(2))], 8_000, "").await.unwrap();
    assert_eq!(latest(2).await.unwrap(), Some(Membership::Departed(removed[0].change_seq)));
    let again = h.store.record_chat_changes(chat(1), &[ChatChange::Joined(user(3))], 9_000, "").await.unwrap();
    assert_eq!(latest(3).await.unwrap(), Some(Membership::Joined(again[0].change_seq)));
    assert_eq!(latest(1).await.unwrap(), None, "never logged");
    assert_eq!(h.store.latest_membership(chat(9), user(3)).await.unwrap(), None);
}

fn details(title: &str) -> ChatDetails {
    ChatDetails { fields: vec!["title".into()], title: title.into(), update_time: 9_000, ..ChatDetails::default() }
}

/// A title and description set, then the chat archived, renamed,
/// described anew and unarchived (the last two in one call): the log keeps
/// every entry, each with its number, fields, flags and time, and only the
/// current title and description. Entries an earlier release logged with
/// the replaced text are rewritten by the one-off backfill.
async fn replaced_chat_details_are_neither_kept_nor_replayed(h: &Harness) {
    let first = ChatDetails {
        fields: vec!["title".into(), "description".into()],
        title: "door code 4711".into(),
        description: "meet at nine".into(),
        update_time: 1,
        ..ChatDetails::default()
    };
    let archived = ChatDetails { fields: vec!["archived".into()], archived: true, update_time: 2, ..first.clone() };
    let renamed =
        ChatDetails { fields: vec!["title".into()], title: "team".into(), update_time: 3, ..archived.clone() };
    let described = ChatDetails {
        fields: vec!["description".into(), "archived".into()],
        description: "weekly".into(),
        archived: false,
        update_time: 4,
        ..renamed.clone()
    };
    let record = |changes: Vec<ChatChange>| async move {
        numbers_of(&h.store.record_chat_changes(chat(1), &changes, 1_000, "").await.unwrap())
    };
    assert_eq!(record(vec![ChatChange::Updated(first.clone())]).await, [1]);
    // The title is still the current one: a replay shows it until replaced.
    let (page, _) = h.store.changes(chat(1), user(1), 0, 100).await.unwrap();
    assert!(format!("{page:?}").contains("door code 4711"));
    assert_eq!(record(vec![ChatChange::Updated(archived.clone()), ChatChange::RoleChanged(user(2))]).await, [2, 3]);
    let both = vec![ChatChange::Updated(renamed.clone()), ChatChange::Updated(described.clone())];
    assert_eq!(record(both).await, [4, 5]);

    let now = |d: &ChatDetails| ChatDetails { title: "team".into(), description: "weekly".into(), ..d.clone() };
    let expected = |change_seq: i64, change: ChatChange| Change::Chat { change_seq, change, seq: Seq(0), time: 1_000 };
    let replayed = vec![
        expected(1, ChatChange::Updated(now(&first))),
        expected(2, ChatChange::Updated(now(&archived))),
        expected(3, ChatChange::RoleChanged(user(2))),
        expected(4, ChatChange::Updated(now(&renamed))),
        expected(5, ChatChange::Updated(described.clone())),
    ];
    let (page, more) = h.store.changes(chat(1), user(1), 0, 100).await.unwrap();
    assert_eq!((&page, more), (&replayed, false));
    let shown = format!("{page:?}");
    assert!(!shown.contains("door code") && !shown.contains("meet at nine"), "{shown}");

    // An entry as logged before: the store's opening rewrote every chat's
    // once (recorded), and the rewrite finds it.
    assert!(h.store.backfilled(CHAT_DETAILS_BACKFILL).await.unwrap());
    let legacy = serde_json::to_string(&first).unwrap();
    h.execute(&format!(
        "UPDATE chat_changes SET details = '{legacy}' WHERE chat_id = '{}' AND change_seq = 1",
        chat(1)
    ))
    .await;
    let (page, _) = h.store.changes(chat(1), user(1), 0, 100).await.unwrap();
    assert!(format!("{page:?}").contains("door code 4711"), "the entry as an earlier release left it");
    assert_eq!(h.store.scrub_chat_details().await.unwrap(), 1, "one chat rewritten");
    assert_eq!(h.store.changes(chat(1), user(1), 0, 100).await.unwrap(), (replayed, false));
    assert_eq!(h.store.scrub_chat_details().await.unwrap(), 0, "nothing left");
}

/// The change numbers of a page of changes.
fn numbers(page: &[Change]) -> Vec<i64> {
    page.iter().map(Change::change_seq).collect()
}

async fn every_change_takes_the_next_change_number(h: &Harness) {
    assert_eq!(h.store.heads(chat(1)).await.unwrap(), Heads::default());
    send(h, &[by(msg(1, 1, 0), 2), by(msg(2, 1, 0), 2)]).await;
    let Edited::Done(edited) = h.store.edit(id(1), "edited", None, 2_000, 5, 0).await.unwrap() else {
        panic!("edit refused")
    };
    assert_eq!((edited.change_seq, edited.create_change), (3, 1));
    let deleted = h.store.delete(id(2), user(1), 3_000).await.unwrap().unwrap();
    assert_eq!((deleted.change_seq, deleted.create_change), (4, 2));
    assert_eq!(h.store.delete(id(2), user(1), 3_500).await.unwrap().unwrap().change_seq, 4, "a tombstone takes none");
    assert_eq!(h.store.edit(id(2), "x", None, 3_600, 5, 0).await.unwrap(), Edited::Deleted);
    assert_eq!(mark_read(h.store.as_ref(), chat(1), user(1), Seq(2)).await.unwrap().change_seq, Some(5));
    let logged = h
        .store
        .record_chat_changes(chat(1), &[ChatChange::Updated(details("new")), ChatChange::Left(user(3))], 4_000, "")
        .await
        .unwrap();
    assert_eq!(numbers_of(&logged), [6, 7]);
    assert_eq!(logged[1], Logged { change_seq: 7, read: None, seq: Seq(2) });
    let Sent::Created(third) = &send(h, &[msg(3, 1, 0)]).await[0] else { panic!("not created") };
    assert_eq!((third.seq, third.change_seq, third.create_change), (Seq(3), 8, 8));
    assert_eq!(h.store.heads(chat(1)).await.unwrap(), Heads { seq: Seq(3), change: 8, floor: 0 });

    // Replay: each message once at its latest change, the reader's own
    // position, the log's entries; in change order.
    let (page, more) = h.store.changes(chat(1), user(1), 0, 100).await.unwrap();
    assert_eq!((numbers(&page), more), (vec![3, 4, 5, 6, 7, 8], false));
    assert!(matches!(&page[0], Change::Message(m) if m.id == id(1) && m.text == "edited"));
    assert!(matches!(&page[1], Change::Message(m) if m.id == id(2) && m.deleted()));
    assert_eq!(page[2], Change::Read { change_seq: 5, user: user(1), read_seq: Seq(2) });
    assert_eq!(
        page[3],
        Change::Chat { change_seq: 6, change: ChatChange::Updated(details("new")), seq: Seq(2), time: 4_000 }
    );
    assert_eq!(page[4], Change::Chat { change_seq: 7, change: ChatChange::Left(user(3)), seq: Seq(2), time: 4_000 });
    let (others, _) = h.store.changes(chat(1), user(2), 0, 100).await.unwrap();
    assert_eq!(numbers(&others), [3, 4, 6, 7, 8], "another reader's position is not theirs to replay");
    // Pages of two walk it all without gaps.
    let (mut after, mut walked) = (0, Vec::new());
    loop {
        let (page, more) = h.store.changes(chat(1), user(1), after, 2).await.unwrap();
        assert!(page.len() <= 2);
        walked.extend(numbers(&page));
        after = walked.last().copied().unwrap_or(after);
        if !more {
            break;
        }
    }
    assert_eq!(walked, [3, 4, 5, 6, 7, 8]);
    assert_eq!(h.store.changes(chat(1), user(1), 8, 100).await.unwrap(), (Vec::new(), false));
    // From every resume point (and one below any): exactly what follows it.
    for after in -1..=9 {
        let (page, _) = h.store.changes(chat(1), user(1), after, 100).await.unwrap();
        let expected: Vec<i64> = [3, 4, 5, 6, 7, 8].into_iter().filter(|n| *n > after).collect();
        assert_eq!(numbers(&page), expected, "after {after}");
    }
}

fn numbers_of(logged: &[Logged]) -> Vec<i64> {
    logged.iter().map(|l| l.change_seq).collect()
}

/// Sends, edits, deletes, read moves and logged changes of one chat from
/// concurrent tasks: every number from 1 to the head is taken exactly once.
async fn concurrent_changes_take_gap_free_numbers(h: &Harness) {
    const TASKS: u8 = 6;
    const ROUNDS: u32 = 8;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = h.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut taken = Vec::new();
            for r in 0..ROUNDS {
                let n = u32::from(t) * 1_000 + r;
                let out = store.insert_batch(&[by(msg(n, 1, 0), t)]).await.unwrap();
                let Sent::Created(m) = &out[0] else { panic!("not created: {out:?}") };
                taken.push(m.change_seq);
                match r % 4 {
                    0 => match store.edit(id(n), "edited", None, 5_000, 10, 0).await.unwrap() {
                        Edited::Done(m) => taken.push(m.change_seq),
                        other => panic!("edit: {other:?}"),
                    },
                    1 => taken.push(store.delete(id(n), user(1), 5_000).await.unwrap().unwrap().change_seq),
                    2 => taken.extend(mark_read(store.as_ref(), chat(1), user(t), m.seq).await.unwrap().change_seq),
                    _ => {
                        let changes = [ChatChange::Joined(user(100 + t)), ChatChange::RoleChanged(user(t))];
                        for l in store.record_chat_changes(chat(1), &changes, 5_000, "").await.unwrap() {
                            taken.push(l.change_seq);
                            taken.extend(l.read.map(|(n, _)| n));
                        }
                    }
                }
            }
            taken
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    let head = h.store.heads(chat(1)).await.unwrap().change;
    assert_eq!(all, (1..=head).collect::<Vec<_>>(), "each number once, none skipped");
}

async fn the_log_keeps_its_newest_entries_and_raises_the_floor(h: &Harness) {
    let role = |n: usize| vec![ChatChange::RoleChanged(user(1)); n];
    h.store.record_chat_changes(chat(1), &role(CHAT_LOG_KEEP as usize), 1_000, "").await.unwrap();
    assert_eq!(h.store.heads(chat(1)).await.unwrap().floor, 0, "a full log prunes nothing yet");
    h.store.record_chat_changes(chat(1), &role(5), 2_000, "").await.unwrap();
    send(h, &[msg(1, 1, 0)]).await;
    let heads = h.store.heads(chat(1)).await.unwrap();
    assert_eq!(heads, Heads { seq: Seq(1), change: CHAT_LOG_KEEP + 6, floor: 5 });
    let (page, _) = h.store.changes(chat(1), user(1), 0, 3).await.unwrap();
    assert_eq!(numbers(&page), [6, 7, 8], "entries up to the floor are gone");
    assert!(h.store.heads(chat(2)).await.unwrap().floor == 0, "other chats keep theirs");
}

async fn a_retried_origin_records_nothing_twice(h: &Harness) {
    send(h, &[msg(1, 1, 0)]).await;
    let changes = [ChatChange::Joined(user(1)), ChatChange::Updated(details("t"))];
    // Committed after the message (sent at 1,001).
    let first = h.store.record_chat_changes(chat(1), &changes, 1_500, "outbox-1").await.unwrap();
    assert_eq!(
        first,
        [
            Logged { change_seq: 2, read: Some((3, Seq(1))), seq: Seq(1) },
            Logged { change_seq: 4, read: None, seq: Seq(1) }
        ]
    );
    let retry = h.store.record_chat_changes(chat(1), &changes, 2_000, "outbox-1").await.unwrap();
    assert_eq!(retry, first, "the first call's answer");
    assert_eq!(h.store.heads(chat(1)).await.unwrap().change, 4);
    let (page, _) = h.store.changes(chat(1), user(1), 1, 100).await.unwrap();
    assert_eq!(numbers(&page), [2, 3, 4]);
    // Another key (or none) records again; the same key in another chat is
    // another call. A user joining twice in one call keeps the last join's
    // read position.
    let again = [ChatChange::Joined(user(2)), ChatChange::Left(user(2)), ChatChange::Joined(user(2))];
    let other = h.store.record_chat_changes(chat(1), &again, 3_000, "outbox-2").await.unwrap();
    assert_eq!(numbers_of(&other), [5, 7, 8]);
    let (page, _) = h.store.changes(chat(1), user(2), 8, 100).await.unwrap();
    assert_eq!(page, [Change::Read { change_seq: 9, user: user(2), read_seq: Seq(1) }]);
    let elsewhere = h.store.record_chat_changes(chat(2), &changes, 3_000, "outbox-1").await.unwrap();
    assert_eq!(numbers_of(&elsewhere), [1, 3]);
}

async fn summaries_follow_the_requested_order(h: &Harness) {
    send(h, &[by(msg(1, 1, 0), 2), by(msg(2, 2, 0), 2), by(msg(3, 1, 0), 2)]).await;
    let out = h.store.summaries(&[chat(2), chat(3), chat(1)], Some(user(1))).await.unwrap();
    let newest: Vec<Option<(MessageId, i64)>> =
        out.iter().map(|s| s.newest.as_ref().map(|m| (m.id, m.seq.0))).collect();
    assert_eq!(newest, [Some((id(2), 1)), None, Some((id(3), 2))]);
    assert_eq!(out.iter().map(|s| s.unread).collect::<Vec<_>>(), [1, 0, 2]);
    assert_eq!(out[2].newest.as_ref().unwrap().text, "text of 3");
    assert!(h.store.summaries(&[], Some(user(1))).await.unwrap().is_empty());
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
    h.store.edit(id(1), "edited", None, 2_000, 5, 0).await.unwrap();
    mark_read(h.store.as_ref(), chat(1), user(1), Seq(1)).await.unwrap();
    h.store.record_chat_changes(chat(1), &[ChatChange::Joined(user(4))], 2_500, "k").await.unwrap();
    h.store.react(id(2), user(1), "👍", true, 2_600, 20, 0).await.unwrap();
    send(h, &[mentioning(msg(5, 1, 0), &[1])]).await;
    h.store.purge_chat(chat(1)).await.unwrap();
    assert!(h.store.reactions(&[id(2)], None).await.unwrap().is_empty(), "reactions go too");
    assert_eq!(h.store.head(chat(1)).await.unwrap(), Seq::ZERO);
    assert_eq!(h.store.heads(chat(1)).await.unwrap(), Heads::default());
    assert_eq!(h.store.changes(chat(1), user(4), 0, 10).await.unwrap(), (Vec::new(), false));
    assert!(stored(h, 1).await.is_empty());
    assert_eq!(h.store.message(id(1)).await.unwrap(), None);
    assert!(h.store.revisions(&[id(1)]).await.unwrap().is_empty());
    assert_eq!(
        h.store.summaries(&[chat(1)], Some(user(1))).await.unwrap()[0],
        Summary { newest: None, unread: 0, mentions: 0, message_count: 0, max_severity: 0 }
    );
    assert_eq!(stored(h, 2).await, [(1, id(3))], "other chats stay");
    assert_eq!(mention_counts(h, 1, &[1]).await, [0], "mentions go too");
}

/// A message whose membership check passed before its chat was deleted
/// and whose write comes after the purge is refused in the write
/// ([`Sent::Stale`]: checked again, the chat is not found), whatever
/// version its check saw, whatever the batch's path, and takes no seq: a
/// purged chat never starts over from seq 1 with a message nobody can
/// read. A departure recorded late does not reopen it, nor does a repeated
/// purge; a chat purged before any message is closed all the same; other
/// chats of the batch go on.
async fn a_purged_chat_takes_no_message_written_after_its_purge(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(60, 14, 0), msg(61, 14, 0)]).await), [Some(1), Some(2)]);
    h.store.purge_chat(chat(14)).await.unwrap();
    assert_eq!(h.store.heads(chat(14)).await.unwrap(), Heads::default(), "read as a chat with nothing");

    let out = send(h, &[checked_at(msg(62, 14, 0), 7), msg(63, 15, 0)]).await;
    assert_eq!((&out[0], seqs(&out)[1]), (&Sent::Stale, Some(1)), "refused in the write; the other chat goes on");
    assert_eq!(send(h, &[mentioning(checked_at(msg(64, 14, 0), 7), &[1])]).await, [Sent::Stale], "with mentions");
    assert_eq!(send(h, &[msg(61, 14, 0)]).await, [Sent::Stale], "a retry of a purged message");
    h.store.record_departure(chat(14), 9).await.unwrap();
    assert_eq!(send(h, &[checked_at(msg(65, 14, 0), 9)]).await, [Sent::Stale], "a late departure reopens nothing");
    h.store.purge_chat(chat(14)).await.unwrap();
    assert_eq!(send(h, &[checked_at(msg(66, 14, 0), i64::MAX - 1)]).await, [Sent::Stale], "purged again");
    assert!(stored(h, 14).await.is_empty(), "nothing stored in the deleted chat");
    assert_eq!(h.store.heads(chat(14)).await.unwrap(), Heads::default(), "no seq, no change number taken");
    assert_eq!(mention_counts(h, 14, &[1]).await, [0]);

    h.store.purge_chat(chat(16)).await.unwrap();
    assert_eq!(send(h, &[msg(67, 16, 0)]).await, [Sent::Stale], "purged before its first message");
    assert!(stored(h, 16).await.is_empty());
}

/// An edit, a reaction or a pin whose check passed before its chat was
/// deleted and whose write comes after the purge finds no message: nothing
/// is written, no change number taken.
async fn a_purged_chat_takes_no_edit_reaction_or_pin(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(70, 17, 0)]).await), [Some(1)]);
    h.store.purge_chat(chat(17)).await.unwrap();
    assert_eq!(h.store.edit(id(70), "changed", None, 2_000, 5, 0).await.unwrap(), Edited::Deleted);
    assert_eq!(h.store.react(id(70), user(1), "👍", true, 2_001, 20, 0).await.unwrap(), Reacted::Gone);
    assert_eq!(h.store.pin(id(70), user(1), true, 2_002, 10, 0).await.unwrap(), Pinned::Gone);
    assert_eq!(h.store.message(id(70)).await.unwrap(), None);
    assert_eq!(h.store.heads(chat(17)).await.unwrap(), Heads::default(), "no change number taken");
}

/// PostgreSQL, a purge's statements by hand: a message whose send
/// committed after the purge's first pass read the chat (its write took
/// the heads row before the purge did) goes with the chat all the same.
async fn a_message_sent_while_a_purge_reads_the_chat_goes_with_it(h: &Harness) {
    use sqlx::{Connection as _, Executor as _};
    let Cleanup::Schema { url, schema } = &h.cleanup else { return };
    assert_eq!(seqs(&send(h, &[msg(90, 19, 0)]).await), [Some(1)]);
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    conn.execute(sqlx::AssertSqlSafe(format!("SET search_path TO {schema}"))).await.unwrap();
    let mut purge = conn.begin().await.unwrap();
    for sql in super::postgres::PURGE_ROWS {
        sqlx::query(sql).bind(chat(19).to_string()).execute(&mut *purge).await.unwrap();
    }
    assert_eq!(seqs(&send(h, &[msg(91, 19, 0)]).await), [Some(2)], "committed after the first pass");
    for sql in std::iter::once(PURGE_HEADS).chain(super::postgres::PURGE_ROWS) {
        sqlx::query(sql).bind(chat(19).to_string()).execute(&mut *purge).await.unwrap();
    }
    purge.commit().await.unwrap();
    assert!(stored(h, 19).await.is_empty(), "the second pass took it");
    assert_eq!(send(h, &[msg(92, 19, 0)]).await, [Sent::Stale]);
}

/// PostgreSQL, two transactions by hand: a send whose write reaches the
/// chat's heads while its chat's purge is being committed (its transaction
/// holds the heads row) waits for it, then reads the purge's mark and is
/// refused: nothing is stored in the purged chat.
async fn a_send_waiting_on_a_purge_is_refused_once_it_commits(h: &Harness) {
    assert_eq!(seqs(&send(h, &[msg(80, 18, 0)]).await), [Some(1)]);
    let purge = sqlx::query(PURGE_HEADS).bind(chat(18).to_string());
    let Some(out) = insert_behind(h, purge, vec![msg(81, 18, 0)]).await else { return };
    assert_eq!(out, [Sent::Stale], "the write read the purge committed while it waited");
    assert_eq!(h.store.head(chat(18)).await.unwrap(), Seq::ZERO);
}

async fn mentions_are_kept_with_the_message_and_count_only_unread_live_mentions_of_others(h: &Harness) {
    // One batch, mentions and none mixed, two chats: user 0 mentions 1, 2
    // and itself; 1 mentions itself and 2; 0 mentions 1 again; a message
    // with none; and a mention of 1 in chat 2.
    let out = send(
        h,
        &[
            mentioning(msg(1, 1, 0), &[1, 2, 0]),
            mentioning(by(msg(2, 1, 0), 1), &[1, 2]),
            mentioning(msg(3, 2, 0), &[1]),
            mentioning(msg(4, 1, 0), &[1]),
            msg(5, 1, 0),
        ],
    )
    .await;
    assert_eq!(seqs(&out), [Some(1), Some(2), Some(1), Some(3), Some(4)]);
    let Sent::Created(first) = &out[0] else { panic!("{out:?}") };
    assert_eq!(first.mentions, [user(1), user(2), user(0)], "as sent, the author's own too");
    // Read back with the row, as sent: by id, in pages, in summaries.
    assert_eq!(h.store.message(id(1)).await.unwrap().unwrap().mentions, [user(1), user(2), user(0)]);
    let page = h.store.list(chat(1), Range { ascending: true, ..Range::default() }, None, 10).await.unwrap();
    let mentions: Vec<Vec<UserId>> = page.iter().map(|m| m.mentions.clone()).collect();
    assert_eq!(mentions, [vec![user(1), user(2), user(0)], vec![user(1), user(2)], vec![user(1)], vec![]]);
    assert_eq!(h.store.summaries(&[chat(1)], Some(user(1))).await.unwrap()[0].newest.as_ref().unwrap().mentions, []);

    // Counted: others' messages after the read position. User 0's own
    // mention of itself never counts, nor 1's of itself.
    assert_eq!(mention_counts(h, 1, &[0, 1, 2, 3]).await, [0, 2, 2, 0]);
    assert_eq!(mention_counts(h, 2, &[1, 2]).await, [1, 0], "per chat");
    let summary = &h.store.summaries(&[chat(1)], Some(user(1))).await.unwrap()[0];
    assert_eq!((summary.unread, summary.mentions), (3, 2), "never more than the unread count");

    // A retry of a message id writes nothing, mentions included.
    assert_eq!(seqs(&send(h, &[mentioning(msg(1, 1, 0), &[3])]).await), [None]);
    assert_eq!(mention_counts(h, 1, &[3]).await, [0]);

    // An edit keeps the mentions; a delete drops them, and they stop
    // counting.
    let Edited::Done(edited) = h.store.edit(id(4), "no names now", None, 3_000, 5, 0).await.unwrap() else {
        panic!("not edited")
    };
    assert_eq!(edited.mentions, [user(1)]);
    assert_eq!(mention_counts(h, 1, &[1]).await, [2]);
    let tombstone = h.store.delete(id(4), user(1), 4_000).await.unwrap().unwrap();
    assert_eq!(tombstone.mentions, []);
    assert_eq!(h.store.message(id(4)).await.unwrap().unwrap().mentions, []);
    assert_eq!(mention_counts(h, 1, &[0, 1, 2]).await, [0, 1, 2]);

    // Reading moves them out of the count like unread messages.
    mark_read(h.store.as_ref(), chat(1), user(2), Seq(1)).await.unwrap();
    assert_eq!(mention_counts(h, 1, &[1, 2]).await, [1, 1], "only 2's own position moved");
    mark_read(h.store.as_ref(), chat(1), user(1), Seq(4)).await.unwrap();
    mark_read(h.store.as_ref(), chat(1), user(2), Seq(2)).await.unwrap();
    assert_eq!(mention_counts(h, 1, &[1, 2]).await, [0, 0]);
    // A join resets the joiner's position to the newest seq: history from
    // before never counts.
    send(h, &[mentioning(msg(6, 1, 0), &[3])]).await;
    h.store.record_chat_changes(chat(1), &[ChatChange::Joined(user(3))], 5_000, "").await.unwrap();
    assert_eq!(mention_counts(h, 1, &[3]).await, [0]);

    // Far behind: counted up to the cap, as unread messages are.
    let many = UNREAD_COUNT_CAP as u32 + 3;
    let batch: Vec<NewMessage> = (0..many).map(|n| mentioning(msg(100 + n, 3, 0), &[1])).collect();
    send(h, &batch).await;
    assert_eq!(mention_counts(h, 3, &[1]).await, [UNREAD_COUNT_CAP]);
    mark_read(h.store.as_ref(), chat(3), user(1), Seq(i64::from(many) - 7)).await.unwrap();
    assert_eq!(mention_counts(h, 3, &[1]).await, [7]);
}

fn reply(n: u32, c: u8, prompt: u32, replaces: Option<u32>) -> NewReply {
    NewReply {
        id: id(n),
        chat_id: chat(c),
        author_id: user(9),
        prompt: id(prompt),
        replaces: replaces.map(id),
        now: 5_000 + i64::from(n),
        finished: None,
        owner: None,
        members_version: None,
    }
}

/// [`reply`] started by the generator `owner`.
fn owned(n: u32, c: u8, prompt: u32, owner: &str) -> NewReply {
    NewReply { owner: Some(owner.into()), ..reply(n, c, prompt, None) }
}

fn created(started: Started) -> (Message, Option<Message>) {
    match started {
        Started::Created(m, old) => (m, old),
        other => panic!("not created: {other:?}"),
    }
}

async fn a_reply_takes_the_next_seq_streams_by_checkpoints_and_finishes_as_a_change(h: &Harness) {
    send(h, &[by(msg(1, 1, 0), 1)]).await;
    let (r, old) = created(h.store.start_reply(&reply(2, 1, 1, None)).await.unwrap());
    assert_eq!(old, None);
    assert_eq!((r.seq, r.change_seq, r.reply_to, r.revision), (Seq(2), 2, Some(Seq(1)), 1));
    assert_eq!(
        (r.role(), r.generation(), r.text.as_str(), r.author_id),
        (Role::Assistant, Some(Generation::Generating), "", user(9))
    );
    // A retried start names the same reply and writes nothing.
    assert_eq!(h.store.start_reply(&reply(2, 1, 1, None)).await.unwrap(), Started::Exists(r.clone()));
    assert_eq!(h.store.start_reply(&reply(3, 1, 77, None)).await.unwrap(), Started::NoSuchPrompt);
    assert_eq!(h.store.start_reply(&reply(3, 2, 1, None)).await.unwrap(), Started::NoSuchPrompt, "another chat's");
    assert_eq!(h.store.start_reply(&reply(3, 1, 1, Some(1))).await.unwrap(), Started::NotAReply);

    // A checkpoint stores the text so far: no revision, no change number.
    assert_eq!(h.store.checkpoint_reply(r.id, Some("Hel"), 6_000).await.unwrap(), Some(false));
    let now = h.store.message(r.id).await.unwrap().unwrap();
    assert_eq!((now.text.as_str(), now.revision, now.change_seq), ("Hel", 1, 2));
    assert_eq!(h.store.heads(chat(1)).await.unwrap().change, 2);
    // A stop is a flag the next checkpoint reports.
    assert_eq!(h.store.stop_reply(r.id).await.unwrap().map(|m| m.reply.unwrap().stop_requested), Some(true));
    assert_eq!(h.store.checkpoint_reply(r.id, None, 6_100).await.unwrap(), Some(true));
    let info =
        GenerationInfo { model: "m".into(), finish_reason: "stop".into(), completion_tokens: 3, ..Default::default() };
    let done = h.store.finish_reply(r.id, &fin("Hello", Generation::Stopped, &info, false)).await.unwrap().done();
    assert!(done.changed);
    assert_eq!((done.reply.text.as_str(), done.reply.revision, done.reply.change_seq), ("Hello", 1, 3));
    assert_eq!(
        (done.reply.generation(), done.reply.reply.as_ref().and_then(|r| r.info.as_ref())),
        (Some(Generation::Stopped), Some(&info))
    );
    // Finished: a second finish, a checkpoint or a stop changes nothing.
    let again = h.store.finish_reply(r.id, &fin("other", Generation::Failed, &info, true)).await.unwrap().done();
    assert_eq!((again.changed, again.reply), (false, done.reply.clone()));
    assert_eq!(h.store.checkpoint_reply(r.id, Some("x"), 7_000).await.unwrap(), None);
    assert_eq!(h.store.stop_reply(r.id).await.unwrap(), Some(done.reply.clone()));
    assert_eq!(
        h.store.finish_reply(id(99), &fin("", Generation::Failed, &info, false)).await.unwrap(),
        Finishing::NotFound
    );
    // A client resuming after the start sees the finished reply once.
    let (page, _) = h.store.changes(chat(1), user(1), 2, 100).await.unwrap();
    assert_eq!(page, [Change::Message(done.reply)]);
}

async fn a_replacement_supersedes_the_old_reply_and_a_failed_one_restores_it(h: &Harness) {
    send(h, &[by(msg(1, 1, 0), 1)]).await;
    let (first, _) = created(h.store.start_reply(&reply(2, 1, 1, None)).await.unwrap());
    let info = GenerationInfo::default();
    h.store.finish_reply(first.id, &fin("one", Generation::Complete, &info, false)).await.unwrap();
    // Changes: 1 prompt, 2 reply, 3 finish; the replacement 4, superseding 5.
    let (second, old) = created(h.store.start_reply(&reply(3, 1, 1, Some(2))).await.unwrap());
    assert_eq!((second.seq, second.replaces(), second.change_seq), (Seq(3), Some(first.id), 4));
    let old = old.expect("the replaced reply");
    assert_eq!((old.id, old.superseded(), old.change_seq, old.text.as_str()), (first.id, true, 5, "one"));
    // History skips it unless asked; the seq range stays as it was.
    assert_eq!(stored(h, 1).await.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 3]);
    let count = || async { h.store.summaries(&[chat(1)], Some(user(1))).await.unwrap()[0].message_count };
    assert_eq!(count().await, 2, "a superseded reply is not counted");
    let unread = || async { h.store.summaries(&[chat(1)], Some(user(1))).await.unwrap()[0].unread };
    assert_eq!(unread().await, 1, "nor is it unread: the history shows one reply");
    let all = Range { ascending: true, superseded: true, ..Range::default() };
    assert_eq!(h.store.list(chat(1), all, None, 10).await.unwrap().len(), 3);
    assert_eq!(
        h.store.summaries(&[chat(1)], Some(user(1))).await.unwrap()[0].newest.as_ref().map(|m| m.id),
        Some(second.id)
    );
    // A replacement that fails gives the old one back.
    let failed = h.store.finish_reply(second.id, &fin("", Generation::Failed, &info, true)).await.unwrap().done();
    assert_eq!(failed.reply.generation(), Some(Generation::Failed));
    let restored = failed.restored.expect("restored");
    assert_eq!((restored.id, restored.superseded(), restored.change_seq), (first.id, false, 7));
    assert_eq!(stored(h, 1).await.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(count().await, 3, "restored, it counts again");
    assert_eq!(unread().await, 2, "and is unread again");
}

async fn one_reply_generates_at_a_time_per_chat_and_a_refusal_is_not_held_up(h: &Harness) {
    send(h, &[by(msg(1, 1, 0), 1), by(msg(2, 1, 0), 1)]).await;
    let (first, _) = created(h.store.start_reply(&reply(11, 1, 1, None)).await.unwrap());
    assert_eq!(h.store.start_reply(&reply(12, 1, 2, None)).await.unwrap(), Started::Busy(first.id));
    let refusal = GenerationInfo { error: "queue full".into(), ..Default::default() };
    let refused =
        NewReply { finished: Some((Generation::Failed, "no".into(), refusal.clone())), ..reply(12, 1, 2, None) };
    let (refused, _) = created(h.store.start_reply(&refused).await.unwrap());
    assert_eq!((refused.generation(), refused.text.as_str(), refused.seq), (Some(Generation::Failed), "no", Seq(4)));
    assert_eq!(refused.reply.as_ref().and_then(|r| r.info.clone()), Some(refusal));
    assert!(h.store.stale_replies(i64::MAX, 10).await.unwrap().iter().all(|m| m.id != refused.id), "no lease");
    // Once the first ends, the next may start.
    h.store.finish_reply(first.id, &fin("", Generation::Complete, &GenerationInfo::default(), false)).await.unwrap();
    assert!(matches!(h.store.start_reply(&reply(13, 1, 2, None)).await.unwrap(), Started::Created(..)));
}

/// [`reply`] as checked at members version `version` (None: by a caller
/// of an earlier release, which sends none).
impl Finishing {
    /// The finished reply (panics on another outcome).
    #[track_caller]
    fn done(self) -> Finished {
        match self {
            Finishing::Done(finished) => finished,
            other => panic!("not finished: {other:?}"),
        }
    }
}

fn reply_checked_at(r: NewReply, version: Option<i64>) -> NewReply {
    NewReply { members_version: version, ..r }
}

/// A reply whose start carries a members version below the one a
/// departure (the assistant's, its prompt author's, anyone's) or a purge's
/// mark recorded since is refused where the start takes its seq, finished
/// refusals too: nothing written, no seq, no change number; one checked at
/// the recorded version or later starts, and so does one that carries no
/// version (a caller of an earlier release). A direct chat closed by a
/// block takes no reply, whatever its version.
async fn a_reply_whose_checks_came_before_a_departure_or_a_closure_is_refused_in_its_start(h: &Harness) {
    send(h, &[by(msg(1, 20, 0), 1), by(msg(2, 21, 0), 1), by(msg(3, 22, 0), 1)]).await;
    let before = h.store.heads(chat(20)).await.unwrap();
    h.store.record_departure(chat(20), 2).await.unwrap();
    let stale = reply_checked_at(reply(10, 20, 1, None), Some(1));
    assert_eq!(h.store.start_reply(&stale).await.unwrap(), Started::Stale);
    let refusal = GenerationInfo { error: "refused".into(), ..Default::default() };
    let finished = NewReply { finished: Some((Generation::Failed, "no".into(), refusal)), ..stale.clone() };
    assert_eq!(h.store.start_reply(&finished).await.unwrap(), Started::Stale, "a refusal created finished too");
    assert_eq!(h.store.message(id(10)).await.unwrap(), None, "nothing written");
    assert_eq!(h.store.heads(chat(20)).await.unwrap(), before, "no seq, no change number taken");
    let (started, _) = created(h.store.start_reply(&reply_checked_at(stale, Some(2))).await.unwrap());
    assert_eq!(started.seq, Seq(2), "checked at the recorded version: started, no gap");

    // No version: compared with nothing (a rolling upgrade's older caller).
    h.store.record_departure(chat(21), 5).await.unwrap();
    assert!(matches!(h.store.start_reply(&reply(11, 21, 2, None)).await.unwrap(), Started::Created(..)));
    // The chat deleted (a purge's mark, above any version).
    h.store.record_departure(chat(21), DELETED_MEMBERS_VERSION).await.unwrap();
    let late = reply_checked_at(reply(12, 21, 2, None), Some(5));
    let late = NewReply { finished: Some((Generation::Failed, String::new(), GenerationInfo::default())), ..late };
    assert_eq!(h.store.start_reply(&late).await.unwrap(), Started::Stale, "a deleted chat's mark");

    h.store.close_direct_chat(chat(22), true, 1).await.unwrap();
    let before = h.store.heads(chat(22)).await.unwrap();
    assert_eq!(h.store.start_reply(&reply_checked_at(reply(13, 22, 3, None), Some(0))).await.unwrap(), Started::Closed);
    assert_eq!(h.store.start_reply(&reply(13, 22, 3, None)).await.unwrap(), Started::Closed, "with no version too");
    assert_eq!(h.store.heads(chat(22)).await.unwrap(), before);
    h.store.close_direct_chat(chat(22), false, 2).await.unwrap();
    assert!(matches!(h.store.start_reply(&reply(13, 22, 3, None)).await.unwrap(), Started::Created(..)), "reopened");
}

/// A reply (a refusal created finished too) started after its chat's
/// archive was recorded is refused where the start takes its seq, as a
/// send is, whatever members version its checks saw: nothing written, no
/// seq, no change number. A Regenerate's start supersedes nothing. A
/// stale start is told so first (its caller checks afresh, and finds the
/// archive). Unarchived, the chat takes the reply with no gap.
/// A COMPLETE finish whose check of the reply's author saw a members
/// version below one a departure recorded since is refused where it takes
/// its change number: nothing written, no change number taken, the reply
/// still GENERATING; finished again at the version now recorded (a check
/// afresh that finds its author still a member), it is stored. In a direct
/// chat closed by a block since its check, it is stored STOPPED with the
/// text and info sent. An archive ends no reply, and a finish with no
/// version (no check made) reads neither departures nor blocks.
async fn a_finish_checked_before_a_departure_or_a_block_is_refused_or_stopped_in_its_write(h: &Harness) {
    let info = GenerationInfo { model: "m".into(), completion_tokens: 2, ..Default::default() };
    let checked_at =
        |version| Finish { members_version: version, ..fin("the answer", Generation::Complete, &info, false) };
    let ended =
        |done: Finished| (done.changed, done.reply.generation(), done.reply.text, done.reply.reply.unwrap().info);
    let complete = (true, Some(Generation::Complete), "the answer".to_owned(), Some(info.clone()));

    send(h, &[by(msg(1, 25, 0), 1)]).await;
    let (r, _) = created(h.store.start_reply(&reply(2, 25, 1, None)).await.unwrap());
    h.store.record_departure(chat(25), 3).await.unwrap();
    let before = h.store.heads(chat(25)).await.unwrap();
    assert_eq!(h.store.finish_reply(r.id, &checked_at(Some(2))).await.unwrap(), Finishing::Stale);
    assert_eq!(h.store.heads(chat(25)).await.unwrap(), before, "no change number taken");
    let still = h.store.message(r.id).await.unwrap().unwrap();
    assert_eq!((still.generation(), still.text.as_str()), (Some(Generation::Generating), ""), "nothing written");
    h.store.archive_chat(chat(25), true, 1).await.unwrap();
    assert_eq!(ended(h.store.finish_reply(r.id, &checked_at(Some(3))).await.unwrap().done()), complete);

    send(h, &[by(msg(3, 26, 0), 1)]).await;
    let (r, _) = created(h.store.start_reply(&reply(4, 26, 3, None)).await.unwrap());
    h.store.close_direct_chat(chat(26), true, 1).await.unwrap();
    let stopped = (true, Some(Generation::Stopped), "the answer".to_owned(), Some(info.clone()));
    assert_eq!(ended(h.store.finish_reply(r.id, &checked_at(Some(0))).await.unwrap().done()), stopped);

    send(h, &[by(msg(5, 27, 0), 1)]).await;
    let (r, _) = created(h.store.start_reply(&reply(6, 27, 5, None)).await.unwrap());
    h.store.record_departure(chat(27), 1).await.unwrap();
    h.store.close_direct_chat(chat(27), true, 1).await.unwrap();
    assert_eq!(ended(h.store.finish_reply(r.id, &checked_at(None)).await.unwrap().done()), complete, "unchecked");
}

async fn a_reply_started_after_its_chat_s_archive_is_refused_in_its_start(h: &Harness) {
    send(h, &[by(msg(1, 24, 0), 1)]).await;
    let (first, _) = created(h.store.start_reply(&reply(2, 24, 1, None)).await.unwrap());
    let done = fin("an answer", Generation::Complete, &GenerationInfo::default(), false);
    h.store.finish_reply(first.id, &done).await.unwrap();
    h.store.archive_chat(chat(24), true, 1).await.unwrap();
    let before = h.store.heads(chat(24)).await.unwrap();
    let late = reply_checked_at(reply(3, 24, 1, Some(2)), Some(0));
    assert_eq!(h.store.start_reply(&late).await.unwrap(), Started::Archived, "a Regenerate's");
    assert_eq!(h.store.start_reply(&reply(3, 24, 1, None)).await.unwrap(), Started::Archived, "with no version");
    let refusal = GenerationInfo { error: "refused".into(), ..Default::default() };
    let finished = NewReply { finished: Some((Generation::Complete, "no".into(), refusal)), ..reply(4, 24, 1, None) };
    assert_eq!(h.store.start_reply(&finished).await.unwrap(), Started::Archived, "a refusal created finished");
    assert_eq!(h.store.message(id(3)).await.unwrap(), None, "nothing written");
    assert_eq!(h.store.message(id(4)).await.unwrap(), None, "nothing written");
    assert!(!h.store.message(id(2)).await.unwrap().unwrap().superseded(), "the replaced reply stays");
    assert_eq!(h.store.heads(chat(24)).await.unwrap(), before, "no seq, no change number taken");
    h.store.record_departure(chat(24), 3).await.unwrap();
    assert_eq!(h.store.start_reply(&late).await.unwrap(), Started::Stale, "stale first");

    h.store.archive_chat(chat(24), false, 2).await.unwrap();
    let (started, superseded) = created(h.store.start_reply(&reply(3, 24, 1, Some(2))).await.unwrap());
    assert_eq!((started.seq, superseded.map(|m| m.id)), (Seq(3), Some(id(2))), "unarchived: started, no gap");
}

/// PostgreSQL, two transactions by hand: a reply's start that reaches the
/// chat's heads while a departure from the chat is being recorded (its
/// transaction holds the heads row) waits for it, then reads the
/// committed members version and is refused: no seq taken.
async fn a_start_waiting_on_a_departure_being_recorded_is_refused_once_it_commits(h: &Harness) {
    send(h, &[by(msg(1, 23, 0), 1)]).await;
    let departure = sqlx::query(RECORD_DEPARTURE).bind(chat(23).to_string()).bind(1_i64);
    let start = reply_checked_at(reply(2, 23, 1, None), Some(0));
    let Some(out) = write_behind(h, departure, |store| async move { store.start_reply(&start).await.unwrap() }).await
    else {
        return;
    };
    assert_eq!(out, Started::Stale, "the start read the departure committed while it waited");
    assert_eq!(h.store.head(chat(23)).await.unwrap(), Seq(1));
}

async fn a_start_retried_by_its_owner_resumes_its_reply_while_it_generates(h: &Harness) {
    send(h, &[by(msg(1, 1, 0), 1), by(msg(2, 1, 0), 1)]).await;
    let t0 = h.store.clock().await.unwrap();
    let (r, _) = created(h.store.start_reply(&owned(11, 1, 1, "job-a")).await.unwrap());
    // Old enough for the sweeper: the generator lost the start's answer
    // and retries it late.
    h.store.checkpoint_reply(r.id, Some("so far"), t0 - 60_000_000).await.unwrap();
    assert_eq!(h.store.stale_replies(t0, 10).await.unwrap().iter().map(|m| m.id).collect::<Vec<_>>(), [r.id]);

    // Its owner's retry: the reply as it is, for it to generate, its lease
    // renewed on the store's clock; nothing else written.
    let Started::Resumed(resumed) = h.store.start_reply(&owned(11, 1, 1, "job-a")).await.unwrap() else {
        panic!("not resumed by its owner")
    };
    let now = h.store.message(r.id).await.unwrap().unwrap();
    assert_eq!((&resumed, resumed.text.as_str(), resumed.generation()), (&now, "so far", Some(Generation::Generating)));
    assert_eq!(h.store.stale_replies(t0, 10).await.unwrap(), [], "the lease is renewed");
    assert_eq!(h.store.heads(chat(1)).await.unwrap().change, 3, "no change number taken");
    assert_eq!(stored(h, 1).await.len(), 3, "no second reply");
    // Another generator's start (another replica, a restart) or one with
    // no owner: the reply exists, not theirs to generate.
    assert_eq!(h.store.start_reply(&owned(11, 1, 1, "job-b")).await.unwrap(), Started::Exists(now.clone()));
    assert_eq!(h.store.start_reply(&reply(11, 1, 1, None)).await.unwrap(), Started::Exists(now.clone()));
    // The owner of one reply starting another while it generates: busy.
    assert_eq!(h.store.start_reply(&owned(12, 1, 2, "job-a")).await.unwrap(), Started::Busy(r.id));

    // Finished, the reply is never restarted, not even by its owner.
    let info = GenerationInfo::default();
    let done = h.store.finish_reply(r.id, &fin("done", Generation::Complete, &info, false)).await.unwrap().done();
    assert_eq!(h.store.start_reply(&owned(11, 1, 1, "job-a")).await.unwrap(), Started::Exists(done.reply.clone()));
    assert_eq!(h.store.message(r.id).await.unwrap(), Some(done.reply));

    // No owner is matched by none: a start without one stays Exists.
    let (unowned, _) = created(h.store.start_reply(&reply(13, 1, 2, None)).await.unwrap());
    assert_eq!(h.store.start_reply(&reply(13, 1, 2, None)).await.unwrap(), Started::Exists(unowned));
}

async fn stale_replies_are_those_whose_checkpoint_is_old_and_checkpoints_renew_them(h: &Harness) {
    send(h, &[by(msg(1, 1, 0), 1), by(msg(2, 2, 0), 1), by(msg(3, 3, 0), 1)]).await;
    // A reply's first checkpoint is on the store's clock, whatever send
    // time the caller gave it (5,011 here): the clock the sweeper judges by.
    let t0 = h.store.clock().await.unwrap();
    let (a, _) = created(h.store.start_reply(&reply(11, 1, 1, None)).await.unwrap());
    let (b, _) = created(h.store.start_reply(&reply(12, 2, 2, None)).await.unwrap());
    let (c, _) = created(h.store.start_reply(&reply(13, 3, 3, None)).await.unwrap());
    let t1 = h.store.clock().await.unwrap();
    h.store.checkpoint_reply(b.id, None, t1 + 9_000).await.unwrap();
    h.store.finish_reply(c.id, &fin("", Generation::Complete, &GenerationInfo::default(), false)).await.unwrap();
    let stale = |before| async move {
        h.store.stale_replies(before, 10).await.unwrap().into_iter().map(|m| m.id).collect::<Vec<_>>()
    };
    assert_eq!(stale(t0).await, [], "checkpointed on the store's clock as it started");
    assert_eq!(stale(t1 + 1).await, [a.id], "b renewed its lease, c is finished");
    assert_eq!(stale(t1 + 9_001).await, [a.id, b.id], "oldest checkpoint first");
    assert_eq!(h.store.stale_replies(t1 + 9_001, 1).await.unwrap().len(), 1);

    // A batch of checkpoints: one transaction, answers in its order, None
    // for a finished reply and an unknown id; the heartbeat keeps the text.
    h.store.stop_reply(b.id).await.unwrap();
    let batch = [
        Checkpoint { id: b.id, text: None },
        Checkpoint { id: c.id, text: Some("late".into()) },
        Checkpoint { id: id(99), text: Some("x".into()) },
        Checkpoint { id: a.id, text: Some("Hi".into()) },
    ];
    assert_eq!(h.store.checkpoint_replies(&batch, t1 + 10_000).await.unwrap(), [Some(true), None, None, Some(false)]);
    assert!(stale(t1 + 10_000).await.is_empty(), "both renewed");
    let text = |m: MessageId| async move { h.store.message(m).await.unwrap().unwrap().text };
    assert_eq!((text(a.id).await, text(b.id).await, text(c.id).await), ("Hi".into(), String::new(), String::new()));

    // The sweeper's finish: not if the generator checkpointed since it
    // listed the reply; else with the stored text, not the one it read.
    let interrupt = |before| Finish {
        stale_before: Some(before),
        ..fin("what the sweeper read", Generation::Interrupted, &GenerationInfo::default(), false)
    };
    let alive = h.store.finish_reply(a.id, &interrupt(t1 + 9_500)).await.unwrap().done();
    assert_eq!((alive.changed, alive.reply.generation()), (false, Some(Generation::Generating)));
    let ended = h.store.finish_reply(a.id, &interrupt(t1 + 10_001)).await.unwrap().done();
    assert!(ended.changed);
    assert_eq!((ended.reply.generation(), ended.reply.text.as_str()), (Some(Generation::Interrupted), "Hi"));
}

async fn read_positions_are_read_in_order(h: &Harness) {
    send(h, &(1..=4).map(|n| by(msg(n, 1, 0), 2)).chain([by(msg(5, 2, 0), 2)]).collect::<Vec<_>>()).await;
    mark_read(h.store.as_ref(), chat(1), user(1), Seq(3)).await.unwrap();
    mark_read(h.store.as_ref(), chat(2), user(1), Seq(1)).await.unwrap();
    let positions = h.store.read_positions(user(1), &[chat(2), chat(7), chat(1)]).await.unwrap();
    assert_eq!(positions, [Seq(1), Seq::ZERO, Seq(3)]);
}

async fn a_chat_s_read_positions_are_listed_by_user_a_page_at_a_time(h: &Harness) {
    send(h, &(1..=4).map(|n| by(msg(n, 1, 0), 2)).chain([by(msg(5, 2, 0), 2)]).collect::<Vec<_>>()).await;
    mark_read(h.store.as_ref(), chat(1), user(3), Seq(2)).await.unwrap();
    mark_read(h.store.as_ref(), chat(1), user(1), Seq(4)).await.unwrap();
    mark_read(h.store.as_ref(), chat(2), user(2), Seq(1)).await.unwrap();
    let everyone = h.store.chat_read_positions(chat(1), None, 10).await.unwrap();
    assert_eq!(everyone, [(user(1), Seq(4)), (user(3), Seq(2))], "by user id, this chat's only");
    assert_eq!(h.store.chat_read_positions(chat(1), None, 1).await.unwrap(), everyone[..1]);
    assert_eq!(h.store.chat_read_positions(chat(1), Some(user(1)), 10).await.unwrap(), everyone[1..]);
    assert_eq!(h.store.chat_read_positions(chat(1), Some(user(3)), 10).await.unwrap(), []);
    assert_eq!(h.store.chat_read_positions(chat(7), None, 10).await.unwrap(), [], "no such chat");
}

fn flags(severity: i32, category: &str) -> Flags {
    Flags { severity, score_millis: 750, categories: vec![category.into()], detector: "test-rules".into() }
}

async fn flags_are_stored_replaced_on_edit_cleared_on_delete_and_filter_a_listing(h: &Harness) {
    let flagged = NewMessage { flags: Some(flags(4, "instruction_override")), ..msg(1, 1, 0) };
    let benign = NewMessage { flags: Some(flags(1, "")), ..msg(2, 1, 0) };
    let unscanned = msg(3, 1, 0);
    send(h, &[flagged, benign, unscanned, NewMessage { flags: Some(flags(2, "prompt_leak")), ..msg(4, 1, 0) }]).await;
    let stored = h.store.message(id(1)).await.unwrap().unwrap();
    assert_eq!(stored.flags.as_deref(), Some(&flags(4, "instruction_override")));
    assert!(stored.flags.unwrap().flagged());
    assert_eq!(h.store.message(id(3)).await.unwrap().unwrap().flags, None, "not scanned");
    let only_flagged = Range { ascending: true, flagged: true, ..Range::default() };
    let seqs = |ms: Vec<Message>| ms.into_iter().map(|m| m.seq.0).collect::<Vec<_>>();
    assert_eq!(seqs(h.store.list(chat(1), only_flagged, None, 10).await.unwrap()), [1, 4]);
    // An edit carries the new text's verdict; a delete clears it.
    h.store.edit(id(1), "fine now", Some(&flags(1, "")), 2_000, 10, 0).await.unwrap();
    h.store.delete(id(4), user(1), 3_000).await.unwrap();
    assert_eq!(h.store.message(id(4)).await.unwrap().unwrap().flags, None);
    assert!(h.store.list(chat(1), only_flagged, None, 10).await.unwrap().is_empty());
    assert_eq!(h.store.message(id(1)).await.unwrap().unwrap().flags.as_deref(), Some(&flags(1, "")));
}

fn report_of(message: u32, reporter: u8, chat_n: u8, at: i64) -> StoredReport {
    StoredReport {
        message_id: id(message),
        reporter: user(reporter),
        chat_id: chat(chat_n),
        reason: 3,
        comment: format!("by {reporter}"),
        create_time: at,
        resolve_time: None,
    }
}

async fn reports_are_once_per_user_and_the_queue_lists_flagged_and_reported_messages(h: &Harness) {
    let flagged = |n, c, severity| NewMessage { flags: Some(flags(severity, "instruction_override")), ..msg(n, c, 0) };
    // Send times 1_001.. by id: 1 flagged HIGH (chat 1, seq 1), 2 plain
    // (chat 1, seq 2), 3 flagged LOW (chat 2, seq 1), 4 plain (chat 2, seq
    // 2), 5 flagged HIGH but deleted (chat 1, seq 3).
    send(h, &[flagged(1, 1, 4), msg(2, 1, 0), flagged(3, 2, 2), msg(4, 2, 0), flagged(5, 1, 4)]).await;
    h.store.delete(id(5), user(1), 9_000).await.unwrap();
    let first = reported(h, &report_of(2, 7, 1, 5_000)).await;
    assert_eq!(first, report_of(2, 7, 1, 5_000));
    // Once per user: a repeat answers the first.
    assert_eq!(reported(h, &report_of(2, 7, 1, 6_000)).await, first);
    reported(h, &report_of(2, 8, 1, 5_500)).await;
    let queue = |chats: Option<Vec<ChatId>>, min_severity, from, limit| async move {
        h.store
            .flagged(&QueueFilter { chats, min_severity, ..QueueFilter::default() }, from, limit)
            .await
            .unwrap()
            .into_iter()
            .map(|(m, reports)| (m.seq.0, m.chat_id, reports.len()))
            .collect::<Vec<_>>()
    };
    // Newest first; the reported message with its two open reports; the
    // deleted one gone.
    assert_eq!(queue(None, 2, None, 10).await, [(1, chat(2), 0), (2, chat(1), 2), (1, chat(1), 0)]);
    assert_eq!(queue(None, 3, None, 10).await, [(2, chat(1), 2), (1, chat(1), 0)], "LOW left out, reports kept");
    assert_eq!(queue(Some(vec![chat(1)]), 2, None, 10).await, [(2, chat(1), 2), (1, chat(1), 0)]);
    assert_eq!(queue(Some(Vec::new()), 2, None, 10).await, []);
    // Paging by (send time, id).
    let filter = QueueFilter { min_severity: 2, ..QueueFilter::default() };
    let page = h.store.flagged(&filter, None, 2).await.unwrap();
    let last = page.last().map(|(m, _)| (m.send_time, m.id));
    assert_eq!(queue(None, 2, last, 10).await, [(1, chat(1), 0)]);
    // A send-time range [after, before): ids 1..=3 were sent at 1_001..=1_003.
    let sent =
        |after, before| QueueFilter { min_severity: 2, sent_after: after, sent_before: before, ..filter.clone() };
    let seqs = |page: Vec<(Message, Vec<StoredReport>)>| page.into_iter().map(|(m, _)| m.id).collect::<Vec<_>>();
    assert_eq!(seqs(h.store.flagged(&sent(Some(1_002), Some(1_003)), None, 10).await.unwrap()), [id(2)]);
    assert_eq!(seqs(h.store.flagged(&sent(Some(1_002), None), None, 10).await.unwrap()), [id(3), id(2)]);
    assert_eq!(seqs(h.store.flagged(&sent(None, Some(1_002)), None, 10).await.unwrap()), [id(1)]);
    // Resolving empties its reports; it leaves the queue (not flagged).
    assert_eq!(h.store.resolve_reports(id(2), chat(1), user(9), 7_000, None).await.unwrap(), Resolved::Done(2));
    assert_eq!(h.store.resolve_reports(id(2), chat(1), user(9), 7_100, Some(0)).await.unwrap(), Resolved::Done(0));
    assert_eq!(queue(Some(vec![chat(1)]), 2, None, 10).await, [(1, chat(1), 0)]);
    // The chats' aggregates: chat 1 has seqs 1..=3 with 3 deleted; its
    // worst live flag is HIGH (4); chat 2's LOW (2).
    let summaries = h.store.summaries(&[chat(1), chat(2)], Some(user(7))).await.unwrap();
    let aggregates: Vec<(i64, i32)> = summaries.iter().map(|s| (s.message_count, s.max_severity)).collect();
    assert_eq!(aggregates, [(2, 4), (2, 2)]);
    h.store.purge_chat(chat(1)).await.unwrap();
    assert_eq!(queue(None, 2, None, 10).await, [(1, chat(2), 0)]);
}

/// How a reply ends, without flags.
fn fin(text: &str, status: Generation, info: &GenerationInfo, restore_replaced: bool) -> Finish {
    Finish {
        text: text.into(),
        status,
        info: info.clone(),
        flags: None,
        restore_replaced,
        stale_before: None,
        members_version: None,
    }
}

async fn an_external_verdict_only_raises_the_flags_of_the_revision_it_saw(h: &Harness) {
    send(h, &[NewMessage { flags: Some(flags(1, "")), ..msg(1, 1, 0) }, msg(2, 1, 0)]).await;
    let high = flags(4, "instruction_override");
    let raised = h.store.raise_flags(id(1), 1, &high).await.unwrap().expect("raised");
    assert_eq!(
        (raised.flags.as_deref(), raised.change_seq, raised.revision),
        (Some(&high), 3, 1),
        "a change of its own"
    );
    assert_eq!(h.store.raise_flags(id(1), 1, &flags(3, "x")).await.unwrap(), None, "never lowered");
    assert_eq!(h.store.raise_flags(id(2), 7, &high).await.unwrap(), None, "another revision's verdict");
    h.store.delete(id(2), user(1), 5_000).await.unwrap();
    assert_eq!(h.store.raise_flags(id(2), 1, &high).await.unwrap(), None, "a tombstone stays clean");
}

/// (emoji, count, mine) of a message's reactions.
fn tally(reactions: &[Reaction]) -> Vec<(&str, i64, bool)> {
    reactions.iter().map(|r| (r.emoji.as_str(), r.count, r.mine)).collect()
}

/// The message of a reaction that changed it (panics otherwise).
fn changed(outcome: Reacted) -> Message {
    match outcome {
        Reacted::Changed(m) => m,
        other => panic!("not a change: {other:?}"),
    }
}

async fn reactions_are_once_per_user_per_emoji_and_only_real_changes_take_numbers(h: &Harness) {
    send(h, &[msg(1, 1, 0), msg(2, 1, 0)]).await;
    let react = |user_n: u8, emoji: &'static str, add: bool, at: i64| {
        let store = h.store.clone();
        async move { store.react(id(1), user(user_n), emoji, add, at, 2, 0).await.unwrap() }
    };
    let first = changed(react(1, "👍", true, 10).await);
    assert_eq!((first.change_seq, first.revision, first.create_change), (3, 1, 1), "a change, no revision");
    assert_eq!(tally(&first.reactions), [("👍", 1, true)]);
    let Reacted::Unchanged(again) = react(1, "👍", true, 11).await else { panic!("a repeat is a no-op") };
    assert_eq!((again.change_seq, tally(&again.reactions)), (3, vec![("👍", 1, true)]));
    assert_eq!(h.store.heads(chat(1)).await.unwrap().change, 3, "a no-op takes no number");
    let second = changed(react(2, "👍", true, 12).await);
    assert_eq!((second.change_seq, tally(&second.reactions)), (4, vec![("👍", 2, true)]));
    let third = changed(react(2, "🎉", true, 13).await);
    assert_eq!(tally(&third.reactions), [("👍", 2, true), ("🎉", 1, true)], "oldest emoji first");
    // At the limit (2 distinct here): a third emoji is refused, one held
    // already is not.
    assert_eq!(react(3, ":fire:", true, 14).await, Reacted::TooManyEmoji);
    let held = changed(react(3, "🎉", true, 15).await);
    assert_eq!((held.change_seq, tally(&held.reactions)), (6, vec![("👍", 2, false), ("🎉", 2, true)]));
    assert!(matches!(react(4, "👍", false, 16).await, Reacted::Unchanged(m) if m.change_seq == 6), "never held");
    let removed = changed(react(1, "👍", false, 17).await);
    assert_eq!((removed.change_seq, tally(&removed.reactions)), (7, vec![("👍", 1, false), ("🎉", 2, false)]));
    assert_eq!(h.store.heads(chat(1)).await.unwrap().change, 7);
    // Reads: per viewer, counts alone without one, nothing for a message
    // nobody reacted to.
    let read = |viewer: Option<UserId>| {
        let store = h.store.clone();
        async move { store.reactions(&[id(1), id(2), id(99)], viewer).await.unwrap() }
    };
    let by_2 = read(Some(user(2))).await;
    assert_eq!(by_2.len(), 1);
    assert_eq!(tally(&by_2[&id(1)]), [("👍", 1, true), ("🎉", 2, true)]);
    assert_eq!(tally(&read(None).await[&id(1)]), [("👍", 1, false), ("🎉", 2, false)]);
    // Every 👍 gone and one new: it now comes after 🎉.
    changed(react(2, "👍", false, 18).await);
    changed(react(1, "👍", true, 19).await);
    assert_eq!(tally(&read(None).await[&id(1)]), [("🎉", 2, false), ("👍", 1, false)]);
    // Replay: the message once, at its latest change, as a changed message.
    let (page, _) = h.store.changes(chat(1), user(1), 2, 100).await.unwrap();
    assert_eq!(numbers(&page), [9]);
    assert!(matches!(&page[0], Change::Message(m) if m.id == id(1) && m.revision == 1));
    // A tombstone keeps none and takes none.
    let deleted = h.store.delete(id(1), user(1), 20).await.unwrap().unwrap();
    assert!(read(Some(user(2))).await.is_empty(), "delete drops the reactions");
    assert_eq!(react(2, "🎉", true, 21).await, Reacted::Gone);
    assert_eq!(react(2, "🎉", false, 21).await, Reacted::Gone);
    assert_eq!(h.store.react(id(99), user(1), "👍", true, 21, 2, 0).await.unwrap(), Reacted::Gone);
    assert_eq!(h.store.heads(chat(1)).await.unwrap().change, deleted.change_seq);
}

/// 64 users react to one message at once, each adding two emoji (one twice)
/// and half of them taking one back: the counts are the rows, every real
/// change took one number and no number was taken twice or skipped.
async fn concurrent_reactions_on_one_message_never_drift(h: &Harness) {
    const REACTORS: u8 = 64;
    const EMOJI: [&str; 3] = ["🎉", "❤️", ":rocket:"];
    send(h, &[msg(1, 1, 0)]).await;
    let mut tasks = Vec::new();
    for t in 0..REACTORS {
        let store = h.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut numbers = Vec::new();
            let own = EMOJI[usize::from(t) % 3];
            // Repeats are no-ops; odd reactors keep their 👍.
            let steps = if t % 2 == 0 {
                vec![("👍", true), (own, true), ("👍", true), ("👍", false), ("👍", false)]
            } else {
                vec![("👍", true), (own, true), ("👍", true), (own, true)]
            };
            for (emoji, add) in steps {
                match store.react(id(1), user(t), emoji, add, 1_000 + i64::from(t), 20, 0).await.unwrap() {
                    Reacted::Changed(m) => numbers.push(m.change_seq),
                    Reacted::Unchanged(_) => {}
                    other => panic!("{other:?}"),
                }
            }
            numbers
        }));
    }
    let mut taken = Vec::new();
    for task in tasks {
        taken.extend(task.await.unwrap());
    }
    taken.sort_unstable();
    let head = h.store.heads(chat(1)).await.unwrap().change;
    assert_eq!(taken, (2..=head).collect::<Vec<_>>(), "each change one number, none skipped");
    // Each reactor: 👍 added, its emoji added, 👍 taken back by the even
    // ones: 2 or 3 changes each.
    assert_eq!(taken.len(), 64 * 2 + 32);
    let counts: std::collections::HashMap<String, i64> =
        h.store.reactions(&[id(1)], None).await.unwrap()[&id(1)].iter().map(|r| (r.emoji.clone(), r.count)).collect();
    let expected: std::collections::HashMap<String, i64> =
        [("👍", 32), (EMOJI[0], 22), (EMOJI[1], 21), (EMOJI[2], 21)].map(|(e, n)| (e.to_owned(), n)).into();
    assert_eq!(counts, expected);
    for t in [0, 1, 62, 63] {
        let mine: Vec<String> = h.store.reactions(&[id(1)], Some(user(t))).await.unwrap()[&id(1)]
            .iter()
            .filter(|r| r.mine)
            .map(|r| r.emoji.clone())
            .collect();
        let mut expected = vec![EMOJI[usize::from(t) % 3].to_owned()];
        if t % 2 == 1 {
            expected.push("👍".to_owned());
        }
        let mut mine = mine;
        mine.sort();
        expected.sort();
        assert_eq!(mine, expected, "user {t}");
    }
    let message = h.store.message(id(1)).await.unwrap().unwrap();
    assert_eq!((message.change_seq, message.revision), (head, 1));
    assert_eq!(message.reaction_rows, 32 + 64, "the marker follows the rows");
    // A delete clears the rows and the marker.
    h.store.delete(id(1), user(1), 9_000).await.unwrap();
    assert_eq!(h.store.message(id(1)).await.unwrap().unwrap().reaction_rows, 0);
}

async fn last_seen_keeps_the_latest_time_whatever_order_replicas_write_in(h: &Harness) {
    let s = &h.store;
    s.record_last_seen(&[]).await.unwrap();
    assert!(s.last_seen(&[user(1)]).await.unwrap().is_empty(), "never seen: no record");
    s.record_last_seen(&[(user(1), 100), (user(2), 50)]).await.unwrap();
    // An older time (a replica that saw the change late) and a repeat of
    // one user within a batch: the latest time of each wins.
    s.record_last_seen(&[(user(1), 80), (user(2), 60), (user(2), 55)]).await.unwrap();
    let expected: HashMap<UserId, i64> = [(user(1), 100), (user(2), 60)].into();
    assert_eq!(s.last_seen(&[user(1), user(2), user(3)]).await.unwrap(), expected);
    // Replicas writing the same changes concurrently agree on the result.
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.record_last_seen(&[(user(3), 1_000 + i), (user(1), 90 + i)]).await })
        })
        .collect();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let expected: HashMap<UserId, i64> = [(user(1), 100), (user(3), 1_007)].into();
    assert_eq!(s.last_seen(&[user(1), user(3)]).await.unwrap(), expected);
}

/// A deleted user's rows go (ForgetUser), everyone else's stay, and so do
/// the messages it sent, with their mentions as sent.
async fn forgetting_a_user_deletes_its_presence_read_positions_and_mentions_and_keeps_its_messages(h: &Harness) {
    let s = &h.store;
    // User 1 (to be forgotten) and user 2 are mentioned in chat 1 and read
    // part of it; user 1 writes in chat 1 and is mentioned in chat 2 too.
    send(
        h,
        &[
            mentioning(msg(1, 1, 0), &[1, 2]),
            mentioning(by(msg(2, 1, 0), 1), &[2]),
            mentioning(msg(3, 1, 0), &[1, 2]),
            mentioning(msg(4, 2, 0), &[1]),
        ],
    )
    .await;
    for (c, u) in [(1, 1), (1, 2), (2, 1)] {
        mark_read(s.as_ref(), chat(c), user(u), Seq(1)).await.unwrap();
    }
    s.record_last_seen(&[(user(1), 100), (user(2), 200)]).await.unwrap();
    let positions = |u| async move { s.read_positions(user(u), &[chat(1), chat(2)]).await.unwrap() };
    assert_eq!(positions(1).await, [Seq(1), Seq(1)]);
    assert_eq!(mention_counts(h, 1, &[1, 2]).await, [1, 2], "those after each one's read position");
    let before = stored(h, 1).await;

    s.forget_user(user(1)).await.unwrap();
    assert!(s.last_seen(&[user(1)]).await.unwrap().is_empty(), "no last-seen time");
    assert_eq!(positions(1).await, [Seq::ZERO, Seq::ZERO], "no read position");
    // Read from seq 0 now: a mention row left would count.
    assert_eq!(mention_counts(h, 1, &[1]).await, [0], "no mention row in chat 1");
    assert_eq!(mention_counts(h, 2, &[1]).await, [0], "nor in chat 2");
    // The others' rows stay.
    assert_eq!(s.last_seen(&[user(2)]).await.unwrap(), [(user(2), 200)].into());
    assert_eq!(positions(2).await, [Seq(1), Seq::ZERO]);
    assert_eq!(mention_counts(h, 1, &[2]).await, [2]);
    // Its messages stay, and the mentions of it on others' messages.
    assert_eq!(stored(h, 1).await, before);
    assert_eq!(s.message(id(2)).await.unwrap().unwrap().author_id, user(1));
    assert_eq!(s.message(id(3)).await.unwrap().unwrap().mentions, [user(1), user(2)]);
    // A last-seen time recorded late (a replica that held its stream died)
    // is not stored for it; for others it is.
    s.record_last_seen(&[(user(1), 900), (user(2), 901)]).await.unwrap();
    assert!(s.last_seen(&[user(1)]).await.unwrap().is_empty(), "no last-seen time comes back");
    assert_eq!(s.last_seen(&[user(2)]).await.unwrap(), [(user(2), 901)].into());
    // Nor a read position or a mention row written late (a MarkRead or a
    // send that passed its checks before the user was taken out), and the
    // late MarkRead takes no change number: the chat's log has no gap.
    let head = s.heads(chat(1)).await.unwrap().change;
    let late = mark_read(s.as_ref(), chat(1), user(1), Seq(3)).await.unwrap();
    assert_eq!(late.change_seq, None, "nothing moved for a forgotten user");
    assert_eq!(positions(1).await, [Seq::ZERO, Seq::ZERO], "no read position comes back");
    assert_eq!(s.heads(chat(1)).await.unwrap().change, head, "no change number taken");
    send(h, &[mentioning(msg(5, 1, 0), &[1, 2])]).await;
    assert_eq!(mention_counts(h, 1, &[1]).await, [0], "no mention row comes back");
    assert_eq!(mention_counts(h, 1, &[2]).await, [3], "the others' still come");
    // Again, or a user with no rows: nothing to do.
    s.forget_user(user(1)).await.unwrap();
    s.forget_user(user(7)).await.unwrap();
    assert_eq!(mention_counts(h, 1, &[2]).await, [3]);
}

/// A join delivered after its user was forgotten (JoinChat committed, the
/// account deleted, its ForgetUser done before the join reached the
/// messages store) is logged, but stores no read position: it would be
/// kept for ever for a deleted user. Another joiner of the same call gets
/// theirs.
async fn a_join_recorded_after_its_user_was_forgotten_stores_no_read_position(h: &Harness) {
    let s = &h.store;
    send(h, &[msg(1, 1, 0), msg(2, 1, 0)]).await;
    s.forget_user(user(1)).await.unwrap();
    let joins = [ChatChange::Joined(user(1)), ChatChange::Joined(user(2))];
    let logged = s.record_chat_changes(chat(1), &joins, 9_999, "").await.unwrap();
    assert_eq!(logged.len(), 2, "both joins are logged");
    assert_eq!(s.read_positions(user(1), &[chat(1)]).await.unwrap(), [Seq::ZERO], "none for the forgotten user");
    assert_eq!(s.read_positions(user(2), &[chat(1)]).await.unwrap(), [Seq(2)]);
    assert_eq!(s.latest_membership(chat(1), user(1)).await.unwrap(), Some(Membership::Joined(logged[0].change_seq)));
}

/// PostgreSQL: a join whose transaction runs while a ForgetUser of its
/// user is under way (not committed yet, so a `NOT EXISTS` of the forget's
/// row sees nothing) waits for it, as MarkRead does, and then stores no
/// read position: without the wait, the forget's delete ran before the
/// position was written, and the position was kept for good. (SQLite's
/// writes take turns: the sequential test above covers it.)
async fn a_join_racing_the_forget_of_its_user_stores_no_read_position(h: &Harness) {
    use sqlx::Connection as _;
    let Cleanup::Schema { url, schema } = &h.cleanup else { return };
    send(h, &[msg(1, 1, 0)]).await;
    let mut forget = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("SET search_path TO {schema}"))).execute(&mut forget).await.unwrap();
    let mut tx = forget.begin().await.unwrap();
    super::postgres::forget_user_in(&mut tx, &user(1).to_string()).await.unwrap();
    let store = h.store.clone();
    let join =
        tokio::spawn(
            async move { store.record_chat_changes(chat(1), &[ChatChange::Joined(user(1))], 9_999, "").await },
        );
    // Until the join waits for the forget's lock, or is done without it.
    let mut watch = sqlx::PgConnection::connect(url).await.unwrap();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1851880564 AND NOT granted",
        )
        .fetch_one(&mut watch)
        .await
        .unwrap();
        if waiting > 0 || join.is_finished() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    tx.commit().await.unwrap();
    join.await.unwrap().unwrap();
    assert_eq!(h.store.read_positions(user(1), &[chat(1)]).await.unwrap(), [Seq::ZERO], "none for the forgotten user");
}

/// The numbers (as [`id`] takes them) of the messages of `chats` that
/// `query` finds, walking pages of `page` results.
async fn found_in(h: &Harness, query: &str, chats: &[u8], relevance: bool, page: u32) -> Vec<u32> {
    let query = crate::search::Query::parse(query).unwrap();
    let chats: Vec<ChatId> = chats.iter().copied().map(chat).collect();
    let filter = SearchFilter { query: &query, chats: &chats, relevance };
    let (mut out, mut from) = (Vec::new(), None);
    loop {
        let found = h.store.search(&filter, from, page).await.unwrap();
        assert!(!found.too_broad);
        let hits = &found.hits;
        out.extend(hits.iter().map(|hit| u32::try_from(hit.message.id.0.as_u128() - 0x1_0000).unwrap()));
        if hits.len() < page as usize && found.scanned_to.is_none() {
            return out;
        }
        from = if hits.len() < page as usize { found.scanned_to } else { hits.last().map(|hit| hit.cursor) };
    }
}

/// [`found_in`] newest first, one page.
async fn found(h: &Harness, query: &str, chats: &[u8]) -> Vec<u32> {
    found_in(h, query, chats, false, 100).await
}

fn text(mut m: NewMessage, text: &str) -> NewMessage {
    m.text = text.into();
    m
}

async fn search_finds_the_current_text_of_live_messages_of_the_chats_asked(h: &Harness) {
    send(
        h,
        &[
            text(msg(1, 1, 0), "an apple a day"),
            text(msg(2, 2, 0), "Apple pie"),
            text(msg(3, 3, 0), "apple of a chat not asked"),
            text(msg(4, 1, 0), "pears only"),
        ],
    )
    .await;
    assert_eq!(found(h, "apple", &[1, 2]).await, [2, 1], "newest first, only the chats asked");
    assert_eq!(found(h, "apple", &[3]).await, [3]);
    assert_eq!(found(h, "apple day", &[1, 2]).await, [1], "every word");
    assert_eq!(found(h, "\"a day\"", &[1]).await, [1], "a phrase");
    assert!(found(h, "\"day a\"", &[1]).await.is_empty(), "a phrase keeps its order");
    // An edit: the old word is gone, the new one found.
    h.store.edit(id(1), "a banana a day", None, 2_000, 5, 0).await.unwrap();
    assert_eq!(found(h, "apple", &[1, 2]).await, [2]);
    assert_eq!(found(h, "banana", &[1]).await, [1]);
    // A delete: gone.
    h.store.delete(id(2), user(1), 3_000).await.unwrap();
    assert!(found(h, "apple", &[1, 2]).await.is_empty());
    // A reply as it streams, as it finishes, and once superseded.
    let (r, _) = created(h.store.start_reply(&reply(5, 1, 4, None)).await.unwrap());
    h.store.checkpoint_reply(r.id, Some("a cherry so"), 6_000).await.unwrap();
    assert_eq!(found(h, "cherry", &[1]).await, [5]);
    let info = GenerationInfo::default();
    h.store.finish_reply(r.id, &fin("a plum it is", Generation::Complete, &info, false)).await.unwrap();
    assert!(found(h, "cherry", &[1]).await.is_empty());
    assert_eq!(found(h, "plum", &[1]).await, [5]);
    created(h.store.start_reply(&reply(6, 1, 4, Some(5))).await.unwrap());
    assert!(found(h, "plum", &[1]).await.is_empty(), "a superseded reply");
    // A purged chat: gone.
    h.store.purge_chat(chat(3)).await.unwrap();
    assert!(found(h, "apple", &[3]).await.is_empty());
}

async fn text_stored_before_nfc_is_rewritten_once_and_found(h: &Harness) {
    // As sends stored macOS input before they were normalized: "résumé"
    // with combining accents, which an NFC query does not find on
    // PostgreSQL (our tokenizer splits at the marks; SQLite's unicode61
    // drops them).
    let decomposed = "my re\u{301}sume\u{301}, attached";
    send(h, &[text(msg(1, 1, 0), decomposed), text(msg(2, 1, 0), "plain ascii")]).await;
    if h.postgres {
        assert!(found(h, "résumé", &[1]).await.is_empty(), "unfound before");
    }
    assert_eq!(h.store.normalize_texts().await.unwrap(), 1);
    assert_eq!(found(h, "résumé", &[1]).await, [1]);
    let m = h.store.message(id(1)).await.unwrap().unwrap();
    assert_eq!((m.text.as_str(), m.revision), ("my résumé, attached", 1), "rewritten, not edited");
    assert_eq!(h.store.normalize_texts().await.unwrap(), 0, "nothing left to rewrite");
    // The store records the one-off rewrite once: opening ran it already.
    assert!(h.store.backfilled(NFC_TEXT_BACKFILL).await.unwrap());
    h.store.record_backfill(NFC_TEXT_BACKFILL, 1).await.unwrap();
    assert!(!h.store.backfilled("no such backfill").await.unwrap());
}

async fn reactions_stored_in_other_forms_are_rewritten_once_and_count_once_per_user(h: &Harness) {
    // As AddReaction stored them before it canonicalized: a heart without
    // its selector (U+2764) beside the emoji form (U+2764 U+FE0F), a
    // keycap without its selector, and a look-alike it now refuses.
    send(h, &[msg(1, 1, 0), msg(2, 1, 0), msg(3, 1, 0)]).await;
    let react = |message: u32, user_n: u8, emoji: &'static str, at: i64| {
        let store = h.store.clone();
        async move { changed(store.react(id(message), user(user_n), emoji, true, at, 20, 0).await.unwrap()) }
    };
    let (heart, text_heart, keycap, bare_keycap) = ("\u{2764}\u{FE0F}", "\u{2764}", "1\u{FE0F}\u{20E3}", "1\u{20E3}");
    react(1, 1, text_heart, 10).await;
    react(1, 2, heart, 11).await;
    react(1, 2, text_heart, 12).await;
    react(1, 3, "👍", 13).await;
    let before = react(2, 1, bare_keycap, 14).await;
    react(3, 1, "👍\u{200D}", 15).await;
    assert_eq!(tally(&before.reactions), [(bare_keycap, 1, true)]);
    let heads = h.store.heads(chat(1)).await.unwrap().change;
    assert_eq!(h.store.canonicalize_reactions().await.unwrap(), 2, "two messages rewritten");
    // One heart each for users 1 and 2, first at user 1's time: before 👍.
    let read = h.store.reactions(&[id(1), id(2), id(3)], Some(user(2))).await.unwrap();
    assert_eq!(tally(&read[&id(1)]), [(heart, 2, true), ("👍", 1, false)]);
    assert_eq!(tally(&read[&id(2)]), [(keycap, 1, false)]);
    assert_eq!(tally(&read[&id(3)]), [("👍\u{200D}", 1, false)], "a refused form stays as stored");
    // Each rewritten message took a change number, so a resuming client
    // re-reads it; its row count follows its rows.
    assert_eq!(h.store.heads(chat(1)).await.unwrap().change, heads + 2);
    let (page, _) = h.store.changes(chat(1), user(1), heads, 100).await.unwrap();
    let replayed: Vec<MessageId> =
        page.iter().filter_map(|c| if let Change::Message(m) = c { Some(m.id) } else { None }).collect();
    assert_eq!(replayed, [id(1), id(2)]);
    let rows = |message: u32| {
        let store = h.store.clone();
        async move { store.message(id(message)).await.unwrap().unwrap().reaction_rows }
    };
    assert_eq!((rows(1).await, rows(2).await, rows(3).await), (3, 1, 1));
    // Taking the heart back leaves none of it: nothing was left in the old form.
    changed(h.store.react(id(1), user(2), heart, false, 16, 20, 0).await.unwrap());
    changed(h.store.react(id(1), user(1), heart, false, 17, 20, 0).await.unwrap());
    let read = h.store.reactions(&[id(1)], None).await.unwrap();
    assert_eq!(tally(&read[&id(1)]), [("👍", 1, false)]);
    assert_eq!(rows(1).await, 1);
    assert_eq!(h.store.canonicalize_reactions().await.unwrap(), 0, "nothing left to rewrite");
    assert!(h.store.backfilled(REACTION_FORMS_BACKFILL).await.unwrap(), "opening ran it already");
}

async fn search_pages_walk_every_result_once_in_both_orders(h: &Harness) {
    let batch: Vec<NewMessage> = (1..=7)
        .map(|n| text(msg(n, u8::try_from(n % 2).unwrap(), 0), &format!("word {}", "word ".repeat(n as usize))))
        .collect();
    send(h, &batch).await;
    send(h, &[text(msg(8, 0, 0), "no match")]).await;
    for page in [1, 2, 3, 100] {
        assert_eq!(found_in(h, "word", &[0, 1], false, page).await, [7, 6, 5, 4, 3, 2, 1], "page {page}");
        // More of the word ranks higher on both engines' scores.
        assert_eq!(found_in(h, "word", &[0, 1], true, page).await, [7, 6, 5, 4, 3, 2, 1], "page {page}");
    }
}

async fn both_engines_find_the_same_messages_for_the_same_queries(h: &Harness) {
    let texts = [
        "Café au lait, s'il vous plaît",
        "NAÏVE e-mail to user@example.com at 3.14 pm",
        "Привет, мир! йогурт",
        "東京タワー and snake_case_words",
        "it's the caffeine; CAFE, cafés",
        "the quick brown fox jumps over the lazy dog",
    ];
    let batch: Vec<NewMessage> = texts.iter().zip(1..).map(|(t, n)| text(msg(n, 1, 0), t)).collect();
    send(h, &batch).await;
    for (query, expected) in [
        ("cafe", &[5, 1][..]),
        ("CAFÉ", &[5, 1]),
        ("café*", &[5, 1]),
        ("caf*", &[5, 1]),
        ("cafés", &[5]),
        ("naive", &[2]),
        ("e-mail", &[2]),
        ("\"e mail\"", &[2]),
        ("user@example.com", &[2]),
        ("example", &[2]),
        ("3.14", &[2]),
        ("14", &[2]),
        ("привет", &[3]),
        ("ЙОГУРТ", &[3]),
        ("йог*", &[3]),
        ("東京タワー", &[4]),
        ("snake_case", &[4]),
        ("case", &[4]),
        ("it's", &[5]),
        ("s", &[5, 1]),
        ("\"the lazy dog\"", &[6]),
        ("\"lazy the\"", &[]),
        ("fox dog quick", &[6]),
        ("fox cat", &[]),
        ("OR", &[]),
        ("fox OR cat", &[]),
        ("NOT fox", &[]),
        ("quick NEAR brown", &[]),
        ("fox^ -dog (quick) {brown}: +the", &[6]),
        ("jump*", &[6]),
        ("jumps*", &[6]),
    ] {
        let want: Vec<u32> = expected.to_vec();
        assert_eq!(found(h, query, &[1]).await, want, "{query:?}");
    }
}

async fn a_thread_reply_joins_its_roots_thread_and_changes_the_root(h: &Harness) {
    // 1 is the root; 3 replies to it; 4 names the reply 3, so joins 1's
    // thread; 2 and 5 are in no thread.
    send(h, &[msg(1, 1, 0), msg(2, 1, 0)]).await;
    let mut out = send(h, &[by(in_thread(msg(3, 1, 0), 1), 1)]).await;
    out.extend(send(h, &[by(in_thread(msg(4, 1, 0), 3), 2), msg(5, 1, 0)]).await);
    assert_eq!(seqs(&out), [Some(3), Some(4), Some(5)], "the chat's next seqs, as any message");
    let roots: Vec<Option<Seq>> = out
        .iter()
        .map(|s| match s {
            Sent::Created(m) => m.thread_root,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(roots, [Some(Seq(1)), Some(Seq(1)), None], "a reply's reply joins the root's thread");
    // The root: two replies, the latest replier first, the newest time; its
    // change is each batch's last change number (3 took 3, the root 4;
    // 4 and 5 took 5 and 6, the root 7).
    let root = at(h, 1, 1).await;
    let thread = root.thread.as_deref().expect("a root with replies has a summary");
    assert_eq!((thread.replies, thread.last_reply_time), (2, 1_004));
    assert_eq!(thread.participants, [user(2), user(1)]);
    assert_eq!((root.change_seq, root.revision), (7, 1), "a change of the root, no revision");
    assert_eq!(h.store.heads(chat(1)).await.unwrap().change, 7);
    assert_eq!(at(h, 1, 2).await.thread, None, "no summary without a reply");
    assert_eq!(h.store.message(id(1)).await.unwrap().unwrap(), root, "read by id as in a page");
    // A replay after the reply's creation has the root once, at its change.
    let (changes, _) = h.store.changes(chat(1), user(0), 2, 100).await.unwrap();
    let numbers: Vec<(i64, i64)> = changes
        .iter()
        .map(|c| match c {
            Change::Message(m) => (c.change_seq(), m.seq.0),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(numbers, [(3, 3), (5, 4), (6, 5), (7, 1)], "the root once, at its latest change");

    // Timelines: the main one leaves the replies out; a thread's page has
    // only its replies, oldest or newest first.
    assert_eq!(walk(h, 1, Timeline::Main, true, 10).await, [1, 2, 5]);
    assert_eq!(walk(h, 1, Timeline::Everything, true, 10).await, [1, 2, 3, 4, 5]);
    assert_eq!(walk(h, 1, Timeline::Thread(Seq(1)), false, 1).await, [4, 3]);
    assert_eq!(walk(h, 1, Timeline::Thread(Seq(2)), true, 10).await, Vec::<i64>::new());

    // A retried reply writes nothing and leaves the root as it is.
    assert_eq!(send(h, &[by(in_thread(msg(3, 1, 0), 1), 1)]).await, [Sent::Duplicate]);
    assert_eq!(at(h, 1, 1).await, root);

    // Deleting a reply lowers the count as the next change after the
    // deletion's; the tombstone stays in the thread; whoever replied stays
    // a participant, and the last reply time stays.
    let deleted = h.store.delete(id(3), user(1), 9_000).await.unwrap().unwrap();
    assert_eq!((deleted.change_seq, deleted.thread_root), (8, Some(Seq(1))));
    let root = at(h, 1, 1).await;
    assert_eq!(root.change_seq, 9);
    let thread = root.thread.as_deref().unwrap();
    assert_eq!((thread.replies, thread.last_reply_time, thread.participants.len()), (1, 1_004, 2));
    assert_eq!(walk(h, 1, Timeline::Thread(Seq(1)), true, 10).await, [3, 4]);
    // A tombstone's second deletion changes nothing.
    h.store.delete(id(3), user(1), 9_500).await.unwrap();
    assert_eq!(at(h, 1, 1).await.thread.unwrap().replies, 1);
    // Deleting the root keeps its summary (its replies stay) and refuses
    // new replies.
    let root = h.store.delete(id(1), user(1), 10_000).await.unwrap().unwrap();
    assert_eq!(root.thread.unwrap().replies, 1);
    assert_eq!(send(h, &[in_thread(msg(6, 1, 0), 4)]).await, [Sent::ThreadRootDeleted]);
}

async fn thread_roots_are_live_messages_stored_before_the_batch(h: &Harness) {
    send(h, &[msg(1, 1, 0), msg(2, 1, 0), msg(9, 2, 0)]).await;
    h.store.delete(id(2), user(1), 2_000).await.unwrap();
    let head = h.store.heads(chat(1)).await.unwrap();
    // No such seq; one taken within this very batch; a deleted root; a seq
    // of another chat: each refused, taking no seq; the good one beside
    // them is stored.
    let out = send(
        h,
        &[
            in_thread(msg(3, 1, 0), 7),
            msg(4, 1, 0),
            in_thread(msg(5, 1, 0), 3),
            in_thread(msg(6, 1, 0), 2),
            in_thread(msg(7, 2, 0), 2),
            in_thread(msg(8, 1, 0), 1),
        ],
    )
    .await;
    assert_eq!(
        out.iter().map(|s| seqs(std::slice::from_ref(s))[0].ok_or(s)).collect::<Vec<_>>(),
        [
            Err(&Sent::NoSuchThreadRoot),
            Ok(3),
            Err(&Sent::NoSuchThreadRoot),
            Err(&Sent::ThreadRootDeleted),
            Err(&Sent::NoSuchThreadRoot),
            Ok(4),
        ]
    );
    let heads = h.store.heads(chat(1)).await.unwrap();
    assert_eq!((heads.seq.0, heads.change), (head.seq.0 + 2, head.change + 3), "two messages and a root's change");
    assert_eq!(at(h, 1, 1).await.thread.unwrap().replies, 1);
    assert_eq!(at(h, 1, 2).await.thread, None, "nothing written for a refused reply");
    assert_eq!(h.store.message(id(5)).await.unwrap(), None);
}

async fn concurrent_thread_replies_count_exactly_and_page_without_gaps(h: &Harness) {
    const REPLIERS: u32 = 64;
    send(h, &[msg(1, 1, 0)]).await;
    send(h, &[in_thread(msg(2, 1, 0), 1)]).await;
    let mut tasks = Vec::new();
    for t in 0..REPLIERS {
        let store = h.store.clone();
        tasks.push(tokio::spawn(async move {
            // Half name the root, half the reply at seq 2: all join the one
            // thread. Each batch also holds a message in no thread.
            let reply = by(in_thread(msg(10 + t, 1, 0), if t % 2 == 0 { 1 } else { 2 }), (t % 16) as u8);
            let out = store.insert_batch(&[reply, msg(1_000 + t, 1, 0)]).await.unwrap();
            assert!(seqs(&out).iter().all(Option::is_some), "{out:?}");
            out
        }));
    }
    let mut taken = Vec::new();
    for task in tasks {
        taken.extend(seqs(&task.await.unwrap()).into_iter().flatten());
    }
    taken.sort_unstable();
    assert_eq!(taken, (3..=2 + 2 * i64::from(REPLIERS)).collect::<Vec<_>>(), "gap-free seqs");
    let stored_replies = i64::from(REPLIERS) + 1;
    let root = at(h, 1, 1).await;
    let thread = root.thread.as_deref().unwrap();
    assert_eq!(thread.replies, stored_replies, "every reply counted once");
    let distinct: std::collections::HashSet<_> = thread.participants.iter().collect();
    assert_eq!((thread.participants.len(), distinct.len()), (THREAD_PARTICIPANTS_MAX, THREAD_PARTICIPANTS_MAX));
    let heads = h.store.heads(chat(1)).await.unwrap();
    assert_eq!(root.change_seq, heads.change, "the last batch's last change is its root's");

    // The thread's replies and the main timeline, walked in small pages
    // both ways: each message once, none missing.
    let (mut replies, mut main) = (Vec::new(), vec![1]);
    for seq in walk(h, 1, Timeline::Everything, true, 1_000).await.into_iter().skip(1) {
        if at(h, 1, seq).await.thread_root.is_some() {
            replies.push(seq);
        } else {
            main.push(seq);
        }
    }
    assert_eq!(replies.len() as i64, stored_replies);
    assert_eq!(walk(h, 1, Timeline::Thread(Seq(1)), true, 7).await, replies);
    let mut newest_first = replies.clone();
    newest_first.reverse();
    assert_eq!(walk(h, 1, Timeline::Thread(Seq(1)), false, 7).await, newest_first);
    assert_eq!(walk(h, 1, Timeline::Main, true, 7).await, main);

    // Deleting ten replies at once lowers the count by ten.
    let mut deletes = Vec::new();
    for seq in replies.iter().take(10).copied() {
        let store = h.store.clone();
        let message = at(h, 1, seq).await.id;
        deletes.push(tokio::spawn(async move { store.delete(message, user(1), 50_000).await.unwrap() }));
    }
    for delete in deletes {
        delete.await.unwrap();
    }
    assert_eq!(at(h, 1, 1).await.thread.unwrap().replies, stored_replies - 10);
    let heads = h.store.heads(chat(1)).await.unwrap();
    assert_eq!(at(h, 1, 1).await.change_seq, heads.change, "the root's last change is the chat's last");
}

/// What a live stream does when it refills: reads the changes after its
/// cursor and moves the cursor to the last one read, while other callers
/// keep committing. Each thread reply creates a message and changes its
/// root, so a page read from several sources at different moments could
/// hold a root's later change but not a reply created before it, and the
/// cursor would pass the reply for good.
async fn a_reader_following_changes_while_replies_commit_sees_each_once(h: &Harness) {
    const WRITERS: u32 = 4;
    const REPLIES: u32 = 150;
    send(h, &[msg(1, 1, 0)]).await;
    let done = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (store, done) = (h.store.clone(), done.clone());
        writers.push(tokio::spawn(async move {
            for r in 0..REPLIES {
                let reply = by(in_thread(msg(10 + w * REPLIES + r, 1, 0), 1), w as u8);
                store.insert_batch(&[reply]).await.unwrap();
            }
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    let (mut cursor, mut seen) = (0, std::collections::BTreeMap::<i64, u32>::new());
    loop {
        // Read after the writers are all done, the last pass finds the rest.
        let finished = done.load(std::sync::atomic::Ordering::SeqCst) == WRITERS;
        loop {
            let (page, more) = h.store.changes(chat(1), user(9), cursor, 50).await.unwrap();
            for change in &page {
                if let Change::Message(m) = change
                    && m.seq.0 > 1
                {
                    *seen.entry(m.seq.0).or_default() += 1;
                }
            }
            cursor = page.last().map_or(cursor, Change::change_seq);
            if !more {
                break;
            }
        }
        if finished {
            break;
        }
        tokio::task::yield_now().await;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let replies = i64::from(WRITERS * REPLIES);
    let missed: Vec<i64> = (2..=1 + replies).filter(|s| !seen.contains_key(s)).collect();
    let doubled: Vec<(&i64, &u32)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(missed.is_empty() && doubled.is_empty(), "missed {missed:?}, seen twice {doubled:?}");
    assert_eq!(seen.len() as i64, replies);
}

async fn deleting_a_reply_being_written_ends_it_and_no_later_write_restores_its_text(h: &Harness) {
    send(h, &[by(msg(1, 1, 0), 1)]).await;
    let (r, _) = created(h.store.start_reply(&reply(2, 1, 1, None)).await.unwrap());
    assert_eq!(h.store.checkpoint_reply(r.id, Some("Hel"), 6_000).await.unwrap(), Some(false));
    let gone = h.store.delete(r.id, user(1), 6_500).await.unwrap().unwrap();
    assert!(gone.deleted());
    assert_eq!((gone.text.as_str(), gone.generation()), ("", Some(Generation::Stopped)));
    // The generator's next checkpoint finds it finished (and stops); its
    // finish changes nothing: the tombstone keeps no text.
    assert_eq!(h.store.checkpoint_reply(r.id, Some("Hello wor"), 7_000).await.unwrap(), None);
    let info = GenerationInfo { model: "m".into(), ..Default::default() };
    let done =
        h.store.finish_reply(r.id, &fin("Hello world", Generation::Complete, &info, false)).await.unwrap().done();
    assert_eq!((done.changed, done.reply), (false, gone.clone()));
    assert_eq!(h.store.message(r.id).await.unwrap(), Some(gone.clone()));
    assert!(h.store.stale_replies(i64::MAX, 10).await.unwrap().is_empty(), "no sweeper takes it up");
    // The chat is free for the next reply.
    send(h, &[by(msg(3, 1, 0), 1)]).await;
    assert!(matches!(h.store.start_reply(&reply(4, 1, 3, None)).await.unwrap(), Started::Created(..)));
}

/// On PostgreSQL, messages stored before search (no `search_vector`) are
/// indexed at start-up from the text the backfill read: an edit committed
/// between that read and its write keeps the edit's index (the old text's
/// would make the message unfindable by its words, and findable by words
/// it no longer has, until its next edit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexing_old_messages_never_overwrites_an_edit_made_meanwhile() {
    let Some(url) = natter_db::testing::postgres_url() else { return };
    let schema = natter_db::testing::unique_schema("messages");
    let pg = super::postgres::PostgresStore::open(&url, &schema, &natter_db::PoolSettings::default()).await.unwrap();
    let h = Harness { store: Arc::new(pg.clone()), postgres: true, cleanup: Cleanup::Schema { url, schema } };
    send(&h, &[text(msg(1, 1, 0), "an apple a day"), text(msg(2, 1, 0), "a cherry on top")]).await;
    // As stored before migration 0009.
    h.execute("UPDATE messages SET search_vector = NULL").await;
    let read = pg.unindexed_batch().await.unwrap();
    assert_eq!(read.len(), 2);
    h.store.edit(id(1), "a banana a day", None, 2_000, 5, 0).await.unwrap();
    assert_eq!(pg.write_index(read).await.unwrap(), 1, "only the message not written since");
    assert_eq!(found(&h, "banana", &[1]).await, [1], "the edit's index is kept");
    assert!(found(&h, "apple", &[1]).await.is_empty(), "the text read before the edit is not indexed");
    assert_eq!(found(&h, "cherry", &[1]).await, [2]);
    assert_eq!(pg.index_unindexed().await.unwrap(), 0, "nothing left");
    h.finish().await;
}

/// On PostgreSQL, opening the store runs its backfills under the schema's
/// backfill lock: while another process holds it (its backfills under
/// way), opening waits, and goes on once it is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_waits_for_another_process_s_backfills() {
    let Some(url) = natter_db::testing::postgres_url() else { return };
    let schema = natter_db::testing::unique_schema("messages");
    let config = DbConfig::postgres(&url, &schema);
    open(&config).await.unwrap().close().await;
    let held = natter_db::postgres::BackfillLock::take(&url, &schema).await.unwrap();
    let mut opening = tokio::spawn(async move { open(&config).await });
    let waited = tokio::time::timeout(std::time::Duration::from_millis(500), &mut opening).await;
    assert!(waited.is_err(), "opened while another process's backfills were under way");
    held.release().await;
    let store = tokio::time::timeout(std::time::Duration::from_secs(10), opening)
        .await
        .expect("opened once the backfills are done")
        .unwrap()
        .unwrap();
    store.close().await;
    natter_db::postgres::drop_schema(&url, &schema).await.unwrap();
}

/// Migrating reports what it did: on a fresh database every migration
/// and the backfills of `store_backfills`; again, nothing.
async fn migrating_reports_what_it_applied_and_ran_once(config: DbConfig, migrator: &sqlx::migrate::Migrator) {
    let first = migrate(&config).await.unwrap();
    let versions: Vec<i64> = first.applied.iter().map(|m| m.version).collect();
    assert_eq!(versions, migrator.iter().map(|m| m.version).collect::<Vec<_>>());
    let ran: Vec<&str> = first.backfills.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(ran, [NFC_TEXT_BACKFILL, CHAT_DETAILS_BACKFILL, REACTION_FORMS_BACKFILL]);
    assert_eq!(migrate(&config).await.unwrap(), natter_db::Migrated::default(), "the second time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_sqlite_reports_what_it_applied_and_ran_once() {
    let dir = tempfile::tempdir().unwrap();
    migrating_reports_what_it_applied_and_ran_once(
        DbConfig::sqlite_in(dir.path(), "messages"),
        &crate::SQLITE_MIGRATOR,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_postgres_reports_what_it_applied_and_ran_once() {
    let Some(url) = natter_db::testing::postgres_url() else { return };
    let schema = natter_db::testing::unique_schema("messages");
    let config = DbConfig::postgres(&url, &schema);
    migrating_reports_what_it_applied_and_ran_once(config, &crate::POSTGRES_MIGRATOR).await;
    natter_db::postgres::drop_schema(&url, &schema).await.unwrap();
}

/// A pin or unpin takes the chat's next change number only when it changes
/// something; concurrent pins of one chat never pass its limit, and each
/// that lands takes its own number; a chat's limit is its own; a delete
/// unpins; listing with `pinned` walks only the pins.
async fn pins_take_numbers_only_when_real_hold_the_limit_under_concurrent_pins_and_go_with_a_delete(h: &Harness) {
    let batch: Vec<NewMessage> = (1..=12).map(|n| msg(n, 1, 0)).collect();
    send(h, &batch).await;
    send(h, &[msg(100, 2, 0)]).await;
    let base = h.store.heads(chat(1)).await.unwrap().change;
    let pin = |n: u32, by: u8, pin: bool, at: i64| {
        let store = h.store.clone();
        async move { store.pin(id(n), user(by), pin, at, 10, 0).await.unwrap() }
    };
    let Pinned::Changed(pinned) = pin(1, 1, true, 500).await else { panic!("a first pin changes the message") };
    assert_eq!((pinned.change_seq, pinned.revision), (base + 1, 1), "a change, not a revision");
    assert_eq!(pinned.pin, Some(Pin { time: 500, by: user(1) }));
    // A repeat, by anyone, keeps the first pin and takes no number.
    let Pinned::Unchanged(again) = pin(1, 2, true, 600).await else { panic!("a repeat is a no-op") };
    assert_eq!((again.change_seq, again.pin), (base + 1, Some(Pin { time: 500, by: user(1) })));
    let Pinned::Changed(unpinned) = pin(1, 2, false, 700).await else { panic!("an unpin changes the message") };
    assert_eq!((unpinned.change_seq, unpinned.pin), (base + 2, None));
    assert!(matches!(pin(1, 2, false, 701).await, Pinned::Unchanged(m) if m.change_seq == base + 2));

    // Twelve pins at once against a limit of ten: ten land, numbered
    // without gaps, and the refusals take no number.
    let tasks: Vec<_> = (1..=12u32).map(|n| tokio::spawn(pin(n, 1, true, 800 + i64::from(n)))).collect();
    let (mut numbers, mut refused) = (Vec::new(), 0);
    for task in tasks {
        match task.await.unwrap() {
            Pinned::Changed(m) => numbers.push(m.change_seq),
            Pinned::TooMany => refused += 1,
            other => panic!("a pin of a live message: {other:?}"),
        }
    }
    numbers.sort_unstable();
    assert_eq!((numbers, refused), (((base + 3)..=(base + 12)).collect::<Vec<_>>(), 2));
    assert_eq!(h.store.heads(chat(1)).await.unwrap().change, base + 12);
    assert!(matches!(pin(100, 1, true, 900).await, Pinned::Changed(_)), "chat 2's pins are its own");

    // The listing of pins holds the ten; a delete unpins (its tombstone has
    // no pin), and a deleted message cannot be pinned.
    let pins = Range { ascending: true, pinned: true, ..Range::default() };
    let listed = h.store.list(chat(1), pins, None, 100).await.unwrap();
    assert_eq!(listed.len(), 10);
    assert!(listed.iter().all(|m| m.pin.is_some_and(|p| p.by == user(1))));
    let gone = listed[0].id;
    let tombstone = h.store.delete(gone, user(1), 1_000).await.unwrap().expect("deleted");
    assert_eq!(tombstone.pin, None);
    let listed = h.store.list(chat(1), pins, None, 100).await.unwrap();
    assert_eq!(listed.len(), 9);
    assert!(listed.iter().all(|m| m.id != gone));
    assert_eq!(h.store.pin(gone, user(1), true, 1_001, 10, 0).await.unwrap(), Pinned::Gone);
    assert_eq!(h.store.pin(id(999), user(1), true, 1_001, 10, 0).await.unwrap(), Pinned::Gone);
}

/// A pin outlives a Regenerate: the superseded reply is still listed among
/// the pins (the limit counts it), though the history leaves it out.
async fn a_pinned_reply_stays_among_the_pins_when_a_replacement_supersedes_it(h: &Harness) {
    send(h, &[by(msg(1, 1, 0), 1)]).await;
    let (first, _) = created(h.store.start_reply(&reply(2, 1, 1, None)).await.unwrap());
    h.store.finish_reply(first.id, &fin("one", Generation::Complete, &GenerationInfo::default(), false)).await.unwrap();
    assert!(matches!(h.store.pin(first.id, user(1), true, 50, 10, 0).await.unwrap(), Pinned::Changed(_)));
    created(h.store.start_reply(&reply(3, 1, 1, Some(2))).await.unwrap());
    let pins = Range { ascending: true, pinned: true, ..Range::default() };
    let listed = h.store.list(chat(1), pins, None, 10).await.unwrap();
    assert_eq!(listed.iter().map(|m| (m.id, m.superseded())).collect::<Vec<_>>(), [(first.id, true)]);
    assert_eq!(stored(h, 1).await.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 3], "the history skips it");
}

/// A message deleted by a release before pins keeps its pin columns (its
/// tombstone does not know them: a rolling upgrade runs both releases side
/// by side, and a rollback runs the old one on the migrated schema). It is
/// no pin: not listed among the pins, no place taken under the limit (which
/// nobody could free, as a deleted message cannot be unpinned), and read
/// without one.
async fn a_pin_left_on_a_message_an_earlier_release_deleted_is_no_pin(h: &Harness) {
    send(h, &[msg(1, 1, 0), msg(2, 1, 0)]).await;
    assert!(matches!(h.store.pin(id(1), user(1), true, 50, 1, 0).await.unwrap(), Pinned::Changed(_)));
    // As the release before pins deletes: the text gone, the pin columns as
    // they were.
    h.execute(&format!("UPDATE messages SET text = '', delete_time = 60 WHERE id = '{}'", id(1))).await;
    let tombstone = h.store.message(id(1)).await.unwrap().expect("a tombstone");
    assert_eq!((tombstone.deleted(), tombstone.pin), (true, None));
    let pins = Range { ascending: true, pinned: true, ..Range::default() };
    let listed = h.store.list(chat(1), pins, None, 10).await.unwrap();
    assert!(listed.is_empty(), "listed: {listed:?}");
    let second = h.store.pin(id(2), user(1), true, 70, 1, 0).await.unwrap();
    assert!(matches!(&second, Pinned::Changed(m) if m.pin.is_some()), "a limit of one has room: {second:?}");
}

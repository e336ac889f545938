//! The [`ChatStore`] conformance suite: every test is a generic function
//! over `&dyn ChatStore`, stamped by [`chat_store_suite!`] into a `sqlite`
//! module (always run) and a `postgres` module (run when
//! `NATTER_TEST_DATABASE_URL` is set, each test in a fresh schema dropped
//! afterwards; under `CI` an unset URL fails).
//!
//! The SQLite store keeps activity in memory for an hour here, so every
//! activity assertion goes through what a read lays over a row or what a
//! listing writes first, never through a lucky timer tick.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use natter_kit::id::{ChatId, MessageId, UserId};
use natter_proto::messages::v1 as mpb;

use super::postgres::PostgresChatStore;
use super::sqlite::SqliteChatStore;
use super::{Added, Adder, Backoff, Blocked, ChatStore, Checked, Created, Departure, Peers, Removal};
use crate::domain::{
    Activity, AssistantReplies, Chat, ChatAccess, ChatCursor, ChatFilter, ChatOrder, ChatUpdate, DirectChats,
    GroupAdds, Kind, Limits, Member, MemberCursor, PrivacyChoices, ReadReceipts, Role, StoredPrivacy, Visibility,
};

/// A store under test and what to clean up after it.
pub(crate) struct Fixture {
    pub(crate) store: Arc<dyn ChatStore>,
    cleanup: Cleanup,
}

enum Cleanup {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Schema { url: String, schema: String },
}

impl Fixture {
    pub(crate) async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteChatStore::open(&dir.path().join("chats.db"), 4, Duration::from_secs(3600)).await.unwrap();
        Self { store: Arc::new(store), cleanup: Cleanup::Dir(dir) }
    }

    pub(crate) async fn postgres() -> Option<Self> {
        let url = natter_db::testing::postgres_url()?;
        let schema = natter_db::testing::unique_schema("chats");
        let store = PostgresChatStore::open(
            &url,
            &schema,
            &natter_db::PoolSettings { max_connections: 4, ..Default::default() },
        )
        .await
        .unwrap();
        Some(Self { store: Arc::new(store), cleanup: Cleanup::Schema { url, schema } })
    }

    pub(crate) async fn done(self) {
        self.store.close().await;
        if let Cleanup::Schema { url, schema } = &self.cleanup {
            natter_db::postgres::drop_schema(url, schema).await.unwrap();
        }
    }
}

/// Stamps each generic test for both engines.
macro_rules! chat_store_suite {
    ($($test:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let fixture = super::Fixture::sqlite().await;
                    super::$test(&*fixture.store).await;
                    fixture.done().await;
                }
            )+
        }

        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    let Some(fixture) = super::Fixture::postgres().await else {
                        eprintln!("skipped: NATTER_TEST_DATABASE_URL is not set");
                        return;
                    };
                    super::$test(&*fixture.store).await;
                    fixture.done().await;
                }
            )+
        }
    };
}

chat_store_suite!(
    creating_a_chat_stores_it_and_its_members,
    a_taken_id_or_direct_pair_is_a_conflict_that_writes_nothing,
    access_tells_members_from_others,
    members_are_added_once_and_removed,
    the_member_limit_is_checked_under_the_chats_lock,
    roles_change_and_ownership_moves_in_one_step,
    a_loss_of_rights_raises_the_members_version,
    a_removal_checks_both_roles_again_and_never_removes_the_owner,
    a_role_change_checks_its_owner_again_and_never_leaves_the_group_without_one,
    a_hand_over_racing_a_removal_of_its_heir_leaves_one_owner,
    activity_orders_listings_and_never_moves_back,
    listings_page_both_ways_without_gaps_or_repeats,
    listings_filter_by_visibility_kind_state_time_and_title,
    listings_order_by_creation_time_and_page_both_ways_without_gaps_or_repeats,
    creation_time_ranges_are_half_open_and_page_in_either_order,
    listings_carry_the_user_s_role_and_list_only_managed_chats_on_request,
    updates_archive_and_unarchive,
    a_change_by_one_who_may_no_longer_change_the_chat_writes_nothing,
    deleting_a_chat_removes_it_and_its_members,
    a_delete_by_one_no_longer_the_owner_writes_nothing,
    an_update_that_changes_nothing_writes_nothing,
    members_page_in_join_order,
    every_change_leaves_its_outbox_entry_in_commit_order_and_no_change_none,
    an_untitled_chat_takes_a_title_once,
    a_title_made_from_a_prompt_is_taken_back_with_it_and_a_persons_never,
    a_followed_position_only_moves_forward,
    peers_are_members_now_of_a_chat_shared_now,
    blocked_peers_are_those_sharing_a_chat_with_a_block_either_way,
    failed_items_of_a_log_wait_once_each_until_retried,
    a_forgotten_user_is_never_made_a_member_again,
    a_membership_write_beside_a_forgetting_is_refused_or_seen,
    a_chat_deleted_beside_an_add_removes_the_joiner_too,
    an_add_by_one_who_may_no_longer_add_writes_nothing,
    privacy_settings_are_each_users_own_and_go_with_a_forgotten_user,
    users_in_groups_counts_current_group_memberships,
    blocks_are_each_users_own_are_seen_both_ways_and_go_with_a_forgotten_user,
    a_block_beside_a_forgetting_leaves_no_row,
    blocks_racing_each_other_at_the_limit_pass_it_by_none,
    a_privacy_update_beside_a_forgetting_leaves_no_row,
    a_change_of_a_pairs_blocks_puts_their_direct_chats_closure_in_the_outbox,
    an_archive_puts_the_chats_archived_state_in_the_outbox_after_its_update,
    an_add_or_a_creation_checks_blocks_in_its_write,
);

async fn blocks_are_each_users_own_are_seen_both_ways_and_go_with_a_forgotten_user(store: &dyn ChatStore) {
    let [alice, bob, carol, dave] = std::array::from_fn(|_| UserId::new_v7());
    // Direct chats made before the blocks (none is made after one).
    let mut with_bob = chat(bob, 7);
    with_bob.kind = Kind::Direct;
    with_bob.title = String::new();
    let with_bob = create(store, with_bob, &[alice]).await;
    let mut with_carol = chat(carol, 8);
    with_carol.kind = Kind::Direct;
    with_carol.title = String::new();
    let with_carol = create(store, with_carol, &[bob]).await;
    assert_eq!(store.block(alice, bob, 1, 2).await.unwrap(), Blocked::Done);
    assert_eq!(store.block(alice, bob, 2, 2).await.unwrap(), Blocked::Done, "again: no change");
    assert_eq!(store.block(alice, carol, 3, 2).await.unwrap(), Blocked::Done);
    assert_eq!(store.block(alice, dave, 4, 2).await.unwrap(), Blocked::TooMany, "two at most");
    assert_eq!(store.block(alice, carol, 5, 2).await.unwrap(), Blocked::Done, "a repeat at the limit is no new block");
    assert_eq!(store.block(dave, alice, 6, 2).await.unwrap(), Blocked::Done);

    let mut blocked = vec![(bob, 1), (carol, 3)];
    blocked.sort();
    assert_eq!(store.blocked_users(alice, None, 10).await.unwrap(), blocked, "by id, first time kept");
    assert_eq!(store.blocked_users(alice, None, 1).await.unwrap(), blocked[..1]);
    assert_eq!(store.blocked_users(alice, Some(blocked[0].0), 10).await.unwrap(), blocked[1..]);
    assert_eq!(store.blocked_users(bob, None, 10).await.unwrap(), [], "each user's own");

    // One way round: alice blocked bob and carol, dave blocked alice.
    assert_eq!(store.blockers_among(alice, &[bob, carol, dave]).await.unwrap(), [dave]);
    assert_eq!(store.blockers_among(bob, &[alice, carol, alice]).await.unwrap(), [alice], "each once");
    assert_eq!(store.blockers_among(bob, &[carol, dave]).await.unwrap(), []);

    assert!(store.blocks_within(with_bob.id).await.unwrap(), "alice blocked bob");
    assert!(!store.blocks_within(with_carol.id).await.unwrap());

    store.unblock(alice, bob, 9).await.unwrap();
    store.unblock(alice, bob, 9).await.unwrap();
    assert!(!store.blocks_within(with_bob.id).await.unwrap(), "taken back");
    assert_eq!(store.blocked_users(alice, None, 10).await.unwrap(), [(carol, 3)]);

    store.record_forgotten(alice, 9).await.unwrap();
    assert_eq!(store.blocked_users(alice, None, 10).await.unwrap(), [], "gone with the user");
    assert_eq!(store.blocked_users(dave, None, 10).await.unwrap(), [], "and blocks of them");
    // A block that looked the user up before it was forgotten writes
    // nothing after, whichever of the two it was.
    assert_eq!(store.block(dave, alice, 10, 2).await.unwrap(), Blocked::Forgotten(alice));
    assert_eq!(store.block(alice, bob, 11, 2).await.unwrap(), Blocked::Forgotten(alice));
    assert_eq!(store.blocked_users(dave, None, 10).await.unwrap(), [], "no row left behind");
    assert_eq!(store.blocked_users(alice, None, 10).await.unwrap(), []);
}

/// The closures in `chat`'s outbox, in order: (closed, version).
async fn closures(store: &dyn ChatStore, chat: ChatId) -> Vec<(bool, i64)> {
    let pending = store.pending(Some(chat), 100).await.unwrap();
    let changes = pending.into_iter().flat_map(|p| p.changes);
    changes
        .filter_map(|c| match c.change {
            Some(mpb::chat_change::Change::DirectChatClosed(c)) => Some((c.closed, c.version)),
            _ => None,
        })
        .collect()
}

/// The archived states in `chat`'s outbox, in order: (archived, version).
async fn archived_states(store: &dyn ChatStore, chat: ChatId) -> Vec<(bool, i64)> {
    let pending = store.pending(Some(chat), 100).await.unwrap();
    let changes = pending.into_iter().flat_map(|p| p.changes);
    changes
        .filter_map(|c| match c.change {
            Some(mpb::chat_change::Change::ChatArchived(a)) => Some((a.archived, a.version)),
            _ => None,
        })
        .collect()
}

/// Each archive and unarchive raises the chat's archive version, with its
/// state in an outbox entry of its own after the update's; a repeat
/// changes nothing.
async fn an_archive_puts_the_chats_archived_state_in_the_outbox_after_its_update(store: &dyn ChatStore) {
    let [alice, bob] = std::array::from_fn(|_| UserId::new_v7());
    let group = create(store, chat(alice, 1), &[bob]).await;
    let mut seen = 0;
    outbox_after(store, group.id, &mut seen).await;
    let title = &group.title;
    store.set_archived(group.id, Some(2), 2, Some(alice)).await.unwrap().unwrap().done();
    let entries = store.pending(Some(group.id), 100).await.unwrap().len();
    let archived = [format!("updated archived {title} archived=true"), "archived=true 1".to_owned()];
    assert_eq!(outbox_after(store, group.id, &mut seen).await, archived);
    store.set_archived(group.id, Some(3), 3, Some(alice)).await.unwrap().unwrap().done();
    assert_eq!(outbox_after(store, group.id, &mut seen).await, Vec::<String>::new(), "a repeat puts nothing");
    store.set_archived(group.id, None, 4, None).await.unwrap().unwrap().done();
    let unarchived = [format!("updated archived {title} archived=false"), "archived=false 2".to_owned()];
    assert_eq!(outbox_after(store, group.id, &mut seen).await, unarchived);
    let after = store.pending(Some(group.id), 100).await.unwrap().len();
    assert_eq!(after - entries, 2, "the state in an entry of its own, after the update's");
}

async fn a_change_of_a_pairs_blocks_puts_their_direct_chats_closure_in_the_outbox(store: &dyn ChatStore) {
    let [alice, bob, carol] = std::array::from_fn(|_| UserId::new_v7());
    let mut direct = chat(alice, 1);
    direct.kind = Kind::Direct;
    direct.title = String::new();
    let direct = create(store, direct, &[bob]).await;
    let group = create(store, chat(alice, 2), &[bob]).await;
    assert_eq!(closures(store, direct.id).await, [], "none before a block");

    assert_eq!(store.block(alice, bob, 3, 10).await.unwrap(), Blocked::Done);
    assert_eq!(closures(store, direct.id).await, [(true, 1)]);
    assert_eq!(store.block(alice, bob, 4, 10).await.unwrap(), Blocked::Done);
    assert_eq!(closures(store, direct.id).await, [(true, 1)], "a repeat changes nothing");
    assert_eq!(store.block(bob, alice, 5, 10).await.unwrap(), Blocked::Done);
    store.unblock(alice, bob, 6).await.unwrap();
    assert_eq!(
        closures(store, direct.id).await,
        [(true, 1), (true, 2), (true, 3)],
        "closed while bob still blocks alice"
    );
    store.unblock(alice, bob, 7).await.unwrap();
    assert_eq!(closures(store, direct.id).await.len(), 3, "no block to take back: nothing");
    store.unblock(bob, alice, 8).await.unwrap();
    assert_eq!(closures(store, direct.id).await.last(), Some(&(false, 4)), "open again");
    assert_eq!(closures(store, group.id).await, [], "a group is never closed");

    // No direct chat: nothing to close.
    assert_eq!(store.block(alice, carol, 9, 10).await.unwrap(), Blocked::Done);
    assert_eq!(
        store
            .pending(None, 100)
            .await
            .unwrap()
            .iter()
            .filter(|p| p.chat_id != direct.id && p.chat_id != group.id)
            .count(),
        0
    );

    // A deleted user's blocks go, and their direct chats open.
    assert_eq!(store.block(bob, alice, 10, 10).await.unwrap(), Blocked::Done);
    assert_eq!(closures(store, direct.id).await.last(), Some(&(true, 5)));
    store.record_forgotten(alice, 11).await.unwrap();
    assert_eq!(closures(store, direct.id).await.last(), Some(&(false, 6)));
}

impl Fixture {
    /// Runs `sql` on the store's database behind the store's back: rows as
    /// an earlier release left them.
    async fn execute(&self, sql: &str) {
        match &self.cleanup {
            Cleanup::Dir(dir) => {
                let conn = rusqlite::Connection::open(dir.path().join("chats.db")).unwrap();
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
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
}

/// Direct chats blocked under a release before closures (block version 0,
/// nothing in the outbox) get their closure once, at version 1; chats
/// without blocks, or versioned already, none.
async fn chats_blocked_before_closures_get_theirs_once(fixture: Fixture) {
    let store = &*fixture.store;
    let [alice, bob, carol, dave] = std::array::from_fn(|_| UserId::new_v7());
    let (blocked, members) = direct_of(alice, bob, 1);
    assert_eq!(store.create_chat(&blocked, &members).await.unwrap(), Created::Created);
    let (open, members) = direct_of(alice, carol, 2);
    assert_eq!(store.create_chat(&open, &members).await.unwrap(), Created::Created);
    let group = create(store, chat(bob, 3), &[alice]).await;
    assert_eq!(store.block(bob, alice, 4, 10).await.unwrap(), Blocked::Done);
    fixture.execute("UPDATE chats SET block_version = 0; DELETE FROM chat_outbox").await;
    let (versioned, members) = direct_of(dave, bob, 5);
    assert_eq!(store.create_chat(&versioned, &members).await.unwrap(), Created::Created);
    assert_eq!(store.block(dave, bob, 6, 10).await.unwrap(), Blocked::Done);

    assert_eq!(store.version_old_blocks(7, 100).await.unwrap(), 1);
    assert_eq!(closures(store, blocked.id).await, [(true, 1)]);
    assert_eq!(closures(store, versioned.id).await, [(true, 1)], "its own block's, not a second");
    assert_eq!((closures(store, open.id).await, closures(store, group.id).await), (vec![], vec![]));
    assert_eq!(store.version_old_blocks(8, 100).await.unwrap(), 0, "once");
    assert_eq!(closures(store, blocked.id).await.len(), 1);
    fixture.done().await;
}

#[tokio::test]
async fn chats_blocked_before_closures_get_theirs_once_sqlite() {
    chats_blocked_before_closures_get_theirs_once(Fixture::sqlite().await).await;
}

#[tokio::test]
async fn chats_blocked_before_closures_get_theirs_once_postgres() {
    let Some(fixture) = Fixture::postgres().await else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL is not set");
        return;
    };
    chats_blocked_before_closures_get_theirs_once(fixture).await;
}

/// Chats archived under a release before archived states (archive version
/// 0, nothing in the outbox) get theirs once, at version 1; chats not
/// archived, or versioned already, none.
async fn chats_archived_before_archived_states_get_theirs_once(fixture: Fixture) {
    let store = &*fixture.store;
    let [alice, bob] = std::array::from_fn(|_| UserId::new_v7());
    let old = create(store, chat(alice, 1), &[bob]).await;
    let open = create(store, chat(alice, 2), &[bob]).await;
    store.set_archived(old.id, Some(3), 3, None).await.unwrap().unwrap().done();
    fixture.execute("UPDATE chats SET archive_version = 0; DELETE FROM chat_outbox").await;
    let versioned = create(store, chat(bob, 4), &[alice]).await;
    store.set_archived(versioned.id, Some(5), 5, None).await.unwrap().unwrap().done();

    assert_eq!(store.version_old_archives(6, 100).await.unwrap(), 1);
    assert_eq!(archived_states(store, old.id).await, [(true, 1)]);
    assert_eq!(archived_states(store, versioned.id).await, [(true, 1)], "its own archive's, not a second");
    assert_eq!(archived_states(store, open.id).await, []);
    assert_eq!(store.version_old_archives(7, 100).await.unwrap(), 0, "once");
    store.set_archived(old.id, None, 8, None).await.unwrap().unwrap().done();
    assert_eq!(archived_states(store, old.id).await, [(true, 1), (false, 2)], "then raised as any");
    fixture.done().await;
}

#[tokio::test]
async fn chats_archived_before_archived_states_get_theirs_once_sqlite() {
    chats_archived_before_archived_states_get_theirs_once(Fixture::sqlite().await).await;
}

#[tokio::test]
async fn chats_archived_before_archived_states_get_theirs_once_postgres() {
    let Some(fixture) = Fixture::postgres().await else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL is not set");
        return;
    };
    chats_archived_before_archived_states_get_theirs_once(fixture).await;
}

/// A new direct chat of `creator` and `other`, as CreateChat writes it.
fn direct_of(creator: UserId, other: UserId, time: i64) -> (Chat, [Member; 2]) {
    let mut direct = chat(creator, time);
    direct.kind = Kind::Direct;
    direct.title = String::new();
    direct.member_count = 2;
    let members = [member(&direct, creator, time), member(&direct, other, time)];
    (direct, members)
}

/// Blocks committed after the service checked them (a BlockUser between
/// the check and the write): the write reads them in its transaction and
/// writes nothing.
async fn an_add_or_a_creation_checks_blocks_in_its_write(store: &dyn ChatStore) {
    let [alice, bob, carol, dave] = std::array::from_fn(|_| UserId::new_v7());
    let team = create(store, chat(carol, 1), &[bob]).await;
    let outbox = store.pending(None, 100).await.unwrap();
    assert_eq!(store.block(alice, carol, 2, 10).await.unwrap(), Blocked::Done);

    let limits = Limits::default();
    let wanted = [member(&team, dave, 3), member(&team, alice, 3)];
    assert_eq!(
        store.add_members(team.id, Adder::Manager(carol), &wanted, &limits, 3).await.unwrap(),
        Added::Blocked(alice)
    );
    assert_eq!((store.role(team.id, alice).await.unwrap(), store.role(team.id, dave).await.unwrap()), (None, None));
    let mut group = chat(carol, 4);
    group.member_count = 2;
    let members = [owner(&group), member(&group, alice, 4)];
    assert_eq!(store.create_chat(&group, &members).await.unwrap(), Created::Blocked(alice));
    assert_eq!(store.chat(group.id).await.unwrap(), None, "nothing written");
    let (direct, members) = direct_of(carol, alice, 5);
    assert_eq!(store.create_chat(&direct, &members).await.unwrap(), Created::Blocked(alice), "the other blocks");
    let (direct, members) = direct_of(alice, carol, 6);
    assert_eq!(store.create_chat(&direct, &members).await.unwrap(), Created::Blocked(alice), "the creator blocks");
    assert_eq!(store.pending(None, 100).await.unwrap(), outbox, "no join announced");

    // Whom the adder blocks may still be added (groups go on); a join, or
    // an add nobody makes, is no one's to refuse.
    assert_eq!(store.block(carol, dave, 7, 10).await.unwrap(), Blocked::Done);
    assert!(matches!(
        store.add_members(team.id, Adder::Manager(carol), &wanted[..1], &limits, 8).await.unwrap(),
        Added::Added(_)
    ));
    assert!(matches!(
        store.add_members(team.id, Adder::Unchecked, &wanted[1..], &limits, 9).await.unwrap(),
        Added::Added(_)
    ));
}

/// PostgreSQL, two transactions by hand: an add whose write reaches the
/// blocks while a block of the same pair is under way (its transaction
/// holds the blocker's lock and its row) waits for it, then reads it and
/// writes nothing. (SQLite runs one write at a time.)
#[tokio::test]
async fn an_add_waiting_on_a_block_under_way_is_refused_once_it_commits() {
    use sqlx::{Connection as _, Executor as _};
    let Some(fixture) = Fixture::postgres().await else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL is not set");
        return;
    };
    let Cleanup::Schema { url, schema } = &fixture.cleanup else { unreachable!() };
    let store = fixture.store.clone();
    let [alice, carol] = std::array::from_fn(|_| UserId::new_v7());
    let team = create(&*store, chat(carol, 1), &[]).await;

    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    conn.execute(sqlx::AssertSqlSafe(format!("SET search_path TO {schema}"))).await.unwrap();
    let mut block = conn.begin().await.unwrap();
    // What ChatStore::block does before its commit.
    sqlx::query(concat!("SELECT pg_advisory_xact_lock(", super::postgres::blocker_lock!("$1"), ")"))
        .bind(alice.to_string())
        .execute(&mut *block)
        .await
        .unwrap();
    sqlx::query("INSERT INTO blocks (user_id, blocked_user_id, block_time) VALUES ($1, $2, 2)")
        .bind(alice.to_string())
        .bind(carol.to_string())
        .execute(&mut *block)
        .await
        .unwrap();
    let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *block).await.unwrap();
    let adding = tokio::spawn({
        let store = store.clone();
        let alice = member(&team, alice, 3);
        async move { store.add_members(team.id, Adder::Manager(carol), &[alice], &Limits::default(), 3).await.unwrap() }
    });
    natter_db::testing::wait_until_blocked_by(url, holder, || adding.is_finished()).await;
    block.commit().await.unwrap();
    assert_eq!(adding.await.unwrap(), Added::Blocked(alice), "the add read the block committed while it waited");
    assert_eq!(store.role(team.id, alice).await.unwrap(), None);
    drop(conn);
    fixture.done().await;
}

async fn users_in_groups_counts_current_group_memberships(store: &dyn ChatStore) {
    let [alice, bob, carol, nobody] = std::array::from_fn(|_| UserId::new_v7());
    let first = create(store, chat(alice, 1), &[bob]).await;
    let mut public = chat(carol, 2);
    public.visibility = Visibility::Public;
    create(store, public, &[alice]).await;
    let archived = create(store, chat(alice, 3), &[carol]).await;
    assert!(store.set_archived(archived.id, Some(4), 4, None).await.unwrap().is_some());
    let mut direct = chat(bob, 5);
    direct.kind = Kind::Direct;
    direct.title = String::new();
    create(store, direct, &[carol]).await;

    // Groups: alice 3 (private, public, archived); bob 1 and a direct chat;
    // carol 2 and a direct chat; nobody none.
    let users = [alice, bob, carol, nobody, alice];
    let at = |n| async move { store.users_in_groups(&users, n).await.unwrap().into_iter().collect::<HashSet<_>>() };
    assert_eq!(at(1).await, HashSet::from([alice, bob, carol]));
    assert_eq!(at(2).await, HashSet::from([alice, carol]), "archived and public groups count, direct chats not");
    assert_eq!(at(3).await, HashSet::from([alice]));
    assert_eq!(at(4).await, HashSet::new());
    assert_eq!(store.users_in_groups(&users, 3).await.unwrap(), [alice], "each user once");
    assert_eq!(store.users_in_groups(&[], 1).await.unwrap(), []);

    // A group left is not counted.
    assert_eq!(store.remove_member(first.id, bob, LEAVE, 6).await.unwrap(), Checked::Done(()));
    assert_eq!(store.users_in_groups(&[bob], 1).await.unwrap(), []);
}

async fn a_followed_position_only_moves_forward(store: &dyn ChatStore) {
    assert_eq!(store.followed("log").await.unwrap(), 0, "not followed yet");
    store.follow_to("log", 5).await.unwrap();
    store.follow_to("log", 3).await.unwrap();
    assert_eq!(store.followed("log").await.unwrap(), 5, "a replica behind moves nothing back");
    store.follow_to("log", 7).await.unwrap();
    assert_eq!((store.followed("log").await.unwrap(), store.followed("other").await.unwrap()), (7, 0));
}

async fn failed_items_of_a_log_wait_once_each_until_retried(store: &dyn ChatStore) {
    let backoff = Backoff { first: 10, max: 35 };
    assert_eq!(store.retries("log", 0, 10).await.unwrap(), Vec::<String>::new());
    // Failed at 0 ("b" twice: its wait doubles), "c" at 1.
    for (item, now) in [("b", 0), ("a", 0), ("b", 0), ("c", 1)] {
        store.retry_later("log", item, now, backoff).await.unwrap();
    }
    store.retry_later("other", "a", 0, backoff).await.unwrap();
    assert_eq!(store.retries("log", 9, 10).await.unwrap(), Vec::<String>::new(), "none due yet");
    assert_eq!(store.retries("log", 11, 10).await.unwrap(), ["a", "c"], "once each, the longest due first");
    assert_eq!(store.retries("log", 20, 10).await.unwrap(), ["a", "c", "b"]);
    assert_eq!(store.retries("log", 20, 2).await.unwrap(), ["a", "c"], "a page");
    // "a" fails again at 20: due after twice its wait, behind the others.
    store.retry_later("log", "a", 20, backoff).await.unwrap();
    assert_eq!(store.retries("log", 39, 10).await.unwrap(), ["c", "b"]);
    assert_eq!(store.retries("log", 40, 10).await.unwrap(), ["c", "b", "a"]);
    // The wait stops growing at the bound: 40, then 35, not 80.
    store.retry_later("log", "a", 40, backoff).await.unwrap();
    assert_eq!(store.retries("log", 74, 10).await.unwrap(), ["c", "b"]);
    assert_eq!(store.retries("log", 75, 10).await.unwrap(), ["c", "b", "a"]);
    // Kept before waits were (0 for both): failing again, it waits `first`.
    store.retry_later("log", "d", 0, Backoff { first: 0, max: 0 }).await.unwrap();
    store.retry_later("log", "d", 80, backoff).await.unwrap();
    assert_eq!(store.retries("log", 89, 10).await.unwrap(), ["c", "b", "a"]);
    assert_eq!(store.retries("log", 90, 10).await.unwrap(), ["c", "b", "a", "d"]);
    store.retried("log", "a").await.unwrap();
    store.retried("log", "d").await.unwrap();
    store.retried("log", "z").await.unwrap();
    assert_eq!(store.retries("log", 100, 10).await.unwrap(), ["c", "b"]);
    assert_eq!(store.retries("other", 100, 10).await.unwrap(), ["a"], "each log its own");
}

async fn a_forgotten_user_is_never_made_a_member_again(store: &dyn ChatStore) {
    let (alice, bob, carol) = (UserId::new_v7(), UserId::new_v7(), UserId::new_v7());
    let group = create(store, chat(alice, 1), &[]).await;
    store.record_forgotten(bob, 2).await.unwrap();
    store.record_forgotten(bob, 3).await.unwrap();

    let limits = Limits::default();
    let wanted = [member(&group, carol, 4), member(&group, bob, 4)];
    assert_eq!(
        store.add_members(group.id, Adder::Unchecked, &wanted, &limits, 4).await.unwrap(),
        Added::Forgotten(bob)
    );
    let unchanged = store.chat(group.id).await.unwrap().unwrap();
    assert_eq!((unchanged.member_count, unchanged.update_time), (1, 1), "nothing written, carol neither");

    let mut with_bob = chat(alice, 5);
    with_bob.member_count = 2;
    let members = [owner(&with_bob), member(&with_bob, bob, 5)];
    assert_eq!(store.create_chat(&with_bob, &members).await.unwrap(), Created::Forgotten(bob));
    assert_eq!(store.chat(with_bob.id).await.unwrap(), None);
    let mut by_bob = chat(bob, 6);
    by_bob.member_count = 1;
    assert_eq!(store.create_chat(&by_bob, &[owner(&by_bob)]).await.unwrap(), Created::Forgotten(bob));
    assert_eq!(store.member_chat_ids(bob, false).await.unwrap(), []);
    assert_eq!(
        store.add_members(group.id, Adder::Unchecked, &wanted[..1], &limits, 7).await.unwrap(),
        Added::Added(vec![wanted[0]])
    );

    // A member forgotten since is none to mention, though still listed.
    store.record_forgotten(carol, 8).await.unwrap();
    assert_eq!(store.members_among(group.id, &[alice, carol]).await.unwrap(), [alice]);
    assert_eq!(store.role(group.id, carol).await.unwrap(), Some(Role::Member));
}

async fn privacy_settings_are_each_users_own_and_go_with_a_forgotten_user(store: &dyn ChatStore) {
    let (alice, bob, carol) = (UserId::new_v7(), UserId::new_v7(), UserId::new_v7());
    assert_eq!(store.privacy_settings(alice).await.unwrap(), None, "none set");
    assert_eq!(store.privacy_among(&[alice, bob]).await.unwrap(), []);

    let peers = PrivacyChoices { group_adds: Some(GroupAdds::Peers), ..PrivacyChoices::default() };
    let stored = store.set_privacy_settings(alice, peers, 10).await.unwrap().unwrap();
    assert_eq!(stored, StoredPrivacy { choices: peers, update_time: 10 });
    let nobody = PrivacyChoices {
        group_adds: Some(GroupAdds::Nobody),
        direct_chats: Some(DirectChats::Peers),
        read_receipts: Some(ReadReceipts::Nobody),
    };
    store.set_privacy_settings(bob, nobody, 11).await.unwrap();
    let nobody = store.set_privacy_settings(bob, nobody, 12).await.unwrap().unwrap();
    assert_eq!(nobody.update_time, 12, "a repeat stores its own time");
    assert_eq!(store.privacy_settings(bob).await.unwrap(), Some(nobody));
    assert_eq!(store.privacy_settings(alice).await.unwrap(), Some(stored), "each user's own");

    // An update sets what it names and keeps the rest.
    let direct = PrivacyChoices { direct_chats: Some(DirectChats::Nobody), ..PrivacyChoices::default() };
    let merged = store.set_privacy_settings(alice, direct, 13).await.unwrap().unwrap();
    let both = PrivacyChoices {
        group_adds: Some(GroupAdds::Peers),
        direct_chats: Some(DirectChats::Nobody),
        read_receipts: None,
    };
    assert_eq!(merged, StoredPrivacy { choices: both, update_time: 13 });
    let receipts = PrivacyChoices { read_receipts: Some(ReadReceipts::Everyone), ..PrivacyChoices::default() };
    let bob_shares = store.set_privacy_settings(bob, receipts, 14).await.unwrap().unwrap();
    assert_eq!(bob_shares.choices, PrivacyChoices { read_receipts: Some(ReadReceipts::Everyone), ..nobody.choices });
    let only_direct = store.set_privacy_settings(carol, direct, 15).await.unwrap().unwrap();
    assert_eq!(only_direct.choices, direct, "the others stay unset: the defaults apply");
    assert_eq!(store.privacy_settings(alice).await.unwrap(), Some(merged));

    let dave = UserId::new_v7();
    let mut among = store.privacy_among(&[alice, bob, carol, dave]).await.unwrap();
    among.sort_by_key(|(user, _)| *user);
    assert_eq!(among, [(alice, both), (bob, bob_shares.choices), (carol, direct)], "dave set none");
    assert_eq!(store.privacy_among(&[]).await.unwrap(), []);

    store.record_forgotten(bob, 16).await.unwrap();
    assert_eq!(store.privacy_settings(bob).await.unwrap(), None, "gone with the user");
    assert_eq!(store.privacy_among(&[alice, bob]).await.unwrap(), [(alice, both)]);
}

/// What the chats service relies on to take a deleted user out for good:
/// an add that races the record either is refused, or is committed by the
/// time the record is, so that the read of the user's chats after the
/// record finds it.
async fn a_membership_write_beside_a_forgetting_is_refused_or_seen(store: &dyn ChatStore) {
    let alice = UserId::new_v7();
    let group = create(store, chat(alice, 1), &[]).await;
    let limits = Limits::default();
    for round in 0..30 {
        let user = UserId::new_v7();
        let joining = [member(&group, user, round)];
        let (added, seen) =
            tokio::join!(store.add_members(group.id, Adder::Unchecked, &joining, &limits, round), async {
                store.record_forgotten(user, round).await.unwrap();
                store.member_chat_ids(user, false).await.unwrap()
            });
        match added.unwrap() {
            Added::Forgotten(refused) => assert_eq!(refused, user),
            Added::Added(_) => assert_eq!(seen, [group.id], "round {round}: an add that went in is seen"),
            other => panic!("round {round}: {other:?}"),
        }
    }
}

/// A block racing its target's forgetting (BlockUser beside the account's
/// deletion) either is refused or goes with the forgetting: no block of a
/// deleted user is left behind.
async fn a_block_beside_a_forgetting_leaves_no_row(store: &dyn ChatStore) {
    let alice = UserId::new_v7();
    for round in 0..30 {
        let user = UserId::new_v7();
        let (blocked, forgotten) =
            tokio::join!(store.block(alice, user, round, 100), store.record_forgotten(user, round));
        forgotten.unwrap();
        match blocked.unwrap() {
            Blocked::Done | Blocked::Forgotten(_) => {}
            Blocked::TooMany => panic!("round {round}: at most 30 blocks of a limit of 100"),
        }
        let left: Vec<UserId> =
            store.blocked_users(alice, None, 100).await.unwrap().into_iter().map(|(u, _)| u).collect();
        assert!(!left.contains(&user), "round {round}: a block of a forgotten user is left");
    }
}

/// Blocks racing each other at the limit (one user's BlockUser calls at
/// once, each of another user) pass it by none: with room for one more
/// block, exactly one of 8 is done and the others are refused.
async fn blocks_racing_each_other_at_the_limit_pass_it_by_none(store: &dyn ChatStore) {
    const LIMIT: usize = 4;
    for round in 0..5 {
        let alice = UserId::new_v7();
        for time in 0..3 {
            assert_eq!(store.block(alice, UserId::new_v7(), time, LIMIT).await.unwrap(), Blocked::Done);
        }
        let block = || store.block(alice, UserId::new_v7(), 10, LIMIT);
        let (a, b, c, d, e, f, g, h) =
            tokio::join!(block(), block(), block(), block(), block(), block(), block(), block());
        let outcomes = [a, b, c, d, e, f, g, h].map(Result::unwrap);
        let done = outcomes.iter().filter(|o| **o == Blocked::Done).count();
        let refused = outcomes.iter().filter(|o| **o == Blocked::TooMany).count();
        assert_eq!((done, refused), (1, 7), "round {round}: {outcomes:?}");
        assert_eq!(store.blocked_users(alice, None, 100).await.unwrap().len(), LIMIT, "round {round}");
    }
}

/// A privacy update racing the user's forgetting (UpdatePrivacySettings
/// beside the account's deletion) either is refused or goes with the
/// forgetting: no settings of a deleted user are left behind.
async fn a_privacy_update_beside_a_forgetting_leaves_no_row(store: &dyn ChatStore) {
    let nobody = PrivacyChoices { read_receipts: Some(ReadReceipts::Nobody), ..PrivacyChoices::default() };
    for round in 0..30 {
        let user = UserId::new_v7();
        let (set, forgotten) =
            tokio::join!(store.set_privacy_settings(user, nobody, round), store.record_forgotten(user, round));
        forgotten.unwrap();
        set.unwrap();
        assert_eq!(store.privacy_settings(user).await.unwrap(), None, "round {round}: settings of a forgotten user");
    }
    let gone = UserId::new_v7();
    store.record_forgotten(gone, 1).await.unwrap();
    assert_eq!(store.set_privacy_settings(gone, nobody, 2).await.unwrap(), None, "refused once forgotten");
}

/// Every member a deletion takes out is told (its removal goes to the
/// outbox): a joiner whose add raced the deletion is among them, or the add
/// failed (the chat was gone).
async fn a_chat_deleted_beside_an_add_removes_the_joiner_too(store: &dyn ChatStore) {
    let limits = Limits::default();
    for round in 0..20 {
        let (owner, joiner) = (UserId::new_v7(), UserId::new_v7());
        let group = create(store, chat(owner, 1), &[]).await;
        let joining = [member(&group, joiner, 2)];
        let (added, removed) = tokio::join!(
            store.add_members(group.id, Adder::Unchecked, &joining, &limits, 2),
            store.delete_chat(group.id, 3, Some(owner))
        );
        let removed = done(removed.unwrap());
        match added.unwrap() {
            Added::Added(added) => {
                assert_eq!(added, joining);
                assert!(removed.contains(&joiner), "round {round}: the joiner is removed with the chat: {removed:?}");
            }
            Added::ChatGone => {}
            other => panic!("round {round}: {other:?}"),
        }
        assert_eq!(store.member_chat_ids(joiner, false).await.unwrap(), []);
    }
    // After the deletion: the chat is gone, not a database error.
    let (owner, joiner) = (UserId::new_v7(), UserId::new_v7());
    let group = create(store, chat(owner, 1), &[]).await;
    done(store.delete_chat(group.id, 2, None).await.unwrap());
    let late = store.add_members(group.id, Adder::Unchecked, &[member(&group, joiner, 3)], &limits, 3).await;
    assert_eq!(late.unwrap(), Added::ChatGone);
}

/// An add is checked again under the chat's lock, as the adder stands
/// there: an admin demoted or removed since the service's check adds
/// nobody, nor does a join of a chat made private since.
async fn an_add_by_one_who_may_no_longer_add_writes_nothing(store: &dyn ChatStore) {
    let limits = Limits::default();
    let [owner, admin, plain, joiner, newcomer] = std::array::from_fn(|_| UserId::new_v7());
    let group = create(store, chat(owner, 1), &[admin, plain]).await;
    store.set_role(group.id, owner, admin, Role::Admin, 2).await.unwrap();
    let add = |by, user| {
        let m = [member(&group, user, 3)];
        async move { store.add_members(group.id, by, &m, &limits, 3).await.unwrap() }
    };
    assert_eq!(add(Adder::Manager(plain), newcomer).await, Added::Refused, "a plain member");
    assert_eq!(add(Adder::Manager(joiner), newcomer).await, Added::Refused, "no member");
    assert_eq!(add(Adder::Joiner, joiner).await, Added::Refused, "a join of a private chat");
    assert_eq!(store.member_chat_ids(newcomer, false).await.unwrap(), [], "nobody added");
    assert_eq!(store.member_chat_ids(joiner, false).await.unwrap(), []);
    assert_eq!(add(Adder::Manager(admin), newcomer).await, Added::Added(vec![member(&group, newcomer, 3)]));
    assert_eq!(add(Adder::Manager(owner), plain).await, Added::Added(Vec::new()), "a member already");
    // Demoted: an add under way since before that adds nobody.
    store.set_role(group.id, owner, admin, Role::Member, 4).await.unwrap();
    assert_eq!(add(Adder::Manager(admin), joiner).await, Added::Refused, "demoted");
    let public = create(store, Chat { visibility: Visibility::Public, ..chat(owner, 5) }, &[]).await;
    let join = [member(&public, joiner, 6)];
    assert_eq!(
        store.add_members(public.id, Adder::Joiner, &join, &limits, 6).await.unwrap(),
        Added::Added(join.to_vec())
    );
}

/// GetPresence's rule: a peer shares a chat with the user now. A chat the
/// candidate left, a chat the user left, or a public chat neither shares
/// does not make one.
async fn peers_are_members_now_of_a_chat_shared_now(store: &dyn ChatStore) {
    let [alice, bob, carol, dave, erin, stranger] = std::array::from_fn(|_| UserId::new_v7());
    let with_bob = create(store, chat(alice, 1), &[bob, carol]).await;
    create(store, chat(dave, 2), &[alice]).await;
    let erin_left = create(store, chat(erin, 3), &[alice, carol]).await;
    assert_eq!(store.remove_member(erin_left.id, alice, LEAVE, 4).await.unwrap(), Checked::Done(()));
    assert_eq!(store.remove_member(with_bob.id, carol, LEAVE, 5).await.unwrap(), Checked::Done(()));
    let mut public = chat(stranger, 6);
    public.visibility = Visibility::Public;
    create(store, public, &[]).await;

    let candidates = [bob, carol, dave, erin, stranger, alice, bob];
    let peers: HashSet<UserId> =
        store.peers_among(alice, &candidates, Peers::Presence).await.unwrap().into_iter().collect();
    assert_eq!(peers, HashSet::from([bob, dave, alice]), "carol and erin share only chats left; stranger none");
    let peers = store.peers_among(alice, &candidates, Peers::Presence).await.unwrap();
    assert_eq!(peers.len(), 3, "each peer once: {peers:?}");
    assert_eq!(
        store.peers_among(carol, &[alice, erin], Peers::Presence).await.unwrap(),
        [erin],
        "carol is still in erin's chat"
    );
    assert_eq!(store.peers_among(alice, &[], Peers::Presence).await.unwrap(), []);
    assert_eq!(
        store.peers_among(UserId::new_v7(), &[alice], Peers::Presence).await.unwrap(),
        [],
        "a user in no chat has none"
    );

    // A deleted account stays in a direct chat with a person (its history
    // stays theirs) but is no one's peer.
    let mut direct = chat(alice, 7);
    direct.kind = Kind::Direct;
    direct.title = String::new();
    let direct = create(store, direct, &[erin]).await;
    assert_eq!(store.peers_among(alice, &[erin], Peers::Presence).await.unwrap(), [erin]);
    store.record_forgotten(erin, 8).await.unwrap();
    assert!(store.member_chat_ids(erin, false).await.unwrap().contains(&direct.id), "still a member");
    assert_eq!(store.peers_among(alice, &[erin], Peers::Presence).await.unwrap(), [], "deleted: no one's peer");

    // A public group makes its members peers for presence, not for the
    // privacy settings: anyone may join one.
    let mut open_group = chat(stranger, 9);
    open_group.visibility = Visibility::Public;
    create(store, open_group, &[alice]).await;
    assert_eq!(store.peers_among(alice, &[stranger], Peers::Presence).await.unwrap(), [stranger]);
    assert_eq!(store.peers_among(alice, &[stranger], Peers::Privacy).await.unwrap(), [], "a public chat aside");
    let peers: HashSet<UserId> =
        store.peers_among(alice, &[bob, dave, stranger], Peers::Privacy).await.unwrap().into_iter().collect();
    assert_eq!(peers, HashSet::from([bob, dave]), "private chats still count");

    // A block either way makes no peers for presence, and leaves the
    // privacy settings' peers (blocks are checked on their own there).
    assert_eq!(store.block(alice, bob, 10, 10).await.unwrap(), Blocked::Done);
    assert_eq!(store.block(dave, alice, 11, 10).await.unwrap(), Blocked::Done);
    let peers = store.peers_among(alice, &[bob, dave, stranger], Peers::Presence).await.unwrap();
    assert_eq!(peers, [stranger], "alice blocked bob, dave blocked alice");
    assert_eq!(store.peers_among(bob, &[alice], Peers::Presence).await.unwrap(), [], "both ways");
    assert_eq!(store.peers_among(dave, &[alice], Peers::Presence).await.unwrap(), []);
    let peers: HashSet<UserId> =
        store.peers_among(alice, &[bob, dave], Peers::Privacy).await.unwrap().into_iter().collect();
    assert_eq!(peers, HashSet::from([bob, dave]), "not the privacy settings'");
    store.unblock(alice, bob, 12).await.unwrap();
    assert_eq!(store.peers_among(alice, &[bob], Peers::Presence).await.unwrap(), [bob], "unblocked: a peer again");
}

/// The peers a user blocked or who blocked them, each once: no one they
/// share no chat with, nor anyone after an unblock.
async fn blocked_peers_are_those_sharing_a_chat_with_a_block_either_way(store: &dyn ChatStore) {
    let [alice, bob, carol, dave, stranger] = std::array::from_fn(|_| UserId::new_v7());
    create(store, chat(alice, 1), &[bob, carol, dave]).await;
    let mut direct = chat(alice, 2);
    direct.kind = Kind::Direct;
    direct.title = String::new();
    create(store, direct, &[bob]).await;
    assert_eq!(store.blocked_peers(alice).await.unwrap(), [], "no blocks");
    for (blocker, blocked, time) in [(alice, bob, 3), (bob, alice, 4), (carol, alice, 5), (alice, stranger, 6)] {
        assert_eq!(store.block(blocker, blocked, time, 10).await.unwrap(), Blocked::Done);
    }
    let blocked: HashSet<UserId> = store.blocked_peers(alice).await.unwrap().into_iter().collect();
    assert_eq!(blocked, HashSet::from([bob, carol]), "both ways; the stranger shares no chat");
    assert_eq!(store.blocked_peers(alice).await.unwrap().len(), 2, "bob once, blocked both ways");
    assert_eq!(store.blocked_peers(carol).await.unwrap(), [alice]);
    assert_eq!(store.blocked_peers(dave).await.unwrap(), []);
    assert_eq!(store.blocked_peers(stranger).await.unwrap(), [], "in no chat with alice");
    store.unblock(alice, bob, 7).await.unwrap();
    store.unblock(carol, alice, 8).await.unwrap();
    assert_eq!(store.blocked_peers(alice).await.unwrap(), [bob], "bob still blocks alice");
    store.unblock(bob, alice, 9).await.unwrap();
    assert_eq!(store.blocked_peers(bob).await.unwrap(), []);
}

/// A group chat created by `owner` at `time` µs, titled by its id.
pub(crate) fn chat(owner: UserId, time: i64) -> Chat {
    let id = ChatId::new_v7();
    Chat {
        id,
        kind: Kind::Group,
        title: format!("chat {id}"),
        description: String::new(),
        visibility: Visibility::Private,
        owner_id: owner,
        creator_id: owner,
        member_count: 1,
        archive_time: None,
        create_time: time,
        update_time: time,
        last_activity_time: time,
        last_seq: 0,
        last_message_time: None,
        assistant_replies: AssistantReplies::Mentions,
        members_version: 0,
    }
}

/// The owner's membership of `chat`.
pub(crate) fn owner(chat: &Chat) -> Member {
    Member { chat_id: chat.id, user_id: chat.owner_id, role: Role::Owner, join_time: chat.create_time }
}

fn member(chat: &Chat, user: UserId, join_time: i64) -> Member {
    Member { chat_id: chat.id, user_id: user, role: Role::Member, join_time }
}

/// A leave, as RemoveMember asks it: an admin or a plain member goes by
/// themselves.
const LEAVE: Removal<'static> =
    Removal { departure: Departure::Left, targets: &[Role::Admin, Role::Member], actor: None };

/// A removal by `actor`, who must still hold one of `required`, of a member
/// whose role is one of `targets`.
fn removed_by<'a>(actor: UserId, required: &'a [Role], targets: &'a [Role]) -> Removal<'a> {
    Removal { departure: Departure::Removed, targets, actor: Some((actor, required)) }
}

/// What a role-checked write answers when it went ahead.
fn done<T: std::fmt::Debug>(outcome: Checked<T>) -> T {
    match outcome {
        Checked::Done(answer) => answer,
        refused => panic!("refused: {refused:?}"),
    }
}

/// The owners among `chat`'s members, and the chat's `owner_id`.
async fn owners(store: &dyn ChatStore, chat: ChatId) -> (Vec<UserId>, UserId) {
    let members = store.members(chat, None, 100).await.unwrap();
    let owners = members.iter().filter(|m| m.role == Role::Owner).map(|m| m.user_id).collect();
    (owners, store.chat(chat).await.unwrap().unwrap().owner_id)
}

/// Creates `chat` with its owner and `others` as members (joined at its
/// create time).
async fn create(store: &dyn ChatStore, mut chat: Chat, others: &[UserId]) -> Chat {
    let mut members = vec![owner(&chat)];
    members.extend(others.iter().map(|u| member(&chat, *u, chat.create_time)));
    chat.member_count = members.len() as i64;
    assert_eq!(store.create_chat(&chat, &members).await.unwrap(), Created::Created);
    chat
}

fn ids(chats: &[ChatAccess]) -> Vec<ChatId> {
    chats.iter().map(|a| a.chat.id).collect()
}

async fn listed(store: &dyn ChatStore, user: UserId, filter: &ChatFilter) -> Vec<ChatId> {
    ids(&store.list_chats(user, filter, None, 100).await.unwrap())
}

async fn creating_a_chat_stores_it_and_its_members(store: &dyn ChatStore) {
    let (alice, bob, carol) = (UserId::new_v7(), UserId::new_v7(), UserId::new_v7());
    let mut group = chat(alice, 10);
    group.description = "about things".into();
    group.visibility = Visibility::Public;
    let group = create(store, group, &[bob, carol]).await;
    assert_eq!(store.chat(group.id).await.unwrap(), Some(group.clone()), "read back as written");
    assert_eq!(store.chat(ChatId::new_v7()).await.unwrap(), None);
    let members = store.members(group.id, None, 10).await.unwrap();
    let roles: HashSet<(UserId, Role)> = members.iter().map(|m| (m.user_id, m.role)).collect();
    assert_eq!(roles, HashSet::from([(alice, Role::Owner), (bob, Role::Member), (carol, Role::Member)]));
    assert_eq!(store.member_chat_ids(bob, false).await.unwrap(), [group.id]);
    assert_eq!(store.member_chat_ids(bob, true).await.unwrap(), [], "a plain member manages nothing");
    assert_eq!(store.member_chat_ids(alice, true).await.unwrap(), [group.id], "the owner does");
    assert_eq!(store.member_chat_ids(UserId::new_v7(), false).await.unwrap(), []);
}

async fn a_taken_id_or_direct_pair_is_a_conflict_that_writes_nothing(store: &dyn ChatStore) {
    let (alice, bob, carol) = (UserId::new_v7(), UserId::new_v7(), UserId::new_v7());
    let group = create(store, chat(alice, 1), &[]).await;
    // The same id again, with another member: a conflict, nothing written.
    let again = store.create_chat(&group, &[owner(&group), member(&group, carol, 1)]).await.unwrap();
    assert_eq!(again, Created::Conflict);
    assert_eq!(store.member_chat_ids(carol, false).await.unwrap(), []);

    let mut direct = chat(alice, 2);
    direct.kind = Kind::Direct;
    direct.title = String::new();
    let direct = create(store, direct, &[bob]).await;
    assert_eq!(store.direct_chat(bob, alice).await.unwrap().map(|c| c.id), Some(direct.id), "either order");
    assert_eq!(store.direct_chat(alice, carol).await.unwrap(), None);
    // Another direct chat of the same pair (another id, bob creating it).
    let mut twin = chat(bob, 3);
    twin.kind = Kind::Direct;
    twin.title = String::new();
    twin.member_count = 2;
    let members = [owner(&twin), member(&twin, alice, 3)];
    assert_eq!(store.create_chat(&twin, &members).await.unwrap(), Created::Conflict);
    assert_eq!(store.chat(twin.id).await.unwrap(), None);
    // A direct chat is two people.
    let mut lonely = chat(carol, 4);
    lonely.kind = Kind::Direct;
    assert!(store.create_chat(&lonely, &[owner(&lonely)]).await.is_err());
}

async fn access_tells_members_from_others(store: &dyn ChatStore) {
    let (alice, bob, eve) = (UserId::new_v7(), UserId::new_v7(), UserId::new_v7());
    let group = create(store, chat(alice, 1), &[bob]).await;
    let access = store.access(group.id, alice).await.unwrap().unwrap();
    assert_eq!((access.chat, access.role), (group.clone(), Some(Role::Owner)));
    assert_eq!(store.access(group.id, bob).await.unwrap().unwrap().role, Some(Role::Member));
    let outsider = store.access(group.id, eve).await.unwrap().unwrap();
    assert_eq!((outsider.chat.id, outsider.role), (group.id, None), "the chat, but no role");
    assert_eq!(store.access(ChatId::new_v7(), alice).await.unwrap(), None);
    assert_eq!(store.role(group.id, bob).await.unwrap(), Some(Role::Member));
    assert_eq!(store.role(group.id, eve).await.unwrap(), None);
    // Several users at once (a message's mentions): only the members.
    let mut among = store.members_among(group.id, &[eve, bob, alice, bob]).await.unwrap();
    among.sort();
    among.dedup();
    let mut both = vec![alice, bob];
    both.sort();
    assert_eq!(among, both);
    assert_eq!(store.members_among(group.id, &[eve]).await.unwrap(), []);
    assert_eq!(store.members_among(ChatId::new_v7(), &[alice]).await.unwrap(), []);
    assert_eq!(store.members_among(group.id, &[]).await.unwrap(), []);
}

async fn members_are_added_once_and_removed(store: &dyn ChatStore) {
    let (alice, bob, carol) = (UserId::new_v7(), UserId::new_v7(), UserId::new_v7());
    let group = create(store, chat(alice, 1), &[bob]).await;
    let limits = Limits::default();
    let wanted = [member(&group, bob, 5), member(&group, carol, 5)];
    let added = store.add_members(group.id, Adder::Unchecked, &wanted, &limits, 5).await.unwrap();
    assert_eq!(added, Added::Added(vec![wanted[1]]), "bob was in already");
    let after = store.chat(group.id).await.unwrap().unwrap();
    assert_eq!((after.member_count, after.update_time), (3, 5));
    assert_eq!(store.role(group.id, carol).await.unwrap(), Some(Role::Member));

    assert_eq!(store.remove_member(group.id, bob, LEAVE, 6).await.unwrap(), Checked::Done(()));
    let again = store.remove_member(group.id, bob, LEAVE, 7).await.unwrap();
    assert_eq!(again, Checked::NotMember, "not a member any more");
    let after = store.chat(group.id).await.unwrap().unwrap();
    assert_eq!(after.member_count, 2);
    assert_eq!(store.member_chat_ids(bob, false).await.unwrap(), []);
}

async fn the_member_limit_is_checked_under_the_chats_lock(store: &dyn ChatStore) {
    let alice = UserId::new_v7();
    let group = create(store, chat(alice, 1), &[UserId::new_v7()]).await;
    let limits = Limits { group_members: 4, ..Limits::default() };
    let three: Vec<Member> = (0..3).map(|_| member(&group, UserId::new_v7(), 2)).collect();
    assert_eq!(store.add_members(group.id, Adder::Unchecked, &three, &limits, 2).await.unwrap(), Added::TooMany(5));
    let unchanged = store.chat(group.id).await.unwrap().unwrap();
    assert_eq!((unchanged.member_count, unchanged.update_time), (2, 1), "nothing written");
    assert_eq!(store.members(group.id, None, 10).await.unwrap().len(), 2);
    // Two adds of two at once to a chat of two with room for two more:
    // exactly one fits, whatever the interleaving.
    let (a, b): (Vec<Member>, Vec<Member>) = (
        (0..2).map(|_| member(&group, UserId::new_v7(), 3)).collect(),
        (0..2).map(|_| member(&group, UserId::new_v7(), 3)).collect(),
    );
    let (first, second) = tokio::join!(
        store.add_members(group.id, Adder::Unchecked, &a, &limits, 3),
        store.add_members(group.id, Adder::Unchecked, &b, &limits, 3)
    );
    let outcomes = [first.unwrap(), second.unwrap()];
    assert_eq!(outcomes.iter().filter(|o| matches!(o, Added::Added(added) if added.len() == 2)).count(), 1);
    assert_eq!(outcomes.iter().filter(|o| matches!(o, Added::TooMany(6))).count(), 1);
    assert_eq!(store.chat(group.id).await.unwrap().unwrap().member_count, 4);
}

async fn roles_change_and_ownership_moves_in_one_step(store: &dyn ChatStore) {
    let (alice, bob, carol) = (UserId::new_v7(), UserId::new_v7(), UserId::new_v7());
    let group = create(store, chat(alice, 1), &[bob, carol]).await;
    let admin = done(store.set_role(group.id, alice, bob, Role::Admin, 2).await.unwrap());
    assert_eq!((admin.user_id, admin.role, admin.join_time), (bob, Role::Admin, 1));
    assert_eq!(store.set_role(group.id, alice, UserId::new_v7(), Role::Owner, 3).await.unwrap(), Checked::NotMember);
    let unchanged = store.chat(group.id).await.unwrap().unwrap();
    assert_eq!((unchanged.owner_id, unchanged.update_time), (alice, 2), "a refused change writes nothing");
    assert_eq!(store.role(group.id, alice).await.unwrap(), Some(Role::Owner));

    let owner = done(store.set_role(group.id, alice, carol, Role::Owner, 4).await.unwrap());
    assert_eq!(owner.role, Role::Owner);
    assert_eq!(store.role(group.id, alice).await.unwrap(), Some(Role::Admin), "the old owner is an admin");
    assert_eq!(store.chat(group.id).await.unwrap().unwrap().owner_id, carol);
    let owners = store.members(group.id, None, 10).await.unwrap().into_iter().filter(|m| m.role == Role::Owner);
    assert_eq!(owners.count(), 1);
}

/// A demotion (admin to member) and a hand-over (the owner made an admin)
/// take rights away: each raises the chat's members version in its
/// transaction, which goes to the outbox after its role changes, in an
/// entry of its own; a promotion, or a role set again (a retry), raises
/// nothing.
async fn a_loss_of_rights_raises_the_members_version(store: &dyn ChatStore) {
    let [alice, bob, carol] = [(); 3].map(|_| UserId::new_v7());
    let id = create(store, chat(alice, 1), &[bob, carol]).await.id;
    let mut seen = 0;
    outbox_after(store, id, &mut seen).await;
    let version = || async { store.chat(id).await.unwrap().unwrap().members_version };

    done(store.set_role(id, alice, bob, Role::Admin, 2).await.unwrap());
    done(store.set_role(id, alice, bob, Role::Admin, 3).await.unwrap());
    let promoted = [format!("role_changed {bob}"), format!("role_changed {bob}")];
    assert_eq!(outbox_after(store, id, &mut seen).await, promoted);
    assert_eq!(version().await, 0, "a promotion takes nothing away");

    done(store.set_role(id, alice, bob, Role::Member, 4).await.unwrap());
    done(store.set_role(id, alice, bob, Role::Member, 5).await.unwrap());
    let demoted = [format!("role_changed {bob}"), "members_version=1".into(), format!("role_changed {bob}")];
    assert_eq!(outbox_after(store, id, &mut seen).await, demoted, "a demotion, then its retry");
    assert_eq!(version().await, 1);

    done(store.set_role(id, alice, carol, Role::Owner, 6).await.unwrap());
    let handed_over = [format!("role_changed {carol}"), format!("role_changed {alice}"), "members_version=2".into()];
    assert_eq!(outbox_after(store, id, &mut seen).await, handed_over, "a hand-over");
    assert_eq!(version().await, 2);
    let entries = store.pending(Some(id), 100).await.unwrap();
    let sizes: Vec<usize> = entries.iter().rev().take(2).map(|e| e.changes.len()).collect();
    assert_eq!(sizes, [1, 2], "the version in an entry of its own, after the role changes'");
}

async fn a_removal_checks_both_roles_again_and_never_removes_the_owner(store: &dyn ChatStore) {
    let [alice, bob, mallory, carol] = [(); 4].map(|_| UserId::new_v7());
    let group = create(store, chat(alice, 1), &[bob, mallory, carol]).await;
    let id = group.id;
    done(store.set_role(id, alice, bob, Role::Admin, 2).await.unwrap());
    // Admin bob read mallory as a plain member; then alice made her owner.
    done(store.set_role(id, alice, mallory, Role::Owner, 3).await.unwrap());
    let mut seen = 0;
    outbox_after(store, id, &mut seen).await;
    let by_admin = |actor| removed_by(actor, &[Role::Owner, Role::Admin], &[Role::Member]);
    let refused = store.remove_member(id, mallory, by_admin(bob), 4).await.unwrap();
    assert_eq!(refused, Checked::Target(Role::Owner), "bob's removal of the new owner");
    // She leaves, as she read herself a member before the hand-over.
    assert_eq!(store.remove_member(id, mallory, LEAVE, 5).await.unwrap(), Checked::Target(Role::Owner));
    // Listed or not, the owner is never removed.
    let anyone = Removal { targets: &[Role::Owner, Role::Admin, Role::Member], ..LEAVE };
    assert_eq!(store.remove_member(id, mallory, anyone, 5).await.unwrap(), Checked::Target(Role::Owner));
    assert_eq!(owners(store, id).await, (vec![mallory], mallory), "the group keeps its one owner");
    let unchanged = store.chat(id).await.unwrap().unwrap();
    assert_eq!((unchanged.member_count, unchanged.update_time), (4, 3), "a refusal writes nothing");
    assert_eq!(outbox_after(store, id, &mut seen).await, Vec::<String>::new());

    // An admin removes plain members only: alice is an admin now.
    assert_eq!(store.remove_member(id, alice, by_admin(bob), 6).await.unwrap(), Checked::Target(Role::Admin));
    // Bob demoted after his check: his removal of carol is refused.
    done(store.set_role(id, mallory, bob, Role::Member, 7).await.unwrap());
    outbox_after(store, id, &mut seen).await;
    let demoted = store.remove_member(id, carol, by_admin(bob), 8).await.unwrap();
    assert_eq!(demoted, Checked::Actor(Some(Role::Member)));
    let stranger = store.remove_member(id, carol, by_admin(UserId::new_v7()), 8).await.unwrap();
    assert_eq!(stranger, Checked::Actor(None), "an actor who is no member");
    assert_eq!(store.role(id, carol).await.unwrap(), Some(Role::Member), "carol stays");
    assert_eq!(outbox_after(store, id, &mut seen).await, Vec::<String>::new());

    // What the roles allow goes ahead.
    let by_owner = removed_by(mallory, &[Role::Owner], &[Role::Admin, Role::Member]);
    assert_eq!(store.remove_member(id, alice, by_owner, 9).await.unwrap(), Checked::Done(()));
    assert_eq!(store.remove_member(id, carol, by_admin(mallory), 9).await.unwrap(), Checked::Done(()));
    assert_eq!(store.remove_member(id, bob, LEAVE, 10).await.unwrap(), Checked::Done(()));
    let lines = outbox_after(store, id, &mut seen).await;
    let expected = [
        format!("removed {alice}"),
        "members_version=3".into(),
        format!("removed {carol}"),
        "members_version=4".into(),
        format!("left {bob}"),
        "members_version=5".into(),
    ];
    assert_eq!(
        lines, expected,
        "each departure raises the chat's members version (the hand-over and the demotion did: 2)"
    );
    assert_eq!(owners(store, id).await, (vec![mallory], mallory));
    assert_eq!(store.chat(id).await.unwrap().unwrap().member_count, 1);
}

async fn a_role_change_checks_its_owner_again_and_never_leaves_the_group_without_one(store: &dyn ChatStore) {
    let [alice, bob, carol] = [(); 3].map(|_| UserId::new_v7());
    let group = create(store, chat(alice, 1), &[bob, carol]).await;
    let id = group.id;
    done(store.set_role(id, alice, bob, Role::Owner, 2).await.unwrap());
    let mut seen = 0;
    outbox_after(store, id, &mut seen).await;
    // Alice's requests checked her as owner before the hand-over.
    let promote = store.set_role(id, alice, carol, Role::Admin, 3).await.unwrap();
    assert_eq!(promote, Checked::Actor(Some(Role::Admin)));
    let hand_over = store.set_role(id, alice, carol, Role::Owner, 3).await.unwrap();
    assert_eq!(hand_over, Checked::Actor(Some(Role::Admin)), "no second hand-over by the old owner");
    let stranger = store.set_role(id, UserId::new_v7(), carol, Role::Owner, 3).await.unwrap();
    assert_eq!(stranger, Checked::Actor(None));
    // The owner's own role changes only by a hand-over.
    assert_eq!(store.set_role(id, bob, bob, Role::Member, 3).await.unwrap(), Checked::Target(Role::Owner));
    assert_eq!(store.role(id, carol).await.unwrap(), Some(Role::Member));
    assert_eq!(owners(store, id).await, (vec![bob], bob));
    assert_eq!(store.chat(id).await.unwrap().unwrap().update_time, 2, "a refusal writes nothing");
    assert_eq!(outbox_after(store, id, &mut seen).await, Vec::<String>::new());

    // Made owner after leaving: refused, nobody's role changed.
    assert_eq!(store.remove_member(id, carol, LEAVE, 4).await.unwrap(), Checked::Done(()));
    outbox_after(store, id, &mut seen).await;
    assert_eq!(store.set_role(id, bob, carol, Role::Owner, 5).await.unwrap(), Checked::NotMember);
    assert_eq!(owners(store, id).await, (vec![bob], bob));
    assert_eq!(store.role(id, alice).await.unwrap(), Some(Role::Admin));
    assert_eq!(outbox_after(store, id, &mut seen).await, Vec::<String>::new());
}

async fn a_hand_over_racing_a_removal_of_its_heir_leaves_one_owner(store: &dyn ChatStore) {
    let [first, admin] = [(); 2].map(|_| UserId::new_v7());
    let group = create(store, chat(first, 1), &[admin]).await;
    let id = group.id;
    done(store.set_role(id, first, admin, Role::Admin, 2).await.unwrap());
    let limits = Limits::default();
    let mut owner = first;
    for round in 0..10 {
        let heir = UserId::new_v7();
        store.add_members(id, Adder::Unchecked, &[member(&group, heir, 3 + round)], &limits, 3 + round).await.unwrap();
        // The owner hands over to the heir while the admin, who read the
        // heir as a plain member, removes them: one of the two wins.
        let removal = removed_by(admin, &[Role::Owner, Role::Admin], &[Role::Member]);
        let (hand_over, removed) = tokio::join!(
            store.set_role(id, owner, heir, Role::Owner, 3 + round),
            store.remove_member(id, heir, removal, 3 + round),
        );
        match (hand_over.unwrap(), removed.unwrap()) {
            (Checked::Done(_), Checked::Target(Role::Owner)) => owner = heir,
            (Checked::NotMember, Checked::Done(())) => {}
            outcomes => panic!("round {round}: {outcomes:?}"),
        }
        assert_eq!(owners(store, id).await, (vec![owner], owner), "round {round}");
    }
}

async fn activity_orders_listings_and_never_moves_back(store: &dyn ChatStore) {
    let (alice, bob) = (UserId::new_v7(), UserId::new_v7());
    let a = create(store, chat(alice, 1), &[]).await;
    let b = create(store, chat(alice, 2), &[]).await;
    let c = create(store, chat(alice, 3), &[]).await;
    let elsewhere = create(store, chat(bob, 4), &[]).await;
    let all = ChatFilter::default();
    assert_eq!(listed(store, alice, &all).await, [c.id, b.id, a.id], "newest activity first");
    let act = |chat: &Chat, last_seq, time| Activity { chat_id: chat.id, last_seq, time };
    store.record_activity(&[act(&a, 5, 10), act(&elsewhere, 1, 20)]).await.unwrap();
    let unknown = Activity { chat_id: ChatId::new_v7(), last_seq: 1, time: 30 };
    store.record_activity(&[unknown]).await.unwrap();
    // A read of the chat has it at once; a listing orders by it.
    let read = store.chat(a.id).await.unwrap().unwrap();
    assert_eq!((read.last_seq, read.last_activity_time, read.last_message_time), (5, 10, Some(10)));
    assert_eq!(listed(store, alice, &all).await, [a.id, c.id, b.id]);
    let asc = ChatFilter { ascending: true, ..ChatFilter::default() };
    assert_eq!(listed(store, alice, &asc).await, [b.id, c.id, a.id], "oldest activity first on request");
    assert_eq!(store.access(a.id, alice).await.unwrap().unwrap().chat.last_seq, 5);
    // Never back: a lower or equal seq changes nothing, pending or written.
    store.record_activity(&[act(&a, 4, 40), act(&a, 5, 50), act(&b, 1, 4)]).await.unwrap();
    store.flush_activity().await.unwrap();
    store.record_activity(&[act(&b, 0, 60)]).await.unwrap();
    let read = store.chat(a.id).await.unwrap().unwrap();
    assert_eq!((read.last_seq, read.last_activity_time), (5, 10));
    let read = store.chat(b.id).await.unwrap().unwrap();
    assert_eq!((read.last_seq, read.last_activity_time), (1, 4));
    assert_eq!(listed(store, alice, &all).await, [a.id, b.id, c.id]);
    // One call may name a chat twice: the newest wins, in either order.
    store.record_activity(&[act(&c, 7, 70), act(&c, 6, 60)]).await.unwrap();
    store.record_activity(&[act(&b, 2, 5), act(&b, 3, 6)]).await.unwrap();
    store.flush_activity().await.unwrap();
    assert_eq!(store.chat(c.id).await.unwrap().unwrap().last_seq, 7);
    assert_eq!(store.chat(b.id).await.unwrap().unwrap().last_seq, 3);
    assert_eq!(listed(store, alice, &all).await, [c.id, a.id, b.id]);
    // Time filters look at the newest message.
    let after = ChatFilter { last_message_after: Some(6), ..ChatFilter::default() };
    assert_eq!(listed(store, alice, &after).await, [c.id, a.id]);
    let before = ChatFilter { last_message_before: Some(10), ..ChatFilter::default() };
    assert_eq!(listed(store, alice, &before).await, [b.id]);
    assert_eq!(listed(store, bob, &all).await, [elsewhere.id]);
}

async fn listings_page_both_ways_without_gaps_or_repeats(store: &dyn ChatStore) {
    let alice = UserId::new_v7();
    let mut made = Vec::new();
    // Two pairs share an activity time: the id breaks the tie.
    for time in [1, 2, 2, 3, 4, 4, 5] {
        made.push(create(store, chat(alice, time), &[]).await);
    }
    for ascending in [false, true] {
        let filter = ChatFilter { ascending, ..ChatFilter::default() };
        let mut expected = made.clone();
        expected.sort_by_key(|c| (c.last_activity_time, c.id));
        if !ascending {
            expected.reverse();
        }
        assert_eq!(walk(store, alice, &filter).await, expected.iter().map(|c| c.id).collect::<Vec<_>>(), "{filter:?}");
    }
}

/// Every chat of `user` in `filter`, read in pages of 2 from cursor to
/// cursor, as ListChats pages them.
async fn walk(store: &dyn ChatStore, user: UserId, filter: &ChatFilter) -> Vec<ChatId> {
    let mut seen = Vec::new();
    let mut after: Option<ChatCursor> = None;
    loop {
        let page = store.list_chats(user, filter, after, 2).await.unwrap();
        assert!(page.len() <= 2);
        seen.extend(ids(&page));
        match page.last() {
            Some(last) if page.len() == 2 => after = Some(last.chat.cursor(filter.order_by)),
            _ => break,
        }
    }
    seen
}

/// `chats` sorted by `(create_time, id)`, newest first unless `ascending`.
fn by_creation(chats: &[Chat], ascending: bool) -> Vec<ChatId> {
    let mut sorted = chats.to_vec();
    sorted.sort_by_key(|c| (c.create_time, c.id));
    if !ascending {
        sorted.reverse();
    }
    sorted.iter().map(|c| c.id).collect()
}

async fn listings_order_by_creation_time_and_page_both_ways_without_gaps_or_repeats(store: &dyn ChatStore) {
    let (alice, bob) = (UserId::new_v7(), UserId::new_v7());
    let mut made = Vec::new();
    // Two pairs share a creation time: the id breaks the tie.
    for time in [1, 2, 2, 3, 4, 4, 5] {
        made.push(create(store, chat(alice, time), &[]).await);
    }
    let public = create(store, Chat { visibility: Visibility::Public, ..chat(bob, 3) }, &[]).await;
    // Activity turns the order by activity upside down; creation stays.
    let activities: Vec<Activity> =
        made.iter().enumerate().map(|(i, c)| Activity { chat_id: c.id, last_seq: 1, time: 100 - i as i64 }).collect();
    store.record_activity(&activities).await.unwrap();
    let by_activity = ChatFilter::default();
    let newest_activity = made.iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(walk(store, alice, &by_activity).await, newest_activity, "the order by activity as ever");
    for ascending in [false, true] {
        let filter = ChatFilter { order_by: ChatOrder::CreateTime, ascending, ..ChatFilter::default() };
        assert_eq!(walk(store, alice, &filter).await, by_creation(&made, ascending), "ascending: {ascending}");
        // Public chats order by creation too (their own index).
        let public_filter = ChatFilter { public: true, ..filter.clone() };
        assert_eq!(walk(store, alice, &public_filter).await, [public.id]);
    }
    // A cursor of one order is a position in that order only: the chat
    // created last has the oldest activity.
    let newest = made.last().unwrap();
    let after = Some(newest.cursor(ChatOrder::CreateTime));
    let filter = ChatFilter { order_by: ChatOrder::CreateTime, ..ChatFilter::default() };
    let rest = ids(&store.list_chats(alice, &filter, after, 100).await.unwrap());
    assert_eq!(rest, by_creation(&made, false)[1..]);
    assert_eq!(newest.cursor(ChatOrder::Activity).time, newest.last_activity_time);
}

async fn creation_time_ranges_are_half_open_and_page_in_either_order(store: &dyn ChatStore) {
    let alice = UserId::new_v7();
    let mut made = Vec::new();
    for time in [10, 20, 20, 30, 40, 40, 50] {
        made.push(create(store, chat(alice, time), &[]).await);
    }
    let within = |from: i64, to: i64| -> Vec<Chat> {
        made.iter().filter(|c| c.create_time >= from && c.create_time < to).cloned().collect()
    };
    // [20, 40): both chats at 20, none at 40.
    let range = ChatFilter { created_after: Some(20), created_before: Some(40), ..ChatFilter::default() };
    let expected = within(20, 40);
    assert_eq!(expected.len(), 3);
    for ascending in [false, true] {
        let filter = ChatFilter { order_by: ChatOrder::CreateTime, ascending, ..range.clone() };
        assert_eq!(walk(store, alice, &filter).await, by_creation(&expected, ascending), "ascending: {ascending}");
    }
    // The same range by activity (no messages: activity is creation).
    assert_eq!(walk(store, alice, &range).await, by_creation(&expected, false));
    // Adjacent ranges share no chat and miss none.
    let mut tiled = Vec::new();
    for (from, to) in [(0, 20), (20, 40), (40, 60)] {
        let part = ChatFilter { created_after: Some(from), created_before: Some(to), ..ChatFilter::default() };
        tiled.extend(walk(store, alice, &part).await);
    }
    tiled.sort();
    let mut all: Vec<ChatId> = made.iter().map(|c| c.id).collect();
    all.sort();
    assert_eq!(tiled, all);
    // Either bound alone.
    let after = ChatFilter { created_after: Some(40), ..ChatFilter::default() };
    assert_eq!(walk(store, alice, &after).await, by_creation(&within(40, i64::MAX), false));
    let before = ChatFilter { created_before: Some(20), ..ChatFilter::default() };
    assert_eq!(walk(store, alice, &before).await, [made[0].id]);
    let empty = ChatFilter { created_after: Some(30), created_before: Some(30), ..ChatFilter::default() };
    assert_eq!(walk(store, alice, &empty).await, []);
}

async fn listings_carry_the_user_s_role_and_list_only_managed_chats_on_request(store: &dyn ChatStore) {
    let (alice, bob, carol) = (UserId::new_v7(), UserId::new_v7(), UserId::new_v7());
    let owned = create(store, chat(alice, 1), &[bob]).await;
    let administered = create(store, chat(carol, 2), &[alice]).await;
    done(store.set_role(administered.id, carol, alice, Role::Admin, 2).await.unwrap());
    let joined = create(store, chat(bob, 3), &[alice]).await;
    let public = create(store, Chat { visibility: Visibility::Public, ..chat(carol, 4) }, &[]).await;
    let roles = |listed: Vec<ChatAccess>| listed.into_iter().map(|a| (a.chat.id, a.role)).collect::<Vec<_>>();
    let all = store.list_chats(alice, &ChatFilter::default(), None, 10).await.unwrap();
    assert_eq!(
        roles(all),
        [(joined.id, Some(Role::Member)), (administered.id, Some(Role::Admin)), (owned.id, Some(Role::Owner))]
    );
    let managed = ChatFilter { managed_only: true, ..ChatFilter::default() };
    assert_eq!(listed(store, alice, &managed).await, [administered.id, owned.id]);
    assert_eq!(listed(store, bob, &managed).await, [joined.id]);
    // Public chats: the role where the user is in one, None elsewhere.
    let everyone = ChatFilter { public: true, ..ChatFilter::default() };
    assert_eq!(roles(store.list_chats(carol, &everyone, None, 10).await.unwrap()), [(public.id, Some(Role::Owner))]);
    assert_eq!(roles(store.list_chats(alice, &everyone, None, 10).await.unwrap()), [(public.id, None)]);
    let managed_public = ChatFilter { public: true, managed_only: true, ..ChatFilter::default() };
    assert_eq!(listed(store, alice, &managed_public).await, []);
    assert_eq!(listed(store, carol, &managed_public).await, [public.id]);
}

async fn listings_filter_by_visibility_kind_state_time_and_title(store: &dyn ChatStore) {
    let (alice, bob) = (UserId::new_v7(), UserId::new_v7());
    let mut open = chat(bob, 1);
    open.visibility = Visibility::Public;
    open.title = "Open 100% Füße".into();
    let open = create(store, open, &[]).await;
    let mut team = chat(alice, 2);
    team.title = "Team_x".into();
    let team = create(store, team, &[bob]).await;
    let mut direct = chat(alice, 3);
    direct.kind = Kind::Direct;
    direct.title = String::new();
    let direct = create(store, direct, &[bob]).await;

    let mine = ChatFilter::default();
    assert_eq!(listed(store, alice, &mine).await, [direct.id, team.id], "members only, not the public chat");
    let public = ChatFilter { public: true, ..ChatFilter::default() };
    assert_eq!(listed(store, alice, &public).await, [open.id], "public chats, member or not");
    let groups = ChatFilter { kind: Some(Kind::Group), ..ChatFilter::default() };
    assert_eq!(listed(store, bob, &groups).await, [team.id, open.id]);
    let directs = ChatFilter { kind: Some(Kind::Direct), ..ChatFilter::default() };
    assert_eq!(listed(store, bob, &directs).await, [direct.id]);
    // Titles match by their lower-case key; LIKE's wildcards are literal.
    let query = |q: &str| ChatFilter { query: Some(q.into()), ..ChatFilter::default() };
    assert_eq!(listed(store, bob, &query("füße")).await, [open.id]);
    assert_eq!(listed(store, bob, &query("100%")).await, [open.id]);
    assert_eq!(listed(store, bob, &query("0%f")).await, []);
    assert_eq!(listed(store, bob, &query("m_x")).await, [team.id]);
    assert_eq!(listed(store, bob, &query("m_")).await, [team.id]);
    assert_eq!(listed(store, bob, &query("a_")).await, []);

    store.set_archived(team.id, Some(9), 9, None).await.unwrap();
    let archived = ChatFilter { archived: Some(true), ..ChatFilter::default() };
    assert_eq!(listed(store, alice, &archived).await, [team.id]);
    let active = ChatFilter { archived: Some(false), ..ChatFilter::default() };
    assert_eq!(listed(store, alice, &active).await, [direct.id]);
    // No messages yet: every time filter leaves everything out.
    let after = ChatFilter { last_message_after: Some(0), ..ChatFilter::default() };
    assert_eq!(listed(store, alice, &after).await, []);
}

/// UpdateChat and ArchiveChat are checked again under the chat's lock, as
/// the caller stands there: an admin demoted (or removed) since the
/// service's check writes nothing; either member of a direct chat may.
async fn a_change_by_one_who_may_no_longer_change_the_chat_writes_nothing(store: &dyn ChatStore) {
    let [owner, admin, outsider, peer] = std::array::from_fn(|_| UserId::new_v7());
    let group = create(store, chat(owner, 1), &[admin]).await;
    store.set_role(group.id, owner, admin, Role::Admin, 2).await.unwrap();
    let public = ChatUpdate { visibility: Some(Visibility::Public), ..ChatUpdate::default() };
    assert_eq!(store.update_chat(group.id, &public, 3, Some(admin)).await.unwrap().unwrap().done().update_time, 3);
    store.set_role(group.id, owner, admin, Role::Member, 4).await.unwrap();
    let private = ChatUpdate { visibility: Some(Visibility::Private), ..ChatUpdate::default() };
    let demoted = store.update_chat(group.id, &private, 5, Some(admin)).await.unwrap();
    assert_eq!(demoted, Some(Checked::Actor(Some(Role::Member))), "demoted");
    assert_eq!(
        store.set_archived(group.id, Some(5), 5, Some(admin)).await.unwrap(),
        Some(Checked::Actor(Some(Role::Member)))
    );
    assert_eq!(store.update_chat(group.id, &private, 5, Some(outsider)).await.unwrap(), Some(Checked::Actor(None)));
    let now = store.chat(group.id).await.unwrap().unwrap();
    // Nothing written since the demotion (at 4).
    assert_eq!((now.visibility, now.archive_time, now.update_time), (Visibility::Public, None, 4), "nothing written");
    assert_eq!(store.set_archived(ChatId::new_v7(), Some(6), 6, Some(owner)).await.unwrap(), None, "no such chat");
    let direct = create(store, Chat { kind: Kind::Direct, title: String::new(), ..chat(owner, 7) }, &[peer]).await;
    assert_eq!(
        store.set_archived(direct.id, Some(8), 8, Some(peer)).await.unwrap().unwrap().done().archive_time,
        Some(8)
    );
}

async fn updates_archive_and_unarchive(store: &dyn ChatStore) {
    let alice = UserId::new_v7();
    let group = create(store, chat(alice, 1), &[]).await;
    let title = ChatUpdate { title: Some("Renamed".into()), ..ChatUpdate::default() };
    let updated = store.update_chat(group.id, &title, 2, None).await.unwrap().unwrap().done();
    assert_eq!((updated.title.as_str(), updated.description.as_str(), updated.update_time), ("Renamed", "", 2));
    assert_eq!(updated.assistant_replies, AssistantReplies::Mentions, "the default");
    let rest = ChatUpdate {
        description: Some("d".into()),
        visibility: Some(Visibility::Public),
        title: None,
        assistant_replies: Some(AssistantReplies::Off),
    };
    let updated = store.update_chat(group.id, &rest, 3, None).await.unwrap().unwrap().done();
    assert_eq!(
        (
            updated.title.as_str(),
            updated.description.as_str(),
            updated.visibility,
            updated.assistant_replies,
            updated.update_time
        ),
        ("Renamed", "d", Visibility::Public, AssistantReplies::Off, 3)
    );
    assert_eq!(store.chat(group.id).await.unwrap().map(|c| c.assistant_replies), Some(AssistantReplies::Off));
    let search = ChatFilter { query: Some("renamed".into()), ..ChatFilter::default() };
    assert_eq!(listed(store, alice, &search).await, [group.id], "the title key follows the title");
    assert_eq!(store.update_chat(ChatId::new_v7(), &title, 4, None).await.unwrap(), None);

    let archived = store.set_archived(group.id, Some(5), 5, None).await.unwrap().unwrap().done();
    assert_eq!((archived.archive_time, archived.update_time), (Some(5), 5));
    let back = store.set_archived(group.id, None, 6, None).await.unwrap().unwrap().done();
    assert_eq!((back.archive_time, back.update_time), (None, 6));
    assert_eq!(store.set_archived(ChatId::new_v7(), None, 7, None).await.unwrap(), None);
    assert_eq!(store.chat(group.id).await.unwrap(), Some(back));
}

async fn deleting_a_chat_removes_it_and_its_members(store: &dyn ChatStore) {
    let (alice, bob) = (UserId::new_v7(), UserId::new_v7());
    let group = create(store, chat(alice, 1), &[bob]).await;
    let kept = create(store, chat(alice, 2), &[bob]).await;
    store.record_activity(&[Activity { chat_id: group.id, last_seq: 3, time: 4 }]).await.unwrap();
    let members: HashSet<UserId> =
        done(store.delete_chat(group.id, 10, Some(alice)).await.unwrap()).into_iter().collect();
    assert_eq!(members, HashSet::from([alice, bob]));
    assert_eq!(store.chat(group.id).await.unwrap(), None);
    assert_eq!(store.access(group.id, alice).await.unwrap(), None);
    assert_eq!(store.member_chat_ids(bob, false).await.unwrap(), [kept.id]);
    assert_eq!(listed(store, alice, &ChatFilter::default()).await, [kept.id]);
    assert_eq!(store.delete_chat(group.id, 11, Some(alice)).await.unwrap(), Checked::Done(vec![]), "gone already");
    store.flush_activity().await.unwrap();
    assert_eq!(store.chat(group.id).await.unwrap(), None, "its activity does not bring it back");
    // Its id is never given to another chat, whoever asks.
    let mut again = chat(bob, 3);
    again.id = group.id;
    assert_eq!(store.create_chat(&again, &[owner(&again)]).await.unwrap(), Created::Conflict);
    assert_eq!(store.chat(group.id).await.unwrap(), None, "a conflict writes nothing");
    // Its messages are to purge until that is recorded; a live chat's
    // never are.
    assert_eq!(store.chats_to_purge(10).await.unwrap(), [group.id]);
    assert!(store.purge_due(group.id).await.unwrap(), "due until purged");
    assert!(!store.purge_due(kept.id).await.unwrap(), "a live chat is not");
    assert!(!store.purge_due(ChatId::new_v7()).await.unwrap(), "nor an id never taken");
    store.chat_purged(kept.id, 12).await.unwrap();
    store.chat_purged(group.id, 12).await.unwrap();
    assert!(store.chats_to_purge(10).await.unwrap().is_empty());
    assert!(!store.purge_due(group.id).await.unwrap(), "purged");
}

/// DeleteChat is checked again under the chat's lock: the owner read as
/// such by the service, who handed the group over (or was demoted, or
/// removed) before the delete's write, deletes nothing; a direct chat's
/// member may, a stranger may not.
async fn a_delete_by_one_no_longer_the_owner_writes_nothing(store: &dyn ChatStore) {
    let [alice, bob, carol, peer] = [(); 4].map(|_| UserId::new_v7());
    let group = create(store, chat(alice, 1), &[bob, carol]).await;
    let mut seen = 0;
    // The service's check: alice owns the group.
    assert_eq!(store.role(group.id, alice).await.unwrap(), Some(Role::Owner));
    // A hand-over commits between the check and the delete's write.
    done(store.set_role(group.id, alice, bob, Role::Owner, 2).await.unwrap());
    outbox_after(store, group.id, &mut seen).await;
    let refused = store.delete_chat(group.id, 3, Some(alice)).await.unwrap();
    assert_eq!(refused, Checked::Actor(Some(Role::Admin)), "the former owner, an admin now");
    assert_eq!(store.delete_chat(group.id, 3, Some(carol)).await.unwrap(), Checked::Actor(Some(Role::Member)));
    assert_eq!(store.delete_chat(group.id, 3, Some(UserId::new_v7())).await.unwrap(), Checked::Actor(None));
    let kept = store.chat(group.id).await.unwrap().expect("the former owner deleted bob's group");
    assert_eq!((kept.member_count, kept.update_time), (3, 2), "a refusal writes nothing");
    assert_eq!(outbox_after(store, group.id, &mut seen).await, Vec::<String>::new());
    assert!(store.chats_to_purge(10).await.unwrap().is_empty());
    let members: HashSet<UserId> = done(store.delete_chat(group.id, 4, Some(bob)).await.unwrap()).into_iter().collect();
    assert_eq!(members, HashSet::from([alice, bob, carol]), "its owner deletes it");
    let direct = create(store, Chat { kind: Kind::Direct, title: String::new(), ..chat(alice, 5) }, &[peer]).await;
    assert_eq!(done(store.delete_chat(direct.id, 6, Some(peer)).await.unwrap()).len(), 2, "either member");
}

/// An UpdateChat that sets every field it names to the value it has (a
/// retry whose answer was lost) changes nothing: no new update time, no
/// outbox entry; one that changes some fields names only those.
async fn an_update_that_changes_nothing_writes_nothing(store: &dyn ChatStore) {
    let alice = UserId::new_v7();
    let group = create(store, chat(alice, 1), &[]).await;
    let mut seen = 0;
    outbox_after(store, group.id, &mut seen).await;
    let update = ChatUpdate { title: Some("Renamed".into()), description: Some("d".into()), ..Default::default() };
    store.update_chat(group.id, &update, 2, Some(alice)).await.unwrap().unwrap().done();
    assert_eq!(outbox_after(store, group.id, &mut seen).await, ["updated title,description Renamed archived=false"]);
    let again = store.update_chat(group.id, &update, 3, Some(alice)).await.unwrap().unwrap().done();
    assert_eq!(outbox_after(store, group.id, &mut seen).await, Vec::<String>::new(), "a retry logs no second change");
    assert_eq!((again.title.as_str(), again.update_time), ("Renamed", 2), "a retry is answered as the chat is");
}

async fn members_page_in_join_order(store: &dyn ChatStore) {
    let alice = UserId::new_v7();
    let group = create(store, chat(alice, 1), &[]).await;
    let joined: Vec<Member> = [2, 2, 3, 4, 4].iter().map(|t| member(&group, UserId::new_v7(), *t)).collect();
    let limits = Limits::default();
    for m in &joined {
        store.add_members(group.id, Adder::Unchecked, std::slice::from_ref(m), &limits, m.join_time).await.unwrap();
    }
    let mut expected = vec![owner(&group)];
    let mut rest = joined.clone();
    rest.sort_by_key(|m| (m.join_time, m.user_id));
    expected.extend(rest);
    let mut seen = Vec::new();
    let mut after: Option<MemberCursor> = None;
    loop {
        let page = store.members(group.id, after, 2).await.unwrap();
        seen.extend(page.iter().copied());
        match page.last() {
            Some(last) if page.len() == 2 => after = Some(last.cursor()),
            _ => break,
        }
    }
    assert_eq!(seen, expected);
}

/// A change as "joined <user>", "left <user>", "removed <user>", "role_changed
/// <user>", "updated <mask> <title> archived=<bool>", "closed=<bool>
/// <version>", "members_version=<version>" or "archived=<bool> <version>".
fn show(change: &mpb::ChatChange) -> String {
    match change.change.as_ref().unwrap() {
        mpb::chat_change::Change::MembershipChanged(m) => {
            let kind = match mpb::MembershipChange::try_from(m.change).unwrap() {
                mpb::MembershipChange::Joined => "joined",
                mpb::MembershipChange::Left => "left",
                mpb::MembershipChange::Removed => "removed",
                mpb::MembershipChange::RoleChanged => "role_changed",
                other => panic!("{other:?}"),
            };
            format!("{kind} {}", m.user_id)
        }
        mpb::chat_change::Change::ChatUpdated(u) => {
            let mask = u.update_mask.as_ref().unwrap().paths.join(",");
            format!("updated {mask} {} archived={}", u.title, u.archived)
        }
        mpb::chat_change::Change::DirectChatClosed(c) => format!("closed={} {}", c.closed, c.version),
        mpb::chat_change::Change::MembersDeparted(d) => format!("members_version={}", d.version),
        mpb::chat_change::Change::ChatArchived(a) => format!("archived={} {}", a.archived, a.version),
    }
}

/// The outbox entries of `chat` not shown yet (those after `seen`
/// positions), one line per change.
async fn outbox_after(store: &dyn ChatStore, chat: ChatId, seen: &mut i64) -> Vec<String> {
    let pending = store.pending(Some(chat), 100).await.unwrap();
    let new: Vec<_> = pending.into_iter().filter(|p| p.position > *seen).collect();
    let mut lines = Vec::new();
    for entry in new {
        assert_eq!(entry.position, *seen + 1, "positions are gap-free in commit order");
        assert_eq!(entry.key.len(), 32, "a key per entry: {}", entry.key);
        *seen = entry.position;
        lines.extend(entry.changes.iter().map(show));
    }
    lines
}

async fn every_change_leaves_its_outbox_entry_in_commit_order_and_no_change_none(store: &dyn ChatStore) {
    let (alice, bob, carol) = (UserId::new_v7(), UserId::new_v7(), UserId::new_v7());
    let group = create(store, chat(alice, 1), &[bob]).await;
    let id = group.id;
    let mut seen = 0;
    assert_eq!(outbox_after(store, id, &mut seen).await, [format!("joined {alice}"), format!("joined {bob}")]);

    let limits = Limits::default();
    store
        .add_members(id, Adder::Unchecked, &[member(&group, bob, 2), member(&group, carol, 2)], &limits, 2)
        .await
        .unwrap();
    assert_eq!(outbox_after(store, id, &mut seen).await, [format!("joined {carol}")], "only who was added");
    store.add_members(id, Adder::Unchecked, &[member(&group, bob, 3)], &limits, 3).await.unwrap();
    let full = Limits { group_members: 3, ..Limits::default() };
    let too_many =
        store.add_members(id, Adder::Unchecked, &[member(&group, UserId::new_v7(), 3)], &full, 3).await.unwrap();
    assert!(matches!(too_many, Added::TooMany(4)));
    assert_eq!(outbox_after(store, id, &mut seen).await, Vec::<String>::new(), "no one added, nothing");

    done(store.set_role(id, alice, bob, Role::Admin, 4).await.unwrap());
    assert_eq!(store.set_role(id, alice, UserId::new_v7(), Role::Admin, 4).await.unwrap(), Checked::NotMember);
    done(store.set_role(id, alice, carol, Role::Owner, 5).await.unwrap());
    assert_eq!(
        outbox_after(store, id, &mut seen).await,
        [
            format!("role_changed {bob}"),
            format!("role_changed {carol}"),
            format!("role_changed {alice}"),
            "members_version=1".into()
        ],
        "the hand-over: the new owner, then the old, then the members version its loss of rights raised"
    );

    assert_eq!(store.remove_member(id, bob, LEAVE, 6).await.unwrap(), Checked::Done(()));
    let by_owner = removed_by(carol, &[Role::Owner], &[Role::Admin, Role::Member]);
    assert_eq!(store.remove_member(id, bob, by_owner, 6).await.unwrap(), Checked::NotMember);
    assert_eq!(outbox_after(store, id, &mut seen).await, [format!("left {bob}"), "members_version=2".into()]);

    let update = ChatUpdate { title: Some("Renamed".into()), ..Default::default() };
    store.update_chat(id, &update, 7, None).await.unwrap().unwrap().done();
    store.set_archived(id, Some(8), 8, None).await.unwrap().unwrap().done();
    let again = store.set_archived(id, Some(9), 9, None).await.unwrap().unwrap().done();
    assert_eq!((again.archive_time, again.update_time), (Some(8), 8), "archived already: unchanged");
    assert_eq!(
        outbox_after(store, id, &mut seen).await,
        ["updated title Renamed archived=false", "updated archived Renamed archived=true", "archived=true 1"]
    );

    // A recorded entry is forgotten (by position and key); the rest stay, in
    // order.
    let pending = store.pending(Some(id), 100).await.unwrap();
    store.forget_pending(&pending[0]).await.unwrap();
    store.forget_pending(&pending[0]).await.unwrap();
    let left: Vec<i64> = store.pending(Some(id), 100).await.unwrap().iter().map(|p| p.position).collect();
    assert_eq!(left, (2..=seen).collect::<Vec<_>>());
    for entry in &pending[1..] {
        store.forget_pending(entry).await.unwrap();
    }
    // An empty outbox starts again from 1; forgetting a recorded entry
    // whose position was taken again since leaves the new one alone.
    let renamed = ChatUpdate { title: Some("Again".into()), ..Default::default() };
    store.update_chat(id, &renamed, 10, None).await.unwrap().unwrap().done();
    let again = store.pending(Some(id), 100).await.unwrap();
    assert_eq!(again.iter().map(|p| p.position).collect::<Vec<_>>(), [1]);
    store.forget_pending(&pending[0]).await.unwrap();
    assert_eq!(store.pending(Some(id), 100).await.unwrap(), again, "another entry at that position");
    store.forget_pending(&again[0]).await.unwrap();
    seen = 0;

    // Deleting removes every member; the entry outlives the chat's row.
    let other = create(store, chat(carol, 10), &[]).await;
    let members: HashSet<UserId> = done(store.delete_chat(id, 11, None).await.unwrap()).into_iter().collect();
    assert_eq!(members, HashSet::from([alice, carol]));
    let removed: HashSet<String> = outbox_after(store, id, &mut seen).await.into_iter().collect();
    assert_eq!(removed, HashSet::from([format!("removed {alice}"), format!("removed {carol}")]));
    let everyone: Vec<(ChatId, i64)> =
        store.pending(None, 100).await.unwrap().iter().map(|p| (p.chat_id, p.position)).collect();
    let mut expected = vec![(id, seen), (other.id, 1)];
    expected.sort();
    assert_eq!(everyone, expected, "any chat's, by chat then position");
    assert_eq!(store.create_chat(&other, &[owner(&other)]).await.unwrap(), Created::Conflict);
    assert_eq!(store.pending(Some(other.id), 100).await.unwrap().len(), 1, "a conflict writes nothing");
}

/// Privacy audit M2: an automatic title restates its prompt, so it is
/// taken back when that prompt is deleted; a title the person set is
/// theirs, and stays.
async fn a_title_made_from_a_prompt_is_taken_back_with_it_and_a_persons_never(store: &dyn ChatStore) {
    let (alice, bot) = (UserId::new_v7(), UserId::new_v7());
    let direct = create(store, Chat { kind: Kind::Direct, title: String::new(), ..chat(alice, 1) }, &[bot]).await;
    let (id, prompt, other) = (direct.id, MessageId::new_v7(), MessageId::new_v7());
    let mut seen = 0;
    outbox_after(store, id, &mut seen).await;
    store.title_chat(id, "Secret plans", Some(prompt), 2).await.unwrap().unwrap();
    outbox_after(store, id, &mut seen).await;
    assert_eq!(store.untitle_chat(id, other, 3).await.unwrap(), None, "another prompt's deletion");
    let untitled = store.untitle_chat(id, prompt, 4).await.unwrap().expect("taken back");
    assert_eq!((untitled.title.as_str(), untitled.update_time), ("", 4));
    assert_eq!(outbox_after(store, id, &mut seen).await, ["updated title  archived=false"]);
    assert_eq!(store.chat(id).await.unwrap().unwrap().title, "");
    let search = ChatFilter { query: Some("secret".into()), ..ChatFilter::default() };
    assert!(listed(store, alice, &search).await.is_empty(), "the title key goes with it");
    assert_eq!(store.untitle_chat(id, prompt, 5).await.unwrap(), None, "once");
    assert_eq!(outbox_after(store, id, &mut seen).await, Vec::<String>::new());
    // Untitled again: the next prompt titles it; the person renames it
    // then, and that title is theirs.
    let next = MessageId::new_v7();
    store.title_chat(id, "Tides", Some(next), 6).await.unwrap().unwrap();
    let rename = ChatUpdate { title: Some("Mine".into()), ..ChatUpdate::default() };
    store.update_chat(id, &rename, 7, None).await.unwrap().unwrap().done();
    assert_eq!(store.untitle_chat(id, next, 8).await.unwrap(), None, "a person's title stays");
    assert_eq!(store.chat(id).await.unwrap().unwrap().title, "Mine");
    assert_eq!(store.untitle_chat(ChatId::new_v7(), next, 9).await.unwrap(), None);
}

async fn an_untitled_chat_takes_a_title_once(store: &dyn ChatStore) {
    let (alice, bob) = (UserId::new_v7(), UserId::new_v7());
    let direct = create(store, Chat { kind: Kind::Direct, title: String::new(), ..chat(alice, 1) }, &[bob]).await;
    let id = direct.id;
    let mut seen = 0;
    outbox_after(store, id, &mut seen).await;
    let (titled, changed) = store.title_chat(id, "Tides", None, 2).await.unwrap().unwrap();
    assert_eq!((titled.title.as_str(), titled.update_time, changed), ("Tides", 2, true));
    assert_eq!(outbox_after(store, id, &mut seen).await, ["updated title Tides archived=false"]);
    // Titled: kept, answered as it is, nothing recorded.
    let (kept, changed) = store.title_chat(id, "Other", None, 3).await.unwrap().unwrap();
    assert_eq!((kept, changed), (titled, false));
    assert_eq!(outbox_after(store, id, &mut seen).await, Vec::<String>::new());
    let search = ChatFilter { query: Some("tides".into()), ..ChatFilter::default() };
    assert_eq!(listed(store, alice, &search).await, [id], "the title key follows the title");
    assert_eq!(store.title_chat(ChatId::new_v7(), "x", None, 4).await.unwrap(), None);
}

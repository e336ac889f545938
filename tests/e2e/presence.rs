//! Presence: GetPresence and `presence_changed` go only to users who share a
//! chat with the user; a user is online while any of their streams is open.

use natter_kit::time::{micros, now_micros};
use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_testkit::{Cluster, Flags, TestUser, authed};
use tonic::Code;
use tonic::codec::Streaming;

use crate::chats::{direct, send};
use crate::stream::{next_any as next, open};
use crate::stream_abuse::wait_for;
use mpb::PresenceState::{Offline, Online, Unspecified};
use mpb::stream_events_response::Event;

crate::both_modes!(
    flags = natter_testkit::Flags { messages: &["--max-streams-per-user", "2"], ..natter_testkit::Flags::default() };
    presence_reaches_those_who_share_a_chat_once_per_change_and_nobody_else,
    get_presence_refuses_bad_ids_by_field_and_too_many_calls,
    a_block_hides_presence_both_ways_until_it_is_taken_back,
);

/// A group chat of `owner` with `members`.
async fn group(c: &Cluster, owner: &TestUser, members: &[&TestUser], title: &str) -> cpb::Chat {
    let request = cpb::CreateChatRequest {
        title: title.into(),
        member_ids: members.iter().map(|m| m.id.clone()).collect(),
        ..Default::default()
    };
    c.chats().create_chat(authed(owner, request)).await.unwrap().into_inner().chat.unwrap()
}

/// GetPresence of `users` as `caller`.
async fn presence(c: &Cluster, caller: &TestUser, users: &[&str]) -> Vec<mpb::Presence> {
    let request = mpb::GetPresenceRequest { user_ids: users.iter().map(|u| u.to_string()).collect() };
    c.messages().get_presence(authed(caller, request)).await.expect("GetPresence").into_inner().presences
}

/// The next event, which must be a presence change.
async fn next_presence(
    stream: &mut Streaming<mpb::StreamEventsResponse>,
) -> (mpb::StreamEventsResponse, mpb::Presence) {
    let event = next(stream).await;
    match &event.event {
        Some(Event::PresenceChanged(p)) => {
            let p = p.clone();
            (event, p)
        }
        other => panic!("expected presence_changed, got {other:?}"),
    }
}

fn state(p: &mpb::Presence) -> mpb::PresenceState {
    mpb::PresenceState::try_from(p.state).expect("a known state")
}

async fn presence_reaches_those_who_share_a_chat_once_per_change_and_nobody_else(c: &Cluster) {
    let (alice, bob, carol, dave) =
        (c.user("alice").await, c.user("bob").await, c.user("carol").await, c.user("dave").await);
    // Alice and bob share two chats; carol shares none with bob.
    let first = group(c, &alice, &[&bob], "first").await;
    let second = group(c, &alice, &[&bob], "second").await;
    let carols = direct(c, &carol, &dave).await;
    let mut alices = open(c, &alice, &[], &[]).await;
    let mut carol_stream = open(c, &carol, &[], &[]).await;

    // Bob comes online: alice hears it once, through one of the chats they
    // share, at her stream's change number of it (no resume point moves).
    let mut bob1 = open(c, &bob, &[], &[]).await;
    let (event, online) = next_presence(&mut alices).await;
    assert_eq!((online.user_id.as_str(), state(&online)), (bob.id.as_str(), Online));
    assert!(online.last_seen_time.is_none(), "no last_seen_time while online");
    assert!([&first.id, &second.id].contains(&&event.chat_id), "a shared chat: {}", event.chat_id);
    assert_eq!(event.seq, 0);
    // Once per change, not once per shared chat: bob's message in the other
    // chat is alice's next event.
    let other = if event.chat_id == first.id { &second.id } else { &first.id };
    send(c, &bob, other, "in the other chat").await;
    let after = next(&mut alices).await;
    assert!(matches!(&after.event, Some(Event::MessageCreated(m)) if m.text == "in the other chat"), "{after:?}");
    // Its change_seq was her stream's last of that chat: the chat's next
    // change takes the number after it.
    send(c, &bob, &event.chat_id, "in the same chat").await;
    let after = next(&mut alices).await;
    assert!(matches!(&after.event, Some(Event::MessageCreated(m)) if m.text == "in the same chat"), "{after:?}");
    assert_eq!(after.change_seq, event.change_seq + 1, "presence took no change number");

    // GetPresence: bob online to alice; carol (no shared chat) and a user
    // who does not exist are answered alike, revealing nothing; alice sees
    // herself.
    let nobody = uuid::Uuid::now_v7().to_string();
    let seen = presence(c, &alice, &[&bob.id, &carol.id, &nobody, &alice.id]).await;
    let states: Vec<_> = seen.iter().map(|p| (p.user_id.as_str(), state(p), p.last_seen_time.is_some())).collect();
    assert_eq!(
        states,
        [
            (bob.id.as_str(), Online, false),
            (carol.id.as_str(), Unspecified, false),
            (nobody.as_str(), Unspecified, false),
            (alice.id.as_str(), Online, false)
        ]
    );
    let to_carol = presence(c, &carol, &[&bob.id]).await;
    assert_eq!((state(&to_carol[0]), to_carol[0].last_seen_time.is_none()), (Unspecified, true), "not carol's to know");

    // Two streams of bob: closing one keeps him online. (The cap of two
    // streams per user proves the first one's end reached the server: only
    // then does a third open.)
    let bob2 = open(c, &bob, &[], &[]).await;
    drop(bob1);
    let bob3 = wait_for(|| async {
        let request = mpb::StreamEventsRequest::default();
        c.messages().stream_events(authed(&bob, request)).await.ok().map(|s| s.into_inner())
    })
    .await;
    let seen = presence(c, &alice, &[&bob.id]).await;
    assert_eq!(state(&seen[0]), Online, "one stream closed of two: still online");
    bob1 = bob3;

    // Bob's last streams close: alice hears he is offline, as of then, and
    // GetPresence says the same.
    let closing = now_micros();
    drop(bob2);
    drop(bob1);
    let (_, offline) = next_presence(&mut alices).await;
    assert_eq!((offline.user_id.as_str(), state(&offline)), (bob.id.as_str(), Offline));
    let last_seen = micros(offline.last_seen_time.as_ref().expect("a last_seen_time"));
    assert!((closing..=now_micros()).contains(&last_seen), "last seen as his last stream closed");
    let seen = presence(c, &alice, &[&bob.id]).await;
    assert_eq!((state(&seen[0]), seen[0].last_seen_time.as_ref().map(micros)), (Offline, Some(last_seen)));

    // Carol heard nothing of bob: her first event is dave's message.
    send(c, &dave, &carols.id, "hi carol").await;
    let first_for_carol = next(&mut carol_stream).await;
    assert!(
        matches!(&first_for_carol.event, Some(Event::MessageCreated(m)) if m.text == "hi carol"),
        "carol's first event: {first_for_carol:?}"
    );
}

async fn get_presence_refuses_bad_ids_by_field_and_too_many_calls(c: &Cluster) {
    let alice = c.user("alice").await;
    let call = |ids: Vec<String>| {
        let mut client = c.messages();
        let request = authed(&alice, mpb::GetPresenceRequest { user_ids: ids });
        async move { client.get_presence(request).await }
    };
    let refused = call(Vec::new()).await.expect_err("no ids");
    assert_eq!(crate::violated_fields(&refused), ["user_ids"]);
    let refused = call((0..101).map(|_| uuid::Uuid::now_v7().to_string()).collect()).await.expect_err("101 ids");
    assert_eq!(crate::violated_fields(&refused), ["user_ids"]);
    let refused = call(vec![alice.id.clone(), "not-an-id".into()]).await.expect_err("a bad id");
    assert_eq!(crate::violated_fields(&refused), ["user_ids[1]"]);
    // Never online yet: offline, no last-seen time.
    let own = call(vec![alice.id.clone()]).await.unwrap().into_inner().presences;
    assert_eq!((state(&own[0]), own[0].last_seen_time.is_none()), (Offline, true));

    // Abuse is refused, not slowed: --presence-rate (120/1m) runs out.
    let mut refused = None;
    for _ in 0..200 {
        if let Err(status) = call(vec![alice.id.clone()]).await {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("refused within 200 calls");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    crate::retry_delay(&refused);
}

/// The next presence change on `stream` as (user id, state), passing over
/// any other event (an account_updated, a chat's closure).
async fn next_change(stream: &mut Streaming<mpb::StreamEventsResponse>) -> (String, mpb::PresenceState) {
    loop {
        if let Some(Event::PresenceChanged(p)) = next(stream).await.event {
            return (p.user_id.clone(), state(&p));
        }
    }
}

/// Reads `stream` up to `user`'s change to `to`, passing over any other
/// event: a stream that hears every change (dave's, below) shows that the
/// server has handed that one out, so a change made after this is handed
/// out after it.
async fn until_change(stream: &mut Streaming<mpb::StreamEventsResponse>, user: &TestUser, to: mpb::PresenceState) {
    while next_change(stream).await != (user.id.clone(), to) {}
}

/// (user id, state, whether a last_seen_time is set) of each presence.
fn states(seen: &[mpb::Presence]) -> Vec<(String, mpb::PresenceState, bool)> {
    seen.iter().map(|p| (p.user_id.clone(), state(p), p.last_seen_time.is_some())).collect()
}

/// While either of two users has blocked the other, neither sees the
/// other's presence: GetPresence answers UNSPECIFIED (as for a user one
/// shares no chat with), and no presence_changed of one reaches the other's
/// stream, though they share a group; a third member's still does. An
/// unblock shows it again at once. The absence of a change is shown by a
/// later change, carol's, that goes through the same group chat after it
/// (one replica hands changes out in order), reaching alice first.
async fn a_block_hides_presence_both_ways_until_it_is_taken_back(c: &Cluster) {
    let (alice, bob, carol, dave) =
        (c.user("alice").await, c.user("bob").await, c.user("carol").await, c.user("dave").await);
    group(c, &alice, &[&bob, &carol, &dave], "club").await;
    direct(c, &alice, &bob).await;
    // Dave hears every change, in the order the server hands them out.
    let mut daves = open(c, &dave, &[], &[]).await;
    let mut alices = open(c, &alice, &[], &[]).await;
    let bobs = open(c, &bob, &[], &[]).await;
    // (Alice may hear dave come online first.)
    until_change(&mut alices, &bob, Online).await;
    until_change(&mut daves, &bob, Online).await;

    let block = cpb::BlockUserRequest { user_id: bob.id.clone() };
    c.chats().block_user(authed(&alice, block)).await.expect("BlockUser");
    // Hidden both ways; carol, who shares the group, is still seen (offline:
    // never online yet), and so is dave.
    let seen = presence(c, &alice, &[&bob.id, &carol.id]).await;
    assert_eq!(states(&seen), [(bob.id.clone(), Unspecified, false), (carol.id.clone(), Offline, false)]);
    let seen = presence(c, &bob, &[&alice.id, &dave.id]).await;
    assert_eq!(states(&seen), [(alice.id.clone(), Unspecified, false), (dave.id.clone(), Online, false)]);

    // Bob goes offline, then carol comes online: alice hears only carol.
    drop(bobs);
    until_change(&mut daves, &bob, Offline).await;
    let carols = open(c, &carol, &[], &[]).await;
    let heard = next_change(&mut alices).await;
    assert_eq!(heard, (carol.id.clone(), Online), "bob going offline is not alice's to hear");
    // Bob comes back (counted as his stream opens), carol goes: again only
    // carol for alice.
    let mut bobs = open(c, &bob, &[], &[]).await;
    drop(carols);
    assert_eq!(next_change(&mut alices).await, (carol.id.clone(), Offline), "bob coming back is not alice's either");
    assert_eq!(next_change(&mut bobs).await, (carol.id.clone(), Offline));

    // The other way: alice goes offline, then carol comes online: bob hears
    // only carol, and GetPresence gives him no last_seen_time of alice's.
    drop(alices);
    until_change(&mut daves, &alice, Offline).await;
    let _carols = open(c, &carol, &[], &[]).await;
    let heard = next_change(&mut bobs).await;
    assert_eq!(heard, (carol.id.clone(), Online), "alice going offline is not bob's to hear");
    let seen = presence(c, &bob, &[&alice.id]).await;
    assert_eq!(states(&seen), [(alice.id.clone(), Unspecified, false)]);

    // Unblocked: each sees the other again, at once and from the next change.
    let unblock = cpb::UnblockUserRequest { user_id: bob.id.clone() };
    c.chats().unblock_user(authed(&alice, unblock)).await.expect("UnblockUser");
    assert_eq!(states(&presence(c, &alice, &[&bob.id]).await), [(bob.id.clone(), Online, false)]);
    assert_eq!(states(&presence(c, &bob, &[&alice.id]).await), [(alice.id.clone(), Offline, true)]);
    let mut alices = open(c, &alice, &[], &[]).await;
    assert_eq!(next_change(&mut bobs).await, (alice.id.clone(), Online));
    drop(bobs);
    assert_eq!(next_change(&mut alices).await, (bob.id.clone(), Offline));
}

crate::each_mode!(a_server_stopped_with_streams_open_records_their_users_last_seen_time);

/// A server stopped while bob's stream is open takes him offline as it
/// stops (its goodbye), and his last-seen time is stored: after the
/// restart, GetPresence says when.
async fn a_server_stopped_with_streams_open_records_their_users_last_seen_time(mode: natter_testkit::Mode) {
    let Some(c) = Cluster::start_with(mode, Flags::default()).await else { return };
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    direct(&c, &alice, &bob).await;
    let held = open(&c, &bob, &[], &[]).await;
    assert_eq!(state(&presence(&c, &alice, &[&bob.id]).await[0]), Online);
    let stopping = now_micros();
    let c = c.restart_with(Flags::default()).await;
    drop(held);
    let seen = presence(&c, &alice, &[&bob.id]).await;
    assert_eq!(state(&seen[0]), Offline);
    let last_seen = micros(seen[0].last_seen_time.as_ref().expect("a last_seen_time after the restart"));
    assert!(last_seen >= stopping, "as the server stopped: {last_seen} < {stopping}");
    c.stop().await;
}

crate::each_mode!(a_user_just_gone_offline_has_a_last_seen_time_before_the_store_records_it);

/// GetPresence right after bob's last stream closed, while the store has
/// not recorded his last-seen time yet (its writes held back), answers
/// Offline with the time all the same, not Offline with none; the
/// `presence_changed` that follows once it is recorded, and GetPresence
/// then, carry the same time.
async fn a_user_just_gone_offline_has_a_last_seen_time_before_the_store_records_it(mode: natter_testkit::Mode) {
    let Some(c) = Cluster::start_with(mode, Flags::default()).await else { return };
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    direct(&c, &alice, &bob).await;
    let mut alices = open(&c, &alice, &[], &[]).await;
    let bobs = open(&c, &bob, &[], &[]).await;
    let (_, online) = next_presence(&mut alices).await;
    assert_eq!((online.user_id.as_str(), state(&online)), (bob.id.as_str(), Online));

    let held = c.hold_writes("messages", "user_presence").await;
    let closing = now_micros();
    drop(bobs);
    let offline = wait_for(|| async {
        let seen = presence(&c, &alice, &[&bob.id]).await.remove(0);
        (state(&seen) == Offline).then_some(seen)
    })
    .await;
    let last_seen = micros(offline.last_seen_time.as_ref().expect("a last_seen_time while the store has none yet"));
    assert!((closing..=now_micros()).contains(&last_seen), "last seen as his last stream closed");

    held.release().await;
    let (_, told) = next_presence(&mut alices).await;
    assert_eq!((told.user_id.as_str(), state(&told)), (bob.id.as_str(), Offline));
    assert_eq!(told.last_seen_time.as_ref().map(micros), Some(last_seen), "the time GetPresence gave");
    let seen = presence(&c, &alice, &[&bob.id]).await;
    assert_eq!((state(&seen[0]), seen[0].last_seen_time.as_ref().map(micros)), (Offline, Some(last_seen)));
    c.stop().await;
}

/// `user_updated` and `account_updated`: what others see of a user, and
/// their own account, reach open streams live.
mod live_profile {
    use std::collections::HashMap;

    use natter_proto::chats::v1 as cpb;
    use natter_proto::messages::v1 as mpb;
    use natter_proto::sessions::v1 as spb;
    use natter_testkit::{Cluster, TestUser, authed};
    use tonic::codec::Streaming;

    use super::group;
    use crate::chats::{direct, send};
    use crate::stream::{next_any, open};
    use mpb::stream_events_response::Event;

    crate::both_modes!(
        renames_reach_those_who_share_a_chat_once_and_account_changes_only_the_user_s_own_streams,
        a_deleted_account_is_told_to_those_who_share_a_chat_with_it_and_to_nobody_else,
        a_client_that_keeps_every_event_s_change_seq_by_its_chat_id_reconnects_after_a_rename,
        a_deletion_whose_announcement_was_lost_is_told_when_the_account_leaves_its_chats,
    );

    /// The next event that is not a presence change (streams opening and
    /// closing send those to everyone who shares a chat).
    async fn next(stream: &mut Streaming<mpb::StreamEventsResponse>) -> mpb::StreamEventsResponse {
        loop {
            let event = next_any(stream).await;
            if !matches!(event.event, Some(Event::PresenceChanged(_))) {
                return event;
            }
        }
    }

    /// The next event, which must be `user_updated`, not of a chat.
    async fn next_user_updated(stream: &mut Streaming<mpb::StreamEventsResponse>) -> mpb::UserUpdated {
        let event = next(stream).await;
        assert_eq!((event.chat_id.as_str(), event.seq, event.change_seq), ("", 0, 0), "of no chat: {event:?}");
        match event.event {
            Some(Event::UserUpdated(u)) => u,
            other => panic!("expected user_updated, got {other:?}"),
        }
    }

    /// The next event, which must be `account_updated`, not of a chat.
    async fn next_account_updated(stream: &mut Streaming<mpb::StreamEventsResponse>) -> mpb::AccountChange {
        let event = next(stream).await;
        assert_eq!((event.chat_id.as_str(), event.seq, event.change_seq), ("", 0, 0), "of no chat: {event:?}");
        match event.event {
            Some(Event::AccountUpdated(a)) => a.change(),
            other => panic!("expected account_updated, got {other:?}"),
        }
    }

    /// The next event, which must be the message `text`.
    async fn next_message(stream: &mut Streaming<mpb::StreamEventsResponse>, text: &str) {
        let event = next(stream).await;
        assert!(
            matches!(&event.event, Some(Event::MessageCreated(m)) if m.text == text),
            "expected {text:?}: {event:?}"
        );
    }

    async fn rename(c: &Cluster, user: &TestUser, name: &str) {
        let request = spb::UpdateUserRequest {
            user: Some(spb::User { display_name: name.to_owned(), ..Default::default() }),
            update_mask: Some(natter_proto::FieldMask { paths: vec!["display_name".into()] }),
        };
        c.sessions().update_user(authed(user, request)).await.expect("UpdateUser");
    }

    async fn renames_reach_those_who_share_a_chat_once_and_account_changes_only_the_user_s_own_streams(c: &Cluster) {
        let (alice, bob, carol, dave) =
            (c.user("alice").await, c.user("bob").await, c.user("carol").await, c.user("dave").await);
        // Alice and bob share two chats; carol shares none with alice.
        let book_club = group(c, &alice, &[&bob], "book club").await;
        let alice_bob = direct(c, &alice, &bob).await;
        let carols = direct(c, &carol, &dave).await;
        // And bob a chat with a guest.
        let guest = c.guest().await;
        direct(c, &bob, &guest).await;
        // Two tabs of alice, one of bob, one of carol.
        let (mut tab1, mut tab2) = (open(c, &alice, &[], &[]).await, open(c, &alice, &[], &[]).await);
        let mut bobs = open(c, &bob, &[], &[]).await;
        let mut carols_stream = open(c, &carol, &[], &[]).await;

        // Alice renames herself: bob hears it once (not once per shared
        // chat), both her tabs hear it once, carol not at all.
        rename(c, &alice, "Alice Liddell").await;
        let expected = mpb::UserUpdated {
            user_id: alice.id.clone(),
            username: alice.username.clone(),
            display_name: "Alice Liddell".into(),
            deleted: false,
            // Her first change: users start at 0.
            profile_version: 1,
        };
        for stream in [&mut bobs, &mut tab1, &mut tab2] {
            assert_eq!(next_user_updated(stream).await, expected);
        }
        // A second copy (through the other shared chat) would have been
        // queued on its chat before these: the next events are the two
        // messages.
        send(c, &alice, &book_club.id, "after the rename").await;
        send(c, &alice, &alice_bob.id, "after the rename, too").await;
        for stream in [&mut bobs, &mut tab1, &mut tab2] {
            next_message(stream, "after the rename").await;
            next_message(stream, "after the rename, too").await;
        }

        // Her account's changes go to her own tabs (the one that made them
        // too), and to nobody else.
        let block = cpb::BlockUserRequest { user_id: carol.id.clone() };
        c.chats().block_user(authed(&alice, block)).await.expect("BlockUser");
        let settings = cpb::UpdatePrivacySettingsRequest {
            settings: Some(cpb::PrivacySettings {
                direct_chats: cpb::DirectChats::Nobody as i32,
                ..Default::default()
            }),
            update_mask: Some(natter_proto::FieldMask { paths: vec!["direct_chats".into()] }),
        };
        c.chats().update_privacy_settings(authed(&alice, settings)).await.expect("UpdatePrivacySettings");
        let unblock = cpb::UnblockUserRequest { user_id: carol.id.clone() };
        c.chats().unblock_user(authed(&alice, unblock)).await.expect("UnblockUser");
        for tab in [&mut tab1, &mut tab2] {
            assert_eq!(next_account_updated(tab).await, mpb::AccountChange::BlockedUsers);
            assert_eq!(next_account_updated(tab).await, mpb::AccountChange::PrivacySettings);
            assert_eq!(next_account_updated(tab).await, mpb::AccountChange::BlockedUsers);
        }
        send(c, &alice, &book_club.id, "after the settings").await;
        for stream in [&mut tab1, &mut tab2, &mut bobs] {
            next_message(stream, "after the settings").await;
        }

        // A guest who claims an account: bob, who shares a chat with them,
        // sees their username and name at once.
        let claim = spb::ClaimAccountRequest {
            username: format!("claimed{}", &guest.id[guest.id.len() - 8..]),
            password: "long enough".into(),
            display_name: "Claimed".into(),
        };
        c.sessions().claim_account(authed(&guest, claim.clone())).await.expect("ClaimAccount");
        let claimed = next_user_updated(&mut bobs).await;
        assert_eq!(
            (claimed.user_id.as_str(), claimed.username.as_str(), claimed.display_name.as_str()),
            (guest.id.as_str(), claim.username.as_str(), "Claimed")
        );
        // A re-read (what a client does when it reconnects) answers the same
        // versions as the events, so a client keeps whichever is newer.
        let read = spb::BatchGetUsersRequest { user_ids: vec![alice.id.clone(), guest.id.clone()] };
        let read = c.sessions().batch_get_users(authed(&bob, read)).await.expect("BatchGetUsers").into_inner();
        let versions: HashMap<_, _> = read.users.iter().map(|u| (u.id.as_str(), u.profile_version)).collect();
        assert_eq!(versions, HashMap::from([(alice.id.as_str(), 1), (guest.id.as_str(), claimed.profile_version)]));
        assert_eq!(claimed.profile_version, 1, "the guest's first change");

        // Carol heard none of it: her first event is dave's message.
        send(c, &dave, &carols.id, "hi carol").await;
        next_message(&mut carols_stream, "hi carol").await;
    }

    /// Bob keeps his direct chat with alice when she deletes her account:
    /// his stream hears at once that she is gone (no names), so his page
    /// shows a deleted account without a reload. Carol, who shares no chat
    /// with alice, hears nothing.
    async fn a_deleted_account_is_told_to_those_who_share_a_chat_with_it_and_to_nobody_else(c: &Cluster) {
        let (alice, bob, carol) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
        let alice_bob = direct(c, &alice, &bob).await;
        let bob_carol = direct(c, &bob, &carol).await;
        send(c, &alice, &alice_bob.id, "goodbye").await;
        let (mut bobs, mut carols) = (open(c, &bob, &[], &[]).await, open(c, &carol, &[], &[]).await);

        let delete = spb::DeleteAccountRequest { password: "correct horse battery".into() };
        c.sessions().delete_account(authed(&alice, delete)).await.expect("DeleteAccount");
        let gone = next_user_updated(&mut bobs).await;
        assert_eq!(
            gone,
            mpb::UserUpdated {
                user_id: alice.id.clone(),
                deleted: true,
                profile_version: i64::MAX,
                ..Default::default()
            }
        );
        // The direct chat stays with its history, for bob.
        let history = mpb::ListMessagesRequest { chat_id: alice_bob.id.clone(), ..Default::default() };
        let history = c.messages().list_messages(authed(&bob, history)).await.expect("ListMessages").into_inner();
        assert_eq!(history.messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["goodbye"]);

        // Carol's first event is bob's message, sent after the deletion.
        send(c, &bob, &bob_carol.id, "hi carol").await;
        next_message(&mut carols, "hi carol").await;
    }

    /// The sessions service announces a deletion once, as it commits it; a
    /// replica that stops before publishing, or a bus connection that drops
    /// the message, loses that. Bob's page, its stream open all along,
    /// would show alice's account as live until reloaded. The chats
    /// service, which follows the log of deleted users until each is out of
    /// its chats, tells each chat's streams before she leaves it: bob hears
    /// it through their direct chat (which stays), carol through the group
    /// she shares with alice only (which alice then leaves).
    async fn a_deletion_whose_announcement_was_lost_is_told_when_the_account_leaves_its_chats(c: &Cluster) {
        let (alice, bob, carol) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
        direct(c, &alice, &bob).await;
        group(c, &alice, &[&carol], "alice and carol").await;
        let (mut bobs, mut carols) = (open(c, &bob, &[], &[]).await, open(c, &carol, &[], &[]).await);

        c.delete_user_silently(&alice.id).await;
        let gone = mpb::UserUpdated {
            user_id: alice.id.clone(),
            deleted: true,
            profile_version: i64::MAX,
            ..Default::default()
        };
        for stream in [&mut bobs, &mut carols] {
            // The chats service follows the log every 5 s; alice's leaving
            // the group may reach carol's stream first.
            let heard = tokio::time::timeout(std::time::Duration::from_secs(30), async {
                loop {
                    let event = stream.message().await.expect("stream ok").expect("stream open");
                    match event.event {
                        Some(Event::UserUpdated(u)) => return u,
                        Some(Event::PresenceChanged(_) | Event::MembershipChanged(_)) => {}
                        other => panic!("expected user_updated, got {other:?}"),
                    }
                }
            });
            assert_eq!(heard.await.expect("the deletion is told within 30 s"), gone);
        }
    }

    /// A client that keeps the highest `change_seq` of every event by its
    /// `chat_id` (as StreamEvents tells clients to) holds "" -> 0 once it
    /// heard a `user_updated`. Sent back in `resume_changes`, that entry
    /// names no chat and is ignored: the reconnect resumes the chat from
    /// where the client was, rather than failing INVALID_ARGUMENT at every
    /// try.
    async fn a_client_that_keeps_every_event_s_change_seq_by_its_chat_id_reconnects_after_a_rename(c: &Cluster) {
        let (alice, bob) = (c.user("alice").await, c.user("bob").await);
        let chat = direct(c, &alice, &bob).await;
        let mut bobs = open(c, &bob, &[], &[]).await;
        send(c, &alice, &chat.id, "before the rename").await;
        rename(c, &alice, "Alice Liddell").await;
        let mut seen = std::collections::HashMap::<String, i64>::new();
        loop {
            let event = next_any(&mut bobs).await;
            let last = seen.entry(event.chat_id.clone()).or_default();
            *last = (*last).max(event.change_seq);
            if matches!(event.event, Some(Event::UserUpdated(_))) {
                break;
            }
        }
        assert_eq!(seen.get(""), Some(&0), "the rename's entry: {seen:?}");
        drop(bobs);

        send(c, &alice, &chat.id, "while bob was away").await;
        let request = mpb::StreamEventsRequest { resume_changes: seen, ..Default::default() };
        let mut again =
            c.messages().stream_events(authed(&bob, request)).await.expect("the reconnect is taken").into_inner();
        next_message(&mut again, "while bob was away").await;
    }
}

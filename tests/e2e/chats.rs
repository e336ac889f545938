//! Chats: creation rules, idempotency, listing by activity with previews.

use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_testkit::{Cluster, TestUser, authed};
use tonic::Code;

use crate::{code, quota_subject, violated_fields};

crate::both_modes!(
    direct_chats_are_unique_per_pair,
    client_chosen_chat_ids_are_idempotent,
    group_rules_and_bad_input,
    list_chats_orders_by_activity_and_pages,
    list_chats_orders_by_creation_and_filters_a_creation_range,
    previews_and_unread_counts_follow_messages,
    non_members_are_denied,
    who_may_add_a_user_to_a_group_is_theirs_to_say,
    who_may_start_a_direct_chat_is_theirs_to_say,
    a_blocked_user_cannot_reach_whoever_blocked_them,
    a_send_checked_before_a_block_is_refused_where_it_is_written,
    a_send_checked_before_a_removal_is_refused_where_it_is_written,
    an_edit_checked_before_a_removal_is_refused_where_it_is_written,
    a_reaction_checked_before_a_removal_is_refused_where_it_is_written,
    a_pin_checked_before_a_removal_is_refused_where_it_is_written,
    a_send_checked_before_a_chat_s_deletion_is_refused_where_it_is_written,
    a_pin_or_a_moderation_checked_before_a_demotion_is_refused_where_it_is_written,
    a_deletion_read_marker_or_report_checked_before_a_removal_is_refused_where_it_is_written,
    an_edit_reaction_or_pin_checked_before_a_block_is_refused_where_it_is_written,
    a_send_edit_reaction_or_pin_checked_before_an_archive_is_refused_where_it_is_written,
    a_resolve_checked_before_a_demotion_is_refused_where_it_is_written,
);

pub(crate) async fn direct(c: &Cluster, a: &TestUser, b: &TestUser) -> cpb::Chat {
    let request = cpb::CreateChatRequest { member_ids: vec![b.id.clone()], ..Default::default() };
    c.chats().create_chat(authed(a, request)).await.unwrap().into_inner().chat.unwrap()
}

pub(crate) async fn send(c: &Cluster, user: &TestUser, chat_id: &str, text: &str) -> mpb::Message {
    let request = mpb::SendMessageRequest { chat_id: chat_id.to_owned(), text: text.to_owned(), ..Default::default() };
    c.messages().send_message(authed(user, request)).await.unwrap().into_inner().message.unwrap()
}

async fn direct_chats_are_unique_per_pair(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let first = direct(c, &alice, &bob).await;
    assert_eq!(first.kind, cpb::ChatKind::Direct as i32);
    assert_eq!(first.owner_id, alice.id);
    assert_eq!(first.member_count, 2);
    assert_eq!(direct(c, &alice, &bob).await.id, first.id, "same pair, same chat");
    assert_eq!(direct(c, &bob, &alice).await.id, first.id, "either side");
    // Concurrent first requests of a new pair still make one chat.
    let carol = c.user("carol").await;
    let racers = futures::future::join_all((0..6).map(|_| direct(c, &alice, &carol))).await;
    assert!(racers.iter().all(|chat| chat.id == racers[0].id));
    assert_ne!(racers[0].id, first.id);
}

async fn client_chosen_chat_ids_are_idempotent(c: &Cluster) {
    let (alice, bob, carol) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
    let id = uuid::Uuid::now_v7().to_string();
    let request = cpb::CreateChatRequest {
        chat_id: id.clone(),
        title: "Trip".into(),
        member_ids: vec![bob.id.clone()],
        ..Default::default()
    };
    let first = c.chats().create_chat(authed(&alice, request.clone())).await.unwrap().into_inner().chat.unwrap();
    assert_eq!(first.id, id);
    assert_eq!(first.kind, cpb::ChatKind::Group as i32);
    let retry = c.chats().create_chat(authed(&alice, request.clone())).await.unwrap().into_inner().chat.unwrap();
    assert_eq!(retry.id, id);
    assert_eq!(retry.create_time, first.create_time);
    // Someone else reusing the id is refused, not handed the chat.
    assert_eq!(code(c.chats().create_chat(authed(&carol, request)).await), Code::AlreadyExists);
}

async fn group_rules_and_bad_input(c: &Cluster) {
    let (alice, bob, carol) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
    let untitled = cpb::CreateChatRequest { member_ids: vec![bob.id.clone(), carol.id.clone()], ..Default::default() };
    let group = c.chats().create_chat(authed(&alice, untitled)).await.unwrap().into_inner().chat.unwrap();
    assert_eq!(group.kind, cpb::ChatKind::Group as i32);
    assert_eq!(group.member_count, 3);

    let lonely = cpb::CreateChatRequest { kind: cpb::ChatKind::Group as i32, ..Default::default() };
    assert_eq!(violated_fields(&c.chats().create_chat(authed(&alice, lonely)).await.unwrap_err()), ["title"]);
    let long = cpb::CreateChatRequest { title: "x".repeat(201), ..Default::default() };
    assert_eq!(violated_fields(&c.chats().create_chat(authed(&alice, long)).await.unwrap_err()), ["title"]);
    let bad_id = cpb::CreateChatRequest { member_ids: vec!["not-a-uuid".into()], ..Default::default() };
    assert_eq!(violated_fields(&c.chats().create_chat(authed(&alice, bad_id)).await.unwrap_err()), ["member_ids[0]"]);
    let three_direct = cpb::CreateChatRequest {
        kind: cpb::ChatKind::Direct as i32,
        member_ids: vec![bob.id.clone(), carol.id.clone()],
        ..Default::default()
    };
    assert_eq!(
        violated_fields(&c.chats().create_chat(authed(&alice, three_direct)).await.unwrap_err()),
        ["member_ids"]
    );
    let ghost = cpb::CreateChatRequest { member_ids: vec![uuid::Uuid::now_v7().to_string()], ..Default::default() };
    assert_eq!(code(c.chats().create_chat(authed(&alice, ghost)).await), Code::NotFound);
    let missing = cpb::GetChatRequest { chat_id: uuid::Uuid::now_v7().to_string(), ..Default::default() };
    assert_eq!(code(c.chats().get_chat(authed(&alice, missing)).await), Code::NotFound);
}

async fn list_chats_orders_by_activity_and_pages(c: &Cluster) {
    let alice = c.user("alice").await;
    let mut chats = Vec::new();
    for i in 0..5 {
        let other = c.user(&format!("friend{i}")).await;
        chats.push(direct(c, &alice, &other).await.id);
    }
    // Activity reorders: a message in the oldest chat makes it the newest.
    send(c, &alice, &chats[0], "bump").await;
    let expected_desc = vec![chats[0].clone(), chats[4].clone(), chats[3].clone(), chats[2].clone(), chats[1].clone()];

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let request = cpb::ListChatsRequest { page_size: 2, page_token: token.clone(), ..Default::default() };
        let page = c.chats().list_chats(authed(&alice, request)).await.unwrap().into_inner();
        assert!(page.chats.len() <= 2);
        seen.extend(page.chats.into_iter().map(|ch| ch.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, expected_desc);

    let asc = cpb::ListChatsRequest { order: cpb::SortOrder::Asc as i32, ..Default::default() };
    let asc: Vec<_> = c
        .chats()
        .list_chats(authed(&alice, asc))
        .await
        .unwrap()
        .into_inner()
        .chats
        .into_iter()
        .map(|ch| ch.id)
        .collect();
    assert_eq!(asc, expected_desc.iter().rev().cloned().collect::<Vec<_>>());

    let garbage = cpb::ListChatsRequest { page_token: "garbage".into(), ..Default::default() };
    assert_eq!(violated_fields(&c.chats().list_chats(authed(&alice, garbage)).await.unwrap_err()), ["page_token"]);
    // A token is bound to the filters it was issued for.
    let first = c
        .chats()
        .list_chats(authed(&alice, cpb::ListChatsRequest { page_size: 1, ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    let switched = cpb::ListChatsRequest {
        page_size: 1,
        page_token: first.next_page_token,
        order: cpb::SortOrder::Asc as i32,
        ..Default::default()
    };
    assert_eq!(code(c.chats().list_chats(authed(&alice, switched)).await), Code::InvalidArgument);
}

/// Every page of `user`'s ListChats answer to `request` (pages of 1).
async fn ids_paged(c: &Cluster, user: &TestUser, request: cpb::ListChatsRequest) -> Vec<String> {
    let mut request = cpb::ListChatsRequest { page_size: 1, ..request };
    let mut ids = Vec::new();
    loop {
        let page = c.chats().list_chats(authed(user, request.clone())).await.unwrap().into_inner();
        assert!(page.chats.len() <= 1);
        ids.extend(page.chats.into_iter().map(|ch| ch.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        request.page_token = page.next_page_token;
    }
}

async fn list_chats_orders_by_creation_and_filters_a_creation_range(c: &Cluster) {
    let alice = c.user("alice").await;
    let mut chats = Vec::new();
    for i in 0..4 {
        let create = cpb::CreateChatRequest { title: format!("chat {i}"), ..Default::default() };
        chats.push(c.chats().create_chat(authed(&alice, create)).await.unwrap().into_inner().chat.unwrap());
    }
    // The oldest chat gets the newest activity.
    send(c, &alice, &chats[0].id, "bump").await;
    let id = |i: usize| chats[i].id.clone();
    let order_by = |order_by: &str| cpb::ListChatsRequest { order_by: order_by.into(), ..Default::default() };
    assert_eq!(ids_paged(c, &alice, order_by("create_time desc")).await, [id(3), id(2), id(1), id(0)]);
    assert_eq!(ids_paged(c, &alice, order_by("create_time")).await, [id(0), id(1), id(2), id(3)], "asc by default");
    assert_eq!(ids_paged(c, &alice, order_by("last_activity_time desc")).await, [id(0), id(3), id(2), id(1)]);
    assert_eq!(ids_paged(c, &alice, order_by("activity asc")).await, [id(1), id(2), id(3), id(0)]);
    assert_eq!(ids_paged(c, &alice, cpb::ListChatsRequest::default()).await, [id(0), id(3), id(2), id(1)]);

    // [chat 1's creation, chat 3's): chats 1 and 2, in either order.
    let range = cpb::ListChatsRequest {
        create_time_after: chats[1].create_time,
        create_time_before: chats[3].create_time,
        ..Default::default()
    };
    let newest_first = cpb::ListChatsRequest { order_by: "create_time desc".into(), ..range.clone() };
    assert_eq!(ids_paged(c, &alice, newest_first.clone()).await, [id(2), id(1)]);
    assert_eq!(ids_paged(c, &alice, range.clone()).await, [id(2), id(1)], "by activity");
    let rest = cpb::ListChatsRequest { create_time_after: chats[3].create_time, ..Default::default() };
    assert_eq!(ids_paged(c, &alice, rest).await, [id(3)]);

    // A token is bound to its order and its range.
    let first = c
        .chats()
        .list_chats(authed(&alice, cpb::ListChatsRequest { page_size: 1, ..newest_first.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.chats[0].id, id(2));
    let token = first.next_page_token;
    for other in [
        cpb::ListChatsRequest { order_by: String::new(), ..newest_first.clone() },
        cpb::ListChatsRequest { order_by: "create_time asc".into(), ..newest_first.clone() },
        cpb::ListChatsRequest { order_by: "last_activity_time desc".into(), ..newest_first.clone() },
        cpb::ListChatsRequest { create_time_before: None, ..newest_first.clone() },
    ] {
        let reused = cpb::ListChatsRequest { page_size: 1, page_token: token.clone(), ..other };
        assert_eq!(violated_fields(&c.chats().list_chats(authed(&alice, reused)).await.unwrap_err()), ["page_token"]);
    }
    let resumed = cpb::ListChatsRequest { page_size: 1, page_token: token, ..newest_first };
    let next = c.chats().list_chats(authed(&alice, resumed)).await.unwrap().into_inner();
    assert_eq!(next.chats.iter().map(|ch| ch.id.clone()).collect::<Vec<_>>(), [id(1)]);

    // Unknown orders name order_by; order and order_by together name order.
    for bad in ["title desc", "create_time sideways", "create_time, id"] {
        let status = c.chats().list_chats(authed(&alice, order_by(bad))).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["order_by"], "{bad}");
    }
    let both = cpb::ListChatsRequest { order: cpb::SortOrder::Asc as i32, ..order_by("create_time") };
    assert_eq!(violated_fields(&c.chats().list_chats(authed(&alice, both)).await.unwrap_err()), ["order"]);
}

async fn previews_and_unread_counts_follow_messages(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &alice, &bob).await;
    assert!(chat.last_message.is_none());
    for text in ["one", "two", "three"] {
        send(c, &alice, &chat.id, text).await;
    }
    let listed = |u: TestUser| async move {
        c.chats().list_chats(authed(&u, cpb::ListChatsRequest::default())).await.unwrap().into_inner().chats.remove(0)
    };
    let for_bob = listed(bob.clone()).await;
    let last = for_bob.last_message.unwrap();
    assert_eq!((last.seq, last.text.as_str(), last.author_id.as_str()), (3, "three", alice.id.as_str()));
    assert_eq!(for_bob.unread_count, 3);
    assert_eq!(listed(alice.clone()).await.unread_count, 0, "own messages are never unread");

    let read = c
        .messages()
        .mark_read(authed(&bob, mpb::MarkReadRequest { chat_id: chat.id.clone(), seq: 2 }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((read.read_seq, read.unread_count), (2, 1));
    // Never backwards, clamped to the newest message.
    let back = c
        .messages()
        .mark_read(authed(&bob, mpb::MarkReadRequest { chat_id: chat.id.clone(), seq: 1 }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((back.read_seq, back.unread_count), (2, 1));
    let beyond = c
        .messages()
        .mark_read(authed(&bob, mpb::MarkReadRequest { chat_id: chat.id.clone(), seq: 99 }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((beyond.read_seq, beyond.unread_count), (3, 0));
    assert_eq!(listed(bob.clone()).await.unread_count, 0);

    let screen = c
        .chats()
        .get_chat(authed(&bob, cpb::GetChatRequest { chat_id: chat.id.clone(), message_page_size: 2 }))
        .await
        .unwrap()
        .into_inner();
    let seqs: Vec<_> = screen.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [3, 2], "newest first");
    assert_eq!(screen.chat.unwrap().last_message.unwrap().seq, 3);
}

async fn non_members_are_denied(c: &Cluster) {
    let (alice, bob, eve) = (c.user("alice").await, c.user("bob").await, c.user("eve").await);
    let chat = direct(c, &alice, &bob).await;
    send(c, &alice, &chat.id, "private").await;
    let get = cpb::GetChatRequest { chat_id: chat.id.clone(), message_page_size: 10 };
    assert_eq!(code(c.chats().get_chat(authed(&eve, get)).await), Code::PermissionDenied);
    let list = mpb::ListMessagesRequest { chat_id: chat.id.clone(), ..Default::default() };
    assert_eq!(code(c.messages().list_messages(authed(&eve, list)).await), Code::PermissionDenied);
    let post = mpb::SendMessageRequest { chat_id: chat.id.clone(), text: "let me in".into(), ..Default::default() };
    assert_eq!(code(c.messages().send_message(authed(&eve, post)).await), Code::PermissionDenied);
    let read = mpb::MarkReadRequest { chat_id: chat.id.clone(), seq: 1 };
    assert_eq!(code(c.messages().mark_read(authed(&eve, read)).await), Code::PermissionDenied);
    let stream = mpb::StreamEventsRequest { chat_ids: vec![chat.id.clone()], ..Default::default() };
    assert_eq!(code(c.messages().stream_events(authed(&eve, stream)).await), Code::PermissionDenied);
    let members = cpb::ListMembersRequest { chat_id: chat.id.clone(), ..Default::default() };
    assert_eq!(code(c.chats().list_members(authed(&eve, members)).await), Code::PermissionDenied);
    // Eve's own list does not show it.
    assert!(
        c.chats()
            .list_chats(authed(&eve, cpb::ListChatsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .chats
            .is_empty()
    );
}

async fn set_direct_chats(c: &Cluster, user: &TestUser, direct: cpb::DirectChats) -> cpb::PrivacySettings {
    let request = cpb::UpdatePrivacySettingsRequest {
        settings: Some(cpb::PrivacySettings { direct_chats: direct as i32, ..Default::default() }),
        update_mask: Some(natter_proto::FieldMask { paths: vec!["direct_chats".into()] }),
    };
    c.chats().update_privacy_settings(authed(user, request)).await.unwrap().into_inner().settings.unwrap()
}

fn direct_request(other: &TestUser) -> cpb::CreateChatRequest {
    cpb::CreateChatRequest { member_ids: vec![other.id.clone()], ..Default::default() }
}

/// A user's privacy setting direct_chats says who may start a direct chat
/// with them: EVERYONE (the default), PEERS or NOBODY. A refusal names the
/// user and creates nothing; a direct chat that exists goes on; the
/// setting binds others, never the user's own direct chats; an update of
/// one setting keeps the other.
async fn who_may_start_a_direct_chat_is_theirs_to_say(c: &Cluster) {
    let (alice, bob, carol) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
    set_group_adds(c, &bob, cpb::GroupAdds::Peers).await;
    let nobody = set_direct_chats(c, &bob, cpb::DirectChats::Nobody).await;
    assert_eq!(nobody.direct_chats, cpb::DirectChats::Nobody as i32);
    assert_eq!(nobody.group_adds, cpb::GroupAdds::Peers as i32, "the other setting is kept");

    let refused = c.chats().create_chat(authed(&alice, direct_request(&bob))).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains(&bob.id) && refused.message().contains("direct_chats"), "{refused:?}");
    assert_eq!(chat_count(c, &alice).await, 0, "nothing created");

    // Bob may start one himself; once it exists, either side goes on.
    let chat = direct(c, &bob, &alice).await;
    assert_eq!(direct(c, &alice, &bob).await.id, chat.id);
    send(c, &alice, &chat.id, "hi bob").await;

    // PEERS: carol, who shares no chat with bob, is refused until she does;
    // joining a public group of his does not count (anyone may join one).
    set_direct_chats(c, &bob, cpb::DirectChats::Peers).await;
    let refused = c.chats().create_chat(authed(&carol, direct_request(&bob))).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let mut public = group_of("bob's open group", &[]);
    public.visibility = cpb::Visibility::Public as i32;
    let public = c.chats().create_chat(authed(&bob, public)).await.unwrap().into_inner().chat.unwrap();
    let join = cpb::AddMembersRequest { chat_id: public.id.clone(), user_ids: vec![carol.id.clone()] };
    c.chats().add_members(authed(&carol, join)).await.expect("carol joins the public group");
    let refused = c.chats().create_chat(authed(&carol, direct_request(&bob))).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "a public group makes no peers: {refused:?}");
    c.chats().create_chat(authed(&alice, group_of("all three", &[&bob, &carol]))).await.unwrap();
    direct(c, &carol, &bob).await;

    let unspecified = cpb::UpdatePrivacySettingsRequest {
        settings: Some(cpb::PrivacySettings::default()),
        update_mask: Some(natter_proto::FieldMask { paths: vec!["direct_chats".into()] }),
    };
    let bad = c.chats().update_privacy_settings(authed(&bob, unspecified)).await.unwrap_err();
    assert_eq!(violated_fields(&bad), ["settings.direct_chats"]);
}

async fn block(c: &Cluster, user: &TestUser, other: &TestUser) -> Result<(), tonic::Status> {
    c.chats().block_user(authed(user, cpb::BlockUserRequest { user_id: other.id.clone() })).await.map(drop)
}

async fn blocked_ids(c: &Cluster, user: &TestUser) -> Vec<String> {
    let listed = c.chats().list_blocked_users(authed(user, cpb::ListBlockedUsersRequest::default())).await.unwrap();
    listed.into_inner().blocked_users.into_iter().map(|b| b.user_id).collect()
}

async fn try_send(c: &Cluster, user: &TestUser, chat_id: &str, text: &str) -> Result<mpb::Message, tonic::Status> {
    let request = mpb::SendMessageRequest { chat_id: chat_id.to_owned(), text: text.to_owned(), ..Default::default() };
    c.messages().send_message(authed(user, request)).await.map(|r| r.into_inner().message.unwrap())
}

/// BlockUser: the blocked user can no longer start a direct chat with the
/// blocker or add them to a group (refused as a privacy setting refuses),
/// and their direct chat takes no new messages from either side until the
/// block is taken back; groups both are in go on; each user lists only
/// their own blocks.
async fn a_blocked_user_cannot_reach_whoever_blocked_them(c: &Cluster) {
    let (alice, bob, carol, dave) =
        (c.user("alice").await, c.user("bob").await, c.user("carol").await, c.user("dave").await);
    let chat = direct(c, &bob, &alice).await;
    let hello = send(c, &bob, &chat.id, "hello alice").await;

    block(c, &alice, &bob).await.unwrap();
    block(c, &alice, &bob).await.unwrap();
    for (who, text) in [(&bob, "are you there?"), (&alice, "bye")] {
        let refused = try_send(c, who, &chat.id, text).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("blocked"), "{refused:?}");
    }
    // Nor by an edit, a reaction or a typing indicator.
    let edit = mpb::EditMessageRequest { message_id: hello.id.clone(), text: "still there?".into() };
    assert_eq!(code(c.messages().edit_message(authed(&bob, edit)).await), Code::PermissionDenied);
    let react = mpb::AddReactionRequest { message_id: hello.id.clone(), emoji: "👍".into() };
    assert_eq!(code(c.messages().add_reaction(authed(&alice, react)).await), Code::PermissionDenied);
    let typing = mpb::SetTypingRequest { chat_id: chat.id.clone(), typing: true };
    assert_eq!(code(c.messages().set_typing(authed(&bob, typing)).await), Code::PermissionDenied);
    // But an indicator started before the block is stopped at once.
    let stop = mpb::SetTypingRequest { chat_id: chat.id.clone(), typing: false };
    c.messages().set_typing(authed(&bob, stop)).await.expect("a stop goes through");
    let refused = c.chats().create_chat(authed(&bob, group_of("with alice", &[&carol, &alice]))).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains(&alice.id) && refused.message().contains("group_adds"), "{refused:?}");
    assert_eq!(chat_count(c, &carol).await, 0, "nothing created");
    // A group of someone else's takes both, and both speak there.
    let group = c.chats().create_chat(authed(&carol, group_of("all", &[&alice, &bob]))).await.unwrap();
    let group = group.into_inner().chat.unwrap();
    send(c, &bob, &group.id, "hi all").await;
    send(c, &alice, &group.id, "hi").await;

    assert_eq!(blocked_ids(c, &alice).await, std::slice::from_ref(&bob.id));
    assert_eq!(blocked_ids(c, &bob).await, Vec::<String>::new(), "each user's own");
    let myself = block(c, &alice, &alice).await.unwrap_err();
    assert_eq!(violated_fields(&myself), ["user_id"]);
    let nobody = cpb::BlockUserRequest { user_id: uuid::Uuid::now_v7().to_string() };
    assert_eq!(code(c.chats().block_user(authed(&alice, nobody)).await), Code::NotFound);

    // A new direct chat either way: the blocked one is refused as a
    // setting refuses; the blocker is told to unblock first.
    block(c, &alice, &dave).await.unwrap();
    let refused = c.chats().create_chat(authed(&dave, direct_request(&alice))).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("direct_chats"), "{refused:?}");
    let refused = c.chats().create_chat(authed(&alice, direct_request(&dave))).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // Taken back: the direct chat takes messages again, at once.
    c.chats().unblock_user(authed(&alice, cpb::UnblockUserRequest { user_id: bob.id.clone() })).await.unwrap();
    send(c, &bob, &chat.id, "back again").await;
    assert_eq!(blocked_ids(c, &alice).await, std::slice::from_ref(&dave.id));
}

/// A send whose membership check (open) came before BlockUser and whose
/// write comes after it answered is refused in the write, as a send
/// checked after the block is: the messages service has the direct chat
/// closed before BlockUser answers, and every send's write reads it. The
/// check is made to answer "open" by taking the block back behind the
/// services' backs (what a check taken before the block answered); the
/// blocked user is told only what any send to a blocking user is told.
async fn a_send_checked_before_a_block_is_refused_where_it_is_written(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &bob, &alice).await;
    send(c, &bob, &chat.id, "hello alice").await;

    block(c, &alice, &bob).await.unwrap();
    c.unblock_silently(&alice.id, &bob.id).await;
    for (who, text) in [(&bob, "are you there?"), (&alice, "bye")] {
        let refused = try_send(c, who, &chat.id, text).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert_eq!(refused.message(), "this direct chat takes no new messages: one of you blocked the other");
    }
    let listed = mpb::ListMessagesRequest { chat_id: chat.id.clone(), ..Default::default() };
    let listed = c.messages().list_messages(authed(&alice, listed)).await.unwrap().into_inner().messages;
    assert_eq!(listed.len(), 1, "nothing stored after the block");

    // Blocked again and taken back through the API: open again.
    block(c, &alice, &bob).await.unwrap();
    c.chats().unblock_user(authed(&alice, cpb::UnblockUserRequest { user_id: bob.id.clone() })).await.unwrap();
    send(c, &bob, &chat.id, "back again").await;
}

/// A send whose membership check (a member) came before RemoveMember and
/// whose write comes after it answered is refused in the write, and takes
/// no seq: the messages service has the chat's new members version before
/// RemoveMember answers, and every send's write compares it with the one
/// its check saw. The check is made to answer "member, as of before the
/// removal" by putting the removal back behind the services' backs (what a
/// check taken before the removal answered); as the store keeps saying so
/// when the send checks again, afresh, it ends ABORTED. Once the store
/// tells the truth, the removed user is told what any non-member is, and
/// the others send on with no gap.
async fn a_send_checked_before_a_removal_is_refused_where_it_is_written(c: &Cluster) {
    let (alice, bob, carol) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
    let chat = c.chats().create_chat(authed(&alice, group_of("Team", &[&bob, &carol]))).await.unwrap();
    let chat = chat.into_inner().chat.unwrap();
    send(c, &bob, &chat.id, "hello all").await;
    let remove = || cpb::RemoveMemberRequest { chat_id: chat.id.clone(), user_id: bob.id.clone() };

    c.chats().remove_member(authed(&alice, remove())).await.unwrap();
    c.undo_departure_silently(&chat.id, &bob.id).await;
    let refused = try_send(c, &bob, &chat.id, "still here?").await.unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert_eq!(refused.message(), "the chat's members or their roles changed while the message was on its way: retry");
    let listed = mpb::ListMessagesRequest { chat_id: chat.id.clone(), ..Default::default() };
    let listed = c.messages().list_messages(authed(&alice, listed)).await.unwrap().into_inner().messages;
    assert_eq!(listed.len(), 1, "nothing stored after the removal");

    // Removed again through the API: the store tells the truth.
    c.chats().remove_member(authed(&alice, remove())).await.unwrap();
    let refused = try_send(c, &bob, &chat.id, "still here?").await.unwrap_err();
    assert_eq!((refused.code(), refused.message()), (Code::PermissionDenied, "not a member of this chat"));
    assert_eq!(send(c, &carol, &chat.id, "bye bob").await.seq, 2, "no seq taken by the refused send");
}

/// A send whose membership check (a member of a live chat) came before
/// DeleteChat and whose write comes after it answered is refused in the
/// write: nothing is stored in the deleted chat (which would otherwise
/// start over at seq 1 with a message nobody can read, kept for good).
/// DeleteChat answers once the messages service has purged the chat,
/// which leaves a mark on the chat's heads that every send's write reads.
/// The check is made to answer "member" by putting the chat back behind
/// the services' backs (what a check taken before the delete answered);
/// as the store keeps saying so when the send checks again, afresh, it
/// ends ABORTED. Once the store tells the truth, the chat is not found.
async fn a_send_checked_before_a_chat_s_deletion_is_refused_where_it_is_written(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = c.chats().create_chat(authed(&alice, group_of("Team", &[&bob]))).await.unwrap();
    let chat = chat.into_inner().chat.unwrap().id;
    send(c, &bob, &chat, "hello").await;
    let delete = || cpb::DeleteChatRequest { chat_id: chat.clone() };
    let stored = format!("SELECT COUNT(*) FROM messages WHERE chat_id = '{chat}'");

    c.copy_chat_aside(&chat).await;
    c.chats().delete_chat(authed(&alice, delete())).await.unwrap();
    c.undo_deletion_silently(&chat).await;
    let refused = try_send(c, &bob, &chat, "anyone?").await.unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    // A reply, or a thread reply, to a message the purge took: the
    // deleted chat answers first, not the missing message.
    let replies = [(1, 0), (0, 1)].map(|(reply_to_seq, thread_root_seq)| mpb::SendMessageRequest {
        chat_id: chat.clone(),
        text: "re: hello".into(),
        reply_to_seq,
        thread_root_seq,
        ..Default::default()
    });
    for reply in replies {
        let refused = c.messages().send_message(authed(&bob, reply)).await.unwrap_err();
        assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    }
    assert_eq!(c.count_in_store("messages", &stored).await, 0, "nothing stored in the deleted chat");

    // Deleted again through the API: the store tells the truth.
    c.chats().delete_chat(authed(&alice, delete())).await.unwrap();
    let refused = try_send(c, &bob, &chat, "anyone?").await.unwrap_err();
    assert_eq!((refused.code(), refused.message()), (Code::NotFound, "chat not found"));
    let again = c.chats().delete_chat(authed(&alice, delete())).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "deleted already");
    assert_eq!(c.count_in_store("messages", &stored).await, 0);
}

/// A group of alice (owner), bob and carol (the users, then the chat's
/// id), with a message of each of bob and alice (in that order).
async fn group_with_bob(c: &Cluster) -> (TestUser, TestUser, TestUser, String, [mpb::Message; 2]) {
    let (alice, bob, carol) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
    let chat = c.chats().create_chat(authed(&alice, group_of("Team", &[&bob, &carol]))).await.unwrap();
    let chat = chat.into_inner().chat.unwrap().id;
    let sent = [send(c, &bob, &chat, "hello all").await, send(c, &alice, &chat, "hi bob").await];
    (alice, bob, carol, chat, sent)
}

/// Removes `user` from `chat` through the API (by `owner`), then puts them
/// back behind the services' backs as `role`, as of before: what a check
/// taken before the removal answered.
async fn remove_then_undo(c: &Cluster, owner: &TestUser, chat: &str, user: &TestUser, role: &str) {
    remove_again(c, owner, chat, user).await;
    c.undo_departure_silently_as(chat, &user.id, role).await;
}

/// The refusal of an edit, a reaction or a pin whose checks, first and
/// afresh, both came before a departure the messages service recorded.
fn assert_members_changed(refused: &tonic::Status) {
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert_eq!(refused.message(), "the chat's members or their roles changed while the change was on its way: retry");
}

/// An edit whose membership check (a member) came before RemoveMember and
/// whose write comes after it answered is refused in the write: the
/// removed author's text is not changed after their removal. Made as in
/// `a_send_checked_before_a_removal_is_refused_where_it_is_written` (the
/// check kept saying "member, as of before", also afresh: ABORTED); once
/// the store tells the truth, the removed author is told what any
/// non-member is.
async fn an_edit_checked_before_a_removal_is_refused_where_it_is_written(c: &Cluster) {
    let (alice, bob, _, chat, [hello, _]) = group_with_bob(c).await;
    remove_then_undo(c, &alice, &chat, &bob, "member").await;
    let edit = || mpb::EditMessageRequest { message_id: hello.id.clone(), text: "edited after my removal".into() };
    let refused = c.messages().edit_message(authed(&bob, edit())).await.unwrap_err();
    assert_members_changed(&refused);
    let get = mpb::GetMessageRequest { message_id: hello.id.clone() };
    let stored = c.messages().get_message(authed(&alice, get)).await.unwrap().into_inner().message.unwrap();
    assert_eq!((stored.text.as_str(), stored.revision), ("hello all", 1), "the text as it was");

    remove_again(c, &alice, &chat, &bob).await;
    let refused = c.messages().edit_message(authed(&bob, edit())).await.unwrap_err();
    assert_eq!((refused.code(), refused.message()), (Code::PermissionDenied, "not a member of this chat"));
}

/// A reaction added (or taken back) by a member whose check came before
/// RemoveMember and whose write comes after it answered is refused in the
/// write, as an edit is.
async fn a_reaction_checked_before_a_removal_is_refused_where_it_is_written(c: &Cluster) {
    let (alice, bob, _, chat, [_, hi]) = group_with_bob(c).await;
    let react = |emoji: &str| mpb::AddReactionRequest { message_id: hi.id.clone(), emoji: emoji.into() };
    c.messages().add_reaction(authed(&bob, react("👍"))).await.unwrap();
    remove_then_undo(c, &alice, &chat, &bob, "member").await;
    let refused = c.messages().add_reaction(authed(&bob, react("🎉"))).await.unwrap_err();
    assert_members_changed(&refused);
    let take_back = mpb::RemoveReactionRequest { message_id: hi.id.clone(), emoji: "👍".into() };
    let refused = c.messages().remove_reaction(authed(&bob, take_back)).await.unwrap_err();
    assert_members_changed(&refused);
    let get = mpb::GetMessageRequest { message_id: hi.id.clone() };
    let stored = c.messages().get_message(authed(&alice, get)).await.unwrap().into_inner().message.unwrap();
    let emoji: Vec<_> = stored.reactions.iter().map(|r| (r.emoji.as_str(), r.count)).collect();
    assert_eq!(emoji, [("👍", 1)], "neither added nor taken back");

    remove_again(c, &alice, &chat, &bob).await;
    let refused = c.messages().add_reaction(authed(&bob, react("🎉"))).await.unwrap_err();
    assert_eq!((refused.code(), refused.message()), (Code::PermissionDenied, "not a member of this chat"));
}

/// A pin (or an unpin) by an admin whose check came before RemoveMember
/// and whose write comes after it answered is refused in the write, as an
/// edit is.
async fn a_pin_checked_before_a_removal_is_refused_where_it_is_written(c: &Cluster) {
    let (alice, bob, _, chat, [hello, hi]) = group_with_bob(c).await;
    let admin = cpb::UpdateMemberRequest {
        chat_id: chat.clone(),
        user_id: bob.id.clone(),
        role: cpb::MemberRole::Admin as i32,
    };
    c.chats().update_member(authed(&alice, admin)).await.unwrap();
    c.messages().pin_message(authed(&bob, mpb::PinMessageRequest { message_id: hi.id.clone() })).await.unwrap();
    remove_then_undo(c, &alice, &chat, &bob, "admin").await;
    let pin = mpb::PinMessageRequest { message_id: hello.id.clone() };
    assert_members_changed(&c.messages().pin_message(authed(&bob, pin)).await.unwrap_err());
    let unpin = mpb::UnpinMessageRequest { message_id: hi.id.clone() };
    assert_members_changed(&c.messages().unpin_message(authed(&bob, unpin)).await.unwrap_err());
    let pinned = mpb::ListMessagesRequest { chat_id: chat.clone(), pinned: true, ..Default::default() };
    let pinned = c.messages().list_messages(authed(&alice, pinned)).await.unwrap().into_inner().messages;
    assert_eq!(pinned.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), [hi.id.as_str()], "as it was");

    remove_again(c, &alice, &chat, &bob).await;
    let pin = mpb::PinMessageRequest { message_id: hello.id.clone() };
    let refused = c.messages().pin_message(authed(&bob, pin)).await.unwrap_err();
    assert_eq!((refused.code(), refused.message()), (Code::PermissionDenied, "not a member of this chat"));
}

/// Sets `user`'s role in `chat` through the API (by its owner `owner`).
async fn set_role(c: &Cluster, owner: &TestUser, chat: &str, user: &TestUser, role: cpb::MemberRole) {
    let request = cpb::UpdateMemberRequest { chat_id: chat.to_owned(), user_id: user.id.clone(), role: role as i32 };
    c.chats().update_member(authed(owner, request)).await.unwrap();
}

/// Whether message `id` is deleted, as `viewer` (a member) gets it.
async fn is_deleted(c: &Cluster, viewer: &TestUser, id: &str) -> bool {
    let get = mpb::GetMessageRequest { message_id: id.to_owned() };
    c.messages().get_message(authed(viewer, get)).await.unwrap().into_inner().message.unwrap().deleted
}

/// A pin, an unpin or a moderation deletion (of another member's message)
/// by an admin whose check came before an UpdateMember that demoted them,
/// and whose write comes after it answered, is refused in the write: the
/// demotion raises the chat's members version, as a removal does, and
/// answers once the messages service has it. Made as
/// `a_pin_checked_before_a_removal_is_refused_where_it_is_written` is (the
/// check kept saying "admin, as of before", also afresh: ABORTED); once
/// the store tells the truth, the demoted member is told what any plain
/// member is.
async fn a_pin_or_a_moderation_checked_before_a_demotion_is_refused_where_it_is_written(c: &Cluster) {
    let (alice, bob, carol, chat, [hello, hi]) = group_with_bob(c).await;
    let spam = send(c, &carol, &chat, "spam").await;
    set_role(c, &alice, &chat, &bob, cpb::MemberRole::Admin).await;
    c.messages().pin_message(authed(&bob, mpb::PinMessageRequest { message_id: hi.id.clone() })).await.unwrap();

    set_role(c, &alice, &chat, &bob, cpb::MemberRole::Member).await;
    c.undo_demotion_silently(&chat, &bob.id, "admin").await;
    let pin = || mpb::PinMessageRequest { message_id: hello.id.clone() };
    assert_members_changed(&c.messages().pin_message(authed(&bob, pin())).await.unwrap_err());
    let unpin = mpb::UnpinMessageRequest { message_id: hi.id.clone() };
    assert_members_changed(&c.messages().unpin_message(authed(&bob, unpin)).await.unwrap_err());
    let delete = || mpb::DeleteMessageRequest { message_id: spam.id.clone() };
    assert_members_changed(&c.messages().delete_message(authed(&bob, delete())).await.unwrap_err());
    let pinned = mpb::ListMessagesRequest { chat_id: chat.clone(), pinned: true, ..Default::default() };
    let pinned = c.messages().list_messages(authed(&alice, pinned)).await.unwrap().into_inner().messages;
    assert_eq!(pinned.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), [hi.id.as_str()], "as it was");
    assert!(!is_deleted(c, &alice, &spam.id).await, "carol's message stays");

    // Demoted again through the API: the store tells the truth.
    set_role(c, &alice, &chat, &bob, cpb::MemberRole::Member).await;
    let refused = c.messages().pin_message(authed(&bob, pin())).await.unwrap_err();
    let only_managers = "only the chat's owner and admins may pin or unpin its messages";
    assert_eq!((refused.code(), refused.message()), (Code::PermissionDenied, only_managers));
    let refused = c.messages().delete_message(authed(&bob, delete())).await.unwrap_err();
    let only_moderators = "only the author, the owner or an admin may delete a message";
    assert_eq!((refused.code(), refused.message()), (Code::PermissionDenied, only_moderators));
}

/// A deletion of one's own message, a MarkRead and a report by a member
/// whose check came before RemoveMember and whose write comes after it
/// answered are refused in the write, as an edit is: nothing of the
/// removed member is written after the removal answered. Made as
/// `an_edit_checked_before_a_removal_is_refused_where_it_is_written`.
async fn a_deletion_read_marker_or_report_checked_before_a_removal_is_refused_where_it_is_written(c: &Cluster) {
    let (alice, bob, _, chat, [hello, hi]) = group_with_bob(c).await;
    remove_then_undo(c, &alice, &chat, &bob, "member").await;
    let delete = || mpb::DeleteMessageRequest { message_id: hello.id.clone() };
    assert_members_changed(&c.messages().delete_message(authed(&bob, delete())).await.unwrap_err());
    let mark = || mpb::MarkReadRequest { chat_id: chat.clone(), seq: hi.seq };
    assert_members_changed(&c.messages().mark_read(authed(&bob, mark())).await.unwrap_err());
    let report = || mpb::ReportMessageRequest {
        message_id: hi.id.clone(),
        reason: mpb::ReportReason::Abuse as i32,
        comment: String::new(),
    };
    assert_members_changed(&c.messages().report_message(authed(&bob, report())).await.unwrap_err());
    assert!(!is_deleted(c, &alice, &hello.id).await, "bob's message stays");
    let read = format!("SELECT COUNT(*) FROM read_positions WHERE user_id = '{}' AND read_seq >= {}", bob.id, hi.seq);
    assert_eq!(c.count_in_store("messages", &read).await, 0, "bob's read position did not move");
    assert_eq!(c.count_in_store("messages", "SELECT COUNT(*) FROM message_reports").await, 0, "no report");

    remove_again(c, &alice, &chat, &bob).await;
    let not_a_member = (Code::PermissionDenied, "not a member of this chat");
    let refused = c.messages().delete_message(authed(&bob, delete())).await.unwrap_err();
    assert_eq!((refused.code(), refused.message()), not_a_member);
    let refused = c.messages().mark_read(authed(&bob, mark())).await.unwrap_err();
    assert_eq!((refused.code(), refused.message()), not_a_member);
    let refused = c.messages().report_message(authed(&bob, report())).await.unwrap_err();
    assert_eq!((refused.code(), refused.message()), not_a_member);
}

/// An edit, a reaction added or a pin whose check (open) came before
/// BlockUser and whose write comes after it answered is refused in the
/// write, from either side, as one checked after the block is: the
/// messages service has the direct chat closed before BlockUser answers,
/// and those writes read it where they take their change number. Made as
/// `a_send_checked_before_a_block_is_refused_where_it_is_written`. Taking
/// a reaction or a pin back, and deleting one's own message, stay open.
async fn an_edit_reaction_or_pin_checked_before_a_block_is_refused_where_it_is_written(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &bob, &alice).await;
    let hello = send(c, &bob, &chat.id, "hello alice").await;
    let hi = send(c, &alice, &chat.id, "hi bob").await;
    let thumbs = mpb::AddReactionRequest { message_id: hi.id.clone(), emoji: "👍".into() };
    c.messages().add_reaction(authed(&bob, thumbs)).await.unwrap();
    c.messages().pin_message(authed(&alice, mpb::PinMessageRequest { message_id: hello.id.clone() })).await.unwrap();

    block(c, &alice, &bob).await.unwrap();
    c.unblock_silently(&alice.id, &bob.id).await;
    let assert_blocked = |refused: tonic::Status| {
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert_eq!(refused.message(), "this direct chat takes no new messages: one of you blocked the other");
    };
    for (who, message) in [(&bob, &hello), (&alice, &hi)] {
        let edit = mpb::EditMessageRequest { message_id: message.id.clone(), text: "edited after the block".into() };
        assert_blocked(c.messages().edit_message(authed(who, edit)).await.unwrap_err());
    }
    let party = mpb::AddReactionRequest { message_id: hi.id.clone(), emoji: "🎉".into() };
    assert_blocked(c.messages().add_reaction(authed(&bob, party)).await.unwrap_err());
    let pin = mpb::PinMessageRequest { message_id: hi.id.clone() };
    assert_blocked(c.messages().pin_message(authed(&bob, pin)).await.unwrap_err());
    let listed = mpb::ListMessagesRequest { chat_id: chat.id.clone(), ..Default::default() };
    let listed = c.messages().list_messages(authed(&alice, listed)).await.unwrap().into_inner().messages;
    let texts: Vec<_> = listed.iter().map(|m| (m.text.as_str(), m.revision, m.pin_time.is_some())).collect();
    assert_eq!(texts, [("hi bob", 1, false), ("hello alice", 1, true)], "neither edited nor pinned");
    let emoji: Vec<_> = listed[0].reactions.iter().map(|r| (r.emoji.as_str(), r.count)).collect();
    assert_eq!(emoji, [("👍", 1)], "no reaction added");

    let take_back = mpb::RemoveReactionRequest { message_id: hi.id.clone(), emoji: "👍".into() };
    c.messages().remove_reaction(authed(&bob, take_back)).await.expect("a reaction taken back");
    let unpin = mpb::UnpinMessageRequest { message_id: hello.id.clone() };
    c.messages().unpin_message(authed(&alice, unpin)).await.expect("a pin taken back");
    let delete = mpb::DeleteMessageRequest { message_id: hi.id.clone() };
    c.messages().delete_message(authed(&alice, delete)).await.expect("the blocker deletes their own message");
}

/// Removes `user` from `chat` through the API (by `owner`); after
/// [`remove_then_undo`], the store tells the truth again.
/// ArchiveChat (`archive`) or UnarchiveChat of `chat` by `user`.
async fn set_archived(c: &Cluster, user: &TestUser, chat: &str, archive: bool) {
    if archive {
        c.chats().archive_chat(authed(user, cpb::ArchiveChatRequest { chat_id: chat.to_owned() })).await.unwrap();
    } else {
        c.chats().unarchive_chat(authed(user, cpb::UnarchiveChatRequest { chat_id: chat.to_owned() })).await.unwrap();
    }
}

/// A send, an edit, a reaction added or a pin whose membership check (not
/// archived) came before ArchiveChat and whose write comes after it
/// answered is refused in the write, as one checked after the archive is:
/// the messages service has the chat archived before ArchiveChat answers,
/// and those writes read it where they take their seq or change number.
/// The check is made to answer "not archived" by taking the archive back
/// behind the services' backs (what a check taken before the archive
/// answered). A reaction taken back goes through (it adds nothing), and so
/// does a deletion (open in an archived chat). Unarchived through the API,
/// the chat takes messages again.
async fn a_send_edit_reaction_or_pin_checked_before_an_archive_is_refused_where_it_is_written(c: &Cluster) {
    let (alice, bob, _, chat, [hello, hi]) = group_with_bob(c).await;
    let thumbs = || mpb::AddReactionRequest { message_id: hi.id.clone(), emoji: "👍".into() };
    c.messages().add_reaction(authed(&bob, thumbs())).await.unwrap();

    set_archived(c, &alice, &chat, true).await;
    c.unarchive_silently(&chat).await;
    let assert_archived = |refused: tonic::Status| {
        assert_eq!((refused.code(), refused.message()), (Code::FailedPrecondition, "chat is archived"), "{refused:?}");
    };
    assert_archived(try_send(c, &bob, &chat, "anyone?").await.unwrap_err());
    let edit = mpb::EditMessageRequest { message_id: hello.id.clone(), text: "edited after the archive".into() };
    assert_archived(c.messages().edit_message(authed(&bob, edit)).await.unwrap_err());
    let party = mpb::AddReactionRequest { message_id: hi.id.clone(), emoji: "🎉".into() };
    assert_archived(c.messages().add_reaction(authed(&bob, party)).await.unwrap_err());
    let pin = mpb::PinMessageRequest { message_id: hi.id.clone() };
    assert_archived(c.messages().pin_message(authed(&alice, pin)).await.unwrap_err());
    let take_back = mpb::RemoveReactionRequest { message_id: hi.id.clone(), emoji: "👍".into() };
    c.messages().remove_reaction(authed(&bob, take_back)).await.expect("a reaction taken back");
    let listed = mpb::ListMessagesRequest { chat_id: chat.clone(), ..Default::default() };
    let listed = c.messages().list_messages(authed(&alice, listed)).await.unwrap().into_inner().messages;
    let texts: Vec<_> = listed.iter().map(|m| (m.text.as_str(), m.revision, m.pin_time.is_some())).collect();
    assert_eq!(texts, [("hi bob", 1, false), ("hello all", 1, false)], "nothing stored, edited or pinned");
    assert!(listed[0].reactions.is_empty(), "no reaction added");

    // Archived again and unarchived through the API: open again.
    set_archived(c, &alice, &chat, true).await;
    set_archived(c, &alice, &chat, false).await;
    assert_eq!(send(c, &bob, &chat, "back again").await.seq, 3, "no seq taken by the refused send");
}

/// A ResolveReport by an admin whose check came before an UpdateMember
/// that demoted them, and whose write comes after it answered, is refused
/// in the write: the report stays open. Made as
/// `a_pin_or_a_moderation_checked_before_a_demotion_is_refused_where_it_is_written`
/// (the check kept saying "admin, as of before", also afresh: ABORTED);
/// once the store tells the truth, the demoted member is told what any
/// plain member is, and the owner resolves the report still open.
async fn a_resolve_checked_before_a_demotion_is_refused_where_it_is_written(c: &Cluster) {
    let (alice, bob, carol, chat, _) = group_with_bob(c).await;
    let spam = send(c, &carol, &chat, "spam").await;
    let report = mpb::ReportMessageRequest {
        message_id: spam.id.clone(),
        reason: mpb::ReportReason::Spam as i32,
        comment: String::new(),
    };
    c.messages().report_message(authed(&alice, report)).await.unwrap();
    set_role(c, &alice, &chat, &bob, cpb::MemberRole::Admin).await;

    set_role(c, &alice, &chat, &bob, cpb::MemberRole::Member).await;
    c.undo_demotion_silently(&chat, &bob.id, "admin").await;
    let resolve = || mpb::ResolveReportRequest { message_id: spam.id.clone() };
    assert_members_changed(&c.messages().resolve_report(authed(&bob, resolve())).await.unwrap_err());
    let open = "SELECT COUNT(*) FROM message_reports WHERE resolve_time IS NULL";
    assert_eq!(c.count_in_store("messages", open).await, 1, "the report stays open");

    // Demoted again through the API: the store tells the truth.
    set_role(c, &alice, &chat, &bob, cpb::MemberRole::Member).await;
    let refused = c.messages().resolve_report(authed(&bob, resolve())).await.unwrap_err();
    let only_moderators = "only the chat's owner, an admin or staff may resolve reports";
    assert_eq!((refused.code(), refused.message()), (Code::PermissionDenied, only_moderators));
    let resolved = c.messages().resolve_report(authed(&alice, resolve())).await.unwrap().into_inner();
    assert_eq!(resolved.resolved, 1, "still open for the owner");
}

async fn remove_again(c: &Cluster, owner: &TestUser, chat: &str, user: &TestUser) {
    let remove = cpb::RemoveMemberRequest { chat_id: chat.to_owned(), user_id: user.id.clone() };
    c.chats().remove_member(authed(owner, remove)).await.unwrap();
}

async fn set_group_adds(c: &Cluster, user: &TestUser, adds: cpb::GroupAdds) -> cpb::PrivacySettings {
    let request = cpb::UpdatePrivacySettingsRequest {
        settings: Some(cpb::PrivacySettings { group_adds: adds as i32, ..Default::default() }),
        update_mask: Some(natter_proto::FieldMask { paths: vec!["group_adds".into()] }),
    };
    c.chats().update_privacy_settings(authed(user, request)).await.unwrap().into_inner().settings.unwrap()
}

fn group_of(title: &str, members: &[&TestUser]) -> cpb::CreateChatRequest {
    cpb::CreateChatRequest {
        title: title.into(),
        member_ids: members.iter().map(|m| m.id.clone()).collect(),
        ..Default::default()
    }
}

async fn member_ids(c: &Cluster, user: &TestUser, chat_id: &str) -> Vec<String> {
    let request = cpb::ListMembersRequest { chat_id: chat_id.into(), ..Default::default() };
    let members = c.chats().list_members(authed(user, request)).await.unwrap().into_inner().members;
    members.into_iter().map(|m| m.user_id).collect()
}

async fn chat_count(c: &Cluster, user: &TestUser) -> usize {
    c.chats().list_chats(authed(user, cpb::ListChatsRequest::default())).await.unwrap().into_inner().chats.len()
}

/// A user's privacy setting group_adds says who may put them in a group:
/// EVERYONE (the default), PEERS (who shares a chat with them) or NOBODY.
/// A refused add names the user and writes nothing; joining a public chat
/// oneself, a direct chat and a retried add of a member are not adds it
/// governs.
async fn who_may_add_a_user_to_a_group_is_theirs_to_say(c: &Cluster) {
    let (alice, bob, carol, dave) =
        (c.user("alice").await, c.user("bob").await, c.user("carol").await, c.user("dave").await);
    let get = |u: &TestUser| {
        let (mut chats, request) = (c.chats(), authed(u, cpb::GetPrivacySettingsRequest {}));
        async move { chats.get_privacy_settings(request).await }
    };
    let defaults = get(&bob).await.unwrap().into_inner().settings.unwrap();
    assert_eq!((defaults.group_adds, defaults.update_time), (cpb::GroupAdds::Everyone as i32, None));

    let peers = set_group_adds(c, &bob, cpb::GroupAdds::Peers).await;
    assert_eq!(peers.group_adds, cpb::GroupAdds::Peers as i32);
    assert!(peers.update_time.is_some());
    assert_eq!(get(&bob).await.unwrap().into_inner().settings.unwrap(), peers);
    assert_eq!(get(&carol).await.unwrap().into_inner().settings.unwrap(), defaults, "each user's own");

    // Alice shares no chat with bob: no group of hers takes him, and a
    // refused CreateChat creates nothing, carol's membership neither.
    let refused = c.chats().create_chat(authed(&alice, group_of("trip", &[&carol, &bob]))).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains(&bob.id) && refused.message().contains("group_adds"), "{refused:?}");
    assert_eq!((chat_count(c, &alice).await, chat_count(c, &carol).await), (0, 0));
    let group =
        c.chats().create_chat(authed(&alice, group_of("trip", &[&carol]))).await.unwrap().into_inner().chat.unwrap();
    let add = |who: &TestUser, users: &[&TestUser]| {
        let request = cpb::AddMembersRequest {
            chat_id: group.id.clone(),
            user_ids: users.iter().map(|u| u.id.clone()).collect(),
        };
        let (mut chats, request) = (c.chats(), authed(who, request));
        async move { chats.add_members(request).await }
    };
    let refused = add(&alice, &[&dave, &bob]).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains(&bob.id), "{refused:?}");
    assert_eq!(member_ids(c, &alice, &group.id).await, [alice.id.clone(), carol.id.clone()], "dave neither");

    // A direct chat is no group add; once they share it, alice may.
    direct(c, &bob, &alice).await;
    let added = add(&alice, &[&bob]).await.unwrap().into_inner().members;
    assert_eq!(added.iter().map(|m| m.user_id.as_str()).collect::<Vec<_>>(), [bob.id.as_str()]);

    // NOBODY refuses peers too; a retried add of a member is no new add.
    set_group_adds(c, &bob, cpb::GroupAdds::Nobody).await;
    assert!(add(&alice, &[&bob]).await.unwrap().into_inner().members.is_empty(), "a member already");
    set_group_adds(c, &dave, cpb::GroupAdds::Nobody).await;
    direct(c, &carol, &dave).await;
    let refused = c.chats().create_chat(authed(&carol, group_of("peers", &[&dave]))).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // ... but dave joins a public chat himself.
    let mut public = group_of("open", &[]);
    public.visibility = cpb::Visibility::Public as i32;
    let public = c.chats().create_chat(authed(&alice, public)).await.unwrap().into_inner().chat.unwrap();
    let join = cpb::AddMembersRequest { chat_id: public.id.clone(), user_ids: vec![dave.id.clone()] };
    assert_eq!(c.chats().add_members(authed(&dave, join)).await.unwrap().into_inner().members.len(), 1);
    // Back to EVERYONE: anyone may again.
    set_group_adds(c, &dave, cpb::GroupAdds::Everyone).await;
    assert_eq!(add(&alice, &[&dave]).await.unwrap().into_inner().members.len(), 1);

    // Bad input names its field and changes nothing.
    let update = |settings: Option<cpb::PrivacySettings>, paths: &[&str]| {
        let request = cpb::UpdatePrivacySettingsRequest {
            settings,
            update_mask: Some(natter_proto::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() }),
        };
        let (mut chats, request) = (c.chats(), authed(&bob, request));
        async move { chats.update_privacy_settings(request).await }
    };
    let valid = Some(cpb::PrivacySettings { group_adds: cpb::GroupAdds::Everyone as i32, ..Default::default() });
    assert_eq!(violated_fields(&update(valid, &[]).await.unwrap_err()), ["update_mask"]);
    assert_eq!(violated_fields(&update(valid, &["title"]).await.unwrap_err()), ["update_mask.paths[0]"]);
    assert_eq!(violated_fields(&update(None, &["group_adds"]).await.unwrap_err()), ["settings.group_adds"]);
    let unknown = Some(cpb::PrivacySettings { group_adds: 99, ..Default::default() });
    assert_eq!(violated_fields(&update(unknown, &["group_adds"]).await.unwrap_err()), ["settings.group_adds"]);
    assert_eq!(get(&bob).await.unwrap().into_inner().settings.unwrap().group_adds, cpb::GroupAdds::Nobody as i32);
}

/// `--default-group-adds peers` and `--default-direct-chats peers`: a user
/// who set nothing may be put in a group, or sent a first direct message,
/// only by someone they share a chat with, until they say otherwise.
mod default_peers {
    use super::*;

    crate::both_modes!(
        flags = natter_testkit::Flags {
            chats: &["--default-group-adds", "peers", "--default-direct-chats", "peers"],
            ..natter_testkit::Flags::NONE
        };
        a_deployment_may_make_peers_the_default,
        a_deployment_may_make_peers_the_default_for_direct_chats
    );

    async fn a_deployment_may_make_peers_the_default_for_direct_chats(c: &Cluster) {
        let (alice, bob, carol) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
        let request = authed(&bob, cpb::GetPrivacySettingsRequest {});
        let defaults = c.chats().get_privacy_settings(request).await.unwrap().into_inner().settings.unwrap();
        assert_eq!(defaults.direct_chats, cpb::DirectChats::Peers as i32);
        let refused = c.chats().create_chat(authed(&alice, direct_request(&bob))).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        // A chat shared (a group carol made with both) makes them peers.
        set_group_adds(c, &alice, cpb::GroupAdds::Everyone).await;
        set_group_adds(c, &bob, cpb::GroupAdds::Everyone).await;
        c.chats().create_chat(authed(&carol, group_of("both", &[&alice, &bob]))).await.unwrap();
        direct(c, &alice, &bob).await;
    }

    async fn a_deployment_may_make_peers_the_default(c: &Cluster) {
        let (alice, bob) = (c.user("alice").await, c.user("bob").await);
        let request = authed(&bob, cpb::GetPrivacySettingsRequest {});
        let defaults = c.chats().get_privacy_settings(request).await.unwrap().into_inner().settings.unwrap();
        assert_eq!((defaults.group_adds, defaults.update_time), (cpb::GroupAdds::Peers as i32, None));
        let refused = c.chats().create_chat(authed(&alice, group_of("strangers", &[&bob]))).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains(&bob.id), "{refused:?}");
        set_group_adds(c, &bob, cpb::GroupAdds::Everyone).await;
        c.chats().create_chat(authed(&alice, group_of("welcome", &[&bob]))).await.unwrap();
    }
}

/// `--max-groups-per-user 2`: CreateChat and AddMembers that would put a
/// user in a third group fail RESOURCE_EXHAUSTED naming them, and write
/// nothing; direct chats are not counted; leaving a group makes room.
/// `--max-blocks-per-user 1`: a second block is refused likewise.
mod group_limit {
    use super::*;

    crate::both_modes!(
        flags = natter_testkit::Flags {
            chats: &["--max-groups-per-user", "2", "--max-blocks-per-user", "1"],
            ..natter_testkit::Flags::NONE
        };
        no_one_is_put_in_more_groups_than_the_limit,
        no_one_blocks_more_users_than_the_limit
    );

    async fn no_one_blocks_more_users_than_the_limit(c: &Cluster) {
        let (alice, bob, carol) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
        block(c, &alice, &bob).await.unwrap();
        block(c, &alice, &bob).await.unwrap();
        let full = block(c, &alice, &carol).await.unwrap_err();
        assert_eq!(quota_subject(&full), format!("user:{}", alice.id));
        let listed = blocked_ids(c, &alice).await;
        assert_eq!(listed, std::slice::from_ref(&bob.id), "carol was not blocked");
        c.chats().unblock_user(authed(&alice, cpb::UnblockUserRequest { user_id: bob.id.clone() })).await.unwrap();
        block(c, &alice, &carol).await.unwrap();
    }

    async fn no_one_is_put_in_more_groups_than_the_limit(c: &Cluster) {
        let (alice, bob, carol, dave) =
            (c.user("alice").await, c.user("bob").await, c.user("carol").await, c.user("dave").await);
        let alice_full = format!("user:{}", alice.id);
        let trip = c.chats().create_chat(authed(&alice, group_of("trip", &[&bob]))).await.unwrap().into_inner();
        let trip = trip.chat.unwrap();
        c.chats().create_chat(authed(&alice, group_of("work", &[]))).await.unwrap();

        // Alice is in two groups: she can open no third one herself...
        let full = c.chats().create_chat(authed(&alice, group_of("third", &[&dave]))).await.unwrap_err();
        assert_eq!(quota_subject(&full), alice_full);
        assert!(full.message().starts_with("you are in 2 groups"), "{full:?}");
        // ...nor be put in one by others, who are told who is full.
        let refused = c.chats().create_chat(authed(&bob, group_of("with alice", &[&carol, &alice]))).await;
        let refused = refused.unwrap_err();
        assert_eq!(quota_subject(&refused), alice_full);
        assert!(refused.message().contains(&alice.id), "{refused:?}");
        let public = cpb::CreateChatRequest { visibility: cpb::Visibility::Public as i32, ..group_of("open", &[]) };
        let public = c.chats().create_chat(authed(&dave, public)).await.unwrap().into_inner().chat.unwrap();
        let join = cpb::AddMembersRequest { chat_id: public.id.clone(), user_ids: vec![alice.id.clone()] };
        assert_eq!(quota_subject(&c.chats().add_members(authed(&alice, join.clone())).await.unwrap_err()), alice_full);
        let add =
            cpb::AddMembersRequest { chat_id: public.id.clone(), user_ids: vec![carol.id.clone(), alice.id.clone()] };
        assert_eq!(quota_subject(&c.chats().add_members(authed(&dave, add)).await.unwrap_err()), alice_full);
        // Nothing was written: no group for bob or carol, carol stays out of
        // dave's.
        assert_eq!(chat_count(c, &alice).await, 2);
        assert_eq!(chat_count(c, &bob).await, 1);
        assert_eq!(chat_count(c, &carol).await, 0);
        assert_eq!(member_ids(c, &dave, &public.id).await, std::slice::from_ref(&dave.id));

        // Direct chats are not groups; what she is in already is no add.
        direct(c, &alice, &carol).await;
        direct(c, &dave, &alice).await;
        let again =
            cpb::AddMembersRequest { chat_id: trip.id.clone(), user_ids: vec![bob.id.clone(), alice.id.clone()] };
        c.chats().add_members(authed(&alice, again)).await.unwrap();
        send(c, &alice, &trip.id, "still here").await;

        // Leaving a group makes room for one.
        let leave = cpb::RemoveMemberRequest { chat_id: trip.id.clone(), user_id: bob.id.clone() };
        c.chats().remove_member(authed(&bob, leave)).await.unwrap();
        let add = cpb::AddMembersRequest { chat_id: public.id.clone(), user_ids: vec![bob.id.clone()] };
        c.chats().add_members(authed(&dave, add)).await.unwrap();
        c.chats().delete_chat(authed(&alice, cpb::DeleteChatRequest { chat_id: trip.id.clone() })).await.unwrap();
        c.chats().add_members(authed(&alice, join)).await.unwrap();
        assert_eq!(member_ids(c, &dave, &public.id).await.len(), 3, "dave, bob and alice");
    }
}

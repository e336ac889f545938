//! Chat management: update masks, archive, delete, members and roles,
//! public chats, edits, deletes and revisions.

use natter_proto::FieldMask;
use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_testkit::{Cluster, TestUser, authed};
use tonic::Code;

use crate::chats::{direct, send};
use crate::{code, violated_fields};

crate::both_modes!(
    update_chat_follows_the_mask,
    archived_chats_refuse_sends_and_filter,
    delete_chat_removes_everything,
    members_join_leave_and_change_roles,
    public_chats_are_found_and_joined,
    list_chats_filters_combine,
    edits_keep_every_revision,
    deletes_leave_tombstones,
    direct_chat_members_are_equals,
    a_removed_creator_replaying_create_chat_learns_nothing,
);

async fn group(c: &Cluster, owner: &TestUser, title: &str, members: &[&TestUser]) -> cpb::Chat {
    let request = cpb::CreateChatRequest {
        title: title.into(),
        member_ids: members.iter().map(|u| u.id.clone()).collect(),
        kind: cpb::ChatKind::Group as i32,
        ..Default::default()
    };
    c.chats().create_chat(authed(owner, request)).await.unwrap().into_inner().chat.unwrap()
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() })
}

async fn update_chat_follows_the_mask(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = group(c, &alice, "Old", &[&bob]).await;
    let new = cpb::Chat { title: "New".into(), description: "ignored".into(), ..Default::default() };
    let request =
        cpb::UpdateChatRequest { chat_id: chat.id.clone(), chat: Some(new.clone()), update_mask: mask(&["title"]) };
    let updated = c.chats().update_chat(authed(&alice, request)).await.unwrap().into_inner().chat.unwrap();
    assert_eq!(updated.title, "New");
    assert_eq!(updated.description, "", "not in the mask, not changed");
    let micros = |t: Option<natter_proto::Timestamp>| t.map(|t| (t.seconds, t.nanos)).unwrap();
    assert!(micros(updated.update_time) > micros(chat.update_time));

    let public = cpb::Chat {
        visibility: cpb::Visibility::Public as i32,
        description: "all welcome".into(),
        ..Default::default()
    };
    let request = cpb::UpdateChatRequest {
        chat_id: chat.id.clone(),
        chat: Some(public),
        update_mask: mask(&["visibility", "description"]),
    };
    let updated = c.chats().update_chat(authed(&alice, request)).await.unwrap().into_inner().chat.unwrap();
    assert_eq!(
        (updated.visibility, updated.description.as_str(), updated.title.as_str()),
        (cpb::Visibility::Public as i32, "all welcome", "New")
    );

    for (paths, field) in [
        (&["title", "owner_id"][..], "update_mask.paths[1]"),
        (&["kind"][..], "update_mask.paths[0]"),
        (&[][..], "update_mask"),
    ] {
        let request =
            cpb::UpdateChatRequest { chat_id: chat.id.clone(), chat: Some(new.clone()), update_mask: mask(paths) };
        let status = c.chats().update_chat(authed(&alice, request)).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
    }
    let request =
        cpb::UpdateChatRequest { chat_id: chat.id.clone(), chat: Some(new.clone()), update_mask: mask(&["title"]) };
    assert_eq!(code(c.chats().update_chat(authed(&bob, request)).await), Code::PermissionDenied, "a plain member");
}

async fn archived_chats_refuse_sends_and_filter(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let archived = group(c, &alice, "Old news", &[&bob]).await;
    let active = group(c, &alice, "Current", &[&bob]).await;
    send(c, &bob, &archived.id, "last words").await;
    let done =
        c.chats().archive_chat(authed(&alice, cpb::ArchiveChatRequest { chat_id: archived.id.clone() })).await.unwrap();
    assert!(done.into_inner().chat.unwrap().archived);
    let post = mpb::SendMessageRequest { chat_id: archived.id.clone(), text: "hello?".into(), ..Default::default() };
    assert_eq!(code(c.messages().send_message(authed(&bob, post.clone())).await), Code::FailedPrecondition);
    // Still readable, and listed unless filtered out.
    let history = c
        .messages()
        .list_messages(authed(&bob, mpb::ListMessagesRequest { chat_id: archived.id.clone(), ..Default::default() }))
        .await
        .unwrap();
    assert_eq!(history.into_inner().messages.len(), 1);
    let ids = |archived: Option<bool>| {
        let bob = bob.clone();
        async move {
            let request = cpb::ListChatsRequest { archived, ..Default::default() };
            let chats = c.chats().list_chats(authed(&bob, request)).await.unwrap().into_inner().chats;
            chats.into_iter().map(|ch| ch.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(ids(None).await.len(), 2);
    assert_eq!(ids(Some(true)).await, [archived.id.as_str()]);
    assert_eq!(ids(Some(false)).await, [active.id.as_str()]);
    assert_eq!(
        code(c.chats().archive_chat(authed(&bob, cpb::ArchiveChatRequest { chat_id: active.id.clone() })).await),
        Code::PermissionDenied
    );
    c.chats().unarchive_chat(authed(&alice, cpb::UnarchiveChatRequest { chat_id: archived.id.clone() })).await.unwrap();
    c.messages().send_message(authed(&bob, post)).await.unwrap();
}

async fn delete_chat_removes_everything(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = group(c, &alice, "Doomed", &[&bob]).await;
    let message = send(c, &bob, &chat.id, "soon gone").await;
    let delete = cpb::DeleteChatRequest { chat_id: chat.id.clone() };
    assert_eq!(code(c.chats().delete_chat(authed(&bob, delete.clone())).await), Code::PermissionDenied, "owner only");
    c.chats().delete_chat(authed(&alice, delete.clone())).await.unwrap();
    let get = cpb::GetChatRequest { chat_id: chat.id.clone(), ..Default::default() };
    assert_eq!(code(c.chats().get_chat(authed(&alice, get)).await), Code::NotFound);
    let post = mpb::SendMessageRequest { chat_id: chat.id.clone(), text: "anyone?".into(), ..Default::default() };
    assert_eq!(code(c.messages().send_message(authed(&bob, post)).await), Code::NotFound);
    assert_eq!(
        code(c.messages().get_message(authed(&bob, mpb::GetMessageRequest { message_id: message.id })).await),
        Code::NotFound
    );
    assert!(
        c.chats()
            .list_chats(authed(&bob, cpb::ListChatsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .chats
            .is_empty()
    );
    assert_eq!(code(c.chats().delete_chat(authed(&alice, delete)).await), Code::NotFound);
}

async fn members_join_leave_and_change_roles(c: &Cluster) {
    let (alice, bob, carol, dave) =
        (c.user("alice").await, c.user("bob").await, c.user("carol").await, c.user("dave").await);
    let chat = group(c, &alice, "Team", &[&bob]).await;
    let add = cpb::AddMembersRequest { chat_id: chat.id.clone(), user_ids: vec![carol.id.clone(), bob.id.clone()] };
    let added = c.chats().add_members(authed(&alice, add)).await.unwrap().into_inner().members;
    assert_eq!(
        added.iter().map(|m| m.user_id.as_str()).collect::<Vec<_>>(),
        [carol.id.as_str()],
        "bob was a member already"
    );
    let add_dave = cpb::AddMembersRequest { chat_id: chat.id.clone(), user_ids: vec![dave.id.clone()] };
    assert_eq!(code(c.chats().add_members(authed(&bob, add_dave.clone())).await), Code::PermissionDenied);

    // Make bob an admin: he may add and remove plain members, not the owner.
    let promote = cpb::UpdateMemberRequest {
        chat_id: chat.id.clone(),
        user_id: bob.id.clone(),
        role: cpb::MemberRole::Admin as i32,
    };
    assert_eq!(
        c.chats().update_member(authed(&alice, promote)).await.unwrap().into_inner().member.unwrap().role,
        cpb::MemberRole::Admin as i32
    );
    c.chats().add_members(authed(&bob, add_dave)).await.unwrap();
    let remove = |user: &TestUser| cpb::RemoveMemberRequest { chat_id: chat.id.clone(), user_id: user.id.clone() };
    assert_eq!(code(c.chats().remove_member(authed(&bob, remove(&alice))).await), Code::PermissionDenied);
    c.chats().remove_member(authed(&bob, remove(&dave))).await.unwrap();
    assert_eq!(code(c.chats().remove_member(authed(&bob, remove(&dave))).await), Code::NotFound);

    let members = c
        .chats()
        .list_members(authed(&carol, cpb::ListMembersRequest { chat_id: chat.id.clone(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner()
        .members;
    let roles: Vec<_> = members.iter().map(|m| (m.user_id.clone(), m.role)).collect();
    assert_eq!(
        roles,
        [
            (alice.id.clone(), cpb::MemberRole::Owner as i32),
            (bob.id.clone(), cpb::MemberRole::Admin as i32),
            (carol.id.clone(), cpb::MemberRole::Member as i32)
        ]
    );

    // Carol leaves; the owner may not leave until she hands ownership over.
    c.chats().remove_member(authed(&carol, remove(&carol))).await.unwrap();
    c.chats().remove_member(authed(&carol, remove(&carol))).await.expect("a retried leave is done already");
    let get = cpb::GetChatRequest { chat_id: chat.id.clone(), ..Default::default() };
    assert_eq!(code(c.chats().get_chat(authed(&carol, get.clone())).await), Code::PermissionDenied);
    assert_eq!(code(c.chats().remove_member(authed(&alice, remove(&alice))).await), Code::FailedPrecondition);
    let hand_over = cpb::UpdateMemberRequest {
        chat_id: chat.id.clone(),
        user_id: bob.id.clone(),
        role: cpb::MemberRole::Owner as i32,
    };
    c.chats().update_member(authed(&alice, hand_over)).await.unwrap();
    c.chats().remove_member(authed(&alice, remove(&alice))).await.unwrap();
    let after = c.chats().get_chat(authed(&bob, get)).await.unwrap().into_inner().chat.unwrap();
    assert_eq!((after.owner_id.as_str(), after.member_count), (bob.id.as_str(), 1));

    // Direct chats never change members.
    let dm = direct(c, &alice, &carol).await;
    let add = cpb::AddMembersRequest { chat_id: dm.id.clone(), user_ids: vec![dave.id.clone()] };
    assert_eq!(code(c.chats().add_members(authed(&alice, add)).await), Code::FailedPrecondition);
}

async fn public_chats_are_found_and_joined(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let request = cpb::CreateChatRequest {
        title: format!("Rust fans {}", bob.username),
        visibility: cpb::Visibility::Public as i32,
        ..Default::default()
    };
    let public = c.chats().create_chat(authed(&alice, request)).await.unwrap().into_inner().chat.unwrap();
    group(c, &alice, "Private", &[]).await;
    let find = cpb::ListChatsRequest {
        availability: cpb::Availability::Public as i32,
        query: bob.username.to_uppercase(),
        ..Default::default()
    };
    let found = c.chats().list_chats(authed(&bob, find)).await.unwrap().into_inner().chats;
    assert_eq!(found.iter().map(|ch| ch.id.as_str()).collect::<Vec<_>>(), [public.id.as_str()]);
    // Readable before joining; joining is AddMembers with one's own id.
    c.chats()
        .get_chat(authed(&bob, cpb::GetChatRequest { chat_id: public.id.clone(), ..Default::default() }))
        .await
        .unwrap();
    let join = cpb::AddMembersRequest { chat_id: public.id.clone(), user_ids: vec![bob.id.clone()] };
    let joined = c.chats().add_members(authed(&bob, join.clone())).await.unwrap().into_inner();
    assert_eq!(joined.members.iter().map(|m| m.user_id.as_str()).collect::<Vec<_>>(), [bob.id.as_str()]);
    // Its answer lost, the join is sent again: OK, nobody added this time.
    let again = c.chats().add_members(authed(&bob, join)).await.expect("a retried join").into_inner();
    assert!(again.members.is_empty(), "already a member: {:?}", again.members);
    assert_eq!(send(c, &bob, &public.id, "hi all").await.seq, 1);
    let mine = c.chats().list_chats(authed(&bob, cpb::ListChatsRequest::default())).await.unwrap().into_inner().chats;
    assert_eq!(mine.len(), 1);
}

async fn list_chats_filters_combine(c: &Cluster) {
    let (alice, bob, carol) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
    let dm = direct(c, &alice, &bob).await;
    let hiking = group(c, &alice, "Hiking Club", &[&bob, &carol]).await;
    let cooking = group(c, &alice, "Cooking club", &[&carol]).await;
    let quiet = group(c, &alice, "Quiet club", &[]).await;
    send(c, &alice, &dm.id, "dm").await;
    let before_hiking = send(c, &alice, &cooking.id, "c").await.send_time;
    send(c, &bob, &hiking.id, "h").await;
    let list = |r: cpb::ListChatsRequest| {
        let alice = alice.clone();
        async move {
            c.chats()
                .list_chats(authed(&alice, r))
                .await
                .unwrap()
                .into_inner()
                .chats
                .into_iter()
                .map(|ch| ch.id)
                .collect::<Vec<_>>()
        }
    };
    let groups = cpb::ListChatsRequest { kind: cpb::ChatKind::Group as i32, ..Default::default() };
    assert_eq!(list(groups).await, [hiking.id.clone(), cooking.id.clone(), quiet.id.clone()]);
    let direct_only = cpb::ListChatsRequest { kind: cpb::ChatKind::Direct as i32, ..Default::default() };
    assert_eq!(list(direct_only).await, [dm.id.as_str()]);
    let club = cpb::ListChatsRequest {
        query: "CLUB".into(),
        kind: cpb::ChatKind::Group as i32,
        order: cpb::SortOrder::Asc as i32,
        ..Default::default()
    };
    assert_eq!(list(club).await, [quiet.id.clone(), cooking.id.clone(), hiking.id.clone()]);
    let after = cpb::ListChatsRequest { last_message_after: before_hiking, ..Default::default() };
    assert_eq!(list(after).await, [hiking.id.as_str()], "strictly after, chats without messages excluded");
    let before = cpb::ListChatsRequest { last_message_before: before_hiking, ..Default::default() };
    assert_eq!(list(before).await, [dm.id.as_str()]);
}

async fn edits_keep_every_revision(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &alice, &bob).await;
    let original = send(c, &alice, &chat.id, "helo").await;
    let edit = |text: &str| mpb::EditMessageRequest { message_id: original.id.clone(), text: text.into() };
    let first = c.messages().edit_message(authed(&alice, edit("hello"))).await.unwrap().into_inner().message.unwrap();
    assert_eq!((first.text.as_str(), first.revision, first.seq), ("hello", 2, original.seq));
    assert!(first.edit_time.is_some());
    c.messages().edit_message(authed(&alice, edit("hello!"))).await.unwrap();
    assert_eq!(code(c.messages().edit_message(authed(&bob, edit("hijack"))).await), Code::PermissionDenied);
    assert_eq!(violated_fields(&c.messages().edit_message(authed(&alice, edit(""))).await.unwrap_err()), ["text"]);

    let revisions = c
        .messages()
        .list_message_revisions(authed(
            &bob,
            mpb::ListMessageRevisionsRequest { message_id: original.id.clone(), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner()
        .revisions;
    let texts: Vec<_> = revisions.iter().map(|r| (r.revision, r.text.as_str())).collect();
    assert_eq!(texts, [(1, "helo"), (2, "hello"), (3, "hello!")]);
    let with_history =
        mpb::ListMessagesRequest { chat_id: chat.id.clone(), include_history: true, ..Default::default() };
    let listed = c.messages().list_messages(authed(&bob, with_history)).await.unwrap().into_inner().messages.remove(0);
    assert_eq!(listed.text, "hello!");
    assert_eq!(listed.history.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(), ["helo", "hello"]);
    let got = c
        .messages()
        .get_message(authed(&bob, mpb::GetMessageRequest { message_id: original.id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    assert_eq!((got.text.as_str(), got.revision), ("hello!", 3));
}

async fn deletes_leave_tombstones(c: &Cluster) {
    let (alice, bob, carol) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
    let chat = group(c, &alice, "Moderated", &[&bob, &carol]).await;
    let by_bob = send(c, &bob, &chat.id, "oops").await;
    c.messages()
        .edit_message(authed(&bob, mpb::EditMessageRequest { message_id: by_bob.id.clone(), text: "oops!".into() }))
        .await
        .unwrap();
    let by_carol = send(c, &carol, &chat.id, "spam").await;
    let delete = |m: &mpb::Message| mpb::DeleteMessageRequest { message_id: m.id.clone() };
    assert_eq!(code(c.messages().delete_message(authed(&carol, delete(&by_bob))).await), Code::PermissionDenied);
    let gone = c.messages().delete_message(authed(&bob, delete(&by_bob))).await.unwrap().into_inner().message.unwrap();
    assert!(gone.deleted && gone.text.is_empty());
    // The owner moderates others' messages.
    c.messages().delete_message(authed(&alice, delete(&by_carol))).await.unwrap();
    let edit = mpb::EditMessageRequest { message_id: by_bob.id.clone(), text: "undo".into() };
    assert_eq!(code(c.messages().edit_message(authed(&bob, edit)).await), Code::FailedPrecondition);
    let history = mpb::ListMessagesRequest {
        chat_id: chat.id.clone(),
        order: mpb::SortOrder::Asc as i32,
        include_history: true,
        ..Default::default()
    };
    let listed = c.messages().list_messages(authed(&alice, history)).await.unwrap().into_inner().messages;
    assert_eq!(
        listed.iter().map(|m| (m.seq, m.deleted, m.text.as_str(), m.history.len())).collect::<Vec<_>>(),
        [(1, true, "", 0), (2, true, "", 0)]
    );
    // Seq goes on after tombstones.
    assert_eq!(send(c, &alice, &chat.id, "clean").await.seq, 3);
}

/// Neither member of a direct chat moderates the other: its creator may not
/// delete the other's messages, resolve reports against their own, or
/// delete the chat with the other's history; either may archive it.
async fn direct_chat_members_are_equals(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let dm = direct(c, &alice, &bob).await;
    let list = cpb::ListMembersRequest { chat_id: dm.id.clone(), ..Default::default() };
    let members = c.chats().list_members(authed(&bob, list)).await.unwrap().into_inner().members;
    assert!(members.iter().all(|m| m.role == cpb::MemberRole::Member as i32), "{members:?}");
    let from_bob = send(c, &bob, &dm.id, "mine").await;
    let from_alice = send(c, &alice, &dm.id, "rude").await;
    let delete = mpb::DeleteMessageRequest { message_id: from_bob.id.clone() };
    assert_eq!(code(c.messages().delete_message(authed(&alice, delete)).await), Code::PermissionDenied);
    let report = mpb::ReportMessageRequest {
        message_id: from_alice.id.clone(),
        reason: mpb::ReportReason::Abuse as i32,
        comment: String::new(),
    };
    c.messages().report_message(authed(&bob, report)).await.unwrap();
    let resolve = mpb::ResolveReportRequest { message_id: from_alice.id.clone() };
    assert_eq!(code(c.messages().resolve_report(authed(&alice, resolve)).await), Code::PermissionDenied);
    let flagged = c
        .messages()
        .list_flagged_messages(authed(&alice, mpb::ListFlaggedMessagesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(flagged.messages.is_empty(), "the report against alice is not hers to see: {flagged:?}");
    for user in [&alice, &bob] {
        let delete = cpb::DeleteChatRequest { chat_id: dm.id.clone() };
        assert_eq!(code(c.chats().delete_chat(authed(user, delete)).await), Code::FailedPrecondition);
    }
    let archive = cpb::ArchiveChatRequest { chat_id: dm.id.clone() };
    assert!(c.chats().archive_chat(authed(&bob, archive)).await.unwrap().into_inner().chat.unwrap().archived);
}

/// CreateChat with a client-chosen id is idempotent for its creator while
/// they are in the chat; once removed, repeating it shows them nothing of
/// what was said since (ALREADY_EXISTS, as for anyone else's id). And a
/// public chat read from outside carries no unread count for the reader.
async fn a_removed_creator_replaying_create_chat_learns_nothing(c: &Cluster) {
    let (alice, bob, carol) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
    let create = cpb::CreateChatRequest {
        chat_id: uuid::Uuid::new_v4().to_string(),
        title: "Plans".into(),
        member_ids: vec![bob.id.clone()],
        visibility: cpb::Visibility::Public as i32,
        ..Default::default()
    };
    let chat = c.chats().create_chat(authed(&alice, create.clone())).await.unwrap().into_inner().chat.unwrap();
    let again = c.chats().create_chat(authed(&alice, create.clone())).await.unwrap().into_inner().chat.unwrap();
    assert_eq!(again.id, chat.id, "a retry answers the chat");
    let hand_over = cpb::UpdateMemberRequest {
        chat_id: chat.id.clone(),
        user_id: bob.id.clone(),
        role: cpb::MemberRole::Owner as i32,
    };
    c.chats().update_member(authed(&alice, hand_over)).await.unwrap();
    let remove = cpb::RemoveMemberRequest { chat_id: chat.id.clone(), user_id: alice.id.clone() };
    c.chats().remove_member(authed(&bob, remove)).await.unwrap();
    send(c, &bob, &chat.id, "after alice left").await;
    let replay = c.chats().create_chat(authed(&alice, create)).await;
    assert_eq!(code(replay), Code::AlreadyExists);
    // Read from outside, the public chat shows its last message but no
    // count of the reader's.
    let get = cpb::GetChatRequest { chat_id: chat.id.clone(), ..Default::default() };
    let seen = c.chats().get_chat(authed(&carol, get)).await.unwrap().into_inner().chat.unwrap();
    assert_eq!(seen.last_message.map(|m| m.text), Some("after alice left".to_owned()));
    assert_eq!((seen.unread_count, seen.mention_count), (0, 0));
}

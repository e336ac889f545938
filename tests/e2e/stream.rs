//! StreamEvents: live delivery, exact resume after a cut, following new
//! chats, revocation and shutdown.

use std::time::Duration;

use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_proto::sessions::v1 as spb;
use natter_testkit::{Cluster, Mode, TestUser, authed};
use tonic::codec::Streaming;
use tonic::{Code, Status};

use crate::chats::{direct, send};
use mpb::stream_events_response::Event;

crate::both_modes!(
    live_messages_arrive_in_order,
    cut_stream_resumes_exactly_once,
    concurrent_senders_stream_in_seq_order,
    edits_deletes_and_reads_stream_in_order,
    a_removed_member_stops_receiving_the_chat,
    all_chats_stream_follows_new_chats,
    revoked_session_ends_its_stream,
);

/// Cross-service announcements (a chat joined, a member removed, a session
/// revoked) reach the messages service in split mode over NATS only.
fn crosses_services(c: &Cluster) -> bool {
    c.mode == Mode::AllInOne || natter_testkit::nats_url().is_some()
}

/// The next event, waiting at most 10 s (a bound, not a sleep: it returns as
/// soon as the event arrives).
pub(crate) async fn next(stream: &mut Streaming<mpb::StreamEventsResponse>) -> mpb::StreamEventsResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

/// How the stream ends (its status), skipping any events before; waits at
/// most 10 s.
pub(crate) async fn end_of(stream: &mut Streaming<mpb::StreamEventsResponse>) -> Status {
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("ends within 10 s");
    end.expect_err("ends with a status")
}

/// The seq of the next event, which must be a created message of `chat`.
async fn next_created(stream: &mut Streaming<mpb::StreamEventsResponse>, chat: &str) -> (i64, String) {
    let event = next(stream).await;
    assert_eq!(event.chat_id, chat);
    match event.event {
        Some(Event::MessageCreated(m)) => {
            assert_eq!(m.seq, event.seq);
            (m.seq, m.text)
        }
        other => panic!("expected a created message, got {other:?}"),
    }
}

async fn open(
    c: &Cluster,
    user: &TestUser,
    chats: &[&str],
    resume: &[(&str, i64)],
) -> Streaming<mpb::StreamEventsResponse> {
    let request = mpb::StreamEventsRequest {
        chat_ids: chats.iter().map(|s| s.to_string()).collect(),
        resume: resume.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        ..Default::default()
    };
    c.messages().stream_events(authed(user, request)).await.expect("stream opens").into_inner()
}

async fn live_messages_arrive_in_order(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &alice, &bob).await;
    let mut stream = open(c, &bob, &[&chat.id], &[]).await;
    for i in 1..=3 {
        send(c, &alice, &chat.id, &format!("live {i}")).await;
    }
    for i in 1..=3 {
        assert_eq!(next_created(&mut stream, &chat.id).await, (i, format!("live {i}")));
    }
    let read = c
        .messages()
        .mark_read(authed(&bob, mpb::MarkReadRequest { chat_id: chat.id.clone(), seq: 3 }))
        .await
        .unwrap()
        .into_inner();
    let event = next(&mut stream).await;
    assert_eq!(
        event.event,
        Some(Event::ReadUpdated(mpb::ReadUpdated { user_id: bob.id.clone(), read_seq: read.read_seq }))
    );
}

async fn cut_stream_resumes_exactly_once(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &alice, &bob).await;
    let mut stream = open(c, &bob, &[&chat.id], &[]).await;
    for i in 1..=5 {
        send(c, &alice, &chat.id, &format!("m{i}")).await;
    }
    let mut last = 0;
    for _ in 0..5 {
        last = next_created(&mut stream, &chat.id).await.0;
    }
    assert_eq!(last, 5);
    drop(stream); // the connection drops

    for i in 6..=12 {
        send(c, &alice, &chat.id, &format!("m{i}")).await;
    }
    let mut resumed = open(c, &bob, &[&chat.id], &[(&chat.id, last)]).await;
    for expected in 6..=12 {
        assert_eq!(next_created(&mut resumed, &chat.id).await, (expected, format!("m{expected}")));
    }
    // Then live, with nothing repeated in between.
    send(c, &alice, &chat.id, "m13").await;
    assert_eq!(next_created(&mut resumed, &chat.id).await, (13, "m13".to_owned()));

    // Resuming from 0 replays the whole history in order.
    let mut full = open(c, &bob, &[&chat.id], &[(&chat.id, 0)]).await;
    for expected in 1..=13 {
        assert_eq!(next_created(&mut full, &chat.id).await.0, expected);
    }
}

async fn concurrent_senders_stream_in_seq_order(c: &Cluster) {
    let (alice, bob, carol) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
    let request = cpb::CreateChatRequest {
        title: "race".into(),
        member_ids: vec![bob.id.clone(), carol.id.clone()],
        ..Default::default()
    };
    let chat = c.chats().create_chat(authed(&alice, request)).await.unwrap().into_inner().chat.unwrap();
    let mut stream = open(c, &alice, &[&chat.id], &[]).await;
    let total = 40;
    let sends = (0..total).map(|i| {
        let user = if i % 2 == 0 { &bob } else { &carol };
        let mut client = c.messages();
        let request = authed(
            user,
            mpb::SendMessageRequest { chat_id: chat.id.clone(), text: format!("c{i}"), ..Default::default() },
        );
        async move { client.send_message(request).await.unwrap() }
    });
    futures::future::join_all(sends).await;
    for expected in 1..=total {
        assert_eq!(next_created(&mut stream, &chat.id).await.0, expected, "in order, no gap, no duplicate");
    }
    send(c, &alice, &chat.id, "marker").await;
    assert_eq!(next_created(&mut stream, &chat.id).await.0, total + 1);
}

async fn edits_deletes_and_reads_stream_in_order(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &alice, &bob).await;
    let mut stream = open(c, &bob, &[&chat.id], &[]).await;
    let first = send(c, &alice, &chat.id, "helo").await;
    let edit = mpb::EditMessageRequest { message_id: first.id.clone(), text: "hello".into() };
    c.messages().edit_message(authed(&alice, edit)).await.unwrap();
    c.messages()
        .delete_message(authed(&alice, mpb::DeleteMessageRequest { message_id: first.id.clone() }))
        .await
        .unwrap();
    send(c, &alice, &chat.id, "second").await;
    c.messages().mark_read(authed(&alice, mpb::MarkReadRequest { chat_id: chat.id.clone(), seq: 2 })).await.unwrap();
    assert_eq!(next_created(&mut stream, &chat.id).await, (1, "helo".to_owned()));
    match next(&mut stream).await.event {
        Some(Event::MessageEdited(m)) => assert_eq!((m.seq, m.revision, m.text.as_str()), (1, 2, "hello")),
        other => panic!("expected an edit, got {other:?}"),
    }
    match next(&mut stream).await.event {
        Some(Event::MessageDeleted(m)) => assert!(m.seq == 1 && m.deleted && m.text.is_empty()),
        other => panic!("expected a delete, got {other:?}"),
    }
    assert_eq!(next_created(&mut stream, &chat.id).await, (2, "second".to_owned()));
    let read = next(&mut stream).await;
    assert_eq!(read.event, Some(Event::ReadUpdated(mpb::ReadUpdated { user_id: alice.id.clone(), read_seq: 2 })));
}

async fn a_removed_member_stops_receiving_the_chat(c: &Cluster) {
    if !crosses_services(c) {
        return;
    }
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let request =
        cpb::CreateChatRequest { title: "club".into(), member_ids: vec![bob.id.clone()], ..Default::default() };
    let club = c.chats().create_chat(authed(&alice, request)).await.unwrap().into_inner().chat.unwrap();
    let dm = direct(c, &alice, &bob).await;
    let mut stream = open(c, &bob, &[], &[]).await;
    let remove = cpb::RemoveMemberRequest { chat_id: club.id.clone(), user_id: bob.id.clone() };
    c.chats().remove_member(authed(&alice, remove)).await.unwrap();
    let removed = next(&mut stream).await;
    assert_eq!(removed.chat_id, club.id);
    assert!(
        matches!(removed.event, Some(Event::MembershipChanged(ref m)) if m.user_id == bob.id && m.change == mpb::MembershipChange::Removed as i32)
    );
    send(c, &alice, &club.id, "bob cannot see this").await;
    send(c, &alice, &dm.id, "but this").await;
    assert_eq!(next_created(&mut stream, &dm.id).await, (1, "but this".to_owned()), "nothing of the club in between");
    // Added back, the stream follows the club again from the join on.
    let add = cpb::AddMembersRequest { chat_id: club.id.clone(), user_ids: vec![bob.id.clone()] };
    c.chats().add_members(authed(&alice, add)).await.unwrap();
    let joined = next(&mut stream).await;
    assert!(
        matches!(joined.event, Some(Event::MembershipChanged(ref m)) if m.change == mpb::MembershipChange::Joined as i32)
    );
    send(c, &alice, &club.id, "welcome back").await;
    assert_eq!(next_created(&mut stream, &club.id).await, (2, "welcome back".to_owned()));
}

async fn all_chats_stream_follows_new_chats(c: &Cluster) {
    if !crosses_services(c) {
        return;
    }
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let mut stream = open(c, &bob, &[], &[]).await;
    let chat = direct(c, &alice, &bob).await;
    let joined = next(&mut stream).await;
    assert_eq!(joined.chat_id, chat.id);
    assert!(matches!(joined.event, Some(Event::MembershipChanged(ref m)) if m.user_id == bob.id));
    send(c, &alice, &chat.id, "hello").await;
    assert_eq!(next_created(&mut stream, &chat.id).await, (1, "hello".to_owned()));
}

async fn revoked_session_ends_its_stream(c: &Cluster) {
    if !crosses_services(c) {
        return;
    }
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &alice, &bob).await;
    let mut stream = open(c, &bob, &[&chat.id], &[]).await;
    c.sessions().revoke_session(authed(&bob, spb::RevokeSessionRequest::default())).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("ends within 10 s");
    assert_eq!(end.expect_err("ends with an error").code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_with_unavailable() {
    let c = Cluster::start(Mode::AllInOne).await.unwrap();
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(&c, &alice, &bob).await;
    let mut stream = open(&c, &bob, &[&chat.id], &[]).await;
    c.shutdown_token().cancel();
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("ends within 10 s");
    let status = end.expect_err("ends with a status telling the client to reconnect");
    assert_eq!(status.code(), Code::Unavailable);
    c.stop().await; // every server task finishes without error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_ends_its_stream_and_its_calls() {
    let c = Cluster::all_in_one(&["--session-ttl", "1s"]).await;
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(&c, &alice, &bob).await;
    let mut stream = open(&c, &bob, &[&chat.id], &[]).await;
    let end = end_of(&mut stream).await;
    assert_eq!(end.code(), Code::Unauthenticated);
    let call = c.chats().list_chats(authed(&bob, cpb::ListChatsRequest::default())).await;
    assert_eq!(call.expect_err("expired").code(), Code::Unauthenticated);
    c.stop().await;
}

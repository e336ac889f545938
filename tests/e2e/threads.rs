//! Reply threads: SendMessage's thread_root_seq starts or joins a thread;
//! the root's ThreadSummary on every read and on its `message_edited`
//! event; ListMessages' main timeline without thread replies, with them on
//! request, and one thread's pages; unread counts and previews count thread
//! replies; resume replays the root's summary change once.

use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_testkit::{Cluster, TestUser, authed};
use tonic::Code;

use crate::chats::send;
use crate::mentions::group;
use crate::stream::next;
use crate::violated_fields;
use mpb::stream_events_response::Event;

crate::both_modes!(
    a_thread_is_started_joined_and_summarized_on_every_read_and_event,
    a_thread_is_paged_apart_from_the_main_timeline,
    thread_roots_are_checked_before_anything_is_written
);

/// `user`'s reply `text` in `chat`'s thread of `root` (a seq).
async fn reply(c: &Cluster, user: &TestUser, chat: &str, root: i64, text: &str) -> mpb::Message {
    let request = mpb::SendMessageRequest {
        chat_id: chat.to_owned(),
        text: text.to_owned(),
        thread_root_seq: root,
        ..Default::default()
    };
    c.messages().send_message(authed(user, request)).await.unwrap().into_inner().message.unwrap()
}

/// The message with `id`, as `user` reads it.
async fn get(c: &Cluster, user: &TestUser, id: &str) -> mpb::Message {
    let request = mpb::GetMessageRequest { message_id: id.to_owned() };
    c.messages().get_message(authed(user, request)).await.unwrap().into_inner().message.unwrap()
}

/// The seqs of one ListMessages page and its next page token.
async fn page(c: &Cluster, user: &TestUser, request: mpb::ListMessagesRequest) -> (Vec<i64>, String) {
    let page = c.messages().list_messages(authed(user, request)).await.unwrap().into_inner();
    (page.messages.iter().map(|m| m.seq).collect(), page.next_page_token)
}

/// (reply_count, participants) of a root's summary.
fn summary(m: &mpb::Message) -> (i32, Vec<String>) {
    let thread = m.thread.as_ref().expect("a root with replies carries its thread");
    (thread.reply_count, thread.participants.clone())
}

/// The next message event of `stream`: (kind, message).
async fn next_message(stream: &mut tonic::codec::Streaming<mpb::StreamEventsResponse>) -> (&'static str, mpb::Message) {
    loop {
        match next(stream).await.event {
            Some(Event::MessageCreated(m)) => return ("created", m),
            Some(Event::MessageEdited(m)) => return ("edited", m),
            Some(Event::MessageDeleted(m)) => return ("deleted", m),
            _ => continue,
        }
    }
}

async fn a_thread_is_started_joined_and_summarized_on_every_read_and_event(c: &Cluster) {
    let users = futures::future::join_all(["ann", "ben", "cat"].map(|n| c.user(n))).await;
    let (ann, ben, cat) = (&users[0], &users[1], &users[2]);
    let chat = group(c, ann, &[ben, cat]).await;
    let root = send(c, ann, &chat, "lunch?").await;
    let before = send(c, ann, &chat, "anyone").await.change_seq;
    let follow = mpb::StreamEventsRequest { chat_ids: vec![chat.clone()], ..Default::default() };
    let mut stream = c.messages().stream_events(authed(ann, follow)).await.unwrap().into_inner();

    // Ben starts the thread: his reply is a message of the chat (next
    // seq), created on the stream with its root, then the root edited with
    // its new summary.
    let first = reply(c, ben, &chat, root.seq, "yes").await;
    assert_eq!((first.seq, first.thread_root_seq), (3, root.seq));
    assert!(first.thread.is_none(), "a reply carries no summary");
    let (kind, created) = next_message(&mut stream).await;
    assert_eq!((kind, created.seq, created.thread_root_seq), ("created", 3, 1));
    let (kind, edited) = next_message(&mut stream).await;
    assert_eq!((kind, edited.id.as_str()), ("edited", root.id.as_str()));
    assert_eq!(summary(&edited), (1, vec![ben.id.clone()]));
    assert_eq!(edited.revision, 1, "no revision: a change of the root, not an edit of its text");
    // Cat names Ben's reply: she joins the root's thread.
    let second = reply(c, cat, &chat, first.seq, "me too").await;
    assert_eq!((second.seq, second.thread_root_seq), (4, root.seq));
    let got = get(c, ann, &root.id).await;
    assert_eq!(summary(&got), (2, vec![cat.id.clone(), ben.id.clone()]), "the latest replier first");
    let thread = got.thread.as_ref().unwrap();
    assert_eq!(thread.last_reply_time, second.send_time);
    let events = [next_message(&mut stream).await, next_message(&mut stream).await];
    assert_eq!((events[0].0, events[0].1.seq), ("created", 4));
    assert_eq!((events[1].0, summary(&events[1].1)), ("edited", summary(&got)));

    // Unread counts and previews count thread replies like any message;
    // GetChat's messages are the main timeline.
    let listed = c.chats().list_chats(authed(ann, cpb::ListChatsRequest::default())).await.unwrap().into_inner();
    let shown = listed.chats.iter().find(|x| x.id == chat).unwrap();
    assert_eq!((shown.unread_count, shown.last_message.as_ref().unwrap().seq), (2, 4));
    let get_chat = cpb::GetChatRequest { chat_id: chat.clone(), message_page_size: 10 };
    let opened = c.chats().get_chat(authed(ann, get_chat)).await.unwrap().into_inner();
    let seqs: Vec<i64> = opened.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [2, 1], "no thread replies among GetChat's messages");
    assert_eq!(summary(&opened.messages[1]), summary(&got));

    // Deleting a reply lowers the count: the reply deleted, then the root.
    let delete = mpb::DeleteMessageRequest { message_id: second.id.clone() };
    c.messages().delete_message(authed(cat, delete)).await.unwrap();
    let events = [next_message(&mut stream).await, next_message(&mut stream).await];
    assert_eq!((events[0].0, events[0].1.seq), ("deleted", 4));
    assert_eq!((events[1].0, summary(&events[1].1)), ("edited", (1, vec![cat.id.clone(), ben.id.clone()])));
    let root_now = get(c, ben, &root.id).await;
    assert_eq!(summary(&root_now), (1, vec![cat.id.clone(), ben.id.clone()]), "who replied stays a participant");
    let listed = c.chats().list_chats(authed(ann, cpb::ListChatsRequest::default())).await.unwrap().into_inner();
    assert_eq!(listed.chats.iter().find(|x| x.id == chat).unwrap().unread_count, 1);

    // Resuming from before the thread replays the root once, as it is now.
    let resume = mpb::StreamEventsRequest {
        chat_ids: vec![chat.clone()],
        resume_changes: [(chat.clone(), before)].into_iter().collect(),
        ..Default::default()
    };
    let mut resumed = c.messages().stream_events(authed(ben, resume)).await.unwrap().into_inner();
    let mut replayed = Vec::new();
    while replayed.last().is_none_or(|(_, m): &(&str, mpb::Message)| m.change_seq < root_now.change_seq) {
        replayed.push(next_message(&mut resumed).await);
    }
    let of_root: Vec<&(&str, mpb::Message)> = replayed.iter().filter(|(_, m)| m.id == root.id).collect();
    assert_eq!(of_root.len(), 1, "the root once: {replayed:?}");
    assert_eq!((of_root[0].0, summary(&of_root[0].1)), ("edited", summary(&root_now)));
    let kinds: Vec<(&str, i64)> = replayed.iter().map(|(k, m)| (*k, m.seq)).collect();
    assert_eq!(kinds, [("created", 3), ("deleted", 4), ("edited", 1)]);
}

async fn a_thread_is_paged_apart_from_the_main_timeline(c: &Cluster) {
    let (ann, ben) = (c.user("ann").await, c.user("ben").await);
    let chat = group(c, &ann, &[&ben]).await;
    // 1 root, 2 and 3 replies, 4 top level, 5 a reply, 6 another root's.
    let root = send(c, &ann, &chat, "root").await;
    reply(c, &ben, &chat, 1, "r1").await;
    reply(c, &ann, &chat, 1, "r2").await;
    send(c, &ben, &chat, "top").await;
    reply(c, &ben, &chat, 3, "r3").await;
    reply(c, &ben, &chat, 4, "on top").await;
    let list = |root: i64, all: bool| mpb::ListMessagesRequest {
        chat_id: chat.clone(),
        thread_root_seq: root,
        include_thread_replies: all,
        ..Default::default()
    };
    assert_eq!(page(c, &ben, list(0, false)).await.0, [4, 1], "the main timeline: roots, no replies");
    assert_eq!(page(c, &ben, list(0, true)).await.0, [6, 5, 4, 3, 2, 1], "everything when asked");
    // One thread, a reply a page, both orders, with before/after bounds.
    let mut walked = Vec::new();
    let mut request = mpb::ListMessagesRequest { page_size: 1, ..list(1, false) };
    loop {
        let (seqs, token) = page(c, &ben, request.clone()).await;
        walked.extend(seqs);
        if token.is_empty() {
            break;
        }
        request.page_token = token;
    }
    assert_eq!(walked, [5, 3, 2], "the root's replies, newest first, none twice, none missing");
    let ascending = mpb::ListMessagesRequest { order: mpb::SortOrder::Asc as i32, after_seq: 2, ..list(1, false) };
    assert_eq!(page(c, &ben, ascending).await.0, [3, 5]);
    assert_eq!(page(c, &ben, list(4, false)).await.0, [6]);
    assert_eq!(page(c, &ben, list(2, false)).await.0, Vec::<i64>::new(), "a reply is no root");
    // A token of one listing is refused by another.
    let first = mpb::ListMessagesRequest { page_size: 1, ..list(1, false) };
    let (_, token) = page(c, &ben, first).await;
    let other = mpb::ListMessagesRequest { page_size: 1, page_token: token, ..list(0, true) };
    let refused = c.messages().list_messages(authed(&ben, other)).await.unwrap_err();
    assert_eq!(violated_fields(&refused), ["page_token"]);
    let root = get(c, &ben, &root.id).await;
    assert_eq!(summary(&root), (3, vec![ben.id.clone(), ann.id.clone()]));
}

async fn thread_roots_are_checked_before_anything_is_written(c: &Cluster) {
    let (ann, ben) = (c.user("ann").await, c.user("ben").await);
    let chat = group(c, &ann, &[&ben]).await;
    let root = send(c, &ann, &chat, "root").await;
    let other = send(c, &ann, &chat, "to delete").await;
    let first = reply(c, &ben, &chat, root.seq, "reply").await;
    let attempt = |seq: i64| mpb::SendMessageRequest {
        chat_id: chat.clone(),
        text: "x".into(),
        thread_root_seq: seq,
        ..Default::default()
    };
    for seq in [-1, 99] {
        let refused = c.messages().send_message(authed(&ben, attempt(seq))).await.unwrap_err();
        assert_eq!(violated_fields(&refused), ["thread_root_seq"], "seq {seq}");
    }
    c.messages()
        .delete_message(authed(&ann, mpb::DeleteMessageRequest { message_id: other.id.clone() }))
        .await
        .unwrap();
    let refused = c.messages().send_message(authed(&ben, attempt(other.seq))).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("thread_root_seq"), "{refused:?}");
    // Deleting the root keeps its summary and closes the thread to replies,
    // named by the root or by a reply. A retry of a reply sent before still
    // answers the original.
    let mut retried = attempt(root.seq);
    retried.message_id = uuid::Uuid::now_v7().to_string();
    let original =
        c.messages().send_message(authed(&ben, retried.clone())).await.unwrap().into_inner().message.unwrap();
    let delete = mpb::DeleteMessageRequest { message_id: root.id.clone() };
    let tombstone = c.messages().delete_message(authed(&ann, delete)).await.unwrap().into_inner().message.unwrap();
    assert_eq!(summary(&tombstone).0, 2, "a deleted root keeps its summary");
    for seq in [root.seq, first.seq] {
        let refused = c.messages().send_message(authed(&ben, attempt(seq))).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "seq {seq}: {refused:?}");
    }
    let again = c.messages().send_message(authed(&ben, retried)).await.unwrap().into_inner().message.unwrap();
    assert_eq!((again.id, again.seq, again.thread_root_seq), (original.id, original.seq, root.seq));
    // Nothing was written by a refusal: the newest seq is the last reply's.
    let listed = c.chats().list_chats(authed(&ann, cpb::ListChatsRequest::default())).await.unwrap().into_inner();
    assert_eq!(listed.chats.iter().find(|x| x.id == chat).unwrap().last_message.as_ref().unwrap().seq, 4);
    // A thread's page with include_thread_replies is refused, named.
    let list = mpb::ListMessagesRequest {
        chat_id: chat.clone(),
        thread_root_seq: root.seq,
        include_thread_replies: true,
        ..Default::default()
    };
    let refused = c.messages().list_messages(authed(&ben, list)).await.unwrap_err();
    assert_eq!(violated_fields(&refused), ["include_thread_replies"]);
}

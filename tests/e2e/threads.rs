//! Reply threads: SendMessage's thread_root_seq, the root's `thread`
//! summary (a change of the root), ListMessages of one thread and of the
//! main timeline without replies, unread counts that count replies, and a
//! resume that replays the root's summary once.

use std::collections::HashMap;

use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_testkit::{Cluster, TestUser, authed};

use crate::stream::next;
use crate::violated_fields;
use mpb::stream_events_response::Event;

crate::both_modes!(
    a_thread_is_paged_apart_and_its_root_keeps_its_summary,
    thread_roots_are_checked_before_anything_is_written,
    a_resumed_stream_sees_the_root_summary_once
);

/// Sends `text` to `chat` as `user`, in the thread of `root` (0: none).
async fn say(c: &Cluster, user: &TestUser, chat: &str, text: &str, root: i64) -> mpb::Message {
    let request = mpb::SendMessageRequest {
        chat_id: chat.to_owned(),
        text: text.to_owned(),
        thread_root_seq: root,
        ..Default::default()
    };
    c.messages().send_message(authed(user, request)).await.unwrap().into_inner().message.unwrap()
}

/// The seqs `user` lists with `request` (its chat set), oldest first.
async fn seqs(c: &Cluster, user: &TestUser, request: mpb::ListMessagesRequest) -> Vec<i64> {
    let request = mpb::ListMessagesRequest { order: mpb::SortOrder::Asc as i32, ..request };
    let page = c.messages().list_messages(authed(user, request)).await.unwrap().into_inner().messages;
    page.iter().map(|m| m.seq).collect()
}

async fn a_thread_is_paged_apart_and_its_root_keeps_its_summary(c: &Cluster) {
    let users = futures::future::join_all(["ann", "ben", "cat"].map(|n| c.user(n))).await;
    let (ann, ben, cat) = (&users[0], &users[1], &users[2]);
    let chat = crate::group(c, ann, "threads", &[ben, cat]).await.id;
    let request = mpb::StreamEventsRequest { chat_ids: vec![chat.clone()], ..Default::default() };
    let mut stream = c.messages().stream_events(authed(cat, request)).await.unwrap().into_inner();

    let root = say(c, ann, &chat, "lunch?", 0).await;
    let first = say(c, ben, &chat, "noon", root.seq).await;
    assert_eq!((first.seq, first.thread_root_seq), (2, 1), "a reply takes the chat's next seq");
    say(c, ann, &chat, "meanwhile, in the main timeline", 0).await;
    // A reply to a reply joins the root's thread.
    let second = say(c, cat, &chat, "me too", first.seq).await;
    assert_eq!((second.seq, second.thread_root_seq), (4, 1));

    // The stream: the reply created, then its root edited with the summary.
    let mut events = Vec::new();
    while events.len() < 6 {
        match next(&mut stream).await.event {
            Some(Event::MessageCreated(m)) => events.push(("created", m.seq, m.thread.map_or(0, |t| t.reply_count))),
            Some(Event::MessageEdited(m)) => events.push(("edited", m.seq, m.thread.map_or(0, |t| t.reply_count))),
            _ => {}
        }
    }
    assert_eq!(
        events,
        [
            ("created", 1, 0),
            ("created", 2, 0),
            ("edited", 1, 1),
            ("created", 3, 0),
            ("created", 4, 0),
            ("edited", 1, 2)
        ]
    );

    // The root as every read shows it.
    let get = mpb::GetMessageRequest { message_id: root.id.clone() };
    let got = c.messages().get_message(authed(ben, get)).await.unwrap().into_inner().message.unwrap();
    let summary = got.thread.expect("the root has a summary");
    assert_eq!(summary.reply_count, 2);
    assert_eq!(summary.participant_ids, [cat.id.clone(), ben.id.clone()], "most recent first");
    assert_eq!(summary.last_reply_time, second.send_time);

    // The main timeline leaves the replies out unless asked; a thread pages apart.
    let list = |thread_root_seq, include_thread_replies| mpb::ListMessagesRequest {
        chat_id: chat.clone(),
        thread_root_seq,
        include_thread_replies,
        ..Default::default()
    };
    assert_eq!(seqs(c, ben, list(0, false)).await, [1, 3]);
    assert_eq!(seqs(c, ben, list(0, true)).await, [1, 2, 3, 4]);
    assert_eq!(seqs(c, ben, list(1, false)).await, [2, 4]);
    let page = mpb::ListMessagesRequest { page_size: 1, ..list(1, false) };
    let mut walked = Vec::new();
    let mut token = String::new();
    loop {
        let request = mpb::ListMessagesRequest { page_token: token.clone(), ..page.clone() };
        let out = c.messages().list_messages(authed(ben, request)).await.unwrap().into_inner();
        walked.extend(out.messages.iter().map(|m| m.seq));
        if out.next_page_token.is_empty() {
            break;
        }
        token = out.next_page_token;
    }
    assert_eq!(walked, [4, 2], "a thread pages newest first, one at a time");
    let stale = mpb::ListMessagesRequest { page_token: token_of(c, ben, &chat).await, ..list(1, false) };
    let refused = c.messages().list_messages(authed(ben, stale)).await.unwrap_err();
    assert_eq!(violated_fields(&refused), ["page_token"], "a main-timeline token does not page a thread");

    // Replies count as unread like any message.
    let chats = c.chats().list_chats(authed(ben, cpb::ListChatsRequest::default())).await.unwrap().into_inner().chats;
    let unread: HashMap<_, _> = chats.iter().map(|x| (x.id.clone(), x.unread_count)).collect();
    assert_eq!(unread[&chat], 3, "ann's two messages and cat's reply");
}

/// A next_page_token of `chat`'s main timeline, as `user` gets it.
async fn token_of(c: &Cluster, user: &TestUser, chat: &str) -> String {
    let request = mpb::ListMessagesRequest { chat_id: chat.to_owned(), page_size: 1, ..Default::default() };
    c.messages().list_messages(authed(user, request)).await.unwrap().into_inner().next_page_token
}

async fn thread_roots_are_checked_before_anything_is_written(c: &Cluster) {
    let ann = c.user("ann").await;
    let ben = c.user("ben").await;
    let chat = crate::group(c, &ann, "threads", &[&ben]).await.id;
    let root = say(c, &ann, &chat, "a root", 0).await;
    let send = |thread_root_seq| mpb::SendMessageRequest {
        chat_id: chat.clone(),
        text: "reply".into(),
        thread_root_seq,
        ..Default::default()
    };
    for root_seq in [-1, 99] {
        let refused = c.messages().send_message(authed(&ben, send(root_seq))).await.unwrap_err();
        assert_eq!(violated_fields(&refused), ["thread_root_seq"], "root {root_seq}");
    }
    let delete = mpb::DeleteMessageRequest { message_id: root.id.clone() };
    c.messages().delete_message(authed(&ann, delete)).await.unwrap();
    let refused = c.messages().send_message(authed(&ben, send(root.seq))).await.unwrap_err();
    assert_eq!(violated_fields(&refused), ["thread_root_seq"], "a deleted root");
    // Nothing was written: the next message takes seq 2.
    assert_eq!(say(c, &ben, &chat, "next", 0).await.seq, 2);
}

async fn a_resumed_stream_sees_the_root_summary_once(c: &Cluster) {
    let ann = c.user("ann").await;
    let ben = c.user("ben").await;
    let chat = crate::group(c, &ann, "threads", &[&ben]).await.id;
    let root = say(c, &ann, &chat, "a root", 0).await;
    // Ben was last here at the root; then two replies and their counts.
    say(c, &ann, &chat, "one", root.seq).await;
    say(c, &ann, &chat, "two", root.seq).await;
    let request = mpb::StreamEventsRequest {
        chat_ids: vec![chat.clone()],
        resume_changes: [(chat.clone(), root.change_seq)].into(),
        ..Default::default()
    };
    let mut stream = c.messages().stream_events(authed(&ben, request)).await.unwrap().into_inner();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = next(&mut stream).await;
        match event.event {
            Some(Event::MessageCreated(m)) => seen.push((m.seq, m.thread.map_or(0, |t| t.reply_count))),
            Some(Event::MessageEdited(m)) => seen.push((m.seq, m.thread.map_or(0, |t| t.reply_count))),
            _ => {}
        }
    }
    // The replies, and the root once, as the last count left it.
    seen.sort_unstable();
    assert_eq!(seen, [(1, 2), (2, 0), (3, 0)]);
}

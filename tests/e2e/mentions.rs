//! Mentions: SendMessage's mention_user_ids (members only, checked with the
//! sender's membership), carried by every read and event, and each chat's
//! mention_count for the caller, cleared by MarkRead and by deletion.

use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_testkit::{Cluster, TestUser, authed};
use tonic::Code;

use crate::stream::next;
use crate::{code, violated_fields};
use mpb::stream_events_response::Event;

crate::both_modes!(
    a_mention_counts_for_the_mentioned_member_until_read_or_deleted,
    mentions_are_checked_before_anything_is_written
);

/// A send of `text` to `chat` mentioning `users` (ids as given).
fn mentioning(chat: &str, text: &str, users: &[&str]) -> mpb::SendMessageRequest {
    mpb::SendMessageRequest {
        chat_id: chat.to_owned(),
        text: text.to_owned(),
        mention_user_ids: users.iter().map(|u| u.to_string()).collect(),
        ..Default::default()
    }
}

/// `user`'s (unread_count, mention_count, newest seq) of `chat` as
/// ListChats shows it.
async fn listed(c: &Cluster, user: &TestUser, chat: &str) -> (i64, i64, i64) {
    let chats = c.chats().list_chats(authed(user, cpb::ListChatsRequest::default())).await.unwrap().into_inner().chats;
    let chat = chats.into_iter().find(|x| x.id == chat).expect("the chat is listed");
    (chat.unread_count, chat.mention_count, chat.last_message.map_or(0, |m| m.seq))
}

/// A group of `owner` and `others`.
pub(crate) async fn group(c: &Cluster, owner: &TestUser, others: &[&TestUser]) -> String {
    let request = cpb::CreateChatRequest {
        title: "mentions".into(),
        member_ids: others.iter().map(|u| u.id.clone()).collect(),
        ..Default::default()
    };
    c.chats().create_chat(authed(owner, request)).await.unwrap().into_inner().chat.unwrap().id
}

async fn a_mention_counts_for_the_mentioned_member_until_read_or_deleted(c: &Cluster) {
    let users = futures::future::join_all(["ann", "ben", "cat"].map(|n| c.user(n))).await;
    let (ann, ben, cat) = (&users[0], &users[1], &users[2]);
    let chat = group(c, ann, &[ben, cat]).await;
    let request = mpb::StreamEventsRequest { chat_ids: vec![chat.clone()], ..Default::default() };
    let mut stream = c.messages().stream_events(authed(ben, request)).await.unwrap().into_inner();

    // Ann mentions Ben (twice: collapsed) and herself (never counted).
    let send = mentioning(&chat, "hi @ben", &[&ben.id, &ben.id, &ann.id]);
    let sent = c.messages().send_message(authed(ann, send)).await.unwrap().into_inner().message.unwrap();
    assert_eq!(sent.mention_user_ids, [ben.id.clone(), ann.id.clone()], "as sent, duplicates collapsed");
    assert_eq!(listed(c, ben, &chat).await, (1, 1, 1), "ben: one unread, a mention");
    assert_eq!(listed(c, ann, &chat).await, (0, 0, 1), "ann's own message");
    assert_eq!(listed(c, cat, &chat).await, (1, 0, 1), "cat: unread, not mentioned");
    let get = cpb::GetChatRequest { chat_id: chat.clone(), ..Default::default() };
    let got = c.chats().get_chat(authed(ben, get)).await.unwrap().into_inner().chat.unwrap();
    assert_eq!((got.unread_count, got.mention_count), (1, 1), "GetChat as ListChats");

    // Every read and event carries the mentions.
    let event = loop {
        match next(&mut stream).await.event {
            Some(Event::MessageCreated(m)) => break m,
            _ => continue,
        }
    };
    assert_eq!((event.id.as_str(), &event.mention_user_ids), (sent.id.as_str(), &sent.mention_user_ids));
    let list = mpb::ListMessagesRequest { chat_id: chat.clone(), ..Default::default() };
    let page = c.messages().list_messages(authed(cat, list)).await.unwrap().into_inner().messages;
    assert_eq!(page[0].mention_user_ids, sent.mention_user_ids);
    let one = mpb::GetMessageRequest { message_id: sent.id.clone() };
    let got = c.messages().get_message(authed(cat, one)).await.unwrap().into_inner().message.unwrap();
    assert_eq!(got.mention_user_ids, sent.mention_user_ids);
    // An edit keeps them, whatever the new text says.
    let edit = mpb::EditMessageRequest { message_id: sent.id.clone(), text: "hi all".into() };
    let edited = c.messages().edit_message(authed(ann, edit)).await.unwrap().into_inner().message.unwrap();
    assert_eq!(edited.mention_user_ids, sent.mention_user_ids);
    assert_eq!(listed(c, ben, &chat).await, (1, 1, 1));

    // Reading past it clears it.
    let read = mpb::MarkReadRequest { chat_id: chat.clone(), seq: sent.seq };
    c.messages().mark_read(authed(ben, read)).await.unwrap();
    assert_eq!(listed(c, ben, &chat).await, (0, 0, 1));

    // A retried send (same message_id) is the one message, mentioned once.
    let mut retried = mentioning(&chat, "cat, look", &[&cat.id]);
    retried.message_id = uuid::Uuid::now_v7().to_string();
    let first = c.messages().send_message(authed(ben, retried.clone())).await.unwrap().into_inner().message.unwrap();
    let again = c.messages().send_message(authed(ben, retried)).await.unwrap().into_inner().message.unwrap();
    assert_eq!((again.seq, &again.mention_user_ids), (first.seq, &vec![cat.id.clone()]));
    assert_eq!(listed(c, cat, &chat).await, (2, 1, 2));
    // A deleted message's mention no longer counts (nor does the message).
    let delete = mpb::DeleteMessageRequest { message_id: first.id.clone() };
    let deleted = c.messages().delete_message(authed(ben, delete)).await.unwrap().into_inner().message.unwrap();
    assert!(deleted.mention_user_ids.is_empty(), "a tombstone mentions no one");
    assert_eq!(listed(c, cat, &chat).await, (1, 0, 2));
}

async fn mentions_are_checked_before_anything_is_written(c: &Cluster) {
    let users = futures::future::join_all(["ann", "ben", "cat", "dan"].map(|n| c.user(n))).await;
    let (ann, ben, cat, dan) = (&users[0], &users[1], &users[2], &users[3]);
    let chat = group(c, ann, &[ben, cat]).await;
    c.messages().send_message(authed(ann, mentioning(&chat, "first", &[]))).await.unwrap();

    // Dan is no member: refused, naming his place in the list; nothing is
    // written, not even the mention of Ben beside him.
    let refused = c.messages().send_message(authed(ann, mentioning(&chat, "hey", &[&ben.id, &dan.id]))).await;
    assert_eq!(violated_fields(&refused.unwrap_err()), ["mention_user_ids[1]"]);
    assert_eq!(listed(c, ben, &chat).await, (1, 0, 1), "newest seq unchanged, no mention");
    // Malformed ids and too many users are named before any lookup.
    let bad = c.messages().send_message(authed(ann, mentioning(&chat, "hey", &[&ben.id, "@cat"]))).await;
    assert_eq!(violated_fields(&bad.unwrap_err()), ["mention_user_ids[1]"]);
    let many: Vec<String> = (0..51).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let bad = c.messages().send_message(authed(ann, mentioning(&chat, "hey", &many))).await;
    assert_eq!(violated_fields(&bad.unwrap_err()), ["mention_user_ids"]);
    // A member who leaves can no longer be mentioned, but a retry of a send
    // that mentioned them still answers the original message; an outsider
    // cannot send at all, mentions or not.
    let mut to_cat = mentioning(&chat, "cat, stay", &[&cat.id]);
    to_cat.message_id = uuid::Uuid::now_v7().to_string();
    let sent = c.messages().send_message(authed(ben, to_cat.clone())).await.unwrap().into_inner().message.unwrap();
    let leave = cpb::RemoveMemberRequest { chat_id: chat.clone(), user_id: cat.id.clone() };
    c.chats().remove_member(authed(cat, leave)).await.unwrap();
    let refused = c.messages().send_message(authed(ben, mentioning(&chat, "cat?", &[&cat.id]))).await;
    assert_eq!(violated_fields(&refused.unwrap_err()), ["mention_user_ids[0]"]);
    let retried = c.messages().send_message(authed(ben, to_cat)).await.unwrap().into_inner().message.unwrap();
    assert_eq!((retried.id, retried.seq, retried.mention_user_ids), (sent.id, sent.seq, sent.mention_user_ids));
    let outsider = c.messages().send_message(authed(dan, mentioning(&chat, "me", &[&ann.id]))).await;
    assert_eq!(code(outsider), Code::PermissionDenied);
    assert_eq!(listed(c, ann, &chat).await, (1, 0, 2), "only the one retried message more");
}

//! SearchMessages: only the caller's current chats (never one they left),
//! in step with edits and deletes, with snippets; paging without gaps or
//! repeats; bad queries name their field and never reach the engine.

use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_testkit::{Cluster, TestUser, authed};
use tonic::{Code, Status};

use crate::chats::{direct, send};
use crate::{code, violated_fields};

crate::both_modes!(
    search_finds_only_the_callers_current_chats,
    search_follows_edits_and_deletes_and_pages_without_gaps,
    bad_searches_name_the_field_and_no_query_is_engine_syntax,
    an_accent_typed_either_way_is_found_either_way,
);

/// Searches as `user`.
async fn search(
    c: &Cluster,
    user: &TestUser,
    r: mpb::SearchMessagesRequest,
) -> Result<mpb::SearchMessagesResponse, Status> {
    Ok(c.messages().search_messages(authed(user, r)).await?.into_inner())
}

/// The texts `user` finds for `query` (in chat `chat_id`, "" for all),
/// newest first, one page.
async fn texts(c: &Cluster, user: &TestUser, query: &str, chat_id: &str) -> Vec<String> {
    let r = mpb::SearchMessagesRequest { query: query.into(), chat_id: chat_id.into(), ..Default::default() };
    let found = search(c, user, r).await.unwrap();
    found.results.into_iter().map(|r| r.message.unwrap().text).collect()
}

async fn search_finds_only_the_callers_current_chats(c: &Cluster) {
    let (a, b, cc) = (c.user("alice").await, c.user("bob").await, c.user("carol").await);
    let ab = direct(c, &a, &b).await;
    let bc = direct(c, &b, &cc).await;
    let create = cpb::CreateChatRequest { title: "left".into(), member_ids: vec![b.id.clone()], ..Default::default() };
    let left = c.chats().create_chat(authed(&cc, create)).await.unwrap().into_inner().chat.unwrap();
    send(c, &a, &ab.id, "a zebra for bob").await;
    send(c, &cc, &bc.id, "a zebra from carol").await;
    send(c, &cc, &left.id, "an old zebra bob saw").await;
    send(c, &b, &left.id, "bob's own zebra, before he left").await;
    let leave = cpb::RemoveMemberRequest { chat_id: left.id.clone(), user_id: b.id.clone() };
    c.chats().remove_member(authed(&b, leave)).await.unwrap();
    send(c, &cc, &left.id, "a new zebra bob never saw").await;

    assert_eq!(texts(c, &b, "zebra", "").await, ["a zebra from carol", "a zebra for bob"], "bob: never the left chat");
    assert_eq!(texts(c, &a, "zebra", "").await, ["a zebra for bob"], "alice: never bob and carol's chat");
    assert_eq!(texts(c, &cc, "zebra", "").await.len(), 4, "carol: her two chats");
    assert_eq!(texts(c, &b, "zebra", &ab.id).await, ["a zebra for bob"]);
    assert_eq!(code(search(c, &b, by_chat("zebra", &left.id)).await), Code::PermissionDenied);
    assert_eq!(code(search(c, &a, by_chat("zebra", &bc.id)).await), Code::PermissionDenied);
    let nowhere = uuid::Uuid::now_v7().to_string();
    assert_eq!(code(search(c, &a, by_chat("zebra", &nowhere)).await), Code::NotFound);
    // The snippet marks the matched words.
    let found = search(c, &a, by_chat("zebra BOB", &ab.id)).await.unwrap();
    assert_eq!(found.results[0].snippet, "a «zebra» for «bob»");
    assert_eq!(found.results[0].message.as_ref().unwrap().chat_id, ab.id);
}

fn by_chat(query: &str, chat_id: &str) -> mpb::SearchMessagesRequest {
    mpb::SearchMessagesRequest { query: query.into(), chat_id: chat_id.into(), ..Default::default() }
}

async fn search_follows_edits_and_deletes_and_pages_without_gaps(c: &Cluster) {
    let (a, b) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &a, &b).await;
    let mut sent = Vec::new();
    for i in 1..=5 {
        sent.push(send(c, &a, &chat.id, &format!("lunch {}", "lunch ".repeat(i))).await);
    }
    for order_by in ["", "send_time desc", "relevance"] {
        let mut walked = Vec::new();
        let mut token = String::new();
        loop {
            let r = mpb::SearchMessagesRequest {
                query: "lunch".into(),
                page_size: 1,
                page_token: token.clone(),
                order_by: order_by.into(),
                ..Default::default()
            };
            let page = search(c, &b, r).await.unwrap();
            assert!(page.results.len() <= 1);
            walked.extend(page.results.into_iter().map(|r| r.message.unwrap().seq));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        // Newest first; by relevance, more of the word first: the same here.
        assert_eq!(walked, [5, 4, 3, 2, 1], "order_by {order_by:?}");
    }
    // A token belongs to its query.
    let first = search(c, &b, mpb::SearchMessagesRequest { query: "lunch".into(), page_size: 1, ..Default::default() });
    let token = first.await.unwrap().next_page_token;
    let other = mpb::SearchMessagesRequest { query: "dinner".into(), page_token: token, ..Default::default() };
    assert_eq!(violated_fields(&search(c, &b, other).await.unwrap_err()), ["page_token"]);

    // An edit: the old word is not found, the new one is.
    let edit = mpb::EditMessageRequest { message_id: sent[0].id.clone(), text: "brunch instead".into() };
    c.messages().edit_message(authed(&a, edit)).await.unwrap();
    assert_eq!(texts(c, &b, "lunch", "").await.len(), 4);
    assert_eq!(texts(c, &b, "brunch", "").await, ["brunch instead"]);
    // A delete: gone.
    let delete = mpb::DeleteMessageRequest { message_id: sent[0].id.clone() };
    c.messages().delete_message(authed(&a, delete)).await.unwrap();
    assert!(texts(c, &b, "brunch", "").await.is_empty());
}

async fn bad_searches_name_the_field_and_no_query_is_engine_syntax(c: &Cluster) {
    let (a, b) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &a, &b).await;
    send(c, &a, &chat.id, "NEAR the end: col AND rank").await;
    let bad = |query: &str| mpb::SearchMessagesRequest { query: query.into(), ..Default::default() };
    for query in ["", "   ", "\"unbalanced", "*", "--", "ab*", &"w ".repeat(17), &"x".repeat(257)] {
        assert_eq!(violated_fields(&search(c, &a, bad(query)).await.unwrap_err()), ["query"], "{query:?}");
    }
    let r = mpb::SearchMessagesRequest { query: "".into(), order_by: "oldest".into(), ..Default::default() };
    assert_eq!(violated_fields(&search(c, &a, r).await.unwrap_err()), ["query", "order_by"]);
    let r =
        mpb::SearchMessagesRequest { query: "x".into(), chat_id: "chat".into(), page_size: -1, ..Default::default() };
    assert_eq!(violated_fields(&search(c, &a, r).await.unwrap_err()), ["chat_id", "page_size"]);
    // What would be FTS5 or tsquery syntax is text.
    for query in [
        "NEAR(the end)",
        "col:end",
        "end AND",
        "OR",
        "NOT near",
        "^near",
        "-near +end",
        "{col rank}",
        "'near'",
        "near'' \"\"",
        "end & rank | !near <-> col:*",
        "rank:1",
        "\"\"",
    ] {
        let found = search(c, &a, bad(query)).await;
        match found {
            Ok(_) => {}
            Err(status) => assert_eq!(status.code(), Code::InvalidArgument, "{query:?}: {status:?}"),
        }
    }
    assert_eq!(texts(c, &a, "NEAR(the end)", "").await.len(), 1, "the words near, the, end");
    assert_eq!(texts(c, &a, "col AND rank", "").await.len(), 1);
    assert!(texts(c, &a, "near OR nothing", "").await.is_empty(), "OR is a word, not an operator");
}

/// "é" sent as one character or as "e" and a combining accent (as macOS
/// input often sends it) looks the same: either query finds either text,
/// on both engines. Texts are stored in NFC.
async fn an_accent_typed_either_way_is_found_either_way(c: &Cluster) {
    let (a, b) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &a, &b).await;
    let (composed, decomposed) = ("my r\u{e9}sum\u{e9}", "your re\u{301}sume\u{301}");
    send(c, &a, &chat.id, composed).await;
    let sent = send(c, &b, &chat.id, decomposed).await;
    assert_eq!(sent.text, "your r\u{e9}sum\u{e9}", "stored in NFC");
    for query in ["r\u{e9}sum\u{e9}", "re\u{301}sume\u{301}", "resume"] {
        assert_eq!(texts(c, &a, query, &chat.id).await.len(), 2, "{query:?}");
    }
}

//! Unread and mention counts against a brute-force model over random
//! operation sequences (send with random mentions, now and then in a thread
//! of a random earlier message, delete, mark read, leave, rejoin): a
//! property test with fixed seeds, so a failure names the seed that
//! reproduces it. Thread replies count like any message; a thread's root's
//! reply count is checked against the model too.

use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_testkit::{Cluster, TestUser, authed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

crate::both_modes!(
    unread_counts_match_a_brute_force_model,
    unread_counts_stop_at_a_thousand,
    read_positions_are_listed_for_members_to_members_a_page_at_a_time,
    read_positions_past_many_who_left_all_come_through_once,
    private_read_receipts_reach_only_the_readers_own_streams_and_list,
    a_block_hides_read_receipts_both_ways,
    a_private_readers_join_tells_no_one_else_how_far_they_have_read,
);

/// The model: what unread and mention counts must be.
#[derive(Default)]
struct Model {
    /// (author index, deleted) per seq - 1.
    messages: Vec<(usize, bool)>,
    /// The users each message mentions, per seq - 1.
    mentioned: Vec<Vec<usize>>,
    /// The root of the thread each message replies in (0: none), per seq - 1.
    roots: Vec<i64>,
    members: Vec<bool>,
    read: Vec<i64>,
}

impl Model {
    fn head(&self) -> i64 {
        self.messages.len() as i64
    }

    fn unread(&self, user: usize) -> i64 {
        self.messages
            .iter()
            .enumerate()
            .filter(|(i, (author, deleted))| *i as i64 + 1 > self.read[user] && *author != user && !deleted)
            .count() as i64
    }

    /// The root a send naming `seq` in a thread joins (None: refused, the
    /// root is deleted).
    fn root_of(&self, seq: i64) -> Option<i64> {
        let named = (seq - 1) as usize;
        let root = if self.roots[named] > 0 { self.roots[named] } else { seq };
        (!self.messages[(root - 1) as usize].1).then_some(root)
    }

    /// The live replies of the thread of `root`.
    fn replies(&self, root: i64) -> i32 {
        self.roots.iter().zip(&self.messages).filter(|(r, (_, deleted))| **r == root && !deleted).count() as i32
    }

    fn mentions(&self, user: usize) -> i64 {
        self.messages
            .iter()
            .zip(&self.mentioned)
            .enumerate()
            .filter(|(i, ((author, deleted), mentioned))| {
                *i as i64 + 1 > self.read[user] && *author != user && !deleted && mentioned.contains(&user)
            })
            .count() as i64
    }
}

async fn unread_counts_match_a_brute_force_model(c: &Cluster) {
    let users: Vec<TestUser> = futures::future::join_all(["own", "u1", "u2", "u3"].map(|n| c.user(n))).await;
    let (mut refused, mut threaded) = (0, 0);
    for seed in 0..8u64 {
        let (r, t) = run_sequence(c, &users, seed, 40).await;
        (refused, threaded) = (refused + r, threaded + t);
    }
    assert!(refused > 0, "the sequences mention someone who left now and then");
    assert!(threaded > 0, "the sequences reply in threads now and then");
}

/// Runs one random sequence; returns how many sends were refused for
/// mentioning a non-member, and how many thread replies were stored.
async fn run_sequence(c: &Cluster, users: &[TestUser], seed: u64, steps: usize) -> (usize, usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let request = cpb::CreateChatRequest {
        title: format!("prop {seed}"),
        member_ids: users[1..].iter().map(|u| u.id.clone()).collect(),
        ..Default::default()
    };
    let chat = c.chats().create_chat(authed(&users[0], request)).await.unwrap().into_inner().chat.unwrap();
    let mut model = Model { members: vec![true; users.len()], read: vec![0; users.len()], ..Model::default() };
    let mut ids: Vec<String> = Vec::new();
    let mut log: Vec<String> = Vec::new();
    let (mut refused, mut threaded) = (0, 0);
    for step in 0..steps {
        let u = rng.random_range(0..users.len());
        let op = rng.random_range(0..10);
        match op {
            // Send (most common), mentioning anyone now and then, the
            // author too: mentioning someone who left is refused and
            // writes nothing (the next send's seq shows it).
            0..=3 if model.members[u] => {
                let mentioned: Vec<usize> = (0..users.len()).filter(|_| rng.random_range(0..3) == 0).collect();
                // A third of the sends reply in the thread of an earlier
                // message (a reply's seq joins its root's thread; a
                // deleted root refuses it).
                let named = if model.head() > 0 && rng.random_range(0..3) == 0 {
                    rng.random_range(1..=model.head())
                } else {
                    0
                };
                let m = mpb::SendMessageRequest {
                    chat_id: chat.id.clone(),
                    text: format!("s{step}"),
                    mention_user_ids: mentioned.iter().map(|&i| users[i].id.clone()).collect(),
                    thread_root_seq: named,
                    ..Default::default()
                };
                let sent = c.messages().send_message(authed(&users[u], m)).await;
                let gone: Vec<String> = (0..mentioned.len())
                    .filter(|&n| !model.members[mentioned[n]])
                    .map(|n| format!("mention_user_ids[{n}]"))
                    .collect();
                if !gone.is_empty() {
                    let status = sent.expect_err("a mention of a non-member");
                    assert_eq!(crate::violated_fields(&status), gone, "seed {seed}: after {log:?}");
                    log.push(format!("u{u} mentions {mentioned:?}, not all members"));
                    refused += 1;
                    continue;
                }
                let root = if named > 0 { model.root_of(named) } else { Some(0) };
                let Some(root) = root else {
                    let status = sent.expect_err("a reply in the thread of a deleted root");
                    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "seed {seed}: after {log:?}");
                    log.push(format!("u{u} replies to {named}, whose root is deleted"));
                    continue;
                };
                let sent = sent.unwrap().into_inner().message.unwrap();
                assert_eq!(sent.thread_root_seq, root, "seed {seed}: the thread joined, after {log:?}");
                let ids_sent: Vec<String> = mentioned.iter().map(|&i| users[i].id.clone()).collect();
                assert_eq!(sent.mention_user_ids, ids_sent, "seed {seed}: the message carries its mentions");
                model.messages.push((u, false));
                model.mentioned.push(mentioned.clone());
                model.roots.push(root);
                assert_eq!(sent.seq, model.head(), "seed {seed}: seq");
                ids.push(sent.id);
                log.push(format!("u{u} sends {} mentioning {mentioned:?} in thread {root}", sent.seq));
                if root > 0 {
                    threaded += 1;
                    let get = mpb::GetMessageRequest { message_id: ids[(root - 1) as usize].clone() };
                    let got = c.messages().get_message(authed(&users[u], get)).await.unwrap().into_inner();
                    let count = got.message.unwrap().thread.map_or(0, |t| t.reply_count);
                    assert_eq!(count, model.replies(root), "seed {seed}: root {root}'s replies after {log:?}");
                }
            }
            // Delete one of one's own live messages.
            4 | 5 if model.members[u] => {
                let own: Vec<usize> = (0..model.messages.len()).filter(|i| model.messages[*i] == (u, false)).collect();
                if own.is_empty() {
                    continue;
                }
                let i = own[rng.random_range(0..own.len())];
                let d = mpb::DeleteMessageRequest { message_id: ids[i].clone() };
                c.messages().delete_message(authed(&users[u], d)).await.unwrap();
                model.messages[i].1 = true;
                log.push(format!("u{u} deletes {}", i + 1));
            }
            // Mark read somewhere in (or past) the history.
            6 | 7 if model.members[u] => {
                let seq = rng.random_range(0..=model.head() + 2);
                let r = mpb::MarkReadRequest { chat_id: chat.id.clone(), seq };
                let read = c.messages().mark_read(authed(&users[u], r)).await.unwrap().into_inner();
                model.read[u] = model.read[u].max(seq.min(model.head()));
                log.push(format!("u{u} reads to {seq}"));
                assert_eq!(read.read_seq, model.read[u], "seed {seed}: read_seq after {log:?}");
                assert_eq!(read.unread_count, model.unread(u), "seed {seed}: MarkRead unread after {log:?}");
            }
            // Leave (not the owner) or be added back by the owner.
            8 | 9 if u != 0 => {
                if model.members[u] {
                    let r = cpb::RemoveMemberRequest { chat_id: chat.id.clone(), user_id: users[u].id.clone() };
                    c.chats().remove_member(authed(&users[u], r)).await.unwrap();
                    model.members[u] = false;
                    log.push(format!("u{u} leaves"));
                } else {
                    let r = cpb::AddMembersRequest { chat_id: chat.id.clone(), user_ids: vec![users[u].id.clone()] };
                    c.chats().add_members(authed(&users[0], r)).await.unwrap();
                    model.members[u] = true;
                    model.read[u] = model.head();
                    log.push(format!("u{u} rejoins"));
                }
            }
            _ => continue,
        }
        // Every member's unread and mention counts, as ListChats and
        // GetChat show them.
        for (i, user) in users.iter().enumerate().filter(|(i, _)| model.members[*i]) {
            let get = cpb::GetChatRequest { chat_id: chat.id.clone(), ..Default::default() };
            let shown = c.chats().get_chat(authed(user, get)).await.unwrap().into_inner().chat.unwrap();
            assert_eq!(shown.unread_count, model.unread(i), "seed {seed}: u{i} GetChat unread after {log:?}");
            assert_eq!(shown.mention_count, model.mentions(i), "seed {seed}: u{i} GetChat mentions after {log:?}");
            let listed = c
                .chats()
                .list_chats(authed(user, cpb::ListChatsRequest { page_size: 1, ..Default::default() }))
                .await
                .unwrap()
                .into_inner();
            let first = listed.chats.first().expect("the chat");
            if first.id == chat.id {
                assert_eq!(first.unread_count, model.unread(i), "seed {seed}: u{i} ListChats unread after {log:?}");
                let mentions = model.mentions(i);
                assert_eq!(first.mention_count, mentions, "seed {seed}: u{i} ListChats mentions after {log:?}");
            }
        }
    }
    (refused, threaded)
}

/// Unread counts count up to 1,000 (a client shows "999+"): a member 1,005
/// messages behind sees 1,000 in ListChats and from MarkRead until fewer
/// than 1,000 are left, then the exact count.
async fn unread_counts_stop_at_a_thousand(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let request =
        cpb::CreateChatRequest { title: "busy".into(), member_ids: vec![bob.id.clone()], ..Default::default() };
    let chat = c.chats().create_chat(authed(&alice, request)).await.unwrap().into_inner().chat.unwrap().id;
    for batch in 0..5 {
        let sends = (0..201).map(|i| {
            let m =
                mpb::SendMessageRequest { chat_id: chat.clone(), text: format!("{batch}/{i}"), ..Default::default() };
            let mut messages = c.messages();
            let request = authed(&alice, m);
            async move { messages.send_message(request).await.unwrap() }
        });
        futures::future::join_all(sends).await;
    }
    let listed = c.chats().list_chats(authed(&bob, cpb::ListChatsRequest::default())).await.unwrap().into_inner();
    assert_eq!(listed.chats[0].unread_count, 1000, "1,005 unread count as 1,000");
    assert_eq!(listed.chats[0].last_message.as_ref().unwrap().seq, 1005);
    let mark = |seq| mpb::MarkReadRequest { chat_id: chat.clone(), seq };
    let read = c.messages().mark_read(authed(&bob, mark(4))).await.unwrap().into_inner();
    assert_eq!((read.read_seq, read.unread_count), (4, 1000), "1,001 left");
    let read = c.messages().mark_read(authed(&bob, mark(6))).await.unwrap().into_inner();
    assert_eq!((read.read_seq, read.unread_count), (6, 999), "999 left: exact again");
    let listed = c.chats().list_chats(authed(&bob, cpb::ListChatsRequest::default())).await.unwrap().into_inner();
    assert_eq!(listed.chats[0].unread_count, 999);
}

/// The chat's read positions as `user` lists them, a page of `page_size`
/// at a time: (user id, read_seq) in order, and how many pages it took.
async fn read_positions(c: &Cluster, user: &TestUser, chat: &str, page_size: i32) -> (Vec<(String, i64)>, usize) {
    let (mut all, mut pages, mut token) = (Vec::new(), 0, String::new());
    loop {
        let request = mpb::ListReadPositionsRequest { chat_id: chat.to_owned(), page_size, page_token: token.clone() };
        let page = c.messages().list_read_positions(authed(user, request)).await.expect("a page").into_inner();
        all.extend(page.read_positions.into_iter().map(|r| (r.user_id, r.read_seq)));
        pages += 1;
        if page.next_page_token.is_empty() {
            return (all, pages);
        }
        token = page.next_page_token;
    }
}

/// Read receipts: each member of a group sees how far every member has
/// read, a page at a time; one who left is no longer listed (and leaves no
/// empty page behind); an outsider sees nothing; a
/// page token of another chat, or a garbled one, is refused by name.
async fn read_positions_are_listed_for_members_to_members_a_page_at_a_time(c: &Cluster) {
    let users = futures::future::join_all(["ann", "ben", "cat", "dan"].map(|n| c.user(n))).await;
    let (ann, ben, cat, dan) = (&users[0], &users[1], &users[2], &users[3]);
    let chat = crate::mentions::group(c, ann, &[ben, cat]).await;
    for text in ["one", "two", "three"] {
        crate::chats::send(c, ann, &chat, text).await;
    }
    let mark = |seq| mpb::MarkReadRequest { chat_id: chat.clone(), seq };
    c.messages().mark_read(authed(ben, mark(3))).await.unwrap();
    c.messages().mark_read(authed(cat, mark(1))).await.unwrap();

    // Ann wrote all three but marked nothing: her own messages do not move
    // her position (they are never unread to her).
    let mut expected = vec![(ann.id.clone(), 0), (ben.id.clone(), 3), (cat.id.clone(), 1)];
    expected.sort();
    assert_eq!(read_positions(c, ben, &chat, 0).await, (expected.clone(), 1), "everyone, by user id");
    assert_eq!(read_positions(c, cat, &chat, 1).await, (expected.clone(), 3), "a page at a time");

    let outsider = mpb::ListReadPositionsRequest { chat_id: chat.clone(), ..Default::default() };
    let denied = c.messages().list_read_positions(authed(dan, outsider)).await;
    assert_eq!(crate::code(denied), tonic::Code::PermissionDenied);

    // Cat leaves: her position is kept for a return, but listed to no one.
    let leave = cpb::RemoveMemberRequest { chat_id: chat.clone(), user_id: cat.id.clone() };
    c.chats().remove_member(authed(cat, leave)).await.unwrap();
    expected.retain(|(user, _)| *user != cat.id);
    assert_eq!(read_positions(c, ann, &chat, 0).await.0, expected);
    // Pages skip her too, and none comes back empty or promises a page
    // with nothing on it: two pages of one for the two left listed.
    assert_eq!(read_positions(c, ann, &chat, 1).await, (expected.clone(), 2), "pages skip her too");

    let first = mpb::ListReadPositionsRequest { chat_id: chat.clone(), page_size: 1, ..Default::default() };
    let token = c.messages().list_read_positions(authed(ann, first)).await.unwrap().into_inner().next_page_token;
    let other = crate::mentions::group(c, ann, &[ben]).await;
    for page_token in [token, "garbled".to_owned()] {
        let request = mpb::ListReadPositionsRequest { chat_id: other.clone(), page_size: 1, page_token };
        let refused = c.messages().list_read_positions(authed(ann, request)).await.unwrap_err();
        assert_eq!(
            (refused.code(), crate::violated_fields(&refused)),
            (tonic::Code::InvalidArgument, vec!["page_token".to_owned()])
        );
    }
}

/// Eight of ten members leave (their positions are kept for a return).
/// Listed a page of one at a time, the two left come through, each once
/// and in order, in at most three pages, wherever the eight fall in
/// user-id order: a page reads on past them for up to four store reads
/// (`READ_POSITION_ROUNDS`), and its next token picks up where those
/// reads stopped.
async fn read_positions_past_many_who_left_all_come_through_once(c: &Cluster) {
    let names = ["ann", "ben", "cat", "dan", "eve", "fay", "gus", "hal", "ivy", "jon"];
    let users = futures::future::join_all(names.map(|n| c.user(n))).await;
    let (ann, others) = (&users[0], &users[1..]);
    let chat = crate::mentions::group(c, ann, &others.iter().collect::<Vec<_>>()).await;
    let stays = others.iter().max_by(|a, b| a.id.cmp(&b.id)).expect("nine others");
    for user in others.iter().filter(|u| u.id != stays.id) {
        let leave = cpb::RemoveMemberRequest { chat_id: chat.clone(), user_id: user.id.clone() };
        c.chats().remove_member(authed(user, leave)).await.unwrap();
    }
    let mut expected = vec![(ann.id.clone(), 0), (stays.id.clone(), 0)];
    expected.sort();
    let (listed, pages) = read_positions(c, ann, &chat, 1).await;
    assert_eq!(listed, expected, "each member listed once, none who left");
    assert!(pages <= 3, "{pages} pages for two");
}

/// Sets `user`'s privacy setting read_receipts.
async fn set_read_receipts(c: &Cluster, user: &TestUser, receipts: cpb::ReadReceipts) -> cpb::PrivacySettings {
    let request = cpb::UpdatePrivacySettingsRequest {
        settings: Some(cpb::PrivacySettings { read_receipts: receipts as i32, ..Default::default() }),
        update_mask: Some(natter_proto::FieldMask { paths: vec!["read_receipts".into()] }),
    };
    c.chats().update_privacy_settings(authed(user, request)).await.unwrap().into_inner().settings.unwrap()
}

/// The next read_updated of `stream` (other events skipped): whose, and
/// how far.
async fn next_read(stream: &mut tonic::Streaming<mpb::StreamEventsResponse>) -> (String, i64) {
    loop {
        if let Some(mpb::stream_events_response::Event::ReadUpdated(r)) = crate::stream::next(stream).await.event {
            return (r.user_id, r.read_seq);
        }
    }
}

/// Private read receipts (the privacy setting read_receipts NOBODY): how
/// far ben has read reaches his own other devices, and no one else's
/// stream or ListReadPositions; his unread count is unchanged; back to
/// EVERYONE, his position is listed again at once. An unspecified value
/// is refused by name.
async fn private_read_receipts_reach_only_the_readers_own_streams_and_list(c: &Cluster) {
    let users = futures::future::join_all(["ann", "ben", "cat"].map(|n| c.user(n))).await;
    let (ann, ben, cat) = (&users[0], &users[1], &users[2]);
    let chat = crate::mentions::group(c, ann, &[ben, cat]).await;
    for text in ["one", "two", "three"] {
        crate::chats::send(c, ann, &chat, text).await;
    }
    let defaults = c.chats().get_privacy_settings(authed(ben, cpb::GetPrivacySettingsRequest {})).await.unwrap();
    assert_eq!(defaults.into_inner().settings.unwrap().read_receipts, cpb::ReadReceipts::Everyone as i32);
    let private = set_read_receipts(c, ben, cpb::ReadReceipts::Nobody).await;
    assert_eq!(private.read_receipts, cpb::ReadReceipts::Nobody as i32);
    assert_eq!(private.group_adds, cpb::GroupAdds::Everyone as i32, "the others are kept");

    let mut anns = crate::stream::open(c, ann, &[&chat], &[]).await;
    let mut bens = crate::stream::open(c, ben, &[&chat], &[]).await;
    let mark = |seq| mpb::MarkReadRequest { chat_id: chat.clone(), seq };
    let read = c.messages().mark_read(authed(ben, mark(2))).await.unwrap().into_inner();
    assert_eq!((read.read_seq, read.unread_count), (2, 1), "his own count as before");
    c.messages().mark_read(authed(cat, mark(1))).await.unwrap();
    assert_eq!(next_read(&mut bens).await, (ben.id.clone(), 2), "his other device follows");
    assert_eq!(next_read(&mut anns).await, (cat.id.clone(), 1), "ann hears cat's, published after his, only");

    let mut others = vec![(ann.id.clone(), 0), (cat.id.clone(), 1)];
    others.sort();
    assert_eq!(read_positions(c, ann, &chat, 0).await.0, others, "ben left out");
    assert_eq!(read_positions(c, cat, &chat, 1).await.0, others, "pages skip him too");
    let mut all = [others.clone(), vec![(ben.id.clone(), 2)]].concat();
    all.sort();
    assert_eq!(read_positions(c, ben, &chat, 0).await.0, all, "his own is listed to him");

    set_read_receipts(c, ben, cpb::ReadReceipts::Everyone).await;
    assert_eq!(read_positions(c, ann, &chat, 0).await.0, all, "shown again at once");
    c.messages().mark_read(authed(ben, mark(3))).await.unwrap();
    assert_eq!(next_read(&mut anns).await, (ben.id.clone(), 3), "and heard live again");

    let unspecified = cpb::UpdatePrivacySettingsRequest {
        settings: Some(cpb::PrivacySettings::default()),
        update_mask: Some(natter_proto::FieldMask { paths: vec!["read_receipts".into()] }),
    };
    let bad = c.chats().update_privacy_settings(authed(ben, unspecified)).await.unwrap_err();
    assert_eq!(crate::violated_fields(&bad), ["settings.read_receipts"]);
}

/// A direct chat closed by a block (BlockUser) shows neither member how far
/// the other has read: not live, not listed; their own positions are
/// unchanged. Unblocked, they are listed again.
async fn a_block_hides_read_receipts_both_ways(c: &Cluster) {
    let (ann, ben) = (c.user("ann").await, c.user("ben").await);
    let chat = crate::chats::direct(c, &ann, &ben).await.id;
    for text in ["one", "two"] {
        crate::chats::send(c, &ann, &chat, text).await;
    }
    crate::chats::send(c, &ben, &chat, "three").await;
    let mut anns = crate::stream::open(c, &ann, &[&chat], &[]).await;
    let block = cpb::BlockUserRequest { user_id: ann.id.clone() };
    c.chats().block_user(authed(&ben, block)).await.unwrap();

    let mark = |seq| mpb::MarkReadRequest { chat_id: chat.clone(), seq };
    c.messages().mark_read(authed(&ben, mark(2))).await.unwrap();
    c.messages().mark_read(authed(&ann, mark(3))).await.unwrap();
    assert_eq!(next_read(&mut anns).await, (ann.id.clone(), 3), "her own, not his (published before hers)");
    assert_eq!(read_positions(c, &ann, &chat, 0).await.0, [(ann.id.clone(), 3)]);
    assert_eq!(read_positions(c, &ben, &chat, 0).await.0, [(ben.id.clone(), 2)], "nor hers to him");

    let unblock = cpb::UnblockUserRequest { user_id: ann.id.clone() };
    c.chats().unblock_user(authed(&ben, unblock)).await.unwrap();
    let mut both = vec![(ann.id.clone(), 3), (ben.id.clone(), 2)];
    both.sort();
    assert_eq!(read_positions(c, &ann, &chat, 0).await.0, both);
}

/// Joining a chat sets the joiner's read position (to the chat's newest
/// message), announced as a `read_updated`. For a user whose read receipts
/// are private that goes to their own streams only, as their MarkRead's
/// does: before, every member's stream heard it, a "seen" mark for someone
/// who turned them off.
async fn a_private_readers_join_tells_no_one_else_how_far_they_have_read(c: &Cluster) {
    if !crate::stream::crosses_services(c) {
        return;
    }
    let users = futures::future::join_all(["ann", "ben", "cat"].map(|n| c.user(n))).await;
    let (ann, ben, cat) = (&users[0], &users[1], &users[2]);
    let chat = crate::mentions::group(c, ann, &[ben]).await;
    crate::chats::send(c, ann, &chat, "before cat").await;
    set_read_receipts(c, cat, cpb::ReadReceipts::Nobody).await;
    let mut bens = crate::stream::open(c, ben, &[&chat], &[]).await;
    let add = cpb::AddMembersRequest { chat_id: chat.clone(), user_ids: vec![cat.id.clone()] };
    c.chats().add_members(authed(ann, add)).await.unwrap();
    crate::chats::send(c, ann, &chat, "after cat").await;
    loop {
        let event = crate::stream::next(&mut bens).await;
        if let Some(mpb::stream_events_response::Event::ReadUpdated(r)) = &event.event {
            assert_ne!(r.user_id, cat.id, "cat's read receipts are private: {event:?}");
        }
        if matches!(&event.event, Some(mpb::stream_events_response::Event::MessageCreated(m)) if m.text == "after cat")
        {
            break;
        }
    }
}

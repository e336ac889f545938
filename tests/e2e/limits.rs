//! Abuse limits as a client meets them: NUL and over-long strings refused
//! naming the field, rate limits answering RESOURCE_EXHAUSTED with a
//! RetryInfo, the log-in back-off, the edit cap and revision paging, and a
//! group of 250 members. Tight limits come from flags, per service.

use std::time::Duration;

use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_proto::sessions::v1 as spb;
use natter_testkit::{Cluster, Flags, TestUser, authed};
use tonic::Code;

use crate::chats::{direct, send};
use crate::messages::image;
use crate::{code, retry_delay, violated_fields};

crate::both_modes!(
    nul_in_any_stored_string_is_refused_naming_the_field,
    overlong_strings_are_refused_naming_the_field,
    a_refused_nul_message_never_reaches_the_batch,
);

/// The field a refused call names (panics unless INVALID_ARGUMENT).
#[track_caller]
fn field<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> String {
    let status = result.expect_err("call should fail");
    let fields = violated_fields(&status);
    assert_eq!(fields.len(), 1, "{status:?}");
    fields[0].clone()
}

async fn nul_in_any_stored_string_is_refused_naming_the_field(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &alice, &bob).await;
    let msg = |text: &str, attachments| mpb::SendMessageRequest {
        chat_id: chat.id.clone(),
        text: text.into(),
        attachments,
        ..Default::default()
    };
    let mut m = c.messages();
    assert_eq!(field(m.send_message(authed(&alice, msg("a\0b", vec![]))).await), "text");
    let bad_mime = mpb::Attachment { mime_type: "image/p\0g".into(), ..image() };
    assert_eq!(field(m.send_message(authed(&alice, msg("", vec![bad_mime]))).await), "attachments[0].mime_type");
    let bad_url = mpb::Attachment { url: "https://img.example/\0".into(), ..image() };
    assert_eq!(field(m.send_message(authed(&alice, msg("", vec![bad_url]))).await), "attachments[0].url");
    let sent = send(c, &alice, &chat.id, "clean").await;
    assert_eq!(sent.seq, 1, "nothing refused took a seq");
    let edit = mpb::EditMessageRequest { message_id: sent.id.clone(), text: "\0".into() };
    assert_eq!(field(m.edit_message(authed(&alice, edit)).await), "text");
    let report = mpb::ReportMessageRequest {
        message_id: sent.id.clone(),
        reason: mpb::ReportReason::Spam as i32,
        comment: "spam\0".into(),
    };
    assert_eq!(field(m.report_message(authed(&bob, report)).await), "comment");

    let mut chats = c.chats();
    let group = |title: &str, description: &str| cpb::CreateChatRequest {
        title: title.into(),
        description: description.into(),
        ..Default::default()
    };
    assert_eq!(field(chats.create_chat(authed(&alice, group("t\0", ""))).await), "title");
    assert_eq!(field(chats.create_chat(authed(&alice, group("t", "d\0"))).await), "description");
    let team = chats.create_chat(authed(&alice, group("team", ""))).await.unwrap().into_inner().chat.unwrap();
    let update = cpb::UpdateChatRequest {
        chat_id: team.id.clone(),
        chat: Some(cpb::Chat { description: "\0".into(), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["description".into()] }),
    };
    assert_eq!(field(chats.update_chat(authed(&alice, update)).await), "chat.description");
    let list = cpb::ListChatsRequest { query: "te\0".into(), ..Default::default() };
    assert_eq!(field(chats.list_chats(authed(&alice, list)).await), "query");

    let mut sessions = c.sessions();
    let user = |username: &str, password: &str, display_name: &str| spb::CreateUserRequest {
        username: username.into(),
        password: password.into(),
        display_name: display_name.into(),
    };
    assert_eq!(field(sessions.create_user(user("nu\0l", "long enough", "")).await), "username");
    assert_eq!(field(sessions.create_user(user("nul-pw", "long\0enough", "")).await), "password");
    assert_eq!(field(sessions.create_user(user("nul-dn", "long enough", "N\0")).await), "display_name");
    let login = |username: &str, password: &str| spb::CreateSessionRequest {
        username: username.into(),
        password: password.into(),
    };
    assert_eq!(field(sessions.create_session(login("al\0ce", "long enough")).await), "username");
    assert_eq!(field(sessions.create_session(login(&alice.username, "x\0")).await), "password");
    let get = spb::GetUserRequest { username: "b\0b".into(), ..Default::default() };
    assert_eq!(field(sessions.get_user(authed(&alice, get)).await), "username");
    let guest = c.guest().await;
    let claim = spb::ClaimAccountRequest {
        username: format!("g{}", &guest.id[..8]),
        password: "long enough".into(),
        display_name: "G\0".into(),
    };
    assert_eq!(field(sessions.claim_account(authed(&guest, claim)).await), "display_name");
}

async fn overlong_strings_are_refused_naming_the_field(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &alice, &bob).await;
    let with = |a: mpb::Attachment| mpb::SendMessageRequest {
        chat_id: chat.id.clone(),
        attachments: vec![a],
        ..Default::default()
    };
    let mut m = c.messages();
    // The attacker stored an 819 KB MIME type; 255 bytes is the most.
    let mime = mpb::Attachment { mime_type: format!("image/{}", "x".repeat(250)), ..image() };
    assert_eq!(field(m.send_message(authed(&alice, with(mime))).await), "attachments[0].mime_type");
    let fits = mpb::Attachment { mime_type: format!("image/{}", "x".repeat(249)), ..image() };
    m.send_message(authed(&alice, with(fits))).await.expect("255 bytes fit");
    let url = mpb::Attachment { url: format!("https://img.example/{}", "x".repeat(2048)), ..image() };
    assert_eq!(field(m.send_message(authed(&alice, with(url))).await), "attachments[0].url");

    let mut sessions = c.sessions();
    let user = |username: String, password: String, display_name: String| spb::CreateUserRequest {
        username,
        password,
        display_name,
    };
    let long = |n: usize| "x".repeat(n);
    assert_eq!(field(sessions.create_user(user(long(33), long(8), String::new())).await), "username");
    assert_eq!(field(sessions.create_user(user("pw-len".into(), long(1025), String::new())).await), "password");
    assert_eq!(field(sessions.create_user(user("dn-len".into(), long(8), long(101))).await), "display_name");
    // A megabyte password is refused before argon2 sees it.
    let login = spb::CreateSessionRequest { username: alice.username.clone(), password: long(1_000_000) };
    assert_eq!(field(sessions.create_session(login).await), "password");

    let mut chats = c.chats();
    let title = cpb::CreateChatRequest { title: long(201), ..Default::default() };
    assert_eq!(field(chats.create_chat(authed(&alice, title)).await), "title");
    let description = cpb::CreateChatRequest { title: "t".into(), description: long(2001), ..Default::default() };
    assert_eq!(field(chats.create_chat(authed(&alice, description)).await), "description");
    let query = cpb::ListChatsRequest { query: long(201), ..Default::default() };
    assert_eq!(field(chats.list_chats(authed(&alice, query)).await), "query");
    let token = cpb::ListChatsRequest { page_token: long(1025), ..Default::default() };
    assert_eq!(field(chats.list_chats(authed(&alice, token)).await), "page_token");
    let ids = mpb::StreamEventsRequest { chat_ids: vec![chat.id.clone(); 1001], ..Default::default() };
    assert_eq!(field(m.stream_events(authed(&alice, ids)).await), "chat_ids");
}

/// On PostgreSQL a NUL used to fail the whole group commit, sending every
/// other message of that batch through a commit of its own; now it is
/// refused before the batch, and the others commit with gap-free seqs.
async fn a_refused_nul_message_never_reaches_the_batch(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(c, &alice, &bob).await;
    let sends = (0..24).map(|i| {
        let text = if i % 4 == 0 { format!("bad\0{i}") } else { format!("good {i}") };
        let mut client = c.messages();
        let request = authed(
            if i % 2 == 0 { &alice } else { &bob },
            mpb::SendMessageRequest { chat_id: chat.id.clone(), text, ..Default::default() },
        );
        async move { client.send_message(request).await }
    });
    let results = futures::future::join_all(sends).await;
    let mut seqs = Vec::new();
    for (i, result) in results.into_iter().enumerate() {
        if i % 4 == 0 {
            assert_eq!(field(result), "text");
        } else {
            seqs.push(result.expect("a clean message commits").into_inner().message.unwrap().seq);
        }
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=18).collect::<Vec<_>>());
}

mod per_user {
    use super::*;

    pub(crate) const FLAGS: Flags<'static> = Flags {
        sessions: &["--username-lookup-rate", "2/1h", "--guest-username-lookup-rate", "3/1h"],
        chats: &["--create-chat-rate", "3/1h", "--chat-change-rate", "2/1h"],
        messages: &[
            "--send-message-rate",
            "4/1h",
            "--edit-message-rate",
            "2/1h",
            "--stream-open-rate",
            "2/1h",
            "--search-rate",
            "2/1h",
            "--mark-read-rate",
            "2/1h",
            "--moderation-rate",
            "2/1h",
        ],
        assistant: &[],
        edge: &[],
    };

    crate::both_modes!(flags = crate::limits::per_user::FLAGS; per_user_rates_refuse_with_retry_info);

    async fn per_user_rates_refuse_with_retry_info(c: &Cluster) {
        let (alice, bob) = (c.user("alice").await, c.user("bob").await);
        let mut chats = c.chats();
        let group = |i: usize| cpb::CreateChatRequest { title: format!("g{i}"), ..Default::default() };
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(chats.create_chat(authed(&alice, group(i))).await.expect("within the rate").into_inner());
        }
        let refused = chats.create_chat(authed(&alice, group(3))).await.unwrap_err();
        // One chat every 20 minutes comes back.
        assert!(retry_delay(&refused) > Duration::from_secs(19 * 60), "{refused:?}");
        chats.create_chat(authed(&bob, group(4))).await.expect("another user has a rate of their own");
        // Changes of a chat: each reaches every member's streams.
        let first = ids[1].chat.clone().unwrap().id;
        let archive = cpb::ArchiveChatRequest { chat_id: first.clone() };
        chats.archive_chat(authed(&alice, archive.clone())).await.expect("within the rate");
        chats.archive_chat(authed(&alice, archive.clone())).await.expect("a repeat, within the rate");
        let refused = chats.unarchive_chat(authed(&alice, cpb::UnarchiveChatRequest { chat_id: first })).await;
        assert!(retry_delay(&refused.unwrap_err()) > Duration::from_secs(29 * 60));

        let chat = ids[0].chat.clone().unwrap().id;
        let mut m = c.messages();
        let mut sent = Vec::new();
        for i in 0..4 {
            sent.push(send(c, &alice, &chat, &format!("m{i}")).await);
        }
        let request =
            mpb::SendMessageRequest { chat_id: chat.clone(), text: "one too many".into(), ..Default::default() };
        let refused = m.send_message(authed(&alice, request)).await.unwrap_err();
        assert!(retry_delay(&refused) > Duration::from_secs(14 * 60));
        let listed = m
            .list_messages(authed(&alice, mpb::ListMessagesRequest { chat_id: chat.clone(), ..Default::default() }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.messages.len(), 4, "the refused send stored nothing");

        let edit = |text: &str| mpb::EditMessageRequest { message_id: sent[0].id.clone(), text: text.into() };
        m.edit_message(authed(&alice, edit("e1"))).await.unwrap();
        m.edit_message(authed(&alice, edit("e2"))).await.unwrap();
        retry_delay(&m.edit_message(authed(&alice, edit("e3"))).await.unwrap_err());

        let search = || mpb::SearchMessagesRequest { query: "m1".into(), ..Default::default() };
        assert_eq!(m.search_messages(authed(&alice, search())).await.unwrap().into_inner().results.len(), 1);
        m.search_messages(authed(&alice, search())).await.unwrap();
        retry_delay(&m.search_messages(authed(&alice, search())).await.unwrap_err());
        m.search_messages(authed(&bob, search())).await.expect("another user has a rate of their own");

        let open = || mpb::StreamEventsRequest { chat_ids: vec![chat.clone()], ..Default::default() };
        let _first = m.stream_events(authed(&alice, open())).await.expect("first stream");
        let _second = m.stream_events(authed(&alice, open())).await.expect("second stream");
        retry_delay(&m.stream_events(authed(&alice, open())).await.unwrap_err());

        // Read markers; deletions and reports together.
        let mark = || mpb::MarkReadRequest { chat_id: chat.clone(), seq: 4 };
        m.mark_read(authed(&alice, mark())).await.expect("within the rate");
        m.mark_read(authed(&alice, mark())).await.expect("a repeat, within the rate");
        retry_delay(&m.mark_read(authed(&alice, mark())).await.unwrap_err());
        let bobs = code(m.mark_read(authed(&bob, mark())).await);
        assert_eq!(bobs, Code::PermissionDenied, "bob has a rate of his own (and is no member)");
        let delete = |i: usize| mpb::DeleteMessageRequest { message_id: sent[i].id.clone() };
        m.delete_message(authed(&alice, delete(3))).await.expect("within the rate");
        m.delete_message(authed(&alice, delete(2))).await.expect("within the rate");
        retry_delay(&m.delete_message(authed(&alice, delete(1))).await.unwrap_err());
        let kept = m.get_message(authed(&alice, mpb::GetMessageRequest { message_id: sent[1].id.clone() })).await;
        assert!(!kept.unwrap().into_inner().message.unwrap().deleted, "the refused deletion deleted nothing");

        // Finding people by username: a cap on enumerating usernames. By
        // id (unguessable) is not counted.
        let mut sessions = c.sessions();
        let by_name = || spb::GetUserRequest { username: bob.username.clone(), ..Default::default() };
        for _ in 0..2 {
            sessions.get_user(authed(&alice, by_name())).await.expect("within the rate");
        }
        let refused = sessions.get_user(authed(&alice, by_name())).await.unwrap_err();
        assert!(retry_delay(&refused) > Duration::from_secs(29 * 60), "{refused:?}");
        let by_id = spb::GetUserRequest { user_id: bob.id.clone(), ..Default::default() };
        sessions.get_user(authed(&alice, by_id)).await.expect("by id is not counted");
        sessions.get_user(authed(&bob, by_name())).await.expect("another user has a rate of their own");
        // Guests cost nothing to make: those at one address share a budget.
        let (first, second) = (c.guest().await, c.guest().await);
        for _ in 0..3 {
            sessions.get_user(authed(&first, by_name())).await.expect("within the rate");
        }
        let refused = sessions.get_user(authed(&second, by_name())).await.unwrap_err();
        assert!(retry_delay(&refused) > Duration::from_secs(19 * 60), "a new guest, the same budget: {refused:?}");
    }
}

mod stored_bytes {
    use super::*;

    pub(crate) const FLAGS: Flags<'static> =
        Flags { sessions: &[], chats: &[], messages: &["--stored-bytes-rate", "100/1h"], assistant: &[], edge: &[] };

    crate::both_modes!(flags = crate::limits::stored_bytes::FLAGS; stored_bytes_are_budgeted_per_user);

    /// A user's sends and edits draw on one budget of bytes (100 an hour
    /// here): a send past it is refused with RetryInfo and stores nothing,
    /// a smaller one still fits, an edit draws on the same budget, and
    /// another user has a budget of their own. Without it, one account
    /// could store about 95 GB a day at the default send rate.
    async fn stored_bytes_are_budgeted_per_user(c: &Cluster) {
        let (alice, bob) = (c.user("alice").await, c.user("bob").await);
        let chat = direct(c, &alice, &bob).await.id;
        let mut m = c.messages();
        let first = send(c, &alice, &chat, &"a".repeat(60)).await;

        let over = mpb::SendMessageRequest { chat_id: chat.clone(), text: "b".repeat(50), ..Default::default() };
        let refused = m.send_message(authed(&alice, over)).await.unwrap_err();
        // 10 bytes short at 100 an hour: about 6 minutes.
        assert!(retry_delay(&refused) > Duration::from_secs(5 * 60), "{refused:?}");
        let listed = m
            .list_messages(authed(&alice, mpb::ListMessagesRequest { chat_id: chat.clone(), ..Default::default() }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.messages.len(), 1, "the refused send stored nothing");

        send(c, &alice, &chat, &"c".repeat(40)).await;
        let edit = mpb::EditMessageRequest { message_id: first.id.clone(), text: "short".into() };
        let refused = m.edit_message(authed(&alice, edit)).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        let kept = m.get_message(authed(&alice, mpb::GetMessageRequest { message_id: first.id.clone() })).await;
        assert_eq!(
            kept.unwrap().into_inner().message.unwrap().text,
            "a".repeat(60),
            "the refused edit changed nothing"
        );

        send(c, &bob, &chat, &"d".repeat(90)).await;
    }
}

mod per_address {
    use super::*;

    pub(crate) const FLAGS: Flags<'static> = Flags {
        sessions: &["--create-session-rate", "5/1h", "--create-user-rate", "3/1h"],
        chats: &[],
        messages: &[],
        assistant: &[],
        edge: &[],
    };

    crate::both_modes!(flags = crate::limits::per_address::FLAGS; per_address_rates_refuse_with_retry_info);

    /// Every call of a test comes from 127.0.0.1 (through the edge in split
    /// mode), so one address's budget is what is spent here.
    async fn per_address_rates_refuse_with_retry_info(c: &Cluster) {
        let mut sessions = c.sessions();
        let user = |i: usize| spb::CreateUserRequest {
            username: format!("u{i}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            password: "correct horse battery".into(),
            display_name: String::new(),
        };
        // ClaimAccount makes a password user too: it spends the same budget
        // (each one hashes a password, which holds a core).
        let (first, second) = (c.guest().await, c.guest().await);
        let claim = |request: spb::CreateUserRequest| spb::ClaimAccountRequest {
            username: request.username,
            password: request.password,
            display_name: String::new(),
        };
        let mut usernames = Vec::new();
        let request = user(0);
        usernames.push(request.username.clone());
        sessions.claim_account(authed(&first, claim(request))).await.expect("within the rate");
        for i in 1..3 {
            let request = user(i);
            usernames.push(request.username.clone());
            sessions.create_user(request).await.expect("within the rate");
        }
        retry_delay(&sessions.create_user(user(3)).await.unwrap_err());
        retry_delay(&sessions.claim_account(authed(&second, claim(user(4)))).await.unwrap_err());

        // The readiness probe of the test kit and the two guests spent
        // three CreateSessions.
        let mut admitted = 0;
        let refused = loop {
            match sessions.create_session(spb::CreateSessionRequest::default()).await {
                Ok(_) => admitted += 1,
                Err(status) => break status,
            }
            assert!(admitted <= 5, "more guests than the rate allows");
        };
        assert!((2..=3).contains(&admitted), "{admitted} guests");
        assert!(retry_delay(&refused) > Duration::from_secs(11 * 60), "{refused:?}");
        // Password log-ins share the address's CreateSession budget.
        let login =
            spb::CreateSessionRequest { username: usernames[0].clone(), password: "correct horse battery".into() };
        retry_delay(&sessions.create_session(login).await.unwrap_err());
    }
}

mod login {
    use super::*;

    pub(crate) const FLAGS: Flags<'static> = Flags {
        sessions: &["--login-backoff", "300ms", "--login-free-failures", "0"],
        chats: &[],
        messages: &[],
        assistant: &[],
        edge: &[],
    };

    crate::both_modes!(flags = crate::limits::login::FLAGS; failed_log_ins_back_off_and_the_right_password_then_works);

    async fn failed_log_ins_back_off_and_the_right_password_then_works(c: &Cluster) {
        let alice = c.user("alice").await;
        assert_eq!(code(super::log_in(c, &alice, None, "wrong guess 1").await), Code::Unauthenticated);
        // Even the right password waits out the back-off from this address.
        let refused = super::log_in(c, &alice, None, "correct horse battery").await.unwrap_err();
        let wait = retry_delay(&refused);
        assert!(wait <= Duration::from_millis(300), "{wait:?}");
        // Waiting as long as RetryInfo says is enough.
        tokio::time::sleep(wait).await;
        assert_eq!(code(super::log_in(c, &alice, None, "wrong guess 2").await), Code::Unauthenticated);
        // The second failure in a row doubles the wait.
        let wait = retry_delay(&super::log_in(c, &alice, None, "wrong guess 3").await.unwrap_err());
        assert!(wait > Duration::from_millis(300) && wait <= Duration::from_millis(600), "{wait:?}");
        tokio::time::sleep(wait).await;
        super::log_in(c, &alice, None, "correct horse battery").await.expect("the owner logs in");
        // Success cleared the record: a mistype now waits only the base.
        assert_eq!(code(super::log_in(c, &alice, None, "typo").await), Code::Unauthenticated);
        let wait = retry_delay(&super::log_in(c, &alice, None, "typo").await.unwrap_err());
        assert!(wait <= Duration::from_millis(300), "{wait:?}");
    }
}

/// CreateSession as `user` with `password`, from `address` when given (as
/// natter's edge would forward it).
async fn log_in(
    c: &Cluster,
    user: &TestUser,
    address: Option<&str>,
    password: &str,
) -> Result<spb::CreateSessionResponse, tonic::Status> {
    let attempt = spb::CreateSessionRequest { username: user.username.clone(), password: password.into() };
    let request = match address {
        Some(address) => from(address, attempt),
        None => tonic::Request::new(attempt),
    };
    Ok(c.sessions().create_session(request).await?.into_inner())
}

/// A request from `address`, as natter's edge would forward it.
fn from<T>(address: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-forwarded-for", address.parse().expect("ascii"));
    request
}

mod failed_auth {
    use super::*;

    /// The test is a trusted proxy, so `x-forwarded-for` picks each call's
    /// address: at the all-in-one's door, or at the edge's in split mode.
    pub(crate) const FLAGS: Flags<'static> =
        Flags { edge: &["--failed-auth-rate", "4/1h", "--trusted-proxies", "127.0.0.0/8,::1"], ..Flags::NONE };

    crate::both_modes!(flags = crate::limits::failed_auth::FLAGS; random_tokens_cut_off_their_address_only);

    /// `message` with `token` from the client at `address`.
    fn from_with<T>(address: &str, token: &str, message: T) -> tonic::Request<T> {
        let mut request = from(address, message);
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
        request
    }

    async fn random_tokens_cut_off_their_address_only(c: &Cluster) {
        let (alice, bob) = (c.user("alice").await, c.user("bob").await);
        let (guesser, neighbour) = ("192.0.2.1", "198.51.100.2");
        let mut sessions = c.sessions();
        let current = |address: &str, token: &str| {
            let mut sessions = c.sessions();
            let request = from_with(address, token, spb::GetCurrentSessionRequest::default());
            async move { sessions.get_current_session(request).await.map(|r| r.into_inner()) }
        };
        // Bob, behind the same address as the guesser, used his session
        // before the guessing began: his first call drew on the budget of
        // four, his token is proven since.
        current(guesser, &bob.token).await.expect("bob's session works");
        for i in 0..3 {
            let token = uuid::Uuid::new_v4().simple().to_string();
            assert_eq!(code(current(guesser, &token).await), Code::Unauthenticated, "guess {i}");
        }
        // Now every call with a token not proven from that address is
        // refused at the door, on every service, even a good one not yet
        // seen...
        let refused = current(guesser, &alice.token).await.unwrap_err();
        assert!(retry_delay(&refused) > Duration::from_secs(60), "refused until a check refills: {refused:?}");
        assert!(refused.message().contains("checks of new or failed tokens from this address"), "{refused:?}");
        let listed = c.chats().list_chats(from_with(guesser, &alice.token, cpb::ListChatsRequest::default())).await;
        assert_eq!(code(listed), Code::ResourceExhausted, "the chats service too");
        // A token sent along with a log-in is not counted, nor refused.
        let log_in =
            spb::CreateSessionRequest { username: alice.username.clone(), password: "correct horse battery".into() };
        sessions.create_session(from_with(guesser, "stale", log_in)).await.expect("a log-in is never refused here");
        // ...but not a token that passed a check lately: bob goes on.
        let me = current(guesser, &bob.token).await.expect("a proven session is not held back");
        assert_eq!(me.user.expect("user").id, bob.id);
        c.chats().list_chats(from_with(guesser, &bob.token, cpb::ListChatsRequest::default())).await.expect("bob");
        // A call without a token from that address still gets in: a guest.
        sessions
            .create_session(from(guesser, spb::CreateSessionRequest::default()))
            .await
            .expect("a call without a token is not refused");
        // The neighbour is not touched: a good token works, a bad one is
        // just UNAUTHENTICATED.
        let me = current(neighbour, &alice.token).await.expect("another address is not refused");
        assert_eq!(me.user.expect("user").id, alice.id);
        assert_eq!(code(current(neighbour, "not-a-token").await), Code::Unauthenticated);
    }
}

// Per-address behaviour needs distinct addresses, which only a trusted
// `x-forwarded-for` gives a test on one machine: these run on the
// all-in-one only (in split mode the edge stands between, and it decides
// that header).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guesser_elsewhere_neither_gets_far_nor_locks_the_owner_out() {
    let c = Cluster::all_in_one(&[
        "--trust-forwarded-for",
        "--login-backoff",
        "1h",
        "--login-backoff-max",
        "2h",
        "--login-free-failures",
        "0",
    ])
    .await;
    let alice = c.user("alice").await;
    assert_eq!(code(log_in(&c, &alice, Some("192.0.2.1"), "guess 1").await), Code::Unauthenticated);
    let refused = log_in(&c, &alice, Some("192.0.2.1"), "guess 2").await.unwrap_err();
    assert!(retry_delay(&refused) > Duration::from_secs(59 * 60), "an hour's wait: {refused:?}");
    log_in(&c, &alice, Some("198.51.100.7"), "correct horse battery").await.expect("the owner, elsewhere, logs in");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_from_many_addresses_share_a_budget_per_username() {
    let c = Cluster::all_in_one(&[
        "--trust-forwarded-for",
        "--login-backoff",
        "0s",
        "--login-retry-rate",
        "2/1h",
        "--login-free-failures",
        "0",
    ])
    .await;
    let alice = c.user("alice").await;
    for guess in ["a1", "a2", "a3"] {
        let result = log_in(&c, &alice, Some("192.0.2.1"), guess).await;
        assert_eq!(code(result), Code::Unauthenticated, "the first attempt and two retries");
    }
    retry_delay(&log_in(&c, &alice, Some("192.0.2.1"), "a4").await.unwrap_err());
    // Another address gets one guess, then the spent budget stops it too.
    assert_eq!(code(log_in(&c, &alice, Some("192.0.2.2"), "b1").await), Code::Unauthenticated);
    let refused = log_in(&c, &alice, Some("192.0.2.2"), "b2").await.unwrap_err();
    assert!(refused.message().contains("log-in attempts for this username"), "{refused:?}");
    log_in(&c, &alice, Some("198.51.100.7"), "correct horse battery").await.expect("a clean address is not refused");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_come_slower_than_log_ins() {
    let c = Cluster::all_in_one(&["--create-guest-rate", "2/1h"]).await;
    let alice = c.user("alice").await;
    c.guest().await;
    c.guest().await;
    let refused = c.sessions().create_session(spb::CreateSessionRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("guests created from this address"), "{refused:?}");
    retry_delay(&refused);
    log_in(&c, &alice, None, "correct horse battery").await.expect("a log-in is no guest");
    c.stop().await;
}

/// A flood of log-ins (unknown usernames each cost a full Argon2 check,
/// as known ones do) from many addresses: past --password-check-queue the
/// server refuses at once instead of making every caller wait in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_password_checks_is_refused_not_queued() {
    use futures::StreamExt as _;
    let c = Cluster::all_in_one(&["--trust-forwarded-for", "--password-check-queue", "4"]).await;
    let attempts: Vec<Result<spb::CreateSessionResponse, tonic::Status>> = futures::stream::iter(0..48)
        .map(|i| {
            let mut sessions = c.sessions();
            async move {
                let attempt =
                    spb::CreateSessionRequest { username: format!("nobody-{i}"), password: "whatever12".into() };
                Ok(sessions.create_session(from(&format!("192.0.2.{i}"), attempt)).await?.into_inner())
            }
        })
        .buffer_unordered(48)
        .collect()
        .await;
    let codes: Vec<Code> = attempts.iter().map(|a| a.as_ref().map_or_else(tonic::Status::code, |_| Code::Ok)).collect();
    let busy = attempts.iter().filter_map(|a| a.as_ref().err()).filter(|s| s.code() == Code::ResourceExhausted);
    assert!(busy.clone().count() > 0, "some refused at once: {codes:?}");
    assert!(busy.clone().all(|s| s.message().contains("password checks")), "{codes:?}");
    assert!(codes.iter().all(|c| matches!(c, Code::Unauthenticated | Code::ResourceExhausted)), "{codes:?}");
    // Once the flood is over, log-ins are checked again.
    let alice = c.user("alice").await;
    log_in(&c, &alice, Some("198.51.100.7"), "correct horse battery").await.expect("the owner logs in");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_when_trusted() {
    let guests = |c: &Cluster| {
        let mut sessions = c.sessions();
        async move {
            let mut codes = Vec::new();
            for i in 1..=6 {
                let request = from(&format!("192.0.2.{i}"), spb::CreateSessionRequest::default());
                codes.push(sessions.create_session(request).await.map(drop).map_err(|s| s.code()));
            }
            codes
        }
    };
    let untrusting = Cluster::all_in_one(&["--create-session-rate", "4/1h"]).await;
    let codes = guests(&untrusting).await;
    assert!(codes.contains(&Err(Code::ResourceExhausted)), "a forged header buys no budget: {codes:?}");
    untrusting.stop().await;
    let trusting = Cluster::all_in_one(&["--create-session-rate", "4/1h", "--trust-forwarded-for"]).await;
    assert!(guests(&trusting).await.iter().all(Result::is_ok), "one budget per forwarded address");
    trusting.stop().await;
    // Behind an ingress (here: the test, on loopback): the client it names.
    let proxied = Cluster::all_in_one(&["--create-session-rate", "4/1h", "--trusted-proxies", "127.0.0.0/8,::1"]).await;
    assert!(guests(&proxied).await.iter().all(Result::is_ok), "one budget per client behind a trusted proxy");
    proxied.stop().await;
    // A proxy elsewhere is trusted, the caller is not: its header buys nothing.
    let elsewhere = Cluster::all_in_one(&["--create-session-rate", "4/1h", "--trusted-proxies", "10.0.0.0/8"]).await;
    let codes = guests(&elsewhere).await;
    assert!(codes.contains(&Err(Code::ResourceExhausted)), "a forged header buys no budget: {codes:?}");
    elsewhere.stop().await;
}

mod revisions {
    use super::*;

    pub(crate) const FLAGS: Flags<'static> =
        Flags { sessions: &[], chats: &[], messages: &["--max-message-edits", "60"], assistant: &[], edge: &[] };

    crate::both_modes!(flags = crate::limits::revisions::FLAGS; edits_are_capped_and_revisions_come_in_pages);

    async fn revisions_page(
        c: &Cluster,
        user: &TestUser,
        message_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<i32>, String), tonic::Status> {
        let request = mpb::ListMessageRevisionsRequest {
            message_id: message_id.to_owned(),
            page_size,
            page_token: page_token.to_owned(),
        };
        let page = c.messages().list_message_revisions(authed(user, request)).await?.into_inner();
        Ok((page.revisions.iter().map(|r| r.revision).collect(), page.next_page_token))
    }

    async fn edits_are_capped_and_revisions_come_in_pages(c: &Cluster) {
        let (alice, bob) = (c.user("alice").await, c.user("bob").await);
        let chat = direct(c, &alice, &bob).await;
        let message = send(c, &alice, &chat.id, "v1").await;
        let edit = |i: usize| mpb::EditMessageRequest { message_id: message.id.clone(), text: format!("v{i}") };
        let mut m = c.messages();
        for i in 2..=61 {
            m.edit_message(authed(&alice, edit(i))).await.expect("within the edit cap");
        }
        let refused = m.edit_message(authed(&alice, edit(62))).await.unwrap_err();
        assert_eq!(crate::quota_subject(&refused), format!("message:{}", message.id));
        let current = m
            .get_message(authed(&bob, mpb::GetMessageRequest { message_id: message.id.clone() }))
            .await
            .unwrap()
            .into_inner()
            .message
            .unwrap();
        assert_eq!((current.revision, current.text.as_str()), (61, "v61"), "the refused edit changed nothing");

        // Default page: 50, then the rest with the current text last.
        let (first, token) = revisions_page(c, &bob, &message.id, 0, "").await.unwrap();
        assert_eq!(first, (1..=50).collect::<Vec<_>>());
        let (rest, end) = revisions_page(c, &bob, &message.id, 0, &token).await.unwrap();
        assert_eq!((rest, end.as_str()), ((51..=61).collect::<Vec<_>>(), ""));
        // Small pages walk every revision once; large ones are capped at 200.
        let (mut walked, mut token) = (Vec::new(), String::new());
        loop {
            let (page, next) = revisions_page(c, &bob, &message.id, 7, &token).await.unwrap();
            assert!(page.len() <= 7);
            walked.extend(page);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(walked, (1..=61).collect::<Vec<_>>());
        assert_eq!(revisions_page(c, &bob, &message.id, 500, "").await.unwrap().0.len(), 61);
        // A token is bound to its message.
        let other = send(c, &alice, &chat.id, "other").await;
        let (_, token) = revisions_page(c, &bob, &message.id, 3, "").await.unwrap();
        let status = revisions_page(c, &bob, &other.id, 3, &token).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["page_token"]);
    }
}

mod members {
    use super::*;

    pub(crate) const FLAGS: Flags<'static> = Flags {
        sessions: &["--create-session-rate", "off", "--create-guest-rate", "off"],
        chats: &[],
        messages: &[],
        assistant: &[],
        edge: &[],
    };

    crate::both_modes!(flags = crate::limits::members::FLAGS; groups_of_hundreds_are_created_and_grown);

    async fn guests(c: &Cluster, n: usize) -> Vec<String> {
        use futures::StreamExt as _;
        futures::stream::iter(0..n).map(|_| async { c.guest().await.id }).buffer_unordered(16).collect().await
    }

    /// CreateChat with 250 members used to fail: the sessions look-up behind
    /// it took at most 200 ids.
    async fn groups_of_hundreds_are_created_and_grown(c: &Cluster) {
        let owner = c.guest().await;
        let request =
            cpb::CreateChatRequest { title: "big".into(), member_ids: guests(c, 250).await, ..Default::default() };
        let chat =
            c.chats().create_chat(authed(&owner, request)).await.expect("250 members").into_inner().chat.unwrap();
        assert_eq!(chat.member_count, 251);
        let add = cpb::AddMembersRequest { chat_id: chat.id.clone(), user_ids: guests(c, 250).await };
        let added = c.chats().add_members(authed(&owner, add)).await.expect("250 more").into_inner();
        assert_eq!(added.members.len(), 250);
        let get = cpb::GetChatRequest { chat_id: chat.id.clone(), message_page_size: 0 };
        assert_eq!(c.chats().get_chat(authed(&owner, get)).await.unwrap().into_inner().chat.unwrap().member_count, 501);
        // A missing user among them is still named.
        let ghost = uuid::Uuid::now_v7().to_string();
        let mut ids = guests(c, 3).await;
        ids.push(ghost.clone());
        let add = cpb::AddMembersRequest { chat_id: chat.id.clone(), user_ids: ids };
        let status = c.chats().add_members(authed(&owner, add)).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains(&ghost), "{status:?}");
    }
}

//! Registration, log-in, guests, tokens and revocation.

use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_proto::sessions::v1 as spb;
use natter_testkit::{Cluster, authed, with_token};
use tonic::Code;

use crate::{code, violated_fields};

crate::both_modes!(
    password_login_and_current_session,
    guest_sessions_are_guests,
    wrong_password_and_taken_username_are_refused,
    bad_input_names_the_field,
    missing_or_bad_tokens_are_unauthenticated_everywhere,
    revoked_token_fails_at_once_in_every_service,
    sessions_list_newest_first_and_users_resolve,
    guests_claim_their_account_and_keep_their_chats,
    a_person_deletes_their_account_and_leaves_their_chats,
    a_guest_deletes_its_account_without_a_password,
    a_deleted_account_leaves_no_row_under_its_id_in_the_messages_store,
    people_change_their_display_name_and_only_their_own,
    names_that_hide_or_reorder_text_are_refused,
    a_password_change_ends_every_other_session,
    a_retried_password_change_is_answered_as_it_went,
);

/// UpdateUser: a user renames themselves (an empty name is their
/// username again), everyone sees the new name, and nobody renames
/// anyone else; bad masks and names are refused naming the field.
async fn people_change_their_display_name_and_only_their_own(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let rename = |user: &natter_testkit::TestUser, id: &str, name: &str| {
        let request = spb::UpdateUserRequest {
            user: Some(spb::User { id: id.to_owned(), display_name: name.to_owned(), ..Default::default() }),
            update_mask: Some(natter_proto::FieldMask { paths: vec!["display_name".into()] }),
        };
        let (mut sessions, request) = (c.sessions(), authed(user, request));
        async move { sessions.update_user(request).await }
    };
    let renamed = rename(&alice, "", "  Alice Liddell ").await.unwrap().into_inner().user.unwrap();
    assert_eq!((renamed.id.as_str(), renamed.display_name.as_str()), (alice.id.as_str(), "Alice Liddell"));
    let request = spb::GetUserRequest { user_id: alice.id.clone(), ..Default::default() };
    let seen = c.sessions().get_user(authed(&bob, request)).await.unwrap().into_inner().user.unwrap();
    assert_eq!(seen.display_name, "Alice Liddell", "bob sees it");
    let again = rename(&alice, &alice.id, "").await.unwrap().into_inner().user.unwrap();
    assert_eq!(again.display_name, alice.username, "empty: the username");

    let bob_name = |c: &Cluster| {
        let (mut sessions, request) = (c.sessions(), authed(&bob, spb::GetCurrentSessionRequest {}));
        async move { sessions.get_current_session(request).await.unwrap().into_inner().user.unwrap().display_name }
    };
    let before = bob_name(c).await;
    assert_eq!(code(rename(&bob, &alice.id, "Mallory").await), Code::PermissionDenied);
    let long = "x".repeat(101);
    assert_eq!(violated_fields(&rename(&alice, "", &long).await.unwrap_err()), ["user.display_name"]);
    assert_eq!(violated_fields(&rename(&alice, "", "a\u{7}b").await.unwrap_err()), ["user.display_name"]);
    let no_mask = spb::UpdateUserRequest { user: Some(spb::User::default()), update_mask: None };
    assert_eq!(violated_fields(&c.sessions().update_user(authed(&alice, no_mask)).await.unwrap_err()), ["update_mask"]);
    let username = spb::UpdateUserRequest {
        user: Some(spb::User { username: "mallory".into(), ..Default::default() }),
        update_mask: Some(natter_proto::FieldMask { paths: vec!["username".into()] }),
    };
    let refused = c.sessions().update_user(authed(&alice, username)).await.unwrap_err();
    assert_eq!(violated_fields(&refused), ["update_mask.paths[0]"]);
    assert_eq!(bob_name(c).await, before, "bob's name untouched");
    let alice_now = c.sessions().get_current_session(authed(&alice, spb::GetCurrentSessionRequest {})).await.unwrap();
    assert_eq!(alice_now.into_inner().user.unwrap().display_name, alice.username, "no refused rename landed");
}

/// A display name or a chat title holding a character that hides or
/// reorders text where it is shown (a right-to-left override that makes
/// "alice" of "al\u{202E}ecila", a zero-width space that makes a second
/// "bob", a Hangul filler that looks empty) is refused INVALID_ARGUMENT
/// naming the field, in CreateUser, UpdateUser, CreateChat and
/// UpdateChat, and nothing is stored; an emoji sequence joined by U+200D
/// and a name in a right-to-left script are kept as given. Before, only
/// control characters were refused.
async fn names_that_hide_or_reorder_text_are_refused(c: &Cluster) {
    let alice = c.user("alice").await;
    let bob = c.user("bob").await;
    let create = |name: &str| spb::CreateUserRequest {
        username: format!("sp{}", &uuid::Uuid::now_v7().simple().to_string()[20..]),
        password: "long enough".into(),
        display_name: name.into(),
    };
    for name in ["al\u{202E}ecila", "b\u{200B}ob", "\u{3164}", "a\u{2066}b\u{2069}"] {
        let refused = c.sessions().create_user(create(name)).await.unwrap_err();
        assert_eq!(violated_fields(&refused), ["display_name"], "{name:?}");
        let rename = spb::UpdateUserRequest {
            user: Some(spb::User { display_name: name.into(), ..Default::default() }),
            update_mask: Some(natter_proto::FieldMask { paths: vec!["display_name".into()] }),
        };
        let refused = c.sessions().update_user(authed(&alice, rename)).await.unwrap_err();
        assert_eq!(violated_fields(&refused), ["user.display_name"], "{name:?}");
        let titled = cpb::CreateChatRequest {
            kind: cpb::ChatKind::Group as i32,
            title: format!("team {name}"),
            member_ids: vec![bob.id.clone()],
            ..Default::default()
        };
        let refused = c.chats().create_chat(authed(&alice, titled)).await.unwrap_err();
        assert_eq!(violated_fields(&refused), ["title"], "{name:?}");
    }
    let shown = "👩\u{200D}💻 مریم";
    let made = c.sessions().create_user(create(shown)).await.unwrap().into_inner();
    assert_eq!(made.user.unwrap().display_name, shown, "kept as given");
    let group = cpb::CreateChatRequest {
        kind: cpb::ChatKind::Group as i32,
        title: shown.into(),
        member_ids: vec![bob.id.clone()],
        ..Default::default()
    };
    let chat = c.chats().create_chat(authed(&alice, group)).await.unwrap().into_inner().chat.unwrap();
    assert_eq!(chat.title, shown);
    let retitle = cpb::UpdateChatRequest {
        chat_id: chat.id.clone(),
        chat: Some(cpb::Chat { id: chat.id.clone(), title: "al\u{202E}ecila".into(), ..Default::default() }),
        update_mask: Some(natter_proto::FieldMask { paths: vec!["title".into()] }),
    };
    let refused = c.chats().update_chat(authed(&alice, retitle)).await.unwrap_err();
    assert_eq!(violated_fields(&refused), ["chat.title"]);
    let get = cpb::GetChatRequest { chat_id: chat.id.clone(), ..Default::default() };
    let now = c.chats().get_chat(authed(&alice, get)).await.unwrap().into_inner().chat.unwrap();
    assert_eq!(now.title, shown, "nothing stored");
    let me = c.sessions().get_current_session(authed(&alice, spb::GetCurrentSessionRequest {})).await.unwrap();
    assert_eq!(me.into_inner().user.unwrap().display_name, "alice", "no refused rename landed");
}

/// ChangePassword: confirmed with the current password (a wrong one is
/// PERMISSION_DENIED and changes nothing); then the new one logs in, the
/// old one no longer does, every other session ends at once in every
/// service, its open stream too, and the caller's session goes on.
async fn a_password_change_ends_every_other_session(c: &Cluster) {
    let alice = c.user("alice").await;
    let login = |password: &str| {
        let request = spb::CreateSessionRequest { username: alice.username.clone(), password: password.to_owned() };
        let mut sessions = c.sessions();
        async move { sessions.create_session(request).await }
    };
    let phone = login("correct horse battery").await.unwrap().into_inner();
    let mut stream = c
        .messages()
        .stream_events(with_token(&phone.token, mpb::StreamEventsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let change = |current: &str, new: &str| {
        let request = spb::ChangePasswordRequest { current_password: current.to_owned(), new_password: new.to_owned() };
        let (mut sessions, request) = (c.sessions(), authed(&alice, request));
        async move { sessions.change_password(request).await }
    };

    assert_eq!(code(change("wrong horse battery", "a new horse battery").await), Code::PermissionDenied);
    c.chats().list_chats(with_token(&phone.token, cpb::ListChatsRequest::default())).await.unwrap();
    assert_eq!(violated_fields(&change("correct horse battery", "short").await.unwrap_err()), ["new_password"]);
    assert_eq!(violated_fields(&change("", "a new horse battery").await.unwrap_err()), ["current_password"]);

    change("correct horse battery", "a new horse battery").await.unwrap();
    // The phone's session ended everywhere, its stream too.
    assert_eq!(
        code(c.chats().list_chats(with_token(&phone.token, cpb::ListChatsRequest::default())).await),
        Code::Unauthenticated
    );
    let send =
        mpb::SendMessageRequest { chat_id: uuid::Uuid::now_v7().to_string(), text: "x".into(), ..Default::default() };
    assert_eq!(code(c.messages().send_message(with_token(&phone.token, send)).await), Code::Unauthenticated);
    let ended = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    // The caller's session goes on; the new password logs in, the old not.
    c.chats().list_chats(authed(&alice, cpb::ListChatsRequest::default())).await.unwrap();
    login("a new horse battery").await.unwrap();
    assert_eq!(code(login("correct horse battery").await), Code::Unauthenticated);

    // A guest has no password to change.
    let guest = c.guest().await;
    let request =
        spb::ChangePasswordRequest { current_password: "x".into(), new_password: "a new horse battery".into() };
    assert_eq!(code(c.sessions().change_password(authed(&guest, request)).await), Code::FailedPrecondition);
}

/// ChangePassword sent again by a client on a bad network: once with the
/// first still under way (it timed out waiting), once after it (its answer
/// lost). The password changed, so each is answered OK, not as a wrong
/// current password (which would tell the user the change failed); the new
/// password logs in and the old does not. Only the session that made the
/// change, with the same new password, is answered so: another new password,
/// or another session of the user that only knows the old one, is refused
/// as before.
async fn a_retried_password_change_is_answered_as_it_went(c: &Cluster) {
    const OLD: &str = "correct horse battery";
    const NEW: &str = "a new horse battery";
    let alice = c.user("alice").await;
    let login = |password: &str| {
        let request = spb::CreateSessionRequest { username: alice.username.clone(), password: password.to_owned() };
        let mut sessions = c.sessions();
        async move { sessions.create_session(request).await }
    };
    let change = |token: &str, current: &str, new: &str| {
        let request = spb::ChangePasswordRequest { current_password: current.to_owned(), new_password: new.to_owned() };
        let (mut sessions, request) = (c.sessions(), with_token(token, request));
        async move { sessions.change_password(request).await }
    };

    let (first, again) = tokio::join!(change(&alice.token, OLD, NEW), change(&alice.token, OLD, NEW));
    first.unwrap();
    again.unwrap();
    change(&alice.token, OLD, NEW).await.unwrap();
    c.chats().list_chats(authed(&alice, cpb::ListChatsRequest::default())).await.unwrap();
    assert_eq!(code(login(OLD).await), Code::Unauthenticated);
    let tablet = login(NEW).await.unwrap().into_inner();

    // Not a retry: another new password, or another session.
    assert_eq!(code(change(&alice.token, OLD, "another horse battery").await), Code::PermissionDenied);
    assert_eq!(code(change(&tablet.token, OLD, NEW).await), Code::PermissionDenied);
    login(NEW).await.unwrap();
}

async fn password_login_and_current_session(c: &Cluster) {
    let alice = c.user("alice").await;
    let current =
        c.sessions().get_current_session(authed(&alice, spb::GetCurrentSessionRequest {})).await.unwrap().into_inner();
    let user = current.user.unwrap();
    assert_eq!(user.id, alice.id);
    assert_eq!(user.username, alice.username);
    assert!(!user.guest);
    assert_eq!(user.kind, spb::UserKind::Human as i32);
    let session = current.session.unwrap();
    assert_eq!(session.id, alice.session_id);
    assert!(session.current);
    assert!(session.expire_time.unwrap().seconds > session.create_time.unwrap().seconds);
    // Usernames are case-insensitive at log-in.
    let again = c
        .sessions()
        .create_session(spb::CreateSessionRequest {
            username: alice.username.to_uppercase(),
            password: "correct horse battery".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.user.unwrap().id, alice.id);
    assert_ne!(again.token, alice.token);
}

async fn guest_sessions_are_guests(c: &Cluster) {
    let guest = c.guest().await;
    let current =
        c.sessions().get_current_session(authed(&guest, spb::GetCurrentSessionRequest {})).await.unwrap().into_inner();
    let user = current.user.unwrap();
    assert!(user.guest);
    assert_eq!(user.kind, spb::UserKind::Guest as i32);
    assert!(user.username.is_empty());
    assert!(user.display_name.starts_with("Guest"));
    assert_eq!(guest.token.len(), 43, "256-bit base64url token");
    let other = c.guest().await;
    assert_ne!(other.id, guest.id);
}

async fn wrong_password_and_taken_username_are_refused(c: &Cluster) {
    let alice = c.user("alice").await;
    let wrong = c
        .sessions()
        .create_session(spb::CreateSessionRequest {
            username: alice.username.clone(),
            password: "not the password".into(),
        })
        .await;
    assert_eq!(code(wrong), Code::Unauthenticated);
    let unknown = c
        .sessions()
        .create_session(spb::CreateSessionRequest { username: "nobody-here".into(), password: "whatever1".into() })
        .await;
    assert_eq!(code(unknown), Code::Unauthenticated);
    let taken = c
        .sessions()
        .create_user(spb::CreateUserRequest {
            username: alice.username.to_uppercase(),
            password: "another password".into(),
            display_name: String::new(),
        })
        .await;
    assert_eq!(code(taken), Code::AlreadyExists);
}

async fn bad_input_names_the_field(c: &Cluster) {
    let short = c
        .sessions()
        .create_user(spb::CreateUserRequest {
            username: "ab".into(),
            password: "long enough".into(),
            display_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&short), ["username"]);
    let weak = c
        .sessions()
        .create_user(spb::CreateUserRequest {
            username: "carol-x".into(),
            password: "short".into(),
            display_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&weak), ["password"]);
    let half = c
        .sessions()
        .create_session(spb::CreateSessionRequest { username: "carol-x".into(), password: String::new() })
        .await;
    assert_eq!(violated_fields(&half.unwrap_err()), ["password"]);
}

async fn missing_or_bad_tokens_are_unauthenticated_everywhere(c: &Cluster) {
    let no_token = c.chats().list_chats(cpb::ListChatsRequest::default()).await;
    assert_eq!(code(no_token), Code::Unauthenticated);
    let bogus = c.messages().mark_read(with_token("not-a-token", mpb::MarkReadRequest::default())).await;
    assert_eq!(code(bogus), Code::Unauthenticated);
    let mut basic = tonic::Request::new(spb::GetCurrentSessionRequest {});
    basic.metadata_mut().insert("authorization", "Basic YWxpY2U6cHc=".parse().unwrap());
    assert_eq!(code(c.sessions().get_current_session(basic).await), Code::Unauthenticated);
}

async fn revoked_token_fails_at_once_in_every_service(c: &Cluster) {
    let alice = c.user("alice").await;
    let phone = c
        .sessions()
        .create_session(spb::CreateSessionRequest {
            username: alice.username.clone(),
            password: "correct horse battery".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Both sessions work.
    c.chats().list_chats(authed(&alice, cpb::ListChatsRequest::default())).await.unwrap();
    c.chats().list_chats(with_token(&phone.token, cpb::ListChatsRequest::default())).await.unwrap();
    // Log out the current one: it fails at once in sessions, chats and messages.
    c.sessions().revoke_session(authed(&alice, spb::RevokeSessionRequest::default())).await.unwrap();
    assert_eq!(
        code(c.sessions().get_current_session(authed(&alice, spb::GetCurrentSessionRequest {})).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(c.chats().list_chats(authed(&alice, cpb::ListChatsRequest::default())).await),
        Code::Unauthenticated
    );
    let send =
        mpb::SendMessageRequest { chat_id: uuid::Uuid::now_v7().to_string(), text: "x".into(), ..Default::default() };
    assert_eq!(code(c.messages().send_message(authed(&alice, send)).await), Code::Unauthenticated);
    // The other session still works, until "all" logs out everywhere.
    c.chats().list_chats(with_token(&phone.token, cpb::ListChatsRequest::default())).await.unwrap();
    c.sessions()
        .revoke_session(with_token(&phone.token, spb::RevokeSessionRequest { all: true, ..Default::default() }))
        .await
        .unwrap();
    assert_eq!(
        code(c.chats().list_chats(with_token(&phone.token, cpb::ListChatsRequest::default())).await),
        Code::Unauthenticated
    );
}

async fn sessions_list_newest_first_and_users_resolve(c: &Cluster) {
    let alice = c.user("alice").await;
    for _ in 0..2 {
        c.sessions()
            .create_session(spb::CreateSessionRequest {
                username: alice.username.clone(),
                password: "correct horse battery".into(),
            })
            .await
            .unwrap();
    }
    let first = c
        .sessions()
        .list_sessions(authed(&alice, spb::ListSessionsRequest { page_size: 2, ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.sessions.len(), 2);
    assert!(first.sessions[0].id > first.sessions[1].id, "newest first");
    let rest = c
        .sessions()
        .list_sessions(authed(&alice, spb::ListSessionsRequest { page_size: 2, page_token: first.next_page_token }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.sessions.len(), 1);
    assert!(rest.next_page_token.is_empty());
    assert!(rest.sessions[0].current, "the oldest is the test's own session");

    let bob = c.user("bob").await;
    let by_name = c
        .sessions()
        .get_user(authed(&alice, spb::GetUserRequest { username: bob.username.clone(), ..Default::default() }))
        .await
        .unwrap();
    assert_eq!(by_name.into_inner().user.unwrap().id, bob.id);
    let missing = uuid::Uuid::now_v7().to_string();
    let batch = c
        .sessions()
        .batch_get_users(authed(
            &alice,
            spb::BatchGetUsersRequest { user_ids: vec![bob.id.clone(), missing, alice.id.clone()] },
        ))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = batch.users.iter().map(|u| u.id.as_str()).collect();
    assert_eq!(ids, [bob.id.as_str(), alice.id.as_str()]);
}

async fn guests_claim_their_account_and_keep_their_chats(c: &Cluster) {
    let guest = c.guest().await;
    let friend = c.user("friend").await;
    let chat = crate::chats::direct(c, &guest, &friend).await;
    crate::chats::send(c, &guest, &chat.id, "hi, I am new").await;
    let username = format!("claimed-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let claim = spb::ClaimAccountRequest {
        username: username.clone(),
        password: "my new password".into(),
        display_name: "Newcomer".into(),
    };
    let claimed = c.sessions().claim_account(authed(&guest, claim.clone())).await.unwrap().into_inner();
    let user = claimed.user.unwrap();
    assert_eq!(
        (user.id.as_str(), user.guest, user.username.as_str(), user.display_name.as_str()),
        (guest.id.as_str(), false, username.as_str(), "Newcomer")
    );
    assert_eq!(user.kind, spb::UserKind::Human as i32, "a claimed guest is a person with a password");
    // The guest token ends (whoever else kept it has no way into the
    // account); the answer's token goes on.
    let current = |token: &str| {
        let mut sessions = c.sessions();
        let request = with_token(token, spb::GetCurrentSessionRequest {});
        async move { sessions.get_current_session(request).await }
    };
    assert_eq!(code(current(&guest.token).await), Code::Unauthenticated, "the guest's token is revoked");
    let session = current(&claimed.token).await.unwrap().into_inner().session.unwrap();
    assert_eq!((session.id, session.user_id), (claimed.session.unwrap().id, guest.id.clone()));
    let again = c.sessions().claim_account(with_token(&claimed.token, claim)).await;
    assert_eq!(code(again), Code::FailedPrecondition, "only once");
    // The password logs in as the same user with the same chats.
    let login = c
        .sessions()
        .create_session(spb::CreateSessionRequest { username, password: "my new password".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(login.user.unwrap().id, guest.id);
    let chats = c
        .chats()
        .list_chats(with_token(&login.token, cpb::ListChatsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .chats;
    assert_eq!(chats.iter().map(|ch| ch.id.as_str()).collect::<Vec<_>>(), [chat.id.as_str()]);
    let taken = spb::ClaimAccountRequest {
        username: friend.username.clone(),
        password: "whatever12".into(),
        display_name: String::new(),
    };
    let other_guest = c.guest().await;
    assert_eq!(code(c.sessions().claim_account(authed(&other_guest, taken)).await), Code::AlreadyExists);
}

/// Split mode: the internal EnsureBotUser makes a bot once (the assistant's
/// kind of user), which is an ordinary chat member but never logs in, not
/// even with the password the log-in checks unknown users against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bots_are_made_once_join_chats_and_never_log_in() {
    use natter_proto::sessions::v1::session_internal_service_client::SessionInternalServiceClient;
    let Some(c) = Cluster::start(natter_testkit::Mode::Split).await else { return };
    let secret = std::fs::read_to_string(c.credential_file.as_deref().expect("split has a credential")).unwrap();
    let internal = tonic::transport::Channel::from_shared(format!("http://{}", c.internal_addrs[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let ensure = |username: &str, display_name: &str| {
        let mut request = tonic::Request::new(spb::EnsureBotUserRequest {
            username: username.into(),
            display_name: display_name.into(),
        });
        request.metadata_mut().insert("natter-service-credential", secret.trim().parse().unwrap());
        let mut client = SessionInternalServiceClient::new(internal.clone());
        async move { client.ensure_bot_user(request).await }
    };
    let name = format!("assistant-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let bot = ensure(&name, "Assistant").await.unwrap().into_inner().user.unwrap();
    assert_eq!((bot.kind, bot.guest, bot.display_name.as_str()), (spb::UserKind::Bot as i32, false, "Assistant"));
    let again = ensure(&name.to_uppercase(), "Another name").await.unwrap().into_inner().user.unwrap();
    assert_eq!((again.id.as_str(), again.display_name.as_str()), (bot.id.as_str(), "Assistant"), "made once");

    // No log-in reaches it: not a guessed password, not the dummy one.
    for password in ["correct horse battery", "natter-dummy-password"] {
        let login = spb::CreateSessionRequest { username: name.clone(), password: password.into() };
        assert_eq!(code(c.sessions().create_session(login).await), Code::Unauthenticated, "{password}");
    }
    // A person's username is not a bot's; a bad one names the field.
    let alice = c.user("alice").await;
    assert_eq!(ensure(&alice.username, "").await.unwrap_err().code(), Code::AlreadyExists);
    let bad = ensure("no spaces allowed", "").await.unwrap_err();
    assert_eq!(violated_fields(&bad), ["username"]);

    // An ordinary member: added to a group, listed with its kind.
    let request =
        cpb::CreateChatRequest { title: "ask me".into(), member_ids: vec![bot.id.clone()], ..Default::default() };
    let chat = c.chats().create_chat(authed(&alice, request)).await.unwrap().into_inner().chat.unwrap();
    assert_eq!(chat.member_count, 2);
    let users = c
        .sessions()
        .batch_get_users(authed(&alice, spb::BatchGetUsersRequest { user_ids: vec![bot.id.clone()] }))
        .await
        .unwrap()
        .into_inner()
        .users;
    assert_eq!(
        users.iter().map(|u| (u.id.as_str(), u.kind)).collect::<Vec<_>>(),
        [(bot.id.as_str(), spb::UserKind::Bot as i32)]
    );
    // It writes only where asked: no one blocks it (which would close a
    // person's own assistant chat to their sends and not to Regenerate).
    let block = cpb::BlockUserRequest { user_id: bot.id.clone() };
    let refused = c.chats().block_user(authed(&alice, block)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    c.stop().await;
}

mod guest_deletion {
    use super::*;

    /// Sessions last 5 s (time for the guest to set up its chats on a busy
    /// machine) and are deleted a second after they expire, so a guest is
    /// deleted about 6 s after it came; people log in again.
    pub(crate) const FLAGS: natter_testkit::Flags<'static> = natter_testkit::Flags {
        sessions: &[
            "--session-ttl",
            "5s",
            "--session-retention",
            "1s",
            "--session-purge-interval",
            "200ms",
            "--create-session-rate",
            "off",
        ],
        ..natter_testkit::Flags::NONE
    };

    crate::both_modes!(flags = crate::sessions::guest_deletion::FLAGS; a_guest_long_gone_leaves_its_chats);

    /// A fresh session of `user` (the test's sessions last 5 s).
    pub(super) async fn again(c: &Cluster, user: &natter_testkit::TestUser) -> natter_testkit::TestUser {
        let request =
            spb::CreateSessionRequest { username: user.username.clone(), password: "correct horse battery".into() };
        let s = c.sessions().create_session(request).await.expect("log in").into_inner();
        natter_testkit::TestUser { token: s.token, session_id: s.session.expect("session").id, ..user.clone() }
    }

    pub(super) async fn members(c: &Cluster, user: &natter_testkit::TestUser, chat_id: &str) -> Vec<(String, i32)> {
        let request = cpb::ListMembersRequest { chat_id: chat_id.to_owned(), ..Default::default() };
        let listed = c.chats().list_members(authed(user, request)).await.expect("members").into_inner();
        listed.members.into_iter().map(|m| (m.user_id, m.role)).collect()
    }

    async fn a_guest_long_gone_leaves_its_chats(c: &Cluster) {
        let (alice, bob, guest) = (c.user("alice").await, c.user("bob").await, c.guest().await);
        let mut chats = c.chats();
        let create = |kind: cpb::ChatKind, title: &str, member_ids: Vec<String>| {
            let request =
                cpb::CreateChatRequest { kind: kind as i32, title: title.into(), member_ids, ..Default::default() };
            authed(&guest, request)
        };
        let group = |title, members| create(cpb::ChatKind::Group, title, members);
        let owned = chats.create_chat(group("owned", vec![alice.id.clone(), bob.id.clone()])).await.unwrap();
        let owned = owned.into_inner().chat.unwrap().id;
        let role = cpb::UpdateMemberRequest {
            chat_id: owned.clone(),
            user_id: bob.id.clone(),
            role: cpb::MemberRole::Admin as i32,
        };
        chats.update_member(authed(&guest, role)).await.expect("bob made admin");
        let alone = chats.create_chat(group("alone", Vec::new())).await.unwrap().into_inner().chat.unwrap().id;
        let with_alice = chats.create_chat(create(cpb::ChatKind::Direct, "", vec![alice.id.clone()])).await.unwrap();
        let with_alice = with_alice.into_inner().chat.unwrap().id;
        crate::chats::send(c, &guest, &with_alice, "hello from a guest").await;

        // Its session expires at 5 s and is deleted a second later, and the
        // guest with it; the chats service follows within its relay's 5 s,
        // one chat at a time: done once the last of them is (its lone
        // group deleted, which comes after the group it owned is handed on).
        let get = |chat_id: &str| cpb::GetChatRequest { chat_id: chat_id.to_owned(), ..Default::default() };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        let (alice, bob) = loop {
            let (alice, bob) = (again(c, &alice).await, again(c, &bob).await);
            let lone = chats.get_chat(authed(&alice, get(&alone))).await;
            if members(c, &bob, &owned).await.len() == 2 && code(lone) == Code::NotFound {
                break (alice, bob);
            }
            assert!(tokio::time::Instant::now() < deadline, "the guest never left {owned} and {alone}");
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        };
        let owner = cpb::MemberRole::Owner as i32;
        let member = cpb::MemberRole::Member as i32;
        let mut left = members(c, &bob, &owned).await;
        left.sort();
        let mut expected = vec![(alice.id.clone(), member), (bob.id.clone(), owner)];
        expected.sort();
        assert_eq!(left, expected, "the admin owns the group the guest owned");
        let with_history = cpb::GetChatRequest { message_page_size: 10, ..get(&with_alice) };
        let kept = chats.get_chat(authed(&alice, with_history)).await.expect("alice keeps their direct chat");
        let history = kept.into_inner().messages;
        assert!(history.iter().any(|m| m.text == "hello from a guest"), "with its history: {history:?}");
        let looked_up = spb::GetUserRequest { user_id: guest.id.clone(), ..Default::default() };
        assert_eq!(code(c.sessions().get_user(authed(&alice, looked_up)).await), Code::NotFound, "the guest is gone");
    }
}

async fn a_person_deletes_their_account_and_leaves_their_chats(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let group =
        cpb::CreateChatRequest { title: "alice's".into(), member_ids: vec![bob.id.clone()], ..Default::default() };
    let group = c.chats().create_chat(authed(&alice, group)).await.unwrap().into_inner().chat.unwrap().id;
    let direct = crate::chats::direct(c, &alice, &bob).await;
    crate::chats::send(c, &alice, &direct.id, "goodbye, bob").await;
    let phone = guest_deletion::again(c, &alice).await;
    let mut stream = crate::stream::open(c, &phone, &[&direct.id], &[]).await;

    // A wrong or missing password deletes nothing.
    let delete = |password: &str| spb::DeleteAccountRequest { password: password.into() };
    let wrong = c.sessions().delete_account(authed(&alice, delete("not my password"))).await;
    assert_eq!(code(wrong), Code::PermissionDenied);
    let missing = c.sessions().delete_account(authed(&alice, delete(""))).await.unwrap_err();
    assert_eq!((missing.code(), violated_fields(&missing)), (Code::InvalidArgument, vec!["password".to_owned()]));
    c.sessions().get_current_session(authed(&alice, spb::GetCurrentSessionRequest {})).await.expect("still there");

    c.sessions().delete_account(authed(&alice, delete("correct horse battery"))).await.expect("deleted");
    // A retry whose first answer was lost learns that it went through; the
    // token works for nothing else, and the other session's never did this.
    c.sessions().delete_account(authed(&alice, delete("correct horse battery"))).await.expect("a retry: done");
    let other = c.sessions().delete_account(authed(&phone, delete("correct horse battery"))).await;
    assert_eq!(code(other), Code::Unauthenticated);
    // Every session ends at once, in every service, open streams too.
    for token in [&alice.token, &phone.token] {
        let current = c.sessions().get_current_session(with_token(token, spb::GetCurrentSessionRequest {})).await;
        assert_eq!(code(current), Code::Unauthenticated);
        let chats = c.chats().list_chats(with_token(token, cpb::ListChatsRequest::default())).await;
        assert_eq!(code(chats), Code::Unauthenticated);
    }
    if crate::stream::crosses_services(c) {
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    other => break other,
                }
            }
        });
        let end = end.await.expect("the stream ends within 10 s");
        assert_eq!(end.expect_err("ends with a status").code(), Code::Unauthenticated);
    }
    // Gone: no log-in, no look-up; the username is free, under a new id.
    let login =
        spb::CreateSessionRequest { username: alice.username.clone(), password: "correct horse battery".into() };
    assert_eq!(code(c.sessions().create_session(login).await), Code::Unauthenticated);
    let looked_up = spb::GetUserRequest { user_id: alice.id.clone(), ..Default::default() };
    assert_eq!(code(c.sessions().get_user(authed(&bob, looked_up)).await), Code::NotFound);
    let again = spb::CreateUserRequest {
        username: alice.username.clone(),
        password: "another horse battery".into(),
        display_name: String::new(),
    };
    let newcomer = c.sessions().create_user(again).await.expect("the username is free").into_inner().user.unwrap();
    assert_ne!(newcomer.id, alice.id);

    // The chats service follows within its relay's 5 s: bob owns the group,
    // and keeps the direct chat with its history.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while guest_deletion::members(c, &bob, &group).await.len() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "alice never left {group}");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let owner = cpb::MemberRole::Owner as i32;
    assert_eq!(guest_deletion::members(c, &bob, &group).await, [(bob.id.clone(), owner)], "bob inherits the group");
    let kept = cpb::GetChatRequest { chat_id: direct.id.clone(), message_page_size: 10 };
    let history = c.chats().get_chat(authed(&bob, kept)).await.expect("bob keeps the direct chat").into_inner();
    assert!(history.messages.iter().any(|m| m.text == "goodbye, bob"), "with its history: {:?}", history.messages);
}

async fn a_guest_deletes_its_account_without_a_password(c: &Cluster) {
    let guest = c.guest().await;
    c.sessions().delete_account(authed(&guest, spb::DeleteAccountRequest::default())).await.expect("deleted");
    let current = c.sessions().get_current_session(authed(&guest, spb::GetCurrentSessionRequest {})).await;
    assert_eq!(code(current), Code::Unauthenticated);
    let alice = c.user("alice").await;
    let looked_up = spb::GetUserRequest { user_id: guest.id.clone(), ..Default::default() };
    assert_eq!(code(c.sessions().get_user(authed(&alice, looked_up)).await), Code::NotFound);
}

/// What the messages store keeps of a user with no message content (its
/// last-seen time, read positions and mention rows) goes once the chats
/// service's relay has taken the deleted user out of their chats; the
/// messages it sent stay, with the person it wrote to. No call shows those
/// rows (GetPresence answers UNSPECIFIED for a deleted user, counts are
/// the caller's own), so this reads the store's database directly
/// (`Cluster::count_in_store`: the all-in-one's SQLite file, the split
/// messages service's PostgreSQL schema).
async fn a_deleted_account_leaves_no_row_under_its_id_in_the_messages_store(c: &Cluster) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let group =
        cpb::CreateChatRequest { title: "bob's".into(), member_ids: vec![alice.id.clone()], ..Default::default() };
    let group = c.chats().create_chat(authed(&bob, group)).await.unwrap().into_inner().chat.unwrap().id;
    let direct = crate::chats::direct(c, &alice, &bob).await.id;
    crate::chats::send(c, &alice, &direct, "see you, bob").await;
    for chat in [&group, &direct] {
        let mention = mpb::SendMessageRequest {
            chat_id: chat.clone(),
            text: "@alice".into(),
            mention_user_ids: vec![alice.id.clone()],
            ..Default::default()
        };
        let sent = c.messages().send_message(authed(&bob, mention)).await.expect("a mention").into_inner();
        let read = mpb::MarkReadRequest { chat_id: chat.clone(), seq: sent.message.unwrap().seq };
        c.messages().mark_read(authed(&alice, read)).await.expect("alice reads it");
    }
    // Alice comes online and goes: her last-seen time is stored once the
    // closed stream is noticed.
    drop(crate::stream::open(c, &alice, &[], &[]).await);
    let rows = |table: &'static str| {
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE user_id = '{}'", alice.id);
        async move { c.count_in_store("messages", &sql).await }
    };
    let tables = ["user_presence", "read_positions", "message_mentions"];
    crate::stream_abuse::wait_for(|| async { (rows("user_presence").await == 1).then_some(()) }).await;
    for table in tables {
        assert!(rows(table).await > 0, "alice has rows in {table} before her deletion");
    }
    let sent_by_alice = format!("SELECT COUNT(*) FROM messages WHERE author_id = '{}'", alice.id);
    assert_eq!(c.count_in_store("messages", &sent_by_alice).await, 1);

    let delete = spb::DeleteAccountRequest { password: "correct horse battery".into() };
    c.sessions().delete_account(authed(&alice, delete)).await.expect("deleted");
    // The relay (every 5 s) takes her out of the group, then has the
    // messages service forget her.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut left = Vec::new();
        for table in tables {
            left.push((table, rows(table).await));
        }
        if left.iter().all(|(_, n)| *n == 0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "rows of alice left in the messages store: {left:?}");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert_eq!(guest_deletion::members(c, &bob, &group).await.len(), 1, "alice left the group first");
    // What she sent stays, with bob.
    assert_eq!(c.count_in_store("messages", &sent_by_alice).await, 1);
    let kept = cpb::GetChatRequest { chat_id: direct, message_page_size: 10 };
    let history = c.chats().get_chat(authed(&bob, kept)).await.expect("bob keeps the direct chat").into_inner();
    assert!(history.messages.iter().any(|m| m.text == "see you, bob"), "with its history: {:?}", history.messages);
    // She is still listed in that chat, but no one to mention: no mention
    // row comes back under her id.
    let mention = mpb::SendMessageRequest {
        chat_id: history.chat.unwrap().id,
        text: "@alice?".into(),
        mention_user_ids: vec![alice.id.clone()],
        ..Default::default()
    };
    let refused = c.messages().send_message(authed(&bob, mention)).await.unwrap_err();
    assert_eq!(crate::violated_fields(&refused), ["mention_user_ids[0]"]);
    assert_eq!(rows("message_mentions").await, 0);
}

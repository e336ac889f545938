//! The authorization matrix: every RPC called as the chat's owner, an
//! admin, a plain member, a non-member, a guest (also a non-member) and
//! without a token, each on a fresh chat, with the status code each cell must
//! give.

use natter_proto::FieldMask;
use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_proto::sessions::v1 as spb;
use natter_testkit::{Cluster, TestUser, with_token};
use tonic::{Code, Request};

crate::both_modes!(every_rpc_allows_exactly_whom_it_should);

/// One fresh chat: owner O, admin A, members M and X; M wrote `message`.
struct Fixture {
    chat: String,
    message: String,
}

struct People {
    owner: TestUser,
    admin: TestUser,
    member: TestUser,
    extra: TestUser,
    outsider: TestUser,
    guest: TestUser,
}

fn req<T>(token: Option<&str>, message: T) -> Request<T> {
    match token {
        Some(t) => with_token(t, message),
        None => Request::new(message),
    }
}

async fn fixture(c: &Cluster, p: &People) -> Fixture {
    let create = cpb::CreateChatRequest {
        title: "matrix".into(),
        member_ids: vec![p.admin.id.clone(), p.member.id.clone(), p.extra.id.clone()],
        ..Default::default()
    };
    let chat = c.chats().create_chat(with_token(&p.owner.token, create)).await.unwrap().into_inner().chat.unwrap().id;
    let promote = cpb::UpdateMemberRequest {
        chat_id: chat.clone(),
        user_id: p.admin.id.clone(),
        role: cpb::MemberRole::Admin as i32,
    };
    c.chats().update_member(with_token(&p.owner.token, promote)).await.unwrap();
    let send = mpb::SendMessageRequest { chat_id: chat.clone(), text: "by member".into(), ..Default::default() };
    let message =
        c.messages().send_message(with_token(&p.member.token, send)).await.unwrap().into_inner().message.unwrap().id;
    Fixture { chat, message }
}

/// The rows of the matrix whose calls name no chat or message: their cells
/// need no fresh fixture.
const CHATLESS: &[&str] = &[
    "GetPrivacySettings",
    "UpdatePrivacySettings",
    "BlockUser",
    "UnblockUser",
    "ListBlockedUsers",
    "GetCurrentSession",
    "ListSessions",
    "GetUser",
    "BatchGetUsers",
    "ClaimAccount",
    "DeleteAccount(own)",
    "UpdateUser(own)",
    "ChangePassword(wrong current)",
];

/// Calls `rpc` as the holder of `token` and returns the resulting code.
async fn call(c: &Cluster, p: &People, f: &Fixture, rpc: &str, token: Option<&str>) -> Code {
    let (chat, message) = (f.chat.clone(), f.message.clone());
    let result: Result<(), tonic::Status> = match rpc {
        "CreateChat" => c
            .chats()
            .create_chat(req(token, cpb::CreateChatRequest { title: "mine".into(), ..Default::default() }))
            .await
            .map(drop),
        "GetChat" => {
            c.chats().get_chat(req(token, cpb::GetChatRequest { chat_id: chat, message_page_size: 5 })).await.map(drop)
        }
        "ListChats" => c.chats().list_chats(req(token, cpb::ListChatsRequest::default())).await.map(drop),
        "ListChats(another user's: staff only)" => {
            let r = cpb::ListChatsRequest { user_id: p.extra.id.clone(), ..Default::default() };
            c.chats().list_chats(req(token, r)).await.map(drop)
        }
        "UpdateChat" => {
            let r = cpb::UpdateChatRequest {
                chat_id: chat,
                chat: Some(cpb::Chat { title: "renamed".into(), ..Default::default() }),
                update_mask: Some(FieldMask { paths: vec!["title".into()] }),
            };
            c.chats().update_chat(req(token, r)).await.map(drop)
        }
        "ArchiveChat" => c.chats().archive_chat(req(token, cpb::ArchiveChatRequest { chat_id: chat })).await.map(drop),
        "UnarchiveChat" => {
            c.chats().unarchive_chat(req(token, cpb::UnarchiveChatRequest { chat_id: chat })).await.map(drop)
        }
        "DeleteChat" => c.chats().delete_chat(req(token, cpb::DeleteChatRequest { chat_id: chat })).await.map(drop),
        "AddMembers" => {
            let r = cpb::AddMembersRequest { chat_id: chat, user_ids: vec![p.outsider.id.clone()] };
            c.chats().add_members(req(token, r)).await.map(drop)
        }
        "RemoveMember(other)" => {
            let r = cpb::RemoveMemberRequest { chat_id: chat, user_id: p.extra.id.clone() };
            c.chats().remove_member(req(token, r)).await.map(drop)
        }
        "UpdateMember" => {
            let r = cpb::UpdateMemberRequest {
                chat_id: chat,
                user_id: p.extra.id.clone(),
                role: cpb::MemberRole::Admin as i32,
            };
            c.chats().update_member(req(token, r)).await.map(drop)
        }
        "GetPrivacySettings" => {
            c.chats().get_privacy_settings(req(token, cpb::GetPrivacySettingsRequest {})).await.map(drop)
        }
        "UpdatePrivacySettings" => {
            let r = cpb::UpdatePrivacySettingsRequest {
                settings: Some(cpb::PrivacySettings {
                    group_adds: cpb::GroupAdds::Everyone as i32,
                    ..Default::default()
                }),
                update_mask: Some(FieldMask { paths: vec!["group_adds".into()] }),
            };
            c.chats().update_privacy_settings(req(token, r)).await.map(drop)
        }
        // Taken back at once, so that no later row meets the block.
        "BlockUser" => {
            let user_id = p.extra.id.clone();
            let blocked = c.chats().block_user(req(token, cpb::BlockUserRequest { user_id: user_id.clone() })).await;
            if blocked.is_ok() {
                c.chats().unblock_user(req(token, cpb::UnblockUserRequest { user_id })).await.unwrap();
            }
            blocked.map(drop)
        }
        "UnblockUser" => {
            let r = cpb::UnblockUserRequest { user_id: p.extra.id.clone() };
            c.chats().unblock_user(req(token, r)).await.map(drop)
        }
        "ListBlockedUsers" => {
            c.chats().list_blocked_users(req(token, cpb::ListBlockedUsersRequest::default())).await.map(drop)
        }
        "UpdateUser(own)" => {
            let r = spb::UpdateUserRequest {
                user: Some(spb::User { display_name: "renamed".into(), ..Default::default() }),
                update_mask: Some(FieldMask { paths: vec!["display_name".into()] }),
            };
            c.sessions().update_user(req(token, r)).await.map(drop)
        }
        // A wrong current password: the password of a matrix user stays.
        "ChangePassword(wrong current)" => {
            let r = spb::ChangePasswordRequest {
                current_password: "not the password".into(),
                new_password: "a new horse battery".into(),
            };
            c.sessions().change_password(req(token, r)).await.map(drop)
        }
        "ListMembers" => c
            .chats()
            .list_members(req(token, cpb::ListMembersRequest { chat_id: chat, ..Default::default() }))
            .await
            .map(drop),
        "SendMessage" => {
            let r = mpb::SendMessageRequest { chat_id: chat, text: "hi".into(), ..Default::default() };
            c.messages().send_message(req(token, r)).await.map(drop)
        }
        "ListMessages" => c
            .messages()
            .list_messages(req(token, mpb::ListMessagesRequest { chat_id: chat, ..Default::default() }))
            .await
            .map(drop),
        "GetMessage" => {
            c.messages().get_message(req(token, mpb::GetMessageRequest { message_id: message })).await.map(drop)
        }
        "EditMessage(member's)" => {
            let r = mpb::EditMessageRequest { message_id: message, text: "edited".into() };
            c.messages().edit_message(req(token, r)).await.map(drop)
        }
        "DeleteMessage(member's)" => {
            c.messages().delete_message(req(token, mpb::DeleteMessageRequest { message_id: message })).await.map(drop)
        }
        "ListMessageRevisions" => c
            .messages()
            .list_message_revisions(req(
                token,
                mpb::ListMessageRevisionsRequest { message_id: message, ..Default::default() },
            ))
            .await
            .map(drop),
        "AddReaction(member's)" => {
            let r = mpb::AddReactionRequest { message_id: message, emoji: "👍".into() };
            c.messages().add_reaction(req(token, r)).await.map(drop)
        }
        "RemoveReaction(member's)" => {
            let r = mpb::RemoveReactionRequest { message_id: message, emoji: "👍".into() };
            c.messages().remove_reaction(req(token, r)).await.map(drop)
        }
        "PinMessage(member's)" => {
            c.messages().pin_message(req(token, mpb::PinMessageRequest { message_id: message })).await.map(drop)
        }
        "UnpinMessage(member's)" => {
            c.messages().unpin_message(req(token, mpb::UnpinMessageRequest { message_id: message })).await.map(drop)
        }
        "SearchMessages(the chat)" => {
            let r = mpb::SearchMessagesRequest { query: "member".into(), chat_id: chat, ..Default::default() };
            c.messages().search_messages(req(token, r)).await.map(drop)
        }
        "SearchMessages(the caller's chats)" => {
            let r = mpb::SearchMessagesRequest { query: "member".into(), ..Default::default() };
            c.messages().search_messages(req(token, r)).await.map(drop)
        }
        "ReportMessage(member's)" => {
            let r = mpb::ReportMessageRequest {
                message_id: message,
                reason: mpb::ReportReason::Spam as i32,
                comment: String::new(),
            };
            c.messages().report_message(req(token, r)).await.map(drop)
        }
        "ResolveReport(member's)" => {
            c.messages().resolve_report(req(token, mpb::ResolveReportRequest { message_id: message })).await.map(drop)
        }
        "ListFlaggedMessages" => {
            c.messages().list_flagged_messages(req(token, mpb::ListFlaggedMessagesRequest::default())).await.map(drop)
        }
        "GetPresence(member's)" => {
            let r = mpb::GetPresenceRequest { user_ids: vec![p.member.id.clone()] };
            c.messages().get_presence(req(token, r)).await.map(drop)
        }
        "SetTyping" => {
            c.messages().set_typing(req(token, mpb::SetTypingRequest { chat_id: chat, typing: true })).await.map(drop)
        }
        "ListReadPositions" => {
            let list = mpb::ListReadPositionsRequest { chat_id: chat, ..Default::default() };
            c.messages().list_read_positions(req(token, list)).await.map(drop)
        }
        "MarkRead" => {
            c.messages().mark_read(req(token, mpb::MarkReadRequest { chat_id: chat, seq: 1 })).await.map(drop)
        }
        "StreamEvents" => {
            let r = mpb::StreamEventsRequest { chat_ids: vec![chat], ..Default::default() };
            c.messages().stream_events(req(token, r)).await.map(drop)
        }
        "StreamEvents(resume_changes)" => {
            let r = mpb::StreamEventsRequest {
                chat_ids: vec![chat.clone()],
                resume_changes: [(chat, 0)].into(),
                ..Default::default()
            };
            c.messages().stream_events(req(token, r)).await.map(drop)
        }
        "GetCurrentSession" => {
            c.sessions().get_current_session(req(token, spb::GetCurrentSessionRequest {})).await.map(drop)
        }
        "ListSessions" => c.sessions().list_sessions(req(token, spb::ListSessionsRequest::default())).await.map(drop),
        "GetUser" => c
            .sessions()
            .get_user(req(token, spb::GetUserRequest { user_id: p.owner.id.clone(), ..Default::default() }))
            .await
            .map(drop),
        "BatchGetUsers" => c
            .sessions()
            .batch_get_users(req(token, spb::BatchGetUsersRequest { user_ids: vec![p.owner.id.clone()] }))
            .await
            .map(drop),
        "ClaimAccount" => {
            let r = spb::ClaimAccountRequest {
                username: format!("claimed-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
                password: "long enough".into(),
                display_name: String::new(),
            };
            c.sessions().claim_account(req(token, r)).await.map(drop)
        }
        "DeleteAccount(own)" => {
            let r = spb::DeleteAccountRequest { password: "correct horse battery".into() };
            c.sessions().delete_account(req(token, r)).await.map(drop)
        }
        other => panic!("no such row {other}"),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn every_rpc_allows_exactly_whom_it_should(c: &Cluster) {
    use Code::{FailedPrecondition as Pre, Ok, PermissionDenied as Deny, Unauthenticated as Unauth};
    let p = People {
        owner: c.user("owner").await,
        admin: c.user("admin").await,
        member: c.user("member").await,
        extra: c.user("extra").await,
        outsider: c.user("outsider").await,
        guest: c.guest().await,
    };
    // Columns: owner, admin, member, non-member, guest, no token.
    let matrix: &[(&str, [Code; 6])] = &[
        ("CreateChat", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("GetChat", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        ("ListChats", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("ListChats(another user's: staff only)", [Deny, Deny, Deny, Deny, Deny, Unauth]),
        ("UpdateChat", [Ok, Ok, Deny, Deny, Deny, Unauth]),
        ("ArchiveChat", [Ok, Ok, Deny, Deny, Deny, Unauth]),
        ("UnarchiveChat", [Ok, Ok, Deny, Deny, Deny, Unauth]),
        ("DeleteChat", [Ok, Deny, Deny, Deny, Deny, Unauth]),
        ("AddMembers", [Ok, Ok, Deny, Deny, Deny, Unauth]),
        ("RemoveMember(other)", [Ok, Ok, Deny, Deny, Deny, Unauth]),
        ("UpdateMember", [Ok, Deny, Deny, Deny, Deny, Unauth]),
        ("ListMembers", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        // Each caller's own settings: no chat, no one else's.
        ("GetPrivacySettings", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("UpdatePrivacySettings", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        // Each user blocks whom they like (the extra member here: blocking
        // oneself is INVALID_ARGUMENT, not a cell).
        ("BlockUser", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("UnblockUser", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("ListBlockedUsers", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("SendMessage", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        ("ListMessages", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        ("GetMessage", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        ("EditMessage(member's)", [Deny, Deny, Ok, Deny, Deny, Unauth]),
        ("DeleteMessage(member's)", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        ("ListMessageRevisions", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        ("MarkRead", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        ("ListReadPositions", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        ("SetTyping", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        // Anyone may ask; who shares no chat gets UNSPECIFIED (presence.rs).
        ("GetPresence(member's)", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("AddReaction(member's)", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        ("RemoveReaction(member's)", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        // A group's pins are its owner's and admins'.
        ("PinMessage(member's)", [Ok, Ok, Deny, Deny, Deny, Unauth]),
        ("UnpinMessage(member's)", [Ok, Ok, Deny, Deny, Deny, Unauth]),
        ("SearchMessages(the chat)", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        ("SearchMessages(the caller's chats)", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("ReportMessage(member's)", [Ok, Ok, Pre, Deny, Deny, Unauth]),
        ("ResolveReport(member's)", [Ok, Ok, Deny, Deny, Deny, Unauth]),
        ("ListFlaggedMessages", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("StreamEvents", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        ("StreamEvents(resume_changes)", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        ("GetCurrentSession", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("ListSessions", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("GetUser", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("BatchGetUsers", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("ClaimAccount", [Pre, Pre, Pre, Pre, Ok, Unauth]),
        // Each user's own profile; a guest has no password to change.
        ("UpdateUser(own)", [Ok, Ok, Ok, Ok, Ok, Unauth]),
        ("ChangePassword(wrong current)", [Deny, Deny, Deny, Deny, Pre, Unauth]),
        // Each cell deletes a fresh person (or guest) of its own.
        ("DeleteAccount(own)", [Ok, Ok, Ok, Ok, Ok, Unauth]),
    ];
    let mut wrong = Vec::new();
    for (rpc, expected) in matrix {
        let callers: [Option<&TestUser>; 6] =
            [Some(&p.owner), Some(&p.admin), Some(&p.member), Some(&p.outsider), Some(&p.guest), None];
        for (caller, want) in callers.iter().zip(expected) {
            // ClaimAccount turns the guest into a password user, and
            // DeleteAccount deletes its caller: give those cells a fresh user
            // of the same kind.
            let fresh;
            let caller = match (*rpc, caller) {
                ("ClaimAccount", Some(u)) if u.id == p.guest.id => {
                    fresh = c.guest().await;
                    Some(&fresh)
                }
                ("DeleteAccount(own)", Some(u)) => {
                    fresh = if u.id == p.guest.id { c.guest().await } else { c.user("leaver").await };
                    Some(&fresh)
                }
                _ => *caller,
            };
            // A fresh chat costs the owner a CreateChat (against
            // --create-chat-rate): only for the RPCs that touch one.
            let f = if CHATLESS.contains(rpc) {
                Fixture { chat: String::new(), message: String::new() }
            } else {
                fixture(c, &p).await
            };
            let got = call(c, &p, &f, rpc, caller.map(|u| u.token.as_str())).await;
            if got != *want {
                let who = caller.map_or("no token".to_owned(), |u| u.username.clone());
                wrong.push(format!("{rpc} as {who}: got {got:?}, want {want:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "authorization matrix mismatches:\n{}", wrong.join("\n"));
}

mod assistant {
    use super::*;

    crate::with_scripted_server!(every_assistant_rpc_allows_exactly_whom_it_should[]);

    /// The assistant's RPCs, on a group chat the assistant is a member of, whose
    /// member M asked it something.
    async fn every_assistant_rpc_allows_exactly_whom_it_should(
        c: &Cluster,
        _server: &natter_llm::testing::ScriptedServer,
    ) {
        use Code::{Ok, PermissionDenied as Deny, Unauthenticated as Unauth};
        use natter_proto::assistant::v1 as apb;
        let p = People {
            owner: c.user("owner").await,
            admin: c.user("admin").await,
            member: c.user("member").await,
            extra: c.user("extra").await,
            outsider: c.user("outsider").await,
            guest: c.guest().await,
        };
        // The assistant's user id, from anyone's assistant chat.
        let bot = c
            .assistant()
            .get_or_create_assistant_chat(with_token(&p.extra.token, apb::GetOrCreateAssistantChatRequest {}))
            .await
            .unwrap()
            .into_inner()
            .assistant_user_id;
        let fixture = || async {
            let f = fixture(c, &p).await;
            let add = cpb::AddMembersRequest { chat_id: f.chat.clone(), user_ids: vec![bot.clone()] };
            c.chats().add_members(with_token(&p.owner.token, add)).await.unwrap();
            let ask = apb::AskRequest { chat_id: f.chat.clone(), text: "@assistant hi".into(), ..Default::default() };
            let reply = c.assistant().ask(with_token(&p.member.token, ask)).await.unwrap().into_inner().reply.unwrap();
            (f.chat, reply.id)
        };
        let matrix: &[(&str, [Code; 6])] = &[
            ("GetOrCreateAssistantChat", [Ok, Ok, Ok, Ok, Ok, Unauth]),
            ("Ask", [Ok, Ok, Ok, Deny, Deny, Unauth]),
            ("Regenerate(reload)", [Ok, Ok, Ok, Deny, Deny, Unauth]),
            ("Regenerate(edit member's prompt)", [Deny, Deny, Ok, Deny, Deny, Unauth]),
            ("StopGeneration(member's reply)", [Ok, Ok, Ok, Deny, Deny, Unauth]),
        ];
        let mut wrong = Vec::new();
        for (rpc, expected) in matrix {
            let callers = [Some(&p.owner), Some(&p.admin), Some(&p.member), Some(&p.outsider), Some(&p.guest), None];
            for (caller, want) in callers.iter().zip(expected) {
                let (chat, reply) = fixture().await;
                let token = caller.map(|u| u.token.as_str());
                let mut assistant = c.assistant();
                let result = match *rpc {
                    "GetOrCreateAssistantChat" => assistant
                        .get_or_create_assistant_chat(req(token, apb::GetOrCreateAssistantChatRequest {}))
                        .await
                        .map(drop),
                    "Ask" => {
                        let r =
                            apb::AskRequest { chat_id: chat, text: "@assistant again".into(), ..Default::default() };
                        assistant.ask(req(token, r)).await.map(drop)
                    }
                    "Regenerate(reload)" => {
                        let r = apb::RegenerateRequest {
                            chat_id: chat,
                            mode: apb::RegenerateMode::Reload as i32,
                            ..Default::default()
                        };
                        assistant.regenerate(req(token, r)).await.map(drop)
                    }
                    "Regenerate(edit member's prompt)" => {
                        let r = apb::RegenerateRequest {
                            chat_id: chat,
                            mode: apb::RegenerateMode::Edit as i32,
                            text: "@assistant edited".into(),
                            ..Default::default()
                        };
                        assistant.regenerate(req(token, r)).await.map(drop)
                    }
                    "StopGeneration(member's reply)" => assistant
                        .stop_generation(req(token, apb::StopGenerationRequest { message_id: reply }))
                        .await
                        .map(drop),
                    other => panic!("no such row {other}"),
                };
                let got = result.map_or_else(|s| s.code(), |()| Ok);
                if got != *want {
                    let who = caller.map_or("no token".to_owned(), |u| u.username.clone());
                    wrong.push(format!("{rpc} as {who}: got {got:?}, want {want:?}"));
                }
            }
        }
        assert!(wrong.is_empty(), "authorization matrix mismatches:\n{}", wrong.join("\n"));
    }
}

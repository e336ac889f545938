//! What an attacker with `buf curl` and no token can reach: no internal RPC
//! answers on a public port (gRPC or gRPC-web, all-in-one, edge or a split
//! service's own public port), reflection there lists public services only,
//! and a split service's internal listener refuses every call that lacks the
//! service credential.

use natter_proto::chats::v1 as cpb;
use natter_proto::chats::v1::chat_internal_service_client::ChatInternalServiceClient;
use natter_proto::messages::v1 as mpb;
use natter_proto::messages::v1::message_internal_service_client::MessageInternalServiceClient;
use natter_proto::sessions::v1 as spb;
use natter_proto::sessions::v1::session_internal_service_client::SessionInternalServiceClient;
use natter_testkit::{Cluster, grpc_web};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

crate::both_modes!(no_internal_rpc_answers_on_a_public_port);

/// Calls every internal RPC on `channel` with `credential` (if any) as the
/// service credential; returns each call's outcome as (rpc, code).
async fn call_every_internal_rpc(
    channel: Channel,
    credential: Option<&str>,
    victim: &str,
) -> Vec<(&'static str, Code)> {
    fn with<T>(message: T, credential: Option<&str>) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(credential) = credential {
            request.metadata_mut().insert("natter-service-credential", credential.parse().unwrap());
        }
        request
    }
    fn code<T>(result: Result<tonic::Response<T>, Status>) -> Code {
        result.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
    }
    let mut sessions = SessionInternalServiceClient::new(channel.clone());
    let mut chats = ChatInternalServiceClient::new(channel.clone());
    let mut messages = MessageInternalServiceClient::new(channel);
    let chat = uuid::Uuid::now_v7().to_string();
    vec![
        (
            "IntrospectSession",
            code(
                sessions
                    .introspect_session(with(spb::IntrospectSessionRequest { token: "x".into() }, credential))
                    .await,
            ),
        ),
        (
            "LookupUsers",
            code(
                sessions
                    .lookup_users(with(spb::LookupUsersRequest { user_ids: vec![victim.into()] }, credential))
                    .await,
            ),
        ),
        (
            "EnsureBotUser",
            code(
                sessions
                    .ensure_bot_user(with(
                        spb::EnsureBotUserRequest { username: "intruder".into(), display_name: String::new() },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "ListDeletedUsers",
            code(sessions.list_deleted_users(with(spb::ListDeletedUsersRequest::default(), credential)).await),
        ),
        (
            "CheckMembership",
            code(
                chats
                    .check_membership(with(
                        cpb::CheckMembershipRequest {
                            chat_id: chat.clone(),
                            user_id: victim.into(),
                            ..Default::default()
                        },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "ListMemberChatIds",
            code(
                chats
                    .list_member_chat_ids(with(
                        cpb::ListMemberChatIdsRequest { user_id: victim.into(), ..Default::default() },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "FilterPeers",
            code(
                chats
                    .filter_peers(with(
                        cpb::FilterPeersRequest { user_id: victim.into(), candidate_user_ids: vec![victim.into()] },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "RecordActivity",
            code(chats.record_activity(with(cpb::RecordActivityRequest { activities: Vec::new() }, credential)).await),
        ),
        (
            "GetChatSummaries",
            code(
                messages
                    .get_chat_summaries(with(
                        mpb::GetChatSummariesRequest { chat_ids: vec![chat.clone()], user_id: victim.into() },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "ListRecentMessages",
            code(
                messages
                    .list_recent_messages(with(
                        mpb::ListRecentMessagesRequest { chat_id: chat.clone(), page_size: 5, ..Default::default() },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "PurgeChat",
            code(messages.purge_chat(with(mpb::PurgeChatRequest { chat_id: chat.clone() }, credential)).await),
        ),
        (
            "ForgetUser",
            code(messages.forget_user(with(mpb::ForgetUserRequest { user_id: victim.into() }, credential)).await),
        ),
        (
            "RecordChatChanges",
            code(
                messages
                    .record_chat_changes(with(
                        mpb::RecordChatChangesRequest {
                            chat_id: chat.clone(),
                            changes: vec![mpb::ChatChange {
                                change: Some(mpb::chat_change::Change::MembershipChanged(mpb::MembershipChanged {
                                    user_id: victim.into(),
                                    change: mpb::MembershipChange::Joined as i32,
                                })),
                            }],
                            idempotency_key: String::new(),
                            change_time: None,
                        },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "CreateChatAs",
            code(
                chats
                    .create_chat_as(with(
                        cpb::CreateChatAsRequest {
                            user_id: victim.into(),
                            request: Some(cpb::CreateChatRequest { title: "pwned".into(), ..Default::default() }),
                        },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "TitleChat",
            code(
                chats
                    .title_chat(with(
                        cpb::TitleChatRequest { chat_id: chat.clone(), title: "pwned".into(), ..Default::default() },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "UntitleChat",
            code(
                chats
                    .untitle_chat(with(
                        cpb::UntitleChatRequest {
                            chat_id: chat.clone(),
                            source_message_id: uuid::Uuid::now_v7().to_string(),
                        },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "LookupMessages",
            code(
                messages
                    .lookup_messages(with(
                        mpb::LookupMessagesRequest { chat_id: chat.clone(), seqs: vec![1], ..Default::default() },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "SendMessageAs",
            code(
                messages
                    .send_message_as(with(
                        mpb::SendMessageAsRequest {
                            user_id: victim.into(),
                            request: Some(mpb::SendMessageRequest {
                                chat_id: chat.clone(),
                                text: "forged".into(),
                                ..Default::default()
                            }),
                        },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "EditMessageAs",
            code(
                messages
                    .edit_message_as(with(
                        mpb::EditMessageAsRequest {
                            user_id: victim.into(),
                            request: Some(mpb::EditMessageRequest {
                                message_id: uuid::Uuid::now_v7().to_string(),
                                text: "forged".into(),
                            }),
                        },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "MarkReadAs",
            code(
                messages
                    .mark_read_as(with(
                        mpb::MarkReadAsRequest {
                            user_id: victim.into(),
                            request: Some(mpb::MarkReadRequest { chat_id: chat.clone(), seq: 1 }),
                        },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "FollowChats",
            code(messages.follow_chats(with(mpb::FollowChatsRequest { user_id: victim.into() }, credential)).await),
        ),
        (
            "StartReply",
            code(
                messages
                    .start_reply(with(
                        mpb::StartReplyRequest {
                            chat_id: chat.clone(),
                            message_id: uuid::Uuid::now_v7().to_string(),
                            author_id: victim.into(),
                            prompt_message_id: uuid::Uuid::now_v7().to_string(),
                            ..Default::default()
                        },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "UpdateReply",
            code(
                messages
                    .update_reply(with(
                        mpb::UpdateReplyRequest {
                            message_id: uuid::Uuid::now_v7().to_string(),
                            chat_id: chat.clone(),
                            author_id: victim.into(),
                            deltas: vec![mpb::MessageDelta { message_id: String::new(), offset: 0, text: "x".into() }],
                            checkpoint_text: None,
                        },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "FinishReply",
            code(
                messages
                    .finish_reply(with(
                        mpb::FinishReplyRequest {
                            message_id: uuid::Uuid::now_v7().to_string(),
                            status: mpb::GenerationStatus::Complete as i32,
                            ..Default::default()
                        },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "StopReply",
            code(
                messages
                    .stop_reply(with(
                        mpb::StopReplyRequest { message_id: uuid::Uuid::now_v7().to_string() },
                        credential,
                    ))
                    .await,
            ),
        ),
        (
            "ListStaleReplies",
            code(messages.list_stale_replies(with(mpb::ListStaleRepliesRequest::default(), credential)).await),
        ),
    ]
}

/// The internal RPCs' paths, for gRPC-web.
const INTERNAL_PATHS: [&str; 26] = [
    "/natter.sessions.v1.SessionInternalService/IntrospectSession",
    "/natter.sessions.v1.SessionInternalService/LookupUsers",
    "/natter.sessions.v1.SessionInternalService/EnsureBotUser",
    "/natter.sessions.v1.SessionInternalService/ListDeletedUsers",
    "/natter.chats.v1.ChatInternalService/CheckMembership",
    "/natter.chats.v1.ChatInternalService/ListMemberChatIds",
    "/natter.chats.v1.ChatInternalService/FilterPeers",
    "/natter.chats.v1.ChatInternalService/RecordActivity",
    "/natter.messages.v1.MessageInternalService/GetChatSummaries",
    "/natter.messages.v1.MessageInternalService/ListRecentMessages",
    "/natter.messages.v1.MessageInternalService/PurgeChat",
    "/natter.messages.v1.MessageInternalService/ForgetUser",
    "/natter.messages.v1.MessageInternalService/RecordChatChanges",
    "/natter.chats.v1.ChatInternalService/CreateChatAs",
    "/natter.chats.v1.ChatInternalService/TitleChat",
    "/natter.chats.v1.ChatInternalService/UntitleChat",
    "/natter.messages.v1.MessageInternalService/LookupMessages",
    "/natter.messages.v1.MessageInternalService/SendMessageAs",
    "/natter.messages.v1.MessageInternalService/EditMessageAs",
    "/natter.messages.v1.MessageInternalService/MarkReadAs",
    "/natter.messages.v1.MessageInternalService/FollowChats",
    "/natter.messages.v1.MessageInternalService/StartReply",
    "/natter.messages.v1.MessageInternalService/UpdateReply",
    "/natter.messages.v1.MessageInternalService/FinishReply",
    "/natter.messages.v1.MessageInternalService/StopReply",
    "/natter.messages.v1.MessageInternalService/ListStaleReplies",
];

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect")
}

async fn no_internal_rpc_answers_on_a_public_port(c: &Cluster) {
    let victim = c.user("victim").await;
    // Every port a client can reach: the all-in-one's or the edge's, and in
    // split mode each service's own public port too.
    let mut public = vec![c.addr];
    public.extend(&c.service_addrs);
    for addr in public {
        for (rpc, code) in call_every_internal_rpc(channel(addr).await, None, &victim.id).await {
            assert_eq!(code, Code::Unimplemented, "{rpc} over gRPC on public port {addr}");
        }
        // A guessed credential changes nothing: the service is not there.
        let guess = "0123456789abcdef0123456789abcdef";
        for (rpc, code) in call_every_internal_rpc(channel(addr).await, Some(guess), &victim.id).await {
            assert_eq!(code, Code::Unimplemented, "{rpc} with a guessed credential on public port {addr}");
        }
        for path in INTERNAL_PATHS {
            // The body does not matter: the route is missing.
            let reply =
                grpc_web::unary(addr, path, &spb::LookupUsersRequest { user_ids: vec![victim.id.clone()] }, None).await;
            assert_eq!(reply.grpc_status.as_deref(), Some("12"), "{path} over gRPC-web on {addr}: UNIMPLEMENTED");
            assert!(reply.message.is_none(), "{path} answered a message over gRPC-web on {addr}");
        }
    }
}

/// Split mode: a service's internal listener answers only calls that carry
/// the service credential (health excepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_listeners_refuse_calls_without_the_service_credential() {
    let Some(c) = Cluster::start(natter_testkit::Mode::Split).await else { return };
    let victim = c.user("victim").await;
    let secret = std::fs::read_to_string(c.credential_file.as_deref().expect("split has a credential")).unwrap();
    let wrong = format!("{}x", &secret[..secret.len() - 1]);
    for (service, addr) in ["sessions", "chats", "messages", "assistant"].into_iter().zip(c.internal_addrs.clone()) {
        for credential in [None, Some(wrong.as_str()), Some("")] {
            for (rpc, code) in call_every_internal_rpc(channel(addr).await, credential, &victim.id).await {
                // A service serves only its own internal API; every call is
                // refused before routing.
                assert_eq!(code, Code::Unauthenticated, "{rpc} on the {service} internal listener with {credential:?}");
            }
        }
        // Reflection there needs the credential too.
        let mut reflection =
            tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel(addr).await);
        let list = tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let refused = reflection.server_reflection_info(futures::stream::iter([list])).await;
        assert_eq!(refused.map(|_| ()).unwrap_err().code(), Code::Unauthenticated, "{service} reflection");
        // Probes need no secret.
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel(addr).await);
        let status = health.check(tonic_health::pb::HealthCheckRequest::default()).await.unwrap().into_inner();
        assert_eq!(status.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    }
    // A service given another credential (replicas mid-rotation) is refused,
    // and tells its own caller UNAVAILABLE: an UNAUTHENTICATED passed on
    // would end the caller's streams and sign a browser out.
    let other = natter_kit::ServiceCredential::new(&format!("{}y", &secret[..secret.len() - 1])).unwrap();
    let link = natter_kit::Link::connect(
        "sessions",
        &format!("http://{}", c.internal_addrs[0]),
        &other,
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    let lookup = link.request(spb::LookupUsersRequest { user_ids: vec![victim.id.clone()] });
    let refused = link.call(SessionInternalServiceClient::new(link.channel()).lookup_users(lookup)).await;
    assert_eq!(refused.map(|_| ()).unwrap_err().code(), Code::Unavailable);
    // With the credential, the owning service answers.
    let sessions_internal = channel(c.internal_addrs[0]).await;
    let mut request = Request::new(spb::LookupUsersRequest { user_ids: vec![victim.id.clone()] });
    request.metadata_mut().insert("natter-service-credential", secret.trim().parse().unwrap());
    let users = SessionInternalServiceClient::new(sessions_internal).lookup_users(request).await.unwrap();
    assert_eq!(users.into_inner().users.len(), 1);
    c.stop().await;
}

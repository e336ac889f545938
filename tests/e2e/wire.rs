//! The wire as outside clients see it: gRPC-web over HTTP/1.1 with CORS,
//! health, and server reflection.

use natter_proto::sessions::v1 as spb;
use natter_testkit::{Cluster, grpc_web};
use prost::Message as _;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

crate::both_modes!(grpc_web_over_http1_with_cors, health_reports_serving, reflection_lists_the_services,);

async fn grpc_web_over_http1_with_cors(c: &Cluster) {
    let path = "/natter.sessions.v1.SessionService/CreateSession";
    let reply = grpc_web::unary(c.addr, path, &spb::CreateSessionRequest::default(), None).await;
    assert_eq!(reply.http_status, 200);
    assert_eq!(reply.grpc_status.as_deref(), Some("0"));
    assert_eq!(reply.allow_origin.as_deref(), Some("*"));
    let session = spb::CreateSessionResponse::decode(reply.message.expect("a message")).unwrap();
    assert!(session.user.unwrap().guest);
    // An error travels in the trailer frame.
    let reply = grpc_web::unary(
        c.addr,
        "/natter.sessions.v1.SessionService/GetCurrentSession",
        &spb::GetCurrentSessionRequest {},
        Some("bogus"),
    )
    .await;
    assert_eq!(reply.grpc_status.as_deref(), Some("16"), "UNAUTHENTICATED");
}

async fn health_reports_serving(c: &Cluster) {
    let mut health = HealthClient::new(c.channel());
    // The edge reports a service SERVING while any of its replicas is.
    let services =
        ["", "natter.sessions.v1.SessionService", "natter.chats.v1.ChatService", "natter.messages.v1.MessageService"];
    for service in services {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

async fn reflection_lists_the_services(c: &Cluster) {
    let mut reflection = ServerReflectionClient::new(c.channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else { panic!("{response:?}") };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "natter.sessions.v1.SessionService",
        "natter.chats.v1.ChatService",
        "natter.messages.v1.MessageService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} in {names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("Internal")), "reflection advertises an internal service: {names:?}");
    // Nor does it describe one when asked by name.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("natter.chats.v1.ChatInternalService".into())),
    };
    let mut responses = reflection.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    match responses.message().await {
        Ok(Some(response)) => assert!(
            matches!(response.message_response, Some(MessageResponse::ErrorResponse(_))),
            "reflection describes ChatInternalService: {response:?}"
        ),
        Ok(None) => panic!("reflection ended without an answer"),
        Err(status) => assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_is_served_at_root_beside_the_api() {
    let dir = tempfile_dir();
    std::fs::write(dir.join("index.html"), "<!doctype html><title>natter</title>").unwrap();
    let web_dir = dir.display().to_string();
    let c = Cluster::all_in_one(&["--web-dir", &web_dir]).await;
    let page = natter_testkit::http_get(c.addr, "/").await;
    assert_eq!(page.0, 200);
    assert!(page.1.contains("<title>natter</title>"));
    assert_eq!(natter_testkit::http_get(c.addr, "/missing.js").await.0, 404);
    // gRPC-web on the same port still works.
    let reply = grpc_web::unary(
        c.addr,
        "/natter.sessions.v1.SessionService/CreateSession",
        &spb::CreateSessionRequest::default(),
        None,
    )
    .await;
    assert_eq!(reply.grpc_status.as_deref(), Some("0"));
    c.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_page_is_served_without_a_web_dir() {
    let c = Cluster::all_in_one(&[]).await;
    let web = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web");
    for (path, file) in [("/", "src/index.html"), ("/app.js", "dist/app.js"), ("/style.css", "src/style.css")] {
        let (status, body) = natter_testkit::http_get(c.addr, path).await;
        assert_eq!(status, 200, "GET {path}");
        assert_eq!(body, std::fs::read_to_string(web.join(file)).unwrap(), "GET {path} serves web/{file}");
    }
    assert_eq!(natter_testkit::http_get(c.addr, "/missing.js").await.0, 404);
    c.stop().await;
    let api_only = Cluster::all_in_one(&["--no-web-page"]).await;
    assert_ne!(natter_testkit::http_get(api_only.addr, "/").await.0, 200, "--no-web-page serves no page");
    api_only.stop().await;
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("natter-web-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_configurable_and_named_in_errors() {
    use natter_proto::chats::v1 as cpb;
    use natter_proto::messages::v1 as mpb;
    use natter_testkit::authed;
    let flags = [
        "--max-text-bytes",
        "10",
        "--max-attachments",
        "1",
        "--max-title-chars",
        "5",
        "--max-group-members",
        "3",
        "--max-request-bytes",
        "4096",
    ];
    let c = Cluster::all_in_one(&flags).await;
    let (alice, bob, carol, dave) =
        (c.user("alice").await, c.user("bob").await, c.user("carol").await, c.user("dave").await);
    let title = c
        .chats()
        .create_chat(authed(&alice, cpb::CreateChatRequest { title: "too long".into(), ..Default::default() }))
        .await
        .unwrap_err();
    assert_eq!(crate::violated_fields(&title), ["title"]);
    assert!(title.message().contains("at most 5"), "{title:?}");
    let crowd = cpb::CreateChatRequest {
        title: "big".into(),
        member_ids: vec![bob.id.clone(), carol.id.clone(), dave.id.clone()],
        ..Default::default()
    };
    assert_eq!(
        crate::violated_fields(&c.chats().create_chat(authed(&alice, crowd)).await.unwrap_err()),
        ["member_ids"]
    );
    let chat = cpb::CreateChatRequest {
        title: "ok".into(),
        member_ids: vec![bob.id.clone(), carol.id.clone()],
        ..Default::default()
    };
    let chat = c.chats().create_chat(authed(&alice, chat)).await.unwrap().into_inner().chat.unwrap();
    let add = cpb::AddMembersRequest { chat_id: chat.id.clone(), user_ids: vec![dave.id.clone()] };
    assert_eq!(crate::violated_fields(&c.chats().add_members(authed(&alice, add)).await.unwrap_err()), ["user_ids"]);
    let long = mpb::SendMessageRequest { chat_id: chat.id.clone(), text: "eleven char".into(), ..Default::default() };
    let status = c.messages().send_message(authed(&alice, long)).await.unwrap_err();
    assert_eq!(crate::violated_fields(&status), ["text"]);
    assert!(status.message().contains("10 bytes"), "{status:?}");
    // A request over the decoded-size limit is refused before any handler runs.
    let huge = mpb::SendMessageRequest { chat_id: chat.id.clone(), text: "x".repeat(8192), ..Default::default() };
    let status = c.messages().send_message(authed(&alice, huge)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    c.stop().await;
}

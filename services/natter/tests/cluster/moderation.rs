//! Staff is granted by configuration only: `--staff-user-ids` on a restart
//! of `natter serve` makes a user see every chat's moderation queue and
//! resolve reports in chats they are not a member of.

use natter_proto::chats::v1::{self as cpb, chat_service_client::ChatServiceClient};
use natter_proto::messages::v1::{self as mpb, message_service_client::MessageServiceClient};
use tonic::Code;

use super::{Node, authed, free_port, user};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_is_granted_by_flag_and_sees_every_chat_s_queue() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = vec!["--data-dir".to_owned(), dir.path().display().to_string()];
    let mut natter = Node::start("serve", port, data.clone());
    let channel = natter.channel().await;
    let (staff_id, staff) = user(&channel, "staff").await;
    let (_, owner) = user(&channel, "owner").await;
    let (reader_id, reader) = user(&channel, "reader").await;
    let create =
        cpb::CreateChatRequest { title: "elsewhere".into(), member_ids: vec![reader_id], ..Default::default() };
    let chat = ChatServiceClient::new(channel.clone())
        .create_chat(authed(&owner, create))
        .await
        .unwrap()
        .into_inner()
        .chat
        .unwrap()
        .id;
    let mut messages = MessageServiceClient::new(channel);
    let send = mpb::SendMessageRequest { chat_id: chat, text: "buy cheap pills".into(), ..Default::default() };
    let spam = messages.send_message(authed(&owner, send)).await.unwrap().into_inner().message.unwrap();
    let report = mpb::ReportMessageRequest {
        message_id: spam.id.clone(),
        reason: mpb::ReportReason::Spam as i32,
        comment: String::new(),
    };
    messages.report_message(authed(&reader, report)).await.unwrap();
    let queue = mpb::ListFlaggedMessagesRequest::default();
    let resolve = mpb::ResolveReportRequest { message_id: spam.id.clone() };
    // Not staff yet: nothing to see, nothing to resolve.
    assert!(
        messages.list_flagged_messages(authed(&staff, queue.clone())).await.unwrap().into_inner().messages.is_empty()
    );
    let refused = messages.resolve_report(authed(&staff, resolve.clone())).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Restarted with the user named staff (sessions survive the restart).
    natter.terminate();
    let mut args = data;
    args.extend(["--staff-user-ids".to_owned(), staff_id]);
    let natter = Node::start("serve", port, args);
    let mut messages = MessageServiceClient::new(natter.channel().await);
    let listed = messages.list_flagged_messages(authed(&staff, queue)).await.unwrap().into_inner().messages;
    assert_eq!(listed.iter().map(|f| f.message.as_ref().unwrap().id.as_str()).collect::<Vec<_>>(), [spam.id.as_str()]);
    assert_eq!(listed[0].open_reports.len(), 1);
    let resolved = messages.resolve_report(authed(&staff, resolve)).await.unwrap().into_inner();
    assert_eq!(resolved.resolved, 1);
}

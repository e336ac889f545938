//! The tonic face of the messages service: authenticate, validate and
//! convert at the boundary, call [`Messages`], convert back.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use natter_auth::Authenticator;
use natter_kit::{id, paging};
use natter_proto::messages::v1::{
    self as pb, message_internal_service_server::MessageInternalService, message_service_server::MessageService,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::{self, Attachment, Limits};
use crate::error::MessagesError;
use crate::registry::{StreamLimits, StreamRegistry};
use crate::service::{Messages, SendRequest, message_pb};
use crate::store::Range;
use crate::stream::{self, EventStream, Follow};

/// Validates a SendMessage request against `limits`: INVALID_ARGUMENT listing
/// every field at fault, before anything reaches the writer's batch.
pub fn send_request(r: pb::SendMessageRequest, limits: &Limits) -> Result<SendRequest, Status> {
    let mut violations = Vec::new();
    if r.attachments.len() > limits.attachments {
        violations.push((
            "attachments".to_owned(),
            format!("at most {} attachments (limit attachments)", limits.attachments),
        ));
    }
    let mut attachments = Vec::with_capacity(r.attachments.len());
    for (i, a) in r.attachments.into_iter().enumerate().take(limits.attachments) {
        let field = format!("attachments[{i}]");
        if a.kind != pb::AttachmentKind::Image as i32 {
            violations.push((format!("{field}.kind"), "must be ATTACHMENT_KIND_IMAGE".to_owned()));
        }
        let a = Attachment {
            url: a.url,
            mime_type: a.mime_type,
            width: a.width,
            height: a.height,
            size_bytes: a.size_bytes,
        };
        violations.extend(domain::check_attachment(&field, &a, limits));
        attachments.push(a);
    }
    if let Err(v) = domain::check_text("text", &r.text, !attachments.is_empty(), limits) {
        violations.push(v);
    }
    if r.reply_to_seq < 0 {
        violations.push(("reply_to_seq".to_owned(), "must not be negative".to_owned()));
    }
    if !violations.is_empty() {
        return Err(MessagesError::Invalid(violations).into());
    }
    Ok(SendRequest {
        chat_id: id::parse("chat_id", &r.chat_id)?,
        message_id: id::parse_optional("message_id", &r.message_id)?,
        text: r.text,
        attachments,
        reply_to_seq: r.reply_to_seq,
    })
}

/// Validates an EditMessage request: (message id, new text).
pub fn edit_request(r: pb::EditMessageRequest, limits: &Limits) -> Result<(Uuid, String), Status> {
    let message_id = id::parse("message_id", &r.message_id)?;
    domain::check_text("text", &r.text, false, limits).map_err(|v| MessagesError::Invalid(vec![v]))?;
    Ok((message_id, r.text))
}

/// The chat ids of a StreamEvents request, parsed and de-duplicated (first
/// occurrence kept, in linear time), and its resume points.
///
/// Errors: INVALID_ARGUMENT naming `chat_ids` or `resume` when either has
/// more than `limits.chats_per_request` entries (checked before anything is
/// parsed), or the first malformed id or negative seq.
pub fn follow_request(
    r: pb::StreamEventsRequest,
    limits: &StreamLimits,
) -> Result<(Vec<Uuid>, HashMap<Uuid, i64>), Status> {
    let max = limits.chats_per_request;
    let mut too_many = Vec::new();
    for (field, len) in [("chat_ids", r.chat_ids.len()), ("resume", r.resume.len())] {
        if len > max {
            too_many.push((field.to_owned(), format!("at most {max} entries (limit max_stream_chats)")));
        }
    }
    if !too_many.is_empty() {
        return Err(MessagesError::Invalid(too_many).into());
    }
    let mut seen = HashSet::with_capacity(r.chat_ids.len());
    let mut chat_ids = Vec::with_capacity(r.chat_ids.len());
    for (i, c) in r.chat_ids.iter().enumerate() {
        let chat = id::parse(&format!("chat_ids[{i}]"), c)?;
        if seen.insert(chat) {
            chat_ids.push(chat);
        }
    }
    let mut resume = HashMap::with_capacity(r.resume.len());
    for (chat, seq) in &r.resume {
        // The key is not echoed: it may be anything up to the request size.
        let chat = Uuid::try_parse(chat).map_err(|_| MessagesError::invalid("resume", "keys must be chat UUIDs"))?;
        if *seq < 0 {
            return Err(MessagesError::invalid(format!("resume[{chat}]"), "must not be negative").into());
        }
        resume.insert(chat, *seq);
    }
    Ok((chat_ids, resume))
}

/// `natter.messages.v1.MessageService`.
#[derive(Clone)]
pub struct MessageApi {
    messages: Arc<Messages>,
    auth: Authenticator,
    shutdown: CancellationToken,
    streams: Arc<StreamRegistry>,
}

impl MessageApi {
    /// The public API; open streams end when `shutdown` is cancelled. Starts
    /// the periodic re-check of open streams' sessions (see
    /// [`StreamRegistry::spawn_session_recheck`]); call within a Tokio
    /// runtime.
    pub fn new(messages: Arc<Messages>, auth: Authenticator, shutdown: CancellationToken) -> Self {
        let streams = StreamRegistry::new(*messages.stream_limits());
        streams.spawn_session_recheck(auth.clone(), shutdown.clone());
        Self { messages, auth, shutdown, streams }
    }

    /// The open streams of this API (for tests).
    pub fn streams(&self) -> &Arc<StreamRegistry> {
        &self.streams
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Uuid, Status> {
        Ok(self.auth.authenticate(request).await?.user_id)
    }
}

#[tonic::async_trait]
impl MessageService for MessageApi {
    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let caller = self.caller(&request).await?;
        let send = send_request(request.into_inner(), self.messages.limits())?;
        let row = self.messages.send(caller, send).await?;
        Ok(Response::new(pb::SendMessageResponse { message: Some(message_pb(row, Vec::new())) }))
    }

    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let chat = id::parse("chat_id", &r.chat_id)?;
        let size = paging::page_size("page_size", r.page_size, 20, 200)?;
        let ascending = match pb::SortOrder::try_from(r.order) {
            Ok(pb::SortOrder::Unspecified | pb::SortOrder::Desc) => false,
            Ok(pb::SortOrder::Asc) => true,
            Err(_) => return Err(MessagesError::invalid("order", "unknown sort order").into()),
        };
        if r.before_seq < 0 {
            return Err(MessagesError::invalid("before_seq", "must not be negative").into());
        }
        if r.after_seq < 0 {
            return Err(MessagesError::invalid("after_seq", "must not be negative").into());
        }
        let range = Range {
            before: (r.before_seq > 0).then_some(r.before_seq),
            after: (r.after_seq > 0).then_some(r.after_seq),
            ascending,
        };
        let fingerprint = paging::fingerprint(&[&chat, &range.before, &range.after, &ascending, &r.include_history]);
        let from = paging::decode("page_token", &r.page_token, fingerprint)?;
        let (messages, next) = self.messages.list(caller, chat, range, from, size, r.include_history).await?;
        Ok(Response::new(pb::ListMessagesResponse {
            messages,
            next_page_token: next.map(|seq| paging::encode(&seq, fingerprint)).unwrap_or_default(),
        }))
    }

    async fn get_message(
        &self,
        request: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::GetMessageResponse>, Status> {
        let caller = self.caller(&request).await?;
        let message_id = id::parse("message_id", &request.into_inner().message_id)?;
        let message = self.messages.get(caller, message_id).await?;
        Ok(Response::new(pb::GetMessageResponse { message: Some(message) }))
    }

    async fn edit_message(
        &self,
        request: Request<pb::EditMessageRequest>,
    ) -> Result<Response<pb::EditMessageResponse>, Status> {
        let caller = self.caller(&request).await?;
        let (message_id, text) = edit_request(request.into_inner(), self.messages.limits())?;
        let message = self.messages.edit(caller, message_id, &text).await?;
        Ok(Response::new(pb::EditMessageResponse { message: Some(message) }))
    }

    async fn delete_message(
        &self,
        request: Request<pb::DeleteMessageRequest>,
    ) -> Result<Response<pb::DeleteMessageResponse>, Status> {
        let caller = self.caller(&request).await?;
        let message_id = id::parse("message_id", &request.into_inner().message_id)?;
        let message = self.messages.delete(caller, message_id).await?;
        Ok(Response::new(pb::DeleteMessageResponse { message: Some(message) }))
    }

    async fn list_message_revisions(
        &self,
        request: Request<pb::ListMessageRevisionsRequest>,
    ) -> Result<Response<pb::ListMessageRevisionsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let message_id = id::parse("message_id", &r.message_id)?;
        let size = paging::page_size("page_size", r.page_size, 50, 200)?;
        let fingerprint = paging::fingerprint(&[&message_id]);
        let after = paging::decode("page_token", &r.page_token, fingerprint)?;
        let (revisions, next) = self.messages.revisions(caller, message_id, after, size).await?;
        Ok(Response::new(pb::ListMessageRevisionsResponse {
            revisions,
            next_page_token: next.map(|k| paging::encode(&k, fingerprint)).unwrap_or_default(),
        }))
    }

    async fn mark_read(&self, request: Request<pb::MarkReadRequest>) -> Result<Response<pb::MarkReadResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let chat = id::parse("chat_id", &r.chat_id)?;
        if r.seq < 0 {
            return Err(MessagesError::invalid("seq", "must not be negative").into());
        }
        let (read_seq, unread_count) = self.messages.mark_read(caller, chat, r.seq).await?;
        Ok(Response::new(pb::MarkReadResponse { read_seq, unread_count }))
    }

    type StreamEventsStream = EventStream;

    async fn stream_events(&self, request: Request<pb::StreamEventsRequest>) -> Result<Response<EventStream>, Status> {
        let principal = self.auth.authenticate(&request).await?;
        let token = natter_auth::bearer_token(request.metadata())?.to_owned();
        let (chat_ids, resume) = follow_request(request.into_inner(), self.streams.limits())?;
        let ticket = self.streams.admit(&principal, &token)?;
        let follow = Follow { principal, token, chat_ids, resume };
        let stream =
            stream::open(self.messages.clone(), self.auth.clone(), self.shutdown.clone(), ticket, follow).await?;
        Ok(Response::new(stream))
    }
}

/// `natter.messages.v1.MessageInternalService`: previews and clean-up for the
/// chats service.
#[derive(Clone)]
pub struct MessageInternalApi {
    messages: Arc<Messages>,
}

impl MessageInternalApi {
    pub fn new(messages: Arc<Messages>) -> Self {
        Self { messages }
    }
}

#[tonic::async_trait]
impl MessageInternalService for MessageInternalApi {
    async fn get_chat_summaries(
        &self,
        request: Request<pb::GetChatSummariesRequest>,
    ) -> Result<Response<pb::GetChatSummariesResponse>, Status> {
        let r = request.into_inner();
        let summaries = self.messages.summaries(&r.chat_ids, &r.user_id).await?;
        Ok(Response::new(pb::GetChatSummariesResponse { summaries }))
    }

    async fn list_recent_messages(
        &self,
        request: Request<pb::ListRecentMessagesRequest>,
    ) -> Result<Response<pb::ListRecentMessagesResponse>, Status> {
        let r = request.into_inner();
        let size = paging::page_size("page_size", r.page_size, 20, 200)?;
        let messages = self.messages.recent(&r.chat_id, size).await?;
        Ok(Response::new(pb::ListRecentMessagesResponse { messages }))
    }

    async fn reset_read_positions(
        &self,
        request: Request<pb::ResetReadPositionsRequest>,
    ) -> Result<Response<pb::ResetReadPositionsResponse>, Status> {
        let r = request.into_inner();
        self.messages.reset_read_positions(&r.chat_id, &r.user_ids).await?;
        Ok(Response::new(pb::ResetReadPositionsResponse {}))
    }

    async fn purge_chat(
        &self,
        request: Request<pb::PurgeChatRequest>,
    ) -> Result<Response<pb::PurgeChatResponse>, Status> {
        self.messages.purge(&request.into_inner().chat_id).await?;
        Ok(Response::new(pb::PurgeChatResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(chat_ids: Vec<String>, resume: Vec<(String, i64)>) -> pb::StreamEventsRequest {
        pb::StreamEventsRequest { chat_ids, resume: resume.into_iter().collect() }
    }

    #[test]
    fn chat_ids_are_deduplicated_in_order() {
        let ids: Vec<Uuid> = (0..500).map(|_| Uuid::now_v7()).collect();
        // Every id three times, interleaved: 1,500 entries, 500 distinct.
        let repeated: Vec<String> = ids.iter().chain(&ids).chain(ids.iter().rev()).map(Uuid::to_string).collect();
        let (chat_ids, _) = follow_request(
            request(repeated, Vec::new()),
            &StreamLimits { chats_per_request: 1500, ..StreamLimits::default() },
        )
        .unwrap();
        assert_eq!(chat_ids, ids);
    }

    #[test]
    fn too_many_chat_ids_or_resume_entries_name_their_field() {
        let limits = StreamLimits { chats_per_request: 3, ..StreamLimits::default() };
        let ids = |n: usize| (0..n).map(|_| Uuid::now_v7().to_string()).collect::<Vec<_>>();
        let fields = |r| {
            let status = follow_request(r, &limits).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            let details = tonic_types::StatusExt::get_error_details(&status);
            details
                .bad_request()
                .expect("field violations")
                .field_violations
                .iter()
                .map(|v| v.field.clone())
                .collect::<Vec<_>>()
        };
        // Refused before parsing: the malformed ids are never looked at.
        let mut bad = ids(3);
        bad.push("not-a-uuid".into());
        assert_eq!(fields(request(bad, Vec::new())), ["chat_ids"]);
        let resume = ids(4).into_iter().map(|c| (c, 0)).collect();
        assert_eq!(fields(request(Vec::new(), resume)), ["resume"]);
        assert!(follow_request(request(ids(3), ids(3).into_iter().map(|c| (c, 1)).collect()), &limits).is_ok());
    }
}

//! The tonic face of the assistant: authenticate, validate, call
//! [`Assistant`], convert back.

use std::sync::Arc;
use std::time::Duration;

use natter_auth::Authenticator;
use natter_kit::FieldViolations;
use natter_proto::assistant::v1::{self as pb, assistant_service_server::AssistantService};
use natter_proto::messages::v1 as mpb;
use tonic::{Request, Response, Status};

use crate::Assistant;

/// Ask's wait for its reply when the request names none.
const ASK_WAIT_DEFAULT: Duration = Duration::from_secs(60);
/// Ask's longest wait for its reply.
const ASK_WAIT_MAX: Duration = Duration::from_secs(300);

/// `natter.assistant.v1.AssistantService`.
#[derive(Clone)]
pub struct AssistantApi {
    assistant: Option<Arc<Assistant>>,
    auth: Authenticator,
    /// The server's `--request-timeout`: no call may take longer.
    request_timeout: Duration,
}

impl AssistantApi {
    /// The public API of `assistant` (None: no assistant configured, every
    /// call FAILED_PRECONDITION once authenticated), on a server whose
    /// calls end at `request_timeout` (`--request-timeout`).
    pub fn new(assistant: Option<Arc<Assistant>>, auth: Authenticator, request_timeout: Duration) -> Self {
        Self { assistant, auth, request_timeout }
    }

    /// The caller's user id and the assistant.
    async fn caller<T>(&self, request: &Request<T>) -> Result<(String, &Arc<Assistant>), Status> {
        let principal = self.auth.authenticate(request).await?;
        let assistant = self.assistant.as_ref().ok_or_else(|| {
            Status::failed_precondition("no assistant is configured (natter serve --assistant-base-url URL)")
        })?;
        Ok((principal.user_id.to_string(), assistant))
    }
}

#[tonic::async_trait]
impl AssistantService for AssistantApi {
    async fn get_or_create_assistant_chat(
        &self,
        request: Request<pb::GetOrCreateAssistantChatRequest>,
    ) -> Result<Response<pb::GetOrCreateAssistantChatResponse>, Status> {
        let (caller, assistant) = self.caller(&request).await?;
        let chat_id = assistant.chat_for(&caller).await?;
        Ok(Response::new(pb::GetOrCreateAssistantChatResponse {
            chat_id,
            assistant_user_id: assistant.user_id().to_owned(),
        }))
    }

    async fn ask(&self, request: Request<pb::AskRequest>) -> Result<Response<pb::AskResponse>, Status> {
        let (caller, assistant) = self.caller(&request).await?;
        // The call ends at the client's deadline or the server's request
        // timeout, whichever comes first: answer a little before it, with
        // the reply as it stands, rather than DEADLINE_EXCEEDED.
        let deadline = natter_kit::time::grpc_timeout(request.metadata())
            .map_or(self.request_timeout, |d| d.min(self.request_timeout));
        let bound = deadline.saturating_sub((deadline / 10).min(Duration::from_secs(1)));
        let r = request.into_inner();
        // Canonical form: the chat's lane and queue are keyed by it.
        let chat_id = natter_kit::id::parse("chat_id", &r.chat_id)?.to_string();
        if r.timeout_seconds < 0 {
            return Err(FieldViolations::single("timeout_seconds", "must not be negative").into_status());
        }
        let wait = match r.timeout_seconds {
            0 => ASK_WAIT_DEFAULT,
            n => Duration::from_secs(n as u64).min(ASK_WAIT_MAX),
        }
        .min(bound);
        let send = mpb::SendMessageRequest { chat_id, message_id: r.message_id, text: r.text, ..Default::default() };
        let (prompt, reply) = assistant.ask(&caller, send, wait).await?;
        Ok(Response::new(pb::AskResponse { prompt: Some(prompt), reply: Some(reply) }))
    }

    async fn regenerate(
        &self,
        request: Request<pb::RegenerateRequest>,
    ) -> Result<Response<pb::RegenerateResponse>, Status> {
        let (caller, assistant) = self.caller(&request).await?;
        let r = request.into_inner();
        // Canonical form, as the request id's: a retry that spells the
        // chat's id in capitals is the same request.
        let chat = natter_kit::id::parse("chat_id", &r.chat_id)?.to_string();
        let edit = match pb::RegenerateMode::try_from(r.mode) {
            Ok(pb::RegenerateMode::Reload) => None,
            Ok(pb::RegenerateMode::Edit) if r.text.trim().is_empty() => {
                return Err(FieldViolations::single("text", "EDIT needs the prompt's new text").into_status());
            }
            Ok(pb::RegenerateMode::Edit) => Some(r.text),
            _ => {
                return Err(FieldViolations::single("mode", "must be REGENERATE_MODE_RELOAD or REGENERATE_MODE_EDIT")
                    .into_status());
            }
        };
        // Canonical form: a retry spelled in capitals is the same request.
        let request_id = match r.request_id.as_str() {
            "" => None,
            id => Some(natter_kit::id::parse("request_id", id)?.to_string()),
        };
        let (reply, prompt) = assistant.regenerate(&caller, &chat, edit, request_id.as_deref()).await?;
        Ok(Response::new(pb::RegenerateResponse { reply: Some(reply), prompt: Some(prompt) }))
    }

    async fn stop_generation(
        &self,
        request: Request<pb::StopGenerationRequest>,
    ) -> Result<Response<pb::StopGenerationResponse>, Status> {
        let (caller, assistant) = self.caller(&request).await?;
        // Canonical form: the generation to cancel here is keyed by it.
        let id = natter_kit::id::parse("message_id", &request.get_ref().message_id)?.to_string();
        let reply = assistant.stop(&caller, &id).await?;
        Ok(Response::new(pb::StopGenerationResponse { reply: Some(reply) }))
    }
}

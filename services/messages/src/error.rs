//! The messages service's errors and their gRPC status codes.

use tonic::Status;
use tonic_types::StatusExt as _;

use crate::store::StoreError;

/// Everything that can go wrong in the messages service.
#[derive(Debug, thiserror::Error)]
pub enum MessagesError {
    /// Request fields break rules (INVALID_ARGUMENT listing every field).
    #[error(transparent)]
    Invalid(natter_kit::FieldViolations),
    /// No such chat (NOT_FOUND).
    #[error("chat not found")]
    ChatNotFound,
    /// No such message (NOT_FOUND).
    #[error("message not found")]
    MessageNotFound,
    /// The caller may not do this (PERMISSION_DENIED).
    #[error("{0}")]
    Denied(&'static str),
    /// The chat or message state forbids this (FAILED_PRECONDITION).
    #[error("{0}")]
    Precondition(&'static str),
    /// A concurrent operation holds what this needs; try again later
    /// (ABORTED).
    #[error("{0}")]
    Aborted(&'static str),
    /// The message was edited as often as it may be (`--max-message-edits`):
    /// RESOURCE_EXHAUSTED with a google.rpc.QuotaFailure whose subject is
    /// `message:<id>`, as every count quota (the chats service's groups per
    /// user and blocks per user too). No RetryInfo: waiting does not help.
    #[error("message was edited {limit} times, the most allowed")]
    TooManyEdits {
        /// The message's id.
        message: String,
        /// The limit, in edits.
        limit: usize,
    },
    /// The message holds as many distinct reaction emoji as allowed:
    /// RESOURCE_EXHAUSTED with a QuotaFailure whose subject is
    /// `message:<id>`, as [`MessagesError::TooManyEdits`]; another emoji's
    /// removal makes room.
    #[error("message has {limit} distinct reactions, the most allowed: react with one of them")]
    TooManyReactions {
        /// The message's id.
        message: String,
        /// The limit, in distinct emoji.
        limit: usize,
    },
    /// The chat holds as many pinned messages as allowed:
    /// RESOURCE_EXHAUSTED with a QuotaFailure whose subject is
    /// `chat:<id>`, as [`MessagesError::TooManyEdits`]; an unpin makes room.
    #[error("the chat has {limit} pinned messages, the most allowed: unpin one first")]
    TooManyPins {
        /// The chat's id.
        chat: String,
        /// The limit, in pinned messages.
        limit: usize,
    },
    /// A rate limit refused the call (RESOURCE_EXHAUSTED with RetryInfo).
    #[error(transparent)]
    Limited(#[from] natter_kit::limits::Limited),
    /// A client-chosen message id is used by another chat or author (ALREADY_EXISTS).
    #[error("message_id already used by another message")]
    MessageIdTaken,
    /// Another service answered with an error; passed on as it is.
    #[error("{0}")]
    Upstream(#[from] Status),
    /// The store failed (UNAVAILABLE, ABORTED or INTERNAL as
    /// `natter_db::Failure` judges it; cause and `origin` logged only).
    #[error("store error: {source}")]
    Store {
        source: StoreError,
        /// Where the failure became a service error (the `?` that converted it).
        origin: &'static std::panic::Location<'static>,
    },
    /// A write whose caller checked the memberships itself and sent the
    /// members version it saw (StartReply) found a departure, a loss of
    /// rights or the chat's deletion recorded since: ABORTED with the
    /// ErrorInfo reason `MEMBERS_CHANGED` ([`natter_kit::error::members_changed`]),
    /// so the caller checks again, afresh, and writes again.
    #[error("{0}")]
    MembersChanged(&'static str),
    /// The caller holds as many open streams as allowed on this process
    /// (RESOURCE_EXHAUSTED with RetryInfo).
    #[error("too many open streams (at most {limit} per user)")]
    TooManyStreams { limit: usize, retry_after: std::time::Duration },
}

impl MessagesError {
    /// One field violation.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid(natter_kit::FieldViolations::single(field, reason))
    }
}

impl From<StoreError> for MessagesError {
    /// Records the caller's location as the failure's origin.
    #[track_caller]
    fn from(source: StoreError) -> Self {
        Self::Store { source, origin: std::panic::Location::caller() }
    }
}

impl From<natter_kit::FieldViolations> for MessagesError {
    fn from(v: natter_kit::FieldViolations) -> Self {
        Self::Invalid(v)
    }
}

impl From<MessagesError> for Status {
    fn from(e: MessagesError) -> Self {
        match e {
            MessagesError::Invalid(violations) => violations.into_status(),
            MessagesError::ChatNotFound | MessagesError::MessageNotFound => Status::not_found(e.to_string()),
            MessagesError::Denied(_) => Status::permission_denied(e.to_string()),
            MessagesError::Precondition(_) => Status::failed_precondition(e.to_string()),
            MessagesError::TooManyEdits { ref message, .. } => {
                quota(format!("message:{message}"), "edited the most times allowed (--max-message-edits)", &e)
            }
            MessagesError::TooManyReactions { ref message, .. } => {
                quota(format!("message:{message}"), "holds the most distinct reaction emoji allowed", &e)
            }
            MessagesError::TooManyPins { ref chat, .. } => {
                quota(format!("chat:{chat}"), "holds the most pinned messages allowed", &e)
            }
            MessagesError::Aborted(_) => Status::aborted(e.to_string()),
            MessagesError::MembersChanged(why) => natter_kit::error::members_changed(why),
            MessagesError::Limited(limited) => limited.into(),
            MessagesError::MessageIdTaken => Status::already_exists(e.to_string()),
            MessagesError::TooManyStreams { retry_after, .. } => {
                let details = tonic_types::ErrorDetails::with_retry_info(Some(retry_after));
                Status::with_error_details(tonic::Code::ResourceExhausted, e.to_string(), details)
            }
            MessagesError::Upstream(status) => status,
            MessagesError::Store { source, origin } => {
                let failure = source.failure();
                natter_kit::store_failure_at(&source, failure, origin)
            }
        }
    }
}

/// RESOURCE_EXHAUSTED for a count quota that is full: `e`'s message, and a
/// google.rpc.QuotaFailure naming `subject` and the quota (AIP-193).
fn quota(subject: String, description: &str, e: &MessagesError) -> Status {
    let details = tonic_types::ErrorDetails::with_quota_failure_violation(subject, description);
    Status::with_error_details(tonic::Code::ResourceExhausted, e.to_string(), details)
}

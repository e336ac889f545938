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
    /// The message was edited as often as it may be (FAILED_PRECONDITION:
    /// a cap that never refills, so retrying cannot help; RESOURCE_EXHAUSTED
    /// is kept for limits that do, with RetryInfo).
    #[error("message was edited {0} times, the most allowed")]
    TooManyEdits(usize),
    /// The message holds as many distinct reaction emoji as allowed
    /// (FAILED_PRECONDITION, as [`MessagesError::TooManyEdits`]: no wait
    /// helps, only another emoji's removal).
    #[error("message has {0} distinct reactions, the most allowed: react with one of them")]
    TooManyReactions(usize),
    /// The chat holds as many pinned messages as allowed
    /// (FAILED_PRECONDITION, as [`MessagesError::TooManyReactions`]).
    #[error("the chat has {0} pinned messages, the most allowed: unpin one first")]
    TooManyPins(usize),
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
            MessagesError::Precondition(_)
            | MessagesError::TooManyEdits(_)
            | MessagesError::TooManyReactions(_)
            | MessagesError::TooManyPins(_) => Status::failed_precondition(e.to_string()),
            MessagesError::Aborted(_) => Status::aborted(e.to_string()),
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

//! The chats service's errors and their gRPC status codes.

use tonic::Status;

/// Everything that can go wrong in the chats service.
#[derive(Debug, thiserror::Error)]
pub enum ChatsError {
    /// A request field breaks a rule (INVALID_ARGUMENT naming the field).
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// No such chat (NOT_FOUND).
    #[error("chat not found")]
    ChatNotFound,
    /// A named user does not exist (NOT_FOUND).
    #[error("user not found: {0}")]
    UserNotFound(String),
    /// A named member is not in the chat (NOT_FOUND).
    #[error("member not found: {0}")]
    MemberNotFound(String),
    /// The caller may not do this (PERMISSION_DENIED).
    #[error("{0}")]
    Denied(&'static str),
    /// A client-chosen chat id is taken by another chat (ALREADY_EXISTS).
    #[error("chat_id already used by another chat")]
    ChatIdTaken,
    /// The chat's state forbids this (FAILED_PRECONDITION).
    #[error("{0}")]
    Precondition(&'static str),
    /// A rate limit refused the call (RESOURCE_EXHAUSTED with RetryInfo).
    #[error(transparent)]
    Limited(#[from] natter_kit::limits::Limited),
    /// Another service answered with an error; passed on as it is.
    #[error("{0}")]
    Upstream(#[from] Status),
    /// The database failed (INTERNAL, cause logged only).
    #[error("database error: {0}")]
    Db(#[from] natter_db::sqlx::Error),
    /// The database failed on a path of natter-db's own (INTERNAL, cause
    /// logged only).
    #[error("database error: {0}")]
    Store(#[from] natter_db::DbError),
}

impl ChatsError {
    /// A field violation.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid { field: field.into(), reason: reason.into() }
    }
}

impl From<ChatsError> for Status {
    fn from(e: ChatsError) -> Self {
        match e {
            ChatsError::Invalid { field, reason } => natter_kit::error::invalid_argument(&field, reason),
            ChatsError::ChatNotFound | ChatsError::UserNotFound(_) | ChatsError::MemberNotFound(_) => {
                Status::not_found(e.to_string())
            }
            ChatsError::Denied(_) => Status::permission_denied(e.to_string()),
            ChatsError::ChatIdTaken => Status::already_exists(e.to_string()),
            ChatsError::Precondition(_) => Status::failed_precondition(e.to_string()),
            ChatsError::Limited(limited) => limited.into(),
            ChatsError::Upstream(status) => status,
            ChatsError::Db(e) => natter_kit::internal(e),
            ChatsError::Store(e) => natter_kit::internal(e),
        }
    }
}

//! The sessions service's errors and their gRPC status codes.

use tonic::Status;

/// Everything that can go wrong in the sessions service.
#[derive(Debug, thiserror::Error)]
pub enum SessionsError {
    /// A request field breaks a rule (INVALID_ARGUMENT naming the field).
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The username is taken (ALREADY_EXISTS).
    #[error("username already taken")]
    UsernameTaken,
    /// Log-in failed (UNAUTHENTICATED, the same for unknown user and wrong password).
    #[error("invalid username or password")]
    BadCredentials,
    /// No such session of the caller (NOT_FOUND).
    #[error("session not found")]
    SessionNotFound,
    /// No such user (NOT_FOUND).
    #[error("user not found")]
    UserNotFound,
    /// A rate limit or the log-in back-off refused the call
    /// (RESOURCE_EXHAUSTED with RetryInfo).
    #[error(transparent)]
    Limited(#[from] natter_kit::limits::Limited),
    /// ClaimAccount by a user that is not a guest (FAILED_PRECONDITION).
    #[error("account already has a username and password")]
    NotGuest,
    /// The database failed (INTERNAL, cause logged only).
    #[error("database error: {0}")]
    Db(#[from] natter_db::sqlx::Error),
    /// Anything else unexpected (INTERNAL, cause logged only).
    #[error("internal error: {0}")]
    Internal(String),
}

impl SessionsError {
    /// A field violation.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid { field, reason: reason.into() }
    }
}

impl From<SessionsError> for Status {
    fn from(e: SessionsError) -> Self {
        match e {
            SessionsError::Invalid { field, reason } => natter_kit::error::invalid_argument(field, reason),
            SessionsError::UsernameTaken => Status::already_exists(e.to_string()),
            SessionsError::BadCredentials => Status::unauthenticated(e.to_string()),
            SessionsError::SessionNotFound | SessionsError::UserNotFound => Status::not_found(e.to_string()),
            SessionsError::NotGuest => Status::failed_precondition(e.to_string()),
            SessionsError::Limited(limited) => limited.into(),
            SessionsError::Db(e) => natter_kit::internal(e),
            SessionsError::Internal(e) => natter_kit::internal(e),
        }
    }
}

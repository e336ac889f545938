//! The sessions service's errors and their gRPC status codes.
//!
//! The shape every natter service shares: request faults are one
//! `Invalid(FieldViolations)`; every database failure is one
//! `Store { source, origin }`, whose `origin` is the `?` that turned the
//! database error into a service error (a `#[track_caller]` `From`), so the
//! log line of an INTERNAL answer names the failing statement, not this file.

use std::panic::Location;

use natter_db::sqlx;
use natter_kit::FieldViolations;
use tonic::Status;

/// Everything that can go wrong in the sessions service.
#[derive(Debug, thiserror::Error)]
pub enum SessionsError {
    /// Request fields break a rule (INVALID_ARGUMENT naming each field).
    #[error(transparent)]
    Invalid(FieldViolations),
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
    /// DeleteAccount with a password that does not match
    /// (PERMISSION_DENIED: the token is good, the confirmation is not).
    #[error("password does not match")]
    WrongPassword,
    /// DeleteAccount of an account claimed or changed between its checks
    /// and the deletion (FAILED_PRECONDITION: try again).
    #[error("the account changed while it was being deleted; try again")]
    AccountChanged,
    /// The caller's session ended during the call (UNAUTHENTICATED).
    #[error("invalid, expired or revoked token")]
    SessionEnded,
    /// ChangePassword by a guest, which has none (FAILED_PRECONDITION).
    #[error("a guest has no password: claim the account (ClaimAccount) first")]
    NoPassword,
    /// ChangePassword of a password changed between its check and the
    /// write (FAILED_PRECONDITION: try again).
    #[error("the password changed meanwhile; try again")]
    PasswordChanged,
    /// UpdateUser of someone else's profile (PERMISSION_DENIED).
    #[error("a user may update only their own profile")]
    NotYourProfile,
    /// ClaimAccount by a user that is not a guest (FAILED_PRECONDITION).
    #[error("account already has a username and password")]
    NotGuest,
    /// The database failed (UNAVAILABLE, ABORTED or INTERNAL as
    /// `natter_db::Failure` judges it; the cause and `origin` are logged
    /// only).
    #[error("database error: {source}")]
    Store {
        /// What the database said.
        source: sqlx::Error,
        /// Where it became a service error: the `?` (or
        /// [`SessionsError::store`] call) in the store or service.
        origin: &'static Location<'static>,
    },
    /// Anything else unexpected (INTERNAL; the cause and `origin` are
    /// logged only).
    #[error("internal error: {reason}")]
    Internal {
        /// What went wrong.
        reason: String,
        /// Where it arose ([`SessionsError::internal`]'s caller).
        origin: &'static Location<'static>,
    },
}

impl SessionsError {
    /// One field violation: `field` is invalid for `reason`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid(FieldViolations::single(field, reason))
    }

    /// A database failure raised here (the caller's location is its origin).
    #[track_caller]
    pub fn store(source: sqlx::Error) -> Self {
        Self::Store { source, origin: Location::caller() }
    }

    /// An unexpected failure raised here (the caller's location is its
    /// origin).
    #[track_caller]
    pub fn internal(reason: impl std::fmt::Display) -> Self {
        Self::Internal { reason: reason.to_string(), origin: Location::caller() }
    }
}

impl From<sqlx::Error> for SessionsError {
    /// A database failure whose origin is the `?` (or `into`) that converts it.
    #[track_caller]
    fn from(source: sqlx::Error) -> Self {
        Self::Store { source, origin: Location::caller() }
    }
}

impl From<SessionsError> for Status {
    fn from(e: SessionsError) -> Self {
        match e {
            SessionsError::Invalid(violations) => violations.into_status(),
            SessionsError::UsernameTaken => Status::already_exists(e.to_string()),
            SessionsError::BadCredentials => Status::unauthenticated(e.to_string()),
            SessionsError::SessionNotFound | SessionsError::UserNotFound => Status::not_found(e.to_string()),
            SessionsError::NotGuest
            | SessionsError::AccountChanged
            | SessionsError::NoPassword
            | SessionsError::PasswordChanged => Status::failed_precondition(e.to_string()),
            SessionsError::WrongPassword | SessionsError::NotYourProfile => Status::permission_denied(e.to_string()),
            SessionsError::SessionEnded => Status::unauthenticated(e.to_string()),
            SessionsError::Limited(limited) => limited.into(),
            SessionsError::Store { source, origin } => {
                natter_kit::store_failure_at(&source, natter_db::Failure::of_sqlx(&source), origin)
            }
            SessionsError::Internal { reason, origin } => natter_kit::internal_at(&reason, origin),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query() -> Result<(), sqlx::Error> {
        Err(sqlx::Error::RowNotFound)
    }

    #[test]
    fn a_database_error_remembers_the_question_mark_that_raised_it() {
        let line = line!() + 1;
        let error = (|| -> Result<(), SessionsError> { Ok(query()?) })().unwrap_err();
        let SessionsError::Store { origin, .. } = &error else { panic!("a store error: {error:?}") };
        assert_eq!((origin.file(), origin.line()), (file!(), line), "the `?`, not the From impl");
        let status = Status::from(error);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "internal error", "nothing of the database reaches the client");
        // A database out of reach is the client's to retry.
        let status = Status::from(SessionsError::store(sqlx::Error::PoolTimedOut));
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::Unavailable, "the database is unavailable; retry later")
        );
    }

    #[test]
    fn field_violations_name_their_field() {
        let status = Status::from(SessionsError::invalid("username", "is required"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "invalid username: is required");
    }
}

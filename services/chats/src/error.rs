//! The chats service's errors and their gRPC status codes.

use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::store::StoreError;

/// Everything that can go wrong in the chats service.
#[derive(Debug, thiserror::Error)]
pub enum ChatsError {
    /// Request fields break rules (INVALID_ARGUMENT with a BadRequest field
    /// violation for each).
    #[error(transparent)]
    Invalid(#[from] natter_kit::FieldViolations),
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
    /// A user's privacy setting does not let the caller add them to a group
    /// (PERMISSION_DENIED naming the user).
    #[error(
        "user {0} may not be added to a group by you (their privacy setting group_adds): they may join a public chat themselves"
    )]
    AddRefused(String),
    /// Adding a user to a group would take them past the groups one user
    /// may be in (`--max-groups-per-user`): RESOURCE_EXHAUSTED naming them,
    /// with a google.rpc.QuotaFailure whose subject is `user:<id>`. No
    /// RetryInfo: waiting does not help, leaving a group does.
    #[error("{}", group_limit_message(user, *limit, *yourself))]
    GroupLimit {
        /// The user's id.
        user: String,
        /// The limit, in groups.
        limit: usize,
        /// The user is the caller.
        yourself: bool,
    },
    /// A user's privacy setting does not let the caller start a direct
    /// chat with them (PERMISSION_DENIED naming the user).
    #[error(
        "user {0} does not take new direct chats from you (their privacy setting direct_chats): share a group with them, or let them start it"
    )]
    DirectRefused(String),
    /// The caller blocks as many users as one may (`--max-blocks-per-user`):
    /// RESOURCE_EXHAUSTED with a google.rpc.QuotaFailure whose subject is
    /// `user:<caller>`. No RetryInfo: unblocking someone makes room.
    #[error("you block {0} users, the most one may: unblock someone first")]
    BlockLimit(usize, String),
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
    /// The store failed (UNAVAILABLE, ABORTED or INTERNAL as
    /// `natter_db::Failure` judges it; the cause is logged with `origin`, the
    /// `?` that turned it into this error).
    #[error("store error: {source}")]
    Store {
        /// What the store reported.
        source: StoreError,
        /// Where it became a service error.
        origin: &'static std::panic::Location<'static>,
    },
}

/// The message of [`ChatsError::GroupLimit`].
fn group_limit_message(user: &str, limit: usize, yourself: bool) -> String {
    if yourself {
        format!("you are in {limit} groups, the most one user may be in: leave one first")
    } else {
        format!("user {user} is in {limit} groups, the most one user may be in: they must leave one first")
    }
}

impl ChatsError {
    /// One field violation: `field` is invalid for `reason`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid(natter_kit::FieldViolations::single(field, reason))
    }
}

impl From<StoreError> for ChatsError {
    /// Records the caller's location (the `?` of the failed store call).
    #[track_caller]
    fn from(source: StoreError) -> Self {
        Self::Store { source, origin: std::panic::Location::caller() }
    }
}

impl From<ChatsError> for Status {
    fn from(e: ChatsError) -> Self {
        match e {
            ChatsError::Invalid(violations) => violations.into_status(),
            ChatsError::ChatNotFound | ChatsError::UserNotFound(_) | ChatsError::MemberNotFound(_) => {
                Status::not_found(e.to_string())
            }
            ChatsError::Denied(_) | ChatsError::AddRefused(_) | ChatsError::DirectRefused(_) => {
                Status::permission_denied(e.to_string())
            }
            ChatsError::ChatIdTaken => Status::already_exists(e.to_string()),
            ChatsError::BlockLimit(_, ref user) => {
                let details = ErrorDetails::with_quota_failure_violation(
                    format!("user:{user}"),
                    "blocks the most users one may (--max-blocks-per-user)",
                );
                Status::with_error_details(tonic::Code::ResourceExhausted, e.to_string(), details)
            }
            ChatsError::GroupLimit { ref user, .. } => {
                let details = ErrorDetails::with_quota_failure_violation(
                    format!("user:{user}"),
                    "a member of the most groups one user may be in (--max-groups-per-user)",
                );
                Status::with_error_details(tonic::Code::ResourceExhausted, e.to_string(), details)
            }
            ChatsError::Precondition(_) => Status::failed_precondition(e.to_string()),
            ChatsError::Limited(limited) => limited.into(),
            ChatsError::Upstream(status) => status,
            ChatsError::Store { source, origin } => {
                let failure = match &source {
                    StoreError::Sqlite(e) => natter_db::Failure::of_sqlite(e),
                    StoreError::Postgres(e) => natter_db::Failure::of_sqlx(e),
                    StoreError::Db(e) => e.failure(),
                    StoreError::Corrupt { .. } | StoreError::Config(_) => natter_db::Failure::Internal,
                };
                natter_kit::store_failure_at(&source, failure, origin)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail() -> Result<(), ChatsError> {
        Err(StoreError::Config("boom".into()))?;
        Ok(())
    }

    #[test]
    fn a_store_error_records_where_it_arose_and_leaks_nothing() {
        let line = line!() - 6;
        let ChatsError::Store { origin, .. } = fail().unwrap_err() else { panic!("a store error") };
        assert_eq!((origin.file(), origin.line()), (file!(), line));
        let status = Status::from(fail().unwrap_err());
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(!status.message().contains("boom"));
    }
}

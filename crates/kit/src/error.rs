//! Mapping errors onto gRPC status codes.
//!
//! INVALID_ARGUMENT carries a `google.rpc.BadRequest` detail (via tonic-types)
//! whose field violations name each offending field, so clients can point at
//! it. Internal failures are logged with their cause and reach the client only
//! as `internal error`: no SQL, no stack, nothing to leak.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Collects field violations of one request, then turns them into a single
/// INVALID_ARGUMENT status listing them all.
///
/// Every service's error enum carries it the same way, as its
/// `Invalid(FieldViolations)` variant. Displayed as the status message:
/// `invalid FIELD: DESCRIPTION` of the first violation.
///
/// At most [`FieldViolations::MAX`] are kept; the rest are counted and
/// reported as one last violation, so that a request of many bad entries
/// (a megabyte of empty ids) cannot make its error many times its size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldViolations {
    violations: Vec<(String, String)>,
    /// Violations recorded beyond [`FieldViolations::MAX`].
    omitted: usize,
}

impl FieldViolations {
    /// Most violations listed one by one; those beyond are counted.
    pub const MAX: usize = 100;

    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` (a proto field path such as `attachments[2].url`)
    /// is invalid, with a human description; beyond [`FieldViolations::MAX`]
    /// only counted.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        if self.violations.len() < Self::MAX {
            self.violations.push((field.into(), description.into()));
        } else {
            self.omitted += 1;
        }
    }

    /// One violation: `field` is invalid for `description`.
    pub fn single(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut v = Self::new();
        v.add(field, description);
        v
    }

    /// The violations recorded, as (field, description), in order (the
    /// first [`FieldViolations::MAX`]).
    pub fn violations(&self) -> &[(String, String)] {
        &self.violations
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }

    /// `Ok(())` when empty, else the INVALID_ARGUMENT status.
    pub fn check(self) -> Result<(), Status> {
        if self.is_empty() { Ok(()) } else { Err(self.into_status()) }
    }

    /// The INVALID_ARGUMENT status: the message names the first field and its
    /// problem; the BadRequest detail lists every violation kept, then (with
    /// an empty field) how many more there were.
    pub fn into_status(self) -> Status {
        let message = self.to_string();
        let mut details = ErrorDetails::new();
        for (field, description) in self.violations {
            details.add_bad_request_violation(field, description);
        }
        if self.omitted > 0 {
            details.add_bad_request_violation("", format!("and {} more violations", self.omitted));
        }
        Status::with_error_details(Code::InvalidArgument, message, details)
    }
}

impl std::fmt::Display for FieldViolations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.violations.first() {
            Some((field, description)) => write!(f, "invalid {field}: {description}"),
            None => f.write_str("invalid argument"),
        }
    }
}

impl std::error::Error for FieldViolations {}

/// INVALID_ARGUMENT for one field, with a BadRequest field violation.
pub fn invalid_argument(field: &str, description: impl Into<String>) -> Status {
    let mut v = FieldViolations::new();
    v.add(field, description);
    v.into_status()
}

/// The `google.rpc.ErrorInfo` reason of [`members_changed`]'s ABORTED.
pub const MEMBERS_CHANGED: &str = "MEMBERS_CHANGED";

/// The `google.rpc.ErrorInfo` domain of natter's own reasons.
pub const ERROR_DOMAIN: &str = "natter.dev";

/// ABORTED with a `google.rpc.ErrorInfo` whose reason is
/// [`MEMBERS_CHANGED`]: a write whose caller made the membership checks
/// itself and sent the members version they saw (StartReply's
/// `members_version`) found a departure, a loss of rights or the chat's
/// deletion recorded since. The caller checks again, afresh, and writes
/// again with the version it then sees. Told apart from any other ABORTED
/// (a busy chat) by [`is_members_changed`].
pub fn members_changed(message: impl Into<String>) -> Status {
    let details = ErrorDetails::with_error_info(MEMBERS_CHANGED, ERROR_DOMAIN, std::collections::HashMap::new());
    Status::with_error_details(Code::Aborted, message, details)
}

/// Whether `status` is a [`members_changed`] refusal (ABORTED, reason
/// [`MEMBERS_CHANGED`]).
pub fn is_members_changed(status: &Status) -> bool {
    status.code() == Code::Aborted
        && status
            .get_details_error_info()
            .is_some_and(|info| info.reason == MEMBERS_CHANGED && info.domain == ERROR_DOMAIN)
}

/// INVALID_ARGUMENT on `update_mask.paths[i]` (AIP-134): `path` is none of
/// `fields`, the paths the update takes, listed in the message. The path is
/// quoted and cut to 64 characters, as the message goes back in a header.
pub fn unknown_mask_path(i: usize, path: &str, fields: &str) -> Status {
    let shown: String = path.chars().take(64).collect();
    invalid_argument(
        &format!("update_mask.paths[{i}]"),
        format!("{shown:?} is not a field that can be updated ({fields})"),
    )
}

/// Logs an unexpected failure with its cause and returns a plain INTERNAL
/// status that reveals nothing of it.
#[track_caller]
pub fn internal(cause: impl std::fmt::Display) -> Status {
    let location = std::panic::Location::caller();
    tracing::error!(%cause, at = %location, "internal error");
    Status::internal("internal error")
}

/// Logs an unexpected failure with its cause and the place it arose,
/// `origin` (the `?` that first turned it into a service error, captured
/// with `#[track_caller]`), and returns a plain INTERNAL status that reveals
/// nothing of it.
///
/// Every service's error enum keeps its store failures as
/// `Store { source, origin }`, filled by a `#[track_caller]` `From`, and
/// maps that variant here: the log then points at the operation that
/// failed, not at the error module.
pub fn internal_at(cause: impl std::fmt::Display, origin: &'static std::panic::Location<'static>) -> Status {
    tracing::error!(%cause, at = %origin, "internal error");
    Status::internal("internal error")
}

/// The status of a failed store call, `failure` as `natter_db` judged it,
/// revealing nothing of `cause` (logged with `origin`, as in
/// [`internal_at`]): UNAVAILABLE for a database out of reach, overloaded
/// or shutting down (a warning: the operator's matter, the client retries
/// with a backoff), ABORTED for a transaction the database aborted for a
/// concurrent one (retry the call), INTERNAL otherwise.
pub fn store_failure_at(
    cause: impl std::fmt::Display,
    failure: natter_db::Failure,
    origin: &'static std::panic::Location<'static>,
) -> Status {
    match failure {
        natter_db::Failure::Unavailable => {
            tracing::warn!(%cause, at = %origin, "database unavailable");
            Status::unavailable("the database is unavailable; retry later")
        }
        natter_db::Failure::Conflict => {
            tracing::warn!(%cause, at = %origin, "transaction aborted for a concurrent one");
            Status::aborted("the change conflicted with a concurrent one; retry")
        }
        natter_db::Failure::Internal => internal_at(cause, origin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_members_changed_refusal_is_told_from_any_other_aborted() {
        let stale = members_changed("the chat's members changed");
        assert_eq!(stale.code(), Code::Aborted);
        assert!(is_members_changed(&stale));
        assert!(!is_members_changed(&Status::aborted("another reply of this chat is being generated")));
        assert!(!is_members_changed(&Status::failed_precondition("the chat's members changed")));
    }

    #[test]
    fn violations_name_every_field() {
        let mut v = FieldViolations::new();
        v.add("text", "must not be empty");
        v.add("chat_id", "must be a UUID");
        let status = v.into_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "invalid text: must not be empty");
        let details = status.get_error_details();
        let fields: Vec<_> = details
            .bad_request()
            .expect("bad request detail")
            .field_violations
            .iter()
            .map(|f| f.field.clone())
            .collect();
        assert_eq!(fields, ["text", "chat_id"]);
    }

    #[test]
    fn a_flood_of_violations_makes_a_small_status() {
        let mut v = FieldViolations::new();
        for i in 0..100_000 {
            v.add(format!("mention_user_ids[{i}]"), "must be a user id (UUID)");
        }
        let status = v.into_status();
        assert_eq!(status.message(), "invalid mention_user_ids[0]: must be a user id (UUID)");
        let violations = status.get_error_details().bad_request().expect("bad request detail").field_violations.clone();
        assert_eq!(violations.len(), FieldViolations::MAX + 1);
        assert_eq!(violations[FieldViolations::MAX - 1].field, "mention_user_ids[99]");
        assert_eq!(violations[FieldViolations::MAX].description, "and 99900 more violations");
        assert!(status.details().len() < 16 * 1024, "{} bytes of details", status.details().len());
    }

    #[test]
    fn internal_hides_its_cause() {
        let status = internal("UNIQUE constraint failed: users.username");
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("UNIQUE"));
    }
}

//! Parsing of UUID ids at the API boundary.

use tonic::Status;
use uuid::Uuid;

use crate::error::invalid_argument;

/// Parses a required UUID field; empty or malformed is INVALID_ARGUMENT
/// naming `field`.
pub fn parse(field: &str, value: &str) -> Result<Uuid, Status> {
    if value.is_empty() {
        return Err(invalid_argument(field, "is required"));
    }
    Uuid::try_parse(value).map_err(|_| invalid_argument(field, "must be a UUID"))
}

/// Parses an optional UUID field: empty is `None`.
pub fn parse_optional(field: &str, value: &str) -> Result<Option<Uuid>, Status> {
    if value.is_empty() { Ok(None) } else { parse(field, value).map(Some) }
}

/// A new time-ordered id (UUID v7, RFC 9562 section 5.7).
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_malformed_and_empty() {
        assert_eq!(parse("chat_id", "nope").unwrap_err().code(), tonic::Code::InvalidArgument);
        assert!(parse("chat_id", "").unwrap_err().message().contains("chat_id"));
        assert_eq!(parse_optional("chat_id", "").unwrap(), None);
        let id = new_id();
        assert_eq!(parse("chat_id", &id.to_string()).unwrap(), id);
    }
}

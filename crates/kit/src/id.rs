//! Parsing of UUID ids at the API boundary, and the id types every
//! service's domain speaks ([`UserId`], [`ChatId`], [`MessageId`]): a UUID
//! that says what it names, so a chat id cannot be passed where a user id
//! is expected. Stores keep them as their lower-case hyphenated text
//! (`Display`), which is also their form on the wire.

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

/// Declares a UUID newtype with parsing at the boundary and its text form.
macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub Uuid);

        impl $name {
            /// Parses a required field: empty or malformed is
            /// INVALID_ARGUMENT naming `field`.
            pub fn parse(field: &str, value: &str) -> Result<Self, Status> {
                parse(field, value).map(Self)
            }

            /// Parses an optional field: empty is `None`.
            pub fn parse_optional(field: &str, value: &str) -> Result<Option<Self>, Status> {
                parse_optional(field, value).map(|id| id.map(Self))
            }

            /// A new time-ordered id (UUID v7).
            pub fn new_v7() -> Self {
                Self(new_id())
            }

            /// The UUID.
            pub fn uuid(self) -> Uuid {
                self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;

            /// Parses the text a store wrote (any UUID form uuid accepts).
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::try_parse(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }
    };
}

uuid_id!(
    /// A user's id (sessions owns users; chats and messages refer to them).
    UserId
);
uuid_id!(
    /// A chat's id.
    ChatId
);
uuid_id!(
    /// A message's id: client-chosen (for idempotent retries) or UUID v7.
    MessageId
);

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
        let chat = ChatId::parse("chat_id", &id.to_string()).unwrap();
        assert_eq!(chat.to_string().parse::<ChatId>().unwrap(), chat);
        assert!(ChatId::parse("chat_id", "x").unwrap_err().message().contains("chat_id"));
    }
}

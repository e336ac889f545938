//! Chat rules in plain Rust: kinds, roles, visibility, and what a valid new
//! chat or update is. No IO, no tonic.

use natter_kit::limits::{MaxLen, check_str};
use uuid::Uuid;

/// Configurable limits of the chats service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest title, in characters (DESIGN: 200).
    pub title_chars: usize,
    /// Longest description, in characters.
    pub description_chars: usize,
    /// Most members of a group, the owner included (DESIGN: 1,000).
    pub group_members: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { title_chars: 200, description_chars: 2000, group_members: 1000 }
    }
}

/// Direct (two people, fixed) or group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Group,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Group => "group",
        }
    }

    pub fn parse(s: &str) -> Self {
        if s == "direct" { Kind::Direct } else { Kind::Group }
    }
}

/// Who may see and join a chat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Visibility {
    Private,
    Public,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Private => "private",
            Visibility::Public => "public",
        }
    }

    pub fn parse(s: &str) -> Self {
        if s == "public" { Visibility::Public } else { Visibility::Private }
    }
}

/// A member's role; owners and admins manage members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            _ => Role::Member,
        }
    }

    /// True for owner and admin.
    pub fn manages(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

/// The key that makes a direct chat unique per pair of users.
pub fn direct_key(a: Uuid, b: Uuid) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("{lo}:{hi}")
}

/// Lower case for case-insensitive title search (full Unicode, unlike SQL
/// LOWER on SQLite).
pub fn title_key(title: &str) -> String {
    title.to_lowercase()
}

/// Checks a title against the limit; the error describes the rule broken.
pub fn check_title(title: &str, limits: &Limits) -> Result<(), String> {
    check_str(title, MaxLen::Chars(limits.title_chars))?;
    if title.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    Ok(())
}

/// Checks a description against the limit (and for NUL).
pub fn check_description(description: &str, limits: &Limits) -> Result<(), String> {
    check_str(description, MaxLen::Chars(limits.description_chars))
}

/// Checks a ListChats title query: no longer than a title can be, no NUL.
pub fn check_query(query: &str, limits: &Limits) -> Result<(), String> {
    check_str(query, MaxLen::Chars(limits.title_chars))
}

/// Resolves the kind of a new chat from what the request gave: an explicit
/// kind wins; unspecified means direct for exactly one other member and no
/// title, else group. Errors name the field at fault.
pub fn resolve_kind(requested: Option<Kind>, title: &str, others: usize) -> Result<Kind, (&'static str, String)> {
    let kind = requested.unwrap_or(if others == 1 && title.is_empty() { Kind::Direct } else { Kind::Group });
    match kind {
        Kind::Direct if others != 1 => Err(("member_ids", "a direct chat needs exactly one other member".to_owned())),
        Kind::Direct if !title.is_empty() => Err(("title", "a direct chat has no title".to_owned())),
        Kind::Group if title.is_empty() && others < 2 => {
            Err(("title", "a group chat needs a title or at least two other members".to_owned()))
        }
        k => Ok(k),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_keys_ignore_order() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(direct_key(a, b), direct_key(b, a));
        assert_ne!(direct_key(a, b), direct_key(a, Uuid::now_v7()));
    }

    #[test]
    fn kinds_resolve_as_designed() {
        assert_eq!(resolve_kind(None, "", 1), Ok(Kind::Direct));
        assert_eq!(resolve_kind(None, "team", 1), Ok(Kind::Group));
        assert_eq!(resolve_kind(None, "", 2), Ok(Kind::Group));
        assert_eq!(resolve_kind(None, "solo", 0), Ok(Kind::Group));
        assert!(resolve_kind(None, "", 0).is_err());
        assert!(resolve_kind(Some(Kind::Direct), "", 2).is_err());
        assert!(resolve_kind(Some(Kind::Direct), "x", 1).is_err());
        assert!(resolve_kind(Some(Kind::Group), "", 1).is_err());
    }

    #[test]
    fn titles_are_bounded() {
        let limits = Limits::default();
        assert!(check_title(&"é".repeat(200), &limits).is_ok());
        assert!(check_title(&"é".repeat(201), &limits).is_err());
        assert!(check_description("a\0b", &limits).is_err());
        assert!(check_query(&"q".repeat(201), &limits).is_err());
        assert_eq!(title_key("ÄBC"), "äbc");
    }
}

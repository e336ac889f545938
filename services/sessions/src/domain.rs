//! Identity rules in plain Rust: what a valid username, password and display
//! name are, how tokens are made and hashed, how passwords are hashed.
//! Every string a request brings passes [`check_str`] (length, no NUL)
//! before anything else looks at it.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use natter_kit::limits::{MaxLen, check_str};
use rand::RngCore as _;
use sha2::{Digest, Sha256};

/// Username length bounds, in characters.
pub const USERNAME_LEN: std::ops::RangeInclusive<usize> = 3..=32;
/// Password length bounds, in characters. The upper bound also keeps
/// argon2's input small (it hashes every byte it is given, for the log-ins
/// that fail too).
pub const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 8..=1024;
/// Longest display name, in characters.
pub const DISPLAY_NAME_MAX: usize = 100;

/// A validated username: 3..=32 of `[A-Za-z0-9_.-]`, kept as given; its
/// [`Username::key`] (lower case) is what uniqueness is checked on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    /// Validates a username; the error describes the rule broken.
    pub fn parse(s: &str) -> Result<Self, String> {
        check_str(s, MaxLen::Chars(*USERNAME_LEN.end()))?;
        let len = s.chars().count();
        if !USERNAME_LEN.contains(&len) {
            return Err(format!("must be {} to {} characters", USERNAME_LEN.start(), USERNAME_LEN.end()));
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
            return Err("may contain only letters, digits, '_', '.' and '-'".to_owned());
        }
        Ok(Self(s.to_owned()))
    }

    /// The username as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The case-insensitive uniqueness key.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

/// Validates a new password: 8..=1024 characters (NIST SP 800-63B
/// 5.1.1.2), no NUL.
pub fn check_password(p: &str) -> Result<(), String> {
    check_str(p, MaxLen::Chars(*PASSWORD_LEN.end()))?;
    let len = p.chars().count();
    if PASSWORD_LEN.contains(&len) {
        Ok(())
    } else {
        Err(format!("must be {} to {} characters", PASSWORD_LEN.start(), PASSWORD_LEN.end()))
    }
}

/// Validates a display name: at most 100 characters, no control,
/// invisible or direction-changing characters
/// ([`natter_kit::limits::check_shown_name`]).
pub fn check_display_name(s: &str) -> Result<(), String> {
    check_str(s, MaxLen::Chars(DISPLAY_NAME_MAX))?;
    natter_kit::limits::check_shown_name(s)
}

/// A validated CreateUser or ClaimAccount request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewUser {
    pub username: Username,
    pub password: String,
    /// Trimmed; the username when none was given.
    pub display_name: String,
}

impl NewUser {
    /// Validates the fields; the error names the first field at fault.
    pub fn parse(username: &str, password: &str, display_name: &str) -> Result<Self, (&'static str, String)> {
        let username = Username::parse(username).map_err(|r| ("username", r))?;
        check_password(password).map_err(|r| ("password", r))?;
        let display_name = display_name_or_username(display_name, &username).map_err(|r| ("display_name", r))?;
        Ok(Self { username, password: password.to_owned(), display_name })
    }
}

/// A checked display name, trimmed; the username when none was given.
pub fn display_name_or_username(display_name: &str, username: &Username) -> Result<String, String> {
    check_display_name(display_name)?;
    Ok(match display_name.trim() {
        "" => username.as_str().to_owned(),
        name => name.to_owned(),
    })
}

/// Checks the fields of a log-in before any look-up or hash: at most as long
/// as a valid username and password, no NUL. Shorter or oddly formed ones
/// pass (they simply match no user), so log-in tells nothing more than
/// registration does. The error names the field at fault.
pub fn check_credentials(username: &str, password: &str) -> Result<(), (&'static str, String)> {
    check_str(username, MaxLen::Chars(*USERNAME_LEN.end())).map_err(|r| ("username", r))?;
    check_str(password, MaxLen::Chars(*PASSWORD_LEN.end())).map_err(|r| ("password", r))
}

/// A new bearer token: 256 random bits from the OS-seeded CSPRNG, base64url
/// without padding (43 characters).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The stored form of a token: SHA-256, lower-case hex. A fast hash is enough
/// for 256-bit random secrets (no dictionary to search).
pub fn token_hash(token: &str) -> String {
    // One formatting pass over the digest (a `format!` per byte cost more
    // than the hash itself, on every authenticated call).
    format!("{:x}", Sha256::digest(token.as_bytes()))
}

/// Hashes a password with argon2id (RFC 9106, default parameters
/// m=19 MiB, t=2, p=1) into a PHC string. CPU-heavy: call off the runtime.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Checks a password against a PHC string. CPU-heavy: call off the runtime.
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).map(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok()).unwrap_or(false)
}

/// A display name for a new guest: `Guest` and four hex digits of its id.
pub fn guest_name(id: &uuid::Uuid) -> String {
    let simple = id.simple().to_string();
    format!("Guest {}", &simple[simple.len() - 4..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_follow_the_rules() {
        assert!(Username::parse("alice").is_ok());
        assert!(Username::parse("a.b-c_d9").is_ok());
        assert!(Username::parse("al").is_err());
        assert!(Username::parse(&"x".repeat(33)).is_err());
        assert!(Username::parse("alice smith").is_err());
        assert!(Username::parse("ålice").is_err());
        assert_eq!(Username::parse("Alice").unwrap().key(), "alice");
    }

    #[test]
    fn passwords_hash_and_verify() {
        let phc = hash_password("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &phc));
        assert!(!verify_password("wrong horse", &phc));
        assert!(!verify_password("x", "not a phc string"));
    }

    #[test]
    fn tokens_are_256_bit_and_hashed() {
        let t = new_token();
        assert_eq!(t.len(), 43);
        assert_ne!(t, new_token());
        assert_eq!(token_hash(&t).len(), 64);
        assert_eq!(token_hash(&t), token_hash(&t));
        // Stored hashes must not change form: SHA-256 in lower-case hex
        // (FIPS 180-2's "abc" vector).
        assert_eq!(token_hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn display_names_are_bounded() {
        assert!(check_display_name("Alice").is_ok());
        assert!(check_display_name(&"x".repeat(101)).is_err());
        assert!(check_display_name("a\u{0}b").is_err());
        assert!(check_password("short").is_err());
        assert!(check_password("long enough").is_ok());
        assert!(check_password("long\0enough").is_err());
    }

    #[test]
    fn requests_are_checked_before_any_hash() {
        let user = NewUser::parse("alice", "long enough", "  ").unwrap();
        assert_eq!(user.display_name, "alice");
        assert_eq!(NewUser::parse("alice", "long enough", "Al\0").unwrap_err().0, "display_name");
        assert_eq!(NewUser::parse("al\0ce", "long enough", "").unwrap_err().0, "username");
        assert_eq!(NewUser::parse("alice", &"p".repeat(1025), "").unwrap_err().0, "password");
        assert_eq!(check_credentials("alice", &"p".repeat(1_000_000)).unwrap_err().0, "password");
        assert_eq!(check_credentials("a\0", "x").unwrap_err().0, "username");
        assert!(check_credentials("al", "short").is_ok(), "simply matches no user");
    }
}

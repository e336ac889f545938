//! AIP-158 pagination: `page_size` with a default and a maximum, and opaque
//! `page_token`s carrying a keyset position (never an OFFSET).
//!
//! A token is base64url(JSON `{"k": <key>, "f": <filter fingerprint>}`). The
//! fingerprint binds a token to the filters of the request that produced it,
//! so reusing it with other filters is INVALID_ARGUMENT instead of a silently
//! wrong page.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tonic::Status;

use crate::error::invalid_argument;
use crate::limits::PAGE_TOKEN_MAX_BYTES;

#[derive(Serialize, Deserialize)]
struct Token<K> {
    k: K,
    f: u64,
}

/// Resolves a requested page size: 0 means `default`, above `max` is coerced
/// to `max` (AIP-158), negative is INVALID_ARGUMENT naming `field`.
pub fn page_size(field: &str, requested: i32, default: u32, max: u32) -> Result<u32, Status> {
    match requested {
        n if n < 0 => Err(invalid_argument(field, "must not be negative")),
        0 => Ok(default),
        n => Ok((n as u32).min(max)),
    }
}

/// A 64-bit FNV-1a fingerprint of a request's filters, for binding tokens.
pub fn fingerprint(parts: &[&dyn std::fmt::Debug]) -> u64 {
    let text = format!("{parts:?}");
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Encodes a keyset position into an opaque page token.
pub fn encode<K: Serialize>(key: &K, filter: u64) -> String {
    let json = serde_json::to_vec(&Token { k: key, f: filter }).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

/// Decodes a page token (`field` names it in errors): empty is `None`;
/// garbage, a token over [`PAGE_TOKEN_MAX_BYTES`], one whose key holds a
/// NUL (no key this server issues does, and PostgreSQL refuses it as a query
/// parameter), or a token issued for other filters, is INVALID_ARGUMENT.
///
/// The fingerprint is no secret (anyone can compute it), so a client can
/// forge a token with any key of the right type: keys are query parameters,
/// never trusted beyond that.
pub fn decode<K: DeserializeOwned>(field: &str, token: &str, filter: u64) -> Result<Option<K>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    if token.len() > PAGE_TOKEN_MAX_BYTES {
        return Err(invalid_argument(field, format!("must be at most {PAGE_TOKEN_MAX_BYTES} bytes")));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid_argument(field, "is not a page token issued by this server"))?;
    // JSON can carry U+0000 only as the escape `\u0000`.
    if bytes.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000")) {
        return Err(invalid_argument(field, "is not a page token issued by this server"));
    }
    let token: Token<K> = serde_json::from_slice(&bytes)
        .map_err(|_| invalid_argument(field, "is not a page token issued by this server"))?;
    if token.f != filter {
        return Err(invalid_argument(field, "was issued for a request with different filters"));
    }
    Ok(Some(token.k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bind_to_filters() {
        let f = fingerprint(&[&"desc", &Some(true)]);
        let t = encode(&(17i64, "abc"), f);
        assert_eq!(decode::<(i64, String)>("page_token", &t, f).unwrap(), Some((17, "abc".into())));
        let other = fingerprint(&[&"asc", &Some(true)]);
        assert!(decode::<(i64, String)>("page_token", &t, other).is_err());
        assert!(decode::<(i64, String)>("page_token", "!!", f).is_err());
        assert_eq!(decode::<(i64, String)>("page_token", "", f).unwrap(), None);
    }

    #[test]
    fn forged_tokens_cannot_smuggle_nul_or_bulk() {
        let f = fingerprint(&[&"desc"]);
        let nul = encode(&(1i64, "a\0b"), f);
        assert!(decode::<(i64, String)>("page_token", &nul, f).is_err());
        let long = encode(&(1i64, "x".repeat(2000)), f);
        let status = decode::<(i64, String)>("page_token", &long, f).unwrap_err();
        assert!(status.message().contains("at most 1024 bytes"), "{status:?}");
    }

    #[test]
    fn page_sizes_follow_aip_158() {
        assert_eq!(page_size("page_size", 0, 50, 200).unwrap(), 50);
        assert_eq!(page_size("page_size", 500, 50, 200).unwrap(), 200);
        assert_eq!(page_size("page_size", 7, 50, 200).unwrap(), 7);
        assert!(page_size("page_size", -1, 50, 200).is_err());
    }
}

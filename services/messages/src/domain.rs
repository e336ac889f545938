//! Message rules in plain Rust: text and attachment limits, what a valid new
//! message is, and the validated commands the service works on (built once,
//! at the gRPC boundary). No IO, no tonic.

use natter_kit::id::{ChatId, MessageId, UserId};
use natter_kit::limits::{MaxLen, check_str};
use serde::{Deserialize, Serialize};

use crate::store::{Message, Range, Revision, Seq};

/// Messages per history page when the request names no size (ListMessages,
/// ListRecentMessages).
pub const MESSAGE_PAGE_DEFAULT: u32 = 20;

/// Revisions per page when the request names no size
/// (ListMessageRevisions).
pub const REVISION_PAGE_DEFAULT: u32 = 50;

/// Most messages or revisions per page (DESIGN: page_size at most 200).
pub const PAGE_MAX: u32 = 200;

/// Most changes one RecordChatChanges call records (the chats service sends
/// the changes of a larger operation, such as deleting a chat of more
/// members, in several calls).
pub const CHAT_CHANGES_MAX: usize = 1000;

/// Longest RecordChatChanges idempotency key, in bytes (its keys are ASCII:
/// the proto says characters).
pub const IDEMPOTENCY_KEY_MAX: usize = 64;

/// A validated SendMessage request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendMessage {
    pub chat_id: ChatId,
    /// Client-chosen, for idempotent retries; else the server picks one.
    pub message_id: Option<MessageId>,
    pub text: String,
    pub attachments: Vec<Attachment>,
    pub reply_to: Option<Seq>,
    /// The users it mentions ([`mentions`]), each with its index in the
    /// request's `mention_user_ids` (for the field violation that names a
    /// non-member); their membership is checked by the service, in the
    /// caller's membership check.
    pub mentions: Vec<Mention>,
    /// The thread it replies in (SendMessage's thread_root_seq; the store
    /// resolves a thread reply to its root and checks the root is live).
    pub thread_root: Option<Seq>,
}

/// A mentioned user, with its index in the request's `mention_user_ids`.
pub type Mention = (usize, UserId);

/// Checks SendMessage's `mention_user_ids`: each a UUID, duplicates
/// collapsed (the first kept, with its index), at most [`MENTIONS_MAX`]
/// distinct users, in a list of at most [`MENTION_IDS_MAX`] entries. The
/// errors are field violations (field, description): each malformed
/// `mention_user_ids[i]`, or the list as a whole when too long (then only
/// that: a list beyond the bound is not read).
pub fn mentions(ids: &[String]) -> Result<Vec<Mention>, Vec<(String, String)>> {
    if ids.len() > MENTION_IDS_MAX {
        return Err(vec![("mention_user_ids".to_owned(), format!("at most {MENTION_IDS_MAX} entries"))]);
    }
    let mut violations = Vec::new();
    let mut seen = std::collections::HashSet::with_capacity(ids.len().min(MENTIONS_MAX + 1));
    let mut mentions = Vec::with_capacity(ids.len().min(MENTIONS_MAX));
    for (i, id) in ids.iter().enumerate() {
        match id.parse::<uuid::Uuid>() {
            Ok(user) if seen.insert(user) => mentions.push((i, UserId(user))),
            Ok(_) => {}
            Err(_) => violations.push((format!("mention_user_ids[{i}]"), "must be a user id (UUID)".to_owned())),
        }
    }
    if mentions.len() > MENTIONS_MAX {
        violations.push(("mention_user_ids".to_owned(), format!("at most {MENTIONS_MAX} users")));
    }
    if violations.is_empty() { Ok(mentions) } else { Err(violations) }
}

/// Most users one message mentions (SendMessage's mention_user_ids, after
/// duplicates are collapsed): a message's mention rows, and the membership
/// check of a send, stay small.
pub const MENTIONS_MAX: usize = 50;

/// Most entries of SendMessage's `mention_user_ids`, repeats included
/// (four times [`MENTIONS_MAX`]): a longer list is refused before any entry
/// is read.
pub const MENTION_IDS_MAX: usize = 4 * MENTIONS_MAX;

/// Most distinct emoji one message holds (AddReaction): any number of users
/// may react with each, but a 21st emoji is refused until one goes. Keeps a
/// message's reactions (and every event that carries them) small.
pub const REACTION_EMOJI_MAX: usize = 20;

/// Most pinned messages one chat holds (PinMessage): a 51st pin is refused
/// until one goes. Discord holds a channel to 50 too.
pub const PINS_MAX: usize = 50;

/// Longest short code between its colons (`:thumbs_up:`), in characters.
pub const SHORT_CODE_MAX: usize = 32;

/// Longest emoji grapheme cluster, in bytes of UTF-8: the longest emoji
/// sequences (a family of four with skin tones, a subdivision flag's tag
/// sequence) are under 64.
pub const EMOJI_MAX_BYTES: usize = 64;

/// A validated AddReaction or RemoveReaction request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct React {
    pub message_id: MessageId,
    /// In canonical form ([`canonical_emoji`]).
    pub emoji: String,
    /// Add (else remove).
    pub add: bool,
    /// A removal's emoji as sent, when that differs from `emoji` and
    /// passes [`check_emoji`]: a reaction stored before canonical forms
    /// (the server answered it so) is taken back too.
    pub as_sent: Option<String>,
}

/// A reaction's emoji in canonical form: a short code `:name:` (see
/// [`check_emoji`]) as it is, or one emoji of Unicode's list (UTS #51,
/// emoji-test.txt, by the `emojis` crate) in its fully-qualified form. The
/// forms of one emoji (❤ and ❤️, a keycap without its selector, a
/// text-presentation selector U+FE0E) are thus one reaction and count
/// together, and nothing else rides on an emoji (a joiner, tag characters
/// or selectors where none belongs, which made one user's second 👍 look
/// like the first).
///
/// Errors: what is wrong, for INVALID_ARGUMENT naming `emoji`.
pub fn canonical_emoji(emoji: &str) -> Result<String, String> {
    if emoji.starts_with(':') {
        return check_emoji(emoji).map(|()| emoji.to_owned());
    }
    let one = || "must be one emoji (of Unicode's emoji list) or a :short_code:".to_owned();
    if emoji.is_empty() || emoji.len() > EMOJI_MAX_BYTES {
        return Err(one());
    }
    let emoji_presentation: String = emoji.chars().filter(|c| *c != '\u{FE0E}').collect();
    emojis::get(&emoji_presentation).map(|e| e.as_str().to_owned()).ok_or_else(one)
}

/// The rule reactions were checked by before [`canonical_emoji`], which
/// RemoveReaction still takes (for reactions stored then): either one
/// extended grapheme cluster (UAX
/// #29) of emoji, at most [`EMOJI_MAX_BYTES`], or a short code `:name:`
/// whose name is 1..=[`SHORT_CODE_MAX`] of `[a-z0-9_+-]`. A cluster counts
/// as emoji when it holds a pictographic code point, a pair of regional
/// indicators (a flag) or a keycap, and nothing but emoji code points,
/// skin tone modifiers, variation selectors, joiners (ZWJ) and tags.
pub fn check_emoji(emoji: &str) -> Result<(), String> {
    use unicode_segmentation::UnicodeSegmentation as _;
    if let Some(name) = emoji.strip_prefix(':').and_then(|e| e.strip_suffix(':')) {
        let ok = (1..=SHORT_CODE_MAX).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_+-".contains(&b));
        return if ok {
            Ok(())
        } else {
            Err(format!("a short code is :name: with 1 to {SHORT_CODE_MAX} of a-z 0-9 _ + -"))
        };
    }
    let one = "must be one emoji or a :short_code:";
    if emoji.is_empty() || emoji.len() > EMOJI_MAX_BYTES || emoji.graphemes(true).nth(1).is_some() {
        return Err(one.to_owned());
    }
    let chars: Vec<char> = emoji.chars().collect();
    let regional = |c: char| ('\u{1F1E6}'..='\u{1F1FF}').contains(&c);
    let keycap = chars.len() >= 2
        && (chars[0].is_ascii_digit() || chars[0] == '#' || chars[0] == '*')
        && chars.last() == Some(&'\u{20E3}');
    let flag = chars.len() == 2 && chars.iter().all(|c| regional(*c));
    let has_pictograph = chars.iter().any(|c| pictographic(*c));
    let parts_ok = chars.iter().enumerate().all(|(i, &c)| {
        pictographic(c)
            || regional(c)
            || matches!(c, '\u{200D}' | '\u{FE0E}' | '\u{FE0F}' | '\u{20E3}')
            || ('\u{1F3FB}'..='\u{1F3FF}').contains(&c)
            || ('\u{E0020}'..='\u{E007F}').contains(&c)
            || (i == 0 && keycap)
    });
    if (has_pictograph || flag || keycap) && parts_ok { Ok(()) } else { Err(one.to_owned()) }
}

/// Whether `c` is an emoji-presentation or pictographic code point (an
/// approximation of Unicode's Extended_Pictographic by blocks: the emoji
/// blocks of the supplementary plane and the symbols of the basic one that
/// have an emoji form).
fn pictographic(c: char) -> bool {
    matches!(c,
        '\u{00A9}' | '\u{00AE}' | '\u{203C}' | '\u{2049}' | '\u{2122}' | '\u{2139}'
        | '\u{2194}'..='\u{2199}' | '\u{21A9}'..='\u{21AA}' | '\u{231A}'..='\u{231B}' | '\u{2328}'
        | '\u{23CF}' | '\u{23E9}'..='\u{23F3}' | '\u{23F8}'..='\u{23FA}' | '\u{24C2}'
        | '\u{25AA}'..='\u{25AB}' | '\u{25B6}' | '\u{25C0}' | '\u{25FB}'..='\u{25FE}'
        | '\u{2600}'..='\u{27BF}' | '\u{2934}'..='\u{2935}' | '\u{2B05}'..='\u{2B07}'
        | '\u{2B1B}'..='\u{2B1C}' | '\u{2B50}' | '\u{2B55}' | '\u{3030}' | '\u{303D}' | '\u{3297}'
        | '\u{3299}' | '\u{1F000}'..='\u{1F1E5}' | '\u{1F200}'..='\u{1F3FA}' | '\u{1F400}'..='\u{1FAFF}'
        | '\u{1FC00}'..='\u{1FFFD}')
}

/// A validated EditMessage request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EditMessage {
    pub message_id: MessageId,
    pub text: String,
}

/// A validated ListMessages request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListMessages {
    pub chat_id: ChatId,
    pub range: Range,
    /// The keyset position of a page token: the last seq of the page before.
    pub from: Option<Seq>,
    /// 1..=200.
    pub page_size: u32,
    /// Attach every earlier revision of edited messages.
    pub include_history: bool,
}

/// A validated ListMessageRevisions request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListRevisions {
    pub message_id: MessageId,
    /// The revision a page token ends at.
    pub after: Option<i64>,
    /// 1..=200.
    pub page_size: u32,
}

/// A validated ListReadPositions request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListReadPositions {
    pub chat_id: ChatId,
    /// The user a page token ends at.
    pub after: Option<UserId>,
    /// 1..=200.
    pub page_size: u32,
}

/// A validated MarkRead request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkRead {
    pub chat_id: ChatId,
    /// Clamped to the chat's newest seq.
    pub seq: Seq,
}

/// A message with its earlier revisions, oldest first (empty unless asked
/// for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WithHistory {
    pub message: Message,
    pub history: Vec<Revision>,
}

/// Configurable limits of the messages service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest message text, in bytes of UTF-8 (DESIGN: 32 KiB).
    pub text_bytes: usize,
    /// Most attachments per message (DESIGN: 10).
    pub attachments: usize,
    /// Longest attachment URL, in bytes.
    pub url_bytes: usize,
    /// Most edits of one message (so at most `edits + 1` revisions).
    pub edits: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { text_bytes: 32 * 1024, attachments: 10, url_bytes: 2048, edits: 100 }
    }
}

/// Longest attachment MIME type, in bytes (RFC 6838 4.2: a type and a
/// subtype of at most 127 characters each, and the slash).
pub const MIME_TYPE_MAX_BYTES: usize = 255;

/// An image attachment as stored (JSON in the `attachments` column).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub url: String,
    pub mime_type: String,
    pub width: i32,
    pub height: i32,
    pub size_bytes: i64,
}

/// Encodes attachments for the `attachments` column ('' for none).
pub fn encode_attachments(a: &[Attachment]) -> String {
    if a.is_empty() { String::new() } else { serde_json::to_string(a).unwrap_or_default() }
}

/// Decodes the `attachments` column.
pub fn decode_attachments(s: &str) -> Vec<Attachment> {
    if s.is_empty() { Vec::new() } else { serde_json::from_str(s).unwrap_or_default() }
}

/// A rule broken by one field: (field path, description).
pub type Violation = (String, String);

/// `text` in Unicode Normalization Form C (UAX #15): how natter stores what
/// people send and how it searches. "é" typed as "e" plus a combining
/// accent (as macOS input often sends it) and as one character look the
/// same and must be found by the same query; the search tokenizers (FTS5's
/// unicode61 and ours) split at a combining mark. Text already in NFC (all
/// ASCII, most text) is returned as it is, after one quick scan.
pub fn nfc(text: String) -> String {
    use unicode_normalization::UnicodeNormalization as _;
    match unicode_normalization::is_nfc_quick(text.chars()) {
        unicode_normalization::IsNormalized::Yes => text,
        _ => text.nfc().collect(),
    }
}

/// [`nfc`] of `text`, unless it is too long to be within `max_bytes` once
/// normalized: then as it is (its length fails the check that follows),
/// so a megabyte sent against a limit of 32 KiB costs no normalization.
/// Composition shrinks a text by at most three times (three Hangul jamo
/// of 3 bytes each compose to one syllable of 3: UAX #15), so a text over
/// four times the limit is over it in any form.
pub fn nfc_within(text: String, max_bytes: usize) -> String {
    if text.len() > max_bytes.saturating_mul(4) { text } else { nfc(text) }
}

/// Checks a message text: at most `limits.text_bytes` bytes, no NUL; empty
/// only when `allow_empty` (a message with attachments).
pub fn check_text(field: &str, text: &str, allow_empty: bool, limits: &Limits) -> Result<(), Violation> {
    if text.is_empty() && !allow_empty {
        return Err((field.to_owned(), "must not be empty".to_owned()));
    }
    check_str(text, MaxLen::Bytes(limits.text_bytes)).map_err(|reason| (field.to_owned(), reason))
}

/// Checks one image attachment (`field` is its path, e.g. `attachments[2]`).
pub fn check_attachment(field: &str, a: &Attachment, limits: &Limits) -> Vec<Violation> {
    let mut v = Vec::new();
    let url_ok = (a.url.starts_with("https://") || a.url.starts_with("http://"))
        && a.url.len() > "https://".len()
        && !a.url.chars().any(|c| c.is_whitespace() || c.is_control());
    if let Err(reason) = check_str(&a.url, MaxLen::Bytes(limits.url_bytes)) {
        v.push((format!("{field}.url"), reason));
    } else if !url_ok {
        v.push((format!("{field}.url"), "must be an http(s) URL".to_owned()));
    }
    let image = a.mime_type.get(.."image/".len()).is_some_and(|p| p.eq_ignore_ascii_case("image/"))
        && a.mime_type.len() > "image/".len();
    if let Err(reason) = check_str(&a.mime_type, MaxLen::Bytes(MIME_TYPE_MAX_BYTES)) {
        v.push((format!("{field}.mime_type"), reason));
    } else if !image {
        v.push((format!("{field}.mime_type"), "must be an image/* MIME type".to_owned()));
    }
    if a.width <= 0 {
        v.push((format!("{field}.width"), "must be positive".to_owned()));
    }
    if a.height <= 0 {
        v.push((format!("{field}.height"), "must be positive".to_owned()));
    }
    if a.size_bytes < 0 {
        v.push((format!("{field}.size_bytes"), "must not be negative".to_owned()));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_far_over_its_limit_is_not_normalized_and_fails_its_check() {
        let decomposed = "e\u{301}".repeat(10);
        assert_eq!(nfc_within(decomposed.clone(), 30), "\u{e9}".repeat(10), "within four times: normalized");
        let far = "e\u{301}".repeat(100);
        assert_eq!(nfc_within(far.clone(), 30), far, "over four times: as sent");
        let limits = Limits { text_bytes: 30, ..Limits::default() };
        assert!(check_text("text", &nfc_within(far, 30), false, &limits).is_err());
        // Three jamo of 3 bytes compose to one syllable of 3: 3 times
        // smaller, within the bound.
        let jamo = "\u{1100}\u{1161}\u{11A8}".repeat(10);
        assert_eq!(nfc_within(jamo, 30).len(), 30);
    }

    fn image() -> Attachment {
        Attachment {
            url: "https://img.example/a.png".into(),
            mime_type: "image/png".into(),
            width: 10,
            height: 20,
            size_bytes: 300,
        }
    }

    #[test]
    fn mentions_are_user_ids_collapsed_and_bounded() {
        let (a, b) = (UserId::new_v7(), UserId::new_v7());
        let ids = [a.to_string(), b.to_string(), a.to_string()];
        assert_eq!(mentions(&ids), Ok(vec![(0, a), (1, b)]), "the first of a duplicate is kept");
        assert_eq!(mentions(&[]), Ok(vec![]));
        let fields = |ids: &[String]| mentions(ids).unwrap_err().into_iter().map(|(f, _)| f).collect::<Vec<_>>();
        assert_eq!(
            fields(&[a.to_string(), "@bob".into(), String::new()]),
            ["mention_user_ids[1]", "mention_user_ids[2]"]
        );
        let most: Vec<String> = (0..MENTIONS_MAX).map(|_| UserId::new_v7().to_string()).collect();
        assert_eq!(mentions(&most).unwrap().len(), MENTIONS_MAX);
        // Repeats of the same users do not count against the limit.
        let repeated: Vec<String> = most.iter().chain(&most).cloned().collect();
        assert_eq!(mentions(&repeated).unwrap().len(), MENTIONS_MAX);
        let one_more: Vec<String> = most.iter().cloned().chain([b.to_string()]).collect();
        assert_eq!(fields(&one_more), ["mention_user_ids"]);
    }

    #[test]
    fn text_limits_count_bytes() {
        let limits = Limits::default();
        assert!(check_text("text", &"a".repeat(32 * 1024), false, &limits).is_ok());
        assert!(check_text("text", &"a".repeat(32 * 1024 + 1), false, &limits).is_err());
        // 3-byte characters: 11,000 of them exceed 32 KiB.
        assert!(check_text("text", &"€".repeat(11_000), false, &limits).is_err());
        assert!(check_text("text", "", false, &limits).is_err());
        assert!(check_text("text", "", true, &limits).is_ok());
        assert_eq!(check_text("text", "a\0b", false, &limits).unwrap_err().1, "must not contain NUL (U+0000)");
    }

    #[test]
    fn attachment_strings_are_bounded() {
        let limits = Limits::default();
        let long_mime = Attachment { mime_type: format!("image/{}", "x".repeat(250)), ..image() };
        let v = check_attachment("attachments[0]", &long_mime, &limits);
        assert_eq!(v, [("attachments[0].mime_type".to_owned(), "must be at most 255 bytes".to_owned())]);
        let nul_mime = Attachment { mime_type: "image/p\0g".into(), ..image() };
        assert_eq!(check_attachment("a", &nul_mime, &limits)[0].0, "a.mime_type");
        let long_url = Attachment { url: format!("https://x/{}", "y".repeat(2048)), ..image() };
        assert_eq!(
            check_attachment("a", &long_url, &limits)[0],
            ("a.url".to_owned(), "must be at most 2048 bytes".to_owned())
        );
        assert!(check_attachment("a", &Attachment { mime_type: "IMAGE/PNG".into(), ..image() }, &limits).is_empty());
    }

    #[test]
    fn attachments_are_checked_field_by_field() {
        let limits = Limits::default();
        assert!(check_attachment("attachments[0]", &image(), &limits).is_empty());
        let bad =
            Attachment { url: "ftp://x".into(), mime_type: "text/plain".into(), width: 0, height: -1, size_bytes: -5 };
        let fields: Vec<_> = check_attachment("attachments[3]", &bad, &limits).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "attachments[3].url",
                "attachments[3].mime_type",
                "attachments[3].width",
                "attachments[3].height",
                "attachments[3].size_bytes"
            ]
        );
    }

    /// The forms of one emoji are one reaction; look-alikes that add
    /// joiners, tags or extra selectors to an emoji are refused.
    #[test]
    fn an_emoji_takes_its_fully_qualified_form() {
        for (sent, canonical) in [
            ("❤", "❤\u{FE0F}"),
            ("❤\u{FE0F}", "❤\u{FE0F}"),
            ("❤\u{FE0E}", "❤\u{FE0F}"),
            ("👍", "👍"),
            ("👍\u{FE0F}", "👍"),
            ("👍🏽", "👍🏽"),
            ("1\u{20E3}", "1\u{FE0F}\u{20E3}"),
            ("🏳\u{200D}🌈", "🏳\u{FE0F}\u{200D}🌈"),
            ("👨‍👩‍👧‍👦", "👨‍👩‍👧‍👦"),
            ("🇫🇷", "🇫🇷"),
            (
                "🏴\u{E0067}\u{E0062}\u{E0065}\u{E006E}\u{E0067}\u{E007F}",
                "🏴\u{E0067}\u{E0062}\u{E0065}\u{E006E}\u{E0067}\u{E007F}",
            ),
            (":tada:", ":tada:"),
        ] {
            assert_eq!(canonical_emoji(sent).as_deref(), Ok(canonical), "{sent:?}");
        }
        for bad in [
            "👍\u{E0020}",
            "👍\u{200D}",
            "\u{200D}👍",
            "👍\u{FE0F}\u{FE0F}",
            "a",
            "1",
            "",
            "👍👍",
            ":Tada:",
            "\u{FE0E}",
        ] {
            assert!(canonical_emoji(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_emoji_is_one_emoji_cluster_or_a_short_code() {
        for ok in [
            "👍",
            "👍🏽",
            "❤",
            "❤️",
            "🏳️‍🌈",
            "👨‍👩‍👧‍👦",
            "🇫🇷",
            "1️⃣",
            "#️⃣",
            "🏴\u{E0067}\u{E0062}\u{E0065}\u{E006E}\u{E0067}\u{E007F}",
            "©️",
            ":thumbs_up:",
            ":+1:",
            ":a:",
            &format!(":{}:", "x".repeat(SHORT_CODE_MAX)),
        ] {
            assert_eq!(check_emoji(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "",
            "a",
            "1",
            "ab",
            "👍👍",
            "👍 ",
            " 👍",
            "é",
            "\u{200D}",
            "\u{FE0F}",
            "\u{1F3FB}a",
            "🇫",
            "::",
            ":Thumbs:",
            ":thumbs up:",
            ":thumbs",
            &format!(":{}:", "x".repeat(SHORT_CODE_MAX + 1)),
            "\0",
            "<script>",
        ] {
            assert!(check_emoji(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn attachments_round_trip_through_json() {
        let a = vec![image(), image()];
        assert_eq!(decode_attachments(&encode_attachments(&a)), a);
        assert_eq!(encode_attachments(&[]), "");
        assert!(decode_attachments("").is_empty());
    }
}

//! Full-text search rules in plain Rust: how text splits into words and
//! how a word is normalized, the query language (words, "phrases", `pre*`)
//! and its limits, the snippet shown with a result, and the two engines'
//! forms of a query and of a text. No IO.
//!
//! Both engines match the same words: SQLite's FTS5 `unicode61` tokenizer
//! (with `remove_diacritics 2`) splits and folds the text it indexes, and
//! this module splits and folds the same way for PostgreSQL, which gets a
//! `tsvector` and a `tsquery` built here as literals (no text search
//! parser, no stemming). The query words FTS5 gets are quoted strings, so
//! no user input is ever FTS5 query syntax. The two agree on letters and
//! digits of the scripts FTS5's Unicode 6.1 tables know; the snippet is
//! built here, so it is the same text on both.

use std::collections::BTreeMap;

/// Longest query, in bytes of UTF-8.
pub const QUERY_MAX_BYTES: usize = 256;

/// Most words in a query, phrases' words included.
pub const QUERY_MAX_WORDS: usize = 16;

/// Fewest characters before a prefix's `*`: a shorter prefix matches most
/// of the index.
pub const PREFIX_MIN_CHARS: usize = 3;

/// Results per page when the request names no size.
pub const SEARCH_PAGE_DEFAULT: u32 = 20;

/// Most results per page.
pub const SEARCH_PAGE_MAX: u32 = 100;

/// Words a snippet shows: up to [`SNIPPET_BEFORE`] before the first match,
/// the rest from it on.
pub const SNIPPET_WORDS: usize = 30;

/// Words a snippet shows before the first match.
pub const SNIPPET_BEFORE: usize = 8;

/// What a snippet wraps a matched word in.
pub const MARK_OPEN: &str = "«";
/// See [`MARK_OPEN`].
pub const MARK_CLOSE: &str = "»";
/// Where a snippet cut text off.
pub const ELLIPSIS: &str = "…";

/// Longest normalized word PostgreSQL indexes, in bytes (its lexemes must be
/// under 2 KiB; a query word is at most [`QUERY_MAX_BYTES`] anyway).
const LEXEME_MAX_BYTES: usize = 255;

/// Highest word position a `tsvector` holds (PostgreSQL's limit).
const POSITION_MAX: usize = 16_383;

/// Positions PostgreSQL keeps per lexeme (its limit is 256).
const POSITIONS_PER_LEXEME: usize = 255;

/// A word of a text: where it is (byte offsets) and its normalized form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Word {
    pub start: usize,
    pub end: usize,
    /// Lowercase, Latin diacritics removed.
    pub norm: String,
}

/// Whether `c` belongs to a word: a letter or a digit (Unicode), or a
/// private-use character, as FTS5's `unicode61` sees it (categories L*, N*
/// and Co); a combining mark is a separator there too.
fn word_char(c: char) -> bool {
    let private = matches!(c, '\u{E000}'..='\u{F8FF}' | '\u{F0000}'..='\u{FFFFD}' | '\u{100000}'..='\u{10FFFD}');
    (c.is_alphanumeric() && !unicode_normalization::char::is_combining_mark(c)) || private
}

/// `c` folded as FTS5's `remove_diacritics 2` folds it: a Latin letter with
/// diacritics becomes its base letter ("é", "ǖ", "İ" become "e", "u", "I");
/// anything else stays.
fn fold(c: char) -> char {
    if c.is_ascii() {
        return c;
    }
    let mut base = None;
    let mut marks_only = true;
    unicode_normalization::char::decompose_canonical(c, |d| match base {
        None => base = Some(d),
        Some(_) => marks_only &= unicode_normalization::char::is_combining_mark(d),
    });
    match base {
        Some(b) if b.is_ascii_alphabetic() && marks_only => b,
        _ => c,
    }
}

/// `word` normalized: each character folded (`fold`) and lowercased
/// (one character for one, as FTS5 does).
pub fn normalize(word: &str) -> String {
    word.chars()
        .map(|c| {
            let c = fold(c);
            let mut lower = c.to_lowercase();
            match (lower.next(), lower.next()) {
                (Some(l), None) => l,
                _ => c,
            }
        })
        .collect()
}

/// The words of `text`, in order.
pub fn words(text: &str) -> Vec<Word> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices().chain(std::iter::once((text.len(), ' '))) {
        match (start, word_char(c)) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                out.push(Word { start: s, end: i, norm: normalize(&text[s..i]) });
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// One term of a query: a word, or a phrase of words next to each other;
/// with `prefix`, its last word matches any word it begins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    /// The words as the user typed them.
    pub raw: Vec<String>,
    /// The same words normalized.
    pub norm: Vec<String>,
    pub prefix: bool,
}

/// A parsed query: every term must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub terms: Vec<Term>,
}

impl Query {
    /// Parses `text` (the query language of SearchMessages).
    ///
    /// Errors: the description of what is wrong with it, for a field
    /// violation on `query`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err("is required".into());
        }
        if text.len() > QUERY_MAX_BYTES {
            return Err(format!("must be at most {QUERY_MAX_BYTES} bytes"));
        }
        if text.matches('"').count() % 2 == 1 {
            return Err("has an unbalanced \" (quote a phrase with two)".into());
        }
        let mut terms = Vec::new();
        for (i, part) in text.split('"').enumerate() {
            if i % 2 == 1 {
                terms.extend(Term::of(part, false));
                continue;
            }
            for chunk in part.split_whitespace() {
                let prefix = chunk.ends_with('*');
                let term = Term::of(chunk, prefix);
                if let Some(t) = &term
                    && prefix
                    && t.raw.last().is_some_and(|w| w.chars().count() < PREFIX_MIN_CHARS)
                {
                    return Err(format!("a prefix needs at least {PREFIX_MIN_CHARS} characters before its *"));
                }
                terms.extend(term);
            }
        }
        let count: usize = terms.iter().map(|t| t.raw.len()).sum();
        if count == 0 {
            return Err("has no word to search for (letters or digits)".into());
        }
        if count > QUERY_MAX_WORDS {
            return Err(format!("must have at most {QUERY_MAX_WORDS} words"));
        }
        Ok(Query { terms })
    }

    /// The query as an FTS5 MATCH expression: each term one quoted string
    /// (a phrase, `*` after it for a prefix), the terms side by side (AND).
    /// The strings hold only word characters and spaces, so nothing in them
    /// is FTS5 syntax.
    pub fn fts5(&self) -> String {
        let terms: Vec<String> = self
            .terms
            .iter()
            .map(|t| format!("\"{}\"{}", t.raw.join(" ").replace('"', "\"\""), if t.prefix { " *" } else { "" }))
            .collect();
        terms.join(" ")
    }

    /// The query as a PostgreSQL `tsquery` literal (cast with
    /// `::tsquery`): each term a phrase of lexemes (`<->`), `:*` on a
    /// prefix, the terms joined by `&`.
    pub fn tsquery(&self) -> String {
        let terms: Vec<String> = self
            .terms
            .iter()
            .map(|t| {
                let last = t.norm.len() - 1;
                let words: Vec<String> = t
                    .norm
                    .iter()
                    .enumerate()
                    .map(|(i, w)| format!("{}{}", lexeme(w), if t.prefix && i == last { ":*" } else { "" }))
                    .collect();
                format!("({})", words.join(" <-> "))
            })
            .collect();
        terms.join(" & ")
    }

    /// Whether the normalized word `norm` is one the query looks for.
    fn matches(&self, norm: &str) -> bool {
        self.terms.iter().any(|t| {
            let last = t.norm.len() - 1;
            t.norm.iter().enumerate().any(|(i, w)| norm == w || (t.prefix && i == last && norm.starts_with(w.as_str())))
        })
    }

    /// The snippet of `text` for this query: up to [`SNIPPET_WORDS`]
    /// words around the first matched word (from [`SNIPPET_BEFORE`] words
    /// before it), each matched word wrapped in [`MARK_OPEN`] and
    /// [`MARK_CLOSE`], [`ELLIPSIS`] where text was cut off. The text
    /// between the words shown is kept as it is.
    pub fn snippet(&self, text: &str) -> String {
        let words = words(text);
        if words.is_empty() {
            return String::new();
        }
        let first = words.iter().position(|w| self.matches(&w.norm)).unwrap_or(0);
        let start = first.saturating_sub(SNIPPET_BEFORE);
        let end = (start + SNIPPET_WORDS).min(words.len());
        let mut out = String::new();
        let mut at = if start == 0 { 0 } else { words[start].start };
        if start > 0 {
            out.push_str(ELLIPSIS);
        }
        for w in &words[start..end] {
            out.push_str(&text[at..w.start]);
            if self.matches(&w.norm) {
                out.push_str(MARK_OPEN);
                out.push_str(&text[w.start..w.end]);
                out.push_str(MARK_CLOSE);
            } else {
                out.push_str(&text[w.start..w.end]);
            }
            at = w.end;
        }
        if end == words.len() {
            out.push_str(&text[at..]);
        } else {
            out.push_str(ELLIPSIS);
        }
        out
    }
}

impl Term {
    /// The term of the words in `text` (None: it has none).
    fn of(text: &str, prefix: bool) -> Option<Term> {
        let words = words(text);
        if words.is_empty() {
            return None;
        }
        Some(Term {
            raw: words.iter().map(|w| text[w.start..w.end].to_owned()).collect(),
            norm: words.into_iter().map(|w| w.norm).collect(),
            prefix,
        })
    }
}

/// A validated SearchMessages request.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchMessages {
    pub query: Query,
    /// Only this chat; None: every chat of the caller's.
    pub chat_id: Option<natter_kit::id::ChatId>,
    pub page_size: u32,
    /// Where the page starts (a page token's key).
    pub from: Option<crate::store::SearchCursor>,
    /// Best match first rather than newest first.
    pub relevance: bool,
}

/// A message a search found, with its snippet ([`Query::snippet`]).
#[derive(Clone, Debug)]
pub struct Found {
    pub message: crate::store::Message,
    pub snippet: String,
}

/// `word` as a quoted `tsvector` / `tsquery` lexeme.
fn lexeme(word: &str) -> String {
    format!("'{}'", word.replace('\\', "\\\\").replace('\'', "''"))
}

/// The words of `text` as a PostgreSQL `tsvector` literal (cast with
/// `::tsvector`): each normalized word with its positions (1-based, at most
/// `POSITION_MAX`, at most `POSITIONS_PER_LEXEME` per word); words too
/// long to be a lexeme are left out (no query can name them).
pub fn tsvector(text: &str) -> String {
    let mut positions: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, w) in words(text).into_iter().enumerate() {
        if w.norm.len() > LEXEME_MAX_BYTES {
            continue;
        }
        let at = positions.entry(w.norm).or_default();
        if at.len() < POSITIONS_PER_LEXEME {
            at.push((i + 1).min(POSITION_MAX));
        }
    }
    let entries: Vec<String> = positions
        .into_iter()
        .map(|(w, at)| {
            let at: Vec<String> = at.iter().map(usize::to_string).collect();
            format!("{}:{}", lexeme(&w), at.join(","))
        })
        .collect();
    entries.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norms(text: &str) -> Vec<String> {
        words(text).into_iter().map(|w| w.norm).collect()
    }

    #[test]
    fn words_split_at_anything_but_letters_and_digits_and_fold_case_and_latin_diacritics() {
        assert_eq!(
            norms("Café-au-lait, NAÏVE user@example.com 3.14"),
            ["cafe", "au", "lait", "naive", "user", "example", "com", "3", "14"]
        );
        // Other scripts keep their letters (no Latin folding of й, ά).
        assert_eq!(norms("Привет йогурт άλφα 東京タワー"), ["привет", "йогурт", "άλφα", "東京タワー"]);
        assert!(norms("  -- !! ").is_empty());
    }

    #[test]
    fn a_query_is_words_phrases_and_prefixes() {
        let q = Query::parse(r#"lunch "next Friday" sched*"#).unwrap();
        assert_eq!(q.terms.len(), 3);
        assert_eq!(q.fts5(), r#""lunch" "next Friday" "sched" *"#);
        assert_eq!(q.tsquery(), "('lunch') & ('next' <-> 'friday') & ('sched':*)");
        // Operators of FTS5 or tsquery are just words; punctuation splits.
        let q = Query::parse("a OR b NOT c-d (e) ^f :g").unwrap();
        assert_eq!(q.fts5(), r#""a" "OR" "b" "NOT" "c d" "e" "f" "g""#);
        assert_eq!(q.tsquery(), "('a') & ('or') & ('b') & ('not') & ('c' <-> 'd') & ('e') & ('f') & ('g')");
    }

    #[test]
    fn bad_queries_say_what_is_wrong() {
        for (query, says) in [
            ("", "required"),
            ("   ", "required"),
            ("\"unbalanced", "unbalanced"),
            ("a \"b\" \"c", "unbalanced"),
            ("-- !!", "no word"),
            ("ab*", "prefix"),
            (&"x ".repeat(17), "at most 16 words"),
            (&"y".repeat(257), "at most 256 bytes"),
        ] {
            let err = Query::parse(query).unwrap_err();
            assert!(err.contains(says), "{query:?}: {err}");
        }
        assert!(Query::parse(&"x ".repeat(16)).is_ok());
    }

    #[test]
    fn a_snippet_marks_the_matches_around_the_first() {
        let q = Query::parse("fox jump*").unwrap();
        assert_eq!(q.snippet("The quick brown Fox jumps."), "The quick brown «Fox» «jumps».");
        let long: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
        let text = format!("{} fox {}", long[..20].join(" "), long[20..].join(" "));
        let snippet = q.snippet(&text);
        assert!(snippet.starts_with("…w12 w13"), "{snippet}");
        assert!(snippet.contains("w19 «fox» w20"), "{snippet}");
        assert!(snippet.ends_with("w40…"), "{snippet}");
        // No match found by the words (never expected): the start.
        assert_eq!(Query::parse("zzz").unwrap().snippet("a b"), "a b");
    }

    #[test]
    fn a_tsvector_holds_each_word_once_with_its_positions() {
        assert_eq!(tsvector("b a B it's"), "'a':2 'b':1,3 'it':4 's':5");
        assert_eq!(tsvector(""), "");
        assert_eq!(tsvector(&"z".repeat(300)), "");
    }
}

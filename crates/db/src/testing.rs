//! For store tests: which PostgreSQL to test against, and a schema of each
//! test's own in it.

/// The PostgreSQL URL of `NATTER_TEST_DATABASE_URL`, or None when it is
/// unset (the PostgreSQL half of a store suite is then skipped).
///
/// Panics when it is unset while `CI` is: CI must run both engines, and a
/// suite that skips there would pass without testing anything.
pub fn postgres_url() -> Option<String> {
    match std::env::var("NATTER_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => panic!("CI must set NATTER_TEST_DATABASE_URL"),
        _ => None,
    }
}

/// A schema name no other test uses: `t<time><pid><counter>_<name>`, for a
/// store test that drops it afterwards (`postgres::drop_schema`).
pub fn unique_schema(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("t{nanos}{}{}_{name}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

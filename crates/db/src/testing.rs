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

/// Waits until some session of the PostgreSQL server at `url` waits for a
/// lock that the session of backend `holder` holds (`pg_blocking_pids`),
/// checking every 5 ms: for tests that interleave two transactions by
/// hand, a condition to wait on rather than a time. Panics when `gave_up`
/// turns true first (the other side finished without waiting).
pub async fn wait_until_blocked_by(url: &str, holder: i32, gave_up: impl Fn() -> bool) {
    use sqlx::Connection as _;
    let mut watch = sqlx::PgConnection::connect(url).await.expect("connect to watch the locks");
    loop {
        let waiting: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid)))")
                .bind(holder)
                .fetch_one(&mut watch)
                .await
                .expect("read the locks");
        if waiting {
            return;
        }
        assert!(!gave_up(), "nothing waited for the lock of backend {holder}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

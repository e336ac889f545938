//! PostgreSQL through sqlx's native `Postgres` driver, for a store native to
//! it: one pool whose connections work in the store's own schema.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions as _, Connection as _, Executor as _, PgPool};

use crate::{DbError, valid_schema};

/// Opens a pool of up to `max_connections` to `url` whose connections start
/// with [`session_setup`] for `schema` (created if missing), and runs
/// `migrator` in it.
///
/// A database the URL names that does not exist is created (see
/// [`create_database`]).
///
/// Errors: an invalid schema name ([`valid_schema`]), the server is
/// unreachable (after the pool's 30 s acquire timeout), the database is
/// missing and cannot be created ([`DbError::MissingDatabase`]), or a
/// migration fails.
pub async fn connect(url: &str, schema: &str, max_connections: u32, migrator: &Migrator) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.parse::<PgConnectOptions>()?.disable_statement_logging();
    create_schema(&options, schema).await?;
    let setup = session_setup(schema);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(move |conn, _| {
            let setup = setup.clone();
            Box::pin(async move {
                for statement in setup {
                    conn.execute(AssertSqlSafe(statement)).await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await?;
    crate::run_migrations(migrator, &pool).await?;
    Ok(pool)
}

/// The statements every connection of a store in `schema` starts with: its
/// `search_path`, and PostgreSQL's JIT off. Every natter query is short; the
/// JIT compiles a plan with LLVM once its estimated cost passes
/// `jit_above_cost`, and estimates over skewed chats (one of a million
/// messages beside many small ones) pass it for queries that take a
/// fraction of a millisecond (a page of ListChats summaries spent ~10 ms
/// compiling).
pub(crate) fn session_setup(schema: &str) -> [String; 2] {
    [format!("SET search_path TO {schema}"), "SET jit = off".to_owned()]
}

/// Creates `schema` unless it exists. Replicas starting together may race
/// on the catalog: the loser sees a unique violation, and the schema exists
/// either way.
///
/// Errors: an invalid schema name ([`valid_schema`]), or the server refused.
pub(crate) async fn create_schema(options: &PgConnectOptions, schema: &str) -> Result<(), DbError> {
    if !valid_schema(schema) {
        return Err(DbError::InvalidSchema(schema.to_owned()));
    }
    let mut conn = match sqlx::PgConnection::connect_with(options).await {
        Err(e) if is_missing_database(&e) => {
            create_database(options).await?;
            sqlx::PgConnection::connect_with(options).await?
        }
        connected => connected?,
    };
    let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    if let Err(e) = conn.execute(AssertSqlSafe(create)).await
        && !crate::is_unique_violation(&e)
    {
        return Err(e.into());
    }
    conn.close().await?;
    Ok(())
}

/// Whether `e` says the database the URL names does not exist (SQLSTATE
/// 3D000, invalid_catalog_name).
fn is_missing_database(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("3D000"))
}

/// Creates the database `options` name, connected to the server's
/// `postgres` database as the same user: the README's split-mode block
/// names a `natter` database a fresh server does not have. Replicas
/// starting together race: a loser sees duplicate_database (42P04) or, when
/// the winner's row is not committed yet as it checks, a unique violation
/// on `pg_database` (23505); either way the database exists, and neither is
/// an error.
///
/// Errors: the user may not create databases (or the server refused):
/// [`DbError::MissingDatabase`], which says to create it by hand.
async fn create_database(options: &PgConnectOptions) -> Result<(), DbError> {
    let name = options.get_database().unwrap_or_default().to_owned();
    let missing = |reason: String| DbError::MissingDatabase { name: name.clone(), reason };
    let mut conn = sqlx::PgConnection::connect_with(&options.clone().database("postgres"))
        .await
        .map_err(|e| missing(e.to_string()))?;
    let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match conn.execute(AssertSqlSafe(create)).await {
        Ok(_) => tracing::info!(database = %name, "created the database"),
        Err(sqlx::Error::Database(d)) if matches!(d.code().as_deref(), Some("42P04" | "23505")) => {}
        Err(e) => return Err(missing(e.to_string())),
    }
    conn.close().await?;
    Ok(())
}

/// Drops `schema` and everything in it (for tests that made one of their
/// own).
///
/// Errors: an invalid schema name, or the server refused.
pub async fn drop_schema(url: &str, schema: &str) -> Result<(), DbError> {
    if !valid_schema(schema) {
        return Err(DbError::InvalidSchema(schema.to_owned()));
    }
    let mut conn = sqlx::PgConnection::connect(url).await?;
    conn.execute(AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))).await?;
    conn.close().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A URL naming a database the server does not have yet: natter creates
    /// it (the README's split-mode block needs no `createdb`), and a second
    /// start finds it.
    #[tokio::test]
    async fn a_missing_database_is_created() {
        let Some(url) = crate::testing::postgres_url() else { return };
        let name = crate::testing::unique_schema("db");
        let options: PgConnectOptions = url.parse::<PgConnectOptions>().unwrap().database(&name);
        let (migrator, url) = (Migrator::DEFAULT, options.to_url_lossy());
        let pool = connect(url.as_ref(), "natter_test", 1, &migrator).await.unwrap();
        let (current,): (String,) = sqlx::query_as("SELECT current_database()").fetch_one(&pool).await.unwrap();
        assert_eq!(current, name);
        pool.close().await;
        let again = connect(url.as_ref(), "natter_test", 1, &migrator).await.unwrap();
        again.close().await;
        let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres")).await.unwrap();
        admin.execute(AssertSqlSafe(format!("DROP DATABASE \"{name}\" WITH (FORCE)"))).await.unwrap();
    }

    /// Replicas of a service started together on a fresh server (the
    /// README's split-mode block, a Kubernetes rollout) all find the
    /// database missing and all create it: every one of them starts.
    #[tokio::test]
    async fn replicas_starting_together_all_create_the_missing_database() {
        let Some(url) = crate::testing::postgres_url() else { return };
        let name = crate::testing::unique_schema("db");
        let options: PgConnectOptions = url.parse::<PgConnectOptions>().unwrap().database(&name);
        let url = options.to_url_lossy().to_string();
        let mut replicas = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let url = url.clone();
            replicas.spawn(async move { connect(&url, "natter_test", 1, &Migrator::DEFAULT).await });
        }
        let started = replicas.join_all().await;
        let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres")).await.unwrap();
        for pool in started.iter().flatten() {
            pool.close().await;
        }
        admin.execute(AssertSqlSafe(format!("DROP DATABASE \"{name}\" WITH (FORCE)"))).await.unwrap();
        let failed: Vec<String> = started.into_iter().filter_map(Result::err).map(|e| e.to_string()).collect();
        assert!(failed.is_empty(), "{failed:?}");
    }
}

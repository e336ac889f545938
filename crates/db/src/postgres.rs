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
/// Errors: an invalid schema name ([`valid_schema`]), the server is
/// unreachable (after the pool's 30 s acquire timeout), or a migration fails.
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
    migrator.run(&pool).await?;
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
    let mut conn = sqlx::PgConnection::connect_with(options).await?;
    let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    if let Err(e) = conn.execute(AssertSqlSafe(create)).await
        && !crate::is_unique_violation(&e)
    {
        return Err(e.into());
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

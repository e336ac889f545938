//! The sessions service's SQL. Unique violations become domain errors;
//! nothing else of the database leaves this module.

use natter_db::sqlx;
use natter_db::{Any, Db, SqlBuilder};

use crate::error::SessionsError;

/// A row of `users`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct UserRow {
    pub id: String,
    pub username: Option<String>,
    pub display_name: String,
    pub password_hash: Option<String>,
    pub create_time: i64,
    /// `human`, `guest` or `bot` (migration 0002).
    pub kind: String,
    /// One more at every change of what others see of the user (migration
    /// 0007): orders their `user_updated` events.
    pub profile_version: i64,
}

/// The columns of a [`UserRow`] in a statement's list (a macro, so that
/// `concat!` keeps each statement a `&'static str`).
macro_rules! user_columns {
    () => {
        "id, username, display_name, password_hash, create_time, kind, profile_version"
    };
}

/// `users.kind` of a password user.
pub const HUMAN: &str = "human";
/// `users.kind` of a guest.
pub const GUEST: &str = "guest";
/// `users.kind` of a bot (no password, no sessions).
pub const BOT: &str = "bot";

impl UserRow {
    /// True for a guest (no password until claimed).
    pub fn guest(&self) -> bool {
        self.kind == GUEST
    }
}

/// A row of `sessions`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct SessionRow {
    pub id: String,
    pub user_id: String,
    pub create_time: i64,
    pub expire_time: i64,
}

/// What a token resolves to.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct TokenRow {
    pub id: String,
    pub user_id: String,
    pub expire_time: i64,
    pub revoke_time: Option<i64>,
    pub guest: i64,
}

/// What [`Store::delete_user`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Deletion {
    /// Deleted, with the ids of the sessions that went with it.
    Deleted(Vec<String>),
    /// No such user (deleted already); nothing changed.
    Gone,
    /// Its password hash is not the one checked (claimed or changed
    /// meanwhile); nothing changed.
    Changed,
    /// The caller's session was revoked or expired meanwhile; nothing
    /// changed.
    SessionEnded,
}

/// The sessions tables.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
}

impl Store {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Inserts a user. Errors: UsernameTaken on a duplicate username key.
    pub async fn insert_user(&self, user: &UserRow, username_key: Option<&str>) -> Result<(), SessionsError> {
        sqlx::query(
            "INSERT INTO users (id, username, username_key, display_name, password_hash, create_time, kind) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&user.id)
        .bind(&user.username)
        .bind(username_key)
        .bind(&user.display_name)
        .bind(&user.password_hash)
        .bind(user.create_time)
        .bind(&user.kind)
        .execute(self.db.write())
        .await
        .map_err(|e| taken_or_db(e))?;
        Ok(())
    }

    /// Inserts a user and its first session in one transaction.
    pub async fn insert_user_with_session(
        &self,
        user: &UserRow,
        session: &SessionRow,
        token_hash: &str,
    ) -> Result<(), SessionsError> {
        let mut tx = self.db.write().begin().await?;
        sqlx::query(
            "INSERT INTO users (id, username, username_key, display_name, password_hash, create_time, kind) \
             VALUES ($1, $2, NULL, $3, $4, $5, $6)",
        )
        .bind(&user.id)
        .bind(&user.username)
        .bind(&user.display_name)
        .bind(&user.password_hash)
        .bind(user.create_time)
        .bind(&user.kind)
        .execute(&mut *tx)
        .await?;
        insert_session(&mut *tx, session, token_hash).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Inserts a session.
    pub async fn insert_session(&self, session: &SessionRow, token_hash: &str) -> Result<(), SessionsError> {
        let mut conn = self.db.write().acquire().await?;
        insert_session(&mut *conn, session, token_hash).await
    }

    pub async fn user_by_key(&self, key: &str) -> Result<Option<UserRow>, SessionsError> {
        Ok(sqlx::query_as(concat!("SELECT ", user_columns!(), " FROM users WHERE username_key = $1"))
            .bind(key)
            .fetch_optional(self.db.read())
            .await?)
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<UserRow>, SessionsError> {
        Ok(sqlx::query_as(concat!("SELECT ", user_columns!(), " FROM users WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.db.read())
            .await?)
    }

    /// The users among `ids` that exist, in no particular order.
    pub async fn users_by_ids(&self, ids: &[String]) -> Result<Vec<UserRow>, SessionsError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut q = SqlBuilder::new(concat!("SELECT ", user_columns!(), " FROM users WHERE id IN "));
        q.bind_list(ids.iter().cloned());
        Ok(q.build_as()?.fetch_all(self.db.read()).await?)
    }

    /// The session a token hash belongs to, whatever its state.
    pub async fn session_by_token(&self, token_hash: &str) -> Result<Option<TokenRow>, SessionsError> {
        Ok(sqlx::query_as(
            "SELECT s.id, s.user_id, s.expire_time, s.revoke_time, \
                    CASE WHEN u.kind = 'guest' THEN 1 ELSE 0 END AS guest \
             FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(self.db.read())
        .await?)
    }

    /// One session by id (live or not).
    pub async fn session_by_id(&self, id: &str) -> Result<Option<SessionRow>, SessionsError> {
        Ok(sqlx::query_as("SELECT id, user_id, create_time, expire_time FROM sessions WHERE id = $1")
            .bind(id)
            .fetch_optional(self.db.read())
            .await?)
    }

    /// A user's live sessions, newest first, after the keyset position `before_id`.
    pub async fn live_sessions(
        &self,
        user_id: &str,
        now: i64,
        before_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SessionRow>, SessionsError> {
        let mut q = SqlBuilder::new(
            "SELECT id, user_id, create_time, expire_time FROM sessions WHERE revoke_time IS NULL AND user_id = ",
        );
        q.bind(user_id.to_owned()).push(" AND expire_time > ").bind(now);
        if let Some(before) = before_id {
            q.push(" AND id < ").bind(before.to_owned());
        }
        q.push(" ORDER BY id DESC").limit(limit);
        Ok(q.build_as()?.fetch_all(self.db.read()).await?)
    }

    /// Revokes one live session of a user; false if there was none.
    pub async fn revoke(&self, user_id: &str, session_id: &str, now: i64) -> Result<bool, SessionsError> {
        let done =
            sqlx::query("UPDATE sessions SET revoke_time = $1 WHERE id = $2 AND user_id = $3 AND revoke_time IS NULL")
                .bind(now)
                .bind(session_id)
                .bind(user_id)
                .execute(self.db.write())
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Sets user `user_id`'s display name, a new profile version; returns
    /// the user as this statement left it, None if there is no such user.
    pub async fn set_display_name(&self, user_id: &str, display_name: &str) -> Result<Option<UserRow>, SessionsError> {
        Ok(sqlx::query_as(concat!(
            "UPDATE users SET display_name = $1, profile_version = profile_version + 1 WHERE id = $2 RETURNING ",
            user_columns!()
        ))
        .bind(display_name)
        .bind(user_id)
        .fetch_optional(self.db.write())
        .await?)
    }

    /// Replaces user `user_id`'s password hash `old` by `new`, recording
    /// `keep` (the caller's session) and `now` as the change's (see
    /// [`Store::password_changed_by`]), and revokes, at `now`, every live
    /// session of the user but `keep`, in one transaction; returns the
    /// revoked session ids, None (and nothing changed) when the stored hash
    /// is no longer `old` (changed meanwhile, or the user is gone).
    pub async fn change_password(
        &self,
        user_id: &str,
        old: &str,
        new: &str,
        keep: &str,
        now: i64,
    ) -> Result<Option<Vec<String>>, SessionsError> {
        let mut tx = self.db.write().begin().await?;
        let changed = sqlx::query(
            "UPDATE users SET password_hash = $1, password_change_session = $4, password_change_time = $5 \
             WHERE id = $2 AND password_hash = $3",
        )
        .bind(new)
        .bind(user_id)
        .bind(old)
        .bind(keep)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if changed.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        let rows: Vec<(String,)> = sqlx::query_as(
            "UPDATE sessions SET revoke_time = $1 WHERE user_id = $2 AND id <> $3 AND revoke_time IS NULL RETURNING id",
        )
        .bind(now)
        .bind(user_id)
        .bind(keep)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(rows.into_iter().map(|(id,)| id).collect()))
    }

    /// The password hash session `session_id` set, if it made user
    /// `user_id`'s latest password change ([`Store::change_password`]) at
    /// or after `since` (µs): the hash stored now is that one.
    pub async fn password_changed_by(
        &self,
        user_id: &str,
        session_id: &str,
        since: i64,
    ) -> Result<Option<String>, SessionsError> {
        let found: Option<(Option<String>,)> = sqlx::query_as(
            "SELECT password_hash FROM users \
             WHERE id = $1 AND password_change_session = $2 AND password_change_time >= $3",
        )
        .bind(user_id)
        .bind(session_id)
        .bind(since)
        .fetch_optional(self.db.read())
        .await?;
        Ok(found.and_then(|(hash,)| hash))
    }

    /// Revokes every live session of a user and returns their ids.
    pub async fn revoke_all(&self, user_id: &str, now: i64) -> Result<Vec<String>, SessionsError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "UPDATE sessions SET revoke_time = $1 WHERE user_id = $2 AND revoke_time IS NULL RETURNING id",
        )
        .bind(now)
        .bind(user_id)
        .fetch_all(self.db.write())
        .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Deletes up to `limit` sessions that expired before `before` (µs;
    /// revoked ones too: a revoked session keeps its expiry), oldest
    /// first; returns how many.
    pub async fn purge_sessions(&self, before: i64, limit: i64) -> Result<u64, SessionsError> {
        let done = sqlx::query(
            "DELETE FROM sessions WHERE id IN \
             (SELECT id FROM sessions WHERE expire_time < $1 ORDER BY expire_time LIMIT $2)",
        )
        .bind(before)
        .bind(limit)
        .execute(self.db.write())
        .await?;
        Ok(done.rows_affected())
    }

    /// Deletes up to `limit` guests created before `before` (µs) who have
    /// no session left (each one purged, so expired `--session-retention`
    /// ago), oldest first, and appends each to the `deleted_users` log at
    /// `now`, in one transaction; returns their ids. A guest with a session
    /// still stored, and a claimed guest (now human), stay.
    pub async fn purge_guests(&self, before: i64, now: i64, limit: i64) -> Result<Vec<String>, SessionsError> {
        let mut tx = self.db.write().begin().await?;
        lock_deletion_log(&mut tx).await?;
        let gone: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM users u WHERE kind = 'guest' AND create_time < $1 \
             AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.user_id = u.id) ORDER BY create_time LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let gone: Vec<String> = gone.into_iter().map(|(id,)| id).collect();
        delete_and_log(&mut tx, &gone, now).await?;
        tx.commit().await?;
        Ok(gone)
    }

    /// Deletes user `user_id` and its sessions, and appends it to the
    /// `deleted_users` log at `now`, in one transaction (DeleteAccount),
    /// provided that nothing changed since the caller was checked: its
    /// session `session_id` is still live and its password hash is still
    /// `password_hash` (a guest claimed meanwhile has one now). See
    /// [`Deletion`].
    pub async fn delete_user(
        &self,
        user_id: &str,
        session_id: &str,
        password_hash: Option<&str>,
        now: i64,
    ) -> Result<Deletion, SessionsError> {
        let mut tx = self.db.write().begin().await?;
        lock_deletion_log(&mut tx).await?;
        // Read under the rows' write locks (a write that changes nothing):
        // on PostgreSQL a plain read would not wait for a claim or a
        // revocation under way, whose commit the deletion would then undo
        // unseen; the update waits for it and reads what it committed.
        // SQLite's one writer waits anyway.
        let user: Option<(Option<String>,)> =
            sqlx::query_as("UPDATE users SET kind = kind WHERE id = $1 RETURNING password_hash")
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((hash,)) = user else { return Ok(Deletion::Gone) };
        if hash.as_deref() != password_hash {
            return Ok(Deletion::Changed);
        }
        let live: Option<(String,)> = sqlx::query_as(
            "UPDATE sessions SET revoke_time = revoke_time \
             WHERE id = $1 AND user_id = $2 AND revoke_time IS NULL AND expire_time > $3 RETURNING id",
        )
        .bind(session_id)
        .bind(user_id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if live.is_none() {
            return Ok(Deletion::SessionEnded);
        }
        // The calling token, for a retry of this call (see
        // [`Store::deleted_by_token`]).
        sqlx::query(
            "INSERT INTO deleted_account_tokens (token_hash, delete_time) SELECT token_hash, $2 FROM sessions \
             WHERE id = $1 ON CONFLICT (token_hash) DO NOTHING",
        )
        .bind(session_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let sessions: Vec<(String,)> = sqlx::query_as("DELETE FROM sessions WHERE user_id = $1 RETURNING id")
            .bind(user_id)
            .fetch_all(&mut *tx)
            .await?;
        delete_and_log(&mut tx, &[user_id.to_owned()], now).await?;
        tx.commit().await?;
        Ok(Deletion::Deleted(sessions.into_iter().map(|(id,)| id).collect()))
    }

    /// Whether the token with hash `token_hash` deleted its own account
    /// (DeleteAccount) at or after `since` (µs).
    pub async fn deleted_by_token(&self, token_hash: &str, since: i64) -> Result<bool, SessionsError> {
        let found: Option<(i64,)> = sqlx::query_as(
            "SELECT delete_time FROM deleted_account_tokens WHERE token_hash = $1 AND delete_time >= $2",
        )
        .bind(token_hash)
        .bind(since)
        .fetch_optional(self.db.read())
        .await?;
        Ok(found.is_some())
    }

    /// Forgets the tokens of accounts deleted before `before` (µs); returns
    /// how many.
    pub async fn purge_deleted_account_tokens(&self, before: i64) -> Result<u64, SessionsError> {
        let done = sqlx::query("DELETE FROM deleted_account_tokens WHERE delete_time < $1")
            .bind(before)
            .execute(self.db.write())
            .await?;
        Ok(done.rows_affected())
    }

    /// Up to `limit` entries of the deletion log after `after`, oldest
    /// first: (position, user id, delete time in µs).
    pub async fn deleted_users(&self, after: i64, limit: i64) -> Result<Vec<(i64, String, i64)>, SessionsError> {
        let rows = sqlx::query_as(
            "SELECT position, user_id, delete_time FROM deleted_users WHERE position > $1 ORDER BY position LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(self.db.read())
        .await?;
        Ok(rows)
    }

    /// Gives a guest a username and password, and revokes (at `now`, µs)
    /// every session of the guest in the same transaction: no guest token
    /// ever opens the account (session fixation, OWASP ASVS V3.2.1), even
    /// if the call fails after. UsernameTaken on a duplicate.
    pub async fn claim(
        &self,
        user_id: &str,
        username: &str,
        username_key: &str,
        display_name: &str,
        password_hash: &str,
        now: i64,
    ) -> Result<Claim, SessionsError> {
        let mut tx = self.db.write().begin().await?;
        let done = sqlx::query(
            "UPDATE users SET username = $1, username_key = $2, display_name = $3, password_hash = $4, \
             kind = 'human', profile_version = profile_version + 1 WHERE id = $5 AND kind = 'guest'",
        )
        .bind(username)
        .bind(username_key)
        .bind(display_name)
        .bind(password_hash)
        .bind(user_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| taken_or_db(e))?;
        if done.rows_affected() == 1 {
            let ended: Vec<(String,)> = sqlx::query_as(
                "UPDATE sessions SET revoke_time = $1 WHERE user_id = $2 AND revoke_time IS NULL RETURNING id",
            )
            .bind(now)
            .bind(user_id)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(Claim::Claimed(ended.into_iter().map(|(id,)| id).collect()));
        }
        tx.rollback().await?;
        // Not a guest now: claimed, or deleted, since the caller looked.
        Ok(if self.user_by_id(user_id).await?.is_some() { Claim::NotGuest } else { Claim::Gone })
    }
}

/// What [`Store::claim`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The guest has its username and password now; its sessions (these
    /// ids) ended with the claim.
    Claimed(Vec<String>),
    /// The user is a person (claimed meanwhile, by another of its tabs).
    NotGuest,
    /// The user was deleted meanwhile (DeleteAccount, or the purge of
    /// guests long gone).
    Gone,
}

/// Takes the deletion log's lock row: on PostgreSQL, deletions of two
/// replicas queue here instead of racing for the same positions (see
/// migration 0004).
async fn lock_deletion_log(tx: &mut sqlx::Transaction<'_, Any>) -> Result<(), SessionsError> {
    sqlx::query("UPDATE deleted_users_lock SET runs = runs + 1 WHERE id = 1").execute(&mut **tx).await?;
    Ok(())
}

/// Deletes users `ids` (their sessions gone already) and appends each to
/// the `deleted_users` log at `now`, in `ids` order, after the log's last
/// position. The caller holds the log's lock ([`lock_deletion_log`]).
async fn delete_and_log(tx: &mut sqlx::Transaction<'_, Any>, ids: &[String], now: i64) -> Result<(), SessionsError> {
    let (last,): (i64,) =
        sqlx::query_as("SELECT COALESCE(MAX(position), 0) FROM deleted_users").fetch_one(&mut **tx).await?;
    for (position, id) in (last + 1..).zip(ids) {
        sqlx::query("DELETE FROM users WHERE id = $1").bind(id).execute(&mut **tx).await?;
        sqlx::query("INSERT INTO deleted_users (position, user_id, delete_time) VALUES ($1, $2, $3)")
            .bind(position)
            .bind(id)
            .bind(now)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn insert_session<'c, E>(conn: E, session: &SessionRow, token_hash: &str) -> Result<(), SessionsError>
where
    E: sqlx::Executor<'c, Database = Any>,
{
    sqlx::query("INSERT INTO sessions (id, user_id, token_hash, create_time, expire_time) VALUES ($1, $2, $3, $4, $5)")
        .bind(&session.id)
        .bind(&session.user_id)
        .bind(token_hash)
        .bind(session.create_time)
        .bind(session.expire_time)
        .execute(conn)
        .await
        // Its user was deleted since it was read (DeleteAccount, the purge).
        .map_err(|e| if natter_db::is_foreign_key_violation(&e) { SessionsError::UserNotFound } else { e.into() })?;
    Ok(())
}

/// UsernameTaken for a unique violation, else a database failure whose
/// origin is the caller (call it from a closure at the failing statement).
#[track_caller]
fn taken_or_db(e: sqlx::Error) -> SessionsError {
    if natter_db::is_unique_violation(&e) { SessionsError::UsernameTaken } else { SessionsError::store(e) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest made at time 0, the first user of each test.
    fn guest() -> UserRow {
        UserRow {
            id: "0190a000-0000-7000-8000-000000000001".into(),
            username: None,
            display_name: "guest".into(),
            password_hash: None,
            create_time: 0,
            kind: GUEST.into(),
            profile_version: 0,
        }
    }

    /// A store on SQLite in `dir`.
    async fn sqlite_in(dir: &tempfile::TempDir) -> Store {
        let config = natter_db::DbConfig::sqlite_in(dir.path(), "sessions");
        Store::new(Db::connect(&config, &crate::MIGRATOR).await.unwrap())
    }

    /// Runs `test` on a store on each engine: SQLite in a directory of its
    /// own, then PostgreSQL in a schema of its own, dropped afterwards
    /// (where `NATTER_TEST_DATABASE_URL` is set; CI must set it, see
    /// [`natter_db::testing::postgres_url`]). The statements are the same
    /// text on both, so what differs is the engines' behaviour: types,
    /// NULL ordering, locking.
    async fn on_each_engine<F, Fut>(test: F)
    where
        F: Fn(Store) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let dir = tempfile::tempdir().unwrap();
        test(sqlite_in(&dir).await).await;
        let Some(url) = natter_db::testing::postgres_url() else { return };
        let schema = natter_db::testing::unique_schema("sessions");
        let config = natter_db::DbConfig::postgres(&url, &schema);
        let store = Store::new(Db::connect(&config, &crate::MIGRATOR).await.unwrap());
        test(store.clone()).await;
        store.db().close().await;
        natter_db::postgres::drop_schema(&url, &schema).await.unwrap();
    }

    /// Sessions long expired (or revoked, then expired) are deleted, oldest
    /// first and a batch at a time; live ones stay.
    #[tokio::test]
    async fn sessions_expired_before_the_bound_are_purged_in_batches() {
        on_each_engine(|store| async move {
            let user = guest();
            store.insert_user(&user, None).await.unwrap();
            for (n, expire_time) in [(1, 100), (2, 200), (3, 300), (4, 10_000)] {
                let session = SessionRow {
                    id: format!("0190a000-0000-7000-8000-00000000010{n}"),
                    user_id: user.id.clone(),
                    create_time: 0,
                    expire_time,
                };
                store.insert_session(&session, &format!("hash-{n}")).await.unwrap();
            }
            store.revoke(&user.id, "0190a000-0000-7000-8000-000000000103", 50).await.unwrap();
            assert_eq!(store.purge_sessions(1_000, 2).await.unwrap(), 2, "a batch");
            assert_eq!(store.purge_sessions(1_000, 2).await.unwrap(), 1, "the revoked one, expired too");
            assert_eq!(store.purge_sessions(1_000, 2).await.unwrap(), 0);
            assert!(store.session_by_id("0190a000-0000-7000-8000-000000000104").await.unwrap().is_some(), "live");
            assert!(store.session_by_id("0190a000-0000-7000-8000-000000000101").await.unwrap().is_none());
        })
        .await;
    }

    /// Users and their sessions as the service reads and changes them:
    /// usernames unique by key, live sessions paged newest first without
    /// the revoked or expired, a revoke that finds nothing says so, a
    /// display name bumps the profile version, a password change with a
    /// stale hash changes nothing and one with the current hash revokes
    /// every other session not revoked yet, and revoking all ends the rest.
    #[tokio::test]
    async fn users_and_sessions_are_read_and_changed_alike_on_each_engine() {
        on_each_engine(|store| async move {
            let id = |n: u32| format!("0190a000-0000-7000-8000-0000000002{n:02}");
            let person = UserRow {
                id: id(1),
                username: Some("Alice".into()),
                display_name: "Alice".into(),
                password_hash: Some("phc-1".into()),
                create_time: 1,
                kind: HUMAN.into(),
                profile_version: 0,
            };
            store.insert_user(&person, Some("alice")).await.unwrap();
            let twin = UserRow { id: id(2), username: Some("ALICE".into()), ..person.clone() };
            let taken = store.insert_user(&twin, Some("alice")).await.unwrap_err();
            assert!(matches!(taken, SessionsError::UsernameTaken), "{taken:?}");
            assert_eq!(store.user_by_key("alice").await.unwrap().map(|u| u.id), Some(person.id.clone()));
            let found = store.users_by_ids(&[person.id.clone(), id(99)]).await.unwrap();
            assert_eq!(found.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(), [person.id.as_str()]);

            let session = |n: u32, expire_time: i64| SessionRow {
                id: id(10 + n),
                user_id: person.id.clone(),
                create_time: 1,
                expire_time,
            };
            for (n, expire_time) in [(1, 1_000), (2, 1_000), (3, 1_000), (4, 50)] {
                store.insert_session(&session(n, expire_time), &format!("hash-{n}")).await.unwrap();
            }
            assert!(store.revoke(&person.id, &id(12), 60).await.unwrap());
            assert!(!store.revoke(&person.id, &id(12), 61).await.unwrap(), "revoked already");
            let page = |before: Option<String>| {
                let store = store.clone();
                let user = person.id.clone();
                async move {
                    let rows = store.live_sessions(&user, 100, before.as_deref(), 1).await.unwrap();
                    rows.into_iter().map(|s| s.id).collect::<Vec<_>>()
                }
            };
            assert_eq!(page(None).await, [id(13)], "newest first, a page of one");
            assert_eq!(page(Some(id(13))).await, [id(11)], "neither revoked nor expired");
            assert_eq!(page(Some(id(11))).await, Vec::<String>::new());

            let renamed = store.set_display_name(&person.id, "Alice B.").await.unwrap().unwrap();
            assert_eq!((renamed.display_name.as_str(), renamed.profile_version), ("Alice B.", 1));
            assert!(store.set_display_name(&id(99), "nobody").await.unwrap().is_none());

            let stale = store.change_password(&person.id, "phc-0", "phc-2", &id(11), 200).await.unwrap();
            assert_eq!(stale, None, "a stale hash changes nothing");
            let mut revoked = store.change_password(&person.id, "phc-1", "phc-2", &id(11), 200).await.unwrap().unwrap();
            revoked.sort();
            assert_eq!(revoked, [id(13), id(14)], "every other session not revoked yet, the expired one too");
            assert_eq!(store.password_changed_by(&person.id, &id(11), 200).await.unwrap().as_deref(), Some("phc-2"));
            assert_eq!(store.password_changed_by(&person.id, &id(11), 201).await.unwrap(), None, "not since");
            assert_eq!(store.password_changed_by(&person.id, &id(13), 0).await.unwrap(), None, "not by it");
            assert_eq!(store.revoke_all(&person.id, 300).await.unwrap(), [id(11)], "the one kept, and only it");
            let ended = store.session_by_token("hash-1").await.unwrap().unwrap();
            assert_eq!((ended.revoke_time, ended.guest), (Some(300), 0));
        })
        .await;
    }

    /// Guests without sessions, created before the bound, are deleted and
    /// logged in order; a guest with a session, a newer guest and a
    /// person stay.
    #[tokio::test]
    async fn guests_left_without_sessions_are_deleted_and_logged_in_order() {
        on_each_engine(|store| async move {
            let user = |n: u32, kind: &str, create_time: i64| UserRow {
                id: format!("0190a000-0000-7000-8000-00000000000{n}"),
                username: (kind == HUMAN).then(|| format!("person{n}")),
                display_name: "someone".into(),
                password_hash: None,
                create_time,
                kind: kind.into(),
                profile_version: 0,
            };
            let users =
                [user(1, GUEST, 10), user(2, GUEST, 20), user(3, GUEST, 30), user(4, HUMAN, 5), user(5, GUEST, 900)];
            for u in &users {
                let key = u.username.as_ref().map(|n| n.to_ascii_lowercase());
                store.insert_user(u, key.as_deref()).await.unwrap();
            }
            let kept = SessionRow {
                id: "0190a000-0000-7000-8000-000000000102".into(),
                user_id: users[1].id.clone(),
                create_time: 20,
                expire_time: 10_000,
            };
            store.insert_session(&kept, "hash").await.unwrap();
            assert_eq!(
                store.purge_guests(500, 7_000, 1).await.unwrap(),
                [users[0].id.clone()],
                "a batch, oldest first"
            );
            assert_eq!(store.purge_guests(500, 8_000, 10).await.unwrap(), [users[2].id.clone()]);
            assert_eq!(store.purge_guests(500, 9_000, 10).await.unwrap(), Vec::<String>::new());
            for (u, exists) in users.iter().zip([false, true, false, true, true]) {
                assert_eq!(store.user_by_id(&u.id).await.unwrap().is_some(), exists, "{}", u.id);
            }
            let log = store.deleted_users(0, 10).await.unwrap();
            assert_eq!(log, [(1, users[0].id.clone(), 7_000), (2, users[2].id.clone(), 8_000)]);
            assert_eq!(store.deleted_users(1, 10).await.unwrap(), log[1..]);

            // DeleteAccount: the user and its sessions go, logged after the
            // purges; a second time finds nobody and logs nothing.
            let delete = |hash: Option<&'static str>, now| store.delete_user(&users[1].id, &kept.id, hash, now);
            assert_eq!(delete(Some("claimed meanwhile"), 9_500).await.unwrap(), Deletion::Changed);
            assert_eq!(delete(None, 10_500).await.unwrap(), Deletion::SessionEnded, "expired meanwhile");
            assert_eq!(delete(None, 9_500).await.unwrap(), Deletion::Deleted(vec![kept.id.clone()]), "its sessions");
            assert!(store.user_by_id(&users[1].id).await.unwrap().is_none());
            assert!(store.session_by_token("hash").await.unwrap().is_none(), "its token resolves no more");
            // ... but is known to have deleted its account, for a retry, until
            // it is purged.
            assert!(store.deleted_by_token("hash", 9_500).await.unwrap());
            assert!(!store.deleted_by_token("hash", 9_501).await.unwrap(), "not since");
            assert!(!store.deleted_by_token("late-hash", 0).await.unwrap());
            assert_eq!(delete(None, 9_600).await.unwrap(), Deletion::Gone);
            // A log-in that checked the password before the deletion finds the
            // user gone, not a database error.
            let late = SessionRow { id: "0190a000-0000-7000-8000-000000000199".into(), ..kept.clone() };
            let error = store.insert_session(&late, "late-hash").await.unwrap_err();
            assert!(matches!(error, SessionsError::UserNotFound), "{error:?}");
            assert_eq!(store.deleted_users(2, 10).await.unwrap(), [(3, users[1].id.clone(), 9_500)]);
            assert_eq!(store.purge_deleted_account_tokens(9_500).await.unwrap(), 0, "deleted at 9,500: kept");
            assert_eq!(store.purge_deleted_account_tokens(9_501).await.unwrap(), 1);
            assert!(!store.deleted_by_token("hash", 0).await.unwrap());
        })
        .await;
    }

    /// A claim finds the guest claimed (by another of its tabs) or deleted
    /// since its caller looked, and says which.
    #[tokio::test]
    async fn a_claim_tells_a_guest_claimed_meanwhile_from_one_deleted_meanwhile() {
        on_each_engine(|store| async move {
            let guest = guest();
            store.insert_user(&guest, None).await.unwrap();
            let claim = |name: &'static str| store.claim(&guest.id, name, name, "Claimed", "phc", 5);
            let kept = "0190a000-0000-7000-8000-000000000100";
            let row = SessionRow { id: kept.into(), user_id: guest.id.clone(), create_time: 0, expire_time: i64::MAX };
            store.insert_session(&row, "guest-hash").await.unwrap();
            assert_eq!(
                claim("first").await.unwrap(),
                Claim::Claimed(vec![kept.to_owned()]),
                "the guest's session ended"
            );
            let ended = store.session_by_token("guest-hash").await.unwrap().unwrap();
            assert_eq!((ended.revoke_time, ended.guest), (Some(5), 0), "revoked in the claim's own write");
            assert_eq!(claim("second").await.unwrap(), Claim::NotGuest, "claimed already");
            let row = store.user_by_id(&guest.id).await.unwrap().unwrap();
            assert_eq!((row.username.as_deref(), row.profile_version), (Some("first"), 1), "the first claim kept");
            let session = "0190a000-0000-7000-8000-000000000101";
            let row =
                SessionRow { id: session.into(), user_id: guest.id.clone(), create_time: 0, expire_time: i64::MAX };
            store.insert_session(&row, "hash").await.unwrap();
            store.delete_user(&guest.id, session, Some("phc"), 1).await.unwrap();
            assert_eq!(claim("third").await.unwrap(), Claim::Gone);
        })
        .await;
    }

    /// On PostgreSQL a guest claimed while its deletion waits for the
    /// claim's row lock is not deleted: the deletion reads what the claim
    /// committed (a password nobody confirmed), not what it read before.
    #[tokio::test]
    async fn a_claim_committed_while_a_deletion_waits_is_not_undone() {
        let Some(url) = natter_db::testing::postgres_url() else {
            eprintln!("skipped: NATTER_TEST_DATABASE_URL is not set");
            return;
        };
        let schema = natter_db::testing::unique_schema("sessions");
        let store =
            Store::new(Db::connect(&natter_db::DbConfig::postgres(&url, &schema), &crate::MIGRATOR).await.unwrap());
        let guest = guest();
        store.insert_user(&guest, None).await.unwrap();
        let session = "0190a000-0000-7000-8000-000000000101";
        let row = SessionRow { id: session.into(), user_id: guest.id.clone(), create_time: 0, expire_time: i64::MAX };
        store.insert_session(&row, "hash").await.unwrap();

        // The claim, under way: it holds the user's row.
        let mut claim = store.db().write().begin().await.unwrap();
        let (claimer,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()").fetch_one(&mut *claim).await.unwrap();
        sqlx::query("UPDATE users SET password_hash = 'phc', kind = 'human' WHERE id = $1")
            .bind(&guest.id)
            .execute(&mut *claim)
            .await
            .unwrap();
        let deletion = tokio::spawn({
            let (store, id) = (store.clone(), guest.id.clone());
            async move { store.delete_user(&id, session, None, 1).await }
        });
        // Until the deletion waits for the claim.
        loop {
            let (waiting,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
                    .bind(claimer)
                    .fetch_one(store.db().read())
                    .await
                    .unwrap();
            if waiting > 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        claim.commit().await.unwrap();
        assert_eq!(deletion.await.unwrap().unwrap(), Deletion::Changed);
        assert!(store.user_by_id(&guest.id).await.unwrap().is_some(), "the claimed account stays");
        store.db().close().await;
        natter_db::postgres::drop_schema(&url, &schema).await.unwrap();
    }

    /// A statement that fails is the origin of its error: the log line of
    /// the INTERNAL answer names it, not error.rs.
    #[tokio::test]
    async fn a_failed_statement_is_the_origin_of_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_in(&dir).await;
        store.db().close().await;
        let error = store.user_by_id("0190a000-0000-7000-8000-000000000000").await.unwrap_err();
        let SessionsError::Store { origin, .. } = &error else { panic!("a store error: {error:?}") };
        // The location of a `?` is where the expression it ends begins: here
        // the statement on the line after user_by_id's signature.
        let signature = include_str!("store.rs").lines().position(|l| l.contains("pub async fn user_by_id")).unwrap();
        let statement = signature + 2;
        assert_eq!((origin.file(), origin.line() as usize), (file!(), statement), "{error}");
    }
}

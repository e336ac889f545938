-- Users taken out of every chat for good (their accounts are deleted: the
-- sessions service's deletion log). Creating a chat with one of them or
-- adding one to a chat is refused from then on, so that a request that
-- checked the user before its deletion cannot make it a member again after
-- its removal. Kept for good: ids are never reused. The same DDL runs on
-- SQLite and PostgreSQL.
CREATE TABLE forgotten_users (
    user_id TEXT PRIMARY KEY,
    forget_time BIGINT NOT NULL
);

-- When each retry was last tried (µs; 0: not yet), so that retries that
-- keep failing take turns rather than the first ones by id hiding the rest.
ALTER TABLE followed_log_retries ADD COLUMN try_time BIGINT NOT NULL DEFAULT 0;
CREATE INDEX followed_log_retries_by_try_time ON followed_log_retries (name, try_time, item);

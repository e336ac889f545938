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

-- When each retry is due (µs; 0: at once) and how long it waited last
-- (µs; doubled at each failure, up to a bound): retries that keep failing
-- back off and take turns, rather than the first ones by id hiding the
-- rest and costing every round.
ALTER TABLE followed_log_retries ADD COLUMN retry_time BIGINT NOT NULL DEFAULT 0;
ALTER TABLE followed_log_retries ADD COLUMN delay BIGINT NOT NULL DEFAULT 0;
CREATE INDEX followed_log_retries_due ON followed_log_retries (name, retry_time, item);

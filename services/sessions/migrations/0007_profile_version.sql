-- A user's profile version: 0 at creation, one more at every change of
-- what others see of them (UpdateUser, ClaimAccount), in the change's own
-- statement. The user_updated events of a user carry it, so a stream that
-- hears of two changes (through two shared chats, or out of order over the
-- bus) keeps the newer one; the replicas' clocks, which may disagree, play
-- no part. The same DDL runs on SQLite and PostgreSQL.
ALTER TABLE users ADD COLUMN profile_version BIGINT NOT NULL DEFAULT 0;

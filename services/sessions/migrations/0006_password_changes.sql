-- The session that last changed a user's password with ChangePassword, and
-- when (µs): a retry of that call whose answer was lost (or sent again
-- while it was under way) finds its own change and is answered OK, not as
-- a wrong current password. NULL until a first ChangePassword (a password
-- set by CreateUser or ClaimAccount is no change of any session's). The
-- same DDL runs on SQLite and PostgreSQL.
ALTER TABLE users ADD COLUMN password_change_session TEXT;
ALTER TABLE users ADD COLUMN password_change_time BIGINT;

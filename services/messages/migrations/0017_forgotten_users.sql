-- Users the messages store has forgotten (MessageStore::forget_user, the
-- internal ForgetUser: their accounts are deleted). A last-seen time
-- recorded for one of them afterwards (a replica that held their stream
-- died, and its peers record the time 30-40 s on) is not stored, so their
-- presence row does not come back. Kept for good: ids are never reused.
-- The same DDL runs on SQLite and PostgreSQL.
CREATE TABLE forgotten_users (
    user_id TEXT PRIMARY KEY
);

-- How far the chats service has followed another service's log: here the
-- sessions service's log of deleted users (ListDeletedUsers), whose users
-- it takes out of their chats. A position only moves forward; the same
-- DDL runs on SQLite and PostgreSQL.
CREATE TABLE followed_logs (
    name     TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);

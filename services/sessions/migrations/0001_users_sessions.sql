-- Users and their sessions. Ids are UUID strings, times are microseconds
-- since the Unix epoch; the same DDL runs on SQLite and PostgreSQL.
CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    username      TEXT,
    -- Lower-cased username: uniqueness is case-insensitive. NULL for guests.
    username_key  TEXT UNIQUE,
    display_name  TEXT NOT NULL,
    -- argon2id PHC string; NULL for guests.
    password_hash TEXT,
    create_time   BIGINT NOT NULL
);

CREATE TABLE sessions (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id),
    -- SHA-256 of the bearer token, hex; the token itself is never stored.
    token_hash  TEXT NOT NULL UNIQUE,
    create_time BIGINT NOT NULL,
    expire_time BIGINT NOT NULL,
    revoke_time BIGINT
);

CREATE INDEX sessions_by_user ON sessions (user_id, id);

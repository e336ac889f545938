-- The token (its hash, as sessions keep it) of each DeleteAccount that
-- went through, for a day: a retry of the call whose answer was lost finds
-- its account deleted by that very token and is answered OK, not
-- UNAUTHENTICATED (which reads as a failure). Nothing else accepts these
-- tokens. The same DDL runs on SQLite and PostgreSQL.
CREATE TABLE deleted_account_tokens (
    token_hash  TEXT PRIMARY KEY,
    delete_time BIGINT NOT NULL
);
CREATE INDEX deleted_account_tokens_by_time ON deleted_account_tokens (delete_time);

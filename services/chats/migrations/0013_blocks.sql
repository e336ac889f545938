-- Users each user blocked (BlockUser): a blocked user cannot start a
-- direct chat with them or add them to a group, and a direct chat between
-- the two takes no new messages, whichever of them blocked the other. A
-- deleted user's rows, both ways, go with them
-- (ChatStore::record_forgotten). Times are µs since the Unix epoch. The
-- same DDL runs on SQLite and PostgreSQL.
CREATE TABLE blocks (
    user_id         TEXT NOT NULL,
    blocked_user_id TEXT NOT NULL,
    block_time      BIGINT NOT NULL,
    PRIMARY KEY (user_id, blocked_user_id)
);

-- Who blocked a user (checks go both ways; a deleted user's rows go).
CREATE INDEX blocks_by_blocked ON blocks (blocked_user_id, user_id);

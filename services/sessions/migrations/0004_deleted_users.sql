-- The log of deleted users (guests long gone: see the purge in
-- service.rs), which the chats service follows to take them out of their
-- chats (SessionInternalService.ListDeletedUsers). Positions are max + 1 in
-- the deleting transaction, which holds the log's lock row
-- (deleted_users_lock) first, so they commit in order and without gaps. The
-- same DDL runs on SQLite and PostgreSQL.
CREATE TABLE deleted_users (
    position    BIGINT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    delete_time BIGINT NOT NULL
);

-- One row, updated by every purge first: on PostgreSQL, two replicas'
-- purges queue on it instead of racing for the same positions.
CREATE TABLE deleted_users_lock (
    id   INTEGER PRIMARY KEY,
    runs BIGINT NOT NULL
);
INSERT INTO deleted_users_lock (id, runs) VALUES (1, 0);

-- Guests by creation, for the purge.
CREATE INDEX users_by_kind ON users (kind, create_time);

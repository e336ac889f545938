-- Change numbers (StreamEvents' change_seq): every change to a chat's
-- visible state takes the chat's next change number, in the transaction of
-- the change. The same DDL runs on SQLite and PostgreSQL.

-- The newest change number of each chat, bumped by every change (so, like
-- last_seq, it serializes a chat's writers: numbers are gap-free and
-- unique); log_floor: the newest number pruned from chat_changes (a resume
-- point below it cannot be replayed). Before this migration only message
-- creations happened in order, so the numbers so far are the seqs, and the
-- membership and chat changes before it were never logged: the floor.
ALTER TABLE chat_heads ADD COLUMN last_change BIGINT NOT NULL DEFAULT 0;
ALTER TABLE chat_heads ADD COLUMN log_floor BIGINT NOT NULL DEFAULT 0;
UPDATE chat_heads SET last_change = last_seq, log_floor = last_seq;

-- change_seq: the message's latest change; create_change: its creation
-- (a replayed message the client never saw is sent as created).
ALTER TABLE messages ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN create_change BIGINT NOT NULL DEFAULT 0;
UPDATE messages SET change_seq = seq, create_change = seq;

-- Replay is a keyset walk of this index from the client's resume point.
CREATE INDEX messages_by_chat_change ON messages (chat_id, change_seq);

-- The change that last moved the read position (0: before change numbers).
ALTER TABLE read_positions ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0;

-- Membership and chat changes, which leave no row of their own in this
-- store: the newest CHAT_LOG_KEEP of each chat (store/mod.rs).
CREATE TABLE chat_changes (
    chat_id     TEXT NOT NULL,
    change_seq  BIGINT NOT NULL,
    -- 'joined' | 'left' | 'removed' | 'role_changed' | 'updated'
    kind        TEXT NOT NULL,
    -- The member concerned; '' for 'updated'.
    user_id     TEXT NOT NULL,
    -- JSON of the chat's details for 'updated'; '' otherwise.
    details     TEXT NOT NULL,
    -- The chat's newest seq at the time.
    seq         BIGINT NOT NULL,
    change_time BIGINT NOT NULL,
    -- The idempotency key of the RecordChatChanges call that wrote the
    -- entry ('' for none): a retried call with the same key records nothing
    -- again.
    origin      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (chat_id, change_seq)
);
CREATE INDEX chat_changes_by_origin ON chat_changes (chat_id, origin);

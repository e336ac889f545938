-- The outbox of committed changes to a chat's membership or details that
-- the messages service has yet to record (RecordChatChanges): each is
-- written in the transaction of its change, so a crash between the commit
-- and the call loses nothing; an entry is removed once recorded. The same
-- DDL runs on SQLite and PostgreSQL.
CREATE TABLE chat_outbox (
    -- No reference to chats: a deleted chat's removals outlive its row.
    chat_id     TEXT NOT NULL,
    -- Per chat, from 1 in commit order: writers of one chat queue on its
    -- row (PostgreSQL) or on the one writer (SQLite), so max + 1 is unique.
    position    BIGINT NOT NULL,
    -- The idempotency key of its RecordChatChanges calls (a UUID).
    origin      TEXT NOT NULL,
    -- Base64 of a RecordChatChangesRequest holding only `changes` (at most
    -- 1,000, in the order they happened).
    changes     TEXT NOT NULL,
    create_time BIGINT NOT NULL,
    PRIMARY KEY (chat_id, position)
);

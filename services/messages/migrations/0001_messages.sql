-- Messages, their revisions, read positions and per-chat sequence heads.
-- Ids are UUID strings, times are microseconds since the Unix epoch; the same
-- DDL runs on SQLite and PostgreSQL.

-- The newest seq of each chat. Incrementing it is the first statement of a
-- send transaction, so it serializes sends per chat (a row lock on
-- PostgreSQL, the single writer on SQLite): seqs are gap-free and unique.
CREATE TABLE chat_heads (
    chat_id  TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL
);

CREATE TABLE messages (
    id           TEXT PRIMARY KEY,
    chat_id      TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    author_id    TEXT NOT NULL,
    -- Empty once deleted.
    text         TEXT NOT NULL,
    -- JSON array of attachments; '' for none (and once deleted).
    attachments  TEXT NOT NULL,
    reply_to_seq BIGINT NOT NULL,
    send_time    BIGINT NOT NULL,
    edit_time    BIGINT,
    revision     BIGINT NOT NULL,
    delete_time  BIGINT
);

-- History paging is a keyset walk of this index: flat cost at any depth.
CREATE UNIQUE INDEX messages_by_chat_seq ON messages (chat_id, seq);

-- Earlier texts of edited messages (the current one lives in messages).
CREATE TABLE message_revisions (
    message_id TEXT NOT NULL,
    revision   BIGINT NOT NULL,
    text       TEXT NOT NULL,
    edit_time  BIGINT NOT NULL,
    PRIMARY KEY (message_id, revision)
);

CREATE TABLE read_positions (
    chat_id  TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    read_seq BIGINT NOT NULL,
    PRIMARY KEY (chat_id, user_id)
);

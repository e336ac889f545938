-- Reply threads (SendMessage's thread_root_seq). A thread reply is an
-- ordinary message of its chat (the chat's next seq and change number)
-- that names its root; the root carries the thread's summary, kept in the
-- transaction of each reply and of each reply's deletion, so a page of
-- messages reads it with the rows and needs no second read. The same DDL
-- runs on SQLite and PostgreSQL.

-- The seq of the thread's root for a thread reply (kept by its tombstone);
-- 0 for every other message.
ALTER TABLE messages ADD COLUMN thread_root_seq BIGINT NOT NULL DEFAULT 0;
-- On a root: its live (not deleted) replies.
ALTER TABLE messages ADD COLUMN reply_count BIGINT NOT NULL DEFAULT 0;
-- On a root: µs since the epoch of its newest reply as sent (NULL: never
-- had one).
ALTER TABLE messages ADD COLUMN last_reply_time BIGINT;
-- On a root: the distinct authors of its replies, the latest replier first,
-- at most 10, separated by single spaces ('' for none).
ALTER TABLE messages ADD COLUMN thread_participants TEXT NOT NULL DEFAULT '';

-- A thread's page (ListMessages with thread_root_seq) walks this key from
-- the page's bound: only thread replies have entries, so a send outside a
-- thread writes none.
CREATE INDEX messages_thread ON messages (chat_id, thread_root_seq, seq) WHERE thread_root_seq > 0;

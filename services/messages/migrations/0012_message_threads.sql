-- Reply threads (SendMessage's thread_root_seq): a reply records its
-- thread's root; the root keeps the thread's summary, updated in each
-- reply's transaction. The same DDL runs on SQLite and PostgreSQL.

-- 0: not a thread reply; else the seq of its thread's root (same chat).
ALTER TABLE messages ADD COLUMN thread_root_seq BIGINT NOT NULL DEFAULT 0;
-- On a root: replies sent in its thread (deleted ones included), when the
-- latest was sent (µs, NULL: none yet), and who replied, most recent first,
-- at most 10 user ids separated by single spaces.
ALTER TABLE messages ADD COLUMN thread_reply_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN thread_last_reply_time BIGINT;
ALTER TABLE messages ADD COLUMN thread_participants TEXT NOT NULL DEFAULT '';

-- A thread's replies in seq order, for ListMessages(thread_root_seq); only
-- thread replies are in it, so messages outside threads cost nothing.
CREATE INDEX messages_thread_replies ON messages (chat_id, thread_root_seq, seq) WHERE thread_root_seq > 0;

-- Assistant replies (natter.assistant.v1): a reply is a message with role 2
-- (ASSISTANT) and a generation status (1 GENERATING, 2 COMPLETE, 3 STOPPED,
-- 4 FAILED, 5 INTERRUPTED; 0 for every message that is no reply). While
-- GENERATING its text is a checkpoint and checkpoint_time its lease; a
-- Regenerate supersedes the reply it replaces. The same DDL runs on SQLite
-- and PostgreSQL.
ALTER TABLE messages ADD COLUMN role INTEGER NOT NULL DEFAULT 1;
ALTER TABLE messages ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN replaces_id TEXT;
ALTER TABLE messages ADD COLUMN superseded INTEGER NOT NULL DEFAULT 0;
-- JSON of GenerationInfo once finished; '' before.
ALTER TABLE messages ADD COLUMN generation_info TEXT NOT NULL DEFAULT '';
-- µs since the epoch of the last checkpoint (the lease's heartbeat).
ALTER TABLE messages ADD COLUMN checkpoint_time BIGINT;
ALTER TABLE messages ADD COLUMN stop_requested INTEGER NOT NULL DEFAULT 0;
-- The sweeper's walk: only replies being generated are indexed.
CREATE INDEX messages_generating ON messages (checkpoint_time) WHERE generation = 1;

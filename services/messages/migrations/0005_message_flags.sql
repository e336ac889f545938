-- Prompt-injection flags (natter-detect), set when a message is sent or
-- edited and cleared when it is deleted: flag_severity is
-- natter.messages.v1.Severity (0 not scanned, 1 none, 2 low, 3 medium,
-- 4 high, 5 critical; flagged from 2), flags the JSON of the rest (score,
-- categories, detector). The same DDL runs on SQLite and PostgreSQL.
ALTER TABLE messages ADD COLUMN flag_severity INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN flags TEXT NOT NULL DEFAULT '';
-- Flagged messages of a chat in seq order (ListMessages' `flagged` filter,
-- the moderation queue): only they are indexed.
CREATE INDEX messages_flagged ON messages (chat_id, seq) WHERE flag_severity >= 2;

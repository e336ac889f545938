-- A chat's message count (Chat.message_count: live messages, superseded
-- replies left out) is its newest seq less its tombstones and superseded
-- replies, which only this partial index holds: counting walks them alone.
-- The same DDL runs on SQLite and PostgreSQL.
CREATE INDEX messages_gone ON messages (chat_id) WHERE delete_time IS NOT NULL OR superseded = 1;

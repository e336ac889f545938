-- Pinned messages (PinMessage, UnpinMessage). A pin is a change of the
-- message (the chat's next change number, announced as message_edited), so
-- its state is two columns of the row, read with it. Deleting a message
-- clears them. The same DDL runs on SQLite and PostgreSQL.

-- µs since the epoch of the pin; NULL: not pinned.
ALTER TABLE messages ADD COLUMN pin_time BIGINT;
-- The user who pinned it; NULL: not pinned.
ALTER TABLE messages ADD COLUMN pinned_by TEXT;

-- A chat's pins (ListMessages with pinned, and the count PinMessage checks
-- against the limit) walk this key: only pinned messages have entries, so
-- a send writes none.
CREATE INDEX messages_pinned ON messages (chat_id, seq) WHERE pin_time IS NOT NULL;

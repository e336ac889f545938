-- Whether a direct chat takes new messages (RecordChatChanges'
-- direct_chat_closed: one of its two members blocks the other), kept on
-- the chat's heads row that every send's write reads and locks (a row lock
-- on PostgreSQL, the single writer on SQLite), so that a send whose
-- membership was checked before a block, and written after the block was
-- recorded, is refused. closed_version: the highest version recorded (a
-- lower or equal one changes nothing). Chats never told stay open, as they
-- were. The same DDL runs on SQLite and PostgreSQL.
ALTER TABLE chat_heads ADD COLUMN closed BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE chat_heads ADD COLUMN closed_version BIGINT NOT NULL DEFAULT 0;

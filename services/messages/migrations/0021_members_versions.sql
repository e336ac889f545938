-- The highest members version of the chat recorded (RecordChatChanges'
-- members_departed: a member left or was removed), kept on the chat's heads
-- row that every send's write reads and locks (a row lock on PostgreSQL,
-- the single writer on SQLite): a message whose membership check saw a
-- lower version is refused there and checked again, so a send checked
-- before a departure is never stored after it. 0 before any departure.
-- The same DDL runs on SQLite and PostgreSQL.
ALTER TABLE chat_heads ADD COLUMN members_version BIGINT NOT NULL DEFAULT 0;

-- Which messages of a group chat its assistant members answer:
-- 'mentions' (the default), 'all' or 'off' (natter_chats::domain::
-- AssistantReplies). Direct chats keep the default and are always answered.
-- The same DDL runs on SQLite and PostgreSQL.
ALTER TABLE chats ADD COLUMN assistant_replies TEXT NOT NULL DEFAULT 'mentions';

-- The prompt an assistant chat's automatic title was made from (TitleChat's
-- source_message_id): deleting that prompt takes the title back
-- (UntitleChat). NULL for a title set any other way (CreateChat,
-- UpdateChat), which is never taken back. The same DDL runs on SQLite and
-- PostgreSQL.
ALTER TABLE chats ADD COLUMN title_source_message_id TEXT;

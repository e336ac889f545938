-- Whether a chat is archived (RecordChatChanges' chat_archived: ArchiveChat,
-- UnarchiveChat), kept on the chat's heads row that every send's write,
-- and the write of an edit, a reaction added or a pin, reads and locks (a
-- row lock on PostgreSQL, the single writer on SQLite), so that such a
-- write whose membership was checked before an archive, and written after
-- the archive was recorded, is refused. archived_version: the highest
-- version recorded (a lower or equal one changes nothing). Chats never
-- told are taken as not archived, until the chats service tells them (it
-- does at its start for chats archived before this release). The same DDL
-- runs on SQLite and PostgreSQL.
ALTER TABLE chat_heads ADD COLUMN archived BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE chat_heads ADD COLUMN archived_version BIGINT NOT NULL DEFAULT 0;

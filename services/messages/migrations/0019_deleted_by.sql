-- Who deleted a message (DeleteMessage's caller: its author, or the chat's
-- owner or an admin moderating): a retry of that delete by the same user,
-- its first answer lost, is answered with the tombstone whatever their role
-- or membership now (MessageService.DeleteMessage). Never shown to anyone.
-- NULL: not deleted, or deleted before this column (such a retry is then
-- answered only to a member allowed to delete it, or its author).
-- The same DDL runs on SQLite and PostgreSQL.
ALTER TABLE messages ADD COLUMN deleted_by TEXT;

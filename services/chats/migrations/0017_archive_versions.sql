-- The version of a chat's archived state: raised, under the chat's row
-- lock, by each ArchiveChat or UnarchiveChat that changes it, whose outbox
-- entry tells the messages service whether the chat is archived at that
-- version (RecordChatChanges' chat_archived; a lower version never undoes
-- a higher one there). 0 for chats never archived since this release; a
-- chat archived before it gets 1, with its state in the outbox, at the
-- service's start (ChatStore::version_old_archives). The same DDL runs on
-- SQLite and PostgreSQL.
ALTER TABLE chats ADD COLUMN archive_version BIGINT NOT NULL DEFAULT 0;

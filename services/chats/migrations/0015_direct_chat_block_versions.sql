-- The version of a direct chat's closure by blocks: raised, under the
-- chat's row lock, by each BlockUser, UnblockUser or deletion of a user
-- that changes the blocks between its two members, whose outbox entry
-- tells the messages service whether the chat takes new messages at that
-- version (RecordChatChanges' direct_chat_closed; a lower version never
-- undoes a higher one there). 0 for group chats and untouched direct
-- chats. The same DDL runs on SQLite and PostgreSQL.
ALTER TABLE chats ADD COLUMN block_version BIGINT NOT NULL DEFAULT 0;

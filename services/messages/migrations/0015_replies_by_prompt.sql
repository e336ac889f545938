-- A prompt's assistant replies (role 2, reply_to_seq the prompt's seq):
-- deleting a prompt deletes its replies too (MessageStore::
-- delete_with_replies), found through this index rather than a walk of
-- the chat's messages. Only replies are indexed. The same DDL runs on
-- SQLite and PostgreSQL.
CREATE INDEX messages_replies ON messages (chat_id, reply_to_seq) WHERE role = 2;

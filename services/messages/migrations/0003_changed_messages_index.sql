-- A send no longer pays for a second index entry: only messages changed
-- after their creation (edited or deleted: change_seq > create_change) are
-- indexed by change number. A replay finds the messages created since its
-- resume point by seq instead (messages take seqs and creation change
-- numbers in the same order; store/mod.rs, MessageStore::changes). The same
-- DDL runs on SQLite and PostgreSQL.
DROP INDEX messages_by_chat_change;
CREATE INDEX messages_changed_by_chat ON messages (chat_id, change_seq) WHERE change_seq > create_change;

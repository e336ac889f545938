-- Every chat id ever taken, kept after its chat is deleted: a deleted
-- chat's id is never given to a new chat (CreateChat with it is
-- ALREADY_EXISTS), so nothing left of the old chat, messages whose purge
-- failed, say, can surface under a new one. A deleted chat's messages are
-- purged from the messages service until purge_time is set; the relay
-- retries those still due. Times are microseconds since the Unix epoch.
-- The same DDL runs on SQLite and PostgreSQL.
CREATE TABLE chat_ids (
    id          TEXT PRIMARY KEY,
    delete_time BIGINT,
    purge_time  BIGINT
);

INSERT INTO chat_ids (id) SELECT id FROM chats;

CREATE INDEX chat_ids_to_purge ON chat_ids (delete_time) WHERE delete_time IS NOT NULL AND purge_time IS NULL;

-- Chats and their members. Ids are UUID strings, times are microseconds
-- since the Unix epoch; the same DDL runs on SQLite and PostgreSQL.
CREATE TABLE chats (
    id                 TEXT PRIMARY KEY,
    kind               TEXT NOT NULL,          -- 'direct' | 'group'
    title              TEXT NOT NULL,
    -- Unicode lower case of the title, for case-insensitive search.
    title_key          TEXT NOT NULL,
    description        TEXT NOT NULL,
    visibility         TEXT NOT NULL,          -- 'private' | 'public'
    owner_id           TEXT NOT NULL,
    creator_id         TEXT NOT NULL,
    -- '<lower uuid>:<higher uuid>' of a direct chat's two members; makes
    -- direct chats unique per pair.
    direct_key         TEXT UNIQUE,
    member_count       BIGINT NOT NULL,
    archive_time       BIGINT,
    create_time        BIGINT NOT NULL,
    update_time        BIGINT NOT NULL,
    -- Time of the newest message, else create_time: the ListChats order.
    last_activity_time BIGINT NOT NULL,
    -- seq of the newest message, 0 before the first (reported by messages).
    last_seq           BIGINT NOT NULL DEFAULT 0,
    last_message_time  BIGINT
);

CREATE INDEX chats_by_visibility_activity ON chats (visibility, last_activity_time, id);

CREATE TABLE members (
    chat_id   TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    user_id   TEXT NOT NULL,
    role      TEXT NOT NULL,                   -- 'owner' | 'admin' | 'member'
    join_time BIGINT NOT NULL,
    PRIMARY KEY (chat_id, user_id)
);

CREATE INDEX members_by_user ON members (user_id, chat_id);

-- A second privacy setting, direct_chats: who may start a direct chat with
-- the user (CreateChat of a direct chat that does not exist yet):
-- 'everyone', 'peers' (users who share a chat with them) or 'nobody'. Each
-- setting is now NULL until the user sets it (they have the deployment's
-- default for it), so setting one never fixes the other at the default of
-- the day. The table is made anew (SQLite cannot drop a NOT NULL), its rows
-- copied. The same DDL runs on SQLite and PostgreSQL.
CREATE TABLE privacy_settings_v2 (
    user_id TEXT PRIMARY KEY,
    group_adds TEXT,
    direct_chats TEXT,
    update_time BIGINT NOT NULL
);
INSERT INTO privacy_settings_v2 (user_id, group_adds, direct_chats, update_time)
    SELECT user_id, group_adds, NULL, update_time FROM privacy_settings;
DROP TABLE privacy_settings;
ALTER TABLE privacy_settings_v2 RENAME TO privacy_settings;

-- Each user's privacy settings, a row only once they set one (a user with
-- none has the defaults). group_adds: who may add the user to a group
-- (CreateChat of a group, AddMembers): 'everyone' (the default), 'peers'
-- (users who share a chat with them) or 'nobody'. A deleted user's row goes
-- with them (ChatStore::record_forgotten). Times are µs since the Unix
-- epoch. The same DDL runs on SQLite and PostgreSQL.
CREATE TABLE privacy_settings (
    user_id TEXT PRIMARY KEY,
    group_adds TEXT NOT NULL,
    update_time BIGINT NOT NULL
);

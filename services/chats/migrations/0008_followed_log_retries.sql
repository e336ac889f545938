-- Items of a followed log whose handling failed, to be tried again apart:
-- here deleted users whose removal from their chats failed, so that one of
-- them does not hold up the users deleted after it (the log's position in
-- followed_logs moves past it). An item is here at most once; the same DDL
-- runs on SQLite and PostgreSQL.
CREATE TABLE followed_log_retries (
    name TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (name, item)
);

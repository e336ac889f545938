-- Members' reports of messages to the chat's moderators: one per user per
-- message, open until resolved. The same DDL runs on SQLite and PostgreSQL.
CREATE TABLE message_reports (
    message_id  TEXT NOT NULL,
    reporter_id TEXT NOT NULL,
    chat_id     TEXT NOT NULL,
    -- natter.messages.v1.ReportReason.
    reason      INTEGER NOT NULL,
    comment     TEXT NOT NULL,
    create_time BIGINT NOT NULL,
    resolve_time BIGINT,
    resolver_id TEXT,
    PRIMARY KEY (message_id, reporter_id)
);
-- The moderation queue's look-up: only open reports are indexed.
CREATE INDEX message_reports_open ON message_reports (message_id) WHERE resolve_time IS NULL;

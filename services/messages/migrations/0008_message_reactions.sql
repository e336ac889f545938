-- Reactions (AddReaction / RemoveReaction): one row per user per emoji per
-- message, gone with the message's content when it is deleted. A message's
-- counts are read from these rows (grouped by emoji, through the primary
-- key's message_id prefix), never kept in a counter that could drift. The
-- same DDL runs on SQLite and PostgreSQL.
CREATE TABLE message_reactions (
    message_id  TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    -- One emoji grapheme cluster or a :short_code:, as the client sent it.
    emoji       TEXT NOT NULL,
    -- µs since the epoch: a message's emoji are listed by their oldest.
    create_time BIGINT NOT NULL,
    PRIMARY KEY (message_id, user_id, emoji)
);

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

-- How many rows of message_reactions the message has, kept in the same
-- transaction as they are written: a page of messages none of which has any
-- (most pages) needs no read of the reactions. The counts shown are still
-- read from the rows.
ALTER TABLE messages ADD COLUMN reaction_rows BIGINT NOT NULL DEFAULT 0;

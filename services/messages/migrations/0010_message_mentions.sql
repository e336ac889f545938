-- Mentions (SendMessage's mention_user_ids): fixed when a message is sent
-- (an edit keeps them), gone with its content when it is deleted. The same
-- DDL runs on SQLite and PostgreSQL.

-- The mentioned user ids of a message, as sent (duplicates collapsed),
-- separated by single spaces; '' for none (most messages, and once
-- deleted). Read with the row, so a page of messages needs no second read.
ALTER TABLE messages ADD COLUMN mentions TEXT NOT NULL DEFAULT '';

-- One row per mentioned user per message, but the author's own mention
-- (which never counts), written in the message's transaction and deleted
-- with its content: a member's mention count in a chat is a walk of this
-- key from their read position, (chat, user, seq), never of the chat's
-- messages. Rows are only ever of live messages, so the count needs no
-- look at them.
CREATE TABLE message_mentions (
    chat_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    PRIMARY KEY (chat_id, user_id, seq)
);

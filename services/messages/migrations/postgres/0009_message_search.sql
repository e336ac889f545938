-- Full-text search (SearchMessages), PostgreSQL's half: migration 0009 is
-- the one whose DDL differs by engine (see sqlite/0009_message_search.sql).
--
-- search_vector: the message's words as src/search.rs splits and folds them
-- (as SQLite's unicode61 tokenizer does: no text search parser, no
-- stemming), written by the store with every write of `text`; NULL only
-- for rows stored before this migration, which the store indexes when it
-- opens (messages_unindexed finds them). A GIN index answers the query.
ALTER TABLE messages ADD COLUMN search_vector tsvector;
-- Rows stored from now on without one (an assistant's reply as it starts,
-- with no text yet) have no words; the rows above stay NULL until indexed.
ALTER TABLE messages ALTER COLUMN search_vector SET DEFAULT ''::tsvector;
CREATE INDEX messages_search ON messages USING GIN (search_vector);
CREATE INDEX messages_unindexed ON messages (id) WHERE search_vector IS NULL;

-- The order messages were stored in, which "newest first" follows (as the
-- rowid on SQLite) and page tokens carry.
ALTER TABLE messages ADD COLUMN search_position BIGINT GENERATED ALWAYS AS IDENTITY;

-- Full-text search (SearchMessages), SQLite's half: migration 0009 is the
-- one whose DDL differs by engine (see postgres/0009_message_search.sql).
--
-- A contentless FTS5 index of messages' text keyed by the messages rowid:
-- it stores no copy of the text (the snippet is built from messages.text)
-- and, with contentless_delete, a row leaves it by rowid alone. The
-- unicode61 tokenizer splits at anything that is not a letter or a digit
-- and folds case and Latin diacritics; no stemming (src/search.rs does the
-- same for PostgreSQL). The rowid order is the order messages were stored
-- in, which is what "newest first" walks (FTS5 reads an index in rowid
-- order without sorting). A VACUUM may renumber the rowids of messages
-- (its primary key is TEXT): natter never runs one; whoever does must
-- rebuild this index (DELETE FROM message_search; then the INSERT below).
CREATE VIRTUAL TABLE message_search USING fts5 (
    body,
    content = '',
    contentless_delete = 1,
    tokenize = 'unicode61 remove_diacritics 2'
);

-- Kept in step by triggers, so every write path (sends, edits, deletes that
-- empty the text, assistant replies' checkpoints and finish, purges) keeps
-- it in the same transaction: a deleted or edited-away word is not found.
CREATE TRIGGER message_search_insert AFTER INSERT ON messages WHEN new.text <> '' BEGIN
    INSERT INTO message_search (rowid, body) VALUES (new.rowid, new.text);
END;

CREATE TRIGGER message_search_update AFTER UPDATE OF text ON messages WHEN old.text <> new.text BEGIN
    DELETE FROM message_search WHERE rowid = old.rowid;
    INSERT INTO message_search (rowid, body) SELECT new.rowid, new.text WHERE new.text <> '';
END;

CREATE TRIGGER message_search_delete AFTER DELETE ON messages WHEN old.text <> '' BEGIN
    DELETE FROM message_search WHERE rowid = old.rowid;
END;

INSERT INTO message_search (rowid, body) SELECT rowid, text FROM messages WHERE text <> '';

-- Forgetting a deleted user (MessageStore::forget_user, the internal
-- ForgetUser) deletes its read positions and mention rows in every chat:
-- both tables are keyed by chat first, so without these indexes each
-- deletion would walk the whole of both tables. A read position's moves
-- update no indexed column, and a mention row is written once, so they cost
-- an entry per row written, nothing per move. The same DDL runs on SQLite
-- and PostgreSQL.
CREATE INDEX read_positions_by_user ON read_positions (user_id);
CREATE INDEX message_mentions_by_user ON message_mentions (user_id);

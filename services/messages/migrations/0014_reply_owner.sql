-- The owner token of an assistant's reply (StartReplyRequest.owner): chosen
-- by the generator that started it, the same for every retry of that start.
-- A retry with it, while the reply is GENERATING, is that generator's own
-- start whose answer was lost: it is answered as created, and generates.
-- NULL: started without one (never matched), and every message that is no
-- reply. The same DDL runs on SQLite and PostgreSQL.
ALTER TABLE messages ADD COLUMN reply_owner TEXT;

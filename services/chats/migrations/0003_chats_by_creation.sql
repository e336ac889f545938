-- ListChats ordered by creation time (order_by "create_time"): the public
-- listing walks this index as it walks chats_by_visibility_activity for the
-- activity order. A chat's create_time never changes, so the index costs
-- one entry per chat created and nothing per message. The same DDL runs on
-- SQLite and PostgreSQL.
CREATE INDEX chats_by_visibility_creation ON chats (visibility, create_time, id);

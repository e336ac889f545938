-- A direct chat's two members are equals: its creator was stored as its
-- owner, which let them delete the other's messages, resolve reports
-- against their own and delete the chat. Both are plain members now (new
-- direct chats are created so). The same DML runs on SQLite and PostgreSQL.
UPDATE members SET role = 'member'
WHERE role = 'owner' AND chat_id IN (SELECT id FROM chats WHERE kind = 'direct');

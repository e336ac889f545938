-- What a user is: 'human' (a password user), 'guest' (made by a
-- credential-less CreateSession, until claimed) or 'bot' (an automated
-- member such as the assistant: a username, never a password, never a
-- session of its own). Until now a guest was a user without a password;
-- every such row is a guest. The same DDL runs on SQLite and PostgreSQL.
ALTER TABLE users ADD COLUMN kind TEXT NOT NULL DEFAULT 'human';
UPDATE users SET kind = 'guest' WHERE password_hash IS NULL;

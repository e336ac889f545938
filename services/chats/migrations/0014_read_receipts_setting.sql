-- A third privacy setting, read_receipts: who sees how far the user has
-- read a chat ('everyone': the chat's members, or 'nobody'); NULL until the
-- user sets it (the deployment's default applies). Only adds a column: a
-- build from before it reads and writes the other settings as before. The
-- same DDL runs on SQLite and PostgreSQL.
ALTER TABLE privacy_settings ADD COLUMN read_receipts TEXT;

-- Sessions by when they expire: the purge of sessions long expired
-- (--session-retention) reads the oldest first.
CREATE INDEX sessions_by_expiry ON sessions (expire_time);

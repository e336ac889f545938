-- Presence (GetPresence): when each user was last online, written when a
-- user goes offline (their last StreamEvents stream on any replica closed,
-- or the replica holding it died). Every replica that sees the change
-- writes it, keeping the latest time, so the writes are idempotent and the
-- order they land in does not matter. Whether a user is online now is
-- known only in memory (the replicas' heartbeats), never stored. The same
-- DDL runs on SQLite and PostgreSQL.
CREATE TABLE user_presence (
    user_id        TEXT PRIMARY KEY,
    -- µs since the epoch.
    last_seen_time BIGINT NOT NULL
);

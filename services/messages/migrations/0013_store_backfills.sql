-- One-off rewrites of stored rows that SQL cannot say on both engines, done
-- by the store when it opens (src/store): a row here says one is done, so
-- it runs once per database. `nfc_text`: messages' text in Unicode NFC
-- (sent before sends were normalized).
CREATE TABLE store_backfills (
    name      TEXT PRIMARY KEY,
    done_time BIGINT NOT NULL
);

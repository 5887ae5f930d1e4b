-- See 0001_outbox.postgresql.sql for the why of each table.
CREATE TABLE IF NOT EXISTS tenfold_outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL UNIQUE,
    topic        TEXT NOT NULL,
    event_key    TEXT NOT NULL,
    slot         INTEGER NOT NULL,
    payload      BLOB NOT NULL,
    headers      TEXT,
    created_at   DOUBLE PRECISION NOT NULL,
    published_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS tenfold_outbox_pending ON tenfold_outbox (seq) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS tenfold_outbox_slot ON tenfold_outbox (slot, seq);

CREATE TABLE IF NOT EXISTS tenfold_inbox (
    consumer_group TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    slot           INTEGER NOT NULL,
    processed_at   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (consumer_group, event_id)
);
CREATE INDEX IF NOT EXISTS tenfold_inbox_slot ON tenfold_inbox (slot);

CREATE TABLE IF NOT EXISTS tenfold_relay_lease (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);

-- The transactional outbox: written in the same transaction as the state
-- change it announces; the relay publishes rows whose published_at is NULL.
-- The relay scans for unpublished rows, never "seq > last seen": seq values are
-- allocated before commit and commit out of order.
CREATE TABLE IF NOT EXISTS tenfold_outbox (
    seq          BIGSERIAL PRIMARY KEY,
    event_id     TEXT NOT NULL UNIQUE,
    topic        TEXT NOT NULL,
    event_key    TEXT NOT NULL,
    slot         INTEGER NOT NULL,
    payload      BYTEA NOT NULL,
    headers      TEXT,
    created_at   DOUBLE PRECISION NOT NULL,
    published_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS tenfold_outbox_pending ON tenfold_outbox (seq) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS tenfold_outbox_slot ON tenfold_outbox (slot, seq);

-- Wake the relay on commit instead of waiting for its next poll.
CREATE OR REPLACE FUNCTION tenfold_outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('tenfold_outbox', '');
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS tenfold_outbox_notify ON tenfold_outbox;
CREATE TRIGGER tenfold_outbox_notify AFTER INSERT ON tenfold_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION tenfold_outbox_notify();

-- Exactly-once effects: a consumer records each event id it applied, in the
-- transaction of the effect itself.
CREATE TABLE IF NOT EXISTS tenfold_inbox (
    consumer_group TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    slot           INTEGER NOT NULL,
    processed_at   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (consumer_group, event_id)
);
CREATE INDEX IF NOT EXISTS tenfold_inbox_slot ON tenfold_inbox (slot);

-- One active relay per shard outbox.
CREATE TABLE IF NOT EXISTS tenfold_relay_lease (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
